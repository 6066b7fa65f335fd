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

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::{bad, Error, Result};
use crate::records::{
    self, Index, ProcRecord, ProcessImageV1, TAG_INDEX, TAG_PROCESS, TAG_THREAD, V1_LAST_MINOR,
};

pub const MAGIC: &[u8; 8] = b"MOSXIMG\0";
/// Image format version. A reader accepts its own major version with any minor version
/// it knows of; a newer major (or newer minor) is refused with a clear message.
pub const FORMAT_MAJOR: u16 = 2;
pub const FORMAT_MINOR: u16 = 0;
pub const HEADER_LEN: usize = 32;

const TAG_META: u8 = 1;
const TAG_PAGES: u8 = 2;
/// Format 2: data of a shared memory object: inode u64, offset u64, bytes.
const TAG_SHMEM: u8 = 6;
const TAG_END: u8 = 255;
/// Upper bound on one record's payload (a corrupt length must not make us allocate TiBs).
const MAX_RECORD: u64 = 1 << 32;
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
    fn from_code(c: u8) -> Result<Self> {
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

/// Writes an image stream: header, metadata, memory records, end.
pub struct ImageWriter<W: Write> {
    out: Box<dyn FinishWrite<Hashing<W>>>,
    records: u64,
    payload_total: u64,
    /// The metadata's `memory_estimate`, and the memory contents written so far.
    estimate: u64,
    page_bytes: u64,
}

/// A compressing writer that can be finished to get the inner writer back.
trait FinishWrite<W: Write>: Write {
    fn finish(self: Box<Self>) -> std::io::Result<W>;
}

/// Passes bytes through while hashing them, for the whole-file checksum at the end.
struct Hashing<W: Write> {
    inner: W,
    h: Xxh3,
}
impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.h.update(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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

fn header(compression: Compression) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    h[10..12].copy_from_slice(&FORMAT_MINOR.to_le_bytes());
    h[12] = compression.code();
    let sum = xxh3_64(&h[..24]);
    h[24..32].copy_from_slice(&sum.to_le_bytes());
    h
}

impl<W: Write + 'static> ImageWriter<W> {
    /// Starts an image with `meta` as its metadata record.
    pub fn new(w: W, compression: Compression, meta: &ProcessImage) -> Result<Self> {
        let mut w = Hashing {
            inner: w,
            h: Xxh3::new(),
        };
        w.write_all(&header(compression))?;
        let out: Box<dyn FinishWrite<Hashing<W>>> = match compression {
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
        let mut me = ImageWriter {
            out,
            records: 0,
            payload_total: 0,
            estimate: meta.memory_estimate,
            page_bytes: 0,
        };
        let enc = |what: &str, r: postcard::Result<Vec<u8>>| {
            r.map_err(|e| Error::Io(std::io::Error::other(format!("encoding the {what}: {e}"))))
        };
        let (tree, proc_rec, threads) = records::split(meta);
        let proc_bytes = enc("process record", postcard::to_stdvec(&proc_rec))?;
        let mut thread_bytes = Vec::with_capacity(threads.len());
        for t in &threads {
            thread_bytes.push(enc("thread record", postcard::to_stdvec(t))?);
        }
        let index = Index {
            memory_estimate: meta.memory_estimate,
            records_bytes: proc_bytes.len() as u64
                + thread_bytes.iter().map(|t| t.len() as u64).sum::<u64>(),
            tree: vec![tree],
        };
        me.record(TAG_INDEX, &[&enc("index", postcard::to_stdvec(&index))?])?;
        me.record(TAG_PROCESS, &[&proc_bytes])?;
        for t in &thread_bytes {
            me.record(TAG_THREAD, &[t])?;
        }
        Ok(me)
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
        self.out.write_all(&head)?;
        for p in parts {
            self.out.write_all(p)?;
        }
        self.out.write_all(&h.digest().to_le_bytes())?;
        self.records += 1;
        self.payload_total += len;
        Ok(())
    }

    /// Appends memory contents starting at `vaddr` (whole pages, in records of at most
    /// [`PAGES_RECORD_MAX`] bytes; nothing for no data). In all, at most the metadata's
    /// `memory_estimate` bytes: readers refuse an image with more.
    pub fn pages(&mut self, vaddr: u64, data: &[u8]) -> Result<()> {
        let invalid =
            |msg: String| Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
        if !vaddr.is_multiple_of(PAGE) || !(data.len() as u64).is_multiple_of(PAGE) {
            return Err(invalid(format!(
                "memory contents at {vaddr:#x} of {} bytes are not whole pages",
                data.len()
            )));
        }
        self.page_bytes += data.len() as u64;
        if self.page_bytes > self.estimate {
            return Err(invalid(format!(
                "memory contents of {} bytes exceed the metadata's memory_estimate ({})",
                self.page_bytes, self.estimate
            )));
        }
        for (i, chunk) in data.chunks(PAGES_RECORD_MAX).enumerate() {
            let at = vaddr
                .checked_add((i * PAGES_RECORD_MAX) as u64)
                .ok_or_else(|| invalid(format!("memory contents at {vaddr:#x} wrap around")))?;
            self.record(TAG_PAGES, &[&at.to_le_bytes(), chunk])?;
        }
        Ok(())
    }

    /// Appends data of shared memory object `ino` at `offset` (whole pages, in records of
    /// at most [`PAGES_RECORD_MAX`] bytes), counted against `memory_estimate` too.
    pub fn shmem_pages(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        let invalid =
            |msg: String| Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
        if !offset.is_multiple_of(PAGE) || !(data.len() as u64).is_multiple_of(PAGE) {
            return Err(invalid(format!(
                "shared memory contents at {offset:#x} of {} bytes are not whole pages",
                data.len()
            )));
        }
        self.page_bytes += data.len() as u64;
        if self.page_bytes > self.estimate {
            return Err(invalid(format!(
                "memory contents of {} bytes exceed the metadata's memory_estimate ({})",
                self.page_bytes, self.estimate
            )));
        }
        for (i, chunk) in data.chunks(PAGES_RECORD_MAX).enumerate() {
            let at = offset + (i * PAGES_RECORD_MAX) as u64;
            self.record(TAG_SHMEM, &[&ino.to_le_bytes(), &at.to_le_bytes(), chunk])?;
        }
        Ok(())
    }

    /// Writes the end record and returns the underlying writer.
    pub fn finish(mut self) -> Result<W> {
        let count = self.records + 1;
        let total = self.payload_total;
        let mut end = [0u8; 16];
        end[..8].copy_from_slice(&count.to_le_bytes());
        end[8..].copy_from_slice(&total.to_le_bytes());
        self.record(TAG_END, &[&end])?;
        self.out.flush()?;
        let Hashing { mut inner, h } = self.out.finish()?;
        inner.write_all(&h.digest().to_le_bytes())?;
        inner.flush()?;
        Ok(inner)
    }
}

/// A fully read and verified image: metadata plus memory runs (views into one buffer).
pub struct LoadedImage {
    pub meta: ProcessImage,
    pub compression: Compression,
    store: Storage,
    /// Where the (uncompressed) body starts in `store`.
    body_at: usize,
    /// (vaddr, offset into body, length)
    runs: Vec<(u64, usize, usize)>,
    /// Shared memory data: (inode, offset in the object, offset into body, length).
    shmem_runs: Vec<(u64, u64, usize, usize)>,
}

/// One run of a shared memory object's data.
pub struct ShmemPages<'a> {
    pub ino: u64,
    pub offset: u64,
    pub data: &'a [u8],
}

