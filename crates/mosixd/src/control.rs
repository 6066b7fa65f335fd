//! The control socket: a Unix stream socket speaking `mosix_proto::control` (one JSON line
//! per request and per answer). Every connection's peer is identified with SO_PEERCRED;
//! read-only requests are open to every user; `migrate` checks the caller's uid against the
//! process owner (root may move any process, as in MOSIX: if you can kill it you can move
//! it); `register` makes the caller (mosrun, which then execs the program) a migratable
//! process. A deputy's `deputy` hello hands its connection over to its process's home
//! driver (binary frames, see `mosix_remote::wire`).

use crate::peer::Peer;
use crate::procs::Procs;
use crate::State;
use anyhow::{bail, Context, Result};
use mosix_proto::control::{Request, Response};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

/// Binds the control socket at `path`, replacing a stale socket file but refusing to steal
/// the socket of a daemon that still answers.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another mosixd is already listening on {} (stop it first)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))?;
    // Everyone may ask; what they may do is decided per request from SO_PEERCRED.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    info!(socket = %path.display(), "control socket ready");
    Ok(l)
}

/// The longest request line (a `run` carries argv and the environment; the kernel's own
/// limit for both is about 2 MiB of which a few KiB are usual).
pub const MAX_REQUEST: usize = 1 << 20;
/// How long a connection may stay without sending a whole request line.
pub const IDLE: Duration = Duration::from_secs(30);
/// Connections one user may have open at once (root: `MAX_CONN_ROOT`). A job's `mosrun`
/// stops counting once its job has started.
pub const MAX_CONN_PER_USER: usize = 64;
pub const MAX_CONN_ROOT: usize = 1024;

/// Open connections per uid.
#[derive(Default)]
pub struct ConnLimits {
    open: Mutex<HashMap<u32, usize>>,
}

/// One counted connection; uncounted when dropped.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    uid: u32,
}

impl ConnLimits {
    /// Counts a new connection of `uid`, or None if it has too many already.
    pub fn acquire(self: &Arc<Self>, uid: u32) -> Option<ConnSlot> {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid).or_insert(0);
        let cap = if uid == 0 {
            MAX_CONN_ROOT
        } else {
            MAX_CONN_PER_USER
        };
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            limits: self.clone(),
            uid,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut m = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, state: Arc<State>, procs: Arc<Procs>) {
    let limits = Arc::new(ConnLimits::default());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let st = state.clone();
                let pr = procs.clone();
                let lim = limits.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, st, pr, lim).await {
                        debug!("control connection ended: {e:#}");
                    }
                });
            }
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(
    mut stream: UnixStream,
    state: Arc<State>,
    procs: Arc<Procs>,
    limits: Arc<ConnLimits>,
) -> Result<()> {
    let peer = Peer::of(&stream)?;
    let uid = peer.uid;
    debug!(uid, pid = ?peer.pid, "control connection");
    let Some(_slot) = limits.acquire(uid) else {
        warn!(
            uid,
            "too many control connections of uid {uid}; refusing one"
        );
        let mut out = serde_json::to_vec(&Response::Error {
            message: format!(
                "too many connections of uid {uid} to mosixd at once (at most {MAX_CONN_PER_USER})"
            ),
        })?;
        out.push(b'\n');
        let _ = stream.write_all(&out).await;
        return Ok(());
    };
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut r).take(MAX_REQUEST as u64 + 1);
        let n = match tokio::time::timeout(IDLE, limited.read_until(b'\n', &mut line)).await {
            Ok(n) => n?,
            Err(_) => {
                debug!(uid, "control connection idle for {IDLE:?}; closed");
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
        let resp = if line.len() > MAX_REQUEST {
            Response::Error {
                message: format!("request too long (over {} KiB)", MAX_REQUEST >> 10),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(Request::Register(req)) => {
                    let pr = procs.clone();
                    let caller = crate::procs::home::Caller::of(&peer);
                    tokio::task::spawn_blocking(move || match pr.register(&caller, req) {
                        Ok(home_pid) => Response::Registered { home_pid },
                        Err(e) => Response::Error {
                            message: format!("{e:#}"),
                        },
                    })
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: format!("internal error: {e}"),
                    })
                }
                Ok(Request::Restore(req)) => {
                    let pr = procs.clone();
                    let caller = crate::procs::home::Caller::of(&peer);
                    tokio::task::spawn_blocking(move || match pr.restore_job(&caller, req) {
                        // Nobody hears it: the caller is the restored process by now.
                        Ok(home_pid) => Response::Registered { home_pid },
                        Err(e) => Response::Error {
                            message: format!("{e:#}"),
                        },
                    })
                    .await
                    .unwrap_or_else(|e| Response::Error {
                        message: format!("internal error: {e}"),
                    })
                }
                Ok(Request::Deputy {
                    home_pid,
                    token,
                    arena,
                }) => {
                    if !r.buffer().is_empty() {
                        bail!("a deputy sent data before its answer");
                    }
                    let stream = r.into_inner().reunite(w).context("control stream")?;
                    let std = stream.into_std().context("control stream")?;
                    std.set_nonblocking(false)?;
                    let pr = procs.clone();
                    return tokio::task::spawn_blocking(move || {
                        let mut s = std;
                        match s
                            .try_clone()
                            .map_err(anyhow::Error::from)
                            .and_then(|c| pr.deputy_hello(c, &peer, home_pid, &token, arena))
                        {
                            Ok(()) => Ok(()),
                            Err(e) => write_line(
                                &mut s,
                                &Response::Error {
                                    message: format!("{e:#}"),
                                },
                            ),
                        }
                    })
                    .await
                    .context("deputy hello")?;
                }
                Ok(
                    req @ (Request::Migrate { .. }
                    | Request::Where { .. }
                    | Request::Ps
                    | Request::Checkpoint { .. }
                    | Request::Freeze { .. }
                    | Request::Mosctl { .. }
                    | Request::ResolveMove { .. }),
                ) => {
                    let pr = procs.clone();
                    tokio::task::spawn_blocking(move || process_answer(&req, uid, &pr))
                        .await
                        .unwrap_or_else(|e| Response::Error {
                            message: format!("internal error: {e}"),
                        })
                }
                Ok(req) => answer(&req, uid, &state),
                Err(e) => Response::Error {
                    message: format!("bad request: {e}"),
                },
            }
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|e| {
            format!("{{\"type\":\"error\",\"message\":\"cannot encode answer: {e}\"}}").into()
        });
        out.push(b'\n');
        w.write_all(&out).await?;
        if line.len() > MAX_REQUEST {
            return Ok(());
        }
    }
}

