//! Messages of migration and of the home/deputy link, and their framing.
//!
//! Every message is one frame: `len u32 LE | postcard bytes`, at most [`MAX_MSG`]. Between
//! nodes the frames travel inside an authenticated [`crate::channel::Channel`].
//!
//! Node-to-node connections start with a [`Hello`]:
//! - `Hello::Migrate`: the source streams the image as raw chunks ended by an empty one,
//!   then [`Tail`]; the destination restores it held (stopped) and answers [`Verdict`];
//!   the source sends [`Decision`]; on `Commit` the destination lets the process run and
//!   answers `Verdict::Running`, and only then does the source end its frozen copy.
//! - `Hello::Link`: the node now hosting a process opens its link to the process's home:
//!   [`ToHome`] one way, [`ToHost`] the other. They carry what the process's supervisor
//!   (on its host) and its deputy (at home) say to each other, and the moves.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{self, Read, Write};

/// The largest message either side accepts.
pub const MAX_MSG: usize = 4 << 20;

/// Messages up to this size are encoded into one buffer and written at once; larger ones
/// (a forwarded call's data) are written as they are encoded, their bytes never copied
/// into a message first.
const SMALL: usize = 64 << 10;

/// Writes one message as a frame (not flushed).
pub fn send<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let n = postcard::experimental::serialized_size(msg).map_err(io::Error::other)?;
    if n > MAX_MSG {
        return Err(io::Error::other("message too large"));
    }
    if n <= SMALL {
        let mut frame = Vec::with_capacity(n + 4);
        frame.extend_from_slice(&(n as u32).to_le_bytes());
        let frame = postcard::to_extend(msg, frame).map_err(io::Error::other)?;
        return w.write_all(&frame);
    }
    // Small fields gather in the buffer; a large byte field goes straight through.
    let mut bw = io::BufWriter::with_capacity(16 << 10, w);
    bw.write_all(&(n as u32).to_le_bytes())?;
    let bw = postcard::to_io(msg, bw).map_err(io::Error::other)?;
    bw.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

/// A message's bytes that only pass through (a frame between a process's supervisor
/// and its deputy): read once from the stream, written once into the next, never copied
/// in between. Encoded as a byte string.
#[derive(Clone, Default)]
pub struct Frame {
    buf: Vec<u8>,
    start: usize,
}

impl Frame {
    /// The bytes of `buf` from `start` on.
    pub fn from_parts(buf: Vec<u8>, start: usize) -> Frame {
        let start = start.min(buf.len());
        Frame { buf, start }
    }
    /// Its buffer, and where its bytes start in it.
    pub fn into_parts(self) -> (Vec<u8>, usize) {
        (self.buf, self.start)
    }
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.start > 0 {
            self.buf.drain(..self.start);
        }
        self.buf
    }
}

impl From<Vec<u8>> for Frame {
    fn from(buf: Vec<u8>) -> Frame {
        Frame { buf, start: 0 }
    }
}

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl PartialEq for Frame {
    fn eq(&self, o: &Frame) -> bool {
        **self == **o
    }
}

impl Eq for Frame {}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frame({} bytes)", self.len())
    }
}

impl Serialize for Frame {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self)
    }
}

impl<'de> Deserialize<'de> for Frame {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Frame, D::Error> {
        Ok(serde_bytes::ByteBuf::deserialize(d)?.into_vec().into())
    }
}

