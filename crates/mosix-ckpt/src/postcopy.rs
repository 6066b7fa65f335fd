//! A process that runs while its memory still arrives (post-copy from a stream): once
//! everything but its private anonymous memory is in place (an image of format 3.4 says
//! where that begins: [`crate::records::TAG_LAZY`]), the process is let run, and each
//! memory record that comes after is put in as it arrives.
//!
//! Its private anonymous areas are registered with a userfaultfd made inside it (as for
//! [`crate::lazy`]). A page it touches before its bytes arrived waits (the fault is
//! parked) until they do: the copy that puts them in wakes it. A page the image does not
//! hold (zero, or never touched) cannot be told from one still to come until the image
//! ends: it waits until then, and gets zeros. What the process does meanwhile is followed
//! as [`crate::lazy`] does: a fork gives its child the pages still to come (but those of
//! areas a child does not get as they are), an mremap moves them, a munmap or
//! MADV_DONTNEED drops them (bytes that arrive for them later are not put in).
//!
//! Two threads: the caller's reader puts records in ([`Arrivals::arrive`]), a thread of
//! ours reads what the userfaultfds say; one lock between them keeps what is still to
//! come.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{sys_err, Error, Result};
use crate::image::{ProcessImage, VmaKind, ADVICE_DONTFORK, ADVICE_WIPEONFORK};
use crate::lazy::{self, Filled, Pending, Target};
use crate::restore::Builder;
use crate::sys::{self, PAGE};

/// (start, end) ranges of addresses.
pub(crate) type Ranges = Vec<(u64, u64)>;

/// The areas whose memory may come after the process runs: its private anonymous areas,
/// (start, end) sorted; and of those, the ones a child forked meanwhile does not get as
/// they are (MADV_DONTFORK, MADV_WIPEONFORK). No I/O.
pub(crate) fn areas(m: &ProcessImage) -> (Ranges, Ranges) {
    let mut all = Vec::new();
    let mut not_kept = Vec::new();
    for v in m
        .vmas
        .iter()
        .filter(|v| v.kind == VmaKind::Anon && !v.shared)
    {
        all.push((v.start, v.end));
        let forked_apart = m
            .advice
            .iter()
            .any(|&(a, bits)| a == v.start && bits & (ADVICE_DONTFORK | ADVICE_WIPEONFORK) != 0);
        if forked_apart {
            not_kept.push((v.start, v.end));
        }
    }
    all.sort();
    (all, not_kept)
}

/// Whether [start, start+len) lies in one of `areas` (sorted, not overlapping).
pub(crate) fn within(areas: &[(u64, u64)], start: u64, len: u64) -> bool {
    let i = areas.partition_point(|&(_, e)| e <= start);
    areas
        .get(i)
        .is_some_and(|&(s, e)| s <= start && start.checked_add(len).is_some_and(|x| x <= e))
}

/// What the two threads share.
struct State {
    /// The process, then each child it forked meanwhile. Pending offsets are the
    /// addresses the image gives the bytes (the process may have moved them since).
    targets: Vec<Target>,
    /// Faults on pages still to come: (target, page). Their copy wakes them; those left
    /// when the image ends get zeros.
    parked: Vec<(usize, u64)>,
    not_kept: Vec<(u64, u64)>,
    f: Filled,
    /// The image ended: nothing is to come any more.
    ended: bool,
}

impl State {
    fn event(&mut self, i: usize, m: sys::UffdMsg) {
        match m.event {
            sys::UFFD_EVENT_PAGEFAULT => {
                let page = m.arg[1] & !(PAGE - 1);
                if !self.ended && self.targets[i].pending.contains(page) {
                    self.f.faults += 1;
                    tracing::debug!("a fault at {page:#x} waits for its bytes");
                    self.parked.push((i, page));
                } else {
                    lazy::zero_or_wake(self.targets[i].uffd.as_raw_fd(), page);
                }
            }
            sys::UFFD_EVENT_FORK => {
                // SAFETY: the kernel made this descriptor for us as it gave us the message.
                let uffd = unsafe { OwnedFd::from_raw_fd(m.arg[0] as u32 as RawFd) };
                if self.ended {
                    // Nothing is to come: closed, its areas are ordinary memory.
                    return;
                }
                self.f.forks += 1;
                let parent = &self.targets[i];
                let mut pending = parent.pending.clone();
                for &(s, e) in &self.not_kept {
                    pending.take(s, e);
                }
                let registered = parent.registered.clone();
                self.targets.push(Target {
                    uffd,
                    pending,
                    registered,
                });
            }
            sys::UFFD_EVENT_REMAP => {
                let (from, to, len) = (m.arg[0], m.arg[1], m.arg[2]);
                let t = &mut self.targets[i];
                t.pending.remap(from, to, len);
                t.registered.push((to, len));
            }
            sys::UFFD_EVENT_REMOVE | sys::UFFD_EVENT_UNMAP => {
                let gone: u64 = self.targets[i]
                    .pending
                    .take(m.arg[0], m.arg[1])
                    .iter()
                    .map(|p| p.1)
                    .sum();
                self.f.dropped += gone;
            }
            _ => {}
        }
    }
}

