//! `mosixd supervise`: the process that restores an arriving process and, for a guest,
//! stays its parent: it holds its seccomp listener, carries its trapped calls to its home
//! (through mosixd, over its connection), passes on signals, reports its stops and its
//! end. It lives in a session of its own and outlives mosixd: a restarted mosixd finds it
//! again by its socket in `state_dir/guests/`.
//!
//! For a process coming home it only rebuilds it inside its deputy, and exits.

use super::outbox::{OutFrame, Outbox};
use mosix_proto::wire::{self, MigrateHeader, Tail};
use mosix_remote::dfsa::Dfsa;
use mosix_remote::guest::{Guest, Out};
use mosix_remote::host::Live;
use mosix_remote::notify::NotifyFd;
use mosix_remote::wire::{ExitStatus, FromDeputy, ToDeputy};
use serde::{Deserialize, Serialize};
use std::io::BufReader;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use tracing::{info, warn};

/// The descriptor a helper (supervisor, mover) gets its connection on.
pub(crate) const CONN_FD: RawFd = 3;
/// Where a supervisor keeps a userfaultfd of its guest's memory (made when it restored
/// it), for the mover of a later move to track the pages it writes (pre-copy).
pub(crate) const UFFD_FD: RawFd = 200;

pub use super::supmsg::{FromSup, SupMode, SupStart, ToSup};

pub fn send<T: Serialize>(s: &mut UnixStream, m: &T) -> std::io::Result<()> {
    wire::send_flush(s, m)
}

pub fn recv<T: for<'de> Deserialize<'de>>(s: &mut UnixStream) -> std::io::Result<T> {
    wire::expect(s)
}

/// Reads an image with `read`, from the link itself if it is lent (`link_in`), else from
/// mosixd; then reads past what is left of it (so that an answer is heard), and gives
/// the link back to mosixd where the image ended. Also whether the image was read to its
/// end (if not, mosixd or the link is gone).
fn read_image<T>(
    conn: &mut UnixStream,
    link_in: Option<mosix_proto::transport::FrameReader<std::net::TcpStream>>,
    read: impl FnOnce(&mut wire::ChunkReader<&mut dyn std::io::Read>) -> T,
) -> anyhow::Result<(T, bool)> {
    let mut link_in = link_in;
    let (got, whole) = {
        let from: &mut dyn std::io::Read = match &mut link_in {
            Some(r) => r,
            None => &mut *conn,
        };
        let mut chunks = wire::ChunkReader::new(from);
        let got = read(&mut chunks);
        let whole = chunks.ended() || chunks.drain().is_ok();
        (got, whole)
    };
    if let Some(r) = link_in {
        if !whole {
            let why = "the link broke in the middle of the image".to_string();
            let _ = send(conn, &FromSup::LinkLost(why.clone()));
            anyhow::bail!("{why}");
        }
        // (Its handle on the socket closes here; mosixd's stays.)
        let (nonce, plain, raw) = r.give_back();
        send(conn, &FromSup::ImageRead { nonce, plain, raw })?;
    }
    Ok((got, whole))
}

/// Starts a supervisor (see [`spawn_helper`]).
pub fn spawn() -> std::io::Result<UnixStream> {
    spawn_helper("supervise")
}

/// Starts a helper process, `mosixd ROLE`: this program again, in a session of its own,
/// not our child (it outlives us); returns our end of its connection.
pub fn spawn_helper(role: &str) -> std::io::Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair()?;
    let fd = theirs.as_raw_fd();
    // This very program, even if its file has been replaced (an upgrade while it runs):
    // a helper speaks its daemon's protocol.
    let mut c = Command::new("/proc/self/exe");
    c.arg0("mosixd")
        .arg(role)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: in the forked child before exec: dup2, setsid and fork only. The
    // intermediate child exits at once, so the supervisor is adopted by init (or the
    // service manager's subreaper), not by mosixd.
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(fd, CONN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            match libc::fork() {
                -1 => Err(std::io::Error::last_os_error()),
                0 => Ok(()),
                _ => libc::_exit(0),
            }
        });
    }
    let mut child = c.spawn()?;
    let _ = child.wait();
    drop(theirs);
    Ok(ours)
}

