"""Continuous batching (ringserve.engine + ringserve.scheduler) on in-process workers: every
request's output equals its output run alone, whatever else runs beside it.

Arrivals are tied to engine steps (a request arrives after step k), so a hypothesis example is
reproducible. Mixes: long prompts chunked over many steps while others decode, questions on a
shared cached document (cascade decode), greedy and seeded sampled requests, and a KV budget
small enough to force preemption (the newest running request is freed and recomputed).
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadgroup import ThreadGroup
from tinymodels import tiny_model
from ringserve.engine import Engine, EngineConfig
from ringserve.errors import RequestCancelledError, RequestTimeoutError
from ringserve.sampling import SamplingParams
from ringserve.tokenizer import Tokenizer

VOCAB_TOKENS = 200     # token ids drawn below this (the tiny vocabularies are larger)
_MODEL = {}


def model_path(tmp_path_factory):
    if "path" not in _MODEL:
        _MODEL["path"] = tiny_model(tmp_path_factory, "llama")
    return _MODEL["path"]


def make(path, ws, layout, kv_tokens=4096, **cfg):
    group = ThreadGroup(ws, model=str(path), kv_tokens=kv_tokens, page_size=8)
    tok = Tokenizer.from_dir(path)
    return Engine(group, tok, (), EngineConfig(layout=layout, **cfg))


def close(eng):
    eng.shutdown()
    eng.group.shutdown()


class Solo:
    """Each request's output run alone (one at a time, nothing cached), memoised."""

    def __init__(self, path, ws, layout):
        self.eng = make(path, ws, layout, document_cache_tokens=0,
                        max_num_batched_tokens=4096)
        self.memo = {}

    def __call__(self, prompt, params):
        key = (tuple(prompt), repr(params))
        if key not in self.memo:
            out = self.eng.submit("generate", prompt, params).result(120)
            self.memo[key] = (out.token_ids, out.finish_reason)
        return self.memo[key]


_SOLO = {}


def solo_for(path, ws, layout):
    if (ws, layout) not in _SOLO:
        _SOLO[(ws, layout)] = Solo(path, ws, layout)
    return _SOLO[(ws, layout)]


@pytest.fixture(scope="module", autouse=True)
def _close_solo():
    yield
    for s in _SOLO.values():
        close(s.eng)
    _SOLO.clear()


def run_with_arrivals(eng, arrivals):
    """arrivals: [(step, prompt, params)]; each is submitted once the engine has run `step`
    steps. Returns the handles in the order given."""
    handles = [None] * len(arrivals)
    lock = threading.Lock()
    steps = [0]
    real = eng._update

    def submit_due():
        for i, (k, prompt, params) in enumerate(arrivals):
            if handles[i] is None and k <= steps[0]:
                handles[i] = eng.submit("generate", prompt, params)

    def update(step, results):
        real(step, results)
        with lock:
            steps[0] += 1
            submit_due()

    eng._update = update
    with lock:
        submit_due()
    t0 = time.time()
    while any(h is None for h in handles):    # the engine idles before a late arrival: nudge
        time.sleep(0.01)
        with lock:
            if not eng.sched.running and not eng.sched.waiting and eng._inbox.empty():
                steps[0] = max(k for k, _, _ in arrivals)
                submit_due()
        assert time.time() - t0 < 120
    return handles


DOC = list(range(3, 3 + 70))   # a 70-token shared document prefix


@st.composite
def mixes(draw):
    n = draw(st.integers(2, 6))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["doc", "short", "long"]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 10 ** 6)))
        if kind == "doc":
            prompt = DOC + torch.randint(0, VOCAB_TOKENS, (draw(st.integers(1, 12)),),
                                         generator=g).tolist()
        else:
            length = draw(st.integers(3, 30) if kind == "short" else st.integers(60, 140))
            prompt = torch.randint(0, VOCAB_TOKENS, (length,), generator=g).tolist()
        if draw(st.booleans()):
            params = SamplingParams(max_tokens=draw(st.integers(1, 10)), temperature=0,
                                    ignore_eos=True)
        else:
            params = SamplingParams(max_tokens=draw(st.integers(1, 10)), temperature=0.9,
                                    top_p=0.95, seed=draw(st.integers(0, 1000)),
                                    ignore_eos=True)
        out.append((draw(st.integers(0, 6)), prompt, params))
    return out


@pytest.mark.parametrize("ws,layout", [(1, "striped"), (2, "striped"), (2, "ring"),
                                       (3, "striped"), (3, "ring")])
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(mix=mixes(), small_kv=st.booleans(), interleave=st.sampled_from([0, 0, 1, 2]),
       async_sched=st.booleans())
def test_every_request_equals_its_solo_run(tmp_path_factory, ws, layout, mix, small_kv,
                                           interleave, async_sched):
    """Random arrival times and mixes (documents, short and long prompts, greedy and seeded),
    with and without preemption, interleaved prefill and async scheduling: each output equals
    its solo run."""
    path = model_path(tmp_path_factory)
    solo = solo_for(path, ws, layout)
    # small budget: 3 ranks x 72 tokens can not hold every request at once -> preemption
    kv = 72 * 3 // ws if small_kv else 4096
    eng = make(path, ws, layout, kv_tokens=kv, max_num_batched_tokens=24, passq_max_tokens=6,
               max_num_seqs=4, interleave_decode_steps=interleave,
               async_scheduling=async_sched)
    try:
        handles = run_with_arrivals(eng, mix)
        for h, (_, prompt, params) in zip(handles, mix):
            out = h.result(120)
            assert (out.token_ids, out.finish_reason) == solo(prompt, params)
        s = eng.stats()
        assert s["requests_failed"] == 0
        if small_kv:
            assert s["kv_tokens_free"] >= 0
    finally:
        close(eng)


