//! A process being restored, in phases, so that it can be built while its image still
//! arrives (pipelined restore) and from pre-copy rounds: [`Site::begin`] makes the child
//! (or takes the deputy, [`Site::begin_in`]) with its memory laid out as a first layout
//! says, [`Site::reshape`] follows later layouts, [`Site::pages`] and [`Site::drops`]
//! put memory in place, [`Site::final_state`] takes the process's final state, and
//! [`Site::complete`] makes the rest (shared memory mappings, descriptors, signals,
//! threads, credentials, registers). A `Site` dropped before it completed kills the
//! child it made.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::Instant;

use crate::away::Away;
use crate::creds::{self, CredOptions, Plan, Restorer};
use crate::error::{sys_err, Error, Result};
use crate::image::{MmFields, ProcessImage, Vma, VmaKind};
use crate::procfs;
use crate::records::{kept_ranges, staged};
use crate::remote::Remote;
use crate::restore::{
    final_state, free_range, image_specials, map_file, preflight_meta, set_mm, specials,
    syscall_insn_in, Builder, Built, Mode, RestoreOptions, Restored, AT_STR, SCRATCH_LEN,
    TASK_SIZE,
};
use crate::sys;
use crate::threads;

const PR_SET_VMA: u64 = 0x53564d41;
const PR_SET_VMA_ANON_NAME: u64 = 0;

/// How the process is restored (see [`Mode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Away,
    Into,
}

impl Kind {
    fn of(m: Mode) -> Kind {
        match m {
            Mode::Plain => Kind::Plain,
            Mode::Away(_) => Kind::Away,
            Mode::Into(_) => Kind::Into,
        }
    }
}

/// A process being restored (see the module documentation).
pub(crate) struct Site {
    pub pid: i32,
    /// Its PID in its own PID namespace.
    own: i32,
    pub ns_init: Option<i32>,
    r: Remote,
    scratch: u64,
    fs_uid: u32,
    plan: Plan,
    kind: Kind,
    /// Away from home: what it is restored with.
    away: Option<Away>,
    /// Inside its deputy: the deputy's descriptors of the memory it shares at home.
    held: crate::homemem::Held,
    /// Away: the userfaultfd that watches the memory it shares at home (if any).
    home_uffd: Option<OwnedFd>,
    opts: RestoreOptions,
    shm: HashMap<u64, u64>,
    /// Its shared memory objects' descriptors of ours, to write their data through.
    shm_files: HashMap<u64, std::fs::File>,
    /// The private areas mapped now (the last layout's).
    staged: Vec<Vma>,
    /// The first layout: the final state must be of the same process.
    /// The madvise advice of its private areas (see [`ProcessImage::advice`]): given to
    /// each as it is mapped, before its pages are put in.
    advice: Vec<(u64, u32)>,
    first: ProcessImage,
    /// The mm fields set last.
    mm: MmFields,
    /// When it was made (its clocks run from then on in its time namespace).
    born: Instant,
    /// It was made here (not a deputy taken over): killed if the restore fails.
    made: bool,
    done: bool,
    /// Its memory being put in while it is built and runs (`RestoreOptions::lazy`).
    pub(crate) filling: Option<crate::lazy::Filling>,
    /// It and we on one CPU while it is built (see crate::cpu).
    one_cpu: Option<crate::cpu::OneCpu>,
}

fn dummy_remote() -> Remote {
    let zero = sys::regs_from_bytes(&[0u8; std::mem::size_of::<sys::Regs>()])
        .expect("a register block of the right size");
    Remote::new(0, 0, zero)
}

impl Drop for Site {
    fn drop(&mut self) {
        if self.done || !self.made {
            return;
        }
        threads::kill_and_reap(self.pid);
        if let Some(i) = self.ns_init {
            let _ = sys::kill(i, libc::SIGKILL);
            let _ = sys::wait(i);
        }
    }
}

