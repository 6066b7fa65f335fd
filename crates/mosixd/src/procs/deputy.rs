//! The deputy: the home side of one process; holds the `mosrun` connection and follows
//! the process from host to host.
//!
//! [`Deputy`] is a state machine without I/O or clocks: events in ([`Ev`]), with the time
//! given by the caller; what it says goes out through two small traits, [`HostLink`] (the
//! current host) and [`RunSink`] (mosrun). The daemon drives it from one thread
//! ([`drive`]) with a [`Downlink`] and the queue of a writer thread ([`write_to_run`]);
//! the tests below drive it with vectors.

use super::*;

/// The link to the host a process runs on.
pub(super) trait HostLink {
    fn send(&mut self, m: ToHost) -> std::io::Result<()>;
}

impl HostLink for Downlink {
    fn send(&mut self, m: ToHost) -> std::io::Result<()> {
        Downlink::send(self, m)
    }
}

/// The way to `mosrun`; false once it is gone.
pub(super) trait RunSink {
    fn send(&mut self, m: ToRun) -> bool;
}

impl RunSink for Sender<ToRun> {
    fn send(&mut self, m: ToRun) -> bool {
        Sender::send(self, m).is_ok()
    }
}

/// The home side of one process.
pub(super) struct Deputy<L: HostLink, R: RunSink> {
    me: u32,
    home_pid: i32,
    info: Arc<Mutex<DeputyInfo>>,
    run: Option<R>,
    epoch: u64,
    down: Option<L>,
    /// Stdin not yet known to be consumed.
    stdin: flow::StdinLog,
    closed_out: [bool; 2],
    signals: Vec<i32>,
    pending: BTreeMap<u64, Vec<Ev<L>>>,
    waiters: Vec<(u32, Sender<Result<Moved, String>>)>,
    ended: bool,
    run_gone: bool,
    /// Since when it has had no host link (between a host's `Left` and the next link, or
    /// since a link broke).
    unlinked_since: Option<Instant>,
    initial_move: Option<Receiver<Result<Moved, String>>>,
}

impl<L: HostLink, R: RunSink> Deputy<L, R> {
    pub(super) fn new(me: u32, home_pid: i32, info: Arc<Mutex<DeputyInfo>>, run: R) -> Self {
        Deputy {
            me,
            home_pid,
            info,
            run: Some(run),
            epoch: 0,
            down: None,
            stdin: flow::StdinLog::default(),
            closed_out: [false; 2],
            signals: Vec::new(),
            pending: BTreeMap::new(),
            waiters: Vec::new(),
            ended: false,
            run_gone: false,
            unlinked_since: None,
            initial_move: None,
        }
    }

    pub(super) fn ended(&self) -> bool {
        self.ended
    }

    /// `mosrun -r/-b`: the first move, whose failure mosrun is told about.
    pub(super) fn initial_move(&mut self, to: u32, now: Instant) {
        let (tx, rx) = mpsc::channel();
        self.handle(Ev::Migrate { to, reply: tx }, now);
        self.initial_move = Some(rx);
    }

    /// Time passed without an event: a host that took the process and never linked
    /// within [`LINK_WAIT`] is taken as gone.
    pub(super) fn tick(&mut self, now: Instant) {
        self.check_initial_move();
        if self
            .unlinked_since
            .is_some_and(|t| now.duration_since(t) > LINK_WAIT)
        {
            self.lost("took it but never reported");
        }
    }

    fn check_initial_move(&mut self) {
        if let Some(rx) = &self.initial_move {
            match rx.try_recv() {
                Ok(Err(why)) => {
                    self.initial_move = None;
                    self.tell_run(ToRun::Out {
                        fd: 2,
                        data: format!("mosrun: could not move the process: {why}\n").into_bytes(),
                    });
                }
                Ok(Ok(_)) | Err(mpsc::TryRecvError::Disconnected) => self.initial_move = None,
                Err(mpsc::TryRecvError::Empty) => {}
            }
        }
    }

