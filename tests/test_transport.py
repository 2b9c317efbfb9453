"""Transports: deadlines on every wait, collectives, and recovery by rebuilding the group."""
from __future__ import annotations

import time

import pytest
import torch

from ringserve.parallel.transport import (ThreadHub, TransportSpec, TransportTimeoutError,
                                          make_store, nccl_unique_id)

pytestmark = pytest.mark.timeout(300)


def test_thread_transport_times_out_naming_the_peer():
    hub = ThreadHub(3)
    t1 = hub.transport(1, timeout_s=0.3)
    buf = torch.empty(5)
    start = time.monotonic()
    with pytest.raises(TransportTimeoutError, match="waiting on rank 0") as e:
        t1.send_recv(torch.randn(5), buf).wait()  # rank 0 never sends
    assert 0.25 < time.monotonic() - start < 3
    assert e.value.peer == 0 and e.value.rank == 1 and isinstance(e.value, TimeoutError)
    # a late sender still delivers: the data is the one sent, untouched
    x = torch.randn(5)
    hub.transport(0).send_recv(x, None)
    hub.transport(1).send_recv(None, buf).wait(1.0)
    assert torch.equal(buf, x)


def test_thread_transport_all_gather():
    import threading

    hub = ThreadHub(3)
    got = [None] * 3

    def main(r):
        t = hub.transport(r, timeout_s=10)
        t.barrier()
        first = t.all_gather(torch.tensor([r * 10.0, r + 0.5]))
        # the non-blocking form gives the same answer once synchronize() returns
        second = t.all_gather(torch.tensor([r * 10.0, r + 0.5]), blocking=False)
        t.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        got[r] = first

    ts = [threading.Thread(target=main, args=(r,)) for r in range(3)]
    [t.start() for t in ts]
    [t.join(10) for t in ts]
    for g in got:
        assert [x.tolist() for x in g] == [[0.0, 0.5], [10.0, 1.5], [20.0, 2.5]]


def test_spec_checks_and_nccl_import_message():
    with pytest.raises(ValueError, match="backend"):
        TransportSpec("mpi")
    with pytest.raises(ValueError, match=r"timeout_s \(0\)"):
        TransportSpec("gloo", timeout_s=0)
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="cupy"):
            nccl_unique_id()


def _listening(pid: int, port: int) -> set:
    """The addresses process `pid` listens on at `port`."""
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_store_listens_on_its_host_only():
    """torch's TCPStore alone listens on every interface whatever host it is given; the store
    rank 0 serves listens on the one address the others dial, and works there."""
    import datetime
    import os

    import torch.distributed as dist

    store, port = make_store("127.0.0.1", 2, timeout_s=10)
    assert _listening(os.getpid(), port) == {"127.0.0.1"}
    client = dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=10))
    client.set("ring", "serve")
    assert store.get("ring") == b"serve"
    del client, store
    for wide in ("0.0.0.0", "::", ""):
        with pytest.raises(ValueError, match="interface|address"):
            make_store(wide, 2)


def test_gloo_timeout_then_rebuild(ray_session):
    """A rank whose neighbour never calls raises within its deadline; rebuild() recovers.
    Every actor is on this node, so rank 0's store listens on loopback only (before and after
    the rebuild)."""
    import ray
    from ringserve.actors import ActorGroup

    g = ActorGroup(2, device="cpu", num_cpus_per_worker=0.25, transport_timeout_s=60)
    try:
        old_pids = {h["pid"] for h in g.health()}
        host, port = g.store_address
        assert host == "127.0.0.1"
        assert _listening(g.health()[0]["pid"], port) == {"127.0.0.1"}
        start = time.monotonic()
        with pytest.raises(TransportTimeoutError) as e:
            ray.get(g.actors[0].ping_ring.remote(64, 2.0), timeout=60)  # rank 1 never calls
        assert time.monotonic() - start < 30
        assert e.value.peer == 1 and "rank 1" in str(e.value)
        pg = g.placement_group
        g.rebuild()
        assert ray.util.placement_group_table(pg)["state"] == "REMOVED"
        info = g.health()
        assert {h["pid"] for h in info}.isdisjoint(old_pids)  # fresh processes
        assert len(g.call("ping_ring", 1 << 16, 30.0)) == 2
        gathered = g.call("check_collectives", 30.0)
        pids = [h["pid"] for h in info]
        assert gathered == [[[0, pids[0]], [1, pids[1]]]] * 2
        host, port = g.store_address
        assert host == "127.0.0.1" and _listening(pids[0], port) == {"127.0.0.1"}
    finally:
        g.shutdown()
    assert g.actors == [] and g.placement_group is None


def test_comm_host_puts_the_store_on_that_address(ray_session):
    """An explicit comm_host (here this node's address as Ray reports it, what ranks on other
    nodes dial): the store listens there only, and the ring and collectives work over it."""
    import ray
    from ringserve.actors import ActorGroup

    ip = ray.util.get_node_ip_address()
    with pytest.raises(ValueError, match="comm_host"):
        ActorGroup(2, device="cpu", comm_host="0.0.0.0")
    g = ActorGroup(2, device="cpu", num_cpus_per_worker=0.25, transport_timeout_s=60,
                   comm_host=ip)
    try:
        host, port = g.store_address
        assert host == ip
        assert _listening(g.health()[0]["pid"], port) == {ip}
        assert len(g.call("ping_ring", 1 << 12, 30.0)) == 2
    finally:
        g.shutdown()
