//! A job's checkpoint files (`mosrun -C FILE`: FILE.1, FILE.2, ..., the last [`KEEP`]
//! kept), written and read with the file-system rights of the job's owner, never as root.
//!
//! A checkpoint file is the process's image (mosix-ckpt's format, every descriptor
//! recorded as held at home) followed by what home knows of the job at that moment
//! ([`CkptInfo`], JSON: its descriptors at home with paths and offsets, the deputy's mark,
//! ...), the JSON's length (u64 LE) and the magic [`MAGIC`]:
//!
//! ```text
//! [image][info JSON][json length: u64 LE]["MOSXJOB\x01"]
//! ```
//!
//! Written to a temporary file beside FILE.N (`.FILE.N.TAG.tmp`), synced, then renamed: a
//! reader never sees half a checkpoint under its final name. The writer holds its temporary
//! file locked (flock) while it has it open; a temporary file of FILE that nobody holds
//! locked is one whose writer died (a mosixd killed in the middle of a checkpoint), and
//! is removed when the next checkpoint of FILE begins.

use mosix_remote::wire::{FdType, HomeFd};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The last bytes of a checkpoint file.
pub const MAGIC: &[u8; 8] = mosix_proto::control::CHECKPOINT_MAGIC;
/// Checkpoints kept per job: FILE.N and the two before it.
pub const KEEP: u32 = 3;
/// The most bytes of JSON a reader takes.
const MAX_INFO: u64 = 16 << 20;

/// What home knows of a job at one of its checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CkptInfo {
    pub home: u32,
    pub home_pid: i32,
    pub uid: u32,
    pub cmd: String,
    /// Its number (the N of FILE.N).
    pub number: u64,
    /// When it was taken (ms since the Unix epoch), and on which node the process ran.
    pub taken_unix_ms: u64,
    pub node: u32,
    /// The deputy's mark of it (taken away from home, or at a move from home): only then
    /// can it be recovered automatically.
    pub mark: Option<u64>,
    /// Its descriptors at home then.
    pub fds: Vec<HomeFd>,
    /// Its descriptors that were files of its own /proc where it ran.
    pub proc_fds: Vec<(i32, String)>,
    /// Its own no_new_privs.
    pub no_new_privs: bool,
    /// `mosrun -C FILE -A MINUTES` of the job (for `mosrun -R` to go on with).
    pub base: String,
    pub every_min: Option<f64>,
    pub memory_bytes: u64,
    /// Its working directory at home then (the image's is where it ran, which away is not
    /// its home's); None in files of older versions.
    #[serde(default)]
    pub cwd: Option<String>,
}

/// Whose files they are: the job's owner (uid, gid and supplementary groups).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Owner {
    /// The owner of process `pid` as its credentials are now (real uid and gid, groups).
    pub fn of_process(pid: i32) -> io::Result<Owner> {
        let st = mosix_ckpt::procfs::status(pid).map_err(io::Error::other)?;
        let first = |k: &str| -> Option<u32> { st.get(k)?.split_whitespace().next()?.parse().ok() };
        let (Some(uid), Some(gid)) = (first("Uid"), first("Gid")) else {
            return Err(io::Error::other(format!(
                "process {pid} has no credentials"
            )));
        };
        let groups = mosix_ckpt::procfs::id_list(st.get("Groups"));
        Ok(Owner { uid, gid, groups })
    }
}

/// Runs `f` in a thread of its own whose file-system identity is `o`'s (fsuid, fsgid,
/// supplementary groups): every path it looks up and every file it creates is as if `o`
/// did it (root's file-system capabilities are dropped with a non-zero fsuid). Other
/// threads are untouched: the raw system calls change the calling thread only.
pub fn as_user<T: Send>(o: &Owner, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            become_fs(o)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("a file thread panicked")))
    })
}

fn become_fs(o: &Owner) -> io::Result<()> {
    // SAFETY: raw setgroups/setfsgid/setfsuid change this thread's credentials only
    // (glibc's wrappers would change every thread's); the list outlives the call.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, o.groups.len(), o.groups.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::syscall(libc::SYS_setfsgid, o.gid);
        libc::syscall(libc::SYS_setfsuid, o.uid);
        // Both calls report the previous value, never an error: read them back.
        let gid = libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32;
        let uid = libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32;
        if uid != o.uid || gid != o.gid {
            return Err(io::Error::other(format!(
                "cannot take the file-system identity of uid {} gid {}",
                o.uid, o.gid
            )));
        }
    }
    Ok(())
}

