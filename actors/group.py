"""A group of shard workers: placement group, ranks, communicator, health, shutdown, rebuild."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ringserve.parallel.transport import DEFAULT_TIMEOUT_S, TransportSpec
from .worker import ShardWorker

STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


class GroupSetupError(RuntimeError):
    """The group could not be created (resources missing, an actor failed to start or join)."""


@dataclass
class GroupConfig:
    world_size: int
    device: str = "cpu"                      # "cpu" (gloo) or "cuda" (NCCL, one GPU per actor)
    placement_strategy: str = "STRICT_PACK"  # PACK / SPREAD to span several nodes
    num_cpus_per_worker: float = 1.0
    transport_timeout_s: float = DEFAULT_TIMEOUT_S
    placement_timeout_s: float = 60.0        # how long to wait for the cluster's resources
    worker_kwargs: dict = field(default_factory=dict)
    startup_timeout_s: float = 300.0         # actors' __init__ (imports, model load)

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world_size ({self.world_size}) must be >= 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.placement_strategy not in STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {STRATEGIES}, "
                             f"got {self.placement_strategy!r}")
        if self.num_cpus_per_worker < 0:
            raise ValueError(f"num_cpus_per_worker ({self.num_cpus_per_worker}) must be >= 0")
        for name in ("transport_timeout_s", "placement_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")


class ActorGroup:
    """N `worker_cls` actors, rank i pinned to bundle i of one placement group, joined by a
    transport (gloo on CPU, NCCL on CUDA). Needs `ray.init()` done by the caller."""

    def __init__(self, world_size: int, device: str = "cpu", worker_cls=ShardWorker,
                 placement_strategy: str = "STRICT_PACK", num_cpus_per_worker: float = 1.0,
                 worker_kwargs: Optional[dict] = None,
                 transport_timeout_s: float = DEFAULT_TIMEOUT_S,
                 placement_timeout_s: float = 60.0, startup_timeout_s: float = 300.0):
        self.config = GroupConfig(world_size, device, placement_strategy, num_cpus_per_worker,
                                  transport_timeout_s, placement_timeout_s,
                                  dict(worker_kwargs or {}), startup_timeout_s)
        self.worker_cls = worker_cls
        self.actors: List[Any] = []
        self.placement_group = None
        self._start()

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def device(self) -> str:
        return self.config.device

    def _bundles(self):
        c = self.config
        b = {"CPU": c.num_cpus_per_worker}
        if c.device == "cuda":
            b["GPU"] = 1
        return [dict(b) for _ in range(c.world_size)]

    def _start(self) -> None:
        c = self.config
        bundles = self._bundles()
        pg = placement_group(bundles, strategy=c.placement_strategy)
        if not pg.wait(timeout_seconds=c.placement_timeout_s):
            remove_placement_group(pg)
            raise GroupSetupError(
                f"placement group of {c.world_size} bundles {bundles[0]} ({c.placement_strategy}) "
                f"not ready within {c.placement_timeout_s:.0f} s; cluster has "
                f"{ray.cluster_resources()} in all, {ray.available_resources()} free")
        self.placement_group = pg
        remote_cls = ray.remote(num_cpus=c.num_cpus_per_worker,
                                num_gpus=1 if c.device == "cuda" else 0)(self.worker_cls)
        self.actors = [
            remote_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank)
            ).remote(rank, c.world_size, c.device, **c.worker_kwargs)
            for rank in range(c.world_size)]
        try:
            self._setup_transport()
        except BaseException:
            self.shutdown()
            raise

    def _setup_transport(self) -> None:
        c = self.config
        t = c.transport_timeout_s
        try:
            # actors import torch (and, in subclasses, build a model) before answering; that
            # start-up must not count against the communicator's timeout `t` (maybe seconds)
            try:
                ray.get([a.health.remote() for a in self.actors], timeout=c.startup_timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                raise GroupSetupError(f"{c.world_size} workers did not start within "
                                      f"{c.startup_timeout_s:.0f} s") from e
            if c.device == "cuda":
                uid = ray.get(self.actors[0].nccl_unique_id.remote(), timeout=t)
                spec = TransportSpec("nccl", unique_id=uid, timeout_s=t)
            else:
                host, port = ray.get(self.actors[0].comm_address.remote(t), timeout=t)
                spec = TransportSpec("gloo", host=host, port=port, timeout_s=t)
            # every rank joins at once: communicator creation blocks until all are in
            ray.get([a.setup_transport.remote(spec) for a in self.actors], timeout=t)
        except ray.exceptions.GetTimeoutError as e:
            raise GroupSetupError(f"transport setup of {c.world_size} ranks ({c.device}) did "
                                  f"not finish within {t:.0f} s") from e

    # ---- calls ----

    def call(self, method: str, *args, timeout_s: Optional[float] = None, **kwargs) -> list:
        """`method(*args, **kwargs)` on every rank at once; results in rank order."""
        if not self.actors:  # shut down, or a rebuild failed: [] would pass for "no results"
            raise GroupSetupError(f"the group has no actors (shut down, or its last start "
                                  f"failed); rebuild() it before calling {method!r}")
        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors],
                       timeout=timeout_s)

    def call_per_rank(self, method: str, args_list: Sequence[Sequence],
                      timeout_s: Optional[float] = None) -> list:
        """`method(*args_list[rank])` on each rank at once; results in rank order."""
        if not self.actors:
            raise GroupSetupError(f"the group has no actors (shut down, or its last start "
                                  f"failed); rebuild() it before calling {method!r}")
        if len(args_list) != self.world_size:
            raise ValueError(f"args_list has {len(args_list)} entries for "
                             f"{self.world_size} ranks")
        return ray.get([getattr(a, method).remote(*args)
                        for a, args in zip(self.actors, args_list)], timeout=timeout_s)

    def health(self, timeout_s: float = 30.0) -> List[dict]:
        return self.call("health", timeout_s=timeout_s)

    # ---- lifecycle ----

    def shutdown(self) -> None:
        """Close communicators (best effort), kill the actors, remove the placement group."""
        actors, self.actors = self.actors, []
        if actors:
            try:  # lets each worker free its GPU cleanly; a dead or hung one is just killed
                ray.get([a.shutdown.remote() for a in actors], timeout=10)
            except Exception:
                pass
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        if self.placement_group is not None:
            pg, self.placement_group = self.placement_group, None
            try:
                remove_placement_group(pg)
            except Exception:
                pass

    def rebuild(self) -> None:
        """Fresh actors and a fresh communicator (after a worker failed or a wait timed out)."""
        self.shutdown()
        self._start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
