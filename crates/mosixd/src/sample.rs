//! Load sampling: runnable processes, utilisation, memory, process count, and CPU speed.
//!
//! Two scopes: the whole host (/proc), or the cgroup this daemon runs in (the testbed makes
//! one cgroup per node; cgroup v1 `cpu`/`cpuacct`/`memory` or cgroup v2, detected at run
//! time from /proc/self/cgroup and /proc/self/mountinfo). The daemon's own threads are never
//! counted as load.

use crate::config::LoadScope;
use anyhow::{bail, Context, Result};
use mosix_proto::{LoadVector, ProtocolVersion};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Time constant of the runnable-process average.
const LOAD_TAU: Duration = Duration::from_secs(1);

/// Where the cgroup files of this daemon are.
#[derive(Debug, Clone, Default)]
pub struct CgroupPaths {
    /// cgroup v2 directory (all controllers), if the daemon is in a v2 hierarchy with them.
    pub v2: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub memory: Option<PathBuf>,
}

enum Scope {
    Host,
    Cgroup(CgroupPaths),
}

/// Samples this node's load vector; call [`Sampler::sample`] periodically.
pub struct Sampler {
    scope: Scope,
    speed: f64,
    cpus: u32,
    proto: ProtocolVersion,
    avg_runnable: f64,
    last: Option<(Instant, u64)>,
    util: f64,
    ncpu: f64,
    own_tids: HashSet<u32>,
    own_tids_at: Option<Instant>,
}

impl Sampler {
    /// `cpus`: the configured number of CPUs, else found with [`detect_cpus`].
    pub fn new(
        scope: LoadScope,
        speed: f64,
        cpus: Option<u32>,
        proto: ProtocolVersion,
    ) -> Result<Sampler> {
        let scope = match scope {
            LoadScope::Host => Scope::Host,
            LoadScope::Cgroup => Scope::Cgroup(detect_cgroup()?),
        };
        let ncpu = host_cpus();
        let cpus = cpus.unwrap_or_else(|| detect_cpus(&scope, ncpu)).max(1);
        Ok(Sampler {
            scope,
            speed,
            cpus,
            proto,
            avg_runnable: 0.0,
            last: None,
            util: 0.0,
            ncpu: f64::from(ncpu),
            own_tids: HashSet::new(),
            own_tids_at: None,
        })
    }

    /// The number of CPUs this node publishes.
    pub fn cpus(&self) -> u32 {
        self.cpus
    }

    pub fn cgroup_paths(&self) -> Option<&CgroupPaths> {
        match &self.scope {
            Scope::Cgroup(c) => Some(c),
            Scope::Host => None,
        }
    }

    /// Takes one sample and returns the current load vector. Unreadable files give zeros,
    /// never an error: a half-visible node is better than a silent one.
    pub fn sample(&mut self, flags: u32) -> LoadVector {
        let now = Instant::now();
        if self
            .own_tids_at
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(5))
        {
            self.own_tids = own_tids();
            self.own_tids_at = Some(now);
        }
        let (runnable, procs, busy_ns, allot, mem_total, mem_free) = match &self.scope {
            Scope::Host => {
                let (running, _) = host_loadavg().unwrap_or((1, 0));
                // nr_running counts this thread, which is running while it reads.
                let runnable = running.saturating_sub(1);
                let (total, free) = host_meminfo().unwrap_or((0, 0));
                (
                    runnable,
                    host_procs(),
                    host_busy_ns().unwrap_or(0),
                    self.ncpu,
                    total,
                    free,
                )
            }
            Scope::Cgroup(c) => {
                let tids = cgroup_tids(c);
                let runnable = tids
                    .iter()
                    .filter(|t| !self.own_tids.contains(t) && task_running(**t))
                    .count() as u32;
                let procs = cgroup_procs(c).saturating_sub(1);
                let allot = cgroup_allotment(c).unwrap_or(self.ncpu);
                let (total, free) = cgroup_memory(c);
                (
                    runnable,
                    procs,
                    cgroup_busy_ns(c).unwrap_or(0),
                    allot,
                    total,
                    free,
                )
            }
        };
        if let Some((t0, b0)) = self.last {
            let dt = now.duration_since(t0).as_secs_f64();
            if dt > 0.0 {
                let u = (busy_ns.saturating_sub(b0) as f64 / 1e9) / (dt * allot.max(0.01));
                self.util = u.clamp(0.0, 1.0);
                let a = 1.0 - (-dt / LOAD_TAU.as_secs_f64()).exp();
                self.avg_runnable += (runnable as f64 - self.avg_runnable) * a;
            }
        } else {
            self.avg_runnable = runnable as f64;
        }
        self.last = Some((now, busy_ns));
        let r2 = |x: f64| (x * 100.0).round() / 100.0;
        const MIB: u64 = 1 << 20;
        LoadVector {
            load: r2(self.avg_runnable / (self.speed * f64::from(self.cpus))),
            runnable: r2(self.avg_runnable),
            util: r2(self.util),
            speed: self.speed,
            cpus: self.cpus,
            mem_total: mem_total / MIB * MIB,
            mem_free: mem_free / MIB * MIB,
            procs,
            proto: self.proto,
            flags,
        }
    }
}

