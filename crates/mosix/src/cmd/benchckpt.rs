//! `mosix testbed bench-checkpoint`: what checkpoints cost a job that runs away from home
//! (the time it is stopped for one, against a migration of it measured in the same run;
//! its slowdown with `mosrun -A` against no checkpoints, alternating runs), and how long
//! a job takes to run again after the death of the node it ran on. Prints BENCH lines.
//! Also the hidden job it runs (`__churn`).

use super::benchmig::{median, on_node};
use anyhow::{bail, Context, Result};
use mosix_proto::control::{After, Client, Request, Response};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    /// Memory of the job, MiB (all of it written again and again).
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// The job's work: passes over its memory.
    #[arg(long, default_value_t = 400)]
    passes: u64,
    /// Minutes between automatic checkpoints in the timed runs (mosrun -A).
    #[arg(long, default_value_t = 0.1)]
    every: f64,
    /// Rounds of each measurement (medians are printed).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Testbed state directory (a 3-node testbed is brought up and down in it).
    #[arg(long, default_value = "/run/mosix-bench-checkpoint")]
    dir: PathBuf,
    /// What to measure: frozen, slowdown, recovery.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "frozen,slowdown,recovery"
    )]
    parts: Vec<String>,
}

pub fn run(a: Args) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("bench-checkpoint needs root (it brings a testbed up)");
    }
    let me = std::env::current_exe().context("cannot find the mosix binary")?;
    let tb = |args: &[&str]| super::benchmig::testbed(&me, &a.dir, args);
    tb(&["up", "--nodes", "3", "--gossip-interval-ms", "200"])?;
    let r = (|| {
        for n in 1..=3 {
            let o = on_node(&me, &a.dir, n).args(["mosctl", "stay"]).output()?;
            if !o.status.success() {
                bail!("mosctl stay: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        let work = a.dir.join("work");
        std::fs::create_dir_all(&work)?;
        let part = |p: &str| a.parts.iter().any(|x| x == p);
        if part("frozen") {
            frozen(&me, &a, &work)?;
        }
        if part("slowdown") {
            slowdown(&me, &a, &work)?;
        }
        if part("recovery") {
            recovery(&me, &a, &work, &tb)?;
        }
        Ok(())
    })();
    let _ = tb(&["down"]);
    r?;
    Ok(0)
}

/// The job, started with `mosrun ARGS` on node 1; its PID once it is ready.
fn start(me: &Path, a: &Args, passes: u64, mosrun: &[&str]) -> Result<(Child, i32)> {
    let mut args = vec!["run"];
    args.extend_from_slice(mosrun);
    let (mib, passes) = (a.mib.to_string(), passes.to_string());
    args.extend_from_slice(&[me.to_str().unwrap_or("mosix"), "__churn", &mib, &passes]);
    let mut job = on_node(me, &a.dir, 1)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(job.stdout.take().context("job stdout")?);
    let mut err = job.stderr.take().context("job stderr")?;
    let mut line = String::new();
    out.read_line(&mut line)?;
    let Some(pid) = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|p| p.parse::<i32>().ok())
    else {
        let mut e = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut e);
        let _ = job.wait();
        bail!("the job did not start: {}", e.trim());
    };
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    // Its output is read (and dropped) so that it never blocks.
    std::thread::spawn(move || for _ in out.lines() {});
    Ok((job, pid))
}

/// A request to node 1's mosixd, asked again while the job is busy (just moved: its host
/// links to home an instant after).
fn call(sock: &Path, req: &Request) -> Result<Response> {
    let mut tries = 0;
    loop {
        match Client::connect(sock, Duration::from_secs(600))?.call(req) {
            Err(mosix_proto::control::ClientError::Refused(m))
                if m.contains("try again") && tries < 50 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return Ok(r?),
        }
    }
}

fn end(mut job: Child) {
    let _ = job.kill();
    let _ = job.wait();
}

/// Stopped for a checkpoint of it away, against stopped for a move of it.
fn frozen(me: &Path, a: &Args, work: &Path) -> Result<()> {
    let sock = a.dir.join("n1/mosixd.sock");
    let base = work.join("f.ckpt");
    let (job, pid) = start(
        me,
        a,
        u64::MAX / 2,
        &["-C", base.to_str().unwrap_or("x"), "-r", "2"],
    )?;
    let (mut ck, mut mv) = (Vec::new(), Vec::new());
    for i in 0..a.repeat * 2 {
        match call(
            &sock,
            &Request::Checkpoint {
                pid,
                then: After::Continue,
            },
        )? {
            Response::Checkpointed { frozen_ms, .. } => ck.push(frozen_ms as f64),
            r => bail!("checkpoint: {r:?}"),
        }
        let to = if i % 2 == 0 { 3 } else { 2 };
        match call(&sock, &Request::Migrate { pid, to })? {
            Response::Migrated { frozen_ms, .. } => mv.push(frozen_ms as f64),
            r => bail!("migrate: {r:?}"),
        }
    }
    end(job);
    let (c, m) = (median(ck), median(mv));
    println!(
        "BENCH checkpoint_{}MiB_frozen {c:.0} ms vs migration_frozen={:.2}",
        a.mib,
        c / m
    );
    println!("BENCH migration_{}MiB_frozen {m:.0} ms", a.mib);
    Ok(())
}

