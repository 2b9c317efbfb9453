"""One rank's paged KV: the tensors (`KVPool`, on the worker) and the page bookkeeping
(`PageAllocator`, on the driver: see ringserve.kv_manager).

Pools: k, v (num_layers, num_pages, page_size, Hkv, D) and kv_pos (num_pages, page_size) int32
holding the *global* position of every cached token (causal/window masks in `paged_decode` use
them, so a rank's tokens need not be contiguous: striped shards and balanced decode appends).

Pages are reference counted: a fork shares pages between sequences (a cached document and the
requests that start with it) without copying; a write into a page that another sequence also
references first copies that page (copy-on-write), so a fork never sees another's tokens.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional

import torch


class KVCacheFullError(RuntimeError):
    """Not enough free pages on this rank (the engine checks capacity before work; this is the
    rank-local safety net)."""


@dataclass
class KVCacheConfig:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    page_size: int = 16
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    # MLA: the values are the keys' first columns (the latent): one tensor, v is k
    values_are_keys: bool = False

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.num_pages < 1:
            raise ValueError(f"num_pages ({self.num_pages}) must be >= 1: not enough memory for "
                             f"even one page of {self.page_size} tokens")

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype,
                               self.values_are_keys)


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype,
                    values_are_keys: bool = False) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    kv = 1 if values_are_keys else 2
    return kv * num_layers * num_kv_heads * head_dim * elem + 4  # k (+ v) + an int32 position


def pages_for_budget(budget_bytes: int, page_size: int, per_token_bytes: int) -> int:
    """How many pages fit in `budget_bytes`."""
    return max(0, int(budget_bytes) // (page_size * per_token_bytes))


class KVPool:
    """One rank's KV tensors and nothing else: pools k, v (num_layers, num_pages, page_size,
    Hkv, D) and kv_pos (num_pages, page_size) int32 (the global position of every slot).

    Which page belongs to which sequence is decided by the driver (`PageAllocator`, one per
    rank, in `ringserve.scheduler`); a step tells the worker the slots to write and the pages
    to read, so no page count is kept on both sides."""

    def __init__(self, cfg: KVCacheConfig):
        self.cfg = cfg
        L, P, S, H, D = cfg.num_layers, cfg.num_pages, cfg.page_size, cfg.num_kv_heads, cfg.head_dim
        self.k = torch.zeros(L, P, S, H, D, dtype=cfg.dtype, device=cfg.device)
        self.v = (self.k if cfg.values_are_keys
                  else torch.zeros(L, P, S, H, D, dtype=cfg.dtype, device=cfg.device))
        self.kv_pos = torch.zeros(P, S, dtype=torch.int32, device=cfg.device)
        # per layer, k and v as flat slots (num_pages * page_size, Hkv, D): made once, since
        # a launch-bound decode step would pay two view ops per layer and tensor for them
        self._slot_views = [(self.k[i].view(-1, H, D), self.v[i].view(-1, H, D))
                            for i in range(L)]
        # per layer, k and v as (P, page, Hkv, D) views, made once (the paged kernels read a
        # layer: a select op each, twice a call, otherwise)
        self.layers = [(self.k[i], self.v[i]) for i in range(L)]

    @property
    def page_size(self) -> int:
        return self.cfg.page_size

    @property
    def num_pages(self) -> int:
        return self.cfg.num_pages

    def copy_pages(self, src: List[int], dst: List[int]) -> None:
        """Copy-on-write: page dst[i] := page src[i] (all layers, K, V and positions)."""
        if not src:
            return
        s = torch.tensor(src, dtype=torch.int64, device=self.cfg.device)
        d = torch.tensor(dst, dtype=torch.int64, device=self.cfg.device)
        self.k[:, d] = self.k[:, s]
        if self.v is not self.k:
            self.v[:, d] = self.v[:, s]
        self.kv_pos[d] = self.kv_pos[s]

    def set_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        if slots.numel():
            self.kv_pos.view(-1)[slots] = positions.to(device=self.cfg.device, dtype=torch.int32)

    def slot_views(self, layer: int):
        """The layer's k and v pools as (num_pages * page_size, Hkv, D) views: flat slots."""
        return self._slot_views[layer]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (n, Hkv, D) into flat slots (n,) int64 on the pool's device."""
        if slots.numel() == 0:
            return
        H, D = self.cfg.num_kv_heads, self.cfg.head_dim
        self.k[layer].view(-1, H, D).index_copy_(0, slots, k.reshape(-1, H, D).to(self.cfg.dtype))
        if self.v is not self.k:
            self.v[layer].view(-1, H, D).index_copy_(0, slots,
                                                     v.reshape(-1, H, D).to(self.cfg.dtype))


class PageAllocator:
    """The driver's bookkeeping of one rank's pages: the free pages and reference counts.

    Pages are shared by reference (a cached document and the requests forked from it); a write
    into a shared page goes to a private copy first (copy-on-write, done by the worker when the
    step plan lists it).

    Two ends: prompt chunks take the lowest free pages, one-token rows (decode, short
    questions) the highest, so a long prompt's pages stay one ascending run while others
    decode beside it; the worker then reads a chunk's cached prefix as a view of its pages
    instead of gathering them (`step_attention`)."""

    def __init__(self, num_pages: int, reserved: int = 0):
        self.num_pages = num_pages
        self.ref = [0] * num_pages
        # the lowest `reserved` pages are set aside for good (a captured decode step's scratch);
        # free pages in descending order: the lowest at the end
        self.free = list(range(num_pages - 1, reserved - 1, -1))
        self.usable = num_pages - reserved

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self, high: bool = False, after: Optional[int] = None) -> int:
        """The lowest free page, or with `high` the highest. With `after` (a sequence's last
        page), the page right after it when that one is free: a prompt keeps its run of pages
        even when another prompt's chunk took the pages that followed it in an earlier step."""
        if not self.free:
            raise KVCacheFullError(f"no free KV page (num_pages {self.num_pages})")
        nxt = None if after is None else after + 1
        if nxt is not None and nxt < self.num_pages and self.ref[nxt] == 0:
            # free pages are in descending order; reserved pages (ref 0 too) are never in it
            i = bisect.bisect_left(self.free, -nxt, key=lambda v: -v)
            if i < len(self.free) and self.free[i] == nxt:
                self.free.pop(i)
                self.ref[nxt] = 1
                return nxt
        p = self.free.pop(0 if high else -1)
        self.ref[p] = 1
        return p

    def share(self, pages: List[int]) -> None:
        for p in pages:
            self.ref[p] += 1

    def release(self, pages: List[int]) -> None:
        freed = []
        for p in pages:
            self.ref[p] -= 1
            if self.ref[p] == 0:
                freed.append(p)
        if len(freed) > 16:            # a sequence's worth: one sort of two sorted runs
            self.free.extend(freed)
            self.free.sort(reverse=True)
        else:
            for p in freed:
                bisect.insort(self.free, p, key=lambda v: -v)


__all__ = ["KVCacheConfig", "KVCacheFullError", "KVPool", "PageAllocator", "bytes_per_token",
           "pages_for_budget"]
