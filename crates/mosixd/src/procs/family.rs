//! Families: a child of a migratable process is a migratable process of the same home,
//! with its own home PID, moved on its own (by hand or by the balancer), as in MOSIX.
//!
//! Children are found by looking (every [`SCAN`], /proc/PID/task/TID/children of each
//! migratable process at home), not by following forks: a child that lives less than that
//! is not worth moving, and this works in any network namespace (the proc connector
//! speaks only to the initial one) and without tracing anyone. A process away makes no
//! children there: a fork brings it home first (docs/transparency.md). Between members,
//! wherever each runs, wait, signals, process groups, pipes and sockets are their home's
//! own: each member's deputy is the real process at home.

use super::{lock, Procs};
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

/// How often migratable processes at home are looked at for new children.
pub const SCAN: Duration = Duration::from_millis(200);

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

impl Procs {
    /// Starts the thread that makes children of migratable processes migratable.
    pub fn start_families(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("mosix-families".into())
            .spawn(move || loop {
                std::thread::sleep(SCAN);
                me.adopt_children();
            })?;
        Ok(())
    }

    /// One look: every child of a migratable process at home that is not one yet.
    fn adopt_children(self: &Arc<Self>) {
        let me = self.me();
        let parents: Vec<(i32, u32, bool, Vec<u32>)> = lock(&self.homes)
            .iter()
            .filter_map(|(&pid, h)| {
                let i = lock(&h.info);
                (i.node == me && !i.moving).then(|| (pid, i.uid, i.pinned, i.avoid.clone()))
            })
            .collect();
        for (parent, uid, pinned, avoid) in parents {
            for child in children_of(parent) {
                if lock(&self.homes).contains_key(&child) {
                    continue;
                }
                if let Err(e) = self.adopt_child(child, parent, uid, pinned, avoid.clone()) {
                    debug!("child {child} of {parent}: {e:#}");
                }
            }
        }
    }
}
