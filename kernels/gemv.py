"""A few rows times a weight matrix (Triton): y = x @ w^T (+ b) for decode steps.

A decode step's linear layers multiply one or a few token rows by each weight matrix: the cost
is reading the weights once. cuBLAS's kernels for such shapes reach ~95% of the H200's bandwidth
on a 235 MB matrix but 60-75% on the 8-50 MB projections of attention and of the smaller models
(session 15-17 profiles: Llama-3-8B's o_proj 33.5 MB in 12.6 us, Qwen3-30B-A3B's 16.8 MB in
8.9 us, DeepSeek-V2-Lite's 8.4 MB in 7.3 us, each a split-K GEMM and its reduce). Here one
program owns BLOCK_N output columns over the whole K, for all rows at once (MP: the rows
rounded up to a power of two), and sums its products once after the loop: one launch, no
split-K, each weight read once.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._host import FastLaunch, cdiv, next_pow2
from .pdl import pdl_enter, pdl_kw

# The default tile, by the weight's shape: `gemv_blocks`. Session 17's bench_gemv.py (one H200,
# bf16, one row, us, cuBLAS -> gemv at (4, 512, 4) without pipelining): Llama-3-8B o_proj 4096 x
# 4096 10.5 -> 8.0, Qwen3-30B-A3B o_proj 7.9 -> 6.2, its router 4.7 -> 2.2; cuBLAS stayed ahead
# on wider outputs (N > K) and larger matrices (Llama's down 31.9 against 37.2). Session 20's
# sweep with the K loop pipelined (2-4 stages; best tile, against cuBLAS in the same run):
# Llama-3-8B qkv 6144 x 4096 12.3 / 13.9 (BLOCK_N 8, 256, 4 warps, 4 stages), o 7.1 / 10.3,
# down 4096 x 14336 29.3 / 32.1, Qwen3-30B-A3B qkv 5.6 / 6.5, o 4.9 / 7.8, router 2.0 / 4.7,
# DeepSeek-V2-Lite q|kv_a 4.8 / 5.8, o 3.5 / 5.1, shared gate|up 6.1 / 6.6, down 4.2 / 6.4:
# with pipelining the GEMV is ahead on every one-row shape, wide or long. The best tiles were
# (8, 512, 4, 3) or near it, with BLOCK_N 4 or 2 where fewer columns leave SMs idle.
GEMV_BLOCKS: Optional[Tuple[int, ...]] = None   # a tile for every shape (sweeps), or None
GEMV_STAGES = 3
# Session 21 (the tiles by shape as defaults): Llama-3-8B gate|up 28672 x 4096 57.4 us against
# cuBLAS's 62.4 (floor 55.4), qkv 11.6 / 13.7, down 29.4 / 32.1, o 7.0 / 10.3
GEMV_MAX_WEIGHTS = 1 << 27     # the largest weight swept: Llama-3-8B's gate|up, 117M values


@triton.jit
def _gemv_kernel(X, W, Bias, Y, M, N, K, s_xm, s_xk, s_wn, s_wk, s_ym,
                 s_xh, s_wh, s_yh, G, eps,
                 MP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr = False,
                 STAGES: tl.constexpr = None, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # program (column block, head): `head_gemv`'s heads are a batch of independent products
    # (the head strides are 0 for `gemv`'s one matrix)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    head = tl.program_id(1).to(tl.int64)
    X += head * s_xh
    W += head * s_wh
    Y += head * s_yh
    col_ok = cols < N
    ms = tl.arange(0, MP)
    m_ok = ms < M
    w_rows = W + cols.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros((MP, BLOCK_N, BLOCK_K), dtype=tl.float32)
    ss = tl.zeros((MP, BLOCK_K), dtype=tl.float32)      # NORM: the rows' squares
    # STAGES > 1: the loop's loads software-pipelined (triton's per-loop num_stages, which
    # since 3.5 covers loads that feed no dot); None: the plain loop (each step's loads wait
    # for the last step's: no dot here for the kernel-wide num_stages to pipeline)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_rows + ks[None, :] * s_wk, mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)                                  # (BN, BK)
        x = tl.load(X + ms[:, None] * s_xm + ks[None, :] * s_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # (MP, BK)
        if NORM:    # RMSNorm's input: its weight now, its statistic after the loop
            ss += x * x
            x = x * tl.load(G + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        acc += w[None, :, :] * x[:, None, :]
    y = tl.sum(acc, axis=2)                                                    # (MP, BN)
    if NORM:
        y = y * _rstd(ss, K, eps)[:, None]
    _store_rows(y, Bias, Y, ms, cols, m_ok, col_ok, s_ym, HAS_BIAS, ADD)


@triton.jit
def _store_rows(y, Bias, Y, ms, cols, m_ok, col_ok, s_ym, HAS_BIAS: tl.constexpr,
                ADD: tl.constexpr):
    """The epilogue of gemv's and gemm_few's programs: y (rows, BLOCK_N) float32 sums, + the
    bias, stored into Y's rows ms, columns cols (ADD 1: added to what Y holds, rounded once;
    ADD 2: rounded, then added and rounded again, as torch's h += linear(x))."""
    if HAS_BIAS:
        y += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptr = Y + ms[:, None].to(tl.int64) * s_ym + cols[None, :]
    y_ok = m_ok[:, None] & col_ok[None, :]
    if ADD == 1:    # y += x @ w^T, rounded once (as addmm_)
        y += tl.load(y_ptr, mask=y_ok, other=0.0).to(tl.float32)
    elif ADD == 2:  # the residual stream's update: the product rounded, then y + it rounded
        y = y.to(Y.dtype.element_ty).to(tl.float32) \
            + tl.load(y_ptr, mask=y_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr, y.to(Y.dtype.element_ty), mask=y_ok)