use tokio::io::AsyncReadExt as _;

/// Writes one JSON answer line on a blocking stream.
fn write_line(s: &mut std::os::unix::net::UnixStream, resp: &Response) -> Result<()> {
    use std::io::Write as _;
    let mut out = serde_json::to_vec(resp)?;
    out.push(b'\n');
    s.write_all(&out)?;
    Ok(())
}

/// Requests about migratable processes (they may block: run off the async thread).
fn process_answer(req: &Request, uid: u32, procs: &Procs) -> Response {
    let r = match req {
        Request::Migrate { pid, to } => procs.migrate(*pid, *to, uid).map(|m| Response::Migrated {
            pid: *pid,
            to: m.to,
            frozen_ms: m.frozen_ms,
            memory_bytes: m.memory_bytes,
            rounds: m.rounds,
        }),
        Request::Checkpoint { pid, then } => {
            procs
                .checkpoint(*pid, *then, uid)
                .map(|d| Response::Checkpointed {
                    pid: *pid,
                    file: d.path,
                    frozen_ms: d.frozen_ms,
                    memory_bytes: d.memory_bytes,
                })
        }
        Request::Freeze { pid, freeze } => procs
            .freeze(*pid, *freeze, uid)
            .map(|frozen| Response::Frozen { pid: *pid, frozen }),
        Request::Where { pid } => procs
            .where_is(*pid)
            .map(|node| Response::Where { pid: *pid, node }),
        Request::Ps => Ok(Response::Ps {
            node: procs.cfg.node,
            procs: procs.ps(),
        }),
        Request::Mosctl { cmd } => procs.mosctl(cmd, uid).map(|m| Response::Mode {
            stay: m.stay,
            lstay: m.lstay,
            block: m.block,
            expel: m.expel,
        }),
        Request::ResolveMove {
            home,
            home_pid,
            epoch,
            to,
        } => {
            if uid != 0 {
                Err(anyhow::anyhow!(
                    "only a mover (root) may ask about a move in doubt"
                ))
            } else {
                procs
                    .resolve_move(*home, *home_pid, *epoch, *to)
                    .map(|committed| Response::Resolved { committed })
            }
        }
        _ => Err(anyhow::anyhow!("not a process request")),
    };
    r.unwrap_or_else(|e| Response::Error {
        message: format!("{e:#}"),
    })
}

fn answer(req: &Request, uid: u32, state: &State) -> Response {
    match req {
        Request::Ping => Response::Pong {
            node: state.node,
            version: env!("CARGO_PKG_VERSION").to_string(),
            peer_uid: uid,
        },
        Request::Status => Response::Status(state.status()),
        _ => Response::Error {
            message: "internal error: request routed wrongly".into(),
        },
    }
}

/// Removes the socket file at exit (only if it is still ours: same inode as bound).
pub fn unlink(path: &PathBuf) {
    let _ = std::fs::remove_file(path);
}
