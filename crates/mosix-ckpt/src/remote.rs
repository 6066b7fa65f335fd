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
}

const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

impl Remote {
    pub fn new(pid: i32, ip: u64, base: Regs) -> Self {
        Remote {
            pid,
            ip,
            base,
            held: Vec::new(),
        }
    }

    fn died(&self, s: Stop) -> Error {
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

/// Finds a `syscall` instruction (bytes 0f 05) in `code`, which starts at `base`.
pub fn find_syscall_insn(code: &[u8], base: u64) -> Option<u64> {
    code.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| base + i as u64)
}
