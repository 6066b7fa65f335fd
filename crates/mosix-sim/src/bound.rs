//! A lower bound on the makespan that no scheduler can beat, even one that knows every
//! job's length in advance and migrates for free.

use crate::scenario::Scenario;
use serde::Serialize;

/// The bound and its parts, seconds from the start of the scenario.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LowerBound {
    /// The largest of the parts below.
    pub makespan_s: f64,
    /// max over arrival times t of t + (work arriving at or after t) / total capacity.
    pub work_bound_s: f64,
    /// max over jobs of arrival + work / fastest CPU.
    pub longest_job_bound_s: f64,
    /// Preemptive uniform machines (Horvath, Lam and Sethi 1977): for the jobs arriving at
    /// or after t, t + max over k of (k largest jobs) / (k fastest CPUs); evaluated at up to
    /// 64 arrival times.
    pub preemptive_bound_s: f64,
}

/// Computes the bound. Capacity counts every CPU of every node as if it never left.
pub fn lower_bound(s: &Scenario) -> LowerBound {
    let mut speeds: Vec<f64> = s
        .nodes
        .iter()
        .flat_map(|n| std::iter::repeat_n(n.speed, n.cpus as usize))
        .collect();
    speeds.sort_by(|a, b| b.total_cmp(a));
    let capacity: f64 = speeds.iter().sum();
    let fastest = speeds.first().copied().unwrap_or(1.0);
    let mut prefix_speed = Vec::with_capacity(speeds.len());
    let mut acc = 0.0;
    for v in &speeds {
        acc += v;
        prefix_speed.push(acc);
    }

    // Jobs sorted by arrival (they are, but do not rely on it).
    let mut jobs: Vec<(f64, f64)> = s.jobs.iter().map(|j| (j.at_s, j.work_s)).collect();
    jobs.sort_by(|a, b| a.0.total_cmp(&b.0));

    let longest = jobs
        .iter()
        .map(|&(a, w)| a + w / fastest)
        .fold(0.0, f64::max);

    let mut work = 0.0f64;
    let mut suffix = 0.0f64;
    for i in (0..jobs.len()).rev() {
        suffix += jobs[i].1;
        if i == 0 || jobs[i - 1].0 < jobs[i].0 {
            work = work.max(jobs[i].0 + suffix / capacity);
        }
    }

    // Preemptive bound at a sample of distinct arrival times.
    let mut starts: Vec<usize> = Vec::new();
    let n = jobs.len();
    let samples = 64.min(n.max(1));
    for q in 0..samples {
        let mut i = q * n / samples;
        while i > 0 && jobs[i - 1].0 == jobs[i].0 {
            i -= 1;
        }
        if starts.last() != Some(&i) {
            starts.push(i);
        }
    }
    let mut preemptive = 0.0f64;
    for &i in &starts {
        let t = jobs[i].0;
        let mut sizes: Vec<f64> = jobs[i..].iter().map(|j| j.1).collect();
        sizes.sort_by(|a, b| b.total_cmp(a));
        let mut sum = 0.0;
        let mut best = 0.0f64;
        for (k, w) in sizes.iter().enumerate() {
            sum += w;
            let cap = prefix_speed[k.min(prefix_speed.len() - 1)];
            best = best.max(sum / cap);
        }
        preemptive = preemptive.max(t + best);
    }

    LowerBound {
        makespan_s: work.max(longest).max(preemptive),
        work_bound_s: work,
        longest_job_bound_s: longest,
        preemptive_bound_s: preemptive,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{JobSpec, NodeSpec};

    fn job(at: f64, work: f64) -> JobSpec {
        JobSpec {
            at_s: at,
            home: 1,
            work_s: work,
            mem_bytes: 0,
            pinned: false,
            auto: true,
            avoid: vec![],
        }
    }

    fn nodes(speeds: &[f64]) -> Vec<NodeSpec> {
        speeds
            .iter()
            .map(|&speed| NodeSpec {
                speed,
                cpus: 1,
                mem_bytes: 1 << 30,
            })
            .collect()
    }

    #[test]
    fn faq_bound() {
        let s = Scenario::new("x", nodes(&[1.0; 4]), vec![job(0.0, 20.0); 8]);
        let b = lower_bound(&s);
        assert!((b.makespan_s - 40.0).abs() < 1e-9, "{b:?}");
    }

    #[test]
    fn mixed_speeds_bound() {
        // 8 x 21 s on speeds 1,1,2,3: total 168 / 7 = 24 s.
        let s = Scenario::new("x", nodes(&[1.0, 1.0, 2.0, 3.0]), vec![job(0.0, 21.0); 8]);
        assert!((lower_bound(&s).makespan_s - 24.0).abs() < 1e-9);
        // One job: it can only use the fastest CPU.
        let s = Scenario::new("x", nodes(&[1.0, 1.0, 1.0, 3.0]), vec![job(0.0, 30.0)]);
        assert!((lower_bound(&s).makespan_s - 10.0).abs() < 1e-9);
        // Two jobs of 30 on speeds 3 and 1: (30+30)/(3+1) = 15 and 30/3 = 10 -> 15.
        let s = Scenario::new(
            "x",
            nodes(&[3.0, 1.0]),
            vec![job(0.0, 30.0), job(0.0, 30.0)],
        );
        assert!((lower_bound(&s).makespan_s - 15.0).abs() < 1e-9);
    }

    #[test]
    fn arrivals_count() {
        let s = Scenario::new(
            "x",
            nodes(&[1.0, 1.0]),
            vec![job(0.0, 1.0), job(100.0, 10.0)],
        );
        assert!((lower_bound(&s).makespan_s - 110.0).abs() < 1e-9);
    }
}
