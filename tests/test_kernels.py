"""Attention kernels (Triton under TRITON_INTERPRET=1 on CPU, and the torch path) vs reference.py.

fp32 and fp16 only: the interpreter gets bf16 dots wrong (bf16 runs in test_kernels_gpu.py).
Sizes stay small because the interpreter runs every program in Python.
"""
from __future__ import annotations

import math
import zlib
import os

import pytest
import torch
import triton

from ringserve.kernels import attention, merge_, paged_decode
from ringserve.kernels.reference import attention_ref, merge_ref, paged_decode_ref

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton on CPU needs TRITON_INTERPRET=1 (set by `bash dev test`)")

BACKENDS = ["triton", "torch"]


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


def check_close(out, lse, ref_out, ref_lse, dtype, lowp_out=None):
    """fp32: ~1e-5 relative. Low precision: at most 2x the error of a plain torch computation in
    the same dtype (both against float64), plus a tiny absolute floor."""
    ref_out = ref_out.double()
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), "fully masked rows differ"
    assert torch.all(lse[~fin] == float("-inf"))
    assert torch.isfinite(out).all()
    masked_rows = ~fin.transpose(1, 2)   # (B, S, H)
    if masked_rows.any():
        assert torch.all(out[masked_rows] == 0), "fully masked rows must give out = 0"
    err = (out.double() - ref_out).abs().max().item()
    lse_err = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
    if dtype == torch.float32:
        rel = ((out.double() - ref_out).norm() / ref_out.norm().clamp_min(1e-30)).item()
        assert rel < 1e-5, f"relative error {rel:.3g}"
        lse_mag = ref_lse[fin].abs().max().item() if fin.any() else 1.0
        assert lse_err < 1e-5 * max(1.0, lse_mag), lse_err
    else:
        base = (lowp_out.double() - ref_out).abs().max().item()
        assert err <= 2 * base + 1e-4, f"max error {err:.3g} vs torch {dtype} {base:.3g}"
        assert lse_err < 1e-2, lse_err


def qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (rand(B, Sq, Hq, D, dtype=dtype, gen=g), rand(B, Sk, Hkv, D, dtype=dtype, gen=g),
            rand(B, Sk, Hkv, D, dtype=dtype, gen=g))


# (B, Sq, Sk, Hq, Hkv, D, causal, window, q_offset, q_stride, k_offset, k_stride, dtype)
CASES = {
    "plain-gqa": (1, 77, 211, 4, 2, 32, False, None, 0, 1, 0, 1, torch.float32),
    "causal-mqa-tail": (1, 77, 211, 4, 1, 32, True, None, 134, 1, 0, 1, torch.float32),
    "striped-causal-window": (2, 77, 211, 2, 1, 16, True, 40, 1, 3, 2, 3, torch.float32),
    "window-masked-rows": (1, 77, 211, 2, 2, 16, False, 100, 300, 1, 0, 1, torch.float32),
    "causal-long-window": (1, 77, 211, 2, 1, 16, True, 100, 134, 1, 0, 1, torch.float32),
    "two-sided-long-window": (1, 77, 211, 2, 1, 16, False, 90, 60, 1, 0, 1, torch.float32),
    "fp16-causal-gqa": (1, 77, 211, 4, 2, 64, True, None, 134, 1, 0, 1, torch.float16),
    "fp16-strided-window": (1, 77, 211, 2, 1, 32, False, 25, 5, 2, 0, 1, torch.float16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_reference(case, backend):
    B, Sq, Sk, Hq, Hkv, D, causal, window, qo, qs, ko, ks, dtype = CASES[case]
    q, k, v = qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed=zlib.crc32(case.encode()) % 10_000)
    out, lse = attention(q, k, v, None, causal, window, qo, qs, ko, ks, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq)
    ref_out, ref_lse = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks)
    lowp = None
    if dtype != torch.float32:
        lowp, _ = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks, dtype=dtype)
    check_close(out, lse, ref_out, ref_lse, dtype, lowp)


def test_attention_random_positions_sweep():
    """Random affine positions, masks and sizes: the per-block loop bounds must be exact."""
    g = torch.Generator().manual_seed(1234)
    for _ in range(30):
        r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
        Sq, Sk = r(1, 70), r(1, 90)
        causal = bool(r(0, 1))
        window = None if r(0, 2) == 0 else r(0, 200)
        qo, qs, ko, ks = r(0, 120), r(1, 4), r(0, 120), r(1, 4)
        q, k, v = (rand(1, Sq, 2, 16, gen=g), rand(1, Sk, 1, 16, gen=g), rand(1, Sk, 1, 16, gen=g))
        out, lse = attention(q, k, v, 0.3, causal, window, qo, qs, ko, ks, backend="triton")
        ref_out, ref_lse = attention_ref(q, k, v, 0.3, causal, window, qo, qs, ko, ks)
        check_close(out, lse, ref_out, ref_lse, torch.float32)


def test_attention_strided_inputs_and_head_dim_padding():
    """Views with odd strides (packed qkv, a (B, H, S, D) buffer permuted) and D=24 (padded)."""
    g = torch.Generator().manual_seed(7)
    B, S, H, D = 2, 45, 2, 24
    packed = rand(B, S, 3, H, D, gen=g)
    q = packed[:, :, 0]
    k = rand(B, H, S, D, gen=g).permute(0, 2, 1, 3)
    v = packed[:, :, 2]
    assert not q.is_contiguous() and not k.is_contiguous()
    out, lse = attention(q, k, v, None, True, None, backend="triton")
    ref_out, ref_lse = attention_ref(q, k, v, None, True)
    check_close(out, lse, ref_out, ref_lse, torch.float32)


def test_attention_tma_descriptor_path():
    """The tensor-descriptor (Hopper copy engine) load path, run by the interpreter."""
    from ringserve.kernels.flash_fwd import flash_attn_fwd
    q, k, v = qkv(2, 50, 90, 4, 2, 32, torch.float32, seed=11)
    for causal, window in ((True, 20), (False, None)):
        out, lse = flash_attn_fwd(q, k, v, None, causal, window, 40, 1, 0, 1, use_tma=True)
        ref_out, ref_lse = attention_ref(q, k, v, None, causal, window, 40, 1, 0, 1)
        check_close(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D,Dv,dtype", [(48, 32, torch.float32), (24, 16, torch.float16),
                                        (32, 8, torch.float32)])
