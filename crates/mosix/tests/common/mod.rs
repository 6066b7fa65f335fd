//! Helpers shared by the testbed tests (migration, balancing): a 4-node testbed in a
//! temporary directory, commands run on its nodes, and jobs started with `mosrun`.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub const DEADLINE: Duration = Duration::from_secs(60);
/// Lines of each node's log a failing test prints.
const LOG_TAIL: usize = 40;

/// The exit status of child `c` once it ends, if it does within `limit`.
pub fn wait_child(c: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `cmd` (a shell command line) run under `script`: a terminal at home, typed into by
/// writing to the child's stdin, its screen read from its stdout. Started as from a
/// login: Ctrl-C and the quit key act by default (a test run from a background job of a shell
/// would otherwise hand its ignored SIGINT and SIGQUIT down to the job, which then
/// ignores the Ctrl-C it is sent).
pub fn under_terminal(cmd: &str) -> Child {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new("script");
    c.args(["-qefc", cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    // SAFETY: between fork and exec only signal(2), which is async-signal-safe, on
    // constant arguments.
    unsafe {
        c.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGQUIT, libc::SIG_DFL);
            Ok(())
        });
    }
    c.spawn().unwrap()
}

/// Waits for the end of `c` (typed Ctrl-C into, see [`under_terminal`]) and reads all it
/// printed; panics after [`DEADLINE`] saying `what` did not end.
pub fn terminal_end(mut c: Child, what: &str) -> (std::process::ExitStatus, String) {
    let mut out = c.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let Some(st) = wait_child(&mut c, DEADLINE) else {
        let _ = c.kill();
        panic!("{what}: the terminal's job did not end within {DEADLINE:?}");
    };
    (st, reader.join().unwrap())
}

/// Output (lines) and exit code of `argv` run plainly, never moved, with `input`.
pub fn reference(argv: &[&str], input: &str) -> (Vec<String>, Option<i32>) {
    let mut c = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    (
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        o.status.code(),
    )
}

/// Lines with the PID of "start pid=N" taken out (it differs between runs).
pub fn normalise(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| match l.strip_prefix("start pid=") {
            Some(rest) => format!(
                "start pid=N{}",
                rest.trim_start_matches(|c: char| c.is_ascii_digit())
            ),
            None => l.clone(),
        })
        .collect()
}

/// A command prefix that runs the rest as uid/gid 65534 with no supplementary groups.
pub const AS_NOBODY: [&str; 7] = [
    "setpriv",
    "--reuid",
    "65534",
    "--regid",
    "65534",
    "--clear-groups",
    "--",
];

/// The testbed instance these tests use (`MOSIX_TESTBED_INSTANCE`, as `mosix testbed`
/// reads it): several test runs on one machine each take their own.
pub fn instance() -> u32 {
    std::env::var("MOSIX_TESTBED_INSTANCE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|k| *k <= 9)
        .unwrap_or(0)
}

/// The prefix of this instance's namespaces and cgroups: `mosixtb-` (instance 0) or
/// `mosixtbK-`.
pub fn tb_prefix() -> String {
    match instance() {
        0 => "mosixtb-".into(),
        k => format!("mosixtb{k}-"),
    }
}

/// The testbed's addresses: `10.213.K`.
pub fn tb_subnet() -> String {
    format!("10.213.{}", instance())
}

pub fn mosix() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mosix"))
}

pub fn progs_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/progs")
}

pub fn compile(name: &str) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("migprogs");
    std::fs::create_dir_all(&out).unwrap();
    let bin = out.join(name);
    // Built under a name of its own, then renamed: test binaries that run side by side
    // (scripts/run-tests.py) never run a half-written program.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = out.join(format!(".{name}.{}.{n}", std::process::id()));
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&tmp)
        .arg(progs_src().join(format!("{name}.c")))
        .status()
        .expect("cc runs");
    assert!(st.success(), "cc {name}.c failed");
    std::fs::rename(&tmp, &bin).unwrap();
    bin
}

pub struct Testbed {
    pub dir: tempfile::TempDir,
}

