//! The report of one scenario: every policy side by side, against the lower bound.

use crate::bound::LowerBound;
use crate::engine::{Policy, RunStats, Trace};
use serde::Serialize;
use std::fmt;

/// One policy's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyReport {
    pub policy: Policy,
    /// When the last job finished, seconds (None if some never did).
    pub makespan_s: Option<f64>,
    /// makespan / lower bound (≥ 1).
    pub makespan_vs_bound: Option<f64>,
    /// Mean over jobs of (finish − arrival) / work, work being seconds on an idle node of
    /// speed 1: 1.0 = as if alone on a reference node; below 1 on faster nodes.
    pub mean_slowdown: f64,
    pub max_slowdown: f64,
    pub jobs_done: usize,
    pub unfinished: usize,
    pub migrations: u64,
    pub migrations_per_job: f64,
    pub evacuations: u64,
    pub refused_offers: u64,
    pub failed_migrations: u64,
    pub pingpongs: u64,
    pub landed_without_room: u64,
    pub redirected_arrivals: u64,
    /// Messages (gossip, offers, answers; the batch scheduler's requests and reports) per
    /// node per second of simulated time.
    pub messages_per_node_per_s: f64,
    /// Simulation events processed.
    pub events: u64,
    /// Wall-clock time of the run, seconds (the only figure that is not deterministic).
    pub wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<Trace>,
}

impl PolicyReport {
    pub(crate) fn new(
        r: RunStats,
        bound: &LowerBound,
        nodes: usize,
        jobs: usize,
        wall_s: f64,
    ) -> Self {
        let span = r.end_s.max(1e-9);
        PolicyReport {
            policy: r.policy,
            makespan_s: r.makespan_s,
            makespan_vs_bound: r.makespan_s.map(|m| m / bound.makespan_s.max(1e-12)),
            mean_slowdown: r.mean_slowdown,
            max_slowdown: r.max_slowdown,
            jobs_done: r.jobs_done,
            unfinished: r.unfinished,
            migrations: r.migrations,
            migrations_per_job: r.migrations as f64 / jobs.max(1) as f64,
            evacuations: r.evacuations,
            refused_offers: r.refused_offers,
            failed_migrations: r.failed_migrations,
            pingpongs: r.pingpongs,
            landed_without_room: r.landed_without_room,
            redirected_arrivals: r.redirected_arrivals,
            messages_per_node_per_s: r.messages as f64 / nodes.max(1) as f64 / span,
            events: r.events,
            wall_s,
            trace: r.trace,
        }
    }
}

/// Everything about one scenario run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub scenario: String,
    pub description: String,
    pub seed: u64,
    pub nodes: usize,
    pub cpus: u64,
    /// Sum over CPUs of their speed.
    pub total_speed: f64,
    pub jobs: usize,
    /// Sum of the jobs' work, seconds of a speed-1 CPU.
    pub total_work_s: f64,
    pub lower_bound: LowerBound,
    pub policies: Vec<PolicyReport>,
}

impl Report {
    /// The figures of `policy`, if it was run.
    pub fn policy(&self, policy: Policy) -> Option<&PolicyReport> {
        self.policies.iter().find(|p| p.policy == policy)
    }
}

fn opt(v: Option<f64>, unit: &str, prec: usize) -> String {
    match v {
        Some(x) => format!("{x:.prec$}{unit}"),
        None => "-".into(),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "scenario {}: {} nodes ({} CPUs, total speed {:.1}), {} jobs, {:.1} s of work (seed {})",
            self.scenario, self.nodes, self.cpus, self.total_speed, self.jobs, self.total_work_s, self.seed
        )?;
        if !self.description.is_empty() {
            writeln!(f, "  {}", self.description.trim())?;
        }
        let b = &self.lower_bound;
        writeln!(
            f,
            "lower bound on makespan: {:.1} s (work/capacity {:.1} s, longest job {:.1} s, preemptive {:.1} s)",
            b.makespan_s, b.work_bound_s, b.longest_job_bound_s, b.preemptive_bound_s
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<8} {:>11} {:>9} {:>9} {:>9} {:>10} {:>8} {:>6} {:>10} {:>8}",
            "policy",
            "makespan",
            "vs bound",
            "slowdown",
            "(max)",
            "migr/job",
            "refused",
            "p-pong",
            "msg/node/s",
            "wall"
        )?;
        for p in &self.policies {
            writeln!(
                f,
                "{:<8} {:>11} {:>9} {:>9.2} {:>9.1} {:>10.2} {:>8} {:>6} {:>10.2} {:>7.2}s",
                p.policy.name(),
                opt(p.makespan_s, " s", 1),
                opt(p.makespan_vs_bound, "x", 2),
                p.mean_slowdown,
                p.max_slowdown,
                p.migrations_per_job,
                p.refused_offers,
                p.pingpongs,
                p.messages_per_node_per_s,
                p.wall_s
            )?;
        }
        for p in &self.policies {
            let mut notes = Vec::new();
            if p.unfinished > 0 {
                notes.push(format!("{} jobs never finished", p.unfinished));
            }
            if p.evacuations > 0 {
                notes.push(format!("{} evacuation moves", p.evacuations));
            }
            if p.failed_migrations > 0 {
                notes.push(format!(
                    "{} migrations failed (destination went down)",
                    p.failed_migrations
                ));
            }
            if p.landed_without_room > 0 {
                notes.push(format!(
                    "{} migrations landed without room",
                    p.landed_without_room
                ));
            }
            if p.redirected_arrivals > 0 {
                notes.push(format!(
                    "{} jobs started on a down node were redirected",
                    p.redirected_arrivals
                ));
            }
            if !notes.is_empty() {
                writeln!(f, "{}: {}", p.policy.name(), notes.join("; "))?;
            }
        }
        Ok(())
    }
}
