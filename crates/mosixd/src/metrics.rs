//! Prometheus metrics: counters that the rest of the daemon bumps through small functions
//! (`migration`, `migration_moved`, `incoming_refused`), gauges read from the daemon's
//! state when scraped, and a tiny HTTP server for `GET /metrics` on `metrics_listen`
//! (off unless configured).
//!
//! The exposition is the Prometheus text format 0.0.4, written by hand: every family has
//! `# HELP` and `# TYPE`, counters end in `_total`, histograms have cumulative `_bucket`
//! lines up to `+Inf`, `_sum` and `_count`. Label values come from small fixed sets (move
//! reasons, outcomes, node numbers of the cluster map), never from free text.

use crate::procs::{MoveError, Procs};
use crate::State;
use anyhow::{Context, Result};
use mosix_proto::NodeState;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};

/// Why a process was moved (label `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveReason {
    /// The balancer: expected to finish sooner elsewhere.
    Load,
    /// The balancer: this node is short of memory.
    Memory,
    /// `mosctl expel`: a guest sent home.
    Expel,
    /// The node is leaving.
    Evacuate,
    /// `migrate` (or `mosrun -r`, the FUSE `goto`): asked for by a user.
    Manual,
}

impl MoveReason {
    const ALL: [MoveReason; 5] = [
        MoveReason::Load,
        MoveReason::Memory,
        MoveReason::Expel,
        MoveReason::Evacuate,
        MoveReason::Manual,
    ];

    fn label(self) -> &'static str {
        match self {
            MoveReason::Load => "load",
            MoveReason::Memory => "memory",
            MoveReason::Expel => "expel",
            MoveReason::Evacuate => "evacuate",
            MoveReason::Manual => "manual",
        }
    }

    /// The reason of an automatic move from the balancer's offer (JSON of a
    /// `mosix_balance::Offer`); no offer: asked for by a user.
    pub fn of_offer(offer: Option<&str>) -> MoveReason {
        let Some(o) = offer else {
            return MoveReason::Manual;
        };
        match serde_json::from_str::<mosix_balance::Offer>(o).map(|o| o.kind) {
            Ok(mosix_balance::MoveKind::Memory) => MoveReason::Memory,
            Ok(mosix_balance::MoveKind::Expel) => MoveReason::Expel,
            Ok(mosix_balance::MoveKind::Evacuate) => MoveReason::Evacuate,
            _ => MoveReason::Load,
        }
    }
}

/// How a migration ended (label `outcome`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It runs on the destination.
    Ok,
    /// Not started or not accepted: the destination refused it (admission, memory, mode),
    /// or it cannot be moved at all (what it uses cannot migrate, bad destination).
    Refused,
    /// The destination or the link went away in the middle.
    PeerGone,
    /// The other side did not answer in time.
    Timeout,
    /// Checkpoint, restore or anything else failed.
    Engine,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Refused,
        Outcome::PeerGone,
        Outcome::Timeout,
        Outcome::Engine,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::PeerGone => "peer_gone",
            Outcome::Timeout => "timeout",
            Outcome::Engine => "engine",
        }
    }

    /// How a move that failed ended, from its error.
    pub fn of_error(e: &MoveError) -> Outcome {
        match e {
            MoveError::AlreadyThere { .. }
            | MoveError::Busy
            | MoveError::Elsewhere { .. }
            | MoveError::Refused { .. }
            | MoveError::Destination(_)
            | MoveError::Frozen
            | MoveError::Checkpointing
            | MoveError::Rights(_) => Outcome::Refused,
            MoveError::PeerGone { why, .. } if why.contains("timed out") => Outcome::Timeout,
            MoveError::PeerGone { .. } | MoveError::LinkLost(_) => Outcome::PeerGone,
            MoveError::Engine(why) if why.starts_with("it cannot move") => Outcome::Refused,
            MoveError::Ended | MoveError::Engine(_) | MoveError::Failed { .. } => Outcome::Engine,
        }
    }
}

/// Upper bounds of the frozen-time buckets, ms.
const FROZEN_MS: [u64; 12] = [
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000,
];
/// Upper bounds of the moved-bytes buckets (64 KiB .. 16 GiB, ×4).
const BYTES: [u64; 10] = [
    1 << 16,
    1 << 18,
    1 << 20,
    1 << 22,
    1 << 24,
    1 << 26,
    1 << 28,
    1 << 30,
    1 << 32,
    1 << 34,
];