/// Where a job's checkpoint N goes.
#[derive(Clone, Debug)]
pub struct Target {
    /// FILE of `mosrun -C FILE` (absolute).
    pub base: PathBuf,
    pub number: u64,
    pub owner: Owner,
}

/// A checkpoint being written (a temporary file beside its final name).
#[derive(Debug)]
pub struct Temp {
    pub file: File,
    path: PathBuf,
}

/// FILE.N for `base` and `n`.
pub fn numbered(base: &Path, n: u64) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl Target {
    pub fn path(&self) -> PathBuf {
        numbered(&self.base, self.number)
    }

    /// Creates the temporary file (mode 0600, the owner's), in FILE's directory.
    pub fn create(&self) -> io::Result<Temp> {
        let fin = self.path();
        let dir = fin
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("/"))
            .to_path_buf();
        let name = fin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base_name = self
            .base
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        as_user(&self.owner, || {
            sweep(&dir, &base_name);
            for _ in 0..16 {
                let mut r = [0u8; 6];
                let _ = getrandom::fill(&mut r);
                let tag: String = r.iter().map(|b| format!("{b:02x}")).collect();
                let path = dir.join(format!(".{name}.{tag}.tmp"));
                match std::fs::OpenOptions::new()
                    .write(true)
                    .read(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
                    .open(&path)
                {
                    Ok(file) => {
                        // Its writer's for as long as it is open (see [`sweep`]); a new
                        // file nobody else holds yet.
                        file.lock()?;
                        return Ok(Temp { file, path });
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("cannot create a file in {}: {e}", dir.display()),
                        ))
                    }
                }
            }
            Err(io::Error::other(format!(
                "cannot make a temporary file in {}",
                dir.display()
            )))
        })
    }

    /// Ends `t` with `info`, syncs it and gives it its final name; the checkpoint
    /// [`KEEP`] before it is removed. Its final path.
    pub fn finish(&self, t: Temp, info: &CkptInfo) -> io::Result<PathBuf> {
        let json = serde_json::to_vec(info).map_err(io::Error::other)?;
        let mut f = &t.file;
        f.seek(SeekFrom::End(0))?;
        f.write_all(&json)?;
        f.write_all(&(json.len() as u64).to_le_bytes())?;
        f.write_all(MAGIC)?;
        if let Err(e) = f.sync_all() {
            self.discard(t);
            return Err(e);
        }
        let fin = self.path();
        let old = (self.number > u64::from(KEEP))
            .then(|| numbered(&self.base, self.number - u64::from(KEEP)));
        let tmp = t.path.clone();
        let r = as_user(&self.owner, || {
            std::fs::rename(&tmp, &fin).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot write {}: {e}", fin.display()))
            })?;
            if let Some(o) = &old {
                let _ = std::fs::remove_file(o);
            }
            Ok(())
        });
        if r.is_err() {
            self.discard(t);
        }
        r.map(|_| fin)
    }

    /// Removes a temporary file that will not be a checkpoint.
    pub fn discard(&self, t: Temp) {
        let p = t.path;
        drop(t.file);
        let _ = as_user(&self.owner, || std::fs::remove_file(&p));
    }
}

/// Removes the temporary files of checkpoints of FILE (named `base_name`) in `dir` that no
/// writer holds: left by a mosixd that died while writing one. Run with the owner's rights.
fn sweep(dir: &Path, base_name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{base_name}.");
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(mid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
        else {
            continue;
        };
        // N.TAG: a checkpoint number and the twelve hex digits of `Target::create`.
        let ours = mid.split_once('.').is_some_and(|(n, tag)| {
            n.parse::<u64>().is_ok()
                && tag.len() == 12
                && tag.bytes().all(|b| b.is_ascii_hexdigit())
        });
        if !ours || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = e.path();
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        // Locked by its writer while being written; ours now: nobody writes it.
        if f.try_lock().is_ok() {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The first number from `from` on after which no FILE.N exists (up to a few gaps), as
/// `o` sees them.
pub fn next_free(base: &Path, from: u64, o: &Owner) -> u64 {
    let b = base.to_path_buf();
    as_user(o, move || {
        let mut last = from.saturating_sub(1);
        let mut n = from;
        while n < last + 1 + 2 * u64::from(KEEP) + 8 {
            if numbered(&b, n).exists() {
                last = n;
            }
            n += 1;
        }
        Ok(last + 1)
    })
    .unwrap_or(from)
}

/// Why a file is not a checkpoint of a job.
fn bad(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is not a checkpoint of a migratable job: {why}",
            path.display()
        ),
    )
}

/// An open checkpoint: its image is the first `image_len` bytes of `file`.
pub struct Opened {
    pub file: File,
    pub image_len: u64,
    pub info: CkptInfo,
    /// The file's owner and mode (for `mosrun -R`'s trust rules).
    pub file_uid: u32,
    pub file_mode: u32,
}

/// Whether `file` ends as a checkpoint of a job does (for `mosix restart` to say so).
pub fn is_checkpoint(file: &mut File) -> bool {
    let mut m = [0u8; 8];
    file.seek(SeekFrom::End(-8)).is_ok() && file.read_exact(&mut m).is_ok() && &m == MAGIC
}

/// Opens checkpoint `path` as `o` (a regular file, not followed into a FIFO or device)
/// and reads what it says of the job.
pub fn open(path: &Path, o: &Owner) -> io::Result<Opened> {
    let p = path.to_path_buf();
    let file = as_user(o, move || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&p)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", p.display())))
    })?;
    read_opened(path, file)
}

