#!/usr/bin/env bash
# Checkpoint and restore of the same 512 MiB process with CRIU and with mosix, into the
# same directory, alternating, medians: BENCH lines. Root. CRIU is a reference, never a
# dependency: its code is not part of this project.
#
# Which CRIU: with CRIU_SRC=DIR (a source tree of CRIU, e.g. a snapshot of
# github.com/checkpoint-restore/criu fetched beforehand) it is built there, its build
# dependencies installed from Debian's packages; without it, Debian's `criu` package is
# installed (3.17 on bookworm). MIB (512), REPS (5), DIR (/var/tmp/mosix-bench-criu: a
# disk, not tmpfs) change what is measured. Neither side syncs its images to the disk.
set -euo pipefail
MIB=${MIB:-512}
REPS=${REPS:-5}
DIR=${DIR:-/var/tmp/mosix-bench-criu}
HERE=$(cd "$(dirname "$0")/.." && pwd)
MOSIX=${MOSIX:-$HERE/target/release/mosix}
[ "$(id -u)" = 0 ] || { echo "bench-criu: run as root" >&2; exit 1; }
[ -x "$MOSIX" ] || { echo "bench-criu: build mosix first (cargo build --release -p mosix)" >&2; exit 1; }

command -v bc >/dev/null || apt-get install -y -q bc >/dev/null
if [ -n "${CRIU_SRC:-}" ]; then
    apt-get install -y -q build-essential pkg-config libprotobuf-dev libprotobuf-c-dev \
        protobuf-c-compiler protobuf-compiler python3-protobuf libnl-3-dev libnet1-dev \
        libcap-dev libaio-dev libgnutls28-dev libbsd-dev libdrm-dev libnftables-dev \
        asciidoc xmlto uuid-dev >/dev/null
    make -C "$CRIU_SRC" -j"$(nproc)" criu >/dev/null
    CRIU=$CRIU_SRC/criu/criu
else
    command -v criu >/dev/null || apt-get install -y -q criu >/dev/null
    CRIU=$(command -v criu)
fi
echo "# $("$CRIU" --version | head -1), $(uname -r), $MIB MiB, $REPS rounds, in $DIR" >&2

mkdir -p "$DIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK" "$DIR"/criu "$DIR"/mosix.img' EXIT
cat > "$WORK/touch.c" <<'EOF'
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    /* Only 0, 1, 2 (/dev/null): whatever else the shell had is not the process's. */
    syscall(SYS_close_range, 3, ~0U, 0);
    size_t n = strtoul(argv[1], 0, 10) << 17;
    uint64_t *h = malloc(n * 8), x = 88172645463325252ULL;
    for (size_t i = 0; i < n; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; h[i] = x; }
    for (;;) pause();
}
EOF
cc -O2 -o "$WORK/touch" "$WORK/touch.c"

# A fresh process of MIB MiB (its own session, no terminal, no descriptors but /dev/null),
# a child of this shell (so that it is reaped here: CRIU restores the same PID), in $pid.
start() {
    setsid "$WORK/touch" "$MIB" </dev/null >/dev/null 2>&1 &
    pid=$!
    # Touched once its resident memory reaches MIB.
    while [ "$(awk '/VmRSS/ {print $2}' /proc/$pid/status 2>/dev/null || echo 0)" -lt $((MIB * 1024)) ]; do
        sleep 0.05
    done
}
now() { date +%s.%N; }
ms() { echo "($2 - $1) * 1000" | bc -l; }
median() { sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

declare -a cd cr md mr
for ((i = 0; i < REPS; i++)); do
    # CRIU: dump (the process ends), restore detached, end the copy.
    start
    rm -rf "$DIR/criu" && mkdir -p "$DIR/criu"
    # Each side starts with nothing of the other's left to write back.
    sync
    t0=$(now)
    "$CRIU" dump -t "$pid" -D "$DIR/criu" -o dump.log >/dev/null 2>&1 || { echo "criu dump failed:" >&2; tail -5 "$DIR/criu/dump.log" >&2; exit 1; }
    t1=$(now)
    # (CRIU restores the same PID: the dumped process must be reaped first.)
    wait "$pid" 2>/dev/null || true
    t1b=$(now)
    "$CRIU" restore -D "$DIR/criu" -d -o restore.log >/dev/null 2>&1 || { echo "criu restore failed:" >&2; tail -5 "$DIR/criu/restore.log" >&2; exit 1; }
    t2=$(now)
    kill -9 "$pid" 2>/dev/null || true
    cd+=("$(ms "$t0" "$t1")"); cr+=("$(ms "$t1b" "$t2")")
    # mosix: checkpoint (the process ends), restart detached, end the copy.
    start
    rm -f "$DIR/mosix.img"
    sync
    t0=$(now)
    "$MOSIX" checkpoint "$pid" -o "$DIR/mosix.img" --quiet
    t1=$(now)
    wait "$pid" 2>/dev/null || true
    t1=$(now)
    # (Its standard output, /dev/null in the original, becomes restart's: a file here.)
    "$MOSIX" restart --detach --trust-image "$DIR/mosix.img" >"$WORK/new" ||
        { echo "mosix restart failed" >&2; exit 1; }
    t2=$(now)
    new=$(head -1 "$WORK/new")
    kill -9 "$new" 2>/dev/null || true
    md+=("$(ms "$t0" "$t1")"); mr+=("$(ms "$t1" "$t2")")
done
wait 2>/dev/null || true
m() { printf '%s\n' "$@" | median; }
CD=$(m "${cd[@]}"); CR=$(m "${cr[@]}"); MD=$(m "${md[@]}"); MR=$(m "${mr[@]}")
printf 'BENCH criu_dump_%sMiB %.1f ms\n' "$MIB" "$CD"
printf 'BENCH criu_restore_%sMiB %.1f ms\n' "$MIB" "$CR"
printf 'BENCH mosix_checkpoint_%sMiB %.1f ms vs criu_dump=%.3f\n' "$MIB" "$MD" "$(echo "$MD / $CD" | bc -l)"
printf 'BENCH mosix_restart_%sMiB %.1f ms vs criu_restore=%.3f\n' "$MIB" "$MR" "$(echo "$MR / $CR" | bc -l)"
printf 'BENCH mosix_checkpoint_plus_restart_%sMiB %.1f ms vs criu=%.3f\n' "$MIB" "$(echo "$MD + $MR" | bc -l)" "$(echo "($MD + $MR) / ($CD + $CR)" | bc -l)"
