//! Why a process moves or stays: every decision carries one of these, and each renders as
//! one short line for people (`mosix where`, logs, the simulator's trace).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Load of one node as the deciding node saw it when it decided.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadSeen {
    /// Relative CPU speed (1.0 = reference machine).
    pub speed: f64,
    /// Runnable processes, after local accounting of recent sends (not normalised).
    pub runnable: f64,
}

/// Counts of the peers that could not take a process, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    /// Peers down, or with unusable (non-positive, not finite) speed.
    pub down: u32,
    /// Peers whose load information is older than `stale_after_ms`.
    pub stale: u32,
    /// Peers that accept no guests (`mosctl block`), when not the process's home.
    pub blocked: u32,
    /// Peers on the process's avoid list.
    pub avoided: u32,
    /// Peers that refused an offer lately (backing off).
    pub backoff: u32,
    /// Peers without room for the process's memory (beyond their reserve).
    pub no_room: u32,
}

impl Excluded {
    fn total(&self) -> u32 {
        self.down + self.stale + self.blocked + self.avoided + self.backoff + self.no_room
    }
}

/// What kind of move a decision is; the receiver's admission check depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    /// For speed and load: the process is expected to finish sooner there.
    Load,
    /// Memory ushering: this node is short of free memory.
    Memory,
    /// The node expels its guests (`mosctl expel`): back home.
    Expel,
    /// The node is leaving the cluster: everything movable goes.
    Evacuate,
}

/// Why a process moves, stays, or why a receiver refused it.
///
/// Times are milliseconds, memory is bytes. `Display` renders one short human line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    // ---- moves -------------------------------------------------------------------------
    /// Expected to finish sooner on `to`, by more than the cost of moving and the threshold.
    Load {
        to: u32,
        here: LoadSeen,
        there: LoadSeen,
        /// Expected time to finish here (estimated remaining work / rate here).
        finish_here_ms: f64,
        /// Expected time to finish there, not counting the move.
        finish_there_ms: f64,
        /// Time to move the process's memory (plus waiting for the link).
        cost_ms: f64,
    },
    /// This node is short of free memory; `to` has room.
    Memory {
        to: u32,
        free_here: u64,
        reserve_here: u64,
        free_there: u64,
        mem_bytes: u64,
    },
    /// The node expels guests (`mosctl expel`).
    Expel { to: u32, home: bool },
    /// The node is leaving the cluster.
    Evacuate { to: u32, home: bool },

    // ---- stays -------------------------------------------------------------------------
    /// The user pinned the process to its node (`mosrun -L`).
    Pinned,
    /// Automatic migration is off for this process.
    NotAuto,
    /// This node sends nothing away automatically (`mosctl stay`).
    NodeStay,
    /// Local processes of this node stay home (`mosctl lstay`).
    LocalStay,
    /// The process has not been here long enough to move again.
    Residency { resident_ms: u64, needed_ms: u64 },
    /// The process hardly uses the CPU: moving it for load gains nothing.
    NotCpuBound { share: f64 },
    /// The process is not on this node (the caller's list was wrong or stale).
    NotHere { where_now: u32 },
    /// It was just sent; the migration is still under way.
    InFlight { to: u32 },
    /// No peer could take it.
    NoDestination { peers: u32, excluded: Excluded },
    /// The best place does not beat staying by enough.
    NoGain {
        /// Best other node, if any could take it.
        best: Option<u32>,
        finish_here_ms: f64,
        /// Expected finish there including the cost of moving.
        finish_there_ms: f64,
        cost_ms: f64,
        /// Required relative gain (`gain_threshold`).
        threshold: f64,
    },
    /// The node short of memory found no peer with room.
    NoRoomAnywhere {
        mem_bytes: u64,
        free_here: u64,
        reserve_here: u64,
    },
    /// This tick's sends were used up.
    MaxSends { max: usize },
    /// A move that pays only a little was held back by chance, so that nodes seeing the
    /// same idle peer do not all send to it at once.
    HeldBack { probability: f64 },

    // ---- a receiver's refusals ----------------------------------------------------------
    /// The receiver accepts no guests.
    Blocking { node: u32 },
    /// The receiver has no room for the process's memory.
    NoRoom {
        node: u32,
        mem_bytes: u64,
        free: u64,
        reserve: u64,
    },
    /// With the receiver's own, fresher load, the move no longer pays.
    NoLongerPays {
        node: u32,
        runnable: f64,
        finish_there_ms: f64,
        finish_here_ms: f64,
    },
    /// The receiver refused for a reason of the caller's own (migration failed, ...).
    Failed { node: u32 },
}

