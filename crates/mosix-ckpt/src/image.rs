//! The process image: what is saved of a process, and its on-disk / on-wire format.
//!
//! Format (all integers little-endian):
//! ```text
//! header  (32 bytes): magic "MOSXIMG\0", major u16, minor u16, compression u8,
//!                     3 reserved bytes, body flags u32, reserved u32,
//!                     xxh3-64 of the preceding 24 bytes
//! body    (compressed as the header says): records, each
//!           tag u8, payload length u64, payload, xxh3-64 of (tag, length, payload)
//!         format 2: tag 3 = index ([`crate::records::Index`]: sizes, process tree),
//!         first; then per process: tag 4 = process record, tag 5 = one thread record
//!         per thread (main thread first), tag 2 = its memory; tag 255 = end
//!         format 1 (read only): tag 1 = metadata ([`crate::records::ProcessImageV1`]),
//!         exactly one, first, then memory and end
//!         tag 2 = memory: vaddr u64, then the bytes (a multiple of the page size)
//!         tag 255 = end: record count u64, payload byte total u64
//! trailer (8 bytes):  xxh3-64 of every byte before it (header and body as stored)
//! ```
//! Anything after the end record, a missing end record, a wrong checksum, an unknown tag
//! or a newer major version makes the image unreadable, and nothing is restored.

use std::io::Write;

use crate::sum::{xxh3_64, Xxh3};
use serde::{Deserialize, Serialize};

use crate::error::{bad, Error, Result};
use crate::records::{self, Index, TAG_INDEX, TAG_PROCESS, TAG_THREAD};
use crate::sys::PAGE;

pub const MAGIC: &[u8; 8] = b"MOSXIMG\0";
/// Image format version. A reader accepts its own major version with any minor version
/// it knows of; a newer major (or newer minor) is refused with a clear message.
pub const FORMAT_MAJOR: u16 = 3;
pub const FORMAT_MINOR: u16 = 4;
/// From this version the image's own checksum is a [`Chain`] of its records' checksums
/// (before it, one of all its bytes).
pub const CHAINED: (u16, u16) = (3, 3);
/// From this version an image may say where its private anonymous memory begins
/// ([`crate::records::TAG_LAZY`]).
pub const LAZY_MARK: (u16, u16) = (3, 4);
pub const HEADER_LEN: usize = 32;

pub(crate) const TAG_META: u8 = 1;
pub(crate) const TAG_PAGES: u8 = 2;
/// Format 2: data of a shared memory object: inode u64, offset u64, bytes.
pub(crate) const TAG_SHMEM: u8 = 6;
pub(crate) const TAG_END: u8 = 255;
/// Upper bound on one record's payload (a corrupt length must not make us allocate TiBs).
pub(crate) const MAX_RECORD: u64 = 1 << 32;
/// Memory is written in records of at most this many bytes.
pub const PAGES_RECORD_MAX: usize = 8 << 20;

/// How the body of an image is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Lz4,
    Zstd,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }
    pub(crate) fn from_code(c: u8) -> Result<Self> {
        Ok(match c {
            0 => Compression::None,
            1 => Compression::Lz4,
            2 => Compression::Zstd,
            _ => return Err(bad(format!("unknown compression method {c}"))),
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(format!("unknown compression '{s}' (use none, lz4 or zstd)")),
        }
    }
}

/// Identity of a file at checkpoint time, checked again before its pages are trusted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

impl FileId {
    /// Whether `other` is this file: the same inode, or (on another node) a file of the
    /// same size and modification time.
    pub fn matches(&self, other: &FileId) -> bool {
        self.size == other.size
            && ((self.dev == other.dev && self.ino == other.ino)
                || (self.mtime_sec == other.mtime_sec && self.mtime_nsec == other.mtime_nsec))
    }
}

