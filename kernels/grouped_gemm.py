"""Grouped GEMM for mixture-of-experts layers (Triton).

out[rows of expert e] = x[rows of expert e] @ w[e]^T for every expert at once, one launch: x's
rows are sorted by expert (counts[e] rows each, in expert order), w is the stacked expert
weights (E, N, K). A Python loop over experts would launch 2-3 small GEMMs per expert per layer
(hundreds for 128-expert models) and idle the GPU between them.

Each program owns BLOCK_M rows of one expert. The block table (which expert, which first row)
is built on the device from `counts` with no host sync, over an upper bound of
cdiv(M, BLOCK_M) + E blocks; the spare blocks have no rows and store nothing.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._host import FastLaunch, cdiv, next_pow2
from .gemv import _rstd, _stages
from .pdl import pdl_enter, pdl_kw


@triton.jit
def _grouped_gemm_kernel(X, W, Out, Starts, BlockExpert, BlockRow, N, K,
                         s_xm, s_xk, s_we, s_wn, s_wk, s_om, s_on,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BlockExpert + pid_m)
    row0 = tl.load(BlockRow + pid_m)
    # a spare block (e < 0) gets an empty row range instead of an early exit
    e_safe = tl.maximum(e, 0)
    end = tl.where(e < 0, row0, tl.load(Starts + e_safe + 1))
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < end
    col_ok = cols < N
    w_base = W + e_safe.to(tl.int64) * s_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)   # float32 whatever the inputs
    # a spare block reads nothing: its weight tiles (of expert 0, unmasked by rows) were loaded
    # in full before, ~E spare blocks a GEMM, all of them in a decode step whose few tokens
    # fill a handful of blocks (Qwen3-30B-A3B's decode ran at 6.8x its floor, session 11)
    k_hi = tl.where(e < 0, 0, K)
    for k0 in range(0, k_hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(X + rows[:, None] * s_xm + ks[None, :] * s_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)          # (BLOCK_M, BLOCK_K)
        b = tl.load(w_base + cols[None, :] * s_wn + ks[:, None] * s_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)          # (BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    tl.store(Out + rows[:, None] * s_om + cols[None, :] * s_on, acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def block_table(counts: torch.Tensor, block_m: int, max_blocks: int):
    """counts (E,) -> row starts (E + 1,), expert of each block (-1: spare), its first row."""
    counts = counts.to(torch.int64)
    E = counts.shape[0]
    starts = torch.zeros(E + 1, dtype=torch.int64, device=counts.device)
    starts[1:] = torch.cumsum(counts, 0)
    per = (counts + block_m - 1) // block_m
    cum = torch.cumsum(per, 0)
    b = torch.arange(max_blocks, device=counts.device)
    e = torch.searchsorted(cum, b, right=True)
    valid = e < E
    e = e.clamp(max=E - 1)
    row0 = starts[e] + (b - (cum[e] - per[e])) * block_m
    return starts, torch.where(valid, e, -1), row0


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): few rows an expert (decode, short steps)
# take small tiles; a prefill's thousands of rows an expert take Hopper-sized ones (64 x 64
# tiles left the 128K prefill of the Qwen3-30B-A3B shape at 37.2% MFU, session 11). The GPU's
# choice by rows per expert; RINGSERVE_MOE_TILES=small|large forces one (benchmarks)
SMALL_TILES = (64, 64, 32, 4, 3)
LARGE_TILES = (128, 128, 64, 8, 3)
LARGE_FROM_ROWS = 512     # mean rows an expert from which the large tiles are used
FORCE_TILES = os.environ.get("RINGSERVE_MOE_TILES", "")   # read once: not per decode layer


def tiles_for(M: int, E: int, on_gpu: bool = True) -> tuple:
    """The launch's tile shape for M rows over E experts."""
    force = FORCE_TILES
    if force not in ("", "small", "large"):
        raise ValueError(f"RINGSERVE_MOE_TILES must be 'small' or 'large', got {force!r}")
    if force:
        return LARGE_TILES if force == "large" else SMALL_TILES
    return LARGE_TILES if on_gpu and M >= LARGE_FROM_ROWS * E else SMALL_TILES


