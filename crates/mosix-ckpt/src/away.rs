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
#[derive(Clone, Debug, Default)]
pub struct Leaving {
    /// It runs away from home now (under our filter; its descriptors are placeholders).
    pub away: bool,
    /// The no_new_privs it really has (away, it runs with it set for the filter's sake).
    pub no_new_privs: Option<bool>,
    /// Directories every node shares ([`crate::check::Rules::shared`]).
    pub shared: Vec<String>,
}

/// Checks whether `pid` can move: Ok(()) or every reason it cannot. Its descriptors and
/// children stay at home, so they do not refuse.
pub fn check_moving(pid: i32, l: &Leaving) -> Result<()> {
    let reasons = crate::check::refusals_with(
        pid,
        Rules {
            leave_home: true,
            away: l.away,
            shared: l.shared.clone(),
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
    if let Err(e) = sync_shared_maps(pid, &l.shared) {
        // Nothing is saved: it goes on where it was.
        drop(frozen);
        return Err(e);
    }
    let t_frozen = t0.elapsed();
    for (tid, ret) in on_frozen()? {
        if let Some(t) = frozen.tasks.iter_mut().find(|t| t.tid == tid) {
            t.regs.rax = ret as u64;
            sys::set_regs(tid, &t.regs)?;
        }
    }
    tracing::debug!(
        pid,
        "frozen in {t_frozen:?}, its calls settled after {:?}",
        t0.elapsed()
    );
    let opts = dump::DumpOptions {
        leave_running: true,
        compression,
    };
    let moving = Moving {
        rules: Rules {
            leave_home: true,
            away: l.away,
            shared: l.shared.clone(),
        },
        no_new_privs: l.no_new_privs,
    };
    let (w, mut stats) = dump::dump_frozen_for(&mut frozen, out, opts, moving, progress)?;
    stats.frozen = t0.elapsed();
    tracing::debug!(pid, "saved {:?} after it was frozen", stats.frozen);
    Ok((w, stats, Held::of(frozen)))
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
            shared: l.shared.clone(),
        },
        no_new_privs: l.no_new_privs,
    };
    // Frozen: what it wrote into shared mappings of files goes to the files first.
    let mut on_frozen = || {
        sync_shared_maps(pid, &l.shared)?;
        on_frozen()
    };
    let (w, stats, frozen) = crate::precopy::precopy(
        pid,
        out,
        opts,
        moving,
        tracker,
        &mut on_frozen,
        on_round,
        progress,
    )?;
    Ok((w, stats, Held::of(frozen)))
}

/// Writes what the frozen process wrote into shared mappings of files (of shared paths:
/// the only ones that move) to the files, so that the node it goes to, which maps the
/// same files again, sees it.
/// Only files under `shared` (the others keep the process home anyway).
fn sync_shared_maps(pid: i32, shared: &[String]) -> Result<()> {
    let under = |path: &str| {
        shared.iter().any(|d| {
            let d = d.trim_end_matches('/');
            path.strip_prefix(d).is_some_and(|r| r.starts_with('/'))
        })
    };
    for m in crate::procfs::maps(pid)? {
        if m.shared && m.write && m.is_file() && !crate::shmem::is_shmem(&m.name) && under(&m.name)
        {
            let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            std::fs::File::open(&mf)
                .and_then(|f| f.sync_data())
                .map_err(|e| crate::error::sys_err(format!("writing {} back", m.name), e))?;
        }
    }
    Ok(())
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
    /// Memory it shares with other processes here (crate::homemem) stays: the new
    /// program gets a descriptor of each such object, listed in its environment as
    /// [`crate::homemem::HOLD_ENV`]. Returns the signals that reached it since it was
    /// saved (to pass on). On failure it is still held as it was.
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
        let held = match hand_over(&mut r, self.frozen.pid, &self.frozen.home_memory) {
            Ok(h) => h,
            Err(e) => {
                self.frozen.tasks[0].held.append(&mut r.held);
                let _ = sys::set_regs(self.frozen.pid, &self.frozen.tasks[0].regs);
                return Err(Box::new((e, self)));
            }
        };
        let mut envp = envp.to_vec();
        let mut keep = clear_cloexec.to_vec();
        if !held.is_empty() {
            let list: Vec<String> = held.iter().map(|n| n.to_string()).collect();
            envp.push(format!("{}={}", crate::homemem::HOLD_ENV, list.join(",")));
            keep.extend(&held);
        }
        match inject_exec(&mut r, path, argv, &envp, &keep) {
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
                for &fd in &held {
                    let _ = r.raw(libc::SYS_close, &[fd as u64]);
                }
                self.frozen.tasks[0].held.append(&mut r.held);
                // Registers back as they were (the injected calls changed them).
                let _ = sys::set_regs(self.frozen.pid, &self.frozen.tasks[0].regs);
                Err(Box::new((e, self)))
            }
        }
    }
}

