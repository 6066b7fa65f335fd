//! Authenticated encryption of gossip datagrams, keyed by the cluster secret.
//!
//! Each datagram is sealed on its own (UDP may drop or reorder any of them, so there is no
//! session): XChaCha20-Poly1305 under a key derived from the secret with HKDF-SHA256, a
//! random 192-bit nonce per datagram, and a sealed header carrying the sender's node number
//! and send time. The receiver rejects anything that does not authenticate, anything sent
//! more than [`WINDOW_MS`] away from its own clock, and any nonce it has already seen within
//! that window (replay). See docs/cluster.md for why this is not Noise.
//!
//! Datagram layout:
//! ```text
//! magic "MSX1" (4) | nonce (24) | ciphertext( time_ms u64 LE | node u32 LE | payload ) | tag (16)
//! ```
//! The magic is authenticated as associated data.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::collections::{HashMap, VecDeque};

/// First bytes of every sealed datagram.
pub const MAGIC: &[u8; 4] = b"MSX1";
/// Bytes added to a payload by [`Sealer::seal`].
pub const OVERHEAD: usize = 4 + 24 + 12 + 16;
/// Accepted clock difference between sender and receiver, milliseconds.
pub const WINDOW_MS: u64 = 30_000;
/// The most nonces remembered for replay detection; beyond it, the oldest are forgotten and
/// the window shrinks accordingly (their datagrams then fail the time check only if old).
const MAX_REMEMBERED: usize = 200_000;

/// Why a datagram was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("datagram too short or without the MOSIX magic")]
    Malformed,
    #[error("datagram failed authentication (wrong secret or tampered)")]
    Unauthentic,
    #[error("datagram sent outside the accepted time window")]
    Stale,
    #[error("datagram replayed")]
    Replayed,
}

/// An opened datagram.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    /// Node number the sender claims (authenticated: only holders of the secret can seal).
    pub node: u32,
    pub time_ms: u64,
    pub payload: Vec<u8>,
}

/// Seals and opens datagrams with one cluster secret; remembers recent nonces.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
    seen: HashMap<[u8; 24], u64>,
    order: VecDeque<([u8; 24], u64)>,
}

/// Derives the datagram key from the secret file's contents (surrounding whitespace ignored).
pub fn derive_key(secret: &[u8]) -> [u8; 32] {
    let secret = trim_ascii(secret);
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"mosix-gossip-v1"), secret);
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255*32: expand cannot fail.
    hk.expand(b"xchacha20poly1305 datagram key", &mut key)
        .unwrap_or_default();
    key
}

fn trim_ascii(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

impl Sealer {
    pub fn new(secret: &[u8]) -> Sealer {
        let key = derive_key(secret);
        Sealer {
            cipher: XChaCha20Poly1305::new((&key).into()),
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Seals `payload` as sent by `node` at `time_ms` (milliseconds since the Unix epoch).
    pub fn seal(&self, node: u32, time_ms: u64, payload: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        if getrandom::fill(&mut nonce).is_err() {
            // No randomness: fall back to time and a counter-ish value; still unique per call
            // in practice, and the receiver's replay check only drops true duplicates.
            nonce[..8].copy_from_slice(&time_ms.to_le_bytes());
            nonce[8..16].copy_from_slice(&(payload.as_ptr() as u64).to_le_bytes());
        }
        let mut plain = Vec::with_capacity(12 + payload.len());
        plain.extend_from_slice(&time_ms.to_le_bytes());
        plain.extend_from_slice(&node.to_le_bytes());
        plain.extend_from_slice(payload);
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: MAGIC,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(4 + 24 + ct.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a datagram received at `now_ms`; refuses anything not sealed with our secret,
    /// outside the time window, or already seen.
    pub fn open(&mut self, now_ms: u64, datagram: &[u8]) -> Result<Opened, OpenError> {
        if datagram.len() < OVERHEAD || &datagram[..4] != MAGIC {
            return Err(OpenError::Malformed);
        }
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&datagram[4..28]);
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &datagram[28..],
                    aad: MAGIC,
                },
            )
            .map_err(|_| OpenError::Unauthentic)?;
        if plain.len() < 12 {
            return Err(OpenError::Malformed);
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(&plain[..8]);
        let time_ms = u64::from_le_bytes(t);
        let mut n = [0u8; 4];
        n.copy_from_slice(&plain[8..12]);
        let node = u32::from_le_bytes(n);
        if time_ms.abs_diff(now_ms) > WINDOW_MS {
            return Err(OpenError::Stale);
        }
        self.forget_before(now_ms.saturating_sub(2 * WINDOW_MS));
        if self.seen.contains_key(&nonce) {
            return Err(OpenError::Replayed);
        }
        self.seen.insert(nonce, time_ms);
        self.order.push_back((nonce, now_ms));
        while self.order.len() > MAX_REMEMBERED {
            if let Some((old, _)) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        Ok(Opened {
            node,
            time_ms,
            payload: plain[12..].to_vec(),
        })
    }

    fn forget_before(&mut self, limit_ms: u64) {
        while let Some((nonce, at)) = self.order.front() {
            if *at >= limit_ms {
                break;
            }
            self.seen.remove(nonce);
            self.order.pop_front();
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let s = Sealer::new(b"secret\n");
        let mut r = Sealer::new(b"  secret");
        let d = s.seal(3, 1_000_000, b"hello");
        assert_eq!(d.len(), 5 + OVERHEAD);
        let o = r.open(1_000_500, &d).unwrap();
        assert_eq!(o.node, 3);
        assert_eq!(o.payload, b"hello");
    }

    #[test]
    fn wrong_secret_is_unauthentic() {
        let s = Sealer::new(b"secret-a");
        let mut r = Sealer::new(b"secret-b");
        let d = s.seal(1, 5, b"x");
        assert_eq!(r.open(5, &d), Err(OpenError::Unauthentic));
    }

    #[test]
    fn tampering_is_detected() {
        let s = Sealer::new(b"k");
        let mut r = Sealer::new(b"k");
        let mut d = s.seal(1, 5, b"payload");
        let last = d.len() - 1;
        d[last] ^= 1;
        assert_eq!(r.open(5, &d), Err(OpenError::Unauthentic));
        let mut d = s.seal(1, 5, b"payload");
        d[30] ^= 0x80;
        assert_eq!(r.open(5, &d), Err(OpenError::Unauthentic));
    }

    #[test]
    fn replay_and_stale_are_refused() {
        let s = Sealer::new(b"k");
        let mut r = Sealer::new(b"k");
        let d = s.seal(1, 100_000, b"p");
        assert!(r.open(100_000, &d).is_ok());
        assert_eq!(r.open(100_001, &d), Err(OpenError::Replayed));
        let old = s.seal(1, 100_000, b"p");
        assert_eq!(r.open(100_000 + WINDOW_MS + 1, &old), Err(OpenError::Stale));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut r = Sealer::new(b"k");
        for len in 0..200usize {
            let g: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            assert!(r.open(0, &g).is_err());
            let mut h = MAGIC.to_vec();
            h.extend_from_slice(&g);
            assert!(r.open(0, &h).is_err());
        }
    }
}
