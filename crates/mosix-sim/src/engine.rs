//! The discrete-event engine: processor sharing on every node, migrations over the link,
//! MOSIX-style gossip of load windows, node leave/return, and the three policies.

use crate::scenario::{EventKind, Scenario};
use mosix_balance::rng::SplitMix64;
use mosix_balance::{cost_ms, Balancer, Decision, MoveKind, NodeInfo, ProcInfo, Reason};
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

/// Which scheduler runs the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// mosix-balance on every node, decentralised, on gossiped information.
    Mosix,
    /// No migration: every job runs where it was started.
    None,
    /// A central batch scheduler with perfect knowledge places each job once, at arrival,
    /// on the least-loaded node with room (load = jobs per CPU / speed), and never moves it.
    Initial,
}

impl Policy {
    /// All policies, in report order.
    pub const ALL: [Policy; 3] = [Policy::Mosix, Policy::Initial, Policy::None];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Mosix => "mosix",
            Policy::None => "none",
            Policy::Initial => "initial",
        }
    }

    /// Parses "mosix", "none", "initial" (or "all" = every policy).
    pub fn parse_list(s: &str) -> Result<Vec<Policy>, String> {
        match s {
            "mosix" => Ok(vec![Policy::Mosix]),
            "none" => Ok(vec![Policy::None]),
            "initial" => Ok(vec![Policy::Initial]),
            "all" => Ok(Policy::ALL.to_vec()),
            other => Err(format!(
                "unknown policy '{other}' (mosix, none, initial, all)"
            )),
        }
    }
}

/// What to record besides the summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Record every migration and where jobs were (for tests and `--json` digging).
    pub trace: bool,
}

/// One migration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Migration {
    /// Index of the job in `Scenario::jobs`.
    pub job: usize,
    pub from: u32,
    pub to: u32,
    pub start_s: f64,
    /// When it arrived (it was frozen in between); NaN if it never did.
    pub arrive_s: f64,
    pub kind: MoveKind,
    pub reason: String,
}

/// Details of one run, when asked for.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Trace {
    pub migrations: Vec<Migration>,
    /// Jobs running on each node (index = node − 1) just before the first job finished.
    pub jobs_per_node_at_first_completion: Vec<u32>,
    /// Node each job finished on (0 if it did not finish), in scenario order.
    pub final_node: Vec<u32>,
}

/// Raw results of one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunStats {
    pub policy: Policy,
    /// Time the last job finished (None if some never did).
    pub makespan_s: Option<f64>,
    /// When the simulation stopped.
    pub end_s: f64,
    pub jobs_done: usize,
    pub unfinished: usize,
    /// Mean over finished jobs of (finish − arrival) / work: 1.0 = as fast as alone on an
    /// idle speed-1 node.
    pub mean_slowdown: f64,
    pub max_slowdown: f64,
    /// Migrations started (balancing, expel and evacuation).
    pub migrations: u64,
    /// Of which forced by a node leaving.
    pub evacuations: u64,
    /// Offers a receiver refused (or a down node never answered).
    pub refused_offers: u64,
    /// The same, by cause: no_longer_pays, no_room, blocking, leaving, down.
    pub refused_by: BTreeMap<String, u64>,
    /// Migrations whose destination went down before they arrived (the job went back).
    pub failed_migrations: u64,
    /// Balancing moves A→B followed by B→A of the same job within `PINGPONG_WINDOW_S`.
    pub pingpongs: u64,
    /// Migrations that arrived where the node's memory was then overcommitted.
    pub landed_without_room: u64,
    /// Jobs started on a node that was down, redirected to the next node up.
    pub redirected_arrivals: u64,
    /// Gossip, offers and answers (and the batch scheduler's placement messages).
    pub messages: u64,
    pub events: u64,
    pub trace: Option<Trace>,
}

/// A return move within this many seconds of the move out counts as a ping-pong.
pub const PINGPONG_WINDOW_S: f64 = 30.0;

#[derive(Clone, Copy, Debug, PartialEq)]
enum EvKind {
    Arrive(u32),
    Complete(u32, u32),
    TransferStart {
        job: u32,
        from: u32,
        to: u32,
        balancing: bool,
        end: f64,
    },
    TransferDone {
        job: u32,
        from: u32,
        to: u32,
        balancing: bool,
    },
    Leave(u32, f64),
    Gossip(u32),
    Tick(u32),
    PowerOff(u32, u32),
    Return(u32),
}

#[derive(Clone, Copy, Debug)]
struct Ev {
    t: f64,
    seq: u64,
    kind: EvKind,
}

