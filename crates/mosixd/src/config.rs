//! `mosix.toml`: this node's number, the cluster map, the secret, the state directory.
//!
//! ```toml
//! node = 1
//! secret_file = "/etc/mosix/secret"      # mode 0600, owned by root
//! state_dir = "/var/lib/mosix"
//! control_socket = "/run/mosix/mosixd.sock"   # optional
//! listen = "0.0.0.0:5400"                     # optional; default: this node's map address
//! speed = 1.0                                 # optional; default: measured at start-up
//! load_scope = "host"                         # or "cgroup": sample this daemon's cgroup only
//!
//! [[map]]            # like a mosix.map line: nodes 1..4 at consecutive addresses
//! node = 1
//! address = "10.213.0.1"       # "ip" or "ip:port" (default port 5400)
//! count = 4                    # optional, default 1
//! speed = 1.0                  # optional
//! ```

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    control_socket: Option<PathBuf>,
    listen: Option<String>,
    speed: Option<f64>,
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
}

/// One node of the expanded cluster map.
#[derive(Clone, Debug, PartialEq)]
pub struct MapNode {
    pub node: u32,
    pub addr: SocketAddr,
    pub speed: Option<f64>,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node: u32,
    pub secret_file: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    pub listen: SocketAddr,
    /// Configured speed of this node (config `speed`, else its map entry's), if any.
    pub speed: Option<f64>,
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
        let gossip_interval = Duration::from_millis(raw.gossip_interval_ms.unwrap_or(500));
        if gossip_interval < Duration::from_millis(20) || gossip_interval > Duration::from_secs(60)
        {
            bail!("gossip_interval_ms must be between 20 and 60000");
        }
        let down_after = Duration::from_millis(raw.down_after_ms.unwrap_or(3000));
        if down_after < 2 * gossip_interval {
            bail!("down_after_ms must be at least twice gossip_interval_ms");
        }
        Ok(Config {
            node: raw.node,
            secret_file: raw.secret_file,
            control_socket: raw
                .control_socket
                .unwrap_or_else(|| PathBuf::from(mosix_proto::DEFAULT_SOCKET)),
            state_dir: raw.state_dir,
            listen,
            speed,
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
}

/// Reads a secret file: it must be a regular file of mode 0600 owned by root (or by the
/// user running the daemon), and hold at least 8 non-blank bytes.
pub fn read_secret(path: &Path) -> Result<Vec<u8>> {
    let md = std::fs::metadata(path)
        .with_context(|| format!("cannot read secret file {}", path.display()))?;
    if !md.is_file() {
        bail!("secret file {} is not a regular file", path.display());
    }
    let mode = md.mode() & 0o7777;
    if mode != 0o600 {
        bail!(
            "refusing secret file {}: mode is {:04o}, must be 0600 (chmod 600 {})",
            path.display(),
            mode,
            path.display()
        );
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if md.uid() != 0 && md.uid() != euid {
        bail!(
            "refusing secret file {}: owned by uid {}, must be owned by root",
            path.display(),
            md.uid()
        );
    }
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
}
