//! A home process's checkpoints, as its driver (home.rs) keeps them: when one is taken
//! (`mosrun -A`, `migrate PID checkpoint|chkstop|chkexit`, with each move from home), what
//! is pending, which one it can be recovered from, freezing, and its recovery when its
//! host dies (job.rs decides that; this brings it about).
//!
//! A checkpoint it can be recovered from is one whose file is written and whose mark its
//! deputy holds (taken away from home, or with a move from home): its deputy can then be
//! put back to that point (descriptors, offsets, what went out and came in since: see
//! mosix-remote's marks.rs) and the image restored with it, away or here.

use super::checkpoint::{CkptDone, Freezer};
use super::ckptfile::{self, CkptInfo, Owner, Target};
use super::ckptplan::{self, Place, Start, Waited};
use super::home::{CkptRecord, Driver, HomeEv, Record};
use super::job::{Ev, Where};
use mosix_proto::control::After;
use mosix_proto::wire::{CkptError, ToHost};
use mosix_remote::wire::{MarkError, MarkedAt, ToDeputy};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A checkpoint that takes longer than this is given up.
const CKPT_DEADLINE: Duration = Duration::from_secs(600);

type Reply = Sender<Result<CkptDone, CkptError>>;
/// Why its image failed (if it did), and the receiving thread waiting for the rest.
type ImageIn = (Option<CkptError>, Sender<Result<CkptInfo, CkptError>>);

struct Conf {
    base: PathBuf,
    every_min: Option<f64>,
}

/// A checkpoint being taken.
struct Pending {
    id: u64,
    then: After,
    target: Target,
    waiters: Vec<Reply>,
    started: Instant,
    taken_ms: u64,
    /// Taken by its host (else here).
    away: bool,
    /// The residence whose host was asked to take it (when away).
    epoch: u64,
    /// Its host has begun sending its image (it comes, or its receiving thread fails).
    incoming: bool,
    /// The deputy's answer to its mark.
    marked: Option<Result<MarkedAt, MarkError>>,
    /// Its image arrived (or failed): the receiving thread waits for the rest.
    image: Option<ImageIn>,
}

impl Pending {
    /// Whether it was asked of a host that is not its host any more and its image has not
    /// come: it never will (the request or the host's answer went with the old residence).
    fn outlived(&self, native: bool, epoch: u64) -> bool {
        let image = self.image.is_some();
        ckptplan::outlived(self.away, self.incoming, image, self.epoch, native, epoch)
    }
}

/// A home process's checkpoints.
pub(super) struct Ckpts {
    conf: Option<Conf>,
    next: u64,
    last: Instant,
    pending: Option<Pending>,
    /// Written checkpoints that have a mark: number → (file, when taken in ms).
    saved: BTreeMap<u64, (String, u64)>,
    /// Marks its deputy confirmed.
    marked: BTreeSet<u64>,
    /// The one it can be recovered from.
    recovery: Option<(u64, String, u64)>,
    freezer: Option<Freezer>,
    freeze_reply: Option<Sender<Result<bool, CkptError>>>,
    /// A recovery in progress: (checkpoint, file, when taken, the dead host).
    recovering: Option<(u64, String, u64, u32)>,
    /// Checkpoints asked for while its host was not linked (just after a move): taken
    /// once it is, or refused after [`LINK_WAIT`].
    waiting: Vec<(After, Reply, Instant)>,
}

impl Ckpts {
    pub(super) fn of(rec: &Record) -> Ckpts {
        let c = rec.ckpt.clone();
        let mut k = Ckpts {
            conf: c.as_ref().map(|c| Conf {
                base: PathBuf::from(&c.base),
                every_min: c.every_min,
            }),
            next: c.as_ref().map_or(1, |c| c.next.max(1)),
            last: Instant::now(),
            pending: None,
            saved: BTreeMap::new(),
            marked: BTreeSet::new(),
            recovery: None,
            freezer: None,
            freeze_reply: None,
            recovering: None,
            waiting: Vec::new(),
        };
        if let Some((n, p, t)) = c.and_then(|c| c.recovery) {
            k.saved.insert(n, (p.clone(), t));
            k.marked.insert(n);
            k.recovery = Some((n, p, t));
        }
        k
    }

