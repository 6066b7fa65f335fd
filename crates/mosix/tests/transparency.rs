//! Home-node transparency with real, unmodified programs (issue 10), on a 4-node testbed
//! (root; one test function, because the testbed's names are machine-wide). Each program
//! is moved 1 → 2 → 3 (→ home) in the middle of its run, by construction: between pieces
//! of its input, which it cannot finish without. Its output (files byte for byte, stdout,
//! exit status) is compared with an unmoved run's. Every file, pipe, socket, device and the
//! terminal are the home node's, used through its deputy, except files under the
//! cluster's shared path (DFSA), used where the process runs.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

const PY: &str = "/usr/bin/python3";

/// `mosix testbed exec 1 -- [as nobody] mosix run ARGV`, the job itself (its PID is the
/// home PID).
fn job_cmd(tb: &Testbed, argv: &[&str], nobody: bool) -> Command {
    let mut c = Command::new(mosix());
    c.args(["testbed", "exec", "1", "--dir"])
        .arg(tb.dir.path())
        .arg("--");
    if nobody {
        c.args(AS_NOBODY);
    }
    // -L: the test moves it; the balancer must not move it at the same time.
    c.arg(mosix()).arg("run").arg("-L").args(argv);
    c
}

/// Waits until `pid` is a registered migratable process of node 1.
fn registered(tb: &Testbed, pid: i32) {
    tb.wait_until(&format!("{pid} is registered"), || {
        tb.ps(1).iter().any(|p| p["home_pid"] == pid)
    });
}

/// Deterministic text, `n` bytes (lines of words, compressible but not trivially).
fn text(seed: u64, n: usize) -> Vec<u8> {
    let words = [
        "mosix", "cluster", "node", "deputy", "home", "process", "moves", "load", "file", "zstd",
        "gossip", "where",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 16);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        out.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
        if x.is_multiple_of(5) {
            out.extend_from_slice(format!("{}", x % 100_000).as_bytes());
        }
    }
    out.truncate(n);
    out
}

