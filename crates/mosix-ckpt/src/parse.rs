//! The records of an image body, checked one by one in the order they come, each turned
//! into what it means ([`Event`]): the same checks whether the whole image is at hand
//! (a file, [`crate::read`]) or arrives while the process is rebuilt from it (a stream,
//! [`crate::stream`]). Record checksums are the caller's (it has the raw bytes).
//!
//! Order: format 1: metadata, memory, end. Format 2: index, process record, its thread
//! records, memory and shared memory, end. Format 3: as 2, or first a pre-copy record
//! and rounds (a layout record, at most one drop record, memory) before the index; after
//! the thread records at most one drop record, then memory, shared memory, end. Format
//! 3.4: before the end, at most one lazy mark, after which only memory records come.

use crate::error::{bad, Result};
use crate::image::{
    ProcessImage, ShmemObject, ThreadImage, LAZY_MARK, PAGES_RECORD_MAX, TAG_END, TAG_META,
    TAG_PAGES, TAG_SHMEM,
};
use crate::limits::ReadLimits;
use crate::read::{
    decode2, decode_index, decode_meta_v1, first_name, meta_decode_need, too_big, Version, MAX_META,
};
use crate::records::{
    self, Index, Layout, PreCopy, ProcRecord, TAG_DROPS, TAG_INDEX, TAG_LAYOUT, TAG_LAZY,
    TAG_PRECOPY, TAG_PROCESS, TAG_THREAD,
};

const PAGE: u64 = 4096;
/// The most pre-copy rounds an image may declare.
pub const MAX_ROUNDS: u32 = 64;

/// What a record means.
pub(crate) enum Event<'a> {
    /// A pre-copy round begins: the memory is laid out so now.
    Layout(Box<Layout>),
    /// Memory given back: these ranges are as in a fresh mapping again.
    Drops(Vec<(u64, u64)>),
    /// The process's final state; the memory that follows is laid out as it says.
    Final(Box<ProcessImage>),
    /// Memory contents at `vaddr` (`at`: where `data` starts in the body).
    Pages {
        vaddr: u64,
        data: &'a [u8],
        at: usize,
    },
    /// Only private anonymous memory follows, then the end (format 3.4): the process
    /// may run from here while it comes. The ranges its pages may come for (others are
    /// zero); drop records after it name pages that are zero.
    Lazy(Vec<(u64, u64)>),
    /// Data of shared memory object `ino` at `offset`.
    Shmem {
        ino: u64,
        offset: u64,
        data: &'a [u8],
        at: usize,
    },
}

/// What the records of a format 2 (or 3) final part read so far make.
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
                let p = crate::records::decode_proc(payload)
                    .map_err(|e| bad(format!("the process record does not decode: {e}")))?;
                self.current = Some((p, Vec::new()));
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

/// The pre-copy rounds being read.
struct Prefix {
    pc: PreCopy,
    rounds: u32,
    layout_bytes: u64,
    /// A layout was read: memory may follow.
    open: bool,
}

/// Checks the records of one body in order and says what each means.
pub(crate) struct Parser {
    v: Version,
    limits: ReadLimits,
    records: u64,
    payload_total: u64,
    body2: Body2,
    /// The final state was given out.
    final_out: bool,
    /// The final process's shared memory objects (its shared memory records must be
    /// of one of them, within its size).
    shmem: Vec<ShmemObject>,
    prefix: Option<Prefix>,
    /// The bound of memory contents of the current part (None: nothing declared yet),
    /// and what it held so far.
    estimate: Option<u64>,
    page_bytes: u64,
    /// A drop record may come next.
    drops_ok: bool,
    /// The lazy mark was read: only memory records and the end may follow.
    lazy: bool,
    ended: bool,
}

impl Parser {
    pub(crate) fn new(v: Version, limits: ReadLimits) -> Parser {
        Parser {
            v,
            limits,
            records: 0,
            payload_total: 0,
            body2: Body2::default(),
            final_out: false,
            shmem: Vec::new(),
            prefix: None,
            estimate: None,
            page_bytes: 0,
            drops_ok: false,
            lazy: false,
            ended: false,
        }
    }

    /// Whether the end record was read.
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    fn count(&mut self, n: u64) -> Result<()> {
        let est = self.estimate.unwrap_or(0);
        self.page_bytes += n;
        if self.page_bytes > est {
            return Err(bad(format!(
                "the image holds more memory contents than the {est} bytes it declares"
            )));
        }
        Ok(())
    }