@triton.jit
def _rstd(ss, K, eps):
    """RMSNorm's 1 / sqrt(mean(x^2) + eps) of rows whose squares, summed over the loop's
    chunks, are ss (rows, BLOCK_K), K wide."""
    return 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)


# launched without triton's per-launch Python (`FastLaunch`): a decode step without CUDA graphs
# launches gemv 4 times a layer (session 21's Llama-3-8B eager step: host 8.8 -> 11.5 ms under
# the profiler when qkv, gate|up and down moved here from cuBLAS through triton's path)
_gemv_fast = FastLaunch(_gemv_kernel)


def _tiles(blocks: Tuple[int, ...], x: torch.Tensor) -> Tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps[, stages]) -> all four (stages default 1: no pipelining;
    CPU: 4 warps)."""
    bn, bk, warps = blocks[:3]
    stages = int(blocks[3]) if len(blocks) > 3 else 1
    if stages < 1:
        raise ValueError(f"gemv: stages ({stages}) must be >= 1")
    return bn, bk, 4 if x.device.type == "cpu" else warps, stages


def gemv_blocks(n: int, k: int) -> Tuple[int, int, int, int]:
    """gemv's default tile for an (n, k) weight: (BLOCK_N, 512, 4 warps, GEMV_STAGES), BLOCK_N
    the widest of 8, 4, 2 that still gives 256 programs (two per SM of an H200) where it can
    (a 128-wide router: 2). GEMV_BLOCKS, when set, overrides it for every shape."""
    if GEMV_BLOCKS is not None:
        return tuple(GEMV_BLOCKS)
    bn = 8 if n >= 8 * 256 else (4 if n >= 4 * 256 else 2)
    return bn, 512, 4, GEMV_STAGES


def _output_rows(fn: str, name: str, into: Optional[torch.Tensor], M: int, N: int,
                 x: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The (M, N) tensor a product goes into: `into` (add_to / residual), checked, or a new
    one of out_dtype (default x's)."""
    if into is None:
        return torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    if tuple(into.shape) != (M, N) or into.stride(1) != 1 or into.device != x.device:
        raise ValueError(f"{fn}: {name} {tuple(into.shape)} must be ({M}, {N}) with unit "
                         f"column stride, on {x.device}")
    return into


