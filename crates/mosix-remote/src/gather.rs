//! Host side of a forwarded call: reading its memory arguments out of the process, and
//! writing what the call returned back into it.

use crate::spec::{Arg, Back as BackRule, Len, Spec, MAX_EVENTS, MAX_IO, MAX_IOV, MAX_PATH};
use crate::wire::{Back, Buf, Call};
use nix::errno::Errno;

/// Access to the memory of the process (process_vm_readv/writev on the host; a plain
/// buffer in tests).
pub trait Mem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno>;
    /// `len` bytes at `addr`, in a buffer of their own.
    fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }
    /// `len` bytes at `addr`, to keep and pass on (a write's data): where the memory
    /// puts them (its supervisor's arena, for a process on its host).
    fn read_bytes(&self, addr: u64, len: usize) -> Result<crate::wire::Bytes, Errno> {
        self.read_vec(addr, len).map(Into::into)
    }
}

/// The memory of process `pid`, through process_vm_readv/writev.
pub struct ProcessMem(pub i32);

impl ProcessMem {
    /// Reads `len` bytes at `addr` of the process into `local`, which has room for them
    /// (written or not): all of them, or EFAULT.
    pub(crate) fn read_into(&self, addr: u64, local: *mut u8, len: usize) -> Result<(), Errno> {
        let local = [libc::iovec {
            iov_base: local.cast(),
            iov_len: len,
        }];
        let remote = [libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        }];
        // SAFETY: `local` describes `len` bytes of room the caller owns for the whole
        // call; the kernel checks the remote range itself.
        let n = unsafe { libc::process_vm_readv(self.0, local.as_ptr(), 1, remote.as_ptr(), 1, 0) };
        if n == len as isize {
            Ok(())
        } else {
            Err(Errno::EFAULT)
        }
    }
}

impl Mem for ProcessMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if buf.is_empty() {
            return Ok(());
        }
        self.read_into(addr, buf.as_mut_ptr(), buf.len())
    }
    /// (Read into the buffer's room as it is: a large one is not zeroed first.)
    fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut v: Vec<u8> = Vec::with_capacity(len);
        self.read_into(addr, v.as_mut_ptr(), len)?;
        // SAFETY: the read wrote all `len` bytes.
        unsafe { v.set_len(len) };
        Ok(v)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        if data.is_empty() {
            return Ok(());
        }
        let local = [libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }];
        let remote = [libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: data.len(),
        }];
        // SAFETY: `local` describes `data`, which stays alive and is only read.
        let n =
            unsafe { libc::process_vm_writev(self.0, local.as_ptr(), 1, remote.as_ptr(), 1, 0) };
        if n == data.len() as isize {
            Ok(())
        } else {
            Err(Errno::EFAULT)
        }
    }
}

/// Reads a NUL-terminated string at `addr` (the NUL included), at most `max` bytes.
pub fn read_cstr(mem: &dyn Mem, addr: u64, max: usize) -> Result<Vec<u8>, Errno> {
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < max {
        // Up to the end of the page, so that a string just before an unmapped page reads.
        let room = (4096 - (at % 4096)) as usize;
        let n = room.min(max - out.len());
        let mut chunk = vec![0u8; n];
        mem.read(at, &mut chunk)?;
        if let Some(z) = chunk.iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..=z]);
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
        at += n as u64;
    }
    Err(Errno::ENAMETOOLONG)
}

