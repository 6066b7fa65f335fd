# A python3 job in phases for migration tests: computes, prints, and waits for a line of
# stdin between phases; reports whether getpid() and CLOCK_MONOTONIC behaved across moves.
import os, sys, time
me = os.getpid()
t0 = time.monotonic()
print("start pid=%d" % me, flush=True)
phase = 0
acc = 0
for line in sys.stdin:
    for i in range(300000):
        acc = (acc * 31 + i + phase) % 1000000007
    now = time.monotonic()
    print("phase", phase, acc, "samepid=%d" % (os.getpid() == me),
          "monotonic_ok=%d" % (now >= t0), "got", line.strip(), flush=True)
    t0 = now
    phase += 1
print("end", flush=True)
sys.exit(3)