/// What backs a memory area.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// Private anonymous memory (heap, stack, bss, malloc arenas, ...).
    Anon,
    /// A file mapping; private ones get their changed pages from the image.
    File {
        path: String,
        offset: u64,
        id: FileId,
    },
    /// The kernel's [vdso] / [vvar] / [vvar_vclock]: moved, not restored.
    Special(String),
    /// A shared memory object of the process ([`ShmemObject`] `ino`) from `offset`
    /// (format 2): a memfd, or MAP_SHARED anonymous memory.
    Shmem { ino: u64, offset: u64 },
    /// Memory the process shares with other processes at its home (format 3.1): object
    /// (`dev`, `ino`) there, mapped from `offset`. It stays at home (`homemem`): away it is
    /// a stand-in the process cannot touch there, at home it is mapped from its deputy's
    /// descriptor of the object. Only a move restores it.
    HomeShared { dev: u64, ino: u64, offset: u64 },
}

/// A memfd or MAP_SHARED anonymous memory object of the process (format 2); its data is
/// in shared-memory records, made again as a memfd.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmemObject {
    /// Its inode at checkpoint time: how mappings and descriptors name it in the image.
    pub ino: u64,
    /// The memfd's name; None for MAP_SHARED anonymous memory.
    pub name: Option<String>,
    pub size: u64,
    /// F_SEAL_* bits of a memfd.
    pub seals: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: i32,
    pub shared: bool,
    pub growsdown: bool,
    pub kind: VmaKind,
    /// Name given with PR_SET_VMA_ANON_NAME, shown as [anon:NAME].
    pub anon_name: Option<String>,
}

/// The mm fields restored with PR_SET_MM_MAP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub signo: i32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// A signal queued but not yet delivered, with its siginfo (128 bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSignal {
    /// Queued to the whole process (shared) rather than to the thread.
    pub shared: bool,
    pub siginfo: Vec<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    /// real, effective, saved, fs
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
}

/// How a file descriptor comes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// Standard input/output/error that was a terminal, pipe, socket or /dev/null: it is
    /// connected to the restarting command's own descriptor of the same number.
    Inherit { was: String },
    /// Reopened by path at `pos` with `flags`.
    File {
        path: String,
        flags: i32,
        pos: u64,
        id: Option<FileId>,
    },
    /// Held at the process's home node by its deputy (format 1.3): on a host it is a
    /// placeholder, at home the deputy's descriptor itself. `was` says what it was.
    Home { was: String },
    /// A memfd of the process ([`ShmemObject`] `ino`), at `pos` with `flags` (format 2).
    Memfd { ino: u64, flags: i32, pos: u64 },
    /// An epoll instance watching descriptors of the process (format 2).
    Epoll { watches: Vec<EpollWatch> },
    /// An eventfd with its counter (format 2); `flags`: O_NONBLOCK.
    EventFd {
        count: u64,
        semaphore: bool,
        flags: i32,
    },
    /// One end of a pipe whose both ends the process holds (format 2). `pipe` tells pipes
    /// apart (its inode at checkpoint time); the first descriptor of a pipe in the image
    /// carries its size and the bytes it held.
    Pipe {
        pipe: u64,
        write: bool,
        flags: i32,
        size: u32,
        data: Vec<u8>,
    },
}

