"""Progress of long requests (a million-token prefill takes minutes).

The engine thread records each request's phase on its `RequestHandle` (queued, prefill layers,
pass-Q extension tokens, decode tokens). Inside a ring prefill, one Ray call runs every layer on
every rank, so rank 0 reports each layer it starts to a `ProgressBoard`: a plain object for
in-process groups, a zero-CPU Ray actor for actor groups (reports are fire-and-forget, and only
prefills of at least `EngineConfig.progress_min_tokens` tokens report at all).
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple


class ProgressBoard:
    """key -> (done, total). Used directly in process, or as a Ray actor."""

    def __init__(self):
        self._lock = threading.Lock()
        self._done: Dict[str, Tuple[int, int]] = {}

    def update(self, key: str, done: int, total: int) -> None:
        with self._lock:
            self._done[key] = (int(done), int(total))

    def get(self, key: str) -> Optional[Tuple[int, int]]:
        with self._lock:
            return self._done.get(key)

    def drop(self, key: str) -> None:
        with self._lock:
            self._done.pop(key, None)


class Reporter:
    """A picklable `report(done, total)` for one key of a board (shipped to the workers)."""

    def __init__(self, board, key: str):
        self.board, self.key = board, key

    def __call__(self, done: int, total: int) -> None:
        update = self.board.update
        if hasattr(update, "remote"):
            update.remote(self.key, done, total)   # a Ray actor: do not wait for it
        else:
            update(self.key, done, total)

    def read(self, timeout_s: float = 5.0) -> Optional[Tuple[int, int]]:
        get = self.board.get
        if hasattr(get, "remote"):
            import ray
            try:
                return ray.get(get.remote(self.key), timeout=timeout_s)
            except Exception:  # noqa: BLE001 - progress is best effort, never an error
                return None
        return get(self.key)

    def drop(self) -> None:
        drop = self.board.drop
        if hasattr(drop, "remote"):
            drop.remote(self.key)
        else:
            drop(self.key)


def make_board(group):
    """A board the group's workers can reach: a Ray actor for an ActorGroup, else local."""
    if hasattr(group, "actors"):  # ActorGroup: workers live in other processes
        import ray
        return ray.remote(num_cpus=0)(ProgressBoard).remote()
    return ProgressBoard()


__all__ = ["ProgressBoard", "Reporter", "make_board"]
