"""The few-row GEMV (`kernels.gemv.gemv`) against F.linear (cuBLAS) on the GPU, at the decode
step's projections of the families' presets, 1 and 4 rows: each timed with CUDA graphs
(`do_bench_cudagraph`, median), its tiles swept, checked against F.linear, against the floor
of reading the weight once at the device's copy bandwidth. Then MLA's per-head absorption
(`head_gemv`: DeepSeek-V2-Lite's W_UK and W_UV, views of kv_b_proj as the model passes them)
against torch.einsum the same way (`--heads-only`: that part alone).

  python3 benchmarks/bench_gemv.py --json out.json        # GPU
  python3 benchmarks/bench_gemv.py --few --rows 4,16 --shapes llama3-8b   # gemm_few's sweep
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys

import torch

SHAPES = {   # name: (N, K), the weight (out, in)
    "llama3-8b qkv": (6144, 4096), "llama3-8b o": (4096, 4096),
    "llama3-8b down": (4096, 14336), "llama3-8b gate_up": (28672, 4096),
    "qwen3-moe qkv": (5120, 2048), "qwen3-moe o": (2048, 4096), "qwen3-moe router": (128, 2048),
    "deepseek q|kv_a": (3648, 2048), "deepseek o": (2048, 2048),
    "deepseek shared gate_up": (5632, 2048), "deepseek shared down": (2048, 2816),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,4")
    p.add_argument("--json", default=None)
    p.add_argument("--heads-only", action="store_true")
    p.add_argument("--stages", default="2,3,4",
                   help="software-pipelining stages of the K loop tried on each shape's four "
                        "best tiles ('' for none; a 3-element tile is 1 stage)")
    p.add_argument("--few", action="store_true",
                   help="the tensor-core few-row GEMM (gemm_few: 2-64 rows, the batch-16 "
                        "decode step's projections) swept instead of the GEMV, and no per-head "
                        "rows")
    p.add_argument("--shapes", default="",
                   help="only the shapes whose name contains this (e.g. llama3-8b)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gemv needs a CUDA device")
    from triton.testing import do_bench_cudagraph

    from bench_moe_gemv import copy_bandwidth    # beside this file
    from ringserve.kernels.gemv import gemm_few, gemm_few_blocks, gemv, gemv_blocks

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write)", flush=True)
    cfgs = list(itertools.product((1, 2, 4, 8), (256, 512), (4, 8)))
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    few_cfgs = [(bn, bk, 4, st) for bn in (16, 32, 64) for bk in (128, 256)
                for st in (3, 4, 5)]
    for name, (N, K) in ({} if a.heads_only else SHAPES).items():
        if a.shapes not in name:
            continue
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        floor_us = N * K * 2 / bw * 1e6
        for M in (int(s) for s in a.rows.split(",")):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
            ref = torch.nn.functional.linear(x, w)
            cublas = do_bench_cudagraph(functools.partial(torch.nn.functional.linear, x, w),
                                        rep=40) * 1e3
            mp = 1 << (M - 1).bit_length()
            if a.few:
                make = lambda c, x=x, w=w: functools.partial(gemm_few, x, w,  # noqa: E731
                                                             blocks=c)
                times = _sweep(few_cfgs, make, ref, f"{name} M={M} few")
                default = tuple(gemm_few_blocks(N, K))
            else:
                make = lambda c, x=x, w=w: functools.partial(gemv, x, w, blocks=c)  # noqa: E731
                times = _sweep([c for c in cfgs if mp * c[0] * c[1] <= 8192], make, ref,
                               f"{name} M={M}")
                times.update(_staged(times, a.stages, make, ref, f"{name} M={M}"))
                default = tuple(gemv_blocks(N, K))
            if default not in times:     # the shape's default tile, timed even where the
                times.update(_sweep([default], make, ref, f"{name} M={M}"))   # sweep missed it
            best = min(times, key=times.get)
            row = dict(shape=name, N=N, K=K, M=M, floor_us=floor_us, cublas_us=cublas,
                       default=list(default), default_us=times.get(default),
                       best_us=times[best], best=list(best),
                       all=[(list(k), v) for k, v in times.items()])
            rows.append(row)
            print(f"{name} M={M}: floor {floor_us:.1f} us, cuBLAS {cublas:.1f}, default "
                  f"{row['default_us'] or float('nan'):.1f}, best {best} {times[best]:.1f}",
                  flush=True)
    if not a.few:
        rows += _heads(a, dev, bw, g)
        rows += _absorb_in_rope(dev, bw, g)
    print(f"\n{'shape':>24} | {'M':>2} | {'floor':>6} | {'cuBLAS':>6} | {'x fl':>5} | "
          f"{'default':>7} | {'best':>6} | {'x fl':>5} | best (BLOCK_N, BLOCK_K, warps[, stages])")
    for r in rows:
        d = r["default_us"] or float("nan")
        print(f"{r['shape']:>24} | {r['M']:>2} | {r['floor_us']:>6.1f} | {r['cublas_us']:>6.1f} | "
              f"{r['cublas_us'] / r['floor_us']:>5.2f} | {d:>7.1f} | {r['best_us']:>6.1f} | "
              f"{r['best_us'] / r['floor_us']:>5.2f} | {r['best']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"copy_bw": bw, "rows": rows}, fh, indent=1)
    return 0


def _sweep(cfgs, make, ref, label) -> dict:
    """{tile: us} of make(tile)'s call for each tile, each checked against ref first (CUDA-graph
    replays, median); a tile the compiler refuses, or a wrong output, is reported and left out."""
    from triton.testing import do_bench_cudagraph
    times = {}
    for c in cfgs:
        fn = make(c)
        try:
            assert torch.allclose(fn().float(), ref.float(), atol=2e-2, rtol=2e-2)
            times[c] = do_bench_cudagraph(fn, rep=20) * 1e3
        except Exception as e:   # noqa: BLE001 - a tile the compiler refuses
            print(f"  {label} {c}: {type(e).__name__}", flush=True)
    return times


def _staged(times: dict, stages: str, make, ref, label) -> dict:
    """The four fastest tiles of `times` again with their K loop pipelined over each of
    `stages` ("2,3,4"): {tile + (stages,): us}."""
    ss = [int(s) for s in stages.split(",") if s.strip()]
    top = sorted(times, key=times.get)[:4]
    return _sweep([tuple(c) + (s,) for c in top for s in ss if s > 1], make, ref, label)


def _heads(a, dev, bw, g) -> list:
    """head_gemv at DeepSeek-V2-Lite's absorption (16 heads, kv_b_proj 4096 x 512: W_UK its
    first 128 rows a head read transposed, W_UV the last 128) against einsum; rows as the
    GEMV's (cublas_us: the einsum's time)."""
    from triton.testing import do_bench_cudagraph

    from ringserve.kernels.gemv import HEAD_GEMV_BLOCKS, HEAD_GEMV_BLOCKS_T, head_gemv
    cfgs = [(4, 512, 4), (8, 256, 4), (2, 512, 4), (16, 128, 4), (32, 64, 4), (64, 32, 4),
            (128, 16, 4), (64, 64, 4), (128, 32, 8), (32, 32, 2), (8, 512, 8), (256, 16, 8)]
    kv_b = torch.randn(16 * 256, 512, device=dev, dtype=torch.bfloat16, generator=g) * 0.04
    w = kv_b.view(16, 256, 512)
    rows = []
    for name, wt, xw in (("deepseek W_UK (per head)", w[:, :128].transpose(1, 2), 192),
                         ("deepseek W_UV (per head)", w[:, 128:], 576)):
        default = HEAD_GEMV_BLOCKS_T if wt.stride(1) == 1 else HEAD_GEMV_BLOCKS
        floor_us = wt.numel() * 2 / bw * 1e6
        for M in (int(s) for s in a.rows.split(",")):
            x = torch.randn(M, 16, xw, device=dev, dtype=torch.bfloat16,
                            generator=g)[..., :wt.shape[2]]
            ref = torch.einsum("thk,hnk->thn", x, wt)
            ein = do_bench_cudagraph(functools.partial(torch.einsum, "thk,hnk->thn", x, wt),
                                     rep=40) * 1e3
            make = lambda c, x=x, wt=wt: functools.partial(head_gemv, x, wt,  # noqa: E731
                                                             blocks=c)
            times = _sweep(cfgs, make, ref, f"{name} M={M}")
            times.update(_staged(times, a.stages, make, ref, f"{name} M={M}"))
            best = min(times, key=times.get)
            rows.append(dict(shape=name, N=wt.shape[1], K=wt.shape[2], M=M, floor_us=floor_us,
                             cublas_us=ein, default_us=times.get(default), best_us=times[best],
                             best=list(best), all=[(list(k), v) for k, v in times.items()]))
            print(f"{name} M={M}: floor {floor_us:.1f} us, einsum {ein:.1f}, default "
                  f"{times.get(default, float('nan')):.1f}, best {best} {times[best]:.1f}",
                  flush=True)
    return rows


def _absorb_in_rope(dev, bw, g) -> list:
    """W_UK's absorption of a decode token inside the latent RoPE launch (DeepSeek-V2-Lite:
    16 heads, q_nope 128 wide, W_UK (16, 128, 512)), its (programs a head, rows a step) tiles
    swept, against the two launches it replaces (einsum, then the launch without it); rows as
    the GEMV's (cublas_us: the two launches' time)."""
    from triton.testing import do_bench_cudagraph

    from ringserve.config import RopeConfig
    from ringserve.kernels.fused import ABSORB_BLOCKS, latent_rope_triton
    from ringserve.rope import Rotary
    H = 16
    q_full = torch.randn(1, H, 192, device=dev, dtype=torch.bfloat16, generator=g)
    q_nope, q_pe = q_full[..., :128], q_full[..., 128:]
    kv = torch.randn(1, 576, device=dev, dtype=torch.bfloat16, generator=g)
    c, k_pe = kv[:, :512], kv[:, 512:]
    w_uk = (torch.randn(H * 256, 512, device=dev, dtype=torch.bfloat16, generator=g)
            * 0.04).view(H, 256, 512)[:, :128]
    cos, sin = Rotary(RopeConfig(theta=1e4), 64).cos_sin(torch.tensor([1234], device=dev))
    nw = torch.ones(512, device=dev, dtype=torch.bfloat16)

    def apart():
        q_lat = torch.einsum("thn,hnc->thc", q_nope, w_uk)
        return latent_rope_triton(q_lat, q_pe, c, k_pe, cos, sin, norm_weight=nw)[0]

    def inside(blocks):
        return latent_rope_triton(None, q_pe, c, k_pe, cos, sin, norm_weight=nw,
                                  absorb=(q_nope, w_uk), absorb_blocks=blocks)[0]

    ref = apart()
    base = do_bench_cudagraph(apart, rep=40) * 1e3
    cfgs = [(cb, rows) for cb in (2, 4, 8, 16, 32) for rows in (16, 32, 64, 128)]
    label = "deepseek W_UK in the RoPE launch"
    times = _sweep(cfgs, lambda cc: functools.partial(inside, cc), ref, label)
    best = min(times, key=times.get)
    floor_us = w_uk.numel() * 2 / bw * 1e6
    print(f"{label} M=1: floor {floor_us:.1f} us, einsum + launch {base:.1f}, default "
          f"{times.get(ABSORB_BLOCKS, float('nan')):.1f}, best {best} {times[best]:.1f}",
          flush=True)
    return [dict(shape=label, N=512, K=128, M=1, floor_us=floor_us, cublas_us=base,
                 default_us=times.get(ABSORB_BLOCKS), best_us=times[best], best=list(best),
                 all=[(list(k), v) for k, v in times.items()])]


if __name__ == "__main__":
    sys.exit(main())
