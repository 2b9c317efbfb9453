"""The fused decode kernels (kernels/fused.py) under TRITON_INTERPRET=1 on CPU, fp32 and fp16,
against float64 references (kernels/reference.py) and against the model's torch path
(ringserve.model.RMSNorm, ringserve.rope.Rotary, F.silu / F.gelu), which they replace.

fp32: ~1e-5 relative. fp16: error at most 2x the torch path's in the same dtype, both against
float64, plus a floor of one rounding. bf16 runs on the GPU (test_kernels_gpu.py).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ringserve.kernels.fused import act_mul_triton, rms_norm_triton, rope_store_triton
from ringserve.kernels.reference import act_mul_ref, rms_norm_ref, rope_ref
from ringserve.model import RMSNorm
from ringserve.rope import Rotary

# CPU tensors throughout: Triton runs them only interpreted (GPU: test_kernels_gpu.py)
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on CPU needs TRITON_INTERPRET=1 (`bash dev test`)")

DTYPES = [torch.float32, torch.float16]


def close(got, want64, torch_path, dtype):
    """got and torch_path (same dtype) against the float64 want."""
    err = (got.double() - want64).abs().max().item()
    if dtype == torch.float32:
        rel = ((got.double() - want64).norm() / want64.norm().clamp_min(1e-30)).item()
        assert rel < 1e-5, f"relative error {rel:.3g}"
    else:
        base = (torch_path.double() - want64).abs().max().item()
        floor = 2 ** -10 * want64.abs().max().item()
        assert err <= 2 * base + floor, f"max error {err:.3g} vs torch {dtype} {base:.3g}"


def rand(*shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,plus_one,residual", [(1, 64, False, False), (3, 77, False, True),
                                                   (5, 211, True, True), (2, 96, True, False)])
def test_rms_norm(dtype, T, N, plus_one, residual):
    g = torch.Generator().manual_seed(T * 1000 + N)
    base = rand(T, N + 5, dtype=dtype, g=g, scale=3.0)
    x = base[:, 2:N + 2]                       # strided rows, as a chunk of the residual stream
    r = rand(T, N, dtype=dtype, g=g) if residual else None
    w = rand(N, dtype=dtype, g=g, scale=0.5) + (0 if plus_one else 1)
    norm = RMSNorm(N, 1e-5, plus_one, dtype=dtype)
    norm.weight.data.copy_(w)
    h_torch = x.clone()
    if residual:
        h_torch += r
    want_torch = norm(h_torch)
    got = rms_norm_triton(x, w, 1e-5, plus_one, residual=r)
    # the residual update is the torch one bit for bit (one rounding of h + r)
    assert torch.equal(x, h_torch)
    assert got.dtype == dtype and got.shape == (T, N)
    close(got, rms_norm_ref(h_torch, w, 1e-5, plus_one), want_torch, dtype)
    if residual:   # Gemma's sandwich: the residual normed (its own weight) before the add
        rw = rand(N, dtype=dtype, g=g, scale=0.5) + (0 if plus_one else 1)
        rnorm = RMSNorm(N, 1e-6, plus_one, dtype=dtype)
        rnorm.weight.data.copy_(rw)
        h2, h2_torch = base[:, 2:N + 2].clone(), base[:, 2:N + 2].clone()
        h2_torch += rnorm(r)
        got2 = rms_norm_triton(h2, w, 1e-5, plus_one, residual=r, residual_weight=rw,
                               residual_eps=1e-6)
        torch.testing.assert_close(h2, h2_torch, rtol=0, atol=2 * (h2_torch.abs().max().item()
                                                                   * torch.finfo(dtype).eps))
        close(got2, rms_norm_ref(h2_torch, w, 1e-5, plus_one), norm(h2_torch), dtype)
    # in place over its input (the final norm writes the residual stream)
    y = h_torch.clone()
    rms_norm_triton(y, w, 1e-5, plus_one, out=y)
    assert torch.equal(y, got)


def test_rms_norm_checks():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_triton(x, torch.ones(8), 1e-5, residual=torch.zeros(2, 7))
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm_triton(x.t(), torch.ones(2), 1e-5)


def _cos_sin(T, D, g):
    pos = torch.randint(0, 1 << 20, (T,), generator=g)
    from ringserve.config import RopeConfig
    return Rotary(RopeConfig(theta=1e6), D).cos_sin(pos)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,Hq,Hkv,D,qk_norm,plus_one", [
    (1, 4, 2, 16, False, False), (3, 8, 1, 32, False, False), (5, 6, 3, 24, True, False),
    (2, 4, 4, 16, True, True)])
def test_rope_store(dtype, T, Hq, Hkv, D, qk_norm, plus_one):
    g = torch.Generator().manual_seed(T * 100 + Hq * 10 + D)
    # q, k, v as views of one fused projection output (Phi-3), heads strided in the row
    fused = rand(T, (Hq + 2 * Hkv) * D, dtype=dtype, g=g, scale=2.0)
    q = fused[:, :Hq * D].view(T, Hq, D)
    k = fused[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
    v = fused[:, (Hq + Hkv) * D:].view(T, Hkv, D)
    cos, sin = _cos_sin(T, D, g)
    qw = kw = None
    qn, kn = q, k
    if qk_norm:
        qw = rand(D, dtype=dtype, g=g, scale=0.5) + (0 if plus_one else 1)
        kw = rand(D, dtype=dtype, g=g, scale=0.5) + (0 if plus_one else 1)
        nq, nk = (RMSNorm(D, 1e-6, plus_one, dtype=dtype) for _ in range(2))
        nq.weight.data.copy_(qw)
        nk.weight.data.copy_(kw)
        qn, kn = nq(q), nk(k)
    slots_n = 4 * T + 3
    kc = torch.zeros(slots_n, Hkv, D, dtype=dtype)
    vc = torch.zeros(slots_n, Hkv, D, dtype=dtype)
    slots = torch.randperm(slots_n, generator=g)[:T]
    if T > 1:
        slots[1] = -1                           # a row this rank does not store
    qo, ko, vo = rope_store_triton(q, k, v, cos, sin, kc, vc, slots, q_norm=qw, k_norm=kw,
                                   eps=1e-6, plus_one=plus_one)
    assert vo.is_contiguous() and torch.equal(vo, v)
    tq, tk = Rotary.apply(qn, cos, sin), Rotary.apply(kn, cos, sin)
    if qk_norm:   # the reference rotates the torch-normed rows (norm rounding is the torch one)
        close(qo, rope_ref(qn, cos, sin), tq, dtype)
        close(ko, rope_ref(kn, cos, sin), tk, dtype)
    else:
        close(qo, rope_ref(q, cos, sin), tq, dtype)
        close(ko, rope_ref(k, cos, sin), tk, dtype)
    keep = slots >= 0
    assert torch.equal(kc[slots[keep]], ko[keep])
    assert torch.equal(vc[slots[keep]], v[keep])
    untouched = torch.ones(slots_n, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert not kc[untouched].any() and not vc[untouched].any()
    # without a cache: the rotation alone
    qo2, ko2, vo2 = rope_store_triton(q, k, None, cos, sin, q_norm=qw, k_norm=kw, eps=1e-6,
                                      plus_one=plus_one)
    assert torch.equal(qo2, qo) and torch.equal(ko2, ko) and vo2 is None


def test_rope_store_checks():
    q, k = torch.zeros(2, 4, 16), torch.zeros(2, 2, 16)
    cos = sin = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="cos"):
        rope_store_triton(q, k, None, cos.double(), sin)
    with pytest.raises(ValueError, match="slots"):
        rope_store_triton(q, k, k, cos, sin, torch.zeros(5, 2, 16), torch.zeros(5, 2, 16),
                          torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="even"):
        rope_store_triton(q[..., :15], k[..., :15], None, cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,gelu", [(1, 128, False), (3, 77, False), (2, 1500, True),
                                      (4, 33, True)])
def test_act_mul(dtype, T, N, gelu):
    g = torch.Generator().manual_seed(T * 7 + N)
    gu = rand(T, 2 * N, dtype=dtype, g=g, scale=4.0)
    gate, up = gu.chunk(2, dim=-1)              # halves of a fused gate_up projection
    got = act_mul_triton(gate, up, gelu)
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    close(got, act_mul_ref(gate, up, gelu), act * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,C,R", [(1, 4, 32, 8), (3, 5, 40, 16)])
def test_latent_rope(dtype, T, H, C, R):
    """MLA's q = [q_lat ; RoPE(q_pe)], k = [c ; RoPE(k_pe)] (interleaved pairs) from strided
    views, as the torch path builds them."""
    from ringserve.kernels.fused import latent_rope_triton
    g = torch.Generator().manual_seed(T * 10 + H)
    q_lat = rand(H, T, C, dtype=dtype, g=g).transpose(0, 1)          # a bmm's permuted output
    q_pe = rand(T, H, C + R, dtype=dtype, g=g, scale=2.0)[..., C:]   # the tail of each head
    kv = rand(T, C + R, dtype=dtype, g=g, scale=2.0)
    c, k_pe = rand(T, C, dtype=dtype, g=g), kv[:, C:]
    cos, sin = _cos_sin(T, R, g)
    q, k = latent_rope_triton(q_lat, q_pe, c, k_pe, cos, sin)
    assert q.shape == (T, H, C + R) and k.shape == (T, 1, C + R)
    assert torch.equal(q[..., :C], q_lat) and torch.equal(k[:, 0, :C], c)
    tq = Rotary.apply_interleaved(q_pe, cos, sin)
    tk = Rotary.apply_interleaved(k_pe[:, None], cos, sin)[:, 0]

    def ref(x):   # float64, interleaved pairs
        xd = x.double().unflatten(-1, (-1, 2))
        a, b, cc, ss = xd[..., 0], xd[..., 1], cos.double(), sin.double()
        return torch.stack([a * cc - b * ss, b * cc + a * ss], dim=-1).flatten(-2)
    close(q[..., C:], ref(q_pe), tq, dtype)
    close(k[:, 0, C:], ref(k_pe[:, None])[:, 0], tk, dtype)
    # kv_a_layernorm in the same launch, and each row's key into its cache slot (-1: none)
    from ringserve.model import RMSNorm
    norm = RMSNorm(C, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(rand(C, dtype=dtype, g=g) + 1)
    cache = torch.full((7, 1, C + R), 9.0, dtype=dtype)
    slots = torch.tensor([5, -1, 2][:T])
    q2, k2 = latent_rope_triton(q_lat, q_pe, c, k_pe, cos, sin, norm_weight=norm.weight,
                                eps=1e-6, kv_slots=cache, slots=slots)
    assert torch.equal(q2, q) and torch.equal(k2[..., C:], k[..., C:])
    with torch.no_grad():
        want = norm(c)
    assert (k2[:, 0, :C].double() - want.double()).abs().max().item() <= (
        1e-6 if dtype == torch.float32 else 2e-3), "the norm rounds as the torch module"
    for t, sl in enumerate(slots.tolist()):
        if sl >= 0:
            assert torch.equal(cache[sl], k2[t])
    untouched = [i for i in range(7) if i not in slots.tolist()]
    assert (cache[untouched] == 9.0).all()
    with pytest.raises(ValueError, match="go together"):
        latent_rope_triton(q_lat, q_pe, c, k_pe, cos, sin, kv_slots=cache)
    # the absorption in the same launch: q_lat = q_nope @ W_UK per head (views of a projection's
    # output and of kv_b_proj's weight, as MLAttention passes them), against float64 einsum;
    # everything else as above
    N = 24
    q_full = rand(T, H, N + R, dtype=dtype, g=g)
    w_kv = rand(H, N + 7, C, dtype=dtype, g=g, scale=N ** -0.5)
    q_nope, w_uk = q_full[..., :N], w_kv[:, :N]
    q3, k3 = latent_rope_triton(None, q_pe, c, k_pe, cos, sin, norm_weight=norm.weight,
                                eps=1e-6, absorb=(q_nope, w_uk))
    want = torch.einsum("thn,hnc->thc", q_nope.double(), w_uk.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    err = (q3[..., :C].double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err
    assert torch.equal(q3[..., C:], q[..., C:]) and torch.equal(k3, k2)
    for blocks in ((1, 8), (3, 16), (16, 4)):   # other tiles (bench_gemv's sweep): the same
        q4, _ = latent_rope_triton(None, q_pe, c, k_pe, cos, sin, norm_weight=norm.weight,
                                   eps=1e-6, absorb=(q_nope, w_uk), absorb_blocks=blocks)
        err = (q4[..., :C].double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), (blocks, err)
    with pytest.raises(ValueError, match="absorb_blocks"):
        latent_rope_triton(None, q_pe, c, k_pe, cos, sin, absorb=(q_nope, w_uk),
                           absorb_blocks=(4, 24))
    with pytest.raises(ValueError, match="not both"):
        latent_rope_triton(q_lat, q_pe, c, k_pe, cos, sin, absorb=(q_nope, w_uk))
    with pytest.raises(ValueError, match="absorb"):
        latent_rope_triton(None, q_pe, c, k_pe, cos, sin, absorb=(q_nope, w_uk[:, :N - 1]))
