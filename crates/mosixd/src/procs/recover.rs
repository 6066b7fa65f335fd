//! Bringing processes back from their checkpoints:
//!
//! - automatic recovery: the host of a process with a checkpoint died (job.rs decides,
//!   homeckpt.rs has its deputy go back to the checkpoint's mark); its image is sent, as
//!   a migration from home, to the best node that can take it, or to home itself, where
//!   it runs under a supervisor as away (its deputy stays: what it writes again is
//!   dropped there, what it reads again comes from the deputy's log). Its residence
//!   number jumps ([`super::job::RECOVERY_EPOCHS`]): a copy of an older one that links
//!   later (its host was cut off, not dead) is ended.
//! - `mosrun -R FILE`: the calling mosrun becomes the checkpointed process (rebuilt inside
//!   it by a supervisor, as a process coming home is rebuilt inside its deputy), a
//!   migratable process of this node with mosrun's PID and standard descriptors.

use super::ckptfile::{self, Opened, Owner};
use super::home::{Caller, CkptRecord, Record};
use super::supervisor::{self, FromSup, SupMode, SupStart, ToSup};
use super::transfer::{commit, ready};
use super::{lock, MoveError, Moved, Procs};
use anyhow::{anyhow, bail, Result};
use mosix_proto::control::RestoreRequest;
use mosix_proto::wire::{self, ChunkWriter, CkptError, Hello, MigrateHeader, Tail};
use mosix_proto::NodeState;
use mosix_remote::wire::FdType;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

/// What a recovery needs.
pub struct RecoverSpec {
    pub pid: i32,
    pub uid: u32,
    pub owner: Owner,
    pub cmd: String,
    pub pinned: bool,
    pub avoid: Vec<u32>,
    pub migrations: u32,
    /// The checkpoint file and its number (the deputy's mark).
    pub path: PathBuf,
    pub number: u64,
    /// The residence it comes back as on the first node tried; each further node tried
    /// is given the next number (a node whose commit got no answer may run it: a copy of
    /// a residence that is not the one it ends with is ended when it links).
    pub epoch: u64,
    /// Where the restored process numbers its calls from.
    pub next_seq: u64,
    /// Its host that died.
    pub dead: u32,
}

/// Memory kept free beside a restored process (as transfer.rs keeps).
const RESTORE_MARGIN: u64 = 16 << 20;

impl Procs {
    /// Where a recovered process goes, best first: the least loaded node (per unit of
    /// speed) that is up, takes guests and is neither the dead one nor avoided, if it is
    /// less loaded than this one would be; then this node; then the others.
    pub(crate) fn recovery_targets(&self, avoid: &[u32], dead: u32) -> Vec<u32> {
        let nodes = self.nodes();
        let score = |n: &mosix_proto::NodeStatus| {
            n.load
                .as_ref()
                .map(|l| (l.runnable + 1.0) / (l.speed.max(0.01) * f64::from(l.cpus.max(1))))
                .unwrap_or(f64::MAX)
        };
        let here = nodes
            .iter()
            .find(|n| n.this_node)
            .map(score)
            .unwrap_or(f64::MAX);
        let mut others: Vec<(f64, u32)> = nodes
            .iter()
            .filter(|n| {
                !n.this_node
                    && n.state == NodeState::Up
                    && n.node != dead
                    && !avoid.contains(&n.node)
                    && n.load
                        .as_ref()
                        .is_none_or(|l| l.flags & mosix_proto::FLAG_ACCEPTS_GUESTS != 0)
            })
            .map(|n| (score(n), n.node))
            .collect();
        others.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut out: Vec<u32> = others.iter().filter(|o| o.0 < here).map(|o| o.1).collect();
        out.push(self.me());
        out.extend(others.iter().filter(|o| o.0 >= here).map(|o| o.1));
        out
    }

