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
