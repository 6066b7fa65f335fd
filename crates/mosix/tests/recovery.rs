//! Checkpoints for the user and automatic recovery on a real 4-node testbed (root):
//! `mosrun -C FILE -A MINUTES`, `migrate PID checkpoint|chkexit|freeze|continue`,
//! `mosrun -R FILE`, and a job that survives the death of the node it runs on (killed
//! with everything on it, or cut off by its link) with its output, the file it writes at
//! home and its exit status those of a run that was never interrupted. One test function:
//! the testbed's names are machine-wide. Every wait is for an event (a file, a line, a
//! process's end, CPU time used) with a deadline; no timing thresholds.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's python (scripts/setup.sh installs it): the program itself.
const PY: &str = "/usr/bin/python3";

/// A deterministic job: for each line of its stdin, some arithmetic, one line of output
/// and the same line into a file at home (argv[1], opened once, written in place). It
/// also walks a ring of directories at home by relative paths (argv[2]/a, a/b, a/b/c,
/// back to a), one step a line, and prints the name it reads in each: from any other
/// directory than the one it should be in, its next step fails or reads another name, so
/// a recovery that does not put its working directory back shows in its output.
const JOB: &str = r#"import os, sys
out = open(sys.argv[1], "w")
os.chdir(os.path.join(sys.argv[2], "a"))
print("start", flush=True)
s = n = 0
for line in sys.stdin:
    v = int(line)
    for j in range(12000):
        s = (s + j * v) % 1000003
    n += 1
    try:
        os.chdir(("b", "c", "../..")[n % 3 - 1])
        with open("name") as f:
            here = f.read().strip()
    except OSError as e:
        sys.exit("line %d: %s, in %s" % (n, e, os.getcwd()))
    print(n, s, here, flush=True)
    out.write("%d %d\n" % (n, s))
    out.flush()
print("end", n, s, flush=True)
sys.exit(5)
"#;

/// A job in phases gated by lines of its stdin (no PID in its output: `mosrun -R` gives
/// the process mosrun's PID), one step a phase in JOB's ring of directories (argv[1]).
const PHASED: &str = r#"import os, sys
os.chdir(os.path.join(sys.argv[1], "a"))
print("start", flush=True)
acc = 0
phase = 0
for line in sys.stdin:
    for i in range(200000):
        acc = (acc * 31 + i + phase) % 1000000007
    os.chdir(("b", "c", "../..")[phase % 3])
    with open("name") as f:
        here = f.read().strip()
    print("phase", phase, acc, "got", line.strip(), "in", here, flush=True)
    phase += 1
print("end", flush=True)
sys.exit(3)
"#;

/// Checkpoint numbers looked at for the first periodic one (one every 1.2 s: 60 s hold 50).
const CKPT_NUMBERS: u32 = 60;

/// The input of JOB: numbers 1..=n, one a line.
fn numbers(from: u32, to: u32) -> String {
    (from..=to).map(|i| format!("{i}\n")).collect()
}

/// `got` equals `want`; if not, where they part (a few lines, not thousands).
fn same_lines(got: &[String], want: &[String], what: &str) {
    if got == want {
        return;
    }
    let i = got.iter().zip(want).take_while(|(a, b)| a == b).count();
    let near = |v: &[String]| v[i.saturating_sub(2)..(i + 3).min(v.len())].to_vec();
    panic!(
        "{what}: output differs from line {i} on ({} lines, {} wanted): got {:?}, wanted {:?}",
        got.len(),
        want.len(),
        near(got),
        near(want)
    );
}

