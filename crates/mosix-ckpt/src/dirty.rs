//! Dirty-page tracking of a running process (this kernel has no soft-dirty bits).
//!
//! A userfaultfd of the process's own memory (made inside it by an injected call, taken
//! with pidfd_getfd, its descriptor there closed at once: nothing of it stays in the
//! process's descriptor table) is set up in asynchronous write-protect mode
//! (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED). Areas registered with it
//! (UFFDIO_REGISTER_MODE_WP) are then scanned from outside with the PAGEMAP_SCAN ioctl on
//! /proc/PID/pagemap: `PM_SCAN_WP_MATCHING` reports the pages written since the last
//! scan (`PAGE_IS_WRITTEN`: their write-protection is gone) and protects them again in
//! the same walk, so the next scan finds exactly the pages written in between. A write to
//! a protected page costs the process a minor fault that the kernel resolves by itself:
//! nothing waits for us, and nothing the process can see changes but its smaps VmFlags
//! ("uw") while it is tracked. Dropping the [`Tracker`] closes the last reference to the
//! userfaultfd, which unregisters every area and clears the protection.
//!
//! Writes the kernel makes for the process (read(2) into its buffers) and writes through
//! /proc/PID/mem or process_vm_writev fault like its own and are seen. Not seen: a device
//! writing by DMA into a page pinned before a scan (an O_DIRECT read in flight across a
//! scan); a frozen final pass is not affected (nothing is in flight then).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::dump::{self, Frozen};
use crate::error::{sys_err, Error, Result};
use crate::procfs;
use crate::remote::Remote;
use crate::sys::{self, PageRegion, ScanArgs, PAGE};

/// PAGEMAP_SCAN page categories (include/uapi/linux/fs.h).
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Highest user address (x86_64, 4-level paging).
const TASK_SIZE: u64 = 0x7fff_ffff_f000;
/// Regions asked for per PAGEMAP_SCAN call.
const ROOM: usize = 4096;

/// Tracks the pages a process writes. See the module documentation.
pub struct Tracker {
    pid: i32,
    uffd: OwnedFd,
    pagemap: File,
    /// No other reference to the userfaultfd: closing ours unregisters everything.
    alone: bool,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tracker(pid {})", self.pid)
    }
}

fn unsupported(e: std::io::Error) -> Error {
    Error::Unrestorable(format!(
        "this kernel cannot track written pages (userfaultfd write protection in async mode): {e}"
    ))
}

/// Checks that `fd` is a userfaultfd (its /proc/self/fd link names one).
pub fn check_userfaultfd(fd: &OwnedFd) -> Result<()> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| sys_err("reading the link of the tracking descriptor", e))?;
    if link.as_os_str() != "anon_inode:[userfaultfd]" {
        return Err(Error::Unrestorable(format!(
            "the descriptor kept for tracking its writes is not a userfaultfd but {}",
            link.display()
        )));
    }
    Ok(())
}

impl Tracker {
    /// Starts tracking running process `pid` (nothing registered yet): it is frozen only
    /// for the two system calls injected into it.
    pub fn attach(pid: i32) -> Result<Tracker> {
        let mut f = dump::freeze(pid)?;
        let r = Self::arm(&mut f);
        let released = f.release();
        let t = r?;
        released?;
        Ok(t)
    }

    /// Starts tracking frozen process `f`: a userfaultfd made inside it, taken, and its
    /// descriptor there closed again; the process's registers are as they were after.
    pub(crate) fn arm(f: &mut Frozen) -> Result<Tracker> {
        let pid = f.pid;
        if f.syscall_ip.is_none() {
            dump::find_syscall(f, &procfs::maps(pid)?)?;
        }
        let mut r = f.remote_of(0)?;
        let made = make_raw(&mut r, None);
        f.tasks[0].held.append(&mut r.held);
        sys::set_regs(pid, &f.main().regs)?;
        let mut t = Self::adopt(pid, made?)?;
        t.alone = true;
        Ok(t)
    }

    /// Tracks `pid` with `uffd`, a userfaultfd of its memory not yet set up (made in it
    /// by someone else, e.g. its restorer).
    pub fn adopt(pid: i32, uffd: OwnedFd) -> Result<Tracker> {
        set_up(uffd.as_fd())?;
        Self::adopt_ready(pid, uffd)
    }

