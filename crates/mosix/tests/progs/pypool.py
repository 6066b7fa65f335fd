# concurrent.futures.ThreadPoolExecutor: results printed in order as they come.
from concurrent.futures import ThreadPoolExecutor


def work(n):
    s = 0
    for k in range(400_000):
        s = (s * 33 + k * n) % 999_983
    return n, s


print("started", flush=True)
with ThreadPoolExecutor(max_workers=4) as ex:
    for n, s in ex.map(work, range(16)):
        print(n, s, flush=True)
print("done", flush=True)
