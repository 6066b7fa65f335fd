//! Memory put in while the process runs (docs/checkpoint.md, "Memory after the start"):
//! a process rebuilt inside its deputy (coming home) gets its private anonymous memory
//! after it was made, not before, so that it is frozen for its state only, not for a copy
//! of all its memory into fresh pages.
//!
//! A userfaultfd of its memory is made inside it (from /dev/userfaultfd, opened here and
//! handed over, so that faults of the kernel on its behalf are seen too, whoever it runs
//! as); its areas are registered for missing pages; a thread of ours puts every page of
//! the image in (UFFDIO_COPY), first those it touches (each fault is answered at once with
//! the pages around it), the rest in the background, until none is left. What it does
//! meanwhile is followed: a fork gives its child the pages still to come (the kernel
//! gives us the child's userfaultfd), an mremap moves them, a munmap or MADV_DONTNEED
//! drops them (a page it gave back reads as zeros, as it would).
//!
//! The process keeps a descriptor of the userfaultfd until every page is in (then closed
//! in it, with a short stop): should the thread filling it die first, its faults wait
//! instead of reading zeros where its memory was.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{sys_err, Error, Result};
use crate::image::{ProcessImage, VmaKind, ADVICE_DONTFORK, ADVICE_HUGEPAGE, ADVICE_WIPEONFORK};
use crate::read::LoadedImage;
use crate::restore::Builder;
use crate::sys::{self, PAGE};

/// Set (to anything) in the environment of the restorer: pages are put in only when they
/// are touched, never in the background, and the fill ends with the process. For tests:
/// what the process does right after it starts then surely happens during its fill.
pub const ENV_TEST_ON_FAULT_ONLY: &str = "MOSIX_TEST_FILL_ON_FAULT_ONLY";

/// Bytes put in per background copy.
const BATCH: u64 = 1 << 20;
/// Bytes put in at a fault: its page and those after it in the same run.
const AROUND: u64 = 64 << 10;

/// Pages still to put in, by address: start -> (length, offset of their bytes in the
/// image's body). Runs do not overlap. No I/O.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pending {
    runs: BTreeMap<u64, (u64, usize)>,
}

impl Pending {
    pub(crate) fn insert(&mut self, start: u64, len: u64, off: usize) {
        if len > 0 {
            self.runs.insert(start, (len, off));
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.runs.values().map(|r| r.0).sum()
    }

    /// Takes [start, end) out: the pieces that were pending there, by address.
    pub(crate) fn take(&mut self, start: u64, end: u64) -> Vec<(u64, u64, usize)> {
        let mut hit = Vec::new();
        if start < end {
            for (&s, &(len, off)) in self.runs.range(..end).rev() {
                if s + len <= start {
                    break;
                }
                hit.push((s, len, off));
            }
        }
        let mut out = Vec::with_capacity(hit.len());
        for (s, len, off) in hit.into_iter().rev() {
            self.runs.remove(&s);
            let e = s + len;
            let (a, b) = (s.max(start), e.min(end));
            self.insert(s, a - s, off);
            self.insert(b, e - b, off + (b - s) as usize);
            out.push((a, b - a, off + (a - s) as usize));
        }
        out
    }

    /// Takes out the pieces whose bytes are at offsets [start, end) (wherever they are
    /// now): (address, length, offset), by address.
    pub(crate) fn take_offsets(&mut self, start: usize, end: usize) -> Vec<(u64, u64, usize)> {
        let hit: Vec<(u64, u64, usize)> = self
            .runs
            .iter()
            .filter(|(_, &(len, off))| off < end && start < off + len as usize)
            .map(|(&a, &(len, off))| (a, len, off))
            .collect();
        let mut out = Vec::with_capacity(hit.len());
        for (a, len, off) in hit {
            let (lo, hi) = (off.max(start), (off + len as usize).min(end));
            let from = a + (lo - off) as u64;
            out.extend(self.take(from, from + (hi - lo) as u64));
        }
        out
    }

    /// Whether the page at `addr` is pending.
    pub(crate) fn contains(&self, addr: u64) -> bool {
        let page = addr & !(PAGE - 1);
        self.runs
            .range(..=page)
            .next_back()
            .is_some_and(|(&s, &(len, _))| page < s + len)
    }

    /// The first `max` bytes of the first run.
    pub(crate) fn next(&mut self, max: u64) -> Option<(u64, u64, usize)> {
        let (&s, &(len, _)) = self.runs.iter().next()?;
        self.take(s, s + len.min(max)).pop()
    }

    /// At a fault on `addr`: its page and those after it in its run, `max` bytes at most;
    /// None if its page is not pending.
    pub(crate) fn at(&mut self, addr: u64, max: u64) -> Option<(u64, u64, usize)> {
        let page = addr & !(PAGE - 1);
        let (&s, &(len, _)) = self.runs.range(..=page).next_back()?;
        if s + len <= page {
            return None;
        }
        self.take(page, (s + len).min(page + max)).pop()
    }

    /// The memory at [from, from+len) moved to `to` (mremap); what was pending at `to`
    /// before is gone (the move unmapped it).
    pub(crate) fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.take(from, from + len);
        self.take(to, to + len);
        for (a, l, off) in moved {
            self.insert(to + (a - from), l, off);
        }
    }
}

