//! The real [`Kernel`] of a process on its host: its memory through process_vm_*, its
//! notification descriptor, its signal state from /proc.

use crate::arena::Arena;
use crate::gather::{Mem, ProcessMem};
use crate::guest::{Disposition, Kernel};
use crate::notify::NotifyFd;
use crate::wire::{Bytes, FileId};
use nix::errno::Errno;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// A process under our filter, `pid` as the supervisor sees it.
pub struct Live {
    pub notify: NotifyFd,
    pub pid: i32,
    mem: GuardedMem,
    /// What a placeholder descriptor is: an empty memfd named [`PLACEHOLDER`].
    placeholder: OwnedFd,
}

impl Live {
    pub fn new(notify: NotifyFd, pid: i32) -> std::io::Result<Live> {
        let p = placeholder()?;
        if !notify.sync_wake_up() {
            tracing::debug!(pid, "no synchronous wake-ups of its seccomp listener here");
        }
        Ok(Live {
            notify,
            pid,
            mem: GuardedMem {
                mem: ProcessMem(pid),
                off_limits: Vec::new(),
                arena: None,
            },
            placeholder: p,
        })
    }

    /// With these ranges of its memory off limits: memory it shares at home, which is
    /// not here (reading or writing it would wait for ever; it fails with EFAULT).
    pub fn with_off_limits(mut self, ranges: Vec<(u64, u64)>) -> Live {
        self.mem.off_limits = ranges;
        self
    }

    /// With the bytes of its writes behind read into `arena` (while it has room).
    pub fn with_arena(mut self, arena: Arc<Arena>) -> Live {
        self.mem.arena = Some(arena);
        self
    }
}

/// Writes of at least this size have their bytes in the arena (smaller ones are not
/// worth a piece: they are copied into their frame).
const IN_ARENA: usize = 64 << 10;

/// The process's memory, but for ranges that are not on this host.
struct GuardedMem {
    mem: ProcessMem,
    off_limits: Vec<(u64, u64)>,
    arena: Option<Arc<Arena>>,
}

impl GuardedMem {
    fn check(&self, addr: u64, len: usize) -> Result<(), Errno> {
        let end = addr.saturating_add(len as u64);
        if self
            .off_limits
            .iter()
            .any(|&(s, e)| addr < e && end > s && len > 0)
        {
            return Err(Errno::EFAULT);
        }
        Ok(())
    }
}

impl Mem for GuardedMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.check(addr, buf.len())?;
        self.mem.read(addr, buf)
    }
    fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.check(addr, len)?;
        self.mem.read_vec(addr, len)
    }
    fn read_bytes(&self, addr: u64, len: usize) -> Result<Bytes, Errno> {
        self.check(addr, len)?;
        let piece = self.arena.as_ref().filter(|_| len >= IN_ARENA);
        match piece.and_then(|a| a.alloc(len)) {
            Some(mut b) => {
                self.mem.read_into(addr, b.as_mut_ptr(), len)?;
                Ok(Bytes::from_owner(b))
            }
            None => self.mem.read_vec(addr, len).map(Into::into),
        }
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        self.check(addr, data.len())?;
        self.mem.write(addr, data)
    }
}

/// The name of a placeholder descriptor's memfd: what a descriptor of a process away
/// from home is on its host, whatever it is at home (`/memfd:mosix-home-fd (deleted)` in
/// /proc).
/// (The checkpoint engine knows it by the same name: mosix_ckpt::PLACEHOLDER.)
pub const PLACEHOLDER: &str = "mosix-home-fd";

#[cfg(test)]
#[test]
fn the_engine_knows_placeholders_by_the_same_name() {
    assert_eq!(PLACEHOLDER, mosix_ckpt::PLACEHOLDER);
}

/// A new placeholder descriptor.
pub fn placeholder() -> std::io::Result<OwnedFd> {
    Ok(nix::sys::memfd::memfd_create(
        c"mosix-home-fd",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )?)
}

/// Signal masks of thread `tid` of `pid` (blocked, ignored, caught), from /proc.
pub fn signal_masks(pid: i32, tid: i32) -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some((get("SigBlk:")?, get("SigIgn:")?, get("SigCgt:")?))
}

/// The system call thread `tid` of `pid` is in (stopped in, or blocked in), with its
/// arguments, from /proc; None if it is in none (running, or in its own code).
pub fn current_call(pid: i32, tid: i32) -> Option<(i64, [u64; 6])> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    let mut it = s.split_whitespace();
    let nr: i64 = it.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    }
    Some((nr, args))
}

/// Signals whose default action is to do nothing.
fn ignored_by_default(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGCHLD | libc::SIGCONT | libc::SIGURG | libc::SIGWINCH
    )
}