def test_preemption_recomputes_with_the_same_output(tmp_path_factory):
    """Four long requests in a cache that holds about two: the newest are preempted (their KV
    freed) and recomputed later from prompt + the tokens they had produced; every output equals
    the solo run and no page leaks."""
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 2, "striped")
    g = torch.Generator().manual_seed(5)
    reqs = [(torch.randint(0, VOCAB_TOKENS, (40,), generator=g).tolist(),
             SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)) for _ in range(4)]
    eng = make(path, 2, "striped", kv_tokens=80, max_num_batched_tokens=64)
    try:
        hs = [eng.submit("generate", p, sp) for p, sp in reqs]
        for h, (p, sp) in zip(hs, reqs):
            assert (h.result(120).token_ids, "length") == solo(p, sp)
        assert eng.stats()["preemptions"] > 0
        assert sum(eng.kv.free_pages()) + sum(
            len(set(pp)) for e in eng.doc_cache.entries() for pp in e.kv.pages) >= 0
    finally:
        close(eng)


@pytest.mark.parametrize("ws", [1, 2])
def test_shared_document_decodes_as_one_cascade(tmp_path_factory, monkeypatch, ws):
    """Eight questions on one cached document: the decode steps group them (the document's
    pages read once per rank), and each answer equals its solo run. On one rank the two
    attention parts merge in one call straight into the step's output."""
    from ringserve.parallel import step_attention as sa
    fused = []
    real_into = sa.StepAttention._cascade_into

    def into(self, *a, **k):
        fused.append(1)
        return real_into(self, *a, **k)

    monkeypatch.setattr(sa.StepAttention, "_cascade_into", into)
    path = model_path(tmp_path_factory)
    solo = solo_for(path, ws, "striped")
    eng = make(path, ws, "striped")
    groups = []
    real = eng._execute

    def spy(step):
        out = real(step)
        groups.append(max(len(p.groups) for p in step.plans))
        for r, p in enumerate(step.plans):
            tabs = eng.group.workers[r]._tables
            for g, (key, k) in enumerate(p.groups):
                members = [s.seq for s in p.seqs if s.group == g]
                # the document's full pages of 8 on this rank (its tokens split over ws)
                assert len(members) >= 2 and 1 <= k <= len(DOC) // ws // 8 + 1
                assert all(torch.equal(tabs[m][:k], tabs[key][:k]) for m in members)
        return out

    eng._execute = spy
    try:
        eng.submit("cache_document", DOC).result(60)
        g = torch.Generator().manual_seed(9)
        reqs = [(DOC + torch.randint(0, VOCAB_TOKENS, (5,), generator=g).tolist(),
                 SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
                for _ in range(8)]
        hs = [eng.submit("generate", p, sp) for p, sp in reqs]
        for h, (p, sp) in zip(hs, reqs):
            out = h.result(60)
            assert out.num_cached_tokens == len(DOC)
            assert (out.token_ids, out.finish_reason) == solo(p, sp)
        assert max(groups) >= 1
        assert bool(fused) == (ws == 1)
    finally:
        close(eng)


def test_cancel_and_deadline_leave_the_batch_and_free_their_kv(tmp_path_factory):
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 2, "ring")
    eng = make(path, 2, "ring", max_num_batched_tokens=16)
    g = torch.Generator().manual_seed(2)
    p = [torch.randint(0, VOCAB_TOKENS, (30,), generator=g).tolist() for _ in range(4)]
    long_params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    short = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    try:
        got = []
        h_cancel = eng.submit("generate", p[0], long_params, on_delta=got.append)
        h_deadline = eng.submit("generate", p[1], SamplingParams(
            max_tokens=4000, temperature=0, ignore_eos=True), timeout_s=0.8)
        h_a = eng.submit("generate", p[2], short)
        h_b = eng.submit("generate", p[3], short)
        while len(got) < 3:
            time.sleep(0.005)
        h_cancel.cancel()
        out = h_cancel.result(60)
        assert out.finish_reason == "cancelled" and 3 <= len(out.token_ids) < 200
        with pytest.raises(RequestTimeoutError):
            h_deadline.result(60)
        for h, pr in ((h_a, p[2]), (h_b, p[3])):
            assert (h.result(60).token_ids, "length") == solo(pr, short)
        # a request cancelled while it waits never runs
        blocker = eng.submit("generate", p[0], SamplingParams(max_tokens=40, temperature=0))
        h = eng.submit("cache_document", list(range(5, 300)))
        h.cancel()
        with pytest.raises(RequestCancelledError):
            h.result(60)
        blocker.result(60)
        time.sleep(0.05)
        assert not eng.sched.running and not eng.sched.waiting
        s = eng.stats()
        assert s["requests_cancelled"] >= 2 and s["requests_failed"] == 1
        held = eng.kv.pages_of([e.kv for e in eng.doc_cache.entries()])
        assert eng.kv.free_pages() == [u - h for u, h in zip(eng.kv.usable_pages(), held)]
    finally:
        close(eng)