/// CPUs this process may run on (affinity mask and cgroup quota, as the standard library
/// reads them).
fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
}

/// The node's CPUs when the configuration does not say: the host's for scope `host`; for
/// scope `cgroup` the cgroup's CPU quota rounded up (a quota of 1.5 CPUs runs two
/// processes at once), at most the host's.
fn detect_cpus(scope: &Scope, host: u32) -> u32 {
    match scope {
        Scope::Host => host,
        Scope::Cgroup(c) => match cgroup_allotment(c) {
            Some(a) if a.is_finite() && a > 0.0 => (a.ceil() as u32).clamp(1, host.max(1)),
            _ => host,
        },
    }
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn own_tids() -> HashSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// (nr_running, nr_threads) from /proc/loadavg.
fn host_loadavg() -> Option<(u32, u32)> {
    let s = read(Path::new("/proc/loadavg"))?;
    let f = s.split_whitespace().nth(3)?;
    let (a, b) = f.split_once('/')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn host_procs() -> u32 {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
                .count() as u32
        })
        .unwrap_or(0)
        .saturating_sub(1)
}

/// Busy CPU time of the whole host, nanoseconds.
fn host_busy_ns() -> Option<u64> {
    let s = read(Path::new("/proc/stat"))?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is included in user).
    let idle = v[3] + v[4];
    let total: u64 = v.iter().take(8).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((total - idle) * (1_000_000_000 / hz))
}

/// (MemTotal, MemAvailable) in bytes.
fn host_meminfo() -> Option<(u64, u64)> {
    let s = read(Path::new("/proc/meminfo"))?;
    let get = |k: &str| -> Option<u64> {
        let l = s.lines().find(|l| l.starts_with(k))?;
        Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some((get("MemTotal:")?, get("MemAvailable:").or(get("MemFree:"))?))
}

fn task_running(tid: u32) -> bool {
    let Some(s) = read(Path::new(&format!("/proc/{tid}/stat"))) else {
        return false;
    };
    // The state follows the last ')' (the command name may contain anything).
    s.rfind(')')
        .and_then(|i| s[i + 1..].split_whitespace().next())
        .is_some_and(|st| st == "R")
}

fn ids_in(p: &Path) -> Vec<u32> {
    read(p)
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn cgroup_tids(c: &CgroupPaths) -> Vec<u32> {
    if let Some(v2) = &c.v2 {
        return ids_in(&v2.join("cgroup.threads"));
    }
    c.cpu
        .as_ref()
        .or(c.cpuacct.as_ref())
        .map(|d| ids_in(&d.join("tasks")))
        .unwrap_or_default()
}

fn cgroup_procs(c: &CgroupPaths) -> u32 {
    let d = c.v2.as_ref().or(c.cpu.as_ref()).or(c.cpuacct.as_ref());
    d.map_or(0, |d| ids_in(&d.join("cgroup.procs")).len() as u32)
}

/// CPUs this cgroup may use (quota / period), if limited.
fn cgroup_allotment(c: &CgroupPaths) -> Option<f64> {
    if let Some(v2) = &c.v2 {
        let s = read(&v2.join("cpu.max"))?;
        let mut it = s.split_whitespace();
        let q = it.next()?;
        let p: f64 = it.next()?.parse().ok()?;
        if q == "max" {
            return None;
        }
        return Some(q.parse::<f64>().ok()? / p);
    }
    let d = c.cpu.as_ref()?;
    let q: i64 = read(&d.join("cpu.cfs_quota_us"))?.trim().parse().ok()?;
    let p: f64 = read(&d.join("cpu.cfs_period_us"))?.trim().parse().ok()?;
    (q > 0).then(|| q as f64 / p)
}

fn cgroup_busy_ns(c: &CgroupPaths) -> Option<u64> {
    if let Some(v2) = &c.v2 {
        let s = read(&v2.join("cpu.stat"))?;
        let l = s.lines().find(|l| l.starts_with("usage_usec"))?;
        return Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1000);
    }
    let d = c.cpuacct.as_ref()?;
    read(&d.join("cpuacct.usage"))?.trim().parse().ok()
}

/// (total, free) bytes of the cgroup, bounded by the host's.
fn cgroup_memory(c: &CgroupPaths) -> (u64, u64) {
    let (host_total, host_free) = host_meminfo().unwrap_or((0, 0));
    let num = |p: PathBuf| read(&p).and_then(|s| s.trim().parse::<u64>().ok());
    let (limit, usage) = if let Some(v2) = &c.v2 {
        (num(v2.join("memory.max")), num(v2.join("memory.current")))
    } else if let Some(m) = &c.memory {
        (
            num(m.join("memory.limit_in_bytes")),
            num(m.join("memory.usage_in_bytes")),
        )
    } else {
        (None, None)
    };
    match (limit, usage) {
        (Some(l), Some(u)) if l < host_total => (l, l.saturating_sub(u).min(host_free)),
        _ => (host_total, host_free),
    }
}

/// Finds this process's cgroup directories (v1 cpu/cpuacct/memory, or v2).
pub fn detect_cgroup() -> Result<CgroupPaths> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let mi =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mounts = parse_mountinfo(&mi);
    let mut out = CgroupPaths::default();
    for line in cg.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            // cgroup v2: only useful if it has the cpu controller enabled.
            if let Some(dir) = mounts
                .iter()
                .filter(|m| m.fstype == "cgroup2")
                .find_map(|m| m.resolve(path))
            {
                if read(&dir.join("cgroup.controllers"))
                    .is_some_and(|c| c.split_whitespace().any(|x| x == "cpu"))
                {
                    out.v2 = Some(dir);
                }
            }
            continue;
        }
        for ctrl in ctrls.split(',') {
            let dir = mounts
                .iter()
                .filter(|m| m.fstype == "cgroup" && m.opts.split(',').any(|o| o == ctrl))
                .find_map(|m| m.resolve(path));
            match ctrl {
                "cpu" => out.cpu = dir,
                "cpuacct" => out.cpuacct = dir,
                "memory" => out.memory = dir,
                _ => {}
            }
        }
    }
    if out.v2.is_some() {
        out.cpu = None;
        out.cpuacct = None;
        out.memory = None;
    } else if out.cpu.is_none() && out.cpuacct.is_none() {
        bail!(
            "load_scope = \"cgroup\" but this process is in no cgroup with the cpu controller \
             (neither v1 nor v2)"
        );
    }
    Ok(out)
}