/// Appends `v` as postcard's varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A varint at the start of `b`: (value, bytes it took).
fn get_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &x) in b.iter().enumerate().take(10) {
        v |= ((x & 0x7f) as u64) << (7 * i);
        if x & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Writes (not flushed) the message `Enum::Variant(bytes)` where the variant has index
/// `variant` and `bytes` is `inner` encoded: what `send` of such a message writes, without
/// encoding `inner` into bytes first.
pub fn send_wrapped<W: Write, T: Serialize>(w: &mut W, variant: u32, inner: &T) -> io::Result<()> {
    let n = postcard::experimental::serialized_size(inner).map_err(io::Error::other)?;
    let mut head = Vec::with_capacity(24);
    head.extend_from_slice(&[0; 4]);
    put_varint(&mut head, variant as u64);
    put_varint(&mut head, n as u64);
    let total = head.len() - 4 + n;
    if total > MAX_MSG {
        return Err(io::Error::other("message too large"));
    }
    head[..4].copy_from_slice(&(total as u32).to_le_bytes());
    if total <= SMALL {
        let frame = postcard::to_extend(inner, head).map_err(io::Error::other)?;
        return w.write_all(&frame);
    }
    let mut bw = io::BufWriter::with_capacity(16 << 10, w);
    bw.write_all(&head)?;
    let bw = postcard::to_io(inner, bw).map_err(io::Error::other)?;
    bw.into_inner().map_err(|e| e.into_error())?;
    Ok(())
}

/// Writes (not flushed) the message `Enum::Variant(frame)` (variant index `variant`,
/// a byte-string field): as `send` would, with the frame's bytes written from where they
/// are.
pub fn send_frame<W: Write>(w: &mut W, variant: u32, frame: &[u8]) -> io::Result<()> {
    send_frame_parts(w, variant, &[frame])
}

/// [`send_frame`] of the frame made of `parts`, each written from where it is.
pub fn send_frame_parts<W: Write>(w: &mut W, variant: u32, parts: &[&[u8]]) -> io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut head = Vec::with_capacity(24);
    head.extend_from_slice(&[0; 4]);
    put_varint(&mut head, variant as u64);
    put_varint(&mut head, len as u64);
    let total = head.len() - 4 + len;
    if total > MAX_MSG {
        return Err(io::Error::other("message too large"));
    }
    head[..4].copy_from_slice(&(total as u32).to_le_bytes());
    if total <= SMALL {
        for p in parts {
            head.extend_from_slice(p);
        }
        return w.write_all(&head);
    }
    let mut bufs: Vec<io::IoSlice<'_>> = std::iter::once(&head[..])
        .chain(parts.iter().copied())
        .map(io::IoSlice::new)
        .collect();
    write_all_vectored(w, &mut bufs)
}

/// Writes all of `bufs`, with as few calls as `w` takes them in (one `writev` for a
/// socket: a reader waiting for a message then wakes once, not once for its head and
/// again for its body).
pub fn write_all_vectored<W: Write + ?Sized>(
    w: &mut W,
    mut bufs: &mut [io::IoSlice<'_>],
) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one message, like [`recv`]; but a message of variant index `variant`, whose only
/// field is a byte string, is handed to `wrap` as a [`Frame`] of the bytes read, not
/// decoded (copied) out of them.
pub fn recv_framed<R: Read, T: DeserializeOwned>(
    r: &mut R,
    variant: u32,
    wrap: impl FnOnce(Frame) -> T,
) -> io::Result<Option<T>> {
    recv_framed_by(r, variant, wrap, read_large)
}

/// [`recv_framed`], a large body being read by `large` (as [`read_large`] does; e.g.
/// [`crate::channel::Channel::read_large`], which decrypts into it without zeroing it
/// first).
pub fn recv_framed_by<R: Read, T: DeserializeOwned>(
    r: &mut R,
    variant: u32,
    wrap: impl FnOnce(Frame) -> T,
    large: impl FnOnce(&mut R, usize) -> io::Result<Vec<u8>>,
) -> io::Result<Option<T>> {
    let Some(body) = recv_body(r, large)? else {
        return Ok(None);
    };
    if let Some((tag, a)) = get_varint(&body) {
        if tag == variant as u64 {
            if let Some((len, b)) = get_varint(&body[a..]) {
                if (a + b) as u64 + len == body.len() as u64 {
                    return Ok(Some(wrap(Frame::from_parts(body, a + b))));
                }
            }
        }
    }
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")))
}

/// One frame's body, a large one read by `large`; Ok(None) on a clean end of stream
/// before its first byte.
fn recv_body<R: Read>(
    r: &mut R,
    large: impl FnOnce(&mut R, usize) -> io::Result<Vec<u8>>,
) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_MSG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {n} bytes is larger than the limit"),
        ));
    }
    // Memory grows with the bytes that arrive, not with the length the peer claims: a
    // small body as it comes, a large one in at most two steps (a forwarded call's 1 MiB
    // and its headers in one, read in one pass).
    if n > SMALL {
        return large(r, n).map(Some);
    }
    let mut body = Vec::new();
    if r.by_ref().take(n as u64).read_to_end(&mut body)? != n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(body))
}

