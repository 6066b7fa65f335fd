//! The keeper: watches one process running on this node, relays its stdio, waits for it.

use super::*;

/// How often (ms) a keeper looks whether stdin in the pipe was consumed.
const STDIN_REPORT_MS: u16 = 100;

impl Keeper {
    pub(super) fn new(
        procs: &Arc<Procs>,
        pid: i32,
        ns_init: Option<i32>,
        pipes: Pipes,
        meta: KeeperMeta,
        reason: String,
    ) -> Result<Keeper> {
        let pidfd = mosix_ckpt::sys::pidfd_open(pid)?;
        let (wake_r, wake_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        let (tx, rx) = mpsc::channel();
        let meta_base = meta.stdin_base;
        let k = Keeper {
            procs: procs.clone(),
            pid,
            ns_init,
            pidfd,
            pipes,
            meta,
            written: 0,
            reported: meta_base,
            out: flow::OutCredit::default(),
            pending: Vec::new(),
            eof_at: None,
            rx,
            tx,
            wake_r,
            wake_w: Arc::new(wake_w),
        };
        lock(&procs.hosted).insert(
            (k.meta.home, k.meta.home_pid),
            Hosted {
                pid,
                migrations: k.meta.migrations,
                pinned: k.meta.pinned,
                avoid: k.meta.avoid.clone(),
                uid: k.meta.uid,
                cmd: k.meta.cmd.clone(),
                since: Instant::now(),
                reason,
                keeper: k.tx(),
                migrating: false,
            },
        );
        Ok(k)
    }

    pub(super) fn tx(&self) -> KeeperTx {
        KeeperTx {
            pid: self.pid,
            tx: self.tx.clone(),
            wake: self.wake_w.clone(),
        }
    }

    pub(super) fn key(&self) -> (u32, i32) {
        (self.meta.home, self.meta.home_pid)
    }

    /// The keeper's loop, until the process ends here or has left.
    pub(super) fn run(mut self, mut up: Uplink) {
        let outcome = self.serve(&mut up);
        lock(&self.procs.hosted).remove(&self.key());
        match outcome {
            Outcome::Exited(st) => {
                debug!(pid = self.pid, ?st, "process ended");
                let _ = up.send(ToHome::Exited(st));
            }
            Outcome::Left => {}
        }
    }

    pub(super) fn serve(&mut self, up: &mut Uplink) -> Outcome {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let mut fds = vec![
                PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake_r.as_fd(), PollFlags::POLLIN),
            ];
            let mut which = Vec::new();
            for (i, o) in self.pipes.out.iter().enumerate() {
                if !self.out.may_read() {
                    break;
                }
                if let Some(fd) = o {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    which.push(i);
                }
            }
            let stdin_at = fds.len();
            if !self.pending.is_empty() {
                if let Some(w) = &self.pipes.stdin_w {
                    fds.push(PollFd::new(w.as_fd(), PollFlags::POLLOUT));
                }
            }
            // While stdin sits in the pipe, look now and then whether it was consumed.
            let timeout = if self.meta.stdin_base + self.written > self.reported {
                PollTimeout::from(STDIN_REPORT_MS)
            } else {
                PollTimeout::NONE
            };
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("poll: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let exited = ready(&fds[0]);
            let woke = ready(&fds[1]);
            let outs: Vec<usize> = which
                .iter()
                .enumerate()
                .filter(|(j, _)| ready(&fds[2 + j]))
                .map(|(_, &i)| i)
                .collect();
            let stdin_ready = fds.len() > stdin_at && ready(&fds[stdin_at]);
            drop(fds);
            for i in outs {
                self.pump_out(i, &mut buf, up, false);
            }
            if stdin_ready {
                self.push_stdin();
            }
            if woke {
                let mut b = [0u8; 64];
                while matches!(nix::unistd::read(&self.wake_r, &mut b), Ok(n) if n > 0) {}
                while let Ok(c) = self.rx.try_recv() {
                    match c {
                        Cmd::HomeGone => {
                            warn!(pid = self.pid, "lost its home; ending it");
                            deliver(self.pid, libc::SIGKILL);
                        }
                        Cmd::Host(ToHost::Signal(s)) => deliver(self.pid, s),
                        Cmd::Host(ToHost::Stdin { at, data }) => self.take_stdin(at, &data),
                        Cmd::Host(ToHost::StdinEof { at }) => {
                            self.eof_at = Some(at);
                            self.push_stdin();
                        }
                        Cmd::Host(ToHost::OutAck { bytes }) => self.out.acked(bytes),
                        Cmd::Host(ToHost::CloseOut(fd)) => {
                            if (1..=2).contains(&fd) {
                                self.pipes.out[fd as usize - 1] = None;
                            }
                        }
                        Cmd::Host(ToHost::Migrate { to }) => {
                            let id = proc_id(self.meta.home, self.meta.home_pid);
                            let view = self.procs.balance_view();
                            match crate::metrics::migration(
                                crate::metrics::MoveReason::Manual,
                                self.migrate(to, up, "asked for by migrate".into(), None),
                            ) {
                                Ok(()) => {
                                    // The balancer accounts for it as for its own sends.
                                    if let Some(v) = view.iter().find(|v| v.info.id == id) {
                                        let now = self.procs.now_ms();
                                        self.procs.balancer().record_move(now, &v.info, to);
                                    }
                                    return Outcome::Left;
                                }
                                Err(e) => {
                                    let reason = format!("{e:#}");
                                    warn!(pid = self.pid, to, "migration failed: {reason}");
                                    let _ = up.send(ToHome::MigrateFailed { to, reason });
                                }
                            }
                        }
                        Cmd::AutoMigrate { to, reason, offer } => {
                            match crate::metrics::migration(
                                crate::metrics::MoveReason::of_offer(offer.as_deref()),
                                self.migrate(to, up, reason, offer),
                            ) {
                                Ok(()) => return Outcome::Left,
                                Err(e) => {
                                    info!(
                                        pid = self.pid,
                                        to, "automatic migration not done: {e:#}"
                                    );
                                    lock(&self.procs.failed_moves)
                                        .push((proc_id(self.meta.home, self.meta.home_pid), to));
                                }
                            }
                        }
                    }
                }
            }
            if exited {
                return Outcome::Exited(self.reap(&mut buf, up));
            }
            self.report_stdin(up);
        }
    }

