//! Threads. Checkpoint: every thread of the process is seized and stopped before any of
//! them is read (threads born meanwhile are caught: seized threads' clones are traced
//! from birth, the others are found by listing /proc/PID/task again until nothing new
//! appears), each one's own state is read, and all of them are let go again (or killed).
//! Restore: the other threads are made again by the restored main thread with clone3
//! (with their thread IDs when the PID is kept) and each gets its own state.

use std::collections::{HashSet, VecDeque};

use crate::error::{sys_err, Error, Result};
use crate::image::{PendingSignal, Rseq, ThreadImage};
use crate::procfs;
use crate::remote::Remote;
use crate::restore::{Builder, AT_MISC, AT_STR};
use crate::sys::{self, Regs, Stop};

const PTRACE_EVENT_CLONE: i32 = 3;
pub(crate) const PTRACE_EVENT_STOP: i32 = 128;

/// One thread held in a ptrace stop.
pub(crate) struct Task {
    /// Its thread ID as we see it.
    pub tid: i32,
    /// Its thread ID in its own PID namespace.
    pub own: i32,
    /// Its registers as they were when it stopped.
    pub regs: Regs,
    /// Signals it was about to take when it stopped, to be queued again on release.
    pub held: Vec<Vec<u8>>,
}

fn signo(info: &[u8]) -> i32 {
    i32::from_le_bytes(info[..4].try_into().expect("a siginfo has 128 bytes"))
}

/// Stops every thread of `pid` (its main thread first in the result). On failure every
/// thread already stopped is let go again.
pub(crate) fn freeze_all(pid: i32) -> Result<Vec<Task>> {
    let opts = (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE) as u64;
    let mut known = HashSet::new();
    let mut frozen: Vec<Task> = Vec::new();
    let mut waiting: VecDeque<i32> = VecDeque::new();
    let res = (|| {
        loop {
            // Main thread first, then whatever /proc lists that we do not have yet.
            let mut tids = procfs::tasks(pid)?;
            tids.sort_by_key(|&t| t != pid);
            for t in tids {
                if !known.insert(t) {
                    continue;
                }
                match sys::seize(t, opts) {
                    Ok(()) => {
                        sys::interrupt(t).map_err(|e| sys_err("stopping a thread", e))?;
                        waiting.push_back(t);
                    }
                    // Gone already (a thread that ended).
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) && t != pid => {}
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                        return Err(Error::NoProcess(pid))
                    }
                    // Born to a thread we had seized: traced by us already, it stops by
                    // itself (PTRACE_EVENT_STOP).
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) && traced_by_us(t) => {
                        waiting.push_back(t)
                    }
                    // Ending: the kernel refuses to attach a thread whose exit has begun
                    // (EPERM, not ESRCH) while /proc still lists it. Seen in CI with a
                    // program that starts and ends threads all the time.
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) && t != pid && ending(t) => {}
                    Err(e) => return Err(sys_err(format!("attaching to thread {t}"), e)),
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            while let Some(t) = waiting.pop_front() {
                let mut held = Vec::new();
                if stop(t, &mut held, &mut known, &mut waiting)? {
                    frozen.push(Task {
                        tid: t,
                        own: procfs::own_pid(t),
                        regs: sys::get_regs(t)?,
                        held,
                    });
                } else if t == pid {
                    return Err(Error::NoProcess(pid));
                }
            }
        }
    })();
    match res {
        Ok(()) => {
            frozen.sort_by_key(|t| t.tid != pid);
            Ok(frozen)
        }
        Err(e) => {
            for t in &frozen {
                let _ = sys::detach(t.tid, t.held.first().map_or(0, |i| signo(i)));
            }
            // Seized but not yet stopped: detach needs a stop; wait for it first.
            for t in waiting {
                let mut held = Vec::new();
                if let Ok(true) = stop(t, &mut held, &mut known, &mut VecDeque::new()) {
                    let _ = sys::detach(t, held.first().map_or(0, |i| signo(i)));
                }
            }
            Err(e)
        }
    }
}

