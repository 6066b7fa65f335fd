//! The system-call edge: ptrace requests, remote memory access, wait. All `unsafe` of the
//! engine lives here.

use std::io;
use std::os::fd::RawFd;

use crate::error::{sys, sys_err, Result};

pub type Regs = libc::user_regs_struct;
pub const PAGE: u64 = 4096;

const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const NT_X86_XSTATE: libc::c_ulong = 0x202;
/// Enough for any XSAVE layout the kernel exports (AMX included).
const XSTATE_MAX: usize = 16 * 1024;

fn ptrace(req: libc::c_uint, pid: i32, addr: u64, data: u64) -> io::Result<libc::c_long> {
    // SAFETY: raw ptrace request; the kernel validates pid, and every pointer passed in
    // addr/data by the callers below points to a live buffer of the size the request uses.
    let r = unsafe {
        libc::ptrace(
            req,
            pid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn seize(pid: i32, options: u64) -> io::Result<()> {
    ptrace(libc::PTRACE_SEIZE, pid, 0, options).map(drop)
}
pub fn interrupt(pid: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0).map(drop)
}
pub fn set_options(pid: i32, options: u64) -> io::Result<()> {
    ptrace(libc::PTRACE_SETOPTIONS, pid, 0, options).map(drop)
}
pub fn cont(pid: i32, sig: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_CONT, pid, 0, sig as u64).map(drop)
}
pub fn syscall_step(pid: i32, sig: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_SYSCALL, pid, 0, sig as u64).map(drop)
}
pub fn detach(pid: i32, sig: i32) -> io::Result<()> {
    ptrace(libc::PTRACE_DETACH, pid, 0, sig as u64).map(drop)
}

/// The seals of a memfd (F_GET_SEALS), 0 for another file.
pub fn memfd_seals(fd: RawFd) -> u32 {
    // SAFETY: fcntl with an int command and no pointer argument.
    let r = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    r.max(0) as u32
}

/// lseek(SEEK_DATA) (or SEEK_HOLE with `hole`) from `off`; None past the last data.
pub fn seek_data(fd: RawFd, off: u64, hole: bool) -> Option<u64> {
    let whence = if hole {
        libc::SEEK_HOLE
    } else {
        libc::SEEK_DATA
    };
    // SAFETY: lseek takes no pointers.
    let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// The size of the pipe of descriptor `fd` (F_GETPIPE_SZ).
pub fn pipe_size(fd: RawFd) -> io::Result<u32> {
    // SAFETY: fcntl with an int command and no pointer argument.
    let r = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u32)
}

/// The `n` bytes the pipe of `fd` (of size `size`) holds, read without taking them: tee(2)
/// into a pipe of ours, then read from that.
pub fn peek_pipe(fd: RawFd, n: usize, size: u32) -> io::Result<Vec<u8>> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut p = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two fresh descriptors that nothing else owns.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl with int arguments.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    // SAFETY: tee between two pipe descriptors; no memory arguments.
    let got = unsafe { libc::tee(fd, w.as_raw_fd(), n, libc::SPLICE_F_NONBLOCK) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    if got as usize != n {
        return Err(io::Error::other(format!("copied {got} of the {n} bytes")));
    }
    let mut buf = vec![0u8; n];
    // SAFETY: read into `buf`, which has room for `n` bytes.
    let r = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, n) };
    if r as usize != n {
        return Err(io::Error::other("reading the copy of a pipe's bytes"));
    }
    Ok(buf)
}

/// The message of the last ptrace event stop (PTRACE_EVENT_CLONE: the new thread's ID).
pub fn get_event_msg(pid: i32) -> io::Result<u64> {
    let mut m = 0u64;
    ptrace(libc::PTRACE_GETEVENTMSG, pid, 0, &mut m as *mut u64 as u64)?;
    Ok(m)
}

pub fn get_regs(pid: i32) -> Result<Regs> {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    let mut r: Regs = unsafe { std::mem::zeroed() };
    ptrace(libc::PTRACE_GETREGS, pid, 0, &mut r as *mut Regs as u64)
        .map_err(|e| sys_err("reading registers", e))?;
    Ok(r)
}
pub fn set_regs(pid: i32, r: &Regs) -> Result<()> {
    ptrace(libc::PTRACE_SETREGS, pid, 0, r as *const Regs as u64)
        .map_err(|e| sys_err("writing registers", e))?;
    Ok(())
}

