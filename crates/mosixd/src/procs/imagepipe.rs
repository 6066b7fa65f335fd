//! How a mover's image reaches the node it goes to. Either relayed by mosixd: through a
//! pipe given the pages of a ring of the mover's ([`mosix_remote::splice::RingWriter`]:
//! no copy into pages the kernel takes for a socket message), whose read end the mover
//! passes to mosixd when it starts, or, if it has none, on its connection; or written by
//! the mover straight into the link to the destination, whose socket and sending side
//! mosixd lends it for the image ([`Way::Link`]; mosixd takes the sending side back,
//! at the count of frames the mover reached). See docs/migration.md ("The mover's image
//! through a pipe of pages", "The mover writes into the link").

use super::mover::{FromMover, ABORTED, FROZEN};
use mosix_proto::transport::{FrameWriter, LentKey};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;

/// Where a mover writes its image: a pipe given the pages of a ring
/// ([`mosix_remote::splice::RingWriter`]), its connection to mosixd, or the link; and
/// where it writes the image's marks when mosixd relays it (the same stream, another
/// handle: the pipe, or the connection).
pub(super) enum Sink {
    Ring(mosix_remote::splice::RingWriter),
    Pipe(std::fs::File),
    Conn(UnixStream),
    /// The link, and whether writing into it failed.
    Link(Box<FrameWriter<TcpStream>>, Rc<Cell<bool>>),
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Ring(w) => w.write(b),
            Sink::Pipe(f) => f.write(b),
            Sink::Conn(c) => c.write(b),
            Sink::Link(l, failed) => l.write(b).inspect_err(|_| failed.set(true)),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Ring(w) => w.flush(),
            Sink::Pipe(f) => f.flush(),
            Sink::Conn(c) => c.flush(),
            Sink::Link(l, failed) => l.flush().inspect_err(|_| failed.set(true)),
        }
    }
}

impl Sink {
    /// Everything written is sent; for the link, the number of its next frame (what
    /// mosixd goes on from).
    pub(super) fn finish(self) -> std::io::Result<Option<u64>> {
        match self {
            Sink::Link(l, failed) => {
                // The mover's handle on the socket closes here; mosixd's stays.
                let (_, nonce) = l.finish().inspect_err(|_| failed.set(true))?;
                Ok(Some(nonce))
            }
            mut other => other.flush().map(|()| None),
        }
    }
}

/// Where a mover puts the marks of its image (frozen now; aborted): into the stream
/// mosixd relays, after what was written before them, or, when it writes into the link
/// itself, on its connection to mosixd (as messages).
pub(super) enum Marks {
    InBand(Sink),
    Told,
}

impl Marks {
    /// It is frozen (what was saved before is on its way).
    pub(super) fn frozen(&mut self, conn: &mut UnixStream) -> std::io::Result<()> {
        match self {
            Marks::InBand(s) => {
                s.write_all(&FROZEN.to_le_bytes())?;
                s.flush()
            }
            Marks::Told => mosix_proto::wire::send_flush(conn, &FromMover::Frozen)
                .map_err(std::io::Error::other),
        }
    }

    /// The image ends here, unfinished (a `Failed` follows on the connection).
    pub(super) fn aborted(&mut self) {
        if let Marks::InBand(s) = self {
            let _ = s.write_all(&ABORTED.to_le_bytes());
        }
    }
}

/// Where mosixd has a mover's image go: what it writes is relayed there; a link may be
/// lent to the mover to write into itself.
pub trait ImageOut: Write {
    /// A duplicate of the link's socket and its sending side, lent to the mover (nothing
    /// is sent on the link until [`ImageOut::take_back`]). None: relayed (a file; a
    /// copy also kept here).
    fn lend(&mut self) -> Option<(OwnedFd, LentKey)> {
        None
    }
    /// The sending side back, at frame number `nonce`.
    fn take_back(&mut self, _nonce: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("nothing was lent"))
    }
}

impl ImageOut for mosix_proto::channel::Channel<TcpStream> {
    fn lend(&mut self) -> Option<(OwnedFd, LentKey)> {
        let fd = self.get_ref().try_clone().ok()?;
        let key = self.lend_sender().ok()?;
        Some((OwnedFd::from(fd), key))
    }
    fn take_back(&mut self, nonce: u64) -> std::io::Result<()> {
        self.take_back_sender(nonce)
    }
}

impl<W: Write> ImageOut for mosix_proto::wire::Unchunk<W> {}

/// mosixd's answer to [`offer_pipe`]: how it takes the image.
pub(super) enum Way {
    /// It relays the image (from the pipe, or the connection).
    Relay,
    /// The mover writes it into the link: its socket (a duplicate) and sending side.
    Link(OwnedFd, LentKey),
}

/// Bytes of a [`Way`] on the connection: 1 (the link) or 0, the key, the nonce (LE).
const WAY_LEN: usize = 1 + 32 + 8;