/// A process being filled from a stream (see the module documentation).
pub(crate) struct Arrivals {
    pid: i32,
    /// The process's own descriptor of the userfaultfd.
    its_fd: i32,
    areas: Vec<(u64, u64)>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    t0: Instant,
}

/// Registers the private anonymous areas of process `b.pid` (stopped, laid out and in
/// its final state as `m` says, none of that memory put in yet) and starts following
/// them; their pages in `coming` (address, length) are to come, the others are zero.
/// Err: nothing is registered (the caller then puts the memory in before it runs).
pub(crate) fn start(b: &mut Builder, m: &ProcessImage, coming: &[(u64, u64)]) -> Result<Arrivals> {
    let pid = b.pid;
    let (areas, not_kept) = areas(m);
    if areas.is_empty() {
        return Err(Error::Unrestorable(
            "it has no private anonymous memory".into(),
        ));
    }
    let (ours, its_fd) = lazy::make_uffd(b)?;
    // On failure: nothing registered, and no userfaultfd left in the process.
    let undo = |b: &mut Builder, uffd: RawFd, registered: &[(u64, u64)], e: Error| {
        for &(s, len) in registered {
            let _ = sys::uffd_unregister(uffd, s, len);
        }
        let _ = b.r.raw(libc::SYS_close, &[its_fd as u64]);
        e
    };
    let mut registered = Vec::new();
    let mut pending = Pending::default();
    for &(s, e) in &areas {
        if let Err(err) = sys::uffd_register_missing(ours.as_raw_fd(), s, e - s) {
            let why = sys_err(format!("registering its memory at {s:#x}-{e:#x}"), err);
            return Err(undo(b, ours.as_raw_fd(), &registered, why));
        }
        registered.push((s, e - s));
    }
    for &(a, len) in coming {
        let end = a.saturating_add(len);
        for &(s, e) in &areas {
            let (lo, hi) = (a.max(s), end.min(e));
            if lo < hi {
                pending.insert(lo, hi - lo, lo as usize);
            }
        }
    }
    let state = Arc::new(Mutex::new(State {
        targets: vec![Target {
            uffd: ours,
            pending,
            registered,
        }],
        parked: Vec::new(),
        not_kept,
        f: Filled::default(),
        ended: false,
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let (st, flag) = (state.clone(), stop.clone());
    let cpus = crate::cpu::original();
    let thread = std::thread::Builder::new()
        .name("mosix-arrivals".into())
        .spawn(move || {
            crate::cpu::free(cpus);
            follow(&st, &flag);
        });
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            let why = sys_err("starting the thread that follows its memory", e);
            let st = state.lock().map_err(|_| lost())?;
            let t = &st.targets[0];
            return Err(undo(b, t.uffd.as_raw_fd(), &t.registered, why));
        }
    };
    Ok(Arrivals {
        pid,
        its_fd,
        areas,
        state,
        stop,
        thread: Some(thread),
        t0: Instant::now(),
    })
}

/// The lock between the two threads was poisoned: one of them panicked.
fn lost() -> Error {
    Error::Unrestorable("the thread following its memory failed".into())
}

/// Reads what the userfaultfds say until `stop`.
fn follow(state: &Mutex<State>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let fds: Vec<RawFd> = match state.lock() {
            Ok(st) => st.targets.iter().map(|t| t.uffd.as_raw_fd()).collect(),
            Err(_) => return,
        };
        let mut polled: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll reads and writes the array of pollfds we pass, of the length given.
        unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 50) };
        let Ok(mut st) = state.lock() else { return };
        for (i, p) in polled.iter().enumerate() {
            // (Targets are only ever added, while this thread runs.)
            if p.revents & libc::POLLIN == 0 || st.targets[i].uffd.as_raw_fd() != p.fd {
                continue;
            }
            let msgs = match sys::uffd_read(p.fd) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::warn!("reading a userfaultfd: {e}");
                    continue;
                }
            };
            for m in msgs {
                st.event(i, m);
            }
        }
    }
}

