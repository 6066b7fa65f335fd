//! One CPU for a tracer and its tracee while system calls are injected.
//!
//! A checkpoint or a restore makes hundreds of ptrace round trips: the tracee runs an
//! injected call and stops, the tracer wakes, looks, and lets it run again. When the two
//! sit on different CPUs each of those wake-ups crosses CPUs, which on virtual machines
//! costs tens of microseconds (an interprocessor interrupt through the hypervisor): the
//! restore of a 1 MiB process took 3 to 18 ms, against 1.7 ms every time with both on
//! one CPU. So while it works, the tracer thread and the tracee's threads are kept on the
//! CPU the tracer runs on; afterwards each gets back the CPUs it was allowed before (a
//! process made here: those of the tracer). Best effort: where CPUs cannot be chosen (a
//! CPU set that forbids it, no rights over the tracee) nothing changes.

use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
use nix::unistd::{gettid, Pid};

type Mask = CpuSet;

fn tid() -> i32 {
    gettid().as_raw()
}

fn get(tid: i32) -> Option<Mask> {
    sched_getaffinity(Pid::from_raw(tid)).ok()
}

fn set(tid: i32, m: &Mask) -> bool {
    sched_setaffinity(Pid::from_raw(tid), m).is_ok()
}

fn only(cpu: usize) -> Option<Mask> {
    let mut m = CpuSet::new();
    m.set(cpu).ok()?;
    Some(m)
}

thread_local! {
    /// The CPUs this thread had before it was kept on one (None: it is not).
    static HAD: std::cell::Cell<Option<Mask>> = const { std::cell::Cell::new(None) };
}

/// The CPUs the calling thread had before it was kept on one CPU, if it is: a thread it
/// spawns meanwhile (which would start on that one CPU) takes them with [`free`].
pub(crate) fn original() -> Option<Mask> {
    HAD.with(|h| h.get())
}

/// First thing in a thread spawned by a thread kept on one CPU (`cpus`: its
/// [`original`]): it works beside its tracer, not on the same CPU.
pub(crate) fn free(cpus: Option<Mask>) {
    if let Some(m) = cpus {
        set(tid(), &m);
    }
}

/// The tracer thread (and the tracee threads added) kept on one CPU until dropped or
/// [`OneCpu::finish`]ed.
pub(crate) struct OneCpu {
    cpu: Mask,
    /// The tracer thread and the CPUs it had.
    tracer: (i32, Mask),
    /// Tracee threads taken over and the CPUs they had.
    saved: Vec<(i32, Mask)>,
    /// This one set the thread's [`original`] (not one inside another).
    outer: bool,
}

impl OneCpu {
    /// Keeps the calling thread (the tracer) on the CPU it runs on; a child it forks from
    /// now on starts there too. None if that cannot be done.
    pub(crate) fn here() -> Option<OneCpu> {
        let cpu = only(sched_getcpu().ok()?)?;
        let me = tid();
        let had = get(me)?;
        if !set(me, &cpu) {
            return None;
        }
        let outer = original().is_none();
        if outer {
            HAD.with(|h| h.set(Some(had)));
        }
        Some(OneCpu {
            cpu,
            tracer: (me, had),
            saved: Vec::new(),
            outer,
        })
    }

    /// Keeps tracee thread `tid` (which existed before) on the tracer's CPU too.
    pub(crate) fn add(&mut self, tid: i32) {
        if self.saved.iter().any(|&(t, _)| t == tid) {
            return;
        }
        if let Some(had) = get(tid) {
            if set(tid, &self.cpu) {
                self.saved.push((tid, had));
            }
        }
    }

    /// Gives every thread of processes `pids` the CPUs it had (one made meanwhile: those
    /// of the thread added first, or else the tracer's), and the tracer its own.
    pub(crate) fn finish(mut self, pids: &[i32]) {
        let default = self.saved.first().map_or(self.tracer.1, |&(_, m)| m);
        let tasks = pids.iter().flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        });
        for t in tasks {
            let m = self
                .saved
                .iter()
                .find(|&&(s, _)| s == t)
                .map_or(default, |&(_, m)| m);
            set(t, &m);
        }
        self.saved.clear();
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        for (t, m) in self.saved.drain(..) {
            set(t, &m);
        }
        set(self.tracer.0, &self.tracer.1);
        if self.outer && self.tracer.0 == tid() {
            HAD.with(|h| h.set(None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tracer is kept on one CPU, then has its CPUs back; a thread added likewise.
    #[test]
    fn threads_are_kept_on_one_cpu_and_get_their_cpus_back() {
        let before = get(tid()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            tx.send(tid()).unwrap();
            let _ = done_rx.recv();
            get(tid()).unwrap()
        });
        let t = rx.recv().unwrap();
        let other_before = get(t).unwrap();
        {
            let Some(mut one) = OneCpu::here() else {
                return; // (no CPU can be chosen here)
            };
            one.add(t);
            let now = get(tid()).unwrap();
            let n = (0..CpuSet::count())
                .filter(|&c| now.is_set(c).unwrap())
                .count();
            assert_eq!(n, 1);
            assert_eq!(get(t).unwrap(), now);
        }
        assert_eq!(get(tid()).unwrap(), before);
        assert!(original().is_none());
        done_tx.send(()).unwrap();
        assert_eq!(other.join().unwrap(), other_before);
    }

    /// A thread spawned while its spawner is kept on one CPU gets the spawner's CPUs.
    #[test]
    fn a_thread_spawned_meanwhile_is_free() {
        let before = get(tid()).unwrap();
        let Some(_one) = OneCpu::here() else {
            return;
        };
        assert_eq!(original(), Some(before));
        let cpus = original();
        let theirs = std::thread::spawn(move || {
            free(cpus);
            get(tid()).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(theirs, before);
    }
}
