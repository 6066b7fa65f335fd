//! Both halves of a move, and the node-to-node connections.
//!
//! The source freezes the process, streams its image to the destination, and keeps it
//! frozen until the destination says it runs there; any failure before that lets it go
//! on where it was (never no copy, never two). A process leaving home then becomes its own
//! deputy here; a guest leaving a host is ended there.
//!
//! The destination restores in a process of its own, not in mosixd: a supervisor for a
//! guest ([`super::supervisor`]), which stays its parent, or a short-lived one that
//! rebuilds a process coming home inside its deputy. The image passes through mosixd
//! chunk by chunk.

use super::gate::{HandshakeGate, HandshakeSlot};
use super::mover::{InDoubt, Mover, MoverStart};
use super::rights::{no_new_privs, own_rights_only};
use super::supervisor::{self, FromSup, SupMode, SupStart, ToSup};
use super::{Link, MoveError, Moved, Procs};
use anyhow::{anyhow, bail, Context, Result};
use mosix_proto::channel::Channel;
use mosix_proto::wire::{
    self, CkptError, Decision, Hello, MigrateHeader, MoveFigures, Tail, Verdict,
};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Test-only: the destination stops after receiving an image (before answering) and
/// creates `<state_dir>/stalled`, so a test can kill it in the middle of a migration.
const ENV_TEST_STALL: &str = "MOSIXD_TEST_STALL_RECEIVE";
/// Memory kept free beside a process restored here (page tables, the restorer, the
/// daemon's own growth), on top of its image.
const RESTORE_MARGIN: u64 = 16 << 20;
/// How long a process come home may take to get all its memory before it may move again
/// all the same.
const FILL_TIMEOUT: Duration = Duration::from_secs(300);

/// A move of a process from its home.
pub struct HomeMove {
    pub pid: i32,
    pub to: u32,
    pub epoch: u64,
    pub uid: u32,
    pub cmd: String,
    pub pinned: bool,
    pub avoid: Vec<u32>,
    pub migrations: u32,
    pub reason: String,
    pub offer: Option<String>,
    pub token: String,
    /// `mosrun -C`: its image is also its next checkpoint (FILE.N, marked N by its
    /// deputy at once), so that it can be recovered from the start of its stay away.
    pub ckpt: Option<(super::ckptfile::Target, super::ckptfile::CkptInfo)>,
}

/// What a move from home did: where it went, the signals that reached it meanwhile (to
/// pass on), and the checkpoint written with it (`mosrun -C`), to be completed.
pub struct LeftHome {
    pub moved: Moved,
    pub signals: Vec<i32>,
    pub ckpt: Option<TeeCkpt>,
}

/// Waits until the supervisor `sup` of process `pid`, rebuilt here, says its memory is all
/// in (or is gone, or [`FILL_TIMEOUT`] passed), then tells its job (`home`), which had
/// [`super::job::Ev::Filling`]: it may move again.
pub(super) fn await_filled(
    mut sup: std::os::unix::net::UnixStream,
    pid: i32,
    home: Option<super::home::Handle>,
) {
    let _ = sup.set_read_timeout(Some(FILL_TIMEOUT));
    match supervisor::recv(&mut sup) {
        Ok(FromSup::Filled) => {}
        other => warn!(pid, "no word that its memory is all in: {other:?}"),
    }
    if let Some(home) = home {
        home.send(super::job::Ev::Filled);
    }
}

/// The working directory of process `pid` (None: gone, or not nameable).
pub(super) fn cwd_of(pid: i32) -> Option<String> {
    mosix_ckpt::procfs::link(pid, "cwd").ok()
}

/// The checkpoint written with a move from home, its image whole in its temporary file:
/// completed ([`TeeCkpt::finish`]: synced, renamed) once the move is known at home, not
/// before (a file's sync must not delay the process's first calls from its new host).
pub struct TeeCkpt {
    pub number: u64,
    file: Result<
        (
            super::ckptfile::Target,
            super::ckptfile::Temp,
            super::ckptfile::CkptInfo,
            u64,
        ),
        CkptError,
    >,
}

