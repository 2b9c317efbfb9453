"""The engine and the model shard workers in one process: each rank a real ModelShardWorker
on its own thread, joined by the in-process ThreadTransport (ringserve.parallel.transport), so the
whole matrix (3 families x world sizes 1, 2, 3 x both layouts) is compared with HF transformers
without paying Ray actor start-up per configuration. tests/test_llm*.py cover the same paths
through Ray actors and gloo."""
import time

import pytest
import torch

from threadgroup import ThreadGroup, submit_together
from tinymodels import hf_greedy, hf_reference, load_hf, tiny_model
from ringserve.doc_cache import doc_key
from ringserve.engine import Engine, EngineConfig
from ringserve.kv_manager import balanced_counts
from ringserve.errors import CapacityError
from ringserve.sampling import SamplingParams
from ringserve.tokenizer import Tokenizer

FAMILIES = ("llama", "mistral", "qwen2")
CONFIGS = [(f, 1, "striped") for f in FAMILIES] + [
    (f, n, s) for f in FAMILIES for n in (2, 3) for s in ("ring", "striped")] + [
    ("llama-mha", 2, "ring"), ("llama-sharded", 3, "striped")]  # MHA + biases; sharded weights
PROMPT_LENS = (37, 50)
NEW_TOKENS = 32


_REF = {}



def reference(tmp_path_factory, family):
    if family not in _REF:
        path = tiny_model(tmp_path_factory, family)
        hf = load_hf(path)
        out = hf_reference(hf, 7 + sum(map(ord, family)), PROMPT_LENS, NEW_TOKENS)
        _REF[family] = (path, hf, out)
    return _REF[family]


def assert_no_leak(eng, timeout=10.0):
    """Once idle, the free pages of every rank are exactly those no cached sequence holds
    (nothing leaked by finished, cancelled, preempted or failed requests), and every page's
    reference count is the number of cached sequences holding it."""
    import time
    t0 = time.time()
    while (eng.sched.running or eng.sched.waiting) and time.time() - t0 < timeout:
        time.sleep(0.01)
    assert not eng.sched.running and not eng.sched.waiting
    entries = eng.doc_cache.entries()
    for r, a in enumerate(eng.kv.ranks):
        held = {}
        for e in entries:
            for p in e.kv.pages[r]:
                held[p] = held.get(p, 0) + 1
        assert a.num_free == a.usable - len(held)
        assert all(a.ref[p] == n for p, n in held.items())
    free = sum(eng.kv.free_pages()) * eng.page_size
    assert eng.stats()["kv_tokens_free"] == free
    # the workers' page tables: only live sequences', or ones whose drop the next step sends
    live = {e.kv.key for e in entries} | set(eng.kv.dropped)
    for w in eng.group.workers:
        assert set(w._tables) <= live


def make_engine(path, ws, layout, kv_tokens=1024, worker_kwargs=None, **cfg):
    group = ThreadGroup(ws, model=str(path), kv_tokens=kv_tokens, page_size=8,
                        **(worker_kwargs or {}))
    tok = Tokenizer.from_dir(path)
    if (worker_kwargs or {}).get("cuda_graphs"):
        cfg.setdefault("cuda_graphs", True)
    return Engine(group, tok, tok.eos_token_ids, EngineConfig(layout=layout, **cfg))


@pytest.mark.parametrize("family,ws,schedule", CONFIGS,
                         ids=[f"{c[0]}-ws{c[1]}-{c[2]}" for c in CONFIGS])