/// What [`split`] says: the areas (start, end), the pages that wait, the pages put in
/// first (address, offset, length).
pub(crate) type Split = (Vec<(u64, u64)>, Pending, Vec<(u64, usize, usize)>);

/// Which of the image's pages wait for the process to run: those of its private anonymous
/// areas that a child forked meanwhile would get as they are (no MADV_DONTFORK or
/// MADV_WIPEONFORK) and that do not ask for huge pages (MADV_HUGEPAGE). The areas (start, end) and the pages in them; the other pages are
/// returned as (address, offset, length), to be put in before it runs.
pub(crate) fn split(m: &ProcessImage, runs: &[(u64, usize, usize)]) -> Split {
    // Put in first: areas a child forked meanwhile would not get as they are, and those
    // that want huge pages (UFFDIO_COPY puts small pages in; written first, they are
    // made of huge pages, as the process had them).
    let fork_kept = |start: u64| {
        !m.advice.iter().any(|&(a, bits)| {
            a == start && bits & (ADVICE_DONTFORK | ADVICE_WIPEONFORK | ADVICE_HUGEPAGE) != 0
        })
    };
    let mut areas: Vec<(u64, u64)> = m
        .vmas
        .iter()
        .filter(|v| v.kind == VmaKind::Anon && !v.shared && fork_kept(v.start))
        .map(|v| (v.start, v.end))
        .collect();
    areas.sort();
    let mut later = Pending::default();
    let mut now = Vec::new();
    for &(vaddr, off, len) in runs {
        let (mut a, end) = (vaddr, vaddr + len as u64);
        while a < end {
            let i = areas.partition_point(|&(_, e)| e <= a);
            match areas.get(i) {
                Some(&(s, e)) if s <= a => {
                    let b = e.min(end);
                    later.insert(a, b - a, off + (a - vaddr) as usize);
                    a = b;
                }
                next => {
                    let b = next.map_or(end, |&(s, _)| s.min(end));
                    now.push((a, off + (a - vaddr) as usize, (b - a) as usize));
                    a = b;
                }
            }
        }
    }
    (areas, later, now)
}

/// What a fill did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filled {
    /// Bytes put in.
    pub bytes: u64,
    /// Faults answered (pages it touched before they were in).
    pub faults: u64,
    /// Children it forked meanwhile (filled too).
    pub forks: u64,
    /// Bytes whose memory went away before they were put in (unmapped, given back, or
    /// its process ended).
    pub dropped: u64,
    /// From the start of the fill to its end.
    pub took: Duration,
}

/// A fill under way (see the module documentation).
pub struct Filling {
    pid: i32,
    /// The process's own descriptor of the userfaultfd.
    its_fd: i32,
    stop: Arc<AtomicBool>,
    /// The fill's figures once all is in (the thread then goes on reading what the
    /// userfaultfd says until it is told to stop: an event of the process that came as
    /// its areas were unregistered waits for a reader, and it could not be stopped for
    /// the close of its descriptor meanwhile).
    done: std::sync::mpsc::Receiver<Filled>,
    /// The figures, once taken from `done`.
    got: std::cell::Cell<Option<Filled>>,
    /// (thread, signal) to tell when all is in: see [`Filling::wake_on_done`].
    wake: Arc<std::sync::Mutex<Option<(i32, i32)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Filling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Filling(pid {})", self.pid)
    }
}

