//! Who is on the other end of a control connection, taken from the socket itself
//! (SO_PEERCRED, SO_PEERGROUPS, SO_PEERPIDFD), never from /proc by a PID that may have been
//! reused.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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

/// Why the caller's credentials could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot read the caller's credentials from the socket: {0}")]
    Socket(std::io::Error),
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
}

/// Whether the process behind `pidfd` still exists (a zombie counts: it still holds its
/// PID).
pub fn alive(pidfd: &OwnedFd) -> bool {
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
        match &p.pidfd {
            PeerPidfd::Open(fd) => assert!(alive(fd)),
            PeerPidfd::Unsupported => {}
            PeerPidfd::Gone => panic!("we are alive"),
        }
    }
}