    pub(super) fn recovery_number(&self) -> Option<u64> {
        self.recovery.as_ref().map(|r| r.0)
    }

    pub(super) fn record(&self) -> Option<CkptRecord> {
        self.conf.as_ref().map(|c| CkptRecord {
            base: c.base.to_string_lossy().into_owned(),
            every_min: c.every_min,
            next: self.next,
            recovery: self.recovery.clone(),
        })
    }

    /// Its deputy is the process again: no mark is held any more.
    pub(super) fn came_home(&mut self) {
        self.saved.clear();
        self.marked.clear();
        self.recovery = None;
    }

    fn every(&self) -> Option<Duration> {
        self.conf
            .as_ref()
            .and_then(|c| c.every_min)
            .map(|m| Duration::from_secs_f64(m * 60.0))
    }
}

/// Whether process `pid` is stopped (SIGSTOP, Ctrl-Z, chkstop): not checkpointed then.
fn stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        == Some('T')
}

fn deputy_frame(m: &ToDeputy) -> Vec<u8> {
    mosix_remote::wire::encode(m)
}

impl Driver {
    pub(super) fn on_ckpt_ev(&mut self, ev: HomeEv) {
        match ev {
            HomeEv::Job(_) => {}
            HomeEv::Checkpoint { then, reply } => self.start_checkpoint(then, Some(reply)),
            HomeEv::Freeze { freeze, reply } => self.freeze(freeze, reply),
            HomeEv::CkptIncoming {
                id,
                epoch,
                node,
                reply,
            } => {
                let here = self.job.place == Where::Away { node, epoch };
                let t = match &mut self.ck.pending {
                    Some(p) if p.id == id && p.away && here => {
                        p.incoming = true;
                        Some(p.target.clone())
                    }
                    _ => None,
                };
                let _ = reply.send(t);
            }
            HomeEv::CkptImage { id, failed, reply } => match &mut self.ck.pending {
                Some(p) if p.id == id => {
                    p.image = Some((failed, reply));
                    self.try_complete();
                }
                _ => {
                    let _ = reply.send(Err(CkptError::NotExpected));
                }
            },
            HomeEv::CkptSaved { id, result } => self.saved(id, result),
        }
    }

    /// Its checkpoints' file and rhythm (a job without `mosrun -C` gets `ckpt.PID` in its
    /// working directory at its first checkpoint).
    fn ensure_conf(&mut self) {
        if self.ck.conf.is_none() {
            let cwd = std::fs::read_link(format!("/proc/{}/cwd", self.job.pid))
                .unwrap_or_else(|_| PathBuf::from("/tmp"));
            self.ck.conf = Some(Conf {
                base: cwd.join(format!("ckpt.{}", self.job.pid)),
                every_min: None,
            });
        }
    }

    /// Where its next checkpoint goes (its number is taken).
    fn next_target(&mut self) -> Target {
        self.ensure_conf();
        let owner = self.rec.owner.clone().unwrap_or_else(|| {
            Owner::of_process(self.job.pid).unwrap_or(Owner {
                uid: self.job.uid,
                gid: self.job.uid,
                groups: Vec::new(),
            })
        });
        let number = self.ck.next;
        self.ck.next += 1;
        // Saved at once: a mosixd restarted before the next save would give the number
        // again (its deputy answers "marked already", and that checkpoint fails).
        self.persist();
        Target {
            base: self.ck.conf.as_ref().expect("ensured").base.clone(),
            number,
            owner,
        }
    }