def test_a_failed_step_costs_no_request(tmp_path_factory, caplog):
    """A rank fails mid-batch (as a killed actor does): the group is rebuilt, every in-flight
    request recomputes its KV from prompt + the tokens already streamed and completes with
    its fault-free output; the streams see each token once; later requests succeed. The
    cause is logged and kept in the stats (an operator sees why)."""
    import logging
    caplog.set_level(logging.WARNING, logger="ringserve.engine")
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 3, "striped")
    eng = make(path, 3, "striped", max_num_batched_tokens=16)
    g = torch.Generator().manual_seed(4)
    reqs = [(torch.randint(0, VOCAB_TOKENS, (n,), generator=g).tolist(),
             SamplingParams(max_tokens=15, temperature=0.7, seed=i, ignore_eos=True))
            for i, n in enumerate((20, 45, 33, 60))]
    try:
        eng.group.fail_next("execute", rank=1, after=9)       # mid-prefill and mid-decode
        streams = [[] for _ in reqs]
        hs = [eng.submit("generate", p, sp, on_delta=streams[i].append)
              for i, (p, sp) in enumerate(reqs)]
        for h, s, (p, sp) in zip(hs, streams, reqs):
            out = h.result(120)
            assert (out.token_ids, out.finish_reason) == solo(p, sp)
            assert [d.token_id for d in s] == out.token_ids       # nothing streamed twice
        assert eng.group.rebuilds == 1
        st_ = eng.stats()
        assert st_["worker_failures"] == 1 and st_["recovered_requests"] >= 1
        assert st_["requests_failed"] == 0
        assert "injected failure of rank 1 in execute" in st_["last_worker_failure"]
        assert any("a step failed on the actor group" in r.getMessage()
                   and "injected failure of rank 1" in r.getMessage() for r in caplog.records)
        p, sp = reqs[0]
        assert eng.submit("generate", p, sp).result(60).token_ids == solo(p, sp)[0]
    finally:
        close(eng)


def test_a_request_that_keeps_failing_the_group_fails_alone(tmp_path_factory):
    path = model_path(tmp_path_factory)
    eng = make(path, 2, "striped", max_recoveries=1)
    try:
        from ringserve.errors import WorkerFailedError
        eng.group.fail_next("execute", rank=0, after=1)
        fails = []

        def again(_delta):       # after the first recovery, the step after each token fails
            if not fails or eng.group._fail is None:
                fails.append(1)
                eng.group.fail_next("execute", rank=0, after=0)

        h = eng.submit("generate", list(range(3, 40)), SamplingParams(max_tokens=20),
                       on_delta=again)
        with pytest.raises(WorkerFailedError, match="max_recoveries"):
            h.result(60)
        assert eng.stats()["worker_failures"] == 2
        out = eng.submit("generate", list(range(3, 20)), SamplingParams(
            max_tokens=3, temperature=0)).result(60)
        assert len(out.token_ids) == 3
    finally:
        close(eng)


@pytest.mark.parametrize("views", [False, True])
@pytest.mark.parametrize("ws", [1, 3])
def test_chunk_attention_to_cached_tokens_in_pieces_and_splits(tmp_path_factory, monkeypatch,
                                                               ws, views):
    """A prompt chunk's attention to the tokens cached by earlier chunks is gathered a piece at a
    time (or, its pages being one run, read as a view of the pool) and split over several key
    ranges (merged by log-sum-exp): with tiny pieces and splits the long prompt still decodes
    exactly as its solo run."""
    from ringserve.parallel import step_attention as sa
    path = model_path(tmp_path_factory)
    solo = solo_for(path, ws, "striped")
    monkeypatch.setattr(sa, "CONTIGUOUS_VIEWS", views)
    runs = []
    real_init = sa.StepAttention.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        runs.append(bool(self.prefix_run))

    monkeypatch.setattr(sa.StepAttention, "__init__", init)
    monkeypatch.setattr(sa, "PIECE_TOKENS", 24)
    monkeypatch.setattr(sa, "MIN_SPLIT_TOKENS", 5)
    monkeypatch.setattr(sa, "SPLITS", 3)
    g = torch.Generator().manual_seed(21)
    prompt = torch.randint(0, VOCAB_TOKENS, (150,), generator=g).tolist()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    eng = make(path, ws, "striped", max_num_batched_tokens=32, passq_max_tokens=4)
    try:
        out = eng.submit("generate", prompt, params).result(60)
        assert (out.token_ids, out.finish_reason) == solo(prompt, params)
    finally:
        close(eng)
    assert any(runs) == views          # the view path ran, or (views off) never


def test_a_long_prompt_keeps_one_run_of_pages_beside_decoding_streams(tmp_path_factory):
    """Prompt chunks take the low end of each rank's free pages, one-token rows the high end:
    a long prompt chunked over many steps while three streams decode (each taking a new page
    every few steps) still holds one ascending run of pages on every rank, so its chunks read
    their cached prefix as a view; every output equals its solo run."""
    from ringserve.parallel import step_attention as sa
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 2, "striped")
    seen = []
    real_init = sa.StepAttention.__init__

    def init(self, plan, tables, *a, **k):
        real_init(self, plan, tables, *a, **k)
        with_prefix = [i for i in self.ring if plan.seqs[i].n_before > 0]
        if with_prefix:
            seen.append((len(with_prefix), len(self.prefix_run)))

    g = torch.Generator().manual_seed(33)
    streams = [torch.randint(0, VOCAB_TOKENS, (9,), generator=g).tolist() for _ in range(3)]
    long_p = torch.randint(0, VOCAB_TOKENS, (300,), generator=g).tolist()
    sp = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    lp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    eng = make(path, 2, "striped", max_num_batched_tokens=24)
    sa.StepAttention.__init__ = init
    try:
        decoding = threading.Event()          # set once every stream has its second token
        counts = [0] * len(streams)

        def on_delta(i, _d):
            counts[i] += 1
            if min(counts) >= 2:
                decoding.set()

        hs = [eng.submit("generate", p, sp, on_delta=lambda d, i=i: on_delta(i, d))
              for i, p in enumerate(streams)]
        assert decoding.wait(60)
        h = eng.submit("generate", long_p, lp)
        out = h.result(60)
        assert (out.token_ids, out.finish_reason) == solo(long_p, lp)
        for p, hh in zip(streams, hs):
            o = hh.result(60)
            assert (o.token_ids, o.finish_reason) == solo(p, sp)
    finally:
        sa.StepAttention.__init__ = real_init
        close(eng)
    # every chunk after the first (the streams' prompts too) read its prefix as one run
    assert len(seen) > 10 and all(r == n for n, r in seen), seen