impl TeeCkpt {
    /// Completes the file: its number, and the checkpoint or why not.
    pub fn finish(self) -> (u64, Result<super::checkpoint::CkptDone, CkptError>) {
        let r = self.file.and_then(|(target, temp, info, memory_bytes)| {
            target
                .finish(temp, &info)
                .map(|p| super::checkpoint::CkptDone {
                    path: p.to_string_lossy().into_owned(),
                    frozen_ms: 0,
                    memory_bytes,
                })
                .map_err(|e| CkptError::File(e.to_string()))
        });
        (self.number, r)
    }
}

/// A process caught at its exec (`mosrun -r`): seized by its mover before mosrun execs,
/// and held by it at its exec, so that the move starts with the program's first
/// instruction (a short program would otherwise run whole at home while the move is
/// being set up).
pub struct ExecWatch {
    mover: Mover,
}

impl ExecWatch {
    /// Seizes `pid` (returns once it is seized); its exec is then awaited by its mover.
    pub fn seize(pid: i32) -> Result<ExecWatch> {
        let mover = Mover::watch(pid)
            .map_err(|e| anyhow!("cannot follow process {pid} to its exec: {e}"))?;
        Ok(ExecWatch { mover })
    }

    /// Waits until the program has exec'd: it is held there by the mover returned (which
    /// lets it go if dropped).
    pub fn wait(mut self) -> Result<Mover, MoveError> {
        self.mover.execd()?;
        Ok(self.mover)
    }
}

fn peer_gone(to: u32, e: impl std::fmt::Display) -> MoveError {
    MoveError::PeerGone {
        node: to,
        why: e.to_string(),
    }
}

/// A broken link named by the node it led to.
fn lost_to(to: u32, e: MoveError) -> MoveError {
    match e {
        MoveError::LinkLost(why) => peer_gone(to, why),
        e => e,
    }
}

/// The source's half after the image: the tail and the destination's verdict (restored,
/// held there).
pub(super) fn ready(ch: &mut Link, to: u32, tail: Tail) -> Result<(), MoveError> {
    wire::send_flush(ch, &tail).map_err(|e| peer_gone(to, e))?;
    match wire::expect::<_, Verdict>(ch).map_err(|e| peer_gone(to, e))? {
        Verdict::Ready => Ok(()),
        Verdict::Refused(reason) => Err(MoveError::Refused { node: to, reason }),
        Verdict::Running { .. } => Err(peer_gone(to, "it answered out of order")),
    }
}

/// The commit: the destination lets it run. Its PID there.
pub(super) fn commit(ch: &mut Link, to: u32) -> Result<i32, MoveError> {
    wire::send_flush(ch, &Decision::Commit).map_err(|e| peer_gone(to, e))?;
    match wire::expect::<_, Verdict>(ch) {
        Ok(Verdict::Running { host_pid }) => Ok(host_pid),
        Ok(other) => Err(peer_gone(
            to,
            format!("it answered {other:?} to the commit"),
        )),
        Err(e) => Err(peer_gone(to, format!("it did not confirm the commit: {e}"))),
    }
}

/// The source's half of a move once the process is saved (held by `mover`): tail,
/// verdict, the commit announced to the mover then sent, and the mover told to finish
/// (`deputy`: it becomes its deputy, else it is ended). The PID there, the signals that
/// reached it meanwhile, and when it ran there (the end of its freeze: what its mover
/// does here after that is not).
fn finish_move(
    ch: &mut Link,
    to: u32,
    tail: Tail,
    mut mover: Mover,
    deputy: Option<super::home::DeputyExec>,
    doubt: InDoubt,
) -> Result<(i32, Vec<i32>, Instant), MoveError> {
    if let Err(e) = ready(ch, to, tail) {
        mover.release();
        return Err(e);
    }
    // Announced first: if this daemon dies from here on, the mover asks the destination
    // (through this daemon restarted) to run its copy, and finishes the move if it does.
    mover.committing(deputy, Some(doubt))?;
    if std::env::var_os(ENV_TEST_DIE_AT_COMMIT).is_some() {
        warn!("TEST: exiting between announcing the commit and sending it");
        // SAFETY: _exit ends this process at once; nothing of ours is used after.
        unsafe { libc::_exit(70) };
    }
    match commit(ch, to) {
        Ok(host_pid) => {
            let running = Instant::now();
            Ok((host_pid, mover.commit()?, running))
        }
        Err(e) => {
            mover.release();
            Err(e)
        }
    }
}