/// What an epoll instance watches: descriptor `fd` of the process, for `events`
/// (EPOLL* bits as registered, EPOLLET/EPOLLONESHOT included), reporting `data`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollWatch {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    pub cloexec: bool,
    pub kind: FdKind,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// Everything about a process except the contents of its memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessImage {
    pub arch: String,
    pub kernel: String,
    pub hostname: String,
    pub pid: i32,
    pub comm: String,
    pub exe: String,
    pub exe_id: Option<FileId>,
    pub cwd: String,
    pub umask: u32,
    pub creds: Creds,
    pub personality: u64,
    pub no_new_privs: bool,
    /// (resource, soft, hard)
    pub rlimits: Vec<(u32, u64, u64)>,
    pub vmas: Vec<Vma>,
    pub mm: MmFields,
    /// `struct user_regs_struct`, raw.
    pub regs: Vec<u8>,
    /// NT_X86_XSTATE, raw XSAVE area.
    pub xstate: Vec<u8>,
    pub sigactions: Vec<SigAction>,
    pub blocked: u64,
    pub pending: Vec<PendingSignal>,
    /// (ss_sp, ss_flags, ss_size)
    pub sigaltstack: (u64, i32, u64),
    /// ITIMER_REAL, _VIRTUAL, _PROF as (interval sec, usec, value sec, usec)
    pub itimers: Vec<[i64; 4]>,
    pub rseq: Option<Rseq>,
    pub robust_list: (u64, u64),
    pub clear_child_tid: u64,
    pub fds: Vec<Fd>,
    /// Upper bound of the memory contents that follow: progress display, and the size a
    /// reader lets the body decompress to (an image holding more is refused).
    pub memory_estimate: u64,
    /// Its clocks at checkpoint time, as it saw them (format 1.1; None in 1.0 images).
    pub clocks: Option<Clocks>,
    /// Its capability sets (format 1.2; None in older images, or if they could not be
    /// read). A restore applies them only as its credential policy allows (see
    /// [`crate::CredPolicy`]): never to a process that becomes a user other than root.
    pub caps: Option<crate::Caps>,
    /// Its other threads (format 2), in the order they are created again; the main
    /// thread's state is in the fields above (`regs`, `xstate`, `blocked`, its own
    /// `pending` signals, `sigaltstack`, `rseq`, `robust_list`, `clear_child_tid`).
    pub threads: Vec<ThreadImage>,
    /// Its process group and session, as it saw them (format 2; 0 from a 1.x image).
    /// Recorded for process families; not restored yet.
    pub pgid: i32,
    pub sid: i32,
    /// Its memfds and MAP_SHARED anonymous memory (format 2).
    pub shmem: Vec<ShmemObject>,
    /// The madvise advice its private areas had (format 3.2; none from older images): by
    /// area start, bits of [`ADVICE_HUGEPAGE`] and the others. Only what differs from a
    /// fresh mapping's.
    pub advice: Vec<(u64, u32)>,
}

/// MADV_HUGEPAGE (VmFlags "hg"): transparent huge pages wanted.
pub const ADVICE_HUGEPAGE: u32 = 1;
/// MADV_NOHUGEPAGE ("nh").
pub const ADVICE_NOHUGEPAGE: u32 = 2;
/// MADV_DONTFORK ("dc"): a child does not get the area.
pub const ADVICE_DONTFORK: u32 = 4;
/// MADV_DONTDUMP ("dd"): not in a core dump.
pub const ADVICE_DONTDUMP: u32 = 8;
/// MADV_WIPEONFORK ("wf"): a child gets it zeroed (random-number state, keys).
pub const ADVICE_WIPEONFORK: u32 = 16;

/// The advice bits and their madvise numbers, and whether a restore must fail without
/// one (the fork behaviours, which a child would see) or may go on (hints).
pub const ADVICES: [(u32, &str, i32, bool); 5] = [
    (ADVICE_HUGEPAGE, "hg", libc::MADV_HUGEPAGE, false),
    (ADVICE_NOHUGEPAGE, "nh", libc::MADV_NOHUGEPAGE, false),
    (ADVICE_DONTFORK, "dc", libc::MADV_DONTFORK, true),
    (ADVICE_DONTDUMP, "dd", libc::MADV_DONTDUMP, false),
    (ADVICE_WIPEONFORK, "wf", libc::MADV_WIPEONFORK, true),
];

/// The advice bits of an area with these VmFlags (/proc/PID/smaps).
pub fn advice_of(vm_flags: &[String]) -> u32 {
    ADVICES
        .iter()
        .filter(|(_, name, ..)| vm_flags.iter().any(|f| f == name))
        .fold(0, |bits, (b, ..)| bits | b)
}

