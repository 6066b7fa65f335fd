//! `mosix.toml`: this node's number, the cluster map, the secret, the state directory.
//!
//! ```toml
//! node = 1
//! secret_file = "/etc/mosix/secret"      # mode 0600, owned by root
//! private_key_file = "/etc/mosix/node.key"    # this node's key (mosixd --gen-key), mode 0600
//! public_keys_file = "/etc/mosix/nodes.keys"  # every node's public key: "NODE KEY" lines
//! state_dir = "/var/lib/mosix"
//! control_socket = "/run/mosix/mosixd.sock"   # optional
//! listen = "0.0.0.0:5400"                     # optional; default: this node's map address
//! speed = 1.0                                 # optional; default: measured at start-up
//! cpus = 16                                   # optional; default: the CPUs it may use
//! metrics_listen = "127.0.0.1:9464"           # optional; Prometheus metrics (off by default)
//! load_scope = "host"                         # or "cgroup": sample this daemon's cgroup only
//!
//! [[map]]            # like a mosix.map line: nodes 1..4 at consecutive addresses
//! node = 1
//! address = "10.213.0.1"       # "ip" or "ip:port" (default port 5400)
//! count = 4                    # optional, default 1
//! speed = 1.0                  # optional
//! ```

use anyhow::{bail, Context, Result};
use mosix_proto::channel::{ChannelKeys, KeyRing, PrivateKey, PublicKey};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn check_cpus(c: u32) -> Result<()> {
    if c == 0 || c > 65_536 {
        bail!("cpus must be between 1 and 65536");
    }
    Ok(())
}

/// Where the daemon measures load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoadScope {
    /// The whole machine (/proc/loadavg, /proc/stat, /proc/meminfo).
    #[default]
    Host,
    /// Only the cgroup this daemon runs in (cpu, cpuacct, memory controllers; v1 or v2).
    /// Used by the testbed, where each node is a cgroup.
    Cgroup,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: u32,
    secret_file: PathBuf,
    private_key_file: Option<PathBuf>,
    public_keys_file: Option<PathBuf>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    control_socket: Option<PathBuf>,
    listen: Option<String>,
    speed: Option<f64>,
    cpus: Option<u32>,
    metrics_listen: Option<String>,
    #[serde(default)]
    load_scope: LoadScope,
    gossip_interval_ms: Option<u64>,
    down_after_ms: Option<u64>,
    #[serde(default)]
    map: Vec<RawMapEntry>,
    #[serde(default)]
    shared_paths: Vec<PathBuf>,
    #[serde(default = "yes")]
    accept_guests: bool,
    #[serde(default = "yes")]
    auto_balance: bool,
    compression: Option<String>,
    deputy_path: Option<PathBuf>,
    #[serde(default = "yes")]
    precopy: bool,
}

fn yes() -> bool {
    true
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/mosix")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapEntry {
    node: u32,
    address: String,
    count: Option<u32>,
    port: Option<u16>,
    speed: Option<f64>,
    cpus: Option<u32>,
}

/// One node of the expanded cluster map.
#[derive(Clone, Debug, PartialEq)]
pub struct MapNode {
    pub node: u32,
    pub addr: SocketAddr,
    pub speed: Option<f64>,
    pub cpus: Option<u32>,
}

/// Where the per-node keys are.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeKeyFiles {
    /// This node's private key: 64 hex digits, mode 0600, owned by root.
    pub private_key_file: PathBuf,
    /// Every node's public key, lines `NODE KEY`: the same file on every node.
    pub public_keys_file: PathBuf,
}

