//! mosix-fuzz: runs fuzz targets for a set time and prints, per target,
//! `FUZZ <target> execs=N crashes=N unique=N corpus=N max_alloc=BYTES secs=S`, and a
//! `CRASH <target> <kind>: <what> saved=<file>` line per kind of crash found.
//!
//! ```text
//! mosix-fuzz [--secs N] [--target NAME]... [--seed N] [--crash-dir DIR]
//!            [--corpus DIR] [--checkpoint-seeds] [--list] [--replay FILE]...
//! ```
//! `--secs` defaults to $MOSIX_FUZZ_SECS, else 10. `--corpus DIR` adds the files under
//! `DIR/<target>/` to the seeds; `--checkpoint-seeds` adds images of a real process (as
//! root). `--replay FILE` runs saved inputs once each on the chosen targets. Exit status: 0 when nothing crashed, 1 when something did, 2 on a hang, 3 when
//! an input drove one thread past the allocation hard cap.

use std::path::PathBuf;
use std::time::Duration;

use mosix_fuzz::alloc::Counting;
use mosix_fuzz::runner::run_for;
use mosix_fuzz::targets::{self, bodies_of, checkpoint_images};

#[global_allocator]
static A: Counting = Counting;

/// An input still running after this long is a hang.
const HANG_AFTER: Duration = Duration::from_secs(10);
/// One thread holding this much ends the run before the machine runs out of memory.
const HARD_CAP: u64 = 2 << 30;

fn main() {
    let mut secs: u64 = std::env::var("MOSIX_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let mut names = Vec::new();
    let mut seed = 0x006d_6f73_6978_u64 ^ std::process::id() as u64;
    let mut crash_dir: Option<PathBuf> = None;
    let mut corpus: Option<PathBuf> = None;
    let mut ckpt = false;
    let mut replay: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |what: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("mosix-fuzz: {a} needs {what}");
                std::process::exit(64)
            })
        };
        match a.as_str() {
            "--secs" => secs = val("a number").parse().unwrap_or(secs),
            "--target" => names.push(val("a target name")),
            "--seed" => seed = val("a number").parse().unwrap_or(seed),
            "--crash-dir" => crash_dir = Some(val("a directory").into()),
            "--corpus" => corpus = Some(val("a directory").into()),
            "--checkpoint-seeds" => ckpt = true,
            "--replay" => replay.push(PathBuf::from(val("a file"))),
            "--list" => {
                for t in targets::all() {
                    println!("{}\t{}", t.name, t.about);
                }
                return;
            }
            _ => {
                eprintln!("usage: mosix-fuzz [--secs N] [--target NAME]... [--seed N] [--crash-dir DIR] [--corpus DIR] [--checkpoint-seeds] [--list] [--replay FILE]...");
                std::process::exit(64);
            }
        }
    }
    let chosen: Vec<_> = if names.is_empty() {
        targets::all()
    } else {
        names
            .iter()
            .map(|n| {
                targets::by_name(n).unwrap_or_else(|| {
                    eprintln!("mosix-fuzz: no target {n} (see --list)");
                    std::process::exit(64)
                })
            })
            .collect()
    };
    if !replay.is_empty() {
        // Run saved inputs once each (a panic is not caught: its message and place show).
        for t in &chosen {
            for f in &replay {
                let input = std::fs::read(f).unwrap_or_default();
                let s = mosix_fuzz::alloc::Scope::start();
                let c = (t.run)(&input);
                println!(
                    "REPLAY {} {}: {} bytes, outcome class {c:016x}, {} bytes allocated (bound {})",
                    t.name,
                    f.display(),
                    input.len(),
                    s.peak(),
                    (t.alloc_bound)(input.len())
                );
            }
        }
        return;
    }
    let images = if ckpt && chosen.iter().any(|t| t.name.starts_with("image")) {
        let i = checkpoint_images();
        if i.is_empty() {
            eprintln!("mosix-fuzz: could not checkpoint a process for seeds (not root?); writer images only");
        } else {
            let sizes: Vec<String> = i.iter().map(|b| b.len().to_string()).collect();
            eprintln!(
                "mosix-fuzz: seeds include images of a checkpointed sleep ({} bytes)",
                sizes.join(", ")
            );
        }
        i
    } else {
        Vec::new()
    };
    let mut crashed = false;
    for t in &chosen {
        let mut extra = match t.name {
            "image_raw" | "image_sums" => images.clone(),
            "image_body" => bodies_of(&images),
            _ => Vec::new(),
        };
        if let Some(dir) = &corpus {
            if let Ok(rd) = std::fs::read_dir(dir.join(t.name)) {
                for e in rd.flatten() {
                    if let Ok(b) = std::fs::read(e.path()) {
                        extra.push(b);
                    }
                }
            }
        }
        let r = run_for(
            t,
            extra,
            Duration::from_secs(secs),
            seed,
            crash_dir.as_deref(),
            HANG_AFTER,
            HARD_CAP,
        );
        for c in &r.unique {
            println!(
                "CRASH {} {}: {} ({} inputs) saved={}",
                t.name,
                c.kind,
                c.detail.replace('\n', " "),
                c.count,
                c.saved
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
        println!("{} seed={seed}", r.line(t.name));
        crashed |= r.crashes > 0;
    }
    std::process::exit(i32::from(crashed));
}
