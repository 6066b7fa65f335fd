//! Checkpoints of migratable processes (`mosrun -C FILE -A MINUTES`, `migrate PID
//! checkpoint|chkstop|chkexit`) and freezing (`migrate PID freeze|continue`).
//!
//! - A process running at home is checkpointed by a mover ([`super::mover`]) into its file
//!   (FILE.N, [`super::ckptfile`]) while it is held; its descriptors are read then.
//! - Away, its host checkpoints it: a mover there holds it while its calls at home are
//!   settled (as for a move) and its deputy is told to mark the point ([`ToDeputy::Mark`]),
//!   and streams the image home on a connection of its own ([`Hello::Checkpoint`]); home
//!   writes it as the job's owner and, with the deputy's answer (its descriptors then),
//!   completes the file. Only then is the checkpoint one the job can be recovered from.
//! - `freeze`: a freezer process (`mosixd freeze`, where the process runs) holds it in a
//!   ptrace stop: no CPU, and its parent's wait sees nothing. If the freezer's mosixd goes
//!   away, the freezer lets it go on.
//!
//! The home side's bookkeeping (what is pending, which checkpoint the process can be
//! recovered from) is its driver's, in home.rs.

use super::ckptfile::{self, CkptInfo, Target};
use super::guest::Quiesced;
use super::mover::{Mover, MoverStart};
use super::rights::{no_new_privs, own_rights_only};
use super::{Link, MoveError, Procs};
use anyhow::{anyhow, Result};
use mosix_proto::control::After;
use mosix_proto::wire::{self, CkptEnd, CkptError, CkptHello, CkptVerdict, Hello, MigrateHeader};
use serde::{Deserialize, Serialize};
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// A checkpoint written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CkptDone {
    pub path: String,
    /// How long the process was stopped for it, and the bytes of memory saved.
    pub frozen_ms: u64,
    pub memory_bytes: u64,
}

/// The most bytes of image home takes from a host for one checkpoint.
const MAX_IMAGE: u64 = 1 << 40;
/// How long home waits for the last pieces of a checkpoint (the deputy's mark, the file
/// synced) once its image has come.
const FINISH_WAIT: Duration = Duration::from_secs(120);

/// A failure of the process's own (the engine's, the mover's), as a checkpoint's.
fn process(e: impl std::fmt::Display) -> CkptError {
    CkptError::Process(e.to_string())
}

/// A failure of the checkpoint's file.
fn file(e: std::io::Error) -> CkptError {
    CkptError::File(e.to_string())
}

fn stop_now(pid: i32) {
    // Queued while it is held: it stops before running another instruction of its own.
    let _ = mosix_ckpt::sys::kill(pid, libc::SIGSTOP);
}

/// The memory of `pid` its image may hold: resident plus swapped out, bytes (None: gone).
fn image_estimate(pid: i32) -> Option<u64> {
    let st = mosix_ckpt::procfs::status(pid).ok()?;
    let kb = |k: &str| -> Option<u64> { st.get(k)?.split_whitespace().next()?.parse().ok() };
    Some((kb("VmRSS")? + kb("VmSwap").unwrap_or(0)) << 10)
}

/// Bytes of memory held now by images of checkpoints taken on this host, waiting to be
/// sent to their homes (see [`Budget`]).
static BUFFERED: std::sync::Mutex<u64> = std::sync::Mutex::new(0);

/// Room in this host's memory for the image of one checkpoint, reserved until dropped:
/// all images held at once take at most a third of the memory free here.
struct Budget(u64);

impl Budget {
    /// `bytes` of room, if there is that much.
    fn reserve(bytes: u64) -> Option<Budget> {
        let mut held = super::lock(&BUFFERED);
        // Free memory counts what is held already as used: the third is of what is left.
        if held.saturating_add(bytes) > mosix_ckpt::memory_room() / 3 {
            return None;
        }
        *held += bytes;
        Some(Budget(bytes))
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        let mut held = super::lock(&BUFFERED);
        *held = held.saturating_sub(self.0);
    }
}

