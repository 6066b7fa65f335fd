//! `mosix-sim`: a discrete-event simulator of a MOSIX cluster that runs the very policy
//! mosixd runs (`mosix-balance`), next to two baselines and the optimal lower bound.
//!
//! ```no_run
//! let s = mosix_sim::load_scenario(std::path::Path::new("scenarios/faq-8-jobs-4-nodes.toml"))?;
//! let report = mosix_sim::run_all(&s, &mosix_sim::Policy::ALL, 1);
//! println!("{report}");
//! # Ok::<(), mosix_sim::ScenarioError>(())
//! ```
//!
//! The model (see `docs/balance.md`):
//!
//! * Nodes have a speed per CPU, CPUs and memory. CPU is processor-shared: k jobs on a node
//!   of c CPUs and speed s each progress at s × min(1, c/k) work-seconds per second. A node
//!   whose jobs need more memory than it has slows down by 1 + swap_penalty × overcommit.
//! * Jobs are CPU-bound processes with a work (seconds of a speed-1 CPU) and a memory size,
//!   started on their home node at their arrival time.
//! * Each node publishes its runnable count as an exponential average (1 s time constant,
//!   as mosixd) and gossips MOSIX-style: every period it sends its own load and its freshest
//!   entries to `fanout` random nodes; each node keeps a window of the freshest entries. So
//!   information is partial and aged, and the cost is O(nodes) per period.
//! * Every `tick_ms` each busy node calls `Balancer::tick`; each decision is offered to the
//!   destination, which checks it with `Balancer::admit`; an accepted process is frozen
//!   while its memory crosses the link (the sender's link carries one migration at a time),
//!   and the source keeps its memory until it has arrived (migration is a transaction).
//! * Node leave is graceful: the node stops taking guests at once, MOSIX evacuates it
//!   (home first); after `grace_s` it powers off and what is still on it freezes until it
//!   returns. The baselines cannot migrate: their jobs freeze at power-off.

#![forbid(unsafe_code)]

mod bound;
mod engine;
mod report;
mod scenario;

pub use bound::{lower_bound, LowerBound};
pub use engine::{simulate, Migration, Policy, RunOptions, RunStats, Trace, PINGPONG_WINDOW_S};
pub use report::{PolicyReport, Report};
pub use scenario::{
    load_scenario, parse_ranges, parse_scenario, EventKind, GossipSpec, JobSpec, NodeEvent,
    NodeSpec, Scenario, ScenarioError,
};

use std::time::Instant;

/// Runs `policies` (each on its own, same seed) and reports them side by side.
pub fn run_all(s: &Scenario, policies: &[Policy], seed: u64) -> Report {
    run_with(s, policies, seed, RunOptions::default())
}

/// As [`run_all`], with options (e.g. a trace of every migration).
pub fn run_with(s: &Scenario, policies: &[Policy], seed: u64, opts: RunOptions) -> Report {
    let bound = lower_bound(s);
    let max_time = s.max_time_s.unwrap_or(100.0 * bound.makespan_s + 600.0);
    let jobs = s.jobs.len();
    let nodes = s.nodes.len();
    let policies = policies
        .iter()
        .map(|&p| {
            let t0 = Instant::now();
            // The baselines have no periodic events: they always run to the end.
            let limit = if p == Policy::Mosix {
                max_time
            } else {
                f64::INFINITY
            };
            let r = simulate(s, p, seed, opts, limit);
            PolicyReport::new(r, &bound, nodes, jobs, t0.elapsed().as_secs_f64())
        })
        .collect();
    Report {
        scenario: s.name.clone(),
        description: s.description.clone(),
        seed,
        nodes,
        cpus: s.nodes.iter().map(|n| u64::from(n.cpus)).sum(),
        total_speed: s.nodes.iter().map(|n| n.speed * f64::from(n.cpus)).sum(),
        jobs,
        total_work_s: s.jobs.iter().map(|j| j.work_s).sum(),
        lower_bound: bound,
        policies,
    }
}

/// Runs one policy and reports it (with the lower bound).
pub fn run(s: &Scenario, policy: Policy, seed: u64) -> Report {
    run_all(s, &[policy], seed)
}
