//! The MOSIX load-balancing policy: pure and sans-IO.
//!
//! No sockets, clocks, threads or randomness source of its own: the caller passes the time
//! (`now_ms`), what it knows of the cluster, and a random seed, and gets decisions back.
//! mosixd calls [`Balancer::tick`] about once a second; `mosix-sim` calls the very same
//! code for every simulated node. See `docs/balance.md` for the formulas and the reasons
//! behind every stability measure.
//!
//! One [`Balancer`] per node. Each tick, for the processes on this node:
//!
//! 1. `mosctl expel`: guests are sent home ([`MoveKind::Expel`]).
//! 2. Memory ushering: when free memory is below the reserve, processes go to nodes that
//!    have room for them, before this node swaps ([`MoveKind::Memory`]).
//! 3. Load: a process moves when its expected finish time elsewhere, plus the time to move
//!    its memory, beats its expected finish here by the gain threshold
//!    ([`MoveKind::Load`]). Rates are normalised by speed, so faster nodes are preferred.
//!
//! A receiver checks an [`Offer`] with [`Balancer::admit`] against its own, fresher state
//! before accepting; a refusal is fed back with [`Balancer::refused`].
//!
//! Units: times in milliseconds, memory in bytes, speed relative to a reference CPU (1.0),
//! work in milliseconds of that reference CPU.

#![forbid(unsafe_code)]

mod policy;
mod reason;
pub mod rng;

pub use policy::{cost_ms, expected_rate, Balancer};
pub use reason::{bytes, secs, Excluded, LoadSeen, MoveKind, Reason};

use serde::{Deserialize, Serialize};

/// How often a node runs [`Balancer::tick`], ms: mosixd's balancing period and the
/// simulator's default `tick_ms`. Short, because a process may make its first move after
/// `Params::first_move_residency_ms`; each tick is cheap (a few microseconds per process).
pub const TICK_MS: u64 = 250;

/// What a node knows of one node (itself or a peer), from its own sampling or from gossip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node number (as in the cluster map).
    pub node: u32,
    /// Relative CPU speed of one CPU (1.0 = the reference machine). Not positive or not
    /// finite: the node is never used.
    pub speed: f64,
    /// Number of CPUs (0 is taken as 1).
    pub cpus: u32,
    /// Average number of runnable processes (running or waiting for a CPU), NOT normalised
    /// by speed or CPUs; includes processes MOSIX does not manage.
    pub runnable: f64,
    /// Memory available to the node, bytes. 0 = unknown: nothing is sent there.
    pub mem_total: u64,
    /// Memory free (available) on the node, bytes.
    pub mem_free: u64,
    /// Age of this information, ms: how long ago the node sampled it (0 for the node's own).
    pub age_ms: u64,
    /// Whether it takes guests (false after `mosctl block`). A process may always go home.
    pub accepts_guests: bool,
    /// Whether it is up and protocol-compatible (status 3).
    pub up: bool,
}

impl NodeInfo {
    /// An idle node that is up, fresh and accepts guests: `cpus` 1, runnable 0, all memory free.
    pub fn idle(node: u32, speed: f64, mem_total: u64) -> Self {
        NodeInfo {
            node,
            speed,
            cpus: 1,
            runnable: 0.0,
            mem_total,
            mem_free: mem_total,
            age_ms: 0,
            accepts_guests: true,
            up: true,
        }
    }
}

/// One process on the deciding node (local processes and guests alike).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcInfo {
    /// Cluster-unique id (e.g. home node << 32 | home PID). Used to recognise an admitted
    /// guest when it arrives, and to avoid re-sending a process whose move is under way.
    pub id: u64,
    /// Memory that moves with the process (resident + swapped private pages), bytes.
    pub mem_bytes: u64,
    /// Fraction of recent time the process wanted a CPU (running or runnable), 0..=1.
    /// CPU-bound ≈ 1 whatever the contention: count time in state R, not CPU time.
    pub cpu_share: f64,
    /// CPU work done so far, in ms of a speed-1 CPU (CPU time × speed of the nodes it ran
    /// on). The policy expects a process to need about as much again (the older a process,
    /// the longer it will live: Harchol-Balter and Downey).
    pub work_done_ms: u64,
    /// Time since the process arrived on this node (or started, if it never moved), ms.
    pub resident_ms: u64,
    /// How many times it has migrated so far. After a migration it must stay long enough
    /// to pay for it before moving again; a process that never moved needs only the floor.
    pub migrations: u32,
    /// Node it is on now (must be the deciding node).
    pub where_now: u32,
    /// Its home node.
    pub home: u32,
    /// Pinned by the user (`mosrun -L`): never moved automatically.
    pub pinned: bool,
    /// Automatic migration allowed for this process.
    pub auto: bool,
    /// Nodes it must never be sent to.
    pub avoid: Vec<u32>,
}

