"""Kernel benchmark on one GPU: our Triton forward vs torch SDPA (flash and cuDNN backends), and
the paged decode kernel's achieved bandwidth vs the card's copy bandwidth.

    PYTHONPATH=<dir holding ringserve/> python3 benchmarks/bench_kernels.py [--variants] [--fwd-variants] [--quick]

bf16, head dim 128, B = 1, S = 16K/32K/64K tokens, causal and not, MHA 32/32 and GQA 32/8.
Causal FLOPs are counted as half of 4*B*S*S*Hq*D. SDPA gets (B, H, S, D) contiguous tensors and
enable_gqa=True for GQA (if a backend refuses it, K/V repeated to 32 heads; the table says which).
Times are triton.testing.do_bench medians after warm-up; every kernel's output is checked
against SDPA once before timing. The table is printed last.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from ringserve.kernels.flash_decode import paged_decode_triton
from ringserve.kernels.flash_fwd import flash_attn_fwd


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def copy_bandwidth(nbytes=2 << 30):
    """Device-to-device copy, bytes read + written per second."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def sdpa_fn(q, k, v, causal, backend):
    """q (B, S, H, D) -> SDPA on contiguous (B, H, S, D) copies. Returns (fn, how)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]

    def run(kk, vv, enable_gqa):
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(qt, kk, vv, is_causal=causal, enable_gqa=enable_gqa)
    if gqa:
        try:
            run(kt, vt, True)
            torch.cuda.synchronize()
            return (lambda: run(kt, vt, True)), "enable_gqa"
        except Exception as e:   # noqa: BLE001 - report and fall back
            log(f"  {backend}: enable_gqa refused ({type(e).__name__}); repeating K/V")
            rep = q.shape[2] // k.shape[2]
            kr, vr = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
            return (lambda: run(kr, vr, False)), "repeat_kv"
    return (lambda: run(kt, vt, False)), "-"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_forward(sizes, variants, args):
    rows = []
    B, Hq, D = 1, 32, 128
    for S in sizes:
        for Hkv in (32, 8):
            for causal in (False, True):
                torch.manual_seed(S + Hkv + causal)
                q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
                flops = 4 * B * S * S * Hq * D * (0.5 if causal else 1.0)
                res = {"S": S, "heads": f"{Hq}/{Hkv}", "causal": causal}
                ref = None
                for be in ("cudnn", "flash"):
                    try:
                        fn, how = sdpa_fn(q, k, v, causal, be)
                        o = fn()
                        if ref is None:
                            ref = o.transpose(1, 2)
                        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                        res[be] = flops / ms * 1e-9
                        res[be + "_how"] = how
                    except Exception as e:   # noqa: BLE001
                        log(f"  sdpa {be} failed: {type(e).__name__}: {e}")
                        res[be] = float("nan")
                for name, kw in variants.items():
                    try:
                        t0 = time.time()
                        fn = lambda: flash_attn_fwd(q, k, v, None, causal, **kw)  # noqa: E731
                        out, _ = fn()
                        torch.cuda.synchronize()
                        err = rel_err(out, ref) if ref is not None else float("nan")
                        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                        res[name] = flops / ms * 1e-9
                        res[name + "_err"] = err
                        log(f"  S={S} {Hq}/{Hkv} causal={causal} {name}: {res[name]:.0f} TFLOP/s "
                            f"err {err:.2e} (first call incl. tuning {time.time() - t0:.1f}s)")
                        if err > 2e-2:
                            log(f"  !! {name} disagrees with SDPA: rel err {err:.3g}")
                    except Exception as e:   # noqa: BLE001
                        log(f"  ours {name} failed: {type(e).__name__}: {str(e)[:300]}")
                        res[name] = float("nan")
                rows.append(res)
                del q, k, v, ref
                torch.cuda.empty_cache()
    return rows


def bench_decode(token_counts, copy_bw, variants):
    rows = []
    B, Sq, Hq, Hkv, D, page = 1, 1, 32, 8, 128, 64
    for n in token_counts:
        torch.manual_seed(n)
        pages = n // page + 1
        kc = torch.randn(pages, page, Hkv, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        bt = torch.randperm(pages, device="cuda", dtype=torch.int64).to(torch.int32)[None]
        sl = torch.tensor([n], device="cuda", dtype=torch.int32)
        q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=torch.bfloat16)
        nbytes = 2 * n * Hkv * D * kc.element_size()
        # check against SDPA on the gathered cache (cuDNN/flash/any backend)
        idx = bt[0, : -(-n // page)].long()
        kk = kc[idx].reshape(-1, Hkv, D)[:n][None]
        vv = vc[idx].reshape(-1, Hkv, D)[:n][None]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), enable_gqa=True
        ).transpose(1, 2)
        del kk, vv
        res = {"tokens": n, "GB": nbytes / 1e9}
        for name, kw in variants.items():
            fn = lambda: paged_decode_triton(q, kc, vc, bt, sl, **kw)  # noqa: E731
            out, _ = fn()
            err = rel_err(out, ref)
            if err > 2e-2:
                log(f"  !! decode {name} disagrees with SDPA: rel err {err:.3g}")
            # graph replay: what a serving loop sees once launch overhead (two small kernels
            # and their Python launches) is out of the way
            ms = do_bench_cudagraph(fn, rep=100, return_mode="median")
            res[name] = nbytes / (ms * 1e-3)
            res[name + "_us"] = ms * 1e3
            if name == "ours":
                ms_e = do_bench(fn, warmup=25, rep=100, return_mode="median")
                res["eager"] = nbytes / (ms_e * 1e-3)
                res["eager_us"] = ms_e * 1e3
            log(f"  decode {n} tokens {name}: {res[name] / 1e12:.2f} TB/s "
                f"({100 * res[name] / copy_bw:.0f}% of copy) {ms * 1e3:.1f} us (graph), err {err:.2e}")
        rows.append(res)
        del kc, vc
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", action="store_true", help="also time decode launch variants")
    ap.add_argument("--fwd-variants", action="store_true",
                    help="also time the Triton forward's pointer-load and warp-specialized "
                         "variants")
    ap.add_argument("--quick", action="store_true", help="32K forward and 128K/1M decode only")
    ap.add_argument("--no-decode", action="store_true", help="the forward table only")
    ap.add_argument("--sizes", default="", help="forward sequence lengths (default "
                    "16384,32768,65536)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name()
    log(f"device {name}; torch {torch.__version__}; triton {triton.__version__}")
    copy_bw = copy_bandwidth()
    log(f"copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s")

    # "ours" is flash_attn_fwd's default: on an H100 / H200 the Gluon kernel for these
    # one-sequence problems (kernels/flash_fwd_gluon.py); "triton" the Triton kernel beside it
    fwd_variants = {"ours": {}, "triton": {"impl": "triton"}}
    if args.fwd_variants:
        fwd_variants.update({"ptr": {"use_tma": False}, "ws": {"warp_specialize": True}})
    sizes = ([int(x) for x in args.sizes.split(",")] if args.sizes else [32768] if args.quick
             else [16384, 32768, 65536])
    fwd = bench_forward(sizes, fwd_variants, args)

    from ringserve.kernels import flash_fwd as ff
    for ws, tuner in ff._tuned.items():
        for key, cfg in tuner.cache.items():
            log(f"  autotuned (warp_specialize={ws}) {key[:8]}: {cfg}")
    dec_variants = {"ours": {}}
    if args.variants:
        dec_variants.update({
            "bn128": {"block_n": 128},
            "st4": {"num_stages": 4},
            "bn128-split2x": {"block_n": 128, "num_splits": torch.cuda.get_device_properties(0).multi_processor_count},
            "split2x": {"num_splits": 8 * torch.cuda.get_device_properties(0).multi_processor_count // 8},
        })
    counts = ([] if args.no_decode else [131072, 1048576] if args.quick
              else [32768, 131072, 524288, 1048576])
    dec = bench_decode(counts, copy_bw, dec_variants)

    print(f"\n## {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s")
    print("\nForward, bf16, D=128, B=1, TFLOP/s (causal counted as half the FLOPs)")
    extra = [k for k in fwd_variants if k != "ours"]
    hdr = ["S", "heads", "causal", "cuDNN", "flash", "ours", "ours/cuDNN", "ours/flash"] + extra
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in fwd:
        gq = "" if r.get("cudnn_how", "-") == "-" else f" ({r['cudnn_how']})"
        gf = "" if r.get("flash_how", "-") == "-" else f" ({r['flash_how']})"
        cells = [f"{r['S'] // 1024}K", r["heads"], "yes" if r["causal"] else "no",
                 f"{r['cudnn']:.0f}{gq}", f"{r['flash']:.0f}{gf}", f"{r['ours']:.0f}",
                 f"{r['ours'] / r['cudnn']:.2f}", f"{r['ours'] / r['flash']:.2f}"]
        cells += [f"{r.get(k, float('nan')):.0f}" for k in extra]
        print("| " + " | ".join(cells) + " |")
    print("\nPaged decode, bf16, B=1, Sq=1, 32 q heads / 8 kv heads, D=128, page 64, shuffled pages")
    dextra = [k for k in dec_variants if k != "ours"]
    hdr = (["cached tokens", "KV GB", "graph us", "TB/s", "% of copy", "eager us",
            "eager % of copy"] + [f"{k} % (graph)" for k in dextra])
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in dec:
        cells = [f"{r['tokens'] // 1024}K", f"{r['GB']:.2f}", f"{r['ours_us']:.1f}",
                 f"{r['ours'] / 1e12:.2f}", f"{100 * r['ours'] / copy_bw:.0f}",
                 f"{r['eager_us']:.1f}", f"{100 * r['eager'] / copy_bw:.0f}"]
        cells += [f"{100 * r[k] / copy_bw:.0f}" for k in dextra]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