impl Arrivals {
    /// The areas memory may arrive for (a record outside them is a damaged image).
    pub(crate) fn areas(&self) -> &[(u64, u64)] {
        &self.areas
    }

    /// Puts in the bytes the image gives for `vaddr` (in every process that still waits
    /// for them), and wakes who waited for them.
    pub(crate) fn arrive(&self, vaddr: u64, data: &[u8]) -> Result<()> {
        let (start, end) = (vaddr as usize, vaddr as usize + data.len());
        loop {
            let mut again = false;
            {
                let mut st = self.state.lock().map_err(|_| lost())?;
                let State { targets, f, .. } = &mut *st;
                for t in targets.iter_mut() {
                    for piece in t.pending.take_offsets(start, end) {
                        again |= lazy::put(t, piece, data, start, f);
                    }
                }
            }
            if !again {
                return Ok(());
            }
            // An event of its memory waits to be read (by the other thread) first.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The image says these pages are zero: they get zeros (in every process that still
    /// waits for them), and who waited for them is woken.
    pub(crate) fn zeros(&self, ranges: &[(u64, u64)]) -> Result<()> {
        let mut st = self.state.lock().map_err(|_| lost())?;
        for &(a, len) in ranges {
            let (start, end) = (a as usize, (a + len) as usize);
            for t in st.targets.iter_mut() {
                for (at, n, _) in t.pending.take_offsets(start, end) {
                    // (A page there already, or gone: nothing to do for it.)
                    if sys::uffd_zeropage(t.uffd.as_raw_fd(), at, n).is_ok() {
                        continue;
                    }
                    let mut p = at;
                    while p < at + n {
                        lazy::zero_or_wake(t.uffd.as_raw_fd(), p);
                        p += PAGE;
                    }
                }
            }
        }
        Ok(())
    }

    /// The image ended: what never came is zero. Parked faults get zeros, and the areas
    /// are ordinary memory from now on (unregistered).
    pub(crate) fn all_arrived(&self) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        st.ended = true;
        st.f.took = self.t0.elapsed();
        let parked = std::mem::take(&mut st.parked);
        for (i, page) in parked {
            lazy::zero_or_wake(st.targets[i].uffd.as_raw_fd(), page);
        }
        for t in &mut st.targets {
            t.pending = Pending::default();
            for &(s, len) in &t.registered {
                let _ = sys::uffd_unregister(t.uffd.as_raw_fd(), s, len);
            }
        }
    }

    /// After [`Arrivals::all_arrived`]: closes the process's descriptor of the
    /// userfaultfd (it is stopped a moment for that; call from a thread that may trace
    /// it) and stops following. What was put in, and how the process ended if it did
    /// while it was stopped for the close (its wait status was taken then).
    pub(crate) fn finish(mut self) -> (Filled, Option<sys::Stop>) {
        let ended = match lazy::close_in(self.pid, self.its_fd) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(pid = self.pid, "its userfaultfd stays open in it: {e}");
                None
            }
        };
        self.halt();
        let f = self.state.lock().map(|st| st.f).unwrap_or_default();
        (f, ended)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_takes_whole_ranges_of_one_area() {
        let a = [(0x1000, 0x3000), (0x5000, 0x6000)];
        assert!(within(&a, 0x1000, 0x2000));
        assert!(within(&a, 0x5000, 0x1000));
        assert!(!within(&a, 0x2000, 0x2000), "runs past its area");
        assert!(!within(&a, 0x3000, 0x1000), "between areas");
        assert!(!within(&a, 0x6000, 0x1000));
        assert!(!within(&a, u64::MAX - 0xfff, 0x1000));
    }

    #[test]
    fn bytes_are_found_by_where_the_image_put_them_after_a_move() {
        let mut p = Pending::default();
        p.insert(0x10000, 0x4000, 0x10000);
        // The process moved its middle two pages to 0x90000.
        p.remap(0x11000, 0x90000, 0x2000);
        let got = p.take_offsets(0x10000, 0x14000);
        assert_eq!(
            got,
            vec![
                (0x10000, 0x1000, 0x10000),
                (0x13000, 0x1000, 0x13000),
                (0x90000, 0x2000, 0x11000)
            ]
        );
        assert!(p.is_empty());
        // Part of a run: the rest stays, at its address.
        p.insert(0x20000, 0x3000, 0x20000);
        assert_eq!(
            p.take_offsets(0x21000, 0x22000),
            vec![(0x21000, 0x1000, 0x21000)]
        );
        assert!(p.contains(0x20fff) && !p.contains(0x21000) && p.contains(0x22000));
    }
}