def test_attention_values_narrower_than_keys(backend, D, Dv, dtype):
    """v's head dim below q's and k's (MLA's expanded form: 192 and 128): the output has v's,
    causal and windowed, GQA, a striped offset, keys padded (48 -> 64) and values not."""
    g = torch.Generator().manual_seed(D * 100 + Dv)
    q, k = rand(2, 61, 4, D, dtype=dtype, gen=g), rand(2, 97, 2, D, dtype=dtype, gen=g)
    v = rand(2, 97, 2, Dv, dtype=dtype, gen=g)
    for causal, window, qo, qs in ((True, None, 36, 1), (False, 30, 5, 2), (True, 20, 40, 1)):
        out, lse = attention(q, k, v, None, causal, window, qo, qs, 0, 1, backend=backend)
        assert out.shape == (2, 61, 4, Dv) and out.dtype == dtype
        ref_out, ref_lse = attention_ref(q, k, v, None, causal, window, qo, qs, 0, 1)
        lowp = (None if dtype == torch.float32 else
                attention_ref(q, k, v, None, causal, window, qo, qs, 0, 1, dtype=dtype)[0])
        check_close(out, lse, ref_out, ref_lse, dtype, lowp)
    if backend == "triton" and D & (D - 1) == 0 and Dv & (Dv - 1) == 0 and Dv >= 16:
        from ringserve.kernels.flash_fwd import flash_attn_fwd   # the descriptors' V block
        out, lse = flash_attn_fwd(q, k, v, None, True, 20, 40, 1, 0, 1, use_tma=True)
        ref_out, ref_lse = attention_ref(q, k, v, None, True, 20, 40, 1, 0, 1)
        check_close(out, lse, ref_out, ref_lse, torch.float32)
    with pytest.raises(ValueError, match="values' head dim"):
        attention(q, k, rand(2, 97, 2, D + 1, dtype=dtype), backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_key_blocks_are_never_read(backend):
    """K/V rows that no query can see are NaN: blocks the mask removes must not be touched.

    Poisoned ranges are whole 64-key blocks, so this holds for any BLOCK_N dividing 64.
    """
    q, k, v = qkv(1, 77, 256, 2, 1, 16, torch.float32, seed=3)
    # causal, queries at 0..76: keys >= 128 lie wholly past the diagonal
    kp, vp = k.clone(), v.clone()
    kp[:, 128:] = float("nan")
    vp[:, 128:] = float("nan")
    out, lse = attention(q, kp, vp, None, True, None, 0, 1, 0, 1, backend=backend)
    ref_out, ref_lse = attention_ref(q, k, v, None, True, None, 0, 1, 0, 1)
    check_close(out, lse, ref_out, ref_lse, torch.float32)
    # causal + window 20, queries at 100..176: keys < 64 and >= 192 are never visible
    kp, vp = k.clone(), v.clone()
    for sl in (slice(0, 64), slice(192, None)):
        kp[:, sl] = float("nan")
        vp[:, sl] = float("nan")
    out, lse = attention(q, kp, vp, None, True, 20, 100, 1, 0, 1, backend=backend)
    ref_out, ref_lse = attention_ref(q, k, v, None, True, 20, 100, 1, 0, 1)
    check_close(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_everything(backend):
    q, k, v = qkv(1, 20, 30, 2, 2, 16, torch.float32, seed=5)
    out, lse = attention(q, k, v, None, True, None, 0, 1, 1000, 1, backend=backend)
    assert torch.all(lse == float("-inf")) and torch.all(out == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_of_chunks_equals_whole(backend, dtype):
    """Ring-style: striped queries vs each rank's striped keys, merged, == whole attention."""
    N, total, H, D = 3, 100, 2, 16
    g = torch.Generator().manual_seed(21)
    q, k, v = (rand(1, total, H, D, dtype=dtype, gen=g), rand(1, total, 1, D, dtype=dtype, gen=g),
               rand(1, total, 1, D, dtype=dtype, gen=g))
    ref_out, ref_lse = attention_ref(q, k, v, None, True, 30)
    for r in range(N):   # this rank's queries: positions r, r+N, ...
        qr = q[:, r::N]
        acc = torch.zeros(qr.shape, dtype=torch.float32)
        acc_lse = torch.full((1, H, qr.shape[1]), float("-inf"))
        for src in [(r + s) % N for s in range(N)]:
            o, l = attention(qr, k[:, src::N], v[:, src::N], None, True, 30, r, N, src, N,
                             backend=backend)
            res = merge_(acc, acc_lse, o, l, backend=backend)
            assert res[0] is acc and res[1] is acc_lse   # in place
        want_out, want_lse = ref_out[:, r::N], ref_lse[:, :, r::N]
        tol = 1e-5 if dtype == torch.float32 else 3e-3
        assert (acc.double() - want_out).abs().max() < tol
        assert (acc_lse - want_lse).abs().max() < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_matches_reference_and_handles_inf(backend):
    g = torch.Generator().manual_seed(9)
    B, S, H, D = 2, 33, 3, 24
    oa, ob = rand(B, S, H, D, gen=g), rand(B, S, H, D, gen=g)
    la, lb = rand(B, H, S, gen=g) * 3, rand(B, H, S, gen=g) * 3
    la[0, 0, :5] = float("-inf")      # accumulator empty
    lb[0, 0, 3:8] = float("-inf")     # incoming partial empty (rows 3, 4: both)
    lb[1, 2, :] = float("-inf")
    ref_out, ref_lse = merge_ref(oa, la, ob, lb)
    merge_(oa, la, ob, lb, backend=backend)
    assert torch.equal(torch.isfinite(la), torch.isfinite(ref_lse))
    assert torch.all(la[0, 0, 3:5] == float("-inf")) and torch.all(oa[0, 3:5, 0] == 0)
    fin = torch.isfinite(ref_lse)
    assert (la[fin] - ref_lse[fin]).abs().max() < 1e-5
    assert (oa.double() - ref_out).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_splits_equals_attention_over_the_whole_key_range(backend, dtype):
    """A key range split into NB batch entries (as a short chunk against a long cached prefix
    runs), merged in one call, equals attention over the whole range; a split that sees no
    key (lse -inf) weighs nothing, and a row no split sees gets out 0, lse -inf."""
    from ringserve.kernels import merge_splits
    g = torch.Generator().manual_seed(31)
    NB, L, S, Hq, Hkv, D = 4, 9, 13, 4, 2, 16
    q = rand(1, S, Hq, D, dtype=dtype, gen=g)
    k, v = rand(1, NB * L, Hkv, D, dtype=dtype, gen=g), rand(1, NB * L, Hkv, D, dtype=dtype,
                                                                  gen=g)
    o, lse = attention(q.expand(NB, S, Hq, D), k.view(NB, L, Hkv, D), v.view(NB, L, Hkv, D),
                       backend=backend)
    y, z = merge_splits(o, lse, backend=backend)
    assert y.shape == (S, Hq, D) and z.shape == (S, Hq) and y.dtype == z.dtype == torch.float32
    ref_out, ref_lse = attention_ref(q, k, v, None, False, None)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert (y.double() - ref_out[0]).abs().max() < tol
    assert (z.double() - ref_lse[0].t()).abs().max() < tol
    lse2 = lse.clone()
    lse2[1] = float("-inf")                    # split 1 saw nothing
    lse2[:, 2, 5] = float("-inf")              # head 2, row 5: no split saw anything
    y2, z2 = merge_splits(o, lse2, backend=backend)
    keep = torch.tensor([0, 2, 3])
    y3, z3 = merge_splits(o[keep], lse[keep], backend=backend)
    assert z2[5, 2] == float("-inf") and torch.all(y2[5, 2] == 0) and not y2.isnan().any()
    z2[5, 2] = z3[5, 2]
    y2[5, 2] = y3[5, 2]
    assert (y2 - y3).abs().max() < 1e-6 and (z2 - z3).abs().max() < 1e-6
    with pytest.raises(ValueError, match="NB, H, S"):
        merge_splits(o, lse[:, :, :-1], backend=backend)


@pytest.mark.parametrize("blocks", [None, (1, 1), (2, 8), (4, 16)])
def test_merge_splits_reads_many_parts_a_load(blocks):
    """The Triton merge reads BLOCK_J parts of BLOCK_R rows a load: with parts that do not fill
    the last load (37 + 5, odd rows), parts whose lse is -inf (one part for every row, one row in
    every part of one set), and a NaN in a part that weighs 0, every blocking equals the torch
    merge."""
    from ringserve.kernels.merge import merge_blocks, merge_splits_triton
    from ringserve.kernels.torch_ops import merge_splits_torch
    g = torch.Generator().manual_seed(5)
    NB, NE, S, H, D = 37, 5, 3, 3, 16
    o = torch.randn(NB, S, H, D, generator=g)
    lse = torch.randn(NB, H, S, generator=g) * 4
    eo = torch.randn(NE, S, H, D, generator=g).half()
    el = torch.randn(NE, H, S, generator=g) * 4
    lse[7] = float("-inf")
    o[7] = float("nan")                     # weighs 0: must not reach the output
    lse[:, 1, 2] = float("-inf")            # head 1, row 2 sees no key in the first set
    want_o, want_l = merge_splits_torch(o.nan_to_num(), lse, (eo, el))
    got_o, got_l = merge_splits_triton(o, lse, (eo, el), blocks=blocks)
    assert not got_o.isnan().any()
    assert (got_o - want_o).abs().max() < 1e-5 and (got_l - want_l).abs().max() < 1e-5
    assert merge_blocks(66, 128) == (1, 32)      # a cascade: one row, 32 parts a load
    assert merge_blocks(8, 128) == (4, 8)        # a late chunk: 8 splits, 4 rows
    # every part count maps to one of the few variants the worker's warm-up compiles
    for d in (16, 64, 128, 256, 512, 1024):
        seen = {merge_blocks(n, d) for n in range(1, 300)}
        assert seen == {merge_blocks(n, d) for n in (1, 8, 32)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_splits_with_the_chunk_part_into_the_step_output(backend, dtype):
    """The serving form: a chunk's splits of its cached prefix and its own part (causal, lse
    as an (H, S) view) merged in one call and written, cast, into the step's output rows (a
    slice of a wider tensor) equal attention over prefix + chunk; rows outside stay put."""
    from ringserve.kernels import merge_splits
    g = torch.Generator().manual_seed(37)
    NB, L, S, Hq, Hkv, D = 4, 8, 11, 4, 2, 16
    q = rand(1, S, Hq, D, dtype=dtype, gen=g)
    kp, vp = rand(1, NB * L, Hkv, D, dtype=dtype, gen=g), rand(1, NB * L, Hkv, D, dtype=dtype,
                                                                    gen=g)
    kc, vc = rand(1, S, Hkv, D, dtype=dtype, gen=g), rand(1, S, Hkv, D, dtype=dtype, gen=g)
    o, lse = attention(q.expand(NB, S, Hq, D), kp.view(NB, L, Hkv, D), vp.view(NB, L, Hkv, D),
                       backend=backend)
    oc, lc = attention(q, kc, vc, causal=True, q_offset=NB * L, k_offset=NB * L,
                       backend=backend)
    step = torch.full((S + 5, Hq, D), 7.0, dtype=dtype)
    y, z = merge_splits(o, lse, backend=backend, extra=(oc[0], lc[0]), dest=step[2:2 + S])
    assert z is None and y.data_ptr() == step[2:2 + S].data_ptr()
    ref_out, _ = attention_ref(q, torch.cat([kp, kc], 1), torch.cat([vp, vc], 1), None, True,
                               None, q_offset=NB * L)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert (step[2:2 + S].double() - ref_out[0]).abs().max() < tol
    assert torch.all(step[:2] == 7) and torch.all(step[2 + S:] == 7)
    # float32 result and lse, as without dest
    y2, z2 = merge_splits(o, lse, backend=backend, extra=(oc[0], lc[0]))
    assert y2.dtype == torch.float32 and z2.shape == (S, Hq)
    assert (y2.double() - ref_out[0]).abs().max() < tol
    with pytest.raises(ValueError, match="extra must be"):
        merge_splits(o, lse, backend=backend, extra=(oc[0], lc[0].t()))
    with pytest.raises(ValueError, match="dest must be"):
        merge_splits(o, lse, backend=backend, dest=step[:S - 1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cascade_split_partials_merge_in_one_launch(backend, dtype):
    """The cascade decode's form: each of B one-token queries against its own pages and all B
    against a shared document's pages, both left as paged_decode's split partials
    (splits=True, no reduce), merged in one merge_splits (two sets of parts) into the step's
    output rows, equal attention over own + document keys; the partials alone merge to
    paged_decode's reduced (out, lse)."""
    from ringserve.kernels import merge_splits, paged_decode, split_parts
    B, Hq, Hkv, D, page = 3, 4, 2, 32, 16
    q, kc, vc, bt, sl, _, _ = paged_case(B, 1, Hq, Hkv, D, page, [40, 7, 0], dtype, seed=41)
    # the document: pages of the same pool, one table row read by all B queries at once
    dlen = 150
    dtab = torch.randperm(kc.shape[0], generator=torch.Generator().manual_seed(5))
    dtab = dtab[:-(-dlen // page)][None].int()
    dlens = torch.tensor([dlen], dtype=torch.int32)
    own = paged_decode(q, kc, vc, bt, sl, backend=backend, splits=True)
    doc = paged_decode(q.transpose(0, 1), kc, vc, dtab, dlens, backend=backend, splits=True)
    assert own[0].dim() == 5 and own[0].shape[:3] == (B, Hq, 1) and own[0].dtype == torch.float32
    assert doc[0].shape[:3] == (1, Hq, B)
    step = torch.full((B + 2, Hq, D), 7.0, dtype=dtype)
    y, z = merge_splits(*split_parts(*doc), backend=backend, extra=split_parts(*own),
                        dest=step[1:1 + B])
    assert z is None
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for b in range(B):
        n = int(sl[b])
        own_pages = bt[b, :-(-n // page)].long() if n else bt[b, :0].long()
        keys = [kc[own_pages].reshape(-1, Hkv, D)[:n], kc[dtab[0].long()].reshape(-1, Hkv, D)[:dlen]]
        vals = [vc[own_pages].reshape(-1, Hkv, D)[:n], vc[dtab[0].long()].reshape(-1, Hkv, D)[:dlen]]
        ref, _ = attention_ref(q[b:b + 1], torch.cat(keys)[None], torch.cat(vals)[None], None,
                               False, None)
        assert (step[1 + b].double() - ref[0, 0]).abs().max() < tol, b
    assert torch.all(step[0] == 7) and torch.all(step[1 + B:] == 7)
    # the partials alone merge to the reduced result
    out, lse = paged_decode(q, kc, vc, bt, sl, backend=backend)
    mo, ml = merge_splits(*split_parts(*own), backend=backend)
    fin = torch.isfinite(lse[:, :, 0])
    assert (mo.double() - out[:, 0].double()).abs().max() < tol
    assert (ml[fin] - lse[:, :, 0][fin]).abs().max() < 1e-4
    assert torch.all(ml[2] == float("-inf")) and torch.all(mo[2] == 0)   # an empty sequence
    with pytest.raises(ValueError, match="Sq == 1 or B == 1"):
        split_parts(torch.zeros(2, Hq, 2, 1, D), torch.zeros(2, Hq, 2, 1))
    with pytest.raises(ValueError, match="extra must be"):
        merge_splits(*split_parts(*doc), backend=backend,
                     extra=(own[0][:, :, 0].permute(2, 0, 1, 3), own[1][:, :, 0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_document_part_drops_only_an_all_true_mask(backend):
    """kernels.shared_prefix_kw: the document's part of a cascade under rows that decode after
    it runs without the causal mask (nor key positions) and equals the masked call; a window
    keeps the mask (it does cut those keys); a non-causal call is left as it is."""
    from ringserve.kernels import paged_decode, shared_prefix_kw
    B, Hq, Hkv, D, page, dlen = 4, 8, 2, 32, 16, 150
    q, kc, vc, _, _, _, _ = paged_case(B, 1, Hq, Hkv, D, page, [dlen], torch.float32, seed=43)
    P = kc.shape[0]
    dtab = torch.randperm(P, generator=torch.Generator().manual_seed(6))[:-(-dlen // page)]
    dtab, dlens = dtab[None].int(), torch.tensor([dlen], dtype=torch.int32)
    kv_pos = torch.zeros(P, page, dtype=torch.int64)          # the document at 0..dlen-1
    kv_pos[dtab[0].long()] = torch.arange(dtab.shape[1] * page).view(-1, page)
    qd = q.transpose(0, 1)                                    # (1, B, Hq, D): B rows
    qpos = torch.tensor([[dlen + 3, dlen + 9, dlen + 40, dlen + 41]])
    kw = dict(softmax_scale=0.3, causal=True, window_size=None, kv_pos=kv_pos,
              positions_sorted=True)
    assert shared_prefix_kw(kw)["causal"] is False and shared_prefix_kw(kw)["kv_pos"] is None
    masked = paged_decode(qd, kc, vc, dtab, dlens, q_pos=qpos, backend=backend, **kw)
    free = paged_decode(qd, kc, vc, dtab, dlens, q_pos=qpos, backend=backend,
                        **shared_prefix_kw(kw))
    assert (masked[0] - free[0]).abs().max() < 1e-5
    assert (masked[1] - free[1]).abs().max() < 1e-5
    win = dict(kw, window_size=64)
    assert shared_prefix_kw(win) is win and shared_prefix_kw(dict(kw, causal=False))["kv_pos"] \
        is kv_pos
    cut = paged_decode(qd, kc, vc, dtab, dlens, q_pos=qpos, backend=backend,
                       **shared_prefix_kw(win))
    assert (cut[0] - masked[0]).abs().max() > 1e-2          # the window's mask still applies


def test_merge_triton_low_precision_accumulator_and_nan_guard():
    g = torch.Generator().manual_seed(10)
    B, S, H, D = 1, 17, 2, 32
    oa, ob = rand(B, S, H, D, gen=g), rand(B, S, H, D, gen=g)
    la, lb = rand(B, H, S, gen=g), rand(B, H, S, gen=g)
    acc = oa.half()
    ref_out, ref_lse = merge_ref(acc, la, ob, lb)
    merge_(acc, la, ob, lb, backend="triton")
    # merged in fp32, rounded once to fp16: within half an fp16 ulp (2**-11 relative)
    assert acc.dtype == torch.float16
    assert torch.all((acc.double() - ref_out).abs() <= 2 ** -11 * ref_out.abs() + 1e-6)
    # an empty accumulator may hold garbage (torch.empty): weight 0 must not let it through
    junk = torch.full((B, S, H, D), float("nan"))
    empty = torch.full((B, H, S), float("-inf"))
    merge_(junk, empty, ob, lb, backend="triton")
    assert (junk - ob).abs().max() < 1e-6 and (empty - lb).abs().max() < 1e-6


def paged_case(B, Sq, Hq, Hkv, D, page, lens, dtype, seed, positions=False):
    g = torch.Generator().manual_seed(seed)
    max_pages = max(1, max(-(-n // page) for n in lens)) + 1
    P = B * max_pages + 3
    k_cache, v_cache = rand(P, page, Hkv, D, dtype=dtype, gen=g), rand(P, page, Hkv, D, dtype=dtype, gen=g)
    block_table = torch.randperm(P, generator=g)[:B * max_pages].view(B, max_pages).int()  # shuffled
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = rand(B, Sq, Hq, D, dtype=dtype, gen=g)
    q_pos = kv_pos = None
    if positions:   # global positions of a striped shard: slot order != position order
        kv_pos = torch.randperm(P * page, generator=g).view(P, page) * 2 + 1
        q_pos = torch.randint(0, 2 * P * page, (B, Sq), generator=g)
    return q, k_cache, v_cache, block_table, seq_lens, q_pos, kv_pos


DECODE_CASES = {
    # B, Sq, Hq, Hkv, D, page, lens, causal, window, positions, dtype
    "gqa-one-token": (2, 1, 4, 2, 32, 16, [200, 77], False, None, False, torch.float32),
    "mqa-causal-default-pos": (2, 3, 4, 1, 32, 16, [150, 61], True, None, False, torch.float32),
    "positions-window": (2, 4, 8, 2, 16, 8, [131, 100], True, 300, True, torch.float32),
    "empty-seq-fp16": (2, 2, 4, 2, 32, 16, [0, 93], False, None, False, torch.float16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_paged_decode_matches_reference(case, backend):
    B, Sq, Hq, Hkv, D, page, lens, causal, window, positions, dtype = DECODE_CASES[case]
    q, kc, vc, bt, sl, qp, kp = paged_case(B, Sq, Hq, Hkv, D, page, lens, dtype,
                                           seed=zlib.crc32(case.encode()) % 10_000, positions=positions)
    out, lse = paged_decode(q, kc, vc, bt, sl, None, causal, window, qp, kp, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, Hq, Sq)
    ref_out, ref_lse = paged_decode_ref(q, kc, vc, bt, sl, None, causal, window, qp, kp)
    lowp = None
    if dtype != torch.float32:
        lowp, _ = paged_decode_ref(q, kc, vc, bt, sl, None, causal, window, qp, kp, dtype=dtype)
    check_close(out, lse, ref_out, ref_lse, dtype, lowp)


def test_paged_decode_shards_merge_to_whole():
    """Decode partials from two KV shards, merged, == decode over the union (pass-Q)."""
    q, kc, vc, bt, sl, qp, kp = paged_case(1, 2, 4, 2, 32, 16, [180], torch.float32, seed=77,
                                           positions=True)
    whole_out, whole_lse = paged_decode_ref(q, kc, vc, bt, sl, None, True, None, qp, kp)
    # shard 0 holds pages 0..5 of the table, shard 1 the rest
    out0, lse0 = paged_decode(q, kc, vc, bt[:, :6].contiguous(), torch.tensor([96], dtype=torch.int32),
                              None, True, None, qp, kp, backend="triton")
    out1, lse1 = paged_decode(q, kc, vc, bt[:, 6:].contiguous(), torch.tensor([84], dtype=torch.int32),
                              None, True, None, qp, kp, backend="triton")
    acc, acc_lse = out0.float(), lse0.clone()
    merge_(acc, acc_lse, out1, lse1, backend="triton")
    assert (acc.double() - whole_out).abs().max() < 1e-5
    fin = torch.isfinite(whole_lse)
    assert torch.equal(torch.isfinite(acc_lse), fin)
    assert (acc_lse[fin] - whole_lse[fin]).abs().max() < 1e-5


def test_paged_decode_max_seq_len_bound():
    """max_seq_len only sizes the chunks: exact, loose or too small, the result is the same."""
    from ringserve.kernels.flash_decode import paged_decode_triton
    q, kc, vc, bt, sl, _, _ = paged_case(2, 2, 4, 2, 16, 8, [150, 37], torch.float32, seed=31)
    ref_out, ref_lse = paged_decode_ref(q, kc, vc, bt, sl)
    for bound in (None, 150, 40):
        out, lse = paged_decode_triton(q, kc, vc, bt, sl, max_seq_len=bound, num_splits=3)
        check_close(out, lse, ref_out, ref_lse, torch.float32)


def test_paged_decode_row_tile_override(monkeypatch):
    """Many query rows on one KV head (the cascade's shared document: questions x the GQA
    group): block_m splits them over row blocks, exact at 16, 32 and the default; a bad
    block_m and a malformed RINGSERVE_DECODE_MANY_ROWS are refused."""
    from ringserve.kernels import flash_decode as fd
    q, kc, vc, bt, sl, _, _ = paged_case(1, 12, 8, 2, 16, 8, [140], torch.float32, seed=41)
    qp = torch.arange(140, 152, dtype=torch.int32)[None]     # 48 rows a KV head, after the doc
    ref_out, ref_lse = paged_decode_ref(q, kc, vc, bt, sl, None, True, None, qp)
    for bm in (None, 16, 32):
        out, lse = fd.paged_decode_triton(q, kc, vc, bt, sl, None, True, q_pos=qp, block_m=bm)
        check_close(out, lse, ref_out, ref_lse, torch.float32)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        fd.paged_decode_triton(q, kc, vc, bt, sl, block_m=24)
    monkeypatch.setenv("RINGSERVE_DECODE_MANY_ROWS", "32,128,2,4")
    with pytest.raises(ValueError, match="five ints"):
        fd._many_rows_tile()
    monkeypatch.setenv("RINGSERVE_DECODE_MANY_ROWS", "32,128,2,4,8")
    assert fd._many_rows_tile() == (32, 128, 2, 4, 8)
    monkeypatch.delenv("RINGSERVE_DECODE_MANY_ROWS")
    assert fd._many_rows_tile() == fd.MANY_ROWS_DEFAULT == (0, 0, 2, 4, 0)


@pytest.mark.parametrize("latent", [False, True])
def test_paged_decode_splits_share_each_sequences_own_keys(latent):
    """A decode graph's block table is a power-of-two width, up to twice its sequences: the
    splits still share each sequence's own keys (every split of a long enough sequence sees
    some; none is left idle by the table's empty half), and the result is exact."""
    from ringserve.kernels.flash_decode import paged_decode_triton
    D = 576 if latent else 32
    # 256 keys: 8 or 16 whole tiles (block_n 32 / 16 on CPU), two or four for each of 4 splits
    q, kc, vc, bt, sl, _, _ = paged_case(2, 1, 4, 1 if latent else 2, D, 8, [256, 47],
                                         torch.float32, seed=41)
    if latent:
        vc = kc
    ref_out, ref_lse = paged_decode_ref(q, kc, vc, bt, sl)
    wide = torch.cat([bt, bt.flip(1)], 1)        # twice the width; the tail never read
    for table in (bt, wide):
        _, lse = paged_decode_triton(q, kc, vc, table, sl, num_splits=4, splits=True)
        assert lse.shape[3] == 4 and torch.isfinite(lse[0]).all(), lse[0]
        out, lse = paged_decode_triton(q, kc, vc, table, sl, num_splits=4)
        check_close(out, lse, ref_out, ref_lse, torch.float32)


def test_launchers_reject_bad_inputs():
    from ringserve.kernels.flash_decode import paged_decode_triton
    from ringserve.kernels.flash_fwd import flash_attn_fwd
    from ringserve.kernels.merge import merge_triton_
    q, k, v = qkv(1, 8, 8, 6, 4, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"num q heads \(6\) must be a multiple of num kv heads \(4\)"):
        flash_attn_fwd(q, k, v)
    q, k, v = qkv(1, 8, 8, 4, 2, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"head dim \(16\)"):
        flash_attn_fwd(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attn_fwd(q, k.half(), v.half())
    with pytest.raises(ValueError, match="not supported"):
        flash_attn_fwd(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="q_stride=0"):
        flash_attn_fwd(q, k, v, None, True, None, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="window_size must be None or an int >= 0, got -1"):
        flash_attn_fwd(q, k, v, None, False, -1)
    with pytest.raises(ValueError, match="4-D"):
        flash_attn_fwd(q[0], k, v)
    o, l = torch.zeros(1, 8, 4, 16), torch.zeros(1, 4, 8)
    with pytest.raises(ValueError, match=r"lse_b shape \(1, 8, 4\) must be \(B, H, S\)"):
        merge_triton_(o, l, o.clone(), torch.zeros(1, 8, 4))
    with pytest.raises(ValueError, match="lse_acc must be float32"):
        merge_triton_(o, l.half(), o.clone(), l.clone())
    qd, kc, vc, bt, sl, _, _ = paged_case(1, 1, 4, 2, 16, 16, [40], torch.float32, seed=2)
    with pytest.raises(ValueError, match=r"seq_lens must be in 0..max_pages\*page_size \(4\*16\)"):
        paged_decode_triton(qd, kc, vc, bt, torch.tensor([65], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"q_pos shape \(2, 1\) must be \(B, Sq\) = \(1, 1\)"):
        paged_decode_triton(qd, kc, vc, bt, sl, None, True, None, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="block_table must be int32 or int64"):
        paged_decode_triton(qd, kc, vc, bt.float(), sl)
    kc3 = torch.zeros(kc.shape[0], 16, 3, 16)
    with pytest.raises(ValueError, match=r"num q heads \(4\) must be a multiple of num kv heads \(3\)"):
        paged_decode_triton(qd, kc3, kc3.clone(), bt, sl)


def test_softmax_scale_is_used():
    q, k, v = qkv(1, 20, 30, 2, 1, 16, torch.float32, seed=4)
    for s in (0.05, 1.7):
        out, lse = attention(q, k, v, s, False, None, backend="triton")
        ref_out, ref_lse = attention_ref(q, k, v, s)
        check_close(out, lse, ref_out, ref_lse, torch.float32)
    assert not math.isclose(float(lse[0, 0, 0]), float(attention_ref(q, k, v, 0.05)[1][0, 0, 0]))


def test_cudnn_plan_matches_the_mask():
    """The cuDNN backend's block mapping (plain Python) against the float64 visibility mask:
    every block it accepts is exactly `rows q0.. see keys ..k1 top-left causal` (or full/empty),
    and every striped/contiguous-ring block of the ring's layouts is accepted."""
    from ringserve.kernels.cudnn_attn import sdpa_plan
    from ringserve.kernels.reference import visible_mask
    from ringserve.parallel import layout

    def implied(plan, Sq, Sk):
        mode, q0, k1 = plan
        m = torch.zeros(Sq, Sk, dtype=torch.bool)
        if mode == "full":
            m[:] = True
        elif mode == "causal":
            assert Sq - q0 == k1 <= Sk
            m[q0:, :k1] = torch.ones(k1, k1, dtype=torch.bool).tril()
        return m

    accepted = 0
    for total in (1, 2, 7, 64, 1000, 1027):
        for n in (1, 2, 3, 4, 8):
            for schedule in ("striped", "ring"):
                sh = [layout.shard(total, n, r, schedule) for r in range(n)]
                for a in sh:
                    for b in sh:
                        for causal in (True, False):
                            plan = sdpa_plan(a.length, b.length, causal, None, a.offset,
                                             a.stride, b.offset, b.stride)
                            assert plan is not None, (total, n, schedule, a, b)
                            qp = a.offset + a.stride * torch.arange(a.length)
                            kp = b.offset + b.stride * torch.arange(b.length)
                            assert torch.equal(implied(plan, a.length, b.length),
                                               visible_mask(qp, kp, causal, None))
                            accepted += 1
    assert accepted > 500
    # not expressible: windows, keys before the queries' diagonal (c > 0), unequal strides
    assert sdpa_plan(100, 100, True, 10, 0, 1, 0, 1) is None
    assert sdpa_plan(100, 200, True, None, 150, 1, 100, 1) is None
    assert sdpa_plan(100, 100, True, None, 0, 2, 0, 3) is None
    # the CPU dispatch of backend="cudnn" is the torch path, exact
    q, k, v = (torch.randn(1, 33, h, 16) for h in (4, 2, 2))
    o1, l1 = attention(q, k, v, causal=True, q_offset=1, q_stride=2, k_stride=2,
                               backend="cudnn")
    o2, l2 = attention(q, k, v, causal=True, q_offset=1, q_stride=2, k_stride=2,
                               backend="torch")
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


@pytest.mark.parametrize("causal,window,softcap", [(True, None, False), (False, 24, True)])
def test_autotune_proxy_runs_the_kernel_with_the_real_key(monkeypatch, causal, window, softcap):
    """The first long problem of a key is tuned on a small proxy (GPU only; tuning at 512K took
    ~2 minutes). Here the proxy's launch runs for real under the interpreter: its arguments
    must be a valid problem (output equal to the reference) and carry the real call's key."""
    from ringserve.kernels import flash_fwd

    calls = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                cfg = flash_fwd.CPU_CONFIG
                flash_fwd._flash_fwd_kernel[grid(cfg)](*args, **meta, **cfg)
                calls.append((args, meta))
            return launch

    monkeypatch.setattr(flash_fwd, "_PROXY_TOKENS", 48)
    monkeypatch.setattr(flash_fwd, "_tuned", {False: Recorder(), True: Recorder()})
    monkeypatch.setattr(flash_fwd, "_proxied", set())
    q = torch.randn(1, 8, 4, 16)
    # values narrower than the keys on one of the two (the proxy's V takes the real one's)
    dv = 16 if causal else 8
    meta = dict(HEAD_DIM=16, BLOCK_D=16, HEAD_DIM_V=dv, BLOCK_DV=16, CAUSAL=causal,
                HAS_WINDOW=window is not None, USE_TMA=False, WARP_SPEC=False, DOT_PREC="ieee",
                IDX64=True, SOFTCAP=softcap)
    v = q[:, :, :2, :dv]
    flash_fwd._tune_on_proxy(q, q[:, :, :2], v, 4, 2, 16, dv, meta, False)
    flash_fwd._tune_on_proxy(q, q[:, :, :2], v, 4, 2, 16, dv, meta, False)  # cached
    assert len(calls) == 1
    args, got_meta = calls[0]
    assert got_meta == meta                       # the same constexpr key
    assert args[-1] == flash_fwd.seq_bucket(48, 48) == 128      # SEQ_BUCKET, floored at 128
    pq, pk, pv, po, pl = args[:5]
    assert pv.shape[-1] == po.shape[-1] == dv
    ref_o, ref_l = attention_ref(pq, pk, pv, None, causal, 1024 if window else None,
                                 softcap=50.0 if softcap else None)
    assert (po.double() - ref_o).abs().max().item() < 1e-4


# Gemma 2's attention-logit soft-capping: scores c * tanh(s / c). A small cap next to scores of
# a few units (inputs scaled by 3) makes the capped and uncapped results differ visibly.
SOFTCAP_CASES = {
    "causal-gqa-window": (1, 77, 211, 4, 2, 32, True, 40, 134, 1, 0, 1, torch.float32),
    "striped-causal": (1, 77, 211, 2, 1, 16, True, None, 1, 3, 2, 3, torch.float32),
    "fp16-plain": (1, 77, 211, 4, 2, 64, False, None, 0, 1, 0, 1, torch.float16),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
def test_attention_softcap_matches_reference(case, backend):
    B, Sq, Sk, Hq, Hkv, D, causal, window, qo, qs, ko, ks, dtype = SOFTCAP_CASES[case]
    q, k, v = qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed=zlib.crc32(case.encode()) % 10_000)
    q = (q.float() * 3).to(dtype)
    cap = 2.5
    out, lse = attention(q, k, v, None, causal, window, qo, qs, ko, ks, backend=backend,
                         softcap=cap)
    ref_out, ref_lse = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks, softcap=cap)
    lowp = None
    if dtype != torch.float32:
        lowp, _ = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks, dtype=dtype,
                                softcap=cap)
    check_close(out, lse, ref_out, ref_lse, dtype, lowp)
    plain, _ = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks)
    assert (plain - ref_out).abs().max() > 0.1   # the cap is live in these cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_softcap_matches_reference(backend):
    for dtype in (torch.float32, torch.float16):
        q, kc, vc, bt, sl, qp, kp = paged_case(2, 3, 8, 2, 16, 8, [131, 100], dtype, seed=91,
                                               positions=True)
        q = (q.float() * 3).to(dtype)
        out, lse = paged_decode(q, kc, vc, bt, sl, None, True, 300, qp, kp, backend=backend,
                                softcap=3.0)
        ref_out, ref_lse = paged_decode_ref(q, kc, vc, bt, sl, None, True, 300, qp, kp,
                                            softcap=3.0)
        lowp = None
        if dtype != torch.float32:
            lowp, _ = paged_decode_ref(q, kc, vc, bt, sl, None, True, 300, qp, kp, dtype=dtype,
                                       softcap=3.0)
        check_close(out, lse, ref_out, ref_lse, dtype, lowp)
        plain, _ = paged_decode_ref(q, kc, vc, bt, sl, None, True, 300, qp, kp)
        assert (plain - ref_out).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_decode_latent_heads(dtype):
    """MLA's absorbed decode: 16 query heads on one 576-wide KV head whose values are the keys
    (one cache tensor passed as both), through the Triton kernel (wide heads: tile 1024) and the
    torch path, against float64."""
    from ringserve.kernels.flash_decode import paged_decode_triton
    q, kc, _, bt, sl, qp, kp = paged_case(2, 1, 16, 1, 576, 8, [61, 30], dtype, seed=5,
                                          positions=True)
    ref_out, ref_lse = paged_decode_ref(q, kc, kc, bt, sl, 0.1, True, None, qp, kp)
    lowp = None
    if dtype != torch.float32:
        lowp, _ = paged_decode_ref(q, kc, kc, bt, sl, 0.1, True, None, qp, kp, dtype=dtype)
    for out, lse in (paged_decode_triton(q, kc, kc, bt, sl, 0.1, True, None, qp, kp),
                     paged_decode(q, kc, kc, bt, sl, 0.1, True, None, qp, kp, backend="torch")):
        check_close(out, lse, ref_out, ref_lse, dtype, lowp)


@pytest.mark.parametrize("sq,window,cap", [(1, None, None), (3, 70, 2.5)])
def test_latent_decode_kernel_equals_the_general_one_and_float64(sq, window, cap):
    """MLA's own decode kernel (the 576-wide head as 512 + 64, values = the keys' first 512
    read once): one token and 3 (48 rows: two row blocks), causal with striped positions, a
    window and soft-capping, against float64 and the general wide kernel (latent=False); the
    splits' partials too. A cache whose values are not its keys, or a power-of-two head, is
    not taken for a latent."""
    from ringserve.kernels.flash_decode import latent_split, paged_decode_triton
    q, kc, vc, bt, sl, qp, kp = paged_case(2, sq, 16, 1, 576, 16, [300, 77], torch.float32,
                                           seed=13, positions=True)
    ref_out, ref_lse = paged_decode_ref(q, kc, kc, bt, sl, 0.05, True, window, qp, kp,
                                        softcap=cap)
    got = [paged_decode_triton(q, kc, kc, bt, sl, 0.05, True, window, qp, kp, softcap=cap,
                               latent=lat) for lat in (None, False)]
    for out, lse in got:
        check_close(out, lse, ref_out, ref_lse, torch.float32, None)
    o_part, l_part = paged_decode_triton(q, kc, kc, bt, sl, 0.05, True, window, qp, kp,
                                         softcap=cap, splits=True, num_splits=4)
    assert o_part.shape[3] == 4 and o_part.shape[-1] == 576
    assert latent_split(576, kc, kc) == (512, 64)
    assert latent_split(576, kc, vc) is None and latent_split(512, kc, kc) is None
    assert latent_split(576, kc, kc.view(kc.shape)) == (512, 64)   # same storage and strides


@pytest.mark.parametrize("sq,positions", [(1, True), (37, True), (5, False)])
def test_a_window_over_sorted_positions_skips_the_older_keys_exactly(sq, positions):
    """positions_sorted=True (the engine's cache: a sequence's keys in position order along its
    block table, here a striped rank's 2t + 1): each program starts at the first key tile its
    rows' windows reach (a bisection over the tiles) and the result equals float64, for one
    query, 37 queries spread over the last 200 positions (several row blocks), and without
    kv_pos; a split that lies wholly before the window writes an empty partial."""
    from ringserve.kernels.flash_decode import paged_decode_triton
    q, kc, vc, bt, sl, _, _ = paged_case(2, sq, 4, 2, 32, 16, [1500, 700], torch.float32,
                                         seed=17)
    P, page = kc.shape[:2]
    kp = qp = None
    if positions:
        kp = torch.zeros(P, page, dtype=torch.int64)
        for b, n in enumerate(sl.tolist()):
            t = torch.arange(n)
            kp[bt[b, t // page].long(), t % page] = 2 * t + 1
        qp = torch.stack([2 * n + 1 - 2 * torch.arange(sq).flip(0) * (200 // sq + 1)
                          for n in sl.tolist()])
    ref_out, ref_lse = paged_decode_ref(q, kc, vc, bt, sl, None, True, 150, qp, kp)
    out, lse = paged_decode_triton(q, kc, vc, bt, sl, None, True, 150, qp, kp,
                                   positions_sorted=True, num_splits=6, block_n=32)
    check_close(out, lse, ref_out, ref_lse, torch.float32, None)
    o_part, l_part = paged_decode_triton(q, kc, vc, bt, sl, None, True, 150, qp, kp,
                                         positions_sorted=True, num_splits=6, block_n=32,
                                         splits=True)
    assert torch.isinf(l_part[0, :, :, 0]).all() and (o_part[0, :, :, 0] == 0).all()
    # the skipped keys are never read: NaN values two tiles and more before every window
    # (masking alone would give 0 * NaN)
    vn = vc.clone()
    for b, n in enumerate(sl.tolist()):
        first = (int(qp[b].min()) - 150) // 2 if positions else n - 150
        t = torch.arange(max(0, first - 64))
        vn[bt[b, t // page].long(), t % page] = float("nan")
    out, lse = paged_decode_triton(q, kc, vn, bt, sl, None, True, 150, qp, kp,
                                   positions_sorted=True, num_splits=6, block_n=32)
    check_close(out, lse, ref_out, ref_lse, torch.float32, None)
    out, _ = paged_decode_triton(q, kc, vn, bt, sl, None, True, 150, qp, kp, num_splits=6,
                                 block_n=32)
    assert out.isnan().any() == positions   # unsorted positions: every key is read


def test_a_latent_kernel_that_cannot_compile_falls_back_to_the_general_one(monkeypatch):
    """paged_decode(backend="auto") with a wide latent head: if the latent kernel fails for a
    reason other than its inputs (the compiler, shared memory), it warns once, and this and
    later calls take the general wide kernel, not torch; a second failure there takes torch."""
    import warnings
    from ringserve import kernels
    from ringserve.kernels import flash_decode

    q, kc, _, bt, sl, qp, kp = paged_case(1, 1, 4, 1, 576, 16, [90], torch.float32, seed=3)
    ref_out, ref_lse = paged_decode_ref(q, kc, kc, bt, sl, 0.1, False, None)
    real, seen = flash_decode.paged_decode_triton, []

    def flaky(*a, latent=None, **kw):
        seen.append(latent)
        if latent is None:
            raise RuntimeError("out of resources: shared memory")
        return real(*a, latent=latent, **kw)
    monkeypatch.setattr(flash_decode, "paged_decode_triton", flaky)
    monkeypatch.setattr(kernels, "_WIDE_BROKEN", {})
    monkeypatch.setattr(kernels, "_pick", lambda *a: "triton")
    with pytest.warns(UserWarning, match="paged_decode_latent .* the general kernel"):
        out, lse = kernels.paged_decode(q, kc, kc, bt, sl, 0.1)
    check_close(out, lse, ref_out, ref_lse, torch.float32, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = kernels.paged_decode(q, kc, kc, bt, sl, 0.1)
    check_close(out, lse, ref_out, ref_lse, torch.float32, None)
    assert seen == [None, False, False] and "paged_decode" not in kernels._WIDE_BROKEN


def test_paged_decode_reduces_hundreds_of_splits_of_a_wide_head():
    """The reduce kernel's loop: a 576-wide head split 300 ways (more than one 128-split block
    of each 128-column slice, so the running maximum is rescaled across blocks; splits past a
    short sequence's end are empty) equals float64, as do 3 and 129 splits."""
    from ringserve.kernels.flash_decode import paged_decode_triton
    q, kc, _, bt, sl, qp, kp = paged_case(2, 1, 4, 1, 576, 16, [4800, 700], torch.float32,
                                          seed=9, positions=True)
    ref_out, ref_lse = paged_decode_ref(q, kc, kc, bt, sl, 0.1, True, None, qp, kp)
    for n in (3, 129, 300):
        out, lse = paged_decode_triton(q, kc, kc, bt, sl, 0.1, True, None, qp, kp,
                                       num_splits=n, block_n=16)
        check_close(out, lse, ref_out, ref_lse, torch.float32, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_latent_heads(dtype):
    """MLA's absorbed prefill block: 4 query heads on one 576-wide KV head whose values are the
    keys (one tensor as both), striped causal, in the Triton forward (wide heads: 1024-wide
    tile) against float64."""
    from ringserve.kernels.flash_fwd import flash_attn_fwd
    q, k, _ = qkv(1, 45, 70, 4, 1, 576, dtype, seed=6)
    ref_out, ref_lse = attention_ref(q, k, k, 0.05, True, None, 1, 2, 0, 2)
    lowp = None
    if dtype != torch.float32:
        lowp, _ = attention_ref(q, k, k, 0.05, True, None, 1, 2, 0, 2, dtype=dtype)
    out, lse = flash_attn_fwd(q, k, k, 0.05, True, None, 1, 2, 0, 2,
                              config={"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 8,
                                      "num_stages": 1})
    check_close(out, lse, ref_out, ref_lse, dtype, lowp)


def test_sequence_bucket_of_the_autotuning_key_has_a_floor_and_a_cap():
    """Short prompts share the 128 bucket (warmed before serving) instead of opening keys of
    their own that autotune in the middle of serving; long ones share the 16K one."""
    from ringserve.kernels import flash_fwd

    assert [flash_fwd.seq_bucket(a, b) for a, b in ((1, 1), (40, 7), (128, 3), (129, 1),
                                                    (100, 300), (20000, 5), (1, 1 << 20))] \
        == [128, 128, 128, 256, 512, 16384, 16384]


def test_the_autotuner_candidates_per_head_width():
    """flash_attn_fwd's tuning candidates on the GPU: 128-wide heads keep the 128-row, 8-warp
    tiles (the 256-wide heads' 2-stage 128-row tiles are not among them), 256-wide heads get
    the 64-row tiles and the 128-row 8-warp 2-stage ones, MLA's 576-wide latent the 16 x 16
    tile only; warp specialization drops the 64-row 8-warp tiles."""
    from ringserve.kernels.flash_fwd import _gpu_configs, _prune

    def shapes(d, ws=False):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in _prune(_gpu_configs(ws), {}, BLOCK_D=d)}
    assert shapes(128) == {(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2)}
    assert shapes(256) == {(64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)}
    assert shapes(1024) == {(16, 16, 8, 2)}
    assert (128, 64, 4, 3) in shapes(64) and not any(bm == 64 for bm, *_ in shapes(64))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_gemv_equals_float64_linear(dtype, tol):
    """The few-row GEMV (interpreted on CPU) against F.linear in float64: 1-5 rows, ragged N and
    K, with and without bias, a strided x, other tiles (one with a pipelined K loop); bad
    shapes and stages are refused."""
    from ringserve.kernels.gemv import gemv
    g = torch.Generator().manual_seed(5)
    for M, N, K, bias in ((1, 37, 300, False), (3, 64, 129, True), (5, 10, 64, True)):
        x = torch.randn(M, K, generator=g).to(dtype)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        ref = torch.nn.functional.linear(x.double(), w.double(),
                                         None if b is None else b.double())
        for blocks in (None, (8, 64, 2), (1, 32, 4), (4, 32, 4, 3)):   # (last: 3 stages)
            y = gemv(x, w, b, blocks=blocks)
            assert y.shape == (M, N) and y.dtype == dtype
            err = (y.double() - ref).abs().max().item()
            assert err <= tol * max(1.0, ref.abs().max().item()), (M, N, K, blocks, err)
    xs = torch.randn(2, 2 * 96, generator=g)[:, ::2]       # a strided x
    w = torch.randn(8, 96, generator=g)
    assert torch.allclose(gemv(xs, w), xs @ w.t(), atol=1e-5)
    with pytest.raises(ValueError, match="must be"):
        gemv(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="floating point"):
        gemv(torch.randn(2, 4), torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="stages"):
        gemv(xs, w, blocks=(4, 32, 4, 0))
    # a half activation times a float32 weight (the router), float32 out: as F.linear of the
    # activation cast up; add_to: the product added into it, rounded once
    xh, w32 = torch.randn(1, 96, generator=g).half(), torch.randn(40, 96, generator=g)
    ref = xh.float() @ w32.t()
    y = gemv(xh, w32, out_dtype=torch.float32)
    assert y.dtype == torch.float32 and (y - ref).abs().max() < 1e-4
    base = torch.randn(1, 40, generator=g)
    out = base.clone()
    assert gemv(xh.float(), w32, add_to=out) is out
    assert (out - (base + ref)).abs().max() < 1e-4
    with pytest.raises(ValueError, match="add_to"):
        gemv(xh.float(), w32, add_to=torch.zeros(2, 40))
    # the few-token path's choice: one row and a weight of at most GEMV_MAX_WEIGHTS values,
    # wide or long
    from ringserve.kernels.gemv import GEMV_MAX_WEIGHTS, few_rows_linear, gemv_blocks, gemv_wins
    assert gemv_wins(xh, w32) and not gemv_wins(torch.randn(2, 96), w32)
    assert gemv_wins(torch.randn(1, 40), torch.randn(96, 40))
    assert not gemv_wins(torch.randn(1, 8), torch.empty(GEMV_MAX_WEIGHTS // 8 + 1, 8))
    # the default tile by shape: 256 programs where the columns allow, 3 stages
    assert gemv_blocks(6144, 4096) == (8, 512, 4, 3) and gemv_blocks(1536, 4096)[0] == 4
    assert gemv_blocks(128, 2048)[0] == 2
    xw, ww = torch.randn(1, 40, generator=g), torch.randn(96, 40, generator=g)
    assert (few_rows_linear(xw, ww) - xw @ ww.t()).abs().max() < 1e-4   # wide: gemv, 3 stages
    y = few_rows_linear(xh, w32)
    assert y.dtype == torch.float32 and (y - ref).abs().max() < 1e-4
    y = few_rows_linear(torch.randn(3, 96, generator=g), w32.half())   # F.linear's way
    assert y.dtype == torch.float16 and y.shape == (3, 40)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_gemm_few_equals_float64_linear(dtype, tol, monkeypatch):
    """The few-row tensor-core GEMM (interpreted on CPU) against F.linear in float64: 1-17
    rows (padded to 16 / 32), ragged N and K, bias, add_to, a strided x, other tiles (one
    pipelined); bad inputs refused; the few-token path takes it for 2..RINGSERVE_GEMM_FEW_ROWS
    rows only (one row stays gemv's), the MLP's down projection too."""
    from ringserve.kernels import gemv as gm
    g = torch.Generator().manual_seed(6)
    for M, N, K, bias in ((1, 37, 300, False), (2, 64, 129, True), (16, 40, 64, True),
                          (17, 24, 96, False)):
        x = torch.randn(M, K, generator=g).to(dtype)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        ref = torch.nn.functional.linear(x.double(), w.double(),
                                         None if b is None else b.double())
        for blocks in (None, (32, 64, 4), (16, 32, 4, 3)):
            y = gm.gemm_few(x, w, b, blocks=blocks)
            assert y.shape == (M, N) and y.dtype == dtype
            err = (y.double() - ref).abs().max().item()
            assert err <= tol * max(1.0, ref.abs().max().item()), (M, N, K, blocks, err)
        base = torch.randn(M, N, generator=g).to(dtype)
        out = base.clone()
        assert gm.gemm_few(x, w, add_to=out) is out
        ref0 = torch.nn.functional.linear(x.double(), w.double())
        assert (out.double() - (base.double() + ref0)).abs().max() <= 2 * tol * max(
            1.0, ref0.abs().max().item())
    xs = torch.randn(3, 2 * 48, generator=g)[:, ::2].to(dtype)      # a strided x
    w = torch.randn(20, 48, generator=g).to(dtype)
    assert (gm.gemm_few(xs, w).double() - xs.double() @ w.double().t()).abs().max() < 50 * tol
    y = gm.gemm_few(xs, w, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    with pytest.raises(ValueError, match="one floating dtype"):
        gm.gemm_few(xs.double(), w)
    with pytest.raises(ValueError, match="at most 64"):
        gm.gemm_few(torch.randn(65, 48).to(dtype), w)
    with pytest.raises(ValueError, match=">= 16"):
        gm.gemm_few(xs, w, blocks=(8, 64, 4))
    with pytest.raises(ValueError, match="add_to"):
        gm.gemm_few(xs, w, add_to=torch.zeros(3, 21, dtype=dtype))
    # the routing: off by default (RINGSERVE_GEMM_FEW_ROWS unset), then up to 16 rows
    x4 = torch.randn(4, 48, generator=g).to(dtype)
    assert not gm.gemm_few_wins(x4, w) and gm.few_rows_down(x4, w) is None
    monkeypatch.setattr(gm, "FEW_ROWS_MAX", 16)
    assert gm.gemm_few_wins(x4, w) and not gm.gemm_few_wins(x4[:1], w)
    assert not gm.gemm_few_wins(torch.randn(17, 48).to(dtype), w)
    calls = []
    real = gm.gemm_few
    monkeypatch.setattr(gm, "gemm_few", lambda *a, **kw: calls.append(a[0].shape) or
                        real(*a, **kw))
    want = x4.double() @ w.double().t()
    assert (gm.few_rows_linear(x4, w).double() - want).abs().max() < 50 * tol
    acc = torch.zeros(4, 20, dtype=dtype)
    assert gm.few_rows_down(x4, w, add_to=acc) is acc
    assert (acc.double() - want).abs().max() < 50 * tol
    assert gm.few_rows_down(x4, w, b=torch.ones(20, dtype=dtype), add_to=acc) is None
    assert calls == [(4, 48), (4, 48)]
    gm.few_rows_linear(x4[:1], w)                       # one row: gemv
    assert len(calls) == 2


def _rms_ref(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as the model's torch module rounds it (x's dtype)."""
    xf = x.float()
    return g * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_folds_the_norm_before_and_the_residual_add_after(dtype, monkeypatch):
    """gemv(norm=): RMSNorm of x inside the launch equals the norm module then the GEMV (1 and
    3 rows, ragged K over several tiles, a bias; fp16 within the rounding of the normalized
    row, which the fold skips); gemv(residual=): r = round(r + round(x @ w^T)), as torch's
    `h += linear(x)`;
    both at once; bad weights refused; `folds` is off by default, and when turned on takes
    one row of a small enough weight."""
    from ringserve.kernels.gemv import GEMV_MAX_WEIGHTS, folds, gemv
    g = torch.Generator().manual_seed(9)
    ulp = 1e-6 if dtype == torch.float32 else 2e-3
    for M, N, K, bias in ((1, 40, 300, False), (3, 17, 96, True)):
        x = (3 * torch.randn(M, K, generator=g)).to(dtype)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
        gw = (1 + torch.randn(K, generator=g) / 4).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        xn = _rms_ref(x, gw, 1e-6)
        want = gemv(xn, w, b)
        for blocks in (None, (8, 64, 2)):
            got = gemv(x, w, b, blocks=blocks, norm=(gw, 1e-6))
            assert got.dtype == dtype
            err = (got.float() - want.float()).abs().max().item()
            # a normalized value may round the other way in fp16 (the statistic's sums are
            # ordered differently): one ulp of it times the weights' column at most
            assert err <= ulp * (w.float().abs().sum(1).max().item() + want.abs().max().item()), \
                (M, K, blocks, err)
        r0 = torch.randn(M, N, generator=g).to(dtype)
        r = r0.clone()
        assert gemv(xn, w, b, residual=r) is r
        ref = r0 + torch.nn.functional.linear(xn, w, b)      # rounded twice, as torch's h += y
        assert (r.float() - ref.float()).abs().max().item() <= 2 * ulp * (1 + ref.abs().max())
        r = r0.clone()
        gemv(x, w, b, norm=(gw, 1e-6), residual=r)           # both in one launch
        assert (r.float() - ref.float()).abs().max().item() <= 4 * ulp * (1 + ref.abs().max()) \
            + ulp * w.float().abs().sum(1).max().item()
    with pytest.raises(ValueError, match="norm's weight"):
        gemv(x, w, norm=(gw[:-1], 1e-6))
    with pytest.raises(ValueError, match="give one"):
        gemv(x, w, add_to=r, residual=r)
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, residual=torch.zeros(M + 1, N, dtype=dtype))
    from ringserve.kernels import gemv as gemv_mod
    assert not folds(torch.randn(1, 8), torch.randn(32, 8))     # off by default
    monkeypatch.setattr(gemv_mod, "FOLD_MAX_ROWS", 1)           # RINGSERVE_FOLD_ROWS=1
    assert folds(torch.randn(1, 8), torch.randn(32, 8))
    assert not folds(torch.randn(2, 8), torch.randn(32, 8))
    assert not folds(torch.randn(1, 8), torch.empty(GEMV_MAX_WEIGHTS // 8 + 1, 8))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_head_gemv_equals_float64_einsum(dtype, tol):
    """The per-head products (MLA's absorption, interpreted on CPU) against einsum in float64:
    1-5 rows, both weight layouts (the reduced dim contiguous: W_UV (h, v, c); the output dim
    contiguous: W_UK (h, n, c) read transposed), strided views as the model passes them, every
    tile shape bench_gemv sweeps for them; bad shapes are refused."""
    from ringserve.kernels.gemv import head_gemv
    g = torch.Generator().manual_seed(6)
    H, nope, rope, c, v = 3, 24, 8, 64, 20
    kv_b = (torch.randn(H * (nope + v), c, generator=g) / c ** 0.5).to(dtype)
    w = kv_b.view(H, nope + v, c)
    w_uk, w_uv = w[:, :nope], w[:, nope:]          # views, as MLAttention._wkv
    for M in (1, 2, 5):
        q = torch.randn(M, H, nope + rope, generator=g).to(dtype)
        q_nope = q[..., :nope]                     # a strided view
        o = torch.randn(M, H, c + rope, generator=g).to(dtype)[..., :c]
        for x, wt in ((q_nope, w_uk.transpose(1, 2)), (o, w_uv)):
            ref = torch.einsum("thk,hnk->thn", x.double(), wt.double())
            for blocks in (None, (4, 512, 4), (64, 32, 4), (16, 16, 2)):
                y = head_gemv(x, wt, blocks=blocks)
                assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous()
                err = (y.double() - ref).abs().max().item()
                assert err <= tol * max(1.0, ref.abs().max().item()), (M, blocks, err)
    y = head_gemv(q_nope.float(), w_uk.transpose(1, 2).float(), out_dtype=torch.float64)
    assert y.dtype == torch.float64
    with pytest.raises(ValueError, match="must be"):
        head_gemv(torch.randn(2, 3, 5), torch.randn(3, 4, 6))
    with pytest.raises(ValueError, match="floating point"):
        head_gemv(torch.randn(2, 3, 4), torch.ones(3, 4, 4, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_pick_equals_argmax_and_log_softmax(dtype):
    """The greedy pick (interpreted on CPU) against torch.argmax and log_softmax: a vocabulary
    of several blocks and a ragged last one, ties (the first index wins, also across blocks),
    a maximum in the last block, -inf entries, a NaN row; bad input is refused."""
    from ringserve.kernels.greedy import greedy_pick
    g = torch.Generator().manual_seed(9)
    V = 1000
    x = (torch.randn(5, V, generator=g) * 3).to(dtype)
    x[1, 700] = x[1, 100] = x[1].max() + 1          # a tie across blocks: 100 wins
    x[2, 999] = x[2].max() + 2                        # in the ragged last block
    x[3, :500] = float("-inf")
    x[4, 321] = float("nan")
    toks, lps = greedy_pick(x, block=256)
    want = torch.argmax(x.float(), dim=-1)
    assert torch.equal(toks, want), (toks, want)
    ref = torch.log_softmax(x.float(), dim=-1).gather(1, want[:, None])[:, 0]
    assert lps.dtype == torch.float32 and torch.isnan(lps[4]) and toks[4] == 321
    assert torch.allclose(lps[:4], ref[:4], atol=1e-5)
    assert greedy_pick(torch.zeros(0, 7))[0].shape == (0,)
    with pytest.raises(ValueError, match="floating point"):
        greedy_pick(torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="unit stride"):
        greedy_pick(torch.randn(7, 2).t())


def test_pdl_is_off_off_the_gpu(monkeypatch):
    """Programmatic dependent launch only where it exists and is asked for: a CPU tensor (the
    interpreter) gets the plain launch, and without RINGSERVE_PDL=1 the probe says no on any
    device (without launching anything)."""
    from ringserve.kernels import pdl
    assert pdl.pdl_kw(torch.device("cpu")) is pdl.OFF
    for v in (None, "0", "yes"):
        if v is None:
            monkeypatch.delenv("RINGSERVE_PDL", raising=False)
        else:
            monkeypatch.setenv("RINGSERVE_PDL", v)
        assert pdl._probe(torch.device("cuda", 0)) is False


def test_flash_impl_choice_and_the_gluon_fallback(monkeypatch):
    """flash_attn_fwd's impl: a bad name is refused; "gluon" where the Gluon kernel cannot run
    (here: CPU tensors) says why; "auto" with a Gluon launch that fails (a compile error on
    some GPU) warns once, answers with the Triton kernel, and sends that key's later calls to
    Triton without trying again."""
    import warnings
    from ringserve.kernels import flash_fwd, flash_fwd_gluon

    g = torch.Generator().manual_seed(9)
    q, k, v = (rand(1, 40, 2, 64, gen=g) for _ in range(3))
    ref_out, ref_lse = attention_ref(q, k, v, causal=True)
    with pytest.raises(ValueError, match="impl must be one of"):
        flash_fwd.flash_attn_fwd(q, k, v, causal=True, impl="cutlass")
    with pytest.raises(ValueError, match="Gluon kernel does not apply: q is not on a CUDA"):
        flash_fwd.flash_attn_fwd(q, k, v, causal=True, impl="gluon")
    with pytest.raises(ValueError, match="Gluon kernel does not apply: q is not on a CUDA"):
        flash_fwd.flash_attn_fwd(q, k, v, causal=True, window_size=8, impl="gluon")
    assert not flash_fwd._gluon_applies(q, k, v, True, None, None, 1, 1, 1)   # CPU tensors
    # one failing program (dtype, head dim, causal, mask paths) leaves the others to Gluon
    assert flash_fwd._gluon_key(q, True, None, None, 1, 1) \
        != flash_fwd._gluon_key(q, True, 8, None, 1, 1) \
        != flash_fwd._gluon_key(q, True, 8, 30.0, 1, 1) \
        != flash_fwd._gluon_key(q, True, 8, 30.0, 2, 2)
    calls = []

    def broken(*a, **kw):
        calls.append(a)
        raise RuntimeError("PassManager::run failed")
    monkeypatch.setattr(flash_fwd, "_gluon_broken", {})
    monkeypatch.setattr(flash_fwd_gluon, "flash_attn_fwd_gluon", broken)
    monkeypatch.setattr(flash_fwd, "_gluon_applies",
                        lambda q, k, v, c, w, sc, qs, ks, *a:
                        flash_fwd._gluon_key(q, c, w, sc, qs, ks) not in flash_fwd._gluon_broken)
    with pytest.warns(UserWarning, match="Gluon kernel failed .* Triton kernel takes"):
        out, lse = flash_fwd.flash_attn_fwd(q, k, v, causal=True)
    check_close(out, lse, ref_out, ref_lse, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = flash_fwd.flash_attn_fwd(q, k, v, causal=True)
    check_close(out, lse, ref_out, ref_lse, torch.float32)
    assert len(calls) == 1 and list(flash_fwd._gluon_broken) == [
        (torch.float32, 64, True, False, False, False)]
    # a windowed call is another program: tried once (the wrapper gets the window), then
    # Triton for it too
    ref_out, ref_lse = attention_ref(q, k, v, causal=True, window_size=8)
    with pytest.warns(UserWarning, match="Gluon kernel failed"):
        out, lse = flash_fwd.flash_attn_fwd(q, k, v, causal=True, window_size=8)
    check_close(out, lse, ref_out, ref_lse, torch.float32)
    assert len(calls) == 2 and len(flash_fwd._gluon_broken) == 2
