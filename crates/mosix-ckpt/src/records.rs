//! The records of image format 2: an index with the process tree first, then for each
//! process its process record (what all its threads share), one record per thread, and
//! its memory. [`ProcessImage`] is the in-memory form of one process; this module splits
//! it into records for the writer and puts it together again for the reader. Also the
//! frozen metadata layout of format 1.x ([`ProcessImageV1`]), still read.

use serde::{Deserialize, Serialize};

use crate::error::{bad, Result};
use crate::image::{
    Clocks, Creds, Fd, FileId, MmFields, PendingSignal, ProcessImage, Rseq, ShmemObject, SigAction,
    ThreadImage, Vma, VmaKind,
};
use crate::Caps;

/// Format 2: the first record. Says what the rest of the image holds, so that a reader can
/// bound what it reads before it reads it.
pub const TAG_INDEX: u8 = 3;
/// Format 2: one per process, after the index, in the order of the tree.
pub const TAG_PROCESS: u8 = 4;
/// Format 2: one per thread, right after its process record, main thread first.
pub const TAG_THREAD: u8 = 5;

/// Format 3: first record of an image that begins with pre-copy rounds (memory saved while
/// the process ran); says what the rounds may hold, so that a reader can bound them.
pub const TAG_PRECOPY: u8 = 9;
/// Format 3: starts a pre-copy round: the layout of the process's memory then
/// ([`Layout`]); the round's memory records follow.
pub const TAG_LAYOUT: u8 = 7;
/// Format 3: memory given back since an earlier round (at most one, right after a layout
/// or after the last thread record): (address u64, length u64) pairs, whole pages. The
/// pages there are as in a fresh mapping again (zero, or the file's).
pub const TAG_DROPS: u8 = 8;
/// Format 3.4: the records after this one are all of the process's private anonymous
/// memory: memory records, and drop records naming its pages that are zero. A reader
/// that restores while the image arrives may let the process run from here and put them
/// in as they come (`crate::postcopy`). Its payload: (address u64, length u64) pairs,
/// whole pages, of the memory that may still come (pages outside them are zero, or
/// never touched). At most one, after the final part's thread records and its other
/// memory; only memory records, drop records and the end follow it.
pub const TAG_LAZY: u8 = 10;

/// The pre-copy record (format 3): bounds of the rounds that follow it, up to the index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreCopy {
    /// Bytes of memory contents and drop records in all rounds together, at most.
    pub budget: u64,
    /// Payload bytes of all layout records together, at most.
    pub layouts_bytes: u64,
    /// Rounds (layout records), at most.
    pub rounds: u32,
    /// Bytes of memory contents the process had when the rounds began (what a receiver
    /// admits it by: rounds send some of it more than once).
    pub resident: u64,
}

/// A pre-copy round's layout record (format 3): what a receiver needs to map the
/// process's memory before its final state is known.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub pid: i32,
    pub arch: String,
    pub kernel: String,
    pub exe: String,
    pub exe_id: Option<FileId>,
    pub creds: Creds,
    pub caps: Option<Caps>,
    pub mm: MmFields,
    pub vmas: Vec<Vma>,
    /// Its clocks when the layout was read.
    pub clocks: Option<Clocks>,
}

impl Layout {
    /// The layout part of a process image.
    pub fn of(m: &ProcessImage) -> Layout {
        Layout {
            pid: m.pid,
            arch: m.arch.clone(),
            kernel: m.kernel.clone(),
            exe: m.exe.clone(),
            exe_id: m.exe_id.clone(),
            creds: m.creds.clone(),
            caps: m.caps,
            mm: m.mm.clone(),
            vmas: m.vmas.clone(),
            clocks: m.clocks,
        }
    }
    /// A process image with only the layout's fields (what restoring memory needs).
    pub fn to_image(&self) -> ProcessImage {
        ProcessImage {
            pid: self.pid,
            arch: self.arch.clone(),
            kernel: self.kernel.clone(),
            exe: self.exe.clone(),
            exe_id: self.exe_id.clone(),
            creds: self.creds.clone(),
            caps: self.caps,
            mm: self.mm.clone(),
            vmas: self.vmas.clone(),
            clocks: self.clocks,
            ..Default::default()
        }
    }
}

