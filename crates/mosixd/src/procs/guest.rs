//! Processes of other homes running here (guests): one driver thread each, between the
//! guest's supervisor (its connection) and its home (a link this node opens, again and
//! again while it breaks); it starts moves of the guest on (asked for by home, by the
//! balancer, or by the guest itself when it makes a call that needs home).

use super::supervisor::{self, FromSup, ToSup};
use super::ways::{read_supervisor, HomeWay, Ways};
use super::{lock, proc_id, Link, MoveError, Moved, Procs, Snapshot};
use anyhow::Result;
use mosix_proto::wire::{self, CkptError, Hello, LinkHello, MigrateHeader, ToHome, ToHost};
use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Who asked for a move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Its home (`migrate` there): the answer goes back to it.
    Home,
    /// The balancer here.
    Auto,
    /// The guest itself (a call that needs home).
    Itself,
}

/// What a quiesced guest says: the calls done for it meanwhile, its next sequence number,
/// its descriptors of its own /proc.
/// A guest's calls at home settled for a move or a checkpoint (see [`FromSup::Quiesced`]).
pub struct Quiesced {
    /// Calls done at home meanwhile: (TID, result), for its registers.
    pub completed: Vec<(i32, i64)>,
    pub next_seq: u64,
    pub proc_fds: Vec<(i32, String)>,
    /// Its working directory at home, as its host knew it.
    pub cwd: Option<String>,
}
type QuiesceReply = Sender<Result<Quiesced, MoveError>>;

/// What a guest's driver is told.
pub enum GuestEv {
    FromSup(FromSup),
    SupGone,
    FromHome(ToHost),
    /// A link to home (its number: a link that is replaced may still report its end).
    LinkUp(Link, u64),
    LinkDown(u64),
    Migrate {
        to: u32,
        reason: String,
        offer: Option<String>,
    },
    Quiesce(QuiesceReply),
    MoveDone {
        to: u32,
        origin: Origin,
        r: Result<Moved, MoveError>,
    },
    /// Checkpoint `id` is done here (its image is home, or it failed).
    CkptDone {
        id: u64,
        r: Result<super::checkpoint::CkptDone, CkptError>,
    },
    /// `chkexit`: its supervisor must know it is being ended (answered once told).
    CkptKill(Sender<()>),
}

/// The way to a guest's driver.
#[derive(Clone)]
pub struct Handle {
    tx: Sender<GuestEv>,
    pub info: Arc<Mutex<Snapshot>>,
}

impl Handle {
    pub fn migrate(&self, to: u32, reason: String, offer: Option<String>) -> bool {
        self.tx.send(GuestEv::Migrate { to, reason, offer }).is_ok()
    }
}

impl Procs {
    /// A guest arrived and runs: its supervisor is `sup`.
    pub(crate) fn start_guest(
        self: &Arc<Self>,
        sup: UnixStream,
        h: MigrateHeader,
        host_pid: i32,
    ) -> Result<()> {
        let reason = format!("from node {}: {}", h.from, h.reason);
        self.drive_guest(sup, h, host_pid, reason, false)
    }