/// The bytes of an image: read into memory, or mapped from its file (no copy).
enum Storage {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Owned(v) => v,
            Storage::Mapped(m) => m,
        }
    }
}

impl LoadedImage {
    pub fn pages(&self) -> impl Iterator<Item = Pages<'_>> {
        let body = &self.store[self.body_at..];
        self.runs.iter().map(move |&(vaddr, off, len)| Pages {
            vaddr,
            data: &body[off..off + len],
        })
    }
    /// The data of the shared memory objects.
    pub fn shmem_pages(&self) -> impl Iterator<Item = ShmemPages<'_>> {
        let body = &self.store[self.body_at..];
        self.shmem_runs
            .iter()
            .map(move |&(ino, offset, off, len)| ShmemPages {
                ino,
                offset,
                data: &body[off..off + len],
            })
    }
    pub fn memory_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.2 as u64).sum::<u64>()
            + self.shmem_runs.iter().map(|r| r.3 as u64).sum::<u64>()
    }
}

/// Format version of an image: (major, minor).
pub type Version = (u16, u16);

/// Reads and checks the 32-byte header.
fn read_header(h: &[u8]) -> Result<(Compression, Version)> {
    if h.len() < HEADER_LEN {
        return Err(bad("truncated: shorter than the image header"));
    }
    if &h[..8] != MAGIC {
        return Err(bad("not a mosix process image (wrong magic)"));
    }
    let sum = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
    if xxh3_64(&h[..24]) != sum {
        return Err(bad("header checksum mismatch (damaged image)"));
    }
    let major = u16::from_le_bytes([h[8], h[9]]);
    let minor = u16::from_le_bytes([h[10], h[11]]);
    #[allow(clippy::absurd_extreme_comparisons)] // true while FORMAT_MINOR is 0
    let known = match major {
        1 => minor <= V1_LAST_MINOR,
        FORMAT_MAJOR => minor <= FORMAT_MINOR,
        _ => false,
    };
    if !known {
        return Err(bad(format!(
            "image format {major}.{minor} is not supported by this mosix (reads 1.0 to 1.{V1_LAST_MINOR} and {FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR}); use a matching mosix version"
        )));
    }
    Ok((Compression::from_code(h[12])?, (major, minor)))
}