    /// Brings process `r.pid` back from its checkpoint (its deputy is back at its mark):
    /// the first node of [`Procs::recovery_targets`] that takes it runs it, as the residence
    /// returned.
    pub(crate) fn recover(&self, r: &RecoverSpec) -> Result<(Moved, u64), CkptError> {
        let o = ckptfile::open(&r.path, &r.owner).map_err(|e| CkptError::File(e.to_string()))?;
        if o.info.home_pid != r.pid || o.info.mark != Some(r.number) {
            return Err(CkptError::NotThatCheckpoint {
                path: r.path.display().to_string(),
                number: r.number,
            });
        }
        let mut last = CkptError::NoNode;
        for (i, to) in self
            .recovery_targets(&r.avoid, r.dead)
            .into_iter()
            .enumerate()
        {
            let t0 = Instant::now();
            let epoch = r.epoch + i as u64;
            match self.send_recovery(to, r, epoch, &o) {
                Ok(m) => {
                    info!(
                        pid = r.pid,
                        to,
                        ms = t0.elapsed().as_millis() as u64,
                        "recovered from {}",
                        r.path.display()
                    );
                    return Ok((m, epoch));
                }
                Err(e) => {
                    warn!(pid = r.pid, to, "recovery there failed: {e}");
                    last = CkptError::Move(e.to_string());
                }
            }
        }
        Err(last)
    }

    /// Sends the checkpoint's image to `to` as a migration from here, as residence
    /// `epoch`, and has it run there.
    fn send_recovery(
        &self,
        to: u32,
        r: &RecoverSpec,
        epoch: u64,
        o: &Opened,
    ) -> Result<Moved, MoveError> {
        let gone = |e: std::io::Error| MoveError::PeerGone {
            node: to,
            why: e.to_string(),
        };
        let mut ch = self
            .connect(to)
            .map_err(|e| MoveError::Destination(format!("{e:#}")))?;
        let header = MigrateHeader {
            home: self.me(),
            home_pid: r.pid,
            from: self.me(),
            epoch,
            uid: r.uid,
            cmd: r.cmd.clone(),
            pinned: r.pinned,
            avoid: r.avoid.clone(),
            migrations: r.migrations + 1,
            reason: format!("recovered from {}", r.path.display()),
            offer: None,
            hostname: mosix_ckpt::sys::hostname(),
            // The file is its owner's to edit: its flag is OR'd with its deputy's own (the
            // process at home, whose no_new_privs an exec does not clear).
            no_new_privs: o.info.no_new_privs || super::rights::no_new_privs(r.pid),
            shared_paths: self.shared_with(&[]),
        };
        wire::send(&mut ch, &Hello::Migrate(header)).map_err(gone)?;
        {
            let mut f = &o.file;
            f.seek(SeekFrom::Start(0)).map_err(gone)?;
            let mut cw = ChunkWriter::new(&mut ch);
            let n = std::io::copy(&mut f.take(o.image_len), &mut cw).map_err(gone)?;
            if n != o.image_len {
                return Err(MoveError::Engine(
                    "its checkpoint file was cut short".into(),
                ));
            }
            cw.finish().map_err(gone)?;
        }
        let tail = Tail {
            next_seq: r.next_seq,
            proc_fds: o.info.proc_fds.clone(),
            figures: Default::default(),
            // Its deputy's, put back to the checkpoint's mark (the image's is where it ran).
            cwd: super::transfer::cwd_of(r.pid),
        };
        ready(&mut ch, to, tail)?;
        // Its record says where it is going, before the commit: a mosixd that restarts
        // before the recovery is settled here takes it as done (its deputy is its deputy
        // either way), and if that copy never runs, no link comes from it and the job is
        // recovered again, as a newer residence still: never two copies. A commit that
        // gets no answer leaves it so (that node may run it): the next node tried, or a
        // recovery after a restart, counts from past this residence, and the copy here,
        // if any, is ended when it links.
        self.mark_leaving(r.pid, Some((to, epoch)));
        commit(&mut ch, to)?;
        Ok(Moved {
            to,
            frozen_ms: 0,
            memory_bytes: o.info.memory_bytes,
            rounds: Vec::new(),
        })
    }

