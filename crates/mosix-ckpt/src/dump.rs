//! Checkpoint: freeze a process with ptrace, capture its state, stream the image out,
//! then kill it or let it go on exactly as it was.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::check as checks;
use crate::error::{sys_err, Error, Result};
use crate::image::{
    Clocks, Compression, Creds, Fd, FdKind, ImageWriter, MmFields, PendingSignal, ProcessImage,
    Rseq, SigAction, Vma, VmaKind, PAGES_RECORD_MAX,
};
use crate::procfs::{self, MapLine, PM_FILE, PM_PRESENT, PM_SWAPPED};
use crate::remote::{find_syscall_insn, Remote};
use crate::shmem;
use crate::sys::{self, PAGE};
use crate::threads::{self, Task};

#[derive(Clone, Copy, Debug)]
pub struct DumpOptions {
    /// Let the process go on after the checkpoint instead of killing it.
    pub leave_running: bool,
    pub compression: Compression,
}

/// Figures of one checkpoint.
#[derive(Clone, Debug, Default)]
pub struct DumpStats {
    /// Bytes of memory contents saved.
    pub memory_bytes: u64,
    /// Pages that were present but all zero, so not saved.
    pub zero_pages: u64,
    /// How long the process was stopped.
    pub frozen: Duration,
}

/// Progress callback: (bytes of memory written so far, expected total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

const SCRATCH: usize = 512;

/// Says whether `pid` can be checkpointed; Ok(()) or Err(Refused) with every reason.
pub fn check(pid: i32) -> Result<()> {
    let reasons = checks::refusals(pid)?;
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(Error::Refused { pid, reasons })
    }
}

/// Checkpoints `pid` into `out`. On any failure the process is left running as it was.
pub fn checkpoint<W: Write + 'static>(
    pid: i32,
    out: W,
    opts: DumpOptions,
    progress: Progress<'_>,
) -> Result<(W, DumpStats)> {
    frozen_checkpoint(pid, opts, |frozen| dump_frozen(frozen, out, opts, progress))
}

/// Checks, freezes `pid`, saves it with `save` and then lets it go on or ends it (as
/// `opts` says), with the time it was frozen; on any failure of `save` it is left
/// running as it was.
pub(crate) fn frozen_checkpoint<W>(
    pid: i32,
    opts: DumpOptions,
    save: impl FnOnce(&mut Frozen) -> Result<(W, DumpStats)>,
) -> Result<(W, DumpStats)> {
    check(pid)?;
    let t0 = Instant::now();
    let mut frozen = freeze(pid)?;
    match save(&mut frozen) {
        Ok((w, mut stats)) => {
            if opts.leave_running {
                frozen.release()?;
            } else {
                frozen.kill()?;
            }
            stats.frozen = t0.elapsed();
            Ok((w, stats))
        }
        Err(e) => {
            // Never lose the process: put it back as it was, whatever went wrong.
            if let Err(e2) = frozen.release() {
                tracing::error!("could not release process {pid} after a failed checkpoint: {e2}");
            }
            Err(e)
        }
    }
}

/// A checkpointed process still held in its ptrace stop, for a caller that decides only
/// later whether it goes on (migration: the destination refused or failed) or ends (the
/// destination has it). Dropping it lets the process go on, exactly as it was.
pub struct Held {
    pub(crate) frozen: Frozen,
}

impl Held {
    /// Holds `frozen` for as long as its holder decides (a move's commit may be seconds
    /// away): its threads and the tracer get their CPUs back meanwhile (see crate::cpu),
    /// so that a holder that dies leaves it on the CPUs it had.
    pub(crate) fn of(mut frozen: Frozen) -> Held {
        frozen.free_cpus();
        Held { frozen }
    }
    /// The held process's PID.
    pub fn pid(&self) -> i32 {
        self.frozen.pid
    }
    /// Lets the process go on as it was (signals that arrived meanwhile are delivered).
    pub fn release(mut self) -> Result<()> {
        self.frozen.release()
    }
    /// Ends the process (SIGKILL) and reaps its ptrace stops.
    pub fn kill(mut self) -> Result<()> {
        self.frozen.kill()
    }
}

