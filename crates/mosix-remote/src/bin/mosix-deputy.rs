//! `mosix-deputy`: what a migratable process becomes at home while it runs on another
//! node. Not run by hand: mosixd makes a frozen process exec it (keeping its PID,
//! descriptors, cwd, credentials), with `MOSIX_DEPUTY` in its environment:
//!
//! - `sock=PATH;pid=PID;token=T`: connect to the local mosixd's control socket and say so
//!   (reconnecting whenever the connection breaks);
//! - `conn=FD`: the connection is descriptor FD already (tests); `arena=FD` with it: the
//!   arena is descriptor FD (tests);
//! - `cloexec=A,B,..`: the process's descriptors that were close-on-exec (cleared for
//!   this exec, set again here);
//! - `closed=A,..`: standard descriptors the process did not have open (the runtime may
//!   have opened /dev/null on them: closed again);
//! - `mark=N`: its image of this move is checkpoint N: mark it (see `marks.rs`) at once.
//!
//! and `MOSIX_HOME_MEMORY=A,B,..` ([`deputy::HOLD_ENV`]), the descriptors of the
//! memory the process shares with other processes here, which it holds while the process
//! is away (never the process's own descriptors: its calls cannot touch them).

use mosix_remote::deputy::{self, Deputy};
use std::io::Write;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

struct Conf {
    sock: Option<String>,
    pid: i32,
    token: String,
    conn: Option<i32>,
    arena: Option<i32>,
    cloexec: Vec<i32>,
    closed: Vec<i32>,
    mark: Option<u64>,
}

fn parse(v: &str) -> Conf {
    let mut c = Conf {
        sock: None,
        pid: 0,
        token: String::new(),
        conn: None,
        arena: None,
        cloexec: Vec::new(),
        closed: Vec::new(),
        mark: None,
    };
    let list = |s: &str| s.split(',').filter_map(|x| x.parse().ok()).collect();
    for kv in v.split(';') {
        let (k, val) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "sock" => c.sock = Some(val.to_string()),
            "pid" => c.pid = val.parse().unwrap_or(0),
            "token" => c.token = val.to_string(),
            "conn" => c.conn = val.parse().ok(),
            "arena" => c.arena = val.parse().ok(),
            "cloexec" => c.cloexec = list(val),
            "closed" => c.closed = list(val),
            "mark" => c.mark = val.parse().ok(),
            _ => {}
        }
    }
    c
}

/// Connects to mosixd and introduces itself; the connection, moved out of the process's
/// descriptor numbers, and the arena mosixd gave it for the data of writes behind (asked
/// for while `*arena_ok`; if it cannot be mapped, not asked for again: this connection
/// is dropped and the next one goes without).
fn connect(c: &Conf, path: &str, arena_ok: &mut bool) -> std::io::Result<Connected> {
    let s = UnixStream::connect(path)?;
    mosix_remote::wire::roomy(&s);
    let fd = deputy::move_high(s.into_raw_fd())?;
    // SAFETY: `fd` is the connection we just moved; we own it.
    let mut s = unsafe { UnixStream::from_raw_fd(fd) };
    writeln!(
        s,
        "{{\"op\":\"deputy\",\"home_pid\":{},\"token\":\"{}\",\"arena\":{}}}",
        c.pid, c.token, arena_ok
    )?;
    // Read the answer byte by byte: nothing of the frames after it may be taken.
    let (line, fd) = mosix_remote::arena::recv_line_with_fd(&s)?;
    match Answer::of(&line) {
        Answer::Taken => {}
        Answer::Later(why) => return Err(std::io::Error::other(why)),
        Answer::Refused(why) => return Err(std::io::Error::other(Refused(why))),
    }
    let arena = match fd.map(|fd| mosix_remote::arena::ArenaMap::open(&fd)) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => {
            *arena_ok = false;
            return Err(std::io::Error::other(format!("cannot map the arena: {e}")));
        }
    };
    Ok((s, arena))
}

type Connected = (
    UnixStream,
    Option<std::sync::Arc<mosix_remote::arena::ArenaMap>>,
);

