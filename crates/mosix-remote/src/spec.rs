//! Where each system call of a process away from home is made, and, for the calls carried
//! out at home, which of their arguments are memory and how much of it travels.
//!
//! One table for both ends: the supervisor on the host reads it to gather a trapped call's
//! memory from the process and to write the results back; the deputy at home reads it to
//! lay the call out in its own memory. Neither trusts the other to agree: each derives the
//! layout from the call number and its scalar arguments.

#![allow(non_upper_case_globals)] // libc names its system call numbers SYS_read, ...

use libc::c_long;

/// Bytes one buffer of a forwarded read or write carries at most (a longer read or write
/// is made shorter, which both may be).
pub const MAX_IO: u32 = 1 << 20;
/// Longest path carried (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Most iovec entries (IOV_MAX).
pub const MAX_IOV: u64 = 1024;
/// Most entries of a poll/epoll array.
pub const MAX_EVENTS: u64 = 65536;

/// How long a memory argument is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Len {
    /// The value of argument `i` (bounded by [`MAX_IO`]).
    Arg(u8),
    /// A fixed size.
    Fixed(u32),
    /// The `socklen_t` that argument `i` points to.
    At(u8),
    /// Argument `i` times `n` bytes (nfds × sizeof(struct pollfd), ...).
    Times(u8, u32),
    /// An fd_set of argument `i` descriptors.
    Bits(u8),
}

/// How much of an output buffer comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Back {
    /// All of it (a struct the call fills).
    All,
    /// As many bytes as the call returned.
    Ret,
    /// The call's result times `n` bytes (epoll events).
    RetTimes(u32),
    /// As many bytes as the `socklen_t` at argument `i` says after the call.
    At(u8),
}

/// One argument of a forwarded call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// A number.
    V,
    /// A descriptor of the process (the same number at home), or AT_FDCWD.
    Fd,
    /// A NUL-terminated path.
    Path,
    /// Memory the call reads.
    In(Len),
    /// Memory the call writes.
    Out(Len, Back),
    /// Memory the call reads and writes back (all of it).
    InOut(Len),
    /// An iovec array the call reads, `n` entries as argument `i` says.
    IovIn(u8),
    /// An iovec array the call fills (the result says how many bytes).
    IovOut(u8),
    /// A `struct msghdr` of sendmsg.
    MsgIn,
    /// A `struct msghdr` of recvmsg.
    MsgOut,
    /// A pointer the deputy does not follow: passed as NULL (a signal mask for the
    /// duration of ppoll/pselect6/epoll_pwait, which is the process's business on its host).
    Drop,
}

use Arg::*;

/// How a forwarded call is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub args: [Arg; 6],
    /// It returns a new descriptor (mirrored on the host at the same number).
    pub ret_fd: bool,
    /// Argument `i` is an int[2] the call fills with two new descriptors.
    pub out_fds: Option<u8>,
    /// Once done at home, the process makes it on its host too: a close or dup2 of its
    /// placeholders (so they stay in step with its descriptors at home), a change of
    /// credentials, umask or limits (which both ends keep).
    pub then_local: bool,
}

impl Spec {
    const fn of(args: [Arg; 6]) -> Spec {
        Spec {
            args,
            ret_fd: false,
            out_fds: None,
            then_local: false,
        }
    }
    const fn fd(mut self) -> Spec {
        self.ret_fd = true;
        self
    }
    const fn fds(mut self, at: u8) -> Spec {
        self.out_fds = Some(at);
        self
    }
    const fn both(mut self) -> Spec {
        self.then_local = true;
        self
    }
}

/// Calls the supervisor decides about itself, from their arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    /// open/openat/openat2/creat: the process's own /proc files are opened on the host
    /// (read-only), everything else at home.
    Open(Spec),
    /// readlink/readlinkat: `/proc/self/exe` is answered on the host.
    Readlink(Spec),
    /// mmap of a descriptor: the file's pages are fetched from home into a local copy.
    Mmap,
    /// Signals to a PID: to itself on the host, to anybody else at home.
    Signal,
    /// clone3: a new thread stays (CLONE_THREAD), a new process goes home first.
    Clone3,
}

