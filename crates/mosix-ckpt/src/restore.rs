//! Restore: build the saved process inside a fresh traced child by injecting system
//! calls into it, then let it go.

use std::collections::HashMap;
use std::os::fd::RawFd;

use crate::creds::CredOptions;
use crate::error::{sys_err, Error, Result};
use crate::fdobj;
use crate::image::{FdKind, LoadedImage, ProcessImage, VmaKind};
use crate::procfs;
use crate::remote::{find_syscall_insn, Remote};
use crate::stage::Site;
use crate::sys::{self, PAGE};
use crate::threads;
use std::os::fd::OwnedFd;

/// Highest user address on x86_64 with 4-level paging.
pub(crate) const TASK_SIZE: u64 = 0x7fff_ffff_f000;
pub(crate) const SCRATCH_LEN: u64 = 64 * 1024;
// Layout of the work area: code, auxv, prctl_mm_map, small structs, strings.
const AT_AUXV: u64 = 0x1000;
const AT_MM: u64 = 0x2000;
pub(crate) const AT_MISC: u64 = 0x3000;
/// Where a batch of calls runs from (code, then its table), and its data.
pub(crate) const AT_BATCH: u64 = 0x4000;
pub(crate) const AT_BATCH_DATA: u64 = 0x5800;
pub(crate) const AT_STR: u64 = 0x8000;
/// Where a seccomp program goes (up to 24 KiB: 3072 instructions).
const AT_FILTER: u64 = 0xa000;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;

/// How the new process is created.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestoreOptions {
    /// Descriptors of ours that become the process's inherited 0, 1, 2 (image fds of
    /// kind `Inherit`); None: our own 0, 1, 2.
    pub stdio: Option<[RawFd; 3]>,
    /// Restore into a new PID namespace where the process has its original PID (the
    /// namespace gets a small init first: this program exec'd again, see
    /// [`crate::sys::NS_INIT_ARG0`]).
    pub keep_pid: bool,
    /// Restore into a new time namespace whose offsets make CLOCK_MONOTONIC and
    /// CLOCK_BOOTTIME go on from their values at checkpoint time.
    pub time_ns: bool,
    /// Leave the restored process stopped under our ptrace: it starts running only at
    /// [`resume`] (or dies with us, PTRACE_O_EXITKILL). For migration's commit.
    pub hold: bool,
    /// Signal the process gets when the restoring thread dies (PR_SET_PDEATHSIG), so a
    /// guest dies with the daemon that hosts it.
    pub pdeathsig: Option<i32>,
    /// Inside its deputy ([`crate::restore_into`]): its private anonymous memory is put
    /// in while it runs ([`crate::lazy`]), so that it waits for its state only.
    pub lazy: bool,
}

/// Lets a process restored with `hold` run, every thread of it. Call from the thread
/// that restored it.
pub fn resume(pid: i32) -> Result<()> {
    threads::detach_all(pid)
}

/// A restored process, our child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored {
    /// Its PID as we see it.
    pub pid: i32,
    /// With `keep_pid`: the init of its PID namespace, also our child, to be reaped once
    /// the process has ended (it exits by itself then).
    pub ns_init: Option<i32>,
}

/// Checks that the image can be restored on this machine, before anything is created:
/// architecture, registers, kernel-provided mappings. The files it maps or has open are
/// checked later, once opened (as the user the process belongs to): a check by path
/// before the open could be raced, and made as root would tell about files the user
/// cannot see.
pub fn preflight(img: &LoadedImage) -> Result<()> {
    preflight_meta(&img.meta)
}

/// [`preflight`] of a process image.
pub(crate) fn preflight_meta(m: &ProcessImage) -> Result<()> {
    if m.arch != std::env::consts::ARCH {
        return Err(Error::Unrestorable(format!(
            "the image is of a {} process; this machine is {}",
            m.arch,
            std::env::consts::ARCH
        )));
    }
    // (A pre-copy layout has no registers yet: they come with the final state.)
    if !m.regs.is_empty() && sys::regs_from_bytes(&m.regs).is_none() {
        return Err(Error::Unrestorable("registers of an unknown layout".into()));
    }
    let own = specials(&procfs::maps(std::process::id() as i32)?);
    let want = image_specials(m);
    for (name, (_, len)) in &want {
        match own.get(name) {
            Some((_, l)) if l == len => {}
            _ => {
                return Err(Error::Unrestorable(format!(
                "the kernel's {name} differs from the one of the image (kernel {} there, {} here)",
                m.kernel,
                sys::uname_release()
            )))
            }
        }
    }
    Ok(())
}

