//! What the supervisor of a process away from home and its deputy at home say to each
//! other (through the two mosixd, which pass it on): calls, their answers, signals and
//! what happens to the process.
//!
//! Frames are postcard-encoded messages behind a 4-byte little-endian length, at most
//! [`MAX_FRAME`] bytes; a reader's memory grows with the bytes that arrive (a large frame
//! in at most two steps).

pub use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

/// The longest frame either end accepts: a forwarded buffer plus headers.
pub const MAX_FRAME: usize = (crate::spec::MAX_IO as usize) * 2 + (1 << 16);

/// What travels with one argument of a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Buf {
    /// A number, or a NULL pointer.
    None,
    /// Memory the call reads (a path includes its NUL).
    In(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Room for memory the call writes.
    Out(u32),
    /// Memory the call reads and writes back.
    InOut(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The data of an iovec array the call reads, and each entry's length.
    IovIn {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        lens: Vec<u32>,
    },
    /// The lengths of an iovec array the call fills.
    IovOut { lens: Vec<u32> },
    /// sendmsg's message.
    MsgIn {
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        lens: Vec<u32>,
        #[serde(with = "serde_bytes")]
        control: Vec<u8>,
    },
    /// recvmsg's room: name, iovec lengths, control.
    MsgOut {
        name: u32,
        lens: Vec<u32>,
        control: u32,
    },
}

/// A system call of the process, to be made at home.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// Unique for the supervisor's life (and carried across moves).
    pub seq: u64,
    /// The calling thread (its ID as the process sees it).
    pub tid: i32,
    pub nr: i64,
    pub args: [u64; 6],
    /// One per argument.
    pub bufs: Vec<Buf>,
    /// Where the process has read read-ahead streams up to on its host, not yet known at
    /// home: set at home before the call is made (see [`Took`]).
    pub took: Vec<Took>,
}

/// How far the process has read a read-ahead stream on its host ([`FromDeputy::Ahead`]):
/// the deputy moves the descriptor's offset there (a stream of `read`s) and lets the
/// stream run further. Idempotent: a position at or behind the last one applied, or of a
/// stream that has ended at home, is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Took {
    pub stream: u64,
    pub upto: u64,
}

/// Which calls a read-ahead stream follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// `read`s: the stream starts at the descriptor's offset, which follows the process's
    /// reads (through [`Took`]).
    Read,
    /// `pread`s at increasing offsets: the descriptor's offset is not involved.
    Pread,
}

/// What comes back for one argument.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Back {
    None,
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    Msg {
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        #[serde(with = "serde_bytes")]
        control: Vec<u8>,
        flags: i32,
    },
}

/// The answer to a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Made: its result (a negative errno on failure), what it wrote, per argument, and
    /// the signals the call raised for the calling thread (SIGPIPE, SIGXFSZ), bit n-1 for
    /// signal n.
    Done {
        seq: u64,
        ret: i64,
        outs: Vec<Back>,
        sigs: u64,
        /// A stream begins with this call (on its first argument, a descriptor).
        begin: Option<Begin>,
    },
    /// A job-control signal (SIGTTIN, SIGTTOU: a background process at the terminal)
    /// interrupted the deputy's call before it did anything; the supervisor, which knows
    /// what the process does with that signal, answers [`ToDeputy::Retry`] or
    /// [`ToDeputy::Drop`].
    Interrupted { seq: u64, sig: i32 },
    /// Cancelled before it did anything.
    Cancelled { seq: u64 },
}

impl Reply {
    pub fn seq(&self) -> u64 {
        match self {
            Reply::Done { seq, .. } | Reply::Interrupted { seq, .. } | Reply::Cancelled { seq } => {
                *seq
            }
        }
    }
}

/// What begins with a call (a `read`/`pread` or `write`/`pwrite` of a regular file that
/// continues the one before it on its descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Begin {
    /// Read-ahead: [`FromDeputy::Ahead`] messages follow from offset `from` of `file`
    /// (device, inode).
    Ahead {
        kind: Kind,
        file: (u64, u64),
        from: u64,
    },
    /// Write-behind: the host may answer writes to the descriptor at once, up to `credit`
    /// bytes ([`FromDeputy::Grant`] gives more).
    Behind { file: (u64, u64), credit: u64 },
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// What identifies a file's contents across nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub size: u64,
    pub mtime: i64,
    pub mtime_ns: i64,
}

