//! Scenario files (TOML): the cluster, the workload, the network, node events.
//!
//! Everything a user can get wrong is reported as one line naming the file, the place and
//! the problem; nothing here panics on input.

use mosix_balance::rng::SplitMix64;
use mosix_balance::Params;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// At most this many nodes in a scenario.
pub const MAX_NODES: u64 = 1_000_000;
/// At most this many jobs in a scenario.
pub const MAX_JOBS: u64 = 10_000_000;

/// A scenario that cannot be used, with one line saying why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError(pub String);

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

/// One node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeSpec {
    /// Speed of one CPU (1.0 = the reference machine).
    pub speed: f64,
    pub cpus: u32,
    pub mem_bytes: u64,
}

/// One job: a CPU-bound process started on `home` at `at_s`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobSpec {
    /// Arrival time, seconds from the start.
    pub at_s: f64,
    /// Node it is started on (1-based).
    pub home: u32,
    /// CPU work, seconds of a speed-1 CPU.
    pub work_s: f64,
    pub mem_bytes: u64,
    /// Pinned to its home (`mosrun -L`).
    pub pinned: bool,
    /// Automatic migration allowed.
    pub auto: bool,
    /// Nodes it must never go to.
    pub avoid: Vec<u32>,
}

/// Information dissemination: MOSIX's randomised information vector.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GossipSpec {
    /// Every node sends a gossip message this often, ms.
    pub period_ms: u64,
    /// ... to this many nodes drawn at random.
    pub fanout: u32,
    /// Each node keeps the load of at most this many peers (its window).
    pub window: usize,
    /// A message carries the sender's own fresh load and this many of its freshest entries.
    pub entries_per_message: usize,
    /// The cluster has been up (and idle) before the scenario starts: at t = 0 every node
    /// already knows the idle load of `window` random peers, as a running cluster would.
    /// false: a cold start, nobody knows anybody until gossip has run.
    pub warm_start: bool,
}

impl Default for GossipSpec {
    fn default() -> Self {
        GossipSpec {
            period_ms: 500,
            fanout: 1,
            window: 16,
            entries_per_message: 8,
            warm_start: true,
        }
    }
}

/// What happens to a node.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum EventKind {
    /// Graceful leave: the node takes no new guests at once and evacuates (MOSIX only);
    /// after `grace_s` it powers off and whatever is still on it freezes until it returns.
    Leave { grace_s: f64 },
    /// The node comes back (empty of guests; its frozen processes resume).
    Return,
}

/// A node event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeEvent {
    pub at_s: f64,
    pub node: u32,
    pub kind: EventKind,
}

/// A validated scenario.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    /// Node i+1 is `nodes[i]`.
    pub nodes: Vec<NodeSpec>,
    /// Sorted by arrival time.
    pub jobs: Vec<JobSpec>,
    /// Migration bandwidth, bytes/s (also what the policy assumes).
    pub link_bytes_per_sec: f64,
    /// Fixed cost of a migration, ms.
    pub move_overhead_ms: f64,
    pub gossip: GossipSpec,
    /// Each node runs the policy this often, ms.
    pub tick_ms: u64,
    /// Policy parameters (link figures are overwritten by the two above).
    pub params: Params,
    /// Time constant of the runnable average a node publishes, ms.
    pub load_tau_ms: f64,
    /// A node whose processes need more memory than it has runs at speed /
    /// (1 + swap_penalty × overcommit fraction).
    pub swap_penalty: f64,
    pub events: Vec<NodeEvent>,
    /// Stop the MOSIX simulation here even if jobs are left, seconds (default: 100 × lower
    /// bound + 600). The baselines always run to the end (they have no periodic events).
    pub max_time_s: Option<f64>,
}

impl Scenario {
    /// A scenario with these nodes and jobs and every other setting at its default.
    pub fn new(name: &str, nodes: Vec<NodeSpec>, mut jobs: Vec<JobSpec>) -> Self {
        jobs.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        let params = Params::default();
        Scenario {
            name: name.into(),
            description: String::new(),
            nodes,
            jobs,
            link_bytes_per_sec: params.link_bytes_per_sec,
            move_overhead_ms: params.move_overhead_ms,
            gossip: GossipSpec::default(),
            tick_ms: mosix_balance::TICK_MS,
            params,
            load_tau_ms: 1000.0,
            swap_penalty: 20.0,
            events: Vec::new(),
            max_time_s: None,
        }
    }