impl Testbed {
    /// A 4-node testbed with these extra `testbed up` arguments, all nodes seeing all up.
    pub fn up(extra: &[&str]) -> Testbed {
        let dir = tempfile::Builder::new()
            .prefix("mosix-mig")
            .tempdir_in("/run")
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let tb = Testbed { dir };
        let mut args = vec!["up", "--nodes", "4", "--gossip-interval-ms", "200"];
        args.extend_from_slice(extra);
        tb.ok(&args);
        for n in 1..=4 {
            tb.wait_until(&format!("node {n} sees 4 nodes up"), || {
                let o = tb.exec(n, &["status", "--json"]);
                o.status.success()
                    && serde_json::from_slice::<Value>(&o.stdout)
                        .map(|v| {
                            v["nodes"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .filter(|n| n["status"] == 3)
                                .count()
                                == 4
                        })
                        .unwrap_or(false)
            });
        }
        tb
    }

    pub fn testbed(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut c = Command::new(mosix());
        c.arg("testbed")
            .args(args)
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// `mosix testbed ARGS` that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.testbed(args, &[]);
        assert!(
            o.status.success(),
            "mosix testbed {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A command for `mosix ARGS` run on node `n`.
    pub fn cmd(&self, n: u32, args: &[&str]) -> Command {
        let mut c = Command::new(mosix());
        c.args(["testbed", "exec", &n.to_string(), "--dir"])
            .arg(self.dir.path())
            .arg("--")
            .arg(mosix())
            .args(args);
        c
    }

    pub fn exec(&self, n: u32, args: &[&str]) -> std::process::Output {
        self.cmd(n, args).stdin(Stdio::null()).output().unwrap()
    }

    pub fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    pub fn wait_until(&self, what: &str, cond: impl Fn() -> bool) {
        let end = Instant::now() + DEADLINE;
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn where_(&self, pid: i32) -> String {
        let o = self.exec(1, &["where", &pid.to_string()]);
        assert!(
            o.status.success(),
            "where: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    pub fn ps(&self, n: u32) -> Vec<Value> {
        let o = self.exec(n, &["ps", "--json"]);
        assert!(
            o.status.success(),
            "ps: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice::<Value>(&o.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn migrate(&self, pid: i32, to: &str) -> std::process::Output {
        self.exec(1, &["migrate", &pid.to_string(), to])
    }

    /// Waits until node 1's `status` gives node `n` the status number `status` (the
    /// FAQ's: 3 up and taking processes, 1 down).
    pub fn wait_node_status(&self, n: u32, status: u64) {
        self.wait_until(
            &format!("node 1 sees node {n} with status {status}"),
            || {
                let o = self.exec(1, &["status", "--json"]);
                serde_json::from_slice::<Value>(&o.stdout)
                    .map(|v| v["nodes"][(n - 1) as usize]["status"] == status)
                    .unwrap_or(false)
            },
        );
    }

    /// Moves `pid` to `to` (a node, or "home"): the move succeeds and `where` says so.
    pub fn move_ok(&self, pid: i32, to: &str) {
        let o = self.migrate(pid, to);
        assert!(
            o.status.success(),
            "migrate {pid} {to}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let want = if to == "home" { "0" } else { to };
        assert_eq!(self.where_(pid), want, "where {pid} after the move to {to}");
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // MOSIX_TESTBED_LOGS=DIR keeps each node's mosixd.log there (for debugging).
        if let Some(keep) = std::env::var_os("MOSIX_TESTBED_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = std::fs::create_dir_all(&keep);
            for n in 1..=4 {
                let log = self.dir.path().join(format!("n{n}/mosixd.log"));
                let _ = std::fs::copy(&log, keep.join(format!("n{n}.log")));
            }
        }
        // A failing test shows what the daemons said last (CI keeps only the output).
        if std::thread::panicking() {
            for n in 1..=4 {
                let log = self.dir.path().join(format!("n{n}/mosixd.log"));
                let Ok(text) = std::fs::read_to_string(&log) else {
                    continue;
                };
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
                eprintln!("----- node {n}: last {} lines of mosixd.log", tail.len());
                for l in tail {
                    eprintln!("{l}");
                }
            }
        }
        let _ = self.testbed(&["down"], &[]);
    }
}

/// A job started with `mosrun` on node 1, its output lines arriving on a channel.
pub struct Job {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub lines: Receiver<String>,
    pub seen: Vec<String>,
    pub home_pid: i32,
}

impl Job {
    /// Starts `mosrun ARGV` on node 1: `testbed exec` and mosrun exec, so the child is
    /// the job itself and its PID the home PID.
    pub fn start(tb: &Testbed, argv: &[&str]) -> Job {
        let mut args = vec!["run"];
        args.extend_from_slice(argv);
        // In a process group of its own, as a shell's job is: the group of a test run
        // started in the background may be orphaned, and the kernel discards Ctrl-Z
        // (SIGTSTP) in an orphaned group, so the job would not stop where a shell's would.
        use std::os::unix::process::CommandExt;
        let mut child = tb
            .cmd(1, &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                match l {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        let stdin = child.stdin.take();
        let mut j = Job {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
            home_pid: 0,
        };
        j.home_pid = j.child.id() as i32;
        let first = j.line();
        assert!(first.starts_with("start"), "first line {first:?}");
        j
    }

    /// The next line of output (waits for it).
    pub fn line(&mut self) -> String {
        let l = self
            .lines
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("no output line after {:?}", self.seen));
        self.seen.push(l.clone());
        l
    }

    pub fn send(&mut self, s: &str) {
        let w = self.stdin.as_mut().unwrap();
        w.write_all(s.as_bytes()).unwrap();
        w.flush().unwrap();
    }

    /// Closes stdin, reads the rest, and returns all output and the exit status.
    pub fn finish(mut self) -> (Vec<String>, std::process::ExitStatus) {
        self.stdin = None;
        while let Ok(l) = self.lines.recv_timeout(DEADLINE) {
            self.seen.push(l);
        }
        let st = self.wait();
        (self.seen, st)
    }

    /// Waits for the job (mosrun, then its deputy) to end, at most [`DEADLINE`]: a job
    /// that does not end fails the test with what /proc says of it (a hang in CI would
    /// otherwise say nothing).
    pub fn wait(&mut self) -> std::process::ExitStatus {
        match wait_child(&mut self.child, DEADLINE) {
            Some(st) => st,
            None => {
                let pid = self.child.id();
                let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let st: Vec<&str> = st
                    .lines()
                    .filter(|l| l.starts_with("State") || l.contains("Pnd") || l.starts_with("Sig"))
                    .collect();
                panic!("job {pid} did not end within {DEADLINE:?}: {st:?}");
            }
        }
    }
}

/// `GET /metrics` of node `n` (its mosixd serves them at its testbed address).
pub fn scrape(n: u32) -> String {
    let addr = format!("{}.{n}:9464", tb_subnet());
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("metrics of node {n} at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of one series (name with its labels, exactly as exposed).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}
