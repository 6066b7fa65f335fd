//! Drives the pure policy of `mosix-balance` from the daemon: once a second it feeds the
//! balancer this node's own load, the gossiped loads of the others and the processes
//! running here, and asks their drivers to move the ones it picks. The destination checks
//! each offer with its own fresher load (`Balancer::admit`) before taking a process.

use crate::procs::Procs;
use mosix_balance::{NodeInfo, ProcInfo};
use mosix_proto::{NodeState, NodeStatus, FLAG_ACCEPTS_GUESTS, FLAG_LEAVING};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often the policy runs (a process may make its first move after
/// `Params::first_move_residency_ms`, so the tick must not be much longer).
const TICK: Duration = Duration::from_millis(mosix_balance::TICK_MS);

/// The nice value of the daemon's work that must not wait behind the jobs of a busy node:
/// the balancing thread, and a driver's thread while it moves its process out.
const BOOSTED_NICE: i32 = -10;

/// Raises the calling thread's CPU priority (nice, per thread on Linux) until dropped,
/// when it goes back to what it was. Only for threads that start no process meanwhile (a
/// child would inherit it). Without the privilege (CAP_SYS_NICE) it does nothing.
pub struct Boost {
    before: Option<i32>,
    /// Per thread: the guard must be dropped where it was made.
    _thread: std::marker::PhantomData<*const ()>,
}

fn gettid() -> libc::id_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as libc::id_t }
}

impl Boost {
    /// Boosts the calling thread (a driver moving its process: `let _b = Boost::thread();`).
    pub fn thread() -> Boost {
        let tid = gettid();
        // SAFETY: getpriority/setpriority on our own thread id; errno is cleared first
        // because -1 is also a valid priority.
        let before = unsafe {
            *libc::__errno_location() = 0;
            let p = libc::getpriority(libc::PRIO_PROCESS, tid);
            if p == -1 && *libc::__errno_location() != 0 {
                return Boost {
                    before: None,
                    _thread: std::marker::PhantomData,
                };
            }
            if p <= BOOSTED_NICE || libc::setpriority(libc::PRIO_PROCESS, tid, BOOSTED_NICE) != 0 {
                return Boost {
                    before: None,
                    _thread: std::marker::PhantomData,
                };
            }
            p
        };
        Boost {
            before: Some(before),
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some(p) = self.before {
            // SAFETY: setpriority on our own thread id (the guard is not Send: same thread).
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, gettid(), p);
            }
        }
    }
}

/// This node or a peer, as the policy sees it.
pub fn node_info(n: &NodeStatus) -> Option<NodeInfo> {
    let l = n.load.as_ref()?;
    Some(NodeInfo {
        node: n.node,
        speed: l.speed,
        cpus: l.cpus.max(1),
        runnable: l.runnable,
        mem_total: l.mem_total,
        mem_free: l.mem_free,
        age_ms: if n.this_node {
            0
        } else {
            n.age_ms.unwrap_or(u64::MAX / 4)
        },
        accepts_guests: l.flags & FLAG_ACCEPTS_GUESTS != 0,
        up: n.state == NodeState::Up && l.flags & FLAG_LEAVING == 0,
    })
}

/// CPU demand of a process from /proc/PID/schedstat: (time on a CPU + time waiting for
/// one) per unit of wall time since the last reading.
struct Demand {
    last: HashMap<i32, (u64, std::time::Instant)>,
}

impl Demand {
    fn share(&mut self, pid: i32) -> f64 {
        let Some(now_ns) = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
                Some(it.next()??.saturating_add(it.next()??))
            })
        else {
            return 0.0;
        };
        let t = std::time::Instant::now();
        match self.last.insert(pid, (now_ns, t)) {
            Some((ns, at)) => {
                let wall = t.duration_since(at).as_nanos() as f64;
                if wall > 0.0 {
                    (now_ns.saturating_sub(ns) as f64 / wall).clamp(0.0, 1.0)
                } else {
                    1.0
                }
            }
            // First sight: assume it wants the CPU (it was just started or moved here).
            None => 1.0,
        }
    }
}

/// Starts the balancing thread.
pub fn start(procs: Arc<Procs>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("mosix-balance".into())
        .spawn(move || run(procs))
        .map(drop)
}

fn run(procs: Arc<Procs>) {
    // A loaded node is where balancing matters most: do not wait behind its jobs.
    let boost = Boost::thread();
    if boost.before.is_none() {
        warn!("cannot raise the balancing thread's priority (CAP_SYS_NICE): balancing may lag on busy nodes");
    }
    let mut demand = Demand {
        last: HashMap::new(),
    };
    let mut seed = std::process::id() as u64 ^ 0x5eed;
    loop {
        std::thread::sleep(TICK);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let nodes = procs.nodes();
        let Some(me) = nodes.iter().find(|n| n.this_node).and_then(node_info) else {
            continue;
        };
        let peers: Vec<NodeInfo> = nodes
            .iter()
            .filter(|n| !n.this_node)
            .filter_map(node_info)
            .collect();
        let view = procs.balance_view();
        let infos: Vec<ProcInfo> = view
            .iter()
            .map(|v| {
                let mut p = v.info.clone();
                p.cpu_share = demand.share(v.pid);
                p
            })
            .collect();
        demand
            .last
            .retain(|pid, _| view.iter().any(|v| v.pid == *pid));
        let now = procs.now_ms();
        for (proc, to) in procs.take_failed_moves() {
            procs.balancer().refused(now, proc, to);
        }
        let (decisions, why) = {
            let mut b = procs.balancer();
            let d = b.tick(now, &me, &peers, &infos, seed);
            let why: Vec<(u64, String)> = infos
                .iter()
                .filter_map(|p| {
                    b.explain(now, &me, &peers, &infos, p.id)
                        .map(|r| (p.id, r.to_string()))
                })
                .collect();
            (d, why)
        };
        procs.set_explanations(why);
        for d in decisions {
            let reason = d.reason.to_string();
            let offer = serde_json::to_string(&d.offer).ok();
            info!(proc = d.proc, to = d.to, "balancing: {reason}");
            if !procs.auto_migrate(d.proc, d.to, reason, offer) {
                warn!(proc = d.proc, "balancing: the process is gone");
            }
        }
    }
}
