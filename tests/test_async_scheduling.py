"""Async scheduling (EngineConfig / LLM `async_scheduling`): while a step runs, the next is
planned and sent with placeholders for the tokens being sampled (with several ranks, they share
each step's sampled tokens). Every output must
equal its output without it: greedy and seeded, stopped early by a stop token (a wasted row in
the step after), cancelled mid-stream, across a failed step; pages never leak. In-process
workers for the engine's logic, and a real Ray actor (the step really in flight) for the
overlap."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from threadgroup import ThreadGroup
from tinymodels import tiny_model
from ringserve.engine import Engine, EngineConfig
from ringserve.sampling import SamplingParams
from ringserve.tokenizer import Tokenizer

VOCAB_TOKENS = 200


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return tiny_model(tmp_path_factory, "llama")


def make(path, ws=1, **cfg):
    group = ThreadGroup(ws, model=str(path), kv_tokens=4096, page_size=8)
    return Engine(group, Tokenizer.from_dir(path), (), EngineConfig(**cfg))


def close(eng):
    eng.shutdown()
    eng.group.shutdown()


def requests(n=5, seed=0, max_tokens=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, VOCAB_TOKENS, (int(torch.randint(5, 40, (1,), generator=g)),),
                               generator=g).tolist()
        params = (SamplingParams(max_tokens=max_tokens + i, temperature=0, ignore_eos=True)
                  if i % 2 == 0 else
                  SamplingParams(max_tokens=max_tokens + i, temperature=0.8, top_p=0.9,
                                 seed=100 + i, ignore_eos=True, logprobs=True))
        out.append((prompt, params))
    return out


def run(eng, reqs, on_delta=None):
    hs = [eng.submit("generate", p, sp,
                     on_delta=None if on_delta is None else on_delta[i].append)
          for i, (p, sp) in enumerate(reqs)]
    return [h.result(120) for h in hs]


def no_leak(eng):
    time.sleep(0.05)
    assert not eng.sched.running and not eng.sched.waiting
    held = eng.kv.pages_of([e.kv for e in eng.doc_cache.entries()])
    assert eng.kv.free_pages() == [u - h for u, h in zip(eng.kv.usable_pages(), held)]


@pytest.mark.parametrize("ws", [1, 2, 3])
def test_outputs_equal_the_synchronous_engine_and_steps_are_planned_ahead(path, ws):
    """At 2 and 3 ranks a decode row's token is owned by one rank and sampled on another:
    every rank puts in the pending input from the tokens the ranks shared."""
    reqs = requests()
    sync = make(path, ws)
    try:
        want = run(sync, reqs)
        assert sync.stats()["steps_planned_ahead"] == 0
    finally:
        close(sync)
    eng = make(path, ws, async_scheduling=True)
    try:
        streams = [[] for _ in reqs]
        got = run(eng, reqs, streams)
        for a, b, s in zip(got, want, streams):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            # the batches differ (what runs beside whom), so float sums may differ in the
            # last bits: the tokens are the contract, the logprobs equal to rounding
            assert (a.logprobs is None) == (b.logprobs is None)
            if a.logprobs is not None:
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
            assert [d.token_id for d in s] == a.token_ids     # each token streamed once
            assert -1 not in a.token_ids
        st = eng.stats()
        # the decode steps of the batch were planned while the step before was in flight
        assert st["steps_planned_ahead"] >= 10, st
        assert st["generated_tokens"] == sum(len(o.token_ids) for o in got)
        no_leak(eng)
        # a later request reuses a finished one's cached KV (its last rows were computed by a
        # step planned ahead, with the token put in by the worker): still the same output
        p, sp = reqs[0]
        again = p + got[0].token_ids + [7, 8]
        sync = make(path, ws)
        try:
            ref = run(sync, [(again, sp)])[0]
        finally:
            close(sync)
        out = run(eng, [(again, sp)])[0]
        assert out.num_cached_tokens >= len(p) + len(got[0].token_ids) - 1
        assert out.token_ids == ref.token_ids
    finally:
        close(eng)


def test_a_stop_token_ends_the_request_at_the_same_token(path):
    """A stop token sampled by the step in flight: the step planned after it has a wasted row
    for that request, dropped; the output ends where the synchronous engine's does."""
    reqs = requests(n=3, seed=3, max_tokens=20)
    sync = make(path)
    try:
        free = run(sync, reqs)
        # stop each at the token it produces 5th (ignore_eos does not affect stop_token_ids)
        stopped = [(p, dataclasses.replace(sp, stop_token_ids=[o.token_ids[4]]))
                   for (p, sp), o in zip(reqs, free)]
        want = run(sync, stopped)
    finally:
        close(sync)
    assert all(o.finish_reason == "stop" and len(o.token_ids) <= 5 for o in want)
    eng = make(path, async_scheduling=True)
    try:
        got = run(eng, stopped)
        for a, b in zip(got, want):
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        assert eng.stats()["steps_planned_ahead"] > 0
        no_leak(eng)
    finally:
        close(eng)


