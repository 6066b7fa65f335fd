//! The home side of one migratable process, as a state machine without I/O or clocks:
//! events in ([`Ev`], with the time given), actions out ([`Act`]), the way to its deputy
//! and to its host through two small traits ([`ToDeputySink`], [`ToHostSink`]).
//!
//! At home the process runs by itself; the job only follows it. Away, its deputy (the
//! process's home half, connected to this daemon) and its host (the node it runs on,
//! linked to this daemon) talk through here: frames wait while either end is not
//! connected (a deputy that has just exec'd, a host that has just taken it, a daemon
//! that restarted), so nothing is lost across a move or a reconnection.

use super::MoveError;
use mosix_proto::wire::{CkptError, Frame, ToHome, ToHost};
use mosix_remote::wire::{FromDeputy, MarkError, MarkedAt};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a process away may be without a link from its host (and its host node down)
/// before it is reported lost.
pub const LINK_WAIT: Duration = Duration::from_secs(30);
/// How long a host that is down must be unlinked before its processes are lost.
pub const DOWN_WAIT: Duration = Duration::from_secs(3);
/// How long a host that is down, its link still open (a machine that lost its power
/// closes none of its connections; a cut cable neither), must stay so before a process
/// that has a checkpoint to be recovered from is given up for it.
pub const RECOVER_WAIT: Duration = Duration::from_secs(10);
/// How long a move whose host went away in its middle may take to be heard of from the
/// next host before it is answered as failed.
pub const DOUBT: Duration = Duration::from_secs(2);
/// How far a recovered process's residence number jumps ahead: a copy of an older
/// residence (the old host's, cut off but alive, or one it was moving on to when it died,
/// even after further moves of its own) links with a smaller one and is ended.
pub const RECOVERY_EPOCHS: u64 = 1 << 20;
/// Frames kept for an end that is not connected (beyond: the oldest are dropped; the
/// supervisor sends its calls again after a reconnection).
const MAX_QUEUED: usize = 4096;

/// The way to the deputy; false once it is gone.
pub trait ToDeputySink {
    fn send(&mut self, frame: &[u8]) -> bool;
}

/// The way to the host; false once the link is broken.
pub trait ToHostSink {
    fn send(&mut self, m: &ToHost) -> bool;
    /// Closes the link (its host is given up).
    fn close(&mut self) {}
}

/// Where the process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    Home,
    /// Being moved from home to `to`.
    Leaving {
        to: u32,
    },
    /// Running on `node`, residence `epoch` (`node` may be this one: a process recovered
    /// here runs under a supervisor, as away, with its deputy).
    Away {
        node: u32,
        epoch: u64,
    },
    /// Its host `from` died: it is being brought back from a checkpoint, as residence
    /// `epoch`.
    Recovering {
        from: u32,
        epoch: u64,
    },
}

/// The answer to a `migrate`.
pub type MoveResult = Result<super::Moved, MoveError>;

/// Someone waiting for a move to end.
pub trait Waiter {
    fn answer(self: Box<Self>, r: MoveResult);
}

impl Waiter for std::sync::mpsc::Sender<MoveResult> {
    fn answer(self: Box<Self>, r: MoveResult) {
        let _ = self.send(r);
    }
}

/// A `migrate` kept for later: to, reason, offer, who waits for its answer.
type Queued = (u32, String, Option<String>, Box<dyn Waiter + Send>);

/// An event of a job.
pub enum Ev<D, H> {
    /// `migrate` (or the balancer): move it to `to` (this node: home).
    Migrate {
        to: u32,
        reason: String,
        offer: Option<String>,
        reply: Option<Box<dyn Waiter + Send>>,
    },
    /// Our own move of it from home ended: it runs on `to` now (its home half is becoming
    /// its deputy), or it failed and goes on at home.
    LeftHome {
        to: u32,
        moved: super::Moved,
    },
    LeaveFailed {
        to: u32,
        err: MoveError,
    },
    /// It was rebuilt at home and runs here again (a move home committed).
    CameHome {
        moved: super::Moved,
    },
    /// It is being rebuilt here (coming home, or from a checkpoint) and its memory put in
    /// while it runs: moves wait until [`Ev::Filled`].
    Filling,
    /// Its memory is all in since it came home: it may move again.
    Filled,
    DeputyConnected(D),
    /// A frame from the deputy, for the host.
    FromDeputy(Frame),
    DeputyGone,
    /// A link from a host that runs it as residence `epoch`; `id` names this link (each
    /// link its own number): what comes over it is heard only while it is the link the
    /// job took (or may take), never because its residence number matches.
    HostLinked {
        epoch: u64,
        node: u32,
        id: u64,
        link: H,
    },
    FromHost {
        id: u64,
        msg: ToHome,
    },
    HostGone {
        id: u64,
    },
    /// Its PID ended at home: the process itself (at home) or its deputy (away).
    PidEnded,
    /// The cluster's view: `node` is down (or up again).
    NodeState {
        node: u32,
        up: bool,
    },
    /// It runs again, restored from a checkpoint on `moved.to` as residence `epoch` (after
    /// [`Act::Recover`]; each node tried is given its own residence number, counting up
    /// from the one in [`Where::Recovering`]).
    Recovered {
        moved: super::Moved,
        epoch: u64,
    },
    /// It could not be brought back.
    RecoverFailed {
        why: CkptError,
    },
}

/// What the driver must do.
#[derive(Debug, PartialEq)]
pub enum Act {
    /// Start moving it from home to `to` (the driver's transfer thread).
    Leave {
        to: u32,
        reason: String,
        offer: Option<String>,
    },
    /// Write the job's record (its place changed).
    Persist,
    /// It is lost (its host died): the deputy ends it with 137 after printing `message`.
    Lost { message: String },
    /// Its host `node` died and it has checkpoint `number` (its deputy holds its mark):
    /// bring it back from it (the deputy is asked to rewind first).
    Recover { number: u64, node: u32 },
    /// The deputy's answer to the rewind for checkpoint `number`: the highest call
    /// sequence number it saw, or why it could not.
    Rewound {
        number: u64,
        result: Result<u64, MarkError>,
    },
    /// The deputy marked checkpoint `id` (its descriptors then), or could not.
    Marked {
        id: u64,
        result: Result<MarkedAt, MarkError>,
    },
    /// Its host could not take checkpoint `id`.
    CkptFailed { id: u64, reason: CkptError },
    /// Its host froze it (or let it go on), or could not.
    FreezeAnswer {
        freeze: bool,
        error: Option<CkptError>,
    },
    /// Nothing more to do: forget the job.
    Forget,
}

/// A link come before the job knew it was its host's.
struct Early<H> {
    epoch: u64,
    node: u32,
    id: u64,
    link: H,
}

/// How many early links are kept (one per node a move or recovery was tried on).
const MAX_EARLY: usize = 64;

