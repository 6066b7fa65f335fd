//! The seccomp notification descriptor of a process away from home: receive a trapped
//! call, answer it (a result, or "make it yourself" with CONTINUE), install a descriptor
//! in the process, check that a call is still waiting.

use nix::errno::Errno;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

const IOCTL_RECV: libc::c_ulong = 0xc050_2100;
const IOCTL_SEND: libc::c_ulong = 0xc018_2101;
const IOCTL_ID_VALID: libc::c_ulong = 0x4008_2102;
const IOCTL_ADDFD: libc::c_ulong = 0x4018_2103;
const FLAG_CONTINUE: u32 = 1;
/// SECCOMP_IOCTL_NOTIF_SET_FLAGS (Linux 6.6), and its one flag.
const IOCTL_SET_FLAGS: libc::c_ulong = 0x4008_2104;
const FD_SYNC_WAKE_UP: u64 = 1;
const ADDFD_SETFD: u32 = 1;
const ADDFD_SEND: u32 = 2;

/// A trapped call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notif {
    pub id: u64,
    /// The calling thread, as the supervisor sees it (host TID).
    pub pid: i32,
    pub nr: i64,
    pub arch: u32,
    pub ip: u64,
    pub args: [u64; 6],
}

#[repr(C)]
#[derive(Default)]
struct RawNotif {
    id: u64,
    pid: u32,
    flags: u32,
    nr: i32,
    arch: u32,
    ip: u64,
    args: [u64; 6],
}

#[repr(C)]
struct RawResp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

#[repr(C)]
struct RawAddfd {
    id: u64,
    flags: u32,
    srcfd: u32,
    newfd: u32,
    newfd_flags: u32,
}

/// The listener of a process's filter.
pub struct NotifyFd(pub OwnedFd);

impl NotifyFd {
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T) -> Result<i32, Errno> {
        // SAFETY: `arg` is the struct this request reads and writes, of the size the
        // request number encodes.
        let r = unsafe { libc::ioctl(self.raw(), req, arg as *mut T) };
        if r < 0 {
            Err(Errno::last())
        } else {
            Ok(r)
        }
    }

    /// Asks the kernel to hand each trapped call to us, and our answer back to the
    /// process, on the CPU the waker runs on (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP): the
    /// process waits for us anyway, and a wake-up on another CPU costs tens of
    /// microseconds on virtual machines. Best effort: older kernels refuse it (EINVAL).
    pub fn sync_wake_up(&self) -> bool {
        // SAFETY: this request reads no memory: its argument is the flags themselves
        // (passed by value, not through a pointer).
        unsafe { libc::ioctl(self.raw(), IOCTL_SET_FLAGS, FD_SYNC_WAKE_UP) == 0 }
    }

    /// Takes the next trapped call (blocks unless the descriptor is known ready).
    /// ENOENT: the call went away before it could be taken (its thread was interrupted).
    pub fn recv(&self) -> Result<Notif, Errno> {
        let mut n = RawNotif::default();
        self.ioctl(IOCTL_RECV, &mut n)?;
        Ok(Notif {
            id: n.id,
            pid: n.pid as i32,
            nr: n.nr as i64,
            arch: n.arch,
            ip: n.ip,
            args: n.args,
        })
    }

    fn send(&self, id: u64, val: i64, error: i32, flags: u32) -> Result<(), Errno> {
        let mut r = RawResp {
            id,
            val,
            error,
            flags,
        };
        self.ioctl(IOCTL_SEND, &mut r).map(|_| ())
    }

    /// Answers call `id` with a raw result (negative: -errno).
    pub fn answer(&self, id: u64, ret: i64) -> Result<(), Errno> {
        if (-4095..0).contains(&ret) {
            self.send(id, 0, ret as i32, 0)
        } else {
            self.send(id, ret, 0, 0)
        }
    }

    /// Lets the process make call `id` itself, on the host.
    pub fn proceed(&self, id: u64) -> Result<(), Errno> {
        self.send(id, 0, 0, FLAG_CONTINUE)
    }

    /// Installs our descriptor `src` in the process at number `at` (replacing what is
    /// there). With `answer`, this also answers call `id` with `at`.
    pub fn install(
        &self,
        id: u64,
        src: RawFd,
        at: i32,
        cloexec: bool,
        answer: bool,
    ) -> Result<i32, Errno> {
        let mut a = RawAddfd {
            id,
            flags: ADDFD_SETFD | if answer { ADDFD_SEND } else { 0 },
            srcfd: src as u32,
            newfd: at as u32,
            newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
        };
        self.ioctl(IOCTL_ADDFD, &mut a)
    }

    /// Whether call `id` still waits for its answer.
    pub fn valid(&self, id: u64) -> bool {
        let mut i = id;
        self.ioctl(IOCTL_ID_VALID, &mut i).is_ok()
    }
}