/// Where a call is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// On the host, without the supervisor (the filter lets it through).
    Local,
    /// At home, by the deputy.
    Forward(Spec),
    /// Decided by the supervisor.
    Special(Special),
    /// It cannot be made away from home: the process goes home and makes it there.
    Home(&'static str),
}

const fn f1(a: Arg) -> Spec {
    Spec::of([a, V, V, V, V, V])
}
const fn f2(a: Arg, b: Arg) -> Spec {
    Spec::of([a, b, V, V, V, V])
}
const fn f3(a: Arg, b: Arg, c: Arg) -> Spec {
    Spec::of([a, b, c, V, V, V])
}
const fn f4(a: Arg, b: Arg, c: Arg, d: Arg) -> Spec {
    Spec::of([a, b, c, d, V, V])
}
const fn f5(a: Arg, b: Arg, c: Arg, d: Arg, e: Arg) -> Spec {
    Spec::of([a, b, c, d, e, V])
}
const fn f6(a: Arg, b: Arg, c: Arg, d: Arg, e: Arg, f: Arg) -> Spec {
    Spec::of([a, b, c, d, e, f])
}
const SCALARS: Spec = Spec::of([V; 6]);
/// A call on one descriptor and numbers.
const ON_FD: Spec = Spec::of([Fd, V, V, V, V, V]);

const STAT: u32 = 144;
const STATFS: u32 = 120;
const STATX: u32 = 256;
const RUSAGE: u32 = 144;
const SIGINFO: u32 = 128;
const TIMESPEC: u32 = 16;
const ITIMERSPEC: u32 = 32;
const FLOCK: u32 = 32;
const EPOLL_EVENT: u32 = 12;
const POLLFD: u32 = 8;
const KTERMIOS: u32 = 36;
const KTERMIOS2: u32 = 44;
const TERMIO: u32 = 18;

/// System calls the filter lets through: they touch only the process's own memory,
/// threads, signals, clocks and CPU, which are the same wherever it runs.
pub const LOCAL: &[c_long] = &[
    libc::SYS_brk,
    libc::SYS_mprotect,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_msync,
    libc::SYS_mincore,
    libc::SYS_madvise,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_mlockall,
    libc::SYS_munlockall,
    libc::SYS_mlock2,
    libc::SYS_pkey_mprotect,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_membarrier,
    libc::SYS_set_mempolicy,
    libc::SYS_get_mempolicy,
    libc::SYS_mbind,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigsuspend,
    libc::SYS_sigaltstack,
    libc::SYS_pause,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_getitimer,
    libc::SYS_setitimer,
    libc::SYS_alarm,
    libc::SYS_gettimeofday,
    libc::SYS_time,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_gettime,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_delete,
    libc::SYS_times,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_getgroups,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_capget,
    libc::SYS_getrlimit,
    libc::SYS_getrusage,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_setparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_getattr,
    libc::SYS_sched_setattr,
    libc::SYS_getcpu,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_set_tid_address,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_rseq,
    libc::SYS_arch_prctl,
    libc::SYS_prctl,
    libc::SYS_restart_syscall,
    libc::SYS_uname,
    libc::SYS_getrandom,
    libc::SYS_sysinfo,
    libc::SYS_personality,
];

