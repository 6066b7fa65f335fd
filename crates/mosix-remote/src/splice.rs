//! Read-ahead bytes from a file into the deputy's connection without passing them through
//! the deputy: spliced from the file into a pipe of its own (references to the file's
//! pages), then from the pipe into the socket, where Linux (6.5 on) attaches the pages
//! to the message instead of copying them. Two copies of every byte fewer than a pread
//! into a buffer and a write of it; mosixd's read of the message is the only copy left
//! at home before the link.

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
        // SAFETY: F_SETPIPE_SZ takes an int; the size it gives is at least the one asked.
        let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
        (got >= 0 && got as usize >= want).then_some(Splicer { r, w, held: 0 })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

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