/// Whether memory of area `v` is put in place before the process's final state is
/// known (its own pages: private, not the kernel's), as pre-copy rounds and a receiver
/// restoring while it receives do.
pub fn staged(v: &Vma) -> bool {
    !v.shared && matches!(v.kind, VmaKind::Anon | VmaKind::File { .. })
}

/// The address ranges whose contents carry over from layout `prev` to layout `next`: in
/// a staged area of both, of the same kind at every address (anonymous memory, or the
/// same file at the same offset), and for a stack (growing down) the very same area.
/// Everything else of `next` is mapped afresh (zero, or the file's pages). Writer and
/// readers of pre-copy rounds decide by this one rule. Sorted, not overlapping.
pub fn kept_ranges(prev: &[Vma], next: &[Vma]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for n in next.iter().filter(|v| staged(v)) {
        for p in prev.iter().filter(|v| staged(v)) {
            let (s, e) = (n.start.max(p.start), n.end.min(p.end));
            if s >= e {
                continue;
            }
            let same = match (&n.kind, &p.kind) {
                (VmaKind::Anon, VmaKind::Anon) => {
                    if n.growsdown || p.growsdown {
                        n.growsdown == p.growsdown && n.start == p.start && n.end == p.end
                    } else {
                        true
                    }
                }
                (
                    VmaKind::File {
                        path: a,
                        offset: ao,
                        id: ai,
                    },
                    VmaKind::File {
                        path: b,
                        offset: bo,
                        id: bi,
                    },
                ) => {
                    a == b
                        && ai == bi
                        && ao.wrapping_sub(n.start) == bo.wrapping_sub(p.start)
                        && !n.growsdown
                        && !p.growsdown
                }
                _ => false,
            };
            if same {
                out.push((s, e));
            }
        }
    }
    out.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
    for (s, e) in out {
        match merged.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// One process of the image's process tree (format 2 index). An image of one process has
/// one entry; images of process families will have one per process, parents first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    /// The PID the process knows itself by.
    pub pid: i32,
    /// Its parent's PID if the parent is in the image too, else 0.
    pub ppid: i32,
    /// Its process group and session, as it sees them.
    pub pgid: i32,
    pub sid: i32,
    /// Its thread IDs (as it knows them), the main thread (= pid) first: the thread
    /// records that follow its process record, in this order.
    pub threads: Vec<i32>,
}

/// The index record (format 2).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Bytes of memory contents in the whole image, at most (as 1.x's `memory_estimate`).
    pub memory_estimate: u64,
    /// Payload bytes of all process and thread records together.
    pub records_bytes: u64,
    pub tree: Vec<TreeEntry>,
}

/// The process record (format 2): the state all threads of a process share.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    pub pid: i32,
    pub arch: String,
    pub kernel: String,
    pub hostname: String,
    pub comm: String,
    pub exe: String,
    pub exe_id: Option<FileId>,
    pub cwd: String,
    pub umask: u32,
    pub creds: Creds,
    pub caps: Option<Caps>,
    pub personality: u64,
    pub no_new_privs: bool,
    pub rlimits: Vec<(u32, u64, u64)>,
    pub vmas: Vec<Vma>,
    pub mm: MmFields,
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process (shared queue).
    pub pending: Vec<PendingSignal>,
    pub itimers: Vec<[i64; 4]>,
    pub fds: Vec<Fd>,
    /// Its memfds and MAP_SHARED anonymous memory.
    pub shmem: Vec<ShmemObject>,
    /// Bytes of memory contents of this process, at most.
    pub memory_estimate: u64,
    pub clocks: Option<Clocks>,
    /// [`ProcessImage::advice`]: not in this record's postcard but in the [`ProcExt`]
    /// after it in the same payload (format 3.2; see [`encode_proc`]).
    #[serde(skip)]
    pub advice: Vec<(u64, u32)>,
}

/// What format 3.2 added to the process record, encoded after it in its payload: a 3.0 or
/// 3.1 payload ends with the record, and reads with none of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcExt {
    pub advice: Vec<(u64, u32)>,
}

/// The payload of a process record: the record, then its [`ProcExt`].
pub fn encode_proc(p: &ProcRecord) -> std::result::Result<Vec<u8>, postcard::Error> {
    let mut out = postcard::to_stdvec(p)?;
    out.extend(postcard::to_stdvec(&ProcExt {
        advice: p.advice.clone(),
    })?);
    Ok(out)
}

