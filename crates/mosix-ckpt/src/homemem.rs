//! Home memory: memory a process shares with other processes of its home node (the
//! MAP_SHARED memory of a parent and its children, the semaphores of Python's
//! multiprocessing, a file that several processes map shared). It cannot be in two
//! places at once, so it never leaves home: when the process moves, the object stays
//! there, held open by its deputy, and the process has in its place an area of the same
//! size and protection that it cannot touch away: the first touch brings it home (its
//! supervisor's userfaultfd sees it, [`touched`]), where the area is mapped again from the
//! deputy's descriptor. Its contents are never copied, so they are never stale.
//!
//! What stays home is decided when the process leaves home ([`areas`]): a shared mapping
//! of an object that another process also maps or holds open. Memory shared with nobody
//! moves with the process as before (memfds and MAP_SHARED anonymous memory in the image).
//! Away, each area is a mapping of an empty memfd named [`NAME`]`:DEV:INO:BASE` (the
//! object, and the address its offset 0 would have), so a host that moves the process on
//! knows them (this kernel has no names for anonymous memory).

use crate::error::{sys_err, Error, Result};
use crate::procfs::{self, MapLine};
use std::collections::HashSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// The name of a home memory area's stand-in on a host (`/memfd:mosix-home-mem:...`).
pub const NAME: &str = "mosix-home-mem";

/// The variable in the deputy's environment that lists its descriptors of the process's
/// home memory objects (comma-separated numbers), which it keeps open.
pub const HOLD_ENV: &str = "MOSIX_HOME_MEMORY";

/// The deputy's descriptors of a process's home memory objects: (dev, ino) -> number.
pub type Held = std::collections::HashMap<(u64, u64), i32>;

/// The descriptors of `pid` (a deputy) that hold objects of `wanted`, the process's own
/// descriptors (`own`) last (a descriptor the deputy holds for it is closed once the
/// process runs again; one of the process's own stays).
pub(crate) fn held_by(pid: i32, wanted: &HashSet<(u64, u64)>, own: &[i32]) -> Held {
    let mut held = Held::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return held;
    };
    let mut found: Vec<(i32, u64, u64)> = fds
        .flatten()
        .filter_map(|f| {
            let n = f.file_name().to_string_lossy().parse::<i32>().ok()?;
            let md = std::fs::metadata(f.path()).ok()?;
            wanted
                .contains(&(md.dev(), md.ino()))
                .then_some((n, md.dev(), md.ino()))
        })
        .collect();
    found.sort_by_key(|(n, ..)| own.contains(n));
    for (n, d, i) in found {
        held.entry((d, i)).or_insert(n);
    }
    held
}

/// An area of a process's memory that stays at home: object (`dev`, `ino`) mapped from
/// `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Area {
    pub start: u64,
    pub end: u64,
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
    /// The inode of what is mapped there on this node: the object at home, the stand-in
    /// away.
    pub here_ino: u64,
    /// Mapped writable.
    pub writable: bool,
}

impl Area {
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }
}

/// The name of the stand-in of object (`dev`, `ino`) whose offset 0 would be at `base`.
pub(crate) fn placeholder_name(dev: u64, ino: u64, base: u64) -> String {
    format!("{NAME}:{dev:x}:{ino:x}:{base:x}")
}

/// The area a stand-in mapping holds the place of (its offset from its name, so an area
/// split or trimmed by the process is still right).
fn from_placeholder(m: &MapLine) -> Option<Area> {
    let rest = m
        .name
        .strip_prefix("/memfd:")?
        .strip_suffix(" (deleted)")?
        .strip_prefix(NAME)?
        .strip_prefix(':')?;
    let mut it = rest.split(':').map(|x| u64::from_str_radix(x, 16));
    let (dev, ino, base) = (it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?);
    Some(Area {
        start: m.start,
        end: m.end,
        dev,
        ino,
        offset: m.start.wrapping_sub(base),
        here_ino: m.inode,
        writable: m.write,
    })
}

fn map_file(pid: i32, m: &MapLine) -> String {
    format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)
}

/// Whether shared mapping `m` is of memory another process could see: shared memory
/// (memfd, MAP_SHARED anonymous, tmpfs), or a file mapped writable or deleted. (A file
/// mapped shared read-only is mapped again from the same path where the process goes.)
fn shareable(pid: i32, m: &MapLine) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    if !m.shared || m.inode == 0 || m.is_special() {
        return false;
    }
    if crate::shmem::is_shmem(&m.name) || m.write || m.name.ends_with(" (deleted)") {
        return true;
    }
    nix::sys::statfs::statfs(map_file(pid, m).as_str())
        .map(|s| s.filesystem_type().0 == TMPFS_MAGIC)
        .unwrap_or(false)
}