struct Mount {
    root: String,
    point: String,
    fstype: String,
    opts: String,
}

impl Mount {
    fn resolve(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            path
        } else {
            path.strip_prefix(self.root.as_str())?
        };
        let p = PathBuf::from(&self.point).join(rel.trim_start_matches('/'));
        p.is_dir().then_some(p)
    }
}

fn parse_mountinfo(s: &str) -> Vec<Mount> {
    s.lines()
        .filter_map(|l| {
            let (a, b) = l.split_once(" - ")?;
            let f: Vec<&str> = a.split(' ').collect();
            let g: Vec<&str> = b.split(' ').collect();
            Some(Mount {
                root: f.get(3)?.to_string(),
                point: f.get(4)?.replace("\\040", " "),
                fstype: g.first()?.to_string(),
                opts: g.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// Reference rate of [`measure_speed`]'s loop for speed 1.0 (iterations per second).
const SPEED_REFERENCE: f64 = 400_000_000.0;

/// Measures this node's CPU speed by running a fixed integer loop for `dur` of wall time:
/// speed 1.0 is the reference machine. Under a CPU quota the result reflects the quota.
pub fn measure_speed(dur: Duration) -> f64 {
    let start = Instant::now();
    let mut iters: u64 = 0;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while start.elapsed() < dur {
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        iters += 100_000;
        std::hint::black_box(x);
    }
    let rate = iters as f64 / start.elapsed().as_secs_f64();
    ((rate / SPEED_REFERENCE) * 100.0).round().max(1.0) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_sample_is_sane() {
        let mut s =
            Sampler::new(LoadScope::Host, 2.0, None, mosix_proto::PROTOCOL_VERSION).unwrap();
        let a = s.sample(0);
        assert_eq!(a.cpus, host_cpus());
        let c = Sampler::new(
            LoadScope::Host,
            1.0,
            Some(16),
            mosix_proto::PROTOCOL_VERSION,
        )
        .unwrap()
        .sample(0);
        assert_eq!(c.cpus, 16, "the configured count wins");
        std::thread::sleep(Duration::from_millis(20));
        let b = s.sample(0);
        assert!(a.mem_total > 0 && a.mem_free <= a.mem_total);
        assert!(b.util >= 0.0 && b.util <= 1.0);
        assert!(b.procs > 0);
        assert_eq!(b.speed, 2.0);
    }

    #[test]
    fn mountinfo_resolves_cgroup_paths() {
        let mi = "30 25 0:26 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n\
                  31 25 0:27 /outer /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let m = parse_mountinfo(mi);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].opts, "rw,cpu");
        assert_eq!(m[1].root, "/outer");
        // resolve() checks the directory exists; "/" always does.
        let root = Mount {
            root: "/".into(),
            point: "/".into(),
            fstype: "cgroup".into(),
            opts: String::new(),
        };
        assert_eq!(root.resolve("/tmp"), Some(PathBuf::from("/tmp")));
        assert_eq!(m[1].resolve("/elsewhere/x"), None);
    }

    #[test]
    fn speed_is_positive() {
        assert!(measure_speed(Duration::from_millis(30)) > 0.0);
    }
}
