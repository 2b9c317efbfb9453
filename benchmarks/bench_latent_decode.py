"""MLA's absorbed decode on the GPU: the latent kernel against the general wide kernel.

DeepSeek-V2-Lite's shape: 16 query heads on one 576-wide latent head (values = the keys' first
512 columns, one cache tensor), batch 1, one query token, page 64, a shuffled block table. For
each cached length: the general kernel (`latent=False`, the 576-wide row padded to a 1024-wide
tile, 16 keys a tile), then the latent kernel with its default launch and a few split counts /
key tiles, all as CUDA-graph replays (`triton.testing.do_bench_cudagraph`, median), against
the time to read the latent once at the measured copy bandwidth. Outputs are checked against
the general kernel.

  python3 benchmarks/bench_latent_decode.py --lengths 8192,32768,131072 [--sweep] [--json out.json]
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json

import torch


SPLIT_SWEEP = dict(block_n=(16, 32, 64), splits=(66, 132, 264, 528), warps=(4, 8),
                   stages=(2, 3, 4))
REDUCE_SWEEP = dict(block_d=(32, 64, 128), block_s=(16, 32, 64, 128), warps=(2, 4, 8))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--sweep", action="store_true",
                   help="also the split kernel's launches (SPLIT_SWEEP, alone: splits=True) "
                        "and the reduce's tiles (REDUCE_SWEEP) apart, and their best sum")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import triton.testing as tt

    from bench_moe_gemv import copy_bandwidth    # beside this file
    from ringserve.kernels.flash_decode import _reduce, paged_decode_triton

    dev, dt, page, D = "cuda", torch.bfloat16, 64, 576
    bw = copy_bandwidth(dev)
    rows, best_rows = [], []
    red_cache = {}     # splits -> {reduce blocks: us}: the reduce's cost is the split count's

    def bench(fn, ref=None):
        out = fn()
        err = None if ref is None else (out[0].float() - ref.float()).abs().max().item()
        return tt.do_bench_cudagraph(fn, rep=60) * 1e3, err

    for L in [int(x) for x in args.lengths.split(",")]:
        g = torch.Generator(device=dev).manual_seed(L)
        pages = -(-L // page)
        kc = (torch.randn(pages + 8, page, 1, D, device=dev, generator=g) * 0.5).to(dt)
        q = (torch.randn(1, 1, args.heads, D, device=dev, generator=g) * 0.5).to(dt)
        bt = torch.randperm(pages + 8, device=dev, generator=g)[:pages].view(1, pages).int()
        sl = torch.tensor([L], device=dev, dtype=torch.int32)
        floor_us = L * D * 2 / bw * 1e6
        ref, _ = paged_decode_triton(q, kc, kc, bt, sl, 0.07, latent=False)
        variants = [("general", dict(latent=False))] + [("latent default", {})] + [
            (f"latent splits {s} block_n {bn}", dict(num_splits=s, block_n=bn))
            for bn in (32, 64) for s in (16, 32, 64, 128, 256) if s * bn <= L]
        for name, kw in variants:
            def fn(kw=kw, q=q, kc=kc, bt=bt, sl=sl):
                return paged_decode_triton(q, kc, kc, bt, sl, 0.07, **kw)
            try:
                us, err = bench(fn, ref)
            except Exception as e:  # noqa: BLE001 - a launch that does not fit: report it
                rows.append(dict(tokens=L, variant=name, error=f"{type(e).__name__}: {e}"[:200]))
                print(f"{L:>8} | {name:<28} | failed: {rows[-1]['error']}", flush=True)
                continue
            rows.append(dict(tokens=L, variant=name, us=us, floor_us=floor_us,
                             x_floor=us / floor_us, max_abs_diff=err))
            print(f"{L:>8} | {name:<28} | {us:8.2f} us | floor {floor_us:6.2f} us | "
                  f"{us / floor_us:5.2f}x | diff {err:.2e}", flush=True)
        if not args.sweep:
            continue
        split_t = {}
        for bn, ns, w, st in itertools.product(*SPLIT_SWEEP.values()):
            if ns * bn > 2 * L:
                continue
            fn = functools.partial(paged_decode_triton, q, kc, kc, bt, sl, 0.07, splits=True,
                                   num_splits=ns, block_n=bn, num_warps=w, num_stages=st)
            try:
                o_p, l_p = fn()
                us = tt.do_bench_cudagraph(fn, rep=60) * 1e3
                out, _ = _reduce(o_p, l_p, dt)
                err = (out.float() - ref.float()).abs().max().item()
                assert err < 5e-2, err
            except Exception as e:  # noqa: BLE001 - shared memory, registers: skip it
                print(f"  split {bn, ns, w, st}: {type(e).__name__}", flush=True)
                continue
            split_t[(bn, ns, w, st)] = (us, o_p.shape[3])
        for key, (_, nb) in split_t.items():
            if nb not in red_cache:
                o_p, l_p = paged_decode_triton(q, kc, kc, bt, sl, 0.07, splits=True,
                                               num_splits=key[1], block_n=key[0])
                red = {}
                for blocks in itertools.product(*REDUCE_SWEEP.values()):
                    try:
                        red[blocks] = tt.do_bench_cudagraph(
                            lambda b=blocks, o=o_p, lp=l_p: _reduce(o, lp, dt, b), rep=60) * 1e3
                    except Exception as e:  # noqa: BLE001
                        print(f"  reduce {blocks}: {type(e).__name__}", flush=True)
                red_cache[nb] = red
        total = {k: us + min(red_cache[nb].values()) for k, (us, nb) in split_t.items()}
        top = sorted(total, key=total.get)[:6]
        for k in top:
            nb = split_t[k][1]
            rb = min(red_cache[nb], key=red_cache[nb].get)
            best_rows.append(dict(tokens=L, split=list(k), splits_used=nb, split_us=split_t[k][0],
                                  reduce=list(rb), reduce_us=red_cache[nb][rb], total_us=total[k],
                                  x_floor=total[k] / floor_us))
            print(f"{L:>8} | best split (block_n, splits, warps, stages) {k} ({nb} used) "
                  f"{split_t[k][0]:6.2f} us + reduce {rb} {red_cache[nb][rb]:5.2f} us = "
                  f"{total[k]:6.2f} us ({total[k] / floor_us:4.2f}x)", flush=True)
        rows.append(dict(tokens=L, sweep=[(list(k), v[0], v[1]) for k, v in split_t.items()]))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    for nb, red in sorted(red_cache.items()):
        rb = sorted(red, key=red.get)[:3]
        print(f"reduce of {nb} splits: best {[(b, round(red[b], 2)) for b in rb]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bw": bw, "rows": rows, "best": best_rows,
                       "reduce": {str(nb): [(list(b), v) for b, v in red.items()]
                                  for nb, red in red_cache.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