/// How long a destination holds a restored copy whose source went away before deciding
/// (longer than a mover waits for its mosixd to come back and ask: [`super::mover`]).
pub const IN_DOUBT: Duration = Duration::from_secs(12);
/// How long a question about a move in doubt waits for the destination to see its link
/// broken (at once, when the source's daemon died: its connections were reset).
const RESOLVE_WAIT: Duration = Duration::from_secs(10);
/// Test only: a source's mosixd exits right after announcing the commit to its mover,
/// before the destination is told (the window doubt.rs closes).
const ENV_TEST_DIE_AT_COMMIT: &str = "MOSIXD_TEST_DIE_AT_COMMIT";

/// The link's socket (a duplicate) and its receiving side, lent to a supervisor.
fn lend_receiver(
    ch: &mut Link,
) -> Option<(std::os::fd::OwnedFd, mosix_proto::transport::RecvLend)> {
    let sock = ch.get_ref().try_clone().ok()?;
    let lend = ch.lend_receiver().ok()?;
    Some((sock.into(), lend))
}

/// The receiving side back from supervisor `sup`, where the image it read ended.
fn take_back_receiver(ch: &mut Link, sup: &mut std::os::unix::net::UnixStream) -> Result<()> {
    match FromSup::recv(sup) {
        Ok(FromSup::ImageRead { nonce, plain, raw }) => {
            Ok(ch.take_back_receiver(nonce, plain, &raw)?)
        }
        Ok(FromSup::LinkLost(why)) => bail!("the image was cut short: {why}"),
        Ok(other) => bail!("supervisor answered {other:?}"),
        Err(e) => bail!("lost the supervisor during the image: {e}"),
    }
}

impl Procs {
    /// A mover whose mosixd died after the commit was announced asks, through this
    /// (restarted) daemon, that destination `to` run its held copy: whether it runs there.
    pub fn resolve_move(&self, home: u32, home_pid: i32, epoch: u64, to: u32) -> Result<bool> {
        let mut ch = self.connect(to)?;
        wire::send_flush(
            &mut ch,
            &Hello::Resolve(mosix_proto::wire::ResolveHello {
                home,
                home_pid,
                epoch,
                from: self.me(),
            }),
        )?;
        Ok(wire::expect::<_, mosix_proto::wire::Resolution>(&mut ch)?.committed)
    }
}

/// Processes with less memory than this move frozen (pre-copy would only add a round).
const PRECOPY_MIN: u64 = 16 << 20;