    fn info(&self, number: u64) -> CkptInfo {
        let c = self.ck.conf.as_ref();
        CkptInfo {
            home: self.procs.me(),
            home_pid: self.job.pid,
            uid: self.job.uid,
            cmd: self.job.cmd.clone(),
            number,
            taken_unix_ms: ckptfile::unix_ms(),
            node: self.job.node(),
            mark: None,
            fds: Vec::new(),
            proc_fds: Vec::new(),
            no_new_privs: false,
            base: c
                .map(|c| c.base.to_string_lossy().into_owned())
                .unwrap_or_default(),
            every_min: c.and_then(|c| c.every_min),
            memory_bytes: 0,
            // Read once it is held (or said by its deputy's mark).
            cwd: None,
        }
    }

    /// Where it is, for [`ckptplan`].
    fn place(&self) -> Place {
        match self.job.place {
            Where::Home => Place::Home,
            Where::Away { .. } => Place::Away {
                linked: self.job.host_ok(),
            },
            Where::Leaving { .. } => Place::Leaving,
            Where::Recovering { .. } => Place::Recovering,
        }
    }

    fn start_checkpoint(&mut self, then: After, reply: Option<Reply>) {
        let pending = self.ck.pending.as_ref().map(|p| p.then);
        let asked = reply.is_some();
        let away = match ckptplan::start(pending, then, asked, self.job.frozen, self.place()) {
            Start::Here => false,
            Start::Host => true,
            Start::Join => {
                if let (Some(p), Some(r)) = (&mut self.ck.pending, reply) {
                    p.waiters.push(r);
                }
                return;
            }
            // Just moved, or its link is being made again: it waits a little.
            Start::Wait => {
                if let Some(r) = reply {
                    self.ck.waiting.push((then, r, Instant::now()));
                }
                return;
            }
            Start::Refuse(why) => {
                if let Some(r) = reply {
                    let _ = r.send(Err(why));
                }
                return;
            }
        };
        let target = self.next_target();
        let id = target.number;
        let info = self.info(id);
        self.ck.last = Instant::now();
        self.ck.pending = Some(Pending {
            id,
            then,
            target: target.clone(),
            waiters: reply.into_iter().collect(),
            started: Instant::now(),
            taken_ms: info.taken_unix_ms,
            away,
            epoch: self.job.epoch,
            incoming: false,
            marked: None,
            image: None,
        });
        if away {
            self.job.send_host(ToHost::Checkpoint { id, then });
            return;
        }
        self.job.checkpointing = true;
        let procs = self.procs.clone();
        let tx = self.tx.clone();
        let pid = self.job.pid;
        let r = std::thread::Builder::new()
            .name(format!("ckpt-{pid}"))
            .spawn(move || {
                let result = procs.checkpoint_at_home(pid, then, &target, info);
                let _ = tx.send(HomeEv::CkptSaved { id, result });
            });
        if r.is_err() {
            self.saved(id, Err(CkptError::NoThread));
        }
    }

    /// A checkpoint taken by its host: its image and its deputy's mark together complete
    /// its file.
    fn try_complete(&mut self) {
        let info = match &self.ck.pending {
            Some(p) => self.info(p.id),
            None => return,
        };
        let Some(p) = &mut self.ck.pending else {
            return;
        };
        let Some(done) = ckptplan::completion(p.image.as_ref().map(|i| &i.0), p.marked.as_ref())
        else {
            return;
        };
        let (_, reply) = p.image.take().expect("complete");
        p.marked = None;
        let r = done.map(|at| {
            let mut i = info;
            i.taken_unix_ms = p.taken_ms;
            i.fds = at.fds;
            i.cwd = at.cwd;
            i.mark = Some(p.id);
            i
        });
        let _ = reply.send(r);
    }

    pub(super) fn marked(&mut self, id: u64, result: Result<MarkedAt, MarkError>) {
        if self.ck.recovering.is_some() {
            // A mark its dead host asked for: the rewind drops it.
            return;
        }
        if let Some(p) = &mut self.ck.pending {
            if p.id == id {
                p.marked = Some(result);
                self.try_complete();
                return;
            }
        }
        // The mark of a checkpoint written with its move from home.
        match result {
            Ok(_) => {
                self.ck.marked.insert(id);
                self.check_recoverable(id);
            }
            Err(e) => warn!(
                pid = self.job.pid,
                "its deputy could not mark checkpoint {id}: {e}"
            ),
        }
    }