/// A compressor reading 4 pieces of stdin with a move between them, writing a home file:
/// the file equals what the same program writes unmoved.
fn compressor(tb: &Testbed, prog: &[&str], name: &str) {
    let pieces: Vec<Vec<u8>> = (0..4).map(|i| text(i + 1, 3 << 20)).collect();
    let all: Vec<u8> = pieces.concat();
    let mut r = Command::new(prog[0])
        .args(&prog[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = r.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || w.write_all(&all).unwrap());
    let mut want = Vec::new();
    r.stdout.take().unwrap().read_to_end(&mut want).unwrap();
    feeder.join().unwrap();
    assert!(r.wait().unwrap().success());

    let out = tb.dir.path().join(format!("{name}.out"));
    let mut c = job_cmd(tb, prog, false)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    let pid = c.id() as i32;
    let mut stdin = c.stdin.take().unwrap();
    registered(tb, pid);
    stdin.write_all(&pieces[0]).unwrap();
    for (i, to) in ["2", "3", "home"].iter().enumerate() {
        tb.move_ok(pid, to);
        stdin.write_all(&pieces[i + 1]).unwrap();
    }
    drop(stdin);
    let st = c.wait().unwrap();
    assert!(st.success(), "{name}: {st:?}");
    let got = std::fs::read(&out).unwrap();
    assert!(
        got == want,
        "{name}: its output file differs from an unmoved run's"
    );
}

/// A line-by-line conversation with a job (its stdin and stdout piped).
struct Talk {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    pid: i32,
}

impl Talk {
    fn start(tb: &Testbed, argv: &[&str], nobody: bool) -> Talk {
        let mut child = job_cmd(tb, argv, nobody)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut t = Talk {
            child,
            stdin,
            out,
            pid,
        };
        assert_eq!(t.line(), "start");
        t
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }
    fn say(&mut self, s: &str) -> String {
        let w = self.stdin.as_mut().unwrap();
        writeln!(w, "{s}").unwrap();
        w.flush().unwrap();
        self.line()
    }
    fn end(mut self) -> (String, std::process::ExitStatus) {
        self.stdin = None;
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        (rest, self.child.wait().unwrap())
    }
}

/// Runs `script` with these lines, unmoved, outside the testbed: its stdout lines.
fn unmoved(script: &str, args: &[&str], lines: &[&str]) -> Vec<String> {
    let mut c = Command::new(PY)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = c.stdin.take().unwrap();
    for l in lines {
        writeln!(w, "{l}").unwrap();
    }
    drop(w);
    let o = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// Talks to `script` (python3) moved 1 → 2 → 3 → home, one line at each place, and
/// compares what it says with an unmoved run (after `fresh` resets its files).
fn conversation(tb: &Testbed, script: &str, args: &[&str], lines: [&str; 4], fresh: &dyn Fn()) {
    fresh();
    let want = unmoved(script, args, &lines);
    fresh();
    let mut argv = vec![PY, "-c", script];
    argv.extend_from_slice(args);
    let mut t = Talk::start(tb, &argv, false);
    let mut got = vec!["start".to_string()];
    got.push(t.say(lines[0]));
    for (i, to) in ["2", "3", "home"].iter().enumerate() {
        tb.move_ok(t.pid, to);
        got.push(t.say(lines[i + 1]));
    }
    let (rest, st) = t.end();
    got.extend(rest.lines().map(String::from));
    assert_eq!(got, want, "{args:?}");
    assert!(st.success(), "{st:?}");
}

const LOG_PY: &str = r#"
import os, sys
log = open(sys.argv[1], 'a')
rnd, null = open('/dev/urandom', 'rb'), open('/dev/null', 'w')
print('start', flush=True)
for line in sys.stdin:
    log.write(line); log.flush()
    st = os.fstat(log.fileno())
    ok = len(rnd.read(16)) == 16 and null.write('x' * 100) == 100
    # A file opened after the move: resolved at home, in its cwd.
    with open(sys.argv[1]) as f:
        lines = f.read().splitlines()
    print(line.strip(), st.st_size, len(lines), lines[-1], ok, os.getcwd() == sys.argv[2], flush=True)
print('end', os.path.getsize(sys.argv[1]), flush=True)
"#;

const SQL_PY: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute('create table if not exists t (k integer primary key, v text)')
db.commit()
print('start', flush=True)
for i, line in enumerate(sys.stdin):
    with db:
        db.executemany('insert into t (v) values (?)', [(f'{line.strip()}-{j}',) for j in range(500)])
    n, s = db.execute('select count(*), sum(length(v)) from t').fetchone()
    print(line.strip(), n, s, flush=True)
db.close()
print('end', flush=True)
"#;

const CLIENT_PY: &str = r#"
import socket, sys
port = int(sys.argv[1])
def connect():
    s = socket.create_connection(('127.0.0.1', port))
    return s, s.makefile('r')
kept, kept_in = connect()
print('start', flush=True)
for line in sys.stdin:
    kept.sendall(line.encode()); a = kept_in.readline().strip()
    # And a connection made where it runs now: from the home node too.
    s, f = connect(); s.sendall(line.encode()); b = f.readline().strip(); s.close()
    print(a, b, flush=True)
print('end', flush=True)
"#;

const SERVER_PY: &str = r#"
import socket, sys, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('127.0.0.1', 0)); l.listen(16)
print(l.getsockname()[1], flush=True)
def serve(c, peer):
    f = c.makefile('r')
    for line in f:
        c.sendall(f'{line.strip().upper()}@{peer}\n'.encode())
while True:
    c, a = l.accept()
    threading.Thread(target=serve, args=(c, a[0]), daemon=True).start()
"#;

fn sockets(tb: &Testbed) {
    // The server runs in node 1's network namespace, on its loopback: only a socket of
    // the home node reaches it.
    let mut server = Command::new(mosix())
        .args(["testbed", "exec", "1", "--dir"])
        .arg(tb.dir.path())
        .args(["--", PY, "-c", SERVER_PY])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let port = port.trim().to_string();
    let lines = ["one", "two", "three", "four"];
    let mut t = Talk::start(tb, &[PY, "-c", CLIENT_PY, &port], false);
    let mut got = vec![t.say(lines[0])];
    for (i, to) in ["2", "3", "home"].iter().enumerate() {
        tb.move_ok(t.pid, to);
        got.push(t.say(lines[i + 1]));
    }
    let (rest, st) = t.end();
    let _ = server.kill();
    let _ = server.wait();
    let want: Vec<String> = lines
        .iter()
        .map(|l| format!("{0}@127.0.0.1 {0}@127.0.0.1", l.to_uppercase()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(rest.trim(), "end");
    assert!(st.success());
}

const TTY_PY: &str = r#"
import os, sys, signal, fcntl, termios, struct
signal.signal(signal.SIGINT, signal.SIG_DFL)
def where():
    rows, cols = struct.unpack('hh', fcntl.ioctl(1, termios.TIOCGWINSZ, b'1234'))
    return f'{os.isatty(0)} {os.isatty(1)} {rows}x{cols}'
print('start', where(), flush=True)
for line in sys.stdin:
    print('got', line.strip(), where(), flush=True)
"#;

/// Under `script` (a terminal at home), the job sees a terminal on every node, with its
/// window size, and Ctrl-C typed in the terminal ends it where it runs.
fn terminal(tb: &Testbed) {
    let py = tb.dir.path().join("tty.py");
    std::fs::write(&py, TTY_PY).unwrap();
    let cmd = format!(
        "stty rows 33 cols 101; exec {m} testbed exec 1 --dir {d} -- {m} run {PY} {py}",
        m = mosix().display(),
        d = tb.dir.path().display(),
        py = py.display(),
    );
    let mut c = under_terminal(&cmd);
    let mut w = c.stdin.take().unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut next = |want: &str| {
        // The terminal echoes what is typed: skip to the program's own line.
        loop {
            let mut l = String::new();
            assert!(out.read_line(&mut l).unwrap() > 0, "terminal closed");
            let l = l.trim().to_string();
            if l.starts_with(want) {
                return l;
            }
        }
    };
    assert_eq!(next("start"), "start True True 33x101");
    let pid = tb
        .ps(1)
        .into_iter()
        .find(|p| p["cmd"].as_str().is_some_and(|c| c.contains("python3")))
        .and_then(|p| p["home_pid"].as_i64())
        .expect("the job under script in node 1's ps") as i32;
    for to in ["2", "3"] {
        tb.move_ok(pid, to);
        writeln!(w, "at{to}").unwrap();
        w.flush().unwrap();
        assert_eq!(next("got"), format!("got at{to} True True 33x101"));
    }
    // Ctrl-C, typed: the line discipline at home signals the foreground job.
    w.write_all(b"\x03").unwrap();
    w.flush().unwrap();
    let Some(st) = wait_child(&mut c, DEADLINE) else {
        let _ = c.kill();
        panic!("Ctrl-C did not end the job under the terminal");
    };
    assert_eq!(st.code(), Some(128 + libc::SIGINT), "{st:?}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

const STREAM_PY: &str = r#"
import os, sys, zlib
# Sequential reads of a large home file (read ahead) and writes of another (written
# behind), 12 MiB per line of stdin, with their offsets and what was read checked.
src = open(sys.argv[1], 'rb', buffering=0)
dst = open(sys.argv[2], 'wb', buffering=0)
crc = 0
print('start', flush=True)
for line in sys.stdin:
    for _ in range(192):
        b = src.read(65536)
        crc = zlib.crc32(b, crc)
        dst.write(b[::-1])
    print(line.strip(), src.tell(), dst.tell(), os.lseek(src.fileno(), 0, os.SEEK_CUR), crc, flush=True)
dst.close()
print('end', os.path.getsize(sys.argv[2]), flush=True)
"#;

/// Reading ahead and writing behind across moves: what the process reads, the offsets it
/// sees and the file it writes are an unmoved run's (a move while a stream runs settles it
/// at home first: nothing read twice or lost, nothing written twice).
fn streams(tb: &Testbed) {
    let src = tb.dir.path().join("stream.in");
    std::fs::write(&src, text(31, 48 << 20)).unwrap();
    let dst = tb.dir.path().join("stream.out");
    let d = dst.clone();
    let fresh = move || {
        let _ = std::fs::remove_file(&d);
    };
    conversation(
        tb,
        STREAM_PY,
        &[src.to_str().unwrap(), dst.to_str().unwrap()],
        ["a", "b", "c", "d"],
        &fresh,
    );
    let mut want: Vec<u8> = Vec::new();
    for c in std::fs::read(&src).unwrap().chunks(65536) {
        want.extend(c.iter().rev());
    }
    assert!(
        std::fs::read(&dst).unwrap() == want,
        "the file written behind"
    );
    // Its 64 KiB writes made away went home from its supervisors' arenas (the bytes
    // copied once on each host, not through the supervisor's socket).
    let arena: f64 = [2, 3]
        .iter()
        .map(|&n| metric(&scrape(n), "mosix_forwarded_write_arena_bytes_total"))
        .sum();
    assert!(arena >= (4 << 20) as f64, "arena bytes {arena}");
    // And at home they went to its deputy through the deputy's arena (copied once,
    // not through the deputy's socket): the same bytes, made into the same file.
    let home = metric(&scrape(1), "mosix_deputy_arena_bytes_total");
    assert!(home >= (4 << 20) as f64, "deputy arena bytes {home}");
}

const RESTART_PY: &str = r#"
import os, sys, zlib
src = open(sys.argv[1], 'rb', buffering=0)
dst = open(sys.argv[2], 'wb', buffering=0)
print('start', flush=True)
sys.stdin.readline()
crc, n = 0, 0
while True:
    b = src.read(65536)
    if not b:
        break
    crc = zlib.crc32(b, crc)
    dst.write(b[::-1])
    n += 1
    if n % 256 == 0:
        print('at', n, flush=True)
dst.close()
print('done', crc, os.path.getsize(sys.argv[2]), flush=True)
"#;

/// The daemons of its host and of its home are killed and started again while a job reads
/// ahead and writes behind: what it read and the file it wrote are exactly an unmoved
/// run's (positions and writes not known to be settled are sent again and made once;
/// what was read ahead and may be lost is read again from home).
fn streams_outlive_their_daemons(tb: &Testbed) {
    let src = tb.dir.path().join("restart.in");
    let data = text(51, 64 << 20);
    std::fs::write(&src, &data).unwrap();
    let dst = tb.dir.path().join("restart.out");
    let mut t = Talk::start(
        tb,
        &[
            PY,
            "-c",
            RESTART_PY,
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ],
        false,
    );
    tb.move_ok(t.pid, "2");
    assert_eq!(t.say("go"), "at 256");
    for node in ["2", "1"] {
        tb.ok(&["stop", node, "--kill"]);
        tb.ok(&["start", node]);
        // It goes on (its calls waited meanwhile): the next 16 MiB.
        let l = t.line();
        assert!(l.starts_with("at "), "{l}");
    }
    let mut l = t.line();
    while l.starts_with("at ") {
        l = t.line();
    }
    let (_, st) = t.end();
    assert!(st.success(), "{st:?}");
    let mut want: Vec<u8> = Vec::with_capacity(data.len());
    let mut crc = 0u32;
    for c in data.chunks(65536) {
        crc = crc32(crc, c);
        want.extend(c.iter().rev());
    }
    assert_eq!(l, format!("done {crc} {}", data.len()));
    assert!(
        std::fs::read(&dst).unwrap() == want,
        "the file written behind"
    );
}

/// zlib's crc32, continued from `crc`.
fn crc32(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

const HEAD_PY: &str = r#"
import os, sys
# Reads its stdin (a file it shares with the shell that started it) 1 MiB per line of the
# control FIFO; the shell reads on from where it stopped.
data = os.fdopen(0, 'rb', buffering=0)
ctl = open(sys.argv[1])
print('start', flush=True)
for line in ctl:
    n = 0
    while n < 1 << 20:
        n += len(data.read(65536))
    print(line.strip(), data.tell(), flush=True)
"#;

/// A file it shares with a process at home (its shell's stdin) is left at the offset it
/// read to, though what it read came ahead: the shell reads on from there.
fn offset_left_at_home(tb: &Testbed) {
    let data = tb.dir.path().join("head.in");
    std::fs::write(&data, text(41, 8 << 20)).unwrap();
    let fifo = tb.dir.path().join("head.ctl");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let script = format!(
        "{m} run {PY} -c \"$0\" \"$1\"; head -c 24; echo",
        m = mosix().display()
    );
    let mut c = Command::new(mosix())
        .args(["testbed", "exec", "1", "--dir"])
        .arg(tb.dir.path())
        .args(["--", "sh", "-c", &script, HEAD_PY, fifo.to_str().unwrap()])
        .stdin(std::fs::File::open(&data).unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut ctl = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let mut line = || {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    };
    assert_eq!(line(), "start");
    let pid = tb
        .ps(1)
        .into_iter()
        .find(|p| p["cmd"].as_str().is_some_and(|c| c.contains("head.ctl")))
        .and_then(|p| p["home_pid"].as_i64())
        .expect("the job in node 1's ps") as i32;
    let mut got = Vec::new();
    for (i, to) in ["2", "3", "home", "2"].iter().enumerate() {
        tb.move_ok(pid, to);
        writeln!(ctl, "l{i}").unwrap();
        ctl.flush().unwrap();
        got.push(line());
    }
    drop(ctl);
    let tail = line();
    assert!(c.wait().unwrap().success());
    let want: Vec<String> = (0..4).map(|i| format!("l{i} {}", (i + 1) << 20)).collect();
    assert_eq!(got, want);
    let bytes = std::fs::read(&data).unwrap();
    assert_eq!(
        tail,
        String::from_utf8_lossy(&bytes[4 << 20..(4 << 20) + 24])
    );
}

const DFSA_PY: &str = r#"
import fcntl, os, sys, zlib
os.chdir(sys.argv[1])
kept = None
print('start', flush=True)
for i, line in enumerate(sys.stdin):
    name = f'out-{line.strip()}.bin'
    with open(name, 'wb') as f:
        for j in range(50):
            f.write(bytes([(i * 7 + j) % 256]) * 20000)
    with open(name, 'rb') as f:
        d = f.read()
    if i == 1:
        # Opened on node 2, kept on every node after.
        kept = open('kept.txt', 'a+')
    if kept:
        kept.write(f'{line.strip()} {len(d)} {zlib.crc32(d)}\n'); kept.flush()
        kept.seek(0); n = len(kept.read().splitlines())
        link = os.readlink(f'/proc/self/fd/{kept.fileno()}') == os.path.abspath('kept.txt')
    else:
        n, link = 0, True
    with open('locked.txt', 'a') as l:
        fcntl.lockf(l, fcntl.LOCK_EX); l.write(line); fcntl.lockf(l, fcntl.LOCK_UN)
    print(line.strip(), len(d), zlib.crc32(d), n, link, flush=True)
print('end', open('locked.txt').read().split(), flush=True)
"#;

/// Files under the cluster's shared path (DFSA) are opened and used on the node where the
/// process runs; a lock on one is made at home; one kept open across moves is home's once
/// the process leaves the node that opened it. Everything as an unmoved run.
fn shared_files(tb: &Testbed) {
    let work = tb.shared().join("work");
    let w = work.clone();
    let fresh = move || {
        let _ = std::fs::remove_dir_all(&w);
        std::fs::create_dir_all(&w).unwrap();
    };
    let lines = ["a", "b", "c", "d"];
    fresh();
    let want = unmoved(DFSA_PY, &[work.to_str().unwrap()], &lines);
    fresh();
    let mut t = Talk::start(tb, &[PY, "-c", DFSA_PY, work.to_str().unwrap()], false);
    let mut got = vec!["start".to_string(), t.say(lines[0])];
    for (i, to) in ["2", "3", "home"].iter().enumerate() {
        tb.move_ok(t.pid, to);
        got.push(t.say(lines[i + 1]));
        if *to == "2" {
            // The file it keeps is open on node 2 itself (home holds a placeholder).
            let host = tb
                .ps(2)
                .into_iter()
                .find(|p| p["home_pid"] == t.pid)
                .and_then(|p| p["pid"].as_i64())
                .expect("the guest in node 2's ps");
            let kept = work.join("kept.txt");
            let open_here = std::fs::read_dir(format!("/proc/{host}/fd"))
                .unwrap()
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == kept));
            assert!(open_here, "kept.txt is not open on node 2");
        }
    }
    let (rest, st) = t.end();
    got.extend(rest.lines().map(String::from));
    assert_eq!(got, want);
    assert!(st.success(), "{st:?}");
}

const MMAP_PY: &str = r#"
import mmap, os, sys, zlib
os.chdir(sys.argv[1])
f = open('map.bin', 'w+b')
f.truncate(1 << 20)
# A writable shared mapping of a file of the shared path, made at home, kept across moves.
m = mmap.mmap(f.fileno(), 1 << 20)
print('start', flush=True)
for i, line in enumerate(sys.stdin):
    m[i * 4096:(i + 1) * 4096] = bytes([65 + i]) * 4096
    m.flush()
    f.seek(0)
    print(line.strip(), zlib.crc32(m[:]), zlib.crc32(f.read()), flush=True)
m.close()
f.close()
print('end', zlib.crc32(open('map.bin', 'rb').read()), flush=True)
"#;

/// A writable shared mapping of a file of the shared path moves with the process (mapped
/// again from the file where it goes): the file and what the process reads of it are an
/// unmoved run's, byte for byte.
fn shared_mapping(tb: &Testbed) {
    let dir = tb.shared().join("mmap");
    let d = dir.clone();
    let fresh = move || {
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
    };
    conversation(
        tb,
        MMAP_PY,
        &[dir.to_str().unwrap()],
        ["a", "b", "c", "d"],
        &fresh,
    );
}

const HOMEONLY_PY: &str = r#"
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
print('start', flush=True)
for line in sys.stdin:
    what = line.split()[0]
    if what == 'map':
        # A writable shared mapping of a file of its home (no shared path).
        f = open(line.split()[1], 'w+b'); f.truncate(4096)
        m = mmap.mmap(f.fileno(), 4096); m[:5] = b'hello'; m.flush()
        print('map', open(line.split()[1], 'rb').read(5), flush=True)
    elif what == 'uring':
        params = ctypes.create_string_buffer(120)
        fd = libc.syscall(425, 4, params)
        print('uring', fd >= 0, flush=True)
    elif what == 'peek':
        # process_vm_readv of another process (its parent).
        iov = (ctypes.c_uint64 * 2)(0, 0)
        r = libc.syscall(310, os.getppid(), iov, 1, iov, 1, 0)
        print('peek', r, flush=True)
    elif what == 'shm':
        shmid = libc.shmget(0, 4096, 0o1600)
        libc.shmat.restype = ctypes.c_void_p
        addr = libc.shmat(shmid, None, 0)
        ctypes.memmove(addr, b'sysv', 4)
        print('shm', ctypes.string_at(addr, 4), flush=True)
        libc.shmctl(shmid, 0, None)
"#;

/// What cannot be carried from away brings the process home, where it is made (and it
/// goes on there); what cannot move at all keeps it home, with the reason.
fn home_only(tb: &Testbed) {
    let file = tb.dir.path().join("home-only.map");
    let mut t = Talk::start(tb, &[PY, "-c", HOMEONLY_PY], false);
    for (cmd, want) in [
        ("uring".to_string(), "uring True"),
        ("peek".to_string(), "peek 0"),
        (format!("map {}", file.display()), "map b'hello'"),
    ] {
        tb.move_ok(t.pid, "2");
        assert_eq!(t.say(&cmd), want);
        // Its record at home says so once the supervisor that rebuilt it there reports
        // (just after it runs again: its answer may come first).
        tb.wait_until(&format!("{cmd}: it went home to make it"), || {
            tb.where_(t.pid) == "0"
        });
    }
    // Now it holds a writable shared mapping of a home file: it stays home, and says why.
    let o = tb.migrate(t.pid, "2");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("writable shared memory") && err.contains("home-only.map"),
        "{err}"
    );
    assert_eq!(tb.where_(t.pid), "0");
    // System V shared memory: home, then kept there.
    let mut t2 = Talk::start(tb, &[PY, "-c", HOMEONLY_PY], false);
    tb.move_ok(t2.pid, "3");
    assert_eq!(t2.say("shm"), "shm b'sysv'");
    // (Its answer may come before its record at home says it is there: as above.)
    tb.wait_until("shm: it went home to make it", || tb.where_(t2.pid) == "0");
    let o = tb.migrate(t2.pid, "3");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("System V shared memory"),
        "{err}"
    );
    for t in [t, t2] {
        let (_, st) = t.end();
        assert!(st.success(), "{st:?}");
    }
}

const PERM_PY: &str = r#"
import sys
print('start', flush=True)
for line in sys.stdin:
    try:
        with open(line.strip()) as f:
            print('read', len(f.read()), flush=True)
    except OSError as e:
        print('refused', e.errno, flush=True)
"#;

/// A file the user cannot read at home is not readable after the move either; one it
/// can read is. The same for files of the shared path, opened where it runs.
fn permissions(tb: &Testbed) {
    use std::os::unix::fs::PermissionsExt;
    let mut t = Talk::start(tb, &[PY, "-c", PERM_PY], true);
    tb.move_ok(t.pid, "2");
    for dir in [tb.dir.path().to_path_buf(), tb.shared()] {
        let secret = dir.join("secret");
        std::fs::write(&secret, "root only").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let open = dir.join("open");
        std::fs::write(&open, "anyone").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(t.say(secret.to_str().unwrap()), "refused 13");
        assert_eq!(t.say(open.to_str().unwrap()), "read 6");
    }
    let (_, st) = t.end();
    assert!(st.success());
}

/// What the MOSIX manuals teach: `mosrun prog &`, then `migrate $!`, `where $!` and
/// `kill $!`; the shell's `wait` sees the status the program died with.
fn background_job_of_a_shell(tb: &Testbed) {
    let script = format!(
        "{m} run {PY} -c 'import signal; signal.pause()' & echo $!; wait $!; echo status $?",
        m = mosix().display()
    );
    let mut c = Command::new(mosix())
        .args(["testbed", "exec", "1", "--dir"])
        .arg(tb.dir.path())
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    let pid: i32 = l.trim().parse().unwrap();
    registered(tb, pid);
    tb.move_ok(pid, "2");
    tb.move_ok(pid, "3");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    l.clear();
    out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), format!("status {}", 128 + libc::SIGTERM));
    assert!(c.wait().unwrap().success());
}

#[test]
fn real_programs_keep_their_home_world_on_every_node() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (testbed)");
        return;
    }
    let tb = Testbed::up(&[]);
    let d = tb.dir.path().to_path_buf();

    // gzip and xz (xz -T1 has a pipe to itself) writing a home file.
    compressor(&tb, &["gzip", "-9", "-n", "-c"], "gzip");
    compressor(&tb, &["xz", "-T1", "-3", "-c"], "xz");

    // sha256sum of its stdin, then of a large home file it opens only after the moves.
    let big = d.join("big.bin");
    std::fs::write(&big, text(9, 40 << 20)).unwrap();
    let pieces: Vec<Vec<u8>> = (0..3).map(|i| text(20 + i, 1 << 20)).collect();
    let mut r = Command::new("sha256sum")
        .args(["-", big.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    r.stdin.take().unwrap().write_all(&pieces.concat()).unwrap();
    let want = r.wait_with_output().unwrap().stdout;
    let mut c = job_cmd(&tb, &["sha256sum", "-", big.to_str().unwrap()], false)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = c.id() as i32;
    let mut stdin = c.stdin.take().unwrap();
    registered(&tb, pid);
    stdin.write_all(&pieces[0]).unwrap();
    for (i, to) in ["2", "3"].iter().enumerate() {
        tb.move_ok(pid, to);
        stdin.write_all(&pieces[i + 1]).unwrap();
    }
    drop(stdin);
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&want)
    );

    // python3 appending to a log it keeps open, with /dev/urandom and /dev/null open, and
    // opening the log again by name after each move.
    let log = d.join("job.log");
    let l = log.clone();
    let fresh = move || {
        let _ = std::fs::remove_file(&l);
    };
    let cwd = std::env::current_dir().unwrap();
    conversation(
        &tb,
        LOG_PY,
        &[log.to_str().unwrap(), cwd.to_str().unwrap()],
        ["a", "bb", "ccc", "dddd"],
        &fresh,
    );

    // sqlite3 (file locks held at home) on a home database.
    let db = d.join("t.db");
    let b = db.clone();
    let fresh = move || {
        for s in ["", "-journal", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{s}", b.display()));
        }
    };
    conversation(
        &tb,
        SQL_PY,
        &[db.to_str().unwrap()],
        ["w", "x", "y", "z"],
        &fresh,
    );

    // Reading ahead and writing behind across moves; offsets left right at home.
    streams(&tb);
    offset_left_at_home(&tb);
    streams_outlive_their_daemons(&tb);
    // Files of the shared path used where it runs (DFSA), and mapped shared and writable.
    shared_files(&tb);
    shared_mapping(&tb);
    // What cannot be carried from away: made at home.
    home_only(&tb);

    // A TCP connection to a server on the home node kept across moves, and new ones.
    sockets(&tb);
    // A terminal at home.
    terminal(&tb);
    // Permissions are the user's at home.
    permissions(&tb);
    // `mosrun prog &` and `$!`.
    background_job_of_a_shell(&tb);
}
