//! Real, unmodified programs run "away" on this machine: under the filter, with nothing
//! but placeholder descriptors, every location-dependent call made by their deputy
//! (`mosix-deputy`, holding the stdio and cwd they should have). What they print and the
//! files they write must be exactly what a plain run gives.

use mosix_remote::local;
use mosix_remote::wire::ExitStatus;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const DEPUTY: &str = env!("CARGO_BIN_EXE_mosix-deputy");

fn which(p: &str) -> String {
    for d in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let c = Path::new(d).join(p);
        if c.exists() {
            return c.to_string_lossy().into_owned();
        }
    }
    panic!("{p} is not installed (scripts/setup.sh installs it)");
}

/// Output and status of `prog args` run directly, in `cwd`, stdin from `input`.
fn direct(prog: &str, args: &[&str], cwd: &Path, input: Option<&Path>) -> (Vec<u8>, ExitStatus) {
    let mut c = Command::new(prog);
    c.args(args).current_dir(cwd).stderr(Stdio::null());
    c.stdin(match input {
        Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
        None => Stdio::null(),
    });
    let o = c.output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    let st = match (o.status.code(), o.status.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (_, Some(s)) => ExitStatus::Signal(s),
        _ => unreachable!(),
    };
    (o.stdout, st)
}

/// The same run away; stdout collected through a file the deputy writes.
fn away(prog: &str, args: &[&str], cwd: &Path, input: Option<&Path>) -> (Vec<u8>, local::Run) {
    let out = tempfile::NamedTempFile::new().unwrap();
    let stdin = match input {
        Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
        None => Stdio::null(),
    };
    let r = local::run(
        Path::new(DEPUTY),
        prog,
        args,
        cwd,
        [stdin, Stdio::from(out.reopen().unwrap()), Stdio::null()],
    )
    .unwrap();
    (std::fs::read(out.path()).unwrap(), r)
}

fn same(prog: &str, args: &[&str], cwd: &Path, input: Option<&Path>) -> local::Run {
    let (want, wst) = direct(prog, args, cwd, input);
    let (got, r) = away(prog, args, cwd, input);
    assert_eq!(
        r.status, wst,
        "{prog}: exit status (calls that needed home: {:?})",
        r.home
    );
    assert!(
        got == want,
        "{prog} {args:?}: output differs ({} bytes away, {} direct): {:?} / {:?}; home: {:?}",
        got.len(),
        want.len(),
        String::from_utf8_lossy(&got[..got.len().min(300)]),
        String::from_utf8_lossy(&want[..want.len().min(300)]),
        r.home
    );
    assert!(r.forwarded > 0, "nothing was forwarded");
    r
}

fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("big.txt");
    let mut s = String::new();
    for i in 0..200_000u32 {
        s.push_str(&format!("line {i} {}\n", i.wrapping_mul(2654435761) % 1000));
    }
    std::fs::write(&f, s).unwrap();
    (d, f)
}

#[test]
fn cat_and_sha256sum_of_a_home_file() {
    let (d, f) = data_dir();
    let f = f.to_str().unwrap();
    same(&which("cat"), &[f], d.path(), None);
    same(&which("sha256sum"), &[f], d.path(), None);
    // A relative path resolves against the deputy's cwd (the process's cwd at home).
    same(&which("sha256sum"), &["big.txt"], d.path(), None);
}

#[test]
fn gzip_into_stdout_and_awk_over_stdin() {
    let (d, f) = data_dir();
    same(
        &which("gzip"),
        &["-c", "-6", f.to_str().unwrap()],
        d.path(),
        None,
    );
    same(
        &which("mawk"),
        &["{s += $3} END {print s, NR}"],
        d.path(),
        Some(&f),
    );
}

#[test]
fn a_missing_file_fails_as_at_home() {
    let (d, _) = data_dir();
    let r = same(&which("cat"), &["no-such-file"], d.path(), None);
    assert_eq!(r.status, ExitStatus::Code(1));
}

const PY_FILES: &str = r#"
import os, sys, json, hashlib, zlib, stat
os.mkdir('sub')
with open('sub/log.txt', 'w') as f:
    f.write('first\n')
with open('sub/log.txt', 'a') as f:
    for i in range(1000):
        f.write(f'{i} {hashlib.sha1(str(i).encode()).hexdigest()}\n')
