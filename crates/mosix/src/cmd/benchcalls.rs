//! `mosix testbed bench-calls`: what a call carried home costs. A process started on node
//! 1 with a file open there makes the same calls at home and after a move to node 2
//! (where every call on that file is made by its deputy at home, bulk reads and writes
//! through read-ahead and write-behind), alternating, against the veth link's TCP
//! bandwidth measured in the same run; and reads a file of the shared directory, opened
//! where it runs (DFSA), against the same read at home. Also the hidden helper it runs
//! (`__calls FILE SHARED`).

use super::benchmig::{link_bandwidth, median, on_node, on_two_nodes};
use anyhow::{bail, Context, Result};
use mosix_proto::control::{Client, Request, Response};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Size of the file read and written through the calls, MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Calls per latency measurement away (at home ten times as many).
    #[arg(long, default_value_t = 2000)]
    calls: u64,
    /// Rounds (each: at home, then away); medians of the per-round ratios are printed.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Testbed state directory (a 2-node testbed is brought up and down in it).
    #[arg(long, default_value = "/run/mosix-bench-calls")]
    dir: PathBuf,
}

pub fn run(a: Args) -> Result<i32> {
    on_two_nodes("bench-calls", &a.dir, |me, dir| measure(me, dir, &a))
}

/// The job: its stdin (commands) and stdout (answers).
struct Job {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    pid: i32,
}

impl Job {
    fn ask(&mut self, cmd: &str) -> Result<f64> {
        let w = self.child.stdin.as_mut().context("job stdin")?;
        writeln!(w, "{cmd}")?;
        w.flush()?;
        let mut line = String::new();
        self.out.read_line(&mut line)?;
        line.trim()
            .parse()
            .with_context(|| format!("the job answered {line:?} to {cmd:?}"))
    }
}

fn migrate(sock: &Path, pid: i32, to: u32) -> Result<()> {
    let mut c = Client::connect(sock, Duration::from_secs(300))?;
    match c.call(&Request::Migrate { pid, to })? {
        Response::Migrated { .. } => Ok(()),
        r => bail!("migrate {pid} {to}: {r:?}"),
    }
}

/// Figures of one side (home or away) of one round.
#[derive(Default)]
struct Side {
    /// Nanoseconds per call: 1-byte pread, stat, open+close.
    pread: f64,
    stat: f64,
    open: f64,
    /// Seconds for the whole file: 1 MiB preads, 1 MiB pwrites, 64 KiB reads.
    read: f64,
    write: f64,
    read64: f64,
    /// Seconds to read the file of the shared directory (1 MiB preads), opened then.
    dread: f64,
    /// Away: the CPU each node used during read, write and read64 (node 1, home; node 2,
    /// host), in CPUs (CPU time over the phase's time).
    cpu: [[f64; 2]; 3],
}

fn side(job: &mut Job, calls: u64, dir: &Path) -> Result<Side> {
    let cpu = || super::testbed::nodes_cpu_ns(dir, [1, 2]);
    let mut s = Side {
        pread: job.ask(&format!("lat {calls}"))?,
        stat: job.ask(&format!("stat {calls}"))?,
        open: job.ask(&format!("open {}", calls / 2))?,
        ..Side::default()
    };
    for (i, cmd) in ["read", "write", "read64"].into_iter().enumerate() {
        let c0 = cpu();
        let secs = job.ask(cmd)?;
        let c1 = cpu();
        for n in 0..2 {
            s.cpu[i][n] = c1[n].saturating_sub(c0[n]) as f64 / 1e9 / secs;
        }
        match i {
            0 => s.read = secs,
            1 => s.write = secs,
            _ => s.read64 = secs,
        }
    }
    s.dread = job.ask("dread")?;
    Ok(s)
}

