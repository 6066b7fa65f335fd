//! A process that moves between its home and other nodes (docs/transparency.md):
//!
//! - leaving home, its descriptors and children stay at home ([`checkpoint_moving`]), and
//!   the frozen process becomes its own deputy ([`Held::become_program`]): an exec that
//!   keeps its PID, parent, session and descriptors;
//! - on a host it is restored with placeholders for those descriptors, in a UTS namespace
//!   with its home's name, under a seccomp filter whose listener its restorer gets
//!   ([`restore_away`]);
//! - coming home, it is rebuilt inside its deputy ([`restore_into`]), which execs the
//!   program's own executable first.

use crate::check::Rules;
use crate::creds::{self, CredOptions};
use crate::dump::{self, DumpStats, Held, Moving};
use crate::error::{sys_err, Error, Result};
use crate::image::{Compression, LoadedImage};
use crate::remote::{find_syscall_insn, Remote};
use crate::restore::{Mode, RestoreOptions, Restored};
use crate::sys;
use std::io::Write;
use std::os::fd::OwnedFd;

/// How a process leaves the node it is on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Leaving {
    /// It runs away from home now (under our filter; its descriptors are placeholders).
    pub away: bool,
    /// The no_new_privs it really has (away, it runs with it set for the filter's sake).
    pub no_new_privs: Option<bool>,
}

/// Checks whether `pid` can move: Ok(()) or every reason it cannot. Its descriptors and
/// children stay at home, so they do not refuse.
pub fn check_moving(pid: i32, l: &Leaving) -> Result<()> {
    let reasons = crate::check::refusals_with(
        pid,
        Rules {
            leave_home: true,
            away: l.away,
        },
    )?;
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(Error::Refused { pid, reasons })
    }
}

/// Checkpoints `pid` for a move and keeps it frozen, as [`crate::checkpoint_held`] does;
/// every descriptor is recorded as held at home ([`crate::image::FdKind::Home`]).
pub fn checkpoint_moving<W: Write + 'static>(
    pid: i32,
    out: W,
    compression: Compression,
    l: &Leaving,
    progress: dump::Progress<'_>,
) -> Result<(W, DumpStats, Held)> {
    checkpoint_moving_with(pid, out, compression, l, &mut || Ok(Vec::new()), progress)
}

/// [`checkpoint_moving`], with `on_frozen` called once the process is frozen and before
/// it is saved: it returns the system calls of its threads that were finished for it
/// meanwhile ((TID as we see it, result)), whose results go into their registers (so the
/// restored process does not make them again). An error from it releases the process.
pub fn checkpoint_moving_with<W: Write + 'static>(
    pid: i32,
    out: W,
    compression: Compression,
    l: &Leaving,
    on_frozen: &mut dyn FnMut() -> Result<Vec<(i32, i64)>>,
    progress: dump::Progress<'_>,
) -> Result<(W, DumpStats, Held)> {
    check_moving(pid, l)?;
    let t0 = std::time::Instant::now();
    let mut frozen = dump::freeze(pid)?;
    for (tid, ret) in on_frozen()? {
        if let Some(t) = frozen.tasks.iter_mut().find(|t| t.tid == tid) {
            t.regs.rax = ret as u64;
            sys::set_regs(tid, &t.regs)?;
        }
    }
    let opts = dump::DumpOptions {
        leave_running: true,
        compression,
    };
    let moving = Moving {
        rules: Rules {
            leave_home: true,
            away: l.away,
        },
        no_new_privs: l.no_new_privs,
    };
    let (w, mut stats) = dump::dump_frozen_for(&mut frozen, out, opts, moving, progress)?;
    stats.frozen = t0.elapsed();
    Ok((w, stats, Held { frozen }))
}