def grouped_linear_triton(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                          block_m: Optional[int] = None, block_n: Optional[int] = None,
                          block_k: Optional[int] = None) -> torch.Tensor:
    """x (M, K) rows sorted by expert, w (E, N, K), counts (E,) summing to M -> (M, N).
    block_m / block_n / block_k: override `tiles_for`'s (tests)."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} must be (M, K) and w {tuple(w.shape)} (E, N, K)")
    if counts.shape != (w.shape[0],):
        raise ValueError(f"counts {tuple(counts.shape)} must be ({w.shape[0]},), one per expert")
    if x.dtype != w.dtype or x.device != w.device:
        raise ValueError(f"x ({x.dtype}, {x.device}) and w ({w.dtype}, {w.device}) must agree")
    M, K = x.shape
    E, N, _ = w.shape
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    bm, bn, bk, warps, stages = tiles_for(M, E, x.device.type == "cuda")
    block_m, block_n, block_k = block_m or bm, block_n or bn, block_k or bk
    if x.device.type == "cpu":
        warps, stages = 4, 1
    max_blocks = cdiv(M, block_m) + E
    starts, expert, row0 = block_table(counts.to(x.device), block_m, max_blocks)
    # fp32 inputs get true fp32 products (the GPU would use tf32 otherwise)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    grid = (max_blocks, cdiv(N, block_n))
    _grouped_gemm_kernel[grid](x, w, out, starts, expert, row0, N, K,
                               *x.stride(), *w.stride(), *out.stride(),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               DOT_PREC=prec, num_warps=warps, num_stages=stages)
    return out


# ---- few tokens (decode): the experts as GEMVs, no sort ----
#
# A decode step's MoE layer has a handful of token copies (T tokens x top-k): the grouped GEMM's
# path then costs more in its set-up than in its math (the sort, the block table: cumsums and a
# search, ~E spare blocks a GEMM, the scatter back, the weighted sum: ~40 small launches a layer,
# session 13's Qwen3-30B-A3B decode at 6.5x its floor at 8K). Here two launches do the layer:
# each token copy's gate/up rows times its token (SiLU(gate) * up written at once), then each
# token's output columns as the router-weighted sum of its k experts' down projections. Every
# active expert's weights are read once per copy: for a few tokens that is what the grouped
# GEMM reads too.
MOE_GEMV_MAX_COPIES = 32    # token copies (T * top_k) up to which `moe_gemv` runs the layer


@triton.jit
def _moe_gate_up_kernel(X, W, Ws, Idx, Act, H, I, k, kt, up_s,
                        s_xt, s_we, s_wn, s_wk, s_wse, s_at, G, eps,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LAZY: tl.constexpr,
                        NORM: tl.constexpr = False, STAGES: tl.constexpr = None,
                        PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # token copy i: token i // kt, its (i % kt)-th expert: the k routed ones (Idx), then the
    # kt - k shared ones (DeepSeek's shared experts as experts of the routed width: shared
    # expert j's gate rows start at Ws + j * s_wse, its up rows up_s rows further: the shared
    # MLP's joined gate|up weight as it is; same row and column strides as W)
    i = tl.program_id(0)
    t = i // kt
    j = i % kt
    routed = j < k
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    e = tl.load(Idx + t * k + tl.minimum(j, k - 1)).to(tl.int64)
    base = tl.where(routed, W + e * s_we, Ws + (j - k).to(tl.int64) * s_wse)
    x_row = X + t.to(tl.int64) * s_xt
    w_gate = base + cols[:, None] * s_wn
    w_up = base + (cols[:, None] + tl.where(routed, I, up_s)) * s_wn
    if LAZY:    # products summed once after the loop (no reduction between the loads)
        gg = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        uu = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ss = tl.zeros((1, BLOCK_K), dtype=tl.float32)     # NORM: the token's squares
    for k0 in tl.range(0, H, BLOCK_K, num_stages=STAGES):     # (as gemv's STAGES)
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        xv = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        if NORM:    # RMSNorm's input (G, eps): as gemv's norm (the weight now, 1 / rms after)
            ss += xv * xv
            xv = xv * tl.load(G + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        m = col_ok[:, None] & k_ok[None, :]
        gp = tl.load(w_gate + ks[None, :] * s_wk, mask=m, other=0.0).to(tl.float32) * xv
        up = tl.load(w_up + ks[None, :] * s_wk, mask=m, other=0.0).to(tl.float32) * xv
        if LAZY:
            gg += gp
            uu += up
        else:
            g += tl.sum(gp, axis=1)
            u += tl.sum(up, axis=1)
    if LAZY:
        g = tl.sum(gg, axis=1)
        u = tl.sum(uu, axis=1)
    if NORM:
        r = tl.sum(_rstd(ss, H, eps), axis=0)      # (the one row's)
        g = g * r
        u = u * r
    # the grouped path rounds gate and up to the model's dtype before SiLU(gate) * up: so here
    g = g.to(Act.dtype.element_ty).to(tl.float32)
    u = u.to(Act.dtype.element_ty).to(tl.float32)
    act = g / (1.0 + tl.exp(-g)) * u
    tl.store(Act + i.to(tl.int64) * s_at + cols, act.to(Act.dtype.element_ty), mask=col_ok)


@triton.jit
def _moe_down_kernel(Act, W, Ws, Idx, Wt, Out, H, I, k, kt,
                     s_at, s_we, s_wn, s_wk, s_wse, s_wsn, s_ot,
                     KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     ADD: tl.constexpr = False, STAGES: tl.constexpr = None,
                     PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # A program: one token's BLOCK_N output columns, all k of its experts at once (KP: k
    # rounded up to a power of two): each step of the loop loads a (KP, BLOCK_N, BLOCK_K)
    # tile of the experts' rows. Session 16's version walked the experts one after another,
    # BLOCK_N x BLOCK_K at a time: 2 KB in flight a program, 30% of the H200's bandwidth
    # (19.8 us a layer for Qwen3-30B-A3B's one decode token against a 5.9 us floor).
    # The kt - k shared experts (copies k..kt-1, weight 1): shared expert j's down columns
    # start at Ws + j * s_wse, rows s_wsn apart (the shared MLP's down weight as it is).
    t = tl.program_id(0)                    # token
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    js = tl.arange(0, KP)
    j_ok = js < kt
    routed = js < k
    i = t * kt + js                         # the token's copies
    e = tl.load(Idx + t * k + js, mask=routed, other=0).to(tl.int64)
    a_rows = Act + i.to(tl.int64) * s_at                                   # (KP,)
    c64 = cols[None, :].to(tl.int64)
    w_rows = tl.where(routed[:, None], W + e[:, None] * s_we + c64 * s_wn,
                      Ws + (js - k).to(tl.int64)[:, None] * s_wse + c64 * s_wsn)  # (KP, BN)
    row_ok = j_ok[:, None] & col_ok[None, :]
    acc = tl.zeros((KP, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, I, BLOCK_K, num_stages=STAGES):     # (as gemv's STAGES)
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < I
        av = tl.load(a_rows[:, None] + ks[None, :], mask=j_ok[:, None] & k_ok[None, :],
                     other=0.0).to(tl.float32)                              # (KP, BLOCK_K)
        wv = tl.load(w_rows[:, :, None] + ks[None, None, :] * s_wk,
                     mask=row_ok[:, :, None] & k_ok[None, None, :], other=0.0)
        acc += wv.to(tl.float32) * av[:, None, :]
    # each expert's output in the model's dtype, then weighted in float32 (as the grouped
    # path: y in the model's dtype, the sum over experts in float32)
    y = tl.sum(acc, axis=2).to(Out.dtype.element_ty).to(tl.float32)     # (KP, BLOCK_N)
    wt = tl.where(routed, tl.load(Wt + t * k + js, mask=routed, other=0.0).to(tl.float32),
                  1.0)
    out = tl.sum(y * wt[:, None], axis=0)
    o_ptr = Out + t.to(tl.int64) * s_ot + cols
    if ADD:     # Out is the residual stream: Out + the layer's output, each rounded (h += y)
        out = out.to(Out.dtype.element_ty).to(tl.float32) \
            + tl.load(o_ptr, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=col_ok)


# moe_gemv's launches without triton's per-launch Python (kernels/_host.py)
_moe_gate_up_fast = FastLaunch(_moe_gate_up_kernel)
_moe_down_fast = FastLaunch(_moe_down_kernel)


# the two launches' (BLOCK_N, BLOCK_K, num_warps), gate/up then down, and whether gate/up sums
# its products once after the loop (LAZY), by token copies: the best of bench_moe_gemv.py's
# sweep on the H200 (session 14: Qwen3-30B-A3B's layer for one token 97.5 -> 35.7 us against an
# 17.8 us floor, DeepSeek-V2-Lite's 112 -> 48 us; session 13's (32, 128, 4, 16, 128, 4) left
# most SMs idle: a program per 32 rows of one copy). The down launch's tile is (k, BLOCK_N,
# BLOCK_K) since session 17.
# Session 17's sweep (one H200), the layer for one token / four: Qwen3-30B-A3B 22.6 / 67.2 us
# (floor 17.9 / 62.6), DeepSeek-V2-Lite 30.9 / 89.6 us (24.6 / 82.0); session 16's kernels
# (in its profile): 35.2 / - and 51.6 / - us.
# Session 20's sweep with the K loops pipelined (one H200, one token, us; the default then ->
# the best): Qwen3-30B-A3B 24.4 -> 23.2 (floor 17.8), DeepSeek-V2-Lite 32.1 -> 29.8 (24.5); the
# best tiles differ by shape (gate/up (8, 128, 8) summing once after the loop against
# (4, 256, 4) pipelined over 2 stages), the down launch's is one: (2, 128, 4) over 3 stages.
# Tuples: gate/up (BLOCK_N, BLOCK_K, warps), down's, LAZY, gate/up's stages, down's stages.
MOE_GEMV_BLOCKS = (4, 256, 4, 2, 128, 4, False, 1, 3)  # up to 8 token copies (one decode token)
MOE_GEMV_BLOCKS_MANY = (4, 256, 4, 8, 128, 2, False)   # 9..MOE_GEMV_MAX_COPIES
MOE_GEMV_TUNED = {    # (hidden, expert width): the sweep's best for one token (8 copies)
    (2048, 768): (8, 128, 8, 2, 128, 4, True, 1, 3),      # Qwen3-30B-A3B
    (2048, 1408): (4, 256, 4, 2, 128, 4, False, 2, 3),    # DeepSeek-V2-Lite
}


def moe_gemv_blocks(hidden: int, inter: int, copies: int) -> Tuple:
    """moe_gemv's default tiles for `copies` token copies (tokens x experts each) of experts
    (inter, hidden): the sweep's best for the shape where it was swept (MOE_GEMV_TUNED), else
    MOE_GEMV_BLOCKS, MOE_GEMV_BLOCKS_MANY past 8 copies."""
    if copies > 8:
        return MOE_GEMV_BLOCKS_MANY
    return MOE_GEMV_TUNED.get((hidden, inter), MOE_GEMV_BLOCKS)


def moe_gemv(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, idx: torch.Tensor,
             weights: torch.Tensor, blocks: Optional[Tuple[int, ...]] = None,
             shared: Optional[Tuple[torch.Tensor, torch.Tensor, int]] = None,
             norm: Optional[Tuple[torch.Tensor, float]] = None,
             residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A SwiGLU MoE layer's routed experts for a few tokens, in two launches: x (T, H), the
    stacked weights gate_up (E, 2I, H) (gate rows, then up rows) and down (E, H, I), each
    token's top-k expert ids idx (T, k) and router weights (T, k) -> (T, H) in x's dtype, the
    router-weighted sum of the token's experts' outputs. `blocks` (benchmarks' sweeps):
    the two launches' (BLOCK_N, BLOCK_K, num_warps), then optionally gate/up's LAZY, then
    optionally the two K loops' software-pipelining stages (default 1, 1: none; gemv's
    STAGES), default `moe_gemv_blocks` (the shape's swept tiles).

    shared: (gate|up (2S, H), down (H, S), n) of a shared SwiGLU MLP every token goes through
    (DeepSeek's shared experts, S = n * I: its gate rows, then its up rows, as the joined
    weight holds them): added to every token's output in the same two launches as n more
    experts of width I with weight 1 (SwiGLU's intermediate units are independent, so the MLP
    is the sum of its n slices), instead of three launches of its own.

    norm: (weight (H,), eps): x is the input of a Llama-style RMSNorm, applied inside the
    gate/up launch as `gemv`'s norm= applies it (the norm's own launch gone; the normalized
    row not rounded). residual: a (T, H) tensor
    of x's dtype updated in place with the output, r = round(r + round(y)) (returned: the
    residual stream's `h += moe(x)` inside the down launch); it may be x itself."""
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)} and down "
                         f"{tuple(down.shape)} must be (T, H), (E, 2I, H) and (E, H, I)")
    T, H = x.shape
    E, two_i, _ = gate_up.shape
    inter = two_i // 2
    if gate_up.shape[2] != H or down.shape != (E, H, inter) or two_i != 2 * inter:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} / down {tuple(down.shape)} do not "
                         f"fit hidden size {H}")
    if idx.shape != weights.shape or idx.dim() != 2 or idx.shape[0] != T:
        raise ValueError(f"idx {tuple(idx.shape)} and weights {tuple(weights.shape)} must both "
                         f"be ({T}, top_k)")
    k = idx.shape[1]
    n_sh = 0
    gu_s, dn_s = gate_up, down      # stand-ins when there is no shared MLP (never read)
    if shared is not None:
        gu_s, dn_s, n_sh = shared
        S = n_sh * inter
        if n_sh < 1 or gu_s.shape != (2 * S, H) or dn_s.shape != (H, S) \
                or gu_s.stride() != (H, 1) or dn_s.stride() != (S, 1) \
                or gate_up.stride()[1:] != (H, 1) or down.stride()[1:] != (inter, 1):
            raise ValueError(f"shared: gate|up {tuple(gu_s.shape)} must be ({2 * S}, {H}) and "
                             f"down {tuple(dn_s.shape)} ({H}, {S}), contiguous as the stacks, "
                             f"for {n_sh} experts of width {inter}")
        if gu_s.dtype != gate_up.dtype or dn_s.dtype != down.dtype:
            raise ValueError("shared: the shared MLP's weights must have the experts' dtype")
    kt = k + n_sh
    g, eps = (x, 0.0) if norm is None else norm
    if norm is not None and (tuple(g.shape) != (H,) or g.device != x.device
                             or not g.is_contiguous()):
        raise ValueError(f"norm: the weight {tuple(g.shape)} must be ({H},), contiguous, on "
                         f"{x.device}")
    if residual is not None and (tuple(residual.shape) != (T, H) or residual.stride(1) != 1
                                 or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"residual {tuple(residual.shape)} must be ({T}, {H}) of {x.dtype} with "
                         f"unit column stride, on {x.device}")
    x = x.contiguous()
    idx = idx.reshape(-1).contiguous()
    wt = weights.reshape(-1).contiguous()
    act = torch.empty(T * kt, inter, dtype=x.dtype, device=x.device)
    out = residual if residual is not None else torch.empty(T, H, dtype=x.dtype,
                                                            device=x.device)
    if T == 0:
        return out
    blocks = tuple(blocks or moe_gemv_blocks(H, inter, T * kt))
    gn, gk, gw, dn, dk, dw = blocks[:6]
    lazy = bool(blocks[6]) if len(blocks) > 6 else False
    g_st, d_st = (int(blocks[7]), int(blocks[8])) if len(blocks) > 8 else (1, 1)
    if g_st < 1 or d_st < 1:
        raise ValueError(f"blocks {blocks}: the loops' stages must be >= 1")
    _moe_gate_up_fast(
        (T * kt, cdiv(inter, gn)), x, gate_up, gu_s, idx, act, H, inter, k, kt, n_sh * inter, x.stride(0),
        *gate_up.stride(), inter * H, act.stride(0), g, float(eps),
        BLOCK_N=gn, BLOCK_K=gk, LAZY=lazy, NORM=norm is not None, STAGES=_stages(g_st),
        num_warps=gw, **pdl_kw(x.device))
    _moe_down_fast(
        (T, cdiv(H, dn)), act, down, dn_s, idx, wt, out, H, inter, k, kt, act.stride(0), *down.stride(),
        inter, n_sh * inter, out.stride(0),
        KP=next_pow2(kt), BLOCK_N=dn, BLOCK_K=dk, ADD=residual is not None, STAGES=_stages(d_st),
        num_warps=dw, **pdl_kw(x.device))
    return out