/// Writes one message and flushes.
pub fn send_flush<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    send(w, msg)?;
    w.flush()
}

/// The first step of a large body (a forwarded call's data and its headers).
pub const FIRST_STEP: usize = (1 << 20) + (64 << 10);

/// Reads a body of `n` bytes in steps, each allocated once the one before arrived: 16 KiB,
/// then up to [`FIRST_STEP`], then the rest (a peer that claims much and sends little
/// costs at most 16 KiB).
pub fn read_large<R: Read>(r: &mut R, n: usize) -> io::Result<Vec<u8>> {
    read_in_steps(n, |body, k| {
        // Read into the new room as it is: not zeroed first (where `r` reads into
        // room not yet written, as sockets and files do).
        if r.by_ref().take(k as u64).read_to_end(body)? != k {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    })
}

/// A body of `n` bytes in the steps of [`read_large`], each appended by `append(body,
/// k)` (exactly `k` bytes) once `body` has room for them.
pub fn read_in_steps(
    n: usize,
    mut append: impl FnMut(&mut Vec<u8>, usize) -> io::Result<()>,
) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    for step in [16 << 10, FIRST_STEP, n] {
        let at = body.len();
        let to = n.min(step.max(at));
        if to > at {
            body.reserve_exact(to - at);
            append(&mut body, to - at)?;
        }
    }
    Ok(body)
}

/// Reads one message; Ok(None) on a clean end of stream before its first byte.
pub fn recv<R: Read, T: DeserializeOwned>(r: &mut R) -> io::Result<Option<T>> {
    let Some(body) = recv_body(r, read_large)? else {
        return Ok(None);
    };
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad message: {e}")))
}

/// Reads one message that must be there.
pub fn expect<R: Read, T: DeserializeOwned>(r: &mut R) -> io::Result<T> {
    recv(r)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        )
    })
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// exit(code)
    Code(i32),
    /// killed by this signal
    Signal(i32),
    /// The node it ran on died or lost contact: its deputy ends with 137.
    Lost,
}

impl ExitStatus {
    /// From a wait status as returned by waitpid.
    pub fn from_wait(status: i32) -> ExitStatus {
        if libc_wifsignaled(status) {
            ExitStatus::Signal(status & 0x7f)
        } else {
            ExitStatus::Code((status >> 8) & 0xff)
        }
    }
    /// The shell's `$?` for it.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
            ExitStatus::Lost => 137,
        }
    }
}

fn libc_wifsignaled(status: i32) -> bool {
    ((status & 0x7f) + 1) as i8 >= 2
}

/// First message of a node-to-node connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Hello {
    Migrate(MigrateHeader),
    Link(LinkHello),
    /// The node running a process sends its home a checkpoint of it (asked for by
    /// [`ToHost::Checkpoint`]): the image as chunks ended by an empty one, then
    /// [`CkptEnd`]; home answers [`CkptVerdict`] once the image is safely written.
    Checkpoint(CkptHello),
    /// The source of a move died between announcing the commit to its mover and
    /// telling this destination (or just after): the held copy is run if still held
    /// (answered [`Resolution`]).
    Resolve(ResolveHello),
}

/// Which move [`Hello::Resolve`] is about: the process and the residence it was moving
/// into, asked by the source node `from`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResolveHello {
    pub home: u32,
    pub home_pid: i32,
    pub epoch: u64,
    pub from: u32,
}

/// The answer to [`Hello::Resolve`]: whether the process runs here now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    pub committed: bool,
}

/// First message of a checkpoint's connection from a process's host to its home.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CkptHello {
    pub home_pid: i32,
    /// The residence it was taken in, and the hosting node.
    pub epoch: u64,
    pub node: u32,
    /// The checkpoint's number ([`ToHost::Checkpoint`]).
    pub id: u64,
}

/// After a checkpoint's image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CkptEnd {
    Done {
        memory_bytes: u64,
        /// How long the process was stopped for it.
        frozen_ms: u64,
        /// Its descriptors that are files of its own /proc (see [`Tail::proc_fds`]).
        proc_fds: Vec<(i32, String)>,
        /// Its own no_new_privs (away it runs with it set).
        no_new_privs: bool,
    },
    /// It could not be saved (the image sent is not one); it goes on as it was.
    Failed(CkptError),
}

