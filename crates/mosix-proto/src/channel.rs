//! The authenticated, encrypted byte stream between two nodes (migration streams, and
//! any later node-to-node request): Noise `NNpsk0` (snow) keyed by the cluster secret,
//! then length-prefixed transport frames.
//!
//! A peer without the secret fails the handshake; a changed, dropped, reordered or
//! replayed frame fails decryption (Noise transport nonces are implicit counters); a
//! stream cut short is reported as such, never taken for a clean end. The channel is a
//! plain `Read + Write`, so an image writer can stream a frozen process straight into it
//! and an image reader can read it out on the other side.
//!
//! Frames: `len u16 BE | ciphertext` (at most 65535 bytes). A zero-length plaintext frame
//! marks the sender's clean end of stream (`finish`).

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use hkdf::Hkdf;
use sha2::Sha256;

const PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_BLAKE2s";
const MAX_FRAME: usize = 65535;
const TAG: usize = 16;
/// Largest plaintext in one frame.
pub const MAX_PLAIN: usize = MAX_FRAME - TAG;

/// Why a channel could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("peer failed authentication (different cluster secret?)")]
    Handshake,
    #[error("channel I/O: {0}")]
    Io(#[from] io::Error),
    #[error("noise: {0}")]
    Noise(String),
}

/// The pre-shared key of the stream handshake, derived from the secret file's contents
/// (surrounding whitespace ignored; a different label than the gossip key).
pub fn derive_psk(secret: &[u8]) -> [u8; 32] {
    let trimmed = secret.trim_ascii();
    let hk = Hkdf::<Sha256>::new(Some(b"mosix-stream-v1"), trimmed);
    let mut k = [0u8; 32];
    hk.expand(b"noise NNpsk0 psk", &mut k)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    k
}

fn write_frame<S: Write>(s: &mut S, frame: &[u8]) -> io::Result<()> {
    let len = u16::try_from(frame.len()).map_err(|_| io::Error::other("frame too large"))?;
    s.write_all(&len.to_be_bytes())?;
    s.write_all(frame)
}

/// Reads one frame into `buf`; Ok(false) on a clean EOF before its first byte.
fn read_frame<S: Read>(s: &mut S, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut len = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        let n = s.read(&mut len[got..])?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    buf.resize(u16::from_be_bytes(len) as usize, 0);
    s.read_exact(buf)?;
    Ok(true)
}

/// An established channel over the stream `S`.
pub struct Channel<S: Read + Write> {
    stream: S,
    /// Shared by the two halves of a split channel (each direction has its own nonce).
    noise: Arc<Mutex<snow::TransportState>>,
    /// Plaintext waiting to be sent (up to MAX_PLAIN).
    out: Vec<u8>,
    /// Decrypted plaintext not yet read, from `in_pos`.
    inbuf: Vec<u8>,
    in_pos: usize,
    frame: Vec<u8>,
    cipher: Vec<u8>,
    peer_finished: bool,
}

fn noise_err(e: snow::Error) -> ChannelError {
    ChannelError::Noise(e.to_string())
}

impl<S: Read + Write> Channel<S> {
    /// Opens the channel as the side that connected.
    pub fn connect(stream: S, secret: &[u8]) -> Result<Self, ChannelError> {
        Self::handshake(stream, secret, true)
    }

    /// Opens the channel as the side that accepted the connection.
    pub fn accept(stream: S, secret: &[u8]) -> Result<Self, ChannelError> {
        Self::handshake(stream, secret, false)
    }

