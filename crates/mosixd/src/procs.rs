//! Migratable processes: started by `mosrun` (home side: the deputy), hosted on a node (the
//! keeper), moved between nodes as a transaction.
//!
//! Threads, not tasks: everything that touches a process with ptrace must come from one
//! thread (the tracer), so each hosted process has a keeper thread that spawned or
//! restored it and alone waits for it, checkpoints it and relays its stdio. Each home
//! process has a deputy thread that holds the `mosrun` connection, keeps the stdin not yet
//! consumed, and follows the process from host to host (residences are numbered: epochs).
//!
//! ```text
//! mosrun ══unix══ deputy (home) ──ToHost──▶ keeper (where it runs) ──pipes── process
//!                        ◀──ToHome──
//! ```
//! Host and home on the same node talk over in-process channels; otherwise over a link (an
//! authenticated channel opened by the host). A move: the keeper freezes the process and
//! streams it to the destination, which restores it held; on commit the destination lets
//! it run and only then does the source end its frozen copy, flush the output and tell
//! home `Left`. Any failure before the commit releases the frozen copy.

use crate::config::Config;
use crate::State;
use anyhow::{anyhow, bail, Context, Result};
use mosix_proto::channel::Channel;
use mosix_proto::control::ProcEntry;
use mosix_proto::wire::{
    self, ChunkWriter, Decision, ExitStatus, FromRun, Hello, LinkHello, MigrateHeader, Tail,
    ToHome, ToHost, ToRun, Verdict,
};
use mosix_proto::NodeState;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Test-only: the destination stops after receiving an image (before answering) and
/// creates `<state_dir>/stalled`, so a test can kill it in the middle of a migration.
const ENV_TEST_STALL: &str = "MOSIXD_TEST_STALL_RECEIVE";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long either side of a migration waits for the other.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
const READ_CHUNK: usize = 64 << 10;
/// How long a deputy waits for the link of a process's new host before calling it lost.
const LINK_WAIT: Duration = Duration::from_secs(30);

type Link = Channel<TcpStream>;

/// Everything about migratable processes on this node.
pub struct Procs {
    pub cfg: Config,
    keys: mosix_proto::channel::ChannelKeys,
    state: Arc<State>,
    /// Home processes (their deputies), by home PID.
    deputies: Mutex<HashMap<i32, DeputyHandle>>,
    /// Processes running here, by (home node, home PID).
    hosted: Mutex<HashMap<(u32, i32), Hosted>>,
    /// The balancing policy's state (also used to admit incoming offers).
    balancer: Mutex<mosix_balance::Balancer>,
    /// Automatic moves that failed since the balancer last looked: (process id, to).
    failed_moves: Mutex<Vec<(u64, u32)>>,
    /// Why each process here stays, as the balancer last explained it.
    explanations: Mutex<HashMap<u64, String>>,
    started: Instant,
}

/// A process as the balancer sees it, with its PID here.
pub struct BalanceView {
    pub pid: i32,
    pub info: mosix_balance::ProcInfo,
}

/// The balancer's id of a process: home node and home PID.
pub fn proc_id(home: u32, home_pid: i32) -> u64 {
    (u64::from(home) << 32) | u64::from(home_pid as u32)
}

#[derive(Clone)]
struct DeputyHandle {
    tx: Sender<DevEv>,
    info: Arc<Mutex<DeputyInfo>>,
}

#[derive(Clone, Debug)]
struct DeputyInfo {
    uid: u32,
    cmd: String,
    /// Node it runs on now.
    node: u32,
    state: &'static str,
    mosrun_pid: Option<i32>,
    since: Instant,
}

#[derive(Clone)]
struct Hosted {
    pid: i32,
    migrations: u32,
    pinned: bool,
    avoid: Vec<u32>,
    uid: u32,
    cmd: String,
    since: Instant,
    reason: String,
    keeper: KeeperTx,
    migrating: bool,
}

/// What a keeper is told.
enum Cmd {
    Host(ToHost),
    /// The home side is gone: nobody will ever read the output; the process is ended.
    HomeGone,
    /// The balancer decided to move it.
    AutoMigrate {
        to: u32,
        reason: String,
        offer: Option<String>,
    },
}

/// The way to a keeper thread: a queue plus a pipe that wakes its poll loop. Signals go
/// straight to the process (a frozen one holds them and takes them along).
#[derive(Clone)]
struct KeeperTx {
    pid: i32,
    tx: Sender<Cmd>,
    wake: Arc<OwnedFd>,
}

