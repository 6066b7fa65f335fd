//! Migratable processes (docs/transparency.md, docs/migration.md).
//!
//! - A process whose home is this node runs here by itself (mosrun made it one and
//!   exec'd it): [`home`] follows it, one driver thread per process around the state
//!   machine of [`job`]. When it leaves, it becomes its own deputy here.
//! - A process of another home running here (a guest) has a supervisor process of its
//!   own ([`supervisor`], `mosixd supervise`): its parent, which holds its seccomp
//!   listener; [`guest`] drives it, one thread per guest, and links it to its home.
//! - A move ([`transfer`]) is a transaction: the source keeps the frozen process until the
//!   destination runs it; any failure before leaves it running where it was.
//!
//! mosixd itself holds no process: they are the user's at home, and their supervisors'
//! away, so a crash or a restart of mosixd loses none of them; what it needs to find them
//! again is in its state directory.

use crate::config::Config;
use crate::State;
use mosix_proto::channel::Channel;
use mosix_proto::NodeState;
use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod checkpoint;
pub mod ckptfile;
mod ckptplan;
pub mod doubt;
pub mod family;
mod gate;
pub mod guest;
pub mod home;
mod homeckpt;
mod imagepipe;
pub mod job;
pub mod mover;
mod outbox;
pub mod recover;
mod rights;
pub mod supervisor;
mod supmsg;
pub mod transfer;
mod ways;

/// What `ps`, `where` and the balancer read of a process, kept by its driver.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Its PID here (the home PID at home; the host's PID for a guest).
    pub pid: i32,
    pub uid: u32,
    pub cmd: String,
    /// The node it runs on.
    pub node: u32,
    pub state: &'static str,
    pub since: Instant,
    pub reason: String,
    pub pinned: bool,
    pub avoid: Vec<u32>,
    pub migrations: u32,
    /// In the middle of a move.
    pub moving: bool,
    /// Its parent at home.
    pub ppid: Option<i32>,
    /// Its residence number (home processes).
    pub epoch: u64,
    /// It runs natively at home (not away, nor here under a supervisor).
    pub native: bool,
    /// Being recovered from a checkpoint, as this residence.
    pub recovering: Option<u64>,
}

/// How long either side of a migration waits for the other.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

type Link = Channel<TcpStream>;

/// Why a move did not happen (or what became of it). Crosses threads and, as text, the
/// wire and the control socket.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MoveError {
    #[error("it is already on node {to}")]
    AlreadyThere { to: u32 },
    #[error("it is in the middle of a move; try again")]
    Busy,
    #[error("it has ended")]
    Ended,
    #[error("it is frozen (`migrate PID continue` first)")]
    Frozen,
    /// A checkpoint of it is being written at home (the process is held for it).
    #[error("a checkpoint of it is being written; try again when it is done")]
    Checkpointing,
    #[error("it moved to node {to} instead")]
    Elsewhere { to: u32 },
    #[error("node {node} cannot take it: {reason}")]
    Refused { node: u32, reason: String },
    #[error("{0}")]
    Destination(String),
    #[error("node {node} went away during the move: {why}")]
    PeerGone { node: u32, why: String },
    /// The link the image went into broke (the caller knows which node it led to).
    #[error("the link broke during the move: {0}")]
    LinkLost(String),
    #[error("it cannot move: {0}")]
    Engine(String),
    /// It runs with rights its user does not have (a set-user-ID or set-group-ID program,
    /// capabilities): away it would have only its user's, and its deputy all of them.
    #[error("it runs with more rights than its user's ({0}): such a process stays home")]
    Rights(String),
    /// A failure reported by the node it runs on, as text.
    #[error("{reason}")]
    Failed { reason: String },
}

/// A finished move, as its requester hears of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub to: u32,
    pub frozen_ms: u64,
    pub memory_bytes: u64,
    /// Bytes of memory sent in each pre-copy round, the final (frozen) one last; empty
    /// for a move without pre-copy.
    pub rounds: Vec<u64>,
}

