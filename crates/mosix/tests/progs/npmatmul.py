# numpy matrix products over OpenBLAS threads. Small integers in float64: every sum is
# exact, so the result does not depend on how the threads split the work.
import numpy as np

rng = np.random.default_rng(1)
a = rng.integers(0, 10, (500, 500)).astype(np.float64)
b = rng.integers(0, 10, (500, 500)).astype(np.float64)
print("started", flush=True)
for i in range(30):
    c = a @ b
    a = (c % 10) + i % 3
    print(i, int(c.sum()), flush=True)
