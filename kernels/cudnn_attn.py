"""Optional per-block backend: cuDNN's fused attention (through torch's SDPA op) where it fits.

A ring step's block is exact attention between two affine position sets (see reference.py). For
the layouts the ring produces, every causal block is one of: fully visible, fully masked, or
SDPA's own top-left causal mask after dropping at most a few leading query rows:

    queries at a + N*i, keys at b + N*j, visible iff j <= i + floor((a - b) / N) = i + c

With c <= 0, rows i < -c see nothing and rows i >= -c see keys j <= i - (-c): top-left causal on
q[-c:] against k[:Sq + c]. Striped shards give c in {0, -1}; the contiguous ring gives c = 0 on
the diagonal and "fully visible" elsewhere. Anything else (windows, c > 0, unequal strides, a
non-square causal remainder, fp32, head dims cuDNN does not take) returns None from `sdpa_plan`
and the caller uses the Triton kernel, so the backend is always exact, never approximate.

`sdpa_plan` is plain Python (tested on CPU against the float64 mask); the cuDNN call itself needs
a CUDA build with cuDNN attention (checked on the GPU by tests/test_kernels_gpu.py and by
benchmarks/bench_ring.py --check).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch

# Whether the cuDNN op takes fewer K/V heads than query heads as is (GQA), learnt on first use.
_NATIVE_GQA: Optional[bool] = None
_BROKEN: Optional[str] = None  # the cuDNN op failed once here: reason (then Triton from now on)


def sdpa_plan(Sq: int, Sk: int, causal: bool, window_size: Optional[int], q_offset: int,
              q_stride: int, k_offset: int, k_stride: int) -> Optional[Tuple[str, int, int]]:
    """How the block maps onto SDPA's masks: ("empty", 0, 0), ("full", 0, Sk) or
    ("causal", q0, k1): rows q[q0:] against keys k[:k1] with the top-left causal mask, where
    Sq - q0 == k1 (square); rows before q0 see no key. None: not expressible, use Triton."""
    if Sq == 0 or Sk == 0:
        return ("empty", 0, 0)
    if window_size is not None:
        return None
    if not causal:
        return ("full", 0, Sk)
    q_lo, q_hi = q_offset, q_offset + (Sq - 1) * q_stride
    k_lo, k_hi = k_offset, k_offset + (Sk - 1) * k_stride
    if k_hi <= q_lo:
        return ("full", 0, Sk)
    if k_lo > q_hi:
        return ("empty", 0, 0)
    if q_stride != k_stride:
        return None
    c = (q_offset - k_offset) // q_stride  # floor
    if c > 0:
        return None
    q0 = -c
    k1 = Sq - q0
    if k1 <= 0:
        return ("empty", 0, 0)
    if k1 > Sk:
        return None  # rows past the last key would see all keys: not a square causal block
    return ("causal", q0, k1)


def usable(q: torch.Tensor) -> bool:
    """cuDNN attention applies to this query tensor at all (device, dtype, head dim)."""
    return (_BROKEN is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def _call(q, k, v, scale: float, is_causal: bool):
    """(B, S, H, D) views in, (out (B, Sq, Hq, D), lse (B, Hq, Sq) fp32) out."""
    global _NATIVE_GQA
    hq, hkv = q.shape[2], k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))

    def run(kk, vv):
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qh, kk, vv, None, True, 0.0, is_causal, False, scale=scale)
        return r[0], r[1]

    if hq != hkv and _NATIVE_GQA is not False:
        try:
            o, lse = run(kh, vh)
            _NATIVE_GQA = True
        except RuntimeError:
            _NATIVE_GQA = False
    if hq == hkv or _NATIVE_GQA is False:
        if hq != hkv:
            g = hq // hkv
            kh, vh = (x.repeat_interleave(g, dim=1) for x in (kh, vh))
        o, lse = run(kh, vh)
    lse = lse.reshape(lse.shape[0], hq, -1).float()
    return o.transpose(1, 2).contiguous(), lse


def attention_cudnn(q, k, v, softmax_scale=None, causal=False, window_size=None,
                    q_offset=0, q_stride=1, k_offset=0, k_stride=1, fallback=None):
    """Same contract as the Triton forward; blocks cuDNN cannot express go to `fallback`."""
    global _BROKEN
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    plan = sdpa_plan(Sq, Sk, causal, window_size, q_offset, q_stride, k_offset, k_stride)
    if plan is None or not usable(q):
        return fallback(q, k, v, softmax_scale, causal, window_size,
                        q_offset, q_stride, k_offset, k_stride)
    mode, q0, k1 = plan
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if mode == "empty":
        return (torch.zeros_like(q),
                torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device))
    try:
        if mode == "full":
            return _call(q, k, v, scale, False)
        o, lse = _call(q[:, q0:], k[:, :k1], v[:, :k1], scale, True)
    except RuntimeError as e:  # e.g. a torch build without cuDNN attention: Triton from now on
        _BROKEN = f"{type(e).__name__}: {e}"[:300]
        warnings.warn(f"cuDNN attention unavailable, using the Triton kernel: {_BROKEN}",
                      stacklevel=2)
        return fallback(q, k, v, softmax_scale, causal, window_size,
                        q_offset, q_stride, k_offset, k_stride)
    if q0 == 0:
        return o, lse
    out = torch.zeros_like(q)
    out[:, q0:] = o
    lse_full = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    lse_full[:, :, q0:] = lse
    return out, lse_full
