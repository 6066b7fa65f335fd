//! Pre-copy: the memory of a process saved while it runs, in rounds, then its final
//! state with only what changed since, in a short freeze (image format 3).
//!
//! The process is frozen once for a moment to make a [`Tracker`] of its memory. Round 1
//! saves every page of its own (as a plain checkpoint would) and write-protects it; each
//! later round saves the pages written since the round before (PAGEMAP_SCAN), and says
//! which pages it gave back (drop records). A round begins with the layout of the
//! memory; what stays the same kind of memory from one layout to the next
//! ([`records::kept_ranges`]) carries over, what is new is saved whole. Memory that lost
//! its tracking (remapped, replaced, or a page that could not be read while it changed)
//! is given back and saved whole again. Rounds end when a round finds little, when it
//! does not find clearly less than the one before (the process writes memory about as
//! fast as it is saved: the final round then saves it, which is a plain frozen save), or
//! after `max_rounds`. Then the process is frozen, its state read, the last written pages
//! found, the tracking ended (the userfaultfd closed: nothing of it stays in the process),
//! and the final part written.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::dirty::{Tracker, PAGE_IS_PFNZERO};
use crate::dump::{self, Frozen, Moving, Progress};
use crate::error::{Error, Result};
use crate::image::{Compression, ImageWriter, MmFields, Vma, VmaKind, PAGES_RECORD_MAX};
use crate::procfs;
use crate::records::{kept_ranges, staged, Layout, PreCopy};
use crate::sys::{self, PAGE};

/// How a checkpoint of a running process goes.
#[derive(Clone, Copy, Debug)]
pub struct LiveOptions {
    pub compression: Compression,
    /// Rounds while the process runs, at most (the final, frozen one not counted).
    pub max_rounds: u32,
    /// A round that finds at most this many bytes written ends the rounds.
    pub settle_bytes: u64,
    /// A round that finds more than this fraction of the bytes of the round before ends
    /// the rounds (the process writes as fast as its memory is saved).
    pub shrink: f64,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            compression: Compression::None,
            max_rounds: 6,
            settle_bytes: 2 << 20,
            shrink: 0.7,
        }
    }
}

/// One round of a checkpoint of a running process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RoundStat {
    /// Bytes of memory contents saved.
    pub bytes: u64,
    /// Bytes of memory found given back.
    pub dropped: u64,
    /// How long it took.
    pub ms: f64,
}

/// Figures of a checkpoint of a running process.
#[derive(Clone, Debug, Default)]
pub struct LiveStats {
    /// The rounds made while it ran.
    pub rounds: Vec<RoundStat>,
    /// The final round, made while it was frozen.
    pub last: RoundStat,
    /// Bytes of memory contents saved in all (some pages more than once).
    pub memory_bytes: u64,
    /// How long it was frozen for its final state (the moment it was frozen to start
    /// tracking not counted: see `arm_ms`).
    pub frozen: Duration,
    /// How long it was frozen to start tracking.
    pub arm: Duration,
}

/// Sorted, non-overlapping ranges.
type Ranges = Vec<(u64, u64)>;