    /// `mosrun -R FILE`: the calling process becomes the process of checkpoint FILE (read
    /// with its rights; only its own), a migratable process of this node with its PID and
    /// standard descriptors. Returns once it runs (the caller does not hear it: it is the
    /// restored process by then).
    pub fn restore_job(self: &Arc<Self>, peer: &Caller, req: RestoreRequest) -> Result<i32> {
        let (pid, pidfd) = super::home::caller_process(peer)?;
        if lock(&self.homes).contains_key(&pid) {
            bail!("process {pid} is a migratable process already");
        }
        // Its files are opened with the rights its connection showed (SO_PEERCRED,
        // SO_PEERGROUPS); the process it is now must still be that user's, or it would be
        // rebuilt with credentials it no longer has.
        let owner = peer.owner();
        let now = super::rights::Rights::of(pid);
        if !crate::peer::alive(&pidfd) {
            bail!("the calling process has gone");
        }
        let Some(now) = now else {
            bail!("the calling process has gone");
        };
        if now.uid.iter().any(|&u| u != peer.uid) {
            bail!("the calling process has changed its user");
        }
        let path = Path::new(&req.file);
        if !path.is_absolute() {
            bail!(
                "the checkpoint file must be an absolute path, not {}",
                req.file
            );
        }
        let o = ckptfile::open(path, &owner)?;
        // The trust rules of `mosix restart`, for the caller only: a checkpoint file that
        // someone else owns, or may write, is not believed.
        if o.file_uid != peer.uid {
            bail!(
                "{} belongs to uid {}: mosrun -R brings back only your own checkpoints",
                req.file,
                o.file_uid
            );
        }
        if o.file_mode & 0o022 != 0 {
            bail!(
                "{} may be written by others than its owner: it is not brought back",
                req.file
            );
        }
        if o.info.uid != peer.uid {
            bail!(
                "{} is a checkpoint of a process of uid {}: mosrun -R restores only as you",
                req.file,
                o.info.uid
            );
        }
        // The image goes to the restorer straight from the file, never whole into this
        // daemon's memory (a sparse file can claim any size); the restorer holds at most
        // `limit` bytes of it, and one larger is refused before anything is read.
        let limit = mosix_ckpt::memory_room().saturating_sub(RESTORE_MARGIN);
        if o.image_len > limit {
            bail!(
                "{}: its image ({}) is larger than the {} of memory free here",
                req.file,
                size(o.image_len),
                size(limit)
            );
        }
        // Its descriptors beyond the standard ones were held at its home: regular files
        // are reopened at their offsets, the others cannot come back.
        let mut reopen = Vec::new();
        for f in &o.info.fds {
            if f.fd <= 2 {
                continue;
            }
            match f.kind {
                FdType::File | FdType::Dir | FdType::Char => reopen.push((
                    f.fd,
                    f.path.clone(),
                    f.flags & !libc::O_CLOEXEC,
                    f.pos.unwrap_or(0),
                )),
                _ => bail!(
                    "its descriptor {} ({}) cannot be brought back (its other end is gone): only its standard input, output and error, files and devices are; start jobs with only those open",
                    f.fd,
                    f.path
                ),
            }
        }
        let cmd = o.info.cmd.clone();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "/usr/bin/false".into());
        // What it becomes if the rebuild fails after its exec: a program saying so.
        let fallback = (
            exe,
            vec![
                "mosix".to_string(),
                "__fail".to_string(),
                "mosrun: the restore failed after it had begun (see mosixd's log)".to_string(),
            ],
            Vec::new(),
        );
        let header = MigrateHeader {
            home: self.me(),
            home_pid: pid,
            from: self.me(),
            epoch: 0,
            uid: peer.uid,
            cmd: cmd.clone(),
            pinned: req.pinned,
            avoid: req.avoid.clone(),
            migrations: 0,
            reason: format!("restored from {}", req.file),
            offer: None,
            hostname: mosix_ckpt::sys::hostname(),
            // The file is the user's to edit: the flag it says is never all there is. The
            // caller's own (it cannot be cleared) goes on too.
            no_new_privs: o.info.no_new_privs || now.no_new_privs,
            shared_paths: self.shared_with(&[]),
        };
        let mut sup = supervisor::spawn()?;
        let start = SupStart {
            header,
            mode: SupMode::Into {
                pid,
                deputy: fallback,
                reopen,
            },
            limit,
            shared_paths: self.cfg.shared_paths.clone(),
            link: None,
            socket: self
                .cfg
                .state_dir
                .join("guests")
                .join(format!("restore-{pid}.sock")),
        };
        supervisor::send(&mut sup, &ToSup::Start(Box::new(start)))?;
        {
            let mut f = &o.file;
            f.seek(SeekFrom::Start(0))?;
            let mut cw = ChunkWriter::new(&mut sup);
            let n = std::io::copy(&mut f.take(o.image_len), &mut cw)?;
            if n != o.image_len {
                bail!("{} was cut short while it was read", req.file);
            }
            cw.finish()?;
        }
        wire::send_flush(
            &mut sup,
            &Tail {
                next_seq: 1,
                proc_fds: Vec::new(),
                figures: Default::default(),
                // Its working directory at home when it was saved (the image's is where it
                // ran, which away is not its home's; None in older files: the image's).
                cwd: o.info.cwd.clone(),
            },
        )?;
        match supervisor::recv::<FromSup>(&mut sup) {
            Ok(FromSup::Ready { .. }) => {}
            Ok(FromSup::Refused(why)) => bail!("{}: {why}", req.file),
            Ok(other) => bail!("its restorer answered {other:?}"),
            Err(e) => bail!("its restorer failed: {e}"),
        }
        // Rebuilt and held: it is a migratable process of this node from now on.
        let st = mosix_ckpt::procfs::stat_fields(pid)
            .map(|f| mosix_ckpt::procfs::field_u64(&f, 22))
            .map_err(|_| anyhow!("the calling process has gone"))?;
        let now = Instant::now();
        let mut j = super::home::HomeJob::new(self.me(), pid, peer.uid, cmd, now);
        j.pinned = req.pinned;
        j.avoid = req.avoid.clone();
        j.reason = format!("restored here from {}", req.file);
        let token = super::home::new_token();
        let mut rec = Record::new_for(&j, st, &token);
        rec.owner = Some(owner);
        let spec = req
            .checkpoint
            .clone()
            .unwrap_or(mosix_proto::control::CheckpointSpec {
                file: o.info.base.clone(),
                every_min: o.info.every_min,
            });
        // Numbered on after the files of that name there are (as the caller sees them).
        let next = ckptfile::next_free(Path::new(&spec.file), 1, &rec.owner.clone().expect("set"));
        rec.ckpt = Some(CkptRecord::of(&spec, next));
        self.write_record_of(&rec);
        self.start_driver(j, rec, token, None, pidfd)?;
        // Its private memory is put in while it runs: moves wait until it is all in.
        let home = lock(&self.homes).get(&pid).cloned();
        if let Some(h) = &home {
            h.send(super::job::Ev::Filling);
        }
        supervisor::send(&mut sup, &ToSup::Commit)?;
        match supervisor::recv::<FromSup>(&mut sup) {
            Ok(FromSup::Running) => {}
            other => warn!(pid, "its restorer did not confirm: {other:?}"),
        }
        std::thread::spawn(move || super::transfer::await_filled(sup, pid, home));
        info!(pid, uid = peer.uid, "restored from {}", req.file);
        Ok(pid)
    }
}

/// `n` bytes for a person: MiB below 10 GiB, else GiB.
fn size(n: u64) -> String {
    if n < 10 << 30 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30))
    }
}