/// How much memory reading an image may take. Decompression is bounded by the size the
/// image declares (its metadata record, and the memory contents its `memory_estimate`
/// says follow); an image that declares more than `max_memory` bytes is refused before
/// any of it is decompressed, with one line that says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    /// The most bytes the decompressed body (or an image read from a stream) may take.
    pub max_memory: u64,
}

impl ReadLimits {
    /// The memory this process can have now: the smaller of the system's MemAvailable and
    /// the room left under the memory limits (cgroup v2 `memory.max`) of its cgroup and
    /// every cgroup above it. Unknown limits count as none.
    pub fn system() -> ReadLimits {
        ReadLimits {
            max_memory: mem_available().min(cgroup_headroom()),
        }
    }
    /// At most `max_memory` bytes.
    pub fn bytes(max_memory: u64) -> ReadLimits {
        ReadLimits { max_memory }
    }
}

/// MemAvailable from /proc/meminfo (u64::MAX if unknown).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb.saturating_mul(1024))
}

/// The memory this process (or a process started beside it, in its cgroups) can have
/// now: the smaller of the system's MemAvailable and the room under the memory limits of
/// its cgroups and every cgroup above them, cgroup v2 and v1 alike. Reclaimable page
/// cache (inactive file pages) counts as room, as the kernel drops it before it kills.
pub fn memory_room() -> u64 {
    mem_available().min(cgroup_headroom())
}