    /// Tracks `pid` with `uffd`, a userfaultfd of its memory set up already
    /// ([`set_up`]). Whatever is registered with it is unregistered when the tracker
    /// is dropped.
    pub fn adopt_ready(pid: i32, uffd: OwnedFd) -> Result<Tracker> {
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| sys_err("opening the page map", e))?;
        Ok(Tracker {
            pid,
            uffd,
            pagemap,
            alone: false,
        })
    }

    /// The process's PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn uffd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    /// Tracks [start, end) (whole mappings of the process, or parts of them) from now
    /// on. Its pages count as written until they are protected by a scan; an area
    /// registered earlier (by another tracker of the same userfaultfd, e.g. a mover
    /// that died) may hold protected pages not written since: save it first with
    /// [`Tracker::whole`], never with [`Tracker::written`].
    pub fn register(&self, start: u64, end: u64) -> Result<()> {
        sys::uffd_register_wp(self.uffd.as_raw_fd(), start, end - start)
            .map_err(|e| sys_err(format!("tracking memory at {start:#x}-{end:#x}"), e))
    }

    /// Stops tracking [start, end).
    pub fn unregister(&self, start: u64, end: u64) -> Result<()> {
        sys::uffd_unregister(self.uffd.as_raw_fd(), start, end - start)
            .map_err(|e| sys_err(format!("untracking memory at {start:#x}-{end:#x}"), e))
    }

    /// Runs one scan over [start, end) to its end.
    fn scan(&self, a: ScanArgs, out: &mut Vec<PageRegion>) -> std::io::Result<()> {
        let mut a = a;
        while a.start < a.end {
            let before = out.len();
            let walked = sys::pagemap_scan(self.pagemap.as_raw_fd(), &a, out, ROOM)?;
            if walked <= a.start && out.len() == before {
                break;
            }
            a.start = walked.max(a.start);
        }
        // Regions next to each other with the same categories are one.
        let mut merged: Vec<PageRegion> = Vec::with_capacity(out.len());
        for r in out.drain(..) {
            match merged.last_mut() {
                Some(l) if l.end == r.start && l.categories == r.categories => l.end = r.end,
                _ => merged.push(r),
            }
        }
        *out = merged;
        Ok(())
    }

    /// The ranges now registered with this tracker (areas the process mapped, remapped
    /// or replaced since are not).
    pub fn registered(&self) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        let a = ScanArgs {
            start: 0,
            end: TASK_SIZE,
            category_anyof_mask: PAGE_IS_WPALLOWED,
            return_mask: PAGE_IS_WPALLOWED,
            ..Default::default()
        };
        self.scan(a, &mut out)
            .map_err(|e| sys_err("scanning the page map", e))?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for r in out {
            match ranges.last_mut() {
                Some(l) if l.1 == r.start => l.1 = r.end,
                _ => ranges.push((r.start, r.end)),
            }
        }
        Ok(ranges)
    }

    /// The pages of [start, end) that were written since they were last protected (by
    /// this call or [`Tracker::whole`]) and hold memory of their own (present or swapped out, not
    /// pages of a file still as they are in the file), protected again. Regions carry
    /// PAGE_IS_PRESENT / _SWAPPED / _PFNZERO. `Ok(None)` if part of the range is no
    /// longer registered (it was remapped). A page given back (MADV_DONTNEED) is not
    /// written: see [`Tracker::saved`].
    pub fn written(&self, start: u64, end: u64) -> Result<Option<Vec<PageRegion>>> {
        let mut out = Vec::new();
        // Holes are left alone (protecting them would make markers, which look swapped).
        let a = ScanArgs {
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start,
            end,
            category_mask: PAGE_IS_WRITTEN | PAGE_IS_FILE,
            category_inverted: PAGE_IS_FILE,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
            ..Default::default()
        };
        match self.scan(a, &mut out) {
            Ok(()) => Ok(Some(out)),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(None),
            Err(e) => Err(sys_err("scanning for written pages", e)),
        }
    }

    /// Every page of [start, end) that holds memory of the process's own (present or
    /// swapped out, not pages of a file still as they are in the file), written or not,
    /// protected first: for memory to be saved whole (new at the receiver, or whose
    /// earlier copies there are dropped). The protection is set again in the same walk
    /// that lists the pages, so a page written after it is listed is found written by
    /// the next [`Tracker::written`]; pages protected long ago and not written since are
    /// listed too (which [`Tracker::written`] would leave out). `anon`: anonymous memory
    /// (else a private mapping of a file, where page-table markers are told from pages
    /// by their pagemap entries). Regions carry PAGE_IS_PRESENT / _SWAPPED / _PFNZERO.
    /// `Ok(None)` if part of the range is no longer registered.
    pub fn whole(&self, start: u64, end: u64, anon: bool) -> Result<Option<Vec<PageRegion>>> {
        let mut out = Vec::new();
        let a = ScanArgs {
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            start,
            end,
            category_mask: PAGE_IS_FILE,
            category_inverted: PAGE_IS_FILE,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO,
            ..Default::default()
        };
        match self.scan(a, &mut out) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Ok(None),
            Err(e) => return Err(sys_err("scanning for the pages to save", e)),
        }
        if anon || out.is_empty() {
            return Ok(Some(out));
        }
        // A marker looks swapped to PAGEMAP_SCAN: keep only what is the process's own.
        let own = saved_pages(&self.pagemap, start, end, false)?;
        let mut kept = Vec::with_capacity(out.len());
        for r in out {
            let i = own.partition_point(|o| o.1 <= r.start);
            for &(s, e) in own[i..].iter().take_while(|o| o.0 < r.end) {
                kept.push(PageRegion {
                    start: s.max(r.start),
                    end: e.min(r.end),
                    categories: r.categories,
                });
            }
        }
        Ok(Some(kept))
    }

    /// The runs of pages of [start, end) that hold memory of the process's own (see
    /// [`saved_pages`]); tracking is not touched.
    pub fn saved(&self, start: u64, end: u64, anon: bool) -> Result<Vec<(u64, u64)>> {
        saved_pages(&self.pagemap, start, end, anon)
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        // Another reference to the userfaultfd (a restorer's) would keep it registered.
        if self.alone {
            return;
        }
        if let Ok(ranges) = self.registered() {
            for (s, e) in ranges {
                let _ = self.unregister(s, e);
            }
        }
    }
}

