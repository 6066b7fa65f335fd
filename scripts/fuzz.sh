#!/usr/bin/env bash
# Fuzzes every parser that takes input from a file or a socket, each target for a set time:
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 60 s, every target)
# Prints per target one line `FUZZ <target> execs=N crashes=N unique=N corpus=N
# max_alloc=BYTES secs=S seed=N`, and a `CRASH <target> <kind>: ... saved=FILE` line per
# kind of crash (panic, allocation beyond the target's bound, hang). Crashing inputs are
# kept under target/fuzz/crashes/<target>/; files under target/fuzz/corpus/<target>/ are
# added to the seeds. As root, images of a real checkpointed process are seeds too.
# Exit status: 0 if nothing crashed. See docs/fuzzing.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
secs="${1:-${MOSIX_FUZZ_SECS:-60}}"
shift || true
cargo build --release --quiet -p mosix-fuzz || exit 1
bin="${CARGO_TARGET_DIR:-target}/release/mosix-fuzz"
out="${CARGO_TARGET_DIR:-target}/fuzz"
mkdir -p "$out/crashes" "$out/corpus"
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <("$bin" --list | cut -f1); fi
failed=0
for t in "${targets[@]}"; do
    # One process per target: a hang or a runaway allocation ends only its own run.
    log=$(mktemp)
    "$bin" --secs "$secs" --target "$t" --checkpoint-seeds \
        --crash-dir "$out/crashes" --corpus "$out/corpus" >"$log" 2>&1
    rc=$?
    grep -E '^(FUZZ|CRASH)' "$log"
    if ! grep -q '^FUZZ ' "$log"; then
        echo "FUZZ $t execs=0 crashes=1 died=$rc"
        tail -5 "$log" >&2
    fi
    [ "$rc" -ne 0 ] && failed=1
    rm -f "$log"
done
exit "$failed"
