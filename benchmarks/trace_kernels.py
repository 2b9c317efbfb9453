"""The kernels of a torch.profiler Chrome trace (e.g. profile_decode.py --pipeline-trace) by
name and launch shape: count, median and total time, the costliest first. Tells apart two
launches of one kernel that a profiler table lumps together (the cascade's own-pages and
document parts of `_decode_split_kernel`, told by their grids).

  python3 benchmarks/trace_kernels.py trace.json[.gz] [rows]
"""
from __future__ import annotations

import collections
import gzip
import json
import statistics
import sys


def kernel_table(path: str, rows: int = 12) -> list:
    """[(name, grid, block, count, median us, total ms)], the largest total first."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        trace = json.load(fh)
    by = collections.defaultdict(list)
    for e in trace.get("traceEvents", []):
        if e.get("cat") == "kernel":
            a = e.get("args", {})
            by[(e["name"][:60], tuple(a.get("grid", ())), tuple(a.get("block", ())))].append(
                e["dur"])
    out = [(n, g, b, len(v), statistics.median(v), sum(v) / 1e3) for (n, g, b), v in by.items()]
    return sorted(out, key=lambda r: -r[5])[:rows]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(__doc__)
    rows = kernel_table(argv[0], int(argv[1]) if len(argv) > 1 else 12)
    print(f"{'kernel':60} {'grid':>14} {'count':>6} {'median us':>10} {'total ms':>9}")
    for n, g, _, c, med, tot in rows:
        print(f"{n:60} {str(g):>14} {c:>6} {med:>10.1f} {tot:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
