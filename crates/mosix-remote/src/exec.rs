//! Home side of a forwarded call: the deputy lays the call's memory out in its own
//! address space, makes the call itself (it *is* the process at home: same descriptors,
//! cwd, credentials), and packs what the call wrote.

use crate::spec::{self, Arg, Back as BackRule, Len, Route, Spec, Special, MAX_IO, MAX_IOV};
use crate::wire::{Back, Buf, Call, Reply};

/// The raw outcome of one call: its result, and the output per argument.
#[derive(Default)]
pub struct Outcome {
    pub ret: i64,
    pub outs: Vec<Back>,
}

/// The spec the deputy lays a call out by (its own reading of the table).
pub fn spec_of(call: &Call) -> Option<Spec> {
    match spec::route(call.nr, &call.args) {
        Route::Forward(s)
        | Route::Special(Special::Open(s))
        | Route::Special(Special::Readlink(s)) => Some(s),
        Route::Special(Special::Signal) => spec::signal_spec(call.nr),
        _ => None,
    }
}

fn err(e: i32) -> Outcome {
    Outcome {
        ret: -(e as i64),
        outs: Vec::new(),
    }
}

/// Memory laid out for one call; kept alive while the call runs.
#[derive(Default)]
struct Frame {
    bufs: Vec<Vec<u8>>,
    iovs: Vec<Vec<libc::iovec>>,
    // Boxed: a msghdr's address is handed to the kernel and must not move as more come.
    #[allow(clippy::vec_box)]
    msgs: Vec<Box<libc::msghdr>>,
}

impl Frame {
    fn buf(&mut self, v: Vec<u8>) -> (usize, u64) {
        self.bufs.push(v);
        let i = self.bufs.len() - 1;
        (i, self.bufs[i].as_mut_ptr() as u64)
    }
    fn iov(&mut self, base: usize, lens: &[u32]) -> (usize, u64) {
        let p = self.bufs[base].as_mut_ptr();
        let mut at = 0usize;
        let v: Vec<libc::iovec> = lens
            .iter()
            .map(|&l| {
                // SAFETY: `at` stays within the buffer: the lengths add up to its size
                // (checked by the caller).
                let b = unsafe { p.add(at) };
                at += l as usize;
                libc::iovec {
                    iov_base: b.cast(),
                    iov_len: l as usize,
                }
            })
            .collect();
        self.iovs.push(v);
        let i = self.iovs.len() - 1;
        (i, self.iovs[i].as_mut_ptr() as u64)
    }
}

/// What to do with an argument's output after the call.
enum Post {
    None,
    Bytes(usize, BackRule, u32),
    InOut(usize),
    Iov(usize),
    Msg(usize, usize, usize, usize),
}

/// A call laid out in the deputy's memory, ready to be made (and made again, after an
/// interruption that the process does not see).
pub struct Prepared {
    seq: u64,
    nr: i64,
    a: [u64; 6],
    f: Frame,
    post: Vec<Post>,
    socklen_buf: [Option<usize>; 6],
    /// Buffers the call writes over (in-out arguments, messages' headers) as they came:
    /// put back before it is made again.
    inout: Vec<(usize, Vec<u8>)>,
    msgs: Vec<libc::msghdr>,
    made: bool,
}

/// Makes `call` here. `private(fd)` says whether a descriptor is the deputy's own (the
/// process never sees those: EBADF).
pub fn execute(call: &Call, private: &dyn Fn(u64) -> bool) -> Outcome {
    match prepare(call.clone(), private) {
        Err(o) => o,
        Ok(mut p) => {
            let ret = p.run(private);
            p.finish(ret)
        }
    }
}

