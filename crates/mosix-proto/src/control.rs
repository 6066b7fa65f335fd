//! The control socket protocol between the CLI (or scripts) and the local `mosixd`.
//!
//! A Unix stream socket; each message is one line of JSON. The client writes a [`Request`],
//! the daemon answers with one [`Response`] line; a connection may carry several requests.
//! The daemon authorises by the peer's credentials (SO_PEERCRED). Unknown operations get a
//! [`Response::Error`], so older daemons answer newer CLIs with a clear message.

use crate::ClusterStatus;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The longest line either side accepts.
pub const MAX_LINE: usize = 4 << 20;

/// The last 8 bytes of a checkpoint file of a migratable job (`mosrun -C`): an image
/// followed by what home knew of the job (see mosixd's `procs/ckptfile.rs`).
pub const CHECKPOINT_MAGIC: &[u8; 8] = b"MOSXJOB\x01";

/// A request to the daemon. Room is kept for migrate/where/ps (issue 4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check; answered with [`Response::Pong`].
    Ping,
    /// The cluster as this node sees it; answered with [`Response::Status`].
    Status,
    /// Make the calling process a migratable process whose home is this node (`mosrun`,
    /// which then execs the program: its PID is the home PID). Answered with
    /// [`Response::Registered`].
    Register(RegisterRequest),
    /// A deputy (`mosix-deputy`, what a process away from home is at home) introduces
    /// itself; answered with [`Response::DeputyOk`], then the connection carries
    /// `mosix_remote::wire` frames.
    /// `arena`: it can take an arena for the data of writes behind (the answer then
    /// carries a memfd, mosix_remote::arena).
    Deputy {
        home_pid: i32,
        token: String,
        #[serde(default)]
        arena: bool,
    },
    /// Change this node's balancing mode (root only), as MOSIX's mosctl: `stay`,
    /// `nostay`, `lstay`, `nolstay`, `block`, `noblock`, `expel`, `noexpel`; `show` only
    /// reports. Answered with [`Response::Mode`].
    Mosctl { cmd: String },
    /// From a mover whose mosixd died after the commit of a move was announced to it and
    /// before (or after) the destination `to` was told to commit (root only): this
    /// daemon, restarted, asks `to` to run its held copy of residence `epoch` of process
    /// `home_pid` (home `home`) if it still holds it. Answered with
    /// [`Response::Resolved`]: whether it runs there now.
    ResolveMove {
        home: u32,
        home_pid: i32,
        epoch: u64,
        to: u32,
    },
    /// Move the process with this home PID to node `to` (0 = home). Answered with
    /// [`Response::Migrated`] once it runs there, or an error saying why not.
    Migrate { pid: i32, to: u32 },
    /// Where the process with this home PID runs: [`Response::Where`].
    Where { pid: i32 },
    /// This node's migratable processes, home and guests: [`Response::Ps`].
    Ps,
    /// `migrate PID checkpoint|chkstop|chkexit`: checkpoint the process with this home
    /// PID now (to its `mosrun -C` file, else `ckpt.PID` in its working directory), then
    /// let it go on, stop it, or end it. Answered with [`Response::Checkpointed`].
    Checkpoint { pid: i32, then: After },
    /// `migrate PID freeze|continue`: hold the process where it is (stopped, using no CPU,
    /// invisible to its parent's wait) or let it go on; `continue` also resumes a process
    /// stopped by `chkstop` or SIGSTOP. Answered with [`Response::Frozen`].
    Freeze { pid: i32, freeze: bool },
    /// `mosrun -R FILE`: the calling process (mosrun) becomes the process checkpointed in
    /// FILE, a migratable process of this node with mosrun's PID and standard descriptors.
    /// No answer on success (the caller is the restored process by then).
    Restore(RestoreRequest),
}

/// What becomes of a process after `migrate PID checkpoint|chkstop|chkexit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum After {
    /// It goes on (`checkpoint`).
    Continue,
    /// It is stopped, as by SIGSTOP (`chkstop`).
    Stop,
    /// It ends, killed once its image is safely written (`chkexit`).
    Exit,
}

/// `mosrun -C FILE [-A MINUTES]`: where a process's checkpoints go (FILE.1, FILE.2, ...,
/// the last few kept) and how often they are taken automatically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointSpec {
    /// FILE, an absolute path (mosrun makes it so, from its working directory).
    pub file: String,
    /// Minutes between automatic checkpoints (fractions allowed); none: only on request
    /// and when it leaves home.
    #[serde(default)]
    pub every_min: Option<f64>,
}

/// What `mosrun -R` asks for ([`Request::Restore`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The checkpoint file, an absolute path; read with the caller's rights.
    pub file: String,
    /// Checkpoints of the restored process (default: those of the checkpoint's own
    /// `mosrun -C`, numbered on from it).
    #[serde(default)]
    pub checkpoint: Option<CheckpointSpec>,
    /// Kept from automatic migration (`mosrun -L`), and nodes to avoid.
    #[serde(default)]
    pub pinned: bool,
    #[serde(default)]
    pub avoid: Vec<u32>,
}