@pytest.mark.parametrize("ws", [1, 2])
def test_cancel_mid_stream_and_a_failed_step(path, ws):
    """A cancelled request leaves with the tokens it streamed (a prefix of its solo output);
    a step that fails while the next is in flight costs no request: both are recomputed
    after the rebuild and the outputs equal the fault-free ones."""
    reqs = requests(n=4, seed=5, max_tokens=16)
    sync = make(path, ws)
    try:
        want = run(sync, reqs)
    finally:
        close(sync)
    eng = make(path, ws, async_scheduling=True)
    try:
        seen, handle = [], []

        def on_delta(d):   # cancelled from the 4th token's delta: no race with the engine
            seen.append(d)
            if len(seen) == 4:
                handle[0].cancel()

        handle.append(eng.submit("generate", reqs[0][0], SamplingParams(
            max_tokens=400, temperature=0, ignore_eos=True), on_delta=on_delta))
        out = handle[0].result(60)
        assert out.finish_reason == "cancelled" and 4 <= len(out.token_ids) < 400
        assert out.token_ids == [d.token_id for d in seen][:len(out.token_ids)]
        assert out.token_ids[:len(want[0].token_ids)] == \
            want[0].token_ids[:len(out.token_ids)]
        no_leak(eng)
        # in the decode phase (one rank: steps are launched, and their results read by
        # `finish`, which fails as when the actor dies with the next step already launched)
        eng.group.fail_next("finish" if ws == 1 else "execute", rank=ws - 1, after=12)
        streams = [[] for _ in reqs]
        got = run(eng, reqs, streams)
        for a, b, s in zip(got, want, streams):
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
            assert [d.token_id for d in s] == a.token_ids
        st = eng.stats()
        assert st["worker_failures"] == 1 and st["recovered_requests"] >= 1, st
        no_leak(eng)
    finally:
        close(eng)


@pytest.mark.parametrize("sampling,depth", [("greedy", 1), ("seeded", 1), ("greedy", 2),
                                            ("seeded", 3)])
