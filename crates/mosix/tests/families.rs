//! Families (issue 11), on a 4-node testbed (root; one test function, because the
//! testbed's names are machine-wide): the children of a migratable process are migratable
//! processes of the same home, each moved on its own, while the family behaves as if all
//! ran at home: wait and exit statuses, signals, pipes, socketpairs, the terminal, memory
//! they share (which stays home). Each case is compared with an unmoved run of the same
//! command, and ends with nothing of the family left on any node. Real programs: bash,
//! mawk, sort, make and gcc, python3's multiprocessing, a small C program.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The FAQ's CPU-bound awk job, checking its own arithmetic, until `stop` exists.
const AWK: &str = "BEGIN { stop = ARGV[1]; ARGV[1] = \"\"; print \"start\"; fflush(); \
    bad = 0; n = 0; \
    while (1) { s = 0; for (j = 0; j < 200000; j++) s += j % 7; \
      if (n == 0) ref = s; else if (s != ref) bad++; n++; \
      if ((getline line < stop) > 0) break; close(stop) } \
    print \"done bad=\" bad; fflush(); exit 0 }";

/// A CPU-bound awk program: `mawk BUSY GO CODE` computes until file GO has a line, then
/// exits with CODE (with CODE < 0 it never looks: it runs until killed).
const BUSY: &str = "BEGIN { go = ARGV[1]; code = ARGV[2] + 0; ARGV[1] = \"\"; ARGV[2] = \"\"; \
    while (1) { for (j = 0; j < 100000; j++) s += j % 7; \
      if (code >= 0 && (getline l < go) > 0) exit code; close(go) } }";

/// `mosix testbed exec N -- ARGV` (a command on node N, not migratable).
fn on_node(tb: &Testbed, n: u32, argv: &[&str]) -> Command {
    let mut c = Command::new(mosix());
    c.args(["testbed", "exec", &n.to_string(), "--dir"])
        .arg(tb.dir.path())
        .arg("--")
        .args(argv);
    c
}

/// `mosrun ARGV` on node 1, in a process group of its own as a shell's job: the child is
/// the job itself (its PID is the home PID).
fn job(tb: &Testbed, argv: &[&str]) -> Command {
    let mut c = on_node(tb, 1, &[mosix().to_str().unwrap(), "run"]);
    c.args(argv).process_group(0);
    c
}

/// The same command unmoved (on node 1, not under mosrun): its stdout, with `input`.
fn unmoved(tb: &Testbed, argv: &[&str], input: &str) -> (String, std::process::ExitStatus) {
    let mut c = on_node(tb, 1, argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    (out, c.wait().unwrap())
}

/// The members of `parent`'s family that node 1 lists (its children), oldest first: by
/// start time, not by PID (PIDs wrap around at 32768 here, and a long CI run gets there).
fn children(tb: &Testbed, parent: i32) -> Vec<Value> {
    let mut v: Vec<Value> = tb
        .ps(1)
        .into_iter()
        .filter(|p| p["ppid"] == parent)
        .collect();
    v.sort_by_key(|p| {
        let pid = p["home_pid"].as_i64().unwrap_or(0) as i32;
        (started(pid), pid)
    });
    v
}

/// When process `pid` started (clock ticks after boot; 0 if it is gone).
fn started(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| st.rsplit(") ").next()?.split(' ').nth(19)?.parse().ok())
        .unwrap_or(0)
}

/// Waits until `parent` has `n` children listed as migratable processes; their PIDs.
fn adopted(tb: &Testbed, parent: i32, n: usize) -> Vec<i32> {
    let kids = std::cell::RefCell::new(Vec::new());
    tb.wait_until(&format!("{n} children of {parent} are adopted"), || {
        *kids.borrow_mut() = children(tb, parent);
        kids.borrow().len() == n
    });
    let kids = kids.into_inner();
    kids.iter()
        .map(|k| k["home_pid"].as_i64().unwrap() as i32)
        .collect()
}