    /// Checkpoint `id` is written and marked: it is the one to recover from.
    fn check_recoverable(&mut self, id: u64) {
        let written = self.ck.saved.get(&id).cloned();
        if !ckptplan::recoverable(
            self.job.native(),
            written.is_some(),
            self.ck.marked.contains(&id),
            self.ck.recovery.as_ref().map(|r| r.0),
            id,
        ) {
            return;
        }
        let Some((p, t)) = written else {
            return;
        };
        self.ck.recovery = Some((id, p, t));
        self.job.recovery = Some(id);
        self.job
            .send_deputy(deputy_frame(&ToDeputy::KeepMarks { from: id }).into());
        self.ck.saved.retain(|n, _| *n >= id);
        self.ck.marked.retain(|n| *n >= id);
        self.persist();
    }

    fn saved(&mut self, id: u64, result: Result<CkptDone, CkptError>) {
        let pending = match &self.ck.pending {
            Some(p) if p.id == id => self.ck.pending.take(),
            _ => None,
        };
        if pending.is_some() {
            self.job.checkpointing = false;
        }
        if let Some(p) = pending {
            for w in p.waiters {
                let _ = w.send(result.clone());
            }
            match &result {
                Ok(d) if p.away => {
                    self.ck.saved.insert(id, (d.path.clone(), p.taken_ms));
                    self.ck.marked.insert(id);
                    self.check_recoverable(id);
                }
                Ok(_) => {}
                Err(e) => {
                    if p.away && !self.job.native() {
                        // (Home again, its deputy, with its marks, is the process.)
                        self.job
                            .send_deputy(deputy_frame(&ToDeputy::DropMark { id }).into());
                    }
                    warn!(pid = self.job.pid, "checkpoint {id} not taken: {e}");
                }
            }
            self.persist();
            return;
        }
        // Written with its move from home.
        match result {
            Ok(d) => {
                info!(
                    pid = self.job.pid,
                    "checkpoint {} written with its move", d.path
                );
                self.ck.saved.insert(id, (d.path, ckptfile::unix_ms()));
                self.check_recoverable(id);
            }
            Err(e) => {
                self.job
                    .send_deputy(deputy_frame(&ToDeputy::DropMark { id }).into());
                warn!(
                    pid = self.job.pid,
                    "checkpoint {id} with its move not written: {e}"
                );
            }
        }
        self.persist();
    }

    /// Its residence changed (a move, a recovery, back home): a checkpoint asked of its
    /// last host whose image has not come fails now (and its mark is dropped), rather
    /// than after [`CKPT_DEADLINE`] with no checkpoint taken meanwhile.
    pub(super) fn residence_changed(&mut self) {
        let native = self.job.native();
        let epoch = self.job.epoch;
        if let Some(id) = self
            .ck
            .pending
            .as_ref()
            .filter(|p| p.outlived(native, epoch))
            .map(|p| p.id)
        {
            self.saved(id, Err(CkptError::Moved));
        }
    }

    pub(super) fn ckpt_failed(&mut self, id: u64, reason: CkptError) {
        if self.ck.pending.as_ref().is_some_and(|p| p.id == id) {
            if let Some(p) = &self.ck.pending {
                if p.image.is_some() {
                    // The image came: its receiving thread says how it ended.
                    return;
                }
            }
            self.saved(id, Err(reason));
        }
    }

