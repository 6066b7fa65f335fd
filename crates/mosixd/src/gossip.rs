//! Membership and load dissemination: chitchat (Scuttlebutt anti-entropy gossip) over a UDP
//! transport where every datagram is sealed with the cluster secret (see
//! `mosix_proto::seal`), and the rule that turns what gossip heard into MOSIX node status.
//!
//! Each node publishes two keys: `proto` (its protocol `major.minor`) and `load` (its
//! [`LoadVector`] as JSON). A node is *up* while its chitchat heartbeat keeps advancing: a
//! peer whose heartbeat has not advanced for `down_after` is down; it is up again as soon as
//! a newer heartbeat (of any generation: a restarted daemon is a new generation) arrives.

use crate::config::Config;
use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    spawn_chitchat, Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage,
    Deserializable, FailureDetectorConfig, Serializable,
};
use mosix_proto::seal::{now_ms, Sealer};
use mosix_proto::{GossipStats, LoadVector, NodeState, NodeStatus, ProtocolVersion};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_507;
/// Chitchat cluster id: a node of another cluster answers BadCluster (never reached: it
/// would need our secret first).
const CLUSTER_ID: &str = "mosix";

pub const KEY_PROTO: &str = "proto";
pub const KEY_LOAD: &str = "load";

/// Transport counters, shared by the socket and the status view.
#[derive(Default)]
pub struct Stats {
    datagrams_sent: AtomicU64,
    bytes_sent: AtomicU64,
    datagrams_accepted: AtomicU64,
    bytes_received: AtomicU64,
    datagrams_rejected: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> GossipStats {
        GossipStats {
            datagrams_sent: self.datagrams_sent.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            datagrams_accepted: self.datagrams_accepted.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            datagrams_rejected: self.datagrams_rejected.load(Ordering::Relaxed),
        }
    }
}

/// A chitchat transport whose datagrams are sealed with the cluster secret.
pub struct SealedTransport {
    node: u32,
    sealer: Arc<Mutex<Sealer>>,
    stats: Arc<Stats>,
}

impl SealedTransport {
    pub fn new(node: u32, secret: &[u8], stats: Arc<Stats>) -> SealedTransport {
        SealedTransport {
            node,
            sealer: Arc::new(Mutex::new(Sealer::new(secret))),
            stats,
        }
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot bind the gossip socket to {listen_addr}/udp: {e}")
            })?;
        Ok(Box::new(SealedSocket {
            node: self.node,
            socket,
            sealer: self.sealer.clone(),
            stats: self.stats.clone(),
            buf: vec![0u8; MAX_DATAGRAM + 1],
            last_reject_log: None,
        }))
    }
}

struct SealedSocket {
    node: u32,
    socket: tokio::net::UdpSocket,
    sealer: Arc<Mutex<Sealer>>,
    stats: Arc<Stats>,
    buf: Vec<u8>,
    last_reject_log: Option<Instant>,
}

impl SealedSocket {
    fn reject(&mut self, from: SocketAddr, len: usize, why: &dyn std::fmt::Display) {
        let n = self
            .stats
            .datagrams_rejected
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        // At most one warning every 10 s: a flood must not flood the log too.
        if self
            .last_reject_log
            .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            self.last_reject_log = Some(Instant::now());
            warn!(%from, len, total_rejected = n, "dropped gossip datagram: {why}");
        } else {
            debug!(%from, len, "dropped gossip datagram: {why}");
        }
    }
}

#[async_trait]
impl Socket for SealedSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let plain = msg.serialize_to_vec();
        let sealed = match self.sealer.lock() {
            Ok(s) => s.seal(self.node, now_ms(), &plain),
            Err(p) => p.into_inner().seal(self.node, now_ms(), &plain),
        };
        if sealed.len() > MAX_DATAGRAM {
            warn!(%to, len = sealed.len(), "gossip message too large for one datagram; not sent");
            return Ok(());
        }
        match self.socket.send_to(&sealed, to).await {
            Ok(n) => {
                self.stats.datagrams_sent.fetch_add(1, Ordering::Relaxed);
                self.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            // A peer that is down or unreachable is normal in a cluster; never fatal.
            Err(e) => debug!(%to, "gossip send failed: {e}"),
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.buf).await {
                Ok(x) => x,
                Err(e) => {
                    debug!("gossip recv error (ignored): {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if len > MAX_DATAGRAM {
                self.reject(from, len, &"oversized");
                continue;
            }
            let opened = {
                let mut s = match self.sealer.lock() {
                    Ok(s) => s,
                    Err(p) => p.into_inner(),
                };
                s.open(now_ms(), &self.buf[..len])
            };
            let opened = match opened {
                Ok(o) => o,
                Err(e) => {
                    self.reject(from, len, &e);
                    continue;
                }
            };
            let payload = opened.payload;
            // chitchat decompresses a delta's blocks before it parses anything: refuse
            // blocks that do not declare a small size, and deltas too large in all, so one
            // authentic datagram cannot make us allocate hundreds of megabytes.
            if let Err(e) = mosix_proto::gossip::check_payload(&payload) {
                self.reject(from, len, &e);
                continue;
            }
            // Defence in depth: the payload is authentic, but a parser bug must not kill
            // the daemon.
            let parsed = std::panic::catch_unwind(|| {
                let mut b: &[u8] = &payload;
                ChitchatMessage::deserialize(&mut b)
            });
            match parsed {
                Ok(Ok(msg)) => {
                    self.stats
                        .datagrams_accepted
                        .fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .bytes_received
                        .fetch_add(len as u64, Ordering::Relaxed);
                    return Ok((from, msg));
                }
                Ok(Err(e)) => self.reject(from, len, &format!("malformed gossip message: {e}")),
                Err(_) => self.reject(from, len, &"gossip message crashed the parser"),
            }
        }
    }
}

