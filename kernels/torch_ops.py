"""The torch (non-Triton) path: same contracts as the Triton kernels, for CPU serving.

Blocked over queries so memory stays bounded, float32 statistics, and key ranges that the mask
removes entirely are never computed (the same skipping rule as the Triton kernel).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .reference import visible_mask


def key_range(q_lo: int, q_hi: int, Sk: int, causal: bool, window_size: Optional[int],
              k_offset: int, k_stride: int) -> Tuple[int, int]:
    """Index range [j0, j1) of keys that queries at positions q_lo..q_hi may see at all."""
    j0, j1 = 0, Sk
    hi_pos = q_hi if causal else (q_hi + window_size if window_size is not None else None)
    if hi_pos is not None:
        j1 = min(Sk, max(0, (hi_pos - k_offset) // k_stride + 1))
    if window_size is not None:
        lo_pos = q_lo - window_size
        j0 = max(0, -((k_offset - lo_pos) // k_stride))  # ceil((lo_pos - k_offset) / k_stride)
    return j0, max(j0, j1)


def attention_torch(q, k, v, softmax_scale=None, causal=False, window_size=None,
                    q_offset=0, q_stride=1, k_offset=0, k_stride=1, block_q=None, softcap=None):
    """Exact attention on any device with plain torch ops. Returns (out in q.dtype, lse fp32)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"num q heads ({Hq}) must be a multiple of num kv heads ({Hkv})")
    g = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.zeros(B, Sq, Hq, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    if Sq == 0 or Sk == 0:
        return out, lse
    if block_q is None:  # keep the (B, H, bq, Sk) float32 score block near 64 MiB
        block_q = max(16, min(Sq, (1 << 24) // max(1, B * Hq * Sk)))
    for i0 in range(0, Sq, block_q):
        i1 = min(Sq, i0 + block_q)
        q_lo, q_hi = q_offset + i0 * q_stride, q_offset + (i1 - 1) * q_stride
        j0, j1 = key_range(q_lo, q_hi, Sk, causal, window_size, k_offset, k_stride)
        if j1 <= j0:
            continue  # every key masked for this block: skipped, lse stays -inf, out 0
        qb = q[:, i0:i1].float().reshape(B, i1 - i0, Hkv, g, D)
        kb, vb = k[:, j0:j1].float(), v[:, j0:j1].float()
        s = torch.einsum("bqhgd,bkhd->bhgqk", qb, kb) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if causal or window_size is not None:
            qp = q_offset + q_stride * torch.arange(i0, i1, device=q.device)
            kp = k_offset + k_stride * torch.arange(j0, j1, device=q.device)
            s = s.masked_fill(~visible_mask(qp, kp, causal, window_size), float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(dim=-1, keepdim=True)
        o = torch.einsum("bhgqk,bkhd->bqhgd", p / torch.where(l > 0, l, torch.ones_like(l)), vb)
        out[:, i0:i1] = o.reshape(B, i1 - i0, Hq, v.shape[3]).to(q.dtype)
        lse[:, :, i0:i1] = torch.where(l > 0, m + torch.log(l), torch.full_like(l, float("-inf"))
                                       ).reshape(B, Hq, i1 - i0)
    return out, lse


def merge_torch_(out_acc, lse_acc, out_b, lse_b):
    """In place: (out_acc, lse_acc) <- merge((out_acc, lse_acc), (out_b, lse_b)).

    out (B, S, H, D) (accumulator ideally float32), lse (B, H, S) float32. Stable for -inf on
    either side: merging with a fully masked partial is a no-op, never a NaN.
    """
    la, lb = lse_acc, lse_b.float()
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    ea, eb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    tot = ea + eb
    new_lse = torch.where(tot > 0, m_safe + torch.log(tot), torch.full_like(m, float("-inf")))
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    wa = (ea / safe).transpose(1, 2).unsqueeze(-1)
    wb = (eb / safe).transpose(1, 2).unsqueeze(-1)
    out_acc.copy_((wa * out_acc.float() + wb * out_b.float()).to(out_acc.dtype))
    lse_acc.copy_(new_lse)
    return out_acc, lse_acc


def merge_splits_torch(out, lse, extra=None, dest=None):
    """out (NB, S, H, D), lse (NB, H, S) partials over disjoint key sets -> (out (S, H, D)
    float32, lse (S, H) float32); a row with every part -inf gets out 0 and lse -inf. extra:
    more parts, one (out (S, H, D), lse (H, S)) or NE (out (NE, S, H, D), lse (NE, H, S));
    dest: (S, H, D) written (cast) with the merged output, returned as (dest, None)."""
    if extra is not None:
        eo, el = (extra[0][None], extra[1][None]) if extra[0].dim() == 3 else extra
        out = torch.cat([out.float(), eo.float()])
        lse = torch.cat([lse.float(), el.float()])
    if dest is not None:
        y, _ = merge_splits_torch(out, lse)
        dest.copy_(y)
        return dest, None
    lf = lse.float().transpose(1, 2)                       # (NB, S, H)
    m = lf.amax(0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lf - m)
    tot = w.sum(0)
    seen = tot > 0
    safe = torch.where(seen, tot, torch.ones_like(tot))
    o = torch.where((w > 0)[..., None], out.float(), torch.zeros((), device=out.device))
    y = (o * (w / safe)[..., None]).sum(0)
    z = torch.where(seen, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return y, z


def paged_decode_torch(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=None,
                       causal=False, window_size=None, q_pos=None, kv_pos=None, softcap=None):
    """Paged flash-decoding contract (see reference.paged_decode_ref), with torch ops."""
    B, Sq, Hq, D = q.shape
    page = k_cache.shape[1]
    Hkv = k_cache.shape[2]
    g = Hq // Hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.zeros(B, Sq, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        npg = (n + page - 1) // page
        idx = block_table[b, :npg].long()
        kb = k_cache[idx].reshape(npg * page, Hkv, D)[:n].float()
        vb = v_cache[idx].reshape(npg * page, Hkv, D)[:n].float()
        s = torch.einsum("qhgd,khd->hgqk", q[b].float().reshape(Sq, Hkv, g, D), kb) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if causal or window_size is not None:
            # same defaults as reference.paged_decode_ref: keys at 0..n-1, queries after them
            kp = (kv_pos[idx].reshape(-1)[:n] if kv_pos is not None
                  else torch.arange(n, device=q.device))
            qp = (q_pos[b] if q_pos is not None
                  else torch.full((Sq,), n, dtype=torch.int64, device=q.device))
            s = s.masked_fill(~visible_mask(qp.to(kp.device), kp, causal, window_size),
                              float("-inf"))
        lb = torch.logsumexp(s, dim=-1)  # (Hkv, g, Sq)
        p = torch.exp(s - torch.where(torch.isinf(lb), torch.zeros_like(lb), lb)[..., None])
        out[b] = torch.einsum("hgqk,khd->qhgd", p, vb).reshape(Sq, Hq, D).to(q.dtype)
        lse[b] = lb.reshape(Hq, Sq)
    return out, lse


def grouped_linear_torch(x, w, counts):
    """x (M, K) rows sorted by expert, w (E, N, K), counts (E,) -> (M, N): one GEMM per expert
    that has rows (the CPU path; GPUs take the one-launch Triton kernel)."""
    out = x.new_empty(x.shape[0], w.shape[1])
    a = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[a:a + n] = x[a:a + n] @ w[e].t()
        a += n
    return out
