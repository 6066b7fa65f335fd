//! `mosix sim`: simulate a cluster running the MOSIX balancing policy (mosix-balance, the
//! code mosixd runs) against the no-migration and initial-placement baselines and the
//! optimal lower bound. All the work is in the `mosix-sim` crate.

use anyhow::Result;
use mosix_sim::{load_scenario, run_with, Policy, RunOptions};
use std::path::PathBuf;

/// Simulate a cluster: the MOSIX policy side by side with the baselines.
///
/// SCENARIO.toml describes the nodes (count, speed, CPUs, memory), the jobs (an explicit
/// list and/or generated arrivals with work and memory distributions), the network, the
/// gossip (period, fanout, window), the policy's parameters and node events (leave,
/// return). The report gives, for each policy, the makespan and its ratio to a lower bound
/// no scheduler can beat, the mean slowdown (time in the system / time alone on an idle
/// speed-1 node), migrations per job, refused offers, ping-pongs and messages per node per
/// second. See docs/balance.md and the scenarios/ directory.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  mosix sim scenarios/faq-8-jobs-4-nodes.toml\n  \
                        mosix sim scenarios/mixed-speeds.toml --policy mosix --seed 7\n  \
                        mosix sim scenarios/large-10000-nodes.toml --json | jq '.policies[] | \
                        {policy, makespan_vs_bound}'"
)]
pub struct Args {
    /// Scenario file (TOML).
    #[arg(value_name = "SCENARIO.toml")]
    scenario: PathBuf,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Which policy to simulate: mosix, none (no migration), initial (place once at
    /// arrival, never move), or all of them side by side.
    #[arg(long, default_value = "all", value_parser = ["mosix", "none", "initial", "all"])]
    policy: String,
    /// Seed of the simulation's random choices (gossip targets and phases, the policy's
    /// draws). The workload is drawn from the scenario's own `seed`.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Include every migration, with its reason, in the JSON report.
    #[arg(long, requires = "json")]
    trace: bool,
}

pub fn run(a: Args) -> Result<i32> {
    let scenario = load_scenario(&a.scenario)?;
    let policies = Policy::parse_list(&a.policy).map_err(anyhow::Error::msg)?;
    let report = run_with(&scenario, &policies, a.seed, RunOptions { trace: a.trace });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(0)
}
