//! Property tests of the policy: whatever the cluster looks like, the safety rules hold.

use mosix_balance::{Balancer, MoveKind, NodeInfo, NodeMode, Params, ProcInfo, Reason};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

fn arb_node(n: u32) -> impl Strategy<Value = NodeInfo> {
    (
        prop_oneof![Just(1.0f64), Just(2.0), Just(3.0), 0.1f64..8.0],
        1u32..4,
        0.0f64..12.0,
        prop_oneof![Just(0u64), 64u64..16_384],
        0.0f64..1.0,
        prop_oneof![Just(0u64), 0u64..20_000],
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.9),
    )
        .prop_map(
            move |(speed, cpus, runnable, mem_mb, free_frac, age_ms, accepts, up)| {
                let mem_total = mem_mb * MIB;
                NodeInfo {
                    node: n,
                    speed,
                    cpus,
                    runnable,
                    mem_total,
                    mem_free: (mem_total as f64 * free_frac) as u64,
                    age_ms,
                    accepts_guests: accepts,
                    up,
                }
            },
        )
}

fn arb_proc(id: u64, me: u32, nodes: u32) -> impl Strategy<Value = ProcInfo> {
    (
        1u64..4096,
        prop_oneof![Just(1.0f64), 0.0f64..1.0],
        0u64..100_000,
        (0u64..20_000, 0u32..3),
        1..=nodes,
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.9),
        prop::collection::vec(1..=nodes, 0..3),
    )
        .prop_map(
            move |(mem_mb, share, work, (resident, migrations), home, pinned, auto, avoid)| {
                ProcInfo {
                    id,
                    mem_bytes: mem_mb * MIB,
                    cpu_share: share,
                    work_done_ms: work,
                    resident_ms: resident,
                    migrations,
                    where_now: me,
                    home,
                    pinned,
                    auto,
                    avoid,
                }
            },
        )
}

/// A cluster of 2..=10 nodes seen from node 1: (me, peers, procs).
fn arb_cluster() -> impl Strategy<Value = (NodeInfo, Vec<NodeInfo>, Vec<ProcInfo>)> {
    (2u32..=10)
        .prop_flat_map(|n| {
            let peers: Vec<_> = (2..=n).map(arb_node).collect();
            let procs = prop::collection::vec(0u8..1, 0..12).prop_flat_map(move |v| {
                (0..v.len() as u64)
                    .map(|i| arb_proc(i + 1, 1, n))
                    .collect::<Vec<_>>()
            });
            (arb_node(1), peers, procs)
        })
        .prop_map(|(mut me, peers, procs)| {
            me.age_ms = 0;
            me.up = true;
            (me, peers, procs)
        })
}