/// Gives stopped tracee `r` (process `pid`, at home) a descriptor of each object of its
/// home memory `areas`, at numbers just below its RLIMIT_NOFILE (out of the way of its
/// own): it asks for them over a Unix socket (an abstract address of ours, checked to be
/// it that connected) and receives them with SCM_RIGHTS. The numbers, not close-on-exec.
fn hand_over(r: &mut Remote, pid: i32, areas: &[crate::homemem::Area]) -> Result<Vec<i32>> {
    use std::os::fd::AsRawFd;
    if areas.is_empty() {
        return Ok(Vec::new());
    }
    let objs = crate::homemem::open_objects(pid, areas)?;
    let fds: Vec<i32> = objs.iter().map(|(_, _, f)| f.as_raw_fd()).collect();
    let got = give_fds(r, pid, &fds, "its shared memory")?;
    out_of_the_way(r, pid, got, false)
}

/// Gives stopped tracee `r` (process `pid`) descriptors `fds` of ours: it asks for them
/// over a Unix socket (an abstract address of ours, checked to be it that connected) and
/// receives them with SCM_RIGHTS. Their numbers there, not close-on-exec. `what` names
/// them in errors.
pub(crate) fn give_fds(r: &mut Remote, pid: i32, fds: &[i32], what: &str) -> Result<Vec<i32>> {
    use std::os::fd::AsRawFd;
    use std::os::linux::net::SocketAddrExt;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = format!(
        "mosix-home-mem-{}-{pid}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let io = |step: &str, e: std::io::Error| sys_err(format!("handing {what} over: {step}"), e);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| io("address", e))?;
    let listener =
        std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| io("listening", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io("listening", e))?;
    let page = r.call(
        "mmap for the hand-over",
        libc::SYS_mmap,
        &[
            0,
            sys::PAGE,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    let mut sa = (libc::AF_UNIX as u16).to_le_bytes().to_vec();
    sa.push(0);
    sa.extend_from_slice(name.as_bytes());
    sys::write_mem(pid, page, &sa)?;
    let sock = r.call(
        "socket",
        libc::SYS_socket,
        &[
            libc::AF_UNIX as u64,
            (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64,
            0,
        ],
    )?;
    let got = (|| -> Result<Vec<i32>> {
        r.call("connect", libc::SYS_connect, &[sock, page, sa.len() as u64])?;
        let (conn, _) = listener.accept().map_err(|e| io("accepting", e))?;
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: SO_PEERCRED writes a struct ucred of the size we pass.
        let rc = unsafe {
            libc::getsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 || cred.pid != pid {
            return Err(Error::Target {
                pid,
                msg: format!("another process answered the hand-over of {what}"),
            });
        }
        send_fds(conn.as_raw_fd(), fds).map_err(|e| io("sending", e))?;
        // Its recvmsg: iovec at +256, msghdr at +320, byte at +512, control at +1024.
        let space = 16 + (4 * fds.len()).div_ceil(8) * 8;
        let (iov, hdr, byte, ctl) = (page + 256, page + 320, page + 512, page + 1024);
        let mut b = Vec::new();
        b.extend_from_slice(&byte.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        sys::write_mem(pid, iov, &b)?;
        let mut h = Vec::new();
        for v in [0u64, 0, iov, 1, ctl, space as u64, 0] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        sys::write_mem(pid, hdr, &h)?;
        r.call("recvmsg", libc::SYS_recvmsg, &[sock, hdr, 0])?;
        let mut c = vec![0u8; space];
        sys::read_mem(pid, ctl, &mut c)?;
        let clen = u64::from_le_bytes(c[0..8].try_into().expect("8")) as usize;
        let level = i32::from_le_bytes(c[8..12].try_into().expect("4"));
        let kind = i32::from_le_bytes(c[12..16].try_into().expect("4"));
        if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS || clen != 16 + 4 * fds.len() {
            return Err(Error::Target {
                pid,
                msg: format!("it did not receive {what}"),
            });
        }
        Ok(c[16..clen]
            .chunks(4)
            .map(|x| i32::from_le_bytes(x.try_into().expect("4")))
            .collect())
    })();
    let _ = r.raw(libc::SYS_close, &[sock]);
    let _ = r.raw(libc::SYS_munmap, &[page, sys::PAGE]);
    got
}

/// Moves descriptors `got` of stopped tracee `r` (process `pid`) to numbers just below
/// its RLIMIT_NOFILE, out of the way of its own; their new numbers.
pub(crate) fn out_of_the_way(
    r: &mut Remote,
    pid: i32,
    got: Vec<i32>,
    cloexec: bool,
) -> Result<Vec<i32>> {
    let flags = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
    // Out of the way: below the 64 numbers under the limit that the deputy keeps for
    // its own, down from there.
    let soft = crate::procfs::limits(pid)?
        .get(libc::RLIMIT_NOFILE as usize)
        .map(|l| l.1)
        .unwrap_or(1024)
        .min(1 << 20) as i64;
    let mut used: std::collections::HashSet<i64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut at = soft - 65;
    let mut out = Vec::new();
    for fd in got {
        while at > 2 && used.contains(&at) {
            at -= 1;
        }
        let n = if at > fd as i64 {
            r.call("dup3", libc::SYS_dup3, &[fd as u64, at as u64, flags])?;
            r.raw(libc::SYS_close, &[fd as u64])?;
            used.insert(at);
            at
        } else {
            fd as i64
        };
        out.push(n as i32);
    }
    Ok(out)
}

/// Sends descriptors `fds` over connected Unix socket `sock` (one byte of data).
fn send_fds(sock: i32, fds: &[i32]) -> std::io::Result<()> {
    let space = 16 + (4 * fds.len()).div_ceil(8) * 8;
    let mut ctl = vec![0u8; space];
    ctl[0..8].copy_from_slice(&((16 + 4 * fds.len()) as u64).to_le_bytes());
    ctl[8..12].copy_from_slice(&libc::SOL_SOCKET.to_le_bytes());
    ctl[12..16].copy_from_slice(&libc::SCM_RIGHTS.to_le_bytes());
    for (i, fd) in fds.iter().enumerate() {
        ctl[16 + 4 * i..20 + 4 * i].copy_from_slice(&fd.to_le_bytes());
    }
    let mut byte = [b'm'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: a zeroed msghdr is valid; its pointers are set to our live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: sendmsg reads the msghdr and the buffers it points to, all alive here.
    if unsafe { libc::sendmsg(sock, &msg, 0) } != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
/// (the process is stopped under our ptrace with `opts.hold`, so nothing is trapped yet),
/// and, if it shares memory with processes at its home, the userfaultfd that sees it
/// touch that memory ([`crate::homemem::touched`]: it must then go home; its threads
/// wait meanwhile).
pub fn restore_away(
    img: &LoadedImage,
    opts: RestoreOptions,
    creds: &CredOptions,
    away: &Away,
) -> Result<(Restored, OwnedFd, Option<OwnedFd>)> {
    let (r, b) = crate::restore::restore_mode(img, opts, creds, Mode::Away(away))?;
    let l = b
        .listener
        .ok_or_else(|| Error::Unrestorable("no listener for the filter".into()))?;
    Ok((r, l, b.home_memory))
}

/// A process rebuilt inside its deputy at home, held until [`Rebuilt::resume`].
#[derive(Debug)]
pub struct Rebuilt {
    pub pid: i32,
    /// Its descriptors held at home (kept open across a revert).
    keep: Vec<i32>,
    /// Signals that reached its deputy and were not passed on: raised when it resumes.
    signals: Vec<i32>,
    /// The deputy's descriptors of its home memory, closed when it resumes (kept for a
    /// revert).
    close: Vec<i32>,
    /// Its memory being put in (`RestoreOptions::lazy`).
    filling: Option<crate::lazy::Filling>,
}

impl Rebuilt {
    /// Lets it run. Its memory may still be being put in: then the fill is returned,
    /// to be waited for ([`crate::lazy::Filling::finish`]).
    pub fn resume(mut self) -> Result<Option<crate::lazy::Filling>> {
        if !self.close.is_empty() {
            let regs = sys::get_regs(self.pid)?;
            let mut r = remote_of(self.pid)?;
            for &fd in &self.close {
                r.raw(libc::SYS_close, &[fd as u64])?;
            }
            sys::set_regs(self.pid, &regs)?;
            self.signals.extend(
                r.held
                    .drain(..)
                    .map(|i| i32::from_le_bytes(i[..4].try_into().expect("4"))),
            );
        }
        crate::restore::resume(self.pid)?;
        for &s in &self.signals {
            let _ = sys::kill(self.pid, s);
        }
        Ok(self.filling.take())
    }
    /// Makes it the deputy again (the move home was abandoned after it was rebuilt):
    /// `path argv envp` is the deputy's exec, as when it left.
    pub fn revert(mut self, path: &str, argv: &[String], envp: &[String]) -> Result<()> {
        if let Some(f) = self.filling.take() {
            f.abandon();
        }
        revert(self.pid, path, argv, envp, &self.keep)
    }
}

pub(crate) fn remote_of(pid: i32) -> Result<Remote> {
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
    img: &std::sync::Arc<LoadedImage>,
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
    let mut keep: Vec<i32> = m
        .fds
        .iter()
        .filter(|f| matches!(f.kind, crate::image::FdKind::Home { .. }))
        .map(|f| f.fd)
        .collect();
    // Its memory shared at home: the objects its deputy holds.
    let wanted: std::collections::HashSet<(u64, u64)> = m
        .vmas
        .iter()
        .filter_map(|v| match v.kind {
            crate::image::VmaKind::HomeShared { dev, ino, .. } => Some((dev, ino)),
            _ => None,
        })
        .collect();
    let held = crate::homemem::held_by(pid, &wanted, &keep);
    if held.len() != wanted.len() {
        let _ = sys::detach(pid, 0);
        return Err(Error::Unrestorable(
            "its deputy does not hold the memory it shares with other processes here".into(),
        ));
    }
    let close: Vec<i32> = held
        .values()
        .filter(|n| !keep.contains(n))
        .copied()
        .collect();
    keep.extend(&close);
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
    let built = (|| -> Result<Option<crate::lazy::Filling>> {
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
        let mut site = crate::stage::Site::begin_in(pid, m, opts, plan, Mode::Into(&held))?;
        if opts.lazy {
            crate::restore::build_loaded_lazy(&mut site, img)?;
        } else {
            crate::restore::build_loaded(&mut site, img)?;
        }
        let (_, built, _) = site.complete(m, false)?;
        Ok(built.filling)
    })();
    match built {
        Ok(filling) => Ok(Rebuilt {
            pid,
            keep,
            signals,
            close,
            filling,
        }),
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