pub fn regs_to_bytes(r: &Regs) -> Vec<u8> {
    // SAFETY: Regs is a repr(C) struct of u64 fields without padding; viewing it as bytes
    // for its exact size is sound.
    unsafe {
        std::slice::from_raw_parts(r as *const Regs as *const u8, std::mem::size_of::<Regs>())
    }
    .to_vec()
}
pub fn regs_from_bytes(b: &[u8]) -> Option<Regs> {
    if b.len() != std::mem::size_of::<Regs>() {
        return None;
    }
    // SAFETY: Regs is plain old data (u64 fields), any bit pattern is valid; the length
    // was checked above and read_unaligned tolerates any alignment of the source.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr() as *const Regs) })
}

/// One NT_X86_XSTATE regset request on `buf`; returns the length the kernel used.
fn xstate_regset(req: libc::c_uint, pid: i32, buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    ptrace(req, pid, NT_X86_XSTATE, &mut iov as *mut libc::iovec as u64)?;
    Ok(iov.iov_len)
}

/// Reads the XSAVE area (FPU, SSE, AVX, PKRU, ...).
pub fn get_xstate(pid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let n = xstate_regset(libc::PTRACE_GETREGSET, pid, &mut buf)
        .map_err(|e| sys_err("reading FPU/AVX state", e))?;
    buf.truncate(n);
    Ok(buf)
}
pub fn set_xstate(pid: i32, x: &[u8]) -> Result<()> {
    xstate_regset(libc::PTRACE_SETREGSET, pid, &mut x.to_vec())
        .map_err(|e| sys_err("writing FPU/AVX state", e))?;
    Ok(())
}

pub fn get_sigmask(pid: i32) -> Result<u64> {
    let mut m = 0u64;
    ptrace(libc::PTRACE_GETSIGMASK, pid, 8, &mut m as *mut u64 as u64)
        .map_err(|e| sys_err("reading the signal mask", e))?;
    Ok(m)
}
pub fn set_sigmask(pid: i32, m: u64) -> Result<()> {
    ptrace(libc::PTRACE_SETSIGMASK, pid, 8, &m as *const u64 as u64)
        .map_err(|e| sys_err("writing the signal mask", e))?;
    Ok(())
}

pub fn get_siginfo(pid: i32) -> Result<Vec<u8>> {
    let mut b = [0u8; 128];
    ptrace(libc::PTRACE_GETSIGINFO, pid, 0, b.as_mut_ptr() as u64)
        .map_err(|e| sys_err("reading siginfo", e))?;
    Ok(b.to_vec())
}

/// Pending signals (thread queue, or the shared process queue), each as a raw siginfo.
pub fn peek_siginfo(pid: i32, shared: bool) -> Result<Vec<Vec<u8>>> {
    #[repr(C)]
    struct Args {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    loop {
        let mut buf = [0u8; 128 * 32];
        let args = Args {
            off: out.len() as u64,
            flags: if shared { 1 } else { 0 },
            nr: 32,
        };
        let n = ptrace(
            libc::PTRACE_PEEKSIGINFO,
            pid,
            &args as *const Args as u64,
            buf.as_mut_ptr() as u64,
        )
        .map_err(|e| sys_err("reading pending signals", e))?;
        if n <= 0 {
            return Ok(out);
        }
        for i in 0..n as usize {
            out.push(buf[i * 128..(i + 1) * 128].to_vec());
        }
    }
}

/// rseq registration: (address, length, signature), None when not registered.
pub fn get_rseq(pid: i32) -> Result<Option<(u64, u32, u32)>> {
    #[repr(C)]
    #[derive(Default)]
    struct Conf {
        ptr: u64,
        size: u32,
        sig: u32,
        flags: u32,
        pad: u32,
    }
    let mut c = Conf::default();
    ptrace(
        PTRACE_GET_RSEQ_CONFIGURATION,
        pid,
        std::mem::size_of::<Conf>() as u64,
        &mut c as *mut Conf as u64,
    )
    .map_err(|e| sys_err("reading the rseq registration", e))?;
    Ok((c.ptr != 0).then_some((c.ptr, c.size, c.sig)))
}

/// The robust futex list of `pid`: (head, length).
pub fn get_robust_list(pid: i32) -> Result<(u64, u64)> {
    let mut head = 0u64;
    let mut len = 0u64;
    // SAFETY: get_robust_list writes one pointer and one size_t to the two locals.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            pid,
            &mut head as *mut u64,
            &mut len as *mut u64,
        )
    };
    if r != 0 {
        return Err(sys("reading the robust futex list"));
    }
    Ok((head, len))
}