struct Histogram<const N: usize> {
    bounds: [u64; N],
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: [AtomicU64; 13],
    sum: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    const fn new(bounds: [u64; N]) -> Self {
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; 13],
            sum: AtomicU64::new(0),
        }
    }

    fn observe(&self, v: u64) {
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(N);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Writes the family; values (bounds, sum) are divided by `unit`.
    fn write(&self, out: &mut Exposition, name: &str, help: &str, unit: f64) {
        out.family(name, help, "histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let le = *b as f64 / unit;
            out.line(&format!("{name}_bucket{{le=\"{le}\"}}"), cum as f64);
        }
        cum += self.counts[N].load(Ordering::Relaxed);
        out.line(&format!("{name}_bucket{{le=\"+Inf\"}}"), cum as f64);
        out.line(
            &format!("{name}_sum"),
            self.sum.load(Ordering::Relaxed) as f64 / unit,
        );
        out.line(&format!("{name}_count"), cum as f64);
    }
}

/// The counters of this process.
struct Counters {
    /// [reason][outcome]
    migrations: [[AtomicU64; 5]; 5],
    frozen_ms: Histogram<12>,
    bytes: Histogram<10>,
    incoming_refused: AtomicU64,
    arena_bytes: AtomicU64,
    deputy_arena_bytes: AtomicU64,
}

static COUNTERS: Counters = Counters {
    migrations: [const { [const { AtomicU64::new(0) }; 5] }; 5],
    frozen_ms: Histogram::new(FROZEN_MS),
    bytes: Histogram::new(BYTES),
    incoming_refused: AtomicU64::new(0),
    arena_bytes: AtomicU64::new(0),
    deputy_arena_bytes: AtomicU64::new(0),
};

/// Counts a migration this node tried to send, by why and how it ended, and passes its
/// result on: `match metrics::migration(reason, self.migrate(..)) { .. }`.
pub fn migration<T>(
    reason: MoveReason,
    r: std::result::Result<T, MoveError>,
) -> std::result::Result<T, MoveError> {
    let outcome = match &r {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::of_error(e),
    };
    let (ri, oi) = (reason as usize, outcome as usize);
    COUNTERS.migrations[ri][oi].fetch_add(1, Ordering::Relaxed);
    r
}

/// A process left this node: it was frozen `frozen_ms` and `bytes` of memory were moved.
pub fn migration_moved(frozen_ms: u64, bytes: u64) {
    COUNTERS.frozen_ms.observe(frozen_ms);
    COUNTERS.bytes.observe(bytes);
}

/// This node refused a process another node offered it.
pub fn incoming_refused() {
    COUNTERS.incoming_refused.fetch_add(1, Ordering::Relaxed);
}

/// A guest's write behind of `n` bytes went home from its supervisor's arena.
pub fn arena_bytes(n: u64) {
    COUNTERS.arena_bytes.fetch_add(n, Ordering::Relaxed);
}

/// A write behind of `n` bytes of a process of this home went to its deputy through the
/// deputy's arena.
pub fn deputy_arena_bytes(n: u64) {
    COUNTERS.deputy_arena_bytes.fetch_add(n, Ordering::Relaxed);
}

/// A text exposition being written.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn line(&mut self, series: &str, v: f64) {
        if v.is_finite() {
            let _ = writeln!(self.0, "{series} {v}");
        } else {
            let _ = writeln!(self.0, "{series} NaN");
        }
    }

    fn single(&mut self, name: &str, help: &str, kind: &str, v: f64) {
        self.family(name, help, kind);
        self.line(name, v);
    }
}

/// What the gauges show, gathered from the daemon.
#[derive(Default)]
pub struct Snapshot {
    pub node: u32,
    pub status: Option<mosix_proto::ClusterStatus>,
    /// (guests here, home processes, home processes running elsewhere)
    pub guests: u64,
    pub home_jobs: u64,
    pub home_jobs_away: u64,
}

