//! `mosix restart` run by root must not trust the image it is given: an image's
//! credentials and paths are those of the user who could have written it (issue 9, item
//! 4), and an image path that is a FIFO, socket or device is refused at once (item 8).
//!
//! The victim process runs as nobody (65534); root checkpoints it (a user cannot: the
//! checkpoint reads /proc/PID/map_files, which needs CAP_CHECKPOINT_RESTORE), and the
//! image file is then given to nobody, as if nobody had written it: the checksums are not
//! keyed, so a user can write any image they like. Run as root.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::channel;
use std::sync::OnceLock;
use std::time::Duration;

use mosix_ckpt::image::{Fd, FdKind, FileId, ImageWriter, ProcessImage};

const MOSIX: &str = env!("CARGO_BIN_EXE_mosix");
/// Upper bound for any one wait (a hang fails the test instead of blocking CI).
const PATIENCE: Duration = Duration::from_secs(120);
const NOBODY: u32 = 65534;

/// Builds whoami as `bin`. (Built, not copied: a copy would be written by this process,
/// and a child forked meanwhile by another test thread would hold the file open for
/// writing, making its exec fail with ETXTBSY.)
fn build_whoami(bin: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/progs/whoami.c");
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(bin)
        .arg(src)
        .status()
        .expect("cc runs");
    assert!(st.success(), "building whoami.c");
}

fn whoami_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("trustprogs");
        std::fs::create_dir_all(&out).unwrap();
        let bin = out.join("whoami");
        build_whoami(&bin);
        bin
    })
}

/// Only 0, 1, 2 in the child: stray descriptors of the test runner would make the
/// checkpoint refuse.
fn clean_fds(cmd: &mut Command) -> &mut Command {
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}

fn as_nobody(cmd: &mut Command) -> &mut Command {
    // std drops the supplementary groups when it changes uid as root.
    cmd.uid(NOBODY).gid(NOBODY)
}

/// Runs `cmd` to its end with stdin from /dev/null (unless set), failing the test if it
/// does not end within PATIENCE (a hang).
fn run(mut cmd: Command) -> Output {
    let child = clean_fds(&mut cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosix runs");
    let pid = child.id() as i32;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            // SAFETY: kill of our own child; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{cmd:?} did not end (it hangs)");
        }
    }
}

