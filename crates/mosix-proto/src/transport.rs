//! One direction of a [`crate::channel::Channel`] once its handshake is done: Noise's
//! transport cipher, AES-256-GCM with the nonce made of 32 zero bits and the 64-bit
//! big-endian count of frames sent, and no associated data. The bytes on the wire are
//! what snow's transport would send (a test holds them to it); we keep the cipher
//! ourselves for two things snow's transport does not do:
//! - a frame is sealed where its plaintext was written, with no copy of it;
//! - either direction can be lent to another process for a while ([`LentKey`]: the key
//!   and the count), which writes its frames into the same stream, or reads them from it
//!   (a mover writing a process's image straight into the link, a supervisor reading it
//!   from there; see docs/migration.md), and handed back with the count it reached.
//!
//! Frames: `len u16 BE | ciphertext | tag`, at most [`MAX_FRAME`] bytes after the length.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Largest frame after its length: ciphertext and tag.
pub const MAX_FRAME: usize = 65535;
/// The AES-GCM tag at the end of each frame.
pub const TAG: usize = 16;
/// Largest plaintext in one frame.
pub const MAX_PLAIN: usize = MAX_FRAME - TAG;

/// One direction's cipher: its key, and the number of frames it has sealed or opened.
pub struct Cipher {
    key: LessSafeKey,
    raw: [u8; 32],
    nonce: u64,
}

impl Cipher {
    /// The cipher of key `raw`, its next frame being number `nonce`.
    pub fn new(raw: [u8; 32], nonce: u64) -> Cipher {
        let key = UnboundKey::new(&AES_256_GCM, &raw).expect("a 32-byte key is an AES-256 key");
        Cipher {
            key: LessSafeKey::new(key),
            raw,
            nonce,
        }
    }

    fn next_nonce(&mut self) -> io::Result<Nonce> {
        // Noise reserves the last nonce; a channel never sends 2^64 frames.
        if self.nonce == u64::MAX {
            return Err(io::Error::other("channel nonces exhausted"));
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.nonce.to_be_bytes());
        self.nonce += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Seals the `n` bytes of plaintext at `frame[2..2 + n]` in place, and writes the
    /// length before them and the tag after: the frame is then `frame[..2 + n + TAG]`,
    /// whose length is returned.
    pub fn seal_frame(&mut self, frame: &mut [u8], n: usize) -> io::Result<usize> {
        if n > MAX_PLAIN || frame.len() < 2 + n + TAG {
            return Err(io::Error::other("frame too large"));
        }
        let nonce = self.next_nonce()?;
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), &mut frame[2..2 + n])
            .map_err(|_| io::Error::other("frame could not be sealed"))?;
        frame[2 + n..2 + n + TAG].copy_from_slice(tag.as_ref());
        frame[..2].copy_from_slice(&((n + TAG) as u16).to_be_bytes());
        Ok(2 + n + TAG)
    }

    /// Opens the ciphertext and tag `in_out` (a frame after its length) in place: its
    /// plaintext is then `in_out[..returned]`.
    pub fn open(&mut self, in_out: &mut [u8]) -> io::Result<usize> {
        let failed = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "channel frame failed authentication",
            )
        };
        if in_out.len() < TAG {
            return Err(failed());
        }
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::empty(), in_out)
            .map_err(|_| failed())?;
        Ok(plain.len())
    }

    /// The key and the next frame's number, for a [`FrameWriter`] or [`FrameReader`]
    /// elsewhere.
    pub fn lend(&self) -> LentKey {
        LentKey {
            key: self.raw,
            nonce: self.nonce,
        }
    }

    /// The next frame's number.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Goes on from frame number `nonce` (the count a borrower of this direction
    /// reached). Never back: a nonce used twice would give the key away.
    pub fn resume(&mut self, nonce: u64) -> io::Result<()> {
        if nonce < self.nonce {
            return Err(io::Error::other(
                "a lent channel came back with an earlier nonce",
            ));
        }
        self.nonce = nonce;
        Ok(())
    }
}

/// A direction of a channel, lent: its key and the number of its next frame. Passed only
/// between mosixd and its own helpers, over a local socket.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LentKey {
    pub key: [u8; 32],
    pub nonce: u64,
}

impl std::fmt::Debug for LentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(f, "LentKey {{ nonce: {} }}", self.nonce)
    }
}

