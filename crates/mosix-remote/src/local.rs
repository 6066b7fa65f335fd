//! A process "away" on this very machine: the program runs under the filter with nothing
//! but placeholder descriptors, and its deputy (`mosix-deputy`, given the stdio and cwd the
//! program should have) makes every trapped call, exactly as at a real home, over a
//! socket pair instead of the cluster. For tests of the forwarding itself and for
//! measuring what a forwarded call costs, without migration or root.

use crate::guest::{Guest, Out};
use crate::host::Live;
use crate::notify::NotifyFd;
use crate::wire::{self, ExitStatus, FromDeputy};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Where the deputy's end of the connection is, in the deputy.
const DEPUTY_CONN_FD: RawFd = 200;

/// What came of a run.
#[derive(Debug)]
pub struct Run {
    /// How the program ended.
    pub status: ExitStatus,
    /// How its deputy ended (the same, if all went well).
    pub deputy: std::process::ExitStatus,
    /// Calls carried to the deputy.
    pub forwarded: u64,
    /// Bytes read from what the deputy sent ahead, and written behind.
    pub read_ahead: u64,
    /// Files of shared paths opened where it ran (DFSA).
    pub opened_here: u64,
    pub written_behind: u64,
    /// Calls that would have needed a move home (answered ENOSYS here).
    pub home: Vec<String>,
}

fn install_filter_and_stop(prog: &[u8]) -> std::io::Result<()> {
    #[repr(C)]
    struct Fprog {
        len: u16,
        filter: *const u8,
    }
    let fp = Fprog {
        len: (prog.len() / 8) as u16,
        filter: prog.as_ptr(),
    };
    // SAFETY: in the forked child before exec: plain system calls on memory prepared
    // before the fork.
    unsafe {
        let ph = libc::memfd_create(c"mosix-home-fd".as_ptr(), libc::MFD_CLOEXEC);
        for fd in 0..3 {
            libc::dup2(ph, fd);
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SECCOMP_SET_MODE_FILTER = 1, SECCOMP_FILTER_FLAG_NEW_LISTENER = 8: the listener
        // is descriptor 3, the lowest free.
        if libc::syscall(libc::SYS_seccomp, 1, 8, &fp as *const Fprog) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Let the parent take the listener (kill of ourselves is let through).
        libc::kill(libc::getpid(), libc::SIGSTOP);
    }
    Ok(())
}

/// How [`supervise`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Supervised {
    /// The process ended so (and its deputy was told).
    Exited(ExitStatus),
    /// Asked to stop (the `stop` descriptor became readable): the process goes on.
    Stopped,
}