pub(crate) fn specials(maps: &[procfs::MapLine]) -> HashMap<String, (u64, u64)> {
    maps.iter()
        .filter(|m| m.is_special())
        .map(|m| (m.name.clone(), (m.start, m.len())))
        .collect()
}

pub(crate) fn image_specials(m: &ProcessImage) -> HashMap<String, (u64, u64)> {
    m.vmas
        .iter()
        .filter_map(|v| match &v.kind {
            VmaKind::Special(n) => Some((n.clone(), (v.start, v.end - v.start))),
            _ => None,
        })
        .collect()
}

/// A free range of `len` bytes not overlapping any of `used`, searching downwards from
/// below `top`.
pub(crate) fn free_range(used: &[(u64, u64)], len: u64, top: u64) -> Option<u64> {
    let mut v: Vec<(u64, u64)> = used.to_vec();
    v.sort();
    let mut hi = top;
    for &(s, e) in v.iter().rev() {
        if e <= hi && hi - e >= len + PAGE {
            return Some(hi - len - PAGE);
        }
        hi = hi.min(s);
    }
    (hi >= len + 0x10_0000).then(|| hi - len)
}

/// Restores the image as a new child of this process, with the credentials the image
/// records ([`CredOptions::from_image`]): only for images you wrote yourself or know to
/// be genuine; see [`restore_with`] for the others.
pub fn restore(img: &LoadedImage, opts: RestoreOptions) -> Result<Restored> {
    restore_with(img, opts, &CredOptions::from_image())
}

/// Restores the image as a new child of this process, which must stay single-threaded
/// for ptrace's sake while this runs. The process runs on its own once this returns.
///
/// `creds` decides whose process it is (see [`crate::CredPolicy`]); every path of the
/// image (exe, mapped files, open files, cwd) is opened in the new process with those
/// credentials, and checked (fstat of the opened descriptor) against what the image
/// recorded. A refusal or any failure leaves nothing running.
pub fn restore_with(
    img: &LoadedImage,
    opts: RestoreOptions,
    creds: &CredOptions,
) -> Result<Restored> {
    restore_mode(img, opts, creds, Mode::Plain).map(|(r, _)| r)
}

