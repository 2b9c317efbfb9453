"""The few-token MoE layer (`kernels.grouped_gemm.moe_gemv`): its two launches' tiles swept on
the GPU for the family presets' expert shapes, against the bytes they must read.

For each shape (hidden H, expert width I, E experts, top-k) and T tokens: the routed experts'
weights read once per distinct expert (3 * H * I * 2 bytes each in bf16) at the device's copy
bandwidth is the floor; each tile choice is timed with CUDA graphs (`do_bench_cudagraph`,
median), checked against the default's output, and the best per shape is printed last with
the grouped path (`MoE._grouped`'s GEMMs: `grouped_gemm`) for comparison.

  python3 benchmarks/bench_moe_gemv.py                      # GPU
  python3 benchmarks/bench_moe_gemv.py --json out.json
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys

import torch

SHAPES = {   # name: (H, I, E, top_k)
    "qwen3-moe-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "mixtral-8x7b": (4096, 14336, 8, 2),
}


def copy_bandwidth(dev: torch.device) -> float:
    """The device's copy rate in bytes/s, counting bytes read and written (the decode floors'
    rate: bench_gemv.py and bench_decode_splits.py take it from here)."""
    from triton.testing import do_bench_cudagraph
    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = do_bench_cudagraph(functools.partial(dst.copy_, src), rep=50)
    return 2 * src.numel() / (t * 1e-3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="1,4")
    p.add_argument("--shapes", default="qwen3-moe-30b-a3b,deepseek-v2-lite",
                   help=f"of {', '.join(SHAPES)}")
    p.add_argument("--json", default=None)
    p.add_argument("--stages", default="2,3,4",
                   help="software-pipelining stages of each launch's K loop tried on its four "
                        "best tiles ('' for none)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_moe_gemv needs a CUDA device")
    from triton.testing import do_bench_cudagraph

    from ringserve.kernels.grouped_gemm import moe_gemv, moe_gemv_blocks

    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read+write)", flush=True)
    # gate/up: (BLOCK_N, BLOCK_K, num_warps, LAZY); down: (BLOCK_N, BLOCK_K, num_warps), its
    # tile holding all top-k experts' rows: at most 8 x 1024 floats of products
    gate_up_cfgs = list(itertools.product((4, 8, 16), (128, 256, 512), (4, 8), (False, True)))
    down_all = list(itertools.product((1, 2, 4, 8), (64, 128, 256), (2, 4, 8)))
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for name in a.shapes.split(","):
        H, inter, E, k = SHAPES[name]
        gu = torch.randn(E, 2 * inter, H, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        dn = torch.randn(E, H, inter, device=dev, dtype=torch.bfloat16, generator=g) * 0.02
        for T in (int(s) for s in a.tokens.split(",")):
            if T * k > 32:
                continue
            x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)
            idx = torch.stack([torch.randperm(E, device=dev, generator=g)[:k]
                               for _ in range(T)]).to(torch.int32)
            wt = torch.softmax(torch.randn(T, k, device=dev, generator=g), -1)
            experts = int(torch.unique(idx).numel())
            floor_us = experts * 3 * H * inter * 2 / bw * 1e6
            layer = functools.partial(moe_gemv, x, gu, dn, idx, wt)

            def us(blocks=None, rep=20, layer=layer):
                return do_bench_cudagraph(functools.partial(layer, blocks=blocks), rep=rep) * 1e3

            ref = layer()
            base = us(rep=40)
            default = moe_gemv_blocks(H, inter, T * k)
            best_gu = default[:3] + default[6:7]
            best_dn = default[3:6]
            kp = 1 << (k - 1).bit_length()
            down_cfgs = [c for c in down_all if kp * c[0] * c[1] <= 8192]
            # the two launches are independent in their tiles: sweep one with the other fixed
            times = {}
            for c in gate_up_cfgs:
                blocks = tuple(c[:3]) + tuple(best_dn) + (c[3],)
                try:
                    assert torch.allclose(layer(blocks=blocks), ref, atol=2e-2, rtol=2e-2)
                    times[("gu",) + c] = us(blocks)
                except Exception as e:   # a tile the compiler refuses (shared memory): skipped
                    print(f"  {name} T={T} gate/up {c}: {type(e).__name__}", flush=True)
            best_gu = min((v, kk[1:]) for kk, v in times.items() if kk[0] == "gu")[1]
            for c in down_cfgs:
                blocks = tuple(best_gu[:3]) + tuple(c) + tuple(best_gu[3:])
                try:
                    assert torch.allclose(layer(blocks=blocks), ref, atol=2e-2, rtol=2e-2)
                    times[("dn",) + c] = us(blocks)
                except Exception as e:
                    print(f"  {name} T={T} down {c}: {type(e).__name__}", flush=True)
            best_dn = min((v, kk[1:]) for kk, v in times.items() if kk[0] == "dn")[1]
            # the K loops pipelined (kernels' STAGES): each launch's four best tiles again
            ss = [int(v) for v in a.stages.split(",") if v.strip() and int(v) > 1]
            st = {"gu": 1, "dn": 1}
            for part in ("gu", "dn"):
                top = sorted((kk for kk in times if kk[0] == part and len(kk) < 6),
                             key=times.get)[:4]
                for kk, s_ in itertools.product(top, ss):
                    c = kk[1:]
                    if part == "gu":
                        blocks = tuple(c[:3]) + tuple(best_dn) + (c[3], s_, 1)
                    else:
                        blocks = tuple(best_gu[:3]) + tuple(c) + (best_gu[3], st["gu"], s_)
                    try:
                        assert torch.allclose(layer(blocks=blocks), ref, atol=2e-2, rtol=2e-2)
                        times[kk + (s_,)] = us(blocks)
                    except Exception as e:
                        print(f"  {name} T={T} {part} {c} stages {s_}: {type(e).__name__}",
                              flush=True)
                v, kk = min((v, kk) for kk, v in times.items() if kk[0] == part)
                if part == "gu":
                    best_gu = kk[1:5]
                else:
                    best_dn = kk[1:4]
                st[part] = kk[5] if part == "gu" and len(kk) > 5 else \
                    (kk[4] if part == "dn" and len(kk) > 4 else 1)
            best = tuple(best_gu[:3]) + tuple(best_dn) + (best_gu[3], st["gu"], st["dn"])
            tb = us(best, rep=40)
            top = sorted(times.items(), key=lambda kv: kv[1])[:6]
            row = dict(shape=name, T=T, experts=experts, floor_us=floor_us, default_us=base,
                       best_us=tb, best=best, top=[(list(kk), v) for kk, v in top],
                       all=[(list(kk), v) for kk, v in times.items()])
            rows.append(row)
            print(f"{name} T={T}: floor {floor_us:.1f} us, default {default} {base:.1f} "
                  f"us, best {best} {tb:.1f} us; top {[(kk, round(v, 1)) for kk, v in top]}",
                  flush=True)
    print(f"\n{'shape':>18} | {'T':>2} | {'floor us':>8} | {'default us':>10} | {'x floor':>7} | "
          f"{'best us':>7} | {'x floor':>7} | best blocks (gate/up, down, lazy, stages)")
    for r in rows:
        print(f"{r['shape']:>18} | {r['T']:>2} | {r['floor_us']:>8.1f} | {r['default_us']:>10.1f}"
              f" | {r['default_us'] / r['floor_us']:>7.2f} | {r['best_us']:>7.1f} | "
              f"{r['best_us'] / r['floor_us']:>7.2f} | {r['best']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"copy_bw": bw, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
