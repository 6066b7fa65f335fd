//! `mosixd move`: the process that holds a leaving process frozen for the source's half
//! of a move. It freezes it (ptrace), saves it into its connection to mosixd (which
//! relays the image to the destination), keeps it frozen while the destination restores
//! it, and then ends it, turns it into its deputy, or lets it go on, as mosixd says.
//!
//! It is a process of its own, like a supervisor, because a frozen process must never
//! depend on mosixd staying alive: a tracer that dies lets its tracee run on from
//! wherever it was stopped, and in the middle of the calls injected to read its state
//! that is a crash. If mosixd dies, the mover finishes on its own: before the commit was
//! announced it lets the process go on where it was (the destination, whose link
//! dropped, drops its copy); once the commit was announced ([`ToMover::Committing`],
//! sent just before the destination is told to commit), it completes the move.

use super::home::DeputyExec;
use super::imagepipe::{
    give_way, offer_pipe, relay_chunks_marked, take_pipe, take_way, ImageOut, Marks, Sink, Way,
    WriteSide,
};
use mosix_proto::wire::{self, ChunkWriter};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use tracing::{info, warn};

/// A chunk length that no image has: the dump failed, a [`FromMover::Failed`] follows.
pub(super) const ABORTED: u32 = u32::MAX;
/// A chunk length that no image has, in a pre-copy stream: the process is frozen now for
/// its final state; mosixd settles its calls and answers [`ToMover::Quiesced`], then the
/// rest of the image follows.
pub(super) const FROZEN: u32 = u32::MAX - 1;

#[derive(Debug, Serialize, Deserialize)]
pub struct MoverStart {
    pub pid: i32,
    /// It runs away from home now (see [`mosix_ckpt::Leaving`]).
    pub away: bool,
    pub no_new_privs: Option<bool>,
    pub compression: mosix_ckpt::Compression,
    /// Save its memory while it runs (pre-copy rounds), freezing it only at the end.
    pub precopy: bool,
    /// Away: the PID of its supervisor, which keeps a userfaultfd of its memory at
    /// [`super::supervisor::UFFD_FD`] for pre-copy.
    pub supervisor: Option<i32>,
    /// Directories every node shares (a writable shared mapping of a file under them
    /// moves).
    pub shared: Vec<String>,
}

/// mosixd to mover.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToMover {
    Start(MoverStart),
    /// `mosrun -r/-b`: seize process `pid` before it execs its program and hold it at
    /// its exec (answers `Watching`, then `Execd`); a `Start` then moves it from its
    /// first instruction, anything else (or mosixd gone) lets it go.
    Watch {
        pid: i32,
    },
    /// Its calls at home are settled: those finished for it meanwhile (TID, result).
    Quiesced(Vec<(i32, i64)>),
    /// The move failed: let it go on here.
    Release,
    /// The destination is about to be told to commit. With the deputy's exec for a
    /// process leaving home (else it is ended here), and how to ask whether the
    /// destination runs it if mosixd goes away from now on (then the move is finished
    /// only if it does: doubt.rs).
    /// (None: no destination, as for `chkexit`: the move is finished.)
    Committing(Option<DeputyExec>, Option<InDoubt>),
    /// It runs there: finish (end it, or make it its deputy).
    Commit,
}

/// A move whose commit was announced: how its mover asks, if its mosixd goes away, that
/// the destination run its copy (a [`mosix_proto::control::Request::ResolveMove`] to the
/// restarted daemon's control socket).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InDoubt {
    pub socket: std::path::PathBuf,
    pub home: u32,
    pub home_pid: i32,
    pub epoch: u64,
    pub to: u32,
}

/// How long a mover whose mosixd went away during the commit waits for it to come back
/// and answer (less than the destination holds its copy: transfer::IN_DOUBT).
const ASK_FOR: std::time::Duration = std::time::Duration::from_secs(10);

impl InDoubt {
    /// For the move that `header` begins, to node `to`, asked through control socket
    /// `socket`.
    pub fn of(
        header: &mosix_proto::wire::MigrateHeader,
        socket: &std::path::Path,
        to: u32,
    ) -> Self {
        InDoubt {
            socket: socket.to_path_buf(),
            home: header.home,
            home_pid: header.home_pid,
            epoch: header.epoch,
            to,
        }
    }