os.rename('sub/log.txt', 'sub/log2.txt')
st = os.stat('sub/log2.txt')
print('size', st.st_size, stat.S_ISREG(st.st_mode))
print(sorted(os.listdir('sub')))
data = open('big.txt', 'rb').read()
print('big', len(data), zlib.crc32(data))
with open('big.txt', 'rb') as f:
    f.seek(1000)
    print(f.read(20), f.tell())
print(json.dumps({'cwd': os.path.basename(os.getcwd()) != '', 'pid': os.getpid() > 0}))
with open('/dev/urandom', 'rb') as r:
    print('random', len(r.read(64)))
os.unlink('sub/log2.txt')
os.rmdir('sub')
print(os.path.exists('sub'))
sys.exit(4)
"#;

#[test]
fn python_works_on_home_files_and_imports_after_it_started() {
    let (d, _) = data_dir();
    let r = same(&which("python3"), &["-c", PY_FILES], d.path(), None);
    assert_eq!(r.status, ExitStatus::Code(4));
}

#[test]
fn a_tcp_connection_is_made_and_used_from_home() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        // Two clients: the direct run and the run away.
        for _ in 0..2 {
            let (s, _) = l.accept().unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 {
                w.write_all(line.to_uppercase().as_bytes()).unwrap();
                line.clear();
            }
        }
    });
    let py = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}))\nf = s.makefile('rw')\n\
         for w in ['hello', 'from', 'away']:\n    f.write(w + '\\n'); f.flush(); print(f.readline().strip())\n\
         print(s.getpeername()[1] == {port})\ns.close()\n"
    );
    let d = tempfile::tempdir().unwrap();
    same(&which("python3"), &["-c", &py], d.path(), None);
    server.join().unwrap();
}

#[test]
fn xz_with_its_own_pipe_and_a_reader_that_stops_early() {
    let (d, f) = data_dir();
    same(
        &which("xz"),
        &["-T1", "-c", "-1", f.to_str().unwrap()],
        d.path(),
        None,
    );
    // `yes` writing into a pipe whose reader has gone dies by SIGPIPE, as at home.
    let (r, w) = std::io::pipe().unwrap();
    drop(r);
    let run = local::run(
        Path::new(DEPUTY),
        &which("yes"),
        &[],
        d.path(),
        [Stdio::null(), Stdio::from(w), Stdio::null()],
    )
    .unwrap();
    assert_eq!(run.status, ExitStatus::Signal(libc::SIGPIPE));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        run.deputy.signal(),
        Some(libc::SIGPIPE),
        "the deputy ends as the process did"
    );
}

const PY_STREAMS: &str = r#"
import os, sys, zlib
# Sequential reads of a file (read ahead), with the offset asked now and then.
f = open('big.txt', 'rb', buffering=0)
total, crc, n = 0, 0, 0
while True:
    b = f.read(65536)
    if not b:
        break
    total += len(b); crc = zlib.crc32(b, crc); n += 1
    if n % 7 == 0:
        assert f.tell() == total, (f.tell(), total)
        assert os.lseek(f.fileno(), 0, os.SEEK_CUR) == total
print('read', total, crc)
# The offset at home followed: a new descriptor of the same open file sees it.
g = os.fdopen(os.dup(f.fileno()), 'rb', buffering=0)
print('dup at', g.tell())
f.seek(100)
print(f.read(10))
# A file written in pieces (behind), read back, changed, read again.
with open('out.bin', 'wb', buffering=0) as w:
    for i in range(64):
        w.write(bytes([i]) * 50000)
r = open('out.bin', 'rb', buffering=0)
first = r.read(65536); first += r.read(65536); first += r.read(65536)
w = open('out.bin', 'r+b', buffering=0)
w.seek(len(first)); w.write(b'X' * 1000); w.flush()
rest = r.read(2000)
print('changed', rest[:1000] == b'X' * 1000, len(rest))
print('size', os.path.getsize('out.bin'), zlib.crc32(open('out.bin','rb').read()))
os.unlink('out.bin')
"#;

