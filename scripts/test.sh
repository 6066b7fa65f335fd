#!/usr/bin/env bash
# Runs every test of the project (as root: checkpoint/restore, namespaces and the testbed
# are tested for real). This is the README's test command, and what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# Release build: the tests drive the real binaries (target/release/mosix, mosixd).
cargo build --workspace --release --bins --quiet
cargo test --workspace --release --no-fail-fast -- --test-threads=2
