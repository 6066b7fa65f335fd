//! Errors of the checkpoint engine. Every variant renders as one line that says what
//! failed and why.

use std::io;

/// What can go wrong while checking, checkpointing or restoring a process.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process cannot be checkpointed faithfully; every reason is listed.
    #[error("process {pid} cannot be checkpointed: {}", .reasons.join("; "))]
    Refused { pid: i32, reasons: Vec<String> },
    /// No such process (or it went away).
    #[error("no process {0}")]
    NoProcess(i32),
    /// The image is damaged, truncated, foreign or of a newer version.
    #[error("bad image: {0}")]
    BadImage(String),
    /// The image is fine but cannot be restored here (file changed, kernel differs, ...).
    #[error("cannot restore: {0}")]
    Unrestorable(String),
    /// The restore would give the process credentials it may not have (see
    /// [`crate::CredPolicy`]); nothing was started.
    #[error("not permitted: {0}")]
    Forbidden(String),
    /// No such user in this machine's user database.
    #[error("no user {0} on this machine")]
    NoUser(String),
    /// A path of the image cannot be opened with the credentials of the process being
    /// restored (as uid `uid`); nothing keeps running.
    #[error("cannot open {path} as uid {uid}: {}", io::Error::from_raw_os_error(*.errno))]
    Open { path: String, uid: u32, errno: i32 },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
    /// An injected system call in the target process failed.
    #[error("{what} in process {pid} failed: {}", io::Error::from_raw_os_error(*.errno))]
    Remote { pid: i32, what: String, errno: i32 },
    /// The target stopped or died unexpectedly while we were working on it.
    #[error("process {pid}: {msg}")]
    Target { pid: i32, msg: String },
    /// Reading or writing the image stream failed.
    #[error("image I/O: {0}")]
    Io(#[from] io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Wraps the last OS error with a description of what was attempted.
pub(crate) fn sys(what: impl Into<String>) -> Error {
    Error::Sys {
        what: what.into(),
        source: io::Error::last_os_error(),
    }
}

pub(crate) fn sys_err(what: impl Into<String>, source: io::Error) -> Error {
    Error::Sys {
        what: what.into(),
        source,
    }
}

pub(crate) fn bad(msg: impl Into<String>) -> Error {
    Error::BadImage(msg.into())
}
