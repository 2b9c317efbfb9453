"""The shard worker: one process, one device, one shard of the sequence.

A plain class: `ActorGroup` applies `ray.remote(...)` with the resources it needs, so the engine
can subclass it with model methods and keep the communicator setup, health and shutdown here.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

import torch

from ringserve.parallel.ring import RingStats, ring_attention
from ringserve.parallel.tp import TPComm, TPGrid
from ringserve.parallel.transport import (GlooTransport, NcclTransport, Transport,
                                          TransportSpec, make_store, nccl_unique_id)


def _node_ip() -> str:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (multiprocessing workers): loopback is enough on one host
        return "127.0.0.1"


class ShardWorker:
    """Owns this rank's device and transport. Methods are called on every rank by the group."""

    def __init__(self, rank: int, world_size: int, device: str = "cpu", tp_rank: int = 0,
                 tp_size: int = 1, **kwargs):
        """rank / world_size: this actor's sequence shard and the number of shards (the ring);
        tp_rank / tp_size: its place in the shard's tensor-parallel group."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank ({tp_rank}) must be in [0, tp_size ({tp_size}))")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.rank, self.world_size = rank, world_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.grid = TPGrid(world_size, tp_size)
        # the ring (self.transport) joins TP rank tp_rank of every shard; the TP group's
        # transport reaches the model's parallel layers through tp_comm
        self.tp_comm = TPComm()
        self._whole: Optional[Transport] = None    # gloo with TP: the group of all actors
        if device == "cuda":
            # Ray sets CUDA_VISIBLE_DEVICES to the one GPU of this actor: it is cuda:0 here
            self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.transport: Optional[Transport] = None
        self._store = None  # rank 0's gloo store, kept alive until the transport is built
        self.last_stats: Optional[RingStats] = None

    # ---- communicator setup (rank 0 first, then every rank with what rank 0 returned) ----

    def comm_address(self, timeout_s: float = 120.0, host: Optional[str] = None):
        """Rank 0: start the gloo rendezvous store on a free port of `host` (None: this
        node's address as Ray reports it); returns (host, port)."""
        host = host or _node_ip()
        self._store, port = make_store(host, self.grid.num_gpus, timeout_s)
        return host, port

    def nccl_unique_id(self):
        """Rank 0: a fresh NCCL unique id for this group."""
        return nccl_unique_id()

    def setup_transport(self, spec: TransportSpec, tp_spec: Optional[TransportSpec] = None
                        ) -> bool:
        """Build the transport (blocks until every rank has joined); returns True. With
        tensor parallelism, `spec` is this actor's ring (NCCL: its TP index's id; gloo: the
        store of the whole group, cut into rings and TP groups here) and `tp_spec` its TP
        group's."""
        self.close_transport()
        if self.tp_size > 1:
            return self._setup_tp_transports(spec, tp_spec)
        if spec.backend == "gloo":
            self.transport = GlooTransport(self.rank, self.world_size, spec.host, spec.port,
                                           spec.timeout_s,
                                           store=self._store if self.rank == 0 else None)
        else:
            self.transport = NcclTransport(self.rank, self.world_size, spec.unique_id,
                                           self.device, spec.timeout_s)
        self._store = None
        return True

    def _setup_tp_transports(self, spec: TransportSpec, tp_spec: Optional[TransportSpec]
                             ) -> bool:
        if tp_spec is None:
            raise ValueError(f"tp_size is {self.tp_size}: setup_transport needs tp_spec")
        me = self.grid.actor(self.rank, self.tp_rank)
        if spec.backend == "gloo":
            # one torch.distributed group per process: the whole group, then its subgroups
            self._whole = GlooTransport(me, self.grid.num_gpus, spec.host, spec.port,
                                        spec.timeout_s, store=self._store if me == 0 else None)
            self.transport = self._whole.subgroup(self.grid.rings())
            tp = self._whole.subgroup(self.grid.tp_groups())
        else:
            # every actor joins its ring first, then its TP group: no communicator waits on
            # an actor still blocked in the other
            self.transport = NcclTransport(self.rank, self.world_size, spec.unique_id,
                                           self.device, spec.timeout_s)
            tp = NcclTransport(self.tp_rank, self.tp_size, tp_spec.unique_id, self.device,
                               tp_spec.timeout_s)
        if (self.transport.rank, self.transport.world_size) != (self.rank, self.world_size) or \
                (tp.rank, tp.world_size) != (self.tp_rank, self.tp_size):
            raise RuntimeError(f"actor {me}: ring rank {self.transport.rank}/"
                               f"{self.transport.world_size} and TP rank {tp.rank}/"
                               f"{tp.world_size}, expected {self.rank}/{self.world_size} and "
                               f"{self.tp_rank}/{self.tp_size}")
        self.tp_comm.transport = tp
        self._store = None
        return True

    def close_transport(self) -> None:
        tp, self.tp_comm.transport = self.tp_comm.transport, None
        for t in (tp, self.transport, self._whole):
            if t is not None:
                t.close()
        self.transport = self._whole = None

    # ---- checks ----

    def health(self) -> dict:
        info = {"rank": self.rank, "world_size": self.world_size, "tp_rank": self.tp_rank,
                "tp_size": self.tp_size, "device": str(self.device),
                "pid": os.getpid(), "host": socket.gethostname(),
                "transport": type(self.transport).__name__ if self.transport else None}
        try:
            import ray
            info["node_id"] = ray.get_runtime_context().get_node_id()
        except Exception:
            info["node_id"] = None
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            info["memory"] = {"allocated": torch.cuda.memory_allocated(self.device),
                              "reserved": torch.cuda.memory_reserved(self.device),
                              "free": free, "total": total}
        else:
            info["memory"] = {"rss": _rss_bytes()}
        return info

    def ping_ring(self, nbytes: int = 1024, timeout_s: Optional[float] = None) -> float:
        """One send_recv of `nbytes` around the ring (a liveness check of the communicator).

        Every rank must call it; returns the seconds it took here. A rank whose neighbour never
        calls raises TransportTimeoutError after `timeout_s`.
        """
        t = self._need_transport()
        send = torch.full((nbytes,), self.rank % 256, dtype=torch.uint8, device=self.device)
        recv = torch.empty_like(send)
        t0 = time.perf_counter()
        t.send_recv(send, recv).wait(timeout_s)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        expect = t.prev_rank % 256
        if not bool((recv == expect).all()):
            raise RuntimeError(f"rank {self.rank}: ring ping got wrong bytes from {t.prev_rank}")
        return time.perf_counter() - t0

    def check_collectives(self, timeout_s: Optional[float] = None) -> list:
        """barrier + all_gather of every rank's id: the ranks as this rank sees them."""
        t = self._need_transport()
        t.barrier(timeout_s)
        mine = torch.tensor([self.rank, os.getpid()], dtype=torch.int64, device=self.device)
        return [x.cpu().tolist() for x in t.all_gather(mine, timeout_s)]

    def check_tp_group(self, timeout_s: Optional[float] = None) -> list:
        """all_gather of (shard, tp_rank, pid) over this actor's TP group, and an all_reduce
        of the TP ranks (their sum): the TP communicator as this actor sees it."""
        t = self.tp_comm.transport
        if t is None:
            raise RuntimeError(f"actor (shard {self.rank}, tp rank {self.tp_rank}) has no "
                               f"TP transport (tp_size {self.tp_size})")
        mine = torch.tensor([self.rank, self.tp_rank, os.getpid()], dtype=torch.int64,
                            device=self.device)
        got = [x.cpu().tolist() for x in t.all_gather(mine, timeout_s)]
        total = t.all_reduce(torch.tensor([float(self.tp_rank)], device=self.device), timeout_s)
        return [got, float(total.item())]

    # ---- attention (tests, benchmarks) ----

    def ring_attention_shard(self, q, k, v, total_len: int, layout: str, causal: bool = True,
                             window_size=None, softmax_scale=None, backend: str = "auto"):
        """Ring attention on this rank's shard. Inputs may come from the driver on the CPU;
        returns (out, lse, stats dict) on the CPU."""
        t = self._need_transport()
        q, k, v = (x.to(self.device, non_blocking=True) for x in (q, k, v))
        stats = RingStats()
        out, lse = ring_attention(q, k, v, total_len, layout, t, causal, window_size,
                                  softmax_scale, backend, stats=stats)
        self.last_stats = stats
        return out.cpu(), lse.cpu(), stats.as_dict()

    def _need_transport(self) -> Transport:
        if self.transport is None:
            raise RuntimeError(f"rank {self.rank}: setup_transport() has not been called")
        return self.transport

    def shutdown(self) -> bool:
        """Close the communicator and give the device memory back."""
        self.close_transport()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        return True


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return -1
