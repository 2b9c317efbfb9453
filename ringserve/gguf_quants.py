"""Dequantize llama.cpp (ggml) tensor blocks with torch, on whatever device the bytes are on.

A quantized GGUF tensor is a run of fixed-size blocks along each row; every block holds a few
float16 scales and packed integers for `block_size` consecutive values. These functions take the
blocks as a uint8 tensor of shape (n_blocks, type_size) and return float32 values of shape
(n_blocks, block_size), with the same arithmetic, in the same order, as llama.cpp's reference
(`dequantize_row_*` in ggml-quants.c; the `gguf` package's numpy version is what the tests compare
with), so the results are bit-identical to it. Running on torch lets a loader move the compact
quantized bytes to a GPU and expand them there.

Block layouts (bytes): d = float16 scale, m/dmin = float16 offset, qs = packed 4-bit pairs (low
nibbles are the first half of the block, high nibbles the second), qh = the 5th/6th bits.
  Q8_0  34: d, int8 qs[32]                       Q4_0 18: d, qs[16]        (q - 8) * d
  Q4_1  20: d, m, qs[16]       q * d + m         Q5_0 22: d, qh[4], qs[16]  (q - 16) * d
  Q5_1  24: d, m, qh[4], qs[16]                  K-quants: 256 values in 8 or 16 sub-blocks
  Q4_K 144: d, dmin, scales[12] (6-bit scale and min per 32), qs[128]
  Q5_K 176: d, dmin, scales[12], qh[32], qs[128]
  Q6_K 210: ql[128], qh[64], int8 scales[16] (one per 16), d
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

QK_K = 256  # values per K-quant super-block


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of every block, as float32 (n, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """(n, k*group) packed bytes -> (n, 2k, group): each group's low nibbles, then its high."""
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, group)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, -1, group)


def _bits(qh: torch.Tensor, nbits: int, width: int) -> torch.Tensor:
    """(n, k*width) bytes -> (n, k * (8 // nbits), width): for each run of `width` bytes, plane j
    holds bits [j*nbits, (j+1)*nbits) of every byte."""
    n = qh.shape[0]
    shifts = torch.arange(0, 8, nbits, dtype=torch.uint8, device=qh.device).reshape(1, 1, -1, 1)
    planes = (qh.reshape(n, -1, 1, width) >> shifts) & ((1 << nbits) - 1)
    return planes.reshape(n, -1, width)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32)
    return _f16(b, 0) * (q.to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return _f16(b, 0) * q + _f16(b, 2)


def _fifth_bit(qh4: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1: 4 bytes = a little-endian uint32 whose bit i is value i's 5th bit -> (n, 32)."""
    return _bits(qh4, 1, 4).transpose(1, 2).reshape(qh4.shape[0], 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    ql = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32)
    q = ql | (_fifth_bit(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.to(torch.int8) - 16).float()


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    ql = _nibbles(b[:, 8:], 16).reshape(b.shape[0], 32)
    q = (ql | (_fifth_bit(b[:, 4:8]) << 4)).float()
    return _f16(b, 0) * q + _f16(b, 2)


def _k_scale_min(scales: torch.Tensor):
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (n, 8) each. Bytes 0-3 hold
    scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for the mins;
    bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).float()  # (n, 8, 32)
    return (d * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b, 2) * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 32)          # (n, 8, 32)
    qh = _bits(b[:, 16:48], 1, 32)        # (n, 8, 32): sub-block j takes bit j of qh
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, QK_K // 16, 1)
    ql = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192], 2, 32)      # (n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, 16).float()
    return (d * q).reshape(n, QK_K)


def _plain(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda b: b.contiguous().view(dtype).float()


# GGML type name -> (values per block, bytes per block, dequantizer)
DEQUANTIZERS: Dict[str, tuple] = {
    "F32": (1, 4, _plain(torch.float32)),
    "F16": (1, 2, _plain(torch.float16)),
    "BF16": (1, 2, _plain(torch.bfloat16)),
    "Q8_0": (32, 34, _q8_0),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}


def dequantize(raw: torch.Tensor, type_name: str, shape) -> torch.Tensor:
    """The float32 tensor of `shape` (PyTorch order) stored as `raw` bytes of GGML type
    `type_name`. `raw` is a uint8 tensor of any shape; its device is where the work happens."""
    if type_name not in DEQUANTIZERS:
        raise ValueError(f"GGML tensor type {type_name} is not supported; supported: "
                         f"{', '.join(DEQUANTIZERS)}")
    block, size, fn = DEQUANTIZERS[type_name]
    numel = 1
    for s in shape:
        numel *= int(s)
    if numel % block or raw.numel() != numel // block * size:
        raise ValueError(f"{raw.numel()} bytes of {type_name} cannot hold a tensor of shape "
                         f"{tuple(shape)} ({numel} values, blocks of {block} in {size} bytes)")
    blocks = raw.reshape(-1, size)
    if blocks.dtype != torch.uint8:
        raise TypeError(f"raw GGUF bytes must be uint8, got {blocks.dtype}")
    return fn(blocks).reshape(tuple(int(s) for s in shape))
