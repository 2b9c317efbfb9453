"""Flash-decoding over a paged KV cache (Triton): a few query tokens against a long cache.

Two launches. The split kernel gives each program one (batch, kv head, KV chunk): it reads that
chunk of K/V once, through the block table, for all the q heads that share the kv head (GQA) and
all Sq query tokens at once (rows = Sq * group), and writes a partial (out, lse) in float32. The
reduce kernel merges the chunks with the log-sum-exp rule. Splitting the KV length is what fills
the GPU when B * Hkv is small and the cache is long; the work is memory-bound, so the aim is to
stream K/V at copy bandwidth.

Contract (see reference.paged_decode_ref): q (B, Sq, Hq, D); k_cache, v_cache
(num_pages, page_size, Hkv, D); block_table (B, max_pages) int; seq_lens (B,) int; optional
q_pos (B, Sq) and kv_pos (num_pages, page_size) global positions for causal/window masking
(defaults: q_pos = seq_len, kv_pos = the token's index in its sequence). Returns out
(B, Sq, Hq, D) in q's dtype and lse (B, Hq, Sq) float32.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._host import FastLaunch, cdiv, next_pow2, sm_count
from .pdl import pdl_enter, pdl_kw

LOG2E = 1.4426950408889634   # host side
# log2(e) = 1.4426950408889634 and ln(2) = 0.6931471805599453 are written as literals in the
# kernels: a module-level constexpr is a global the launcher re-checks on every launch
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# up to MLA's latent (DeepSeek: 512 + 64 = 576, padded to a 1024-wide tile; small key tiles and
# 8 warps keep the wide rows in registers)
MAX_HEAD_DIM = 1024


@triton.jit
def _tanh(x):
    # from exp2, as in flash_fwd (the CPU interpreter has no libdevice)
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


# Query rows, table widths, split counts and chunk lengths vary from step to step: one compiled
# variant for all of them (see flash_fwd), not a compile when one happens to be 1 or a multiple
# of 16 in the middle of serving.
@triton.jit(do_not_specialize=["stride_qb", "stride_btb", "stride_qpb", "Sq", "chunk",
                               "num_splits", "capacity", "window"])
def _decode_split_kernel(
        Q, Kc, Vc, BlockTable, SeqLens, QPos, KvPos, OPart, LPart,
        stride_qb, stride_qs, stride_qh, stride_qd,
        stride_kp, stride_ks, stride_kh, stride_kd,
        stride_vp, stride_vs, stride_vh, stride_vd,
        stride_btb, stride_qpb, stride_qps, stride_kvp, stride_kvs,
        Sq, Hq, Hkv, GROUP, chunk, num_splits, capacity, window, qk_scale, softcap_in,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KVPOS: tl.constexpr,
        DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW_SKIP: tl.constexpr,
        PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b64, hk, t_lo, t_hi, row_ok, s_idx, hq, q_pos = _split_program(
        SeqLens, QPos, stride_qpb, stride_qps, Sq, Hkv, GROUP, chunk, num_splits, capacity,
        BLOCK_M, BLOCK_N, CAUSAL or HAS_WINDOW, HAS_QPOS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b64 * stride_qb + s_idx[:, None] * stride_qs + hq[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if WINDOW_SKIP:   # start at the first tile a row's window reaches
        lo_pos = tl.min(tl.where(row_ok, q_pos, 2147483647), 0) - window
        t_lo = _first_visible_tile(t_lo, t_hi, lo_pos, BlockTable + b64 * stride_btb, KvPos,
                                   stride_kvp, stride_kvs, PAGE_SIZE, BLOCK_N, HAS_KVPOS)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = Kc + hk.to(tl.int64) * stride_kh + offs_d[None, :] * stride_kd
    v_base = Vc + hk.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd
    for start in tl.range(t_lo, t_hi, BLOCK_N):
        t = start + offs_n
        t_ok = t < t_hi
        # logical token -> (physical page, slot): one block-table entry per key row, so a tile
        # may span several pages and page_size need not match BLOCK_N
        page = tl.load(BlockTable + b64 * stride_btb + t // PAGE_SIZE, mask=t_ok, other=0)
        slot = t % PAGE_SIZE
        page64 = page.to(tl.int64)
        ld = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + page64[:, None] * stride_kp + slot[:, None] * stride_ks,
                    mask=ld, other=0.0)
        v = tl.load(v_base + page64[:, None] * stride_vp + slot[:, None] * stride_vs,
                    mask=ld, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s = _masked_scores(qk, t, t_ok, q_pos, page64, slot, KvPos, stride_kvp, stride_kvs,
                           window, qk_scale, softcap_in, CAUSAL, HAS_WINDOW, HAS_KVPOS, SOFTCAP)
        p, alpha, l_i, m_i = _online_softmax(s, m_i, l_i)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)

    prow, inv_l = _store_lse(LPart, m_i, l_i, b64, hq, s_idx, row_ok, Sq, Hq, num_splits)
    tl.store(OPart + prow[:, None] * HEAD_DIM + offs_d[None, :], acc * inv_l[:, None],
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _split_program(SeqLens, QPos, stride_qpb, stride_qps, Sq, Hkv, GROUP, chunk, num_splits,
                   capacity, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   HAS_QPOS: tl.constexpr):
    """A split program's work (grid: split, batch entry x KV head, row block): its batch
    entry (int64) and KV head, its keys [t_lo, t_hi), and its query rows (row r = query token
    r // GROUP of q head hk * GROUP + r % GROUP: row_ok, the token, the q head) with their
    positions (MASKED: from QPos, or after the cache as the reference's default)."""
    split = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    n = tl.minimum(tl.load(SeqLens + b), capacity)   # never read past the block table
    # the splits share this sequence's own tiles: `chunk` (the host's, from max_seq_len or the
    # block table's width) only bounds them. A decode graph's table is a power-of-two width, up
    # to twice the sequence: chunks by the width left half the splits with nothing to do
    chunk = tl.minimum(chunk, tl.cdiv(tl.cdiv(n, BLOCK_N), num_splits) * BLOCK_N)
    t_lo = split * chunk
    # the last split takes whatever is left, so a too-small max_seq_len loses no keys
    t_hi = tl.where(split == num_splits - 1, n, tl.minimum(t_lo + chunk, n))
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq * GROUP
    s_idx = rows // GROUP
    hq = hk * GROUP + rows % GROUP
    b64 = b.to(tl.int64)
    if MASKED and HAS_QPOS:
        q_pos = tl.load(QPos + b64 * stride_qpb + s_idx * stride_qps, mask=row_ok, other=0)
    else:
        q_pos = tl.zeros([BLOCK_M], tl.int32) + n   # unmasked: unused
    return b64, hk, t_lo, t_hi, row_ok, s_idx, hq, q_pos


@triton.jit
def _store_lse(LPart, m_i, l_i, b64, hq, s_idx, row_ok, Sq, Hq, num_splits):
    """Store a split's lse (natural log; -inf for rows that saw no key) into LPart (B, Hq, Sq,
    num_splits); returns the rows' flat partial index and 1 / l for the caller's outputs
    (OPart (B, Hq, Sq, num_splits, D), contiguous)."""
    seen = l_i > 0.0
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    prow = ((b64 * Hq + hq) * Sq + s_idx) * num_splits + tl.program_id(0)
    tl.store(LPart + prow, lse, mask=row_ok)
    return prow, 1.0 / tl.where(seen, l_i, 1.0)


@triton.jit
def _first_visible_tile(t_lo, t_hi, lo_pos, Table, KvPos, stride_kvp, stride_kvs,
                        PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KVPOS: tl.constexpr):
    """The first tile start on the grid t_lo + k * BLOCK_N in [t_lo, t_hi) whose last key's
    position is >= lo_pos (t_lo + the tiles' count when none): every key before it is outside
    every row's window. Needs the positions of a sequence's keys to increase with their index
    (the engine's cache: a rank appends its tokens in position order); without KvPos the key
    at index t is at position t. A bisection over the tiles: ~log2(tiles) dependent loads."""
    n_tiles = (t_hi - t_lo + BLOCK_N - 1) // BLOCK_N
    if HAS_KVPOS:
        lo = n_tiles * 0
        hi = n_tiles
        while lo < hi:
            mid = (lo + hi) // 2
            t_last = tl.minimum(t_lo + mid * BLOCK_N + BLOCK_N - 1, t_hi - 1)
            page = tl.load(Table + t_last // PAGE_SIZE).to(tl.int64)
            pos = tl.load(KvPos + page * stride_kvp + (t_last % PAGE_SIZE) * stride_kvs)
            before = pos < lo_pos
            lo = tl.where(before, mid + 1, lo)
            hi = tl.where(before, hi, mid)
        k = lo
    else:
        k = tl.minimum(tl.maximum(lo_pos - t_lo, 0) // BLOCK_N, tl.maximum(n_tiles, 0))
    return t_lo + k * BLOCK_N


@triton.jit
def _masked_scores(qk, t, t_ok, q_pos, page64, slot, KvPos, stride_kvp, stride_kvs, window,
                   qk_scale, softcap_in, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_KVPOS: tl.constexpr, SOFTCAP: tl.constexpr):
    """A tile's scores in the log2 domain, -inf where a key is not visible to a row."""
    if SOFTCAP:   # c * tanh(s / c): the host passes softcap_in = scale / c, qk_scale = c log2 e
        qk = _tanh(qk * softcap_in)
    qk = qk * qk_scale
    vis = t_ok[None, :]
    if CAUSAL or HAS_WINDOW:
        if HAS_KVPOS:
            k_pos = tl.load(KvPos + page64 * stride_kvp + slot * stride_kvs, mask=t_ok, other=0)
        else:
            k_pos = t
        if CAUSAL:
            vis = vis & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            vis = vis & (q_pos[:, None] - k_pos[None, :] <= window)
            if not CAUSAL:
                vis = vis & (k_pos[None, :] - q_pos[:, None] <= window)
    return tl.where(vis, qk, float("-inf"))


@triton.jit
def _online_softmax(s, m_i, l_i):
    """The running (max, sum) after a tile of scores: (p, the accumulators' rescale, l, m)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # no exp2(-inf - -inf) NaNs
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


# MLA's latent (DeepSeek: 512 + 64 = 576 columns, the values the keys' first 512) in its own
# kernel: the general one pads the row to a 1024-wide tile and so fits only 16 keys a tile, and
# loads the values apart from the keys; here a key tile is its DV- and DR-wide parts (powers of
# two, no padding), 64 keys a tile, read once for the scores and the values (session 14's
# profile: 20 us a layer at 8K for 9.4 MB of latent in the general kernel)
@triton.jit(do_not_specialize=["stride_qb", "stride_btb", "stride_qpb", "Sq", "chunk",
                               "num_splits", "capacity", "window"])
def _decode_latent_split_kernel(
        Q, Kc, BlockTable, SeqLens, QPos, KvPos, OPart, LPart,
        stride_qb, stride_qs, stride_qh, stride_qd,
        stride_kp, stride_ks, stride_kh, stride_kd,
        stride_btb, stride_qpb, stride_qps, stride_kvp, stride_kvs,
        Sq, Hq, Hkv, GROUP, chunk, num_splits, capacity, window, qk_scale, softcap_in,
        DV: tl.constexpr, DR: tl.constexpr, PAGE_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_QPOS: tl.constexpr, HAS_KVPOS: tl.constexpr,
        DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    b64, hk, t_lo, t_hi, row_ok, s_idx, hq, q_pos = _split_program(
        SeqLens, QPos, stride_qpb, stride_qps, Sq, Hkv, GROUP, chunk, num_splits, capacity,
        BLOCK_M, BLOCK_N, CAUSAL or HAS_WINDOW, HAS_QPOS)
    offs_v = tl.arange(0, DV)            # the value columns (the latent)
    offs_r = DV + tl.arange(0, DR)       # the rest of the key (the RoPE part)
    offs_n = tl.arange(0, BLOCK_N)
    q_row = Q + b64 * stride_qb + s_idx[:, None] * stride_qs + hq[:, None] * stride_qh
    q_v = tl.load(q_row + offs_v[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    q_r = tl.load(q_row + offs_r[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_v = tl.zeros([BLOCK_M, DV], tl.float32)
    acc_r = tl.zeros([BLOCK_M, DR], tl.float32)
    k_head = Kc + hk.to(tl.int64) * stride_kh
    for start in tl.range(t_lo, t_hi, BLOCK_N):
        t = start + offs_n
        t_ok = t < t_hi
        page = tl.load(BlockTable + b64 * stride_btb + t // PAGE_SIZE, mask=t_ok, other=0)
        slot = t % PAGE_SIZE
        page64 = page.to(tl.int64)
        k_row = k_head + page64[:, None] * stride_kp + slot[:, None] * stride_ks
        k_v = tl.load(k_row + offs_v[None, :] * stride_kd, mask=t_ok[:, None], other=0.0)
        k_r = tl.load(k_row + offs_r[None, :] * stride_kd, mask=t_ok[:, None], other=0.0)
        qk = tl.dot(q_v, tl.trans(k_v), input_precision=DOT_PREC)
        qk = tl.dot(q_r, tl.trans(k_r), qk, input_precision=DOT_PREC)
        s = _masked_scores(qk, t, t_ok, q_pos, page64, slot, KvPos, stride_kvp, stride_kvs,
                           window, qk_scale, softcap_in, CAUSAL, HAS_WINDOW, HAS_KVPOS, SOFTCAP)
        p, alpha, l_i, m_i = _online_softmax(s, m_i, l_i)
        pv = p.to(k_v.dtype)
        acc_v = tl.dot(pv, k_v, acc_v * alpha[:, None], input_precision=DOT_PREC)
        acc_r = tl.dot(pv, k_r, acc_r * alpha[:, None], input_precision=DOT_PREC)

    prow, inv_l = _store_lse(LPart, m_i, l_i, b64, hq, s_idx, row_ok, Sq, Hq, num_splits)
    o_row = OPart + prow[:, None] * (DV + DR)
    tl.store(o_row + offs_v[None, :], acc_v * inv_l[:, None], mask=row_ok[:, None])
    tl.store(o_row + offs_r[None, :], acc_r * inv_l[:, None], mask=row_ok[:, None])


@triton.jit(do_not_specialize=["Sq", "num_splits", "stride_ob", "stride_os"])
def _decode_reduce_kernel(OPart, LPart, Out, Lse, Sq, Hq, num_splits,
                          stride_ob, stride_os, stride_oh, stride_od,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # one row's BLOCK_D columns; the splits BLOCK_S at a time with the running maximum
    # rescaled (a wide head with hundreds of splits, MLA's 576-wide latent, would otherwise
    # hold num_splits x 1024 floats in one program's registers: 0.76 ms a layer in session 14)
    row = tl.program_id(0)            # flat (b, hq, s) of the partial buffers
    s = row % Sq
    hq = (row // Sq) % Hq
    b = row // Sq // Hq
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row64 = row.to(tl.int64)
    m = float("-inf")
    tot = 0.0
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        ok = offs < num_splits
        lse_p = tl.load(LPart + row64 * num_splits + offs, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse_p, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2((m - m_use) * 1.4426950408889634)
        w = tl.math.exp2((lse_p - m_use) * 1.4426950408889634)
        o_p = tl.load(OPart + (row64 * num_splits + offs)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=ok[:, None] & d_ok[None, :], other=0.0)
        tot = tot * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(o_p * w[:, None], 0)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    inv = 1.0 / tl.where(tot > 0.0, tot, 1.0)
    out = acc * inv
    lse = tl.where(tot > 0.0, m + tl.math.log2(tl.where(tot > 0.0, tot, 1.0)) * 0.6931471805599453,
                   float("-inf"))
    if tl.program_id(1) == 0:
        tl.store(Lse + row64, lse)
    tl.store(Out + b.to(tl.int64) * stride_ob + s * stride_os + hq * stride_oh
             + offs_d * stride_od, out.to(Out.dtype.element_ty), mask=d_ok)


_decode_split_fast = FastLaunch(_decode_split_kernel)
_decode_latent_split_fast = FastLaunch(_decode_latent_split_kernel)
_decode_reduce_fast = FastLaunch(_decode_reduce_kernel)


def _check(q, k_cache, v_cache, block_table, seq_lens, q_pos, kv_pos, window_size,
           softcap=None):
    for name, t, nd in (("q", q, 4), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                        ("block_table", block_table, 2), ("seq_lens", seq_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{name} must be a {nd}-D tensor, got {getattr(t, 'shape', type(t))}")
    B, Sq, Hq, D = q.shape
    P, page, Hkv, Dk = k_cache.shape
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q/k_cache/v_cache dtypes must be one of fp16/bf16/fp32 and equal, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if Dk != D:
        raise ValueError(f"head dim of q ({D}) and of the cache ({Dk}) differ")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim ({D}) must be in 1..{MAX_HEAD_DIM}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"num q heads ({Hq}) must be a multiple of num kv heads ({Hkv})")
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        raise ValueError(f"block_table {tuple(block_table.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)} must have batch {B} first")
    for name, t in (("block_table", block_table), ("seq_lens", seq_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if q_pos is not None and tuple(q_pos.shape) != (B, Sq):
        raise ValueError(f"q_pos shape {tuple(q_pos.shape)} must be (B, Sq) = {(B, Sq)}")
    if kv_pos is not None and tuple(kv_pos.shape) != (P, page):
        raise ValueError(f"kv_pos shape {tuple(kv_pos.shape)} must be (num_pages, page_size) = "
                         f"{(P, page)}")
    if window_size is not None and (int(window_size) != window_size or window_size < 0):
        raise ValueError(f"window_size must be None or an int >= 0, got {window_size}")
    if softcap is not None and not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be None or a finite float >= 0, got {softcap}")
    devs = {t.device for t in (q, k_cache, v_cache, block_table, seq_lens)
            + tuple(t for t in (q_pos, kv_pos) if t is not None)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")


# The launch when 33 to 64 query rows share a KV head of width <= 128 (the cascade decode's
# shared document: 9-16 questions x a GQA group of 4; more rows, a prompt chunk's, keep the
# general heuristic, not swept with it): (block_m, block_n,
# splits per SM, stages, warps), 0 = the general heuristic's value. Session 23's sweep
# (bench_decode_splits.py --queries 16, one H200, Llama-3-8B's layer, 16 questions on 128K):
# 2 splits per SM and 4 stages 166.6 us against the heuristic's 4 and 3, 174.6 us (floor
# 126.7); 32 query rows a program, 32- or 128-key tiles and 8 warps were all slower. The
# batch-16 step's device time 12.10 against 12.51 ms (profile_decode, two calls).
MANY_ROWS_DEFAULT = (0, 0, 2, 4, 0)


def _many_rows_tile():
    """RINGSERVE_DECODE_MANY_ROWS="block_m,block_n,splits_per_sm,stages,warps" (0: the
    heuristic's value) overrides MANY_ROWS_DEFAULT (a sweep's best:
    benchmarks/bench_decode_splits.py --queries 16 prints it)."""
    v = os.environ.get("RINGSERVE_DECODE_MANY_ROWS", "").strip()
    if not v:
        return MANY_ROWS_DEFAULT
    try:
        t = tuple(int(x) for x in v.split(","))
    except ValueError:
        t = ()
    if len(t) != 5 or min(t) < 0:
        raise ValueError(f"RINGSERVE_DECODE_MANY_ROWS must be five ints >= 0 "
                         f"(block_m,block_n,splits_per_sm,stages,warps), got {v!r}")
    return t


MANY_ROWS_TILE = _many_rows_tile()


def paged_decode_triton(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=None,
                        causal=False, window_size=None, q_pos=None, kv_pos=None, *,
                        max_seq_len: Optional[int] = None, num_splits: Optional[int] = None, block_n: Optional[int] = None,
                        num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                        softcap: Optional[float] = None, splits: bool = False,
                        check: bool = True, latent: Optional[bool] = None,
                        positions_sorted: bool = False, block_m: Optional[int] = None):
    """Paged flash-decoding. Returns (out (B, Sq, Hq, D) in q.dtype, lse (B, Hq, Sq) float32).

    splits=True: the unreduced partials instead, (out (B, Hq, Sq, NB, D) float32, lse
    (B, Hq, Sq, NB) float32) over NB disjoint key ranges (a range with no visible key: lse
    -inf, out 0), for a caller that merges them with other parts in one launch
    (kernels.split_parts, kernels.merge_splits).

    max_seq_len: an upper bound of seq_lens that bounds the KV chunks and the number of
    splits (default: the block table's capacity, max_pages * page_size; lengths are never read
    on the host, so no sync). Each sequence's keys are shared evenly among the splits in the
    kernel, from its own length.
    num_splits / block_n / num_warps / num_stages / block_m (query rows a program, a power of
    two >= 16) override the launch heuristics (benchmarks; MANY_ROWS_TILE for many rows).
    seq_lens beyond the capacity raise ValueError for CPU tensors; on the GPU they are clamped
    in the kernel (no out-of-bounds reads). softcap: Gemma 2's attention-logit soft-capping c
    (scores c * tanh(s / c)); None or 0: off. latent: MLA's latent cache (v_cache is k_cache,
    a head of two power-of-two parts such as 512 + 64) goes through its own kernel
    (`latent_split`); None: when the inputs are such, False: the general kernel (benchmarks).
    positions_sorted: with a window, kv_pos increases along each sequence's block table (the
    engine's cache), so each program starts at the first key tile its rows' windows reach
    instead of masking every older key (Gemma's local layers over a long document); without
    kv_pos the positions are the indices and this holds anyway.
    """
    if check:   # check=False: the engine's step, which built the inputs
        _check(q, k_cache, v_cache, block_table, seq_lens, q_pos, kv_pos, window_size, softcap)
    B, Sq, Hq, D = q.shape
    P, page, Hkv, _ = k_cache.shape
    group = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    capacity = block_table.shape[1] * page
    if seq_lens.device.type == "cpu":   # checking device-resident lengths would cost a sync
        lo, hi = int(seq_lens.min()) if B else 0, int(seq_lens.max()) if B else 0
        if lo < 0 or hi > capacity:
            raise ValueError(f"seq_lens must be in 0..max_pages*page_size "
                             f"({block_table.shape[1]}*{page}), got min {lo}, max {hi}")
    if max_seq_len is None:
        # No host sync (decode steps run back to back, or inside a CUDA graph): the split
        # count is planned for the block table's capacity; the kernel shares each sequence's
        # own keys among the splits.
        max_seq_len = capacity
    max_len = min(int(max_seq_len), capacity)
    if B == 0 or Sq == 0 or Hq == 0 or max_len <= 0:
        if splits:
            return (torch.zeros(B, Hq, Sq, 1, D, dtype=torch.float32, device=q.device),
                    torch.full((B, Hq, Sq, 1), float("-inf"), dtype=torch.float32,
                               device=q.device))
        return (torch.zeros(B, Sq, Hq, D, dtype=q.dtype, device=q.device),
                torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device))
    on_cpu = q.device.type == "cpu"
    block_d = max(16, next_pow2(D))
    rows = Sq * group
    split_dims = latent_split(D, k_cache, v_cache)
    if split_dims is not None and latent is not False:
        return _latent_decode(q, k_cache, block_table, seq_lens, scale, causal, window_size,
                              q_pos, kv_pos, split_dims, max_len, num_splits, block_n, num_warps,
                              num_stages, softcap, splits)
    # a wide head's query tile is block_m x block_d: MLA's 576-wide latent (block_d 1024) with 16
    # heads a KV head and 4+ queries a sequence asked 128 x 1024 of shared memory for q alone
    # (out of resources on the H200, session 11): 16 rows a tile there
    many = MANY_ROWS_TILE if 32 < rows <= 64 and block_d <= 128 and not on_cpu else None
    if many is not None:     # (block_m, block_n, splits per SM, stages, warps); 0: as below
        block_m = block_m or many[0] or None
        block_n = block_n or many[1] or None
        num_stages = num_stages or many[3] or None
        num_warps = num_warps or many[4] or None
    if block_m is None:
        block_m = min(128 if block_d <= 256 else 16, max(16, next_pow2(rows)))
    elif block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    row_blocks = cdiv(rows, block_m)
    # 128-wide heads: 128-key tiles in ~2 waves of programs over the SMs. Session 17's sweep
    # (bench_decode_splits.py, one H200, batch 1, a graph's power-of-two table) against 64-key
    # tiles in ~4 waves: Llama-3-8B's layer 17.4 / 50.1 / 170.2 -> 15.4 / 42.1 / 135.1 us at
    # 8K / 32K / 128K, Qwen3-30B-A3B's 13.8 / 31.1 / 92.1 -> 10.4 / 25.1 / 71.0 us. Wider heads
    # (Gemma's 256) were best as they were: 32-key tiles, ~4 waves. Many query rows (a
    # 128-row tile: 3 stages of 128-key K and V tiles would fill the shared memory) keep 64.
    long_tiles = block_d <= 128 and block_m <= 32
    if block_n is None:
        block_n = 32 if on_cpu else (128 if long_tiles else 64 if block_d <= 128
                                     else 32 if block_d <= 256 else 16)
    tiles = cdiv(max_len, block_n)
    if num_splits is None:
        if on_cpu:
            num_splits = min(3, tiles)     # still exercises the split + reduce path
        else:
            sms = sm_count(q.device)
            per_sm = many[2] if many is not None and many[2] else (2 if long_tiles else 4)
            num_splits = cdiv(per_sm * sms, B * Hkv * row_blocks)
            if block_d > 256:
                # a wide head's tile holds 16 keys: a split of one or two tiles spends more on
                # its partial (1024 floats a row, written and read back) than on its keys
                num_splits = min(num_splits, cdiv(tiles, 4))
    num_splits, chunk, o_part, l_part = _split_plan(q, num_splits, tiles, block_n, max_len)
    if num_warps is None:
        num_warps = 4 if block_d <= 256 else 8
    if num_stages is None:
        # K and V tiles of a 1024-wide latent are 32 KB each a stage: 3 stages with the query
        # tile pass the H200's 227 KB of shared memory
        num_stages = 1 if on_cpu else (3 if block_d <= 512 else 2)
    pos, pos_strides, tail, meta = _launch_args(q, seq_lens, q_pos, kv_pos, causal,
                                                window_size, scale, softcap)
    _decode_split_fast((num_splits, B * Hkv, row_blocks),
        q, k_cache, v_cache, block_table, seq_lens, *pos, o_part, l_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), block_table.stride(0), *pos_strides,
        Sq, Hq, Hkv, group, chunk, num_splits, capacity, *tail,
        HEAD_DIM=D, BLOCK_D=block_d, PAGE_SIZE=page, BLOCK_M=block_m, BLOCK_N=block_n, **meta,
        WINDOW_SKIP=window_size is not None and (positions_sorted or kv_pos is None),
        num_warps=num_warps, num_stages=num_stages, **pdl_kw(q.device))
    if splits:
        return o_part, l_part
    return _reduce(o_part, l_part, q.dtype)


def _split_plan(q, num_splits, tiles, block_n, max_len):
    """(splits, at most so many keys a split, the partials' out and lse buffers) for at most
    num_splits splits of whole key tiles (the kernel shares each sequence's own tiles among
    them)."""
    B, Sq, Hq, D = q.shape
    num_splits = max(1, min(num_splits, tiles))
    chunk = cdiv(tiles, num_splits) * block_n     # the kernel's bound on a split's keys
    return (num_splits, chunk,
            torch.empty(B, Hq, Sq, num_splits, D, dtype=torch.float32, device=q.device),
            torch.empty(B, Hq, Sq, num_splits, dtype=torch.float32, device=q.device))


def _launch_args(q, seq_lens, q_pos, kv_pos, causal, window_size, scale, softcap):
    """The split kernels' shared arguments: the position tensors (seq_lens stands in for an
    absent one, never read) and their strides, (window, qk_scale, softcap_in), and the masking
    constexprs."""
    masked = causal or window_size is not None
    pos = tuple(t if t is not None else seq_lens for t in (q_pos, kv_pos))
    strides = tuple(x for t in (q_pos, kv_pos) for x in (t.stride() if t is not None else (0, 0)))
    tail = (int(window_size or 0), (softcap if softcap else scale) * LOG2E,
            scale / softcap if softcap else 1.0)
    meta = dict(CAUSAL=bool(causal), HAS_WINDOW=window_size is not None,
                HAS_QPOS=masked and q_pos is not None, HAS_KVPOS=masked and kv_pos is not None,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", SOFTCAP=bool(softcap))
    return pos, strides, tail, meta


def _reduce(o_part, l_part, dtype, blocks=None):
    """Merge the splits' partials (B, Hq, Sq, NB, D) / (B, Hq, Sq, NB): (out (B, Sq, Hq, D) in
    dtype, lse (B, Hq, Sq) float32). blocks: (BLOCK_D, BLOCK_S, num_warps) instead of the
    heuristic's (bench_latent_decode.py's sweep)."""
    B, Hq, Sq, num_splits, D = o_part.shape
    block_d = max(16, next_pow2(D))
    # the reduce kernel writes every element
    out = torch.empty(B, Sq, Hq, D, dtype=dtype, device=o_part.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=o_part.device)
    # a program's tile is at most 128 columns x 128 splits (what the 128-wide heads always ran
    # in one go); wider heads take column blocks, more splits a loop
    red_d = min(block_d, 128)
    red_s = min(max(2, next_pow2(num_splits)), 16384 // red_d)
    warps = 4
    if D > 256 and o_part.device.type != "cpu":
        # MLA's 576-wide latent: 32 columns x 128 splits with 2 warps (session 18's sweep,
        # bench_latent_decode.py --sweep, one H200: 128 / 132 / 264 splits 2.7 / 3.5 / 4.8 us;
        # the 128 x 128 tile with 4 warps took 0.5-0.6 us more at 8K)
        red_d, red_s, warps = 32, 128, 2
    if blocks is not None:
        red_d, red_s, warps = blocks
    _decode_reduce_fast((B * Hq * Sq, cdiv(D, red_d)),
        o_part, l_part, out, lse, Sq, Hq, num_splits, *out.stride(),
        HEAD_DIM=D, BLOCK_D=red_d, BLOCK_S=red_s, num_warps=warps,
        **pdl_kw(o_part.device))
    return out, lse


def latent_split(D: int, k_cache, v_cache):
    """(DV, DR) when the cache is MLA's latent as the kernels see it: the values are the keys
    (one tensor, or one storage with the same strides) and the head is DV + DR wide with both
    powers of two, DV >= 64 and DR >= 16 (DeepSeek: 512 + 64); else None."""
    same = v_cache is k_cache or (v_cache.data_ptr() == k_cache.data_ptr()
                                  and v_cache.stride() == k_cache.stride())
    if not same or D <= 256 or D & (D - 1) == 0:
        return None
    dv = 1 << (D.bit_length() - 1)
    dr = D - dv
    if dr < 16 or dr & (dr - 1) or dv < 64:
        return None
    return dv, dr


def _latent_decode(q, cache, block_table, seq_lens, scale, causal, window_size, q_pos, kv_pos,
                   split_dims, max_len, num_splits, block_n, num_warps, num_stages, softcap,
                   splits):
    """paged_decode_triton's MLA path (`_decode_latent_split_kernel`, then the reduce)."""
    B, Sq, Hq, D = q.shape
    P, page, Hkv, _ = cache.shape
    dv, dr = split_dims
    group = Hq // Hkv
    rows = Sq * group
    on_cpu = q.device.type == "cpu"
    # the accumulator is block_m x (dv + dr) floats in registers: 32 rows x 576 with 8 warps is
    # 72 a thread
    block_m = min(32, max(16, next_pow2(rows)))
    row_blocks = cdiv(rows, block_m)
    # a long cache (a table of 64K+ keys): 32-key tiles in two waves of programs, 4 warps.
    # Session 18's sweep (bench_latent_decode.py --sweep, one H200, batch 1, split kernel +
    # reduce): 128K 70.8 us with 64-key tiles in one wave, 8 warps (the shorter caches' best:
    # 8K 10.7, 32K 22.8 us) -> 64.9 us (32K: 24.4 us, so it stays with the former)
    long_cache = not on_cpu and max_len >= 65536
    if block_n is None:
        block_n = 16 if on_cpu else (32 if long_cache else 64)
    if num_warps is None and long_cache:
        num_warps = 4
    tiles = cdiv(max_len, block_n)
    if num_splits is None:
        if on_cpu:
            num_splits = min(3, tiles)
        elif long_cache:
            num_splits = cdiv(2 * sm_count(q.device), B * Hkv * row_blocks)
        else:
            # one wave of programs, down to one 64-key tile each: on one H200 (session 15,
            # bench_latent_decode.py, batch 1) 16 / 32 / 64 / 128 splits took 29.3 / 18.4 / 14.1
            # / 11.1 us at 8K (one tile a split at 128), 102 / 54.1 / 32.3 / 21.8 us at 32K and
            # 418 / 210 / 120 / 71.0 us at 128K; two waves (264) were no better in the engine
            # at 32K (worker step 4.96 against 4.71 ms)
            num_splits = cdiv(sm_count(q.device), B * Hkv * row_blocks)
    num_splits, chunk, o_part, l_part = _split_plan(q, num_splits, tiles, block_n, max_len)
    pos, pos_strides, tail, meta = _launch_args(q, seq_lens, q_pos, kv_pos, causal,
                                                window_size, scale, softcap)
    _decode_latent_split_fast((num_splits, B * Hkv, row_blocks),
        q, cache, block_table, seq_lens, *pos, o_part, l_part,
        *q.stride(), *cache.stride(), block_table.stride(0), *pos_strides,
        Sq, Hq, Hkv, group, chunk, num_splits, block_table.shape[1] * page, *tail,
        DV=dv, DR=dr, PAGE_SIZE=page, BLOCK_M=block_m, BLOCK_N=block_n, **meta,
        num_warps=num_warps or 8, num_stages=num_stages or (1 if on_cpu else 2),
        **pdl_kw(q.device))
    if splits:
        return o_part, l_part
    return _reduce(o_part, l_part, q.dtype)
