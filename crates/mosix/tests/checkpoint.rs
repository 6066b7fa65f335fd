//! Checkpoint/restart of real, unmodified programs through the `mosix` command, as root.
//! Each program is checkpointed in the middle of its work and restarted; what it printed
//! before plus what the restarted process prints must equal an uninterrupted run, and the
//! exit status must be the same.

use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::OnceLock;
use std::time::Duration;

const MOSIX: &str = env!("CARGO_BIN_EXE_mosix");
/// Upper bound for any one wait in these tests (a hang fails instead of blocking CI).
const PATIENCE: Duration = Duration::from_secs(120);

fn progs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("progs");
        std::fs::create_dir_all(&out).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/progs");
        let builds: &[(&str, &[&str])] = &[
            ("heap", &[]),
            ("compute", &["-static"]),
            ("sigtimer", &[]),
            ("filewrite", &[]),
            ("avx", &["-mavx2"]),
            ("refuse", &["-pthread"]),
            ("pidclock", &[]),
            ("memwriter", &[]),
            ("advice", &[]),
            ("postcopy", &[]),
        ];
        for (name, flags) in builds {
            let st = Command::new("cc")
                .arg("-O2")
                .args(*flags)
                .arg("-o")
                .arg(out.join(name))
                .arg(src.join(format!("{name}.c")))
                .status()
                .expect("cc runs");
            assert!(st.success(), "building {name}.c");
        }
        out
    })
}

fn prog(name: &str) -> Command {
    Command::new(progs().join(name))
}

/// Only 0, 1, 2 in the program: stray descriptors of the test runner would (rightly)
/// make the checkpoint refuse.
fn clean_fds(cmd: &mut Command) -> &mut Command {
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}

fn reference(mut cmd: Command) -> Output {
    clean_fds(&mut cmd)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("program runs")
}

