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
