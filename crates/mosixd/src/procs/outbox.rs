//! The supervisor's frames for mosixd that its socket has not taken yet: written as it
//! takes them, so that the supervisor never waits on mosixd (which may be writing to it
//! meanwhile: both then would wait for ever); the process's calls wait instead once too
//! much is queued.
//!
//! A frame is kept in pieces: its own bytes, and the data of the message it carries where
//! that data already is (a write's bytes, read from the process once): a 1 MiB write
//! behind is not copied into its frame, nor kept twice (the frame, and the copy kept until
//! home made it).

use mosix_remote::wire::Bytes;
use nix::sys::socket::{sendmsg, MsgFlags};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::os::fd::RawFd;

/// Data of at least this size is a piece of its own rather than copied into the frame.
const SHARE: usize = 16 << 10;
/// Pieces written with one call, at most.
const SLICES: usize = 16;

/// One frame, in pieces.
#[derive(Clone, Debug, Default)]
pub struct OutFrame {
    pieces: Vec<Bytes>,
    len: usize,
}

impl From<Vec<u8>> for OutFrame {
    fn from(v: Vec<u8>) -> OutFrame {
        OutFrame {
            len: v.len(),
            pieces: vec![v.into()],
        }
    }
}

impl OutFrame {
    /// The frame `encode` writes, where what it writes of `shared` (a slice of it of at
    /// least [`SHARE`] bytes) is kept as a piece of it, not copied.
    pub fn encode(
        shared: Option<&Bytes>,
        encode: impl FnOnce(&mut Pieces) -> io::Result<()>,
    ) -> io::Result<OutFrame> {
        let mut p = Pieces {
            shared,
            cur: Vec::new(),
            frame: OutFrame::default(),
        };
        encode(&mut p)?;
        p.cut();
        Ok(p.frame)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Its bytes from `at` on, as slices to write.
    fn slices(&self, mut at: usize) -> Vec<IoSlice<'_>> {
        let mut v = Vec::new();
        for p in &self.pieces {
            if at >= p.len() {
                at -= p.len();
                continue;
            }
            v.push(IoSlice::new(&p[at..]));
            at = 0;
            if v.len() == SLICES {
                break;
            }
        }
        v
    }

    /// Its bytes before and after its piece `shared` (None: `shared` is not one of its
    /// pieces).
    pub fn around(&self, shared: &Bytes) -> Option<(Vec<u8>, Vec<u8>)> {
        let i = self
            .pieces
            .iter()
            .position(|p| p.as_ptr() == shared.as_ptr() && p.len() == shared.len())?;
        Some((self.pieces[..i].concat(), self.pieces[i + 1..].concat()))
    }

    #[cfg(test)]
    fn bytes(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

/// Where a frame is encoded ([`OutFrame::encode`]).
pub struct Pieces<'a> {
    shared: Option<&'a Bytes>,
    cur: Vec<u8>,
    frame: OutFrame,
}

impl Pieces<'_> {
    fn cut(&mut self) {
        if !self.cur.is_empty() {
            let cur = std::mem::take(&mut self.cur);
            self.frame.len += cur.len();
            self.frame.pieces.push(cur.into());
        }
    }
}

