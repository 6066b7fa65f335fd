//! Fuzzing of everything in MOSIX that parses bytes from a file or a socket: process
//! images, node-to-node wire frames and the encrypted channel, control-socket requests and
//! answers, gossip datagrams and their payloads.
//!
//! Nightly Rust (and so cargo-fuzz) is not available: each target is a plain function of
//! the input bytes, driven two ways:
//! - `cargo test -p mosix-fuzz`: proptest cases from the targets' seeds, mutated, and raw
//!   bytes (tests/fuzz_targets.rs), with a modest number of cases;
//! - `scripts/fuzz.sh [SECONDS]` runs the `mosix-fuzz` binary, a mutation loop over each
//!   target for a set time that prints `FUZZ <target> execs=N crashes=N ...`.
//!
//! A crash is a panic, an input that makes one thread allocate more than the target's
//! bound (counted by [`alloc::Counting`]), or one that runs longer than the runner allows.

pub mod alloc;
pub mod craft;
pub mod mutate;
pub mod runner;
pub mod targets;