/// Lays `call` out (its buffers are moved, not copied). Err: the outcome it has without
/// being made (a malformed call).
pub fn prepare(call: Call, private: &dyn Fn(u64) -> bool) -> Result<Prepared, Outcome> {
    let Some(spec) = spec_of(&call) else {
        return Err(err(libc::ENOSYS));
    };
    if call.bufs.len() != 6 {
        return Err(err(libc::EINVAL));
    }
    let mut a = call.args;
    let mut f = Frame::default();
    let mut post: Vec<Post> = Vec::with_capacity(6);
    let mut inout = Vec::new();
    // Out arguments whose length is a socklen_t elsewhere: (out buffer, socklen buffer).
    let mut clamp: Vec<(usize, usize)> = Vec::new();
    let mut socklen_buf: [Option<usize>; 6] = [None; 6];
    for (i, buf) in call.bufs.into_iter().enumerate() {
        let p = match (spec.args[i], buf) {
            (Arg::V, Buf::None) => {
                post.push(Post::None);
                continue;
            }
            (Arg::Fd, Buf::None) => {
                if private(a[i]) {
                    return Err(err(libc::EBADF));
                }
                post.push(Post::None);
                continue;
            }
            (Arg::Drop, _) => {
                a[i] = 0;
                post.push(Post::None);
                continue;
            }
            (_, Buf::None) => {
                // A NULL pointer.
                a[i] = 0;
                post.push(Post::None);
                continue;
            }
            (Arg::Path, Buf::In(b)) => {
                if b.last() != Some(&0) {
                    return Err(err(libc::EINVAL));
                }
                let (_, p) = f.buf(b);
                post.push(Post::None);
                p
            }
            (Arg::In(len), Buf::In(b)) => {
                if b.len() > MAX_IO as usize {
                    return Err(err(libc::EINVAL));
                }
                set_len(&mut a, len, b.len() as u64);
                let (_, p) = f.buf(b);
                post.push(Post::None);
                p
            }
            (Arg::Out(len, rule), Buf::Out(cap)) => {
                if cap > MAX_IO {
                    return Err(err(libc::EINVAL));
                }
                set_len(&mut a, len, cap as u64);
                let (k, p) = f.buf(vec![0u8; cap as usize]);
                if let Len::At(j) = len {
                    clamp.push((k, j as usize));
                }
                post.push(Post::Bytes(k, rule, cap));
                p
            }
            (Arg::InOut(_), Buf::InOut(b)) => {
                if b.len() > MAX_IO as usize {
                    return Err(err(libc::EINVAL));
                }
                let (k, p) = f.buf(b);
                socklen_buf[i] = Some(k);
                post.push(Post::InOut(k));
                p
            }
            (Arg::IovIn(k), Buf::IovIn { data, lens }) => {
                if !iov_ok(&lens, data.len()) {
                    return Err(err(libc::EINVAL));
                }
                let (b, _) = f.buf(data);
                let (_, p) = f.iov(b, &lens);
                a[k as usize] = lens.len() as u64;
                post.push(Post::None);
                p
            }
            (Arg::IovOut(k), Buf::IovOut { lens }) => {
                let total: u64 = lens.iter().map(|&l| l as u64).sum();
                if lens.len() as u64 > MAX_IOV || total > MAX_IO as u64 {
                    return Err(err(libc::EINVAL));
                }
                let (b, _) = f.buf(vec![0u8; total as usize]);
                let (_, p) = f.iov(b, &lens);
                a[k as usize] = lens.len() as u64;
                post.push(Post::Iov(b));
                p
            }
            (
                Arg::MsgIn,
                Buf::MsgIn {
                    name,
                    data,
                    lens,
                    control,
                },
            ) => {
                if !iov_ok(&lens, data.len()) || name.len() > 4096 || control.len() > 65536 {
                    return Err(err(libc::EINVAL));
                }
                let (nb, np) = f.buf(name);
                let (db, _) = f.buf(data);
                let (vi, vp) = f.iov(db, &lens);
                let (cb, cp) = f.buf(control);
                let m = msghdr(
                    np,
                    f.bufs[nb].len(),
                    vp,
                    f.iovs[vi].len(),
                    cp,
                    f.bufs[cb].len(),
                );
                f.msgs.push(Box::new(m));
                post.push(Post::None);
                &**f.msgs.last().expect("pushed") as *const libc::msghdr as u64
            }
            (
                Arg::MsgOut,
                Buf::MsgOut {
                    name,
                    lens,
                    control,
                },
            ) => {
                let total: u64 = lens.iter().map(|&l| l as u64).sum();
                if lens.len() as u64 > MAX_IOV
                    || total > MAX_IO as u64
                    || name > 4096
                    || control > 65536
                {
                    return Err(err(libc::EINVAL));
                }
                let (nb, np) = f.buf(vec![0u8; name as usize]);
                let (db, _) = f.buf(vec![0u8; total as usize]);
                let (vi, vp) = f.iov(db, &lens);
                let (cb, cp) = f.buf(vec![0u8; control as usize]);
                let np = if name == 0 { 0 } else { np };
                let cp = if control == 0 { 0 } else { cp };
                let m = msghdr(
                    np,
                    name as usize,
                    vp,
                    f.iovs[vi].len(),
                    cp,
                    control as usize,
                );
                f.msgs.push(Box::new(m));
                let mi = f.msgs.len() - 1;
                post.push(Post::Msg(mi, nb, db, cb));
                &*f.msgs[mi] as *const libc::msghdr as u64
            }
            _ => return Err(err(libc::EINVAL)),
        };
        a[i] = p;
    }
    // A socklen_t the call reads must not promise more room than the buffer has.
    for (k, j) in &clamp {
        if let Some(sb) = socklen_buf[*j] {
            let cap = f.bufs[*k].len() as u32;
            let b = &mut f.bufs[sb];
            if b.len() >= 4 {
                let v = u32::from_le_bytes(b[..4].try_into().expect("4")).min(cap);
                b[..4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    for p in &post {
        if let Post::InOut(k) = p {
            inout.push((*k, f.bufs[*k].clone()));
        }
    }
    let msgs = f.msgs.iter().map(|m| **m).collect();
    Ok(Prepared {
        seq: call.seq,
        nr: call.nr,
        a,
        f,
        post,
        socklen_buf,
        inout,
        msgs,
        made: false,
    })
}

impl Prepared {
    /// The call's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Makes the call (again: with what it overwrote put back first): -errno on failure.
    pub fn run(&mut self, private: &dyn Fn(u64) -> bool) -> i64 {
        if self.made {
            for (k, orig) in &self.inout {
                self.f.bufs[*k].copy_from_slice(orig);
            }
            for (m, orig) in self.f.msgs.iter_mut().zip(&self.msgs) {
                **m = *orig;
            }
        }
        self.made = true;
        if self.nr == libc::SYS_close_range {
            return close_range(self.a[0], self.a[1], self.a[2], private);
        }
        raw_syscall(self.nr, &self.a)
    }

    /// What the call made with result `ret` wrote, per argument (its buffers are moved
    /// into the outcome, not copied).
    pub fn finish(mut self, ret: i64) -> Outcome {
        if self.nr == libc::SYS_close_range {
            return Outcome {
                ret,
                outs: vec![Back::None; 6],
            };
        }
        let f = &mut self.f;
        let socklen_buf = self.socklen_buf;
        let mut outs = Vec::with_capacity(6);
        for p in &self.post {
            outs.push(match p {
                Post::None => Back::None,
                _ if ret < 0 && !matches!(p, Post::InOut(_)) => Back::None,
                Post::Bytes(k, rule, cap) => {
                    let n = match rule {
                        BackRule::At(j) => socklen_buf[*j as usize]
                            .and_then(|sb| f.bufs[sb].get(..4))
                            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
                            .unwrap_or(0)
                            .min(*cap),
                        r => crate::gather::back_len(*r, *cap, ret),
                    };
                    Back::Bytes(take(&mut f.bufs[*k], n as usize))
                }
                Post::InOut(k) => Back::Bytes(f.bufs[*k].clone()),
                Post::Iov(b) => {
                    let n = (ret.max(0) as usize).min(f.bufs[*b].len());
                    Back::Bytes(take(&mut f.bufs[*b], n))
                }
                Post::Msg(mi, nb, db, cb) => {
                    let m = &f.msgs[*mi];
                    let nl = (m.msg_namelen as usize).min(f.bufs[*nb].len());
                    let cl = m.msg_controllen.min(f.bufs[*cb].len());
                    let dl = (ret.max(0) as usize).min(f.bufs[*db].len());
                    let flags = m.msg_flags;
                    Back::Msg {
                        name: f.bufs[*nb][..nl].to_vec(),
                        data: take(&mut f.bufs[*db], dl),
                        control: f.bufs[*cb][..cl].to_vec(),
                        flags,
                    }
                }
            });
        }
        Outcome { ret, outs }
    }
}

/// The first `n` bytes of `buf`, taken out of it (a large buffer is moved, a small part
/// of one copied).
fn take(buf: &mut Vec<u8>, n: usize) -> Vec<u8> {
    let n = n.min(buf.len());
    if n >= buf.len() / 2 || n > 64 << 10 {
        let mut v = std::mem::take(buf);
        v.truncate(n);
        v
    } else {
        buf[..n].to_vec()
    }
}

/// The reply to call `seq` made with this outcome.
pub fn reply(seq: u64, o: Outcome, sigs: u64) -> Reply {
    Reply::Done {
        seq,
        ret: o.ret,
        outs: o.outs,
        sigs,
        begin: None,
    }
}

fn set_len(a: &mut [u64; 6], len: Len, n: u64) {
    match len {
        Len::Arg(j) => a[j as usize] = n,
        Len::Times(j, per) if per > 0 => a[j as usize] = n / per as u64,
        _ => {}
    }
}

fn iov_ok(lens: &[u32], total: usize) -> bool {
    lens.len() as u64 <= MAX_IOV && lens.iter().map(|&l| l as usize).sum::<usize>() == total
}

fn msghdr(
    name: u64,
    namelen: usize,
    iov: u64,
    iovlen: usize,
    ctl: u64,
    ctllen: usize,
) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_name = name as *mut libc::c_void;
    m.msg_namelen = namelen as u32;
    m.msg_iov = iov as *mut libc::iovec;
    m.msg_iovlen = iovlen;
    m.msg_control = ctl as *mut libc::c_void;
    m.msg_controllen = ctllen;
    m
}

/// The system call itself: -errno on failure.
pub fn raw_syscall(nr: i64, a: &[u64; 6]) -> i64 {
    // SAFETY: every pointer argument was replaced by a pointer into memory this frame
    // owns, sized as the call's table entry says, or by NULL; numbers pass as they are.
    // The calls in the table act on the calling process only.
    let r = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    if r == -1 {
        -(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as i64)
    } else {
        r
    }
}

/// close_range that spares the deputy's own descriptors.
fn close_range(first: u64, last: u64, flags: u64, private: &dyn Fn(u64) -> bool) -> i64 {
    if first > last {
        return -(libc::EINVAL as i64);
    }
    let mut lo = first;
    let mut ret = 0;
    // The deputy's own descriptors are few and high: close around them.
    let top = last.min(1 << 20);
    let mut fd = first;
    while fd <= top {
        if private(fd) {
            if fd > lo {
                ret = ret.min(raw_syscall(
                    libc::SYS_close_range,
                    &[lo, fd - 1, flags, 0, 0, 0],
                ));
            }
            lo = fd + 1;
        }
        fd += 1;
    }
    if lo <= last {
        ret = ret.min(raw_syscall(
            libc::SYS_close_range,
            &[lo, last, flags, 0, 0, 0],
        ));
    }
    ret
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gather::{gather, scatter, tests::Fake, Mem};
    use std::cell::RefCell;
    use std::os::fd::AsRawFd;

    fn none(_: u64) -> bool {
        false
    }

    /// A forwarded call made here through both halves: gather from fake memory, execute,
    /// scatter back.
    fn forward(nr: i64, args: [u64; 6], mem: &Fake) -> i64 {
        let spec = spec_of(&Call {
            seq: 0,
            tid: 0,
            nr,
            args,
            bufs: vec![],
            took: vec![],
        })
        .expect("forwarded");
        let (call, layout) = gather(1, 1, nr, args, &spec, mem).expect("gathered");
        let o = execute(&call, &none);
        scatter(&layout, &o.outs, mem).expect("scattered");
        o.ret
    }

    #[test]
    fn pipes_reads_writes_and_stats_go_through_both_halves() {
        let base = 0x7000_0000u64;
        let mem = Fake {
            base,
            mem: RefCell::new(vec![0u8; 1 << 16]),
        };
        // pipe2 fills an int[2].
        assert_eq!(
            forward(
                libc::SYS_pipe2,
                [base, libc::O_CLOEXEC as u64, 0, 0, 0, 0],
                &mem
            ),
            0
        );
        let m = mem.mem.borrow().clone();
        let r = i32::from_le_bytes(m[0..4].try_into().unwrap());
        let w = i32::from_le_bytes(m[4..8].try_into().unwrap());
        // write from "process memory", read back into it.
        mem.write(base + 100, b"hello, home").unwrap();
        assert_eq!(
            forward(libc::SYS_write, [w as u64, base + 100, 11, 0, 0, 0], &mem),
            11
        );
        assert_eq!(
            forward(libc::SYS_read, [r as u64, base + 200, 100, 0, 0, 0], &mem),
            11
        );
        assert_eq!(&mem.mem.borrow()[200..211], b"hello, home");
        // writev / readv with two segments each.
        let iov = |at: u64, parts: &[(u64, u64)]| {
            let mut v = Vec::new();
            for &(b, l) in parts {
                v.extend_from_slice(&(base + b).to_le_bytes());
                v.extend_from_slice(&l.to_le_bytes());
            }
            mem.write(base + at, &v).unwrap();
        };
        mem.write(base + 300, b"abcXYZ").unwrap();
        iov(1000, &[(300, 3), (303, 3)]);
        assert_eq!(
            forward(libc::SYS_writev, [w as u64, base + 1000, 2, 0, 0, 0], &mem),
            6
        );
        iov(1100, &[(400, 2), (500, 10)]);
        assert_eq!(
            forward(libc::SYS_readv, [r as u64, base + 1100, 2, 0, 0, 0], &mem),
            6
        );
        assert_eq!(&mem.mem.borrow()[400..402], b"ab");
        assert_eq!(&mem.mem.borrow()[500..504], b"cXYZ");
        // fstat of the pipe fills a struct stat.
        assert_eq!(
            forward(libc::SYS_fstat, [r as u64, base + 2000, 0, 0, 0, 0], &mem),
            0
        );
        let mode = u32::from_le_bytes(mem.mem.borrow()[2024..2028].try_into().unwrap());
        assert_eq!(mode & libc::S_IFMT, libc::S_IFIFO);
        // A path: stat of / through a NUL-terminated string.
        mem.write(base + 3000, b"/\0").unwrap();
        assert_eq!(
            forward(libc::SYS_stat, [base + 3000, base + 4000, 0, 0, 0, 0], &mem),
            0
        );
        // Errors come back as -errno.
        assert_eq!(
            forward(libc::SYS_read, [987654, base, 10, 0, 0, 0], &mem),
            -(libc::EBADF as i64)
        );
        // SAFETY: closing the two descriptors pipe2 made in this test.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }

    #[test]
    fn socket_calls_with_lengths_and_messages() {
        let base = 0x7100_0000u64;
        let mem = Fake {
            base,
            mem: RefCell::new(vec![0u8; 1 << 16]),
        };
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        // sendmsg with one iovec, then recvmsg into two.
        mem.write(base + 100, b"0123456789").unwrap();
        let put_iov = |at: u64, parts: &[(u64, u64)]| {
            let mut v = Vec::new();
            for &(p, l) in parts {
                v.extend_from_slice(&(base + p).to_le_bytes());
                v.extend_from_slice(&l.to_le_bytes());
            }
            mem.write(base + at, &v).unwrap();
        };
        put_iov(200, &[(100, 10)]);
        let mut hdr = vec![0u8; 56];
        hdr[16..24].copy_from_slice(&(base + 200).to_le_bytes());
        hdr[24..32].copy_from_slice(&1u64.to_le_bytes());
        mem.write(base + 300, &hdr).unwrap();
        assert_eq!(
            forward(
                libc::SYS_sendmsg,
                [a.as_raw_fd() as u64, base + 300, 0, 0, 0, 0],
                &mem
            ),
            10
        );
        put_iov(400, &[(1000, 4), (2000, 100)]);
        let mut hdr = vec![0u8; 56];
        hdr[16..24].copy_from_slice(&(base + 400).to_le_bytes());
        hdr[24..32].copy_from_slice(&2u64.to_le_bytes());
        mem.write(base + 500, &hdr).unwrap();
        assert_eq!(
            forward(
                libc::SYS_recvmsg,
                [b.as_raw_fd() as u64, base + 500, 0, 0, 0, 0],
                &mem
            ),
            10
        );
        assert_eq!(&mem.mem.borrow()[1000..1004], b"0123");
        assert_eq!(&mem.mem.borrow()[2000..2006], b"456789");
        // getsockname with a socklen_t: the length comes back too.
        mem.write(base + 3000, &110u32.to_le_bytes()).unwrap();
        assert_eq!(
            forward(
                libc::SYS_getsockname,
                [a.as_raw_fd() as u64, base + 3100, base + 3000, 0, 0, 0],
                &mem
            ),
            0
        );
        let len = u32::from_le_bytes(mem.mem.borrow()[3000..3004].try_into().unwrap());
        assert_eq!(
            len, 2,
            "an unnamed unix socket's address is its family alone"
        );
    }

    #[test]
    fn a_deputys_own_descriptors_are_never_touched() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd() as u64;
        let private = move |x: u64| x == fd;
        let call = Call {
            seq: 1,
            tid: 1,
            nr: libc::SYS_close,
            args: [fd, 0, 0, 0, 0, 0],
            bufs: vec![Buf::None; 6],
            took: vec![],
        };
        assert_eq!(execute(&call, &private).ret, -(libc::EBADF as i64));
        let cr = Call {
            nr: libc::SYS_close_range,
            args: [fd, fd, 0, 0, 0, 0],
            ..call.clone()
        };
        assert_eq!(execute(&cr, &private).ret, 0);
        // Still open.
        // SAFETY: F_GETFD on a descriptor we own; no memory involved.
        assert!(unsafe { libc::fcntl(fd as i32, libc::F_GETFD) } >= 0);
    }

    #[test]
    fn a_malformed_call_is_refused_not_made() {
        let call = Call {
            seq: 1,
            tid: 1,
            nr: libc::SYS_write,
            args: [1, 0, 5, 0, 0, 0],
            bufs: vec![
                Buf::None,
                Buf::Out(5),
                Buf::None,
                Buf::None,
                Buf::None,
                Buf::None,
            ],
            took: vec![],
        };
        assert_eq!(execute(&call, &none).ret, -(libc::EINVAL as i64));
        let fork = Call {
            nr: libc::SYS_fork,
            ..call
        };
        assert_eq!(execute(&fork, &none).ret, -(libc::ENOSYS as i64));
    }
}