impl Write for Pieces<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let within = |s: &Bytes| {
            let r = s.as_ptr_range();
            r.start <= b.as_ptr() && b.as_ptr_range().end <= r.end
        };
        match self.shared {
            Some(s) if b.len() >= SHARE && within(s) => {
                self.cut();
                self.frame.len += b.len();
                self.frame.pieces.push(s.slice_ref(b));
            }
            _ => self.cur.extend_from_slice(b),
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Frames not written yet, the first maybe in part.
#[derive(Default)]
pub struct Outbox {
    frames: VecDeque<OutFrame>,
    /// Bytes of the first frame written.
    at: usize,
    bytes: usize,
}

impl Outbox {
    pub fn push(&mut self, f: OutFrame) {
        self.bytes += f.len();
        self.frames.push_back(f);
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Writes what `fd` takes now (it never waits); Err if the connection is broken.
    pub fn pump(&mut self, fd: RawFd) -> io::Result<()> {
        while let Some(f) = self.frames.front() {
            let n = send_now(fd, &f.slices(self.at))?;
            if n == 0 {
                return Ok(());
            }
            // (A write may end the first frame and go on into the next ones.)
            self.at += n;
            while let Some(f) = self.frames.front() {
                if self.at < f.len() {
                    break;
                }
                self.at -= f.len();
                self.bytes -= f.len();
                self.frames.pop_front();
            }
        }
        Ok(())
    }

    /// Every frame not written whole (to send again, whole, on the next connection: a
    /// frame cut short went to a reader that is gone too); the outbox is empty after.
    pub fn take_all(&mut self) -> Vec<OutFrame> {
        let v = self.frames.drain(..).collect();
        *self = Outbox::default();
        v
    }
}

/// Writes what `fd` takes now (MSG_DONTWAIT): bytes written, 0 if it takes nothing now.
fn send_now(fd: RawFd, s: &[IoSlice<'_>]) -> io::Result<usize> {
    loop {
        return match sendmsg::<()>(
            fd,
            s,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => Ok(n),
            Err(nix::errno::Errno::EAGAIN) => Ok(0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => Err(e.into()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mosix_remote::wire::ToDeputy;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn behind(n: usize) -> (ToDeputy, Bytes) {
        let data: Bytes = (0..n).map(|i| (i * 11) as u8).collect::<Vec<_>>().into();
        (
            ToDeputy::Behind {
                stream: 4,
                n: 8,
                off: Some(99),
                data: data.clone(),
            },
            data,
        )
    }

    /// A write whose data the supervisor left in its arena reaches home as the same
    /// frame, byte for byte, as one whose data crossed the socket: its bytes before the
    /// data, the data read by mosixd from the arena, its bytes after.
    #[test]
    fn a_write_left_in_the_arena_is_the_same_frame_home() {
        use mosix_proto::wire::{send, send_frame_parts, ToHome};
        use mosix_remote::arena::{Arena, ArenaView};
        let a = Arena::new(4 << 20).unwrap();
        let mut piece = a.alloc(1 << 20).unwrap();
        let (_, heap) = behind(1 << 20);
        // SAFETY: the piece's own room, 1 MiB.
        unsafe { std::ptr::copy_nonoverlapping(heap.as_ptr(), piece.as_mut_ptr(), 1 << 20) };
        let data = Bytes::from_owner(piece);
        let m = ToDeputy::Behind {
            stream: 4,
            n: 8,
            off: Some(99),
            data: data.clone(),
        };
        let f = OutFrame::encode(Some(&data), |p| mosix_remote::wire::encode_into(p, &m)).unwrap();
        let (head, tail) = f.around(&data).unwrap();
        assert!(
            head.len() < 32 && tail.is_empty(),
            "{} {}",
            head.len(),
            tail.len()
        );
        let view = ArenaView::open(std::process::id() as i32, a.fd(), 4 << 20, a.token()).unwrap();
        let (at, len) = a.locate(&data).unwrap();
        let mut relayed = Vec::new();
        send_frame_parts(
            &mut relayed,
            ToHome::DEPUTY,
            &[&head, view.slice(at, len).unwrap(), &tail],
        )
        .unwrap();
        let mut whole = Vec::new();
        send(
            &mut whole,
            &ToHome::Deputy(mosix_remote::wire::encode(&m).into()),
        )
        .unwrap();
        assert!(relayed == whole);
        // Data not in the arena is not one of its pieces.
        assert!(f.around(&heap).is_none());
    }

    /// A frame in pieces is, byte for byte, the frame encoded whole; the data of a large
    /// one is the message's own bytes, that of a small one is copied.
    #[test]
    fn a_frame_in_pieces_is_the_frame() {
        for n in [0, 10, SHARE, 60_000, 70_000, 1 << 20] {
            let (m, data) = behind(n);
            let mut whole = Vec::new();
            mosix_proto::wire::send_wrapped(&mut whole, 0, &m).unwrap();
            let f = OutFrame::encode(Some(&data), |p| mosix_proto::wire::send_wrapped(p, 0, &m))
                .unwrap();
            assert_eq!(f.bytes(), whole, "{n} bytes");
            assert_eq!(f.len(), whole.len());
            let shared = f
                .pieces
                .iter()
                .any(|p| !p.is_empty() && p.as_ptr() == data.as_ptr());
            // (A frame of up to 64 KiB is encoded whole, into one buffer.)
            assert_eq!(shared, n >= 64 << 10, "{n} bytes");
        }
    }

    /// Frames written as a small socket takes them arrive whole and in order, and those
    /// not written whole are handed back whole.
    #[test]
    fn the_outbox_writes_what_the_socket_takes_in_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut o = Outbox::default();
        let mut want = Vec::new();
        for n in [3, 100_000, 17, 1 << 20, 40_000] {
            let (m, data) = behind(n);
            let f = OutFrame::encode(Some(&data), |p| mosix_proto::wire::send_wrapped(p, 0, &m))
                .unwrap();
            want.extend_from_slice(&f.bytes());
            o.push(f);
        }
        let total = want.len();
        assert_eq!(o.bytes(), total);
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; total];
            b.read_exact(&mut got).unwrap();
            got
        });
        while !o.is_empty() {
            o.pump(a.as_raw_fd()).unwrap();
            let mut p = libc::pollfd {
                fd: a.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: poll on our own socket.
            unsafe { libc::poll(&mut p, 1, 1000) };
        }
        assert_eq!(o.bytes(), 0);
        assert_eq!(reader.join().unwrap(), want);

        // Cut short: the frame begun and those after come back whole.
        let (a, b) = UnixStream::pair().unwrap();
        let (m, data) = behind(1 << 20);
        let f =
            OutFrame::encode(Some(&data), |p| mosix_proto::wire::send_wrapped(p, 0, &m)).unwrap();
        let mut o = Outbox::default();
        o.push(f.clone());
        o.push(vec![1, 2, 3].into());
        o.pump(a.as_raw_fd()).unwrap();
        assert!(
            !o.is_empty() && o.at > 0,
            "1 MiB fits no default socket buffer"
        );
        drop(b);
        assert!(o.pump(a.as_raw_fd()).is_err());
        let back = o.take_all();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].bytes(), f.bytes());
        assert_eq!(o.bytes(), 0);
    }
}
