"""Triton kernels on a CUDA GPU, bf16 and fp16, head dims 64 and 128, larger sizes.

Reference: reference.py in float64 on the GPU. Low precision passes when the kernel's max error is
at most 2x that of a plain torch computation in the same dtype (plus a tiny floor).
Most cases use one fixed launch config (autotuning each case would cost minutes of compiles);
test_autotuned_default_path covers the default (autotuned, TMA where possible) launch.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from ringserve.kernels.reference import attention_ref, merge_ref, paged_decode_ref

pytestmark = pytest.mark.gpu

FIXED = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def check_lowp(out, lse, ref_out, ref_lse, lowp_out, what=""):
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), f"{what}: fully masked rows differ"
    assert torch.isfinite(out).all(), what
    if (~fin).any():
        assert torch.all(out[~fin.transpose(1, 2)] == 0), what
    err = (out.double() - ref_out).abs().max().item()
    base = (lowp_out.double() - ref_out).abs().max().item()
    assert err <= 2 * base + 1e-4, f"{what}: max error {err:.3g} vs plain torch {base:.3g}"
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 2e-2, what


def make(B, Sq, Sk, Hq, Hkv, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    return mk(B, Sq, Hq, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D)


# B, Sq, Sk, Hq, Hkv, causal, window, q_offset, q_stride, k_offset, k_stride
CASES = {
    "causal-gqa-tail": (2, 1000, 2113, 8, 2, True, None, 1113, 1, 0, 1),
    "striped-causal-window": (1, 777, 1500, 4, 1, True, 700, 1, 2, 0, 2),
    "mqa-two-sided-window-masked-rows": (2, 600, 1111, 4, 1, False, 300, 1200, 1, 0, 1),
    "plain-mha": (1, 513, 1025, 4, 4, False, None, 0, 1, 0, 1),
}


def test_merge_splits_gpu():
    """A short chunk against a long cached prefix, the keys split into 8 batch entries (the
    serving step's form): one merge_splits launch equals attention over the whole range in
    bf16, and equals the torch path's merge of the same partials to float32 rounding."""
    from ringserve.kernels import attention, merge_splits
    from ringserve.kernels.torch_ops import merge_splits_torch
    NB, L, S, H, D = 8, 1000, 192, 32, 128
    q, k, v = make(1, S, NB * L, H, 8, D, torch.bfloat16, seed=14)
    o, lse = attention(q.expand(NB, S, H, D), k.view(NB, L, 8, D), v.view(NB, L, 8, D))
    y, z = merge_splits(o, lse)
    ref_out, ref_lse = attention_ref(q, k, v, None, False)
    assert (y.double() - ref_out[0]).abs().max() < 2e-2
    assert (z.double() - ref_lse[0].t()).abs().max() < 2e-2
    yt, zt = merge_splits_torch(o, lse)
    assert (y - yt).abs().max() < 1e-5 and (z - zt).abs().max() < 1e-5


def test_merge_splits_with_the_chunk_part_into_the_output_gpu():
    """The serving step's one-launch merge in bf16: a 192-token chunk's 8 splits of its cached
    prefix and its own causal part, written into a slice of the step's bf16 output, equal
    attention over prefix + chunk, and the torch path's result to bf16 rounding."""
    from ringserve.kernels import attention, merge_splits
    from ringserve.kernels.torch_ops import merge_splits_torch
    NB, L, S, H, D = 8, 1000, 192, 32, 128
    q, k, v = make(1, S, NB * L + S, H, 8, D, torch.bfloat16, seed=15)
    kp, vp, kc, vc = k[:, :NB * L], v[:, :NB * L], k[:, NB * L:], v[:, NB * L:]
    o, lse = attention(q.expand(NB, S, H, D), kp.reshape(NB, L, 8, D), vp.reshape(NB, L, 8, D))
    oc, lc = attention(q, kc, vc, causal=True, q_offset=NB * L, k_offset=NB * L)
    step = torch.zeros(S + 8, H, D, dtype=torch.bfloat16, device="cuda")
    y, z = merge_splits(o, lse, extra=(oc[0], lc[0]), dest=step[4:4 + S])
    assert z is None
    ref_out, _ = attention_ref(q, k, v, None, True, None, NB * L)
    assert (step[4:4 + S].double() - ref_out[0]).abs().max() < 2e-2
    assert not step[:4].any() and not step[4 + S:].any()
    want = torch.empty(S, H, D, dtype=torch.bfloat16, device="cuda")
    merge_splits_torch(o, lse, extra=(oc[0], lc[0]), dest=want)
    assert (step[4:4 + S].float() - want.float()).abs().max() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_gpu(case, D, dtype):
    from ringserve.kernels.flash_fwd import flash_attn_fwd
    B, Sq, Sk, Hq, Hkv, causal, window, qo, qs, ko, ks = CASES[case]
    q, k, v = make(B, Sq, Sk, Hq, Hkv, D, dtype, seed=zlib.crc32(f"{case}{D}".encode()) % 10_000)
    ref_out, ref_lse = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks)
    lowp, _ = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks, dtype=dtype)
    # both load paths in bf16; fp16 takes the default (TMA where the layout allows)
    for use_tma in ((False, True) if dtype == torch.bfloat16 else (None,)):
        out, lse = flash_attn_fwd(q, k, v, None, causal, window, qo, qs, ko, ks,
                                  use_tma=use_tma, config=FIXED)
        assert out.dtype == dtype
        check_lowp(out, lse, ref_out, ref_lse, lowp, f"{case} D={D} tma={use_tma}")