    /// Its next automatic checkpoint, when due (not while it moves, is frozen or stopped).
    pub(super) fn periodic(&mut self, now: Instant) {
        if !self.ck.waiting.is_empty() && self.ck.pending.is_none() {
            let (then, r, since) = self.ck.waiting.remove(0);
            match ckptplan::waited(self.place(), now.duration_since(since)) {
                Waited::Retry => self.start_checkpoint(then, Some(r)),
                Waited::GiveUp(why) => {
                    let _ = r.send(Err(why));
                }
                Waited::WaitMore => self.ck.waiting.insert(0, (then, r, since)),
            }
        }
        if let Some(p) = &self.ck.pending {
            if now.duration_since(p.started) > CKPT_DEADLINE {
                let id = p.id;
                if let Some(p) = &mut self.ck.pending {
                    if let Some((_, r)) = p.image.take() {
                        let _ = r.send(Err(CkptError::TooLong));
                    }
                }
                self.saved(id, Err(CkptError::TooLong));
            }
            return;
        }
        let since = now.duration_since(self.ck.last);
        let due = ckptplan::due(self.ck.every(), since, self.job.frozen, self.place());
        if due && !stopped(self.job.pid) {
            self.start_checkpoint(After::Continue, None);
        }
    }

    /// `mosrun -C`: a move from home also writes its next checkpoint.
    pub(super) fn leave_checkpoint(&mut self) -> Option<(Target, CkptInfo)> {
        self.ck.conf.as_ref()?;
        let t = self.next_target();
        let i = self.info(t.number);
        self.ck.last = Instant::now();
        Some((t, i))
    }

    /// It ended: nobody waits any more.
    pub(super) fn ended(&mut self) {
        for (_, r, _) in self.ck.waiting.drain(..) {
            let _ = r.send(Err(CkptError::Ended));
        }
        if let Some(p) = self.ck.pending.take() {
            for w in p.waiters {
                let _ = w.send(Err(CkptError::Ended));
            }
        }
        if let Some(f) = self.ck.freezer.take() {
            f.release();
        }
        if let Some(r) = self.ck.freeze_reply.take() {
            let _ = r.send(Err(CkptError::Ended));
        }
    }

    fn freeze(&mut self, freeze: bool, reply: Sender<Result<bool, CkptError>>) {
        let pid = self.job.pid;
        match self.job.place {
            Where::Home => {
                let r = if freeze {
                    if self.ck.freezer.is_some() {
                        Ok(true)
                    } else if self.ck.pending.is_some() {
                        Err(CkptError::Busy)
                    } else {
                        // Its user may not hold a process with more rights than theirs
                        // (a set-user-ID program): checked before, and once it is held.
                        let uid = self.job.uid;
                        let rights = || {
                            super::rights::own_rights_only(pid, uid)
                                .map_err(|e| CkptError::Freeze(e.to_string()))
                        };
                        rights()
                            .and_then(|_| Freezer::start(pid))
                            .and_then(|f| match rights() {
                                Ok(()) => Ok(f),
                                Err(e) => {
                                    f.release();
                                    Err(e)
                                }
                            })
                            .map(|f| {
                                self.ck.freezer = Some(f);
                                self.job.frozen = true;
                                true
                            })
                    }
                } else {
                    match self.ck.freezer.take() {
                        Some(f) => f.release(),
                        // Stopped (chkstop, SIGSTOP) perhaps: it goes on.
                        None => {
                            let _ = mosix_ckpt::sys::kill(pid, libc::SIGCONT);
                        }
                    }
                    self.job.frozen = false;
                    Ok(false)
                };
                let _ = reply.send(r);
            }
            Where::Away { .. } => {
                if !freeze && !self.job.frozen {
                    // Its deputy passes it on.
                    let _ = mosix_ckpt::sys::kill(pid, libc::SIGCONT);
                    let _ = reply.send(Ok(false));
                } else if !self.job.host_ok() {
                    let _ = reply.send(Err(CkptError::HostUnlinked));
                } else if self.ck.pending.is_some() || self.ck.freeze_reply.is_some() {
                    let _ = reply.send(Err(CkptError::Busy));
                } else {
                    self.ck.freeze_reply = Some(reply);
                    self.job.send_host(ToHost::Freeze { freeze });
                }
            }
            _ => {
                let _ = reply.send(Err(CkptError::Moving));
            }
        }
    }

    pub(super) fn freeze_answer(&mut self, freeze: bool, error: Option<CkptError>) {
        if error.is_none() {
            self.job.frozen = freeze;
        }
        if let Some(r) = self.ck.freeze_reply.take() {
            let _ = r.send(match error {
                None => Ok(freeze),
                Some(e) => Err(e),
            });
        }
    }