/// Where system call `nr` with these arguments is made.
pub fn route(nr: c_long, a: &[u64; 6]) -> Route {
    use libc::*;
    let fwd = Route::Forward;
    let home = Route::Home;
    if LOCAL.contains(&nr) {
        return Route::Local;
    }
    match nr {
        SYS_read => fwd(f3(Fd, Out(Len::Arg(2), Back::Ret), V)),
        SYS_write => fwd(f3(Fd, In(Len::Arg(2)), V)),
        SYS_pread64 => fwd(f4(Fd, Out(Len::Arg(2), Back::Ret), V, V)),
        SYS_pwrite64 => fwd(f4(Fd, In(Len::Arg(2)), V, V)),
        SYS_readv => fwd(f3(Fd, IovOut(2), V)),
        SYS_writev => fwd(f3(Fd, IovIn(2), V)),
        SYS_preadv => fwd(f5(Fd, IovOut(2), V, V, V)),
        SYS_pwritev => fwd(f5(Fd, IovIn(2), V, V, V)),
        SYS_preadv2 => fwd(f6(Fd, IovOut(2), V, V, V, V)),
        SYS_pwritev2 => fwd(f6(Fd, IovIn(2), V, V, V, V)),
        SYS_open => Route::Special(Special::Open(f3(Path, V, V).fd())),
        SYS_creat => Route::Special(Special::Open(f2(Path, V).fd())),
        SYS_openat => Route::Special(Special::Open(f4(Fd, Path, V, V).fd())),
        SYS_openat2 => Route::Special(Special::Open(f4(Fd, Path, In(Len::Arg(3)), V).fd())),
        SYS_close => fwd(ON_FD.both()),
        SYS_close_range => fwd(SCALARS.both()),
        SYS_stat | SYS_lstat => fwd(f2(Path, Out(Len::Fixed(STAT), Back::All))),
        SYS_fstat => fwd(f2(Fd, Out(Len::Fixed(STAT), Back::All))),
        SYS_newfstatat => fwd(f4(Fd, Path, Out(Len::Fixed(STAT), Back::All), V)),
        SYS_statx => fwd(f5(Fd, Path, V, V, Out(Len::Fixed(STATX), Back::All))),
        SYS_statfs => fwd(f2(Path, Out(Len::Fixed(STATFS), Back::All))),
        SYS_fstatfs => fwd(f2(Fd, Out(Len::Fixed(STATFS), Back::All))),
        SYS_poll => fwd(f3(InOut(Len::Times(1, POLLFD)), V, V)),
        SYS_ppoll => fwd(f5(
            InOut(Len::Times(1, POLLFD)),
            V,
            InOut(Len::Fixed(TIMESPEC)),
            Drop,
            V,
        )),
        SYS_select => fwd(f5(
            V,
            InOut(Len::Bits(0)),
            InOut(Len::Bits(0)),
            InOut(Len::Bits(0)),
            InOut(Len::Fixed(16)),
        )),
        SYS_pselect6 => fwd(f6(
            V,
            InOut(Len::Bits(0)),
            InOut(Len::Bits(0)),
            InOut(Len::Bits(0)),
            InOut(Len::Fixed(TIMESPEC)),
            Drop,
        )),
        SYS_lseek => fwd(ON_FD),
        SYS_ioctl => match ioctl_spec(a[1] as u32) {
            Some(s) => fwd(s),
            None => home("an ioctl that is not carried"),
        },
        SYS_fcntl => match fcntl_spec(a[1] as i32) {
            Some(s) => fwd(s),
            None => home("an fcntl that is not carried"),
        },
        SYS_access => fwd(f2(Path, V)),
        SYS_faccessat => fwd(f3(Fd, Path, V)),
        SYS_faccessat2 => fwd(f4(Fd, Path, V, V)),
        SYS_pipe => fwd(f1(Out(Len::Fixed(8), Back::All)).fds(0)),
        SYS_pipe2 => fwd(f2(Out(Len::Fixed(8), Back::All), V).fds(0)),
        SYS_dup => fwd(ON_FD.fd()),
        SYS_dup2 | SYS_dup3 => fwd(f2(Fd, Fd).both()),
        SYS_sendfile => fwd(f4(Fd, Fd, InOut(Len::Fixed(8)), V)),
        SYS_socket => fwd(SCALARS.fd()),
        SYS_connect | SYS_bind => fwd(f3(Fd, In(Len::Arg(2)), V)),
        SYS_accept => fwd(f3(Fd, Out(Len::At(2), Back::At(2)), InOut(Len::Fixed(4))).fd()),
        SYS_accept4 => fwd(f4(Fd, Out(Len::At(2), Back::At(2)), InOut(Len::Fixed(4)), V).fd()),
        SYS_sendto => fwd(f6(Fd, In(Len::Arg(2)), V, V, In(Len::Arg(5)), V)),
        SYS_recvfrom => fwd(f6(
            Fd,
            Out(Len::Arg(2), Back::Ret),
            V,
            V,
            Out(Len::At(5), Back::At(5)),
            InOut(Len::Fixed(4)),
        )),
        SYS_sendmsg => fwd(f3(Fd, MsgIn, V)),
        SYS_recvmsg => fwd(f3(Fd, MsgOut, V)),
        SYS_shutdown | SYS_listen => fwd(ON_FD),
        SYS_getsockname | SYS_getpeername => {
            fwd(f3(Fd, Out(Len::At(2), Back::At(2)), InOut(Len::Fixed(4))))
        }
        SYS_socketpair => fwd(f4(V, V, V, Out(Len::Fixed(8), Back::All)).fds(3)),
        SYS_setsockopt => fwd(f5(Fd, V, V, In(Len::Arg(4)), V)),
        SYS_getsockopt => fwd(f5(
            Fd,
            V,
            V,
            Out(Len::At(4), Back::At(4)),
            InOut(Len::Fixed(4)),
        )),
        SYS_wait4 => fwd(f4(
            V,
            Out(Len::Fixed(4), Back::All),
            V,
            Out(Len::Fixed(RUSAGE), Back::All),
        )),
        SYS_waitid => fwd(f5(
            V,
            V,
            Out(Len::Fixed(SIGINFO), Back::All),
            V,
            Out(Len::Fixed(RUSAGE), Back::All),
        )),
        SYS_sync => fwd(SCALARS),
        SYS_flock | SYS_fsync | SYS_fdatasync | SYS_ftruncate | SYS_fchdir | SYS_fchmod
        | SYS_fchown | SYS_syncfs | SYS_fadvise64 | SYS_readahead | SYS_fallocate
        | SYS_sync_file_range | SYS_inotify_rm_watch => fwd(ON_FD),
        SYS_tee => fwd(f2(Fd, Fd)),
        SYS_getppid | SYS_getpgrp | SYS_getpgid | SYS_getsid | SYS_setpgid | SYS_setsid => {
            fwd(SCALARS)
        }
        SYS_truncate | SYS_chdir | SYS_rmdir | SYS_unlink | SYS_chroot => fwd(f2(Path, V)),
        SYS_mkdir | SYS_chmod => fwd(f2(Path, V)),
        SYS_chown | SYS_lchown => fwd(f3(Path, V, V)),
        SYS_mknod => fwd(f3(Path, V, V)),
        SYS_rename | SYS_link | SYS_symlink => fwd(f2(Path, Path)),
        SYS_getdents | SYS_getdents64 => fwd(f3(Fd, Out(Len::Arg(2), Back::Ret), V)),
        SYS_getcwd => fwd(f2(Out(Len::Arg(1), Back::Ret), V)),
        SYS_readlink => Route::Special(Special::Readlink(f3(Path, Out(Len::Arg(2), Back::Ret), V))),
        SYS_readlinkat => Route::Special(Special::Readlink(f4(
            Fd,
            Path,
            Out(Len::Arg(3), Back::Ret),
            V,
        ))),
        SYS_umask => fwd(SCALARS.both()),
        SYS_setuid | SYS_setgid | SYS_setreuid | SYS_setregid | SYS_setresuid | SYS_setresgid
        | SYS_setfsuid | SYS_setfsgid => fwd(SCALARS.both()),
        SYS_setgroups => fwd(f2(V, In(Len::Times(0, 4))).both()),
        SYS_setrlimit => fwd(f2(V, In(Len::Fixed(16))).both()),
        SYS_prlimit64 if a[2] == 0 => Route::Local,
        SYS_prlimit64 => fwd(f4(V, V, In(Len::Fixed(16)), Out(Len::Fixed(16), Back::All)).both()),
        SYS_utime => fwd(f2(Path, In(Len::Fixed(16)))),
        SYS_utimes => fwd(f2(Path, In(Len::Fixed(32)))),
        SYS_futimesat => fwd(f3(Fd, Path, In(Len::Fixed(32)))),
        SYS_utimensat => fwd(f4(Fd, Path, In(Len::Fixed(32)), V)),
        SYS_setxattr | SYS_lsetxattr => fwd(f5(Path, Path, In(Len::Arg(3)), V, V)),
        SYS_fsetxattr => fwd(f5(Fd, Path, In(Len::Arg(3)), V, V)),
        SYS_getxattr | SYS_lgetxattr => fwd(f4(Path, Path, Out(Len::Arg(3), Back::Ret), V)),
        SYS_fgetxattr => fwd(f4(Fd, Path, Out(Len::Arg(3), Back::Ret), V)),
        SYS_listxattr | SYS_llistxattr => fwd(f3(Path, Out(Len::Arg(2), Back::Ret), V)),
        SYS_flistxattr => fwd(f3(Fd, Out(Len::Arg(2), Back::Ret), V)),
        SYS_removexattr | SYS_lremovexattr => fwd(f2(Path, Path)),
        SYS_fremovexattr => fwd(f2(Fd, Path)),
        SYS_epoll_create | SYS_epoll_create1 => fwd(SCALARS.fd()),
        SYS_epoll_ctl => fwd(f4(Fd, V, Fd, In(Len::Fixed(EPOLL_EVENT)))),
        SYS_epoll_wait => fwd(f4(
            Fd,
            Out(Len::Times(2, EPOLL_EVENT), Back::RetTimes(EPOLL_EVENT)),
            V,
            V,
        )),
        SYS_epoll_pwait => fwd(f6(
            Fd,
            Out(Len::Times(2, EPOLL_EVENT), Back::RetTimes(EPOLL_EVENT)),
            V,
            V,
            Drop,
            V,
        )),
        SYS_epoll_pwait2 => fwd(f6(
            Fd,
            Out(Len::Times(2, EPOLL_EVENT), Back::RetTimes(EPOLL_EVENT)),
            V,
            In(Len::Fixed(TIMESPEC)),
            Drop,
            V,
        )),
        SYS_eventfd | SYS_eventfd2 | SYS_timerfd_create | SYS_inotify_init | SYS_inotify_init1
        | SYS_fanotify_init => fwd(SCALARS.fd()),
        SYS_timerfd_settime => fwd(f4(
            Fd,
            V,
            In(Len::Fixed(ITIMERSPEC)),
            Out(Len::Fixed(ITIMERSPEC), Back::All),
        )),
        SYS_timerfd_gettime => fwd(f2(Fd, Out(Len::Fixed(ITIMERSPEC), Back::All))),
        SYS_inotify_add_watch => fwd(f3(Fd, Path, V)),
        SYS_fanotify_mark => fwd(f5(Fd, V, V, Fd, Path)),
        SYS_mkdirat | SYS_unlinkat | SYS_fchmodat => fwd(f3(Fd, Path, V)),
        SYS_fchmodat2 => fwd(f4(Fd, Path, V, V)),
        SYS_mknodat => fwd(f4(Fd, Path, V, V)),
        SYS_fchownat => fwd(f5(Fd, Path, V, V, V)),
        SYS_renameat => fwd(f4(Fd, Path, Fd, Path)),
        SYS_renameat2 => fwd(f5(Fd, Path, Fd, Path, V)),
        SYS_linkat => fwd(f5(Fd, Path, Fd, Path, V)),
        SYS_symlinkat => fwd(f3(Path, Fd, Path)),
        SYS_splice => fwd(f6(Fd, InOut(Len::Fixed(8)), Fd, InOut(Len::Fixed(8)), V, V)),
        SYS_copy_file_range => fwd(f6(Fd, InOut(Len::Fixed(8)), Fd, InOut(Len::Fixed(8)), V, V)),
        SYS_vhangup => fwd(SCALARS),
        SYS_mmap => Route::Special(Special::Mmap),
        SYS_kill | SYS_tkill | SYS_tgkill | SYS_rt_sigqueueinfo | SYS_rt_tgsigqueueinfo => {
            Route::Special(Special::Signal)
        }
        SYS_clone3 => Route::Special(Special::Clone3),
        SYS_clone | SYS_fork | SYS_vfork => home("it starts a new process"),
        SYS_execve | SYS_execveat => home("it runs a new program"),
        SYS_ptrace
        | SYS_process_vm_readv
        | SYS_process_vm_writev
        | SYS_pidfd_open
        | SYS_pidfd_getfd
        | SYS_pidfd_send_signal
        | SYS_kcmp
        | SYS_process_madvise => home("it works on other processes"),
        SYS_shmget | SYS_shmat | SYS_shmctl | SYS_shmdt | SYS_semget | SYS_semop | SYS_semctl
        | SYS_semtimedop | SYS_msgget | SYS_msgsnd | SYS_msgrcv | SYS_msgctl => {
            home("it uses System V IPC")
        }
        SYS_signalfd | SYS_signalfd4 => home("it reads its signals from a descriptor"),
        SYS_memfd_create | SYS_memfd_secret => home("it makes shared memory"),
        SYS_seccomp => home("it installs a seccomp filter"),
        _ => home("a system call that is not carried from away"),
    }
}

