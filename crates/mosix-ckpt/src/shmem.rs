//! Shared memory that lives inside one process: memfd files (memfd_create) and
//! MAP_SHARED anonymous memory (which the kernel backs by a hidden file, shown as
//! "/dev/zero (deleted)"). Each such object is saved once (size, name, seals, the pages
//! that hold data) and made again on restore as a memfd that every mapping and
//! descriptor of it shares. Objects that another process also has are refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use crate::error::{sys_err, Result};
use crate::image::{ImageWriter, ShmemObject};
use crate::procfs::{self, MapLine};
use crate::restore::{Builder, AT_STR};
use crate::sys::PAGE;

const DEVZERO: &str = "/dev/zero (deleted)";

/// Whether a mapping or descriptor target names a shared memory object.
pub fn is_shmem(name: &str) -> bool {
    name == DEVZERO || memfd_name(name).is_some()
}

/// The NAME of "/memfd:NAME (deleted)".
/// The name of the memfd that stands for a descriptor of home on a process's host
/// (mosix-remote's placeholders, and the ones a restore away makes).
pub const PLACEHOLDER: &str = "mosix-home-fd";

fn memfd_name(name: &str) -> Option<&str> {
    name.strip_prefix("/memfd:")?.strip_suffix(" (deleted)")
}

/// Where `pid`'s shared memory objects can be opened: inode -> (path under /proc, name
/// as /proc shows it).
pub fn objects_of(pid: i32, maps: &[MapLine]) -> Result<BTreeMap<u64, (String, String)>> {
    let mut out = BTreeMap::new();
    for m in maps.iter().filter(|m| is_shmem(&m.name)) {
        out.entry(m.inode).or_insert_with(|| {
            (
                format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end),
                m.name.clone(),
            )
        });
    }
    for f in procfs::fds(pid)? {
        if memfd_name(&f.target).is_some() {
            let path = format!("/proc/{pid}/fd/{}", f.fd);
            if let Ok(md) = std::fs::metadata(&path) {
                out.entry(md.ino()).or_insert((path, f.target.clone()));
            }
        }
    }
    Ok(out)
}

/// The inode of descriptor `fd` of `pid`.
pub fn fd_inode(pid: i32, fd: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|m| m.ino())
}

/// The name of a private mapping (MAP_PRIVATE) of shared memory (a memfd, /dev/zero's
/// object) among `maps`, if there is one: the pages a process copies on write there are
/// not staged memory, so pre-copy rounds do not save them (see
/// [`crate::track_moving`]).
pub fn private_mapping(maps: &[MapLine]) -> Option<&str> {
    maps.iter()
        .find(|m| !m.shared && is_shmem(&m.name))
        .map(|m| m.name.as_str())
}

/// Why the pages a process wrote into its private mapping of shared memory `name` stop
/// a checkpoint of it while it runs.
pub fn private_copies_reason(name: &str) -> String {
    format!(
        "it wrote into a private mapping of its shared memory {name} (pages copied on write are not saved while it runs)"
    )
}

/// Why `pid`'s shared memory cannot move: another process maps it or holds it open.
/// Objects whose inode is in `stays` stay at home (crate::homemem) and do not refuse.
pub fn refusals(pid: i32, maps: &[MapLine], stays: &HashSet<u64>, why: &mut Vec<String>) {
    let Ok(mut objs) = objects_of(pid, maps) else {
        return;
    };
    objs.retain(|ino, _| !stays.contains(ino));
    // The placeholders of a process away from home (its descriptors of home objects) are
    // one memfd its supervisor also holds: nothing in them moves, so nothing is shared.
    objs.retain(|_, (_, name)| memfd_name(name) != Some(PLACEHOLDER));
    if objs.is_empty() {
        return;
    }
    let dev = objs
        .values()
        .find_map(|(p, _)| std::fs::metadata(p).ok().map(|m| m.dev()));
    let inodes: HashSet<u64> = objs.keys().copied().collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let threads: HashSet<i32> = procfs::tasks(pid).unwrap_or_default().into_iter().collect();
    for e in dir.flatten() {
        let Ok(other) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if other == pid || threads.contains(&other) {
            continue;
        }
        let mut shared_with = |name: &str| {
            let r = format!("its shared memory {name} is shared with process {other}");
            if !why.contains(&r) {
                why.push(r);
            }
        };
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{other}/maps")) {
            for m in procfs::parse_maps(&text) {
                if is_shmem(&m.name) && inodes.contains(&m.inode) {
                    shared_with(&m.name);
                }
            }
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{other}/fd")) else {
            continue;
        };
        for f in fds.flatten() {
            let Ok(t) = std::fs::read_link(f.path()) else {
                continue;
            };
            let t = t.to_string_lossy();
            if memfd_name(&t).is_none() {
                continue;
            }
            if let Ok(md) = std::fs::metadata(f.path()) {
                if Some(md.dev()) == dev && inodes.contains(&md.ino()) {
                    shared_with(&t);
                }
            }
        }
    }
}

