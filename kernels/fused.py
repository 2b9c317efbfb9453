"""Fused elementwise kernels of the decode step: one launch where the torch path runs several.

A decode step of a few rows is launch-bound: the torch RMSNorm is seven kernels (cast, square,
mean, add, rsqrt, multiply, cast, multiply), RoPE eight per tensor, the KV write one scatter per
tensor. Here:

- `rms_norm_triton(x, w, eps, plus_one, residual=None)`: optionally x += residual in place
  first (the residual stream; Gemma: the residual normed first), then RMSNorm of each row of
  x -> a new tensor;
- `rope_store_triton(q, k, v, cos, sin, ...)`: optional per-head RMSNorm (Qwen3/Gemma 3's q/k
  norm), RoPE of q and k (rotate-half pairs), a contiguous copy of v, and the store of the
  rotated k and of v into the KV pool's flat slots (-1: not stored), in one launch of one
  program per token;
- `act_mul_triton(gate, up, gelu)`: SiLU(gate) * up, or GELU-tanh(gate) * up (Gemma's GeGLU);
- `latent_rope_triton(q_lat, q_pe, c, k_pe, cos, sin)`: MLA's query [q_lat ; RoPE(q_pe)] and
  key [c ; RoPE(k_pe)], RoPE on interleaved pairs (DeepSeek's layout).

Every result rounds where the torch path (ringserve.model, ringserve.rope) rounds: statistics
and rotations in float32, the normalized row cast to the activation dtype before a Llama
weight multiplies it, after a Gemma (1 + w) one; the activation cast before the product with
up. So the fused path equals the torch path up to float32 summation order.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._host import FastLaunch, cdiv, next_pow2
from .pdl import pdl_enter, pdl_kw


@triton.jit
def _normed(xf, w_ptr, offs, mask, N, eps, dtype, PLUS_ONE: tl.constexpr):
    """RMSNorm of one float32 row (masked lanes 0), rounded to `dtype` as the torch module."""
    ms = tl.sum(xf * xf, axis=0) / N
    y = xf * (1.0 / tl.sqrt(ms + eps))
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PLUS_ONE:   # Gemma: (1 + w) in float32, one rounding at the end
        return (y * (1.0 + w)).to(dtype)
    # Llama: the normalized row rounds to the dtype before the weight
    return (y.to(dtype).to(tl.float32) * w).to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, rw_ptr, o_ptr, stride_x, stride_r, stride_o, N, eps,
                     r_eps, HAS_RESIDUAL: tl.constexpr, RES_NORM: tl.constexpr,
                     STORE_SUM: tl.constexpr, PLUS_ONE: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)   # row * stride may pass 2**31 on long inputs
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0)
        if RES_NORM:   # Gemma's sandwich: the sublayer's output is normed before the add
            r = _normed(r.to(tl.float32), rw_ptr, offs, mask, N, r_eps, x.dtype, PLUS_ONE)
        # the residual stream's update rounds to its dtype, as torch's `h += r` does
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        if STORE_SUM:   # not when the output overwrites x anyway
            tl.store(x_ptr + row * stride_x + offs, x, mask=mask)
    out = _normed(x.to(tl.float32), w_ptr, offs, mask, N, eps, x.dtype, PLUS_ONE)
    tl.store(o_ptr + row * stride_o + offs, out.to(o_ptr.dtype.element_ty), mask=mask)


_rms_norm_fast = FastLaunch(_rms_norm_kernel)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool = False,
                    residual: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None,
                    residual_weight: Optional[torch.Tensor] = None,
                    residual_eps: Optional[float] = None, check: bool = True) -> torch.Tensor:
    """x (T, N) (rows may be strided, the last dim contiguous); with `residual` (T, N) first
    x += residual in place, the residual first normed with `residual_weight` (and
    `residual_eps`, plus_one alike) when given. Returns RMSNorm(x) (T, N) in x's dtype (into
    `out` if given, which may be x itself). check=False skips the validation (the model's
    fused forward, which built the inputs)."""
    if not check:
        T, N = x.shape
        if out is None:
            out = torch.empty(T, N, dtype=x.dtype, device=x.device)
        return _rms_norm_launch(x, weight, eps, plus_one, residual, out, residual_weight,
                                residual_eps) if T else out
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be 2-D with a contiguous last dim, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    T, N = x.shape
    if tuple(weight.shape) != (N,):
        raise ValueError(f"weight {tuple(weight.shape)} must be ({N},)")
    if residual is not None and (tuple(residual.shape) != (T, N) or residual.stride(-1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} must be {(T, N)} with a contiguous "
                         f"last dim")
    if residual_weight is not None and (residual is None
                                        or tuple(residual_weight.shape) != (N,)):
        raise ValueError(f"residual_weight {tuple(residual_weight.shape)} needs a residual and "
                         f"must be ({N},)")
    if out is None:
        out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (T, N) or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} must be {(T, N)} with a contiguous last dim")
    if T == 0:
        return out
    return _rms_norm_launch(x, weight, eps, plus_one, residual, out, residual_weight,
                            residual_eps)


def _rms_norm_launch(x, weight, eps, plus_one, residual, out, residual_weight, residual_eps):
    T, N = x.shape
    r = residual if residual is not None else x
    rw = residual_weight if residual_weight is not None else weight
    block = next_pow2(N)
    _rms_norm_fast((T,), x, r, weight, rw, out, x.stride(0), r.stride(0), out.stride(0), N,
                   float(eps), float(eps if residual_eps is None else residual_eps),
                   HAS_RESIDUAL=residual is not None, RES_NORM=residual_weight is not None,
                   STORE_SUM=out.data_ptr() != x.data_ptr(), PLUS_ONE=bool(plus_one),
                   BLOCK=block, num_warps=4 if block <= 2048 else 8, **pdl_kw(x.device))
    return out


@triton.jit
def _rotate_heads(x_ptr, stride_h, o_ptr, stride_oh, c_ptr, s_ptr, w_ptr, H, eps,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  QK_NORM: tl.constexpr, PLUS_ONE: tl.constexpr):
    """One token's H heads: optional per-head RMSNorm over the head dim, then RoPE (dim i with
    i + HALF); stores into o_ptr and returns the rotated halves (float32) and their mask."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < H) & (d < HALF)
    x1 = tl.load(x_ptr + h * stride_h + d, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + h * stride_h + HALF + d, mask=mask, other=0.0)
    dt = x1.dtype
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    if QK_NORM:   # RMSNorm over the whole head (both halves), rounded as the torch module
        ms = (tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / (2 * HALF)
        r = (1.0 / tl.sqrt(ms + eps))[:, None]
        dm = d < HALF
        w1 = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + d, mask=dm, other=0.0).to(tl.float32)
        if PLUS_ONE:
            a = (a * r * (1.0 + w1)).to(dt).to(tl.float32)
            b = (b * r * (1.0 + w2)).to(dt).to(tl.float32)
        else:
            a = ((a * r).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
            b = ((b * r).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
    c = tl.load(c_ptr + d, mask=d < HALF, other=0.0)
    s = tl.load(s_ptr + d, mask=d < HALF, other=0.0)
    o1 = (a * c - b * s).to(dt)
    o2 = (b * c + a * s).to(dt)
    tl.store(o_ptr + h * stride_oh + d, o1, mask=mask)
    tl.store(o_ptr + h * stride_oh + HALF + d, o2, mask=mask)
    return o1, o2, mask


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, c_ptr, s_ptr, qo_ptr, ko_ptr, vo_ptr, kc_ptr, vc_ptr,
                       slot_ptr, qw_ptr, kw_ptr,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                       stride_ct, stride_qot, stride_qoh, stride_kot, stride_koh,
                       stride_vot, stride_voh,
                       stride_kcs, stride_kch, stride_vcs, stride_vch,
                       HQ, HKV, eps,
                       HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                       BLOCK_HALF: tl.constexpr, QK_NORM: tl.constexpr,
                       PLUS_ONE: tl.constexpr, HAS_V: tl.constexpr, STORE: tl.constexpr,
                       PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    c_row = c_ptr + t * stride_ct
    s_row = s_ptr + t * stride_ct
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, qo_ptr + t * stride_qot, stride_qoh,
                  c_row, s_row, qw_ptr, HQ, eps, HALF, BLOCK_HQ, BLOCK_HALF, QK_NORM, PLUS_ONE)
    k1, k2, kmask = _rotate_heads(k_ptr + t * stride_kt, stride_kh, ko_ptr + t * stride_kot,
                                  stride_koh, c_row, s_row, kw_ptr, HKV, eps, HALF, BLOCK_HKV,
                                  BLOCK_HALF, QK_NORM, PLUS_ONE)
    if HAS_V:
        h = tl.arange(0, BLOCK_HKV)[:, None]
        d = tl.arange(0, BLOCK_HALF)[None, :]
        v = v_ptr + t * stride_vt + h * stride_vh + d
        v1 = tl.load(v, mask=kmask, other=0.0)
        v2 = tl.load(v + HALF, mask=kmask, other=0.0)
        # a contiguous copy: v may be a strided view of a fused projection, and the ring
        # sends it as it is
        vo = vo_ptr + t * stride_vot + h * stride_voh + d
        tl.store(vo, v1, mask=kmask)
        tl.store(vo + HALF, v2, mask=kmask)
        if STORE:
            slot = tl.load(slot_ptr + t)
            if slot >= 0:   # rows another rank owns (or padding) are not stored here
                kc = kc_ptr + slot * stride_kcs + h * stride_kch + d
                tl.store(kc, k1.to(kc_ptr.dtype.element_ty), mask=kmask)
                tl.store(kc + HALF, k2.to(kc_ptr.dtype.element_ty), mask=kmask)
                vc = vc_ptr + slot * stride_vcs + h * stride_vch + d
                tl.store(vc, v1.to(vc_ptr.dtype.element_ty), mask=kmask)
                tl.store(vc + HALF, v2.to(vc_ptr.dtype.element_ty), mask=kmask)


_rope_store_fast = FastLaunch(_rope_store_kernel)


def _rope_check(q, k, v, cos, sin, k_cache, v_cache, slots, q_norm, k_norm):
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (T, H, D) alike")
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if D % 2 or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"head dim ({D}) must be even and contiguous")
    half = D // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or t.shape[0] != T or t.shape[-1] != half \
                or t.stride(-1) != 1 or t.numel() != T * half:
            raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} must be (T, 1, {half}) float32")
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must have the same strides")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together")
    if v is not None and (tuple(v.shape) != (T, Hkv, D) or v.stride(-1) != 1):
        raise ValueError(f"v {tuple(v.shape)} must be {(T, Hkv, D)}, head dim contiguous")
    store = k_cache is not None
    if store:
        if v is None or v_cache is None or slots is None:
            raise ValueError("storing needs v, v_cache and slots")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if c.dim() != 3 or tuple(c.shape[1:]) != (Hkv, D) or c.stride(-1) != 1:
                raise ValueError(f"{name} {tuple(c.shape)} must be (slots, {Hkv}, {D})")
        if tuple(slots.shape) != (T,) or slots.dtype != torch.int64:
            raise ValueError(f"slots {tuple(slots.shape)} {slots.dtype} must be ({T},) int64")