/// Whether thread `t` has ended or is ending (a zombie or dead thread, or gone).
fn ending(t: i32) -> bool {
    procfs::status(t).map_or(true, |s| {
        s.get("State")
            .is_some_and(|st| st.starts_with('Z') || st.starts_with('X'))
    })
}

/// Whether thread `t` is traced by this process (one of its threads).
fn traced_by_us(t: i32) -> bool {
    let tracer: i32 = procfs::status(t)
        .ok()
        .and_then(|s| s.get("TracerPid").and_then(|p| p.parse().ok()))
        .unwrap_or(0);
    tracer != 0 && tracer_is_us(tracer)
}

/// Whether a thread's TracerPid (a thread ID; 0: not traced) is nobody's or one of this
/// process's threads (the one that froze it, or one that holds it at its exec).
pub(crate) fn tracer_is_us(tracer: i32) -> bool {
    let me = std::process::id() as i32;
    tracer == 0 || tracer == me || procfs::tasks(me).is_ok_and(|ts| ts.contains(&tracer))
}

/// Waits until seized thread `t` is in its interrupt stop; false if it ended. A signal
/// on its way in is held (and the stop asked for again), a clone's new thread is added to
/// `waiting` (it stops by itself).
fn stop(
    t: i32,
    held: &mut Vec<Vec<u8>>,
    known: &mut HashSet<i32>,
    waiting: &mut VecDeque<i32>,
) -> Result<bool> {
    let again = |t: i32| -> Result<()> {
        sys::cont(t, 0).map_err(|e| sys_err("ptrace", e))?;
        sys::interrupt(t).map_err(|e| sys_err("stopping a thread", e))
    };
    loop {
        let Ok(s) = sys::wait(t) else {
            return Ok(false);
        };
        match s {
            Stop::Stopped { event, .. } if event == PTRACE_EVENT_STOP => return Ok(true),
            Stop::Stopped {
                event: PTRACE_EVENT_CLONE,
                ..
            } => {
                let new = sys::get_event_msg(t).map_err(|e| sys_err("ptrace", e))? as i32;
                if known.insert(new) {
                    waiting.push_back(new);
                }
                again(t)?;
            }
            Stop::Stopped { event: 0, .. } => {
                held.push(sys::get_siginfo(t)?);
                again(t)?;
            }
            Stop::Stopped { .. } => sys::cont(t, 0).map_err(|e| sys_err("ptrace", e))?,
            Stop::Exited(_) | Stop::Signaled(_) => return Ok(false),
        }
    }
}

/// Queues the signals task `t` held again, by system calls of its own (`r`: the kernel
/// lets only a thread itself queue a signal that looks sent by the kernel or by tgkill to
/// it), with `addr` as scratch memory. What cannot be queued stays held (delivered at
/// detach).
pub(crate) fn requeue_held(t: &mut Task, tgid: i32, r: &mut Remote, addr: u64) -> Result<()> {
    while let Some(info) = t.held.first().cloned() {
        queue_own(r, tgid, t.own, &info, addr)?;
        t.held.remove(0);
    }
    // Signals that arrived while it queued these.
    t.held.append(&mut r.held);
    Ok(())
}

/// Queues the signal `info` (a raw siginfo) to thread `tid` of `tgid` by a system call
/// of that very thread (`r`), with `addr` as scratch memory.
pub(crate) fn queue_own(r: &mut Remote, tgid: i32, tid: i32, info: &[u8], addr: u64) -> Result<()> {
    if info.len() != 128 {
        return Err(Error::BadImage("pending signal of wrong size".into()));
    }
    sys::write_mem(r.pid, addr, info)?;
    r.call(
        "queueing a pending signal",
        libc::SYS_rt_tgsigqueueinfo,
        &[tgid as u64, tid as u64, signo(info) as u64, addr],
    )?;
    Ok(())
}

