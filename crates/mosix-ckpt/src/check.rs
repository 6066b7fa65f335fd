//! Can this process be checkpointed faithfully? Decided from /proc alone, before the
//! process is touched; every reason it cannot is listed.

use crate::error::Result;
use crate::image::FdKind;
use crate::procfs::{self, FdInfo, MapLine};

/// Character devices that hold no state worth saving: reopened by path.
const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

fn is_stdio_endpoint(t: &str) -> bool {
    t == "/dev/null"
        || t.starts_with("/dev/pts/")
        || t.starts_with("/dev/tty")
        || t == "/dev/console"
        || t.starts_with("pipe:")
        || t.starts_with("socket:")
}

fn describe_special(t: &str) -> String {
    if t.starts_with("pipe:") {
        "a pipe".into()
    } else if t.starts_with("socket:") {
        "a socket".into()
    } else if let Some(k) = t.strip_prefix("anon_inode:") {
        format!(
            "a kernel object ({})",
            k.trim_matches(|c| c == '[' || c == ']')
        )
    } else if t.starts_with("/dev/") {
        format!("the device {t}")
    } else {
        format!("'{t}'")
    }
}

/// How descriptor `f` comes back, or why it cannot.
pub fn classify_fd(f: &FdInfo) -> std::result::Result<FdKind, String> {
    let t = &f.target;
    let fmt = f.mode & libc::S_IFMT;
    if crate::shmem::is_shmem(t) && !f.has_lock {
        // Its object is found by inode when the process is dumped.
        return Ok(FdKind::Memfd {
            ino: 0,
            flags: f.flags,
            pos: f.pos,
        });
    }
    if t.ends_with(" (deleted)") {
        return Err(format!("fd {} is a deleted file ({t})", f.fd));
    }
    if f.has_lock {
        return Err(format!("fd {} holds a file lock ({t})", f.fd));
    }
    let stream = fmt == libc::S_IFIFO || fmt == libc::S_IFSOCK;
    if (0..=2).contains(&f.fd) && (stream || is_stdio_endpoint(t)) {
        return Ok(FdKind::Inherit { was: t.clone() });
    }
    let reopen = t.starts_with('/')
        && (fmt == libc::S_IFREG
            || fmt == libc::S_IFDIR
            || STATELESS_DEVICES.contains(&t.as_str()));
    if reopen {
        let id = if fmt == libc::S_IFREG {
            procfs::file_id_of(t).ok()
        } else {
            None
        };
        return Ok(FdKind::File {
            path: t.clone(),
            flags: f.flags,
            pos: f.pos,
            id,
        });
    }
    Err(format!("fd {} is {}", f.fd, describe_special(t)))
}

/// How descriptor `f` of `pid` (whose descriptors are `all`) comes back, or why it
/// cannot: kernel objects inside the process ([`crate::fdobj`]) or [`classify_fd`].
pub fn kind_of_fd(pid: i32, f: &FdInfo, all: &[FdInfo]) -> std::result::Result<FdKind, String> {
    crate::fdobj::kind_of(pid, f, all).unwrap_or_else(|| classify_fd(f))
}

/// Why mapping `m` cannot be saved, if it cannot.
pub fn vma_refusal(m: &MapLine) -> Option<String> {
    vma_refusal_in(m, &[])
}

/// [`vma_refusal`], with directories `shared` by every node: a writable shared mapping of
/// a file under them moves (mapped again from the same file).
pub fn vma_refusal_in(m: &MapLine, shared: &[String]) -> Option<String> {
    let at = format!("{:#x}-{:#x}", m.start, m.end);
    if crate::shmem::is_shmem(&m.name) {
        // Moves with the process, unless another one has it too (see `refusals`).
        return None;
    }
    if m.name.starts_with("/SYSV") {
        return Some(format!("it is attached to System V shared memory ({at})"));
    }
    if m.name == "[uprobes]" {
        return Some("it has uprobes attached".into());
    }
    if m.shared && (m.write || !m.is_file()) && !(m.is_file() && under_shared(&m.name, shared)) {
        let what = if m.is_file() {
            m.name.as_str()
        } else {
            "anonymous memory"
        };
        return Some(format!(
            "it has writable shared memory: {what} ({at}){}",
            if m.is_file() {
                ", a file of no shared path (its writes could not be seen where it is)"
            } else {
                ""
            }
        ));
    }
    if m.name.ends_with(" (deleted)") {
        return Some(format!("it maps a deleted file {} ({at})", m.name));
    }
    if m.is_file() {
        let ok = std::fs::metadata(&m.name)
            .map(|md| md.file_type().is_file())
            .unwrap_or(false);
        if !ok {
            return Some(format!(
                "it maps {} which is not a regular file ({at})",
                m.name
            ));
        }
    } else if m.inode != 0 {
        return Some(format!("it maps {} ({at})", m.name));
    }
    None
}