/// Frames sealed and kept to be written together, at most this many bytes: one write
/// (one call into TCP, one wake-up of the reader) for a forwarded call's megabyte instead
/// of one per frame. Under a paced congestion control (BBR, which arms a timer at each
/// push) a write per 64 KiB frame cost more than the bytes themselves here.
pub const BATCH: usize = 16 * (2 + MAX_FRAME);

/// Frames being filled with plaintext, each sealed where it lies, and kept until
/// written together (at most [`BATCH`] bytes, or sooner when flushed).
#[derive(Default)]
pub struct Filling {
    /// Sealed frames (`buf[..sealed]`), then the frame being filled: its length, then
    /// `len` bytes of plaintext (and room for the tag).
    buf: Vec<u8>,
    sealed: usize,
    len: usize,
}

impl Filling {
    /// Copies into the frame being filled what fits of `data`: how much.
    pub fn put(&mut self, data: &[u8]) -> usize {
        self.room();
        let n = data.len().min(MAX_PLAIN - self.len);
        let at = self.sealed + 2 + self.len;
        self.buf[at..at + n].copy_from_slice(&data[..n]);
        self.len += n;
        n
    }

    /// Room for a whole frame after those sealed (the buffer grows to a batch as
    /// frames are sealed in it, zeroed once).
    fn room(&mut self) {
        let need = self.sealed + 2 + MAX_FRAME;
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
    }

    /// The frame being filled is full.
    pub fn is_full(&self) -> bool {
        self.len == MAX_PLAIN
    }

    /// Nothing was put since the last frame was sealed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// No room for another whole frame in the batch: time to write it.
    pub fn batch_full(&self) -> bool {
        self.sealed + 2 + MAX_FRAME > BATCH
    }

    /// Seals the frame being filled (nothing put: the end frame) with `c`.
    pub fn seal(&mut self, c: &mut Cipher) -> io::Result<()> {
        self.room();
        let n = std::mem::take(&mut self.len);
        let total = c.seal_frame(&mut self.buf[self.sealed..], n)?;
        self.sealed += total;
        Ok(())
    }

    /// The frames sealed, to write: they are gone from here even if that write fails
    /// (a batch half written ends the stream anyway).
    pub fn take_sealed(&mut self) -> &[u8] {
        let n = std::mem::take(&mut self.sealed);
        &self.buf[..n]
    }

    /// Frames are sealed and not yet taken.
    pub fn has_sealed(&self) -> bool {
        self.sealed > 0
    }

    /// Seals what was put, if anything, and writes all sealed frames into `w`.
    pub fn write_out<W: Write + ?Sized>(&mut self, c: &mut Cipher, w: &mut W) -> io::Result<()> {
        if !self.is_empty() {
            self.seal(c)?;
        }
        if self.has_sealed() {
            w.write_all(self.take_sealed())?;
        }
        Ok(())
    }
}

/// Writes frames of one channel direction into `w`, as the channel itself would (each
/// byte copied once, into the frame being filled, and sealed there).
pub struct FrameWriter<W: Write> {
    w: W,
    cipher: Cipher,
    filling: Filling,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(w: W, key: &LentKey) -> FrameWriter<W> {
        FrameWriter {
            w,
            cipher: Cipher::new(key.key, key.nonce),
            filling: Filling::default(),
        }
    }

    /// Everything written is sent: the stream, and the number of the next frame (what
    /// the lender goes on from).
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.flush()?;
        Ok((self.w, self.cipher.nonce()))
    }
}

impl<W: Write> Write for FrameWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.filling.put(data);
        if self.filling.is_full() {
            self.filling.seal(&mut self.cipher)?;
            if self.filling.batch_full() {
                self.w.write_all(self.filling.take_sealed())?;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.filling.write_out(&mut self.cipher, &mut self.w)?;
        self.w.flush()
    }
}

/// The receiving direction of a channel, lent ([`crate::channel::Channel::lend_receiver`]):
/// its key and the number of its next frame, and what the channel had read and not yet
/// given out: plaintext of a frame opened, then bytes of frames not yet opened.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecvLend {
    pub key: LentKey,
    pub plain: Vec<u8>,
    pub raw: Vec<u8>,
}