/// `mosix ps --json` of node `n` of the testbed in `dir` as a list, empty if it cannot
/// be read (a poller's view).
fn ps_at(dir: &Path, n: u32) -> Vec<Value> {
    let o = Command::new(mosix())
        .args(["testbed", "exec", &n.to_string(), "--dir"])
        .arg(dir)
        .arg("--")
        .arg(mosix())
        .args(["ps", "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&o.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Processes in node `n`'s cgroup that are not its daemon: (PID, command line).
fn node_procs(n: u32) -> Vec<(i32, String)> {
    let want = format!("/{}{n}", tb_prefix());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let mine = cg.lines().any(|l| {
            l.find(&want).is_some_and(|i| {
                !l[i + want.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
            })
        });
        if !mine {
            continue;
        }
        let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let daemon = argv.first().is_some_and(|a| a.ends_with("mosixd"))
            && argv.get(1).map(String::as_str) == Some("--config");
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true);
        if !daemon && !zombie && !argv.concat().is_empty() {
            out.push((pid, argv.join(" ")));
        }
    }
    out
}

/// No member of any family is left on any node: no node lists a migratable process, and
/// no process but the daemons runs in any node's cgroup (no guest, supervisor, mover or
/// deputy).
fn nothing_left(tb: &Testbed, after: &str) {
    let end = std::time::Instant::now() + DEADLINE;
    loop {
        let listed: Vec<String> = (1..=4)
            .flat_map(|n| {
                ps_at(tb.dir.path(), n)
                    .into_iter()
                    .map(move |p| format!("node {n} lists {} {}", p["home_pid"], p["cmd"]))
            })
            .collect();
        let running: Vec<String> = (1..=4)
            .flat_map(|n| {
                node_procs(n)
                    .into_iter()
                    .map(move |(p, c)| format!("node {n} runs {p} {c}"))
            })
            .collect();
        if listed.is_empty() && running.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "after {after}, members are left: {listed:?} {running:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` awk children of one bash, started as one command: `mosrun [-L] bash -c '...'`.
fn family(tb: &Testbed, n: usize, stop: &Path, pin: bool) -> Job {
    let script = format!(
        "for i in $(seq {n}); do mawk '{AWK}' {} & done; wait; echo all done",
        stop.display()
    );
    let mut argv = vec![];
    if pin {
        argv.push("-L");
    }
    argv.extend(["bash", "-c", script.as_str()]);
    Job::start(tb, &argv)
}

/// The awk members of the family of `bash` as node `n` lists them: home processes whose
/// parent is bash (node 1), or guests (elsewhere).
fn members_on(tb: &Testbed, n: u32, bash: i32) -> Vec<Value> {
    tb.ps(n)
        .into_iter()
        .filter(|p| p["cmd"].as_str().is_some_and(|c| c.contains("mawk")))
        .filter(|p| n != 1 || p["ppid"] == bash)
        .filter(|p| p["state"] == "running")
        .collect()
}

/// The parent of `pid` as /proc says (for a member away: its deputy's parent at home).
fn ppid(pid: i32) -> i32 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    st.rsplit(") ")
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// The FAQ experiment started as ONE command on node 1 of four equal nodes: the eight
/// awk children spread to two per node by themselves, bash stays home and reaps them,
/// and every one prints its result.
fn faq_family(tb: &Testbed) {
    let stop = tb.shared().join("stop-family");
    let mut j = family(tb, 8, &stop, false);
    let bash = j.home_pid;
    // The members away in the one listing that showed two on every node (the balancer
    // goes on working: a later listing may catch one in the middle of another move).
    // The members away are really there: in the host's PID namespace with their own
    // home PIDs, and their home says so (`where`, asked right after: should the balancer
    // have moved one home in between, the listing is taken again).
    let away = std::cell::RefCell::new(Vec::new());
    tb.wait_until("two members of the family run on every node", || {
        let on: Vec<Vec<Value>> = (1..=4).map(|n| members_on(tb, n, bash)).collect();
        let pids: Vec<i64> = on[1..]
            .iter()
            .flatten()
            .map(|g| g["home_pid"].as_i64().unwrap())
            .collect();
        let even =
            on.iter().all(|m| m.len() == 2) && pids.iter().all(|&p| tb.where_(p as i32) != "0");
        if even {
            *away.borrow_mut() = pids;
        }
        even
    });
    let away = away.into_inner();
    assert_eq!(tb.where_(bash), "0", "bash stays home");
    // Children of bash at home.
    assert_eq!(away.len(), 6);
    for pid in &away {
        assert_eq!(
            ppid(*pid as i32),
            bash,
            "member {pid}'s deputy is bash's child"
        );
    }
    std::fs::write(&stop, "stop\n").unwrap();
    let mut done = 0;
    while done < 8 {
        let l = j.line();
        if l.starts_with("done") {
            assert_eq!(l, "done bad=0");
            done += 1;
        }
    }
    let (out, st) = j.finish();
    assert_eq!(out.last().map(String::as_str), Some("all done"), "{out:?}");
    assert_eq!(st.code(), Some(0));
    nothing_left(tb, "the FAQ family");
}

/// `mosrun -L` pins the whole family: its children are migratable processes, pinned.
fn pinned_family(tb: &Testbed) {
    let stop = tb.shared().join("stop-pinned");
    let j = family(tb, 3, &stop, true);
    let bash = j.home_pid;
    tb.wait_until("the pinned family's children are listed", || {
        members_on(tb, 1, bash).len() == 3
    });
    tb.wait_until("the balancer says why they stay", || {
        members_on(tb, 1, bash)
            .iter()
            .all(|p| p["reason"].as_str().unwrap_or("").contains("pinned"))
    });
    std::fs::write(&stop, "stop\n").unwrap();
    let (out, st) = j.finish();
    assert_eq!(
        out.iter().filter(|l| *l == "done bad=0").count(),
        3,
        "{out:?}"
    );
    assert_eq!(st.code(), Some(0));
    nothing_left(tb, "the pinned family");
}

/// A parent with children moves by hand, and its children stay where they are; away, it
/// waits for them and gets their exit codes; its next fork brings it home. A child that
/// execs (a shell loop that becomes awk) stays migratable across the exec.
fn parent_moves_children_stay(tb: &Testbed) {
    let go = tb.shared().join("go-parent");
    let go2 = tb.shared().join("go-parent2");
    let script = format!(
        "mawk '{BUSY}' $1 5 & a=$!; mawk '{BUSY}' $1 6 & b=$!
        sh -c 'while [ ! -s $2 ]; do :; done; exec mawk \"$3\" $1 7' x $1 $2 '{BUSY}' & c=$!
        echo start $a $b $c
        read l; echo go > $1
        wait $a; echo a $?; wait $b; echo b $?; wait $c; echo c $?
        mawk 'BEGIN {{ print \"forked after\" }}'
        echo end"
    );
    let go_s = go.to_str().unwrap();
    let go2_s = go2.to_str().unwrap();
    let argv = ["bash", "-c", script.as_str(), "x", go_s, go2_s];

    let (want, st) = {
        std::fs::write(&go2, "go\n").unwrap();
        let r = unmoved(tb, &argv, "go\n");
        std::fs::remove_file(&go).unwrap();
        std::fs::remove_file(&go2).unwrap();
        r
    };
    assert!(st.success());
    let want: Vec<&str> = want.lines().skip(1).collect();

    let mut pinned = vec!["-L"];
    pinned.extend(argv);
    let mut c = job(tb, &pinned)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let bash = c.id() as i32;
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert!(l.starts_with("start"), "{l:?}");
    let kids = adopted(tb, bash, 3);
    let (a, b, sh) = (kids[0], kids[1], kids[2]);
    // The parent, with three children, moves by hand; they stay where they are.
    tb.move_ok(bash, "2");
    tb.move_ok(b, "3");
    tb.move_ok(sh, "4");
    assert_eq!(tb.where_(a), "0");
    assert_eq!(tb.where_(bash), "2");
    // The shell away execs: it comes home to do it, and the program it became is the
    // same migratable process, moved again.
    std::fs::write(&go2, "go\n").unwrap();
    tb.wait_until("the shell became awk", || {
        tb.ps(1)
            .iter()
            .any(|p| p["home_pid"] == sh && p["cmd"].as_str().unwrap_or("").starts_with("mawk"))
    });
    tb.move_ok(sh, "4");
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let got: Vec<&str> = rest.lines().collect();
    assert_eq!(got, want, "a parent away reaps its children as at home");
    assert!(c.wait().unwrap().success());
    nothing_left(tb, "the moved parent's family");
}

/// An orphan (its shell exits once it is adopted) is reparented at home as it would be,
/// stays a migratable process listed on its home node, moves, and ends with nothing
/// left. (A child whose parent exits before mosixd's next look for children, 25 to 200
/// ms, is not adopted: it runs at home, as without mosix.)
fn orphans(tb: &Testbed) {
    let go = tb.shared().join("go-orphan");
    let script = format!(
        "mawk '{BUSY}' {} 9 > /dev/null & echo $!; read x; exit 0",
        go.display()
    );
    let mut c = job(tb, &["-L", "bash", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let bash = c.id() as i32;
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let orphan: i32 = l.trim().parse().unwrap();
    adopted(tb, bash, 1);
    drop(c.stdin.take());
    assert!(c.wait().unwrap().success());
    tb.wait_until("the orphan is listed, reparented", || {
        tb.ps(1).iter().any(|p| {
            p["home_pid"] == orphan
                && p["ppid"]
                    .as_i64()
                    .is_some_and(|pp| pp != i64::from(bash) && pp == i64::from(ppid(orphan)))
        })
    });
    tb.move_ok(orphan, "2");
    std::fs::write(&go, "go\n").unwrap();
    nothing_left(tb, "an orphan");
}

/// Children that end in different ways while away, reaped by a shell at home: exit codes,
/// kill by the parent (TERM, KILL, USR1) and death by its own signal (SEGV) reach wait
/// unchanged.
const SIGNALS: &str = r#"go=$1
busy=$2
mawk "$busy" "$go" 0 & c0=$!
mawk "$busy" "$go" 3 & c3=$!
mawk "$busy" "$go" 42 & c42=$!
mawk "$busy" "$go" -1 & term=$!
mawk "$busy" "$go" -1 & kill9=$!
mawk "$busy" "$go" -1 & usr1=$!
/usr/bin/python3 -c 'import os, signal, sys
while not os.path.exists(sys.argv[1]): sum(range(100000))
os.kill(os.getpid(), signal.SIGSEGV)' "$go" & segv=$!
echo "start $c0 $c3 $c42 $term $kill9 $usr1 $segv"
read line
kill -TERM $term; kill -KILL $kill9; kill -USR1 $usr1
echo go > "$go"
for v in c0 c3 c42 term kill9 usr1 segv; do wait ${!v}; echo "$v $?"; done
echo end
"#;

fn exit_statuses_and_signals(tb: &Testbed) {
    let go = tb.shared().join("go-signals");
    let go_s = go.to_str().unwrap();
    let argv = ["bash", "-c", SIGNALS, "x", go_s, BUSY];
    let (want, st) = unmoved(tb, &argv, "go\n");
    std::fs::remove_file(&go).unwrap();
    assert!(st.success());
    let want: Vec<&str> = want.lines().skip(1).collect();
    assert_eq!(want.len(), 8, "{want:?}");

    let mut pinned = vec!["-L"];
    pinned.extend(argv);
    let mut c = job(tb, &pinned)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let bash = c.id() as i32;
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let kids = adopted(tb, bash, 7);
    for (i, k) in kids.iter().enumerate() {
        tb.move_ok(*k, ["2", "3", "4"][i % 3]);
    }
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let got: Vec<&str> = rest.lines().collect();
    assert_eq!(got, want, "statuses of children away, as wait sees them");
    assert!(c.wait().unwrap().success());
    nothing_left(tb, "children killed away");
}

/// gen.awk GO N: N numbered lines, then (once file GO has a line) N more, then it exits.
const GEN: &str = r#"BEGIN { go = ARGV[1]; n = ARGV[2]; ARGV[1] = ""; ARGV[2] = ""
  for (i = 0; i < n; i++) printf "%d %08x\n", i, (i * 2654435761) % 4294967296
  fflush()
  while ((getline l < go) <= 0) close(go)
  for (i = n; i < 2 * n; i++) printf "%d %08x\n", i, (i * 2654435761) % 4294967296
  exit 0 }"#;

/// A three-stage pipeline whose members are moved to three different nodes in the middle
/// of the stream gives the same bytes as an unmoved run; when the last stage leaves early
/// the others die of SIGPIPE as at home.
fn pipeline_on_three_nodes(tb: &Testbed) {
    let gen = tb.shared().join("gen.awk");
    std::fs::write(&gen, GEN).unwrap();
    let go = tb.shared().join("go-pipe");
    let err = tb.shared().join("pipe.err");
    let run = |script: &str, out: &Path| -> String {
        // What the stages print on stderr is compared too (a stage must not see EPIPE
        // and complain where at home SIGPIPE ends it first).
        let full = format!(
            "exec 2> {}; mawk -f {} {} 20000 | {script} > {}; echo ${{PIPESTATUS[@]}}",
            err.display(),
            gen.display(),
            go.display(),
            out.display()
        );
        // Unmoved first (GO already there), then moved.
        std::fs::write(&go, "go\n").unwrap();
        let (want, st) = unmoved(tb, &["bash", "-c", &full], "");
        assert!(st.success());
        let want_bytes = std::fs::read(out).unwrap();
        let want_err = std::fs::read_to_string(&err).unwrap();
        std::fs::remove_file(&go).unwrap();

        let mut c = job(tb, &["-L", "bash", "-c", &full])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let bash = c.id() as i32;
        let kids = adopted(tb, bash, 3);
        for (k, to) in kids.iter().zip(["2", "3", "4"]) {
            tb.move_ok(*k, to);
        }
        std::fs::write(&go, "go\n").unwrap();
        let mut got = String::new();
        c.stdout.take().unwrap().read_to_string(&mut got).unwrap();
        assert!(c.wait().unwrap().success());
        assert_eq!(got, want, "exit statuses of the stages");
        assert!(
            std::fs::read(out).unwrap() == want_bytes,
            "the pipeline's output differs from an unmoved run's"
        );
        assert_eq!(std::fs::read_to_string(&err).unwrap(), want_err, "stderr");
        std::fs::remove_file(&go).unwrap();
        got
    };
    let out = tb.shared().join("pipe.out");
    let st = run("mawk '{ s += $1; print $2, s }' | sort", &out);
    assert_eq!(st.trim(), "0 0 0");
    nothing_left(tb, "the pipeline");
    // The last stage exits at the first line after GO: the filter, then gen, write into
    // a pipe with no reader.
    let st = run(
        "mawk '{ s += $1; print $1, $2, s; fflush() }' | mawk 'NR <= 5 { print } $1 >= 20000 { exit 3 }'",
        &out,
    );
    assert_eq!(
        st.trim(),
        "141 141 3",
        "SIGPIPE, SIGPIPE, its own exit code"
    );
    nothing_left(tb, "the pipeline cut short");
}

/// Ctrl-C typed in the terminal (under `script`) ends every member of a foreground
/// pipeline on every node, as at home.
fn ctrl_c_ends_every_member(tb: &Testbed) {
    let busy = "BEGIN { while (1) for (j = 0; j < 100000; j++) s += j % 7 }";
    let inner = format!("mawk '{busy}' | mawk '{busy}' | mawk '{busy}'; echo after");
    let cmd = format!(
        "exec {m} testbed exec 1 --dir {d} -- {m} run -L bash -c \"{inner}\"",
        m = mosix().display(),
        d = tb.dir.path().display(),
    );
    let mut c = under_terminal(&cmd);
    let bash = std::cell::Cell::new(0);
    tb.wait_until("the job under script is registered", || {
        // The family's root: a child forked by bash is listed as "bash -c" too until it
        // execs mawk, and its PID may be the lower one (PIDs wrap around).
        let listed = tb.ps(1);
        let members: Vec<i64> = listed
            .iter()
            .filter_map(|p| p["home_pid"].as_i64())
            .collect();
        if let Some(b) = listed.iter().find(|p| {
            p["cmd"].as_str().unwrap_or("").starts_with("bash -c")
                && !p["ppid"].as_i64().is_some_and(|pp| members.contains(&pp))
        }) {
            bash.set(b["home_pid"].as_i64().unwrap() as i32);
        }
        bash.get() != 0
    });
    let kids = adopted(tb, bash.get(), 3);
    for (k, to) in kids.iter().zip(["2", "3", "4"]) {
        tb.move_ok(*k, to);
    }
    let mut w = c.stdin.take().unwrap();
    w.write_all(b"\x03").unwrap();
    w.flush().unwrap();
    let (st, out) = terminal_end(c, "Ctrl-C to the family");
    assert_eq!(st.code(), Some(128 + libc::SIGINT), "{st:?} {out:?}");
    assert!(!out.contains("after"), "{out:?}");
    nothing_left(tb, "Ctrl-C");
}

/// A C project of `files` files, each one function of `stmts` statements that -O2 takes
/// a while to compile, a main that prints every function's value, and a Makefile.
fn c_project(dir: &Path, files: usize, stmts: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut main = String::new();
    for i in 0..files {
        let mut f = format!(
            "unsigned long f{i}(unsigned long x) {{\n  unsigned long a = x, b = x ^ {}, c = x + {};\n",
            i * 7 + 1,
            i * 13 + 5
        );
        for k in 0..stmts {
            f += &match k % 3 {
                0 => format!("  a = a * {} + (b >> {}) + c;\n", 2 * k + 3, k % 13 + 1),
                1 => format!("  b ^= (a << {}) + {}u * c;\n", k % 11 + 1, k + 7),
                _ => format!("  c += (a | {}u) - (b & {}u);\n", k * 31 + 1, k * 17 + 3),
            };
        }
        f += "  return a ^ b ^ c;\n}\n";
        std::fs::write(dir.join(format!("f{i}.c")), f).unwrap();
        main += &format!("unsigned long f{i}(unsigned long);\n");
    }
    main += "#include <stdio.h>\nint main(void) {\n";
    for i in 0..files {
        main += &format!("  printf(\"f{i} %lu\\n\", f{i}({i}));\n");
    }
    main += "  return 0;\n}\n";
    std::fs::write(dir.join("main.c"), main).unwrap();
    std::fs::write(
        dir.join("Makefile"),
        "SRCS := $(sort $(wildcard f*.c)) main.c\nOBJS := $(SRCS:.c=.o)\n\
         prog: $(OBJS)\n\tcc -o $@ $(OBJS)\n%.o: %.c\n\tcc -O2 -c $< -o $@\n",
    )
    .unwrap();
}

/// `mosrun make -j4` of a generated C project (24 files): gcc's compilers (cc1, make's
/// grandchildren by fork and exec) are adopted and moved to the other nodes by the
/// balancer; the build's output and the program's output equal an unmoved build's.
fn make_j4(tb: &Testbed) {
    let moved = tb.shared().join("proj-moved");
    let plain = tb.shared().join("proj-plain");
    c_project(&moved, 24, 1000);
    c_project(&plain, 24, 1000);
    let make = |dir: &Path, mosrun: bool| -> (String, String) {
        let d = dir.to_str().unwrap();
        let argv = ["make", "-s", "--no-print-directory", "-j4", "-C", d];
        // The unmoved build runs outside the testbed (on the whole machine, not in a
        // node's share of it: it is only the reference).
        let mut c = if mosrun {
            job(tb, &argv)
        } else {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        };
        let o = c.stdin(Stdio::null()).output().unwrap();
        assert!(
            o.status.success(),
            "make: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let p = on_node(tb, 1, &[dir.join("prog").to_str().unwrap()])
            .output()
            .unwrap();
        assert!(p.status.success());
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&p.stdout).into_owned(),
        )
    };
    // Which nodes showed a compiler running there, while the moved build runs.
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let dir = tb.dir.path().to_path_buf();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for n in 2..=4 {
                    if ps_at(&dir, n).iter().any(|p| {
                        p["role"] == "guest" && p["cmd"].as_str().unwrap_or("").contains("cc1")
                    }) {
                        seen.lock().unwrap().insert(n);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let t = std::time::Instant::now();
    let got = make(&moved, true);
    let t_moved = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    poller.join().unwrap();
    let t = std::time::Instant::now();
    let want = make(&plain, false);
    eprintln!(
        "families: make -j4 under mosrun {:.1}s, unmoved (whole machine) {:.1}s",
        t_moved.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(got.0, want.0, "the build's output");
    assert_eq!(got.1, want.1, "the program's output");
    assert_eq!(got.1.lines().count(), 24);
    let seen = seen.lock().unwrap().clone();
    eprintln!("families: compilers seen running on nodes {seen:?}");
    assert!(
        !seen.is_empty(),
        "no node but the home showed a compiler running there"
    );
    nothing_left(tb, "make -j4");
}

/// A parent talking to its child over a Unix socketpair; the child checks getppid().
const SOCKETPAIR: &str = r#"import os, socket, sys
a, b = socket.socketpair()
parent = os.getpid()
kid = os.fork()
if kid == 0:
    a.close()
    while True:
        m = b.recv(100)
        if not m:
            os._exit(0)
        b.sendall(m.upper() + b" " + str(os.getppid() == parent).encode())
b.close()
print("start", kid, flush=True)
for line in sys.stdin:
    a.sendall(line.strip().encode())
    print(a.recv(100).decode(), flush=True)
a.close()
_, st = os.waitpid(kid, 0)
print("child", os.waitstatus_to_exitcode(st), flush=True)
"#;

/// A socketpair between a parent and its child keeps working with the two on different
/// nodes (and with the child back home), and the child's parent is its parent wherever
/// both run.
fn socketpair_between_members(tb: &Testbed) {
    let argv = ["/usr/bin/python3", "-c", SOCKETPAIR];
    let (want, st) = unmoved(tb, &argv, "one\ntwo\nthree\n");
    assert!(st.success());
    let want: Vec<&str> = want.lines().skip(1).collect();
    let mut pinned = vec!["-L"];
    pinned.extend(argv);
    let mut c = job(tb, &pinned)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let parent = c.id() as i32;
    let mut w = c.stdin.take().unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut line = || {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    assert!(line().starts_with("start"));
    let kid = adopted(tb, parent, 1)[0];
    let mut got = Vec::new();
    for (what, who, to) in [
        ("one", kid, "2"),
        ("two", parent, "3"),
        ("three", kid, "home"),
    ] {
        tb.move_ok(who, to);
        writeln!(w, "{what}").unwrap();
        w.flush().unwrap();
        got.push(line());
    }
    drop(w);
    got.push(line());
    assert_eq!(got, want, "over a socketpair between members on two nodes");
    assert!(c.wait().unwrap().success());
    nothing_left(tb, "the socketpair");
}

/// A parent and child sharing MAP_SHARED memory (progs/homemem.c): the memory stays
/// home. The parent away comes home for a futex wait on it (trapped before the kernel
/// touches it) and for a write to it, which the child at home sees; the child moved away
/// comes back at its next touch, and answers again.
fn memory_shared_with_a_child(tb: &Testbed) {
    let bin = compile("homemem");
    let mut c = job(tb, &["-L", bin.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let parent = c.id() as i32;
    let mut w = c.stdin.take().unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.starts_with("start"), "{first:?}");
    let mut say = |s: &str| -> String {
        writeln!(w, "{s}").unwrap();
        w.flush().unwrap();
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim().to_string()
    };
    let kid = adopted(tb, parent, 1)[0];
    let home = |pid: i32, what: &str| {
        tb.wait_until(&format!("{what} came home"), || tb.where_(pid) == "0")
    };
    tb.move_ok(parent, "2");
    assert_eq!(say("futex"), "futex ETIMEDOUT");
    home(parent, "the parent waiting on shared memory");
    tb.move_ok(parent, "3");
    assert_eq!(say("set 7"), "b=70");
    home(parent, "the parent writing shared memory");
    let o = tb.migrate(kid, "4");
    assert!(
        o.status.success(),
        "migrate the child: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    home(kid, "the child touching shared memory");
    assert_eq!(say("set 8"), "b=80");
    drop(w);
    assert!(c.wait().unwrap().success());
    nothing_left(tb, "memory shared with a child");
}

/// A user's process mapping a root file in /dev/shm read-only and shared (with the test,
/// here) moves; its deputy holds the file for it, read-only: the user cannot take that
/// descriptor from the deputy (their own process) and write with it.
fn home_memory_gives_no_more_rights(tb: &Testbed) {
    use std::os::unix::fs::PermissionsExt;
    let path = format!("/dev/shm/mosix-families-{}", std::process::id());
    std::fs::write(&path, b"hello, world").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    // SAFETY: a read-only shared mapping of a file we own, unmapped below.
    let ours = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(ours, libc::MAP_FAILED);
    let reader = "import mmap, sys\nf = open(sys.argv[1], 'rb')\n\
        m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)\nf.close()\n\
        print('start', flush=True)\n\
        for line in sys.stdin:\n    print('read', m[:5].decode(), flush=True)\n";
    let mut argv: Vec<&str> = AS_NOBODY.to_vec();
    let m = mosix();
    argv.extend([
        m.to_str().unwrap(),
        "run",
        "/usr/bin/python3",
        "-c",
        reader,
        &path,
    ]);
    let mut c = on_node(tb, 1, &argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = c.id() as i32;
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert_eq!(l, "start\n");
    tb.move_ok(pid, "2");
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let held: Vec<i32> = env
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"MOSIX_HOME_MEMORY="))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|x| x.parse().unwrap())
                .collect()
        })
        .expect("the deputy holds the shared file");
    assert_eq!(held.len(), 1);
    let attack = r#"import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
n = libc.syscall(438, os.pidfd_open(int(sys.argv[1])), int(sys.argv[2]), 0)
if n < 0:
    print('getfd', errno.errorcode[ctypes.get_errno()])
else:
    try:
        os.write(n, b'owned')
        print('wrote')
    except OSError as e:
        print('write', errno.errorcode[e.errno])
"#;
    let o = Command::new(AS_NOBODY[0])
        .args(&AS_NOBODY[1..])
        .args(["/usr/bin/python3", "-c", attack])
        .arg(pid.to_string())
        .arg(held[0].to_string())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "write EBADF",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"hello, world");
    let mut w = c.stdin.take().unwrap();
    writeln!(w, "read").unwrap();
    w.flush().unwrap();
    l.clear();
    out.read_line(&mut l).unwrap();
    assert_eq!(l, "read hello\n");
    tb.wait_until("it came home to read the shared file", || {
        tb.where_(pid) == "0"
    });
    drop(w);
    assert!(c.wait().unwrap().success());
    // SAFETY: our mapping from above.
    unsafe { libc::munmap(ours, 4096) };
    let _ = std::fs::remove_file(&path);
    nothing_left(tb, "a user's read-only shared file");
}

/// A driver using Python's multiprocessing: a Pool of 4 workers forked by it (their
/// queues' locks are POSIX semaphores in memory they all share).
const POOL: &str = r#"import hashlib, multiprocessing as mp, sys
def work(i):
    h = hashlib.sha256(str(i).encode()).digest()
    for _ in range(int(sys.argv[1])):
        h = hashlib.sha256(h).digest()
    return i, h.hex()[:16]
if __name__ == "__main__":
    mp.set_start_method("fork")
    print("start", flush=True)
    with mp.Pool(4) as p:
        for r in p.imap(work, range(int(sys.argv[2]))):
            print(*r, flush=True)
    print("done", flush=True)
"#;

/// Python's multiprocessing Pool: its workers, moved to three other nodes while they
/// compute their first task (then the next ones at home), give the driver the same
/// results as an unmoved run. The semaphores of the
/// Pool's queues are memory the workers share with each other at home: it stays there,
/// and a worker that touches it comes home to do so (its deputy holds it meanwhile).
fn python_pool(tb: &Testbed) {
    let py = tb.shared().join("pool.py");
    std::fs::write(&py, POOL).unwrap();
    let py = py.to_str().unwrap();
    let args = ["/usr/bin/python3", py, "1000000", "8"];
    let want = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(want.status.success());
    let mut argv = vec!["-L"];
    argv.extend(args);
    let mut c = job(tb, &argv).stdout(Stdio::piped()).spawn().unwrap();
    let driver = c.id() as i32;
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first, "start\n");
    let workers = adopted(tb, driver, 4);
    for (w, to) in workers.iter().zip(["2", "3", "4"]) {
        let o = tb.migrate(*w, to);
        assert!(
            o.status.success(),
            "migrate worker {w} {to}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(c.wait().unwrap().success());
    assert_eq!(
        first + &rest,
        String::from_utf8_lossy(&want.stdout),
        "the Pool's results"
    );
    nothing_left(tb, "the Pool");
}

#[test]
fn children_of_a_migratable_process_are_migratable() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (network namespaces, cgroups, ptrace): run it as root");
    }
    let tb = Testbed::up(&[]);
    let t = std::time::Instant::now();
    let lap = |what: &str| eprintln!("families: {what} {:.1}s", t.elapsed().as_secs_f64());
    faq_family(&tb);
    lap("faq");
    pinned_family(&tb);
    lap("pinned");
    parent_moves_children_stay(&tb);
    lap("parent");
    orphans(&tb);
    lap("orphan");
    exit_statuses_and_signals(&tb);
    lap("signals");
    pipeline_on_three_nodes(&tb);
    socketpair_between_members(&tb);
    lap("pipeline, socketpair");
    ctrl_c_ends_every_member(&tb);
    lap("ctrl-c");
    memory_shared_with_a_child(&tb);
    home_memory_gives_no_more_rights(&tb);
    lap("shared memory");
    python_pool(&tb);
    lap("python pool");
    make_j4(&tb);
    lap("make");
}
