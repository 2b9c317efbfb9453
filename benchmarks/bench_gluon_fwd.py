"""Forward attention on one Hopper GPU: the Gluon FA3-style kernel vs the production Triton
kernel vs cuDNN SDPA.

    PYTHONPATH=<dir holding ringserve/> python3 benchmarks/bench_gluon_fwd.py \
        [--json out.json] [--variants] [--autotune] [--sizes 16384,32768] [--striped]

bf16, head dim 128, B = 1, S = 16K / 32K, heads 32/32 and 32/8, causal and not. FLOPs
4*B*S*S*Hq*D, causal counted as half. cuDNN gets (B, H, S, D) contiguous tensors and
enable_gqa=True for GQA. Times: triton.testing.do_bench medians after warm-up. Before timing,
each row's outputs are checked against each other (max abs error, and each against a float32
SDPA-math reference on a 1024-query slice). The Triton kernel runs its autotuner's usual pick
(BLOCK_M 128, BLOCK_N 128, 8 warps, 3 stages; docs/benchmarks.md) unless --autotune.
--variants also times alternative constexpr configurations of the Gluon kernel (stages,
BLOCK_N, ping-pong). The table is printed last.

--striped instead times the masks the plain rows do not cover, Gluon against the Triton kernel
only (cuDNN's SDPA has neither strided positions nor windows): one step of a striped causal
ring (S = 32K a shard, stride 2: rank 1's queries against rank 0's keys, and rank 0's against
rank 1's, whose diagonal is excluded), a window of 4096 over 32K keys (causal and two-sided),
and a soft-cap of 50 (causal). FLOPs count the visible query x key pairs exactly (4 D Hq a
pair); err: max |out - fp32 ref| on the last 1024 queries.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import triton
from triton.testing import do_bench

from ringserve.kernels.flash_fwd import flash_attn_fwd
from ringserve.kernels.flash_fwd_gluon import (
    DEFAULT_CONFIG, GLUON_AVAILABLE, GLUON_UNAVAILABLE_REASON, flash_attn_fwd_gluon)
from ringserve.kernels.reference import positions, visible_mask

TRITON_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
# alternative Gluon configurations (--variants); BLOCK_N 176 (FA3's non-causal tile) is not
# expressible: Gluon tensors need power-of-two shapes
VARIANTS = {
    "pp": {"PINGPONG": True},
    "st3": {"STAGES": 3},
    "st3-pp": {"STAGES": 3, "PINGPONG": True},
    "bn64": {"BLOCK_N": 64, "STAGES": 3},
    "bn64-pp": {"BLOCK_N": 64, "STAGES": 4, "PINGPONG": True},
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cudnn_fn(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    gqa = q.shape[2] != k.shape[2]

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
    return lambda: run().transpose(1, 2)


def slice_ref(q, k, v, causal, n=1024):
    """float32 math reference for the last n queries (all keys), (1, n, Hq, D)."""
    S, Hq, Hkv = q.shape[1], q.shape[2], k.shape[2]
    qs = q[:, S - n:].float().transpose(1, 2)
    kk = k.float().transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    vv = v.float().transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    s = (qs @ kk.transpose(-1, -2)) * q.shape[3] ** -0.5
    if causal:
        qp = torch.arange(S - n, S, device=q.device)[:, None]
        s = s.masked_fill(torch.arange(S, device=q.device)[None, :] > qp, float("-inf"))
    return (torch.softmax(s, -1) @ vv).transpose(1, 2)


def time_fns(fns, res, flops, rep):
    """res[name] = TFLOP/s and res[name + "_ms"] (median of do_bench) for every fn whose
    output was checked (res[name + "_err_ref"] set); nan for one that failed."""
    for n, fn in fns.items():
        if n + "_err_ref" not in res:
            res[n] = float("nan")
            continue
        ms = do_bench(fn, warmup=50, rep=rep, return_mode="median")
        res[n] = flops / ms * 1e-9
        res[n + "_ms"] = ms


def make_fns(q, k, v, causal, tcfg, gl_variants):
    fns = {"cudnn": cudnn_fn(q, k, v, causal),
           "triton": lambda: flash_attn_fwd(q, k, v, None, causal, config=tcfg,
                                            impl="triton")[0]}
    for vn, cfg in gl_variants.items():
        fns[vn] = (lambda c=cfg: flash_attn_fwd_gluon(q, k, v, None, causal, config=c)[0])
    return fns


# --striped rows: name -> (S, causal, window, q_offset, q_stride, k_offset, k_stride, softcap)
MASK_ROWS = {
    "striped2 q1/k0": (32768, True, None, 1, 2, 0, 2, None),
    "striped2 q0/k1": (32768, True, None, 0, 2, 1, 2, None),
    "window4096 causal": (32768, True, 4096, 0, 1, 0, 1, None),
    "window4096 two-sided": (32768, False, 4096, 0, 1, 0, 1, None),
    "softcap50 causal": (32768, True, None, 0, 1, 0, 1, 50.0),
}


def visible_pairs(S, causal, window, qo, qs, ko, ks):
    """Exact number of visible (query, key) pairs for S queries and S keys."""
    qp = positions(S, qo, qs).double()
    hi = torch.full_like(qp, S - 1.0)
    lo = torch.zeros_like(qp)
    if causal:
        hi = torch.minimum(hi, torch.floor((qp - ko) / ks))
    elif window is not None:
        hi = torch.minimum(hi, torch.floor((qp + window - ko) / ks))
    if window is not None:
        lo = torch.maximum(lo, torch.ceil((qp - window - ko) / ks))
    return int((hi - lo + 1).clamp(min=0).sum().item())


def masked_slice_ref(q, k, v, causal, window, qo, qs, ko, ks, softcap, n=1024):
    """float32 math reference for the last n queries (all keys), (1, n, Hq, D); rows that see
    no key are 0."""
    S, Hq, Hkv = q.shape[1], q.shape[2], k.shape[2]
    qs_ = q[:, S - n:].float().transpose(1, 2)
    kk = k.float().transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    vv = v.float().transpose(1, 2).repeat_interleave(Hq // Hkv, 1)
    s = (qs_ @ kk.transpose(-1, -2)) * q.shape[3] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = visible_mask(positions(S, qo, qs, q.device)[S - n:],
                        positions(k.shape[1], ko, ks, q.device), causal, window)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vv).transpose(1, 2)


def make_mask_fns(q, k, v, row, tcfg):
    _, causal, window, qo, qs, ko, ks, cap = row
    return {"triton": lambda: flash_attn_fwd(q, k, v, None, causal, window, qo, qs, ko, ks,
                                             config=tcfg, softcap=cap, impl="triton")[0],
            "gluon": lambda: flash_attn_fwd_gluon(q, k, v, None, causal, qo, ko, q_stride=qs,
                                                  k_stride=ks, window_size=window,
                                                  softcap=cap)[0]}


def run_masks(args, tcfg):
    """--striped: Gluon vs the Triton kernel on strided / windowed / soft-capped blocks."""
    B, Hq, Hkv, D = 1, 32, 8, 128
    rows = []
    for name, (S, causal, window, qo, qs, ko, ks, cap) in MASK_ROWS.items():
        torch.manual_seed(S + qo + ks)
        q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        if cap:
            q = q * 8   # so that the cap bites
        pairs = visible_pairs(S, causal, window, qo, qs, ko, ks)
        flops = 4 * B * pairs * Hq * D
        res = {"case": name, "S": S, "heads": f"{Hq}/{Hkv}", "causal": causal,
               "window": window, "q": (qo, qs), "k": (ko, ks), "softcap": cap, "pairs": pairs}
        fns = make_mask_fns(q, k, v, MASK_ROWS[name], tcfg)
        outs = {}
        for n, fn in fns.items():
            try:
                t0 = time.time()
                outs[n] = fn()
                torch.cuda.synchronize()
                log(f"  {name} {n}: first call {time.time() - t0:.1f}s")
            except Exception as e:   # noqa: BLE001 - report, keep going
                log(f"  {name} {n} failed: {type(e).__name__}: {str(e)[:400]}")
        ref = masked_slice_ref(q, k, v, causal, window, qo, qs, ko, ks, cap)
        for n, o in outs.items():
            res[n + "_err_ref"] = (o[:, -ref.shape[1]:].float() - ref).abs().max().item()
        if len(outs) == 2:
            res["gluon_vs_triton"] = (outs["gluon"].float() - outs["triton"].float()
                                      ).abs().max().item()
        outs.clear()
        time_fns(fns, res, flops, args.rep)
        log(f"  {name}: triton={res['triton']:.0f} gluon={res['gluon']:.0f} TFLOP/s; errs vs "
            f"ref triton={res.get('triton_err_ref', float('nan')):.1e} "
            f"gluon={res.get('gluon_err_ref', float('nan')):.1e}")
        rows.append(res)
        del q, k, v, fns
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name()
    print(f"\n## {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; gluon default {DEFAULT_CONFIG[128]}; triton "
          f"{'autotuned' if tcfg is None else tcfg}")
    print("bf16, D=128, B=1, heads 32/8, S = 32K queries and keys; TFLOP/s over the visible "
          "pairs; err: max |out - fp32 ref| on the last 1024 queries")
    hdr = ["case", "q (off, stride)", "k (off, stride)", "window", "softcap", "pairs / S^2",
           "triton", "gluon", "gl/triton", "ms tr", "ms gl", "err gl", "err tr", "gl-vs-tr"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        cells = [r["case"], str(r["q"]), str(r["k"]), str(r["window"]), str(r["softcap"]),
                 f"{r['pairs'] / r['S'] ** 2:.3f}", f"{r['triton']:.0f}", f"{r['gluon']:.0f}",
                 f"{r['gluon'] / r['triton']:.2f}", f"{r.get('triton_ms', float('nan')):.2f}",
                 f"{r.get('gluon_ms', float('nan')):.2f}",
                 f"{r.get('gluon_err_ref', float('nan')):.1e}",
                 f"{r.get('triton_err_ref', float('nan')):.1e}",
                 f"{r.get('gluon_vs_triton', float('nan')):.1e}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "triton": triton.__version__,
                       "triton_config": tcfg, "gluon_default": DEFAULT_CONFIG[128],
                       "mode": "striped", "rows": rows}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--variants", action="store_true", help="also time Gluon kernel variants")
    ap.add_argument("--autotune", action="store_true", help="autotune the Triton kernel")
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    ap.add_argument("--striped", action="store_true",
                    help="time striped / windowed / soft-capped blocks instead (Gluon vs Triton)")
    args = ap.parse_args()
    if not GLUON_AVAILABLE:
        sys.exit(f"Gluon kernel unavailable: {GLUON_UNAVAILABLE_REASON}")
    name = torch.cuda.get_device_name()
    log(f"device {name}; torch {torch.__version__}; triton {triton.__version__}")
    gl_variants = {"gluon": {}}
    if args.variants:
        gl_variants.update(VARIANTS)
    tcfg = None if args.autotune else TRITON_CONFIG
    if args.striped:
        run_masks(args, tcfg)
        return
    B, Hq, D = 1, 32, 128
    rows = []
    for S in (int(s) for s in args.sizes.split(",")):
        for Hkv in (32, 8):
            for causal in (False, True):
                torch.manual_seed(S + Hkv + causal)
                q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
                v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
                flops = 4 * B * S * S * Hq * D * (0.5 if causal else 1.0)
                res = {"S": S, "heads": f"{Hq}/{Hkv}", "causal": causal}
                fns = make_fns(q, k, v, causal, tcfg, gl_variants)
                outs = {}
                for n, fn in fns.items():
                    try:
                        t0 = time.time()
                        outs[n] = fn()
                        torch.cuda.synchronize()
                        log(f"  S={S} {Hq}/{Hkv} causal={causal} {n}: first call "
                            f"{time.time() - t0:.1f}s")
                    except Exception as e:   # noqa: BLE001 - report, keep going
                        log(f"  {n} failed: {type(e).__name__}: {str(e)[:400]}")
                ref = slice_ref(q, k, v, causal)
                for n, o in outs.items():
                    res[n + "_err_ref"] = (o[:, -ref.shape[1]:].float() - ref).abs().max().item()
                    for m in ("cudnn", "triton"):
                        if m in outs and m != n:
                            res[f"{n}_vs_{m}"] = (o.float() - outs[m].float()).abs().max().item()
                outs.clear()
                time_fns(fns, res, flops, args.rep)
                log("  " + " ".join(f"{n}={res[n]:.0f}" for n in fns) + " TFLOP/s; errs vs ref "
                    + " ".join(f"{n}={res.get(n + '_err_ref', float('nan')):.1e}" for n in fns))
                rows.append(res)
                del q, k, v, fns
                torch.cuda.empty_cache()

    print(f"\n## {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; gluon default {DEFAULT_CONFIG[128]}; triton "
          f"{'autotuned' if tcfg is None else tcfg}")
    print("bf16, D=128, B=1, TFLOP/s (causal counted as half); err: max |out - fp32 ref| on the "
          "last 1024 queries")
    extra = [n for n in gl_variants if n != "gluon"]
    hdr = (["S", "heads", "causal", "cuDNN", "triton", "gluon", "gl/cuDNN", "gl/triton"] + extra
           + ["err gl", "err tr", "err cudnn", "gl-vs-cudnn"])
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        cells = [f"{r['S'] // 1024}K", r["heads"], "yes" if r["causal"] else "no",
                 f"{r['cudnn']:.0f}", f"{r['triton']:.0f}", f"{r['gluon']:.0f}",
                 f"{r['gluon'] / r['cudnn']:.2f}", f"{r['gluon'] / r['triton']:.2f}"]
        cells += [f"{r[n]:.0f}" for n in extra]
        cells += [f"{r.get(n + '_err_ref', float('nan')):.1e}"
                  for n in ("gluon", "triton", "cudnn")]
        cells.append(f"{r.get('gluon_vs_cudnn', float('nan')):.1e}")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "triton": triton.__version__,
                       "triton_config": tcfg, "gluon_default": DEFAULT_CONFIG[128],
                       "variants": gl_variants, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
