"""One rank's paged KV cache: page pools, a page allocator, per-sequence block tables.

Pools: k, v (num_layers, num_pages, page_size, Hkv, D) and kv_pos (num_pages, page_size) int32
holding the *global* position of every cached token (causal/window masks in `paged_decode` use
them, so a rank's tokens need not be contiguous: striped shards and balanced decode appends).

Within one sequence positions only grow (prefill writes the shard in order, extensions append
later positions), so "drop every token at position >= p" is a suffix trim.

Pages are reference counted: `fork` shares pages between sequences (a cached document and the
requests that start with it) without copying; a write into a page that another sequence also
references first copies that page (copy-on-write), so a fork never sees another's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

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

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.num_pages < 1:
            raise ValueError(f"num_pages ({self.num_pages}) must be >= 1: not enough memory for "
                             f"even one page of {self.page_size} tokens")

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * num_kv_heads * head_dim * elem + 4  # k + v + an int32 position


def pages_for_budget(budget_bytes: int, page_size: int, per_token_bytes: int) -> int:
    """How many pages fit in `budget_bytes`."""
    return max(0, int(budget_bytes) // (page_size * per_token_bytes))


@dataclass
class _Seq:
    pages: List[int] = field(default_factory=list)
    length: int = 0


class PagedKVCache:
    def __init__(self, cfg: KVCacheConfig):
        self.cfg = cfg
        L, P, S, H, D = cfg.num_layers, cfg.num_pages, cfg.page_size, cfg.num_kv_heads, cfg.head_dim
        self.k = torch.zeros(L, P, S, H, D, dtype=cfg.dtype, device=cfg.device)
        self.v = torch.zeros(L, P, S, H, D, dtype=cfg.dtype, device=cfg.device)
        self.kv_pos = torch.zeros(P, S, dtype=torch.int32, device=cfg.device)
        self._ref = [0] * P
        self._free = list(range(P - 1, -1, -1))  # a stack: low page ids first
        self._seqs: Dict[str, _Seq] = {}
        self._tables: Dict[str, torch.Tensor] = {}  # device block tables, rebuilt on change
        self._scratch: Optional[int] = None  # a page set aside by reserve_scratch_page()

    # ---- sizes ----
    @property
    def page_size(self) -> int:
        return self.cfg.page_size

    @property
    def num_pages(self) -> int:
        return self.cfg.num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return (self.cfg.num_pages - (self._scratch is not None)) * self.cfg.page_size

    def reserve_scratch_page(self) -> int:
        """Set one page aside for good, outside every sequence, and return its first slot.
        A captured decode step writes its token's K/V on every rank; the ranks that do not own
        the token write them here (never read: no block table holds this page)."""
        if self._scratch is None:
            self._scratch = self._take_page()
        return self._scratch * self.cfg.page_size

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.cfg.page_size)

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def seq_len(self, seq_id: str) -> int:
        s = self._seqs.get(seq_id)
        return s.length if s else 0

    def seq_ids(self) -> List[str]:
        return list(self._seqs)

    def stats(self) -> dict:
        return {"num_pages": self.num_pages, "free_pages": self.num_free_pages,
                "page_size": self.page_size, "sequences": len(self._seqs),
                "used_tokens": (self.num_pages - self.num_free_pages) * self.page_size}

    # ---- allocation ----
    def _take_page(self) -> int:
        if not self._free:
            raise KVCacheFullError(f"no free KV page (num_pages {self.num_pages})")
        p = self._free.pop()
        self._ref[p] = 1
        return p

    def _release(self, p: int) -> None:
        self._ref[p] -= 1
        if self._ref[p] == 0:
            self._free.append(p)

    def _cow(self, seq: _Seq, i: int) -> None:
        """Give `seq` a private copy of its i-th page."""
        old = seq.pages[i]
        new = self._take_page()
        self.k[:, new].copy_(self.k[:, old])
        self.v[:, new].copy_(self.v[:, old])
        self.kv_pos[new].copy_(self.kv_pos[old])
        self._release(old)
        seq.pages[i] = new

    def pages_needed(self, seq_id: str, n: int) -> int:
        """Free pages an append of n tokens to seq_id would take (copy-on-write included)."""
        s = self._seqs.get(seq_id, _Seq())
        need = self.pages_for(s.length + n) - len(s.pages)
        if n > 0 and s.length % self.page_size and self._ref[s.pages[-1]] > 1:
            need += 1
        return need

    def append_slots(self, seq_id: str, positions: torch.Tensor) -> torch.Tensor:
        """Reserve slots for len(positions) new tokens at the end of seq_id (created if new),
        record their global positions, and return the flat slot indices (n,) int64 on the cache
        device, to be filled layer by layer with `write`."""
        n = int(positions.numel())
        need = self.pages_needed(seq_id, n)
        if need > self.num_free_pages:
            raise KVCacheFullError(f"sequence {seq_id!r} needs {need} more KV pages for {n} "
                                   f"tokens, {self.num_free_pages} free")
        s = self._seqs.setdefault(seq_id, _Seq())
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.cfg.device)
        page = self.cfg.page_size
        changed = False  # the device block table is rebuilt only when the page list changes
        if s.length % page and self._ref[s.pages[-1]] > 1:
            self._cow(s, len(s.pages) - 1)
            changed = True
        while len(s.pages) < self.pages_for(s.length + n):
            s.pages.append(self._take_page())
            changed = True
        first = s.length // page  # only the pages this append touches go to the device
        idx = torch.arange(s.length, s.length + n, device=self.cfg.device)
        pages = torch.tensor(s.pages[first:], dtype=torch.int64, device=self.cfg.device)
        slots = pages[idx // page - first] * page + idx % page
        self.kv_pos.view(-1)[slots] = positions.to(device=self.cfg.device, dtype=torch.int32)
        s.length += n
        if changed:
            self._tables.pop(seq_id, None)
        return slots

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (n, Hkv, D) into the slots returned by append_slots."""
        if slots.numel() == 0:
            return
        H, D = self.cfg.num_kv_heads, self.cfg.head_dim
        self.k[layer].view(-1, H, D).index_copy_(0, slots, k.reshape(-1, H, D).to(self.cfg.dtype))
        self.v[layer].view(-1, H, D).index_copy_(0, slots, v.reshape(-1, H, D).to(self.cfg.dtype))

    # ---- views for the decode kernel ----
    def block_table(self, seq_id: str) -> torch.Tensor:
        """(1, max(1, num_pages_of_seq)) int32 on the cache device."""
        t = self._tables.get(seq_id)
        if t is None:
            pages = self._seqs[seq_id].pages if seq_id in self._seqs else []
            t = torch.tensor([pages or [0]], dtype=torch.int32, device=self.cfg.device)
            self._tables[seq_id] = t
        return t

    def seq_lens(self, seq_id: str) -> torch.Tensor:
        return torch.tensor([self.seq_len(seq_id)], dtype=torch.int32, device=self.cfg.device)

    def positions(self, seq_id: str) -> torch.Tensor:
        """Global positions of seq_id's cached tokens, in cache order (increasing)."""
        s = self._seqs.get(seq_id)
        if not s or not s.length:
            return torch.empty(0, dtype=torch.int32, device=self.cfg.device)
        pages = torch.tensor(s.pages, dtype=torch.int64, device=self.cfg.device)
        return self.kv_pos[pages].reshape(-1)[:s.length]

    def gather(self, layer: int, seq_id: str):
        """(k, v) of seq_id at `layer` as contiguous (n, Hkv, D) tensors (tests, debugging)."""
        s = self._seqs[seq_id]
        pages = torch.tensor(s.pages, dtype=torch.int64, device=self.cfg.device)
        H, D = self.cfg.num_kv_heads, self.cfg.head_dim
        k = self.k[layer, pages].reshape(-1, H, D)[:s.length]
        v = self.v[layer, pages].reshape(-1, H, D)[:s.length]
        return k, v

    # ---- sequence lifetime ----
    def fork(self, src: str, dst: str, max_position: Optional[int] = None) -> int:
        """dst := src's tokens at positions < max_position (all when None), sharing pages.
        Returns dst's length on this rank."""
        if dst in self._seqs:
            raise ValueError(f"sequence {dst!r} already exists")
        s = self._seqs.get(src, _Seq())
        n = s.length if max_position is None else self.count_below(src, max_position)
        pages = s.pages[:self.pages_for(n)]
        for p in pages:
            self._ref[p] += 1
        self._seqs[dst] = _Seq(list(pages), n)
        return n

    def count_below(self, seq_id: str, max_position: int) -> int:
        pos = self.positions(seq_id)
        return int((pos < max_position).sum()) if pos.numel() else 0

    def trim(self, seq_id: str, max_position: int) -> int:
        """Drop seq_id's tokens at positions >= max_position; returns the new length."""
        s = self._seqs.get(seq_id)
        if s is None:
            return 0
        n = self.count_below(seq_id, max_position)
        keep = self.pages_for(n)
        for p in s.pages[keep:]:
            self._release(p)
        del s.pages[keep:]
        s.length = n
        self._tables.pop(seq_id, None)
        return n

    def free(self, seq_id: str) -> None:
        s = self._seqs.pop(seq_id, None)
        self._tables.pop(seq_id, None)
        if s:
            for p in s.pages:
                self._release(p)

    def clear(self) -> None:
        for sid in list(self._seqs):
            self.free(sid)