def rope_store_triton(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor],
                      cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: Optional[torch.Tensor] = None,
                      v_cache: Optional[torch.Tensor] = None,
                      slots: Optional[torch.Tensor] = None,
                      q_norm: Optional[torch.Tensor] = None,
                      k_norm: Optional[torch.Tensor] = None, eps: float = 1e-6,
                      plus_one: bool = False, check: bool = True,
                      out: Optional[Tuple[torch.Tensor, ...]] = None):
    """q (T, Hq, D), k, v (T, Hkv, D) (heads and tokens may be strided, the head dim
    contiguous), cos, sin (T, 1, D/2) float32 -> (q, k, v): q and k rotated, v copied (None
    if v is None), all new contiguous tensors, or written into `out` = (q_out, k_out, v_out)
    of those shapes (rows and heads may be strided, the head dim contiguous: a span's rows of
    a whole step's buffers), which are returned.

    q_norm / k_norm (D,): RMSNorm of every head before the rotation (eps, plus_one as the
    model's norms). With k_cache / v_cache (num_slots, Hkv, D) and slots (T,) int64, the
    rotated k and v of row t go to slot slots[t] (rows with -1 are not stored). check=False
    skips the validation (the engine's step, which built the inputs)."""
    if check:
        _rope_check(q, k, v, cos, sin, k_cache, v_cache, slots, q_norm, k_norm)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    half = D // 2
    store = k_cache is not None
    if out is not None:
        qo, ko, vo = out
        if check:
            for name, o, want in (("q", qo, q), ("k", ko, k), ("v", vo, v)):
                if want is None:
                    continue
                if o is None or o.shape != want.shape or o.stride(-1) != 1 \
                        or o.dtype != want.dtype or o.device != want.device:
                    raise ValueError(f"out's {name} must be {tuple(want.shape)} {want.dtype} "
                                     f"with a contiguous head dim")
    else:
        qo = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
        ko = torch.empty(T, Hkv, D, dtype=k.dtype, device=k.device)
        vo = torch.empty(T, Hkv, D, dtype=v.dtype, device=v.device) if v is not None else None
    if T == 0:
        return qo, ko, vo
    dummy = qo
    vv = v if v is not None else ko
    vvo = vo if vo is not None else ko
    kc, vc = (k_cache, v_cache) if store else (ko, ko)
    _rope_store_fast((T,),
        q, k, vv, cos, sin, qo, ko, vvo, kc, vc, slots if store else dummy,
        q_norm if q_norm is not None else dummy, k_norm if k_norm is not None else dummy,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), vv.stride(0), vv.stride(1),
        cos.stride(0), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
        vvo.stride(0), vvo.stride(1), kc.stride(0), kc.stride(1), vc.stride(0), vc.stride(1),
        Hq, Hkv, float(eps),
        HALF=half, BLOCK_HQ=next_pow2(Hq), BLOCK_HKV=next_pow2(Hkv),
        BLOCK_HALF=next_pow2(half), QK_NORM=q_norm is not None,
        PLUS_ONE=bool(plus_one), HAS_V=v is not None, STORE=store, num_warps=4,
        **pdl_kw(q.device))
    return qo, ko, vo


