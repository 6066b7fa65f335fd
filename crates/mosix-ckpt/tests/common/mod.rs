//! Helpers of the tests of real processes.

use std::path::PathBuf;
use std::process::Command;

/// Compiles C program `src` (named `name`) into this test run's directory; its path.
/// Each call its own files: tests run side by side.
pub fn build_c(name: &str, src: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let stem = format!("{name}.{}.{n}", std::process::id());
    let (c, bin) = (dir.join(format!("{stem}.c")), dir.join(stem));
    std::fs::write(&c, src).unwrap();
    let st = Command::new("cc")
        .args(["-O1", "-o"])
        .arg(&bin)
        .arg(&c)
        .status()
        .unwrap();
    assert!(st.success(), "building {name}");
    bin
}

/// The start of the C programs of the fill tests: three areas of 24 MiB, each word made
/// from a seed and its index (`area`), and `bad`, which finds a word that is not.
#[allow(dead_code)]
pub const AREAS_C: &str = r#"#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#define LEN (24UL << 20)
#define WORDS (LEN / 8)
static uint64_t word(uint64_t seed, size_t i) { return seed * 0x9E3779B97F4A7C15ULL ^ i; }
static uint64_t *area(uint64_t seed) {
    uint64_t *p = mmap(0, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) exit(2);
    for (size_t i = 0; i < WORDS; i++) p[i] = word(seed, i);
    return p;
}
/* The first word in [from, to) of p that is not what seed made, or -1. */
static long bad(uint64_t *p, size_t from, size_t to, uint64_t seed) {
    for (size_t i = from; i < to; i++)
        if (p[i] != word(seed, i)) return (long)i;
    return -1;
}
"#;

/// Starts `bin` with only descriptors 0, 1 and 2 (stdin and stdout piped: a stray
/// descriptor would change what a checkpoint takes), and waits for its "ready" line; the
/// child and its stdout.
#[allow(dead_code)]
pub fn start_ready(
    bin: &std::path::Path,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    // SAFETY: close_range is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut l = String::new();
    out.read_line(&mut l).unwrap();
    assert_eq!(l, "ready\n");
    (child, out)
}
