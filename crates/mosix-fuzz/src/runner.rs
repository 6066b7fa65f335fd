//! The long-running mode: a mutation loop over one target for a set time.
//!
//! Every seed runs first; then each execution takes an input of the corpus (sometimes
//! random bytes), mutates it and runs it. An input whose outcome class is new joins the
//! corpus (a cheap stand-in for coverage feedback, which stable Rust cannot give).
//!
//! Crashes: a panic (caught, with its message and place); an input that made the thread
//! allocate more than the target's bound (measured by [`crate::alloc::Counting`], which
//! the binary installs); an input still running after the hang limit (a watchdog thread
//! saves it and ends the process); a thread holding more than the hard cap (the
//! allocator's hook saves the input and ends the process before the machine runs out).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::alloc::Scope;
use crate::mutate::{mutate, Rng};
use crate::targets::{class, Target};

/// One kind of crash, with the first input that showed it.
#[derive(Debug, Clone)]
pub struct Crash {
    /// panic, alloc or hang
    pub kind: &'static str,
    pub detail: String,
    pub input: Vec<u8>,
    pub saved: Option<PathBuf>,
    /// How many inputs crashed this way.
    pub count: u64,
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub execs: u64,
    pub crashes: u64,
    pub unique: Vec<Crash>,
    pub corpus: usize,
    /// The most one input made the target's thread allocate.
    pub max_alloc: u64,
    pub secs: f64,
}

impl Report {
    /// The parseable summary line.
    pub fn line(&self, target: &str) -> String {
        format!(
            "FUZZ {target} execs={} crashes={} unique={} corpus={} max_alloc={} secs={:.0}",
            self.execs,
            self.crashes,
            self.unique.len(),
            self.corpus,
            self.max_alloc,
            self.secs
        )
    }
}

/// The most inputs kept.
const MAX_CORPUS: usize = 4096;

// What the watchdog and the allocator's hook need to report a crash that ends the process.
static CUR_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CUR_LEN: AtomicUsize = AtomicUsize::new(0);
static CUR_FD: AtomicI32 = AtomicI32::new(-1);
static STARTED_MS: AtomicU64 = AtomicU64::new(0);
static EXECS: AtomicU64 = AtomicU64::new(0);
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn now_ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64 + 1
}

/// Writes all of `b` to `fd`, without allocating.
fn raw_write(fd: i32, b: &[u8]) {
    let mut off = 0;
    while off < b.len() {
        // SAFETY: the pointer and length describe the live slice `b[off..]`.
        let n = unsafe { libc::write(fd, b[off..].as_ptr().cast(), b.len() - off) };
        if n <= 0 {
            return;
        }
        off += n as usize;
    }
}

/// Formats `n` in decimal into `buf`, without allocating.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The allocator's hook: saves the input being run and says so on stderr.
fn on_hard_cap(live: u64) {
    let fd = CUR_FD.load(Ordering::SeqCst);
    let p = CUR_PTR.load(Ordering::SeqCst);
    if fd >= 0 && !p.is_null() {
        // SAFETY: CUR_PTR/CUR_LEN describe the input of the execution under way, which
        // the runner keeps alive until it has cleared them.
        let input = unsafe { std::slice::from_raw_parts(p, CUR_LEN.load(Ordering::SeqCst)) };
        raw_write(fd, input);
    }
    let mut a = [0u8; 20];
    let mut b = [0u8; 20];
    raw_write(2, b"\nCRASH alloc-hard-cap: one thread held ");
    raw_write(2, itoa(live, &mut a));
    raw_write(2, b" bytes after ");
    raw_write(2, itoa(EXECS.load(Ordering::SeqCst), &mut b));
    raw_write(
        2,
        b" execs; the input is in the crash directory (*-hardcap.bin)\n",
    );
}