/// Freezes every thread of `pid` (ptrace) and saves nothing: it stays stopped, using no
/// CPU, until [`Held::release`] (or the holder ends). Its parent's wait sees nothing
/// (a ptrace stop is not a job-control stop). Must be called, and the `Held` used, from
/// one thread (the ptrace tracer).
pub fn freeze_held(pid: i32) -> Result<Held> {
    Ok(Held::of(freeze(pid)?))
}

/// Checkpoints `pid` into `out` and keeps it frozen: the caller decides with
/// [`Held::kill`] or [`Held::release`]. On failure the process goes on as it was.
/// Must be called, and the `Held` used, from one thread (the ptrace tracer).
pub fn checkpoint_held<W: Write + 'static>(
    pid: i32,
    out: W,
    compression: Compression,
    progress: Progress<'_>,
) -> Result<(W, DumpStats, Held)> {
    check(pid)?;
    let t0 = Instant::now();
    let mut frozen = freeze(pid)?;
    let opts = DumpOptions {
        leave_running: true,
        compression,
    };
    let (w, mut stats) = dump_frozen(&mut frozen, out, opts, progress)?;
    stats.frozen = t0.elapsed();
    Ok((w, stats, Held::of(frozen)))
}

/// A process held in a ptrace stop, every thread of it.
pub(crate) struct Frozen {
    pub(crate) pid: i32,
    /// Its PID in its own PID namespace (for system calls it makes about itself).
    pub(crate) own: i32,
    /// Its threads, the main one first.
    pub(crate) tasks: Vec<Task>,
    /// A `syscall` instruction inside the process, once found.
    pub(crate) syscall_ip: Option<u64>,
    /// Stack scratch area (address, original bytes) while in use.
    scratch: Option<(u64, Vec<u8>)>,
    pub(crate) done: bool,
    /// Its memory that stays at home (a move's checkpoint; see crate::homemem).
    pub(crate) home_memory: Vec<crate::homemem::Area>,
    /// Its threads and we on one CPU while it is frozen (see crate::cpu).
    one_cpu: Option<crate::cpu::OneCpu>,
}

pub(crate) fn freeze(pid: i32) -> Result<Frozen> {
    let tasks = threads::freeze_all(pid)?;
    let mut one_cpu = crate::cpu::OneCpu::here();
    if let Some(one) = &mut one_cpu {
        for t in &tasks {
            one.add(t.tid);
        }
    }
    Ok(Frozen {
        pid,
        own: tasks[0].own,
        tasks,
        syscall_ip: None,
        scratch: None,
        home_memory: Vec::new(),
        done: false,
        one_cpu,
    })
}

impl Frozen {
    pub(crate) fn main(&self) -> &Task {
        &self.tasks[0]
    }

    /// Injects system calls into thread `i`.
    pub(crate) fn remote_of(&self, i: usize) -> Result<Remote> {
        let ip = self.syscall_ip.ok_or_else(|| Error::Target {
            pid: self.pid,
            msg: "no syscall instruction found".into(),
        })?;
        let t = &self.tasks[i];
        Ok(Remote::new(t.tid, ip, t.regs))
    }

    /// Puts everything back and lets the process go on.
    pub(crate) fn release(&mut self) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let any_held = self.tasks.iter().any(|t| !t.held.is_empty());
        if let (true, Some(_), Some((addr, _))) = (any_held, self.syscall_ip, &self.scratch) {
            let addr = *addr;
            for i in 0..self.tasks.len() {
                let mut r = self.remote_of(i)?;
                let own = self.own;
                threads::requeue_held(&mut self.tasks[i], own, &mut r, addr)?;
            }
        }
        if let Some((addr, orig)) = self.scratch.take() {
            sys::write_mem(self.pid, addr, &orig)?;
        }
        // Its CPUs back before it runs.
        self.free_cpus();
        threads::detach_tasks(&self.tasks)?;
        self.done = true;
        Ok(())
    }

    /// Gives its threads (and us) their CPUs back, before it runs again.
    pub(crate) fn free_cpus(&mut self) {
        self.one_cpu = None;
    }

    pub(crate) fn kill(&mut self) -> Result<()> {
        threads::kill_all(&self.tasks)?;
        self.free_cpus();
        self.done = true;
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.release();
        }
    }
}

