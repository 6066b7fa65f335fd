//! Real mosixd daemons gossiping on loopback addresses (127.0.X.N), each test with its own
//! X so tests run in parallel. Every wait polls a condition with a deadline.

use mosix_proto::control::Client;
use mosix_proto::seal::{now_ms, Sealer};
use mosix_proto::{ClusterStatus, NodeState};
use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

struct Cluster {
    dir: tempfile::TempDir,
    net: u8,
    n: u32,
    daemons: Vec<Option<Child>>,
}

impl Cluster {
    /// Writes configs for `n` nodes at 127.0.`net`.1.. with speeds 1, 2, 3, ...
    fn new(net: u8, n: u32) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        write_secret(&dir.path().join("secret"), "the-cluster-secret-0123456789");
        for i in 1..=n {
            let nd = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&nd).unwrap();
            std::fs::write(
                nd.join("mosix.toml"),
                config(dir.path(), net, n, i, "secret"),
            )
            .unwrap();
        }
        Cluster {
            dir,
            net,
            n,
            daemons: (0..n).map(|_| None).collect(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn start_with(&mut self, i: u32, config: &Path, env: &[(&str, &str)]) {
        let log = std::fs::File::create(self.path().join(format!("n{i}/log"))).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_mosixd"));
        c.arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            c.env(k, v);
        }
        self.daemons[(i - 1) as usize] = Some(c.spawn().unwrap());
    }

    fn start(&mut self, i: u32) {
        let cfg = self.path().join(format!("n{i}/mosix.toml"));
        self.start_with(i, &cfg, &[]);
    }

    fn stop(&mut self, i: u32) {
        if let Some(mut c) = self.daemons[(i - 1) as usize].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A killed daemon leaves its socket file; remove it so the next start is clean.
        let _ = std::fs::remove_file(self.sock(i));
    }

    fn sock(&self, i: u32) -> PathBuf {
        self.path().join(format!("n{i}/sock"))
    }

    fn status(&self, i: u32) -> Option<ClusterStatus> {
        Client::connect(&self.sock(i), Duration::from_secs(2))
            .ok()?
            .status()
            .ok()
    }

    fn addr(&self, i: u32) -> String {
        format!("127.0.{}.{}:5400", self.net, i)
    }

    /// Polls until `cond` holds for node `i`'s view, or panics with the last view.
    fn wait(&self, i: u32, what: &str, cond: impl Fn(&ClusterStatus) -> bool) -> ClusterStatus {
        let end = Instant::now() + DEADLINE;
        loop {
            let st = self.status(i);
            if let Some(s) = &st {
                if cond(s) {
                    return s.clone();
                }
            }
            if Instant::now() > end {
                let log = std::fs::read_to_string(self.path().join(format!("n{i}/log")))
                    .unwrap_or_default();
                panic!("node {i}: timed out waiting for {what}; last view {st:#?}\nlog:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 1..=self.n {
            self.stop(i);
        }
    }
}

fn write_secret(p: &Path, s: &str) {
    std::fs::write(p, format!("{s}\n")).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn config(dir: &Path, net: u8, n: u32, i: u32, secret: &str) -> String {
    format!(
        "node = {i}\nsecret_file = \"{d}/{secret}\"\nstate_dir = \"{d}/n{i}\"\n\
         control_socket = \"{d}/n{i}/sock\"\nspeed = {i}.0\ngossip_interval_ms = 200\n\
         down_after_ms = 1500\n\n[[map]]\nnode = 1\naddress = \"127.0.{net}.1\"\ncount = {n}\n",
        d = dir.display()
    )
}

fn state(s: &ClusterStatus, node: u32) -> NodeState {
    s.nodes.iter().find(|n| n.node == node).unwrap().state
}

fn all_up(s: &ClusterStatus) -> bool {
    s.nodes.iter().all(|n| n.status == 3)
}

#[test]
fn three_nodes_converge_with_speeds_and_track_a_restart() {
    let mut c = Cluster::new(31, 3);
    for i in 1..=3 {
        c.start(i);
    }
    for i in 1..=3 {
        let s = c.wait(i, "all 3 up", all_up);
        assert_eq!(s.this_node, i);
        assert_eq!(s.nodes.len(), 3);
        for n in &s.nodes {
            assert_eq!(n.this_node, n.node == i);
            assert_eq!(n.address, c.addr(n.node));
            let lv = n.load.as_ref().expect("an up node has a load vector");
            assert_eq!(
                lv.speed, n.node as f64,
                "speed of node {} seen by {i}",
                n.node
            );
            assert!(lv.mem_total > 0 && lv.mem_free <= lv.mem_total);
        }
        assert_eq!(s.gossip.datagrams_rejected, 0);
    }
    // The read-only view for scripts.
    let end = Instant::now() + DEADLINE;
    loop {
        let f = std::fs::read_to_string(c.path().join("n1/status.json")).unwrap_or_default();
        if let Ok(s) = serde_json::from_str::<ClusterStatus>(&f) {
            if all_up(&s) {
                break;
            }
        }
        assert!(Instant::now() < end, "status.json never showed all up");
        std::thread::sleep(Duration::from_millis(100));
    }

    c.stop(2);
    for i in [1, 3] {
        let s = c.wait(i, "node 2 down", |s| state(s, 2) == NodeState::Down);
        assert_eq!(s.nodes[1].status, 1);
    }
    c.start(2);
    for i in 1..=3 {
        c.wait(i, "all up after restart", all_up);
    }
}

#[test]
fn incompatible_protocol_shows_status_1_and_wrong_secret_is_rejected() {
    let mut c = Cluster::new(32, 4);
    c.start(1);
    c.start(2);
    // Node 3 speaks protocol 1.99 (test-only override).
    let cfg3 = c.path().join("n3/mosix.toml");
    c.start_with(3, &cfg3, &[("MOSIXD_TEST_PROTOCOL_VERSION", "1.99")]);
    // Node 4 has another secret.
    write_secret(&c.path().join("other"), "not-the-cluster-secret-xyz");
    let cfg4 = c.path().join("n4/bad.toml");
    std::fs::write(&cfg4, config(c.path(), 32, 4, 4, "other")).unwrap();
    c.start_with(4, &cfg4, &[]);

    for i in [1, 2] {
        let s = c.wait(i, "node 3 incompatible and node 4 rejected", |s| {
            state(s, 3) == NodeState::Incompatible
                && state(s, 2) == NodeState::Up
                && state(s, 1) == NodeState::Up
                && s.gossip.datagrams_rejected > 0
        });
        let n3 = &s.nodes[2];
        assert_eq!(n3.status, 1);
        assert_eq!(n3.load.as_ref().unwrap().proto.to_string(), "1.99");
        assert_ne!(
            s.nodes[3].status, 3,
            "a node without the secret is never up"
        );
        assert_eq!(s.active_nodes(), 2);
    }
    // Node 3 sees the others as incompatible too; node 4 sees nobody.
    c.wait(3, "1 and 2 incompatible", |s| {
        state(s, 1) == NodeState::Incompatible && state(s, 2) == NodeState::Incompatible
    });
    let s4 = c.wait(4, "rejects", |s| s.gossip.datagrams_rejected > 0);
    assert_eq!(s4.active_nodes(), 1);
    // Keep watching for a while: node 4 must never become up anywhere.
    for _ in 0..10 {
        for i in [1, 2] {
            let s = c.status(i).unwrap();
            assert_eq!(state(&s, 4), NodeState::Down);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn malformed_datagrams_do_not_crash_the_daemon() {
    let mut c = Cluster::new(33, 2);
    c.start(1);
    c.start(2);
    c.wait(1, "both up", all_up);
    let before = c.status(1).unwrap().gossip.datagrams_rejected;
    let sock = UdpSocket::bind("127.0.33.200:0").unwrap();
    let target = c.addr(1);
    // Deterministic pseudo-random fuzz: garbage, garbage behind our magic, truncations of a
    // valid datagram, bit flips, and authentic (sealed with the right secret) garbage.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let sealer = Sealer::new(b"the-cluster-secret-0123456789");
    let valid = sealer.seal(2, now_ms(), b"\x53\xb0\x00\x00hello");
    let mut sent = 0u64;
    for k in 0..600u64 {
        let len = (rnd() % 1400) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        match k % 6 {
            0 => {}
            1 => {
                d.splice(0..0, mosix_proto::seal::MAGIC.iter().cloned());
            }
            2 => d = valid[..(rnd() as usize % valid.len())].to_vec(),
            3 => {
                d = valid.clone();
                let i = rnd() as usize % d.len();
                d[i] ^= 1 << (rnd() % 8);
            }
            // Authentic datagrams whose contents are garbage, or a chitchat header followed
            // by garbage: they pass authentication and must still not hurt.
            4 => d = sealer.seal(2, now_ms(), &d),
            _ => {
                let mut p = vec![0xd3, 0xb0, 0x00, (rnd() % 4) as u8];
                p.extend_from_slice(&d);
                d = sealer.seal(2, now_ms(), &p);
            }
        }
        if sock.send_to(&d, &target).is_ok() {
            sent += 1;
        }
        if k % 50 == 0 {
            // Let the daemon drain its socket buffer.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(sent > 0);
    // A datagram replayed verbatim is refused too.
    let replay = sealer.seal(2, now_ms(), b"\xd3\xb0\x00\x03");
    sock.send_to(&replay, &target).unwrap();
    sock.send_to(&replay, &target).unwrap();
    let s = c.wait(1, "rejections counted", |s| {
        s.gossip.datagrams_rejected > before
    });
    assert!(s.gossip.datagrams_rejected > before);
    // Still alive, still gossiping, still answering.
    assert!(c.daemons[0].as_mut().unwrap().try_wait().unwrap().is_none());
    c.wait(1, "still sees node 2", all_up);
    c.wait(2, "still sees node 1", all_up);
}

#[test]
fn refuses_a_readable_secret_and_bad_configs_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("mosix.toml");
    std::fs::write(&cfg, config(dir.path(), 34, 2, 1, "secret")).unwrap();
    let run = |cfg: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_mosixd"))
            .arg("--config")
            .arg(cfg)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.lines()
            .find(|l| l.starts_with("mosixd: "))
            .unwrap_or_else(|| panic!("no 'mosixd: ' line in {err}"))
            .to_string()
    };
    let e = run(&cfg);
    assert!(e.contains("must be 0600"), "{e}");
    std::fs::write(&cfg, "node = 1\nsecret_file = \"/x\"\n").unwrap();
    let e = run(&cfg);
    assert!(e.contains("not in the cluster map"), "{e}");
    let e = run(&dir.path().join("missing.toml"));
    assert!(e.contains("cannot read config"), "{e}");
}
