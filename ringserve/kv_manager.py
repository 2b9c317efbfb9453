"""The driver's view of every sequence's KV: which rank holds each token, in which pages.

This is the one owner of the pages (`PageAllocator` per rank). Workers hold only the tensors
(`KVPool`); a step plan tells them the slots to write and the pages to read.

A sequence's tokens sit at global positions 0..n-1; token i's K/V live on rank owners[i]. On a
rank the sequence's tokens are stored in position order, so "the first c tokens on rank r" is a
prefix of its page list: forking the first m tokens of a cached document shares whole pages
(`fork`), and a later append into a shared, partly filled page copies it first (copy-on-write,
listed in the step plan).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np

from .kv_cache import KVCacheFullError, PageAllocator


def pages_for(n: int, page_size: int) -> int:
    return -(-n // page_size)


def fewest_owner(counts: Sequence[int]) -> int:
    """The balancing rule of pass-Q tokens: the rank holding the fewest tokens (lowest first)."""
    return min(range(len(counts)), key=lambda r: (counts[r], r))


def owner_counts(owners, world_size: int) -> List[int]:
    """How many of `owners` (a list or an int array of ranks) each rank is."""
    if isinstance(owners, np.ndarray):
        return np.bincount(owners, minlength=world_size).tolist()[:world_size]
    return [owners.count(r) for r in range(world_size)]


def balanced_counts(counts: Sequence[int], n: int) -> List[int]:
    """Per-rank token counts after n more tokens given one by one by `fewest_owner`."""
    c = list(counts)
    while n > 0:
        lo = min(c)
        idx = [i for i, x in enumerate(c) if x == lo]
        higher = [x for x in c if x > lo]
        room = (min(higher) - lo) * len(idx) if higher else None
        if room is not None and room <= n:
            for i in idx:
                c[i] += room // len(idx)
            n -= room
            continue
        q, r = divmod(n, len(idx))
        for j, i in enumerate(idx):
            c[i] += q + (1 if j < r else 0)
        break
    return c


_keys = itertools.count(1)


@dataclass(eq=False)
class SeqKV:
    """One sequence's cached tokens over the group.

    `key` names its page table on the workers, which keep a copy of each running sequence's
    table and receive only what changed (`synced[r]`: how many leading pages rank r has as they
    are now); the driver's lists stay the truth."""
    world_size: int
    tokens: List[int] = field(default_factory=list)     # ids, position = index
    owners: List[int] = field(default_factory=list)     # rank holding each token's K/V
    pages: List[List[int]] = field(default_factory=list)
    counts: List[int] = field(default_factory=list)     # tokens per rank
    key: int = 0
    synced: List[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.pages:
            self.pages = [[] for _ in range(self.world_size)]
            self.counts = [0] * self.world_size
        self.key = next(_keys)
        self.synced = [0] * self.world_size

    def table_delta(self, rank: int) -> Tuple[int, List[int]]:
        """(first index, pages from there) that rank lacks; marks them sent."""
        a = self.synced[rank]
        pages = self.pages[rank]
        self.synced[rank] = len(pages)
        return a, pages[a:]

    def __len__(self) -> int:
        return len(self.tokens)


class KVManager:
    def __init__(self, num_pages: Sequence[int], page_size: int, reserved: int = 0):
        self.page_size = page_size
        self.world_size = len(num_pages)
        self.ranks = [PageAllocator(n, reserved) for n in num_pages]
        self.dropped: List[int] = []     # keys of freed sequences the workers may still hold

    def take_dropped(self) -> List[int]:
        out, self.dropped = self.dropped, []
        return out

    # ---- sizes ----
    @property
    def capacity_tokens(self) -> int:
        return sum(a.usable for a in self.ranks) * self.page_size

    def free_pages(self) -> List[int]:
        return [a.num_free for a in self.ranks]

    def usable_pages(self) -> List[int]:
        return [a.usable for a in self.ranks]

    # ---- sequences ----
    def new(self) -> SeqKV:
        return SeqKV(self.world_size)

    def fork(self, src: SeqKV, m: int) -> SeqKV:
        """A new sequence holding src's first m tokens, sharing their pages."""
        owners = src.owners[:m]
        counts = owner_counts(owners, self.world_size)
        pages = []
        for r, c in enumerate(counts):
            p = src.pages[r][:pages_for(c, self.page_size)]
            self.ranks[r].share(p)
            pages.append(list(p))
        return SeqKV(self.world_size, list(src.tokens[:m]), list(owners), pages, counts)

    def need(self, seq: SeqKV, new_counts: Sequence[int]) -> List[int]:
        """Free pages each rank must find to append new_counts[r] tokens (copy-on-write too)."""
        out = []
        for r, n in enumerate(new_counts):
            c, pages = seq.counts[r], seq.pages[r]
            k = pages_for(c + n, self.page_size) - len(pages)
            if n and c % self.page_size and self.ranks[r].ref[pages[-1]] > 1:
                k += 1
            out.append(max(0, k))
        return out

    def fits(self, need: Sequence[int]) -> bool:
        return all(n <= a.num_free for n, a in zip(need, self.ranks))

    def append(self, seq: SeqKV, tokens: Sequence[int], owners: Sequence[int],
               high: bool = False) -> Tuple[List[List[int]], List[List[Tuple[int, int]]]]:
        """Give the tokens (at positions len(seq)..) slots on their owners. Returns per rank the
        flat slots of that rank's new tokens (in order) and the page copies to do first. New
        pages come from the low end of each rank's free pages (prompt chunks: one ascending
        run), or with `high` from the high end (one-token rows). `owners` (and `tokens`) as
        int arrays (a ring chunk): the slots are int64 arrays too, else lists."""
        arrays = isinstance(owners, np.ndarray)   # a ring chunk: int arrays, no Python per token
        new = owner_counts(owners, self.world_size)
        need = self.need(seq, new)
        if not self.fits(need):
            raise KVCacheFullError(f"{need} pages needed, {self.free_pages()} free")
        slots: List = [np.empty(0, dtype=np.int64) if arrays else []
                       for _ in range(self.world_size)]
        copies: List[List[Tuple[int, int]]] = [[] for _ in range(self.world_size)]
        P = self.page_size
        for r in range(self.world_size):
            if not new[r]:
                continue
            a, pages, c = self.ranks[r], seq.pages[r], seq.counts[r]
            if c % P and a.ref[pages[-1]] > 1:
                fresh = a.take(high=True)   # a fork's private last page, off the low run
                copies[r].append((pages[-1], fresh))
                a.release([pages[-1]])
                pages[-1] = fresh
                seq.synced[r] = min(seq.synced[r], len(pages) - 1)
            while len(pages) < pages_for(c + new[r], P):
                # a prompt's next page continues its run when it can (one view, no gather)
                pages.append(a.take(high, after=pages[-1] if pages and not high else None))
            if arrays:    # only the pages the new tokens land in, not the whole table
                i = np.arange(c, c + new[r], dtype=np.int64)
                slots[r] = (np.asarray(pages[c // P:], dtype=np.int64)[i // P - c // P] * P
                            + i % P)
            else:
                slots[r] = [pages[i // P] * P + i % P for i in range(c, c + new[r])]
            seq.counts[r] += new[r]
        if arrays:
            seq.tokens.extend(np.asarray(tokens).tolist())
            seq.owners.extend(owners.tolist())
        else:
            seq.tokens.extend(int(t) for t in tokens)
            seq.owners.extend(int(o) for o in owners)
        return slots, copies

    def free(self, seq: SeqKV) -> None:
        if any(seq.synced):
            self.dropped.append(seq.key)
        seq.synced = [0] * self.world_size
        for r, pages in enumerate(seq.pages):
            self.ranks[r].release(pages)
        seq.pages = [[] for _ in range(self.world_size)]
        seq.counts = [0] * self.world_size
        seq.tokens, seq.owners = [], []

    def reset(self) -> None:
        """Every page free (the workers were rebuilt with empty pools)."""
        reserved = self.ranks[0].num_pages - self.ranks[0].usable
        self.ranks = [PageAllocator(a.num_pages, reserved) for a in self.ranks]
        self.dropped = []

    def pages_of(self, seqs: Sequence[SeqKV]) -> List[int]:
        """Pages per rank held by these sequences, shared pages counted once."""
        out = []
        for r in range(self.world_size):
            s = set()
            for q in seqs:
                s.update(q.pages[r])
            out.append(len(s))
        return out



__all__ = ["KVManager", "SeqKV", "pages_for", "fewest_owner", "balanced_counts"]