/// The same work with checkpoints every `a.every` minutes and without, alternating.
fn slowdown(me: &Path, a: &Args, work: &Path) -> Result<()> {
    let every = a.every.to_string();
    let (mut with, mut without, mut ratio, mut taken) = (vec![], vec![], vec![], vec![]);
    for i in 0..a.repeat {
        let timed = |ck: bool| -> Result<f64> {
            let base = work.join(format!("s{i}.ckpt"));
            let b = base.to_str().unwrap_or("x").to_string();
            let args: Vec<&str> = if ck {
                vec!["-C", &b, "-A", &every, "-r", "2"]
            } else {
                vec!["-r", "2"]
            };
            let t = Instant::now();
            let (mut job, _) = start(me, a, a.passes, &args)?;
            let st = job.wait()?;
            if !st.success() {
                bail!("the job ended with {st}");
            }
            Ok(t.elapsed().as_secs_f64())
        };
        // Alternating which goes first.
        let (w, n) = if i % 2 == 0 {
            let w = timed(true)?;
            (w, timed(false)?)
        } else {
            let n = timed(false)?;
            (timed(true)?, n)
        };
        // The last 3 are kept: the highest number says how many were taken.
        let prefix = format!("s{i}.ckpt.");
        let last = std::fs::read_dir(work)?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_prefix(&prefix)
                    .and_then(|n| n.parse::<u32>().ok())
            })
            .max()
            .unwrap_or(0);
        taken.push(f64::from(last));
        with.push(w);
        without.push(n);
        ratio.push(w / n);
    }
    println!(
        "BENCH job_{}MiB_checkpointed_every_{}min {:.1} s vs no_checkpoints={:.3}",
        a.mib,
        a.every,
        median(with),
        median(ratio)
    );
    println!(
        "BENCH job_{}MiB_no_checkpoints {:.1} s",
        a.mib,
        median(without)
    );
    println!("BENCH checkpoints_per_run {:.0} count", median(taken));
    Ok(())
}

/// Node 2, where the job runs, dies: how long until the job runs again (and how much of
/// it was telling that the node is dead).
fn recovery(me: &Path, a: &Args, work: &Path, tb: &dyn Fn(&[&str]) -> Result<()>) -> Result<()> {
    let every = a.every.to_string();
    let (mut total, mut detect) = (vec![], vec![]);
    for i in 0..a.repeat {
        let base = work.join(format!("r{i}.ckpt"));
        let b = base.to_str().unwrap_or("x").to_string();
        let (job, pid) = start(me, a, u64::MAX / 2, &["-C", &b, "-A", &every, "-r", "2"])?;
        // A checkpoint taken away (the first is the image of its move).
        let second = work.join(format!("r{i}.ckpt.2"));
        let end_by = Instant::now() + Duration::from_secs(120);
        while !second.exists() {
            if Instant::now() > end_by {
                bail!("no checkpoint of the job was taken away");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let state = || -> Option<(String, u64)> {
            let o = on_node(me, &a.dir, 1)
                .args(["ps", "--json"])
                .output()
                .ok()?;
            let v: Value = serde_json::from_slice(&o.stdout).ok()?;
            let p = v.as_array()?.iter().find(|p| p["home_pid"] == pid)?.clone();
            Some((p["state"].as_str()?.to_string(), p["where_"].as_u64()?))
        };
        let t0 = Instant::now();
        tb(&["crash", "2"])?;
        let mut seen = None;
        loop {
            match state() {
                Some((s, _)) if s == "recovering" => {
                    seen.get_or_insert(t0.elapsed().as_secs_f64());
                }
                Some((s, w)) if s == "away" && w != 2 => break,
                None => bail!("the job was lost"),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("the job did not come back");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        total.push(t0.elapsed().as_secs_f64());
        if let Some(s) = seen {
            detect.push(s);
        }
        end(job);
        tb(&["start", "2"])?;
        // Node 1 sees it up again before the next round.
        let end_by = Instant::now() + Duration::from_secs(60);
        loop {
            let o = on_node(me, &a.dir, 1).args(["status", "--json"]).output()?;
            let up = serde_json::from_slice::<Value>(&o.stdout)
                .map(|v| v["nodes"][1]["status"] == 3)
                .unwrap_or(false);
            if up {
                break;
            }
            if Instant::now() > end_by {
                bail!("node 2 did not come back");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let o = on_node(me, &a.dir, 2).args(["mosctl", "stay"]).output()?;
        if !o.status.success() {
            bail!("mosctl stay: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    println!(
        "BENCH recovery_{}MiB_after_node_death {:.2} s (the node seen dead after {:.2} s)",
        a.mib,
        median(total),
        median(detect)
    );
    Ok(())
}

/// `__churn MIB PASSES`: MIB MiB of memory written over PASSES times (every cache line of
/// it each pass), "ready PID" first, "done SUM" last.
pub fn churn(mib: u64, passes: u64) -> Result<i32> {
    let n = (mib << 20) as usize / 8;
    let mut v: Vec<u64> = (0..n as u64).collect();
    println!("ready {}", std::process::id());
    std::io::stdout().flush()?;
    for p in 0..passes {
        for w in v.iter_mut().step_by(8) {
            *w = w.wrapping_mul(6364136223846793005).wrapping_add(p);
        }
        if p % 16 == 0 {
            println!("pass {p}");
            std::io::stdout().flush()?;
        }
    }
    let sum = v.iter().step_by(8).fold(0u64, |a, b| a.wrapping_add(*b));
    println!("done {sum}");
    Ok(0)
}
