#!/usr/bin/env bash
# The MOSIX demo on one machine (run as root): installs what is needed, builds, then
#  1. starts the FAQ's CPU-bound awk job, checkpoints it in the middle of its work and
#     restarts it: the restarted process finishes the loop and prints the same result;
#  2. brings up a 4-node testbed (network namespaces, each with its own mosixd) and shows
#     the cluster with `mosix status`, loads one node and shows the load spread by gossip.
# Automatic migration of the jobs over the nodes comes with issues 4 and 5 (not built yet).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
echo "== building (release)"
cargo build --release --bins --quiet
M=$PWD/target/release/mosix
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== 1. checkpoint and restart of the FAQ's awk loop"
job='BEGIN {for(i=0;i<4000;i++){for(j=0;j<10000;j++); if(i%500==0){print "i =", i; fflush()}} print "finished", i}'
# stdout is a pipe (a FIFO read by cat), so the restarted process writes to this terminal.
mkfifo "$work/fifo"
cat "$work/fifo" > "$work/out.txt" &
awk "$job" </dev/null > "$work/fifo" &
pid=$!
until [ -s "$work/out.txt" ]; do sleep 0.1; done
"$M" checkpoint --check "$pid"
"$M" checkpoint "$pid" -o "$work/awk.img"
wait "$pid" 2>/dev/null || true
echo "-- printed before the checkpoint:"; cat "$work/out.txt"
echo "-- the restarted process goes on:"
"$M" restart "$work/awk.img"
echo "-- exit status $?"

if "$M" testbed --help >/dev/null 2>&1 && "$M" testbed up --help >/dev/null 2>&1; then
    echo "== 2. a 4-node cluster on this machine"
    "$M" testbed up --nodes 4
    trap '"$M" testbed down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
    "$M" testbed exec 1 -- "$M" status
    echo "-- three CPU-bound awk jobs on node 2; node 1 sees node 2's load rise:"
    for _ in 1 2 3; do "$M" testbed exec 2 -- awk 'BEGIN {for(i=0;i<10000;i++)for(j=0;j<10000;j++);}' & done
    sleep 6
    "$M" testbed exec 1 -- "$M" status
    wait
    "$M" testbed down
fi
