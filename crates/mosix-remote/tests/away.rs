//! The whole life of a process that leaves home, on one machine and without mosixd (as
//! root: checkpoint, restore and the deputy's exec need it): a running program is frozen,
//! restored "away" (new PID namespace with its home PID, its home's host name, the filter,
//! placeholders), its frozen original becomes its deputy (same PID, still the child of
//! whoever started it), every call it makes away is made by the deputy; then it is brought
//! home again inside its deputy and finishes there. Its output and exit status, as its
//! parent sees them, are those of a run that never moved.

use mosix_ckpt::{Away, CredOptions, Leaving, RestoreOptions};
use mosix_remote::guest::Guest;
use mosix_remote::host::Live;
use mosix_remote::local::{supervise, Supervised};
use mosix_remote::notify::NotifyFd;
use mosix_remote::wire::ExitStatus;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEPUTY: &str = env!("CARGO_BIN_EXE_mosix-deputy");

/// A job in phases: each phase computes, writes a line to its log (kept open) and to
/// stdout, then waits for a line on stdin. It checks its own PID and host name never
/// change.
const JOB: &str = r#"
import os, sys, socket, hashlib
pid, host = os.getpid(), socket.gethostname()
log = open('job.log', 'a')
acc = 0
for phase in range(4):
    for i in range(300000):
        acc = (acc * 31 + i) % 1000000007
    h = hashlib.sha256(str(acc).encode()).hexdigest()[:16]
    log.write(f'{phase} {acc} {h}\n'); log.flush()
    st = os.stat('job.log')
    print(phase, acc, h, st.st_size, os.getpid() == pid, socket.gethostname() == host, flush=True)
    line = sys.stdin.readline()
    if not line:
        break
log.close()
print('done', len(open('job.log').read().splitlines()), flush=True)
sys.exit(3)
"#;

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn start(dir: &Path) -> (std::process::Child, std::process::ChildStdin) {
    let mut c = Command::new(python());
    c.args(["-c", JOB])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(dir.join("out.txt")).unwrap())
        .stderr(Stdio::null());
    // SAFETY: close_range in the forked child: only 0, 1, 2 go to the program.
    unsafe {
        c.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = c.spawn().unwrap();
    let stdin = child.stdin.take().unwrap();
    (child, stdin)
}