/// The home side of one process.
pub struct Job<D, H> {
    pub pid: i32,
    pub me: u32,
    pub uid: u32,
    pub cmd: String,
    pub pinned: bool,
    pub avoid: Vec<u32>,
    pub migrations: u32,
    pub since: Instant,
    pub reason: String,
    pub place: Where,
    /// The residence number of the current host (0: never left).
    pub epoch: u64,
    deputy: Option<D>,
    host: Option<H>,
    /// The number of the host link the job took (see [`Ev::HostLinked`]).
    host_id: Option<u64>,
    to_deputy: VecDeque<Frame>,
    to_host: VecDeque<ToHost>,
    waiters: Vec<(u32, Box<dyn Waiter + Send>)>,
    /// Since when it is away with no link from its host.
    unlinked_since: Option<Instant>,
    /// Since when its host's node is down (gossip silent and its machine not answering).
    host_down: Option<Instant>,
    /// When its host's link last carried a frame: a host that still talks over it is
    /// not given up for being down in the cluster's view (lost gossip, an overloaded
    /// node).
    heard: Option<Instant>,
    ended: bool,
    /// Links of would-be next hosts, come before our move (or recovery) of it was done
    /// here, and what each said meanwhile (by link number). When the move is done, the one
    /// of its residence and node is taken and the others are ended.
    early: Vec<Early<H>>,
    early_msgs: Vec<(u64, ToHome)>,
    /// Since when a move asked of its host is in doubt: the host's link dropped before it
    /// said how the move ended.
    doubt: Option<Instant>,
    /// Reported lost (once).
    lost: bool,
    /// The checkpoint it can be brought back from if its host dies: its image is saved
    /// and its deputy holds its mark (none at home: no deputy).
    pub recovery: Option<u64>,
    /// Held where it is by `migrate PID freeze`.
    pub frozen: bool,
    /// A checkpoint of it is being taken here (moves wait).
    pub checkpointing: bool,
    /// It came home and its memory is still being put in (moves wait).
    filling: bool,
    /// A `migrate` asked while it was: made once all its memory is in.
    after_fill: Option<Queued>,
    /// The figures of a move home its host reported before it was rebuilt here.
    home_figures: Option<super::Moved>,
}

impl<D: ToDeputySink, H: ToHostSink> Job<D, H> {
    pub fn new(me: u32, pid: i32, uid: u32, cmd: String, now: Instant) -> Self {
        Job {
            pid,
            me,
            uid,
            cmd,
            pinned: false,
            avoid: Vec::new(),
            migrations: 0,
            since: now,
            reason: "started here (its home)".into(),
            place: Where::Home,
            epoch: 0,
            deputy: None,
            host: None,
            host_id: None,
            to_deputy: VecDeque::new(),
            to_host: VecDeque::new(),
            waiters: Vec::new(),
            unlinked_since: None,
            host_down: None,
            heard: None,
            ended: false,
            early: Vec::new(),
            early_msgs: Vec::new(),
            doubt: None,
            lost: false,
            recovery: None,
            frozen: false,
            checkpointing: false,
            filling: false,
            after_fill: None,
            home_figures: None,
        }
    }

