"""Flash-attention forward returning (out, lse), for any affine global positions (Triton).

One program computes BLOCK_M query rows of one (batch, q head) against the key blocks its mask
lets through. Query row i sits at q_offset + i * q_stride, key row j at k_offset + j * k_stride
(contiguous shards: stride 1; striped shards: stride N), so one kernel serves every block of a
ring or striped schedule. Per query block the key-block loop bounds come from those affine
positions: blocks the mask removes entirely are never visited, blocks every query of the block
sees run without any mask arithmetic, and only the edge blocks (diagonal, window borders, the
ragged end) pay for the mask.

Contract (see reference.py): q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) with
Dv <= D (MLA's expanded form: 128 against 192; otherwise Dv = D), Hq % Hkv == 0; returns
out (B, Sq, Hq, Dv) in q's dtype and lse (B, Hq, Sq) float32 (natural log); fully masked rows get
lse = -inf and out = 0.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from ._host import FastLaunch, _props, cdiv, next_pow2, major_capability

try:  # host-side TMA descriptors (triton >= 3.3); the pointer path needs nothing
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton
    TensorDescriptor = None

LOG2E = 1.4426950408889634   # host side
# log2(e) = 1.4426950408889634 and ln(2) = 0.6931471805599453 are written as literals in the
# kernels: a module-level constexpr is a global the launcher re-checks on every launch
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# up to MLA's latent (576, in a 1024-wide tile: 16-row query blocks and 16-key tiles)
MAX_HEAD_DIM = 1024


@triton.jit
def _floor_div(a, b):
    # b > 0. Triton's integer // truncates toward zero (C rules): negative numerators need care.
    return tl.where(a >= 0, a // b, -((b - 1 - a) // b))


@triton.jit
def _tanh(x):
    # tanh from exp2 (also under the CPU interpreter, which has no libdevice): saturates to
    # +-1 for large |x| (exp2 -> inf or 0), absolute error ~1 ulp of 1 near 0
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _tanh_approx(x):
    # the GPU's tanh.approx.f32 (sm_75+; max relative error ~2^-11, below bf16's rounding of
    # the scores): the exp2 form costs two MUFU ops and a division a score, which at head dim
    # 256 is as much as the tensor cores' work on it
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _key_block_bounds(q_lo, q_hi, Sk, k_offset, k_stride, window,
                      BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key-block ranges for queries at positions q_lo..q_hi.

    Returns (n_lo, f_lo, f_hi, n_hi): blocks [n_lo, n_hi) hold every key some query may see;
    blocks [f_lo, f_hi) are entirely visible to every query and lie inside [0, Sk) (no mask).
    """
    j_lo = Sk * 0          # first key index any query sees
    j_hi = Sk              # one past the last
    jf_lo = Sk * 0         # keys every query sees: [jf_lo, jf_hi)
    jf_hi = Sk
    if CAUSAL:
        j_hi = _floor_div(q_hi - k_offset, k_stride) + 1
        jf_hi = _floor_div(q_lo - k_offset, k_stride) + 1
    elif HAS_WINDOW:
        j_hi = _floor_div(q_hi + window - k_offset, k_stride) + 1
        jf_hi = _floor_div(q_lo + window - k_offset, k_stride) + 1
    if HAS_WINDOW:
        j_lo = -_floor_div(k_offset - (q_lo - window), k_stride)   # ceil division
        jf_lo = -_floor_div(k_offset - (q_hi - window), k_stride)
    j_lo = tl.minimum(tl.maximum(j_lo, 0), Sk)
    j_hi = tl.minimum(tl.maximum(j_hi, 0), Sk)
    jf_lo = tl.minimum(tl.maximum(jf_lo, 0), Sk)
    jf_hi = tl.minimum(tl.maximum(jf_hi, 0), Sk)
    n_lo = j_lo // BLOCK_N
    n_hi = tl.maximum((j_hi + BLOCK_N - 1) // BLOCK_N, n_lo)
    f_lo = tl.minimum(tl.maximum((jf_lo + BLOCK_N - 1) // BLOCK_N, n_lo), n_hi)
    f_hi = tl.minimum(jf_hi // BLOCK_N, n_hi)
    empty = f_hi <= f_lo
    # no unmasked block: the whole range goes through the first masked loop
    f_lo = tl.where(empty, n_hi, f_lo)
    f_hi = tl.where(empty, n_hi, f_hi)
    return n_lo, f_lo, f_hi, n_hi


@triton.jit
def _attend_blocks(acc, l_i, m_i, q, q_pos, K, V, k_ptrs0, v_ptrs0, stride_ks, stride_vs,
                   desc_row0, desc_col, n_from, n_to, Sk, k_offset, k_stride, window, qk_scale,
                   softcap_in, offs_n, offs_d, offs_dv, desc_col_v,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, DOT_PREC: tl.constexpr,
                   IDX64: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [n_from, n_to).

    SOFTCAP: scores are c * tanh(q.k * scale / c); the host passes softcap_in = scale / c and
    qk_scale = c * log2(e), so the rest of the loop is unchanged."""
    # warp specialization only on the unmasked interior loop (the hot one)
    for nb in tl.range(n_from, n_to, warp_specialize=WARP_SPEC and not MASKED):
        start = nb * BLOCK_N
        kidx = start + offs_n
        if USE_TMA:
            # (B*Sk, Hkv*D) view: rows past Sk belong to the next batch or are zero-filled by
            # the copy engine; the masked path below gives them zero weight.
            k = K.load([desc_row0 + start, desc_col])
            v = V.load([desc_row0 + start, desc_col_v])
            if MASKED:
                v = tl.where(kidx[:, None] < Sk, v, 0.0)   # never let 0 * inf/nan through
        else:
            # 32-bit row offsets unless the host saw they could overflow: 64-bit address math
            # on every element costs registers (spills) in the pipelined loop
            rows = kidx[:, None].to(tl.int64) if IDX64 else kidx[:, None]
            k_ptrs = k_ptrs0 + rows * stride_ks
            v_ptrs = v_ptrs0 + rows * stride_vs
            if MASKED or BLOCK_D != HEAD_DIM or BLOCK_DV != HEAD_DIM_V:
                k = tl.load(k_ptrs, mask=(kidx[:, None] < Sk) & (offs_d[None, :] < HEAD_DIM),
                            other=0.0)
                v = tl.load(v_ptrs, mask=(kidx[:, None] < Sk) & (offs_dv[None, :] < HEAD_DIM_V),
                            other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)   # (BLOCK_M, BLOCK_N) fp32
        if SOFTCAP == 2:
            qk = _tanh_approx(qk * softcap_in)
        elif SOFTCAP:
            qk = _tanh(qk * softcap_in)
        if MASKED:
            k_pos = k_offset + kidx * k_stride
            vis = (kidx < Sk)[None, :]
            if CAUSAL:
                vis = vis & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                vis = vis & (q_pos[:, None] - k_pos[None, :] <= window)
                if not CAUSAL:
                    vis = vis & (k_pos[None, :] - q_pos[:, None] <= window)
            s = tl.where(vis, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead so that
            # exp2(-inf - -inf) never makes a NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
        else:
            # every key visible: m_new is finite, one multiply-add per score
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


# Offsets, stripes and the window vary by rank, layout and chunk: specializing on them (Triton
# compiles another variant when an integer is 1 or a multiple of 16) would compile in the middle
# of serving, seconds per new combination; their arithmetic is a few integer ops per block.
@triton.jit(do_not_specialize=["q_offset", "q_stride", "k_offset", "k_stride", "window",
                               "SEQ_BUCKET"])
def _flash_fwd_kernel(
        Q, K, V, Out, Lse,
        stride_qb, stride_qs, stride_qh, stride_qd,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_ob, stride_os, stride_oh, stride_od,
        Sq, Sk, Hq, GROUP, q_offset, q_stride, k_offset, k_stride, window, qk_scale, softcap_in,
        SEQ_BUCKET,   # only part of the autotuning key
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
        DOT_PREC: tl.constexpr, IDX64: tl.constexpr, SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = num_m - 1 - tl.program_id(0)   # under a causal mask the last rows cost most: start them first
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP                        # GQA/MQA: K/V heads are shared, never repeated
    b64 = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)     # the values' head dim (MLA's expanded form: narrower)
    q_pos = q_offset + offs_m * q_stride
    row_ok = offs_m < Sq
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if USE_TMA:   # K and V are descriptors: no pointer arithmetic on them
        k_ptrs0 = 0
        v_ptrs0 = 0
    else:
        k_ptrs0 = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd
        v_ptrs0 = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + offs_dv[None, :] * stride_vd
    desc_row0 = b * Sk
    desc_col = hk * HEAD_DIM
    desc_col_v = hk * HEAD_DIM_V

    # fp32 statistics and accumulator whatever the input dtype; m in the log2 domain because
    # log2(e) is folded into qk_scale (exp2 is the native instruction)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    q_lo = q_offset + pid_m * BLOCK_M * q_stride
    q_hi = q_offset + (tl.minimum((pid_m + 1) * BLOCK_M, Sq) - 1) * q_stride
    n_lo, f_lo, f_hi, n_hi = _key_block_bounds(q_lo, q_hi, Sk, k_offset, k_stride, window,
                                               BLOCK_N, CAUSAL, HAS_WINDOW)
    # masked leading edge (window border, or everything when no block is fully visible)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, q_pos, K, V, k_ptrs0, v_ptrs0, stride_ks,
                                   stride_vs, desc_row0, desc_col, n_lo, f_lo, Sk, k_offset,
                                   k_stride, window, qk_scale, softcap_in, offs_n, offs_d,
                                   offs_dv, desc_col_v, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                   BLOCK_N, True, CAUSAL, HAS_WINDOW, USE_TMA, WARP_SPEC, DOT_PREC,
                                   IDX64, SOFTCAP)
    # interior: every key visible to every query, no mask
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, q_pos, K, V, k_ptrs0, v_ptrs0, stride_ks,
                                   stride_vs, desc_row0, desc_col, f_lo, f_hi, Sk, k_offset,
                                   k_stride, window, qk_scale, softcap_in, offs_n, offs_d,
                                   offs_dv, desc_col_v, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                   BLOCK_N, False, CAUSAL, HAS_WINDOW, USE_TMA, WARP_SPEC, DOT_PREC,
                                   IDX64, SOFTCAP)
    # masked trailing edge (causal diagonal, window border, ragged end of the keys)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, q_pos, K, V, k_ptrs0, v_ptrs0, stride_ks,
                                   stride_vs, desc_row0, desc_col, f_hi, n_hi, Sk, k_offset,
                                   k_stride, window, qk_scale, softcap_in, offs_n, offs_d,
                                   offs_dv, desc_col_v, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                   BLOCK_N, True, CAUSAL, HAS_WINDOW, USE_TMA, WARP_SPEC, DOT_PREC,
                                   IDX64, SOFTCAP)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]     # fully masked rows: acc is 0, out stays 0
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(Lse + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=row_ok)
    o_ptrs = (Out + b64 * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_os + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :])


def _tma_block_hook(nargs):
    """Autotune pre-hook: a host descriptor's block shape must follow the config's BLOCK_N."""
    for name, dim in (("K", "HEAD_DIM"), ("V", "HEAD_DIM_V")):
        d = nargs[name]
        if TensorDescriptor is not None and isinstance(d, TensorDescriptor):
            d.block_shape = [nargs["BLOCK_N"], nargs[dim]]


def _gpu_configs(warp_spec: bool):
    # (BLOCK_M, BLOCK_N, num_warps, num_stages), kept short: every entry is one compile per key
    # (checked with cuobjdump -res-usage for sm_90: BLOCK_M 128 with 4 warps spills at D=128)
    # (16, 16, 8, 2): heads wider than 256 (MLA's 576-wide latent, a 1024-wide tile) only
    # (128, 64, 8, 2) and (128, 32, 8, 2): 256-wide heads only (Gemma 2 / 3), whose 64-row tiles
    # with 4 warps ran Gemma 2's 128K prefill at 9.7% MFU (session 15)
    shapes = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3),
              (64, 64, 4, 3), (64, 32, 4, 2), (16, 16, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s,
                          pre_hook=_tma_block_hook)
            for bm, bn, w, s in shapes
            if not (warp_spec and w != 4 and bm == 64)]


def _prune(configs, nargs, **kwargs):
    d = kwargs["BLOCK_D"] if "BLOCK_D" in kwargs else nargs["BLOCK_D"]   # constexprs come as kwargs
    dv = kwargs["BLOCK_DV"] if "BLOCK_DV" in kwargs else nargs.get("BLOCK_DV", d)
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if d == 256 and dv <= 128 and (bm, bn, c.num_warps, c.num_stages) == (128, 64, 8, 3):
            keep.append(c)                # MLA's expanded form (192 / 128): room for 3 stages
            continue
        if (d > 256) != (bm == 16):
            continue                      # the small tile is for (and only for) wide heads
        if d <= 64 and bm == 64:
            continue                      # small heads: large tiles always win
        wide_only = (bm, bn, c.num_warps, c.num_stages) in ((128, 64, 8, 2), (128, 32, 8, 2))
        if d == 256 and (bm, bn) not in ((64, 64), (64, 32)) and not wide_only:
            continue                      # 256-wide heads: the 64-row tiles, or 128 rows with
        if d != 256 and wide_only:        # 8 warps and 2 stages (the shared memory's limit)
            continue
        if d == 128 and (bm == 64 or c.num_warps == 4):
            continue
        keep.append(c)
    return keep or [c for c in configs if c.kwargs["BLOCK_M"] == 16]


_KEY = ["HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "HAS_WINDOW", "USE_TMA", "WARP_SPEC", "DOT_PREC", "IDX64", "SOFTCAP",
        "SEQ_BUCKET"]
_flash_fwd_fast = FastLaunch(_flash_fwd_kernel)
_tuned = {ws: triton.autotune(configs=_gpu_configs(ws), key=_KEY,
                              prune_configs_by={"early_config_prune": _prune})(_flash_fwd_kernel)
          for ws in (False, True)}

# The interpreter (CPU) runs one small config: tuning there would only burn CI minutes.
CPU_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def _check_inputs(q, k, v, softmax_scale, window_size, q_stride, k_stride, softcap=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, S, H, D), got "
                             f"{getattr(t, 'shape', type(t))}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} not supported (fp16, bf16, fp32)")
    B, Sq, Hq, D = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape "
                         f"but for the head dim")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch ({B}) "
                         f"and head dim ({D})")
    if k.shape[2] == 0 or Hq % k.shape[2]:
        raise ValueError(f"num q heads ({Hq}) must be a multiple of num kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim ({D}) must be in 1..{MAX_HEAD_DIM}")
    if not 1 <= v.shape[3] <= D:
        raise ValueError(f"the values' head dim ({v.shape[3]}) must be in 1..{D} (the keys')")
    if q_stride < 1 or k_stride < 1:
        raise ValueError(f"position strides must be >= 1, got q_stride={q_stride}, "
                         f"k_stride={k_stride}")
    if window_size is not None and (int(window_size) != window_size or window_size < 0):
        raise ValueError(f"window_size must be None or an int >= 0, got {window_size}")
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be None or a finite float >= 0, got {softcap}")


def _tma_ok(t: torch.Tensor, D: int) -> bool:
    """Can (B, S, H, D) be seen as a 2-D (B*S, H*D) tensor that the copy engine can tile?"""
    B, S, H, _ = t.shape
    es = t.element_size()
    return (TensorDescriptor is not None and t.is_cuda
            and major_capability(t.device) >= 9
            and D >= 16 and D & (D - 1) == 0 and t.stride(3) == 1 and t.stride(2) == D
            and (B == 1 or t.stride(0) == S * t.stride(1))
            and (t.stride(1) * es) % 16 == 0 and t.data_ptr() % 16 == 0)


def _descriptor(t: torch.Tensor, block_n: int, D: int):
    B, S, H, _ = t.shape
    # a strided 2-D view: rows are (b, s), columns (h, d); no copy
    return TensorDescriptor(t, [B * S, H * D], [t.stride(1), 1], [block_n, D])


# The Hopper kernel in Gluon (flash_fwd_gluon.py: a TMA producer warp, two consumer
# warpgroups whose softmax runs under their own in-flight wgmma) where it applies: sm_90, bf16 /
# fp16, head dim 64 / 128 for q, k and v, one sequence (B = 1: rows past a batch's keys are
# never read as another batch's values), and problems of at least GLUON_MIN_WORK query x key
# pairs (below, its host work, three descriptors and triton's launch path, is not paid back).
# On one H200 (session 22, bench_gluon_fwd.py, bf16 D128, 16K / 32K, MHA / GQA, causal and
# not) it ran 607-645 TFLOP/s against cuDNN's 580-626 and this file's Triton kernel's 508-569.
# Strided (striped-ring) positions, windows and soft-caps too since session 23 (their GPU
# tests passed; bench_gluon_fwd.py --striped at 32K: 1.09-1.14x the Triton kernel on striped
# shards, windows of 4096 causal and two-sided, and a 50.0 soft-cap). RINGSERVE_FLASH_IMPL=triton
# (or impl="triton") keeps the Triton kernel; "gluon" asks for the Gluon one wherever it applies.
IMPLS = ("auto", "triton", "gluon")
GLUON_MIN_WORK = 1 << 22
_IMPL_DEFAULT = os.environ.get("RINGSERVE_FLASH_IMPL", "auto")
_gluon_broken: dict = {}   # `_gluon_key` -> why its Gluon launch failed here (then Triton)


def _gluon_key(q, causal, window_size, softcap, q_stride, k_stride) -> tuple:
    """`_gluon_broken`'s key: dtype, head dim, causal, and which mask paths (strided
    positions, a window, a soft-cap) the program has: one failing variant leaves the others."""
    return (q.dtype, q.shape[3], bool(causal), q_stride != 1 or k_stride != 1,
            window_size is not None, bool(softcap))


def _gluon_applies(q, k, v, causal, window_size, softcap, q_stride, k_stride,
                   min_work: int, q_offset: int = 0, k_offset: int = 0) -> bool:
    B, Sq, Hq, D = q.shape
    if not (q.is_cuda and B == 1 and D in (64, 128)
            and q.dtype in (torch.bfloat16, torch.float16)
            and k.shape == v.shape and Sq * k.shape[1] >= min_work
            and _gluon_key(q, causal, window_size, softcap, q_stride, k_stride)
            not in _gluon_broken):
        return False
    if (q_stride != 1 or k_stride != 1 or window_size is not None) and _gluon_span(
            q, k, q_offset, k_offset, q_stride, k_stride) >= 2 ** 30:
        return False      # its position arithmetic is int32 (the Triton kernel's is not)
    p = _props(q.device)
    if (p.major, p.minor) != (9, 0):
        return False
    from . import flash_fwd_gluon as fg
    return fg.GLUON_AVAILABLE and all(fg._tma_layout_ok(t) for t in (q, k, v))


def _gluon_span(q, k, q_offset, k_offset, q_stride, k_stride) -> int:
    """The position range the Gluon kernel's strided / windowed bounds compute in (as
    flash_attn_fwd_gluon checks)."""
    return (abs(int(q_offset)) + abs(int(k_offset)) + q.shape[1] * int(q_stride)
            + k.shape[1] * int(k_stride))


def flash_attn_fwd(q, k, v, softmax_scale=None, causal=False, window_size=None,
                   q_offset=0, q_stride=1, k_offset=0, k_stride=1, *,
                   use_tma: Optional[bool] = None, warp_specialize: bool = False,
                   config: Optional[dict] = None, softcap: Optional[float] = None,
                   check: bool = True, impl: Optional[str] = None):
    """Attention forward. Returns (out (B, Sq, Hq, Dv) in q.dtype, lse (B, Hq, Sq) float32);
    v's head dim Dv may be narrower than q's and k's D (MLA's expanded form: 192 / 128).

    use_tma: load K/V through tensor descriptors (Hopper copy engine); None picks it when the
    layout allows. warp_specialize: tl.range(..., warp_specialize=True) on the key loops.
    config: fixed {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} instead of autotuning.
    softcap: Gemma 2's attention-logit soft-capping c (scores c * tanh(s / c)); None or 0: off.
    check=False skips the input validation (the engine's step, whose inputs it built: the
    checks are a few us a call on the host-bound mixed step's critical path).
    impl: "auto" (the default, or the RINGSERVE_FLASH_IMPL variable's value): the Hopper Gluon
    kernel (flash_fwd_gluon.py) where it applies to a problem of at least GLUON_MIN_WORK
    query x key pairs and no Triton knob (use_tma, warp_specialize, config) is given, else the
    Triton kernel; "triton": always the Triton kernel; "gluon": the Gluon kernel wherever it
    applies, whatever the size (ValueError where it does not).
    """
    if check:
        _check_inputs(q, k, v, softmax_scale, window_size, q_stride, k_stride, softcap)
    impl = _IMPL_DEFAULT if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "gluon" or (impl == "auto" and use_tma is None and not warp_specialize
                           and config is None):
        if _gluon_applies(q, k, v, causal, window_size, softcap, q_stride, k_stride,
                          GLUON_MIN_WORK if impl == "auto" else 1, q_offset, k_offset):
            out = _gluon_fwd(q, k, v, softmax_scale, causal, q_offset, k_offset, q_stride,
                             k_stride, window_size, softcap)
            if out is not None:
                return out
        elif impl == "gluon":
            why = _gluon_refusal(q, k, v, causal, window_size, softcap, q_stride, k_stride,
                                 q_offset, k_offset)
            raise ValueError(f"flash_attn_fwd(impl='gluon'): the Gluon kernel does not apply: "
                             f"{why}")
    B, Sq, Hq, D = q.shape
    Sk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if B == 0 or Sq == 0 or Hq == 0 or D == 0 or Sk == 0:   # nothing visible: lse -inf, out 0
        return (torch.zeros(B, Sq, Hq, Dv, dtype=q.dtype, device=q.device),
                torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device))
    # every program stores all its rows (a row that sees no key: out 0, lse -inf), so no fill
    # kernels first (two launches a call, four a layer in a chunk's step)
    out = torch.empty(B, Sq, Hq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    block_d = max(16, next_pow2(D))
    block_dv = max(16, next_pow2(Dv))
    on_cpu = q.device.type == "cpu"
    if config is None and on_cpu:
        config = CPU_CONFIG
    can_tma = (not on_cpu) and _tma_ok(k, D) and _tma_ok(v, Dv)
    if use_tma is None:
        use_tma = can_tma
    elif use_tma and not (can_tma or (on_cpu and TensorDescriptor is not None and D == block_d
                                      and Dv == block_dv
                                      and k.stride(2) == D and v.stride(2) == Dv
                                      and k.stride(3) == 1 and v.stride(3) == 1
                                      and (B == 1 or (k.stride(0) == Sk * k.stride(1)
                                                      and v.stride(0) == Sk * v.stride(1))))):
        raise ValueError(f"use_tma=True but k/v layout (strides {k.stride()}, {v.stride()}, "
                         f"head dim {D}) cannot be tiled by tensor descriptors")
    # fp32 inputs get true fp32 products (the GPU would use tf32 otherwise: ~3e-4 error)
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d, HEAD_DIM_V=Dv, BLOCK_DV=block_dv,
                CAUSAL=bool(causal),
                HAS_WINDOW=window_size is not None, USE_TMA=bool(use_tma),
                WARP_SPEC=bool(warp_specialize), DOT_PREC=dot_prec,
                IDX64=max(Sk * max(k.stride(1), v.stride(1)), Sq * q.stride(1)) >= 2 ** 31,
                # soft-capping's tanh: 2 = the GPU's tanh.approx (one MUFU op a score, as
                # FlashAttention's soft-cap); 1 = from exp2 (the CPU interpreter has no asm)
                SOFTCAP=0 if not softcap else 1 if on_cpu else 2)
    chosen_key = None
    if config is None:   # the autotuner's choice for this key, once it has made one
        chosen_key = (bool(warp_specialize), q.dtype, q.device, tuple(meta.values()),
                      seq_bucket(Sq, Sk))
        config = _chosen.get(chosen_key)
        if config is not None:
            chosen_key = None
    if use_tma:
        bn = config["BLOCK_N"] if config is not None else 64   # the pre-hook resets it per config
        k_arg, v_arg = _descriptor(k, bn, D), _descriptor(v, bn, Dv)
    else:
        k_arg, v_arg = k, v
    window = int(window_size) if window_size is not None else 0
    args = _kernel_args(q, k, v, k_arg, v_arg, out, lse, q_offset, q_stride, k_offset,
                        k_stride, window, scale, softcap)
    if config is not None:
        grid = (cdiv(Sq, config["BLOCK_M"]), B * Hq)
        _flash_fwd_fast(grid, *args, **meta, **config)
    else:
        if Sq * Sk > _PROXY_TOKENS ** 2:
            _tune_on_proxy(q, k, v, Hq, Hkv, D, Dv, meta, bool(warp_specialize))

        def grid(c):
            return (cdiv(Sq, c["BLOCK_M"]), B * Hq)
        tuner = _tuned[bool(warp_specialize)]
        tuner[grid](*args, **meta)
        # later calls with this key launch the chosen config directly: the autotuner's own
        # per-call work (its key and argument dicts over ~40 arguments, the pre-hook) is
        # ~64 calls a mixed step on the host's critical path
        _chosen[chosen_key] = tuner.best_config.all_kwargs()
    return out, lse


def _gluon_refusal(q, k, v, causal, window_size, softcap, q_stride, k_stride, q_offset=0,
                   k_offset=0) -> str:
    """Why `_gluon_applies` said no, for impl="gluon"'s error."""
    if q.dim() == 4 and q.shape[0] != 1:
        return f"one sequence (B = 1) only, got B = {q.shape[0]}"
    key = _gluon_key(q, causal, window_size, softcap, q_stride, k_stride)
    if key in _gluon_broken:
        return f"it failed here before: {_gluon_broken[key]}"
    from .flash_fwd_gluon import gluon_unsupported_reason
    why = gluon_unsupported_reason(q, k, v, causal, window_size, softcap, q_stride, k_stride)
    if why is None and (q_stride != 1 or k_stride != 1 or window_size is not None):
        if _gluon_span(q, k, q_offset, k_offset, q_stride, k_stride) >= 2 ** 30:
            why = "positions out of its int32 range"
    return why or "values narrower than keys (MLA's expanded form) stay on the Triton kernel"


def _gluon_fwd(q, k, v, softmax_scale, causal, q_offset, k_offset, q_stride=1, k_stride=1,
               window_size=None, softcap=None):
    """The Gluon kernel's (out, lse); None (and a warning, once per dtype / head dim / mask)
    when it fails to compile or launch here: that key takes the Triton kernel from then on."""
    from .flash_fwd_gluon import flash_attn_fwd_gluon
    key = _gluon_key(q, causal, window_size, softcap, q_stride, k_stride)
    try:
        # the routing (_gluon_applies) checked what the wrapper would check again
        return flash_attn_fwd_gluon(q, k, v, softmax_scale, causal, q_offset, k_offset,
                                    q_stride=q_stride, k_stride=k_stride,
                                    window_size=window_size, softcap=softcap, check=False)
    except Exception as e:  # noqa: BLE001 - a compile or launch failure: Triton from now on
        _gluon_broken[key] = repr(e)[:300]
        warnings.warn(f"flash_attn_fwd: the Gluon kernel failed for {key} ({e!r:.200}); the "
                      f"Triton kernel takes these calls from now on", stacklevel=3)
        return None


# (warp_specialize, dtype, device, meta values, sequence bucket) -> the autotuned config's
# launch kwargs (BLOCK_M, BLOCK_N, num_warps, num_stages, ...); a finer key than the
# autotuner's own (its _KEY values and argument dtypes), so a hit is always its choice
_chosen: dict = {}


def seq_bucket(sq: int, sk: int) -> int:
    """The sequence bucket of the autotuning key: the next power of two of the longer side,
    clamped to [128, 16384]. Below 128 every problem is one or two tiles and any config does;
    without the floor a short chunk (a 64-token first chunk of a 100-token prompt, cut by what
    was left of a busy step's budget) opened a new key in the middle of serving and paid an
    autotune of several compiles (3.3 s, measured on an H200 under load)."""
    return min(max(next_pow2(max(sq, sk)), 128), 1 << 14)


def _kernel_args(q, k, v, k_arg, v_arg, out, lse, q_offset, q_stride, k_offset, k_stride,
                 window, scale, softcap=None):
    """The kernel's positional arguments (k_arg / v_arg: the tensors or their descriptors);
    the last one, the sequence bucket, is part of the autotuning key. With a soft-cap c the
    kernel computes tanh(q.k * softcap_in) * qk_scale: softcap_in = scale / c, qk_scale =
    c * log2(e)."""
    Sq, Hq, Sk, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    return (q, k_arg, v_arg, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            Sq, Sk, Hq, Hq // Hkv, int(q_offset), int(q_stride), int(k_offset), int(k_stride),
            window, (softcap if softcap else scale) * LOG2E,
            scale / softcap if softcap else 1.0, seq_bucket(Sq, Sk))


# Autotuning times every config several times (~8 runs each) on the first problem of a key. The
# sequence bucket in the key stops at 16K, so the first long problem would be tuned at full size:
# measured on an H200, ~2 minutes at 512K tokens (a 512K one-GPU call that takes 4 s read as
# 75 s, and a 1M-token prefill spent ~2 minutes tuning inside its first layer). A key not tuned
# yet is therefore tuned on a proxy of _PROXY_TOKENS tokens with the same key (same dtype, head
# dim, mask kind, TMA choice, index width), which the real call then finds in the cache.
_PROXY_TOKENS = 1 << 14
_proxied: set = set()


def _tune_on_proxy(q, k, v, Hq, Hkv, D, Dv, meta, warp_specialize):
    key = (q.device, q.dtype, Hq, Hkv, D, Dv, warp_specialize, tuple(sorted(meta.items())))
    if key in _proxied:
        return
    _proxied.add(key)
    try:
        n = _PROXY_TOKENS
        pq = torch.randn(1, n, Hq, D, device=q.device).to(q.dtype)
        pk = torch.randn(1, n, Hkv, D, device=q.device).to(q.dtype)
        pv = torch.randn(1, n, Hkv, Dv, device=q.device).to(q.dtype)
        po = torch.empty(1, n, Hq, Dv, device=q.device, dtype=q.dtype)
        pl = torch.empty(1, Hq, n, dtype=torch.float32, device=q.device)
        if meta["USE_TMA"]:
            pk_arg, pv_arg = _descriptor(pk, 64, D), _descriptor(pv, 64, Dv)
        else:
            pk_arg, pv_arg = pk, pv
        pargs = _kernel_args(pq, pk, pv, pk_arg, pv_arg, po, pl, 0, 1, 0, 1,
                             1024 if meta["HAS_WINDOW"] else 0, 1.0 / math.sqrt(D),
                             50.0 if meta["SOFTCAP"] else None)

        def grid(c):
            return (cdiv(n, c["BLOCK_M"]), Hq)
        _tuned[warp_specialize][grid](*pargs, **meta)
    except Exception as e:  # noqa: BLE001 - the real call then tunes itself, as before
        warnings.warn(f"flash_attn_fwd: tuning on a proxy failed ({e!r:.200}); tuning on the "
                      f"real problem instead", stacklevel=2)