impl KeeperTx {
    fn send(&self, c: Cmd) {
        if let Cmd::Host(ToHost::Signal(s)) = c {
            deliver(self.pid, s);
            return;
        }
        if self.tx.send(c).is_ok() {
            let _ = nix::unistd::write(self.wake.as_fd(), &[1]);
        }
    }
}

fn deliver(pid: i32, sig: i32) {
    let Ok(s) = nix::sys::signal::Signal::try_from(sig) else {
        return;
    };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s);
}

/// A finished move, as its requester hears of it.
#[derive(Clone, Copy, Debug)]
pub struct Moved {
    pub to: u32,
    pub frozen_ms: u64,
    pub memory_bytes: u64,
}

/// How a host reaches the deputy.
enum Uplink {
    Local { tx: Sender<DevEv>, epoch: u64 },
    Remote(Link),
}

impl Uplink {
    fn send(&mut self, m: ToHome) -> std::io::Result<()> {
        match self {
            Uplink::Local { tx, epoch } => tx
                .send(DevEv::FromHost {
                    epoch: *epoch,
                    msg: m,
                })
                .map_err(|_| std::io::Error::other("the deputy is gone")),
            Uplink::Remote(w) => wire::send_flush(w, &m),
        }
    }
}

/// How the deputy reaches the host.
enum Downlink {
    Local(KeeperTx),
    Remote(Link),
}

impl Downlink {
    fn send(&mut self, m: ToHost) -> std::io::Result<()> {
        match self {
            Downlink::Local(k) => {
                k.send(Cmd::Host(m));
                Ok(())
            }
            Downlink::Remote(w) => wire::send_flush(w, &m),
        }
    }
}

/// Events of a deputy.
enum DevEv {
    FromRun(FromRun),
    RunGone,
    FromHost {
        epoch: u64,
        msg: ToHome,
    },
    HostLinked {
        epoch: u64,
        down: Downlink,
    },
    HostGone {
        epoch: u64,
        why: String,
    },
    Migrate {
        to: u32,
        reply: Sender<Result<Moved, String>>,
    },
}

impl Procs {
    pub fn new(
        cfg: Config,
        keys: mosix_proto::channel::ChannelKeys,
        state: Arc<State>,
    ) -> Arc<Procs> {
        let mut b = mosix_balance::Balancer::new(cfg.node, mosix_balance::Params::default());
        b.set_mode(mosix_balance::NodeMode {
            stay: !cfg.auto_balance,
            block: !cfg.accept_guests,
            ..Default::default()
        });
        Arc::new(Procs {
            cfg,
            keys,
            state,
            deputies: Mutex::new(HashMap::new()),
            hosted: Mutex::new(HashMap::new()),
            balancer: Mutex::new(b),
            failed_moves: Mutex::new(Vec::new()),
            explanations: Mutex::new(HashMap::new()),
            started: Instant::now(),
        })
    }