    fn tell_run(&mut self, m: ToRun) {
        if self.run_gone {
            return;
        }
        if let Some(r) = &mut self.run {
            if !r.send(m) {
                self.run_gone = true;
            }
        }
    }

    fn tell_host(&mut self, m: ToHost, now: Instant) {
        if let Some(d) = &mut self.down {
            if d.send(m).is_err() {
                // The link broke: the host is as good as gone unless it links again.
                warn!(pid = self.home_pid, "lost the link to the process's host");
                self.down = None;
                self.unlinked_since = Some(now);
            }
        } else if let ToHost::Signal(s) = m {
            self.signals.push(s);
        }
    }

    pub(super) fn handle(&mut self, ev: Ev<L>, now: Instant) {
        match ev {
            Ev::FromRun(m) => match m {
                FromRun::Stdin(data) => match self.stdin.push(&data) {
                    Ok(at) => self.tell_host(ToHost::Stdin { at, data }, now),
                    Err(e) => {
                        warn!(pid = self.home_pid, "mosrun broke the protocol: {e}");
                        self.handle(Ev::RunGone, now);
                    }
                },
                FromRun::StdinEof => {
                    self.stdin.set_eof();
                    let at = self.stdin.end();
                    self.tell_host(ToHost::StdinEof { at }, now);
                }
                FromRun::Signal(s) => self.tell_host(ToHost::Signal(s), now),
                FromRun::OutClosed(fd) => {
                    if (1..=2).contains(&fd) {
                        self.closed_out[fd as usize - 1] = true;
                        self.tell_host(ToHost::CloseOut(fd), now);
                    }
                }
            },
            Ev::RunWrote(n) => self.tell_host(ToHost::OutAck { bytes: n }, now),
            Ev::RunGone => {
                // Nobody waits for it any more: end it, as MOSIX does.
                self.run_gone = true;
                self.tell_host(ToHost::Signal(libc::SIGKILL), now);
            }
            Ev::FromHost { epoch, msg } => {
                if epoch > self.epoch {
                    self.pending
                        .entry(epoch)
                        .or_default()
                        .push(Ev::FromHost { epoch, msg });
                } else if epoch == self.epoch {
                    self.on_host_msg(msg, now);
                }
            }
            Ev::HostLinked { epoch, node, down } => {
                let expected = lock(&self.info).node;
                if epoch > self.epoch {
                    self.pending.entry(epoch).or_default().push(Ev::HostLinked {
                        epoch,
                        node,
                        down,
                    });
                } else if epoch == self.epoch && node != expected {
                    warn!(
                        pid = self.home_pid,
                        "node {node} linked as the host of residence {epoch}, which is node {expected}'s: ignored"
                    );
                } else if epoch == self.epoch {
                    self.down = Some(down);
                    self.unlinked_since = None;
                    self.resend_state(now);
                }
            }
            Ev::HostGone { epoch, why } => {
                if epoch == self.epoch && !self.ended {
                    self.lost(&why);
                }
            }
            Ev::Migrate { to, reply } => {
                let node = lock(&self.info).node;
                if node == to {
                    let _ = reply.send(Err(format!(
                        "process {} is already on node {to}",
                        self.home_pid
                    )));
                } else if self.down.is_none() {
                    let _ = reply.send(Err(format!(
                        "process {} is in the middle of a move; try again",
                        self.home_pid
                    )));
                } else {
                    self.waiters.push((to, reply));
                    self.tell_host(ToHost::Migrate { to }, now);
                }
            }
        }
    }

    /// The process has consumed stdin up to `at`: forget it, and let mosrun send more.
    fn stdin_consumed(&mut self, at: u64) {
        if self.stdin.consumed(at) {
            let at = self.stdin.base();
            self.tell_run(ToRun::StdinAck { at });
        }
    }