def _stages(stages: int) -> Optional[int]:
    """A K loop's STAGES constexpr: None (the loop unannotated, as before stages existed) for
    1, else the depth."""
    return None if stages == 1 else stages


def gemv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None,
         blocks: Optional[Tuple[int, int, int]] = None, out_dtype: Optional[torch.dtype] = None,
         add_to: Optional[torch.Tensor] = None,
         norm: Optional[Tuple[torch.Tensor, float]] = None,
         residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T (+ b (N,)) -> (M, N), float32 sums: F.linear for a few rows (tuned
    for one; any M works). x may be of another float dtype than w (each is read as it is and
    multiplied in float32: a bf16 activation times a float32 router); the output is out_dtype
    (default x's). add_to: an (M, N) tensor the product is added into (returned; as
    `add_to.addmm_(x, w.t())`). `blocks`: (BLOCK_N, BLOCK_K, num_warps[, stages]), default
    `gemv_blocks(N, K)` (benchmarks' sweeps; stages > 1 software-pipelines the K loop's loads).

    norm: (weight (K,), eps): x is the input of a Llama-style RMSNorm, applied inside this
    launch (the norm's own launch gone): each program multiplies x by the norm's weight as it
    reads it and sums its squares on the way, then scales its sums by the rows' 1 / rms. The
    normalized row is never rounded to x's dtype (the torch module rounds it twice): the
    same math, rounded less. (Session 19's first version took the statistic in a pass of its
    own before the loop, rounding as the module does: that pass's serial loads cost ~7.7 us a
    MoE layer, more than the norm's launch.) residual: an (M, N) tensor r of the output's dtype
    updated in place, r = round(r + round(x @ w^T + b)) (returned): the residual stream's
    update rounded as torch's `h += linear(x)` rounds it (add_to rounds once)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} must be (M, K) and w {tuple(w.shape)} (N, K)")
    if not (x.is_floating_point() and w.is_floating_point()) or x.device != w.device:
        raise ValueError(f"gemv: x ({x.dtype}, {x.device}) and w ({w.dtype}, {w.device}) "
                         f"must be floating point on one device")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"gemv: bias {tuple(b.shape)} must be ({w.shape[0]},)")
    M, K = x.shape
    N = w.shape[0]
    if add_to is not None and residual is not None:
        raise ValueError("gemv: add_to and residual are two ways to add: give one")
    y = _output_rows("gemv", "add_to" if add_to is not None else "residual",
                     add_to if add_to is not None else residual, M, N, x, out_dtype)
    g, eps = (w, 0.0) if norm is None else norm
    if norm is not None and (tuple(g.shape) != (K,) or g.device != x.device
                             or not g.is_contiguous()):
        raise ValueError(f"gemv: the norm's weight {tuple(g.shape)} must be ({K},), contiguous, "
                         f"on {x.device}")
    if M == 0 or N == 0:
        return y
    bn, bk, warps, stages = _tiles(blocks or gemv_blocks(N, K), x)
    _gemv_fast((cdiv(N, bn), 1),
        x, w, b if b is not None else w, y, M, N, K, *x.stride(), *w.stride(), y.stride(0),
        0, 0, 0, g, float(eps), MP=next_pow2(M), BLOCK_N=bn, BLOCK_K=bk,
        HAS_BIAS=b is not None, ADD=1 if add_to is not None else (2 if residual is not None
                                                                    else 0),
        NORM=norm is not None, STAGES=_stages(stages), num_warps=warps, **pdl_kw(x.device))
    return y


def gemv_wins(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `gemv` is the faster way to x @ w^T: one row and a weight of at most
    GEMV_MAX_WEIGHTS values, of any width (sessions 20-21's sweeps, above; until then, N <= K and
    2^24 values: cuBLAS was ahead on wide outputs without the pipelined loop)."""
    return x.dim() == 2 and x.shape[0] == 1 and w.dim() == 2 \
        and w.numel() <= GEMV_MAX_WEIGHTS


# ------------------------------------------------------------------------------------------
# A few rows (2-64) on the tensor cores: the batch-16 decode step's projections (a shared
# document's 16 questions). `gemv` above multiplies on the CUDA cores, its (rows, BLOCK_N,
# BLOCK_K) products in registers: fine for one row, too many registers for 16. Here each
# program owns BLOCK_N output columns over the whole K as gemv's do (each weight read once, no
# split-K), and multiplies the rows, padded to MP >= 16 (tl.dot's smallest M), with tl.dot;
# the loads of its K loop are software-pipelined (STAGES). Against cuBLAS on one H200 (session
# 23, bench_gemv.py --few, Llama-3-8B's four projections at 16 rows) it is 0.1-2.1 us ahead on
# three and even on gate|up at its best tiles (`gemm_few_blocks`): ~3 us a layer, under 1% of
# the batch-16 step, whose time is in its attention (57%). The model takes it only where
# RINGSERVE_GEMM_FEW_ROWS says (its largest row count; default 0: off).
FEW_ROWS_MAX = int(os.environ.get("RINGSERVE_GEMM_FEW_ROWS", "0"))
FEW_ROWS_LIMIT = 64     # gemm_few's largest row count (MP = 64: a (64, BLOCK_N) accumulator)


@triton.jit
def _gemm_few_kernel(X, W, Bias, Y, M, N, K, s_xm, s_xk, s_wn, s_wk, s_ym,
                     MP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ADD: tl.constexpr, DOT_PREC: tl.constexpr,
                     STAGES: tl.constexpr = None, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ms = tl.arange(0, MP)
    m_ok = ms < M
    w_rows = W + cols.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros((MP, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_rows + ks[None, :] * s_wk, mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)                                                 # (BN, BK)
        x = tl.load(X + ms[:, None] * s_xm + ks[None, :] * s_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)             # (MP, BK)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    _store_rows(acc, Bias, Y, ms, cols, m_ok, col_ok, s_ym, HAS_BIAS, ADD)


_gemm_few_fast = FastLaunch(_gemm_few_kernel)


def gemm_few_blocks(n: int, k: int) -> Tuple[int, int, int, int]:
    """gemm_few's default tile for an (n, k) weight, (BLOCK_N, BLOCK_K, warps, stages), from
    session 23's sweep (bench_gemv.py --few, one H200, bf16, 4 / 16 rows, us, against cuBLAS
    in the same run): Llama-3-8B down 4096 x 14336 31.2 / 33.3 at (32, 256, 4, 5), gate|up
    28672 x 4096 57.7 / 57.6 at (32, 128, 4, 3), qkv 6144 x 4096 12.6 / 12.7 at (64, 256, 4,
    5), o 4096 x 4096 9.0 / 9.6 at (32, 256, 4, 3). (Its first default, 16-wide column blocks,
    ran 1.1-1.4x slower than these.)"""
    if k >= 8192:
        return 32, 256, 4, 5
    if n >= 16384:
        return 32, 128, 4, 3
    if n >= 6144:
        return 64, 256, 4, 5
    return 32, 256, 4, 3


def gemm_few(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None,
             blocks: Optional[Tuple[int, ...]] = None, out_dtype: Optional[torch.dtype] = None,
             add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T (+ b (N,)) -> (M, N) for 1 <= M <= FEW_ROWS_LIMIT rows on the
    tensor cores (float32 sums), x and w of one dtype; the output is out_dtype (default x's).
    add_to: an (M, N) tensor with unit column stride the product is added into (returned; as
    `add_to.addmm_(x, w.t())`). blocks: (BLOCK_N >= 16, BLOCK_K >= 16, num_warps[, stages]),
    default `gemm_few_blocks(N, K)`."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemm_few: x {tuple(x.shape)} must be (M, K) and w "
                         f"{tuple(w.shape)} (N, K)")
    if not x.is_floating_point() or x.dtype != w.dtype or x.device != w.device:
        raise ValueError(f"gemm_few: x ({x.dtype}, {x.device}) and w ({w.dtype}, {w.device}) "
                         f"must be of one floating dtype on one device")
    M, K = x.shape
    N = w.shape[0]
    if M > FEW_ROWS_LIMIT:
        raise ValueError(f"gemm_few: {M} rows (at most {FEW_ROWS_LIMIT}; F.linear beyond)")
    if b is not None and (tuple(b.shape) != (N,) or b.device != x.device):
        raise ValueError(f"gemm_few: bias {tuple(b.shape)} must be ({N},) on {x.device}")
    y = _output_rows("gemm_few", "add_to", add_to, M, N, x, out_dtype)
    bn, bk, warps, stages = _tiles(blocks or gemm_few_blocks(N, K), x)
    if bn < 16 or bk < 16:
        raise ValueError(f"gemm_few: BLOCK_N and BLOCK_K must be >= 16 (tl.dot), got {bn}, {bk}")
    if M == 0 or N == 0:
        return y
    _gemm_few_fast((cdiv(N, bn),),
        x, w, b if b is not None else w, y, M, N, K, *x.stride(), *w.stride(), y.stride(0),
        MP=max(16, next_pow2(M)), BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=b is not None,
        ADD=1 if add_to is not None else 0,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        STAGES=_stages(stages), num_warps=warps, **pdl_kw(x.device))
    return y


def gemm_few_wins(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the few-token path takes `gemm_few` for x @ w^T: 2 to FEW_ROWS_MAX rows
    (RINGSERVE_GEMM_FEW_ROWS; default 0: never) and a weight of at most GEMV_MAX_WEIGHTS
    values (one row is `gemv`'s)."""
    return x.dim() == 2 and 2 <= x.shape[0] <= min(FEW_ROWS_MAX, FEW_ROWS_LIMIT) \
        and w.dim() == 2 and w.numel() <= GEMV_MAX_WEIGHTS


def few_rows_down(a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None,
                  add_to: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """a @ w^T (+ b), or add_to += a @ w^T, by `gemv` (one row) or `gemm_few` (a few) where
    it wins and a, w (and add_to) share a dtype; None: not taken (the caller's cuBLAS)."""
    if a.dtype != w.dtype:
        return None
    fn = gemv if gemv_wins(a, w) else (gemm_few if gemm_few_wins(a, w) else None)
    if fn is None:
        return None
    if add_to is None:
        return fn(a, w, b)
    if b is None and add_to.dtype == a.dtype and add_to.stride(1) == 1:
        return fn(a, w, add_to=add_to)
    return None


# Rows (tokens) up to which the model takes norms and residual adds into gemv: off (0) unless
# the environment's RINGSERVE_FOLD_ROWS says otherwise. Measured on one H200 (session 19,
# benchmarks/results/2026-12-01-s19): DeepSeek-V2-Lite's 8K decode step 348 -> 296 kernels but
# 2.45 -> 2.61 ms of device time (graphs 2.74 -> 3.03 ms a token: the MoE gate/up launch with
# the norm 27.5 -> 33.0 us a layer; the GEMVs with q|kv_a 571 us against 318 us plus cuBLAS's
# q|kv_a 173 us and the norms' 111 us); Qwen3-30B-A3B's 8K decode 3.54 -> 3.78 ms on one
# machine. Fewer launches did not pay for the slower kernels, so the fold is opt-in.
FOLD_MAX_ROWS = int(os.environ.get("RINGSERVE_FOLD_ROWS", "0"))


def folds(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the few-token path takes an RMSNorm before x @ w^T, or the residual add after
    it, into `gemv`'s launch (norm=, residual=): at most FOLD_MAX_ROWS rows (default 0: off,
    see above) and a weight of at most GEMV_MAX_WEIGHTS values, of any width."""
    return x.dim() == 2 and x.shape[0] <= FOLD_MAX_ROWS and w.dim() == 2 \
        and w.numel() <= GEMV_MAX_WEIGHTS


def few_rows_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """F.linear(x, w, b) (x cast to w's dtype first, the output to out_dtype), by `gemv` where
    it `gemv_wins` (one row) or `gemm_few` where it `gemm_few_wins` (a few): the few-token
    path's projections (the caller has chosen Triton)."""
    if gemv_wins(x, w):
        if x.dtype != w.dtype and w.dtype != torch.float32:   # else read as it is: exact
            x = x.to(w.dtype)
        return gemv(x, w, b, out_dtype=out_dtype or w.dtype)
    if gemm_few_wins(x, w):
        return gemm_few(x if x.dtype == w.dtype else x.to(w.dtype), w, b,
                        out_dtype=out_dtype or w.dtype)
    y = torch.nn.functional.linear(x if x.dtype == w.dtype else x.to(w.dtype), w, b)
    return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)


# head_gemv's tiles by the weight's layout: (BLOCK_N, BLOCK_K, num_warps) when the reduced dim
# is the contiguous one (DeepSeek's W_UV, (h, v, c) summed over c), and when the output dim is
# (its W_UK, (h, n, c) read as (h, c, n): the tile is long in the output columns). Session 18's
# sweep (bench_gemv.py, one H200, 16 heads of 128 x 512, one row / four, us): W_UV 2.4 / 3.5 at
# (4, 512, 4) against einsum's 3.1 / 3.1; W_UK 2.9 at (32, 64, 4), 3.2 at (64, 32, 4) / 4.0
# against 2.8 / 2.8 (the model leaves W_UK to einsum: MLAttention._absorb)
HEAD_GEMV_BLOCKS = (4, 512, 4)
HEAD_GEMV_BLOCKS_T = (32, 64, 4)
HEAD_GEMV_MAX_ROWS = 1      # rows (tokens) up to which MLA's absorption takes head_gemv


def head_gemv(x: torch.Tensor, w: torch.Tensor, out_dtype: Optional[torch.dtype] = None,
              blocks: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """Per-head products for a few rows: x (M, H, K) and w (H, N, K), any strides -> y (M, H,
    N) contiguous, y[m, h] = w[h] @ x[m, h] with float32 sums, in one launch (MLA's absorption
    of a decode token: torch.einsum's batched GEMM of M = 1 per head took 3.3-3.5 us for 1-2 MB
    of weights, session 17's profile). out_dtype: default x's. blocks: (BLOCK_N, BLOCK_K,
    num_warps[, stages]) as gemv's, default by w's layout (HEAD_GEMV_BLOCKS / _T)."""
    if x.dim() != 3 or w.dim() != 3 or x.shape[1] != w.shape[0] or x.shape[2] != w.shape[2]:
        raise ValueError(f"head_gemv: x {tuple(x.shape)} must be (M, H, K) and w "
                         f"{tuple(w.shape)} (H, N, K)")
    if not (x.is_floating_point() and w.is_floating_point()) or x.device != w.device:
        raise ValueError(f"head_gemv: x ({x.dtype}, {x.device}) and w ({w.dtype}, {w.device}) "
                         f"must be floating point on one device")
    M, H, K = x.shape
    N = w.shape[1]
    y = torch.empty(M, H, N, dtype=out_dtype or x.dtype, device=x.device)
    if M == 0 or H == 0 or N == 0:
        return y
    if blocks is None:
        blocks = HEAD_GEMV_BLOCKS_T if w.stride(1) == 1 and w.stride(2) != 1 \
            else HEAD_GEMV_BLOCKS
    bn, bk, warps, stages = _tiles(blocks, x)
    _gemv_fast((cdiv(N, bn), H),
        x, w, w, y, M, N, K, x.stride(0), x.stride(2), w.stride(1), w.stride(2), y.stride(0),
        x.stride(1), w.stride(0), y.stride(1), w, 0.0,
        MP=next_pow2(M), BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=False, ADD=0,
        STAGES=_stages(stages), num_warps=warps,
        **pdl_kw(x.device))
    return y
