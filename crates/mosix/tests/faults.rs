//! Fault injection on a real 4-node testbed (root): migrations, each hit by one fault at a
//! random point, and what must hold after each (docs/migration.md, "Fault injection").
//!
//! A round: a 256 MiB phased job (progs/migheap.c) is started with `mosrun` on node 1 (its
//! home), moved without fault to the source S if S is not 1, computes phase 0, is given
//! phase 1 and, while it computes, moved by `migrate` to the destination D while one fault
//! hits:
//!
//! - `kill_src` / `kill_dst`: SIGKILL of S's or D's mosixd (restarted after the round);
//! - `link_src` / `link_dst`: S's or D's veth (host side) set down, up again after a
//!   random time (0.3..5 s: sometimes longer than the 3 s after which gossip calls a node
//!   down);
//! - `mem_dst`: D's cgroup memory limit set below what the process needs (put back after).
//!
//! at one of these points, each an event that is awaited (polled with a deadline), not a
//! time: `before` the move is asked for, `round@P%` (P% of the job's memory has crossed
//! D's link while the job still runs on S: the pre-copy rounds), `freeze` (the process is
//! seen stopped on S for its final state, after its memory crossed), `restore` (the copy
//! being restored, which appears as soon as the first round arrives, is in D's PID
//! namespace), `after` the move answered. If the move answers before the awaited event,
//! the fault hits then and the point is printed as `<point>>late`.
//!
//! After each round: exactly one copy of the process runs (and where `where` says: at D if
//! the move succeeded, else at S), its output is that of a run that never moved and it
//! exits 7. It is never lost (exit 137, "was lost"): its deputy and supervisor are
//! processes of their own that outlive any mosixd. Then no process is left in any node's
//! cgroup but the daemons, no PID namespace holds the job, and no node lists it.
//!
//! `MOSIX_FAULTS=N` rounds (`MOSIX_FAULT_SEED=S`, `MOSIX_FAULT_FROM=I` to start at round I:
//! each round's draw depends only on the seed and its number, so one round replays alone).
//! scripts/fault.sh runs the ignored test; the other one runs a short form in the suite.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The testbed's names are machine-wide: one fault run at a time in this binary.
static SERIAL: Mutex<()> = Mutex::new(());

/// MiB of the job's heap.
const JOB_MIB: u64 = 256;
/// Rounds of the short form that runs in the normal suite (CI).
const CI_ROUNDS: u64 = 20;
/// Longest a move may take to answer (the daemons' own timeouts are 60 s per step).
const MOVE_DEADLINE: Duration = Duration::from_secs(150);
/// Lines the job reads: phase 0 before the move, phase 1 during it, phase 2 after.
const INPUT: [&str; 3] = ["go 0\n", "go 1\n", "go 2\n"];

// ---------- randomness: splitmix64, one stream per round ----------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    KillSrc,
    KillDst,
    LinkSrc,
    LinkDst,
    MemDst,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::KillSrc,
        Kind::KillDst,
        Kind::LinkSrc,
        Kind::LinkDst,
        Kind::MemDst,
    ];
    fn name(self) -> &'static str {
        match self {
            Kind::KillSrc => "kill_src",
            Kind::KillDst => "kill_dst",
            Kind::LinkSrc => "link_src",
            Kind::LinkDst => "link_dst",
            Kind::MemDst => "mem_dst",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Point {
    Before,
    Freeze,
    /// This percentage of the job's memory has reached the destination while it runs
    /// (pre-copy rounds).
    Round(u64),
    Restore,
    After,
}

impl Point {
    fn name(self) -> String {
        match self {
            Point::Before => "before".into(),
            Point::Freeze => "freeze".into(),
            Point::Round(p) => format!("round@{p}%"),
            Point::Restore => "restore".into(),
            Point::After => "after".into(),
        }
    }
}

/// What one round does, drawn from (seed, round number) alone.
#[derive(Clone, Copy, Debug)]
struct Plan {
    kind: Kind,
    point: Point,
    src: u32,
    dst: u32,
    /// How long a link stays down.
    link_ms: u64,
}

fn plan(seed: u64, round: u64) -> Plan {
    let mut r = Rng(seed ^ round.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.next();
    let kind = Kind::ALL[r.below(5) as usize];
    let src = 1 + r.below(4) as u32;
    let dst = 1 + (src + r.below(3) as u32) % 4;
    // A memory limit lowered under a process that already runs is not a migration fault.
    let points = if kind == Kind::MemDst { 4 } else { 5 };
    let point = match r.below(points) {
        0 => Point::Before,
        1 => Point::Freeze,
        2 => Point::Round(5 + r.below(91)),
        3 => Point::Restore,
        _ => Point::After,
    };
    let link_ms = 300 + r.below(4700);
    Plan {
        kind,
        point,
        src,
        dst,
        link_ms,
    }
}

// ---------- looking at processes from the host ----------

#[derive(Clone, Debug)]
struct ProcInfo {
    pid: i32,
    comm: String,
    state: char,
    nspid: Vec<i32>,
    /// The testbed node whose cgroup it is in.
    node: Option<u32>,
}

impl std::fmt::Display for ProcInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} ({}, {}, NSpid {:?}, node {})",
            self.pid,
            self.comm,
            self.state,
            self.nspid,
            self.node.map_or("-".into(), |n| n.to_string())
        )
    }
}

fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ")?.1.chars().next()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()?
        .trim()
        .to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let node = cg.lines().find_map(|l| {
        let pre = format!("/{}", common::tb_prefix());
        let i = l.find(&pre)?;
        let rest = &l[i + pre.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    });
    Some(ProcInfo {
        pid,
        comm,
        state,
        nspid,
        node,
    })
}

fn all_procs() -> Vec<ProcInfo> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_info)
        .collect()
}

/// Live copies of the job: in a testbed cgroup, named like it, with the home PID as its
/// innermost PID.
fn copies(comm: &str, home_pid: i32) -> Vec<ProcInfo> {
    all_procs()
        .into_iter()
        .filter(|p| {
            p.node.is_some()
                && p.comm == comm
                && p.state != 'Z'
                && p.nspid.last() == Some(&home_pid)
        })
        .collect()
}

/// A copy being restored on `node` (any process there whose innermost PID is the home PID
/// in a nested PID namespace).
fn restoring_on(node: u32, home_pid: i32) -> bool {
    let Some((d, _, _)) = mem_limit_file(node) else {
        return false;
    };
    std::fs::read_to_string(d.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter_map(proc_info)
        .any(|p| p.nspid.len() > 1 && p.nspid.last() == Some(&home_pid))
}

/// What must not be there once the job has ended: any process in a node's cgroup but the
/// daemons, and any process in a nested PID namespace whose PID there is the home PID.
fn leftovers(daemons: &[i32], home_pid: i32) -> Vec<ProcInfo> {
    all_procs()
        .into_iter()
        .filter(|p| {
            (p.node.is_some() && !daemons.contains(&p.pid))
                || (p.nspid.len() > 1 && p.nspid.last() == Some(&home_pid))
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    proc_info(pid).is_some_and(|p| p.state != 'Z' && p.state != 'X')
}

// ---------- the fault actions ----------

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// The host end of `node`'s link, as `mosix testbed` names it for this instance.
fn veth(node: u32) -> String {
    match common::instance() {
        0 => format!("mtb{node}h"),
        k => format!("mt{k}b{node}h"),
    }
}

/// Bytes the bridge has sent into `node`'s link.
fn link_rx(node: u32) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{}/statistics/tx_bytes", veth(node)))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The memory cgroup directory of `node` and the file that holds its limit (v1 or v2).
fn mem_limit_file(node: u32) -> Option<(PathBuf, &'static str, &'static str)> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let name = format!("{}{node}", common::tb_prefix());
    let mut v2 = None;
    for l in mi.lines() {
        let (a, b) = l.split_once(" - ")?;
        let point = a.split(' ').nth(4)?;
        let mut g = b.split(' ');
        let fstype = g.next()?;
        let opts = g.nth(1).unwrap_or("");
        if fstype == "cgroup" && opts.split(',').any(|o| o == "memory") {
            let d = Path::new(point).join(&name);
            if d.is_dir() {
                return Some((d, "memory.limit_in_bytes", "memory.usage_in_bytes"));
            }
        } else if fstype == "cgroup2" {
            let d = Path::new(point).join(&name);
            if d.join("memory.max").exists() {
                v2 = Some((d, "memory.max", "memory.current"));
            }
        }
    }
    v2
}

/// Lowers `node`'s memory limit below what a `JOB_MIB` process needs (half of it, or a
/// little over what the cgroup uses now if that is more: the kernel refuses a limit it
/// cannot reclaim down to). Returns the old limit and the new one.
fn lower_mem(node: u32) -> Result<(String, u64), String> {
    let (d, limit, usage) = mem_limit_file(node).ok_or("no memory cgroup for the node")?;
    let old = std::fs::read_to_string(d.join(limit))
        .map_err(|e| format!("{limit}: {e}"))?
        .trim()
        .to_string();
    let mut last = String::new();
    for extra in [8u64, 16, 32, 64] {
        let used: u64 = std::fs::read_to_string(d.join(usage))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let want = (JOB_MIB << 20)
            .div_ceil(2)
            .max(used + (extra << 20))
            .next_multiple_of(1 << 20);
        match std::fs::write(d.join(limit), want.to_string()) {
            Ok(()) => return Ok((old, want)),
            Err(e) => last = format!("{e}"),
        }
    }
    Err(format!("cannot lower the memory limit: {last}"))
}

/// How many processes the kernel's OOM killer has killed in `node`'s memory cgroup.
fn oom_kills(node: u32) -> u64 {
    let Some((d, limit, _)) = mem_limit_file(node) else {
        return 0;
    };
    let (file, key) = if limit == "memory.max" {
        ("memory.events", "oom_kill ")
    } else {
        ("memory.oom_control", "oom_kill ")
    };
    std::fs::read_to_string(d.join(file))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or(0)
}

fn restore_mem(node: u32, old: &str) -> Result<(), String> {
    let (d, limit, _) = mem_limit_file(node).ok_or("no memory cgroup for the node")?;
    let v = if limit == "memory.max" { "max" } else { "-1" };
    let v = if old.is_empty() { v } else { old };
    std::fs::write(d.join(limit), v).map_err(|e| format!("restoring {limit}: {e}"))
}

// ---------- the job ----------

struct FaultJob {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    home_pid: i32,
}

impl FaultJob {
    /// `testbed exec` and mosrun exec: the child is the job, its PID the home PID.
    fn start(tb: &Testbed, argv: &[&str]) -> Result<FaultJob, String> {
        let mut args = vec!["run"];
        args.extend_from_slice(argv);
        let mut child = tb
            .cmd(1, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("mosrun: {e}"))?;
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    return;
                }
                e.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdin = child.stdin.take();
        let home_pid = child.id() as i32;
        let mut j = FaultJob {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
            stderr,
            home_pid,
        };
        let first = j.line()?;
        if !first.starts_with("start") {
            return Err(format!("first line {first:?}"));
        }
        Ok(j)
    }

    fn line(&mut self) -> Result<String, String> {
        match self.lines.recv_timeout(DEADLINE) {
            Ok(l) => {
                self.seen.push(l.clone());
                Ok(l)
            }
            Err(_) => Err(format!(
                "hang: no output line within {}s after {:?}; mosrun stderr {:?}",
                DEADLINE.as_secs(),
                self.seen,
                self.stderr()
            )),
        }
    }

    /// Gives the job a line; a job that has ended does not take it (not an error here).
    fn send(&mut self, s: &str) {
        if let Some(w) = self.stdin.as_mut() {
            if w.write_all(s.as_bytes()).and_then(|_| w.flush()).is_err() {
                self.stdin = None;
            }
        }
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().trim().to_string()
    }

    /// Closes stdin, reads the rest of the output and waits for mosrun (bounded).
    fn finish(&mut self) -> Result<std::process::ExitStatus, String> {
        self.stdin = None;
        let end = Instant::now() + DEADLINE;
        loop {
            match self
                .lines
                .recv_timeout(end.saturating_duration_since(Instant::now()))
            {
                Ok(l) => self.seen.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "hang: output not closed within {}s after {:?}",
                        DEADLINE.as_secs(),
                        self.seen
                    ))
                }
            }
        }
        wait_child(&mut self.child, DEADLINE).ok_or_else(|| "hang: mosrun does not exit".into())
    }
}