fn mosix(args: &[&str]) -> Command {
    let mut c = Command::new(MOSIX);
    c.args(args).stdin(Stdio::null());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A failure of one line that contains every one of `words`, and nothing started.
fn assert_refused(o: &Output, words: &[&str]) {
    let err = text(&o.stderr);
    assert!(!o.status.success(), "must fail; said {err:?}");
    assert!(o.stdout.is_empty(), "a process ran: {:?}", text(&o.stdout));
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    for w in words {
        assert!(err.contains(w), "said {err:?}, wanted {w:?}");
    }
}

/// The "end ..." line a restored whoami prints, asserting a clean exit.
fn end_line(o: &Output) -> String {
    assert!(
        o.status.success(),
        "restart failed: {} {}",
        o.status,
        text(&o.stderr)
    );
    let out = text(&o.stdout);
    out.lines()
        .find(|l| l.starts_with("end "))
        .unwrap_or_else(|| panic!("no end line in {out:?}"))
        .to_string()
}

/// One "Key=value" field of a whoami line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// A whoami process checkpointed while waiting for input, its image in `dir` (owned by
/// nobody and given to nobody).
struct Victim {
    dir: tempfile::TempDir,
    /// Its own copy of whoami, so that leftovers of one test are told apart.
    exe: PathBuf,
    img: PathBuf,
    /// What it printed first.
    start: String,
}

impl Victim {
    /// `wrap`: a command (and its arguments) the program is run under, e.g. setpriv.
    fn new(nobody: bool, wrap: &[&str]) -> Victim {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        let exe = dir.path().join("who");
        build_whoami(&exe);
        let mut cmd = match wrap.split_first() {
            Some((w, args)) => {
                let mut c = Command::new(w);
                c.args(args).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        if nobody {
            as_nobody(&mut cmd);
        }
        let mut child: Child = clean_fds(&mut cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("whoami starts");
        let _stdin: ChildStdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut start = String::new();
        out.read_line(&mut start).unwrap();
        assert!(start.starts_with("start "), "whoami said {start:?}");
        let img = dir.path().join("job.img");
        let o = run(mosix(&[
            "checkpoint",
            &child.id().to_string(),
            "-o",
            img.to_str().unwrap(),
        ]));
        assert!(o.status.success(), "checkpoint: {}", text(&o.stderr));
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        std::os::unix::fs::chown(&img, Some(NOBODY), Some(NOBODY)).unwrap();
        Victim {
            dir,
            exe,
            img,
            start,
        }
    }

    fn img(&self) -> &str {
        self.img.to_str().unwrap()
    }

    /// Rewrites the image with `edit` applied to its metadata, with valid checksums,
    /// in place (the file keeps its owner).
    fn edit(&self, edit: impl FnOnce(&mut ProcessImage)) {
        let img = mosix_ckpt::read_image_file(&self.img).unwrap();
        let mut meta = img.meta.clone();
        edit(&mut meta);
        let mut w = ImageWriter::new(Vec::new(), img.compression, &meta).unwrap();
        for p in img.pages() {
            w.pages(p.vaddr, p.data).unwrap();
        }
        let bytes = w.finish().unwrap();
        drop(img);
        std::fs::write(&self.img, bytes).unwrap();
        assert_eq!(std::fs::metadata(&self.img).unwrap().uid(), NOBODY);
    }

    /// No process runs this victim's program (nothing was left behind).
    fn assert_gone(&self) {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(exe) = std::fs::read_link(e.path().join("exe")) {
                assert_ne!(exe, self.exe, "process {:?} left running", e.file_name());
            }
        }
    }
}

fn make_root(m: &mut ProcessImage) {
    m.creds.uid = [0; 4];
    m.creds.gid = [0; 4];
    m.creds.groups = vec![0];
}

#[test]
fn edited_uid_restarts_as_the_owner_of_the_image_file() {
    let v = Victim::new(true, &[]);
    assert!(v.start.contains("uid 65534 65534 gid 65534 65534"));
    v.edit(make_root);
    for args in [vec!["restart"], vec!["restart", "--as-image-owner"]] {
        let mut a = args.clone();
        a.push(v.img());
        let end = end_line(&run(mosix(&a)));
        assert!(
            end.starts_with("end uid 65534 65534 gid 65534 65534"),
            "{args:?}: {end}"
        );
        assert_eq!(field(&end, "CapEff"), "0000000000000000", "{end}");
    }
    // Told to trust it, root restores what the image says.
    let end = end_line(&run(mosix(&["restart", "--trust-image", v.img()])));
    assert!(end.starts_with("end uid 0 0 gid 0 0"), "{end}");
    // An image file of root's is trusted only if no one else may have written it.
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(&v.img, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&v.img, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_refused(&run(mosix(&["restart", v.img()])), &["others may write"]);
    std::fs::set_permissions(&v.img, std::fs::Permissions::from_mode(0o600)).unwrap();
    let end = end_line(&run(mosix(&["restart", v.img()])));
    assert!(end.starts_with("end uid 0 0 gid 0 0"), "{end}");
}

#[test]
fn image_from_stdin_needs_to_be_told_whose_it_is() {
    let v = Victim::new(true, &[]);
    v.edit(make_root);
    let stdin_img = |args: &[&str]| {
        let mut c = mosix(args);
        c.stdin(std::fs::File::open(&v.img).unwrap());
        run(c)
    };
    assert_refused(
        &stdin_img(&["restart", "-"]),
        &["standard input", "--as-user", "--trust-image"],
    );
    let end = end_line(&stdin_img(&["restart", "--as-user", "nobody", "-"]));
    assert!(
        end.starts_with("end uid 65534 65534 gid 65534 65534"),
        "{end}"
    );
    let end = end_line(&stdin_img(&["restart", "--as-user", "65534", "-"]));
    assert!(end.starts_with("end uid 65534 65534"), "{end}");
}

#[test]
fn image_paths_are_opened_with_the_owners_credentials() {
    let v = Victim::new(true, &[]);
    // An open file the owner could not open.
    v.edit(|m| {
        m.fds.push(Fd {
            fd: 7,
            cloexec: false,
            kind: FdKind::File {
                path: "/etc/shadow".into(),
                flags: libc::O_RDWR,
                pos: 0,
                id: None,
            },
        })
    });
    let o = run(mosix(&["restart", v.img()]));
    assert_refused(&o, &["/etc/shadow", "Permission denied"]);
    v.assert_gone();
    // A working directory the owner could not enter.
    v.edit(|m| {
        m.fds.retain(|f| f.fd != 7);
        m.cwd = "/root".into();
    });
    let o = run(mosix(&["restart", v.img()]));
    assert_refused(&o, &["/root", "Permission denied"]);
    v.assert_gone();
    // And with both fixed, it runs (as nobody).
    v.edit(|m| m.cwd = "/".into());
    let end = end_line(&run(mosix(&["restart", v.img()])));
    assert!(end.starts_with("end uid 65534 65534"), "{end}");
}

#[test]
fn reopened_files_are_checked_after_opening() {
    let v = Victim::new(true, &[]);
    // A FIFO where the image has a file: refused, not a restore stuck in open().
    let fifo = v.dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
    v.edit(|m| {
        m.fds.push(Fd {
            fd: 7,
            cloexec: false,
            kind: FdKind::File {
                path: fifo.to_str().unwrap().into(),
                flags: libc::O_RDONLY,
                pos: 0,
                id: None,
            },
        })
    });
    let o = run(mosix(&["restart", v.img()]));
    assert_refused(&o, &[fifo.to_str().unwrap(), "FIFO"]);
    v.assert_gone();
    // A file replaced (another inode at the same path) since the checkpoint.
    let data = v.dir.path().join("data");
    std::fs::write(&data, "one\n").unwrap();
    let md = std::fs::metadata(&data).unwrap();
    let id = FileId {
        dev: md.dev(),
        ino: md.ino(),
        size: md.size(),
        mtime_sec: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
    };
    v.edit(|m| {
        m.fds.retain(|f| f.fd != 7);
        m.fds.push(Fd {
            fd: 7,
            cloexec: false,
            kind: FdKind::File {
                path: data.to_str().unwrap().into(),
                flags: libc::O_RDONLY,
                pos: 0,
                id: Some(id),
            },
        })
    });
    let other = v.dir.path().join("data.new");
    std::fs::write(&other, "two\n").unwrap();
    std::fs::rename(&other, &data).unwrap();
    let o = run(mosix(&["restart", v.img()]));
    assert_refused(&o, &[data.to_str().unwrap(), "not the file it was"]);
    v.assert_gone();
}

#[test]
fn a_user_restarts_only_their_own_images() {
    let v = Victim::new(true, &[]);
    let mut own = mosix(&["restart", v.img()]);
    as_nobody(&mut own);
    let end = end_line(&run(own));
    assert!(end.starts_with("end uid 65534 65534"), "{end}");
    v.edit(make_root);
    let mut foreign = mosix(&["restart", v.img()]);
    as_nobody(&mut foreign);
    assert_refused(&run(foreign), &["uid 0", "65534"]);
    v.assert_gone();
}

#[test]
fn image_path_that_is_a_fifo_socket_or_device_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.img");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let sock = dir.path().join("sock.img");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    for (path, what) in [
        (fifo.to_str().unwrap(), "is a FIFO, not an image file"),
        (sock.to_str().unwrap(), "is a socket, not an image file"),
        ("/dev/zero", "is a character device, not an image file"),
        ("/tmp", "is a directory, not an image file"),
    ] {
        let o = run(mosix(&["restart", path]));
        assert_refused(&o, &[path, what]);
    }
}

/// The capability sets of a process, as whoami prints them.
fn caps(line: &str) -> Vec<String> {
    ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]
        .iter()
        .map(|k| format!("{k}={}", field(line, k)))
        .collect()
}

/// A root process with a reduced capability set comes back with that set, not with
/// full root: the image records its capability sets (format 1.2).
#[test]
fn reduced_capabilities_survive_a_restart() {
    let setpriv = [
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-all,+chown,+dac_override,+kill,+setuid,+setgid",
        "--",
    ];
    let v = Victim::new(false, &setpriv);
    let want = caps(&v.start);
    assert_eq!(field(&v.start, "CapEff"), "00000000000000e3", "{}", v.start);
    std::os::unix::fs::chown(&v.img, Some(0), Some(0)).unwrap();
    let end = end_line(&run(mosix(&["restart", v.img()])));
    assert!(end.starts_with("end uid 0 0"), "{end}");
    assert_eq!(caps(&end), want);
    // The same image written by a user (or edited to claim every capability) restarts
    // as that user, with none: only its bounding set, which can only take away.
    std::os::unix::fs::chown(&v.img, Some(NOBODY), Some(NOBODY)).unwrap();
    v.edit(|m| {
        let c = m.caps.as_mut().expect("the image records capabilities");
        c.permitted = u64::MAX >> 24;
        c.effective = c.permitted;
        c.ambient = c.permitted;
    });
    let end = end_line(&run(mosix(&["restart", v.img()])));
    assert!(end.starts_with("end uid 65534 65534"), "{end}");
    for k in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(&end, k), "0000000000000000", "{k}: {end}");
    }
    assert_eq!(field(&end, "CapBnd"), "00000000000000e3", "{end}");
}

