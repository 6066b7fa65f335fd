//! Bytes passed on through pipes by reference instead of copied.
//!
//! - [`Splicer`]: read-ahead bytes from a file into the deputy's connection without
//!   passing them through the deputy: spliced from the file into a pipe of its own
//!   (references to the file's pages), then from the pipe into the socket, where Linux
//!   (6.5 on) attaches the pages to the message instead of copying them. Two copies of
//!   every byte fewer than a pread into a buffer and a write of it; mosixd's read of the
//!   message is the only copy left at home before the link.
//! - [`RingWriter`]: a stream into a pipe whose pages are those of a ring of the writer's
//!   (vmsplice), for a stream of many MiB from one local process to another (a mover's
//!   image to mosixd). A write into a socket or a pipe copies every byte into pages the
//!   kernel takes for it; on these VMs, pages given back to the host and taken again,
//!   which made such writes 1.5 to 8 times as costly as the copy into the ring (measured:
//!   docs/migration.md).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// A pipe that holds one piece of a file at a time.
pub struct Splicer {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes in the pipe now.
    held: usize,
}

fn splice(from: RawFd, off: Option<&mut i64>, to: RawFd, len: usize, flags: u32) -> isize {
    let off = off.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    // SAFETY: splice between two descriptors of ours; `off` is null or points to an
    // i64 of the caller's for the call's duration.
    unsafe {
        libc::splice(
            from,
            off,
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | flags,
        )
    }
}

impl Splicer {
    /// A pipe that holds `room` bytes, at descriptor numbers out of the process's way
    /// (see [`crate::deputy::move_high`]); None where that cannot be had.
    pub fn new(room: usize) -> Option<Splicer> {
        let mut p = [0; 2];
        // SAFETY: pipe2 fills the array we pass.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return None;
        }
        let (r, w) = match (
            crate::deputy::move_high(p[0]),
            crate::deputy::move_high(p[1]),
        ) {
            (Ok(r), Ok(w)) => (r, w),
            (r, w) => {
                for fd in [r.unwrap_or(p[0]), w.unwrap_or(p[1])] {
                    // SAFETY: closing a descriptor of ours.
                    unsafe { libc::close(fd) };
                }
                return None;
            }
        };
        // SAFETY: `r` and `w` are the pipe's ends, ours from here on.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(r), OwnedFd::from_raw_fd(w)) };
        // A piece that does not start on a page takes one page of the pipe more.
        let want = room + 4096;
        // (The size it gives is at least the one asked.)
        let got = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(want as libc::c_int));
        got.is_ok_and(|g| g as usize >= want)
            .then_some(Splicer { r, w, held: 0 })
    }

    /// Up to `len` bytes (at most the pipe's room) of `fd` from `off` into the pipe,
    /// which is empty: how many, and whether the file ended there. None if nothing could
    /// be spliced from it (read it otherwise).
    pub fn fill(&mut self, fd: RawFd, off: u64, len: usize) -> Option<(usize, bool)> {
        debug_assert_eq!(self.held, 0);
        let mut at = i64::try_from(off).ok()?;
        while self.held < len {
            // (Never waiting for room: a full pipe ends the piece here.)
            let n = splice(
                fd,
                Some(&mut at),
                self.w.as_raw_fd(),
                len - self.held,
                libc::SPLICE_F_NONBLOCK,
            );
            if n == 0 {
                return Some((self.held, true));
            }
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // What came is good; the stream goes on from there.
                return (self.held > 0).then_some((self.held, false));
            }
            self.held += n as usize;
        }
        Some((self.held, false))
    }

    /// Writes `head`, the bytes in the pipe, then `tail` into `s`. An error: the socket
    /// failed (part of it may have gone); the pipe is empty either way.
    pub fn send(&mut self, mut s: &UnixStream, head: &[u8], tail: &[u8]) -> std::io::Result<()> {
        let r = (|| {
            s.write_all(head)?;
            while self.held > 0 {
                let n = splice(self.r.as_raw_fd(), None, s.as_raw_fd(), self.held, 0);
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                self.held -= n as usize;
            }
            s.write_all(tail)
        })();
        self.drop_held();
        r
    }

    /// Empties the pipe (its bytes dropped).
    pub fn drop_held(&mut self) {
        if self.held == 0 {
            // (After every piece sent whole: no buffer to make.)
            return;
        }
        let mut b = vec![0u8; 64 << 10];
        while self.held > 0 {
            let want = self.held.min(b.len());
            // SAFETY: read into a buffer of ours of at least `want` bytes.
            let n = unsafe { libc::read(self.r.as_raw_fd(), b.as_mut_ptr().cast(), want) };
            if n <= 0 {
                if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // (Cannot be: the pipe holds them.) Start again with a clean count.
                self.held = 0;
                return;
            }
            self.held -= n as usize;
        }
    }
}