impl PartialEq for Ev {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    // Reversed: BinaryHeap pops the earliest (then the first pushed).
    fn cmp(&self, o: &Self) -> Ordering {
        o.t.total_cmp(&self.t).then(o.seq.cmp(&self.seq))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum St {
    Pending,
    Running,
    /// Running, but accepted elsewhere and waiting for the sender's link.
    Queued,
    Transfer,
    Frozen,
    Done,
}

#[derive(Clone, Debug)]
struct Job {
    node: u32,
    st: St,
    /// Work left, seconds of a speed-1 CPU (while not running; see `Run::vt_end`).
    remaining: f64,
    /// Migrations so far.
    moves: u32,
    last_balance: Option<(u32, u32, f64)>,
    done_at: f64,
}

/// A gossip entry: what a node knows of another.
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    t: f64,
    node: u32,
    runnable: f32,
    /// Free memory in MiB, rounded down.
    mem_free_mib: u32,
    accepts: bool,
    leaving: bool,
}

/// A running job, with what the hot paths need kept beside the node (no job lookups).
#[derive(Clone, Copy, Debug)]
struct Run {
    /// Node virtual time at which it finishes.
    vt_end: f64,
    /// Arrival on this node.
    since: f64,
    work: f64,
    mem: u64,
    job: u32,
    home: u32,
    moves: u32,
    pinned: bool,
    auto: bool,
    has_avoid: bool,
}

#[derive(Clone, Debug)]
struct Node {
    up: bool,
    withdrawn: bool,
    leave_seq: u32,
    running: Vec<Run>,
    frozen: Vec<u32>,
    vt: f64,
    vt_t: f64,
    rate: f64,
    gen: u32,
    /// Time of the pending completion wake-up (infinite if none).
    wake_t: f64,
    ema: f64,
    ema_t: f64,
    mem_used: u64,
    link_free: f64,
    place_key: Option<u64>,
}

struct Sim<'a> {
    s: &'a Scenario,
    policy: Policy,
    rng: SplitMix64,
    now: f64,
    heap: BinaryHeap<Ev>,
    seq: u64,
    /// Gossip windows, `window` slots per node (node n's at n × window), freshest first.
    win: Vec<Entry>,
    win_len: Vec<u32>,
    /// Copy of `Node::up`, compact for gossip's random accesses.
    up: Vec<bool>,
    /// Periodic events of equal period stay in time order in a FIFO: (time, node).
    gossip_q: VecDeque<(f64, u32)>,
    tick_q: VecDeque<(f64, u32)>,
    nodes: Vec<Node>,
    jobs: Vec<Job>,
    bal: Vec<Balancer>,
    place: BTreeSet<(u64, u32)>,
    stats: RunStats,
    done: usize,
    running_or_moving: usize,
    pending_arrivals: usize,
    pending_returns: usize,
    slowdown_sum: f64,
    first_done: bool,
    tick_s: f64,
    tau_s: f64,
    pending_trace: std::collections::HashMap<u32, (MoveKind, String)>,
    peers_buf: Vec<NodeInfo>,
    procs_buf: Vec<ProcInfo>,
    gossip_buf: Vec<Entry>,
}