    /// NNpsk0: the initiator sends the first message, the responder answers; a peer
    /// with another secret fails at the first message it reads.
    fn handshake(mut stream: S, secret: &[u8], initiator: bool) -> Result<Self, ChannelError> {
        let psk = derive_psk(secret);
        let builder = snow::Builder::new(PATTERN.parse().map_err(noise_err)?).psk(0, &psk);
        let mut hs = if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
        .map_err(noise_err)?;
        let mut buf = vec![0u8; MAX_FRAME];
        let mut msg = Vec::new();
        for sending in [initiator, !initiator] {
            if sending {
                let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
                write_frame(&mut stream, &buf[..n])?;
                stream.flush()?;
            } else {
                if !read_frame(&mut stream, &mut msg)? {
                    return Err(ChannelError::Handshake);
                }
                hs.read_message(&msg, &mut buf)
                    .map_err(|_| ChannelError::Handshake)?;
            }
        }
        Ok(Self::with(
            stream,
            Arc::new(Mutex::new(hs.into_transport_mode().map_err(noise_err)?)),
        ))
    }

    fn with(stream: S, noise: Arc<Mutex<snow::TransportState>>) -> Self {
        Channel {
            stream,
            noise,
            out: Vec::with_capacity(MAX_PLAIN),
            inbuf: Vec::new(),
            in_pos: 0,
            frame: Vec::new(),
            cipher: vec![0u8; MAX_FRAME],
            peer_finished: false,
        }
    }

    fn send_frame(&mut self, plain: &[u8]) -> io::Result<()> {
        let n = self
            .noise
            .lock()
            .map_err(|_| io::Error::other("channel state poisoned"))?
            .write_message(plain, &mut self.cipher)
            .map_err(io::Error::other)?;
        write_frame(&mut self.stream, &self.cipher[..n])
    }

    fn flush_out(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            self.send_frame(&out)?;
            self.out = out;
            self.out.clear();
        }
        Ok(())
    }

    /// Sends everything written so far and marks a clean end of what this side sends.
    pub fn finish(&mut self) -> io::Result<()> {
        self.flush_out()?;
        self.send_frame(&[])?;
        self.stream.flush()
    }

    /// Splits the channel into a half to read from (over `self`'s stream) and a half to
    /// write to (over `other`, a clone of the same stream, e.g. `TcpStream::try_clone`),
    /// so that two threads can use the directions independently.
    pub fn split(mut self, other: S) -> io::Result<(Channel<S>, Channel<S>)> {
        self.flush_out()?;
        let writer = Self::with(other, self.noise.clone());
        Ok((self, writer))
    }

    /// The underlying stream (e.g. to set timeouts or shut it down).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

impl<S: Read + Write> Write for Channel<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.out.is_empty() && data.len() >= MAX_PLAIN {
            self.send_frame(&data[..MAX_PLAIN])?;
            return Ok(MAX_PLAIN);
        }
        let n = data.len().min(MAX_PLAIN - self.out.len());
        self.out.extend_from_slice(&data[..n]);
        if self.out.len() == MAX_PLAIN {
            self.flush_out()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_out()?;
        self.stream.flush()
    }
}

