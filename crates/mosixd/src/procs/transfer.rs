//! Both halves of a move (the source freezes and streams, the destination restores and
//! commits) and the node-to-node connections they use.

use super::*;

/// Memory kept free beside a process restored here (page tables, the restorer, the
/// daemon's own growth), on top of its image.
const RESTORE_MARGIN: u64 = 16 << 20;

impl Procs {
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

    pub(super) fn peer_connection(
        self: &Arc<Self>,
        s: TcpStream,
        slot: HandshakeSlot,
    ) -> Result<()> {
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(PEER_TIMEOUT))?;
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
                self.link_from_host(ch, l)
            }
        }
    }

    /// A host opened its link to a process of ours.
    pub(super) fn link_from_host(self: &Arc<Self>, ch: Link, l: LinkHello) -> Result<()> {
        let Some(d) = lock(&self.deputies).get(&l.home_pid).cloned() else {
            bail!("link for unknown process {}", l.home_pid);
        };
        let s2 = ch.get_ref().try_clone()?;
        ch.get_ref().set_read_timeout(None)?;
        let (mut r, w) = ch.split(s2)?;
        d.tx.send(DevEv::HostLinked {
            epoch: l.epoch,
            node: l.node,
            down: Downlink::Remote(w),
        })
        .map_err(|_| anyhow!("process {} has ended", l.home_pid))?;
        debug!(
            pid = l.home_pid,
            node = l.node,
            epoch = l.epoch,
            "host linked"
        );
        loop {
            match wire::recv::<_, ToHome>(&mut r) {
                Ok(Some(msg)) => {
                    let last = matches!(msg, ToHome::Exited(_) | ToHome::Left { .. });
                    if d.tx
                        .send(DevEv::FromHost {
                            epoch: l.epoch,
                            msg,
                        })
                        .is_err()
                        || last
                    {
                        return Ok(());
                    }
                }
                Ok(None) | Err(_) => {
                    let _ = d.tx.send(DevEv::HostGone {
                        epoch: l.epoch,
                        why: "stopped answering".into(),
                    });
                    return Ok(());
                }
            }
        }
    }

    /// Receives a migrating process; on success this thread becomes its keeper.
    pub(super) fn receive(self: &Arc<Self>, mut ch: Link, h: MigrateHeader) -> Result<()> {
        let t0 = Instant::now();
        let refuse = |ch: &mut Link, why: String| -> Result<()> {
            warn!(home = h.home, pid = h.home_pid, "refused a process: {why}");
            crate::metrics::incoming_refused();
            wire::send_flush(ch, &Verdict::Refused(why.clone()))?;
            Err(anyhow!(why))
        };
        // The image is held here while the process is rebuilt beside it: judge by the
        // memory free now (this node's cgroups too), not by the last load sample.
        let limit = mosix_ckpt::memory_room().saturating_sub(RESTORE_MARGIN);
        let bytes = match wire::read_chunks(&mut ch, limit) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // read_chunks read past the image: the tail follows, then our answer.
                let _ = wire::expect::<_, Tail>(&mut ch);
                return refuse(&mut ch, format!("node {}: {e}", self.me()));
            }
            Err(e) => return Err(e.into()),
        };
        let tail: Tail = wire::expect(&mut ch)?;
        debug!("migration in: image received after {:?}", t0.elapsed());
        if std::env::var_os(ENV_TEST_STALL).is_some() {
            let _ = std::fs::write(self.cfg.state_dir.join("stalled"), b"");
            warn!("TEST: stalling in the middle of a migration");
            loop {
                std::thread::park();
            }
        }
        if let Some(offer) = &h.offer {
            let offer: mosix_balance::Offer = match serde_json::from_str(offer) {
                Ok(o) => o,
                Err(e) => return refuse(&mut ch, format!("bad offer: {e}")),
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
                    return refuse(&mut ch, format!("node {}: {why}", self.me()));
                }
            }
        }
        if !self.balancer().accepts_guests() && h.home != self.me() {
            return refuse(
                &mut ch,
                format!("node {} does not accept guest processes", self.me()),
            );
        }
        let img = match mosix_ckpt::read_image_bytes(bytes) {
            Ok(i) => i,
            Err(e) => return refuse(&mut ch, format!("node {}: {e}", self.me())),
        };
        debug!("migration in: image verified after {:?}", t0.elapsed());
        let need = img.memory_bytes() + RESTORE_MARGIN + img.memory_bytes() / 32;
        let room = mosix_ckpt::memory_room();
        if room < need {
            return refuse(
                &mut ch,
                format!(
                    "node {}: not enough memory: the process needs {} MiB, {} MiB are free",
                    self.me(),
                    need >> 20,
                    room >> 20
                ),
            );
        }
        if img.meta.creds.uid[0] != h.uid {
            return refuse(
                &mut ch,
                "the image's owner differs from the sender's".into(),
            );
        }
        let pipes = match Pipes::new() {
            Ok(p) => p,
            Err(e) => return refuse(&mut ch, format!("pipes: {e}")),
        };
        let opts = mosix_ckpt::RestoreOptions {
            stdio: Some(pipes.child_fds()),
            keep_pid: true,
            time_ns: true,
            hold: true,
            pdeathsig: Some(libc::SIGKILL),
        };
        // The process gets no credential its owner (as its home node says) could not have
        // here: root's processes are root's (every node is root on every other, see
        // docs/security.md); a user's must have only that user's uid, gids and groups.
        let creds = if h.uid == 0 {
            mosix_ckpt::CredOptions::from_image()
        } else {
            match mosix_ckpt::Identity::of_uid(h.uid) {
                Ok(who) => mosix_ckpt::CredOptions::within(who),
                Err(e) => return refuse(&mut ch, format!("node {}: {e}", self.me())),
            }
        };
        let restored = match mosix_ckpt::restore_with(&img, opts, &creds) {
            Ok(r) => r,
            Err(e) => return refuse(&mut ch, format!("node {}: {e}", self.me())),
        };
        drop(img);
        debug!("migration in: restored after {:?}", t0.elapsed());
        let mut pipes = pipes;
        pipes.close_child_ends();
        if h.closed_out[0] {
            pipes.out[0] = None;
        }
        if h.closed_out[1] {
            pipes.out[1] = None;
        }
        let pid = restored.pid;
        let kill_it = |why: &str| {
            warn!(pid, "migration in aborted: {why}");
            deliver(pid, libc::SIGKILL);
            let _ = mosix_ckpt::sys::wait(pid);
            if let Some(i) = restored.ns_init {
                deliver(i, libc::SIGKILL);
                let _ = mosix_ckpt::sys::wait(i);
            }
        };
        if let Err(e) = wire::send_flush(&mut ch, &Verdict::Ready) {
            kill_it("cannot answer the source");
            return Err(e.into());
        }
        match wire::expect::<_, Decision>(&mut ch) {
            Ok(Decision::Commit) => {}
            Ok(Decision::Abort) => {
                kill_it("the source aborted");
                return Ok(());
            }
            Err(e) => {
                kill_it("the source went away");
                return Err(e.into());
            }
        }
        if let Err(e) = mosix_ckpt::resume(pid) {
            kill_it("cannot resume it");
            return Err(e.into());
        }
        // Running here from now on; tell the source, which then ends its copy.
        let _ = wire::send_flush(&mut ch, &Verdict::Running { host_pid: pid });
        drop(ch);
        info!(
            home = h.home,
            home_pid = h.home_pid,
            pid,
            from = h.from,
            ms = t0.elapsed().as_millis() as u64,
            "process arrived"
        );
        let meta = KeeperMeta {
            home: h.home,
            home_pid: h.home_pid,
            epoch: h.epoch,
            uid: h.uid,
            cmd: h.cmd.clone(),
            stdin_base: tail.stdin_consumed,
            pinned: h.pinned,
            avoid: h.avoid.clone(),
            migrations: h.migrations,
        };
        let reason = if h.home == self.me() {
            format!("back home from node {}: {}", h.from, h.reason)
        } else {
            format!("from node {}: {}", h.from, h.reason)
        };
        let k = Keeper::new(self, pid, restored.ns_init, pipes, meta, reason)?;
        let up = match self.uplink_to_home(&h, &k) {
            Ok(u) => u,
            Err(e) => {
                warn!(
                    pid,
                    "cannot reach home node {}: {e:#}; ending the process", h.home
                );
                deliver(pid, libc::SIGKILL);
                Uplink::Local {
                    tx: mpsc::channel().0,
                    epoch: h.epoch,
                }
            }
        };
        k.run(up);
        Ok(())
    }

    pub(super) fn uplink_to_home(
        self: &Arc<Self>,
        h: &MigrateHeader,
        k: &Keeper,
    ) -> Result<Uplink> {
        if h.home == self.me() {
            let d = lock(&self.deputies)
                .get(&h.home_pid)
                .cloned()
                .ok_or_else(|| anyhow!("its deputy has ended"))?;
            d.tx.send(DevEv::HostLinked {
                epoch: h.epoch,
                node: self.me(),
                down: Downlink::Local(k.tx()),
            })
            .map_err(|_| anyhow!("its deputy has ended"))?;
            return Ok(Uplink::Local {
                tx: d.tx,
                epoch: h.epoch,
            });
        }
        let mut ch = self.connect(h.home)?;
        wire::send_flush(
            &mut ch,
            &Hello::Link(LinkHello {
                home_pid: h.home_pid,
                epoch: h.epoch,
                node: self.me(),
            }),
        )?;
        ch.get_ref().set_read_timeout(None)?;
        let s2 = ch.get_ref().try_clone()?;
        let (mut r, w) = ch.split(s2)?;
        let ktx = k.tx();
        std::thread::Builder::new()
            .name("mosix-link".into())
            .spawn(move || loop {
                match wire::recv::<_, ToHost>(&mut r) {
                    Ok(Some(m)) => ktx.send(Cmd::Host(m)),
                    _ => {
                        ktx.send(Cmd::HomeGone);
                        return;
                    }
                }
            })?;
        Ok(Uplink::Remote(w))
    }

    pub(super) fn connect(&self, node: u32) -> Result<Link> {
        let m = self
            .cfg
            .map
            .iter()
            .find(|m| m.node == node)
            .ok_or_else(|| anyhow!("node {node} is not in the cluster map"))?;
        let s = TcpStream::connect_timeout(&m.addr, CONNECT_TIMEOUT)
            .with_context(|| format!("cannot connect to node {node} at {}", m.addr))?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(PEER_TIMEOUT))?;
        s.set_write_timeout(Some(PEER_TIMEOUT))?;
        Channel::connect(s, &self.keys, node).map_err(|e| anyhow!("node {node}: {e}"))
    }

    /// Reasons a process cannot leave this node (beyond the checkpoint engine's).
    pub(super) fn local_refusals(&self, pid: i32) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(fds) = mosix_ckpt::procfs::fds(pid) else {
            return out;
        };
        for f in fds {
            let regular = std::fs::metadata(format!("/proc/{pid}/fd/{}", f.fd))
                .map(|m| m.is_file())
                .unwrap_or(false);
            if f.fd <= 2 || !regular {
                continue;
            }
            let shared = self
                .cfg
                .shared_paths
                .iter()
                .any(|p| std::path::Path::new(&f.target).starts_with(p));
            if !shared {
                out.push(format!(
                    "fd {} is {}, which is not under a shared path of the cluster",
                    f.fd, f.target
                ));
            }
        }
        out
    }
}