/// Runs one policy on a scenario. Deterministic in (scenario, policy, seed).
pub fn simulate(
    s: &Scenario,
    policy: Policy,
    seed: u64,
    opts: RunOptions,
    max_time_s: f64,
) -> RunStats {
    // Scenarios built in code are not validated like files: make them safe to run.
    let fixed;
    let s = if needs_fixing(s) {
        fixed = fix(s);
        &fixed
    } else {
        s
    };
    let n = s.nodes.len();
    let rng = SplitMix64::new(seed ^ 0x51_6d_6f_73_69_78);
    let tick_s = s.tick_ms.max(1) as f64 / 1000.0;
    let nodes = (0..n)
        .map(|_| Node {
            up: true,
            withdrawn: false,
            leave_seq: 0,
            running: Vec::new(),
            frozen: Vec::new(),
            vt: 0.0,
            vt_t: 0.0,
            rate: 0.0,
            gen: 0,
            wake_t: f64::INFINITY,
            ema: 0.0,
            ema_t: 0.0,
            mem_used: 0,
            link_free: 0.0,
            place_key: None,
        })
        .collect();
    let params = s.policy_params();
    let bal = if policy == Policy::Mosix {
        (0..n)
            .map(|i| Balancer::new(i as u32 + 1, params.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let mut sim = Sim {
        s,
        policy,
        rng,
        now: 0.0,
        heap: BinaryHeap::new(),
        seq: 0,
        gossip_q: VecDeque::new(),
        tick_q: VecDeque::new(),
        win: if policy == Policy::Mosix {
            vec![Entry::default(); n * s.gossip.window]
        } else {
            Vec::new()
        },
        win_len: vec![0; n],
        up: vec![true; n],
        nodes,
        jobs: s
            .jobs
            .iter()
            .map(|j| Job {
                node: j.home.saturating_sub(1),
                st: St::Pending,
                remaining: j.work_s,
                moves: 0,
                last_balance: None,
                done_at: f64::NAN,
            })
            .collect(),
        bal,
        place: BTreeSet::new(),
        stats: RunStats {
            policy,
            makespan_s: None,
            end_s: 0.0,
            jobs_done: 0,
            unfinished: 0,
            mean_slowdown: 0.0,
            max_slowdown: 0.0,
            migrations: 0,
            evacuations: 0,
            refused_offers: 0,
            refused_by: BTreeMap::new(),
            failed_migrations: 0,
            pingpongs: 0,
            landed_without_room: 0,
            redirected_arrivals: 0,
            messages: 0,
            events: 0,
            trace: opts.trace.then(|| Trace {
                final_node: vec![0; s.jobs.len()],
                ..Default::default()
            }),
        },
        done: 0,
        running_or_moving: 0,
        pending_arrivals: s.jobs.len(),
        pending_returns: 0,
        slowdown_sum: 0.0,
        first_done: false,
        tick_s,
        tau_s: s.load_tau_ms / 1000.0,
        pending_trace: Default::default(),
        peers_buf: Vec::new(),
        procs_buf: Vec::new(),
        gossip_buf: Vec::new(),
    };
    sim.start();
    sim.run(max_time_s);
    sim.finish()
}

fn needs_fixing(s: &Scenario) -> bool {
    let bad_num = |x: f64| !(x.is_finite() && x > 0.0);
    s.nodes.is_empty()
        || s.nodes.iter().any(|n| bad_num(n.speed) || n.cpus == 0)
        || s.jobs.iter().any(|j| {
            bad_num(j.work_s)
                || !(j.at_s.is_finite() && j.at_s >= 0.0)
                || j.home == 0
                || j.home as usize > s.nodes.len()
        })
}

/// Unusable values replaced: at least one node, speeds and work positive, homes in range.
fn fix(s: &Scenario) -> Scenario {
    let mut s = s.clone();
    if s.nodes.is_empty() {
        s.nodes.push(crate::scenario::NodeSpec {
            speed: 1.0,
            cpus: 1,
            mem_bytes: 1 << 30,
        });
    }
    let len = s.nodes.len() as u32;
    for n in &mut s.nodes {
        if !(n.speed.is_finite() && n.speed > 0.0) {
            n.speed = 1e-6;
        }
        n.cpus = n.cpus.max(1);
    }
    for j in &mut s.jobs {
        if !(j.work_s.is_finite() && j.work_s > 0.0) {
            j.work_s = 1e-3;
        }
        if !(j.at_s.is_finite() && j.at_s >= 0.0) {
            j.at_s = 0.0;
        }
        j.home = j.home.clamp(1, len);
    }
    s.jobs.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    s
}

impl Sim<'_> {
    fn push(&mut self, t: f64, kind: EvKind) {
        self.seq += 1;
        self.heap.push(Ev {
            t,
            seq: self.seq,
            kind,
        });
    }

    fn start(&mut self) {
        for (i, j) in self.s.jobs.iter().enumerate() {
            self.push(j.at_s, EvKind::Arrive(i as u32));
        }
        for e in &self.s.events {
            let node = e.node.saturating_sub(1);
            match e.kind {
                EventKind::Leave { grace_s } => self.push(e.at_s, EvKind::Leave(node, grace_s)),
                EventKind::Return => {
                    self.pending_returns += 1;
                    self.push(e.at_s, EvKind::Return(node));
                }
            }
        }
        let period = self.s.gossip.period_ms as f64 / 1000.0;
        if self.policy == Policy::Mosix {
            // Every node gossips and ticks periodically, phases spread evenly in node order
            // (from a random start): unsynchronised, and kind to the cache.
            let len = self.nodes.len();
            let phases = |off: f64, period: f64| -> VecDeque<(f64, u32)> {
                let mut v: Vec<(f64, u32)> = (0..len)
                    .map(|i| (((i as f64 / len as f64) + off).fract() * period, i as u32))
                    .collect();
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                v.into()
            };
            let (og, ot) = (self.rng.next_f64(), self.rng.next_f64());
            self.gossip_q = phases(og, period);
            self.tick_q = phases(ot, self.tick_s);
            if self.s.gossip.warm_start {
                self.warm_up();
            }
        }
        if self.policy == Policy::Initial {
            for i in 0..self.nodes.len() {
                self.update_place(i);
            }
        }
    }

    /// The next event: heap, gossip or tick, whichever is first (in that order on ties).
    fn next_event(&mut self) -> Option<(f64, EvKind)> {
        let th = self.heap.peek().map_or(f64::INFINITY, |e| e.t);
        let tg = self.gossip_q.front().map_or(f64::INFINITY, |e| e.0);
        let tt = self.tick_q.front().map_or(f64::INFINITY, |e| e.0);
        if th <= tg && th <= tt {
            self.heap.pop().map(|e| (e.t, e.kind))
        } else if tg <= tt {
            let (t, n) = self.gossip_q.pop_front()?;
            let period = self.s.gossip.period_ms as f64 / 1000.0;
            self.gossip_q.push_back((t + period, n));
            Some((t, EvKind::Gossip(n)))
        } else {
            let (t, n) = self.tick_q.pop_front()?;
            self.tick_q.push_back((t + self.tick_s, n));
            Some((t, EvKind::Tick(n)))
        }
    }

    fn run(&mut self, max_time_s: f64) {
        while let Some((t, kind)) = self.next_event() {
            if t > max_time_s {
                self.now = max_time_s;
                break;
            }
            self.now = t;
            self.stats.events += 1;
            match kind {
                EvKind::Arrive(j) => self.arrive(j as usize),
                EvKind::Complete(n, gen) => self.complete(n as usize, gen),
                EvKind::TransferStart {
                    job,
                    from,
                    to,
                    balancing,
                    end,
                } => self.transfer_start(job as usize, from as usize, to as usize, balancing, end),
                EvKind::TransferDone {
                    job,
                    from,
                    to,
                    balancing,
                } => self.transfer_done(job as usize, from as usize, to as usize, balancing),
                EvKind::Tick(n) => self.tick(n as usize),
                EvKind::Gossip(n) => self.gossip(n as usize),
                EvKind::Leave(n, grace) => self.leave(n as usize, grace),
                EvKind::PowerOff(n, seq) => self.power_off(n as usize, seq),
                EvKind::Return(n) => {
                    self.pending_returns -= 1;
                    self.node_return(n as usize)
                }
            }
            if self.done == self.jobs.len() {
                break;
            }
            if self.running_or_moving == 0
                && self.pending_arrivals == 0
                && self.pending_returns == 0
            {
                break; // what is left is frozen for good
            }
        }
        self.stats.end_s = self.now;
    }

    fn finish(mut self) -> RunStats {
        let st = &mut self.stats;
        st.jobs_done = self.done;
        st.unfinished = self.jobs.len() - self.done;
        if self.done > 0 {
            st.mean_slowdown = self.slowdown_sum / self.done as f64;
        }
        if st.unfinished == 0 {
            st.makespan_s = Some(self.jobs.iter().map(|j| j.done_at).fold(0.0, f64::max));
        }
        self.stats
    }

    // ---- processor sharing --------------------------------------------------------------

    /// Brings node `n`'s virtual time and load average up to now.
    fn advance(&mut self, n: usize) {
        let now = self.now;
        let tau = self.tau_s;
        let node = &mut self.nodes[n];
        if !node.running.is_empty() {
            node.vt += node.rate * (now - node.vt_t);
        }
        node.vt_t = now;
        let k = node.running.len() as f64;
        node.ema = if tau > 0.0 {
            k + (node.ema - k) * (-(now - node.ema_t) / tau).exp()
        } else {
            k
        };
        node.ema_t = now;
    }

    fn ema_now(&self, n: usize) -> f64 {
        let node = &self.nodes[n];
        let k = node.running.len() as f64;
        if self.tau_s > 0.0 {
            k + (node.ema - k) * (-(self.now - node.ema_t) / self.tau_s).exp()
        } else {
            k
        }
    }

    /// Recomputes node `n`'s per-job rate and schedules its next completion.
    fn refresh(&mut self, n: usize) {
        let spec = &self.s.nodes[n];
        let node = &mut self.nodes[n];
        let mut speed = spec.speed;
        if node.mem_used > spec.mem_bytes && spec.mem_bytes > 0 {
            let over = (node.mem_used - spec.mem_bytes) as f64 / spec.mem_bytes as f64;
            speed /= 1.0 + self.s.swap_penalty * over;
        }
        let k = node.running.len();
        node.rate = if k == 0 {
            0.0
        } else {
            speed * (spec.cpus as f64 / k as f64).min(1.0)
        };
        if k > 0 && node.up {
            let min = node
                .running
                .iter()
                .map(|r| r.vt_end)
                .fold(f64::INFINITY, f64::min);
            let t = self.now + ((min - node.vt) / node.rate).max(0.0);
            // Only an earlier wake-up is pushed; a later one is found by the pending one.
            if t < node.wake_t {
                node.gen = node.gen.wrapping_add(1);
                node.wake_t = t;
                let gen = node.gen;
                self.push(t, EvKind::Complete(n as u32, gen));
            }
        }
        if self.policy == Policy::Initial {
            self.update_place(n);
        }
    }

    /// Starts job `j` running on node `n` (whose clock is current), arrived at `since`.
    fn add_running(&mut self, n: usize, j: usize, since: f64) {
        let vt = self.nodes[n].vt;
        let spec = &self.s.jobs[j];
        let job = &mut self.jobs[j];
        job.node = n as u32;
        job.st = St::Running;
        self.nodes[n].running.push(Run {
            vt_end: vt + job.remaining,
            since,
            work: spec.work_s,
            mem: spec.mem_bytes,
            job: j as u32,
            home: spec.home,
            moves: job.moves,
            pinned: spec.pinned,
            auto: spec.auto,
            has_avoid: !spec.avoid.is_empty(),
        });
    }

    /// Stops job `j` on node `n` (whose clock is current), keeping its work left.
    fn remove_running(&mut self, n: usize, j: usize) {
        let node = &mut self.nodes[n];
        if let Some(pos) = node.running.iter().position(|r| r.job as usize == j) {
            let r = node.running.swap_remove(pos);
            self.jobs[j].remaining = (r.vt_end - node.vt).max(0.0);
        }
    }

    // ---- jobs ---------------------------------------------------------------------------

    fn first_up_from(&self, n: usize) -> Option<usize> {
        let len = self.nodes.len();
        (0..len).map(|d| (n + d) % len).find(|&i| self.nodes[i].up)
    }

    fn arrive(&mut self, j: usize) {
        self.pending_arrivals -= 1;
        let spec = &self.s.jobs[j];
        let home = (spec.home.saturating_sub(1) as usize).min(self.nodes.len() - 1);
        let mut target = home;
        if self.policy == Policy::Initial {
            self.stats.messages += 2;
            if !spec.pinned {
                if let Some(t) = self.place_for(j) {
                    target = t;
                }
            }
        }
        if !self.nodes[target].up {
            match self.first_up_from(target) {
                Some(t) => {
                    self.stats.redirected_arrivals += 1;
                    target = t;
                }
                None => {
                    // Nothing is up: it waits frozen at home.
                    self.jobs[j].node = home as u32;
                    self.jobs[j].st = St::Frozen;
                    self.nodes[home].frozen.push(j as u32);
                    self.nodes[home].mem_used =
                        self.nodes[home].mem_used.saturating_add(spec.mem_bytes);
                    return;
                }
            }
        }
        self.advance(target);
        self.add_running(target, j, self.now);
        self.nodes[target].mem_used = self.nodes[target].mem_used.saturating_add(spec.mem_bytes);
        self.running_or_moving += 1;
        self.refresh(target);
    }

    fn complete(&mut self, n: usize, gen: u32) {
        if self.nodes[n].gen != gen {
            return;
        }
        self.nodes[n].wake_t = f64::INFINITY;
        self.advance(n);
        let (vt, rate, now) = (self.nodes[n].vt, self.nodes[n].rate, self.now);
        let eps = 1e-9 * vt.abs().max(1.0);
        // Due: done within rounding, or so close that the clock cannot tell.
        let finished: Vec<u32> = self.nodes[n]
            .running
            .iter()
            .filter(|r| {
                let left = r.vt_end - vt;
                left <= eps || now + left / rate <= now
            })
            .map(|r| r.job)
            .collect();
        if !self.first_done && !finished.is_empty() {
            self.first_done = true;
            if let Some(tr) = self.stats.trace.as_mut() {
                tr.jobs_per_node_at_first_completion =
                    self.nodes.iter().map(|x| x.running.len() as u32).collect();
            }
        }
        for j in finished {
            let j = j as usize;
            self.remove_running(n, j);
            let spec = &self.s.jobs[j];
            self.nodes[n].mem_used = self.nodes[n].mem_used.saturating_sub(spec.mem_bytes);
            let job = &mut self.jobs[j];
            job.st = St::Done;
            job.done_at = self.now;
            job.remaining = 0.0;
            self.done += 1;
            self.running_or_moving -= 1;
            let slow = (self.now - spec.at_s) / spec.work_s;
            self.slowdown_sum += slow;
            self.stats.max_slowdown = self.stats.max_slowdown.max(slow);
            if self.policy == Policy::Initial {
                self.stats.messages += 1;
            }
            if let Some(tr) = self.stats.trace.as_mut() {
                tr.final_node[j] = n as u32 + 1;
            }
        }
        self.refresh(n);
    }

    // ---- the batch scheduler ------------------------------------------------------------

    fn place_key(&self, n: usize) -> Option<u64> {
        let node = &self.nodes[n];
        if !node.up || node.withdrawn {
            return None;
        }
        let spec = &self.s.nodes[n];
        let k = (node.running.len() + 1) as f64;
        let key = (k / spec.cpus as f64).max(1.0) / spec.speed;
        Some(key.to_bits())
    }

    fn update_place(&mut self, n: usize) {
        let new = self.place_key(n);
        let node = &mut self.nodes[n];
        if node.place_key == new {
            return;
        }
        if let Some(old) = node.place_key {
            self.place.remove(&(old, n as u32));
        }
        if let Some(k) = new {
            self.place.insert((k, n as u32));
        }
        node.place_key = new;
    }

    /// Least-loaded node with room (looking at the 64 least loaded), else the least loaded.
    fn place_for(&self, j: usize) -> Option<usize> {
        let spec = &self.s.jobs[j];
        let frac = self.s.params.mem_reserve_frac;
        let mut fallback = None;
        for &(_, n) in self.place.iter().take(64) {
            if spec.avoid.contains(&(n + 1)) {
                continue;
            }
            let n = n as usize;
            fallback.get_or_insert(n);
            let total = self.s.nodes[n].mem_bytes as f64;
            if self.nodes[n].mem_used.saturating_add(spec.mem_bytes) as f64 <= total * (1.0 - frac)
            {
                return Some(n);
            }
        }
        fallback
    }

    // ---- MOSIX: gossip --------------------------------------------------------------------

    fn own_entry(&self, n: usize) -> Entry {
        let node = &self.nodes[n];
        let free = self.s.nodes[n].mem_bytes.saturating_sub(node.mem_used) >> 20;
        Entry {
            node: n as u32 + 1,
            t: self.now,
            runnable: self.ema_now(n) as f32,
            mem_free_mib: free.min(u64::from(u32::MAX)) as u32,
            accepts: !node.withdrawn,
            leaving: node.withdrawn,
        }
    }

    /// A cluster that has been up and idle: every node knows the (idle) load of `window`
    /// random other nodes of those up at the start, sampled now.
    fn warm_up(&mut self) {
        let len = self.nodes.len();
        let cap = self.s.gossip.window;
        if len < 2 || cap == 0 {
            return;
        }
        for n in 0..len {
            if !self.up[n] {
                continue;
            }
            let want = cap.min(len - 1);
            let mut wl = self.win_len[n] as usize;
            let mut tries = 0;
            while wl < want && tries < want * 8 {
                tries += 1;
                let mut t = self.rng.below(len as u64 - 1) as usize;
                if t >= n {
                    t += 1;
                }
                if !self.up[t] {
                    continue;
                }
                let e = self.own_entry(t);
                let w = &mut self.win[n * cap..(n + 1) * cap];
                merge(w, &mut wl, e);
            }
            self.win_len[n] = wl as u32;
        }
    }

    fn gossip(&mut self, n: usize) {
        if !self.up[n] {
            return;
        }
        let len = self.nodes.len();
        let cap = self.s.gossip.window;
        let mut buf = std::mem::take(&mut self.gossip_buf);
        buf.clear();
        buf.push(self.own_entry(n));
        let k = self
            .s
            .gossip
            .entries_per_message
            .min(self.win_len[n] as usize);
        buf.extend_from_slice(&self.win[n * cap..n * cap + k]);
        if len > 1 {
            for _ in 0..self.s.gossip.fanout {
                let mut t = self.rng.below(len as u64 - 1) as usize;
                if t >= n {
                    t += 1;
                }
                self.stats.messages += 1;
                if self.up[t] {
                    let me = t as u32 + 1;
                    let w = &mut self.win[t * cap..(t + 1) * cap];
                    let mut wl = self.win_len[t] as usize;
                    for e in buf.iter().filter(|e| e.node != me) {
                        merge(w, &mut wl, *e);
                    }
                    self.win_len[t] = wl as u32;
                }
            }
        }
        self.gossip_buf = buf;
    }

    // ---- MOSIX: the policy ----------------------------------------------------------------

    fn node_info(&self, n: usize) -> NodeInfo {
        let spec = &self.s.nodes[n];
        let node = &self.nodes[n];
        NodeInfo {
            node: n as u32 + 1,
            speed: spec.speed,
            cpus: spec.cpus,
            runnable: self.ema_now(n),
            mem_total: spec.mem_bytes,
            mem_free: spec.mem_bytes.saturating_sub(node.mem_used),
            age_ms: 0,
            accepts_guests: node.up && !node.withdrawn,
            up: node.up,
        }
    }

    /// Node `n`'s processes as the policy sees them (call `advance(n)` first).
    fn fill_procs(&self, n: usize, out: &mut Vec<ProcInfo>) {
        out.clear();
        let node = &self.nodes[n];
        for r in &node.running {
            let left = (r.vt_end - node.vt).max(0.0);
            out.push(ProcInfo {
                id: u64::from(r.job),
                mem_bytes: r.mem,
                cpu_share: 1.0,
                work_done_ms: ms(r.work - left),
                resident_ms: ms(self.now - r.since),
                migrations: r.moves,
                where_now: n as u32 + 1,
                home: r.home,
                pinned: r.pinned,
                auto: r.auto,
                avoid: if r.has_avoid {
                    self.s.jobs[r.job as usize].avoid.clone()
                } else {
                    Vec::new()
                },
            });
        }
    }

    fn tick(&mut self, n: usize) {
        if !self.nodes[n].up || self.nodes[n].running.is_empty() {
            return;
        }
        self.advance(n);
        let me = self.node_info(n);
        let mut peers = std::mem::take(&mut self.peers_buf);
        peers.clear();
        let cap = self.s.gossip.window;
        for e in &self.win[n * cap..n * cap + self.win_len[n] as usize] {
            let spec = &self.s.nodes[e.node as usize - 1];
            peers.push(NodeInfo {
                node: e.node,
                speed: spec.speed,
                cpus: spec.cpus,
                runnable: f64::from(e.runnable),
                mem_total: spec.mem_bytes,
                mem_free: u64::from(e.mem_free_mib) << 20,
                age_ms: ms(self.now - e.t),
                accepts_guests: e.accepts,
                // A node known to be leaving is no destination at all.
                up: !e.leaving,
            });
        }
        let mut procs = std::mem::take(&mut self.procs_buf);
        self.fill_procs(n, &mut procs);
        let now_ms = ms(self.now);
        let seed = self.rng.next_u64();
        let decisions = if self.nodes[n].withdrawn {
            self.bal[n].evacuate(now_ms, &me, &peers, &procs, seed)
        } else {
            self.bal[n].tick(now_ms, &me, &peers, &procs, seed)
        };
        self.peers_buf = peers;
        self.procs_buf = procs;
        if !decisions.is_empty() {
            for d in decisions {
                self.offer(n, d);
            }
            self.refresh(n);
        }
    }

    fn offer(&mut self, n: usize, d: Decision) {
        let j = d.proc as usize;
        let to = d.to as usize;
        if j >= self.jobs.len()
            || to == 0
            || to > self.nodes.len()
            || self.jobs[j].st != St::Running
            || self.jobs[j].node as usize != n
        {
            return;
        }
        let to = to - 1;
        let now_ms = ms(self.now);
        self.stats.messages += 1;
        if !self.nodes[to].up || self.nodes[to].withdrawn {
            // Down: no answer; leaving: refuses everything.
            let why = if self.nodes[to].up { "leaving" } else { "down" };
            *self.stats.refused_by.entry(why.into()).or_default() += 1;
            self.stats.refused_offers += 1;
            self.bal[n].refused(now_ms, d.proc, d.to);
            return;
        }
        self.stats.messages += 1;
        self.advance(to);
        let me_to = self.node_info(to);
        let mut procs = std::mem::take(&mut self.procs_buf);
        self.fill_procs(to, &mut procs);
        let verdict = self.bal[to].admit(now_ms, &me_to, &procs, &d.offer);
        self.procs_buf = procs;
        if let Err(r) = &verdict {
            let why = match r {
                Reason::Blocking { .. } => "blocking",
                Reason::NoRoom { .. } => "no_room",
                Reason::NoLongerPays { .. } => "no_longer_pays",
                _ => "other",
            };
            *self.stats.refused_by.entry(why.into()).or_default() += 1;
            self.stats.refused_offers += 1;
            self.bal[n].refused(now_ms, d.proc, d.to);
            return;
        }
        // The sender's link carries one migration at a time: the process runs on until its
        // turn, then is frozen until it arrives; the source keeps its memory until then.
        let cost = cost_ms(&self.s.policy_params(), self.s.jobs[j].mem_bytes) / 1000.0;
        let start = self.now.max(self.nodes[n].link_free);
        let end = start + if cost.is_finite() { cost } else { 1e12 };
        self.nodes[n].link_free = end;
        let balancing = matches!(d.offer.kind, MoveKind::Load | MoveKind::Memory);
        let (job, from, to) = (j as u32, n as u32, to as u32);
        self.jobs[j].st = St::Queued;
        if self.stats.trace.is_some() {
            self.pending_trace
                .insert(job, (d.offer.kind, d.reason.to_string()));
        }
        if start > self.now {
            self.push(
                start,
                EvKind::TransferStart {
                    job,
                    from,
                    to,
                    balancing,
                    end,
                },
            );
        } else {
            self.transfer_start(j, n, to as usize, balancing, end);
        }
    }

    /// The link is free: freeze the process and send it (unless it finished meanwhile).
    fn transfer_start(&mut self, j: usize, n: usize, to: usize, balancing: bool, end: f64) {
        let traced = self.pending_trace.remove(&(j as u32));
        if self.jobs[j].st != St::Queued || self.jobs[j].node as usize != n || !self.nodes[n].up {
            return;
        }
        if let (Some(tr), Some((kind, reason))) = (self.stats.trace.as_mut(), traced) {
            tr.migrations.push(Migration {
                job: j,
                from: n as u32 + 1,
                to: to as u32 + 1,
                start_s: self.now,
                arrive_s: f64::NAN,
                kind,
                reason,
            });
        }
        self.advance(n);
        self.remove_running(n, j);
        self.jobs[j].st = St::Transfer;
        self.refresh(n);
        self.stats.migrations += 1;
        if !balancing {
            self.stats.evacuations += 1;
        }
        self.push(
            end,
            EvKind::TransferDone {
                job: j as u32,
                from: n as u32,
                to: to as u32,
                balancing,
            },
        );
    }

    fn transfer_done(&mut self, j: usize, from: usize, to: usize, balancing: bool) {
        let mem = self.s.jobs[j].mem_bytes;
        if !self.nodes[to].up {
            // The transaction fails: the job is still at the source.
            self.stats.failed_migrations += 1;
            if self.policy == Policy::Mosix {
                self.bal[from].refused(ms(self.now), j as u64, to as u32 + 1);
            }
            if self.nodes[from].up {
                self.advance(from);
                self.add_running(from, j, self.now);
                self.refresh(from);
            } else {
                self.jobs[j].st = St::Frozen;
                self.nodes[from].frozen.push(j as u32);
                self.running_or_moving -= 1;
            }
            return;
        }
        self.advance(from);
        self.nodes[from].mem_used = self.nodes[from].mem_used.saturating_sub(mem);
        self.refresh(from);
        self.advance(to);
        self.jobs[j].moves += 1;
        self.add_running(to, j, self.now);
        self.nodes[to].mem_used = self.nodes[to].mem_used.saturating_add(mem);
        if self.nodes[to].mem_used > self.s.nodes[to].mem_bytes {
            self.stats.landed_without_room += 1;
        }
        self.refresh(to);
        let (f, t) = (from as u32 + 1, to as u32 + 1);
        if balancing {
            if let Some((pf, pt, when)) = self.jobs[j].last_balance {
                if pf == t && pt == f && self.now - when < PINGPONG_WINDOW_S {
                    self.stats.pingpongs += 1;
                }
            }
            self.jobs[j].last_balance = Some((f, t, self.now));
        }
        if let Some(tr) = self.stats.trace.as_mut() {
            if let Some(m) = tr
                .migrations
                .iter_mut()
                .rev()
                .find(|m| m.job == j && m.arrive_s.is_nan())
            {
                m.arrive_s = self.now;
            }
        }
    }

    // ---- node events --------------------------------------------------------------------

    fn leave(&mut self, n: usize, grace: f64) {
        if !self.nodes[n].up || self.nodes[n].withdrawn {
            return;
        }
        self.nodes[n].withdrawn = true;
        self.nodes[n].leave_seq += 1;
        let seq = self.nodes[n].leave_seq;
        self.push(self.now + grace, EvKind::PowerOff(n as u32, seq));
        if self.policy == Policy::Initial {
            self.update_place(n);
        }
    }

    fn power_off(&mut self, n: usize, seq: u32) {
        let node = &self.nodes[n];
        if !node.up || !node.withdrawn || node.leave_seq != seq {
            return;
        }
        self.advance(n);
        let running = std::mem::take(&mut self.nodes[n].running);
        let vt = self.nodes[n].vt;
        for r in &running {
            let job = &mut self.jobs[r.job as usize];
            job.remaining = (r.vt_end - vt).max(0.0);
            job.st = St::Frozen;
            self.running_or_moving -= 1;
        }
        let node = &mut self.nodes[n];
        node.frozen.extend(running.iter().map(|r| r.job));
        node.up = false;
        self.win_len[n] = 0;
        self.up[n] = false;
        self.refresh(n);
    }

    fn node_return(&mut self, n: usize) {
        if self.nodes[n].up {
            if self.nodes[n].withdrawn {
                // Came back before powering off: the leave is cancelled.
                self.nodes[n].withdrawn = false;
                self.nodes[n].leave_seq += 1;
                if self.policy == Policy::Initial {
                    self.update_place(n);
                }
            }
            return;
        }
        self.up[n] = true;
        let node = &mut self.nodes[n];
        node.up = true;
        node.withdrawn = false;
        node.ema = 0.0;
        node.ema_t = self.now;
        node.vt_t = self.now;
        let frozen = std::mem::take(&mut node.frozen);
        for j in frozen {
            self.add_running(n, j as usize, self.now);
            self.running_or_moving += 1;
        }
        if self.policy == Policy::Mosix {
            let params = self.bal[n].params().clone();
            self.bal[n] = Balancer::new(n as u32 + 1, params);
        }
        self.refresh(n);
    }
}

/// Seconds to whole milliseconds (saturating, never negative).
fn ms(s: f64) -> u64 {
    if s.is_finite() && s > 0.0 {
        // `as` saturates; +0.5 rounds (cheaper than f64::round).
        (s * 1000.0 + 0.5) as u64
    } else {
        0
    }
}

/// Merges entry `e` into a window `w[..len]` kept sorted freshest first, at most `w.len()`
/// long: a newer entry for a known node replaces it; a new node replaces the oldest entry
/// if fresher.
fn merge(w: &mut [Entry], len: &mut usize, e: Entry) {
    let cap = w.len();
    if cap == 0 {
        return;
    }
    if let Some(pos) = w[..*len].iter().position(|x| x.node == e.node) {
        if w[pos].t >= e.t {
            return;
        }
        w.copy_within(pos + 1..*len, pos);
        *len -= 1;
    } else if *len >= cap {
        if w[cap - 1].t >= e.t {
            return;
        }
        *len = cap - 1;
    }
    let at = w[..*len].partition_point(|x| x.t > e.t);
    w.copy_within(at..*len, at + 1);
    w[at] = e;
    *len += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: u32, t: f64) -> Entry {
        Entry {
            node,
            t,
            runnable: 0.0,
            mem_free_mib: 0,
            accepts: true,
            leaving: false,
        }
    }

    #[test]
    fn scenarios_built_in_code_do_not_panic() {
        use crate::scenario::{JobSpec, NodeSpec};
        let job = JobSpec {
            at_s: f64::NAN,
            home: 9,
            work_s: -1.0,
            mem_bytes: u64::MAX,
            pinned: false,
            auto: true,
            avoid: vec![0, 99],
        };
        let empty = Scenario::new("e", vec![], vec![job.clone()]);
        let bad = Scenario::new(
            "b",
            vec![
                NodeSpec {
                    speed: f64::NAN,
                    cpus: 0,
                    mem_bytes: 0
                };
                2
            ],
            vec![job; 3],
        );
        for s in [&empty, &bad] {
            for p in Policy::ALL {
                let r = simulate(s, p, 1, RunOptions { trace: true }, 1e4);
                assert_eq!(r.jobs_done + r.unfinished, s.jobs.len());
            }
        }
    }

    #[test]
    fn window_merge() {
        let mut w = [Entry::default(); 3];
        let mut len = 0;
        let nodes = |w: &[Entry], len: usize| w[..len].iter().map(|e| e.node).collect::<Vec<_>>();
        for (n, t) in [(1, 1.0), (2, 3.0), (3, 2.0)] {
            merge(&mut w, &mut len, entry(n, t));
        }
        assert_eq!(nodes(&w, len), vec![2, 3, 1]);
        merge(&mut w, &mut len, entry(1, 4.0)); // newer for a known node
        assert_eq!(nodes(&w, len), vec![1, 2, 3]);
        merge(&mut w, &mut len, entry(4, 0.5)); // older than all: dropped
        assert_eq!(len, 3);
        merge(&mut w, &mut len, entry(4, 2.5)); // replaces the oldest (3)
        assert_eq!(nodes(&w, len), vec![1, 2, 4]);
        merge(&mut w, &mut len, entry(2, 1.0)); // stale news about 2: ignored
        assert_eq!(w[1].t, 3.0);
        let mut empty: [Entry; 0] = [];
        let mut l0 = 0;
        merge(&mut empty, &mut l0, entry(1, 1.0));
        assert_eq!(l0, 0);
    }
}