/// The last of a /proc status list of IDs (the one of the innermost PID namespace).
pub(crate) fn last_id(v: Option<&String>) -> i32 {
    v.and_then(|x| x.split_whitespace().last()?.parse().ok())
        .unwrap_or(0)
}

fn le_u64(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

/// Queries the kernel state that only the process itself can read, by injected calls.
struct Injected {
    sigactions: Vec<SigAction>,
    sigaltstack: (u64, i32, u64),
    itimers: Vec<[i64; 4]>,
    brk: u64,
    clear_child_tid: u64,
    /// (sigaltstack, clear_child_tid) of each thread, main first.
    own: Vec<((u64, i32, u64), u64)>,
}

/// Finds a `syscall` instruction in frozen process `f` (its [vdso] always has one; any
/// executable mapping will do) for the calls injected into it.
pub(crate) fn find_syscall(f: &mut Frozen, maps: &[MapLine]) -> Result<()> {
    let pid = f.pid;
    let mut ip = None;
    let mut order: Vec<&MapLine> = maps.iter().filter(|m| m.name == "[vdso]").collect();
    order.extend(
        maps.iter()
            .filter(|m| m.exec && m.read && m.name != "[vdso]"),
    );
    for m in order {
        let len = m.len().min(1 << 20) as usize;
        let mut code = vec![0u8; len];
        if sys::read_mem(pid, m.start, &mut code).unwrap_or(false) {
            if let Some(a) = find_syscall_insn(&code, m.start) {
                ip = Some(a);
                break;
            }
        }
    }
    f.syscall_ip = Some(ip.ok_or_else(|| Error::Target {
        pid,
        msg: "no syscall instruction found in its code".into(),
    })?);
    Ok(())
}

fn inject_queries(f: &mut Frozen, maps: &[MapLine]) -> Result<Injected> {
    let pid = f.pid;
    find_syscall(f, maps)?;
    // Scratch memory: below the stack's red zone if the stack is there, else the start of
    // a writable mapping. Its bytes are saved and put back.
    let below = (f.main().regs.rsp.wrapping_sub(128 + SCRATCH as u64)) & !15;
    let writable = |a: u64| {
        maps.iter()
            .any(|m| m.write && !m.shared && m.start <= a && a + SCRATCH as u64 <= m.end)
    };
    let addr = if writable(below) {
        below
    } else {
        maps.iter()
            .find(|m| m.write && !m.shared && m.len() >= SCRATCH as u64)
            .map(|m| m.start)
            .ok_or_else(|| Error::Target {
                pid,
                msg: "no writable memory to work in".into(),
            })?
    };
    let mut orig = vec![0u8; SCRATCH];
    if !sys::read_mem(pid, addr, &mut orig)? {
        return Err(Error::Target {
            pid,
            msg: "its scratch memory is unreadable".into(),
        });
    }
    f.scratch = Some((addr, orig));
    let mut r = f.remote_of(0)?;
    let (sigactions, itimers, brk, own) = match batch_queries(f, &mut r)? {
        Some(q) => q,
        None => one_by_one(f, &mut r, addr)?,
    };
    let (sigaltstack, clear_child_tid) = own[0];
    // Put the scratch bytes and the registers back now: memory is read after this.
    let (a, o) = f.scratch.clone().expect("set above");
    sys::write_mem(pid, a, &o)?;
    sys::set_regs(pid, &f.main().regs)?;
    Ok(Injected {
        sigactions,
        sigaltstack,
        itimers,
        brk,
        clear_child_tid,
        own,
    })
}

/// Address ranges (start, end).
pub(crate) type Ranges = Vec<(u64, u64)>;

type Queries = (
    Vec<SigAction>,
    Vec<[i64; 4]>,
    u64,
    Vec<((u64, i32, u64), u64)>,
);

fn sigaction_of(signo: i32, buf: &[u8]) -> Option<SigAction> {
    let (handler, flags, restorer, mask) = (
        le_u64(buf, 0),
        le_u64(buf, 1),
        le_u64(buf, 2),
        le_u64(buf, 3),
    );
    (handler != 0 || flags != 0 || mask != 0).then_some(SigAction {
        signo,
        handler,
        flags,
        restorer,
        mask,
    })
}

/// The queries, one injected call at a time (main thread `r`, scratch memory `addr`).
fn one_by_one(f: &mut Frozen, r: &mut Remote, addr: u64) -> Result<Queries> {
    let pid = f.pid;
    let mut buf = [0u8; 32];
    let mut sigactions = Vec::new();
    for signo in 1..=64i32 {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        r.call(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[signo as u64, 0, addr, 8],
        )?;
        sys::read_mem(pid, addr, &mut buf)?;
        sigactions.extend(sigaction_of(signo, &buf));
    }
    let mut itimers = Vec::new();
    for which in 0..3u64 {
        r.call("getitimer", libc::SYS_getitimer, &[which, addr])?;
        sys::read_mem(pid, addr, &mut buf)?;
        itimers.push([0, 1, 2, 3].map(|i| le_u64(&buf, i) as i64));
    }
    let brk = r.call("brk", libc::SYS_brk, &[0])?;
    // Each thread's own: the main thread's, then the others' (each one's registers put
    // back after).
    let mut own = vec![threads::own_queries(r, addr)?];
    f.tasks[0].held.append(&mut r.held);
    for i in 1..f.tasks.len() {
        let mut rt = f.remote_of(i)?;
        own.push(threads::own_queries(&mut rt, addr)?);
        f.tasks[i].held.append(&mut rt.held);
        sys::set_regs(f.tasks[i].tid, &f.tasks[i].regs)?;
    }
    Ok((sigactions, itimers, brk, own))
}

/// The queries in one run of calls per thread ([`Remote::batch`]), in two pages of its
/// own mapped for this (executable) and unmapped after; None if it cannot map them.
fn batch_queries(f: &mut Frozen, r: &mut Remote) -> Result<Option<Queries>> {
    use crate::remote::{BATCH_CODE, BATCH_ENTRY};
    let pid = f.pid;
    // A batch ends on a breakpoint: its SIGTRAP would reset the action of a SIGTRAP that
    // a thread blocks or the process ignores (and unblock it). Not then.
    let trap = 1u64 << (libc::SIGTRAP - 1);
    let ignored = procfs::status(pid)
        .ok()
        .is_some_and(|st| procfs::hex(st.get("SigIgn")) & trap != 0);
    if ignored {
        return Ok(None);
    }
    for t in &f.tasks {
        if sys::get_sigmask(t.tid)? & trap != 0 {
            return Ok(None);
        }
    }
    let len = 2 * PAGE;
    let area = r.raw(
        libc::SYS_mmap,
        &[
            0,
            len,
            (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    if (-4095..0).contains(&area) {
        return Ok(None);
    }
    let area = area as u64;
    let res = (|| -> Result<Queries> {
        sys::write_mem(pid, area, &BATCH_CODE)?;
        let table = area + 64;
        let data = table + 72 * BATCH_ENTRY;
        // Data: 64 sigactions, 3 itimers, an altstack, a tid address: 32 bytes each.
        let at = |i: u64| data + 32 * i;
        let mut calls: Vec<(i64, [u64; 6])> = (1..=64u64)
            .map(|s| (libc::SYS_rt_sigaction, [s, 0, at(s - 1), 8, 0, 0]))
            .collect();
        for w in 0..3u64 {
            calls.push((libc::SYS_getitimer, [w, at(64 + w), 0, 0, 0, 0]));
        }
        calls.push((libc::SYS_brk, [0; 6]));
        let own_calls = [
            (libc::SYS_sigaltstack, [0, at(67), 0, 0, 0, 0]),
            (libc::SYS_prctl, [40, at(68), 0, 0, 0, 0]),
        ];
        calls.extend(own_calls);
        let read_own = |rr: &mut Remote, got: &[i64]| -> Result<((u64, i32, u64), u64)> {
            for (i, &g) in got.iter().enumerate() {
                if (-4095..0).contains(&g) {
                    return Err(Error::Remote {
                        pid,
                        what: ["sigaltstack", "prctl(PR_GET_TID_ADDRESS)"][i].into(),
                        errno: (-g) as i32,
                    });
                }
            }
            let mut b = [0u8; 64];
            sys::read_mem(rr.pid, at(67), &mut b)?;
            let altstack = (
                le_u64(&b, 0),
                i32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
                le_u64(&b, 2),
            );
            Ok((altstack, le_u64(&b, 4)))
        };
        let got = r.batch(area, table, &calls)?;
        if let Some((i, &g)) = got[..67].iter().enumerate().find(|(_, &g)| g < 0) {
            return Err(Error::Remote {
                pid,
                what: if i < 64 { "rt_sigaction" } else { "getitimer" }.into(),
                errno: (-g) as i32,
            });
        }
        let mut buf = vec![0u8; 69 * 32];
        sys::read_mem(pid, data, &mut buf)?;
        let mut sigactions = Vec::new();
        for signo in 1..=64i32 {
            if signo == libc::SIGKILL || signo == libc::SIGSTOP {
                continue;
            }
            let b = &buf[(signo as usize - 1) * 32..signo as usize * 32];
            sigactions.extend(sigaction_of(signo, b));
        }
        let itimers = (0..3)
            .map(|w| {
                let b = &buf[(64 + w) * 32..(65 + w) * 32];
                [0, 1, 2, 3].map(|i| le_u64(b, i) as i64)
            })
            .collect();
        let brk = got[67] as u64;
        let mut own = vec![read_own(r, &got[68..70])?];
        f.tasks[0].held.append(&mut r.held);
        for i in 1..f.tasks.len() {
            let mut rt = f.remote_of(i)?;
            let g = rt.batch(area, table, &own_calls);
            f.tasks[i].held.append(&mut rt.held);
            let put = sys::set_regs(f.tasks[i].tid, &f.tasks[i].regs);
            own.push(read_own(&mut rt, &g?)?);
            put?;
        }
        Ok((sigactions, itimers, brk, own))
    })();
    // Its memory as it was, whatever happened.
    let unmapped = r.call("munmap", libc::SYS_munmap, &[area, len]);
    let q = res?;
    unmapped?;
    Ok(Some(q))
}

/// madvise advice by area start ([`crate::image::ProcessImage::advice`]).
pub(crate) type Advice = Vec<(u64, u32)>;

pub(crate) fn vmas_of(pid: i32, maps: &[MapLine]) -> Result<Vec<Vma>> {
    Ok(vmas_tracked(pid, maps, &[])?.0)
}

/// [`vmas_of`], the areas registered with a userfaultfd for write protection (VmFlags
/// "uw": tracked by a [`crate::dirty::Tracker`]), and the madvise advice of the private
/// areas (those a restore maps afresh) that differs from a fresh mapping's, by area start
/// ([`crate::image::ProcessImage::advice`]). Areas of `home` (memory shared at home, which
/// stays there) are [`VmaKind::HomeShared`].
pub(crate) fn vmas_tracked(
    pid: i32,
    maps: &[MapLine],
    home: &[crate::homemem::Area],
) -> Result<(Vec<Vma>, Ranges, Advice)> {
    let flags = procfs::vm_flags(pid)?;
    let tracked = maps
        .iter()
        .filter(|m| {
            flags
                .get(&m.start)
                .is_some_and(|f| f.iter().any(|x| x == "uw"))
        })
        .map(|m| (m.start, m.end))
        .collect();
    let mut out = Vec::new();
    for m in maps {
        if m.name == "[vsyscall]" {
            continue;
        }
        if let Some(a) = home.iter().find(|a| (a.start, a.end) == (m.start, m.end)) {
            out.push(Vma {
                start: m.start,
                end: m.end,
                prot: m.prot(),
                shared: true,
                growsdown: false,
                kind: VmaKind::HomeShared {
                    dev: a.dev,
                    ino: a.ino,
                    offset: a.offset,
                },
                anon_name: None,
            });
            continue;
        }
        let kind = if m.is_special() {
            VmaKind::Special(m.name.clone())
        } else if shmem::is_shmem(&m.name) {
            VmaKind::Shmem {
                ino: m.inode,
                offset: m.offset,
            }
        } else if m.is_file() {
            let mf = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            let id =
                procfs::file_id_of(&mf).map_err(|e| sys_err(format!("examining {}", m.name), e))?;
            VmaKind::File {
                path: m.name.clone(),
                offset: m.offset,
                id,
            }
        } else {
            VmaKind::Anon
        };
        let anon_name = m
            .name
            .strip_prefix("[anon:")
            .and_then(|n| n.strip_suffix(']'))
            .map(str::to_string);
        out.push(Vma {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            shared: m.shared,
            growsdown: flags
                .get(&m.start)
                .is_some_and(|f| f.iter().any(|x| x == "gd")),
            kind,
            anon_name,
        });
    }
    let advice = out
        .iter()
        .filter(|v| crate::records::staged(v))
        .filter_map(|v| {
            let bits = crate::image::advice_of(flags.get(&v.start)?);
            (bits != 0).then_some((v.start, bits))
        })
        .collect();
    Ok((out, tracked, advice))
}

/// Runs of pages to save: (start address, page count, anonymous?).
pub(crate) fn page_runs(pid: i32, vmas: &[Vma]) -> Result<Vec<(u64, u64, bool)>> {
    let pm = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| sys_err("opening the page map", e))?;
    let mut runs = Vec::new();
    for v in vmas {
        if v.shared || matches!(v.kind, VmaKind::Special(_)) {
            continue;
        }
        let anon = matches!(v.kind, VmaKind::Anon);
        let entries = procfs::pagemap(&pm, v.start, v.end)?;
        let mut run: Option<(u64, u64)> = None;
        for (i, e) in entries.iter().enumerate() {
            let keep = if anon {
                e & (PM_PRESENT | PM_SWAPPED) != 0
            } else {
                (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0
            };
            let addr = v.start + i as u64 * PAGE;
            match (&mut run, keep) {
                (Some((_, n)), true) if *n * PAGE < PAGES_RECORD_MAX as u64 => *n += 1,
                (r, true) => {
                    if let Some((s, n)) = r.take() {
                        runs.push((s, n, anon));
                    }
                    *r = Some((addr, 1));
                }
                (r, false) => {
                    if let Some((s, n)) = r.take() {
                        runs.push((s, n, anon));
                    }
                }
            }
        }
        if let Some((s, n)) = run {
            runs.push((s, n, anon));
        }
    }
    Ok(runs)
}

pub(crate) fn is_zero(p: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: reinterpreting initialised bytes as u128 is sound; align_to keeps only
        // the properly aligned middle.
        unsafe { p.align_to::<u128>() }
    };
    pre.iter().all(|&b| b == 0) && post.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0)
}

/// How a checkpoint for a move differs from a plain one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Moving {
    pub rules: checks::Rules,
    /// The no_new_privs the process really has (away, it runs with it set for our filter).
    pub no_new_privs: Option<bool>,
}

fn dump_frozen<W: Write + 'static>(
    f: &mut Frozen,
    out: W,
    opts: DumpOptions,
    progress: Progress<'_>,
) -> Result<(W, DumpStats)> {
    dump_frozen_for(f, out, opts, Moving::default(), progress)
}