/// Tells the mover how its image is taken (after [`take_pipe`]; the link's socket goes
/// with SCM_RIGHTS).
pub(super) fn give_way(conn: &UnixStream, way: &Way) -> std::io::Result<()> {
    let mut msg = [0u8; WAY_LEN];
    let mut fd = None;
    if let Way::Link(sock, key) = way {
        msg[0] = 1;
        msg[1..33].copy_from_slice(&key.key);
        msg[33..].copy_from_slice(&key.nonce.to_le_bytes());
        fd = Some(sock.as_raw_fd());
    }
    send_with_fd(conn, &msg, fd)
}

/// Sends `msg` on `conn`, with descriptor `fd` (if any) on its first byte.
fn send_with_fd(conn: &UnixStream, msg: &[u8], fd: Option<RawFd>) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let mut sent = 0;
    while sent < msg.len() {
        let cmsgs: &[ControlMessage] = if sent == 0 && !fds.is_empty() {
            &rights
        } else {
            &[]
        };
        match sendmsg::<()>(
            conn.as_raw_fd(),
            &[std::io::IoSlice::new(&msg[sent..])],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The mover's end of [`give_way`].
pub(super) fn take_way(conn: &UnixStream) -> std::io::Result<Way> {
    let mut msg = [0u8; WAY_LEN];
    let mut fds = recv_with_fds(conn, &mut msg[..1])?;
    (&*conn).read_exact(&mut msg[1..])?;
    match (msg[0], fds.pop()) {
        (0, None) => Ok(Way::Relay),
        (1, Some(fd)) if fds.is_empty() => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&msg[1..33]);
            let nonce = u64::from_le_bytes(msg[33..].try_into().expect("8 bytes"));
            Ok(Way::Link(fd, LentKey { key, nonce }))
        }
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "mosixd's answer about the image is not one",
        )),
    }
}

/// Sends descriptor `fd` on `conn` (with one byte).
pub(super) fn send_fd(conn: &UnixStream, fd: &OwnedFd) -> std::io::Result<()> {
    send_with_fd(conn, &[1], Some(fd.as_raw_fd()))
}

/// The descriptor [`send_fd`] sent.
pub(crate) fn recv_fd(conn: &UnixStream) -> std::io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut fds = recv_with_fds(conn, &mut byte)?;
    match (byte[0], fds.pop()) {
        (1, Some(fd)) if fds.is_empty() => Ok(fd),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "expected one descriptor",
        )),
    }
}

/// Reads `byte` (one byte) from `conn` with the descriptors that came with it.
fn recv_with_fds(conn: &UnixStream, byte: &mut [u8]) -> std::io::Result<Vec<OwnedFd>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut fds = Vec::new();
    let n = {
        let mut iov = [std::io::IoSliceMut::new(byte)];
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
    let fds = fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(fds)
}

/// The first thing a mover sends once it has its `Start`: one byte, 1 with the read end
/// of a pipe its image will go through (SCM_RIGHTS), or 0 if it has none (then the image
/// comes on the connection). The pipe's write end, if it was sent.
pub(super) fn offer_pipe(conn: &UnixStream) -> Option<std::os::fd::OwnedFd> {
    let made = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok();
    let byte = [u8::from(made.is_some())];
    let sent = send_with_fd(conn, &byte, made.as_ref().map(|(r, _)| r.as_raw_fd()));
    match (made, sent) {
        (Some((_, w)), Ok(())) => Some(w),
        _ => None,
    }
}

/// mosixd's end of [`offer_pipe`]: the pipe the image comes through, or None (it comes
/// on the connection).
pub(super) fn take_pipe(conn: &UnixStream) -> std::io::Result<Option<std::fs::File>> {
    let mut byte = [0u8; 1];
    let mut fds = recv_with_fds(conn, &mut byte)?;
    Ok(match (byte[0], fds.len()) {
        (1, 1) => fds.pop().map(std::fs::File::from),
        _ => None,
    })
}

/// Copies a chunk stream (an image) from `from` to `to` as it is, through its end (a
/// zero-length chunk, written and flushed). False if `from` marked it aborted.
pub fn relay_chunks<R: Read, W: Write>(from: &mut R, to: &mut W) -> std::io::Result<bool> {
    relay_chunks_marked(from, to, &mut || {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a frozen mark out of place",
        ))
    })
}

/// [`relay_chunks`] of a mover's stream: at its [`FROZEN`] mark (not passed on)
/// `frozen` is called, and the relay goes on if it says so (else: aborted).
pub(super) fn relay_chunks_marked<R: Read + ?Sized, W: Write>(
    from: &mut R,
    to: &mut W,
    frozen: &mut dyn FnMut() -> std::io::Result<bool>,
) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let mut len = [0u8; 4];
        from.read_exact(&mut len)?;
        let n = u32::from_le_bytes(len);
        if n == ABORTED {
            return Ok(false);
        }
        if n == FROZEN {
            // What came before is on its way while its calls are settled.
            to.flush()?;
            if !frozen()? {
                return Ok(false);
            }
            continue;
        }
        to.write_all(&len)?;
        if n == 0 {
            to.flush()?;
            return Ok(true);
        }
        let n = n as usize;
        if n > buf.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "image chunk larger than the limit",
            ));
        }
        from.read_exact(&mut buf[..n])?;
        to.write_all(&buf[..n])?;
    }
}

