"""Step times of call 4's prefill under load, binned by the prompt's cached prefix: each step's
chunk (start, tokens) is recomputed with the scheduler's rule (flops cost model, E = the 8B
shape's 26,627; quarter-budget slack; 64-token alignment) and matched to the worker's step times
from the end (the simulated step counts match the measured ones within 2). Run from this folder:
python3 step_bins.py"""
import json
import math
from pathlib import Path

import numpy as np

d = json.loads((Path(__file__).parent / "call4_s6d" / "s6d.json").read_text())
E = 1.396e10 / 524288


def chunks(budget, N=262144):
    p, out = 0, []
    while p < N:
        left, a = N - p, 1 + p / E
        n = min(left, max(1, int(E * (math.sqrt(a * a + 2 * budget / E) - a))))
        if n < left and left * (1 + (p + left / 2) / E) <= budget * 1.25:
            n = left
        if 64 < n < left:
            n -= n % 64
        out.append((p, n))
        p += n
    return out


for r in d["prefill"]["budgets"]:
    b, w = r["budget"], r["worker_step_ms"]
    ch = chunks(b)
    k = min(len(ch), len(w) - 1)
    rows = np.array([(p, n, t) for (p, n), t in zip(ch[-k:], w[-k - 1:-1])])
    print(f"budget {b}: {len(ch)} chunks simulated, {len(w)} steps measured")
    for lo in range(0, 262144, 32768):
        s = (rows[:, 0] >= lo) & (rows[:, 0] < lo + 32768)
        if s.any():
            print(f"  prefix {lo // 1024:3d}K-{(lo + 32768) // 1024:3d}K: {s.sum():4d} steps, "
                  f"chunk median {np.median(rows[s, 1]):5.0f} tokens, step median "
                  f"{np.median(rows[s, 2]):6.1f} ms (p10 {np.percentile(rows[s, 2], 10):6.1f}, "
                  f"p90 {np.percentile(rows[s, 2], 90):6.1f})")