/// Lets every task go on as it was: its registers back, then detached (with the first
/// signal it still holds). Other threads first; every one is tried.
pub(crate) fn detach_tasks(tasks: &[Task]) -> Result<()> {
    let mut first_err = None;
    for t in tasks.iter().rev() {
        let res = sys::set_regs(t.tid, &t.regs).and_then(|_| {
            let sig = t.held.first().map_or(0, |s| signo(s));
            sys::detach(t.tid, sig).map_err(|e| sys_err("detaching", e))
        });
        if let Err(e) = res {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Kills the process of `tasks` and reaps every thread's ptrace stops.
pub(crate) fn kill_all(tasks: &[Task]) -> Result<()> {
    let Some(main) = tasks.first() else {
        return Ok(());
    };
    sys::kill(main.tid, libc::SIGKILL)
        .map_err(|e| sys_err("killing the checkpointed process", e))?;
    // The main thread is reported last, once all others are gone.
    for t in tasks.iter().rev() {
        while let Ok(Stop::Stopped { .. }) = sys::wait(t.tid) {
            let _ = sys::cont(t.tid, 0);
        }
    }
    Ok(())
}

/// What only a thread can tell about itself, asked by system calls injected into it
/// (`r`), with `addr` as scratch memory: (sigaltstack, clear_child_tid).
pub(crate) fn own_queries(r: &mut Remote, addr: u64) -> Result<((u64, i32, u64), u64)> {
    let mut buf = [0u8; 24];
    let pid = r.pid;
    r.call("sigaltstack", libc::SYS_sigaltstack, &[0, addr])?;
    sys::read_mem(pid, addr, &mut buf)?;
    let u =
        |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let altstack = (
        u(&buf, 0),
        i32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")),
        u(&buf, 2),
    );
    r.call("prctl(PR_GET_TID_ADDRESS)", libc::SYS_prctl, &[40, addr])?;
    sys::read_mem(pid, addr, &mut buf[..8])?;
    Ok((altstack, u(&buf, 0)))
}

/// The image of a stopped thread other than the main one.
pub(crate) fn image_of(pid: i32, t: &Task, own: ((u64, i32, u64), u64)) -> Result<ThreadImage> {
    let mut pending: Vec<PendingSignal> = sys::peek_siginfo(t.tid, false)?
        .into_iter()
        .map(|siginfo| PendingSignal {
            shared: false,
            siginfo,
        })
        .collect();
    pending.extend(t.held.iter().map(|s| PendingSignal {
        shared: false,
        siginfo: s.clone(),
    }));
    let (sigaltstack, clear_child_tid) = own;
    Ok(ThreadImage {
        tid: t.own,
        comm: std::fs::read_to_string(format!("/proc/{pid}/task/{}/comm", t.tid))
            .unwrap_or_default()
            .trim_end()
            .to_string(),
        regs: sys::regs_to_bytes(&t.regs),
        fs_base: t.regs.fs_base,
        gs_base: t.regs.gs_base,
        xstate: sys::get_xstate(t.tid)?,
        blocked: sys::get_sigmask(t.tid)?,
        pending,
        sigaltstack,
        rseq: sys::get_rseq(t.tid)?.map(|(addr, len, sig)| Rseq { addr, len, sig }),
        robust_list: sys::get_robust_list(t.tid)?,
        clear_child_tid,
    })
}

/// Why a thread of `pid` stops the process from being checkpointed, if one does: its
/// main thread ended (pthread_exit), or a thread is traced or filtered (seccomp; with
/// `away`, the one filter of a process away from home is ours and no refusal).
pub(crate) fn refusals(pid: i32, away: bool, why: &mut Vec<String>) {
    for t in procfs::tasks(pid).unwrap_or_default() {
        let Ok(st) = procfs::status(t) else { continue };
        let get = |k: &str| st.get(k).map(String::as_str).unwrap_or("");
        let mut add = |r: String| {
            if !why.contains(&r) {
                why.push(r)
            }
        };
        if t == pid && get("State").starts_with('Z') {
            add("its main thread has ended (the others go on)".into());
        }
        let tracer: i32 = get("TracerPid").parse().unwrap_or(0);
        if !tracer_is_us(tracer) {
            add(format!("it is being traced by process {tracer}"));
        }
        let ours = away && get("Seccomp_filters") == "1";
        if !matches!(get("Seccomp"), "" | "0") && !ours {
            add("it runs under a seccomp filter".into());
        }
    }
}

/// Restore: thread `t` made again by the main thread (`r`, stopped at a `syscall` of the
/// work area `scratch`), with thread ID `t.tid` when `keep_tid`. Returns it stopped, with
/// everything of its own set but its credentials and final registers.
/// What thread IDs restored threads get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tids {
    /// New ones.
    New,
    /// Their own (clone3 set_tid, in a PID namespace of ours).
    Keep,
    /// Their own if free (ns_last_pid set just before each clone; a process forking
    /// elsewhere on the machine at that instant takes it): a process rebuilt at home,
    /// where it cannot be given set_tid.
    Hint,
}

pub(crate) fn create(
    r: &mut Remote,
    pid: i32,
    scratch_args: u64,
    t: &ThreadImage,
    tids: Tids,
) -> Result<Task> {
    let before: HashSet<i32> = procfs::tasks(pid)?.into_iter().collect();
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    // struct clone_args (88 bytes), then the set_tid array.
    let tid_at = scratch_args + 128;
    let args = |with_tid: bool| {
        let mut a = [0u64; 11];
        a[0] = flags;
        if with_tid {
            a[8] = tid_at;
            a[9] = 1;
        }
        let mut bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
        bytes.resize(128, 0);
        bytes.extend_from_slice(&t.tid.to_le_bytes());
        bytes
    };
    // Hint: set_tid first where the process may ask for it (a root job rebuilt at home
    // has CAP_SYS_ADMIN over its PID namespace); a user's job cannot, and gets its own
    // ID only if it is free when ns_last_pid is set (a process forking elsewhere on the
    // machine at that instant takes it).
    let mut keep_tid = matches!(tids, Tids::Keep | Tids::Hint) && t.tid > 1;
    sys::write_mem(pid, scratch_args, &args(keep_tid))?;
    let made = if keep_tid {
        r.call(
            &format!("creating thread {}", t.tid),
            libc::SYS_clone3,
            &[scratch_args, 88],
        )
    } else {
        r.call("creating a thread", libc::SYS_clone3, &[scratch_args, 88])
    };
    match made {
        Err(Error::Remote { errno, .. })
            if tids == Tids::Hint && matches!(errno, libc::EPERM | libc::EEXIST | libc::EINVAL) =>
        {
            keep_tid = false;
            sys::write_mem(pid, scratch_args, &args(false))?;
            let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", (t.tid - 1).to_string());
            r.call("creating a thread", libc::SYS_clone3, &[scratch_args, 88])?;
        }
        other => {
            other?;
        }
    }
    let new: Vec<i32> = procfs::tasks(pid)?
        .into_iter()
        .filter(|x| !before.contains(x))
        .collect();
    let [tid] = new[..] else {
        return Err(Error::Target {
            pid,
            msg: format!("{} new threads after one clone", new.len()),
        });
    };
    // Traced from birth (PTRACE_O_TRACECLONE); it stops before its first instruction.
    match sys::wait(tid)? {
        Stop::Stopped { .. } => {}
        s => {
            return Err(Error::Target {
                pid,
                msg: format!("new thread {tid} ended ({s:?})"),
            })
        }
    }
    let regs = sys::get_regs(tid)?;
    Ok(Task {
        tid,
        own: if keep_tid {
            t.tid
        } else {
            procfs::own_pid(tid)
        },
        regs,
        held: Vec::new(),
    })
}

/// The per-thread kernel state of `t`, set by system calls injected into the new thread
/// (`r`); `name_at` is scratch memory for its name.
pub(crate) fn set_own(r: &mut Remote, t: &ThreadImage, name_at: u64, misc_at: u64) -> Result<()> {
    if t.robust_list.0 != 0 {
        r.call(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[t.robust_list.0, t.robust_list.1],
        )?;
    }
    if let Some(rs) = &t.rseq {
        r.call(
            "rseq",
            libc::SYS_rseq,
            &[rs.addr, rs.len as u64, 0, rs.sig as u64],
        )?;
    }
    let (sp, flags, size) = t.sigaltstack;
    if flags & libc::SS_DISABLE == 0 {
        let mut buf = Vec::new();
        buf.extend_from_slice(&sp.to_le_bytes());
        buf.extend_from_slice(&(flags as i64).to_le_bytes());
        buf.extend_from_slice(&size.to_le_bytes());
        sys::write_mem(r.pid, misc_at, &buf)?;
        r.call("sigaltstack", libc::SYS_sigaltstack, &[misc_at, 0])?;
    }
    r.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[t.clear_child_tid],
    )?;
    let mut name = t.comm.as_bytes()[..t.comm.len().min(15)].to_vec();
    name.push(0);
    sys::write_mem(r.pid, name_at, &name)?;
    r.call(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, name_at],
    )?;
    Ok(())
}