    /// The policy parameters with the scenario's link figures.
    pub fn policy_params(&self) -> Params {
        Params {
            link_bytes_per_sec: self.link_bytes_per_sec,
            move_overhead_ms: self.move_overhead_ms,
            ..self.params.clone()
        }
    }
}

// ---- raw TOML ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Option<String>,
    description: Option<String>,
    seed: Option<u64>,
    max_time_s: Option<f64>,
    network: Option<RawNetwork>,
    gossip: Option<RawGossip>,
    load: Option<RawLoad>,
    memory: Option<RawMemory>,
    balance: Option<toml::Table>,
    #[serde(default)]
    nodes: Vec<RawNodes>,
    #[serde(default)]
    jobs: Vec<RawJobs>,
    #[serde(default)]
    generate: Vec<toml::Table>,
    #[serde(default)]
    events: Vec<RawEvent>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    link_mb_per_s: Option<f64>,
    move_overhead_ms: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawGossip {
    period_ms: Option<u64>,
    fanout: Option<u32>,
    window: Option<usize>,
    entries_per_message: Option<usize>,
    warm_start: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLoad {
    average_tau_ms: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    swap_penalty: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodes {
    #[serde(default = "one")]
    count: u64,
    #[serde(default = "one_f")]
    speed: f64,
    #[serde(default = "one_u32")]
    cpus: u32,
    #[serde(default = "default_node_mem")]
    mem_mb: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobs {
    #[serde(default)]
    at: f64,
    node: u32,
    #[serde(default = "one")]
    count: u64,
    work_s: f64,
    #[serde(default = "default_job_mem")]
    mem_mb: f64,
    #[serde(default)]
    pinned: bool,
    #[serde(default = "yes")]
    auto: bool,
    #[serde(default)]
    avoid: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    at: f64,
    node: Option<u32>,
    nodes: Option<String>,
    action: String,
    grace_s: Option<f64>,
}

fn one() -> u64 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn one_u32() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_node_mem() -> f64 {
    4096.0
}
fn default_job_mem() -> f64 {
    16.0
}

const MIB: f64 = 1024.0 * 1024.0;

/// Line and column (1-based) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

/// Reads and validates a scenario file.
pub fn load_scenario(path: &Path) -> Result<Scenario, ScenarioError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ScenarioError(format!("scenario {}: {e}", path.display())))?;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    parse_scenario(&text, &stem)
        .map_err(|e| ScenarioError(format!("scenario {}{}", path.display(), e.0)))
}

/// Parses and validates scenario text; `default_name` names it if it has no `name`.
/// Errors start with ":LINE:COL: " or ": " so that a file name can be put in front.
pub fn parse_scenario(text: &str, default_name: &str) -> Result<Scenario, ScenarioError> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().replace('\n', " ");
        match e.span() {
            Some(s) => {
                let (l, c) = line_col(text, s.start);
                ScenarioError(format!(":{l}:{c}: {msg}"))
            }
            None => ScenarioError(format!(": {msg}")),
        }
    })?;
    build(raw, default_name).map_err(|m| ScenarioError(format!(": {m}")))
}

fn finite_pos(v: f64, what: &str) -> Result<f64, String> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{what} must be a positive number (got {v})"))
    }
}

fn finite_nonneg(v: f64, what: &str) -> Result<f64, String> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{what} must be a number >= 0 (got {v})"))
    }
}

fn mb_to_bytes(mb: f64, what: &str) -> Result<u64, String> {
    let mb = finite_nonneg(mb, what)?;
    if mb > 1e12 {
        return Err(format!("{what} is too large ({mb} MB)"));
    }
    Ok((mb * MIB).round() as u64)
}