def test_short_prompts_beside_a_long_prefill_leave_its_pages_one_run(tmp_path_factory):
    """Short prompts that arrive while a long prompt is prefilled in chunks (each short one
    whole in one step) take their pages from the high end, as decode rows do: they never
    take the page the long prompt's next chunk continues its run with, so every chunk of the
    long prompt reads its cached prefix as exactly one view per rank (session 8: a 100-token
    request landing 2 s into a 256K prefill split it in two runs, three flash launches and
    two more merges a layer for the rest of the prompt); every output equals its solo run."""
    from ringserve.parallel import step_attention as sa
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 2, "striped")
    runs = []
    real_init = sa.StepAttention.__init__
    g = torch.Generator().manual_seed(35)
    long_p = torch.randint(0, VOCAB_TOKENS, (320,), generator=g).tolist()
    shorts = [torch.randint(0, VOCAB_TOKENS, (n,), generator=g).tolist() for n in (7, 12, 5)]

    beside = []   # steps where a short prompt's chunk rode with one of the long prompt's

    def init(self, plan, tables, *a, **k):
        real_init(self, plan, tables, *a, **k)
        long_rows = [i for i in self.ring if plan.seqs[i].chunk_len > 12]
        for i in long_rows:
            if plan.seqs[i].n_before > 0:
                r = self.prefix_run.get(i)
                runs.append(None if r is None else len(r))
        if long_rows and len(self.ring) > len(long_rows):
            beside.append(1)

    lp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    eng = make(path, 2, "striped", max_num_batched_tokens=48)
    sa.StepAttention.__init__ = init
    try:
        # one at a time, at engine steps 1, 2 and 3, while the long one prefills (7+ steps)
        h, *hs = run_with_arrivals(eng, [(0, long_p, lp)]
                                   + [(k + 1, p, sp) for k, p in enumerate(shorts)])
        out = h.result(60)
        assert (out.token_ids, out.finish_reason) == solo(long_p, lp)
        for p, hh in zip(shorts, hs):
            o = hh.result(60)
            assert (o.token_ids, o.finish_reason) == solo(p, sp)
    finally:
        sa.StepAttention.__init__ = real_init
        close(eng)
    assert len(beside) >= 2, "the short prompts never rode beside the long one's chunks"
    assert len(runs) >= 4 and all(r == 1 for r in runs), runs


def test_a_short_request_is_admitted_while_a_long_prompt_prefills(tmp_path_factory):
    """A long prompt in chunks of the step budget: a short request that arrives meanwhile is
    admitted at the next step (the long prompt then takes half the budget), finishes before
    the long prefill does, and both equal their solo runs."""
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 2, "striped")
    eng = make(path, 2, "striped", max_num_batched_tokens=16)
    g = torch.Generator().manual_seed(8)
    long_p = torch.randint(0, VOCAB_TOKENS, (400,), generator=g).tolist()
    short_p = torch.randint(0, VOCAB_TOKENS, (6,), generator=g).tolist()
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    try:
        arrivals = [(0, long_p, params), (3, short_p, params)]
        h_long, h_short = run_with_arrivals(eng, arrivals)
        s_out, l_out = h_short.result(60), h_long.result(60)
        assert s_out.timings["ttft_s"] < l_out.timings["ttft_s"]
        assert (s_out.token_ids, s_out.finish_reason) == solo(short_p, params)
        assert (l_out.token_ids, l_out.finish_reason) == solo(long_p, params)
        assert s_out.timings["queue_s"] < l_out.timings["prefill_s"] / 4
    finally:
        close(eng)


def test_prefill_cost_model_keeps_steps_even():
    """With the flops cost model a chunk late in a long prompt is shorter (its attention costs
    more): each chunk is the longest whose cost fits the budget, the budget is met within one
    token, and a prompt running alone gets the solo factor."""
    from ringserve.scheduler import Scheduler, SchedulerConfig
    from ringserve.kv_manager import KVManager
    from ringserve.doc_cache import DocumentCache

    sc = Scheduler(SchedulerConfig(max_num_batched_tokens=4096, attn_equiv_tokens=27000.0,
                                   solo_budget_factor=8),
                   KVManager([10 ** 6], 64), DocumentCache(10 ** 6), 1)
    sizes = []
    start = 0
    for _ in range(60):
        n = sc.chunk_tokens(start, 4096)
        assert sc.cost(start, n) <= 4096 + 1e-6 < sc.cost(start, n + 1)
        sizes.append(n)
        start += n
    assert sizes[0] > 3000 and sizes[-1] < sizes[0] / 2 and sizes == sorted(sizes, reverse=True)
    assert sc.chunk_tokens(10 ** 7, 1) == 1          # always progress
    plain = Scheduler(SchedulerConfig(max_num_batched_tokens=100), KVManager([100], 16),
                      DocumentCache(100), 1)
    assert plain.chunk_tokens(10 ** 6, 100) == 100 and plain.cost(10 ** 6, 7) == 7


