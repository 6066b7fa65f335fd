//! Processes whose home is this node: registered by `mosrun` (which then becomes the
//! program), followed by one driver thread each around [`job::Job`], their deputy's
//! connection when away, their host's link, and their record in `state_dir/home/`.

use super::checkpoint::CkptDone;
use super::ckptfile::{CkptInfo, Owner, Target};
use super::job::{self, Act, Ev, Job, MoveResult, Where};
use super::{lock, Link, MoveError, Procs, Snapshot};
use crate::peer::{Peer, PeerPidfd};
use anyhow::{anyhow, bail, Result};
use mosix_proto::control::{After, CheckpointSpec, RegisterRequest};
use mosix_proto::wire::{self, CkptError, LinkHello, ToHome, ToHost};
use mosix_remote::arena::{self, Arena};
use mosix_remote::wire::ToDeputy;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Arenas a deputy is given at most by one mosixd (counted again from 0 for each new
/// deputy, each time the process leaves home). A deputy connects again only when its
/// mosixd restarted, so it needs one; but the pages of an arena are this daemon's
/// (charged to its cgroup) and a deputy that keeps its map of an old one keeps them:
/// the user's process, taken over, must not make it hold more and more of them. Past
/// this, its writes behind go through the socket, as before.
const ARENAS: u32 = 4;

/// How long a `migrate` refused because the process is between two moves is asked again.
const BUSY_WAIT: Duration = Duration::from_secs(5);

/// Whether a move was refused because the process is in the middle of a move (here, or
/// as its host said).
fn is_busy(e: &super::MoveError) -> bool {
    use super::MoveError;
    match e {
        MoveError::Busy => true,
        MoveError::Failed { reason } => *reason == MoveError::Busy.to_string(),
        _ => false,
    }
}

/// The deputy's end, as the job writes to it: mosix-remote frames on its connection.
pub struct DeputyConn {
    sock: UnixStream,
    /// The arena the deputy was given at its hello for the data of large writes behind
    /// (mosix_remote::arena: a copy into it instead of two through the socket), and the
    /// number of the next piece put there.
    arena: Option<(Arc<Arena>, u64)>,
}

impl DeputyConn {
    /// A write behind of `frame`, with its data put in the arena: the frame that tells
    /// the deputy where. None (sent as it is) if it is not a large write behind, there is
    /// no arena or it is full.
    fn in_arena(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        let (arena, next) = self.arena.as_mut()?;
        let b = ToDeputy::behind_in(frame).filter(|b| b.data.len() >= arena::MIN_PIECE)?;
        let at = arena.put(b.data, *next)?;
        let m = ToDeputy::BehindInArena {
            stream: b.stream,
            n: b.n,
            off: b.off,
            at,
            len: b.data.len() as u64,
            piece: *next,
        };
        *next += 1;
        crate::metrics::deputy_arena_bytes(b.data.len() as u64);
        Some(mosix_remote::wire::encode(&m))
    }

    /// Its arena's pages go back once it stopped writing.
    pub(super) fn trim(&self) {
        if let Some((a, _)) = &self.arena {
            a.trim(arena::QUIET);
        }
    }
}

impl job::ToDeputySink for DeputyConn {
    fn send(&mut self, frame: &[u8]) -> bool {
        let small;
        let frame = match self.in_arena(frame) {
            Some(f) => {
                small = f;
                &small[..]
            }
            None => frame,
        };
        let len = (frame.len() as u32).to_le_bytes();
        if frame.len() <= 64 << 10 {
            let mut b = Vec::with_capacity(frame.len() + 4);
            b.extend_from_slice(&len);
            b.extend_from_slice(frame);
            return self.sock.write_all(&b).is_ok();
        }
        let mut bufs = [std::io::IoSlice::new(&len), std::io::IoSlice::new(frame)];
        wire::write_all_vectored(&mut self.sock, &mut bufs).is_ok()
    }
}

/// The host's link, as the job writes to it.
pub struct HostLink(Link);

impl job::ToHostSink for HostLink {
    fn send(&mut self, m: &ToHost) -> bool {
        wire::send_flush(&mut self.0, m).is_ok()
    }
    fn close(&mut self) {
        // Its reader ends too; the host hears it when its link heals.
        let _ = self.0.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

pub(crate) type HomeJob = Job<DeputyConn, HostLink>;

/// What a driver is told.
pub enum HomeEv {
    Job(Ev<DeputyConn, HostLink>),
    /// `migrate PID checkpoint|chkstop|chkexit`.
    Checkpoint {
        then: After,
        reply: Sender<Result<CkptDone, CkptError>>,
    },
    /// `migrate PID freeze|continue`: frozen after it, or why not.
    Freeze {
        freeze: bool,
        reply: Sender<Result<bool, CkptError>>,
    },
    /// Its host sends checkpoint `id` (residence `epoch` on `node`): where it goes, if it
    /// is the one expected.
    CkptIncoming {
        id: u64,
        epoch: u64,
        node: u32,
        reply: Sender<Option<Target>>,
    },
    /// The image of checkpoint `id` arrived (or `failed`): what completes its file (the
    /// deputy's descriptors at the mark), or why it is not to be.
    CkptImage {
        id: u64,
        failed: Option<CkptError>,
        reply: Sender<Result<CkptInfo, CkptError>>,
    },
    /// Checkpoint `id` is written, or failed.
    CkptSaved {
        id: u64,
        result: Result<CkptDone, CkptError>,
    },
}

/// The way to a home process's driver.
#[derive(Clone)]
pub struct Handle {
    tx: Sender<HomeEv>,
    pub info: Arc<Mutex<Snapshot>>,
    token: Arc<String>,
    /// Arenas its deputy was given (see [`ARENAS`]).
    arenas: Arc<std::sync::atomic::AtomicU32>,
    answers: Answers,
    /// Its owner, as the socket of its registration said (for its children's files).
    owner: Option<Owner>,
}

/// Answers to `migrate`, held by the driver until it has published the process's new
/// place in its [`Snapshot`]: whoever is answered and asks `where` at once sees it there.
type Answers = Arc<Mutex<Vec<(Sender<MoveResult>, MoveResult)>>>;

struct AnswerLater {
    tx: Sender<MoveResult>,
    answers: Answers,
}

impl job::Waiter for AnswerLater {
    fn answer(self: Box<Self>, r: MoveResult) {
        lock(&self.answers).push((self.tx, r));
    }
}

impl Handle {
    /// Asks for a move; false if the driver is gone.
    pub fn migrate(
        &self,
        to: u32,
        reason: String,
        offer: Option<String>,
        reply: Option<Sender<MoveResult>>,
    ) -> bool {
        self.tx
            .send(HomeEv::Job(Ev::Migrate {
                to,
                reason,
                offer,
                reply: reply.map(|tx| {
                    Box::new(AnswerLater {
                        tx,
                        answers: self.answers.clone(),
                    }) as Box<dyn job::Waiter + Send>
                }),
            }))
            .is_ok()
    }
    pub(crate) fn send(&self, ev: Ev<DeputyConn, HostLink>) -> bool {
        self.tx.send(HomeEv::Job(ev)).is_ok()
    }
    pub(crate) fn send_home(&self, ev: HomeEv) -> bool {
        self.tx.send(ev).is_ok()
    }

    /// What `ps`, `where` and the balancer read of it (published by its driver before
    /// it answers a move).
    pub fn snapshot(&self) -> Snapshot {
        lock(&self.info).clone()
    }
    /// The secret its deputy proves itself with.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }
}

/// A home process's record, enough to find it again after a restart of mosixd.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub pid: i32,
    /// Its start time (/proc/PID/stat field 22): a PID reused by another process differs.
    pub start_time: u64,
    pub uid: u32,
    pub cmd: String,
    pub pinned: bool,
    pub avoid: Vec<u32>,
    pub migrations: u32,
    /// Where it runs: this node, or another with its residence number.
    pub node: u32,
    pub epoch: u64,
    pub token: String,
    /// Being moved to (node, residence): from just before the commit until the move is
    /// settled here. A mosixd that restarts meanwhile finds out from the process itself
    /// whether it left (its mover made it its deputy) or not.
    #[serde(default)]
    pub leaving: Option<(u32, u64)>,
    /// Its owner's credentials, for its checkpoint files (read when it was registered).
    #[serde(default)]
    pub owner: Option<Owner>,
    /// Its checkpoints (`mosrun -C`, or since a `migrate PID checkpoint`).
    #[serde(default)]
    pub ckpt: Option<CkptRecord>,
}

/// A job's checkpoints, as its record keeps them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CkptRecord {
    /// FILE of `mosrun -C FILE` (absolute), and minutes between automatic checkpoints.
    pub base: String,
    pub every_min: Option<f64>,
    /// The next checkpoint's number.
    pub next: u64,
    /// The checkpoint it can be recovered from: (number, its file, when it was taken in
    /// ms since the Unix epoch).
    pub recovery: Option<(u64, String, u64)>,
}

impl CkptRecord {
    /// The record of `mosrun -C FILE -A MINUTES`, numbered from `next`.
    pub fn of(spec: &CheckpointSpec, next: u64) -> CkptRecord {
        CkptRecord {
            base: spec.file.clone(),
            every_min: spec.every_min.filter(|m| *m > 0.0),
            next,
            recovery: None,
        }
    }
}

impl Record {
    /// The record of a process just made migratable at home.
    pub(crate) fn new_for(j: &HomeJob, start_time: u64, token: &str) -> Record {
        Record::new(j, start_time, token)
    }

    fn new(j: &HomeJob, start_time: u64, token: &str) -> Record {
        Record {
            pid: j.pid,
            start_time,
            uid: j.uid,
            cmd: j.cmd.clone(),
            pinned: j.pinned,
            avoid: j.avoid.clone(),
            migrations: 0,
            node: j.me,
            epoch: 0,
            token: token.to_string(),
            leaving: None,
            owner: None,
            ckpt: None,
        }
    }
}

/// Whether process `pid` is traced now (held by a mover, or being rebuilt).
fn traced(pid: i32) -> bool {
    mosix_ckpt::procfs::status(pid)
        .ok()
        .and_then(|s| s.get("TracerPid").map(|t| t.trim() != "0"))
        .unwrap_or(false)
}

fn start_time(pid: i32) -> Option<u64> {
    mosix_ckpt::procfs::stat_fields(pid)
        .ok()
        .map(|f| mosix_ckpt::procfs::field_u64(&f, 22))
}

fn ppid_of(pid: i32) -> Option<i32> {
    mosix_ckpt::procfs::stat_fields(pid)
        .ok()
        .map(|f| mosix_ckpt::procfs::field_u64(&f, 4) as i32)
}

pub(crate) fn new_token() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Who registers (from the control socket's peer credentials).
pub struct Caller {
    pub uid: u32,
    /// Its group and supplementary groups (SO_PEERCRED, SO_PEERGROUPS): whose rights its
    /// checkpoint files are written and read with.
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Its PID when it connected (SO_PEERCRED): by now perhaps another process's.
    pub pid: Option<i32>,
    /// The process that connected (SO_PEERPIDFD), which the PID is checked against.
    pub pidfd: PeerPidfd,
}

impl Caller {
    /// The caller behind a control connection's credentials.
    pub fn of(peer: &Peer) -> Caller {
        Caller {
            uid: peer.uid,
            gid: peer.gid,
            groups: peer.groups.clone(),
            pid: peer.pid,
            pidfd: match &peer.pidfd {
                PeerPidfd::Open(fd) => match fd.try_clone() {
                    Ok(fd) => PeerPidfd::Open(fd),
                    Err(_) => PeerPidfd::Gone,
                },
                PeerPidfd::Gone => PeerPidfd::Gone,
                PeerPidfd::Unsupported => PeerPidfd::Unsupported,
            },
        }
    }

    /// Whose files its jobs' checkpoints are.
    pub fn owner(&self) -> Owner {
        Owner {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// The process that connected as `peer`, if it is still the one with its PID: its pidfd
/// (SO_PEERPIDFD) still refers to a live process, so the PID cannot have been given to
/// another. Without SO_PEERPIDFD (kernels before 6.5) the PID is all there is.
pub(crate) fn caller_process(peer: &Caller) -> Result<(i32, OwnedFd)> {
    let gone = || anyhow!("the calling process has gone");
    let pid = peer.pid.ok_or_else(gone)?;
    let fd = match &peer.pidfd {
        PeerPidfd::Open(fd) => fd.try_clone()?,
        PeerPidfd::Gone => return Err(gone()),
        PeerPidfd::Unsupported => mosix_ckpt::sys::pidfd_open(pid).map_err(|_| gone())?,
    };
    if !crate::peer::alive(&fd) {
        return Err(gone());
    }
    Ok((pid, fd))
}

/// What a deputy's exec needs: its program, the process's own argv (so `ps` at home
/// shows what runs), and its environment.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeputyExec {
    pub path: String,
    pub argv: Vec<String>,
    pub envp: Vec<String>,
    /// The process's close-on-exec descriptors (cleared for the exec, set again by it).
    pub cloexec: Vec<i32>,
}

impl Procs {
    fn record_dir(&self) -> std::path::PathBuf {
        self.cfg.state_dir.join("home")
    }

    fn write_record(&self, r: &Record) {
        let dir = self.record_dir();
        let _ = std::fs::create_dir_all(&dir);
        let tmp = dir.join(format!("{}.json.tmp", r.pid));
        let fin = dir.join(format!("{}.json", r.pid));
        let ok = serde_json::to_vec(r)
            .ok()
            .and_then(|j| std::fs::write(&tmp, j).ok())
            .and_then(|_| std::fs::rename(&tmp, &fin).ok());
        if ok.is_none() {
            warn!(pid = r.pid, "cannot write the record of process {}", r.pid);
        }
    }

    /// Marks the record of `pid` as leaving to (node, residence), or not.
    pub(crate) fn write_record_of(&self, r: &Record) {
        self.write_record(r)
    }

    pub(crate) fn mark_leaving(&self, pid: i32, to: Option<(u32, u64)>) {
        let _one = lock(&RECORDS);
        if let Some(mut r) = self.read_record(pid) {
            r.leaving = to;
            self.write_record(&r);
        }
    }

    fn read_record(&self, pid: i32) -> Option<Record> {
        let path = self.record_dir().join(format!("{pid}.json"));
        std::fs::read(&path)
            .ok()
            .and_then(|t| serde_json::from_slice::<Record>(&t).ok())
    }

    /// Writes the record of a job from its thread. While it is leaving or being recovered,
    /// the place its mover marked (see [`Procs::mark_leaving`]) is kept: a move or recovery
    /// whose commit got no answer may run it there, as that residence.
    pub(super) fn persist_record(&self, r: &mut Record, moving: bool) {
        let _one = lock(&RECORDS);
        r.leaving = if moving {
            self.read_record(r.pid).and_then(|d| d.leaving)
        } else {
            None
        };
        self.write_record(r);
    }

    /// Where a process found again after a restart of mosixd is, from the process itself
    /// (the record may be behind: mosixd died in a move): its mover or the supervisor
    /// rebuilding it at home (a tracer) is given time to finish; then it is away if it is
    /// its deputy, else home.
    fn settle_place(&self, r: &mut Record) -> bool {
        let end = Instant::now() + std::time::Duration::from_secs(30);
        while traced(r.pid) && Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let exe = std::fs::read_link(format!("/proc/{}/exe", r.pid)).ok();
        let deputy = std::fs::canonicalize(&self.deputy_path).ok();
        let is_deputy = exe.is_some() && exe == deputy;
        let was = r.node;
        match r.leaving.take() {
            Some((to, epoch)) if is_deputy => {
                r.node = to;
                r.epoch = epoch;
                r.migrations += 1;
            }
            _ if r.node != self.me() && !is_deputy => {
                r.node = self.me();
                r.migrations += 1;
            }
            _ => {}
        }
        if r.node != was {
            info!(
                pid = r.pid,
                "it moved from node {was} to node {} while mosixd was away", r.node
            );
        }
        if !is_deputy {
            // Its deputy, which held its marks, is gone.
            if let Some(c) = &mut r.ckpt {
                c.recovery = None;
            }
        }
        self.write_record(r);
        is_deputy
    }

    fn remove_record(&self, pid: i32) {
        let _ = std::fs::remove_file(self.record_dir().join(format!("{pid}.json")));
    }

    /// `mosrun`: the calling process becomes a migratable process of this node. With
    /// `to`/`best`, it is moved as soon as it has exec'd its program.
    pub fn register(self: &Arc<Self>, peer: &Caller, req: RegisterRequest) -> Result<i32> {
        let (pid, pidfd) = caller_process(peer)?;
        if lock(&self.homes).contains_key(&pid) {
            bail!("process {pid} is a migratable process already");
        }
        if let Some(t) = req.to {
            self.check_destination(t).map_err(|e| anyhow!("{e}"))?;
        }
        let st = start_time(pid).ok_or_else(|| anyhow!("the calling process has gone"))?;
        // Read by PID: still the caller's if it lives on after the read.
        if !crate::peer::alive(&pidfd) {
            bail!("the calling process has gone");
        }
        let cmd = req.argv.join(" ");
        let now = Instant::now();
        let mut j = HomeJob::new(self.me(), pid, peer.uid, cmd, now);
        j.pinned = req.pinned;
        j.avoid = req.avoid.clone();
        let token = new_token();
        let mut rec = Record::new(&j, st, &token);
        rec.owner = Some(peer.owner());
        if let Some(c) = &req.checkpoint {
            check_checkpoint_spec(c)?;
            rec.ckpt = Some(CkptRecord::of(c, 1));
        }
        self.write_record(&rec);
        let target = if req.best { self.best_node() } else { req.to };
        let first = match target.filter(|&t| t != self.me()) {
            // Caught at its exec (seized before mosrun hears back), then moved.
            Some(t) => Some((t, super::transfer::ExecWatch::seize(pid)?)),
            None => None,
        };
        self.start_driver(j, rec, token, first, pidfd)?;
        info!(pid, uid = peer.uid, "registered a migratable process");
        Ok(pid)
    }

    /// A child `pid` of migratable process `parent` (at home, uid `uid`) becomes a
    /// migratable process of this node too, pinned or avoiding nodes as its parent. Not if
    /// it is gone, not that parent's child any more, or runs with other user IDs than its
    /// parent's user (a set-user-ID program).
    pub(crate) fn adopt_child(
        self: &Arc<Self>,
        pid: i32,
        parent: i32,
        uid: u32,
        pinned: bool,
        avoid: Vec<u32>,
    ) -> Result<()> {
        let pidfd = mosix_ckpt::sys::pidfd_open(pid)?;
        let st = start_time(pid).ok_or_else(|| anyhow!("process {pid} has gone"))?;
        if ppid_of(pid) != Some(parent) {
            bail!("process {pid} is not a child of {parent} any more");
        }
        let ids = super::rights::Rights::of(pid)
            .ok_or_else(|| anyhow!("process {pid} has gone"))?
            .uid;
        if ids.iter().any(|&u| u != uid) {
            bail!("process {pid} runs as {ids:?}, not as its parent's user {uid}");
        }
        // Its files are its parent's owner's (who registered the parent, by the socket).
        let owner = lock(&self.homes).get(&parent).and_then(|h| h.owner.clone());
        // Checked after the pidfd was opened: still that process if still alive.
        if start_time(pid) != Some(st) {
            bail!("process {pid} has gone");
        }
        let mut j = HomeJob::new(self.me(), pid, uid, String::new(), Instant::now());
        j.cmd = cmd_now(&j, pid);
        j.pinned = pinned;
        j.avoid = avoid;
        let token = new_token();
        let mut rec = Record::new(&j, st, &token);
        rec.owner = owner;
        if lock(&self.homes).contains_key(&pid) {
            return Ok(());
        }
        self.write_record(&rec);
        self.start_driver(j, rec, token, None, pidfd)?;
        info!(
            pid,
            parent, uid, "a child of {parent} is a migratable process"
        );
        Ok(())
    }

    pub(crate) fn start_driver(
        self: &Arc<Self>,
        j: HomeJob,
        rec: Record,
        token: String,
        first: Option<(u32, super::transfer::ExecWatch)>,
        pidfd: OwnedFd,
    ) -> Result<()> {
        let pid = j.pid;
        let (tx, rx) = mpsc::channel();
        let info = Arc::new(Mutex::new(snapshot(&j, pid)));
        let answers = Answers::default();
        let h = Handle {
            tx: tx.clone(),
            info: info.clone(),
            token: Arc::new(token),
            arenas: Arc::default(),
            answers: answers.clone(),
            owner: rec.owner.clone(),
        };
        lock(&self.homes).insert(pid, h);
        // Its end is heard at once (a thread waits on its pidfd).
        let watch = pidfd.try_clone()?;
        let wtx = tx.clone();
        std::thread::Builder::new()
            .name(format!("pid-{pid}"))
            .spawn(move || {
                let mut f = [nix::poll::PollFd::new(watch.as_fd(), nix::poll::PollFlags::POLLIN)];
                while !matches!(nix::poll::poll(&mut f, nix::poll::PollTimeout::NONE), Ok(n) if n > 0) {}
                let _ = wtx.send(HomeEv::Job(Ev::PidEnded));
            })?;
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("home-{pid}"))
            .spawn(move || {
                let ck = super::homeckpt::Ckpts::of(&rec);
                let mut d = Driver {
                    procs: me,
                    job: j,
                    rec,
                    rx,
                    tx,
                    info,
                    answers,
                    ck,
                    looked: None,
                };
                d.job.recovery = d.ck.recovery_number();
                if let Some((to, watch)) = first {
                    d.initial_move(to, watch);
                }
                d.run();
            })?;
        Ok(())
    }

    /// Finds the processes of this node's records again (after a restart of mosixd):
    /// those still alive, with their start time unchanged, are followed again; their
    /// deputies reconnect by themselves, their hosts link again.
    pub fn readopt_homes(self: &Arc<Self>) {
        let Ok(dir) = std::fs::read_dir(self.record_dir()) else {
            return;
        };
        for e in dir.flatten() {
            let Ok(text) = std::fs::read(e.path()) else {
                continue;
            };
            let Ok(r) = serde_json::from_slice::<Record>(&text) else {
                let _ = std::fs::remove_file(e.path());
                continue;
            };
            if start_time(r.pid) != Some(r.start_time) {
                self.remove_record(r.pid);
                continue;
            }
            if traced(r.pid) {
                // In the middle of a move (its mover holds it, and may ask this daemon
                // whether the destination runs it: doubt.rs) or of its rebuild here:
                // followed once that is over, without holding up the others.
                let me = self.clone();
                let pid = r.pid;
                lock(&self.readopting).insert(pid);
                let spawned = std::thread::Builder::new()
                    .name(format!("readopt-{pid}"))
                    .spawn(move || {
                        me.readopt_home(r);
                        lock(&me.readopting).remove(&pid);
                    });
                if let Err(e) = spawned {
                    lock(&self.readopting).remove(&pid);
                    warn!("no thread to follow a process again: {e}");
                }
                continue;
            }
            self.readopt_home(r);
        }
    }

    /// Follows again the process of record `r`, alive with the start time recorded.
    fn readopt_home(self: &Arc<Self>, mut r: Record) {
        let deputy = self.settle_place(&mut r);
        let now = Instant::now();
        let mut j = HomeJob::new(self.me(), r.pid, r.uid, r.cmd.clone(), now);
        j.pinned = r.pinned;
        j.avoid = r.avoid.clone();
        j.migrations = r.migrations;
        // Away, or here under a supervisor (recovered here): its deputy says so.
        if r.node != self.me() || deputy {
            j = j.away(r.node, r.epoch, now);
        }
        let token = r.token.clone();
        info!(
            pid = r.pid,
            node = r.node,
            "following process {} again",
            r.pid
        );
        let pidfd = match mosix_ckpt::sys::pidfd_open(r.pid) {
            Ok(fd) => fd,
            Err(e) => {
                warn!(pid = r.pid, "cannot watch process {}: {e}", r.pid);
                return;
            }
        };
        // The start time read before the pidfd was opened: still it if still alive.
        if start_time(r.pid) != Some(r.start_time) {
            self.remove_record(r.pid);
            return;
        }
        if let Err(e) = self.start_driver(j, r, token, None, pidfd) {
            warn!("{e:#}");
        }
    }

    /// A deputy introduced itself on `stream` (its first line read): it is the home half
    /// of process `home_pid` if the socket's peer is that very process and knows its token.
    pub fn deputy_hello(
        &self,
        stream: UnixStream,
        peer: &Peer,
        home_pid: i32,
        token: &str,
        arena: bool,
    ) -> Result<()> {
        let h = lock(&self.homes).get(&home_pid).cloned();
        let Some(h) = h else {
            if lock(&self.readopting).contains(&home_pid) {
                // (The deputy connects again: see mosix-deputy's NOT_YET.)
                bail!("process {home_pid} is {}", mosix_remote::deputy::NOT_YET);
            }
            bail!("no migratable process {home_pid} here");
        };
        if peer.pid != Some(home_pid) || *h.token != token {
            bail!("that is not the deputy of process {home_pid}");
        }
        mosix_remote::wire::roomy(&stream);
        let mut w = stream.try_clone()?;
        // An arena if it can take one (a new one on each connection: what the deputy
        // holds of an earlier one is its own).
        let arena = (arena && h.arenas.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < ARENAS)
            .then(|| Arena::new(arena::SIZE))
            .and_then(|a| a.inspect_err(|e| warn!("no arena for a deputy: {e}")).ok());
        let ok = b"{\"type\":\"deputy_ok\"}\n";
        match &arena {
            Some(a) => arena::send_line_with_fd(&w, ok, a.share()?.as_fd())?,
            None => w.write_all(ok)?,
        }
        let tx = h.tx.clone();
        std::thread::Builder::new()
            .name(format!("deputy-{home_pid}"))
            .spawn(move || {
                let mut r = std::io::BufReader::new(stream);
                loop {
                    match mosix_remote::wire::recv_bytes(&mut r) {
                        Ok(Some(f)) => {
                            if tx.send(HomeEv::Job(Ev::FromDeputy(f.into()))).is_err() {
                                return;
                            }
                        }
                        _ => {
                            let _ = tx.send(HomeEv::Job(Ev::DeputyGone));
                            return;
                        }
                    }
                }
            })?;
        h.send(Ev::DeputyConnected(DeputyConn {
            sock: w,
            arena: arena.map(|a| (a, 0)),
        }));
        debug!(pid = home_pid, "deputy connected");
        Ok(())
    }

    /// A host opened its link to a process of ours: its messages go to the driver until
    /// the link breaks.
    pub(crate) fn host_linked(&self, ch: Link, l: LinkHello) -> Result<()> {
        let h = lock(&self.homes).get(&l.home_pid).cloned();
        let Some(h) = h else {
            if lock(&self.readopting).contains(&l.home_pid) {
                // Found again after a restart, its move still being finished: the host
                // links again shortly.
                bail!(
                    "link for process {} before it is followed again",
                    l.home_pid
                );
            }
            // A process with no home here any more: end it there.
            let mut ch = ch;
            let _ = wire::send_flush(&mut ch, &ToHost::Kill);
            bail!("link for unknown process {}", l.home_pid);
        };
        let s2 = ch.get_ref().try_clone()?;
        ch.get_ref().set_read_timeout(None)?;
        let (mut r, w) = ch.split(s2)?;
        // Each link its own number: its job hears only the link it took.
        static LINKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = LINKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !h.send(Ev::HostLinked {
            epoch: l.epoch,
            node: l.node,
            id,
            link: HostLink(w),
        }) {
            bail!("process {} has ended", l.home_pid);
        }
        debug!(
            pid = l.home_pid,
            node = l.node,
            epoch = l.epoch,
            "host linked"
        );
        loop {
            match wire::recv_framed_by(
                &mut r,
                ToHome::DEPUTY,
                ToHome::Deputy,
                mosix_proto::channel::Channel::read_large,
            ) {
                Ok(Some(msg)) => {
                    let last = matches!(msg, ToHome::Left { .. });
                    if !h.send(Ev::FromHost { id, msg }) || last {
                        return Ok(());
                    }
                }
                Ok(None) | Err(_) => {
                    h.send(Ev::HostGone { id });
                    return Ok(());
                }
            }
        }
    }

    fn home(&self, pid: i32) -> Result<Handle> {
        lock(&self.homes).get(&pid).cloned().ok_or_else(|| {
            anyhow!(
                "no migratable process with PID {pid} on node {} (start it with mosrun; give its PID on its home node)",
                self.me()
            )
        })
    }

    /// `where`: 0 when home, else the node number.
    pub fn where_is(&self, pid: i32) -> Result<u32> {
        let n = lock(&self.home(pid)?.info).node;
        Ok(if n == self.me() { 0 } else { n })
    }

    /// `migrate PID checkpoint|chkstop|chkexit`: blocks until it is written.
    pub fn checkpoint(&self, pid: i32, then: After, uid: u32) -> Result<CkptDone> {
        let h = self.home(pid)?;
        let owner = lock(&h.info).uid;
        if uid != 0 && uid != owner {
            bail!(
                "process {pid} belongs to uid {owner}: you may only checkpoint your own processes"
            );
        }
        let (tx, rx) = mpsc::channel();
        if !h.send_home(HomeEv::Checkpoint { then, reply: tx }) {
            bail!("process {pid} has just ended");
        }
        match rx.recv_timeout(super::PEER_TIMEOUT * 5) {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(anyhow!("process {pid} was not checkpointed: {e}")),
            Err(_) => Err(anyhow!("no answer about the checkpoint of process {pid}")),
        }
    }

    /// `migrate PID freeze|continue`: whether it is frozen after it.
    pub fn freeze(&self, pid: i32, freeze: bool, uid: u32) -> Result<bool> {
        let h = self.home(pid)?;
        let owner = lock(&h.info).uid;
        if uid != 0 && uid != owner {
            bail!("process {pid} belongs to uid {owner}: you may only freeze your own processes");
        }
        let (tx, rx) = mpsc::channel();
        if !h.send_home(HomeEv::Freeze { freeze, reply: tx }) {
            bail!("process {pid} has just ended");
        }
        match rx.recv_timeout(super::PEER_TIMEOUT) {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(anyhow!(
                "process {pid} was not {}: {e}",
                if freeze { "frozen" } else { "continued" }
            )),
            Err(_) => Err(anyhow!("no answer about process {pid}")),
        }
    }

    /// `migrate PID NODE|0`: blocks until it runs there, or says why not.
    pub fn migrate(&self, pid: i32, to: u32, uid: u32) -> Result<super::Moved> {
        let h = self.home(pid)?;
        let owner = lock(&h.info).uid;
        if uid != 0 && uid != owner {
            bail!("process {pid} belongs to uid {owner}: you may only move your own processes");
        }
        let to = if to == 0 { self.me() } else { to };
        self.check_destination(to).map_err(|e| anyhow!("{e}"))?;
        // A move asked for just after another (its new host's link to us not up yet, or
        // the guest there still settling) is refused as busy for a moment: asked again
        // here, for a while, rather than handed to the user as "try again".
        let until = Instant::now() + BUSY_WAIT;
        loop {
            let (tx, rx) = mpsc::channel();
            if !h.migrate(to, "asked for by migrate".into(), None, Some(tx)) {
                bail!("process {pid} has just ended");
            }
            match rx.recv_timeout(super::PEER_TIMEOUT * 2) {
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) if is_busy(&e) && Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(Err(e)) => return Err(anyhow!("process {pid} was not moved: {e}")),
                Err(_) => return Err(anyhow!("no answer about the move of process {pid}")),
            }
        }
    }

    /// The deputy program's exec for process `pid`, with its close-on-exec descriptors
    /// (read while it is frozen) and `token`; `mark`: its image is checkpoint N (the
    /// deputy marks it at once).
    pub(crate) fn deputy_exec(&self, pid: i32, token: &str, mark: Option<u64>) -> DeputyExec {
        // A new deputy: the maps of arenas an earlier one had are gone with its memory.
        if let Some(h) = lock(&self.homes).get(&pid) {
            h.arenas.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        let mut argv = argv_of(pid);
        argv.truncate(64);
        if argv.is_empty() {
            argv.push("mosix-deputy".into());
        }
        let mut cloexec = Vec::new();
        let mut open = Vec::new();
        if let Ok(fds) = mosix_ckpt::procfs::fds(pid) {
            for f in fds {
                open.push(f.fd);
                if f.flags & libc::O_CLOEXEC != 0 {
                    cloexec.push(f.fd);
                }
            }
        }
        let closed: Vec<i32> = (0..3).filter(|f| !open.contains(f)).collect();
        let list = |v: &[i32]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut env = format!(
            "MOSIX_DEPUTY=sock={};pid={pid};token={token};cloexec={};closed={}",
            self.cfg.control_socket.display(),
            list(&cloexec),
            list(&closed)
        );
        if let Some(m) = mark {
            env.push_str(&format!(";mark={m}"));
        }
        let envp = vec![env];
        DeputyExec {
            path: self.deputy_path.to_string_lossy().into_owned(),
            argv,
            envp,
            cloexec,
        }
    }
}

/// Its command line as /proc shows it now (a child adopted before its exec has exec'd
/// since; a deputy keeps its process's argv), else as registered.
/// The arguments of `pid` as /proc shows them now (none if it is gone).
fn argv_of(pid: i32) -> Vec<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn cmd_now(j: &HomeJob, pid: i32) -> String {
    let now = argv_of(pid);
    if now.is_empty() {
        j.cmd.clone()
    } else {
        now.join(" ")
    }
}

/// `mosrun -C FILE -A MINUTES` makes sense: FILE absolute, MINUTES a positive number.
fn check_checkpoint_spec(c: &CheckpointSpec) -> Result<()> {
    if !c.file.starts_with('/') {
        bail!(
            "the checkpoint file must be an absolute path, not {}",
            c.file
        );
    }
    if let Some(m) = c.every_min {
        if !m.is_finite() || m <= 0.0 {
            bail!("minutes between checkpoints must be a positive number, not {m}");
        }
    }
    Ok(())
}

fn snapshot(j: &HomeJob, pid: i32) -> Snapshot {
    snapshot_with(j, pid, cmd_now(j, pid), ppid_of(pid))
}

/// The snapshot with its command line and parent as last read from /proc.
fn snapshot_with(j: &HomeJob, pid: i32, cmd: String, ppid: Option<i32>) -> Snapshot {
    Snapshot {
        pid,
        uid: j.uid,
        cmd,
        node: j.node(),
        state: match j.place {
            _ if j.frozen => "frozen",
            Where::Home => "running",
            Where::Leaving { .. } => "migrating",
            Where::Away { .. } => "away",
            Where::Recovering { .. } => "recovering",
        },
        since: j.since,
        reason: j.reason.clone(),
        pinned: j.pinned,
        avoid: j.avoid.clone(),
        migrations: j.migrations,
        moving: matches!(j.place, Where::Leaving { .. } | Where::Recovering { .. }) || j.frozen,
        ppid,
        epoch: j.epoch,
        native: j.native(),
        recovering: match j.place {
            Where::Recovering { epoch, .. } => Some(epoch),
            _ => None,
        },
    }
}

/// Held while a record is read and written again (a job's thread and its mover both
/// write it).
static RECORDS: Mutex<()> = Mutex::new(());

/// One home process's thread.
pub(super) struct Driver {
    pub(super) procs: Arc<Procs>,
    pub(super) job: HomeJob,
    pub(super) rec: Record,
    rx: Receiver<HomeEv>,
    pub(super) tx: Sender<HomeEv>,
    info: Arc<Mutex<Snapshot>>,
    answers: Answers,
    /// Its checkpoints (homeckpt.rs).
    pub(super) ck: super::homeckpt::Ckpts,
    /// Its command line and parent as last read from /proc, and when (read again every
    /// [`LOOK_EVERY`], not at every tick: with many processes those reads add up).
    looked: Option<(Instant, String, Option<i32>)>,
}

/// How often a driver reads its process's command line and parent again (for `ps`).
const LOOK_EVERY: Duration = Duration::from_secs(1);

const TICK: Duration = Duration::from_millis(200);
/// How often a host that gossip calls down is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);

impl Driver {
    fn run(&mut self) {
        let mut nodes_seen: Vec<(u32, bool)> = Vec::new();
        // (node, when, answered) of the last probe of a host that gossip calls down.
        let mut probed: Option<(u32, Instant, bool)> = None;
        while !self.job.ended() {
            let ev = self.rx.recv_timeout(TICK);
            let now = Instant::now();
            let mut acts = match ev {
                Ok(HomeEv::Job(e)) => self.job.handle(e, now),
                Ok(other) => {
                    self.on_ckpt_ev(other);
                    Vec::new()
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(d) = self.job.deputy() {
                        d.trim();
                    }
                    Vec::new()
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };

            if let Where::Away { node, .. } = self.job.place {
                // A node whose mosixd is down but whose machine answers is not dead:
                // its mosixd is restarting, and its guests (with their supervisors) live.
                let mut up = self.procs.node_up(node);
                if !up {
                    let answered = match probed {
                        Some((n, t, a)) if n == node && now.duration_since(t) < PROBE_EVERY => a,
                        _ => {
                            let a = self.procs.machine_answers(node);
                            probed = Some((node, now, a));
                            a
                        }
                    };
                    up = answered;
                }
                if !nodes_seen.contains(&(node, up)) {
                    nodes_seen = vec![(node, up)];
                    acts.extend(self.job.handle(Ev::NodeState { node, up }, now));
                }
            }
            acts.extend(self.job.tick(now));
            for a in acts {
                self.act(a);
            }
            self.periodic(now);
            self.update_snapshot();
            self.send_answers();
        }
        self.ended();
        lock(&self.procs.homes).remove(&self.job.pid);
        self.send_answers();
        self.procs.remove_record(self.job.pid);
        debug!(pid = self.job.pid, "process ended");
    }

    /// What `ps`, `where` and the balancer read of it, from the job (and /proc at most
    /// every [`LOOK_EVERY`]).
    fn update_snapshot(&mut self) {
        let now = Instant::now();
        let pid = self.job.pid;
        let (cmd, ppid) = match &self.looked {
            Some((t, c, p)) if now.duration_since(*t) < LOOK_EVERY => (c.clone(), *p),
            _ => {
                let (c, p) = (cmd_now(&self.job, pid), ppid_of(pid));
                self.looked = Some((now, c.clone(), p));
                (c, p)
            }
        };
        *lock(&self.info) = snapshot_with(&self.job, pid, cmd, ppid);
    }

    /// The answers to `migrate` given since the snapshot was last published.
    fn send_answers(&self) {
        for (tx, r) in std::mem::take(&mut *lock(&self.answers)) {
            let _ = tx.send(r);
        }
    }

    pub(super) fn persist(&mut self) {
        self.rec.node = self.job.node();
        self.rec.epoch = self.job.epoch;
        self.rec.migrations = self.job.migrations;
        self.rec.ckpt = self.ck.record();
        let moving = matches!(
            self.job.place,
            Where::Leaving { .. } | Where::Recovering { .. }
        );
        self.procs.persist_record(&mut self.rec, moving);
    }

    pub(super) fn act(&mut self, a: Act) {
        match a {
            Act::Leave { to, reason, offer } => self.leave(to, reason, offer, None),
            Act::Persist => {
                if self.job.native() {
                    // Its deputy, which held its marks, is the process again.
                    self.ck.came_home();
                    self.job.recovery = None;
                }
                self.after_recovery();
                self.residence_changed();
                self.persist()
            }
            Act::Recover { number, node } => self.recover(number, node),
            Act::Rewound { number, result } => self.rewound(number, result),
            Act::Marked { id, result } => self.marked(id, result),
            Act::CkptFailed { id, reason } => self.ckpt_failed(id, reason),
            Act::FreezeAnswer { freeze, error } => self.freeze_answer(freeze, error),
            Act::Lost { message } => {
                warn!("{message}");
                let f = mosix_remote::wire::encode(&mosix_remote::wire::ToDeputy::Lost { message });
                // Through the job, so it waits if the deputy is reconnecting.
                self.job.send_deputy(f.into());
            }
            Act::Forget => {}
        }
    }

    /// `mosrun -r/-b`: move it as soon as it has exec'd its program.
    fn initial_move(&mut self, to: u32, watch: super::transfer::ExecWatch) {
        self.job.place = Where::Leaving { to };
        *lock(&self.info) = snapshot(&self.job, self.job.pid);
        self.leave(to, "started there (mosrun -r/-b)".into(), None, Some(watch));
    }

    fn leave(
        &mut self,
        to: u32,
        reason: String,
        offer: Option<String>,
        watch: Option<super::transfer::ExecWatch>,
    ) {
        let procs = self.procs.clone();
        let tx = self.tx.clone();
        let ckpt = self.leave_checkpoint();
        let spec = super::transfer::HomeMove {
            pid: self.job.pid,
            to,
            epoch: self.job.epoch + 1,
            uid: self.job.uid,
            cmd: self.job.cmd.clone(),
            pinned: self.job.pinned,
            avoid: self.job.avoid.clone(),
            migrations: self.job.migrations + 1,
            reason,
            offer,
            token: self.rec.token.clone(),
            ckpt,
        };
        let pid = self.job.pid;
        let id = super::proc_id(procs.me(), pid);
        let auto = spec.offer.is_some();
        let why = crate::metrics::MoveReason::of_offer(spec.offer.as_deref());
        let r = std::thread::Builder::new()
            .name(format!("leave-{}", self.job.pid))
            .spawn(move || {
                let _boost = crate::balance::Boost::thread();
                let r = crate::metrics::migration(why, procs.leave_home(spec, watch));
                let ev = match r {
                    Ok(super::transfer::LeftHome {
                        moved,
                        signals,
                        ckpt,
                    }) => {
                        let _ = tx.send(HomeEv::Job(Ev::LeftHome { to, moved }));
                        // Signals that reached it while it became its deputy: passed on.
                        for sig in signals {
                            let f = mosix_remote::wire::encode(
                                &mosix_remote::wire::FromDeputy::Signal { sig },
                            );
                            let _ = tx.send(HomeEv::Job(Ev::FromDeputy(f.into())));
                        }
                        // Its checkpoint with this move is completed now (synced: slow).
                        if let Some(c) = ckpt {
                            let (id, result) = c.finish();
                            let _ = tx.send(HomeEv::CkptSaved { id, result });
                        }
                        return;
                    }
                    Err(err) => {
                        if auto {
                            procs.move_failed(id, to);
                        }
                        info!(pid, to, "it did not leave home: {err}");
                        Ev::LeaveFailed { to, err }
                    }
                };
                let _ = tx.send(HomeEv::Job(ev));
            });
        if let Err(e) = r {
            let now = Instant::now();
            let _ = self.job.handle(
                Ev::LeaveFailed {
                    to,
                    err: MoveError::Engine(format!("no thread for the move: {e}")),
                },
                now,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn start_time_and_parent_are_read_from_the_right_fields() {
        let me = std::process::id() as i32;
        let st = super::start_time(me).unwrap();
        assert!(st > 0, "field 22 (starttime) of a running process is not 0");
        assert_eq!(super::ppid_of(me), Some(nix::unistd::getppid().as_raw()));
        // A child started after us started later.
        let mut c = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let child = super::start_time(c.id() as i32).unwrap();
        assert!(child >= st);
        assert_eq!(super::ppid_of(c.id() as i32), Some(me));
        let _ = c.kill();
        let _ = c.wait();
    }

    /// A large write behind goes to the deputy as a piece of its arena (the same bytes,
    /// told where), a small one and anything else as it came; a full arena, too.
    #[test]
    fn large_writes_behind_go_to_the_deputy_through_its_arena() {
        use super::job::ToDeputySink;
        use super::{arena, Arena, DeputyConn};
        use mosix_remote::wire::ToDeputy;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let arena = Arena::new(1 << 20).unwrap();
        let map = arena::ArenaMap::open(&arena.share().unwrap()).unwrap();
        let mut conn = DeputyConn {
            sock: a,
            arena: Some((arena, 0)),
        };
        let behind = |len: usize, v: u8| {
            mosix_remote::wire::encode(&ToDeputy::Behind {
                stream: 3,
                n: 9,
                off: Some(5),
                data: vec![v; len].into(),
            })
        };
        // (Read by a thread of its own: a write as it came may not fit in the socket.)
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(b);
            while let Ok(Some(f)) = mosix_remote::wire::recv_bytes(&mut r) {
                let _ = tx.send(ToDeputy::decode_shared(f.into()).unwrap());
            }
        });
        let next = || rx.recv().unwrap();
        // Large: in the arena.
        assert!(conn.send(&behind(600 << 10, 7)));
        let ToDeputy::BehindInArena {
            stream: 3,
            n: 9,
            off: Some(5),
            at,
            len,
            piece: 0,
        } = next()
        else {
            panic!("not in the arena");
        };
        let p = map.piece(at, len, 0).unwrap();
        assert!(p.len() == 600 << 10 && p.iter().all(|&x| x == 7));
        // Small, or no room left while the first is held: as it came.
        for (len, v) in [(100, 1), (600 << 10, 8)] {
            assert!(conn.send(&behind(len, v)));
            let ToDeputy::Behind { data, .. } = next() else {
                panic!("not as it came");
            };
            assert!(data.len() == len && data.iter().all(|&x| x == v));
        }
        // Done with the first: room again.
        drop(p);
        assert!(conn.send(&behind(600 << 10, 9)));
        assert!(matches!(next(), ToDeputy::BehindInArena { piece: 1, .. }));
        assert!(conn.send(&mosix_remote::wire::encode(&ToDeputy::Cancel { seq: 4 })));
        assert!(matches!(next(), ToDeputy::Cancel { seq: 4 }));
    }

    #[test]
    fn a_move_refused_as_busy_here_or_by_its_host_is_asked_again() {
        use super::super::MoveError;
        assert!(super::is_busy(&MoveError::Busy));
        assert!(super::is_busy(&MoveError::Failed {
            reason: MoveError::Busy.to_string()
        }));
        assert!(!super::is_busy(&MoveError::Failed {
            reason: "no room there".into()
        }));
        assert!(!super::is_busy(&MoveError::Frozen));
    }
}
