//! A deputy's marks: what bringing its process back to a checkpoint needs at home, so that
//! a process restored from a checkpoint after the death of its host goes on with nothing
//! delivered twice (docs/checkpoint.md, "Recovery").
//!
//! At a mark (the process frozen for a checkpoint, every call of it settled) the deputy
//! keeps a duplicate of each descriptor of the process (so that one it closes or replaces
//! later can be put back), with its flags and offset, and the positions of the streams
//! it writes to and reads from (pipes, terminals, sockets: what cannot be rewound).
//! Rewinding to a mark puts the descriptors back as they were, regular files at their
//! offsets (a job that writes the same bytes again writes them at the same place); of
//! what the process writes again to a stream, as much as had already gone out is dropped;
//! what it reads again from one is given from a log of what it read since the mark (at
//! most [`MAX_LOG`] bytes in all; past that, older marks cannot be rewound to).
//!
//! Only `read`, `readv`, `write` and `writev` are counted; other calls on streams
//! (`send*`, `recv*`, `splice`, `sendfile`) are not.

use crate::wire::{Back, Buf, Call, FdType, HomeFd, MarkError, MarkedAt, Reply};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

/// The most bytes read from streams kept for replays, over all streams.
pub const MAX_LOG: usize = 16 << 20;
/// Marks kept at once (beyond: the oldest is dropped).
const MAX_MARKS: usize = 3;

/// A stream: (device, inode) of a pipe, terminal, socket or other file without offsets.
pub type Key = (u64, u64);

/// Positions of the streams at a mark: (bytes written, bytes read).
pub type Positions = HashMap<Key, (u64, u64)>;

#[derive(Clone, Debug, Default)]
struct Stream {
    /// Bytes the process has written to it, and the most that ever went out.
    wpos: u64,
    out: u64,
    /// Bytes it has read from it. The log holds bytes `base ..` of what was read from the
    /// stream itself; `ends` are the positions where each of those reads ended (a replay
    /// gives a read at most what the original read got, as a terminal gives a line).
    rpos: u64,
    base: u64,
    log: Vec<u8>,
    ends: Vec<u64>,
}

impl Stream {
    fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }
}

/// The positions of every stream, and the log of what was read (pure: no descriptors).
#[derive(Debug, Default)]
pub struct Streams {
    map: HashMap<Key, Stream>,
    logged: usize,
    /// Reads are logged (some mark is kept).
    logging: bool,
}

impl Streams {
    /// How many of the bytes of a write to `k` went out already (to be dropped).
    pub fn write_skip(&self, k: Key) -> u64 {
        self.map.get(&k).map_or(0, |s| s.out.saturating_sub(s.wpos))
    }

    /// The process wrote `n` bytes to `k` (dropped or not).
    pub fn wrote(&mut self, k: Key, n: u64) {
        let s = self.map.entry(k).or_default();
        s.wpos += n;
        s.out = s.out.max(s.wpos);
    }

    /// What a read of at most `cap` bytes from `k` gets again from the log, if the
    /// process is behind what was read from the stream.
    pub fn replay(&mut self, k: Key, cap: usize) -> Option<Vec<u8>> {
        let s = self.map.get_mut(&k)?;
        let end = s.end();
        if s.rpos >= end || s.rpos < s.base || cap == 0 {
            return None;
        }
        let next = s.ends.iter().copied().find(|&e| e > s.rpos).unwrap_or(end);
        let n = (next - s.rpos).min(cap as u64) as usize;
        let from = (s.rpos - s.base) as usize;
        let d = s.log[from..from + n].to_vec();
        s.rpos += n as u64;
        Some(d)
    }

    /// The process read `data` from the stream `k` itself.
    pub fn read(&mut self, k: Key, data: &[u8]) {
        let logging = self.logging;
        let s = self.map.entry(k).or_default();
        s.rpos = s.rpos.max(s.end()) + data.len() as u64;
        if logging {
            s.log.extend_from_slice(data);
            s.ends.push(s.rpos);
            self.logged += data.len();
        } else {
            s.base = s.rpos;
            s.log.clear();
            s.ends.clear();
        }
        if self.logged > MAX_LOG {
            // Too much to keep: marks before now can no longer be rewound to.
            for s in self.map.values_mut() {
                s.base = s.end();
                s.log.clear();
                s.ends.clear();
            }
            self.logged = 0;
        }
    }

