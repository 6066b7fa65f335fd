//! The per-node policy state machine.

use crate::reason::{Excluded, LoadSeen, MoveKind, Reason};
use crate::rng::SplitMix64;
use crate::{Decision, NodeInfo, NodeMode, Offer, Params, ProcInfo};

/// Expected CPU rate of one CPU-bound process on a node of speed `speed` with `cpus` CPUs
/// shared by `runnable` runnable processes (this one included): speed × min(1, cpus /
/// runnable), in work per unit of time (1.0 = a whole reference CPU). 0 for an unusable
/// node.
pub fn expected_rate(speed: f64, cpus: u32, runnable: f64) -> f64 {
    if !(speed.is_finite() && speed > 0.0) {
        return 0.0;
    }
    let r = if runnable.is_finite() {
        runnable.max(1.0)
    } else {
        f64::INFINITY
    };
    let c = f64::from(cpus.max(1));
    speed * (c / r).min(1.0)
}

/// Time to move `mem_bytes` over the link plus the fixed overhead, ms (infinite when the
/// parameters make moving impossible).
pub fn cost_ms(params: &Params, mem_bytes: u64) -> f64 {
    let bw = params.link_bytes_per_sec;
    if !(bw.is_finite() && bw > 0.0) {
        return f64::INFINITY;
    }
    mem_bytes as f64 / bw * 1000.0 + params.move_overhead_ms.max(0.0)
}