/// What kind of restore: a plain one, one away from home, or one inside the deputy.
#[derive(Clone, Copy)]
pub(crate) enum Mode<'a> {
    /// Descriptors held at home are refused.
    Plain,
    /// Away from home: placeholders for descriptors held at home, the home's host name,
    /// and the filter last.
    Away(&'a crate::away::Away),
    /// Inside the deputy at home: its descriptors are the process's, its credentials
    /// too, and its exe link is already right. With the deputy's descriptors of the
    /// process's home memory objects: (dev, ino) -> descriptor number.
    Into(&'a crate::homemem::Held),
}

/// What a build leaves besides the process: the filter's listener (away), and the
/// userfaultfd that watches its home memory (away, if it has any: crate::homemem).
#[derive(Debug, Default)]
pub struct Built {
    pub listener: Option<std::os::fd::OwnedFd>,
    pub home_memory: Option<std::os::fd::OwnedFd>,
    /// Its memory being put in while it runs (`lazy`).
    pub filling: Option<crate::lazy::Filling>,
}

/// As [`restore_with`], its private anonymous memory put in while it runs
/// ([`crate::lazy`]): the process may start before all of it is in. The fill is returned
/// (None if there was nothing to fill, or no userfaultfd could be had: then everything was
/// put in first); finish it ([`crate::lazy::Filling::finish`]) from a thread of ours, and
/// stay until it is done: the process waits for its memory as long as we are not there.
pub fn restore_lazy(
    img: &std::sync::Arc<LoadedImage>,
    opts: RestoreOptions,
    creds: &CredOptions,
) -> Result<(Restored, Option<crate::lazy::Filling>)> {
    let m = &img.meta;
    let mut site = Site::begin(m, opts, creds, Mode::Plain)?;
    build_loaded_lazy(&mut site, img)?;
    let (r, built, _) = site.complete(m, false)?;
    Ok((r, built.filling))
}

pub(crate) fn restore_mode(
    img: &LoadedImage,
    opts: RestoreOptions,
    creds: &CredOptions,
    mode: Mode,
) -> Result<(Restored, Built)> {
    restore_loaded(img, opts, creds, mode, false).map(|(r, b, _)| (r, b))
}

/// Restores a whole image (read and verified) in a new child; with `track` a
/// userfaultfd of its memory is made too (see [`Site::complete`]).
pub(crate) fn restore_loaded(
    img: &LoadedImage,
    opts: RestoreOptions,
    creds: &CredOptions,
    mode: Mode,
    track: bool,
) -> Result<(Restored, Built, Option<OwnedFd>)> {
    let t = std::time::Instant::now();
    let m = &img.meta;
    let mut site = Site::begin(m, opts, creds, mode)?;
    build_loaded(&mut site, img)?;
    tracing::debug!("memory in place after {:?}", t.elapsed());
    let r = site.complete(m, track)?;
    tracing::debug!("restored in {:?}", t.elapsed());
    Ok(r)
}

/// As [`build_loaded`], its private anonymous memory put in while it runs: a thread of
/// ours fills it from the moment its layout is made (anything that touches that memory
/// from then on, the restore included, waits for its pages). Without a userfaultfd (no
/// /dev/userfaultfd here, say) everything is put in before, as [`build_loaded`] does.
pub(crate) fn build_loaded_lazy(site: &mut Site, img: &std::sync::Arc<LoadedImage>) -> Result<()> {
    let (areas, mut later, now) = crate::lazy::split(&img.meta, img.page_runs());
    let filling = if areas.is_empty() || later.is_empty() {
        None
    } else {
        site.with(&img.meta, |b| {
            Ok(crate::lazy::start(b, img.clone(), later.clone(), &areas)
                .map_err(|e| tracing::warn!(pid = b.pid, "its memory is put in first: {e}"))
                .ok())
        })?
    };
    let body = img.body();
    let mut parts: Vec<(u64, &[u8])> = now
        .iter()
        .map(|&(a, off, len)| (a, &body[off..off + len]))
        .collect();
    if filling.is_none() {
        parts.extend(
            later
                .take(0, u64::MAX)
                .into_iter()
                .map(|(a, len, off)| (a, &body[off..off + len as usize])),
        );
    }
    site.pages(&parts)?;
    site.filling = filling;
    final_part(site, img)
}

/// Puts the memory of a whole image in place and takes its final state.
pub(crate) fn build_loaded(site: &mut Site, img: &LoadedImage) -> Result<()> {
    let parts: Vec<(u64, &[u8])> = img.pages().map(|p| (p.vaddr, p.data)).collect();
    site.pages(&parts)?;
    final_part(site, img)
}

/// After its private memory: the final state of `img`, and its shared memory.
fn final_part(site: &mut Site, img: &LoadedImage) -> Result<()> {
    site.final_state(&img.meta)?;
    for p in img.shmem_pages() {
        site.shmem_data(p.ino, p.offset, p.data)?;
    }
    Ok(())
}

pub(crate) struct Builder<'a> {
    pub(crate) pid: i32,
    /// Its PID in its own PID namespace.
    pub(crate) own: i32,
    pub(crate) r: Remote,
    pub(crate) scratch: u64,
    pub(crate) img: &'a ProcessImage,
    /// The fs uid paths are opened with.
    pub(crate) fs_uid: u32,
    pub(crate) mode: Mode<'a>,
    /// The process's shared memory objects made again: image inode -> descriptor.
    pub(crate) shm: HashMap<u64, u64>,
    /// The userfaultfd watching its home memory (away), once made.
    pub(crate) home_uffd: Option<std::os::fd::OwnedFd>,
}

impl<'a> Builder<'a> {
    /// Puts `data` into the scratch area at `off` and returns its address there.
    pub(crate) fn put(&self, off: u64, data: &[u8]) -> Result<u64> {
        if off + data.len() as u64 > SCRATCH_LEN {
            return Err(Error::Unrestorable(format!(
                "{} bytes of arguments do not fit the work area",
                data.len()
            )));
        }
        sys::write_mem(self.pid, self.scratch + off, data)?;
        Ok(self.scratch + off)
    }
    pub(crate) fn put_str(&self, off: u64, s: &str) -> Result<u64> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(off, &b)
    }
    pub(crate) fn call(&mut self, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
        self.r.call(what, nr, args)
    }
    /// Moves descriptor `fd` of the process to the lowest free number from `above` (close
    /// on exec), out of the way of the image's descriptors; returns the new number.
    pub(crate) fn fd_above(&mut self, fd: u64, above: u64) -> Result<u64> {
        let hi = self.call(
            "fcntl(F_DUPFD_CLOEXEC)",
            libc::SYS_fcntl,
            &[fd, libc::F_DUPFD_CLOEXEC as u64, above],
        )?;
        self.call("close", libc::SYS_close, &[fd])?;
        Ok(hi)
    }
    /// The lowest descriptor number above all of the image's.
    pub(crate) fn above_fds(&self) -> u64 {
        self.img.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) as u64 + 1
    }
}