/// The keys node-to-node channels use, read from the files the configuration names.
pub struct Keys {
    pub channel: ChannelKeys,
    /// This node's public key (None: no node keys).
    pub public: Option<PublicKey>,
    /// Things the operator should fix (logged at start, printed by --check).
    pub warnings: Vec<String>,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: u32,
    pub secret_file: PathBuf,
    /// This node's private key and every node's public key; None: shared secret only.
    pub node_keys: Option<NodeKeyFiles>,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub listen: SocketAddr,
    /// Configured speed of this node (config `speed`, else its map entry's), if any.
    pub speed: Option<f64>,
    /// Configured number of CPUs of this node (config `cpus`, else its map entry's), if any.
    pub cpus: Option<u32>,
    /// Where to serve Prometheus metrics (`metrics_listen`); None: not at all.
    pub metrics_listen: Option<SocketAddr>,
    pub load_scope: LoadScope,
    pub gossip_interval: Duration,
    /// A peer whose heartbeat has not advanced for this long is down.
    pub down_after: Duration,
    /// Every node, in node order.
    pub map: Vec<MapNode>,
    /// Directories every node sees alike (NFS, a cluster file system): open files under
    /// them are reopened where a process migrates; other open files keep it home.
    pub shared_paths: Vec<PathBuf>,
    /// Whether processes of other nodes may come here (mosctl block/unblock).
    pub accept_guests: bool,
    /// Whether this node sends its processes away by itself (mosctl stay/nostay).
    pub auto_balance: bool,
    /// Compression of migration streams: none, lz4 (default) or zstd.
    pub compression: mosix_ckpt::Compression,
    /// The deputy program a process becomes at home while away (default: mosix-deputy
    /// beside mosixd). Every user must be able to run it.
    pub deputy_path: Option<PathBuf>,
    /// Whether a process's memory moves while it runs (pre-copy; default true): it is
    /// stopped only for what it wrote last and its state.
    pub precopy: bool,
}