    /// Whether the destination runs the process (asked through the restarted mosixd):
    /// false if it does not or cannot be reached; true also if mosixd does not answer in
    /// [`ASK_FOR`] (the move is then finished, as before there was a question: the
    /// destination was most likely told, the two writes being consecutive; a copy it did
    /// not get is lost, but never do two copies run).
    fn runs_there(&self) -> bool {
        let end = std::time::Instant::now() + ASK_FOR;
        let req = mosix_proto::control::Request::ResolveMove {
            home: self.home,
            home_pid: self.home_pid,
            epoch: self.epoch,
            to: self.to,
        };
        while std::time::Instant::now() < end {
            match self.ask(&req) {
                Ok(mosix_proto::control::Response::Resolved { committed }) => return committed,
                Ok(other) => {
                    warn!("asking whether node {} runs it: {other:?}", self.to);
                    return false;
                }
                // mosixd is not back yet.
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        warn!(
            "no answer from mosixd in {ASK_FOR:?}: taking it that node {} runs it",
            self.to
        );
        true
    }

    fn ask(
        &self,
        req: &mosix_proto::control::Request,
    ) -> std::io::Result<mosix_proto::control::Response> {
        use std::io::BufRead;
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
        let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        s.write_all(&line)?;
        let mut answer = String::new();
        std::io::BufReader::new(&s).read_line(&mut answer)?;
        serde_json::from_str(&answer).map_err(std::io::Error::other)
    }
}

/// Mover to mosixd. After `Frozen` come the image's chunks, then `Dumped` (or the
/// [`ABORTED`] mark and `Failed`). When the mover writes the image into the link itself,
/// its marks come here instead (`Frozen`; `Failed` or `LinkLost`).
#[derive(Debug, Serialize, Deserialize)]
pub enum FromMover {
    /// It is frozen: settle its calls at home (answer `Quiesced`).
    Frozen,
    /// Its memory is saved while it runs: the chunks begin now, and the [`FROZEN`] mark
    /// among them says when it is frozen.
    Rounds,
    Dumped {
        memory_bytes: u64,
        /// Bytes saved in each pre-copy round, the final (frozen) one last; empty for a
        /// move without pre-copy.
        rounds: Vec<u64>,
        /// With the link lent: the number of the link's next frame (mosixd goes on
        /// from it).
        sent: Option<u64>,
    },
    /// It could not be frozen or saved, and goes on where it was.
    Failed(String),
    /// Writing its image into the link failed (the link lent), and it goes on where it
    /// was.
    LinkLost(String),
    /// Finished: the signals that reached it meanwhile (to pass on, for a deputy).
    Done { signals: Vec<i32> },
    /// The exec into its deputy failed: it goes on here as it was.
    NoDeputy(String),
    /// Seized (`Watch`): it may exec now.
    Watching,
    /// It has exec'd its program and is held at its first instruction.
    Execd,
}

/// Our end of a mover.
pub struct Mover {
    conn: UnixStream,
    /// Whether it was told how its image is taken ([`Mover::dump`]): until then it waits
    /// for that, and touches nothing.
    way_given: bool,
}

fn engine(e: impl std::fmt::Display) -> super::MoveError {
    super::MoveError::Engine(e.to_string())
}

impl Mover {
    /// Starts a mover for `pid` (it is not frozen yet).
    pub fn start(start: MoverStart) -> Result<Mover, super::MoveError> {
        Mover::spawn()?.begin(start)
    }

    /// The mover process, not yet told what to do ([`Mover::begin`]): what can be done
    /// before the process is touched.
    pub fn spawn() -> Result<Mover, super::MoveError> {
        let conn = super::supervisor::spawn_helper("move")
            .map_err(|e| engine(format!("no mover: {e}")))?;
        Ok(Mover {
            conn,
            way_given: false,
        })
    }

    /// Tells a spawned mover to begin: it seizes the process at once.
    pub fn begin(mut self, start: MoverStart) -> Result<Mover, super::MoveError> {
        wire::send_flush(&mut self.conn, &ToMover::Start(start)).map_err(engine)?;
        Ok(self)
    }

    /// A mover that holds `pid` at its coming exec ([`ToMover::Watch`]); returns once it
    /// is seized.
    pub fn watch(pid: i32) -> Result<Mover, super::MoveError> {
        let mut m = Mover::spawn()?;
        m.send(&ToMover::Watch { pid })?;
        match m.recv()? {
            FromMover::Watching => Ok(m),
            FromMover::Failed(e) => Err(engine(e)),
            other => Err(engine(format!("its mover said {other:?}"))),
        }
    }

    /// Waits until the watched process has exec'd (held there by the mover).
    pub fn execd(&mut self) -> Result<(), super::MoveError> {
        let _ = self
            .conn
            .set_read_timeout(Some(std::time::Duration::from_secs(60)));
        let r = self.recv();
        let _ = self.conn.set_read_timeout(None);
        match r {
            Ok(FromMover::Execd) => Ok(()),
            Ok(FromMover::Failed(_)) => Err(super::MoveError::Ended),
            Ok(other) => Err(engine(format!("its mover said {other:?}"))),
            Err(_) => Err(engine("it did not start its program")),
        }
    }

    fn recv(&mut self) -> Result<FromMover, super::MoveError> {
        wire::expect(&mut self.conn).map_err(|e| engine(format!("its mover is gone: {e}")))
    }

    fn send(&mut self, m: &ToMover) -> Result<(), super::MoveError> {
        wire::send_flush(&mut self.conn, m).map_err(|e| engine(format!("its mover is gone: {e}")))
    }

    /// Freezes and saves it into `out` (chunks, not yet ended by the tail); `quiesce` is
    /// called once it is frozen. Returns the bytes of memory saved, those of each
    /// pre-copy round, and when it was frozen. On failure it goes on where it was.
    pub fn dump<W: ImageOut>(
        &mut self,
        out: &mut W,
        quiesce: &mut dyn FnMut() -> Result<Vec<(i32, i64)>, super::MoveError>,
    ) -> Result<Dumped, super::MoveError> {
        let mut frozen_at = None;
        let gone = |e: std::io::Error| engine(format!("its mover is gone: {e}"));
        // The pipe its image comes through, if any (else the connection).
        let mut image = take_pipe(&self.conn).map_err(gone)?;
        // Or the mover writes it into the link itself.
        let lent = out.lend();
        let to_link = lent.is_some();
        let way = match lent {
            Some((fd, key)) => Way::Link(fd, key),
            None => Way::Relay,
        };
        give_way(&self.conn, &way).map_err(gone)?;
        self.way_given = true;
        drop(way);
        if to_link {
            drop(image.take());
            return self.dump_lent(out, quiesce);
        }
        match self.recv()? {
            FromMover::Frozen => {
                frozen_at = Some(std::time::Instant::now());
                self.settle(quiesce)?;
            }
            FromMover::Rounds => {}
            FromMover::Failed(e) => return Err(super::MoveError::Engine(e)),
            other => return Err(engine(format!("its mover said {other:?}"))),
        }
        let mut ctl = self
            .conn
            .try_clone()
            .map_err(|e| engine(format!("its mover: {e}")))?;
        let mut settled: Result<(), super::MoveError> = Ok(());
        let mut out = WriteSide {
            w: out,
            failed: false,
        };
        let mut conn_side = &self.conn;
        let from: &mut dyn Read = match &mut image {
            Some(p) => p,
            None => &mut conn_side,
        };
        let relayed = relay_chunks_marked(from, &mut out, &mut || {
            frozen_at = Some(std::time::Instant::now());
            settled = match quiesce() {
                Ok(done) => wire::send_flush(&mut ctl, &ToMover::Quiesced(done))
                    .map_err(|e| engine(format!("its mover is gone: {e}"))),
                Err(e) => {
                    let _ = wire::send_flush(&mut ctl, &ToMover::Release);
                    Err(e)
                }
            };
            Ok(settled.is_ok())
        });
        settled?;
        let relayed = relayed.map_err(|e| {
            if out.failed {
                super::MoveError::LinkLost(e.to_string())
            } else {
                engine(format!("image I/O: {e}"))
            }
        })?;
        if !relayed {
            return match self.recv()? {
                FromMover::Failed(e) => Err(super::MoveError::Engine(e)),
                other => Err(engine(format!("its mover said {other:?}"))),
            };
        }
        match self.recv()? {
            FromMover::Dumped {
                memory_bytes,
                rounds,
                sent: None,
            } => Ok(Dumped {
                memory_bytes,
                rounds,
                frozen_at: frozen_at.unwrap_or_else(std::time::Instant::now),
            }),
            FromMover::Failed(e) => Err(super::MoveError::Engine(e)),
            other => Err(engine(format!("its mover said {other:?}"))),
        }
    }

    /// [`Mover::dump`] with the link lent to the mover: its marks come on its connection,
    /// and the link is taken back where the mover left it. On failure the link is not
    /// taken back (a frame may be half written): it can only be dropped.
    fn dump_lent<W: ImageOut>(
        &mut self,
        out: &mut W,
        quiesce: &mut dyn FnMut() -> Result<Vec<(i32, i64)>, super::MoveError>,
    ) -> Result<Dumped, super::MoveError> {
        let mut frozen_at = None;
        loop {
            match self.recv()? {
                FromMover::Rounds => {}
                FromMover::Frozen => {
                    frozen_at = Some(std::time::Instant::now());
                    self.settle(quiesce)?;
                }
                FromMover::Dumped {
                    memory_bytes,
                    rounds,
                    sent: Some(nonce),
                } => {
                    out.take_back(nonce)
                        .map_err(|e| super::MoveError::LinkLost(e.to_string()))?;
                    return Ok(Dumped {
                        memory_bytes,
                        rounds,
                        frozen_at: frozen_at.unwrap_or_else(std::time::Instant::now),
                    });
                }
                FromMover::Failed(e) => return Err(super::MoveError::Engine(e)),
                FromMover::LinkLost(e) => return Err(super::MoveError::LinkLost(e)),
                other => return Err(engine(format!("its mover said {other:?}"))),
            }
        }
    }

    fn settle(
        &mut self,
        quiesce: &mut dyn FnMut() -> Result<Vec<(i32, i64)>, super::MoveError>,
    ) -> Result<(), super::MoveError> {
        match quiesce() {
            Ok(done) => self.send(&ToMover::Quiesced(done)),
            Err(e) => {
                let _ = self.send(&ToMover::Release);
                Err(e)
            }
        }
    }

    /// Lets it go on here.
    pub fn release(mut self) {
        if !self.way_given {
            // Still waiting to hear how its image is taken: it ends when its connection
            // closes, having touched nothing.
            return;
        }
        if self.send(&ToMover::Release).is_ok() {
            let _ = self.recv();
        }
    }

    /// Announces the commit (see [`ToMover::Committing`]).
    pub fn committing(
        &mut self,
        deputy: Option<DeputyExec>,
        doubt: Option<InDoubt>,
    ) -> Result<(), super::MoveError> {
        self.send(&ToMover::Committing(deputy, doubt))
    }

    /// It runs there: ends it here or makes it its deputy. The signals that reached it.
    pub fn commit(mut self) -> Result<Vec<i32>, super::MoveError> {
        self.send(&ToMover::Commit)?;
        match self.recv()? {
            FromMover::Done { signals } => Ok(signals),
            FromMover::NoDeputy(e) => {
                Err(engine(format!("it could not become its deputy here: {e}")))
            }
            other => Err(engine(format!("its mover said {other:?}"))),
        }
    }
}

/// What a mover saved.
pub struct Dumped {
    pub memory_bytes: u64,
    /// Bytes of each pre-copy round (the final one last); empty without pre-copy.
    pub rounds: Vec<u64>,
    /// When it was frozen for the last time.
    pub frozen_at: std::time::Instant,
}

/// The mover process's main.
/// [`ToMover::Watch`]: seizes `pid` (its exec is reported), holds it at its exec, and
/// returns the `Start` that follows with the process about to stop before its first
/// instruction (interrupted, then continued: the freeze finds it stopping, traced by us
/// already); None if it ended or the move was given up (then it is let go).
fn hold_at_exec(conn: &mut UnixStream, pid: i32) -> anyhow::Result<Option<MoverStart>> {
    use mosix_ckpt::sys::{self, Stop};
    let opts =
        (libc::PTRACE_O_TRACEEXEC | libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE) as u64;
    if let Err(e) = sys::seize(pid, opts) {
        wire::send_flush(conn, &FromMover::Failed(e.to_string()))?;
        return Ok(None);
    }
    wire::send_flush(conn, &FromMover::Watching)?;
    loop {
        match sys::wait(pid) {
            Ok(Stop::Stopped { event, .. }) if event == libc::PTRACE_EVENT_EXEC => break,
            Ok(Stop::Stopped { sig, event: 0 }) => {
                // A signal for mosrun itself: passed on.
                let _ = sys::cont(pid, sig);
            }
            Ok(Stop::Stopped { .. }) => {
                let _ = sys::cont(pid, 0);
            }
            _ => {
                let _ = wire::send_flush(conn, &FromMover::Failed("it ended".into()));
                return Ok(None);
            }
        }
    }
    wire::send_flush(conn, &FromMover::Execd)?;
    match wire::expect::<_, ToMover>(conn) {
        Ok(ToMover::Start(s)) if s.pid == pid => {
            // Stops again (PTRACE_EVENT_STOP) on its way out of exec, before any
            // instruction of the program.
            sys::interrupt(pid)?;
            sys::cont(pid, 0)?;
            Ok(Some(s))
        }
        _ => {
            let _ = sys::detach(pid, 0);
            Ok(None)
        }
    }
}

pub fn main() -> i32 {
    // SAFETY: the descriptor is the connection mosixd gave us (see spawn_helper).
    let conn = unsafe { UnixStream::from_raw_fd(super::supervisor::CONN_FD) };
    match run(conn) {
        Ok(()) => 0,
        Err(e) => {
            warn!("mover: {e:#}");
            1
        }
    }
}

fn run(mut conn: UnixStream) -> anyhow::Result<()> {
    let start = match wire::expect::<_, ToMover>(&mut conn)? {
        ToMover::Start(s) => s,
        ToMover::Watch { pid } => match hold_at_exec(&mut conn, pid)? {
            Some(s) => s,
            None => return Ok(()),
        },
        other => anyhow::bail!("expected a start, got {other:?}"),
    };
    let pid = start.pid;
    // The image goes through a pipe of ours when mosixd takes it (else on `conn`), or
    // into the link, if mosixd lends it.
    let image = offer_pipe(&conn);
    let way = take_way(&conn)?;
    let leaving = mosix_ckpt::Leaving {
        away: start.away,
        no_new_privs: start.no_new_privs,
        shared: start.shared.clone(),
    };
    let mut ctl = conn.try_clone()?;
    // Where the image goes, and its marks (after what was written before them).
    let link_failed = std::rc::Rc::new(std::cell::Cell::new(false));
    let (data, mut marks) = match (way, image) {
        (Way::Link(fd, key), _) => (
            Sink::Link(
                Box::new(mosix_proto::transport::FrameWriter::new(
                    std::net::TcpStream::from(fd),
                    &key,
                )),
                link_failed.clone(),
            ),
            Marks::Told,
        ),
        (Way::Relay, Some(w)) => {
            let mark = std::fs::File::from(w.try_clone()?);
            (
                Sink::Ring(mosix_remote::splice::RingWriter::new(w)?),
                Marks::InBand(Sink::Pipe(mark)),
            )
        }
        (Way::Relay, None) => (
            Sink::Conn(conn.try_clone()?),
            Marks::InBand(Sink::Conn(conn.try_clone()?)),
        ),
    };
    // Pre-copy needs a tracker of its writes, made (or taken from its supervisor and
    // checked) before the rounds are announced: without one it moves frozen.
    let tracker = if start.precopy {
        let t = match start.supervisor {
            Some(sup) => supervisor_uffd(sup)
                .and_then(|u| Ok(mosix_ckpt::track_moving(pid, &leaving, Some(u))?)),
            None => mosix_ckpt::track_moving(pid, &leaving, None).map_err(anyhow::Error::from),
        };
        match t {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(pid, "pre-copy is off for this move, it moves frozen: {e:#}");
                None
            }
        }
    } else {
        None
    };
    // Whether mosixd reads chunks now (the rounds were announced, or it was frozen): a
    // failure then ends the chunk stream with the ABORTED mark before it is told; before,
    // it is told at once.
    let streaming = std::cell::Cell::new(false);
    let r = if let Some(tracker) = tracker {
        wire::send_flush(&mut conn, &FromMover::Rounds)?;
        streaming.set(true);
        let opts = mosix_ckpt::LiveOptions {
            compression: start.compression,
            ..Default::default()
        };
        mosix_ckpt::checkpoint_moving_live(
            pid,
            ChunkWriter::new(data),
            &leaving,
            &opts,
            tracker,
            &mut || {
                marks.frozen(&mut ctl)?;
                match wire::expect::<_, ToMover>(&mut ctl) {
                    Ok(ToMover::Quiesced(done)) => Ok(done),
                    _ => Err(mosix_ckpt::Error::Unrestorable(
                        "the move was abandoned".into(),
                    )),
                }
            },
            &mut |_| {},
            &mut |_, _| {},
        )
        .map(|(w, st, held)| {
            let mut rounds: Vec<u64> = st.rounds.iter().map(|r| r.bytes).collect();
            rounds.push(st.last.bytes);
            (w, st.memory_bytes, rounds, held)
        })
    } else {
        mosix_ckpt::checkpoint_moving_with(
            pid,
            ChunkWriter::new(data),
            start.compression,
            &leaving,
            &mut || {
                wire::send_flush(&mut ctl, &FromMover::Frozen)?;
                streaming.set(true);
                match wire::expect::<_, ToMover>(&mut ctl) {
                    Ok(ToMover::Quiesced(done)) => Ok(done),
                    _ => Err(mosix_ckpt::Error::Unrestorable(
                        "the move was abandoned".into(),
                    )),
                }
            },
            &mut |_, _| {},
        )
        .map(|(w, st, held)| (w, st.memory_bytes, Vec::new(), held))
    };
    // How its failure is told: the link's, or its own.
    let failure = |why: String| {
        if link_failed.get() {
            FromMover::LinkLost(why)
        } else {
            FromMover::Failed(why)
        }
    };
    let (cw, memory_bytes, rounds, held) = match r {
        Ok(x) => x,
        Err(e) => {
            // It goes on where it was (the engine let it go).
            if streaming.get() {
                marks.aborted();
            }
            let _ = wire::send_flush(&mut conn, &failure(e.to_string()));
            return Ok(());
        }
    };
    let sent = match cw.finish().and_then(Sink::finish) {
        Ok(sent) => sent,
        Err(e) => {
            held.release()?;
            if link_failed.get() {
                let _ = wire::send_flush(&mut conn, &failure(e.to_string()));
                return Ok(());
            }
            anyhow::bail!("the image could not be sent: {e}");
        }
    };
    wire::send_flush(
        &mut conn,
        &FromMover::Dumped {
            memory_bytes,
            rounds,
            sent,
        },
    )?;
    // The announced commit: the deputy's exec (if any), and how to ask if mosixd goes.
    let mut committing: Option<(Option<DeputyExec>, Option<InDoubt>)> = None;
    loop {
        match wire::recv::<_, ToMover>(&mut conn) {
            Ok(Some(ToMover::Committing(d, q))) => committing = Some((d, q)),
            Ok(Some(ToMover::Commit)) if committing.is_some() => break,
            Ok(Some(ToMover::Release)) => {
                held.release()?;
                let _ = wire::send_flush(&mut conn, &FromMover::Done { signals: vec![] });
                return Ok(());
            }
            Ok(Some(other)) => warn!(pid, "mover: unexpected {other:?}"),
            Ok(None) | Err(_) => {
                if let Some((_, Some(q))) = &committing {
                    // The destination may or may not have been told to commit: it runs
                    // its copy if it still holds it and we ask; then the move is done.
                    warn!(
                        pid,
                        "mosixd went away during the commit: asking node {} to run it", q.to
                    );
                    if q.runs_there() {
                        info!(pid, "node {} runs it: finishing the move", q.to);
                        break;
                    }
                    warn!(pid, "node {} does not run it: it goes on here", q.to);
                    held.release()?;
                    return Ok(());
                }
                if committing.is_some() {
                    warn!(
                        pid,
                        "mosixd went away during the commit: finishing the move"
                    );
                    break;
                }
                warn!(pid, "mosixd went away during the move: it goes on here");
                held.release()?;
                return Ok(());
            }
        }
    }
    match committing.and_then(|(d, _)| d) {
        None => {
            held.kill()?;
            let _ = wire::send_flush(&mut conn, &FromMover::Done { signals: vec![] });
        }
        Some(d) => match held.become_program(&d.path, &d.argv, &d.envp, &d.cloexec) {
            Ok(signals) => {
                let _ = wire::send_flush(&mut conn, &FromMover::Done { signals });
            }
            Err(b) => {
                // The copy there can do nothing without its deputy: it is ended when it
                // links (the job is still at home, see job.rs), and this one goes on.
                let (e, held) = *b;
                held.release()?;
                info!(pid, "the exec into its deputy failed: {e}");
                let _ = wire::send_flush(&mut conn, &FromMover::NoDeputy(e.to_string()));
            }
        },
    }
    Ok(())
}

/// The userfaultfd of a guest's memory that its supervisor `sup` keeps.
fn supervisor_uffd(sup: i32) -> anyhow::Result<std::os::fd::OwnedFd> {
    use anyhow::Context;
    use std::os::fd::AsRawFd;
    let pidfd = mosix_ckpt::sys::pidfd_open(sup)
        .with_context(|| format!("its supervisor {sup} cannot be reached"))?;
    mosix_ckpt::sys::pidfd_getfd(pidfd.as_raw_fd(), super::supervisor::UFFD_FD).with_context(|| {
        format!(
            "its supervisor {sup} keeps no userfaultfd at {}",
            super::supervisor::UFFD_FD
        )
    })
}