    /// Where every stream is now.
    pub fn positions(&self) -> Positions {
        self.map
            .iter()
            .map(|(k, s)| (*k, (s.wpos, s.rpos)))
            .collect()
    }

    /// Whether the streams can be put back to `pos`; why not.
    pub fn can_rewind(&self, pos: &Positions) -> Result<(), MarkError> {
        for (k, s) in &self.map {
            let (_, r) = pos.get(k).copied().unwrap_or((0, 0));
            if r < s.base {
                return Err(MarkError::StreamsTooFar {
                    max_mib: (MAX_LOG >> 20) as u64,
                });
            }
        }
        Ok(())
    }

    /// Puts every stream back to `pos` (a stream it does not have was not used then).
    pub fn rewind(&mut self, pos: &Positions) -> Result<(), MarkError> {
        self.can_rewind(pos)?;
        for (k, s) in self.map.iter_mut() {
            let (w, r) = pos.get(k).copied().unwrap_or((0, 0));
            s.wpos = w;
            s.rpos = r;
        }
        Ok(())
    }

    /// Keeps the logs from the oldest of `kept` (marks still kept) on; none: no logging.
    pub fn trim(&mut self, kept: &[&Positions]) {
        self.logging = !kept.is_empty();
        let mut logged = 0;
        for (k, s) in self.map.iter_mut() {
            let low = kept
                .iter()
                .map(|p| p.get(k).map_or(0, |x| x.1))
                .min()
                .unwrap_or(s.rpos)
                .min(s.rpos)
                .max(s.base);
            let cut = ((low - s.base) as usize).min(s.log.len());
            s.log.drain(..cut);
            s.base += cut as u64;
            s.ends.retain(|&e| e > s.base);
            logged += s.log.len();
        }
        self.logged = logged;
    }
}

/// The deputy's own duplicates of the process's descriptors (see [`is_saved`]).
static SAVED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
/// The lowest and highest of them (a quick test for most numbers).
static SAVED_LO: AtomicI32 = AtomicI32::new(i32::MAX);
static SAVED_HI: AtomicI32 = AtomicI32::new(-1);

fn saved_set() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    SAVED.lock().unwrap_or_else(|p| p.into_inner())
}

fn saved_bounds(s: &BTreeSet<i32>) {
    SAVED_LO.store(s.first().copied().unwrap_or(i32::MAX), Ordering::SeqCst);
    SAVED_HI.store(s.last().copied().unwrap_or(-1), Ordering::SeqCst);
}

/// Whether `fd` is one of the duplicates kept for marks (never the process's).
pub fn is_saved(fd: i64) -> bool {
    if fd < SAVED_LO.load(Ordering::SeqCst) as i64 || fd > SAVED_HI.load(Ordering::SeqCst) as i64 {
        return false;
    }
    saved_set().contains(&(fd as i32))
}

/// One descriptor kept at a mark.
#[derive(Debug)]
struct Saved {
    fd: i32,
    dup: i32,
    fdflags: i32,
    flflags: i32,
    pos: Option<i64>,
}

#[derive(Debug)]
struct Mark {
    id: u64,
    saved: Vec<Saved>,
    pos: Positions,
    /// The process's working directory then (an O_PATH descriptor of the deputy's own,
    /// which carries out its chdir calls), and its umask (also the deputy's).
    cwd: Option<i32>,
    umask: Option<u32>,
}

fn close_saved(m: &Mark) {
    let mut set = saved_set();
    for dup in m.saved.iter().map(|s| s.dup).chain(m.cwd) {
        // SAFETY: closing a duplicate this module made and owns.
        unsafe { libc::close(dup) };
        set.remove(&dup);
    }
    saved_bounds(&set);
}