    fn drive_guest(
        self: &Arc<Self>,
        sup: UnixStream,
        h: MigrateHeader,
        host_pid: i32,
        reason: String,
        readopted: bool,
    ) -> Result<()> {
        // Room for whole frames of its calls' data (see mosix_remote::wire::roomy).
        mosix_remote::wire::roomy(&sup);
        let (tx, rx) = mpsc::channel();
        let info = Arc::new(Mutex::new(Snapshot {
            pid: host_pid,
            uid: h.uid,
            cmd: h.cmd.clone(),
            node: self.me(),
            state: "running",
            since: Instant::now(),
            reason,
            pinned: h.pinned,
            avoid: h.avoid.clone(),
            migrations: h.migrations,
            moving: false,
            ppid: None,
            epoch: h.epoch,
            native: false,
            recovering: None,
        }));
        let key = (h.home, h.home_pid);
        lock(&self.guests).insert(
            key,
            Handle {
                tx: tx.clone(),
                info: info.clone(),
            },
        );
        let ways = Arc::new(Ways {
            home: Mutex::new(HomeWay {
                link: None,
                to_home: VecDeque::new(),
                relink: readopted,
            }),
            sup: Mutex::new(sup.try_clone()?),
        });
        // The supervisor's messages come in on a thread of their own, which passes the
        // deputy's frames home itself.
        let r = sup.try_clone()?;
        let (stx, w2) = (tx.clone(), ways.clone());
        std::thread::Builder::new()
            .name(format!("sup-{}", h.home_pid))
            .spawn(move || read_supervisor(r, &w2, &stx))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("guest-{}", h.home_pid))
            .spawn(move || {
                let _ = sup;
                let mut d = GuestDriver {
                    procs: me,
                    h,
                    host_pid,
                    ways,
                    rx,
                    tx,
                    info,
                    last_try: None,
                    moving: false,
                    quiesce: None,
                    home_wanted: None,
                    home_next: None,
                    home_tries: 0,
                    marking: None,
                    freezer: None,
                    link_no: 0,
                    home_down_seen: false,
                    checkpointing: false,
                    queued_move: None,
                };
                d.run();
                lock(&d.procs.guests).remove(&key);
            })?;
        Ok(())
    }

    /// Finds the supervisors of guests again (after a restart of mosixd).
    pub fn readopt_guests(self: &Arc<Self>) {
        let dir = self.cfg.state_dir.join("guests");
        let _ = std::fs::create_dir_all(&dir);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut later: Vec<std::path::PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .filter(|p| !self.readopt(p))
            .collect();
        if later.is_empty() {
            return;
        }
        // A supervisor too busy to say who it is within its time (a loaded machine) is
        // asked again, every second for a minute: left alone, its process's end would
        // never reach its home.
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("readopt".into())
            .spawn(move || {
                for _ in 0..60 {
                    std::thread::sleep(Duration::from_secs(1));
                    later.retain(|p| !me.readopt(p));
                    if later.is_empty() {
                        return;
                    }
                }
                for p in later {
                    warn!(
                        "{} never introduced itself: its guest is not supervised here",
                        p.display()
                    );
                }
            });
    }

    /// Supervises the guest of supervisor socket `p` again; false: ask again later (it
    /// did not introduce itself in time).
    fn readopt(self: &Arc<Self>, p: &std::path::Path) -> bool {
        let Ok(mut s) = UnixStream::connect(p) else {
            // Nobody listens there any more: its supervisor is gone.
            let _ = std::fs::remove_file(p);
            return true;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        match supervisor::recv::<FromSup>(&mut s) {
            Ok(FromSup::Hello { header, host_pid }) => {
                let _ = s.set_read_timeout(None);
                info!(
                    home = header.home,
                    home_pid = header.home_pid,
                    host_pid,
                    "supervising guest again"
                );
                let reason = format!("from node {}: {}", header.from, header.reason);
                if let Err(e) = self.drive_guest(s, header, host_pid, reason, true) {
                    warn!("{e:#}");
                }
                true
            }
            _ => {
                warn!("{} did not introduce itself (yet)", p.display());
                false
            }
        }
    }
}

struct GuestDriver {
    procs: Arc<Procs>,
    h: MigrateHeader,
    host_pid: i32,
    ways: Arc<Ways>,
    rx: Receiver<GuestEv>,
    tx: Sender<GuestEv>,
    info: Arc<Mutex<Snapshot>>,
    last_try: Option<Instant>,
    moving: bool,
    quiesce: Option<QuiesceReply>,
    /// A call of it needs home (why), until it is there; when to try next, and the
    /// failed tries so far.
    home_wanted: Option<String>,
    home_next: Option<Instant>,
    home_tries: u32,
    /// A checkpoint is being taken: its deputy marks it once its calls are settled.
    marking: Option<u64>,
    /// Frozen by `migrate PID freeze`.
    freezer: Option<super::checkpoint::Freezer>,
    /// A checkpoint is being taken (a move asked by home meanwhile waits for its end).
    checkpointing: bool,
    queued_move: Option<(u32, String)>,
    /// The number of the current link to home.
    link_no: u64,
    /// Its home was seen down since the link was made.
    home_down_seen: bool,
}

