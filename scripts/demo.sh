#!/usr/bin/env bash
# The MOSIX demo on one machine (run as root): installs what is needed, builds, then
#  1. starts the FAQ's CPU-bound awk job, checkpoints it in the middle of its work and
#     restarts it: the restarted process finishes the loop and prints the same result;
#  2. brings up a 4-node testbed (network namespaces, each with its own mosixd), moves a
#     running job by hand (migrate, where), then starts the FAQ's test: eight CPU-bound
#     awk jobs on node 1, which spread over the nodes by themselves (mosix ps / status).
set -euo pipefail
cd "$(dirname "$0")/.."
# A clean descriptor set for the jobs: what this script inherited beyond stdio (a pipe of
# the terminal emulator or of a CI runner) would be theirs too, and a process holding a
# pipe that others share cannot be checkpointed. 255 is bash's own copy of this script.
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -ne 255 ]; then eval "exec $fd>&-"; fi
done
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
disown "$pid"   # the checkpoint ends it (SIGKILL): no "Killed" report from this shell
until [ -s "$work/out.txt" ]; do sleep 0.1; done
"$M" checkpoint --check "$pid"
"$M" checkpoint "$pid" -o "$work/awk.img"
echo "-- printed before the checkpoint:"; cat "$work/out.txt"
echo "-- the restarted process goes on:"
"$M" restart "$work/awk.img"
echo "-- exit status $?"

echo "== 2. a 4-node cluster on this machine"
"$M" testbed up --nodes 4
trap '"$M" testbed down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
on() { n=$1; shift; "$M" testbed exec "$n" -- "$M" "$@"; }
on 1 status
echo "-- a job started with mosrun on node 1, moved by hand to node 3 and back:"
# mosrun registers the job and execs it: the job's PID is the shell's $!.
"$M" testbed exec 1 -- "$M" run awk \
    'BEGIN {for(i=0;i<3000;i++)for(j=0;j<10000;j++); print "the moved job finished"}' &
pid=$!
until on 1 where "$pid" >/dev/null 2>&1; do sleep 0.1; done
on 1 mosctl stay >/dev/null   # no automatic moves while we move it by hand
on 1 migrate "$pid" 3 && echo "where $pid: $(on 1 where "$pid")"
on 3 ps
on 1 migrate "$pid" home && echo "where $pid: $(on 1 where "$pid")"
on 1 mosctl nostay >/dev/null
wait
echo "-- the FAQ's test: eight CPU-bound awk jobs started on node 1 spread by themselves:"
for _ in 1 2 3 4 5 6 7 8; do
    "$M" testbed exec 1 -- "$M" run awk 'BEGIN {for(i=0;i<20000;i++)for(j=0;j<10000;j++); print "job done"}' &
done
# Each node counts the jobs it runs (node 1: its own that are home; others: guests).
running() { on "$1" ps --json | python3 -c 'import json,sys; print(sum(1 for p in json.load(sys.stdin) if p["state"] == "running" and (p["role"] == "guest" or p["where_"] == 0)))'; }
start=$SECONDS
while :; do
    counts=$(for n in 1 2 3 4; do printf '%s ' "$(running "$n")"; done)
    echo "after $((SECONDS - start)) s, jobs per node: $counts"
    [ "$counts" = "2 2 2 2 " ] && break
    [ $((SECONDS - start)) -ge 30 ] && { echo "(not spread after 30 s: see mosix status)"; break; }
    sleep 1
done
on 1 status
echo "-- (run \`mosix testbed exec 1 -- mosix mon\` in another terminal to watch)"
wait
"$M" testbed down