/// The least room (limit less usage, less inactive file cache) in this process's memory
/// cgroups (v2 `memory.max`/`memory.current`, v1 `memory.limit_in_bytes`/
/// `memory.usage_in_bytes`) and their ancestors (u64::MAX where there is no limit or it
/// cannot be read).
fn cgroup_headroom() -> u64 {
    let (Ok(cg), Ok(mi)) = (
        std::fs::read_to_string("/proc/self/cgroup"),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return u64::MAX;
    };
    let read = |p: &std::path::Path, f: &str| -> Option<u64> {
        std::fs::read_to_string(p.join(f)).ok()?.trim().parse().ok()
    };
    let inactive = |p: &std::path::Path, key: &str| -> u64 {
        std::fs::read_to_string(p.join("memory.stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let mut room = u64::MAX;
    for line in cg.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let v2 = ctrls.is_empty();
        if !v2 && !ctrls.split(',').any(|c| c == "memory") {
            continue;
        }
        // Where that hierarchy is mounted (mountinfo: root, mount point, ..., fstype, opts).
        let mount = mi.lines().find_map(|m| {
            let f: Vec<&str> = m.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            let (fstype, opts) = (*f.get(dash + 1)?, *f.get(dash + 3)?);
            let ok = if v2 {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && opts.split(',').any(|o| o == "memory")
            };
            ok.then(|| (f[3].to_string(), f[4].to_string()))
        });
        let Some((root, point)) = mount else { continue };
        let rel = if root == "/" {
            path
        } else {
            match path.strip_prefix(root.as_str()) {
                Some(r) => r,
                None => continue,
            }
        };
        let top = std::path::PathBuf::from(&point);
        let mut dir = top.join(rel.trim_start_matches('/'));
        let (lim, cur, key) = if v2 {
            ("memory.max", "memory.current", "inactive_file")
        } else {
            (
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        };
        loop {
            if let (Some(max), Some(used)) = (read(&dir, lim), read(&dir, cur)) {
                let used = used.saturating_sub(inactive(&dir, key));
                room = room.min(max.saturating_sub(used));
            }
            if dir == top || !dir.pop() {
                break;
            }
        }
    }
    room
}

/// The largest metadata record a reader takes: far more than any real process needs (its
/// maps are limited by vm.max_map_count, 65530 by default: about 4 MiB of metadata).
pub const MAX_META: u64 = 64 << 20;

/// The most bytes of memory decoding the metadata takes per byte of it: its densest
/// elements decode to their size in memory (a [`Vma`] is encoded in at least 7 bytes, an
/// [`Fd`] in 4, a [`PendingSignal`] in 2, a [`SigAction`] in 5, an rlimit in 3, an itimer
/// in 4, a u64 in 1), and vectors grow by doubling.
pub const META_GROWTH: u64 = {
    use std::mem::size_of;
    let per = [
        size_of::<Vma>().div_ceil(7),
        size_of::<Fd>().div_ceil(4),
        size_of::<PendingSignal>().div_ceil(2),
        size_of::<SigAction>().div_ceil(5),
        size_of::<(u32, u64, u64)>().div_ceil(3),
        size_of::<[i64; 4]>().div_ceil(4),
        size_of::<u64>(),
        // A thread record is at least 15 bytes, a tree entry 5.
        size_of::<ThreadImage>().div_ceil(15),
        size_of::<records::TreeEntry>().div_ceil(5),
    ];
    let mut most = 0;
    let mut i = 0;
    while i < per.len() {
        if per[i] > most {
            most = per[i];
        }
        i += 1;
    }
    2 * most as u64
};

/// The memory decoding metadata records of `len` bytes in all may take.
fn meta_decode_need(len: u64, v: Version) -> u64 {
    // An older 1.x record is copied once to be decoded.
    let copy = if v.0 == 1 && v.1 < V1_LAST_MINOR {
        len + 1
    } else {
        0
    };
    len.saturating_mul(META_GROWTH).saturating_add(copy)
}
/// Bytes of a memory record besides its contents: tag, length, address, checksum.
const PAGES_OVERHEAD: u64 = 1 + 8 + 8 + 8;
/// Bytes of the end record.
const END_RECORD: u64 = 1 + 8 + 16 + 8;
const PAGE: u64 = 4096;

/// The most bytes a body can take whose metadata record has `meta_len` bytes of payload
/// and declares `estimate` bytes of memory contents: every memory record holds at least a
/// page, so there are at most `estimate / PAGE` of them.
fn declared_body_len(meta_len: u64, estimate: u64) -> u64 {
    let records = estimate / PAGE;
    (1 + 8 + 8 + meta_len)
        .saturating_add(estimate)
        .saturating_add(records.saturating_mul(PAGES_OVERHEAD))
        .saturating_add(END_RECORD)
}

fn mib(n: u64) -> String {
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    }
}

fn too_big(what: &str, need: u64, limits: &ReadLimits) -> Error {
    Error::Unrestorable(format!(
        "{what} {} of memory, more than the {} available here",
        mib(need),
        mib(limits.max_memory)
    ))
}

/// Reads a whole image from `r`, verifying everything before returning. Memory is bounded
/// by [`ReadLimits::system`].
pub fn read_image<R: Read>(r: R) -> Result<LoadedImage> {
    read_image_with(r, &ReadLimits::system())
}

/// [`read_image`] within `limits`: a stream longer than `limits.max_memory` is refused.
pub fn read_image_with<R: Read>(r: R, limits: &ReadLimits) -> Result<LoadedImage> {
    let mut raw = Vec::new();
    r.take(limits.max_memory.saturating_add(1))
        .read_to_end(&mut raw)?;
    if raw.len() as u64 > limits.max_memory {
        return Err(too_big(
            "the image needs more than",
            limits.max_memory,
            limits,
        ));
    }
    load(Storage::Owned(raw), limits)
}

/// Verifies an image already in memory (no copy of an uncompressed one). Decompression is
/// bounded by [`ReadLimits::system`].
pub fn read_image_bytes(raw: Vec<u8>) -> Result<LoadedImage> {
    read_image_bytes_with(raw, &ReadLimits::system())
}

/// [`read_image_bytes`] within `limits`.
pub fn read_image_bytes_with(raw: Vec<u8>, limits: &ReadLimits) -> Result<LoadedImage> {
    load(Storage::Owned(raw), limits)
}

/// Maps the image file at `path` (no copy of its memory contents) and verifies it.
/// Decompression is bounded by [`ReadLimits::system`].
pub fn read_image_file(path: &std::path::Path) -> Result<LoadedImage> {
    read_image_file_with(path, &ReadLimits::system())
}

/// [`read_image_file`] within `limits`.
pub fn read_image_file_with(path: &std::path::Path, limits: &ReadLimits) -> Result<LoadedImage> {
    let f = std::fs::File::open(path)?;
    if f.metadata()?.len() < HEADER_LEN as u64 {
        return Err(bad("truncated: shorter than the image header"));
    }
    // SAFETY: the mapping is read-only and private; the image file is ours to read.
    // A file truncated by someone else while we restore would fault (SIGBUS) rather than
    // give wrong data, and the half-built process dies with us (PTRACE_O_EXITKILL).
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&f) }?;
    load(Storage::Mapped(map), limits)
}