    fn on_host_msg(&mut self, msg: ToHome, now: Instant) {
        match msg {
            ToHome::StdinConsumed { at } => self.stdin_consumed(at),
            ToHome::Out { fd, data } => self.tell_run(ToRun::Out { fd, data }),
            ToHome::Exited(st) => self.finish(st, None),
            ToHome::MigrateFailed { to, reason } => {
                let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
                    .into_iter()
                    .partition(|w| w.0 == to);
                self.waiters = rest;
                for (_, r) in mine {
                    let _ = r.send(Err(reason.clone()));
                }
            }
            ToHome::Left {
                to,
                stdin_consumed,
                frozen_ms,
                memory_bytes,
            } => {
                self.stdin_consumed(stdin_consumed);
                self.epoch += 1;
                self.down = None;
                self.unlinked_since = Some(now);
                {
                    let mut i = lock(&self.info);
                    i.node = to;
                    i.since = now;
                    i.state = if to == self.me { "running" } else { "away" };
                }
                info!(
                    pid = self.home_pid,
                    node = to,
                    "process now runs on node {to}"
                );
                for (t, r) in std::mem::take(&mut self.waiters) {
                    let _ = r.send(if t == to {
                        Ok(Moved {
                            to,
                            frozen_ms,
                            memory_bytes,
                        })
                    } else {
                        Err(format!("it moved to node {to} instead"))
                    });
                }
                if let Some(evs) = self.pending.remove(&self.epoch) {
                    for ev in evs {
                        self.handle(ev, now);
                    }
                }
            }
        }
    }

    /// A new host: give it the stdin it has not consumed and what happened meanwhile.
    fn resend_state(&mut self, now: Instant) {
        let pieces: Vec<ToHost> = self
            .stdin
            .pieces()
            .map(|(at, d)| ToHost::Stdin {
                at,
                data: d.to_vec(),
            })
            .collect();
        for m in pieces {
            self.tell_host(m, now);
        }
        if self.stdin.eof() {
            let at = self.stdin.end();
            self.tell_host(ToHost::StdinEof { at }, now);
        }
        for fd in 1..=2u8 {
            if self.closed_out[fd as usize - 1] {
                self.tell_host(ToHost::CloseOut(fd), now);
            }
        }
        for s in std::mem::take(&mut self.signals) {
            self.tell_host(ToHost::Signal(s), now);
        }
        if self.run_gone {
            self.tell_host(ToHost::Signal(libc::SIGKILL), now);
        }
    }

    /// The node it ran on is gone (`why` says how): tell mosrun it was lost, and end.
    fn lost(&mut self, why: &str) {
        let node = lock(&self.info).node;
        let msg = format!(
            "mosrun: process {} was lost: node {node} {why}",
            self.home_pid
        );
        warn!("{msg}");
        self.finish(ExitStatus::Lost, Some(msg));
    }

    fn finish(&mut self, status: ExitStatus, message: Option<String>) {
        self.ended = true;
        for (_, r) in std::mem::take(&mut self.waiters) {
            let _ = r.send(Err(format!("process {} has ended", self.home_pid)));
        }
        self.tell_run(ToRun::Exited { status, message });
        // The writer sends what is queued, then closes the connection.
        self.run = None;
    }
}

/// The daemon's deputy thread: events from the queue, a tick when none come.
pub(super) fn drive(d: &mut Deputy<Downlink, Sender<ToRun>>, rx: Receiver<DevEv>) {
    while !d.ended() {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => {
                d.handle(ev, Instant::now());
                d.check_initial_move();
            }
            Err(_) => d.tick(Instant::now()),
        }
    }
}