impl Site {
    /// Makes a new traced child and lays its memory out as `spec` says (a layout, or the
    /// final state of a plain image). Its PID, clocks and credentials are `spec`'s.
    pub(crate) fn begin(
        spec: &ProcessImage,
        opts: RestoreOptions,
        creds: &CredOptions,
        mode: Mode,
    ) -> Result<Site> {
        let t = Instant::now();
        preflight_meta(spec)?;
        let plan = creds::plan(&spec.creds, spec.caps, creds, &Restorer::current())?;
        // (The child starts on our CPU.)
        let one_cpu = crate::cpu::OneCpu::here();
        let (pid, ns_init) = if opts.keep_pid || opts.time_ns {
            let set_tid = if opts.keep_pid {
                if spec.pid <= 1 {
                    return Err(Error::Unrestorable(format!(
                        "the process had PID {}, which it cannot keep (PID 1 is the namespace's init)",
                        spec.pid
                    )));
                }
                spec.pid
            } else {
                0
            };
            let offsets = if opts.time_ns {
                let Some(c) = &spec.clocks else {
                    return Err(Error::Unrestorable(
                        "the image has no clock readings (made by an older mosix): cannot keep its clocks"
                            .into(),
                    ));
                };
                let (own_mono, own_boot) = procfs::timens_offsets("self");
                let mono = c.monotonic_ns - (sys::clock_ns(libc::CLOCK_MONOTONIC) - own_mono);
                let boot = c.boottime_ns - (sys::clock_ns(libc::CLOCK_BOOTTIME) - own_boot);
                Some((mono, boot))
            } else {
                None
            };
            let hostname = match mode {
                Mode::Away(a) => a.hostname.as_deref(),
                _ => None,
            };
            sys::spawn_traced_child_in_ns_named(opts.stdio, set_tid, offsets, hostname)?
        } else {
            (sys::spawn_traced_child(opts.stdio)?, None)
        };
        tracing::debug!("preflight and fork in {:?}", t.elapsed());
        let own = if opts.keep_pid { spec.pid } else { pid };
        Site::lay_out(pid, own, ns_init, spec, opts, plan, mode, true, one_cpu)
    }

    /// Takes stopped tracee `pid` (a deputy after its exec of the image's executable) and
    /// lays its memory out as `spec` says, with credential plan `plan`.
    pub(crate) fn begin_in(
        pid: i32,
        spec: &ProcessImage,
        opts: RestoreOptions,
        plan: Plan,
        mode: Mode,
    ) -> Result<Site> {
        let mut one_cpu = crate::cpu::OneCpu::here();
        if let Some(one) = &mut one_cpu {
            one.add(pid);
        }
        Site::lay_out(pid, pid, None, spec, opts, plan, mode, false, one_cpu)
    }

    /// The site of tracee `pid` (`own` in its PID namespace; `made` here, or a deputy
    /// taken over), laid out as `spec` says.
    #[allow(clippy::too_many_arguments)]
    fn lay_out(
        pid: i32,
        own: i32,
        ns_init: Option<i32>,
        spec: &ProcessImage,
        opts: RestoreOptions,
        plan: Plan,
        mode: Mode,
        made: bool,
        one_cpu: Option<crate::cpu::OneCpu>,
    ) -> Result<Site> {
        let mut site = Site {
            pid,
            own,
            ns_init,
            r: dummy_remote(),
            scratch: 0,
            fs_uid: plan.creds.uid[3],
            plan,
            kind: Kind::of(mode),
            away: match mode {
                Mode::Away(a) => Some(a.clone()),
                _ => None,
            },
            held: match mode {
                Mode::Into(h) => h.clone(),
                _ => Default::default(),
            },
            home_uffd: None,
            opts,
            shm: HashMap::new(),
            shm_files: HashMap::new(),
            staged: Vec::new(),
            first: spec.clone(),
            advice: spec.advice.clone(),
            mm: spec.mm.clone(),
            born: Instant::now(),
            made,
            done: false,
            filling: None,
            one_cpu,
        };
        site.setup(spec)?;
        Ok(site)
    }

    /// Runs `f` with a [`Builder`] of this site on image `img`.
    pub(crate) fn with<T>(
        &mut self,
        img: &ProcessImage,
        f: impl FnOnce(&mut Builder) -> Result<T>,
    ) -> Result<T> {
        let away = self.away.take();
        let held = std::mem::take(&mut self.held);
        let mode = match (self.kind, &away) {
            (Kind::Away, Some(a)) => Mode::Away(a),
            (Kind::Into, _) => Mode::Into(&held),
            _ => Mode::Plain,
        };
        let mut b = Builder {
            pid: self.pid,
            own: self.own,
            r: std::mem::replace(&mut self.r, dummy_remote()),
            scratch: self.scratch,
            img,
            fs_uid: self.fs_uid,
            mode,
            shm: std::mem::take(&mut self.shm),
            home_uffd: self.home_uffd.take(),
        };
        let res = f(&mut b);
        self.r = b.r;
        self.shm = b.shm;
        self.home_uffd = b.home_uffd;
        self.away = away;
        self.held = held;
        res
    }