/// Where a checkpoint's image goes on its host: into a buffer of a fixed size reserved
/// beforehand (the process goes on before the image crosses the link), and if the image
/// is larger than that, the buffer and the rest straight into the link (the process is
/// then held until all of it is sent, as without a buffer). Never more memory than
/// reserved.
struct Spill<'a, W: Write> {
    buf: Vec<u8>,
    link: &'a mut W,
    spilled: bool,
}

impl<W: Write> Write for Spill<'_, W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if !self.spilled && self.buf.len() + data.len() <= self.buf.capacity() {
            self.buf.extend_from_slice(data);
            return Ok(data.len());
        }
        if !self.spilled {
            self.spilled = true;
            self.link.write_all(&self.buf)?;
            self.buf = Vec::new();
        }
        self.link.write(data)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.spilled {
            self.link.flush()?;
        }
        Ok(())
    }
}

/// Straight into the link (no buffer): the mover may write into it itself.
impl<W: super::imagepipe::ImageOut> super::imagepipe::ImageOut for Spill<'_, W> {
    fn lend(&mut self) -> Option<(std::os::fd::OwnedFd, mosix_proto::transport::LentKey)> {
        if self.spilled && self.buf.is_empty() {
            self.link.lend()
        } else {
            None
        }
    }
    fn take_back(&mut self, nonce: u64) -> std::io::Result<()> {
        self.link.take_back(nonce)
    }
}

/// The length of the whole chunks at the start of chunk stream `b`.
fn whole_chunks(b: &[u8]) -> usize {
    let mut at = 0;
    while at + 4 <= b.len() {
        let n = u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as usize;
        if n == 0 || at + 4 + n > b.len() {
            break;
        }
        at += 4 + n;
    }
    at
}

/// Ends a process held by its mover (`chkexit`, its image safely written).
fn end_held(pid: i32, mut m: Mover) {
    let r = m.committing(None, None).and_then(|_| m.commit());
    if let Err(e) = r {
        warn!(pid, "ending it after its checkpoint: {e}");
    }
}

