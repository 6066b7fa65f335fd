//! The deputy's side of read-ahead and write-behind (docs/transparency.md, "Bulk I/O";
//! the host's side is [`crate::streams`]).
//!
//! - Read-ahead: after a forwarded `read` (or `pread`) of a regular file that continues
//!   the last one on its descriptor, the deputy begins a stream: a thread of its own reads
//!   the file further (pread: the descriptor's offset is untouched) and sends the bytes to
//!   the host, at most [`WINDOW`] past what the process has read there. The host answers
//!   the process's reads from them and tells where it read to ([`Took`]): for a stream of
//!   `read`s the offset here is moved there, in order with the calls. A call on the
//!   descriptor ends its stream here (after its positions are set); a change of the file
//!   (inotify, by anyone) is told to the host as [`FromDeputy::Stale`] before anything sent
//!   after it.
//! - Write-behind: after two forwarded writes in a row to a regular file that can take
//!   them (no O_SYNC/O_DIRECT, no seals, no file-size limit, free space and quota far
//!   above what may be in flight), the deputy grants the host credit to answer further
//!   writes at once. They come here as [`ToDeputy::Behind`] and are made by a thread of
//!   their own, in order, before any call that came after them (every call waits for the
//!   writes sent before it). A write that fails all the same is reported by the next
//!   write, fsync or close of its descriptor (as Linux reports a failed write-back).

use crate::spec::{self, Arg};
use crate::wire::{Begin, Bytes, Call, FromDeputy, Kind, Took};
use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard};

pub use crate::streams::WINDOW;
/// Bytes read ahead per message.
pub(crate) const CHUNK: u64 = 512 << 10;
/// Free space (and quota) that must remain beyond what may be written behind.
const MARGIN: u64 = 1 << 30;
/// Streams followed at once.
const MAX: usize = 16;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn fstat(fd: RawFd) -> Option<libc::stat> {
    // SAFETY: fstat fills a struct of ours; a bad descriptor fails with EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st)
}

/// Whether another descriptor of this process shares `fd`'s open file (and offset).
fn shared(fd: RawFd, private: &dyn Fn(u64) -> bool) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return true;
    };
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    for e in dir.flatten() {
        let Some(other) = e.file_name().to_str().and_then(|n| n.parse::<RawFd>().ok()) else {
            continue;
        };
        if other == fd || private(other as u64) {
            continue;
        }
        // SAFETY: kcmp compares two descriptors of this process; no memory involved.
        let r = unsafe {
            libc::syscall(libc::SYS_kcmp, me, me, 0 /* KCMP_FILE */, fd, other)
        };
        if r == 0 || r < 0 && errno() != libc::EBADF {
            return true;
        }
    }
    false
}

/// Whether writes of up to `room` more bytes to the file behind `fd` cannot fail for
/// want of space, quota or size limit.
fn has_room(fd: RawFd, room: u64) -> bool {
    let need = MARGIN + room;
    // SAFETY: getrlimit fills a struct of ours.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: as above.
    if unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) } != 0
        || lim.rlim_cur != libc::RLIM_INFINITY
    {
        return false;
    }
    // SAFETY: fstatvfs fills a struct of ours.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatvfs(fd, &mut vfs) } != 0 || vfs.f_bavail * vfs.f_frsize < need {
        return false;
    }
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    for (kind, id) in [(0u32, uid), (1, gid)] {
        // SAFETY: dqblk is plain data.
        let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
        let cmd = (libc::Q_GETQUOTA << 8) | kind as i32;
        // SAFETY: quotactl_fd reads the quota of `id` on `fd`'s file system into `q`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_quotactl_fd,
                fd,
                cmd,
                id,
                &mut q as *mut libc::dqblk,
            )
        };
        if r == 0 {
            for lim in [q.dqb_bhardlimit, q.dqb_bsoftlimit] {
                if lim != 0 && lim.saturating_mul(1024) < q.dqb_curspace.saturating_add(need) {
                    return false;
                }
            }
        } else if !matches!(
            errno(),
            libc::ESRCH | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY | 524
        ) {
            return false;
        }
    }
    // Project quotas: a file's project is not ours to look up; none must be on.
    // SAFETY: if_dqinfo is 24 bytes of plain data.
    let mut info = [0u8; 64];
    let cmd = (0x800005 << 8) | 2; // Q_GETINFO, PRJQUOTA
                                   // SAFETY: quotactl_fd writes at most a struct if_dqinfo into `info`.
    let r = unsafe { libc::syscall(libc::SYS_quotactl_fd, fd, cmd, 0, info.as_mut_ptr()) };
    r != 0
}

