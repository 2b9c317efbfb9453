"""The ActorGroup interface over in-process ModelShardWorkers (one thread per rank, joined by
ringserve.parallel.transport.ThreadTransport): engine tests without Ray actor start-up."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from ringserve.actors.model_worker import ModelShardWorker
from ringserve.parallel.transport import ThreadHub


class ThreadGroup:
    """call() runs a method on every rank at once, results in rank order, the first error
    re-raised; `fail_next(method, rank)` makes that rank's next call raise (fault injection:
    the engine sees what a dead actor gives it, and rebuilds)."""

    def __init__(self, world_size, **worker_kwargs):
        self.world_size = world_size
        self._kw = worker_kwargs
        self._pool = ThreadPoolExecutor(world_size)
        self._fail = None
        self.rebuilds = 0
        self._start()

    def _start(self):
        hub = ThreadHub(self.world_size)
        self.workers = [ModelShardWorker(r, self.world_size, "cpu", **self._kw)
                        for r in range(self.world_size)]
        for r, w in enumerate(self.workers):
            w.transport = hub.transport(r, timeout_s=60)

    def fail_next(self, method: str, rank: int, after: int = 0) -> None:
        self._fail = [method, rank, after]

    def call(self, method, *args, **kwargs):
        return self.call_per_rank(method, [args] * self.world_size)

    def call_per_rank(self, method, args_list, **kwargs):
        f = self._fail
        if f is not None and f[0] == method:
            if f[2] == 0:
                # as when an actor dies mid-step: the call fails, the ranks' state is unknown
                self._fail = None
                raise RuntimeError(f"injected failure of rank {f[1]} in {method}")
            f[2] -= 1
        futs = [self._pool.submit(getattr(w, method), *a)
                for w, a in zip(self.workers, args_list)]
        return [x.result() for x in futs]

    def rebuild(self):
        self.rebuilds += 1
        self._start()

    def shutdown(self):
        self._pool.shutdown()


def submit_together(eng, requests):
    """eng.submit(*r) for each r in requests, the engine's first step held until all are
    queued (they then decode together: one batch from the start). Returns the handles; the
    group's call_per_rank stays wrapped (a pass-through once released)."""
    queued, real = threading.Event(), eng.group.call_per_rank

    def held(*args, **kw):
        assert queued.wait(60)
        return real(*args, **kw)

    eng.group.call_per_rank = held
    hs = [eng.submit(*r) for r in requests]
    queued.set()
    return hs
