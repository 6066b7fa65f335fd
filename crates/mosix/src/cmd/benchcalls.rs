//! `mosix testbed bench-calls`: what a call carried home costs. A process started on node
//! 1 with a file open there makes the same calls at home and after a move to node 2
//! (where every call on that file is made by its deputy at home), alternating, against
//! the veth link's TCP bandwidth measured in the same run. Also the hidden helper it
//! runs (`__calls FILE`).

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

fn measure(me: &Path, dir: &Path, a: &Args) -> Result<()> {
    let file = dir.join("bench-calls.dat");
    {
        let f = std::fs::File::create(&file)?;
        f.set_len(a.mib << 20)?;
    }
    let mut child = on_node(me, dir, 1)
        .args(["run", me.to_str().unwrap_or("mosix"), "__calls"])
        .arg(&file)
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
    let (mut lat_home, mut lat_away, mut lat_ratio) = (vec![], vec![], vec![]);
    let (mut rd, mut wr, mut rd_ratio, mut wr_ratio, mut link) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut rd_home, mut wr_home) = (vec![], vec![]);
    let r = (|| -> Result<()> {
        for _ in 0..a.repeat {
            let home = job.ask(&format!("lat {}", a.calls * 10))?;
            rd_home.push(bytes / job.ask("read")?);
            wr_home.push(bytes / job.ask("write")?);
            let bw = link_bandwidth(me, dir, a.mib.max(64))?;
            link.push(bw);
            migrate(&sock, job.pid, 2)?;
            let away = job.ask(&format!("lat {}", a.calls))?;
            let r_s = job.ask("read")?;
            let w_s = job.ask("write")?;
            migrate(&sock, job.pid, 0)?;
            lat_home.push(home);
            lat_away.push(away);
            lat_ratio.push(away / home);
            rd.push(bytes / r_s);
            wr.push(bytes / w_s);
            rd_ratio.push(bytes / r_s / bw);
            wr_ratio.push(bytes / w_s / bw);
        }
        Ok(())
    })();
    if let Some(mut w) = job.child.stdin.take() {
        let _ = w.write_all(b"q\n");
    }
    let _ = job.child.wait();
    let _ = std::fs::remove_file(&file);
    r?;
    println!(
        "BENCH forwarded_call_latency {:.1} us vs local={:.0}",
        median(lat_away) / 1e3,
        median(lat_ratio)
    );
    println!("BENCH local_call_latency {:.2} us", median(lat_home) / 1e3);
    let gb = |v: Vec<f64>| median(v) / 1e9;
    println!(
        "BENCH forwarded_read_{}MiB {:.3} GB/s vs veth_tcp={:.3}",
        a.mib,
        gb(rd),
        median(rd_ratio)
    );
    println!(
        "BENCH forwarded_write_{}MiB {:.3} GB/s vs veth_tcp={:.3}",
        a.mib,
        gb(wr),
        median(wr_ratio)
    );
    println!("BENCH local_read_{}MiB {:.3} GB/s", a.mib, gb(rd_home));
    println!("BENCH local_write_{}MiB {:.3} GB/s", a.mib, gb(wr_home));
    println!("BENCH veth_tcp_bandwidth {:.3} GB/s", gb(link));
    Ok(())
}

/// `__calls FILE`: with FILE open, answer commands on stdin, one line each: `lat N` (N
/// one-byte preads, nanoseconds per call), `read` / `write` (the whole file in 1 MiB
/// preads / pwrites, seconds), `q`.
pub fn calls(file: &Path) -> Result<i32> {
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
    loop {
        line.clear();
        if std::io::stdin().read_line(&mut line)? == 0 {
            return Ok(0);
        }
        let mut w = line.split_whitespace();
        let answer = match (w.next(), w.next()) {
            (Some("lat"), Some(n)) => {
                let n: u64 = n.parse()?;
                let t = Instant::now();
                for _ in 0..n {
                    f.read_at(&mut buf[..1], 0)?;
                }
                t.elapsed().as_nanos() as f64 / n.max(1) as f64
            }
            (Some("read"), None) => {
                let t = Instant::now();
                let mut off = 0;
                while off < size {
                    let n = f.read_at(&mut buf, off)?;
                    if n == 0 {
                        break;
                    }
                    off += n as u64;
                }
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
                t.elapsed().as_secs_f64()
            }
            _ => return Ok(0),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
}