fn measure(me: &Path, dir: &Path, a: &Args) -> Result<()> {
    let file = dir.join("bench-calls.dat");
    // Under the testbed's shared directory (every node sees it alike): DFSA.
    let shared = dir.join("shared").join("bench-calls-dfsa.dat");
    for f in [&file, &shared] {
        let f = std::fs::File::create(f)?;
        f.set_len(a.mib << 20)?;
    }
    let mut child = on_node(me, dir, 1)
        .args(["run", me.to_str().unwrap_or("mosix"), "__calls"])
        .arg(&file)
        .arg(&shared)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("job stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let pid: i32 = line
        .trim()
        .strip_prefix("ready ")
        .context("the call loop did not start")?
        .parse()?;
    let mut job = Job { child, out, pid };
    let sock = dir.join("n1/mosixd.sock");
    let bytes = (a.mib << 20) as f64;
    let mut homes = Vec::new();
    let mut aways = Vec::new();
    let mut link = Vec::new();
    let r = (|| -> Result<()> {
        for _ in 0..a.repeat {
            homes.push(side(&mut job, a.calls * 10, dir)?);
            link.push(link_bandwidth(me, dir, a.mib.max(64))?);
            migrate(&sock, job.pid, 2)?;
            aways.push(side(&mut job, a.calls, dir)?);
            migrate(&sock, job.pid, 0)?;
        }
        Ok(())
    })();
    if let Some(mut w) = job.child.stdin.take() {
        let _ = w.write_all(b"q\n");
    }
    let _ = job.child.wait();
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&shared);
    r?;
    // Medians of the values, and of the per-round ratios.
    let med = |f: &dyn Fn(&Side) -> f64, v: &[Side]| median(v.iter().map(f).collect());
    let ratio = |f: &dyn Fn(&Side, &Side, f64) -> f64| {
        median(
            homes
                .iter()
                .zip(&aways)
                .zip(&link)
                .map(|((h, w), l)| f(h, w, *l))
                .collect(),
        )
    };
    let us = |ns: f64| ns / 1e3;
    for (name, f) in [
        ("pread1", &(|s: &Side| s.pread) as &dyn Fn(&Side) -> f64),
        ("stat", &|s: &Side| s.stat),
        ("open_close", &|s: &Side| s.open),
    ] {
        println!(
            "BENCH forwarded_{name}_latency {:.1} us vs local={:.0}",
            us(med(f, &aways)),
            ratio(&|h, w, _| f(w) / f(h))
        );
        println!("BENCH local_{name}_latency {:.2} us", us(med(f, &homes)));
    }
    let gbs = |secs: f64| bytes / secs / 1e9;
    let mib = a.mib;
    for (i, (name, f)) in [
        ("read", &(|s: &Side| s.read) as &dyn Fn(&Side) -> f64),
        ("write", &|s: &Side| s.write),
        ("read64k", &|s: &Side| s.read64),
    ]
    .into_iter()
    .enumerate()
    {
        println!(
            "BENCH forwarded_{name}_{mib}MiB {:.3} GB/s vs veth_tcp={:.3}",
            gbs(med(f, &aways)),
            ratio(&|_, w, l| gbs(f(w)) * 1e9 / l)
        );
        // Which node the stream waits for: the one whose CPU is at its quota (1 CPU
        // each on this testbed).
        for (n, node) in ["home", "host"].iter().enumerate() {
            println!(
                "BENCH forwarded_{name}_{mib}MiB_{node}_cpu {:.2} CPUs",
                med(&|s: &Side| s.cpu[i][n], &aways)
            );
        }
        println!(
            "BENCH local_{name}_{mib}MiB {:.3} GB/s",
            gbs(med(f, &homes))
        );
    }
    println!(
        "BENCH dfsa_read_{mib}MiB {:.3} GB/s vs local={:.3}",
        gbs(med(&|s| s.dread, &aways)),
        ratio(&|h, w, _| h.dread / w.dread)
    );
    println!(
        "BENCH local_dfsa_file_read_{mib}MiB {:.3} GB/s",
        gbs(med(&|s| s.dread, &homes))
    );
    println!("BENCH veth_tcp_bandwidth {:.3} GB/s", median(link) / 1e9);
    Ok(())
}

/// `__calls FILE SHARED`: with FILE open, answer commands on stdin, one line each:
/// `lat N` (N one-byte preads, nanoseconds per call), `stat N` (N stats of FILE), `open N`
/// (N opens and closes of FILE), `read` / `write` (the whole file in 1 MiB preads /
/// pwrites, seconds; then an fdatasync, not timed), `read64` (the whole file from its
/// start in 64 KiB reads), `dread` (SHARED opened then and read whole in 1 MiB preads),
/// `q`.
pub fn calls(file: &Path, shared: &Path) -> Result<i32> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    let size = f.metadata()?.len();
    let mut buf = vec![0x5au8; 1 << 20];
    let mut out = std::io::stdout();
    writeln!(out, "ready {}", std::process::id())?;
    out.flush()?;
    let mut line = String::new();
    let per = |n: u64, t: Instant| t.elapsed().as_nanos() as f64 / n.max(1) as f64;
    let read_all = |f: &std::fs::File, buf: &mut [u8]| -> Result<()> {
        let mut off = 0;
        loop {
            let n = f.read_at(buf, off)?;
            if n == 0 {
                return Ok(());
            }
            off += n as u64;
        }
    };
    loop {
        line.clear();
        if std::io::stdin().read_line(&mut line)? == 0 {
            return Ok(0);
        }
        let mut w = line.split_whitespace();
        let answer = match (w.next(), w.next().map(|n| n.parse::<u64>())) {
            (Some("lat"), Some(Ok(n))) => {
                let t = Instant::now();
                for _ in 0..n {
                    f.read_at(&mut buf[..1], 0)?;
                }
                per(n, t)
            }
            (Some("stat"), Some(Ok(n))) => {
                let t = Instant::now();
                for _ in 0..n {
                    std::fs::metadata(file)?;
                }
                per(n, t)
            }
            (Some("open"), Some(Ok(n))) => {
                let t = Instant::now();
                for _ in 0..n {
                    drop(std::fs::File::open(file)?);
                }
                per(n, t)
            }
            (Some("read"), None) => {
                let t = Instant::now();
                read_all(&f, &mut buf)?;
                t.elapsed().as_secs_f64()
            }
            (Some("write"), None) => {
                let t = Instant::now();
                let mut off = 0;
                while off < size {
                    let n = (size - off).min(buf.len() as u64) as usize;
                    f.write_all_at(&buf[..n], off)?;
                    off += n as u64;
                }
                let secs = t.elapsed().as_secs_f64();
                // Not timed: home makes the last writes behind (at most a window of
                // them) and the file's pages go to its disk now, not in the phase after.
                f.sync_data()?;
                secs
            }
            (Some("read64"), None) => {
                use std::io::{Read, Seek};
                let t = Instant::now();
                let mut g = &f;
                g.seek(std::io::SeekFrom::Start(0))?;
                while g.read(&mut buf[..64 << 10])? > 0 {}
                t.elapsed().as_secs_f64()
            }
            (Some("dread"), None) => {
                let t = Instant::now();
                let d = std::fs::File::open(shared)
                    .with_context(|| format!("cannot open {}", shared.display()))?;
                read_all(&d, &mut buf)?;
                t.elapsed().as_secs_f64()
            }
            _ => return Ok(0),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
}
