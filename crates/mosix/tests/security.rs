//! Attacks on mosixd by an ordinary user (uid 65534, through `setpriv`) and by
//! unauthenticated network peers, against one real daemon on a loopback address. Each test
//! reproduces a finding of issue 9 and fails on the code before its fix.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);
const NOBODY: &str = "65534";

/// Loopback nets of this run: shifted by 50 per `MOSIX_TESTBED_INSTANCE`, so that several
/// test runs on one machine do not share addresses.
fn net_of(base: u8) -> u8 {
    let k = std::env::var("MOSIX_TESTBED_INSTANCE")
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
        .filter(|k| *k <= 3)
        .unwrap_or(0);
    base + 50 * k
}

/// One mosixd on 127.0.`net`.1, its files in a directory every user may traverse.
struct Node {
    dir: tempfile::TempDir,
    daemon: Child,
    net: u8,
}

impl Node {
    /// Starts the daemon; with `stray_fd`, it inherits an open pipe as fd 9 (as a daemon
    /// started from a careless script would).
    fn start(net: u8, stray_fd: bool) -> Node {
        let net = net_of(net);
        let dir = tempfile::Builder::new()
            .prefix("mosix-sec")
            .tempdir()
            .unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.join("secret"), "security-test-secret-0123456789\n").unwrap();
        std::fs::set_permissions(d.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_mosix"), d.join("bin/mosix")).unwrap();
        let cfg = format!(
            "node = 1\nsecret_file = \"{d}/secret\"\nstate_dir = \"{d}/state\"\n\
             control_socket = \"{d}/sock\"\nspeed = 1.0\ngossip_interval_ms = 200\n\n\
             [[map]]\nnode = 1\naddress = \"127.0.{net}.1\"\ncount = 1\n",
            d = d.display()
        );
        std::fs::write(d.join("mosix.toml"), cfg).unwrap();
        let mosixd = Path::new(env!("CARGO_BIN_EXE_mosix")).with_file_name("mosixd");
        let log = std::fs::File::create(d.join("log")).unwrap();
        let mut c = Command::new(mosixd);
        c.arg("--config")
            .arg(d.join("mosix.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        clean_fds(&mut c);
        let stray = stray_fd.then(|| nix::unistd::pipe().unwrap());
        if let Some((r, _w)) = &stray {
            let fd = r.as_raw_fd();
            // SAFETY: dup2 in the child before exec; no allocation.
            unsafe {
                c.pre_exec(move || {
                    libc::dup2(fd, 9);
                    Ok(())
                });
            }
        }
        let daemon = c.spawn().unwrap();
        let n = Node { dir, daemon, net };
        n.wait_until("the daemon answers", || {
            Command::new(n.mosix())
                .args(["status", "--socket"])
                .arg(n.sock())
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        });
        n
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn sock(&self) -> PathBuf {
        self.path().join("sock")
    }
    fn mosix(&self) -> PathBuf {
        self.path().join("bin/mosix")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("log")).unwrap_or_default()
    }

    /// `mosrun PROG...` as uid 65534 with no supplementary groups, after `prelude` (shell
    /// commands such as `umask 077`) in the same shell.
    fn mosrun_as_nobody(&self, prelude: &str, argv: &[&str]) -> Command {
        let mut words = vec![
            "exec".to_string(),
            sh_quote(&self.mosix().to_string_lossy()),
            "run".into(),
            "--socket".into(),
            sh_quote(&self.sock().to_string_lossy()),
        ];
        words.extend(argv.iter().map(|a| sh_quote(a)));
        let script = format!("{prelude}\n{}", words.join(" "));
        let mut c = as_nobody();
        c.args(["sh", "-c", &script]).current_dir(self.path());
        clean_fds(&mut c);
        c
    }

    fn wait_until(&self, what: &str, cond: impl Fn() -> bool) {
        let end = Instant::now() + DEADLINE;
        while !cond() {
            assert!(
                Instant::now() < end,
                "timed out waiting until {what}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn daemon_rss_kib(&self) -> u64 {
        status_field(self.daemon.id() as i32, "VmRSS:")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

fn as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"]);
    c
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Only 0, 1, 2 in the child: the test runner's own descriptors must not leak in.
fn clean_fds(cmd: &mut Command) -> &mut Command {
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}

fn status_field(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn io_field(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether `mosix ps --json` output lists home PID `pid`.
fn lists(ps_json: &[u8], pid: i32) -> bool {
    serde_json::from_slice::<serde_json::Value>(ps_json)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|p| p["home_pid"] == pid)
}

/// A python3 script run as uid 65534; its stdout.
fn python_as_nobody(script: &str, args: &[&str]) -> String {
    let o = as_nobody()
        .args(["/usr/bin/python3", "-c", script])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "python: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Sends one request line on the control socket and prints the first answer line.
const ONE_REQUEST: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
s.settimeout(20)
print(s.makefile().readline().strip())
"#;

/// The requester connects, forks, and exits; its PID is given to a root process while the
/// connection is kept by its child, which then asks to register. What would be registered
/// is the root process (SO_PEERCRED keeps the PID of connect time): the daemon would then
/// freeze it, move it, and let its user `migrate` it. It must refuse: the process that
/// connected has gone.
#[test]
fn register_binds_the_connecting_process_not_a_reused_pid() {
    let n = Node::start(72, false);
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
# The daemon has the connection (it answers a ping) before the PID changes hands.
s.sendall(b'{"op":"ping"}\n')
f = s.makefile("rb")
f.readline()
if os.fork() != 0:
    print(os.getpid(), flush=True)
    os._exit(0)
sys.stdin.readline()
s.sendall(sys.argv[2].encode() + b"\n")
print(f.readline().decode().strip(), flush=True)
"#;
    let req = serde_json::json!({"op": "register", "argv": ["sleep", "120"]});
    let mut py = as_nobody()
        .args(["/usr/bin/python3", "-c", script])
        .arg(n.sock())
        .arg(req.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let mut stdin = py.stdin.take().unwrap();
    let first: i32 = lines.next().unwrap().unwrap().trim().parse().unwrap();
    // The python that connected exits (setpriv exec'd it: it is our child) and is reaped.
    assert!(py.wait().unwrap().success());
    // Give its PID to a root process.
    let mut impostor = None;
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", first - 1)).unwrap();
        let mut s = Command::new("sleep").arg("120").spawn().unwrap();
        if s.id() as i32 == first {
            impostor = Some(s);
            break;
        }
        let _ = s.kill();
        let _ = s.wait();
    }
    let mut impostor = impostor.expect("could not give the PID to another process");
    stdin.write_all(b"go\n").unwrap();
    let answer = lines.next().unwrap().unwrap();
    let listed = Command::new(n.mosix())
        .args(["ps", "--json", "--socket"])
        .arg(n.sock())
        .output()
        .unwrap();
    let _ = impostor.kill();
    let _ = impostor.wait();
    assert!(
        !answer.contains("registered"),
        "a root process was registered by another user's connection: {answer}"
    );
    assert!(answer.contains("has gone"), "{answer}");
    assert!(
        !lists(&listed.stdout, first),
        "the daemon follows the root process: {}",
        String::from_utf8_lossy(&listed.stdout)
    );
}

/// Another user's job: `migrate` refuses, and a deputy hello for it (the connection's
/// process is not that job, and does not know its token) is refused.
#[test]
fn another_users_job_cannot_be_moved_or_served() {
    let n = Node::start(71, false);
    let mut job = Command::new(n.mosix());
    job.args(["run", "--socket"])
        .arg(n.sock())
        .args(["sleep", "120"])
        .stdin(Stdio::null());
    clean_fds(&mut job);
    let mut job = job.spawn().unwrap();
    let pid = job.id() as i32;
    n.wait_until("root's job is registered", || {
        Command::new(n.mosix())
            .args(["ps", "--json", "--socket"])
            .arg(n.sock())
            .output()
            .map(|o| lists(&o.stdout, pid))
            .unwrap_or(false)
    });
    let mig = as_nobody()
        .arg(n.mosix())
        .args(["migrate", "--socket"])
        .arg(n.sock())
        .args([&pid.to_string(), "home"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let hello = serde_json::json!({"op": "deputy", "home_pid": pid, "token": "00"});
    let sock = n.sock();
    let answer = python_as_nobody(ONE_REQUEST, &[&sock.to_string_lossy(), &hello.to_string()]);
    let _ = job.kill();
    let _ = job.wait();
    assert!(!mig.status.success(), "nobody moved root's job");
    let err = String::from_utf8_lossy(&mig.stderr);
    assert!(err.contains("your own processes"), "{err}");
    assert!(
        answer.contains("\"error\"") && answer.contains("not the deputy"),
        "{answer}"
    );
}

/// Where a cgroup of ours can be made: (cgroup directory, the line suffix that
/// /proc/PID/cgroup shows for it).
fn test_cgroup() -> Option<(PathBuf, String)> {
    let name = format!("mosix-sectest-{}", std::process::id());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for l in info.lines() {
        let (pre, post) = l.split_once(" - ")?;
        let f: Vec<&str> = pre.split(' ').collect();
        let g: Vec<&str> = post.split(' ').collect();
        let v1cpu = g[0] == "cgroup" && g.get(2).is_some_and(|o| o.split(',').any(|x| x == "cpu"));
        if (g[0] == "cgroup2" || v1cpu) && f[3] == "/" {
            let dir = Path::new(f[4]).join(&name);
            if std::fs::create_dir(&dir).is_ok() {
                return Some((dir, format!(":/{name}")));
            }
        }
    }
    None
}

#[test]
fn a_job_has_only_its_stdio_and_the_callers_umask_limits_and_cgroup() {
    let n = Node::start(73, true);
    let (cg, cg_line) = test_cgroup().expect("a cgroup hierarchy to test with");
    let procs = cg.join("cgroup.procs");
    let mut c = n.mosrun_as_nobody(
        "umask 077; ulimit -n 123",
        &[
            "sh",
            "-c",
            "ls /proc/self/fd | tr '\\n' ' '; echo; umask; ulimit -n; cat /proc/self/cgroup",
        ],
    );
    let p = procs.clone();
    let cpath = std::ffi::CString::new(p.to_string_lossy().as_bytes()).unwrap();
    // SAFETY: the child writes to a cgroup file and makes no allocation the parent
    // did not make before the fork (the path is built here).
    unsafe {
        c.pre_exec(move || {
            let fd = libc::open(cpath.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    let o = c.stdin(Stdio::null()).output().unwrap();
    let _ = std::fs::remove_dir(&cg);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap().trim(),
        "0 1 2 3",
        "descriptors of the job (3 is ls's own); daemon log:\n{}",
        n.log()
    );
    assert_eq!(lines.next().unwrap().trim(), "0077", "umask");
    assert_eq!(lines.next().unwrap().trim(), "123", "ulimit -n");
    assert!(
        text.lines().any(|l| l.ends_with(&cg_line)),
        "the job is not in the caller's cgroup {cg_line}:\n{text}"
    );
}

/// A job writing to a mosrun whose stdout nobody reads blocks in write(), and the daemon
/// keeps no more than its windows.
#[test]
fn output_nobody_reads_blocks_the_job_not_the_daemon() {
    let n = Node::start(74, false);
    let rss0 = n.daemon_rss_kib();
    let mut mosrun = n
        .mosrun_as_nobody("", &["yes", "a fairly long line of output from yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // setpriv, sh and mosrun exec: the child is the job.
    let pid = mosrun.id() as i32;
    // Wait until it stopped writing: blocked in pipe_write with no progress.
    let end = Instant::now() + DEADLINE;
    let mut last = u64::MAX;
    let written = loop {
        let w = io_field(pid, "wchar:");
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if w == last && wchan == "pipe_write" {
            break w;
        }
        if Instant::now() > end {
            break w;
        }
        last = w;
        std::thread::sleep(Duration::from_millis(300));
    };
    let grown = n.daemon_rss_kib().saturating_sub(rss0);
    let _ = mosrun.kill();
    let _ = mosrun.wait();
    assert!(
        written < 16 << 20,
        "the job wrote {written} bytes although nobody reads its output"
    );
    assert!(grown < 64 << 10, "mosixd grew by {grown} KiB");
    n.wait_until("the job ended with its mosrun", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
}

/// A job that does not read its stdin makes the writer into mosrun wait.
#[test]
fn stdin_nobody_reads_blocks_the_writer() {
    let n = Node::start(75, false);
    let rss0 = n.daemon_rss_kib();
    let mut mosrun = n
        .mosrun_as_nobody("", &["sleep", "600"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let w = mosrun.stdin.take().unwrap();
    nix::fcntl::fcntl(
        &w,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let chunk = vec![b'x'; 1 << 16];
    let mut accepted: u64 = 0;
    // Bounded: at most 512 MiB, and stop once the pipe has taken nothing for a second.
    while accepted < 512 << 20 {
        match (&w).write(&chunk) {
            Ok(k) => accepted += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut pfd = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(&w),
                    nix::poll::PollFlags::POLLOUT,
                )];
                if nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(1000u16)).unwrap() == 0 {
                    break;
                }
            }
            Err(e) => panic!("writing to mosrun: {e}"),
        }
    }
    let grown = n.daemon_rss_kib().saturating_sub(rss0);
    let _ = mosrun.kill();
    let _ = mosrun.wait();
    assert!(
        accepted < 8 << 20,
        "mosrun took {accepted} bytes of stdin for a job that reads none"
    );
    assert!(grown < 64 << 10, "mosixd grew by {grown} KiB");
}

#[test]
fn control_connections_are_capped_and_bounded() {
    let n = Node::start(76, false);
    let script = r#"
import socket, sys
conns = []
for i in range(70):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    conns.append(s)
last = conns[-1]
last.settimeout(20)
print(last.makefile().readline().strip())
big = socket.socket(socket.AF_UNIX)
for s in conns:
    s.close()
big.connect(sys.argv[1])
big.settimeout(20)
try:
    big.sendall(b"x" * (1100 * 1024))
except OSError:
    pass
print(big.makefile().readline().strip())
"#;
    let sock = n.sock();
    let out = python_as_nobody(script, &[&sock.to_string_lossy()]);
    let mut l = out.lines();
    let first = l.next().unwrap_or_default();
    assert!(first.contains("too many connections"), "{out}");
    let second = l.next().unwrap_or_default();
    assert!(second.contains("request too long"), "{out}");
}

#[test]
fn unauthenticated_peers_get_a_deadline_and_a_cap() {
    let n = Node::start(77, false);
    let threads0 = status_field(n.daemon.id() as i32, "Threads:");
    let addr = format!("127.0.{}.1:5400", n.net);
    let mut conns = Vec::new();
    for _ in 0..200 {
        let s = std::net::TcpStream::connect(&addr).unwrap();
        // One byte, the start of a frame length, as a slow peer would send.
        let _ = (&s).write_all(&[0]);
        conns.push(s);
    }
    let threads = status_field(n.daemon.id() as i32, "Threads:");
    assert!(
        threads < threads0 + 40,
        "{threads} threads for 200 silent connections ({threads0} before)"
    );
    // Every one of them is closed by the daemon, the last after the handshake deadline.
    let end = Instant::now() + DEADLINE;
    for mut s in conns {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "a silent peer kept its connection open");
        s.set_read_timeout(Some(left)).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("a silent peer's connection was not closed: {other:?}"),
        }
    }
}

/// A set-user-ID root program that nobody runs with `mosrun -C` at home: a checkpoint of
/// it (`migrate PID checkpoint`, or its periodic ones) would have root's mosixd write the
/// memory of a process running as root (password hashes, host keys) into a file nobody
/// owns, and `migrate PID freeze` would let nobody hold a root process stopped (passwd
/// holding /etc/.pwd.lock). Both are refused, and no file is written.
#[test]
fn a_job_with_more_rights_than_its_user_is_not_checkpointed_or_frozen() {
    let n = Node::start(78, false);
    let prog = n.path().join("suid-sleep");
    std::fs::copy("/usr/bin/sleep", &prog).unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let mine = n.path().join("nobody");
    std::fs::create_dir(&mine).unwrap();
    std::os::unix::fs::chown(&mine, Some(65534), Some(65534)).unwrap();
    let base = mine.join("c");
    let mut job = n
        .mosrun_as_nobody(
            "",
            &[
                "-C",
                &base.to_string_lossy(),
                &prog.to_string_lossy(),
                "600",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // setpriv, sh and mosrun exec: the child is the job.
    let pid = job.id() as i32;
    n.wait_until("the set-user-ID job runs as root, registered", || {
        let euid_root = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
        euid_root
            && Command::new(n.mosix())
                .args(["ps", "--json", "--socket"])
                .arg(n.sock())
                .output()
                .map(|o| lists(&o.stdout, pid))
                .unwrap_or(false)
    });
    let migrate = |what: &str| {
        as_nobody()
            .arg(n.mosix())
            .args(["migrate", "--socket"])
            .arg(n.sock())
            .args([&pid.to_string(), what])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let ck = migrate("checkpoint");
    let fr = migrate("freeze");
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let files: Vec<String> = std::fs::read_dir(&mine)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let _ = job.kill();
    let _ = job.wait();
    let e = String::from_utf8_lossy(&ck.stderr);
    assert!(
        !ck.status.success(),
        "root's memory was written into nobody's file: {}",
        String::from_utf8_lossy(&ck.stdout)
    );
    assert!(e.contains("more rights than its user's"), "{e}");
    assert!(files.is_empty(), "files written: {files:?}");
    let e = String::from_utf8_lossy(&fr.stderr);
    assert!(!fr.status.success(), "nobody froze a root process");
    assert!(e.contains("more rights than its user's"), "{e}");
    let st = state.rsplit_once(") ").map(|(_, r)| r.chars().next());
    assert_ne!(st, Some(Some('t')), "it is held in a ptrace stop");
}

/// A memory cgroup of our own limited to `bytes` (v1 or v2): its directory and the file of
/// its processes.
fn mem_cgroup(bytes: u64) -> Option<(PathBuf, PathBuf)> {
    let name = format!("mosix-sectest-mem-{}", std::process::id());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for l in info.lines() {
        let (pre, post) = l.split_once(" - ")?;
        let f: Vec<&str> = pre.split(' ').collect();
        let g: Vec<&str> = post.split(' ').collect();
        let v1 = g[0] == "cgroup"
            && g.get(2)
                .is_some_and(|o| o.split(',').any(|x| x == "memory"));
        if !(v1 || g[0] == "cgroup2") || f[3] != "/" {
            continue;
        }
        let dir = Path::new(f[4]).join(&name);
        if std::fs::create_dir(&dir).is_err() {
            continue;
        }
        let limit = if v1 {
            "memory.limit_in_bytes"
        } else {
            "memory.max"
        };
        if std::fs::write(dir.join(limit), bytes.to_string()).is_ok() {
            return Some((dir.clone(), dir.join("cgroup.procs")));
        }
        let _ = std::fs::remove_dir(&dir);
    }
    None
}

/// `mosrun -R` of a checkpoint file that claims an image of 4 GiB (a sparse file with a
/// valid description at its end, nobody's own): root's mosixd read the whole image into
/// its own memory before handing it to the restorer, so that any user could make it run
/// out of memory. It is refused in one line before anything is read, and the daemon is
/// unharmed. (The daemon runs in a memory cgroup of 256 MiB: the code before the fix was
/// killed by its cgroup, not by the machine running out of memory.)
#[test]
fn a_checkpoint_file_claiming_a_huge_image_is_not_read_into_the_daemon() {
    let mut n = Node::start(79, false);
    let (cg, procs) = mem_cgroup(256 << 20).expect("a memory cgroup to test with");
    std::fs::write(&procs, n.daemon.id().to_string()).unwrap();
    let file = n.path().join("huge.ckpt.1");
    let info = serde_json::json!({
        "home": 1, "home_pid": 4242, "uid": 65534, "cmd": "sleep 600", "number": 1,
        "taken_unix_ms": 1, "node": 1, "mark": null, "fds": [], "proc_fds": [],
        "no_new_privs": false, "base": file.with_extension("").to_string_lossy(),
        "every_min": null, "memory_bytes": 4u64 << 30
    })
    .to_string();
    {
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(4 << 30).unwrap();
        let mut w = &f;
        use std::io::Seek;
        w.seek(std::io::SeekFrom::End(0)).unwrap();
        w.write_all(info.as_bytes()).unwrap();
        w.write_all(&(info.len() as u64).to_le_bytes()).unwrap();
        w.write_all(b"MOSXJOB\x01").unwrap();
    }
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
    let o = n
        .mosrun_as_nobody("", &["-R", &file.to_string_lossy()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let alive = n.daemon.try_wait().unwrap().is_none();
    let answers = Command::new(n.mosix())
        .args(["status", "--socket"])
        .arg(n.sock())
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let _ = n.daemon.kill();
    let _ = n.daemon.wait();
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir(&cg);
    assert!(
        alive && answers,
        "the daemon died reading the image; log:\n{}",
        n.log()
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a 4 GiB image was restored?");
    assert!(e.contains("larger than") && e.contains("memory"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}