/// Reads what an opened checkpoint file says of its job.
pub fn read_opened(path: &Path, mut file: File) -> io::Result<Opened> {
    use std::os::unix::fs::MetadataExt;
    let md = file.metadata()?;
    let ft = md.file_type();
    if !ft.is_file() {
        let kind = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(bad(path, &format!("it is {kind}")));
    }
    let len = md.len();
    if len < 16 {
        return Err(bad(path, "it is too short"));
    }
    let mut tail = [0u8; 16];
    file.seek(SeekFrom::Start(len - 16))?;
    file.read_exact(&mut tail)?;
    if &tail[8..] != MAGIC {
        return Err(bad(
            path,
            "it does not end as one (an image of `mosix checkpoint`? use `mosix restart`)",
        ));
    }
    let jl = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
    if jl > MAX_INFO || jl > len - 16 {
        return Err(bad(path, "its description is damaged"));
    }
    let mut json = vec![0u8; jl as usize];
    file.seek(SeekFrom::Start(len - 16 - jl))?;
    file.read_exact(&mut json)?;
    let info: CkptInfo = serde_json::from_slice(&json)
        .map_err(|e| bad(path, &format!("its description is damaged: {e}")))?;
    Ok(Opened {
        file,
        image_len: len - 16 - jl,
        info,
        file_uid: md.uid(),
        file_mode: md.mode(),
    })
}

/// The descriptors of process `pid` as /proc shows them (it must not change meanwhile:
/// frozen).
pub fn home_fds(pid: i32) -> Vec<HomeFd> {
    let Ok(fds) = mosix_ckpt::procfs::fds(pid) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for f in fds {
        let mode = std::fs::metadata(format!("/proc/{pid}/fd/{}", f.fd))
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.mode()
            })
            .unwrap_or(0);
        let kind = mosix_remote::marks::fd_type(mode);
        let pos = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", f.fd))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("pos:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            });
        out.push(HomeFd {
            fd: f.fd,
            path: f.target.clone(),
            kind,
            flags: f.flags & !libc::O_CLOEXEC,
            pos: matches!(kind, FdType::File | FdType::Dir)
                .then_some(pos)
                .flatten(),
            cloexec: f.flags & libc::O_CLOEXEC != 0,
        });
    }
    out
}