/// Names this process `mosixd` (its command name would be `exe`, from /proc/self/exe).
pub fn name_self() {
    let name = c"mosixd";
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// The supervisor process's main.
pub fn main() -> i32 {
    // SAFETY: descriptor 3 is the connection mosixd gave us (see spawn).
    let conn = unsafe { UnixStream::from_raw_fd(CONN_FD) };
    match run(conn) {
        Ok(()) => 0,
        Err(e) => {
            warn!("supervisor: {e:#}");
            1
        }
    }
}

fn refuse(conn: &mut UnixStream, why: String) -> anyhow::Result<()> {
    warn!("supervisor: refused: {why}");
    send(conn, &FromSup::Refused(why))?;
    Ok(())
}

fn run(mut conn: UnixStream) -> anyhow::Result<()> {
    let mut start = match recv::<ToSup>(&mut conn)? {
        ToSup::Start(s) => *s,
        other => anyhow::bail!("expected a start, got {other:?}"),
    };
    // The image from the link itself, if it is lent.
    let mut link_in = match start.link.take() {
        Some(lend) => {
            let sock = super::imagepipe::recv_fd(&conn)?;
            Some(mosix_proto::transport::FrameReader::new(
                std::net::TcpStream::from(sock),
                lend,
            ))
        }
        None => None,
    };
    let h = start.header.clone();
    // No credential its owner (as its home says) could not have here: root's processes
    // are root's (every node is root on every other); a user's only that user's.
    let creds = if h.uid == 0 {
        Ok(mosix_ckpt::CredOptions::from_image())
    } else {
        mosix_ckpt::Identity::of_uid(h.uid).map(mosix_ckpt::CredOptions::within)
    };
    match start.mode.clone() {
        SupMode::Into {
            pid,
            deputy,
            reopen,
        } => {
            // Rebuilt inside its deputy, which serves the process until it is frozen
            // there: the image is read whole first (checked and decompressed as it
            // comes: pre-copy rounds arrive while the process still runs at its host).
            let t0 = std::time::Instant::now();
            let limits = mosix_ckpt::image::ReadLimits::bytes(start.limit);
            let (read, _) = read_image(&mut conn, link_in.take(), |chunks| {
                mosix_ckpt::image::read_image_streamed(chunks, &limits)
            })?;
            let t_read = t0.elapsed();
            let tail = recv::<Tail>(&mut conn);
            let t_tail = t0.elapsed();
            let mut img = match read {
                Ok(i) => i,
                Err(e) => return refuse(&mut conn, e.to_string()),
            };
            let tail = tail?;
            // Saved away, its image has the directory it had there: home's is in the tail.
            if let Some(cwd) = tail.cwd {
                img.meta.cwd = cwd;
            }
            // `mosrun -R`: descriptors held at home in the image that are reopened.
            for (fd, path, flags, pos) in reopen {
                if let Some(f) = img.meta.fds.iter_mut().find(|f| f.fd == fd) {
                    f.kind = mosix_ckpt::image::FdKind::File {
                        path,
                        flags,
                        pos,
                        id: None,
                    };
                }
            }
            if img.meta.creds.uid[0] != h.uid {
                return refuse(
                    &mut conn,
                    "the image's owner differs from the sender's".into(),
                );
            }
            if let Err(why) = admit(img.memory_bytes(), start.limit) {
                return refuse(&mut conn, why);
            }
            let creds = match creds {
                Ok(c) => c,
                Err(e) => return refuse(&mut conn, e.to_string()),
            };
            // Its private memory is put in while it runs: it waits for its state only.
            let opts = mosix_ckpt::RestoreOptions {
                hold: true,
                lazy: true,
                ..Default::default()
            };
            let (p, a, e) = &deputy;
            let img = std::sync::Arc::new(img);
            let rebuilt = match mosix_ckpt::restore_into(pid, &img, opts, &creds, (p, a, e)) {
                Ok(r) => r,
                Err(e) => return refuse(&mut conn, e.to_string()),
            };
            drop(img);
            info!(
                pid,
                image_ms = t_read.as_millis() as u64,
                rebuilt_ms = (t0.elapsed() - t_tail).as_millis() as u64,
                "rebuilt at home"
            );
            send(&mut conn, &FromSup::Ready { host_pid: pid })?;
            match recv::<ToSup>(&mut conn) {
                Ok(ToSup::Commit) => {
                    let filling = rebuilt.resume()?;
                    send(&mut conn, &FromSup::Running)?;
                    info!(pid, "back home");
                    if let Some(f) = filling {
                        // This process stays until all of it is in.
                        let done = f.finish();
                        info!(
                            pid,
                            mib = done.bytes >> 20,
                            ms = done.took.as_millis() as u64,
                            faults = done.faults,
                            forks = done.forks,
                            dropped = done.dropped,
                            "its memory is all in"
                        );
                    }
                    let _ = send(&mut conn, &FromSup::Filled);
                }
                _ => {
                    rebuilt.revert(p, a, e)?;
                    info!(pid, "the move home was abandoned: its deputy again");
                }
            }
            Ok(())
        }
        SupMode::Guest => {
            let away = mosix_ckpt::Away {
                // Made again once its final state is known if it shares memory at home.
                filter: mosix_remote::filter::to_bytes(&mosix_remote::filter::program(h.home_pid)),
                hostname: Some(h.hostname.clone()),
                proc_fds: Vec::new(),
            };
            let opts = mosix_ckpt::RestoreOptions {
                keep_pid: true,
                time_ns: true,
                hold: true,
                pdeathsig: Some(libc::SIGKILL),
                stdio: None,
                lazy: false,
            };
            // Restored while its image arrives (its memory in place as it comes).
            let (incoming, whole) = read_image(&mut conn, link_in.take(), |chunks| {
                let incoming = match creds {
                    Ok(creds) => mosix_ckpt::receive(
                        &mut *chunks,
                        opts,
                        &creds,
                        Some(&away),
                        mosix_ckpt::image::ReadLimits::system(),
                        &mut |need| {
                            admit(need, start.limit).map_err(mosix_ckpt::Error::Unrestorable)
                        },
                    ),
                    Err(e) => Err(e),
                };
                match incoming {
                    Ok(i) if !chunks.ended() && chunks.drain().is_ok_and(|n| n > 0) => {
                        drop(i);
                        Err(mosix_ckpt::Error::BadImage(
                            "trailing data after the image".into(),
                        ))
                    }
                    other => other,
                }
            })?;
            let mut incoming = match incoming {
                Ok(i) => i,
                Err(e) => {
                    if !whole {
                        anyhow::bail!("lost mosixd in the middle of an image: {e}");
                    }
                    let _ = recv::<Tail>(&mut conn);
                    return refuse(&mut conn, e.to_string());
                }
            };
            let tail: Tail = recv(&mut conn)?;
            if incoming.meta().creds.uid[0] != h.uid {
                return refuse(
                    &mut conn,
                    "the image's owner differs from the sender's".into(),
                );
            }
            // Memory it shares with processes at home is not here (homemem): its calls
            // on it are trapped, its touches watched.
            let home_ranges: Vec<(u64, u64)> = incoming
                .meta()
                .vmas
                .iter()
                .filter(|v| matches!(v.kind, mosix_ckpt::image::VmaKind::HomeShared { .. }))
                .map(|v| (v.start, v.end))
                .collect();
            if !home_ranges.is_empty() {
                incoming.set_filter(mosix_remote::filter::to_bytes(
                    &mosix_remote::filter::program_for(h.home_pid, &home_ranges),
                ));
            }
            let (restored, listener, home_memory, uffd) =
                match incoming.complete(Some(tail.proc_fds.clone()), true) {
                    Ok((
                        r,
                        mosix_ckpt::Built {
                            listener: Some(l),
                            home_memory,
                            ..
                        },
                        u,
                    )) => (r, l, home_memory, u),
                    Ok(_) => return refuse(&mut conn, "no listener for its filter".into()),
                    Err(e) => return refuse(&mut conn, e.to_string()),
                };
            let pid = restored.pid;
            // Kept for the pre-copy of its next move (see UFFD_FD).
            let _uffd = uffd.and_then(|u| {
                // SAFETY: dup3 of a descriptor we own onto a number we reserve for it
                // (close-on-exec kept: nothing this process may exec needs it).
                let r = unsafe { libc::dup3(u.as_raw_fd(), UFFD_FD, libc::O_CLOEXEC) };
                (r == UFFD_FD).then(|| {
                    // SAFETY: UFFD_FD now holds a descriptor of ours that nothing else owns.
                    unsafe { OwnedFd::from_raw_fd(UFFD_FD) }
                })
            });
            send(&mut conn, &FromSup::Ready { host_pid: pid })?;
            match recv::<ToSup>(&mut conn) {
                Ok(ToSup::Commit) => {
                    // An ordinary process for the OOM killer from now on (its restore
                    // had the supervisor's high score: see mosixd's main).
                    let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "0");
                    mosix_ckpt::resume(pid)?;
                    send(&mut conn, &FromSup::Running)?;
                }
                _ => {
                    let _ = mosix_ckpt::sys::kill(pid, libc::SIGKILL);
                    let _ = mosix_ckpt::sys::wait(pid);
                    reap(restored.ns_init);
                    return Ok(());
                }
            }
            let arena = mosix_remote::arena::Arena::new(mosix_remote::arena::SIZE)
                .inspect_err(|e| warn!(pid, "no arena for writes behind: {e}"))
                .ok();
            let mut live = Live::new(NotifyFd(listener), pid)?.with_off_limits(home_ranges.clone());
            if let Some(a) = &arena {
                live = live.with_arena(a.clone());
            }
            let mut s = Supervision {
                live,
                arena,
                arena_ok: false,
                arena_seq: 0,
                home_memory,
                home_ranges,
                touched_home: false,
                g: Guest::new(h.home_pid, tail.next_seq)
                    .with_local(tail.proc_fds.clone())
                    .with_dfsa(Dfsa::new(
                        &h.shared_paths,
                        &start.shared_paths,
                        tail.cwd.as_ref().map(PathBuf::from),
                    )),
                header: h,
                conn: Some(conn),
                out: Outbox::default(),
                backlog: Vec::new(),
                moving: false,
                moved: false,
                went_home: None,
                ns_init: restored.ns_init,
                killed: false,
                doubtful: false,
            };
            s.announce_arena();
            s.serve(&start.socket)
        }
    }
}

