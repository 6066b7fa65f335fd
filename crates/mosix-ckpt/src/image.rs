//! The process image: what is saved of a process, and its on-disk / on-wire format.
//!
//! Format (all integers little-endian):
//! ```text
//! header  (32 bytes): magic "MOSXIMG\0", major u16, minor u16, compression u8,
//!                     3 reserved bytes, body flags u32, reserved u32,
//!                     xxh3-64 of the preceding 24 bytes
//! body    (compressed as the header says): records, each
//!           tag u8, payload length u64, payload, xxh3-64 of (tag, length, payload)
//!         tag 1 = metadata (postcard-encoded [`ProcessImage`]), exactly one, first
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

pub const MAGIC: &[u8; 8] = b"MOSXIMG\0";
/// Image format version. A reader accepts its own major version with any minor version
/// it knows of; a newer major (or newer minor) is refused with a clear message.
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 1;
pub const HEADER_LEN: usize = 32;

const TAG_META: u8 = 1;
const TAG_PAGES: u8 = 2;
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
    /// Upper bound of the memory contents that follow (for progress display).
    pub memory_estimate: u64,
    /// Its clocks at checkpoint time, as it saw them (format 1.1; None in 1.0 images).
    pub clocks: Option<Clocks>,
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
        };
        let meta_bytes = postcard::to_stdvec(meta)
            .map_err(|e| Error::Io(std::io::Error::other(format!("encoding metadata: {e}"))))?;
        me.record(TAG_META, &[&meta_bytes])?;
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

    /// Appends memory contents starting at `vaddr`.
    pub fn pages(&mut self, vaddr: u64, data: &[u8]) -> Result<()> {
        self.record(TAG_PAGES, &[&vaddr.to_le_bytes(), data])
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
    pub fn memory_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.2 as u64).sum()
    }
}

/// Reads and checks the 32-byte header.
fn read_header(h: &[u8]) -> Result<(Compression, u16)> {
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
    if major != FORMAT_MAJOR || minor > FORMAT_MINOR {
        return Err(bad(format!(
            "image format {major}.{minor} is not supported by this mosix (reads {FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR}); use a matching mosix version"
        )));
    }
    Ok((Compression::from_code(h[12])?, minor))
}

/// Reads a whole image from `r`, verifying everything before returning.
pub fn read_image<R: Read>(mut r: R) -> Result<LoadedImage> {
    let mut raw = Vec::new();
    r.read_to_end(&mut raw)?;
    load(Storage::Owned(raw))
}

/// Verifies an image already in memory (no copy).
pub fn read_image_bytes(raw: Vec<u8>) -> Result<LoadedImage> {
    load(Storage::Owned(raw))
}

/// Maps the image file at `path` (no copy of its memory contents) and verifies it.
pub fn read_image_file(path: &std::path::Path) -> Result<LoadedImage> {
    let f = std::fs::File::open(path)?;
    if f.metadata()?.len() < HEADER_LEN as u64 {
        return Err(bad("truncated: shorter than the image header"));
    }
    // SAFETY: the mapping is read-only and private; the image file is ours to read.
    // A file truncated by someone else while we restore would fault (SIGBUS) rather than
    // give wrong data, and the half-built process dies with us (PTRACE_O_EXITKILL).
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&f) }?;
    load(Storage::Mapped(map))
}

fn load(store: Storage) -> Result<LoadedImage> {
    let (compression, minor, n, decompressed) = {
        let bytes = &store[..];
        let (compression, minor) = read_header(bytes)?;
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
        let mut body = Vec::new();
        let res = match compression {
            Compression::None => Ok(0),
            Compression::Lz4 => lz4_flex::frame::FrameDecoder::new(stored).read_to_end(&mut body),
            Compression::Zstd => {
                zstd::Decoder::new(stored).and_then(|mut d| d.read_to_end(&mut body))
            }
        };
        res.map_err(|e| bad(format!("damaged compressed data: {e}")))?;
        (
            compression,
            minor,
            n,
            (compression != Compression::None).then_some(body),
        )
    };
    let (store, body_at, end) = match decompressed {
        None => (store, HEADER_LEN, n),
        Some(body) => {
            let len = body.len();
            (Storage::Owned(body), 0, len)
        }
    };
    let (meta, runs) = parse_body(&store[body_at..end], minor)?;
    Ok(LoadedImage {
        meta,
        compression,
        store,
        body_at,
        runs,
    })
}

type Runs = Vec<(u64, usize, usize)>;