/// How a signal call to another process is carried (kill, tkill, tgkill,
/// rt_sigqueueinfo, rt_tgsigqueueinfo).
pub fn signal_spec(nr: c_long) -> Option<Spec> {
    use libc::*;
    match nr {
        SYS_kill | SYS_tkill | SYS_tgkill => Some(SCALARS),
        SYS_rt_sigqueueinfo => Some(f3(V, V, In(Len::Fixed(SIGINFO)))),
        SYS_rt_tgsigqueueinfo => Some(f4(V, V, V, In(Len::Fixed(SIGINFO)))),
        _ => None,
    }
}

/// How ioctl `req` is carried (None: not carried).
pub fn ioctl_spec(req: u32) -> Option<Spec> {
    let out = |n| Some(f3(Fd, V, Out(Len::Fixed(n), Back::All)));
    let inp = |n| Some(f3(Fd, V, In(Len::Fixed(n))));
    match req {
        0x5401 => out(KTERMIOS),                                   // TCGETS
        0x5402..=0x5404 => inp(KTERMIOS),                          // TCSETS, TCSETSW, TCSETSF
        0x5405 => out(TERMIO),                                     // TCGETA
        0x5406..=0x5408 => inp(TERMIO),                            // TCSETA, TCSETAW, TCSETAF
        0x802c_542a => out(KTERMIOS2),                             // TCGETS2
        0x402c_542b..=0x402c_542d => inp(KTERMIOS2),               // TCSETS2, W, F
        0x5409..=0x540b | 0x5425 => Some(ON_FD), // TCSBRK, TCXONC, TCFLSH, TCSBRKP
        0x540c | 0x540d | 0x5422 | 0x5450 | 0x5451 => Some(ON_FD), // (N)EXCL, NOTTY, FIO(N)CLEX
        0x540e => Some(ON_FD),                   // TIOCSCTTY
        0x540f | 0x5429 | 0x5411 | 0x541b | 0x5415 | 0x5419 | 0x5424 => out(4),
        0x5410 | 0x5416..=0x5418 | 0x541a | 0x5423 | 0x5421 | 0x5452 => inp(4),
        0x5412 => inp(1),                    // TIOCSTI
        0x5413 => out(8),                    // TIOCGWINSZ
        0x5414 => inp(8),                    // TIOCSWINSZ
        0x8004_5430 | 0x8004_5440 => out(4), // TIOCGPTN, TIOCGEXCL
        0x4004_5431 => inp(4),               // TIOCSPTLCK
        0x5441 => Some(ON_FD.fd()),          // TIOCGPTPEER
        0x5460 => out(8),                    // FIOQSIZE
        _ => None,
    }
}