/// Makes a userfaultfd of the memory of stopped tracee `r.pid` by a call injected into
/// it (let through its seccomp filter with `listener` if it has one), takes it, and
/// closes its descriptor there again. Not set up yet.
fn make_raw(r: &mut Remote, listener: Option<&OwnedFd>) -> Result<OwnedFd> {
    let pid = r.pid;
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | UFFD_USER_MODE_ONLY;
    let call = |r: &mut Remote, what: &str, nr: i64, args: &[u64]| match listener {
        Some(l) => r.call_through_filter(what, nr, args, l),
        None => r.call(what, nr, args),
    };
    let fd = call(r, "userfaultfd", libc::SYS_userfaultfd, &[flags]).map_err(|e| match e {
        Error::Remote { errno, .. } if errno == libc::ENOSYS => {
            unsupported(std::io::Error::from_raw_os_error(errno))
        }
        Error::Remote { errno, .. } => Error::Unrestorable(format!(
            "no userfaultfd could be made in it to track its writes: {}",
            std::io::Error::from_raw_os_error(errno)
        )),
        e => e,
    })?;
    let taken = sys::pidfd_open(pid)
        .and_then(|p| sys::pidfd_getfd(p.as_raw_fd(), fd as i32))
        .map_err(|e| sys_err("taking the userfaultfd", e));
    let closed = call(r, "close of the userfaultfd", libc::SYS_close, &[fd]);
    let uffd = taken?;
    closed?;
    Ok(uffd)
}

/// [`make_raw`], set up for tracking: for a process being restored, whose restorer keeps
/// it for a later move ([`Tracker::adopt_ready`]).
pub(crate) fn make_in(r: &mut Remote, listener: Option<&OwnedFd>) -> Result<OwnedFd> {
    let u = make_raw(r, listener)?;
    set_up(u.as_fd())?;
    Ok(u)
}

/// Sets up userfaultfd `uffd` for tracking (asynchronous write protection).
pub fn set_up(uffd: BorrowedFd<'_>) -> Result<()> {
    let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
    let have = sys::uffd_api(uffd.as_raw_fd(), want).map_err(|e| match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => unsupported(e),
        _ => sys_err("setting up the userfaultfd for tracking", e),
    })?;
    if have & want != want {
        return Err(unsupported(std::io::Error::from_raw_os_error(
            libc::EOPNOTSUPP,
        )));
    }
    Ok(())
}

/// /proc/PID/pagemap bits.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// The swap type of a page-table marker (e.g. a write-protected hole): not a page.
const SWP_PTE_MARKER: u64 = 31;

/// The runs (start, end) of pages of [start, end) that hold memory of the process's own,
/// what a checkpoint saves: in anonymous memory (`anon`) the pages present or swapped
/// out but not the shared zero page; in a private mapping of a file, the pages that are
/// no longer the file's (written: copied on write), present or swapped out. `pagemap` is
/// the process's /proc/PID/pagemap.
pub fn saved_pages(pagemap: &File, start: u64, end: u64, anon: bool) -> Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut push = |s: u64, e: u64| match runs.last_mut() {
        Some(l) if l.1 == s => l.1 = e,
        _ => runs.push((s, e)),
    };
    if anon {
        // In anonymous memory nothing of ours makes markers: "swapped" is swapped.
        let mut out = Vec::new();
        let mut a = ScanArgs {
            start,
            end,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PFNZERO,
            ..Default::default()
        };
        while a.start < a.end {
            let before = out.len();
            let walked = sys::pagemap_scan(pagemap.as_raw_fd(), &a, &mut out, ROOM)
                .map_err(|e| sys_err("scanning the page map", e))?;
            if walked <= a.start && out.len() == before {
                break;
            }
            a.start = walked.max(a.start);
        }
        for r in out {
            if r.categories & PAGE_IS_PFNZERO == 0 {
                push(r.start, r.end);
            }
        }
    } else {
        // PAGEMAP_SCAN tells a swapped page from a marker in neither category: the
        // entries do (a marker's swap type is its own).
        let entries = procfs::pagemap(pagemap, start, end)?;
        for (i, e) in entries.iter().enumerate() {
            let own = e & PM_FILE == 0
                && (e & PM_PRESENT != 0 || (e & PM_SWAP != 0 && e & 0x1f != SWP_PTE_MARKER));
            if own {
                let a = start + i as u64 * PAGE;
                push(a, a + PAGE);
            }
        }
    }
    Ok(runs)
}

/// Pages in a region.
pub fn pages(r: &PageRegion) -> u64 {
    (r.end - r.start) / PAGE
}