    /// Away from home: its descriptors that are files of its own /proc (known only once
    /// its image has arrived).
    pub(crate) fn set_proc_fds(&mut self, fds: Vec<(i32, String)>) {
        if let Some(a) = &mut self.away {
            a.proc_fds = fds;
        }
    }

    /// Away from home: the seccomp program it gets (known only once its final state has
    /// arrived: it depends on the memory it shares at home).
    pub(crate) fn set_filter(&mut self, filter: Vec<u8>) {
        if let Some(a) = &mut self.away {
            a.filter = filter;
        }
    }

    /// The child as exec left it: a work area of ours, nothing else of its own, the
    /// kernel's [vdso]/[vvar] where `spec` had them, the fs ids of its user, its mm
    /// fields, and its private memory mapped.
    fn setup(&mut self, spec: &ProcessImage) -> Result<()> {
        let pid = self.pid;
        sys::set_options(
            pid,
            (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACECLONE)
                as u64,
        )
        .map_err(|e| sys_err("ptrace options", e))?;
        // Nothing is delivered while we work.
        sys::set_sigmask(pid, !0u64)?;
        let base = sys::get_regs(pid)?;
        // The first system calls go through a syscall instruction of its [vdso].
        let child_maps = procfs::maps(pid)?;
        let vdso = child_maps.iter().filter(|c| c.name == "[vdso]");
        let ip = syscall_insn_in(pid, vdso.map(|c| (c.start, c.end)))
            .ok_or_else(|| Error::Unrestorable("no syscall instruction in the [vdso]".into()))?;
        let mut r = Remote::new(pid, ip, base);

        // rseq registered by our own libc must go before its memory does.
        if let Some((addr, len, sig)) = sys::get_rseq(pid)? {
            r.call(
                "rseq unregister",
                libc::SYS_rseq,
                &[addr, len as u64, 1, sig as u64],
            )?;
        }

        // A work area for code and arguments, clear of the image and of what is there.
        let mut used: Vec<(u64, u64)> = spec.vmas.iter().map(|v| (v.start, v.end)).collect();
        used.extend(child_maps.iter().map(|c| (c.start, c.end)));
        let scratch = free_range(&used, SCRATCH_LEN, TASK_SIZE - (1 << 30))
            .ok_or_else(|| Error::Unrestorable("no room for the restore work area".into()))?;
        r.call(
            "mmap of the work area",
            libc::SYS_mmap,
            &[
                scratch,
                SCRATCH_LEN,
                (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
                u64::MAX,
                0,
            ],
        )?;
        sys::write_mem(pid, scratch, &[0x0f, 0x05, 0xcc])?;
        r.ip = scratch;
        used.push((scratch, scratch + SCRATCH_LEN));

        // Drop everything of ours but the work area and the kernel's [vdso]/[vvar].
        let mut keep: Vec<(u64, u64)> = child_maps
            .iter()
            .filter(|c| c.is_special())
            .map(|c| (c.start, c.end))
            .collect();
        keep.push((scratch, scratch + SCRATCH_LEN));
        keep.sort();
        let mut at = 0u64;
        for &(s, e) in keep.iter().chain(std::iter::once(&(TASK_SIZE, TASK_SIZE))) {
            if s > at {
                r.call("munmap", libc::SYS_munmap, &[at, s - at])?;
            }
            at = at.max(e);
        }

        // Move [vvar]/[vdso] to where the image had them (via a free spot, in case the
        // old and new places overlap).
        let have = specials(&child_maps);
        let want = image_specials(spec);
        let mut moved = Vec::new();
        for (name, &(from, len)) in &have {
            let Some(&(to, wlen)) = want.get(name) else {
                return Err(Error::Unrestorable(format!("the image has no {name}")));
            };
            if wlen != len {
                return Err(Error::Unrestorable(format!("{name} size differs")));
            }
            if from == to {
                continue;
            }
            let mut all = used.clone();
            all.extend(keep.iter().copied());
            let tmp = free_range(&all, len, TASK_SIZE - (2 << 30))
                .ok_or_else(|| Error::Unrestorable("no room to move the vdso".into()))?;
            used.push((tmp, tmp + len));
            let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
            r.call(
                &format!("moving {name}"),
                libc::SYS_mremap,
                &[from, len, len, flags, tmp],
            )?;
            moved.push((name.clone(), tmp, to, len));
        }
        for (name, tmp, to, len) in moved {
            let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
            r.call(
                &format!("moving {name}"),
                libc::SYS_mremap,
                &[tmp, len, len, flags, to],
            )?;
        }
        self.r = r;
        self.scratch = scratch;
        let plan = self.plan.clone();
        self.with(spec, |b| {
            // From here on, every path is opened as the user the process belongs to.
            creds::enter(b, &plan)?;
            // The mm fields (and exe link) before the image's mappings exist: the kernel
            // refuses to change the exe link while the old exe is mapped, and the image
            // may map that very file.
            set_mm(b, true)
        })?;
        self.reshape(&spec.vmas)
    }

    /// Moves the work area out of the way of `areas` if it is in it.
    fn clear_work_area(&mut self, areas: &[Vma]) -> Result<()> {
        let (s, e) = (self.scratch, self.scratch + SCRATCH_LEN);
        if !areas.iter().any(|v| v.start < e && s < v.end) {
            return Ok(());
        }
        let mut used: Vec<(u64, u64)> = areas.iter().map(|v| (v.start, v.end)).collect();
        used.extend(self.staged.iter().map(|v| (v.start, v.end)));
        used.extend(self.first.vmas.iter().map(|v| (v.start, v.end)));
        used.push((s, e));
        let to = free_range(&used, SCRATCH_LEN, TASK_SIZE - (1 << 30))
            .ok_or_else(|| Error::Unrestorable("no room for the restore work area".into()))?;
        let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        self.r.call(
            "moving the work area",
            libc::SYS_mremap,
            &[s, SCRATCH_LEN, SCRATCH_LEN, flags, to],
        )?;
        self.r.ip = to;
        self.scratch = to;
        Ok(())
    }

    /// Lays the private memory out as `next` says: what stays the same kind of memory
    /// keeps its contents ([`kept_ranges`]), the rest is mapped afresh, what is gone is
    /// unmapped.
    pub(crate) fn reshape(&mut self, next: &[Vma]) -> Result<()> {
        let areas: Vec<Vma> = next.iter().filter(|v| staged(v)).cloned().collect();
        self.clear_work_area(&areas)?;
        let kept = kept_ranges(&self.staged, &areas);
        // Gone: what was staged and is not (part of) a staged area now.
        let now: Vec<(u64, u64)> = {
            let mut v: Vec<(u64, u64)> = areas.iter().map(|v| (v.start, v.end)).collect();
            v.sort_unstable();
            v
        };
        let old = std::mem::take(&mut self.staged);
        for v in &old {
            let mut at = v.start;
            for &(s, e) in &now {
                if e <= at || s >= v.end {
                    continue;
                }
                if s > at {
                    self.r.call("munmap", libc::SYS_munmap, &[at, s - at])?;
                }
                at = at.max(e);
            }
            if at < v.end {
                self.r.call("munmap", libc::SYS_munmap, &[at, v.end - at])?;
            }
        }
        // Fresh: every part of a staged area now that is not kept.
        let spec = self.first.clone();
        let advice = self.advice.clone();
        let mut open_files: HashMap<String, u64> = HashMap::new();
        let res = self.with(&spec, |b| {
            for v in &areas {
                let mut at = v.start;
                let mut parts = Vec::new();
                for &(s, e) in &kept {
                    if e <= at || s >= v.end {
                        continue;
                    }
                    if s > at {
                        parts.push((at, s));
                    }
                    at = at.max(e);
                }
                if at < v.end {
                    parts.push((at, v.end));
                }
                for (s, e) in parts {
                    map_private(b, v, s, e, &mut open_files)?;
                }
                // Before any page is put in: a huge page is made by a fault in an area
                // that asks for it. (Again on areas kept: it costs one call.)
                if let Some(&(_, bits)) = advice.iter().find(|(a, _)| *a == v.start) {
                    advise(b, v, bits)?;
                }
            }
            for (_, fd) in open_files.drain() {
                b.call("close", libc::SYS_close, &[fd])?;
            }
            Ok(())
        });
        self.staged = areas;
        res
    }

    /// Puts memory contents in place: (address, bytes), in its private memory.
    pub(crate) fn pages(&mut self, parts: &[(u64, &[u8])]) -> Result<()> {
        sys::write_mem_many(self.pid, parts)
    }

    /// Memory given back: as a fresh mapping has it again.
    pub(crate) fn drops(&mut self, drops: &[(u64, u64)]) -> Result<()> {
        for &(a, len) in drops {
            if !crate::read::in_staged(&self.staged, a, len) {
                return Err(Error::BadImage(format!(
                    "memory given back at {a:#x} outside the process's private memory"
                )));
            }
            self.r.call(
                "madvise(MADV_DONTNEED)",
                libc::SYS_madvise,
                &[a, len, libc::MADV_DONTNEED as u64],
            )?;
        }
        Ok(())
    }

    /// Whether [a, a+len) is in its private memory now (where pages may be put).
    pub(crate) fn holds(&self, a: u64, len: u64) -> bool {
        crate::read::in_staged(&self.staged, a, len)
    }

    /// Takes the process's final state: it must be the process of the first layout; its
    /// memory is laid out as it says, its mm fields set, its shared memory objects made
    /// (their data comes with [`Site::shmem_data`]).
    pub(crate) fn final_state(&mut self, m: &ProcessImage) -> Result<()> {
        let f = &self.first;
        let changed = if f.pid != m.pid {
            Some("its PID")
        } else if f.arch != m.arch {
            Some("its architecture")
        } else if f.exe != m.exe || f.exe_id != m.exe_id {
            Some("its program (an exec)")
        } else if f.creds != m.creds || f.caps != m.caps {
            Some("its credentials")
        } else {
            None
        };
        if let Some(what) = changed {
            return Err(Error::Unrestorable(format!(
                "{what} changed while it was saved"
            )));
        }
        preflight_meta(m)?;
        self.advice = m.advice.clone();
        self.reshape(&m.vmas)?;
        if m.mm != self.mm {
            self.with(m, |b| set_mm(b, false))?;
            self.mm = m.mm.clone();
        }
        let mut files = HashMap::new();
        self.with(m, |b| {
            files = crate::shmem::make(b)?;
            Ok(())
        })?;
        self.shm_files = files;
        Ok(())
    }

    /// Data of shared memory object `ino` at `offset`.
    pub(crate) fn shmem_data(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let f = self
            .shm_files
            .get(&ino)
            .ok_or_else(|| Error::BadImage("shared memory data of no object".into()))?;
        f.write_all_at(data, offset)
            .map_err(|e| sys_err("writing shared memory", e))
    }

    /// Makes the rest of process `m` (its final state, taken with
    /// [`Site::final_state`]): shared mappings, protections and names of its memory,
    /// descriptors, signals, threads, credentials, registers. With `track` (away from
    /// home) a userfaultfd of its memory is made in it too (for a later move) and
    /// returned. Returns the filter's listener with [`Mode::Away`], and the userfaultfd
    /// that watches the memory it shares at home (away, if it has any).
    pub(crate) fn complete(
        mut self,
        m: &ProcessImage,
        track: bool,
    ) -> Result<(Restored, Built, Option<OwnedFd>)> {
        self.shm_files.clear();
        let t0 = Instant::now();
        let pid = self.pid;
        let opts = self.opts;
        let plan = self.plan.clone();
        let kind = self.kind;
        let scratch = self.scratch;
        let (listener, uffd) = self.with(m, |b| {
            map_shared(b)?;
            crate::restore::finish_memory(b)?;
            crate::restore::restore_fds(b)?;
            crate::shmem::seal(b)?;
            crate::restore::restore_misc(b)?;
            crate::restore::restore_signals(b)?;
            // The other threads, made by the main thread while it still may choose their
            // IDs; each then takes on the process's credentials itself (they are per
            // thread).
            let tids = match (opts.keep_pid, kind) {
                (true, _) => threads::Tids::Keep,
                (false, Kind::Into) => threads::Tids::Hint,
                _ => threads::Tids::New,
            };
            let made = threads::make_all(b, tids)?;
            for (t, _) in &made {
                let theirs = Remote::new(t.tid, b.r.ip, t.regs);
                let main_r = std::mem::replace(&mut b.r, theirs);
                let res = creds::finish(b, &plan);
                b.r = main_r;
                res?;
            }
            creds::finish(b, &plan)?;

            // Leave the work area through a syscall instruction of the restored program.
            let vdso = m
                .vmas
                .iter()
                .filter(|v| v.kind == VmaKind::Special("[vdso]".into()));
            let code = m
                .vmas
                .iter()
                .filter(|v| v.prot & libc::PROT_EXEC != 0 && v.prot & libc::PROT_READ != 0);
            let ip = syscall_insn_in(pid, vdso.chain(code).map(|v| (v.start, v.end)));
            b.r.ip = ip.ok_or_else(|| {
                Error::Unrestorable("no syscall instruction in the restored code".into())
            })?;
            if let Some(sig) = opts.pdeathsig {
                b.call(
                    "prctl(PR_SET_PDEATHSIG)",
                    libc::SYS_prctl,
                    &[libc::PR_SET_PDEATHSIG as u64, sig as u64, 0, 0, 0],
                )?;
            }
            // The filter last of all system calls (those after it are let through by it).
            let listener = match b.mode {
                Mode::Away(a) => Some(crate::restore::install_filter(b, &a.filter)?),
                _ => None,
            };
            // Without a tracker (no userfaultfd could be made in it: its descriptor limit,
            // a security module) it is restored all the same, and its next move is a
            // frozen one. A failure of the injection itself is not survived.
            let uffd = if track {
                match crate::dirty::make_in(&mut b.r, listener.as_ref()) {
                    Ok(u) => Some(u),
                    Err(e @ (Error::Unrestorable(_) | Error::Sys { .. })) => {
                        tracing::warn!(pid, "its writes cannot be tracked here: {e}");
                        None
                    }
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            b.call(
                "munmap of the work area",
                libc::SYS_munmap,
                &[scratch, SCRATCH_LEN],
            )?;

            // Registers last; a system call interrupted at checkpoint time is restarted.
            let regs = sys::regs_from_bytes(&m.regs)
                .ok_or_else(|| Error::Unrestorable("registers of an unknown layout".into()))?;
            final_state(pid, regs, &m.xstate, m.blocked)?;
            for (t, ti) in &made {
                let mut regs = sys::regs_from_bytes(&ti.regs).ok_or_else(|| {
                    Error::Unrestorable(format!(
                        "registers of thread {} of an unknown layout",
                        ti.tid
                    ))
                })?;
                regs.fs_base = ti.fs_base;
                regs.gs_base = ti.gs_base;
                final_state(t.tid, regs, &ti.xstate, ti.blocked)?;
            }
            Ok((listener, uffd))
        })?;
        let built = t0.elapsed();
        self.keep_clocks(m);
        tracing::debug!(
            "process {pid} completed in {built:?} ({:?} with its clocks)",
            t0.elapsed()
        );
        // Its CPUs (ours, or its own inside its deputy) before it runs.
        if let Some(one) = self.one_cpu.take() {
            let init = self.ns_init.unwrap_or(pid);
            one.finish(&[pid, init]);
        }
        if !opts.hold {
            crate::restore::resume(pid)?;
        }
        self.done = true;
        Ok((
            Restored {
                pid,
                ns_init: self.ns_init,
            },
            Built {
                listener,
                home_memory: self.home_uffd.take(),
                filling: self.filling.take(),
            },
            uffd,
        ))
    }

    /// In its time namespace the process's clocks went on from the first layout's
    /// readings since it was made: if that is less than its clocks read when it was
    /// frozen (pre-copy rounds read them long before), waits until they are past those,
    /// so that they never go back.
    fn keep_clocks(&self, m: &ProcessImage) {
        if !self.opts.time_ns {
            return;
        }
        let (Some(a), Some(b)) = (&self.first.clocks, &m.clocks) else {
            return;
        };
        let ahead = (b.monotonic_ns - a.monotonic_ns).max(b.boottime_ns - a.boottime_ns);
        let since = self.born.elapsed().as_nanos() as i64;
        let wait = ahead - since;
        if wait > 0 {
            std::thread::sleep(std::time::Duration::from_nanos(
                wait.min(5_000_000_000) as u64
            ));
        }
    }
}

/// Gives private area `v` the madvise advice `bits` ([`crate::image::ADVICES`]). A hint
/// the kernel refuses (no transparent huge pages here) is left out; a fork behaviour it
/// refuses fails the restore (a child of the process would see the difference).
fn advise(b: &mut Builder, v: &Vma, bits: u32) -> Result<()> {
    for &(bit, _, madv, must) in &crate::image::ADVICES {
        if bits & bit == 0 {
            continue;
        }
        let r = b.call(
            "madvise",
            libc::SYS_madvise,
            &[v.start, v.end - v.start, madv as u64],
        );
        if must {
            r?;
        }
    }
    Ok(())
}

/// Maps [s, e) of private area `v` afresh: anonymous, or its file (reopened as the
/// user, checked) at the right offset; writable while it is built.
fn map_private(
    b: &mut Builder,
    v: &Vma,
    s: u64,
    e: u64,
    open_files: &mut HashMap<String, u64>,
) -> Result<()> {
    let len = e - s;
    match &v.kind {
        VmaKind::Anon => {
            let growsdown = if v.growsdown { libc::MAP_GROWSDOWN } else { 0 };
            b.call(
                "mmap",
                libc::SYS_mmap,
                &[
                    s,
                    len,
                    (libc::PROT_READ | libc::PROT_WRITE) as u64,
                    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | growsdown) as u64,
                    u64::MAX,
                    0,
                ],
            )?;
        }
        VmaKind::File { path, offset, id } => {
            let fd = match open_files.get(path) {
                Some(&fd) => fd,
                None => {
                    let fd = b.open(path, libc::O_RDONLY | libc::O_CLOEXEC, Some((id, true)))?;
                    open_files.insert(path.clone(), fd);
                    fd
                }
            };
            let part = Vma {
                start: s,
                end: e,
                ..v.clone()
            };
            map_file(
                b,
                &part,
                fd,
                offset + (s - v.start),
                &format!("mapping {path}"),
            )?;
        }
        _ => {}
    }
    Ok(())
}

/// Maps the shared areas (memfds and MAP_SHARED anonymous memory, shared mappings of
/// files), and names the anonymous ones that had names.
fn map_shared(b: &mut Builder) -> Result<()> {
    let m = b.img;
    let mut open_files: HashMap<(String, bool), u64> = HashMap::new();
    for v in &m.vmas {
        match &v.kind {
            VmaKind::Shmem { ino, offset } => {
                let fd = *b.shm.get(ino).ok_or_else(|| {
                    Error::BadImage(format!("memory at {:#x} of no shared object", v.start))
                })?;
                map_file(b, v, fd, *offset, "mapping shared memory")?;
            }
            VmaKind::File { path, offset, id } if v.shared => {
                // A writable shared mapping (of a file of a shared path: the only ones
                // saved) maps the file again, read-write: it holds the data, and changes
                // while the process moves (others write it too), so it is the same by
                // its path.
                let rw = v.prot & libc::PROT_WRITE != 0;
                let fd = match open_files.get(&(path.clone(), rw)) {
                    Some(&fd) => fd,
                    None => {
                        let fd = if rw {
                            b.open(path, libc::O_RDWR | libc::O_CLOEXEC, None)?
                        } else {
                            b.open(path, libc::O_RDONLY | libc::O_CLOEXEC, Some((id, true)))?
                        };
                        open_files.insert((path.clone(), rw), fd);
                        fd
                    }
                };
                map_file(b, v, fd, *offset, &format!("mapping {path}"))?;
            }
            VmaKind::HomeShared { dev, ino, offset } => {
                crate::restore::home_memory(b, v, (*dev, *ino, *offset))?;
            }
            _ => {}
        }
    }
    for (_, fd) in open_files {
        b.call("close", libc::SYS_close, &[fd])?;
    }
    if let Some(u) = &b.home_uffd {
        let ranges: Vec<(u64, u64)> = m
            .vmas
            .iter()
            .filter(|v| matches!(v.kind, VmaKind::HomeShared { .. }))
            .map(|v| (v.start, v.end))
            .collect();
        crate::homemem::register(u, &ranges)?;
    }
    for v in &m.vmas {
        if let Some(name) = &v.anon_name {
            let p = b.put_str(AT_STR, name)?;
            b.call(
                "naming memory",
                libc::SYS_prctl,
                &[
                    PR_SET_VMA,
                    PR_SET_VMA_ANON_NAME,
                    v.start,
                    v.end - v.start,
                    p,
                ],
            )?;
        }
    }
    Ok(())
}