impl Snapshot {
    pub fn take(state: &State, procs: &Procs) -> Snapshot {
        let st = state.status();
        let ps = procs.ps();
        let me = st.this_node;
        let guests = ps.iter().filter(|p| p.home != me).count() as u64;
        let home: Vec<_> = ps.iter().filter(|p| p.home == me).collect();
        Snapshot {
            node: me,
            guests,
            home_jobs: home.len() as u64,
            home_jobs_away: home.iter().filter(|p| p.where_ != 0).count() as u64,
            status: Some(st),
        }
    }
}

/// The whole exposition.
pub fn render(s: &Snapshot) -> String {
    let mut o = Exposition(String::with_capacity(8 << 10));
    o.single("mosix_up", "1 while this node's mosixd runs.", "gauge", 1.0);
    o.single(
        "mosix_node",
        "This node's number.",
        "gauge",
        f64::from(s.node),
    );
    let st = s.status.as_ref();
    let mine = st
        .and_then(|st| st.nodes.iter().find(|n| n.this_node))
        .and_then(|n| n.load.as_ref());
    if let Some(l) = mine {
        o.single(
            "mosix_load",
            "Runnable processes per unit of capacity (speed x CPUs); 1 = every CPU busy.",
            "gauge",
            l.load,
        );
        o.single(
            "mosix_runnable",
            "Average number of runnable processes (1 s time constant).",
            "gauge",
            l.runnable,
        );
        o.single(
            "mosix_cpus",
            "CPUs of this node.",
            "gauge",
            f64::from(l.cpus),
        );
        o.single(
            "mosix_speed",
            "Relative speed of one CPU (1 = the reference machine).",
            "gauge",
            l.speed,
        );
        o.single(
            "mosix_utilization",
            "Busy fraction of this node's CPU allotment, 0..1.",
            "gauge",
            l.util,
        );
        o.single(
            "mosix_memory_total_bytes",
            "Memory of this node.",
            "gauge",
            l.mem_total as f64,
        );
        o.single(
            "mosix_memory_free_bytes",
            "Memory free (available) on this node.",
            "gauge",
            l.mem_free as f64,
        );
        o.single(
            "mosix_processes",
            "Processes on this node.",
            "gauge",
            f64::from(l.procs),
        );
    }
    o.single(
        "mosix_guests",
        "Processes of other home nodes running here.",
        "gauge",
        s.guests as f64,
    );
    o.single(
        "mosix_home_jobs",
        "Migratable processes whose home is this node, wherever they run.",
        "gauge",
        s.home_jobs as f64,
    );
    o.single(
        "mosix_home_jobs_away",
        "Migratable processes whose home is this node that run on another node.",
        "gauge",
        s.home_jobs_away as f64,
    );
    o.family(
        "mosix_migrations_total",
        "Migrations this node tried to send, by reason and outcome.",
        "counter",
    );
    for r in MoveReason::ALL {
        for oc in Outcome::ALL {
            let v = COUNTERS.migrations[r as usize][oc as usize].load(Ordering::Relaxed);
            o.line(
                &format!(
                    "mosix_migrations_total{{reason=\"{}\",outcome=\"{}\"}}",
                    r.label(),
                    oc.label()
                ),
                v as f64,
            );
        }
    }
    o.single(
        "mosix_incoming_migrations_refused_total",
        "Processes offered by other nodes that this node refused.",
        "counter",
        COUNTERS.incoming_refused.load(Ordering::Relaxed) as f64,
    );
    o.single(
        "mosix_forwarded_write_arena_bytes_total",
        "Bytes of guests' writes behind sent home from their supervisors' arenas.",
        "counter",
        COUNTERS.arena_bytes.load(Ordering::Relaxed) as f64,
    );
    o.single(
        "mosix_deputy_arena_bytes_total",
        "Bytes of writes behind of processes of this home given to their deputies in their arenas.",
        "counter",
        COUNTERS.deputy_arena_bytes.load(Ordering::Relaxed) as f64,
    );
    COUNTERS.frozen_ms.write(
        &mut o,
        "mosix_migration_frozen_seconds",
        "How long a process that left this node was stopped by its move.",
        1000.0,
    );
    COUNTERS.bytes.write(
        &mut o,
        "mosix_migration_bytes",
        "Memory moved with a process that left this node.",
        1.0,
    );
    if let Some(st) = st {
        let g = &st.gossip;
        for (name, help, v) in [
            (
                "mosix_gossip_datagrams_sent_total",
                "Gossip datagrams sent.",
                g.datagrams_sent,
            ),
            (
                "mosix_gossip_bytes_sent_total",
                "Gossip bytes sent.",
                g.bytes_sent,
            ),
            (
                "mosix_gossip_datagrams_accepted_total",
                "Gossip datagrams received and authenticated.",
                g.datagrams_accepted,
            ),
            (
                "mosix_gossip_bytes_received_total",
                "Gossip bytes received and authenticated.",
                g.bytes_received,
            ),
            (
                "mosix_gossip_datagrams_rejected_total",
                "Gossip datagrams dropped: unauthenticated, malformed, stale, replayed or too big.",
                g.datagrams_rejected,
            ),
        ] {
            o.single(name, help, "counter", v as f64);
        }
        let peers_up = st
            .nodes
            .iter()
            .filter(|n| !n.this_node && n.state == NodeState::Up)
            .count();
        o.single(
            "mosix_peers_up",
            "Other nodes of the cluster map seen up (status 3).",
            "gauge",
            peers_up as f64,
        );
        o.single(
            "mosix_nodes",
            "Nodes in the cluster map, this one included.",
            "gauge",
            st.nodes.len() as f64,
        );
        o.family(
            "mosix_node_status",
            "MOSIX status of each node of the map as this node sees it (3 = up, 1 = down or incompatible).",
            "gauge",
        );
        for n in &st.nodes {
            o.line(
                &format!("mosix_node_status{{node=\"{}\"}}", n.node),
                f64::from(n.status),
            );
        }
        o.single(
            "mosix_uptime_seconds",
            "Seconds since this mosixd started.",
            "gauge",
            st.uptime_s,
        );
    }
    o.0
}

