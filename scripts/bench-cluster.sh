#!/usr/bin/env bash
# Cluster-layer benchmarks (issue 3), as root: brings a testbed of 4 and then 16 nodes up on
# this machine and prints BENCH lines (gossip traffic per node per second, time for a load
# change to be sampled and to reach every node, mosixd idle CPU and memory).
# Not part of the test suite. Extra arguments go to `mosix testbed bench` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet -p mosix -p mosixd
target="${CARGO_TARGET_DIR:-target}"
dir="$(mktemp -d /tmp/mosix-bench.XXXXXX)"
trap '"$target/release/mosix" testbed down --dir "$dir" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
"$target/release/mosix" testbed bench --dir "$dir" --nodes 4,16 "$@" | grep '^BENCH'
