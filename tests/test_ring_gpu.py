"""Ring attention over NCCL (cupy) between two GPUs, in bf16, against one-GPU attention.

Error rule (flash-attention's): the distributed bf16 result's error against a float64 reference
is at most twice the error of a plain PyTorch bf16 computation, plus a small floor.
Ranks run as torch.multiprocessing processes (Ray is optional on GPU hosts); a second test uses
an ActorGroup of Ray GPU actors when Ray is importable.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

pytestmark = [pytest.mark.multigpu, pytest.mark.timeout(600)]

CASES = [  # (total, Hq, Hkv, D, schedule, causal, window)
    (4099, 8, 2, 128, "striped", True, None),
    (4099, 8, 2, 128, "ring", True, None),
    (3001, 4, 4, 64, "striped", False, None),
    (5003, 8, 1, 128, "ring", True, 700),
]


def make_inputs(seed, total, hq, hkv, d, device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(torch.randn(1, total, h, d, generator=g).to(device, torch.bfloat16)
                 for h in (hq, hkv, hkv))


def _rank_main(rank, world, uid, results):
    """One process per GPU: every case through NcclTransport; results to the parent's dict."""
    torch.cuda.set_device(rank)
    from ringserve.parallel import layout
    from ringserve.parallel.ring import RingStats, ring_attention
    from ringserve.parallel.transport import NcclTransport, TransportTimeoutError

    dev = torch.device("cuda", rank)
    t = NcclTransport(rank, world, uid, dev, timeout_s=60)
    try:
        for i, (total, hq, hkv, d, schedule, causal, window) in enumerate(CASES):
            q, k, v = make_inputs(i, total, hq, hkv, d, dev)
            qs, ks, vs = (layout.split(x, world, schedule)[rank].contiguous() for x in (q, k, v))
            st = RingStats()
            out, lse = ring_attention(qs, ks, vs, total, schedule, t, causal, window, stats=st)
            torch.cuda.synchronize()
            results[(i, rank)] = (out.cpu(), lse.cpu(), st.as_dict())
        # collectives and a deadline: rank 1 answers late, rank 0 times out, then completes
        got = t.all_gather(torch.tensor([rank * 3.0 + 1], device=dev))
        results[("gather", rank)] = [x.item() for x in got]
        # stream-ordered form: the host does not wait; a kernel queued after it sees the data
        x = torch.full((1 << 16,), rank + 5.0, device=dev)
        parts = t.all_gather(x * 2, blocking=False)
        total = parts[0] + parts[1]
        t.synchronize(60.0)
        results[("gather_async", rank)] = total.mean().item()
        send = torch.full((1 << 20,), rank + 1, dtype=torch.bfloat16, device=dev)
        recv = torch.zeros_like(send)
        if rank == 1:
            time.sleep(3.0)
        h = t.send_recv(send, recv)
        if rank == 0:
            t0 = time.monotonic()
            try:
                h.wait(1.0)
                results[("timeout", 0)] = "no timeout"
            except TransportTimeoutError as e:
                results[("timeout", 0)] = (e.peer, time.monotonic() - t0)
        h.wait(60.0)  # the late peer did post: the same operation completes
        torch.cuda.synchronize()
        results[("late", rank)] = recv.float().mean().item()
    finally:
        t.close()


def plain_bf16(q, k, v, causal, window):
    """Attention written plainly in bf16 (the same dtype): the error yardstick."""
    from ringserve.kernels.reference import visible_mask

    g = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(q.shape[-1])
    pos = torch.arange(q.shape[1], device=q.device)
    s = s.masked_fill(~visible_mask(pos, pos, causal, window), float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), vv)


def test_nccl_ring_bf16_matches_one_gpu():
    import torch.multiprocessing as mp
    from ringserve import kernels
    from ringserve.kernels.reference import attention_ref
    from ringserve.parallel import layout
    from ringserve.parallel.transport import nccl_unique_id

    world = 2
    uid = nccl_unique_id()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_rank_main, args=(r, world, uid, results))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(400)
        codes = [p.exitcode for p in procs]
        results = dict(results)
    assert codes == [0, 0], codes

    dev = torch.device("cuda", 0)
    for i, (total, hq, hkv, d, schedule, causal, window) in enumerate(CASES):
        q, k, v = make_inputs(i, total, hq, hkv, d, dev)
        out = layout.gather([results[(i, r)][0] for r in range(world)], schedule, 1).to(dev)
        lse = layout.gather([results[(i, r)][1] for r in range(world)], schedule, 2).to(dev)
        ref_out, ref_lse = attention_ref(q, k, v, None, causal, window)
        one_out, one_lse = kernels.attention(q, k, v, None, causal, window)
        plain = plain_bf16(q, k, v, causal, window)
        err = lambda x: (x.double() - ref_out).abs().max().item()  # noqa: E731
        e_ring, e_one, e_plain = err(out), err(one_out), err(plain)
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        assert e_ring <= 2 * e_plain + 1e-3, (i, e_ring, e_plain, e_one)
        assert (lse - ref_lse).abs().max().item() <= 2e-2, i
        assert (lse - one_lse).abs().max().item() <= 2e-2, i
        stats = [results[(i, r)][2] for r in range(world)]
        if schedule == "ring" and causal and window is None:
            assert [s["steps_computed"] for s in stats] == [1, 2]
            assert stats[1]["bytes_sent"] == 0  # the last rank's K/V go nowhere
            # only Hkv heads travel: one packed K+V message of rank 0's shard
            assert stats[0]["bytes_sent"] == 2 * ((total + 1) // 2) * hkv * d * 2
    assert results[("gather", 0)] == results[("gather", 1)] == [1.0, 4.0]
    assert results[("gather_async", 0)] == results[("gather_async", 1)] == 22.0  # 2*5 + 2*6
    peer, waited = results[("timeout", 0)]
    assert peer == 1 and 0.9 <= waited < 2.5
    assert results[("late", 0)] == 2.0 and results[("late", 1)] == 1.0


def test_actor_group_nccl_exact():
    ray = pytest.importorskip("ray")
    from ringserve.actors import ActorGroup
    from ringserve.kernels.reference import attention_ref
    from ringserve.parallel import distributed_attention

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        g = ActorGroup(2, device="cuda", transport_timeout_s=120, placement_timeout_s=120)
        try:
            info = g.health()
            assert all(h["transport"] == "NcclTransport" for h in info)
            assert all(h["memory"]["total"] > 0 for h in info)
            for schedule in ("striped", "ring"):
                q, k, v = make_inputs(17, 3001, 8, 2, 128, "cpu")
                out, lse = distributed_attention(q, k, v, group=g, layout=schedule)
                ref_out, ref_lse = attention_ref(q, k, v, None, True, None)
                plain = plain_bf16(q.cuda(), k.cuda(), v.cuda(), True, None).cpu()
                e_ring = (out.double() - ref_out).abs().max().item()
                e_plain = (plain.double() - ref_out).abs().max().item()
                assert e_ring <= 2 * e_plain + 1e-3, (schedule, e_ring, e_plain)
                assert (lse - ref_lse).abs().max().item() <= 2e-2
            before = g.health()[0]["memory"]
            g.call("shutdown")
            after = g.health()[0]["memory"]
            assert after["reserved"] <= before["reserved"]
        finally:
            g.shutdown()
    finally:
        if started:
            ray.shutdown()
