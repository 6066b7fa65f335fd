//! `cargo bench -p mosix-sim`: the policy's makespan against the optimal lower bound on
//! every shipped scenario and on clusters of 10 to 10,000 nodes, with the wall time of
//! each run. One line per figure:
//! `BENCH <name> <value> <unit> [vs <reference>=<ratio>]`.

use mosix_sim::{load_scenario, parse_scenario, run_all, Policy, Report, Scenario};
use std::path::PathBuf;

fn scenarios_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scenarios")
}

/// The shape of large-10000-nodes.toml for `n` nodes: 60% speed 1, 30% speed 2, 10% speed
/// 4 with 2 CPUs; 10 jobs per node arriving over 200 s on the first 30% of the nodes.
fn scaled(n: u32) -> Scenario {
    let (a, b) = (n * 6 / 10, n * 3 / 10);
    let c = n - a - b;
    let text = format!(
        r#"
        seed = 11
        [[nodes]]
        count = {a}
        speed = 1.0
        mem_mb = 4096
        [[nodes]]
        count = {b}
        speed = 2.0
        mem_mb = 8192
        [[nodes]]
        count = {c}
        speed = 4.0
        cpus = 2
        mem_mb = 16384
        [[generate]]
        count = {jobs}
        arrival = "poisson"
        rate_per_s = {rate}
        homes = "1-{hot}"
        work_s = {{ dist = "exp", mean = 60 }}
        mem_mb = {{ dist = "uniform", min = 16, max = 512 }}
        "#,
        jobs = n * 10,
        rate = f64::from(n) / 20.0,
        hot = (n * 3 / 10).max(1),
    );
    parse_scenario(&text, &format!("scale-{n}")).expect("scaled scenario")
}

fn ratio(r: &Report, p: Policy) -> f64 {
    r.policy(p)
        .and_then(|x| x.makespan_vs_bound)
        .unwrap_or(f64::NAN)
}

fn report(name: &str, r: &Report) {
    let name = name.replace('-', "_");
    let m = r.policy(Policy::Mosix).expect("mosix ran");
    let (rm, ri, rn) = (
        ratio(r, Policy::Mosix),
        ratio(r, Policy::Initial),
        ratio(r, Policy::None),
    );
    println!(
        "BENCH sim_{name}_makespan {:.1} s vs optimum={rm:.2}",
        m.makespan_s.unwrap_or(f64::NAN)
    );
    println!("BENCH sim_{name}_makespan_vs_optimum {rm:.2} x vs optimum={rm:.2}");
    println!(
        "BENCH sim_{name}_initial_makespan_vs_optimum {ri:.2} x vs mosix={:.2}",
        ri / rm
    );
    println!(
        "BENCH sim_{name}_none_makespan_vs_optimum {rn:.2} x vs mosix={:.2}",
        rn / rm
    );
    let si = r
        .policy(Policy::Initial)
        .map_or(f64::NAN, |x| x.mean_slowdown);
    println!(
        "BENCH sim_{name}_mean_slowdown {:.2} x vs initial={:.2}",
        m.mean_slowdown,
        m.mean_slowdown / si
    );
    println!(
        "BENCH sim_{name}_migrations_per_job {:.2} migrations",
        m.migrations_per_job
    );
    println!(
        "BENCH sim_{name}_messages_per_node {:.2} msg/s",
        m.messages_per_node_per_s
    );
    println!("BENCH sim_{name}_wall {:.2} s", m.wall_s);
}

fn main() {
    // `cargo bench -- FILTER` runs only the figures whose name contains FILTER.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    for name in [
        "faq-8-jobs-4-nodes",
        "mixed-speeds",
        "memory-pressure",
        "node-leaves-and-returns",
    ] {
        if !wanted(name) {
            continue;
        }
        let s = load_scenario(&scenarios_dir().join(format!("{name}.toml"))).expect("scenario");
        report(name, &run_all(&s, &Policy::ALL, 1));
    }
    for n in [10u32, 100, 1000, 10_000] {
        let name = format!("scale_{n}_nodes");
        let large = n == 10_000 && wanted("large");
        if !(wanted(&name) || large) {
            continue;
        }
        // 10,000 nodes is the shipped large scenario itself.
        let s = if n == 10_000 {
            load_scenario(&scenarios_dir().join("large-10000-nodes.toml")).expect("scenario")
        } else {
            scaled(n)
        };
        let r = run_all(&s, &Policy::ALL, 1);
        if n == 10_000 {
            report("large-10000-nodes", &r);
        }
        let m = r.policy(Policy::Mosix).expect("mosix ran");
        let (rm, ri) = (ratio(&r, Policy::Mosix), ratio(&r, Policy::Initial));
        println!(
            "BENCH sim_{name}_makespan_vs_optimum {rm:.2} x vs initial={:.2}",
            rm / ri
        );
        println!("BENCH sim_{name}_wall {:.2} s", m.wall_s);
    }
}
