"""Driver-side index of sequences whose sharded KV stays resident on the workers.

An entry holds a sequence's pages on the workers (`kv`, the driver's SeqKV) and the token ids whose K/V it holds, plus the
rank that owns each of those tokens. A new prompt is matched against every entry by longest
common prefix: the engine forks the entry's pages on every rank (no copy of full pages), trims
the fork to the matched prefix, and computes only the rest of the prompt.

Eviction: least recently used first, unpinned entries before pinned ones. Pinned entries (made
by `LLM.cache_document`) are evicted only when dropped or when the document-cache token budget
cannot be met otherwise (caching another document past the budget); a request that needs KV
memory evicts unpinned entries only, and fails with CapacityError if pinned ones are in the way.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch


def doc_key(token_ids: torch.Tensor) -> str:
    """A stable key for a token sequence (hash of its int32 bytes)."""
    data = token_ids.to(torch.int32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:24]


def exact_ints(xs) -> bool:
    """Every element is exactly an int (not a bool, float or int subclass): one C-speed pass
    over the types (a million-token prompt), not an isinstance call per token."""
    return set(map(type, xs)) <= {int}


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(a.numel(), b.numel())
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


@dataclass
class CachedSeq:
    key: str
    kv: Any                     # the driver's SeqKV holding the K/V (ringserve.kv_manager)
    token_ids: torch.Tensor     # (n,) int32 CPU: the tokens whose K/V are cached
    owners: torch.Tensor        # (n,) int8 CPU: the rank holding each token's K/V
    pinned: bool = False
    last_used: int = 0
    uses: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def rank_counts(self, world_size: int, upto: Optional[int] = None) -> List[int]:
        o = self.owners if upto is None else self.owners[:upto]
        return torch.bincount(o.long(), minlength=world_size).tolist()


@dataclass
class DocumentCache:
    budget_tokens: int
    _entries: Dict[str, CachedSeq] = field(default_factory=dict)
    _clock: "itertools.count" = field(default_factory=itertools.count)

    def __post_init__(self):
        if self.budget_tokens < 0:
            raise ValueError(f"document cache budget ({self.budget_tokens}) must be >= 0")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Optional[CachedSeq]:
        return self._entries.get(key)

    def entries(self) -> List[CachedSeq]:
        return list(self._entries.values())

    @property
    def total_tokens(self) -> int:
        return sum(e.num_tokens for e in self._entries.values())

    @property
    def pinned_tokens(self) -> int:
        return sum(e.num_tokens for e in self._entries.values() if e.pinned)

    def touch(self, e: CachedSeq) -> None:
        e.last_used = next(self._clock)
        e.uses += 1

    def match(self, prompt: torch.Tensor) -> Tuple[Optional[CachedSeq], int]:
        """The entry sharing the longest prefix with `prompt`, and that prefix's length."""
        best, best_n = None, 0
        for e in self._entries.values():
            n = common_prefix(e.token_ids, prompt)
            if n > best_n or (n == best_n and n > 0 and e.pinned and not best.pinned):
                best, best_n = e, n
        return best, best_n

    def add(self, e: CachedSeq) -> List[CachedSeq]:
        """Insert `e`; returns the entries it makes redundant (unpinned entries whose tokens are
        a prefix of e's, or an entry with the same key), already removed: free their KV."""
        e.last_used = next(self._clock)
        gone = []
        for old in list(self._entries.values()):
            same = old.key == e.key
            covered = (not old.pinned and old.num_tokens <= e.num_tokens
                       and common_prefix(old.token_ids, e.token_ids) == old.num_tokens)
            if same or covered:
                if same and old.pinned:
                    e.pinned = True
                gone.append(self._entries.pop(old.key))
        self._entries[e.key] = e
        return gone

    def remove(self, key: str) -> Optional[CachedSeq]:
        return self._entries.pop(key, None)

    def eviction_order(self, keep: Tuple[str, ...] = ()) -> List[CachedSeq]:
        """Unpinned entries (LRU first), then pinned ones (LRU first); `keep` never listed."""
        es = [e for e in self._entries.values() if e.key not in keep]
        return sorted(es, key=lambda e: (e.pinned, e.last_used))

    def over_budget(self, keep: Tuple[str, ...] = ()) -> List[CachedSeq]:
        """Entries to evict (in order) so the cached tokens fit the budget."""
        excess = self.total_tokens - self.budget_tokens
        out = []
        for e in self.eviction_order(keep):
            if excess <= 0:
                break
            out.append(e)
            excess -= e.num_tokens
        return out


__all__ = ["DocumentCache", "CachedSeq", "doc_key", "common_prefix"]
