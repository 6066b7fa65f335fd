//! The deputy: the home side of one process; holds the `mosrun` connection and follows
//! the process from host to host.

use super::*;

impl Deputy {
    pub(super) fn new(
        procs: Arc<Procs>,
        home_pid: i32,
        info: Arc<Mutex<DeputyInfo>>,
        run_w: UnixStream,
        events: Sender<DevEv>,
    ) -> Deputy {
        let (run_tx, run_rx) = mpsc::channel::<ToRun>();
        let spawned = std::thread::Builder::new()
            .name("mosix-runw".into())
            .spawn(move || write_to_run(run_w, run_rx, events));
        if let Err(e) = &spawned {
            warn!(home_pid, "cannot start the mosrun writer: {e}");
        }
        Deputy {
            procs,
            home_pid,
            info,
            run_tx: spawned.ok().map(|_| run_tx),
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

    pub(super) fn run(&mut self, rx: Receiver<DevEv>) {
        while !self.ended {
            let Ok(ev) = rx.recv_timeout(Duration::from_millis(200)) else {
                self.check_initial_move();
                if self.unlinked_since.is_some_and(|t| t.elapsed() > LINK_WAIT) {
                    self.lost("took it but never reported");
                }
                continue;
            };
            self.handle(ev);
            self.check_initial_move();
        }
    }

    /// `mosrun -r/-b`: say on its stderr if the first move failed.
    pub(super) fn check_initial_move(&mut self) {
        if let Some(rx) = &self.initial_move {
            match rx.try_recv() {
                Ok(Err(why)) => {
                    self.initial_move = None;
                    self.tell_run(&ToRun::Out {
                        fd: 2,
                        data: format!("mosrun: could not move the process: {why}\n").into_bytes(),
                    });
                }
                Ok(Ok(_)) | Err(mpsc::TryRecvError::Disconnected) => self.initial_move = None,
                Err(mpsc::TryRecvError::Empty) => {}
            }
        }
    }

    pub(super) fn tell_run(&mut self, m: &ToRun) {
        if self.run_gone {
            return;
        }
        if let Some(tx) = &self.run_tx {
            if tx.send(m.clone()).is_err() {
                self.run_gone = true;
            }
        }
    }

    pub(super) fn tell_host(&mut self, m: ToHost) {
        if let Some(d) = &mut self.down {
            if d.send(m).is_err() {
                // The link broke: the host is as good as gone unless it links again.
                warn!(pid = self.home_pid, "lost the link to the process's host");
                self.down = None;
                self.unlinked_since = Some(Instant::now());
            }
        } else if let ToHost::Signal(s) = m {
            self.signals.push(s);
        }
    }

    pub(super) fn handle(&mut self, ev: DevEv) {
        match ev {
            DevEv::FromRun(m) => match m {
                FromRun::Stdin(data) => match self.stdin.push(&data) {
                    Ok(at) => self.tell_host(ToHost::Stdin { at, data }),
                    Err(e) => {
                        warn!(pid = self.home_pid, "mosrun broke the protocol: {e}");
                        self.handle(DevEv::RunGone);
                    }
                },
                FromRun::StdinEof => {
                    self.stdin.set_eof();
                    let at = self.stdin.end();
                    self.tell_host(ToHost::StdinEof { at });
                }
                FromRun::Signal(s) => self.tell_host(ToHost::Signal(s)),
                FromRun::OutClosed(fd) => {
                    if (1..=2).contains(&fd) {
                        self.closed_out[fd as usize - 1] = true;
                        self.tell_host(ToHost::CloseOut(fd));
                    }
                }
            },
            DevEv::RunWrote(n) => self.tell_host(ToHost::OutAck { bytes: n }),
            DevEv::RunGone => {
                // Nobody waits for it any more: end it, as MOSIX does.
                self.run_gone = true;
                self.tell_host(ToHost::Signal(libc::SIGKILL));
            }
            DevEv::FromHost { epoch, msg } => {
                if epoch > self.epoch {
                    self.pending
                        .entry(epoch)
                        .or_default()
                        .push(DevEv::FromHost { epoch, msg });
                } else if epoch == self.epoch {
                    self.on_host_msg(msg);
                }
            }
            DevEv::HostLinked { epoch, node, down } => {
                let expected = lock(&self.info).node;
                if epoch > self.epoch {
                    self.pending
                        .entry(epoch)
                        .or_default()
                        .push(DevEv::HostLinked { epoch, node, down });
                } else if epoch == self.epoch && node != expected {
                    warn!(
                        pid = self.home_pid,
                        "node {node} linked as the host of residence {epoch}, which is node {expected}'s: ignored"
                    );
                } else if epoch == self.epoch {
                    self.down = Some(down);
                    self.unlinked_since = None;
                    self.resend_state();
                }
            }
            DevEv::HostGone { epoch, why } => {
                if epoch == self.epoch && !self.ended {
                    self.lost(&why);
                }
            }
            DevEv::Migrate { to, reply } => {
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
                    self.tell_host(ToHost::Migrate { to });
                }
            }
        }
    }

    /// The process has consumed stdin up to `at`: forget it, and let mosrun send more.
    fn stdin_consumed(&mut self, at: u64) {
        if self.stdin.consumed(at) {
            let at = self.stdin.base();
            self.tell_run(&ToRun::StdinAck { at });
        }
    }

    pub(super) fn on_host_msg(&mut self, msg: ToHome) {
        match msg {
            ToHome::StdinConsumed { at } => self.stdin_consumed(at),
            ToHome::Out { fd, data } => self.tell_run(&ToRun::Out { fd, data }),
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
                self.unlinked_since = Some(Instant::now());
                {
                    let mut i = lock(&self.info);
                    i.node = to;
                    i.since = Instant::now();
                    i.state = if to == self.procs.me() {
                        "running"
                    } else {
                        "away"
                    };
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
                        self.handle(ev);
                    }
                }
            }
        }
    }

    /// A new host: give it the stdin it has not consumed and what happened meanwhile.
    pub(super) fn resend_state(&mut self) {
        let pieces: Vec<ToHost> = self
            .stdin
            .pieces()
            .map(|(at, d)| ToHost::Stdin {
                at,
                data: d.to_vec(),
            })
            .collect();
        for m in pieces {
            self.tell_host(m);
        }
        if self.stdin.eof() {
            let at = self.stdin.end();
            self.tell_host(ToHost::StdinEof { at });
        }
        for fd in 1..=2u8 {
            if self.closed_out[fd as usize - 1] {
                self.tell_host(ToHost::CloseOut(fd));
            }
        }
        for s in std::mem::take(&mut self.signals) {
            self.tell_host(ToHost::Signal(s));
        }
        if self.run_gone {
            self.tell_host(ToHost::Signal(libc::SIGKILL));
        }
    }

    /// The node it ran on is gone (`why` says how): tell mosrun it was lost, and end.
    pub(super) fn lost(&mut self, why: &str) {
        let node = lock(&self.info).node;
        let msg = format!(
            "mosrun: process {} was lost: node {node} {why}",
            self.home_pid
        );
        warn!("{msg}");
        self.finish(ExitStatus::Lost, Some(msg));
    }

    pub(super) fn finish(&mut self, status: ExitStatus, message: Option<String>) {
        self.ended = true;
        for (_, r) in std::mem::take(&mut self.waiters) {
            let _ = r.send(Err(format!("process {} has ended", self.home_pid)));
        }
        self.tell_run(&ToRun::Exited { status, message });
        // The writer sends what is queued, then closes the connection.
        self.run_tx = None;
    }
}

/// The deputy's writer thread: gives `mosrun` its frames in order, reports how many output
/// bytes it took (for the host's output window), and closes the connection when the
/// deputy is done with it.
fn write_to_run(mut w: UnixStream, rx: Receiver<ToRun>, events: Sender<DevEv>) {
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