/// Whether a process with `bytes` of memory contents fits here (at most `limit`, and what
/// is free now with a margin).
fn admit(bytes: u64, limit: u64) -> Result<(), String> {
    let need = bytes + bytes / 32 + (16 << 20);
    let room = mosix_ckpt::memory_room().min(limit.saturating_add(16 << 20));
    if room < need {
        return Err(format!(
            "not enough memory: the process needs {} MiB, {} MiB are free",
            need >> 20,
            room >> 20
        ));
    }
    Ok(())
}

fn reap(pid: Option<i32>) {
    if let Some(i) = pid {
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(i),
            Some(nix::sys::wait::WaitPidFlag::__WALL),
        );
    }
}

/// Queued beyond this, the process's new calls wait.
const OUTBOX_FULL: usize = 32 << 20;

struct Supervision {
    /// Where the data of its writes behind are kept (mosix_remote::arena), and whether
    /// the mosixd of the current connection has mapped it; the number of the next
    /// message that leaves data there.
    arena: Option<std::sync::Arc<mosix_remote::arena::Arena>>,
    arena_ok: bool,
    arena_seq: u64,
    live: Live,
    /// The userfaultfd that sees it touch memory it shares at home (then it goes home).
    home_memory: Option<OwnedFd>,
    /// Where that memory is.
    home_ranges: Vec<(u64, u64)>,
    /// It touched it, and was asked home (again after a failed move).
    touched_home: bool,
    g: Guest,
    header: MigrateHeader,
    conn: Option<UnixStream>,
    /// What the connection has not taken yet.
    out: Outbox,
    /// Frames that could not be sent while mosixd was away.
    backlog: Vec<OutFrame>,
    /// Frozen for a move: its end is not reported until the move is settled.
    moving: bool,
    moved: bool,
    /// The call that asked to go home (asked once per call).
    went_home: Option<u64>,
    ns_init: Option<i32>,
    /// Its home ended it.
    killed: bool,
    /// mosixd went away while it was frozen for a move, and it has not run since.
    doubtful: bool,
}