/// Parses node ranges like "1-3000,4001,5000-5100" or "all" over nodes 1..=n.
pub fn parse_ranges(s: &str, n: u32, what: &str) -> Result<Vec<u32>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("all") {
        return Ok((1..=n).collect());
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: u32 = a
            .parse()
            .map_err(|_| format!("{what}: '{part}' is not a node number or range"))?;
        let b: u32 = b
            .parse()
            .map_err(|_| format!("{what}: '{part}' is not a node number or range"))?;
        if a == 0 || b < a || b > n {
            return Err(format!("{what}: range '{part}' is outside nodes 1-{n}"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        return Err(format!("{what}: no nodes"));
    }
    Ok(out)
}

/// A random distribution of a job property.
#[derive(Clone, Debug, PartialEq)]
enum Dist {
    Const(f64),
    Uniform(f64, f64),
    Exp(f64),
    /// Bounded Pareto: shape, lower and upper bound.
    Pareto(f64, f64, f64),
}

impl Dist {
    fn sample(&self, rng: &mut SplitMix64) -> f64 {
        match *self {
            Dist::Const(v) => v,
            Dist::Uniform(a, b) => a + (b - a) * rng.next_f64(),
            Dist::Exp(m) => -m * (1.0 - rng.next_f64()).ln(),
            Dist::Pareto(alpha, l, h) => {
                let u = rng.next_f64();
                let la = l.powf(alpha);
                let ha = h.powf(alpha);
                let x = (-(u * ha - u * la - ha) / (ha * la)).powf(-1.0 / alpha);
                x.clamp(l, h)
            }
        }
    }
}

fn dist_of(v: Option<&toml::Value>, what: &str, default: Dist) -> Result<Dist, String> {
    let Some(v) = v else { return Ok(default) };
    let num = |v: &toml::Value| -> Option<f64> {
        v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
    };
    if let Some(x) = num(v) {
        return Ok(Dist::Const(finite_nonneg(x, what)?));
    }
    let Some(t) = v.as_table() else {
        return Err(format!(
            "{what} must be a number or a table like {{ dist = \"exp\", mean = 60 }}"
        ));
    };
    let get = |k: &str| -> Result<f64, String> {
        let x = t
            .get(k)
            .ok_or_else(|| format!("{what}: missing '{k}'"))
            .and_then(|x| num(x).ok_or_else(|| format!("{what}.{k} must be a number")))?;
        finite_nonneg(x, &format!("{what}.{k}"))
    };
    let kind = t.get("dist").and_then(|d| d.as_str()).ok_or_else(|| {
        format!("{what}: missing dist = \"const\" | \"uniform\" | \"exp\" | \"pareto\"")
    })?;
    let allowed: &[&str] = match kind {
        "const" => &["dist", "value"],
        "uniform" => &["dist", "min", "max"],
        "exp" => &["dist", "mean"],
        "pareto" => &["dist", "alpha", "min", "max"],
        other => {
            return Err(format!(
                "{what}: unknown dist '{other}' (const, uniform, exp, pareto)"
            ))
        }
    };
    if let Some(k) = t.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "{what}: unknown key '{k}' for dist '{kind}' (expected {})",
            allowed.join(", ")
        ));
    }
    Ok(match kind {
        "const" => Dist::Const(get("value")?),
        "uniform" => {
            let (a, b) = (get("min")?, get("max")?);
            if b < a {
                return Err(format!("{what}: max < min"));
            }
            Dist::Uniform(a, b)
        }
        "exp" => Dist::Exp(finite_pos(get("mean")?, &format!("{what}.mean"))?),
        _ => {
            let alpha = finite_pos(get("alpha")?, &format!("{what}.alpha"))?;
            let (l, h) = (
                finite_pos(get("min")?, &format!("{what}.min"))?,
                get("max")?,
            );
            if h <= l {
                return Err(format!("{what}: max must be > min"));
            }
            Dist::Pareto(alpha, l, h)
        }
    })
}

