//! The fuzz targets as proptest properties, run by `cargo test` with a modest number of
//! cases: each seed, mutated seeds, and raw bytes, for every target. A property fails if
//! the target panics or makes its thread allocate more than the target's bound.
//! `scripts/fuzz.sh` runs the same targets for longer (see src/runner.rs).

use std::sync::OnceLock;

use mosix_fuzz::alloc::{Counting, Scope};
use mosix_fuzz::mutate::{mutate, Rng};
use mosix_fuzz::targets::{self, Target};
use proptest::prelude::*;
use proptest::sample::Index;

#[global_allocator]
static A: Counting = Counting;

struct Seeded {
    target: Target,
    seeds: Vec<Vec<u8>>,
}

/// Each target with its seeds (and, for the image targets, images of a real process when
/// this test may checkpoint one), made once.
fn seeded(name: &str) -> &'static Seeded {
    static ALL: OnceLock<Vec<Seeded>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        let real = targets::checkpoint_images();
        targets::all()
            .into_iter()
            .map(|t| {
                let mut seeds = (t.seeds)();
                match t.name {
                    "image_raw" | "image_sums" => seeds.extend(real.iter().cloned()),
                    "image_body" => seeds.extend(targets::bodies_of(&real)),
                    _ => {}
                }
                Seeded { target: t, seeds }
            })
            .collect()
    });
    all.iter()
        .find(|s| s.target.name == name)
        .expect("a target of that name")
}

fn run(t: &Target, input: &[u8]) -> Result<(), TestCaseError> {
    let s = Scope::start();
    (t.run)(input);
    let peak = s.peak();
    let bound = (t.alloc_bound)(input.len());
    prop_assert!(
        peak <= bound,
        "{}: {peak} bytes allocated for a {}-byte input (bound {bound})",
        t.name,
        input.len()
    );
    Ok(())
}

fn mutated(name: &str, a: Index, b: Index, seed: u64) -> Result<(), TestCaseError> {
    let s = seeded(name);
    let x = &s.seeds[a.index(s.seeds.len())];
    let y = &s.seeds[b.index(s.seeds.len())];
    let input = mutate(&mut Rng::new(seed), x, y, s.target.max_len);
    run(&s.target, &input)
}

#[test]
fn every_seed_runs_within_its_bound() {
    for t in targets::all() {
        for (i, input) in seeded(t.name).seeds.iter().enumerate() {
            if let Err(e) = run(&t, input) {
                panic!("seed {i} of {}: {e}", t.name);
            }
        }
    }
}

macro_rules! fuzz_target {
    ($name:ident, $target:literal, $cases:expr, $raw_len:expr) => {
        mod $name {
            use super::*;
            proptest! {
                #![proptest_config(ProptestConfig {
                    cases: $cases,
                    failure_persistence: None,
                    ..ProptestConfig::default()
                })]
                #[test]
                fn mutated_seeds(a in any::<Index>(), b in any::<Index>(), seed in any::<u64>()) {
                    mutated($target, a, b, seed)?;
                }
                #[test]
                fn raw_bytes(input in proptest::collection::vec(any::<u8>(), 0..$raw_len)) {
                    run(&seeded($target).target, &input)?;
                }
            }
        }
    };
}

fuzz_target!(image_raw, "image_raw", 1000, 2048);
fuzz_target!(image_sums, "image_sums", 1000, 2048);
fuzz_target!(image_body, "image_body", 500, 2048);
fuzz_target!(wire, "wire", 2000, 2048);
fuzz_target!(channel, "channel", 300, 512);
fuzz_target!(lent_frames, "lent_frames", 500, 512);
fuzz_target!(control, "control", 1000, 1024);
fuzz_target!(control_client, "control_client", 300, 1024);
fuzz_target!(gossip_open, "gossip_open", 1000, 1024);
fuzz_target!(gossip_payload, "gossip_payload", 1000, 1024);

/// Inputs that once crashed a target (tests/crashes/<target>-<what>.bin) stay fixed.
#[test]
fn saved_crashes_stay_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crashes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let target = name.split('-').next().unwrap_or_default();
        let t = &seeded(target).target;
        let input = std::fs::read(e.path()).unwrap();
        if let Err(e) = run(t, &input) {
            panic!("{name}: {e}");
        }
        n += 1;
    }
    assert!(n > 0);
}