/// The largest zstd window a reader accepts (log2): the writer's level 1 uses 2^19; the
/// decoder allocates the window a frame asks for, so a frame must not ask for more.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

fn load(store: Storage, limits: &ReadLimits) -> Result<LoadedImage> {
    let (compression, minor, n, decompressed) = {
        let bytes = &store[..];
        let (compression, minor) = read_header(bytes)?;
        // (`minor` is the whole version from here on.)
        // The whole-file checksum first: it covers the compressed bytes too.
        if bytes.len() < HEADER_LEN + 8 {
            return Err(bad("truncated: the image checksum is missing"));
        }
        let n = bytes.len() - 8;
        let sum = u64::from_le_bytes(bytes[n..].try_into().expect("8 bytes"));
        if xxh3_64(&bytes[..n]) != sum {
            return Err(bad("image checksum mismatch (damaged or truncated image)"));
        }
        let stored = &bytes[HEADER_LEN..n];
        let body = match compression {
            Compression::None => None,
            Compression::Lz4 => Some(decompress(
                lz4_flex::frame::FrameDecoder::new(stored),
                minor,
                limits,
            )?),
            Compression::Zstd => {
                let mut d = zstd::Decoder::new(stored).map_err(damaged)?;
                d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(damaged)?;
                Some(decompress(d, minor, limits)?)
            }
        };
        (compression, minor, n, body)
    };
    let (store, body_at, end) = match decompressed {
        None => (store, HEADER_LEN, n),
        Some(body) => {
            let len = body.len();
            (Storage::Owned(body), 0, len)
        }
    };
    let (meta, runs, shmem_runs) = parse_body(&store[body_at..end], minor, limits)?;
    Ok(LoadedImage {
        meta,
        compression,
        store,
        body_at,
        runs,
        shmem_runs,
    })
}

fn damaged(e: std::io::Error) -> Error {
    bad(format!("damaged compressed data: {e}"))
}

/// Decompresses a body record by record, never holding more than the image declares:
/// first the metadata record (1.x) or the index (2.x), at most [`MAX_META`], whose
/// `memory_estimate` (and, 2.x, the size of the process and thread records) then bounds
/// the rest; a declared size beyond `limits` is refused before anything more is read.
/// Only the records' shapes are checked here; [`parse_body`] verifies the result.
fn decompress<D: Read>(mut dec: D, v: Version, limits: &ReadLimits) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut bound = 9 + MAX_META + 8;
    let (tag, len) = record_head(&mut dec, &mut body, bound)?
        .ok_or_else(|| bad("truncated: the end record is missing"))?;
    if tag != first_tag(v) {
        return Err(bad(format!("{} record out of place", first_name(v))));
    }
    if len > MAX_META {
        return Err(bad(format!(
            "{} record of {len} bytes (a reader takes at most {MAX_META})",
            first_name(v)
        )));
    }
    let first_need = (9 + len + 8).saturating_add(meta_decode_need(len, v));
    if first_need > limits.max_memory {
        return Err(too_big("its metadata needs", first_need, limits));
    }
    read_payload(&mut dec, &mut body, len + 8, bound)?;
    let payload = &body[9..9 + len as usize];
    let (estimate, records_bytes, records) = if v.0 == 1 {
        (decode_meta_v1(payload, v.1)?.memory_estimate, 0, 0)
    } else {
        let ix = decode_index(payload)?;
        let records: u64 = ix.tree.iter().map(|t| 1 + t.threads.len() as u64).sum();
        (ix.memory_estimate, ix.records_bytes, records)
    };
    let meta_need = meta_decode_need(len + records_bytes, v);
    // (A shared-memory record has 8 bytes more than a memory record.)
    let shmem_extra = if v.0 >= 2 { (estimate / PAGE) * 8 } else { 0 };
    bound = declared_body_len(len, estimate)
        .saturating_add(records_bytes)
        .saturating_add(records.saturating_mul(17))
        .saturating_add(shmem_extra);
    if bound.saturating_add(meta_need) > limits.max_memory {
        return Err(too_big(
            &format!(
                "the image declares {} of memory contents; reading it needs",
                mib(estimate)
            ),
            bound.saturating_add(meta_need),
            limits,
        ));
    }
    loop {
        let at = body.len();
        let (tag, len) = record_head(&mut dec, &mut body, bound)?
            .ok_or_else(|| bad("truncated: the end record is missing"))?;
        match tag {
            TAG_PAGES if (8 + PAGE..=8 + PAGES_RECORD_MAX as u64).contains(&len) => {}
            TAG_PAGES => return Err(bad("memory record of odd size")),
            TAG_PROCESS | TAG_THREAD if v.0 >= 2 && len <= records_bytes => {}
            TAG_SHMEM if v.0 >= 2 && (16 + PAGE..=16 + PAGES_RECORD_MAX as u64).contains(&len) => {}
            TAG_END if len == 16 => {}
            TAG_END => return Err(bad("end record of wrong size")),
            TAG_META => return Err(bad("metadata record out of place")),
            t => {
                return Err(bad(format!(
                    "unknown record type {t} at byte {at} of the body"
                )))
            }
        }
        read_payload(&mut dec, &mut body, len + 8, bound)?;
        if tag == TAG_END {
            break;
        }
    }
    // Nothing may follow; reading to the end also makes the decoder check its checksum.
    let mut more = [0u8; 1];
    loop {
        match dec.read(&mut more) {
            Ok(0) => return Ok(body),
            Ok(_) => return Err(bad("trailing data after the end record")),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(damaged(e)),
        }
    }
}

