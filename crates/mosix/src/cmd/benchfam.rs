//! `mosix testbed bench-families`: what families cost and gain, each against a reference
//! measured in the same run (alternating):
//!
//! - the FAQ experiment (8 CPU-bound awk jobs started on node 1 of 4 equal nodes) as ONE
//!   family (`mosrun bash -c 'for ...; do mawk ... & done; wait'`) against the ideal and
//!   against the same jobs as eight separate `mosrun`s;
//! - a fork by a migratable process at home against a plain fork, and how long until its
//!   child is a migratable process;
//! - a pipe between two members on two nodes (the data flows through home) against the
//!   same pipe at home and the link's TCP bandwidth.
//!
//! Also its hidden helpers (`__forks`, `__pipe-writer`, `__pipe-reader`).

use super::benchmig::{self, link_bandwidth, median, on_node};
use anyhow::{bail, Context, Result};
use mosix_proto::control::{Client, Request, Response};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// What to measure: faq, fork, pipe.
    #[arg(long, value_delimiter = ',', default_value = "faq,fork,pipe")]
    what: Vec<String>,
    /// Length of each FAQ job: seconds it takes alone on node 1.
    #[arg(long, default_value_t = 9.0)]
    job_secs: f64,
    /// Rounds (each: the measured run and its reference); medians are printed.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Forks timed per round, and children timed until migratable.
    #[arg(long, default_value_t = 2000)]
    forks: u32,
    /// Data sent through the pipe per round, MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Testbed state directory (a 4-node testbed is brought up and down in it).
    #[arg(long, default_value = "/run/mosix-bench-families")]
    dir: PathBuf,
}

pub fn run(a: Args) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-families needs root (it brings a testbed up)");
    }
    for w in &a.what {
        if !["faq", "fork", "pipe"].contains(&w.as_str()) {
            bail!("unknown measurement '{w}' (faq, fork, pipe)");
        }
    }
    let me = std::env::current_exe().context("cannot find the mosix binary")?;
    let tb = |args: &[&str]| super::benchmig::testbed(&me, &a.dir, args);
    tb(&["up", "--nodes", "4"])?;
    let r = (|| -> Result<()> {
        for w in &a.what {
            match w.as_str() {
                "faq" => faq(&me, &a)?,
                "fork" => fork_bench(&me, &a)?,
                _ => pipe(&me, &a)?,
            }
        }
        Ok(())
    })();
    let _ = tb(&["down"]);
    r?;
    Ok(0)
}

