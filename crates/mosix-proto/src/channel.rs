//! The authenticated, encrypted byte stream between two nodes (migration streams, and
//! any later node-to-node request), then length-prefixed transport frames.
//!
//! Two handshakes, chosen by the [`ChannelKeys`] a node has:
//! - with per-node keys (the normal case): Noise `XXpsk0` (snow), keyed by the cluster
//!   secret (psk) and by each node's static X25519 key. Both static keys travel encrypted
//!   and are checked against the cluster's list of public keys: [`Channel::accept`] yields
//!   the node number the peer's key belongs to, [`Channel::connect`] refuses a responder
//!   that does not hold the key of the node it dialled. A peer without the secret fails at
//!   the first message, before any Diffie-Hellman and without learning our public key.
//! - shared-secret-only (no keys configured): Noise `NNpsk0` keyed by the cluster secret;
//!   the peer's node number is then unknown ([`Channel::peer`] is `None`).
//!
//! A changed, dropped, reordered or replayed frame fails decryption (Noise transport nonces
//! are implicit counters); a stream cut short is reported as such, never taken for a clean
//! end. The channel is a plain `Read + Write`, so an image writer can stream a frozen
//! process straight into it and an image reader can read it out on the other side.
//!
//! Frames: `len u16 BE | ciphertext` (at most 65535 bytes). A zero-length plaintext frame
//! marks the sender's clean end of stream (`finish`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use hkdf::Hkdf;
use sha2::Sha256;

const PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_BLAKE2s";
/// With per-node keys. XX sends both static keys (encrypted) so each side checks the
/// other's; psk0 (as in NNpsk0) makes the first message depend on the cluster secret.
const KEYED_PATTERN: &str = "Noise_XXpsk0_25519_AESGCM_BLAKE2s";
/// Hashed into the keyed handshake (domain separation from any other use of the keys).
const KEYED_PROLOGUE: &[u8] = b"mosix node channel v2";
pub use crate::transport::MAX_PLAIN;
use crate::transport::{Cipher, Filling, LentKey, RecvLend, Unread, MAX_FRAME, TAG};
/// Length of an X25519 key, private or public.
pub const KEY_LEN: usize = 32;

/// Why a channel could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("peer failed authentication (different cluster secret, or node keys configured on one side only?)")]
    Handshake,
    #[error("peer's key {0} is not in this node's list of node keys (public_keys_file)")]
    UnknownPeerKey(PublicKey),
    #[error("dialled node {expected}, but the peer holds node {actual}'s key")]
    WrongPeer { expected: u32, actual: u32 },
    #[error("node {0} has no public key in this node's list of node keys (public_keys_file)")]
    NoKeyFor(u32),
    #[error("peer authenticated as node {peer} claims to be node {claimed}")]
    Impersonation { peer: u32, claimed: u32 },
    #[error("channel I/O: {0}")]
    Io(#[from] io::Error),
    #[error("noise: {0}")]
    Noise(String),
}

/// A problem with key material (a key file, the list of public keys).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a key: expected {} hex digits", 2 * KEY_LEN)]
    BadKey,
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("{0}")]
    Ring(String),
    #[error("node {0} has no public key in the list")]
    Missing(u32),
    #[error("this node's private key does not match the public key listed for node {0}")]
    Mismatch(u32),
    #[error("cannot make a key: {0}")]
    Crypto(String),
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

fn parse_hex32(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let s = s.trim();
    if s.len() != 2 * KEY_LEN || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KeyError::BadKey);
    }
    let mut k = [0u8; KEY_LEN];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| KeyError::BadKey)?;
    }
    Ok(k)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A node's public X25519 key: 64 hex digits in files and messages.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        parse_hex32(s).map(PublicKey)
    }
}

/// A node's private X25519 key (64 hex digits in its file), with its public key.
#[derive(Clone)]
pub struct PrivateKey {
    private: [u8; KEY_LEN],
    public: PublicKey,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public)
    }
}

fn dh25519() -> Result<Box<dyn snow::types::Dh>, KeyError> {
    use snow::resolvers::CryptoResolver;
    snow::resolvers::DefaultResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .ok_or_else(|| KeyError::Crypto("no X25519 implementation".into()))
}

impl PrivateKey {
    /// A fresh random key (from the operating system's random source).
    pub fn generate() -> Result<PrivateKey, KeyError> {
        let params = KEYED_PATTERN
            .parse()
            .map_err(|e: snow::Error| KeyError::Crypto(e.to_string()))?;
        let kp = snow::Builder::new(params)
            .generate_keypair()
            .map_err(|e| KeyError::Crypto(e.to_string()))?;
        let private: [u8; KEY_LEN] = kp
            .private
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Crypto("unexpected private key length".into()))?;
        Self::from_bytes(private)
    }

    /// Reads a key file's contents: 64 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<PrivateKey, KeyError> {
        Self::from_bytes(parse_hex32(text)?)
    }

    fn from_bytes(private: [u8; KEY_LEN]) -> Result<PrivateKey, KeyError> {
        let mut dh = dh25519()?;
        dh.set(&private);
        let public = PublicKey(
            dh.pubkey()
                .try_into()
                .map_err(|_| KeyError::Crypto("unexpected public key length".into()))?,
        );
        Ok(PrivateKey { private, public })
    }

    /// What a key file holds (64 hex digits and a newline).
    pub fn to_hex(&self) -> String {
        format!("{}\n", hex(&self.private))
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }
}

/// Every node's public key, by node number: the cluster's `public_keys_file`, the same on
/// every node. Lines `NODE KEY` (KEY: 64 hex digits); `#` starts a comment. A node may be
/// listed once, and a key given to one node only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyRing {
    by_node: BTreeMap<u32, PublicKey>,
    by_key: HashMap<PublicKey, u32>,
}