/// Reads the 9-byte head of the next record onto `body`: Ok(None) at a clean end.
fn record_head<D: Read>(dec: &mut D, body: &mut Vec<u8>, bound: u64) -> Result<Option<(u8, u64)>> {
    let at = body.len();
    if !read_at_most(dec, body, 9, bound)? {
        return Ok(None);
    }
    let h = &body[at..];
    let len = u64::from_le_bytes(h[1..9].try_into().expect("8 bytes"));
    Ok(Some((h[0], len)))
}

/// Appends exactly `n` more bytes of `dec` to `body`, never letting `body` grow past
/// `bound`; memory grows with the bytes that actually arrive, not with `n`. Ok(false) if
/// the stream ended cleanly before the first of them.
fn read_at_most<D: Read>(dec: &mut D, body: &mut Vec<u8>, n: u64, bound: u64) -> Result<bool> {
    let at = body.len() as u64;
    let want = at.saturating_add(n);
    if want > bound {
        return Err(bad(format!(
            "the image holds more than the {bound} bytes it declares"
        )));
    }
    while (body.len() as u64) < want {
        if body.capacity() == body.len() {
            // Double, but never past what the image declares.
            let cap = (body.capacity() as u64).saturating_mul(2).max(64 << 10);
            let grow = cap.min(bound) - body.len() as u64;
            body.try_reserve_exact(grow as usize).map_err(|_| {
                Error::Unrestorable(format!(
                    "out of memory reading the image ({} decompressed so far)",
                    mib(body.len() as u64)
                ))
            })?;
        }
        let room = (body.capacity() - body.len()) as u64;
        let step = room.min(want - body.len() as u64);
        let got = dec.by_ref().take(step).read_to_end(body).map_err(damaged)?;
        if got == 0 {
            if body.len() as u64 == at {
                return Ok(false);
            }
            return Err(bad("truncated: the end record is missing"));
        }
    }
    Ok(true)
}

/// Appends exactly `n` more bytes of `dec` to `body` (see [`read_at_most`]); the stream
/// must have them.
fn read_payload<D: Read>(dec: &mut D, body: &mut Vec<u8>, n: u64, bound: u64) -> Result<()> {
    if read_at_most(dec, body, n, bound)? || n == 0 {
        Ok(())
    } else {
        Err(bad("truncated: the end record is missing"))
    }
}

fn first_tag(v: Version) -> u8 {
    if v.0 == 1 {
        TAG_META
    } else {
        TAG_INDEX
    }
}
fn first_name(v: Version) -> &'static str {
    if v.0 == 1 {
        "metadata"
    } else {
        "index"
    }
}

/// Decodes a 1.`minor` metadata record (the frozen 1.2 layout).
fn decode_meta_v1(payload: &[u8], minor: u16) -> Result<ProcessImageV1> {
    // Each minor version added one trailing `Option` field to the metadata: 1.1 `clocks`,
    // 1.2 `caps`. An older record is decoded with a None (one 0 byte) for each field it
    // does not have.
    let missing = V1_LAST_MINOR.saturating_sub(minor) as usize;
    let decoded = if missing == 0 {
        postcard::from_bytes(payload)
    } else {
        let mut full = Vec::new();
        full.try_reserve_exact(payload.len() + missing)
            .map_err(|_| Error::Unrestorable("out of memory reading the image metadata".into()))?;
        full.extend_from_slice(payload);
        full.resize(payload.len() + missing, 0);
        postcard::from_bytes(&full)
    };
    decoded.map_err(|e| bad(format!("metadata does not decode: {e}")))
}