impl Procs {
    /// Checkpoints process `pid` (running here, at home) into `target`, then lets it go
    /// on, stops it, or ends it (once the file is written). `info` is completed with its
    /// descriptors, read while it is held.
    pub(crate) fn checkpoint_at_home(
        &self,
        pid: i32,
        then: After,
        target: &Target,
        mut info: CkptInfo,
    ) -> Result<CkptDone, CkptError> {
        // A process with more rights than its user (a set-user-ID program) is not written
        // into its user's file: checked now, and again once it is held.
        let uid = info.uid;
        own_rights_only(pid, uid).map_err(process)?;
        let temp = target.create().map_err(file)?;
        // Saved while it runs when it is big enough (pre-copy rounds): frozen only for
        // what it wrote meanwhile and its state.
        let mut mover = match Mover::start(MoverStart {
            pid,
            away: false,
            no_new_privs: None,
            compression: self.cfg.compression,
            precopy: self.precopy(pid),
            supervisor: None,
            shared: self.shared_with(&[]),
        }) {
            Ok(m) => m,
            Err(e) => {
                target.discard(temp);
                return Err(process(e));
            }
        };
        let mut fds = Vec::new();
        let mut cwd = None;
        let mut out =
            mosix_proto::wire::Unchunk::new(BufWriter::with_capacity(1 << 20, &temp.file));
        let dumped = mover.dump(&mut out, &mut || {
            own_rights_only(pid, uid)?;
            // Held: its descriptors and directory do not change until it goes on.
            fds = ckptfile::home_fds(pid);
            cwd = super::transfer::cwd_of(pid);
            Ok(Vec::new())
        });
        let ended = out.ended();
        let flushed = out.into_inner().flush();
        let (memory_bytes, t0) = match (dumped, ended, flushed) {
            (Ok(d), true, Ok(())) => (d.memory_bytes, d.frozen_at),
            (Err(e), ..) => {
                target.discard(temp);
                return Err(process(e));
            }
            (_, false, _) => {
                mover.release();
                target.discard(temp);
                return Err(CkptError::CutShort);
            }
            (_, _, Err(e)) => {
                mover.release();
                target.discard(temp);
                return Err(CkptError::File(format!(
                    "writing {}: {e}",
                    target.path().display()
                )));
            }
        };
        info.no_new_privs = no_new_privs(pid);
        let mut frozen_ms = t0.elapsed().as_millis() as u64;
        let mut held = Some(mover);
        if then != After::Exit {
            if then == After::Stop {
                stop_now(pid);
            }
            if let Some(m) = held.take() {
                m.release();
            }
            frozen_ms = t0.elapsed().as_millis() as u64;
        }
        info.fds = fds;
        info.cwd = cwd;
        info.memory_bytes = memory_bytes;
        let saved = target.finish(temp, &info);
        if let Some(m) = held.take() {
            match &saved {
                // Safely written: it ends where it was saved.
                Ok(_) => end_held(pid, m),
                Err(_) => m.release(),
            }
            frozen_ms = t0.elapsed().as_millis() as u64;
        }
        let path = saved.map_err(file)?;
        info!(
            pid,
            frozen_ms,
            bytes = memory_bytes,
            "checkpoint {} written",
            path.display()
        );
        Ok(CkptDone {
            path: path.to_string_lossy().into_owned(),
            frozen_ms,
            memory_bytes,
        })
    }