# sqrt(2 / pi), GELU's tanh approximation
_GELU_C = math.sqrt(2.0 / math.pi)


@triton.jit
def _act_mul_kernel(g_ptr, u_ptr, o_ptr, stride_g, stride_u, stride_o, N, gelu_c,
                    GELU: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0)
    x = g.to(tl.float32)
    if GELU:
        # tanh(y) = 1 - 2 / (exp(2y) + 1), from exp (the interpreter has no libdevice tanh)
        # |y| past 15 has tanh(y) = +-1 in float32: clamped, exp never overflows
        y = tl.minimum(tl.maximum(gelu_c * (x + 0.044715 * x * x * x), -15.0), 15.0)
        a = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))
    else:
        a = x / (1.0 + tl.exp(-x))
    # the activation rounds to the dtype before the product, as torch's act(gate) * up
    out = a.to(g.dtype).to(tl.float32) * u.to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs, out.to(o_ptr.dtype.element_ty), mask=mask)


_act_mul_fast = FastLaunch(_act_mul_kernel)


def act_mul_triton(gate: torch.Tensor, up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """gate, up (T, N) (rows may be strided: halves of a fused projection) -> act(gate) * up
    (T, N) contiguous; act SiLU, or GELU with the tanh approximation when `gelu`."""
    if gate.dim() != 2 or gate.shape != up.shape or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must be equal 2-D "
                         f"shapes with a contiguous last dim")
    T, N = gate.shape
    out = torch.empty(T, N, dtype=gate.dtype, device=gate.device)
    if T == 0 or N == 0:
        return out
    block = min(1024, next_pow2(N))
    _act_mul_fast((T, cdiv(N, block)),
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), N, _GELU_C,
        GELU=bool(gelu), BLOCK=block, num_warps=4, **pdl_kw(gate.device))
    return out