/// The side the image goes to, remembering whether writing to it failed (the link, not
/// the mover).
pub(super) struct WriteSide<'a, W: Write> {
    pub(super) w: &'a mut W,
    pub(super) failed: bool,
}

impl<W: Write> Write for WriteSide<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let r = self.w.write(b);
        self.failed |= r.is_err();
        r
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.w.flush();
        self.failed |= r.is_err();
        r
    }
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

    /// The link's socket and key given are the ones taken; a relay is a relay; an
    /// answer cut short, or that is not one, is an error.
    #[test]
    fn the_way_given_is_the_way_taken() {
        let (mover, daemon) = UnixStream::pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let key = LentKey {
            key: [7u8; 32],
            nonce: 1 << 40,
        };
        give_way(&daemon, &Way::Link(OwnedFd::from(sock), key.clone())).unwrap();
        match take_way(&mover).unwrap() {
            Way::Link(fd, got) => {
                assert_eq!(got, key);
                let s = TcpStream::from(fd);
                assert_eq!(s.local_addr().unwrap().ip().to_string(), "127.0.0.1");
            }
            Way::Relay => panic!("a relay"),
        }
        give_way(&daemon, &Way::Relay).unwrap();
        assert!(matches!(take_way(&mover).unwrap(), Way::Relay));

        let (mover, mut daemon) = UnixStream::pair().unwrap();
        daemon.write_all(&[1; WAY_LEN]).unwrap();
        assert!(take_way(&mover).is_err(), "a link without its socket");
        let (mover, mut daemon) = UnixStream::pair().unwrap();
        daemon.write_all(&[0; 5]).unwrap();
        drop(daemon);
        assert!(take_way(&mover).is_err());
    }

    /// The descriptor sent is the one received; a byte without one is refused.
    #[test]
    fn a_descriptor_sent_is_received() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send_fd(&a, &r).unwrap();
        let got = recv_fd(&b).unwrap();
        std::fs::File::from(w).write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        std::fs::File::from(got).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"x");
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[1]).unwrap();
        assert!(recv_fd(&b).is_err());
    }

    fn chunk(data: &[u8]) -> Vec<u8> {
        let mut v = (data.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(data);
        v
    }

    /// A writer that fails once `room` bytes were written.
    struct Full {
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::ErrorKind::ConnectionReset.into());
            }
            let n = b.len().min(self.room);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn chunks_pass_and_the_frozen_mark_is_called_not_passed() {
        let mut stream = chunk(b"abc");
        stream.extend_from_slice(&FROZEN.to_le_bytes());
        stream.extend_from_slice(&chunk(b"de"));
        stream.extend_from_slice(&0u32.to_le_bytes());
        let mut out = Vec::new();
        let mut marks = 0;
        let done = relay_chunks_marked(&mut &stream[..], &mut out, &mut || {
            marks += 1;
            Ok(true)
        })
        .unwrap();
        assert!(done);
        assert_eq!(marks, 1);
        let mut want = chunk(b"abc");
        want.extend_from_slice(&chunk(b"de"));
        want.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(out, want);
    }

    #[test]
    fn an_abort_after_the_mark_or_a_refused_mark_ends_the_relay() {
        let mut stream = chunk(b"abc");
        stream.extend_from_slice(&ABORTED.to_le_bytes());
        let mut out = Vec::new();
        assert!(!relay_chunks_marked(&mut &stream[..], &mut out, &mut || Ok(true)).unwrap());
        let mut stream = chunk(b"abc");
        stream.extend_from_slice(&FROZEN.to_le_bytes());
        stream.extend_from_slice(&chunk(b"never"));
        let mut out = Vec::new();
        assert!(!relay_chunks_marked(&mut &stream[..], &mut out, &mut || Ok(false)).unwrap());
        assert_eq!(out, chunk(b"abc"));
        // A mark where none may be (a plain relay) is an error.
        let stream = FROZEN.to_le_bytes();
        assert!(relay_chunks(&mut &stream[..], &mut Vec::new()).is_err());
    }

    #[test]
    fn an_oversized_chunk_is_refused() {
        let stream = (1u32 << 30).to_le_bytes();
        let e = relay_chunks(&mut &stream[..], &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("larger than the limit"), "{e}");
    }

    #[test]
    fn a_failure_of_the_side_written_is_told_from_one_of_the_side_read() {
        let stream = chunk(&[7u8; 100]);
        let mut link = Full { room: 10 };
        let mut side = WriteSide {
            w: &mut link,
            failed: false,
        };
        assert!(relay_chunks(&mut &stream[..], &mut side).is_err());
        assert!(side.failed);
        // The mover's stream ends early: a read failure, the link is fine.
        let mut out = Vec::new();
        let mut side = WriteSide {
            w: &mut out,
            failed: false,
        };
        assert!(relay_chunks(&mut &stream[..50], &mut side).is_err());
        assert!(!side.failed);
    }
}