/// A tracker of the pages `pid` writes, for [`checkpoint_moving_live`], made before
/// anything of a pre-copy move is announced: if this fails, the move can still be a
/// frozen one ([`checkpoint_moving_with`]). `uffd`: a userfaultfd of its memory made by
/// its restorer and set up already, needed for a process away from home (calls injected
/// into it would be trapped by its filter): checked to be one. None: one is made in it
/// (it is frozen for a moment). A process with a private mapping of shared memory gets
/// none (pre-copy would not save the pages it copies on write there). Whatever an earlier tracker of the same userfaultfd left
/// registered and protected is saved whole by the first round (see
/// [`crate::dirty::Tracker::whole`]).
pub fn track_moving(pid: i32, l: &Leaving, uffd: Option<OwnedFd>) -> Result<crate::dirty::Tracker> {
    let maps = crate::procfs::maps(pid)?;
    if let Some(name) = crate::shmem::private_mapping(&maps) {
        return Err(Error::Unrestorable(format!(
            "it has a private mapping of its shared memory {name}: the pages it copies on write there are saved only frozen"
        )));
    }
    match uffd {
        Some(u) => {
            crate::dirty::check_userfaultfd(&u)?;
            crate::dirty::Tracker::adopt_ready(pid, u)
        }
        None if l.away => Err(Error::Unrestorable(
            "a process away from home is tracked only with a userfaultfd made by its restorer, and there is none"
                .into(),
        )),
        None => crate::dirty::Tracker::attach(pid),
    }
}

/// [`checkpoint_moving_with`] with the memory saved while the process runs (pre-copy
/// rounds, see [`crate::checkpoint_live`]): it is frozen only at the end, when
/// `on_frozen` is called, for its state and the pages it wrote last, and then held.
/// `tracker`: see [`track_moving`]. The stream is flushed before `on_frozen` is called.
/// On failure the process goes on as it was.
#[allow(clippy::too_many_arguments)]
pub fn checkpoint_moving_live<W: Write + 'static>(
    pid: i32,
    out: W,
    l: &Leaving,
    opts: &crate::LiveOptions,
    tracker: crate::dirty::Tracker,
    on_frozen: &mut dyn FnMut() -> Result<Vec<(i32, i64)>>,
    on_round: &mut dyn FnMut(&crate::RoundStat),
    progress: dump::Progress<'_>,
) -> Result<(W, crate::LiveStats, Held)> {
    check_moving(pid, l)?;
    let tracker = Some(tracker);
    let moving = Moving {
        rules: Rules {
            leave_home: true,
            away: l.away,
        },
        no_new_privs: l.no_new_privs,
    };
    let (w, stats, frozen) = crate::precopy::precopy(
        pid, out, opts, moving, tracker, on_frozen, on_round, progress,
    )?;
    Ok((w, stats, Held { frozen }))
}

/// Strings and the pointer arrays of an execve, laid out for address `base`.
fn exec_block(base: u64, path: &str, argv: &[String], envp: &[String]) -> (Vec<u8>, u64, u64, u64) {
    let mut strings = Vec::new();
    let mut put = |s: &str| {
        let at = strings.len() as u64;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        at
    };
    let p = put(path);
    let a: Vec<u64> = argv.iter().map(|s| put(s)).collect();
    let e: Vec<u64> = envp.iter().map(|s| put(s)).collect();
    let arrays_at = (strings.len() as u64).div_ceil(8) * 8;
    let mut block = strings;
    block.resize(arrays_at as usize, 0);
    let argv_at = base + block.len() as u64;
    for off in &a {
        block.extend_from_slice(&(base + off).to_le_bytes());
    }
    block.extend_from_slice(&0u64.to_le_bytes());
    let envp_at = base + block.len() as u64;
    for off in &e {
        block.extend_from_slice(&(base + off).to_le_bytes());
    }
    block.extend_from_slice(&0u64.to_le_bytes());
    (block, base + p, argv_at, envp_at)
}