impl<S: Read + Write> Read for Channel<S> {
    /// Ok(0) only after the peer's `finish`; a stream that ends without it is an error.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.in_pos == self.inbuf.len() {
            if self.peer_finished {
                return Ok(0);
            }
            if !read_frame(&mut self.stream, &mut self.frame)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the channel in the middle of a transfer",
                ));
            }
            self.inbuf.resize(self.frame.len(), 0);
            let n = self
                .noise
                .lock()
                .map_err(|_| io::Error::other("channel state poisoned"))?
                .read_message(&self.frame, &mut self.inbuf)
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "channel frame failed authentication",
                    )
                })?;
            self.inbuf.truncate(n);
            self.in_pos = 0;
            if n == 0 {
                self.peer_finished = true;
            }
        }
        let n = buf.len().min(self.inbuf.len() - self.in_pos);
        buf[..n].copy_from_slice(&self.inbuf[self.in_pos..self.in_pos + n]);
        self.in_pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn data(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| ((i * 2654435761usize) >> 13) as u8)
            .collect()
    }

    #[test]
    fn round_trip_both_ways() {
        let (a, b) = UnixStream::pair().unwrap();
        let payload = data(3 << 20);
        let p2 = payload.clone();
        let t = std::thread::spawn(move || {
            let mut c = Channel::accept(b, b"the secret\n").unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            assert_eq!(got, p2);
            c.write_all(b"restored 4242").unwrap();
            c.finish().unwrap();
        });
        let mut c = Channel::connect(a, b"the secret").unwrap();
        for chunk in payload.chunks(100_000) {
            c.write_all(chunk).unwrap();
        }
        c.finish().unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert_eq!(reply, "restored 4242");
        t.join().unwrap();
    }

    #[test]
    fn wrong_secret_fails_the_handshake() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || Channel::accept(b, b"secret one").err());
        let r = Channel::connect(a, b"secret two");
        let server = t.join().unwrap();
        assert!(
            matches!(server, Some(ChannelError::Handshake)),
            "{server:?}"
        );
        // The initiator learns it when its first frame is refused or the stream closes.
        if let Ok(mut c) = r {
            c.write_all(b"x").unwrap();
            let _ = c.finish();
            let mut s = String::new();
            assert!(c.read_to_string(&mut s).is_err());
        }
    }

    /// Forwards frames from `from` to `to`, letting `mangle` change frame `k` (the
    /// handshake is frame 0) or cut the stream (returning false).
    fn relay(
        mut from: UnixStream,
        mut to: UnixStream,
        mangle: impl Fn(usize, &mut Vec<u8>) -> bool + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut f = Vec::new();
            let mut k = 0;
            while let Ok(true) = read_frame(&mut from, &mut f) {
                if !mangle(k, &mut f) {
                    break;
                }
                if write_frame(&mut to, &f).is_err() {
                    break;
                }
                k += 1;
            }
            // Whatever other handles exist, both ends see the stream end here.
            let _ = from.shutdown(std::net::Shutdown::Both);
            let _ = to.shutdown(std::net::Shutdown::Both);
        })
    }

    /// Sends `payload` from an initiator through a mangling relay; what the responder reads.
    fn through(
        payload: Vec<u8>,
        mangle: impl Fn(usize, &mut Vec<u8>) -> bool + Send + 'static,
    ) -> io::Result<Vec<u8>> {
        let (a, a_relay) = UnixStream::pair().unwrap();
        let (b_relay, b) = UnixStream::pair().unwrap();
        let up = relay(
            a_relay.try_clone().unwrap(),
            b_relay.try_clone().unwrap(),
            mangle,
        );
        let down = relay(b_relay, a_relay, |_, _| true);
        let sender = std::thread::spawn(move || {
            let mut c = Channel::connect(a, b"k").unwrap();
            let _ = c.write_all(&payload);
            let _ = c.finish();
        });
        let mut c = Channel::accept(b, b"k").map_err(io::Error::other)?;
        let mut got = Vec::new();
        let r = c.read_to_end(&mut got).map(|_| got);
        drop(c);
        sender.join().unwrap();
        up.join().unwrap();
        down.join().unwrap();
        r
    }

    #[test]
    fn tampered_replayed_or_cut_streams_are_errors() {
        let payload = data(300_000);
        assert_eq!(through(payload.clone(), |_, _| true).unwrap(), payload);
        let flipped = through(payload.clone(), |k, f| {
            if k == 2 {
                f[100] ^= 0x20;
            }
            true
        });
        assert_eq!(flipped.unwrap_err().kind(), io::ErrorKind::InvalidData);
        // A frame sent again in place of the next one (replayed) fails: transport nonces
        // are counters.
        let kept = std::sync::Mutex::new(Vec::new());
        let replayed = through(payload.clone(), move |k, f| {
            let mut kept = kept.lock().unwrap();
            if k == 2 {
                *kept = f.clone();
            } else if k == 3 {
                *f = kept.clone();
            }
            true
        });
        assert_eq!(replayed.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let cut = through(payload, |k, _| k < 3);
        assert_eq!(cut.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