/// To the deputy (from the supervisor, through the mosixd of host and home).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDeputy {
    Call(Call),
    /// The process no longer waits for call `seq` (it was interrupted, or frozen).
    Cancel {
        seq: u64,
    },
    /// Make interrupted call `seq` again; with `block`, with the signal blocked (the
    /// process blocks or ignores it: a read of the terminal then fails with EIO, a write
    /// goes through, as for such a process at home).
    Retry {
        seq: u64,
        block: bool,
    },
    /// Forget interrupted call `seq` (the process's own call was interrupted too).
    Drop {
        seq: u64,
    },
    /// The process stopped (SIGSTOP, SIGTSTP, ...): the deputy stops too.
    Stopped {
        sig: i32,
    },
    /// The process ended: the deputy ends the same way.
    Exited(ExitStatus),
    /// The process was lost with its node: the deputy says so on its stderr and ends with
    /// status 137.
    Lost {
        message: String,
    },
    /// What is descriptor `fd` (its path at home and identity)? For an mmap of it.
    Describe {
        seq: u64,
        fd: i32,
    },
    /// `len` bytes of descriptor `fd` from offset `off` (pread: the offset is untouched).
    ReadAt {
        seq: u64,
        fd: i32,
        off: u64,
        len: u32,
    },
    /// From home's mosixd: the process is frozen for checkpoint `id`, and every call of it
    /// is settled. Keep what bringing it back to this point later needs (its descriptors
    /// as they are, their offsets, how much it has written to and read from pipes,
    /// terminals and sockets) and answer [`FromDeputy::Marked`].
    Mark {
        id: u64,
    },
    /// From home's mosixd: its host died; the process will be restored from checkpoint
    /// `id` and run again with this deputy. Settle every call, put the descriptors back as
    /// at the mark, say `message` on stderr, and answer [`FromDeputy::Rewound`].
    Rewind {
        id: u64,
        message: String,
    },
    /// From home's mosixd: checkpoints before `id` are no longer needed.
    KeepMarks {
        from: u64,
    },
    /// From home's mosixd: checkpoint `id` was not saved.
    DropMark {
        id: u64,
    },
    /// The process read streams this far; with `stop`, every stream ends (the process is
    /// frozen for a move).
    Took {
        took: Vec<Took>,
        stop: bool,
    },
    /// A write of the process to a file at home it was granted write-behind for
    /// ([`FromDeputy::Grant`]), already answered on its host: made at home in order (the
    /// `n`th of its stream), before any call that comes after it. `off`: a pwrite's offset.
    Behind {
        stream: u64,
        n: u64,
        off: Option<u64>,
        data: Bytes,
    },
    /// Apply these positions and say so ([`FromDeputy::Synced`]): nothing of what the
    /// process did on its host is left to be done at home once the answer comes.
    Sync {
        seq: u64,
        took: Vec<Took>,
    },
    /// The process's descriptor `fd` is a file of a shared path opened where it runs
    /// (DFSA; home holds /dev/null at its number): open that file here (`path`, as the
    /// process, with `flags` and at `offset`) at the same number, so that it is home's from
    /// now on (before a move, or a call that must be made at home).
    Adopt {
        seq: u64,
        fd: i32,
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
        flags: i32,
        offset: u64,
        cloexec: bool,
    },
    /// A [`ToDeputy::Behind`] whose `len` bytes of data are at offset `at` of the arena
    /// its mosixd gave the deputy at its hello (crate::arena::ArenaMap), told as piece
    /// `piece`: the same write, not copied through the socket.
    BehindInArena {
        stream: u64,
        n: u64,
        off: Option<u64>,
        at: u64,
        len: u64,
        piece: u64,
    },
}

/// What a descriptor is, as a checkpoint records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdType {
    File,
    Dir,
    Pipe,
    /// A terminal or another character device.
    Char,
    Socket,
    Other,
}

/// One descriptor of a process at home at a checkpoint: enough to reopen a regular file
/// at its offset, and to say what the others were.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeFd {
    pub fd: i32,
    /// Its path at home (/proc/PID/fd/N), e.g. `/home/u/out.txt`, `pipe:[123]`.
    pub path: String,
    pub kind: FdType,
    /// Access mode and status flags (O_APPEND, O_NONBLOCK, ...).
    pub flags: i32,
    /// Its offset, for a file that has one.
    pub pos: Option<u64>,
    pub cloexec: bool,
}

