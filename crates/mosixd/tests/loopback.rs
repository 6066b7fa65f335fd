//! Real mosixd daemons gossiping on loopback addresses (127.0.X.N), each test with its own
//! X so tests run in parallel. Every wait polls a condition with a deadline.

use mosix_proto::channel::{Channel, ChannelError, ChannelKeys, KeyRing, PrivateKey};
use mosix_proto::control::Client;
use mosix_proto::seal::{now_ms, Sealer};
use mosix_proto::{ClusterStatus, NodeState};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

/// Loopback nets of this run: shifted by 50 per `MOSIX_TESTBED_INSTANCE`, so that several
/// test runs on one machine do not share addresses.
fn net_of(base: u8) -> u8 {
    let k = std::env::var("MOSIX_TESTBED_INSTANCE")
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|k| *k <= 3)
        .unwrap_or(0);
    base + 50 * k
}

struct Cluster {
    dir: tempfile::TempDir,
    net: u8,
    n: u32,
    daemons: Vec<Option<Child>>,
}

impl Cluster {
    /// Writes configs for `n` nodes at 127.0.`net`.1.. with speeds 1, 2, 3, ..., each
    /// node with its own key (`nN/node.key`) and the list of all (`nodes.keys`).
    fn new(net: u8, n: u32) -> Cluster {
        let net = net_of(net);
        let dir = tempfile::tempdir().unwrap();
        write_secret(&dir.path().join("secret"), SECRET);
        let mut ring = KeyRing::default();
        for i in 1..=n {
            let nd = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&nd).unwrap();
            let key = PrivateKey::generate().unwrap();
            ring.insert(i, key.public()).unwrap();
            write_secret(&nd.join("node.key"), key.to_hex().trim());
            std::fs::write(
                nd.join("mosix.toml"),
                config(dir.path(), net, n, i, "secret"),
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("nodes.keys"), ring.to_text()).unwrap();
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

const SECRET: &str = "the-cluster-secret-0123456789";

fn write_secret(p: &Path, s: &str) {
    std::fs::write(p, format!("{s}\n")).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn config(dir: &Path, net: u8, n: u32, i: u32, secret: &str) -> String {
    format!(
        "node = {i}\nsecret_file = \"{d}/{secret}\"\nstate_dir = \"{d}/n{i}\"\n\
         private_key_file = \"{d}/n{i}/node.key\"\npublic_keys_file = \"{d}/nodes.keys\"\n\
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
    std::fs::write(&cfg4, config(c.path(), net_of(32), 4, 4, "other")).unwrap();
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
    let sock = UdpSocket::bind(format!("127.0.{}.200:0", net_of(33))).unwrap();
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
    let sealer = Sealer::new(SECRET.as_bytes());
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

/// Peak resident memory of process `pid`, bytes.
fn vm_hwm(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = st
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    kb << 10
}

/// One authentic datagram of tiny zstd frames (64 KiB of zeros each, no content size)
/// made chitchat allocate 537 MB before parsing it; now it is dropped and counted.
#[test]
fn a_decompression_bomb_in_gossip_is_dropped() {
    let mut c = Cluster::new(37, 2);
    c.start(1);
    c.start(2);
    c.wait(1, "both up", all_up);
    let pid = c.daemons[0].as_ref().unwrap().id();
    let before = c.status(1).unwrap().gossip.datagrams_rejected;
    let hwm = vm_hwm(pid);
    // A zstd frame (window 128 KiB, no content size): one last RLE block of 65,535 zeros.
    let rle = (65_535u32 << 3) | (1 << 1) | 1;
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, (17 - 10) << 3];
    frame.extend_from_slice(&rle.to_le_bytes()[..3]);
    frame.push(0);
    // An Ack whose delta is as many of them as one datagram holds.
    let mut ack = 45_139u16.to_le_bytes().to_vec();
    ack.extend_from_slice(&[0, 2]);
    let room = 65_507 - mosix_proto::seal::OVERHEAD - ack.len() - 1;
    for _ in 0..room / (frame.len() + 3) {
        ack.push(1);
        ack.extend_from_slice(&(frame.len() as u16).to_le_bytes());
        ack.extend_from_slice(&frame);
    }
    ack.push(0);
    let sealer = Sealer::new(SECRET.as_bytes());
    let sock = UdpSocket::bind(format!("127.0.{}.200:0", net_of(37))).unwrap();
    const BOMBS: u64 = 10;
    for _ in 0..BOMBS {
        let d = sealer.seal(2, now_ms(), &ack);
        assert!(d.len() <= 65_507);
        sock.send_to(&d, c.addr(1)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = c.wait(1, "the bombs counted as rejected", |s| {
        s.gossip.datagrams_rejected >= before + BOMBS
    });
    assert_eq!(s.gossip.datagrams_rejected, before + BOMBS);
    let grown = vm_hwm(pid).saturating_sub(hwm);
    assert!(
        grown < 32 << 20,
        "mosixd's peak memory grew by {grown} bytes"
    );
    let log = std::fs::read_to_string(c.path().join("n1/log")).unwrap();
    assert!(log.contains("does not declare its size"), "{log}");
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
    std::fs::write(&cfg, config(dir.path(), net_of(34), 2, 1, "secret")).unwrap();
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

/// Node `i`'s channel keys, read from the cluster's files as its daemon reads them.
fn node_keys(c: &Cluster, i: u32) -> ChannelKeys {
    let key = std::fs::read_to_string(c.path().join(format!("n{i}/node.key"))).unwrap();
    let ring = std::fs::read_to_string(c.path().join("nodes.keys")).unwrap();
    ChannelKeys::new(
        SECRET.as_bytes(),
        i,
        PrivateKey::from_hex(&key).unwrap(),
        KeyRing::parse(&ring).unwrap(),
    )
    .unwrap()
}

/// Opens a node-to-node channel to daemon `to`, as the holder of `keys` expecting node
/// `expect` there.
fn dial(
    c: &Cluster,
    to: u32,
    keys: &ChannelKeys,
    expect: u32,
) -> Result<Channel<TcpStream>, ChannelError> {
    let s = TcpStream::connect(c.addr(to)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Channel::connect(s, keys, expect)
}

#[test]
fn node_to_node_channels_are_bound_to_node_keys() {
    let mut c = Cluster::new(35, 3);
    for i in 1..=2 {
        c.start_with(
            i,
            &c.path().join(format!("n{i}/mosix.toml")),
            &[("MOSIXD_LOG", "debug")],
        );
    }
    c.wait(1, "1 and 2 up", |s| state(s, 2) == NodeState::Up);
    // Node 3's keys (its daemon is not running): daemon 1 proves it is node 1.
    let three = node_keys(&c, 3);
    let ch = dial(&c, 1, &three, 1).unwrap();
    assert_eq!(ch.peer(), Some(1));
    drop(ch);
    // Dialling daemon 1 as if it were node 2: refused, it holds node 1's key.
    match dial(&c, 1, &three, 2) {
        Err(ChannelError::WrongPeer {
            expected: 2,
            actual: 1,
        }) => {}
        other => panic!("{:?}", other.map(|c| c.peer())),
    }
    // A node with the secret but a key the cluster does not list: daemon 1 hangs up.
    let stranger = PrivateKey::generate().unwrap();
    let ring =
        KeyRing::parse(&std::fs::read_to_string(c.path().join("nodes.keys")).unwrap()).unwrap();
    let mut its_ring = ring.clone();
    its_ring.insert(7, stranger.public()).unwrap();
    let k = ChannelKeys::new(SECRET.as_bytes(), 7, stranger.clone(), its_ring).unwrap();
    if let Ok(mut ch) = dial(&c, 1, &k, 1) {
        let mut v = Vec::new();
        assert!(std::io::Read::read_to_end(&mut ch, &mut v).is_err());
    }
    let end = Instant::now() + DEADLINE;
    let log = c.path().join("n1/log");
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(&format!("peer's key {} is not in", stranger.public()))
    {
        assert!(Instant::now() < end, "daemon 1 did not log the unknown key");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Cluster secret only (no node keys): the handshake fails.
    let plain = ChannelKeys::shared_secret_only(SECRET.as_bytes());
    if let Ok(mut ch) = dial(&c, 1, &plain, 1) {
        let mut v = Vec::new();
        assert!(std::io::Read::read_to_end(&mut ch, &mut v).is_err());
    }
    // Daemons still up and gossiping.
    c.wait(2, "still sees node 1", |s| state(s, 1) == NodeState::Up);
}

#[test]
fn gen_key_and_check_and_bad_key_files() {
    let c = Cluster::new(36, 2);
    let cfg = c.path().join("n1/mosix.toml");
    let mosixd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mosixd"))
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap()
    };
    // --check names this node's line of the key list.
    let out = mosixd(&["--check"]);
    assert!(out.status.success(), "{out:?}");
    let key1 =
        PrivateKey::from_hex(&std::fs::read_to_string(c.path().join("n1/node.key")).unwrap())
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(&format!(
            "node keys: on; this node's line: 1 {}",
            key1.public()
        )),
        "{text}"
    );
    // --gen-key: a new 0600 key; prints this node's line; never overwrites.
    let new = c.path().join("n1/new.key");
    let out = mosixd(&["--gen-key", new.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let md = std::fs::metadata(&new).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
    let k = PrivateKey::from_hex(&std::fs::read_to_string(&new).unwrap()).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("1 {}\n", k.public())
    );
    let out = mosixd(&["--gen-key", new.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never overwritten"));
    assert_eq!(std::fs::read_to_string(&new).unwrap(), k.to_hex());
    // Node 1 started with a key that is not node 1's in the list: one clear line.
    std::fs::copy(&new, c.path().join("n1/node.key")).unwrap();
    let out = mosixd(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = err.lines().find(|l| l.starts_with("mosixd: ")).unwrap();
    assert!(
        line.contains("does not match the public key listed for node 1")
            && line.contains(&format!("1 {}", k.public())),
        "{line}"
    );
    // Without keys: it starts, with a warning (shared-secret-only mode).
    let plain = c.path().join("n1/plain.toml");
    std::fs::write(
        &plain,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .lines()
            .filter(|l| !l.contains("key"))
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mosixd"))
        .arg("--config")
        .arg(&plain)
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("node keys: OFF") && text.contains("NO NODE KEYS"),
        "{text}"
    );
}
