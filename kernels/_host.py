"""Host-side launch arithmetic for the kernel wrappers.

A mixed serving step launches ~400 kernels from Python and is host-bound on an H200 (session 8:
the last kernel is queued when the device finishes). triton.cdiv and triton.next_power_of_2 are
constexpr functions on triton >= 3.5: called from host code each goes through argument
unwrapping (~1,100 such calls a step, a few ms). These are plain-int equivalents, and the
device queries, which the wrappers asked on every launch, are asked once per device.
"""
from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, 0 for n <= 0 (triton.next_power_of_2 on n >= 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _props(device: torch.device):
    return torch.cuda.get_device_properties(device)


def sm_count(device: torch.device) -> int:
    """The device's multiprocessor count, queried once."""
    return _props(device).multi_processor_count


def major_capability(device: torch.device) -> int:
    """The device's compute capability major number, queried once."""
    return _props(device).major
