"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's small kernels.

Opt-in (RINGSERVE_PDL=1). A decode step is hundreds of kernels of a few microseconds
(DeepSeek-V2-Lite at 8K: 375 in one graph replay, 2.43 ms of kernel time in a 2.84 ms step,
session 18): the gap between one kernel's end and the next one's start, ~1 us each, is a
seventh of the step. A kernel launched with PDL
(`launch_pdl=True`) may be scheduled while the kernel before it still runs, once every program
of that one has called `gdc_launch_dependents`; it then waits in `gdc_wait` until that kernel
has finished and its writes are visible. Each kernel here calls `pdl_enter(PDL)` first: waits,
then lets its own successor be scheduled. Nothing is read or written before the wait, so the
order of memory accesses is the stream's, as without PDL; only the launch latency is hidden.

`pdl_kw(device)`: the keyword arguments of such a launch ({"PDL": True, "launch_pdl": True}
inside a CUDA graph's capture on a Hopper or later GPU where triton supports it, else {"PDL":
False}). Off unless RINGSERVE_PDL=1 (read once per device): on one H200 (session 18) it gained
nothing measurable. DeepSeek-V2-Lite's decode at 8K alone, one machine (calls 4, 6, 8):
2.66 ms with it in the graphs, 2.58 and 2.67 ms without; with every launch PDL (call 3, another
machine) the pipelined decode slowed (2.83 -> 3.03 ms) while the one-call-a-step decode and
Qwen3-30B-A3B's gained (3.53 -> 3.36, 3.53 -> 3.30 ms). A triton without it is noticed by a
one-time probe launch (warned) and launches without it.
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from ._host import _interpreting, major_capability


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The first statement of a PDL kernel: wait for the kernel before it, then allow the one
    after it to be scheduled."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _probe_kernel(X, PDL: tl.constexpr):
    pdl_enter(PDL)
    tl.store(X, tl.load(X) + 1)


ON = {"PDL": True, "launch_pdl": True}
OFF = {"PDL": False}
_checked: dict = {}     # device -> whether PDL launches work there


def _probe(device: torch.device) -> bool:
    if os.environ.get("RINGSERVE_PDL", "0") != "1" or _interpreting() \
            or major_capability(device) < 9:
        return False
    try:
        x = torch.zeros(1, dtype=torch.int32, device=device)
        _probe_kernel[(1,)](x, **ON)
        ok = int(x.item()) == 1
    except Exception as e:  # noqa: BLE001 - a triton without gdc_* or launch_pdl
        warnings.warn(f"programmatic dependent launch unavailable ({type(e).__name__}: {e}); "
                      f"decode kernels launch without it", stacklevel=3)
        return False
    if not ok:
        warnings.warn("programmatic dependent launch probe gave a wrong result; decode kernels "
                      "launch without it", stacklevel=3)
    return ok


def pdl_kw(device: torch.device) -> dict:
    """The PDL launch keywords for a kernel on `device` (see the module docstring): only while
    a CUDA graph is being captured (the decode step's replays, where the gaps are); an eager
    launch (the sampler after a replay, prompt steps) goes without it (session 18, call 3:
    with every launch PDL, DeepSeek-V2-Lite's pipelined decode at 8K slowed from 2.83 to 3.03
    ms while its one-call-a-step decode gained; the sampler's eager launches right behind
    the graph's are the one difference between the two)."""
    if device.type != "cuda":
        return OFF
    on = _checked.get(device)
    if on is False:         # the usual case (opt-in): no per-launch query
        return OFF
    capturing = torch.cuda.is_current_stream_capturing()
    if on is None:
        if capturing:
            return OFF      # no probe inside a capture (it reads its result back)
        on = _checked[device] = _probe(device)
    return ON if on and capturing else OFF
