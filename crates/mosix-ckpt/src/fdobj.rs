//! Descriptors of kernel objects that live inside the process, so they can move with it:
//! epoll instances watching the process's own descriptors, eventfds, and pipes whose
//! both ends the process holds (and no other process), with the bytes they hold. (The
//! Go runtime's network poller is an epoll instance and a pipe of this kind.) Dumped from
//! /proc/PID/fdinfo, made again on restore by system calls of the process.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::error::{sys_err, Error, Result};
use crate::image::{EpollWatch, Fd, FdKind};
use crate::procfs::FdInfo;
use crate::restore::{Builder, AT_MISC};
use crate::sys;

fn fdinfo(pid: i32, fd: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default()
}

/// The value after `key` (a field of an fdinfo line), in base `radix`.
fn field(line: &str, key: &str, radix: u32) -> Option<u64> {
    let at = line.find(key)? + key.len();
    let v = line[at..].split_whitespace().next()?;
    u64::from_str_radix(v, radix).ok()
}

fn pipe_id(target: &str) -> Option<u64> {
    target
        .strip_prefix("pipe:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// How descriptor `f` of `pid` comes back if it is one of these objects: None if it is
/// not; Err with the reason if it is but cannot move.
pub fn kind_of(
    pid: i32,
    f: &FdInfo,
    all: &[FdInfo],
) -> Option<std::result::Result<FdKind, String>> {
    let t = f.target.as_str();
    let flags = f.flags & libc::O_NONBLOCK;
    if t == "anon_inode:[eventpoll]" {
        return Some(epoll(pid, f, all));
    }
    if t == "anon_inode:[eventfd]" {
        let info = fdinfo(pid, f.fd);
        let count = info.lines().find_map(|l| field(l, "eventfd-count:", 16));
        let semaphore = info
            .lines()
            .find_map(|l| field(l, "eventfd-semaphore:", 10))
            .unwrap_or(0);
        return Some(match count {
            Some(count) => Ok(FdKind::EventFd {
                count,
                semaphore: semaphore == 1,
                flags,
            }),
            None => Err(format!(
                "fd {} is an eventfd this kernel does not describe",
                f.fd
            )),
        });
    }
    let id = pipe_id(t)?;
    if (0..=2).contains(&f.fd) {
        return None;
    }
    let ends: HashSet<bool> = all
        .iter()
        .filter(|o| pipe_id(&o.target) == Some(id))
        .map(|o| o.flags & libc::O_ACCMODE == libc::O_WRONLY)
        .collect();
    if ends.len() < 2 {
        return Some(Err(format!("fd {} is a pipe", f.fd)));
    }
    Some(Ok(FdKind::Pipe {
        pipe: id,
        write: f.flags & libc::O_ACCMODE == libc::O_WRONLY,
        flags,
        size: 0,
        data: Vec::new(),
    }))
}

fn epoll(pid: i32, f: &FdInfo, all: &[FdInfo]) -> std::result::Result<FdKind, String> {
    let mut watches = Vec::new();
    for l in fdinfo(pid, f.fd).lines().filter(|l| l.starts_with("tfd:")) {
        let (Some(tfd), Some(events), Some(data), Some(ino)) = (
            field(l, "tfd:", 10),
            field(l, "events:", 16),
            field(l, "data:", 16),
            field(l, "ino:", 16),
        ) else {
            return Err(format!(
                "fd {} is an epoll instance this kernel does not describe",
                f.fd
            ));
        };
        // It must watch the very file now at that number (a closed or replaced
        // descriptor leaves the old file watched, which cannot be made again).
        let same = all.iter().any(|o| {
            o.fd == tfd as i32
                && std::fs::metadata(format!("/proc/{pid}/fd/{tfd}"))
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino)
                    .unwrap_or(false)
        });
        if !same {
            return Err(format!(
                "fd {} (epoll) watches a file that is no longer its fd {tfd}",
                f.fd
            ));
        }
        watches.push(EpollWatch {
            fd: tfd as i32,
            events: events as u32,
            data,
        });
    }
    Ok(FdKind::Epoll { watches })
}

/// Why `pid`'s pipes cannot move: another process holds an end of one.
pub fn refusals(pid: i32, fds: &[FdInfo], why: &mut Vec<String>) {
    let ours: HashSet<String> = fds
        .iter()
        .filter(|f| f.fd > 2 && pipe_id(&f.target).is_some())
        .map(|f| f.target.clone())
        .collect();
    if ours.is_empty() {
        return;
    }
    let threads: HashSet<i32> = crate::procfs::tasks(pid)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Ok(other) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if other == pid || threads.contains(&other) {
            continue;
        }
        let Ok(list) = std::fs::read_dir(format!("/proc/{other}/fd")) else {
            continue;
        };
        for f in list.flatten() {
            let Ok(t) = std::fs::read_link(f.path()) else {
                continue;
            };
            let t = t.to_string_lossy().into_owned();
            if ours.contains(&t) {
                let r = format!("its {t} is shared with process {other}");
                if !why.contains(&r) {
                    why.push(r);
                }
            }
        }
    }
}