def test_matrix_score_and_greedy_equal_transformers(tmp_path_factory, family, ws, schedule):
    path, _, ref = reference(tmp_path_factory, family)
    # small prompt chunks on the multi-rank configs: ring chunks against cached earlier ones
    eng = make_engine(path, ws, schedule, **({} if ws == 1 else dict(
        max_num_batched_tokens=16, passq_max_tokens=4)))
    try:
        for ids, lp_ref, gen_ref in ref:
            sc = eng.submit("score", ids).result(120)
            assert sc.logprobs[0] is None
            torch.testing.assert_close(torch.tensor(sc.logprobs[1:], dtype=torch.float64),
                                       lp_ref, rtol=0, atol=5e-5)
            out = eng.submit("generate", ids, SamplingParams(
                max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)).result(120)
            assert out.token_ids == gen_ref and out.finish_reason == "length"
        s = eng.stats()
        assert s["cached_documents"] == 2 and s["requests_failed"] == 0
        assert_no_leak(eng)
        # the same prompt again: reuses the cached sequence, replaces it (same tokens)
        again = eng.submit("generate", ids, SamplingParams(
            max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)).result(120)
        assert again.token_ids == gen_ref and again.num_cached_tokens == len(ids) - 1
        assert eng.stats()["cached_documents"] == 2
        assert_no_leak(eng)
    finally:
        eng.shutdown()
        eng.group.shutdown()


@pytest.mark.parametrize("ws,schedule", [(3, "ring"), (2, "striped")])
def test_partial_prefix_reuse_fork_trim_matches_transformers(tmp_path_factory, ws, schedule):
    """A pinned document; prompts sharing all of it or only part of it reuse its KV (fork,
    trim to the shared prefix, copy-on-write of the partial page) and still decode exactly
    like HF on the whole prompt. The ring layout makes a trimmed prefix lopsided across
    ranks: the balanced appends must cope."""
    path, hf, ref = reference(tmp_path_factory, "mistral")
    doc = ref[1][0]                                   # 50 tokens, window 16
    g = torch.Generator().manual_seed(11)
    q = torch.randint(0, hf.config.vocab_size, (9,), generator=g).tolist()
    eng = make_engine(path, ws, schedule)
    try:
        key = eng.submit("cache_document", doc).result(60)
        for prompt, cached in ((doc + q, 50), (doc[:29] + q, 29), (doc, 49)):
            out = eng.submit("generate", prompt, SamplingParams(
                max_tokens=12, temperature=0, ignore_eos=True)).result(60)
            exp = hf_greedy(hf, prompt, 12)
            assert out.num_cached_tokens == cached
            assert out.token_ids == exp
        assert key in eng.doc_cache and eng.doc_cache.get(key).pinned
        assert eng.submit("drop_document", key).result(10) is True
        assert key not in eng.doc_cache
        assert_no_leak(eng)
    finally:
        eng.shutdown()
        eng.group.shutdown()


def test_capacity_error_before_work_and_pinned_documents(tmp_path_factory):
    path, _, ref = reference(tmp_path_factory, "llama")
    eng = make_engine(path, 2, "striped", kv_tokens=48)   # per rank: 6 pages x 8
    try:
        assert eng.capacity_tokens == 96
        with pytest.raises(CapacityError) as ei:
            eng.submit("generate", ref[0][0], SamplingParams(max_tokens=60)).result(10)
        assert (ei.value.requested, ei.value.capacity) == (37 + 60, 96)
        assert "97" in str(ei.value) and "96" in str(ei.value)
        assert eng.stats()["prefill_tokens"] == 0           # nothing was computed
        key = eng.submit("cache_document", ref[1][0]).result(30)   # 50 pinned tokens
        with pytest.raises(CapacityError, match="pinned"):
            eng.submit("generate", ref[0][0][:30], SamplingParams(max_tokens=30)).result(10)
        eng.submit("drop_document", key).result(10)
        out = eng.submit("generate", ref[0][0][:30], SamplingParams(
            max_tokens=30, temperature=0, ignore_eos=True)).result(60)
        assert len(out.token_ids) == 30
        # unpinned cached sequences are evicted for a request that needs their room
        out = eng.submit("generate", ref[1][0][:40], SamplingParams(
            max_tokens=40, temperature=0, ignore_eos=True)).result(60)
        assert len(out.token_ids) == 40 and eng.stats()["cached_documents"] == 1
        assert_no_leak(eng)
    finally:
        eng.shutdown()
        eng.group.shutdown()


