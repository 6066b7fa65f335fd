#!/usr/bin/env bash
# Runs every test of the project (as root: checkpoint/restore, namespaces and the testbed
# are tested for real). This is the README's test command, and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
# In the release profile, as the build below: build scripts and proc macros (ring's and
# zstd's C code among them) are compiled once for both.
cargo clippy --workspace --all-targets --release --quiet -- -D warnings
# Release build: the tests drive the real binaries (target/release/mosix, mosixd).
cargo build --workspace --release --bins --quiet
cargo test --workspace --release --doc --quiet
# Every test binary, in two lanes side by side, each on a testbed instance of its own
# (scripts/run-tests.py); a failure in one binary does not stop the others.
cargo test --workspace --release --no-run --quiet --message-format=json \
    | python3 scripts/run-tests.py --lanes "${MOSIX_TEST_LANES:-2}" -- --test-threads=2