impl Keeper {
    /// Moves the process to `to`: Ok once it runs there (and is gone from here).
    pub(super) fn migrate(
        &mut self,
        to: u32,
        up: &mut Uplink,
        reason: String,
        offer: Option<String>,
    ) -> Result<()> {
        let p = self.procs.clone();
        if to == p.me() {
            bail!("process {} is already on node {to}", self.meta.home_pid);
        }
        p.check_destination(to).map_err(crate::metrics::refused)?;
        let local = p.local_refusals(self.pid);
        if !local.is_empty() {
            return Err(crate::metrics::refused(format!(
                "process {} cannot move: {}",
                self.meta.home_pid,
                local.join("; ")
            )));
        }
        mosix_ckpt::check(self.pid).map_err(crate::metrics::refused)?;
        let _boost = crate::balance::Boost::thread();
        let mut ch = p.connect(to)?;
        let header = MigrateHeader {
            home: self.meta.home,
            home_pid: self.meta.home_pid,
            from: p.me(),
            epoch: self.meta.epoch + 1,
            uid: self.meta.uid,
            cmd: self.meta.cmd.clone(),
            closed_out: [self.pipes.out[0].is_none(), self.pipes.out[1].is_none()],
            pinned: self.meta.pinned,
            avoid: self.meta.avoid.clone(),
            migrations: self.meta.migrations + 1,
            reason: reason.clone(),
            offer,
        };
        wire::send(&mut ch, &Hello::Migrate(header))?;
        self.set_migrating(true);
        let t0 = Instant::now();
        let res = mosix_ckpt::checkpoint_held(
            self.pid,
            ChunkWriter::new(ch),
            p.cfg.compression,
            &mut |_, _| {},
        );
        let (cw, stats, held) = match res {
            Ok(x) => x,
            Err(e) => {
                self.set_migrating(false);
                return Err(anyhow!("{e}"));
            }
        };
        debug!(
            "migration out: image of {} bytes sent after {:?}",
            stats.memory_bytes,
            t0.elapsed()
        );
        // Frozen from here: what it wrote so far goes home first.
        let mut buf = vec![0u8; READ_CHUNK];
        for i in 0..2 {
            self.pump_out(i, &mut buf, up, true);
        }
        let consumed = self.stdin_consumed();
        let outcome = (|| -> Result<i32> {
            let mut ch = cw.finish()?;
            wire::send_flush(
                &mut ch,
                &Tail {
                    stdin_consumed: consumed,
                },
            )?;
            match wire::expect::<_, Verdict>(&mut ch)? {
                Verdict::Ready => {}
                Verdict::Refused(why) => return Err(crate::metrics::refused(why)),
                Verdict::Running { .. } => bail!("node {to} answered out of order"),
            }
            wire::send_flush(&mut ch, &Decision::Commit)?;
            match wire::expect::<_, Verdict>(&mut ch) {
                Ok(Verdict::Running { host_pid }) => Ok(host_pid),
                Ok(other) => bail!("node {to} answered {other:?} to the commit"),
                Err(e) => bail!("node {to} did not confirm the commit: {e}"),
            }
        })();
        match outcome {
            Ok(host_pid) => {
                let frozen_ms = t0.elapsed().as_millis() as u64;
                crate::metrics::migration_moved(frozen_ms, stats.memory_bytes);
                if let Err(e) = held.kill() {
                    warn!(pid = self.pid, "ending the moved process's old copy: {e}");
                }
                // The engine reaped the old copy; its namespace's init exits after it.
                self.reap_ns_init();
                info!(
                    home_pid = self.meta.home_pid,
                    to,
                    host_pid,
                    bytes = stats.memory_bytes,
                    frozen_ms,
                    "process migrated: {reason}"
                );
                let _ = up.send(ToHome::Left {
                    to,
                    stdin_consumed: consumed,
                    frozen_ms,
                    memory_bytes: stats.memory_bytes,
                });
                Ok(())
            }
            Err(e) => {
                self.set_migrating(false);
                if let Err(e2) = held.release() {
                    warn!(pid = self.pid, "releasing after a failed move: {e2}");
                }
                Err(e.context(format!(
                    "moving process {} to node {to}",
                    self.meta.home_pid
                )))
            }
        }
    }
}