/// Home's answer to a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CkptVerdict {
    Saved { path: String },
    Failed(CkptError),
}

/// Why a checkpoint, a freeze or a recovery from a checkpoint did not happen (the process
/// goes on as it was). Crosses the link between a host and home, and threads at home;
/// users see it as one line. Failures another part reported in its own words (the
/// checkpoint engine, a file system, the deputy) are carried as their text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CkptError {
    /// The process itself cannot be saved, or held for it (the engine's or the mover's
    /// reason).
    #[error("{0}")]
    Process(String),
    /// Its file could not be made, written or named (the file system's words).
    #[error("{0}")]
    File(String),
    #[error("no process {pid} here")]
    NoSuchProcess { pid: i32 },
    #[error("checkpoint {id} of process {pid} is not expected")]
    Unexpected { id: u64, pid: i32 },
    #[error("its image was cut short")]
    CutShort,
    #[error("no connection to its home: {0}")]
    NoHome(String),
    #[error("its image did not reach its home: {0}")]
    ImageLost(String),
    #[error("its home did not confirm the checkpoint: {0}")]
    Unconfirmed(String),
    #[error("its deputy could not mark it: {0}")]
    Mark(String),
    #[error("its deputy did not mark it")]
    NotMarked,
    #[error("a checkpoint of it is being taken; try again")]
    Busy,
    #[error("it is in the middle of a move or a checkpoint; try again")]
    Moving,
    #[error("it is frozen (`migrate PID continue` first)")]
    Frozen,
    #[error("it is being recovered")]
    Recovering,
    #[error("it moved before its host took the checkpoint; try again")]
    Moved,
    #[error("its host is not linked to its home now")]
    HostUnlinked,
    #[error("it took too long")]
    TooLong,
    #[error("it ended")]
    Ended,
    #[error("node {node} died while it was taken")]
    NodeDied { node: u32 },
    /// Home has no such checkpoint pending (it was given up meanwhile).
    #[error("it is not expected any more")]
    NotExpected,
    #[error("it cannot be frozen: {0}")]
    Freeze(String),
    /// A thread could not be made for it (out of resources).
    #[error("no thread for it")]
    NoThread,
    /// A recovery: the file is not the checkpoint home counted on.
    #[error("{path} is not checkpoint {number} of this process any more")]
    NotThatCheckpoint { path: String, number: u64 },
    #[error("its checkpoint is not known here any more")]
    Forgotten,
    #[error("its deputy could not go back: {0}")]
    Rewind(String),
    #[error("no node can take it")]
    NoNode,
    /// A recovery: the last node tried refused or failed (its reason).
    #[error("{0}")]
    Move(String),
}

/// What the destination must know before the image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateHeader {
    /// The process's home node and PID there.
    pub home: u32,
    pub home_pid: i32,
    /// Sending node.
    pub from: u32,
    /// Residence number: the destination's link to home uses it (the source's + 1).
    pub epoch: u64,
    pub uid: u32,
    /// Command line, for `ps`.
    pub cmd: String,
    /// Kept from automatic migration (`mosrun -L`), and nodes it must never go to.
    pub pinned: bool,
    pub avoid: Vec<u32>,
    /// Moves it has made, this one included.
    pub migrations: u32,
    /// Why it moves (shown by `mosix ps` there, and logged).
    pub reason: String,
    /// For an automatic move: the balancer's offer (JSON of `mosix_balance::Offer`), which
    /// the destination checks against its own load before taking the process.
    pub offer: Option<String>,
    /// The home node's host name: what the process sees wherever it runs.
    pub hostname: String,
    /// The process's own no_new_privs (away it runs with it set, for its filter).
    pub no_new_privs: bool,
    /// The home node's shared paths: files under those that the host shares too are
    /// opened and used where the process runs (DFSA), not through home.
    pub shared_paths: Vec<String>,
}