@triton.jit
def _rope_pairs(pe_ptr, dst_ptr, c_row, s_row, R2, BLOCK_R2: tl.constexpr):
    """dst[2i], dst[2i + 1] = RoPE(pe) on interleaved pairs (2i, 2i + 1), in float32."""
    i = tl.arange(0, BLOCK_R2)
    m = i < R2
    a = tl.load(pe_ptr + 2 * i, mask=m, other=0.0).to(tl.float32)
    b = tl.load(pe_ptr + 2 * i + 1, mask=m, other=0.0).to(tl.float32)
    c = tl.load(c_row + i, mask=m, other=0.0)
    s = tl.load(s_row + i, mask=m, other=0.0)
    tl.store(dst_ptr + 2 * i, (a * c - b * s).to(dst_ptr.dtype.element_ty), mask=m)
    tl.store(dst_ptr + 2 * i + 1, (b * c + a * s).to(dst_ptr.dtype.element_ty), mask=m)


@triton.jit
def _latent_rope_kernel(ql_ptr, qp_ptr, c_ptr, kp_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr,
                        w_ptr, kv_ptr, slot_ptr, wuk_ptr, eps,
                        s_qlt, s_qlh, s_qpt, s_qph, s_ct, s_kpt, s_cst, s_qt, s_qh, s_kt, s_kv,
                        s_wh, s_wn, NN,
                        H, C, R2, BLOCK_C: tl.constexpr, BLOCK_R2: tl.constexpr,
                        NORM: tl.constexpr, STORE: tl.constexpr, ABSORB: tl.constexpr = False,
                        CB: tl.constexpr = 1, BLOCK_CC: tl.constexpr = 16,
                        BLOCK_NN: tl.constexpr = 16, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    c_row = cos_ptr + t * s_cst
    s_row = sin_ptr + t * s_cst
    oc = tl.arange(0, BLOCK_C)
    mc = oc < C
    if j < H * CB:   # query head j // CB: its latent projection and its rotated rope part
        h = j // CB
        cb = j % CB
        dst = q_ptr + t * s_qt + h * s_qh
        if ABSORB:   # the CB-th block of q_nope @ W_UK (ql_ptr: q_nope; NN its width)
            cols = cb * BLOCK_CC + tl.arange(0, BLOCK_CC)
            cm = cols < C
            ns = tl.arange(0, BLOCK_NN)
            acc = tl.zeros((BLOCK_NN, BLOCK_CC), dtype=tl.float32)
            for n0 in range(0, NN, BLOCK_NN):
                nm = n0 + ns < NN
                x = tl.load(ql_ptr + t * s_qlt + h * s_qlh + n0 + ns, mask=nm,
                            other=0.0).to(tl.float32)
                w = tl.load(wuk_ptr + h * s_wh + (n0 + ns)[:, None] * s_wn + cols[None, :],
                            mask=nm[:, None] & cm[None, :], other=0.0).to(tl.float32)
                acc += w * x[:, None]
            # rounded to the model's dtype as the einsum's output
            tl.store(dst + cols, tl.sum(acc, axis=0).to(q_ptr.dtype.element_ty), mask=cm)
        else:
            tl.store(dst + oc, tl.load(ql_ptr + t * s_qlt + h * s_qlh + oc, mask=mc), mask=mc)
        if cb == 0:
            _rope_pairs(qp_ptr + t * s_qpt + h * s_qph, dst + C, c_row, s_row, R2, BLOCK_R2)
    else:        # the one key: the (normed) latent and the rotated shared rope key
        lat = tl.load(c_ptr + t * s_ct + oc, mask=mc, other=0.0)
        if NORM:     # kv_a_layernorm, rounded as the torch module
            lat = _normed(lat.to(tl.float32), w_ptr, oc, mc, C, eps, lat.dtype, False)
        lat = lat.to(k_ptr.dtype.element_ty)
        dst = k_ptr + t * s_kt
        tl.store(dst + oc, lat, mask=mc)
        _rope_pairs(kp_ptr + t * s_kpt, dst + C, c_row, s_row, R2, BLOCK_R2)
        if STORE:    # and into the token's cache slot (-1: a row this rank does not store)
            slot = tl.load(slot_ptr + t)
            if slot >= 0:
                kv = kv_ptr + slot * s_kv
                tl.store(kv + oc, lat, mask=mc)
                _rope_pairs(kp_ptr + t * s_kpt, kv + C, c_row, s_row, R2, BLOCK_R2)


_latent_rope_fast = FastLaunch(_latent_rope_kernel)


# the absorption's tile in the launch: (programs a head, each a block of W_UK's columns; rows
# of W_UK a step of its loop). Session 19's profile (one H200, DeepSeek-V2-Lite at 8K) put the
# launch at 7.0 us a layer with (4, 32), against 2.3 us for the launch without the absorption
# plus 3.2 us for einsum's. Session 20's sweep (`bench_gemv.py`'s last row, one H200): 4.3 us
# at (4, 32), 2.7 at (8, 128), against 4.5 us for einsum and the launch apart
ABSORB_BLOCKS = (8, 128)
# tokens up to which MLA's project() absorbs inside this launch (session 18: not yet run on a
# GPU; RINGSERVE_ABSORB_ROWS=0, read once, leaves W_UK to einsum for an A/B)
ABSORB_MAX_ROWS = int(os.environ.get("RINGSERVE_ABSORB_ROWS", "1"))


def latent_rope_triton(q_lat: Optional[torch.Tensor], q_pe: torch.Tensor, c: torch.Tensor,
                       k_pe: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                       kv_slots: Optional[torch.Tensor] = None,
                       slots: Optional[torch.Tensor] = None,
                       absorb: Optional[tuple] = None,
                       absorb_blocks: Optional[Tuple[int, int]] = None):
    """MLA's query and key in one launch: q_lat (T, H, C), q_pe (T, H, R), c (T, C),
    k_pe (T, R) (any row/head strides, the last dim contiguous), cos, sin (T, 1, R/2) float32
    -> q (T, H, C + R) = [q_lat ; RoPE(q_pe)], k (T, 1, C + R) = [c ; RoPE(k_pe)], RoPE on
    interleaved pairs (DeepSeek's layout), new contiguous tensors.

    norm_weight (C,): c is RMSNorm'd first (kv_a_layernorm, eps) in the same launch.
    kv_slots (N, 1, C + R) (a layer's flat cache slots) with slots (T,) int64: each row's key
    also stored into its slot (slot -1: not stored), as `rope_store_triton` does.
    absorb: (q_nope (T, H, N), w_uk (H, N, C)), last dims contiguous, with q_lat None: the
    launch computes q_lat = einsum("thn,hnc->thc") itself (float32 sums, rounded to q_nope's
    dtype as the einsum's output), in ABSORB_BLOCKS' tiles (absorb_blocks: (programs a
    head, W_UK rows a step), for sweeps): a decode token's absorption without a batched GEMM
    launch of its own."""
    if (q_lat is None) == (absorb is None):
        raise ValueError("give q_lat or absorb=(q_nope, w_uk), not both")
    if absorb is not None:
        q_nope, w_uk = absorb
        if q_nope.dim() != 3 or w_uk.dim() != 3 or w_uk.shape[:2] != q_nope.shape[1:] \
                or q_nope.stride(-1) != 1 or w_uk.stride(-1) != 1 \
                or q_nope.dtype != w_uk.dtype:
            raise ValueError(f"absorb: q_nope {tuple(q_nope.shape)} (T, H, N) and w_uk "
                             f"{tuple(w_uk.shape)} (H, N, C) must agree, last dims contiguous, "
                             f"one dtype")
        T, H, NN = q_nope.shape
        C = w_uk.shape[2]
        lat_src = q_nope
    else:
        T, H, C = q_lat.shape
        lat_src = q_lat
    R = q_pe.shape[-1]
    if tuple(q_pe.shape) != (T, H, R) or tuple(c.shape) != (T, C) or tuple(k_pe.shape) != (T, R):
        raise ValueError(f"q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, c "
                         f"{tuple(c.shape)}, k_pe {tuple(k_pe.shape)} do not agree")
    if R % 2 or any(x.stride(-1) != 1 for x in (lat_src, q_pe, c, k_pe)):
        raise ValueError(f"rope width ({R}) must be even, every last dim contiguous")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.dtype != torch.float32 or x.shape[0] != T or x.shape[-1] != R // 2 \
                or x.stride(-1) != 1 or x.numel() != T * (R // 2):
            raise ValueError(f"{name} {tuple(x.shape)} {x.dtype} must be (T, 1, {R // 2}) "
                             f"float32")
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must have the same strides")
    if norm_weight is not None and tuple(norm_weight.shape) != (C,):
        raise ValueError(f"norm_weight {tuple(norm_weight.shape)} must be ({C},)")
    if (kv_slots is None) != (slots is None):
        raise ValueError("kv_slots and slots go together")
    if kv_slots is not None and (kv_slots.dim() != 3 or kv_slots.shape[1:] != (1, C + R)
                                 or kv_slots.stride(1) != C + R or kv_slots.stride(2) != 1
                                 or tuple(slots.shape) != (T,)
                                 or slots.dtype != torch.int64):
        raise ValueError(f"kv_slots {tuple(kv_slots.shape)} must be (N, 1, {C + R}) with "
                         f"contiguous rows and slots (T,) int64, got {tuple(slots.shape)} "
                         f"{slots.dtype}")
    q = torch.empty(T, H, C + R, dtype=lat_src.dtype, device=lat_src.device)
    k = torch.empty(T, 1, C + R, dtype=c.dtype, device=c.device)
    if T == 0:
        return q, k
    store = kv_slots is not None
    if absorb is not None:
        cb, bnn = absorb_blocks or ABSORB_BLOCKS
        if cb < 1 or bnn < 1 or bnn & (bnn - 1):
            raise ValueError(f"absorb_blocks {(cb, bnn)}: programs a head >= 1 and a power of "
                             f"two of rows")
        extra = dict(ABSORB=True, CB=cb, BLOCK_CC=next_pow2(cdiv(C, cb)),
                     BLOCK_NN=min(bnn, next_pow2(NN)))
        w_args = (w_uk, w_uk.stride(0), w_uk.stride(1), NN)
    else:
        cb, extra, w_args = 1, {}, (lat_src, 0, 0, 0)
    _latent_rope_fast((T, H * cb + 1),
        lat_src, q_pe, c, k_pe, cos, sin, q, k,
        norm_weight if norm_weight is not None else c, kv_slots if store else k,
        slots if store else cos, w_args[0], float(eps),
        lat_src.stride(0), lat_src.stride(1), q_pe.stride(0),
        q_pe.stride(1), c.stride(0), k_pe.stride(0), cos.stride(0), q.stride(0), q.stride(1),
        k.stride(0), kv_slots.stride(0) if store else 0, *w_args[1:], H, C, R // 2,
        BLOCK_C=next_pow2(C), BLOCK_R2=next_pow2(R // 2), NORM=norm_weight is not None,
        STORE=store, num_warps=4, **extra, **pdl_kw(lat_src.device))
    return q, k

