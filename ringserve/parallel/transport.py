"""Point-to-point transport between the ranks of a ring: send to the next rank, receive from the
previous one, asynchronously, with a timeout on every wait.

The ring schedule only talks to this interface, so it runs unchanged over
  - `NcclTransport`  (GPU; `cupy.cuda.nccl`, its own CUDA stream, device pointers),
  - `GlooTransport`  (CPU actors; `torch.distributed` with the gloo backend),
  - `ThreadTransport` (ranks as threads of one process; fast unit tests of schedules).

Every wait has a deadline: a peer that never sends raises `TransportTimeoutError` naming the peer,
instead of hanging the actor forever (the group can then be rebuilt).
"""
from __future__ import annotations

import datetime
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

DEFAULT_TIMEOUT_S = 300.0


class TransportError(RuntimeError):
    """A communication step failed (not a timeout)."""


class TransportTimeoutError(TimeoutError):
    """A wait passed its deadline. `peer` is the rank that did not answer (None: several)."""

    def __init__(self, message: str, rank: int = -1, peer: Optional[int] = None,
                 timeout_s: float = 0.0):
        super().__init__(message)
        self.rank, self.peer, self.timeout_s = rank, peer, timeout_s

    def __reduce__(self):  # keep the fields when Ray ships the error to the driver
        return (type(self), (str(self), self.rank, self.peer, self.timeout_s))


def _poll_until(done: Callable[[], bool], timeout_s: float) -> bool:
    """Spin then back off until `done()` or the deadline; True if done.

    Polling (rather than a blocking wait) keeps the operation alive when the deadline passes, so a
    late peer can still complete it, and works the same for CUDA events and gloo work objects.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    pause = 5e-6
    while not done():
        now = time.monotonic()
        if now >= deadline:
            return done()
        time.sleep(min(pause, deadline - now))
        # short waits (a decode all-gather, a ring step) are noticed within ~0.1 ms; only a
        # wait already past a second backs off further, to spare the CPU
        pause = min(pause * 2, 1e-4 if now - start < 1.0 else 2e-3)
    return True


class Handle:
    """An operation in flight. `wait()` returns once received data may be read."""

    def wait(self, timeout_s: Optional[float] = None) -> None:
        raise NotImplementedError


class _DoneHandle(Handle):
    def wait(self, timeout_s: Optional[float] = None) -> None:
        return None


class Transport:
    """send_recv to (rank + 1) % N from (rank - 1) % N; all_gather; barrier; close."""

    rank: int
    world_size: int
    timeout_s: float

    @property
    def next_rank(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev_rank(self) -> int:
        return (self.rank - 1) % self.world_size

    def send_recv(self, send_tensor: Optional[torch.Tensor],
                  recv_tensor: Optional[torch.Tensor]) -> Handle:
        """Post a send of `send_tensor` to the next rank and a receive into `recv_tensor` from the
        previous rank (either may be None: that half is skipped). Returns at once."""
        raise NotImplementedError

    def all_gather(self, tensor: torch.Tensor, timeout_s: Optional[float] = None,
                   blocking: bool = True) -> List[torch.Tensor]:
        """Every rank's `tensor` (same shape and dtype everywhere), in rank order.

        blocking=False (NCCL): return at once, ordered on the compute stream like a kernel (the
        host does not wait); a later `synchronize(timeout_s)` bounds the wait. CPU transports
        always complete before returning.
        """
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor, timeout_s: Optional[float] = None,
                   blocking: bool = True) -> torch.Tensor:
        """Sum of every rank's `tensor` (same shape and dtype everywhere), written into `tensor`
        and returned; the same bits on every rank. blocking as in `all_gather`. This default
        sums an all-gather in rank order (tests); the real transports use their collective."""
        parts = self.all_gather(tensor, timeout_s, blocking)
        acc = parts[0].clone()
        for p in parts[1:]:
            acc += p
        return tensor.copy_(acc)

    def synchronize(self, timeout_s: Optional[float] = None) -> None:
        """Wait, with a deadline, until the work queued so far (communication included) is
        done. Nothing to do for CPU transports."""
        return None

    def barrier(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _timeout(self, timeout_s: Optional[float]) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    def _timeout_error(self, what: str, peer: Optional[int], timeout_s: float):
        who = f"rank {peer}" if peer is not None else "the other ranks"
        return TransportTimeoutError(
            f"{type(self).__name__} rank {self.rank}/{self.world_size}: {what} did not complete "
            f"within {timeout_s:.1f} s; waiting on {who} (did it fail or never call?)",
            self.rank, peer, timeout_s)


def _check_world(rank: int, world_size: int, timeout_s: float) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s ({timeout_s}) must be > 0")


# --------------------------------------------------------------------------------------------
# gloo (torch.distributed)


class _GlooHandle(Handle):
    def __init__(self, transport: "GlooTransport", works, peer: Optional[int],
                 what: str = "send_recv"):
        self._t, self._works, self._peer, self._what = transport, works, peer, what

    def wait(self, timeout_s: Optional[float] = None) -> None:
        # gloo's point-to-point work reports completion only through wait(), so wait with the
        # remaining time; gloo raises RuntimeError when it runs out or the peer is gone.
        t = self._t._timeout(timeout_s)
        deadline = time.monotonic() + t
        for w in self._works:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise RuntimeError("deadline passed")
                w.wait(datetime.timedelta(seconds=left))
            except RuntimeError as e:
                self._t.broken = True  # gloo closes the pair: this communicator is done
                if time.monotonic() >= deadline - 0.05 or "imed out" in str(e):
                    raise self._t._timeout_error(self._what, self._peer, t) from e
                who = f"rank {self._peer}" if self._peer is not None else "the other ranks"
                raise TransportError(f"GlooTransport rank {self._t.rank}: communication with "
                                     f"{who} failed (the group must be rebuilt): {e}") from e


_EVERY_INTERFACE = ("0.0.0.0", "::", "*")


def check_comm_host(host: Optional[str]) -> None:
    """The `comm_host` setting: None (automatic) or one address, never the wildcard."""
    if host is None:
        return
    if not isinstance(host, str) or not host.strip() or host.strip() in _EVERY_INTERFACE:
        raise ValueError(f"comm_host ({host!r}) must be null (automatic) or one address of rank "
                         "0's node that every shard actor can reach, not every interface")


def make_store(host: str, world_size: int, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Rank 0's TCP store, listening on `host` only, on a free port (port 0: the OS picks, so
    no race on a guessed port).

    torch's TCPStore listens on every interface whatever host it is given, so the socket is
    bound here and handed over (`master_listen_fd`): loopback keeps a one-node group off the
    network, a node's own address keeps a multi-node one on that interface. Returns (store,
    port); the port goes to the other ranks (through Ray in the actor group).
    """
    import socket

    import torch.distributed as dist

    if not host or host in _EVERY_INTERFACE:
        raise ValueError(f"the store's host ({host!r}) must be one address that the other "
                         "ranks can reach, not every interface")
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr[:2] if family == socket.AF_INET else addr)
        sock.listen(128)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    # from here the store owns the descriptor and closes it; should its constructor fail, the
    # descriptor may be closed already, so it is left alone (a second close could hit a file
    # that another thread has opened under the same number since)
    fd = sock.detach()
    store = dist.TCPStore(host, port, world_size, True,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=fd)
    return store, port