fn parse_body(body: &[u8], minor: u16) -> Result<(ProcessImage, Runs)> {
    let mut pos = 0usize;
    let mut meta: Option<ProcessImage> = None;
    let mut runs = Vec::new();
    let mut records = 0u64;
    let mut payload_total = 0u64;
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
        match tag {
            TAG_META => {
                if meta.is_some() || records != 1 {
                    return Err(bad("metadata record out of place"));
                }
                // Format 1.0 ends before `clocks`: decode it as None.
                let decoded = if minor == 0 {
                    postcard::from_bytes(&[payload, &[0u8]].concat())
                } else {
                    postcard::from_bytes(payload)
                };
                meta = Some(decoded.map_err(|e| bad(format!("metadata does not decode: {e}")))?);
            }
            TAG_PAGES => {
                if meta.is_none() {
                    return Err(bad("memory before metadata"));
                }
                if len < 8 || !(len - 8).is_multiple_of(4096) {
                    return Err(bad("memory record of odd size"));
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
    let meta = meta.ok_or_else(|| bad("no metadata record"))?;
    Ok((meta, runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(c: Compression) -> Vec<u8> {
        let meta = ProcessImage {
            comm: "t".into(),
            ..Default::default()
        };
        let mut w = ImageWriter::new(Vec::new(), c, &meta).unwrap();
        let page: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        w.pages(0x1000, &page).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_each_compression() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let img = read_image(&sample(c)[..]).unwrap();
            assert_eq!(img.meta.comm, "t");
            let runs: Vec<_> = img.pages().collect();
            assert_eq!(runs.len(), 1);
            assert_eq!(runs[0].vaddr, 0x1000);
            assert_eq!(runs[0].data[9], 63u8);
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let good = sample(c);
            // Every bit of small images; a stride through bigger ones.
            let step = (good.len() * 8 / 4000).max(1);
            for bit in (0..good.len() * 8).step_by(step) {
                let mut b = good.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    read_image(&b[..]).is_err(),
                    "{c:?}: flip of bit {bit} not detected"
                );
            }
        }
    }

    #[test]
    fn truncation_and_garbage_are_detected() {
        let good = sample(Compression::None);
        for cut in 0..good.len() {
            assert!(read_image(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut more = good.clone();
        more.push(0);
        assert!(read_image(&more[..]).is_err());
    }

    #[test]
    fn format_1_0_images_read_without_clocks() {
        let meta = ProcessImage {
            comm: "old".into(),
            clocks: Some(Clocks::default()),
            ..Default::default()
        };
        // A 1.0 metadata record is the 1.1 one without the trailing `clocks`.
        let full = postcard::to_stdvec(&ProcessImage {
            clocks: None,
            ..meta.clone()
        })
        .unwrap();
        let old_meta = &full[..full.len() - 1];
        let rec = |tag: u8, payload: &[u8]| {
            let mut r = vec![tag];
            r.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            r.extend_from_slice(payload);
            let sum = xxh3_64(&r);
            r.extend_from_slice(&sum.to_le_bytes());
            r
        };
        let mut b = header(Compression::None).to_vec();
        b[10..12].copy_from_slice(&0u16.to_le_bytes());
        let sum = xxh3_64(&b[..24]);
        b[24..32].copy_from_slice(&sum.to_le_bytes());
        b.extend(rec(TAG_META, old_meta));
        let mut end = 2u64.to_le_bytes().to_vec();
        end.extend_from_slice(&(old_meta.len() as u64).to_le_bytes());
        b.extend(rec(TAG_END, &end));
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        let img = read_image(&b[..]).unwrap();
        assert_eq!(img.meta.comm, "old");
        assert_eq!(img.meta.clocks, None);
        // And a 1.1 image keeps them.
        let mut w = ImageWriter::new(Vec::new(), Compression::None, &meta).unwrap();
        w.pages(0x1000, &[0u8; 4096]).unwrap();
        let new = read_image(&w.finish().unwrap()[..]).unwrap();
        assert_eq!(new.meta.clocks, Some(Clocks::default()));
    }

    #[test]
    fn newer_version_is_refused_clearly() {
        let mut b = sample(Compression::None);
        b[8] = 2;
        b[10..12].copy_from_slice(&0u16.to_le_bytes());
        let sum = xxh3_64(&b[..24]);
        b[24..32].copy_from_slice(&sum.to_le_bytes());
        let e = read_image(&b[..]).err().unwrap().to_string();
        assert!(e.contains("image format 2.0 is not supported"), "{e}");
        let e = read_image(&b"#!/bin/sh\necho hi\n...................."[..])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a mosix process image"), "{e}");
    }
}
