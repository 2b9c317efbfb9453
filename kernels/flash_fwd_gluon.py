"""Hopper (sm_90a) flash-attention forward in Triton's Gluon dialect, FA3-style; the default
forward on sm_90 where `flash_fwd._gluon_applies` routes to it.

Same contract as `flash_fwd.flash_attn_fwd` for the case it supports (see `gluon_supported`):
q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D), Hq % Hkv == 0, bf16 or fp16, D in (64, 128),
contiguous (B, S, H, D) layouts. Query row i sits at position q_offset + i * q_stride, key row j
at k_offset + j * k_stride (striped ring shards: stride N); causal: key visible iff
k_pos <= q_pos; a sliding window w also requires q_pos - k_pos <= w (and, not causal,
k_pos - q_pos <= w); soft-capping c turns scores into c * tanh(s * scale / c). Returns
out (B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) float32 (natural log); a row that sees no
key gets out 0 and lse -inf.

One CTA computes 2 x 64 query rows of one (batch, q head) with three partitions
(`gl.warp_specialize`):
  * a producer warp streams K and V blocks through shared-memory ring buffers with TMA
    (separate K and V rings, each with "ready" / "empty" mbarriers, STAGES deep);
  * two consumer warpgroups, 64 query rows each (their own Q tile, loaded once by TMA), run
    the online softmax. Inside a warpgroup the wgmma of S_j = Q K_j^T and of O += P_{j-1} V_{j-1}
    are issued asynchronously back to back; the wait lets the O update keep running while the
    softmax of S_j (exp2 and FP32 work) executes, so the tensor cores are not idle during it
    (FA3's intra-warpgroup overlap). P stays in registers (the wgmma A operand) and never goes
    through shared memory. Optionally (PINGPONG) the two warpgroups take turns issuing their
    MMAs, so that one's softmax runs under the other's matmuls (FA3's ping-pong schedule).
Statistics are fp32 in the log2 domain (log2(e) folded into the scale). Key blocks the whole
CTA cannot see (causal, window) are never loaded: the producer streams blocks [n_lo, n_hi) only;
blocks every row of a warpgroup sees run without mask arithmetic; only the edge blocks (causal
diagonal, window borders, ragged end of the keys) pay for the mask. Query tiles are launched
heaviest first.

Strided positions (STRIDED), windows (HAS_WINDOW) and soft-capping (SOFTCAP) are constexpr
switches, off by default: with all three off the kernel is the same program (same PTX) as
before they existed; their scalar arguments are then passed as None (constexprs, not kernel
parameters).

Importing this module never fails: without a GPU-capable triton with Gluon's Hopper modules,
`GLUON_AVAILABLE` is False and `GLUON_UNAVAILABLE_REASON` says why.
"""
# Which paths have run on a GPU (keep this up to date; flash_fwd._gluon_applies routes only
# paths marked yes):
#   * unit position strides, no window, no soft-cap (bf16 / fp16, D 64 / 128, causal or not,
#     offsets, GQA, B >= 1, the PINGPONG / STAGES / BLOCK_N variants): yes, session 22
#     (tests/test_flash_gluon_gpu.py, benchmarks/bench_gluon_fwd.py on one H200).
#   * STRIDED (striped positions), HAS_WINDOW (sliding window, causal or two-sided), SOFTCAP
#     (tanh.approx soft-cap): yes, session 23 (written in session 22 without a GPU; on one
#     H200 the 24 mask tests of test_flash_gluon_gpu.py passed, and `bench_gluon_fwd.py
#     --striped` at 32K ran 1.09-1.14x the Triton kernel with its errors): routed since.
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

GLUON_AVAILABLE = False
GLUON_UNAVAILABLE_REASON = ""
try:  # pragma: no cover - depends on the installed triton
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    GLUON_AVAILABLE = True
except Exception as e:  # noqa: BLE001 - any failure means: use the Triton kernel
    GLUON_UNAVAILABLE_REASON = f"triton Gluon Hopper modules unavailable ({e!r:.200})"

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (64, 128)
BLOCK_M_WG = 64            # query rows per consumer warpgroup
NUM_CONSUMERS = 2          # consumer warpgroups per CTA: 128 query rows a CTA
# default launch configuration (per head dim); `flash_attn_fwd_gluon(config=...)` overrides it
DEFAULT_CONFIG = {
    128: {"BLOCK_N": 128, "STAGES": 2, "PINGPONG": False},
    64: {"BLOCK_N": 128, "STAGES": 3, "PINGPONG": False},
}
PRODUCER_REGS = 24         # registers a thread of the TMA producer warp keeps
CONSUMER_REGS = 240        # registers a thread of the second consumer warpgroup gets