def test_engine_config_attn_equiv_tokens(tmp_path_factory):
    """EngineConfig(attn_equiv_tokens=E) replaces the model's flops ratio in the flops cost
    model (a knob for calibrating it to measured rates): a prompt is cut into shorter chunks
    as its cached prefix grows, its output still equals its solo run; a value that is not a
    finite number > 0 is refused before any work."""
    for bad in (0, -5.0, float("nan"), float("inf"), "100"):
        with pytest.raises(ValueError, match="attn_equiv_tokens"):
            EngineConfig(attn_equiv_tokens=bad)
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 1, "striped")
    eng = make(path, 1, "striped", max_num_batched_tokens=64, prefill_cost="flops",
               attn_equiv_tokens=40.0)
    try:
        assert eng.sched.cfg.attn_equiv_tokens == 40.0
        g = torch.Generator().manual_seed(41)
        p = torch.randint(0, VOCAB_TOKENS, (300,), generator=g).tolist()
        sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        out = eng.submit("generate", p, sp).result(60)
        assert (out.token_ids, out.finish_reason) == solo(p, sp)
        chunks = [r["prompt_tokens"] for r in eng.recent_steps(64) if r["prompt_tokens"]]
        assert len(chunks) > 300 // 64 + 1 and chunks[-2] < chunks[0], chunks
    finally:
        close(eng)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_interleaved_prefill_decodes_alone_between_chunks(tmp_path_factory, k):
    """EngineConfig(interleave_decode_steps=k): while a request decodes, each step that carries
    a long prompt's chunk is followed by k steps of the decodes alone (k = 0: chunks back to
    back beside the decodes); both outputs equal their solo runs; a bad value is refused."""
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="interleave_decode_steps"):
            EngineConfig(interleave_decode_steps=bad)
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 1, "striped")
    eng = make(path, 1, "striped", max_num_batched_tokens=32, interleave_decode_steps=k)
    try:
        assert eng.sched.cfg.interleave_decode_steps == k
        g = torch.Generator().manual_seed(7 + k)
        short = torch.randint(0, VOCAB_TOKENS, (9,), generator=g).tolist()
        long = torch.randint(0, VOCAB_TOKENS, (300,), generator=g).tolist()
        stream = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
        sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        hs = run_with_arrivals(eng, [(0, short, stream), (3, long, sp)])
        outs = [h.result(120) for h in hs]
        assert [(o.token_ids, o.finish_reason) for o in outs] == [solo(short, stream),
                                                                   solo(long, sp)]
        steps = eng.recent_steps(1000)
        mixed = [i for i, r in enumerate(steps) if r["prompt_tokens"] and r["decode_rows"]]
        assert len(mixed) >= 300 // 32 - 1, steps     # the long prompt's chunks, beside decodes
        for i in mixed:
            after = steps[i + 1:i + 1 + k]
            # the next k steps: decodes alone, while anything decodes
            assert all(r["prompt_tokens"] == 0 for r in after if r["decode_rows"]), (i, steps)
        back_to_back = sum(1 for i in mixed if i + 1 in mixed)
        assert (back_to_back > 0) == (k == 0), mixed
    finally:
        close(eng)


@pytest.mark.parametrize("ws", [1, 2])
def test_chunks_are_whole_query_tiles(ws):
    """A chunk that is not its prompt's last is a whole number of CHUNK_ALIGN-token tiles per
    rank: rounded up when the larger chunk's cost still fits the quarter-budget slack (the
    partial tile costs the GPU a whole one anyway), else down; the cost model's fit otherwise."""
    from ringserve.doc_cache import DocumentCache
    from ringserve.kv_manager import KVManager
    from ringserve.scheduler import CHUNK_ALIGN, Scheduler, SchedulerConfig

    sc = Scheduler(SchedulerConfig(max_num_batched_tokens=2048 * ws, attn_equiv_tokens=26627.0),
                   KVManager([10 ** 6] * ws, 64), DocumentCache(10 ** 6), ws)
    B = 2048 * ws
    align = CHUNK_ALIGN * ws
    ups = downs = 0
    start, N = 0, 262144
    while start < N:
        left = N - start
        fit = min(left, sc.chunk_tokens(start, B))
        n = sc.chunk_size(start, left, B)
        if n < left:
            assert n % align == 0
            if n > fit:
                ups += 1
                assert n - fit < align and sc.cost(start, n) <= B * 1.25
            elif n < fit:
                downs += 1
                assert fit - n < align
                up = fit + align - fit % align
                assert sc.cost(start, up) > B * 1.25   # rounding up would not have fitted
        start += n
    assert ups and downs
    # a short prompt's rest that fits the slack goes whole, aligned or not
    assert sc.chunk_size(10 ** 5, 100, B) == 100
    # the tokens cost model (CPU): a prompt of 300 at budget 200 -> 128 * ws-aligned chunks
    plain = Scheduler(SchedulerConfig(max_num_batched_tokens=200), KVManager([10 ** 4] * ws, 16),
                      DocumentCache(10 ** 4), ws)
    assert plain.chunk_size(0, 1000, 200) == (128 if ws == 1 else 200)
    if ws == 1:
        assert plain.chunk_size(0, 1000, 100) == 128       # up: 128 <= 100 + 200 / 4
    small = Scheduler(SchedulerConfig(max_num_batched_tokens=100), KVManager([10 ** 4] * ws, 16),
                      DocumentCache(10 ** 4), ws)
    assert small.chunk_size(0, 1000, 100) == 100           # 128 > 100 + 25: as fitted


