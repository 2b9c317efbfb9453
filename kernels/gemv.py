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

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2

GEMV_MAX_ROWS = 4          # rows up to which `gemv` is meant to stand in for the GEMM
GEMV_BLOCKS = (4, 512, 4)  # (BLOCK_N, BLOCK_K, num_warps) by default


@triton.jit
def _gemv_kernel(X, W, Bias, Y, M, N, K, s_xm, s_xk, s_wn, s_wk, s_ym,
                 MP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ms = tl.arange(0, MP)
    m_ok = ms < M
    w_rows = W + cols.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros((MP, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w = tl.load(w_rows + ks[None, :] * s_wk, mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)                                  # (BN, BK)
        x = tl.load(X + ms[:, None] * s_xm + ks[None, :] * s_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # (MP, BK)
        acc += w[None, :, :] * x[:, None, :]
    y = tl.sum(acc, axis=2)                                                    # (MP, BN)
    if HAS_BIAS:
        y += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + ms[:, None].to(tl.int64) * s_ym + cols[None, :], y.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & col_ok[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None,
         blocks: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T (+ b (N,)) -> (M, N) in x's dtype, float32 sums: F.linear for a
    few rows (M <= GEMV_MAX_ROWS is what it is tuned for; any M works). `blocks`: (BLOCK_N,
    BLOCK_K, num_warps), default GEMV_BLOCKS (benchmarks' sweeps)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv: x {tuple(x.shape)} must be (M, K) and w {tuple(w.shape)} (N, K)")
    if x.dtype != w.dtype or x.device != w.device:
        raise ValueError(f"gemv: x ({x.dtype}, {x.device}) and w ({w.dtype}, {w.device}) "
                         f"must agree")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"gemv: bias {tuple(b.shape)} must be ({w.shape[0]},)")
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    bn, bk, warps = blocks or GEMV_BLOCKS
    if x.device.type == "cpu":
        warps = 4
    _gemv_kernel[(cdiv(N, bn),)](
        x, w, b if b is not None else w, y, M, N, K, *x.stride(), *w.stride(), y.stride(0),
        MP=next_pow2(M), BLOCK_N=bn, BLOCK_K=bk, HAS_BIAS=b is not None, num_warps=warps)
    return y
