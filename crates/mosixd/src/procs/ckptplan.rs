//! The decisions about a home process's checkpoints, without I/O: whether one asked for
//! is taken now, joined to the one being taken, made to wait or refused; when the next
//! automatic one is due; when a checkpoint taken by its host is complete; which one the
//! process can be recovered from. Its driver (homeckpt.rs) gathers the facts, asks here,
//! and carries out the answer (threads, frames to its host and deputy, files).

use mosix_proto::control::After;
use mosix_proto::wire::CkptError;
use mosix_remote::wire::{MarkError, MarkedAt};
use std::time::Duration;

/// How long a checkpoint asked for waits for its host's link (just after a move).
pub const LINK_WAIT: Duration = Duration::from_secs(10);

/// Where the process is, as far as its checkpoints are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Home,
    /// On a host; `linked`: its link to home is up (the host can take a checkpoint).
    Away {
        linked: bool,
    },
    /// Being moved from home.
    Leaving,
    /// Being brought back from a checkpoint after its host died.
    Recovering,
}

/// What becomes of a checkpoint asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Taken here, by a mover at home.
    Here,
    /// Asked of its host.
    Host,
    /// The one being taken serves it too (a plain `checkpoint` while one goes on).
    Join,
    /// Kept until its host's link is up (at most [`LINK_WAIT`]).
    Wait,
    Refuse(CkptError),
}

/// A checkpoint asked for (`then`, by a user if `asked`, else the periodic one) while
/// `pending` is being taken (with what it does after), the process `frozen` or not, at
/// `place`.
pub fn start(
    pending: Option<After>,
    then: After,
    asked: bool,
    frozen: bool,
    place: Place,
) -> Start {
    if let Some(p) = pending {
        return if asked && then == After::Continue && p == After::Continue {
            Start::Join
        } else {
            Start::Refuse(CkptError::Busy)
        };
    }
    if frozen {
        return Start::Refuse(CkptError::Frozen);
    }
    match place {
        Place::Home => Start::Here,
        Place::Away { linked: true } => Start::Host,
        Place::Away { linked: false } => Start::Wait,
        Place::Leaving => Start::Refuse(CkptError::Moving),
        Place::Recovering => Start::Refuse(CkptError::Recovering),
    }
}

/// What becomes of a checkpoint that waited `waited` for its host's link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Waited {
    /// Ask again now (the link is up, or it is home: taken there).
    Retry,
    WaitMore,
    GiveUp(CkptError),
}

/// A waiting checkpoint, with the process at `place`.
pub fn waited(place: Place, waited: Duration) -> Waited {
    match place {
        Place::Away { linked: true } | Place::Home | Place::Leaving => Waited::Retry,
        _ if waited > LINK_WAIT => Waited::GiveUp(CkptError::HostUnlinked),
        _ => Waited::WaitMore,
    }
}

/// Whether the next automatic checkpoint is due (none being taken): every `every` (None:
/// no automatic ones), `since` the last; not while it is frozen or away without its link.
/// (Nor while it is stopped: the driver looks at that last, in /proc.)
pub fn due(every: Option<Duration>, since: Duration, frozen: bool, place: Place) -> bool {
    let Some(every) = every else {
        return false;
    };
    let reachable = matches!(place, Place::Home | Place::Away { linked: true });
    !frozen && since >= every && reachable
}

/// A checkpoint taken by its host is complete once its image arrived (`image`: Some,
/// with why it failed if it did) and, unless it failed, its deputy's mark (`marked`):
/// what completes its file then (the deputy's descriptors and working directory at the
/// mark), or why it fails. None: not yet.
pub fn completion(
    image: Option<&Option<CkptError>>,
    marked: Option<&Result<MarkedAt, MarkError>>,
) -> Option<Result<MarkedAt, CkptError>> {
    match (image?, marked) {
        (Some(why), _) => Some(Err(why.clone())),
        (None, None) => None,
        (None, Some(Ok(at))) => Some(Ok(at.clone())),
        (None, Some(Err(e))) => Some(Err(CkptError::Mark(e.to_string()))),
    }
}

/// Whether checkpoint `id`, written and marked by its deputy, becomes the one to recover
/// from: only away (at home its deputy is the process), and never in place of a newer
/// one.
pub fn recoverable(
    native: bool,
    written: bool,
    marked: bool,
    current: Option<u64>,
    id: u64,
) -> bool {
    !native && written && marked && current.is_none_or(|c| c <= id)
}