def test_only_a_prompts_short_last_chunk_runs_pass_q(tmp_path_factory, monkeypatch):
    """A long prompt chunked by a small budget runs its middle chunks as ring chunks (flash
    against the cached keys), even when they are shorter than passq_max_tokens; pass-Q (the
    paged decode kernel, tiled for a few query rows) takes only a prompt's last short chunk
    after cached tokens, as a question on a cached document."""
    from ringserve import scheduler
    path = model_path(tmp_path_factory)
    eng = make(path, 2, "striped", max_num_batched_tokens=32, passq_max_tokens=64)
    kinds = []
    real = scheduler.Scheduler._work

    def spy(self, req, n, kind, owners):
        if req.kind == "cache_document" or n > 1:
            kinds.append((req.kind, n, kind))
        return real(self, req, n, kind, owners)

    monkeypatch.setattr(scheduler.Scheduler, "_work", spy)
    try:
        doc = list(range(5, 205))
        eng.submit("cache_document", doc).result(60)
        out = eng.submit("generate", doc + [7, 8, 9], SamplingParams(
            max_tokens=2, temperature=0, ignore_eos=True)).result(60)
        assert out.num_cached_tokens == len(doc)
    finally:
        close(eng)
    doc_chunks = [k for k in kinds if k[0] == "cache_document"]
    assert len(doc_chunks) > 3 and all(n <= 64 for _, n, _ in doc_chunks)
    assert all(kind == "ring" for _, _, kind in doc_chunks[:-1])
    assert kinds[-1] == ("generate", 3, "q")


def test_a_prompt_whose_rest_fits_the_slack_goes_in_one_chunk(tmp_path_factory, monkeypatch):
    """A prompt (or a prompt's rest) whose cost is within a quarter of the step budget of what
    the step has left goes whole: at budget 32, 36 tokens in one step (its TTFT is one step,
    not two), 41 in 32 + 9; both give their solo tokens."""
    from ringserve import scheduler
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 1, "striped")
    eng = make(path, 1, "striped", max_num_batched_tokens=32)
    chunks = []
    real = scheduler.Scheduler._work

    def spy(self, req, n, kind, owners):
        if self is eng.sched and req.computed < len(req.prompt):   # not the solo runs'
            chunks.append((len(req.prompt), n))
        return real(self, req, n, kind, owners)

    monkeypatch.setattr(scheduler.Scheduler, "_work", spy)
    g = torch.Generator().manual_seed(44)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    try:
        for n in (36, 41):
            p = torch.randint(0, VOCAB_TOKENS, (n,), generator=g).tolist()
            out = eng.submit("generate", p, params).result(60)
            assert (out.token_ids, out.finish_reason) == solo(p, params)
    finally:
        close(eng)
    assert [c for c in chunks if c[0] == 36] == [(36, 36)]
    assert [c for c in chunks if c[0] == 41] == [(41, 32), (41, 9)]


def test_a_question_on_a_document_still_prefilling_waits_and_reuses_it(tmp_path_factory,
                                                                       monkeypatch):
    """A question whose prompt starts with a document that is still being prefilled waits for
    it and reuses its KV (no second prefill of the same document); a request with another
    prompt is not held up by the waiting one."""
    from ringserve import scheduler
    monkeypatch.setattr(scheduler, "SHARED_PREFILL_MIN", 64)
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 2, "striped")
    eng = make(path, 2, "striped", max_num_batched_tokens=16)
    g = torch.Generator().manual_seed(12)
    doc = torch.randint(0, VOCAB_TOKENS, (300,), generator=g).tolist()
    q = doc + torch.randint(0, VOCAB_TOKENS, (5,), generator=g).tolist()
    other = torch.randint(0, VOCAB_TOKENS, (9,), generator=g).tolist()
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    try:
        h_doc = eng.submit("cache_document", doc)
        t0 = time.time()
        while h_doc.progress().get("done", 0) < 32:
            assert time.time() - t0 < 60 and not h_doc.done(), h_doc.progress()
            time.sleep(0.002)
        h_q = eng.submit("generate", q, params)
        h_o = eng.submit("generate", other, params)
        o = h_o.result(60)
        assert not h_doc.done() and not h_q.done()      # the other one went past the waiter
        out = h_q.result(60)
        h_doc.result(60)
        assert out.num_cached_tokens == len(doc)
        assert (out.token_ids, out.finish_reason) == solo(q, params)
        assert (o.token_ids, o.finish_reason) == solo(other, params)
        # the document was computed once (a second prefill would count 300 more)
        assert eng.stats()["prefill_tokens"] <= len(doc) + 5 + len(other)
    finally:
        close(eng)


def test_a_cached_document_is_ready_only_once_its_kv_is_computed(tmp_path_factory,
                                                                 monkeypatch):
    """cache_document resolves after the step that computes the document's last chunk has
    run, not when that chunk is planned (the scheduler counts a chunk as computed when it
    plans it): otherwise the document's time shows up in the next request's TTFT. Its
    progress goes from prefill chunks straight to done: never "running" with every token
    done (a poller saw that state between the last step and the result)."""
    from ringserve import engine as engine_mod
    states = []

    def put(self, v):
        states.append(dict(v))
        self.__dict__["_progress_value"] = v

    monkeypatch.setattr(engine_mod.RequestHandle, "_progress", property(
        lambda self: self.__dict__["_progress_value"], put), raising=False)
    path = model_path(tmp_path_factory)
    for budget in (16, 4096):          # several chunks, and one step for the whole document
        eng = make(path, 1, "striped", max_num_batched_tokens=budget)
        doc = list(range(5, 205))
        seen = []
        states.clear()
        try:
            h = eng.submit("cache_document", doc)
            # done callbacks run in the engine thread at the moment the result is set
            h.future.add_done_callback(
                lambda f, seen=seen, eng=eng: seen.append(eng.stats()["prefill_tokens"]))
            h.result(60)
            assert seen == [len(doc)], (budget, seen)
            assert states[-1] == {"state": "done"} and h.progress()["state"] == "done"
            assert not [p for p in states if p.get("done", 0) >= len(doc)], states
            if budget == 16:
                assert any(p.get("phase") == "prefill" for p in states), states
        finally:
            close(eng)