def test_stops_keep_exactly_the_tokens_fed(tmp_path_factory):
    """A stop string, a stop id, max_tokens and a seeded sampled run: the same output with big
    and with tiny prompt chunks, and the cached sequence afterwards is prompt + output[:-1]
    (the last sampled token is never fed), reused by the next request."""
    path, _, _ = reference(tmp_path_factory, "qwen2")
    from ringserve.sample_document import sample_document

    big = make_engine(path, 2, "ring")
    small = make_engine(path, 2, "ring", max_num_batched_tokens=8, passq_max_tokens=3)
    try:
        tok = big.tokenizer
        prompt = tok.encode(sample_document(n_words=40, seed=5))
        full = big.submit("generate", prompt, SamplingParams(
            max_tokens=23, temperature=0, ignore_eos=True)).result(60)
        stop = full.text[9:12]
        cases = [SamplingParams(max_tokens=23, temperature=0, ignore_eos=True),
                 SamplingParams(max_tokens=23, temperature=0, ignore_eos=True, stop=[stop]),
                 SamplingParams(max_tokens=23, temperature=0, ignore_eos=True,
                                stop_token_ids=[full.token_ids[6]]),
                 SamplingParams(max_tokens=23, temperature=0.8, seed=3, ignore_eos=True,
                                logprobs=True)]
        for p in cases:
            a = big.submit("generate", prompt, p).result(60)
            b = small.submit("generate", prompt, p).result(60)
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text,
                                                              a.finish_reason)
            if p.logprobs:
                torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs),
                                           rtol=0, atol=1e-5)
            kept = prompt + b.token_ids[:-1]
            e = small.doc_cache.get(doc_key(torch.tensor(kept, dtype=torch.int32)))
            assert e is not None and len(e.kv) == len(kept) == sum(e.kv.counts)
            assert_no_leak(small)
        assert cases[1].stop and small.stats()["requests_failed"] == 0
    finally:
        for eng in (big, small):
            eng.shutdown()
            eng.group.shutdown()


def test_balanced_counts_follows_the_fewest_tokens_rule():
    for counts, n in (([5, 0, 3], 7), ([0, 0], 5), ([4, 4, 4], 2), ([9, 1], 3), ([2, 7, 7], 40)):
        c = list(counts)
        for _ in range(n):
            c[c.index(min(c))] += 1
        assert balanced_counts(counts, n) == c


def test_graph_buckets_are_chosen_by_the_driver_for_every_rank(tmp_path_factory):
    """A decode-only step carries its graph bucket (batch rounded up to a power of two, table
    width a power of two >= 16 covering the most pages any rank holds), the same in every
    rank's plan: otherwise one rank would capture (running collectives) while another
    replays. Steps with prompt work carry none."""
    path, _, ref = reference(tmp_path_factory, "llama")
    eng = make_engine(path, 2, "striped", worker_kwargs={"cuda_graphs": "emulate"})
    seen = []
    real = eng._execute

    def spy(step):
        seen.append([(p.graph_batch, p.graph_width) for p in step.plans])
        return real(step)

    eng._execute = spy
    try:
        hs = [eng.submit("generate", ids, SamplingParams(max_tokens=6, temperature=0,
                                                          ignore_eos=True))
              for ids, _, _ in ref * 3]
        for h in hs:
            h.result(60)
        buckets = {b for per_rank in seen for b in per_rank}
        assert all(len(set(per_rank)) == 1 for per_rank in seen)
        assert (0, 0) in buckets                       # the prefill steps
        assert {b for b, w in buckets if b} <= {1, 2, 4, 8} and 8 in {b for b, _ in buckets}
        assert {w for b, w in buckets if b} == {16}
        assert_no_leak(eng)
    finally:
        eng.shutdown()
        eng.group.shutdown()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_chunked_prefill_at_world_size_1_equals_transformers(tmp_path_factory, family):
    """One rank, prompts in 16-token chunks: each later chunk attends to its cached prefix (the
    prefix's splits and the chunk's own part merged in one call into the step's output; with
    Mistral's window, through the paged kernel and a merge) -- log-probs and greedy tokens
    equal transformers'."""
    path, _, ref = reference(tmp_path_factory, family)
    eng = make_engine(path, 1, "striped", max_num_batched_tokens=16, passq_max_tokens=4)
    try:
        for ids, lp_ref, gen_ref in ref:
            sc = eng.submit("score", ids).result(120)
            torch.testing.assert_close(torch.tensor(sc.logprobs[1:], dtype=torch.float64),
                                       lp_ref, rtol=0, atol=5e-5)
            out = eng.submit("generate", ids, SamplingParams(
                max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)).result(120)
            assert out.token_ids == gen_ref
        assert eng.stats()["steps"] >= 2 * len(ids) // 16
    finally:
        eng.shutdown()
        eng.group.shutdown()


