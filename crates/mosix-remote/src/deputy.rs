//! The deputy: the process itself at home while it runs elsewhere. It holds everything the
//! process owns at home (PID, parent, session, descriptors, cwd, credentials), makes the
//! calls the supervisor sends, passes on every signal that reaches the home PID, stops
//! when the process stops, and ends as the process ends.
//!
//! Threads: the main thread reads the connection and takes the signals (every catchable
//! signal is caught, none is blocked there); one worker per thread of the process makes
//! that thread's calls, with every signal blocked except SIGTTIN/SIGTTOU (so a background
//! read of the terminal behaves as at home) and [`SIG_CANCEL`], which interrupts a call
//! the process no longer waits for.
//!
//! The connection may break (mosixd restarting): answers wait in a backlog, the caller
//! connects again ([`Deputy::serve`] once more), calls sent again are answered from the
//! record of the last answer instead of being made twice.

use crate::ahead::Ahead;
use crate::exec;
use crate::marks::{Marks, Pre};
use crate::wire::{self, Call, ExitStatus, FromDeputy, MarkError, Reply, ToDeputy};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// What mosixd answers a deputy that connects while its process is being found again
/// after a restart (its move still being finished): the deputy connects again.
pub const NOT_YET: &str = "not followed again yet";

/// The signal that interrupts a worker's call (a real-time signal; one sent to the
/// process by somebody else is passed on like any other).
pub const SIG_CANCEL: i32 = 63;

/// The variable of the deputy's environment that lists its descriptors of the memory the
/// process shares with other processes at home, which it holds while the process is away
/// (the checkpoint engine sets it: mosix_ckpt::homemem::HOLD_ENV).
pub const HOLD_ENV: &str = "MOSIX_HOME_MEMORY";

#[cfg(test)]
#[test]
fn the_engine_names_the_held_memory_alike() {
    assert_eq!(HOLD_ENV, mosix_ckpt::homemem::HOLD_ENV);
}

/// Signals for the process that arrived and are not yet passed on (bit n-1: signal n).
static PENDING: AtomicU64 = AtomicU64::new(0);
/// Write end of the pipe that wakes the main thread.
static WAKE: AtomicI32 = AtomicI32::new(-1);
/// The deputy's own descriptors (never the process's), up to 64: its connection and
/// wake-up pipe, and the objects of the process's memory shared at home that it holds
/// (mosix_ckpt::homemem).
static PRIVATE: [AtomicI32; 64] = [const { AtomicI32::new(-1) }; 64];
/// Kernel TIDs of workers sent SIG_CANCEL by the main thread (so their handler knows the
/// signal is ours, not the process's).
static CANCELLING: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];