fn check_decisions(
    b: &Balancer,
    me: &NodeInfo,
    peers: &[NodeInfo],
    procs: &[ProcInfo],
    d: &[mosix_balance::Decision],
) -> Result<(), TestCaseError> {
    let p = b.params();
    // Memory each destination is promised, to check that all sends together fit.
    let mut promised: std::collections::HashMap<u32, u64> = Default::default();
    let mut seen = std::collections::HashSet::new();
    for x in d {
        prop_assert!(seen.insert(x.proc), "process sent twice in one tick");
        prop_assert!(x.reason.is_move());
        prop_assert_ne!(x.to, me.node);
        let proc = procs
            .iter()
            .find(|q| q.id == x.proc)
            .expect("decision for an unknown process");
        prop_assert!(!proc.pinned, "pinned process sent");
        prop_assert!(!proc.avoid.contains(&x.to), "sent to an avoided node");
        // Among duplicates the freshest entry counts.
        let dest = peers
            .iter()
            .filter(|n| n.node == x.to)
            .min_by_key(|n| n.age_ms)
            .expect("sent to an unknown node");
        prop_assert!(dest.up, "sent to a down node");
        prop_assert!(dest.age_ms <= p.stale_after_ms, "sent on stale information");
        prop_assert!(dest.speed > 0.0);
        prop_assert!(
            dest.accepts_guests || proc.home == x.to,
            "sent to a node that blocks guests"
        );
        let reserve = (dest.mem_total as f64 * p.mem_reserve_frac).ceil() as u64;
        let total = promised.entry(x.to).or_default();
        *total += proc.mem_bytes;
        prop_assert!(
            *total + reserve <= dest.mem_free.min(dest.mem_total),
            "does not fit: {} + reserve {} > free {}",
            *total,
            reserve,
            dest.mem_free
        );
        if x.offer.kind != MoveKind::Expel {
            prop_assert!(proc.auto, "automatic move of a process with auto off");
            prop_assert!(
                proc.resident_ms >= p.first_move_residency_ms.min(p.min_residency_ms)
                    && (proc.migrations == 0 || proc.resident_ms >= p.min_residency_ms),
                "moved before the residency floor"
            );
        }
        if x.offer.kind == MoveKind::Load {
            prop_assert!(
                proc.resident_ms >= b.residency_needed_ms(proc),
                "load move before residency"
            );
            let Reason::Load {
                finish_here_ms,
                finish_there_ms,
                cost_ms,
                ..
            } = x.reason
            else {
                return Err(TestCaseError::fail("load move without a load reason"));
            };
            prop_assert!(
                finish_there_ms + cost_ms <= finish_here_ms * (1.0 - p.gain_threshold) + 1e-6
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn safety_rules_hold((me, peers, procs) in arb_cluster(), seed in any::<u64>()) {
        let mut b = Balancer::new(1, Params::default());
        let d = b.tick(100_000, &me, &peers, &procs, seed);
        prop_assert!(d.len() <= b.params().max_sends_per_tick);
        check_decisions(&b, &me, &peers, &procs, &d)?;
        for p in &procs {
            let r = b.explain(100_000, &me, &peers, &procs, p.id).unwrap();
            prop_assert!(!r.to_string().is_empty());
        }
    }

    #[test]
    fn consecutive_ticks_never_overfill((me, peers, procs) in arb_cluster(), seed in any::<u64>()) {
        // Gossip does not change between ticks: local accounting must keep promises.
        let mut b = Balancer::new(1, Params::default());
        let mut left = procs.clone();
        let mut all = Vec::new();
        for t in 0..5u64 {
            // Nothing new is heard: every entry gets older.
            let aged: Vec<_> = peers
                .iter()
                .map(|n| NodeInfo { age_ms: n.age_ms + t * 1000, ..n.clone() })
                .collect();
            let d = b.tick(100_000 + t * 1000, &me, &aged, &left, seed.wrapping_add(t));
            left.retain(|p| !d.iter().any(|x| x.proc == p.id));
            all.extend(d);
        }
        check_decisions(&b, &me, &peers, &procs, &all)?;
    }

    #[test]
    fn stay_mode_and_pinned_send_nothing((me, peers, mut procs) in arb_cluster(), seed in any::<u64>()) {
        let mut b = Balancer::new(1, Params::default());
        b.set_mode(NodeMode { stay: true, ..Default::default() });
        prop_assert!(b.tick(100_000, &me, &peers, &procs, seed).is_empty());
        let mut b = Balancer::new(1, Params::default());
        for p in &mut procs { p.pinned = true; }
        prop_assert!(b.tick(100_000, &me, &peers, &procs, seed).is_empty());
        prop_assert!(b.evacuate(100_000, &me, &peers, &procs, seed).is_empty());
    }

    #[test]
    fn young_processes_never_load_move((me, peers, mut procs) in arb_cluster(), seed in any::<u64>()) {
        let params = Params::default();
        let mut b = Balancer::new(1, params.clone());
        // Younger than their floor: the first-move floor, or the floor after a migration.
        for p in &mut procs {
            let floor = if p.migrations == 0 {
                params.first_move_residency_ms
            } else {
                params.min_residency_ms
            };
            p.resident_ms = p.resident_ms.min(floor - 1);
        }
        prop_assert!(b.tick(100_000, &me, &peers, &procs, seed).is_empty());
    }

    #[test]
    fn balanced_equal_cluster_yields_no_moves(n in 2u32..12, k in 0u64..6, speed in 0.5f64..4.0, seed in any::<u64>()) {
        // Every node has k CPU-bound jobs and the same speed.
        let mk = |i: u32| NodeInfo { runnable: k as f64, ..NodeInfo::idle(i, speed, 8 << 30) };
        let peers: Vec<_> = (2..=n).map(mk).collect();
        let procs: Vec<_> = (0..k).map(|i| ProcInfo::cpu_bound(i + 1, 1, 4 * MIB, 60_000)).collect();
        let mut b = Balancer::new(1, Params::default());
        prop_assert!(b.tick(60_000, &mk(1), &peers, &procs, seed).is_empty());
    }

    #[test]
    fn single_job_goes_to_the_fastest(n in 2u32..10, fast in 2u32..10, ratio in 1.5f64..6.0, seed in any::<u64>()) {
        let fast = fast.min(n);
        let peers: Vec<_> = (2..=n)
            .map(|i| NodeInfo::idle(i, if i == fast { ratio } else { 1.0 }, 8 << 30))
            .collect();
        let me = NodeInfo { runnable: 1.0, ..NodeInfo::idle(1, 1.0, 8 << 30) };
        let procs = vec![ProcInfo::cpu_bound(1, 1, 4 * MIB, 20_000)];
        let mut b = Balancer::new(1, Params::default());
        let d = b.tick(20_000, &me, &peers, &procs, seed);
        prop_assert_eq!(d.len(), 1);
        prop_assert_eq!(d[0].to, fast);
    }

    #[test]
    fn admission_keeps_memory(offers in prop::collection::vec((1u64..2048, 0.0f64..1.0), 1..20)) {
        let me = NodeInfo::idle(2, 1.0, 4 << 30);
        let mut b = Balancer::new(2, Params::default());
        let mut admitted = 0u64;
        for (i, (mb, share)) in offers.into_iter().enumerate() {
            let offer = mosix_balance::Offer {
                proc: i as u64,
                from: 1,
                to: 2,
                home: 1,
                kind: MoveKind::Memory,
                mem_bytes: mb * MIB,
                cpu_share: share,
                work_ms: 1000.0,
                finish_here_ms: 1e9,
                cost_ms: 10.0,
            };
            if b.admit(0, &me, &[], &offer).is_ok() {
                admitted += mb * MIB;
            }
        }
        let reserve = ((4u64 << 30) as f64 * 0.1).ceil() as u64;
        prop_assert!(admitted + reserve <= 4 << 30);
    }
}
