//! Simulator tests: the policy against the baselines on the shipped scenarios, and the
//! behaviour the MOSIX FAQ promises. Nothing here depends on wall-clock time.

use mosix_sim::{
    load_scenario, parse_scenario, run_with, JobSpec, NodeSpec, Policy, Report, RunOptions,
    Scenario,
};
use std::path::PathBuf;

fn scenario(name: &str) -> Scenario {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../scenarios")
        .join(format!("{name}.toml"));
    load_scenario(&p).unwrap_or_else(|e| panic!("{e}"))
}

fn traced(s: &Scenario, policies: &[Policy]) -> Report {
    run_with(s, policies, 1, RunOptions { trace: true })
}

const SMALL: [&str; 5] = [
    "faq-8-jobs-4-nodes",
    "mixed-speeds",
    "mixed-cpus",
    "memory-pressure",
    "node-leaves-and-returns",
];

/// A→B→A moves of one job within `window` seconds (A→B start to B→A arrival), from a trace.
fn pingpongs(r: &Report, window: f64) -> usize {
    let tr = r.policy(Policy::Mosix).unwrap().trace.as_ref().unwrap();
    let mut by_job: std::collections::BTreeMap<usize, Vec<&mosix_sim::Migration>> =
        Default::default();
    for m in &tr.migrations {
        by_job.entry(m.job).or_default().push(m);
    }
    by_job
        .values()
        .map(|ms| {
            ms.windows(2)
                .filter(|w| {
                    w[0].from == w[1].to
                        && w[0].to == w[1].from
                        && w[1].arrive_s - w[0].start_s < window
                })
                .count()
        })
        .sum()
}

#[test]
fn mosix_beats_no_migration_on_every_small_scenario() {
    for name in SMALL {
        let s = scenario(name);
        let r = traced(&s, &Policy::ALL);
        let m = r.policy(Policy::Mosix).unwrap();
        let none = r.policy(Policy::None).unwrap();
        let (Some(mm), Some(nm)) = (m.makespan_s, none.makespan_s) else {
            panic!("{name}: unfinished jobs\n{r}");
        };
        assert!(mm < nm, "{name}: mosix {mm} !< none {nm}\n{r}");
        assert!(
            m.makespan_vs_bound.unwrap() >= 1.0 - 1e-9,
            "{name}: beat the lower bound?\n{r}"
        );
        assert_eq!(
            m.landed_without_room, 0,
            "{name}: a migration landed without room\n{r}"
        );
        assert_eq!(pingpongs(&r, 30.0), 0, "{name}: ping-pong\n{r}");
        assert_eq!(m.pingpongs, 0, "{name}\n{r}");
        // The trace agrees with the counters.
        let tr = m.trace.as_ref().unwrap();
        assert_eq!(tr.migrations.len() as u64, m.migrations);
    }
}

#[test]
fn faq_ends_with_two_jobs_per_node_before_the_first_finishes() {
    let s = scenario("faq-8-jobs-4-nodes");
    for seed in 1..=5 {
        let r = run_with(&s, &[Policy::Mosix], seed, RunOptions { trace: true });
        let m = r.policy(Policy::Mosix).unwrap();
        let tr = m.trace.as_ref().unwrap();
        assert_eq!(
            tr.jobs_per_node_at_first_completion,
            vec![2, 2, 2, 2],
            "seed {seed}\n{r}"
        );
        // Spread within a few seconds (the first jobs finish at about 60 s; after that the
        // tail may be rebalanced), and no job moved more than once (no oscillation).
        assert!(
            tr.migrations
                .iter()
                .all(|x| x.start_s < 10.0 || x.start_s > 55.0),
            "seed {seed}: {:?}",
            tr.migrations
        );
        let mut moved = std::collections::HashSet::new();
        assert!(
            tr.migrations.iter().all(|x| moved.insert(x.job)),
            "a job moved twice: {:?}",
            tr.migrations
        );
        assert!(m.makespan_vs_bound.unwrap() < 1.1, "seed {seed}\n{r}");
    }
}