    /// A job found again in its record, away on `node` (after a restart of the daemon).
    pub fn away(mut self, node: u32, epoch: u64, now: Instant) -> Self {
        self.place = Where::Away { node, epoch };
        self.epoch = epoch;
        self.unlinked_since = Some(now);
        self
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The node it runs on (this one when home or leaving; the one that died while it
    /// is being recovered).
    pub fn node(&self) -> u32 {
        match self.place {
            Where::Away { node, .. } | Where::Recovering { from: node, .. } => node,
            _ => self.me,
        }
    }

    /// Whether it runs here natively (not away, nor here under a supervisor).
    pub fn native(&self) -> bool {
        matches!(self.place, Where::Home | Where::Leaving { .. })
    }

    /// Whether its deputy is connected (for `ps`).
    pub fn linked(&self) -> (bool, bool) {
        (self.deputy.is_some(), self.host.is_some())
    }

    /// Whether its host is linked and up (not silent in the cluster's view).
    pub fn host_ok(&self) -> bool {
        self.host.is_some() && self.host_down.is_none()
    }

    /// Sends `m` to its host (queued while there is no link).
    pub(crate) fn send_host(&mut self, m: ToHost) {
        if let Some(h) = &mut self.host {
            if h.send(&m) {
                return;
            }
            self.host = None;
        }
        if self.to_host.len() >= MAX_QUEUED {
            self.to_host.pop_front();
        }
        self.to_host.push_back(m);
    }

    /// Its deputy's connection, if it is connected.
    pub(crate) fn deputy(&self) -> Option<&D> {
        self.deputy.as_ref()
    }

    /// Sends frame `f` to its deputy (queued while it is not connected).
    pub(crate) fn send_deputy(&mut self, f: Frame) {
        if let Some(d) = &mut self.deputy {
            if d.send(&f) {
                return;
            }
            self.deputy = None;
        }
        if self.to_deputy.len() >= MAX_QUEUED {
            self.to_deputy.pop_front();
        }
        self.to_deputy.push_back(f);
    }

    fn flush_host(&mut self) {
        while let Some(m) = self.to_host.pop_front() {
            let Some(h) = &mut self.host else {
                self.to_host.push_front(m);
                return;
            };
            if !h.send(&m) {
                self.host = None;
                self.to_host.push_front(m);
                return;
            }
        }
    }

    fn flush_deputy(&mut self) {
        while let Some(f) = self.to_deputy.pop_front() {
            let Some(d) = &mut self.deputy else {
                self.to_deputy.push_front(f);
                return;
            };
            if !d.send(&f) {
                self.deputy = None;
                self.to_deputy.push_front(f);
                return;
            }
        }
    }

    fn answer_waiters(&mut self, to: u32, r: &MoveResult) {
        for (t, w) in std::mem::take(&mut self.waiters) {
            let mine = match r {
                Ok(m) if t == m.to => r.clone(),
                Ok(m) => Err(MoveError::Elsewhere { to: m.to }),
                Err(_) if t == to => r.clone(),
                Err(_) => {
                    self.waiters.push((t, w));
                    continue;
                }
            };
            w.answer(mine);
        }
    }

    fn is_home(&self) -> bool {
        matches!(self.place, Where::Home)
    }

    /// It runs on another node now (a new residence).
    fn moved_on(&mut self, moved: super::Moved, now: Instant, acts: &mut Vec<Act>) {
        let next = self.epoch + 1;
        self.moved_to(moved, next, now, acts)
    }

    /// It runs on `moved.to` now, as residence `epoch`.
    fn moved_to(&mut self, moved: super::Moved, epoch: u64, now: Instant, acts: &mut Vec<Act>) {
        let to = moved.to;
        self.doubt = None;
        self.host = None;
        self.host_id = None;
        // What the deputy said meanwhile (signals) is for the next host.
        self.to_host.retain(|m| matches!(m, ToHost::Deputy(_)));
        self.epoch = epoch;
        self.migrations += 1;
        self.place = Where::Away {
            node: to,
            epoch: self.epoch,
        };
        self.since = now;
        self.reason = format!("running on node {to}");
        self.unlinked_since = Some(now);
        self.host_down = None;
        for x in std::mem::take(&mut self.early) {
            if x.epoch == epoch && x.node == to && self.host.is_none() {
                self.host = Some(x.link);
                self.host_id = Some(x.id);
                self.unlinked_since = None;
            } else {
                // A copy that is not this residence (a move or recovery tried there whose
                // end was not heard): never two copies.
                let mut link = x.link;
                let _ = link.send(&ToHost::Kill);
            }
        }
        self.flush_host();
        self.answer_waiters(to, &Ok(moved));
        acts.push(Act::Persist);
    }

    /// The next host linked and the last one cannot say it moved there: it did.
    fn moved_on_early(&mut self, now: Instant, acts: &mut Vec<Act>) {
        let next = self.epoch + 1;
        if let Some(x) = self.early.iter().rev().find(|x| x.epoch == next) {
            let moved = super::Moved {
                to: x.node,
                ..Default::default()
            };
            self.moved_on(moved, now, acts);
        }
    }

    pub fn handle(&mut self, ev: Ev<D, H>, now: Instant) -> Vec<Act> {
        let epoch = self.epoch;
        let mut acts = self.handle_one(ev, now);
        if self.epoch != epoch && !self.early_msgs.is_empty() {
            // A new residence: what its host said before it was ours to hear (what the
            // other early links said is not heard).
            for (id, msg) in std::mem::take(&mut self.early_msgs) {
                if Some(id) == self.host_id {
                    acts.extend(self.handle_one(Ev::FromHost { id, msg }, now));
                }
            }
        }
        acts
    }

    fn handle_one(&mut self, ev: Ev<D, H>, now: Instant) -> Vec<Act> {
        let mut acts = Vec::new();
        match ev {
            Ev::Migrate {
                to,
                reason,
                offer,
                reply,
            } => {
                // Just come home, its memory still being put in: a `migrate` waits for it
                // (a fraction of a second); the balancer's tries come again anyway.
                if self.filling && !self.ended && !self.frozen && !self.checkpointing {
                    match reply {
                        Some(w) if self.after_fill.is_none() => {
                            self.after_fill = Some((to, reason, offer, w));
                        }
                        Some(w) => w.answer(Err(MoveError::Busy)),
                        None => {}
                    }
                    return acts;
                }
                let busy = matches!(self.place, Where::Leaving { .. } | Where::Recovering { .. })
                    || (matches!(self.place, Where::Away { .. }) && self.host.is_none());
                // Here under a supervisor (recovered here), it may still come home for real.
                let supervised_here = self.place
                    == Where::Away {
                        node: self.me,
                        epoch: self.epoch,
                    };
                let err = if self.ended {
                    Some(MoveError::Ended)
                } else if self.frozen {
                    Some(MoveError::Frozen)
                } else if self.checkpointing {
                    // Its checkpoint at home holds it (traced): a second mover could not.
                    Some(MoveError::Checkpointing)
                } else if to == self.node() && !supervised_here {
                    Some(MoveError::AlreadyThere { to })
                } else if busy {
                    Some(MoveError::Busy)
                } else {
                    None
                };
                if let Some(e) = err {
                    if let Some(w) = reply {
                        w.answer(Err(e));
                    }
                    return acts;
                }
                if let Some(w) = reply {
                    self.waiters.push((to, w));
                }
                match self.place {
                    Where::Home => {
                        self.place = Where::Leaving { to };
                        acts.push(Act::Leave { to, reason, offer });
                    }
                    Where::Away { .. } => self.send_host(ToHost::Migrate { to }),
                    Where::Leaving { .. } | Where::Recovering { .. } => {}
                }
            }
            Ev::LeftHome { to, moved } => {
                self.moved_on(super::Moved { to, ..moved }, now, &mut acts);
            }
            Ev::LeaveFailed { to, err } => {
                if matches!(self.place, Where::Leaving { .. }) {
                    self.place = Where::Home;
                }
                for mut x in std::mem::take(&mut self.early) {
                    // A copy there that will never get its deputy: end it.
                    let _ = x.link.send(&ToHost::Kill);
                }
                self.early_msgs.clear();
                self.answer_waiters(to, &Err(err));
            }
            Ev::Filling => self.filling = true,
            Ev::Filled => {
                self.filling = false;
                if let Some((to, reason, offer, w)) = self.after_fill.take() {
                    let ev = Ev::Migrate {
                        to,
                        reason,
                        offer,
                        reply: Some(w),
                    };
                    acts.extend(self.handle_one(ev, now));
                }
            }
            Ev::CameHome { moved } => {
                let moved = self.home_figures.take().unwrap_or(moved);
                self.doubt = None;
                // Its deputy, which held its marks, is the process again.
                self.recovery = None;
                self.place = Where::Home;
                self.migrations += 1;
                self.since = now;
                self.reason = "back home".into();
                self.deputy = None;
                // (Its last host's link stays the one heard: its Left may come after.)
                self.host = None;
                self.to_deputy.clear();
                self.to_host.clear();
                self.unlinked_since = None;
                let me = self.me;
                self.answer_waiters(me, &Ok(moved));
                acts.push(Act::Persist);
            }
            Ev::DeputyConnected(d) => {
                self.deputy = Some(d);
                self.flush_deputy();
            }
            Ev::FromDeputy(f) => {
                if FromDeputy::is_for_home(&f) {
                    match mosix_remote::wire::decode::<FromDeputy>(&f) {
                        Ok(FromDeputy::Marked { id, result }) => {
                            acts.push(Act::Marked { id, result })
                        }
                        Ok(FromDeputy::Rewound { id, result }) => {
                            if matches!(self.place, Where::Recovering { .. }) {
                                acts.push(Act::Rewound { number: id, result });
                            }
                        }
                        _ => {}
                    }
                } else if matches!(self.place, Where::Recovering { .. }) {
                    // Answers to the calls of the copy that died are for nobody; signals
                    // are for the process wherever it comes back.
                    if matches!(
                        mosix_remote::wire::decode::<FromDeputy>(&f),
                        Ok(FromDeputy::Signal { .. })
                    ) {
                        self.send_host(ToHost::Deputy(f));
                    }
                } else {
                    self.send_host(ToHost::Deputy(f));
                }
            }
            Ev::DeputyGone => self.deputy = None,
            Ev::HostLinked {
                epoch,
                node,
                id,
                mut link,
            } => {
                let early = |j: &mut Self, mut link: H| {
                    if j.early.len() < MAX_EARLY {
                        j.early.push(Early {
                            epoch,
                            node,
                            id,
                            link,
                        });
                    } else {
                        let _ = link.send(&ToHost::Kill);
                    }
                };
                match self.place {
                    Where::Away { node: n, epoch: e } if epoch == e && node == n => {
                        if self.host.is_none() && self.early.iter().any(|x| x.epoch == e + 1) {
                            // Its old host's mosixd came back after the move on was
                            // committed (the next host links only then): that copy is
                            // not the process any more.
                            let _ = link.send(&ToHost::Kill);
                            self.moved_on_early(now, &mut acts);
                        } else {
                            self.host = Some(link);
                            self.host_id = Some(id);
                            self.unlinked_since = None;
                            self.host_down = None;
                            self.flush_host();
                        }
                    }
                    Where::Away { epoch: e, .. } if epoch == e => {
                        // Another node runs a copy of this residence (a move to it was
                        // given up here without hearing how it ended): not the process.
                        let _ = link.send(&ToHost::Kill);
                    }
                    Where::Leaving { to } if epoch == self.epoch + 1 && node == to => {
                        // The new host runs it already; our end of the move is not done.
                        early(self, link);
                    }
                    Where::Recovering { epoch: e, .. } if epoch >= e => {
                        // A restored copy runs already (of the node tried last, or of one
                        // tried before whose commit got no answer); the recovery is not
                        // done here: the one it ends with is taken, the others ended.
                        early(self, link);
                    }
                    Where::Recovering { .. } | Where::Leaving { .. } => {
                        // The copy of the host that was given up (cut off, not dead), or
                        // of a move it was making, or of a move from home tried before:
                        // not the process any more.
                        let _ = link.send(&ToHost::Kill);
                    }
                    Where::Away { .. } if epoch == self.epoch + 1 => {
                        // The next host, before the last one said it was moved there. A
                        // host links only once it runs it: if the last host is not linked
                        // (its mosixd died in the move), the move is done.
                        early(self, link);
                        if self.host.is_none() {
                            self.moved_on_early(now, &mut acts);
                        }
                    }
                    Where::Home if epoch > self.epoch => {
                        // A copy that was committed there but never got its deputy (the
                        // exec into the deputy failed, and it went on here): end it.
                        let _ = link.send(&ToHost::Kill);
                    }
                    Where::Home | Where::Away { .. } if epoch < self.epoch || self.is_home() => {
                        // A copy of an older residence (its host's mosixd restarted after
                        // the process moved on): end it.
                        let _ = link.send(&ToHost::Kill);
                    }
                    // A residence further ahead than the next: not known here yet.
                    _ => {}
                }
            }
            Ev::FromHost { id, msg } => {
                if self.host_id != Some(id) {
                    if self.early.iter().any(|x| x.id == id) && self.early_msgs.len() < MAX_QUEUED {
                        // From a would-be next host, before its move was done here: kept
                        // for then (heard if it is the one taken).
                        self.early_msgs.push((id, msg));
                    }
                    // Else from a link the job did not take: not heard.
                    return acts;
                }
                self.heard = Some(now);
                match msg {
                    ToHome::Deputy(f) => self.send_deputy(f),
                    ToHome::Left {
                        to,
                        frozen_ms,
                        memory_bytes,
                        rounds,
                    } => {
                        let moved = super::Moved {
                            to,
                            frozen_ms,
                            memory_bytes,
                            rounds,
                        };
                        self.host = None;
                        if to == self.me {
                            // The move home is ours to finish (CameHome): `migrate` is
                            // answered once it runs here (whichever is heard first).
                            self.to_host.retain(|m| matches!(m, ToHost::Deputy(_)));
                            if self.is_home() {
                                self.answer_waiters(to, &Ok(moved));
                            } else {
                                self.home_figures = Some(moved);
                            }
                        } else {
                            self.moved_on(moved, now, &mut acts);
                        }
                    }
                    ToHome::MigrateFailed { to, reason } => {
                        for mut x in std::mem::take(&mut self.early) {
                            if x.node == to {
                                // The copy there was committed but its host did not hear
                                // it run, and let it go on here: that one is ended.
                                let _ = x.link.send(&ToHost::Kill);
                                self.early_msgs.retain(|m| m.0 != x.id);
                            } else {
                                self.early.push(x);
                            }
                        }
                        self.answer_waiters(to, &Err(MoveError::Failed { reason }));
                    }
                    ToHome::CheckpointFailed { id, reason } => {
                        acts.push(Act::CkptFailed { id, reason })
                    }
                    ToHome::Frozen { freeze, error } => {
                        acts.push(Act::FreezeAnswer { freeze, error })
                    }
                }
            }
            Ev::HostGone { id } => {
                if self.host_id != Some(id) {
                    // An early link that broke: it links again if its copy lives.
                    self.early.retain(|x| x.id != id);
                    self.early_msgs.retain(|m| m.0 != id);
                } else if matches!(self.place, Where::Away { .. }) {
                    self.host = None;
                    self.host_id = None;
                    self.unlinked_since.get_or_insert(now);
                    if !self.waiters.is_empty() {
                        self.doubt.get_or_insert(now);
                    }
                    if !self.early.is_empty() {
                        // The next host runs it, and the last will not say so.
                        self.moved_on_early(now, &mut acts);
                    }
                }
            }
            Ev::PidEnded => {
                match self.place {
                    Where::Away { .. } => {
                        // Its home half was killed: so is the process, wherever it is.
                        self.send_host(ToHost::Kill);
                    }
                    Where::Home | Where::Leaving { .. } | Where::Recovering { .. } => {}
                }
                self.ended = true;
                for (_, w) in std::mem::take(&mut self.waiters) {
                    w.answer(Err(MoveError::Ended));
                }
                if let Some((.., w)) = self.after_fill.take() {
                    w.answer(Err(MoveError::Ended));
                }
                acts.push(Act::Forget);
            }
            Ev::NodeState { node, up } => {
                if let Where::Away { node: n, .. } = self.place {
                    if n == node {
                        self.host_down = if up {
                            None
                        } else {
                            Some(self.host_down.unwrap_or(now))
                        };
                    }
                }
            }
            Ev::Recovered { moved, epoch } => {
                if let Where::Recovering { epoch: base, .. } = self.place {
                    let epoch = epoch.max(base);
                    self.lost = false;
                    let to = moved.to;
                    self.moved_to(moved, epoch, now, &mut acts);
                    self.reason = format!("recovered from a checkpoint; running on node {to}");
                }
            }
            Ev::RecoverFailed { why } => {
                if let Where::Recovering { from, .. } = self.place {
                    self.lost = true;
                    acts.push(Act::Lost {
                        message: format!(
                            "mosix: process {} was lost: node {from} stopped answering, and it could not be recovered: {why}",
                            self.pid
                        ),
                    });
                }
            }
        }
        acts
    }

    /// Time passed: a process away whose host node is down and has not linked for
    /// [`LINK_WAIT`] is lost.
    pub fn tick(&mut self, now: Instant) -> Vec<Act> {
        let mut acts = Vec::new();
        if let (Some(t), Where::Away { node, .. }) = (self.doubt, self.place) {
            // The next host links as soon as it runs it; none did: the host's mover let
            // it go on there.
            if now.duration_since(t) >= DOUBT {
                self.doubt = None;
                for (_, w) in std::mem::take(&mut self.waiters) {
                    w.answer(Err(MoveError::PeerGone {
                        node,
                        why: "its mosixd went away during the move; the process stays there".into(),
                    }));
                }
            }
        }
        if let Where::Away { node, .. } = self.place {
            let unlinked = self.unlinked_since.map(|t| now.duration_since(t));
            let down = self.host_down.map(|t| now.duration_since(t));
            // Down and unlinked: dead. Down for long with its link still open: dead too
            // (a machine that lost its power closes none of its connections). Unlinked
            // for long: its host never came back.
            // With a checkpoint to come back from, a host down for a while is given up
            // sooner even with its link open (a partition that heals later costs the work
            // since the checkpoint, not the job: its copy there is ended then).
            let give_up = if self.recovery.is_some() {
                RECOVER_WAIT
            } else {
                LINK_WAIT
            };
            // A link that carried a frame within that time is not silent: its host lives.
            let silent = self.heard.is_none_or(|h| now.duration_since(h) >= give_up);
            let dead = down.is_some() && unlinked.is_some_and(|u| u >= DOWN_WAIT)
                || down.is_some_and(|d| d >= give_up) && silent
                || unlinked.is_some_and(|u| u >= LINK_WAIT);
            if dead && !self.lost {
                if let Some(h) = &mut self.host {
                    h.close();
                }
                self.host = None;
                self.host_id = None;
                self.host_down = None;
                self.unlinked_since = None;
                // Moves asked of it will not happen.
                for (_, w) in std::mem::take(&mut self.waiters) {
                    w.answer(Err(MoveError::PeerGone {
                        node,
                        why: "it stopped answering".into(),
                    }));
                }
                self.doubt = None;
                for mut x in std::mem::take(&mut self.early) {
                    let _ = x.link.send(&ToHost::Kill);
                }
                self.early_msgs.clear();
                match self.recovery.take() {
                    Some(number) => {
                        // Only signals for it are kept for its next host.
                        self.to_host.clear();
                        self.place = Where::Recovering {
                            from: node,
                            epoch: self.epoch + RECOVERY_EPOCHS,
                        };
                        self.reason = format!("node {node} died: recovering it");
                        acts.push(Act::Recover { number, node });
                    }
                    None => {
                        self.lost = true;
                        acts.push(Act::Lost {
                            message: format!(
                                "mosix: process {} was lost: node {node} stopped answering",
                                self.pid
                            ),
                        });
                    }
                }
            }
        }
        acts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[derive(Clone)]
    struct Rec<T>(Rc<RefCell<Vec<T>>>, Rc<RefCell<bool>>);
    impl<T> Default for Rec<T> {
        fn default() -> Self {
            Rec(
                Rc::new(RefCell::new(Vec::new())),
                Rc::new(RefCell::new(false)),
            )
        }
    }
    impl ToDeputySink for Rec<Vec<u8>> {
        fn send(&mut self, f: &[u8]) -> bool {
            if *self.1.borrow() {
                return false;
            }
            self.0.borrow_mut().push(f.to_vec());
            true
        }
    }
    impl ToHostSink for Rec<ToHost> {
        fn send(&mut self, m: &ToHost) -> bool {
            if *self.1.borrow() {
                return false;
            }
            self.0.borrow_mut().push(m.clone());
            true
        }
    }
    type J = Job<Rec<Vec<u8>>, Rec<ToHost>>;

    type Got = std::sync::Arc<std::sync::Mutex<Vec<MoveResult>>>;
    struct W(Got);
    impl Waiter for W {
        fn answer(self: Box<Self>, r: MoveResult) {
            self.0.lock().unwrap().push(r);
        }
    }
    fn got() -> Got {
        Default::default()
    }

    /// The number of the test's link of residence `epoch` from `node`.
    fn id(epoch: u64, node: u32) -> u64 {
        epoch * 100 + u64::from(node)
    }

    /// `migrate` to `to`, its answer into `got`.
    fn asked(to: u32, got: &Got) -> Ev<Rec<Vec<u8>>, Rec<ToHost>> {
        Ev::Migrate {
            to,
            reason: "r".into(),
            offer: None,
            reply: Some(Box::new(W(got.clone()))),
        }
    }

    fn moved(to: u32) -> super::super::Moved {
        super::super::Moved {
            to,
            frozen_ms: 1,
            memory_bytes: 2,
            rounds: Vec::new(),
        }
    }

    fn away(j: &mut J, t: Instant, to: u32) -> Got {
        let got = got();
        let a = j.handle(
            Ev::Migrate {
                to,
                reason: "test".into(),
                offer: None,
                reply: Some(Box::new(W(got.clone()))),
            },
            t,
        );
        assert!(matches!(a.as_slice(), [Act::Leave { to: x, .. }] if *x == to));
        assert_eq!(
            j.handle(
                Ev::LeftHome {
                    to,
                    moved: moved(to)
                },
                t
            ),
            vec![Act::Persist]
        );
        assert_eq!(got.lock().unwrap().len(), 1);
        got
    }

    #[test]
    fn frames_wait_for_the_end_that_is_not_there_yet() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        // The host links first and sends calls before the deputy has connected.
        let host = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                id: id(1, 2),
                link: host.clone(),
            },
            t,
        );
        j.handle(
            Ev::FromHost {
                id: id(1, 2),
                msg: ToHome::Deputy(b"call1".to_vec().into()),
            },
            t,
        );
        let dep = Rec::<Vec<u8>>::default();
        j.handle(Ev::DeputyConnected(dep.clone()), t);
        assert_eq!(*dep.0.borrow(), vec![b"call1".to_vec()]);
        j.handle(Ev::FromDeputy(b"reply1".to_vec().into()), t);
        assert_eq!(
            *host.0.borrow(),
            vec![ToHost::Deputy(b"reply1".to_vec().into())]
        );
        // The deputy's connection breaks (mosixd restarted): frames wait, then go.
        *dep.1.borrow_mut() = true;
        j.handle(
            Ev::FromHost {
                id: id(1, 2),
                msg: ToHome::Deputy(b"call2".to_vec().into()),
            },
            t,
        );
        let dep2 = Rec::<Vec<u8>>::default();
        j.handle(Ev::DeputyConnected(dep2.clone()), t);
        assert_eq!(*dep2.0.borrow(), vec![b"call2".to_vec()]);
    }

