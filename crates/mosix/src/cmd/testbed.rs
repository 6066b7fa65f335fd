//! `mosix testbed`: a cluster of N nodes on one machine, for tests and benchmarks.
//!
//! Each node is a network namespace `mosixtb-N` with a veth (`mtbNh` on the host side) on the
//! bridge `mosixbr0` (10.213.0.0/24; node N is 10.213.0.N, the host 10.213.0.254), a cgroup
//! `mosixtb-N` (v1 cpu, cpuacct, memory; or v2) whose CPU quota makes the node's speed
//! proportional to `--speeds` and whose memory limit is `--mem`, and its own mosixd with its
//! own config (names and addresses of another instance: see [`instance`]). State lives in DIR (default /run/mosix-testbed): `secret`, `testbed.json`, and
//! `nN/` per node (mosix.toml, secret, node.key and nodes.keys (its own key and every node's
//! public key), mosixd.sock, mosixd.log, mosixd.pid, status.json).
//!
//! Everything made is named with those prefixes, so `down` (and `up`, which cleans first)
//! finds and removes leftovers even after a crash.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MAX_NODES: u32 = 250;

/// Which testbed of this machine: `MOSIX_TESTBED_INSTANCE` = 0 (default) .. 9. Each has its
/// own names (namespaces `mosixtbK-N`, links `mtKbNh`, bridge `mosixbrK`, cgroups
/// `mosixtbK-N`, subnet 10.213.K.0/24, state /run/mosix-testbedK; instance 0 keeps the
/// plain names), so that several test runs can each have a testbed at the same time.
pub fn instance() -> u32 {
    std::env::var("MOSIX_TESTBED_INSTANCE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|k| *k <= 9)
        .unwrap_or(0)
}

fn tag() -> String {
    match instance() {
        0 => String::new(),
        k => k.to_string(),
    }
}

fn ns_prefix() -> String {
    format!("mosixtb{}-", tag())
}
fn cg_prefix() -> String {
    ns_prefix()
}
fn link_prefix() -> String {
    match instance() {
        0 => "mtb".into(),
        k => format!("mt{k}b"),
    }
}
fn bridge() -> String {
    format!("mosixbr{}", instance())
}
/// The first three octets of the testbed's addresses.
pub fn subnet() -> String {
    format!("10.213.{}", instance())
}
fn host_ip() -> String {
    format!("{}.254", subnet())
}
fn default_dir() -> PathBuf {
    PathBuf::from(format!("/run/mosix-testbed{}", tag()))
}
const CFS_PERIOD_US: u64 = 100_000;
/// Port of every testbed node's Prometheus metrics (`metrics_listen` = its address).
pub const METRICS_PORT: u16 = 9464;

/// Run a cluster of N nodes on this machine (network namespaces, cgroups, one mosixd each).
///
/// Needs root. Node N is network namespace `mosixtb-N` at 10.213.0.N on bridge mosixbr0,
/// in cgroup `mosixtb-N` whose CPU quota makes its speed proportional to --speeds (the
/// fastest node gets one full CPU, all of them less if together they would want more CPUs
/// than the machine has) and whose memory limit is --mem. A node of --cpus C gets C times
/// that quota and publishes C CPUs. Each node serves Prometheus metrics at
/// http://10.213.0.N:9464/metrics.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    mosix testbed up --nodes 4 --speeds 1,1,2,3 --mem 1G\n  \
    mosix testbed up --nodes 3 --cpus 2,1,1\n  \
    curl -s http://10.213.0.2:9464/metrics | grep ^mosix_load\n  \
    mosix testbed exec 2 -- mosix status\n  \
    mosix testbed exec 2 -- awk 'BEGIN {for(i=0;i<100000000;i++);}'\n  \
    mosix testbed status\n  \
    mosix testbed down")]
pub struct Args {
    #[command(subcommand)]
    cmd: Sub,
}

#[derive(clap::Args, Clone)]
struct DirArg {
    /// Testbed state directory (default $MOSIX_TESTBED_DIR, else /run/mosix-testbed).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl DirArg {
    fn path(&self) -> PathBuf {
        self.dir
            .clone()
            .or_else(|| std::env::var_os("MOSIX_TESTBED_DIR").map(PathBuf::from))
            .unwrap_or_else(default_dir)
    }
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Create the testbed (after removing any leftovers) and wait until every node sees
    /// every other node up.
    Up(UpArgs),
    /// Run a command on node NODE: inside its network namespace and cgroup, with
    /// MOSIX_CONFIG and MOSIX_SOCKET set so that `mosix` talks to that node's mosixd.
    Exec {
        /// Node number.
        node: u32,
        #[command(flatten)]
        dir: DirArg,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<OsString>,
    },
    /// Show the testbed's nodes: namespace, daemon, cgroup limits, and what the daemon sees.
    Status {
        #[command(flatten)]
        dir: DirArg,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Stop node NODE's mosixd (SIGTERM, then SIGKILL after 10 s); the namespace stays.
    Stop {
        node: u32,
        #[command(flatten)]
        dir: DirArg,
        /// Kill with SIGKILL at once (a crash rather than a shutdown).
        #[arg(long)]
        kill: bool,
    },
    /// Crash node NODE: SIGKILL everything in it (its mosixd, the supervisors and guests
    /// it hosts, the jobs started there) and set its link down, as a power cut would.
    /// The namespace stays; `start` brings its link and its mosixd back.
    Crash {
        node: u32,
        #[command(flatten)]
        dir: DirArg,
    },
    /// Start node NODE's mosixd again (after `stop`). The environment is passed on.
    Start {
        node: u32,
        #[command(flatten)]
        dir: DirArg,
        /// Use this config file instead of the node's own (testing).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Remove every namespace, link, cgroup and process the testbed made (also after a
    /// crash, found by name prefix), and the state directory's contents.
    Down {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Benchmark the cluster layer: gossip traffic per node per second, time for a load
    /// change to reach every node, and mosixd's idle CPU and memory. Prints BENCH lines.
    /// Brings a testbed up and down for each size (replacing any testbed in DIR).
    Bench(BenchArgs),
    /// Benchmark migration: processes with 1, 64 and 512 MiB of touched memory, writing 0,
    /// 10 and 100 MiB/s to it, moved 1 -> 2 -> 3 -> 1 (leaving home, host to host, coming
    /// home): time stopped, total time against what the veth link's TCP bandwidth
    /// (measured in the same run, alternating) would take for its memory, pre-copy rounds.
    /// Prints BENCH lines.
    BenchMigration(super::benchmig::Args),
    /// Benchmark checkpoints: the time a 256 MiB job away is stopped for one (against a
    /// migration of it), its slowdown with a checkpoint every 0.1 minute (against no
    /// checkpoints, alternating runs), and the time from the death of its node to it
    /// running again. Prints BENCH lines. Brings a 3-node testbed up and down.
    BenchCheckpoint(super::benchckpt::Args),
    /// Benchmark: the cost of a call carried home (a process away using a file of its
    /// home through its deputy) against the same calls at home and the link's TCP
    /// bandwidth, measured in the same run; BENCH lines.
    BenchCalls(super::benchcalls::Args),
    /// Benchmark balancing: the FAQ experiment (8 CPU-bound jobs started on node 1 of 4),
    /// equal speeds then 1,1,2,3; makespan against the ideal (total work / total CPU
    /// capacity) and against no migration, measured in the same run. Prints BENCH lines.
    BenchBalance(super::benchmig::BalanceArgs),
    /// Benchmark families: the FAQ experiment as ONE command (a shell and its eight awk
    /// children) against the ideal and against eight separate mosruns; a fork in a
    /// migratable process against a plain one, and the time until its child is
    /// migratable; a pipe between two members on two nodes against the same pipe at home
    /// and the link's TCP bandwidth; all measured in the same run. Prints BENCH lines.
    BenchFamilies(super::benchfam::Args),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Cluster sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    nodes: Vec<u32>,
    /// Seconds of idle measurement (traffic, CPU, memory) per size.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Load changes timed per size (the median is printed).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// How the testbed's daemons are run.
#[derive(clap::Args, Clone)]
struct DaemonArgs {
    /// The mosixd binary (default: next to this mosix binary, else in PATH).
    #[arg(long, value_name = "PATH")]
    mosixd: Option<PathBuf>,
    /// Gossip interval of the daemons, milliseconds.
    #[arg(long, default_value_t = 500)]
    gossip_interval_ms: u64,
}

#[derive(clap::Args)]
struct UpArgs {
    /// Number of nodes (1..=250).
    #[arg(long, short)]
    nodes: u32,
    /// Relative CPU speeds, one per node (or one for all), e.g. 1,1,2,3.
    #[arg(long, value_delimiter = ',', value_name = "S,..")]
    speeds: Vec<f64>,
    /// CPUs per node, one per node (or one for all), e.g. 1,2,1,4: a node of C CPUs gets C
    /// times the CPU quota of a 1-CPU node of its speed, and its mosixd publishes C CPUs.
    #[arg(long, value_delimiter = ',', value_name = "C,..")]
    cpus: Vec<u32>,
    /// Memory limit per node, one per node (or one for all), e.g. 2G,2G,512M.
    #[arg(long, value_delimiter = ',', value_name = "SIZE,..")]
    mem: Vec<String>,
    #[command(flatten)]
    dir: DirArg,
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Do not wait for the cluster to converge.
    #[arg(long)]
    no_wait: bool,
}

/// What `up` made; read by the other subcommands.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Testbed {
    pub nodes: u32,
    pub speeds: Vec<f64>,
    /// CPUs per node (empty in a testbed.json of an older version: one each).
    #[serde(default)]
    pub cpus: Vec<u32>,
    pub mem: Vec<Option<u64>>,
    pub cgroup: CgroupMode,
    pub mosixd: PathBuf,
}

impl Testbed {
    /// Node `n`'s CPUs (1 if not recorded).
    pub fn cpus_of(&self, n: u32) -> u32 {
        self.cpus.get((n - 1) as usize).copied().unwrap_or(1).max(1)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    V1,
    V2,
}

pub fn run(a: Args) -> Result<i32> {
    match a.cmd {
        Sub::Up(u) => up(u),
        Sub::Exec { node, dir, cmd } => exec(&dir.path(), node, cmd),
        Sub::Status { dir, json } => status(&dir.path(), json),
        Sub::Stop { node, dir, kill } => {
            let d = dir.path();
            let tb = load(&d)?;
            check_node(&tb, node)?;
            stop_daemon(&d, node, kill)?;
            println!("node {node}: mosixd stopped");
            Ok(0)
        }
        Sub::Crash { node, dir } => {
            let d = dir.path();
            let tb = load(&d)?;
            check_node(&tb, node)?;
            let cgs = cgroup_dirs(tb.cgroup, node)?;
            let me = std::process::id() as i32;
            let mut n = 0;
            // Twice: a process may fork while the first pass runs.
            for _ in 0..2 {
                for cg in &cgs {
                    for p in pids_in(cg) {
                        if p != me {
                            kill(p, nix::sys::signal::Signal::SIGKILL);
                            n += 1;
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(node_dir(&d, node).join("mosixd.pid"));
            // Their connections close as they die (the others see them end, as they see a
            // crashed machine's peers time out); then the link goes.
            let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while cgs.iter().any(|cg| pids_in(cg).iter().any(|&p| p != me))
                && std::time::Instant::now() < end
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            // A dead machine answers nothing (not even "connection refused", which is
            // how the others tell a restarting mosixd from a dead node): its link goes
            // down until `start`.
            ip(&["link", "set", &format!("{}{node}h", link_prefix()), "down"])?;
            println!("node {node}: crashed ({n} processes killed, its link down)");
            Ok(0)
        }
        Sub::Start { node, dir, config } => {
            let d = dir.path();
            let tb = load(&d)?;
            check_node(&tb, node)?;
            let cgs = cgroup_dirs(tb.cgroup, node)?;
            // Up again after a crash (a no-op otherwise).
            ip(&["link", "set", &format!("{}{node}h", link_prefix()), "up"])?;
            let pid = start_daemon(&d, &tb, node, config.as_deref(), &cgs)?;
            println!("node {node}: mosixd started (pid {pid})");
            Ok(0)
        }
        Sub::Bench(b) => bench(b),
        Sub::BenchMigration(b) => super::benchmig::run(b),
        Sub::BenchCalls(b) => super::benchcalls::run(b),
        Sub::BenchCheckpoint(b) => super::benchckpt::run(b),
        Sub::BenchFamilies(b) => super::benchfam::run(b),
        Sub::BenchBalance(b) => super::benchmig::run_balance(b),
        Sub::Down { dir } => {
            let removed = cleanup(&dir.path())?;
            println!("testbed down: {removed}");
            Ok(0)
        }
    }
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the testbed needs root (network namespaces and cgroups)");
    }
    Ok(())
}

fn node_dir(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("n{n}"))
}

fn ns_name(n: u32) -> String {
    format!("{}{n}", ns_prefix())
}

pub(crate) fn load(dir: &Path) -> Result<Testbed> {
    let p = dir.join("testbed.json");
    let s = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "no testbed at {} (run `mosix testbed up` first)",
            dir.display()
        )
    })?;
    let tb: Testbed =
        serde_json::from_str(&s).with_context(|| format!("{} is damaged", p.display()))?;
    if tb.nodes == 0 || tb.nodes > MAX_NODES {
        bail!("{} is damaged (nodes = {})", p.display(), tb.nodes);
    }
    Ok(tb)
}

fn check_node(tb: &Testbed, n: u32) -> Result<()> {
    if n == 0 || n > tb.nodes {
        bail!("no node {n} in this testbed (nodes 1..{})", tb.nodes);
    }
    Ok(())
}

/// Parses a size like 512M, 2G, 1.5G, 1048576.
fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        Some('t' | 'T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("'{s}' is not a size (e.g. 512M, 2G)"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("size '{s}' must be positive");
    }
    let b = (v * mult as f64) as u64;
    if b < 16 << 20 {
        bail!("memory size '{s}' is too small (at least 16M: mosixd itself needs some)");
    }
    Ok(b)
}

fn per_node<T: Clone>(what: &str, v: Vec<T>, n: u32, default: T) -> Result<Vec<T>> {
    match v.len() {
        0 => Ok(vec![default; n as usize]),
        1 => Ok(vec![v[0].clone(); n as usize]),
        l if l == n as usize => Ok(v),
        l => bail!("--{what} has {l} values for {n} nodes (give one, or one per node)"),
    }
}

fn find_mosixd(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg.or_else(|| std::env::var_os("MOSIXD").map(PathBuf::from)) {
        if !p.is_file() {
            bail!("mosixd binary {} not found", p.display());
        }
        return Ok(std::fs::canonicalize(&p).unwrap_or(p));
    }
    if let Ok(me) = std::env::current_exe() {
        let sib = me.with_file_name("mosixd");
        if sib.is_file() {
            return Ok(sib);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("mosixd");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("cannot find the mosixd binary (give --mosixd PATH)")
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip_out(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

// ---------- cgroups ----------

struct CgMounts {
    mode: CgroupMode,
    /// v1: (controller, mount point); v2: ("", mount point).
    dirs: Vec<(&'static str, PathBuf)>,
}

fn cg_mounts() -> Result<CgMounts> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut v1: Vec<(&'static str, PathBuf)> = Vec::new();
    let mut v2: Option<PathBuf> = None;
    for l in mi.lines() {
        let Some((a, b)) = l.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = a.split(' ').collect();
        let g: Vec<&str> = b.split(' ').collect();
        let (Some(point), Some(fstype)) = (f.get(4), g.first()) else {
            continue;
        };
        let opts = g.get(2).copied().unwrap_or("");
        if *fstype == "cgroup" {
            for c in ["cpu", "cpuacct", "memory"] {
                if opts.split(',').any(|o| o == c) && !v1.iter().any(|(k, _)| *k == c) {
                    v1.push((c, PathBuf::from(point)));
                }
            }
        } else if *fstype == "cgroup2" {
            let p = PathBuf::from(point);
            let ctl = std::fs::read_to_string(p.join("cgroup.controllers")).unwrap_or_default();
            if ctl.split_whitespace().any(|c| c == "cpu") {
                v2 = Some(p);
            }
        }
    }
    if v1.iter().any(|(c, _)| *c == "cpu") {
        return Ok(CgMounts {
            mode: CgroupMode::V1,
            dirs: v1,
        });
    }
    if let Some(p) = v2 {
        return Ok(CgMounts {
            mode: CgroupMode::V2,
            dirs: vec![("", p)],
        });
    }
    bail!("no cgroup hierarchy with the cpu controller (neither v1 nor v2) is mounted")
}

/// The node's cgroup directories, one per hierarchy.
pub(crate) fn cgroup_dirs(mode: CgroupMode, n: u32) -> Result<Vec<PathBuf>> {
    let m = cg_mounts()?;
    if m.mode != mode {
        bail!("the cgroup layout changed since `testbed up`; run `mosix testbed down`");
    }
    let mut v: Vec<PathBuf> = m
        .dirs
        .iter()
        .map(|(_, p)| p.join(format!("{}{n}", cg_prefix())))
        .collect();
    v.dedup();
    Ok(v)
}

/// CPU time used so far by everything in each of `nodes`' cgroups (its mosixd, the
/// processes it hosts, its helpers), in nanoseconds (0 where it cannot be read): for
/// benchmarks. The testbed's state is read once for all of them.
pub(crate) fn nodes_cpu_ns<const N: usize>(dir: &Path, nodes: [u32; N]) -> [u64; N] {
    let Ok(tb) = load(dir) else {
        return [0; N];
    };
    nodes.map(|n| {
        let dirs = cgroup_dirs(tb.cgroup, n).unwrap_or_default();
        dirs.iter()
            .find_map(|c| {
                if let Ok(v) = std::fs::read_to_string(c.join("cpuacct.usage")) {
                    return v.trim().parse().ok();
                }
                let stat = std::fs::read_to_string(c.join("cpu.stat")).ok()?;
                stat.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|us| us * 1000)
            })
            .unwrap_or(0)
    })
}

/// Every testbed cgroup directory that exists, in every hierarchy.
fn all_testbed_cgroups() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(m) = cg_mounts() else {
        return out;
    };
    let mut roots: Vec<PathBuf> = m.dirs.into_iter().map(|(_, p)| p).collect();
    roots.dedup();
    for r in roots {
        if let Ok(rd) = std::fs::read_dir(&r) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&cg_prefix()) && e.path().is_dir() {
                    out.push(e.path());
                }
            }
        }
    }
    out
}

fn make_cgroups(mode: CgroupMode, n: u32, quota_us: u64, mem: Option<u64>) -> Result<()> {
    let m = cg_mounts()?;
    if mode == CgroupMode::V2 {
        let root = &m.dirs[0].1;
        // Enable the controllers for children (harmless if already on).
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory");
    }
    for (ctrl, root) in &m.dirs {
        let d = root.join(format!("{}{n}", cg_prefix()));
        if !d.is_dir() {
            std::fs::create_dir(&d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let w = |f: &str, v: String| -> Result<()> {
            std::fs::write(d.join(f), &v)
                .with_context(|| format!("cannot write {v} to {}", d.join(f).display()))
        };
        match (mode, *ctrl) {
            (CgroupMode::V1, "cpu") => {
                w("cpu.cfs_period_us", CFS_PERIOD_US.to_string())?;
                w("cpu.cfs_quota_us", quota_us.to_string())?;
            }
            (CgroupMode::V1, "memory") => {
                if let Some(b) = mem {
                    w("memory.limit_in_bytes", b.to_string())?;
                }
            }
            (CgroupMode::V2, _) => {
                w("cpu.max", format!("{quota_us} {CFS_PERIOD_US}"))?;
                if let Some(b) = mem {
                    w("memory.max", b.to_string())?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn pids_in(cg: &Path) -> Vec<i32> {
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

// ---------- processes ----------

fn pid_alive(pid: i32) -> bool {
    // A zombie is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

fn is_mosixd(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "mosixd")
}

fn kill(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

fn read_pid(dir: &Path, n: u32) -> Option<i32> {
    std::fs::read_to_string(node_dir(dir, n).join("mosixd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Starts node `n`'s mosixd in its namespace and cgroups, detached (own session), with its
/// output appended to nN/mosixd.log. Returns its pid.
fn start_daemon(
    dir: &Path,
    tb: &Testbed,
    n: u32,
    config: Option<&Path>,
    cgroups: &[PathBuf],
) -> Result<i32> {
    require_root()?;
    if let Some(p) = read_pid(dir, n).filter(|p| pid_alive(*p) && is_mosixd(*p)) {
        bail!("node {n}'s mosixd is already running (pid {p}); `mosix testbed stop {n}` first");
    }
    let nd = node_dir(dir, n);
    let cfg = config
        .map(Path::to_path_buf)
        .unwrap_or_else(|| nd.join("mosix.toml"));
    let ns = File::open(format!("/run/netns/{}", ns_name(n)))
        .with_context(|| format!("network namespace {} is missing", ns_name(n)))?;
    let mut procs: Vec<File> = Vec::new();
    for cg in cgroups {
        procs.push(
            std::fs::OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .with_context(|| format!("cgroup {} is missing", cg.display()))?,
        );
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(nd.join("mosixd.log"))
        .with_context(|| format!("cannot open {}", nd.join("mosixd.log").display()))?;
    let mut cmd = Command::new(&tb.mosixd);
    cmd.arg("--config")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let nsfd = ns.as_raw_fd();
    let cgfds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs in the forked child before exec and only makes raw system
    // calls (setsid, setns, write) on file descriptors the parent keeps open until spawn
    // returns; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || enter(nsfd, &cgfds, true));
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", tb.mosixd.display()))?;
    let pid = child.id() as i32;
    drop(ns);
    drop(procs);
    std::fs::write(nd.join("mosixd.pid"), format!("{pid}\n"))?;
    Ok(pid)
}

/// In the current process: optionally start a new session, enter the network namespace,
/// and join the cgroups (writing 0 to cgroup.procs moves the writer).
fn enter(nsfd: i32, cgfds: &[i32], new_session: bool) -> std::io::Result<()> {
    // SAFETY: plain system calls on valid, open descriptors; errors are checked.
    unsafe {
        if new_session && libc::setsid() < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::setns(nsfd, libc::CLONE_NEWNET) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for fd in cgfds {
            if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

fn stop_daemon(dir: &Path, n: u32, hard: bool) -> Result<()> {
    let Some(pid) = read_pid(dir, n).filter(|p| pid_alive(*p) && is_mosixd(*p)) else {
        bail!("node {n}'s mosixd is not running");
    };
    use nix::sys::signal::Signal;
    kill(
        pid,
        if hard {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        },
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) {
        if Instant::now() > deadline {
            kill(pid, Signal::SIGKILL);
        }
        if Instant::now() > deadline + Duration::from_secs(5) {
            bail!("node {n}'s mosixd (pid {pid}) does not die");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(node_dir(dir, n).join("mosixd.pid"));
    Ok(())
}

// ---------- up / down ----------

fn up(a: UpArgs) -> Result<i32> {
    require_root()?;
    let n = a.nodes;
    if n == 0 || n > MAX_NODES {
        bail!("--nodes must be between 1 and {MAX_NODES}");
    }
    let speeds = per_node("speeds", a.speeds, n, 1.0)?;
    if speeds.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        bail!("--speeds must be positive numbers");
    }
    let cpus = per_node("cpus", a.cpus, n, 1)?;
    if cpus.iter().any(|c| *c == 0 || *c > 1024) {
        bail!("--cpus must be numbers from 1 to 1024");
    }
    let mem: Vec<Option<u64>> = per_node("mem", a.mem, n, String::new())?
        .iter()
        .map(|s| {
            if s.is_empty() {
                Ok(None)
            } else {
                parse_size(s).map(Some)
            }
        })
        .collect::<Result<_>>()?;
    let mosixd = find_mosixd(a.daemon.mosixd)?;
    let dir = a.dir.path();
    let cgm = cg_mounts()?;

    let left = cleanup(&dir)?;
    if left != "nothing to remove" {
        eprintln!("testbed: removed leftovers: {left}");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tb = Testbed {
        nodes: n,
        speeds: speeds.clone(),
        cpus,
        mem: mem.clone(),
        cgroup: cgm.mode,
        mosixd,
    };
    std::fs::write(dir.join("testbed.json"), serde_json::to_vec_pretty(&tb)?)?;
    // A fresh random secret shared by the nodes.
    let mut key = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .context("cannot read /dev/urandom")?;
    let secret = dir.join("secret");
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode_600()
            .open(&secret)?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(f, "{hex}")?;
    }
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;

    if let Err(e) = build(&dir, &tb, a.daemon.gossip_interval_ms) {
        let _ = cleanup(&dir);
        return Err(e.context("testbed up failed (everything made was removed)"));
    }
    if !a.no_wait {
        wait_converged(&dir, n, Duration::from_secs(60))?;
    }
    println!(
        "testbed up: {n} nodes at {net}.1..{net}.{n}, state in {}",
        dir.display(),
        net = subnet()
    );
    Ok(0)
}

trait Mode600 {
    fn mode_600(&mut self) -> &mut Self;
}
impl Mode600 for std::fs::OpenOptions {
    fn mode_600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

fn build(dir: &Path, tb: &Testbed, gossip_ms: u64) -> Result<()> {
    let n = tb.nodes;
    let br = bridge();
    ip(&["link", "add", &br, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{}/24", host_ip()), "dev", &br])?;
    ip(&["link", "set", &br, "up"])?;
    let max_speed = tb.speeds.iter().cloned().fold(0.0, f64::max);
    // A CPU of the fastest node is a whole host CPU, unless the nodes together would want
    // more CPUs than this machine has: then every quota shrinks alike, so that the nodes
    // never compete for the host's CPUs and their speeds stay in the asked proportions.
    let host_cpus = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1) as f64;
    let wanted: f64 = (1..=n)
        .map(|i| f64::from(tb.cpus_of(i)) * tb.speeds[(i - 1) as usize] / max_speed)
        .sum();
    let scale = (host_cpus / wanted).min(1.0);
    // Every node has its own key; the list of public keys is the same on every node.
    let keys = (1..=n)
        .map(|_| mosix_proto::channel::PrivateKey::generate())
        .collect::<Result<Vec<_>, _>>()?;
    let mut ring = mosix_proto::channel::KeyRing::default();
    for (i, k) in (1..).zip(&keys) {
        ring.insert(i, k.public())?;
    }
    for i in 1..=n {
        let ns = ns_name(i);
        let h = format!("{}{i}h", link_prefix());
        let p = format!("{}{i}n", link_prefix());
        ip(&["netns", "add", &ns])?;
        ip(&["link", "add", &h, "type", "veth", "peer", "name", &p])?;
        ip(&["link", "set", &p, "netns", &ns])?;
        ip(&["link", "set", &h, "master", &br, "up"])?;
        ip(&["-n", &ns, "link", "set", &p, "name", "eth0"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}.{i}/24", subnet()),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;

        let speed = tb.speeds[(i - 1) as usize];
        let cpus = tb.cpus_of(i);
        let quota = ((CFS_PERIOD_US as f64) * f64::from(cpus) * speed / max_speed * scale)
            .round()
            .max(1000.0) as u64;
        make_cgroups(tb.cgroup, i, quota, tb.mem[(i - 1) as usize])?;

        let nd = node_dir(dir, i);
        std::fs::create_dir_all(&nd)?;
        let shared = dir.join("shared");
        std::fs::create_dir_all(&shared)?;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777))?;
        // Each node has its own copy of the cluster secret, as real nodes do.
        std::fs::copy(dir.join("secret"), nd.join("secret"))?;
        std::fs::set_permissions(nd.join("secret"), std::fs::Permissions::from_mode(0o600))?;
        std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode_600()
            .open(nd.join("node.key"))?
            .write_all(keys[(i - 1) as usize].to_hex().as_bytes())?;
        std::fs::set_permissions(nd.join("node.key"), std::fs::Permissions::from_mode(0o600))?;
        std::fs::write(nd.join("nodes.keys"), ring.to_text())?;
        std::fs::set_permissions(
            nd.join("nodes.keys"),
            std::fs::Permissions::from_mode(0o644),
        )?;
        let cfg = format!(
            "# mosix testbed node {i} of {n}\n\
             node = {i}\n\
             secret_file = \"{secret}\"\n\
             private_key_file = \"{key}\"\n\
             public_keys_file = \"{keys}\"\n\
             state_dir = \"{state}\"\n\
             control_socket = \"{sock}\"\n\
             speed = {speed:?}\n\
             cpus = {cpus}\n\
             load_scope = \"cgroup\"\n\
             gossip_interval_ms = {gossip_ms}\n\
             down_after_ms = {down}\n\
             # Prometheus metrics on the node's own address\n\
             metrics_listen = \"{net}.{i}:{METRICS_PORT}\"\n\
             # veth moves bytes faster than lz4 compresses them\n\
             compression = \"none\"\n\
             # every node sees this directory alike (one machine)\n\
             shared_paths = [\"{shared}\"]\n\n\
             [[map]]\n\
             node = 1\n\
             address = \"{net}.1\"\n\
             count = {n}\n",
            secret = nd.join("secret").display(),
            key = nd.join("node.key").display(),
            keys = nd.join("nodes.keys").display(),
            state = nd.display(),
            sock = nd.join("mosixd.sock").display(),
            down = (gossip_ms * 6).max(3000),
            shared = dir.join("shared").display(),
            net = subnet(),
        );
        std::fs::write(nd.join("mosix.toml"), cfg)?;
    }
    for i in 1..=n {
        let cgs = cgroup_dirs(tb.cgroup, i)?;
        start_daemon(dir, tb, i, None, &cgs)?;
    }
    Ok(())
}

/// Waits until every node's daemon answers and sees all `n` nodes up.
fn wait_converged(dir: &Path, n: u32, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let mut ok = 0;
        let mut why = String::new();
        for i in 1..=n {
            match super::status::fetch(&node_dir(dir, i).join("mosixd.sock")) {
                Ok(st) if st.active_nodes() == n as usize => ok += 1,
                Ok(st) => why = format!("node {i} sees {} of {n} up", st.active_nodes()),
                Err(e) => why = format!("node {i}: {e:#}"),
            }
        }
        if ok == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the testbed did not converge within {}s ({why}); logs in {}/nN/mosixd.log",
                limit.as_secs(),
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes everything a testbed made (found by name), returning a summary.
fn cleanup(dir: &Path) -> Result<String> {
    require_root()?;
    use nix::sys::signal::Signal;
    let mut removed: Vec<String> = Vec::new();
    // 1. Processes: daemons from pid files, everything in testbed cgroups and namespaces.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix('n').and_then(|x| x.parse::<u32>().ok()) {
                if let Some(p) = read_pid(dir, n).filter(|p| pid_alive(*p) && is_mosixd(*p)) {
                    kill(p, Signal::SIGKILL);
                }
            }
        }
    }
    let cgs = all_testbed_cgroups();
    let namespaces: Vec<String> = ip_out(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&ns_prefix()))
        .map(String::from)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut pids: Vec<i32> = cgs.iter().flat_map(|c| pids_in(c)).collect();
        for ns in &namespaces {
            pids.extend(
                ip_out(&["netns", "pids", ns])
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok()),
            );
        }
        let me = std::process::id() as i32;
        pids.retain(|p| *p != me && pid_alive(*p));
        if pids.is_empty() {
            break;
        }
        for p in &pids {
            kill(*p, Signal::SIGKILL);
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} of the testbed do not die");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // 2. Cgroups (empty now; rmdir may need a moment after the last exit).
    let mut ncg = 0;
    for cg in &cgs {
        let mut ok = false;
        for _ in 0..100 {
            if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !ok {
            bail!("cannot remove cgroup {}", cg.display());
        }
        ncg += 1;
    }
    if ncg > 0 {
        removed.push(format!("{ncg} cgroups"));
    }
    // 3. Namespaces, links, bridge.
    for ns in &namespaces {
        ip(&["netns", "del", ns])?;
    }
    if !namespaces.is_empty() {
        removed.push(format!("{} namespaces", namespaces.len()));
    }
    let mut nl = 0;
    for l in ip_out(&["-o", "link", "show"]).lines() {
        // "12: mtb3h@if11: <...>"
        let Some(name) = l.split(':').nth(1).map(|s| s.trim()) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if (name.starts_with(&link_prefix()) && name.ends_with('h')) || name == bridge() {
            // A veth may already be gone with its namespace peer.
            if ip(&["link", "del", name]).is_ok() {
                nl += 1;
            }
        }
    }
    if nl > 0 {
        removed.push(format!("{nl} links"));
    }
    // 4. Our files in the state directory.
    let mut nf = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours_dir = name
                .strip_prefix('n')
                .is_some_and(|x| x.parse::<u32>().is_ok());
            if ours_dir && e.path().is_dir() {
                std::fs::remove_dir_all(e.path())?;
                nf += 1;
            } else if name == "secret" || name == "testbed.json" {
                std::fs::remove_file(e.path())?;
                nf += 1;
            }
        }
        if dir == default_dir() {
            let _ = std::fs::remove_dir(dir);
        }
    }
    if nf > 0 {
        removed.push(format!("{nf} state entries in {}", dir.display()));
    }
    Ok(if removed.is_empty() {
        "nothing to remove".to_string()
    } else {
        removed.join(", ")
    })
}

// ---------- exec / status ----------

fn exec(dir: &Path, n: u32, cmd: Vec<OsString>) -> Result<i32> {
    require_root()?;
    let tb = load(dir)?;
    check_node(&tb, n)?;
    let ns = File::open(format!("/run/netns/{}", ns_name(n)))
        .with_context(|| format!("network namespace {} is missing", ns_name(n)))?;
    let mut fds = Vec::new();
    for cg in cgroup_dirs(tb.cgroup, n)? {
        fds.push(
            std::fs::OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .with_context(|| format!("cgroup {} is missing", cg.display()))?,
        );
    }
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // This process is single-threaded: entering here is entering for the command.
    enter(ns.as_raw_fd(), &raw, false).context("cannot enter the node")?;
    let nd = node_dir(dir, n);
    let err = Command::new(&cmd[0])
        .args(&cmd[1..])
        .env("MOSIX_CONFIG", nd.join("mosix.toml"))
        .env("MOSIX_SOCKET", nd.join("mosixd.sock"))
        .env("MOSIX_NODE", n.to_string())
        .env("MOSIX_TESTBED_DIR", dir)
        .exec();
    bail!("cannot run {}: {err}", cmd[0].to_string_lossy())
}

#[derive(Serialize)]
struct NodeReport {
    node: u32,
    address: String,
    namespace: bool,
    daemon_pid: Option<i32>,
    speed: f64,
    cpus: u32,
    cpu_quota: Option<f64>,
    mem_limit: Option<u64>,
    /// Nodes this node's mosixd sees up (None if it does not answer).
    sees_up: Option<usize>,
}

fn status(dir: &Path, json: bool) -> Result<i32> {
    let tb = load(dir)?;
    let nss = ip_out(&["netns", "list"]);
    let mut out = Vec::new();
    for i in 1..=tb.nodes {
        let cgs = cgroup_dirs(tb.cgroup, i).unwrap_or_default();
        let mut quota = None;
        for c in &cgs {
            if let (Ok(q), Ok(p)) = (
                std::fs::read_to_string(c.join("cpu.cfs_quota_us")),
                std::fs::read_to_string(c.join("cpu.cfs_period_us")),
            ) {
                if let (Ok(q), Ok(p)) = (q.trim().parse::<f64>(), p.trim().parse::<f64>()) {
                    quota = (q > 0.0).then(|| q / p);
                }
            }
            if let Ok(s) = std::fs::read_to_string(c.join("cpu.max")) {
                let mut it = s.split_whitespace();
                if let (Some(q), Some(p)) = (it.next(), it.next()) {
                    if let (Ok(q), Ok(p)) = (q.parse::<f64>(), p.parse::<f64>()) {
                        quota = Some(q / p);
                    }
                }
            }
        }
        out.push(NodeReport {
            node: i,
            address: format!("{}.{i}", subnet()),
            namespace: nss
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&ns_name(i))),
            daemon_pid: read_pid(dir, i).filter(|p| pid_alive(*p) && is_mosixd(*p)),
            speed: tb.speeds.get((i - 1) as usize).copied().unwrap_or(1.0),
            cpus: tb.cpus_of(i),
            cpu_quota: quota,
            mem_limit: tb.mem.get((i - 1) as usize).copied().flatten(),
            sees_up: super::status::fetch(&node_dir(dir, i).join("mosixd.sock"))
                .ok()
                .map(|s| s.active_nodes()),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    println!(
        "testbed in {} ({} nodes, cgroup {:?})",
        dir.display(),
        tb.nodes,
        tb.cgroup
    );
    println!(
        "{:>4}  {:<12} {:<5} {:>8} {:>6} {:>4} {:>6} {:>8} {:>8}",
        "NODE", "ADDRESS", "NETNS", "MOSIXD", "SPEED", "CPUS", "QUOTA", "MEM", "SEES-UP"
    );
    for r in out {
        println!(
            "{:>4}  {:<12} {:<5} {:>8} {:>6.2} {:>4} {:>6} {:>8} {:>8}",
            r.node,
            r.address,
            if r.namespace { "yes" } else { "NO" },
            r.daemon_pid.map_or("down".into(), |p| p.to_string()),
            r.speed,
            r.cpus,
            r.cpu_quota
                .map_or("-".into(), |q| format!("{:.0}%", q * 100.0)),
            r.mem_limit.map_or("-".into(), super::status::human),
            r.sees_up
                .map_or("-".into(), |u| format!("{u}/{}", tb.nodes)),
        );
    }
    Ok(0)
}

// ---------- bench ----------

fn bench(b: BenchArgs) -> Result<i32> {
    require_root()?;
    let dir = b.dir.path();
    let mosixd = find_mosixd(b.daemon.mosixd.clone())?;
    let me = std::env::current_exe().context("cannot find the mosix binary")?;
    let gossip_s = b.daemon.gossip_interval_ms as f64 / 1000.0;
    bench_speeds(&b, &dir, &mosixd, &me)?;
    for &n in &b.nodes {
        if n < 2 {
            bail!("bench needs at least 2 nodes");
        }
        up(UpArgs {
            nodes: n,
            speeds: vec![],
            cpus: vec![],
            mem: vec![],
            dir: b.dir.clone(),
            daemon: DaemonArgs {
                mosixd: Some(mosixd.clone()),
                ..b.daemon.clone()
            },
            no_wait: false,
        })?;
        let r = bench_one(&dir, &me, n, &b, gossip_s);
        let _ = cleanup(&dir);
        r?;
    }
    Ok(0)
}

/// Do the CPU quotas emulate speeds? Two nodes of speeds 1 and 2 measure themselves.
fn bench_speeds(b: &BenchArgs, dir: &Path, mosixd: &Path, me: &Path) -> Result<()> {
    up(UpArgs {
        nodes: 2,
        speeds: vec![1.0, 2.0],
        cpus: vec![],
        mem: vec![],
        dir: b.dir.clone(),
        daemon: DaemonArgs {
            mosixd: Some(mosixd.to_path_buf()),
            ..b.daemon.clone()
        },
        no_wait: true,
    })?;
    let measure = |n: u32| -> Result<f64> {
        let o = Command::new(me)
            .args(["testbed", "exec", &n.to_string(), "--dir"])
            .arg(dir)
            .arg("--")
            .arg(mosixd)
            .arg("--measure-speed")
            .output()?;
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<f64>()
            .with_context(|| format!("mosixd --measure-speed on node {n} failed"))
    };
    let r = (|| -> Result<(f64, f64)> { Ok((measure(1)?, measure(2)?)) })();
    let _ = cleanup(dir);
    let (s1, s2) = r?;
    println!(
        "BENCH testbed_measured_speed_ratio {:.2} x vs configured={:.2}",
        s2 / s1.max(0.01),
        s2 / s1.max(0.01) / 2.0
    );
    Ok(())
}

fn sock(dir: &Path, n: u32) -> PathBuf {
    node_dir(dir, n).join("mosixd.sock")
}

/// (utime+stime ticks, VmRSS bytes) of a process.
fn proc_usage(pid: i32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = st
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?
        * 1024;
    Some((ticks, rss))
}

fn bench_one(dir: &Path, me: &Path, n: u32, b: &BenchArgs, gossip_s: f64) -> Result<()> {
    use super::status::fetch;
    // Idle: traffic, CPU, memory.
    let pids: Vec<i32> = (1..=n).filter_map(|i| read_pid(dir, i)).collect();
    let sent = |dir: &Path| -> Result<(u64, u64)> {
        let mut bytes = 0;
        let mut dgrams = 0;
        for i in 1..=n {
            let g = fetch(&sock(dir, i))?.gossip;
            bytes += g.bytes_sent;
            dgrams += g.datagrams_sent;
        }
        Ok((bytes, dgrams))
    };
    let cpu0: u64 = pids
        .iter()
        .filter_map(|p| proc_usage(*p))
        .map(|u| u.0)
        .sum();
    let (b0, d0) = sent(dir)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(b.seconds));
    let (b1, d1) = sent(dir)?;
    let dt = t0.elapsed().as_secs_f64();
    let usage: Vec<(u64, u64)> = pids.iter().filter_map(|p| proc_usage(*p)).collect();
    let cpu1: u64 = usage.iter().map(|u| u.0).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let per_node_bps = (b1 - b0) as f64 / dt / n as f64;
    let per_node_dps = (d1 - d0) as f64 / dt / n as f64;
    let cpu_pct = (cpu1 - cpu0) as f64 / hz / dt / pids.len().max(1) as f64 * 100.0;
    let rss = usage.iter().map(|u| u.1).sum::<u64>() as f64 / usage.len().max(1) as f64;
    println!("BENCH gossip_bytes_per_node_{n} {per_node_bps:.0} B/s");
    println!("BENCH gossip_datagrams_per_node_{n} {per_node_dps:.1} datagrams/s");
    println!("BENCH mosixd_idle_cpu_{n} {cpu_pct:.2} %");
    println!("BENCH mosixd_rss_{n} {:.1} MiB", rss / (1 << 20) as f64);

    // Load change: a CPU-bound process on node 2; time until node 2 publishes it, and until
    // every other node sees it.
    let mut local = Vec::new();
    let mut spread = Vec::new();
    for _ in 0..b.repeat {
        // Start from quiet: node 2 idle as seen by every node.
        wait_all(dir, n, Duration::from_secs(30), |l| l < 0.25)?;
        let mut hog = Command::new(me)
            .args(["testbed", "exec", "2", "--dir"])
            .arg(dir)
            .args([
                "--",
                "timeout",
                "60",
                "awk",
                "BEGIN{for(i=0;i<4000000000;i++);}",
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the load")?;
        let t0 = Instant::now();
        let r = (|| -> Result<(f64, f64)> {
            let end = t0 + Duration::from_secs(30);
            loop {
                let s = fetch(&sock(dir, 2))?;
                if s.nodes[1].load.as_ref().is_some_and(|l| l.runnable >= 0.5) {
                    break;
                }
                if Instant::now() > end {
                    bail!("node 2 never published its load");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let t1 = t0.elapsed().as_secs_f64();
            wait_all(dir, n, Duration::from_secs(30), |l| l >= 0.5)?;
            Ok((t1, t0.elapsed().as_secs_f64() - t1))
        })();
        kill(hog.id() as i32, nix::sys::signal::Signal::SIGTERM);
        let _ = hog.wait();
        // Kill the awk too (timeout forwards SIGTERM, but be sure).
        if let Ok(cgs) = cgroup_dirs(load(dir)?.cgroup, 2) {
            for c in cgs {
                for p in pids_in(&c) {
                    if !is_mosixd(p) {
                        kill(p, nix::sys::signal::Signal::SIGKILL);
                    }
                }
            }
        }
        let (l, s) = r?;
        local.push(l);
        spread.push(s);
    }
    let (l, s) = (
        super::benchmig::median(local),
        super::benchmig::median(spread),
    );
    println!("BENCH load_change_sampled_{n} {l:.3} s");
    println!(
        "BENCH load_change_spread_{n} {s:.3} s vs gossip_interval={:.2}",
        s / gossip_s
    );
    Ok(())
}

/// Waits until every node other than 2 sees node 2's runnable count satisfy `cond`.
fn wait_all(dir: &Path, n: u32, limit: Duration, cond: impl Fn(f64) -> bool) -> Result<()> {
    let end = Instant::now() + limit;
    let mut pending: Vec<u32> = (1..=n).filter(|i| *i != 2).collect();
    while !pending.is_empty() {
        pending.retain(|i| {
            !super::status::fetch(&sock(dir, *i)).is_ok_and(|s| {
                s.nodes[1].load.as_ref().is_some_and(|l| {
                    s.nodes[1].state == mosix_proto::NodeState::Up && cond(l.runnable)
                })
            })
        });
        if Instant::now() > end {
            bail!("nodes {pending:?} never saw node 2's load change");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("1K").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn per_node_values() {
        assert_eq!(per_node("s", vec![2.0], 3, 1.0).unwrap(), vec![2.0; 3]);
        assert_eq!(per_node("s", vec![], 2, 1.0).unwrap(), vec![1.0; 2]);
        assert!(per_node("s", vec![1.0, 2.0], 3, 1.0).is_err());
    }
}