/// A process record from its payload (with its [`ProcExt`] if the payload has one).
pub fn decode_proc(payload: &[u8]) -> std::result::Result<ProcRecord, postcard::Error> {
    let (mut p, rest): (ProcRecord, &[u8]) = postcard::take_from_bytes(payload)?;
    if !rest.is_empty() {
        let ext: ProcExt = postcard::from_bytes(rest)?;
        p.advice = ext.advice;
    }
    Ok(p)
}

/// The records of one process: its index entry, process record, thread records (main
/// thread first).
pub fn split(m: &ProcessImage) -> (TreeEntry, ProcRecord, Vec<ThreadImage>) {
    let (shared, own): (Vec<_>, Vec<_>) = m.pending.iter().cloned().partition(|p| p.shared);
    let regs = crate::sys::regs_from_bytes(&m.regs);
    let main = ThreadImage {
        tid: m.pid,
        comm: m.comm.clone(),
        regs: m.regs.clone(),
        fs_base: regs.map_or(0, |r| r.fs_base),
        gs_base: regs.map_or(0, |r| r.gs_base),
        xstate: m.xstate.clone(),
        blocked: m.blocked,
        pending: own,
        sigaltstack: m.sigaltstack,
        rseq: m.rseq.clone(),
        robust_list: m.robust_list,
        clear_child_tid: m.clear_child_tid,
    };
    let mut threads = vec![main];
    threads.extend(m.threads.iter().cloned());
    let tree = TreeEntry {
        pid: m.pid,
        ppid: 0,
        pgid: m.pgid,
        sid: m.sid,
        threads: threads.iter().map(|t| t.tid).collect(),
    };
    let p = ProcRecord {
        pid: m.pid,
        arch: m.arch.clone(),
        kernel: m.kernel.clone(),
        hostname: m.hostname.clone(),
        comm: m.comm.clone(),
        exe: m.exe.clone(),
        exe_id: m.exe_id.clone(),
        cwd: m.cwd.clone(),
        umask: m.umask,
        creds: m.creds.clone(),
        caps: m.caps,
        personality: m.personality,
        no_new_privs: m.no_new_privs,
        rlimits: m.rlimits.clone(),
        vmas: m.vmas.clone(),
        mm: m.mm.clone(),
        sigactions: m.sigactions.clone(),
        pending: shared,
        itimers: m.itimers.clone(),
        fds: m.fds.clone(),
        shmem: m.shmem.clone(),
        memory_estimate: m.memory_estimate,
        clocks: m.clocks,
        advice: m.advice.clone(),
    };
    (tree, p, threads)
}

/// One process again from its records (checked against its tree entry).
pub fn join(t: &TreeEntry, p: ProcRecord, mut threads: Vec<ThreadImage>) -> Result<ProcessImage> {
    let tids: Vec<i32> = threads.iter().map(|x| x.tid).collect();
    if p.pid != t.pid || tids != t.threads || threads.is_empty() || tids[0] != t.pid {
        return Err(bad(format!(
            "the records of process {} do not match the process tree",
            p.pid
        )));
    }
    let mut seen = std::collections::HashSet::new();
    if !tids.iter().all(|&x| seen.insert(x)) {
        return Err(bad(format!("process {} has duplicate thread IDs", p.pid)));
    }
    let mut main = threads.remove(0);
    if let Some(mut r) = crate::sys::regs_from_bytes(&main.regs) {
        r.fs_base = main.fs_base;
        r.gs_base = main.gs_base;
        main.regs = crate::sys::regs_to_bytes(&r);
    }
    let mut pending = p.pending;
    if pending.iter().any(|s| !s.shared) || main.pending.iter().any(|s| s.shared) {
        return Err(bad("a pending signal is in the wrong queue"));
    }
    pending.extend(main.pending);
    Ok(ProcessImage {
        arch: p.arch,
        kernel: p.kernel,
        hostname: p.hostname,
        pid: p.pid,
        comm: p.comm,
        exe: p.exe,
        exe_id: p.exe_id,
        cwd: p.cwd,
        umask: p.umask,
        creds: p.creds,
        personality: p.personality,
        no_new_privs: p.no_new_privs,
        rlimits: p.rlimits,
        vmas: p.vmas,
        mm: p.mm,
        regs: main.regs,
        xstate: main.xstate,
        sigactions: p.sigactions,
        blocked: main.blocked,
        pending,
        sigaltstack: main.sigaltstack,
        itimers: p.itimers,
        rseq: main.rseq,
        robust_list: main.robust_list,
        clear_child_tid: main.clear_child_tid,
        fds: p.fds,
        memory_estimate: p.memory_estimate,
        clocks: p.clocks,
        caps: p.caps,
        threads,
        pgid: t.pgid,
        sid: t.sid,
        shmem: p.shmem,
        advice: p.advice,
    })
}