@pytest.mark.parametrize("family,ws", [("llama", 1), ("mistral", 3), ("qwen2", 2)])
def test_graph_decode_path_equals_transformers(tmp_path_factory, family, ws):
    """The CUDA-graph decode path run on CPU (cuda_graphs="emulate": same static buffers,
    scratch-page writes on non-owner ranks, agreed widths, the body run at each replay): greedy
    tokens equal HF's, also when a prompt reuses a cached document's prefix (fork, trim,
    copy-on-write) and past a width bucket (16 pages of 8 tokens)."""
    path, hf, ref = reference(tmp_path_factory, family)
    eng = make_engine(path, ws, "striped", worker_kwargs={"cuda_graphs": "emulate"})
    try:
        for ids, _, gen_ref in ref:
            out = eng.submit("generate", ids, SamplingParams(
                max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)).result(120)
            assert out.token_ids == gen_ref
        doc = ref[1][0]
        out = eng.submit("generate", doc[:29] + ref[0][0][:8], SamplingParams(
            max_tokens=100, temperature=0, ignore_eos=True)).result(120)
        assert out.num_cached_tokens == 29
        assert out.token_ids == hf_greedy(hf, doc[:29] + ref[0][0][:8], 100)
        widths = {key[1] for wk in eng.group.workers for key in wk._graphs}
        assert 16 in widths and (ws > 1 or 32 in widths)   # 137 tokens: 18 pages on one rank
        assert all(wk.graph_stats()["replays"] > 0 for wk in eng.group.workers)
        assert_no_leak(eng)
    finally:
        eng.shutdown()
        eng.group.shutdown()


