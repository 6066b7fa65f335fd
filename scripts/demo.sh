#!/usr/bin/env bash
# The MOSIX demo on one machine (run as root): installs what is needed, builds, then
#  1. starts the FAQ's CPU-bound awk job, checkpoints it in the middle of its work and
#     restarts it: the restarted process finishes the loop and prints the same result;
#  2. brings up a 4-node testbed (network namespaces, each with its own mosixd), moves a
#     running job by hand (migrate, where), then starts the FAQ's test: eight CPU-bound
#     awk jobs on node 1, which spread over the nodes by themselves (mosix ps / status).
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

echo "== 2. a 4-node cluster on this machine"
"$M" testbed up --nodes 4
trap '"$M" testbed down >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
on() { n=$1; shift; "$M" testbed exec "$n" -- "$M" "$@"; }
on 1 status
echo "-- a job started with mosrun on node 1, moved by hand to node 3 and back:"
MOSRUN_PIDFILE="$work/pid" "$M" testbed exec 1 -- "$M" run awk \
    'BEGIN {for(i=0;i<3000;i++)for(j=0;j<10000;j++); print "the moved job finished"}' &
until [ -s "$work/pid" ]; do sleep 0.1; done
pid=$(cat "$work/pid")
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
sleep 5
for n in 1 2 3 4; do echo "node $n runs $(on "$n" ps --json | grep -c '"state": "running"') of them"; done
on 1 status
echo "-- (run \`mosix testbed exec 1 -- mosix mon\` in another terminal to watch)"
wait
"$M" testbed down