fn read_u32(mem: &dyn Mem, addr: u64) -> Result<u32, Errno> {
    let mut b = [0u8; 4];
    mem.read(addr, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(mem: &dyn Mem, addr: u64) -> Result<u64, Errno> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// The byte length of a memory argument, bounded.
pub fn length(len: Len, args: &[u64; 6], mem: &dyn Mem) -> Result<u32, Errno> {
    Ok(match len {
        Len::Arg(i) => args[i as usize].min(MAX_IO as u64) as u32,
        Len::Fixed(n) => n,
        Len::At(i) => {
            let p = args[i as usize];
            if p == 0 {
                0
            } else {
                read_u32(mem, p)?.min(MAX_IO)
            }
        }
        Len::Times(i, n) => {
            let k = args[i as usize];
            if k > MAX_EVENTS {
                return Err(Errno::EINVAL);
            }
            (k as u32) * n
        }
        Len::Bits(i) => {
            let k = args[i as usize];
            if k > MAX_EVENTS {
                return Err(Errno::EINVAL);
            }
            (k.div_ceil(64) * 8) as u32
        }
    })
}

/// Where results go back in the process.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    places: Vec<Place>,
}

#[derive(Clone, Debug, Default)]
enum Place {
    #[default]
    None,
    At(u64, u32),
    Iov(Vec<(u64, u64)>),
    Msg {
        hdr: u64,
        name: (u64, u32),
        iov: Vec<(u64, u64)>,
        control: (u64, u64),
    },
}

/// Reads an iovec array of `n` entries at `addr`: (base, len) pairs, total bounded by
/// [`MAX_IO`] (later entries shortened or dropped: the call is a shorter one).
fn read_iov(mem: &dyn Mem, addr: u64, n: u64) -> Result<Vec<(u64, u64)>, Errno> {
    if n > MAX_IOV {
        return Err(Errno::EINVAL);
    }
    let mut raw = vec![0u8; n as usize * 16];
    mem.read(addr, &mut raw)?;
    let mut out = Vec::with_capacity(n as usize);
    let mut total = 0u64;
    for e in raw.chunks_exact(16) {
        let base = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
        let len = len.min(MAX_IO as u64 - total);
        total += len;
        out.push((base, len));
        if total == MAX_IO as u64 {
            break;
        }
    }
    Ok(out)
}

/// `n` bytes at `p`, or none when `p` is NULL.
fn read_opt(mem: &dyn Mem, p: u64, n: usize) -> Result<Vec<u8>, Errno> {
    let mut v = vec![0u8; if p == 0 { 0 } else { n }];
    if !v.is_empty() {
        mem.read(p, &mut v)?;
    }
    Ok(v)
}

fn read_iov_data(mem: &dyn Mem, iov: &[(u64, u64)]) -> Result<(Vec<u8>, Vec<u32>), Errno> {
    let mut data = Vec::new();
    let mut lens = Vec::with_capacity(iov.len());
    for &(base, len) in iov {
        let at = data.len();
        data.resize(at + len as usize, 0);
        if len > 0 {
            mem.read(base, &mut data[at..])?;
        }
        lens.push(len as u32);
    }
    Ok((data, lens))
}

/// Offsets in a `struct msghdr` (x86_64).
const MSG_NAME: u64 = 0;
const MSG_NAMELEN: u64 = 8;
const MSG_IOV: u64 = 16;
const MSG_IOVLEN: u64 = 24;
const MSG_CONTROL: u64 = 32;
const MSG_CONTROLLEN: u64 = 40;
const MSG_FLAGS: u64 = 48;

/// Reads the memory arguments of a trapped call: the call to send home, and where its
/// results go. An error is the errno the process gets instead (EFAULT, ENAMETOOLONG, ...).
pub fn gather(
    seq: u64,
    tid: i32,
    nr: i64,
    args: [u64; 6],
    spec: &Spec,
    mem: &dyn Mem,
) -> Result<(Call, Layout), Errno> {
    let mut bufs = Vec::with_capacity(6);
    let mut places = Vec::with_capacity(6);
    for (i, arg) in spec.args.iter().enumerate() {
        let p = args[i];
        let (b, place) = match *arg {
            Arg::V | Arg::Fd | Arg::Drop => (Buf::None, Place::None),
            _ if p == 0 => (Buf::None, Place::None),
            Arg::Path => (Buf::In(read_cstr(mem, p, MAX_PATH)?), Place::None),
            Arg::In(len) => {
                let n = length(len, &args, mem)?;
                let mut v = vec![0u8; n as usize];
                mem.read(p, &mut v)?;
                (Buf::In(v), Place::None)
            }
            Arg::Out(len, _) => {
                let n = length(len, &args, mem)?;
                (Buf::Out(n), Place::At(p, n))
            }
            Arg::InOut(len) => {
                let n = length(len, &args, mem)?;
                let mut v = vec![0u8; n as usize];
                mem.read(p, &mut v)?;
                (Buf::InOut(v), Place::At(p, n))
            }
            Arg::IovIn(k) => {
                let iov = read_iov(mem, p, args[k as usize])?;
                let (data, lens) = read_iov_data(mem, &iov)?;
                (Buf::IovIn { data, lens }, Place::None)
            }
            Arg::IovOut(k) => {
                let iov = read_iov(mem, p, args[k as usize])?;
                let lens = iov.iter().map(|&(_, l)| l as u32).collect();
                (Buf::IovOut { lens }, Place::Iov(iov))
            }
            Arg::MsgIn => {
                let name_p = read_u64(mem, p + MSG_NAME)?;
                let name_n = read_u32(mem, p + MSG_NAMELEN)?.min(4096);
                let iov = read_iov(
                    mem,
                    read_u64(mem, p + MSG_IOV)?,
                    read_u64(mem, p + MSG_IOVLEN)?,
                )?;
                let ctl_p = read_u64(mem, p + MSG_CONTROL)?;
                let ctl_n = read_u64(mem, p + MSG_CONTROLLEN)?.min(65536);
                let name = read_opt(mem, name_p, name_n as usize)?;
                let (data, lens) = read_iov_data(mem, &iov)?;
                let control = read_opt(mem, ctl_p, ctl_n as usize)?;
                (
                    Buf::MsgIn {
                        name,
                        data,
                        lens,
                        control,
                    },
                    Place::None,
                )
            }
            Arg::MsgOut => {
                let name_p = read_u64(mem, p + MSG_NAME)?;
                let name_n = if name_p == 0 {
                    0
                } else {
                    read_u32(mem, p + MSG_NAMELEN)?.min(4096)
                };
                let iov = read_iov(
                    mem,
                    read_u64(mem, p + MSG_IOV)?,
                    read_u64(mem, p + MSG_IOVLEN)?,
                )?;
                let ctl_p = read_u64(mem, p + MSG_CONTROL)?;
                let ctl_n = if ctl_p == 0 {
                    0
                } else {
                    read_u64(mem, p + MSG_CONTROLLEN)?.min(65536)
                };
                let lens = iov.iter().map(|&(_, l)| l as u32).collect();
                (
                    Buf::MsgOut {
                        name: name_n,
                        lens,
                        control: ctl_n as u32,
                    },
                    Place::Msg {
                        hdr: p,
                        name: (name_p, name_n),
                        iov,
                        control: (ctl_p, ctl_n),
                    },
                )
            }
        };
        bufs.push(b);
        places.push(place);
    }
    Ok((
        Call {
            seq,
            tid,
            nr,
            args,
            bufs,
            took: Vec::new(),
        },
        Layout { places },
    ))
}

fn scatter_iov(mem: &dyn Mem, iov: &[(u64, u64)], data: &[u8]) -> Result<(), Errno> {
    let mut at = 0usize;
    for &(base, len) in iov {
        if at >= data.len() {
            break;
        }
        let n = (len as usize).min(data.len() - at);
        mem.write(base, &data[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// Writes what a call returned into the process. The deputy's answer is not trusted to
/// fit: nothing is written past the room the process gave.
pub fn scatter(layout: &Layout, outs: &[Back], mem: &dyn Mem) -> Result<(), Errno> {
    for (place, back) in layout.places.iter().zip(outs) {
        match (place, back) {
            (Place::At(p, cap), Back::Bytes(b)) => {
                let n = b.len().min(*cap as usize);
                mem.write(*p, &b[..n])?;
            }
            (Place::Iov(iov), Back::Bytes(b)) => scatter_iov(mem, iov, b)?,
            (
                Place::Msg {
                    hdr,
                    name,
                    iov,
                    control,
                },
                Back::Msg {
                    name: nb,
                    data,
                    control: cb,
                    flags,
                },
            ) => {
                if name.0 != 0 {
                    let n = nb.len().min(name.1 as usize);
                    mem.write(name.0, &nb[..n])?;
                    mem.write(hdr + MSG_NAMELEN, &(nb.len() as u32).to_le_bytes())?;
                }
                scatter_iov(mem, iov, data)?;
                let cn = if control.0 != 0 {
                    let n = cb.len().min(control.1 as usize);
                    mem.write(control.0, &cb[..n])?;
                    n
                } else {
                    0
                };
                mem.write(hdr + MSG_CONTROLLEN, &(cn as u64).to_le_bytes())?;
                mem.write(hdr + MSG_FLAGS, &flags.to_le_bytes())?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The descriptors an SCM_RIGHTS control message carries (new ones at home, which the
/// host mirrors).
pub fn fds_in_control(control: &[u8]) -> Vec<i32> {
    let mut out = Vec::new();
    let mut at = 0usize;
    // struct cmsghdr { size_t len; int level; int type; } then data, aligned to 8.
    while at + 16 <= control.len() {
        let len = u64::from_le_bytes(control[at..at + 8].try_into().expect("8")) as usize;
        let level = i32::from_le_bytes(control[at + 8..at + 12].try_into().expect("4"));
        let kind = i32::from_le_bytes(control[at + 12..at + 16].try_into().expect("4"));
        if len < 16 || at + len > control.len() {
            break;
        }
        if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
            for c in control[at + 16..at + len].chunks_exact(4) {
                out.push(i32::from_le_bytes(c.try_into().expect("4")));
            }
        }
        at += len.div_ceil(8) * 8;
    }
    out
}

/// The two descriptors an int[2] argument received (pipe, socketpair).
pub fn fd_pair(outs: &[Back], at: u8) -> Option<[i32; 2]> {
    match outs.get(at as usize)? {
        Back::Bytes(b) if b.len() == 8 => Some([
            i32::from_le_bytes(b[..4].try_into().ok()?),
            i32::from_le_bytes(b[4..].try_into().ok()?),
        ]),
        _ => None,
    }
}

/// Output of an `Out` argument with rule `rule`, for tests and the deputy.
pub fn back_len(rule: BackRule, cap: u32, ret: i64) -> u32 {
    match rule {
        BackRule::All => cap,
        BackRule::Ret => (ret.max(0) as u64).min(cap as u64) as u32,
        BackRule::RetTimes(n) => (ret.max(0) as u64 * n as u64).min(cap as u64) as u32,
        BackRule::At(_) => cap,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Memory of a pretend process: one buffer at a base address.
    pub struct Fake {
        pub base: u64,
        pub mem: RefCell<Vec<u8>>,
    }
    impl Mem for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
            let m = self.mem.borrow();
            let off = addr.checked_sub(self.base).ok_or(Errno::EFAULT)? as usize;
            let end = off.checked_add(buf.len()).ok_or(Errno::EFAULT)?;
            buf.copy_from_slice(m.get(off..end).ok_or(Errno::EFAULT)?);
            Ok(())
        }
        fn write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
            let mut m = self.mem.borrow_mut();
            let off = addr.checked_sub(self.base).ok_or(Errno::EFAULT)? as usize;
            let end = off.checked_add(data.len()).ok_or(Errno::EFAULT)?;
            m.get_mut(off..end)
                .ok_or(Errno::EFAULT)?
                .copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn strings_stop_at_their_nul_and_at_the_limit() {
        let mut v = vec![b'a'; 9000];
        v[4100] = 0;
        let f = Fake {
            base: 0x10000,
            mem: RefCell::new(v),
        };
        assert_eq!(read_cstr(&f, 0x10000 + 4000, 4096).unwrap().len(), 101);
        assert_eq!(
            read_cstr(&f, 0x10000 + 4200, 4096),
            Err(Errno::ENAMETOOLONG)
        );
        assert_eq!(read_cstr(&f, 0x10000 + 8990, 4096), Err(Errno::EFAULT));
    }

    #[test]
    fn control_messages_yield_their_descriptors() {
        let mut c = Vec::new();
        c.extend_from_slice(&24u64.to_le_bytes());
        c.extend_from_slice(&libc::SOL_SOCKET.to_le_bytes());
        c.extend_from_slice(&libc::SCM_RIGHTS.to_le_bytes());
        c.extend_from_slice(&5i32.to_le_bytes());
        c.extend_from_slice(&9i32.to_le_bytes());
        assert_eq!(fds_in_control(&c), vec![5, 9]);
        assert!(fds_in_control(&c[..20]).is_empty());
        assert!(fds_in_control(&[0xff; 40]).is_empty());
    }
}
