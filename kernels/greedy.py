"""Greedy picks for a batch of logits rows (Triton): each row's argmax and its log-probability.

`sample_batch`'s greedy rows took a float32 cast of the logits, an argmax, a log-softmax over
the whole vocabulary and a gather: ~50 us of device time a decode step on the H200 (session 17's
profiles: torch's single-row reductions over 100-150K logits run on one block each, ~23 us
apiece). Here the vocabulary is cut into blocks: one launch gives each block's maximum, its
first index and its sum of exp(x - max), a second merges them per row: the first index of the
row's maximum (torch.argmax's choice among ties) and log p = -log(sum over the blocks of
s_b * exp(m_b - M)), which is log_softmax(x)[argmax].
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_pow2
from .pdl import pdl_enter, pdl_kw

GREEDY_BLOCK = 4096


@triton.jit
def _greedy_part_kernel(L, PM, PI, PS, V, NB, s_l, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    x = tl.load(L + r * s_l + offs, mask=ok, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    first = tl.min(tl.where(x == m, offs, 2147483647), 0)
    s = tl.sum(tl.where(ok, tl.exp(x - m), 0.0), 0)
    # a NaN is the maximum, as for torch.argmax: its first index, and a NaN block
    nan_at = tl.min(tl.where(x != x, offs, 2147483647), 0)
    first = tl.where(nan_at < 2147483647, nan_at, first)
    m = tl.where(nan_at < 2147483647, float("nan"), m)
    tl.store(PM + r * NB + b, m)
    tl.store(PI + r * NB + b, first)
    tl.store(PS + r * NB + b, s)


@triton.jit
def _greedy_merge_kernel(PM, PI, PS, Tok, Lp, NB, BLOCK_B: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_B)
    ok = offs < NB
    m = tl.load(PM + r * NB + offs, mask=ok, other=float("-inf"))
    big = tl.max(m, 0)
    first = tl.load(PI + r * NB + offs, mask=ok, other=2147483647)
    tok = tl.min(tl.where(ok & (m == big), first, 2147483647), 0)
    s = tl.load(PS + r * NB + offs, mask=ok, other=0.0)
    total = tl.sum(tl.where(ok & (m > float("-inf")), s * tl.exp(m - big), 0.0), 0)
    lp = -tl.log(total)
    nan_tok = tl.min(tl.where(ok & (m != m), first, 2147483647), 0)   # the first NaN block's
    tok = tl.where(nan_tok < 2147483647, nan_tok, tok)
    lp = tl.where(nan_tok < 2147483647, float("nan"), lp)
    tl.store(Tok + r, tok.to(tl.int64))
    tl.store(Lp + r, lp)


def greedy_pick(logits: torch.Tensor, block: int = GREEDY_BLOCK) -> Tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """logits (B, V), any float dtype -> (tokens (B,) int64: the first index of each row's
    maximum, logprobs (B,) float32: log_softmax(row)[token]; a row with a NaN: its first NaN's
    index and a NaN, as torch's), two launches, no host sync."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"greedy_pick: logits must be (B, V) floating point, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    B, V = logits.shape
    toks = torch.empty(B, dtype=torch.int64, device=logits.device)
    lps = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return toks, lps
    if V == 0 or logits.stride(1) != 1:
        raise ValueError(f"greedy_pick: logits must have a vocabulary with unit stride, got "
                         f"shape {tuple(logits.shape)}, strides {logits.stride()}")
    nb = cdiv(V, block)
    pm = torch.empty(B, nb, dtype=torch.float32, device=logits.device)
    pi = torch.empty(B, nb, dtype=torch.int32, device=logits.device)
    ps = torch.empty(B, nb, dtype=torch.float32, device=logits.device)
    _greedy_part_kernel[(B, nb)](logits, pm, pi, ps, V, nb, logits.stride(0), BLOCK=block,
                                 num_warps=8 if logits.device.type == "cuda" else 4,
                                 **pdl_kw(logits.device))
    _greedy_merge_kernel[(B,)](pm, pi, ps, toks, lps, nb, BLOCK_B=max(2, next_pow2(nb)),
                               num_warps=1 if logits.device.type == "cuda" else 4,
                               **pdl_kw(logits.device))
    return toks, lps
