"""Rotary position embeddings at global positions (HF's rotate-half layout).

Angles are formed in float64: at positions near a million a float32 product `pos * inv_freq`
loses ~0.06 rad of phase, which long-context serving cannot afford. cos/sin are then float32 and
the rotation itself runs in float32 before casting back, so the result does not depend on how the
sequence is split into shards or chunks.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int,
                    long: bool = False) -> Tuple[torch.Tensor, float]:
    """(head_dim // 2,) float64 inverse frequencies and the cos/sin scale (yarn's attention factor).

    `long` picks longrope's long factors (the short ones otherwise); other types ignore it.
    """
    dim = head_dim
    inv = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scale = 1.0
    if rope.rope_type == "longrope":
        # LongRoPE (arXiv 2402.13753): a searched divisor per frequency; cos/sin scaled by
        # sqrt(1 + ln(factor) / ln(original length)) unless attention_factor is given
        factors = rope.long_factor if long else rope.short_factor
        if len(factors) != dim // 2:
            raise ValueError(f"longrope {'long' if long else 'short'}_factor has {len(factors)} "
                             f"entries, head_dim {dim} needs {dim // 2}")
        inv = inv / torch.tensor(factors, dtype=torch.float64)
        if rope.attention_factor is not None:
            scale = rope.attention_factor
        elif rope.factor > 1:
            scale = math.sqrt(1 + math.log(rope.factor)
                              / math.log(rope.original_max_position_embeddings))
    elif rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the band in
        # between interpolated linearly in 1/wavelength.
        old = rope.original_max_position_embeddings
        low_wl, high_wl = old / rope.low_freq_factor, old / rope.high_freq_factor
        wl = 2 * math.pi / inv
        smooth = (old / wl - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        mid = (1 - smooth) * inv / rope.factor + smooth * inv
        inv = torch.where(wl > low_wl, inv / rope.factor, torch.where(wl < high_wl, inv, mid))
    elif rope.rope_type == "yarn":
        # YaRN (arXiv 2309.00071): interpolate dims that rotate fewer than beta_slow times over
        # the original context, extrapolate those that rotate more than beta_fast times, ramp
        # between; cos/sin scaled by 0.1 ln(factor) + 1 unless attention_factor is given.
        old = rope.original_max_position_embeddings

        def dim_for(rotations: float) -> float:
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

        lo, hi = dim_for(rope.beta_fast), dim_for(rope.beta_slow)
        if rope.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001  # a zero-width ramp would divide by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv = (inv / rope.factor) * (1 - extrapolate) + inv * extrapolate
        def mscale(m: float) -> float:
            return 1.0 if rope.factor <= 1 else 0.1 * m * math.log(rope.factor) + 1.0

        if rope.attention_factor is not None:
            scale = rope.attention_factor
        elif rope.mscale and rope.mscale_all_dim:   # DeepSeek
            scale = mscale(rope.mscale) / mscale(rope.mscale_all_dim)
        else:
            scale = mscale(1.0)
    return inv, scale


class Rotary:
    """Applies RoPE to (T, H, D) tensors at given global positions.

    longrope keeps two frequency sets and, as transformers does, uses the long one when the
    sequence is longer than the original context. `seq_len` says how long: an int for every
    token of the call, or (T,) per token (a flat batch of several sequences; a shard of a
    sequence-parallel prefill, where every shard must choose alike). None: the highest position
    in the call plus one, right for one sequence's decode or extension.
    """

    def __init__(self, rope: RopeConfig, head_dim: int):
        inv, scale = inv_frequencies(rope, head_dim)
        self.inv_freq = inv   # float64, CPU
        self._inv_on = {}     # device -> its copy (no host copy per call: CUDA-graph safe)
        self.scale = scale
        self.head_dim = head_dim
        self.long_after = None
        if rope.rope_type == "longrope":
            self.long_after = rope.original_max_position_embeddings
            self.long_inv_freq = inv_frequencies(rope, head_dim, long=True)[0]

    def _inv(self, positions: torch.Tensor, seq_len) -> torch.Tensor:
        """(D/2,) float64 inverse frequencies for the call, or (T, D/2) when they vary by token."""
        dev = positions.device
        inv = self._inv_on.get(dev)
        if inv is None:
            inv = self._inv_on[dev] = self.inv_freq.to(dev)
        if self.long_after is None or positions.numel() == 0:
            return inv
        long = self._inv_on.get(("long", dev))
        if long is None:
            long = self._inv_on[("long", dev)] = self.long_inv_freq.to(dev)
        if isinstance(seq_len, int):
            return long if seq_len > self.long_after else inv
        if seq_len is None:
            # a device-side choice: no host sync, so decode stays capturable in a CUDA graph
            return torch.where(positions.max() + 1 > self.long_after, long, inv)
        if seq_len.shape != positions.shape:
            raise ValueError(f"seq_len {tuple(seq_len.shape)} must match positions "
                             f"{tuple(positions.shape)}")
        return torch.where((seq_len.to(dev) > self.long_after)[:, None], long, inv)

    def cos_sin(self, positions: torch.Tensor,
                seq_len=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) int64 -> cos, sin (T, 1, D/2) float32 (half width: both halves of the
        rotate-half layout share them, which halves their memory on million-token shards)."""
        inv = self._inv(positions, seq_len)
        T = positions.shape[0]
        cos = torch.empty(T, 1, self.head_dim // 2, dtype=torch.float32, device=positions.device)
        sin = torch.empty_like(cos)
        step = 1 << 16  # bounds the float64 temporaries
        for a in range(0, T, step):
            inv_t = inv if inv.dim() == 1 else inv[a:a + step]
            ang = positions[a:a + step].to(torch.float64)[:, None] * inv_t  # (t, D/2)
            c, s = torch.cos(ang), torch.sin(ang)
            if self.scale != 1.0:   # two kernels a step fewer for the usual unscaled RoPE
                c, s = c * self.scale, s * self.scale
            cos[a:a + step, 0] = c
            sin[a:a + step, 0] = s
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (T, H, D) -> rotated, same dtype; math in float32. Pairs dim i with i + D/2."""
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    @staticmethod
    def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """As `apply`, pairing dims 2i and 2i + 1 (DeepSeek's complex-number layout)."""
        xf = x.float().unflatten(-1, (-1, 2))
        x1, x2 = xf[..., 0], xf[..., 1]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).to(
            x.dtype)