def test_pinned_documents_stay_pinned(tmp_path_factory):
    """Two pinned documents filling most of the document-cache budget: asking one many times
    never evicts the other (an ask's cached sequence shares the document's pages: counted
    once), and after a worker fault both are prefilled again in the background and reused."""
    path = model_path(tmp_path_factory)
    eng = make(path, 2, "striped", kv_tokens=1024, document_cache_tokens=320,
               max_num_batched_tokens=64)
    g = torch.Generator().manual_seed(31)
    a = torch.randint(0, VOCAB_TOKENS, (140,), generator=g).tolist()
    b = torch.randint(0, VOCAB_TOKENS, (140,), generator=g).tolist()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    try:
        ka = eng.submit("cache_document", a).result(60)
        kb = eng.submit("cache_document", b).result(60)
        for i in range(4):
            q = a + [10 + i, 20 + i]
            assert eng.submit("generate", q, params).result(60).num_cached_tokens == len(a)
        assert {ka, kb} <= {e.key for e in eng.doc_cache.entries() if e.pinned}
        assert eng.submit("generate", b + [7], params).result(60).num_cached_tokens == len(b)
        # a fault: the group is rebuilt with empty caches, the pinned documents come back
        eng.group.fail_next("execute", rank=1)
        out = eng.submit("generate", a + [99], params).result(60)
        assert eng.stats()["worker_failures"] == 1 and len(out.token_ids) == 4
        t0 = time.time()
        while not {ka, kb} <= {e.key for e in eng.doc_cache.entries() if e.pinned}:
            assert time.time() - t0 < 60, "the pinned documents were not prefilled again"
            time.sleep(0.01)
        assert eng.submit("generate", b + [8], params).result(60).num_cached_tokens == len(b)
    finally:
        close(eng)