    /// Milliseconds since the daemon started (the balancer's clock).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn balancer(&self) -> std::sync::MutexGuard<'_, mosix_balance::Balancer> {
        lock(&self.balancer)
    }

    /// The cluster as this node sees it now.
    pub fn nodes(&self) -> Vec<mosix_proto::NodeStatus> {
        read(&self.state.nodes).clone()
    }

    pub fn take_failed_moves(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut *lock(&self.failed_moves))
    }

    pub fn set_explanations(&self, why: Vec<(u64, String)>) {
        *lock(&self.explanations) = why.into_iter().collect();
    }

    /// The processes running here and free to move, for the balancer (CPU share is
    /// filled in by the caller).
    pub fn balance_view(&self) -> Vec<BalanceView> {
        let now = Instant::now();
        let speed = self.my_speed();
        lock(&self.hosted)
            .iter()
            .filter(|(_, h)| !h.migrating)
            .map(|(&(home, home_pid), h)| {
                let (rss, cpu) = usage(h.pid);
                BalanceView {
                    pid: h.pid,
                    info: mosix_balance::ProcInfo {
                        id: proc_id(home, home_pid),
                        mem_bytes: rss,
                        cpu_share: 1.0,
                        work_done_ms: (cpu * 1000.0 * speed) as u64,
                        resident_ms: now.duration_since(h.since).as_millis() as u64,
                        migrations: h.migrations,
                        where_now: self.me(),
                        home,
                        pinned: h.pinned,
                        auto: !h.pinned,
                        avoid: h.avoid.clone(),
                    },
                }
            })
            .collect()
    }

    fn my_speed(&self) -> f64 {
        read(&self.state.nodes)
            .iter()
            .find(|n| n.this_node)
            .and_then(|n| n.load.as_ref())
            .map(|l| l.speed)
            .unwrap_or(1.0)
    }

    /// Asks the keeper of process `id` to move it; false if it is not here.
    pub fn auto_migrate(&self, id: u64, to: u32, reason: String, offer: Option<String>) -> bool {
        let h = lock(&self.hosted);
        let Some(k) = h
            .iter()
            .find(|(&(home, pid), h)| proc_id(home, pid) == id && !h.migrating)
            .map(|(_, h)| h.keeper.clone())
        else {
            return false;
        };
        drop(h);
        k.send(Cmd::AutoMigrate { to, reason, offer });
        true
    }

    /// `mosctl`: change (or show) this node's balancing mode. Root only.
    pub fn mosctl(&self, cmd: &str, uid: u32) -> Result<mosix_balance::NodeMode> {
        let mut b = self.balancer();
        let mut m = b.mode();
        if cmd != "show" && uid != 0 {
            bail!("only root may change the node's mode");
        }
        match cmd {
            "show" => {}
            "stay" => m.stay = true,
            "nostay" => m.stay = false,
            "lstay" => m.lstay = true,
            "nolstay" => m.lstay = false,
            "block" => m.block = true,
            "noblock" => m.block = false,
            "expel" => m.expel = true,
            "noexpel" => m.expel = false,
            other => bail!(
                "unknown mosctl command '{other}' (stay, nostay, lstay, nolstay, block, noblock, expel, noexpel, show)"
            ),
        }
        b.set_mode(m);
        self.state
            .accepts_guests
            .store(b.accepts_guests(), std::sync::atomic::Ordering::Relaxed);
        info!(?m, "node mode changed by mosctl {cmd}");
        Ok(m)
    }

    fn me(&self) -> u32 {
        self.cfg.node
    }

    /// Serves node-to-node connections (migrations in, links from hosts) on the node's
    /// TCP address (same port as gossip).
    pub fn listen(self: &Arc<Self>) -> Result<()> {
        let l = TcpListener::bind(self.cfg.listen)
            .with_context(|| format!("cannot listen on tcp {}", self.cfg.listen))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("mosix-accept".into())
            .spawn(move || {
                for s in l.incoming() {
                    match s {
                        Ok(s) => {
                            let me = me.clone();
                            let _ = std::thread::Builder::new().name("mosix-peer".into()).spawn(
                                move || {
                                    if let Err(e) = me.peer_connection(s) {
                                        debug!("peer connection: {e:#}");
                                    }
                                },
                            );
                        }
                        Err(e) => warn!("accept: {e}"),
                    }
                }
            })?;
        Ok(())
    }

    fn peer_connection(self: &Arc<Self>, s: TcpStream) -> Result<()> {
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(PEER_TIMEOUT))?;
        let peer = s.peer_addr()?;
        let mut ch =
            Channel::accept(s, &self.keys).map_err(|e| anyhow!("connection from {peer}: {e}"))?;
        match wire::expect::<_, Hello>(&mut ch)? {
            Hello::Migrate(h) => self.receive(ch, h),
            Hello::Link(l) => self.link_from_host(ch, l),
        }
    }

    // ---------------------------------------------------------------- home side

    /// A `mosrun` asked to run a program. Runs on its own thread; once the process has
    /// started, writes the `started` answer on `stream` and returns (the deputy and the
    /// keeper go on by themselves). On error nothing was written.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        self: &Arc<Self>,
        stream: UnixStream,
        uid: u32,
        gid: u32,
        mosrun_pid: Option<i32>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: String,
        to: Option<u32>,
        best: bool,
        pinned: bool,
        avoid: Vec<u32>,
    ) -> Result<i32> {
        if argv.is_empty() {
            bail!("nothing to run");
        }
        if let Some(t) = to {
            self.check_destination(t)?;
        }
        let groups = mosrun_pid.map(peer_groups).unwrap_or_default();
        let (tx, rx) = mpsc::channel::<Result<(KeeperTx, i32)>>();
        let me = self.clone();
        let cmd = argv.join(" ");
        let (dtx, drx) = mpsc::channel::<DevEv>();
        let dtx2 = dtx.clone();
        let cmd2 = cmd.clone();
        std::thread::Builder::new()
            .name("mosix-keeper".into())
            .spawn(move || {
                let started = spawn_user(&argv, &env, &cwd, uid, gid, &groups);
                let (child, pipes) = match started {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                // Waited for by the keeper (pidfd + waitpid), not through `Child`.
                let pid = child.id() as i32;
                drop(child);
                let k = Keeper::new(
                    &me,
                    pid,
                    None,
                    pipes,
                    KeeperMeta {
                        home: me.me(),
                        home_pid: pid,
                        epoch: 0,
                        uid,
                        cmd: cmd2,
                        stdin_base: 0,
                        pinned,
                        avoid,
                        migrations: 0,
                    },
                    "started here (its home)".into(),
                );
                let Ok(k) = k else {
                    let _ = tx.send(Err(anyhow!("cannot watch process {pid}")));
                    return;
                };
                let _ = tx.send(Ok((k.tx(), pid)));
                let up = Uplink::Local { tx: dtx2, epoch: 0 };
                k.run(up);
            })?;
        let (ktx, pid) = rx.recv().map_err(|_| anyhow!("the keeper thread died"))??;
        let info = Arc::new(Mutex::new(DeputyInfo {
            uid,
            cmd,
            node: self.me(),
            state: "running",
            mosrun_pid,
            since: Instant::now(),
        }));
        lock(&self.deputies).insert(
            pid,
            DeputyHandle {
                tx: dtx.clone(),
                info: info.clone(),
            },
        );
        let _ = dtx.send(DevEv::HostLinked {
            epoch: 0,
            down: Downlink::Local(ktx),
        });
        // The answer line goes out before any frame of the deputy's.
        {
            let mut line =
                serde_json::to_vec(&mosix_proto::control::Response::Started { home_pid: pid })?;
            line.push(b'\n');
            (&stream).write_all(&line)?;
        }
        // mosrun's frames come in on their own thread.
        let reader = stream.try_clone()?;
        let rtx = dtx.clone();
        std::thread::Builder::new()
            .name("mosix-mosrun".into())
            .spawn(move || {
                let mut r = std::io::BufReader::new(reader);
                loop {
                    match wire::recv::<_, FromRun>(&mut r) {
                        Ok(Some(m)) => {
                            if rtx.send(DevEv::FromRun(m)).is_err() {
                                return;
                            }
                        }
                        _ => {
                            let _ = rtx.send(DevEv::RunGone);
                            return;
                        }
                    }
                }
            })?;
        let me = self.clone();
        let target = if best { self.best_node() } else { to };
        std::thread::Builder::new()
            .name("mosix-deputy".into())
            .spawn(move || {
                let mut d = Deputy::new(me.clone(), pid, info, stream);
                if let Some(t) = target.filter(|&t| t != me.me()) {
                    let (rtx, rrx) = mpsc::channel();
                    d.handle(DevEv::Migrate { to: t, reply: rtx });
                    d.initial_move = Some(rrx);
                }
                d.run(drx);
                lock(&me.deputies).remove(&pid);
            })?;
        info!(pid, uid, "started a migratable process");
        Ok(pid)
    }

    /// The least loaded (per unit of speed) up node other than this one, if it is less
    /// loaded than this one would be.
    fn best_node(&self) -> Option<u32> {
        let nodes = read(&self.state.nodes);
        let mine = nodes.iter().find(|n| n.this_node)?;
        let score = |n: &mosix_proto::NodeStatus, extra: f64| {
            n.load
                .as_ref()
                .map(|l| (l.runnable + extra) / l.speed.max(0.01))
                .unwrap_or(f64::MAX)
        };
        let here = score(mine, 1.0);
        nodes
            .iter()
            .filter(|n| !n.this_node && n.state == NodeState::Up)
            .map(|n| (score(n, 1.0), n.node))
            .filter(|(s, _)| *s < here)
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, n)| n)
    }

    /// Checks that `to` is a node a process may be sent to now.
    fn check_destination(&self, to: u32) -> Result<()> {
        let nodes = read(&self.state.nodes);
        let Some(n) = nodes.iter().find(|n| n.node == to) else {
            bail!("node {to} is not in the cluster map");
        };
        match n.state {
            NodeState::Up => {}
            NodeState::Down => bail!("node {to} is down"),
            NodeState::Incompatible => {
                bail!("node {to} speaks another protocol version (status 1): it cannot take processes")
            }
        }
        if !n.this_node {
            if let Some(l) = &n.load {
                if l.flags & mosix_proto::FLAG_ACCEPTS_GUESTS == 0 {
                    bail!("node {to} does not accept guest processes");
                }
            }
        }
        Ok(())
    }

    fn deputy(&self, pid: i32, uid: u32) -> Result<DeputyHandle> {
        let d = lock(&self.deputies).get(&pid).cloned().ok_or_else(|| {
            anyhow!(
                "no migratable process with home PID {pid} on node {} (start it with mosrun; give the PID on its home node)",
                self.me()
            )
        })?;
        let owner = lock(&d.info).uid;
        if uid != 0 && uid != owner {
            bail!("process {pid} belongs to uid {owner}: you may only move your own processes");
        }
        Ok(d)
    }

    /// `where`: 0 when home, else the node number.
    pub fn where_is(&self, pid: i32) -> Result<u32> {
        let d = lock(&self.deputies)
            .get(&pid)
            .cloned()
            .ok_or_else(|| anyhow!("no migratable process with home PID {pid} on this node"))?;
        let n = lock(&d.info).node;
        Ok(if n == self.me() { 0 } else { n })
    }

    /// `migrate PID NODE|0`: blocks until it runs there, or says why not.
    pub fn migrate(&self, pid: i32, to: u32, uid: u32) -> Result<Moved> {
        let d = self.deputy(pid, uid)?;
        let to = if to == 0 { self.me() } else { to };
        self.check_destination(to)?;
        let (tx, rx) = mpsc::channel();
        d.tx.send(DevEv::Migrate { to, reply: tx })
            .map_err(|_| anyhow!("process {pid} has just ended"))?;
        match rx.recv_timeout(PEER_TIMEOUT * 2) {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(why)) => Err(anyhow!("{why}")),
            Err(_) => Err(anyhow!("no answer about the move of process {pid}")),
        }
    }

    /// `ps`: home processes (here or away) and guests.
    pub fn ps(&self) -> Vec<ProcEntry> {
        let me = self.me();
        let mut out = Vec::new();
        let deputies: Vec<(i32, DeputyInfo)> = lock(&self.deputies)
            .iter()
            .map(|(p, d)| (*p, lock(&d.info).clone()))
            .collect();
        let hosted: Vec<((u32, i32), Hosted)> = lock(&self.hosted)
            .iter()
            .map(|(k, h)| (*k, h.clone()))
            .collect();
        let explain = lock(&self.explanations).clone();
        for ((home, home_pid), h) in &hosted {
            let (rss, cpu) = usage(h.pid);
            let mosrun_pid = if *home == me {
                deputies
                    .iter()
                    .find(|(p, _)| p == home_pid)
                    .and_then(|(_, i)| i.mosrun_pid)
            } else {
                None
            };
            out.push(ProcEntry {
                home: *home,
                home_pid: *home_pid,
                pid: h.pid,
                role: if *home == me { "home" } else { "guest" }.into(),
                where_: if *home == me { 0 } else { me },
                state: if h.migrating { "migrating" } else { "running" }.into(),
                uid: h.uid,
                cmd: h.cmd.clone(),
                rss,
                cpu_secs: cpu,
                resident_secs: h.since.elapsed().as_secs_f64(),
                reason: match explain.get(&proc_id(*home, *home_pid)) {
                    Some(w) => format!("{}; stays: {w}", h.reason),
                    None => h.reason.clone(),
                },
                mosrun_pid,
            });
        }
        for (pid, i) in deputies {
            if hosted.iter().any(|((h, p), _)| *h == me && *p == pid) {
                continue;
            }
            out.push(ProcEntry {
                home: me,
                home_pid: pid,
                pid,
                role: "home".into(),
                where_: if i.node == me { 0 } else { i.node },
                state: i.state.into(),
                uid: i.uid,
                cmd: i.cmd.clone(),
                rss: 0,
                cpu_secs: 0.0,
                resident_secs: i.since.elapsed().as_secs_f64(),
                reason: format!("running on node {}", i.node),
                mosrun_pid: i.mosrun_pid,
            });
        }
        out.sort_by_key(|e| (e.home, e.home_pid));
        out
    }

    /// A host opened its link to a process of ours.
    fn link_from_host(self: &Arc<Self>, ch: Link, l: LinkHello) -> Result<()> {
        let Some(d) = lock(&self.deputies).get(&l.home_pid).cloned() else {
            bail!("link for unknown process {}", l.home_pid);
        };
        let s2 = ch.get_ref().try_clone()?;
        ch.get_ref().set_read_timeout(None)?;
        let (mut r, w) = ch.split(s2)?;
        d.tx.send(DevEv::HostLinked {
            epoch: l.epoch,
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

    // ---------------------------------------------------------------- destination side

    /// Receives a migrating process; on success this thread becomes its keeper.
    fn receive(self: &Arc<Self>, mut ch: Link, h: MigrateHeader) -> Result<()> {
        let t0 = Instant::now();
        let refuse = |ch: &mut Link, why: String| -> Result<()> {
            warn!(home = h.home, pid = h.home_pid, "refused a process: {why}");
            wire::send_flush(ch, &Verdict::Refused(why.clone()))?;
            Err(anyhow!(why))
        };
        let limit = self.mem_limit();
        let bytes = match wire::read_chunks(&mut ch, limit) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return refuse(&mut ch, format!("node {}: {e}", self.me()))
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
        let restored = match mosix_ckpt::restore(&img, opts) {
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

    fn mem_limit(&self) -> u64 {
        let nodes = read(&self.state.nodes);
        nodes
            .iter()
            .find(|n| n.this_node)
            .and_then(|n| n.load.as_ref())
            .map(|l| l.mem_free.max(64 << 20))
            .unwrap_or(u64::MAX)
    }

    fn uplink_to_home(self: &Arc<Self>, h: &MigrateHeader, k: &Keeper) -> Result<Uplink> {
        if h.home == self.me() {
            let d = lock(&self.deputies)
                .get(&h.home_pid)
                .cloned()
                .ok_or_else(|| anyhow!("its deputy has ended"))?;
            d.tx.send(DevEv::HostLinked {
                epoch: h.epoch,
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

    fn connect(&self, node: u32) -> Result<Link> {
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
    fn local_refusals(&self, pid: i32) -> Vec<String> {
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

/// The process's stdio pipes, our ends and (until restored/spawned) the child's.
struct Pipes {
    stdin_w: Option<OwnedFd>,
    /// A duplicate of the process's stdin read end, to count what it has not read.
    stdin_peek: OwnedFd,
    out: [Option<OwnedFd>; 2],
    child: Option<[OwnedFd; 3]>,
}

impl Pipes {
    fn new() -> std::io::Result<Pipes> {
        use nix::fcntl::OFlag;
        let flags = OFlag::O_CLOEXEC;
        let (in_r, in_w) = nix::unistd::pipe2(flags)?;
        let (o_r, o_w) = nix::unistd::pipe2(flags)?;
        let (e_r, e_w) = nix::unistd::pipe2(flags)?;
        for fd in [&in_w, &o_r, &e_r] {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        }
        Ok(Pipes {
            stdin_w: Some(in_w),
            stdin_peek: in_r.try_clone()?,
            out: [Some(o_r), Some(e_r)],
            child: Some([in_r, o_w, e_w]),
        })
    }
    fn child_fds(&self) -> [RawFd; 3] {
        let c = self.child.as_ref().expect("child ends still here");
        [c[0].as_raw_fd(), c[1].as_raw_fd(), c[2].as_raw_fd()]
    }
    fn close_child_ends(&mut self) {
        self.child = None;
    }
}

/// Starts `argv` as `uid`/`gid`, in its own session, dying with this thread.
fn spawn_user(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    uid: u32,
    gid: u32,
    groups: &[u32],
) -> Result<(std::process::Child, Pipes)> {
    use std::os::unix::process::CommandExt;
    let mut pipes = Pipes::new()?;
    let [i, o, e] = pipes.child.take().expect("fresh pipes");
    let mut c = std::process::Command::new(&argv[0]);
    c.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(i)
        .stdout(o)
        .stderr(e);
    let groups: Vec<nix::unistd::Gid> = groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    // SAFETY: the closure runs in the forked child before exec and only makes system
    // calls (setsid, setgroups, setresgid, setresuid, prctl), no allocation or locks.
    unsafe {
        c.pre_exec(move || {
            use nix::unistd::{Gid, Uid};
            nix::unistd::setsid()?;
            nix::unistd::setgroups(&groups)?;
            let g = Gid::from_raw(gid);
            nix::unistd::setresgid(g, g, g)?;
            let u = Uid::from_raw(uid);
            nix::unistd::setresuid(u, u, u)?;
            // After the uid change, which would clear it.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            Ok(())
        });
    }
    let child = c
        .spawn()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    Ok((child, pipes))
}

/// Supplementary groups of a process (the `mosrun` that asked).
fn peer_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Resident memory (bytes) and CPU time (s) of a process.
fn usage(pid: i32) -> (u64, f64) {
    let Ok(f) = mosix_ckpt::procfs::stat_fields(pid) else {
        return (0, 0.0);
    };
    let tick = 100.0;
    let cpu = (mosix_ckpt::procfs::field_u64(&f, 14) + mosix_ckpt::procfs::field_u64(&f, 15))
        as f64
        / tick;
    let rss = mosix_ckpt::procfs::field_u64(&f, 24) * 4096;
    (rss, cpu)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

// -------------------------------------------------------------------- keeper

struct KeeperMeta {
    home: u32,
    home_pid: i32,
    epoch: u64,
    uid: u32,
    cmd: String,
    /// Stdin offset at which this residence's stdin pipe starts.
    stdin_base: u64,
    pinned: bool,
    avoid: Vec<u32>,
    /// Moves it has made so far.
    migrations: u32,
}

/// Watches one process running on this node: relays its stdio, waits for it, moves it.
struct Keeper {
    procs: Arc<Procs>,
    pid: i32,
    ns_init: Option<i32>,
    pidfd: OwnedFd,
    pipes: Pipes,
    meta: KeeperMeta,
    /// Stdin bytes written into the pipe during this residence.
    written: u64,
    pending: Vec<u8>,
    eof_at: Option<u64>,
    rx: Receiver<Cmd>,
    tx: Sender<Cmd>,
    wake_r: OwnedFd,
    wake_w: Arc<OwnedFd>,
}

enum Outcome {
    Exited(ExitStatus),
    Left,
}

impl Keeper {
    fn new(
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
        let k = Keeper {
            procs: procs.clone(),
            pid,
            ns_init,
            pidfd,
            pipes,
            meta,
            written: 0,
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

    fn tx(&self) -> KeeperTx {
        KeeperTx {
            pid: self.pid,
            tx: self.tx.clone(),
            wake: self.wake_w.clone(),
        }
    }

    fn key(&self) -> (u32, i32) {
        (self.meta.home, self.meta.home_pid)
    }

    /// The keeper's loop, until the process ends here or has left.
    fn run(mut self, mut up: Uplink) {
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

    fn serve(&mut self, up: &mut Uplink) -> Outcome {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let mut fds = vec![
                PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.wake_r.as_fd(), PollFlags::POLLIN),
            ];
            let mut which = Vec::new();
            for (i, o) in self.pipes.out.iter().enumerate() {
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
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
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
                self.pump_out(i, &mut buf, up);
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
                        Cmd::Host(ToHost::CloseOut(fd)) => {
                            if (1..=2).contains(&fd) {
                                self.pipes.out[fd as usize - 1] = None;
                            }
                        }
                        Cmd::Host(ToHost::Migrate { to }) => {
                            let id = proc_id(self.meta.home, self.meta.home_pid);
                            let view = self.procs.balance_view();
                            match self.migrate(to, up, "asked for by migrate".into(), None) {
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
                            match self.migrate(to, up, reason, offer) {
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
        }
    }

    /// Reads what the process wrote on fd 1+i and sends it home.
    fn pump_out(&mut self, i: usize, buf: &mut [u8], up: &mut Uplink) {
        loop {
            let Some(fd) = &self.pipes.out[i] else { return };
            match nix::unistd::read(fd, buf) {
                Ok(0) => {
                    self.pipes.out[i] = None;
                    return;
                }
                Ok(n) => {
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

    fn next_stdin(&self) -> u64 {
        self.meta.stdin_base + self.written + self.pending.len() as u64
    }

    fn take_stdin(&mut self, at: u64, data: &[u8]) {
        let next = self.next_stdin();
        let end = at + data.len() as u64;
        if at <= next && next < end {
            self.pending
                .extend_from_slice(&data[(next - at) as usize..]);
        }
        self.push_stdin();
    }

    fn push_stdin(&mut self) {
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
    fn stdin_consumed(&self) -> u64 {
        let unread = mosix_ckpt::sys::unread_bytes(self.pipes.stdin_peek.as_raw_fd()).unwrap_or(0);
        (self.meta.stdin_base + self.written).saturating_sub(unread as u64)
    }

    fn reap(&mut self, buf: &mut [u8], up: &mut Uplink) -> ExitStatus {
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
            self.pump_out(i, buf, up);
        }
        st
    }

    /// Moves the process to `to`: Ok once it runs there (and is gone from here).
    fn migrate(
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
        p.check_destination(to)?;
        let local = p.local_refusals(self.pid);
        if !local.is_empty() {
            bail!(
                "process {} cannot move: {}",
                self.meta.home_pid,
                local.join("; ")
            );
        }
        mosix_ckpt::check(self.pid).map_err(|e| anyhow!("{e}"))?;
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
            self.pump_out(i, &mut buf, up);
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
                Verdict::Refused(why) => bail!("{why}"),
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

    /// Reaps the init of the process's PID namespace (it exits once the process is gone).
    fn reap_ns_init(&self) {
        if let Some(i) = self.ns_init {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(i),
                Some(nix::sys::wait::WaitPidFlag::__WALL),
            );
        }
    }

    fn set_migrating(&self, on: bool) {
        if let Some(h) = lock(&self.procs.hosted).get_mut(&self.key()) {
            h.migrating = on;
        }
    }
}

// -------------------------------------------------------------------- deputy

/// The home side of one process: holds the `mosrun` connection and follows the process.
struct Deputy {
    procs: Arc<Procs>,
    home_pid: i32,
    info: Arc<Mutex<DeputyInfo>>,
    run_w: UnixStream,
    epoch: u64,
    down: Option<Downlink>,
    /// Stdin from offset `stdin_base` on, not yet known to be consumed.
    stdin: Vec<u8>,
    stdin_base: u64,
    stdin_eof: bool,
    closed_out: [bool; 2],
    signals: Vec<i32>,
    pending: BTreeMap<u64, Vec<DevEv>>,
    waiters: Vec<(u32, Sender<Result<Moved, String>>)>,
    ended: bool,
    run_gone: bool,
    /// Since when it has had no host link (between a host's `Left` and the next link).
    unlinked_since: Option<Instant>,
    initial_move: Option<Receiver<Result<Moved, String>>>,
}

impl Deputy {
    fn new(
        procs: Arc<Procs>,
        home_pid: i32,
        info: Arc<Mutex<DeputyInfo>>,
        run_w: UnixStream,
    ) -> Deputy {
        Deputy {
            procs,
            home_pid,
            info,
            run_w,
            epoch: 0,
            down: None,
            stdin: Vec::new(),
            stdin_base: 0,
            stdin_eof: false,
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

    fn run(&mut self, rx: Receiver<DevEv>) {
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
    fn check_initial_move(&mut self) {
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

    fn tell_run(&mut self, m: &ToRun) {
        if !self.run_gone && wire::send_flush(&mut self.run_w, m).is_err() {
            self.run_gone = true;
        }
    }

    fn tell_host(&mut self, m: ToHost) {
        if let Some(d) = &mut self.down {
            if d.send(m).is_err() {
                self.down = None;
            }
        } else if let ToHost::Signal(s) = m {
            self.signals.push(s);
        }
    }

    fn handle(&mut self, ev: DevEv) {
        match ev {
            DevEv::FromRun(m) => match m {
                FromRun::Stdin(data) => {
                    let at = self.stdin_base + self.stdin.len() as u64;
                    self.stdin.extend_from_slice(&data);
                    self.tell_host(ToHost::Stdin { at, data });
                }
                FromRun::StdinEof => {
                    self.stdin_eof = true;
                    let at = self.stdin_base + self.stdin.len() as u64;
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
            DevEv::HostLinked { epoch, down } => {
                if epoch > self.epoch {
                    self.pending
                        .entry(epoch)
                        .or_default()
                        .push(DevEv::HostLinked { epoch, down });
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

    fn on_host_msg(&mut self, msg: ToHome) {
        match msg {
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
                let drop_n = stdin_consumed
                    .saturating_sub(self.stdin_base)
                    .min(self.stdin.len() as u64) as usize;
                self.stdin.drain(..drop_n);
                self.stdin_base += drop_n as u64;
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
    fn resend_state(&mut self) {
        if !self.stdin.is_empty() {
            let data = self.stdin.clone();
            self.tell_host(ToHost::Stdin {
                at: self.stdin_base,
                data,
            });
        }
        if self.stdin_eof {
            let at = self.stdin_base + self.stdin.len() as u64;
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
        self.tell_run(&ToRun::Exited { status, message });
        let _ = self.run_w.shutdown(std::net::Shutdown::Both);
    }
}
