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

mod deputy;
mod flow;
mod gate;
mod keeper;
mod spawn;
mod transfer;

use gate::{HandshakeGate, HandshakeSlot};
pub use spawn::Caller;

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
    /// Keys of the node-to-node channel (cluster secret, and this node's and its peers' keys).
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

/// Events of a deputy; `L` is the link to a host (a [`Downlink`] in the daemon).
enum Ev<L> {
    FromRun(FromRun),
    RunGone,
    /// The writer thread gave `mosrun` this many bytes of output.
    RunWrote(u64),
    FromHost {
        epoch: u64,
        msg: ToHome,
    },
    HostLinked {
        epoch: u64,
        /// The host (authenticated by its node key where the cluster has them).
        node: u32,
        down: L,
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

/// A deputy event in the daemon.
type DevEv = Ev<Downlink>;

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

    /// The least loaded (per unit of speed) up node other than this one, if it is less
    /// loaded than this one would be.
    fn best_node(&self) -> Option<u32> {
        let nodes = read(&self.state.nodes);
        let mine = nodes.iter().find(|n| n.this_node)?;
        let score = |n: &mosix_proto::NodeStatus, extra: f64| {
            n.load
                .as_ref()
                .map(|l| (l.runnable + extra) / (l.speed.max(0.01) * f64::from(l.cpus.max(1))))
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
}

/// The process's stdio pipes, our ends and (until restored/spawned) the child's.
struct Pipes {
    stdin_w: Option<OwnedFd>,
    /// A duplicate of the process's stdin read end, to count what it has not read.
    stdin_peek: OwnedFd,
    out: [Option<OwnedFd>; 2],
    child: Option<[OwnedFd; 3]>,
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
    /// Stdin offset the process was last reported home to have consumed.
    reported: u64,
    /// Output read and not yet delivered by home.
    out: flow::OutCredit,
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