#[test]
fn streams_read_ahead_and_write_behind_as_a_local_run_would() {
    let (d, f) = data_dir();
    // tr of a 3 MB file (its stdin) into a file (its stdout), 8 KiB at a time: read
    // ahead and written behind, byte for byte.
    let r = same(&which("tr"), &["a-z", "A-Z"], d.path(), Some(&f));
    assert!(r.read_ahead > 1 << 20, "read ahead: {r:?}");
    assert!(r.written_behind > 1 << 20, "written behind: {r:?}");
    let r = same(&which("sha256sum"), &[f.to_str().unwrap()], d.path(), None);
    assert!(r.read_ahead > 1 << 20, "read ahead: {r:?}");
    // Offsets follow the reads answered on the host; a change of the file ends what
    // was read ahead of it.
    let r = same(&which("python3"), &["-c", PY_STREAMS], d.path(), None);
    assert!(r.read_ahead > 0 && r.written_behind > 0, "{r:?}");
}

const PY_TAIL: &str = r#"
import time
f = open('grow.txt', 'rb', buffering=0)
n = 0
while True:
    b = f.read(4096)
    if not b:
        break
    n += len(b)
print('eof', n, flush=True)
# As tail -f: read again until the file has grown (bounded: 60 s).
for i in range(6000):
    b = f.read(4096)
    if b:
        print('more', b.decode().strip(), flush=True)
        break
    time.sleep(0.01)
else:
    print('nothing came', flush=True)
"#;

#[test]
fn a_reader_at_the_end_of_a_file_sees_it_grow() {
    let d = tempfile::tempdir().unwrap();
    let grow = d.path().join("grow.txt");
    std::fs::write(&grow, vec![b'x'; 100_000]).unwrap();
    let out = d.path().join("out.txt");
    let o = std::fs::File::create(&out).unwrap();
    let dir = d.path().to_path_buf();
    let run = std::thread::spawn(move || {
        local::run(
            Path::new(DEPUTY),
            &which("python3"),
            &["-c", PY_TAIL],
            &dir,
            [Stdio::null(), Stdio::from(o), Stdio::null()],
        )
        .unwrap()
    });
    // It read to the end (ahead of it, on its host): the file grows at home.
    while !std::fs::read_to_string(&out).unwrap().contains("eof") {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&grow)
        .unwrap()
        .write_all(b"appended\n")
        .unwrap();
    let r = run.join().unwrap();
    assert_eq!(r.status, ExitStatus::Code(0));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "eof 100000\nmore appended\n"
    );
    assert!(r.read_ahead > 0, "{r:?}");
}

const PY_SHARED: &str = r#"
import fcntl, os, zlib
# A file of the shared directory, written and read back where it runs.
with open('shared/out.bin', 'wb') as f:
    for i in range(200):
        f.write(bytes([i % 251]) * 10000)
with open('shared/out.bin', 'rb') as f:
    d = f.read()
    print('size', len(d), zlib.crc32(d), f.tell())
    f.seek(12345)
    print(f.read(8), os.fstat(f.fileno()).st_size)
    # A lock: the file is home's from then on, at the same offset.
    fcntl.flock(f, fcntl.LOCK_SH)
    print('locked at', f.tell(), f.read(4))
    fcntl.flock(f, fcntl.LOCK_UN)
# Appends from two descriptors, one a dup.
g = open('shared/log.txt', 'a')
h = os.fdopen(os.dup(g.fileno()), 'a')
g.write('one\n'); g.flush(); h.write('two\n'); h.flush()
g.close(); h.close()
print(open('shared/log.txt').read().split())
print(open('big.txt', 'rb').read(10))
os.unlink('shared/out.bin'); os.unlink('shared/log.txt')
"#;

#[test]
fn files_of_a_shared_directory_are_used_where_the_process_runs() {
    let (d, f) = data_dir();
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::copy(&f, shared.join("big.txt")).unwrap();
    let run = |prog: &str, args: &[&str]| {
        let (want, wst) = direct(prog, args, d.path(), None);
        let out = tempfile::NamedTempFile::new().unwrap();
        let r = local::run_shared(
            Path::new(DEPUTY),
            prog,
            args,
            d.path(),
            [
                Stdio::null(),
                Stdio::from(out.reopen().unwrap()),
                Stdio::null(),
            ],
            std::slice::from_ref(&shared),
        )
        .unwrap();
        let got = std::fs::read(out.path()).unwrap();
        assert_eq!(r.status, wst, "{prog}: {r:?}");
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{prog} {args:?}"
        );
        r
    };
    let r = run(&which("sha256sum"), &["shared/big.txt", "big.txt"]);
    // The shared one is opened where it runs; the other is home's.
    assert_eq!(r.opened_here, 1, "{r:?}");
    let r = run(&which("python3"), &["-c", PY_SHARED]);
    assert!(r.opened_here >= 3, "{r:?}");
}
