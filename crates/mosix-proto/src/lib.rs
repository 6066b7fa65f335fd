//! Wire types shared by `mosixd` and the `mosix` CLI: the load vector every node gossips,
//! the node status record (MOSIX's `/proc/mosix/nodes/N/status` numbers), the control
//! socket's requests and responses, the authenticated encryption of gossip datagrams, and
//! the bounds on what their payloads may decompress to.
//!
//! Nothing here does I/O except [`control`]'s small blocking client helpers.

pub mod channel;
pub mod control;
pub mod gossip;
pub mod seal;
pub mod transport;
pub mod wire;

use serde::{Deserialize, Serialize};
use std::fmt;

/// Node status bit: the node is defined in the cluster map (MOSIX `DS_MOSIX_DEF`).
pub const DS_MOSIX_DEF: u32 = 1;
/// Node status bit: the node is up and speaks our protocol (MOSIX `DS_MOSIX_UP`).
pub const DS_MOSIX_UP: u32 = 2;

/// Status flag in [`LoadVector::flags`]: the node accepts guest processes (issue 4).
pub const FLAG_ACCEPTS_GUESTS: u32 = 1;
/// Status flag in [`LoadVector::flags`]: the node is shutting down.
pub const FLAG_LEAVING: u32 = 2;

/// The protocol version of this build. Nodes whose `major.minor` differ see each other with
/// status 1 (`DS_MOSIX_DEF` only) and never exchange processes.
///
/// 1.3: checkpoints of processes away from home written at home (`Hello::Checkpoint`,
/// `ToHost::Checkpoint`, `ToHost::Freeze` and their answers), recovery after the death of
/// a process's host, marks of its deputy (`mosix_remote::wire`).
/// 1.4: pre-copy moves (image format 3.0 in the link, `Tail.figures`, `ToHome::Left.rounds`).
/// 1.5: read-ahead and write-behind of forwarded calls, DFSA (`ToDeputy::Took`, `Behind`,
/// `Sync`, `Adopt`; shared paths in the migrate header); moves carry image format 3.1
/// (memory shared at home, process families).
/// 1.6: a move's tail carries the working directory at home (`Tail.cwd`); typed reasons
/// of failed checkpoints and marks (`CkptError`, `mosix_remote::wire::MarkError`); moves
/// carry image format 3.2 (madvise advice).
/// 1.7: moves carry image format 3.3 (the image's checksum is the chain of its records'),
/// which a 1.6 node cannot read.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 7 };

/// Default UDP port of the gossip transport.
pub const DEFAULT_PORT: u16 = 5400;
/// Default control socket path.
pub const DEFAULT_SOCKET: &str = "/run/mosix/mosixd.sock";
/// Default configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/mosix/mosix.toml";

/// A protocol `major.minor`; patch levels are never part of compatibility.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl std::str::FromStr for ProtocolVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .trim()
            .split_once('.')
            .ok_or_else(|| format!("protocol version '{s}' is not MAJOR.MINOR"))?;
        let major = a
            .parse()
            .map_err(|_| format!("protocol version '{s}': bad major"))?;
        let minor = b
            .parse()
            .map_err(|_| format!("protocol version '{s}': bad minor"))?;
        Ok(ProtocolVersion { major, minor })
    }
}

/// What one node tells every other node about itself, several times a second.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadVector {
    /// Normalised load: average runnable processes divided by the node's capacity,
    /// `speed × cpus` (1.0 = every CPU busy with one process).
    pub load: f64,
    /// Average number of runnable processes (not normalised).
    pub runnable: f64,
    /// CPU utilisation of the node's CPU allotment, 0.0 ..= 1.0.
    pub util: f64,
    /// Relative speed of one CPU (1.0 = the reference machine).
    pub speed: f64,
    /// Number of CPUs: the node runs this many processes at `speed` each at once. Nodes
    /// that do not send it (older versions) have one.
    #[serde(default = "one_cpu")]
    pub cpus: u32,
    /// Memory available to the node, bytes.
    pub mem_total: u64,
    /// Memory free (available) on the node, bytes.
    pub mem_free: u64,
    /// Number of processes on the node.
    pub procs: u32,
    /// Protocol version the node speaks.
    pub proto: ProtocolVersion,
    /// `FLAG_*` bits.
    pub flags: u32,
}

fn one_cpu() -> u32 {
    1
}

/// How a node is seen from the node answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Live and protocol-compatible (status 3).
    Up,
    /// Live but speaking another protocol major.minor (status 1): shown, never used.
    Incompatible,
    /// Silent: never heard, or not heard within the liveness window (status 1).
    Down,
}

impl NodeState {
    /// The MOSIX status number of a node in this state.
    pub fn status(self) -> u32 {
        match self {
            NodeState::Up => DS_MOSIX_DEF | DS_MOSIX_UP,
            NodeState::Incompatible | NodeState::Down => DS_MOSIX_DEF,
        }
    }
}

/// One node of the cluster map, as seen by the answering node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node number (1-based, from the cluster map).
    pub node: u32,
    /// Address from the cluster map (`ip:port`).
    pub address: String,
    /// MOSIX status number: 3 = up, 1 = defined but down or incompatible.
    pub status: u32,
    pub state: NodeState,
    /// True for the node answering.
    pub this_node: bool,
    /// The node's last load vector, if it was ever heard.
    pub load: Option<LoadVector>,
    /// Milliseconds since the node's heartbeat last advanced (None if never heard).
    pub age_ms: Option<u64>,
}

/// Counters of the gossip transport.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GossipStats {
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub datagrams_accepted: u64,
    pub bytes_received: u64,
    /// Datagrams dropped because they failed authentication, were malformed, stale or
    /// replayed. Never believed.
    pub datagrams_rejected: u64,
}

/// The whole cluster as seen from one node: the answer to `mosix status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub this_node: u32,
    pub protocol: ProtocolVersion,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    pub gossip: GossipStats,
    /// Every node of the map, in node order.
    pub nodes: Vec<NodeStatus>,
}

impl ClusterStatus {
    /// The number of nodes with status 3 (including this node).
    pub fn active_nodes(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.state == NodeState::Up)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_numbers_are_mosix() {
        assert_eq!(NodeState::Up.status(), 3);
        assert_eq!(NodeState::Incompatible.status(), 1);
        assert_eq!(NodeState::Down.status(), 1);
    }

    #[test]
    fn protocol_version_parses_and_prints() {
        let v: ProtocolVersion = "2.7".parse().unwrap();
        assert_eq!(v, ProtocolVersion { major: 2, minor: 7 });
        assert_eq!(v.to_string(), "2.7");
        assert!("2".parse::<ProtocolVersion>().is_err());
        assert!("a.b".parse::<ProtocolVersion>().is_err());
    }

    #[test]
    fn load_vector_roundtrips_json() {
        let lv = LoadVector {
            load: 1.5,
            runnable: 3.0,
            util: 0.5,
            speed: 2.0,
            cpus: 4,
            mem_total: 1 << 30,
            mem_free: 1 << 29,
            procs: 7,
            proto: PROTOCOL_VERSION,
            flags: FLAG_ACCEPTS_GUESTS,
        };
        let s = serde_json::to_string(&lv).unwrap();
        assert_eq!(serde_json::from_str::<LoadVector>(&s).unwrap(), lv);
        // A node of an older version sends no CPU count: it has one.
        let old = s.replace(",\"cpus\":4", "");
        assert_ne!(old, s);
        assert_eq!(serde_json::from_str::<LoadVector>(&old).unwrap().cpus, 1);
    }
}
