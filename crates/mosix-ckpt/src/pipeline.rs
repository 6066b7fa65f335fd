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
    /// All of it was read: the image may be finished (without this, the reader failed
    /// and no end is written).
    End,
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
    let runs = dump::page_runs(pid, &meta.vmas)?;
    let estimate: u64 =
        runs.iter().map(|r| r.1 * PAGE).sum::<u64>() + shmem_runs.iter().map(|r| r.2).sum::<u64>();
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
            for msg in rx {
                match msg {
                    Msg::Pages(base, buf, parts) => {
                        for (off, len) in parts {
                            w.pages(base + off as u64, &buf[off..off + len])?;
                        }
                        // The reader may have ended meanwhile.
                        let _ = back_tx.send(buf);
                    }
                    Msg::End => ended = true,
                }
            }
            if !ended {
                return Err(Error::Io(std::io::Error::other(
                    "reading the memory failed",
                )));
            }
            let shm = crate::shmem::write_contents(&objs, &shmem_runs, &mut w)?;
            Ok((w.finish()?, shm))
        })
        .map_err(|e| crate::error::sys_err("starting the image writer", e))?;
    let mut stats = DumpStats::default();
    let mut made = 0usize;
    let mut done = 0u64;
    let read = (|| -> Result<()> {
        for &(start, n, anon) in &runs {
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