impl std::fmt::Debug for RecvLend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        write!(
            f,
            "RecvLend {{ nonce: {}, plain: {} bytes, raw: {} bytes }}",
            self.key.nonce,
            self.plain.len(),
            self.raw.len()
        )
    }
}

/// Bytes of a stream read at once: a few whole frames.
const RAW: usize = 4 * (2 + MAX_FRAME);

/// Bytes read from a stream and not yet taken: `buf[at..end]` (several frames are read
/// with one call).
#[derive(Default)]
pub struct Unread {
    pub buf: Vec<u8>,
    pub at: usize,
    pub end: usize,
}

impl Unread {
    /// `bytes`, not yet taken.
    pub fn of(bytes: &[u8]) -> Unread {
        let mut buf = vec![0u8; RAW.max(bytes.len())];
        buf[..bytes.len()].copy_from_slice(bytes);
        Unread {
            buf,
            at: 0,
            end: bytes.len(),
        }
    }

    /// The bytes not yet taken.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.at..self.end]
    }

    /// The bytes not yet taken, to change in place (a frame opened where it lies).
    pub fn pending_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.end]
    }

    /// Takes `n` bytes.
    pub fn take(&mut self, n: usize) {
        self.at += n;
        if self.at == self.end {
            self.at = 0;
            self.end = 0;
        }
    }

    /// Makes sure `need` bytes are not yet taken, reading from `r` as much as comes (what
    /// was taken may be moved over). Ok(false): the stream ended with none.
    pub fn fill<R: Read + ?Sized>(&mut self, r: &mut R, need: usize) -> io::Result<bool> {
        if self.buf.is_empty() {
            self.buf = vec![0u8; RAW];
        }
        if self.end - self.at >= need {
            return Ok(true);
        }
        if self.at + need > self.buf.len() {
            self.buf.copy_within(self.at..self.end, 0);
            self.end -= self.at;
            self.at = 0;
        }
        while self.end - self.at < need {
            let n = match r.read(&mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                if self.end == self.at {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += n;
        }
        Ok(true)
    }
}

/// Reads one channel direction's frames from `r`, opening each where it was read (no
/// copy of its ciphertext), for a borrower of it ([`RecvLend`]); [`FrameReader::give_back`]
/// then says what it read beyond what was taken, for the lender to go on from.
pub struct FrameReader<R: Read> {
    r: R,
    cipher: Cipher,
    /// Plaintext handed over with the lend, given out first.
    plain: Vec<u8>,
    plain_at: usize,
    /// Bytes read: those of frames not yet opened, and before them the opened frame,
    /// whose plaintext not yet given out is `raw.buf[open_at..open_end]`.
    raw: Unread,
    open_at: usize,
    open_end: usize,
    /// The sender's end frame was read.
    ended: bool,
}

impl<R: Read> FrameReader<R> {
    pub fn new(r: R, lend: RecvLend) -> FrameReader<R> {
        FrameReader {
            r,
            cipher: Cipher::new(lend.key.key, lend.key.nonce),
            plain: lend.plain,
            plain_at: 0,
            raw: Unread::of(&lend.raw),
            open_at: 0,
            open_end: 0,
            ended: false,
        }
    }

    /// Opens the next frame in place.
    fn open_next(&mut self) -> io::Result<()> {
        let cut = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the channel in the middle of a transfer",
            )
        };
        // (The opened frame's plaintext was all given out: it may be moved over.)
        if !self.raw.fill(&mut self.r, 2)? {
            return Err(cut());
        }
        let head = self.raw.pending();
        let len = u16::from_be_bytes([head[0], head[1]]) as usize;
        if !self.raw.fill(&mut self.r, 2 + len)? {
            return Err(cut());
        }
        let at = self.raw.at + 2;
        let n = self.cipher.open(&mut self.raw.buf[at..at + len])?;
        // Taken without `take`: the plaintext stays where it is until given out.
        self.raw.at = at + len;
        if n == 0 {
            self.ended = true;
        }
        self.open_at = at;
        self.open_end = at + n;
        Ok(())
    }

    /// What was read and not taken, for the lender: the number of the next frame, the
    /// plaintext not taken, the bytes of frames not opened.
    pub fn give_back(self) -> (u64, Vec<u8>, Vec<u8>) {
        let mut plain = self.plain[self.plain_at..].to_vec();
        plain.extend_from_slice(&self.raw.buf[self.open_at..self.open_end]);
        (self.cipher.nonce(), plain, self.raw.pending().to_vec())
    }
}

