//! The supervisor's side of a process away from home: what to do with each trapped call,
//! the calls sent home and waiting, and their answers.
//!
//! [`Guest`] is a state machine: trapped calls ([`Notif`]) and the deputy's messages go
//! in; it acts on the process only through the [`Kernel`] trait (its memory, the
//! notification descriptor) and says what goes home as [`Out`]. The supervisor's thread
//! drives it; the tests drive it with fakes.

use crate::dfsa::{Dfsa, SharedFile};
use crate::gather::{self, Layout, Mem};
use crate::notify::Notif;
use crate::spec::{self, Route, Spec, Special};
use crate::streams::{Streams, Verdict};
#[cfg(test)]
use crate::wire::Call;
use crate::wire::{ExitStatus, FileId, FromDeputy, Reply, ToDeputy};
use nix::errno::Errno;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// What the supervisor can do to the process.
pub trait Kernel {
    fn mem(&self) -> &dyn Mem;
    /// Answers trapped call `id` with `ret` (-errno on failure).
    fn answer(&mut self, id: u64, ret: i64) -> Result<(), Errno>;
    /// Lets the process make call `id` itself.
    fn proceed(&mut self, id: u64) -> Result<(), Errno>;
    /// Puts a placeholder descriptor at number `at` in the process; with `answer`, also
    /// answers call `id` with `at`.
    fn placeholder(&mut self, id: u64, at: i32, answer: bool) -> Result<(), Errno>;
    /// Whether call `id` still waits.
    fn valid(&self, id: u64) -> bool;
    /// Sends signal `sig` to thread `tid` (host TID) of the process.
    fn signal_thread(&mut self, tid: i32, sig: i32);
    /// What thread `tid` does with signal `sig` now.
    fn disposition(&self, tid: i32, sig: i32) -> Disposition;
    /// Whether signal `sig` would end the process now (neither blocked, ignored nor
    /// caught by thread `tid`, and ending the process is its default action).
    fn ends_it(&self, _tid: i32, _sig: i32) -> bool {
        false
    }
    /// The target of the process's `/proc/self/exe` on the host.
    fn exe(&self) -> Option<Vec<u8>>;
    /// A descriptor of the file at `path` here if it is the very file `id` describes
    /// (same contents), for an mmap.
    fn open_same(&self, path: &[u8], id: &FileId) -> Option<OwnedFd>;
    /// A new in-memory file of `size` bytes holding `parts` (offset, bytes).
    fn memfile(&self, size: u64, parts: &[(u64, Vec<u8>)]) -> Option<OwnedFd>;
    /// Puts our descriptor `fd` at number `at` in the process (without answering).
    fn install(&mut self, id: u64, fd: RawFd, at: i32) -> Result<(), Errno>;
    /// Puts our descriptor `fd` at number `at` in the process and answers call `id` with
    /// `at`.
    fn install_answer(&mut self, id: u64, fd: RawFd, at: i32) -> Result<(), Errno>;
    /// Opens `rest` of the process's own /proc directory here (thread `tid`'s with
    /// `thread`), read-only.
    fn open_proc(&self, tid: i32, thread: bool, rest: &str) -> Option<OwnedFd>;
    /// Opens `rel` beneath the shared directory `root` here as the process would (its file
    /// system IDs, groups and umask; never leaving `root`), for DFSA.
    fn open_shared(&self, root: &Path, rel: &Path, flags: i32, mode: u32)
        -> Result<OwnedFd, Errno>;
    /// The offset, status flags and close-on-exec flag of the process's descriptor `fd`,
    /// whose open file `file` also is.
    fn fd_state(&self, fd: i32, file: &OwnedFd) -> Option<(u64, i32, bool)>;
}

/// A file opened here whose number home reserves: one of the process's own /proc (what
/// follows /proc/self/), or a file of a shared path (its path).
enum LocalOpen {
    Proc(OwnedFd, String),
    Shared(OwnedFd, PathBuf),
}

/// A descriptor that is a shared file here being made home's.
struct Adopting {
    fd: i32,
    msg: ToDeputy,
    /// The call that needs it home's, made once it is.
    then: Option<Notif>,
}

/// What a thread does with a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Blocked or ignored: it would not be interrupted.
    Held,
    /// Caught, or its default action stops or ends it.
    Taken,
}

/// What the supervisor must do after an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    /// Send this to the deputy.
    Deputy(ToDeputy),
    /// The process made a call that can only be made at home: move it home (the call
    /// stays trapped; the move interrupts it and it is made again at home).
    GoHome { id: u64, why: String },
}

struct Pending {
    notif: Notif,
    spec: Spec,
    layout: Layout,
    cancelled: bool,
    /// The call as sent (sent again after a reconnection).
    call: crate::wire::Call,
    /// A number reserved at home for a file opened here.
    local: Option<LocalOpen>,
    /// A dup of this descriptor (a shared file here): the copy is the same file here.
    mirror_of: Option<i32>,
    /// `notif` is the same call made again (restarted after a signal or a freeze) while
    /// the first was at home: it gets the first's outcome, or is sent anew if the first
    /// was cancelled before it did anything.
    retry: bool,
}

/// An mmap of a descriptor of home, being prepared: its file is looked up, then its
/// pages fetched if the host has no identical copy.
struct Mapping {
    notif: Notif,
    fd: i32,
    /// Set once described: the file's size, and the part to fetch (start, end).
    size: u64,
    range: (u64, u64),
    parts: Vec<(u64, Vec<u8>)>,
    next: u64,
    /// Offset of the read asked for and not yet answered.
    asked: u64,
}

/// The most of a file fetched for one mmap (a bigger mapping brings the process home).
const MAX_FETCH: u64 = 256 << 20;

/// A call completed at home that the process no longer waited for (it was interrupted,
/// or frozen): made again identically, it gets this answer at once, so it runs once.
struct Undelivered {
    nr: i64,
    args: [u64; 6],
    spec: Spec,
    layout: Layout,
    ret: i64,
    outs: Vec<crate::wire::Back>,
}

/// The supervisor's view of one process.
pub struct Guest {
    /// The process's PID as it sees it (its home PID).
    own_pid: i32,
    next_seq: u64,
    pending: HashMap<u64, Pending>,
    by_tid: HashMap<i32, u64>,
    undelivered: HashMap<i32, Undelivered>,
    /// Calls finished for it while it was frozen (written into its memory, their results
    /// sent to its mover through mosixd: [`Guest::completed`]), until it is known whether
    /// the mover set them in its registers. If mosixd went away in between
    /// ([`Guest::in_doubt`]), the mover let it go on with its old registers: the thread
    /// makes that very call again first thing, and gets this answer (its data read at
    /// home is not lost); any other call first means the result was set.
    applied: HashMap<i32, Undelivered>,
    /// mosixd went away while results of `applied` were on their way to the mover.
    doubt: bool,
    /// mmaps being prepared, by the seq of their request to the deputy.
    mappings: HashMap<u64, Mapping>,
    /// Descriptors of the process that are files here (of its own /proc): calls on them
    /// are made here; home holds /dev/null at their number. With what they are (the part
    /// of the path after /proc/self/).
    local: HashMap<i32, String>,
    /// Read-ahead and write-behind.
    pub streams: Streams,
    /// Files of shared paths opened here.
    pub dfsa: Dfsa,
    adopting: HashMap<u64, Adopting>,
    /// Why its files here cannot all be made home's (the move it is frozen for fails).
    unquiesced: Option<String>,
    /// The process ended so; its end is reported once nothing of it is left to be done
    /// at home (writes behind, positions).
    ended: Option<ExitStatus>,
    exit_sent: bool,
    /// Calls carried so far (for figures).
    pub forwarded: u64,
}

impl Guest {
    pub fn new(own_pid: i32, first_seq: u64) -> Guest {
        Guest {
            own_pid,
            next_seq: first_seq,
            pending: HashMap::new(),
            by_tid: HashMap::new(),
            undelivered: HashMap::new(),
            applied: HashMap::new(),
            doubt: false,
            mappings: HashMap::new(),
            local: HashMap::new(),
            streams: Streams::default(),
            dfsa: Dfsa::default(),
            adopting: HashMap::new(),
            unquiesced: None,
            ended: None,
            exit_sent: false,
            forwarded: 0,
        }
    }

    /// With these descriptors files of its own /proc here (carried from its last host).
    pub fn with_local(mut self, fds: Vec<(i32, String)>) -> Guest {
        self.local = fds.into_iter().collect();
        self
    }

    /// With these shared directories (DFSA).
    pub fn with_dfsa(mut self, d: Dfsa) -> Guest {
        self.dfsa = d;
        self
    }

    /// Why the move it is frozen for cannot be made (once settled).
    pub fn unquiesced(&self) -> Option<String> {
        self.unquiesced.clone()
    }

    /// Its descriptors that are files of its own /proc here (for its next host).
    pub fn local_fds(&self) -> Vec<(i32, String)> {
        let mut v: Vec<(i32, String)> = self.local.iter().map(|(f, r)| (*f, r.clone())).collect();
        v.sort();
        v
    }