impl KeyRing {
    pub fn parse(text: &str) -> Result<KeyRing, KeyError> {
        let mut ring = KeyRing::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                continue;
            }
            let bad = |why: String| KeyError::Line { line, why };
            let mut words = l.split_whitespace();
            let (Some(n), Some(k), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad("expected 'NODE KEY'".into()));
            };
            let node: u32 = n
                .parse()
                .map_err(|_| bad(format!("'{n}' is not a node number")))?;
            let key: PublicKey = k.parse().map_err(|e: KeyError| bad(e.to_string()))?;
            ring.try_insert(node, key).map_err(bad)?;
        }
        Ok(ring)
    }

    /// Adds a node's key; a node listed twice, node 0, or a key given to two nodes is an
    /// error (the key identifies the node).
    pub fn insert(&mut self, node: u32, key: PublicKey) -> Result<(), KeyError> {
        self.try_insert(node, key).map_err(KeyError::Ring)
    }

    fn try_insert(&mut self, node: u32, key: PublicKey) -> Result<(), String> {
        if node == 0 {
            return Err("node numbers start at 1".into());
        }
        if self.by_node.contains_key(&node) {
            return Err(format!("node {node} is listed twice"));
        }
        if let Some(other) = self.by_key.get(&key) {
            return Err(format!("node {node} has the same key as node {other}"));
        }
        self.by_node.insert(node, key);
        self.by_key.insert(key, node);
        Ok(())
    }

    pub fn get(&self, node: u32) -> Option<PublicKey> {
        self.by_node.get(&node).copied()
    }

    /// The node a key belongs to.
    pub fn node_of(&self, key: &PublicKey) -> Option<u32> {
        self.by_key.get(key).copied()
    }

    /// Listed nodes, in order.
    pub fn nodes(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_node.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.by_node.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_node.is_empty()
    }

    /// The file format [`KeyRing::parse`] reads.
    pub fn to_text(&self) -> String {
        let mut s =
            String::from("# mosix node keys: NODE PUBLIC-KEY (the same file on every node)\n");
        for (n, k) in &self.by_node {
            s.push_str(&format!("{n} {k}\n"));
        }
        s
    }
}

/// This node's identity in the keyed handshake.
struct NodeIdentity {
    node: u32,
    key: PrivateKey,
    ring: KeyRing,
}

/// What a node needs to open channels: the cluster secret and, normally, its own key and
/// every node's public key. Cheap to clone.
#[derive(Clone)]
pub struct ChannelKeys {
    psk: [u8; 32],
    id: Option<Arc<NodeIdentity>>,
}

impl fmt::Debug for ChannelKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.id {
            Some(id) => write!(
                f,
                "ChannelKeys(node {}, {} node keys)",
                id.node,
                id.ring.len()
            ),
            None => f.write_str("ChannelKeys(shared secret only)"),
        }
    }
}

impl ChannelKeys {
    /// Per-node keys: `key` must be the private key of `node`'s entry in `ring`.
    pub fn new(
        secret: &[u8],
        node: u32,
        key: PrivateKey,
        ring: KeyRing,
    ) -> Result<ChannelKeys, KeyError> {
        match ring.get(node) {
            None => return Err(KeyError::Missing(node)),
            Some(k) if k != key.public() => return Err(KeyError::Mismatch(node)),
            Some(_) => {}
        }
        Ok(ChannelKeys {
            psk: derive_psk(secret),
            id: Some(Arc::new(NodeIdentity { node, key, ring })),
        })
    }

    /// The cluster secret alone: any node with it may claim any node number.
    pub fn shared_secret_only(secret: &[u8]) -> ChannelKeys {
        ChannelKeys {
            psk: derive_psk(secret),
            id: None,
        }
    }

    /// Whether channels authenticate node numbers.
    pub fn has_node_keys(&self) -> bool {
        self.id.is_some()
    }
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

/// One direction's cipher, for a moment.
fn locked(c: &Mutex<Cipher>) -> io::Result<std::sync::MutexGuard<'_, Cipher>> {
    c.lock()
        .map_err(|_| io::Error::other("channel state poisoned"))
}

/// An established channel over the stream `S`.
pub struct Channel<S: Read + Write> {
    stream: S,
    /// Each direction's cipher (transport.rs), shared by the two halves of a split
    /// channel.
    send: Arc<Mutex<Cipher>>,
    recv: Arc<Mutex<Cipher>>,
    /// The frame being filled with what is written (sealed where it lies), and frames
    /// sealed and not yet written (written together: a batch, or at a flush).
    out: Filling,
    /// The sending direction is lent ([`Channel::lend_sender`]): nothing is sent.
    lent: bool,
    /// The receiving direction is lent ([`Channel::lend_receiver`]): nothing is read.
    lent_recv: bool,
    /// Decrypted plaintext not yet read, from `in_pos`.
    inbuf: Vec<u8>,
    in_pos: usize,
    /// Bytes read from the stream and not yet taken as frames.
    raw: Unread,
    peer_finished: bool,
    /// The authenticated peer node (None: shared-secret-only channel).
    peer: Option<u32>,
}

fn noise_err(e: snow::Error) -> ChannelError {
    ChannelError::Noise(e.to_string())
}

impl<S: Read + Write> Channel<S> {
    /// Opens the channel as the side that connected, to node `node`. With node keys, fails
    /// unless the peer proves it holds `node`'s key ([`ChannelError::WrongPeer`],
    /// [`ChannelError::UnknownPeerKey`]); without, `node` is not checked.
    pub fn connect(stream: S, keys: &ChannelKeys, node: u32) -> Result<Self, ChannelError> {
        match &keys.id {
            Some(id) => Self::handshake_keyed(stream, &keys.psk, id, Some(node)),
            None => Self::handshake(stream, &keys.psk, true),
        }
    }

    /// Opens the channel as the side that accepted the connection. With node keys,
    /// [`Channel::peer`] is then the node whose key the peer proved to hold; a key not in
    /// the list is refused ([`ChannelError::UnknownPeerKey`]).
    pub fn accept(stream: S, keys: &ChannelKeys) -> Result<Self, ChannelError> {
        match &keys.id {
            Some(id) => Self::handshake_keyed(stream, &keys.psk, id, None),
            None => Self::handshake(stream, &keys.psk, false),
        }
    }