impl<R: Read> Read for FrameReader<R> {
    /// Ok(0) only after the sender's end frame.
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.plain_at < self.plain.len() {
            let n = out.len().min(self.plain.len() - self.plain_at);
            out[..n].copy_from_slice(&self.plain[self.plain_at..self.plain_at + n]);
            self.plain_at += n;
            return Ok(n);
        }
        while self.open_at == self.open_end {
            if self.ended || out.is_empty() {
                return Ok(0);
            }
            self.open_next()?;
        }
        let n = out.len().min(self.open_end - self.open_at);
        out[..n].copy_from_slice(&self.raw.buf[self.open_at..self.open_at + n]);
        self.open_at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + 7) as u8).collect()
    }

    /// Frames written by a writer open, in order, with the same key; a frame out of
    /// order or changed does not.
    #[test]
    fn frames_written_open_in_order_only() {
        let key = [9u8; 32];
        let mut w = FrameWriter::new(Vec::new(), &LentKey { key, nonce: 5 });
        let want = data(3 * MAX_PLAIN + 100);
        for piece in want.chunks(1000) {
            w.write_all(piece).unwrap();
        }
        let (wire, nonce) = w.finish().unwrap();
        assert_eq!(nonce, 5 + 4);
        let mut frames = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let len = u16::from_be_bytes([wire[at], wire[at + 1]]) as usize;
            frames.push(wire[at + 2..at + 2 + len].to_vec());
            at += 2 + len;
        }
        assert_eq!(frames.len(), 4);
        let mut got = Vec::new();
        let mut r = Cipher::new(key, 5);
        for f in &frames {
            let mut f = f.clone();
            let n = r.open(&mut f).unwrap();
            got.extend_from_slice(&f[..n]);
        }
        assert_eq!(got, want);
        // Out of order.
        let mut r = Cipher::new(key, 5);
        assert!(r.open(&mut frames[1].clone()).is_err());
        // Changed.
        let mut r = Cipher::new(key, 5);
        let mut f = frames[0].clone();
        f[10] ^= 1;
        assert!(r.open(&mut f).is_err());
    }

    /// A reader lent mid-stream (with plaintext and raw bytes the lender had read) reads
    /// what follows; what it read beyond what was taken is given back whole.
    #[test]
    fn a_frame_reader_reads_on_and_gives_back_the_rest() {
        let key = [3u8; 32];
        let mut w = FrameWriter::new(Vec::new(), &LentKey { key, nonce: 0 });
        let want = data(3 * MAX_PLAIN + 5000);
        w.write_all(&want).unwrap();
        let (wire, _) = w.finish().unwrap();
        // The lender opened frame 0 and gave out 100 bytes of it, and read 10 bytes of
        // frame 1.
        let len0 = u16::from_be_bytes([wire[0], wire[1]]) as usize;
        let mut f0 = wire[2..2 + len0].to_vec();
        let mut c = Cipher::new(key, 0);
        let n0 = c.open(&mut f0).unwrap();
        let lend = RecvLend {
            key: LentKey { key, nonce: 1 },
            plain: f0[100..n0].to_vec(),
            raw: wire[2 + len0..2 + len0 + 10].to_vec(),
        };
        let mut r = FrameReader::new(&wire[2 + len0 + 10..], lend);
        // It takes up to some point in frame 3 (an image ends inside a frame).
        let upto = 3 * MAX_PLAIN + 1234;
        let mut got = vec![0u8; upto - 100];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got, want[100..upto]);
        let (nonce, plain, raw) = r.give_back();
        assert_eq!(nonce, 4);
        assert_eq!(plain, want[upto..]);
        assert!(raw.is_empty());
    }

    #[test]
    fn a_lent_direction_never_goes_back() {
        let mut c = Cipher::new([1u8; 32], 10);
        assert_eq!(c.lend().nonce, 10);
        assert!(c.resume(9).is_err());
        c.resume(12).unwrap();
        assert_eq!(c.nonce(), 12);
        assert_eq!(format!("{:?}", c.lend()), "LentKey { nonce: 12 }");
    }
}
