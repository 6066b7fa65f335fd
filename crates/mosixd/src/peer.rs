//! Who is on the other end of a control connection, taken from the socket itself
//! (SO_PEERCRED, SO_PEERGROUPS, SO_PEERPIDFD), never from /proc by a PID that may have been
//! reused; and the caller's context (umask, resource limits, cgroup) that a job it starts
//! must get, read through a pidfd so that the process read is the one that connected.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// The resource limits a process has (RLIMIT_CPU .. RLIMIT_RTTIME, Linux 2.6.25 on).
const RLIMITS: u32 = 16;
/// SO_PEERGROUPS and SO_PEERPIDFD (asm-generic values, x86_64).
const SO_PEERGROUPS: libc::c_int = 59;
const SO_PEERPIDFD: libc::c_int = 77;

/// The credentials of a connected Unix socket's peer, as the kernel recorded them at
/// connect() time.
#[derive(Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub groups: Vec<u32>,
    /// The process that connected, as a pidfd (SO_PEERPIDFD, Linux 6.5+).
    pub pidfd: PeerPidfd,
}

#[derive(Debug)]
pub enum PeerPidfd {
    Open(OwnedFd),
    /// The process that connected has already exited.
    Gone,
    /// The kernel has no SO_PEERPIDFD: the PID is all there is.
    Unsupported,
}

/// The caller's process context that a job it starts inherits, as a child of the caller
/// would.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Context {
    pub umask: u32,
    /// (resource, soft, hard) for every resource limit.
    pub rlimits: Vec<(u32, u64, u64)>,
    /// The caller's cgroups, one per hierarchy, as /proc/PID/cgroup lists them:
    /// (controllers, e.g. `cpu,cpuacct` or `name=systemd`, empty for v2; path below the
    /// hierarchy's root).
    pub cgroups: Vec<(String, PathBuf)>,
}

impl Context {
    /// Opens (for writing) the `cgroup.procs` of each of the caller's cgroups that is
    /// mounted here and differs from this daemon's, so that a child writing `0` to them
    /// joins the caller's cgroups.
    pub fn open_cgroup_procs(&self) -> std::io::Result<Vec<std::fs::File>> {
        let mounts = cgroup_mounts();
        let own = parse_cgroups(&std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
        let mut out = Vec::new();
        for (ctrl, path) in &self.cgroups {
            if own.iter().any(|(c, p)| c == ctrl && p == path) {
                continue;
            }
            let Some(dir) = hierarchy_dir(&mounts, ctrl, path) else {
                continue;
            };
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
            out.push(f);
        }
        Ok(out)
    }
}

/// Parses /proc/PID/limits: a header, then one row per resource in the kernel's order
/// (RLIMIT_CPU = 0 ...), each `NAME  SOFT  HARD  [UNITS]` with `unlimited` for infinity.
fn parse_limits(text: &str) -> Option<Vec<(u32, u64, u64)>> {
    let num = |w: &str| -> Option<u64> {
        if w == "unlimited" {
            Some(libc::RLIM_INFINITY)
        } else {
            w.parse().ok()
        }
    };
    let mut out = Vec::new();
    for (res, line) in text.lines().skip(1).enumerate() {
        // The name has spaces; the numbers are the first two numeric-or-unlimited words.
        let vals: Vec<u64> = line.split_whitespace().filter_map(num).collect();
        if vals.len() < 2 {
            return None;
        }
        out.push((res as u32, vals[0], vals[1]));
    }
    (out.len() >= RLIMITS as usize).then(|| {
        out.truncate(RLIMITS as usize);
        out
    })
}

/// Parses /proc/PID/cgroup: `ID:CONTROLLERS:PATH` lines.
fn parse_cgroups(text: &str) -> Vec<(String, PathBuf)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrl = it.next()?;
            let path = it.next()?;
            Some((ctrl.to_string(), PathBuf::from(path)))
        })
        .collect()
}

/// A cgroup mount: (v1 super options or None for v2, root within the hierarchy, mount
/// point).
type CgMount = (Option<Vec<String>>, PathBuf, PathBuf);

fn cgroup_mounts() -> Vec<CgMount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for l in text.lines() {
        let Some((pre, post)) = l.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = pre.split(' ').collect();
        let g: Vec<&str> = post.split(' ').collect();
        if f.len() < 5 || g.len() < 3 {
            continue;
        }
        let (root, point) = (PathBuf::from(f[3]), PathBuf::from(f[4]));
        match g[0] {
            "cgroup2" => out.push((None, root, point)),
            "cgroup" => out.push((
                Some(g[2].split(',').map(str::to_string).collect()),
                root,
                point,
            )),
            _ => {}
        }
    }
    out
}

/// Where the cgroup `path` of the hierarchy with controllers `ctrl` is mounted here.
fn hierarchy_dir(mounts: &[CgMount], ctrl: &str, path: &Path) -> Option<PathBuf> {
    for (opts, root, point) in mounts {
        let matches = match opts {
            None => ctrl.is_empty(),
            Some(o) => !ctrl.is_empty() && ctrl.split(',').all(|c| o.iter().any(|x| x == c)),
        };
        if !matches {
            continue;
        }
        let rel = path.strip_prefix(root).ok()?;
        let dir = point.join(rel);
        // No `..` or other tricks: the path must stay below the mount point.
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return None;
        }
        return Some(dir);
    }
    None
}

