//! Reading a process's state from /proc. No ptrace here: everything in this module can be
//! done without touching the process.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::error::{Error, Result};
use crate::image::FileId;

/// One line of /proc/PID/maps.
#[derive(Clone, Debug)]
pub struct MapLine {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    /// The device of the mapped object (as stat's st_dev), 0 for anonymous memory.
    pub dev: u64,
    pub inode: u64,
    /// Path or pseudo-name ("[heap]", "[stack]", "[vdso]", "[anon:x]"), empty if anonymous.
    pub name: String,
}

impl MapLine {
    pub fn prot(&self) -> i32 {
        (if self.read { libc::PROT_READ } else { 0 })
            | (if self.write { libc::PROT_WRITE } else { 0 })
            | (if self.exec { libc::PROT_EXEC } else { 0 })
    }
    pub fn is_special(&self) -> bool {
        matches!(self.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]")
    }
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.name.starts_with('/')
    }
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
}

fn read(pid: i32, what: &str) -> Result<String> {
    fs::read_to_string(format!("/proc/{pid}/{what}")).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NoProcess(pid)
        } else {
            crate::error::sys_err(format!("reading /proc/{pid}/{what}"), e)
        }
    })
}

pub fn parse_maps(text: &str) -> Vec<MapLine> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off), Some(dev), Some(ino)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let name = it.next().unwrap_or("").trim_start().to_string();
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset), Ok(inode)) = (
            u64::from_str_radix(s, 16),
            u64::from_str_radix(e, 16),
            u64::from_str_radix(off, 16),
            ino.parse::<u64>(),
        ) else {
            continue;
        };
        let p = perms.as_bytes();
        if p.len() < 4 {
            continue;
        }
        let dev = dev
            .split_once(':')
            .and_then(|(a, b)| {
                Some(libc::makedev(
                    u32::from_str_radix(a, 16).ok()?,
                    u32::from_str_radix(b, 16).ok()?,
                ))
            })
            .unwrap_or(0);
        out.push(MapLine {
            start,
            end,
            read: p[0] == b'r',
            write: p[1] == b'w',
            exec: p[2] == b'x',
            shared: p[3] == b's',
            offset,
            dev,
            inode,
            name,
        });
    }
    out
}

pub fn maps(pid: i32) -> Result<Vec<MapLine>> {
    Ok(parse_maps(&read(pid, "maps")?))
}

/// VmFlags of each mapping, by start address.
pub fn vm_flags(pid: i32) -> Result<HashMap<u64, Vec<String>>> {
    let text = read(pid, "smaps")?;
    let mut out = HashMap::new();
    let mut cur: Option<u64> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmFlags:") {
            if let Some(start) = cur {
                out.insert(start, rest.split_whitespace().map(str::to_string).collect());
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, _)) = range.split_once('-') {
                if let Ok(v) = u64::from_str_radix(s, 16) {
                    cur = Some(v);
                }
            }
        }
    }
    Ok(out)
}

/// The "Key:\tvalue" lines of /proc/PID/status.
pub fn status(pid: i32) -> Result<HashMap<String, String>> {
    Ok(read(pid, "status")?
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

/// Fields of /proc/PID/stat after the command name, numbered as in proc(5) (field 3 = state).
pub fn stat_fields(pid: i32) -> Result<Vec<String>> {
    let s = read(pid, "stat")?;
    let after = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| Error::Target {
            pid,
            msg: "unreadable /proc stat".into(),
        })?;
    let mut v = vec![String::new(), String::new(), String::new()];
    v.extend(after.split_whitespace().map(str::to_string));
    Ok(v)
}

pub fn field_u64(f: &[String], i: usize) -> u64 {
    f.get(i).and_then(|x| x.parse().ok()).unwrap_or(0)
}

pub fn auxv(pid: i32) -> Result<Vec<u64>> {
    let b = fs::read(format!("/proc/{pid}/auxv"))
        .map_err(|e| crate::error::sys_err(format!("reading /proc/{pid}/auxv"), e))?;
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

pub fn link(pid: i32, what: &str) -> Result<String> {
    fs::read_link(format!("/proc/{pid}/{what}"))
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| crate::error::sys_err(format!("reading /proc/{pid}/{what}"), e))
}

pub fn file_id_of(path: &str) -> std::io::Result<FileId> {
    let m = fs::metadata(path)?;
    Ok(FileId {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_sec: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

/// One open file descriptor.
#[derive(Clone, Debug)]
pub struct FdInfo {
    pub fd: i32,
    pub target: String,
    pub pos: u64,
    pub flags: i32,
    pub mode: u32,
    pub has_lock: bool,
}

pub fn fds(pid: i32) -> Result<Vec<FdInfo>> {
    let dir = fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NoProcess(pid)
        } else {
            crate::error::sys_err(format!("listing /proc/{pid}/fd"), e)
        }
    })?;
    let mut out = Vec::new();
    for ent in dir.flatten() {
        let Ok(fd) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(target) = fs::read_link(ent.path()) else {
            continue; // closed meanwhile
        };
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let mut pos = 0;
        let mut flags = 0;
        let mut has_lock = false;
        for l in info.lines() {
            if let Some(v) = l.strip_prefix("pos:") {
                pos = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = l.strip_prefix("flags:") {
                flags = i32::from_str_radix(v.trim(), 8).unwrap_or(0);
            } else if l.starts_with("lock:") {
                has_lock = true;
            }
        }
        let mode = fs::metadata(ent.path()).map(|m| m.mode()).unwrap_or(0);
        out.push(FdInfo {
            fd,
            target: target.to_string_lossy().into_owned(),
            pos,
            flags,
            mode,
            has_lock,
        });
    }
    out.sort_by_key(|f| f.fd);
    Ok(out)
}

pub fn tasks(pid: i32) -> Result<Vec<i32>> {
    let dir = fs::read_dir(format!("/proc/{pid}/task")).map_err(|_| Error::NoProcess(pid))?;
    Ok(dir
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect())
}

pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for t in tasks(pid).unwrap_or_default() {
        if let Ok(s) = fs::read_to_string(format!("/proc/{pid}/task/{t}/children")) {
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
        }
    }
    out
}

/// Parses the hexadecimal masks of /proc/PID/status (SigBlk, CapEff, ...).
pub fn hex(s: Option<&String>) -> u64 {
    s.and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0)
}