    /// The authenticated node number of the peer; None on a shared-secret-only channel.
    pub fn peer(&self) -> Option<u32> {
        self.peer
    }

    /// Checks a node number the peer states (in a header) against the authenticated one:
    /// [`ChannelError::Impersonation`] if they differ. Always Ok on a shared-secret-only
    /// channel, where nothing can be checked.
    pub fn check_claim(&self, claimed: u32) -> Result<(), ChannelError> {
        match self.peer {
            Some(peer) if peer != claimed => Err(ChannelError::Impersonation { peer, claimed }),
            _ => Ok(()),
        }
    }

    /// NNpsk0: the initiator sends the first message, the responder answers; a peer
    /// with another secret fails at the first message it reads.
    fn handshake(mut stream: S, psk: &[u8; 32], initiator: bool) -> Result<Self, ChannelError> {
        let builder = snow::Builder::new(PATTERN.parse().map_err(noise_err)?).psk(0, psk);
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
        Ok(Self::with(stream, &mut hs, None))
    }

    /// XXpsk0: `-> psk, e` / `<- e, ee, s, es` / `-> s, se`. The responder checks the
    /// secret at message 1; the initiator checks the responder's key at message 2 (before
    /// revealing its own); the responder looks the initiator's key up at message 3.
    /// `dial`: the node the initiator expects (None on the responder).
    fn handshake_keyed(
        mut stream: S,
        psk: &[u8; 32],
        id: &NodeIdentity,
        dial: Option<u32>,
    ) -> Result<Self, ChannelError> {
        let expected = match dial {
            Some(n) => Some((n, id.ring.get(n).ok_or(ChannelError::NoKeyFor(n))?)),
            None => None,
        };
        let builder = snow::Builder::new(KEYED_PATTERN.parse().map_err(noise_err)?)
            .prologue(KEYED_PROLOGUE)
            .psk(0, psk)
            .local_private_key(&id.key.private);
        let initiator = dial.is_some();
        let mut hs = if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
        .map_err(noise_err)?;
        let mut buf = vec![0u8; MAX_FRAME];
        let mut msg = Vec::new();
        let mut peer = None;
        for sending in [initiator, !initiator, initiator] {
            if sending {
                let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
                write_frame(&mut stream, &buf[..n])?;
                stream.flush()?;
                continue;
            }
            if !read_frame(&mut stream, &mut msg)? {
                return Err(ChannelError::Handshake);
            }
            hs.read_message(&msg, &mut buf)
                .map_err(|_| ChannelError::Handshake)?;
            if peer.is_some() {
                continue;
            }
            // The peer's static key, authenticated by the message just read (es or se).
            let Some(rs) = hs.get_remote_static() else {
                continue;
            };
            let key = PublicKey(rs.try_into().map_err(|_| ChannelError::Handshake)?);
            let owner = id.ring.node_of(&key);
            peer = Some(match (expected, owner) {
                (Some((want, want_key)), _) if key == want_key => want,
                (Some((want, _)), Some(actual)) => {
                    return Err(ChannelError::WrongPeer {
                        expected: want,
                        actual,
                    })
                }
                (_, None) => return Err(ChannelError::UnknownPeerKey(key)),
                (None, Some(n)) => n,
            });
        }
        if !hs.is_handshake_finished() || peer.is_none() {
            return Err(ChannelError::Handshake);
        }
        Ok(Self::with(stream, &mut hs, peer))
    }

    /// The channel of finished handshake `hs`: Noise's transport, ciphers of ours
    /// (transport.rs), from the keys the handshake split into.
    fn with(stream: S, hs: &mut snow::HandshakeState, peer: Option<u32>) -> Self {
        let (initiator_key, responder_key) = hs.dangerously_get_raw_split();
        let (send, recv) = if hs.is_initiator() {
            (initiator_key, responder_key)
        } else {
            (responder_key, initiator_key)
        };
        let send = Arc::new(Mutex::new(Cipher::new(send, 0)));
        let recv = Arc::new(Mutex::new(Cipher::new(recv, 0)));
        Self::of(stream, send, recv, peer)
    }

    fn of(
        stream: S,
        send: Arc<Mutex<Cipher>>,
        recv: Arc<Mutex<Cipher>>,
        peer: Option<u32>,
    ) -> Self {
        Channel {
            stream,
            send,
            recv,
            out: Filling::default(),
            lent: false,
            lent_recv: false,
            inbuf: Vec::new(),
            in_pos: 0,
            raw: Unread::default(),
            peer_finished: false,
            peer,
        }
    }

    fn not_lent(&self) -> io::Result<()> {
        if self.lent {
            return Err(io::Error::other(
                "the channel's sending side is lent to another process",
            ));
        }
        Ok(())
    }

    fn not_lent_recv(&self) -> io::Result<()> {
        if self.lent_recv {
            return Err(io::Error::other(
                "the channel's receiving side is lent to another process",
            ));
        }
        Ok(())
    }