/// Starts chitchat for this node.
pub async fn start(
    cfg: &Config,
    secret: &[u8],
    proto: ProtocolVersion,
    first_load: &LoadVector,
    stats: Arc<Stats>,
) -> anyhow::Result<ChitchatHandle> {
    let me = cfg.me();
    // A new generation per start: peers tell a restarted daemon from its previous life.
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let chitchat_id = ChitchatId::new(cfg.node.to_string(), generation, me.addr);
    let seeds = cfg
        .map
        .iter()
        .filter(|m| m.node != cfg.node)
        .map(|m| m.addr.to_string())
        .collect();
    let config = ChitchatConfig {
        chitchat_id,
        cluster_id: CLUSTER_ID.to_string(),
        gossip_interval: cfg.gossip_interval,
        listen_addr: cfg.listen,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig {
            initial_interval: cfg.gossip_interval * 2,
            dead_node_grace_period: Duration::from_secs(3600),
            ..Default::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let transport = SealedTransport::new(cfg.node, secret, stats);
    let kvs = vec![
        (KEY_PROTO.to_string(), proto.to_string()),
        (
            KEY_LOAD.to_string(),
            serde_json::to_string(first_load).unwrap_or_default(),
        ),
    ];
    spawn_chitchat(config, kvs, &transport).await
}

/// Turns chitchat's view into MOSIX node status; remembers when each peer's heartbeat last
/// advanced.
pub struct Membership {
    down_after: Duration,
    proto: ProtocolVersion,
    /// Per chitchat id (node, generation): last heartbeat and when it last advanced.
    seen: HashMap<ChitchatId, (u64, Option<Instant>)>,
}

impl Membership {
    pub fn new(down_after: Duration, proto: ProtocolVersion) -> Membership {
        Membership {
            down_after,
            proto,
            seen: HashMap::new(),
        }
    }

    /// Computes the status of every map node from chitchat's state at `now`.
    pub fn update(
        &mut self,
        cfg: &Config,
        chitchat: &Chitchat,
        my_load: &LoadVector,
        now: Instant,
    ) -> Vec<NodeStatus> {
        let self_id = chitchat.self_chitchat_id().clone();
        // Best (most recently advancing) generation per node number.
        let mut best: HashMap<u32, (Option<Instant>, &chitchat::NodeState)> = HashMap::new();
        for (id, st) in chitchat.node_states() {
            if *id == self_id {
                continue;
            }
            let Ok(n) = id.node_id.parse::<u32>() else {
                continue;
            };
            let hb: u64 = st.heartbeat().into();
            let entry = self.seen.entry(id.clone()).or_insert((hb, None));
            if hb > entry.0 {
                *entry = (hb, Some(now));
            }
            let adv = entry.1;
            let better = match best.get(&n) {
                None => true,
                Some((b, _)) => adv > *b,
            };
            if better {
                best.insert(n, (adv, st));
            }
        }
        // Forget generations chitchat forgot.
        self.seen
            .retain(|id, _| chitchat.node_states().contains_key(id));

        cfg.map
            .iter()
            .map(|m| {
                if m.node == cfg.node {
                    return NodeStatus {
                        node: m.node,
                        address: m.addr.to_string(),
                        status: NodeState::Up.status(),
                        state: NodeState::Up,
                        this_node: true,
                        load: Some(my_load.clone()),
                        age_ms: Some(0),
                    };
                }
                let (state, load, age) = match best.get(&m.node) {
                    None => (NodeState::Down, None, None),
                    Some((adv, st)) => {
                        let age = adv.map(|t| now.duration_since(t));
                        let load = st
                            .get(KEY_LOAD)
                            .and_then(|s| serde_json::from_str::<LoadVector>(s).ok());
                        let proto = st
                            .get(KEY_PROTO)
                            .and_then(|s| s.parse::<ProtocolVersion>().ok());
                        let live = age.is_some_and(|a| a < self.down_after);
                        let state = if !live {
                            NodeState::Down
                        } else if proto != Some(self.proto) {
                            NodeState::Incompatible
                        } else {
                            NodeState::Up
                        };
                        (state, load, age.map(|a| a.as_millis() as u64))
                    }
                };
                NodeStatus {
                    node: m.node,
                    address: m.addr.to_string(),
                    status: state.status(),
                    state,
                    this_node: false,
                    load,
                    age_ms: age,
                }
            })
            .collect()
    }
}