fn clamp01(x: f64) -> f64 {
    if x.is_finite() {
        x.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

fn reserve_of(params: &Params, mem_total: u64) -> i128 {
    let f = clamp01(params.mem_reserve_frac);
    // Rounded up; `as u64` saturates.
    let r = mem_total as f64 * f;
    let whole = r as u64;
    i128::from(whole) + i128::from((whole as f64) < r)
}

/// A process this node sent, accounted for locally until gossip shows it.
#[derive(Clone, Debug)]
struct Sent {
    proc: u64,
    to: u32,
    share: f64,
    mem: u64,
    at: u64,
    cost: f64,
    /// Information sampled at the destination before this time does not show the process.
    visible_after: u64,
}

/// A guest this node admitted that has not arrived yet.
#[derive(Clone, Debug)]
struct Reserved {
    proc: u64,
    share: f64,
    mem: u64,
    until: u64,
}

/// Why a peer cannot take a given process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    Down,
    Stale,
    Blocked,
    Avoided,
    Backoff,
    NoRoom,
}

/// This node as the policy sees it this tick.
#[derive(Clone, Debug)]
struct Here {
    speed: f64,
    cpus: u32,
    runnable: f64,
    mem_free: i128,
    reserve: i128,
}

/// A peer as the policy sees it this tick (after local accounting).
#[derive(Clone, Debug)]
struct Peer {
    node: u32,
    speed: f64,
    cpus: u32,
    runnable: f64,
    mem_free: i128,
    reserve: i128,
    alive: bool,
    fresh: bool,
    accepts: bool,
    backoff: bool,
    /// Load moves to it decided in this tick.
    sent_now: u32,
}

#[derive(Clone, Debug)]
struct Ctx {
    here: Here,
    peers: Vec<Peer>,
    /// Peer indices by the rate a CPU-bound newcomer would get, best first (ties: index);
    /// empty until `sort_order` is called (only load moves need it).
    order: Vec<(f64, usize)>,
}

impl Ctx {
    fn sort_order(&mut self) {
        self.order.clear();
        self.order.extend(
            self.peers
                .iter()
                .enumerate()
                .map(|(i, q)| (expected_rate(q.speed, q.cpus, q.runnable + 1.0), i)),
        );
        self.order
            .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    }
}

/// The best place found for one process.
#[derive(Clone, Copy, Debug)]
struct Choice {
    peer: usize,
    finish_there: f64,
    cost: f64,
    total: f64,
}

/// The balancing policy of one node. Cheap to create; keep one per node for its whole
/// life (it remembers recent sends, admitted guests and refusals).
#[derive(Clone, Debug)]
pub struct Balancer {
    me: u32,
    params: Params,
    mode: NodeMode,
    sent: Vec<Sent>,
    reserved: Vec<Reserved>,
    backoff: Vec<(u32, u64)>,
    link_free_at: f64,
}

impl Balancer {
    /// The policy of node `me`.
    pub fn new(me: u32, params: Params) -> Self {
        Balancer {
            me,
            params,
            mode: NodeMode::default(),
            sent: Vec::new(),
            reserved: Vec::new(),
            backoff: Vec::new(),
            link_free_at: 0.0,
        }
    }

    /// This node's number.
    pub fn node(&self) -> u32 {
        self.me
    }

    /// The parameters in force.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The `mosctl` switches in force.
    pub fn mode(&self) -> NodeMode {
        self.mode
    }

    /// Sets the `mosctl` switches (stay, lstay, block, expel).
    pub fn set_mode(&mut self, mode: NodeMode) {
        self.mode = mode;
    }

    /// Whether this node should gossip that it accepts guests.
    pub fn accepts_guests(&self) -> bool {
        !(self.mode.block || self.mode.expel)
    }

    /// Residency a process needs before a load move, ms: for its first move only
    /// `first_move_residency_ms` (a process that never moved cannot ping-pong); after a
    /// migration the floor plus `residency_per_cost` × its migration cost.
    pub fn residency_needed_ms(&self, p: &ProcInfo) -> u64 {
        if p.migrations == 0 {
            return self.floor_ms(p);
        }
        let c = cost_ms(&self.params, p.mem_bytes);
        let k = if self.params.residency_per_cost.is_finite() {
            self.params.residency_per_cost.max(0.0)
        } else {
            0.0
        };
        let extra = c * k;
        let extra = if extra.is_finite() {
            extra.min(u64::MAX as f64 / 2.0) as u64
        } else {
            u64::MAX / 2
        };
        self.params.min_residency_ms.saturating_add(extra)
    }

    /// One balancing round. `me` is this node's own fresh information, `peers` what gossip
    /// says of the others (any subset, any age; entries for this node are ignored),
    /// `procs` the processes now on this node (not those whose migration is under way),
    /// `seed` fresh random bits. Returns the processes to send now, at most
    /// `max_sends_per_tick` (plus guests when expelling). Deterministic in its inputs.
    pub fn tick(
        &mut self,
        now_ms: u64,
        me: &NodeInfo,
        peers: &[NodeInfo],
        procs: &[ProcInfo],
        seed: u64,
    ) -> Vec<Decision> {
        self.prune(now_ms, procs);
        let mut rng = SplitMix64::new(seed ^ (u64::from(self.me) << 32) ^ 0x006d_6f73_6978);
        let mut ctx = self.context(now_ms, me, peers, procs);
        let mut out = Vec::new();
        let mut taken = vec![false; procs.len()];
        if self.mode.expel {
            self.forced(
                now_ms,
                &mut ctx,
                procs,
                &mut taken,
                MoveKind::Expel,
                &mut rng,
                &mut out,
            );
        }
        if !self.mode.stay {
            self.usher(now_ms, &mut ctx, procs, &mut taken, &mut rng, &mut out);
            self.load_moves(now_ms, &mut ctx, procs, &mut taken, &mut rng, &mut out);
        }
        out
    }

    /// The node is leaving the cluster: every process that is not pinned goes, home if
    /// home can take it, else to the best node with room; residency and `auto` are
    /// ignored. Processes that can go nowhere stay (ask [`Balancer::explain`]).
    pub fn evacuate(
        &mut self,
        now_ms: u64,
        me: &NodeInfo,
        peers: &[NodeInfo],
        procs: &[ProcInfo],
        seed: u64,
    ) -> Vec<Decision> {
        self.prune(now_ms, procs);
        let mut rng = SplitMix64::new(seed ^ (u64::from(self.me) << 32) ^ 0x6576_6163);
        let mut ctx = self.context(now_ms, me, peers, procs);
        let mut out = Vec::new();
        let mut taken = vec![false; procs.len()];
        self.forced(
            now_ms,
            &mut ctx,
            procs,
            &mut taken,
            MoveKind::Evacuate,
            &mut rng,
            &mut out,
        );
        out
    }

    /// Why process `proc_id` stays (or the move `tick` would make, if it would move, without
    /// the random draws and the per-tick limit). `None` if it is not in `procs`.
    pub fn explain(
        &self,
        now_ms: u64,
        me: &NodeInfo,
        peers: &[NodeInfo],
        procs: &[ProcInfo],
        proc_id: u64,
    ) -> Option<Reason> {
        let p = procs.iter().find(|p| p.id == proc_id)?;
        let ctx = self.context(now_ms, me, peers, procs);
        if p.where_now != self.me {
            return Some(Reason::NotHere {
                where_now: p.where_now,
            });
        }
        if let Some(to) = self.in_flight(now_ms, p.id) {
            return Some(Reason::InFlight { to });
        }
        if self.mode.expel && p.home != self.me && !p.pinned {
            return Some(match self.forced_choice(now_ms, &ctx, p, None) {
                Ok((c, home)) => Reason::Expel {
                    to: ctx.peers[c.peer].node,
                    home,
                },
                Err(excluded) => Reason::NoDestination {
                    peers: ctx.peers.len() as u32,
                    excluded,
                },
            });
        }
        if ctx.here.mem_free < ctx.here.reserve {
            if let Some(r) = self.stay_reason(p, MoveKind::Memory) {
                return Some(r);
            }
            return Some(
                match self.best_for(now_ms, &ctx, p, self.work_ms(p), None) {
                    Ok(c) => self.memory_reason(&ctx, c.peer, p),
                    Err(_) => Reason::NoRoomAnywhere {
                        mem_bytes: p.mem_bytes,
                        free_here: ctx.here.mem_free.max(0) as u64,
                        reserve_here: ctx.here.reserve.max(0) as u64,
                    },
                },
            );
        }
        if let Some(r) = self.stay_reason(p, MoveKind::Load) {
            return Some(r);
        }
        let share = clamp01(p.cpu_share);
        if share < self.params.min_cpu_share {
            return Some(Reason::NotCpuBound { share });
        }
        let w = self.work_ms(p);
        let fh = w / expected_rate(ctx.here.speed, ctx.here.cpus, ctx.here.runnable);
        Some(match self.best_for(now_ms, &ctx, p, w, None) {
            Err(excluded) => Reason::NoDestination {
                peers: ctx.peers.len() as u32,
                excluded,
            },
            Ok(c) if self.pays(fh, c.total) => self.load_reason(&ctx, &c, fh),
            Ok(c) => Reason::NoGain {
                best: Some(ctx.peers[c.peer].node),
                finish_here_ms: fh,
                finish_there_ms: c.total,
                cost_ms: c.cost,
                threshold: self.params.gain_threshold,
            },
        })
    }

    /// The receiver's check of an offer, with its own fresh information `me` and its
    /// processes `procs`. On `Ok` the guest is reserved (its memory and CPU share count as
    /// here until it shows up in `procs`, or the reservation lapses).
    pub fn admit(
        &mut self,
        now_ms: u64,
        me: &NodeInfo,
        procs: &[ProcInfo],
        offer: &Offer,
    ) -> Result<(), Reason> {
        self.prune(now_ms, procs);
        let node = self.me;
        let going_home = offer.home == node;
        if !going_home && (!self.accepts_guests() || !me.accepts_guests || !me.up) {
            return Err(Reason::Blocking { node });
        }
        let ctx = self.context(now_ms, me, &[], procs);
        let need = i128::from(offer.mem_bytes);
        if ctx.here.mem_free - ctx.here.reserve < need {
            return Err(Reason::NoRoom {
                node,
                mem_bytes: offer.mem_bytes,
                free: ctx.here.mem_free.max(0) as u64,
                reserve: ctx.here.reserve.max(0) as u64,
            });
        }
        if offer.kind == MoveKind::Load {
            let share = clamp01(offer.cpu_share);
            let r = ctx.here.runnable + share;
            let rate = expected_rate(ctx.here.speed, ctx.here.cpus, r);
            let there = offer.work_ms.max(0.0) / rate;
            let total = there + offer.cost_ms.max(0.0);
            // NaN never pays either.
            if total.partial_cmp(&offer.finish_here_ms) != Some(std::cmp::Ordering::Less) {
                return Err(Reason::NoLongerPays {
                    node,
                    runnable: ctx.here.runnable,
                    finish_there_ms: total,
                    finish_here_ms: offer.finish_here_ms,
                });
            }
        }
        let until = (now_ms as f64 + offer.cost_ms.max(0.0)).min(u64::MAX as f64 / 2.0) as u64;
        self.reserved.retain(|r| r.proc != offer.proc);
        self.reserved.push(Reserved {
            proc: offer.proc,
            share: clamp01(offer.cpu_share),
            mem: offer.mem_bytes,
            until: until.saturating_add(self.params.reservation_ms),
        });
        Ok(())
    }

    /// The move of `proc` to `to` did not happen (refused, or failed): forget its local
    /// accounting and offer `to` nothing for `refuse_backoff_ms`.
    pub fn refused(&mut self, now_ms: u64, proc: u64, to: u32) {
        if let Some(i) = self.sent.iter().position(|s| s.proc == proc && s.to == to) {
            let s = self.sent.swap_remove(i);
            if s.cost.is_finite() {
                self.link_free_at = (self.link_free_at - s.cost).max(now_ms as f64);
            }
        }
        self.backoff.retain(|&(n, _)| n != to);
        self.backoff
            .push((to, now_ms.saturating_add(self.params.refuse_backoff_ms)));
    }

    /// Accounts for a move decided elsewhere (`mosix migrate`), as if `tick` had sent it.
    pub fn record_move(&mut self, now_ms: u64, proc: &ProcInfo, to: u32) {
        let cost = cost_ms(&self.params, proc.mem_bytes);
        self.record(now_ms, proc, to, cost);
    }

    // ---- internals ----------------------------------------------------------------------

    /// The residency floor of `p`: `first_move_residency_ms` (never more than the floor)
    /// before its first move, `min_residency_ms` after.
    fn floor_ms(&self, p: &ProcInfo) -> u64 {
        if p.migrations == 0 {
            self.params
                .first_move_residency_ms
                .min(self.params.min_residency_ms)
        } else {
            self.params.min_residency_ms
        }
    }

    fn record(&mut self, now_ms: u64, p: &ProcInfo, to: u32, cost: f64) {
        let c = if cost.is_finite() {
            cost.min(1e15) as u64
        } else {
            0
        };
        self.sent.push(Sent {
            proc: p.id,
            to,
            share: clamp01(p.cpu_share),
            mem: p.mem_bytes,
            at: now_ms,
            cost,
            visible_after: now_ms
                .saturating_add(c)
                .saturating_add(self.params.settle_ms),
        });
        if cost.is_finite() {
            self.link_free_at = self.link_free_at.max(now_ms as f64) + cost;
        }
    }

    fn prune(&mut self, now: u64, procs: &[ProcInfo]) {
        let keep_for = self.params.stale_after_ms;
        self.sent
            .retain(|s| now <= s.visible_after.saturating_add(keep_for));
        self.reserved
            .retain(|r| now <= r.until && !procs.iter().any(|p| p.id == r.proc));
        self.backoff.retain(|&(_, until)| now < until);
    }

    fn in_flight(&self, now: u64, proc: u64) -> Option<u32> {
        self.sent
            .iter()
            .rev()
            .find(|s| s.proc == proc && now < s.visible_after)
            .map(|s| s.to)
    }

    fn work_ms(&self, p: &ProcInfo) -> f64 {
        p.work_done_ms.max(self.params.min_work_estimate_ms).max(1) as f64
    }

    fn pays(&self, finish_here: f64, total: f64) -> bool {
        let thr = clamp01(self.params.gain_threshold);
        total.is_finite() && total <= finish_here * (1.0 - thr) && total < finish_here
    }

    fn context(&self, now: u64, me: &NodeInfo, peers: &[NodeInfo], procs: &[ProcInfo]) -> Ctx {
        let p = &self.params;
        let recent_sent: f64 = self
            .sent
            .iter()
            .filter(|s| now < s.at.saturating_add(p.settle_ms))
            .map(|s| s.share)
            .sum();
        let here_share: f64 = procs
            .iter()
            .filter(|q| q.where_now == self.me)
            .map(|q| clamp01(q.cpu_share))
            .sum();
        let pending: Vec<&Reserved> = self
            .reserved
            .iter()
            .filter(|r| now <= r.until && !procs.iter().any(|q| q.id == r.proc))
            .collect();
        let reserved_share: f64 = pending.iter().map(|r| r.share).sum();
        let reserved_mem: i128 = pending.iter().map(|r| i128::from(r.mem)).sum();
        let leaving_mem: i128 = self
            .sent
            .iter()
            .filter(|s| now < s.visible_after)
            .map(|s| i128::from(s.mem))
            .sum();
        let own = if me.runnable.is_finite() {
            me.runnable
        } else {
            0.0
        };
        let runnable = (own - recent_sent).max(here_share) + reserved_share;
        let speed = if me.speed.is_finite() && me.speed > 0.0 {
            me.speed
        } else {
            0.0
        };
        let here = Here {
            speed,
            cpus: me.cpus.max(1),
            runnable,
            mem_free: (i128::from(me.mem_free) + leaving_mem).min(i128::from(me.mem_total))
                - reserved_mem,
            reserve: reserve_of(p, me.mem_total),
        };

        // Freshest entry per node (the first of equally fresh ones), this node excluded.
        let shadowed = |i: usize| -> bool {
            let (node, age) = (peers[i].node, peers[i].age_ms);
            peers.iter().enumerate().any(|(j, q)| {
                q.node == node && j != i && (q.age_ms < age || (q.age_ms == age && j < i))
            })
        };
        let unique: Vec<usize> = if peers.len() <= 64 {
            (0..peers.len())
                .filter(|&i| peers[i].node != self.me && !shadowed(i))
                .collect()
        } else {
            let mut idx: Vec<usize> = (0..peers.len())
                .filter(|&i| peers[i].node != self.me)
                .collect();
            idx.sort_unstable_by_key(|&i| (peers[i].node, peers[i].age_ms, i));
            idx.dedup_by_key(|i| peers[*i].node);
            idx.sort_unstable();
            idx
        };
        let views = unique
            .into_iter()
            .map(|i| {
                let n = &peers[i];
                let sampled_at = now.saturating_sub(n.age_ms);
                let mut runnable = n.runnable;
                let mut mem_free = i128::from(n.mem_free.min(n.mem_total));
                for s in self.sent.iter().filter(|s| s.to == n.node) {
                    if sampled_at < s.visible_after {
                        runnable += s.share;
                        mem_free -= i128::from(s.mem);
                    }
                }
                let sane =
                    n.speed.is_finite() && n.speed > 0.0 && runnable.is_finite() && runnable >= 0.0;
                Peer {
                    node: n.node,
                    speed: n.speed,
                    cpus: n.cpus.max(1),
                    runnable,
                    mem_free,
                    reserve: reserve_of(p, n.mem_total),
                    alive: n.up && sane,
                    fresh: n.age_ms <= p.stale_after_ms,
                    accepts: n.accepts_guests,
                    backoff: self
                        .backoff
                        .iter()
                        .any(|&(b, until)| b == n.node && now < until),
                    sent_now: 0,
                }
            })
            .collect::<Vec<Peer>>();
        Ctx {
            here,
            order: Vec::new(),
            peers: views,
        }
    }

    fn exclusion(peer: &Peer, p: &ProcInfo) -> Option<Cause> {
        if !peer.alive {
            Some(Cause::Down)
        } else if !peer.fresh {
            Some(Cause::Stale)
        } else if !peer.accepts && peer.node != p.home {
            Some(Cause::Blocked)
        } else if p.avoid.contains(&peer.node) {
            Some(Cause::Avoided)
        } else if peer.backoff {
            Some(Cause::Backoff)
        } else if peer.mem_free - peer.reserve < i128::from(p.mem_bytes) {
            Some(Cause::NoRoom)
        } else {
            None
        }
    }

    /// Common reasons to stay for automatic moves. Memory moves need only the residency
    /// floor; load moves the full residency.
    fn stay_reason(&self, p: &ProcInfo, kind: MoveKind) -> Option<Reason> {
        if p.where_now != self.me {
            return Some(Reason::NotHere {
                where_now: p.where_now,
            });
        }
        if p.pinned {
            return Some(Reason::Pinned);
        }
        if !p.auto {
            return Some(Reason::NotAuto);
        }
        if self.mode.stay {
            return Some(Reason::NodeStay);
        }
        if self.mode.lstay && p.home == self.me {
            return Some(Reason::LocalStay);
        }
        let needed = if kind == MoveKind::Load {
            self.residency_needed_ms(p)
        } else {
            self.floor_ms(p)
        };
        if p.resident_ms < needed {
            return Some(Reason::Residency {
                resident_ms: p.resident_ms,
                needed_ms: needed,
            });
        }
        None
    }

    /// Best destination for `p` with remaining work `w`: least expected finish there plus
    /// move cost (including waiting for this node's link). With `rng`, one of the
    /// destinations within `choice_slack` of the best is drawn (home first if among them).
    fn best_for(
        &self,
        now: u64,
        ctx: &Ctx,
        p: &ProcInfo,
        w: f64,
        rng: Option<&mut SplitMix64>,
    ) -> Result<Choice, Excluded> {
        let share = clamp01(p.cpu_share);
        let cost = cost_ms(&self.params, p.mem_bytes) + (self.link_free_at - now as f64).max(0.0);
        let mut ex = Excluded::default();
        let mut count = |c: Cause| match c {
            Cause::Down => ex.down += 1,
            Cause::Stale => ex.stale += 1,
            Cause::Blocked => ex.blocked += 1,
            Cause::Avoided => ex.avoided += 1,
            Cause::Backoff => ex.backoff += 1,
            Cause::NoRoom => ex.no_room += 1,
        };
        if share == 1.0 && rng.is_none() && ctx.order.len() == ctx.peers.len() {
            // Fast path: the cost is the same everywhere, so the best place is the first
            // usable peer in rate order (the same one the full scan below would find).
            for &(_, i) in &ctx.order {
                let peer = &ctx.peers[i];
                if let Some(c) = Self::exclusion(peer, p) {
                    count(c);
                    continue;
                }
                let there = w / expected_rate(peer.speed, peer.cpus, peer.runnable + share);
                return Ok(Choice {
                    peer: i,
                    finish_there: there,
                    cost,
                    total: there + cost,
                });
            }
            return Err(ex);
        }
        let mut best: Option<Choice> = None;
        for (i, peer) in ctx.peers.iter().enumerate() {
            if let Some(c) = Self::exclusion(peer, p) {
                count(c);
                continue;
            }
            let there = w / expected_rate(peer.speed, peer.cpus, peer.runnable + share);
            let total = there + cost;
            if best.is_none_or(|b| total < b.total) {
                best = Some(Choice {
                    peer: i,
                    finish_there: there,
                    cost,
                    total,
                });
            }
        }
        let Some(best) = best else { return Err(ex) };
        let Some(rng) = rng else { return Ok(best) };
        let slack = if self.params.choice_slack.is_finite() {
            self.params.choice_slack.max(0.0)
        } else {
            0.0
        };
        let limit = best.total * (1.0 + slack);
        let mut near: Vec<Choice> = Vec::new();
        for (i, peer) in ctx.peers.iter().enumerate() {
            if Self::exclusion(peer, p).is_some() {
                continue;
            }
            let there = w / expected_rate(peer.speed, peer.cpus, peer.runnable + share);
            let total = there + cost;
            if total <= limit {
                let c = Choice {
                    peer: i,
                    finish_there: there,
                    cost,
                    total,
                };
                if peer.node == p.home {
                    return Ok(c);
                }
                near.push(c);
            }
        }
        Ok(near
            .get(rng.below(near.len() as u64) as usize)
            .copied()
            .unwrap_or(best))
    }

    fn load_reason(&self, ctx: &Ctx, c: &Choice, finish_here: f64) -> Reason {
        let peer = &ctx.peers[c.peer];
        Reason::Load {
            to: peer.node,
            here: LoadSeen {
                speed: ctx.here.speed,
                runnable: ctx.here.runnable,
            },
            there: LoadSeen {
                speed: peer.speed,
                runnable: peer.runnable,
            },
            finish_here_ms: finish_here,
            finish_there_ms: c.finish_there,
            cost_ms: c.cost,
        }
    }

    fn memory_reason(&self, ctx: &Ctx, peer: usize, p: &ProcInfo) -> Reason {
        let peer = &ctx.peers[peer];
        Reason::Memory {
            to: peer.node,
            free_here: ctx.here.mem_free.max(0) as u64,
            reserve_here: ctx.here.reserve.max(0) as u64,
            free_there: peer.mem_free.max(0) as u64,
            mem_bytes: p.mem_bytes,
        }
    }

    /// Records a decision and updates this tick's view as if the move had happened.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        now: u64,
        ctx: &mut Ctx,
        p: &ProcInfo,
        c: &Choice,
        kind: MoveKind,
        finish_here: f64,
        w: f64,
        reason: Reason,
        out: &mut Vec<Decision>,
    ) {
        let share = clamp01(p.cpu_share);
        let to = ctx.peers[c.peer].node;
        ctx.here.runnable = (ctx.here.runnable - share).max(0.0);
        ctx.here.mem_free += i128::from(p.mem_bytes);
        let peer = &mut ctx.peers[c.peer];
        peer.runnable += share;
        peer.mem_free -= i128::from(p.mem_bytes);
        if kind == MoveKind::Load {
            // At most CPUs + 1 load moves to one node per tick: what this node knows of the
            // others may be partial (a young cluster, a window of a large one), and the next
            // tick, a moment later, may know better places.
            peer.sent_now += 1;
            if peer.sent_now > peer.cpus {
                peer.backoff = true;
            }
        }
        if !ctx.order.is_empty() {
            ctx.sort_order();
        }
        self.record(now, p, to, cost_ms(&self.params, p.mem_bytes));
        out.push(Decision {
            proc: p.id,
            to,
            reason,
            offer: Offer {
                proc: p.id,
                from: self.me,
                to,
                home: p.home,
                kind,
                mem_bytes: p.mem_bytes,
                cpu_share: share,
                work_ms: w,
                finish_here_ms: finish_here,
                cost_ms: c.cost,
            },
        });
    }

    /// Destination of a forced move (expel, evacuation): home if it can take the process,
    /// else the best node with room.
    fn forced_choice(
        &self,
        now: u64,
        ctx: &Ctx,
        p: &ProcInfo,
        rng: Option<&mut SplitMix64>,
    ) -> Result<(Choice, bool), Excluded> {
        let w = self.work_ms(p);
        let share = clamp01(p.cpu_share);
        if p.home != self.me {
            if let Some(i) = ctx.peers.iter().position(|q| q.node == p.home) {
                let peer = &ctx.peers[i];
                if Self::exclusion(peer, p).is_none() {
                    let cost = cost_ms(&self.params, p.mem_bytes)
                        + (self.link_free_at - now as f64).max(0.0);
                    let there = w / expected_rate(peer.speed, peer.cpus, peer.runnable + share);
                    return Ok((
                        Choice {
                            peer: i,
                            finish_there: there,
                            cost,
                            total: there + cost,
                        },
                        true,
                    ));
                }
            }
        }
        self.best_for(now, ctx, p, w, rng).map(|c| (c, false))
    }

    #[allow(clippy::too_many_arguments)]
    fn forced(
        &mut self,
        now: u64,
        ctx: &mut Ctx,
        procs: &[ProcInfo],
        taken: &mut [bool],
        kind: MoveKind,
        rng: &mut SplitMix64,
        out: &mut Vec<Decision>,
    ) {
        for (i, p) in procs.iter().enumerate() {
            if taken[i] || p.where_now != self.me || p.pinned || self.in_flight(now, p.id).is_some()
            {
                continue;
            }
            if kind == MoveKind::Expel && p.home == self.me {
                continue;
            }
            let Ok((c, home)) = self.forced_choice(now, ctx, p, Some(rng)) else {
                continue;
            };
            let to = ctx.peers[c.peer].node;
            let reason = if kind == MoveKind::Expel {
                Reason::Expel { to, home }
            } else {
                Reason::Evacuate { to, home }
            };
            let w = self.work_ms(p);
            let fh = w / expected_rate(ctx.here.speed, ctx.here.cpus, ctx.here.runnable);
            taken[i] = true;
            self.emit(now, ctx, p, &c, kind, fh, w, reason, out);
        }
    }

    /// Memory ushering: while free memory is below the reserve, send the process that best
    /// covers the deficit (the smallest that covers it, else the largest) to the best node
    /// with room for it.
    fn usher(
        &mut self,
        now: u64,
        ctx: &mut Ctx,
        procs: &[ProcInfo],
        taken: &mut [bool],
        rng: &mut SplitMix64,
        out: &mut Vec<Decision>,
    ) {
        while out.len() < self.params.max_sends_per_tick && ctx.here.mem_free < ctx.here.reserve {
            let deficit = ctx.here.reserve - ctx.here.mem_free;
            let mut order: Vec<usize> = (0..procs.len())
                .filter(|&i| {
                    !taken[i]
                        && self.stay_reason(&procs[i], MoveKind::Memory).is_none()
                        && self.in_flight(now, procs[i].id).is_none()
                })
                .collect();
            order.sort_by_key(|&i| {
                let m = i128::from(procs[i].mem_bytes);
                if m >= deficit {
                    (0, m, procs[i].id)
                } else {
                    (1, -m, procs[i].id)
                }
            });
            let mut sent = false;
            for i in order {
                let p = &procs[i];
                let w = self.work_ms(p);
                if let Ok(c) = self.best_for(now, ctx, p, w, Some(rng)) {
                    let reason = self.memory_reason(ctx, c.peer, p);
                    let fh = w / expected_rate(ctx.here.speed, ctx.here.cpus, ctx.here.runnable);
                    taken[i] = true;
                    self.emit(now, ctx, p, &c, MoveKind::Memory, fh, w, reason, out);
                    sent = true;
                    break;
                }
            }
            if !sent {
                break;
            }
        }
    }

    /// Load moves: repeatedly the process with the largest expected gain, while the gain
    /// passes the threshold and sends remain.
    fn load_moves(
        &mut self,
        now: u64,
        ctx: &mut Ctx,
        procs: &[ProcInfo],
        taken: &mut [bool],
        rng: &mut SplitMix64,
        out: &mut Vec<Decision>,
    ) {
        // Quick exit: no peer would give even an idle CPU-bound process a better rate.
        let here_rate = expected_rate(ctx.here.speed, ctx.here.cpus, ctx.here.runnable);
        let best_rate = ctx
            .peers
            .iter()
            .filter(|q| q.alive && q.fresh)
            .map(|q| {
                expected_rate(
                    q.speed,
                    q.cpus,
                    q.runnable + self.params.min_cpu_share.max(0.0),
                )
            })
            .fold(0.0, f64::max);
        if best_rate.partial_cmp(&here_rate) != Some(std::cmp::Ordering::Greater) {
            return;
        }
        ctx.sort_order();
        while out.len() < self.params.max_sends_per_tick {
            let mut best: Option<(usize, f64, f64)> = None; // (proc, gain, finish here)
            for (i, p) in procs.iter().enumerate() {
                if taken[i]
                    || clamp01(p.cpu_share) < self.params.min_cpu_share
                    || self.stay_reason(p, MoveKind::Load).is_some()
                    || self.in_flight(now, p.id).is_some()
                {
                    continue;
                }
                let w = self.work_ms(p);
                let fh = w / expected_rate(ctx.here.speed, ctx.here.cpus, ctx.here.runnable);
                if let Ok(c) = self.best_for(now, ctx, p, w, None) {
                    if self.pays(fh, c.total) && best.is_none_or(|(_, g, _)| fh - c.total > g) {
                        best = Some((i, fh - c.total, fh));
                    }
                }
            }
            let Some((i, _, fh)) = best else { break };
            let p = &procs[i];
            let w = self.work_ms(p);
            let Ok(mut c) = self.best_for(now, ctx, p, w, Some(rng)) else {
                break;
            };
            if !self.pays(fh, c.total) {
                match self.best_for(now, ctx, p, w, None) {
                    Ok(b) => c = b,
                    Err(_) => break,
                }
            }
            taken[i] = true;
            let gain = (fh - c.total) / fh;
            let scale = self.params.send_prob_scale;
            if scale > 0.0 && scale.is_finite() {
                let prob = (gain / (scale * self.params.gain_threshold.max(1e-9))).min(1.0);
                if rng.next_f64() >= prob {
                    continue;
                }
            }
            let reason = self.load_reason(ctx, &c, fh);
            self.emit(now, ctx, p, &c, MoveKind::Load, fh, w, reason, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn node(n: u32, speed: f64, runnable: f64) -> NodeInfo {
        NodeInfo {
            runnable,
            ..NodeInfo::idle(n, speed, 4 * GIB)
        }
    }

    fn jobs(node: u32, k: u64, resident_ms: u64) -> Vec<ProcInfo> {
        (0..k)
            .map(|i| ProcInfo::cpu_bound(i + 1, node, 2 * MIB, resident_ms))
            .collect()
    }

    #[test]
    fn single_job_goes_to_fastest() {
        let mut b = Balancer::new(1, Params::default());
        let me = node(1, 1.0, 1.0);
        let peers = [node(2, 1.0, 0.0), node(3, 1.0, 0.0), node(4, 3.0, 0.0)];
        let d = b.tick(10_000, &me, &peers, &jobs(1, 1, 10_000), 1);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].to, 4);
        let s = d[0].reason.to_string();
        assert!(
            s.starts_with("node 4 is 3.0x faster and idle: expected finish 10.0s -> 3.3s"),
            "{s}"
        );
    }

    #[test]
    fn equal_idle_node_is_no_gain() {
        let b = Balancer::new(1, Params::default());
        let me = node(1, 1.0, 1.0);
        let peers = [node(2, 1.0, 0.0)];
        let procs = jobs(1, 1, 10_000);
        let r = b.explain(10_000, &me, &peers, &procs, 1).unwrap();
        assert!(matches!(r, Reason::NoGain { best: Some(2), .. }), "{r:?}");
        assert!(r.to_string().starts_with("no faster place"), "{r}");
    }

    #[test]
    fn faq_eight_jobs_spread_without_herding() {
        // 8 jobs on node 1; peers idle and their gossip does not change for several ticks:
        // local accounting alone must spread them 2 per node.
        let mut b = Balancer::new(
            1,
            Params {
                send_prob_scale: 0.0,
                ..Params::default()
            },
        );
        let mut procs = jobs(1, 8, 5_000);
        let mut per = [0usize; 5];
        let mut prev = 8;
        for t in 0..4u64 {
            let now = 5_000 + t * 1000;
            let peers: Vec<_> = (2..=4)
                .map(|n| NodeInfo {
                    age_ms: 300 + t * 1000,
                    ..node(n, 1.0, 0.0)
                })
                .collect();
            // Own load average lags a tick behind: accounting must correct it.
            let me = node(1, 1.0, prev as f64);
            prev = procs.len();
            for p in procs.iter_mut() {
                p.resident_ms = now;
            }
            let d = b.tick(now, &me, &peers, &procs, t);
            for x in &d {
                per[x.to as usize] += 1;
            }
            procs.retain(|p| !d.iter().any(|x| x.proc == p.id));
        }
        assert_eq!(procs.len(), 2, "{per:?}");
        assert_eq!(&per[2..], &[2, 2, 2]);
    }

    #[test]
    fn residency_and_pinning() {
        let mut b = Balancer::new(1, Params::default());
        let me = node(1, 1.0, 3.0);
        let peers = [node(2, 3.0, 0.0)];
        let mut procs = jobs(1, 3, 500);
        procs[0].migrations = 1;
        procs[1].pinned = true;
        procs[2].auto = false;
        assert!(b.tick(500, &me, &peers, &procs, 0).is_empty());
        assert_eq!(
            b.explain(500, &me, &peers, &procs, 1).unwrap().to_string(),
            format!(
                "resident 0.50s < {} needed",
                crate::secs(b.residency_needed_ms(&procs[0]) as f64)
            )
        );
        assert_eq!(b.explain(500, &me, &peers, &procs, 2), Some(Reason::Pinned));
        assert_eq!(
            b.explain(500, &me, &peers, &procs, 3),
            Some(Reason::NotAuto)
        );
    }

    #[test]
    fn memory_ushering_sends_to_room_only() {
        let mut b = Balancer::new(1, Params::default());
        let me = NodeInfo {
            mem_free: 100 * MIB,
            runnable: 2.0,
            ..node(1, 1.0, 0.0)
        };
        let full = NodeInfo {
            mem_free: 300 * MIB,
            ..node(2, 1.0, 0.0)
        };
        let roomy = NodeInfo {
            runnable: 3.0,
            ..node(3, 1.0, 0.0)
        };
        let mut procs = jobs(1, 2, 2_000);
        procs[0].mem_bytes = GIB;
        procs[1].mem_bytes = 500 * MIB;
        let d = b.tick(2_000, &me, &[full, roomy], &procs, 0);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].to, 3);
        assert_eq!(d[0].proc, 2, "smallest process covering the deficit");
        assert!(
            d[0].reason.to_string().starts_with("short of memory"),
            "{}",
            d[0].reason
        );
    }

    #[test]
    fn receiver_refuses_when_it_no_longer_pays() {
        let mut sender = Balancer::new(
            1,
            Params {
                send_prob_scale: 0.0,
                ..Params::default()
            },
        );
        let me = node(1, 1.0, 2.0);
        let peers = [node(2, 1.0, 0.0)];
        let d = sender.tick(10_000, &me, &peers, &jobs(1, 2, 10_000), 0);
        assert_eq!(d.len(), 1);
        let mut recv = Balancer::new(2, Params::default());
        // Meanwhile node 2 got two processes of its own.
        let busy = node(2, 1.0, 2.0);
        let err = recv
            .admit(10_000, &busy, &jobs(2, 2, 100), &d[0].offer)
            .unwrap_err();
        assert!(
            matches!(err, Reason::NoLongerPays { node: 2, .. }),
            "{err:?}"
        );
        sender.refused(10_000, d[0].proc, 2);
        let r = sender
            .explain(10_500, &me, &peers, &jobs(1, 2, 10_500), 1)
            .unwrap();
        assert!(matches!(r, Reason::NoDestination { .. }), "{r:?}");
        // An idle receiver accepts, and counts the guest until it arrives.
        let mut idle = Balancer::new(2, Params::default());
        idle.admit(10_000, &node(2, 1.0, 0.0), &[], &d[0].offer)
            .unwrap();
        let again = idle.admit(
            10_000,
            &node(2, 1.0, 0.0),
            &[],
            &Offer {
                proc: 99,
                ..d[0].offer.clone()
            },
        );
        assert!(again.is_err(), "second guest at once would not pay");
    }

    #[test]
    fn modes() {
        let me = node(1, 1.0, 3.0);
        let peers = [node(2, 1.0, 0.0), node(3, 1.0, 0.0)];
        let mut procs = jobs(1, 3, 10_000);
        procs[0].home = 3;
        let mut b = Balancer::new(1, Params::default());
        b.set_mode(NodeMode {
            stay: true,
            ..Default::default()
        });
        assert!(b.tick(10_000, &me, &peers, &procs, 0).is_empty());
        assert_eq!(
            b.explain(10_000, &me, &peers, &procs, 2),
            Some(Reason::NodeStay)
        );
        b.set_mode(NodeMode {
            lstay: true,
            ..Default::default()
        });
        let d = b.tick(10_000, &me, &peers, &procs, 0);
        assert_eq!(
            d.iter().map(|d| d.proc).collect::<Vec<_>>(),
            vec![1],
            "only the guest"
        );
        let mut b = Balancer::new(1, Params::default());
        b.set_mode(NodeMode {
            expel: true,
            ..Default::default()
        });
        let d = b.tick(10_000, &node(1, 1.0, 1.0), &peers, &procs[..1], 0);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].to, 3);
        assert_eq!(
            d[0].reason.to_string(),
            "node expels guests (mosctl expel): back to home node 3"
        );
        let offer = Offer {
            home: 7,
            ..d[0].offer.clone()
        };
        assert!(matches!(
            b.admit(10_000, &me, &[], &offer),
            Err(Reason::Blocking { node: 1 })
        ));
    }

    #[test]
    fn evacuation_prefers_home_and_keeps_pinned() {
        let mut b = Balancer::new(1, Params::default());
        let me = node(1, 1.0, 3.0);
        let peers = [node(2, 1.0, 5.0), node(3, 2.0, 0.0)];
        let mut procs = jobs(1, 3, 0);
        procs[0].home = 2;
        procs[1].pinned = true;
        let d = b.evacuate(0, &me, &peers, &procs, 0);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].proc, d[0].to), (1, 2));
        assert_eq!((d[1].proc, d[1].to), (3, 3));
    }

    #[test]
    fn stale_down_blocked_avoided_are_never_used() {
        let mut b = Balancer::new(1, Params::default());
        let me = node(1, 1.0, 4.0);
        let peers = [
            NodeInfo {
                up: false,
                ..node(2, 3.0, 0.0)
            },
            NodeInfo {
                age_ms: 60_000,
                ..node(3, 3.0, 0.0)
            },
            NodeInfo {
                accepts_guests: false,
                ..node(4, 3.0, 0.0)
            },
            node(5, 3.0, 0.0),
            NodeInfo {
                speed: f64::NAN,
                ..node(6, 3.0, 0.0)
            },
        ];
        let mut procs = jobs(1, 4, 10_000);
        for p in &mut procs {
            p.avoid = vec![5];
        }
        assert!(b.tick(10_000, &me, &peers, &procs, 0).is_empty());
        assert_eq!(
            b.explain(10_000, &me, &peers, &procs, 1).unwrap().to_string(),
            "no node can take it: 2 down, 1 with stale load information, 1 blocking guests, 1 avoided by the process"
        );
    }

    #[test]
    fn garbage_input_does_not_panic() {
        let mut b = Balancer::new(
            1,
            Params {
                link_bytes_per_sec: 0.0,
                gain_threshold: f64::NAN,
                ..Params::default()
            },
        );
        let me = NodeInfo {
            runnable: f64::NAN,
            speed: -1.0,
            cpus: 0,
            ..node(1, 1.0, 0.0)
        };
        let peers = [
            NodeInfo {
                runnable: f64::INFINITY,
                ..node(2, 1.0, 0.0)
            },
            node(1, 1.0, 0.0),
        ];
        let mut procs = jobs(1, 2, u64::MAX);
        procs[0].cpu_share = f64::NAN;
        procs[1].mem_bytes = u64::MAX;
        let _ = b.tick(u64::MAX, &me, &peers, &procs, 0);
        let _ = b.evacuate(u64::MAX, &me, &peers, &procs, 0);
        let _ = b.explain(0, &me, &peers, &procs, 1);
    }
}
