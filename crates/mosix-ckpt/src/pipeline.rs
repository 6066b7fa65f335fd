//! A checkpoint whose memory is read and written at the same time: one thread reads the
//! frozen process's memory (process_vm_readv, straight into buffers that are then handed
//! over, never copied again) and leaves out its zero pages, another checksums the image
//! and writes it (large writes, straight from those buffers). For files and pipes, where
//! writing costs about what reading does.

use std::io::Write;
use std::sync::mpsc::{channel, sync_channel};

use crate::dump::{self, is_zero, DumpOptions, DumpStats, Frozen, Moving, Progress};
use crate::error::{Error, Result};
use crate::image::{ImageWriter, PAGES_RECORD_MAX};
use crate::sys::{self, PAGE};

/// Buffers in flight between the two threads.
const BUFFERS: usize = 4;

/// What the reading thread hands the writing one.
enum Msg {
    /// Memory read at `base` into the buffer, and the (offset, length) parts of it to
    /// write (its zero pages left out).
    Pages(u64, Vec<u8>, Vec<(usize, usize)>),
    /// Private anonymous memory follows, at most in these ranges: the shared memory goes
    /// in before it, then the lazy mark ([`crate::records::TAG_LAZY`]).
    Lazy(Vec<(u64, u64)>),
    /// After the lazy mark: these pages are zero.
    Zeros(Vec<(u64, u64)>),
    /// All of it was read: the image may be finished (without this, the reader failed
    /// and no end is written).
    End,
}

/// The ranges of `runs` (address, pages), joined where they touch: (address, length).
fn coming(runs: &[(u64, u64, bool)]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<(u64, u64)> = runs.iter().map(|r| (r.0, r.1 * PAGE)).collect();
    sorted.sort();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (a, len) in sorted {
        match out.last_mut() {
            Some((s, l)) if *s + *l == a => *l += len,
            _ => out.push((a, len)),
        }
    }
    out
}

/// The order memory is written in, for a reader that lets the process run before all of
/// it arrived (format 3.4, [`crate::postcopy`]): everything that must be in place first
/// (pages of private file mappings), then its private anonymous memory: first what it
/// touches at once (each thread's stack in use, from a little below its stack pointer to
/// the top of its area, and what lies around its TLS, rseq area, robust list and TID
/// address: a run of up to 1 MiB that meets one of these goes whole), then the rest,
/// smaller areas first (the state libraries keep in their small .bss areas is touched
/// often; a large heap or buffer less densely), by address within an area. Returns the
/// runs so ordered and the index of the first anonymous one.
pub(crate) fn lazy_order(
    mut runs: Vec<(u64, u64, bool)>,
    meta: &crate::image::ProcessImage,
) -> (Vec<(u64, u64, bool)>, usize) {
    // rsp and fs_base in `struct user_regs_struct`.
    const RSP: usize = 19 * 8;
    const FS_BASE: usize = 21 * 8;
    const AROUND: u64 = 64 << 10;
    let word = |regs: &[u8], at: usize| {
        regs.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let area_of = |a: u64| meta.vmas.iter().find(|v| v.start <= a && a < v.end);
    let mut hot: Vec<(u64, u64)> = Vec::new();
    let mut of = |regs: &[u8], rseq: &Option<crate::image::Rseq>, robust: u64, tid_at: u64| {
        if let Some(sp) = word(regs, RSP).filter(|&a| a != 0) {
            let top = area_of(sp).map_or(sp.saturating_add(AROUND), |v| v.end);
            hot.push((sp.saturating_sub(AROUND), top));
        }
        let r = [word(regs, FS_BASE), rseq.as_ref().map(|r| r.addr)];
        for a in r.into_iter().flatten().chain([robust, tid_at]) {
            if a != 0 {
                hot.push((a.saturating_sub(AROUND), a.saturating_add(AROUND)));
            }
        }
    };
    of(
        &meta.regs,
        &meta.rseq,
        meta.robust_list.0,
        meta.clear_child_tid,
    );
    for t in &meta.threads {
        of(&t.regs, &t.rseq, t.robust_list.0, t.clear_child_tid);
    }
    tracing::debug!("sent first: {hot:x?}");
    let is_hot = |start: u64, pages: u64| {
        let end = start + pages * PAGE;
        hot.iter().any(|&(s, e)| start < e && s < end)
    };
    let area_len = |a: u64| area_of(a).map_or(0, |v| v.end - v.start);
    runs.sort_by_cached_key(|&(start, n, anon)| (anon, !is_hot(start, n), area_len(start), start));
    let first = runs.iter().position(|r| r.2).unwrap_or(runs.len());
    (runs, first)
}

/// Checkpoints `pid` into `out` as [`crate::checkpoint`] does, reading its memory while
/// the image is written (in another thread): for a file or a pipe. On any failure the
/// process is left running as it was.
pub fn checkpoint_to<W: Write + Send + 'static>(
    pid: i32,
    out: W,
    opts: DumpOptions,
    progress: Progress<'_>,
) -> Result<(W, DumpStats)> {
    dump::frozen_checkpoint(pid, opts, |frozen| {
        dump_parallel(frozen, out, opts, progress)
    })
}

