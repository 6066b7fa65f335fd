//! Automatic load balancing and memory ushering on a real 4-node testbed (root). One test
//! function: the testbed's names are machine-wide. Jobs compute until a stop file appears,
//! so the test waits for the cluster to reach the expected placement (polling with a
//! deadline), then stops them and checks that every one finished correctly.

mod common;
use common::*;
use serde_json::Value;

/// FAQ-style CPU-bound awk job that checks its own arithmetic, until `stop` exists.
const AWK: &str = "BEGIN { stop = ARGV[1]; ARGV[1] = \"\"; print \"start\"; fflush(); \
    bad = 0; n = 0; \
    while (1) { s = 0; for (j = 0; j < 200000; j++) s += j % 7; \
      if (n == 0) ref = s; else if (s != ref) bad++; n++; \
      if ((getline line < stop) > 0) break; close(stop) } \
    print \"done bad=\" bad; exit 0 }";

/// Running migratable processes per node, as each node's `mosix ps` lists them.
fn running(tb: &Testbed) -> Vec<usize> {
    (1..=4)
        .map(|n| tb.ps(n).iter().filter(|p| p["state"] == "running").count())
        .collect()
}

fn stop_all(tb: &Testbed, jobs: Vec<Job>, stop: &std::path::Path, want_last: &str) {
    std::fs::write(stop, "stop\n").unwrap();
    for j in jobs {
        let pid = j.home_pid;
        let (out, st) = j.finish();
        assert_eq!(st.code(), Some(0), "job {pid}: {out:?}");
        assert_eq!(
            out.last().map(String::as_str),
            Some(want_last),
            "job {pid}: {out:?}"
        );
    }
    let _ = tb;
}

#[test]
fn balancing_on_four_nodes() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (network namespaces, cgroups, ptrace): run it as root");
    }

    // 1. The FAQ: eight CPU-bound jobs started on node 1 of four equal nodes spread by
    //    themselves until every node runs two; they all finish correct.
    {
        let tb = Testbed::up(&[]);
        let stop = tb.shared().join("stop-faq");
        let jobs: Vec<Job> = (0..8)
            .map(|_| Job::start(&tb, &["mawk", AWK, stop.to_str().unwrap()]))
            .collect();
        tb.wait_until("every node runs two jobs", || {
            running(&tb) == vec![2, 2, 2, 2]
        });
        // The reasons are explained where they run: each guest says which node sent it
        // and why. A job may have moved on from the node it first went to (1 -> 3 -> 4
        // when node 4 was freer), so the sender is any other node, not only node 1.
        let guests: Vec<(u32, Value)> = (2..=4)
            .flat_map(|n| tb.ps(n).into_iter().map(move |g| (n, g)))
            .collect();
        assert!(
            guests.iter().all(|(n, g)| {
                let reason = g["reason"].as_str().unwrap_or("");
                let from = reason
                    .strip_prefix("from node ")
                    .and_then(|r| r.split(':').next())
                    .and_then(|s| s.parse::<u32>().ok());
                matches!(from, Some(f) if (1..=4).contains(&f) && f != *n)
                    && reason.contains("is less loaded")
            }),
            "{guests:?}"
        );
        stop_all(&tb, jobs, &stop, "done bad=0");
    }

    // 2. Speeds 1,1,1,3: one job started on node 1 ends on the fastest node, 4.
    {
        let tb = Testbed::up(&["--speeds", "1,1,1,3"]);
        let stop = tb.shared().join("stop-fast");
        let j = Job::start(&tb, &["mawk", AWK, stop.to_str().unwrap()]);
        tb.wait_until("the job runs on node 4", || tb.where_(j.home_pid) == "4");
        stop_all(&tb, vec![j], &stop, "done bad=0");
    }

    // 3. Memory ushering: node 1 has 512 MiB; six 96 MiB jobs started there one after the
    //    other would not fit; some are sent to nodes with room before it runs out, and
    //    none is killed.
    {
        let tb = Testbed::up(&["--mem", "512M,2G,2G,2G"]);
        let memjob = compile("memjob");
        let stop = tb.shared().join("stop-mem");
        let mut jobs = Vec::new();
        for _ in 0..6 {
            let mut j = Job::start(
                &tb,
                &[memjob.to_str().unwrap(), "96", stop.to_str().unwrap()],
            );
            assert_eq!(j.line(), "filled");
            jobs.push(j);
        }
        let away = tb.ps(1).iter().filter(|p| p["where_"] != 0).count();
        assert!(away >= 1, "no job was ushered away from node 1");
        stop_all(&tb, jobs, &stop, "done ok");
    }
}