/// Makes stopped tracee `r` exec `path`; on failure it is as it was. Signals pending
/// for it are taken off first (an exec keeps them, and the new program's default
/// actions would act on them): their numbers are returned.
fn inject_exec(
    r: &mut Remote,
    path: &str,
    argv: &[String],
    envp: &[String],
    clear_cloexec: &[i32],
) -> Result<Vec<i32>> {
    let pid = r.pid;
    for &fd in clear_cloexec {
        // One that is not there (closed meanwhile) has nothing to keep.
        let r = r.raw(libc::SYS_fcntl, &[fd as u64, libc::F_SETFD as u64, 0])?;
        if r < 0 && r != -(libc::EBADF as i64) {
            return Err(Error::Remote {
                pid,
                what: format!("clearing close-on-exec of fd {fd}"),
                errno: (-r) as i32,
            });
        }
    }
    let (probe, ..) = exec_block(0, path, argv, envp);
    let len = (probe.len() as u64 + 16).div_ceil(sys::PAGE) * sys::PAGE;
    let area = r.call(
        "mmap for exec",
        libc::SYS_mmap,
        &[
            0,
            len,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    let (block, p, a, e) = exec_block(area, path, argv, envp);
    sys::write_mem(pid, area, &block)?;
    // Every signal blocked, then the pending ones dequeued (a 0 timeout at `area`).
    let all = !0u64;
    sys::write_mem(pid, area + len - 16, &[0u8; 16])?;
    let mut took = Vec::new();
    sys::write_mem(pid, area + len - 24, &all.to_le_bytes())?;
    r.call(
        "blocking signals",
        libc::SYS_rt_sigprocmask,
        &[libc::SIG_SETMASK as u64, area + len - 24, 0, 8],
    )?;
    loop {
        let s = r.raw(
            libc::SYS_rt_sigtimedwait,
            &[area + len - 24, 0, area + len - 16, 8],
        )?;
        if s <= 0 {
            break;
        }
        took.push(s as i32);
        if took.len() > 256 {
            break;
        }
    }
    took.extend(
        r.held
            .drain(..)
            .map(|i| i32::from_le_bytes(i[..4].try_into().expect("4"))),
    );
    sys::set_options(
        pid,
        (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACEEXEC) as u64,
    )
    .map_err(|e| sys_err("ptrace options", e))?;
    let ret = r.raw(libc::SYS_execve, &[p, a, e])?;
    if ret != 0 {
        let _ = r.raw(libc::SYS_munmap, &[area, len]);
        for &fd in clear_cloexec {
            let _ = r.raw(
                libc::SYS_fcntl,
                &[fd as u64, libc::F_SETFD as u64, libc::FD_CLOEXEC as u64],
            );
        }
        return Err(Error::Remote {
            pid,
            what: format!("exec of {path}"),
            errno: (-ret) as i32,
        });
    }
    Ok(took)
}

impl Held {
    /// Turns the held process into another program (its deputy) by an exec, keeping its
    /// PID, parent, process group, session, controlling terminal, credentials, cwd,
    /// limits and descriptors (close-on-exec is cleared on `clear_cloexec` first, the
    /// new program sets it again). It is let go at the new program's first instruction.
    /// Returns the signals that reached it since it was saved (to pass on). On failure
    /// it is still held as it was.
    pub fn become_program(
        mut self,
        path: &str,
        argv: &[String],
        envp: &[String],
        clear_cloexec: &[i32],
    ) -> std::result::Result<Vec<i32>, Box<(Error, Held)>> {
        let mut r = match self.frozen.remote_of(0) {
            Ok(r) => r,
            Err(e) => return Err(Box::new((e, self))),
        };
        // Its other threads end first, each by an exit of its own (an exec would kill
        // them, but they are ours under ptrace: they must not run a single instruction,
        // the process runs elsewhere now).
        if let Err(e) = self.end_other_threads() {
            return Err(Box::new((e, self)));
        }
        match inject_exec(&mut r, path, argv, envp, clear_cloexec) {
            Ok(mut sigs) => {
                let pid = self.frozen.pid;
                for t in &mut self.frozen.tasks {
                    sigs.extend(
                        t.held
                            .drain(..)
                            .map(|i| i32::from_le_bytes(i[..4].try_into().expect("4"))),
                    );
                }
                self.frozen.done = true;
                if let Err(e) = sys::detach(pid, 0) {
                    tracing::warn!("detaching {pid} after its exec: {e}");
                }
                Ok(sigs)
            }
            Err(e) => {
                self.frozen.tasks[0].held.append(&mut r.held);
                // Registers back as they were (the injected calls changed them).
                let _ = sys::set_regs(self.frozen.pid, &self.frozen.tasks[0].regs);
                Err(Box::new((e, self)))
            }
        }
    }
}

/// Ends thread `tid` (stopped under our ptrace, registers `regs`) by an exit of its own
/// through the `syscall` instruction at `ip`, and reaps it.
fn exit_thread(tid: i32, mut regs: sys::Regs, ip: u64) -> Result<()> {
    regs.rip = ip;
    regs.rax = libc::SYS_exit as u64;
    regs.orig_rax = u64::MAX;
    regs.rdi = 0;
    sys::set_regs(tid, &regs)?;
    sys::cont(tid, 0).map_err(|e| sys_err("ptrace", e))?;
    while let Ok(sys::Stop::Stopped { .. }) = sys::wait(tid) {
        let _ = sys::cont(tid, 0);
    }
    Ok(())
}

impl Held {
    fn end_other_threads(&mut self) -> Result<()> {
        let Some(ip) = self.frozen.syscall_ip else {
            return Ok(());
        };
        let others: Vec<crate::threads::Task> = self.frozen.tasks.drain(1..).collect();
        for t in others {
            exit_thread(t.tid, t.regs, ip)?;
        }
        Ok(())
    }
}

/// What a process away from home is restored with.
#[derive(Clone, Debug)]
pub struct Away {
    /// Its seccomp program (struct sock_filter array).
    pub filter: Vec<u8>,
    /// The host name it sees (its home's), in a UTS namespace of its own.
    pub hostname: Option<String>,
    /// Its descriptors that are files of its own /proc (reopened here, not placeholders):
    /// (number, path after /proc/self/).
    pub proc_fds: Vec<(i32, String)>,
}

/// Restores a process away from home: as [`crate::restore_with`], plus its descriptors as
/// placeholders, its home's host name and the filter. The filter's listener is returned
/// (the process is stopped under our ptrace with `opts.hold`, so nothing is trapped yet).
pub fn restore_away(
    img: &LoadedImage,
    opts: RestoreOptions,
    creds: &CredOptions,
    away: &Away,
) -> Result<(Restored, OwnedFd)> {
    let (r, l) = crate::restore::restore_mode(img, opts, creds, Mode::Away(away))?;
    let l = l.ok_or_else(|| Error::Unrestorable("no listener for the filter".into()))?;
    Ok((r, l))
}

/// A process rebuilt inside its deputy at home, held until [`Rebuilt::resume`].
#[derive(Debug)]
pub struct Rebuilt {
    pub pid: i32,
    /// Its descriptors held at home (kept open across a revert).
    keep: Vec<i32>,
    /// Signals that reached its deputy and were not passed on: raised when it resumes.
    signals: Vec<i32>,
}

impl Rebuilt {
    /// Lets it run.
    pub fn resume(self) -> Result<()> {
        crate::restore::resume(self.pid)?;
        for s in self.signals {
            let _ = sys::kill(self.pid, s);
        }
        Ok(())
    }
    /// Makes it the deputy again (the move home was abandoned after it was rebuilt):
    /// `path argv envp` is the deputy's exec, as when it left.
    pub fn revert(self, path: &str, argv: &[String], envp: &[String]) -> Result<()> {
        revert(self.pid, path, argv, envp, &self.keep)
    }
}

fn remote_of(pid: i32) -> Result<Remote> {
    let maps = crate::procfs::maps(pid)?;
    let regs = sys::get_regs(pid)?;
    for m in maps
        .iter()
        .filter(|m| m.name == "[vdso]" || (m.exec && m.read))
    {
        let mut code = vec![0u8; m.len().min(1 << 20) as usize];
        if sys::read_mem(pid, m.start, &mut code).unwrap_or(false) {
            if let Some(ip) = find_syscall_insn(&code, m.start) {
                return Ok(Remote::new(pid, ip, regs));
            }
        }
    }
    Err(Error::Target {
        pid,
        msg: "no syscall instruction found".into(),
    })
}

fn revert(pid: i32, path: &str, argv: &[String], envp: &[String], keep: &[i32]) -> Result<()> {
    let mut r = remote_of(pid)?;
    // Threads made by the rebuild, stopped under our ptrace, end first.
    for tid in crate::procfs::tasks(pid)?.into_iter().filter(|&t| t != pid) {
        exit_thread(tid, sys::get_regs(tid)?, r.ip)?;
    }
    inject_exec(&mut r, path, argv, envp, keep)?;
    sys::detach(pid, 0).map_err(|e| sys_err("detaching", e))
}

/// Rebuilds the image inside process `pid` (its deputy at home: the same PID, its
/// descriptors already there), which must be idle. It is seized, made to exec the image's
/// executable (so its exe link is right), then built as a restore builds a new process,
/// under its own credentials. With `opts.hold` it stays stopped until
/// [`Into::resume`]. If anything fails after the exec, it is made the deputy again with
/// `fallback` (path, argv, envp) and the error returned.
pub fn restore_into(
    pid: i32,
    img: &LoadedImage,
    opts: RestoreOptions,
    creds: &CredOptions,
    fallback: (&str, &[String], &[String]),
) -> Result<Rebuilt> {
    crate::restore::preflight(img)?;
    let m = &img.meta;
    sys::seize(pid, libc::PTRACE_O_TRACESYSGOOD as u64).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => Error::NoProcess(pid),
        _ => sys_err(format!("attaching to process {pid}"), e),
    })?;
    sys::interrupt(pid).map_err(|e| sys_err("stopping the deputy", e))?;
    loop {
        match sys::wait(pid)? {
            sys::Stop::Stopped { event: 128, .. } => break,
            sys::Stop::Stopped { .. } => sys::cont(pid, 0).map_err(|e| sys_err("ptrace", e))?,
            _ => return Err(Error::NoProcess(pid)),
        }
    }
    let mut r = remote_of(pid)?;
    let keep: Vec<i32> = m
        .fds
        .iter()
        .filter(|f| matches!(f.kind, crate::image::FdKind::Home { .. }))
        .map(|f| f.fd)
        .collect();
    let argv = vec![m.exe.clone()];
    let signals = match inject_exec(&mut r, &m.exe, &argv, &[], &keep) {
        Ok(s) => s,
        Err(e) => {
            let _ = sys::set_regs(pid, &r.base_regs());
            let _ = sys::detach(pid, 0);
            return Err(e);
        }
    };
    // The exec is done: from here a failure makes it the deputy again.
    let built = (|| -> Result<()> {
        if let Some(want) = &m.exe_id {
            let have = crate::procfs::file_id_of(&format!("/proc/{pid}/exe"))
                .map_err(|e| sys_err("examining the executable", e))?;
            if !want.matches(&have) {
                return Err(Error::Unrestorable(format!(
                    "{} is not the program the process ran (it changed since)",
                    m.exe
                )));
            }
        }
        let mut plan = creds::plan(&m.creds, m.caps, creds, &creds::Restorer::current())?;
        if m.creds.uid.iter().any(|&u| u != 0) {
            // An unprivileged process cannot change its groups or capabilities: it keeps
            // its own, which are the image's.
            plan.set_groups = false;
            plan.caps = None;
        }
        let mut site = crate::stage::Site::begin_in(pid, m, opts, plan, Mode::Into)?;
        crate::restore::build_loaded(&mut site, img)?;
        site.complete(m, false)?;
        Ok(())
    })();
    match built {
        Ok(()) => Ok(Rebuilt { pid, keep, signals }),
        Err(e) => {
            let (p, a, env) = fallback;
            if let Err(e2) = revert(pid, p, a, env, &keep) {
                tracing::error!("process {pid} could not be made its deputy again: {e2}");
                let _ = sys::kill(pid, libc::SIGKILL);
            }
            Err(e)
        }
    }
}