/// The deputy's writer thread: gives `mosrun` its frames in order, reports how many output
/// bytes it took (for the host's output window), and closes the connection when the
/// deputy is done with it.
pub(super) fn write_to_run(mut w: UnixStream, rx: Receiver<ToRun>, events: Sender<DevEv>) {
    let mut failed = false;
    for m in rx {
        if failed {
            continue;
        }
        let out = match &m {
            ToRun::Out { data, .. } => data.len() as u64,
            _ => 0,
        };
        if wire::send_flush(&mut w, &m).is_err() {
            failed = true;
            let _ = events.send(DevEv::RunGone);
            continue;
        }
        if out > 0 {
            let _ = events.send(DevEv::RunWrote(out));
        }
    }
    let _ = w.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A host link that records what it is sent (and may be broken).
    #[derive(Clone, Default)]
    struct FakeHost {
        sent: Rc<RefCell<Vec<ToHost>>>,
        broken: Rc<RefCell<bool>>,
    }
    impl HostLink for FakeHost {
        fn send(&mut self, m: ToHost) -> std::io::Result<()> {
            if *self.broken.borrow() {
                return Err(std::io::Error::other("broken"));
            }
            self.sent.borrow_mut().push(m);
            Ok(())
        }
    }
    #[derive(Clone, Default)]
    struct FakeRun(Rc<RefCell<Vec<ToRun>>>);
    impl RunSink for FakeRun {
        fn send(&mut self, m: ToRun) -> bool {
            self.0.borrow_mut().push(m);
            true
        }
    }

    const HOME: u32 = 1;

    fn deputy() -> (Deputy<FakeHost, FakeRun>, FakeRun, Instant) {
        let info = Arc::new(Mutex::new(DeputyInfo {
            uid: 0,
            cmd: "job".into(),
            node: HOME,
            state: "running",
            mosrun_pid: None,
            since: Instant::now(),
        }));
        let run = FakeRun::default();
        let mut d = Deputy::new(HOME, 100, info, run.clone());
        let t = Instant::now();
        d.handle(
            Ev::HostLinked {
                epoch: 0,
                node: HOME,
                down: FakeHost::default(),
            },
            t,
        );
        (d, run, t)
    }

    fn left(to: u32, consumed: u64) -> ToHome {
        ToHome::Left {
            to,
            stdin_consumed: consumed,
            frozen_ms: 1,
            memory_bytes: 4096,
        }
    }

    /// The process left home for node 2 (nothing consumed) and node 2 linked.
    fn moved_to_2(d: &mut Deputy<FakeHost, FakeRun>, t: Instant) -> FakeHost {
        d.handle(
            Ev::FromHost {
                epoch: 0,
                msg: left(2, 0),
            },
            t,
        );
        let h = FakeHost::default();
        d.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                down: h.clone(),
            },
            t,
        );
        h
    }

    fn stdin_sent(h: &FakeHost) -> Vec<(u64, usize)> {
        h.sent
            .borrow()
            .iter()
            .filter_map(|m| match m {
                ToHost::Stdin { at, data } => Some((*at, data.len())),
                _ => None,
            })
            .collect()
    }

    /// The next host links before the old host's `Left` arrives, and its output too: both
    /// wait for `Left`, so output stays in order, and the new host gets the unconsumed
    /// stdin in pieces of at most one message.
    #[test]
    fn a_new_residence_waits_for_the_old_ones_left() {
        let (mut d, run, t) = deputy();
        let data = vec![b'x'; 200 << 10];
        for c in data.chunks(64 << 10) {
            d.handle(Ev::FromRun(FromRun::Stdin(c.to_vec())), t);
        }
        d.handle(Ev::FromRun(FromRun::StdinEof), t);
        let h2 = FakeHost::default();
        d.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 2,
                down: h2.clone(),
            },
            t,
        );
        d.handle(
            Ev::FromHost {
                epoch: 1,
                msg: ToHome::Out {
                    fd: 1,
                    data: b"second".to_vec(),
                },
            },
            t,
        );
        assert!(
            h2.sent.borrow().is_empty(),
            "linked before the old host left"
        );
        d.handle(
            Ev::FromHost {
                epoch: 0,
                msg: ToHome::Out {
                    fd: 1,
                    data: b"first".to_vec(),
                },
            },
            t,
        );
        d.handle(
            Ev::FromHost {
                epoch: 0,
                msg: left(2, 10_000),
            },
            t,
        );
        let outs: Vec<Vec<u8>> = run
            .0
            .borrow()
            .iter()
            .filter_map(|m| match m {
                ToRun::Out { data, .. } => Some(data.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(outs, vec![b"first".to_vec(), b"second".to_vec()]);
        assert!(run.0.borrow().contains(&ToRun::StdinAck { at: 10_000 }));
        let pieces = stdin_sent(&h2);
        assert_eq!(pieces.first().map(|p| p.0), Some(10_000));
        assert!(pieces.iter().all(|p| p.1 <= mosix_proto::wire::MAX_DATA));
        let total: usize = pieces.iter().map(|p| p.1).sum();
        assert_eq!(total, (200 << 10) - 10_000);
        assert!(h2
            .sent
            .borrow()
            .contains(&ToHost::StdinEof { at: 200 << 10 }));
        assert_eq!(lock(&d.info).node, 2);
    }

    /// Signals while no host is linked are kept and delivered to the next host.
    #[test]
    fn signals_between_hosts_reach_the_next_host() {
        let (mut d, _run, t) = deputy();
        d.handle(
            Ev::FromHost {
                epoch: 0,
                msg: left(3, 0),
            },
            t,
        );
        d.handle(Ev::FromRun(FromRun::Signal(libc::SIGTERM)), t);
        let h3 = FakeHost::default();
        d.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 3,
                down: h3.clone(),
            },
            t,
        );
        assert!(h3.sent.borrow().contains(&ToHost::Signal(libc::SIGTERM)));
    }

    /// A link from a node other than the one the process went to is not taken.
    #[test]
    fn a_link_from_the_wrong_node_is_ignored() {
        let (mut d, _run, t) = deputy();
        d.handle(
            Ev::FromHost {
                epoch: 0,
                msg: left(3, 0),
            },
            t,
        );
        let impostor = FakeHost::default();
        d.handle(
            Ev::HostLinked {
                epoch: 1,
                node: 4,
                down: impostor.clone(),
            },
            t,
        );
        d.handle(Ev::FromRun(FromRun::Signal(libc::SIGINT)), t);
        assert!(impostor.sent.borrow().is_empty());
    }

    /// A link that breaks (as a too-large message once did) does not leave the process
    /// waiting forever: after LINK_WAIT without a new link it is reported lost.
    #[test]
    fn a_broken_link_ends_in_lost_not_in_a_hang() {
        let (mut d, run, t) = deputy();
        let h2 = moved_to_2(&mut d, t);
        *h2.broken.borrow_mut() = true;
        d.handle(Ev::FromRun(FromRun::Stdin(b"more".to_vec())), t);
        d.tick(t + LINK_WAIT / 2);
        assert!(!d.ended());
        d.tick(t + LINK_WAIT + Duration::from_secs(1));
        assert!(d.ended());
        assert!(matches!(
            run.0.borrow().last(),
            Some(ToRun::Exited {
                status: ExitStatus::Lost,
                ..
            })
        ));
    }

    /// Output delivered to mosrun is acknowledged to the host (its output window).
    #[test]
    fn delivered_output_is_acknowledged_to_the_host() {
        let (mut d, _run, t) = deputy();
        let h = moved_to_2(&mut d, t);
        d.handle(Ev::RunWrote(4096), t);
        assert!(h.sent.borrow().contains(&ToHost::OutAck { bytes: 4096 }));
    }

    /// mosrun sending more stdin than its window is a protocol breach: the job is ended.
    #[test]
    fn stdin_beyond_the_window_ends_the_job() {
        let (mut d, _run, t) = deputy();
        let h = moved_to_2(&mut d, t);
        let piece = vec![0u8; mosix_proto::wire::MAX_DATA];
        for _ in 0..=(mosix_proto::wire::STDIN_WINDOW as usize / piece.len()) {
            d.handle(Ev::FromRun(FromRun::Stdin(piece.clone())), t);
        }
        assert!(h.sent.borrow().contains(&ToHost::Signal(libc::SIGKILL)));
    }
}