/// A byte stream into a pipe, given the pages of a ring of its own instead of having
/// them copied into new pipe pages: each write is copied into the ring (memory touched
/// once, then again and again), and every [`RingWriter::BATCH`] bytes the ring's part
/// is handed to the pipe with vmsplice. The reader's read copies from the ring's pages.
///
/// The ring's bytes are written again only once the pipe cannot hold them any more: a
/// pipe holds at most its size (`F_GETPIPE_SZ`, at most a quarter of the ring here), and
/// between a byte's splice and its overwriting more than that was spliced after it (the
/// ring, less a write, less a batch, less a write). `flush` hands everything written to
/// the pipe; so does dropping it (best effort).
///
/// The ring is a mapping of its own, unmapped when the writer is dropped: pages still in
/// the pipe then belong to the pipe alone. (From malloc, freed memory would be handed
/// out again and written over before the reader read it: seen as a move's image that
/// began with the mover's heap pointers.)
pub struct RingWriter {
    pipe: OwnedFd,
    ring: memmap2::MmapMut,
    /// The ring's bytes written and not yet spliced: `start..end`.
    start: usize,
    end: usize,
}

impl RingWriter {
    /// Bytes of the ring.
    pub const RING: usize = 4 << 20;
    /// Bytes spliced at once (at least).
    pub const BATCH: usize = 256 << 10;
    /// The pipe's size.
    const PIPE: usize = 1 << 20;

    /// A writer into the pipe `pipe` (its write end), which it makes 1 MiB large; an error
    /// if it is no pipe or is made larger than a quarter of the ring.
    pub fn new(pipe: OwnedFd) -> std::io::Result<RingWriter> {
        use nix::fcntl::{fcntl, FcntlArg};
        let _ = fcntl(&pipe, FcntlArg::F_SETPIPE_SZ(Self::PIPE as libc::c_int));
        let size = fcntl(&pipe, FcntlArg::F_GETPIPE_SZ)? as usize;
        if size > Self::RING / 4 {
            return Err(std::io::Error::other(format!(
                "a pipe of {size} bytes is too large for a ring of {}",
                Self::RING
            )));
        }
        Ok(RingWriter {
            pipe,
            ring: memmap2::MmapMut::map_anon(Self::RING)?,
            start: 0,
            end: 0,
        })
    }

