"""Distributed attention from the driver: split, run the ring on an actor group, gather."""
from __future__ import annotations

from typing import Optional

import torch

from . import layout as layouts


def distributed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          world_size: Optional[int] = None, group=None,
                          layout: str = "striped", causal: bool = True,
                          window_size: Optional[int] = None,
                          softmax_scale: Optional[float] = None, backend: str = "auto",
                          return_stats: bool = False, timeout_s: Optional[float] = None,
                          schedule: Optional[str] = None):
    """Exact attention of the whole sequence, computed by ring attention over `group`.

    q (B, S, Hq, D), k/v (B, S, Hkv, D) on the driver. `group` is an `ActorGroup` (reused across
    calls); without one, a CPU group of `world_size` actors is made for this call and shut down
    (needs `ray.init()` first). Returns (out, lse) like `kernels.attention`, plus the per-rank
    step statistics when `return_stats`. `schedule` is the deprecated name of `layout`.
    """
    if schedule is not None:
        import warnings
        warnings.warn("distributed_attention(schedule=...) is deprecated: say layout=...",
                      DeprecationWarning, stacklevel=2)
        layout = schedule
    layouts.check_layout(layout)
    own_group = group is None
    if own_group:
        if world_size is None:
            raise ValueError("pass world_size or group")
        from ringserve.actors import ActorGroup  # Ray stays out of the core until needed
        group = ActorGroup(world_size, device="cpu")
    elif world_size is not None and world_size != group.world_size:
        raise ValueError(f"world_size ({world_size}) differs from the group's "
                         f"({group.world_size})")
    try:
        n = group.world_size
        total = q.shape[1]
        if k.shape[1] != total or v.shape[1] != total:
            raise ValueError(f"q, k, v sequence lengths differ: {q.shape[1]}, {k.shape[1]}, "
                             f"{v.shape[1]}")
        parts = [layouts.split(x, n, layout) for x in (q, k, v)]
        args = [(parts[0][r], parts[1][r], parts[2][r], total, layout, causal, window_size,
                 softmax_scale, backend) for r in range(n)]
        results = group.call_per_rank("ring_attention_shard", args, timeout_s=timeout_s)
    finally:
        if own_group:
            group.shutdown()
    out = layouts.gather([r[0] for r in results], layout, dim=1)
    lse = layouts.gather([r[1] for r in results], layout, dim=2)
    if return_stats:
        return out, lse, [r[2] for r in results]
    return out, lse