def test_attention_gpu_fp32_is_exact():
    from ringserve.kernels.flash_fwd import flash_attn_fwd
    q, k, v = make(1, 300, 700, 4, 2, 64, torch.float32, seed=5)
    out, lse = flash_attn_fwd(q, k, v, None, True, None, 400, 1, 0, 1,
                              config={"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
    ref_out, ref_lse = attention_ref(q, k, v, None, True, None, 400, 1, 0, 1)
    rel = ((out.double() - ref_out).norm() / ref_out.norm()).item()
    assert rel < 1e-5, rel   # ieee fp32 products, not tf32 (~3e-4)
    assert (lse - ref_lse).abs().max().item() < 1e-4


@pytest.mark.parametrize("warp_specialize", [False, True])
def test_autotuned_default_path(warp_specialize):
    from ringserve.kernels import attention
    from ringserve.kernels.flash_fwd import flash_attn_fwd
    q, k, v = make(1, 2048, 4096, 8, 2, 128, torch.bfloat16, seed=8)
    ref_out, ref_lse = attention_ref(q, k, v, None, True, None, 2048, 1, 0, 1)
    lowp, _ = attention_ref(q, k, v, None, True, None, 2048, 1, 0, 1, dtype=torch.bfloat16)
    if warp_specialize:
        out, lse = flash_attn_fwd(q, k, v, None, True, None, 2048, 1, 0, 1, warp_specialize=True)
    else:
        out, lse = attention(q, k, v, None, True, None, 2048, 1, 0, 1)   # dispatch: triton on cuda
    check_lowp(out, lse, ref_out, ref_lse, lowp, f"autotuned ws={warp_specialize}")
    # once tuned, a call with the same key launches the chosen config directly (no autotuner
    # on the host's path): same config, same result
    from ringserve.kernels import flash_fwd as ff
    assert any(key[0] == warp_specialize for key in ff._chosen)
    out2, lse2 = flash_attn_fwd(q, k, v, None, True, None, 2048, 1, 0, 1,
                                warp_specialize=warp_specialize)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


def test_cascade_split_partials_gpu():
    """The served decode rows' attention in bf16 (8 questions on one 32K-token document, each
    with its own 300 tokens): both paged decodes' split partials merged in one launch into a
    slice of the step's output equal attention over own + document keys."""
    from ringserve.kernels import merge_splits, paged_decode, split_parts
    B, H, Hkv, D, page, own_len, doc_len = 8, 32, 8, 128, 16, 300, 32768
    g = torch.Generator(device="cuda").manual_seed(21)
    P = doc_len // page + B * (own_len // page + 1) + 4
    kc = torch.randn(P, page, Hkv, D, device="cuda", generator=g).bfloat16()
    vc = torch.randn(P, page, Hkv, D, device="cuda", generator=g).bfloat16()
    perm = torch.randperm(P, device="cuda", generator=g).int()
    dtab = perm[:doc_len // page][None]
    own_pages = -(-own_len // page)
    bt = perm[doc_len // page:doc_len // page + B * own_pages].view(B, own_pages)
    q = torch.randn(B, 1, H, D, device="cuda", generator=g).bfloat16()
    lens = torch.full((B,), own_len, dtype=torch.int32, device="cuda")
    own = paged_decode(q, kc, vc, bt, lens, splits=True)
    doc = paged_decode(q.transpose(0, 1), kc, vc, dtab,
                       torch.tensor([doc_len], dtype=torch.int32, device="cuda"), splits=True)
    step = torch.zeros(B + 4, H, D, dtype=torch.bfloat16, device="cuda")
    merge_splits(*split_parts(*doc), extra=split_parts(*own), dest=step[2:2 + B])
    dk, dv = kc[dtab[0].long()].reshape(-1, Hkv, D), vc[dtab[0].long()].reshape(-1, Hkv, D)
    for b in range(B):
        ok, ov = kc[bt[b].long()].reshape(-1, Hkv, D), vc[bt[b].long()].reshape(-1, Hkv, D)
        ref, _ = attention_ref(q[b:b + 1], torch.cat([ok, dk])[None], torch.cat([ov, dv])[None],
                               None, False)
        assert (step[2 + b].double() - ref[0, 0]).abs().max() < 2e-2, b
    assert not step[:2].any() and not step[2 + B:].any()


def test_cascade_document_part_unmasked_gpu():
    """kernels.cascade_decode_into in bf16 at the batch-16 step's shapes (16 questions x 4
    query heads a KV head on a 32K-token document, positions from the cache): its document
    part runs unmasked (shared_prefix_kw) and equals the same cascade with the causal mask and
    key positions kept, within a bf16 rounding of the output."""
    from ringserve import kernels
    B, H, Hkv, D, page, own_len, doc_len = 16, 32, 8, 128, 64, 40, 32768
    g = torch.Generator(device="cuda").manual_seed(24)
    P = doc_len // page + B + 4
    kc = torch.randn(P, page, Hkv, D, device="cuda", generator=g).bfloat16()
    vc = torch.randn(P, page, Hkv, D, device="cuda", generator=g).bfloat16()
    perm = torch.randperm(P, device="cuda", generator=g).int()
    dtab = perm[:doc_len // page][None]
    bt = perm[doc_len // page:doc_len // page + B][:, None]
    kv_pos = torch.zeros(P, page, dtype=torch.int32, device="cuda")
    kv_pos[dtab[0].long()] = torch.arange(doc_len, device="cuda", dtype=torch.int32).view(-1, page)
    kv_pos[bt[:, 0].long()] = doc_len + torch.arange(page, device="cuda", dtype=torch.int32)
    qpos = torch.full((B,), doc_len + own_len - 1, device="cuda", dtype=torch.int64)
    q = torch.randn(B, H, D, device="cuda", generator=g).bfloat16()
    lens = torch.full((B,), own_len, dtype=torch.int32, device="cuda")
    own = (bt, lens, qpos[:, None])
    doc = (dtab, torch.tensor([doc_len], dtype=torch.int32, device="cuda"), qpos[None])
    kw = dict(softmax_scale=D ** -0.5, causal=True, window_size=None, kv_pos=kv_pos,
              positions_sorted=True)
    out = kernels.cascade_decode_into(q[:, None], q[None], kc, vc, own, doc,
                                      torch.empty_like(q), **kw)
    o_own = kernels.paged_decode(q[:, None], kc, vc, *own[:2], q_pos=own[2], splits=True, **kw)
    o_doc = kernels.paged_decode(q[None], kc, vc, *doc[:2], q_pos=doc[2], splits=True, **kw)
    masked = torch.empty_like(q)
    kernels.merge_splits(*kernels.split_parts(*o_doc), extra=kernels.split_parts(*o_own),
                         dest=masked)
    # one bf16 rounding apart at most, element by element (the partials agree in fp32)
    diff = (out.float() - masked.float()).abs()
    assert bool((diff <= masked.float().abs() * 2 ** -7 + 1e-6).all()), diff.max().item()
    assert masked.float().abs().max().item() > 1e-3    # not an empty output


def test_merge_striped_ring_gpu():
    from ringserve.kernels import attention, merge_
    N, total, H, D = 4, 3001, 8, 128
    q, k, v = make(1, total, total, H, 2, D, torch.bfloat16, seed=12)
    ref_out, ref_lse = attention_ref(q, k, v, None, True)
    for r in range(N):
        qr = q[:, r::N]
        acc = torch.zeros(qr.shape, dtype=torch.float32, device="cuda")
        acc_lse = torch.full((1, H, qr.shape[1]), float("-inf"), device="cuda")
        for src in [(r - s) % N for s in range(N)]:
            o, l = attention(qr, k[:, src::N], v[:, src::N], None, True, None, r, N, src, N)
            merge_(acc, acc_lse, o, l)
        assert (acc.double() - ref_out[:, r::N]).abs().max() < 2e-2
        assert (acc_lse - ref_lse[:, :, r::N]).abs().max() < 2e-2
    # the merge kernel itself, fp32, with -inf on both sides
    g = torch.Generator(device="cuda").manual_seed(3)
    oa, ob = (torch.randn(2, 100, 8, 128, device="cuda", generator=g) for _ in range(2))
    la, lb = (torch.randn(2, 8, 100, device="cuda", generator=g) for _ in range(2))
    la[0, :, :10] = float("-inf")
    lb[0, :, 5:20] = float("-inf")
    ro, rl = merge_ref(oa, la, ob, lb)
    merge_(oa, la, ob, lb)
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(la), fin)
    assert (oa.double() - ro).abs().max() < 1e-5 and (la[fin] - rl[fin]).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Sq,masked", [(1, False), (4, True)])
def test_paged_decode_gpu(Sq, masked, D, dtype):
    from ringserve.kernels.flash_decode import paged_decode_triton
    g = torch.Generator(device="cuda").manual_seed(D + Sq)
    B, Hq, Hkv, page = 3, 32, 8, 16
    lens = [8191, 5000, 0]
    max_pages = 513
    P = B * max_pages + 5
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    kc, vc, q = mk(P, page, Hkv, D), mk(P, page, Hkv, D), mk(B, Sq, Hq, D)
    bt = torch.randperm(P, device="cuda", generator=g)[:B * max_pages].view(B, max_pages).int()
    sl = torch.tensor(lens, device="cuda", dtype=torch.int32)
    qp = kp = None
    window = None
    if masked:
        kp = torch.randperm(P * page, device="cuda", generator=g).view(P, page)
        qp = torch.randint(0, P * page, (B, Sq), device="cuda", generator=g)
        window = 20_000
    out, lse = paged_decode_triton(q, kc, vc, bt, sl, None, masked, window, qp, kp)
    ref_out, ref_lse = paged_decode_ref(q, kc, vc, bt, sl, None, masked, window, qp, kp)
    lowp, _ = paged_decode_ref(q, kc, vc, bt, sl, None, masked, window, qp, kp, dtype=dtype)
    check_lowp(out, lse, ref_out.to(out.device), ref_lse.to(out.device), lowp.to(out.device),
               f"decode Sq={Sq} D={D}")


# Blocks the ring produces (striped: offsets differ by < stride; contiguous diagonal / past
# blocks), plus ones cuDNN cannot express (window, c > 0) that must fall back to Triton exactly.
CUDNN_CASES = {
    "striped-own": (1, 1024, 1024, 8, 2, True, None, 1, 2, 1, 2),
    "striped-earlier-rank": (1, 1025, 1025, 8, 2, True, None, 0, 2, 1, 2),   # drops row 0
    "striped-later-rank": (1, 1024, 1025, 8, 2, True, None, 1, 2, 0, 2),
    "ring-past-block": (2, 700, 900, 4, 4, True, None, 900, 1, 0, 1),       # fully visible
    "non-causal-mqa": (1, 513, 777, 8, 1, False, None, 0, 1, 0, 1),
    "window-falls-back": (1, 777, 1500, 4, 1, True, 700, 1, 2, 0, 2),
    "c-positive-falls-back": (1, 600, 1111, 4, 1, True, None, 1200, 1, 1000, 1),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CUDNN_CASES))
def test_cudnn_backend_exact(case, dtype):
    from ringserve import kernels
    from ringserve.kernels import cudnn_attn
    B, Sq, Sk, Hq, Hkv, causal, window, qo, qs, ko, ks = CUDNN_CASES[case]
    q, k, v = make(B, Sq, Sk, Hq, Hkv, 128, dtype, seed=zlib.crc32(case.encode()) % 10_000)
    ref_out, ref_lse = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks)
    lowp, _ = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks, dtype=dtype)
    out, lse = kernels.attention(q, k, v, None, causal, window, qo, qs, ko, ks, backend="cudnn")
    assert cudnn_attn._BROKEN is None, cudnn_attn._BROKEN  # cuDNN really ran (no fallback)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    check_lowp(out, lse, ref_out, ref_lse, lowp, f"cudnn {case}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [128, 256])
def test_softcap_gpu(D, dtype):
    """Gemma 2's soft-capping (scores 50 * tanh(s / 50), inputs scaled so that it bites) in the
    flash forward (fixed config and autotuned, windowed and global) and the paged decode, head
    dims 128 and Gemma's 256; cuDNN asked for falls back to Triton."""
    from ringserve.kernels import attention
    from ringserve.kernels.flash_decode import paged_decode_triton
    from ringserve.kernels.flash_fwd import flash_attn_fwd
    cap = 50.0
    q, k, v = make(1, 1000, 2113, 8, 4, D, dtype, seed=D)
    q = (q.float() * 8).to(dtype)
    for window in (None, 700):
        ref_out, ref_lse = attention_ref(q, k, v, None, True, window, 1113, 1, 0, 1, softcap=cap)
        lowp, _ = attention_ref(q, k, v, None, True, window, 1113, 1, 0, 1, dtype=dtype,
                                softcap=cap)
        plain, _ = attention_ref(q, k, v, None, True, window, 1113, 1, 0, 1)
        assert (plain - ref_out).abs().max() > 0.05
        cfg = ({"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2} if D == 256
               else FIXED)
        for out, lse in (flash_attn_fwd(q, k, v, None, True, window, 1113, 1, 0, 1, config=cfg,
                                        softcap=cap),
                         attention(q, k, v, None, True, window, 1113, 1, 0, 1, softcap=cap),
                         attention(q, k, v, None, True, window, 1113, 1, 0, 1, softcap=cap,
                                   backend="cudnn")):
            check_lowp(out, lse, ref_out, ref_lse, lowp, f"softcap D={D} window={window}")
    g = torch.Generator(device="cuda").manual_seed(7)
    B, page, P = 2, 16, 700
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    kc, vc, qd = mk(P, page, 4, D), mk(P, page, 4, D), (mk(B, 2, 8, D).float() * 8).to(dtype)
    bt = torch.randperm(P, device="cuda", generator=g)[:B * 300].view(B, 300).int()
    sl = torch.tensor([4700, 3001], device="cuda", dtype=torch.int32)
    out, lse = paged_decode_triton(qd, kc, vc, bt, sl, None, True, None, softcap=cap)
    ref_out, ref_lse = paged_decode_ref(qd, kc, vc, bt, sl, None, True, None, softcap=cap)
    lowp, _ = paged_decode_ref(qd, kc, vc, bt, sl, None, True, None, dtype=dtype, softcap=cap)
    check_lowp(out, lse, ref_out.to(out.device), ref_lse.to(out.device), lowp.to(out.device),
               f"softcap decode D={D}")


@pytest.mark.parametrize("sq", [1, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_latent_paged_decode_gpu(dtype, sq):
    """MLA's absorbed decode (DeepSeek-V2-Lite: 16 heads on one 576-wide latent head, values =
    keys) compiles and is exact by the 2x rule, in its own kernel (`paged_decode(backend=
    "auto")`, no fallback warning) and in the general wide one. sq=8: 128 query rows a KV
    head, the engine warm-up's shape that asked for more shared memory than the H200 has
    (session 11)."""
    import warnings
    from ringserve import kernels
    from ringserve.kernels.flash_decode import paged_decode_triton
    g = torch.Generator(device="cuda").manual_seed(11)
    B, page, P, D = 2, 64, 300, 576
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dtype)  # noqa: E731
    kc, q = mk(P, page, 1, D), mk(B, sq, 16, D)
    bt = torch.randperm(P, device="cuda", generator=g)[:B * 140].view(B, 140).int()
    sl = torch.tensor([8900, 4000], device="cuda", dtype=torch.int32)
    ref_out, ref_lse = paged_decode_ref(q, kc, kc, bt, sl, 0.07, False, None)
    lowp, _ = paged_decode_ref(q, kc, kc, bt, sl, 0.07, False, None, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = kernels.paged_decode(q, kc, kc, bt, sl, 0.07)
    assert "paged_decode" not in kernels._WIDE_BROKEN
    assert "paged_decode_latent" not in kernels._WIDE_BROKEN
    check_lowp(out, lse, ref_out.to(out.device), ref_lse.to(out.device), lowp.to(out.device),
               "latent decode")
    out, lse = paged_decode_triton(q, kc, kc, bt, sl, 0.07, latent=False)   # the general kernel
    check_lowp(out, lse, ref_out.to(out.device), ref_lse.to(out.device), lowp.to(out.device),
               "latent decode, general kernel")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_latent_attention_gpu(dtype):
    """MLA's absorbed prefill block (16 heads on one 576-wide latent head, values = keys), causal
    and a past block, through `attention(backend="auto")`: the wide-head Triton forward compiles
    (no fallback) and is exact by the 2x rule."""
    import warnings
    from ringserve import kernels
    q, k, _ = make(1, 1000, 2113, 16, 1, 576, dtype, seed=21)
    for causal, qo in ((True, 1113), (False, 0)):
        ref_out, ref_lse = attention_ref(q, k, k, 0.07, causal, None, qo, 1, 0, 1)
        lowp, _ = attention_ref(q, k, k, 0.07, causal, None, qo, 1, 0, 1, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, lse = kernels.attention(q, k, k, 0.07, causal, None, qo, 1, 0, 1)
        assert "attention" not in kernels._WIDE_BROKEN
        check_lowp(out, lse, ref_out, ref_lse, lowp, f"latent attention causal={causal}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expanded_mla_attention_gpu(dtype):
    """MLA's expanded prefill block: 16 heads, keys 192 wide and values 128 (their own head
    dim in the kernel), causal and a past block, autotuned (the configs of the 256-wide tile,
    with a third stage for narrower values): exact by the 2x rule."""
    from ringserve import kernels
    q, k, _ = make(1, 1000, 2113, 16, 16, 192, dtype, seed=23)
    v = make(1, 1, 2113, 1, 16, 128, dtype, seed=24)[2]
    for causal, qo in ((True, 1113), (False, 0)):
        ref_out, ref_lse = attention_ref(q, k, v, 0.07, causal, None, qo, 1, 0, 1)
        lowp, _ = attention_ref(q, k, v, 0.07, causal, None, qo, 1, 0, 1, dtype=dtype)
        out, lse = kernels.attention(q, k, v, 0.07, causal, None, qo, 1, 0, 1)
        assert out.shape == (1, 1000, 16, 128)
        check_lowp(out, lse, ref_out, ref_lse, lowp, f"expanded MLA causal={causal}")


# ---- the fused decode kernels (kernels/fused.py) in bf16 ----

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_gpu(dtype):
    """RMSNorm (+ residual), RoPE + q/k norm + KV store, act * up at the 8B shape's widths:
    within 2x the torch path's error against float64, the residual update and the store
    exactly the torch ones."""
    from ringserve.config import RopeConfig
    from ringserve.kernels.fused import act_mul_triton, rms_norm_triton, rope_store_triton
    from ringserve.kernels.reference import act_mul_ref, rms_norm_ref, rope_ref
    from ringserve.model import RMSNorm
    from ringserve.rope import Rotary

    g = torch.Generator(device="cuda").manual_seed(7)
    mk = lambda *s, sc=1.0: (torch.randn(*s, device="cuda", generator=g) * sc).to(dtype)  # noqa: E731

    def ok(got, want64, torch_path, what):
        err = (got.double() - want64).abs().max().item()
        base = (torch_path.double() - want64).abs().max().item()
        assert err <= 2 * base + 1e-6 * want64.abs().max().item(), f"{what}: {err} vs {base}"

    for T, N, plus_one in ((1, 4096, False), (13, 4096, True), (64, 3584, False)):
        h, r, w = mk(T, N, sc=3.0), mk(T, N), mk(N, sc=0.3) + (0 if plus_one else 1)
        norm = RMSNorm(N, 1e-5, plus_one, dtype=dtype, device="cuda")
        norm.weight.data.copy_(w)
        ht = h + r
        got = rms_norm_triton(h, w, 1e-5, plus_one, residual=r)
        assert torch.equal(h, ht)
        ok(got, rms_norm_ref(ht, w, 1e-5, plus_one), norm(ht), f"rms_norm {T}x{N}")
        if plus_one:   # Gemma's sandwich: the residual normed by its own weight first
            rw = mk(N, sc=0.3)
            rnorm = RMSNorm(N, 1e-6, True, dtype=dtype, device="cuda")
            rnorm.weight.data.copy_(rw)
            h2 = mk(T, N, sc=3.0)
            ht2 = h2 + rnorm(r)
            got2 = rms_norm_triton(h2, w, 1e-5, True, residual=r, residual_weight=rw,
                                   residual_eps=1e-6)
            assert (h2.float() - ht2.float()).abs().max() <= 2 * ht2.float().abs().max() \
                * torch.finfo(dtype).eps
            ok(got2, rms_norm_ref(ht2, w, 1e-5, True), norm(ht2), f"sandwich {T}x{N}")
    for T, Hq, Hkv, D, qkn in ((1, 32, 8, 128, False), (16, 32, 8, 128, True),
                               (3, 16, 8, 256, False)):
        q, k, v = mk(T, Hq, D, sc=2.0), mk(T, Hkv, D, sc=2.0), mk(T, Hkv, D)
        cos, sin = Rotary(RopeConfig(theta=5e5), D).cos_sin(
            torch.randint(0, 1 << 20, (T,), device="cuda"))
        kc, vc = (torch.zeros(4 * T, Hkv, D, device="cuda", dtype=dtype) for _ in range(2))
        slots = torch.randperm(4 * T, device="cuda")[:T]
        qw = kw = None
        qn, kn = q, k
        if qkn:
            qw, kw = mk(D, sc=0.3) + 1, mk(D, sc=0.3) + 1
            nq, nk = (RMSNorm(D, 1e-6, dtype=dtype, device="cuda") for _ in range(2))
            nq.weight.data.copy_(qw)
            nk.weight.data.copy_(kw)
            qn, kn = nq(q), nk(k)
        qo, ko, vo = rope_store_triton(q, k, v, cos, sin, kc, vc, slots, q_norm=qw,
                                       k_norm=kw, eps=1e-6)
        assert torch.equal(vo, v)
        ok(qo, rope_ref(qn, cos, sin), Rotary.apply(qn, cos, sin), f"rope q {T}x{Hq}x{D}")
        ok(ko, rope_ref(kn, cos, sin), Rotary.apply(kn, cos, sin), f"rope k {T}x{Hkv}x{D}")
        assert torch.equal(kc[slots], ko) and torch.equal(vc[slots], v)
    from ringserve.kernels.fused import latent_rope_triton
    for T, H in ((1, 16), (5, 128)):       # MLA at DeepSeek-V2(-Lite)'s widths: 512 + 64
        q_lat = mk(H, T, 512).transpose(0, 1)
        q_pe, kv = mk(T, H, 192, sc=2.0)[..., 128:], mk(T, 576, sc=2.0)
        c, k_pe = mk(T, 512), kv[:, 512:]
        cos, sin = Rotary(RopeConfig(theta=1e4), 64).cos_sin(
            torch.randint(0, 1 << 17, (T,), device="cuda"))
        q, k = latent_rope_triton(q_lat, q_pe, c, k_pe, cos, sin)
        assert torch.equal(q[..., :512], q_lat) and torch.equal(k[:, 0, :512], c)
        for got, x in ((q[..., 512:], q_pe), (k[:, 0, 512:], k_pe[:, None])):
            xd = x.double().unflatten(-1, (-1, 2))
            a, b, cc, ss = xd[..., 0], xd[..., 1], cos.double(), sin.double()
            want = torch.stack([a * cc - b * ss, b * cc + a * ss], dim=-1).flatten(-2)
            tp = Rotary.apply_interleaved(x, cos, sin)
            ok(got.reshape(tp.shape), want, tp, f"latent rope {T}x{H}")
        # W_UK's absorption inside the launch (DeepSeek's 128-wide q_nope, kv_b_proj's view)
        q_full, w_kv = mk(T, H, 192), mk(H, 256, 512, sc=512 ** -0.5)
        q_nope, w_uk = q_full[..., :128], w_kv[:, :128]
        want = torch.einsum("thn,hnc->thc", q_nope.double(), w_uk.double())
        for blocks in (None, (8, 32), (16, 128), (32, 64)):    # (bench_gemv's sweep's tiles)
            qa, ka = latent_rope_triton(None, q_pe, c, k_pe, cos, sin, absorb=(q_nope, w_uk),
                                        absorb_blocks=blocks)
            ok(qa[..., :512], want, torch.einsum("thn,hnc->thc", q_nope, w_uk),
               f"latent rope absorbed {T}x{H} {blocks}")
            assert torch.equal(qa[..., 512:], q[..., 512:]) and torch.equal(ka, k)
    for T, N, gelu in ((1, 14336, False), (9, 14336, True)):
        gu = mk(T, 2 * N, sc=3.0)
        gate, up = gu.chunk(2, dim=-1)
        act = (torch.nn.functional.gelu(gate, approximate="tanh") if gelu
               else torch.nn.functional.silu(gate))
        ok(act_mul_triton(gate, up, gelu), act_mul_ref(gate, up, gelu), act * up, f"act {T}")


@pytest.mark.parametrize("arch,B,fold", [("qwen3", 8, 0), ("qwen3", 1, 1), ("qwen3_moe", 1, 0),
                                         ("qwen3_moe", 1, 1)])
def test_fused_decode_graph_gpu(arch, B, fold, monkeypatch):
    """The model's fused few-token path on the GPU (bf16): hidden states within twice the torch
    path's error against float32 ones, and the same step captured in a CUDA graph (the store
    into the pool included) replays to the eager result. fold (one token,
    RINGSERVE_FOLD_ROWS=1): the input norm inside the q|k|v GEMV; with MoE layers the
    o_proj's residual add and the MLP's norm and add inside the router's and experts'
    launches too."""
    from ringserve.config import ModelConfig
    from ringserve.kernels import gemv as gemv_mod
    monkeypatch.setattr(gemv_mod, "FOLD_MAX_ROWS", fold)
    from ringserve.kv_cache import KVCacheConfig, KVPool
    from ringserve.model import CausalLM

    moe = dict(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    cfg = ModelConfig.from_hf_dict(dict(
        architectures=["Qwen3MoeForCausalLM" if arch == "qwen3_moe" else "Qwen3ForCausalLM"],
        model_type=arch, vocab_size=1000,
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=1 << 17, hidden_act="silu", tie_word_embeddings=False,
        **(moe if arch == "qwen3_moe" else {})))
    torch.manual_seed(0)
    m32 = CausalLM(cfg, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        for name, p in m32.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name
                    else torch.randn_like(p) / p.shape[-1] ** 0.5)
    m = CausalLM(cfg, dtype=torch.bfloat16, device="cuda")
    m.load_state_dict(m32.state_dict())
    if B == 1:
        m.join_weights()      # q|k|v one GEMM (with fold: a GEMV the input norm folds into)
    ids = torch.randint(0, 1000, (B,), device="cuda")
    pos = torch.randint(0, 100000, (B,), device="cuda")
    pool = KVPool(KVCacheConfig(num_layers=4, num_kv_heads=8, head_dim=128, num_pages=4,
                                page_size=16, dtype=torch.bfloat16, device="cuda"))
    slots = torch.arange(B, device="cuda") * 3

    class Attn:   # stores (through rope_store on the fused path); attends each row to itself
        stored = -1

        def rope_store(self, layer, q, k, v, cos, sin, **norm):
            from ringserve.kernels.fused import rope_store_triton
            self.stored = layer
            return rope_store_triton(q, k, v, cos, sin, *pool.slot_views(layer), slots,
                                     **norm)

        def __call__(self, layer, q, k, v):
            if self.stored != layer:     # the torch path: no rope_store, store here
                pool.write(layer, slots, k[0], v[0])
            return pool.v[layer].view(-1, 8, 128)[slots].repeat_interleave(2, dim=1)[None]

    def run(model, backend):
        model.backend = backend
        return model(ids, pos, Attn())

    ref = run(m32, "torch").double()
    base = (run(m, "torch").double() - ref).abs().max().item()
    eager = run(m, "triton")
    assert (eager.double() - ref).abs().max().item() <= 2 * base + 1e-3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(m, "triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(m, "triton")
    pool.k.zero_()
    pool.v.zero_()
    graph.replay()
    torch.cuda.synchronize()
    # the replay recomputed it (the attention reads the values that its own store wrote)
    assert (out.float() - eager.float()).abs().max().item() <= 1e-3 * eager.abs().max().item()
    assert pool.k[:, 0, 0].abs().sum() > 0     # the replay stored slot 0's keys again


def test_pdl_chain_in_a_graph_gpu(monkeypatch):
    """Programmatic dependent launch (kernels/pdl.py, inside graph captures, opt-in) on a
    Hopper GPU: the probe finds it, and a chain of 40 dependent small kernels (RMSNorm with a
    residual add, GEMV, the MoE router, the greedy pick, each reading the one before it in
    full), captured in a CUDA graph and replayed on new inputs, gives bitwise the outputs of
    the same chain launched without it (a kernel that ran ahead of its predecessor's writes
    would read stale rows)."""
    from ringserve.kernels import pdl
    from ringserve.kernels.fused import rms_norm_triton
    from ringserve.kernels.gemv import gemv
    from ringserve.kernels.greedy import greedy_pick
    from ringserve.kernels.grouped_gemm import moe_route
    dev = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs Hopper or later")
    monkeypatch.setenv("RINGSERVE_PDL", "1")     # opt-in
    monkeypatch.setattr(pdl, "_checked", {})
    assert pdl.pdl_kw(dev) is pdl.OFF      # eager: no PDL (graphs only), but probed
    assert pdl._checked.get(dev) is True, "triton on this GPU launches without PDL"
    g = torch.Generator(device="cuda").manual_seed(9)
    H = 2048
    ws = [torch.randn(H, H, device="cuda", generator=g).bfloat16() / H ** 0.5 for _ in range(4)]
    nw = torch.ones(H, device="cuda", dtype=torch.bfloat16)
    router = torch.randn(64, H, device="cuda", generator=g).bfloat16()
    x0 = torch.randn(1, H, device="cuda", generator=g).bfloat16()

    def chain(x):
        h = x.clone()
        outs = []
        for i in range(10):
            y = gemv(rms_norm_triton(h, nw, 1e-6), ws[i % 4])
            rms_norm_triton(h, nw, 1e-6, residual=y)            # h += y, in place
            w, idx = moe_route(gemv(h, router, out_dtype=torch.float32), 6, False)
            outs += [w, idx, greedy_pick(h.float())[0]]
        return torch.cat([h.float().flatten()] + [o.float().flatten() for o in outs])

    def graphed():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain(x0)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x0)
        return graph, out

    g_on, out_on = graphed()
    saved = dict(pdl._checked)
    pdl._checked[dev] = False
    try:
        g_off, out_off = graphed()
        eager_off = chain(x0)
    finally:
        pdl._checked.clear()
        pdl._checked.update(saved)
    for _ in range(3):
        x0.copy_(torch.randn(1, H, device="cuda", generator=g).bfloat16())
        g_on.replay()
        g_off.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_on, out_off)
    assert not torch.equal(out_on, eager_off)     # the replays did recompute from new inputs
    assert torch.equal(chain(x0), out_on)          # and eager (without PDL) agrees


def test_fast_launch_equals_triton_path():
    """kernels._host.FastLaunch: the second launch of each hot kernel with the same
    specialization goes straight to the compiled launcher, and gives the same bits as the
    first (triton's path), on fresh inputs of the same shapes; a new specialization (an odd
    length) goes through triton again and is right too."""
    from ringserve.kernels import flash_decode, flash_fwd, fused, merge
    from ringserve.kernels.fused import act_mul_triton, rms_norm_triton, rope_store_triton
    g = torch.Generator(device="cuda").manual_seed(5)
    bf = torch.bfloat16

    def rnd(*s, dtype=bf):
        return torch.randn(*s, device="cuda", generator=g).to(dtype)

    def runs(call, fast):
        a = call()
        before = fast.direct
        b = call()
        assert fast.direct == before + 1, fast.fn
        for x, y in zip(a, b):
            assert torch.equal(x, y), fast.fn
        return a

    q, k, v = rnd(1, 200, 8, 128), rnd(1, 1000, 2, 128), rnd(1, 1000, 2, 128)
    o, lse = runs(lambda: flash_fwd.flash_attn_fwd(q, k, v, causal=True, config=FIXED),
                  flash_fwd._flash_fwd_fast)
    ro, rl = attention_ref(q, k, v, causal=True)
    assert (o.double() - ro).abs().max().item() < 2e-2
    # the autotuned path: its first call for a key tunes (the tuner launches), and only
    # later calls launch the chosen config through FastLaunch (the first of them through
    # triton's path): two calls first, whatever ran before in this process
    for _ in range(2):
        flash_fwd.flash_attn_fwd(q, k, v, causal=False)
    runs(lambda: flash_fwd.flash_attn_fwd(q, k, v, causal=False), flash_fwd._flash_fwd_fast)
    kc, vc = rnd(64, 16, 2, 128), rnd(64, 16, 2, 128)
    table = torch.randperm(64, device="cuda", generator=g).to(torch.int32).view(4, 16)
    lens = torch.tensor([250, 17, 256, 100], dtype=torch.int32, device="cuda")
    qd = rnd(4, 1, 8, 128)
    runs(lambda: flash_decode.paged_decode_triton(qd, kc, vc, table, lens),
         flash_decode._decode_split_fast)
    parts = (rnd(3, 33, 8, 128, dtype=torch.float32), rnd(3, 8, 33, dtype=torch.float32))
    runs(lambda: merge.merge_splits_triton(*parts), merge._merge_splits_fast)
    x, w = rnd(37, 512), rnd(512)
    runs(lambda: (rms_norm_triton(x, w, 1e-5),), fused._rms_norm_fast)
    cos, sin = rnd(37, 1, 64, dtype=torch.float32), rnd(37, 1, 64, dtype=torch.float32)
    qr, kr, vr = rnd(37, 8, 128), rnd(37, 2, 128), rnd(37, 2, 128)
    runs(lambda: rope_store_triton(qr, kr, vr, cos, sin), fused._rope_store_fast)
    runs(lambda: (act_mul_triton(x[:, :300], x[:, 200:500]),), fused._act_mul_fast)
    from ringserve.kernels import gemv as gemv_mod, grouped_gemm
    xr, wg = rnd(1, 2048), rnd(3648, 2048)    # one row, DeepSeek's q|kv_a: 3 stages
    y = runs(lambda: (gemv_mod.gemv(xr, wg),), gemv_mod._gemv_fast)[0]
    # y is rounded to bf16: |y| reaches ~4 sqrt(2048), whose bf16 step is 0.25
    torch.testing.assert_close(y.float(), xr.float() @ wg.float().t(), rtol=1e-2, atol=2e-2)
    gu, dn = rnd(8, 2 * 256, 512) * 0.05, rnd(8, 512, 256) * 0.05
    idx = torch.tensor([[1, 5]], device="cuda")
    wt = torch.tensor([[0.7, 0.3]], device="cuda")
    runs(lambda: (grouped_gemm.moe_gemv(xr[:, :512], gu, dn, idx, wt),),
         grouped_gemm._moe_down_fast)
    # another specialization (odd row count and strides): triton's path, then direct
    x2 = rnd(13, 511)
    y = runs(lambda: (rms_norm_triton(x2, w[:511], 1e-5),), fused._rms_norm_fast)[0]
    ref = (x2.float() * torch.rsqrt(x2.float().pow(2).mean(-1, keepdim=True) + 1e-5)
           * w[:511].float())
    assert ((y.float() - ref).abs() <= 0.02 * ref.abs() + 0.02).all()


def _moe_layer(x, gu, dn, idx, w):
    """A MoE layer's routed experts one (token, expert) at a time, in x's dtype (float64 for
    the reference; float32 sums over the experts otherwise, as the grouped path)."""
    T, H = x.shape
    inter = dn.shape[-1]
    y = torch.zeros(T, H, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                    device=x.device)
    for t in range(T):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = gu[e] @ x[t]
            a = torch.nn.functional.silu(h[:inter]) * h[inter:]
            y[t] += w[t, j].to(y.dtype) * (dn[e] @ a).to(y.dtype)
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_pick_gpu(dtype):
    """Greedy picks over Llama-3's 128,256-token vocabulary, a batch of 5: torch.argmax's ids
    (ties: the first), log-probs as torch's log_softmax in float32."""
    from ringserve.kernels.greedy import greedy_pick
    g = torch.Generator(device="cuda").manual_seed(6)
    x = (torch.randn(5, 128256, device="cuda", generator=g) * 4).to(dtype)
    x[1, 100000] = x[1, 7] = x[1].max() + 1
    toks, lps = greedy_pick(x)
    want = torch.argmax(x.float(), dim=-1)
    assert torch.equal(toks, want) and toks[1].item() == 7
    ref = torch.log_softmax(x.float(), dim=-1).gather(1, want[:, None])[:, 0]
    assert torch.allclose(lps, ref, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_gpu(dtype):
    """The few-row GEMV in bf16 / fp16 at a Qwen3-30B-A3B o_proj's shape (2048 x 4096) and a
    ragged one with bias, 1-4 rows and every tile bench_gemv.py sweeps (some with the K loop
    pipelined over 2-4 stages): within 2x the error of F.linear in the same dtype against
    float64."""
    import itertools

    from ringserve.kernels.gemv import gemv
    g = torch.Generator(device="cuda").manual_seed(4)
    for (N, K, bias), M in itertools.product(((2048, 4096, False), (1000, 1100, True)), (1, 3)):
        x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
        w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(dtype)
        b = torch.randn(N, device="cuda", generator=g).to(dtype) if bias else None
        ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        base = (torch.nn.functional.linear(x, w, b).double() - ref).abs().max().item()
        tiles = list(itertools.product((1, 2, 4, 8), (256, 512), (4, 8)))
        # and the K loop software-pipelined (bench_gemv's stages)
        tiles += [t + (s,) for t in ((4, 512, 4), (8, 256, 4), (2, 512, 8)) for s in (2, 3, 4)]
        for blocks in tiles:
            if (4 if M > 1 else 1) * blocks[0] * blocks[1] > 8192:
                continue
            err = (gemv(x, w, b, blocks=blocks).double() - ref).abs().max().item()
            assert err <= 2 * base + 1e-3, (N, K, M, blocks, err, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_gemv_gpu(dtype):
    """MLA's absorption by head_gemv at DeepSeek-V2-Lite's shape (16 heads; W_UK 128 x 512 read
    transposed, W_UV 128 x 512), 1 and 4 rows, every tile bench_gemv.py sweeps for it: within
    2x the error of the einsum in the same dtype against float64."""
    from ringserve.kernels.gemv import head_gemv
    g = torch.Generator(device="cuda").manual_seed(8)
    kv_b = (torch.randn(16 * 256, 512, device="cuda", generator=g) / 512 ** 0.5).to(dtype)
    w = kv_b.view(16, 256, 512)
    for M in (1, 4):
        q = torch.randn(M, 16, 192, device="cuda", generator=g).to(dtype)
        o = torch.randn(M, 16, 576, device="cuda", generator=g).to(dtype)
        for x, wt in ((q[..., :128], w[:, :128].transpose(1, 2)), (o[..., :512], w[:, 128:])):
            ref = torch.einsum("thk,hnk->thn", x.double(), wt.double())
            base = (torch.einsum("thk,hnk->thn", x, wt).double() - ref).abs().max().item()
            for blocks in [None] + HEAD_GEMV_SWEEP:
                err = (head_gemv(x, wt, blocks=blocks).double() - ref).abs().max().item()
                assert err <= 2 * base + 1e-3, (M, blocks, err, base)


HEAD_GEMV_SWEEP = [(4, 512, 4), (8, 256, 4), (2, 512, 4), (16, 128, 4), (32, 64, 4),
                   (64, 32, 4), (128, 16, 4), (64, 64, 4), (128, 32, 8), (32, 32, 2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_gemv_gpu(dtype):
    """The few-token MoE layer in bf16 / fp16 at the Qwen3-30B-A3B shape (128 experts, top-8,
    hidden 2048, expert width 768), one and four tokens: within 2x the error of a plain torch
    computation in the same dtype against float64."""
    from ringserve.kernels.grouped_gemm import moe_gemv
    g = torch.Generator(device="cuda").manual_seed(3)
    E, H, inter, k = 128, 2048, 768, 8
    gu = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) / H ** 0.5).to(dtype)
    dn = (torch.randn(E, H, inter, device="cuda", generator=g) / inter ** 0.5).to(dtype)
    for T in (1, 4):
        x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
        idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
        w = torch.softmax(torch.randn(T, k, device="cuda", generator=g), -1)
        ref = _moe_layer(x.double(), gu.double(), dn.double(), idx, w)
        base = (_moe_layer(x, gu, dn, idx, w).to(dtype).double() - ref).abs().max().item()
        # the default tiles, then both K loops pipelined (bench_moe_gemv's stages)
        for blocks in (None, (4, 256, 4, 1, 128, 4, False, 3, 2),
                       (8, 256, 4, 4, 128, 4, True, 4, 4)):
            out = moe_gemv(x, gu, dn, idx, w, blocks=blocks)
            err = (out.double() - ref).abs().max().item()
            assert err <= 2 * base + 1e-3, (T, blocks, err, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_gemv_shared_gpu(dtype):
    """DeepSeek-V2-Lite's MoE layer (64 experts, top-6, width 1408, hidden 2048, two shared
    experts as one 2816-wide MLP) with the shared MLP inside moe_gemv's launches, one and four
    tokens: within 2x the error of plain torch in the same dtype (routed sum plus the shared
    MLP) against float64."""
    from ringserve.kernels.grouped_gemm import moe_gemv
    g = torch.Generator(device="cuda").manual_seed(7)
    E, H, inter, k, n = 64, 2048, 1408, 6, 2
    gu = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) / H ** 0.5).to(dtype)
    dn = (torch.randn(E, H, inter, device="cuda", generator=g) / inter ** 0.5).to(dtype)
    sgu = (torch.randn(2 * n * inter, H, device="cuda", generator=g) / H ** 0.5).to(dtype)
    sd = (torch.randn(H, n * inter, device="cuda", generator=g) / (n * inter) ** 0.5).to(dtype)

    def shared_mlp(x):
        gate, up = (x @ sgu.to(x.dtype).t()).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ sd.to(x.dtype).t()
    for T in (1, 4):
        x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
        idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:k] for _ in range(T)])
        w = torch.softmax(torch.randn(T, k, device="cuda", generator=g), -1)
        out = moe_gemv(x, gu, dn, idx, w, shared=(sgu, sd, n))
        ref = _moe_layer(x.double(), gu.double(), dn.double(), idx, w) + shared_mlp(x.double())
        plain = (_moe_layer(x, gu, dn, idx, w) + shared_mlp(x).float()).to(dtype)
        base = (plain.double() - ref).abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= 2 * base + 1e-3, (T, err, base)


def test_moe_route_gpu():
    """The few-token router at Qwen3-30B-A3B's 128 experts, top-8, renormalised, and
    DeepSeek-V2-Lite's 64, top-6, not: the same experts as a stable descending sort of torch's
    softmax, weights within float32 rounding."""
    from ringserve.kernels.grouped_gemm import moe_route
    g = torch.Generator(device="cuda").manual_seed(5)
    for E, k, renorm in ((128, 8, True), (64, 6, False)):
        for T in (1, 4, 32):
            logits = torch.randn(T, E, device="cuda", generator=g) * 2
            w, idx = moe_route(logits, k, renorm)
            rw, ri = torch.sort(torch.softmax(logits, -1), dim=-1, descending=True, stable=True)
            rw, ri = rw[:, :k], ri[:, :k]
            if renorm:
                rw = rw / rw.sum(-1, keepdim=True)
            assert torch.equal(idx, ri), (E, T)
            torch.testing.assert_close(w, rw, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_default_takes_the_gluon_kernel_on_hopper(causal, monkeypatch):
    """flash_attn_fwd's default on an H100 / H200: a long chunk (one sequence, GQA, a causal
    chunk at the end of its keys) runs the Gluon kernel and meets the 2x rule against float64,
    as the Triton kernel (impl="triton") does on the same inputs, and so do a window and a
    striped ring shard's positions (session 23); two sequences (B = 2) or a short problem stay
    on the Triton kernel."""
    from ringserve.kernels import flash_fwd, flash_fwd_gluon
    if not flash_fwd_gluon.GLUON_AVAILABLE or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"needs sm_90 and Gluon: {flash_fwd_gluon.GLUON_UNAVAILABLE_REASON}")
    real, seen = flash_fwd_gluon.flash_attn_fwd_gluon, []

    def spy(q, *a, **kw):
        seen.append(tuple(q.shape))
        return real(q, *a, **kw)
    monkeypatch.setattr(flash_fwd_gluon, "flash_attn_fwd_gluon", spy)
    q, k, v = make(1, 3001, 5003, 32, 8, 128, torch.bfloat16, seed=31)
    off = 5003 - 3001
    out, lse = flash_fwd.flash_attn_fwd(q, k, v, causal=causal, q_offset=off)
    assert seen == [(1, 3001, 32, 128)] and not flash_fwd._gluon_broken
    ref_out, ref_lse = attention_ref(q, k, v, None, causal, None, off)
    lowp, _ = attention_ref(q, k, v, None, causal, None, off, dtype=torch.bfloat16)
    check_lowp(out, lse, ref_out, ref_lse, lowp, "gluon")
    t_out, t_lse = flash_fwd.flash_attn_fwd(q, k, v, causal=causal, q_offset=off,
                                            impl="triton")
    check_lowp(t_out, t_lse, ref_out, ref_lse, lowp, "triton")
    assert out.is_contiguous() and out.shape == t_out.shape
    q2, k2, v2 = make(2, 3001, 3001, 8, 8, 128, torch.bfloat16, seed=32)
    flash_fwd.flash_attn_fwd(q2, k2, v2, causal=causal)
    flash_fwd.flash_attn_fwd(q[:, :64], k[:, :64], v[:, :64], causal=causal)
    assert len(seen) == 1
    for kw in (dict(window_size=512, q_offset=off),
               dict(q_offset=1, q_stride=2, k_stride=2)):    # rank 1's shard of a 2-rank ring
        out, lse = flash_fwd.flash_attn_fwd(q, k, v, causal=causal, **kw)
        args = (kw.get("window_size"), kw["q_offset"], kw.get("q_stride", 1), 0,
                kw.get("k_stride", 1))
        ref_out, ref_lse = attention_ref(q, k, v, None, causal, *args)
        lowp, _ = attention_ref(q, k, v, None, causal, *args, dtype=torch.bfloat16)
        check_lowp(out, lse, ref_out, ref_lse, lowp, f"gluon {kw}")
    assert len(seen) == 3 and not flash_fwd._gluon_broken