/// One thread's own state (format 2 thread record).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadImage {
    /// Its thread ID as the process knows it (kept with `keep_pid`).
    pub tid: i32,
    /// Its name (each thread has its own: PR_SET_NAME).
    pub comm: String,
    /// `struct user_regs_struct`, raw.
    pub regs: Vec<u8>,
    /// TLS bases (also in `regs`; these are the ones restored).
    pub fs_base: u64,
    pub gs_base: u64,
    /// NT_X86_XSTATE, raw XSAVE area.
    pub xstate: Vec<u8>,
    /// Blocked signals.
    pub blocked: u64,
    /// Signals queued to this thread (`shared` false).
    pub pending: Vec<PendingSignal>,
    /// (ss_sp, ss_flags, ss_size)
    pub sigaltstack: (u64, i32, u64),
    pub rseq: Option<Rseq>,
    /// (head, length)
    pub robust_list: (u64, u64),
    pub clear_child_tid: u64,
}

/// CLOCK_MONOTONIC and CLOCK_BOOTTIME of a process, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clocks {
    pub monotonic_ns: i64,
    pub boottime_ns: i64,
}

/// One run of memory contents.
pub struct Pages<'a> {
    pub vaddr: u64,
    pub data: &'a [u8],
}

/// Writes an image stream: header, metadata, memory records, end. A plain image
/// ([`ImageWriter::new`]) starts with the process's final state; one saved while the
/// process ran ([`ImageWriter::precopy`]) starts with pre-copy rounds ([`ImageWriter::layout`]
/// and memory) and gets the final state later ([`ImageWriter::final_part`]).
pub struct ImageWriter<W: Write> {
    out: Box<dyn FinishWrite<W>>,
    chain: Chain,
    records: u64,
    payload_total: u64,
    /// The bound of memory contents (and drop records) of the current part: the
    /// pre-copy budget, then the final state's `memory_estimate`; and what it holds so far.
    estimate: u64,
    page_bytes: u64,
    /// In the pre-copy rounds: (rounds left, layout bytes left, a round begun).
    prefix: Option<(u32, u64, bool)>,
}

/// A compressing writer that can be finished to get the inner writer back.
trait FinishWrite<W: Write>: Write {
    fn finish(self: Box<Self>) -> std::io::Result<W>;
}

/// The image's own checksum (format 3.3 on, written after its body): of its header, then
/// of each record's head (tag, length) and checksum, in order. A record's checksum covers
/// all its bytes, so this covers every byte of the body and their order, at 17 bytes per
/// record instead of a second pass over the memory contents. (Compressed data is checked
/// by its decoder: lz4 and zstd frames carry a checksum of their contents.)
pub struct Chain(Xxh3);

impl Chain {
    /// Begins with the image's header.
    pub fn new(header: &[u8]) -> Chain {
        let mut h = Xxh3::new();
        h.update(header);
        Chain(h)
    }
    /// The next record: its 9-byte head and its checksum.
    pub fn record(&mut self, head: &[u8], sum: u64) {
        self.0.update(head);
        self.0.update(&sum.to_le_bytes());
    }
    pub fn digest(&self) -> u64 {
        self.0.digest()
    }
}

/// The [`Chain`] of an uncompressed body (records one after the other, from its first
/// byte; e.g. the bytes of an image between its header and its checksum): None if it does
/// not end with a whole record. The records' own checksums are not checked here.
pub fn chain_of(header: &[u8], body: &[u8]) -> Option<u64> {
    let mut c = Chain::new(header);
    let mut pos = 0usize;
    while pos < body.len() {
        let head = body.get(pos..pos.checked_add(9)?)?;
        let len = usize::try_from(u64::from_le_bytes(head[1..9].try_into().ok()?)).ok()?;
        let sum_at = pos.checked_add(9)?.checked_add(len)?;
        let sum = u64::from_le_bytes(body.get(sum_at..sum_at.checked_add(8)?)?.try_into().ok()?);
        c.record(head, sum);
        pos = sum_at + 8;
    }
    Some(c.digest())
}

