//! Families (issue 11), on a 4-node testbed (root; one test function, because the
//! testbed's names are machine-wide): the children of a migratable process are migratable
//! processes of the same home, each moved on its own, while the parent waits for them at
//! home as if all ran there.

mod common;
use common::*;
use serde_json::Value;

/// The FAQ's CPU-bound awk job, checking its own arithmetic, until `stop` exists.
const AWK: &str = "BEGIN { stop = ARGV[1]; ARGV[1] = \"\"; print \"start\"; fflush(); \
    bad = 0; n = 0; \
    while (1) { s = 0; for (j = 0; j < 200000; j++) s += j % 7; \
      if (n == 0) ref = s; else if (s != ref) bad++; n++; \
      if ((getline line < stop) > 0) break; close(stop) } \
    print \"done bad=\" bad; fflush(); exit 0 }";

/// `n` awk children of one bash, started as one command: `mosrun [-L] bash -c '...'`.
fn family(tb: &Testbed, n: usize, stop: &std::path::Path, pin: bool) -> Job {
    let script = format!(
        "for i in $(seq {n}); do mawk '{AWK}' {} & done; wait; echo all done",
        stop.display()
    );
    let mut argv = vec![];
    if pin {
        argv.push("-L");
    }
    argv.extend(["bash", "-c", script.as_str()]);
    Job::start(tb, &argv)
}

/// The awk members of the family of `bash` as node `n` lists them: home processes whose
/// parent is bash (node 1), or guests (elsewhere).
fn members_on(tb: &Testbed, n: u32, bash: i32) -> Vec<Value> {
    tb.ps(n)
        .into_iter()
        .filter(|p| p["cmd"].as_str().is_some_and(|c| c.contains("mawk")))
        .filter(|p| n != 1 || p["ppid"] == bash)
        .filter(|p| p["state"] == "running")
        .collect()
}

#[test]
fn children_of_a_migratable_process_are_migratable() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (network namespaces, cgroups, ptrace): run it as root");
    }
    let tb = Testbed::up(&[]);

    // 1. The FAQ experiment started as ONE command on node 1 of four equal nodes: the
    //    eight awk children spread to two per node by themselves, bash stays home and
    //    reaps them, and every one prints its result.
    let stop = tb.shared().join("stop-family");
    let mut j = family(&tb, 8, &stop, false);
    let bash = j.home_pid;
    tb.wait_until("two members of the family run on every node", || {
        (1..=4).all(|n| members_on(&tb, n, bash).len() == 2)
    });
    assert_eq!(tb.where_(bash), "0", "bash stays home");
    // The members away are really there: in the host's PID namespace with their own
    // home PIDs, children of bash at home.
    let away: Vec<i64> = (2..=4)
        .flat_map(|n| members_on(&tb, n, bash))
        .map(|g| g["home_pid"].as_i64().unwrap())
        .collect();
    assert_eq!(away.len(), 6);
    for pid in &away {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let ppid: i32 = st
            .rsplit(") ")
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ppid, bash, "member {pid}'s deputy is bash's child");
        assert_ne!(tb.where_(*pid as i32), "0");
    }
    std::fs::write(&stop, "stop\n").unwrap();
    let mut done = 0;
    while done < 8 {
        let l = j.line();
        if l.starts_with("done") {
            assert_eq!(l, "done bad=0");
            done += 1;
        }
    }
    let (out, st) = j.finish();
    assert_eq!(out.last().map(String::as_str), Some("all done"), "{out:?}");
    assert_eq!(st.code(), Some(0));

    // 2. `mosrun -L` pins the whole family: its children are migratable processes, pinned.
    let stop = tb.shared().join("stop-pinned");
    let j = family(&tb, 3, &stop, true);
    let bash = j.home_pid;
    tb.wait_until("the pinned family's children are listed", || {
        members_on(&tb, 1, bash).len() == 3
    });
    tb.wait_until("the balancer says why they stay", || {
        members_on(&tb, 1, bash)
            .iter()
            .all(|p| p["reason"].as_str().unwrap_or("").contains("pinned"))
    });
    std::fs::write(&stop, "stop\n").unwrap();
    let (out, st) = j.finish();
    assert_eq!(
        out.iter().filter(|l| *l == "done bad=0").count(),
        3,
        "{out:?}"
    );
    assert_eq!(st.code(), Some(0));
}