    /// The host's half of checkpoint `id` of guest `pid` (its header `h`): held by a
    /// mover while `quiesce` settles its calls at home (and has its deputy mark the point),
    /// its image streamed to its home, then let go on, stopped, or ended (`kill`, once
    /// home has the image).
    pub(crate) fn checkpoint_guest(
        &self,
        pid: i32,
        h: &MigrateHeader,
        id: u64,
        then: After,
        quiesce: &mut dyn FnMut() -> Result<Quiesced, MoveError>,
        kill: &mut dyn FnMut(),
    ) -> Result<CkptDone, CkptError> {
        let leaving = mosix_ckpt::Leaving {
            away: true,
            no_new_privs: Some(h.no_new_privs),
            shared: self.shared_with(&h.shared_paths),
        };
        mosix_ckpt::check_moving(pid, &leaving)
            .map_err(|e| CkptError::Process(format!("it cannot be checkpointed: {e}")))?;
        let mut ch = self
            .connect(h.home)
            .map_err(|e| CkptError::NoHome(format!("{e:#}")))?;
        wire::send(
            &mut ch,
            &Hello::Checkpoint(CkptHello {
                home_pid: h.home_pid,
                epoch: h.epoch,
                node: self.me(),
                id,
            }),
        )
        .map_err(|e| CkptError::NoHome(e.to_string()))?;
        let supervisor = super::transfer::supervisor_of(pid);
        let precopy = supervisor.is_some() && self.precopy(pid);
        let mut mover = Mover::start(MoverStart {
            pid,
            away: true,
            no_new_privs: Some(h.no_new_privs),
            compression: self.cfg.compression,
            precopy,
            supervisor,
            shared: leaving.shared.clone(),
        })
        .map_err(process)?;
        let mut proc_fds = Vec::new();
        // With memory to spare here, the image is taken into memory and the process goes on
        // before it crosses the link: it is stopped for a copy, not for a transfer. The room
        // is reserved up front (its memory resident and swapped, and a little more for the
        // image's own records), against a budget shared by every checkpoint of this host.
        // With pre-copy its memory is saved while it runs: a buffer would gain nothing (and
        // the image can be larger than its memory), so it goes straight into the link.
        let budget = (!precopy)
            .then(|| image_estimate(pid))
            .flatten()
            .map(|m| m + m / 64 + (1 << 20))
            .and_then(|m| Budget::reserve(m).map(|b| (b, m)));
        let mut out = Spill {
            buf: Vec::with_capacity(budget.as_ref().map_or(0, |(_, m)| *m as usize)),
            link: &mut ch,
            // Without room here, straight into the link.
            spilled: budget.is_none(),
        };
        let dumped = mover.dump(&mut out, &mut || {
            let q = quiesce()?;
            proc_fds = q.proc_fds;
            Ok(q.completed)
        });
        // What is still to be sent once it goes on (none if it all went into the link).
        let held_image = (!out.spilled).then_some(out.buf);
        let (memory_bytes, t0) = match dumped {
            Ok(d) => (d.memory_bytes, d.frozen_at),
            Err(e) => {
                // The image stream ends here, and home hears why.
                if let Some(b) = &held_image {
                    // Whole chunks only (the mover marks a failure between chunks).
                    let _ = std::io::Write::write_all(&mut ch, &b[..whole_chunks(b)]);
                }
                let _ = std::io::Write::write_all(&mut ch, &0u32.to_le_bytes());
                let e = process(e);
                let _ = wire::send_flush(&mut ch, &CkptEnd::Failed(e.clone()));
                return Err(e);
            }
        };
        let mut held = Some(mover);
        if then != After::Exit {
            if then == After::Stop {
                stop_now(pid);
            }
            if let Some(m) = held.take() {
                m.release();
            }
        }
        let frozen_ms = t0.elapsed().as_millis() as u64;
        if let Some(b) = held_image {
            let sent = std::io::Write::write_all(&mut ch, &b);
            drop(b);
            drop(budget);
            if let Err(e) = sent {
                if let Some(m) = held.take() {
                    m.release();
                }
                return Err(CkptError::ImageLost(e.to_string()));
            }
        }
        let sent = wire::send_flush(
            &mut ch,
            &CkptEnd::Done {
                memory_bytes,
                frozen_ms,
                proc_fds,
                no_new_privs: h.no_new_privs,
            },
        );
        let verdict = sent.and_then(|_| wire::expect::<_, CkptVerdict>(&mut ch));
        let r = match verdict {
            Ok(CkptVerdict::Saved { path }) => Ok(CkptDone {
                path,
                frozen_ms,
                memory_bytes,
            }),
            Ok(CkptVerdict::Failed(why)) => Err(why),
            Err(e) => Err(CkptError::Unconfirmed(e.to_string())),
        };
        if let Some(m) = held.take() {
            if r.is_ok() {
                // Its supervisor is told first, so that it reports this end home.
                kill();
                end_held(pid, m);
            } else {
                m.release();
            }
        }
        r
    }