/// Milliseconds since the Unix epoch now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `ms` since the Unix epoch as local time of day, HH:MM:SS.
pub fn time_of_day(ms: u64) -> String {
    let t = (ms / 1000) as libc::time_t;
    // SAFETY: localtime_r fills the struct we pass from a time we give.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return format!("{}s", ms / 1000);
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Owner {
        Owner::of_process(std::process::id() as i32).unwrap()
    }

    fn info(n: u64) -> CkptInfo {
        CkptInfo {
            home: 1,
            home_pid: 42,
            uid: 0,
            cmd: "job".into(),
            number: n,
            taken_unix_ms: 1,
            node: 2,
            mark: Some(n),
            fds: vec![HomeFd {
                fd: 1,
                path: "/tmp/out".into(),
                kind: FdType::File,
                flags: libc::O_WRONLY,
                pos: Some(12),
                cloexec: false,
            }],
            proc_fds: vec![],
            no_new_privs: false,
            base: "/tmp/x".into(),
            every_min: Some(0.5),
            memory_bytes: 3,
            cwd: Some("/home/u/work".into()),
        }
    }

    #[test]
    fn checkpoints_are_written_whole_numbered_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("job.ckpt");
        for n in 1..=5 {
            let t = Target {
                base: base.clone(),
                number: n,
                owner: me(),
            };
            let tmp = t.create().unwrap();
            (&tmp.file).write_all(b"IMAGE BYTES").unwrap();
            let p = t.finish(tmp, &info(n)).unwrap();
            assert_eq!(p, numbered(&base, n));
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // The last KEEP, and no temporary file left.
        assert_eq!(names, ["job.ckpt.3", "job.ckpt.4", "job.ckpt.5"]);
        let o = open(&numbered(&base, 5), &me()).unwrap();
        assert_eq!(o.info, info(5));
        let all = std::fs::read(numbered(&base, 5)).unwrap();
        assert_eq!(&all[..o.image_len as usize], b"IMAGE BYTES");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(numbered(&base, 5))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut f = File::open(numbered(&base, 4)).unwrap();
        assert!(is_checkpoint(&mut f));
    }

    #[test]
    fn temporary_files_of_a_writer_that_died_are_removed_not_those_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("job.ckpt");
        let t = |number| Target {
            base: base.clone(),
            number,
            owner: me(),
        };
        // Left by a mosixd killed in the middle of checkpoint 4 (nobody holds it).
        let stale = dir.path().join(".job.ckpt.4.0123456789ab.tmp");
        std::fs::write(&stale, b"HALF AN IMAGE").unwrap();
        // Not a temporary file of ours, though it looks alike.
        let other = dir.path().join(".job.ckpt.4.notours.tmp");
        std::fs::write(&other, b"x").unwrap();
        let live = t(5).create().unwrap();
        assert!(!stale.exists(), "the dead writer's file is left");
        // Again, with checkpoint 5 being written meanwhile (another job, same FILE).
        std::fs::write(&stale, b"HALF AN IMAGE").unwrap();
        let next = t(6).create().unwrap();
        assert!(!stale.exists(), "the dead writer's file is left");
        assert!(other.exists());
        assert!(live.path.exists(), "a file being written was removed");
        t(5).finish(live, &info(5)).unwrap();
        t(6).finish(next, &info(6)).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [".job.ckpt.4.notours.tmp", "job.ckpt.5", "job.ckpt.6"]
        );
    }

    #[test]
    fn damaged_or_foreign_files_are_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        for (bytes, want) in [
            (b"short".to_vec(), "too short"),
            (vec![0u8; 100], "does not end as one"),
            (
                [&[0u8; 10][..], &(u64::MAX).to_le_bytes()[..], &MAGIC[..]].concat(),
                "damaged",
            ),
            (
                [&b"{bad json"[..], &9u64.to_le_bytes()[..], &MAGIC[..]].concat(),
                "damaged",
            ),
        ] {
            std::fs::write(&p, &bytes).unwrap();
            let e = open(&p, &me()).err().expect("refused");
            assert!(e.to_string().contains(want), "{e}");
            assert_eq!(e.to_string().lines().count(), 1);
        }
        let e = open(dir.path(), &me()).err().unwrap();
        assert!(e.to_string().contains("directory"), "{e}");
        let e = open(&dir.path().join("none"), &me()).err().unwrap();
        assert!(e.to_string().contains("cannot open"), "{e}");
    }

    #[test]
    fn a_users_checkpoint_is_written_and_read_with_the_users_rights() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let nobody = Owner {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        };
        // Root's directory, not writable by nobody: refused, though mosixd is root.
        let t = Target {
            base: dir.path().join("x"),
            number: 1,
            owner: nobody.clone(),
        };
        let e = t.create().expect_err("refused");
        assert!(e.to_string().contains("Permission denied"), "{e}");
        // In nobody's directory: nobody's file.
        let sub = dir.path().join("nobody");
        std::fs::create_dir(&sub).unwrap();
        std::os::unix::fs::chown(&sub, Some(65534), Some(65534)).unwrap();
        let t = Target {
            base: sub.join("x"),
            number: 1,
            owner: nobody.clone(),
        };
        let tmp = t.create().unwrap();
        let p = t.finish(tmp, &info(1)).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!((md.uid(), md.gid()), (65534, 65534));
        // Root's private file cannot be read as nobody's checkpoint.
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"x").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = open(&secret, &nobody).err().unwrap();
        assert!(e.to_string().contains("Permission denied"), "{e}");
    }
}