/// Decodes one record of format 2 (no minor has added fields yet).
fn decode2<T: serde::de::DeserializeOwned>(payload: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(payload)
        .map_err(|e| bad(format!("the {what} record does not decode: {e}")))
}

fn decode_index(payload: &[u8]) -> Result<Index> {
    let ix: Index = decode2(payload, "index")?;
    if ix.records_bytes > MAX_META {
        return Err(bad(format!(
            "process and thread records of {} bytes (a reader takes at most {MAX_META})",
            ix.records_bytes
        )));
    }
    if ix.tree.is_empty() {
        return Err(bad("the image holds no process"));
    }
    if ix.tree.len() > 1 {
        return Err(Error::Unrestorable(format!(
            "the image holds {} processes; this mosix restores one process per image",
            ix.tree.len()
        )));
    }
    Ok(ix)
}

type Runs = Vec<(u64, usize, usize)>;

/// What the records of a format 2 body read so far make.
#[derive(Default)]
struct Body2 {
    index: Option<Index>,
    /// The process being read: its record and its threads so far.
    current: Option<(ProcRecord, Vec<ThreadImage>)>,
    done: Vec<ProcessImage>,
    records_bytes: u64,
}

impl Body2 {
    fn finish_current(&mut self) -> Result<()> {
        if let Some((p, threads)) = self.current.take() {
            let ix = self.index.as_ref().expect("index before processes");
            let t = &ix.tree[self.done.len()];
            self.done.push(records::join(t, p, threads)?);
        }
        Ok(())
    }
    fn record(&mut self, tag: u8, payload: &[u8], limits: &ReadLimits) -> Result<()> {
        if tag == TAG_INDEX {
            if self.index.is_some() {
                return Err(bad("index record out of place"));
            }
            let ix = decode_index(payload)?;
            let need = meta_decode_need(payload.len() as u64 + ix.records_bytes, (2, 0));
            if need > limits.max_memory {
                return Err(too_big("its metadata needs", need, limits));
            }
            self.index = Some(ix);
            return Ok(());
        }
        let Some((declared, processes)) = self
            .index
            .as_ref()
            .map(|ix| (ix.records_bytes, ix.tree.len()))
        else {
            return Err(bad("index record out of place"));
        };
        self.records_bytes += payload.len() as u64;
        if self.records_bytes > declared {
            return Err(bad(
                "the process and thread records are larger than declared",
            ));
        }
        match tag {
            TAG_PROCESS => {
                self.finish_current()?;
                let n = self.done.len();
                if n >= processes {
                    return Err(bad("more process records than processes in the tree"));
                }
                self.current = Some((decode2(payload, "process")?, Vec::new()));
            }
            _ => {
                let Some((_, threads)) = &mut self.current else {
                    return Err(bad("thread record before its process record"));
                };
                threads.push(decode2(payload, "thread")?);
            }
        }
        Ok(())
    }
    fn end(mut self) -> Result<ProcessImage> {
        self.finish_current()?;
        let ix = self.index.take().ok_or_else(|| bad("no index record"))?;
        if self.done.len() != ix.tree.len() || self.records_bytes != ix.records_bytes {
            return Err(bad("the records do not match the index"));
        }
        let mut p = self.done.remove(0);
        if p.memory_estimate > ix.memory_estimate {
            return Err(bad("a process declares more memory than the image"));
        }
        p.memory_estimate = ix.memory_estimate;
        Ok(p)
    }
}

type ShmemRuns = Vec<(u64, u64, usize, usize)>;