class GlooTransport(Transport):
    """gloo over torch.distributed: isend/irecv, one process group per process.

    Rank 0 passes the store from `make_store`; the others pass `host`/`port` of that store.
    `subgroup(groups)` cuts the process group into communicators of a few ranks each (tensor
    parallelism: the ring of each TP index and each shard's TP group), each a `GlooTransport`
    whose rank and world size are those inside its group.
    """

    _group = None          # None: the whole process group; else a torch.distributed subgroup
    _ranks: Optional[List[int]] = None   # this group's members as ranks of the whole group

    def __init__(self, rank: int, world_size: int, host: str = "127.0.0.1", port: int = 0,
                 timeout_s: float = DEFAULT_TIMEOUT_S, store=None):
        import torch.distributed as dist

        _check_world(rank, world_size, timeout_s)
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self._dist = dist
        if dist.is_initialized():
            raise TransportError("torch.distributed is already initialised in this process; "
                                 "close() the previous GlooTransport first")
        if store is None:
            if port <= 0:
                raise ValueError(f"port ({port}) of rank 0's store is needed on rank {rank}")
            store = dist.TCPStore(host, port, world_size, False,
                                  timeout=datetime.timedelta(seconds=timeout_s))
        self._store = store
        self.broken = False
        # the process-group timeout bounds gloo's own blocking calls (connect, collectives)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self._closed = False

    def send_recv(self, send_tensor, recv_tensor) -> Handle:
        if self.world_size == 1:
            if send_tensor is not None and recv_tensor is not None:
                recv_tensor.copy_(send_tensor.reshape(recv_tensor.shape))
            return _DoneHandle()
        works = []
        if send_tensor is not None:
            works.append(self._dist.isend(send_tensor.contiguous(), self._whole(self.next_rank),
                                          group=self._group))
        if recv_tensor is not None:
            if not recv_tensor.is_contiguous():
                raise ValueError("recv_tensor must be contiguous")
            works.append(self._dist.irecv(recv_tensor, self._whole(self.prev_rank),
                                          group=self._group))
        return _GlooHandle(self, works, self.prev_rank if recv_tensor is not None
                           else self.next_rank)

    def all_gather(self, tensor: torch.Tensor, timeout_s: Optional[float] = None,
                   blocking: bool = True):
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        work = self._dist.all_gather(out, tensor.contiguous(), group=self._group, async_op=True)
        _GlooHandle(self, [work], None, "all_gather").wait(timeout_s)
        return out

    def all_reduce(self, tensor: torch.Tensor, timeout_s: Optional[float] = None,
                   blocking: bool = True) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        if not tensor.is_contiguous():
            raise ValueError("all_reduce needs a contiguous tensor (it sums in place)")
        work = self._dist.all_reduce(tensor, group=self._group, async_op=True)
        _GlooHandle(self, [work], None, "all_reduce").wait(timeout_s)
        return tensor

    def barrier(self, timeout_s: Optional[float] = None) -> None:
        work = self._dist.barrier(group=self._group, async_op=True)
        _GlooHandle(self, [work], None, "barrier").wait(timeout_s)

    def _whole(self, rank: int) -> int:
        """A rank of this group as a rank of the whole process group."""
        return rank if self._ranks is None else self._ranks[rank]

    def subgroup(self, groups: List[List[int]]) -> "GlooTransport":
        """Every process calls this with the same `groups` (a partition of the whole group's
        ranks, in the same order everywhere: gloo creates each subgroup collectively); returns
        the communicator of the group holding this process. Closing it leaves the whole group
        open; closing the whole group ends them all."""
        if self._ranks is not None:
            raise TransportError("subgroup() is called on the whole group, not on a subgroup")
        mine = None
        for ranks in groups:
            g = self._dist.new_group(ranks=list(ranks), timeout=datetime.timedelta(
                seconds=self.timeout_s), backend="gloo")
            if self.rank in ranks:
                mine = (g, list(ranks))
        if mine is None:
            raise ValueError(f"rank {self.rank} is in none of the groups {groups}")
        sub = GlooTransport.__new__(GlooTransport)
        sub._dist, sub._store, sub.broken, sub._closed = self._dist, None, False, True
        sub._group, sub._ranks = mine
        sub.rank, sub.world_size = mine[1].index(self.rank), len(mine[1])
        sub.timeout_s = self.timeout_s
        return sub

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._dist.is_initialized():
                self._dist.destroy_process_group()
            self._store = None


