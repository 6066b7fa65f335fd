//! The multi-node testbed, for real (root): 4 network namespaces on a bridge, each with its
//! own cgroup and mosixd. One test function, because the testbed's names (mosixbr0,
//! mosixtb-N) are machine-wide. Every wait polls a condition with a deadline.

mod common;
use common::{mosix, tb_prefix, tb_subnet, Testbed};
use mosix_proto::{ClusterStatus, NodeState};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);

fn mosixd() -> PathBuf {
    let p = mosix().with_file_name("mosixd");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --release --bins)",
        p.display()
    );
    p
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `mosix status --json` run on node `n` through `testbed exec`.
fn status(tb: &Testbed, n: u32) -> Option<ClusterStatus> {
    let o = tb.exec(n, &["status", "--json"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// Waits until node `n`'s view satisfies `cond`; panics with the view and log at the deadline.
fn wait(tb: &Testbed, n: u32, what: &str, cond: impl Fn(&ClusterStatus) -> bool) -> ClusterStatus {
    let end = Instant::now() + CLUSTER_DEADLINE;
    loop {
        let st = status(tb, n);
        if let Some(s) = &st {
            if cond(s) {
                return s.clone();
            }
        }
        if Instant::now() > end {
            let log = std::fs::read_to_string(tb.dir.path().join(format!("n{n}/mosixd.log")))
                .unwrap_or_default();
            panic!("node {n}: timed out waiting for {what}; last view {st:#?}\nlog:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn state(s: &ClusterStatus, node: u32) -> NodeState {
    s.nodes.iter().find(|n| n.node == node).unwrap().state
}

fn all_up(s: &ClusterStatus) -> bool {
    s.nodes.len() == 4 && s.nodes.iter().all(|n| n.status == 3)
}

fn leftovers() -> Vec<String> {
    let mut v = Vec::new();
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for l in String::from_utf8_lossy(&ns.stdout).lines() {
        if l.starts_with(&tb_prefix()) {
            v.push(format!("netns {l}"));
        }
    }
    let links = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    for l in String::from_utf8_lossy(&links.stdout).lines() {
        let name = l.split(':').nth(1).unwrap_or("").trim();
        let links = match common::instance() {
            0 => "mtb".to_string(),
            k => format!("mt{k}b"),
        };
        if name.starts_with(&links) || name == format!("mosixbr{}", common::instance()) {
            v.push(format!("link {name}"));
        }
    }
    for root in [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup",
    ] {
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&tb_prefix()) {
                    v.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    v
}

fn write_secret(p: &Path, s: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(p, format!("{s}\n")).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn four_node_testbed() {
    if !is_root() {
        eprintln!("skipping: the testbed needs root");
        return;
    }
    let tb = Testbed {
        dir: tempfile::tempdir().unwrap(),
    };
    let up = tb.testbed(
        &[
            "up",
            "--nodes",
            "4",
            "--speeds",
            "1,1,2,3",
            "--mem",
            "512M",
            "--mosixd",
            mosixd().to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        up.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );

    // Every node sees all 4 with status 3 and the configured speeds, and itself marked.
    let speeds = [1.0, 1.0, 2.0, 3.0];
    for n in 1..=4 {
        let s = wait(&tb, n, "all 4 up", all_up);
        assert_eq!(s.this_node, n, "testbed exec {n} must show node {n}'s view");
        for ns in &s.nodes {
            assert_eq!(ns.this_node, ns.node == n);
            assert_eq!(ns.address, format!("{}.{}:5400", tb_subnet(), ns.node));
            let lv = ns.load.as_ref().unwrap();
            assert_eq!(lv.speed, speeds[(ns.node - 1) as usize]);
            // The cgroup's memory limit is the node's memory.
            assert_eq!(lv.mem_total, 512 << 20);
        }
    }
    let st = tb.ok(&["status"]);
    assert!(st.contains("4/4"), "{st}");
    // The human table, run on node 3: node 3 marked, every node up.
    let o = Command::new(mosix())
        .args(["testbed", "exec", "3", "--dir"])
        .arg(tb.dir.path())
        .arg("--")
        .arg(mosix())
        .arg("status")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{table}");
    assert!(
        table.contains(&format!("   3*  {}.3:5400", tb_subnet())),
        "{table}"
    );
    assert!(table.contains("4 of 4 nodes up; this node is 3"), "{table}");

    // A CPU-bound process on node 2 raises node 2's load as seen from node 4. First its
    // load settles: a node's first sample can count the testbed's own setup as runnable,
    // and its average takes a few seconds to decay from there (under a loaded CI run it
    // started near 1, which one more process on one CPU cannot raise by 0.5).
    let before = wait(&tb, 4, "node 2's load to settle below 0.5", |s| {
        s.nodes[1].load.as_ref().is_some_and(|l| l.load < 0.5)
    });
    let base = before.nodes[1].load.as_ref().unwrap().load;
    let mut hog = Command::new(mosix())
        .args(["testbed", "exec", "2", "--dir"])
        .arg(tb.dir.path())
        .args([
            "--",
            "timeout",
            "60",
            "awk",
            "BEGIN{for(i=0;i<4000000000;i++);}",
        ])
        .spawn()
        .unwrap();
    let seen = wait(&tb, 4, "node 2's load to rise", |s| {
        s.nodes[1]
            .load
            .as_ref()
            .is_some_and(|l| l.load >= base + 0.5)
    });
    let l2 = seen.nodes[1].load.as_ref().unwrap();
    assert!(l2.runnable >= 0.5 && l2.util > 0.0, "{l2:?}");
    // The others stay idle-ish: the hog is confined to node 2's cgroup.
    assert!(seen.nodes[2].load.as_ref().unwrap().runnable < 0.5);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hog.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = hog.wait();

    // Killing node 3's mosixd marks it down everywhere; restarting brings it back.
    tb.ok(&["stop", "3", "--kill"]);
    for n in [1, 2, 4] {
        let s = wait(&tb, n, "node 3 down", |s| state(s, 3) == NodeState::Down);
        assert_eq!(s.nodes[2].status, 1);
    }
    tb.ok(&["start", "3"]);
    for n in 1..=4 {
        wait(&tb, n, "all up again", all_up);
    }

    // A node with another secret is never listed as up; its datagrams are rejected.
    tb.ok(&["stop", "4"]);
    for n in 1..=3 {
        wait(&tb, n, "node 4 down", |s| state(s, 4) == NodeState::Down);
    }
    let rejected_before: u64 = (1..=3)
        .map(|n| status(&tb, n).unwrap().gossip.datagrams_rejected)
        .sum();
    let bad_secret = tb.dir.path().join("bad-secret");
    write_secret(&bad_secret, "this-is-not-the-cluster-secret");
    let cfg = std::fs::read_to_string(tb.dir.path().join("n4/mosix.toml")).unwrap();
    let cfg: String = cfg
        .lines()
        .map(|l| {
            if l.starts_with("secret_file") {
                format!("secret_file = \"{}\"\n", bad_secret.display())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let bad_cfg = tb.dir.path().join("bad.toml");
    std::fs::write(&bad_cfg, cfg).unwrap();
    tb.ok(&["start", "4", "--config", bad_cfg.to_str().unwrap()]);
    let end = Instant::now() + CLUSTER_DEADLINE;
    loop {
        let views: Vec<ClusterStatus> = (1..=3).filter_map(|n| status(&tb, n)).collect();
        for v in &views {
            assert_ne!(
                v.nodes[3].status, 3,
                "node 4 without the secret listed as up: {v:#?}"
            );
        }
        let rejected: u64 = views.iter().map(|v| v.gossip.datagrams_rejected).sum();
        if views.len() == 3 && rejected > rejected_before {
            break;
        }
        assert!(
            Instant::now() < end,
            "node 4's datagrams were never counted as rejected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let s4 = status(&tb, 4).unwrap();
    assert_eq!(s4.active_nodes(), 1, "node 4 believes nobody: {s4:#?}");
    tb.ok(&["stop", "4"]);

    // A node speaking another protocol major.minor is shown with status 1.
    let o = tb.testbed(&["start", "4"], &[("MOSIXD_TEST_PROTOCOL_VERSION", "1.99")]);
    assert!(o.status.success());
    for n in 1..=3 {
        let s = wait(&tb, n, "node 4 incompatible", |s| {
            state(s, 4) == NodeState::Incompatible
        });
        assert_eq!(s.nodes[3].status, 1);
        assert_eq!(s.active_nodes(), 3);
    }

    // `down` after a crash: the daemons die and the state directory is lost; everything is
    // still found by name and removed.
    for n in 1..=4 {
        let _ = tb.testbed(&["stop", &n.to_string(), "--kill"], &[]);
    }
    std::fs::remove_file(tb.dir.path().join("testbed.json")).unwrap();
    assert!(!leftovers().is_empty());
    let down = tb.ok(&["down"]);
    assert!(down.contains("namespaces"), "{down}");
    assert_eq!(leftovers(), Vec::<String>::new());
    // A second down has nothing to do.
    assert!(tb.ok(&["down"]).contains("nothing to remove"));
}

#[test]
fn status_without_a_daemon_is_one_clear_line() {
    let o = Command::new(mosix())
        .args(["status", "--socket", "/nonexistent/mosixd.sock"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with("mosix: cannot reach mosixd at /nonexistent/mosixd.sock"),
        "{e}"
    );

    let o = Command::new(mosix())
        .args(["testbed", "status", "--dir", "/nonexistent-testbed"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.starts_with("mosix: no testbed at /nonexistent-testbed"),
        "{e}"
    );
}
