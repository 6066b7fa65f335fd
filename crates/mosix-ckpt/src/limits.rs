//! How much memory reading an image may take here: the memory available, under every
//! cgroup limit above us.

/// How much memory reading an image may take. Decompression is bounded by the size the
/// image declares (its metadata record, and the memory contents its `memory_estimate`
/// says follow); an image that declares more than `max_memory` bytes is refused before
/// any of it is decompressed, with one line that says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    /// The most bytes the decompressed body (or an image read from a stream) may take.
    pub max_memory: u64,
}

impl ReadLimits {
    /// The memory this process can have now: the smaller of the system's MemAvailable and
    /// the room left under the memory limits (cgroup v2 `memory.max`) of its cgroup and
    /// every cgroup above it. Unknown limits count as none.
    pub fn system() -> ReadLimits {
        ReadLimits {
            max_memory: mem_available().min(cgroup_headroom()),
        }
    }
    /// At most `max_memory` bytes.
    pub fn bytes(max_memory: u64) -> ReadLimits {
        ReadLimits { max_memory }
    }
}

/// MemAvailable from /proc/meminfo (u64::MAX if unknown).
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb.saturating_mul(1024))
}

/// The memory this process (or a process started beside it, in its cgroups) can have
/// now: the smaller of the system's MemAvailable and the room under the memory limits of
/// its cgroups and every cgroup above them, cgroup v2 and v1 alike. Reclaimable page
/// cache (inactive file pages) counts as room, as the kernel drops it before it kills.
pub fn memory_room() -> u64 {
    mem_available().min(cgroup_headroom())
}

/// The least room (limit less usage, less inactive file cache) in this process's memory
/// cgroups (v2 `memory.max`/`memory.current`, v1 `memory.limit_in_bytes`/
/// `memory.usage_in_bytes`) and their ancestors (u64::MAX where there is no limit or it
/// cannot be read).
fn cgroup_headroom() -> u64 {
    let (Ok(cg), Ok(mi)) = (
        std::fs::read_to_string("/proc/self/cgroup"),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return u64::MAX;
    };
    let read = |p: &std::path::Path, f: &str| -> Option<u64> {
        std::fs::read_to_string(p.join(f)).ok()?.trim().parse().ok()
    };
    let inactive = |p: &std::path::Path, key: &str| -> u64 {
        std::fs::read_to_string(p.join("memory.stat"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let mut room = u64::MAX;
    for line in cg.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let v2 = ctrls.is_empty();
        if !v2 && !ctrls.split(',').any(|c| c == "memory") {
            continue;
        }
        // Where that hierarchy is mounted (mountinfo: root, mount point, ..., fstype, opts).
        let mount = mi.lines().find_map(|m| {
            let f: Vec<&str> = m.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-")?;
            let (fstype, opts) = (*f.get(dash + 1)?, *f.get(dash + 3)?);
            let ok = if v2 {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && opts.split(',').any(|o| o == "memory")
            };
            ok.then(|| (f[3].to_string(), f[4].to_string()))
        });
        let Some((root, point)) = mount else { continue };
        let rel = if root == "/" {
            path
        } else {
            match path.strip_prefix(root.as_str()) {
                Some(r) => r,
                None => continue,
            }
        };
        let top = std::path::PathBuf::from(&point);
        let mut dir = top.join(rel.trim_start_matches('/'));
        let (lim, cur, key) = if v2 {
            ("memory.max", "memory.current", "inactive_file")
        } else {
            (
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        };
        loop {
            if let (Some(max), Some(used)) = (read(&dir, lim), read(&dir, cur)) {
                let used = used.saturating_sub(inactive(&dir, key));
                room = room.min(max.saturating_sub(used));
            }
            if dir == top || !dir.pop() {
                break;
            }
        }
    }
    room
}