/// The restore side of the same: given the capability sets the process had (as a
/// migration sender can read them before it checkpoints), the restored root process has
/// exactly those, not full root.
#[test]
// The checkpoint kills and reaps the program (our child): no wait() of ours.
#[allow(clippy::zombie_processes)]
fn reduced_capabilities_given_to_the_engine_are_restored() {
    let exe = whoami_bin();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--inh-caps=-all",
        "--bounding-set=-all,+chown,+dac_override,+kill,+setuid,+setgid",
        "--",
    ])
    .arg(exe);
    let mut child = clean_fds(&mut cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("whoami starts");
    let _stdin = child.stdin.take().unwrap();
    let mut start = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut start)
        .unwrap();
    assert_eq!(field(&start, "CapEff"), "00000000000000e3", "{start}");
    let pid = child.id() as i32;
    let had = mosix_ckpt::Caps::of_pid(pid).unwrap();
    let opts = mosix_ckpt::DumpOptions {
        leave_running: false,
        compression: mosix_ckpt::Compression::None,
    };
    let (bytes, _) = mosix_ckpt::checkpoint(pid, Vec::new(), opts, &mut |_, _| {}).unwrap();
    let img = mosix_ckpt::read_image(&bytes[..]).unwrap();
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    use std::os::fd::AsRawFd;
    let creds = mosix_ckpt::CredOptions {
        caps: Some(had),
        ..mosix_ckpt::CredOptions::from_image()
    };
    let new = mosix_ckpt::restore_with(
        &img,
        mosix_ckpt::RestoreOptions {
            stdio: Some([null.as_raw_fd(), wr.as_raw_fd(), 2]),
            ..Default::default()
        },
        &creds,
    )
    .expect("restore");
    drop(wr);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(rd), &mut out).unwrap();
    let mut status = 0;
    // SAFETY: waitpid writes the status int; the process is our child.
    assert_eq!(unsafe { libc::waitpid(new.pid, &mut status, 0) }, new.pid);
    assert_eq!(libc::WEXITSTATUS(status), 0);
    let end = out.lines().find(|l| l.starts_with("end ")).unwrap();
    assert!(end.starts_with("end uid 0 0"), "{end}");
    assert_eq!(caps(end), caps(&start));
}
