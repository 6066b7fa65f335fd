//! Dirty-page tracking (mosix_ckpt::dirty) on a real process, as root: the pages it
//! writes are found exactly, areas it maps later are not registered, pages it gives back
//! are no longer present, and nothing of the tracking is left in it afterwards.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use mosix_ckpt::dirty::{pages, Tracker};

mod common;

const PROG: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
int main(void) {
    size_t len = 16 << 20;
    char *m = mmap(0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(m, 1, len);
    printf("%lx\n", (unsigned long)m);
    fflush(stdout);
    char cmd[64];
    while (fgets(cmd, sizeof cmd, stdin)) {
        long n = atol(cmd + 2);
        if (cmd[0] == 'w') m[n * 4096 + 7] += 1;
        if (cmd[0] == 'd') madvise(m + n * 4096, 4096, MADV_DONTNEED);
        if (cmd[0] == 'm') {
            char *x = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            x[0] = 1;
            printf("%lx ", (unsigned long)x);
        }
        printf("ok\n");
        fflush(stdout);
    }
    return 0;
}
"#;

struct Prog {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    addr: u64,
}

impl Prog {
    fn start() -> Prog {
        let bin = common::build_c("dirty_prog", PROG);
        let mut child = Command::new(&bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        let addr = u64::from_str_radix(l.trim(), 16).unwrap();
        Prog { child, out, addr }
    }
    fn cmd(&mut self, c: &str) -> String {
        let w = self.child.stdin.as_mut().unwrap();
        writeln!(w, "{c}").unwrap();
        w.flush().unwrap();
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        assert!(l.trim_end().ends_with("ok"), "{l}");
        l
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

fn page_list(regions: &[mosix_ckpt::sys::PageRegion], base: u64) -> Vec<u64> {
    let mut v = Vec::new();
    for r in regions {
        let mut a = r.start;
        while a < r.end {
            v.push((a - base) / 4096);
            a += 4096;
        }
    }
    v
}

#[test]
fn written_pages_are_found_exactly() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut p = Prog::start();
    let (pid, base, end) = (p.pid(), p.addr, p.addr + (16 << 20));
    let t = Tracker::attach(pid).unwrap();
    // Nothing of it in the process's descriptors.
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let l = std::fs::read_link(e.unwrap().path()).unwrap();
        assert!(!l.to_string_lossy().contains("userfaultfd"), "{l:?}");
    }
    assert!(t.registered().unwrap().is_empty());
    t.register(base, end).unwrap();
    assert_eq!(t.registered().unwrap(), vec![(base, end)]);
    // The first scan: every page present.
    let all = t.written(base, end).unwrap().unwrap();
    assert_eq!(all.iter().map(pages).sum::<u64>(), 4096);
    assert!(t.written(base, end).unwrap().unwrap().is_empty());
    for n in [3, 100, 4095, 100] {
        p.cmd(&format!("w {n}"));
    }
    assert_eq!(
        page_list(&t.written(base, end).unwrap().unwrap(), base),
        vec![3, 100, 4095]
    );
    assert!(t.written(base, end).unwrap().unwrap().is_empty());
    // A page given back is not present any more, and not "written".
    p.cmd("d 5");
    assert!(t.written(base, end).unwrap().unwrap().is_empty());
    let live: Vec<u64> = t
        .saved(base, end, true)
        .unwrap()
        .iter()
        .flat_map(|&(s, e)| (s..e).step_by(4096).map(|a| (a - base) / 4096))
        .collect();
    assert_eq!(live.len(), 4095);
    assert!(!live.contains(&5));
    // Written again after that: found.
    p.cmd("w 5");
    assert_eq!(
        page_list(&t.written(base, end).unwrap().unwrap(), base),
        vec![5]
    );
    // A new mapping is not registered.
    let l = p.cmd("m");
    let new = u64::from_str_radix(l.split_whitespace().next().unwrap(), 16).unwrap();
    assert!(!t
        .registered()
        .unwrap()
        .iter()
        .any(|&(s, e)| s <= new && new < e));
    // Gone with the tracker: no area of the process is tracked any more.
    drop(t);
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw")),
        "still tracked"
    );
    // It goes on normally.
    p.cmd("w 9");
    drop(p.child.stdin.take());
    assert!(p.child.wait().unwrap().success());
}

/// Memory saved whole lists every page of its own, also those protected by an earlier
/// scan and not written since (which `written` leaves out), and protects them again.
#[test]
fn whole_lists_pages_protected_long_ago() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut p = Prog::start();
    let (base, end) = (p.addr, p.addr + (16 << 20));
    let t = Tracker::attach(p.pid()).unwrap();
    t.register(base, end).unwrap();
    assert_eq!(pages_in(&t.written(base, end).unwrap().unwrap()), 4096);
    // Protected now: nothing written since.
    assert!(t.written(base, end).unwrap().unwrap().is_empty());
    p.cmd("w 9");
    let all = t.whole(base, end, true).unwrap().unwrap();
    assert_eq!(pages_in(&all), 4096);
    // Protected again by it: only what is written after it is written.
    assert!(t.written(base, end).unwrap().unwrap().is_empty());
    p.cmd("w 5");
    assert_eq!(
        page_list(&t.written(base, end).unwrap().unwrap(), base),
        vec![5]
    );
    drop(t);
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

fn pages_in(r: &[mosix_ckpt::sys::PageRegion]) -> u64 {
    r.iter().map(pages).sum()
}

/// A tracker that cannot be made says why (the real errno), and a descriptor that is not a
/// userfaultfd is not taken for one: the mover then moves the process frozen.
#[test]
fn a_tracker_that_cannot_be_made_says_why() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut p = Prog::start();
    let pid = p.pid();
    let lim = |n: u64| {
        let r = libc::rlimit {
            rlim_cur: n,
            rlim_max: 1024,
        };
        // SAFETY: prlimit of a child of ours with a valid rlimit; no old value asked for.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &r, std::ptr::null_mut()) };
        assert_eq!(rc, 0);
    };
    // No descriptor left in it: no userfaultfd can be made there.
    lim(3);
    let e = mosix_ckpt::track_moving(pid, &mosix_ckpt::Leaving::default(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Too many open files"), "{e}");
    assert!(!e.contains("this kernel cannot"), "{e}");
    lim(1024);
    // Away, a descriptor that is not a userfaultfd is refused.
    let (r, _w) = nix::unistd::pipe().unwrap();
    let away = mosix_ckpt::Leaving {
        away: true,
        no_new_privs: None,
        shared: Vec::new(),
    };
    let e = mosix_ckpt::track_moving(pid, &away, Some(r))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a userfaultfd"), "{e}");
    // With room, it is made; the process still answers.
    let t = mosix_ckpt::track_moving(pid, &mosix_ckpt::Leaving::default(), None).unwrap();
    drop(t);
    p.cmd("w 1");
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

const COW_PROG: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(void) {
    int fd = memfd_create("cow", 0);
    if (fd < 0 || ftruncate(fd, 16 * 4096)) return 1;
    char *p = mmap(0, 16 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) return 1;
    volatile char c = p[4096];
    (void)c;
    printf("ready\n");
    fflush(stdout);
    char cmd[16];
    while (fgets(cmd, sizeof cmd, stdin)) {
        p[4096] = 'x';
        printf("ok\n");
        fflush(stdout);
    }
    return 0;
}
"#;

/// Pages a process wrote into a private mapping of a memfd (copies on write) are no
/// memory pre-copy rounds save: a move gets no tracker for it (the mover then moves it
/// frozen), and a checkpoint of it running fails in its final round with the reason,
/// never saved with those pages lost.
#[test]
fn copies_on_write_of_a_private_memfd_mapping_are_not_lost() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join(format!("cow_prog.{}.c", std::process::id()));
    let bin = dir.join(format!("cow_prog.{}", std::process::id()));
    std::fs::write(&src, COW_PROG).unwrap();
    let st = Command::new("cc")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let mut cmd = Command::new(&bin);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    // Only 0, 1, 2 in it: stray descriptors of the test runner would refuse.
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert_eq!(l, "ready\n");
    // A move is not made with pre-copy (the mover moves it frozen).
    let l0 = mosix_ckpt::Leaving::default();
    let e = mosix_ckpt::track_moving(pid, &l0, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("private mapping of its shared memory"), "{e}");
    writeln!(child.stdin.as_mut().unwrap(), "w").unwrap();
    child.stdin.as_mut().unwrap().flush().unwrap();
    l.clear();
    out.read_line(&mut l).unwrap();
    assert_eq!(l, "ok\n");
    let e = mosix_ckpt::checkpoint_live(
        pid,
        Vec::new(),
        &mosix_ckpt::LiveOptions::default(),
        &mut |_| {},
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("private mapping of its shared memory"), "{e}");
    // It goes on.
    writeln!(child.stdin.as_mut().unwrap(), "w").unwrap();
    child.stdin.as_mut().unwrap().flush().unwrap();
    l.clear();
    out.read_line(&mut l).unwrap();
    assert_eq!(l, "ok\n");
    child.kill().unwrap();
    child.wait().unwrap();
}