/// Sent after the image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tail {
    /// The next sequence number of the process's forwarded calls (they never repeat,
    /// whatever node it runs on, so its deputy can tell a call sent again).
    pub next_seq: u64,
    /// Its descriptors that are files of its own /proc (opened where it runs, not at
    /// home): (number, path after /proc/self/).
    pub proc_fds: Vec<(i32, String)>,
    /// The move so far as its source saw it (protocol 1.4).
    pub figures: MoveFigures,
    /// Its working directory at home, when known (protocol 1.6): its next host resolves
    /// relative paths of files under shared paths against it. None: not known there (after
    /// an `fchdir`, say); relative paths are then resolved at home. (The working directory
    /// in its image is the one it has where it was saved, which away is not its home's.)
    pub cwd: Option<String>,
}

/// How a move went so far, as its source saw it when it sent the image's tail.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MoveFigures {
    /// How long the process has been stopped so far (ms).
    pub frozen_ms: u64,
    /// Bytes of memory contents sent.
    pub memory_bytes: u64,
    /// Bytes of memory sent in each pre-copy round, the final one last.
    pub rounds: Vec<u64>,
}

/// The destination's answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    /// Restored and held, waiting for the commit.
    Ready,
    /// Cannot take it; nothing was started.
    Refused(String),
    /// Committed: the process runs here now.
    Running { host_pid: i32 },
}

/// The source's decision after `Verdict::Ready`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Commit,
    Abort,
}

/// First message of a link from a process's host to its home.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkHello {
    pub home_pid: i32,
    pub epoch: u64,
    /// The hosting node.
    pub node: u32,
}

/// From the node running a process to its home.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToHome {
    /// A message for the deputy (a `mosix_remote::wire::ToDeputy` frame).
    Deputy(Frame),
    /// The process moved on to `to`; nothing follows on this link.
    Left {
        to: u32,
        /// How long it was stopped by the move, and the bytes of memory moved.
        frozen_ms: u64,
        memory_bytes: u64,
        /// Bytes sent in each pre-copy round, the final (frozen) one last (protocol 1.4).
        rounds: Vec<u64>,
    },
    /// A migration asked for (or decided there) failed; the process goes on there.
    MigrateFailed { to: u32, reason: String },
    /// A checkpoint asked for could not be taken; the process goes on there.
    CheckpointFailed { id: u64, reason: CkptError },
    /// The answer to [`ToHost::Freeze`]: it is frozen (or not), or why not.
    Frozen {
        freeze: bool,
        error: Option<CkptError>,
    },
}

/// From the home to the node running the process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToHost {
    /// A message from the deputy (a `mosix_remote::wire::FromDeputy` frame).
    Deputy(Frame),
    /// Move the process to `to` (asked for by `migrate`; `to` may be its home).
    Migrate { to: u32 },
    /// Its deputy is gone (killed at home): end it.
    Kill,
    /// Checkpoint it now as number `id` (the image goes home on a connection of its own,
    /// [`Hello::Checkpoint`]), then let it go on, stop it, or end it once home has the
    /// image.
    Checkpoint {
        id: u64,
        then: crate::control::After,
    },
    /// Hold it where it is (frozen), or let it go on.
    Freeze { freeze: bool },
}

impl ToHome {
    /// The index of [`ToHome::Deputy`] (for [`send_frame`] and [`recv_framed`]).
    pub const DEPUTY: u32 = 0;
}

impl ToHost {
    /// The index of [`ToHost::Deputy`] (for [`send_frame`] and [`recv_framed`]).
    pub const DEPUTY: u32 = 0;
}

/// A writer that cuts what is written into chunks (`len u32 LE | bytes`, raw: no
/// serialisation pass over the bytes); `finish` sends the empty chunk that ends the
/// stream. For streaming an image inside a message stream.
pub struct ChunkWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 << 10;