/// Keeps the deputy's working directory (the process's) as an O_PATH descriptor at
/// `base` or above, registered with the saved duplicates.
fn keep_cwd(base: i32) -> Result<i32, MarkError> {
    let cant = || MarkError::KeepCwd {
        errno: MarkError::errno(),
    };
    // SAFETY: open of a constant path; the result is checked.
    let fd = unsafe {
        libc::open(
            c".".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(cant());
    }
    // SAFETY: a close-on-exec duplicate of the descriptor just opened, which is then
    // closed (ours).
    let dup = unsafe {
        let d = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base);
        libc::close(fd);
        d
    };
    if dup < 0 {
        return Err(cant());
    }
    let mut set = saved_set();
    set.insert(dup);
    saved_bounds(&set);
    Ok(dup)
}

/// The deputy's umask (the process's), read without changing it (other threads may be
/// creating files): from /proc, else None.
fn current_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    let v = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(v.trim(), 8).ok()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The stream a descriptor is, if it is one whose input a rewind replays: a FIFO, a
/// socket or a terminal (what was read there is gone). Files, directories and block
/// devices have offsets (put back instead); other devices (/dev/zero, /dev/urandom) and
/// anonymous files (eventfd, timerfd) are not logged: reading them again gives what
/// they give now (and the log would fill with zeros).
pub fn key_of(fd: i32) -> Option<Key> {
    // SAFETY: fstat into a struct of ours; a bad number fails with EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    let stream = match st.st_mode & libc::S_IFMT {
        libc::S_IFIFO | libc::S_IFSOCK => true,
        // SAFETY: isatty is an ioctl on a descriptor number; no memory of ours.
        libc::S_IFCHR => (unsafe { libc::isatty(fd) }) == 1,
        _ => false,
    };
    stream.then_some((st.st_dev, st.st_ino))
}

/// What kind of file mode `mode` is.
pub fn fd_type(mode: u32) -> FdType {
    match mode & libc::S_IFMT {
        libc::S_IFREG => FdType::File,
        libc::S_IFDIR => FdType::Dir,
        libc::S_IFIFO => FdType::Pipe,
        libc::S_IFCHR => FdType::Char,
        libc::S_IFSOCK => FdType::Socket,
        _ => FdType::Other,
    }
}

/// The process's descriptor numbers now (not the deputy's own).
fn process_fds(private: &dyn Fn(u64) -> bool) -> Result<Vec<i32>, MarkError> {
    let listed: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| MarkError::ListFds {
            errno: e.raw_os_error().unwrap_or(0),
        })?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    // The listing's own descriptor is closed by now: only open ones are kept.
    Ok(listed
        .into_iter()
        // SAFETY: F_GETFD only asks whether the number is open.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .filter(|&fd| !private(fd as u64) && !is_saved(fd as i64))
        .collect())
}

/// Where duplicates kept for marks go: from half the descriptor limit up, below the
/// deputy's own (the top 64).
fn dup_base() -> i32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let cur = lim.rlim_cur.min(1 << 20) as i32;
    (cur / 2).clamp(3, (cur - 128).max(3))
}

fn describe(fd: i32, fdflags: i32, flflags: i32, pos: Option<i64>) -> HomeFd {
    let path = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    // SAFETY: fstat into a struct of ours.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the descriptor is open.
    let kind = if unsafe { libc::fstat(fd, &mut st) } == 0 {
        fd_type(st.st_mode)
    } else {
        FdType::Other
    };
    HomeFd {
        fd,
        path,
        kind,
        flags: flflags,
        pos: pos.map(|p| p as u64),
        cloexec: fdflags & libc::FD_CLOEXEC != 0,
    }
}

/// What a call on a stream does to the marks, decided before it is made.
pub enum Pre {
    /// Make it (this version of it, if given), then tell [`Marks::after`].
    Run(Option<Call>, Option<Io>),
    /// Answered without making it (a write of bytes that went out already, a read of
    /// bytes read already).
    Answer(Reply),
}

