//! mosixd: the MOSIX node daemon, as a library (the `mosixd` binary parses its arguments
//! and calls [`run`]). It samples this node's load, spreads it to every node of the
//! cluster map by authenticated gossip, learns everybody else's, answers the CLI on a
//! Unix control socket, and follows the migratable processes of this node and the guests
//! it hosts.
//!
//! Modules: `config` (mosix.toml), `sample` (load vector), `gossip` (chitchat over a sealed
//! UDP transport + node status rule), `control` (control socket), `procs` (migratable
//! processes), `balance` (the balancing thread), `peer` (control socket credentials),
//! `metrics` (Prometheus metrics on `metrics_listen`).

pub mod balance;
pub mod config;
pub mod control;
pub mod gossip;
pub mod metrics;
pub mod peer;
pub mod procs;
pub mod sample;

use anyhow::{Context, Result};
use config::Config;
use mosix_proto::{ClusterStatus, LoadVector, NodeStatus, ProtocolVersion, FLAG_ACCEPTS_GUESTS};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Test-only: advertise this protocol `major.minor` instead of the built-in one.
const ENV_TEST_PROTOCOL: &str = "MOSIXD_TEST_PROTOCOL_VERSION";
/// How often the load is sampled and the status recomputed.
const TICK: Duration = Duration::from_millis(250);

/// What the daemon was asked to do.
pub struct Options {
    pub config: PathBuf,
    pub check: bool,
    pub measure_speed: bool,
    pub gen_key: Option<PathBuf>,
}

/// What the control socket and the status file read.
pub struct State {
    pub node: u32,
    pub proto: ProtocolVersion,
    pub started: Instant,
    pub stats: Arc<gossip::Stats>,
    pub nodes: RwLock<Vec<NodeStatus>>,
    /// Whether this node takes guests now (config, then `mosctl block/noblock`).
    pub accepts_guests: std::sync::atomic::AtomicBool,
}

impl State {
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            this_node: self.node,
            protocol: self.proto,
            uptime_s: self.started.elapsed().as_secs_f64(),
            gossip: self.stats.snapshot(),
            nodes: match self.nodes.read() {
                Ok(n) => n.clone(),
                Err(p) => p.into_inner().clone(),
            },
        }
    }
}

/// Runs the daemon (or one of its one-shot jobs) as `args` says.
pub fn run(args: Options) -> Result<()> {
    // Whatever we inherited (and everything we open) stays out of the jobs we start.
    peer::cloexec_all_from_3();
    if args.measure_speed {
        println!("{}", sample::measure_speed(Duration::from_secs(1)));
        return Ok(());
    }
    if let Some(path) = &args.gen_key {
        return gen_key(path, &args.config);
    }
    let cfg = Config::load(&args.config)?;
    let secret = cfg.read_secret()?;
    let keys = cfg.read_keys(&secret)?;
    let proto = match std::env::var(ENV_TEST_PROTOCOL) {
        Ok(v) => {
            let p: ProtocolVersion = v
                .parse()
                .map_err(|e: String| anyhow::anyhow!("{ENV_TEST_PROTOCOL}: {e}"))?;
            warn!("TEST OVERRIDE: advertising protocol {p}");
            p
        }
        Err(_) => mosix_proto::PROTOCOL_VERSION,
    };
    if args.check {
        println!(
            "config {} is valid: node {} of {} nodes, listen {}, control socket {}",
            args.config.display(),
            cfg.node,
            cfg.map.len(),
            cfg.listen,
            cfg.control_socket.display()
        );
        match keys.public {
            Some(k) => println!("node keys: on; this node's line: {} {k}", cfg.node),
            None => println!("node keys: OFF (cluster secret only)"),
        }
        for w in &keys.warnings {
            println!("warning: {w}");
        }
        return Ok(());
    }
    for w in &keys.warnings {
        warn!("{w}");
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create state dir {}", cfg.state_dir.display()))?;
    let speed = match cfg.speed {
        Some(s) => s,
        None => {
            let s = sample::measure_speed(Duration::from_millis(500));
            info!(speed = s, "measured CPU speed");
            s
        }
    };
    let mut sampler = sample::Sampler::new(cfg.load_scope, speed, cfg.cpus, proto)?;
    if let Some(c) = sampler.cgroup_paths() {
        info!(cgroup = ?c, "sampling load of this daemon's cgroup");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let first = sampler.sample(if cfg.accept_guests { FLAG_ACCEPTS_GUESTS } else { 0 });
        let stats = Arc::new(gossip::Stats::default());
        let listener = control::bind(&cfg.control_socket)?;
        let metrics_listener = cfg.metrics_listen.map(metrics::bind).transpose()?;
        let handle = gossip::start(&cfg, &secret, proto, &first, stats.clone()).await?;
        info!(
            node = cfg.node,
            listen = %cfg.listen,
            nodes = cfg.map.len(),
            %proto,
            speed,
            cpus = sampler.cpus(),
            "mosixd started"
        );
        // Every map node is listed from the first answer on (down until heard from).
        let mut membership = gossip::Membership::new(cfg.down_after, proto);
        let nodes = {
            let chitchat = handle.chitchat();
            let cc = chitchat.lock().await;
            membership.update(&cfg, &cc, &first, Instant::now())
        };
        let state = Arc::new(State {
            node: cfg.node,
            proto,
            started: Instant::now(),
            stats,
            nodes: RwLock::new(nodes),
            accepts_guests: std::sync::atomic::AtomicBool::new(cfg.accept_guests),
        });
        let procs = procs::Procs::new(cfg.clone(), keys.channel, state.clone());
        // What was running before a restart of this daemon is found again.
        procs.readopt_homes();
        procs.readopt_guests();
        procs.start_families()?;
        procs.listen()?;
        balance::start(procs.clone())?;
        let server = tokio::spawn(control::serve(listener, state.clone(), procs.clone()));
        let metrics_server = metrics_listener
            .map(|l| tokio::spawn(metrics::serve(l, state.clone(), procs.clone())));
        let ticker = tokio::spawn(tick_loop(
            cfg.clone(),
            handle.chitchat(),
            sampler,
            membership,
            state,
        ));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot catch SIGTERM")?;
        let result = tokio::select! {
            _ = tokio::signal::ctrl_c() => { info!("interrupted; stopping"); Ok(()) }
            _ = term.recv() => { info!("SIGTERM; stopping"); Ok(()) }
            r = handle.termination_watcher() => {
                Err(anyhow::anyhow!("gossip stopped: {}", r.err().map(|e| e.to_string()).unwrap_or_default()))
            }
        };
        server.abort();
        ticker.abort();
        if let Some(m) = metrics_server {
            m.abort();
        }
        control::unlink(&cfg.control_socket);
        let _ = std::fs::remove_file(status_file(&cfg));
        let _ = handle.shutdown().await;
        result
    })
}