fn parse_body(
    body: &[u8],
    v: Version,
    limits: &ReadLimits,
) -> Result<(ProcessImage, Runs, ShmemRuns)> {
    let mut pos = 0usize;
    let mut meta: Option<ProcessImage> = None;
    let mut v2 = Body2::default();
    let mut estimate: Option<u64> = None;
    let mut runs = Vec::new();
    let mut shmem_runs = Vec::new();
    let mut records = 0u64;
    let mut payload_total = 0u64;
    let mut page_bytes = 0u64;
    loop {
        if body.len() - pos < 9 {
            return Err(bad("truncated: the end record is missing"));
        }
        let tag = body[pos];
        let len = u64::from_le_bytes(body[pos + 1..pos + 9].try_into().expect("8 bytes"));
        if len > MAX_RECORD || ((body.len() - pos - 9) as u64) < len + 8 {
            return Err(bad(format!(
                "truncated or damaged record {records} at byte {pos} of the body"
            )));
        }
        let len = len as usize;
        let payload_at = pos + 9;
        let sum_at = payload_at + len;
        let sum = u64::from_le_bytes(body[sum_at..sum_at + 8].try_into().expect("8 bytes"));
        if xxh3_64(&body[pos..sum_at]) != sum {
            return Err(bad(format!(
                "checksum mismatch in record {records} at byte {pos} of the body (damaged image)"
            )));
        }
        records += 1;
        payload_total += len as u64;
        let payload = &body[payload_at..sum_at];
        if (records == 1) != (tag == first_tag(v)) {
            return Err(bad(format!("{} record out of place", first_name(v))));
        }
        match tag {
            TAG_META if v.0 == 1 => {
                if len as u64 > MAX_META {
                    return Err(bad(format!(
                        "metadata record of {len} bytes (a reader takes at most {MAX_META})"
                    )));
                }
                let need = meta_decode_need(len as u64, v);
                if need > limits.max_memory {
                    return Err(too_big("its metadata needs", need, limits));
                }
                let m: ProcessImage = decode_meta_v1(payload, v.1)?.into();
                estimate = Some(m.memory_estimate);
                meta = Some(m);
            }
            TAG_INDEX | TAG_PROCESS | TAG_THREAD if v.0 >= 2 => {
                if len as u64 > MAX_META {
                    return Err(bad(format!(
                        "a record of {len} bytes (a reader takes at most {MAX_META})"
                    )));
                }
                v2.record(tag, payload, limits)?;
                if let Some(ix) = &v2.index {
                    estimate = Some(ix.memory_estimate);
                }
            }
            TAG_SHMEM if v.0 >= 2 => {
                let Some(est) = estimate.filter(|_| v2.current.is_some()) else {
                    return Err(bad("shared memory data before its process"));
                };
                if len < 16 + PAGE as usize
                    || len > 16 + PAGES_RECORD_MAX
                    || !(len - 16).is_multiple_of(PAGE as usize)
                {
                    return Err(bad("shared memory record of odd size"));
                }
                page_bytes += (len - 16) as u64;
                if page_bytes > est {
                    return Err(bad(format!(
                        "the image holds more memory contents than the {est} bytes it declares"
                    )));
                }
                let ino = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                let offset = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
                if offset % PAGE != 0 {
                    return Err(bad("shared memory record at unaligned offset"));
                }
                shmem_runs.push((ino, offset, payload_at + 16, len - 16));
            }
            TAG_PAGES => {
                let ready = if v.0 == 1 {
                    meta.is_some()
                } else {
                    v2.current.is_some()
                };
                let Some(est) = estimate.filter(|_| ready) else {
                    return Err(bad("memory before metadata"));
                };
                if len < 8 + PAGE as usize
                    || len > 8 + PAGES_RECORD_MAX
                    || !(len - 8).is_multiple_of(PAGE as usize)
                {
                    return Err(bad("memory record of odd size"));
                }
                page_bytes += (len - 8) as u64;
                if page_bytes > est {
                    return Err(bad(format!(
                        "the image holds more memory contents than the {est} bytes it declares"
                    )));
                }
                let vaddr = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                if vaddr % 4096 != 0 {
                    return Err(bad("memory record at unaligned address"));
                }
                runs.push((vaddr, payload_at + 8, len - 8));
            }
            TAG_END => {
                if len != 16 {
                    return Err(bad("end record of wrong size"));
                }
                let count = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                let total = u64::from_le_bytes(payload[8..].try_into().expect("8 bytes"));
                if count != records || total != payload_total - 16 {
                    return Err(bad("record count or size does not match the end record"));
                }
                if sum_at + 8 != body.len() {
                    return Err(bad("trailing data after the end record"));
                }
                break;
            }
            t => return Err(bad(format!("unknown record type {t}"))),
        }
        pos = sum_at + 8;
    }
    let meta = if v.0 == 1 {
        meta.ok_or_else(|| bad("no metadata record"))?
    } else {
        v2.end()?
    };
    // Every shared memory record is of an object of the process, within its size.
    for &(ino, offset, _, len) in &shmem_runs {
        let fits = meta.shmem.iter().any(|o| {
            o.ino == ino && offset.saturating_add(len as u64) <= o.size.div_ceil(PAGE) * PAGE
        });
        if !fits {
            return Err(bad("shared memory data of no object of the process"));
        }
    }
    Ok((meta, runs, shmem_runs))
}

#[cfg(test)]
#[path = "image_tests.rs"]
mod tests;