impl Config {
    /// Reads and validates a configuration file. Every error names the file and the problem.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim().replace('\n', " ")))?;
        if raw.node == 0 {
            bail!("node numbers start at 1 (node 0 means 'this node' in MOSIX)");
        }
        let mut map: BTreeMap<u32, MapNode> = BTreeMap::new();
        for e in &raw.map {
            let count = e.count.unwrap_or(1);
            if count == 0 {
                bail!("map entry for node {}: count must be at least 1", e.node);
            }
            if e.node == 0 {
                bail!("map entry: node numbers start at 1");
            }
            if let Some(s) = e.speed {
                if !(s.is_finite() && s > 0.0) {
                    bail!("map entry for node {}: speed must be positive", e.node);
                }
            }
            if let Some(c) = e.cpus {
                check_cpus(c).with_context(|| format!("map entry for node {}", e.node))?;
            }
            let (ip, port) = parse_addr(&e.address, e.port)
                .with_context(|| format!("map entry for node {}", e.node))?;
            for i in 0..count {
                let node = e.node.checked_add(i).context("node number overflows")?;
                let ip = add_ip(ip, i).with_context(|| {
                    format!("map entry for node {}: address range overflows", e.node)
                })?;
                let m = MapNode {
                    node,
                    addr: SocketAddr::new(ip, port),
                    speed: e.speed,
                    cpus: e.cpus,
                };
                if map.insert(node, m).is_some() {
                    bail!("node {node} appears twice in the map");
                }
            }
        }
        let me = map
            .get(&raw.node)
            .cloned()
            .with_context(|| format!("this node ({}) is not in the cluster map", raw.node))?;
        let mut seen = std::collections::HashSet::new();
        for m in map.values() {
            if !seen.insert(m.addr) {
                bail!("address {} is given to two nodes", m.addr);
            }
        }
        let listen = match &raw.listen {
            None => me.addr,
            Some(l) => {
                let (ip, port) = parse_addr(l, None).context("listen")?;
                SocketAddr::new(ip, port)
            }
        };
        let speed = raw.speed.or(me.speed);
        if let Some(s) = speed {
            if !(s.is_finite() && s > 0.0) {
                bail!("speed must be a positive number");
            }
        }
        let cpus = raw.cpus.or(me.cpus);
        if let Some(c) = cpus {
            check_cpus(c)?;
        }
        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(l) => l.parse::<SocketAddr>().map(Some).map_err(|_| {
                anyhow::anyhow!(
                    "metrics_listen '{l}' is not an address with a port (e.g. \"127.0.0.1:9464\")"
                )
            })?,
        };
        let gossip_interval = Duration::from_millis(raw.gossip_interval_ms.unwrap_or(500));
        if gossip_interval < Duration::from_millis(20) || gossip_interval > Duration::from_secs(60)
        {
            bail!("gossip_interval_ms must be between 20 and 60000");
        }
        let down_after = Duration::from_millis(raw.down_after_ms.unwrap_or(3000));
        if down_after < 2 * gossip_interval {
            bail!("down_after_ms must be at least twice gossip_interval_ms");
        }
        let node_keys = match (raw.private_key_file, raw.public_keys_file) {
            (Some(private_key_file), Some(public_keys_file)) => Some(NodeKeyFiles {
                private_key_file,
                public_keys_file,
            }),
            (None, None) => None,
            _ => bail!("set both private_key_file and public_keys_file, or neither"),
        };
        Ok(Config {
            node: raw.node,
            secret_file: raw.secret_file,
            node_keys,
            control_socket: raw
                .control_socket
                .unwrap_or_else(|| PathBuf::from(mosix_proto::DEFAULT_SOCKET)),
            state_dir: raw.state_dir,
            listen,
            speed,
            cpus,
            metrics_listen,
            load_scope: raw.load_scope,
            gossip_interval,
            down_after,
            map: map.into_values().collect(),
            shared_paths: {
                for p in &raw.shared_paths {
                    if !p.is_absolute() {
                        bail!("shared_paths: {} is not an absolute path", p.display());
                    }
                }
                raw.shared_paths
            },
            accept_guests: raw.accept_guests,
            auto_balance: raw.auto_balance,
            compression: match raw.compression.as_deref() {
                None | Some("lz4") => mosix_ckpt::Compression::Lz4,
                Some("none") => mosix_ckpt::Compression::None,
                Some("zstd") => mosix_ckpt::Compression::Zstd,
                Some(o) => bail!("compression '{o}': use none, lz4 or zstd"),
            },
            precopy: raw.precopy,
            deputy_path: match raw.deputy_path {
                Some(p) if !p.is_absolute() => {
                    bail!("deputy_path: {} is not an absolute path", p.display())
                }
                p => p,
            },
        })
    }

    /// This node's map entry.
    pub fn me(&self) -> &MapNode {
        // `parse` guarantees this node is in the map.
        self.map
            .iter()
            .find(|m| m.node == self.node)
            .unwrap_or(&self.map[0])
    }

    /// Reads the secret, refusing a file that others could read or that root does not own.
    pub fn read_secret(&self) -> Result<Vec<u8>> {
        read_secret(&self.secret_file)
    }

    /// Reads this node's private key and the list of public keys (checking both files
    /// like the secret), or, when none are configured, falls back to the cluster secret
    /// alone with a warning.
    pub fn read_keys(&self, secret: &[u8]) -> Result<Keys> {
        let Some(files) = &self.node_keys else {
            return Ok(Keys {
                channel: ChannelKeys::shared_secret_only(secret),
                public: None,
                warnings: vec![
                    "NO NODE KEYS: private_key_file and public_keys_file are not set, so any \
                     node with the cluster secret can claim to be any node number; make keys \
                     with mosixd --gen-key (docs/security.md)"
                        .into(),
                ],
            });
        };
        let key = read_private_key(&files.private_key_file)?;
        let ring = read_public_keys(&files.public_keys_file)?;
        let public = key.public();
        let keys_file = files.public_keys_file.display();
        let channel = ChannelKeys::new(secret, self.node, key, ring.clone()).map_err(|e| {
            anyhow::anyhow!(
                "{keys_file}: {e} (this node's line is: {} {public})",
                self.node
            )
        })?;
        let mut warnings = Vec::new();
        let missing: Vec<u32> = self
            .map
            .iter()
            .map(|m| m.node)
            .filter(|n| ring.get(*n).is_none())
            .collect();
        if !missing.is_empty() {
            warnings.push(format!(
                "{keys_file} has no key for node(s) {}: channels with them will be refused",
                node_list(&missing)
            ));
        }
        let unknown: Vec<u32> = ring
            .nodes()
            .filter(|n| !self.map.iter().any(|m| m.node == *n))
            .collect();
        if !unknown.is_empty() {
            warnings.push(format!(
                "{keys_file} lists node(s) {} that are not in the cluster map",
                node_list(&unknown)
            ));
        }
        Ok(Keys {
            channel,
            public: Some(public),
            warnings,
        })
    }
}

/// "1, 2, 5" (at most 10, then "...").
fn node_list(nodes: &[u32]) -> String {
    let mut s: Vec<String> = nodes.iter().take(10).map(|n| n.to_string()).collect();
    if nodes.len() > 10 {
        s.push(format!("... ({} in all)", nodes.len()));
    }
    s.join(", ")
}