if GLUON_AVAILABLE:

    @gluon.jit
    def _tanh_approx(x):
        # the GPU's tanh.approx.f32 (one MUFU op; max relative error ~2^-11, below bf16's
        # rounding of the scores), as flash_fwd.py's SOFTCAP == 2 path
        return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x],
                                         dtype=gl.float32, is_pure=True, pack=1)

    @gluon.jit
    def _kdiv(a, k_stride, STRIDED: gl.constexpr):
        """floor(a / k_stride) for k_stride >= 1 (integer // truncates toward zero); a itself
        when the positions are not strided."""
        r = a
        if STRIDED:
            r = gl.where(a >= 0, a // k_stride, -((k_stride - 1 - a) // k_stride))
        return r

    @gluon.jit
    def _key_range(q_lo, q_hi, Sk, k_offset, k_stride, window, CAUSAL: gl.constexpr,
                   HAS_WINDOW: gl.constexpr, STRIDED: gl.constexpr):
        """Key indices for queries at positions q_lo..q_hi (as flash_fwd._key_block_bounds):
        returns (j_lo, jf_lo, jf_hi, j_hi), each clamped to [0, Sk]: keys [j_lo, j_hi) hold
        every key some query may see, keys [jf_lo, jf_hi) are visible to every query."""
        zero = k_offset * 0
        j_lo = zero
        j_hi = zero + Sk
        jf_lo = zero
        jf_hi = zero + Sk
        if CAUSAL:
            j_hi = _kdiv(q_hi - k_offset, k_stride, STRIDED) + 1
            jf_hi = _kdiv(q_lo - k_offset, k_stride, STRIDED) + 1
        elif HAS_WINDOW:
            j_hi = _kdiv(q_hi + window - k_offset, k_stride, STRIDED) + 1
            jf_hi = _kdiv(q_lo + window - k_offset, k_stride, STRIDED) + 1
        if HAS_WINDOW:
            j_lo = -_kdiv(k_offset - (q_lo - window), k_stride, STRIDED)    # ceil division
            jf_lo = -_kdiv(k_offset - (q_hi - window), k_stride, STRIDED)
        j_lo = gl.minimum(gl.maximum(j_lo, 0), Sk)
        j_hi = gl.minimum(gl.maximum(j_hi, 0), Sk)
        jf_lo = gl.minimum(gl.maximum(jf_lo, 0), Sk)
        jf_hi = gl.minimum(gl.maximum(jf_hi, 0), Sk)
        return j_lo, jf_lo, jf_hi, j_hi

    @gluon.jit
    def _softmax_step(s, m_i, l_i, kidx, q_pos, Sk, k_offset, qk_scale, k_stride, window,
                      softcap_in, MASKED: gl.constexpr, CAUSAL: gl.constexpr,
                      STRIDED: gl.constexpr, HAS_WINDOW: gl.constexpr, SOFTCAP: gl.constexpr):
        """One block's online-softmax update: returns (p fp32, alpha, m_new, l_new).
        SOFTCAP: scores c * tanh(s * scale / c); the host passes softcap_in = scale / c and
        qk_scale = c * log2(e)."""
        if SOFTCAP:
            s = _tanh_approx(s * softcap_in)
        if MASKED:
            vis = gl.expand_dims(kidx < Sk, 0)
            if CAUSAL or HAS_WINDOW:
                if STRIDED:
                    k_pos = k_offset + kidx * k_stride
                else:
                    k_pos = k_offset + kidx
            if CAUSAL:
                vis = vis & (gl.expand_dims(k_pos, 0) <= gl.expand_dims(q_pos, 1))
            if HAS_WINDOW:
                qp = gl.expand_dims(q_pos, 1)
                kp = gl.expand_dims(k_pos, 0)
                vis = vis & (qp - kp <= window)
                if not CAUSAL:
                    vis = vis & (kp - qp <= window)
            s = gl.where(vis, s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, 1))
            # a row that has seen no visible key keeps m = -inf: subtract 0 instead (no NaN)
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s - gl.expand_dims(m_use, 1))
            alpha = gl.exp2(m_i - m_use)
        else:
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
            alpha = gl.exp2(m_i - m_new)
        l_new = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_new

    @gluon.jit
    def _pp_wait(turn_bar, k, WG: gl.constexpr, PINGPONG: gl.constexpr):
        # ping-pong: warpgroup 0 issues its k-th MMA batch after warpgroup 1's (k-1)-th,
        # warpgroup 1 its k-th after warpgroup 0's k-th (parity trick: a fresh barrier's
        # "previous phase" (parity 1) counts as complete)
        if PINGPONG:
            if WG == 0:
                mbarrier.wait(turn_bar.index(0), (k + 1) & 1)
            else:
                mbarrier.wait(turn_bar.index(1), k & 1)

    @gluon.jit
    def _pp_signal(turn_bar, WG: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn_bar.index(1 - WG), count=1)

    @gluon.jit
    def _attend_range(o, m_i, l_i, p_prev, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready,
                      v_empty, turn_bar, j_from, j_to, n_lo, q_pos, Sk, k_offset, qk_scale,
                      k_stride, window, softcap_in,
                      s_layout: gl.constexpr, p_layout: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      MASKED: gl.constexpr, CAUSAL: gl.constexpr, WG: gl.constexpr,
                      PINGPONG: gl.constexpr, STRIDED: gl.constexpr, HAS_WINDOW: gl.constexpr,
                      SOFTCAP: gl.constexpr):
        """Key blocks [j_from, j_to) (each > n_lo): per block j, S_j = Q K_j^T and
        O += P_{j-1} V_{j-1} in flight together; softmax(S_j) runs while the second one does.
        Block j sits in ring slot (j - n_lo) % STAGES (the producer's numbering)."""
        o_layout: gl.constexpr = o.type.layout
        for j in range(j_from, j_to):
            i = j - n_lo
            s_idx = i % STAGES
            s_ph = (i // STAGES) & 1
            pv_idx = (i - 1) % STAGES
            pv_ph = ((i - 1) // STAGES) & 1
            mbarrier.wait(k_ready.index(s_idx), s_ph)
            _pp_wait(turn_bar, i, WG, PINGPONG)
            s = warpgroup_mma(q_smem, k_smem.index(s_idx).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                              use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(pv_idx), pv_ph)
            o = warpgroup_mma(p_prev, v_smem.index(pv_idx), o, is_async=True)
            _pp_signal(turn_bar, WG, PINGPONG)
            # S_j done (MMA groups complete in order); P_{j-1} V_{j-1} may still run
            s = warpgroup_mma_wait(num_outstanding=1, deps=[s])
            mbarrier.arrive(k_empty.index(s_idx), count=1)
            kidx = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, kidx, q_pos, Sk, k_offset, qk_scale,
                                               k_stride, window, softcap_in, MASKED, CAUSAL,
                                               STRIDED, HAS_WINDOW, SOFTCAP)
            o, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=[o, p_prev])
            mbarrier.arrive(v_empty.index(pv_idx), count=1)
            o = o * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            p_prev = gl.convert_layout(p.to(q_smem.dtype), p_layout)
        return o, m_i, l_i, p_prev

    @gluon.jit
    def _consumer(q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                  turn_bar, Out, Lse, out_base, stride_os, lse_base, row0, q_desc_row, q_desc_col,
                  Sq, Sk, q_offset, k_offset, qk_scale, n_lo, n_hi,
                  q_stride, k_stride, window, softcap_in,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, CAUSAL: gl.constexpr, WG: gl.constexpr,
                  PINGPONG: gl.constexpr, STRIDED: gl.constexpr, HAS_WINDOW: gl.constexpr,
                  SOFTCAP: gl.constexpr):
        """One consumer warpgroup: query rows [row0, row0 + BLOCK_M) of the CTA's (b, h). It
        goes through every key block [n_lo, n_hi) the CTA loads (both warpgroups release each
        ring slot), with the mask on all but the blocks every one of its rows sees."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        dtype: gl.constexpr = q_smem.dtype

        # this warpgroup's Q tile, once (rows past Sq belong to the next batch or are zero
        # filled: they are computed and never stored)
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_desc_row, q_desc_col], q_bar, q_smem)

        rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        if STRIDED:
            q_pos = q_offset + rows * q_stride
        else:
            q_pos = q_offset + rows
        if STRIDED or HAS_WINDOW:
            # key blocks [f_lo, f_hi) are visible to every row of this warpgroup and lie in
            # [0, Sk) (rows past Sq count as rows: a superset only narrows the range)
            if STRIDED:
                wq_lo = q_offset + row0 * q_stride
                wq_hi = q_offset + (row0 + BLOCK_M - 1) * q_stride
            else:
                wq_lo = q_offset + row0
                wq_hi = q_offset + (row0 + BLOCK_M - 1)
            _j_lo, jf_lo, jf_hi, _j_hi = _key_range(wq_lo, wq_hi, Sk, k_offset, k_stride, window,
                                                    CAUSAL, HAS_WINDOW, STRIDED)
            f_lo = gl.cdiv(jf_lo, BLOCK_N)
            f_hi = jf_hi // BLOCK_N
        else:
            # key blocks [n_lo, f_hi) are visible to every row of this warpgroup and lie in
            # [0, Sk)
            jf_hi = Sk
            if CAUSAL:
                jf_hi = gl.minimum(gl.maximum(q_offset + row0 - k_offset + 1, 0), Sk)
            f_hi = jf_hi // BLOCK_N

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
        p_prev = gl.zeros([BLOCK_M, BLOCK_N], dtype, p_layout)
        mbarrier.wait(q_bar, 0)

        if n_hi > n_lo:
            # prologue: block n_lo (ring slot 0, phase 0), softmax only (always masked)
            mbarrier.wait(k_ready.index(0), 0)
            _pp_wait(turn_bar, 0, WG, PINGPONG)
            s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                              use_acc=False, is_async=True)
            _pp_signal(turn_bar, WG, PINGPONG)
            s = warpgroup_mma_wait(num_outstanding=0, deps=[s])
            mbarrier.arrive(k_empty.index(0), count=1)
            kidx = n_lo * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, kidx, q_pos, Sk, k_offset, qk_scale,
                                               k_stride, window, softcap_in, True, CAUSAL,
                                               STRIDED, HAS_WINDOW, SOFTCAP)
            p_prev = gl.convert_layout(p.to(dtype), p_layout)

            # blocks after the prologue: [n_lo + 1, j_a) masked (window's leading border),
            # [j_a, j_mid) unmasked, [j_mid, n_hi) masked (causal diagonal, window's trailing
            # border, ragged end of the keys)
            if STRIDED or HAS_WINDOW:
                j_a = gl.minimum(gl.maximum(f_lo, n_lo + 1), n_hi)
                j_mid = gl.minimum(gl.maximum(f_hi, j_a), n_hi)
                no_full = f_hi <= f_lo      # no block every row sees: all masked
                j_a = gl.where(no_full, n_lo + 1, j_a)
                j_mid = gl.where(no_full, n_lo + 1, j_mid)
            else:
                j_a = n_lo + 1
                j_mid = gl.maximum(gl.minimum(f_hi, n_hi), n_lo + 1)
            if HAS_WINDOW:
                o, m_i, l_i, p_prev = _attend_range(
                    o, m_i, l_i, p_prev, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready,
                    v_empty, turn_bar, n_lo + 1, j_a, n_lo, q_pos, Sk, k_offset, qk_scale,
                    k_stride, window, softcap_in, s_layout, p_layout, BLOCK_M, BLOCK_N, STAGES,
                    True, CAUSAL, WG, PINGPONG, STRIDED, HAS_WINDOW, SOFTCAP)
            # interior: every key visible to every row, no mask arithmetic
            o, m_i, l_i, p_prev = _attend_range(
                o, m_i, l_i, p_prev, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                turn_bar, j_a, j_mid, n_lo, q_pos, Sk, k_offset, qk_scale, k_stride, window,
                softcap_in, s_layout, p_layout, BLOCK_M, BLOCK_N, STAGES, False, CAUSAL, WG,
                PINGPONG, STRIDED, HAS_WINDOW, SOFTCAP)
            # the causal diagonal and the ragged end of the keys
            o, m_i, l_i, p_prev = _attend_range(
                o, m_i, l_i, p_prev, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                turn_bar, j_mid, n_hi, n_lo, q_pos, Sk, k_offset, qk_scale, k_stride, window,
                softcap_in, s_layout, p_layout, BLOCK_M, BLOCK_N, STAGES, True, CAUSAL, WG,
                PINGPONG, STRIDED, HAS_WINDOW, SOFTCAP)

            # epilogue: the last P V
            i = n_hi - n_lo - 1
            mbarrier.wait(v_ready.index(i % STAGES), (i // STAGES) & 1)
            _pp_wait(turn_bar, i + 1, WG, PINGPONG)
            o = warpgroup_mma(p_prev, v_smem.index(i % STAGES), o, is_async=True)
            _pp_signal(turn_bar, WG, PINGPONG)
            o, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=[o, p_prev])

        # normalize and store (rows past Sq are not stored)
        seen = l_i > 0.0
        l_safe = gl.where(seen, l_i, 1.0)
        lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        gl.store(Lse + lse_base + rows, lse, mask=rows < Sq)
        inv = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
        out = (o * gl.expand_dims(inv, 1)).to(dtype)
        o_rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptrs = (Out + out_base + gl.expand_dims(o_rows.to(gl.int64) * stride_os, 1)
                + gl.expand_dims(o_cols, 0))
        gl.store(ptrs, out, mask=gl.expand_dims(o_rows < Sq, 1))

    @gluon.jit
    def _consumer0(q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                   turn_bar, Out, Lse, out_base, stride_os, lse_base, m0, q_desc_row, q_desc_col,
                   Sq, Sk, q_offset, k_offset, qk_scale, n_lo, n_hi,
                   q_stride, k_stride, window, softcap_in,
                   HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                   STRIDED: gl.constexpr, HAS_WINDOW: gl.constexpr, SOFTCAP: gl.constexpr):
        _consumer(q_desc, q_smem.index(0), q_bar.index(0), k_smem, v_smem, k_ready, k_empty,
                  v_ready, v_empty, turn_bar, Out, Lse, out_base, stride_os, lse_base, m0,
                  q_desc_row, q_desc_col, Sq, Sk, q_offset, k_offset, qk_scale, n_lo, n_hi,
                  q_stride, k_stride, window, softcap_in,
                  HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, 0, PINGPONG,
                  STRIDED, HAS_WINDOW, SOFTCAP)

    @gluon.jit
    def _consumer1(q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                   turn_bar, Out, Lse, out_base, stride_os, lse_base, m0, q_desc_row, q_desc_col,
                   Sq, Sk, q_offset, k_offset, qk_scale, n_lo, n_hi,
                   q_stride, k_stride, window, softcap_in,
                   HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr,
                   STRIDED: gl.constexpr, HAS_WINDOW: gl.constexpr, SOFTCAP: gl.constexpr):
        _consumer(q_desc, q_smem.index(1), q_bar.index(1), k_smem, v_smem, k_ready, k_empty,
                  v_ready, v_empty, turn_bar, Out, Lse, out_base, stride_os, lse_base,
                  m0 + BLOCK_M, q_desc_row + BLOCK_M, q_desc_col, Sq, Sk, q_offset, k_offset,
                  qk_scale, n_lo, n_hi, q_stride, k_stride, window, softcap_in,
                  HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, 1, PINGPONG,
                  STRIDED, HAS_WINDOW, SOFTCAP)

    @gluon.jit
    def _producer(k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                  kv_row0, kv_col, n_lo, n_hi, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """TMA loads of K_j and V_j into ring slot (j - n_lo) % STAGES. An "empty" barrier
        completes a phase when both consumers released the slot; waiting for the parity of
        the phase before the current one passes at once on a fresh barrier."""
        for j in range(n_lo, n_hi):
            i = j - n_lo
            idx = i % STAGES
            ph = ((i // STAGES) & 1) ^ 1
            row = kv_row0 + j * BLOCK_N
            mbarrier.wait(k_empty.index(idx), ph)
            mbarrier.expect(k_ready.index(idx), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row, kv_col], k_ready.index(idx),
                                            k_smem.index(idx))
            mbarrier.wait(v_empty.index(idx), ph)
            mbarrier.expect(v_ready.index(idx), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [row, kv_col], v_ready.index(idx),
                                            v_smem.index(idx))

    # q_stride / k_stride (STRIDED), window (HAS_WINDOW) and softcap_in (SOFTCAP) are None
    # when their switch is off: a None argument is a constexpr, not a kernel parameter, so the
    # program with every switch off is exactly the one without them. Not specialized on their
    # values (as flash_fwd.py): a window of 4096 or a stride of 1 next to one of 2 would
    # otherwise compile another variant in the middle of serving.
    @gluon.jit(do_not_specialize=["q_offset", "k_offset", "q_stride", "k_stride", "window"])
    def _flash_fwd_gluon_kernel(q_desc, k_desc, v_desc, Out, Lse,
                                stride_ob, stride_os, stride_oh,
                                Sq, Sk, Hq, GROUP, q_offset, k_offset, qk_scale,
                                HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                                STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                                PINGPONG: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                                CONSUMER_REGS: gl.constexpr,
                                q_stride=None, k_stride=None, window=None, softcap_in=None,
                                STRIDED: gl.constexpr = False, HAS_WINDOW: gl.constexpr = False,
                                SOFTCAP: gl.constexpr = False):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]     # rows per consumer warpgroup
        dtype: gl.constexpr = q_desc.dtype
        num_m = gl.cdiv(Sq, 2 * BLOCK_M)
        pid_m = num_m - 1 - gl.program_id(0)     # causal: the last rows cost most, start them first
        pid_bh = gl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // GROUP
        m0 = pid_m * (2 * BLOCK_M)

        if STRIDED or HAS_WINDOW:
            # key blocks any row of this CTA may see: [n_lo, n_hi) (n_lo > 0 under a window)
            if STRIDED:
                q_lo = q_offset + m0 * q_stride
                q_hi = q_offset + (gl.minimum(m0 + 2 * BLOCK_M, Sq) - 1) * q_stride
            else:
                q_lo = q_offset + m0
                q_hi = q_offset + gl.minimum(m0 + 2 * BLOCK_M, Sq) - 1
            j_lo, _jf_lo, _jf_hi, j_hi = _key_range(q_lo, q_hi, Sk, k_offset, k_stride, window,
                                                    CAUSAL, HAS_WINDOW, STRIDED)
            n_lo = j_lo // BLOCK_N
            n_hi = gl.maximum(gl.cdiv(j_hi, BLOCK_N), n_lo)
        else:
            # key blocks any row of this CTA may see: [0, n_hi)
            n_lo = 0
            j_hi = Sk
            if CAUSAL:
                q_hi = q_offset + gl.minimum(m0 + 2 * BLOCK_M, Sq) - 1
                j_hi = gl.minimum(gl.maximum(q_hi - k_offset + 1, 0), Sk)
            n_hi = gl.cdiv(j_hi, BLOCK_N)

        q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        turn_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(2):
            mbarrier.init(q_bar.index(w), count=1)
            mbarrier.init(turn_bar.index(w), count=1)
        for s in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(s), count=1)
            mbarrier.init(v_ready.index(s), count=1)
            mbarrier.init(k_empty.index(s), count=2)     # one arrival per consumer warpgroup
            mbarrier.init(v_empty.index(s), count=2)
        fence_async_shared()

        out_base = b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
        lse_base = pid_bh.to(gl.int64) * Sq
        q_desc_row = b * Sq + m0
        q_desc_col = h * HEAD_DIM
        kv_row0 = b * Sk
        kv_col = hk * HEAD_DIM
        gl.warp_specialize([
            (_consumer0, (q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, k_empty, v_ready,
                          v_empty, turn_bar, Out, Lse, out_base, stride_os, lse_base, m0,
                          q_desc_row, q_desc_col, Sq, Sk, q_offset, k_offset, qk_scale, n_lo,
                          n_hi, q_stride, k_stride, window, softcap_in, HEAD_DIM, BLOCK_M,
                          BLOCK_N, STAGES, CAUSAL, PINGPONG, STRIDED, HAS_WINDOW, SOFTCAP)),
            (_consumer1, (q_desc, q_smem, q_bar, k_smem, v_smem, k_ready, k_empty, v_ready,
                          v_empty, turn_bar, Out, Lse, out_base, stride_os, lse_base, m0,
                          q_desc_row, q_desc_col, Sq, Sk, q_offset, k_offset, qk_scale, n_lo,
                          n_hi, q_stride, k_stride, window, softcap_in, HEAD_DIM, BLOCK_M,
                          BLOCK_N, STAGES, CAUSAL, PINGPONG, STRIDED, HAS_WINDOW, SOFTCAP)),
            (_producer, (k_desc, v_desc, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                         kv_row0, kv_col, n_lo, n_hi, BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def gluon_supported(q, k, v, causal=False, window_size=None, softcap=None, q_stride=1,
                    k_stride=1) -> bool:
    """True when `flash_attn_fwd_gluon` applies to these inputs (else use flash_attn_fwd)."""
    return gluon_unsupported_reason(q, k, v, causal, window_size, softcap, q_stride,
                                    k_stride) is None


def gluon_unsupported_reason(q, k, v, causal=False, window_size=None, softcap=None, q_stride=1,
                             k_stride=1) -> Optional[str]:
    """None when the Gluon kernel applies, else a short reason. Strides (ints >= 1), a window
    (None or an int >= 0) and a soft-cap (None / 0: off, else finite > 0) are supported (see the
    GPU-status note at the top of this file: flash_fwd routes none of them here yet)."""
    if not GLUON_AVAILABLE:
        return GLUON_UNAVAILABLE_REASON
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return f"{name} is not a 4-D tensor"
        if not t.is_cuda:
            return f"{name} is not on a CUDA device"
        if t.dtype not in (torch.bfloat16, torch.float16):
            return f"{name} dtype {t.dtype} (bf16 / fp16 only)"
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        return "q, k, v differ in dtype or device"
    if torch.cuda.get_device_capability(q.device) != (9, 0):
        return "not an sm_90 (Hopper) device"
    B, Sq, Hq, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head dim {D} not in {SUPPORTED_HEAD_DIMS}"
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        return "k / v shapes do not match q"
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        return "Hq is not a multiple of Hkv"
    if window_size is not None and not (_is_int(window_size) and window_size >= 0):
        return f"window_size must be None or an int >= 0, got {window_size!r}"
    if softcap is not None and softcap != 0 and not (
            isinstance(softcap, numbers.Real) and math.isfinite(softcap) and softcap > 0):
        return f"softcap must be None, 0 (off) or a finite float > 0, got {softcap!r}"
    for name, st in (("q_stride", q_stride), ("k_stride", k_stride)):
        if not (_is_int(st) and st >= 1):
            return f"{name} must be an int >= 1, got {st!r}"
    if min(B, Sq, Hq, k.shape[1]) == 0:
        return "empty input"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not _tma_layout_ok(t):
            return f"{name} layout cannot be tiled by TMA (strides {t.stride()})"
    return None


def _is_int(x) -> bool:
    return (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
            and int(x) == x)


def _tma_layout_ok(t: torch.Tensor) -> bool:
    """(B, S, H, D) seen as a 2-D (B*S, H*D) tensor the copy engine can tile."""
    B, S, H, D = t.shape
    es = t.element_size()
    return (t.stride(3) == 1 and t.stride(2) == D
            and (B == 1 or t.stride(0) == S * t.stride(1))
            and (t.stride(1) * es) % 16 == 0 and t.data_ptr() % 16 == 0
            and B * S < 2 ** 31)


def _gl_dtype(dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def _descriptor(t: torch.Tensor, block_rows: int):
    B, S, H, D = t.shape
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, D], _gl_dtype(t.dtype))
    return GluonTensorDescriptor(t, [B * S, H * D], [t.stride(1), 1], [block_rows, D], layout)


def flash_attn_fwd_gluon(q, k, v, softmax_scale=None, causal=False, q_offset=0, k_offset=0,
                         *, q_stride=1, k_stride=1, window_size=None, softcap=None,
                         config: Optional[dict] = None, check: bool = True):
    """Attention forward on Hopper through the Gluon kernel. Returns (out (B, Sq, Hq, D) in
    q.dtype, lse (B, Hq, Sq) float32, natural log). Query row i sits at position
    q_offset + i * q_stride, key row j at k_offset + j * k_stride. Causal: key visible iff
    k_pos <= q_pos; window_size w: also q_pos - k_pos <= w (not causal: |q_pos - k_pos| <= w);
    softcap c: scores c * tanh(s * scale / c) (None or 0: off). Raises ValueError where
    `gluon_supported` is False. config: {"BLOCK_N", "STAGES", "PINGPONG"} overrides.
    check=False skips those checks (flash_fwd.flash_attn_fwd, whose routing made them)."""
    if check:
        why = gluon_unsupported_reason(q, k, v, causal, window_size, softcap, q_stride,
                                       k_stride)
        if why is not None:
            raise ValueError(f"flash_attn_fwd_gluon: unsupported input: {why}")
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    q_offset, k_offset = int(q_offset), int(k_offset)
    q_stride, k_stride = int(q_stride), int(k_stride)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    strided = q_stride != 1 or k_stride != 1
    has_window = window_size is not None
    # every position, and the kernel's bound arithmetic (position +- window), in int32
    span = abs(q_offset) + abs(k_offset) + Sq * q_stride + Sk * k_stride
    if (strided or has_window) and span >= 2 ** 30:
        raise ValueError(f"flash_attn_fwd_gluon: positions out of int32 range (offsets "
                         f"{q_offset} / {k_offset}, strides {q_stride} / {k_stride})")
    # a window wider than any |q_pos - k_pos| removes nothing: clamped to that (int32-safe)
    window = min(int(window_size), span) if has_window else None
    has_softcap = bool(softcap)
    cfg = dict(DEFAULT_CONFIG[D])
    if config:
        cfg.update(config)
    block_n, stages = int(cfg["BLOCK_N"]), int(cfg["STAGES"])
    out = torch.empty(B, Sq, Hq, D, dtype=q.dtype, device=q.device)   # contiguous, as Triton's
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    q_desc = _descriptor(q, BLOCK_M_WG)
    k_desc = _descriptor(k, block_n)
    v_desc = _descriptor(v, block_n)
    grid = (triton.cdiv(Sq, NUM_CONSUMERS * BLOCK_M_WG), B * Hq)
    # soft-cap c: the kernel computes tanh(s * softcap_in) * qk_scale with softcap_in = scale / c
    # and qk_scale = c * log2(e). A switched-off feature's scalars go as None (constexprs): the
    # kernel is then the program it was before the feature existed.
    _flash_fwd_gluon_kernel[grid](
        q_desc, k_desc, v_desc, out, lse, out.stride(0), out.stride(1), out.stride(2),
        Sq, Sk, Hq, Hq // Hkv, q_offset, k_offset,
        (float(softcap) if has_softcap else scale) * LOG2E,
        HEAD_DIM=D, BLOCK_N=block_n, STAGES=stages, CAUSAL=bool(causal),
        PINGPONG=bool(cfg["PINGPONG"]), PRODUCER_REGS=int(cfg.get("PRODUCER_REGS",
                                                                   PRODUCER_REGS)),
        CONSUMER_REGS=int(cfg.get("CONSUMER_REGS", CONSUMER_REGS)),
        q_stride=q_stride if strided else None, k_stride=k_stride if strided else None,
        window=window, softcap_in=scale / float(softcap) if has_softcap else None,
        STRIDED=strided, HAS_WINDOW=has_window, SOFTCAP=has_softcap, num_warps=4)
    return out, lse