fn normalize(mut v: Ranges) -> Ranges {
    v.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(v.len());
    for (s, e) in v {
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut at = s;
        while j < b.len() && b[j].1 <= at {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            if b[k].0 > at {
                out.push((at, b[k].0));
            }
            at = at.max(b[k].1);
            k += 1;
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

fn contains(r: &[(u64, u64)], a: u64) -> bool {
    let i = r.partition_point(|x| x.1 <= a);
    i < r.len() && r[i].0 <= a
}

fn bytes_of(r: &[(u64, u64)]) -> u64 {
    r.iter().map(|x| x.1 - x.0).sum()
}

/// What a round reads: (start, end, anonymous, only zeros where sent before).
#[derive(Clone, Copy, Debug)]
struct Read {
    start: u64,
    end: u64,
    anon: bool,
    /// The shared zero page is mapped there: nothing to read; where the receiver holds
    /// data of an earlier round, zeros are sent.
    zero: bool,
}

/// A round's plan: the memory given back, what to read.
struct Plan {
    drops: Ranges,
    reads: Vec<Read>,
    /// What carries over at the receiver from the layout before.
    kept: Ranges,
    /// What is saved whole (every page of its own, protected again first).
    whole: Ranges,
}

impl Plan {
    /// Bytes of contents the round may write.
    fn bound(&self, sent: &[(u64, u64)]) -> u64 {
        self.reads
            .iter()
            .map(|r| {
                if r.zero {
                    bytes_of(&intersect(&[(r.start, r.end)], sent))
                } else {
                    r.end - r.start
                }
            })
            .sum::<u64>()
            + 16 * self.drops.len() as u64
    }
}

/// The saving side of the rounds.
pub(crate) struct Source {
    pid: i32,
    tracker: Option<Tracker>,
    /// The layout the receiver has (the last one written).
    layout: Option<Vec<Vma>>,
    /// Where the receiver holds pages of ours (sorted ranges).
    sent: Ranges,
    /// Ranges whose written pages were found but not saved: saved whole next round.
    redo: Ranges,
    buf: Vec<u8>,
}

impl Source {
    pub(crate) fn new(pid: i32, tracker: Tracker) -> Source {
        Source {
            pid,
            tracker: Some(tracker),
            layout: None,
            sent: Vec::new(),
            redo: Vec::new(),
            buf: Vec::new(),
        }
    }

    fn tracker(&self) -> Result<&Tracker> {
        self.tracker.as_ref().ok_or_else(|| Error::Target {
            pid: self.pid,
            msg: "its tracking has ended".into(),
        })
    }

    /// Bytes of memory of its own in the staged areas of `vmas` now.
    pub(crate) fn resident(&self, vmas: &[Vma]) -> Result<u64> {
        let t = self.tracker()?;
        let mut n = 0;
        for v in vmas.iter().filter(|v| staged(v)) {
            n += bytes_of(&t.saved(v.start, v.end, v.kind == VmaKind::Anon)?);
        }
        Ok(n)
    }

    /// Finds what a round with layout `vmas` saves (and protects it again). `frozen`:
    /// nothing may change meanwhile (any failure is one).
    /// `reg`: the areas registered with the tracker (VmFlags "uw").
    fn plan(&mut self, vmas: &[Vma], reg: &[(u64, u64)], frozen: bool) -> Result<Plan> {
        let t = self.tracker.take().ok_or_else(|| Error::Target {
            pid: self.pid,
            msg: "its tracking has ended".into(),
        })?;
        let r = self.plan_with(&t, vmas, &normalize(reg.to_vec()), frozen);
        self.tracker = Some(t);
        r
    }

    fn plan_with(
        &mut self,
        t: &Tracker,
        vmas: &[Vma],
        reg: &[(u64, u64)],
        frozen: bool,
    ) -> Result<Plan> {
        let mut lost: Ranges = Vec::new();
        for v in vmas.iter().filter(|v| staged(v)) {
            for (s, e) in subtract(&[(v.start, v.end)], reg) {
                if let Err(e2) = t.register(s, e) {
                    if frozen {
                        return Err(e2);
                    }
                    // It changed since the layout was read: next round.
                    lost.push((s, e));
                }
            }
        }
        let kept = match &self.layout {
            Some(prev) => kept_ranges(prev, vmas),
            None => Vec::new(),
        };
        let tracked = subtract(&intersect(&kept, reg), &self.redo);
        let mut drops: Ranges = Vec::new();
        let mut reads = Vec::new();
        let mut untracked: Ranges = Vec::new();
        let mut saved_whole: Ranges = Vec::new();
        let mut areas: Vec<&Vma> = vmas.iter().filter(|v| staged(v)).collect();
        areas.sort_by_key(|v| v.start);
        for v in areas {
            let area = [(v.start, v.end)];
            let anon = v.kind == VmaKind::Anon;
            // `whole`: every page of its own there (the receiver has none of them), else
            // those written since the last scan. Either way protected again first.
            let found = |s: u64, e: u64, whole: bool, reads: &mut Vec<Read>| -> Result<bool> {
                let w = if whole {
                    t.whole(s, e, anon)?
                } else {
                    t.written(s, e)?
                };
                let Some(w) = w else {
                    return Ok(false);
                };
                for r in w {
                    reads.push(Read {
                        start: r.start,
                        end: r.end,
                        anon,
                        zero: r.categories & PAGE_IS_PFNZERO != 0,
                    });
                }
                Ok(true)
            };
            for (s, e) in intersect(&area, &tracked) {
                if !found(s, e, false, &mut reads)? {
                    untracked.push((s, e));
                    continue;
                }
                // Pages of ours there that are no longer its own: given back.
                let had = intersect(&self.sent, &[(s, e)]);
                if !had.is_empty() {
                    let own = t.saved(s, e, anon)?;
                    drops.extend(subtract(&had, &own));
                }
            }
            // Kept at the receiver but not tracked all along: cleared, saved whole.
            let mut whole = subtract(&intersect(&area, &kept), &tracked);
            whole.extend(intersect(&area, &untracked));
            for (s, e) in normalize(whole) {
                drops.push((s, e));
                saved_whole.push((s, e));
                if !found(s, e, true, &mut reads)? {
                    if frozen {
                        return Err(Error::Target {
                            pid: self.pid,
                            msg: format!("its memory at {s:#x} cannot be tracked"),
                        });
                    }
                    lost.push((s, e));
                }
            }
            // New at the receiver: saved whole.
            for (s, e) in subtract(&area, &kept) {
                saved_whole.push((s, e));
                if !found(s, e, true, &mut reads)? {
                    if frozen {
                        return Err(Error::Target {
                            pid: self.pid,
                            msg: format!("its memory at {s:#x} cannot be tracked"),
                        });
                    }
                    lost.push((s, e));
                }
            }
        }
        self.redo = normalize(lost);
        // Drops only where the receiver holds something of ours.
        let drops = intersect(&normalize(drops), &intersect(&self.sent, &kept));
        Ok(Plan {
            drops,
            reads,
            kept,
            whole: normalize(saved_whole),
        })
    }

    /// Reads what `plan` says and writes it after the round's layout: returns the bytes
    /// of contents written. While the process runs (`frozen` false), memory that cannot
    /// be read is saved whole next round.
    fn execute<W: Write + 'static>(
        &mut self,
        plan: &Plan,
        w: &mut ImageWriter<W>,
        frozen: bool,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        // The receiver's pages: only what carries over, less what was given back.
        self.sent = subtract(&intersect(&self.sent, &plan.kept), &plan.drops);
        let mut added: Ranges = Vec::new();
        let mut written = 0u64;
        if self.buf.len() < PAGES_RECORD_MAX {
            self.buf = vec![0u8; PAGES_RECORD_MAX];
        }
        let zeros = vec![0u8; PAGE as usize];
        // Runs of reads, each at most a record's worth.
        let mut i = 0;
        while i < plan.reads.len() {
            let r = plan.reads[i];
            if r.zero {
                for (s, e) in intersect(&[(r.start, r.end)], &self.sent) {
                    let mut a = s;
                    while a < e {
                        w.pages(a, &zeros)?;
                        written += PAGE;
                        a += PAGE;
                    }
                }
                i += 1;
                continue;
            }
            // Split a long read into record-sized pieces.
            let mut at = r.start;
            while at < r.end {
                let len = ((r.end - at) as usize).min(PAGES_RECORD_MAX);
                let chunk = &mut self.buf[..len];
                match sys::read_mem_many(self.pid, &[(at, len)], chunk) {
                    Ok(()) => {}
                    Err(e) if frozen => return Err(e),
                    Err(_) => {
                        self.redo.push((at, at + len as u64));
                        at += len as u64;
                        continue;
                    }
                }
                let pages = len / PAGE as usize;
                fn pg(c: &[u8], k: usize) -> &[u8] {
                    &c[k * PAGE as usize..(k + 1) * PAGE as usize]
                }
                let mut k = 0;
                while k < pages {
                    let addr = at + k as u64 * PAGE;
                    // All-zero anonymous memory is what a fresh mapping has: only where
                    // the receiver holds other data must zeros be sent.
                    let skip = |k: usize| {
                        r.anon
                            && dump::is_zero(pg(chunk, k))
                            && !contains(&self.sent, at + k as u64 * PAGE)
                    };
                    if skip(k) {
                        k += 1;
                        continue;
                    }
                    let s = k;
                    while k < pages && !skip(k) {
                        k += 1;
                    }
                    let bytes = &chunk[s * PAGE as usize..k * PAGE as usize];
                    w.pages(addr, bytes)?;
                    added.push((addr, addr + bytes.len() as u64));
                    written += bytes.len() as u64;
                }
                at += len as u64;
                progress(written);
            }
            i += 1;
        }
        added.extend(std::mem::take(&mut self.sent));
        self.sent = normalize(added);
        self.redo = normalize(std::mem::take(&mut self.redo));
        Ok(written)
    }

    /// One round while the process runs: layout, drops, pages. None if it would not fit
    /// in what the image may still hold (its written pages are saved whole later).
    fn round<W: Write + 'static>(
        &mut self,
        w: &mut ImageWriter<W>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Option<RoundStat>> {
        let t0 = Instant::now();
        let maps = procfs::maps(self.pid)?;
        let (vmas, reg, _) = dump::vmas_tracked(self.pid, &maps, &[])?;
        let plan = self.plan(&vmas, &reg, false)?;
        let layout = layout_of(self.pid, &vmas)?;
        let fits = w
            .rounds_left()
            .is_some_and(|(r, b)| r > 0 && (postcard_len(&layout) as u64) <= b);
        if !fits || plan.bound(&self.sent) > w.room() {
            // Not saved now: saved whole later. The plan protected its pages again, so
            // what it found written, and all it would have saved whole, is saved whole.
            let mut redo: Ranges = plan.reads.iter().map(|r| (r.start, r.end)).collect();
            redo.extend_from_slice(&plan.whole);
            redo.append(&mut self.redo);
            self.redo = normalize(redo);
            return Ok(None);
        }
        w.layout(&layout, &plan.drops)?;
        self.layout = Some(vmas);
        let bytes = self.execute(&plan, w, false, progress)?;
        Ok(Some(RoundStat {
            bytes,
            dropped: bytes_of(&plan.drops),
            ms: t0.elapsed().as_secs_f64() * 1e3,
        }))
    }
}

fn postcard_len<T: serde::Serialize>(v: &T) -> usize {
    postcard::to_stdvec(v).map_or(usize::MAX, |b| b.len())
}

/// The layout of running process `pid` (areas `vmas`), read from /proc.
fn layout_of(pid: i32, vmas: &[Vma]) -> Result<Layout> {
    let st = procfs::status(pid)?;
    let sf = procfs::stat_fields(pid)?;
    let groups = procfs::id_list(st.get("Groups"));
    let start_brk = procfs::field_u64(&sf, 47);
    // Its brk needs a system call of its own; the end of its heap is as good for this.
    let brk = vmas
        .iter()
        .find(|v| v.start <= start_brk && start_brk < v.end.max(v.start + 1))
        .map_or(start_brk, |v| v.end.max(start_brk));
    Ok(Layout {
        pid: procfs::own_pid(pid),
        arch: std::env::consts::ARCH.to_string(),
        kernel: sys::uname_release(),
        exe: procfs::link(pid, "exe")?,
        exe_id: procfs::file_id_of(&format!("/proc/{pid}/exe")).ok(),
        creds: crate::image::Creds {
            uid: procfs::ids(st.get("Uid")),
            gid: procfs::ids(st.get("Gid")),
            groups,
        },
        caps: crate::Caps::of_pid(pid).ok(),
        mm: MmFields {
            start_code: procfs::field_u64(&sf, 26),
            end_code: procfs::field_u64(&sf, 27),
            start_stack: procfs::field_u64(&sf, 28),
            start_data: procfs::field_u64(&sf, 45),
            end_data: procfs::field_u64(&sf, 46),
            start_brk,
            brk,
            arg_start: procfs::field_u64(&sf, 48),
            arg_end: procfs::field_u64(&sf, 49),
            env_start: procfs::field_u64(&sf, 50),
            env_end: procfs::field_u64(&sf, 51),
            auxv: procfs::auxv(pid)?,
        },
        vmas: vmas.to_vec(),
        clocks: Some(dump::clocks_of(pid)),
    })
}

/// Saves running process `pid` into `out` in pre-copy rounds, then freezes it
/// (`on_frozen` is called then, and returns the system calls finished for its threads
/// meanwhile, as [`crate::checkpoint_moving_with`] does), saves its final state and
/// returns it frozen. `tracker`: one made already (else one is made, which freezes it
/// for a moment). On failure the process goes on as it was.
#[allow(clippy::too_many_arguments)]
pub(crate) fn precopy<W: Write + 'static>(
    pid: i32,
    out: W,
    opts: &LiveOptions,
    moving: Moving,
    tracker: Option<Tracker>,
    on_frozen: &mut dyn FnMut() -> Result<Vec<(i32, i64)>>,
    on_round: &mut dyn FnMut(&RoundStat),
    progress: Progress<'_>,
) -> Result<(W, LiveStats, Frozen)> {
    let mut stats = LiveStats::default();
    let t0 = Instant::now();
    let tracker = match tracker {
        Some(t) => t,
        None => {
            let mut f = dump::freeze(pid)?;
            let t = Tracker::arm(&mut f);
            let released = f.release();
            let t = t?;
            released?;
            t
        }
    };
    stats.arm = t0.elapsed();
    let mut src = Source::new(pid, tracker);
    let maps = procfs::maps(pid)?;
    let vmas = dump::vmas_of(pid, &maps)?;
    let resident = src.resident(&vmas)?;
    let first = layout_of(pid, &vmas)?;
    let pc = PreCopy {
        budget: resident.saturating_mul(3).saturating_add(64 << 20),
        layouts_bytes: (postcard_len(&first) as u64)
            .saturating_mul(16)
            .saturating_add(64 << 10)
            .min(crate::read::MAX_META),
        rounds: opts.max_rounds.clamp(1, crate::parse::MAX_ROUNDS),
        resident,
    };
    let mut w = ImageWriter::precopy(out, opts.compression, &pc)?;
    let mut done = 0u64;
    let mut prev: Option<u64> = None;
    for _ in 0..pc.rounds {
        let base = done;
        let mut p = |n: u64| progress(base + n, resident);
        let Some(r) = src.round(&mut w, &mut p)? else {
            break;
        };
        done += r.bytes;
        stats.memory_bytes += r.bytes;
        stats.rounds.push(r);
        on_round(&r);
        let settled = r.bytes <= opts.settle_bytes;
        let stuck = prev.is_some_and(|p| r.bytes as f64 > opts.shrink * p as f64);
        if settled || stuck {
            break;
        }
        prev = Some(r.bytes);
    }
    // The final round, frozen; what was written so far is on its way first.
    w.flush()?;
    let mut f = dump::freeze(pid)?;
    let t1 = Instant::now();
    for (tid, ret) in on_frozen()? {
        if let Some(t) = f.tasks.iter_mut().find(|t| t.tid == tid) {
            t.regs.rax = ret as u64;
            sys::set_regs(tid, &t.regs)?;
        }
    }
    let settled = t1.elapsed();
    let state = dump::capture(&mut f, moving)?;
    let captured = t1.elapsed();
    // Pages copied on write in private mappings of shared memory are no staged memory:
    // the rounds did not save them, and the final part has no place for them.
    for v in &state.meta.vmas {
        if let VmaKind::Shmem { ino, .. } = v.kind {
            if !v.shared && !src.tracker()?.saved(v.start, v.end, false)?.is_empty() {
                // Released when `f` is dropped.
                return Err(Error::Target {
                    pid,
                    msg: crate::shmem::private_copies_reason(&format!("(inode {ino})")),
                });
            }
        }
    }
    let plan = src.plan(&state.meta.vmas, &state.tracked, true)?;
    // Every page written is known now: the tracking ends here.
    src.tracker = None;
    let planned = t1.elapsed();
    let shmem_bytes = state.shmem_bytes();
    let mut meta = state.meta;
    meta.memory_estimate = plan.bound(&src.sent) + shmem_bytes;
    w.final_part(&meta, &plan.drops)?;
    src.layout = Some(meta.vmas.clone());
    let t2 = Instant::now();
    let base = done;
    let mut p = |n: u64| progress(base + n, resident);
    let bytes = src.execute(&plan, &mut w, true, &mut p)?;
    let shm = crate::shmem::write_contents(&state.objs, &state.shmem_runs, &mut w)?;
    let out = w.finish()?;
    stats.last = RoundStat {
        bytes: bytes + shm,
        dropped: bytes_of(&plan.drops),
        ms: t2.elapsed().as_secs_f64() * 1e3,
    };
    stats.memory_bytes += bytes + shm;
    stats.frozen = t1.elapsed();
    tracing::debug!(
        "final round of {pid}: settled {settled:?}, state {captured:?}, scanned {planned:?}, {} bytes written by {:?}",
        bytes + shm,
        stats.frozen
    );
    Ok((out, stats, f))
}

/// Checkpoints running process `pid` into `out` and lets it go on: its memory is saved
/// while it runs (pre-copy rounds, see the module documentation), and it is frozen only
/// to start tracking its writes and, at the end, to save its state and the pages it wrote
/// last. `on_round` hears of each round. On failure the process goes on as it was.
pub fn checkpoint_live<W: Write + 'static>(
    pid: i32,
    out: W,
    opts: &LiveOptions,
    on_round: &mut dyn FnMut(&RoundStat),
    progress: Progress<'_>,
) -> Result<(W, LiveStats)> {
    dump::check(pid)?;
    let (w, stats, mut f) = precopy(
        pid,
        out,
        opts,
        Moving::default(),
        None,
        &mut || Ok(Vec::new()),
        on_round,
        progress,
    )?;
    f.release()?;
    Ok((w, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_arithmetic() {
        let a = vec![(0, 10), (20, 30)];
        let b = vec![(5, 25)];
        assert_eq!(intersect(&a, &b), vec![(5, 10), (20, 25)]);
        assert_eq!(subtract(&a, &b), vec![(0, 5), (25, 30)]);
        assert_eq!(subtract(&b, &a), vec![(10, 20)]);
        assert_eq!(subtract(&a, &[]), a);
        assert_eq!(intersect(&a, &[]), vec![]);
        assert_eq!(
            normalize(vec![(3, 4), (0, 2), (2, 3), (9, 9)]),
            vec![(0, 4)]
        );
        assert!(contains(&a, 0) && contains(&a, 29) && !contains(&a, 10) && !contains(&a, 30));
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (30, 40), (90, 200)]),
            vec![(0, 10), (20, 30), (40, 90)]
        );
    }
}