impl Supervision {
    fn is_home_memory(&self, addr: u64) -> bool {
        self.home_ranges
            .iter()
            .any(|&(s, e)| (s..e).contains(&addr))
    }

    fn up(&mut self, m: FromSup) {
        let mut f = Vec::new();
        if wire::send(&mut f, &m).is_ok() {
            self.frame(f.into());
        }
    }

    /// Tells mosixd of its arena (first on each connection); it is used once mosixd
    /// says it mapped it.
    fn announce_arena(&mut self) {
        self.arena_ok = false;
        if let Some(a) = &self.arena {
            let m = FromSup::Arena {
                pid: std::process::id() as i32,
                fd: a.fd(),
                cap: a.cap() as u64,
                token: a.token(),
            };
            self.up(m);
        }
    }

    /// A write's data left in the arena, if it is there and mosixd reads it there: the
    /// message that tells mosixd where.
    fn in_arena(&mut self, m: &ToDeputy) -> Option<FromSup> {
        let ToDeputy::Behind { data, .. } = m else {
            return None;
        };
        let a = self.arena.as_ref().filter(|_| self.arena_ok)?;
        let (at, len) = a.locate(data)?;
        let f = OutFrame::encode(Some(data), |p| mosix_remote::wire::encode_into(p, m)).ok()?;
        let (head, tail) = f.around(data)?;
        let seq = self.arena_seq;
        self.arena_seq += 1;
        a.sent(at, seq);
        Some(FromSup::DeputyInArena {
            seq,
            head,
            at,
            len,
            tail,
        })
    }