/// The state of a frozen process, all of it but the contents of its memory.
pub(crate) struct State {
    /// `memory_estimate` is 0: the caller knows what memory it writes.
    pub meta: ProcessImage,
    /// Its areas tracked by a userfaultfd (see [`vmas_tracked`]).
    pub tracked: Vec<(u64, u64)>,
    /// Its shared memory objects (see [`shmem::objects_of`]) and their runs of data.
    pub objs: std::collections::BTreeMap<u64, (String, String)>,
    pub shmem_runs: Vec<(u64, u64, u64)>,
}

impl State {
    /// Bytes of its shared memory objects' data, at most.
    pub fn shmem_bytes(&self) -> u64 {
        self.shmem_runs.iter().map(|r| r.2).sum()
    }
}

/// Reads everything of frozen process `f` but its memory contents.
pub(crate) fn capture(f: &mut Frozen, moving: Moving) -> Result<State> {
    let pid = f.pid;
    // Anything could have changed between the check and the stop; now nothing runs.
    let reasons = checks::refusals_with(pid, moving.rules.clone())?;
    if !reasons.is_empty() {
        return Err(Error::Refused { pid, reasons });
    }
    let maps = procfs::maps(pid)?;
    let xstate = sys::get_xstate(pid)?;
    let blocked = sys::get_sigmask(pid)?;
    let mut pending = Vec::new();
    for shared in [false, true] {
        for s in sys::peek_siginfo(pid, shared)? {
            pending.push(PendingSignal { shared, siginfo: s });
        }
    }
    let rseq = sys::get_rseq(pid)?.map(|(addr, len, sig)| Rseq { addr, len, sig });
    let robust_list = sys::get_robust_list(pid)?;
    let inj = inject_queries(f, &maps)?;
    for s in &f.main().held {
        pending.push(PendingSignal {
            shared: false,
            siginfo: s.clone(),
        });
    }
    let mut others = Vec::new();
    for (t, own) in f.tasks.iter().zip(&inj.own).skip(1) {
        others.push(threads::image_of(pid, t, *own)?);
    }

    let st = procfs::status(pid)?;
    let sf = procfs::stat_fields(pid)?;
    let groups = procfs::id_list(st.get("Groups"));
    let rlimits = procfs::limits(pid)?;
    let mut fds = Vec::new();
    let infos = procfs::fds(pid)?;
    for fi in &infos {
        let mut kind = if moving.rules.leave_home {
            // It stays at home with the deputy.
            FdKind::Home {
                was: fi.target.clone(),
            }
        } else {
            checks::kind_of_fd(pid, fi, &infos).map_err(|r| Error::Refused {
                pid,
                reasons: vec![r],
            })?
        };
        if let FdKind::Memfd { ino, .. } = &mut kind {
            *ino = shmem::fd_inode(pid, fi.fd).ok_or(Error::NoProcess(pid))?;
        }
        fds.push(Fd {
            fd: fi.fd,
            cloexec: fi.flags & libc::O_CLOEXEC != 0,
            kind,
        });
    }
    crate::fdobj::fill_pipes(pid, &mut fds)?;
    let home = if moving.rules.leave_home {
        crate::homemem::areas(pid, &maps, moving.rules.away)
    } else {
        Vec::new()
    };
    let (vmas, tracked, advice) = vmas_tracked(pid, &maps, &home)?;
    let mut objs = shmem::objects_of(pid, &maps)?;
    objs.retain(|ino, _| !home.iter().any(|a| a.here_ino == *ino));
    f.home_memory = home;
    let (shmem_objects, shmem_runs) = shmem::describe(&objs)?;
    let exe = procfs::link(pid, "exe")?;
    let meta = ProcessImage {
        arch: std::env::consts::ARCH.to_string(),
        kernel: sys::uname_release(),
        hostname: sys::hostname(),
        // The PID it knows itself by (a restored process may be in a PID namespace).
        pid: f.own,
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim_end()
            .to_string(),
        exe_id: procfs::file_id_of(&format!("/proc/{pid}/exe")).ok(),
        exe,
        cwd: procfs::link(pid, "cwd")?,
        umask: st
            .get("Umask")
            .and_then(|u| u32::from_str_radix(u, 8).ok())
            .unwrap_or(0o022),
        creds: Creds {
            uid: procfs::ids(st.get("Uid")),
            gid: procfs::ids(st.get("Gid")),
            groups,
        },
        personality: std::fs::read_to_string(format!("/proc/{pid}/personality"))
            .ok()
            .and_then(|p| u64::from_str_radix(p.trim(), 16).ok())
            .unwrap_or(0),
        no_new_privs: moving
            .no_new_privs
            .unwrap_or(st.get("NoNewPrivs").map(String::as_str) == Some("1")),
        rlimits,
        vmas,
        mm: MmFields {
            start_code: procfs::field_u64(&sf, 26),
            end_code: procfs::field_u64(&sf, 27),
            start_stack: procfs::field_u64(&sf, 28),
            start_data: procfs::field_u64(&sf, 45),
            end_data: procfs::field_u64(&sf, 46),
            start_brk: procfs::field_u64(&sf, 47),
            brk: inj.brk,
            arg_start: procfs::field_u64(&sf, 48),
            arg_end: procfs::field_u64(&sf, 49),
            env_start: procfs::field_u64(&sf, 50),
            env_end: procfs::field_u64(&sf, 51),
            auxv: procfs::auxv(pid)?,
        },
        regs: sys::regs_to_bytes(&f.main().regs),
        xstate,
        sigactions: inj.sigactions,
        blocked,
        pending,
        sigaltstack: inj.sigaltstack,
        itimers: inj.itimers,
        rseq,
        robust_list,
        clear_child_tid: inj.clear_child_tid,
        fds,
        memory_estimate: 0,
        clocks: Some(clocks_of(pid)),
        caps: crate::Caps::of_pid(pid).ok(),
        threads: others,
        pgid: last_id(st.get("NSpgid")),
        sid: last_id(st.get("NSsid")),
        shmem: shmem_objects,
        advice,
    };
    Ok(State {
        meta,
        tracked,
        objs,
        shmem_runs,
    })
}