/// Checks that a file holding a secret is a regular file of mode 0600 owned by root (or
/// by the user running the daemon).
fn check_private_file(path: &Path, what: &str) -> Result<()> {
    let md = std::fs::metadata(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    if !md.is_file() {
        bail!("{what} {} is not a regular file", path.display());
    }
    let mode = md.mode() & 0o7777;
    if mode != 0o600 {
        bail!(
            "refusing {what} {}: mode is {:04o}, must be 0600 (chmod 600 {})",
            path.display(),
            mode,
            path.display()
        );
    }
    check_owner(path, &md, what)
}

fn check_owner(path: &Path, md: &std::fs::Metadata, what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if md.uid() != 0 && md.uid() != euid {
        bail!(
            "refusing {what} {}: owned by uid {}, must be owned by root",
            path.display(),
            md.uid()
        );
    }
    Ok(())
}

/// Reads this node's private key file (made by `mosixd --gen-key`): checked like the
/// secret file, 64 hex digits.
pub fn read_private_key(path: &Path) -> Result<PrivateKey> {
    check_private_file(path, "private key file")?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read private key file {}", path.display()))?;
    PrivateKey::from_hex(&text).with_context(|| format!("private key file {}", path.display()))
}

/// Reads the list of every node's public key. Not secret, but whoever can change it can
/// add a node: it must be owned by root (or the daemon's user) and not writable by others.
pub fn read_public_keys(path: &Path) -> Result<KeyRing> {
    let what = "public keys file";
    let md = std::fs::metadata(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    if !md.is_file() {
        bail!("{what} {} is not a regular file", path.display());
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "refusing {what} {}: mode is {:04o}, others may change it (chmod 644 {})",
            path.display(),
            mode,
            path.display()
        );
    }
    check_owner(path, &md, what)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    KeyRing::parse(&text).with_context(|| format!("{what} {}", path.display()))
}

/// Reads a secret file: it must be a regular file of mode 0600 owned by root (or by the
/// user running the daemon), and hold at least 8 non-blank bytes.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    check_private_file(path, "secret file")?;
    let s = std::fs::read(path)
        .with_context(|| format!("cannot read secret file {}", path.display()))?;
    if s.iter().filter(|b| !b.is_ascii_whitespace()).count() < 8 {
        bail!(
            "secret file {} is too short (at least 8 characters)",
            path.display()
        );
    }
    Ok(s)
}

fn parse_addr(s: &str, port: Option<u16>) -> Result<(IpAddr, u16)> {
    let s = s.trim();
    if let Ok(sa) = s.parse::<SocketAddr>() {
        if port.is_some() {
            bail!("address '{s}' has a port and a separate port is given too");
        }
        return Ok((sa.ip(), sa.port()));
    }
    let ip: IpAddr = s
        .parse()
        .map_err(|_| anyhow::anyhow!("'{s}' is not an IP address (or ip:port)"))?;
    Ok((ip, port.unwrap_or(mosix_proto::DEFAULT_PORT)))
}

