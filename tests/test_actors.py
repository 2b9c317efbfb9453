"""Distributed attention over real Ray actors joined by gloo, against the float64 reference.

One ActorGroup per world size for the whole module (actor start is slow on small machines).
"""
from __future__ import annotations

import pytest
import torch

from ringserve.kernels.reference import attention_ref
from ringserve.parallel import distributed_attention

pytestmark = pytest.mark.timeout(600)

CPUS = 0.25  # the session cluster is shared by every test file


@pytest.fixture(scope="module")
def groups(ray_session):
    from ringserve.actors import ActorGroup

    made = {}

    def get(n):
        if n not in made:
            made[n] = ActorGroup(n, device="cpu", num_cpus_per_worker=CPUS,
                                 transport_timeout_s=60)
        return made[n]

    yield get
    for g in made.values():
        g.shutdown()


def rand_qkv(seed, total, hq=4, hkv=2, d=16, b=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, total, hq, d, generator=g),
            torch.randn(b, total, hkv, d, generator=g),
            torch.randn(b, total, hkv, d, generator=g))


def check(out, lse, q, k, v, causal, window, scale=None):
    ref_out, ref_lse = attention_ref(q, k, v, scale, causal, window)
    rel = ((out.double() - ref_out).norm() / ref_out.norm()).item()
    assert rel <= 1e-5, rel
    assert torch.isfinite(lse).all()
    lse_rel = ((lse.double() - ref_lse.double()).abs() / ref_lse.double().abs().clamp_min(1.0))
    assert lse_rel.max().item() <= 1e-5


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("schedule", ["ring", "striped"])
@pytest.mark.parametrize("causal", [True, False])
def test_exact_gqa(groups, n, schedule, causal):
    total = 1027  # not divisible by 2, 3 or 4
    q, k, v = rand_qkv(100 * n + 10 * causal + (schedule == "ring"), total)
    out, lse, stats = distributed_attention(q, k, v, group=groups(n), layout=schedule,
                                            causal=causal, return_stats=True)
    assert out.shape == q.shape and lse.shape == (1, 4, total)
    check(out, lse, q, k, v, causal, None)
    assert [s["world_size"] for s in stats] == [n] * n


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("schedule", ["ring", "striped"])
def test_exact_window(groups, n, schedule):
    total, window = 1000, 150
    q, k, v = rand_qkv(7 * n + (schedule == "ring"), total, hq=6, hkv=3, b=2)
    out, lse, stats = distributed_attention(q, k, v, group=groups(n), layout=schedule,
                                            causal=True, window_size=window, return_stats=True)
    check(out, lse, q, k, v, True, window)
    if schedule == "ring" and n == 4:  # 250 tokens a rank: the window reaches one neighbour
        assert all(s["steps_run"] == 2 for s in stats)


def test_exact_noncausal_window_mha_scale(groups):
    q, k, v = rand_qkv(5, 1000, hq=2, hkv=2, d=32)
    out, lse = distributed_attention(q, k, v, group=groups(3), layout="striped", causal=False,
                                     window_size=40, softmax_scale=0.05)
    check(out, lse, q, k, v, False, 40, 0.05)


def test_skipped_steps_between_actors(groups):
    q, k, v = rand_qkv(9, 1027)
    g = groups(4)
    _, _, ring = distributed_attention(q, k, v, group=g, layout="ring", return_stats=True)
    # contiguous causal: rank r computes r + 1 of the 4 blocks; the last rank never sends
    assert [s["steps_computed"] for s in ring] == [1, 2, 3, 4]
    assert [s["steps_skipped"] for s in ring] == [3, 2, 1, 0]
    assert ring[3]["bytes_sent"] == 0
    _, _, striped = distributed_attention(q, k, v, group=g, layout="striped",
                                          return_stats=True)
    assert all(s["steps_computed"] == 4 for s in striped)
    _, _, win = distributed_attention(q, k, v, group=g, layout="ring", window_size=100,
                                      return_stats=True)
    assert all(s["steps_run"] == 2 for s in win)  # the ring stopped after the neighbour
    assert sum(s["bytes_sent"] for s in win) < sum(s["bytes_sent"] for s in ring)


def test_health_and_ping(groups):
    g = groups(3)
    info = g.health()
    assert [h["rank"] for h in info] == [0, 1, 2]
    assert all(h["transport"] == "GlooTransport" and h["world_size"] == 3 for h in info)
    assert len({h["pid"] for h in info}) == 3  # one process per rank
    assert all(h["memory"]["rss"] > 0 for h in info)
    times = g.call("ping_ring", 4096)
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_group_config_errors():
    from ringserve.actors import GroupConfig

    with pytest.raises(ValueError, match=r"world_size \(0\)"):
        GroupConfig(0)
    with pytest.raises(ValueError, match="placement_strategy"):
        GroupConfig(2, placement_strategy="NEAR")


def test_missing_resources_fail_fast(ray_session):
    from ringserve.actors import ActorGroup, GroupSetupError

    # the CPU test cluster has no GPU: the placement group can never be placed
    with pytest.raises(GroupSetupError, match="not ready within 2 s"):
        ActorGroup(2, device="cuda", num_cpus_per_worker=CPUS, placement_timeout_s=2)