def test_dropping_a_document_still_prefilling_cancels_it(tmp_path_factory):
    path = model_path(tmp_path_factory)
    eng = make(path, 2, "ring", max_num_batched_tokens=16)
    from ringserve.doc_cache import doc_key
    doc = torch.randint(0, VOCAB_TOKENS, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    try:
        free0 = eng.kv.free_pages()
        h = eng.submit("cache_document", doc)
        t0 = time.time()
        while h.progress().get("done", 0) < 32:
            assert time.time() - t0 < 60 and not h.done(), h.progress()
            time.sleep(0.002)
        key = doc_key(torch.tensor(doc, dtype=torch.int32))
        assert eng.submit("drop_document", key).result(10) is True
        with pytest.raises(RequestCancelledError, match="dropped"):
            h.result(10)
        assert eng.kv.free_pages() == free0 and key not in eng.doc_cache
        assert eng.submit("drop_document", key).result(10) is False
    finally:
        close(eng)


def test_page_runs_and_view_pieces():
    from ringserve.parallel.step_attention import page_runs, view_pieces
    assert page_runs(torch.tensor([4, 5, 6, 9, 10, 2])) == [(4, 3), (9, 2), (2, 1)]
    assert page_runs(torch.tensor([], dtype=torch.int32)) == []
    # 3 runs of 4-token pages, 30 tokens, pieces of at most 8 tokens, each inside one run
    pieces = view_pieces([(4, 3), (9, 2), (2, 3)], 30, 4, 8)
    assert pieces == [(0, 8, 4), (8, 12, 6), (12, 20, 9), (20, 28, 2), (28, 30, 4)]
    tokens = []
    for a, b, first in pieces:
        tokens += [(first + j // 4, j % 4) for j in range(b - a)]
    pages = [4, 5, 6, 9, 10, 2, 3, 4]
    assert tokens == [(pages[t // 4], t % 4) for t in range(30)]


def test_a_fragmented_prefix_is_read_as_several_views(tmp_path_factory, monkeypatch):
    """A prompt whose pages are not one run (here the allocator is made to hand out the lowest
    and the second-lowest free page in turn: 0, 2, 1, 4, 3, ...) reads its cached prefix as one view per run of pages while
    the runs are few (MAX_VIEW_RUNS), and gathers it beyond that: both exact against the solo
    run of an unfragmented engine."""
    from ringserve import kv_cache
    from ringserve.parallel import step_attention as sa
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 1, "striped")
    real_take = kv_cache.PageAllocator.take

    def swapped(self, high=False, after=None):
        self.turn = not getattr(self, "turn", False)
        if not high and self.turn and len(self.free) >= 2:   # the second-lowest free page
            p = self.free.pop(-2)
            self.ref[p] = 1
            return p
        return real_take(self, high)

    monkeypatch.setattr(kv_cache.PageAllocator, "take", swapped)
    seen = []
    real_init = sa.StepAttention.__init__

    def init(self, plan, tables, *a, **k):
        real_init(self, plan, tables, *a, **k)
        for i in self.ring:
            if plan.seqs[i].n_before > 0:
                runs = self.prefix_run.get(i)
                seen.append(None if runs is None else len(runs))

    monkeypatch.setattr(sa.StepAttention, "__init__", init)
    g = torch.Generator().manual_seed(41)
    prompt = torch.randint(0, VOCAB_TOKENS, (200,), generator=g).tolist()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for max_runs in (64, 3):
        seen.clear()
        monkeypatch.setattr(sa, "MAX_VIEW_RUNS", max_runs)
        eng = make(path, 1, "striped", max_num_batched_tokens=40)
        try:
            out = eng.submit("generate", prompt, params).result(60)
            assert (out.token_ids, out.finish_reason) == solo(prompt, params)
        finally:
            close(eng)
        if max_runs == 64:
            assert seen and None not in seen and max(seen) > 3   # several views each
        else:
            assert None in seen                                  # too many runs: gathered


def test_to_device_keeps_values_and_dtypes():
    """The step set-up's copies to the device (pinned and non-blocking on CUDA): values and
    dtypes as torch.tensor gives them, empty lists included, CPU tensors passed through."""
    from ringserve.parallel.step_attention import to_device
    cpu = torch.device("cpu")
    t = to_device([3, 1, 2], cpu, torch.int32)
    assert t.dtype == torch.int32 and t.tolist() == [3, 1, 2]
    assert to_device([], cpu, torch.int64).shape == (0,)
    assert to_device([[1], [2]], cpu, torch.int64).shape == (2, 1)
    x = torch.arange(4, dtype=torch.int32)
    assert to_device(x, cpu) is x
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        got = to_device(list(range(1000)), dev, torch.int64)
        assert got.device.type == "cuda" and got.cpu().tolist() == list(range(1000))
        assert to_device([], dev, torch.int64).device.type == "cuda"


def test_split_count_is_a_power_of_two_that_divides_whole_chunks():
    """A chunk's cached prefix is split into a power-of-two count of key ranges within the
    bounds (SPLITS, MIN_SPLIT_TOKENS), so a prefix of whole 128-token chunks leaves no
    remainder range (session 9: 3 splits of 33,280 tokens left one token, a third launch)."""
    from ringserve.parallel.step_attention import (MIN_SPLIT_TOKENS, SPLITS, TARGET_PROGRAMS,
                                                   split_count)
    for n in range(128, 300_000, 128 * 37):
        for rows in (1, 64, 128, 300, 768, 2048, 4096):
            for heads in (8, 32, 64):
                s = split_count(n, rows, heads)
                assert s & (s - 1) == 0 and 1 <= s <= SPLITS
                assert s == 1 or n // s >= MIN_SPLIT_TOKENS
                assert n % s == 0
                want = min(SPLITS, -(-TARGET_PROGRAMS // (-(-rows // 128) * heads)))
                if want >= 2 and n // MIN_SPLIT_TOKENS >= 2 * want:
                    assert s >= want     # rounded up when the prefix is long enough
    assert split_count(33280, 768, 32) == 4 and split_count(196608, 128, 32) == 8


def test_extension_positions_are_aligned_tensors(tmp_path_factory, monkeypatch):
    """Question extensions (pass-Q rows) beside a decoding stream start at odd rows of the step's
    flat batch; their positions reach the paged kernel as their own tensors, 16-byte aligned (a
    slice of the step's positions at an odd row was not, and the Triton kernel specializes on
    that: a compile in the middle of serving on an H200, session 9). Outputs equal solo runs."""
    from ringserve.parallel import step_attention as sa
    path = model_path(tmp_path_factory)
    solo = solo_for(path, 1, "striped")
    seen = []
    real = sa.kernels.paged_decode

    def paged(q, *a, q_pos=None, **k):
        if q_pos is not None and q.shape[1] > 1:       # an extension's queries
            seen.append(q_pos.data_ptr() % 16)
        return real(q, *a, q_pos=q_pos, **k)

    monkeypatch.setattr(sa.kernels, "paged_decode", paged)
    g = torch.Generator().manual_seed(8)
    doc = torch.randint(0, VOCAB_TOKENS, (60,), generator=g).tolist()
    qs = [torch.randint(0, VOCAB_TOKENS, (n,), generator=g).tolist() for n in (3, 5, 4)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    eng = make(path, 1, "striped", max_num_batched_tokens=64, passq_max_tokens=8)
    try:
        eng.submit("cache_document", doc).result(60)
        got = threading.Event()
        stream = eng.submit("generate", doc + [7], SamplingParams(
            max_tokens=400, temperature=0, ignore_eos=True), on_delta=lambda d: got.set())
        assert got.wait(60)
        hs = [eng.submit("generate", doc + q, params) for q in qs]
        for h, q in zip(hs, qs):
            out = h.result(120)
            assert (out.token_ids, out.finish_reason) == solo(doc + q, params)
        stream.cancel()
    finally:
        close(eng)
    assert seen and all(a == 0 for a in seen), seen


def test_token_ids_are_checked_before_any_work(tmp_path_factory):
    """Ids outside the vocabulary (negative, too large, beyond int64) are refused with the id
    named, before any step; ints of other types (numpy, bool-free subclasses) are taken as
    their values; the fast path (a list of exact ints) gives the same output as the others."""
    import numpy as np

    from ringserve.errors import InvalidRequestError

    path = model_path(tmp_path_factory)
    eng = make(path, 1, "striped")
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    try:
        vocab = eng._infos[0]["vocab_size"]
        for bad in (-1, vocab, 10 ** 30, -(10 ** 30)):
            with pytest.raises(InvalidRequestError, match=f"token id {bad} is outside"):
                eng.submit("generate", [5, 6, bad, 7], params).result(30)
        assert eng.stats()["steps"] == 0
        prompt = list(range(3, 40))
        outs = [eng.submit("generate", p, params).result(60).token_ids
                for p in (prompt, tuple(prompt), np.array(prompt), [np.int32(t) for t in prompt])]
        assert all(o == outs[0] for o in outs)
        key = eng.submit("cache_document", np.array(prompt)).result(60)
        assert key == eng.submit("cache_document", prompt).result(60)
    finally:
        close(eng)