/// Why the caller's credentials or context could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot read the caller's credentials from the socket: {0}")]
    Socket(std::io::Error),
    #[error("the calling process has gone")]
    Gone,
    #[error("cannot read the caller's {what}: {err}")]
    Proc {
        what: &'static str,
        err: std::io::Error,
    },
}

fn getsockopt_buf(fd: RawFd, opt: libc::c_int, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes and the kernel writes at most `len` bytes,
    // storing the length it wrote in `len`.
    let r =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, buf.as_mut_ptr().cast(), &mut len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(len as usize)
}

impl Peer {
    /// Reads the peer's credentials from a connected Unix stream socket.
    pub fn of(sock: &impl AsRawFd) -> Result<Peer, PeerError> {
        let fd = sock.as_raw_fd();
        let mut cred = [0u8; std::mem::size_of::<libc::ucred>()];
        getsockopt_buf(fd, libc::SO_PEERCRED, &mut cred).map_err(PeerError::Socket)?;
        // SAFETY: `cred` holds a struct ucred the kernel filled (plain integers, any bit
        // pattern valid); read_unaligned copes with the byte buffer's alignment.
        let cred: libc::ucred = unsafe { std::ptr::read_unaligned(cred.as_ptr().cast()) };
        // Supplementary groups: room for the usual few first, for NGROUPS_MAX (65536)
        // only if the kernel says that is too small (ERANGE).
        let mut buf = vec![0u8; 4 * 64];
        let n = match getsockopt_buf(fd, SO_PEERGROUPS, &mut buf) {
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
                buf = vec![0u8; 4 * 65536];
                getsockopt_buf(fd, SO_PEERGROUPS, &mut buf)
            }
            other => other,
        }
        .map_err(PeerError::Socket)?;
        let groups = buf[..n]
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut pfd = [0u8; 4];
        let pidfd = match getsockopt_buf(fd, SO_PEERPIDFD, &mut pfd) {
            Ok(4) if i32::from_ne_bytes(pfd) >= 0 => {
                // SAFETY: SO_PEERPIDFD returned a new descriptor that we now own.
                PeerPidfd::Open(unsafe { OwnedFd::from_raw_fd(i32::from_ne_bytes(pfd)) })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => PeerPidfd::Unsupported,
            _ => PeerPidfd::Gone,
        };
        Ok(Peer {
            uid: cred.uid,
            gid: cred.gid,
            pid: (cred.pid > 0).then_some(cred.pid),
            groups,
            pidfd,
        })
    }

    /// The caller's umask, resource limits and cgroup. Read from /proc by PID, then
    /// checked through the pidfd taken at connect time: if that process is still alive,
    /// its PID cannot have been given to another process meanwhile, so what was read is
    /// its own. Without a pidfd (kernel before 6.5) the PID is trusted as it is.
    pub fn context(&self) -> Result<Context, PeerError> {
        let pid = self.pid.ok_or(PeerError::Gone)?;
        if matches!(self.pidfd, PeerPidfd::Gone) {
            return Err(PeerError::Gone);
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PeerError::Gone
            } else {
                PeerError::Proc {
                    what: "status",
                    err: e,
                }
            }
        })?;
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .unwrap_or(0o022);
        // /proc/PID/limits rather than prlimit(): reading another user's limits through
        // prlimit needs CAP_SYS_RESOURCE, which a daemon may well not have.
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).map_err(|e| {
            PeerError::Proc {
                what: "resource limits",
                err: e,
            }
        })?;
        let rlimits = parse_limits(&limits).ok_or_else(|| PeerError::Proc {
            what: "resource limits",
            err: std::io::Error::other("unreadable /proc/PID/limits"),
        })?;
        let cgroups = parse_cgroups(
            &std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default(),
        );
        if let PeerPidfd::Open(pidfd) = &self.pidfd {
            if !alive(pidfd) {
                return Err(PeerError::Gone);
            }
        }
        Ok(Context {
            umask,
            rlimits,
            cgroups,
        })
    }
}

/// Whether the process behind `pidfd` still exists (a zombie counts: it still holds its
/// PID).
fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 only checks that the process exists and
    // may be signalled; the descriptor is ours and valid.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Marks every descriptor from 3 up close-on-exec (the daemon's own, and whatever it
/// inherited from whoever started it), so that nothing of the daemon's leaks into a job.
pub fn cloexec_all_from_3() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on open descriptors.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_of_a_socketpair_is_ourselves() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = Peer::of(&a).unwrap();
        assert_eq!(p.uid, nix::unistd::getuid().as_raw());
        assert_eq!(p.gid, nix::unistd::getgid().as_raw());
        assert_eq!(p.pid, Some(std::process::id() as i32));
        let mine: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = p.groups.clone();
        got.sort();
        let mut want = mine;
        want.sort();
        assert_eq!(got, want);
        let ctx = p.context().unwrap();
        assert_eq!(ctx.rlimits.len(), RLIMITS as usize);
        let nofile = ctx
            .rlimits
            .iter()
            .find(|r| r.0 == libc::RLIMIT_NOFILE)
            .unwrap();
        let own =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!((nofile.1, nofile.2), own);
    }
}