    /// The next sequence number (carried across moves so numbers never repeat).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Calls sent home and not answered.
    pub fn waiting(&self) -> usize {
        self.pending.values().filter(|p| !p.cancelled).count()
    }

    /// Calls sent home, cancelled or not, whose answer has not come (and writes behind or
    /// positions not yet known at home).
    pub fn outstanding(&self) -> usize {
        self.pending.len()
            + self.mappings.len()
            + self.adopting.len()
            + usize::from(self.streams.unsettled())
    }

    /// The process ended (its status): the deputy is told once what it did on its host is
    /// all known at home. What to send now.
    pub fn end(&mut self, st: ExitStatus) -> Vec<Out> {
        self.ended = Some(st);
        let mut out = Vec::new();
        let seq = self.next_seq;
        if let Some(m) = self.streams.sync(seq) {
            self.next_seq += 1;
            out.push(Out::Deputy(m));
        }
        out.extend(self.report_end());
        out
    }

    /// Whether the end of the process was sent to its deputy.
    pub fn exit_sent(&self) -> bool {
        self.exit_sent
    }

    fn report_end(&mut self) -> Vec<Out> {
        match self.ended {
            Some(st) if !self.exit_sent && !self.streams.unsettled() => {
                self.exit_sent = true;
                vec![Out::Deputy(ToDeputy::Exited(st))]
            }
            _ => Vec::new(),
        }
    }

    /// Nothing happened for a while: home hears where the process has read streams to
    /// (its offsets there follow it even when it makes no call).
    pub fn idle(&mut self) -> Vec<Out> {
        self.streams.tick().into_iter().map(Out::Deputy).collect()
    }

    /// A trapped call.
    pub fn on_notif(&mut self, n: Notif, k: &mut dyn Kernel) -> Vec<Out> {
        let mut out = Vec::new();
        // A thread with a call at home made the same call again (restarted, after a
        // signal it handled or a freeze): it waits for the first one's outcome, so that
        // the call is made once (a read's data is not consumed twice, nor lost).
        if let Some(p) = self
            .by_tid
            .get(&n.pid)
            .and_then(|s| self.pending.get_mut(s))
        {
            if p.notif.nr == n.nr && p.notif.args == n.args && p.local.is_none() {
                p.notif = n;
                p.retry = true;
                return out;
            }
        }
        // A thread with a call at home made a new one: the old one was interrupted.
        if let Some(old) = self.by_tid.remove(&n.pid) {
            self.cancel(old, &mut out);
        }
        // Likewise an mmap being prepared (it will come again if restarted).
        self.mappings.retain(|_, m| m.notif.pid != n.pid);
        // mosixd went away while the results of calls finished for the frozen process
        // were on their way to its mover: the very call made again is one whose result
        // was not set (its answer now, as it was); another call means it was.
        if self.doubt {
            let again = self
                .applied
                .remove(&n.pid)
                .filter(|u| u.nr == n.nr && u.args == n.args);
            self.doubt = !self.applied.is_empty();
            if let Some(u) = again {
                self.deliver(&n, &u.spec, &u.layout, u.ret, &u.outs, 0, k);
                return out;
            }
        }
        // The interrupted call made again: its answer at once. Another call first (one
        // made by the signal handler that interrupted it) leaves the answer kept for it:
        // the interrupted call comes again once the handler returns (SA_RESTART), and
        // made again at home it would run twice (a write written twice).
        if self
            .undelivered
            .get(&n.pid)
            .is_some_and(|u| u.nr == n.nr && u.args == n.args)
        {
            let u = self.undelivered.remove(&n.pid).expect("just seen");
            self.deliver(&n, &u.spec, &u.layout, u.ret, &u.outs, 0, k);
            return out;
        }
        if matches!(
            n.nr,
            libc::SYS_read
                | libc::SYS_pread64
                | libc::SYS_write
                | libc::SYS_pwrite64
                | libc::SYS_lseek
        ) {
            match self.streams.on_call(&n, k.mem()) {
                Verdict::Pass => {}
                Verdict::Parked => return out,
                Verdict::Answer(ret, c) => {
                    // Made only if the process takes the answer (it may have been
                    // interrupted meanwhile: then it makes the call again).
                    if k.answer(n.id, ret).is_ok() {
                        out.extend(self.streams.commit(c).into_iter().map(Out::Deputy));
                    }
                    return out;
                }
            }
        }
        let route = spec::route(n.nr, &n.args);
        if let Some(o) = self.on_local_fd(&n, route, k) {
            out.extend(o);
            return out;
        }
        match route {
            Route::Local => {
                let _ = k.proceed(n.id);
            }
            Route::Home(why) => out.push(Out::GoHome {
                id: n.id,
                why: format!("{} ({})", why, spec::name(n.nr)),
            }),
            Route::Forward(s) => self.forward(n, s, k, &mut out),
            Route::Special(sp) => self.special(n, sp, k, &mut out),
        }
        out
    }

    /// A call on a descriptor that is a file here: made here (its reservation at home is
    /// kept in step by closes and dup2s). None: not such a call.
    fn on_local_fd(&mut self, n: &Notif, route: Route, k: &mut dyn Kernel) -> Option<Vec<Out>> {
        if n.nr == libc::SYS_close_range {
            // Home frees its numbers in the range; then the same here.
            let (a, b) = (n.args[0], n.args[1]);
            let gone = |f: &i32| *f >= 0 && (a..=b).contains(&(*f as u64));
            self.dfsa.files.retain(|f, _| !gone(f));
            self.local.retain(|f, _| !gone(f));
            return None;
        }
        if !self.dfsa.files.is_empty() {
            if let Some(o) = self.on_shared_fd(n, route, k) {
                return Some(o);
            }
        }
        if self.local.is_empty() {
            return None;
        }
        let spec = match route {
            Route::Forward(s) => s,
            Route::Special(Special::Mmap) => {
                let fd = n.args[4] as i32;
                if self.local.contains_key(&fd) {
                    let _ = k.proceed(n.id);
                    return Some(Vec::new());
                }
                return None;
            }
            _ => return None,
        };
        let fds: Vec<i32> = spec
            .args
            .iter()
            .enumerate()
            .filter(|(_, a)| **a == spec::Arg::Fd)
            .map(|(i, _)| n.args[i] as i32)
            .collect();
        let first = *fds.first()?;
        if !self.local.contains_key(&first) {
            if matches!(n.nr, libc::SYS_dup2 | libc::SYS_dup3) {
                // dup2 onto a local one: it is a home descriptor from now on.
                self.local.remove(&(n.args[1] as i32));
            }
            return None;
        }
        match n.nr {
            libc::SYS_close | libc::SYS_dup2 | libc::SYS_dup3 => {
                // Home frees (or copies) its reservation; then the same here.
                if n.nr == libc::SYS_close {
                    self.local.remove(&first);
                } else if let Some(r) = self.local.get(&first).cloned() {
                    self.local.insert(n.args[1] as i32, r);
                }
                None
            }
            _ => {
                let _ = k.proceed(n.id);
                Some(Vec::new())
            }
        }
    }

    /// A call on a descriptor that is a shared file here (DFSA): made here, or (a lock, a
    /// call that mixes it with home's descriptors) made at home once the file is home's.
    /// None: not such a call, or forwarded as it is (a close, a dup2: home keeps its
    /// reservation in step).
    fn on_shared_fd(&mut self, n: &Notif, route: Route, k: &mut dyn Kernel) -> Option<Vec<Out>> {
        let spec = match route {
            Route::Forward(s) => s,
            Route::Special(Special::Mmap) => {
                if self.dfsa.files.contains_key(&(n.args[4] as i32)) {
                    let _ = k.proceed(n.id);
                    return Some(Vec::new());
                }
                return None;
            }
            _ => return None,
        };
        let fds: Vec<i32> = spec
            .args
            .iter()
            .enumerate()
            .filter(|(_, a)| **a == spec::Arg::Fd)
            .map(|(i, _)| n.args[i] as i32)
            .collect();
        let first = *fds.first()?;
        let shared: Vec<i32> = fds
            .iter()
            .copied()
            .filter(|f| self.dfsa.files.contains_key(f))
            .collect();
        if matches!(n.nr, libc::SYS_dup2 | libc::SYS_dup3) && !shared.contains(&first) {
            // A home descriptor copied over a shared one: home's from now on.
            self.dfsa.files.remove(&(n.args[1] as i32));
            return None;
        }
        if shared.is_empty() {
            return None;
        }
        let fcntl = (n.nr == libc::SYS_fcntl).then_some(n.args[1] as i32);
        let home_only = n.nr == libc::SYS_flock
            || fcntl.is_some_and(|c| {
                !matches!(
                    c,
                    libc::F_GETFD
                        | libc::F_SETFD
                        | libc::F_GETFL
                        | libc::F_SETFL
                        | libc::F_DUPFD
                        | libc::F_DUPFD_CLOEXEC
                )
            });
        let all_here = fds.iter().all(|f| {
            self.dfsa.files.contains_key(f) || self.local.contains_key(f) || *f == libc::AT_FDCWD
        });
        match n.nr {
            libc::SYS_close => {
                // Home frees its reservation; then it is closed here.
                self.dfsa.files.remove(&first);
                None
            }
            libc::SYS_dup2 | libc::SYS_dup3 if shared.contains(&first) => {
                // Home copies its reservation; the copy here is the same file.
                let to = n.args[1] as i32;
                if to != first {
                    let copy = self.dfsa.files.get(&first).and_then(|f| {
                        f.file.try_clone().ok().map(|file| SharedFile {
                            path: f.path.clone(),
                            file,
                        })
                    });
                    match copy {
                        Some(c) => {
                            self.dfsa.files.insert(to, c);
                        }
                        None => {
                            self.dfsa.files.remove(&to);
                        }
                    }
                }
                None
            }
            libc::SYS_dup | libc::SYS_fcntl
                if shared.contains(&first)
                    && (n.nr == libc::SYS_dup
                        || matches!(fcntl, Some(libc::F_DUPFD | libc::F_DUPFD_CLOEXEC))) =>
            {
                // Home makes the number (a copy of its reservation); here it is the file.
                let mut out = Vec::new();
                self.forward_mirror(*n, spec, Some(first), k, &mut out);
                Some(out)
            }
            _ if !home_only && all_here => {
                let _ = k.proceed(n.id);
                Some(Vec::new())
            }
            _ => {
                // Made at home: the file becomes home's first.
                let mut out = Vec::new();
                self.adopt(shared[0], Some(*n), k, &mut out);
                Some(out)
            }
        }
    }

