//! A global allocator that counts, per thread, the bytes live and their peak, so a fuzz
//! run (or a test) can tell how much one input made the code under test allocate.
//!
//! A binary opts in with
//! ```ignore
//! #[global_allocator]
//! static A: mosix_fuzz::alloc::Counting = mosix_fuzz::alloc::Counting;
//! ```
//! Without that, [`Scope::peak`] always reports 0.
//!
//! Only allocations made through Rust's allocator are seen: C libraries (zstd) call malloc
//! themselves.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Counts every allocation of the thread that makes it; serves them from [`System`].
pub struct Counting;

thread_local! {
    // Const-initialised cells without destructors: safe to touch from inside the allocator
    // (no lazy initialisation, no destructor registration, so no allocation).
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

/// Above this many live bytes in one thread the process is stopped at once (the hook
/// runs, then `_exit`): the machine must not be driven out of memory by a fuzz input.
static HARD_CAP: AtomicU64 = AtomicU64::new(u64::MAX);
/// `fn(u64)` called (from inside the allocator: it must not allocate) before stopping.
static HARD_CAP_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Stops the process when one thread holds more than `bytes`, after calling `hook` with the
/// size asked for. `hook` runs inside the allocator: it must not allocate.
pub fn set_hard_cap(bytes: u64, hook: fn(u64)) {
    HARD_CAP_HOOK.store(hook as usize, Ordering::SeqCst);
    HARD_CAP.store(bytes, Ordering::SeqCst);
}

fn account(delta: i64) {
    let live = LIVE.try_with(|l| {
        let v = l.get().wrapping_add(delta);
        l.set(v);
        v
    });
    if let Ok(live) = live {
        let _ = PEAK.try_with(|p| {
            if live > p.get() {
                p.set(live)
            }
        });
        if delta > 0 && live as u64 > HARD_CAP.load(Ordering::Relaxed) && live > 0 {
            let hook = HARD_CAP_HOOK.load(Ordering::SeqCst);
            if hook != 0 {
                // SAFETY: the only value ever stored here (besides 0) is a `fn(u64)`
                // pointer, by `set_hard_cap`.
                let f: fn(u64) = unsafe { std::mem::transmute::<usize, fn(u64)>(hook) };
                f(live as u64);
            }
            // SAFETY: _exit takes no pointers; it ends the process without unwinding.
            unsafe { libc::_exit(3) };
        }
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the
// GlobalAlloc contract; the bookkeeping around it only touches thread-local integers and
// never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours (layout has a non-zero size).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by us, i.e. by System, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as i64));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by System with `layout`; the caller upholds the rest.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Measures the peak of live bytes of this thread from its creation on.
pub struct Scope {
    base: i64,
}

impl Scope {
    /// Starts measuring (the peak so far is forgotten).
    pub fn start() -> Scope {
        let base = LIVE.with(|l| l.get());
        PEAK.with(|p| p.set(base));
        Scope { base }
    }
    /// The most bytes this thread held at once since `start`, beyond what it held then.
    pub fn peak(&self) -> u64 {
        PEAK.with(|p| (p.get() - self.base).max(0) as u64)
    }
}
