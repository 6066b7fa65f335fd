//! Process migration on a real 4-node testbed (root): `mosrun`, `migrate`, `where`,
//! `mosix ps`, the deputy, and migration as a transaction. One test function, because
//! the testbed's names are machine-wide. Every wait is for an event (a line of output, a
//! file, a process exit) or polls a condition with a deadline; no timing thresholds.
//!
//! The jobs run in phases gated by lines on their stdin, so each move happens while the
//! job is alive, and their output (compared with a run that never moved) does not depend
//! on when a move happened.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

/// Debian's python (scripts/setup.sh installs it): the program itself, not a wrapper
/// script that would run it as a child (pyenv's shim is one).
const PY: &str = "/usr/bin/python3";

/// The guest entry for `home_pid` in node `n`'s `ps`, if it runs there.
fn guest_on(tb: &Testbed, n: u32, home_pid: i32) -> Option<Value> {
    tb.ps(n)
        .into_iter()
        .find(|p| p["home_pid"] == home_pid && p["role"] == "guest")
}

/// Checks through /proc that a guest really runs on node `n`: in that node's cgroup, in a
/// PID namespace where its PID is the home PID.
fn check_really_there(n: u32, g: &Value, home_pid: i32) {
    let pid = g["pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse::<i32>().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(nspid.last(), Some(&home_pid), "NSpid {nspid:?}");
    // An ordinary process for the OOM killer (its supervisor is its first choice).
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(adj.trim(), "0", "oom_score_adj of guest {pid}");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cg.contains(&format!("{}{n}", common::tb_prefix())),
        "cgroup of guest: {cg}"
    );
}

/// Runs a phased job, moving it 1 → 2 → 3 → home between phases, and compares it with a
/// run that never moved.
fn round_trip(tb: &Testbed, argv: &[&str]) {
    let input: String = (0..4).map(|i| format!("go {i}\n")).collect();
    let (want, want_code) = reference(argv, &input);
    let mut j = Job::start(tb, argv);
    assert_eq!(tb.where_(j.home_pid), "0");
    for (i, to) in ["2", "3", "home"].iter().enumerate() {
        let o = tb.migrate(j.home_pid, to);
        assert!(
            o.status.success(),
            "migrate {} {to}: {}",
            j.home_pid,
            String::from_utf8_lossy(&o.stderr)
        );
        let expect_where = if *to == "home" { "0" } else { to };
        assert_eq!(tb.where_(j.home_pid), expect_where, "where after move {i}");
        if *to != "home" {
            let n: u32 = to.parse().unwrap();
            let g = guest_on(tb, n, j.home_pid)
                .unwrap_or_else(|| panic!("node {n}'s ps does not list {}", j.home_pid));
            check_really_there(n, &g, j.home_pid);
            assert!(guest_on(tb, 1, j.home_pid).is_none());
        } else {
            let here = tb.ps(1);
            let me = here.iter().find(|p| p["home_pid"] == j.home_pid).unwrap();
            assert_eq!(me["where_"], 0);
            assert_eq!(me["state"], "running");
        }
        j.send(&format!("go {i}\n"));
        let l = j.line();
        assert!(l.starts_with(&format!("phase {i}")), "got {l:?}");
    }
    j.send("go 3\n");
    let (got, st) = j.finish();
    assert_eq!(normalise(&got), normalise(&want), "{argv:?}");
    assert_eq!(st.code(), want_code, "{argv:?}");
    assert!(
        got.iter()
            .filter(|l| l.contains("samepid="))
            .all(|l| l.contains("samepid=1")),
        "getpid changed: {got:?}"
    );
    assert!(
        got.iter()
            .filter(|l| l.contains("sametids="))
            .all(|l| l.contains("sametids=1")),
        "a thread ID changed: {got:?}"
    );
}

/// The mover of a move on node `n` (`mosixd move`, in that node's cgroup), if one runs.
fn mover_on(n: u32) -> Option<i32> {
    let cg = format!("/{}{n}", common::tb_prefix());
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let g = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        (cmd == b"mosixd\0move\0" && g.lines().any(|l| l.ends_with(&cg))).then_some(pid)
    })
}

/// Whether a copy of `home_pid` is being restored on node `n` (a process in a nested PID
/// namespace there whose innermost PID is the home PID): the first round reached it.
fn restoring_on(n: u32, home_pid: i32) -> bool {
    let cg = format!("/{}{n}", common::tb_prefix());
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            return false;
        };
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let ns: Vec<i32> = st
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let g = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        ns.len() > 1 && ns.last() == Some(&home_pid) && g.lines().any(|l| l.ends_with(&cg))
    })
}