/// How fcntl command `cmd` is carried (None: not carried).
pub fn fcntl_spec(cmd: i32) -> Option<Spec> {
    use libc::*;
    match cmd {
        F_DUPFD | F_DUPFD_CLOEXEC => Some(ON_FD.fd()),
        F_GETFD | F_SETFD | F_GETFL | F_SETFL | F_SETOWN | F_GETOWN | 10 | 11 // F_SETSIG, F_GETSIG
        | F_SETLEASE | F_GETLEASE | F_NOTIFY | F_SETPIPE_SZ | F_GETPIPE_SZ | F_ADD_SEALS
        | F_GET_SEALS => Some(ON_FD),
        F_GETLK | F_SETLK | F_SETLKW | F_OFD_GETLK | F_OFD_SETLK | F_OFD_SETLKW => {
            Some(f3(Fd, V, InOut(Len::Fixed(FLOCK))))
        }
        15 | 16 => Some( // F_SETOWN_EX, F_GETOWN_EX
            f3(Fd, V, InOut(Len::Fixed(8)))),
        1035..=1038 => Some(f3(Fd, V, InOut(Len::Fixed(8)))), // F_{GET,SET}_{FILE_,}RW_HINT
        _ => None,
    }
}

/// A short name of system call `nr`, for messages.
pub fn name(nr: c_long) -> String {
    use libc::*;
    let n = match nr {
        SYS_read => "read",
        SYS_write => "write",
        SYS_open => "open",
        SYS_openat => "openat",
        SYS_close => "close",
        SYS_ioctl => "ioctl",
        SYS_fcntl => "fcntl",
        SYS_mmap => "mmap",
        SYS_clone => "clone",
        SYS_clone3 => "clone3",
        SYS_fork => "fork",
        SYS_vfork => "vfork",
        SYS_execve => "execve",
        SYS_execveat => "execveat",
        SYS_wait4 => "wait4",
        SYS_kill => "kill",
        SYS_socket => "socket",
        SYS_connect => "connect",
        SYS_ptrace => "ptrace",
        _ => return format!("system call {nr}"),
    };
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_local_call_is_local_and_nothing_else_is() {
        for &nr in LOCAL {
            assert_eq!(route(nr, &[0; 6]), Route::Local, "{nr}");
        }
        assert!(matches!(route(libc::SYS_read, &[0; 6]), Route::Forward(_)));
        assert!(matches!(route(libc::SYS_fork, &[0; 6]), Route::Home(_)));
        assert!(matches!(route(9999, &[0; 6]), Route::Home(_)));
    }

    #[test]
    fn descriptor_makers_mirror_their_descriptors() {
        let s = |nr, a: [u64; 6]| match route(nr, &a) {
            Route::Forward(s) | Route::Special(Special::Open(s)) => s,
            r => panic!("{nr}: {r:?}"),
        };
        assert!(s(libc::SYS_openat, [0; 6]).ret_fd);
        assert!(s(libc::SYS_socket, [0; 6]).ret_fd);
        assert!(
            s(
                libc::SYS_fcntl,
                [0, libc::F_DUPFD_CLOEXEC as u64, 0, 0, 0, 0]
            )
            .ret_fd
        );
        assert_eq!(s(libc::SYS_pipe2, [0; 6]).out_fds, Some(0));
        assert_eq!(s(libc::SYS_socketpair, [0; 6]).out_fds, Some(3));
        assert!(s(libc::SYS_dup2, [0; 6]).then_local);
        assert!(s(libc::SYS_close, [0; 6]).then_local);
        assert!(s(libc::SYS_setresuid, [0; 6]).then_local);
    }

    #[test]
    fn unknown_ioctls_and_fcntls_go_home() {
        assert!(matches!(
            route(libc::SYS_ioctl, &[0, 0xdead, 0, 0, 0, 0]),
            Route::Home(_)
        ));
        assert!(matches!(
            route(libc::SYS_fcntl, &[0, 9999, 0, 0, 0, 0]),
            Route::Home(_)
        ));
        assert!(matches!(
            route(libc::SYS_ioctl, &[1, 0x5413, 0, 0, 0, 0]),
            Route::Forward(_)
        ));
    }
}