/// `mosixd --gen-key PATH`.
fn gen_key(path: &std::path::Path, config: &std::path::Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let key = mosix_proto::channel::PrivateKey::generate()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {} (an existing key is never overwritten: remove it first)",
                path.display()
            )
        })?;
    // The umask may only have taken bits away; make it exactly what read_keys accepts.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(key.to_hex().as_bytes())?;
    f.sync_all()?;
    match Config::load(config) {
        Ok(c) => {
            println!("{} {}", c.node, key.public());
            eprintln!(
                "mosixd: wrote node {}'s private key to {}; add the line above to \
                 public_keys_file on every node",
                c.node,
                path.display()
            );
        }
        Err(_) => {
            println!("{}", key.public());
            eprintln!(
                "mosixd: wrote a private key to {}; add 'NODE {}' (NODE: this node's \
                 number) to public_keys_file on every node",
                path.display(),
                key.public()
            );
        }
    }
    Ok(())
}

async fn tick_loop(
    cfg: Config,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    mut sampler: sample::Sampler,
    mut membership: gossip::Membership,
    state: Arc<State>,
) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status_file = status_file(&cfg);
    let mut last_file = Instant::now() - Duration::from_secs(10);
    loop {
        interval.tick().await;
        let lv: LoadVector = sampler.sample(flags(&state));
        let nodes = {
            let mut cc = chitchat.lock().await;
            if let Ok(j) = serde_json::to_string(&lv) {
                cc.self_node_state().set(gossip::KEY_LOAD, j);
            }
            membership.update(&cfg, &cc, &lv, Instant::now())
        };
        match state.nodes.write() {
            Ok(mut n) => *n = nodes,
            Err(p) => *p.into_inner() = nodes,
        }
        if last_file.elapsed() >= Duration::from_secs(1) {
            last_file = Instant::now();
            if let Err(e) = write_status_file(&status_file, &state.status()) {
                warn!("cannot write {}: {e:#}", status_file.display());
            }
        }
    }
}

/// The status flags this node gossips.
fn flags(state: &State) -> u32 {
    if state
        .accepts_guests
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        FLAG_ACCEPTS_GUESTS
    } else {
        0
    }
}

/// Where the read-only view goes: beside the control socket (/run, tmpfs, by default).
fn status_file(cfg: &Config) -> PathBuf {
    cfg.control_socket
        .parent()
        .map_or_else(|| cfg.state_dir.clone(), |d| d.to_path_buf())
        .join("status.json")
}

/// The read-only view for scripts: status.json beside the control socket, replaced
/// atomically.
fn write_status_file(path: &std::path::Path, st: &ClusterStatus) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut j = serde_json::to_vec_pretty(st)?;
    j.push(b'\n');
    std::fs::write(&tmp, j)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