struct ReadStream {
    fd: RawFd,
    kind: Kind,
    file: (u64, u64),
    /// The next offset to read.
    next: u64,
    /// Read up to here (the host's position plus the window).
    limit: u64,
    /// Still reading (not at the end, not stopped, not stale).
    reading: bool,
    /// The answer that began it was sent (it reads from then on).
    started: bool,
    /// Read kind: the descriptor's offset as last set from the host's positions.
    applied: u64,
    wd: i32,
}

struct WriteStream {
    fd: RawFd,
    file: (u64, u64),
    /// Writes made (their count and bytes), credit granted (bytes, in all).
    made: u64,
    bytes: u64,
    granted: u64,
    /// It may grow (its descriptor was not closed, nothing failed).
    open: bool,
    failed: bool,
}

/// A write sent behind, waiting to be made.
struct Pending {
    stream: u64,
    n: u64,
    off: Option<u64>,
    data: Bytes,
}

#[derive(Default)]
struct State {
    reads: HashMap<u64, ReadStream>,
    /// Where the last read of each descriptor ended, and how (sequential reads begin a
    /// stream).
    last_end: HashMap<RawFd, (u64, Kind)>,
    writes: HashMap<u64, WriteStream>,
    /// Full writes in a row on each descriptor.
    wrote: HashMap<RawFd, u32>,
    /// A write made behind failed: the errno the descriptor's next write, fsync or close
    /// gets.
    deferred: HashMap<RawFd, i32>,
    inotify: Option<RawFd>,
    /// Writes behind: sent, made (their counts), and those waiting.
    enqueued: u64,
    applied: u64,
    queue: VecDeque<Pending>,
    /// The process ended: the threads stop.
    done: bool,
}

/// Read-ahead and write-behind of one deputy: shared by its main thread (which applies
/// the host's messages in order), its call workers, its reading and writing threads, and
/// its way out (which reports changed files first).
#[derive(Default)]
pub struct Ahead {
    st: Mutex<State>,
    /// The reading thread waits for work.
    read_cv: Condvar,
    /// The writing thread waits for writes; calls wait for writes to be made.
    write_cv: Condvar,
    made_cv: Condvar,
    /// The watching thread waits for the inotify descriptor to exist.
    watch_cv: Condvar,
}

/// A piece of a file to read ahead: of `stream`, on descriptor `fd` (the file `file`),
/// `len` bytes from `off`.
pub struct Piece {
    pub stream: u64,
    pub fd: RawFd,
    pub kind: Kind,
    pub file: (u64, u64),
    pub off: u64,
    pub len: u64,
}

/// How a sent message of a stream fares.
pub enum Send {
    /// Send it.
    Yes,
    /// The stream ended meanwhile: drop it.
    No,
}

impl Ahead {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The descriptors a call acts on (and the range of a close_range).
    fn fds_of(call: &Call) -> (Vec<RawFd>, Option<(u64, u64)>) {
        let Some(s) = crate::exec::spec_of(call) else {
            return (Vec::new(), None);
        };
        let fds = s
            .args
            .iter()
            .enumerate()
            .filter(|(_, a)| **a == Arg::Fd)
            .map(|(i, _)| call.args[i] as RawFd)
            .collect();
        let range = (call.nr == libc::SYS_close_range).then_some((call.args[0], call.args[1]));
        (fds, range)
    }