/// Describes each object (opened through /proc as the checkpointer) and the runs of its
/// pages that hold data: (objects, runs of (inode, offset, length)).
#[allow(clippy::type_complexity)]
pub fn describe(
    objs: &BTreeMap<u64, (String, String)>,
) -> Result<(Vec<ShmemObject>, Vec<(u64, u64, u64)>)> {
    let mut out = Vec::new();
    let mut runs = Vec::new();
    for (&ino, (path, name)) in objs {
        let f = std::fs::File::open(path).map_err(|e| sys_err(format!("opening {name}"), e))?;
        let size = f
            .metadata()
            .map_err(|e| sys_err(format!("examining {name}"), e))?
            .len();
        out.push(ShmemObject {
            ino,
            name: memfd_name(name).map(str::to_string),
            size,
            seals: crate::sys::memfd_seals(f.as_raw_fd()),
        });
        // Runs of data (holes, pages never written, are left out).
        let mut at = 0u64;
        while at < size {
            let Some(data) = crate::sys::seek_data(f.as_raw_fd(), at, false) else {
                break;
            };
            let end = crate::sys::seek_data(f.as_raw_fd(), data, true)
                .unwrap_or(size)
                .min(size);
            let start = data & !(PAGE - 1);
            let end = end.div_ceil(PAGE) * PAGE;
            if end > start {
                runs.push((ino, start, end - start));
            }
            at = end;
        }
    }
    Ok((out, runs))
}

/// Writes the objects' data runs to the image, leaving out all-zero pages; returns the
/// bytes written.
pub fn write_contents<W: std::io::Write + 'static>(
    objs: &BTreeMap<u64, (String, String)>,
    runs: &[(u64, u64, u64)],
    w: &mut ImageWriter<W>,
) -> Result<u64> {
    let mut written = 0u64;
    let mut buf = vec![0u8; crate::image::PAGES_RECORD_MAX];
    for &(ino, start, len) in runs {
        let (path, name) = &objs[&ino];
        let f = std::fs::File::open(path).map_err(|e| sys_err(format!("opening {name}"), e))?;
        let mut off = start;
        while off < start + len {
            let n = ((start + len - off) as usize).min(buf.len());
            let chunk = &mut buf[..n];
            let got = f
                .read_at(chunk, off)
                .map_err(|e| sys_err(format!("reading {name}"), e))?;
            chunk[got..].fill(0);
            let mut i = 0usize;
            let pages = n / PAGE as usize;
            let pg = |c: &[u8], k: usize| {
                c[k * PAGE as usize..(k + 1) * PAGE as usize]
                    .iter()
                    .all(|&b| b == 0)
            };
            while i < pages {
                if pg(chunk, i) {
                    i += 1;
                    continue;
                }
                let s = i;
                while i < pages && !pg(chunk, i) {
                    i += 1;
                }
                let bytes = &chunk[s * PAGE as usize..i * PAGE as usize];
                w.shmem_pages(ino, off + s as u64 * PAGE, bytes)?;
                written += bytes.len() as u64;
            }
            off += n as u64;
        }
    }
    Ok(written)
}

/// Restore: the process's memfds and MAP_SHARED anonymous memory, made again as memfds
/// (above every descriptor number of the image); returns a descriptor of ours for each
/// (by image inode), to write its data through.
pub(crate) fn make(b: &mut Builder) -> Result<HashMap<u64, std::fs::File>> {
    let objs = &b.img.shmem;
    let mut files = HashMap::new();
    if objs.is_empty() {
        return Ok(files);
    }
    let above = b.above_fds();
    for o in objs {
        let name = b.put_str(AT_STR, o.name.as_deref().unwrap_or("mosix-shared"))?;
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        let fd = b.call(
            "memfd_create",
            libc::SYS_memfd_create,
            &[name, flags as u64],
        )?;
        let hi = b.fd_above(fd, above)?;
        b.call("ftruncate", libc::SYS_ftruncate, &[hi, o.size])?;
        b.shm.insert(o.ino, hi);
        // Its data is written from here, through the process's descriptor.
        let path = format!("/proc/{}/fd/{hi}", b.pid);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| sys_err("opening a restored memfd", e))?;
        files.insert(o.ino, f);
    }
    Ok(files)
}

/// Seals the memfds as they were, and closes the descriptors the restore used.
pub(crate) fn seal(b: &mut Builder) -> Result<()> {
    let img = b.img;
    for o in &img.shmem {
        let fd = b.shm[&o.ino];
        if o.seals != 0 {
            b.call(
                "fcntl(F_ADD_SEALS)",
                libc::SYS_fcntl,
                &[fd, libc::F_ADD_SEALS as u64, o.seals as u64],
            )?;
        }
        b.call("close", libc::SYS_close, &[fd])?;
    }
    Ok(())
}