    /// Sends a message for the deputy (encoded once, into its frame; a write's data
    /// stays where it is: in the arena, or a piece of the frame).
    fn for_deputy(&mut self, m: &ToDeputy) {
        if let Some(up) = self.in_arena(m) {
            self.up(up);
            return;
        }
        let shared = match m {
            ToDeputy::Behind { data, .. } => Some(data),
            _ => None,
        };
        if let Ok(f) = OutFrame::encode(shared, |p| wire::send_wrapped(p, FromSup::DEPUTY, m)) {
            self.frame(f);
        }
    }

    /// Queues a frame for mosixd (kept for its next connection when there is none).
    fn frame(&mut self, f: OutFrame) {
        if self.conn.is_none() {
            self.backlog.push(f);
            return;
        }
        self.out.push(f);
        self.pump();
    }

    /// Writes what the connection takes now.
    fn pump(&mut self) {
        let Some(c) = &self.conn else { return };
        if self.out.pump(c.as_raw_fd()).is_err() {
            self.lost();
        }
    }

    /// The connection to mosixd is gone: what it did not take whole is sent again on the
    /// next one (a frame cut short went to a reader that is gone too).
    fn lost(&mut self) {
        self.conn = None;
        let mut back = self.out.take_all();
        back.append(&mut self.backlog);
        self.backlog = back;
    }

