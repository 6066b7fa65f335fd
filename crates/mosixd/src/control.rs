//! The control socket: a Unix stream socket speaking `mosix_proto::control` (one JSON line
//! per request and per answer). Every connection's peer is identified with SO_PEERCRED;
//! read-only requests are open to every user, later operations (migrate, ...) will check the
//! caller's uid against the process owner.

use crate::State;
use anyhow::{bail, Context, Result};
use mosix_proto::control::{Request, Response, MAX_LINE};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// Serves connections until the task is dropped.
pub async fn serve(listener: UnixListener, state: Arc<State>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let st = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, st).await {
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

async fn connection(stream: UnixStream, state: Arc<State>) -> Result<()> {
    let cred = stream.peer_cred().context("SO_PEERCRED")?;
    let uid = cred.uid();
    debug!(uid, pid = ?cred.pid(), "control connection");
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let resp = if line.len() > MAX_LINE {
            Response::Error {
                message: "request too long".into(),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
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
        if line.len() > MAX_LINE {
            return Ok(());
        }
    }
}

use tokio::io::AsyncReadExt as _;

fn answer(req: &Request, uid: u32, state: &State) -> Response {
    match req {
        Request::Ping => Response::Pong {
            node: state.node,
            version: env!("CARGO_PKG_VERSION").to_string(),
            peer_uid: uid,
        },
        Request::Status => Response::Status(state.status()),
    }
}

/// Removes the socket file at exit (only if it is still ours: same inode as bound).
pub fn unlink(path: &PathBuf) {
    let _ = std::fs::remove_file(path);
}