/// mosixd's refusal of this deputy (as the error [`connect`] returns).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// What mosixd answered a deputy's hello.
#[derive(Debug, PartialEq)]
enum Answer {
    Taken,
    /// Try again: mosixd, restarted, is still finding its process again, or it went away
    /// before it answered (killed, or restarting: the connection ended with no answer).
    Later(String),
    /// It will not take this deputy (it is not the process's, or the process is not
    /// known there): the process ends.
    Refused(String),
}

impl Answer {
    fn of(line: &str) -> Answer {
        if line.contains("\"deputy_ok\"") {
            Answer::Taken
        } else if line.contains(deputy::NOT_YET) {
            Answer::Later(line.trim().to_string())
        } else if line.trim().is_empty() {
            Answer::Later("mosixd went away before it answered".into())
        } else {
            Answer::Refused(format!("mosixd did not take this deputy: {}", line.trim()))
        }
    }
}

fn main() {
    mosix_remote::keep_heap();
    let Ok(v) = std::env::var("MOSIX_DEPUTY") else {
        eprintln!(
            "mosix-deputy: this program is what a migrated process becomes at home; mosixd runs it, not you"
        );
        std::process::exit(2);
    };
    let c = parse(&v);
    for &fd in &c.closed {
        // SAFETY: closing a standard descriptor the process did not have.
        unsafe { libc::close(fd) };
    }
    for &fd in &c.cloexec {
        // SAFETY: setting FD_CLOEXEC on the process's own descriptor.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let held = std::env::var(deputy::HOLD_ENV).unwrap_or_default();
    for fd in held.split(',').filter_map(|x| x.parse::<i32>().ok()) {
        deputy::add_private(fd);
        // SAFETY: setting FD_CLOEXEC on a descriptor we were given to hold.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let mut d = match Deputy::start() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("mosix-deputy: {e}");
            std::process::exit(1);
        }
    };
    if let Some(id) = c.mark {
        // Nothing of the process has run since its image was made: this is its state then.
        d.mark(id);
    }
    if let Some(fd) = c.conn {
        deputy::add_private(fd);
        // SAFETY: the harness gave us this connected socket as descriptor `fd`.
        let s = unsafe { UnixStream::from_raw_fd(fd) };
        let arena = c.arena.and_then(|fd| {
            // SAFETY: the harness gave us the arena as descriptor `fd`; we own it.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            mosix_remote::arena::ArenaMap::open(&fd).ok()
        });
        d.serve(s, arena);
        // The supervisor is gone, and so is the process.
        deputy::end_as(mosix_remote::wire::ExitStatus::Signal(libc::SIGKILL));
    }
    let Some(path) = c.sock.clone() else {
        eprintln!("mosix-deputy: MOSIX_DEPUTY names no socket");
        std::process::exit(2);
    };
    let mut arena_ok = true;
    loop {
        match connect(&c, &path, &mut arena_ok) {
            Ok((s, arena)) => {
                let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
                d.serve(s, arena);
                deputy::remove_private(fd);
            }
            Err(e) => {
                if e.get_ref().is_some_and(|i| i.is::<Refused>()) {
                    eprintln!("mosix-deputy: {e}");
                    deputy::end_as(mosix_remote::wire::ExitStatus::Signal(libc::SIGKILL));
                }
            }
        }
        // mosixd is restarting: the process waits in its call meanwhile.
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a real refusal ends the process; a daemon that went away before it answered
    /// (seen in a fault run: its mosixd was killed as the deputy said hello) is tried
    /// again, as one that is restarting.
    #[test]
    fn only_a_refusal_ends_the_deputy() {
        assert_eq!(Answer::of("{\"type\":\"deputy_ok\"}\n"), Answer::Taken);
        assert!(matches!(Answer::of(""), Answer::Later(_)));
        assert!(matches!(Answer::of("\n"), Answer::Later(_)));
        let not_yet = format!("{{\"error\":\"process 7 is {}\"}}\n", deputy::NOT_YET);
        assert!(matches!(Answer::of(&not_yet), Answer::Later(_)));
        assert!(matches!(
            Answer::of("{\"error\":\"that is not the deputy of process 7\"}\n"),
            Answer::Refused(_)
        ));
    }
}