impl Filling {
    /// Waits until every page is in, then closes the process's descriptor of the
    /// userfaultfd (it is stopped a moment for that). Call from a thread that may trace it.
    pub fn finish(self) -> Filled {
        self.finish_reaping().0
    }

    /// [`Filling::finish`], for the process's parent: how the process ended, if it did
    /// while it was stopped for the close (its wait status was taken then).
    pub fn finish_reaping(self) -> (Filled, Option<sys::Stop>) {
        let Some(filled) = self.got.take().or_else(|| self.done.recv().ok()) else {
            // The thread is gone without its figures (it panicked): what is not in will
            // never be; the process must not go on with zeros there (it would only wait
            // while it holds the userfaultfd, and it could close it).
            tracing::error!(pid = self.pid, "its memory could not all be put in: ended");
            let _ = sys::kill(self.pid, libc::SIGKILL);
            return (Filled::default(), None);
        };
        match close_in(self.pid, self.its_fd) {
            Ok(ended) => (filled, ended),
            Err(e) => {
                tracing::warn!(pid = self.pid, "its userfaultfd stays open in it: {e}");
                (filled, None)
            }
        }
    }

    /// Whether all of its memory is in ([`Filling::finish`] then does not wait).
    pub fn is_done(&self) -> bool {
        if self.got.get().is_some() {
            return true;
        }
        match self.done.try_recv() {
            Ok(f) => {
                self.got.set(Some(f));
                true
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => false,
            // Gone without its figures: finish says so.
            Err(std::sync::mpsc::TryRecvError::Disconnected) => true,
        }
    }

    /// Once all is in, signal `sig` goes to thread `tid` of this process (one that waits
    /// for signals can then finish the fill). If it is all in already, none goes: look at
    /// [`Filling::is_done`] after this.
    pub fn wake_on_done(&self, tid: i32, sig: i32) {
        if let Ok(mut w) = self.wake.lock() {
            *w = Some((tid, sig));
        }
    }

    /// Stops filling (the process is being made something else: its memory goes).
    pub fn abandon(self) {}
}

impl Drop for Filling {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes a userfaultfd inside process `b.pid` (from /dev/userfaultfd, opened here and
/// handed over, so that the kernel's faults on its behalf are seen too, whoever it runs
/// as), with the events a fill follows: ours, and its number in the process (out of the
/// way of its own descriptors). On failure nothing is left in it.
pub(crate) fn make_uffd(b: &mut Builder) -> Result<(OwnedFd, i32)> {
    let pid = b.pid;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|e| sys_err("opening /dev/userfaultfd", e))?;
    let given = crate::away::give_fds(&mut b.r, pid, &[dev.as_raw_fd()], "a userfaultfd")?;
    let dev_there = given[0] as u64;
    let made = b.r.call(
        "ioctl(USERFAULTFD_IOC_NEW)",
        libc::SYS_ioctl,
        &[
            dev_there,
            sys::USERFAULTFD_IOC_NEW,
            (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
        ],
    );
    let _ = b.r.raw(libc::SYS_close, &[dev_there]);
    let made = made?;
    let its_fd = match crate::away::out_of_the_way(&mut b.r, pid, vec![made as i32], true) {
        Ok(n) => n[0],
        Err(e) => {
            let _ = b.r.raw(libc::SYS_close, &[made]);
            return Err(e);
        }
    };
    let close_there = |b: &mut Builder| {
        let _ = b.r.raw(libc::SYS_close, &[its_fd as u64]);
    };
    let ours = match sys::pidfd_open(pid).and_then(|p| sys::pidfd_getfd(p.as_raw_fd(), its_fd)) {
        Ok(u) => u,
        Err(e) => {
            close_there(b);
            return Err(sys_err("taking its userfaultfd", e));
        }
    };
    let features = sys::UFFD_FEATURE_EVENT_FORK
        | sys::UFFD_FEATURE_EVENT_REMAP
        | sys::UFFD_FEATURE_EVENT_REMOVE
        | sys::UFFD_FEATURE_EVENT_UNMAP;
    if let Err(e) = sys::uffd_api(ours.as_raw_fd(), features) {
        close_there(b);
        return Err(sys_err("setting its userfaultfd up", e));
    }
    Ok((ours, its_fd))
}

/// Starts filling process `b.pid` (stopped, its memory laid out as its image says):
/// `pending` in `areas`, from `img`'s body. Pages of areas that cannot be registered are
/// put in now. Err: nothing was registered (the caller puts everything in itself).
pub(crate) fn start(
    b: &mut Builder,
    img: Arc<LoadedImage>,
    mut pending: Pending,
    areas: &[(u64, u64)],
) -> Result<Filling> {
    let pid = b.pid;
    let (ours, its_fd) = make_uffd(b)?;
    let close_there = |b: &mut Builder| {
        let _ = b.r.raw(libc::SYS_close, &[its_fd as u64]);
    };
    let mut registered = Vec::new();
    let mut now: Vec<(u64, u64, usize)> = Vec::new();
    for &(s, e) in areas {
        match sys::uffd_register_missing(ours.as_raw_fd(), s, e - s) {
            Ok(()) => registered.push((s, e - s)),
            Err(err) => {
                tracing::debug!(pid, "area {s:#x}-{e:#x} filled before it runs: {err}");
                now.extend(pending.take(s, e));
            }
        }
    }
    if registered.is_empty() {
        close_there(b);
        return Err(Error::Unrestorable(
            "none of its memory could be registered with its userfaultfd".into(),
        ));
    }
    // From here a failure leaves nothing registered: the caller then puts every page in
    // itself, and a write into a registered page would wait for us.
    let undo = |b: &mut Builder, registered: &[(u64, u64)], e: Error| {
        for &(s, len) in registered {
            let _ = sys::uffd_unregister(ours.as_raw_fd(), s, len);
        }
        close_there(b);
        e
    };
    let body = img.body();
    let parts: Vec<(u64, &[u8])> = now
        .iter()
        .map(|&(a, len, off)| (a, &body[off..off + len as usize]))
        .collect();
    if let Err(e) = sys::write_mem_many(pid, &parts) {
        return Err(undo(b, &registered, e));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (keep, kept) = match ours.try_clone() {
        Ok(k) => (k, registered.clone()),
        Err(e) => {
            return Err(undo(
                b,
                &registered,
                sys_err("duplicating its userfaultfd", e),
            ))
        }
    };
    let first = Target {
        uffd: ours,
        pending,
        registered,
    };
    let flag = stop.clone();
    let (tell, done) = std::sync::mpsc::channel();
    let wake = Arc::new(std::sync::Mutex::new(None::<(i32, i32)>));
    let waker = wake.clone();
    let cpus = crate::cpu::original();
    let thread = std::thread::Builder::new()
        .name("mosix-fill".into())
        .spawn(move || {
            crate::cpu::free(cpus);
            let targets = fill(&img, pid, first, &flag, &tell);
            if let Some((tid, sig)) = waker.lock().ok().and_then(|w| *w) {
                // SAFETY: tgkill takes numbers only.
                unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig) };
            }
            drain(&targets, &flag);
        })
        .map_err(|e| sys_err("starting the thread that fills its memory", e));
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            for &(s, len) in &kept {
                let _ = sys::uffd_unregister(keep.as_raw_fd(), s, len);
            }
            close_there(b);
            return Err(e);
        }
    };
    drop(keep);
    Ok(Filling {
        pid,
        its_fd,
        stop,
        done,
        got: std::cell::Cell::new(None),
        wake,
        thread: Some(thread),
    })
}