/// One FAQ round as one family: `mosrun bash -c` starting `jobs` awk jobs of `iters`
/// iterations in the background and waiting for them; its makespan (s).
fn family_round(me: &Path, dir: &Path, jobs: u32, iters: u64) -> Result<f64> {
    let prog = format!("BEGIN {{ for (i = 0; i < {iters}; i++) s += i % 7; print s }}");
    let script = format!("for i in $(seq {jobs}); do mawk '{prog}' & done; wait");
    let t = Instant::now();
    let o = on_node(me, dir, 1)
        .args(["run", "bash", "-c", &script])
        .stdin(Stdio::null())
        .output()?;
    if !o.status.success() {
        bail!(
            "the family failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let lines = String::from_utf8_lossy(&o.stdout).lines().count();
    if lines != jobs as usize {
        bail!("the family printed {lines} results, not {jobs}");
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The FAQ experiment as one family against the ideal and against eight mosruns.
fn faq(me: &Path, a: &Args) -> Result<()> {
    let dir = &a.dir;
    let jobs = 8u32;
    let quota = benchmig::quotas(me, dir)?;
    let nodes = quota.len() as u32;
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    // How fast one job runs alone on node 1 (the reference for the job length).
    benchmig::mosctl_all(me, dir, nodes, "stay")?;
    let probe = 20_000_000u64;
    let one = benchmig::faq_round(me, dir, 1, probe, &quota, None)?.makespan;
    benchmig::mosctl_all(me, dir, nodes, "nostay")?;
    let iters = (probe as f64 / one * a.job_secs) as u64;
    let w = a.job_secs * quota[0];
    let capacity = quota.iter().sum::<f64>().min(host_cpus);
    let ideal = (f64::from(jobs) * w / capacity).max(w / quota.iter().cloned().fold(0.0, f64::max));
    let place = benchmig::placement(jobs, &quota);
    let (mut fam, mut sep, mut ratio, mut placed, mut r_placed) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..a.rounds {
        // The references alternate with the family: eight mosruns balanced, and eight
        // placed at once where they belong (balancing off: what no balancer beats on this
        // machine at this moment).
        let s = benchmig::faq_round(me, dir, jobs, iters, &quota, None)?.makespan;
        benchmig::mosctl_all(me, dir, nodes, "stay")?;
        let p = benchmig::faq_round(me, dir, jobs, iters, &quota, Some(&place))?.makespan;
        benchmig::mosctl_all(me, dir, nodes, "nostay")?;
        let f = family_round(me, dir, jobs, iters)?;
        sep.push(s);
        placed.push(p);
        fam.push(f);
        ratio.push(f / s);
        r_placed.push(f / p);
    }
    let (f, s) = (median(fam), median(sep));
    let tag = format!("faq_family_{}s", a.job_secs);
    println!("BENCH {tag}_makespan {f:.2} s vs ideal={:.3}", f / ideal);
    println!(
        "BENCH {tag}_makespan_vs_separate {f:.2} s vs separate_mosruns={:.3}",
        median(ratio)
    );
    println!(
        "BENCH {tag}_makespan_vs_placed {f:.2} s vs placed={:.3}",
        median(r_placed)
    );
    println!(
        "BENCH faq_separate_{}s_makespan {s:.2} s vs ideal={:.3}",
        a.job_secs,
        s / ideal
    );
    println!(
        "BENCH faq_placed_{}s_makespan {:.2} s vs ideal={:.3}",
        a.job_secs,
        median(placed.clone()),
        median(placed) / ideal
    );
    println!(
        "BENCH {tag}_ideal {ideal:.2} s (work {w:.2} CPU-s per job, capacity {capacity:.2} CPUs: quotas {quota:.2?}, host CPUs {host_cpus})"
    );
    Ok(())
}

/// `__forks N` run on node 1, plain or under mosrun: its answer lines.
fn fork_run(me: &Path, dir: &Path, n: u32, mosrun: bool) -> Result<(f64, Vec<f64>)> {
    let mut c = on_node(me, dir, 1);
    if mosrun {
        c.args(["run", me.to_str().unwrap_or("mosix")]);
    }
    let o = c
        .args(["__forks", &n.to_string()])
        .stdin(Stdio::null())
        .output()?;
    if !o.status.success() {
        bail!("__forks: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut fork_us = f64::NAN;
    let mut adopt = Vec::new();
    for l in text.lines() {
        let mut w = l.split_whitespace();
        match w.next() {
            Some("fork_us") => fork_us = w.next().context("fork_us")?.parse()?,
            Some("adopt_ms") => adopt = w.map(|x| x.parse()).collect::<Result<_, _>>()?,
            _ => {}
        }
    }
    Ok((fork_us, adopt))
}

/// A fork by a migratable process at home against a plain fork, and how long until the
/// child is a migratable process itself.
fn fork_bench(me: &Path, a: &Args) -> Result<()> {
    let (mut mig, mut ratio, mut plain, mut adopt) = (vec![], vec![], vec![], vec![]);
    for _ in 0..a.rounds {
        let (p, _) = fork_run(me, &a.dir, a.forks, false)?;
        let (m, ad) = fork_run(me, &a.dir, a.forks, true)?;
        plain.push(p);
        mig.push(m);
        ratio.push(m / p);
        adopt.extend(ad);
    }
    let max = adopt.iter().cloned().fold(0.0, f64::max);
    let n = adopt.len();
    println!(
        "BENCH fork_wait_in_migratable_process {:.1} us vs plain={:.3}",
        median(mig),
        median(ratio)
    );
    println!("BENCH fork_wait_plain {:.1} us", median(plain));
    println!(
        "BENCH fork_to_migratable_child {:.1} ms (median of {n} children; max {max:.1} ms)",
        median(adopt)
    );
    Ok(())
}

/// Runs `writer | reader` as one family on node 1 (pinned), moves the writer to
/// `writer_to` and the reader to `reader_to` (0: they stay), then lets the data flow:
/// bytes per second the reader saw.
fn pipe_round(me: &Path, dir: &Path, mib: u64, writer_to: u32, reader_to: u32) -> Result<f64> {
    let go = dir.join("shared").join("pipe-go");
    let _ = std::fs::remove_file(&go);
    let m = me.to_str().unwrap_or("mosix");
    let script = format!(
        "{m} __pipe-writer {} {mib} | {m} __pipe-reader",
        go.display()
    );
    let mut job = on_node(me, dir, 1)
        .args(["run", "-L", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let sh = job.id() as i32;
    let sock = dir.join("n1/mosixd.sock");
    let r = (|| -> Result<f64> {
        // Its two members, once adopted (the writer first: it was forked first).
        let end = Instant::now() + Duration::from_secs(60);
        let kids = loop {
            let mut c = Client::connect(&sock, Duration::from_secs(10))?;
            let mut k: Vec<i32> = match c.call(&Request::Ps)? {
                Response::Ps { procs, .. } => procs
                    .into_iter()
                    .filter(|p| p.ppid == Some(sh))
                    .map(|p| p.home_pid)
                    .collect(),
                r => bail!("ps: {r:?}"),
            };
            k.sort();
            if k.len() == 2 {
                break k;
            }
            if Instant::now() > end {
                bail!("the pipe's members were not adopted");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for (pid, to) in [(kids[0], writer_to), (kids[1], reader_to)] {
            if to != 0 {
                let mut c = Client::connect(&sock, Duration::from_secs(300))?;
                match c.call(&Request::Migrate { pid, to })? {
                    Response::Migrated { .. } => {}
                    r => bail!("migrate {pid} {to}: {r:?}"),
                }
            }
        }
        std::fs::write(&go, "go\n")?;
        let mut out = String::new();
        job.stdout
            .take()
            .context("reader stdout")?
            .read_to_string(&mut out)?;
        let mut w = out.split_whitespace();
        let (bytes, secs): (f64, f64) = (
            w.next().context("no answer from the reader")?.parse()?,
            w.next().context("no time from the reader")?.parse()?,
        );
        if bytes != (mib << 20) as f64 {
            bail!("the reader got {bytes} bytes, not {}", mib << 20);
        }
        Ok(bytes / secs)
    })();
    let _ = job.kill();
    let _ = job.wait();
    let _ = std::fs::remove_file(&go);
    r
}

/// A pipe between two members on two nodes (and one away, one home) against the same
/// pipe at home and the link's TCP bandwidth.
fn pipe(me: &Path, a: &Args) -> Result<()> {
    let dir = &a.dir;
    let (mut home, mut half, mut away, mut link) = (vec![], vec![], vec![], vec![]);
    let (mut r_half, mut r_away, mut l_away) = (vec![], vec![], vec![]);
    for _ in 0..a.rounds {
        let h = pipe_round(me, dir, a.mib, 0, 0)?;
        let bw = link_bandwidth(me, dir, a.mib.max(64))?;
        let x = pipe_round(me, dir, a.mib, 2, 0)?;
        let y = pipe_round(me, dir, a.mib, 2, 3)?;
        home.push(h);
        link.push(bw);
        half.push(x);
        away.push(y);
        r_half.push(x / h);
        r_away.push(y / h);
        l_away.push(y / bw);
    }
    let gb = |v: Vec<f64>| median(v) / 1e9;
    println!(
        "BENCH pipe_between_members_on_two_nodes {:.3} GB/s vs veth_tcp={:.3}",
        gb(away.clone()),
        median(l_away)
    );
    println!(
        "BENCH pipe_between_members_on_two_nodes_vs_home {:.3} GB/s vs home={:.4}",
        gb(away),
        median(r_away)
    );
    println!(
        "BENCH pipe_writer_away_reader_home {:.3} GB/s vs home={:.4}",
        gb(half),
        median(r_half)
    );
    println!("BENCH pipe_between_members_at_home {:.3} GB/s", gb(home));
    println!("BENCH veth_tcp_bandwidth {:.3} GB/s", gb(link));
    Ok(())
}

/// `__forks N`: N forks whose child exits at once, each waited for: prints `fork_us` (per
/// fork and wait). Under mosrun (MOSIX_SOCKET reaches its mosixd), also forks children
/// that wait and times until each is a migratable process (`where` answers for it):
/// prints `adopt_ms` for each.
pub fn forks(n: u32) -> Result<i32> {
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: the child only calls _exit.
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            // SAFETY: _exit in the child.
            0 => unsafe { libc::_exit(0) },
            child => {
                let mut st = 0;
                // SAFETY: waitpid on our own child.
                unsafe { libc::waitpid(child, &mut st, 0) };
            }
        }
    }
    println!(
        "fork_us {:.3}",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n.max(1))
    );
    let sock = super::status::socket_path(None)?;
    let me = std::process::id() as i32;
    let mine = Client::connect(&sock, Duration::from_secs(5))
        .ok()
        .and_then(|mut c| c.call(&Request::Where { pid: me }).ok())
        .is_some_and(|r| matches!(r, Response::Where { .. }));
    if mine {
        let mut times = Vec::new();
        let mut x = u64::from(std::process::id()) | 1;
        for _ in 0..n.clamp(1, 20) {
            // At a random moment (the looks for children are periodic).
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            std::thread::sleep(Duration::from_millis(x % 250));
            let t = Instant::now();
            // SAFETY: the child only calls pause and _exit.
            let child = match unsafe { libc::fork() } {
                -1 => bail!("fork: {}", std::io::Error::last_os_error()),
                0 => unsafe {
                    // SAFETY: pause, then _exit, in the child.
                    libc::pause();
                    libc::_exit(0)
                },
                c => c,
            };
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                let mut c = Client::connect(&sock, Duration::from_secs(5))?;
                if matches!(
                    c.call(&Request::Where { pid: child }),
                    Ok(Response::Where { .. })
                ) {
                    break;
                }
                if Instant::now() > end {
                    bail!("child {child} never became migratable");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
            // SAFETY: kill and reap our own child.
            unsafe {
                libc::kill(child, libc::SIGKILL);
                let mut st = 0;
                libc::waitpid(child, &mut st, 0);
            }
        }
        let list: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
        println!("adopt_ms {}", list.join(" "));
    }
    Ok(0)
}

/// `__pipe-writer GO MIB`: once file GO exists, writes MIB MiB to stdout in 64 KiB
/// writes.
pub fn pipe_writer(go: &Path, mib: u64) -> Result<i32> {
    while !go.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let buf = vec![0x5au8; 64 << 10];
    let mut out = std::io::stdout().lock();
    for _ in 0..mib * 16 {
        out.write_all(&buf)?;
    }
    out.flush()?;
    Ok(0)
}

/// `__pipe-reader`: reads stdin to its end in 64 KiB reads; prints the bytes and the
/// seconds from the first byte to the end.
pub fn pipe_reader() -> Result<i32> {
    let mut buf = vec![0u8; 64 << 10];
    let mut input = std::io::stdin().lock();
    let mut n = input.read(&mut buf)? as u64;
    let t = Instant::now();
    loop {
        let k = input.read(&mut buf)?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    println!("{n} {}", t.elapsed().as_secs_f64());
    Ok(0)
}