/// What a checkpoint keeps of a process's kernel objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    /// Its descriptors and children stay where they are (at home, with its deputy): no
    /// descriptor and no child refuses (a migration).
    pub leave_home: bool,
    /// It runs away from home already, under our own seccomp filter (not a refusal).
    pub away: bool,
    /// Directories every node of the cluster shares (a cluster file system mounted at the
    /// same path everywhere): a writable shared mapping of a file under them is mapped
    /// again from the same file where the process goes.
    pub shared: Vec<String>,
}

/// Whether `path` lies under one of `shared` (component by component, no `..`).
pub fn under_shared(path: &str, shared: &[String]) -> bool {
    let p = std::path::Path::new(path);
    p.is_absolute()
        && !p.components().any(|c| c == std::path::Component::ParentDir)
        && shared.iter().any(|s| {
            let s = std::path::Path::new(s);
            s.is_absolute() && p.starts_with(s) && p != s
        })
}

/// Every reason `pid` cannot be checkpointed (empty when it can).
pub fn refusals(pid: i32) -> Result<Vec<String>> {
    refusals_with(pid, Rules::default())
}

/// Every reason `pid` cannot be checkpointed under `rules` (empty when it can).
pub fn refusals_with(pid: i32, rules: Rules) -> Result<Vec<String>> {
    let mut why = Vec::new();
    if pid == std::process::id() as i32 {
        why.push("it is the checkpointing command itself".into());
        return Ok(why);
    }
    let st = procfs::status(pid)?;
    let get = |k: &str| st.get(k).map(String::as_str).unwrap_or("");
    if get("Kthread") == "1" {
        why.push("it is a kernel thread".into());
        return Ok(why);
    }
    let state = get("State");
    if state.starts_with('Z') || state.starts_with('X') {
        why.push("it is exiting".into());
        return Ok(why);
    }
    let tracer: i32 = get("TracerPid").parse().unwrap_or(0);
    // We are the tracer once the process is frozen for the checkpoint, or a thread of
    // ours holds it.
    if !crate::threads::tracer_is_us(tracer) {
        why.push(format!("it is being traced by process {tracer}"));
    }
    let ours = rules.away && get("Seccomp_filters") == "1";
    if !matches!(get("Seccomp"), "" | "0") && !ours {
        why.push("it runs under a seccomp filter".into());
    }
    crate::threads::refusals(pid, rules.away, &mut why);
    let mut head = [0u8; 5];
    if let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/exe")) {
        use std::io::Read;
        if f.read_exact(&mut head).is_ok() && &head[..4] == b"\x7fELF" && head[4] != 2 {
            why.push("it is a 32-bit program (only x86_64 is supported)".into());
        }
    }
    let kids = procfs::children(pid);
    if !kids.is_empty() && !rules.leave_home {
        let list: Vec<String> = kids.iter().map(|k| k.to_string()).collect();
        why.push(format!("it has child processes ({})", list.join(", ")));
    }
    if let Ok(t) = std::fs::read_to_string(format!("/proc/{pid}/timers")) {
        if !t.trim().is_empty() {
            why.push("it uses POSIX timers (timer_create)".into());
        }
    }
    let maps = procfs::maps(pid)?;
    // Moving, memory it shares with other processes at home stays there (homemem).
    let home = if rules.leave_home {
        crate::homemem::areas(pid, &maps, rules.away)
    } else {
        Vec::new()
    };
    let stays: std::collections::HashSet<u64> = home.iter().map(|a| a.here_ino).collect();
    crate::shmem::refusals(pid, &maps, &stays, &mut why);
    if !rules.away {
        if let Some(r) = crate::homemem::waiting_on(pid, &home) {
            why.push(r);
        }
    }
    for m in maps {
        if home.iter().any(|a| (a.start, a.end) == (m.start, m.end)) {
            continue;
        }
        if let Some(r) = vma_refusal_in(&m, &rules.shared) {
            if !why.contains(&r) {
                why.push(r);
            }
        }
    }
    // Leaving home, its descriptors stay there with its deputy: none refuses.
    if !rules.leave_home {
        let fds = procfs::fds(pid)?;
        for f in &fds {
            if let Err(r) = kind_of_fd(pid, f, &fds) {
                why.push(r);
            }
        }
        crate::fdobj::refusals(pid, &fds, &mut why);
    }
    Ok(why)
}