# --------------------------------------------------------------------------------------------
# NCCL (cupy)

# NCCL's ncclDataType_t values (nccl.h); cupy builds without bf16 lack NCCL_BFLOAT16 (= 9).
_NCCL_DTYPE_NAMES = {torch.float32: ("NCCL_FLOAT32", 7), torch.float16: ("NCCL_FLOAT16", 6),
                     torch.float64: ("NCCL_FLOAT64", 8),
                     torch.bfloat16: ("NCCL_BFLOAT16", 9), torch.uint8: ("NCCL_UINT8", 1),
                     torch.int32: ("NCCL_INT32", 2), torch.int64: ("NCCL_INT64", 4)}


def _import_nccl():
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as e:  # CPU machines have no cupy: say which package brings NCCL
        raise ImportError(
            "NcclTransport needs cupy with NCCL (pip install 'ringserve[gpu]', i.e. "
            f"cupy-cuda12x or cupy-cuda13x); import failed: {e}") from e
    return cupy, nccl


def nccl_unique_id():
    """A fresh NCCL unique id (a tuple of ints, picklable), made on rank 0 and handed out."""
    return _import_nccl()[1].get_unique_id()


class _NcclHandle(Handle):
    def __init__(self, transport: "NcclTransport", event, peer: Optional[int],
                 what: str = "NCCL send_recv"):
        self._t, self._event, self._peer, self._what = transport, event, peer, what

    def wait(self, timeout_s: Optional[float] = None) -> None:
        t = self._t._timeout(timeout_s)
        # Host-side poll only to bound the wait; the compute stream itself waits on the event, so
        # kernels already queued keep running and nothing is copied through the host.
        if not _poll_until(self._event.query, t):
            self._t.broken = True
            raise self._t._timeout_error(self._what, self._peer, t)
        torch.cuda.current_stream(self._t.device).wait_event(self._event)