    /// Gives out the final state once its records are all read (before the first record
    /// that is not one of them).
    fn final_now<'a>(&mut self, sink: &mut dyn FnMut(Event<'a>) -> Result<()>) -> Result<()> {
        if self.final_out {
            return Ok(());
        }
        if self.v.0 == 1 || self.prefix.is_some() || self.body2.index.is_none() {
            return Err(bad("memory before metadata"));
        }
        let m = std::mem::take(&mut self.body2).end()?;
        self.shmem = m.shmem.clone();
        self.final_out = true;
        sink(Event::Final(Box::new(m)))
    }

    /// Checks record `tag` with `payload` (its checksum already checked), which starts
    /// at byte `at` of the body, and passes what it means to `sink`.
    pub(crate) fn record<'a>(
        &mut self,
        tag: u8,
        payload: &'a [u8],
        at: usize,
        sink: &mut dyn FnMut(Event<'a>) -> Result<()>,
    ) -> Result<()> {
        if self.ended {
            return Err(bad("trailing data after the end record"));
        }
        let len = payload.len();
        self.records += 1;
        self.payload_total += len as u64;
        let first = self.records == 1;
        let v = self.v;
        let first_ok = match v.0 {
            1 => tag == TAG_META,
            2 => tag == TAG_INDEX,
            _ => tag == TAG_INDEX || tag == TAG_PRECOPY,
        };
        if (first && !first_ok) || (!first && (tag == TAG_META || tag == TAG_PRECOPY)) {
            return Err(bad(format!("{} record out of place", first_name(v))));
        }
        let drops_ok = std::mem::replace(&mut self.drops_ok, false);
        if self.lazy && tag != TAG_PAGES && tag != TAG_DROPS && tag != TAG_END {
            return Err(bad("a record other than memory after the lazy mark"));
        }
        match tag {
            TAG_META if v.0 == 1 => {
                if len as u64 > MAX_META {
                    return Err(bad(format!(
                        "metadata record of {len} bytes (a reader takes at most {MAX_META})"
                    )));
                }
                let need = meta_decode_need(len as u64, v);
                if need > self.limits.max_memory {
                    return Err(too_big("its metadata needs", need, &self.limits));
                }
                let m: ProcessImage = decode_meta_v1(payload, v.1)?.into();
                self.estimate = Some(m.memory_estimate);
                self.final_out = true;
                sink(Event::Final(Box::new(m)))?;
            }
            TAG_PRECOPY if v.0 >= 3 => {
                let pc: PreCopy = decode2(payload, "pre-copy")?;
                if pc.rounds == 0 || pc.rounds > MAX_ROUNDS || pc.layouts_bytes > MAX_META {
                    return Err(bad(format!(
                        "pre-copy rounds beyond the bounds of a reader ({} rounds, {} bytes of layouts)",
                        pc.rounds, pc.layouts_bytes
                    )));
                }
                self.estimate = Some(pc.budget);
                self.prefix = Some(Prefix {
                    rounds: pc.rounds,
                    layout_bytes: pc.layouts_bytes,
                    pc,
                    open: false,
                });
            }
            TAG_LAYOUT if v.0 >= 3 => {
                let Some(p) = &mut self.prefix else {
                    return Err(bad("layout record out of place"));
                };
                if p.rounds == 0 || len as u64 > p.layout_bytes {
                    return Err(bad("more pre-copy rounds than declared"));
                }
                p.rounds -= 1;
                p.layout_bytes -= len as u64;
                p.open = true;
                let need = meta_decode_need(len as u64, (2, 0));
                if need > self.limits.max_memory {
                    return Err(too_big("its layout needs", need, &self.limits));
                }
                let l: Layout = decode2(payload, "layout")?;
                self.drops_ok = true;
                sink(Event::Layout(Box::new(l)))?;
            }
            TAG_DROPS if v.0 >= 3 => {
                // Right after a layout, or after the final part's thread records, or
                // (pages that are zero) after the lazy mark.
                let after_threads = self.prefix.is_none()
                    && self.body2.index.is_some()
                    && !self.final_out
                    && self.body2.current.is_some();
                if !(drops_ok || after_threads || self.lazy) {
                    return Err(bad("drop record out of place"));
                }
                if after_threads {
                    self.final_now(sink)?;
                }
                if len == 0 || !len.is_multiple_of(16) {
                    return Err(bad("drop record of odd size"));
                }
                self.count(len as u64)?;
                let d = ranges(payload, "memory given back that is not whole pages")?;
                sink(Event::Drops(d))?;
            }
            TAG_INDEX | TAG_PROCESS | TAG_THREAD if v.0 >= 2 => {
                if len as u64 > MAX_META {
                    return Err(bad(format!(
                        "a record of {len} bytes (a reader takes at most {MAX_META})"
                    )));
                }
                if tag == TAG_INDEX {
                    if let Some(p) = self.prefix.take() {
                        if p.rounds == p.pc.rounds {
                            return Err(bad("pre-copy without a round"));
                        }
                    }
                } else if self.prefix.is_some() || self.final_out {
                    return Err(bad("process record out of place"));
                }
                self.body2.record(tag, payload, &self.limits)?;
                if tag == TAG_INDEX {
                    self.estimate = self.body2.index.as_ref().map(|ix| ix.memory_estimate);
                    self.page_bytes = 0;
                }
            }
            TAG_SHMEM if v.0 >= 2 => {
                if self.prefix.is_some() {
                    return Err(bad("shared memory data before its process"));
                }
                if !self.final_out {
                    if self.body2.current.is_none() {
                        return Err(bad("shared memory data before its process"));
                    }
                    self.final_now(sink)?;
                }
                if len < 16 + PAGE as usize
                    || len > 16 + PAGES_RECORD_MAX
                    || !(len - 16).is_multiple_of(PAGE as usize)
                {
                    return Err(bad("shared memory record of odd size"));
                }
                self.count((len - 16) as u64)?;
                let ino = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                let offset = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
                if offset % PAGE != 0 {
                    return Err(bad("shared memory record at unaligned offset"));
                }
                let fits = self.shmem.iter().any(|o| {
                    o.ino == ino
                        && offset.saturating_add((len - 16) as u64) <= o.size.div_ceil(PAGE) * PAGE
                });
                if !fits {
                    return Err(bad("shared memory data of no object of the process"));
                }
                sink(Event::Shmem {
                    ino,
                    offset,
                    data: &payload[16..],
                    at: at + 16,
                })?;
            }
            TAG_PAGES => {
                match &self.prefix {
                    Some(p) if p.open => {}
                    Some(_) => return Err(bad("memory before metadata")),
                    None if !self.final_out => {
                        if self.body2.current.is_none() {
                            return Err(bad("memory before metadata"));
                        }
                        self.final_now(sink)?;
                    }
                    None => {}
                }
                if len < 8 + PAGE as usize
                    || len > 8 + PAGES_RECORD_MAX
                    || !(len - 8).is_multiple_of(PAGE as usize)
                {
                    return Err(bad("memory record of odd size"));
                }
                self.count((len - 8) as u64)?;
                let vaddr = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                if vaddr % PAGE != 0 || vaddr.checked_add((len - 8) as u64).is_none() {
                    return Err(bad("memory record at unaligned address"));
                }
                sink(Event::Pages {
                    vaddr,
                    data: &payload[8..],
                    at: at + 8,
                })?;
            }
            TAG_LAZY if v >= LAZY_MARK => {
                // (A second one is refused above: only memory follows the first.)
                if self.prefix.is_some() {
                    return Err(bad("lazy mark out of place"));
                }
                if len as u64 > MAX_META || !len.is_multiple_of(16) {
                    return Err(bad("lazy mark of odd size"));
                }
                self.count(len as u64)?;
                if !self.final_out {
                    if self.body2.current.is_none() {
                        return Err(bad("lazy mark out of place"));
                    }
                    self.final_now(sink)?;
                }
                self.lazy = true;
                sink(Event::Lazy(ranges(
                    payload,
                    "lazy mark of memory not whole pages",
                )?))?;
            }
            TAG_END => {
                if len != 16 {
                    return Err(bad("end record of wrong size"));
                }
                let count = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                let total = u64::from_le_bytes(payload[8..].try_into().expect("8 bytes"));
                if count != self.records || total != self.payload_total - 16 {
                    return Err(bad("record count or size does not match the end record"));
                }
                if self.prefix.is_some() {
                    return Err(bad("no index record"));
                }
                if !self.final_out {
                    if v.0 == 1 {
                        return Err(bad("no metadata record"));
                    }
                    self.final_now(sink)?;
                }
                self.ended = true;
            }
            t => return Err(bad(format!("unknown record type {t}"))),
        }
        Ok(())
    }
}

/// (address, length) pairs of whole pages, 16 bytes each; `what` if one is not.
fn ranges(payload: &[u8], what: &str) -> Result<Vec<(u64, u64)>> {
    let mut d = Vec::with_capacity(payload.len() / 16);
    for c in payload.chunks_exact(16) {
        let a = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
        let n = u64::from_le_bytes(c[8..].try_into().expect("8 bytes"));
        if a % PAGE != 0 || n % PAGE != 0 || n == 0 || a.checked_add(n).is_none() {
            return Err(bad(what));
        }
        d.push((a, n));
    }
    Ok(d)
}