thread_local! {
    /// The last signal taken by this thread (for a worker: what interrupted its call).
    static TAKEN: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

extern "C" fn on_signal(sig: i32) {
    TAKEN.with(|t| t.set(sig));
    if sig == SIG_CANCEL {
        let me = gettid();
        for c in &CANCELLING {
            if c.compare_exchange(me, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return;
            }
        }
    }
    PENDING.fetch_or(1u64 << (sig - 1), Ordering::SeqCst);
    let w = WAKE.load(Ordering::SeqCst);
    if w >= 0 {
        // SAFETY: write(2) is async-signal-safe; one byte from a static.
        unsafe { libc::write(w, b"s".as_ptr().cast(), 1) };
    }
}

/// Marks `fd` as the deputy's own.
pub fn add_private(fd: RawFd) {
    for p in &PRIVATE {
        if p.compare_exchange(-1, fd, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

/// Forgets `fd` as one of the deputy's own (it was closed).
pub fn remove_private(fd: RawFd) {
    for p in &PRIVATE {
        let _ = p.compare_exchange(fd, -1, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Whether `fd` is one of the deputy's own descriptors (its connections, its wake-up
/// pipe, the duplicates kept for checkpoints' marks).
pub fn is_private(fd: u64) -> bool {
    PRIVATE
        .iter()
        .any(|p| p.load(Ordering::SeqCst) as i64 == fd as i64)
        || crate::marks::is_saved(fd as i64)
}

/// Bumped when the process is rewound to a mark: what workers remember of calls before
/// (to answer one sent again) is forgotten.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// A close-on-exec duplicate of `fd` at a number just below the soft RLIMIT_NOFILE,
/// marked private.
pub fn dup_high(fd: RawFd) -> std::io::Result<RawFd> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let low = (lim.rlim_cur.min(1 << 20) as i32).max(64) - 64;
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own at the lowest free number
    // from `low` up.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, low) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    add_private(n);
    Ok(n)
}

/// Moves descriptor `fd` to the highest free number below the soft RLIMIT_NOFILE (so the
/// process's own numbering is undisturbed), close-on-exec, and marks it private.
pub fn move_high(fd: RawFd) -> std::io::Result<RawFd> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let top = (lim.rlim_cur.min(1 << 20) as i32).max(64) - 1;
    for n in (top - 63..=top).rev() {
        // SAFETY: F_GETFD only asks whether `n` is open.
        if unsafe { libc::fcntl(n, libc::F_GETFD) } >= 0 {
            continue;
        }
        // SAFETY: dup3 onto a number we just saw free; both are plain descriptors.
        if unsafe { libc::dup3(fd, n, libc::O_CLOEXEC) } == n {
            // SAFETY: the old number is ours and now duplicated.
            unsafe { libc::close(fd) };
            add_private(n);
            return Ok(n);
        }
    }
    Err(std::io::Error::other(
        "no free descriptor number near the limit",
    ))
}

fn set_handlers() {
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP || sig == 32 || sig == 33 {
            continue;
        }
        // SAFETY: sigaction with a handler that only touches atomics and write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(i32) as usize;
            sa.sa_flags = 0; // no SA_RESTART: a worker's call returns EINTR
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn block_all_but(keep: &[i32]) {
    // SAFETY: building and applying a signal mask for the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for &s in keep {
            libc::sigdelset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn unblock_all() {
    // SAFETY: an empty mask for the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Signals raised by a call for the calling thread (SIGPIPE, SIGXFSZ): taken off its
/// queue, to be raised in the process instead.
fn take_thread_signals() -> u64 {
    let mut got = 0u64;
    for sig in [libc::SIGPIPE, libc::SIGXFSZ] {
        // SAFETY: sigtimedwait with a zero timeout on a set of one blocked signal.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            while libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) == sig {
                got |= 1u64 << (sig - 1);
            }
        }
    }
    got
}

/// The way out, across reconnections: first every pending signal (so a signal reaches
/// the process before the answer of a call it interrupted), then the message; what cannot
/// be sent now waits for the next connection.
#[derive(Default)]
struct Link {
    inner: Mutex<LinkInner>,
    /// Streams: a change of a file read ahead is told before anything sent after it.
    ahead: Arc<Ahead>,
}

#[derive(Default)]
struct LinkInner {
    conn: Option<UnixStream>,
    backlog: Vec<FromDeputy>,
}

impl Link {
    /// Under the lock: what must go before any message (signals, stale streams).
    fn before(&self, l: &mut LinkInner) {
        let sigs = PENDING.swap(0, Ordering::SeqCst);
        for sig in 1..=64 {
            if sigs & (1u64 << (sig - 1)) != 0 {
                l.backlog.push(FromDeputy::Signal { sig });
            }
        }
        if let Some(m) = self.ahead.stale() {
            l.backlog.push(m);
        }
    }
    fn send(&self, m: Option<FromDeputy>) {
        let mut l = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.before(&mut l);
        if let Some(m) = m {
            l.backlog.push(m);
        }
        l.flush();
    }
    /// Sends read-ahead bytes of stream `s` at `off`, unless the stream ended meanwhile
    /// (its file changed: then the host hears that first).
    fn send_ahead(&self, s: u64, off: u64, len: u64, eof: bool, m: FromDeputy) {
        let mut l = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.before(&mut l);
        if let crate::ahead::Send::Yes = self.ahead.sending(s, off, len, eof) {
            l.flush();
            if l.backlog.is_empty() {
                if let Some(c) = &mut l.conn {
                    if wire::send(c, &m).is_ok() {
                        return;
                    }
                    l.conn = None;
                }
            }
            l.backlog.push(m);
        }
        l.flush();
    }
    /// [`Link::send_ahead`] of the `n` bytes of `p` that `sp` holds (spliced from the
    /// file): written from the pipe into the connection when nothing waits before them;
    /// else (or if the connection fails) read again and kept for the next connection.
    fn send_ahead_spliced(
        &self,
        p: &crate::ahead::Piece,
        n: usize,
        eof: bool,
        sp: &mut crate::splice::Splicer,
    ) {
        let mut l = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.before(&mut l);
        if let crate::ahead::Send::Yes = self.ahead.sending(p.stream, p.off, n as u64, eof) {
            l.flush();
            if l.backlog.is_empty() {
                if let Some(c) = &l.conn {
                    let (head, tail) =
                        wire::ahead_frame(p.stream, p.fd, p.kind, p.file, p.off, n, eof);
                    if sp.send(c, &head, &tail).is_ok() {
                        return;
                    }
                    l.conn = None;
                }
            }
            sp.drop_held();
            let (got, data) = read_at(p.fd, p.off, n as u32);
            if got >= 0 {
                l.backlog.push(FromDeputy::Ahead {
                    stream: p.stream,
                    fd: p.fd,
                    kind: p.kind,
                    file: p.file,
                    off: p.off,
                    eof: eof || data.len() < n,
                    data: data.into(),
                });
            }
        } else {
            sp.drop_held();
        }
        l.flush();
    }
    /// Sends `m` (written from where it is when nothing waits before it).
    fn send_ref(&self, m: &FromDeputy) {
        let mut l = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.before(&mut l);
        l.flush();
        if l.backlog.is_empty() {
            if let Some(c) = &mut l.conn {
                if wire::send(c, m).is_ok() {
                    return;
                }
                l.conn = None;
            }
        }
        l.backlog.push(m.clone());
        l.flush();
    }
    /// A new connection; what waits for it is sent by the next sender.
    fn attach(&self, c: UnixStream) {
        let mut l = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        l.conn = Some(c);
    }
    fn detach(&self) {
        if let Some(c) = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .conn
            .take()
        {
            remove_private(c.as_raw_fd());
        }
    }
}

impl LinkInner {
    fn flush(&mut self) {
        let Some(c) = &mut self.conn else { return };
        let mut sent = 0;
        for m in &self.backlog {
            if wire::send(c, m).is_err() {
                self.conn = None;
                break;
            }
            sent += 1;
        }
        self.backlog.drain(..sent);
        if let Some(c) = &mut self.conn {
            let _ = c.flush();
        }
    }
}

enum Job {
    /// A call, made once the first `n` writes behind are made; sent in generation `g`
    /// ([`GENERATION`]): one queued before a rewind is of the copy that died, and is not
    /// made.
    Call(Call, u64, u64),
    Again {
        block: bool,
    },
    Forget,
}

/// What a worker does now, shared with the main thread.
#[derive(Default)]
struct WState {
    /// The call being made (0: none) and the worker's kernel TID.
    current: u64,
    cancelled: HashSet<u64>,
    tid: i32,
}

struct Worker {
    tx: Sender<Job>,
    state: Arc<Mutex<WState>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn worker_main(
    rx: Receiver<Job>,
    out: Arc<Link>,
    st: Arc<Mutex<WState>>,
    marks: Arc<Mutex<Marks>>,
) {
    block_all_but(&[libc::SIGTTIN, libc::SIGTTOU, SIG_CANCEL]);
    lock(&st).tid = gettid();
    let mut last: Option<(u64, u64, FromDeputy)> = None;
    let ahead = out.ahead.clone();
    // A call that came while an interrupted one waited for what to do: made next.
    let mut next: Option<Job> = None;
    while let Some(job) = next.take().or_else(|| rx.recv().ok()) {
        let Job::Call(call, writes, sent_in) = job else {
            continue;
        };
        let generation = GENERATION.load(Ordering::SeqCst);
        if sent_in != generation {
            // Of the copy before a rewind: for nobody.
            continue;
        }
        if let Some((g, s, r)) = &last {
            if *g == generation && *s == call.seq {
                // Sent again after a reconnect: answered from the record, not made twice.
                out.send_ref(r);
                continue;
            }
        }
        let seq = call.seq;
        // Cancelled before it began: answered so, and remembered like any answer (the
        // call may be sent again after a reconnect, and must not be made then).
        let cancelled = |last: &mut Option<(u64, u64, FromDeputy)>| {
            lock(&st).current = 0;
            let msg = FromDeputy::Reply(Reply::Cancelled { seq });
            out.send_ref(&msg);
            *last = Some((generation, seq, msg));
        };
        {
            let mut s = lock(&st);
            // Checked again under the lock a rewind reads `current` with: either the
            // rewind sees this call (and cancels it) or this sees the new generation.
            if GENERATION.load(Ordering::SeqCst) != sent_in {
                continue;
            }
            if s.cancelled.remove(&seq) {
                drop(s);
                cancelled(&mut last);
                continue;
            }
            s.current = seq;
        }
        // Writes behind sent before it are made first; a cancel that came meanwhile
        // still counts.
        ahead.wait_writes(writes);
        if lock(&st).cancelled.remove(&seq) {
            cancelled(&mut last);
            continue;
        }
        // A write of what went out already, a read of what was read already (the process
        // was brought back to a checkpoint): see marks.rs.
        let (run, io) = match lock(&marks).before(&call, &is_private) {
            Pre::Answer(r) => {
                lock(&st).current = 0;
                let msg = FromDeputy::Reply(r);
                out.send_ref(&msg);
                last = Some((generation, seq, msg));
                continue;
            }
            Pre::Run(run, io) => (run, io),
        };
        let call = run.unwrap_or(call);
        let mut masked = false;
        let (nr, args) = (call.nr, call.args);
        let deferred = ahead.deferred(&call);
        let mut prepared = match deferred {
            // A write behind on its descriptor failed: this call says so (a close is
            // made all the same).
            Some(e) if nr != libc::SYS_close => Err(exec::Outcome {
                ret: -(e as i64),
                outs: Vec::new(),
            }),
            _ => exec::prepare(call, &is_private),
        };
        let reply = loop {
            let p = match &mut prepared {
                Ok(p) => p,
                Err(o) => {
                    let o = std::mem::take(o);
                    break exec::reply(seq, o, 0);
                }
            };
            TAKEN.with(|t| t.set(0));
            let ret = p.run(&is_private);
            let sigs = take_thread_signals();
            if ret != -(libc::EINTR as i64) {
                let Ok(p) = prepared else {
                    unreachable!("made")
                };
                let ret = match deferred {
                    Some(e) if ret >= 0 => -(e as i64),
                    _ => ret,
                };
                let mut o = p.finish(ret);
                if let Some(io) = &io {
                    lock(&marks).after(io, &mut o.ret, &o.outs);
                }
                break exec::reply(seq, o, sigs);
            }
            if lock(&st).cancelled.remove(&seq) {
                break Reply::Cancelled { seq };
            }
            let by = TAKEN.with(|t| t.get());
            if by == libc::SIGTTIN || by == libc::SIGTTOU {
                // What would the process do with it? Ask, and wait for the answer.
                out.send(Some(FromDeputy::Reply(Reply::Interrupted { seq, sig: by })));
                match rx.recv() {
                    Ok(Job::Again { block }) => {
                        if block {
                            block_all_but(&[SIG_CANCEL]);
                            masked = true;
                        }
                        continue;
                    }
                    Ok(Job::Call(c, w, g)) => {
                        // The thread made another call: this one is over.
                        next = Some(Job::Call(c, w, g));
                        break Reply::Cancelled { seq };
                    }
                    Ok(Job::Forget) | Err(_) => {
                        break Reply::Cancelled { seq };
                    }
                }
            }
            // Interrupted by nothing the process would notice: make it again.
        };
        if masked {
            block_all_but(&[libc::SIGTTIN, libc::SIGTTOU, SIG_CANCEL]);
        }
        {
            let mut s = lock(&st);
            s.current = 0;
            s.cancelled.remove(&seq);
        }
        let mut reply = reply;
        if let Reply::Done { ret, begin, .. } = &mut reply {
            // A read or write that continues the last may begin a stream: the host
            // hears it with the answer, before the process's next call.
            *begin = ahead.after(seq, nr, &args, *ret, &is_private);
        }
        let msg = FromDeputy::Reply(reply);
        out.send_ref(&msg);
        // Read ahead only once the answer that begins the stream is on its way.
        ahead.go(seq);
        // Done or cancelled, the call is over: sent again (a reconnect whose cancel was
        // lost sends the call and its cancel again, the call first), it gets this answer.
        // Made again, a cancelled read would take input meant for the next one.
        last = Some((generation, seq, msg));
    }
}

/// The path and identity of the process's descriptor `fd`.
fn describe(fd: i32) -> (Option<Vec<u8>>, Option<crate::wire::FileId>) {
    use std::os::unix::ffi::OsStringExt;
    if is_private(fd as u64) {
        return (None, None);
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.into_os_string().into_vec());
    // SAFETY: fstat into a struct of ours.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `fd` is a number, a bad one fails with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return (path, None);
    }
    let id = crate::wire::FileId {
        dev: st.st_dev,
        ino: st.st_ino,
        mode: st.st_mode,
        size: st.st_size as u64,
        mtime: st.st_mtime,
        mtime_ns: st.st_mtime_nsec,
    };
    (path, Some(id))
}

/// How the deputy ends: as the process ended.
pub fn end_as(st: ExitStatus) -> ! {
    match st {
        ExitStatus::Code(c) => {
            // SAFETY: _exit ends the process at once; nothing of ours needs flushing.
            unsafe { libc::_exit(c) }
        }
        ExitStatus::Signal(sig) => {
            // SAFETY: default action, no core file at home (the process's core, if any,
            // was made where it ran), then the signal to ourselves.
            unsafe {
                let lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &lim);
                libc::signal(sig, libc::SIG_DFL);
                unblock_all();
                libc::kill(libc::getpid(), sig);
                libc::kill(libc::getpid(), libc::SIGKILL);
                libc::_exit(128 + sig)
            }
        }
    }
}

/// A running deputy.
pub struct Deputy {
    workers: HashMap<i32, Worker>,
    /// Which thread each call came from.
    calls: HashMap<u64, i32>,
    out: Arc<Link>,
    /// What the main thread has to send: sent by a thread of its own, so that the main
    /// thread, which reads the connection, never waits on a write (the other end may be
    /// waiting for it to read: see docs/transparency.md, "The path of a forwarded call").
    aux: Sender<Aux>,
    wake_r: RawFd,
    /// What checkpoints of the process keep here (marks.rs).
    marks: Arc<Mutex<Marks>>,
    /// The highest call sequence number seen.
    max_seq: u64,
    /// Calls cancelled while their worker was making them, until the worker is done with
    /// them: signalled again (see [`Deputy::recancel`]).
    cancelling: Vec<u64>,
    /// The arena its mosixd gave it on this connection, if any (crate::arena::ArenaMap).
    arena: Option<Arc<crate::arena::ArenaMap>>,
}

/// How often the signal of a cancel is sent again while its call goes on.
const RECANCEL_MS: i32 = 5;

/// Work of the deputy's sending thread. `writes`: the writes behind made before it.
enum Aux {
    /// Signals arrived: pass them on.
    Flush,
    Describe {
        seq: u64,
        fd: i32,
        writes: u64,
    },
    ReadAt {
        seq: u64,
        fd: i32,
        off: u64,
        len: u32,
        writes: u64,
    },
    Synced {
        seq: u64,
    },
    Adopt {
        seq: u64,
        fd: i32,
        path: Vec<u8>,
        flags: i32,
        offset: u64,
        cloexec: bool,
        writes: u64,
    },
}

fn aux_main(rx: Receiver<Aux>, out: Arc<Link>) {
    block_all_but(&[]);
    while let Ok(job) = rx.recv() {
        match job {
            Aux::Flush => out.send(None),
            Aux::Describe { seq, fd, writes } => {
                out.ahead.wait_writes(writes);
                let (path, id) = describe(fd);
                out.send(Some(FromDeputy::Described { seq, path, id }));
            }
            Aux::ReadAt {
                seq,
                fd,
                off,
                len,
                writes,
            } => {
                out.ahead.wait_writes(writes);
                let (ret, data) = read_at(fd, off, len);
                out.send(Some(FromDeputy::Data { seq, ret, data }));
            }
            Aux::Synced { seq } => out.send(Some(FromDeputy::Synced { seq })),
            Aux::Adopt {
                seq,
                fd,
                path,
                flags,
                offset,
                cloexec,
                writes,
            } => {
                out.ahead.wait_writes(writes);
                let ret = adopt(fd, &path, flags, offset, cloexec);
                out.send(Some(FromDeputy::Adopted { seq, ret }));
            }
        }
    }
}

/// The deputy's thread that reads ahead.
fn read_ahead_main(out: Arc<Link>) {
    block_all_but(&[]);
    let ahead = out.ahead.clone();
    // Pieces go from the file into the connection through a pipe where they can.
    let mut splicer = crate::splice::Splicer::new(crate::ahead::CHUNK as usize);
    while let Some(piece) = ahead.next_read() {
        if let Some(sp) = splicer.as_mut() {
            if let Some((n, eof)) = sp.fill(piece.fd, piece.off, piece.len as usize) {
                out.send_ahead_spliced(&piece, n, eof, sp);
                continue;
            }
        }
        let crate::ahead::Piece {
            stream,
            fd,
            kind,
            file,
            off,
            len,
        } = piece;
        // (A call that could close the descriptor ends the stream first; a read of what
        // it became meanwhile is dropped by `sending`.) Not readable ahead: the stream
        // ends; the process's reads go home.
        let (n, data) = read_at(fd, off, len as u32);
        let eof = n < 0 || (data.len() as u64) < len;
        let got = data.len() as u64;
        let m = FromDeputy::Ahead {
            stream,
            fd,
            kind,
            file,
            off,
            data: data.into(),
            eof,
        };
        out.send_ahead(stream, off, got, eof, m);
    }
}

/// The deputy's thread that tells the host at once of a change of a file read ahead.
fn watch_main(out: Arc<Link>) {
    block_all_but(&[]);
    let ahead = out.ahead.clone();
    while ahead.watch() {
        out.send(None);
    }
}

/// The deputy's thread that makes writes sent behind.
fn write_behind_main(out: Arc<Link>) {
    block_all_but(&[]);
    let ahead = out.ahead.clone();
    ahead.write_loop(&|m| out.send(Some(m)));
}

/// Opens `path` as the process (it is the deputy's own credentials, cwd and root) with
/// `flags`, at `offset`, at the process's descriptor number `fd` (close-on-exec as
/// `cloexec`): 0, or -errno (and `fd` is untouched).
fn adopt(fd: i32, path: &[u8], flags: i32, offset: u64, cloexec: bool) -> i64 {
    if is_private(fd as u64) || fd < 0 {
        return -(libc::EBADF as i64);
    }
    let Ok(c) = std::ffi::CString::new(path) else {
        return -(libc::EINVAL as i64);
    };
    let keep =
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOCTTY);
    // SAFETY: open of a NUL-terminated path of ours; a new descriptor or -1.
    let f = unsafe { libc::open(c.as_ptr(), keep | libc::O_CLOEXEC | libc::O_NOCTTY) };
    if f < 0 {
        return -(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as i64);
    }
    // SAFETY: lseek, dup3 and close of descriptors of this process: `f` is ours; `fd`
    // (home's /dev/null reserving the number) becomes the file.
    unsafe {
        libc::lseek(f, offset as libc::off_t, libc::SEEK_SET);
        let r = libc::dup3(f, fd, if cloexec { libc::O_CLOEXEC } else { 0 });
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        libc::close(f);
        if r < 0 {
            return -(e as i64);
        }
    }
    0
}

/// `len` bytes of the process's descriptor `fd` from `off` (its offset untouched).
fn read_at(fd: i32, off: u64, len: u32) -> (i64, Vec<u8>) {
    if is_private(fd as u64) {
        return (-(libc::EBADF as i64), Vec::new());
    }
    let len = len.min(crate::spec::MAX_IO) as usize;
    let mut data: Vec<u8> = Vec::with_capacity(len);
    // SAFETY: pread of at most `len` bytes into the buffer's room (not zeroed first).
    let n = unsafe { libc::pread(fd, data.as_mut_ptr().cast(), len, off as libc::off_t) };
    if n < 0 {
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return (-(e as i64), Vec::new());
    }
    // SAFETY: pread wrote `n` <= `len` bytes there.
    unsafe { data.set_len(n as usize) };
    (n as i64, data)
}

impl Deputy {
    /// Sets up signal handling and the wake-up pipe. Call once, before any other thread.
    pub fn start() -> std::io::Result<Deputy> {
        let mut p = [0; 2];
        // SAFETY: pipe2 fills the array we pass.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let r = move_high(p[0])?;
        let w = move_high(p[1])?;
        WAKE.store(w, Ordering::SeqCst);
        set_handlers();
        unblock_all();
        let out = Arc::new(Link::default());
        let (aux, arx) = mpsc::channel();
        let o2 = out.clone();
        std::thread::Builder::new()
            .name("deputy-out".into())
            .spawn(move || aux_main(arx, o2))?;
        let o3 = out.clone();
        std::thread::Builder::new()
            .name("deputy-ahead".into())
            .spawn(move || read_ahead_main(o3))?;
        let o4 = out.clone();
        std::thread::Builder::new()
            .name("deputy-behind".into())
            .spawn(move || write_behind_main(o4))?;
        let o5 = out.clone();
        std::thread::Builder::new()
            .name("deputy-watch".into())
            .spawn(move || watch_main(o5))?;
        Ok(Deputy {
            workers: HashMap::new(),
            calls: HashMap::new(),
            out,
            aux,
            wake_r: r,
            marks: Arc::new(Mutex::new(Marks::default())),
            max_seq: 0,
            cancelling: Vec::new(),
            arena: None,
        })
    }

    /// Marks the process's state now as checkpoint `id` and says so to home's mosixd
    /// (see marks.rs). Every call of it must be settled.
    pub fn mark(&mut self, id: u64) {
        let result = lock(&self.marks).mark(id, &is_private);
        if let Err(e) = &result {
            tracing::warn!("mark of checkpoint {id}: {e}");
        }
        self.out.send(Some(FromDeputy::Marked { id, result }));
    }

    /// Brings the process's home half back to mark `id` for a process restored from that
    /// checkpoint: every call still being made is cancelled and waited for, descriptors
    /// and streams are put back, `message` goes to its stderr. The highest call sequence
    /// number seen (the restored process numbers its calls after it).
    fn rewind(&mut self, id: u64, message: &str) -> Result<u64, MarkError> {
        // First: calls still queued for workers (sent before now) are not made; what
        // workers remember of calls before is forgotten. Then those being made are
        // cancelled and waited for.
        GENERATION.fetch_add(1, Ordering::SeqCst);
        let busy = |d: &Deputy| -> Vec<u64> {
            d.workers
                .values()
                .map(|w| lock(&w.state).current)
                .filter(|&c| c != 0)
                .collect()
        };
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut i = 0u32;
        loop {
            let now = busy(self);
            if now.is_empty() {
                break;
            }
            if std::time::Instant::now() > end {
                return Err(MarkError::CallStuck);
            }
            if i.is_multiple_of(50) {
                // Again now and then: a cancel may come just before the call starts.
                for seq in now {
                    self.cancel(seq);
                }
                for w in self.workers.values() {
                    let _ = w.tx.send(Job::Forget);
                }
            }
            i += 1;
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.out.ahead.reset();
        lock(&self.marks).rewind(id, &is_private)?;
        if !message.is_empty() {
            let line = format!("{message}\n");
            // SAFETY: a write of our own buffer to the process's stderr.
            unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
        }
        Ok(self.max_seq)
    }

    fn worker(&mut self, tid: i32) -> &Worker {
        let out = self.out.clone();
        let marks = self.marks.clone();
        self.workers.entry(tid).or_insert_with(|| {
            let (tx, rx) = mpsc::channel();
            let state = Arc::new(Mutex::new(WState::default()));
            let s2 = state.clone();
            std::thread::Builder::new()
                .name(format!("call-{tid}"))
                .spawn(move || worker_main(rx, out, s2, marks))
                .expect("a thread for the calls of a thread");
            Worker { tx, state }
        })
    }

    /// Serves the supervisor over `conn` until the process ends (the deputy then exits as
    /// it did) or the connection closes (returns: connect again and serve once more).
    /// `arena`: where its mosixd puts the data of writes behind on this connection.
    pub fn serve(&mut self, conn: UnixStream, arena: Option<Arc<crate::arena::ArenaMap>>) {
        self.arena = arena;
        // A second handle for writing, at a number of ours too.
        let Ok(w) = dup_high(conn.as_raw_fd()) else {
            return;
        };
        // SAFETY: `w` is a fresh duplicate we own.
        self.out
            .attach(unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(w) });
        let _ = self.aux.send(Aux::Flush);
        let mut reader = std::io::BufReader::new(conn);
        loop {
            let buffered = !reader.buffer().is_empty();
            let mut fds = [
                libc::pollfd {
                    fd: reader.get_ref().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake_r,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            if !buffered {
                let wait = if self.cancelling.is_empty() {
                    -1
                } else {
                    RECANCEL_MS
                };
                // SAFETY: poll on two descriptors we own.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
            }
            self.recancel();
            if fds[1].revents != 0 || PENDING.load(Ordering::SeqCst) != 0 {
                let mut b = [0u8; 64];
                // SAFETY: draining our own non-blocking pipe.
                while unsafe { libc::read(self.wake_r, b.as_mut_ptr().cast(), b.len()) } > 0 {}
                let _ = self.aux.send(Aux::Flush);
            }
            if !buffered && fds[0].revents == 0 {
                continue;
            }
            // (Decoded from the frame it arrived in: a write's data is not copied.)
            let msg = wire::recv_bytes(&mut reader)
                .and_then(|f| f.map(|f| ToDeputy::decode_shared(f.into())).transpose());
            let msg = match msg {
                Ok(Some(m)) => self.with_arena_data(m),
                Ok(None) | Err(_) => None,
            };
            let Some(msg) = msg else {
                self.out.detach();
                return;
            };
            self.handle(msg);
        }
    }

    /// A write behind whose data is in the arena, as one whose data came with it; None
    /// if it is not within the arena (not from our mosixd, which checks what it puts
    /// there: the connection is not to be trusted).
    fn with_arena_data(&self, msg: ToDeputy) -> Option<ToDeputy> {
        let ToDeputy::BehindInArena {
            stream,
            n,
            off,
            at,
            len,
            piece,
        } = msg
        else {
            return Some(msg);
        };
        let data = self.arena.as_ref().and_then(|a| a.piece(at, len, piece));
        if data.is_none() {
            tracing::warn!("a write behind outside the arena ({at}+{len})");
        }
        Some(ToDeputy::Behind {
            stream,
            n,
            off,
            data: data?,
        })
    }

    fn handle(&mut self, msg: ToDeputy) {
        match msg {
            ToDeputy::Call(c) => {
                self.max_seq = self.max_seq.max(c.seq);
                self.calls.insert(c.seq, c.tid);
                if self.calls.len() > 8192 {
                    // The oldest half is forgotten (once in 4096 calls, not at each).
                    self.calls.retain(|s, _| *s + 4096 >= c.seq);
                }
                // Positions the process read streams to on its host are set first; the
                // call then ends its descriptors' streams, and waits for the writes
                // behind sent before it.
                self.out.ahead.took(&c.took);
                let writes = self.out.ahead.calling(&c);
                let tid = c.tid;
                let g = GENERATION.load(Ordering::SeqCst);
                let _ = self.worker(tid).tx.send(Job::Call(c, writes, g));
            }
            ToDeputy::Took { took, stop } => {
                self.out.ahead.took(&took);
                if stop {
                    self.out.ahead.stop();
                }
            }
            ToDeputy::Behind {
                stream,
                n,
                off,
                data,
            } => self.out.ahead.behind(stream, n, off, data),
            // Made a Behind as it arrived (serve).
            ToDeputy::BehindInArena { .. } => {}
            ToDeputy::Adopt {
                seq,
                fd,
                path,
                flags,
                offset,
                cloexec,
            } => {
                // A call on it may come next: it waits for this like for a write behind.
                let writes = self.out.ahead.writes_sent();
                let _ = self.aux.send(Aux::Adopt {
                    seq,
                    fd,
                    path,
                    flags,
                    offset,
                    cloexec,
                    writes,
                });
            }
            ToDeputy::Sync { seq, took } => {
                self.out.ahead.took(&took);
                let _ = self.aux.send(Aux::Synced { seq });
            }
            ToDeputy::Cancel { seq } => self.cancel(seq),
            ToDeputy::Retry { seq, block } => self.to_worker_of(seq, Job::Again { block }),
            ToDeputy::Drop { seq } => self.to_worker_of(seq, Job::Forget),
            ToDeputy::Stopped { sig } => {
                // The process stopped: so does its home half, by the same signal (the shell
                // sees it stopped as it would have); SIGCONT resumes us and is passed on,
                // resuming it.
                let job = matches!(sig, libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU);
                // SAFETY: default action for the stop signal, a signal to ourselves, then
                // our handlers again.
                unsafe {
                    if job {
                        libc::signal(sig, libc::SIG_DFL);
                        libc::kill(libc::getpid(), sig);
                    } else {
                        libc::kill(libc::getpid(), libc::SIGSTOP);
                    }
                }
                if job {
                    set_handlers();
                }
            }
            // The process is gone: what it wrote behind is made; nothing of it is to be
            // sent any more.
            ToDeputy::Exited(st) => {
                self.out.ahead.finish();
                end_as(st)
            }
            ToDeputy::Lost { message } => {
                let line = format!("{message}\n");
                // SAFETY: a write of our own buffer to the process's stderr.
                unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
                end_as(ExitStatus::Code(137))
            }
            ToDeputy::Describe { seq, fd } => {
                let writes = self.out.ahead.writes_sent();
                let _ = self.aux.send(Aux::Describe { seq, fd, writes });
            }
            ToDeputy::ReadAt { seq, fd, off, len } => {
                let writes = self.out.ahead.writes_sent();
                let _ = self.aux.send(Aux::ReadAt {
                    seq,
                    fd,
                    off,
                    len,
                    writes,
                });
            }
            ToDeputy::Mark { id } => self.mark(id),
            ToDeputy::Rewind { id, message } => {
                let result = self.rewind(id, &message);
                if let Err(e) = &result {
                    tracing::warn!("rewind to checkpoint {id}: {e}");
                }
                self.out.send(Some(FromDeputy::Rewound { id, result }));
            }
            ToDeputy::KeepMarks { from } => lock(&self.marks).keep_from(from),
            ToDeputy::DropMark { id } => lock(&self.marks).drop_mark(id),
        }
    }

    fn to_worker_of(&self, seq: u64, job: Job) {
        if let Some(w) = self.calls.get(&seq).and_then(|t| self.workers.get(t)) {
            let _ = w.tx.send(job);
        }
    }

    fn cancel(&mut self, seq: u64) {
        let Some(w) = self.calls.get(&seq).and_then(|t| self.workers.get(t)) else {
            return;
        };
        let mut s = lock(&w.state);
        s.cancelled.insert(seq);
        if s.current == seq && s.tid != 0 {
            interrupt(s.tid);
            if !self.cancelling.contains(&seq) {
                self.cancelling.push(seq);
            }
        }
    }

    /// Cancelled calls their workers are still making are interrupted again. A worker
    /// looks for its call's cancel last just before the call begins: a signal that came
    /// after that look and before the kernel blocked the call was spent on nothing, and
    /// the call (a read of an idle terminal, say) would wait for ever. Sent again only
    /// once the last one was taken, so signals never pile up on a call that cannot be
    /// interrupted.
    fn recancel(&mut self) {
        let (calls, workers) = (&self.calls, &self.workers);
        self.cancelling.retain(|seq| {
            let Some(w) = calls.get(seq).and_then(|t| workers.get(t)) else {
                return false;
            };
            let s = lock(&w.state);
            if s.current != *seq || !s.cancelled.contains(seq) {
                return false;
            }
            if !CANCELLING.iter().any(|c| c.load(Ordering::SeqCst) == s.tid) {
                interrupt(s.tid);
            }
            true
        });
    }
}

/// Interrupts the call of worker thread `tid` with [`SIG_CANCEL`], marked as ours (not
/// the process's) for its handler. Called with the worker's state locked, so that it is
/// still in the call cancelled.
fn interrupt(tid: i32) {
    for c in &CANCELLING {
        if c.compare_exchange(0, tid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            break;
        }
    }
    // SAFETY: a signal to a live worker thread of this process (it only exits with the
    // process).
    unsafe {
        libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, SIG_CANCEL);
    }
}
