//! `mosix testbed bench-migration`: how fast a process moves between two testbed nodes,
//! against the veth link's own TCP bandwidth measured in the same run (alternating), and
//! against the optimum: the longer of the link's time for its memory and a copy of its
//! memory into fresh memory (the destination's least work; on these VMs fresh memory can
//! be slower than the link).
//! Also the hidden helpers it runs on the nodes: a memory toucher and a TCP sink/source.

use anyhow::{bail, Context, Result};
use mosix_proto::control::{Client, Request, Response};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Touched memory of the moved process, MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,64,512")]
    sizes: Vec<u64>,
    /// MiB per second the moved process writes to its memory while it moves (sizes of 64
    /// MiB and more; the others only at 0).
    #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
    dirty: Vec<f64>,
    /// Moves of each kind per size and rate; medians are printed.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Testbed state directory (a 3-node testbed is brought up and down in it).
    #[arg(long, default_value = "/run/mosix-bench-migration")]
    dir: PathBuf,
}

/// Runs `mosix testbed ARGS --dir DIR` (this program, `me`), failing with its stderr.
pub fn testbed(me: &Path, dir: &Path, args: &[&str]) -> Result<()> {
    let o = Command::new(me)
        .arg("testbed")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .output()?;
    if !o.status.success() {
        bail!(
            "testbed {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// The median (NaN for no values).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub fn run(a: Args) -> Result<i32> {
    on_nodes("bench-migration", &a.dir, 3, |me, dir| measure(me, dir, &a))
}

/// [`on_nodes`] with 2 nodes.
pub fn on_two_nodes(
    what: &str,
    dir: &Path,
    body: impl FnOnce(&Path, &Path) -> Result<()>,
) -> Result<i32> {
    on_nodes(what, dir, 2, body)
}

/// Runs `body` (given the mosix binary and the testbed directory) with an `n`-node
/// testbed up in `dir`, which is brought down after, whatever happened.
pub fn on_nodes(
    what: &str,
    dir: &Path,
    n: u32,
    body: impl FnOnce(&Path, &Path) -> Result<()>,
) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root (it brings a testbed up)");
    }
    let me = std::env::current_exe().context("cannot find the mosix binary")?;
    let tb = |args: &[&str]| testbed(&me, dir, args);
    tb(&["up", "--nodes", &n.to_string()])?;
    let r = body(&me, dir);
    let _ = tb(&["down"]);
    r?;
    Ok(0)
}

pub fn on_node(me: &Path, dir: &Path, n: u32) -> Command {
    let mut c = Command::new(me);
    c.args(["testbed", "exec", &n.to_string(), "--dir"])
        .arg(dir)
        .arg("--")
        .arg(me);
    c
}