/// Everything about migratable processes on this node.
pub struct Procs {
    pub cfg: Config,
    /// Keys of the node-to-node channel.
    keys: mosix_proto::channel::ChannelKeys,
    state: Arc<State>,
    /// Processes whose home is here, by PID.
    homes: Mutex<HashMap<i32, home::Handle>>,
    /// Processes of other homes running here, by (home node, home PID).
    guests: Mutex<HashMap<(u32, i32), guest::Handle>>,
    /// Processes at home that had children at the family scan's last look.
    parents: Mutex<std::collections::HashSet<i32>>,
    /// The balancing policy's state (also used to admit incoming offers).
    balancer: Mutex<mosix_balance::Balancer>,
    /// Automatic moves that failed since the balancer last looked: (process id, to).
    failed_moves: Mutex<Vec<(u64, u32)>>,
    /// Why each process here stays, as the balancer last explained it.
    explanations: Mutex<HashMap<u64, String>>,
    started: Instant,
    /// What a process leaving home becomes (the deputy program).
    pub deputy_path: std::path::PathBuf,
    /// Copies restored here whose source went away before deciding (see doubt.rs).
    doubts: doubt::Doubts,
    /// Processes of ours found again after a restart whose move is still being finished
    /// by their mover (followed once it is done): their hosts' links wait, not ended.
    readopting: Mutex<std::collections::HashSet<i32>>,
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

/// Resident memory (bytes) and CPU time (s) of a process.
pub(crate) fn usage(pid: i32) -> (u64, f64) {
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
        let deputy_path = cfg.deputy_path.clone().unwrap_or_else(default_deputy_path);
        Arc::new(Procs {
            cfg,
            keys,
            state,
            homes: Mutex::new(HashMap::new()),
            guests: Mutex::new(HashMap::new()),
            parents: Mutex::new(std::collections::HashSet::new()),
            balancer: Mutex::new(b),
            failed_moves: Mutex::new(Vec::new()),
            explanations: Mutex::new(HashMap::new()),
            started: Instant::now(),
            deputy_path,
            doubts: doubt::Doubts::default(),
            readopting: Mutex::new(std::collections::HashSet::new()),
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

    pub(crate) fn move_failed(&self, id: u64, to: u32) {
        lock(&self.failed_moves).push((id, to));
    }

    pub fn set_explanations(&self, why: Vec<(u64, String)>) {
        *lock(&self.explanations) = why.into_iter().collect();
    }

    pub(crate) fn me(&self) -> u32 {
        self.cfg.node
    }

    fn my_speed(&self) -> f64 {
        read(&self.state.nodes)
            .iter()
            .find(|n| n.this_node)
            .and_then(|n| n.load.as_ref())
            .map(|l| l.speed)
            .unwrap_or(1.0)
    }

    /// The processes running here and free to move, for the balancer (CPU share is
    /// filled in by the caller).
    pub fn balance_view(&self) -> Vec<BalanceView> {
        let speed = self.my_speed();
        let me = self.me();
        let mut out = Vec::new();
        let info = |pid: i32, id: u64, home: u32, s: &Snapshot, parent: bool| {
            let (rss, cpu) = usage(pid);
            BalanceView {
                pid,
                info: mosix_balance::ProcInfo {
                    id,
                    mem_bytes: rss,
                    cpu_share: 1.0,
                    work_done_ms: (cpu * 1000.0 * speed) as u64,
                    resident_ms: s.since.elapsed().as_millis() as u64,
                    migrations: s.migrations,
                    where_now: me,
                    home,
                    pinned: s.pinned,
                    // A parent (a shell, a driver) stays where its children were made and
                    // they move instead: away, its next fork would bring it home.
                    auto: !s.pinned && !parent,
                    avoid: s.avoid.clone(),
                },
            }
        };
        for (pid, h) in lock(&self.homes).iter() {
            let s = h.snapshot();
            // Recovered here and supervised, it is listed as the guest it is.
            if s.node == me && !s.moving && s.native {
                let parent = self.is_parent(*pid);
                out.push(info(*pid, proc_id(me, *pid), me, &s, parent));
            }
        }
        for (&(home, home_pid), g) in lock(&self.guests).iter() {
            let s = lock(&g.info).clone();
            if !s.moving {
                out.push(info(s.pid, proc_id(home, home_pid), home, &s, false));
            }
        }
        out
    }

    /// Asks for an automatic move of process `id`; false if it is not here.
    pub fn auto_migrate(&self, id: u64, to: u32, reason: String, offer: Option<String>) -> bool {
        let me = self.me();
        if let Some(h) = lock(&self.homes)
            .iter()
            .find(|(p, _)| proc_id(me, **p) == id)
            .map(|(_, h)| h.clone())
        {
            return h.migrate(to, reason, offer, None);
        }
        let g = lock(&self.guests)
            .iter()
            .find(|((home, p), _)| proc_id(*home, *p) == id)
            .map(|(_, g)| g.clone());
        match g {
            Some(g) => g.migrate(to, reason, offer),
            None => false,
        }
    }

    /// `mosctl`: change (or show) this node's balancing mode. Root only.
    pub fn mosctl(&self, cmd: &str, uid: u32) -> anyhow::Result<mosix_balance::NodeMode> {
        let mut b = self.balancer();
        let mut m = b.mode();
        if cmd != "show" && uid != 0 {
            anyhow::bail!("only root may change the node's mode");
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
            other => anyhow::bail!(
                "unknown mosctl command '{other}' (stay, nostay, lstay, nolstay, block, noblock, expel, noexpel, show)"
            ),
        }
        b.set_mode(m);
        self.state
            .accepts_guests
            .store(b.accepts_guests(), std::sync::atomic::Ordering::Relaxed);
        tracing::info!(?m, "node mode changed by mosctl {cmd}");
        Ok(m)
    }

    /// The least loaded (per unit of speed) up node other than this one, if it is less
    /// loaded than this one would be.
    pub(crate) fn best_node(&self) -> Option<u32> {
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
    pub(crate) fn check_destination(&self, to: u32) -> Result<(), MoveError> {
        let nodes = read(&self.state.nodes);
        let Some(n) = nodes.iter().find(|n| n.node == to) else {
            return Err(MoveError::Destination(format!(
                "node {to} is not in the cluster map"
            )));
        };
        match n.state {
            NodeState::Up => {}
            NodeState::Down => return Err(MoveError::Destination(format!("node {to} is down"))),
            NodeState::Incompatible => {
                return Err(MoveError::Destination(format!(
                    "node {to} speaks another protocol version (status 1): it cannot take processes"
                )))
            }
        }
        if !n.this_node {
            if let Some(l) = &n.load {
                if l.flags & mosix_proto::FLAG_ACCEPTS_GUESTS == 0 {
                    return Err(MoveError::Destination(format!(
                        "node {to} does not accept guest processes"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether node `n` is up in the cluster view.
    pub(crate) fn node_up(&self, n: u32) -> bool {
        read(&self.state.nodes)
            .iter()
            .any(|s| s.node == n && s.state == NodeState::Up)
    }

    /// Whether `node`'s machine answers on its mosixd's address, even if mosixd does not
    /// (a refused connection: the machine is up, its mosixd is restarting).
    pub(crate) fn machine_answers(&self, node: u32) -> bool {
        let Some(m) = self.cfg.map.iter().find(|m| m.node == node) else {
            return false;
        };
        match TcpStream::connect_timeout(&m.addr, Duration::from_millis(300)) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        }
    }

    pub(crate) fn connect(&self, node: u32) -> anyhow::Result<Link> {
        use anyhow::Context as _;
        let m = self
            .cfg
            .map
            .iter()
            .find(|m| m.node == node)
            .ok_or_else(|| anyhow::anyhow!("node {node} is not in the cluster map"))?;
        let s = TcpStream::connect_timeout(&m.addr, CONNECT_TIMEOUT)
            .with_context(|| format!("cannot connect to node {node} at {}", m.addr))?;
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(PEER_TIMEOUT))?;
        s.set_write_timeout(Some(PEER_TIMEOUT))?;
        Channel::connect(s, &self.keys, node).map_err(|e| anyhow::anyhow!("node {node}: {e}"))
    }

    /// `ps`: home processes (here or away) and guests.
    pub fn ps(&self) -> Vec<mosix_proto::control::ProcEntry> {
        let me = self.me();
        let explain = lock(&self.explanations).clone();
        let mut out = Vec::new();
        for (pid, h) in lock(&self.homes).iter() {
            let s = h.snapshot();
            let here = s.node == me;
            let (rss, cpu) = if here && s.native {
                usage(*pid)
            } else {
                (0, 0.0)
            };
            let reason = match explain.get(&proc_id(me, *pid)) {
                Some(w) if here => format!("{}; stays: {w}", s.reason),
                _ => s.reason.clone(),
            };
            out.push(mosix_proto::control::ProcEntry {
                home: me,
                home_pid: *pid,
                pid: *pid,
                role: "home".into(),
                where_: if here { 0 } else { s.node },
                state: s.state.to_string(),
                uid: s.uid,
                cmd: s.cmd.clone(),
                rss,
                cpu_secs: cpu,
                resident_secs: s.since.elapsed().as_secs_f64(),
                reason,
                ppid: s.ppid,
            });
        }
        for (&(home, home_pid), g) in lock(&self.guests).iter() {
            let s = lock(&g.info).clone();
            let (rss, cpu) = usage(s.pid);
            let reason = match explain.get(&proc_id(home, home_pid)) {
                Some(w) => format!("{}; stays: {w}", s.reason),
                None => s.reason.clone(),
            };
            out.push(mosix_proto::control::ProcEntry {
                home,
                home_pid,
                pid: s.pid,
                role: "guest".into(),
                where_: me,
                state: s.state.to_string(),
                uid: s.uid,
                cmd: s.cmd.clone(),
                rss,
                cpu_secs: cpu,
                resident_secs: s.since.elapsed().as_secs_f64(),
                reason,
                ppid: None,
            });
        }
        out.sort_by_key(|e| (e.home, e.home_pid));
        out
    }
}

/// mosix-deputy beside this daemon's own program.
fn default_deputy_path() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("mosix-deputy")))
        .unwrap_or_else(|| "/usr/local/lib/mosix/mosix-deputy".into())
}