impl Procs {
    /// Whether process `pid` moves with pre-copy: configured so, and big enough.
    pub(super) fn precopy(&self, pid: i32) -> bool {
        self.cfg.precopy
            && mosix_ckpt::procfs::status(pid)
                .ok()
                .and_then(|s| {
                    s.get("VmRSS")
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
                .is_some_and(|kb| kb * 1024 >= PRECOPY_MIN)
    }
}

/// The supervisor of guest `pid` (its parent), which keeps a userfaultfd of its memory
/// for pre-copy.
pub(super) fn supervisor_of(pid: i32) -> Option<i32> {
    mosix_ckpt::procfs::status(pid)
        .ok()
        .and_then(|s| s.get("PPid").and_then(|p| p.parse::<i32>().ok()))
}

impl Procs {
    /// Moves process `m.pid` from home to `m.to`; once it runs there, the frozen original
    /// becomes its deputy. Returns the signals that reached it meanwhile (to pass on).
    pub(crate) fn leave_home(
        &self,
        m: HomeMove,
        watch: Option<ExecWatch>,
    ) -> Result<LeftHome, MoveError> {
        // `mosrun -r`: held at its exec by its mover, which freezes it there once told
        // to begin; any failure before lets it go (dropped).
        let mut held = watch.map(ExecWatch::wait).transpose()?;
        let to = m.to;
        own_rights_only(m.pid, m.uid)?;
        self.check_destination(to)?;
        let dp = &self.deputy_path;
        if !dp.exists() {
            return Err(MoveError::Engine(format!(
                "its deputy program {} is missing on this node",
                dp.display()
            )));
        }
        let leaving = mosix_ckpt::Leaving {
            shared: self.shared_with(&[]),
            ..Default::default()
        };
        if held.is_none() {
            // (Held by its mover, it is checked there, before it is touched.)
            mosix_ckpt::check_moving(m.pid, &leaving)
                .map_err(|e| MoveError::Engine(e.to_string()))?;
        }
        let mut ch = self
            .connect(to)
            .map_err(|e| MoveError::Destination(format!("{e:#}")))?;
        let header = MigrateHeader {
            home: self.me(),
            home_pid: m.pid,
            from: self.me(),
            epoch: m.epoch,
            uid: m.uid,
            cmd: m.cmd.clone(),
            pinned: m.pinned,
            avoid: m.avoid.clone(),
            migrations: m.migrations,
            reason: m.reason.clone(),
            offer: m.offer.clone(),
            hostname: mosix_ckpt::sys::hostname(),
            no_new_privs: no_new_privs(m.pid),
            shared_paths: self
                .cfg
                .shared_paths
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        };
        let doubt = InDoubt::of(&header, &self.cfg.control_socket, to);
        wire::send(&mut ch, &Hello::Migrate(header)).map_err(|e| peer_gone(to, e))?;
        let mover = match held.take() {
            Some(m) => m,
            None => Mover::spawn()?,
        };
        let mut mover = mover.begin(MoverStart {
            pid: m.pid,
            away: leaving.away,
            no_new_privs: leaving.no_new_privs,
            compression: self.cfg.compression,
            precopy: self.precopy(m.pid),
            supervisor: None,
            shared: leaving.shared.clone(),
        })?;
        // `mosrun -C`: the image is written into its next checkpoint file as it goes.
        let temp = m.ckpt.as_ref().and_then(|(t, _)| match t.create() {
            Ok(f) => Some(f),
            Err(e) => {
                warn!(
                    pid = m.pid,
                    "its checkpoint with this move is not written: {e}"
                );
                None
            }
        });
        let mut fds = Vec::new();
        let mut nnp = false;
        let (dumped, teed) = {
            let file = temp.as_ref().map(|t| {
                mosix_proto::wire::Unchunk::new(std::io::BufWriter::with_capacity(1 << 20, &t.file))
            });
            let mut out = super::checkpoint::Tee::new(&mut ch, file);
            let (pid, uid) = (m.pid, m.uid);
            let r = mover.dump(&mut out, &mut || {
                // Checked again while it is held: it may have exec'd a set-user-ID
                // program since the check above.
                own_rights_only(pid, uid)?;
                fds = super::ckptfile::home_fds(pid);
                nnp = no_new_privs(pid);
                Ok(Vec::new())
            });
            let teed = out.finish();
            (r.map_err(|e| lost_to(to, e))?, teed)
        };
        let (memory_bytes, rounds, t0) = (dumped.memory_bytes, dumped.rounds, dumped.frozen_at);
        let mark = if temp.is_some() && teed {
            m.ckpt.as_ref().map(|(t, _)| t.number)
        } else {
            None
        };
        // Its deputy's exec, read while it is held; its record says where it is going,
        // for a mosixd that restarts before the move is done here.
        let exec = self.deputy_exec(m.pid, &m.token, mark);
        self.mark_leaving(m.pid, Some((to, m.epoch)));
        // Held still: the working directory it leaves in (its deputy keeps it).
        let tail_cwd = cwd_of(m.pid);
        let tail = Tail {
            next_seq: 1,
            proc_fds: Vec::new(),
            figures: MoveFigures {
                frozen_ms: t0.elapsed().as_millis() as u64,
                memory_bytes,
                rounds: rounds.clone(),
            },
            cwd: tail_cwd.clone(),
        };
        let (host_pid, signals, running) =
            match finish_move(&mut ch, to, tail, mover, Some(exec), doubt) {
                Ok(r) => r,
                Err(e) => {
                    self.mark_leaving(m.pid, None);
                    if let (Some(t), Some((target, _))) = (temp, &m.ckpt) {
                        target.discard(t);
                    }
                    return Err(e);
                }
            };
        let ckpt = match (temp, m.ckpt) {
            (Some(t), Some((target, mut info))) => {
                let number = target.number;
                let file = if mark.is_some() {
                    info.fds = fds;
                    info.cwd = tail_cwd;
                    info.no_new_privs = nnp;
                    info.memory_bytes = memory_bytes;
                    info.mark = mark;
                    info.node = self.me();
                    Ok((target, t, info, memory_bytes))
                } else {
                    target.discard(t);
                    Err(CkptError::File(
                        "its image could not be written into its file".into(),
                    ))
                };
                Some(TeeCkpt { number, file })
            }
            _ => None,
        };
        let frozen_ms = running.duration_since(t0).as_millis() as u64;
        crate::metrics::migration_moved(frozen_ms, memory_bytes);
        info!(
            pid = m.pid,
            to,
            host_pid,
            bytes = memory_bytes,
            frozen_ms,
            "process left home: {}",
            m.reason
        );
        Ok(LeftHome {
            moved: Moved {
                to,
                frozen_ms,
                memory_bytes,
                rounds,
            },
            signals,
            ckpt,
        })
    }

    /// The directories this node shares with every node (its `shared_paths`), and, for a
    /// guest, that its home shares too (`home`; empty: this node is its home).
    pub(super) fn shared_with(&self, home: &[String]) -> Vec<String> {
        let mine: Vec<String> = self
            .cfg
            .shared_paths
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if home.is_empty() {
            return mine;
        }
        mine.into_iter()
            .filter(|p| home.iter().any(|h| h == p))
            .collect()
    }

    /// Moves guest `pid` from here to `dest` (its home, or another node). `quiesce` is
    /// called once it is frozen: its calls at home are cancelled, and it returns those
    /// made meanwhile and the next sequence number of its calls. On success the frozen
    /// copy here is ended.
    pub(crate) fn leave_host(
        &self,
        pid: i32,
        dest: u32,
        header: MigrateHeader,
        quiesce: &mut dyn FnMut() -> Result<super::guest::Quiesced, MoveError>,
    ) -> Result<Moved, MoveError> {
        self.check_destination(dest)?;
        let leaving = mosix_ckpt::Leaving {
            away: true,
            no_new_privs: Some(header.no_new_privs),
            shared: self.shared_with(&header.shared_paths),
        };
        mosix_ckpt::check_moving(pid, &leaving).map_err(|e| MoveError::Engine(e.to_string()))?;
        let mut ch = self
            .connect(dest)
            .map_err(|e| MoveError::Destination(format!("{e:#}")))?;
        wire::send(&mut ch, &Hello::Migrate(header.clone())).map_err(|e| peer_gone(dest, e))?;
        let mut tail = Tail {
            next_seq: 1,
            proc_fds: Vec::new(),
            figures: MoveFigures::default(),
            cwd: None,
        };
        let supervisor = supervisor_of(pid);
        let mut mover = Mover::start(MoverStart {
            pid,
            away: leaving.away,
            no_new_privs: leaving.no_new_privs,
            compression: self.cfg.compression,
            precopy: supervisor.is_some() && self.precopy(pid),
            supervisor,
            shared: leaving.shared.clone(),
        })?;
        let dumped = mover
            .dump(&mut ch, &mut || {
                let q = quiesce()?;
                tail = Tail {
                    next_seq: q.next_seq,
                    proc_fds: q.proc_fds,
                    figures: MoveFigures::default(),
                    cwd: q.cwd,
                };
                Ok(q.completed)
            })
            .map_err(|e| lost_to(dest, e))?;
        let (memory_bytes, rounds, t0) = (dumped.memory_bytes, dumped.rounds, dumped.frozen_at);
        tail.figures = MoveFigures {
            frozen_ms: t0.elapsed().as_millis() as u64,
            memory_bytes,
            rounds: rounds.clone(),
        };
        let doubt = InDoubt::of(&header, &self.cfg.control_socket, dest);
        let (host_pid, _, running) = finish_move(&mut ch, dest, tail, mover, None, doubt)?;
        let frozen_ms = running.duration_since(t0).as_millis() as u64;
        crate::metrics::migration_moved(frozen_ms, memory_bytes);
        info!(
            home = header.home,
            home_pid = header.home_pid,
            to = dest,
            host_pid,
            frozen_ms,
            "guest moved on: {}",
            header.reason
        );
        Ok(Moved {
            to: dest,
            frozen_ms,
            memory_bytes,
            rounds,
        })
    }

    /// Serves node-to-node connections (migrations in, links from hosts) on the node's
    /// TCP address (same port as gossip).
    pub fn listen(self: &Arc<Self>) -> Result<()> {
        let l = TcpListener::bind(self.cfg.listen)
            .with_context(|| format!("cannot listen on tcp {}", self.cfg.listen))?;
        let me = self.clone();
        let gate = Arc::new(HandshakeGate::start()?);
        std::thread::Builder::new()
            .name("mosix-accept".into())
            .spawn(move || {
                for s in l.incoming() {
                    match s {
                        Ok(s) => {
                            // Unauthenticated peers get a slot of a few, or nothing.
                            let Some(slot) = gate.admit(&s) else {
                                debug!("too many handshakes at once; dropped a connection");
                                continue;
                            };
                            let me = me.clone();
                            let _ = std::thread::Builder::new().name("mosix-peer".into()).spawn(
                                move || {
                                    if let Err(e) = me.peer_connection(s, slot) {
                                        debug!("peer connection: {e:#}");
                                    }
                                },
                            );
                        }
                        Err(e) => {
                            warn!("accept: {e}");
                            // EMFILE and the like: do not spin.
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(())
    }

    fn peer_connection(self: &Arc<Self>, s: TcpStream, slot: HandshakeSlot) -> Result<()> {
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(super::PEER_TIMEOUT))?;
        let peer = s.peer_addr()?;
        let mut ch =
            Channel::accept(s, &self.keys).map_err(|e| anyhow!("connection from {peer}: {e}"))?;
        let hello = wire::expect::<_, Hello>(&mut ch);
        // Authenticated (or failed): the deadline and the slot are over.
        drop(slot);
        match hello? {
            Hello::Migrate(h) => {
                // The sender must be the node it says it is (per-node keys).
                if let Err(e) = ch.check_claim(h.from) {
                    warn!("refused a migration from {peer}: {e}");
                    wire::send_flush(&mut ch, &Verdict::Refused(e.to_string()))?;
                    bail!("{e}");
                }
                self.receive(ch, h)
            }
            Hello::Link(l) => {
                if let Err(e) = ch.check_claim(l.node) {
                    warn!("refused a link from {peer}: {e}");
                    bail!("{e}");
                }
                self.host_linked(ch, l)
            }
            Hello::Checkpoint(c) => {
                if let Err(e) = ch.check_claim(c.node) {
                    warn!("refused a checkpoint from {peer}: {e}");
                    bail!("{e}");
                }
                self.checkpoint_in(ch, c)
            }
            Hello::Resolve(r) => {
                if let Err(e) = ch.check_claim(r.from) {
                    warn!("refused a question from {peer}: {e}");
                    bail!("{e}");
                }
                let committed = self
                    .doubts
                    .resolve((r.home, r.home_pid, r.epoch), RESOLVE_WAIT);
                info!(
                    home = r.home,
                    pid = r.home_pid,
                    from = r.from,
                    committed,
                    "a move in doubt resolved"
                );
                wire::send_flush(&mut ch, &mosix_proto::wire::Resolution { committed })?;
                Ok(())
            }
        }
    }

    /// Reasons not to take this process here, before its image is read.
    fn admission(&self, h: &MigrateHeader) -> Option<String> {
        let home = h.home == self.me();
        if !home && !self.balancer().accepts_guests() {
            return Some(format!(
                "node {} does not accept guest processes",
                self.me()
            ));
        }
        if let (Some(offer), false) = (&h.offer, home) {
            let offer: mosix_balance::Offer = match serde_json::from_str(offer) {
                Ok(o) => o,
                Err(e) => return Some(format!("bad offer: {e}")),
            };
            let me = self
                .nodes()
                .iter()
                .find(|n| n.this_node)
                .and_then(crate::balance::node_info);
            let here: Vec<mosix_balance::ProcInfo> =
                self.balance_view().into_iter().map(|v| v.info).collect();
            if let Some(me) = me {
                let now = self.now_ms();
                if let Err(why) = self.balancer().admit(now, &me, &here, &offer) {
                    return Some(format!("node {}: {why}", self.me()));
                }
            }
        }
        None
    }

    /// Receives a migrating process: restored by a supervisor (a guest) or inside its
    /// deputy (coming home), committed, then handed to its driver.
    fn receive(self: &Arc<Self>, mut ch: Link, h: MigrateHeader) -> Result<()> {
        let t0 = Instant::now();
        let refuse = |ch: &mut Link, why: String| -> Result<()> {
            warn!(home = h.home, pid = h.home_pid, "refused a process: {why}");
            crate::metrics::incoming_refused();
            // The image follows: read past it so that the answer is heard.
            let _ = wire::read_chunks(ch, 0);
            let _ = wire::expect::<_, Tail>(ch);
            wire::send_flush(ch, &Verdict::Refused(why.clone()))?;
            Err(anyhow!(why))
        };
        if let Some(why) = self.admission(&h) {
            return refuse(&mut ch, why);
        }
        let mode = if h.home == self.me() {
            match self.home_mode(&h) {
                Ok(m) => m,
                Err(e) => return refuse(&mut ch, format!("node {}: {e:#}", self.me())),
            }
        } else {
            SupMode::Guest
        };
        let limit = mosix_ckpt::memory_room().saturating_sub(RESTORE_MARGIN);
        let sock = self
            .cfg
            .state_dir
            .join("guests")
            .join(format!("{}-{}.sock", h.home, h.home_pid));
        let mut sup = match supervisor::spawn() {
            Ok(s) => s,
            Err(e) => return refuse(&mut ch, format!("node {}: no supervisor: {e:#}", self.me())),
        };
        // The supervisor reads the image from the link itself (its receiving side lent),
        // not relayed here.
        let (link_sock, link) = lend_receiver(&mut ch).unzip();
        let start = SupStart {
            header: h.clone(),
            mode: mode.clone(),
            limit,
            socket: sock,
            shared_paths: self.cfg.shared_paths.clone(),
            link,
        };
        supervisor::send(&mut sup, &ToSup::Start(Box::new(start)))?;
        // The image, chunk by chunk, then the tail.
        let relayed = match link_sock {
            Some(fd) => super::imagepipe::send_fd(&sup, &fd)
                .map_err(anyhow::Error::from)
                .and_then(|()| take_back_receiver(&mut ch, &mut sup)),
            None => match super::imagepipe::relay_chunks(&mut ch, &mut sup) {
                Ok(true) => Ok(()),
                Ok(false) => Err(anyhow!("the image was cut short")),
                Err(e) => Err(e.into()),
            },
        };
        let tail = relayed.and_then(|_| Ok(wire::expect::<_, Tail>(&mut ch)?));
        let mut tail = match tail {
            Ok(t) => t,
            Err(e) => {
                let _ = supervisor::send(&mut sup, &ToSup::Abort);
                return Err(e);
            }
        };
        if let SupMode::Into { pid, .. } = &mode {
            // Coming home into its deputy, which made its `chdir`s: the deputy's working
            // directory is its own, also where its host did not know it (after an
            // `fchdir`, or a relative `..`).
            if let Some(cwd) = cwd_of(*pid) {
                tail.cwd = Some(cwd);
            }
        }
        let (figures, tail_at) = (tail.figures.clone(), Instant::now());
        wire::send_flush(&mut sup, &tail)?;
        if std::env::var_os(ENV_TEST_STALL).is_some() {
            let _ = std::fs::write(self.cfg.state_dir.join("stalled"), b"");
            warn!("TEST: stalling in the middle of a migration");
            loop {
                std::thread::park();
            }
        }
        let host_pid = match supervisor::recv(&mut sup) {
            Ok(FromSup::Ready { host_pid }) => host_pid,
            Ok(FromSup::Refused(why)) => {
                wire::send_flush(&mut ch, &Verdict::Refused(why.clone()))?;
                bail!("refused: {why}");
            }
            Ok(other) => bail!("supervisor answered {other:?}"),
            Err(e) => {
                let why = format!("node {}: the restore failed: {e}", self.me());
                wire::send_flush(&mut ch, &Verdict::Refused(why.clone()))?;
                bail!("{why}");
            }
        };
        debug!("migration in: restored after {:?}", t0.elapsed());
        if let Err(e) = wire::send_flush(&mut ch, &Verdict::Ready) {
            let _ = supervisor::send(&mut sup, &ToSup::Abort);
            return Err(e.into());
        }
        let key = (h.home, h.home_pid, h.epoch);
        match wire::expect::<_, Decision>(&mut ch) {
            Ok(Decision::Commit) => {}
            Ok(Decision::Abort) => {
                let _ = supervisor::send(&mut sup, &ToSup::Abort);
                return Ok(());
            }
            Err(e) => {
                // The source went away: it may have announced the commit to its mover,
                // which then asks (through its restarted mosixd) that this copy run.
                info!(
                    home = h.home,
                    pid = h.home_pid,
                    "the source went away before deciding ({e}); the copy is held for {IN_DOUBT:?}"
                );
                if !self.doubts.hold(key, IN_DOUBT) {
                    let _ = supervisor::send(&mut sup, &ToSup::Abort);
                    return Ok(());
                }
                info!(
                    home = h.home,
                    pid = h.home_pid,
                    "its mover asked: it runs here"
                );
            }
        }
        let started = supervisor::send(&mut sup, &ToSup::Commit)
            .map_err(anyhow::Error::from)
            .and_then(|_| match supervisor::recv(&mut sup) {
                Ok(FromSup::Running) => Ok(()),
                other => Err(anyhow!("the supervisor did not start it: {other:?}")),
            });
        if let Err(e) = started {
            self.doubts.failed(key);
            return Err(e);
        }
        self.doubts.committed(key);
        let _ = wire::send_flush(&mut ch, &Verdict::Running { host_pid });
        drop(ch);
        info!(
            home = h.home,
            home_pid = h.home_pid,
            host_pid,
            from = h.from,
            ms = t0.elapsed().as_millis() as u64,
            "process arrived"
        );
        match mode {
            SupMode::Guest => self.start_guest(sup, h, host_pid),
            SupMode::Into { .. } => {
                let home = super::lock(&self.homes).get(&h.home_pid).cloned();
                if let Some(home) = &home {
                    home.send(super::job::Ev::Filling);
                    home.send(super::job::Ev::CameHome {
                        // Stopped from its freeze at the source until it ran here.
                        moved: Moved {
                            to: self.me(),
                            frozen_ms: figures.frozen_ms + tail_at.elapsed().as_millis() as u64,
                            memory_bytes: figures.memory_bytes,
                            rounds: figures.rounds,
                        },
                    });
                }
                await_filled(sup, h.home_pid, home);
                Ok(())
            }
        }
    }

    /// How a process of ours arriving here runs: recovered from a checkpoint (as the
    /// residence its recovery made), under a supervisor as away; coming home from where
    /// it runs, rebuilt inside its deputy, which must be the process we sent there.
    fn home_mode(&self, h: &MigrateHeader) -> Result<SupMode> {
        let home = super::lock(&self.homes)
            .get(&h.home_pid)
            .cloned()
            .ok_or_else(|| anyhow!("process {} has no home here any more", h.home_pid))?;
        let snap = home.snapshot();
        if snap.uid != h.uid {
            bail!("process {} is not away from here", h.home_pid);
        }
        if snap.recovering == Some(h.epoch) && h.from == self.me() {
            return Ok(SupMode::Guest);
        }
        // From where it runs, as its next residence: a copy of an older residence (its
        // host was given up for dead) never comes back into its deputy.
        if snap.native || h.from != snap.node || h.epoch != snap.epoch + 1 {
            bail!("process {} is not away from here", h.home_pid);
        }
        let exec = self.deputy_exec(h.home_pid, home.token(), None);
        Ok(SupMode::Into {
            pid: h.home_pid,
            deputy: (exec.path, exec.argv, exec.envp),
            reopen: Vec::new(),
        })
    }
}