/// Installs seccomp program `prog` in the process being built (no_new_privs first: it
/// runs as its user by now) and returns the listener, which is closed in the process
/// itself (that close is trapped already, and let through here).
pub(crate) fn install_filter(b: &mut Builder, prog: &[u8]) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    b.call(
        "prctl(PR_SET_NO_NEW_PRIVS)",
        libc::SYS_prctl,
        &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
    )?;
    let code = b.put(AT_FILTER, prog)?;
    let mut fprog = Vec::with_capacity(16);
    fprog.extend_from_slice(&((prog.len() / 8) as u16).to_le_bytes());
    fprog.extend_from_slice(&[0u8; 6]);
    fprog.extend_from_slice(&code.to_le_bytes());
    let fp = b.put(AT_MISC, &fprog)?;
    // SECCOMP_SET_MODE_FILTER = 1; flags TSYNC (every thread, no_new_privs with it),
    // NEW_LISTENER, TSYNC_ESRCH (which lets those two go together): 1 | 8 | 16.
    let lfd = b.call("seccomp", libc::SYS_seccomp, &[1, 1 | 8 | 16, fp])?;
    let pidfd = sys::pidfd_open(b.pid).map_err(|e| sys_err("pidfd_open", e))?;
    // SAFETY: pidfd_getfd on the process we build; the result is a new descriptor of ours.
    let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), lfd, 0) };
    if ours < 0 {
        return Err(sys_err(
            "taking the filter's listener",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh descriptor of ours.
    let listener = unsafe { OwnedFd::from_raw_fd(ours as i32) };
    b.r.call_through_filter("close of the listener", libc::SYS_close, &[lfd], &listener)?;
    Ok(listener)
}

/// Sets the registers (an interrupted system call made to restart), XSAVE area and
/// blocked signals a restored thread starts with.
pub(crate) fn final_state(tid: i32, regs: sys::Regs, xstate: &[u8], blocked: u64) -> Result<()> {
    sys::set_regs(tid, &threads::resume_regs(regs))?;
    sys::set_xstate(tid, xstate).map_err(|e| {
        Error::Unrestorable(format!("the FPU/AVX state does not fit this CPU ({e})"))
    })?;
    sys::set_sigmask(tid, blocked)
}

/// The first `syscall` instruction in the given ranges of `pid`'s memory.
pub(crate) fn syscall_insn_in(pid: i32, ranges: impl Iterator<Item = (u64, u64)>) -> Option<u64> {
    for (start, end) in ranges {
        let mut code = vec![0u8; (end - start).min(1 << 20) as usize];
        if sys::read_mem(pid, start, &mut code).unwrap_or(false) {
            if let Some(a) = find_syscall_insn(&code, start) {
                return Some(a);
            }
        }
    }
    None
}

/// Memory `v` that the process shares with others at its home (object `dev`, `ino`,
/// mapped from `offset`): at home, mapped from the deputy's descriptor of the object;
/// away, a stand-in (anonymous, named after the object) that a userfaultfd watches.
pub(crate) fn home_memory(
    b: &mut Builder,
    v: &crate::image::Vma,
    (dev, ino, offset): (u64, u64, u64),
) -> Result<()> {
    let len = v.end - v.start;
    match b.mode {
        Mode::Plain => Err(Error::Unrestorable(format!(
            "its memory at {:#x} is shared with processes at its home node: only a move can bring it back",
            v.start
        ))),
        Mode::Into(held) => {
            let fd = *held.get(&(dev, ino)).ok_or_else(|| {
                Error::Unrestorable(format!(
                    "its deputy does not hold the memory it shares at home (at {:#x})",
                    v.start
                ))
            })?;
            b.call(
                "mapping the memory it shares at home",
                libc::SYS_mmap,
                &[
                    v.start,
                    len,
                    v.prot as u64,
                    (libc::MAP_SHARED | libc::MAP_FIXED) as u64,
                    fd as u64,
                    offset,
                ],
            )?;
            Ok(())
        }
        Mode::Away(_) => {
            if b.home_uffd.is_none() {
                b.home_uffd = Some(make_uffd(b)?);
            }
            // An empty memfd of its size, named after the object, that nothing fills.
            let name = crate::homemem::placeholder_name(dev, ino, v.start.wrapping_sub(offset));
            let p = b.put_str(AT_STR, &name)?;
            let fd = b.call(
                "memfd_create",
                libc::SYS_memfd_create,
                &[p, libc::MFD_CLOEXEC as u64],
            )?;
            b.call("ftruncate", libc::SYS_ftruncate, &[fd, len])?;
            b.call(
                "mapping a stand-in for memory shared at home",
                libc::SYS_mmap,
                &[
                    v.start,
                    len,
                    v.prot as u64,
                    (libc::MAP_SHARED | libc::MAP_FIXED) as u64,
                    fd,
                    0,
                ],
            )?;
            b.call("close", libc::SYS_close, &[fd])?;
            Ok(())
        }
    }
}

/// A userfaultfd of the process being built (made by it while it still has the
/// restorer's privilege: one that also sees faults in the kernel's accesses), taken
/// here and closed there.
fn make_uffd(b: &mut Builder) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let fd = b.call(
        "userfaultfd",
        libc::SYS_userfaultfd,
        &[(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64],
    )?;
    let pidfd = sys::pidfd_open(b.pid).map_err(|e| sys_err("pidfd_open", e))?;
    // SAFETY: pidfd_getfd on the process we build; the result is a new descriptor of ours.
    let ours = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if ours < 0 {
        return Err(sys_err(
            "taking the userfaultfd",
            std::io::Error::last_os_error(),
        ));
    }
    b.call("close", libc::SYS_close, &[fd])?;
    // SAFETY: a fresh descriptor of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(ours as i32) })
}

/// Maps memory area `v` from descriptor `fd` at `offset`: shared as it was, or private
/// and writable (its own pages are written next, its protection set after).
pub(crate) fn map_file(
    b: &mut Builder,
    v: &crate::image::Vma,
    fd: u64,
    offset: u64,
    what: &str,
) -> Result<()> {
    let (prot, share) = if v.shared {
        (v.prot, libc::MAP_SHARED)
    } else {
        (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE)
    };
    b.call(
        what,
        libc::SYS_mmap,
        &[
            v.start,
            v.end - v.start,
            prot as u64,
            (share | libc::MAP_FIXED) as u64,
            fd,
            offset,
        ],
    )?;
    Ok(())
}

pub(crate) fn finish_memory(b: &mut Builder) -> Result<()> {
    for v in &b.img.vmas {
        if matches!(v.kind, VmaKind::Special(_)) || v.shared {
            continue;
        }
        if v.prot != libc::PROT_READ | libc::PROT_WRITE {
            b.call(
                "mprotect",
                libc::SYS_mprotect,
                &[v.start, v.end - v.start, v.prot as u64],
            )?;
        }
    }
    Ok(())
}

/// Sets the mm fields (PR_SET_MM_MAP); with `exe` also the exe link (the executable
/// opened as the user and checked).
pub(crate) fn set_mm(b: &mut Builder, exe: bool) -> Result<()> {
    let mm = &b.img.mm;
    let auxv: Vec<u8> = mm.auxv.iter().flat_map(|x| x.to_le_bytes()).collect();
    let auxv_addr = b.put(AT_AUXV, &auxv)?;
    // Opened (and checked) as the user in any case; the exe link is set only by root.
    // Inside the deputy, the exec made the link (and it was checked).
    let exe_fd = if matches!(b.mode, Mode::Into(_)) || !exe {
        u32::MAX
    } else {
        let exe = b.img.exe.clone();
        let want = b.img.exe_id.as_ref().map(|id| (id, true));
        let fd = b.open(&exe, libc::O_RDONLY | libc::O_CLOEXEC, want)?;
        if nix::unistd::geteuid().is_root() {
            fd as u32
        } else {
            b.call("close", libc::SYS_close, &[fd])?;
            u32::MAX
        }
    };
    let mut s: Vec<u8> = Vec::with_capacity(104);
    for x in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_addr,
    ] {
        s.extend_from_slice(&x.to_le_bytes());
    }
    s.extend_from_slice(&(auxv.len() as u32).to_le_bytes());
    s.extend_from_slice(&exe_fd.to_le_bytes());
    let p = b.put(AT_MM, &s)?;
    b.call(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[PR_SET_MM, PR_SET_MM_MAP, p, s.len() as u64, 0],
    )?;
    if exe_fd != u32::MAX {
        b.call("close", libc::SYS_close, &[exe_fd as u64])?;
    }
    Ok(())
}

pub(crate) fn restore_fds(b: &mut Builder) -> Result<()> {
    let fds = b.img.fds.clone();
    for std_fd in 0..3 {
        if !fds.iter().any(|f| f.fd == std_fd) {
            b.r.raw(libc::SYS_close, &[std_fd as u64])?;
        }
    }
    let made = fdobj::make(b, &fds)?;
    for f in &fds {
        match &f.kind {
            FdKind::Home { was } => match b.mode {
                Mode::Plain => {
                    return Err(Error::Unrestorable(format!(
                        "fd {} ({was}) is held at the process's home node: only a move can bring it back",
                        f.fd
                    )))
                }
                Mode::Into(_) => {
                    // The deputy's own (one the process no longer has is not there).
                    let cl = if f.cloexec { libc::FD_CLOEXEC } else { 0 };
                    b.r.raw(libc::SYS_fcntl, &[f.fd as u64, libc::F_SETFD as u64, cl as u64])?;
                }
                Mode::Away(a) => {
                    let tmp = match a.proc_fds.iter().find(|(n, _)| *n == f.fd) {
                        // A file of its own /proc where it ran: the same one here.
                        Some((_, rest)) => {
                            let p = b.put_str(AT_STR, &format!("/proc/self/{rest}"))?;
                            b.call(
                                &format!("opening /proc/self/{rest}"),
                                libc::SYS_openat,
                                &[libc::AT_FDCWD as u64, p, libc::O_RDONLY as u64, 0],
                            )?
                        }
                        None => {
                            let name = b.put_str(AT_STR, crate::shmem::PLACEHOLDER)?;
                            b.call("memfd_create", libc::SYS_memfd_create, &[name, 0])?
                        }
                    };
                    if tmp != f.fd as u64 {
                        let cl = if f.cloexec { libc::O_CLOEXEC } else { 0 };
                        b.call("dup3", libc::SYS_dup3, &[tmp, f.fd as u64, cl as u64])?;
                        b.call("close", libc::SYS_close, &[tmp])?;
                    }
                }
            },
            FdKind::Inherit { .. } => {
                if f.cloexec {
                    b.call(
                        "fcntl",
                        libc::SYS_fcntl,
                        &[f.fd as u64, libc::F_SETFD as u64, libc::FD_CLOEXEC as u64],
                    )?;
                }
            }
            FdKind::Epoll { .. } | FdKind::EventFd { .. } | FdKind::Pipe { .. } => {
                let cl = if f.cloexec { libc::O_CLOEXEC } else { 0 };
                b.call(
                    "dup3",
                    libc::SYS_dup3,
                    &[made[&f.fd], f.fd as u64, cl as u64],
                )?;
                if let FdKind::EventFd { flags, .. } | FdKind::Pipe { flags, .. } = &f.kind {
                    b.call(
                        "fcntl",
                        libc::SYS_fcntl,
                        &[f.fd as u64, libc::F_SETFL as u64, *flags as u64],
                    )?;
                }
            }
            FdKind::Memfd { ino, flags, pos } => {
                let fd = *b
                    .shm
                    .get(ino)
                    .ok_or_else(|| Error::BadImage(format!("fd {} of no shared object", f.fd)))?;
                let cl = if f.cloexec { libc::O_CLOEXEC } else { 0 };
                b.call("dup3", libc::SYS_dup3, &[fd, f.fd as u64, cl as u64])?;
                let fl = flags & (libc::O_APPEND | libc::O_NONBLOCK);
                b.call(
                    "fcntl",
                    libc::SYS_fcntl,
                    &[f.fd as u64, libc::F_SETFL as u64, fl as u64],
                )?;
                b.call(
                    "lseek",
                    libc::SYS_lseek,
                    &[f.fd as u64, *pos, libc::SEEK_SET as u64],
                )?;
            }
            FdKind::File {
                path,
                flags,
                pos,
                id,
            } => {
                let open_flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
                let tmp = b.open(path, open_flags, id.as_ref().map(|id| (id, false)))?;
                if tmp != f.fd as u64 {
                    let cl = if f.cloexec { libc::O_CLOEXEC } else { 0 };
                    b.call("dup3", libc::SYS_dup3, &[tmp, f.fd as u64, cl as u64])?;
                    b.call("close", libc::SYS_close, &[tmp])?;
                }
                if *pos != 0 {
                    b.call(
                        &format!("seeking in {path}"),
                        libc::SYS_lseek,
                        &[f.fd as u64, *pos, libc::SEEK_SET as u64],
                    )?;
                }
            }
        }
    }
    fdobj::finish(b, &fds, &made)?;
    Ok(())
}

pub(crate) fn restore_misc(b: &mut Builder) -> Result<()> {
    let m = b.img;
    if let Mode::Away(_) = b.mode {
        // A process group of its own under its supervisor (same session): not orphaned,
        // so a SIGTSTP passed on from home stops it as it would have at home.
        b.call("setpgid", libc::SYS_setpgid, &[0, 0])?;
    }
    let cwd = b.put_str(AT_STR, &m.cwd)?;
    if let Err(e) = b.call(&format!("chdir to {}", m.cwd), libc::SYS_chdir, &[cwd]) {
        // Away its working directory is its home's (every path it gives is resolved
        // there): a host without that directory is no reason to refuse it.
        if !matches!(b.mode, Mode::Away(_)) {
            return Err(e);
        }
        let root = b.put_str(AT_STR, "/")?;
        if b.call("chdir to /", libc::SYS_chdir, &[root]).is_err() {
            return Err(e);
        }
    }
    b.call("umask", libc::SYS_umask, &[m.umask as u64])?;
    b.call("personality", libc::SYS_personality, &[m.personality])?;
    let comm = b.put_str(AT_STR, &m.comm)?;
    b.call(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, comm],
    )?;
    if m.no_new_privs {
        b.call(
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::SYS_prctl,
            &[libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0],
        )?;
    }
    // Inside the deputy, the limits are the process's already: an exec keeps them, and a
    // change it made away was made at home too.
    let rlimits: &[(u32, u64, u64)] = if matches!(b.mode, Mode::Into(_)) {
        &[]
    } else {
        &m.rlimits
    };
    for &(res, cur, max) in rlimits {
        if let Err(e) = sys::setrlimit(b.pid, res, cur, max) {
            // Raising a hard limit needs CAP_SYS_RESOURCE: keep ours, and say so.
            let (_, our_max) = sys::getrlimit(b.pid, res)?;
            sys::setrlimit(b.pid, res, cur.min(our_max), max.min(our_max))
                .map_err(|e2| sys_err(format!("setting resource limit {res}"), e2))?;
            tracing::warn!("resource limit {res} lowered to {our_max}: {e}");
        }
    }
    if let Some(rs) = &m.rseq {
        b.call(
            "rseq",
            libc::SYS_rseq,
            &[rs.addr, rs.len as u64, 0, rs.sig as u64],
        )?;
    }
    if m.robust_list.0 != 0 {
        b.call(
            "set_robust_list",
            libc::SYS_set_robust_list,
            &[m.robust_list.0, m.robust_list.1],
        )?;
    }
    b.call(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[m.clear_child_tid],
    )?;
    Ok(())
}