/// A call on a stream being made.
pub struct Io {
    key: Key,
    kind: IoKind,
}

enum IoKind {
    Write { skipped: u64 },
    Read,
}

/// A deputy's marks and streams.
#[derive(Debug, Default)]
pub struct Marks {
    pub streams: Streams,
    marks: Vec<Mark>,
}

impl Marks {
    /// Whether any mark is kept (streams are followed only then).
    pub fn active(&self) -> bool {
        !self.marks.is_empty()
    }

    /// Ids of the marks kept.
    pub fn ids(&self) -> Vec<u64> {
        self.marks.iter().map(|m| m.id).collect()
    }

    fn trim(&mut self) {
        let kept: Vec<&Positions> = self.marks.iter().map(|m| &m.pos).collect();
        self.streams.trim(&kept);
    }

    /// Marks the process's state now as checkpoint `id`; its descriptors and working
    /// directory.
    pub fn mark(&mut self, id: u64, private: &dyn Fn(u64) -> bool) -> Result<MarkedAt, MarkError> {
        if self.marks.iter().any(|m| m.id == id) {
            return Err(MarkError::Marked { id });
        }
        let fds = process_fds(private)?;
        let base = dup_base();
        let mut m = Mark {
            id,
            saved: Vec::new(),
            pos: HashMap::new(),
            cwd: Some(keep_cwd(base)?),
            umask: current_umask(),
        };
        let mut out = Vec::new();
        for fd in fds {
            // SAFETY: fcntl/lseek on a descriptor of this process; failures are checked.
            let (fdflags, flflags, pos) = unsafe {
                (
                    libc::fcntl(fd, libc::F_GETFD),
                    libc::fcntl(fd, libc::F_GETFL),
                    libc::lseek(fd, 0, libc::SEEK_CUR),
                )
            };
            if fdflags < 0 || flflags < 0 {
                continue;
            }
            let pos = (pos >= 0 && key_of(fd).is_none()).then_some(pos);
            // SAFETY: a close-on-exec duplicate of an open descriptor, at `base` or above.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, base) };
            if dup < 0 {
                let errno = errno();
                close_saved(&m);
                return Err(MarkError::KeepFd { fd, errno });
            }
            {
                let mut set = saved_set();
                set.insert(dup);
                saved_bounds(&set);
            }
            m.saved.push(Saved {
                fd,
                dup,
                fdflags,
                flflags,
                pos,
            });
            out.push(describe(fd, fdflags, flflags, pos));
        }
        m.pos = self.streams.positions();
        self.marks.push(m);
        self.marks.sort_by_key(|m| m.id);
        while self.marks.len() > MAX_MARKS {
            let old = self.marks.remove(0);
            close_saved(&old);
        }
        self.trim();
        let cwd = std::fs::read_link("/proc/self/cwd")
            .ok()
            .map(|c| c.to_string_lossy().into_owned());
        Ok(MarkedAt { fds: out, cwd })
    }

    /// Puts the process's descriptors, streams, working directory and umask back as at
    /// mark `id` (marks after it are dropped; it is kept).
    pub fn rewind(&mut self, id: u64, private: &dyn Fn(u64) -> bool) -> Result<(), MarkError> {
        let Some(i) = self.marks.iter().position(|m| m.id == id) else {
            return Err(MarkError::NoMark { id });
        };
        self.streams.can_rewind(&self.marks[i].pos)?;
        for later in self.marks.drain(i + 1..) {
            close_saved(&later);
        }
        let m = &self.marks[i];
        let keep: BTreeSet<i32> = m.saved.iter().map(|s| s.fd).collect();
        for fd in process_fds(private)? {
            if !keep.contains(&fd) {
                // SAFETY: closing a descriptor of the process the mark did not have.
                unsafe { libc::close(fd) };
            }
        }
        for s in &m.saved {
            let cl = if s.fdflags & libc::FD_CLOEXEC != 0 {
                libc::O_CLOEXEC
            } else {
                0
            };
            // SAFETY: dup3 of our duplicate onto the process's number; fcntl and lseek on
            // that descriptor. Results are checked.
            let ok = unsafe {
                libc::dup3(s.dup, s.fd, cl) == s.fd
                    && libc::fcntl(s.fd, libc::F_SETFL, s.flflags) == 0
                    && s.pos
                        .is_none_or(|p| libc::lseek(s.fd, p, libc::SEEK_SET) == p)
            };
            if !ok {
                return Err(MarkError::PutFdBack {
                    fd: s.fd,
                    errno: errno(),
                });
            }
        }
        if let Some(cwd) = m.cwd {
            // SAFETY: fchdir to a directory descriptor this module keeps.
            if unsafe { libc::fchdir(cwd) } != 0 {
                return Err(MarkError::Cwd { errno: errno() });
            }
        }
        if let Some(mask) = m.umask {
            // SAFETY: umask only sets the process's file mode mask.
            unsafe { libc::umask(mask as libc::mode_t) };
        }
        let pos = m.pos.clone();
        self.streams.rewind(&pos)?;
        self.trim();
        Ok(())
    }

