//! Moves in doubt at their destination. A source announces the commit to its mover, then
//! tells the destination to commit: if the source's mosixd dies between the two (or right
//! after), the destination sees its link break while it holds the restored copy, and the
//! mover, which holds the original, does not know whether the copy runs. The destination
//! keeps such a copy held for a while ([`Doubts::hold`]) instead of dropping it; the
//! mover asks, through its restarted mosixd, that the destination run it
//! ([`Doubts::resolve`]), and ends its original only if it does. So one copy goes on:
//! the destination's (resolved) or the source's (the mover could not ask: the held copy
//! is dropped when its time is up, and the mover lets the original go on).
//!
//! No I/O: the receiving thread and the thread answering the source's question meet here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A move: home node, home PID, the residence it moves into.
pub type MoveKey = (u32, i32, u64);

/// Moves remembered as committed here (a question may come after the commit).
const REMEMBERED: usize = 256;

#[derive(Default)]
struct Inner {
    /// Copies held after their link broke: whether the source asked to run them.
    held: HashMap<MoveKey, bool>,
    /// Recent moves whose copy runs here.
    committed: VecDeque<MoveKey>,
    /// Held copies that were to run but could not be started.
    failed: VecDeque<MoveKey>,
}

#[derive(Default)]
pub struct Doubts {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Doubts {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_until<'a>(
        &self,
        mut g: MutexGuard<'a, Inner>,
        end: Instant,
        done: impl Fn(&Inner) -> bool,
    ) -> MutexGuard<'a, Inner> {
        while !done(&g) {
            let now = Instant::now();
            if now >= end {
                break;
            }
            g = self
                .changed
                .wait_timeout(g, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        g
    }

    /// The link of move `key` broke after the copy was restored and before a decision:
    /// holds it until the source asks that it run (true) or `wait` passes (false: drop it).
    pub fn hold(&self, key: MoveKey, wait: Duration) -> bool {
        let mut g = self.lock();
        g.held.insert(key, false);
        self.changed.notify_all();
        let g2 = self.wait_until(g, Instant::now() + wait, |i| {
            i.held.get(&key) == Some(&true)
        });
        g = g2;
        let go = g.held.remove(&key) == Some(true);
        self.changed.notify_all();
        go
    }

    /// The copy of move `key` runs here.
    pub fn committed(&self, key: MoveKey) {
        self.remember(key, |i| &mut i.committed);
    }

    /// A copy that [`Doubts::hold`] said to run could not be started.
    pub fn failed(&self, key: MoveKey) {
        self.remember(key, |i| &mut i.failed);
    }

    fn remember(&self, key: MoveKey, list: impl Fn(&mut Inner) -> &mut VecDeque<MoveKey>) {
        let mut g = self.lock();
        let l = list(&mut g);
        l.push_back(key);
        if l.len() > REMEMBERED {
            l.pop_front();
        }
        self.changed.notify_all();
    }

    /// The source's question: run the copy of move `key` if it is held. Waits up to
    /// `wait` for the receiving side to see its link broken (and then for the copy to
    /// start). Whether it runs here.
    pub fn resolve(&self, key: MoveKey, wait: Duration) -> bool {
        let end = Instant::now() + wait;
        let g = self.lock();
        let mut g = self.wait_until(g, end, |i| {
            i.committed.contains(&key) || i.held.contains_key(&key)
        });
        if g.committed.contains(&key) {
            return true;
        }
        match g.held.get_mut(&key) {
            Some(go) => *go = true,
            None => return false,
        }
        self.changed.notify_all();
        let g = self.wait_until(g, end, |i| {
            i.committed.contains(&key) || i.failed.contains(&key)
        });
        g.committed.contains(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const K: MoveKey = (1, 100, 3);

    #[test]
    fn a_held_copy_runs_when_the_source_asks() {
        let d = Arc::new(Doubts::default());
        let d2 = d.clone();
        let receiver = std::thread::spawn(move || {
            let go = d2.hold(K, Duration::from_secs(60));
            if go {
                d2.committed(K);
            }
            go
        });
        assert!(d.resolve(K, Duration::from_secs(60)));
        assert!(receiver.join().unwrap());
    }

    #[test]
    fn a_question_before_the_link_is_seen_broken_waits_for_it() {
        let d = Arc::new(Doubts::default());
        let d2 = d.clone();
        let asker = std::thread::spawn(move || d2.resolve(K, Duration::from_secs(60)));
        // The receiving side notices its broken link only now.
        while !asker.is_finished() && d.lock().held.is_empty() {
            if d.hold(K, Duration::from_millis(1)) {
                d.committed(K);
                break;
            }
        }
        assert!(asker.join().unwrap());
    }

    #[test]
    fn a_copy_nobody_asks_for_is_dropped_and_a_late_question_says_so() {
        let d = Doubts::default();
        assert!(!d.hold(K, Duration::from_millis(10)));
        assert!(!d.resolve(K, Duration::from_millis(10)));
    }

    #[test]
    fn a_move_committed_by_its_link_is_answered_as_running() {
        let d = Doubts::default();
        d.committed(K);
        assert!(d.resolve(K, Duration::from_millis(10)));
        assert!(!d.resolve((1, 100, 4), Duration::from_millis(10)));
    }

    #[test]
    fn a_copy_that_cannot_start_is_answered_as_not_running() {
        let d = Arc::new(Doubts::default());
        let d2 = d.clone();
        let receiver = std::thread::spawn(move || {
            if d2.hold(K, Duration::from_secs(60)) {
                d2.failed(K);
            }
        });
        assert!(!d.resolve(K, Duration::from_secs(60)));
        receiver.join().unwrap();
    }
}