impl Drop for FaultJob {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Output and exit code of the job run plainly, never moved.
fn unmoved(argv: &[&str]) -> (Vec<String>, Option<i32>) {
    let (out, code) = reference(argv, &INPUT.concat());
    (normalise(&out), code)
}

// ---------- the bench: a testbed and what the rounds share ----------

struct Bench {
    tb: Testbed,
    heap: PathBuf,
    want: (Vec<String>, Option<i32>),
    daemons: [i32; 4],
}

impl Bench {
    fn new(heap: PathBuf, want: (Vec<String>, Option<i32>)) -> Bench {
        let tb = Testbed::up(&[]);
        let mut b = Bench {
            tb,
            heap,
            want,
            daemons: [0; 4],
        };
        for n in 1..=4 {
            // Only the moves this test asks for: no automatic balancing. A restarted
            // daemon gets the same from its config.
            let o = b.tb.exec(n, &["mosctl", "stay"]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let nd = b.tb.dir.path().join(format!("n{n}"));
            let cfg = std::fs::read_to_string(nd.join("mosix.toml")).unwrap();
            std::fs::write(nd.join("stay.toml"), format!("auto_balance = false\n{cfg}")).unwrap();
        }
        b.read_daemons().unwrap();
        b.converged_now().unwrap();
        b
    }

    fn read_daemons(&mut self) -> Result<(), String> {
        let o = self.tb.testbed(&["status", "--json"], &[]);
        let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("status: {e}"))?;
        for (i, n) in v.as_array().ok_or("status: not a list")?.iter().enumerate() {
            self.daemons[i] = n["daemon_pid"]
                .as_i64()
                .ok_or_else(|| format!("node {}'s mosixd is not running", i + 1))?
                as i32;
        }
        Ok(())
    }