    fn outs(&mut self, outs: Vec<Out>) {
        for o in outs {
            match o {
                Out::Deputy(m) => self.for_deputy(&m),
                Out::GoHome { id, why } => {
                    if self.went_home != Some(id) {
                        self.went_home = Some(id);
                        info!(pid = self.live.pid, "needs home: {why}");
                        self.up(FromSup::GoHome { why });
                    }
                }
            }
        }
        if self.moving && self.g.outstanding() == 0 {
            if let Some(why) = self.g.unquiesced() {
                self.up(FromSup::Unquiesced { why });
                return;
            }
            let completed = {
                use mosix_remote::guest::Kernel;
                let pid = self.live.pid;
                self.g.completed(self.live.mem(), &|tid| {
                    mosix_remote::host::current_call(pid, tid)
                })
            };
            let next_seq = self.g.next_seq();
            let proc_fds = self.g.local_fds();
            let cwd = self.g.dfsa.cwd().map(|c| c.to_string_lossy().into_owned());
            self.up(FromSup::Quiesced {
                completed,
                next_seq,
                proc_fds,
                cwd,
            });
        }
    }

    fn serve(&mut self, socket: &PathBuf) -> anyhow::Result<()> {
        let pid = self.live.pid;
        let pidfd = mosix_ckpt::sys::pidfd_open(pid)?;
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let chld = sigchld_fd()?;
        // Room for whole frames of its calls' data (not before: an image through a deep
        // buffer would reach its end later, and the process is frozen for that end).
        if let Some(c) = &self.conn {
            mosix_remote::wire::roomy(c);
        }
        let mut reader = self
            .conn
            .as_ref()
            .map(|c| c.try_clone().map(BufReader::new))
            .transpose()?;
        // It ended so, and waits for what it did here to be settled at home (writes
        // behind, positions) before its end is reported.
        let mut reaped: Option<ExitStatus> = None;
        loop {
            let conn_fd = reader
                .as_ref()
                .map(|r| r.get_ref().as_raw_fd())
                .unwrap_or(-1);
            let alive = reaped.is_none();
            // Too much waits for mosixd: the process's new calls wait.
            let taking = alive && self.out.bytes() < OUTBOX_FULL;
            let writing = if self.out.is_empty() {
                0
            } else {
                libc::POLLOUT
            };
            let mut fds = [
                libc::pollfd {
                    fd: if taking { self.live.notify.raw() } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: conn_fd,
                    events: libc::POLLIN | writing,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if alive { pidfd.as_raw_fd() } else { -1 },
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: chld.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self
                        .home_memory
                        .as_ref()
                        .map(|f| f.as_raw_fd())
                        .unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let buffered = reader.as_ref().is_some_and(|r| !r.buffer().is_empty());
            let timeout = if self.g.outstanding() > 0 { 100 } else { 1000 };
            if !buffered {
                // SAFETY: poll on descriptors we own (a negative one is skipped).
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as u64, timeout) };
                if n == 0 {
                    // Quiet: home hears how far the process read its streams.
                    let o = self.g.idle();
                    self.outs(o);
                    // And the arena's pages go back once it stopped writing.
                    if let Some(a) = &self.arena {
                        a.trim(mosix_remote::arena::QUIET);
                    }
                }
            }
            if fds[0].revents & libc::POLLIN != 0 {
                if let Ok(n) = self.live.notify.recv() {
                    // It runs: the move it was frozen for did not take it.
                    self.doubtful = false;
                    let o = if let Some(at) = n.args.iter().find(|a| self.is_home_memory(**a)) {
                        // A call on memory it shares at home is made there.
                        vec![Out::GoHome {
                            id: n.id,
                            why: format!(
                                "its call ({}) uses memory it shares with processes at home ({at:#x})",
                                mosix_remote::spec::name(n.nr)
                            ),
                        }]
                    } else {
                        self.g.on_notif(n, &mut self.live)
                    };
                    self.outs(o);
                }
            }
            if fds[5].revents & libc::POLLIN != 0 {
                let at = self
                    .home_memory
                    .as_ref()
                    .map(mosix_ckpt::homemem::touched)
                    .unwrap_or_default();
                if let (Some(a), false) = (at.first(), self.touched_home) {
                    self.touched_home = true;
                    let why =
                        format!("it touched memory it shares with processes at home ({a:#x})");
                    info!(pid, "needs home: {why}");
                    self.up(FromSup::GoHome { why });
                }
            }
            if fds[1].revents & libc::POLLOUT != 0 {
                self.pump();
            }
            if buffered || fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                let msg = reader.as_mut().map(ToSup::recv);
                match msg {
                    Some(Ok(Some(m))) => self.on_mosixd(m),
                    _ => {
                        // mosixd is gone (restarting): the process goes on; its calls
                        // wait until mosixd connects again.
                        warn!(pid, "lost mosixd; waiting for it");
                        reader = None;
                        self.lost();
                        if self.moving {
                            // Its mover finishes alone: it lets it go on here, or (once
                            // the commit was announced) ends it, as it runs elsewhere.
                            self.moving = false;
                            self.went_home = None;
                            self.doubtful = true;
                            // Results of calls finished for it may not have reached
                            // its mover: a call made again gets its answer from here.
                            self.g.in_doubt();
                        }
                    }
                }
            }
            if fds[3].revents & libc::POLLIN != 0 {
                if let Ok((c, _)) = listener.accept() {
                    mosix_remote::wire::roomy(&c);
                    reader = Some(BufReader::new(c.try_clone()?));
                    self.lost();
                    let backlog = std::mem::take(&mut self.backlog);
                    self.conn = Some(c);
                    self.up(FromSup::Hello {
                        header: self.header.clone(),
                        host_pid: pid,
                    });
                    self.announce_arena();
                    for f in backlog {
                        self.frame(f);
                    }
                    info!(pid, "mosixd is back");
                }
            }
            if fds[4].revents & libc::POLLIN != 0 {
                drain(&chld);
                self.stops();
            }
            let o = self.g.tick(&self.live);
            self.outs(o);
            if fds[2].revents & libc::POLLIN != 0 {
                let st = match nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(pid),
                    Some(nix::sys::wait::WaitPidFlag::__WALL),
                ) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => ExitStatus::Code(c),
                    Ok(nix::sys::wait::WaitStatus::Signaled(_, s, _)) => {
                        ExitStatus::Signal(s as i32)
                    }
                    _ => ExitStatus::Signal(libc::SIGKILL),
                };
                reap(self.ns_init);
                if self.doubtful && st == ExitStatus::Signal(libc::SIGKILL) {
                    // Ended by its mover after the commit, with mosixd away: it runs
                    // where it went, and its end here is not its end.
                    let _ = std::fs::remove_file(socket);
                    info!(pid, "its copy here was ended by its move");
                    return Ok(());
                }
                if self.moved || self.moving {
                    // Its copy here was ended by the move (the mover kills it once it runs
                    // there): nothing to report.
                    if !self.moved && !self.killed {
                        self.await_settled(&mut reader);
                    }
                    if self.moved {
                        let _ = std::fs::remove_file(socket);
                        return Ok(());
                    }
                }
                let o = self.g.end(st);
                self.outs(o);
                reaped = Some(st);
            }
            if let Some(st) = reaped {
                // Reported once home has what it wrote behind (or its home ended it).
                if self.g.exit_sent() || self.killed {
                    if !self.g.exit_sent() {
                        self.for_deputy(&ToDeputy::Exited(st));
                    }
                    self.up(FromSup::Exited);
                    self.drain(&mut reader);
                    let _ = std::fs::remove_file(socket);
                    info!(pid, ?st, "guest ended");
                    return Ok(());
                }
            }
        }
    }

    /// Before it exits: what mosixd has not taken yet is written, while what mosixd
    /// sends meanwhile is read (and dropped: the process is gone), for at most 30 s.
    fn drain(&mut self, reader: &mut Option<BufReader<UnixStream>>) {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !self.out.is_empty() && std::time::Instant::now() < end {
            let Some(fd) = self.conn.as_ref().map(|c| c.as_raw_fd()) else {
                return;
            };
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN | libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: poll on our own socket.
            unsafe { libc::poll(&mut p, 1, 1000) };
            if p.revents & libc::POLLOUT != 0 {
                self.pump();
            }
            let buffered = reader.as_ref().is_some_and(|r| !r.buffer().is_empty());
            if buffered || p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                match reader.as_mut().map(ToSup::recv) {
                    Some(Ok(Some(_))) => {}
                    _ => return,
                }
            }
        }
    }

    /// Its copy here ended during a move: wait to hear whether the move took it.
    fn await_settled(&mut self, reader: &mut Option<BufReader<UnixStream>>) {
        while let Some(r) = reader.as_mut() {
            match ToSup::recv(r) {
                Ok(Some(ToSup::Moved)) => {
                    self.moved = true;
                    return;
                }
                // Its home ended it (it lives elsewhere now, or its deputy is gone).
                Ok(Some(ToSup::Kill)) => {
                    self.killed = true;
                    return;
                }
                Ok(Some(ToSup::Thaw)) | Ok(None) | Err(_) => return,
                Ok(Some(_)) => {}
            }
        }
    }

    fn on_mosixd(&mut self, m: ToSup) {
        match m {
            ToSup::Deputy(f) => match FromDeputy::decode_shared({
                // (Read-ahead data stays in the frame it came in.)
                let (buf, start) = f.into_parts();
                mosix_remote::wire::Bytes::from(buf).slice(start..)
            }) {
                Ok(FromDeputy::Signal { sig }) => {
                    let _ = mosix_ckpt::sys::kill(self.live.pid, sig);
                }
                Ok(d) => {
                    let o = self.g.on_deputy(d, &mut self.live);
                    self.outs(o);
                }
                Err(e) => warn!("a bad frame from the deputy: {e}"),
            },
            ToSup::Quiesce => {
                self.moving = true;
                let o = self.g.quiesce(&mut self.live);
                self.outs(o);
            }
            ToSup::Thaw => {
                // mosixd passed the results of its finished calls to its mover.
                self.g.results_set();
                self.moving = false;
                self.went_home = None;
                // A thread waiting on memory shared at home touches it again.
                self.touched_home = false;
            }
            ToSup::Moved => self.moved = true,
            ToSup::Kill => {
                self.killed = true;
                let _ = mosix_ckpt::sys::kill(self.live.pid, libc::SIGKILL);
            }
            ToSup::Relinked => {
                let o = self.g.resend(&mut self.live);
                self.outs(o);
            }
            ToSup::ArenaTaken => self.arena_ok = true,
            ToSup::Start(_) | ToSup::Commit | ToSup::Abort => {}
        }
    }

    /// Reports a stop of the process (SIGSTOP, SIGTSTP...) to its deputy, which stops too.
    fn stops(&mut self) {
        use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
        let flags = WaitPidFlag::WSTOPPED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let id = || Id::Pid(nix::unistd::Pid::from_raw(self.live.pid));
        if let Ok(WaitStatus::Stopped(_, sig)) = waitid(id(), flags) {
            // Consume the stop report (WNOWAIT left it), then tell the deputy.
            let _ = waitid(id(), WaitPidFlag::WSTOPPED | WaitPidFlag::WNOHANG);
            self.for_deputy(&ToDeputy::Stopped { sig: sig as i32 });
        }
    }
}

fn sigchld_fd() -> std::io::Result<OwnedFd> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGCHLD);
    set.thread_block()?;
    let fd = nix::sys::signalfd::SignalFd::with_flags(
        &set,
        nix::sys::signalfd::SfdFlags::SFD_NONBLOCK | nix::sys::signalfd::SfdFlags::SFD_CLOEXEC,
    )?;
    let raw = fd.as_fd().try_clone_to_owned()?;
    drop(fd);
    Ok(raw)
}

fn drain(fd: &OwnedFd) {
    let mut b = [0u8; 256];
    while matches!(nix::unistd::read(fd, &mut b), Ok(n) if n > 0) {}
}