/// Every number of a status line such as `Groups:` (none if it is missing).
pub fn id_list(s: Option<&String>) -> Vec<u32> {
    s.map(|g| {
        g.split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect()
    })
    .unwrap_or_default()
}

/// Four numbers of a "Uid:"/"Gid:" line.
pub fn ids(s: Option<&String>) -> [u32; 4] {
    let mut out = [0u32; 4];
    if let Some(v) = s {
        for (i, x) in v.split_whitespace().take(4).enumerate() {
            out[i] = x.parse().unwrap_or(0);
        }
    }
    out
}

/// Pages of [start, end): the raw /proc/PID/pagemap entries.
pub fn pagemap(file: &fs::File, start: u64, end: u64) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let n = ((end - start) / crate::sys::PAGE) as usize;
    let mut buf = vec![0u8; n * 8];
    file.read_exact_at(&mut buf, start / crate::sys::PAGE * 8)
        .map_err(|e| crate::error::sys_err("reading the page map", e))?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAPPED: u64 = 1 << 62;
pub const PM_FILE: u64 = 1 << 61;

/// Resource limits from /proc/PID/limits: (resource, soft, hard), in resource order.
/// (prlimit64 on another user's process would need CAP_SYS_RESOURCE.)
pub fn limits(pid: i32) -> Result<Vec<(u32, u64, u64)>> {
    let text = read(pid, "limits")?;
    let val = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        // Fixed columns: name (25), soft (20), hard (20), units.
        let (Some(soft), Some(hard)) = (line.get(26..46), line.get(47..67)) else {
            continue;
        };
        if let (Some(s), Some(h)) = (val(soft), val(hard)) {
            out.push((out.len() as u32, s, h));
        }
    }
    Ok(out)
}

/// CLOCK_MONOTONIC and CLOCK_BOOTTIME offsets (ns) of the time namespace of `who` ("self"
/// or a PID) for its children, which is its own unless it just unshared one; (0, 0) when
/// the kernel has no time namespaces.
pub fn timens_offsets(who: &str) -> (i64, i64) {
    let text = fs::read_to_string(format!("/proc/{who}/timens_offsets")).unwrap_or_default();
    let mut out = (0, 0);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() != 3 {
            continue;
        }
        let (Ok(s), Ok(ns)) = (f[1].parse::<i64>(), f[2].parse::<i64>()) else {
            continue;
        };
        let v = s.saturating_mul(1_000_000_000).saturating_add(ns);
        match f[0] {
            "monotonic" | "1" => out.0 = v,
            "boottime" | "7" => out.1 = v,
            _ => {}
        }
    }
    out
}

/// The PID `pid` has in its own PID namespace (the last of NSpid; `pid` itself when
/// the kernel does not say).
pub fn own_pid(pid: i32) -> i32 {
    status(pid)
        .ok()
        .and_then(|s| {
            s.get("NSpid")
                .and_then(|n| n.split_whitespace().last()?.parse().ok())
        })
        .unwrap_or(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let t = "55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 1234   /usr/bin/my prog\n\
                 7ffd09207000-7ffd09228000 rw-p 00000000 00:00 0                          [stack]\n\
                 7f00-8000 rw-s 00000010 00:01 5 /SYSV00000000 (deleted)\n\
                 garbage\n";
        let m = parse_maps(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].name, "/usr/bin/my prog");
        assert!(m[0].read && !m[0].write && !m[0].shared && m[0].is_file());
        assert_eq!(m[1].name, "[stack]");
        assert!(m[2].shared);
        assert_eq!(m[2].offset, 0x10);
    }

    #[test]
    fn own_limits_parse() {
        let l = limits(std::process::id() as i32).unwrap();
        assert_eq!(l.len(), 16);
        assert!(l
            .iter()
            .enumerate()
            .all(|(i, r)| r.0 == i as u32 && r.1 <= r.2));
    }
}
