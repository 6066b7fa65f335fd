//! `mosix testbed bench-migration`: how fast a process moves between two testbed nodes,
//! against the veth link's own TCP bandwidth measured in the same run (alternating).
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
    /// Moves per size (there and back counts two); medians are printed.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Testbed state directory (a 2-node testbed is brought up and down in it).
    #[arg(long, default_value = "/run/mosix-bench-migration")]
    dir: PathBuf,
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
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-migration needs root (it brings a testbed up)");
    }
    let me = std::env::current_exe().context("cannot find the mosix binary")?;
    let dir = a.dir.clone();
    let tb = |args: &[&str]| -> Result<()> {
        let o = Command::new(&me)
            .arg("testbed")
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()?;
        if !o.status.success() {
            bail!(
                "testbed {args:?}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(())
    };
    tb(&["up", "--nodes", "2"])?;
    let r = measure(&me, &dir, &a);
    let _ = tb(&["down"]);
    r?;
    Ok(0)
}

fn on_node(me: &Path, dir: &Path, n: u32) -> Command {
    let mut c = Command::new(me);
    c.args(["testbed", "exec", &n.to_string(), "--dir"])
        .arg(dir)
        .arg("--")
        .arg(me);
    c
}

/// TCP bandwidth from node 1 to node 2 over the veth pair, bytes/s.
fn link_bandwidth(me: &Path, dir: &Path, mib: u64) -> Result<f64> {
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

fn measure(me: &Path, dir: &Path, a: &Args) -> Result<()> {
    let sock = dir.join("n1/mosixd.sock");
    for &mib in &a.sizes {
        let mut job = on_node(me, dir, 1)
            .args([
                "run",
                me.to_str().unwrap_or("mosix"),
                "__touch",
                &mib.to_string(),
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
        let (mut total, mut frozen, mut ratio, mut link) = (vec![], vec![], vec![], vec![]);
        let mut bytes = 0u64;
        for i in 0..a.repeat * 2 {
            let bw = link_bandwidth(me, dir, mib.max(64))?;
            link.push(bw);
            let to = if i % 2 == 0 { 2 } else { 0 };
            let mut c = Client::connect(&sock, Duration::from_secs(300))?;
            let t = Instant::now();
            let r = c.call(&Request::Migrate { pid, to })?;
            let secs = t.elapsed().as_secs_f64();
            let Response::Migrated {
                frozen_ms,
                memory_bytes,
                ..
            } = r
            else {
                bail!("unexpected answer {r:?}");
            };
            bytes = memory_bytes;
            total.push(secs);
            frozen.push(frozen_ms as f64 / 1000.0);
            ratio.push(memory_bytes as f64 / secs / bw);
        }
        if let Some(mut w) = job.stdin.take() {
            let _ = w.write_all(b"q\n");
        }
        let _ = job.wait();
        let t = median(total);
        println!("BENCH migration_{mib}MiB_total {:.1} ms", t * 1000.0);
        println!(
            "BENCH migration_{mib}MiB_freeze {:.1} ms",
            median(frozen) * 1000.0
        );
        println!(
            "BENCH migration_{mib}MiB_throughput {:.3} GB/s vs veth_tcp={:.3}",
            bytes as f64 / t / 1e9,
            median(ratio)
        );
        println!("BENCH veth_tcp_bandwidth {:.3} GB/s", median(link) / 1e9);
    }
    Ok(())
}

/// `__touch MIB`: touch MIB MiB of memory with random data, print "ready PID", wait for a
/// line on stdin, exit.
pub fn touch(mib: u64) -> Result<i32> {
    let n = (mib << 20) as usize / 8;
    let mut v = vec![0u64; n];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for w in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    println!("ready {}", std::process::id());
    std::io::stdout().flush()?;
    let mut s = String::new();
    std::io::stdin().read_line(&mut s)?;
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
    /// Iterations of each job's awk loop (its work).
    #[arg(long, default_value_t = 60_000_000)]
    work: u64,
    /// Testbed state directory (brought up and down for each speed setting).
    #[arg(long, default_value = "/run/mosix-bench-balance")]
    dir: PathBuf,
}

/// Runs `jobs` awk jobs started on node 1 at once; returns the makespan in seconds.
fn faq_round(me: &Path, dir: &Path, jobs: u32, work: u64) -> Result<f64> {
    let prog = format!("BEGIN {{ for (i = 0; i < {work}; i++) s += i % 7; print s }}");
    let t = Instant::now();
    let kids: Vec<_> = (0..jobs)
        .map(|_| {
            on_node(me, dir, 1)
                .args(["run", "mawk", &prog])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    for mut k in kids {
        if !k.wait()?.success() {
            bail!("a job failed");
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

fn mosctl_all(me: &Path, dir: &Path, cmd: &str) -> Result<()> {
    for n in 1..=4 {
        let o = on_node(me, dir, n).args(["mosctl", cmd]).output()?;
        if !o.status.success() {
            bail!("mosctl {cmd}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    Ok(())
}

/// `mosix testbed bench-balance`: the FAQ experiment (8 CPU-bound jobs started on node 1
/// of 4) with equal speeds and with speeds 1,1,2,3: makespan against the ideal and against
/// no migration, both measured in the same run.
pub fn run_balance(a: BalanceArgs) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-balance needs root (it brings a testbed up)");
    }
    let me = std::env::current_exe().context("cannot find the mosix binary")?;
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    for (name, speeds) in [
        ("equal", [1.0, 1.0, 1.0, 1.0]),
        ("1123", [1.0, 1.0, 2.0, 3.0]),
    ] {
        let list = speeds.map(|s| s.to_string()).join(",");
        let o = Command::new(&me)
            .args(["testbed", "up", "--nodes", "4", "--speeds", &list, "--dir"])
            .arg(&a.dir)
            .output()?;
        if !o.status.success() {
            bail!("testbed up: {}", String::from_utf8_lossy(&o.stderr));
        }
        let r = (|| -> Result<()> {
            // CPU share of each node: its cgroup quota, as the testbed set it.
            let o = Command::new(&me)
                .args(["testbed", "status", "--json", "--dir"])
                .arg(&a.dir)
                .output()?;
            let st: serde_json::Value =
                serde_json::from_slice(&o.stdout).context("testbed status --json")?;
            let quota: Vec<f64> = st
                .as_array()
                .context("testbed status: no nodes")?
                .iter()
                .map(|n| n["cpu_quota"].as_f64().unwrap_or(1.0))
                .collect();
            if quota.len() != 4 {
                bail!("testbed status: expected 4 nodes");
            }
            mosctl_all(&me, &a.dir, "stay")?;
            let one = faq_round(&me, &a.dir, 1, a.work)?;
            // Work of one job in CPU-seconds (node 1 has quota[0] of a CPU).
            let w = one * quota[0];
            let (mut bal, mut nomig) = (vec![], vec![]);
            for _ in 0..2 {
                mosctl_all(&me, &a.dir, "stay")?;
                nomig.push(faq_round(&me, &a.dir, a.jobs, a.work)?);
                mosctl_all(&me, &a.dir, "nostay")?;
                bal.push(faq_round(&me, &a.dir, a.jobs, a.work)?);
            }
            let capacity = quota.iter().sum::<f64>().min(host_cpus);
            let fastest = quota.iter().cloned().fold(0.0, f64::max);
            let ideal = (a.jobs as f64 * w / capacity).max(w / fastest);
            let (b, n) = (median(bal), median(nomig));
            println!(
                "BENCH faq_{name}_makespan {b:.2} s vs ideal={:.3}",
                b / ideal
            );
            println!(
                "BENCH faq_{name}_makespan_vs_no_migration {b:.2} s vs no_migration={:.3}",
                b / n
            );
            println!(
                "BENCH faq_{name}_ideal {ideal:.2} s (work {:.2} CPU-s per job, capacity {capacity:.2} CPUs: quotas {:.2}, host CPUs {host_cpus})",
                w,
                quota.iter().sum::<f64>()
            );
            Ok(())
        })();
        let _ = Command::new(&me)
            .args(["testbed", "down", "--dir"])
            .arg(&a.dir)
            .output();
        r?;
    }
    Ok(0)
}
