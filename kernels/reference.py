"""Plain-PyTorch references for every kernel, computed in float64 (or float32).

These are the ground truth of every test: slow, simple, no blocking, no tricks.

Conventions shared by every attention function in ringserve (kernels, torch path, ring):
  q (B, Sq, Hq, D); k, v (B, Sk, Hkv, D) with Hq % Hkv == 0 (MHA, GQA, MQA)
  out (B, Sq, Hq, D); lse (B, Hq, Sq) float32, natural log; a fully masked row has lse=-inf, out=0.
  Positions are global: row i of q sits at q_offset + i * q_stride, row j of k at
  k_offset + j * k_stride (contiguous shards: stride 1; round-robin stripes over N ranks: stride N).
  causal: key visible iff k_pos <= q_pos.
  window_size (int w >= 0, flash_attn's "left" window): key visible iff q_pos - k_pos <= w, and
  when not causal also k_pos - q_pos <= w. Mistral's sliding_window W is window_size = W - 1.
  softcap (float c > 0, or None/0: off; Gemma 2's attn_logit_softcapping): the scaled score s
  becomes c * tanh(s / c) before the mask and the softmax.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def positions(n: int, offset: int = 0, stride: int = 1, device=None) -> torch.Tensor:
    return offset + stride * torch.arange(n, device=device, dtype=torch.int64)


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool,
                 window_size: Optional[int]) -> torch.Tensor:
    """(Sq, Sk) bool: True where query q_pos[i] may attend to key k_pos[j]."""
    diff = q_pos[:, None] - k_pos[None, :]  # q - k
    mask = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        mask &= diff >= 0
    if window_size is not None:
        mask &= diff <= window_size
        if not causal:
            mask &= diff >= -window_size
    return mask


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=None,
                  q_offset=0, q_stride=1, k_offset=0, k_stride=1,
                  q_pos=None, k_pos=None, dtype=torch.float64, softcap=None):
    """Exact attention. Returns (out in `dtype`, lse float32 (B, Hq, Sq)).

    q_pos / k_pos (1-D int tensors) override the offset/stride description when given.
    """
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0, (Hq, Hkv)
    g = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if q_pos is None:
        q_pos = positions(Sq, q_offset, q_stride, q.device)
    if k_pos is None:
        k_pos = positions(Sk, k_offset, k_stride, k.device)
    qf = q.to(dtype).reshape(B, Sq, Hkv, g, D)
    kf, vf = k.to(dtype), v.to(dtype)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qf, kf) * scale  # (B, Hkv, g, Sq, Sk)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = visible_mask(q_pos.to(k.device), k_pos.to(k.device), causal, window_size)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, g, Sq); -inf on fully masked rows
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    p = torch.where(mask, p, torch.zeros_like(p))
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, vf).reshape(B, Sq, Hq, v.shape[3])
    return out, lse.reshape(B, Hq, Sq).float()


def merge_ref(out_a, lse_a, out_b, lse_b):
    """Merge two partial results over disjoint key sets. out (B, S, H, D), lse (B, H, S)."""
    la, lb = lse_a.double(), lse_b.double()
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    sa, sb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    tot = sa + sb
    lse = torch.where(tot > 0, m_safe + torch.log(tot), torch.full_like(m, float("-inf")))
    wa = torch.where(tot > 0, sa / tot, torch.zeros_like(tot)).transpose(1, 2)[..., None]
    wb = torch.where(tot > 0, sb / tot, torch.zeros_like(tot)).transpose(1, 2)[..., None]
    out = wa * out_a.double() + wb * out_b.double()
    return out, lse.float()


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """cache (num_pages, page_size, ...) + one row of a block table -> (length, ...) contiguous."""
    page = cache.shape[1]
    n = (length + page - 1) // page
    return cache[block_table[:n].long()].reshape(n * page, *cache.shape[2:])[:length]


def paged_decode_ref(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=None,
                     causal=False, window_size=None, q_pos=None, kv_pos=None,
                     dtype=torch.float64, softcap=None):
    """Attention of a few query tokens against a paged KV cache.

    q (B, Sq, Hq, D); k_cache, v_cache (num_pages, page_size, Hkv, D); block_table (B, max_pages)
    int32; seq_lens (B,) int32; q_pos (B, Sq) int and kv_pos (num_pages, page_size) int are the
    global positions used by causal/window masking (needed only when masking).
    Returns out (B, Sq, Hq, D) in `dtype` and lse (B, Hq, Sq) float32.
    """
    B, Sq, Hq, D = q.shape
    outs, lses = [], []
    for b in range(B):
        n = int(seq_lens[b])
        kb = gather_pages(k_cache, block_table[b], n)[None]
        vb = gather_pages(v_cache, block_table[b], n)[None]
        qp = q_pos[b] if q_pos is not None else torch.full((Sq,), n, dtype=torch.int64)
        kp = (gather_pages(kv_pos, block_table[b], n) if kv_pos is not None
              else torch.arange(n, dtype=torch.int64))
        o, l = attention_ref(q[b:b + 1], kb, vb, softmax_scale, causal, window_size,
                             q_pos=qp.long().cpu(), k_pos=kp.long().cpu(), dtype=dtype,
                             softcap=softcap)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 plus_one: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim in float64; the scale is w, or 1 + w (Gemma)."""
    xd, w = x.double(), weight.double()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    return y * (1.0 + w if plus_one else w)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D), cos, sin (T, 1, D/2): dim i rotates with i + D/2 (HF's rotate-half), in
    float64."""
    xd = x.double()
    c, s = cos.double(), sin.double()
    x1, x2 = xd.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def act_mul_ref(gate: torch.Tensor, up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """SiLU(gate) * up, or GELU-tanh(gate) * up, in float64."""
    g = gate.double()
    a = (torch.nn.functional.gelu(g, approximate="tanh") if gelu
         else torch.nn.functional.silu(g))
    return a * up.double()