    /// Marks before `from` are not needed any more.
    pub fn keep_from(&mut self, from: u64) {
        let (old, keep): (Vec<Mark>, Vec<Mark>) = std::mem::take(&mut self.marks)
            .into_iter()
            .partition(|m| m.id < from);
        for m in &old {
            close_saved(m);
        }
        self.marks = keep;
        self.trim();
    }

    /// Mark `id` is not needed (its checkpoint was not saved).
    pub fn drop_mark(&mut self, id: u64) {
        if let Some(i) = self.marks.iter().position(|m| m.id == id) {
            let m = self.marks.remove(i);
            close_saved(&m);
            self.trim();
        }
    }

    /// Before a call is made: what the marks make of it.
    pub fn before(&mut self, call: &Call, private: &dyn Fn(u64) -> bool) -> Pre {
        if !self.active() || call.bufs.len() != 6 {
            return Pre::Run(None, None);
        }
        let write = match call.nr {
            libc::SYS_write | libc::SYS_writev => true,
            libc::SYS_read | libc::SYS_readv => false,
            _ => return Pre::Run(None, None),
        };
        let fd = call.args[0];
        if private(fd) || fd > i32::MAX as u64 {
            return Pre::Run(None, None);
        }
        let Some(key) = key_of(fd as i32) else {
            return Pre::Run(None, None);
        };
        let done = |ret: i64, outs: Vec<Back>| {
            Pre::Answer(Reply::Done {
                seq: call.seq,
                ret,
                outs,
                sigs: 0,
                begin: None,
            })
        };
        if write {
            let len = match &call.bufs[1] {
                Buf::In(b) => b.len() as u64,
                Buf::IovIn { data, .. } => data.len() as u64,
                _ => return Pre::Run(None, None),
            };
            let skip = self.streams.write_skip(key);
            if skip == 0 || len == 0 {
                return Pre::Run(
                    None,
                    Some(Io {
                        key,
                        kind: IoKind::Write { skipped: 0 },
                    }),
                );
            }
            if skip >= len {
                // All of it went out before: the process is told it wrote it.
                self.streams.wrote(key, len);
                return done(len as i64, vec![Back::None; 6]);
            }
            let mut c = call.clone();
            c.bufs[1] = match &call.bufs[1] {
                Buf::In(b) => Buf::In(b[skip as usize..].to_vec()),
                Buf::IovIn { data, lens } => {
                    let mut left = skip;
                    let mut new = Vec::new();
                    for &l in lens {
                        let l = l as u64;
                        if left >= l {
                            left -= l;
                        } else {
                            new.push((l - left) as u32);
                            left = 0;
                        }
                    }
                    Buf::IovIn {
                        data: data[skip as usize..].to_vec(),
                        lens: new,
                    }
                }
                _ => unreachable!("matched above"),
            };
            Pre::Run(
                Some(c),
                Some(Io {
                    key,
                    kind: IoKind::Write { skipped: skip },
                }),
            )
        } else {
            let cap = match &call.bufs[1] {
                Buf::Out(cap) => *cap as usize,
                Buf::IovOut { lens } => lens.iter().map(|&l| l as usize).sum(),
                _ => return Pre::Run(None, None),
            };
            match self.streams.replay(key, cap) {
                Some(d) => {
                    let mut outs = vec![Back::None; 6];
                    let n = d.len() as i64;
                    outs[1] = Back::Bytes(d);
                    done(n, outs)
                }
                None => Pre::Run(
                    None,
                    Some(Io {
                        key,
                        kind: IoKind::Read,
                    }),
                ),
            }
        }
    }