def test_pipelined_steps_equal_one_call_a_step(path, sampling, depth):
    """Decode steps launched on the worker before the steps in flight are read (their pending
    input ids taken from the ids the last one drew, on the device), `depth` of them in flight:
    through the graph path (emulated on CPU), greedy and seeded, requests joining and leaving
    the batch (a row's source row moves), the same outputs as one blocking call a step, and
    every replayed step but a graph's first was pipelined; the worker held depth + 1 launched
    steps unread at once (the engine sends one, then reads the oldest); no page is left
    behind."""
    reqs = requests(n=7, seed=11, max_tokens=10)    # 7..5 rows: one graph bucket
    if sampling == "greedy":
        reqs = [(p, dataclasses.replace(sp, temperature=0.0)) for p, sp in reqs]
    outs, stats, unread = {}, {}, {}
    for pipe in (False, True):
        group = ThreadGroup(1, model=str(path), kv_tokens=4096, page_size=8,
                            cuda_graphs="emulate")
        eng = Engine(group, Tokenizer.from_dir(path), (), EngineConfig(
            async_scheduling=True, pipeline_steps=pipe, cuda_graphs=True,
            pipeline_depth=depth))
        worker, seen = group.workers[0], [0]
        launch = worker.launch

        def counted(plan, launch=launch, worker=worker, seen=seen):
            launch(plan)
            seen[0] = max(seen[0], len(worker._launched))
        worker.launch = counted
        try:
            assert eng._pipeline == pipe and eng._depth == (depth if pipe else 1)
            outs[pipe] = run(eng, reqs)
            stats[pipe] = worker.graph_stats()
            unread[pipe] = seen[0]
            no_leak(eng)
        finally:
            close(eng)
    assert unread == {False: 0, True: depth + 1}, unread
    for a, b in zip(outs[True], outs[False]):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        if a.logprobs is not None:
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert stats[False]["pipelined"] == 0
    # every replayed step but each graph's first (its capture waits for the steps before)
    st = stats[True]
    assert st["replays"] >= 10 and st["pipelined"] >= st["replays"] - st["graphs"], stats


def test_the_default_is_on_only_where_its_gpu_test_ran(monkeypatch, path):
    """LLM's async scheduling left out: on with CUDA at world size 1, no TP and the tasks
    channel; off on CPU, at several ranks, with TP and with the compiled channel (also when
    RINGSERVE_STEP_CHANNEL picks it); a value that is not a bool is refused before any actor."""
    from ringserve import LLM
    from ringserve.llm import default_async_scheduling as d

    monkeypatch.delenv("RINGSERVE_STEP_CHANNEL", raising=False)
    assert d(True, 1, 1, None) and d(True, 1, 1, "tasks")
    assert not any([d(False, 1, 1, None), d(True, 2, 1, None), d(True, 1, 2, None),
                    d(True, 1, 1, "compiled")])
    monkeypatch.setenv("RINGSERVE_STEP_CHANNEL", "compiled")
    assert not d(True, 1, 1, None) and d(True, 1, 1, "tasks")
    with pytest.raises(ValueError, match="async_scheduling must be True, False or None"):
        LLM(str(path), async_scheduling="yes")


def test_bad_settings_are_refused(path):
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling=1)
    with pytest.raises(ValueError, match="pipeline_steps"):
        EngineConfig(pipeline_steps="yes")
    for bad in (0, 5, True, 1.5):
        with pytest.raises(ValueError, match=r"pipeline_depth .* 1\.\.4"):
            EngineConfig(pipeline_depth=bad)
    with pytest.raises(ValueError, match="async_scheduling needs the 'tasks' step channel"):
        EngineConfig(async_scheduling=True, step_channel="compiled")
    group = ThreadGroup(1, model=str(path), kv_tokens=4096, page_size=8)
    group.tp_size = 2      # as an actor group with tensor parallelism says
    try:
        with pytest.raises(ValueError, match="tensor_parallel_size 1"):
            Engine(group, None, (), EngineConfig(async_scheduling=True))
    finally:
        group.shutdown()


