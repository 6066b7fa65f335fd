#!/usr/bin/env bash
# scripts/fault.sh N [--seed S] [--from I]: N migrations on a 4-node testbed, each hit by one
# fault at a random point (SIGKILL of the source's or destination's mosixd, its veth link
# down for a while, the destination's memory limit too small), checking after each that
# exactly one copy runs (or the job was reported lost when its home or host died), that its
# output is that of a run that never moved, and that nothing is left behind.
# One line per round (`FAULT <i> <kind> <point> <outcome>`), then `N passed, M failed`;
# exits non-zero on any failure. Rounds depend only on the seed and their number, so
# `--seed S --from I` with N=1 replays round I alone. See docs/migration.md.
# Needs root. Holds /tmp/testbed${MOSIX_TESTBED_INSTANCE}.lock while the testbed is up (a
# testbed instance's names are machine-wide; MOSIX_TESTBED_INSTANCE=K picks another one).
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: $0 N [--seed S] [--from I]" >&2; exit 2; }
[ $# -ge 1 ] || usage
N=$1; shift
[[ $N =~ ^[0-9]+$ ]] || usage
while [ $# -gt 0 ]; do
    case $1 in
        --seed) [ $# -ge 2 ] || usage; export MOSIX_FAULT_SEED=$2; shift 2 ;;
        --from) [ $# -ge 2 ] || usage; export MOSIX_FAULT_FROM=$2; shift 2 ;;
        *) usage ;;
    esac
done
export MOSIX_FAULTS=$N
export PATH="$HOME/.cargo/bin:$PATH"
# Build without the lock (the daemons and the CLI the test drives, and the test).
cargo build --release -p mosix -p mosixd --bins --quiet
cargo test --release -p mosix --test faults --no-run --quiet
exec flock -o "/tmp/testbed${MOSIX_TESTBED_INSTANCE:-}.lock" \
    cargo test --release -p mosix --test faults --quiet -- --ignored --exact faults --nocapture
