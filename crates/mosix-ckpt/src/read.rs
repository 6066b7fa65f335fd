//! Reading an image: header, whole-file checksum, decompression record by record within
//! what the image declares and the memory there is, then every record checked (format 2
//! against its index; format 1 as it was), before anything is restored.

use std::io::Read;

use crate::sum::xxh3_64;

use crate::error::{bad, Error, Result};
use crate::image::Pages;
use crate::image::{
    Compression, Fd, PendingSignal, ProcessImage, SigAction, ThreadImage, Vma, CHAINED,
    FORMAT_MAJOR, FORMAT_MINOR, HEADER_LEN, MAGIC, MAX_RECORD, PAGES_RECORD_MAX, TAG_END, TAG_META,
    TAG_PAGES, TAG_SHMEM,
};
use crate::limits::ReadLimits;
use crate::parse::Event;
use crate::records::{
    self, Index, PreCopy, ProcessImageV1, TAG_DROPS, TAG_INDEX, TAG_LAYOUT, TAG_PRECOPY,
    TAG_PROCESS, TAG_THREAD, V1_LAST_MINOR,
};

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
    /// The (uncompressed) body: what [`LoadedImage::page_runs`] offsets point into.
    pub(crate) fn body(&self) -> &[u8] {
        &self.store[self.body_at..]
    }
    /// The memory contents: (address, offset into the body, length).
    pub(crate) fn page_runs(&self) -> &[(u64, usize, usize)] {
        &self.runs
    }
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
pub(crate) fn read_header(h: &[u8]) -> Result<(Compression, Version)> {
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
    let known = match major {
        1 => minor <= V1_LAST_MINOR,
        2 => minor == 0,
        FORMAT_MAJOR => minor <= FORMAT_MINOR,
        _ => false,
    };
    if !known {
        return Err(bad(format!(
            "image format {major}.{minor} is not supported by this mosix (reads 1.0 to 1.{V1_LAST_MINOR}, 2.0 and {FORMAT_MAJOR}.0 to {FORMAT_MAJOR}.{FORMAT_MINOR}); use a matching mosix version"
        )));
    }
    Ok((Compression::from_code(h[12])?, (major, minor)))
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
pub(crate) fn meta_decode_need(len: u64, v: Version) -> u64 {
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

pub(crate) fn too_big(what: &str, need: u64, limits: &ReadLimits) -> Error {
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
    read_whole(Vec::new(), r, limits)
}

/// `raw` and the rest of `r`, whole, then verified: at most `limits.max_memory` bytes.
fn read_whole<R: Read>(mut raw: Vec<u8>, r: R, limits: &ReadLimits) -> Result<LoadedImage> {
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

/// [`read_image_with`], for an image that arrives slowly (over a link): an uncompressed or
/// lz4 image is checked (record by record, and whole) and decompressed as its bytes come,
/// not after they all came, so that little is left to do once the last arrives. A zstd
/// image is read whole first.
pub fn read_image_streamed<R: Read>(mut r: R, limits: &ReadLimits) -> Result<LoadedImage> {
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head)
        .map_err(|_| bad("truncated: shorter than the image header"))?;
    let (compression, minor) = read_header(&head)?;
    if compression == Compression::Zstd {
        return read_whole(head.to_vec(), r, limits);
    }
    // Before 3.3 every byte is hashed as it comes; from 3.3 the records' chain is
    // checked at the end.
    let mut held = HoldBack {
        inner: &mut r,
        buf: vec![0u8; 1 << 20],
        start: 0,
        end: 0,
        eof: false,
        hash: (minor < CHAINED).then(crate::sum::Xxh3::new),
    };
    if let Some(h) = &mut held.hash {
        h.update(&head);
    }
    // Record by record (each checked as it comes), decompressed or as it is.
    let body = if compression == Compression::Lz4 {
        decompress(lz4_flex::frame::FrameDecoder::new(&mut held), minor, limits)?
    } else {
        decompress(&mut held, minor, limits)?
    };
    let hashed = held.hash.as_ref().map(|h| h.digest());
    let trailer = u64::from_le_bytes(held.trailer()?);
    if hashed.is_some_and(|h| h != trailer) {
        return Err(bad(CHECKSUM_MISMATCH));
    }
    let (meta, runs, shmem_runs) = parse_body(&body, minor, limits, true)?;
    check_chain(&head, &body, minor, trailer)?;
    Ok(LoadedImage {
        meta,
        compression,
        store: Storage::Owned(body),
        body_at: 0,
        runs,
        shmem_runs,
    })
}

pub(crate) const CHECKSUM_MISMATCH: &str = "image checksum mismatch (damaged or truncated image)";

/// From format 3.3: the image's checksum `sum` is the chain of the records of `body` (its
/// records checked already, one after the other).
pub(crate) fn check_chain(head: &[u8], body: &[u8], v: Version, sum: u64) -> Result<()> {
    if v >= CHAINED && crate::image::chain_of(head, body) != Some(sum) {
        return Err(bad(CHECKSUM_MISMATCH));
    }
    Ok(())
}

/// Reads through all but the last 8 bytes of `inner` (the image's checksum), hashing
/// what it gives (before format 3.3).
struct HoldBack<R: Read> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    hash: Option<crate::sum::Xxh3>,
}

impl<R: Read> HoldBack<R> {
    /// Reads until more than 8 bytes are known, or the end.
    fn fill(&mut self) -> std::io::Result<()> {
        while self.end - self.start <= 8 && !self.eof {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.inner.read(&mut self.buf[self.end..])?;
            self.eof = n == 0;
            self.end += n;
        }
        Ok(())
    }
    /// The last 8 bytes, once all before them were read: nothing may follow them.
    fn trailer(&mut self) -> Result<[u8; 8]> {
        self.fill()?;
        if self.end - self.start != 8 {
            return Err(bad(if self.end - self.start < 8 {
                "truncated: the image checksum is missing"
            } else {
                "trailing data after the image"
            }));
        }
        Ok(self.buf[self.start..self.end].try_into().expect("8 bytes"))
    }
}

impl<R: Read> Read for HoldBack<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.fill()?;
        let n = (self.end - self.start).saturating_sub(8).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        if let Some(h) = &mut self.hash {
            h.update(&out[..n]);
        }
        self.start += n;
        Ok(n)
    }
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
    let mut head = [0u8; HEADER_LEN];
    let (compression, minor, n, sum, decompressed) = {
        let bytes = &store[..];
        let (compression, minor) = read_header(bytes)?;
        // (`minor` is the whole version from here on.)
        if bytes.len() < HEADER_LEN + 8 {
            return Err(bad("truncated: the image checksum is missing"));
        }
        head.copy_from_slice(&bytes[..HEADER_LEN]);
        let n = bytes.len() - 8;
        let sum = u64::from_le_bytes(bytes[n..].try_into().expect("8 bytes"));
        // Before 3.3 the whole-file checksum first: it covers the compressed bytes too.
        // From 3.3 it is the chain of the records, checked once they are.
        if minor < CHAINED && xxh3_64(&bytes[..n]) != sum {
            return Err(bad(CHECKSUM_MISMATCH));
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
        (compression, minor, n, sum, body)
    };
    let (store, body_at, end) = match decompressed {
        None => (store, HEADER_LEN, n),
        Some(body) => {
            let len = body.len();
            (Storage::Owned(body), 0, len)
        }
    };
    let checked = compression != Compression::None;
    let body = &store[body_at..end];
    let (meta, runs, shmem_runs) = parse_body(body, minor, limits, checked)?;
    check_chain(&head, body, minor, sum)?;
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
/// first the record that declares what follows (1.x metadata, 2.x/3.x index, or 3.x
/// pre-copy record), at most [`MAX_META`], whose bounds (memory contents, size of the
/// process and thread records, of the rounds) then bound the rest; a declared size
/// beyond `limits` is refused before anything more is read. Each record's checksum is
/// checked as it is read; [`parse_body`] verifies the rest.
fn decompress<D: Read>(mut dec: D, v: Version, limits: &ReadLimits) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut bound = 9 + MAX_META + 8;
    // Memory that decoding the metadata takes, declared so far.
    let mut meta_need = 0u64;
    let mut first = true;
    let mut prefix: Option<PreCopy> = None;
    loop {
        let at = body.len() as u64;
        let (tag, len) = record_head(&mut dec, &mut body, bound)?
            .ok_or_else(|| bad("truncated: the end record is missing"))?;
        let declaring = if first {
            let ok = tag == first_tag(v) || (v.0 >= 3 && tag == TAG_PRECOPY);
            if !ok {
                return Err(bad(format!("{} record out of place", first_name(v))));
            }
            true
        } else {
            tag == TAG_INDEX && prefix.is_some()
        };
        first = false;
        if declaring {
            if len > MAX_META {
                return Err(bad(format!(
                    "{} record of {len} bytes (a reader takes at most {MAX_META})",
                    first_name(v)
                )));
            }
            let need = (at + 9 + len + 8)
                .saturating_add(meta_need)
                .saturating_add(meta_decode_need(len, v));
            if need > limits.max_memory {
                return Err(too_big("its metadata needs", need, limits));
            }
            bound = bound.max(at + 9 + len + 8);
            read_payload(&mut dec, &mut body, len + 8, bound)?;
            check_record(&body, at as usize, len as usize)?;
            let payload = &body[at as usize + 9..(at + 9 + len) as usize];
            let (what, part) = if tag == TAG_PRECOPY {
                let pc: PreCopy = decode2(payload, "pre-copy")?;
                if pc.layouts_bytes > MAX_META || pc.rounds > crate::parse::MAX_ROUNDS {
                    return Err(bad("pre-copy rounds beyond the bounds of a reader"));
                }
                meta_need = meta_need.saturating_add(meta_decode_need(pc.layouts_bytes, v));
                // Rounds: layouts, a drop record each, memory; then room for the index.
                let part = (pc.layouts_bytes)
                    .saturating_add(u64::from(pc.rounds) * 2 * 17)
                    .saturating_add(declared_body_len(0, pc.budget))
                    .saturating_add(9 + MAX_META + 8);
                let est = pc.budget;
                prefix = Some(pc);
                (est, part)
            } else {
                let (estimate, records_bytes, records) = if v.0 == 1 {
                    (decode_meta_v1(payload, v.1)?.memory_estimate, 0, 0)
                } else {
                    let ix = decode_index(payload)?;
                    let records: u64 = ix.tree.iter().map(|t| 1 + t.threads.len() as u64).sum();
                    (ix.memory_estimate, ix.records_bytes, records)
                };
                meta_need = meta_need.saturating_add(meta_decode_need(len + records_bytes, v));
                prefix = None;
                // (A shared-memory record has 8 bytes more than a memory record; 3.x
                // has one drop record more.)
                let shmem_extra = if v.0 >= 2 { (estimate / PAGE) * 8 } else { 0 };
                let drops = if v.0 >= 3 { 17 } else { 0 };
                let part = declared_body_len(0, estimate)
                    .saturating_add(records_bytes)
                    .saturating_add(records.saturating_mul(17))
                    .saturating_add(shmem_extra)
                    .saturating_add(drops);
                (estimate, part)
            };
            bound = (at + 9 + len + 8).saturating_add(part);
            if bound.saturating_add(meta_need) > limits.max_memory {
                return Err(too_big(
                    &format!(
                        "the image declares {} of memory contents; reading it needs",
                        mib(what)
                    ),
                    bound.saturating_add(meta_need),
                    limits,
                ));
            }
            continue;
        }
        match tag {
            TAG_PAGES if (8 + PAGE..=8 + PAGES_RECORD_MAX as u64).contains(&len) => {}
            TAG_PAGES => return Err(bad("memory record of odd size")),
            TAG_PROCESS | TAG_THREAD if v.0 >= 2 && len <= MAX_META => {}
            TAG_SHMEM if v.0 >= 2 && (16 + PAGE..=16 + PAGES_RECORD_MAX as u64).contains(&len) => {}
            TAG_LAYOUT if prefix.as_ref().is_some_and(|p| len <= p.layouts_bytes) => {}
            TAG_DROPS if v.0 >= 3 && len <= MAX_META => {}
            records::TAG_LAZY if v >= crate::image::LAZY_MARK && len <= MAX_META => {}
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
        check_record(&body, at as usize, len as usize)?;
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

/// Whether record `rec` (its head, payload and checksum, nothing more) holds the
/// checksum of the rest of it.
pub(crate) fn record_sum_ok(rec: &[u8]) -> bool {
    let Some(sum_at) = rec.len().checked_sub(8) else {
        return false;
    };
    rec[sum_at..] == xxh3_64(&rec[..sum_at]).to_le_bytes()
}

/// Checks the checksum of the record at `at` of `body` (its payload `len` bytes long),
/// as it is read: [`parse_body`] then need not.
fn check_record(body: &[u8], at: usize, len: usize) -> Result<()> {
    if !record_sum_ok(&body[at..at + 9 + len + 8]) {
        return Err(bad(format!(
            "checksum mismatch in the record at byte {at} of the body (damaged image)"
        )));
    }
    Ok(())
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
pub(crate) fn first_name(v: Version) -> &'static str {
    if v.0 == 1 {
        "metadata"
    } else {
        "index"
    }
}

/// Decodes a 1.`minor` metadata record (the frozen 1.2 layout).
pub(crate) fn decode_meta_v1(payload: &[u8], minor: u16) -> Result<ProcessImageV1> {
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
pub(crate) fn decode2<T: serde::de::DeserializeOwned>(payload: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(payload)
        .map_err(|e| bad(format!("the {what} record does not decode: {e}")))
}

pub(crate) fn decode_index(payload: &[u8]) -> Result<Index> {
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
type ShmemRuns = Vec<(u64, u64, usize, usize)>;

/// The memory an image leaves in place, record after record: later copies of a page
/// win, a new layout keeps only what [`records::kept_ranges`] keeps, drops clear.
#[derive(Default)]
pub(crate) struct PageMap {
    /// start -> (end, offset of `start`'s data in the body).
    map: std::collections::BTreeMap<u64, (u64, usize)>,
}

impl PageMap {
    /// Clears [s, e).
    pub(crate) fn clear(&mut self, s: u64, e: u64) {
        let over: Vec<(u64, u64, usize)> = self
            .map
            .range(..e)
            .rev()
            .take_while(|(_, &(end, _))| end > s)
            .map(|(&a, &(b, off))| (a, b, off))
            .collect();
        for (a, b, off) in over {
            self.map.remove(&a);
            if a < s {
                self.map.insert(a, (s, off));
            }
            if b > e {
                self.map.insert(e, (b, off + (e - a) as usize));
            }
        }
    }
    /// Data at [s, e) is at `off` of the body now.
    pub(crate) fn put(&mut self, s: u64, e: u64, off: usize) {
        self.clear(s, e);
        self.map.insert(s, (e, off));
    }
    /// Keeps only what lies in `keep` (sorted, not overlapping).
    pub(crate) fn keep_only(&mut self, keep: &[(u64, u64)]) {
        let mut gaps = Vec::new();
        let mut at = 0u64;
        for &(s, e) in keep {
            if s > at {
                gaps.push((at, s));
            }
            at = at.max(e);
        }
        gaps.push((at, u64::MAX));
        for (s, e) in gaps {
            self.clear(s, e);
        }
    }
    fn runs(&self) -> Runs {
        self.map
            .iter()
            .map(|(&s, &(e, off))| (s, off, (e - s) as usize))
            .collect()
    }
}

/// Whether [s, s+len) lies in staged areas of `vmas` (where a pre-copy image's memory
/// records may be).
pub(crate) fn in_staged(vmas: &[Vma], s: u64, len: u64) -> bool {
    let e = s + len;
    let mut at = s;
    let mut areas: Vec<&Vma> = vmas.iter().filter(|v| records::staged(v)).collect();
    areas.sort_by_key(|v| v.start);
    for v in areas {
        if v.start <= at && at < v.end {
            at = v.end;
            if at >= e {
                return true;
            }
        }
    }
    false
}

/// `checked`: every record's checksum was checked as it was read ([`decompress`]).
fn parse_body(
    body: &[u8],
    v: Version,
    limits: &ReadLimits,
    checked: bool,
) -> Result<(ProcessImage, Runs, ShmemRuns)> {
    let mut parser = crate::parse::Parser::new(v, *limits);
    let mut pages = PageMap::default();
    let mut layout: Option<Vec<Vma>> = None;
    let mut meta: Option<ProcessImage> = None;
    let mut shmem_runs = Vec::new();
    let mut pos = 0usize;
    let mut n = 0u64;
    let mut rounds = false;
    while !parser.ended() {
        if body.len() - pos < 9 {
            return Err(bad("truncated: the end record is missing"));
        }
        let tag = body[pos];
        let len = u64::from_le_bytes(body[pos + 1..pos + 9].try_into().expect("8 bytes"));
        if len > MAX_RECORD || ((body.len() - pos - 9) as u64) < len + 8 {
            return Err(bad(format!(
                "truncated or damaged record {n} at byte {pos} of the body"
            )));
        }
        let len = len as usize;
        let payload_at = pos + 9;
        let sum_at = payload_at + len;
        if !checked && !record_sum_ok(&body[pos..sum_at + 8]) {
            return Err(bad(format!(
                "checksum mismatch in record {n} at byte {pos} of the body (damaged image)"
            )));
        }
        n += 1;
        parser.record(tag, &body[payload_at..sum_at], payload_at, &mut |ev| {
            match ev {
                Event::Layout(l) => {
                    match &layout {
                        Some(prev) => pages.keep_only(&records::kept_ranges(prev, &l.vmas)),
                        None => pages.keep_only(&[]),
                    }
                    layout = Some(l.vmas);
                    rounds = true;
                }
                Event::Final(m) => {
                    if let Some(prev) = &layout {
                        pages.keep_only(&records::kept_ranges(prev, &m.vmas));
                    }
                    layout = Some(m.vmas.clone());
                    meta = Some(*m);
                }
                Event::Drops(d) => {
                    for (a, len) in d {
                        pages.clear(a, a + len);
                    }
                }
                Event::Pages { vaddr, data, at } => {
                    let len = data.len() as u64;
                    // (After pre-copy rounds every page must be where it can be put.)
                    if rounds && !layout.as_ref().is_some_and(|l| in_staged(l, vaddr, len)) {
                        return Err(bad(format!(
                            "memory at {vaddr:#x} outside the process's private memory"
                        )));
                    }
                    pages.put(vaddr, vaddr + len, at);
                }
                Event::Shmem {
                    ino,
                    offset,
                    data,
                    at,
                } => shmem_runs.push((ino, offset, at, data.len())),
                // Read whole, the image is restored with all of it at hand.
                Event::Lazy(_) => {}
            }
            Ok(())
        })?;
        pos = sum_at + 8;
    }
    if pos != body.len() {
        return Err(bad("trailing data after the end record"));
    }
    let meta = meta.ok_or_else(|| bad("no metadata record"))?;
    Ok((meta, pages.runs(), shmem_runs))
}