    #[test]
    fn a_new_host_that_links_and_calls_before_the_move_is_done_here_is_heard() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        let a = j.handle(
            Ev::Migrate {
                to: 2,
                reason: "r".into(),
                offer: None,
                reply: None,
            },
            t,
        );
        assert!(matches!(a.as_slice(), [Act::Leave { .. }]));
        // The destination runs it and links at once; its first call comes before our
        // leave thread has told the job that the move is done.
        let h = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                id: id(1, 2),
                link: h.clone(),
            },
            t,
        );
        j.handle(
            Ev::FromHost {
                id: id(1, 2),
                msg: ToHome::Deputy(b"call".to_vec().into()),
            },
            t,
        );
        let d = Rec::<Vec<u8>>::default();
        j.handle(Ev::DeputyConnected(d.clone()), t);
        assert!(d.0.borrow().is_empty());
        j.handle(
            Ev::LeftHome {
                to: 2,
                moved: moved(2),
            },
            t,
        );
        assert_eq!(*d.0.borrow(), vec![b"call".to_vec()]);
        j.handle(Ev::FromDeputy(b"answer".to_vec().into()), t);
        assert_eq!(
            *h.0.borrow(),
            vec![ToHost::Deputy(b"answer".to_vec().into())]
        );
    }

    #[test]
    fn when_the_last_host_dies_in_a_move_the_next_hosts_link_settles_it() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        let h2 = Rec::<ToHost>::default();
        let link = |j: &mut J, epoch, node, l: &Rec<ToHost>| {
            j.handle(
                Ev::HostLinked {
                    epoch,
                    node,
                    id: id(epoch, node),
                    link: l.clone(),
                },
                t,
            )
        };
        link(&mut j, 1, 2, &h2);
        let got = got();
        j.handle(asked(3, &got), t);
        // Node 2's mosixd dies during the commit: its link drops, no Left comes; node 3
        // runs it and links (a host links only once it runs it).
        j.handle(Ev::HostGone { id: id(1, 2) }, t);
        let h3 = Rec::<ToHost>::default();
        assert_eq!(link(&mut j, 2, 3, &h3), vec![Act::Persist]);
        assert_eq!(j.place, Where::Away { node: 3, epoch: 2 });
        assert!(matches!(got.lock().unwrap().as_slice(), [Ok(m)] if m.to == 3));
        // Node 2's restarted mosixd finds the supervisor of the old copy and links: the
        // copy is ended.
        let h2b = Rec::<ToHost>::default();
        link(&mut j, 1, 2, &h2b);
        assert_eq!(*h2b.0.borrow(), vec![ToHost::Kill]);
        // The same if the next host linked first, while the last one was still linked.
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        link(&mut j, 1, 2, &h2);
        link(&mut j, 2, 3, &h3);
        assert_eq!(j.place, Where::Away { node: 2, epoch: 1 }, "Left awaited");
        assert_eq!(
            j.handle(Ev::HostGone { id: id(1, 2) }, t),
            vec![Act::Persist]
        );
        assert_eq!(j.place, Where::Away { node: 3, epoch: 2 });
        // And if no next host links, the move is answered as failed: it stays there.
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        link(&mut j, 1, 2, &h2);
        let got3 = super::tests::got();
        j.handle(
            Ev::Migrate {
                to: 3,
                reason: "r".into(),
                offer: None,
                reply: Some(Box::new(W(got3.clone()))),
            },
            t,
        );
        j.handle(Ev::HostGone { id: id(1, 2) }, t);
        j.tick(t + DOUBT / 2);
        assert!(got3.lock().unwrap().is_empty());
        j.tick(t + DOUBT);
        assert!(matches!(
            got3.lock().unwrap().as_slice(),
            [Err(MoveError::PeerGone { node: 2, .. })]
        ));
        assert_eq!(j.place, Where::Away { node: 2, epoch: 1 });
    }

    #[test]
    fn a_move_home_is_answered_once_it_runs_home_whichever_is_heard_first() {
        for left_first in [true, false] {
            let t = Instant::now();
            let mut j = J::new(1, 100, 0, "x".into(), t);
            away(&mut j, t, 2);
            let h = Rec::<ToHost>::default();
            j.handle(
                Ev::HostLinked {
                    epoch: 1,
                    node: 2,
                    id: id(1, 2),
                    link: h.clone(),
                },
                t,
            );
            let got = super::tests::got();
            j.handle(asked(1, &got), t);
            let left = Ev::FromHost {
                id: id(1, 2),
                msg: ToHome::Left {
                    to: 1,
                    frozen_ms: 7,
                    memory_bytes: 8,
                    rounds: Vec::new(),
                },
            };
            let came = Ev::CameHome {
                moved: super::super::Moved {
                    to: 1,
                    frozen_ms: 0,
                    memory_bytes: 0,
                    rounds: Vec::new(),
                },
            };
            let (a, b) = if left_first {
                (left, came)
            } else {
                (came, left)
            };
            j.handle(a, t);
            if left_first {
                // `where` would still say node 2: no answer yet.
                assert!(got.lock().unwrap().is_empty());
                assert_eq!(j.node(), 2);
            }
            j.handle(b, t);
            assert_eq!(j.place, Where::Home);
            let r = got.lock().unwrap();
            assert_eq!(r.len(), 1);
            assert!(matches!(&r[0], Ok(m) if m.to == 1), "{:?}", r[0]);
            if left_first {
                assert!(matches!(&r[0], Ok(m) if m.frozen_ms == 7));
            }
        }
    }

    /// A job that went to node 2 and came home again (its memory still being put in, or
    /// all in).
    fn came_home(filling: bool) -> (J, Instant) {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        if filling {
            j.handle(Ev::Filling, t);
        }
        j.handle(Ev::CameHome { moved: moved(1) }, t);
        (j, t)
    }

    #[test]
    fn a_move_asked_while_its_memory_is_put_in_waits_for_it() {
        let (mut j, t) = came_home(true);
        let got = got();
        let ask = |j: &mut J, got: &Got| j.handle(asked(3, got), t);
        // The first waits for the fill; a second is told to try again.
        assert!(ask(&mut j, &got).is_empty());
        assert!(ask(&mut j, &got).is_empty());
        assert!(matches!(got.lock().unwrap()[..], [Err(MoveError::Busy)]));
        let acts = j.handle(Ev::Filled, t);
        assert!(matches!(acts[..], [Act::Leave { to: 3, .. }]), "{acts:?}");
        assert_eq!(got.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_copy_linking_after_its_process_came_home_is_ended() {
        let (mut j, t) = came_home(false);
        assert_eq!(j.place, Where::Home);
        let old = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                id: id(1, 2),
                link: old.clone(),
            },
            t,
        );
        assert_eq!(*old.0.borrow(), vec![ToHost::Kill]);
    }

    #[test]
    fn a_stale_or_foreign_link_is_ended_and_moves_follow_residences() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        let wrong = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 3,
                id: id(1, 3),
                link: wrong.clone(),
            },
            t,
        );
        j.handle(Ev::FromDeputy(b"r".to_vec().into()), t);
        assert_eq!(
            *wrong.0.borrow(),
            vec![ToHost::Kill],
            "node 3 does not host residence 1: its copy is ended, and gets no frames"
        );
        let h = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                id: id(1, 2),
                link: h.clone(),
            },
            t,
        );
        assert_eq!(
            h.0.borrow().len(),
            1,
            "the queued frame went to the right host"
        );
        // migrate to 3: asked of the host; it says Left.
        let got = got();
        j.handle(asked(3, &got), t);
        assert_eq!(h.0.borrow().last(), Some(&ToHost::Migrate { to: 3 }));
        let a = j.handle(
            Ev::FromHost {
                id: id(1, 2),
                msg: ToHome::Left {
                    to: 3,
                    frozen_ms: 5,
                    memory_bytes: 6,
                    rounds: vec![],
                },
            },
            t,
        );
        assert_eq!(a, vec![Act::Persist]);
        assert_eq!(j.place, Where::Away { node: 3, epoch: 2 });
        assert!(matches!(
            got.lock().unwrap()[0],
            Ok(super::super::Moved { to: 3, .. })
        ));
        // Messages of the old residence are dropped now.
        j.handle(
            Ev::FromHost {
                id: id(1, 2),
                msg: ToHome::Deputy(b"old".to_vec().into()),
            },
            t,
        );
        let d = Rec::<Vec<u8>>::default();
        j.handle(Ev::DeputyConnected(d.clone()), t);
        assert!(d.0.borrow().iter().all(|f| f != b"old"));
    }

    #[test]
    fn refusals_are_typed_and_nothing_moves() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        let got = got();
        j.handle(asked(1, &got), t);
        assert!(matches!(
            got.lock().unwrap()[0],
            Err(MoveError::AlreadyThere { to: 1 })
        ));
        j.handle(
            Ev::Migrate {
                to: 2,
                reason: "r".into(),
                offer: None,
                reply: None,
            },
            t,
        );
        j.handle(asked(3, &got), t);
        assert!(matches!(got.lock().unwrap()[1], Err(MoveError::Busy)));
        j.handle(
            Ev::LeaveFailed {
                to: 2,
                err: MoveError::Refused {
                    node: 2,
                    reason: "full".into(),
                },
            },
            t,
        );
        assert_eq!(j.place, Where::Home);
    }

    #[test]
    fn a_host_that_dies_makes_the_process_lost_and_a_dead_deputy_kills_it() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        assert!(j.tick(t + Duration::from_secs(2)).is_empty());
        j.handle(Ev::NodeState { node: 2, up: false }, t);
        let a = j.tick(t + Duration::from_secs(4));
        assert!(matches!(a.as_slice(), [Act::Lost { message }] if message.contains("node 2")));
        // A dead machine closes none of its connections: down with its link still open,
        // it is lost only after LINK_WAIT (a partition of a few seconds is survived).
        let mut j = J::new(1, 102, 0, "x".into(), t);
        away(&mut j, t, 2);
        let h = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                id: id(1, 2),
                link: h.clone(),
            },
            t,
        );
        j.handle(Ev::NodeState { node: 2, up: false }, t);
        assert!(j.tick(t + Duration::from_secs(10)).is_empty());
        j.handle(
            Ev::NodeState { node: 2, up: true },
            t + Duration::from_secs(10),
        );
        assert!(j.tick(t + LINK_WAIT).is_empty(), "it came back");
        j.handle(Ev::NodeState { node: 2, up: false }, t + LINK_WAIT);
        let a = j.tick(t + LINK_WAIT * 2);
        assert!(matches!(a.as_slice(), [Act::Lost { .. }]));
        assert!(j.tick(t + LINK_WAIT * 3).is_empty(), "told once");
        // Killing the deputy at home kills the process on its host.
        let mut j = J::new(1, 101, 0, "x".into(), t);
        away(&mut j, t, 2);
        let h = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                id: id(1, 2),
                link: h.clone(),
            },
            t,
        );
        assert_eq!(j.handle(Ev::PidEnded, t), vec![Act::Forget]);
        assert_eq!(h.0.borrow().last(), Some(&ToHost::Kill));
    }

    fn frame<T: serde::Serialize>(m: &T) -> Frame {
        mosix_remote::wire::encode(m).into()
    }

    #[test]
    fn a_host_that_dies_brings_a_process_with_a_checkpoint_back_as_a_newer_residence() {
        use mosix_remote::wire::{FromDeputy, Reply};
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        let h2 = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                id: id(1, 2),
                link: h2.clone(),
            },
            t,
        );
        let dep = Rec::<Vec<u8>>::default();
        j.handle(Ev::DeputyConnected(dep.clone()), t);
        // Its deputy's marks are for home, not for the host.
        let a = j.handle(
            Ev::FromDeputy(frame(&FromDeputy::Marked {
                id: 3,
                result: Ok(MarkedAt::default()),
            })),
            t,
        );
        assert!(matches!(
            a.as_slice(),
            [Act::Marked {
                id: 3,
                result: Ok(_)
            }]
        ));
        assert!(h2.0.borrow().is_empty());
        j.recovery = Some(3);
        // Node 2 dies: its link drops and gossip calls it down.
        j.handle(Ev::HostGone { id: id(1, 2) }, t);
        j.handle(Ev::NodeState { node: 2, up: false }, t);
        assert!(j.tick(t + DOWN_WAIT / 2).is_empty());
        let a = j.tick(t + DOWN_WAIT);
        assert_eq!(a, vec![Act::Recover { number: 3, node: 2 }]);
        let e = 1 + RECOVERY_EPOCHS;
        assert_eq!(j.place, Where::Recovering { from: 2, epoch: e });
        assert!(j.recovery.is_none(), "used once");
        assert!(j.tick(t + LINK_WAIT * 2).is_empty(), "not lost meanwhile");
        // Moves wait; answers to the dead copy's calls are dropped, signals are kept for
        // where it comes back; the deputy's rewind is home's.
        let got = got();
        j.handle(asked(3, &got), t);
        assert!(matches!(
            got.lock().unwrap().as_slice(),
            [Err(MoveError::Busy)]
        ));
        j.handle(
            Ev::FromDeputy(frame(&FromDeputy::Reply(Reply::Cancelled { seq: 9 }))),
            t,
        );
        j.handle(Ev::FromDeputy(frame(&FromDeputy::Signal { sig: 15 })), t);
        let a = j.handle(
            Ev::FromDeputy(frame(&FromDeputy::Rewound {
                id: 3,
                result: Ok(41),
            })),
            t,
        );
        assert_eq!(
            a,
            vec![Act::Rewound {
                number: 3,
                result: Ok(41)
            }]
        );
        // The cut-off copy of node 2 links again: it is not the process any more, and
        // what it says is not heard.
        let old = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                id: id(1, 2),
                link: old.clone(),
            },
            t,
        );
        assert_eq!(*old.0.borrow(), vec![ToHost::Kill]);
        j.handle(
            Ev::FromHost {
                id: id(1, 2),
                msg: ToHome::Deputy(b"stale call".to_vec().into()),
            },
            t,
        );
        // Its restored copy on node 4 links before the recovery is done here.
        let h4 = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: e,
                node: 4,
                id: id(e, 4),
                link: h4.clone(),
            },
            t,
        );
        j.handle(
            Ev::FromHost {
                id: id(e, 4),
                msg: ToHome::Deputy(b"new call".to_vec().into()),
            },
            t,
        );
        assert!(!dep
            .0
            .borrow()
            .iter()
            .any(|f| f == b"stale call" || f == b"new call"));
        let a = j.handle(
            Ev::Recovered {
                moved: moved(4),
                epoch: e,
            },
            t,
        );
        assert_eq!(a, vec![Act::Persist]);
        assert_eq!(j.place, Where::Away { node: 4, epoch: e });
        assert_eq!(j.epoch, e);
        assert!(dep.0.borrow().iter().any(|f| f == b"new call"));
        assert!(!dep.0.borrow().iter().any(|f| f == b"stale call"));
        let sent = h4.0.borrow().clone();
        assert_eq!(
            sent,
            vec![ToHost::Deputy(frame(&FromDeputy::Signal { sig: 15 }))],
            "only the signal went to the new host"
        );
        // A copy of any older residence is ended.
        let older = Rec::<ToHost>::default();
        j.handle(
            Ev::HostLinked {
                epoch: 2,
                node: 3,
                id: id(2, 3),
                link: older.clone(),
            },
            t,
        );
        assert_eq!(*older.0.borrow(), vec![ToHost::Kill]);
    }

    #[test]
    fn a_cut_off_host_is_given_up_sooner_when_there_is_a_checkpoint() {
        let t = Instant::now();
        for (recovery, after) in [(Some(1), RECOVER_WAIT), (None, LINK_WAIT)] {
            let mut j = J::new(1, 100, 0, "x".into(), t);
            away(&mut j, t, 2);
            let h = Rec::<ToHost>::default();
            j.handle(
                Ev::HostLinked {
                    epoch: 1,
                    node: 2,
                    id: id(1, 2),
                    link: h.clone(),
                },
                t,
            );
            j.recovery = recovery;
            // Down, its link still open (a cut cable closes nothing).
            j.handle(Ev::NodeState { node: 2, up: false }, t);
            assert!(j.tick(t + after - Duration::from_millis(1)).is_empty());
            let a = j.tick(t + after);
            match recovery {
                Some(n) => assert_eq!(a, vec![Act::Recover { number: n, node: 2 }]),
                None => assert!(matches!(a.as_slice(), [Act::Lost { .. }])),
            }
        }
        // Down in the cluster's view, but its link carries its calls: not given up (an
        // overloaded host, lost gossip), until the link too is silent that long.
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        let h = Rec::<ToHost>::default();
        let hid = id(1, 2);
        j.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                id: hid,
                link: h.clone(),
            },
            t,
        );
        j.recovery = Some(1);
        j.handle(Ev::NodeState { node: 2, up: false }, t);
        let call = |j: &mut J, at: Instant| {
            j.handle(
                Ev::FromHost {
                    id: hid,
                    msg: ToHome::Deputy(vec![1, 2, 3].into()),
                },
                at,
            );
        };
        call(&mut j, t + RECOVER_WAIT - Duration::from_secs(1));
        assert!(j.tick(t + RECOVER_WAIT).is_empty());
        call(&mut j, t + 2 * RECOVER_WAIT - Duration::from_secs(1));
        assert!(j.tick(t + 2 * RECOVER_WAIT).is_empty());
        let a = j.tick(t + 3 * RECOVER_WAIT);
        assert_eq!(a, vec![Act::Recover { number: 1, node: 2 }]);

        // A recovery that fails: lost, with why.
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        j.recovery = Some(1);
        j.handle(Ev::NodeState { node: 2, up: false }, t);
        j.tick(t + DOWN_WAIT);
        let a = j.handle(
            Ev::RecoverFailed {
                why: CkptError::NoNode,
            },
            t,
        );
        assert!(
            matches!(a.as_slice(), [Act::Lost { message }] if message.contains("no node can take it")),
            "{a:?}"
        );
    }

    #[test]
    fn a_frozen_process_does_not_move_and_one_recovered_here_may_come_home() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        j.frozen = true;
        let got = got();
        j.handle(asked(2, &got), t);
        assert!(matches!(
            got.lock().unwrap().as_slice(),
            [Err(MoveError::Frozen)]
        ));
        // Recovered here: it runs under a supervisor, as away on this node; a move home
        // is asked of that host (itself).
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        j.recovery = Some(1);
        j.handle(Ev::NodeState { node: 2, up: false }, t);
        j.tick(t + DOWN_WAIT);
        j.handle(
            Ev::Recovered {
                moved: moved(1),
                epoch: 1 + RECOVERY_EPOCHS,
            },
            t,
        );
        assert!(!j.native());
        let here = Rec::<ToHost>::default();
        let e = j.epoch;
        j.handle(
            Ev::HostLinked {
                epoch: e,
                node: 1,
                id: id(e, 1),
                link: here.clone(),
            },
            t,
        );
        j.handle(
            Ev::Migrate {
                to: 1,
                reason: "r".into(),
                offer: None,
                reply: None,
            },
            t,
        );
        assert_eq!(*here.0.borrow(), vec![ToHost::Migrate { to: 1 }]);
    }

    fn link(j: &mut J, epoch: u64, node: u32, id: u64, l: &Rec<ToHost>) -> Vec<Act> {
        j.handle(
            Ev::HostLinked {
                epoch,
                node,
                id,
                link: l.clone(),
            },
            Instant::now(),
        )
    }

    fn call(j: &mut J, id: u64, what: &[u8]) {
        j.handle(
            Ev::FromHost {
                id,
                msg: ToHome::Deputy(what.to_vec().into()),
            },
            Instant::now(),
        );
    }

    #[test]
    fn a_recovery_whose_first_commit_got_no_answer_leaves_one_copy() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        let h2 = Rec::<ToHost>::default();
        link(&mut j, 1, 2, id(1, 2), &h2);
        let dep = Rec::<Vec<u8>>::default();
        j.handle(Ev::DeputyConnected(dep.clone()), t);
        j.recovery = Some(3);
        j.handle(Ev::HostGone { id: id(1, 2) }, t);
        j.handle(Ev::NodeState { node: 2, up: false }, t);
        assert_eq!(
            j.tick(t + DOWN_WAIT),
            vec![Act::Recover { number: 3, node: 2 }]
        );
        let e = 1 + RECOVERY_EPOCHS;
        // Node 3 was tried first: its commit got no answer, yet it runs the copy and
        // links; node 4, tried next as the next residence, runs it too.
        let h3 = Rec::<ToHost>::default();
        link(&mut j, e, 3, 103, &h3);
        call(&mut j, 103, b"from 3");
        let h4 = Rec::<ToHost>::default();
        link(&mut j, e + 1, 4, 104, &h4);
        call(&mut j, 104, b"from 4");
        let a = j.handle(
            Ev::Recovered {
                moved: moved(4),
                epoch: e + 1,
            },
            t,
        );
        assert_eq!(a, vec![Act::Persist]);
        assert_eq!(
            j.place,
            Where::Away {
                node: 4,
                epoch: e + 1
            }
        );
        assert_eq!(*h3.0.borrow(), vec![ToHost::Kill], "node 3's copy is ended");
        assert_eq!(
            *dep.0.borrow(),
            vec![b"from 4".to_vec()],
            "only node 4 is heard"
        );
        // Node 3's link breaks (its copy ended), or it links again: node 4 stays the host.
        j.handle(Ev::HostGone { id: 103 }, t);
        let h3b = Rec::<ToHost>::default();
        link(&mut j, e, 3, 203, &h3b);
        assert_eq!(*h3b.0.borrow(), vec![ToHost::Kill]);
        call(&mut j, 203, b"again from 3");
        j.handle(Ev::FromDeputy(b"answer".to_vec().into()), t);
        assert_eq!(
            *h4.0.borrow(),
            vec![ToHost::Deputy(b"answer".to_vec().into())]
        );
        assert_eq!(*dep.0.borrow(), vec![b"from 4".to_vec()]);
        assert!(j.tick(t + LINK_WAIT * 2).is_empty(), "node 4 is linked");
    }

    #[test]
    fn only_the_link_taken_is_heard_and_its_end_alone_unlinks_the_host() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        away(&mut j, t, 2);
        let dep = Rec::<Vec<u8>>::default();
        j.handle(Ev::DeputyConnected(dep.clone()), t);
        let old = Rec::<ToHost>::default();
        link(&mut j, 1, 2, 10, &old);
        // Its host links again (a new connection) before the old one's end is heard.
        let new = Rec::<ToHost>::default();
        link(&mut j, 1, 2, 11, &new);
        j.handle(Ev::HostGone { id: 10 }, t);
        j.handle(Ev::FromDeputy(b"answer".to_vec().into()), t);
        assert_eq!(
            *new.0.borrow(),
            vec![ToHost::Deputy(b"answer".to_vec().into())],
            "the old link's end did not unlink the host"
        );
        assert!(old.0.borrow().is_empty());
        // A link of the same residence from another node is ended, and not heard.
        let other = Rec::<ToHost>::default();
        link(&mut j, 1, 3, 12, &other);
        assert_eq!(*other.0.borrow(), vec![ToHost::Kill]);
        call(&mut j, 12, b"from 3");
        call(&mut j, 11, b"from 2");
        assert_eq!(*dep.0.borrow(), vec![b"from 2".to_vec()]);
        // Its end unlinks the host.
        j.handle(Ev::HostGone { id: 11 }, t);
        assert_eq!(j.linked(), (true, false));
    }

    #[test]
    fn a_move_from_home_tried_before_ends_the_copy_it_left_when_the_next_move_is_done() {
        // A move to node 3 whose commit got no answer (it went on here), then a move to
        // node 4 as the same residence: node 3's copy is ended, whenever it links.
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        for to in [3, 4] {
            j.handle(
                Ev::Migrate {
                    to,
                    reason: "r".into(),
                    offer: None,
                    reply: None,
                },
                t,
            );
            if to == 3 {
                j.handle(
                    Ev::LeaveFailed {
                        to,
                        err: MoveError::PeerGone {
                            node: 3,
                            why: "no answer to the commit".into(),
                        },
                    },
                    t,
                );
            }
        }
        let h3 = Rec::<ToHost>::default();
        link(&mut j, 1, 3, 13, &h3);
        assert_eq!(*h3.0.borrow(), vec![ToHost::Kill], "while leaving to 4");
        let h4 = Rec::<ToHost>::default();
        link(&mut j, 1, 4, 14, &h4);
        j.handle(
            Ev::LeftHome {
                to: 4,
                moved: moved(4),
            },
            t,
        );
        let h3b = Rec::<ToHost>::default();
        link(&mut j, 1, 3, 23, &h3b);
        assert_eq!(*h3b.0.borrow(), vec![ToHost::Kill], "once away on 4");
        assert!(h4.0.borrow().is_empty());
        assert!(j.linked().1, "node 4 is its host");
    }

    #[test]
    fn a_move_asked_while_a_checkpoint_is_taken_at_home_is_refused_with_why() {
        let t = Instant::now();
        let mut j = J::new(1, 100, 0, "x".into(), t);
        j.checkpointing = true;
        let got = got();
        let a = j.handle(asked(2, &got), t);
        assert!(a.is_empty(), "no second mover: {a:?}");
        assert_eq!(j.place, Where::Home);
        let r = got.lock().unwrap();
        assert!(matches!(r.as_slice(), [Err(MoveError::Checkpointing)]));
        assert!(r[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("checkpoint"));
        drop(r);
        // Once it is written, it moves.
        j.checkpointing = false;
        let a = j.handle(
            Ev::Migrate {
                to: 2,
                reason: "r".into(),
                offer: None,
                reply: None,
            },
            t,
        );
        assert!(matches!(a.as_slice(), [Act::Leave { to: 2, .. }]));
    }
}