/// Whether a checkpoint asked of its host in residence `asked_in`, whose image has not
/// begun to come (`incoming`) nor come (`image`), never will: the process came home
/// (`native`) or lives in another residence (`epoch`) since.
pub fn outlived(
    away: bool,
    incoming: bool,
    image: bool,
    asked_in: u64,
    native: bool,
    epoch: u64,
) -> bool {
    away && !incoming && !image && (native || epoch != asked_in)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PLACES: [Place; 5] = [
        Place::Home,
        Place::Away { linked: true },
        Place::Away { linked: false },
        Place::Leaving,
        Place::Recovering,
    ];

    #[test]
    fn a_checkpoint_asked_for_goes_where_the_process_can_be_saved() {
        let c = After::Continue;
        assert_eq!(start(None, c, true, false, Place::Home), Start::Here);
        assert_eq!(
            start(None, c, true, false, Place::Away { linked: true }),
            Start::Host
        );
        assert_eq!(
            start(None, c, true, false, Place::Away { linked: false }),
            Start::Wait
        );
        assert_eq!(
            start(None, c, true, false, Place::Leaving),
            Start::Refuse(CkptError::Moving)
        );
        assert_eq!(
            start(None, c, true, false, Place::Recovering),
            Start::Refuse(CkptError::Recovering)
        );
        assert_eq!(
            start(None, After::Exit, true, true, Place::Home),
            Start::Refuse(CkptError::Frozen)
        );
        // One being taken serves a plain `checkpoint`, not a chkstop or chkexit, and not
        // one that ends or stops the process.
        assert_eq!(start(Some(c), c, true, false, Place::Home), Start::Join);
        for (p, t) in [
            (c, After::Stop),
            (c, After::Exit),
            (After::Exit, c),
            (After::Stop, c),
        ] {
            assert_eq!(
                start(Some(p), t, true, false, Place::Home),
                Start::Refuse(CkptError::Busy)
            );
        }
    }

    #[test]
    fn a_checkpoint_waits_for_its_hosts_link_a_bounded_time() {
        let away = Place::Away { linked: false };
        assert_eq!(waited(away, Duration::from_secs(1)), Waited::WaitMore);
        assert_eq!(
            waited(away, LINK_WAIT + Duration::from_millis(1)),
            Waited::GiveUp(CkptError::HostUnlinked)
        );
        assert_eq!(waited(Place::Recovering, Duration::ZERO), Waited::WaitMore);
        assert_eq!(
            waited(Place::Away { linked: true }, LINK_WAIT * 2),
            Waited::Retry
        );
        assert_eq!(waited(Place::Home, LINK_WAIT * 2), Waited::Retry);
    }

    #[test]
    fn a_hosts_checkpoint_is_complete_with_its_image_and_its_mark() {
        let at = MarkedAt {
            fds: Vec::new(),
            cwd: Some("/home/u/w".into()),
        };
        let fds = Ok(at.clone());
        assert_eq!(completion(None, Some(&fds)), None);
        assert_eq!(completion(Some(&None), None), None);
        assert_eq!(completion(Some(&None), Some(&fds)), Some(Ok(at)));
        // A failed image needs no mark.
        assert_eq!(
            completion(Some(&Some(CkptError::CutShort)), None),
            Some(Err(CkptError::CutShort))
        );
        let no = Err(MarkError::NoMark { id: 3 });
        assert!(matches!(
            completion(Some(&None), Some(&no)),
            Some(Err(CkptError::Mark(m))) if m.contains("no mark of checkpoint 3")
        ));
    }

    #[test]
    fn a_checkpoint_asked_of_a_host_it_left_is_given_up_at_once() {
        // Still on the host it was asked of: it waits.
        assert!(!outlived(true, false, false, 3, false, 3));
        // Moved on (or recovered), or back home: its image will never come.
        assert!(outlived(true, false, false, 3, false, 4));
        assert!(outlived(true, false, false, 3, true, 3));
        // Taken at home: not a host's.
        assert!(!outlived(false, false, false, 0, true, 1));
        // Its image was coming, or came, before the move: it completes.
        assert!(!outlived(true, true, false, 3, false, 4));
        assert!(!outlived(true, false, true, 3, false, 4));
    }

    proptest! {
        /// Never two checkpoints at once, never one of a frozen process or of one being
        /// moved or recovered, and only a plain checkpoint joins another.
        #[test]
        fn starts_are_safe(
            pending in proptest::option::of(0..3u8),
            then in 0..3u8,
            asked: bool,
            frozen: bool,
            place in 0..5usize,
        ) {
            let after = |x: u8| [After::Continue, After::Stop, After::Exit][x as usize];
            let place = PLACES[place];
            let s = start(pending.map(after), after(then), asked, frozen, place);
            if pending.is_some() {
                prop_assert!(matches!(s, Start::Join | Start::Refuse(CkptError::Busy)));
                if s == Start::Join {
                    prop_assert!(asked && then == 0 && pending == Some(0));
                }
            } else if frozen || matches!(place, Place::Leaving | Place::Recovering) {
                prop_assert!(matches!(s, Start::Refuse(_)));
            } else {
                prop_assert!(matches!(s, Start::Here | Start::Host | Start::Wait));
            }
        }

        /// The automatic checkpoint comes no sooner than its period, and only where it
        /// can be taken at once.
        #[test]
        fn periodic_checkpoints_keep_their_period(
            every_ms in proptest::option::of(1..100_000u64),
            since_ms in 0..200_000u64,
            frozen: bool,
            place in 0..5usize,
        ) {
            let every = every_ms.map(Duration::from_millis);
            let place = PLACES[place];
            let d = due(every, Duration::from_millis(since_ms), frozen, place);
            if d {
                prop_assert!(every.is_some_and(|e| Duration::from_millis(since_ms) >= e));
                prop_assert!(!frozen);
                prop_assert_eq!(
                    start(None, After::Continue, false, frozen, place).clone(),
                    if place == Place::Home { Start::Here } else { Start::Host }
                );
            }
        }

        /// The checkpoint to recover from only moves forward.
        #[test]
        fn the_recovery_point_only_moves_forward(
            ids in proptest::collection::vec(1..50u64, 1..20),
        ) {
            let mut current: Option<u64> = None;
            for id in ids {
                if recoverable(false, true, true, current, id) {
                    prop_assert!(current.is_none_or(|c| c <= id));
                    current = Some(id);
                }
                prop_assert!(!recoverable(true, true, true, current, id));
                prop_assert!(!recoverable(false, false, true, current, id));
                prop_assert!(!recoverable(false, true, false, current, id));
            }
        }
    }
}
