"""A group of shard workers: placement group, ranks, communicator, health, shutdown, rebuild."""
from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ringserve.parallel.tp import TPGrid
from ringserve.parallel.transport import DEFAULT_TIMEOUT_S, TransportSpec, check_comm_host
from .errors import GroupSetupError
from .worker import ShardWorker

STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


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
    tp_size: int = 1                         # GPUs per shard (tensor parallel), one node each
    # gloo: the address rank 0's rendezvous store listens on and the others dial. None: loopback
    # when every actor runs on rank 0's Ray node, else the node address Ray reports for it
    # (`ray start --node-ip-address`); an address of rank 0's node when neither fits
    comm_host: Optional[str] = None

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world_size ({self.world_size}) must be >= 1")
        if self.tp_size < 1:
            raise ValueError(f"tp_size ({self.tp_size}) must be >= 1")
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
        check_comm_host(self.comm_host)


class ActorGroup:
    """N `worker_cls` actors, rank i pinned to bundle i of one placement group, joined by a
    transport (gloo on CPU, NCCL on CUDA). Needs `ray.init()` done by the caller.

    With tp_size t > 1 each rank (sequence shard) is t actors, its tensor-parallel group: bundle
    i holds t GPUs (a bundle is never split across nodes: the TP group shares a node, NVLink),
    and the strategy places the N bundles (SPREAD: the groups over nodes). Actors are listed
    shard-major (`actors[i * t + r]`: shard i, TP rank r); each joins the ring of its TP index
    and its shard's TP group. Callers still see N ranks: `call` and `call_per_rank` send rank
    i's arguments to its t actors and return TP rank 0's answer (the TP group computes the
    same rows; `call_actors` returns every actor's)."""

    def __init__(self, world_size: int, device: str = "cpu", worker_cls=ShardWorker,
                 placement_strategy: str = "STRICT_PACK", num_cpus_per_worker: float = 1.0,
                 worker_kwargs: Optional[dict] = None,
                 transport_timeout_s: float = DEFAULT_TIMEOUT_S,
                 placement_timeout_s: float = 60.0, startup_timeout_s: float = 300.0,
                 tp_size: int = 1, comm_host: Optional[str] = None):
        self.config = GroupConfig(world_size, device, placement_strategy, num_cpus_per_worker,
                                  transport_timeout_s, placement_timeout_s,
                                  dict(worker_kwargs or {}), startup_timeout_s, tp_size,
                                  comm_host)
        self.grid = TPGrid(world_size, tp_size)
        self.worker_cls = worker_cls
        self.actors: List[Any] = []
        self._dag = None      # the compiled step graph (execute_step), made on first use
        self.placement_group = None
        self.store_address: Optional[tuple] = None   # gloo: (host, port) of rank 0's store
        self._start()

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def tp_size(self) -> int:
        return self.config.tp_size

    @property
    def device(self) -> str:
        return self.config.device

    def _bundles(self):
        c = self.config
        b = {"CPU": c.num_cpus_per_worker * c.tp_size}
        if c.device == "cuda":
            b["GPU"] = c.tp_size
        return [dict(b) for _ in range(c.world_size)]

    def _start(self) -> None:
        c = self.config
        bundles = self._bundles()
        pg = placement_group(bundles, strategy=c.placement_strategy)
        if not pg.wait(timeout_seconds=c.placement_timeout_s):
            remove_placement_group(pg)
            need = (f" (context_parallel_size {c.world_size} x tensor_parallel_size "
                    f"{c.tp_size} = {c.world_size * c.tp_size} actors; each bundle's "
                    f"{c.tp_size} on one node)" if c.tp_size > 1 else "")
            raise GroupSetupError(
                f"placement group of {c.world_size} bundles {bundles[0]} ({c.placement_strategy})"
                f"{need} not ready within {c.placement_timeout_s:.0f} s; cluster has "
                f"{ray.cluster_resources()} in all, {ray.available_resources()} free")
        self.placement_group = pg
        remote_cls = ray.remote(num_cpus=c.num_cpus_per_worker,
                                num_gpus=1 if c.device == "cuda" else 0)(self.worker_cls)
        def tp(r):  # workers that know nothing of TP keep working at tp_size 1
            return {} if c.tp_size == 1 else {"tp_rank": r, "tp_size": c.tp_size}
        self.actors = [
            remote_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank)
            ).remote(rank, c.world_size, c.device, **tp(r), **c.worker_kwargs)
            for rank in range(c.world_size) for r in range(c.tp_size)]
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
                health = ray.get([a.health.remote() for a in self.actors],
                                 timeout=c.startup_timeout_s)
            except ray.exceptions.GetTimeoutError as e:
                raise GroupSetupError(f"{len(self.actors)} workers did not start within "
                                      f"{c.startup_timeout_s:.0f} s") from e
            if c.device == "cuda":
                # one NCCL id per communicator: the ring of each TP index, then each TP group
                n = 1 if c.tp_size == 1 else c.tp_size + c.world_size
                ids = ray.get([self.actors[0].nccl_unique_id.remote() for _ in range(n)],
                              timeout=t)
                specs = [TransportSpec("nccl", unique_id=u, timeout_s=t) for u in ids]
                if c.tp_size == 1:
                    args = [(specs[0],)] * len(self.actors)
                else:
                    rings, groups = specs[:c.tp_size], specs[c.tp_size:]
                    args = [(rings[r], groups[i]) for i in range(c.world_size)
                            for r in range(c.tp_size)]
            else:
                host, port = ray.get(self.actors[0].comm_address.remote(
                    t, self._store_host(health)), timeout=t)
                self.store_address = (host, port)
                spec = TransportSpec("gloo", host=host, port=port, timeout_s=t)
                args = [(spec,) if c.tp_size == 1 else (spec, spec)] * len(self.actors)
            # every rank joins at once: communicator creation blocks until all are in
            ray.get([a.setup_transport.remote(*x) for a, x in zip(self.actors, args)],
                    timeout=t)
        except ray.exceptions.GetTimeoutError as e:
            raise GroupSetupError(f"transport setup of {c.world_size} ranks ({c.device}) did "
                                  f"not finish within {t:.0f} s") from e

    def _store_host(self, health: List[dict]) -> Optional[str]:
        """Where rank 0's gloo store listens (None: its node's address, which rank 0 knows).
        Actors of one Ray node share its network (one raylet: one host, pod or netns), so
        loopback reaches them all and nothing outside the node can reach the store."""
        if self.config.comm_host is not None:
            return self.config.comm_host.strip()
        nodes = {h.get("node_id") for h in health}
        return "127.0.0.1" if len(nodes) == 1 and None not in nodes else None

    # ---- calls ----

    def call(self, method: str, *args, timeout_s: Optional[float] = None, **kwargs) -> list:
        """`method(*args, **kwargs)` on every rank at once; results in rank order (with tensor
        parallelism: every actor runs it, TP rank 0 of each shard answers)."""
        return self.call_actors(method, *args, timeout_s=timeout_s, **kwargs)[::self.tp_size]

    def call_actors(self, method: str, *args, timeout_s: Optional[float] = None,
                    **kwargs) -> list:
        """`method(*args, **kwargs)` on every actor at once; results in actor order (shard-major:
        shard i's TP ranks at i * tp_size ...)."""
        if not self.actors:  # shut down, or a rebuild failed: [] would pass for "no results"
            raise GroupSetupError(f"the group has no actors (shut down, or its last start "
                                  f"failed); rebuild() it before calling {method!r}")
        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors],
                       timeout=timeout_s)

    def call_per_rank(self, method: str, args_list: Sequence[Sequence],
                      timeout_s: Optional[float] = None) -> list:
        """`method(*args_list[rank])` on each rank at once; results in rank order."""
        return self.collect(self.submit_per_rank(method, args_list), timeout_s)

    def submit_per_rank(self, method: str, args_list: Sequence[Sequence]) -> list:
        """As `call_per_rank`, without waiting: the refs for `collect` (the engine's async
        scheduling sends the next step before it reads this one)."""
        if not self.actors:
            raise GroupSetupError(f"the group has no actors (shut down, or its last start "
                                  f"failed); rebuild() it before calling {method!r}")
        if len(args_list) != self.world_size:
            raise ValueError(f"args_list has {len(args_list)} entries for "
                             f"{self.world_size} ranks")
        t = self.tp_size
        return [getattr(a, method).remote(*args_list[i // t]) for i, a in enumerate(self.actors)]

    def collect(self, refs: list, timeout_s: Optional[float] = None) -> list:
        """The results of `submit_per_rank`'s refs, in rank order."""
        return ray.get(refs, timeout=timeout_s)[::self.tp_size]

    @property
    def has_step_channel(self) -> bool:
        """Whether `execute_step` can run: the workers have `execute_pickled` (model workers)."""
        return callable(getattr(self.worker_cls, "execute_pickled", None))

    def execute_step(self, plans: Sequence[Any], timeout_s: Optional[float] = None) -> list:
        """One engine step: `execute(plans[rank])` on each rank (with tensor parallelism every
        actor of a shard gets its plan; TP rank 0 answers), results in rank order, through a Ray
        Compiled Graph instead of a Ray task per actor: its shared-memory channels cost ~0.1 ms
        a step where tasks cost ~0.5 ms per actor (2-core CPU machine, session 11). Compiled on
        the first step and again after a rebuild. The actors must have `execute_pickled`."""
        if not self.actors:
            raise GroupSetupError("the group has no actors (shut down, or its last start "
                                  "failed); rebuild() it before running a step")
        if len(plans) != self.world_size:
            raise ValueError(f"{len(plans)} plans for {self.world_size} ranks")
        t = self.tp_size
        if self._dag is None:
            from ray.dag import InputNode, MultiOutputNode
            with InputNode() as inp:
                outs = [a.execute_pickled.bind(inp[i // t]) for i, a in enumerate(self.actors)]
            self._dag = MultiOutputNode(outs).experimental_compile()
        refs = self._dag.execute(*[pickle.dumps(p, protocol=5) for p in plans])
        # a compiled graph's get waits RAY_CGRAPH_get_timeout (10 s) unless told: a step may
        # take longer (a long prompt's chunk on CPU, a first step's compiles), so no bound
        # unless the engine gives one (-1: block, as ray.get does for tasks); the outputs of
        # one execution arrive together, so the later gets return at once
        wait = -1 if timeout_s is None else timeout_s
        return [r.get(timeout=wait) for r in refs][::t]

    def _teardown_step_channel(self, actors_alive: bool) -> None:
        """Close the compiled step graph. With the actors alive it ends their graph loops (they
        then take other calls only); after they were killed its cancel calls fail at once,
        which Ray logs as errors: quieted, the actors are gone on purpose (and its four INFO
        lines of a normal teardown too)."""
        dag, self._dag = self._dag, None
        if dag is None:
            return
        lg = logging.getLogger("ray.dag.compiled_dag_node")
        level = lg.level
        lg.setLevel(logging.WARNING if actors_alive else logging.CRITICAL)
        try:
            dag.teardown()
        except Exception:  # noqa: BLE001 - best effort: the actors are going anyway
            pass
        finally:
            lg.setLevel(level)

    def health(self, timeout_s: float = 30.0) -> List[dict]:
        """Every actor's (with tensor parallelism: shard i's TP ranks at i * tp_size ...)."""
        return self.call_actors("health", timeout_s=timeout_s)

    # ---- lifecycle ----

    def shutdown(self, actors_alive: bool = True) -> None:
        """Close the step graph and the communicators (best effort), kill the actors, remove
        the placement group. actors_alive=False (a rebuild after a failure): the step graph is
        closed after the kill, as a hung actor would hold up its teardown."""
        if actors_alive:
            self._teardown_step_channel(True)
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
        self._teardown_step_channel(False)
        if self.placement_group is not None:
            pg, self.placement_group = self.placement_group, None
            try:
                remove_placement_group(pg)
            except Exception:
                pass

    def rebuild(self) -> None:
        """Fresh actors and a fresh communicator (after a worker failed or a wait timed out)."""
        self.shutdown(actors_alive=False)
        self._start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