fn wait_for(what: &str, deadline: Duration, cond: impl Fn() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A job started by `mosrun ARGS` on node 1, whose stderr is kept too.
struct Run {
    job: Job,
    err: std::sync::mpsc::Receiver<String>,
}

/// Starts `mosrun ARGS` on node 1 in directory `cwd`.
fn start(tb: &Testbed, cwd: &Path, args: &[&str]) -> Run {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    use std::os::unix::process::CommandExt;
    let mut child = tb
        .cmd(1, &all)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let err = lines_of(child.stderr.take().unwrap());
    let lines = lines_of(child.stdout.take().unwrap());
    let stdin = child.stdin.take();
    let home_pid = child.id() as i32;
    let mut job = Job {
        child,
        stdin,
        lines,
        seen: Vec::new(),
        home_pid,
    };
    assert_eq!(job.line(), "start");
    Run { job, err }
}

fn lines_of(r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

impl Run {
    /// Closes stdin, reads the rest; all output, the exit status and stderr's lines.
    fn finish(self) -> (Vec<String>, std::process::ExitStatus, Vec<String>) {
        let (out, st) = self.job.finish();
        let err: Vec<String> = self.err.try_iter().collect();
        (out, st, err)
    }
}

/// The guest of `home_pid` on node `n` (its PID there), if it runs there.
fn guest_pid(tb: &Testbed, n: u32, home_pid: i32) -> Option<i64> {
    tb.ps(n)
        .into_iter()
        .find(|p| p["home_pid"] == home_pid && p["role"] == "guest")
        .and_then(|p| p["pid"].as_i64())
}

/// The home entry of `home_pid` in node 1's `ps`.
fn home_entry(tb: &Testbed, home_pid: i32) -> Option<Value> {
    tb.ps(1)
        .into_iter()
        .find(|p| p["home_pid"] == home_pid && p["role"] == "home")
}

/// utime + stime of `pid` in clock ticks (None once it is gone).
fn cpu_ticks(pid: i64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn state_of(pid: i64) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
        .unwrap_or('?')
}

/// The host end of `node`'s link, as `mosix testbed` names it for this instance.
fn veth(node: u32) -> String {
    match instance() {
        0 => format!("mtb{node}h"),
        k => format!("mt{k}b{node}h"),
    }
}

fn ip_link(dev: &str, state: &str) {
    let o = Command::new("ip")
        .args(["link", "set", dev, state])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// JOB's ring of directories (`what`-ring/a, a/b, a/b/c, each with its name in `name`),
/// at home and not under a shared path: each of its steps is a call its deputy carries
/// out, in the deputy's working directory.
fn ring(tb: &Testbed, what: &str) -> String {
    let ring = tb.dir.path().join(format!("{what}-ring"));
    let mut d = ring.clone();
    for name in ["a", "b", "c"] {
        d = d.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), name).unwrap();
    }
    ring.to_str().unwrap().to_string()
}

/// How node 2 dies in a recovery round.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Death {
    /// Everything on it killed, its link down (`mosix testbed crash`).
    Crash,
    /// Cut off: its link down, everything on it alive.
    Cut,
}