#[test]
fn one_job_goes_to_the_fastest_node() {
    let nodes = [1.0, 1.0, 1.0, 3.0]
        .iter()
        .map(|&speed| NodeSpec {
            speed,
            cpus: 1,
            mem_bytes: 4 << 30,
        })
        .collect();
    let job = JobSpec {
        at_s: 0.0,
        home: 1,
        work_s: 30.0,
        mem_bytes: 2 << 20,
        pinned: false,
        auto: true,
        avoid: vec![],
    };
    let s = Scenario::new("one-job", nodes, vec![job]);
    for seed in 1..=5 {
        let r = run_with(&s, &[Policy::Mosix], seed, RunOptions { trace: true });
        let tr = r.policy(Policy::Mosix).unwrap().trace.as_ref().unwrap();
        assert_eq!(tr.final_node, vec![4], "seed {seed}: {:?}", tr.migrations);
        assert_eq!(tr.migrations.len(), 1);
        assert!(
            tr.migrations[0]
                .reason
                .starts_with("node 4 is 3.0x faster and idle"),
            "{}",
            tr.migrations[0].reason
        );
    }
}

#[test]
fn mixed_speeds_spread_roughly_by_speed() {
    let s = scenario("mixed-speeds");
    let r = traced(&s, &[Policy::Mosix]);
    let tr = r.policy(Policy::Mosix).unwrap().trace.as_ref().unwrap();
    let per = &tr.jobs_per_node_at_first_completion;
    // Speeds 1,1,2,3: the fastest node holds the most, the slow ones at most 2 each.
    assert_eq!(per.iter().sum::<u32>(), 8, "{per:?}");
    assert!(per[3] >= per[2] && per[2] >= per[0].max(per[1]), "{per:?}");
    assert!(per[0] <= 2 && per[1] <= 2 && per[3] >= 3, "{per:?}");
}

#[test]
fn a_node_with_n_cpus_takes_n_jobs() {
    // CPUs 1,1,2,4 of one speed, 8 jobs on node 1: one job per CPU, for every seed.
    let s = scenario("mixed-cpus");
    for seed in 1..=5 {
        let r = run_with(&s, &[Policy::Mosix], seed, RunOptions { trace: true });
        let m = r.policy(Policy::Mosix).unwrap();
        let per = &m.trace.as_ref().unwrap().jobs_per_node_at_first_completion;
        assert_eq!(per, &[1, 1, 2, 4], "seed {seed}\n{r}");
        assert_eq!(m.pingpongs, 0, "seed {seed}\n{r}");
        assert!(m.makespan_vs_bound.unwrap() < 1.1, "seed {seed}\n{r}");
    }
}

#[test]
fn pinned_jobs_stay_home_and_avoided_nodes_are_avoided() {
    let text = r#"
        [[nodes]]
        count = 4
        [[jobs]]
        node = 1
        count = 4
        work_s = 30
        pinned = true
        [[jobs]]
        node = 1
        count = 4
        work_s = 30
        avoid = [2, 3]
    "#;
    let s = parse_scenario(text, "pins").unwrap();
    let r = traced(&s, &[Policy::Mosix, Policy::Initial]);
    for p in [Policy::Mosix, Policy::Initial] {
        let tr = r.policy(p).unwrap().trace.as_ref().unwrap();
        assert_eq!(&tr.final_node[..4], &[1, 1, 1, 1], "{p:?}");
        assert!(
            tr.final_node[4..].iter().all(|&n| n == 1 || n == 4),
            "{p:?}: {:?}",
            tr.final_node
        );
    }
    let m = r.policy(Policy::Mosix).unwrap().trace.as_ref().unwrap();
    assert!(
        m.migrations.iter().all(|x| x.job >= 4 && x.to == 4),
        "{:?}",
        m.migrations
    );
}

