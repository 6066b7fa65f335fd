//! How a mover's image reaches mosixd: through a pipe given the pages of a ring of the
//! mover's ([`mosix_remote::splice::RingWriter`]: no copy into pages the kernel takes for
//! a socket message), whose read end the mover passes to mosixd when it starts; or, if it
//! has none, on its connection as before. See docs/migration.md ("The mover's image
//! through a pipe of pages").

use std::io::Write;
use std::os::unix::net::UnixStream;

/// Where a mover writes its image: a pipe given the pages of a ring
/// ([`mosix_remote::splice::RingWriter`]) or its connection to mosixd; and where it
/// writes the image's marks (the same stream, another handle: the pipe, or the
/// connection).
pub(super) enum Sink {
    Ring(mosix_remote::splice::RingWriter),
    Pipe(std::fs::File),
    Conn(UnixStream),
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Ring(w) => w.write(b),
            Sink::Pipe(f) => f.write(b),
            Sink::Conn(c) => c.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Ring(w) => w.flush(),
            Sink::Pipe(f) => f.flush(),
            Sink::Conn(c) => c.flush(),
        }
    }
}

/// The first thing a mover sends once it has its `Start`: one byte, 1 with the read end
/// of a pipe its image will go through (SCM_RIGHTS), or 0 if it has none (then the image
/// comes on the connection). The pipe's write end, if it was sent.
pub(super) fn offer_pipe(conn: &UnixStream) -> Option<std::os::fd::OwnedFd> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let made = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok();
    let fds: Vec<i32> = made.iter().map(|(r, _)| r.as_raw_fd()).collect();
    let byte = [u8::from(made.is_some())];
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(
        conn.as_raw_fd(),
        &[std::io::IoSlice::new(&byte)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    );
    match (made, sent) {
        (Some((_, w)), Ok(_)) => Some(w),
        _ => None,
    }
}

/// mosixd's end of [`offer_pipe`]: the pipe the image comes through, or None (it comes
/// on the connection).
pub(super) fn take_pipe(conn: &UnixStream) -> std::io::Result<Option<std::fs::File>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut fds = Vec::new();
    let n = {
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let msg = loop {
            match recvmsg::<()>(
                conn.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r?,
            }
        };
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(got) = c {
                fds.extend(got);
            }
        }
        msg.bytes
    };
    // SAFETY: descriptors just received, ours alone.
    let mut fds: Vec<OwnedFd> = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(match (byte[0], fds.len()) {
        (1, 1) => fds.pop().map(std::fs::File::from),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The pipe offered is the pipe taken: what the mover writes into it, mosixd reads;
    /// a mover with no pipe says so (the image then comes on the connection); a mover
    /// gone before it said anything is an error, not a pipe-less image.
    #[test]
    fn the_pipe_offered_is_the_pipe_taken() {
        let (mover, daemon) = UnixStream::pair().unwrap();
        let w = offer_pipe(&mover).expect("a pipe");
        let mut r = take_pipe(&daemon).unwrap().expect("the pipe's read end");
        std::fs::File::from(w).write_all(b"image").unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"image");

        let (mut mover, daemon) = UnixStream::pair().unwrap();
        mover.write_all(&[0]).unwrap();
        assert!(take_pipe(&daemon).unwrap().is_none());

        let (mover, daemon) = UnixStream::pair().unwrap();
        drop(mover);
        assert!(take_pipe(&daemon).is_err());
    }
}
