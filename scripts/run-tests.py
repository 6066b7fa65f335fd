#!/usr/bin/env python3
"""Runs every test binary of the workspace, in lanes that run side by side.

Reads the JSON messages of `cargo test --no-run --message-format=json` on stdin, and runs
each test executable (in its package's directory, as `cargo test` does) with the
arguments given after `--`. Most of the suite's time is spent in testbed tests that wait
(on gossip, on moves, on jobs); several lanes overlap those waits. Each lane has a testbed
instance of its own (`MOSIX_TESTBED_INSTANCE`: the caller's, or 0, then +5 per lane,
modulo 10), so two lanes never share namespaces, addresses, cgroups or lock files.

A binary's output is printed whole when it ends (lanes do not interleave lines), then a
table of every binary's time and result; the exit status is 1 if any binary failed.

  cargo test --workspace --release --no-run --message-format=json \\
      | python3 scripts/run-tests.py --lanes 2 -- --test-threads=2
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

# Seconds each binary took in a recent run (longest first is the schedule that finishes
# soonest); a binary not listed counts as LONG, so that a new slow test starts early.
LONG = 60
KNOWN = {
    "faults": 95,
    "migration_stdio": 65,
    "recovery": 45,
    "checkpoint": 40,
    "transparency": 35,
    "security": 35,
    "sim": 25,
    "balancing": 25,
    "install": 20,
    "threads": 20,
    "migration": 20,
    "cluster_testbed": 15,
    "demo": 40,
}


def executables(lines):
    seen = set()
    for line in lines:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") != "compiler-artifact" or not m.get("profile", {}).get("test"):
            continue
        exe = m.get("executable")
        if not exe or exe in seen:
            continue
        seen.add(exe)
        name = m["target"]["name"]
        kind = m["target"]["kind"][0]
        pkg = os.path.dirname(m["manifest_path"])
        label = f"{os.path.basename(pkg)}::{name}" + ("" if kind == "test" else f" ({kind})")
        yield {"name": name, "label": label, "exe": exe, "cwd": pkg, "kind": kind}


def weight(b):
    if b["kind"] != "test":
        return 1  # unit tests: short
    return KNOWN.get(b["name"], LONG)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lanes", type=int, default=int(os.environ.get("MOSIX_TEST_LANES", "2")))
    p.add_argument("args", nargs="*", help="arguments for every test binary (after --)")
    a = p.parse_args()
    bins = sorted(executables(sys.stdin), key=weight, reverse=True)
    if not bins:
        print("run-tests: no test executables in the input", file=sys.stderr)
        return 2
    base = int(os.environ.get("MOSIX_TESTBED_INSTANCE", "0") or 0)
    lanes = max(1, a.lanes)
    queue = list(bins)
    qlock = threading.Lock()
    plock = threading.Lock()
    results = []

    def lane(k):
        env = dict(os.environ)
        env["MOSIX_TESTBED_INSTANCE"] = str((base + 5 * k) % 10)
        while True:
            with qlock:
                if not queue:
                    return
                b = queue.pop(0)
            t0 = time.monotonic()
            r = subprocess.run(
                [b["exe"], *a.args],
                cwd=b["cwd"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            dt = time.monotonic() - t0
            with plock:
                print(f"\n===== {b['label']} (lane {k}, instance {env['MOSIX_TESTBED_INSTANCE']}): "
                      f"{'ok' if r.returncode == 0 else f'FAILED ({r.returncode})'} in {dt:.1f} s",
                      flush=True)
                sys.stdout.buffer.write(r.stdout)
                sys.stdout.flush()
                results.append((b["label"], dt, r.returncode))

    t0 = time.monotonic()
    threads = [threading.Thread(target=lane, args=(k,)) for k in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    failed = [r for r in results if r[2] != 0]
    print("\n===== test binaries, longest first")
    for label, dt, rc in sorted(results, key=lambda r: -r[1]):
        print(f"{dt:7.1f} s  {'ok    ' if rc == 0 else 'FAILED'}  {label}")
    print(f"{len(results)} binaries in {wall:.0f} s on {lanes} lanes; "
          f"{len(failed)} failed{': ' if failed else ''}{', '.join(r[0] for r in failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
