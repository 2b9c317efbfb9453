"""The prefill's projections alone on the GPU: F.linear (cuBLAS) at a chunk's row counts for a
preset's four GEMMs (q|k|v, o, gate|up, down), TFLOP/s each and a layer's total, so the GEMM
share of a profiled prefill (profile_step.py --single) can be read against what cuBLAS reaches
on the same shapes. Timed with triton.testing.do_bench (median, after its warm-up).

  python3 benchmarks/bench_prefill_gemms.py --rows 4096,8192,16384,32768
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def layer_gemms(cfg: dict) -> dict:
    """{name: (N, K)} of one dense layer's projections (weights are (out, in))."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hq = cfg["num_attention_heads"]
    hkv = cfg.get("num_key_value_heads", hq)
    d = cfg.get("head_dim") or h // hq
    return {"qkv": ((hq + 2 * hkv) * d, h), "o": (h, hq * d), "gate_up": (2 * i, h),
            "down": (h, i)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--rows", default="2048,4096,8192,16384,32768")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from bench_e2e import hf_config
    shapes = layer_gemms(hf_config(a.preset, 8192))
    rows = [int(r) for r in a.rows.split(",") if r]
    out = []
    print(f"{'rows':>6} | " + " | ".join(f"{k:>16}" for k in shapes) + " | layer TFLOP/s")
    for m in rows:
        cells, t_all, f_all = [], 0.0, 0.0
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            ms = do_bench(lambda x=x, w=w: F.linear(x, w), warmup=50, rep=200)
            fl = 2.0 * m * n * k
            t_all += ms
            f_all += fl
            cells.append(f"{ms:7.3f} ms {fl / ms / 1e9:4.0f}")
            out.append({"rows": m, "gemm": name, "N": n, "K": k, "ms": ms,
                        "tflops": fl / ms / 1e9})
            del x, w
        print(f"{m:>6} | " + " | ".join(f"{c:>16}" for c in cells)
              + f" | {f_all / t_all / 1e9:6.0f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
