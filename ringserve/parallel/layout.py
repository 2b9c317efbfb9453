"""How a sequence of S tokens is split over N ranks, and where each rank's tokens sit globally.

`ring`: contiguous shards (sizes differ by at most one). `striped`: round-robin stripes, token t
goes to rank t % N (Striped Attention, Brandon et al. 2023). Striped is chosen over zigzag chunk
pairs because a rank's global positions stay affine (offset=rank, stride=N), so every
(query shard, key shard) block is one kernel call with offset/stride positions, and causal work is
balanced to within one row per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

LAYOUTS = ("ring", "striped")
SCHEDULES = LAYOUTS   # the old name


@dataclass(frozen=True)
class Shard:
    rank: int
    world_size: int
    length: int   # number of tokens on this rank
    offset: int   # global position of its first token
    stride: int   # global distance between its consecutive tokens

    def positions(self, device=None) -> torch.Tensor:
        return self.offset + self.stride * torch.arange(self.length, device=device)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


check_schedule = check_layout   # the old name


def shard(total: int, world_size: int, rank: int, layout: str) -> Shard:
    check_layout(layout)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
    if total < 0:
        raise ValueError(f"sequence length ({total}) must be >= 0")
    if layout == "ring":
        base, extra = divmod(total, world_size)
        length = base + (1 if rank < extra else 0)
        offset = rank * base + min(rank, extra)
        return Shard(rank, world_size, length, offset, 1)
    length = max(0, (total - rank + world_size - 1) // world_size)
    return Shard(rank, world_size, length, rank, world_size)


def shards(total: int, world_size: int, layout: str) -> List[Shard]:
    return [shard(total, world_size, r, layout) for r in range(world_size)]


def split(x: torch.Tensor, world_size: int, layout: str, dim: int = 1) -> List[torch.Tensor]:
    """Split a tensor along `dim` (the sequence) into the per-rank pieces."""
    total = x.shape[dim]
    out = []
    for s in shards(total, world_size, layout):
        idx = s.positions(x.device)
        out.append(x.index_select(dim, idx))
    return out


def gather(pieces: List[torch.Tensor], layout: str, dim: int = 1) -> torch.Tensor:
    """Inverse of split."""
    n = len(pieces)
    total = sum(p.shape[dim] for p in pieces)
    shape = list(pieces[0].shape)
    shape[dim] = total
    out = pieces[0].new_empty(shape)
    for s, p in zip(shards(total, n, layout), pieces):
        out.index_copy_(dim, s.positions(p.device), p)
    return out