# ---- the split used by the continuous-batching engine: pages owned by the driver ----

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
        self.v = torch.zeros(L, P, S, H, D, dtype=cfg.dtype, device=cfg.device)
        self.kv_pos = torch.zeros(P, S, dtype=torch.int32, device=cfg.device)

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
        self.v[:, d] = self.v[:, s]
        self.kv_pos[d] = self.kv_pos[s]

    def set_positions(self, slots: torch.Tensor, positions: torch.Tensor) -> None:
        if slots.numel():
            self.kv_pos.view(-1)[slots] = positions.to(device=self.cfg.device, dtype=torch.int32)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (n, Hkv, D) into flat slots (n,) int64 on the pool's device."""
        if slots.numel() == 0:
            return
        H, D = self.cfg.num_kv_heads, self.cfg.head_dim
        self.k[layer].view(-1, H, D).index_copy_(0, slots, k.reshape(-1, H, D).to(self.cfg.dtype))
        self.v[layer].view(-1, H, D).index_copy_(0, slots, v.reshape(-1, H, D).to(self.cfg.dtype))


class PageAllocator:
    """The driver's bookkeeping of one rank's pages: a free stack and reference counts.

    Pages are shared by reference (a cached document and the requests forked from it); a write
    into a shared page goes to a private copy first (copy-on-write, done by the worker when the
    step plan lists it)."""

    def __init__(self, num_pages: int, reserved: int = 0):
        self.num_pages = num_pages
        self.ref = [0] * num_pages
        # the lowest `reserved` pages are set aside for good (a captured decode step's scratch)
        self.free = list(range(num_pages - 1, reserved - 1, -1))
        self.usable = num_pages - reserved

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self) -> int:
        if not self.free:
            raise KVCacheFullError(f"no free KV page (num_pages {self.num_pages})")
        p = self.free.pop()
        self.ref[p] = 1
        return p

    def share(self, pages: List[int]) -> None:
        for p in pages:
            self.ref[p] += 1

    def release(self, pages: List[int]) -> None:
        for p in pages:
            self.ref[p] -= 1
            if self.ref[p] == 0:
                self.free.append(p)


__all__ = ["KVCacheConfig", "PagedKVCache", "KVCacheFullError", "KVPool", "PageAllocator",
           "bytes_per_token", "pages_for_budget"]
