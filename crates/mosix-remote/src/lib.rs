//! mosix-remote: home-node transparency. A process away from home runs under a seccomp
//! filter; its location-dependent system calls are trapped by its supervisor on the host,
//! carried home, and made there by its deputy, which is the process itself at home (the
//! same PID, descriptors, cwd and credentials) turned into a small server.
//!
//! - [`spec`]: which calls are made where, and their memory arguments;
//! - [`gather`] (host) and [`exec`] (home): the two halves of a forwarded call;
//! - [`wire`]: what supervisor and deputy say to each other;
//! - [`filter`]: the seccomp program;
//! - [`notify`]: the seccomp notification descriptor;
//! - [`guest`]: the supervisor's side, a state machine driven by its thread, and
//!   [`host`], the real process it acts on;
//! - [`deputy`]: the deputy's side, and [`marks`], what it keeps at checkpoints so that
//!   its process can be brought back to one after the death of its host;
//! - [`streams`] (host) and [`ahead`] (home): reading ahead and writing behind, and
//!   [`arena`], where the supervisor keeps the bytes of its writes behind for mosixd.
//!
//! See docs/transparency.md.

pub mod ahead;
pub mod arena;
pub mod deputy;
pub mod dfsa;
pub mod exec;
pub mod filter;
pub mod gather;
pub mod guest;
pub mod host;
pub mod local;
pub mod marks;
pub mod notify;
pub mod spec;
pub mod splice;
pub mod streams;
pub mod wire;

/// Buffers of forwarded calls (up to a few MiB) come and go all the time: they are kept
/// in the heap instead of being mapped and unmapped each time (fresh pages cost a fault
/// each, and the kernel zeroes them). Called once at the start of the deputy, the
/// supervisor and mosixd.
pub fn keep_heap() {
    // SAFETY: mallopt only changes the allocator's thresholds; called before the buffers
    // it concerns exist, it is sound at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}