/// Drives one process away from home until it ends: its trapped calls (through `live`),
/// its deputy's messages (over `conn`), its end (`pidfd` readable, then `reap`), or until
/// `stop` is readable. With `booting`, calls are let through until its first execve (the
/// child is still our code). `on_home(live, id, why)` gets the calls that need home.
#[allow(clippy::too_many_arguments)]
pub fn supervise(
    live: &mut Live,
    g: &mut Guest,
    pidfd: &OwnedFd,
    conn: &UnixStream,
    stop: Option<RawFd>,
    mut booting: bool,
    on_home: &mut dyn FnMut(&mut Live, u64, String),
    reap: &mut dyn FnMut() -> std::io::Result<ExitStatus>,
) -> std::io::Result<Supervised> {
    let pid = live.pid;
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    let mut writer = conn.try_clone()?;
    // Its end, reported once what it did is settled at home.
    let mut reaped: Option<ExitStatus> = None;
    let status = loop {
        let alive = reaped.is_none();
        let mut fds = [
            libc::pollfd {
                fd: if alive { live.notify.raw() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: reader.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if alive { pidfd.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = if g.outstanding() > 0 { 100 } else { -1 };
        let buffered = !reader.buffer().is_empty();
        let mut outs = Vec::new();
        if !buffered {
            // SAFETY: poll on descriptors we own (a negative one is skipped).
            if unsafe { libc::poll(fds.as_mut_ptr(), 4, timeout) } == 0 {
                outs.extend(g.idle());
            }
        }
        if fds[3].revents & libc::POLLIN != 0 {
            return Ok(Supervised::Stopped);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            if let Ok(n) = live.notify.recv() {
                if booting {
                    // Until its program starts, the child is our own code: let it be.
                    booting = n.nr != libc::SYS_execve;
                    let _ = live.notify.proceed(n.id);
                } else {
                    outs.extend(g.on_notif(n, live));
                }
            }
        }
        if buffered || fds[1].revents & libc::POLLIN != 0 {
            match wire::recv::<_, FromDeputy>(&mut reader) {
                Ok(Some(FromDeputy::Signal { sig })) => {
                    // SAFETY: a signal to the process we supervise.
                    unsafe { libc::kill(pid, sig) };
                }
                Ok(Some(m)) => outs.extend(g.on_deputy(m, live)),
                Ok(None) | Err(_) => {
                    if let Some(st) = reaped {
                        break st;
                    }
                    // The deputy is gone: so is the process.
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        outs.extend(g.tick(live));
        for out in outs {
            match out {
                Out::Deputy(m) => wire::send(&mut writer, &m)?,
                Out::GoHome { id, why } => on_home(live, id, why),
            }
        }
        if fds[2].revents & libc::POLLIN != 0 {
            let st = reap()?;
            reaped = Some(st);
            for out in g.end(st) {
                if let Out::Deputy(m) = out {
                    wire::send(&mut writer, &m)?;
                }
            }
        }
        if let Some(st) = reaped {
            if g.exit_sent() {
                break st;
            }
        }
    };
    Ok(Supervised::Exited(status))
}

/// Runs `prog args` away, with its deputy holding `stdin`, `stdout`, `stderr` and `cwd`.
pub fn run(
    deputy_bin: &Path,
    prog: &str,
    args: &[&str],
    cwd: &Path,
    stdio: [Stdio; 3],
) -> std::io::Result<Run> {
    run_shared(deputy_bin, prog, args, cwd, stdio, &[])
}

/// [`run`], with `shared` directories shared by home and host (DFSA: files under them
/// are opened and used by the process itself).
pub fn run_shared(
    deputy_bin: &Path,
    prog: &str,
    args: &[&str],
    cwd: &Path,
    stdio: [Stdio; 3],
    shared: &[std::path::PathBuf],
) -> std::io::Result<Run> {
    let (sup, dep) = UnixStream::pair()?;
    let [i, o, e] = stdio;
    let dep_fd = dep.as_raw_fd();
    let mut dc = Command::new(deputy_bin);
    dc.stdin(i)
        .stdout(o)
        .stderr(e)
        .current_dir(cwd)
        .env("MOSIX_DEPUTY", format!("conn={DEPUTY_CONN_FD}"));
    // SAFETY: dup2 and close_range in the forked child, no allocation.
    unsafe {
        dc.pre_exec(move || {
            if libc::dup2(dep_fd, DEPUTY_CONN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                (DEPUTY_CONN_FD - 1) as u32,
                0u32,
            );
            Ok(())
        });
    }
    let mut deputy = dc.spawn()?;
    drop(dep);

    let mut gc = Command::new(prog);
    gc.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut guest = gc.spawn_guest()?;
    let pid = guest.id() as i32;
    // Wait for it to stop with its filter on, take the listener, let it go.
    let mut st = 0;
    // SAFETY: waitpid on our own child.
    unsafe { libc::waitpid(pid, &mut st, libc::WUNTRACED) };
    let pidfd = crate::host::pidfd_open(pid)?;
    let listener = crate::host::pidfd_getfd(&pidfd, 3)?;
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut live = Live::new(NotifyFd(listener), pid)?;
    let home: Vec<String> = shared
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut g = Guest::new(pid, 1).with_dfsa(crate::dfsa::Dfsa::new(
        &home,
        shared,
        Some(cwd.to_path_buf()),
    ));
    let mut home = Vec::new();
    let status = supervise(
        &mut live,
        &mut g,
        &pidfd,
        &sup,
        None,
        true,
        &mut |live, id, why| {
            home.push(why);
            let _ = live.notify.answer(id, -(libc::ENOSYS as i64));
        },
        &mut || {
            let st = guest.wait()?;
            use std::os::unix::process::ExitStatusExt;
            Ok(match (st.code(), st.signal()) {
                (Some(c), _) => ExitStatus::Code(c),
                (_, Some(s)) => ExitStatus::Signal(s),
                _ => ExitStatus::Signal(libc::SIGKILL),
            })
        },
    )?;
    let Supervised::Exited(status) = status else {
        unreachable!("nothing asks it to stop");
    };
    let dst = deputy.wait()?;
    Ok(Run {
        status,
        deputy: dst,
        forwarded: g.forwarded,
        read_ahead: g.streams.served,
        opened_here: g.dfsa.opened,
        written_behind: g.streams.behind,
        home,
    })
}

trait SpawnGuest {
    fn spawn_guest(&mut self) -> std::io::Result<std::process::Child>;
}

impl SpawnGuest for Command {
    fn spawn_guest(&mut self) -> std::io::Result<std::process::Child> {
        let prog = crate::filter::to_bytes(&crate::filter::program(0));
        // The filter names the process's own PID, known only in the child: the program is
        // built for PID 0 and patched there (its `own_pid` constants are the only zeros
        // compared against a PID).
        let pid_slots: Vec<usize> = own_pid_slots(&prog);
        let mut prog = prog;
        // SAFETY: the closure runs in the forked child before exec; it patches its own copy
        // of the program and makes plain system calls.
        unsafe {
            self.pre_exec(move || {
                let me = libc::getpid() as u32;
                for &at in &pid_slots {
                    prog[at..at + 4].copy_from_slice(&me.to_le_bytes());
                }
                install_filter_and_stop(&prog)
            });
        }
        self.spawn()
    }
}

/// Byte offsets of the `k` fields that hold the process's own PID in a program built by
/// [`crate::filter::program`] for PID 0.
fn own_pid_slots(prog: &[u8]) -> Vec<usize> {
    let a = crate::filter::program(0);
    let b = crate::filter::program(1);
    a.iter()
        .zip(&b)
        .enumerate()
        .filter(|(_, (x, y))| x.k != y.k)
        .map(|(i, _)| i * 8 + 4)
        .filter(|&o| o + 4 <= prog.len())
        .collect()
}

/// A descriptor from a raw number we were given and own.
pub fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller hands over a descriptor it owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