    /// After a call of [`Pre::Run`] was made: its result `ret` (adjusted) and output.
    pub fn after(&mut self, io: &Io, ret: &mut i64, outs: &[Back]) {
        match io.kind {
            IoKind::Write { skipped } => {
                if *ret >= 0 {
                    self.streams.wrote(io.key, skipped + *ret as u64);
                    *ret += skipped as i64;
                } else if skipped > 0 {
                    // The dropped part counts: a short write.
                    self.streams.wrote(io.key, skipped);
                    *ret = skipped as i64;
                }
            }
            IoKind::Read => {
                if *ret > 0 {
                    if let Some(Back::Bytes(d)) = outs.get(1) {
                        let n = (*ret as usize).min(d.len());
                        self.streams.read(io.key, &d[..n]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Key = (1, 2);

    #[test]
    fn output_that_went_out_is_dropped_once_after_a_rewind() {
        let mut s = Streams::default();
        s.trim(&[&Positions::new()]);
        s.wrote(K, 10);
        let mark = s.positions();
        s.wrote(K, 7);
        assert_eq!(s.write_skip(K), 0);
        s.rewind(&mark).unwrap();
        // 7 bytes after the mark went out: written again, they are dropped.
        assert_eq!(s.write_skip(K), 7);
        s.wrote(K, 5);
        assert_eq!(s.write_skip(K), 2);
        s.wrote(K, 2);
        assert_eq!(s.write_skip(K), 0);
        s.wrote(K, 3);
        assert_eq!(s.positions()[&K].0, 20);
        // A second rewind to the same mark: 10 bytes went out since.
        s.rewind(&mark).unwrap();
        assert_eq!(s.write_skip(K), 10);
        // A stream first used after the mark starts again from nothing.
        let k2 = (9, 9);
        s.wrote(k2, 4);
        s.rewind(&mark).unwrap();
        assert_eq!(s.write_skip(k2), 4);
    }

    #[test]
    fn input_read_since_a_mark_is_read_again_read_by_read() {
        let mut s = Streams::default();
        s.trim(&[&Positions::new()]);
        s.read(K, b"first\n");
        let mark = s.positions();
        s.read(K, b"second\n");
        s.read(K, b"third\n");
        assert!(
            s.replay(K, 100).is_none(),
            "nothing to give again before a rewind"
        );
        s.rewind(&mark).unwrap();
        // As the stream gave it: one original read at a time, never more than asked.
        assert_eq!(s.replay(K, 100).unwrap(), b"second\n");
        assert_eq!(s.replay(K, 3).unwrap(), b"thi");
        assert_eq!(s.replay(K, 100).unwrap(), b"rd\n");
        assert!(s.replay(K, 100).is_none());
        s.read(K, b"fourth\n");
        assert_eq!(s.positions()[&K].1, 6 + 7 + 6 + 7);
        // Rewound again to the same mark, all of it comes again.
        s.rewind(&mark).unwrap();
        let mut all = Vec::new();
        while let Some(d) = s.replay(K, 4) {
            all.extend(d);
        }
        assert_eq!(all, b"second\nthird\nfourth\n");
    }

    #[test]
    fn logs_are_kept_from_the_oldest_kept_mark_and_bounded() {
        let mut s = Streams::default();
        s.trim(&[&Positions::new()]);
        s.read(K, b"aaaa");
        let m1 = s.positions();
        s.read(K, b"bbbb");
        let m2 = s.positions();
        s.read(K, b"cccc");
        s.trim(&[&m1, &m2]);
        assert_eq!(s.logged, 8);
        s.trim(&[&m2]);
        assert_eq!(s.logged, 4);
        assert!(s.can_rewind(&m1).is_err(), "m1 was let go");
        s.rewind(&m2).unwrap();
        assert_eq!(s.replay(K, 100).unwrap(), b"cccc");
        // Without marks nothing is logged.
        s.trim(&[]);
        s.read(K, b"dddd");
        assert_eq!(s.logged, 0);
        // Past the bound, what came before cannot be read again.
        s.trim(&[&s.positions()]);
        let m3 = s.positions();
        s.read(K, &vec![7u8; MAX_LOG + 1]);
        assert_eq!(s.logged, 0);
        let e = s.rewind(&m3).unwrap_err();
        assert_eq!(e, MarkError::StreamsTooFar { max_mib: 16 });
        assert!(e.to_string().contains("16 MiB"), "{e}");
    }

    fn call(nr: i64, fd: u64, buf: Buf) -> Call {
        Call {
            seq: 1,
            tid: 1,
            nr,
            args: [fd, 0, 0, 0, 0, 0],
            bufs: vec![Buf::None, buf, Buf::None, Buf::None, Buf::None, Buf::None],
            took: Vec::new(),
        }
    }

    #[test]
    fn writes_and_reads_on_a_pipe_are_counted_dropped_and_replayed() {
        let mut p = [0; 2];
        // SAFETY: pipe2 fills the array we pass.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (r, w) = (p[0] as u64, p[1] as u64);
        let mut m = Marks::default();
        let no = |_: u64| false;
        // Without a mark nothing is followed.
        assert!(matches!(
            m.before(&call(libc::SYS_write, w, Buf::In(b"x".to_vec())), &no),
            Pre::Run(None, None)
        ));
        m.marks.push(Mark {
            id: 1,
            saved: Vec::new(),
            pos: Positions::new(),
            cwd: None,
            umask: None,
        });
        m.trim();
        let wk = key_of(w as i32).unwrap();
        m.streams.wrote(wk, 5);
        m.streams.rewind(&Positions::new()).unwrap();
        // 5 bytes went out: a write of 3 is answered, one of 4 then made of its last 2.
        match m.before(&call(libc::SYS_write, w, Buf::In(b"abc".to_vec())), &no) {
            Pre::Answer(Reply::Done { ret: 3, .. }) => {}
            _ => panic!("a write of what went out is answered"),
        }
        match m.before(
            &call(
                libc::SYS_writev,
                w,
                Buf::IovIn {
                    data: b"defg".to_vec(),
                    lens: vec![1, 3],
                },
            ),
            &no,
        ) {
            Pre::Run(Some(c), Some(io)) => {
                assert_eq!(
                    c.bufs[1],
                    Buf::IovIn {
                        data: b"fg".to_vec(),
                        lens: vec![2]
                    }
                );
                let mut ret = 2;
                m.after(&io, &mut ret, &[]);
                assert_eq!(ret, 4);
            }
            _ => panic!("the rest of a write is made"),
        }
        assert_eq!(m.streams.write_skip(wk), 0);
        // A read on the pipe's other end is logged and given again after a rewind.
        let rk = key_of(r as i32).unwrap();
        let at = m.streams.positions();
        let Pre::Run(None, Some(io)) = m.before(&call(libc::SYS_read, r, Buf::Out(10)), &no) else {
            panic!("a read is made")
        };
        let mut ret = 3;
        m.after(&io, &mut ret, &[Back::None, Back::Bytes(b"xyz".to_vec())]);
        m.streams.rewind(&at).unwrap();
        match m.before(&call(libc::SYS_read, r, Buf::Out(10)), &no) {
            Pre::Answer(Reply::Done { ret: 3, outs, .. }) => {
                assert_eq!(outs[1], Back::Bytes(b"xyz".to_vec()))
            }
            _ => panic!("read again from the log"),
        }
        assert_eq!(m.streams.positions()[&rk].1, 3);
        // Regular files are not streams (their offsets are put back instead).
        let f = std::fs::File::open("/proc/self/status").unwrap();
        use std::os::fd::AsRawFd;
        assert!(key_of(f.as_raw_fd()).is_none());
        // Nor devices other than terminals, nor anonymous files: their reads are not
        // logged (16 MiB of /dev/zero would fill the log).
        let z = std::fs::File::open("/dev/zero").unwrap();
        assert!(key_of(z.as_raw_fd()).is_none());
        // SAFETY: eventfd makes a descriptor of ours, closed below.
        let e = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(e >= 0);
        assert!(key_of(e).is_none());
        // SAFETY: closing the pipe and the eventfd we made.
        unsafe {
            libc::close(r as i32);
            libc::close(w as i32);
            libc::close(e);
        }
    }

    #[test]
    fn a_mark_puts_descriptors_and_offsets_back() {
        use std::io::{Seek, Write};
        use std::os::fd::AsRawFd;
        let _one = PROCESS_WIDE.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"hello").unwrap();
        let fd = f.as_raw_fd();
        let mut m = Marks::default();
        // Only this file is "the process's" here: everything else counts as private.
        let only = move |n: u64| n != fd as u64;
        let at = m.mark(7, &only).unwrap();
        let here = std::env::current_dir().unwrap();
        assert_eq!(at.cwd.as_deref(), here.to_str());
        let fds = at.fds;
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].fd, fd);
        assert_eq!(fds[0].pos, Some(5));
        assert_eq!(fds[0].kind, FdType::File);
        assert!(fds[0].path.ends_with("/f"));
        assert!(m.active());
        f.write_all(b" world").unwrap();
        // The process closes it; a rewind brings it back at its offset.
        let raw = {
            use std::os::fd::IntoRawFd;
            f.into_raw_fd()
        };
        // SAFETY: closing the descriptor we own.
        unsafe { libc::close(raw) };
        m.rewind(7, &only).unwrap();
        // SAFETY: the rewind put a descriptor back at `raw`; we own it again.
        let mut back = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        assert_eq!(back.stream_position().unwrap(), 5);
        back.write_all(b"!").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello!world");
        assert!(m.rewind(8, &only).is_err());
        m.keep_from(8);
        assert!(!m.active());
        assert!(m.rewind(7, &only).is_err());
    }

    /// Held by the tests that mark and rewind: a rewind sets the working directory and
    /// umask of the whole test process.
    static PROCESS_WIDE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn umask_now() -> u32 {
        current_umask().expect("Umask in /proc/thread-self/status")
    }

    #[test]
    fn a_mark_puts_the_working_directory_and_umask_back() {
        let _one = PROCESS_WIDE.lock().unwrap_or_else(|p| p.into_inner());
        let was_dir = std::env::current_dir().unwrap();
        let was_mask = umask_now();
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().canonicalize().unwrap();
        std::fs::create_dir(top.join("sub")).unwrap();
        std::env::set_current_dir(&top).unwrap();
        // SAFETY: umask only sets the process's file mode mask.
        unsafe { libc::umask(0o027) };
        let mut m = Marks::default();
        let none = |_: u64| true;
        m.mark(3, &none).unwrap();
        // After the checkpoint the process did `cd sub` and `umask 077`.
        std::env::set_current_dir("sub").unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(0o077) };
        let rewound = m.rewind(3, &none);
        let (dir_then, mask_then) = (std::env::current_dir().unwrap(), umask_now());
        std::env::set_current_dir(&was_dir).unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(was_mask as libc::mode_t) };
        rewound.unwrap();
        assert_eq!(dir_then, top, "back in the directory of the checkpoint");
        assert_eq!(mask_then, 0o027, "the umask of the checkpoint");
        // Its directory descriptor is the deputy's, not the process's, and goes with it.
        let kept = m.marks[0].cwd.unwrap();
        assert!(is_saved(kept as i64));
        m.keep_from(4);
        assert!(!is_saved(kept as i64));
    }
}