/// One process being filled: our descriptor of its userfaultfd, what is still to come,
/// and what is registered (unregistered at the end: the process may hold the userfaultfd
/// longer than we do).
pub(crate) struct Target {
    pub(crate) uffd: OwnedFd,
    pub(crate) pending: Pending,
    pub(crate) registered: Vec<(u64, u64)>,
}

/// Puts everything in, then unregisters it; its figures go to `tell`. The targets, for
/// [`drain`].
fn fill(
    img: &LoadedImage,
    pid: i32,
    first: Target,
    stop: &AtomicBool,
    tell: &std::sync::mpsc::Sender<Filled>,
) -> Vec<Target> {
    let t0 = Instant::now();
    let body = img.body();
    let mut f = Filled::default();
    let mut targets = vec![first];
    let on_fault_only = std::env::var_os(ENV_TEST_ON_FAULT_ONLY).is_some();
    // Readable once the process has ended.
    let ended = on_fault_only.then(|| sys::pidfd_open(pid).ok()).flatten();
    while !stop.load(Ordering::Relaxed) && targets.iter().any(|t| !t.pending.is_empty()) {
        let mut fds: Vec<libc::pollfd> = targets
            .iter()
            .map(|t| t.uffd.as_raw_fd())
            .chain(ended.as_ref().map(|p| p.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // Waiting only for faults: a while (the stop flag is looked at in between).
        let wait = if on_fault_only { 100 } else { 0 };
        // SAFETY: poll reads and writes the array of pollfds we pass, of the length given.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        // (Otherwise its end is seen as its pages cannot be put in: ESRCH.)
        if on_fault_only
            && ended.is_some()
            && fds.last().is_some_and(|p| p.revents & libc::POLLIN != 0)
        {
            f.dropped += targets.iter().map(|t| t.pending.bytes()).sum::<u64>();
            break;
        }
        let mut born = Vec::new();
        for (t, p) in targets.iter_mut().zip(&fds) {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            let msgs = match sys::uffd_read(t.uffd.as_raw_fd()) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("reading a userfaultfd: {e}");
                    f.dropped += t.pending.bytes();
                    t.pending = Pending::default();
                    continue;
                }
            };
            for m in msgs {
                event(t, m, body, &mut f, &mut born);
            }
        }
        targets.extend(born);
        if on_fault_only {
            continue;
        }
        if let Some(t) = targets.iter_mut().find(|t| !t.pending.is_empty()) {
            if let Some(piece) = t.pending.next(BATCH) {
                put(t, piece, body, 0, &mut f);
            }
        }
    }
    for t in &targets {
        for &(s, len) in &t.registered {
            let _ = sys::uffd_unregister(t.uffd.as_raw_fd(), s, len);
        }
    }
    f.took = t0.elapsed();
    let _ = tell.send(f);
    targets
}