    /// Main thread, in order: the host's positions. A stream of reads moves its
    /// descriptor's offset there; every stream may read further.
    pub fn took(&self, took: &[Took]) {
        let mut st = self.lock();
        let mut wake = false;
        for t in took {
            let Some(r) = st.reads.get_mut(&t.stream) else {
                continue;
            };
            if r.kind == Kind::Read && t.upto > r.applied {
                r.applied = t.upto;
                // SAFETY: lseek on the process's descriptor, which this stream follows
                // (a call that could have changed it would have ended the stream).
                unsafe { libc::lseek(r.fd, t.upto as libc::off_t, libc::SEEK_SET) };
            }
            if t.upto + WINDOW > r.limit {
                r.limit = t.upto + WINDOW;
                wake = true;
            }
        }
        if wake {
            self.read_cv.notify_all();
        }
    }

    /// Main thread: the process is frozen for a move: no stream reads further (positions
    /// still arrive).
    pub fn stop(&self) {
        let mut st = self.lock();
        for r in st.reads.values_mut() {
            r.reading = false;
        }
        for w in st.writes.values_mut() {
            w.open = false;
        }
    }

    /// Main thread, after setting the call's positions and before handing it to a worker:
    /// its descriptors' streams end (the call may change what they follow). Returns the
    /// number of writes behind it must wait for.
    pub fn calling(&self, call: &Call) -> u64 {
        let (fds, range) = Self::fds_of(call);
        let hit = |fd: RawFd| {
            fds.contains(&fd) || range.is_some_and(|(a, b)| (a..=b).contains(&(fd as u64)))
        };
        let mut st = self.lock();
        let gone: Vec<u64> = st
            .reads
            .iter()
            .filter(|(_, r)| hit(r.fd))
            .map(|(s, _)| *s)
            .collect();
        for s in gone {
            self.end_read(&mut st, s);
        }
        let reading = matches!(call.nr, libc::SYS_read | libc::SYS_pread64);
        let writing = matches!(call.nr, libc::SYS_write | libc::SYS_pwrite64);
        for fd in &fds {
            if !reading {
                st.last_end.remove(fd);
            }
            if !writing {
                st.wrote.remove(fd);
            }
        }
        if range.is_some() {
            st.last_end.retain(|fd, _| !hit(*fd));
            st.wrote.retain(|fd, _| !hit(*fd));
        }
        let closes = matches!(
            call.nr,
            libc::SYS_close | libc::SYS_dup2 | libc::SYS_dup3 | libc::SYS_close_range
        ) || (call.nr == libc::SYS_fcntl && call.args[1] as i32 == libc::F_SETFL);
        if closes {
            for w in st.writes.values_mut().filter(|w| hit(w.fd)) {
                w.open = false;
            }
        }
        st.enqueued
    }

    fn end_read(&self, st: &mut State, s: u64) {
        if let Some(r) = st.reads.remove(&s) {
            if !st.reads.values().any(|o| o.wd == r.wd) {
                if let Some(i) = st.inotify {
                    // SAFETY: removes a watch of our own inotify descriptor.
                    unsafe { libc::inotify_rm_watch(i, r.wd) };
                }
            }
        }
    }

    /// How many writes were sent behind so far (what comes now waits for them).
    pub fn writes_sent(&self) -> u64 {
        self.lock().enqueued
    }

