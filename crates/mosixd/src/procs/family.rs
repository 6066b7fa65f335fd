//! Families: a child of a migratable process is a migratable process of the same home,
//! with its own home PID, moved on its own (by hand or by the balancer), as in MOSIX.
//!
//! Children are found by looking (/proc/PID/task/TID/children of each migratable process
//! at home), not by following forks: this works in any network namespace (the proc
//! connector speaks only to the initial one) and without tracing anyone. A look costs a
//! few reads of /proc per process, so it is made often ([`FAST`]) only when that is cheap:
//! when a new process was made at all since the last look (the last PID in /proc/loadavg
//! moved) and there are few processes to look at; at least every [`SCAN`] in any case. A
//! child found is looked into at once (gcc's cc1 is adopted with gcc). A process away
//! makes no children there: a fork brings it home first (docs/transparency.md). Between
//! members, wherever each runs, wait, signals, process groups, pipes and sockets are
//! their home's own: each member's deputy is the real process at home.

use super::{lock, Procs};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::debug;

/// The longest time between two looks for new children.
pub const SCAN: Duration = Duration::from_millis(200);
/// The shortest (with few processes, when something was forked).
pub const FAST: Duration = Duration::from_millis(25);
/// What one process adds to the time between looks (its share of their cost).
const PER_PROCESS: Duration = Duration::from_millis(2);

/// The time between two looks when `n` migratable processes are at home.
pub fn period(n: usize) -> Duration {
    (PER_PROCESS * n.min(1000) as u32).clamp(FAST, SCAN)
}

/// The children of `pid` (of all its threads), by /proc.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        out.extend(
            text.split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The last PID given out in our PID namespace (/proc/loadavg): unchanged, nobody forked.
fn last_pid() -> Option<u64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .nth(4)?
        .parse()
        .ok()
}

impl Procs {
    /// Starts the thread that makes children of migratable processes migratable.
    pub fn start_families(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("mosix-families".into())
            .spawn(move || {
                let mut seen_pid = None;
                let mut full = Instant::now();
                loop {
                    let n = lock(&me.homes).len();
                    std::thread::sleep(period(n));
                    // Read before the look: a fork during it moves it again.
                    let last = last_pid();
                    if last.is_some() && last == seen_pid && full.elapsed() < SCAN {
                        continue;
                    }
                    seen_pid = last;
                    full = Instant::now();
                    me.adopt_children();
                }
            })?;
        Ok(())
    }

    /// Whether `pid` (a migratable process at home) had children at the last look.
    pub(crate) fn is_parent(&self, pid: i32) -> bool {
        lock(&self.parents).contains(&pid)
    }

    /// One look: every child of a migratable process at home that is not one yet, and
    /// its children in turn.
    fn adopt_children(self: &Arc<Self>) {
        let me = self.me();
        let mut todo: Vec<(i32, u32, bool, Vec<u32>)> = lock(&self.homes)
            .iter()
            .filter_map(|(&pid, h)| {
                let i = lock(&h.info);
                (i.node == me && !i.moving).then(|| (pid, i.uid, i.pinned, i.avoid.clone()))
            })
            .collect();
        let mut parents = HashSet::new();
        while let Some((parent, uid, pinned, avoid)) = todo.pop() {
            let kids = children_of(parent);
            if !kids.is_empty() {
                parents.insert(parent);
            }
            for child in kids {
                if lock(&self.homes).contains_key(&child) {
                    continue;
                }
                match self.adopt_child(child, parent, uid, pinned, avoid.clone()) {
                    // Its own children (made between two looks) at once.
                    Ok(()) => todo.push((child, uid, pinned, avoid.clone())),
                    Err(e) => debug!("child {child} of {parent}: {e:#}"),
                }
            }
        }
        *lock(&self.parents) = parents;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn looks_are_frequent_only_with_few_processes() {
        use super::*;
        assert_eq!(period(0), FAST);
        assert_eq!(period(5), FAST);
        assert_eq!(period(50), Duration::from_millis(100));
        assert_eq!(period(10_000), SCAN);
        assert!(last_pid().is_some_and(|p| p > 0));
    }
}