/// What `mosrun` asks for the process it is about to become ([`Request::Register`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The program and its arguments (for `ps`).
    pub argv: Vec<String>,
    /// Move it at once: a node number, or none.
    #[serde(default)]
    pub to: Option<u32>,
    /// Move it at once to the best node (`mosrun -b`).
    #[serde(default)]
    pub best: bool,
    /// Keep it home (`mosrun -L`): no automatic migration.
    #[serde(default)]
    pub pinned: bool,
    /// Nodes it must never be sent to automatically.
    #[serde(default)]
    pub avoid: Vec<u32>,
    /// `mosrun -C FILE [-A MINUTES]`.
    #[serde(default)]
    pub checkpoint: Option<CheckpointSpec>,
}

/// One migratable process as `mosix ps` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcEntry {
    /// Home node and PID (what `where` and `migrate` take, on the home node).
    pub home: u32,
    pub home_pid: i32,
    /// Its PID on this node (differs from `home_pid` for guests).
    pub pid: i32,
    /// "home" (its home is this node) or "guest".
    pub role: String,
    /// Where it runs, MOSIX style: 0 = home, else the node number.
    pub where_: u32,
    /// running, migrating, away, ...
    pub state: String,
    pub uid: u32,
    pub cmd: String,
    /// Resident memory, bytes (0 when not on this node).
    pub rss: u64,
    /// CPU time used on this node, seconds.
    pub cpu_secs: f64,
    /// Seconds since it arrived where it is.
    pub resident_secs: f64,
    /// Why it is where it is.
    pub reason: String,
    /// Its parent at home (the shell that started it), if known.
    #[serde(default)]
    pub ppid: Option<i32>,
}

/// An answer from the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Pong {
        node: u32,
        /// Daemon version (crate version).
        version: String,
        /// The caller's uid as the daemon saw it through SO_PEERCRED.
        peer_uid: u32,
    },
    Status(ClusterStatus),
    Registered {
        home_pid: i32,
    },
    DeputyOk,
    Migrated {
        pid: i32,
        to: u32,
        /// How long the process was stopped by the move (ms).
        #[serde(default)]
        frozen_ms: u64,
        /// Bytes of memory contents moved.
        #[serde(default)]
        memory_bytes: u64,
        /// Bytes of memory sent in each pre-copy round (while it ran), the final round
        /// (while it was stopped) last; empty for a move without pre-copy.
        #[serde(default)]
        rounds: Vec<u64>,
    },
    Where {
        pid: i32,
        node: u32,
    },
    Ps {
        node: u32,
        procs: Vec<ProcEntry>,
    },
    Checkpointed {
        pid: i32,
        /// The image file written (FILE.N).
        file: String,
        /// How long the process was stopped for it (ms), and the bytes of memory saved.
        frozen_ms: u64,
        memory_bytes: u64,
    },
    Frozen {
        pid: i32,
        frozen: bool,
    },
    /// [`Request::ResolveMove`]: the process runs at the destination (else it was
    /// dropped there, or the destination could not be asked).
    Resolved {
        committed: bool,
    },
    Mode {
        stay: bool,
        lstay: bool,
        block: bool,
        expel: bool,
    },
    Error {
        message: String,
    },
}

/// Why a control request failed on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach mosixd at {path}: {err} (is mosixd running? see `mosixd --help`)")]
    Connect { path: String, err: std::io::Error },
    #[error("talking to mosixd at {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("mosixd at {path} closed the connection without answering")]
    Closed { path: String },
    #[error("mosixd at {path} sent an answer this CLI does not understand: {message}")]
    BadAnswer { path: String, message: String },
    #[error("mosixd refused: {0}")]
    Refused(String),
}

/// A connection to the control socket.
pub struct Client {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the control socket at `path`, with `timeout` for every read and write.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let p = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: p.clone(),
            err: source,
        })?;
        let io = |err| ClientError::Io {
            path: p.clone(),
            err,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Client {
            path: p,
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request and waits for its answer. A [`Response::Error`] becomes
    /// [`ClientError::Refused`].
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let io = |err| ClientError::Io {
            path: self.path.clone(),
            err,
        };
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::BadAnswer {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .map_err(|err| ClientError::Io {
                path: self.path.clone(),
                err,
            })?;
        if n == 0 {
            return Err(ClientError::Closed {
                path: self.path.clone(),
            });
        }
        match serde_json::from_slice::<Response>(&buf) {
            Ok(Response::Error { message }) => Err(ClientError::Refused(message)),
            Ok(r) => Ok(r),
            Err(e) => Err(ClientError::BadAnswer {
                path: self.path.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// Asks for the cluster status.
    pub fn status(&mut self) -> Result<ClusterStatus, ClientError> {
        match self.call(&Request::Status)? {
            Response::Status(s) => Ok(s),
            other => Err(ClientError::BadAnswer {
                path: self.path.clone(),
                message: format!("expected a status, got {other:?}"),
            }),
        }
    }
}

use std::io::Read as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"ping"}"#).unwrap(),
            Request::Ping
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"nope"}"#).is_err());
    }

    #[test]
    fn error_response_roundtrips() {
        let r = Response::Error {
            message: "no".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"type":"error","message":"no"}"#);
        assert_eq!(serde_json::from_str::<Response>(&s).unwrap(), r);
    }
}