class NcclTransport(Transport):
    """NCCL through cupy: send and recv of a step in one NCCL group, on a dedicated stream."""

    def __init__(self, rank: int, world_size: int, unique_id, device=None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        _check_world(rank, world_size, timeout_s)
        cupy, nccl = _import_nccl()
        self._nccl = nccl
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None
                                   else torch.device(device).index or 0)
        self._cupy_device = cupy.cuda.Device(self.device.index)
        self._cupy_device.use()
        self.stream = torch.cuda.Stream(self.device)  # communication overlaps the compute stream
        self.broken = False
        self._comm = nccl.NcclCommunicator(world_size, unique_id, rank)  # blocks until all join

    def _dtype(self, t: torch.Tensor) -> int:
        if t.dtype not in _NCCL_DTYPE_NAMES:
            raise TypeError(f"dtype {t.dtype} not supported by NcclTransport "
                            f"(use one of {list(_NCCL_DTYPE_NAMES)})")
        name, value = _NCCL_DTYPE_NAMES[t.dtype]
        return getattr(self._nccl, name, value)

    def _check(self, t: torch.Tensor, what: str) -> None:
        if t.device != self.device or not t.is_contiguous():
            raise ValueError(f"{what} must be a contiguous tensor on {self.device}, "
                             f"got {t.device}, contiguous={t.is_contiguous()}")

    def _enter(self):
        # The comm stream starts after the work queued so far on the compute stream (the data
        # to send is written, the receive buffer is no longer read).
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(ready)

    def send_recv(self, send_tensor, recv_tensor) -> Handle:
        if self.world_size == 1:
            if send_tensor is not None and recv_tensor is not None:
                recv_tensor.copy_(send_tensor.reshape(recv_tensor.shape))
            return _DoneHandle()
        if send_tensor is None and recv_tensor is None:
            return _DoneHandle()
        self._enter()
        s = self.stream.cuda_stream
        self._nccl.groupStart()  # one group: send and recv progress together, no deadlock
        try:
            if send_tensor is not None:
                self._check(send_tensor, "send_tensor")
                self._comm.send(send_tensor.data_ptr(), send_tensor.numel(),
                                self._dtype(send_tensor), self.next_rank, s)
            if recv_tensor is not None:
                self._check(recv_tensor, "recv_tensor")
                self._comm.recv(recv_tensor.data_ptr(), recv_tensor.numel(),
                                self._dtype(recv_tensor), self.prev_rank, s)
        finally:
            self._nccl.groupEnd()
        # the caching allocator must not reuse these buffers before the comm stream is done
        for t in (send_tensor, recv_tensor):
            if t is not None:
                t.record_stream(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        return _NcclHandle(self, done, self.prev_rank if recv_tensor is not None
                           else self.next_rank)

    def all_gather(self, tensor: torch.Tensor, timeout_s: Optional[float] = None,
                   blocking: bool = True):
        tensor = tensor.contiguous()
        self._check(tensor, "tensor")
        out = torch.empty((self.world_size,) + tuple(tensor.shape), dtype=tensor.dtype,
                          device=self.device)
        self._enter()
        self._comm.allGather(tensor.data_ptr(), out.data_ptr(), tensor.numel(),
                             self._dtype(tensor), self.stream.cuda_stream)
        if not torch.cuda.is_current_stream_capturing():
            # (inside a CUDA-graph capture the graph's memory pool keeps them for its lifetime)
            tensor.record_stream(self.stream)
            out.record_stream(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        if blocking:
            _NcclHandle(self, done, None, "all_gather").wait(timeout_s)
        else:
            # stream-ordered: the host runs ahead (decode launches its next layer at once);
            # hangs surface at the caller's synchronize(), which has the deadline
            torch.cuda.current_stream(self.device).wait_event(done)
        return list(out.unbind(0))

    def all_reduce(self, tensor: torch.Tensor, timeout_s: Optional[float] = None,
                   blocking: bool = True) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        self._check(tensor, "tensor")
        self._enter()
        self._comm.allReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                             self._dtype(tensor), getattr(self._nccl, "NCCL_SUM", 0),
                             self.stream.cuda_stream)
        if not torch.cuda.is_current_stream_capturing():
            tensor.record_stream(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        if blocking:
            _NcclHandle(self, done, None, "all_reduce").wait(timeout_s)
        else:  # stream-ordered, as all_gather(blocking=False)
            torch.cuda.current_stream(self.device).wait_event(done)
        return tensor

    def synchronize(self, timeout_s: Optional[float] = None) -> None:
        t = self._timeout(timeout_s)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        if not _poll_until(ev.query, t):
            self.broken = True
            raise self._timeout_error("synchronize (queued kernels and communication)",
                                      None, t)

    def barrier(self, timeout_s: Optional[float] = None) -> None:
        self.all_gather(torch.zeros(1, device=self.device), timeout_s)
        torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        if self._comm is None:
            return
        comm, self._comm = self._comm, None
        if self.broken:
            comm.abort()  # a peer is gone: destroy would wait for it forever
        else:
            self.stream.synchronize()
            comm.destroy()


# --------------------------------------------------------------------------------------------
# threads of one process (tests)


class ThreadHub:
    """Mailboxes shared by the ranks of a `ThreadTransport` ring inside one process."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.boxes = [queue.Queue() for _ in range(world_size)]  # boxes[r]: messages for rank r
        self.gather_lock = threading.Lock()
        self.gather_rounds: dict = {}
        self.barrier = threading.Barrier(world_size)

    def transport(self, rank: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> "ThreadTransport":
        return ThreadTransport(self, rank, timeout_s)


class _ThreadHandle(Handle):
    def __init__(self, transport: "ThreadTransport", recv_tensor):
        self._t, self._recv = transport, recv_tensor
        self._done = recv_tensor is None

    def wait(self, timeout_s: Optional[float] = None) -> None:
        if self._done:
            return
        t = self._t._timeout(timeout_s)
        try:
            data = self._t.hub.boxes[self._t.rank].get(timeout=t)
        except queue.Empty:
            raise self._t._timeout_error("send_recv", self._t.prev_rank, t) from None
        if data.numel() != self._recv.numel():
            raise TransportError(f"rank {self._t.rank}: received {data.numel()} elements from "
                                 f"rank {self._t.prev_rank}, buffer holds {self._recv.numel()}")
        self._recv.copy_(data.reshape(self._recv.shape))
        self._done = True


class ThreadTransport(Transport):
    """Ranks as threads: a send puts a copy in the next rank's mailbox; wait() takes from ours."""

    def __init__(self, hub: ThreadHub, rank: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        _check_world(rank, hub.world_size, timeout_s)
        self.hub, self.rank, self.world_size, self.timeout_s = hub, rank, hub.world_size, timeout_s
        self._gathers = 0

    def send_recv(self, send_tensor, recv_tensor) -> Handle:
        if send_tensor is not None:
            self.hub.boxes[self.next_rank].put(send_tensor.detach().clone())
        return _ThreadHandle(self, recv_tensor)

    def all_gather(self, tensor: torch.Tensor, timeout_s: Optional[float] = None,
                   blocking: bool = True):
        t = self._timeout(timeout_s)
        key = self._gathers
        self._gathers += 1
        with self.hub.gather_lock:
            slot = self.hub.gather_rounds.setdefault(key, [None] * self.world_size)
            slot[self.rank] = tensor.detach().clone()
        if not _poll_until(lambda: all(x is not None for x in slot), t):
            missing = [r for r, x in enumerate(slot) if x is None]
            raise self._timeout_error("all_gather", missing[0] if len(missing) == 1 else None, t)
        return list(slot)

    def barrier(self, timeout_s: Optional[float] = None) -> None:
        t = self._timeout(timeout_s)
        try:
            self.hub.barrier.wait(timeout=t)
        except threading.BrokenBarrierError:
            raise self._timeout_error("barrier", None, t) from None

    def close(self) -> None:
        pass


@dataclass
class TransportSpec:
    """How an actor builds its transport: what rank 0 hands to the others through Ray."""

    backend: str                 # "gloo" | "nccl"
    host: str = "127.0.0.1"      # gloo: rank 0's store address
    port: int = 0
    unique_id: object = None     # nccl: from nccl_unique_id() on rank 0
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s ({self.timeout_s}) must be > 0")