/// Fills in what the process's pipes hold (read without taking it: tee(2) into a pipe of
/// ours) and their sizes, on the first descriptor of each pipe.
pub fn fill_pipes(pid: i32, fds: &mut [Fd]) -> Result<()> {
    let mut seen = HashSet::new();
    for f in fds.iter_mut() {
        let FdKind::Pipe {
            pipe, size, data, ..
        } = &mut f.kind
        else {
            continue;
        };
        if !seen.insert(*pipe) {
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/{pid}/fd/{}", f.fd))
            .map_err(|e| sys_err("opening a pipe of the process", e))?;
        *size = sys::pipe_size(file.as_raw_fd()).map_err(|e| sys_err("F_GETPIPE_SZ", e))?;
        let n = sys::unread_bytes(file.as_raw_fd()).map_err(|e| sys_err("FIONREAD", e))?;
        if n > 0 {
            *data = sys::peek_pipe(file.as_raw_fd(), n, *size)
                .map_err(|e| sys_err("reading what a pipe holds", e))?;
        }
    }
    Ok(())
}

/// Restore, before the descriptors are put at their numbers: every pipe, eventfd and
/// epoll instance of the image made at a descriptor above all of the image's; returns
/// image fd -> that descriptor.
pub(crate) fn make(b: &mut Builder, fds: &[Fd]) -> Result<HashMap<i32, u64>> {
    let above = b.above_fds();
    let mut made = HashMap::new();
    let mut pipes: HashMap<u64, (u64, u64)> = HashMap::new();
    let high = |b: &mut Builder, fd: u64| b.fd_above(fd, above);
    for f in fds {
        let fd = match &f.kind {
            FdKind::Epoll { .. } => {
                let e = b.call("epoll_create1", libc::SYS_epoll_create1, &[0])?;
                high(b, e)?
            }
            FdKind::EventFd {
                count, semaphore, ..
            } => {
                let fl = if *semaphore { libc::EFD_SEMAPHORE } else { 0 };
                let first = (*count).min(u32::MAX as u64);
                let e = b.call("eventfd2", libc::SYS_eventfd2, &[first, fl as u64])?;
                let e = high(b, e)?;
                if *count > first {
                    // The rest by a write of the process (an eventfd cannot be opened
                    // through /proc).
                    let p = b.put(AT_MISC, &(count - first).to_ne_bytes())?;
                    b.call("write to an eventfd", libc::SYS_write, &[e, p, 8])?;
                }
                e
            }
            FdKind::Pipe {
                pipe,
                write,
                size,
                data,
                ..
            } => {
                let (r, w) = match pipes.get(pipe) {
                    Some(&p) => p,
                    None => {
                        b.call("pipe2", libc::SYS_pipe2, &[b.scratch + AT_MISC, 0])?;
                        let mut two = [0u8; 8];
                        sys::read_mem(b.pid, b.scratch + AT_MISC, &mut two)?;
                        let r = u32::from_le_bytes(two[..4].try_into().expect("4")) as u64;
                        let w = u32::from_le_bytes(two[4..].try_into().expect("4")) as u64;
                        let (r, w) = (high(b, r)?, high(b, w)?);
                        if *size > 0 {
                            // A size over the system's limit needs CAP_SYS_RESOURCE: keep
                            // the default then (only what it holds must fit).
                            let _ = b.r.raw(
                                libc::SYS_fcntl,
                                &[w, libc::F_SETPIPE_SZ as u64, *size as u64],
                            );
                        }
                        if !data.is_empty() {
                            write_via_proc(b.pid, w, data)?;
                        }
                        pipes.insert(*pipe, (r, w));
                        (r, w)
                    }
                };
                if *write {
                    w
                } else {
                    r
                }
            }
            _ => continue,
        };
        made.insert(f.fd, fd);
    }
    Ok(made)
}

/// Writes `data` into descriptor `fd` of `pid` (a pipe's write end), opened through /proc.
fn write_via_proc(pid: i32, fd: u64, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|e| sys_err("opening a restored pipe", e))?;
    f.write_all(data).map_err(|e| {
        if e.raw_os_error() == Some(libc::EAGAIN) {
            Error::Unrestorable(format!(
                "{} bytes do not fit the restored pipe (its size could not be raised)",
                data.len()
            ))
        } else {
            sys_err("filling a restored pipe", e)
        }
    })
}

/// Restore, once every descriptor is at its number: the epoll instances' watches, and the
/// descriptors `make` used closed.
pub(crate) fn finish(b: &mut Builder, fds: &[Fd], made: &HashMap<i32, u64>) -> Result<()> {
    for f in fds {
        if let FdKind::Epoll { watches } = &f.kind {
            for w in watches {
                // struct epoll_event is packed on x86_64: events u32, data u64.
                let mut ev = w.events.to_le_bytes().to_vec();
                ev.extend_from_slice(&w.data.to_le_bytes());
                let p = b.put(AT_MISC, &ev)?;
                b.call(
                    &format!("epoll_ctl of fd {} on fd {}", f.fd, w.fd),
                    libc::SYS_epoll_ctl,
                    &[f.fd as u64, libc::EPOLL_CTL_ADD as u64, w.fd as u64, p],
                )?;
            }
        }
    }
    let mut closed = HashSet::new();
    for &hi in made.values() {
        if closed.insert(hi) {
            b.call("close", libc::SYS_close, &[hi])?;
        }
    }
    Ok(())
}