/// Runs `target` for `dur` over its seeds and `extra` ones; crashing inputs are saved
/// under `crash_dir/<target>/` when given. The process ends (exit status 2 or 3) if an
/// input hangs for `hang_after` or holds more than `hard_cap` bytes in one thread.
pub fn run_for(
    target: &Target,
    extra: Vec<Vec<u8>>,
    dur: Duration,
    seed: u64,
    crash_dir: Option<&Path>,
    hang_after: Duration,
    hard_cap: u64,
) -> Report {
    let dir = crash_dir.map(|d| d.join(target.name));
    if let Some(d) = &dir {
        let _ = std::fs::create_dir_all(d);
        let path = d.join(format!("{}-hardcap.bin", std::process::id()));
        if let Ok(f) = std::fs::File::create(&path) {
            use std::os::fd::IntoRawFd;
            CUR_FD.store(f.into_raw_fd(), Ordering::SeqCst);
        }
    }
    crate::alloc::set_hard_cap(hard_cap, on_hard_cap);
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut p) = LAST_PANIC.lock() {
            *p = Some(format!("{msg} at {at}"));
        }
    }));

    let t0 = Instant::now();
    let current: Arc<Mutex<Arc<Vec<u8>>>> = Arc::new(Mutex::new(Arc::new(Vec::new())));
    {
        let current = current.clone();
        let dir = dir.clone();
        let name = target.name;
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            let s = STARTED_MS.load(Ordering::SeqCst);
            if s != 0 && now_ms(t0).saturating_sub(s) > hang_after.as_millis() as u64 {
                let input = current.lock().map(|c| c.clone()).unwrap_or_default();
                let saved = dir.as_ref().map(|d| {
                    let p = d.join(format!("hang-{:016x}.bin", class_of_bytes(&input)));
                    let _ = std::fs::write(&p, &*input);
                    p
                });
                println!(
                    "CRASH {name} hang: an input of {} bytes ran for more than {:?} saved={}",
                    input.len(),
                    hang_after,
                    saved.map(|p| p.display().to_string()).unwrap_or_default()
                );
                println!(
                    "FUZZ {name} execs={} crashes=1 unique=1 hang=1",
                    EXECS.load(Ordering::SeqCst)
                );
                std::process::exit(2);
            }
        });
    }

    let mut rng = Rng::new(seed);
    let mut corpus: Vec<Arc<Vec<u8>>> = (target.seeds)()
        .into_iter()
        .chain(extra)
        .map(|s| {
            let mut s = s;
            s.truncate(target.max_len);
            Arc::new(s)
        })
        .collect();
    let n_seeds = corpus.len();
    let mut seen: HashMap<u64, ()> = HashMap::new();
    let mut report = Report::default();
    let mut crashes: HashMap<u64, Crash> = HashMap::new();
    let mut i = 0usize;
    while i < n_seeds || t0.elapsed() < dur {
        let input: Arc<Vec<u8>> = if i < n_seeds {
            corpus[i].clone()
        } else if corpus.is_empty() || rng.chance(16) {
            let n = rng.below(4096);
            Arc::new(rng.bytes(n))
        } else {
            let a = rng.below(corpus.len());
            let b = rng.below(corpus.len());
            Arc::new(mutate(&mut rng, &corpus[a], &corpus[b], target.max_len))
        };
        i += 1;
        if let Ok(mut c) = current.lock() {
            *c = input.clone();
        }
        CUR_LEN.store(input.len(), Ordering::SeqCst);
        CUR_PTR.store(input.as_ptr() as *mut u8, Ordering::SeqCst);
        STARTED_MS.store(now_ms(t0), Ordering::SeqCst);

        let scope = Scope::start();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input)));
        let peak = scope.peak();

        STARTED_MS.store(0, Ordering::SeqCst);
        CUR_PTR.store(std::ptr::null_mut(), Ordering::SeqCst);
        report.execs += 1;
        EXECS.store(report.execs, Ordering::SeqCst);
        report.max_alloc = report.max_alloc.max(peak);

        let bound = (target.alloc_bound)(input.len());
        let crash = match r {
            Err(_) => {
                let msg = LAST_PANIC
                    .lock()
                    .ok()
                    .and_then(|mut p| p.take())
                    .unwrap_or_else(|| "panic".into());
                Some(("panic", msg))
            }
            Ok(_) if peak > bound => Some((
                "alloc",
                format!(
                    "{peak} bytes allocated for a {}-byte input (bound {bound})",
                    input.len()
                ),
            )),
            Ok(c) => {
                if seen.insert(c, ()).is_none() && i > n_seeds {
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input.clone());
                    } else {
                        let k = rng.below(corpus.len() - n_seeds) + n_seeds;
                        corpus[k] = input.clone();
                    }
                }
                None
            }
        };
        if let Some((kind, detail)) = crash {
            report.crashes += 1;
            // One per kind and message (numbers aside: one allocation bug, many sizes).
            let sig = class(kind) ^ class(&detail);
            let e = crashes.entry(sig).or_insert_with(|| {
                let saved = dir.as_ref().map(|d| {
                    let p = d.join(format!("{kind}-{sig:016x}.bin"));
                    let _ = std::fs::write(&p, &*input);
                    p
                });
                Crash {
                    kind,
                    detail,
                    input: input.to_vec(),
                    saved,
                    count: 0,
                }
            });
            e.count += 1;
        }
    }
    report.corpus = corpus.len();
    report.secs = t0.elapsed().as_secs_f64();
    report.unique = crashes.into_values().collect();
    // Nothing hit the hard cap: its file is empty.
    if let Some(d) = &dir {
        let path = d.join(format!("{}-hardcap.bin", std::process::id()));
        if std::fs::metadata(&path)
            .map(|m| m.len() == 0)
            .unwrap_or(false)
        {
            let _ = std::fs::remove_file(path);
        }
    }
    let _ = std::panic::take_hook();
    report
}

fn class_of_bytes(b: &[u8]) -> u64 {
    mosix_ckpt::sum::xxh3_64(b)
}
