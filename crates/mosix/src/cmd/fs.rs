//! `mosix fs MOUNTPOINT`: the MOSIX file interface as a FUSE file system. MOSIX users read
//! `/proc/mosix/nodes/N/status` and `/proc/PID/where` and write a node number into
//! `/proc/PID/goto`; this offers the same under MOUNTPOINT, from this node's mosixd:
//!
//! ```text
//! nodes/N/{status,load,speed,cpus,mem,tmem,util}   every node of the cluster map
//! procs/PID/{where,reason,goto}                    migratable processes whose home is here
//! ```
//!
//! Everything is read-only except `goto`: writing a node number (0 or `home`: back home)
//! moves the process, by running `mosix migrate PID NODE` with the writer's uid and gid, so
//! the daemon applies exactly that user's permission (as for `migrate`). A failed `goto`
//! returns an error from write(2) and its reason shows in `procs/PID/reason`.

use anyhow::{bail, Context, Result};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    WriteFlags,
};
use mosix_proto::control::{Client, ProcEntry, Request as CtlRequest, Response};
use mosix_proto::{ClusterStatus, NodeStatus};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Mount the MOSIX file interface (nodes/N/status, procs/PID/where, procs/PID/goto).
///
/// Runs in the foreground until interrupted (Ctrl-C, SIGTERM) or unmounted (`umount
/// MOUNTPOINT`, `fusermount3 -u MOUNTPOINT`). One value per file, as MOSIX's /proc
/// interface (see Files below).
///
/// `procs` lists the migratable processes whose home is this node, by home PID. A `goto`
/// moves the process with the writer's permission (your own processes; root: any). Run as
/// root the file system is open to every user (allow_other); otherwise only to you. Values
/// of a node never heard from read `-`.
#[derive(clap::Args)]
#[command(after_help = "Files:\n  \
    nodes/N/status    3 = up, 1 = down or incompatible (DS_MOSIX_DEF | DS_MOSIX_UP)\n  \
    nodes/N/load      runnable processes per unit of capacity (speed x CPUs)\n  \
    nodes/N/speed     relative speed of one CPU\n  \
    nodes/N/cpus      number of CPUs\n  \
    nodes/N/mem       free memory, bytes (tmem: total)\n  \
    nodes/N/util      utilisation, 0..1\n  \
    procs/PID/where   0 at home, else the node it runs on\n  \
    procs/PID/reason  why it is where it is (and why the last goto failed)\n  \
    procs/PID/goto    write a node number (0 or home: back home) to move it\n\n\
    Examples:\n  \
    mkdir -p /mnt/mosix && mosix fs /mnt/mosix &\n  \
    cat /mnt/mosix/nodes/*/status\n  \
    cat /mnt/mosix/procs/4321/where\n  \
    echo 3 > /mnt/mosix/procs/4321/goto      # migrate 4321 3\n  \
    echo home > /mnt/mosix/procs/4321/goto   # back home\n  \
    umount /mnt/mosix")]
pub struct Args {
    /// Where to mount it (an existing directory).
    mountpoint: PathBuf,
    /// Control socket of the mosixd to ask (default: as for `mosix status`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

const ROOT: u64 = 1;
const NODES: u64 = 2;
const PROCS: u64 = 3;
const KIND_NODE: u64 = 1 << 40;
const KIND_PROC: u64 = 2 << 40;
const NODE_FILES: [&str; 7] = ["status", "load", "speed", "cpus", "mem", "tmem", "util"];
const PROC_FILES: [&str; 3] = ["where", "reason", "goto"];
/// How long an answer of mosixd is reused.
const CACHE: Duration = Duration::from_millis(250);
/// Longest value accepted by `goto`.
const MAX_GOTO: usize = 32;

/// What an inode number stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ino {
    Root,
    Nodes,
    Procs,
    NodeDir(u32),
    /// Node, index in [`NODE_FILES`].
    NodeFile(u32, usize),
    ProcDir(i32),
    /// Home PID, index in [`PROC_FILES`].
    ProcFile(i32, usize),
}

impl Ino {
    fn encode(self) -> u64 {
        match self {
            Ino::Root => ROOT,
            Ino::Nodes => NODES,
            Ino::Procs => PROCS,
            Ino::NodeDir(n) => KIND_NODE | u64::from(n) << 4,
            Ino::NodeFile(n, f) => KIND_NODE | u64::from(n) << 4 | (f as u64 + 1),
            Ino::ProcDir(p) => KIND_PROC | u64::from(p as u32) << 4,
            Ino::ProcFile(p, f) => KIND_PROC | u64::from(p as u32) << 4 | (f as u64 + 1),
        }
    }

    fn decode(ino: u64) -> Option<Ino> {
        match ino {
            ROOT => return Some(Ino::Root),
            NODES => return Some(Ino::Nodes),
            PROCS => return Some(Ino::Procs),
            _ => {}
        }
        let id = (ino & ((1 << 40) - 1)) >> 4;
        let f = (ino & 0xf) as usize;
        match ino & !((1 << 40) - 1) {
            KIND_NODE => {
                let n = u32::try_from(id).ok()?;
                match f {
                    0 => Some(Ino::NodeDir(n)),
                    f if f <= NODE_FILES.len() => Some(Ino::NodeFile(n, f - 1)),
                    _ => None,
                }
            }
            KIND_PROC => {
                let p = i32::try_from(id).ok()?;
                match f {
                    0 => Some(Ino::ProcDir(p)),
                    f if f <= PROC_FILES.len() => Some(Ino::ProcFile(p, f - 1)),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// The content of `nodes/N/FILE`.
fn node_value(n: &NodeStatus, file: usize) -> String {
    if file == 0 {
        return format!("{}\n", n.status);
    }
    let Some(l) = &n.load else {
        return "-\n".into();
    };
    match NODE_FILES[file] {
        "load" => format!("{:.2}\n", l.load),
        "speed" => format!("{:.2}\n", l.speed),
        "cpus" => format!("{}\n", l.cpus),
        "mem" => format!("{}\n", l.mem_free),
        "tmem" => format!("{}\n", l.mem_total),
        "util" => format!("{:.2}\n", l.util),
        _ => "-\n".into(),
    }
}

/// The node number a `goto` write asks for: a number, or `home` (= 0).
fn parse_goto(data: &[u8]) -> Option<String> {
    if data.len() > MAX_GOTO {
        return None;
    }
    let s = std::str::from_utf8(data).ok()?.trim();
    if s == "home" {
        return Some("home".into());
    }
    s.parse::<u32>().ok().map(|n| n.to_string())
}

struct View {
    at: Instant,
    status: ClusterStatus,
    /// Home processes of this node, by home PID.
    procs: Vec<ProcEntry>,
}

struct MosixFs {
    socket: PathBuf,
    view: Mutex<Option<View>>,
    /// The last failed `goto` of a process: its reason.
    goto_failed: Mutex<HashMap<i32, String>>,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

fn ask(socket: &std::path::Path) -> Result<(ClusterStatus, Vec<ProcEntry>)> {
    let mut c = Client::connect(socket, Duration::from_secs(5))?;
    let status = c.status()?;
    let procs = match c.call(&CtlRequest::Ps)? {
        Response::Ps { procs, .. } => procs,
        other => bail!("mosixd answered {other:?} to ps"),
    };
    let me = status.this_node;
    let mut home: Vec<ProcEntry> = procs.into_iter().filter(|p| p.home == me).collect();
    home.sort_by_key(|p| p.home_pid);
    home.dedup_by_key(|p| p.home_pid);
    Ok((status, home))
}

impl MosixFs {
    /// Runs `f` on a fresh enough view of the cluster (asking mosixd when it is stale).
    fn with_view<T>(&self, f: impl FnOnce(&View) -> T) -> Result<T, Errno> {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if v.as_ref().is_none_or(|v| v.at.elapsed() > CACHE) {
            match ask(&self.socket) {
                Ok((status, procs)) => {
                    *v = Some(View {
                        at: Instant::now(),
                        status,
                        procs,
                    })
                }
                Err(e) => {
                    tracing::warn!("mosix fs: {e:#}");
                    // Keep serving what we had; with nothing, the call fails.
                    if v.is_none() {
                        return Err(Errno::EIO);
                    }
                }
            }
        }
        v.as_ref().map(f).ok_or(Errno::EIO)
    }

    fn forget_view(&self) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether `ino` exists; a name not in a cached view is asked for again (a process
    /// started a moment ago is there at once).
    fn exists(&self, ino: Ino) -> bool {
        if self.exists_in_view(ino) {
            return true;
        }
        if !matches!(ino, Ino::Root | Ino::Nodes | Ino::Procs) {
            self.forget_view();
        }
        self.exists_in_view(ino)
    }

    fn exists_in_view(&self, ino: Ino) -> bool {
        match ino {
            Ino::Root | Ino::Nodes | Ino::Procs => true,
            Ino::NodeDir(n) | Ino::NodeFile(n, _) => self
                .with_view(|v| v.status.nodes.iter().any(|x| x.node == n))
                .unwrap_or(false),
            Ino::ProcDir(p) | Ino::ProcFile(p, _) => self
                .with_view(|v| v.procs.iter().any(|x| x.home_pid == p))
                .unwrap_or(false),
        }
    }

    /// The content of a file (None: no such file; Some(empty) for goto).
    fn content(&self, ino: Ino) -> Option<String> {
        match ino {
            Ino::NodeFile(n, f) => self
                .with_view(|v| {
                    v.status
                        .nodes
                        .iter()
                        .find(|x| x.node == n)
                        .map(|x| node_value(x, f))
                })
                .ok()
                .flatten(),
            Ino::ProcFile(p, 0) => self
                .with_view(|v| {
                    v.procs
                        .iter()
                        .find(|x| x.home_pid == p)
                        .map(|x| format!("{}\n", x.where_))
                })
                .ok()
                .flatten(),
            Ino::ProcFile(p, 1) => {
                let failed = self
                    .goto_failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&p)
                    .cloned();
                self.with_view(|v| {
                    v.procs
                        .iter()
                        .find(|x| x.home_pid == p)
                        .map(|x| match &failed {
                            Some(f) => format!("{}\nlast goto failed: {f}\n", x.reason),
                            None => format!("{}\n", x.reason),
                        })
                })
                .ok()
                .flatten()
            }
            Ino::ProcFile(p, 2) => self.exists(Ino::ProcDir(p)).then(String::new),
            _ => None,
        }
    }

    fn attr(&self, ino: Ino) -> Option<FileAttr> {
        let (kind, perm, size, uid) = match ino {
            Ino::Root | Ino::Nodes | Ino::Procs | Ino::NodeDir(_) | Ino::ProcDir(_) => {
                if !self.exists(ino) {
                    return None;
                }
                let owner = match ino {
                    Ino::ProcDir(p) => self.owner(p),
                    _ => self.uid,
                };
                (FileType::Directory, 0o555, 0, owner)
            }
            Ino::ProcFile(p, 2) => {
                if !self.exists(ino) {
                    return None;
                }
                (FileType::RegularFile, 0o200, 0, self.owner(p))
            }
            Ino::ProcFile(p, _) => {
                let c = self.content(ino)?;
                (FileType::RegularFile, 0o444, c.len() as u64, self.owner(p))
            }
            Ino::NodeFile(..) => {
                let c = self.content(ino)?;
                (FileType::RegularFile, 0o444, c.len() as u64, self.uid)
            }
        };
        Some(FileAttr {
            ino: INodeNo(ino.encode()),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: SystemTime::now(),
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 512,
        })
    }

    /// The owner of home process `p` (the mounting user if unknown).
    fn owner(&self, p: i32) -> u32 {
        self.with_view(|v| v.procs.iter().find(|x| x.home_pid == p).map(|x| x.uid))
            .ok()
            .flatten()
            .unwrap_or(self.uid)
    }

    fn child(&self, parent: Ino, name: &str) -> Option<Ino> {
        let ino = match parent {
            Ino::Root => match name {
                "nodes" => Ino::Nodes,
                "procs" => Ino::Procs,
                _ => return None,
            },
            Ino::Nodes => Ino::NodeDir(name.parse().ok().filter(|n| *n > 0)?),
            Ino::Procs => Ino::ProcDir(name.parse().ok().filter(|p| *p > 0)?),
            Ino::NodeDir(n) => Ino::NodeFile(n, NODE_FILES.iter().position(|f| *f == name)?),
            Ino::ProcDir(p) => Ino::ProcFile(p, PROC_FILES.iter().position(|f| *f == name)?),
            _ => return None,
        };
        self.exists(ino).then_some(ino)
    }

    fn entries(&self, dir: Ino) -> Option<Vec<(Ino, FileType, String)>> {
        let parent = match dir {
            Ino::Root | Ino::Nodes | Ino::Procs => Ino::Root,
            Ino::NodeDir(_) => Ino::Nodes,
            Ino::ProcDir(_) => Ino::Procs,
            _ => return None,
        };
        let mut out = vec![
            (dir, FileType::Directory, ".".to_string()),
            (parent, FileType::Directory, "..".to_string()),
        ];
        match dir {
            Ino::Root => {
                out.push((Ino::Nodes, FileType::Directory, "nodes".into()));
                out.push((Ino::Procs, FileType::Directory, "procs".into()));
            }
            Ino::Nodes | Ino::Procs => {
                // One directory per node of the map, or per home process.
                let ids: Vec<(Ino, String)> = self
                    .with_view(|v| match dir {
                        Ino::Nodes => v
                            .status
                            .nodes
                            .iter()
                            .map(|n| (Ino::NodeDir(n.node), n.node.to_string()))
                            .collect(),
                        _ => v
                            .procs
                            .iter()
                            .map(|p| (Ino::ProcDir(p.home_pid), p.home_pid.to_string()))
                            .collect(),
                    })
                    .ok()?;
                out.extend(ids.into_iter().map(|(i, n)| (i, FileType::Directory, n)));
            }
            Ino::NodeDir(_) | Ino::ProcDir(_) => {
                if !self.exists(dir) {
                    return None;
                }
                let names: &[&str] = match dir {
                    Ino::NodeDir(_) => &NODE_FILES,
                    _ => &PROC_FILES,
                };
                out.extend(names.iter().enumerate().map(|(i, f)| {
                    let ino = match dir {
                        Ino::NodeDir(n) => Ino::NodeFile(n, i),
                        Ino::ProcDir(p) => Ino::ProcFile(p, i),
                        _ => dir,
                    };
                    (ino, FileType::RegularFile, f.to_string())
                }));
            }
            _ => return None,
        }
        Some(out)
    }

    /// `goto`: moves home process `pid` to `node` with the caller's credentials.
    fn goto(&self, req: &Request, pid: i32, node: &str) -> Result<(), (Errno, String)> {
        let me = std::env::current_exe()
            .map_err(|e| (Errno::EIO, format!("cannot find the mosix binary: {e}")))?;
        let mut cmd = std::process::Command::new(me);
        cmd.args(["migrate", &pid.to_string(), node])
            .env("MOSIX_SOCKET", &self.socket)
            .stdin(std::process::Stdio::null());
        // As root, act as the writer (the daemon checks its uid as for `migrate`); otherwise
        // only the mounting user can write here at all.
        if nix::unistd::geteuid().is_root() && req.uid() != 0 {
            use std::os::unix::process::CommandExt;
            cmd.uid(req.uid()).gid(req.gid());
        }
        let out = cmd
            .output()
            .map_err(|e| (Errno::EIO, format!("cannot run mosix migrate: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        let why = String::from_utf8_lossy(&out.stderr)
            .trim()
            .trim_start_matches("mosix: ")
            .to_string();
        let errno = if why.contains("may only move your own") {
            Errno::EPERM
        } else if why.contains("no migratable process") {
            Errno::ENOENT
        } else if why.contains("not in the cluster map") {
            Errno::EINVAL
        } else {
            Errno::EIO
        };
        Err((errno, why))
    }
}

const TTL: Duration = Duration::ZERO;

impl Filesystem for MosixFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = Ino::decode(parent.0)
            .zip(name.to_str())
            .and_then(|(p, n)| self.child(p, n))
            .and_then(|i| self.attr(i));
        match found {
            Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match Ino::decode(ino.0).and_then(|i| self.attr(i)) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Only `> goto` (truncation to 0) is allowed: the shell opens it with O_TRUNC.
        match Ino::decode(ino.0) {
            Some(i @ Ino::ProcFile(_, 2)) if size.unwrap_or(0) == 0 => match self.attr(i) {
                Some(a) => reply.attr(&TTL, &a),
                None => reply.error(Errno::ENOENT),
            },
            Some(_) => reply.error(Errno::EACCES),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Each open reads what mosixd says now (lookups and stats in between use the cache).
        self.forget_view();
        let Some(i) = Ino::decode(ino.0).filter(|i| self.exists(*i)) else {
            return reply.error(Errno::ENOENT);
        };
        let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        match i {
            Ino::ProcFile(_, 2) if flags.0 & libc::O_ACCMODE == libc::O_WRONLY => {}
            Ino::ProcFile(_, 2) => return reply.error(Errno::EACCES),
            _ if writing => return reply.error(Errno::EACCES),
            _ => {}
        }
        // Contents change all the time: no page cache, reads see what mosixd says now.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match Ino::decode(ino.0).and_then(|i| self.content(i)) {
            Some(c) => {
                let b = c.as_bytes();
                let start = (offset as usize).min(b.len());
                let end = start.saturating_add(size as usize).min(b.len());
                reply.data(&b[start..end]);
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(Ino::ProcFile(pid, 2)) = Ino::decode(ino.0) else {
            return reply.error(Errno::EACCES);
        };
        let Some(node) = parse_goto(data) else {
            return reply.error(Errno::EINVAL);
        };
        let r = self.goto(req, pid, &node);
        self.forget_view();
        let mut failed = self.goto_failed.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok(()) => {
                failed.remove(&pid);
                reply.written(data.len() as u32);
            }
            Err((errno, why)) => {
                tracing::info!(pid, node, "goto refused: {why}");
                failed.insert(pid, why);
                reply.error(errno);
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mask: fuser::AccessFlags,
        reply: fuser::ReplyEmpty,
    ) {
        // Who may do what is decided per operation (goto: by mosixd, as the writer).
        match Ino::decode(ino.0).filter(|i| self.exists(*i)) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(entries) = Ino::decode(ino.0).and_then(|i| self.entries(i)) else {
            return reply.error(Errno::ENOENT);
        };
        for (i, (e, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.encode()), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}

pub fn run(a: Args) -> Result<i32> {
    let socket = super::status::socket_path(a.socket)?;
    if !a.mountpoint.is_dir() {
        bail!(
            "mount point {} is not a directory (mkdir it first)",
            a.mountpoint.display()
        );
    }
    // Fail early, with mosixd's own message, when the daemon is not there.
    ask(&socket)?;
    let root = nix::unistd::geteuid().is_root();
    let fs = MosixFs {
        socket,
        view: Mutex::new(None),
        goto_failed: Mutex::new(HashMap::new()),
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        started: SystemTime::now(),
    };
    let mut cfg = fuser::Config::default();
    cfg.mount_options.extend([
        MountOption::FSName("mosix".into()),
        MountOption::Subtype("mosix".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
    ]);
    if root {
        // As /proc: every user may look; each acts with their own permission.
        cfg.acl = fuser::SessionACL::All;
    }
    // A goto waits for its migration: other requests go on meanwhile.
    cfg.n_threads = Some(4);
    // Signals are taken by this thread only (every thread spawned after inherits the mask).
    let mut sigs = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        sigs.add(s);
    }
    sigs.thread_block().context("cannot block signals")?;
    let session = fuser::Session::new(fs, &a.mountpoint, &cfg).with_context(|| {
        format!(
            "cannot mount on {} (as a user this needs fusermount3: apt-get install fuse3)",
            a.mountpoint.display()
        )
    })?;
    let bg = session.spawn().context("cannot start the file system")?;
    eprintln!(
        "mosix fs: mounted on {} (umount it or press Ctrl-C to stop)",
        a.mountpoint.display()
    );
    loop {
        if bg.guard.is_finished() {
            // Unmounted from outside.
            bg.join().context("the file system stopped")?;
            return Ok(0);
        }
        if let Some(sig) = wait_signal(&sigs, Duration::from_millis(200)) {
            eprintln!("mosix fs: {sig}; unmounting {}", a.mountpoint.display());
            bg.umount_and_join()
                .with_context(|| format!("cannot unmount {}", a.mountpoint.display()))?;
            return Ok(0);
        }
    }
}

/// Waits up to `timeout` for one of the blocked signals `set`.
fn wait_signal(set: &nix::sys::signal::SigSet, timeout: Duration) -> Option<String> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: sigtimedwait reads a valid signal set and timespec and may write the
    // (optional, here null) siginfo; it has no other effect than taking a pending signal.
    let s = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (s > 0).then(|| {
        nix::sys::signal::Signal::try_from(s)
            .map(|s| s.to_string())
            .unwrap_or_else(|_| format!("signal {s}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inodes_round_trip() {
        for i in [
            Ino::Root,
            Ino::Nodes,
            Ino::Procs,
            Ino::NodeDir(1),
            Ino::NodeDir(u32::MAX),
            Ino::NodeFile(7, 0),
            Ino::NodeFile(7, NODE_FILES.len() - 1),
            Ino::ProcDir(1),
            Ino::ProcDir(i32::MAX),
            Ino::ProcFile(4321, 2),
        ] {
            assert_eq!(Ino::decode(i.encode()), Some(i), "{i:?}");
        }
        assert_eq!(Ino::decode(0), None);
        assert_eq!(Ino::decode(KIND_NODE | 15), None);
        assert_eq!(Ino::decode(3 << 40), None);
    }

    #[test]
    fn goto_values() {
        assert_eq!(parse_goto(b"3\n").as_deref(), Some("3"));
        assert_eq!(parse_goto(b" home \n").as_deref(), Some("home"));
        assert_eq!(parse_goto(b"0").as_deref(), Some("0"));
        assert_eq!(parse_goto(b"-1"), None);
        assert_eq!(parse_goto(b"three"), None);
        assert_eq!(parse_goto(&[b'1'; 64]), None);
        assert_eq!(parse_goto(&[0xff, 0xfe]), None);
    }

    #[test]
    fn node_files() {
        let mut n = NodeStatus {
            node: 2,
            address: "10.0.0.2:5400".into(),
            status: 3,
            state: mosix_proto::NodeState::Up,
            this_node: false,
            load: None,
            age_ms: None,
        };
        assert_eq!(node_value(&n, 0), "3\n");
        assert_eq!(node_value(&n, 3), "-\n", "never heard");
        n.load = Some(mosix_proto::LoadVector {
            load: 0.5,
            runnable: 2.0,
            util: 0.25,
            speed: 2.0,
            cpus: 2,
            mem_total: 4 << 30,
            mem_free: 1 << 30,
            procs: 9,
            proto: mosix_proto::PROTOCOL_VERSION,
            flags: 0,
        });
        let all: Vec<String> = (0..NODE_FILES.len()).map(|f| node_value(&n, f)).collect();
        assert_eq!(
            all,
            [
                "3\n",
                "0.50\n",
                "2.00\n",
                "2\n",
                "1073741824\n",
                "4294967296\n",
                "0.25\n"
            ]
        );
    }
}