impl Reason {
    /// Whether this is the reason of a move (as opposed to a stay or a refusal).
    pub fn is_move(&self) -> bool {
        matches!(
            self,
            Reason::Load { .. }
                | Reason::Memory { .. }
                | Reason::Expel { .. }
                | Reason::Evacuate { .. }
        )
    }
}

/// Seconds, short: "0.07s", "4.2s", "312s".
pub fn secs(ms: f64) -> String {
    if !ms.is_finite() {
        return "never".into();
    }
    let s = ms / 1000.0;
    if s < 1.0 {
        format!("{s:.2}s")
    } else if s < 100.0 {
        format!("{s:.1}s")
    } else {
        format!("{s:.0}s")
    }
}

/// Bytes, short: "512 KiB", "12 MiB", "2.0 GiB".
pub fn bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f < K * K {
        format!("{:.0} KiB", f / K)
    } else if f < K * K * K {
        format!("{:.0} MiB", f / (K * K))
    } else {
        format!("{:.1} GiB", f / (K * K * K))
    }
}

fn runnable_words(r: f64) -> String {
    if r < 0.5 {
        "idle".into()
    } else {
        format!("has {r:.1} runnable")
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Load { to, here, there, finish_here_ms, finish_there_ms, cost_ms } => {
                let ratio = if here.speed > 0.0 { there.speed / here.speed } else { 1.0 };
                let tail = format!(
                    "expected finish {} -> {}, move cost {}",
                    secs(*finish_here_ms),
                    secs(*finish_there_ms),
                    secs(*cost_ms)
                );
                if ratio >= 1.1 {
                    write!(
                        f,
                        "node {to} is {ratio:.1}x faster and {}: {tail}",
                        runnable_words(there.runnable)
                    )
                } else {
                    let lh = here.runnable / here.speed.max(f64::MIN_POSITIVE);
                    let lt = there.runnable / there.speed.max(f64::MIN_POSITIVE);
                    write!(
                        f,
                        "node {to} is less loaded ({lt:.1} vs {lh:.1} runnable per unit of speed): {tail}"
                    )
                }
            }
            Reason::Memory { to, free_here, reserve_here, free_there, mem_bytes } => write!(
                f,
                "short of memory (free {} < reserve {}): node {to} has {} free for its {}",
                bytes(*free_here),
                bytes(*reserve_here),
                bytes(*free_there),
                bytes(*mem_bytes)
            ),
            Reason::Expel { to, home } => {
                if *home {
                    write!(f, "node expels guests (mosctl expel): back to home node {to}")
                } else {
                    write!(f, "node expels guests (mosctl expel): home unreachable, to node {to}")
                }
            }
            Reason::Evacuate { to, home } => {
                if *home {
                    write!(f, "node leaving the cluster: back to home node {to}")
                } else {
                    write!(f, "node leaving the cluster: to node {to}")
                }
            }
            Reason::Pinned => write!(f, "pinned (mosrun -L)"),
            Reason::NotAuto => write!(
                f,
                "automatic migration is off for this process (or its children move instead)"
            ),
            Reason::NodeStay => write!(f, "this node sends nothing away (mosctl stay)"),
            Reason::LocalStay => write!(f, "local processes stay home (mosctl lstay)"),
            Reason::Residency { resident_ms, needed_ms } => write!(
                f,
                "resident {} < {} needed",
                secs(*resident_ms as f64),
                secs(*needed_ms as f64)
            ),
            Reason::NotCpuBound { share } => {
                write!(f, "uses {:.0}% CPU: not worth moving for load", share * 100.0)
            }
            Reason::NotHere { where_now } => write!(f, "not on this node (on node {where_now})"),
            Reason::InFlight { to } => write!(f, "migration to node {to} under way"),
            Reason::NoDestination { peers, excluded } => {
                if *peers == 0 {
                    return write!(f, "no other node known");
                }
                write!(f, "no node can take it:")?;
                let e = excluded;
                let mut first = true;
                let mut part = |f: &mut fmt::Formatter<'_>, n: u32, what: &str| -> fmt::Result {
                    if n > 0 {
                        write!(f, "{} {n} {what}", if first { "" } else { "," })?;
                        first = false;
                    }
                    Ok(())
                };
                part(f, e.down, "down")?;
                part(f, e.stale, "with stale load information")?;
                part(f, e.blocked, "blocking guests")?;
                part(f, e.avoided, "avoided by the process")?;
                part(f, e.backoff, "refused lately")?;
                part(f, e.no_room, "without room")?;
                let other = peers.saturating_sub(e.total());
                if first {
                    write!(f, " {other} considered")?;
                }
                Ok(())
            }
            Reason::NoGain { best, finish_here_ms, finish_there_ms, cost_ms, threshold } => {
                match best {
                    None => write!(f, "no better node"),
                    Some(b) if finish_there_ms >= finish_here_ms => write!(
                        f,
                        "no faster place: best is node {b}, expected finish {} here vs {} there (move cost {} included)",
                        secs(*finish_here_ms),
                        secs(*finish_there_ms),
                        secs(*cost_ms)
                    ),
                    Some(b) => write!(
                        f,
                        "gain too small: node {b} would finish in {} vs {} here (move cost {} included), needs {:.0}% better",
                        secs(*finish_there_ms),
                        secs(*finish_here_ms),
                        secs(*cost_ms),
                        threshold * 100.0
                    ),
                }
            }
            Reason::NoRoomAnywhere { mem_bytes, free_here, reserve_here } => write!(
                f,
                "short of memory (free {} < reserve {}) but no node has room for {}",
                bytes(*free_here),
                bytes(*reserve_here),
                bytes(*mem_bytes)
            ),
            Reason::MaxSends { max } => write!(f, "this tick's {max} sends are used up"),
            Reason::HeldBack { probability } => write!(
                f,
                "small gain, held back by chance (sent with probability {probability:.2}) to avoid a herd"
            ),
            Reason::Blocking { node } => write!(f, "node {node} accepts no guests"),
            Reason::NoRoom { node, mem_bytes, free, reserve } => write!(
                f,
                "node {node} has no room for {} (free {}, reserve {})",
                bytes(*mem_bytes),
                bytes(*free),
                bytes(*reserve)
            ),
            Reason::NoLongerPays { node, runnable, finish_there_ms, finish_here_ms } => write!(
                f,
                "node {node} now has {runnable:.1} runnable: expected finish {} there vs {} at the sender, no longer pays",
                secs(*finish_there_ms),
                secs(*finish_here_ms)
            ),
            Reason::Failed { node } => write!(f, "migration to node {node} failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_short_lines() {
        let r = Reason::Load {
            to: 4,
            here: LoadSeen {
                speed: 1.0,
                runnable: 1.0,
            },
            there: LoadSeen {
                speed: 3.0,
                runnable: 0.0,
            },
            finish_here_ms: 12_100.0,
            finish_there_ms: 4_200.0,
            cost_ms: 300.0,
        };
        assert_eq!(
            r.to_string(),
            "node 4 is 3.0x faster and idle: expected finish 12.1s -> 4.2s, move cost 0.30s"
        );
        assert!(r.is_move());
        assert_eq!(Reason::Pinned.to_string(), "pinned (mosrun -L)");
        assert_eq!(
            Reason::Residency {
                resident_ms: 1200,
                needed_ms: 3000
            }
            .to_string(),
            "resident 1.2s < 3.0s needed"
        );
        let e = Excluded {
            down: 1,
            no_room: 2,
            ..Default::default()
        };
        assert_eq!(
            Reason::NoDestination {
                peers: 3,
                excluded: e
            }
            .to_string(),
            "no node can take it: 1 down, 2 without room"
        );
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(bytes(12 << 20), "12 MiB");
        assert_eq!(secs(f64::INFINITY), "never");
    }

    #[test]
    fn serde_round_trip() {
        let r = Reason::NoGain {
            best: Some(2),
            finish_here_ms: 1.0,
            finish_there_ms: 2.0,
            cost_ms: 0.5,
            threshold: 0.15,
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"reason\":\"no_gain\""));
        let back: Reason = serde_json::from_str(&j).unwrap();
        assert_eq!(back, r);
    }
}