#[test]
fn memory_is_ushered_and_never_overfilled() {
    let s = scenario("memory-pressure");
    let r = traced(&s, &Policy::ALL);
    let m = r.policy(Policy::Mosix).unwrap();
    let tr = m.trace.as_ref().unwrap();
    assert!(
        tr.migrations
            .iter()
            .any(|x| x.reason.starts_with("short of memory")),
        "{r}"
    );
    assert_eq!(m.landed_without_room, 0);
    // Swapping makes no-migration an order of magnitude slower.
    assert!(
        r.policy(Policy::None).unwrap().makespan_s.unwrap() > 10.0 * m.makespan_s.unwrap(),
        "{r}"
    );
}

#[test]
fn leaving_node_is_evacuated() {
    let s = scenario("node-leaves-and-returns");
    let r = traced(&s, &Policy::ALL);
    let m = r.policy(Policy::Mosix).unwrap();
    assert!(m.evacuations > 0, "{r}");
    assert_eq!(m.unfinished, 0);
    let tr = m.trace.as_ref().unwrap();
    // Nothing is sent to a node while it is away (30 s .. 150 s), apart from what was
    // already on the way.
    for x in &tr.migrations {
        if (x.to == 3 || x.to == 4) && x.start_s >= 31.0 && x.start_s < 150.0 {
            panic!("sent to a leaving node: {x:?}");
        }
    }
    let best = r
        .policies
        .iter()
        .filter_map(|p| p.makespan_s)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(m.makespan_s, Some(best), "{r}");
}

#[test]
fn deterministic_for_a_seed() {
    let s = scenario("node-leaves-and-returns");
    let mut a = run_with(&s, &Policy::ALL, 7, RunOptions { trace: true });
    let mut b = run_with(&s, &Policy::ALL, 7, RunOptions { trace: true });
    for r in [&mut a, &mut b] {
        for p in &mut r.policies {
            p.wall_s = 0.0;
        }
    }
    assert_eq!(a, b);
    let json = serde_json::to_string(&a).unwrap();
    assert!(json.contains("\"makespan_vs_bound\""));
    let text = a.to_string();
    assert!(text.contains("lower bound on makespan"), "{text}");
}

#[test]
fn bad_scenarios_give_one_line() {
    let dir = tempdir();
    let p = dir.join("bad.toml");
    std::fs::write(&p, "[[nodes]]\ncount = 2\nspeed = \"fast\"\n").unwrap();
    let e = load_scenario(&p).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("scenario {}:3:9: ", p.display())),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
    let e = load_scenario(&dir.join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.toml") && !e.contains('\n'), "{e}");
    std::fs::write(&p, [0xffu8, 0xfe, 0]).unwrap();
    let e = load_scenario(&p).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("mosix-sim-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The 10,000-node scenario: slow without optimisation, so only in release builds (the
/// project's tests run with --release).
#[test]
fn large_scenario_beats_no_migration() {
    if cfg!(debug_assertions) {
        eprintln!("skipped in debug builds");
        return;
    }
    let s = scenario("large-10000-nodes");
    assert_eq!((s.nodes.len(), s.jobs.len()), (10_000, 100_000));
    let r = run_with(&s, &[Policy::Mosix, Policy::None], 1, RunOptions::default());
    let m = r.policy(Policy::Mosix).unwrap();
    let none = r.policy(Policy::None).unwrap();
    assert_eq!(m.unfinished, 0, "{r}");
    assert!(m.makespan_s.unwrap() < none.makespan_s.unwrap(), "{r}");
    assert!(m.makespan_vs_bound.unwrap() < 2.0, "{r}");
    assert_eq!(m.landed_without_room, 0, "{r}");
    assert!(m.pingpongs as f64 <= 0.001 * m.migrations as f64, "{r}");
}
