//! Checkpoint/restart of multi-threaded programs through the `mosix` command, as root:
//! pthreads, OpenMP, Python threads and thread pools, numpy over OpenBLAS threads, Go
//! goroutines (with the runtime's poller: epoll and a pipe), a JVM; and what moves with
//! such programs: memfds, shared anonymous memory, epoll, eventfd, pipes inside the
//! process. Each is checkpointed in the middle of its work (after a given line
//! of output) and restarted; what it printed before plus what the restarted process
//! prints must equal an uninterrupted run, and so must the exit status. Programs start
//! with only descriptors 0, 1, 2 (stdin and stdout pipes of the test, stderr /dev/null).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::OnceLock;
use std::time::Duration;

const MOSIX: &str = env!("CARGO_BIN_EXE_mosix");
/// Upper bound for any one wait (a hang fails instead of blocking CI).
const PATIENCE: Duration = Duration::from_secs(120);
/// Debian's python3 (the one with python3-numpy), not whatever is first on PATH.
const PYTHON: &str = "/usr/bin/python3";

fn out_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("thread-progs");
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/progs")
        .join(name)
}

fn build(what: &str, cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A C program of tests/progs, built once with `flags`.
fn c_prog(name: &str, flags: &[&str]) -> PathBuf {
    let bin = out_dir().join(name);
    build(
        &format!("cc {name}.c"),
        Command::new("cc")
            .arg("-O2")
            .arg("-o")
            .arg(&bin)
            .arg(src(&format!("{name}.c")))
            .args(flags),
    );
    bin
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

/// A running command whose stdout lines arrive on a channel; its stdin is a pipe.
struct Run {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: String,
}

impl Run {
    fn start(cmd: &mut Command) -> Run {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("program starts");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        // Pieces as written, each up to its newline (the last maybe without one): a
        // checkpoint may fall between two writes of one line, and the output compared is
        // the bytes, not lines.
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            loop {
                let mut piece = Vec::new();
                match r.read_until(b'\n', &mut piece) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
                if tx
                    .send(String::from_utf8_lossy(&piece).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Run {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            seen: String::new(),
        }
    }
    fn line(&mut self) -> String {
        let l = self
            .lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no next line after {:?}", self.seen));
        self.seen.push_str(&l);
        l.trim_end_matches('\n').to_string()
    }
    fn send(&mut self, s: &str) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(s.as_bytes()).unwrap();
        w.flush().unwrap();
    }
    /// Closes stdin, reads to the end of stdout, waits.
    fn finish(&mut self) -> (String, ExitStatus) {
        self.stdin = None;
        while let Ok(l) = self.lines.recv_timeout(PATIENCE) {
            self.seen.push_str(&l);
        }
        (self.seen.clone(), self.child.wait().unwrap())
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // SAFETY: kill of our own process group; no memory involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn mosix(args: &[&str]) -> std::process::Output {
    Command::new(MOSIX)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("mosix runs")
}

/// How a case is run: checkpointed after `lines` lines; `input` written to its stdin
/// after that (to the restarted process in the interrupted run).
struct Case<'a> {
    make: &'a dyn Fn() -> Command,
    lines: usize,
    input: Option<&'a str>,
    restart: &'a [&'a str],
}

fn same_status(a: ExitStatus, b: ExitStatus) -> bool {
    a.code() == b.code() && a.signal() == b.signal()
}

/// Runs the case uninterrupted, then checkpointed and restarted; both must print the same
/// and end the same. Returns the checkpoint's report line.
fn round_trip(c: &Case) -> String {
    let mut want = Run::start(clean_fds(&mut (c.make)()));
    for _ in 0..c.lines {
        want.line();
    }
    if let Some(i) = c.input {
        want.send(i);
    }
    let (want_out, want_status) = want.finish();

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("job.img");
    let mut job = Run::start(clean_fds(&mut (c.make)()));
    for _ in 0..c.lines {
        job.line();
    }
    let pid = job.child.id().to_string();
    let ck = mosix(&["checkpoint", &pid, "-o", img.to_str().unwrap()]);
    assert!(
        ck.status.success(),
        "checkpoint failed: {}",
        String::from_utf8_lossy(&ck.stderr)
    );
    let (before, st) = job.finish();
    assert_eq!(
        st.signal(),
        Some(libc::SIGKILL),
        "checkpoint kills the original"
    );

    let mut args = vec!["restart"];
    args.extend_from_slice(c.restart);
    args.push(img.to_str().unwrap());
    let mut again = Run::start(Command::new(MOSIX).args(&args));
    again.seen = before;
    if let Some(i) = c.input {
        again.send(i);
    }
    let (got, status) = again.finish();
    assert_eq!(
        got, want_out,
        "output differs from an uninterrupted run (restart ended {status})"
    );
    assert!(
        same_status(status, want_status),
        "exit status {status} differs from {want_status}"
    );
    String::from_utf8_lossy(&ck.stderr).into_owned()
}

#[test]
fn pthreads_mutex_condvar_sleep_and_read() {
    let bin = c_prog("threads", &["-pthread"]);
    for restart in [&[][..], &["--keep-pid"][..]] {
        round_trip(&Case {
            make: &|| Command::new(&bin),
            lines: 2,
            input: Some("hello\n"),
            restart,
        });
    }
}

#[test]
fn every_thread_keeps_its_own_state() {
    let bin = c_prog("threadstate", &["-pthread", "-lm"]);
    round_trip(&Case {
        make: &|| Command::new(&bin),
        lines: 1,
        input: Some("check\n"),
        restart: &["--keep-pid"],
    });
}

/// Threads born while the others are being frozen are caught: checkpoints of a program
/// that starts threads all the time, left running, then one that it is restarted from.
#[test]
fn threads_born_during_the_freeze_are_caught() {
    let bin = c_prog("spawner", &["-pthread"]);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.img");
    let mut job = Run::start(clean_fds(&mut Command::new(&bin)));
    job.line();
    let pid = job.child.id().to_string();
    for _ in 0..5 {
        let o = mosix(&[
            "checkpoint",
            &pid,
            "-o",
            img.to_str().unwrap(),
            "--leave-running",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r = mosix_ckpt::read_image_file(&img).expect("the image reads back");
        // Every thread of the image is one of the process's (main, or a worker).
        assert!(
            r.meta.threads.len() <= 4,
            "{} threads",
            r.meta.threads.len()
        );
    }
    let (out, st) = job.finish();
    assert!(st.success(), "the original went on and ended well: {st}");
    assert_eq!(out.lines().count(), 16, "{out}");
    round_trip(&Case {
        make: &|| Command::new(&bin),
        lines: 3,
        input: None,
        restart: &[],
    });
}

#[test]
fn openmp_checksum() {
    let bin = c_prog("omp", &["-fopenmp"]);
    round_trip(&Case {
        make: &|| {
            let mut c = Command::new(&bin);
            c.env("OMP_NUM_THREADS", "4");
            c
        },
        lines: 3,
        input: None,
        restart: &[],
    });
}

fn python(script: &str) -> Command {
    let mut c = Command::new(PYTHON);
    c.arg(src(script));
    c
}

#[test]
fn python_threads_and_thread_pool() {
    // (pythreads.py prints one line before its threads are done, pypool.py 17.)
    for (script, lines) in [("pythreads.py", 1), ("pypool.py", 3)] {
        round_trip(&Case {
            make: &|| python(script),
            lines,
            input: None,
            restart: &[],
        });
    }
}

#[test]
fn numpy_over_openblas_threads() {
    let report = round_trip(&Case {
        make: &|| {
            let mut c = python("npmatmul.py");
            c.env("OPENBLAS_NUM_THREADS", "4");
            c
        },
        lines: 3,
        input: None,
        restart: &["--keep-pid"],
    });
    assert!(report.contains("checkpointed"), "{report}");
}

#[test]
fn go_goroutines_on_four_procs() {
    let bin = out_dir().join("goroutines");
    let cache = out_dir().join("gocache");
    build(
        "go build",
        Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(src("goroutines.go"))
            .env("GOCACHE", &cache)
            .env("GOPATH", out_dir().join("gopath"))
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .current_dir(out_dir()),
    );
    for restart in [&[][..], &["--keep-pid"][..]] {
        round_trip(&Case {
            make: &|| {
                let mut c = Command::new(&bin);
                c.env("GOMAXPROCS", "4");
                c
            },
            lines: 3,
            input: None,
            restart,
        });
    }
}

#[test]
fn jvm_cpu_bound_class() {
    let classes = out_dir().join("java");
    // javac as the JRE has it (default-jre-headless has no javac binary).
    build(
        "javac",
        Command::new("java")
            .args(["-m", "jdk.compiler/com.sun.tools.javac.Main", "-d"])
            .arg(&classes)
            .arg(src("Spin.java")),
    );
    let java = |perf: bool| {
        let mut c = Command::new("java");
        if !perf {
            c.arg("-XX:-UsePerfData");
        }
        c.arg("-cp").arg(&classes).arg("Spin");
        c
    };
    // The JVM's perf-data file is a shared writable mapping of a file in /tmp: refused,
    // with that reason, and the JVM goes on.
    let mut j = Run::start(clean_fds(&mut java(true)));
    j.line();
    let o = mosix(&["checkpoint", "--check", &j.child.id().to_string()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success() && text.contains("hsperfdata"),
        "--check said {text:?}"
    );
    j.line();
    drop(j);
    round_trip(&Case {
        make: &|| java(false),
        lines: 2,
        input: None,
        restart: &["--keep-pid"],
    });
}

#[test]
fn memfd_and_shared_anonymous_memory_move_with_the_process() {
    let bin = c_prog("shm", &["-pthread"]);
    round_trip(&Case {
        make: &|| Command::new(&bin),
        lines: 1,
        input: Some("check\n"),
        restart: &[],
    });
}

#[test]
fn epoll_eventfd_and_a_pipe_inside_the_process() {
    let bin = c_prog("kobj", &[]);
    round_trip(&Case {
        make: &|| Command::new(&bin),
        lines: 1,
        input: Some("check\n"),
        restart: &[],
    });
}

/// A restored process checkpointed again gives the same threads, as the kernel reports
/// them (not the program): IDs, names, TLS bases, blocked and pending signals, alternate
/// stacks, rseq registrations, robust lists, clear_child_tid.
#[test]
fn restored_threads_checkpoint_the_same() {
    let bin = c_prog("threadstate", &["-pthread", "-lm"]);
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("1.img"), dir.path().join("2.img"));
    let ck = |pid: &str, img: &Path, more: &[&str]| {
        let mut args = vec!["checkpoint", pid, "-o", img.to_str().unwrap()];
        args.extend_from_slice(more);
        let o = mosix(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let mut job = Run::start(clean_fds(&mut Command::new(&bin)));
    assert_eq!(job.line(), "ready");
    ck(&job.child.id().to_string(), &one, &[]);
    job.finish();
    let mut again = Run::start(Command::new(MOSIX).args([
        "restart",
        "--keep-pid",
        "--detach",
        one.to_str().unwrap(),
    ]));
    let pid = again.line();
    ck(&pid, &two, &["--leave-running"]);
    let (a, b) = (
        mosix_ckpt::read_image_file(&one).unwrap().meta,
        mosix_ckpt::read_image_file(&two).unwrap().meta,
    );
    assert_eq!(a.threads.len(), 2);
    assert_eq!(b.threads.len(), 2);
    let main = |m: &mosix_ckpt::ProcessImage| {
        (
            m.pid,
            m.rseq.clone(),
            m.robust_list,
            m.clear_child_tid,
            m.blocked,
            m.sigaltstack,
        )
    };
    assert_eq!(main(&a), main(&b));
    for (x, y) in a.threads.iter().zip(&b.threads) {
        let regs = |t: &mosix_ckpt::image::ThreadImage| mosix_ckpt::sys::regs_from_bytes(&t.regs);
        assert!(x.rseq.is_some(), "glibc registers rseq for every thread");
        assert_eq!(
            (&x.comm, x.fs_base, x.gs_base, x.blocked, x.sigaltstack),
            (&y.comm, y.fs_base, y.gs_base, y.blocked, y.sigaltstack),
            "thread {}",
            x.tid
        );
        assert_eq!(
            (x.tid, &x.rseq, x.robust_list, x.clear_child_tid, &x.pending),
            (y.tid, &y.rseq, y.robust_list, y.clear_child_tid, &y.pending),
        );
        assert_eq!(regs(y).map(|r| r.fs_base), Some(x.fs_base));
        assert_eq!(x.pending.len(), 1, "its own signal, still pending");
    }
    again.send("check\n");
    let (out, st) = again.finish();
    assert!(st.success(), "mosix restart --detach: {st}");
    assert_eq!(
        out.lines().filter(|l| l.contains("tid same")).count(),
        2,
        "{out}"
    );
}
