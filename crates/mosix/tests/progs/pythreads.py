# Two busy Python threads; the main thread waits for them and prints their results.
import sys
import threading

results = [0, 0]


def busy(i):
    s = 0
    for k in range(3_000_000):
        s = (s * 31 + k + i) % 1_000_003
    results[i] = s


ts = [threading.Thread(target=busy, args=(i,)) for i in range(2)]
for t in ts:
    t.start()
print("started", flush=True)
for t in ts:
    t.join()
print("results", results, flush=True)
sys.exit(5)
