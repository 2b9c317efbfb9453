"""Transports: deadlines on every wait, collectives, and recovery by rebuilding the group."""
from __future__ import annotations

import time

import pytest
import torch

from ringserve.parallel.transport import (ThreadHub, TransportSpec, TransportTimeoutError,
                                          nccl_unique_id)

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


def test_gloo_timeout_then_rebuild(ray_session):
    """A rank whose neighbour never calls raises within its deadline; rebuild() recovers."""
    import ray
    from ringserve.actors import ActorGroup

    g = ActorGroup(2, device="cpu", num_cpus_per_worker=0.25, transport_timeout_s=60)
    try:
        old_pids = {h["pid"] for h in g.health()}
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
    finally:
        g.shutdown()
    assert g.actors == [] and g.placement_group is None