/// Moves guest `home_pid` from node `from` to node `to` and kills the mover (SIGKILL) once
/// its first round reaches `to`, while the process still runs: the move fails and it
/// goes on at `from`. Tried again (after moving it back) if the move finished first.
fn kill_mover_during_rounds(tb: &Testbed, home_pid: i32, from: u32, to: u32) {
    for _ in 0..5 {
        let mut c = tb
            .cmd(1, &["migrate", &home_pid.to_string(), &to.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut killed = false;
        while std::time::Instant::now() < deadline {
            if c.try_wait().unwrap().is_some() {
                break;
            }
            if restoring_on(to, home_pid) {
                if let Some(m) = mover_on(from) {
                    killed = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(m),
                        nix::sys::signal::Signal::SIGKILL,
                    )
                    .is_ok();
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let st = c.wait().unwrap();
        if killed && !st.success() {
            assert_eq!(
                tb.where_(home_pid),
                from.to_string(),
                "after the killed mover"
            );
            return;
        }
        // Too late: it moved. Back, and again.
        assert!(st.success(), "migrate to {to} failed without the kill");
        let o = tb.migrate(home_pid, &from.to_string());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    panic!("never caught the mover of {home_pid} during its rounds");
}

#[test]
fn migration_on_four_nodes() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (network namespaces, cgroups, ptrace): run it as root");
    }
    let heap = compile("migheap");
    let threaded = compile("migthreads");
    let py = progs_src().join("phased.py");
    let tb = Testbed::up(&[]);
    // Only the moves this test asks for: automatic balancing off everywhere (mosctl stay).
    for n in 1..=4 {
        let o = tb.exec(n, &["mosctl", "stay"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("stay on"));
    }

    // 1. The FAQ's awk, a python3 job and a 256 MiB C job, each 1 → 2 → 3 → home.
    let awk = "BEGIN { print \"start\"; fflush() } \
               { s = 0; for (i = 0; i < 300000; i++) s += (i * NR) % 7; \
                 printf \"phase %d sum %d got %s\\n\", NR - 1, s, $0; fflush() } \
               END { print \"end\"; exit 4 }";
    round_trip(&tb, &["mawk", "-W", "interactive", awk]);
    round_trip(&tb, &[PY, py.to_str().unwrap()]);
    round_trip(&tb, &[heap.to_str().unwrap(), "256"]);
    // A pthreads job (4 workers under a mutex, one asleep in a condition variable): its
    // threads move with it and keep their IDs.
    round_trip(&tb, &[threaded.to_str().unwrap()]);

    // 1b. A job that keeps writing its memory while it moves (10 MiB/s: pre-copy rounds
    //     see its writes) and reads all of it back after every pass, moved 1 → 2 → 3 →
    //     home mid-run, while its main stack grows and its heap shrinks and grows again
    //     (mode "sh": memory that changes shape during the rounds must still move whole).
    //     Between the moves to 2 and to 3, a move to 3 whose mover is killed during its
    //     rounds (the areas stay registered and protected in the supervisor's
    //     userfaultfd: the next move must not take them for unwritten). Its passes after
    //     each move check the memory that moved; the checksums of its passes are those of
    //     a run that never moved.
    let mw = compile("memwriter");
    let mut j = Job::start(&tb, &[mw.to_str().unwrap(), "64", "0", "10", "256", "sh"]);
    assert!(j.line().starts_with("pass 0"));
    for to in ["2", "kill", "3", "home"] {
        if to == "kill" {
            kill_mover_during_rounds(&tb, j.home_pid, 2, 3);
            continue;
        }
        let o = tb.exec(1, &["migrate", &j.home_pid.to_string(), to, "--json"]);
        assert!(
            o.status.success(),
            "migrate memwriter {to}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let m: Value = serde_json::from_slice(&o.stdout).unwrap();
        // Its memory moved while it ran: the first round, then at least the final one.
        assert!(m["rounds"].as_array().unwrap().len() >= 2, "{m}");
        // A pass or two at its new place, memory checked.
        for _ in 0..2 {
            let l = j.line();
            assert!(l.starts_with("pass "), "after the move to {to}: {l:?}");
        }
    }
    j.send("q\n");
    let (got, st) = j.finish();
    assert_eq!(st.code(), Some(0), "memwriter: {got:?}");
    let done: usize = got
        .last()
        .and_then(|l| l.strip_prefix("done "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("memwriter did not finish: {got:?}"));
    let passes = done.to_string();
    let (want, _) = reference(&[mw.to_str().unwrap(), "64", &passes, "0", "256", "sh"], "");
    let got_passes: Vec<&String> = got.iter().filter(|l| l.starts_with("pass ")).collect();
    let want_passes: Vec<&String> = want.iter().filter(|l| l.starts_with("pass ")).collect();
    assert_eq!(got_passes, want_passes);

    // 2. Input piped into mosrun reaches a process that runs elsewhere from the start.
    let o = Command::new(mosix())
        .args(["testbed", "exec", "1", "--dir"])
        .arg(tb.dir.path())
        .args(["--", "sh", "-c"])
        .arg(format!(
            "seq 1 200000 | {} run -r 2 mawk '{{s += $1}} END {{printf \"%.0f %d\\n\", s, NR; \
             while ((getline l < \"/proc/self/cgroup\") > 0) if (l ~ /mosixtb/) {{ print l; exit }} }}'",
            mosix().display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("20000100000 200000"));
    // It ran on node 2 from the start (`-r 2`): in node 2's cgroup.
    assert!(
        lines
            .next()
            .is_some_and(|l| l.ends_with(&format!("/{}2", common::tb_prefix()))),
        "not on node 2: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // 2b. `-r` moves it before its first instruction: even a program that lasts a few
    //     milliseconds (cat) runs all its life on node 3 (it used to run whole at home
    //     while the move was being set up).
    let o = tb.exec(1, &["run", "-r", "3", "cat", "/proc/self/cgroup"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.lines()
            .any(|l| l.ends_with(&format!("/{}3", common::tb_prefix()))),
        "cat did not run on node 3: {out}"
    );

    // 3. `mosrun ... | head -1`: the reader goes away, the remote writer gets SIGPIPE.
    let o = Command::new(mosix())
        .args(["testbed", "exec", "1", "--dir"])
        .arg(tb.dir.path())
        .args(["--", "sh", "-c"])
        .arg(format!(
            "{} run -r 3 yes moved | head -1",
            mosix().display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "moved\n");
    tb.wait_until("the yes on node 3 has ended", || tb.ps(3).is_empty());

    // 4. SIGTERM and Ctrl-C (SIGINT) to mosrun end the process where it runs, and mosrun
    //    dies by the same signal.
    for (sig, n) in [
        (nix::sys::signal::Signal::SIGTERM, 2u32),
        (nix::sys::signal::Signal::SIGINT, 4),
    ] {
        let mut j = Job::start(&tb, &[PY, py.to_str().unwrap()]);
        let o = tb.migrate(j.home_pid, &n.to_string());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let g = guest_on(&tb, n, j.home_pid).expect("guest listed");
        let guest_pid = g["pid"].as_i64().unwrap() as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(j.child.id() as i32), sig).unwrap();
        let st = j.wait();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(sig as i32), "mosrun status {st:?}");
        tb.wait_until("the guest has ended", || {
            !Path::new(&format!("/proc/{guest_pid}")).exists()
                && guest_on(&tb, n, j.home_pid).is_none()
        });
        j.stdin = None;
    }

    // 4b. Ctrl-Z (SIGTSTP) to mosrun stops the remote process and mosrun; SIGCONT to
    //     mosrun lets both go on.
    {
        let mut j = Job::start(&tb, &[PY, py.to_str().unwrap()]);
        let o = tb.migrate(j.home_pid, "3");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let g = guest_on(&tb, 3, j.home_pid).expect("guest listed");
        let guest_pid = g["pid"].as_i64().unwrap();
        let mosrun = nix::unistd::Pid::from_raw(j.child.id() as i32);
        let state = |pid: i64| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            s.rsplit_once(") ")
                .and_then(|(_, r)| r.chars().next())
                .unwrap_or('?')
        };
        nix::sys::signal::kill(mosrun, nix::sys::signal::Signal::SIGTSTP).unwrap();
        tb.wait_until("the remote process is stopped", || state(guest_pid) == 'T');
        tb.wait_until("mosrun is stopped", || state(mosrun.as_raw() as i64) == 'T');
        nix::sys::signal::kill(mosrun, nix::sys::signal::Signal::SIGCONT).unwrap();
        tb.wait_until("the remote process goes on", || state(guest_pid) != 'T');
        j.send("go 0\n");
        assert!(j.line().starts_with("phase 0"));
        let (_, st) = j.finish();
        assert_eq!(st.code(), Some(3));
    }

    // 5. Files stay at home and keep working: a private file (no shared path) moves with
    //    the process, used through its deputy; so does a process with a thread, and one
    //    with memory it shares with its child (the memory stays home: its next touch
    //    brings it back). What cannot move (a thread waiting on that shared memory) is
    //    refused, the reason in one line, and the process goes on at home.
    let private = tb.dir.path().join("private.txt");
    std::fs::write(&private, "x").unwrap();
    let holder = "import sys, os, threading, time, mmap, signal, multiprocessing as mp\n\
         f = open(sys.argv[1])\n\
         mode = sys.argv[2]\n\
         if mode == 'thread':\n    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n\
         kid = 0\n\
         if mode in ('sharedchild', 'waitshared'):\n    m = mmap.mmap(-1, 4096)\n    lock = mp.Lock()\n    lock.acquire()\n    kid = os.fork()\n    if kid == 0:\n        time.sleep(600)\n        os._exit(0)\n\
         if mode == 'waitshared':\n    threading.Thread(target=lock.acquire, daemon=True).start()\n    while not any(open(f'/proc/self/task/{t}/syscall').read().startswith('202 ') for t in os.listdir('/proc/self/task')):\n        time.sleep(0.01)\n\
         print('start', flush=True)\n\
         for line in sys.stdin:\n    if mode == 'sharedchild':\n        m[0] = (m[0] + 1) % 256\n    f.seek(0)\n    print('got', line.strip(), f.read(), flush=True)\n\
         if kid:\n    os.kill(kid, signal.SIGKILL)\n";
    let script = tb.shared().join("holder.py");
    std::fs::write(&script, holder).unwrap();
    let p = private.to_str().unwrap();
    for mode in ["plain", "thread", "sharedchild"] {
        let mut j = Job::start(&tb, &[PY, script.to_str().unwrap(), p, mode]);
        let o = tb.migrate(j.home_pid, "2");
        assert!(
            o.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        j.send("moved\n");
        assert_eq!(j.line(), "got moved x");
        if mode == "sharedchild" {
            tb.wait_until("touching its shared memory brought it home", || {
                tb.where_(j.home_pid) == "0"
            });
        }
        let (_, st) = j.finish();
        assert_eq!(st.code(), Some(0));
    }
    {
        let (mode, want) = ("waitshared", "shares with other processes");
        let mut j = Job::start(&tb, &[PY, script.to_str().unwrap(), p, mode]);
        let o = tb.migrate(j.home_pid, "2");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "a move that must be refused succeeded");
        assert!(err.contains(want), "refusal does not say {want}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        assert_eq!(tb.where_(j.home_pid), "0");
        j.send("still\n");
        assert!(j.line().starts_with("got still"));
        let (_, st) = j.finish();
        assert_eq!(st.code(), Some(0));
    }

    // 6. The destination's mosixd dies in the middle of a migration: the process goes on
    //    at the source, and the command says why.
    tb.ok(&["stop", "3"]);
    let o = tb.testbed(&["start", "3"], &[("MOSIXD_TEST_STALL_RECEIVE", "1")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stalled = tb.dir.path().join("n3/stalled");
    let _ = std::fs::remove_file(&stalled);
    tb.wait_node_status(3, 3);
    let input: String = (0..2).map(|i| format!("go {i}\n")).collect();
    let (want, want_code) = reference(&[heap.to_str().unwrap(), "64"], &input);
    let mut j = Job::start(&tb, &[heap.to_str().unwrap(), "64"]);
    let mig = tb
        .cmd(1, &["migrate", &j.home_pid.to_string(), "3"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tb.wait_until("node 3 has the image and stalls", || stalled.exists());
    tb.ok(&["stop", "3", "--kill"]);
    let o = mig.wait_with_output().unwrap();
    assert!(!o.status.success(), "migrate to a dead node succeeded");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("node 3"), "{err}");
    assert_eq!(tb.where_(j.home_pid), "0");
    j.send("go 0\n");
    j.send("go 1\n");
    let (got, st) = j.finish();
    assert_eq!(normalise(&got), normalise(&want));
    assert_eq!(st.code(), want_code);
    tb.ok(&["start", "3"]);

    // 6b. The source's mosixd dies between announcing the commit to its mover and telling
    //     the destination (a test switch makes it exit right there): the destination
    //     holds its copy, the mover asks through the restarted daemon that it run, and the
    //     process goes on at the destination, once, with all its output (it was lost).
    tb.ok(&["stop", "1"]);
    let o = tb.testbed(&["start", "1"], &[("MOSIXD_TEST_DIE_AT_COMMIT", "1")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    tb.wait_node_status(2, 3);
    let input: String = (0..2).map(|i| format!("go {i}\n")).collect();
    let (want, want_code) = reference(&[heap.to_str().unwrap(), "64"], &input);
    let mut j = Job::start(&tb, &[heap.to_str().unwrap(), "64"]);
    let o = tb.migrate(j.home_pid, "2");
    assert!(
        !o.status.success(),
        "the source's mosixd did not die at the commit"
    );
    tb.ok(&["start", "1"]);
    tb.wait_until("it runs on node 2", || {
        let o = tb.exec(1, &["where", &j.home_pid.to_string()]);
        String::from_utf8_lossy(&o.stdout).trim() == "2"
    });
    let g = guest_on(&tb, 2, j.home_pid).expect("node 2 lists it");
    check_really_there(2, &g, j.home_pid);
    j.send("go 0\n");
    j.send("go 1\n");
    let (got, st) = j.finish();
    assert_eq!(normalise(&got), normalise(&want));
    assert_eq!(st.code(), want_code);

    // 7. mosixd is not the process: the daemon of the node a job runs on is killed and
    //    started again, then the daemon of its home; the job goes on (its calls wait
    //    meanwhile) and ends exactly as an unmoved run.
    let input: String = (0..4).map(|i| format!("go {i}\n")).collect();
    let argv = [PY, py.to_str().unwrap()];
    let (want, want_code) = reference(&argv, &input);
    let mut j = Job::start(&tb, &argv);
    let o = tb.migrate(j.home_pid, "4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    j.send("go 0\n");
    assert!(j.line().starts_with("phase 0"));
    for node in ["4", "1"] {
        tb.ok(&["stop", node, "--kill"]);
        j.send(&format!("go {}\n", if node == "4" { 1 } else { 2 }));
        tb.ok(&["start", node]);
        let l = j.line();
        assert!(
            l.starts_with("phase"),
            "after node {node}'s mosixd came back: {l:?}"
        );
    }
    assert_eq!(tb.where_(j.home_pid), "4");
    j.send("go 3\n");
    let (got, st) = j.finish();
    assert_eq!(normalise(&got), normalise(&want));
    assert_eq!(st.code(), want_code);

    // 7b. The node where a process runs dies (everything on it): its deputy reports it
    //     lost (137, a line on its stderr).
    let mut j = Job::start(&tb, &[PY, py.to_str().unwrap()]);
    let o = tb.migrate(j.home_pid, "4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g = guest_on(&tb, 4, j.home_pid).unwrap();
    let guest_pid = g["pid"].as_i64().unwrap();
    tb.ok(&["crash", "4"]);
    let st = j.wait();
    assert_eq!(st.code(), Some(137), "a lost process: {st:?}");
    assert!(!Path::new(&format!("/proc/{guest_pid}")).exists());
    j.stdin = None;
    tb.ok(&["start", "4"]);

    // 8. Bad requests: unknown node, down node, not a migratable process, not yours.
    let mut j = Job::start(&tb, &[PY, py.to_str().unwrap()]);
    let pid = j.home_pid.to_string();
    for (to, want) in [("9", "not in the cluster map"), ("1", "already")] {
        let o = tb.migrate(j.home_pid, to);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "migrate {pid} {to}: {e}");
    }
    tb.ok(&["stop", "2"]);
    tb.wait_node_status(2, 1);
    let o = tb.migrate(j.home_pid, "2");
    assert!(String::from_utf8_lossy(&o.stderr).contains("node 2 is down"));
    let o = tb.exec(1, &["migrate", "1", "3"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no migratable process with PID 1"));
    let o = Command::new(AS_NOBODY[0])
        .args(&AS_NOBODY[1..])
        .arg(mosix())
        .args(["migrate", &pid, "3", "--socket"])
        .arg(tb.dir.path().join("n1/mosixd.sock"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("only move your own"),
        "{e}"
    );
    j.send("go 0\n");
    assert!(j.line().starts_with("phase 0"));
    let (_, st) = j.finish();
    assert_eq!(st.code(), Some(3));
}