/// From the deputy.
/// The process's state at home at a mark: its descriptors, and its working directory (the
/// deputy's; None if it cannot be named).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkedAt {
    pub fds: Vec<HomeFd>,
    pub cwd: Option<String>,
}

/// Why a deputy could not mark its process's state for a checkpoint, or bring it back to
/// a mark (marks.rs). OS errors are carried as their numbers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MarkError {
    #[error("checkpoint {id} is marked already")]
    Marked { id: u64 },
    #[error("its deputy has no mark of checkpoint {id}")]
    NoMark { id: u64 },
    /// The logs of what it read from streams since the mark were trimmed.
    #[error(
        "it read more than {max_mib} MiB from pipes, terminals or sockets since that \
         checkpoint, which cannot be read again"
    )]
    StreamsTooFar { max_mib: u64 },
    #[error("cannot list its descriptors: {}", os(*errno))]
    ListFds { errno: i32 },
    #[error("cannot keep its descriptor {fd}: {}", os(*errno))]
    KeepFd { fd: i32, errno: i32 },
    #[error("cannot keep its working directory: {}", os(*errno))]
    KeepCwd { errno: i32 },
    #[error("cannot put its descriptor {fd} back: {}", os(*errno))]
    PutFdBack { fd: i32, errno: i32 },
    #[error("cannot go back to its working directory: {}", os(*errno))]
    Cwd { errno: i32 },
    /// A call being made at home for it did not end when cancelled.
    #[error("a call of it at home did not end")]
    CallStuck,
}

impl MarkError {
    /// The OS error of a failed call just made, as its number.
    pub fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }
}

