//! A guest's two ways (its link home, its supervisor's connection) and the thread that
//! reads its supervisor: the deputy's frames go home from there, a write's data from the
//! supervisor's arena (mosix_remote::arena) too; the rest goes to the guest's driver.

use super::guest::GuestEv;
use super::supervisor::{self, FromSup, ToSup};
use super::{lock, Link};
use mosix_proto::wire::{self, ToHome};
use mosix_remote::arena::ArenaView;
use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;
use std::sync::Mutex;
use tracing::{debug, warn};

/// Reads the supervisor at `r` until its connection ends (then its driver hears
/// `SupGone`).
pub(super) fn read_supervisor(mut r: UnixStream, ways: &Ways, tx: &Sender<GuestEv>) {
    // The supervisor's arena, once it told of it.
    let mut arena = None;
    loop {
        match FromSup::recv(&mut r) {
            Ok(FromSup::Deputy(f)) => ways.home(ToHome::Deputy(f)),
            Ok(FromSup::Arena {
                pid,
                fd,
                cap,
                token,
            }) => {
                arena = open_arena(pid, fd, cap, token);
                if arena.is_some() {
                    ways.sup(&ToSup::ArenaTaken);
                }
            }
            Ok(FromSup::DeputyInArena {
                seq,
                head,
                at,
                len,
                tail,
            }) => {
                let Some(a) = arena.as_ref() else {
                    // Sent to the mosixd before us (we restarted), and our mapping of the
                    // arena failed: the supervisor sends its waiting calls and writes
                    // again (home makes each once, by its number), through its socket,
                    // since we never said we mapped the arena.
                    warn!("a write's data in an arena we could not map: asking for it again");
                    ways.sup(&ToSup::Relinked);
                    continue;
                };
                let Some(data) = a.slice(at, len) else {
                    // Never told of bytes outside it: the supervisor is not ours.
                    warn!("a write's data outside the supervisor's arena: dropping it");
                    let _ = tx.send(GuestEv::SupGone);
                    return;
                };
                ways.home_parts(&[&head, data, &tail]);
                a.taken(seq);
                crate::metrics::arena_bytes(len);
            }
            Ok(m) => {
                if tx.send(GuestEv::FromSup(m)).is_err() {
                    return;
                }
            }
            Err(_) => {
                let _ = tx.send(GuestEv::SupGone);
                return;
            }
        }
    }
}

/// The two ways of a guest's messages, each used by the thread that reads the other end
/// (a frame between the process's supervisor and its deputy crosses no other thread) and
/// by the driver. Each has its own lock: a way waits only for its own reader, and the
/// supervisor never waits to read (see supervisor.rs, Outbox).
pub(super) struct Ways {
    pub(super) home: Mutex<HomeWay>,
    pub(super) sup: Mutex<UnixStream>,
}

/// The link to its home, and what waits for it.
pub(super) struct HomeWay {
    pub(super) link: Option<Link>,
    pub(super) to_home: VecDeque<ToHome>,
    /// The link was down (or mosixd restarted): the supervisor resends once it is up.
    pub(super) relink: bool,
}

/// The arena of supervisor `pid` (its descriptor `fd`), which we started: it is in our
/// PID namespace. Its token makes sure it is the arena told of.
fn open_arena(pid: i32, fd: i32, cap: u64, token: u64) -> Option<ArenaView> {
    ArenaView::open(pid, fd, cap, token)
        .inspect_err(|e| warn!(pid, "the supervisor's arena cannot be used: {e}"))
        .ok()
}

impl Ways {
    /// The deputy's frame made of `parts` (a write's data in the supervisor's arena
    /// between its other bytes), sent home: copied once, into the link's frames (or, when
    /// the link is down, into a frame that waits for it).
    fn home_parts(&self, parts: &[&[u8]]) {
        let mut w = lock(&self.home);
        let sent = w.send_now(|l| {
            wire::send_frame_parts(l, ToHome::DEPUTY, parts).and_then(|()| std::io::Write::flush(l))
        });
        if !sent {
            w.queue(ToHome::Deputy(parts.concat().into()));
        }
    }

    pub(super) fn home(&self, m: ToHome) {
        let mut w = lock(&self.home);
        if !w.send_now(|l| wire::send_flush(l, &m)) {
            w.queue(m);
        }
    }

    pub(super) fn sup(&self, m: &ToSup) {
        let mut s = lock(&self.sup);
        let r = match m {
            ToSup::Deputy(f) => wire::send_frame(&mut *s, ToSup::DEPUTY, f),
            m => supervisor::send(&mut s, m),
        };
        if let Err(e) = r {
            debug!("to the supervisor: {e}");
        }
    }
}

impl HomeWay {
    /// Sends at once with `send` when nothing waits and the link is up: whether it went
    /// (a link that fails is dropped, to be made again).
    fn send_now(&mut self, send: impl FnOnce(&mut Link) -> std::io::Result<()>) -> bool {
        if !self.to_home.is_empty() {
            return false;
        }
        let Some(l) = &mut self.link else {
            return false;
        };
        if send(l).is_ok() {
            return true;
        }
        self.link = None;
        self.relink = true;
        false
    }

    /// Keeps `m` for the link (at most 4096 wait: the oldest goes), and sends what it
    /// can.
    fn queue(&mut self, m: ToHome) {
        self.to_home.push_back(m);
        if self.to_home.len() > 4096 {
            self.to_home.pop_front();
        }
        self.flush();
    }

    pub(super) fn flush(&mut self) {
        while let Some(m) = self.to_home.pop_front() {
            let Some(l) = &mut self.link else {
                self.to_home.push_front(m);
                return;
            };
            if wire::send_flush(l, &m).is_err() {
                self.link = None;
                self.relink = true;
                self.to_home.push_front(m);
                return;
            }
        }
    }
}