/// Copies `local` ranges from/to `remote` ranges of `pid` (one system call per 1024).
fn vm_rw(pid: i32, local: &[(u64, usize)], remote: &[(u64, usize)], write: bool) -> Result<usize> {
    let mut total = 0usize;
    for (l, r) in local.chunks(1024).zip(remote.chunks(1024)) {
        let liov: Vec<libc::iovec> = l
            .iter()
            .map(|&(p, n)| libc::iovec {
                iov_base: p as *mut libc::c_void,
                iov_len: n,
            })
            .collect();
        let riov: Vec<libc::iovec> = r
            .iter()
            .map(|&(p, n)| libc::iovec {
                iov_base: p as *mut libc::c_void,
                iov_len: n,
            })
            .collect();
        // SAFETY: every local iovec points into a buffer the caller keeps alive and owns
        // for the call (mutably when reading); remote iovecs are checked by the kernel.
        let n = unsafe {
            if write {
                libc::process_vm_writev(
                    pid,
                    liov.as_ptr(),
                    liov.len() as _,
                    riov.as_ptr(),
                    riov.len() as _,
                    0,
                )
            } else {
                libc::process_vm_readv(
                    pid,
                    liov.as_ptr(),
                    liov.len() as _,
                    riov.as_ptr(),
                    riov.len() as _,
                    0,
                )
            }
        };
        if n < 0 {
            return Err(sys(if write {
                "writing the process's memory"
            } else {
                "reading the process's memory"
            }));
        }
        total += n as usize;
        let want: usize = l.iter().map(|x| x.1).sum();
        if (n as usize) < want {
            break;
        }
    }
    Ok(total)
}

/// Reads `buf.len()` bytes at `addr` of `pid`; Ok(false) when part of it is not mapped.
pub fn read_mem(pid: i32, addr: u64, buf: &mut [u8]) -> Result<bool> {
    let n = vm_rw(
        pid,
        &[(buf.as_mut_ptr() as u64, buf.len())],
        &[(addr, buf.len())],
        false,
    )?;
    Ok(n == buf.len())
}

/// Writes `data` at `addr` of `pid` (the pages must be writable).
pub fn write_mem(pid: i32, addr: u64, data: &[u8]) -> Result<()> {
    let n = vm_rw(
        pid,
        &[(data.as_ptr() as u64, data.len())],
        &[(addr, data.len())],
        true,
    )?;
    if n != data.len() {
        return Err(sys_err(
            format!("writing memory at {addr:#x}"),
            io::Error::from_raw_os_error(libc::EFAULT),
        ));
    }
    Ok(())
}

/// Scatter-write: each (remote address, bytes).
pub fn write_mem_many(pid: i32, parts: &[(u64, &[u8])]) -> Result<()> {
    let local: Vec<(u64, usize)> = parts
        .iter()
        .map(|(_, d)| (d.as_ptr() as u64, d.len()))
        .collect();
    let remote: Vec<(u64, usize)> = parts.iter().map(|(a, d)| (*a, d.len())).collect();
    let want: usize = local.iter().map(|x| x.1).sum();
    let n = vm_rw(pid, &local, &remote, true)?;
    if n != want {
        // Name the first range that did not go in.
        let mut at = 0usize;
        let mut addr = 0u64;
        for &(a, len) in &remote {
            if at + len > n {
                addr = a + (n - at) as u64;
                break;
            }
            at += len;
        }
        return Err(sys_err(
            format!("writing the process's memory at {addr:#x}"),
            io::Error::from_raw_os_error(libc::EFAULT),
        ));
    }
    Ok(())
}

/// Gather-read into one buffer: each (remote address, length), in order.
pub fn read_mem_many(pid: i32, parts: &[(u64, usize)], buf: &mut [u8]) -> Result<()> {
    let mut local = Vec::with_capacity(parts.len());
    let mut off = 0usize;
    for &(_, n) in parts {
        local.push((buf[off..].as_mut_ptr() as u64, n));
        off += n;
    }
    let n = vm_rw(pid, &local, parts, false)?;
    if n != off {
        return Err(sys_err(
            "reading the process's memory",
            io::Error::from_raw_os_error(libc::EFAULT),
        ));
    }
    Ok(())
}

/// What waitpid reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Stopped; `sig` is WSTOPSIG, `event` is status >> 16.
    Stopped {
        sig: i32,
        event: i32,
    },
    Exited(i32),
    Signaled(i32),
}

pub fn wait(pid: i32) -> Result<Stop> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(sys_err(format!("waiting for process {pid}"), e));
        }
        return Ok(if libc::WIFSTOPPED(status) {
            Stop::Stopped {
                sig: libc::WSTOPSIG(status),
                event: status >> 16,
            }
        } else if libc::WIFSIGNALED(status) {
            Stop::Signaled(libc::WTERMSIG(status))
        } else {
            Stop::Exited(libc::WEXITSTATUS(status))
        });
    }
}

pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill has no memory arguments.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn getrlimit(pid: i32, res: u32) -> Result<(u64, u64)> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit64 writes the old limit into `old`.
    let r = unsafe { libc::prlimit64(pid, res as _, std::ptr::null(), &mut old) };
    if r != 0 {
        return Err(sys(format!("reading resource limit {res}")));
    }
    Ok((old.rlim_cur, old.rlim_max))
}
pub fn setrlimit(pid: i32, res: u32, cur: u64, max: u64) -> io::Result<()> {
    let new = libc::rlimit64 {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: prlimit64 reads the new limit from `new`.
    let r = unsafe { libc::prlimit64(pid, res as _, &new, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn uname_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// What a new child is started with, all prepared before the clone: the child makes
/// only raw system calls.
pub struct SpawnArgs {
    exe: std::ffi::CString,
    argv: [*const libc::c_char; 2],
    envp: [*const libc::c_char; 1],
    /// Descriptors that become the child's 0, 1, 2 (None: ours).
    stdio: Option<[RawFd; 3]>,
}

const ARG0: &std::ffi::CStr = c"mosix-restore";

impl SpawnArgs {
    pub fn new(stdio: Option<[RawFd; 3]>) -> SpawnArgs {
        SpawnArgs {
            exe: c"/proc/self/exe".to_owned(),
            argv: [ARG0.as_ptr(), std::ptr::null()],
            envp: [std::ptr::null()],
            stdio,
        }
    }
}

/// In a new child, before exec: stdio, nothing else open, traced, exec.
///
/// # Safety
/// Only raw system calls; `a` must stay alive (the parent is suspended or the memory is
/// the child's own copy).
unsafe fn traced_exec_body(a: &SpawnArgs) -> ! {
    // SAFETY: raw system calls on prepared, live buffers (see the function contract).
    unsafe {
        if let Some(fds) = a.stdio {
            // Copies first, so that an fd given for one slot is not overwritten by another.
            let mut tmp = [-1; 3];
            for i in 0..3 {
                tmp[i] = libc::fcntl(fds[i], libc::F_DUPFD, 3);
                if tmp[i] < 0 {
                    libc::_exit(126);
                }
            }
            for (i, &t) in tmp.iter().enumerate() {
                if libc::dup2(t, i as i32) < 0 {
                    libc::_exit(126);
                }
            }
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        libc::ptrace(libc::PTRACE_TRACEME, 0, 0usize, 0usize);
        libc::execve(a.exe.as_ptr(), a.argv.as_ptr(), a.envp.as_ptr());
        libc::_exit(127)
    }
}

extern "C" fn traced_exec(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: runs in the clone()d child sharing our memory until execve (CLONE_VFORK
    // keeps us suspended meanwhile); `arg` points to a SpawnArgs that outlives the call,
    // and only raw system calls are made.
    unsafe { traced_exec_body(&*(arg as *const SpawnArgs)) }
}

/// Starts a fresh, tiny, traced process to restore into: a child that asks to be traced
/// and executes this very program, so it stops (SIGTRAP) right after exec, before any of
/// its code runs, with a small new address space whatever our own size. The child is
/// made with clone(CLONE_VM | CLONE_VFORK), like posix_spawn: no copy of our page
/// tables, and only raw system calls before exec, so this is safe from threaded programs.
pub fn spawn_traced_child(stdio: Option<[RawFd; 3]>) -> Result<i32> {
    let args = SpawnArgs::new(stdio);
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: the child runs `traced_exec` on its own stack (the top of `stack`, 16-byte
    // aligned), sharing our memory only until it execs; CLONE_VFORK suspends us until
    // then, so `args` and `stack` stay alive for as long as it uses them.
    let pid = unsafe {
        let top = (stack.as_mut_ptr().add(stack.len()) as usize & !15) as *mut libc::c_void;
        libc::clone(
            traced_exec,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const SpawnArgs as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(sys("clone"));
    }
    stopped_after_exec(pid)
}

fn stopped_after_exec(pid: i32) -> Result<i32> {
    match wait(pid)? {
        Stop::Stopped { sig, .. } if sig == libc::SIGTRAP => Ok(pid),
        other => Err(crate::error::Error::Target {
            pid,
            msg: format!("new process did not stop after exec ({other:?})"),
        }),
    }
}

/// argv[0] of the init process of a restore PID namespace (see `ns_init_ctor`).
pub const NS_INIT_ARG0: &str = "mosix-ns-init";

/// What the namespace helper reports back (it shares our memory).
#[repr(C)]
#[derive(Default)]
struct NsReport {
    init: i32,
    child: i32,
    /// Which step failed (0: none) and its errno.
    failed: i32,
    errno: i32,
}

struct NsArgs {
    spawn: SpawnArgs,
    unshare: i32,
    /// "1 sec nsec\n7 sec nsec\n" for /proc/self/timens_offsets (empty: no time ns).
    offsets: Vec<u8>,
    offsets_path: std::ffi::CString,
    /// Wanted PID in the new PID namespace (0: none).
    set_tid: i32,
    init_argv: [*const libc::c_char; 3],
    init_arg0: std::ffi::CString,
    init_arg1: std::ffi::CString,
    /// Read end of a pipe whose EOF tells init that the process exists (or never will).
    pipe_rd: RawFd,
    report: *mut NsReport,
    /// The host name of a new UTS namespace (empty: none).
    hostname: Vec<u8>,
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Fork-like clone3 (own copy of memory, same stack address): returns 0 in the child.
///
/// # Safety
/// As fork(): the child may only make raw system calls.
unsafe fn clone3_fork(flags: u64, set_tid: Option<&i32>) -> libc::c_long {
    let args = CloneArgs {
        flags,
        exit_signal: if flags & libc::CLONE_PARENT as u64 != 0 {
            0
        } else {
            libc::SIGCHLD as u64
        },
        set_tid: set_tid.map_or(0, |t| t as *const i32 as u64),
        set_tid_size: set_tid.is_some() as u64,
        ..Default::default()
    };
    // SAFETY: clone3 reads `args` (and the set_tid array it points to); without
    // CLONE_VM and with no stack the child continues on its own copy of ours.
    unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    }
}

extern "C" fn ns_helper(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: runs in a clone(CLONE_VM | CLONE_VFORK) child while we are suspended;
    // `arg` points to live NsArgs; only raw system calls are made, and results go to
    // the report through a raw pointer.
    unsafe {
        let a = &*(arg as *const NsArgs);
        let fail = |step: i32| -> ! {
            (*a.report).failed = step;
            (*a.report).errno = *libc::__errno_location();
            libc::_exit(1)
        };
        if libc::unshare(a.unshare) != 0 {
            fail(1);
        }
        if !a.hostname.is_empty()
            && libc::sethostname(a.hostname.as_ptr() as *const libc::c_char, a.hostname.len()) != 0
        {
            fail(5);
        }
        if !a.offsets.is_empty() {
            let fd = libc::open(a.offsets_path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                fail(2);
            }
            let n = libc::write(fd, a.offsets.as_ptr() as *const _, a.offsets.len());
            if n != a.offsets.len() as isize {
                fail(2);
            }
            libc::close(fd);
        }
        if a.set_tid != 0 {
            // PID 1 of the new namespace: a child of the restorer (CLONE_PARENT), so it
            // is reaped by it.
            let init = clone3_fork(libc::CLONE_PARENT as u64, None);
            if init < 0 {
                fail(3);
            }
            if init == 0 {
                libc::dup2(a.pipe_rd, 0);
                libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32);
                libc::execve(
                    a.spawn.exe.as_ptr(),
                    a.init_argv.as_ptr(),
                    a.spawn.envp.as_ptr(),
                );
                libc::_exit(127);
            }
            (*a.report).init = init as i32;
        }
        let tid = (a.set_tid != 0).then_some(&a.set_tid);
        let child = clone3_fork(libc::CLONE_PARENT as u64, tid);
        if child < 0 {
            fail(4);
        }
        if child == 0 {
            traced_exec_body(&a.spawn);
        }
        (*a.report).child = child as i32;
        libc::_exit(0)
    }
}

/// Like [`spawn_traced_child`], but the child is made in new namespaces: a PID namespace
/// where it has PID `set_tid` (when not 0; the namespace gets an init process first,
/// returned too), and a time namespace with the given CLOCK_MONOTONIC/CLOCK_BOOTTIME
/// offsets in nanoseconds (when given). A short-lived helper (sharing our memory,
/// suspending us) unshares the namespaces and makes both processes with
/// clone3(CLONE_PARENT), so they are our children while our own namespaces and those of
/// our other threads stay as they were. Returns (child, init), PIDs as we see them.
pub fn spawn_traced_child_in_ns(
    stdio: Option<[RawFd; 3]>,
    set_tid: i32,
    time_offsets: Option<(i64, i64)>,
) -> Result<(i32, Option<i32>)> {
    spawn_traced_child_in_ns_named(stdio, set_tid, time_offsets, None)
}

/// [`spawn_traced_child_in_ns`], and with `hostname` in a new UTS namespace of that name.
pub fn spawn_traced_child_in_ns_named(
    stdio: Option<[RawFd; 3]>,
    set_tid: i32,
    time_offsets: Option<(i64, i64)>,
    hostname: Option<&str>,
) -> Result<(i32, Option<i32>)> {
    let mut unshare = 0;
    if hostname.is_some() {
        unshare |= libc::CLONE_NEWUTS;
    }
    let mut offsets = Vec::new();
    if set_tid != 0 {
        unshare |= libc::CLONE_NEWPID;
    }
    if let Some((mono, boot)) = time_offsets {
        unshare |= libc::CLONE_NEWTIME;
        let line = |id: i32, ns: i64| {
            format!(
                "{id} {} {}\n",
                ns.div_euclid(1_000_000_000),
                ns.rem_euclid(1_000_000_000)
            )
        };
        offsets =
            (line(libc::CLOCK_MONOTONIC, mono) + &line(libc::CLOCK_BOOTTIME, boot)).into_bytes();
    }
    let mut p = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(sys("pipe"));
    }
    let mut report = NsReport::default();
    let init_arg0 = std::ffi::CString::new(NS_INIT_ARG0).expect("no NUL");
    let init_arg1 = std::ffi::CString::new(set_tid.to_string()).expect("no NUL");
    let mut args = NsArgs {
        spawn: SpawnArgs::new(stdio),
        unshare,
        offsets,
        offsets_path: c"/proc/self/timens_offsets".to_owned(),
        set_tid,
        init_argv: [std::ptr::null(); 3],
        init_arg0,
        init_arg1,
        pipe_rd: p[0],
        report: &mut report,
        hostname: hostname.map(|h| h.as_bytes().to_vec()).unwrap_or_default(),
    };
    args.init_argv = [
        args.init_arg0.as_ptr(),
        args.init_arg1.as_ptr(),
        std::ptr::null(),
    ];
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: as in spawn_traced_child: the helper runs `ns_helper` on its own stack,
    // sharing our memory until it exits; CLONE_VFORK suspends us until then, so `args`,
    // `report` and `stack` outlive its use of them.
    let helper = unsafe {
        let top = (stack.as_mut_ptr().add(stack.len()) as usize & !15) as *mut libc::c_void;
        libc::clone(
            ns_helper,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut args as *mut NsArgs as *mut libc::c_void,
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: closing the two pipe descriptors we own; init now sees EOF once the
    // helper is gone.
    unsafe {
        libc::close(p[0]);
        libc::close(p[1]);
    }
    if helper < 0 {
        return Err(sys_err("clone", clone_err));
    }
    let _ = wait(helper);
    // SAFETY: the helper has exited; nothing else writes `report` now.
    let report = unsafe { std::ptr::read_volatile(&report) };
    let init = (report.init > 0).then_some(report.init);
    if report.failed != 0 || report.child <= 0 {
        if let Some(i) = init {
            let _ = kill(i, libc::SIGKILL);
            let _ = wait(i);
        }
        let what = match report.failed {
            1 => "creating the PID/time namespaces".to_string(),
            2 => "setting the time namespace's clock offsets".to_string(),
            3 => "starting the PID namespace's init".to_string(),
            4 if set_tid != 0 => format!("creating process {set_tid} in the new PID namespace"),
            5 => "setting the host name of the new UTS namespace".to_string(),
            _ => "creating the process in the new namespaces".to_string(),
        };
        return Err(sys_err(what, io::Error::from_raw_os_error(report.errno)));
    }
    match stopped_after_exec(report.child) {
        Ok(c) => Ok((c, init)),
        Err(e) => {
            if let Some(i) = init {
                let _ = kill(i, libc::SIGKILL);
                let _ = wait(i);
            }
            Err(e)
        }
    }
}

/// Nanoseconds of `clock` as this process sees it.
pub fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// The init of a restore PID namespace is this very program, exec'd with argv[0]
/// [`NS_INIT_ARG0`] and argv[1] the PID of the restored process there. This runs before
/// `main` in every program that links this crate (an ELF constructor: glibc passes argc,
/// argv, envp), so no program has to do anything for it. As that init it never returns:
/// it ignores signals (its children are reaped by the kernel), waits until the
/// restorer's helper is gone (EOF on fd 0), then until the process exits, and exits,
/// which makes the kernel kill whatever is left in the namespace.
extern "C" fn ns_init_ctor(
    argc: libc::c_int,
    argv: *const *const libc::c_char,
    _envp: *const *const libc::c_char,
) {
    if argc != 2 || argv.is_null() {
        return;
    }
    // SAFETY: argv holds argc valid NUL-terminated strings (the exec contract); only
    // raw system calls on local buffers follow; SIG_IGN has no handler code.
    unsafe {
        let arg0 = std::ffi::CStr::from_ptr(*argv);
        if arg0.to_bytes() != NS_INIT_ARG0.as_bytes() {
            return;
        }
        let pid: i32 = std::ffi::CStr::from_ptr(*argv.add(1))
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        for s in 1..32 {
            if s != libc::SIGKILL && s != libc::SIGSTOP {
                libc::signal(s, libc::SIG_IGN);
            }
        }
        let mut b = [0u8; 16];
        loop {
            let n = libc::read(0, b.as_mut_ptr() as *mut _, b.len());
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pid > 1 && fd >= 0 {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            while libc::poll(&mut p, 1, -1) < 0 && *libc::__errno_location() == libc::EINTR {}
        }
        libc::_exit(0)
    }
}

#[used]
#[link_section = ".init_array"]
static NS_INIT_CTOR: extern "C" fn(
    libc::c_int,
    *const *const libc::c_char,
    *const *const libc::c_char,
) = ns_init_ctor;

/// A pidfd for `pid` (readable once the process has exited), for poll loops.
pub fn pidfd_open(pid: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: r is a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as RawFd) })
}

/// Bytes waiting to be read in a pipe or socket (FIONREAD).
pub fn unread_bytes(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer, which points to `n`.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// A descriptor of process `pidfd` (its number `fd` there) duplicated into ours
/// (pidfd_getfd; needs ptrace rights over it).
pub fn pidfd_getfd(pidfd: RawFd, fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_getfd takes two descriptors numbers and flags, returns a new one or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: r is a fresh descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as RawFd) })
}

/// ioctl(fd, req, arg) with `arg` a pointer to `T`, which the kernel reads and may write.
fn ioctl_ptr<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<i64> {
    // SAFETY: `arg` is a live, exclusively borrowed value of the size and layout the
    // request `req` reads and writes (the callers below pass the kernel's structs).
    let r = unsafe { libc::ioctl(fd, req as _, arg as *mut T) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as i64)
}

// userfaultfd (include/uapi/linux/userfaultfd.h; the headers here are older than the
// kernel, so the numbers are ours).
const UFFD_API: u64 = 0xAA;
/// _IOWR(0xAA, 0x3F, struct uffdio_api)
const UFFDIO_API: u64 = 0xC018_AA3F;
/// _IOWR(0xAA, 0x00, struct uffdio_register)
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
/// _IOR(0xAA, 0x01, struct uffdio_range)
const UFFDIO_UNREGISTER: u64 = 0x8010_AA01;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// UFFDIO_API on userfaultfd `fd` with `features`; returns the features the kernel has.
pub fn uffd_api(fd: RawFd, features: u64) -> io::Result<u64> {
    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    let mut a = Api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl_ptr(fd, UFFDIO_API, &mut a)?;
    Ok(a.features)
}

/// Registers [start, start+len) with userfaultfd `fd` for write protection.
pub fn uffd_register_wp(fd: RawFd, start: u64, len: u64) -> io::Result<()> {
    #[repr(C)]
    struct Register {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }
    let mut r = Register {
        start,
        len,
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    ioctl_ptr(fd, UFFDIO_REGISTER, &mut r).map(drop)
}

/// Registers [start, start+len) with userfaultfd `fd` for missing pages (a fault on a
/// page not there waits for the holder of `fd` to put it in).
pub fn uffd_register_missing(fd: RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = [start, len, UFFDIO_REGISTER_MODE_MISSING, 0];
    ioctl_ptr(fd, UFFDIO_REGISTER, &mut r).map(drop)
}

/// _IOWR(0xAA, 0x03, struct uffdio_copy)
const UFFDIO_COPY: u64 = 0xC028_AA03;
/// _IOWR(0xAA, 0x04, struct uffdio_zeropage)
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;
/// _IOR(0xAA, 0x02, struct uffdio_range)
const UFFDIO_WAKE: u64 = 0x8010_AA02;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// _IO(0xAA, 0x00) on /dev/userfaultfd: a userfaultfd of the caller's memory.
pub const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

/// UFFDIO_COPY: `src` (of ours) into [dst, dst+len) of the memory of userfaultfd `fd`,
/// waking whoever waits there. Err((errno, bytes put in before it failed)).
pub fn uffd_copy(fd: RawFd, dst: u64, src: &[u8]) -> std::result::Result<(), (i32, u64)> {
    // struct uffdio_copy: dst, src, len, mode, copy (out).
    let mut c = [dst, src.as_ptr() as u64, src.len() as u64, 0, 0];
    match ioctl_ptr(fd, UFFDIO_COPY, &mut c) {
        Ok(_) => Ok(()),
        Err(e) => {
            let done = c[4] as i64;
            Err((e.raw_os_error().unwrap_or(libc::EIO), done.max(0) as u64))
        }
    }
}

/// UFFDIO_ZEROPAGE: [start, start+len) of the memory of userfaultfd `fd` reads as zeros.
pub fn uffd_zeropage(fd: RawFd, start: u64, len: u64) -> io::Result<()> {
    // struct uffdio_zeropage: range (start, len), mode, zeropage (out).
    let mut z = [start, len, 0, 0];
    ioctl_ptr(fd, UFFDIO_ZEROPAGE, &mut z).map(drop)
}

/// UFFDIO_WAKE: whoever waits on [start, start+len) tries again.
pub fn uffd_wake(fd: RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = [start, len];
    ioctl_ptr(fd, UFFDIO_WAKE, &mut r).map(drop)
}

/// One message read from a userfaultfd (struct uffd_msg, 32 bytes): its event and the
/// three words after the header (their meaning is the event's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UffdMsg {
    pub event: u8,
    pub arg: [u64; 3],
}

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_FORK: u8 = 0x13;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;

/// Reads the messages waiting on non-blocking userfaultfd `fd` (none: empty).
pub fn uffd_read(fd: RawFd) -> io::Result<Vec<UffdMsg>> {
    let mut buf = [0u8; 32 * 64];
    // SAFETY: read into a buffer of ours of the length given.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    let word = |m: &[u8], i: usize| u64::from_le_bytes(m[i..i + 8].try_into().expect("8"));
    Ok(buf[..n as usize]
        .chunks_exact(32)
        .map(|m| UffdMsg {
            event: m[0],
            arg: [word(m, 8), word(m, 16), word(m, 24)],
        })
        .collect())
}

/// Unregisters [start, start+len) from userfaultfd `fd`.
pub fn uffd_unregister(fd: RawFd, start: u64, len: u64) -> io::Result<()> {
    let mut r = [start, len];
    ioctl_ptr(fd, UFFDIO_UNREGISTER, &mut r).map(drop)
}

/// One region PAGEMAP_SCAN reports (struct page_region).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    /// PAGE_IS_* bits (those of the scan's return mask).
    pub categories: u64,
}

/// What a PAGEMAP_SCAN asks (struct pm_scan_arg, less the output vector).
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanArgs {
    /// PM_SCAN_* flags.
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// _IOWR('f', 16, struct pm_scan_arg)
const PAGEMAP_SCAN: u64 = 0xC060_6610;

/// One PAGEMAP_SCAN ioctl on `/proc/PID/pagemap` descriptor `fd`: the regions found are
/// appended to `out` (at most `room` of them); returns where the walk ended (`a.end`
/// when it covered everything).
pub fn pagemap_scan(
    fd: RawFd,
    a: &ScanArgs,
    out: &mut Vec<PageRegion>,
    room: usize,
) -> io::Result<u64> {
    #[repr(C)]
    struct Arg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }
    out.reserve(room);
    let spare = out.spare_capacity_mut();
    let mut arg = Arg {
        size: std::mem::size_of::<Arg>() as u64,
        flags: a.flags,
        start: a.start,
        end: a.end,
        walk_end: 0,
        vec: spare.as_mut_ptr() as u64,
        vec_len: room as u64,
        max_pages: a.max_pages,
        category_inverted: a.category_inverted,
        category_mask: a.category_mask,
        category_anyof_mask: a.category_anyof_mask,
        return_mask: a.return_mask,
    };
    let n = ioctl_ptr(fd, PAGEMAP_SCAN, &mut arg)? as usize;
    let n = n.min(room);
    // SAFETY: the kernel wrote `n` (at most `room`) page_region structs into the spare
    // capacity reserved above; PageRegion is repr(C) plain data of the same layout.
    unsafe { out.set_len(out.len() + n) };
    Ok(arg.walk_end)
}

/// Starts writing [off, off+len) of file `fd` back to its disk without waiting for it
/// (sync_file_range SYNC_FILE_RANGE_WRITE), so that a later fdatasync has less to wait for.
pub fn start_writeback(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: sync_file_range takes a descriptor, offsets and flags; no memory.
    let r = unsafe {
        libc::sync_file_range(
            fd,
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