impl Kernel for Live {
    fn mem(&self) -> &dyn Mem {
        &self.mem
    }
    fn answer(&mut self, id: u64, ret: i64) -> Result<(), Errno> {
        self.notify.answer(id, ret)
    }
    fn proceed(&mut self, id: u64) -> Result<(), Errno> {
        self.notify.proceed(id)
    }
    fn placeholder(&mut self, id: u64, at: i32, answer: bool) -> Result<(), Errno> {
        self.notify
            .install(id, self.placeholder.as_raw_fd(), at, false, answer)
            .map(|_| ())
    }
    fn valid(&self, id: u64) -> bool {
        self.notify.valid(id)
    }
    fn signal_thread(&mut self, tid: i32, sig: i32) {
        // SAFETY: tgkill to a thread of our own child; no memory involved.
        unsafe { libc::syscall(libc::SYS_tgkill, self.pid, tid, sig) };
    }
    fn ends_it(&self, tid: i32, sig: i32) -> bool {
        let bit = 1u64 << (sig - 1);
        let stops = matches!(
            sig,
            libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
        );
        match signal_masks(self.pid, tid) {
            Some((blk, ign, cgt)) => {
                (blk | ign | cgt) & bit == 0 && !stops && !ignored_by_default(sig)
            }
            None => false,
        }
    }
    fn disposition(&self, tid: i32, sig: i32) -> Disposition {
        let bit = 1u64 << (sig - 1);
        match signal_masks(self.pid, tid) {
            Some((blk, ign, _)) if blk & bit != 0 || ign & bit != 0 => Disposition::Held,
            Some((_, _, cgt)) if cgt & bit == 0 && ignored_by_default(sig) => Disposition::Held,
            _ => Disposition::Taken,
        }
    }
    fn exe(&self) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStringExt;
        std::fs::read_link(format!("/proc/{}/exe", self.pid))
            .ok()
            .map(|p| p.into_os_string().into_vec())
    }
    fn open_same(&self, path: &[u8], id: &FileId) -> Option<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
        let f = std::fs::File::open(p).ok()?;
        let here = file_id(&f)?;
        same_contents(&here, id).then(|| f.into())
    }
    fn memfile(&self, size: u64, parts: &[(u64, Vec<u8>)]) -> Option<OwnedFd> {
        let fd = nix::sys::memfd::memfd_create(
            c"mosix-home-file",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )
        .ok()?;
        let f = std::fs::File::from(fd);
        f.set_len(size).ok()?;
        for (off, d) in parts {
            std::os::unix::fs::FileExt::write_all_at(&f, d, *off).ok()?;
        }
        // A copy: what the process would write into it through a shared mapping would
        // never reach home, so it cannot (mprotect to writable fails; private mappings
        // stay copy-on-write).
        let seals = libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
        // SAFETY: F_ADD_SEALS on our own memfd.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return None;
        }
        Some(f.into())
    }
    fn install(&mut self, id: u64, fd: RawFd, at: i32) -> Result<(), Errno> {
        self.notify.install(id, fd, at, false, false).map(|_| ())
    }
    fn install_answer(&mut self, id: u64, fd: RawFd, at: i32) -> Result<(), Errno> {
        self.notify.install(id, fd, at, false, true).map(|_| ())
    }
    fn open_shared(
        &self,
        root: &std::path::Path,
        rel: &std::path::Path,
        flags: i32,
        mode: u32,
    ) -> Result<OwnedFd, Errno> {
        open_as(self.pid, root, rel, flags, mode)
    }
    fn fd_state(&self, fd: i32, file: &OwnedFd) -> Option<(u64, i32, bool)> {
        // SAFETY: lseek and F_GETFL read the state of an open file of ours (the
        // process's descriptor is the same open file).
        let (off, fl) = unsafe {
            (
                libc::lseek(file.as_raw_fd(), 0, libc::SEEK_CUR),
                libc::fcntl(file.as_raw_fd(), libc::F_GETFL),
            )
        };
        if off < 0 || fl < 0 {
            return None;
        }
        let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/{fd}", self.pid)).ok()?;
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| i64::from_str_radix(v.trim(), 8).ok())?;
        Some((off as u64, fl, flags & libc::O_CLOEXEC as i64 != 0))
    }
    fn open_proc(&self, tid: i32, thread: bool, rest: &str) -> Option<OwnedFd> {
        let base = if thread {
            format!("/proc/{}/task/{tid}", self.pid)
        } else {
            format!("/proc/{}", self.pid)
        };
        std::fs::File::open(format!("{base}/{rest}"))
            .ok()
            .map(Into::into)
    }
}

