"""Ring schedules in one process (ranks as threads over ThreadTransport) against the float64
reference, plus the skip plan checked against the brute-force mask."""
from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ringserve.kernels.reference import attention_ref, visible_mask
from ringserve.parallel import layout
from ringserve.parallel.ring import (RingStats, block_visible, plan_ring, ring_attention)
from ringserve.parallel.transport import ThreadHub


def run_threads(q, k, v, n, schedule, causal, window, timeout_s=60.0, **kw):
    """kw: more ring_attention arguments (expand)."""
    total = q.shape[1]
    qs, ks, vs = (layout.split(x, n, schedule) for x in (q, k, v))
    hub = ThreadHub(n)
    results, errors = [None] * n, []

    def rank_main(r):
        try:
            stats = RingStats()
            # v passed as k stays k (MLA's latents: only they travel)
            out, lse = ring_attention(qs[r], ks[r], ks[r] if v is k else vs[r], total, schedule,
                                      hub.transport(r, timeout_s), causal, window, stats=stats,
                                      **kw)
            results[r] = (out, lse, stats)
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if errors:
        raise errors[0]
    out = layout.gather([r[0] for r in results], schedule, dim=1)
    lse = layout.gather([r[1] for r in results], schedule, dim=2)
    return out, lse, [r[2] for r in results]


def assert_exact(out, lse, q, k, v, causal, window, tol=1e-5):
    ref_out, ref_lse = attention_ref(q, k, v, None, causal, window)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    rel = ((out.double() - ref_out).norm() / ref_out.norm().clamp_min(1e-30)).item()
    assert rel <= tol, rel
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # fully masked rows stay -inf
    err = ((lse[finite].double() - ref_lse[finite].double()).abs()
           / ref_lse[finite].double().abs().clamp_min(1.0)).max().item() if finite.any() else 0.0
    assert err <= tol, err


def rand_qkv(seed, total, hq=4, hkv=2, d=16, b=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, total, hq, d, generator=g, dtype=dtype),
            torch.randn(b, total, hkv, d, generator=g, dtype=dtype),
            torch.randn(b, total, hkv, d, generator=g, dtype=dtype))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("schedule", ["ring", "striped"])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 7), (False, 9)])
def test_threads_exact(n, schedule, causal, window):
    total = 61 + n  # not divisible by n
    q, k, v = rand_qkv(1000 * n + 10 * (window or 0) + causal, total)
    out, lse, _ = run_threads(q, k, v, n, schedule, causal, window)
    assert_exact(out, lse, q, k, v, causal, window)


@pytest.mark.parametrize("total,n,schedule", [(41, 3, "striped"), (29, 2, "ring"), (2, 4, "ring"),
                                              (0, 2, "striped")])
def test_threads_expand_latents(total, n, schedule):
    """MLA's expanded form over the ring: only the latents (B, S, 1, C) travel, and each rank
    expands every block it attends to per-head K (D) and V (Dv < D) with `expand`: equal to
    attention over the expanded K, V of the whole sequence, the messages latent-sized; ranks
    that own no token return an empty output of the values' width."""
    g = torch.Generator().manual_seed(total * 10 + n)
    H, C, D, Dv = 4, 12, 10, 6
    lat = torch.randn(1, total, 1, C, generator=g)
    wk, wv = torch.randn(C, H * D, generator=g) / 3, torch.randn(C, H * Dv, generator=g) / 3
    q = torch.randn(1, total, H, D, generator=g)

    def expand(x):          # (m, 1, C) -> (m, H, D), (m, H, Dv)
        m = x.shape[0]
        return (x.reshape(m, C) @ wk).view(m, H, D), (x.reshape(m, C) @ wv).view(m, H, Dv)

    # the gathered output has the values' width only if every rank's has, empty ones too
    out, lse, stats = run_threads(q, lat, lat, n, schedule, True, None, expand=expand)
    assert out.shape == (1, total, H, Dv)
    for st in stats:
        assert st.bytes_sent % (C * 4) == 0 and st.bytes_sent <= total * C * 4 * n
    if total:
        k, v = expand(lat[0])
        assert_exact(out, lse, q, k[None], v[None], True, None)
        with pytest.raises(ValueError, match="needs v to be k"):
            ring_attention(q, lat, lat.clone(), total, schedule,
                           ThreadHub(1).transport(0, 1.0), expand=expand)


