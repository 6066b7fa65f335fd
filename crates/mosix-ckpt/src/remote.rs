//! System calls made by a stopped tracee on our behalf: we point its registers at a
//! `syscall` instruction, let it run to the syscall-exit stop, and read the result.

use crate::error::{Error, Result};
use crate::sys::{self, Regs, Stop};

/// A tracee in a ptrace stop, driven one system call at a time.
pub struct Remote {
    pub pid: i32,
    /// Address of a `syscall` instruction (0f 05) in the tracee.
    pub ip: u64,
    base: Regs,
    /// Signals that arrived while we drove the tracee (raw siginfo); they are not lost:
    /// the caller queues them again or saves them in the image.
    pub held: Vec<Vec<u8>>,
    /// How it ended, if it did while we drove it (its wait status is ours then: a parent
    /// that drives its own child learns its end here).
    pub ended: Option<Stop>,
}

const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

impl Remote {
    pub fn new(pid: i32, ip: u64, base: Regs) -> Self {
        Remote {
            pid,
            ip,
            base,
            held: Vec::new(),
            ended: None,
        }
    }

    /// The registers the tracee had when we took it.
    pub fn base_regs(&self) -> Regs {
        self.base
    }

    fn died(&mut self, s: Stop) -> Error {
        self.ended = Some(s);
        Error::Target {
            pid: self.pid,
            msg: format!("ended while being worked on ({s:?})"),
        }
    }

    /// Resumes to the next syscall stop, holding any signal that shows up first.
    fn next_syscall_stop(&mut self) -> Result<()> {
        let mut sig_in = 0;
        loop {
            sys::syscall_step(self.pid, sig_in).map_err(|e| crate::error::sys_err("ptrace", e))?;
            sig_in = 0;
            match sys::wait(self.pid)? {
                Stop::Stopped { sig, .. } if sig == SYSCALL_STOP => return Ok(()),
                Stop::Stopped { sig, event: 0 } if sig != libc::SIGTRAP => {
                    // A signal on its way in: keep it, deliver nothing now.
                    self.held.push(sys::get_siginfo(self.pid)?);
                }
                Stop::Stopped { .. } => {}
                s => return Err(self.died(s)),
            }
        }
    }

    /// Runs system call `nr` with `args` in the tracee; returns the raw result
    /// (negative errno on failure).
    pub fn raw(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        let mut r = self.base;
        r.rip = self.ip;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        r.rdi = a(0);
        r.rsi = a(1);
        r.rdx = a(2);
        r.r10 = a(3);
        r.r8 = a(4);
        r.r9 = a(5);
        sys::set_regs(self.pid, &r)?;
        self.next_syscall_stop()?; // entry
        self.next_syscall_stop()?; // exit
        Ok(sys::get_regs(self.pid)?.rax as i64)
    }

    /// Like `raw`, but a failure becomes an error naming `what`.
    pub fn call(&mut self, what: &str, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(Error::Remote {
                pid: self.pid,
                what: what.to_string(),
                errno: (-r) as i32,
            });
        }
        Ok(r as u64)
    }
}

impl Remote {
    /// Like `call`, for a tracee under a seccomp filter that traps this call: the trapped
    /// call is let through with `listener` (SECCOMP_USER_NOTIF_FLAG_CONTINUE) between its
    /// syscall-entry stop and its exit.
    pub fn call_through_filter(
        &mut self,
        what: &str,
        nr: i64,
        args: &[u64],
        listener: &std::os::fd::OwnedFd,
    ) -> Result<u64> {
        use std::os::fd::AsRawFd;
        let mut r = self.base;
        r.rip = self.ip;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        r.rdi = a(0);
        r.rsi = a(1);
        r.rdx = a(2);
        r.r10 = a(3);
        r.r8 = a(4);
        r.r9 = a(5);
        sys::set_regs(self.pid, &r)?;
        self.next_syscall_stop()?; // entry, before the filter runs
        sys::syscall_step(self.pid, 0).map_err(|e| crate::error::sys_err("ptrace", e))?;
        // It waits in the filter now: take the notification and let it through.
        #[repr(C)]
        struct Notif {
            id: u64,
            pid: u32,
            flags: u32,
            data: [u8; 64],
        }
        #[repr(C)]
        struct Resp {
            id: u64,
            val: i64,
            error: i32,
            flags: u32,
        }
        let mut n = Notif {
            id: 0,
            pid: 0,
            flags: 0,
            data: [0; 64],
        };
        // SAFETY: SECCOMP_IOCTL_NOTIF_RECV fills the struct we pass, of its size.
        if unsafe { libc::ioctl(listener.as_raw_fd(), 0xc050_2100, &mut n) } < 0 {
            return Err(crate::error::sys_err(
                format!("{what}: the filter's notification"),
                std::io::Error::last_os_error(),
            ));
        }
        let mut resp = Resp {
            id: n.id,
            val: 0,
            error: 0,
            flags: 1,
        };
        // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads the struct we pass.
        if unsafe { libc::ioctl(listener.as_raw_fd(), 0xc018_2101, &mut resp) } < 0 {
            return Err(crate::error::sys_err(
                format!("{what}: answering the filter"),
                std::io::Error::last_os_error(),
            ));
        }
        // The exit stop.
        loop {
            match sys::wait(self.pid)? {
                Stop::Stopped { sig, .. } if sig == SYSCALL_STOP => break,
                Stop::Stopped { sig, event: 0 } if sig != libc::SIGTRAP => {
                    self.held.push(sys::get_siginfo(self.pid)?);
                    sys::syscall_step(self.pid, 0)
                        .map_err(|e| crate::error::sys_err("ptrace", e))?;
                }
                Stop::Stopped { .. } => {
                    sys::syscall_step(self.pid, 0)
                        .map_err(|e| crate::error::sys_err("ptrace", e))?;
                }
                s => return Err(self.died(s)),
            }
        }
        let ret = sys::get_regs(self.pid)?.rax as i64;
        if (-4095..0).contains(&ret) {
            return Err(Error::Remote {
                pid: self.pid,
                what: what.to_string(),
                errno: (-ret) as i32,
            });
        }
        Ok(ret as u64)
    }
}