/// The areas of `pid`'s memory (`maps`) that stay at home when it moves: away from home
/// (`away`), its stand-ins; at home, its shared mappings of objects another process also
/// maps or holds open.
pub fn areas(pid: i32, maps: &[MapLine], away: bool) -> Vec<Area> {
    if away {
        return maps.iter().filter_map(from_placeholder).collect();
    }
    let mut cands = Vec::new();
    for m in maps.iter().filter(|m| shareable(pid, m)) {
        if let Ok(md) = std::fs::metadata(map_file(pid, m)) {
            cands.push(Area {
                start: m.start,
                end: m.end,
                dev: md.dev(),
                ino: md.ino(),
                offset: m.offset,
                here_ino: md.ino(),
                writable: m.write,
            });
        }
    }
    if cands.is_empty() {
        return cands;
    }
    let objs: HashSet<(u64, u64)> = cands.iter().map(|a| (a.dev, a.ino)).collect();
    let shared = shared_with_others(pid, &objs);
    cands.retain(|a| shared.contains(&(a.dev, a.ino)));
    cands
}

/// Which of `objs` (dev, ino) another process than `pid` (and its threads) maps or holds
/// open.
fn shared_with_others(pid: i32, objs: &HashSet<(u64, u64)>) -> HashSet<(u64, u64)> {
    let mut found = HashSet::new();
    let threads: HashSet<i32> = procfs::tasks(pid).unwrap_or_default().into_iter().collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        if found.len() == objs.len() {
            break;
        }
        let Ok(other) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if other == pid || threads.contains(&other) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{other}/maps")) {
            for m in procfs::parse_maps(&text) {
                if objs.contains(&(m.dev, m.inode)) {
                    found.insert((m.dev, m.inode));
                }
            }
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{other}/fd")) else {
            continue;
        };
        for f in fds.flatten() {
            if let Ok(md) = std::fs::metadata(f.path()) {
                if objs.contains(&(md.dev(), md.ino())) {
                    found.insert((md.dev(), md.ino()));
                }
            }
        }
    }
    found
}

/// A thread of `pid` waiting in a system call with an argument inside one of `areas`
/// (a futex of a semaphore shared at home): restarted away, the call would touch memory
/// that is not there, and fail. Such a process does not leave.
pub fn waiting_on(pid: i32, areas: &[Area]) -> Option<String> {
    if areas.is_empty() {
        return None;
    }
    for tid in procfs::tasks(pid).ok()? {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")) else {
            continue;
        };
        let mut it = s.split_whitespace();
        let Some(nr) = it.next().and_then(|n| n.parse::<i64>().ok()) else {
            continue;
        };
        if nr < 0 {
            continue;
        }
        for a in it.take(6) {
            let Ok(v) = u64::from_str_radix(a.trim_start_matches("0x"), 16) else {
                continue;
            };
            if areas.iter().any(|r| r.contains(v)) {
                return Some(format!(
                    "a thread of it waits in a system call ({nr}) on memory it shares with other processes here"
                ));
            }
        }
    }
    None
}

/// Opens each object of `areas` once (through /proc/PID/map_files, which needs
/// CAP_CHECKPOINT_RESTORE or root): (dev, ino, descriptor). Read-write only if the process
/// maps it writable: the descriptor goes to its deputy, which runs as its user, and must
/// not give that user more than the mappings did.
pub(crate) fn open_objects(pid: i32, areas: &[Area]) -> Result<Vec<(u64, u64, std::fs::File)>> {
    let mut out: Vec<(u64, u64, std::fs::File)> = Vec::new();
    for a in areas {
        if out.iter().any(|(d, i, _)| (*d, *i) == (a.dev, a.ino)) {
            continue;
        }
        let writable = areas
            .iter()
            .any(|b| (b.dev, b.ino) == (a.dev, a.ino) && b.writable);
        let path = format!("/proc/{pid}/map_files/{:x}-{:x}", a.start, a.end);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| sys_err(format!("opening the shared memory at {:#x}", a.start), e))?;
        let md = f
            .metadata()
            .map_err(|e| sys_err("examining shared memory", e))?;
        if (md.dev(), md.ino()) != (a.dev, a.ino) {
            return Err(Error::Target {
                pid,
                msg: format!("its shared memory at {:#x} changed", a.start),
            });
        }
        out.push((a.dev, a.ino, f));
    }
    Ok(out)
}