    /// Hands what was written and not spliced yet to the pipe.
    fn splice_out(&mut self) -> std::io::Result<()> {
        use nix::fcntl::{vmsplice, SpliceFFlags};
        while self.start < self.end {
            let iov = [std::io::IoSlice::new(&self.ring[self.start..self.end])];
            match vmsplice(&self.pipe, &iov, SpliceFFlags::empty()) {
                Ok(n) => self.start += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl Write for RingWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(Self::BATCH);
        if self.end + n > self.ring.len() {
            // Round the ring: what is left is on its way first.
            self.splice_out()?;
            self.start = 0;
            self.end = 0;
        }
        self.ring[self.end..self.end + n].copy_from_slice(&b[..n]);
        self.end += n;
        if self.end - self.start >= Self::BATCH {
            self.splice_out()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.splice_out()
    }
}

impl Drop for RingWriter {
    fn drop(&mut self) {
        let _ = self.splice_out();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// What is written comes out of the pipe as written, whatever the sizes of the
    /// writes and of the reads, while the ring goes round many times, the reader slower
    /// than the writer (it reads in small pieces).
    #[test]
    fn a_ring_writer_streams_what_was_written() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut rw = RingWriter::new(w).unwrap();
        let total = 6 * RingWriter::RING + 12_345;
        let reader = std::thread::spawn(move || {
            let mut f = std::fs::File::from(r);
            let mut got = Vec::with_capacity(total);
            let mut b = vec![0u8; 3000];
            loop {
                let n = f.read(&mut b).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&b[..n]);
            }
            got
        });
        let data: Vec<u8> = (0..total as u64)
            .map(|i| (i * 31 + i / 4096) as u8)
            .collect();
        let sizes = [1, 4, 100, 4096, 70_000, 300_000, 1 << 20, 5];
        let mut at = 0;
        let mut k = 0;
        while at < total {
            let n = sizes[k % sizes.len()].min(total - at);
            rw.write_all(&data[at..at + n]).unwrap();
            at += n;
            k += 1;
            if k % 7 == 0 {
                rw.flush().unwrap();
            }
        }
        drop(rw);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the bytes differ");
    }

    /// What was written and not read yet when the writer is dropped still comes out as
    /// written, whatever the process does with its memory meanwhile (a ring taken from
    /// malloc and freed was written over by the next allocation: the pipe still referred
    /// to its pages).
    #[test]
    fn a_dropped_ring_writer_leaves_its_bytes_intact() {
        // Freed, a large allocation makes glibc's next ones of its size come from its
        // heap (where freed memory is handed out again), not from mmap.
        drop(std::hint::black_box(vec![1u8; 16 << 20]));
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut rw = RingWriter::new(w).unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 + i / 999) as u8).collect();
        rw.write_all(&data).unwrap();
        drop(rw);
        for _ in 0..4 {
            std::hint::black_box(vec![0xaau8; RingWriter::RING]);
        }
        let mut got = Vec::new();
        std::fs::File::from(r).read_to_end(&mut got).unwrap();
        assert!(got == data, "the bytes differ");
    }

    /// A piece of a file goes through the pipe into a socket between its head and tail,
    /// as written; the end of the file is told; an unspliceable source says so.
    #[test]
    fn pieces_of_a_file_go_through_whole() {
        let Some(mut sp) = Splicer::new(512 << 10) else {
            return; // (no pipe of that size here)
        };
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i * 13) as u8).collect();
        f.write_all(&data).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        assert_eq!(
            sp.fill(f.as_raw_fd(), 100, 512 << 10),
            Some((512 << 10, false))
        );
        sp.send(&a, b"head", b"T").unwrap();
        // The rest of the file is shorter than asked: its end.
        let rest = data.len() - 100 - (512 << 10);
        assert_eq!(
            sp.fill(f.as_raw_fd(), 100 + (512 << 10), 512 << 10),
            Some((rest, true))
        );
        sp.send(&a, b"h2", b"E").unwrap();
        // Kept back and dropped: nothing of it goes out.
        assert_eq!(sp.fill(f.as_raw_fd(), 0, 1000), Some((1000, false)));
        sp.drop_held();
        drop(a);
        let got = reader.join().unwrap();
        let mut want = b"head".to_vec();
        want.extend_from_slice(&data[100..100 + (512 << 10)]);
        want.push(b'T');
        want.extend_from_slice(b"h2");
        want.extend_from_slice(&data[100 + (512 << 10)..]);
        want.push(b'E');
        assert_eq!(got, want);
        // A socket is no file to splice from.
        let (c, _d) = UnixStream::pair().unwrap();
        assert_eq!(sp.fill(c.as_raw_fd(), 0, 10), None);
    }
}