    /// Its host died and it has a checkpoint to come back from: its deputy goes back to
    /// that checkpoint's mark first (then [`Driver::rewound`]).
    pub(super) fn recover(&mut self, number: u64, node: u32) {
        if let Some(p) = self.ck.pending.take() {
            for w in p.waiters {
                let _ = w.send(Err(CkptError::NodeDied { node }));
            }
            if let Some((_, r)) = p.image {
                let _ = r.send(Err(CkptError::NodeDied { node }));
            }
        }
        if let Some(r) = self.ck.freeze_reply.take() {
            let _ = r.send(Err(CkptError::NodeDied { node }));
        }
        self.job.frozen = false;
        let Some((n, path, taken)) = self.ck.recovery.clone().filter(|r| r.0 == number) else {
            self.recovery_failed(CkptError::Forgotten);
            return;
        };
        let ago = ckptfile::unix_ms().saturating_sub(taken) as f64 / 1000.0;
        let message = format!(
            "mosix: process {} was recovered from its checkpoint of {} ({ago:.1} s ago, {path}): node {node} stopped answering",
            self.job.pid,
            ckptfile::time_of_day(taken),
        );
        warn!(
            pid = self.job.pid,
            "node {node} died: recovering it from {path}"
        );
        self.job
            .send_deputy(deputy_frame(&ToDeputy::Rewind { id: n, message }).into());
        self.ck.recovering = Some((n, path, taken, node));
    }

    fn recovery_failed(&mut self, why: CkptError) {
        self.ck.recovering = None;
        let now = Instant::now();
        let acts = self.job.handle(Ev::RecoverFailed { why }, now);
        for a in acts {
            self.act(a);
        }
    }

    /// Its deputy is back at the checkpoint: the image goes where it can run (thread).
    pub(super) fn rewound(&mut self, number: u64, result: Result<u64, MarkError>) {
        let Some((n, path, _, node)) = self.ck.recovering.clone() else {
            return;
        };
        if n != number {
            return;
        }
        let max_seq = match result {
            Ok(s) => s,
            Err(e) => return self.recovery_failed(CkptError::Rewind(e.to_string())),
        };
        let Where::Recovering { epoch, .. } = self.job.place else {
            return;
        };
        let spec = super::recover::RecoverSpec {
            pid: self.job.pid,
            uid: self.job.uid,
            owner: self.rec.owner.clone().unwrap_or(Owner {
                uid: self.job.uid,
                gid: self.job.uid,
                groups: Vec::new(),
            }),
            cmd: self.job.cmd.clone(),
            pinned: self.job.pinned,
            avoid: self.job.avoid.clone(),
            migrations: self.job.migrations,
            path: PathBuf::from(path),
            number,
            epoch,
            next_seq: max_seq + 1,
            dead: node,
        };
        let procs = self.procs.clone();
        let tx = self.tx.clone();
        let r = std::thread::Builder::new()
            .name(format!("recover-{}", self.job.pid))
            .spawn(move || {
                let ev = match procs.recover(&spec) {
                    Ok((moved, epoch)) => Ev::Recovered { moved, epoch },
                    Err(why) => Ev::RecoverFailed { why },
                };
                let _ = tx.send(HomeEv::Job(ev));
            });
        if r.is_err() {
            self.recovery_failed(CkptError::NoThread);
        }
    }

    /// After a job event during recovery: it runs again (its checkpoint is still the one
    /// to come back from), or it is lost.
    pub(super) fn after_recovery(&mut self) {
        if let (Some((n, ..)), Where::Away { .. }) = (&self.ck.recovering, self.job.place) {
            let n = *n;
            self.ck.recovering = None;
            self.job.recovery = Some(n);
            self.ck.last = Instant::now();
            info!(
                pid = self.job.pid,
                "recovered; it runs on node {}",
                self.job.node()
            );
        }
    }
}