    /// Worker: waits until the first `n` writes behind are made.
    pub fn wait_writes(&self, n: u64) {
        let mut st = self.lock();
        while st.applied < n && !st.done {
            st = self.made_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Worker, before making `call`: the error of a failed write behind on its descriptor,
    /// if the call is one that reports it (write, fsync, close...). A close is made all
    /// the same.
    pub fn deferred(&self, call: &Call) -> Option<i32> {
        let reports = matches!(
            call.nr,
            libc::SYS_write
                | libc::SYS_pwrite64
                | libc::SYS_writev
                | libc::SYS_pwritev
                | libc::SYS_pwritev2
                | libc::SYS_fsync
                | libc::SYS_fdatasync
                | libc::SYS_sync_file_range
                | libc::SYS_close
        );
        if !reports {
            return None;
        }
        self.lock().deferred.remove(&(call.args[0] as RawFd))
    }

    /// Worker, after call `seq` (`nr`, `args`) was made with result `ret`, before its
    /// answer is sent: a read or write that continues the last one may begin a stream,
    /// told with the answer. A stream of reads reads only once [`Ahead::go`] says so.
    pub fn after(
        &self,
        seq: u64,
        nr: i64,
        args: &[u64; 6],
        ret: i64,
        private: &dyn Fn(u64) -> bool,
    ) -> Option<Begin> {
        let fd = args[0] as RawFd;
        let asked = args[2].min(spec::MAX_IO as u64);
        if ret <= 0 || ret as u64 != asked || private(fd as u64) {
            return None;
        }
        match nr {
            libc::SYS_read | libc::SYS_pread64 => {
                self.after_read(seq, nr, fd, args, ret as u64, private)
            }
            libc::SYS_write | libc::SYS_pwrite64 => self.after_write(seq, fd),
            _ => None,
        }
    }

    /// Worker, once the answer of call `seq` is sent: the stream it began reads.
    pub fn go(&self, seq: u64) {
        let mut st = self.lock();
        if let Some(r) = st.reads.get_mut(&seq) {
            if !r.started {
                r.started = true;
                r.reading = true;
                self.read_cv.notify_all();
            }
        }
    }

    fn after_read(
        &self,
        seq: u64,
        nr: i64,
        fd: RawFd,
        args: &[u64; 6],
        got: u64,
        private: &dyn Fn(u64) -> bool,
    ) -> Option<Begin> {
        let (kind, start) = if nr == libc::SYS_read {
            // SAFETY: lseek only reads the process's descriptor's offset.
            let at = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
            if at < 0 {
                return None;
            }
            (Kind::Read, (at as u64).saturating_sub(got))
        } else {
            (Kind::Pread, args[3])
        };
        let end = start + got;
        let sequential = {
            let mut st = self.lock();
            let prev = st.last_end.insert(fd, (end, kind));
            prev == Some((start, kind)) && st.reads.len() < MAX && !st.done
        };
        if !sequential {
            return None;
        }
        let stat = fstat(fd)?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        // A stream of reads moves the offset: no other descriptor may share it.
        if kind == Kind::Read && shared(fd, private) {
            return None;
        }
        let mut st = self.lock();
        if st.inotify.is_none() {
            // SAFETY: a new inotify descriptor, moved out of the process's numbers.
            let i = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
            if i < 0 {
                return None;
            }
            match crate::deputy::move_high(i) {
                Ok(i) => {
                    st.inotify = Some(i);
                    self.watch_cv.notify_all();
                }
                Err(_) => {
                    // SAFETY: our own descriptor.
                    unsafe { libc::close(i) };
                    return None;
                }
            }
        }
        let ino = st.inotify?;
        let path = format!("/proc/self/fd/{fd}\0");
        // SAFETY: a NUL-terminated path of ours; the watch follows the descriptor's file.
        let wd = unsafe { libc::inotify_add_watch(ino, path.as_ptr().cast(), libc::IN_MODIFY) };
        if wd < 0 {
            return None;
        }
        let file = (stat.st_dev, stat.st_ino);
        st.reads.insert(
            seq,
            ReadStream {
                fd,
                kind,
                file,
                next: end,
                limit: end + WINDOW,
                reading: false,
                started: false,
                applied: end,
                wd,
            },
        );
        Some(Begin::Ahead {
            kind,
            file,
            from: end,
        })
    }

    fn after_write(&self, seq: u64, fd: RawFd) -> Option<Begin> {
        {
            let mut st = self.lock();
            if st.done {
                return None;
            }
            // A write that came here with a grant open: the host did not take it, or used
            // it up; a new one replaces it.
            for w in st.writes.values_mut().filter(|w| w.fd == fd) {
                w.open = false;
            }
            // A closed stream's writes still come (other threads may have written behind
            // on it meanwhile): it is kept, the oldest forgotten past a bound.
            if st.writes.len() > 16 * MAX {
                let queued: std::collections::HashSet<u64> =
                    st.queue.iter().map(|p| p.stream).collect();
                let mut old: Vec<u64> = st
                    .writes
                    .iter()
                    .filter(|(s, w)| !w.open && !queued.contains(s))
                    .map(|(s, _)| *s)
                    .collect();
                old.sort();
                for s in old.iter().take(MAX) {
                    st.writes.remove(s);
                }
            }
            let n = st.wrote.entry(fd).or_insert(0);
            *n += 1;
            if *n < 2 || st.writes.values().filter(|w| w.open).count() >= MAX {
                return None;
            }
        }
        let stat = fstat(fd)?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        // SAFETY: F_GETFL and F_GET_SEALS only read the descriptor's state.
        let (fl, seals) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GET_SEALS),
            )
        };
        if fl < 0 || fl & (libc::O_SYNC | libc::O_DSYNC | libc::O_DIRECT) != 0 {
            return None;
        }
        if seals > 0
            && seals & (libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE) != 0
        {
            return None;
        }
        if !has_room(fd, WINDOW) {
            return None;
        }
        let file = (stat.st_dev, stat.st_ino);
        let mut st = self.lock();
        st.writes.insert(
            seq,
            WriteStream {
                fd,
                file,
                made: 0,
                bytes: 0,
                granted: WINDOW,
                open: true,
                failed: false,
            },
        );
        Some(Begin::Behind {
            file,
            credit: WINDOW,
        })
    }

    /// Main thread: a write sent behind, to be made in order.
    pub fn behind(&self, stream: u64, n: u64, off: Option<u64>, data: Bytes) {
        let mut st = self.lock();
        st.enqueued += 1;
        st.queue.push_back(Pending {
            stream,
            n,
            off,
            data,
        });
        self.write_cv.notify_all();
    }

    /// Main thread, before the process is brought back to a checkpoint (its host died):
    /// the writes behind sent so far are made (the checkpoint's offsets are put back
    /// after), and every stream, grant and failed write of the dead copy is forgotten:
    /// the restored process begins its own.
    pub fn reset(&self) {
        let mut st = self.lock();
        while st.applied < st.enqueued && !st.done {
            st = self.made_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let streams: Vec<u64> = st.reads.keys().copied().collect();
        for s in streams {
            self.end_read(&mut st, s);
        }
        st.writes.clear();
        st.last_end.clear();
        st.wrote.clear();
        st.deferred.clear();
    }

    /// Main thread: the process ended: waits for every write behind to be made.
    pub fn finish(&self) {
        let mut st = self.lock();
        while st.applied < st.enqueued {
            st = self.made_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.done = true;
        self.read_cv.notify_all();
        self.write_cv.notify_all();
        self.watch_cv.notify_all();
    }

    /// Watching thread: waits until a file read ahead may have changed (its inotify
    /// descriptor is readable); then the way out is to send what that means, even when
    /// nothing else is sent (a reader at the end of a file that grows). False: the
    /// process ended.
    pub fn watch(&self) -> bool {
        let ino = {
            let mut st = self.lock();
            loop {
                if st.done {
                    return false;
                }
                if let Some(i) = st.inotify {
                    break i;
                }
                st = self.watch_cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let mut p = libc::pollfd {
            fd: ino,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on our own descriptor.
        unsafe { libc::poll(&mut p, 1, 1000) };
        true
    }

    /// The way out, before anything is sent: the streams whose files changed since it
    /// last looked (they end), to be told first.
    pub fn stale(&self) -> Option<FromDeputy> {
        let mut st = self.lock();
        let ino = st.inotify?;
        let mut changed: Vec<i32> = Vec::new();
        let mut all = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads events into our buffer from our non-blocking descriptor.
            let n = unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut at = 0usize;
            while at + 16 <= n as usize {
                let wd = i32::from_ne_bytes(buf[at..at + 4].try_into().expect("4"));
                let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().expect("4"));
                let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().expect("4"));
                if mask & libc::IN_Q_OVERFLOW != 0 {
                    all = true;
                }
                changed.push(wd);
                at += 16 + len as usize;
            }
        }
        if changed.is_empty() && !all || st.reads.is_empty() {
            return None;
        }
        let gone: Vec<u64> = st
            .reads
            .iter()
            .filter(|(_, r)| all || changed.contains(&r.wd))
            .map(|(s, _)| *s)
            .collect();
        if gone.is_empty() {
            return None;
        }
        for s in &gone {
            // No more reading ahead; positions the host sends still apply.
            if let Some(r) = st.reads.get_mut(s) {
                r.reading = false;
            }
        }
        Some(FromDeputy::Stale { streams: gone })
    }

    /// The way out, about to send a read-ahead message of stream `s` at `off`: whether
    /// the stream still wants it (and it is then counted as sent).
    pub fn sending(&self, s: u64, off: u64, len: u64, eof: bool) -> Send {
        let mut st = self.lock();
        match st.reads.get_mut(&s) {
            Some(r) if r.reading && r.next == off => {
                r.next = off + len;
                if eof {
                    r.reading = false;
                }
                Send::Yes
            }
            _ => Send::No,
        }
    }

    /// Reading thread: the next piece to read ahead (waits for one). None: the process
    /// ended.
    pub fn next_read(&self) -> Option<Piece> {
        let mut st = self.lock();
        loop {
            if st.done {
                return None;
            }
            let pick = st
                .reads
                .iter()
                .filter(|(_, r)| r.reading && r.next < r.limit)
                .min_by_key(|(_, r)| r.next)
                .map(|(s, r)| Piece {
                    stream: *s,
                    fd: r.fd,
                    kind: r.kind,
                    file: r.file,
                    off: r.next,
                    len: (r.limit - r.next).min(CHUNK),
                });
            if let Some(p) = pick {
                return Some(p);
            }
            st = self.read_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Writing thread: the next write behind (waits for one); None: the process ended.
    fn next_write(&self) -> Option<Pending> {
        let mut st = self.lock();
        loop {
            if let Some(p) = st.queue.pop_front() {
                return Some(p);
            }
            if st.done {
                return None;
            }
            st = self.write_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Writing thread: makes the writes behind in order; what to send after each (a
    /// grant: more credit and how many are made; or the end of a stream that failed).
    pub fn write_loop(&self, send: &dyn Fn(FromDeputy)) {
        while let Some(p) = self.next_write() {
            let m = self.make(p);
            if let Some(m) = m {
                send(m);
            }
        }
    }

    fn make(&self, p: Pending) -> Option<FromDeputy> {
        let (fd, skip) = {
            let st = self.lock();
            match st.writes.get(&p.stream) {
                Some(w) => (w.fd, w.failed || p.n != w.made),
                None => (-1, true),
            }
        };
        let mut err = 0;
        if !skip {
            let mut done = 0usize;
            while done < p.data.len() {
                let rest = &p.data[done..];
                // SAFETY: write/pwrite of our buffer to the process's descriptor (its
                // writes behind come before any call that could close it).
                let n = unsafe {
                    match p.off {
                        None => libc::write(fd, rest.as_ptr().cast(), rest.len()),
                        Some(o) => libc::pwrite(
                            fd,
                            rest.as_ptr().cast(),
                            rest.len(),
                            (o + done as u64) as libc::off_t,
                        ),
                    }
                };
                if n < 0 && errno() == libc::EINTR {
                    continue;
                }
                if n <= 0 {
                    err = if n == 0 { libc::ENOSPC } else { errno() };
                    break;
                }
                done += n as usize;
            }
        }
        let mut st = self.lock();
        st.applied += 1;
        self.made_cv.notify_all();
        let more = st.queue.is_empty();
        let w = st.writes.get_mut(&p.stream)?;
        if skip {
            return None;
        }
        if err != 0 {
            w.failed = true;
            w.open = false;
            let fd = w.fd;
            st.deferred.insert(fd, err);
            return Some(FromDeputy::Revoke { stream: p.stream });
        }
        w.made += 1;
        w.bytes += p.data.len() as u64;
        let (fd, file, made, bytes, granted, open) =
            (w.fd, w.file, w.made, w.bytes, w.granted, w.open);
        // Credit grows as writes are made, while the file has room; the host hears how
        // many are made (it keeps them until then) now and then, and when none is left.
        let grow = open && bytes + WINDOW >= granted + WINDOW / 4;
        if !grow && !more && made % 8 != 0 {
            return None;
        }
        drop(st);
        let credit = if grow && has_room(fd, WINDOW) {
            bytes + WINDOW
        } else {
            granted
        };
        let mut st = self.lock();
        let w = st.writes.get_mut(&p.stream)?;
        w.granted = w.granted.max(credit);
        Some(FromDeputy::Grant {
            stream: p.stream,
            fd,
            file,
            credit: w.granted,
            applied: made,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    fn write_call(fd: RawFd) -> Call {
        Call {
            seq: 9,
            tid: 1,
            nr: libc::SYS_write,
            args: [fd as u64, 0, 1, 0, 0, 0],
            bufs: Vec::new(),
            took: Vec::new(),
        }
    }

    #[test]
    fn writes_behind_are_made_in_order_and_a_failed_one_is_reported_once() {
        let d = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(d.path().join("f"))
            .unwrap();
        let fd = f.as_raw_fd();
        let a = Arc::new(Ahead::default());
        let none = |_: u64| false;
        // Two forwarded writes in a row begin write-behind.
        let args = [fd as u64, 0, 5, 0, 0, 0];
        assert!(a.after(1, libc::SYS_write, &args, 5, &none).is_none());
        let b = a.after(2, libc::SYS_write, &args, 5, &none);
        assert!(
            matches!(b, Some(Begin::Behind { credit: WINDOW, .. })),
            "{b:?}"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let a2 = a.clone();
        let t = std::thread::spawn(move || {
            let tx = Mutex::new(tx);
            a2.write_loop(&|m| {
                let _ = tx.lock().unwrap().send(m);
            })
        });
        a.behind(2, 0, None, b"hello ".to_vec().into());
        a.behind(2, 1, Some(100), b"far".to_vec().into());
        // A duplicate (sent again after a broken link) is made once.
        a.behind(2, 0, None, b"hello ".to_vec().into());
        a.wait_writes(3);
        let got = std::fs::read(d.path().join("f")).unwrap();
        assert_eq!(&got[..6], b"hello ");
        assert_eq!(&got[100..], b"far");
        // The descriptor now refuses writes: the next write behind fails; the host hears
        // the stream ends, and the next write on the descriptor gets the error, once.
        let ro = std::fs::File::open(d.path().join("f")).unwrap();
        // SAFETY: dup2 of our own descriptors.
        assert_eq!(unsafe { libc::dup2(ro.as_raw_fd(), fd) }, fd);
        a.behind(2, 2, None, b"lost".to_vec().into());
        loop {
            match rx.recv().unwrap() {
                FromDeputy::Revoke { stream: 2 } => break,
                FromDeputy::Grant { .. } => {}
                m => panic!("{m:?}"),
            }
        }
        assert_eq!(a.deferred(&write_call(fd)), Some(libc::EBADF));
        assert_eq!(a.deferred(&write_call(fd)), None);
        // What comes for it after the failure is dropped.
        a.behind(2, 3, None, b"more".to_vec().into());
        a.finish();
        t.join().unwrap();
        assert_eq!(a.lock().applied, 5);
    }
}