pub(crate) fn restore_signals(b: &mut Builder) -> Result<()> {
    let m = b.img;
    // In runs of calls from the work area ([`Remote::batch`]): the actions, altstack and
    // timers, then the pending signals, in order.
    let mut calls: Vec<(i64, Vec<u8>, [u64; 6], &str)> = Vec::new();
    // (SIGTRAP's action last, alone: a batch ends on a breakpoint, whose SIGTRAP would
    // reset an action that ignores it.)
    let mut trap = None;
    for signo in 1..=64i32 {
        if signo == libc::SIGKILL || signo == libc::SIGSTOP {
            continue;
        }
        let sa = m.sigactions.iter().find(|s| s.signo == signo);
        let mut buf = Vec::with_capacity(32);
        for x in sa.map_or([0; 4], |s| [s.handler, s.flags, s.restorer, s.mask]) {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        if signo == libc::SIGTRAP {
            trap = Some(buf);
            continue;
        }
        // (Argument 1 is the data's address, filled in by `run_batch`.)
        calls.push((
            libc::SYS_rt_sigaction,
            buf,
            [signo as u64, 0, 0, 8, 0, 0],
            "rt_sigaction",
        ));
    }
    let (sp, flags, size) = m.sigaltstack;
    if flags & libc::SS_DISABLE == 0 {
        let mut buf = Vec::new();
        buf.extend_from_slice(&sp.to_le_bytes());
        buf.extend_from_slice(&(flags as i64).to_le_bytes());
        buf.extend_from_slice(&size.to_le_bytes());
        calls.push((libc::SYS_sigaltstack, buf, [0; 6], "sigaltstack"));
    }
    for (which, t) in m.itimers.iter().enumerate() {
        if t.iter().all(|&x| x == 0) {
            continue;
        }
        let buf: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
        calls.push((
            libc::SYS_setitimer,
            buf,
            [which as u64, 0, 0, 0, 0, 0],
            "setitimer",
        ));
    }
    run_batch(b, &calls)?;
    let mut queued = Vec::new();
    for s in &m.pending {
        if s.siginfo.len() != 128 {
            return Err(Error::BadImage("pending signal of wrong size".into()));
        }
        let signo = i32::from_le_bytes(s.siginfo[..4].try_into().expect("4 bytes"));
        queued.push(if s.shared {
            (
                libc::SYS_rt_sigqueueinfo,
                s.siginfo.clone(),
                [b.own as u64, signo as u64, 0, 0, 0, 0],
                "rt_sigqueueinfo",
            )
        } else {
            (
                libc::SYS_rt_tgsigqueueinfo,
                s.siginfo.clone(),
                [b.own as u64, b.own as u64, signo as u64, 0, 0, 0],
                "rt_tgsigqueueinfo",
            )
        });
    }
    for chunk in queued.chunks(16) {
        run_batch(b, chunk)?;
    }
    if let Some(buf) = trap {
        let p = b.put(AT_MISC, &buf)?;
        b.call(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[libc::SIGTRAP as u64, p, 0, 8],
        )?;
    }
    Ok(())
}

/// Runs `calls` in one go from the work area: each (number, data, arguments, what), the
/// data put in the work area and its address passed as the argument that is 0 where the
/// call takes a pointer (argument 1 for rt_sigaction, 0 for sigaltstack, 1 for
/// setitimer, 2 for rt_sigqueueinfo, 3 for rt_tgsigqueueinfo). Any failure is an error
/// naming the call.
fn run_batch(b: &mut Builder, calls: &[(i64, Vec<u8>, [u64; 6], &str)]) -> Result<()> {
    use crate::remote::{BATCH_CODE, BATCH_ENTRY};
    let code = b.put(AT_BATCH, &BATCH_CODE)?;
    let table = b.scratch + AT_BATCH + 0x100;
    if 0x100 + calls.len() as u64 * BATCH_ENTRY > AT_BATCH_DATA - AT_BATCH {
        return Err(Error::Unrestorable(
            "too many calls for the work area".into(),
        ));
    }
    let mut data: Vec<u8> = Vec::new();
    let mut list = Vec::with_capacity(calls.len());
    for (nr, bytes, args, _) in calls {
        let at = b.scratch + AT_BATCH_DATA + data.len() as u64;
        data.extend_from_slice(bytes);
        data.resize(data.len().div_ceil(8) * 8, 0);
        let mut a = *args;
        let slot = match *nr {
            libc::SYS_sigaltstack => 0,
            libc::SYS_rt_sigqueueinfo => 2,
            libc::SYS_rt_tgsigqueueinfo => 3,
            _ => 1,
        };
        a[slot] = at;
        list.push((*nr, a));
    }
    if AT_BATCH_DATA + data.len() as u64 > AT_STR {
        return Err(Error::Unrestorable(
            "too much data for the work area".into(),
        ));
    }
    b.put(AT_BATCH_DATA, &data)?;
    // Everything but SIGTRAP blocked meanwhile (the batch ends on a breakpoint: its
    // SIGTRAP, blocked, would be unblocked and its action reset).
    let trap = 1u64 << (libc::SIGTRAP - 1);
    sys::set_sigmask(b.r.pid, !trap)?;
    let got = b.r.batch(code, table, &list);
    sys::set_sigmask(b.r.pid, !0u64)?;
    let got = got?;
    for (g, c) in got.iter().zip(calls) {
        if (-4095..0).contains(g) {
            return Err(Error::Remote {
                pid: b.pid,
                what: c.3.to_string(),
                errno: (-g) as i32,
            });
        }
    }
    Ok(())
}