const TICK: Duration = Duration::from_millis(200);
const LINK_RETRY: Duration = Duration::from_secs(1);
/// How long an ended guest's driver keeps trying to tell its home.
const END_WAIT: Duration = Duration::from_secs(60);

impl GuestDriver {
    fn run(&mut self) {
        loop {
            self.check_home();
            self.keep_linked();
            let ev = match self.rx.recv_timeout(TICK) {
                Ok(e) => e,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.retry_home();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            match ev {
                GuestEv::FromSup(m) => match m {
                    FromSup::Deputy(f) => self.home(ToHome::Deputy(f)),
                    // (Taken by the supervisor's reading thread.)
                    FromSup::Arena { .. } | FromSup::DeputyInArena { .. } => {}
                    FromSup::GoHome { why } => {
                        self.home_wanted = Some(why);
                        self.retry_home();
                    }
                    FromSup::Unquiesced { why } => {
                        if let Some(r) = self.quiesce.take() {
                            let _ = r.send(Err(MoveError::Engine(why)));
                        }
                    }
                    FromSup::Quiesced {
                        completed,
                        next_seq,
                        proc_fds,
                        cwd,
                    } => {
                        if let Some(id) = self.marking.take() {
                            // Every call of it is settled and it is held: its deputy keeps
                            // this point (after every frame the supervisor sent before).
                            let f =
                                mosix_remote::wire::encode(&mosix_remote::wire::ToDeputy::Mark {
                                    id,
                                });
                            self.home(ToHome::Deputy(f.into()));
                        }
                        if let Some(r) = self.quiesce.take() {
                            let _ = r.send(Ok(Quiesced {
                                completed,
                                next_seq,
                                proc_fds,
                                cwd,
                            }));
                        }
                    }
                    FromSup::Exited => {
                        self.finish_home();
                        debug!(pid = self.h.home_pid, "guest ended");
                        return;
                    }
                    FromSup::Hello { .. } | FromSup::Ready { .. } | FromSup::Refused(_) => {}
                    FromSup::Running | FromSup::Filled => {}
                    FromSup::ImageRead { .. } | FromSup::LinkLost(_) => {}
                },
                GuestEv::SupGone => {
                    if self.moving {
                        continue;
                    }
                    // Its supervisor died, and the process with it: say so at home.
                    let f = mosix_remote::wire::encode(&mosix_remote::wire::ToDeputy::Lost {
                        message: format!(
                            "mosix: process {} was lost: its supervisor on node {} ended",
                            self.h.home_pid,
                            self.procs.me()
                        ),
                    });
                    self.home(ToHome::Deputy(f.into()));
                    self.finish_home();
                    return;
                }
                GuestEv::FromHome(m) => match m {
                    ToHost::Deputy(f) => self.sup(ToSup::Deputy(f)),
                    ToHost::Migrate { to } => {
                        self.start_move(to, "asked for by migrate".into(), None, Origin::Home)
                    }
                    ToHost::Kill => {
                        if let Some(f) = self.freezer.take() {
                            f.release();
                        }
                        // A checkpoint or move waiting for its calls to settle will not
                        // have them: it ends.
                        if let Some(r) = self.quiesce.take() {
                            let _ = r.send(Err(MoveError::Ended));
                        }
                        self.sup(ToSup::Kill)
                    }
                    ToHost::Checkpoint { id, then } => self.start_checkpoint(id, then),
                    ToHost::Freeze { freeze } => self.freeze(freeze),
                },
                GuestEv::LinkUp(l, n) => {
                    if n != self.link_no {
                        continue;
                    }
                    let relink = {
                        let mut w = lock(&self.ways.home);
                        w.link = Some(l);
                        w.flush();
                        std::mem::take(&mut w.relink)
                    };
                    if relink {
                        self.sup(ToSup::Relinked);
                    }
                }
                GuestEv::LinkDown(n) => {
                    if n == self.link_no {
                        let mut w = lock(&self.ways.home);
                        w.link = None;
                        w.relink = true;
                    }
                }
                GuestEv::Migrate { to, reason, offer } => {
                    self.start_move(to, reason, offer, Origin::Auto)
                }
                GuestEv::Quiesce(reply) => {
                    self.quiesce = Some(reply);
                    self.sup(ToSup::Quiesce);
                }
                GuestEv::CkptKill(ack) => {
                    self.sup(ToSup::Kill);
                    let _ = ack.send(());
                }
                GuestEv::CkptDone { id, r } => {
                    self.moving = false;
                    self.checkpointing = false;
                    self.marking = None;
                    lock(&self.info).moving = false;
                    self.sup(ToSup::Thaw);
                    match r {
                        Ok(d) => debug!(
                            pid = self.h.home_pid,
                            frozen_ms = d.frozen_ms,
                            "checkpoint {id} taken: {}",
                            d.path
                        ),
                        Err(reason) => {
                            info!(pid = self.h.home_pid, "checkpoint {id} not taken: {reason}");
                            self.home(ToHome::CheckpointFailed { id, reason });
                        }
                    }
                    if let Some((to, reason)) = self.queued_move.take() {
                        self.start_move(to, reason, None, Origin::Home);
                    }
                }
                GuestEv::MoveDone { to, origin, r } => {
                    self.moving = false;
                    lock(&self.info).moving = false;
                    match r {
                        Ok(m) => {
                            self.sup(ToSup::Moved);
                            self.home(ToHome::Left {
                                to,
                                frozen_ms: m.frozen_ms,
                                memory_bytes: m.memory_bytes,
                                rounds: m.rounds,
                            });
                            self.flush_home();
                            return;
                        }
                        Err(e) => {
                            self.sup(ToSup::Thaw);
                            info!(pid = self.h.home_pid, to, "move not done: {e}");
                            match origin {
                                Origin::Home => self.home(ToHome::MigrateFailed {
                                    to,
                                    reason: e.to_string(),
                                }),
                                Origin::Auto => self
                                    .procs
                                    .move_failed(proc_id(self.h.home, self.h.home_pid), to),
                                Origin::Itself => warn!(
                                    pid = self.h.home_pid,
                                    "it needs home and cannot go there: {e}"
                                ),
                            }
                        }
                    }
                }
            }
        }
    }

    fn sup(&mut self, m: ToSup) {
        self.ways.sup(&m);
    }

    fn home(&mut self, m: ToHome) {
        self.ways.home(m);
    }

    fn flush_home(&mut self) {
        lock(&self.ways.home).flush();
    }

    /// Its last frames (its end) reach home before its driver ends: a link that is down
    /// (just shut to be made again, or broken) is made again, for at most [`END_WAIT`],
    /// unless home says it has no such process any more. (They were dropped when the
    /// process ended just as a restarted mosixd made its link again: its deputy never heard
    /// of its end, seen in the fault runs.)
    fn finish_home(&mut self) {
        let end = Instant::now() + END_WAIT;
        loop {
            self.flush_home();
            if lock(&self.ways.home).to_home.is_empty() {
                return;
            }
            if Instant::now() >= end {
                warn!(
                    pid = self.h.home_pid,
                    "its end could not be told to its home within {END_WAIT:?}"
                );
                return;
            }
            self.keep_linked();
            match self.rx.recv_timeout(TICK) {
                Ok(GuestEv::LinkUp(l, n)) if n == self.link_no => {
                    lock(&self.ways.home).link = Some(l);
                }
                // Home has no such process any more (its job ended there).
                Ok(GuestEv::FromHome(ToHost::Kill)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// A home that was down (by gossip) and is up again may have given this copy up
    /// meanwhile (a partition: its process recovered elsewhere) with its link still open on
    /// both sides: the link is made again, and home ends this copy if it is not the
    /// process any more (or takes it back, calls resent, if it is).
    fn check_home(&mut self) {
        let up = self.procs.node_up(self.h.home);
        if !up {
            self.home_down_seen = true;
            return;
        }
        // In the middle of a move or a checkpoint the link is left as it is: home follows
        // the move by it (a link that drops then puts the move in doubt).
        if self.moving {
            return;
        }
        if std::mem::take(&mut self.home_down_seen) {
            let mut w = lock(&self.ways.home);
            if let Some(l) = w.link.take() {
                info!(pid = self.h.home_pid, "its home is back: linking again");
                let _ = l.get_ref().shutdown(std::net::Shutdown::Both);
                w.relink = true;
                self.last_try = None;
            }
        }
    }

    /// Opens the link to home when there is none (at most once per LINK_RETRY).
    fn keep_linked(&mut self) {
        // Busy: a reading thread is sending on the link (and may wait on it): it is there.
        let linked = match self.ways.home.try_lock() {
            Ok(w) => w.link.is_some(),
            Err(std::sync::TryLockError::WouldBlock) => true,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().link.is_some(),
        };
        if linked || self.last_try.is_some_and(|t| t.elapsed() < LINK_RETRY) {
            return;
        }
        self.last_try = Some(Instant::now());
        let r = (|| -> Result<(Link, Link)> {
            let mut ch = self.procs.connect(self.h.home)?;
            wire::send_flush(
                &mut ch,
                &Hello::Link(LinkHello {
                    home_pid: self.h.home_pid,
                    epoch: self.h.epoch,
                    node: self.procs.me(),
                }),
            )?;
            ch.get_ref().set_read_timeout(None)?;
            let s2 = ch.get_ref().try_clone()?;
            Ok(ch.split(s2)?)
        })();
        match r {
            Ok((mut rd, w)) => {
                let tx = self.tx.clone();
                self.link_no += 1;
                let no = self.link_no;
                let ways = self.ways.clone();
                let _ = std::thread::Builder::new()
                    .name(format!("link-{}", self.h.home_pid))
                    .spawn(move || loop {
                        match wire::recv_framed_by(
                            &mut rd,
                            ToHost::DEPUTY,
                            ToHost::Deputy,
                            mosix_proto::channel::Channel::read_large,
                        ) {
                            // The deputy's frames go to the supervisor from here.
                            Ok(Some(ToHost::Deputy(f))) => ways.sup(&ToSup::Deputy(f)),
                            Ok(Some(m)) => {
                                if tx.send(GuestEv::FromHome(m)).is_err() {
                                    return;
                                }
                            }
                            _ => {
                                let _ = tx.send(GuestEv::LinkDown(no));
                                return;
                            }
                        }
                    });
                let _ = self.tx.send(GuestEv::LinkUp(w, no));
            }
            Err(e) => debug!(home = self.h.home, "no link to home yet: {e:#}"),
        }
    }

    /// A call of it needs home: move it there, again (ever less often, up to every 10 s)
    /// until it is: it cannot go on without.
    fn retry_home(&mut self) {
        if self.home_next.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if let (Some(why), false) = (self.home_wanted.clone(), self.moving) {
            let home = self.h.home;
            self.home_tries += 1;
            let wait =
                Duration::from_millis(200 << self.home_tries.min(6)).min(Duration::from_secs(10));
            self.home_next = Some(Instant::now() + wait);
            self.start_move(home, format!("back home: {why}"), None, Origin::Itself);
        }
    }

    /// Checkpoint `id` asked for by home: taken by a thread (see checkpoint.rs).
    fn start_checkpoint(&mut self, id: u64, then: mosix_proto::control::After) {
        let busy = if self.moving {
            Some(CkptError::Moving)
        } else if self.freezer.is_some() {
            Some(CkptError::Frozen)
        } else {
            None
        };
        if let Some(reason) = busy {
            self.home(ToHome::CheckpointFailed { id, reason });
            return;
        }
        self.moving = true;
        self.checkpointing = true;
        self.marking = Some(id);
        lock(&self.info).moving = true;
        let procs = self.procs.clone();
        let tx = self.tx.clone();
        let pid = self.host_pid;
        let h = self.h.clone();
        let r = std::thread::Builder::new()
            .name(format!("ckpt-{}", self.h.home_pid))
            .spawn(move || {
                let qtx = tx.clone();
                let mut quiesce = || -> Result<Quiesced, MoveError> {
                    let (rtx, rrx) = mpsc::channel();
                    qtx.send(GuestEv::Quiesce(rtx))
                        .map_err(|_| MoveError::Engine("its driver is gone".into()))?;
                    rrx.recv_timeout(Duration::from_secs(20))
                        .unwrap_or(Err(MoveError::Engine(
                            "its calls at home did not settle in time".into(),
                        )))
                };
                let ktx = tx.clone();
                let mut kill = || {
                    let (atx, arx) = mpsc::channel();
                    if ktx.send(GuestEv::CkptKill(atx)).is_ok() {
                        let _ = arx.recv_timeout(Duration::from_secs(5));
                    }
                };
                let r = procs.checkpoint_guest(pid, &h, id, then, &mut quiesce, &mut kill);
                let _ = tx.send(GuestEv::CkptDone { id, r });
            });
        if r.is_err() {
            self.moving = false;
            self.checkpointing = false;
            self.marking = None;
            lock(&self.info).moving = false;
            self.home(ToHome::CheckpointFailed {
                id,
                reason: CkptError::NoThread,
            });
        }
    }

    /// `migrate PID freeze|continue` asked by home.
    fn freeze(&mut self, freeze: bool) {
        let error = if freeze {
            if self.freezer.is_some() {
                None
            } else if self.moving {
                Some(CkptError::Moving)
            } else {
                match super::checkpoint::Freezer::start(self.host_pid) {
                    Ok(f) => {
                        self.freezer = Some(f);
                        lock(&self.info).state = "frozen";
                        lock(&self.info).moving = true;
                        None
                    }
                    Err(e) => Some(e),
                }
            }
        } else {
            match self.freezer.take() {
                Some(f) => {
                    f.release();
                    lock(&self.info).state = "running";
                    lock(&self.info).moving = false;
                }
                // Not frozen: stopped (chkstop, SIGSTOP) perhaps; it goes on.
                None => {
                    let _ = mosix_ckpt::sys::kill(self.host_pid, libc::SIGCONT);
                }
            }
            None
        };
        let ok = error.is_none();
        self.home(ToHome::Frozen {
            freeze: if ok { freeze } else { self.freezer.is_some() },
            error,
        });
    }

    fn start_move(&mut self, to: u32, reason: String, offer: Option<String>, origin: Origin) {
        if self.freezer.is_some() {
            if origin == Origin::Home {
                self.home(ToHome::MigrateFailed {
                    to,
                    reason: MoveError::Frozen.to_string(),
                });
            }
            return;
        }
        if self.moving {
            if origin == Origin::Home && self.checkpointing && self.queued_move.is_none() {
                // Its checkpoint ends soon: the move follows it.
                self.queued_move = Some((to, reason));
                return;
            }
            if origin == Origin::Home {
                self.home(ToHome::MigrateFailed {
                    to,
                    reason: MoveError::Busy.to_string(),
                });
            }
            return;
        }
        // A process recovered at its home runs there under a supervisor, as away: it may
        // still come home for real (rebuilt inside its deputy).
        if to == self.procs.me() && self.h.home != to {
            if origin == Origin::Home {
                self.home(ToHome::MigrateFailed {
                    to,
                    reason: MoveError::AlreadyThere { to }.to_string(),
                });
            }
            return;
        }
        self.moving = true;
        lock(&self.info).moving = true;
        let mut header = self.h.clone();
        header.from = self.procs.me();
        header.epoch = self.h.epoch + 1;
        header.migrations = self.h.migrations + 1;
        header.reason = reason;
        header.offer = offer;
        let procs = self.procs.clone();
        let tx = self.tx.clone();
        let pid = self.host_pid;
        let why = crate::metrics::MoveReason::of_offer(header.offer.as_deref());
        let r = std::thread::Builder::new()
            .name(format!("move-{}", self.h.home_pid))
            .spawn(move || {
                let _boost = crate::balance::Boost::thread();
                let qtx = tx.clone();
                let mut quiesce = || -> Result<Quiesced, MoveError> {
                    let (rtx, rrx) = mpsc::channel();
                    qtx.send(GuestEv::Quiesce(rtx))
                        .map_err(|_| MoveError::Engine("its driver is gone".into()))?;
                    rrx.recv_timeout(Duration::from_secs(20))
                        .unwrap_or(Err(MoveError::Engine(
                            "its calls at home did not settle in time".into(),
                        )))
                };
                let r =
                    crate::metrics::migration(why, procs.leave_host(pid, to, header, &mut quiesce));
                let _ = tx.send(GuestEv::MoveDone { to, origin, r });
            });
        if r.is_err() {
            self.moving = false;
            lock(&self.info).moving = false;
        }
    }
}
