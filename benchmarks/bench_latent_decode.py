"""MLA's absorbed decode on the GPU: the latent kernel against the general wide kernel.

DeepSeek-V2-Lite's shape: 16 query heads on one 576-wide latent head (values = the keys' first
512 columns, one cache tensor), batch 1, one query token, page 64, a shuffled block table. For
each cached length: the general kernel (`latent=False`, the 576-wide row padded to a 1024-wide
tile, 16 keys a tile), then the latent kernel with its default launch and a few split counts /
key tiles, all as CUDA-graph replays (`triton.testing.do_bench_cudagraph`, median), against
the time to read the latent once at the measured copy bandwidth. Outputs are checked against
the general kernel.

  python3 benchmarks/bench_latent_decode.py --lengths 8192,32768,131072 [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch


def copy_bandwidth(dev) -> float:
    """Device-to-device copy, bytes read + written per second (bench_e2e's floor measure)."""
    import triton.testing as tt
    n = 2 ** 28
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * n / (tt.do_bench(lambda: b.copy_(a), rep=200) * 1e-3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import triton.testing as tt
    from ringserve.kernels.flash_decode import paged_decode_triton

    dev, dt, page, D = "cuda", torch.bfloat16, 64, 576
    bw = copy_bandwidth(dev)
    rows = []
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
                out, _ = fn()
                err = (out.float() - ref.float()).abs().max().item()
                us = tt.do_bench_cudagraph(fn, rep=100) * 1e3
            except Exception as e:  # noqa: BLE001 - a launch that does not fit: report it
                rows.append(dict(tokens=L, variant=name, error=f"{type(e).__name__}: {e}"[:200]))
                print(f"{L:>8} | {name:<28} | failed: {rows[-1]['error']}", flush=True)
                continue
            rows.append(dict(tokens=L, variant=name, us=us, floor_us=floor_us,
                             x_floor=us / floor_us, max_abs_diff=err))
            print(f"{L:>8} | {name:<28} | {us:8.2f} us | floor {floor_us:6.2f} us | "
                  f"{us / floor_us:5.2f}x | diff {err:.2e}", flush=True)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bw": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