    /// Makes sure the next whole frame is in `raw`, after its 2-byte length: its length.
    /// Err(UnexpectedEof) when the stream ends first.
    fn frame_in_raw(&mut self) -> io::Result<usize> {
        if !self.raw.fill(&mut self.stream, 2)? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the channel in the middle of a transfer",
            ));
        }
        let head = self.raw.pending();
        let len = u16::from_be_bytes([head[0], head[1]]) as usize;
        if !self.raw.fill(&mut self.stream, 2 + len)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(len)
    }

    /// Seals the frame filled (nothing: the end frame) and, if the batch is full or
    /// `now`, sends what was sealed.
    fn send_filled(&mut self, now: bool) -> io::Result<()> {
        self.not_lent()?;
        self.out.seal(&mut *locked(&self.send)?)?;
        if now || self.out.batch_full() {
            // Frames, each with its length and tag, in one write.
            self.stream.write_all(self.out.take_sealed())?;
        }
        Ok(())
    }

    /// Reads the next frame and decrypts it into `dest` if it has room (Some(plaintext
    /// length)), else into `inbuf` (None). Err(UnexpectedEof) when the stream ends.
    fn next_frame(&mut self, dest: &mut [u8]) -> io::Result<Option<usize>> {
        let len = self.frame_in_raw()?;
        let frame = &self.raw.pending()[2..2 + len];
        let plain = len.saturating_sub(TAG);
        // Room for the ciphertext (it is opened in place there).
        let direct = dest.len() >= len && plain > 0;
        if !direct {
            self.inbuf.resize(len, 0);
        }
        let out: &mut [u8] = if direct { dest } else { &mut self.inbuf };
        out[..len].copy_from_slice(frame);
        let n = locked(&self.recv)?.open(&mut out[..len])?;
        self.raw.take(2 + len);
        if direct {
            Ok(Some(n))
        } else {
            self.inbuf.truncate(n);
            self.in_pos = 0;
            Ok(None)
        }
    }

    /// Appends exactly `n` bytes of what is read to `out`: each frame is opened where it
    /// was read and copied once into `out`'s room, which is not zeroed first (as
    /// `read_to_end` would, for a reader like this one). The part of a frame beyond `n`
    /// is kept for the next read.
    pub fn read_append(&mut self, out: &mut Vec<u8>, mut n: usize) -> io::Result<()> {
        self.not_lent_recv()?;
        while n > 0 {
            if self.in_pos < self.inbuf.len() {
                let k = n.min(self.inbuf.len() - self.in_pos);
                out.extend_from_slice(&self.inbuf[self.in_pos..self.in_pos + k]);
                self.in_pos += k;
                n -= k;
                continue;
            }
            if self.peer_finished {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let len = self.frame_in_raw()?;
            let frame = &mut self.raw.pending_mut()[2..2 + len];
            let plain = locked(&self.recv)?.open(frame)?;
            if plain == 0 {
                // The peer's end, in the middle of what is read.
                self.raw.take(2 + len);
                self.peer_finished = true;
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let k = n.min(plain);
            out.extend_from_slice(&frame[..k]);
            if k < plain {
                self.inbuf.clear();
                self.inbuf.extend_from_slice(&frame[k..plain]);
                self.in_pos = 0;
            }
            self.raw.take(2 + len);
            n -= k;
        }
        Ok(())
    }

    /// A message body of `n` bytes, read as [`crate::wire::read_large`] does (memory
    /// grows with what arrives) but with [`Channel::read_append`]: for
    /// [`crate::wire::recv_framed_by`].
    pub fn read_large(&mut self, n: usize) -> io::Result<Vec<u8>> {
        crate::wire::read_in_steps(n, |body, k| self.read_append(body, k))
    }

    /// Sends what was written (sealed frames and the one being filled).
    fn flush_out(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.send_filled(true)?;
        } else if self.out.has_sealed() {
            self.not_lent()?;
            self.stream.write_all(self.out.take_sealed())?;
        }
        Ok(())
    }

    /// Sends everything written so far and marks a clean end of what this side sends.
    pub fn finish(&mut self) -> io::Result<()> {
        self.flush_out()?;
        self.send_filled(true)?;
        self.stream.flush()
    }

    /// Lends the sending side: everything written so far is sent, and the key and the
    /// number of the next frame are returned, for a [`crate::transport::FrameWriter`]
    /// into (a duplicate of) the same stream, elsewhere. Nothing is sent on this channel
    /// until [`Channel::take_back_sender`].
    pub fn lend_sender(&mut self) -> io::Result<LentKey> {
        self.flush()?;
        self.lent = true;
        Ok(locked(&self.send)?.lend())
    }

    /// Lends the receiving side: its key, the number of the next frame, and what was
    /// read and not yet given out, for a [`crate::transport::FrameReader`] of (a
    /// duplicate of) the same stream, elsewhere. Nothing is read on this channel until
    /// [`Channel::take_back_receiver`].
    pub fn lend_receiver(&mut self) -> io::Result<RecvLend> {
        let key = locked(&self.recv)?.lend();
        if self.peer_finished {
            return Err(io::Error::other("the peer has finished sending"));
        }
        self.lent_recv = true;
        let lend = RecvLend {
            key,
            plain: self.inbuf[self.in_pos..].to_vec(),
            raw: self.raw.pending().to_vec(),
        };
        self.inbuf.clear();
        self.in_pos = 0;
        self.raw = Unread::default();
        Ok(lend)
    }

    /// The receiving side is back: its borrower opened frames up to number `nonce`
    /// (excluded), and read `plain` and `raw` beyond what it took (see
    /// [`crate::transport::FrameReader::give_back`]): read first.
    pub fn take_back_receiver(&mut self, nonce: u64, plain: Vec<u8>, raw: &[u8]) -> io::Result<()> {
        locked(&self.recv)?.resume(nonce)?;
        self.inbuf = plain;
        self.in_pos = 0;
        self.raw = Unread::of(raw);
        self.lent_recv = false;
        Ok(())
    }

    /// The sending side is back, its borrower having sent frames up to number `nonce`
    /// (excluded).
    pub fn take_back_sender(&mut self, nonce: u64) -> io::Result<()> {
        locked(&self.send)?.resume(nonce)?;
        self.lent = false;
        Ok(())
    }

    /// Splits the channel into a half to read from (over `self`'s stream) and a half to
    /// write to (over `other`, a clone of the same stream, e.g. `TcpStream::try_clone`),
    /// so that two threads can use the directions independently.
    pub fn split(mut self, other: S) -> io::Result<(Channel<S>, Channel<S>)> {
        self.flush_out()?;
        let writer = Self::of(other, self.send.clone(), self.recv.clone(), self.peer);
        Ok((self, writer))
    }

    /// The underlying stream (e.g. to set timeouts or shut it down).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

impl<S: Read + Write> Write for Channel<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.not_lent()?;
        let n = self.out.put(data);
        if self.out.is_full() {
            self.send_filled(false)?;
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
        self.not_lent_recv()?;
        while self.in_pos == self.inbuf.len() {
            if self.peer_finished {
                return Ok(0);
            }
            // A whole frame's room: decrypted straight into the caller's buffer.
            if let Some(n) = self.next_frame(buf)? {
                return Ok(n);
            }
            if self.inbuf.is_empty() {
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

    fn plain(secret: &[u8]) -> ChannelKeys {
        ChannelKeys::shared_secret_only(secret)
    }

    /// A cluster of `n` nodes: each node's private key and the shared list.
    fn cluster(n: u32) -> (Vec<PrivateKey>, KeyRing) {
        let keys: Vec<PrivateKey> = (0..n).map(|_| PrivateKey::generate().unwrap()).collect();
        let mut ring = KeyRing::default();
        for (i, k) in keys.iter().enumerate() {
            ring.insert(i as u32 + 1, k.public()).unwrap();
        }
        (keys, ring)
    }

    /// Node `node`'s channel keys in that cluster.
    fn node(secret: &[u8], keys: &[PrivateKey], ring: &KeyRing, node: u32) -> ChannelKeys {
        ChannelKeys::new(secret, node, keys[node as usize - 1].clone(), ring.clone()).unwrap()
    }

    /// Handshakes `dialer` (expecting node `dial`) with `listener` over a socket pair.
    fn pair(
        dialer: ChannelKeys,
        dial: u32,
        listener: ChannelKeys,
    ) -> (
        Result<Channel<UnixStream>, ChannelError>,
        Result<Channel<UnixStream>, ChannelError>,
    ) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || Channel::accept(b, &listener));
        // Whichever side fails drops its stream, so the other is never left waiting.
        let c = Channel::connect(a, &dialer, dial);
        (c, t.join().unwrap())
    }

    /// The bytes on the wire are snow's transport's: a peer using snow's transport after
    /// the same handshake (a node of the version before ours took the cipher over) reads
    /// what we send and is read by us.
    #[test]
    fn the_wire_is_snows_transport() {
        let psk = derive_psk(b"the secret");
        let (a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut hs = snow::Builder::new(PATTERN.parse().unwrap())
                .psk(0, &psk)
                .build_responder()
                .unwrap();
            let mut msg = Vec::new();
            let mut buf = vec![0u8; MAX_FRAME];
            assert!(read_frame(&mut b, &mut msg).unwrap());
            hs.read_message(&msg, &mut buf).unwrap();
            let n = hs.write_message(&[], &mut buf).unwrap();
            write_frame(&mut b, &buf[..n]).unwrap();
            let mut ts = hs.into_transport_mode().unwrap();
            // What we sent: two frames, then the end.
            let mut got = Vec::new();
            loop {
                assert!(read_frame(&mut b, &mut msg).unwrap());
                let n = ts.read_message(&msg, &mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            // Answered by snow.
            for piece in got.chunks(MAX_PLAIN) {
                let n = ts.write_message(piece, &mut buf).unwrap();
                write_frame(&mut b, &buf[..n]).unwrap();
            }
            let n = ts.write_message(&[], &mut buf).unwrap();
            write_frame(&mut b, &buf[..n]).unwrap();
            got
        });
        let mut c = Channel::connect(a, &plain(b"the secret"), 2).unwrap();
        let sent = data(MAX_PLAIN + 1000);
        c.write_all(&sent).unwrap();
        c.finish().unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(t.join().unwrap(), sent);
        assert_eq!(back, sent);
    }

    /// A sending side lent to a writer elsewhere, which writes into the same stream,
    /// and taken back: the peer reads one stream, in order.
    #[test]
    fn a_lent_sender_writes_into_the_same_stream() {
        let (keys, ring) = cluster(2);
        let (a, b) = UnixStream::pair().unwrap();
        let listener = node(b"s", &keys, &ring, 2);
        let t = std::thread::spawn(move || {
            let mut c = Channel::accept(b, &listener).unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            got
        });
        let mut c = Channel::connect(a, &node(b"s", &keys, &ring, 1), 2).unwrap();
        let want = data(5 * MAX_PLAIN);
        c.write_all(&want[..1000]).unwrap();
        let key = c.lend_sender().unwrap();
        assert!(
            c.write_all(b"x").is_err(),
            "nothing is sent while it is lent"
        );
        let mut w = crate::transport::FrameWriter::new(c.get_ref().try_clone().unwrap(), &key);
        for piece in want[1000..4 * MAX_PLAIN].chunks(7000) {
            w.write_all(piece).unwrap();
        }
        let (_, nonce) = w.finish().unwrap();
        assert!(c.take_back_sender(key.nonce - 1).is_err(), "never back");
        c.take_back_sender(nonce).unwrap();
        c.write_all(&want[4 * MAX_PLAIN..]).unwrap();
        c.finish().unwrap();
        assert_eq!(t.join().unwrap(), want);
    }

    /// A receiving side lent mid-stream (with bytes the channel had read and not given
    /// out) to a reader elsewhere on the same stream, which takes part of it, and taken
    /// back with what that reader read beyond: the stream reads on, whole and in order.
    #[test]
    fn a_lent_receiver_reads_part_of_the_same_stream() {
        let (keys, ring) = cluster(2);
        let (a, b) = UnixStream::pair().unwrap();
        let dialer = node(b"s", &keys, &ring, 1);
        let want = data(6 * MAX_PLAIN + 77);
        let sent = want.clone();
        let t = std::thread::spawn(move || {
            let mut c = Channel::connect(a, &dialer, 2).unwrap();
            // In pieces of odd sizes, flushed now and then.
            for (i, piece) in sent.chunks(10_000).enumerate() {
                c.write_all(piece).unwrap();
                if i % 7 == 0 {
                    c.flush().unwrap();
                }
            }
            c.finish().unwrap();
        });
        let mut c = Channel::accept(b, &node(b"s", &keys, &ring, 2)).unwrap();
        let mut got = vec![0u8; 1000];
        c.read_exact(&mut got).unwrap();
        let lend = c.lend_receiver().unwrap();
        assert!(
            c.read(&mut [0u8; 1]).is_err(),
            "nothing is read while it is lent"
        );
        let mut r = crate::transport::FrameReader::new(c.get_ref().try_clone().unwrap(), lend);
        let mut part = vec![0u8; 3 * MAX_PLAIN + 4321];
        r.read_exact(&mut part).unwrap();
        got.extend_from_slice(&part);
        let (nonce, plain, raw) = r.give_back();
        c.take_back_receiver(nonce, plain, &raw).unwrap();
        c.read_to_end(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(got, want);
    }

    /// A stream that counts the bytes written into it.
    struct Counted(UnixStream, Arc<std::sync::atomic::AtomicUsize>);
    impl Read for Counted {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Counted {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let n = self.0.write(b)?;
            self.1.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Two ends of a channel (no handshake: keys of the test's own), the first one's
    /// bytes written counted.
    fn counted_pair() -> (
        Channel<Counted>,
        Channel<UnixStream>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (x, y) = UnixStream::pair().unwrap();
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = |k: u8| Arc::new(Mutex::new(Cipher::new([k; 32], 0)));
        let a = Channel::of(Counted(x, sent.clone()), c(1), c(2), None);
        let b = Channel::of(y, c(2), c(1), None);
        (a, b, sent)
    }

    #[test]
    fn frames_go_out_together_at_a_flush_or_a_full_batch() {
        let (mut a, mut b, sent) = counted_pair();
        let sent = || sent.load(std::sync::atomic::Ordering::SeqCst);
        // Three full frames and a part: nothing is sent before the flush.
        let three = data(3 * MAX_PLAIN + 1000);
        a.write_all(&three).unwrap();
        assert_eq!(sent(), 0, "frames sent before the flush");
        a.flush().unwrap();
        assert_eq!(sent(), 4 * 2 + three.len() + 4 * TAG);
        let mut got = vec![0u8; three.len()];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, three);
        // A batch's worth goes out without a flush; the frame begun after it does not.
        let per_batch = crate::transport::BATCH / (2 + MAX_FRAME);
        let many = data(per_batch * MAX_PLAIN + 10);
        let t = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        let before = sent();
        a.write_all(&many).unwrap();
        assert_eq!(sent() - before, per_batch * (2 + MAX_FRAME));
        a.finish().unwrap();
        assert_eq!(t.join().unwrap(), many);
    }

    #[test]
    fn bodies_are_read_across_frames_and_what_follows_is_kept() {
        let (a, b) = pair(plain(b"s"), 1, plain(b"s"));
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        // Messages that end inside frames, in the middle of what the reader has read.
        let all = data(5 * MAX_PLAIN + 777);
        let t = std::thread::spawn(move || {
            for piece in all.chunks(40_000) {
                a.write_all(piece).unwrap();
            }
            a.finish().unwrap();
            all
        });
        let mut got = Vec::new();
        for n in [1, 3 * MAX_PLAIN, 5, MAX_PLAIN - 3, 700] {
            b.read_append(&mut got, n).unwrap();
        }
        let all = t.join().unwrap();
        // The rest, by the plain reads, from where the appends stopped.
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got, all);
        // Past the end: an error, not a short body.
        assert_eq!(
            b.read_append(&mut Vec::new(), 1).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        // A large body the way the link's readers take it.
        let (a, b) = pair(plain(b"s"), 1, plain(b"s"));
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        let body = data(crate::wire::FIRST_STEP + 3 * MAX_PLAIN);
        let b2 = body.clone();
        let t = std::thread::spawn(move || {
            a.write_all(&b2).unwrap();
            a.flush().unwrap();
            a
        });
        assert_eq!(b.read_large(body.len()).unwrap(), body);
        drop(t.join().unwrap());
        // Cut short: the stream ends in the middle of a body.
        assert!(b.read_large(10).is_err());
    }

    #[test]
    fn round_trip_both_ways() {
        let (keys, ring) = cluster(2);
        for (dialer, listener) in [
            (plain(b"the secret"), plain(b"the secret\n")),
            (
                node(b"the secret", &keys, &ring, 1),
                node(b"the secret\n", &keys, &ring, 2),
            ),
        ] {
            let (a, b) = UnixStream::pair().unwrap();
            let payload = data(3 << 20);
            let p2 = payload.clone();
            let t = std::thread::spawn(move || {
                let mut c = Channel::accept(b, &listener).unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                assert_eq!(got, p2);
                c.write_all(b"restored 4242").unwrap();
                c.finish().unwrap();
            });
            let mut c = Channel::connect(a, &dialer, 2).unwrap();
            for chunk in payload.chunks(100_000) {
                c.write_all(chunk).unwrap();
            }
            c.finish().unwrap();
            let mut reply = String::new();
            c.read_to_string(&mut reply).unwrap();
            assert_eq!(reply, "restored 4242");
            t.join().unwrap();
        }
    }

    #[test]
    fn nodes_of_one_cluster_learn_each_others_numbers() {
        let (keys, ring) = cluster(3);
        let (c, a) = pair(
            node(b"secret", &keys, &ring, 3),
            1,
            node(b"secret", &keys, &ring, 1),
        );
        let (mut c, a) = (c.unwrap(), a.unwrap());
        assert_eq!(c.peer(), Some(1));
        assert_eq!(a.peer(), Some(3));
        assert!(a.check_claim(3).is_ok());
        assert!(matches!(
            a.check_claim(2),
            Err(ChannelError::Impersonation {
                peer: 3,
                claimed: 2
            })
        ));
        // Both halves of a split channel know the peer.
        let s2 = a.get_ref().try_clone().unwrap();
        let (r, w) = a.split(s2).unwrap();
        assert_eq!((r.peer(), w.peer()), (Some(3), Some(3)));
        c.write_all(b"hi").unwrap();
        c.finish().unwrap();
        let mut r = r;
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi");
        // Without node keys nothing is known, and no claim can be checked.
        let (c, a) = pair(plain(b"secret"), 1, plain(b"secret"));
        assert_eq!(c.unwrap().peer(), None);
        let a = a.unwrap();
        assert_eq!(a.peer(), None);
        assert!(a.check_claim(7).is_ok());
    }

    /// The attack per-node keys stop: node 3 has the cluster secret and dials node 1 saying
    /// it is node 2 (a migration header's `from`). Node 1 learns it is node 3.
    #[test]
    fn a_node_cannot_pass_for_another() {
        let (keys, ring) = cluster(3);
        let (c, a) = pair(
            node(b"secret", &keys, &ring, 3),
            1,
            node(b"secret", &keys, &ring, 1),
        );
        let (_c, a) = (c.unwrap(), a.unwrap());
        assert_eq!(a.peer(), Some(3));
        let claimed_from = 2;
        let e = a.check_claim(claimed_from).unwrap_err();
        assert_eq!(
            e.to_string(),
            "peer authenticated as node 3 claims to be node 2"
        );
        // (Node 3 cannot make up a key for node 2 either: see a_key_not_in_the_list_is_refused.)
    }

    #[test]
    fn a_key_not_in_the_list_is_refused() {
        let (keys, ring) = cluster(2);
        // The stranger knows the secret and the cluster's keys, but its own key is not listed.
        let stranger = PrivateKey::generate().unwrap();
        let mut its_ring = ring.clone();
        its_ring.insert(9, stranger.public()).unwrap();
        let s = ChannelKeys::new(b"secret", 9, stranger.clone(), its_ring).unwrap();
        let (c, a) = pair(s.clone(), 1, node(b"secret", &keys, &ring, 1));
        match a {
            Err(ChannelError::UnknownPeerKey(k)) => assert_eq!(k, stranger.public()),
            other => panic!("{:?}", other.map(|c| c.peer())),
        }
        // The dialer learns it when the listener hangs up.
        if let Ok(mut c) = c {
            let mut v = Vec::new();
            assert!(c.read_to_end(&mut v).is_err());
        }
        // Listening with an unlisted key: the dialer refuses it.
        let (c, _a) = pair(node(b"secret", &keys, &ring, 1), 2, s);
        assert!(
            matches!(c, Err(ChannelError::UnknownPeerKey(k)) if k == stranger.public()),
            "{:?}",
            c.err()
        );
    }

    #[test]
    fn a_listener_with_another_nodes_key_is_refused() {
        let (keys, ring) = cluster(3);
        // Node 1 dials what it thinks is node 2; node 3 answers.
        let (c, a) = pair(
            node(b"secret", &keys, &ring, 1),
            2,
            node(b"secret", &keys, &ring, 3),
        );
        assert!(
            matches!(
                c,
                Err(ChannelError::WrongPeer {
                    expected: 2,
                    actual: 3
                })
            ),
            "{:?}",
            c.err()
        );
        // Node 1 never sent its own key: node 3's side fails the handshake.
        assert!(matches!(a, Err(ChannelError::Handshake)), "{:?}", a.err());
        // A node that has no key in the list cannot be dialled.
        let mut small = KeyRing::default();
        small.insert(1, keys[0].public()).unwrap();
        let k = ChannelKeys::new(b"secret", 1, keys[0].clone(), small).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            Channel::connect(a, &k, 2),
            Err(ChannelError::NoKeyFor(2))
        ));
    }

    #[test]
    fn wrong_secret_fails_the_handshake() {
        let (keys, ring) = cluster(2);
        for (one, two) in [
            (plain(b"secret one"), plain(b"secret two")),
            (
                node(b"secret one", &keys, &ring, 2),
                node(b"secret two", &keys, &ring, 1),
            ),
            // Keys on one side only.
            (node(b"secret one", &keys, &ring, 2), plain(b"secret one")),
            (plain(b"secret one"), node(b"secret one", &keys, &ring, 1)),
        ] {
            let (r, server) = pair(two, 2, one);
            assert!(
                matches!(server, Err(ChannelError::Handshake)),
                "{:?}",
                server.err()
            );
            // The initiator learns it when its first frame is refused or the stream closes.
            if let Ok(mut c) = r {
                let _ = c.write_all(b"x");
                let _ = c.finish();
                let mut s = String::new();
                assert!(c.read_to_string(&mut s).is_err());
            }
        }
    }

    #[test]
    fn key_files_and_lists_parse_strictly() {
        let k = PrivateKey::generate().unwrap();
        let again = PrivateKey::from_hex(&format!("  {}\n", k.to_hex())).unwrap();
        assert_eq!(again.public(), k.public());
        assert_ne!(PrivateKey::generate().unwrap().public(), k.public());
        assert!(PrivateKey::from_hex("abc").is_err());
        assert!(PrivateKey::from_hex(&"zz".repeat(32)).is_err());
        // Known X25519 vector (RFC 7748 section 6.1, Alice).
        let alice = PrivateKey::from_hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        )
        .unwrap();
        assert_eq!(
            alice.public().to_string(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        let (_, ring) = cluster(3);
        let text = format!("{}\n# a comment\n\n", ring.to_text());
        assert_eq!(KeyRing::parse(&text).unwrap(), ring);
        let key1 = ring.get(1).unwrap();
        let e = |t: &str| KeyRing::parse(t).unwrap_err().to_string();
        assert_eq!(
            e(&format!("1 {key1}\n1 {}", ring.get(2).unwrap())),
            "line 2: node 1 is listed twice"
        );
        assert_eq!(
            e(&format!("1 {key1}\n2 {key1}")),
            "line 2: node 2 has the same key as node 1"
        );
        assert!(e(&format!("0 {key1}")).contains("start at 1"));
        assert!(e("x 00").starts_with("line 1: 'x' is not a node number"));
        assert!(e("1 00").contains("64 hex digits"));
        assert!(e(&format!("1 {key1} extra")).contains("NODE KEY"));
        // This node's key must be the one listed for it.
        let (keys, ring) = cluster(2);
        assert!(matches!(
            ChannelKeys::new(b"s", 1, keys[1].clone(), ring.clone()),
            Err(KeyError::Mismatch(1))
        ));
        assert!(matches!(
            ChannelKeys::new(b"s", 3, keys[0].clone(), ring),
            Err(KeyError::Missing(3))
        ));
    }

    /// Forwards frames from `from` to `to`, letting `mangle` change frame `k` (the
    /// handshake is frames 0 and 1 of this direction with node keys, 0 without) or cut
    /// the stream (returning false).
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
        keyed: bool,
        payload: Vec<u8>,
        mangle: impl Fn(usize, &mut Vec<u8>) -> bool + Send + 'static,
    ) -> io::Result<Vec<u8>> {
        let (keys, ring) = cluster(2);
        let (dialer, listener) = if keyed {
            (node(b"k", &keys, &ring, 1), node(b"k", &keys, &ring, 2))
        } else {
            (plain(b"k"), plain(b"k"))
        };
        let (a, a_relay) = UnixStream::pair().unwrap();
        let (b_relay, b) = UnixStream::pair().unwrap();
        let up = relay(
            a_relay.try_clone().unwrap(),
            b_relay.try_clone().unwrap(),
            mangle,
        );
        let down = relay(b_relay, a_relay, |_, _| true);
        let sender = std::thread::spawn(move || {
            if let Ok(mut c) = Channel::connect(a, &dialer, 2) {
                let _ = c.write_all(&payload);
                let _ = c.finish();
            }
        });
        let mut c = Channel::accept(b, &listener).map_err(io::Error::other)?;
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
        for keyed in [false, true] {
            // The first transport frame from the initiator.
            let d = if keyed { 2 } else { 1 };
            let payload = data(300_000);
            assert_eq!(
                through(keyed, payload.clone(), |_, _| true).unwrap(),
                payload
            );
            let flipped = through(keyed, payload.clone(), move |k, f| {
                if k == d + 1 {
                    f[100] ^= 0x20;
                }
                true
            });
            assert_eq!(flipped.unwrap_err().kind(), io::ErrorKind::InvalidData);
            // A frame sent again in place of the next one (replayed) fails: transport
            // nonces are counters.
            let kept = std::sync::Mutex::new(Vec::new());
            let replayed = through(keyed, payload.clone(), move |k, f| {
                let mut kept = kept.lock().unwrap();
                if k == d + 1 {
                    *kept = f.clone();
                } else if k == d + 2 {
                    *f = kept.clone();
                }
                true
            });
            assert_eq!(replayed.unwrap_err().kind(), io::ErrorKind::InvalidData);
            let cut = through(keyed, payload.clone(), move |k, _| k < d + 2);
            assert_eq!(cut.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
            // A changed handshake message fails the handshake.
            for h in 0..d {
                let bad = through(keyed, payload.clone(), move |k, f| {
                    if k == h {
                        let last = f.len() - 1;
                        f[last] ^= 1;
                    }
                    true
                });
                assert!(bad.is_err(), "keyed {keyed}, handshake message {h}");
            }
        }
    }

    /// A whole handshake replayed to a listener (message 1, then message 3 of a recorded
    /// session) fails: message 3 depends on the listener's fresh ephemeral key.
    #[test]
    fn a_replayed_handshake_is_refused() {
        let (keys, ring) = cluster(2);
        let (a, a_relay) = UnixStream::pair().unwrap();
        let (b_relay, b) = UnixStream::pair().unwrap();
        let rec = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let r2 = rec.clone();
        let up = relay(
            a_relay.try_clone().unwrap(),
            b_relay.try_clone().unwrap(),
            move |_, f| {
                r2.lock().unwrap().push(f.clone());
                true
            },
        );
        let down = relay(b_relay, a_relay, |_, _| true);
        let (d, l) = (node(b"k", &keys, &ring, 1), node(b"k", &keys, &ring, 2));
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            let mut c = Channel::accept(b, &l2).unwrap();
            let mut v = Vec::new();
            c.read_to_end(&mut v).unwrap();
        });
        let mut c = Channel::connect(a, &d, 2).unwrap();
        c.write_all(b"run this").unwrap();
        c.finish().unwrap();
        t.join().unwrap();
        drop(c);
        up.join().unwrap();
        down.join().unwrap();
        let rec = rec.lock().unwrap().clone();
        // Replay the recorder's frames to a fresh listener, ignoring its answers.
        let (mut x, y) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || Channel::accept(y, &l).map(|c| c.peer()));
        for f in &rec {
            if write_frame(&mut x, f).is_err() {
                break;
            }
        }
        let r = t.join().unwrap();
        assert!(matches!(r, Err(ChannelError::Handshake)), "{r:?}");
    }

    /// `cargo test -p mosix-proto --release -- --ignored --nocapture bench_handshake`:
    /// median time of one connect + accept over TCP on loopback, both handshakes.
    #[test]
    #[ignore]
    fn bench_handshake() {
        use std::net::{TcpListener, TcpStream};
        let (keys, ring) = cluster(2);
        for (name, d, l) in [
            ("nnpsk0_shared_secret", plain(b"k"), plain(b"k")),
            (
                "xxpsk0_node_keys",
                node(b"k", &keys, &ring, 1),
                node(b"k", &keys, &ring, 2),
            ),
        ] {
            let lis = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = lis.local_addr().unwrap();
            let t = std::thread::spawn(move || {
                for s in lis.incoming().take(201) {
                    let s = s.unwrap();
                    s.set_nodelay(true).unwrap();
                    let mut c = Channel::accept(s, &l).unwrap();
                    c.write_all(b"k").unwrap();
                    c.flush().unwrap();
                }
            });
            let mut times = Vec::new();
            for _ in 0..201 {
                let t0 = std::time::Instant::now();
                let s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let mut c = Channel::connect(s, &d, 2).unwrap();
                let mut b = [0u8; 1];
                c.read_exact(&mut b).unwrap();
                times.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            t.join().unwrap();
            times.sort_by(|a, b| a.total_cmp(b));
            println!("BENCH channel_handshake_{name} {:.0} us", times[100]);
        }
    }
}