/// Registers as a restored thread must start with: a system call interrupted at
/// checkpoint time is restarted (rewound), `-ERESTART_RESTARTBLOCK` becomes `-EINTR`.
pub(crate) fn resume_regs(mut regs: Regs) -> Regs {
    const ERESTARTSYS: i64 = 512;
    const ERESTARTNOINTR: i64 = 513;
    const ERESTARTNOHAND: i64 = 514;
    const ERESTART_RESTARTBLOCK: i64 = 516;
    if (regs.orig_rax as i64) >= 0 {
        match -(regs.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                regs.rax = regs.orig_rax;
                regs.rip -= 2;
            }
            ERESTART_RESTARTBLOCK => regs.rax = (-libc::EINTR) as i64 as u64,
            _ => {}
        }
    }
    regs.orig_rax = u64::MAX;
    regs
}

/// Lets every thread of restored process `pid` run (other threads first).
pub(crate) fn detach_all(pid: i32) -> Result<()> {
    let mut tids = procfs::tasks(pid)?;
    tids.sort_by_key(|&t| t == pid);
    for t in tids {
        match sys::detach(t, 0) {
            Ok(()) => {}
            Err(e) if t != pid && e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(sys_err("detaching", e)),
        }
    }
    Ok(())
}

/// Kills a half-restored process `pid` and reaps every thread of it.
pub(crate) fn kill_and_reap(pid: i32) {
    let mut tids = procfs::tasks(pid).unwrap_or_default();
    tids.sort_by_key(|&t| t == pid);
    let _ = sys::kill(pid, libc::SIGKILL);
    if !tids.contains(&pid) {
        tids.push(pid);
    }
    for t in tids {
        while let Ok(Stop::Stopped { .. }) = sys::wait(t) {
            let _ = sys::cont(t, 0);
        }
    }
}

/// Makes the image's other threads, each with its own state and pending signals; they
/// are left stopped.
pub(crate) fn make_all<'a>(
    b: &mut Builder<'a>,
    tids: Tids,
) -> Result<Vec<(Task, &'a ThreadImage)>> {
    let img = b.img;
    let mut made = Vec::new();
    for ti in &img.threads {
        let t = create(&mut b.r, b.pid, b.scratch + AT_MISC, ti, tids)?;
        let mut r = Remote::new(t.tid, b.r.ip, t.regs);
        set_own(&mut r, ti, b.scratch + AT_STR, b.scratch + AT_MISC)?;
        for s in &ti.pending {
            queue_own(&mut r, b.own, t.own, &s.siginfo, b.scratch + AT_MISC)?;
        }
        made.push((t, ti));
    }
    Ok(made)
}