/// Longest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// Scrapes served at once; more wait for the accept loop.
const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request and read the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);

/// Binds the metrics address (done before the daemon reports it started, so a bad address
/// is one clear error at start-up).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot serve metrics on {addr} (metrics_listen)"))?;
    l.set_nonblocking(true)?;
    info!(%addr, "Prometheus metrics on http://{addr}/metrics");
    Ok(l)
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, state: Arc<State>, procs: Arc<Procs>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("metrics listener: {e}");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let (st, pr) = (state.clone(), procs.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(CLIENT_DEADLINE, answer(stream, st, pr)).await {
                        Ok(Err(e)) => debug!(%peer, "metrics request: {e:#}"),
                        Err(_) => debug!(%peer, "metrics client too slow; closed"),
                        Ok(Ok(())) => {}
                    }
                });
            }
            Err(e) => {
                warn!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The request line's method and path, once the head is complete (None: read more).
fn parse_head(buf: &[u8]) -> Option<(String, String)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| {
        // Be lenient with clients that end lines with a bare LF.
        buf.windows(2).position(|w| w == b"\n\n")
    })?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut it = head.lines().next()?.split_whitespace();
    Some((it.next()?.to_string(), it.next()?.to_string()))
}

async fn answer(mut s: tokio::net::TcpStream, state: Arc<State>, procs: Arc<Procs>) -> Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (method, path) = loop {
        if let Some(h) = parse_head(&buf) {
            break h;
        }
        if buf.len() > MAX_REQUEST {
            return respond(&mut s, "431 Request Header Fields Too Large", "too long\n").await;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if method != "GET" && method != "HEAD" {
        return respond(&mut s, "405 Method Not Allowed", "only GET\n").await;
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => {
            // ps reads /proc: keep it off the async thread.
            let body = tokio::task::spawn_blocking(move || render(&Snapshot::take(&state, &procs)))
                .await
                .context("rendering metrics")?;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await?;
            if method == "GET" {
                s.write_all(body.as_bytes()).await?;
            }
            s.shutdown().await?;
            Ok(())
        }
        "/" => respond(&mut s, "200 OK", "mosixd: metrics at /metrics\n").await,
        _ => respond(&mut s, "404 Not Found", "not found: try /metrics\n").await,
    }
}

async fn respond(s: &mut tokio::net::TcpStream, status: &str, body: &str) -> Result<()> {
    let msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(msg.as_bytes()).await?;
    s.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample line of the exposition: (series with labels, value).
    fn samples(text: &str) -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').expect("series value");
                (k.to_string(), v.parse::<f64>().expect("a number"))
            })
            .collect()
    }

    fn value(text: &str, series: &str) -> f64 {
        samples(text)
            .into_iter()
            .find(|(k, _)| k == series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .1
    }

    #[test]
    fn exposition_is_well_formed_and_counts_migrations() {
        let before = render(&Snapshot::default());
        let ok = "mosix_migrations_total{reason=\"load\",outcome=\"ok\"}";
        let gone = "mosix_migrations_total{reason=\"manual\",outcome=\"peer_gone\"}";
        let (ok0, gone0) = (value(&before, ok), value(&before, gone));
        let n0 = value(&before, "mosix_migration_frozen_seconds_count");
        let r: std::result::Result<(), MoveError> = migration(MoveReason::Load, Ok(()));
        assert!(r.is_ok());
        migration_moved(40, 3 << 20);
        let r: std::result::Result<(), MoveError> = migration(
            MoveReason::Manual,
            Err(MoveError::PeerGone {
                node: 3,
                why: "connection reset".into(),
            }),
        );
        assert!(r.is_err(), "the result is passed on");
        let after = render(&Snapshot::default());
        assert_eq!(value(&after, ok), ok0 + 1.0);
        assert_eq!(value(&after, gone), gone0 + 1.0);
        assert_eq!(
            value(&after, "mosix_migration_frozen_seconds_count"),
            n0 + 1.0
        );
        // Histograms: buckets are cumulative, +Inf equals the count.
        for h in ["mosix_migration_frozen_seconds", "mosix_migration_bytes"] {
            let b: Vec<f64> = samples(&after)
                .into_iter()
                .filter(|(k, _)| k.starts_with(&format!("{h}_bucket")))
                .map(|(_, v)| v)
                .collect();
            assert!(b.windows(2).all(|w| w[0] <= w[1]), "{h}: {b:?}");
            assert_eq!(
                b.last().copied(),
                Some(value(&after, &format!("{h}_count")))
            );
        }
        assert!(value(&after, "mosix_migration_frozen_seconds_bucket{le=\"0.05\"}") >= 1.0);
        // Every family has HELP and TYPE before its samples, each name once.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for l in after.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(current.clone()), "{current} twice");
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(name.starts_with(&current), "{name} outside its family");
                assert!(name.starts_with("mosix_"), "{name}");
            }
        }
        // 5 reasons x 5 outcomes, present from the start.
        let n = samples(&before)
            .iter()
            .filter(|(k, _)| k.starts_with("mosix_migrations_total{"))
            .count();
        assert_eq!(n, 25);
    }

    #[test]
    fn outcomes_are_classified() {
        let gone = |why: &str| MoveError::PeerGone {
            node: 3,
            why: why.into(),
        };
        assert_eq!(Outcome::of_error(&gone("read timed out")), Outcome::Timeout);
        assert_eq!(
            Outcome::of_error(&gone("connection reset")),
            Outcome::PeerGone
        );
        assert_eq!(
            Outcome::of_error(&MoveError::Refused {
                node: 3,
                reason: "no room".into()
            }),
            Outcome::Refused
        );
        assert_eq!(
            Outcome::of_error(&MoveError::Engine("it cannot move: a socket".into())),
            Outcome::Refused
        );
        assert_eq!(
            Outcome::of_error(&MoveError::Engine("restore failed".into())),
            Outcome::Engine
        );
    }

    #[test]
    fn move_reasons_come_from_the_offer() {
        assert_eq!(MoveReason::of_offer(None), MoveReason::Manual);
        assert_eq!(MoveReason::of_offer(Some("garbage")), MoveReason::Load);
        let offer = mosix_balance::Offer {
            proc: 1,
            from: 1,
            to: 2,
            home: 1,
            kind: mosix_balance::MoveKind::Memory,
            mem_bytes: 1,
            cpu_share: 1.0,
            work_ms: 1.0,
            finish_here_ms: 1.0,
            cost_ms: 1.0,
        };
        let j = serde_json::to_string(&offer).unwrap();
        assert_eq!(MoveReason::of_offer(Some(&j)), MoveReason::Memory);
    }

    #[test]
    fn request_heads_parse() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET".into(), "/metrics".into()))
        );
        assert_eq!(parse_head(b"GET /metrics HTTP/1.1\r\nHost"), None);
        assert_eq!(parse_head(b"\r\n\r\n"), None);
    }
}