/// The metadata record of format 1.x (its last minor, 1.2), field for field: frozen, so
/// that images written by older mosix versions are still read. 1.0 lacks the last two
/// fields, 1.1 the last one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessImageV1 {
    pub arch: String,
    pub kernel: String,
    pub hostname: String,
    pub pid: i32,
    pub comm: String,
    pub exe: String,
    pub exe_id: Option<FileId>,
    pub cwd: String,
    pub umask: u32,
    pub creds: Creds,
    pub personality: u64,
    pub no_new_privs: bool,
    pub rlimits: Vec<(u32, u64, u64)>,
    pub vmas: Vec<Vma>,
    pub mm: MmFields,
    pub regs: Vec<u8>,
    pub xstate: Vec<u8>,
    pub sigactions: Vec<SigAction>,
    pub blocked: u64,
    pub pending: Vec<PendingSignal>,
    pub sigaltstack: (u64, i32, u64),
    pub itimers: Vec<[i64; 4]>,
    pub rseq: Option<Rseq>,
    pub robust_list: (u64, u64),
    pub clear_child_tid: u64,
    pub fds: Vec<Fd>,
    pub memory_estimate: u64,
    pub clocks: Option<Clocks>,
    pub caps: Option<Caps>,
}

/// The last minor version of format 1.
pub const V1_LAST_MINOR: u16 = 3;

impl From<ProcessImageV1> for ProcessImage {
    fn from(v: ProcessImageV1) -> ProcessImage {
        ProcessImage {
            arch: v.arch,
            kernel: v.kernel,
            hostname: v.hostname,
            pid: v.pid,
            comm: v.comm,
            exe: v.exe,
            exe_id: v.exe_id,
            cwd: v.cwd,
            umask: v.umask,
            creds: v.creds,
            personality: v.personality,
            no_new_privs: v.no_new_privs,
            rlimits: v.rlimits,
            vmas: v.vmas,
            mm: v.mm,
            regs: v.regs,
            xstate: v.xstate,
            sigactions: v.sigactions,
            blocked: v.blocked,
            pending: v.pending,
            sigaltstack: v.sigaltstack,
            itimers: v.itimers,
            rseq: v.rseq,
            robust_list: v.robust_list,
            clear_child_tid: v.clear_child_tid,
            fds: v.fds,
            memory_estimate: v.memory_estimate,
            clocks: v.clocks,
            caps: v.caps,
            threads: Vec::new(),
            pgid: 0,
            sid: 0,
            shmem: Vec::new(),
            advice: Vec::new(),
        }
    }
}

impl From<&ProcessImage> for ProcessImageV1 {
    /// The 1.2 metadata of a single-threaded process (tests and fuzzing write old images).
    fn from(m: &ProcessImage) -> ProcessImageV1 {
        let m = m.clone();
        ProcessImageV1 {
            arch: m.arch,
            kernel: m.kernel,
            hostname: m.hostname,
            pid: m.pid,
            comm: m.comm,
            exe: m.exe,
            exe_id: m.exe_id,
            cwd: m.cwd,
            umask: m.umask,
            creds: m.creds,
            personality: m.personality,
            no_new_privs: m.no_new_privs,
            rlimits: m.rlimits,
            vmas: m.vmas,
            mm: m.mm,
            regs: m.regs,
            xstate: m.xstate,
            sigactions: m.sigactions,
            blocked: m.blocked,
            pending: m.pending,
            sigaltstack: m.sigaltstack,
            itimers: m.itimers,
            rseq: m.rseq,
            robust_list: m.robust_list,
            clear_child_tid: m.clear_child_tid,
            fds: m.fds,
            memory_estimate: m.memory_estimate,
            clocks: m.clocks,
            caps: m.caps,
        }
    }
}
