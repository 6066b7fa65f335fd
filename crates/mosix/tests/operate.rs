//! Operating a cluster (root, a real 4-node testbed): CPU counts in `mosix status`, the
//! Prometheus metrics while a process migrates, and the MOSIX file interface (`mosix fs`):
//! every node's status, `where` of a moved process, `goto` moving it (and refused for
//! another user). One test function: the testbed's names are machine-wide. Every wait is
//! for an event or polls a condition with a deadline.

mod common;
use common::*;
use serde_json::Value;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The `mosix fs` of node 1, unmounted when dropped.
struct Mount {
    dir: PathBuf,
    child: Child,
}

impl Mount {
    fn new(tb: &Testbed) -> Mount {
        let dir = tb.dir.path().join("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        let child = tb
            .cmd(1, &["fs", dir.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let m = Mount { dir, child };
        tb.wait_until("mosix fs is mounted", || m.dir.join("nodes").is_dir());
        m
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
            .trim()
            .to_string()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        // In case it died without unmounting (a failed test): detach it.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
    }
}

/// Writes `what` into a `goto` file as uid/gid `uid` (a child process: the file system
/// takes the writer's credentials from the kernel).
fn goto_as(uid: Option<u32>, file: &Path, what: &str) -> std::io::Result<()> {
    let Some(uid) = uid else {
        return std::fs::write(file, what);
    };
    let o = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            &uid.to_string(),
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            "import os, sys\n\
             try:\n    fd = os.open(sys.argv[1], os.O_WRONLY)\n    os.write(fd, sys.argv[2].encode())\n\
             except OSError as e:\n    sys.exit(e.errno)",
        ])
        .arg(file)
        .arg(what)
        .output()?;
    match o.status.code() {
        Some(0) => Ok(()),
        Some(e) => Err(std::io::Error::from_raw_os_error(e)),
        None => Err(std::io::Error::other("killed")),
    }
}

#[test]
fn cpus_metrics_and_file_interface_on_four_nodes() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (network namespaces, cgroups, FUSE): run it as root");
    }
    let tb = Testbed::up(&["--cpus", "2,1,1,1"]);
    for n in 1..=4 {
        let o = tb.exec(n, &["mosctl", "stay"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    // 1. Every node knows every node's CPUs: status --json and the table.
    for n in [1, 3] {
        let o = tb.exec(n, &["status", "--json"]);
        assert!(o.status.success());
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let cpus: Vec<u64> = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["load"]["cpus"].as_u64().unwrap())
            .collect();
        assert_eq!(cpus, [2, 1, 1, 1], "as node {n} sees them");
    }
    let table = String::from_utf8(tb.exec(2, &["status"]).stdout).unwrap();
    let header = table.lines().next().unwrap();
    let col = header.split_whitespace().position(|c| c == "CPUS").unwrap();
    let row1: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row1[col + 1], "2", "node 1's CPUS in\n{table}"); // "1" then "3 up": +1

    // 2. Metrics: the named series, before anything moved.
    let m1 = scrape(1);
    for name in [
        "mosix_load",
        "mosix_runnable",
        "mosix_speed",
        "mosix_memory_total_bytes",
        "mosix_memory_free_bytes",
        "mosix_guests",
        "mosix_home_jobs_away",
        "mosix_migration_frozen_seconds_count",
        "mosix_migration_bytes_count",
        "mosix_gossip_datagrams_accepted_total",
        "mosix_gossip_datagrams_rejected_total",
    ] {
        metric(&m1, name);
    }
    assert_eq!(metric(&m1, "mosix_cpus"), 2.0);
    assert_eq!(metric(&scrape(2), "mosix_cpus"), 1.0);
    assert_eq!(metric(&m1, "mosix_peers_up"), 3.0);
    assert!(metric(&m1, "mosix_gossip_datagrams_accepted_total") > 0.0);
    let ok = "mosix_migrations_total{reason=\"manual\",outcome=\"ok\"}";
    let ok0 = metric(&m1, ok);
    let frozen0 = metric(&m1, "mosix_migration_frozen_seconds_count");
    assert_eq!(metric(&m1, "mosix_home_jobs_away"), 0.0);

    // 3. The file interface, and a job that moves while the metrics count.
    let fs = Mount::new(&tb);
    for n in 1..=4 {
        assert_eq!(fs.read(&format!("nodes/{n}/status")), "3", "node {n}");
    }
    assert_eq!(fs.read("nodes/1/cpus"), "2");
    assert_eq!(fs.read("nodes/4/cpus"), "1");
    assert!(fs.read("nodes/2/mem").parse::<u64>().unwrap() > 0);
    let awk = "BEGIN { print \"start\"; fflush() } \
               { s = 0; for (i = 0; i < 200000; i++) s += (i * NR) % 7; \
                 printf \"phase %d sum %d\\n\", NR - 1, s; fflush() } END { exit 3 }";
    let mut job = Job::start(&tb, &["mawk", "-W", "interactive", awk]);
    let pid = job.home_pid;
    let p = |f: &str| format!("procs/{pid}/{f}");
    assert_eq!(fs.read(&p("where")), "0");
    let o = tb.migrate(pid, "2");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs.read(&p("where")), "2", "where of a moved process");
    let m1 = scrape(1);
    assert_eq!(metric(&m1, ok), ok0 + 1.0, "the counter went up");
    assert_eq!(
        metric(&m1, "mosix_migration_frozen_seconds_count"),
        frozen0 + 1.0
    );
    assert!(metric(&m1, "mosix_migration_bytes_sum") > 0.0);
    assert_eq!(metric(&m1, "mosix_home_jobs_away"), 1.0);
    tb.wait_until("node 2 counts its guest", || {
        metric(&scrape(2), "mosix_guests") == 1.0
    });
    job.send("go\n");
    assert!(job.line().starts_with("phase 0"));

    // goto by another user: refused, the process stays, the reason says why.
    let goto = fs.dir.join(p("goto"));
    let e = goto_as(Some(65534), &goto, "3\n").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert_eq!(fs.read(&p("where")), "2");
    assert!(
        fs.read(&p("reason")).contains("you may only move your own"),
        "{}",
        fs.read(&p("reason"))
    );
    // goto by its owner (root): it moves (node 2's guest, now node 3's), then home.
    goto_as(None, &goto, "3\n").unwrap();
    assert_eq!(fs.read(&p("where")), "3");
    assert!(tb
        .ps(3)
        .iter()
        .any(|x| x["home_pid"] == pid && x["role"] == "guest"));
    assert!(!tb.ps(2).iter().any(|x| x["home_pid"] == pid));
    // The move from node 2 was node 2's: node 1 counted only the one it sent.
    assert_eq!(metric(&scrape(1), ok), ok0 + 1.0);
    assert_eq!(
        metric(&scrape(2), ok),
        1.0,
        "node 2 sent it on (goto is manual)"
    );
    job.send("go\n");
    assert!(job.line().starts_with("phase 1"));
    // A node that is not in the map: EINVAL, nothing moves.
    let e = goto_as(None, &goto, "9\n").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    assert_eq!(fs.read(&p("where")), "3");
    goto_as(None, &goto, "home\n").unwrap();
    assert_eq!(fs.read(&p("where")), "0");
    job.send("go\n");
    assert!(job.line().starts_with("phase 2"));
    let (out, st) = job.finish();
    assert_eq!(st.code(), Some(3), "{out:?}");
    // Its directory goes with it.
    tb.wait_until("the ended process leaves procs/", || {
        !fs.dir.join(format!("procs/{pid}")).exists()
    });
    drop(fs);
    let mnt = tb.dir.path().join("mnt");
    let end = Instant::now() + DEADLINE;
    while mnt.join("nodes").exists() {
        assert!(Instant::now() < end, "mosix fs did not unmount on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