fn wait_lines(dir: &Path, n: usize) {
    let t = Instant::now();
    loop {
        let s = std::fs::read_to_string(dir.join("out.txt")).unwrap_or_default();
        if s.lines().count() >= n {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no line {n}: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reference() -> (String, String, Option<i32>) {
    let d = tempfile::tempdir().unwrap();
    let (mut child, mut stdin) = start(d.path());
    for _ in 0..4 {
        stdin.write_all(b"go\n").unwrap();
    }
    drop(stdin);
    let st = child.wait().unwrap();
    (
        std::fs::read_to_string(d.path().join("out.txt")).unwrap(),
        std::fs::read_to_string(d.path().join("job.log")).unwrap(),
        st.code(),
    )
}

/// Accepts the deputy's connection and its hello line.
fn accept_deputy(l: &UnixListener, pid: i32) -> UnixStream {
    let (s, _) = l.accept().unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains(&format!("\"home_pid\":{pid}")), "{line}");
    (&s).write_all(b"{\"type\":\"deputy_ok\"}\n").unwrap();
    s
}

#[test]
fn a_process_leaves_home_runs_away_with_its_deputy_and_comes_back() {
    let (want_out, want_log, want_code) = reference();
    let d = tempfile::tempdir().unwrap();
    let (mut child, mut stdin) = start(d.path());
    let pid = child.id() as i32;
    wait_lines(d.path(), 1);

    // Leave: freeze and save it, restore it away, make the original its deputy.
    let (bytes, _, held) = mosix_ckpt::checkpoint_moving(
        pid,
        Vec::new(),
        mosix_ckpt::Compression::None,
        &Leaving::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let img = mosix_ckpt::read_image_bytes(bytes).unwrap();
    let cloexec: Vec<i32> = img
        .meta
        .fds
        .iter()
        .filter(|f| f.cloexec)
        .map(|f| f.fd)
        .collect();
    let away = Away {
        filter: mosix_remote::filter::to_bytes(&mosix_remote::filter::program(pid)),
        hostname: Some(mosix_ckpt::sys::hostname()),
        proc_fds: Vec::new(),
    };
    let opts = RestoreOptions {
        keep_pid: true,
        time_ns: true,
        hold: true,
        ..Default::default()
    };
    let (guest, listener, _) =
        mosix_ckpt::restore_away(&img, opts, &CredOptions::from_image(), &away).unwrap();
    let sock = d.path().join("deputy.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let list = |v: &[i32]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let env = vec![format!(
        "MOSIX_DEPUTY=sock={};pid={pid};token=t;cloexec={}",
        sock.display(),
        list(&cloexec)
    )];
    let argv = vec!["python3".to_string(), "(away)".to_string()];
    let sigs = held
        .become_program(DEPUTY, &argv, &env, &cloexec)
        .map_err(|b| b.0)
        .unwrap();
    assert!(sigs.is_empty(), "{sigs:?}");
    let conn = accept_deputy(&l, pid);
    // The deputy is the very process the test started: same PID, our child, now
    // running mosix-deputy, with the job's descriptors.
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("mosix-deputy"), "{exe:?}");
    assert!(std::fs::read_link(format!("/proc/{pid}/fd/3")).is_ok_and(|p| p.ends_with("job.log")));
    mosix_ckpt::resume(guest.pid).unwrap();

    // Away: phases 1 and 2 run there; every file and stdio call is made at home.
    let mut live = Live::new(NotifyFd(listener), guest.pid).unwrap();
    let mut g = Guest::new(pid, 1);
    let pidfd = mosix_remote::host::pidfd_open(guest.pid).unwrap();
    let (stop_r, stop_w) = std::io::pipe().unwrap();
    let dir = d.path().to_path_buf();
    let feeder = std::thread::spawn(move || {
        for n in 2..=3 {
            stdin.write_all(b"go\n").unwrap();
            wait_lines(&dir, n);
        }
        // Phase 2 is printed: bring it home while it waits for its next line.
        (&stop_w).write_all(b"x").unwrap();
        stdin
    });
    let r = supervise(
        &mut live,
        &mut g,
        &pidfd,
        &conn,
        Some(stop_r.as_raw_fd()),
        false,
        &mut |_, _, why| panic!("needed home: {why}"),
        &mut || panic!("it ended away"),
    )
    .unwrap();
    assert_eq!(r, Supervised::Stopped);
    // Made at home: forwarded, or written behind.
    assert!(
        g.forwarded + g.streams.calls > 10,
        "{} calls forwarded, {} answered on the host",
        g.forwarded,
        g.streams.calls
    );
    let mut stdin = feeder.join().unwrap();

    // Home again: freeze it where it waits (in a forwarded read: cancelled), save it,
    // rebuild it inside its deputy.
    let (bytes, _, held) = mosix_ckpt::checkpoint_moving(
        guest.pid,
        Vec::new(),
        mosix_ckpt::Compression::None,
        &Leaving {
            away: true,
            no_new_privs: Some(false),
            shared: Vec::new(),
        },
        &mut |_, _| {},
    )
    .unwrap();
    // Its read waits at home: cancel it there (the deputy answers), as a move does.
    for out in g.quiesce(&mut live) {
        if let mosix_remote::guest::Out::Deputy(m) = out {
            mosix_remote::wire::send(&mut &conn, &m).unwrap();
        }
    }
    let mut r = BufReader::new(&conn);
    while g.outstanding() > 0 {
        let m: mosix_remote::wire::FromDeputy = mosix_remote::wire::recv(&mut r).unwrap().unwrap();
        g.on_deputy(m, &mut live);
    }
    let img2 = std::sync::Arc::new(mosix_ckpt::read_image_bytes(bytes).unwrap());
    // Its memory put in while it runs, as a move home does.
    let back = mosix_ckpt::restore_into(
        pid,
        &img2,
        RestoreOptions {
            hold: true,
            lazy: true,
            ..Default::default()
        },
        &CredOptions::from_image(),
        (DEPUTY, &argv, &env),
    )
    .unwrap();
    held.kill().unwrap();
    if let Some(i) = guest.ns_init {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(i), None);
    }
    let filling = back.resume().unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        std::fs::read_link(format!("/proc/{}/exe", std::process::id()))
            .map(|_| std::fs::canonicalize(python()).unwrap())
            .unwrap()
    );
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    if let Some(f) = filling {
        let f = f.finish();
        assert!(f.bytes > 0, "{f:?}");
    }
    let st = child.wait().unwrap();
    let got_out = std::fs::read_to_string(d.path().join("out.txt")).unwrap();
    let got_log = std::fs::read_to_string(d.path().join("job.log")).unwrap();
    assert_eq!(got_out, want_out);
    assert_eq!(got_log, want_log);
    assert_eq!(st.code(), want_code, "{st:?}");
    let _ = ExitStatus::Code(0);
    let _ = st.signal();
}