/// A job with checkpoints runs on node 2, which dies mid-run: it finishes elsewhere with
/// what an uninterrupted run gives, and says once on stderr that it was recovered.
fn survives(tb: &Testbed, work: &Path, death: Death) {
    let script = work.join("job.py");
    let file = work.join(format!("{death:?}.out"));
    let reffile = work.join(format!("{death:?}.ref"));
    let base = work.join(format!("{death:?}.ckpt"));
    let input = numbers(1, 1600);
    let ring = ring(tb, &format!("{death:?}"));
    let ring = ring.as_str();
    let (want, want_code) = reference(
        &[
            PY,
            script.to_str().unwrap(),
            reffile.to_str().unwrap(),
            ring,
        ],
        &input,
    );
    let mut r = start(
        tb,
        work,
        &[
            "-C",
            base.to_str().unwrap(),
            "-A",
            "0.02",
            "-r",
            "2",
            PY,
            script.to_str().unwrap(),
            file.to_str().unwrap(),
            ring,
        ],
    );
    let pid = r.job.home_pid;
    // Half of its input now, the rest once node 2 is dead: it cannot end before.
    r.job.send(&numbers(1, 800));
    // It runs there from its first instruction (`-r 2`); home publishes it an instant later.
    wait_for("home says it runs on node 2", DEADLINE, || {
        tb.where_(pid) == "2"
    });
    let old = guest_pid(tb, 2, pid).expect("it runs on node 2");
    // A checkpoint taken there (the first is the image of its move), and output since.
    // (A periodic checkpoint that fails, say while its forwarded read is settled, is
    // tried again at the next period under the next number: any number after the first.)
    wait_for("a checkpoint of it taken on node 2", DEADLINE, || {
        (2..=CKPT_NUMBERS).any(|n| PathBuf::from(format!("{}.{n}", base.display())).exists())
    });
    let l = r.job.line();
    assert!(!l.starts_with("end"), "{l}");
    match death {
        Death::Crash => {
            tb.ok(&["crash", "2"]);
        }
        Death::Cut => ip_link(&veth(2), "down"),
    }
    r.job.send(&numbers(801, 1600));
    let end = Instant::now() + Duration::from_secs(90);
    while !home_entry(tb, pid).is_some_and(|p| p["state"] == "away" && p["where_"] != 2) {
        if let Ok(Some(st)) = r.job.child.try_wait() {
            let err: Vec<String> = r.err.try_iter().collect();
            panic!("{death:?}: it ended ({st}) instead of running again; stderr {err:?}");
        }
        assert!(
            Instant::now() < end,
            "{death:?}: timed out waiting until it runs again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (got, st, err) = r.finish();
    same_lines(&got, &want, &format!("{death:?} (stderr {err:?})"));
    assert_eq!(st.code(), want_code, "{death:?}: exit status");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        std::fs::read(&reffile).unwrap(),
        "{death:?}: its file at home"
    );
    let said: Vec<&String> = err.iter().filter(|l| l.contains("was recovered")).collect();
    assert_eq!(said.len(), 1, "{death:?}: stderr {err:?}");
    assert!(said[0].contains("node 2 stopped answering"), "{}", said[0]);
    assert_eq!(err.len(), 1, "{death:?}: nothing else on stderr: {err:?}");
    match death {
        Death::Crash => {
            assert!(!Path::new(&format!("/proc/{old}")).exists());
            tb.ok(&["start", "2"]);
        }
        Death::Cut => {
            // Cut off, its copy there lived on, reaching nobody; once the link is back it
            // is ended: never two copies.
            assert!(
                Path::new(&format!("/proc/{old}")).exists(),
                "the cut-off copy should still be there"
            );
            ip_link(&veth(2), "up");
            wait_for("the old copy on node 2 has ended", DEADLINE, || {
                !Path::new(&format!("/proc/{old}")).exists()
            });
            wait_for("node 2 lists nothing", DEADLINE, || {
                let o = tb.exec(2, &["ps", "--json"]);
                o.status.success()
                    && serde_json::from_slice::<Value>(&o.stdout)
                        .map(|v| v.as_array().is_some_and(|a| a.is_empty()))
                        .unwrap_or(false)
            });
        }
    }
    tb.wait_node_status(2, 3);
    ok(tb.exec(2, &["mosctl", "stay"]), "mosctl stay");
}

/// `migrate PID checkpoint` of a job away, the job killed, `mosrun -R FILE`: it goes on
/// from the checkpoint; then the same with `chkexit`.
fn checkpoint_and_restore(tb: &Testbed, work: &Path) {
    let script = work.join("phased.py");
    let ring = ring(tb, "phased");
    let argv = [PY, script.to_str().unwrap(), &ring];
    let input = "go 0\ngo 1\ngo 2\n";
    let (want, want_code) = reference(&argv, input);
    for how in ["checkpoint", "chkexit"] {
        let mut r = start(tb, work, &argv);
        let pid = r.job.home_pid;
        r.job.send("go 0\n");
        assert_eq!(r.job.line(), want[1]);
        ok(tb.migrate(pid, "3"), "migrate 3");
        // A step away: its directory at home is not the one it has on node 3 (where it
        // was at the move), and `mosrun -R` brings it back in the one at home.
        r.job.send("go 1\n");
        assert_eq!(r.job.line(), want[2]);
        let file = ok(tb.migrate(pid, how), how);
        assert!(
            file.starts_with('/') && file.contains(&format!("ckpt.{pid}.")),
            "{how}: {file}"
        );
        if how == "checkpoint" {
            // It goes on where it runs: then it is killed.
            assert_eq!(tb.where_(pid), "3");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        }
        let (_, st, _) = r.finish();
        assert_eq!(st.code(), None, "{how}: killed");
        // Only its owner brings it back: another user cannot even read it.
        let o = Command::new(AS_NOBODY[0])
            .args(&AS_NOBODY[1..])
            .arg(mosix())
            .args(["run", "-R", &file, "--socket"])
            .arg(tb.dir.path().join("n1/mosixd.sock"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && e.contains("Permission denied"),
            "{how}: nobody restored root's checkpoint: {e}"
        );
        wait_for("node 3 lists nothing", DEADLINE, || tb.ps(3).is_empty());
        // Back from the file, its output from the checkpoint on.
        let mut c = tb
            .cmd(1, &["run", "-R", &file])
            .current_dir(work)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(b"go 2\n").unwrap();
        let o = c.wait_with_output().unwrap();
        let got: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(
            got,
            want[3..],
            "{how}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), want_code, "{how}");
    }
    // Not a checkpoint of a job, and one that is not yours, are refused in one line.
    let o = tb.exec(1, &["run", "-R", script.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("not a checkpoint"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// `migrate PID freeze` of a job away: its CPU time stands still while a process beside
/// it runs, its parent sees no stop, it may not move; `continue`: it goes on, and its
/// output is that of a run never frozen.
fn freeze_and_continue(tb: &Testbed, work: &Path) {
    let script = work.join("job.py");
    let file = work.join("frozen.out");
    let input = numbers(1, 600);
    let ring = ring(tb, "frozen");
    let (want, want_code) = reference(
        &[
            PY,
            script.to_str().unwrap(),
            work.join("frozen.ref").to_str().unwrap(),
            &ring,
        ],
        &input,
    );
    // On node 3 from its start (its working directory there is the shared one it was
    // started in; the ring it walks is at home).
    let mut r = start(
        tb,
        work,
        &[
            "-r",
            "3",
            PY,
            script.to_str().unwrap(),
            file.to_str().unwrap(),
            &ring,
        ],
    );
    let pid = r.job.home_pid;
    wait_for("home says it runs on node 3", DEADLINE, || {
        tb.where_(pid) == "3"
    });
    let g = guest_pid(tb, 3, pid).expect("it runs on node 3");
    r.job.send(&numbers(1, 300));
    let _ = r.job.line();
    ok(tb.migrate(pid, "freeze"), "freeze");
    assert_eq!(home_entry(tb, pid).unwrap()["state"], "frozen");
    let frozen_at = cpu_ticks(g).unwrap();
    // A process beside it on node 3 uses CPU meanwhile: the clock of this check.
    let mut spin = tb
        .cmd(3, &["__churn", "8", "100000000"])
        .stdout(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // `testbed exec` execs the command: the spinner's PID is the child's.
    let spinner = spin.id() as i64;
    let t0 = cpu_ticks(spinner).unwrap_or(0);
    wait_for("the spinner used half a second of CPU", DEADLINE, || {
        cpu_ticks(spinner).is_some_and(|t| t >= t0 + 50)
    });
    assert_eq!(cpu_ticks(g), Some(frozen_at), "a frozen job used CPU");
    assert_eq!(state_of(g), 't', "held in a ptrace stop");
    assert_ne!(state_of(pid as i64), 'T', "its parent sees no stop");
    let o = tb.migrate(pid, "2");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("frozen"), "{e}");
    ok(tb.migrate(pid, "continue"), "continue");
    wait_for("it uses CPU again", DEADLINE, || {
        cpu_ticks(g).is_some_and(|t| t > frozen_at)
    });
    let _ = spin.kill();
    let _ = spin.wait();
    // From host to host: node 2 goes on resolving its relative paths at home, from where
    // it is in its ring (not from the directory it has on node 3).
    tb.move_ok(pid, "2");
    r.job.send(&numbers(301, 450));
    // And home: into its deputy's directory (its hosts lost track of it at the ring's
    // relative `..`; the directory it has on node 2 is the shared one it started in).
    tb.move_ok(pid, "home");
    r.job.send(&numbers(451, 600));
    let (got, st, err) = r.finish();
    same_lines(&got, &want, "frozen");
    assert_eq!(st.code(), want_code);
    assert!(err.is_empty(), "{err:?}");
}

#[test]
fn checkpoints_and_recovery_on_four_nodes() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (network namespaces, cgroups, ptrace): run it as root");
    }
    let t0 = Instant::now();
    let tb = Testbed::up(&[]);
    for n in 1..=4 {
        ok(tb.exec(n, &["mosctl", "stay"]), "mosctl stay");
    }
    let work = tb.shared().join("ckpt");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("job.py"), JOB).unwrap();
    std::fs::write(work.join("phased.py"), PHASED).unwrap();
    survives(&tb, &work, Death::Crash);
    eprintln!("recovery after a crash: {:?}", t0.elapsed());
    survives(&tb, &work, Death::Cut);
    eprintln!("recovery after a cut: {:?}", t0.elapsed());
    checkpoint_and_restore(&tb, &work);
    eprintln!("checkpoint and restore: {:?}", t0.elapsed());
    freeze_and_continue(&tb, &work);
    eprintln!("freeze and continue: {:?}", t0.elapsed());
}