@pytest.mark.parametrize("total", [0, 1, 2, 3])
def test_threads_fewer_tokens_than_ranks(total):
    # some ranks own no token at all: they still take part (and forward) without computing
    q, k, v = rand_qkv(7 + total, total, hq=2, hkv=1, b=2)
    for schedule in ("ring", "striped"):
        out, lse, stats = run_threads(q, k, v, 4, schedule, True, None)
        assert out.shape == q.shape and lse.shape == (2, 2, total)
        if total:
            assert_exact(out, lse, q, k, v, True, None)
        # one token per busy rank; token t sees tokens 0..t: t + 1 blocks
        assert sum(s.steps_computed for s in stats) == total * (total + 1) // 2


def test_threads_mqa_batch_and_scale():
    q, k, v = rand_qkv(3, 50, hq=6, hkv=1, d=8, b=3)
    qs, ks, vs = (layout.split(x, 3, "striped") for x in (q, k, v))
    hub = ThreadHub(3)
    res = [None] * 3

    def rank_main(r):
        res[r] = ring_attention(qs[r], ks[r], vs[r], 50, "striped", hub.transport(r, 30), True,
                                None, softmax_scale=0.3)

    ts = [threading.Thread(target=rank_main, args=(r,)) for r in range(3)]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    out = layout.gather([r[0] for r in res], "striped", 1)
    ref, _ = attention_ref(q, k, v, 0.3, True, None)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_ring_causal_skips_and_never_wraps():
    n, total = 4, 103
    q, k, v = rand_qkv(11, total)
    out, lse, stats = run_threads(q, k, v, n, "ring", True, None)
    assert_exact(out, lse, q, k, v, True, None)
    # contiguous causal: rank r sees ranks 0..r only, so it computes r + 1 blocks of n
    assert [s.steps_computed for s in stats] == [1, 2, 3, 4]
    assert [s.steps_skipped for s in stats] == [3, 2, 1, 0]
    # the last rank's K/V are needed by nobody else: it never sends (no wrap-around)
    assert stats[n - 1].bytes_sent == 0 and stats[0].bytes_received == 0
    _, _, full = run_threads(q, k, v, n, "ring", False, None)
    assert all(s.steps_computed == n for s in full)
    assert sum(s.bytes_sent for s in stats) < sum(s.bytes_sent for s in full)


def test_window_stops_the_ring_early():
    n, total, w = 4, 120, 10  # 30 tokens per rank: a window of 10 only reaches the neighbour
    q, k, v = rand_qkv(12, total)
    out, lse, stats = run_threads(q, k, v, n, "ring", True, w)
    assert_exact(out, lse, q, k, v, True, w)
    assert all(s.steps_run == 2 for s in stats)
    assert [s.steps_computed for s in stats] == [1, 2, 2, 2]
    _, _, no_window = run_threads(q, k, v, n, "ring", True, None)
    assert sum(s.bytes_sent for s in stats) < sum(s.bytes_sent for s in no_window)
    # only the Hkv heads travel: each message is K and V of one shard, nothing more
    elem = q.element_size()
    assert stats[0].bytes_sent == 2 * 30 * k.shape[2] * k.shape[3] * elem


def test_striped_causal_is_balanced():
    n, total = 4, 203
    q, k, v = rand_qkv(13, total)
    _, _, stats = run_threads(q, k, v, n, "striped", True, None)
    assert all(s.steps_computed == n for s in stats)  # no rank idles: work within a row
    plan = plan_ring(total, n, 0, "striped", True, 3)  # tiny window: only close stripes
    assert len(plan.steps) == n  # every stripe is within 3 tokens of some other's


@settings(max_examples=150, deadline=None)
@given(total=st.integers(0, 40), n=st.integers(1, 5), schedule=st.sampled_from(layout.SCHEDULES),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(0, 12)))
def test_block_visible_matches_mask(total, n, schedule, causal, window):
    shards = layout.shards(total, n, schedule)
    for a in shards:
        for b in shards:
            m = visible_mask(a.positions(), b.positions(), causal, window)
            assert block_visible(a, b, causal, window) == bool(m.any()), (a, b)


@settings(max_examples=60, deadline=None)
@given(total=st.integers(0, 40), n=st.integers(1, 5), schedule=st.sampled_from(layout.SCHEDULES),
       causal=st.booleans(), window=st.one_of(st.none(), st.integers(0, 12)))
def test_plan_sends_match_receives(total, n, schedule, causal, window):
    plans = [plan_ring(total, n, r, schedule, causal, window) for r in range(n)]
    assert len({len(p.steps) for p in plans}) == 1
    for r, p in enumerate(plans):
        nxt = plans[(r + 1) % n]
        for s, step in enumerate(p.steps):
            # what r sends at step s is exactly what r + 1 receives at step s
            assert step.send == nxt.steps[s].recv and step.send_len == nxt.steps[s].recv_len
            # a block r must compute is one it holds
            if step.compute:
                assert s == 0 or p.steps[s - 1].recv