const UFFD_API: u64 = 0xaa;
/// _IOWR(0xaa, 0x3f, struct uffdio_api)
const UFFDIO_API: u64 = 0xc018_aa3f;
/// _IOWR(0xaa, 0x00, struct uffdio_register)
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// Sets up userfaultfd `uffd` (made inside the process) and registers `ranges` of the
/// process's memory with it: a touch of one of them waits until the process is moved.
pub(crate) fn register(uffd: &OwnedFd, ranges: &[(u64, u64)]) -> Result<()> {
    let mut api = [UFFD_API, 0u64, 0u64];
    // SAFETY: UFFDIO_API reads and writes the struct uffdio_api (3 u64) we pass.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, api.as_mut_ptr()) } < 0 {
        return Err(sys_err("userfaultfd API", std::io::Error::last_os_error()));
    }
    for &(start, end) in ranges {
        let mut reg = [start, end - start, UFFDIO_REGISTER_MODE_MISSING, 0u64];
        // SAFETY: UFFDIO_REGISTER reads and writes the struct uffdio_register (4 u64).
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, reg.as_mut_ptr()) } < 0 {
            return Err(sys_err(
                format!("watching the shared memory at {start:#x}"),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// The addresses of home memory the process touched (faults waiting on `uffd`, read
/// without blocking; the faulting threads wait until the process is moved).
pub fn touched(uffd: &OwnedFd) -> Vec<u64> {
    let mut out = Vec::new();
    let mut msg = [0u8; 32];
    loop {
        // SAFETY: read into our 32-byte buffer: one struct uffd_msg.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n != msg.len() as isize {
            return out;
        }
        if msg[0] == UFFD_EVENT_PAGEFAULT {
            out.push(u64::from_le_bytes(msg[16..24].try_into().expect("8")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stand_in_names_its_object_and_its_offset_survives_a_split() {
        let name = placeholder_name(0x1a, 0x77, 0x7f00_0000_0000);
        let m = |start, end| MapLine {
            start,
            end,
            read: true,
            write: true,
            exec: false,
            shared: false,
            offset: 0,
            dev: 1,
            inode: 99,
            name: format!("/memfd:{name} (deleted)"),
        };
        let a = from_placeholder(&m(0x7f00_0000_2000, 0x7f00_0000_3000)).unwrap();
        assert_eq!((a.dev, a.ino, a.offset), (0x1a, 0x77, 0x2000));
        assert!(a.contains(0x7f00_0000_2fff) && !a.contains(0x7f00_0000_3000));
        assert_eq!(a.here_ino, 99);
        let mut other = m(0, 0x1000);
        other.name = "/memfd:other (deleted)".into();
        assert!(from_placeholder(&other).is_none());
        assert!(
            name.len() < 249,
            "memfd_create takes names of at most 249 bytes"
        );
    }

    #[test]
    fn memory_shared_with_a_child_stays_home_and_unshared_memory_does_not() {
        // SAFETY: plain anonymous mappings of our own, one shared, one private.
        let (shared, private) = unsafe {
            let s = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            (s as u64, p as u64)
        };
        // A child that maps the first (it inherits both; it unmaps the second).
        let (r, w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only calls async-signal-safe functions, then _exit.
        let child = match unsafe { nix::unistd::fork() }.unwrap() {
            // SAFETY: munmap of our own mapping, write to our pipe, pause and _exit.
            nix::unistd::ForkResult::Child => unsafe {
                libc::munmap(private as *mut libc::c_void, 4096);
                libc::write(w.as_raw_fd(), b"x".as_ptr().cast(), 1);
                libc::pause();
                libc::_exit(0);
            },
            nix::unistd::ForkResult::Parent { child } => child,
        };
        let mut b = [0u8; 1];
        nix::unistd::read(&r, &mut b).unwrap();
        let me = std::process::id() as i32;
        let maps = procfs::maps(me).unwrap();
        let home = areas(me, &maps, false);
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(child, None);
        if !nix::unistd::geteuid().is_root() {
            // /proc/PID/map_files needs root: nothing found, nothing stays.
            return;
        }
        assert!(home.iter().any(|a| a.start == shared), "{home:?}");
        assert!(!home.iter().any(|a| a.start == private), "{home:?}");
    }
}