/// x86-64 code that makes a table of system calls one after the other: r15 points to the
/// table (64 bytes per call: number, six arguments, result written back), r14 says how
/// many; it ends on an int3.
///
/// ```text
/// loop: mov rax,[r15]; mov rdi,[r15+8]; mov rsi,[r15+16]; mov rdx,[r15+24]
///       mov r10,[r15+32]; mov r8,[r15+40]; mov r9,[r15+48]; syscall
///       mov [r15+56],rax; add r15,64; dec r14; jnz loop; int3
/// ```
pub const BATCH_CODE: [u8; 43] = [
    0x49, 0x8B, 0x07, 0x49, 0x8B, 0x7F, 0x08, 0x49, 0x8B, 0x77, 0x10, 0x49, 0x8B, 0x57, 0x18, 0x4D,
    0x8B, 0x57, 0x20, 0x4D, 0x8B, 0x47, 0x28, 0x4D, 0x8B, 0x4F, 0x30, 0x0F, 0x05, 0x49, 0x89, 0x47,
    0x38, 0x49, 0x83, 0xC7, 0x40, 0x49, 0xFF, 0xCE, 0x75, 0xD6, 0xCC,
];
/// Bytes of the table per call of [`BATCH_CODE`].
pub const BATCH_ENTRY: u64 = 64;

impl Remote {
    /// Makes `calls` (number, arguments) in the tracee one after the other, in one run
    /// of [`BATCH_CODE`] (which the caller has put at `code_at`, in executable memory of
    /// the tracee), with the table at `table_at` (writable, 64 bytes per call): two
    /// ptrace stops in all instead of two per call. Calls must not depend on each other's
    /// results. Returns each call's raw result. Signals that arrive meanwhile are held.
    pub fn batch(
        &mut self,
        code_at: u64,
        table_at: u64,
        calls: &[(i64, [u64; 6])],
    ) -> Result<Vec<i64>> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let mut table = Vec::with_capacity(calls.len() * BATCH_ENTRY as usize);
        for (nr, args) in calls {
            table.extend_from_slice(&(*nr as u64).to_le_bytes());
            for a in args {
                table.extend_from_slice(&a.to_le_bytes());
            }
            table.extend_from_slice(&u64::MAX.to_le_bytes());
        }
        sys::write_mem(self.pid, table_at, &table)?;
        let mut r = self.base;
        r.rip = code_at;
        r.orig_rax = u64::MAX;
        r.r15 = table_at;
        r.r14 = calls.len() as u64;
        sys::set_regs(self.pid, &r)?;
        let end = code_at + BATCH_CODE.len() as u64;
        loop {
            sys::cont(self.pid, 0).map_err(|e| crate::error::sys_err("ptrace", e))?;
            match sys::wait(self.pid)? {
                Stop::Stopped { sig, event: 0 } if sig == libc::SIGTRAP => {
                    if sys::get_regs(self.pid)?.rip == end {
                        break;
                    }
                    return Err(Error::Target {
                        pid: self.pid,
                        msg: "a breakpoint trap out of place while it made calls for us".into(),
                    });
                }
                Stop::Stopped { event: 0, .. } => {
                    // A signal on its way in: keep it, deliver nothing now.
                    self.held.push(sys::get_siginfo(self.pid)?);
                }
                Stop::Stopped { .. } => {}
                s => return Err(self.died(s)),
            }
        }
        let mut back = vec![0u8; table.len()];
        sys::read_mem(self.pid, table_at, &mut back)?;
        Ok(back
            .chunks_exact(BATCH_ENTRY as usize)
            .map(|c| i64::from_le_bytes(c[56..64].try_into().expect("8 bytes")))
            .collect())
    }
}

/// Finds a `syscall` instruction (bytes 0f 05) in `code`, which starts at `base`.
pub fn find_syscall_insn(code: &[u8], base: u64) -> Option<u64> {
    code.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| base + i as u64)
}