fn generate(
    t: &toml::Table,
    i: usize,
    n: u32,
    rng: &mut SplitMix64,
    jobs: &mut Vec<JobSpec>,
) -> Result<(), String> {
    const KEYS: &[&str] = &[
        "count",
        "arrival",
        "start_s",
        "end_s",
        "rate_per_s",
        "homes",
        "work_s",
        "mem_mb",
        "pinned_frac",
    ];
    let what = format!("generate[{i}]");
    if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!(
            "{what}: unknown key '{k}' (expected {})",
            KEYS.join(", ")
        ));
    }
    let num = |k: &str| -> Result<Option<f64>, String> {
        match t.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_float()
                .or_else(|| v.as_integer().map(|i| i as f64))
                .map(Some)
                .ok_or_else(|| format!("{what}.{k} must be a number")),
        }
    };
    let count = t
        .get("count")
        .and_then(|v| v.as_integer())
        .ok_or_else(|| format!("{what}.count must be given as an integer"))?;
    if count < 1 || count as u64 + jobs.len() as u64 > MAX_JOBS {
        return Err(format!("{what}.count must be 1..={MAX_JOBS} in all"));
    }
    let start = finite_nonneg(num("start_s")?.unwrap_or(0.0), &format!("{what}.start_s"))?;
    let arrival = match t.get("arrival") {
        None => "batch",
        Some(v) => v
            .as_str()
            .ok_or_else(|| format!("{what}.arrival must be a string"))?,
    };
    let homes = match t.get("homes") {
        None => (1..=n).collect(),
        Some(v) => parse_ranges(
            v.as_str()
                .ok_or_else(|| format!("{what}.homes must be a string like \"1-100\""))?,
            n,
            &format!("{what}.homes"),
        )?,
    };
    let work = dist_of(
        t.get("work_s"),
        &format!("{what}.work_s"),
        Dist::Const(60.0),
    )?;
    let mem = dist_of(
        t.get("mem_mb"),
        &format!("{what}.mem_mb"),
        Dist::Const(default_job_mem()),
    )?;
    let pinned_frac = num("pinned_frac")?.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&pinned_frac) {
        return Err(format!("{what}.pinned_frac must be in 0..=1"));
    }
    let (end, rate) = (num("end_s")?, num("rate_per_s")?);
    let mut t_now = start;
    for _ in 0..count {
        let at = match arrival {
            "batch" => start,
            "uniform" => {
                let end = end.ok_or_else(|| format!("{what}: arrival \"uniform\" needs end_s"))?;
                if !(end.is_finite() && end >= start) {
                    return Err(format!("{what}.end_s must be >= start_s"));
                }
                start + (end - start) * rng.next_f64()
            }
            "poisson" => {
                let r =
                    rate.ok_or_else(|| format!("{what}: arrival \"poisson\" needs rate_per_s"))?;
                let r = finite_pos(r, &format!("{what}.rate_per_s"))?;
                t_now += -(1.0 - rng.next_f64()).ln() / r;
                t_now
            }
            other => {
                return Err(format!(
                    "{what}.arrival: unknown '{other}' (batch, uniform, poisson)"
                ))
            }
        };
        let home = homes[rng.below(homes.len() as u64) as usize];
        let work_s = work.sample(rng).max(1e-3);
        let mem_bytes = mb_to_bytes(mem.sample(rng), &format!("{what}.mem_mb"))?;
        let pinned = rng.next_f64() < pinned_frac;
        jobs.push(JobSpec {
            at_s: at,
            home,
            work_s,
            mem_bytes,
            pinned,
            auto: true,
            avoid: Vec::new(),
        });
    }
    Ok(())
}