fn os(errno: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(errno)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDeputy {
    Reply(Reply),
    /// A signal for the process reached its home PID.
    Signal {
        sig: i32,
    },
    /// What descriptor `fd` of [`ToDeputy::Describe`] is (None: not open, or not a file).
    Described {
        seq: u64,
        path: Option<Vec<u8>>,
        id: Option<FileId>,
    },
    /// The bytes of [`ToDeputy::ReadAt`] (or -errno in `ret`).
    Data {
        seq: u64,
        ret: i64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Checkpoint `id` is marked (its descriptors and working directory then), or why
    /// not. For home's mosixd.
    Marked {
        id: u64,
        result: Result<MarkedAt, MarkError>,
    },
    /// Back at checkpoint `id`: the highest call sequence number seen (the restored
    /// process numbers its calls after it), or why not. For home's mosixd.
    Rewound {
        id: u64,
        result: Result<u64, MarkError>,
    },
    /// Read-ahead: the bytes of the file behind descriptor `fd` at `off`, read at home for
    /// the stream begun by call `stream` (a sequential `read` or `pread` of a regular
    /// file), before the process asks for them; `eof`: the file ends after them. `file`:
    /// the file's (device, inode).
    Ahead {
        stream: u64,
        fd: i32,
        kind: Kind,
        file: (u64, u64),
        off: u64,
        data: Bytes,
        eof: bool,
    },
    /// These streams' files changed at home (written by anyone): what was read ahead of
    /// them is stale. Sent before anything that comes after the change.
    Stale {
        streams: Vec<u64>,
    },
    /// The process may write to descriptor `fd` (the file `file`) behind: up to `credit`
    /// bytes in all since the grant began (with call `stream`); the first `applied`
    /// writes sent behind are made at home.
    Grant {
        stream: u64,
        fd: i32,
        file: (u64, u64),
        credit: u64,
        applied: u64,
    },
    /// Write-behind on stream `stream` ends (a write failed at home: the process learns it
    /// at its next write, fsync or close of that descriptor, as of a failed write-back).
    Revoke {
        stream: u64,
    },
    /// The answer to [`ToDeputy::Sync`].
    Synced {
        seq: u64,
    },
    /// The answer to [`ToDeputy::Adopt`]: 0, or -errno.
    Adopted {
        seq: u64,
        ret: i64,
    },
}

impl FromDeputy {
    /// Whether a frame (as [`encode`]d) is for home's mosixd rather than the process's
    /// host ([`FromDeputy::Marked`], [`FromDeputy::Rewound`]): known from its first byte,
    /// without decoding the frame.
    pub fn is_for_home(frame: &[u8]) -> bool {
        // postcard writes the variant's index first (a varint: one byte below 128).
        matches!(frame.first(), Some(4 | 5))
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("a frame of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("a malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Frames up to this size are encoded into one buffer and written at once; a larger one
/// (a forwarded call's data) is written as it is encoded, its data never copied into a
/// message first.
const SMALL: usize = 64 << 10;

/// Writes one message as a frame.
pub fn send<W: Write, T: Serialize>(w: &mut W, m: &T) -> std::io::Result<()> {
    let n = postcard::experimental::serialized_size(m).map_err(std::io::Error::other)?;
    if n > MAX_FRAME {
        return Err(std::io::Error::other(FrameError::TooLong(n)));
    }
    if n <= SMALL {
        let mut frame = Vec::with_capacity(n + 4);
        frame.extend_from_slice(&(n as u32).to_le_bytes());
        let frame = postcard::to_extend(m, frame).map_err(std::io::Error::other)?;
        w.write_all(&frame)?;
        return w.flush();
    }
    let mut bw = std::io::BufWriter::with_capacity(16 << 10, &mut *w);
    bw.write_all(&(n as u32).to_le_bytes())?;
    let bw = postcard::to_io(m, bw).map_err(std::io::Error::other)?;
    bw.into_inner().map_err(|e| e.into_error())?;
    w.flush()
}

/// The frame of [`FromDeputy::Ahead`] around `n` bytes of data that are written into the
/// stream by other means (spliced from the file): what goes before them (the frame's
/// length and every field before the data, its length included) and the one byte after
/// them (`eof`). Together with the data, exactly what [`send`] writes for the message.
pub fn ahead_frame(
    stream: u64,
    fd: i32,
    kind: Kind,
    file: (u64, u64),
    off: u64,
    n: usize,
    eof: bool,
) -> (Vec<u8>, [u8; 1]) {
    let empty = encode(&FromDeputy::Ahead {
        stream,
        fd,
        kind,
        file,
        off,
        data: Bytes::new(),
        eof: false,
    });
    // (It ends with the empty data's length, 0, and `eof`, false.)
    let fields = &empty[..empty.len() - 2];
    // The data's length as postcard writes a byte string's (a varint).
    let len = encode(&(n as u64));
    let body = fields.len() + len.len() + n + 1;
    let mut head = Vec::with_capacity(4 + fields.len() + len.len());
    head.extend_from_slice(&(body as u32).to_le_bytes());
    head.extend_from_slice(fields);
    head.extend_from_slice(&len);
    (head, [eof as u8])
}

/// Reads one frame's bytes; None at a clean end of stream.
pub fn recv_bytes<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLong(n));
    }
    if n > SMALL {
        // Memory grows with what arrives: in at most two steps. (Read into the new room
        // as it is, not zeroed first, where `r` can: sockets.)
        let first = n.min((1 << 20) + (64 << 10));
        let mut body = Vec::with_capacity(first);
        for to in [first, n] {
            let more = to - body.len();
            body.reserve_exact(more);
            if r.by_ref().take(more as u64).read_to_end(&mut body)? != more {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
        return Ok(Some(body));
    }
    let mut body = Vec::new();
    r.take(n as u64).read_to_end(&mut body)?;
    if body.len() != n {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(body))
}

/// Room for whole frames in a local socket (4 MiB it sends before its reader takes them;
/// the default is about 200 KiB): a forwarded 1 MiB write or read, or an image chunk,
/// goes in with one call instead of five or six, each waking the reader and then the
/// writer again. Root takes it whatever `net.core.wmem_max` says; others up to it.
pub fn roomy<F: std::os::fd::AsFd>(s: &F) {
    use nix::sys::socket::{setsockopt, sockopt};
    const ROOM: usize = 4 << 20;
    if setsockopt(s, sockopt::SndBufForce, &ROOM).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &ROOM);
    }
}

/// Reads one message; None at a clean end of stream.
pub fn recv<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> Result<Option<T>, FrameError> {
    match recv_bytes(r)? {
        Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
        None => Ok(None),
    }
}

/// Decodes a message from a frame's bytes.
pub fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, FrameError> {
    Ok(postcard::from_bytes(b)?)
}

/// Where `part` (a slice of `frame`) starts in it.
fn offset_in(frame: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - frame.as_ptr() as usize
}

/// A write behind as it lies in its frame (see [`ToDeputy::behind_in`]).
pub struct BehindRef<'a> {
    pub stream: u64,
    pub n: u64,
    pub off: Option<u64>,
    pub data: &'a [u8],
}

impl ToDeputy {
    /// The variant index of [`ToDeputy::Behind`] (postcard's first byte of its frames).
    const BEHIND: u8 = 14;

    /// The write behind `frame` carries, if it is one, read where it lies.
    pub fn behind_in(frame: &[u8]) -> Option<BehindRef<'_>> {
        if frame.first() != Some(&Self::BEHIND) {
            return None;
        }
        #[derive(Deserialize)]
        struct Behind<'a> {
            stream: u64,
            n: u64,
            off: Option<u64>,
            data: &'a [u8],
        }
        let (b, _) = postcard::take_from_bytes::<Behind>(&frame[1..]).ok()?;
        Some(BehindRef {
            stream: b.stream,
            n: b.n,
            off: b.off,
            data: b.data,
        })
    }

    /// Decodes a frame it keeps: a write behind's data is the part of `frame` it was
    /// in, not a copy (the message is otherwise what [`decode`] gives).
    pub fn decode_shared(frame: Bytes) -> Result<ToDeputy, FrameError> {
        let Some(b) = Self::behind_in(&frame) else {
            return decode(&frame);
        };
        let at = offset_in(&frame, b.data);
        Ok(ToDeputy::Behind {
            stream: b.stream,
            n: b.n,
            off: b.off,
            data: frame.slice(at..at + b.data.len()),
        })
    }
}