@pytest.mark.parametrize("ws", [1, 2])
def test_llm_over_ray_keeps_a_step_in_flight(ray_session, path, ws):
    """Real Ray actors (world size 2: over gloo, the sampled tokens shared by an all-reduce):
    the next step is sent before the one in flight is read, and the outputs equal those of
    the synchronous engine. Tensor parallelism is refused before any actor starts."""
    from ringserve import LLM
    with pytest.raises(ValueError, match="async_scheduling needs tensor_parallel_size 1"):
        LLM(str(path), context_parallel_size=1, tensor_parallel_size=2, async_scheduling=True,
            num_cpus_per_worker=0.25)
    reqs = requests(n=4, seed=7)
    outs = {}
    for flag in (False, True):
        llm = LLM(str(path), world_size=ws, max_kv_tokens=2048, num_cpus_per_worker=0.5,
                  async_scheduling=flag)
        try:
            hs = [llm.submit(p, sp) for p, sp in reqs]
            outs[flag] = [h.result(120) for h in hs]
            st = llm.stats()
            assert (st["steps_planned_ahead"] > 0) == flag, st
        finally:
            llm.shutdown()
    for a, b in zip(outs[True], outs[False]):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
    if ws == 1:
        # pipelined steps through a real actor: the graph path (emulated on CPU), each decode
        # step launched before the one in flight is read; with pipeline_one_call (the
        # default) a step's launch carries the results of the one before (`advance`: one Ray
        # task a step), without it each step is two (`launch`, `finish`)
        for one_call in (True, False):
            llm = LLM(str(path), world_size=1, max_kv_tokens=2048, num_cpus_per_worker=0.5,
                      async_scheduling=True, cuda_graphs="emulate")
            llm._engine.config.pipeline_one_call = one_call
            try:
                got = [h.result(120) for h in [llm.submit(p, sp) for p, sp in reqs]]
                st = llm._group.call("graph_stats")[0]
                steps = llm.stats()["steps"]
            finally:
                llm.shutdown()
            for a, b in zip(got, outs[False]):
                assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
            assert st["pipelined"] >= st["replays"] - st["graphs"] > 0, st
            if one_call:   # most steps came by advance (each carried an older step's results)
                assert st["advances"] >= st["pipelined"] // 2, (st, steps)
            else:
                assert st["advances"] == 0, st


class OrderedGroup(ThreadGroup):
    """ThreadGroup with ActorGroup's submit_per_rank / collect: each call runs when submitted,
    in order (as Ray runs one caller's tasks to an actor), its result or error kept for
    collect (as a Ray ref holds a remote error until it is read)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent = []

    def submit_per_rank(self, method, args_list):
        self.sent.append(method)
        try:
            return ("ok", self.call_per_rank(method, args_list))
        except Exception as e:  # noqa: BLE001 - re-raised by collect
            return ("err", e)

    def collect(self, refs, timeout_s=None):
        kind, val = refs
        if kind == "err":
            raise val
        return val


@pytest.mark.parametrize("depth", [1, 2])
def test_one_call_a_pipelined_step_through_submitted_calls(path, depth):
    """With a group that submits (Ray actors), each pipelined step after the first is one
    call, `advance`, carrying the oldest unread step's results; a step read before a later one
    was sent asks with `finish`. Outputs equal the synchronous engine's, with depth 1 and 2,
    and after an `advance` that fails mid-stream (the group rebuilt, requests recomputed); no
    page is left behind."""
    reqs = requests(n=6, seed=5, max_tokens=12)
    sync = make(path)
    try:
        want = run(sync, reqs)
    finally:
        close(sync)
    for fail in (False, True):
        group = OrderedGroup(1, model=str(path), kv_tokens=4096, page_size=8,
                             cuda_graphs="emulate")
        eng = Engine(group, Tokenizer.from_dir(path), (), EngineConfig(
            async_scheduling=True, cuda_graphs=True, pipeline_depth=depth))
        if fail:
            group.fail_next("advance", 0, after=4)
        try:
            assert eng._pipeline and eng.config.pipeline_one_call
            got = run(eng, reqs)
            no_leak(eng)
            assert group.rebuilds == (1 if fail else 0)
        finally:
            close(eng)
        for a, b in zip(got, want):
            assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
            if a.logprobs is not None:
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        n = {m: group.sent.count(m) for m in ("launch", "advance", "finish", "execute")}
        assert n["execute"] == 0 and n["advance"] >= 10, n
        if not fail:   # every launched step is read once: by a later advance or its own finish
            assert n["launch"] + n["advance"] == n["advance"] + n["finish"], n