pub(crate) fn dump_frozen_for<W: Write + 'static>(
    f: &mut Frozen,
    out: W,
    opts: DumpOptions,
    moving: Moving,
    progress: Progress<'_>,
) -> Result<(W, DumpStats)> {
    let pid = f.pid;
    let State {
        mut meta,
        objs,
        shmem_runs,
        ..
    } = capture(f, moving)?;
    let runs = page_runs(pid, &meta.vmas)?;
    let estimate: u64 =
        runs.iter().map(|r| r.1 * PAGE).sum::<u64>() + shmem_runs.iter().map(|r| r.2).sum::<u64>();
    meta.memory_estimate = estimate;
    let mut w = ImageWriter::new(out, opts.compression, &meta)?;
    let mut stats = DumpStats::default();
    let mut buf = vec![0u8; PAGES_RECORD_MAX];
    let mut done = 0u64;
    for &(start, n, anon) in &runs {
        let len = (n * PAGE) as usize;
        let chunk = &mut buf[..len];
        sys::read_mem_many(pid, &[(start, len)], chunk)?;
        if anon {
            // Leave out all-zero pages: they come back as fresh anonymous memory.
            let mut i = 0usize;
            let pages = n as usize;
            while i < pages {
                let pg = |k: usize| &chunk[k * PAGE as usize..(k + 1) * PAGE as usize];
                if is_zero(pg(i)) {
                    stats.zero_pages += 1;
                    i += 1;
                    continue;
                }
                let s = i;
                while i < pages && !is_zero(pg(i)) {
                    i += 1;
                }
                let bytes = &chunk[s * PAGE as usize..i * PAGE as usize];
                w.pages(start + s as u64 * PAGE, bytes)?;
                stats.memory_bytes += bytes.len() as u64;
            }
        } else {
            w.pages(start, chunk)?;
            stats.memory_bytes += len as u64;
        }
        done += len as u64;
        progress(done, estimate);
    }
    stats.memory_bytes += shmem::write_contents(&objs, &shmem_runs, &mut w)?;
    let out = w.finish()?;
    Ok((out, stats))
}

/// The process's CLOCK_MONOTONIC and CLOCK_BOOTTIME now, as it sees them: ours, less our
/// time namespace's offsets, plus its.
pub(crate) fn clocks_of(pid: i32) -> Clocks {
    let own = procfs::timens_offsets("self");
    let its = procfs::timens_offsets(&pid.to_string());
    Clocks {
        monotonic_ns: sys::clock_ns(libc::CLOCK_MONOTONIC) - own.0 + its.0,
        boottime_ns: sys::clock_ns(libc::CLOCK_BOOTTIME) - own.1 + its.1,
    }
}