fn add_ip(ip: IpAddr, i: u32) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(v4) => u32::from(v4)
            .checked_add(i)
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        IpAddr::V6(v6) => u128::from(v6)
            .checked_add(i as u128)
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
node = 2
secret_file = "/tmp/s"
state_dir = "/tmp/st"
[[map]]
node = 1
address = "10.0.0.250"
count = 10
speed = 2.0
[[map]]
node = 20
address = "[::1]:7000"
"#;

    #[test]
    fn ranges_expand_across_octets() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.map.len(), 11);
        assert_eq!(c.map[0].addr, "10.0.0.250:5400".parse().unwrap());
        assert_eq!(c.map[9].addr, "10.0.1.3:5400".parse().unwrap());
        assert_eq!(c.map[9].node, 10);
        assert_eq!(c.map[10].addr, "[::1]:7000".parse().unwrap());
        assert_eq!(c.listen, "10.0.0.251:5400".parse().unwrap());
        assert_eq!(c.speed, Some(2.0));
        assert_eq!(c.control_socket, PathBuf::from("/run/mosix/mosixd.sock"));
    }

    #[test]
    fn errors_are_clear() {
        let e = |t: &str| format!("{:#}", Config::parse(t).unwrap_err());
        assert!(e(&BASE.replacen("node = 2", "node = 15", 1)).contains("not in the cluster map"));
        assert!(e(&BASE.replace("count = 10", "count = 20")).contains("twice"));
        assert!(e(&BASE.replace("10.0.0.250", "nonsense")).contains("not an IP address"));
        assert!(e(&format!("{BASE}\nbogus = 1")).contains("bogus"));
        assert!(e(&BASE.replacen("node = 2", "node = 0", 1)).contains("start at 1"));
        assert!(e(&format!("cpus = 0\n{BASE}")).contains("cpus must be"));
        assert!(e(&format!("metrics_listen = \"9464\"\n{BASE}")).contains("metrics_listen"));
    }

    #[test]
    fn cpus_and_metrics_listen() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!((c.cpus, c.metrics_listen), (None, None), "off by default");
        let c = Config::parse(&format!(
            "cpus = 16\nmetrics_listen = \"127.0.0.1:9464\"\n{BASE}"
        ))
        .unwrap();
        assert_eq!(c.cpus, Some(16));
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        // A map entry's CPU count applies to the nodes it lists.
        let c = Config::parse(&BASE.replace("speed = 2.0", "speed = 2.0\ncpus = 4")).unwrap();
        assert_eq!(c.cpus, Some(4));
    }

    #[test]
    fn shipped_example_parses() {
        let c = Config::parse(include_str!("../dist/mosix.toml.example")).unwrap();
        assert_eq!(c.map.len(), 5);
        assert_eq!(c.map[3].addr, "192.168.1.13:5400".parse().unwrap());
        assert_eq!(c.map[4].speed, Some(2.0));
    }

    #[test]
    fn secret_file_permissions_are_enforced() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret");
        std::fs::write(&p, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", read_secret(&p).unwrap_err());
        assert!(e.contains("must be 0600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_secret(&p).is_ok());
        std::fs::write(&p, "short").unwrap();
        assert!(format!("{:#}", read_secret(&p).unwrap_err()).contains("too short"));
    }

    #[test]
    fn node_keys_are_read_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let key = |name: &str, k: &PrivateKey| {
            let p = d.path().join(name);
            std::fs::write(&p, k.to_hex()).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            p
        };
        let k2 = PrivateKey::generate().unwrap();
        let k3 = PrivateKey::generate().unwrap();
        let p2 = key("n2.key", &k2);
        let ring = d.path().join("nodes.keys");
        std::fs::write(
            &ring,
            format!(
                "2 {}\n3 {}\n30 {}\n",
                k2.public(),
                k3.public(),
                PrivateKey::generate().unwrap().public()
            ),
        )
        .unwrap();
        let with_keys = |private: &Path| {
            Config::parse(&format!(
                "private_key_file = \"{}\"\npublic_keys_file = \"{}\"\n{BASE}",
                private.display(),
                ring.display()
            ))
            .unwrap()
        };
        let c = with_keys(&p2);
        let keys = c.read_keys(b"secret").unwrap();
        assert!(keys.channel.has_node_keys());
        assert_eq!(keys.public, Some(k2.public()));
        let w = keys.warnings.join("\n");
        assert!(
            w.contains("no key for node(s) 1, 4, 5, 6, 7, 8, 9, 10, 20"),
            "{w}"
        );
        assert!(
            w.contains("lists node(s) 30 that are not in the cluster map"),
            "{w}"
        );
        // Node 2 holding node 3's key.
        let e = format!(
            "{:#}",
            with_keys(&key("n3.key", &k3))
                .read_keys(b"s")
                .err()
                .unwrap()
        );
        assert!(
            e.contains("does not match the public key listed for node 2"),
            "{e}"
        );
        assert!(
            e.contains(&format!("this node's line is: 2 {}", k3.public())),
            "{e}"
        );
        // A readable private key; a list others may change.
        std::fs::set_permissions(&p2, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = format!("{:#}", c.read_keys(b"s").err().unwrap());
        assert!(
            e.contains("private key file") && e.contains("must be 0600"),
            "{e}"
        );
        std::fs::set_permissions(&p2, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = format!("{:#}", c.read_keys(b"s").err().unwrap());
        assert!(e.contains("others may change it"), "{e}");
        std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&ring, "2 nonsense\n").unwrap();
        let e = format!("{:#}", c.read_keys(b"s").err().unwrap());
        assert!(e.contains("line 1: not a key"), "{e}");
        // Neither: shared secret only, with a warning. One of the two: an error.
        let plain = Config::parse(BASE).unwrap().read_keys(b"secret").unwrap();
        assert!(!plain.channel.has_node_keys());
        assert!(plain.warnings[0].contains("NO NODE KEYS"));
        let e = format!(
            "{:#}",
            Config::parse(&format!("private_key_file = \"/k\"\n{BASE}")).unwrap_err()
        );
        assert!(
            e.contains("set both private_key_file and public_keys_file"),
            "{e}"
        );
    }
}