impl<W: Write> ChunkWriter<W> {
    pub fn new(inner: W) -> Self {
        ChunkWriter {
            inner,
            buf: Vec::with_capacity(CHUNK),
        }
    }
    fn emit(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner
                .write_all(&(self.buf.len() as u32).to_le_bytes())?;
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
    /// Ends the chunk stream and gives the inner writer back.
    pub fn finish(mut self) -> io::Result<W> {
        self.emit()?;
        self.inner.write_all(&0u32.to_le_bytes())?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for ChunkWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.is_empty() && data.len() >= CHUNK {
            self.inner.write_all(&(CHUNK as u32).to_le_bytes())?;
            self.inner.write_all(&data[..CHUNK])?;
            return Ok(CHUNK);
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.emit()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.emit()?;
        self.inner.flush()
    }
}

/// Reads a chunk stream as one byte stream: `read` gives the chunks' bytes, and 0 at the
/// empty chunk that ends it (which is then consumed); the stream the chunks come from
/// goes on after it. For restoring an image while it arrives.
pub struct ChunkReader<R: Read> {
    inner: R,
    /// Bytes left in the current chunk.
    left: usize,
    ended: bool,
}

impl<R: Read> ChunkReader<R> {
    pub fn new(inner: R) -> Self {
        ChunkReader {
            inner,
            left: 0,
            ended: false,
        }
    }
    /// Whether the chunk stream's end was read.
    pub fn ended(&self) -> bool {
        self.ended
    }
    /// Reads (and drops) the rest of the chunk stream, through its end; the bytes
    /// dropped.
    pub fn drain(&mut self) -> io::Result<u64> {
        io::copy(self, &mut io::sink())
    }
}

impl<R: Read> Read for ChunkReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut len = [0u8; 4];
            self.inner.read_exact(&mut len)?;
            let n = u32::from_le_bytes(len) as usize;
            if n == 0 {
                self.ended = true;
                return Ok(0);
            }
            if n > CHUNK {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "image chunk larger than the limit",
                ));
            }
            self.left = n;
        }
        let want = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..want])?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= got;
        Ok(got)
    }
}

/// Reads a chunk stream to its end into one buffer (at most `limit` bytes).
pub fn read_chunks<R: Read>(r: &mut R, limit: u64) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    loop {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 {
            return Ok(all);
        }
        if n > CHUNK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "image chunk larger than the limit",
            ));
        }
        if all.len() as u64 + n as u64 > limit {
            // Read the rest without keeping it, so that the stream stays in step and the
            // sender hears why (the answer follows the image).
            let total = all.len() as u64 + n as u64 + drain_chunks(r, n)?;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the image ({} MiB) is larger than the {} MiB of memory free here",
                    total >> 20,
                    limit >> 20
                ),
            ));
        }
        if all.capacity() - all.len() < n {
            // Double (images are large), but never past the limit: memory grows with the
            // bytes that arrive, not with what the peer may send.
            let room = (limit - all.len() as u64).min(usize::MAX as u64) as usize;
            all.reserve_exact(all.len().max(n).min(room));
        }
        let got = r.by_ref().take(n as u64).read_to_end(&mut all)?;
        if got != n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Copies a chunk stream's contents from `r` into `w` (without the chunk lengths), to its
/// end; at most `limit` bytes. The number of bytes copied.
pub fn copy_chunks<R: Read, W: Write>(r: &mut R, w: &mut W, limit: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 {
            w.flush()?;
            return Ok(total);
        }
        if n > CHUNK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "image chunk larger than the limit",
            ));
        }
        total += n as u64;
        if total > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the image is larger than {} MiB", limit >> 20),
            ));
        }
        r.read_exact(&mut buf[..n])?;
        w.write_all(&buf[..n])?;
    }
}

/// A writer that takes a chunk stream (as [`ChunkWriter`] makes it) and writes only its
/// contents into `inner`. [`Unchunk::ended`] says whether the empty chunk that ends the
/// stream has come.
pub struct Unchunk<W: Write> {
    inner: W,
    len: [u8; 4],
    have: usize,
    left: usize,
    ended: bool,
    /// Bytes of contents written.
    pub written: u64,
}

impl<W: Write> Unchunk<W> {
    pub fn new(inner: W) -> Self {
        Unchunk {
            inner,
            len: [0; 4],
            have: 0,
            left: 0,
            ended: false,
            written: 0,
        }
    }
    pub fn ended(&self) -> bool {
        self.ended
    }
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for Unchunk<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.ended {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bytes after the end of a chunk stream",
            ));
        }
        if self.left > 0 {
            let n = data.len().min(self.left);
            self.inner.write_all(&data[..n])?;
            self.left -= n;
            self.written += n as u64;
            return Ok(n);
        }
        let n = data.len().min(4 - self.have);
        self.len[self.have..self.have + n].copy_from_slice(&data[..n]);
        self.have += n;
        if self.have == 4 {
            self.have = 0;
            let l = u32::from_le_bytes(self.len) as usize;
            if l > CHUNK {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "image chunk larger than the limit",
                ));
            }
            self.left = l;
            self.ended = l == 0;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads and drops the `pending` bytes of the current chunk and every chunk after it, up
