"""The paged decode kernel's split count swept on the GPU, one layer, batch 1, at the families'
attention shapes, against the bytes it must read.

For each shape (q heads, KV heads, head dim; DeepSeek's 576-wide latent goes through its own
kernel) and context length L: the sequence sits in a block table of the width a decode graph
gets (`graph_width_bucket`: a power of two of pages, up to twice L), and `paged_decode_triton`
is timed with CUDA graphs (`do_bench_cudagraph`, median) at its default launch and at other
split counts / key tiles / stages, each checked against the default's output. The floor is the
sequence's K and V (or latent) read once at the device's copy bandwidth.

  python3 benchmarks/bench_decode_splits.py                 # GPU
  python3 benchmarks/bench_decode_splits.py --lengths 8192,32768 --json out.json
  python3 benchmarks/bench_decode_splits.py --shapes llama3-8b --lengths 131072 --queries 16
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys

import torch

SHAPES = {   # name: (q heads, KV heads, head dim)
    "llama3-8b": (32, 8, 128),
    "qwen3-moe-30b-a3b": (32, 4, 128),
    "gemma3-12b": (16, 8, 256),
    "deepseek-v2-lite": (16, 1, 576),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--lengths", default="8192,32768,131072",
                   help="context lengths; 96 tokens are added (a question and some decode)")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--queries", type=int, default=1,
                   help="questions decoding together on one cached document (the cascade "
                        "decode's shared part: one sequence, this many query tokens, every key "
                        "visible); > 1 sweeps the row tile (block_m), warps and splits per SM "
                        "too and prints the best as RINGSERVE_DECODE_MANY_ROWS")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode_splits needs a CUDA device")
    from triton.testing import do_bench_cudagraph

    from bench_moe_gemv import copy_bandwidth    # beside this file
    from ringserve.kernels._host import cdiv, next_pow2, sm_count
    from ringserve.kernels.flash_decode import paged_decode_triton
    from ringserve.scheduler import graph_width_bucket

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)                   # read + write bytes per second
    sms = sm_count(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write), {sms} SMs", flush=True)
    page = a.page_size
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name in a.shapes.split(","):
        hq, hkv, d = SHAPES[name]
        latent = d == 576
        for L0 in (int(x) for x in a.lengths.split(",") if x):
            L = L0 + 96
            pages = -(-L // page)
            width = graph_width_bucket(pages)
            kc = torch.randn(width, page, hkv, d, device=dev, dtype=torch.bfloat16, generator=g)
            vc = kc if latent else torch.randn_like(kc)
            table = torch.randperm(width, device=dev, generator=g).view(1, width).int()
            lens = torch.tensor([L], dtype=torch.int32, device=dev)
            nq = a.queries
            q = torch.randn(1, nq, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
            # as the cascade calls it: causal, the questions' positions after the document
            qpos = torch.arange(L, L + nq, device=dev, dtype=torch.int32)[None]
            run = functools.partial(paged_decode_triton, q, kc, vc, table, lens, causal=True,
                                    q_pos=qpos, check=False, positions_sorted=True)
            kv_bytes = L * hkv * d * 2 * (1 if latent else 2)   # read once for all queries
            floor_us = kv_bytes / bw * 1e6     # as bench_moe_gemv / profile_decode count it
            ref, _ = run()
            base = do_bench_cudagraph(run, rep=40) * 1e3
            per_wave = max(1, -(-sms // hkv))
            splits = sorted({max(1, int(f * per_wave)) for f in (0.25, 0.5, 1, 2, 4, 8)})
            tiles = (None, 32, 128) if not latent else (None, 32)
            stages = (None, 4) if d <= 256 else (None,)
            times = {}
            if nq > 1 and not latent:     # many rows: (block_m, block_n, splits per SM,
                # stages, warps), as RINGSERVE_DECODE_MANY_ROWS takes them (0: the default)
                many = list(itertools.product((0, 32), (0, 32, 128), (1, 2, 4), (0, 4),
                                              (0, 8)))
                rows_kv = nq * (hq // hkv)             # query rows a KV head
                for c in many:
                    bm, bn, per_sm, st, wp = c
                    bm = bm or min(128, max(16, next_pow2(rows_kv)))   # the kernel's default
                    fn = functools.partial(run, block_m=bm, block_n=bn or None,
                                           num_splits=cdiv(per_sm * sms, hkv * cdiv(rows_kv, bm)),
                                           num_stages=st or None, num_warps=wp or None)
                    try:
                        out, _ = fn()
                        assert torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
                        times[c] = do_bench_cudagraph(fn, rep=20) * 1e3
                    except Exception as e:   # noqa: BLE001 - a launch the compiler refuses
                        print(f"  {name} {L0} {c}: {type(e).__name__}", flush=True)
                splits, tiles, stages = (), (), ()
            for s, bn, st in itertools.product(splits, tiles, stages):
                fn = functools.partial(run, num_splits=s, block_n=bn, num_stages=st)
                try:
                    out, _ = fn()
                    assert torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
                    times[(s, bn, st)] = do_bench_cudagraph(fn, rep=20) * 1e3
                except Exception as e:   # noqa: BLE001 - a launch the compiler refuses
                    print(f"  {name} {L0} {(s, bn, st)}: {type(e).__name__}", flush=True)
            best = min(times, key=times.get)
            top = sorted(times.items(), key=lambda kv: kv[1])[:5]
            row = dict(shape=name, length=L0, width_pages=width, floor_us=floor_us,
                       default_us=base, best_us=times[best], best=list(best),
                       top=[(list(k), v) for k, v in top])
            rows.append(row)
            print(f"{name} {L0}: floor {floor_us:.1f} us, default {base:.1f}, best {best} "
                  f"{times[best]:.1f}; top {[(k, round(v, 1)) for k, v in top]}", flush=True)
            if nq > 1 and not latent:
                print(f"BEST_MANY_ROWS {name} {L0} {','.join(map(str, best))}", flush=True)
            del kc, vc
    print(f"\n{'shape':>18} | {'length':>7} | {'floor us':>8} | {'default':>7} | {'x floor':>7} "
          f"| {'best':>6} | {'x floor':>7} | best (splits, block_n, stages)")
    for r in rows:
        print(f"{r['shape']:>18} | {r['length']:>7} | {r['floor_us']:>8.1f} | "
              f"{r['default_us']:>7.1f} | {r['default_us'] / r['floor_us']:>7.2f} | "
              f"{r['best_us']:>6.1f} | {r['best_us'] / r['floor_us']:>7.2f} | {r['best']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"copy_bw": bw, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