    /// Makes the shared file at descriptor `fd` home's (the deputy opens it at that
    /// number and offset); then `then` is offered again.
    fn adopt(&mut self, fd: i32, then: Option<Notif>, k: &mut dyn Kernel, out: &mut Vec<Out>) {
        let Some(sf) = self.dfsa.files.get(&fd) else {
            return;
        };
        let Some((offset, flags, cloexec)) = k.fd_state(fd, &sf.file) else {
            if then.is_none() {
                self.unquiesced = Some(format!(
                    "its descriptor {fd} ({}) cannot be read here",
                    sf.path.display()
                ));
            }
            return;
        };
        use std::os::unix::ffi::OsStrExt;
        let seq = self.next_seq;
        self.next_seq += 1;
        let msg = ToDeputy::Adopt {
            seq,
            fd,
            path: sf.path.as_os_str().as_bytes().to_vec(),
            flags,
            offset,
            cloexec,
        };
        self.adopting.insert(
            seq,
            Adopting {
                fd,
                msg: msg.clone(),
                then,
            },
        );
        out.push(Out::Deputy(msg));
    }

    fn adopted(&mut self, seq: u64, ret: i64, k: &mut dyn Kernel) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(a) = self.adopting.remove(&seq) else {
            return out;
        };
        let path = self
            .dfsa
            .files
            .get(&a.fd)
            .map(|f| f.path.display().to_string())
            .unwrap_or_default();
        match a.then {
            None if ret < 0 => {
                self.unquiesced = Some(format!(
                    "its file {path} (of a shared path, opened where it runs) cannot be opened at home: {}",
                    Errno::from_raw(-ret as i32).desc()
                ));
            }
            // Frozen for a move: it stays here as well until the move is done (if it
            // fails, the process goes on with it here).
            None => {}
            Some(n) if !k.valid(n.id) => {}
            Some(n) => {
                // Home's now: a placeholder here at its number, and the call goes on.
                if ret >= 0 && k.placeholder(n.id, a.fd, false).is_ok() {
                    self.dfsa.files.remove(&a.fd);
                    out.extend(self.on_notif(n, k));
                } else {
                    // It stays a file here: the call is made here.
                    let _ = k.proceed(n.id);
                }
            }
        }
        out
    }

    /// `/proc/self/...` (or its thread's, or its own PID's) and what follows, when it is a
    /// file of the process's own to be read here: None for anything else (its descriptors,
    /// cwd, root, exe, namespaces are its home's).
    fn own_proc(&self, path: &[u8]) -> Option<(bool, String)> {
        let p = std::str::from_utf8(path.strip_suffix(&[0]).unwrap_or(path)).ok()?;
        let own = format!("/proc/{}/", self.own_pid);
        let (thread, rest) = if let Some(r) = p.strip_prefix("/proc/self/") {
            (false, r)
        } else if let Some(r) = p.strip_prefix("/proc/thread-self/") {
            (true, r)
        } else if let Some(r) = p.strip_prefix(own.as_str()) {
            (false, r)
        } else {
            return None;
        };
        let first = rest.split('/').next().unwrap_or("");
        let homes = [
            "fd",
            "fdinfo",
            "cwd",
            "root",
            "exe",
            "ns",
            "mountinfo",
            "mounts",
        ];
        if rest.is_empty() || rest.contains("..") || homes.contains(&first) {
            return None;
        }
        Some((thread, rest.to_string()))
    }

    fn special(&mut self, n: Notif, sp: Special, k: &mut dyn Kernel, out: &mut Vec<Out>) {
        match sp {
            Special::Open(s) => {
                let (path_arg, flags_arg) = match n.nr {
                    libc::SYS_open => (0, 1),
                    libc::SYS_creat => (0, usize::MAX),
                    _ => (1, 2),
                };
                let read_only = flags_arg != usize::MAX
                    && n.args[flags_arg] as i32 & libc::O_ACCMODE == libc::O_RDONLY
                    && n.nr != libc::SYS_openat2;
                let own = if read_only {
                    gather::read_cstr(k.mem(), n.args[path_arg], spec::MAX_PATH)
                        .ok()
                        .and_then(|p| self.own_proc(&p))
                } else {
                    None
                };
                match own
                    .and_then(|(thread, rest)| k.open_proc(n.pid, thread, &rest).map(|f| (f, rest)))
                {
                    Some((f, rest)) => self.reserve(n, LocalOpen::Proc(f, rest), k, out),
                    None => match self.open_shared(&n, path_arg, k) {
                        Some(Ok(l)) => self.reserve(n, l, k, out),
                        Some(Err(e)) => {
                            let _ = k.answer(n.id, -(e as i64));
                        }
                        None => self.forward(n, s, k, out),
                    },
                }
            }
            Special::Readlink(s) => {
                let path_arg = if n.nr == libc::SYS_readlink { 0 } else { 1 };
                let path = gather::read_cstr(k.mem(), n.args[path_arg], spec::MAX_PATH)
                    .unwrap_or_default();
                // Its executable here; a shared file opened here (home has /dev/null).
                let target = if self.is_own_exe(&path) {
                    k.exe()
                } else {
                    self.own_fd_link(&path)
                };
                match target {
                    Some(target) => {
                        let (buf, cap) = (n.args[path_arg + 1], n.args[path_arg + 2] as usize);
                        let m = target.len().min(cap);
                        let ret = match k.mem().write(buf, &target[..m]) {
                            Ok(()) => m as i64,
                            Err(e) => -(e as i64),
                        };
                        let _ = k.answer(n.id, ret);
                    }
                    _ => self.forward(n, s, k, out),
                }
            }
            Special::Mmap => {
                let (prot, flags) = (n.args[2] as i32, n.args[3] as i32);
                if flags & libc::MAP_ANONYMOUS != 0 {
                    let _ = k.proceed(n.id);
                } else if flags & libc::MAP_SHARED != 0 && prot & libc::PROT_WRITE != 0 {
                    out.push(Out::GoHome {
                        id: n.id,
                        why: "it maps a file of its home shared and writable".into(),
                    });
                } else {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    let fd = n.args[4] as i32;
                    self.mappings.insert(
                        seq,
                        Mapping {
                            notif: n,
                            fd,
                            size: 0,
                            range: (0, 0),
                            parts: Vec::new(),
                            next: 0,
                            asked: 0,
                        },
                    );
                    out.push(Out::Deputy(ToDeputy::Describe { seq, fd }));
                }
            }
            Special::Signal => {
                let own_target = match n.nr {
                    libc::SYS_tkill => n.args[0] as i32 == self.own_pid,
                    _ => n.args[0] as i32 == self.own_pid,
                };
                match spec::signal_spec(n.nr) {
                    _ if own_target => {
                        let _ = k.proceed(n.id);
                    }
                    Some(s) => self.forward(n, s, k, out),
                    None => {
                        let _ = k.answer(n.id, -(libc::ENOSYS as i64));
                    }
                }
            }
            Special::Clone3 => {
                let mut flags = [0u8; 8];
                match k.mem().read(n.args[0], &mut flags) {
                    Ok(()) if u64::from_le_bytes(flags) & libc::CLONE_THREAD as u64 != 0 => {
                        let _ = k.proceed(n.id);
                    }
                    Ok(()) => out.push(Out::GoHome {
                        id: n.id,
                        why: "it starts a new process (clone3)".into(),
                    }),
                    Err(e) => {
                        let _ = k.answer(n.id, -(e as i64));
                    }
                }
            }
        }
    }

    /// The open call `n` of a file of a shared path, opened here (DFSA): the file, or the
    /// error opening it gives (as it would at home: the same file system). None: not
    /// such a file (or one to open at home: a directory, a path leading out of the shared
    /// directory).
    fn open_shared(
        &mut self,
        n: &Notif,
        path_arg: usize,
        k: &mut dyn Kernel,
    ) -> Option<Result<LocalOpen, Errno>> {
        if !self.dfsa.enabled() {
            return None;
        }
        if n.nr == libc::SYS_openat && n.args[0] as i32 != libc::AT_FDCWD {
            return None;
        }
        let (flags, mode) = match n.nr {
            libc::SYS_open => (n.args[1] as i32, n.args[2] as u32),
            libc::SYS_creat => (
                libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
                n.args[1] as u32,
            ),
            libc::SYS_openat => (n.args[2] as i32, n.args[3] as u32),
            _ => return None,
        };
        if flags & (libc::O_PATH | libc::O_DIRECTORY | libc::O_TMPFILE) != 0 {
            return None;
        }
        let path = gather::read_cstr(k.mem(), n.args[path_arg], spec::MAX_PATH).ok()?;
        let (root, rel, abs) = self.dfsa.place(path.strip_suffix(&[0]).unwrap_or(&path))?;
        match k.open_shared(&root, &rel, flags, mode) {
            Ok(f) => {
                // A directory is home's (its listing, a working directory, ...).
                let st = nix::sys::stat::fstat(&f).ok()?;
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    return None;
                }
                Some(Ok(LocalOpen::Shared(f, abs)))
            }
            // It leads out of the shared directory (a link, a mount): home resolves it.
            Err(Errno::EXDEV | Errno::ELOOP | Errno::EAGAIN | Errno::ENOSYS) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// What `/proc/self/fd/N` links to when N is a shared file opened here.
    fn own_fd_link(&self, p: &[u8]) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        if self.dfsa.files.is_empty() {
            return None;
        }
        let p = std::str::from_utf8(p.strip_suffix(&[0]).unwrap_or(p)).ok()?;
        let own = format!("/proc/{}/fd/", self.own_pid);
        let n = p
            .strip_prefix("/proc/self/fd/")
            .or_else(|| p.strip_prefix("/proc/thread-self/fd/"))
            .or_else(|| p.strip_prefix(own.as_str()))?;
        let f = self.dfsa.files.get(&n.parse::<i32>().ok()?)?;
        Some(f.path.as_os_str().as_bytes().to_vec())
    }

    fn is_own_exe(&self, p: &[u8]) -> bool {
        let p = p.strip_suffix(&[0]).unwrap_or(p);
        p == b"/proc/self/exe"
            || p == b"/proc/thread-self/exe"
            || p == format!("/proc/{}/exe", self.own_pid).as_bytes()
    }

    /// Opens a file of the process's own /proc here: its number is reserved at home
    /// (/dev/null, close-on-exec as asked), then the file put at that number.
    fn reserve(&mut self, n: Notif, local: LocalOpen, k: &mut dyn Kernel, out: &mut Vec<Out>) {
        let cloexec = match n.nr {
            libc::SYS_open => n.args[1] as i32 & libc::O_CLOEXEC,
            libc::SYS_openat => n.args[2] as i32 & libc::O_CLOEXEC,
            _ => 0,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let call = crate::wire::Call {
            seq,
            tid: n.pid,
            nr: libc::SYS_openat,
            args: [
                libc::AT_FDCWD as i64 as u64,
                0,
                (libc::O_RDONLY | cloexec) as u64,
                0,
                0,
                0,
            ],
            bufs: vec![
                crate::wire::Buf::None,
                crate::wire::Buf::In(b"/dev/null\0".to_vec()),
                crate::wire::Buf::None,
                crate::wire::Buf::None,
                crate::wire::Buf::None,
                crate::wire::Buf::None,
            ],
            took: Vec::new(),
        };
        let s = match spec::route(libc::SYS_openat, &call.args) {
            Route::Special(Special::Open(s)) => s,
            _ => unreachable!("openat is an open"),
        };
        let _ = k;
        self.pending.insert(
            seq,
            Pending {
                notif: n,
                spec: s,
                layout: Layout::default(),
                cancelled: false,
                call: call.clone(),
                local: Some(local),
                mirror_of: None,
                retry: false,
            },
        );
        self.by_tid.insert(n.pid, seq);
        out.push(Out::Deputy(ToDeputy::Call(call)));
    }

    fn forward(&mut self, n: Notif, s: Spec, k: &mut dyn Kernel, out: &mut Vec<Out>) {
        self.forward_mirror(n, s, None, k, out)
    }

    /// Forwards call `n`; with `mirror_of`, the descriptor it makes is a copy of that
    /// shared file here.
    fn forward_mirror(
        &mut self,
        n: Notif,
        s: Spec,
        mirror_of: Option<i32>,
        k: &mut dyn Kernel,
        out: &mut Vec<Out>,
    ) {
        let seq = self.next_seq;
        match gather::gather(seq, n.pid, n.nr, n.args, &s, k.mem()) {
            Err(e) => {
                let _ = k.answer(n.id, -(e as i64));
            }
            Ok((mut call, layout)) => {
                // Streams on its descriptors end; positions read here go home with it.
                let fds: Vec<i32> = s
                    .args
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| **a == spec::Arg::Fd)
                    .map(|(i, _)| n.args[i] as i32)
                    .collect();
                let range = (n.nr == libc::SYS_close_range).then_some((n.args[0], n.args[1]));
                let closes = matches!(
                    n.nr,
                    libc::SYS_close | libc::SYS_dup2 | libc::SYS_dup3 | libc::SYS_close_range
                ) || (n.nr == libc::SYS_fcntl && n.args[1] as i32 == libc::F_SETFL);
                call.took = self.streams.forwarding(seq, &fds, range, closes);
                self.next_seq += 1;
                self.forwarded += 1;
                self.pending.insert(
                    seq,
                    Pending {
                        notif: n,
                        spec: s,
                        layout,
                        cancelled: false,
                        call: call.clone(),
                        local: None,
                        mirror_of,
                        retry: false,
                    },
                );
                self.by_tid.insert(n.pid, seq);
                out.push(Out::Deputy(ToDeputy::Call(call)));
            }
        }
    }

    fn cancel(&mut self, seq: u64, out: &mut Vec<Out>) {
        if let Some(p) = self.pending.get_mut(&seq) {
            if !p.cancelled {
                p.cancelled = true;
                out.push(Out::Deputy(ToDeputy::Cancel { seq }));
            }
        }
    }

    /// An answer from the deputy.
    pub fn on_reply(&mut self, r: Reply, k: &mut dyn Kernel) -> Vec<Out> {
        let mut out = Vec::new();
        let seq = r.seq();
        // Whatever the answer, the call reached home: the positions it carried are there.
        self.streams.answered(seq);
        match r {
            Reply::Cancelled { .. } => {
                if let Some(p) = self.forget(seq) {
                    if p.retry && k.valid(p.notif.id) {
                        // The first did nothing: its restart is made now.
                        self.forward(p.notif, p.spec, k, &mut out);
                    }
                }
            }
            Reply::Interrupted { sig, .. } => {
                let Some(p) = self.pending.get(&seq) else {
                    return out;
                };
                if p.cancelled {
                    // The cancel is on its way; the deputy answers it.
                    return out;
                }
                let tid = p.notif.pid;
                if p.retry {
                    // The process made it again already: it goes on at home.
                    out.push(Out::Deputy(ToDeputy::Retry { seq, block: true }));
                    return out;
                }
                match k.disposition(tid, sig) {
                    Disposition::Held => {
                        out.push(Out::Deputy(ToDeputy::Retry { seq, block: true }));
                    }
                    Disposition::Taken => {
                        // The process's own call is interrupted by the same signal
                        // (passed on before this answer) and will come again.
                        self.forget(seq);
                        out.push(Out::Deputy(ToDeputy::Drop { seq }));
                    }
                }
            }
            Reply::Done {
                ret,
                outs,
                sigs,
                begin,
                ..
            } => {
                let Some(p) = self.forget(seq) else {
                    return out;
                };
                if let Some(b) = begin {
                    // Followed from before the process's next call.
                    self.streams.begin(seq, p.notif.args[0] as i32, b);
                }
                if ret == 0 {
                    // Its working directory (or root) at home changed.
                    match p.notif.nr {
                        libc::SYS_chdir => match p.call.bufs.first() {
                            Some(crate::wire::Buf::In(b)) => {
                                self.dfsa.chdir(Some(b.strip_suffix(&[0]).unwrap_or(b)))
                            }
                            _ => self.dfsa.chdir(None),
                        },
                        libc::SYS_fchdir => self.dfsa.chdir(None),
                        libc::SYS_chroot => self.dfsa.chroot(),
                        _ => {}
                    }
                }
                if let (Some(of), true) = (p.mirror_of, ret >= 0) {
                    // A copy of a shared file here: the same file at the number home made.
                    let copy = self.dfsa.files.get(&of).and_then(|f| {
                        f.file.try_clone().ok().map(|file| SharedFile {
                            path: f.path.clone(),
                            file,
                        })
                    });
                    if let Some(c) = copy {
                        if k.valid(p.notif.id)
                            && k.install_answer(p.notif.id, c.file.as_raw_fd(), ret as i32)
                                .is_ok()
                        {
                            self.dfsa.files.insert(ret as i32, c);
                            return out;
                        }
                    }
                }
                if let (Some(l), true) = (&p.local, ret >= 0) {
                    let file = match l {
                        LocalOpen::Proc(f, _) | LocalOpen::Shared(f, _) => f,
                    };
                    if k.valid(p.notif.id)
                        && k.install_answer(p.notif.id, file.as_raw_fd(), ret as i32)
                            .is_ok()
                    {
                        match p.local {
                            Some(LocalOpen::Proc(_, rest)) => {
                                self.local.insert(ret as i32, rest);
                            }
                            Some(LocalOpen::Shared(file, path)) => {
                                self.dfsa.opened += 1;
                                self.dfsa
                                    .files
                                    .insert(ret as i32, SharedFile { path, file });
                            }
                            None => {}
                        }
                    } else {
                        // It is gone (interrupted): home's /dev/null at that number leaks
                        // until the process ends; rare.
                        let _ = k.answer(p.notif.id, -(libc::EINTR as i64));
                    }
                    return out;
                }
                if k.valid(p.notif.id) {
                    self.deliver(&p.notif, &p.spec, &p.layout, ret, &outs, sigs, k);
                } else {
                    // It was made at home but the process stopped waiting: keep the
                    // answer for when it makes the same call again.
                    self.undelivered.insert(
                        p.notif.pid,
                        Undelivered {
                            nr: p.notif.nr,
                            args: p.notif.args,
                            spec: p.spec,
                            layout: p.layout,
                            ret,
                            outs,
                        },
                    );
                }
            }
        }
        out
    }

    fn forget(&mut self, seq: u64) -> Option<Pending> {
        let p = self.pending.remove(&seq)?;
        if self.by_tid.get(&p.notif.pid) == Some(&seq) {
            self.by_tid.remove(&p.notif.pid);
        }
        Some(p)
    }

    /// Gives the process the outcome of its call: memory, mirrored descriptors, result,
    /// then the signals the call raised. A signal that ends the process (SIGPIPE of a
    /// write to a pipe with no reader, by default) comes first, as at home, where the
    /// process dies before it sees the result (no "write failure" printed away only); its
    /// answer is kept in case the call comes again.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        n: &Notif,
        s: &Spec,
        layout: &Layout,
        ret: i64,
        outs: &[crate::wire::Back],
        sigs: u64,
        k: &mut dyn Kernel,
    ) {
        let raised = |sig: i32| sigs & (1u64 << (sig - 1)) != 0;
        let fatal: Vec<i32> = (1..=64)
            .filter(|&sig| raised(sig) && k.ends_it(n.pid, sig))
            .collect();
        if !fatal.is_empty() {
            for sig in fatal {
                k.signal_thread(n.pid, sig);
            }
            self.undelivered.insert(
                n.pid,
                Undelivered {
                    nr: n.nr,
                    args: n.args,
                    spec: *s,
                    layout: layout.clone(),
                    ret,
                    outs: outs.to_vec(),
                },
            );
            return;
        }
        if ret >= 0 {
            if let Err(e) = gather::scatter(layout, outs, k.mem()) {
                let _ = k.answer(n.id, -(e as i64));
                return;
            }
            if let Some(at) = s.out_fds {
                if let Some(pair) = gather::fd_pair(outs, at) {
                    for fd in pair {
                        let _ = k.placeholder(n.id, fd, false);
                    }
                }
            }
            if n.nr == libc::SYS_recvmsg {
                if let Some(crate::wire::Back::Msg { control, .. }) = outs.get(1) {
                    for fd in gather::fds_in_control(control) {
                        let _ = k.placeholder(n.id, fd, false);
                    }
                }
            }
        }
        let done = if s.ret_fd && ret >= 0 {
            k.placeholder(n.id, ret as i32, true)
        } else if s.then_local && ret >= 0 {
            k.proceed(n.id)
        } else {
            k.answer(n.id, ret)
        };
        if let Err(e) = done {
            tracing::warn!("cannot answer call {} ({}): {e}", n.id, spec::name(n.nr));
            let _ = k.answer(n.id, -(e as i64));
        }
        for sig in 1..=64 {
            if sigs & (1u64 << (sig - 1)) != 0 {
                k.signal_thread(n.pid, sig);
            }
        }
    }

    /// A message from the deputy other than a signal (signals are the driver's).
    pub fn on_deputy(&mut self, m: FromDeputy, k: &mut dyn Kernel) -> Vec<Out> {
        let mut out = match m {
            FromDeputy::Reply(r) => self.on_reply(r, k),
            FromDeputy::Described { seq, path, id } => self.described(seq, path, id, k),
            FromDeputy::Data { seq, ret, data } => self.fetched(seq, ret, data, k),
            // Signals are the driver's; marks are for home's mosixd, which keeps them.
            FromDeputy::Signal { .. } | FromDeputy::Marked { .. } | FromDeputy::Rewound { .. } => {
                Vec::new()
            }
            FromDeputy::Adopted { seq, ret } => self.adopted(seq, ret, k),
            m => {
                let mut out = Vec::new();
                // Calls that waited for it are offered again.
                for n in self.streams.on_deputy(m).unwrap_or_default() {
                    if k.valid(n.id) {
                        out.extend(self.on_notif(n, k));
                    }
                }
                out
            }
        };
        out.extend(self.report_end());
        out
    }

    fn described(
        &mut self,
        seq: u64,
        path: Option<Vec<u8>>,
        id: Option<FileId>,
        k: &mut dyn Kernel,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(mut m) = self.mappings.remove(&seq) else {
            return out;
        };
        let Some(id) = id else {
            let _ = k.answer(m.notif.id, -(libc::EBADF as i64));
            return out;
        };
        if id.mode & libc::S_IFMT != libc::S_IFREG {
            out.push(Out::GoHome {
                id: m.notif.id,
                why: "it maps a device or special file of its home".into(),
            });
            return out;
        }
        if let Some(local) = path.as_deref().and_then(|p| k.open_same(p, &id)) {
            self.map_with(&m.notif, m.fd, &local, k);
            return out;
        }
        // No identical copy here: fetch the part it maps into an in-memory file.
        let (off, len) = (m.notif.args[5], m.notif.args[1]);
        let end = off.saturating_add(len).min(id.size);
        if end.saturating_sub(off) > MAX_FETCH {
            out.push(Out::GoHome {
                id: m.notif.id,
                why: "it maps a large file of its home".into(),
            });
            return out;
        }
        m.size = id.size;
        m.range = (off, end.max(off));
        m.next = off;
        self.fetch_next(m, &mut out, k);
        out
    }

    fn fetch_next(&mut self, mut m: Mapping, out: &mut Vec<Out>, k: &mut dyn Kernel) {
        if m.next >= m.range.1 {
            match k.memfile(m.size, &m.parts) {
                Some(f) => self.map_with(&m.notif, m.fd, &f, k),
                None => {
                    let _ = k.answer(m.notif.id, -(libc::ENOMEM as i64));
                }
            }
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let len = (m.range.1 - m.next).min(spec::MAX_IO as u64) as u32;
        out.push(Out::Deputy(ToDeputy::ReadAt {
            seq,
            fd: m.fd,
            off: m.next,
            len,
        }));
        m.asked = m.next;
        m.next += len as u64;
        self.mappings.insert(seq, m);
    }

    fn fetched(&mut self, seq: u64, ret: i64, data: Vec<u8>, k: &mut dyn Kernel) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(mut m) = self.mappings.remove(&seq) else {
            return out;
        };
        if ret < 0 {
            let _ = k.answer(m.notif.id, ret);
            return out;
        }
        let at = m.asked;
        let short = (data.len() as u64) < m.next - m.asked;
        m.parts.push((at, data));
        if short {
            // The file ended early (it shrank): the rest reads as zeros, as past EOF.
            m.next = m.range.1;
        }
        self.fetch_next(m, &mut out, k);
        out
    }

    /// Puts `file` at the mapped descriptor's number in the process and lets it map it.
    fn map_with(&mut self, n: &Notif, fd: i32, file: &OwnedFd, k: &mut dyn Kernel) {
        if k.valid(n.id) && k.install(n.id, file.as_raw_fd(), fd).is_ok() {
            let _ = k.proceed(n.id);
        } else {
            let _ = k.answer(n.id, -(libc::ENOMEM as i64));
        }
    }

    /// What to send again after the way home was broken and is back: every call still
    /// waiting (the deputy answers one it already made from its record), and the cancels.
    pub fn resend(&mut self, k: &mut dyn Kernel) -> Vec<Out> {
        // Writes behind and positions first: calls made after them come after them.
        let (again, parked) = self.streams.relinked();
        let mut out: Vec<Out> = again.into_iter().map(Out::Deputy).collect();
        let mut v: Vec<(&u64, &Pending)> = self.pending.iter().collect();
        v.sort_by_key(|(s, _)| **s);
        for (seq, p) in v {
            out.push(Out::Deputy(ToDeputy::Call(p.call.clone())));
            if p.cancelled {
                out.push(Out::Deputy(ToDeputy::Cancel { seq: *seq }));
            }
        }
        // Files being made home's (the deputy opens each anew: the same end).
        let mut a: Vec<(&u64, &Adopting)> = self.adopting.iter().collect();
        a.sort_by_key(|(s, _)| **s);
        out.extend(a.into_iter().map(|(_, a)| Out::Deputy(a.msg.clone())));
        // Reads that waited for bytes read ahead (which may be lost) go home.
        for n in parked {
            if k.valid(n.id) {
                out.extend(self.on_notif(n, k));
            }
        }
        out
    }

    /// Time passed: calls whose thread stopped waiting (a signal it handled) are cancelled.
    pub fn tick(&mut self, k: &dyn Kernel) -> Vec<Out> {
        let mut out = Vec::new();
        self.streams.forget_parked(&|id| k.valid(id));
        let gone: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| !p.cancelled && !k.valid(p.notif.id))
            .map(|(s, _)| *s)
            .collect();
        for seq in gone {
            self.cancel(seq, &mut out);
        }
        out
    }

    /// The process is frozen for a move: every call at home is cancelled. Once
    /// [`outstanding`](Self::outstanding) is 0, [`completed`](Self::completed) says which
    /// calls were made at home after all, to be finished in the frozen process.
    pub fn quiesce(&mut self, k: &mut dyn Kernel) -> Vec<Out> {
        let mut out = Vec::new();
        let seqs: Vec<u64> = self.pending.keys().copied().collect();
        for seq in seqs {
            self.cancel(seq, &mut out);
        }
        // An mmap being prepared is made again after the move.
        self.mappings.clear();
        // Streams end; what was read here and written behind is settled at home first.
        out.extend(self.streams.quiesce().into_iter().map(Out::Deputy));
        // Files of shared paths opened here become home's (the process may be rebuilt
        // anywhere; home's descriptors go with it).
        self.unquiesced = None;
        let mut fds: Vec<i32> = self.dfsa.files.keys().copied().collect();
        fds.sort();
        for fd in fds {
            self.adopt(fd, None, k, &mut out);
        }
        let seq = self.next_seq;
        if let Some(m) = self.streams.sync(seq) {
            self.next_seq += 1;
            out.push(Out::Deputy(m));
        }
        out
    }

    /// Calls made at home that the frozen process does not know are done: their memory
    /// is written into it now, and (host TID, result) returned, for its registers. A call
    /// that made a descriptor is not finished this way (it has no placeholder yet): it is
    /// dropped, and made again (its descriptor at home leaks; rare: a freeze exactly as the
    /// answer arrives).
    ///
    /// Only a thread frozen in that very call (`now_in(tid)`: the call it is in, number
    /// and arguments) gets it: one frozen elsewhere (in the handler of the signal that
    /// interrupted it, or in another call) would have its registers overwritten; its
    /// answer is dropped and the call made again (rare: a freeze in that handler).
    pub fn completed(
        &mut self,
        mem: &dyn Mem,
        now_in: &dyn Fn(i32) -> Option<(i64, [u64; 6])>,
    ) -> Vec<(i32, i64)> {
        let mut done = Vec::new();
        self.applied.clear();
        self.doubt = false;
        for (tid, u) in std::mem::take(&mut self.undelivered) {
            if (u.spec.ret_fd || u.spec.out_fds.is_some()) && u.ret >= 0 {
                continue;
            }
            let now = now_in(tid);
            if now != Some((u.nr, u.args)) {
                // A warning: a read of a pipe, socket or terminal made again loses what
                // this one took (docs/migration.md, the open window).
                tracing::warn!(
                    tid,
                    ret = u.ret,
                    ?now,
                    args = ?u.args,
                    "a call done at home for a thread now elsewhere ({}): made again",
                    spec::name(u.nr)
                );
                continue;
            }
            if u.ret >= 0 && gather::scatter(&u.layout, &u.outs, mem).is_err() {
                continue;
            }
            done.push((tid, u.ret));
            self.applied.insert(tid, u);
        }
        done
    }

    /// The results [`Guest::completed`] gave are set (mosixd, alive, passed them to the
    /// mover): forgotten.
    pub fn results_set(&mut self) {
        self.applied.clear();
        self.doubt = false;
    }

    /// mosixd went away while the process was frozen: whether the results
    /// [`Guest::completed`] gave were set is not known (see `applied`).
    pub fn in_doubt(&mut self) {
        self.doubt = !self.applied.is_empty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gather::tests::Fake;
    use crate::wire::Back;
    use std::cell::RefCell;

    #[derive(Default)]
    struct FakeKernel {
        mem: Option<Fake>,
        answers: Vec<(u64, i64)>,
        proceeded: Vec<u64>,
        placed: Vec<(u64, i32, bool)>,
        invalid: Vec<u64>,
        signalled: Vec<(i32, i32)>,
        held: bool,
        ends: bool,
    }
    impl Kernel for FakeKernel {
        fn mem(&self) -> &dyn Mem {
            self.mem.as_ref().unwrap()
        }
        fn answer(&mut self, id: u64, ret: i64) -> Result<(), Errno> {
            self.answers.push((id, ret));
            Ok(())
        }
        fn proceed(&mut self, id: u64) -> Result<(), Errno> {
            self.proceeded.push(id);
            Ok(())
        }
        fn placeholder(&mut self, id: u64, at: i32, answer: bool) -> Result<(), Errno> {
            self.placed.push((id, at, answer));
            Ok(())
        }
        fn valid(&self, id: u64) -> bool {
            !self.invalid.contains(&id)
        }
        fn signal_thread(&mut self, tid: i32, sig: i32) {
            self.signalled.push((tid, sig));
        }
        fn ends_it(&self, _: i32, _: i32) -> bool {
            self.ends
        }
        fn disposition(&self, _: i32, _: i32) -> Disposition {
            if self.held {
                Disposition::Held
            } else {
                Disposition::Taken
            }
        }
        fn exe(&self) -> Option<Vec<u8>> {
            Some(b"/usr/bin/prog".to_vec())
        }
        fn open_same(&self, _: &[u8], _: &FileId) -> Option<OwnedFd> {
            None
        }
        fn memfile(&self, size: u64, parts: &[(u64, Vec<u8>)]) -> Option<OwnedFd> {
            let f = tempfile::tempfile().ok()?;
            f.set_len(size).ok()?;
            for (off, d) in parts {
                std::os::unix::fs::FileExt::write_at(&f, d, *off).ok()?;
            }
            Some(f.into())
        }
        fn install(&mut self, id: u64, _: RawFd, at: i32) -> Result<(), Errno> {
            self.placed.push((id, at, false));
            Ok(())
        }
        fn install_answer(&mut self, id: u64, _: RawFd, at: i32) -> Result<(), Errno> {
            self.placed.push((id, at, true));
            Ok(())
        }
        fn open_proc(&self, _: i32, _: bool, rest: &str) -> Option<OwnedFd> {
            (rest == "status").then(|| tempfile::tempfile().unwrap().into())
        }
        fn open_shared(&self, root: &Path, rel: &Path, _: i32, _: u32) -> Result<OwnedFd, Errno> {
            std::fs::File::open(root.join(rel))
                .map(Into::into)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        }
        fn fd_state(&self, _: i32, _: &OwnedFd) -> Option<(u64, i32, bool)> {
            Some((7, libc::O_RDWR, false))
        }
    }

    const BASE: u64 = 0x5000_0000;

    fn kernel() -> FakeKernel {
        FakeKernel {
            mem: Some(Fake {
                base: BASE,
                mem: RefCell::new(vec![0; 1 << 16]),
            }),
            ..Default::default()
        }
    }

    fn notif(id: u64, tid: i32, nr: i64, args: [u64; 6]) -> Notif {
        Notif {
            id,
            pid: tid,
            nr,
            arch: 0xc000_003e,
            ip: 0,
            args,
        }
    }

    fn sent_call(out: &[Out]) -> Call {
        match out {
            [Out::Deputy(ToDeputy::Call(c))] => c.clone(),
            o => panic!("expected one call, got {o:?}"),
        }
    }

    #[test]
    fn a_read_goes_home_and_its_data_comes_back_into_the_process() {
        let mut k = kernel();
        let mut g = Guest::new(100, 1);
        let c = sent_call(&g.on_notif(
            notif(7, 100, libc::SYS_read, [0, BASE + 64, 5, 0, 0, 0]),
            &mut k,
        ));
        assert_eq!(c.nr, libc::SYS_read);
        let r = Reply::Done {
            seq: c.seq,
            ret: 3,
            outs: vec![Back::None, Back::Bytes(b"abc".to_vec()), Back::None],
            sigs: 0,
            begin: None,
        };
        assert!(g.on_reply(r, &mut k).is_empty());
        assert_eq!(k.answers, vec![(7, 3)]);
        assert_eq!(&k.mem.as_ref().unwrap().mem.borrow()[64..67], b"abc");
        assert_eq!(g.outstanding(), 0);
    }

    #[test]
    fn new_descriptors_get_placeholders_and_signals_follow_the_answer() {
        let mut k = kernel();
        let mut g = Guest::new(100, 1);
        k.mem().write(BASE, b"/etc/x\0").unwrap();
        let c = sent_call(&g.on_notif(
            notif(
                1,
                100,
                libc::SYS_openat,
                [(-100i64) as u64, BASE, 0, 0, 0, 0],
            ),
            &mut k,
        ));
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: 5,
                outs: vec![Back::None; 4],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        assert_eq!(k.placed, vec![(1, 5, true)]);
        assert!(k.answers.is_empty(), "ADDFD with SEND is the answer");
        // A write that raised SIGPIPE at home: EPIPE, then the signal for that thread.
        let c = sent_call(&g.on_notif(
            notif(2, 100, libc::SYS_write, [1, BASE, 3, 0, 0, 0]),
            &mut k,
        ));
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: -(libc::EPIPE as i64),
                outs: vec![],
                sigs: 1 << (libc::SIGPIPE - 1),
                begin: None,
            },
            &mut k,
        );
        assert_eq!(k.answers, vec![(2, -(libc::EPIPE as i64))]);
        assert_eq!(k.signalled, vec![(100, libc::SIGPIPE)]);
        // SIGPIPE at its default action: it dies of it before it sees EPIPE, as at home
        // (the answer is kept should the write come again).
        k.ends = true;
        let c = sent_call(&g.on_notif(
            notif(3, 100, libc::SYS_write, [1, BASE, 3, 0, 0, 0]),
            &mut k,
        ));
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: -(libc::EPIPE as i64),
                outs: vec![],
                sigs: 1 << (libc::SIGPIPE - 1),
                begin: None,
            },
            &mut k,
        );
        assert_eq!(k.answers.len(), 1, "not answered: {:?}", k.answers);
        assert_eq!(k.signalled.last(), Some(&(100, libc::SIGPIPE)));
        let out = g.on_notif(
            notif(4, 100, libc::SYS_write, [1, BASE, 3, 0, 0, 0]),
            &mut k,
        );
        assert!(out.is_empty());
        assert_eq!(k.answers.last(), Some(&(4, -(libc::EPIPE as i64))));
    }

    #[test]
    fn a_restarted_call_gets_the_first_ones_outcome_and_a_late_answer_is_kept() {
        let mut k = kernel();
        let mut g = Guest::new(100, 1);
        let args = [0, BASE + 64, 5, 0, 0, 0];
        let c = sent_call(&g.on_notif(notif(1, 100, libc::SYS_read, args), &mut k));
        // Interrupted (its handler ran) and the call restarted: a new notification. It
        // is not sent again: it waits for the first, still at home.
        k.invalid.push(1);
        let out = g.on_notif(notif(2, 100, libc::SYS_read, args), &mut k);
        assert!(out.is_empty(), "{out:?}");
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: 2,
                outs: vec![Back::None, Back::Bytes(b"hi".to_vec()), Back::None],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        assert_eq!(k.answers, vec![(2, 2)]);
        assert_eq!(&k.mem.as_ref().unwrap().mem.borrow()[64..66], b"hi");

        // Frozen for a move that then fails (its calls cancelled), and mosixd gone: the
        // restarted read waits for the first; cancelled before doing anything, it is
        // sent anew.
        let c = sent_call(&g.on_notif(notif(3, 100, libc::SYS_read, args), &mut k));
        let q = g.quiesce(&mut k);
        assert_eq!(q, vec![Out::Deputy(ToDeputy::Cancel { seq: c.seq })]);
        k.invalid.push(3);
        assert!(g
            .on_notif(notif(4, 100, libc::SYS_read, args), &mut k)
            .is_empty());
        let out = g.on_reply(Reply::Cancelled { seq: c.seq }, &mut k);
        let c2 = sent_call(&out);
        assert_ne!(c2.seq, c.seq);

        // A late answer of a call the thread no longer waits for, and which it makes
        // again only later, is kept for then.
        k.invalid.push(4);
        g.on_reply(
            Reply::Done {
                seq: c2.seq,
                ret: 2,
                outs: vec![Back::None, Back::Bytes(b"yo".to_vec()), Back::None],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        assert_eq!(k.answers.len(), 1);
        let out = g.on_notif(notif(5, 100, libc::SYS_read, args), &mut k);
        assert!(out.is_empty(), "answered at once: {out:?}");
        assert_eq!(k.answers.last(), Some(&(5, 2)));
        assert_eq!(&k.mem.as_ref().unwrap().mem.borrow()[64..66], b"yo");
    }

    #[test]
    fn job_control_signals_retry_or_drop_as_the_process_would() {
        let mut k = kernel();
        let mut g = Guest::new(100, 1);
        let c =
            sent_call(&g.on_notif(notif(1, 100, libc::SYS_read, [0, BASE, 5, 0, 0, 0]), &mut k));
        k.held = true;
        let out = g.on_reply(
            Reply::Interrupted {
                seq: c.seq,
                sig: libc::SIGTTIN,
            },
            &mut k,
        );
        assert_eq!(
            out,
            vec![Out::Deputy(ToDeputy::Retry {
                seq: c.seq,
                block: true
            })]
        );
        k.held = false;
        let out = g.on_reply(
            Reply::Interrupted {
                seq: c.seq,
                sig: libc::SIGTTIN,
            },
            &mut k,
        );
        assert_eq!(out, vec![Out::Deputy(ToDeputy::Drop { seq: c.seq })]);
        assert_eq!(g.outstanding(), 0);
    }

    #[test]
    fn shared_files_are_opened_here_used_here_and_made_homes_for_locks_and_moves() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("data"), b"0123456789").unwrap();
        let root = shared.to_string_lossy().into_owned();
        let mut k = kernel();
        let mut g = Guest::new(100, 1).with_dfsa(Dfsa::new(
            std::slice::from_ref(&root),
            std::slice::from_ref(&shared),
            Some(shared.clone()),
        ));
        // open("data"): opened here; home reserves the number (/dev/null).
        k.mem().write(BASE, b"data\0").unwrap();
        let c = sent_call(&g.on_notif(
            notif(
                1,
                100,
                libc::SYS_open,
                [BASE, libc::O_RDONLY as u64, 0, 0, 0, 0],
            ),
            &mut k,
        ));
        assert_eq!(c.nr, libc::SYS_openat);
        assert!(matches!(&c.bufs[1], crate::wire::Buf::In(p) if p == b"/dev/null\0"));
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: 5,
                outs: vec![],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        assert_eq!(k.placed, vec![(1, 5, true)], "the file put at number 5");
        assert!(g.dfsa.files.contains_key(&5));
        // Its reads are made here.
        assert!(g
            .on_notif(notif(2, 100, libc::SYS_read, [5, BASE, 4, 0, 0, 0]), &mut k)
            .is_empty());
        assert_eq!(k.proceeded, vec![2]);
        // A lock is made at home, once the file is home's there.
        let out = g.on_notif(notif(3, 100, libc::SYS_flock, [5, 2, 0, 0, 0, 0]), &mut k);
        let Some(Out::Deputy(ToDeputy::Adopt {
            seq,
            fd: 5,
            offset: 7,
            ..
        })) = out.first()
        else {
            panic!("{out:?}");
        };
        assert_eq!(g.outstanding(), 1);
        let out = g.on_deputy(FromDeputy::Adopted { seq: *seq, ret: 0 }, &mut k);
        assert_eq!(k.placed.last(), Some(&(3, 5, false)), "a placeholder again");
        assert!(!g.dfsa.files.contains_key(&5));
        let c = sent_call(&out);
        assert_eq!(c.nr, libc::SYS_flock);
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: 0,
                outs: vec![],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        // Another one, and a move: made home's before it leaves; one that cannot be
        // opened at home fails the move.
        let c = sent_call(&g.on_notif(
            notif(
                4,
                100,
                libc::SYS_open,
                [BASE, libc::O_RDONLY as u64, 0, 0, 0, 0],
            ),
            &mut k,
        ));
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: 6,
                outs: vec![],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        let q = g.quiesce(&mut k);
        let Some(Out::Deputy(ToDeputy::Adopt { seq, fd: 6, .. })) = q.last() else {
            panic!("{q:?}");
        };
        assert_eq!(g.outstanding(), 1);
        g.on_deputy(
            FromDeputy::Adopted {
                seq: *seq,
                ret: -(libc::ENOENT as i64),
            },
            &mut k,
        );
        assert_eq!(g.outstanding(), 0);
        assert!(g.unquiesced().unwrap().contains("cannot be opened at home"));
        // A path outside the shared directory, or a directory in it: home's.
        k.mem().write(BASE, b"/etc/hostname\0").unwrap();
        let out = g.on_notif(
            notif(
                5,
                100,
                libc::SYS_open,
                [BASE, libc::O_RDONLY as u64, 0, 0, 0, 0],
            ),
            &mut k,
        );
        assert!(
            matches!(&sent_call(&out).bufs[0], crate::wire::Buf::In(p) if p.starts_with(b"/etc"))
        );
        std::fs::create_dir(shared.join("dir")).unwrap();
        k.mem().write(BASE, b"dir\0").unwrap();
        let out = g.on_notif(
            notif(
                6,
                101,
                libc::SYS_open,
                [BASE, libc::O_RDONLY as u64, 0, 0, 0, 0],
            ),
            &mut k,
        );
        assert!(matches!(&sent_call(&out).bufs[0], crate::wire::Buf::In(p) if p == b"dir\0"));
    }

    #[test]
    fn shared_files_closed_by_a_range_or_covered_by_a_dup2_are_homes_again() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let root = d.path().to_string_lossy().into_owned();
        let mut k = kernel();
        let mut g = Guest::new(100, 1).with_dfsa(Dfsa::new(
            std::slice::from_ref(&root),
            &[d.path().to_path_buf()],
            Some(d.path().to_path_buf()),
        ));
        k.mem().write(BASE, b"f\0").unwrap();
        for (i, fd) in [(1u64, 5i32), (2, 6)] {
            let c = sent_call(&g.on_notif(
                notif(i, 100 + i as i32, libc::SYS_open, [BASE, 0, 0, 0, 0, 0]),
                &mut k,
            ));
            g.on_reply(
                Reply::Done {
                    seq: c.seq,
                    ret: fd as i64,
                    outs: vec![],
                    sigs: 0,
                    begin: None,
                },
                &mut k,
            );
        }
        assert_eq!(g.dfsa.files.len(), 2);
        // dup2 of a home descriptor over 5: forwarded, and 5 is home's.
        let c = sent_call(&g.on_notif(notif(3, 110, libc::SYS_dup2, [1, 5, 0, 0, 0, 0]), &mut k));
        assert_eq!(c.nr, libc::SYS_dup2);
        assert!(!g.dfsa.files.contains_key(&5));
        // close_range over 6: forwarded, and 6 is forgotten.
        let c = sent_call(&g.on_notif(
            notif(4, 111, libc::SYS_close_range, [6, 100, 0, 0, 0, 0]),
            &mut k,
        ));
        assert_eq!(c.nr, libc::SYS_close_range);
        assert!(g.dfsa.files.is_empty());
    }

    #[test]
    fn calls_that_need_home_ask_for_it_and_local_ones_proceed() {
        let mut k = kernel();
        let mut g = Guest::new(100, 1);
        assert!(matches!(
            g.on_notif(notif(1, 100, libc::SYS_fork, [0; 6]), &mut k)
                .as_slice(),
            [Out::GoHome { .. }]
        ));
        assert!(g
            .on_notif(notif(2, 100, libc::SYS_kill, [100, 10, 0, 0, 0, 0]), &mut k)
            .is_empty());
        assert_eq!(k.proceeded, vec![2]);
        let c = sent_call(&g.on_notif(notif(3, 100, libc::SYS_kill, [55, 10, 0, 0, 0, 0]), &mut k));
        assert_eq!(c.args[0], 55);
        // readlink("/proc/self/exe") is answered here.
        k.mem().write(BASE, b"/proc/self/exe\0").unwrap();
        g.on_notif(
            notif(4, 100, libc::SYS_readlink, [BASE, BASE + 100, 64, 0, 0, 0]),
            &mut k,
        );
        assert_eq!(k.answers, vec![(4, 13)]);
        assert_eq!(
            &k.mem.as_ref().unwrap().mem.borrow()[100..113],
            b"/usr/bin/prog"
        );
    }

    #[test]
    fn a_freeze_cancels_everything_and_finishes_what_was_done() {
        let mut k = kernel();
        let mut g = Guest::new(100, 1);
        let c = sent_call(&g.on_notif(
            notif(1, 100, libc::SYS_read, [0, BASE + 8, 5, 0, 0, 0]),
            &mut k,
        ));
        assert_eq!(
            g.quiesce(&mut k),
            vec![Out::Deputy(ToDeputy::Cancel { seq: c.seq })]
        );
        k.invalid.push(1);
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: 4,
                outs: vec![Back::None, Back::Bytes(b"data".to_vec()), Back::None],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        assert_eq!(g.outstanding(), 0);
        let m = k.mem.take().unwrap();
        let read = (libc::SYS_read, [0, BASE + 8, 5, 0, 0, 0]);
        assert_eq!(g.completed(&m, &|_| Some(read)), vec![(100, 4)]);
        assert_eq!(&m.mem.borrow()[8..12], b"data");
    }

    #[test]
    fn a_read_finished_for_a_frozen_process_is_answered_again_if_its_result_was_not_set() {
        // A read done at home while the process was frozen for a move is written into its
        // memory and its result sent to the mover through mosixd. If mosixd goes away
        // before the mover set it, the process goes on with its old registers and makes
        // the read again: it gets the same answer (the line read at home is not lost).
        // If the result was set (mosixd passed it on, or another call comes first), a read
        // that follows is a new one.
        for (lost, other_first) in [(true, false), (true, true), (false, false)] {
            let mut k = kernel();
            let mut g = Guest::new(100, 1);
            let args = [0, BASE + 8, 5, 0, 0, 0];
            let c = sent_call(&g.on_notif(notif(1, 100, libc::SYS_read, args), &mut k));
            g.quiesce(&mut k);
            k.invalid.push(1);
            g.on_reply(
                Reply::Done {
                    seq: c.seq,
                    ret: 4,
                    outs: vec![Back::None, Back::Bytes(b"data".to_vec()), Back::None],
                    sigs: 0,
                    begin: None,
                },
                &mut k,
            );
            let m = k.mem.take().unwrap();
            let read = (libc::SYS_read, args);
            assert_eq!(g.completed(&m, &|_| Some(read)), vec![(100, 4)]);
            k.mem = Some(m);
            if lost {
                g.in_doubt();
            } else {
                g.results_set();
            }
            if other_first {
                let w = sent_call(&g.on_notif(
                    notif(2, 100, libc::SYS_write, [1, BASE, 4, 0, 0, 0]),
                    &mut k,
                ));
                g.on_reply(
                    Reply::Done {
                        seq: w.seq,
                        ret: 4,
                        outs: vec![],
                        sigs: 0,
                        begin: None,
                    },
                    &mut k,
                );
            }
            let out = g.on_notif(notif(3, 100, libc::SYS_read, args), &mut k);
            if lost && !other_first {
                assert!(out.is_empty(), "not sent home again: {out:?}");
                assert_eq!(k.answers.last(), Some(&(3, 4)));
            } else {
                assert_eq!(sent_call(&out).nr, libc::SYS_read, "{lost} {other_first}");
            }
        }
    }

    #[test]
    fn a_call_made_by_the_handler_keeps_the_interrupted_calls_answer() {
        // bash away writes a line; a SIGCHLD interrupts the write while it is at home; its
        // handler calls waitpid (another call) before the write is made again. The write
        // was done at home: made again, it gets that answer and is not written twice.
        let mut k = kernel();
        let mut g = Guest::new(100, 1);
        let wr = [1, BASE, 4, 0, 0, 0];
        let c = sent_call(&g.on_notif(notif(1, 100, libc::SYS_write, wr), &mut k));
        k.invalid.push(1);
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: 4,
                outs: vec![],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        assert!(k.answers.is_empty());
        let w = sent_call(&g.on_notif(
            notif(2, 100, libc::SYS_wait4, [u64::MAX, 0, 1, 0, 0, 0]),
            &mut k,
        ));
        assert_eq!(w.nr, libc::SYS_wait4);
        g.on_reply(
            Reply::Done {
                seq: w.seq,
                ret: 0,
                outs: vec![Back::None; 4],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        assert_eq!(k.answers, vec![(2, 0)]);
        let out = g.on_notif(notif(3, 100, libc::SYS_write, wr), &mut k);
        assert!(out.is_empty(), "not sent home again: {out:?}");
        assert_eq!(k.answers.last(), Some(&(3, 4)));
    }

    #[test]
    fn a_freeze_elsewhere_does_not_take_an_answer_for_another_call() {
        let mut k = kernel();
        let mut g = Guest::new(100, 1);
        let wr = [1, BASE, 4, 0, 0, 0];
        let c = sent_call(&g.on_notif(notif(1, 100, libc::SYS_write, wr), &mut k));
        k.invalid.push(1);
        g.on_reply(
            Reply::Done {
                seq: c.seq,
                ret: 4,
                outs: vec![],
                sigs: 0,
                begin: None,
            },
            &mut k,
        );
        let m = k.mem.take().unwrap();
        let in_wait = (libc::SYS_wait4, [u64::MAX, 0, 1, 0, 0, 0]);
        assert_eq!(g.completed(&m, &|_| Some(in_wait)), vec![]);
        assert_eq!(g.completed(&m, &|_| None), vec![]);
    }
}