impl FromDeputy {
    /// The variant index of [`FromDeputy::Ahead`].
    const AHEAD: u8 = 6;

    /// Decodes a frame it keeps: read-ahead data is the part of `frame` it was in, not
    /// a copy (the message is otherwise what [`decode`] gives).
    pub fn decode_shared(frame: Bytes) -> Result<FromDeputy, FrameError> {
        if frame.first() != Some(&Self::AHEAD) {
            return decode(&frame);
        }
        #[derive(Deserialize)]
        struct Ahead<'a> {
            stream: u64,
            fd: i32,
            kind: Kind,
            file: (u64, u64),
            off: u64,
            data: &'a [u8],
            eof: bool,
        }
        let (a, _) = postcard::take_from_bytes::<Ahead>(&frame[1..])?;
        let at = offset_in(&frame, a.data);
        Ok(FromDeputy::Ahead {
            stream: a.stream,
            fd: a.fd,
            kind: a.kind,
            file: a.file,
            off: a.off,
            data: frame.slice(at..at + a.data.len()),
            eof: a.eof,
        })
    }
}

/// Encodes a message as a frame's bytes (without the length).
pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
    postcard::to_stdvec(m).expect("our messages always encode")
}

/// [`encode`], into `w` (the same bytes).
pub fn encode_into<W: std::io::Write, T: Serialize>(w: W, m: &T) -> std::io::Result<()> {
    postcard::to_io(m, w)
        .map(drop)
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of a read-ahead frame around its data are what `send` writes.
    #[test]
    fn an_ahead_frame_around_its_data_is_the_message() {
        for n in [0usize, 1, 127, 128, 16_383, 16_384, 300_000, 524_288] {
            for eof in [false, true] {
                let data: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
                let (stream, fd, file, off) = (77u64, 5, (0xfe01, 1 << 40), 1u64 << 33);
                let mut sent = Vec::new();
                send(
                    &mut sent,
                    &FromDeputy::Ahead {
                        stream,
                        fd,
                        kind: Kind::Pread,
                        file,
                        off,
                        data: data.clone().into(),
                        eof,
                    },
                )
                .unwrap();
                let (head, tail) = ahead_frame(stream, fd, Kind::Pread, file, off, n, eof);
                let mut made = head;
                made.extend_from_slice(&data);
                made.extend_from_slice(&tail);
                assert_eq!(made, sent, "{n} bytes, eof {eof}");
            }
        }
    }

    /// A frame decoded where it is gives the message `decode` gives; a write's or a
    /// read-ahead's data is the frame's own bytes, not a copy; anything cut short is an
    /// error, as for `decode`.
    #[test]
    fn frames_decoded_where_they_are_are_the_same_messages() {
        let behind = |n: usize, off| ToDeputy::Behind {
            stream: 9,
            n: 300,
            off,
            data: (0..n).map(|i| (i * 3) as u8).collect::<Vec<_>>().into(),
        };
        let ahead = |n: usize, eof| FromDeputy::Ahead {
            stream: 1 << 40,
            fd: 17,
            kind: Kind::Read,
            file: (3, 1 << 35),
            off: 12345,
            data: (0..n).map(|i| (i * 5) as u8).collect::<Vec<_>>().into(),
            eof,
        };
        assert_eq!(encode(&behind(1, None))[0], ToDeputy::BEHIND);
        assert_eq!(encode(&ahead(1, false))[0], FromDeputy::AHEAD);
        let mut to = vec![ToDeputy::Cancel { seq: 4 }, ToDeputy::DropMark { id: 2 }];
        let mut from = vec![FromDeputy::Stale { streams: vec![3] }];
        for n in [0, 1, 200, 70_000, 1 << 20] {
            to.push(behind(n, None));
            to.push(behind(n, Some(1 << 50)));
            from.push(ahead(n, false));
            from.push(ahead(n, true));
        }
        /// Each message decoded where it is equals `decode`'s, its data (`data_of`) is
        /// the frame's own bytes, and a frame cut short is refused.
        fn check<T: std::fmt::Debug + for<'de> Deserialize<'de>>(
            msgs: &[impl Serialize],
            decode_shared: impl Fn(Bytes) -> Result<T, FrameError>,
            data_of: impl Fn(&T) -> Option<&Bytes>,
        ) {
            for m in msgs {
                let frame = Bytes::from(encode(m));
                let got = decode_shared(frame.clone()).unwrap();
                let want = decode::<T>(&frame).unwrap();
                assert_eq!(format!("{got:?}"), format!("{want:?}"));
                if let Some(data) = data_of(&got).filter(|d| !d.is_empty()) {
                    assert!(frame.as_ptr_range().contains(&data.as_ptr()));
                    assert!(data.len() <= frame.len());
                }
                for cut in [1, frame.len() / 2, frame.len() - 1] {
                    if cut > 0 && cut < frame.len() {
                        assert!(decode_shared(frame.slice(..cut)).is_err(), "{cut}");
                    }
                }
            }
        }
        check(&to, ToDeputy::decode_shared, |m| match m {
            ToDeputy::Behind { data, .. } => Some(data),
            _ => None,
        });
        check(&from, FromDeputy::decode_shared, |m| match m {
            FromDeputy::Ahead { data, .. } => Some(data),
            _ => None,
        });
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_errors() {
        let m = ToDeputy::Call(Call {
            seq: 7,
            tid: 42,
            nr: 1,
            args: [1, 2, 3, 0, 0, 0],
            bufs: vec![Buf::None, Buf::In(b"hello".to_vec()), Buf::None],
            took: vec![Took { stream: 3, upto: 9 }],
        });
        let mut v = Vec::new();
        send(&mut v, &m).unwrap();
        let back: ToDeputy = recv(&mut &v[..]).unwrap().unwrap();
        assert_eq!(back, m);
        // Truncated, oversized and garbage frames are errors, never panics.
        assert!(recv::<_, ToDeputy>(&mut &v[..v.len() - 1]).is_err());
        let mut big = (u32::MAX).to_le_bytes().to_vec();
        big.extend_from_slice(&[0; 8]);
        assert!(matches!(
            recv::<_, ToDeputy>(&mut &big[..]),
            Err(FrameError::TooLong(_))
        ));
        // Frames for home's mosixd are told apart by their first byte.
        for (m, home) in [
            (FromDeputy::Signal { sig: 2 }, false),
            (FromDeputy::Reply(Reply::Cancelled { seq: 4 }), false),
            (
                FromDeputy::Marked {
                    id: 3,
                    result: Ok(MarkedAt::default()),
                },
                true,
            ),
            (
                FromDeputy::Rewound {
                    id: 3,
                    result: Err(MarkError::NoMark { id: 3 }),
                },
                true,
            ),
        ] {
            assert_eq!(FromDeputy::is_for_home(&encode(&m)), home, "{m:?}");
        }
        let garbage = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(recv::<_, ToDeputy>(&mut &garbage[..]).is_err());
        assert!(recv::<_, ToDeputy>(&mut &[][..]).unwrap().is_none());
    }
}