/// Reads (and lets go) whatever the userfaultfds still say until `stop`: events of the
/// process that came before its areas were unregistered wait for a reader (and it cannot
/// be stopped while one waits). A child's userfaultfd, given with a fork, is closed (all
/// its memory is in: it had what its parent had).
pub(crate) fn drain(targets: &[Target], stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = targets
            .iter()
            .map(|t| libc::pollfd {
                fd: t.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll reads and writes the array of pollfds we pass, of the length given.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        for (t, p) in targets.iter().zip(&fds) {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            for m in sys::uffd_read(t.uffd.as_raw_fd()).unwrap_or_default() {
                match m.event {
                    sys::UFFD_EVENT_FORK => {
                        // SAFETY: the kernel made this descriptor for us with the message.
                        drop(unsafe { OwnedFd::from_raw_fd(m.arg[0] as u32 as RawFd) })
                    }
                    sys::UFFD_EVENT_PAGEFAULT => {
                        let page = m.arg[1] & !(PAGE - 1);
                        let _ = sys::uffd_wake(t.uffd.as_raw_fd(), page, PAGE);
                    }
                    _ => {}
                }
            }
        }
    }
}

fn event(t: &mut Target, m: sys::UffdMsg, body: &[u8], f: &mut Filled, born: &mut Vec<Target>) {
    match m.event {
        sys::UFFD_EVENT_PAGEFAULT => {
            f.faults += 1;
            let addr = m.arg[1];
            match t.pending.at(addr, AROUND) {
                Some(piece) => {
                    put(t, piece, body, 0, f);
                }
                // Not in the image (never written), given back, or put in already.
                None => zero_or_wake(t.uffd.as_raw_fd(), addr),
            }
        }
        sys::UFFD_EVENT_FORK => {
            f.forks += 1;
            // SAFETY: the kernel made this descriptor for us as it gave us the message.
            let uffd = unsafe { OwnedFd::from_raw_fd(m.arg[0] as u32 as RawFd) };
            born.push(Target {
                uffd,
                pending: t.pending.clone(),
                // Its registrations go with our descriptor: it holds none.
                registered: Vec::new(),
            });
        }
        sys::UFFD_EVENT_REMAP => {
            let (from, to, len) = (m.arg[0], m.arg[1], m.arg[2]);
            t.pending.remap(from, to, len);
            t.registered.push((to, len));
        }
        sys::UFFD_EVENT_REMOVE | sys::UFFD_EVENT_UNMAP => {
            let gone: u64 = t.pending.take(m.arg[0], m.arg[1]).iter().map(|p| p.1).sum();
            f.dropped += gone;
        }
        _ => {}
    }
}

/// Answers a fault at `addr` with a page of zeros, or, if a page is there already, by
/// waking who waits for it.
pub(crate) fn zero_or_wake(fd: RawFd, addr: u64) {
    let page = addr & !(PAGE - 1);
    if sys::uffd_zeropage(fd, page, PAGE).is_err() {
        let _ = sys::uffd_wake(fd, page, PAGE);
    }
}

/// Puts `piece` (address, length, offset) into `t`'s memory, its bytes at `body[offset -
/// base..]`. True if part of it is pending again (its memory was changing: an event waits
/// to be read first).
pub(crate) fn put(
    t: &mut Target,
    piece: (u64, u64, usize),
    body: &[u8],
    base: usize,
    f: &mut Filled,
) -> bool {
    let (a, len, off) = piece;
    let fd = t.uffd.as_raw_fd();
    let at = off - base;
    match sys::uffd_copy(fd, a, &body[at..at + len as usize]) {
        Ok(()) => f.bytes += len,
        // Its memory is changing (an event waits to be read): the rest comes after it.
        Err((libc::EAGAIN, done)) => {
            f.bytes += done;
            t.pending.insert(a + done, len - done, off + done as usize);
            return true;
        }
        // A page of it is there already: the others one by one.
        Err((libc::EEXIST, done)) => {
            f.bytes += done;
            let mut p = a + done;
            while p < a + len {
                let o = at + (p - a) as usize;
                match sys::uffd_copy(fd, p, &body[o..o + PAGE as usize]) {
                    Ok(()) => f.bytes += PAGE,
                    Err((libc::EAGAIN, _)) => {
                        t.pending.insert(p, a + len - p, base + o);
                        return true;
                    }
                    Err(_) => {}
                }
                p += PAGE;
            }
        }
        // Gone: its area (ENOENT), or its process (ESRCH: the rest of it too).
        Err((libc::ESRCH, done)) => {
            f.dropped += len - done + t.pending.bytes();
            t.pending = Pending::default();
        }
        Err((e, done)) => {
            if e != libc::ENOENT {
                tracing::warn!("putting {len} bytes in at {a:#x}: errno {e}");
            }
            f.dropped += len - done;
        }
    }
    false
}

/// Closes descriptor `fd` (its userfaultfd) in running process `pid`: stopped a moment
/// (its main thread), the close made by it, its registers put back, let go. A signal that
/// arrives meanwhile is delivered. How it ended if it did meanwhile (SIGKILL): its wait
/// status was taken here.
pub(crate) fn close_in(pid: i32, fd: i32) -> Result<Option<sys::Stop>> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
    if link.as_os_str() != "anon_inode:[userfaultfd]" {
        // It ended, exec'd (the descriptor is close-on-exec), or closed it itself.
        return Ok(None);
    }
    sys::seize(pid, libc::PTRACE_O_TRACESYSGOOD as u64)
        .map_err(|e| sys_err(format!("attaching to process {pid}"), e))?;
    let mut ended = None;
    let done = (|| -> Result<()> {
        sys::interrupt(pid).map_err(|e| sys_err("stopping it", e))?;
        loop {
            match sys::wait(pid)? {
                sys::Stop::Stopped { event: 128, .. } => break,
                sys::Stop::Stopped { sig, .. } => {
                    sys::cont(pid, sig).map_err(|e| sys_err("ptrace", e))?
                }
                end => {
                    ended = Some(end);
                    return Err(Error::NoProcess(pid));
                }
            }
        }
        let regs = sys::get_regs(pid)?;
        let mut r = crate::away::remote_of(pid)?;
        let closed = r.raw(libc::SYS_close, &[fd as u64]);
        ended = r.ended;
        sys::set_regs(pid, &regs)?;
        for s in r.held.drain(..) {
            let sig = i32::from_le_bytes(s[..4].try_into().expect("4"));
            let _ = sys::kill(pid, sig);
        }
        closed.map(drop)
    })();
    if ended.is_some() {
        return Ok(ended);
    }
    let _ = sys::detach(pid, 0);
    done.map(|_| None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap as Map;

    /// The model: page -> offset of its bytes.
    fn pages(p: &Pending) -> Map<u64, usize> {
        let mut m = Map::new();
        for (&s, &(len, off)) in &p.runs {
            for i in 0..len / PAGE {
                m.insert(s + i * PAGE, off + (i * PAGE) as usize);
            }
        }
        m
    }

    fn runs(p: &Pending) -> Vec<(u64, u64)> {
        p.runs.iter().map(|(&s, &(l, _))| (s, s + l)).collect()
    }

    #[test]
    fn take_splits_runs_and_keeps_offsets() {
        let mut p = Pending::default();
        p.insert(0x1000, 0x4000, 0);
        p.insert(0x8000, 0x2000, 0x4000);
        let got = p.take(0x3000, 0x9000);
        assert_eq!(
            got,
            vec![(0x3000, 0x2000, 0x2000), (0x8000, 0x1000, 0x4000)]
        );
        assert_eq!(runs(&p), vec![(0x1000, 0x3000), (0x9000, 0xa000)]);
        assert_eq!(p.runs[&0x9000].1, 0x5000);
    }

    #[test]
    fn a_fault_takes_its_page_and_what_follows() {
        let mut p = Pending::default();
        p.insert(0x10000, 0x40000, 0);
        assert_eq!(p.at(0x20123, 0x2000), Some((0x20000, 0x2000, 0x10000)));
        assert_eq!(p.at(0x20123, 0x2000), None);
        assert_eq!(p.at(0x9000, 0x2000), None);
        assert_eq!(p.at(0x4f000, 0x10000), Some((0x4f000, 0x1000, 0x3f000)));
    }

    #[test]
    fn split_defers_anonymous_areas_only() {
        use crate::image::Vma;
        let vma = |start, end, kind| Vma {
            start,
            end,
            prot: 3,
            shared: false,
            growsdown: false,
            kind,
            anon_name: None,
        };
        let m = ProcessImage {
            vmas: vec![
                vma(0x1000, 0x3000, VmaKind::Anon),
                vma(0x3000, 0x4000, VmaKind::Special("[vvar]".into())),
                vma(0x4000, 0x6000, VmaKind::Anon),
                vma(0x6000, 0x8000, VmaKind::Anon),
            ],
            advice: vec![(0x4000, ADVICE_WIPEONFORK), (0x6000, ADVICE_HUGEPAGE)],
            ..Default::default()
        };
        let (areas, later, now) = split(
            &m,
            &[
                (0x2000, 0, 0x3000),
                (0x5000, 0x3000, 0x1000),
                (0x7000, 0x4000, 0x1000),
            ],
        );
        assert_eq!(areas, vec![(0x1000, 0x3000)]);
        assert_eq!(runs(&later), vec![(0x2000, 0x3000)]);
        assert_eq!(
            now,
            vec![
                (0x3000, 0x1000, 0x2000),
                (0x5000, 0x3000, 0x1000),
                (0x7000, 0x4000, 0x1000)
            ]
        );
    }

    proptest! {
        /// Any sequence of takes, faults and moves keeps every page with its bytes:
        /// what was taken plus what is left is what was there.
        #[test]
        fn pages_keep_their_bytes(
            ops in prop::collection::vec((0u8..4, 0u64..64, 1u64..16, 0u64..64), 1..40),
        ) {
            let mut p = Pending::default();
            p.insert(0, 32 * PAGE, 0);
            p.insert(40 * PAGE, 16 * PAGE, 32 * PAGE as usize);
            let mut model = pages(&p);
            for (op, a, n, to) in ops {
                let (a, n, to) = (a * PAGE, n * PAGE, (to + 100) * PAGE);
                let mut taken = Map::new();
                let pieces = match op {
                    0 => p.take(a, a + n),
                    1 => p.next(n).into_iter().collect(),
                    2 => p.at(a + 5, n).into_iter().collect(),
                    _ => {
                        // Moved: the model moves the same pages.
                        let moved: Vec<(u64, usize)> = model
                            .range(a..a + n)
                            .map(|(&k, &v)| (k, v))
                            .collect();
                        model.retain(|&k, _| !(to..to + n).contains(&k));
                        for (k, v) in moved {
                            model.remove(&k);
                            model.insert(to + (k - a), v);
                        }
                        p.remap(a, to, n);
                        prop_assert_eq!(pages(&p), model.clone());
                        continue;
                    }
                };
                for (s, len, off) in pieces {
                    prop_assert_eq!(s % PAGE, 0);
                    for i in 0..len / PAGE {
                        taken.insert(s + i * PAGE, off + (i * PAGE) as usize);
                    }
                }
                for (k, v) in &taken {
                    prop_assert_eq!(model.remove(k), Some(*v));
                }
                prop_assert_eq!(pages(&p), model.clone());
            }
        }
    }
}