impl ProcInfo {
    /// A CPU-bound process at home, free to move, that has been there `resident_ms` and has
    /// done that much work.
    pub fn cpu_bound(id: u64, node: u32, mem_bytes: u64, resident_ms: u64) -> Self {
        ProcInfo {
            id,
            mem_bytes,
            cpu_share: 1.0,
            work_done_ms: resident_ms,
            resident_ms,
            migrations: 0,
            where_now: node,
            home: node,
            pinned: false,
            auto: true,
            avoid: Vec::new(),
        }
    }
}

/// Tunables of the policy. `Default` is what mosixd uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Params {
    /// Bandwidth of a migration, bytes/s (1 Gb/s Ethernet ≈ 117e6 usable).
    pub link_bytes_per_sec: f64,
    /// Fixed cost of any migration (freeze, handshake, restore), ms.
    pub move_overhead_ms: f64,
    /// Floor of the residency: no process that has migrated before moves again before it
    /// has been on its node this long, ms. Memory ushering needs only this floor.
    pub min_residency_ms: u64,
    /// The floor before a process's first move, ms (at most `min_residency_ms`): a process
    /// that never moved cannot ping-pong, and the remaining work assumed for a young
    /// process (`min_work_estimate_ms`) already keeps short ones home unless the gain is
    /// large. Small, so that the FAQ's 8 jobs spread in well under a second.
    pub first_move_residency_ms: u64,
    /// A load move of a process that has migrated before also needs `residency_per_cost` ×
    /// its own migration cost of residency: time spent migrating stays below 1/(1 + this)
    /// of a process's life.
    pub residency_per_cost: f64,
    /// A load move needs expected finish there + move cost ≤ (1 − this) × finish here.
    pub gain_threshold: f64,
    /// Remaining work assumed for a process younger than this, ms of a speed-1 CPU.
    pub min_work_estimate_ms: u64,
    /// Processes wanting the CPU less than this fraction of the time are not moved for load.
    pub min_cpu_share: f64,
    /// Memory kept free on every node, as a fraction of its total: below it a node ushers
    /// processes out, and nothing is sent to a node that it would take below it.
    pub mem_reserve_frac: f64,
    /// At most this many automatic sends per tick (expel and evacuation are not limited).
    pub max_sends_per_tick: usize,
    /// Peer information older than this is not used, ms.
    pub stale_after_ms: u64,
    /// How long a node's published runnable count takes to show a change (load-average
    /// time constant and sampling), ms: a send is accounted for locally until then.
    pub settle_ms: u64,
    /// Destinations whose expected finish is within this fraction of the best are equally
    /// good: one is drawn at random (the process's home first, if among them).
    pub choice_slack: f64,
    /// A load move of relative gain g is sent with probability min(1, g / (this ×
    /// gain_threshold)); 0 = always.
    pub send_prob_scale: f64,
    /// After a refusal the peer is not offered anything for this long, ms.
    pub refuse_backoff_ms: u64,
    /// How long an admitted guest's reservation lasts beyond its expected transfer, ms.
    pub reservation_ms: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            link_bytes_per_sec: 117e6,
            move_overhead_ms: 50.0,
            min_residency_ms: 2000,
            first_move_residency_ms: 200,
            residency_per_cost: 5.0,
            gain_threshold: 0.15,
            min_work_estimate_ms: 1000,
            min_cpu_share: 0.25,
            mem_reserve_frac: 0.1,
            max_sends_per_tick: 4,
            stale_after_ms: 5000,
            settle_ms: 2000,
            choice_slack: 0.1,
            send_prob_scale: 2.0,
            refuse_backoff_ms: 3000,
            reservation_ms: 10_000,
        }
    }
}

/// Per-node switches, as `mosctl` sets them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeMode {
    /// `mosctl stay`: send nothing away automatically.
    pub stay: bool,
    /// `mosctl lstay`: local processes stay; guests may still leave.
    pub lstay: bool,
    /// `mosctl block`: accept no guests (processes coming home are still accepted). The
    /// daemon should also gossip `accepts_guests = false`.
    pub block: bool,
    /// `mosctl expel`: send guests home (implies block).
    pub expel: bool,
}

/// One process to send: `proc` goes to node `to`, because of `reason`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Process id (`ProcInfo::id`).
    pub proc: u64,
    /// Destination node.
    pub to: u32,
    /// Why (always a move reason).
    pub reason: Reason,
    /// What to send the destination with the migration request, for [`Balancer::admit`].
    pub offer: Offer,
}

/// What a sender tells the receiver before moving a process, so that the receiver can
/// check the move still pays with its own, fresher load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub proc: u64,
    pub from: u32,
    pub to: u32,
    pub home: u32,
    pub kind: MoveKind,
    pub mem_bytes: u64,
    pub cpu_share: f64,
    /// Remaining work the sender assumed, ms of a speed-1 CPU.
    pub work_ms: f64,
    /// Expected finish time if the process stays, ms.
    pub finish_here_ms: f64,
    /// Expected time to move it (including waiting for the sender's link), ms.
    pub cost_ms: f64,
}