/// TCP bandwidth from node 1 to node 2 over the veth pair, bytes/s.
pub fn link_bandwidth(me: &Path, dir: &Path, mib: u64) -> Result<f64> {
    let mut sink = on_node(me, dir, 2)
        .arg("__net-sink")
        .arg(format!("{}.2:5499", super::testbed::subnet()))
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(sink.stdout.take().context("sink stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?; // "listening"
    let o = on_node(me, dir, 1)
        .arg("__net-source")
        .arg(format!("{}.2:5499", super::testbed::subnet()))
        .arg(mib.to_string())
        .output()?;
    let _ = sink.wait();
    if !o.status.success() {
        bail!("net source: {}", String::from_utf8_lossy(&o.stderr));
    }
    let secs: f64 = String::from_utf8_lossy(&o.stdout).trim().parse()?;
    Ok((mib << 20) as f64 / secs)
}

/// The kinds of move measured, each a leg of the round 1 -> 2 -> 3 -> 1.
const KINDS: [(&str, u32); 3] = [("leave_home", 2), ("host_to_host", 3), ("come_home", 0)];

/// Seconds to copy `mib` MiB into memory never touched before (the kernel gives and
/// zeroes each page on its first write, as for a restored process's memory).
fn fresh_copy_secs(mib: u64) -> f64 {
    let bytes = (mib << 20) as usize;
    let src = vec![7u8; bytes];
    let t = Instant::now();
    let mut fresh = vec![0u8; bytes];
    fresh.copy_from_slice(&src);
    std::hint::black_box(&fresh);
    t.elapsed().as_secs_f64()
}

fn measure(me: &Path, dir: &Path, a: &Args) -> Result<()> {
    let sock = dir.join("n1/mosixd.sock");
    // Only the moves asked for here.
    mosctl_all(me, dir, 3, "stay")?;
    let mut link = vec![];
    let mut link_cpu: [Vec<f64>; 2] = [vec![], vec![]];
    for &mib in &a.sizes {
        for &rate in a.dirty.iter().filter(|&&r| r == 0.0 || mib >= 64) {
            let mut job = on_node(me, dir, 1)
                .args([
                    "run",
                    me.to_str().unwrap_or("mosix"),
                    "__touch",
                    &mib.to_string(),
                    "--dirty",
                    &rate.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut out = BufReader::new(job.stdout.take().context("job stdout")?);
            let mut line = String::new();
            out.read_line(&mut line)?;
            let pid: i32 = line
                .trim()
                .strip_prefix("ready ")
                .context("toucher did not start")?
                .parse()?;
            // Per kind: (total s, frozen ms, rounds, ratio to the link, ratio to the
            // optimum, CPU ms of the source node, of the destination node).
            let mut got: Vec<Vec<[f64; 7]>> = vec![vec![]; KINDS.len()];
            for _ in 0..a.repeat {
                // The references first, alternating with the moves: the link, and a copy
                // into fresh memory (what the destination must do at least: on these VMs
                // it can be slower than the link).
                let cpu_before = super::testbed::nodes_cpu_ns(dir, [1, 2]);
                let bw = link_bandwidth(me, dir, mib.max(64))?;
                let cpu_after = super::testbed::nodes_cpu_ns(dir, [1, 2]);
                // CPU the link's own TCP took at each end, per GiB sent (what a move's
                // bytes cost there before anything of ours).
                let gib = (mib.max(64) as f64) / 1024.0;
                for i in 0..2 {
                    link_cpu[i].push(cpu_after[i].saturating_sub(cpu_before[i]) as f64 / 1e6 / gib);
                }
                link.push(bw);
                let fresh = fresh_copy_secs(mib);
                let optimum = ((mib << 20) as f64 / bw).max(fresh);
                for (k, &(_, to)) in KINDS.iter().enumerate() {
                    // The moves go round 1 -> 2 -> 3 -> 1 (0: home, node 1).
                    let from = if k == 0 { 1 } else { KINDS[k - 1].1 };
                    let nodes = [from, if to == 0 { 1 } else { to }];
                    let cpu = || super::testbed::nodes_cpu_ns(dir, nodes);
                    let cpu0 = cpu();
                    // (A move just answered may still be finishing at its source.)
                    let mut tries = 0;
                    let (r, secs) = loop {
                        let mut c = Client::connect(&sock, Duration::from_secs(300))?;
                        let t = Instant::now();
                        let r = c.call(&Request::Migrate { pid, to });
                        let secs = t.elapsed().as_secs_f64();
                        match r {
                            Err(e) if e.to_string().contains("middle of a move") && tries < 50 => {
                                tries += 1;
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            r => break (r?, secs),
                        }
                    };
                    if tries > 0 {
                        eprintln!("(move to {to} busy {tries} times first)");
                    }
                    let Response::Migrated {
                        frozen_ms, rounds, ..
                    } = r
                    else {
                        bail!("unexpected answer {r:?}");
                    };
                    let cpu1 = cpu();
                    let ms = |i: usize| cpu1[i].saturating_sub(cpu0[i]) as f64 / 1e6;
                    let ideal = (mib << 20) as f64 / bw;
                    got[k].push([
                        secs,
                        frozen_ms as f64,
                        rounds.len() as f64,
                        ideal / secs,
                        optimum / secs,
                        ms(0),
                        ms(1),
                    ]);
                }
            }
            if let Some(mut w) = job.stdin.take() {
                let _ = w.write_all(b"q\n");
            }
            let _ = job.wait();
            let tag = format!("migration_{mib}MiB_dirty{rate}MiBps");
            for (k, &(kind, _)) in KINDS.iter().enumerate() {
                let col = |i: usize| got[k].iter().map(|x| x[i]).collect();
                println!("BENCH {tag}_{kind}_frozen {:.1} ms", median(col(1)));
                println!(
                    "BENCH {tag}_{kind}_total {:.1} ms vs link={:.3}",
                    median(col(0)) * 1e3,
                    median(col(3))
                );
                println!(
                    "BENCH {tag}_{kind}_total_vs_optimum {:.1} ms vs optimum={:.3}",
                    median(col(0)) * 1e3,
                    median(col(4))
                );
                println!("BENCH {tag}_{kind}_rounds {:.0} rounds", median(col(2)));
                // CPU of each end's node during the move (its cgroup: mosixd, helpers, the
                // process), against the move's time: which end the move waits for.
                let share = |i: usize| median(got[k].iter().map(|x| x[i] / (x[0] * 1e3)).collect());
                println!(
                    "BENCH {tag}_{kind}_source_cpu {:.0} ms vs total={:.2}",
                    median(col(5)),
                    share(5)
                );
                println!(
                    "BENCH {tag}_{kind}_destination_cpu {:.0} ms vs total={:.2}",
                    median(col(6)),
                    share(6)
                );
            }
        }
    }
    println!("BENCH veth_tcp_bandwidth {:.3} GB/s", median(link) / 1e9);
    // The CPU the link's own TCP takes per GiB at each end: with a node's CPU quota it
    // bounds what a move can reach (docs/migration.md, "Why not 0.8 of the link").
    for (i, side) in ["sender", "receiver"].iter().enumerate() {
        println!(
            "BENCH veth_tcp_{side}_cpu {:.0} ms/GiB",
            median(link_cpu[i].clone())
        );
    }
    Ok(())
}

/// `__touch MIB [--dirty R]`: touch MIB MiB of memory with random data, print "ready
/// PID", then (with R > 0) write R MiB/s to it, one word per page, page after page, until
/// a line arrives on stdin; exit.
pub fn touch(mib: u64, dirty: f64) -> Result<i32> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let n = (mib << 20) as usize / 8;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let v: Arc<Vec<AtomicU64>> = Arc::new(
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                AtomicU64::new(x)
            })
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = (dirty > 0.0).then(|| {
        let (v, stop) = (v.clone(), stop.clone());
        std::thread::spawn(move || {
            // 100 ticks a second, each writing its share of pages.
            let per_tick = ((dirty * 256.0 / 100.0).round() as usize).max(1);
            let pages = v.len() / 512;
            let mut i = 0usize;
            let t0 = Instant::now();
            let mut tick = 0u32;
            while !stop.load(Ordering::Relaxed) && pages > 0 {
                for _ in 0..per_tick {
                    v[i * 512].fetch_add(1, Ordering::Relaxed);
                    i = (i + 1) % pages;
                }
                tick += 1;
                let due = t0 + Duration::from_millis(10) * tick;
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        })
    });
    println!("ready {}", std::process::id());
    std::io::stdout().flush()?;
    let mut s = String::new();
    std::io::stdin().read_line(&mut s)?;
    stop.store(true, Ordering::Relaxed);
    if let Some(w) = writer {
        let _ = w.join();
    }
    std::hint::black_box(&v);
    Ok(0)
}

/// `__net-sink ADDR`: accept one TCP connection and read it to the end.
pub fn net_sink(addr: &str) -> Result<i32> {
    let l = std::net::TcpListener::bind(addr)?;
    println!("listening");
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    let mut buf = vec![0u8; 1 << 20];
    while s.read(&mut buf)? > 0 {}
    Ok(0)
}

/// `__net-source ADDR MIB`: send MIB MiB and print the seconds it took.
pub fn net_source(addr: &str, mib: u64) -> Result<i32> {
    let mut s = std::net::TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        s.write_all(&buf)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut b = [0u8; 1];
    let _ = s.read(&mut b);
    println!("{}", t.elapsed().as_secs_f64());
    Ok(0)
}

#[derive(clap::Args)]
pub struct BalanceArgs {
    /// Jobs started on node 1.
    #[arg(long, default_value_t = 8)]
    jobs: u32,
    /// Job lengths to run: seconds each job takes alone on node 1.
    #[arg(long, value_delimiter = ',', default_value = "3,9")]
    job_secs: Vec<f64>,
    /// Rounds per setting and job length (medians are printed).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Settings to run: equal (4 nodes of speed 1), 1123 (speeds 1,1,2,3), cpus (CPUs
    /// 2,1,1,1 of speed 1).
    #[arg(long, value_delimiter = ',', default_value = "equal,1123,cpus")]
    settings: Vec<String>,
    /// Testbed state directory (brought up and down for each setting).
    #[arg(long, default_value = "/run/mosix-bench-balance")]
    dir: PathBuf,
    /// The mosixd binary the nodes run (default: next to this mosix), e.g. an older build
    /// to compare with.
    #[arg(long, value_name = "PATH")]
    mosixd: Option<PathBuf>,
}

/// One node's CPU capacity in the testbed: its cgroup quota, in host CPUs.
pub(crate) fn quotas(me: &Path, dir: &Path) -> Result<Vec<f64>> {
    let o = Command::new(me)
        .args(["testbed", "status", "--json", "--dir"])
        .arg(dir)
        .output()?;
    let st: serde_json::Value =
        serde_json::from_slice(&o.stdout).context("testbed status --json")?;
    Ok(st
        .as_array()
        .context("testbed status: no nodes")?
        .iter()
        .map(|n| n["cpu_quota"].as_f64().unwrap_or(1.0))
        .collect())
}

/// The jobs (mawk processes, running, not held by a move) in each node's cgroup.
fn jobs_per_node(dir: &Path, nodes: u32) -> Vec<u32> {
    let Ok(tb) = super::testbed::load(dir) else {
        return vec![0; nodes as usize];
    };
    (1..=nodes)
        .map(|n| {
            let dirs = super::testbed::cgroup_dirs(tb.cgroup, n).unwrap_or_default();
            let Some(cg) = dirs.first() else { return 0 };
            super::testbed::pids_in(cg)
                .into_iter()
                .filter(|p| {
                    let comm = std::fs::read_to_string(format!("/proc/{p}/comm"));
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat"));
                    comm.is_ok_and(|c| c.trim() == "mawk")
                        && stat.is_ok_and(|s| {
                            s.rfind(')')
                                .and_then(|i| s[i + 1..].split_whitespace().next())
                                .is_some_and(|st| st == "R" || st == "S")
                        })
                })
                .count() as u32
        })
        .collect()
}

/// The best placement of `jobs` equal CPU-bound jobs on nodes of these capacities (each
/// job where it would finish soonest given those placed before it), nodes numbered from 1.
pub fn placement(jobs: u32, capacity: &[f64]) -> Vec<u32> {
    let mut count = vec![0u32; capacity.len()];
    (0..jobs)
        .map(|_| {
            let best = (0..capacity.len())
                .min_by(|&a, &b| {
                    let f = |i: usize| f64::from(count[i] + 1) / capacity[i].max(1e-9);
                    f(a).total_cmp(&f(b))
                })
                .unwrap_or(0);
            count[best] += 1;
            best as u32 + 1
        })
        .collect()
}

/// Whether `count` is a balanced spread of `jobs` over nodes of these capacities: every
/// node has its share of the jobs, rounded down or up.
pub fn balanced(count: &[u32], capacity: &[f64]) -> bool {
    let total: f64 = capacity.iter().sum();
    let jobs: u32 = count.iter().sum();
    total > 0.0
        && count.iter().zip(capacity).all(|(&c, &cap)| {
            let share = f64::from(jobs) * cap / total;
            f64::from(c) >= share.floor() - 1e-9 && f64::from(c) <= share.ceil() + 1e-9
        })
}

/// Successful migrations sent by all nodes so far (their metrics).
fn migrations_done(nodes: u32) -> Result<f64> {
    let mut sum = 0.0;
    for n in 1..=nodes {
        let addr = format!(
            "{}.{n}:{}",
            super::testbed::subnet(),
            super::testbed::METRICS_PORT
        );
        let mut s = std::net::TcpStream::connect_timeout(
            &addr.parse().context("metrics address")?,
            Duration::from_secs(5),
        )
        .with_context(|| format!("metrics of node {n}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        sum += body
            .lines()
            .filter(|l| l.starts_with("mosix_migrations_total{") && l.contains("outcome=\"ok\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(sum)
}

/// What one round measured.
pub(crate) struct Round {
    pub(crate) makespan: f64,
    /// Seconds from the start until the jobs were spread (None: never).
    spread: Option<f64>,
    migrations: f64,
}

/// Runs `jobs` awk jobs of `iters` iterations started on node 1 at once, watching where
/// they run; returns the makespan, the time to a balanced spread, and the migrations.
/// With `place`, job i is started with `mosrun -r place[i]` (placed at once, no
/// balancing needed).
pub(crate) fn faq_round(
    me: &Path,
    dir: &Path,
    jobs: u32,
    iters: u64,
    capacity: &[f64],
    place: Option<&[u32]>,
) -> Result<Round> {
    let prog = format!("BEGIN {{ for (i = 0; i < {iters}; i++) s += i % 7; print s }}");
    let nodes = capacity.len() as u32;
    let m0 = migrations_done(nodes)?;
    let t = Instant::now();
    let mut kids: Vec<_> = (0..jobs as usize)
        .map(|i| {
            let mut c = on_node(me, dir, 1);
            c.arg("run");
            if let Some(to) = place.and_then(|p| p.get(i)).filter(|n| **n != 1) {
                c.args(["-r", &to.to_string()]);
            }
            c.args(["mawk", &prog])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let mut spread = None;
    let mut running = kids.len();
    while running > 0 {
        if spread.is_none() {
            let c = jobs_per_node(dir, nodes);
            if c.iter().sum::<u32>() == jobs && balanced(&c, capacity) {
                spread = Some(t.elapsed().as_secs_f64());
            }
        }
        running = 0;
        for k in kids.iter_mut() {
            match k.try_wait()? {
                Some(st) if !st.success() => bail!("a job failed: {st}"),
                Some(_) => {}
                None => running += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(if spread.is_none() {
            20
        } else {
            100
        }));
    }
    let makespan = t.elapsed().as_secs_f64();
    Ok(Round {
        makespan,
        spread,
        migrations: migrations_done(nodes)? - m0,
    })
}

pub(crate) fn mosctl_all(me: &Path, dir: &Path, nodes: u32, cmd: &str) -> Result<()> {
    for n in 1..=nodes {
        let o = on_node(me, dir, n).args(["mosctl", cmd]).output()?;
        if !o.status.success() {
            bail!("mosctl {cmd}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    Ok(())
}

/// `mosix testbed bench-balance`: the FAQ experiment (8 CPU-bound jobs started on node 1
/// of 4) with equal speeds, speeds 1,1,2,3 and CPUs 2,1,1,1, for jobs of 3 s and 9 s (alone
/// on node 1): makespan against the ideal and against no migration, the time until the
/// jobs are spread, and migrations per job, all measured in the same run.
pub fn run_balance(a: BalanceArgs) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-balance needs root (it brings a testbed up)");
    }
    let me = std::env::current_exe().context("cannot find the mosix binary")?;
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    for name in &a.settings {
        let extra: &[&str] = match name.as_str() {
            "equal" => &[],
            "1123" => &["--speeds", "1,1,2,3"],
            "cpus" => &["--cpus", "2,1,1,1"],
            other => bail!("unknown setting '{other}' (equal, 1123, cpus)"),
        };
        let mut up = Command::new(&me);
        up.args(["testbed", "up", "--nodes", "4", "--dir"])
            .arg(&a.dir)
            .args(extra);
        if let Some(d) = &a.mosixd {
            up.arg("--mosixd").arg(d);
        }
        let o = up.output()?;
        if !o.status.success() {
            bail!("testbed up: {}", String::from_utf8_lossy(&o.stderr));
        }
        let r = bench_setting(&me, &a, name, host_cpus);
        let _ = Command::new(&me)
            .args(["testbed", "down", "--dir"])
            .arg(&a.dir)
            .output();
        r?;
    }
    Ok(0)
}

fn bench_setting(me: &Path, a: &BalanceArgs, name: &str, host_cpus: f64) -> Result<()> {
    let quota = quotas(me, &a.dir)?;
    let nodes = quota.len() as u32;
    // How fast one job runs alone on node 1 (the reference for the job lengths).
    mosctl_all(me, &a.dir, nodes, "stay")?;
    let probe = 20_000_000u64;
    let one = faq_round(me, &a.dir, 1, probe, &quota, None)?.makespan;
    let place = placement(a.jobs, &quota);
    let rate = probe as f64 / one;
    let capacity = quota.iter().sum::<f64>().min(host_cpus);
    for (i, &secs) in a.job_secs.iter().enumerate() {
        let iters = (rate * secs) as u64;
        // Work of one job in CPU-seconds (node 1 has quota[0] of a CPU).
        let w = secs * quota[0];
        let ideal =
            (a.jobs as f64 * w / capacity).max(w / quota.iter().cloned().fold(0.0, f64::max));
        let (mut bal, mut spread, mut migs, mut nomig, mut placed) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..a.rounds {
            // The references, alternating with the balanced runs: the jobs placed at once
            // where they belong (what no balancer can beat on this machine now), and, for
            // the shortest jobs only (it takes jobs x their length), no migration at all.
            mosctl_all(me, &a.dir, nodes, "stay")?;
            placed.push(faq_round(me, &a.dir, a.jobs, iters, &quota, Some(&place))?.makespan);
            if i == 0 {
                nomig.push(faq_round(me, &a.dir, a.jobs, iters, &quota, None)?.makespan);
            }
            mosctl_all(me, &a.dir, nodes, "nostay")?;
            let r = faq_round(me, &a.dir, a.jobs, iters, &quota, None)?;
            bal.push(r.makespan);
            spread.push(r.spread.unwrap_or(f64::INFINITY));
            migs.push(r.migrations / f64::from(a.jobs));
        }
        let tag = format!("faq_{name}_{secs}s");
        let b = median(bal);
        let p = median(placed);
        println!("BENCH {tag}_makespan {b:.2} s vs ideal={:.3}", b / ideal);
        println!(
            "BENCH {tag}_makespan_vs_placed {b:.2} s vs placed={:.3}",
            b / p
        );
        if !nomig.is_empty() {
            let n = median(nomig);
            println!(
                "BENCH {tag}_makespan_vs_no_migration {b:.2} s vs no_migration={:.3}",
                b / n
            );
        }
        println!("BENCH {tag}_spread {:.2} s", median(spread));
        println!(
            "BENCH {tag}_migrations_per_job {:.2} migrations",
            median(migs)
        );
        println!(
            "BENCH {tag}_ideal {ideal:.2} s (work {w:.2} CPU-s per job, capacity {capacity:.2} CPUs: quotas {quota:.2?}, host CPUs {host_cpus}; placed {place:?}: {p:.2} s)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements() {
        let count = |p: Vec<u32>| {
            (1..=4)
                .map(|n| p.iter().filter(|x| **x == n).count())
                .collect::<Vec<_>>()
        };
        assert_eq!(count(placement(8, &[1.0; 4])), [2, 2, 2, 2]);
        assert_eq!(count(placement(8, &[1.0, 1.0, 2.0, 3.0])), [1, 1, 2, 4]);
        assert_eq!(count(placement(8, &[2.0, 1.0, 1.0, 1.0])), [4, 2, 1, 1]);
    }

    #[test]
    fn balanced_spreads() {
        assert!(balanced(&[2, 2, 2, 2], &[1.0; 4]));
        assert!(!balanced(&[3, 1, 2, 2], &[1.0; 4]));
        // Speeds 1,1,2,3: shares 1.1, 1.1, 2.3, 3.4.
        assert!(balanced(&[1, 1, 2, 4], &[1.0, 1.0, 2.0, 3.0]));
        assert!(!balanced(&[2, 2, 2, 2], &[1.0, 1.0, 2.0, 3.0]));
        // CPUs 2,1,1,1: shares 3.2, 1.6, 1.6, 1.6.
        assert!(balanced(&[3, 2, 2, 1], &[2.0, 1.0, 1.0, 1.0]));
        assert!(!balanced(&[2, 2, 2, 2], &[2.0, 1.0, 1.0, 1.0]));
    }
}