fn dump_parallel<W: Write + Send + 'static>(
    f: &mut Frozen,
    out: W,
    opts: DumpOptions,
    progress: Progress<'_>,
) -> Result<(W, DumpStats)> {
    let pid = f.pid;
    let dump::State {
        mut meta,
        objs,
        shmem_runs,
        ..
    } = dump::capture(f, Moving::default())?;
    let (runs, first_lazy) = lazy_order(dump::page_runs(pid, &meta.vmas)?, &meta);
    // The lazy mark's ranges (none without anonymous memory), which count as a drop
    // record's do.
    let mut mark = (first_lazy < runs.len()).then(|| coming(&runs[first_lazy..]));
    let estimate: u64 = runs.iter().map(|r| r.1 * PAGE).sum::<u64>()
        + shmem_runs.iter().map(|r| r.2).sum::<u64>()
        + mark.as_ref().map_or(0, |c| 16 * c.len() as u64);
    meta.memory_estimate = estimate;
    let (tx, rx) = sync_channel::<Msg>(BUFFERS - 1);
    let (back_tx, back_rx) = channel::<Vec<u8>>();
    let compression = opts.compression;
    let cpus = crate::cpu::original();
    let writer = std::thread::Builder::new()
        .name("ckpt-writer".into())
        .spawn(move || -> Result<(W, u64)> {
            crate::cpu::free(cpus);
            let mut w = ImageWriter::new(out, compression, &meta)?;
            let mut ended = false;
            let mut shm = None;
            for msg in rx {
                match msg {
                    Msg::Pages(base, buf, parts) => {
                        for (off, len) in parts {
                            w.pages(base + off as u64, &buf[off..off + len])?;
                        }
                        // The reader may have ended meanwhile.
                        let _ = back_tx.send(buf);
                    }
                    Msg::Lazy(coming) => {
                        shm = Some(crate::shmem::write_contents(&objs, &shmem_runs, &mut w)?);
                        w.lazy_from_here(&coming)?;
                    }
                    Msg::Zeros(z) => w.zeros(&z)?,
                    Msg::End => ended = true,
                }
            }
            if !ended {
                return Err(Error::Io(std::io::Error::other(
                    "reading the memory failed",
                )));
            }
            let shm = match shm {
                Some(n) => n,
                None => crate::shmem::write_contents(&objs, &shmem_runs, &mut w)?,
            };
            Ok((w.finish()?, shm))
        })
        .map_err(|e| crate::error::sys_err("starting the image writer", e))?;
    let mut stats = DumpStats::default();
    let mut made = 0usize;
    let mut done = 0u64;
    let read = (|| -> Result<()> {
        for (i, &(start, n, anon)) in runs.iter().enumerate() {
            if i == first_lazy {
                if let Some(c) = mark.take() {
                    if tx.send(Msg::Lazy(c)).is_err() {
                        return Ok(());
                    }
                }
            }
            let len = (n * PAGE) as usize;
            let mut buf = match back_rx.try_recv() {
                Ok(b) => b,
                Err(_) if made < BUFFERS => {
                    made += 1;
                    vec![0u8; PAGES_RECORD_MAX]
                }
                // Wait for the writer to give one back (it ended: its error is the one).
                Err(_) => match back_rx.recv() {
                    Ok(b) => b,
                    Err(_) => return Ok(()),
                },
            };
            sys::read_mem_many(pid, &[(start, len)], &mut buf[..len])?;
            let mut parts = Vec::new();
            if anon {
                // Leave out all-zero pages: they come back as fresh anonymous memory.
                let pg = |k: usize| &buf[k * PAGE as usize..(k + 1) * PAGE as usize];
                let pages = n as usize;
                let mut i = 0usize;
                while i < pages {
                    if is_zero(pg(i)) {
                        stats.zero_pages += 1;
                        i += 1;
                        continue;
                    }
                    let s = i;
                    while i < pages && !is_zero(pg(i)) {
                        i += 1;
                    }
                    parts.push((s * PAGE as usize, (i - s) * PAGE as usize));
                }
                // After the lazy mark, a reader that runs the process meanwhile must know
                // which of them will not come.
                let mut zeros = Vec::new();
                let mut at = 0usize;
                for &(off, n) in parts.iter().chain([(len, 0)].iter()) {
                    if off > at {
                        zeros.push((start + at as u64, (off - at) as u64));
                    }
                    at = off + n;
                }
                if !zeros.is_empty() && tx.send(Msg::Zeros(zeros)).is_err() {
                    return Ok(());
                }
            } else {
                parts.push((0, len));
            }
            stats.memory_bytes += parts.iter().map(|p| p.1 as u64).sum::<u64>();
            if tx.send(Msg::Pages(start, buf, parts)).is_err() {
                return Ok(());
            }
            done += len as u64;
            progress(done, estimate);
        }
        let _ = tx.send(Msg::End);
        Ok(())
    })();
    drop(tx);
    let written = writer
        .join()
        .map_err(|_| Error::Io(std::io::Error::other("the image writer failed")))?;
    // The reader's error first: the writer's is then only that it was not finished.
    read?;
    let (out, shm) = written?;
    stats.memory_bytes += shm;
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tests::anon as vma;
    use crate::image::ProcessImage;

    #[test]
    fn file_pages_first_then_the_stack_and_tls_then_small_areas_then_large_ones() {
        let mut regs = vec![0u8; 27 * 8];
        regs[19 * 8..20 * 8].copy_from_slice(&0x7000_1800u64.to_le_bytes());
        // Its TLS at the top of a large area (glibc's, which a large mapping joined).
        regs[21 * 8..22 * 8].copy_from_slice(&0x1fff_f100u64.to_le_bytes());
        let meta = ProcessImage {
            vmas: vec![
                vma(0x1000_0000, 0x2000_0000),
                vma(0x4000_0000, 0x4000_2000),
                vma(0x7000_0000, 0x7000_4000),
            ],
            regs,
            ..Default::default()
        };
        let runs = vec![
            (0x1000_0000, 2, true),
            (0x1800_0000, 1, true),
            (0x1fff_e000, 2, true),
            (0x3000_0000, 1, false),
            (0x4000_0000, 1, true),
            (0x7000_0000, 1, true),
            (0x7000_3000, 1, true),
        ];
        let (order, first) = lazy_order(runs, &meta);
        assert_eq!(
            order,
            vec![
                (0x3000_0000, 1, false),
                (0x7000_0000, 1, true),
                (0x7000_3000, 1, true),
                (0x1fff_e000, 2, true),
                (0x4000_0000, 1, true),
                (0x1000_0000, 2, true),
                (0x1800_0000, 1, true),
            ]
        );
        assert_eq!(first, 1);
        assert_eq!(
            coming(&order[first..]),
            vec![
                (0x1000_0000, 0x2000),
                (0x1800_0000, 0x1000),
                (0x1fff_e000, 0x2000),
                (0x4000_0000, 0x1000),
                (0x7000_0000, 0x1000),
                (0x7000_3000, 0x1000)
            ]
        );
        let (none, first) = lazy_order(vec![(0x3000_0000, 1, false)], &meta);
        assert_eq!((none.len(), first), (1, 1), "no anonymous memory: no mark");
    }
}