    fn daemon(&self, n: u32) -> i32 {
        self.daemons[(n - 1) as usize]
    }

    /// Whether every node sees the 4 nodes up now; else why not.
    fn converged_now(&self) -> Result<(), String> {
        for n in 1..=4 {
            let o = self.tb.exec(n, &["status", "--json"]);
            let up = serde_json::from_slice::<Value>(&o.stdout)
                .ok()
                .and_then(|v| {
                    Some(
                        v["nodes"]
                            .as_array()?
                            .iter()
                            .filter(|x| x["status"] == 3)
                            .count(),
                    )
                });
            if up != Some(4) {
                return Err(format!("node {n} does not see 4 nodes up ({up:?})"));
            }
        }
        Ok(())
    }

    /// Starts again the daemons that died (adding them to `died`: a daemon may still be
    /// dying when this begins) until every node sees every node up.
    fn settle(&mut self, died: &mut Vec<u32>) -> Result<(), String> {
        let end = Instant::now() + DEADLINE;
        loop {
            for n in self.restart_dead()? {
                if !died.contains(&n) {
                    died.push(n);
                }
            }
            match self.converged_now() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > end => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Starts again every daemon that died; the nodes whose daemon did.
    fn restart_dead(&mut self) -> Result<Vec<u32>, String> {
        let dead: Vec<u32> = (1..=4).filter(|n| !alive(self.daemon(*n))).collect();
        for &n in &dead {
            let cfg = self.tb.dir.path().join(format!("n{n}/stay.toml"));
            let o = self.tb.testbed(
                &["start", &n.to_string(), "--config", cfg.to_str().unwrap()],
                &[],
            );
            if !o.status.success() {
                return Err(format!(
                    "cannot restart node {n}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
        }
        if !dead.is_empty() {
            self.read_daemons()?;
        }
        Ok(dead)
    }

    fn ps(&self, n: u32) -> Result<Vec<Value>, String> {
        let o = self.tb.exec(n, &["ps", "--json"]);
        if !o.status.success() {
            return Err(format!(
                "ps on node {n}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        serde_json::from_slice::<Value>(&o.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .ok_or_else(|| format!("ps on node {n}: not JSON"))
    }

    fn where_(&self, pid: i32) -> Result<u32, String> {
        let o = self.tb.exec(1, &["where", &pid.to_string()]);
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        let w: u32 = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .map_err(|_| "where: not a number".to_string())?;
        Ok(if w == 0 { 1 } else { w })
    }

    fn migrate_cmd(&self, pid: i32, to: u32) -> Command {
        let to = if to == 1 {
            "home".to_string()
        } else {
            to.to_string()
        };
        let mut c = self.tb.cmd(1, &["migrate", &pid.to_string(), &to]);
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

/// How a round ended.
struct Report {
    point: String,
    outcome: String,
    notes: Vec<String>,
}

/// A fault in effect, to be undone after the round.
#[derive(Default)]
struct Undo {
    link: Option<std::thread::JoinHandle<Result<(), String>>>,
    link_node: Option<u32>,
    mem: Option<(u32, String)>,
}

impl Undo {
    fn undo(&mut self) -> Result<(), String> {
        let mut err = Ok(());
        if let Some(h) = self.link.take() {
            err = h
                .join()
                .unwrap_or_else(|_| Err("link thread panicked".into()));
        }
        if let Some(n) = self.link_node.take() {
            // Up in any case (the thread may have failed half way).
            let _ = ip(&["link", "set", &veth(n), "up"]);
        }
        if let Some((n, old)) = self.mem.take() {
            if let Err(e) = restore_mem(n, &old) {
                err = Err(e);
            }
        }
        err
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        let _ = self.undo();
    }
}

fn inject(b: &Bench, p: &Plan, undo: &mut Undo, notes: &mut Vec<String>) -> Result<(), String> {
    let node = match p.kind {
        Kind::KillSrc | Kind::LinkSrc => p.src,
        _ => p.dst,
    };
    match p.kind {
        Kind::KillSrc | Kind::KillDst => {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(b.daemon(node)),
                nix::sys::signal::Signal::SIGKILL,
            )
            .map_err(|e| format!("kill: {e}"))?;
            // Dead when the fault is over (a daemon with a big buffer takes a moment).
            let end = Instant::now() + DEADLINE;
            while alive(b.daemon(node)) {
                if Instant::now() > end {
                    return Err(format!("node {node}'s mosixd does not die of SIGKILL"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Kind::LinkSrc | Kind::LinkDst => {
            ip(&["link", "set", &veth(node), "down"])?;
            undo.link_node = Some(node);
            let ms = p.link_ms;
            undo.link = Some(std::thread::spawn(move || {
                // How long the link stays down is the fault's size, not a wait for anything.
                std::thread::sleep(Duration::from_millis(ms));
                ip(&["link", "set", &veth(node), "up"])
            }));
        }
        Kind::MemDst => {
            let (old, new) = lower_mem(node)?;
            notes.push(format!("limit {} MiB", new >> 20));
            undo.mem = Some((node, old));
        }
    }
    Ok(())
}

/// One round. Err is a failure of what must hold (or of the test's own setup).
fn round(b: &mut Bench, p: &Plan) -> Result<Report, String> {
    let mut notes = Vec::new();
    let heap = b.heap.to_str().unwrap().to_string();
    let mib = JOB_MIB.to_string();
    let mut job = FaultJob::start(&b.tb, &[&heap, &mib])?;
    let home_pid = job.home_pid;
    if p.src != 1 {
        let mut o = b.migrate_cmd(home_pid, p.src).output().unwrap();
        for _ in 0..2 {
            let e = String::from_utf8_lossy(&o.stderr);
            if o.status.success() || !(e.contains("is down") || e.contains("cannot connect")) {
                break;
            }
            // After the last round's fault, a link that came back: gossip may call a node
            // down again for a moment, and an address resolution begun while the link was
            // down fails the first connection after it ("No route to host"). Once every
            // node sees every node up, again.
            b.settle(&mut Vec::new())?;
            o = b.migrate_cmd(home_pid, p.src).output().unwrap();
        }
        if !o.status.success() {
            return Err(format!(
                "setup: the fault-free move to node {} failed: {}",
                p.src,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
    }
    job.send(INPUT[0]);
    let l = job.line()?;
    if !l.starts_with("phase 0") {
        return Err(format!("setup: got {l:?}"));
    }
    let here = copies("migheap", home_pid);
    if here.len() != 1 || here[0].node != Some(p.src) {
        return Err(format!(
            "setup: the job is not (only) on node {}: {here:?}",
            p.src
        ));
    }
    let src_pid = here[0].pid;
    let ooms_before: Vec<u64> = (1..=4).map(oom_kills).collect();

    // The move, and the fault at its point.
    let mut undo = Undo::default();
    job.send(INPUT[1]);
    if p.point == Point::Before {
        inject(b, p, &mut undo, &mut notes)?;
    }
    let rx0 = link_rx(p.dst);
    let mut mig = b.migrate_cmd(home_pid, p.dst).spawn().unwrap();
    let mut point = p.point.name();
    if p.point != Point::Before {
        let end = Instant::now() + MOVE_DEADLINE;
        let mut late = false;
        loop {
            let crossed =
                |pct: u64| link_rx(p.dst).saturating_sub(rx0) >= (JOB_MIB << 20) * pct / 100;
            let reached = match p.point {
                // Stopped for its final state (not for the moment tracking starts).
                Point::Freeze => proc_info(src_pid).is_some_and(|i| i.state == 't') && crossed(95),
                Point::Round(pct) => {
                    crossed(pct) && proc_info(src_pid).is_some_and(|i| i.state != 't')
                }
                Point::Restore => restoring_on(p.dst, home_pid),
                Point::After | Point::Before => false,
            };
            if reached {
                break;
            }
            if matches!(mig.try_wait(), Ok(Some(_))) {
                late = p.point != Point::After;
                break;
            }
            if Instant::now() > end {
                let _ = mig.kill();
                return Err(format!(
                    "hang: the move did not answer within {MOVE_DEADLINE:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if late {
            point += ">late";
        }
        inject(b, p, &mut undo, &mut notes)?;
    }
    let Some(st) = wait_child(&mut mig, MOVE_DEADLINE) else {
        let _ = mig.kill();
        return Err(format!(
            "hang: the move did not answer within {MOVE_DEADLINE:?}"
        ));
    };
    let mut err = String::new();
    mig.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let moved = st.success();
    if moved {
        notes.push(format!("moved {}->{}", p.src, p.dst));
    } else {
        notes.push(format!(
            "stayed {}->{}: {}",
            p.src,
            p.dst,
            err.trim().lines().last().unwrap_or("")
        ));
    }

    // Undo the fault; start again the daemons that died (killed, or out of memory).
    undo.undo()?;
    let mut died = Vec::new();
    b.settle(&mut died)?;
    let killed = match p.kind {
        Kind::KillSrc => Some(p.src),
        Kind::KillDst => Some(p.dst),
        _ => None,
    };
    // A daemon that the fault did not kill must live through it (an OOM kill of the
    // receiver by a move it could not hold is a defect: it takes its other guests along).
    // The round's other checks still run; it fails at the end.
    let mut unkilled_death = None;
    for n in &died {
        if Some(*n) != killed {
            let oom = oom_kills(*n) - ooms_before[(*n - 1) as usize];
            let what = format!(
                "node {n}'s mosixd died{}",
                if oom > 0 { " (OOM-killed)" } else { "" }
            );
            notes.push(format!("DAEMON-DIED {what}"));
            unkilled_death.get_or_insert(what);
        }
    }

    // Exactly one copy, where `where` says, or mosrun gone.
    let end = Instant::now() + DEADLINE;
    let mut last;
    loop {
        if job.exited().is_some() {
            break;
        }
        let c = copies("migheap", home_pid);
        if c.len() == 1 && c[0].state != 't' {
            match b.where_(home_pid) {
                Ok(w) if Some(w) == c[0].node => {
                    let expect = if moved { p.dst } else { p.src };
                    if w != expect {
                        return Err(format!(
                            "runs on node {w}, but the move {} (expected node {expect})",
                            if moved { "succeeded" } else { "failed" }
                        ));
                    }
                    break;
                }
                Ok(w) => last = format!("where says {w}, the copy is {}", c[0]),
                Err(e) => last = format!("where: {e}"),
            }
        } else {
            last = format!(
                "{} copies: {}",
                c.len(),
                c.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        if Instant::now() > end {
            return Err(format!(
                "not exactly one copy running after {DEADLINE:?}: {last}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // The rest of its work, and what it printed.
    job.send(INPUT[2]);
    let st = job.finish()?;
    let got = normalise(&job.seen);
    // Never lost: nothing of a job depends on a mosixd staying alive (its deputy and
    // supervisor are processes of their own; a daemon killed while it held the frozen
    // process lets it go on where it was), and no fault here crashes a node.
    if st.code() == Some(137) && job.stderr().contains("was lost") {
        return Err(format!("lost (output {got:?}): {}", job.stderr()));
    }
    if got != b.want.0 || st.code() != b.want.1 {
        return Err(format!(
            "output {got:?} exit {:?}, want {:?} exit {:?}; mosrun stderr {:?}",
            st.code(),
            b.want.0,
            b.want.1,
            job.stderr()
        ));
    }
    let outcome = if moved { "ok:moved" } else { "ok:stayed" };

    // Nothing left behind: processes, PID namespaces, entries in the daemons.
    let end = Instant::now() + DEADLINE;
    loop {
        let left = leftovers(&b.daemons, home_pid);
        if left.is_empty() {
            break;
        }
        if Instant::now() > end {
            return Err(format!(
                "left behind after {DEADLINE:?}: {}",
                left.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for n in 1..=4 {
        let end = Instant::now() + DEADLINE;
        loop {
            let l = b.ps(n)?;
            if l.is_empty() {
                break;
            }
            if Instant::now() > end {
                return Err(format!("node {n} still lists {l:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if let Some(what) = unkilled_death {
        return Err(format!(
            "{what} though the fault did not kill it ({outcome} otherwise; {})",
            notes.join("; ")
        ));
    }
    Ok(Report {
        point,
        outcome: outcome.into(),
        notes,
    })
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

/// Runs `rounds` rounds from `from` with `seed`; panics (after all of them) if any failed.
fn run_faults(rounds: u64, seed: u64, from: u64, how: &str) {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (network namespaces, cgroups, ptrace): run it as root");
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "fault injection: {rounds} rounds from {from}, seed {seed} (replay: {how} --seed {seed}{})",
        if from > 0 {
            format!(" --from {from}")
        } else {
            String::new()
        }
    );
    let heap = compile("migheap");
    let mib = JOB_MIB.to_string();
    let want = unmoved(&[heap.to_str().unwrap(), &mib]);
    let mut bench = Some(Bench::new(heap.clone(), want.clone()));
    let mut failed = Vec::new();
    let mut tally: std::collections::BTreeMap<(&str, String), u64> = Default::default();
    for i in from..from + rounds {
        let p = plan(seed, i);
        let b = bench.get_or_insert_with(|| Bench::new(heap.clone(), want.clone()));
        let t0 = Instant::now();
        let r = round(b, &p);
        let secs = t0.elapsed().as_secs_f64();
        match r {
            Ok(r) => {
                println!(
                    "FAULT {i} {} {} {} ({}; {secs:.1}s)",
                    p.kind.name(),
                    r.point,
                    r.outcome,
                    r.notes.join("; ")
                );
                *tally.entry((p.kind.name(), r.outcome)).or_default() += 1;
            }
            Err(e) => {
                println!(
                    "FAULT {i} {} {} FAIL {}->{}: {e} ({secs:.1}s)",
                    p.kind.name(),
                    p.point.name(),
                    p.src,
                    p.dst
                );
                *tally.entry((p.kind.name(), "FAIL".into())).or_default() += 1;
                failed.push(format!("round {i} (seed {seed}): {e}"));
                // A fresh testbed for the next round, whatever this one left.
                bench = None;
            }
        }
    }
    drop(bench);
    for ((k, o), n) in &tally {
        println!("TALLY {k} {o} {n}");
    }
    println!(
        "{} passed, {} failed",
        rounds - failed.len() as u64,
        failed.len()
    );
    assert!(failed.is_empty(), "failed rounds:\n{}", failed.join("\n"));
}

fn seed() -> u64 {
    env_u64("MOSIX_FAULT_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        (t.as_nanos() as u64 ^ u64::from(std::process::id())) % 1_000_000_000
    })
}

/// scripts/fault.sh N [--seed S] [--from I]: MOSIX_FAULTS rounds.
#[test]
#[ignore = "long: run by scripts/fault.sh"]
fn faults() {
    let n = env_u64("MOSIX_FAULTS").unwrap_or(200);
    let from = env_u64("MOSIX_FAULT_FROM").unwrap_or(0);
    run_faults(n, seed(), from, &format!("scripts/fault.sh {n}"));
}

/// The short form, in the normal suite (`MOSIX_FAULTS_CI=N` rounds, 20 by default: about
/// two minutes).
#[test]
fn faults_short() {
    let n = env_u64("MOSIX_FAULTS_CI").unwrap_or(CI_ROUNDS);
    run_faults(
        n,
        seed(),
        0,
        // The same rounds as the long form's first n.
        &format!("scripts/fault.sh {n}"),
    );
}