@pytest.mark.parametrize("ws", [1, 2])
def test_structured_decode_through_graphs_equals_eager(tmp_path_factory, ws):
    """Grammar-constrained sampled decode through the graph path (emulated on CPU: its masks
    are computed on the worker's thread right after the replay is queued, not on the helper
    thread) gives the eager path's tokens, draw for draw, for several requests at once."""
    import json
    path, _, ref = reference(tmp_path_factory, "llama")
    schema = {"type": "object", "properties": {"n": {"type": "integer"},
                                               "tag": {"enum": ["port", "aft"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=7, guided_json=schema)
    outs = {}
    for mode in ("emulate", False):
        eng = make_engine(path, ws, "striped", worker_kwargs={"cuda_graphs": mode})
        try:
            hs = [eng.submit("generate", ids, params) for ids, _, _ in ref]
            outs[mode] = [h.result(120) for h in hs]
            if mode:
                assert all(wk.graph_stats()["replays"] > 0 for wk in eng.group.workers)
        finally:
            eng.shutdown()
            eng.group.shutdown()
    assert [o.token_ids for o in outs["emulate"]] == [o.token_ids for o in outs[False]]
    # the grammar held (a random model alone would not open a JSON object)
    assert all(o.text.lstrip().startswith("{") for o in outs["emulate"]), outs["emulate"]
    for o in outs["emulate"]:
        if o.finish_reason == "stop":
            assert set(json.loads(o.text)) == {"n", "tag"}


@pytest.mark.parametrize("ws", [1, 2])
def test_a_graph_that_can_not_be_captured_costs_no_request(tmp_path_factory, monkeypatch, ws):
    """Capturing a decode graph fails (on every rank, as it would for an op that a graph can
    not hold): the step is recovered like a worker fault and the engine decodes eagerly from
    then on; every request still gives HF's tokens."""
    from ringserve.actors.model_worker import ModelShardWorker

    def broken(self, *a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ModelShardWorker, "_capture", broken)
    path, _, ref = reference(tmp_path_factory, "llama")
    eng = make_engine(path, ws, "striped", worker_kwargs={"cuda_graphs": "emulate"})
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    try:
        hs = [eng.submit("generate", ids, params) for ids, _, _ in ref]
        for h, (_, _, gen_ref) in zip(hs, ref):
            assert h.result(120).token_ids == gen_ref
        st = eng.stats()
        assert st["graph_capture_failures"] == 1 and st["worker_failures"] == 1, st
        assert eng.sched.cfg.graphs is False
        assert eng.submit("generate", ref[0][0], params).result(120).token_ids == ref[0][2]
        assert eng.stats()["worker_failures"] == 1
        assert_no_leak(eng)
    finally:
        eng.shutdown()
        eng.group.shutdown()


@pytest.mark.parametrize("ws", [1, 2])
def test_a_lone_long_prompt_captures_its_first_decode_graph_ahead(tmp_path_factory, ws):
    """A lone prompt of several chunks marks its first decode bucket on its first chunk: every
    rank captures that graph inside the prefill, and the decode replays it with no capture of
    its own (the bucket the scheduler guessed is the one the decode used); a document cached
    the same way has its questions' bucket ready. One-chunk prompts mark nothing. Tokens stay
    HF's."""
    path, hf, ref = reference(tmp_path_factory, "llama")
    prompt = (ref[1][0] * 3)[:150]          # 150 tokens in 32-token chunks
    eng = make_engine(path, ws, "striped", worker_kwargs={"cuda_graphs": "emulate"},
                      max_num_batched_tokens=32, passq_max_tokens=8)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    try:
        out = eng.submit("generate", prompt, params).result(120)
        assert out.token_ids == hf_greedy(hf, prompt, 12)
        for wk in eng.group.workers:
            st = wk.graph_stats()
            assert st["captured_ahead"] == 1 and st["replays"] >= 11, (wk.rank, st)
            assert len(wk.graph_keys()) == 1, wk.graph_keys()   # the decode captured nothing
        # a document cached in chunks: its questions' bucket is captured with it (ws 1: a
        # new bucket, 16 pages; ws 2: the prompt's, already there), the question captures none
        doc = (ref[0][0] * 2)[:60]
        key = eng.submit("cache_document", doc).result(120)
        keys = [wk.graph_keys() for wk in eng.group.workers]
        q = eng.submit("generate", doc + ref[1][0][:6], params).result(120)
        assert q.num_cached_tokens == 60
        assert q.token_ids == hf_greedy(hf, doc + ref[1][0][:6], 12)
        assert [wk.graph_keys() for wk in eng.group.workers] == keys
        assert all(len(k) == wk.graph_stats()["captured_ahead"] == (2 if ws == 1 else 1)
                   for k, wk in zip(keys, eng.group.workers)), keys
        eng.submit("drop_document", key).result(60)
        # a one-chunk prompt marks nothing: its decode captures on demand as before
        before = [wk.graph_stats()["captured_ahead"] for wk in eng.group.workers]
        eng.submit("generate", ref[0][0][:20], params).result(120)
        assert [wk.graph_stats()["captured_ahead"] for wk in eng.group.workers] == before
        assert_no_leak(eng)
    finally:
        eng.shutdown()
        eng.group.shutdown()


def test_captured_graphs_are_bounded_least_recently_replayed_first(tmp_path_factory):
    """A worker keeps at most max_cuda_graphs decode graphs: batches of 1, 2 and 4 rows need
    three buckets, with room for two the least recently replayed goes; the tokens stay HF's."""
    path, hf, ref = reference(tmp_path_factory, "llama")
    prompts = [ref[0][0], ref[1][0], ref[0][0][5:]]
    want = [ref[0][2], ref[1][2], hf_greedy(hf, prompts[2], NEW_TOKENS)]
    eng = make_engine(path, 1, "striped", worker_kwargs={"cuda_graphs": "emulate",
                                                         "max_cuda_graphs": 2})
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    try:
        wk = eng.group.workers[0]
        for n in (1, 2, 3, 1):
            hs = [eng.submit("generate", ids, params) for ids in prompts[:n]]
            for h, gen_ref in zip(hs, want[:n]):
                assert h.result(120).token_ids == gen_ref
            assert len(wk._graphs) <= 2
        st = wk.graph_stats()
        assert st["graphs"] == 2 and st["evictions"] >= 1, st
        assert {k[0] for k in wk._graphs} >= {1}           # the last batch's bucket is kept
        assert_no_leak(eng)
    finally:
        eng.shutdown()
        eng.group.shutdown()
    with pytest.raises(ValueError, match="max_cuda_graphs must be an integer >= 1"):
        make_engine(path, 1, "striped", worker_kwargs={"cuda_graphs": "emulate",
                                                       "max_cuda_graphs": 0})


@pytest.mark.parametrize("ws", [1, 2])
def test_graph_decode_reads_a_shared_document_once(tmp_path_factory, ws):
    """Questions on one cached document decoding together replay a graph that reads the
    document's pages once for all rows (a shared-prefix table merged by log-sum-exp, as the
    eager cascade) and give each question's solo tokens; a batch whose rows do not all share
    it replays the plain graph."""
    path, _, ref = reference(tmp_path_factory, "llama")
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(0, 200, (61,), generator=g).tolist()
    qs = [doc + torch.randint(0, 200, (1 + i % 3,), generator=g).tolist() for i in range(5)]
    other = torch.randint(0, 200, (9,), generator=g).tolist()
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    solo_eng = make_engine(path, ws, "striped")
    eng = make_engine(path, ws, "striped", worker_kwargs={"cuda_graphs": "emulate"})
    try:
        solo = [solo_eng.submit("generate", q, params).result(120).token_ids
                for q in qs + [other]]
        eng.submit("cache_document", doc).result(120)
        # the first step waits until all five are queued: they then decode together
        hs = submit_together(eng, [("generate", q, params) for q in qs])
        assert [h.result(120).token_ids for h in hs] == solo[:-1]
        keys = {k for wk in eng.group.workers for k in wk._graphs}
        assert any(k[2] > 0 for k in keys), keys          # the shared-prefix graph ran
        hs = [eng.submit("generate", q, params) for q in (qs[0], other)]
        assert [h.result(120).token_ids for h in hs] == [solo[0], solo[-1]]
        assert_no_leak(eng)
    finally:
        for e in (solo_eng, eng):
            e.shutdown()
            e.group.shutdown()


def test_progress_reports_prefill_tokens_and_decode(tmp_path_factory):
    """RequestHandle.progress(): queued -> prefill (prompt tokens computed, chunk by chunk) ->
    decode (tokens so far) -> done."""
    path, _, ref = reference(tmp_path_factory, "llama")
    eng = make_engine(path, 2, "striped", max_num_batched_tokens=8)
    try:
        ids = ref[1][0]
        seen = []
        box = []
        real = eng._update

        def spy(step, results):
            real(step, results)
            if box:
                seen.append(box[0].progress())

        eng._update = spy
        h = eng.submit("generate", ids, SamplingParams(max_tokens=5, temperature=0,
                                                        ignore_eos=True))
        box.append(h)
        h.result(60)
        pre = [p for p in seen if p.get("phase") == "prefill"]
        # 50 tokens in chunks of 8; the last 10 go in one (they fit the budget's quarter slack)
        assert [p["done"] for p in pre] == list(range(8, 48, 8))
        assert all(p["total"] == 50 and p["unit"] == "tokens" for p in pre)
        decode = [p for p in seen if p.get("phase") == "decode"]
        assert [p["done"] for p in decode] == [1, 2, 3, 4]
        assert h.progress() == {"state": "done"}
        q = eng.submit("score", ids)
        q.result(60)
        assert q.progress()["state"] == "done"
    finally:
        eng.shutdown()
        eng.group.shutdown()
    assert {"state": "queued"} == type(h)("generate", (), None, None).progress()


def test_compile_watch_records_and_chains_the_triton_hook(monkeypatch):
    """The worker's Triton compile log: the JIT cache hook records each compile (time, kernel)
    and keeps whatever hook was there before (its answer is Triton's)."""
    knobs = pytest.importorskip("triton.knobs")
    from ringserve.actors import model_worker

    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook",
                        lambda **kw: seen.append(kw["repr"]) or False)
    monkeypatch.setattr(model_worker, "_COMPILES", [])
    log = model_worker._watch_compiles()
    assert model_worker._watch_compiles() is log          # installed once per process
    t = time.time()
    assert knobs.runtime.jit_cache_hook(key=1, repr="_flash_fwd_kernel[num_warps=8](...)") is False
    assert seen == ["_flash_fwd_kernel[num_warps=8](...)"]
    assert len(log) == 1 and log[0][0] >= t and log[0][1].startswith("_flash_fwd_kernel")


def test_step_channel_option(monkeypatch):
    """EngineConfig.step_channel: "tasks" by default (RINGSERVE_STEP_CHANNEL sets the
    default), "compiled" by choice, anything else refused by name."""
    monkeypatch.delenv("RINGSERVE_STEP_CHANNEL", raising=False)
    assert EngineConfig().step_channel == "tasks"
    assert EngineConfig(step_channel="compiled").step_channel == "compiled"
    monkeypatch.setenv("RINGSERVE_STEP_CHANNEL", "compiled")
    assert EngineConfig().step_channel == "compiled"
    with pytest.raises(ValueError, match="step_channel"):
        EngineConfig(step_channel="grpc")
    monkeypatch.setenv("RINGSERVE_STEP_CHANNEL", "bogus")
    with pytest.raises(ValueError, match="step_channel"):
        EngineConfig()
    from ringserve import LLM            # refused before any actor starts
    with pytest.raises(ValueError, match="step_channel must be 'compiled' or 'tasks'"):
        LLM({"config": {}, "seed": 0}, step_channel="grpc")


@pytest.mark.parametrize("offered,channel", [(True, "compiled"), (False, "compiled"),
                                             (True, None)])
def test_engine_takes_the_step_channel_only_where_offered(tmp_path_factory, offered, channel,
                                                          monkeypatch):
    """The engine sends steps through `group.execute_step` only when asked for the compiled
    channel and the group says its workers have it (`has_step_channel`); otherwise (and by
    default) through `call_per_rank`; the tokens are the same either way."""
    monkeypatch.delenv("RINGSERVE_STEP_CHANNEL", raising=False)
    path = tiny_model(tmp_path_factory, "llama")
    group = ThreadGroup(1, model=str(path), kv_tokens=512, page_size=8)
    used = []

    def execute_step(plans, timeout_s=None):
        used.append(len(plans))
        return group.call_per_rank("execute", [(p,) for p in plans], timeout_s=timeout_s)

    group.execute_step, group.has_step_channel = execute_step, offered
    tok = Tokenizer.from_dir(path)
    eng = Engine(group, tok, tok.eos_token_ids,
                 EngineConfig(**({} if channel is None else {"step_channel": channel})))
    try:
        ids = tok.encode("the step channel")
        out = eng.submit("generate", ids, SamplingParams(max_tokens=5, temperature=0.0,
                                                        ignore_eos=True)).result(timeout=60)
        compiled = offered and channel == "compiled"
        assert eng.stats()["step_channel"] == ("compiled" if compiled else "tasks")
        assert bool(used) == compiled
        assert out.token_ids == hf_greedy(load_hf(path), ids, 5)
    finally:
        eng.shutdown()