/// to and including the terminator; returns how many bytes were dropped.
fn drain_chunks<R: Read>(r: &mut R, pending: usize) -> io::Result<u64> {
    let mut dropped = io::copy(&mut r.by_ref().take(pending as u64), &mut io::sink())?;
    if dropped != pending as u64 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    loop {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 {
            return Ok(dropped);
        }
        if n > CHUNK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "image chunk larger than the limit",
            ));
        }
        let got = io::copy(&mut r.by_ref().take(n as u64), &mut io::sink())?;
        if got != n as u64 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        dropped += got;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `bite` bytes of the first buffers per call, and
    /// counts its calls.
    struct Bites {
        got: Vec<u8>,
        bite: usize,
        calls: usize,
    }
    impl Write for Bites {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[io::IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.bite - n);
                self.got.extend_from_slice(&b[..k]);
                n += k;
                if n == self.bite {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_large_frame_is_written_with_as_few_calls_as_the_writer_takes() {
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let parts: [&[u8]; 3] = [b"head", &payload, b"tail"];
        let mut whole = Vec::new();
        send_frame(&mut whole, ToHost::DEPUTY, &parts.concat()).unwrap();
        // A socket takes it all: one call, the head and the parts together.
        let mut all = Bites {
            got: Vec::new(),
            bite: usize::MAX,
            calls: 0,
        };
        send_frame_parts(&mut all, ToHost::DEPUTY, &parts).unwrap();
        assert_eq!((all.got == whole, all.calls), (true, 1));
        // One that takes a few bytes at a time gets them all, in order.
        let mut bites = Bites {
            got: Vec::new(),
            bite: 7,
            calls: 0,
        };
        send_frame_parts(&mut bites, ToHost::DEPUTY, &parts).unwrap();
        assert!(bites.got == whole);
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let mut buf = Vec::new();
        send(&mut buf, &ToHome::Deputy(b"hi".to_vec().into())).unwrap();
        send(
            &mut buf,
            &ToHome::MigrateFailed {
                to: 3,
                reason: "no".into(),
            },
        )
        .unwrap();
        let mut r = &buf[..];
        assert_eq!(
            recv::<_, ToHome>(&mut r).unwrap(),
            Some(ToHome::Deputy(b"hi".to_vec().into()))
        );
        assert_eq!(
            recv::<_, ToHome>(&mut r).unwrap(),
            Some(ToHome::MigrateFailed {
                to: 3,
                reason: "no".into()
            })
        );
        assert_eq!(recv::<_, ToHome>(&mut r).unwrap(), None);
        // Truncated, oversized, and garbage frames are errors, never panics.
        for cut in 1..buf.len() {
            let mut r = &buf[..cut];
            let _ = recv::<_, ToHome>(&mut r).and_then(|_| recv::<_, ToHome>(&mut r));
        }
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0x7f];
        assert!(recv::<_, ToHome>(&mut r).is_err());
        let mut r: &[u8] = &[3, 0, 0, 0, 99, 98, 97];
        assert!(recv::<_, ToHome>(&mut r).is_err());
    }

    #[test]
    fn frames_pass_through_as_the_messages_that_carry_them() {
        for len in [0usize, 5, 200, 70_000, 1 << 20] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
            let mut a = Vec::new();
            send(&mut a, &ToHost::Deputy(payload.clone().into())).unwrap();
            let mut b = Vec::new();
            send_frame(&mut b, ToHost::DEPUTY, &payload).unwrap();
            assert_eq!(a, b, "{len}");
            // A message wrapping another, encoded once.
            let inner = ToHome::MigrateFailed {
                to: 9,
                reason: "x".repeat(len.min(100_000)),
            };
            let mut c = Vec::new();
            send(
                &mut c,
                &ToHome::Deputy(postcard::to_allocvec(&inner).unwrap().into()),
            )
            .unwrap();
            let mut d = Vec::new();
            send_wrapped(&mut d, ToHome::DEPUTY, &inner).unwrap();
            assert_eq!(c, d, "{len}");
            // Read back without a copy, and other messages decoded as usual.
            send(&mut b, &ToHost::Kill).unwrap();
            let mut r = &b[..];
            let got = recv_framed(&mut r, ToHost::DEPUTY, ToHost::Deputy).unwrap();
            assert_eq!(got, Some(ToHost::Deputy(payload.into())));
            let got = recv_framed(&mut r, ToHost::DEPUTY, ToHost::Deputy).unwrap();
            assert_eq!(got, Some(ToHost::Kill));
            assert!(recv_framed(&mut r, ToHost::DEPUTY, ToHost::Deputy)
                .unwrap()
                .is_none());
        }
        // A frame whose stated length disagrees with its message is decoded as `recv`
        // decodes it, not taken whole.
        let mut bad = Vec::new();
        send_frame(&mut bad, ToHost::DEPUTY, b"abc").unwrap();
        bad[5] = 2;
        let mut r = &bad[..];
        assert_eq!(
            recv_framed(&mut r, ToHost::DEPUTY, ToHost::Deputy).unwrap(),
            recv::<_, ToHost>(&mut &bad[..]).unwrap()
        );
    }

    #[test]
    fn chunks_carry_a_stream() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7) as u8).collect();
        let mut w = ChunkWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let mut out = w.finish().unwrap();
        send(
            &mut out,
            &Tail {
                next_seq: 5,
                proc_fds: vec![],
                figures: MoveFigures::default(),
                cwd: Some("/a".into()),
            },
        )
        .unwrap();
        let mut r = &out[..];
        assert_eq!(read_chunks(&mut r, u64::MAX).unwrap(), data);
        assert_eq!(expect::<_, Tail>(&mut r).unwrap().next_seq, 5);
        // Over the limit: refused, with the whole image read past so that what follows
        // it (the tail) can still be read and answered.
        let mut r = &out[..];
        let e = read_chunks(&mut r, 100_000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("memory free here"), "{e}");
        assert_eq!(expect::<_, Tail>(&mut r).unwrap().next_seq, 5);
        // As a byte stream: its bytes, then the end, and what follows is still there.
        let mut r = &out[..];
        let mut c = ChunkReader::new(&mut r);
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        let n = c.read(&mut small).unwrap();
        got.extend_from_slice(&small[..n]);
        c.read_to_end(&mut got).unwrap();
        assert!(c.ended());
        assert_eq!(got, data);
        assert_eq!(expect::<_, Tail>(&mut r).unwrap().next_seq, 5);
        // Drained part-way.
        let mut r = &out[..];
        let mut c = ChunkReader::new(&mut r);
        c.read_exact(&mut small).unwrap();
        assert_eq!(c.drain().unwrap(), data.len() as u64 - 1000);
        assert_eq!(expect::<_, Tail>(&mut r).unwrap().next_seq, 5);
    }

    #[test]
    fn chunk_streams_unchunk_to_their_contents() {
        let data: Vec<u8> = (0..700_000u32).map(|i| (i * 13) as u8).collect();
        let mut w = ChunkWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let stream = w.finish().unwrap();
        // Written in odd pieces, as a relay passes it on.
        let mut u = Unchunk::new(Vec::new());
        for piece in stream.chunks(1001) {
            u.write_all(piece).unwrap();
        }
        assert!(u.ended());
        assert_eq!(u.written, data.len() as u64);
        assert_eq!(u.into_inner(), data);
        let mut out = Vec::new();
        assert_eq!(
            copy_chunks(&mut &stream[..], &mut out, u64::MAX).unwrap(),
            data.len() as u64
        );
        assert_eq!(out, data);
        assert!(copy_chunks(&mut &stream[..], &mut Vec::new(), 1000).is_err());
        assert!(copy_chunks(&mut &stream[..stream.len() - 2], &mut Vec::new(), u64::MAX).is_err());
    }

    #[test]
    fn wait_statuses() {
        assert_eq!(ExitStatus::from_wait(3 << 8), ExitStatus::Code(3));
        assert_eq!(ExitStatus::from_wait(9), ExitStatus::Signal(9));
        assert_eq!(ExitStatus::Signal(2).shell_code(), 130);
    }
}
