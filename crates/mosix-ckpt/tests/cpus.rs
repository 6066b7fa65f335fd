//! While a process is checkpointed or restored, it and its tracer share one CPU (the
//! ptrace round trips stay on it); afterwards every thread has the CPUs it had: a process
//! checkpointed and let run keeps its own, a restored one gets its restorer's, and so do
//! the restorer and the threads it started meanwhile. A mistake here would leave a user's
//! program on one CPU for good.

mod common;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;

const PROG: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *idle(void *a) { (void)a; for (;;) pause(); return 0; }
int main(void) {
    pthread_t t;
    for (int i = 0; i < 3; i++) pthread_create(&t, 0, idle, 0);
    printf("ready\n");
    fflush(stdout);
    char b[8];
    return read(0, b, sizeof b) < 0;
}
"#;

/// The CPUs of each thread of `pid`.
fn masks_of(pid: i32) -> Vec<(i32, CpuSet)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .map(|t: i32| (t, sched_getaffinity(Pid::from_raw(t)).unwrap()))
        .collect()
}

fn mine() -> CpuSet {
    sched_getaffinity(Pid::from_raw(0)).unwrap()
}

fn count(m: &CpuSet) -> usize {
    (0..CpuSet::count())
        .filter(|&c| m.is_set(c).unwrap_or(false))
        .count()
}

#[test]
fn cpus_are_given_back_after_checkpoint_and_restore() {
    let ours = mine();
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| ours.is_set(c).unwrap_or(false))
        .collect();
    if cpus.len() < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let bin = common::build_c("cpus_prog", PROG);
    // The program on the last CPU only, all its threads.
    let mut last = CpuSet::new();
    last.set(cpus[cpus.len() - 1]).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: close_range and sched_setaffinity are async-signal-safe and touch no
        // memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                sched_setaffinity(Pid::from_raw(0), &last).map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert_eq!(l, "ready\n");
    let pid = child.id() as i32;
    assert_eq!(masks_of(pid).len(), 4);

    // Checkpointed and let run: every thread keeps its CPU, and we keep ours.
    let opts = mosix_ckpt::DumpOptions {
        leave_running: true,
        compression: mosix_ckpt::Compression::None,
    };
    let (bytes, _) =
        mosix_ckpt::checkpoint(pid, Vec::new(), opts, &mut |_, _| {}).expect("checkpoint");
    for (t, m) in masks_of(pid) {
        assert_eq!(m, last, "thread {t} of the process let run");
    }
    assert_eq!(mine(), ours, "the checkpointer's CPUs");
    child.stdin.take().unwrap().write_all(b"q\n").unwrap();
    assert!(child.wait().unwrap().success());

    // Restored (plain, then with its memory put in while it runs; waiting in its read
    // of a pipe of ours meanwhile): its threads have the restorer's CPUs, as do the
    // restorer and its fill thread.
    let img = Arc::new(mosix_ckpt::read_image_bytes(bytes).unwrap());
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let opts = || mosix_ckpt::RestoreOptions {
        stdio: Some([rd.as_raw_fd(), 1, 2]),
        ..Default::default()
    };
    let restored = mosix_ckpt::restore(&img, opts()).expect("restore");
    for (t, m) in masks_of(restored.pid) {
        assert_eq!(m, ours, "thread {t} of the restored process");
    }
    assert_eq!(mine(), ours, "the restorer's CPUs");
    go_on(&wr, restored.pid);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the lazy restore skipped: needs /dev/userfaultfd (root)");
        return;
    }
    let (restored, filling) =
        mosix_ckpt::restore_lazy(&img, opts(), &mosix_ckpt::CredOptions::from_image())
            .expect("lazy restore");
    for (t, m) in masks_of(restored.pid) {
        assert_eq!(m, ours, "thread {t} of the process restored lazily");
    }
    assert_eq!(mine(), ours, "the restorer's CPUs");
    let fill = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .parse::<i32>()
                .unwrap()
        })
        .find(|t| {
            std::fs::read_to_string(format!("/proc/self/task/{t}/comm"))
                .is_ok_and(|c| c.trim() == "mosix-fill")
        });
    if let Some(t) = fill {
        let m = sched_getaffinity(Pid::from_raw(t)).unwrap();
        assert_eq!(m, ours, "the fill thread's CPUs ({} of them)", count(&m));
    }
    let filling = filling.expect("a fill (root has /dev/userfaultfd)");
    nix::unistd::write(&wr, b"q\n").unwrap();
    filling.finish();
    go_on(&wr, restored.pid);
}

/// Lets the restored process read its line and end; reaps it.
fn go_on(wr: &std::os::fd::OwnedFd, pid: i32) {
    let _ = nix::unistd::write(wr, b"q\n");
    let st = nix::sys::wait::waitpid(Pid::from_raw(pid), None).unwrap();
    assert!(
        matches!(st, nix::sys::wait::WaitStatus::Exited(_, 0)),
        "{st:?}"
    );
}
