"""The merges and the cascade decode of a mixed step on one GPU: merge_splits at the shapes the
8B engine step launches (a late 128-token chunk's 8 prefix splits + its own part; the cascade
decode of 8 streams on a cached 128K document: the document's splits + each stream's own), with
merge_blocks' choice against the one-part-at-a-time blocking of session 10 (BLOCK_J 1, 32 rows
a program), each checked against the torch merge first; then the paged decode of that cascade's
document part under a few launch settings, with its achieved bandwidth.

    PYTHONPATH=<dir holding ringserve/> python3 benchmarks/bench_merge.py [--json FILE]

bf16 K/V and queries, head dim 128, 32 query / 8 KV heads, page 64. Times: triton.testing.do_bench
medians (us) after warm-up. The table is printed last.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from triton.testing import do_bench

from ringserve.kernels import merge_splits, split_parts
from ringserve.kernels.flash_decode import paged_decode_triton
from ringserve.kernels.merge import merge_blocks, merge_splits_triton


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def bench(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def merge_rows(dev, Hq=32, D=128, doc=131072, streams=8, own=512, page=64):
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)

    def chunk(S, NB):   # a chunk of S queries: NB prefix splits (bf16 flash outputs) + own
        return ((torch.randn(NB, S, Hq, D, device=dev, dtype=torch.bfloat16, generator=g),
                 torch.randn(NB, Hq, S, device=dev, generator=g) * 3),
                (torch.randn(S, Hq, D, device=dev, dtype=torch.bfloat16, generator=g),
                 torch.randn(Hq, S, device=dev, generator=g) * 3))

    cases = [("chunk 128 x 8 splits + own", *chunk(128, 8)),     # a late chunk
             ("chunk 640 x 4 splits + own", *chunk(640, 4))]     # an early chunk
    # the cascade: the document's paged-decode splits for 8 queries + 8 streams' own splits
    Hkv = 8
    npg = doc // page
    kc = torch.randn(npg + streams * (own // page), page, Hkv, D, device=dev, dtype=torch.bfloat16,
                     generator=g)
    vc = torch.randn_like(kc)
    q = torch.randn(1, streams, Hq, D, device=dev, dtype=torch.bfloat16, generator=g)
    table = torch.arange(npg, device=dev, dtype=torch.int32)[None]
    lens = torch.tensor([doc], device=dev, dtype=torch.int32)
    dpart = paged_decode_triton(q, kc, vc, table, lens, splits=True)
    qo = q.reshape(streams, 1, Hq, D)
    otab = (npg + torch.arange(streams * (own // page), device=dev, dtype=torch.int32)
            ).reshape(streams, -1)
    olens = torch.full((streams,), own, device=dev, dtype=torch.int32)
    opart = paged_decode_triton(qo, kc, vc, otab, olens, splits=True)
    dp, op = split_parts(*dpart), split_parts(*opart)
    cases.append((f"cascade {streams} streams: doc {dp[0].shape[0]} splits + own "
                  f"{op[0].shape[0]}", dp, op))
    for name, (po, pl), extra in cases:
        want, _ = merge_splits(po, pl, backend="torch", extra=extra)
        R = po.shape[1] * po.shape[2]
        parts = max(po.shape[0], extra[0].shape[0] if extra[0].dim() == 4 else 1)
        new = merge_blocks(parts, 128)
        old = (32, 1)
        row = {"case": name, "rows": R, "parts": parts}
        for tag, blocks in (("session 10 (32 rows, 1 part a load)", old), (f"now {new}", new)):
            got, _ = merge_splits_triton(po, pl, extra=extra, blocks=blocks)
            err = (got - want).abs().max().item()
            assert err < 1e-3, (name, tag, err)
            us = bench(lambda b=blocks, po=po, pl=pl, extra=extra:
                       merge_splits_triton(po, pl, extra=extra, blocks=b))
            nbytes = sum(t.numel() * t.element_size() for t in (po, pl, *extra)) + got.numel() * 4
            row[tag] = {"us": round(us, 2), "GB/s": round(nbytes / us / 1e3, 1), "max_err": err}
            log(f"{name}: {tag}: {us:.1f} us")
        rows.append(row)
    # the document's decode itself under a few launch settings
    dec = []
    doc_bytes = 2 * doc * Hkv * D * 2
    for splits, bn, st in ((None, None, None), (132, None, None), (264, None, None),
                           (None, 128, None), (None, None, 4), (132, 128, 3), (264, 32, 3)):
        fn = (lambda s=splits, b=bn, t=st: paged_decode_triton(q, kc, vc, table, lens, splits=True,
                                                               num_splits=s, block_n=b,
                                                               num_stages=t))
        us = bench(fn)
        d = {"num_splits": splits, "block_n": bn, "num_stages": st, "us": round(us, 2),
             "TB/s": round(doc_bytes / us / 1e6, 2)}
        dec.append(d)
        log(f"doc decode {d}")
    # block_n 64 (the default) against 128 at the decode shapes serving meets: batch 1 at 32K
    # and 128K (4 query rows a KV head), the cascade document for 8 and 16 streams
    shapes = []
    for n_tok, B, sq in ((32768, 1, 1), (131072, 1, 1), (131072, 1, 8), (131072, 1, 16)):
        npg = n_tok // page
        qq = torch.randn(B, sq, Hq, D, device=dev, dtype=torch.bfloat16, generator=g)
        tb = torch.arange(npg, device=dev, dtype=torch.int32)[None].expand(B, npg).contiguous()
        ln = torch.full((B,), n_tok, device=dev, dtype=torch.int32)
        ref, ref_l = paged_decode_triton(qq, kc, vc, tb, ln)
        row = {"tokens": n_tok, "batch": B, "queries": sq}
        for bn in (64, 128):
            o, lo = paged_decode_triton(qq, kc, vc, tb, ln, block_n=bn)
            err = (o.float() - ref.float()).abs().max().item()
            assert err < 2e-2 and (lo - ref_l).abs().max().item() < 1e-2, (row, bn, err)
            us = bench(lambda bn=bn, qq=qq, tb=tb, ln=ln: paged_decode_triton(
                qq, kc, vc, tb, ln, block_n=bn))
            row[f"block_n {bn} us"] = round(us, 2)
        shapes.append(row)
        log(f"decode {row}")
    return rows, dec, shapes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="")
    a = p.parse_args()
    dev = torch.device("cuda")
    rows, dec, shapes = merge_rows(dev)
    print(f"{'case':<48} {'parts':>5}  {'session 10 us':>13}  {'now us':>8}  {'GB/s now':>8}")
    for r in rows:
        o, n = [v for k, v in r.items() if isinstance(v, dict)]
        print(f"{r['case']:<48} {r['parts']:>5}  {o['us']:>13}  {n['us']:>8}  {n['GB/s']:>8}")
    print("doc decode (1 entry, 8 queries, 128K tokens, bf16): settings -> us, TB/s")
    for d in dec:
        print(f"  splits {d['num_splits']} block_n {d['block_n']} stages {d['num_stages']}: "
              f"{d['us']} us, {d['TB/s']} TB/s")
    print("paged decode (reduced, bf16): tokens, batch, queries -> us at block_n 64 / 128")
    for r in shapes:
        print(f"  {r['tokens']}, {r['batch']}, {r['queries']}: {r['block_n 64 us']} / "
              f"{r['block_n 128 us']}")
    if a.json:
        json.dump({"merge": rows, "doc_decode": dec, "decode_block_n": shapes,
                   "gpu": torch.cuda.get_device_name()},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