struct Plain<W: Write>(W);
impl<W: Write> Write for Plain<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.0.write_all(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
impl<W: Write> FinishWrite<W> for Plain<W> {
    fn finish(self: Box<Self>) -> std::io::Result<W> {
        Ok(self.0)
    }
}
impl<W: Write> FinishWrite<W> for zstd::Encoder<'static, W> {
    fn finish(self: Box<Self>) -> std::io::Result<W> {
        zstd::Encoder::finish(*self)
    }
}
impl<W: Write> FinishWrite<W> for lz4_flex::frame::FrameEncoder<W> {
    fn finish(self: Box<Self>) -> std::io::Result<W> {
        lz4_flex::frame::FrameEncoder::finish(*self).map_err(std::io::Error::other)
    }
}

pub(crate) fn header(compression: Compression) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&FORMAT_MINOR.to_le_bytes());
    h[12] = compression.code();
    let sum = xxh3_64(&h[..24]);
    h[24..32].copy_from_slice(&sum.to_le_bytes());
    h
}

fn invalid(msg: String) -> Error {
    Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg))
}

fn encode<T: Serialize>(what: &str, v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v)
        .map_err(|e| Error::Io(std::io::Error::other(format!("encoding the {what}: {e}"))))
}

/// The payload of a drop record: (address, length) pairs of whole pages.
pub(crate) fn drops_payload(drops: &[(u64, u64)]) -> Result<Vec<u8>> {
    let mut b = Vec::with_capacity(drops.len() * 16);
    for &(a, len) in drops {
        if !a.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || len == 0 {
            return Err(invalid(format!(
                "memory given back at {a:#x} ({len} bytes) is not whole pages"
            )));
        }
        b.extend_from_slice(&a.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
    }
    Ok(b)
}

impl<W: Write + 'static> ImageWriter<W> {
    fn start(mut w: W, compression: Compression) -> Result<Self> {
        let head = header(compression);
        w.write_all(&head)?;
        let out: Box<dyn FinishWrite<W>> = match compression {
            Compression::None => Box::new(Plain(w)),
            Compression::Lz4 => {
                let mut info = lz4_flex::frame::FrameInfo::new();
                info.content_checksum = true;
                Box::new(lz4_flex::frame::FrameEncoder::with_frame_info(info, w))
            }
            Compression::Zstd => {
                let mut e = zstd::Encoder::new(w, 1)?;
                e.include_checksum(true)?;
                Box::new(e)
            }
        };
        Ok(ImageWriter {
            out,
            chain: Chain::new(&head),
            records: 0,
            payload_total: 0,
            estimate: 0,
            page_bytes: 0,
            prefix: None,
        })
    }

    /// Starts an image with `meta` as its metadata record.
    pub fn new(w: W, compression: Compression, meta: &ProcessImage) -> Result<Self> {
        let mut me = Self::start(w, compression)?;
        me.write_process(meta, &[])?;
        Ok(me)
    }

    /// Starts an image of a process that runs while its memory is saved: pre-copy
    /// rounds within the bounds of `pc`, each begun by [`ImageWriter::layout`], then
    /// [`ImageWriter::final_part`].
    pub fn precopy(w: W, compression: Compression, pc: &records::PreCopy) -> Result<Self> {
        let mut me = Self::start(w, compression)?;
        me.record(records::TAG_PRECOPY, &[&encode("pre-copy record", pc)?])?;
        me.estimate = pc.budget;
        me.prefix = Some((pc.rounds, pc.layouts_bytes, false));
        Ok(me)
    }

    /// Begins a pre-copy round: the layout of the process's memory now, and the memory
    /// given back since the last round (`drops`, counted against the budget).
    pub fn layout(&mut self, l: &records::Layout, drops: &[(u64, u64)]) -> Result<()> {
        let Some((rounds, bytes, _)) = self.prefix else {
            return Err(invalid("a layout after the final state".into()));
        };
        let lb = encode("layout record", l)?;
        if rounds == 0 || (lb.len() as u64) > bytes {
            return Err(invalid(format!(
                "a pre-copy round beyond the declared bounds ({rounds} rounds, {bytes} layout bytes left)"
            )));
        }
        self.prefix = Some((rounds - 1, bytes - lb.len() as u64, true));
        self.record(records::TAG_LAYOUT, &[&lb])?;
        self.drops(drops)
    }

    /// Rounds the writer may still begin, and layout bytes left.
    pub fn rounds_left(&self) -> Option<(u32, u64)> {
        self.prefix.map(|(r, b, _)| (r, b))
    }

    /// Bytes of memory contents the current part may still hold.
    pub fn room(&self) -> u64 {
        self.estimate.saturating_sub(self.page_bytes)
    }

    /// Says that the memory records from here on are all of the process's private
    /// anonymous memory, and nothing but memory records follow them (see
    /// [`records::TAG_LAZY`]): a reader may let the process run from here.
    /// `coming`: the (address, length) ranges whose pages may follow (see there); its 16
    /// bytes per range count against the memory estimate, as a drop record's do.
    pub(crate) fn lazy_from_here(&mut self, coming: &[(u64, u64)]) -> Result<()> {
        let b = drops_payload(coming)?;
        self.count(b.len() as u64)?;
        self.record(records::TAG_LAZY, &[&b])
    }

    /// After the lazy mark: these pages of its private anonymous memory are zero.
    pub(crate) fn zeros(&mut self, zeros: &[(u64, u64)]) -> Result<()> {
        self.drops(zeros)
    }

    fn drops(&mut self, drops: &[(u64, u64)]) -> Result<()> {
        if drops.is_empty() {
            return Ok(());
        }
        let b = drops_payload(drops)?;
        self.count(b.len() as u64)?;
        self.record(records::TAG_DROPS, &[&b])
    }

    /// Ends the pre-copy rounds with the process's final state (`meta`, whose
    /// `memory_estimate` bounds what follows: memory contents, and `drops`' 16 bytes
    /// per range) and the memory given back since the last round.
    pub fn final_part(&mut self, meta: &ProcessImage, drops: &[(u64, u64)]) -> Result<()> {
        if self.prefix.take().is_none() {
            return Err(invalid("the final state was written already".into()));
        }
        self.write_process(meta, drops)
    }

    fn write_process(&mut self, meta: &ProcessImage, drops: &[(u64, u64)]) -> Result<()> {
        self.estimate = meta.memory_estimate;
        self.page_bytes = 0;
        let (tree, proc_rec, threads) = records::split(meta);
        let proc_bytes = records::encode_proc(&proc_rec)
            .map_err(|e| bad(format!("cannot encode the process record: {e}")))?;
        let mut thread_bytes = Vec::with_capacity(threads.len());
        for t in &threads {
            thread_bytes.push(encode("thread record", t)?);
        }
        let index = Index {
            memory_estimate: meta.memory_estimate,
            records_bytes: proc_bytes.len() as u64
                + thread_bytes.iter().map(|t| t.len() as u64).sum::<u64>(),
            tree: vec![tree],
        };
        self.record(TAG_INDEX, &[&encode("index", &index)?])?;
        self.record(TAG_PROCESS, &[&proc_bytes])?;
        for t in &thread_bytes {
            self.record(TAG_THREAD, &[t])?;
        }
        self.drops(drops)
    }

    fn count(&mut self, n: u64) -> Result<()> {
        self.page_bytes += n;
        if self.page_bytes > self.estimate {
            return Err(invalid(format!(
                "memory contents of {} bytes exceed the declared {}",
                self.page_bytes, self.estimate
            )));
        }
        Ok(())
    }

    fn record(&mut self, tag: u8, parts: &[&[u8]]) -> Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut head = [0u8; 9];
        head[0] = tag;
        head[1..].copy_from_slice(&len.to_le_bytes());
        let mut h = Xxh3::new();
        h.update(&head);
        for p in parts {
            h.update(p);
        }
        let sum = h.digest();
        self.chain.record(&head, sum);
        self.out.write_all(&head)?;
        for p in parts {
            self.out.write_all(p)?;
        }
        self.out.write_all(&sum.to_le_bytes())?;
        self.records += 1;
        self.payload_total += len;
        Ok(())
    }

    /// Appends memory contents starting at `vaddr` (whole pages, in records of at most
    /// [`PAGES_RECORD_MAX`] bytes; nothing for no data). In all, at most the metadata's
    /// `memory_estimate` bytes: readers refuse an image with more.
    pub fn pages(&mut self, vaddr: u64, data: &[u8]) -> Result<()> {
        self.contents(None, vaddr, data)
    }

    /// Appends data of shared memory object `ino` at `offset` (whole pages, in records of
    /// at most [`PAGES_RECORD_MAX`] bytes), counted against `memory_estimate` too.
    pub fn shmem_pages(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        self.contents(Some(ino), offset, data)
    }

    /// Memory records (`ino` None, at address `at`) or shared-memory records (of object
    /// `ino`, at offset `at`).
    fn contents(&mut self, ino: Option<u64>, at: u64, data: &[u8]) -> Result<()> {
        if !at.is_multiple_of(PAGE) || !(data.len() as u64).is_multiple_of(PAGE) {
            return Err(invalid(format!(
                "memory contents at {at:#x} of {} bytes are not whole pages",
                data.len()
            )));
        }
        match self.prefix {
            Some((_, _, false)) => {
                return Err(invalid("memory before the first pre-copy layout".into()))
            }
            Some(_) if ino.is_some() => {
                return Err(invalid("shared memory in a pre-copy round".into()))
            }
            _ => {}
        }
        self.count(data.len() as u64)?;
        for (i, chunk) in data.chunks(PAGES_RECORD_MAX).enumerate() {
            let here = at
                .checked_add((i * PAGES_RECORD_MAX) as u64)
                .ok_or_else(|| invalid(format!("memory contents at {at:#x} wrap around")))?;
            match ino {
                None => self.record(TAG_PAGES, &[&here.to_le_bytes(), chunk])?,
                Some(ino) => {
                    self.record(TAG_SHMEM, &[&ino.to_le_bytes(), &here.to_le_bytes(), chunk])?
                }
            }
        }
        Ok(())
    }

    /// Passes on everything written so far (a compressor ends its block).
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }

    /// Writes the end record and returns the underlying writer.
    pub fn finish(mut self) -> Result<W> {
        if self.prefix.is_some() {
            return Err(invalid("an image without its final state".into()));
        }
        let count = self.records + 1;
        let total = self.payload_total;
        let mut end = [0u8; 16];
        end[..8].copy_from_slice(&count.to_le_bytes());
        end[8..].copy_from_slice(&total.to_le_bytes());
        self.record(TAG_END, &[&end])?;
        self.out.flush()?;
        let mut inner = self.out.finish()?;
        inner.write_all(&self.chain.digest().to_le_bytes())?;
        inner.flush()?;
        Ok(inner)
    }
}

pub use crate::limits::{memory_room, ReadLimits};
pub use crate::read::{
    read_image, read_image_bytes, read_image_bytes_with, read_image_file, read_image_file_with,
    read_image_streamed, read_image_with, LoadedImage, ShmemPages, Version, MAX_META, META_GROWTH,
};

#[cfg(test)]
#[path = "image_tests.rs"]
pub(crate) mod tests;