# ---- few tokens (decode): the router's softmax + top-k in one launch ----
#
# torch's softmax, topk (a sort and a gather at this size), sum and division cost ~24 us of
# device time a layer for one decode token (Qwen3-30B-A3B, session 14's profile): more than the
# experts' GEMVs after their tuning. One program a token does them in registers.

@triton.jit
def _moe_route_kernel(L, W, Idx, E, s_l, scale, K: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_K: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    x = tl.load(L + t * s_l + offs, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = tl.where(ok, p, 0.0)
    p = p / tl.sum(p, 0)                       # softmax over the experts
    left = tl.where(ok, p, -1.0)               # probabilities are >= 0: -1 marks taken / absent
    ks = tl.arange(0, BLOCK_K)
    ws = tl.zeros((BLOCK_K,), dtype=tl.float32)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for j in tl.static_range(K):               # the largest first (torch.topk's order); the
        best = tl.max(left, 0)                 # lowest expert id among equal probabilities
        # (NaN logits match nothing: the id stays in range and the weight NaN, as torch's)
        i = tl.minimum(tl.min(tl.where(left == best, offs, BLOCK_E), 0), E - 1)
        ws = tl.where(ks == j, best, ws)
        ids = tl.where(ks == j, i, ids)
        left = tl.where(offs == i, -1.0, left)
    if RENORM:
        ws = ws / tl.sum(tl.where(ks < K, ws, 0.0), 0)
    # a NaN or infinite logit (an overflowed hidden state) makes torch's softmax NaN: so the
    # weights here, whatever the maximum made of NaN (ids stay in range)
    broken = tl.sum(tl.where(p != p, 1, 0), 0) > 0
    ws = tl.where(broken, float("nan"), ws * scale)
    tl.store(W + t * K + ks, ws, mask=ks < K)
    tl.store(Idx + t * K + ks, ids.to(tl.int64), mask=ks < K)


_moe_route_fast = FastLaunch(_moe_route_kernel)


def moe_route(logits: torch.Tensor, top_k: int, renormalize: bool,
              scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Router logits (T, E) -> (weights (T, k) float32, expert ids (T, k) int64): the softmax
    in float32, the top_k largest probabilities (largest first), renormalised to sum to one
    when asked, times scale (DeepSeek's routed_scaling_factor). `MoE.route` without group
    limits, in one launch."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (T, E), got {tuple(logits.shape)}")
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in 1..{E}, got {top_k}")
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return w, idx
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    _moe_route_fast((T,), logits, w, idx, E, logits.stride(0), float(scale), K=top_k,
                    BLOCK_E=next_pow2(E), BLOCK_K=next_pow2(top_k), RENORM=bool(renormalize),
                    num_warps=1 if E <= 256 else 4, **pdl_kw(logits.device))
    return w, idx