/// The lines read from `out`, as they come, until it ends.
fn lines_of(out: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running program whose stdout lines arrive on a channel.
struct Job {
    child: Child,
    lines: Receiver<String>,
    seen: String,
}

impl Job {
    fn start(mut cmd: Command) -> Job {
        let mut child = clean_fds(&mut cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Not the runner's stderr: in CI that is a log file the program's user may not
            // be able to open, and a restart reopens a regular file as the process's user.
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("program starts");
        let lines = lines_of(child.stdout.take().unwrap());
        Job {
            child,
            lines,
            seen: String::new(),
        }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// Waits for the next line of output.
    fn line(&mut self) -> String {
        let l = self
            .lines
            .recv_timeout(PATIENCE)
            .expect("program printed its next line");
        self.seen.push_str(&l);
        self.seen.push('\n');
        l
    }
    /// Everything printed until the program's stdout closes.
    fn rest(&mut self) -> String {
        while let Ok(l) = self.lines.recv_timeout(PATIENCE) {
            self.seen.push_str(&l);
            self.seen.push('\n');
        }
        self.seen.clone()
    }
    fn wait(&mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }
    /// Checkpoints it into `img` (with `args` besides), which ends it by SIGKILL: what
    /// it printed up to then.
    fn checkpoint_into(&mut self, img: &Path, args: &[&str]) -> String {
        let pid = self.pid().to_string();
        let mut ckpt = vec!["checkpoint", &pid, "-o", img.to_str().unwrap()];
        ckpt.extend_from_slice(args);
        assert_ok(&mosix(&ckpt), "checkpoint");
        assert_eq!(
            self.wait().signal(),
            Some(libc::SIGKILL),
            "checkpoint kills the original"
        );
        self.rest()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: kill of our own process group; no memory involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn mosix(args: &[&str]) -> Output {
    Command::new(MOSIX)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("mosix runs")
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

fn same_status(a: ExitStatus, b: ExitStatus) -> bool {
    a.code() == b.code() && a.signal() == b.signal()
}

/// Checkpoints `cmd` after `lines` lines of output, restarts it, and checks the combined
/// output and the exit status against an uninterrupted run.
fn round_trip(make: impl Fn() -> Command, lines: usize, ckpt_args: &[&str]) -> PathBuf {
    let want = reference(make());
    let dir = tempfile::tempdir().unwrap().keep();
    let img = dir.join("job.img");
    let mut job = Job::start(make());
    for _ in 0..lines {
        job.line();
    }
    let before = job.checkpoint_into(&img, ckpt_args);
    let after = mosix(&["restart", img.to_str().unwrap()]);
    let got = before + &String::from_utf8_lossy(&after.stdout);
    assert_eq!(
        got,
        String::from_utf8_lossy(&want.stdout),
        "output differs from an uninterrupted run; restart ended {} with stderr: {}",
        after.status,
        String::from_utf8_lossy(&after.stderr)
    );
    assert!(
        same_status(after.status, want.status),
        "exit status {} differs from {}; stderr: {}",
        after.status,
        want.status,
        String::from_utf8_lossy(&after.stderr)
    );
    img
}

fn awk_loop() -> Command {
    let mut c = Command::new("awk");
    c.arg(
        "BEGIN{for(i=0;i<24000000;i++){s+=i%7; if(i%2000000==0){print i, s; fflush()}} print \"done\", s; exit 5}",
    );
    c
}

#[test]
fn awk_loop_round_trip() {
    round_trip(awk_loop, 1, &[]);
}

#[test]
fn awk_with_lz4_and_zstd_images() {
    round_trip(awk_loop, 2, &["--compress", "lz4"]);
    round_trip(awk_loop, 3, &["--compress", "zstd"]);
}

const PY: &str = r#"
import os, sys
def primes(n):
    s = bytearray([1]) * n
    s[0] = s[1] = 0
    for i in range(2, int(n ** 0.5) + 1):
        if s[i]:
            s[i*i::i] = bytearray(len(s[i*i::i]))
    return s
total = 0
for k in range(1, 13):
    p = primes(k * 150000)
    acc = 0
    for i, v in enumerate(p):
        if v:
            acc = (acc * 31 + i) % 1000000007
    total += acc
    print(k, acc, total, flush=True)
st = open('/proc/self/status').read().split('\n')
caps = [l for l in st if l.startswith('CapEff')]
print('uid', os.getuid(), os.geteuid(), 'gid', os.getgid(), caps[0].split()[1], flush=True)
sys.exit(3)
"#;

/// Debian's python (scripts/setup.sh installs it), reachable by any user.
fn python() -> Command {
    if Path::new("/usr/bin/python3").exists() {
        Command::new("/usr/bin/python3")
    } else {
        Command::new("python3")
    }
}

#[test]
fn python_as_unprivileged_user_round_trip() {
    let make = || {
        let mut c = python();
        c.args(["-c", PY]).current_dir("/tmp").uid(65534).gid(65534);
        c
    };
    round_trip(make, 1, &[]);
}

#[test]
fn heap_256mib_round_trip_and_death_by_signal() {
    let make = || {
        let mut c = prog("heap");
        c.arg("256");
        c
    };
    round_trip(make, 2, &[]);
}

#[test]
fn static_program_round_trip() {
    round_trip(|| prog("compute"), 2, &[]);
}

#[test]
fn signal_handler_and_pending_timer_signal() {
    round_trip(|| prog("sigtimer"), 2, &[]);
}

#[test]
fn avx_registers_and_rounding_mode_survive() {
    round_trip(|| prog("avx"), 2, &[]);
}

/// madvise advice comes back with the process: transparent huge pages asked for, an area
/// a child does not get (MADV_DONTFORK), one a child gets zeroed (MADV_WIPEONFORK, what
/// random-number generators use so that a child never repeats its parent's numbers).
#[test]
fn madvise_advice_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let make = || {
        let mut c = prog("advice");
        c.arg(&go);
        c
    };
    std::fs::write(&go, "").unwrap();
    let want = reference(make());
    let want = String::from_utf8_lossy(&want.stdout).to_string();
    assert!(
        want.contains("dontfork 1 wipeonfork 1")
            && want.contains("child: dontfork area absent, wipeonfork area zeroed")
            && want.contains("wipeonfork area kept"),
        "an uninterrupted run: {want}"
    );
    std::fs::remove_file(&go).unwrap();
    let mut job = Job::start(make());
    assert_eq!(job.line(), "ready");
    let img = dir.path().join("advice.img");
    let before = job.checkpoint_into(&img, &[]);
    std::fs::write(&go, "").unwrap();
    let after = mosix(&["restart", img.to_str().unwrap()]);
    assert_ok(&after, "restart");
    assert_eq!(before + &String::from_utf8_lossy(&after.stdout), want);
}

fn file_writer(append: bool) {
    let dir = tempfile::tempdir().unwrap();
    let want_file = dir.path().join("want.txt");
    let got_file = dir.path().join("got.txt");
    let header = "existing header line\n";
    for f in [&want_file, &got_file] {
        std::fs::write(f, header).unwrap();
    }
    let mode = if append { "append" } else { "trunc" };
    let want = reference({
        let mut c = prog("filewrite");
        c.args([want_file.to_str().unwrap(), mode]);
        c
    });
    assert!(want.status.success());
    let img = dir.path().join("w.img");
    let mut job = Job::start({
        let mut c = prog("filewrite");
        c.args([got_file.to_str().unwrap(), mode]);
        c
    });
    job.line();
    job.line();
    let pid = job.pid().to_string();
    assert_ok(
        &mosix(&["checkpoint", &pid, "-o", img.to_str().unwrap()]),
        "checkpoint",
    );
    job.wait();
    let before = job.rest();
    let after = mosix(&["restart", img.to_str().unwrap()]);
    assert_ok(&after, "restart");
    assert_eq!(
        before + &String::from_utf8_lossy(&after.stdout),
        String::from_utf8_lossy(&want.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(&got_file).unwrap(),
        std::fs::read_to_string(&want_file).unwrap(),
        "file written across the restart differs"
    );
}

#[test]
fn regular_file_written_across_restart() {
    file_writer(false);
}

#[test]
fn regular_file_appended_across_restart() {
    file_writer(true);
}

#[test]
fn same_image_restarts_twice() {
    let want = reference(awk_loop());
    let img = round_trip(awk_loop, 4, &[]);
    // The image holds the state after the 4th line at least; both restarts must print
    // the same thing, a tail of the full output, and end the same way.
    let a = mosix(&["restart", img.to_str().unwrap()]);
    let b = mosix(&["restart", img.to_str().unwrap()]);
    assert_eq!(a.stdout, b.stdout);
    assert!(!a.stdout.is_empty());
    assert!(want.stdout.ends_with(&a.stdout));
    assert!(same_status(a.status, want.status) && same_status(b.status, want.status));
}

fn proc_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_default()
        .to_string()
}

/// A signal-mask line of /proc/PID/status without SIGALRM, which the interval timer
/// makes pending for a moment every 20 ms whatever we do.
fn mask_without_alarm(pid: i32, key: &str) -> u64 {
    let line = proc_field(pid, key);
    let hex = line.split_whitespace().nth(1).unwrap_or("0");
    u64::from_str_radix(hex, 16).unwrap() & !(1u64 << (libc::SIGALRM - 1))
}

#[test]
fn leave_running_leaves_the_original_as_it_was() {
    let want = reference(prog("sigtimer"));
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("l.img");
    let mut job = Job::start(prog("sigtimer"));
    job.line();
    let pid = job.pid();
    let maps_before = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let keys = [
        "SigBlk", "SigCgt", "SigIgn", "Uid", "Gid", "Threads", "CapEff",
    ];
    let before: Vec<String> = keys.iter().map(|k| proc_field(pid, k)).collect();
    let pending = |pid| {
        [
            mask_without_alarm(pid, "SigPnd"),
            mask_without_alarm(pid, "ShdPnd"),
        ]
    };
    let pending_before = pending(pid);
    assert_ne!(
        pending_before[0], 0,
        "SIGUSR1 is pending in the test program"
    );
    assert_ok(
        &mosix(&[
            "checkpoint",
            &pid.to_string(),
            "-o",
            img.to_str().unwrap(),
            "--leave-running",
        ]),
        "checkpoint --leave-running",
    );
    let after: Vec<String> = keys.iter().map(|k| proc_field(pid, k)).collect();
    let maps_after = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert_eq!(before, after, "signal state or credentials changed");
    assert_eq!(pending_before, pending(pid), "pending signals changed");
    assert_eq!(maps_before, maps_after, "memory layout changed");
    assert_eq!(proc_field(pid, "TracerPid"), "TracerPid:\t0");
    let out = job.rest();
    assert!(same_status(job.wait(), want.status));
    assert_eq!(
        out,
        String::from_utf8_lossy(&want.stdout),
        "the original's own output changed"
    );
    // And the image restarts too.
    let r = mosix(&["restart", img.to_str().unwrap()]);
    assert_ok(&r, "restart");
    assert!(want.stdout.ends_with(&r.stdout) && !r.stdout.is_empty());
}

/// --leave-running saves the memory of a process that keeps writing it while it is
/// saved: the original goes on as if nothing happened, and the image restarts into a
/// process whose memory checks out (memwriter reads every page back against what it
/// wrote after each pass) and prints the rest of an uninterrupted run.
#[test]
fn live_checkpoint_of_a_process_writing_its_memory() {
    let args = ["64", "30", "20", "512"];
    let make = || {
        let mut c = prog("memwriter");
        c.args(args);
        c
    };
    let want = reference(make());
    let want = String::from_utf8_lossy(&want.stdout).to_string();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("live.img");
    let mut job = Job::start(make());
    job.line();
    job.line();
    let pid = job.pid().to_string();
    let o = mosix(&[
        "checkpoint",
        &pid,
        "-o",
        img.to_str().unwrap(),
        "--leave-running",
        "--json",
    ]);
    assert_ok(&o, "checkpoint --leave-running");
    let st: serde_json::Value = serde_json::from_slice(&o.stderr).expect("--json");
    assert!(st["frozen_ms"].as_f64().is_some(), "{st}");
    // At least the first round and the final one.
    assert!(st["rounds"].as_array().unwrap().len() >= 2, "{st}");
    assert_eq!(job.rest(), want, "the original's output changed");
    assert!(job.wait().success());
    let r = mosix(&["restart", img.to_str().unwrap()]);
    assert_ok(&r, "restart");
    let got = String::from_utf8_lossy(&r.stdout);
    assert!(
        !got.is_empty() && want.ends_with(&*got),
        "the restarted process printed {got:?}"
    );
}

#[test]
fn every_refusal_reason_and_the_process_goes_on() {
    let cases = [
        ("shm", "writable shared memory"),
        ("memfd", "is shared with process"),
        ("sysv", "System V shared memory"),
        ("socket", "fd 3 is a socket"),
        ("pipe", "fd 3 is a pipe"),
        ("child", "child processes"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (what, reason) in cases {
        let mut job = Job::start({
            let mut c = prog("refuse");
            c.arg(what).arg(dir.path().join("shared-file"));
            c
        });
        job.line();
        let pid = job.pid().to_string();
        let check = mosix(&["checkpoint", "--check", &pid]);
        let text = String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(1), "{what}: --check must fail");
        assert!(text.contains(reason), "{what}: --check said {text:?}");
        let img = dir.path().join(format!("{what}.img"));
        let o = mosix(&["checkpoint", &pid, "-o", img.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what}: checkpoint must refuse");
        assert!(
            err.contains(reason) && err.lines().count() == 1,
            "{what}: said {err:?}"
        );
        assert!(!img.exists(), "{what}: no image may be left behind");
        // Still running, untraced, and still printing.
        job.line();
        job.line();
        assert_eq!(proc_field(job.pid(), "TracerPid"), "TracerPid:\t0");
    }
    let ok = mosix(&["checkpoint", "--check", &std::process::id().to_string()]);
    assert_eq!(ok.status.code(), Some(1)); // the test runner holds pipes and sockets
}

#[test]
fn damaged_images_are_refused_and_nothing_starts() {
    let dir = tempfile::tempdir().unwrap();
    let img = round_trip(awk_loop, 1, &[]);
    let good = std::fs::read(&img).unwrap();
    let bad = dir.path().join("bad.img");
    let try_restart = |bytes: &[u8], expect: &str| {
        std::fs::write(&bad, bytes).unwrap();
        let o = mosix(&["restart", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            o.stdout.is_empty(),
            "a process was started from a damaged image"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
        assert!(err.contains(expect), "said {err:?}, wanted {expect:?}");
    };
    // Bits flipped at spread-out places, header included.
    let mut positions: Vec<usize> = (0..40).collect();
    positions.extend((0..200).map(|i| 40 + i * (good.len() - 41) / 199));
    for p in positions {
        let mut b = good.clone();
        b[p] ^= 1 << (p % 8);
        try_restart(&b, "bad image");
    }
    try_restart(&good[..good.len() / 2], "truncated");
    try_restart(
        b"#!/bin/sh\necho this is not an image\n",
        "not a mosix process image",
    );
    let mut newer = good.clone();
    newer[8] = 9;
    newer[10..12].copy_from_slice(&0u16.to_le_bytes());
    let sum = mosix_ckpt::sum::xxh3_64(&newer[..24]);
    newer[24..32].copy_from_slice(&sum.to_le_bytes());
    try_restart(&newer, "image format 9.0 is not supported");
    let missing = mosix(&["restart", "/nonexistent/x.img"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot open /nonexistent/x.img"));
    // On standard input the process is built while the image arrives: a damaged image
    // is found before it runs (the last check is the whole stream's checksum), and the
    // half-built process is gone.
    let stdin_restart = |bytes: &[u8]| {
        use std::io::Write;
        let mut c = Command::new(MOSIX)
            .args(["restart", "--trust-image", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // (It may stop reading at the first damaged record.)
        let _ = c.stdin.take().unwrap().write_all(bytes);
        c.wait_with_output().unwrap()
    };
    let ok = stdin_restart(&good);
    assert_eq!(
        ok.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!ok.stdout.is_empty());
    for i in 0..30 {
        let p = 40 + i * (good.len() - 41) / 29;
        let mut b = good.clone();
        b[p] ^= 1 << (p % 8);
        let o = stdin_restart(&b);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "flip at {p} restored");
        assert!(o.stdout.is_empty(), "a process ran from a damaged image");
        assert!(err.contains("bad image"), "flip at {p}: {err:?}");
        assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    }
}

/// The postcopy program, checkpointed after its first line: an uninterrupted run, the
/// lines it printed before, and the image.
fn postcopy_image(args: &[&str], ckpt_args: &[&str]) -> (Output, String, Vec<u8>) {
    let make = || {
        let mut c = prog("postcopy");
        c.args(args);
        c
    };
    let want = reference(make());
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("job.img");
    let mut job = Job::start(make());
    job.line();
    // (With "fork" it has a child from its 10th line on, and cannot be checkpointed then:
    // it is, long before, unless this machine is very slow; then the test says so.)
    let before = job.checkpoint_into(&img, ckpt_args);
    (want, before, std::fs::read(&img).unwrap())
}

/// `mosix restart --lazy -` on `first`, then on `rest` once `go` says so: the lines it
/// printed, as they came, and how it ended (and what it said).
struct LazyRestart {
    child: Child,
    input: Option<std::process::ChildStdin>,
    lines: Receiver<String>,
}

impl LazyRestart {
    fn start(first: &[u8]) -> LazyRestart {
        use std::io::Write;
        let mut child = Command::new(MOSIX)
            .args(["restart", "--lazy", "--trust-image", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = lines_of(child.stdout.take().unwrap());
        let mut input = child.stdin.take();
        // (It may stop reading at a damaged record.)
        let _ = input.as_mut().unwrap().write_all(first);
        LazyRestart {
            child,
            input,
            lines,
        }
    }

    fn rest(mut self, rest: &[u8]) -> (String, ExitStatus, String) {
        use std::io::{Read, Write};
        let mut input = self.input.take().unwrap();
        let _ = input.write_all(rest);
        drop(input);
        // Until its stdout closes: the process is gone.
        let mut out = String::new();
        while let Ok(l) = self.lines.recv_timeout(PATIENCE) {
            out.push_str(&l);
            out.push('\n');
        }
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        (out, status, err)
    }
}

/// Post-copy from a stream: the restarted process runs before its private memory has
/// arrived. The image's last 4 MiB (the end of the program's 64 MiB buffer, which it
/// reads only at its end) are held back until it has printed `until`; then it gets them,
/// reads its buffer, and ends as an uninterrupted run does. With "fork", its children
/// (from its 10th line on) are made while its memory is still coming, and read the
/// whole buffer: they get the pages that arrive after they were made. An lz4 image too.
#[test]
fn lazy_restart_runs_before_its_memory_arrived() {
    let lz4 = ["--compress", "lz4"];
    for (args, until, ckpt) in [
        (&["64", "150"][..], None, &[][..]),
        (&["64", "40", "fork"][..], Some("tick 10"), &[][..]),
        (&["64", "150"][..], None, &lz4[..]),
    ] {
        let (want, before, image) = postcopy_image(args, ckpt);
        let cut = image.len() - (4 << 20).min(image.len() / 4);
        let r = LazyRestart::start(&image[..cut]);
        let mut seen = String::new();
        loop {
            let l = r.lines.recv_timeout(PATIENCE).unwrap_or_else(|_| {
                panic!("{args:?}: the restarted process printed {seen:?} before the rest of its image came")
            });
            seen.push_str(&l);
            seen.push('\n');
            if until.is_none_or(|u| l == u) {
                break;
            }
        }
        let (rest, status, err) = r.rest(&image[cut..]);
        let got = format!("{before}{seen}{rest}");
        assert_eq!(
            got,
            String::from_utf8_lossy(&want.stdout),
            "{args:?}: output differs from an uninterrupted run; stderr: {err}"
        );
        assert!(same_status(status, want.status), "{status}: {err}");
    }
}

/// Real programs through `restart --lazy -` (the image piped in whole): awk, python (as
/// a user without rights) and the 256 MiB heap job, which dies by a signal, end as their
/// uninterrupted runs do.
#[test]
fn lazy_restart_of_real_programs() {
    let py = || {
        let mut c = python();
        c.args(["-c", PY]).current_dir("/tmp").uid(65534).gid(65534);
        c
    };
    let heap = || {
        let mut c = prog("heap");
        c.arg("256");
        c
    };
    let jobs: [(&str, &dyn Fn() -> Command, usize); 3] = [
        ("awk", &awk_loop, 1),
        ("python", &py, 1),
        ("heap", &heap, 2),
    ];
    for (what, make, lines) in jobs {
        let want = reference(make());
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("job.img");
        let mut job = Job::start(make());
        for _ in 0..lines {
            job.line();
        }
        let before = job.checkpoint_into(&img, &[]);
        // (Python runs as nobody: its image is restored as that user.)
        let whose = if what == "python" {
            ["--as-user", "nobody"].as_slice()
        } else {
            ["--trust-image"].as_slice()
        };
        let after = Command::new(MOSIX)
            .args(["restart", "--lazy"])
            .args(whose)
            .arg("-")
            .stdin(std::fs::File::open(&img).unwrap())
            .output()
            .unwrap();
        let got = before + &String::from_utf8_lossy(&after.stdout);
        assert_eq!(
            got,
            String::from_utf8_lossy(&want.stdout),
            "{what}: output differs; stderr: {}",
            String::from_utf8_lossy(&after.stderr)
        );
        assert!(
            same_status(after.status, want.status),
            "{what}: {} against {}",
            after.status,
            want.status
        );
    }
}

/// A stream damaged after the process started: the restart says so in one line and fails,
/// and the process (which ran meanwhile) is gone.
#[test]
fn lazy_restart_of_a_stream_damaged_late_ends_the_process() {
    let (_, _, mut image) = postcopy_image(&["64", "150"], &[]);
    let at = image.len() - 100;
    image[at] ^= 0x10;
    let (first, rest) = image.split_at(image.len() - (1 << 20));
    let (_, status, err) = LazyRestart::start(first).rest(rest);
    assert!(!status.success(), "restarted from a damaged image");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains("bad image"), "{err:?}");
}

#[test]
fn detach_prints_the_pid_and_returns() {
    let dir = tempfile::tempdir().unwrap();
    let want = reference(awk_loop());
    let img = dir.path().join("d.img");
    let mut job = Job::start(awk_loop());
    job.line();
    assert_ok(
        &mosix(&[
            "checkpoint",
            &job.pid().to_string(),
            "-o",
            img.to_str().unwrap(),
        ]),
        "checkpoint",
    );
    job.wait();
    let before = job.rest();
    // The detached process shares the command's stdout (a file here): the PID line
    // first, then whatever the process prints.
    let out_file = dir.path().join("out.txt");
    let st = Command::new(MOSIX)
        .args(["restart", "--detach", img.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let text = std::fs::read_to_string(&out_file).unwrap();
    let pid: i32 = text.lines().next().unwrap().trim().parse().expect("a PID");
    // SAFETY: pidfd_open has no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd >= 0 {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, PATIENCE.as_millis() as i32) };
        assert_eq!(n, 1, "restored process {pid} finished");
    }
    let text = std::fs::read_to_string(&out_file).unwrap();
    let rest = text.split_once('\n').unwrap().1;
    assert_eq!(before + rest, String::from_utf8_lossy(&want.stdout));
}

/// A pidclock line with its PID and clock reading taken out, for comparison with a run
/// of other timing; and the two values.
fn pidclock_line(l: &str) -> (String, Option<i32>, Option<i64>) {
    let f: Vec<&str> = l.split_whitespace().collect();
    let mut shape = Vec::new();
    let (mut pid, mut mono) = (None, None);
    let mut i = 0;
    while i < f.len() {
        shape.push(f[i].to_string());
        match f[i] {
            "pid" if i + 1 < f.len() => {
                pid = f[i + 1].parse().ok();
                shape.push("_".into());
                i += 1;
            }
            "mono" if i + 1 < f.len() => {
                mono = f[i + 1].parse().ok();
                shape.push("_".into());
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    (shape.join(" "), pid, mono)
}

/// The processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The last field of NSpid: the PID a process has in its own namespace.
fn inner_pid(pid: i32) -> Option<i32> {
    proc_field(pid, "NSpid")
        .split_whitespace()
        .last()
        .and_then(|p| p.parse().ok())
}

#[test]
fn keep_pid_restores_pid_and_continuous_clocks() {
    let want = reference(prog("pidclock"));
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.img");
    let mut job = Job::start(prog("pidclock"));
    job.line();
    job.line();
    let orig = job.pid();
    assert_ok(
        &mosix(&["checkpoint", &orig.to_string(), "-o", img.to_str().unwrap()]),
        "checkpoint",
    );
    job.wait();
    let before = job.rest();
    let last_mono_before = before
        .lines()
        .rev()
        .find_map(|l| pidclock_line(l).2)
        .expect("a clock reading before the checkpoint");

    // Restarted with a pipe as stdin: the program waits for a byte after each line, so
    // it can be looked at while it runs; closing the pipe lets it run to the end.
    let mut restart = Command::new(MOSIX)
        .args(["restart", "--keep-pid", img.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = restart.stdin.take().unwrap();
    // One byte first: the image may have been taken right between a line and the read
    // that follows it, so the restarted process may wait for a byte before printing.
    std::io::Write::write_all(&mut stdin, b"g").unwrap();
    let mut out = BufReader::new(restart.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(!first.is_empty(), "the restarted process printed a line");
    let kids = children_of(restart.id() as i32);
    let restored = *kids
        .iter()
        .find(|&&k| inner_pid(k) == Some(orig))
        .unwrap_or_else(|| panic!("no child of restart has PID {orig} inside: {kids:?}"));
    let init = *kids
        .iter()
        .find(|&&k| inner_pid(k) == Some(1))
        .expect("the namespace's init is a child of restart");
    let ns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/pid")).unwrap();
    assert_eq!(
        ns(restored),
        ns(init),
        "init and process share a PID namespace"
    );
    let offsets = std::fs::read_to_string(format!("/proc/{restored}/timens_offsets")).unwrap();
    for clock in ["monotonic", "boottime"] {
        let l = offsets
            .lines()
            .find(|l| l.starts_with(clock))
            .unwrap_or_else(|| panic!("no {clock} in {offsets:?}"));
        let v: Vec<i64> = l
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        assert!(v != [0, 0], "{clock} offset is zero: {offsets:?}");
    }
    // SAFETY: pidfd_open has no memory arguments.
    let init_fd = unsafe { libc::syscall(libc::SYS_pidfd_open, init, 0) } as i32;
    assert!(init_fd >= 0, "pidfd of init");
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = restart.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut restart.stderr.take().unwrap(), &mut err).unwrap();

    let got = before.clone() + &first + &rest;
    assert!(!got.contains("BACKWARDS"), "a clock went backwards:\n{got}");
    let shape = |t: &str| -> Vec<String> { t.lines().map(|l| pidclock_line(l).0).collect() };
    assert_eq!(
        shape(&got),
        shape(&String::from_utf8_lossy(&want.stdout)),
        "output differs from an uninterrupted run"
    );
    for l in (first.clone() + &rest).lines() {
        assert_eq!(
            pidclock_line(l).1,
            Some(orig),
            "getpid() after restart: {l}"
        );
    }
    let first_mono = pidclock_line(&first).2.expect("a clock reading");
    assert!(
        first_mono >= last_mono_before,
        "CLOCK_MONOTONIC went back across the restart: {first_mono} < {last_mono_before}"
    );
    assert!(
        same_status(status, want.status),
        "exit status {status} differs from {}; stderr: {err}",
        want.status
    );
    // Init has ended, and restart has reaped it: nothing is left in the namespace.
    let mut p = libc::pollfd {
        fd: init_fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, PATIENCE.as_millis() as i32) };
    assert_eq!(n, 1, "the namespace's init ended");
    // SAFETY: closing our pidfd.
    unsafe { libc::close(init_fd) };
    assert!(
        !Path::new(&format!("/proc/{init}")).exists(),
        "init {init} is left behind"
    );
    assert!(!Path::new(&format!("/proc/{restored}")).exists());
}

#[test]
fn stdio_option_connects_the_process_to_given_descriptors() {
    let want = reference(prog("pidclock"));
    let mut job = Job::start(prog("pidclock"));
    job.line();
    let opts = mosix_ckpt::DumpOptions {
        leave_running: false,
        compression: mosix_ckpt::Compression::None,
    };
    let (bytes, _) =
        mosix_ckpt::checkpoint(job.pid(), Vec::new(), opts, &mut |_, _| {}).expect("checkpoint");
    // The program is our child and the checkpoint has reaped it: no job.wait().
    let before = job.rest();
    let mut img = mosix_ckpt::read_image(&bytes[..]).unwrap();
    // PID 1 is the namespace's init: refused, nothing started.
    let orig = img.meta.pid;
    img.meta.pid = 1;
    let keep = mosix_ckpt::RestoreOptions {
        keep_pid: true,
        ..Default::default()
    };
    let e = mosix_ckpt::restore(&img, keep).unwrap_err().to_string();
    assert!(e.contains("PID 1") && e.lines().count() == 1, "said {e:?}");
    img.meta.pid = orig;
    // A restore into new namespaces that fails half-way leaves no process behind: the
    // half-built one and the namespace's init are killed and reaped.
    let cwd = std::mem::replace(&mut img.meta.cwd, "/nonexistent/dir".into());
    let keep = mosix_ckpt::RestoreOptions {
        keep_pid: true,
        time_ns: true,
        ..Default::default()
    };
    let e = mosix_ckpt::restore(&img, keep).unwrap_err().to_string();
    assert!(e.contains("chdir to /nonexistent/dir"), "said {e:?}");
    let me = nix::unistd::gettid().as_raw();
    let kids = std::fs::read_to_string(format!("/proc/self/task/{me}/children")).unwrap();
    for k in kids
        .split_whitespace()
        .filter_map(|k| k.parse::<i32>().ok())
    {
        let inner = inner_pid(k);
        assert!(
            inner != Some(1) && inner != Some(orig),
            "process {k} left behind"
        );
    }
    img.meta.cwd = cwd;
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    use std::os::fd::AsRawFd;
    let new = mosix_ckpt::restore(
        &img,
        mosix_ckpt::RestoreOptions {
            stdio: Some([null.as_raw_fd(), wr.as_raw_fd(), 2]),
            ..Default::default()
        },
    )
    .expect("restore");
    drop(wr);
    let mut after = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(rd), &mut after).unwrap();
    let mut status = 0;
    // SAFETY: waitpid writes the status int; the process is our child.
    let r = unsafe { libc::waitpid(new.pid, &mut status, 0) };
    assert_eq!(r, new.pid);
    assert_eq!(Some(libc::WEXITSTATUS(status)), want.status.code());
    let shape = |t: &str| -> Vec<String> { t.lines().map(|l| pidclock_line(l).0).collect() };
    assert_eq!(
        shape(&(before + &after)),
        shape(&String::from_utf8_lossy(&want.stdout))
    );
}

/// A process restored with --keep-pid is checkpointed again (it is in a PID and a time
/// namespace then) and restored again with --keep-pid: still its first PID, clocks still
/// continuous.
#[test]
fn keep_pid_twice() {
    let want = reference(prog("pidclock"));
    let dir = tempfile::tempdir().unwrap();
    let (img1, img2) = (dir.path().join("1.img"), dir.path().join("2.img"));
    let mut job = Job::start(prog("pidclock"));
    job.line();
    let orig = job.pid();
    assert_ok(
        &mosix(&[
            "checkpoint",
            &orig.to_string(),
            "-o",
            img1.to_str().unwrap(),
        ]),
        "checkpoint",
    );
    job.wait();
    let mut got = job.rest();
    // Paced by a pipe on stdin: it waits after each line, so it is checkpointed while
    // blocked in read(2).
    let mut restart = Command::new(MOSIX)
        .args(["restart", "--keep-pid", img1.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = restart.stdin.take().unwrap();
    // One byte first: the image may have been taken between a line and the read after it.
    std::io::Write::write_all(&mut stdin, b"g").unwrap();
    let mut out = BufReader::new(restart.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    got += &line;
    let restored = *children_of(restart.id() as i32)
        .iter()
        .find(|&&k| inner_pid(k) == Some(orig))
        .expect("the restored process");
    assert_ok(
        &mosix(&[
            "checkpoint",
            &restored.to_string(),
            "-o",
            img2.to_str().unwrap(),
        ]),
        "second checkpoint",
    );
    assert_eq!(restart.wait().unwrap().signal(), Some(libc::SIGKILL));
    // Whatever it printed before the second checkpoint (one more line at most).
    std::io::Read::read_to_string(&mut out, &mut got).unwrap();
    drop(stdin);
    let second = mosix(&["restart", "--keep-pid", img2.to_str().unwrap()]);
    got += &String::from_utf8_lossy(&second.stdout);
    assert!(!got.contains("BACKWARDS"), "a clock went backwards:\n{got}");
    let lines: Vec<_> = got.lines().map(pidclock_line).collect();
    let shape: Vec<&str> = lines.iter().map(|l| l.0.as_str()).collect();
    let want_text = String::from_utf8_lossy(&want.stdout);
    let want_shape: Vec<String> = want_text.lines().map(|l| pidclock_line(l).0).collect();
    assert_eq!(
        shape, want_shape,
        "output differs from an uninterrupted run"
    );
    assert!(
        lines.iter().all(|l| l.1 == Some(orig)),
        "PID changed:\n{got}"
    );
    let monos: Vec<i64> = lines.iter().filter_map(|l| l.2).collect();
    assert!(
        monos.windows(2).all(|w| w[0] <= w[1]),
        "clock went back:\n{got}"
    );
    assert!(same_status(second.status, want.status));
}