/// The identity of an open file.
pub fn file_id(f: &std::fs::File) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata().ok()?;
    Some(FileId {
        dev: m.dev(),
        ino: m.ino(),
        mode: m.mode(),
        size: m.size(),
        mtime: m.mtime(),
        mtime_ns: m.mtime_nsec(),
    })
}

/// Whether two files have the same contents as far as can be told without reading them:
/// the very same file, or a regular file of the same size and modification time (an
/// installed library on another node).
pub fn same_contents(a: &FileId, b: &FileId) -> bool {
    let regular = a.mode & libc::S_IFMT == libc::S_IFREG && b.mode & libc::S_IFMT == libc::S_IFREG;
    regular
        && a.size == b.size
        && ((a.dev == b.dev && a.ino == b.ino) || (a.mtime == b.mtime && a.mtime_ns == b.mtime_ns))
}

/// pidfd_open(2).
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor of ours.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as i32) })
}

/// pidfd_getfd(2): a copy of descriptor `fd` of the process behind `pidfd`.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes descriptors and flags and returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor of ours.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as i32) })
}

/// The credentials a file is opened with for process `pid` (from /proc): file system user
/// and group IDs, supplementary groups, umask, and whether it is root with every
/// capability this process has.
struct OpenCreds {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<u32>,
    umask: u32,
}

fn open_creds(pid: i32) -> Option<OpenCreds> {
    let own = std::fs::read_to_string("/proc/self/status").ok()?;
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |t: &str, k: &str| -> Option<String> {
        t.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
    };
    let ids = |k: &str| -> Option<Vec<u32>> {
        field(&s, k)?
            .split_whitespace()
            .map(|x| x.parse().ok())
            .collect()
    };
    let uid = ids("Uid:")?;
    let gid = ids("Gid:")?;
    let groups = ids("Groups:").unwrap_or_default();
    let umask = u32::from_str_radix(&field(&s, "Umask:")?, 8).ok()?;
    if uid.len() != 4 || gid.len() != 4 {
        return None;
    }
    // A root process with fewer capabilities than ours would open more than it may.
    if uid[3] == 0 && field(&s, "CapEff:")? != field(&own, "CapEff:")? {
        return None;
    }
    Some(OpenCreds {
        fsuid: uid[3],
        fsgid: gid[3],
        groups,
        umask,
    })
}

/// Opens `rel` beneath `root` with process `pid`'s credentials (this thread takes them
/// for the call: file system IDs and groups are per thread; the umask is the process's,
/// this one being single-threaded), never resolving out of `root` (no `..` above it, no
/// symbolic link leading out, no other mount): EXDEV/ELOOP then.
pub fn open_as(
    pid: i32,
    root: &std::path::Path,
    rel: &std::path::Path,
    flags: i32,
    mode: u32,
) -> Result<OwnedFd, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let c = open_creds(pid).ok_or(Errno::EXDEV)?;
    let dir = nix::fcntl::open(
        root,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let rel = std::ffi::CString::new(rel.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_XDEV: u64 = 0x01;
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_BENEATH: u64 = 0x08;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOCTTY) as u32 as u64,
        mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            (mode & 0o7777) as u64
        } else {
            0
        },
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
    };
    let mut saved_groups = vec![0u32; 65536];
    // SAFETY: getgroups fills our buffer of the size we give.
    let n = unsafe { libc::getgroups(saved_groups.len() as i32, saved_groups.as_mut_ptr()) };
    if n < 0 {
        return Err(Errno::last());
    }
    saved_groups.truncate(n as usize);
    // SAFETY: raw setgroups/setfsgid/setfsuid change this thread's credentials only (the
    // kernel's calls are per thread; glibc's wrappers would change every thread); umask
    // is set back below. Between them, one openat2 of a buffer of ours.
    let r = unsafe {
        libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr());
        libc::syscall(libc::SYS_setfsgid, c.fsgid);
        libc::syscall(libc::SYS_setfsuid, c.fsuid);
        let old_mask = libc::umask(c.umask as libc::mode_t);
        let r = libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            rel.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        );
        let e = Errno::last();
        libc::umask(old_mask);
        libc::syscall(libc::SYS_setfsuid, 0);
        libc::syscall(libc::SYS_setfsgid, 0);
        libc::syscall(
            libc::SYS_setgroups,
            saved_groups.len(),
            saved_groups.as_ptr(),
        );
        if r < 0 {
            Err(e)
        } else {
            Ok(r as i32)
        }
    };
    // SAFETY: a fresh descriptor of ours.
    r.map(|fd| unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}
