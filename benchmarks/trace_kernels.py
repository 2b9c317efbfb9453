"""The kernels of a torch.profiler Chrome trace (e.g. profile_decode.py --pipeline-trace) by
name and launch shape: count, median and total time, the costliest first. Tells apart two
launches of one kernel that a profiler table lumps together (the cascade's own-pages and
document parts of `_decode_split_kernel`, told by their grids).

  python3 benchmarks/trace_kernels.py trace.json[.gz] [rows]

`category_totals` sums the kernels by kind (GEMM, attention, merge, norm/RoPE/activation,
other) and measures the device's busy time (the union of kernel intervals) against its span.
"""
from __future__ import annotations

import collections
import gzip
import json
import statistics
import sys


def _kernels(path: str) -> list:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        trace = json.load(fh)
    return [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]


# (kind, substrings of a kernel's name), the first match wins; names are lower-cased
KINDS = (
    ("merge", ("_merge",)),
    ("attention", ("flash", "fmha", "attn", "_decode_split", "_decode_latent", "cudnn")),
    ("gemm", ("gemm", "nvjet", "sm90_xmma", "cutlass", "xmma", "gemv", "matmul")),
    ("norm/rope/act", ("rms_norm", "rope", "act_mul", "layer_norm", "silu", "gelu")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def category_totals(path: str) -> dict:
    """{"kinds": {kind: (count, total ms)}, "busy_ms": the union of the kernels' intervals,
    "span_ms": first kernel start to last kernel end, "names": {kind: [top names]}}."""
    ks = _kernels(path)
    kinds = collections.defaultdict(lambda: [0, 0.0])
    names = collections.defaultdict(collections.Counter)
    iv = []
    for e in ks:
        k = kind_of(e["name"])
        kinds[k][0] += 1
        kinds[k][1] += e["dur"] / 1e3
        names[k][e["name"][:50]] += e["dur"] / 1e3
        iv.append((e["ts"], e["ts"] + e["dur"]))
    busy, end = 0.0, None
    for a, b in sorted(iv):
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    span = (max(b for _, b in iv) - min(a for a, _ in iv)) / 1e3 if iv else 0.0
    return {"kinds": {k: tuple(v) for k, v in kinds.items()}, "busy_ms": busy / 1e3,
            "span_ms": span,
            "names": {k: [n for n, _ in c.most_common(3)] for k, c in names.items()}}


def kernel_table(path: str, rows: int = 12) -> list:
    """[(name, grid, block, count, median us, total ms)], the largest total first."""
    by = collections.defaultdict(list)
    for e in _kernels(path):
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