    /// Home's side of a checkpoint sent by the host of one of its processes: the image is
    /// written into the job's next file as its owner, completed with what the deputy said
    /// at the mark, and confirmed.
    pub(crate) fn checkpoint_in(self: &Arc<Self>, mut ch: Link, hello: CkptHello) -> Result<()> {
        let refuse = |ch: &mut Link, why: CkptError| -> Result<()> {
            let _ = wire::copy_chunks(ch, &mut std::io::sink(), MAX_IMAGE);
            let _ = wire::expect::<_, CkptEnd>(ch);
            wire::send_flush(ch, &CkptVerdict::Failed(why.clone()))?;
            Err(anyhow!(why))
        };
        let Some(h) = super::lock(&self.homes).get(&hello.home_pid).cloned() else {
            return refuse(
                &mut ch,
                CkptError::NoSuchProcess {
                    pid: hello.home_pid,
                },
            );
        };
        let (tx, rx) = mpsc::channel();
        h.send_home(super::home::HomeEv::CkptIncoming {
            id: hello.id,
            epoch: hello.epoch,
            node: hello.node,
            reply: tx,
        });
        let Ok(Some(target)) = rx.recv_timeout(Duration::from_secs(10)) else {
            return refuse(
                &mut ch,
                CkptError::Unexpected {
                    id: hello.id,
                    pid: hello.home_pid,
                },
            );
        };
        let temp = match target.create() {
            Ok(t) => t,
            Err(e) => return refuse(&mut ch, file(e)),
        };
        let copied = {
            let mut w = BufWriter::with_capacity(1 << 20, &temp.file);
            wire::copy_chunks(&mut ch, &mut w, MAX_IMAGE).and_then(|n| w.flush().map(|_| n))
        };
        let end = copied.and_then(|_| wire::expect::<_, CkptEnd>(&mut ch));
        let end = match end {
            Ok(CkptEnd::Done {
                memory_bytes,
                frozen_ms,
                proc_fds,
                no_new_privs,
            }) => Ok((memory_bytes, frozen_ms, proc_fds, no_new_privs)),
            Ok(CkptEnd::Failed(why)) => Err(why),
            Err(e) => Err(CkptError::ImageLost(format!(
                "it did not arrive whole: {e}"
            ))),
        };
        // What home adds (the deputy's descriptors at the mark), or why it cannot.
        let (itx, irx) = mpsc::channel();
        h.send_home(super::home::HomeEv::CkptImage {
            id: hello.id,
            failed: end.as_ref().err().cloned(),
            reply: itx,
        });
        let info = irx
            .recv_timeout(FINISH_WAIT)
            .unwrap_or(Err(CkptError::NotMarked));
        let r = match (end, info) {
            (Ok((memory_bytes, frozen_ms, proc_fds, nnp)), Ok(mut info)) => {
                info.proc_fds = proc_fds;
                info.no_new_privs = nnp;
                info.memory_bytes = memory_bytes;
                info.node = hello.node;
                target
                    .finish(temp, &info)
                    .map(|p| CkptDone {
                        path: p.to_string_lossy().into_owned(),
                        frozen_ms,
                        memory_bytes,
                    })
                    .map_err(file)
            }
            (Err(e), _) | (_, Err(e)) => {
                target.discard(temp);
                Err(e)
            }
        };
        let verdict = match &r {
            Ok(d) => {
                info!(
                    pid = hello.home_pid,
                    node = hello.node,
                    frozen_ms = d.frozen_ms,
                    bytes = d.memory_bytes,
                    "checkpoint {} written",
                    d.path
                );
                CkptVerdict::Saved {
                    path: d.path.clone(),
                }
            }
            Err(e) => CkptVerdict::Failed(e.clone()),
        };
        // The host hears first: it is done with it before anyone is told it is written.
        let sent = wire::send_flush(&mut ch, &verdict);
        h.send_home(super::home::HomeEv::CkptSaved {
            id: hello.id,
            result: r,
        });
        sent?;
        Ok(())
    }
}

// ----- freezing: `mosixd freeze`

#[derive(Debug, Serialize, Deserialize)]
enum FromFreezer {
    Frozen,
    Failed(String),
    Released,
}

/// A freezer process holding a process frozen.
pub struct Freezer {
    conn: UnixStream,
}

impl Freezer {
    /// Freezes process `pid` (every thread) in a freezer process of its own.
    pub fn start(pid: i32) -> Result<Freezer, CkptError> {
        let mut conn = super::supervisor::spawn_helper("freeze")
            .map_err(|e| CkptError::Freeze(format!("no freezer: {e}")))?;
        wire::send_flush(&mut conn, &pid)
            .map_err(|e| CkptError::Freeze(format!("its freezer is gone: {e}")))?;
        match wire::expect::<_, FromFreezer>(&mut conn) {
            Ok(FromFreezer::Frozen) => Ok(Freezer { conn }),
            Ok(FromFreezer::Failed(e)) => Err(CkptError::Freeze(e)),
            Ok(other) => Err(CkptError::Freeze(format!("its freezer said {other:?}"))),
            Err(e) => Err(CkptError::Freeze(format!("its freezer is gone: {e}"))),
        }
    }