fn build(raw: Raw, default_name: &str) -> Result<Scenario, String> {
    // Nodes.
    let mut nodes = Vec::new();
    for (i, r) in raw.nodes.iter().enumerate() {
        let what = format!("nodes[{i}]");
        if r.count == 0 || r.count + nodes.len() as u64 > MAX_NODES {
            return Err(format!("{what}.count must be 1..={MAX_NODES} in all"));
        }
        let speed = finite_pos(r.speed, &format!("{what}.speed"))?;
        if r.cpus == 0 || r.cpus > 4096 {
            return Err(format!("{what}.cpus must be 1..=4096"));
        }
        let mem_bytes = mb_to_bytes(r.mem_mb, &format!("{what}.mem_mb"))?;
        if mem_bytes == 0 {
            return Err(format!("{what}.mem_mb must be > 0"));
        }
        for _ in 0..r.count {
            nodes.push(NodeSpec {
                speed,
                cpus: r.cpus,
                mem_bytes,
            });
        }
    }
    if nodes.is_empty() {
        return Err("no [[nodes]]: a scenario needs at least one node".into());
    }
    let n = nodes.len() as u32;

    // Jobs.
    let mut rng = SplitMix64::new(raw.seed.unwrap_or(1));
    let mut jobs = Vec::new();
    for (i, r) in raw.jobs.iter().enumerate() {
        let what = format!("jobs[{i}]");
        if r.node == 0 || r.node > n {
            return Err(format!("{what}.node {} is not a node (1-{n})", r.node));
        }
        if r.count == 0 || r.count + jobs.len() as u64 > MAX_JOBS {
            return Err(format!("{what}.count must be 1..={MAX_JOBS} in all"));
        }
        if let Some(a) = r.avoid.iter().find(|&&a| a == 0 || a > n) {
            return Err(format!("{what}.avoid: {a} is not a node (1-{n})"));
        }
        let at = finite_nonneg(r.at, &format!("{what}.at"))?;
        let work_s = finite_pos(r.work_s, &format!("{what}.work_s"))?;
        let mem_bytes = mb_to_bytes(r.mem_mb, &format!("{what}.mem_mb"))?;
        for _ in 0..r.count {
            jobs.push(JobSpec {
                at_s: at,
                home: r.node,
                work_s,
                mem_bytes,
                pinned: r.pinned,
                auto: r.auto,
                avoid: r.avoid.clone(),
            });
        }
    }
    for (i, t) in raw.generate.iter().enumerate() {
        generate(t, i, n, &mut rng, &mut jobs)?;
    }
    if jobs.is_empty() {
        return Err("no jobs: give [[jobs]] or [[generate]]".into());
    }

    let mut s = Scenario::new(raw.name.as_deref().unwrap_or(default_name), nodes, jobs);
    s.description = raw.description.unwrap_or_default();

    // Network, gossip, load, memory.
    let net = raw.network.unwrap_or_default();
    if let Some(mb) = net.link_mb_per_s {
        s.link_bytes_per_sec = finite_pos(mb, "network.link_mb_per_s")? * MIB;
    }
    if let Some(ms) = net.move_overhead_ms {
        s.move_overhead_ms = finite_nonneg(ms, "network.move_overhead_ms")?;
    }
    let g = raw.gossip.unwrap_or_default();
    if let Some(p) = g.period_ms {
        if !(10..=3_600_000).contains(&p) {
            return Err("gossip.period_ms must be 10..=3600000".into());
        }
        s.gossip.period_ms = p;
    }
    if let Some(f) = g.fanout {
        if !(1..=64).contains(&f) {
            return Err("gossip.fanout must be 1..=64".into());
        }
        s.gossip.fanout = f;
    }
    if let Some(w) = g.window {
        if !(1..=4096).contains(&w) {
            return Err("gossip.window must be 1..=4096".into());
        }
        s.gossip.window = w;
    }
    if let Some(e) = g.entries_per_message {
        if e > 4096 {
            return Err("gossip.entries_per_message must be 0..=4096".into());
        }
        s.gossip.entries_per_message = e;
    }
    if let Some(w) = g.warm_start {
        s.gossip.warm_start = w;
    }
    if let Some(tau) = raw.load.unwrap_or_default().average_tau_ms {
        s.load_tau_ms = finite_nonneg(tau, "load.average_tau_ms")?;
    }
    if let Some(p) = raw.memory.unwrap_or_default().swap_penalty {
        s.swap_penalty = finite_nonneg(p, "memory.swap_penalty")?;
    }
    if let Some(m) = raw.max_time_s {
        s.max_time_s = Some(finite_pos(m, "max_time_s")?);
    }

    if s.gossip.window as u64 * s.nodes.len() as u64 > 20_000_000 {
        return Err("gossip.window x nodes must be <= 20,000,000 (the windows' memory)".into());
    }

    // Balance: tick_ms plus any mosix_balance::Params field.
    if let Some(mut b) = raw.balance {
        if let Some(v) = b.remove("tick_ms") {
            let t = v.as_integer().ok_or("balance.tick_ms must be an integer")?;
            if !(10..=3_600_000).contains(&t) {
                return Err("balance.tick_ms must be 10..=3600000".into());
            }
            s.tick_ms = t as u64;
        }
        for k in ["link_bytes_per_sec", "move_overhead_ms"] {
            if b.contains_key(k) {
                return Err(format!("balance.{k}: set the link in [network] instead"));
            }
        }
        let p: Params = toml::Value::Table(b)
            .try_into()
            .map_err(|e: toml::de::Error| format!("[balance]: {}", e.message().trim()))?;
        for (v, what) in [
            (p.residency_per_cost, "residency_per_cost"),
            (p.gain_threshold, "gain_threshold"),
            (p.min_cpu_share, "min_cpu_share"),
            (p.mem_reserve_frac, "mem_reserve_frac"),
            (p.choice_slack, "choice_slack"),
            (p.send_prob_scale, "send_prob_scale"),
        ] {
            finite_nonneg(v, &format!("balance.{what}"))?;
        }
        if p.gain_threshold >= 1.0 || p.mem_reserve_frac >= 1.0 {
            return Err("balance.gain_threshold and mem_reserve_frac must be < 1".into());
        }
        s.params = p;
    }

    // Events.
    for (i, e) in raw.events.iter().enumerate() {
        let what = format!("events[{i}]");
        let at_s = finite_nonneg(e.at, &format!("{what}.at"))?;
        let list = match (&e.node, &e.nodes) {
            (Some(x), None) => parse_ranges(&x.to_string(), n, &format!("{what}.node"))?,
            (None, Some(r)) => parse_ranges(r, n, &format!("{what}.nodes"))?,
            _ => return Err(format!("{what}: give node = N or nodes = \"A-B\"")),
        };
        let kind = match e.action.as_str() {
            "leave" => EventKind::Leave {
                grace_s: finite_nonneg(e.grace_s.unwrap_or(10.0), &format!("{what}.grace_s"))?,
            },
            "return" => {
                if e.grace_s.is_some() {
                    return Err(format!("{what}: grace_s is for action = \"leave\""));
                }
                EventKind::Return
            }
            other => return Err(format!("{what}.action: unknown '{other}' (leave, return)")),
        };
        for node in list {
            s.events.push(NodeEvent {
                at_s,
                node,
                kind: kind.clone(),
            });
        }
    }
    s.events.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_scenario(text, "t").unwrap_err().to_string()
    }

    #[test]
    fn minimal_and_defaults() {
        let s = parse_scenario(
            "[[nodes]]\ncount = 4\n[[jobs]]\nnode = 1\ncount = 8\nwork_s = 20\n",
            "faq",
        )
        .unwrap();
        assert_eq!(s.name, "faq");
        assert_eq!(s.nodes.len(), 4);
        assert_eq!(s.jobs.len(), 8);
        assert_eq!(s.jobs[0].mem_bytes, 16 << 20);
        assert_eq!(s.tick_ms, mosix_balance::TICK_MS);
    }

    #[test]
    fn one_line_errors() {
        let e = err("[[nodes]]\nsped = 2\n");
        assert!(e.starts_with(":2:1: unknown field `sped`"), "{e}");
        assert!(!e.contains('\n'));
        assert_eq!(
            err("[[nodes]]\n[[jobs]]\nnode = 5\nwork_s = 1\n"),
            ": jobs[0].node 5 is not a node (1-1)"
        );
        assert_eq!(
            err("[[nodes]]\nspeed = -1\n"),
            ": nodes[0].speed must be a positive number (got -1)"
        );
        assert_eq!(
            err(""),
            ": no [[nodes]]: a scenario needs at least one node"
        );
        let e = err("[[nodes]]\n[[generate]]\ncount = 3\nwork_s = { dist = \"gauss\" }\n");
        assert!(e.contains("unknown dist 'gauss'"), "{e}");
        let e = err("[[nodes]]\n[[generate]]\ncount = 3\nhomes = \"1-9\"\n");
        assert!(e.contains("outside nodes 1-1"), "{e}");
        let e = err("[[nodes]]\n[[jobs]]\nnode=1\nwork_s=1\n[balance]\ngain_treshold = 0.1\n");
        assert!(
            e.starts_with(": [balance]: unknown field `gain_treshold`"),
            "{e}"
        );
        let e = err("[[nodes]]\n[[jobs]]\nnode=1\nwork_s=1\n[[events]]\nat = 1\nnode = 1\naction = \"explode\"\n");
        assert!(e.contains("unknown 'explode'"), "{e}");
        assert!(err("[[nodes]]\ncount = 99999999999\n").contains("count"));
        assert!(err("x = [").starts_with(":1:"));
    }

    #[test]
    fn generation_is_deterministic() {
        let text = "seed = 3\n[[nodes]]\ncount = 10\n[[generate]]\ncount = 100\narrival = \"poisson\"\nrate_per_s = 10\nhomes = \"1-3\"\nwork_s = { dist = \"pareto\", alpha = 1.1, min = 1, max = 1000 }\nmem_mb = { dist = \"uniform\", min = 1, max = 10 }\n";
        let a = parse_scenario(text, "g").unwrap();
        let b = parse_scenario(text, "g").unwrap();
        assert_eq!(a, b);
        assert!(a.jobs.iter().all(|j| (1..=3).contains(&j.home)));
        assert!(a.jobs.iter().all(|j| (1.0..=1000.0).contains(&j.work_s)));
        assert!(a.jobs.windows(2).all(|w| w[0].at_s <= w[1].at_s));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_ranges("1-3, 5", 9, "x").unwrap(), vec![1, 2, 3, 5]);
        assert_eq!(parse_ranges("all", 2, "x").unwrap(), vec![1, 2]);
        assert!(parse_ranges("0-3", 9, "x").is_err());
        assert!(parse_ranges("3-1", 9, "x").is_err());
        assert!(parse_ranges("a", 9, "x").is_err());
    }
}
