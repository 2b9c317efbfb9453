"""The group interface over one worker in this process: `LLM(in_process=True)`.

At world size 1 (one shard, no tensor parallelism) there is no ring to join and no peer to
reach, and the Ray actor only carries each step across a process boundary: two Ray tasks a
pipelined decode step (launch, finish), their serialisation and the actor's task loop. Here
the engine's thread calls the worker's methods directly, as vLLM's single-process executor
does. Ray is not needed at all (no cluster, no placement group).

What is given up: isolation. A worker that fails in a call raises in the engine's thread; the
engine then `rebuild()`s it, which here means building a fresh worker in this process (the old
one's memory is freed first). A fault that leaves the process itself broken (a CUDA error that
poisons the context) is not recoverable in place: the rebuild fails and the engine fails the
requests with that error, where a Ray actor would be replaced. `step_timeout_s` cannot be
enforced on a call in the engine's own thread, so LLM refuses it with in-process workers.
"""
from __future__ import annotations

import gc
from typing import Any, List, Optional, Sequence

from .errors import GroupSetupError


class LocalGroup:
    """`worker_cls(0, 1, device, **worker_kwargs)` in this process, with ActorGroup's calls:
    `call`, `call_actors`, `call_per_rank`, `execute_step`, `health`, `rebuild`, `shutdown`.
    It has no `submit_per_rank`: the engine then runs each call in its own thread (a pipelined
    step's launch returns at once; its finish waits for the device)."""

    world_size = 1
    tp_size = 1
    step_channel = "direct"   # Engine.stats()' name for how steps reach the worker

    def __init__(self, device: str = "cpu", worker_cls=None,
                 worker_kwargs: Optional[dict] = None):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if worker_cls is None:
            from .model_worker import ModelShardWorker
            worker_cls = ModelShardWorker
        self.device = device
        self.worker_cls = worker_cls
        self.worker_kwargs = dict(worker_kwargs or {})
        self.worker: Optional[Any] = None
        self.rebuilds = 0
        self._start()

    def _start(self) -> None:
        self.worker = self.worker_cls(0, 1, self.device, **self.worker_kwargs)

    @property
    def actors(self) -> List[Any]:
        """The worker, as ActorGroup lists its actors ([] once shut down)."""
        return [] if self.worker is None else [self.worker]

    def _need(self, method: str):
        if self.worker is None:
            raise GroupSetupError(f"the in-process worker is shut down (or its last start "
                                  f"failed); rebuild() it before calling {method!r}")
        return getattr(self.worker, method)

    # ---- calls (timeout_s is accepted for the interface; a call in this thread runs to its end)

    def call(self, method: str, *args, timeout_s: Optional[float] = None, **kwargs) -> list:
        return [self._need(method)(*args, **kwargs)]

    def call_actors(self, method: str, *args, timeout_s: Optional[float] = None,
                    **kwargs) -> list:
        return self.call(method, *args, **kwargs)

    def call_per_rank(self, method: str, args_list: Sequence[Sequence],
                      timeout_s: Optional[float] = None) -> list:
        if len(args_list) != 1:
            raise ValueError(f"args_list has {len(args_list)} entries for 1 rank")
        return [self._need(method)(*args_list[0])]

    @property
    def has_step_channel(self) -> bool:
        return False   # no Ray: each step is a call already

    def execute_step(self, plans: Sequence[Any], timeout_s: Optional[float] = None) -> list:
        return self.call_per_rank("execute", [(p,) for p in plans])

    def health(self, timeout_s: float = 30.0) -> List[dict]:
        return self.call("health")

    # ---- lifecycle

    def shutdown(self, actors_alive: bool = True) -> None:
        w, self.worker = self.worker, None
        if w is None:
            return
        try:
            w.shutdown()
        except Exception:  # noqa: BLE001 - best effort: a failed worker is dropped anyway
            pass
        del w
        gc.collect()   # its model, KV pool and graphs: freed before a rebuild allocates again

    def rebuild(self) -> None:
        """A fresh worker in this process (after a call failed)."""
        self.rebuilds += 1
        self.shutdown(actors_alive=False)
        self._start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