    /// Lets it go on.
    pub fn release(mut self) {
        if wire::send_flush(&mut self.conn, &0u8).is_ok() {
            let _ = wire::expect::<_, FromFreezer>(&mut self.conn);
        }
    }
}

/// The freezer process's main: freezes the PID it is given and holds it until told (or
/// until its connection to mosixd ends); if the process dies meanwhile, it exits.
pub fn freezer_main() -> i32 {
    // SAFETY: the descriptor is the connection mosixd gave us (see spawn_helper).
    let mut conn = unsafe { UnixStream::from_raw_fd(super::supervisor::CONN_FD) };
    let Ok(pid) = wire::expect::<_, i32>(&mut conn) else {
        return 1;
    };
    let held = match mosix_ckpt::freeze_held(pid) {
        Ok(h) => h,
        Err(e) => {
            let _ = wire::send_flush(&mut conn, &FromFreezer::Failed(e.to_string()));
            return 0;
        }
    };
    if wire::send_flush(&mut conn, &FromFreezer::Frozen).is_err() {
        let _ = held.release();
        return 0;
    }
    let Ok(pidfd) = mosix_ckpt::sys::pidfd_open(pid) else {
        let _ = held.release();
        return 0;
    };
    loop {
        let mut fds = [
            libc::pollfd {
                fd: conn.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two descriptors we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            // It was killed while frozen: our exit hands its end to its parent.
            std::mem::forget(held);
            return 0;
        }
        if fds[0].revents != 0 {
            // Told to let it go, or mosixd went away: either way it goes on.
            let r = held.release();
            if let Err(e) = &r {
                warn!(pid, "letting it go on: {e}");
            }
            let _ = wire::send_flush(&mut conn, &FromFreezer::Released);
            return 0;
        }
    }
}

/// A writer that passes everything on to `a` and a copy to a checkpoint file being
/// written (as a chunk stream, unchunked into it); a failure of the file only drops it.
pub(crate) struct Tee<'a, A: Write, F: Write> {
    a: &'a mut A,
    b: Option<mosix_proto::wire::Unchunk<F>>,
    ok: bool,
}

impl<'a, A: Write, F: Write> Tee<'a, A, F> {
    pub fn new(a: &'a mut A, b: Option<mosix_proto::wire::Unchunk<F>>) -> Self {
        let ok = b.is_some();
        Tee { a, b, ok }
    }

    /// Whether the copy is whole (and flushed).
    pub fn finish(self) -> bool {
        match self.b {
            Some(mut u) => self.ok && u.flush().is_ok() && u.ended(),
            None => false,
        }
    }
}

/// Without a copy to keep, the mover may write into the link itself.
impl<A: super::imagepipe::ImageOut, F: Write> super::imagepipe::ImageOut for Tee<'_, A, F> {
    fn lend(&mut self) -> Option<(std::os::fd::OwnedFd, mosix_proto::transport::LentKey)> {
        if self.b.is_none() {
            self.a.lend()
        } else {
            None
        }
    }
    fn take_back(&mut self, nonce: u64) -> std::io::Result<()> {
        self.a.take_back(nonce)
    }
}

impl<A: Write, F: Write> Write for Tee<'_, A, F> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.a.write(data)?;
        if let Some(b) = &mut self.b {
            if let Err(e) = b.write_all(&data[..n]) {
                warn!("a checkpoint written with a move: {e}");
                self.b = None;
                self.ok = false;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(b) = &mut self.b {
            if b.flush().is_err() {
                self.b = None;
                self.ok = false;
            }
        }
        self.a.flush()
    }
}