    /// Tells home how much stdin the process has consumed, if that moved on.
    fn report_stdin(&mut self, up: &mut Uplink) {
        let c = self.stdin_consumed();
        if c > self.reported {
            self.reported = c;
            let _ = up.send(ToHome::StdinConsumed { at: c });
        }
    }

    /// Reads what the process wrote on fd 1+i and sends it home, as much as the output
    /// window allows (`all`: everything there is, for a process that is frozen or gone,
    /// whose pipes hold at most their capacity).
    pub(super) fn pump_out(&mut self, i: usize, buf: &mut [u8], up: &mut Uplink, all: bool) {
        loop {
            let Some(fd) = &self.pipes.out[i] else { return };
            let room = if all { buf.len() } else { self.out.room() };
            if room == 0 {
                return;
            }
            match nix::unistd::read(fd, &mut buf[..room]) {
                Ok(0) => {
                    self.pipes.out[i] = None;
                    return;
                }
                Ok(n) => {
                    self.out.sent(n);
                    let _ = up.send(ToHome::Out {
                        fd: i as u8 + 1,
                        data: buf[..n].to_vec(),
                    });
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }

    pub(super) fn next_stdin(&self) -> u64 {
        self.meta.stdin_base + self.written + self.pending.len() as u64
    }

    pub(super) fn take_stdin(&mut self, at: u64, data: &[u8]) {
        let next = self.next_stdin();
        let end = at + data.len() as u64;
        if at <= next && next < end {
            self.pending
                .extend_from_slice(&data[(next - at) as usize..]);
        }
        self.push_stdin();
    }

    pub(super) fn push_stdin(&mut self) {
        let Some(w) = &self.pipes.stdin_w else {
            self.pending.clear();
            return;
        };
        while !self.pending.is_empty() {
            match nix::unistd::write(w, &self.pending) {
                Ok(n) => {
                    self.written += n as u64;
                    self.pending.drain(..n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(_) => {
                    // Nobody reads it any more.
                    self.pending.clear();
                    self.pipes.stdin_w = None;
                    return;
                }
            }
        }
        if self.eof_at == Some(self.next_stdin()) {
            self.pipes.stdin_w = None;
        }
    }

    /// Stdin bytes the process has read (it must be stopped or gone).
    pub(super) fn stdin_consumed(&self) -> u64 {
        let unread = mosix_ckpt::sys::unread_bytes(self.pipes.stdin_peek.as_raw_fd()).unwrap_or(0);
        (self.meta.stdin_base + self.written).saturating_sub(unread as u64)
    }

    pub(super) fn reap(&mut self, buf: &mut [u8], up: &mut Uplink) -> ExitStatus {
        // Still a zombie, so its PID (= its session's id) cannot be anybody else's yet:
        // end whatever it started and left behind in its session. (Restored processes run
        // in a PID namespace whose init ends everything in it once they exit.)
        if self.ns_init.is_none() {
            let n = kill_session(self.pid);
            if n > 0 {
                info!(pid = self.pid, "ended {n} processes it left behind");
            }
        }
        let st = match nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(self.pid),
            Some(nix::sys::wait::WaitPidFlag::__WALL),
        ) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => ExitStatus::Code(c),
            Ok(nix::sys::wait::WaitStatus::Signaled(_, s, _)) => ExitStatus::Signal(s as i32),
            other => {
                warn!(pid = self.pid, "unexpected wait result {other:?}");
                ExitStatus::Lost
            }
        };
        self.reap_ns_init();
        for i in 0..2 {
            self.pump_out(i, buf, up, true);
        }
        st
    }

    /// Reaps the init of the process's PID namespace (it exits once the process is gone).
    pub(super) fn reap_ns_init(&self) {
        if let Some(i) = self.ns_init {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(i),
                Some(nix::sys::wait::WaitPidFlag::__WALL),
            );
        }
    }

    pub(super) fn set_migrating(&self, on: bool) {
        if let Some(h) = lock(&self.procs.hosted).get_mut(&self.key()) {
            h.migrating = on;
        }
    }
}

/// SIGKILLs every process of session `sid` (and of process group `sid`) but `sid`
/// itself; how many. A job is started as the leader of its own session, so this is what
/// it started and did not wait for (a descendant that made its own session escapes).
fn kill_session(sid: i32) -> usize {
    let mut n = 0;
    // Twice: a process may fork while the first pass runs.
    for _ in 0..2 {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return n;
        };
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid == sid {
                continue;
            }
            let Ok(f) = mosix_ckpt::procfs::stat_fields(pid) else {
                continue;
            };
            let pgrp = mosix_ckpt::procfs::field_u64(&f, 5) as i32;
            let session = mosix_ckpt::procfs::field_u64(&f, 6) as i32;
            if session == sid || pgrp == sid {
                deliver(pid, libc::SIGKILL);
                n += 1;
            }
        }
    }
    n
}
