"""ringserve.LLM features on real Ray actors (one shared 2-rank group, tiny Llama, fp32): streaming,
the document cache, seeded sampling, stop strings and ids, concurrent callers, cancellation,
timeouts, capacity errors, and recovery from a dead shard actor."""
import threading

import pytest
import torch

from tinymodels import hf_greedy, load_hf, tiny_model
from ringserve import LLM, RequestOutput, SamplingParams, StreamDelta
from ringserve.errors import CapacityError, RequestTimeoutError
from ringserve.sample_document import sample_document

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(ray_session, tmp_path_factory):
    path = tiny_model(tmp_path_factory, "llama")
    # prompts go in chunks of 64 tokens (256 while one runs alone)
    m = LLM(str(path), world_size=2, layout="striped", max_kv_tokens=2048,
            num_cpus_per_worker=0.5, max_num_batched_tokens=64)
    m.hf = load_hf(path)
    m.hf.generation_config.eos_token_id = None
    m.hf.generation_config.pad_token_id = 0
    yield m
    m.shutdown()


def text(seed, words=60):
    return sample_document(n_words=words, seed=seed)


def test_stream_deltas_add_up_to_the_final_output(llm):
    items = list(llm.stream(text(1), SamplingParams(max_tokens=20, **GREEDY)))
    *deltas, final = items
    assert isinstance(final, RequestOutput) and all(isinstance(d, StreamDelta) for d in deltas)
    assert [d.token_id for d in deltas] == final.token_ids and len(deltas) == 20
    assert "".join(d.text for d in deltas) == final.text
    assert final.token_ids == llm.generate(text(1), SamplingParams(max_tokens=20, **GREEDY)
                                           )[0].token_ids
    assert final.prompt_token_ids == llm.tokenizer.encode(text(1))
    t = final.timings
    assert 0 < t["prefill_s"] <= t["ttft_s"] and t["decode_s"] > 0
    # 19 intervals between the 20 tokens: each within the decode time
    assert 0 < t["itl_median_s"] <= t["itl_p90_s"] <= t["itl_max_s"] <= t["decode_s"]
    assert t["itl_median_s"] * 9 <= t["decode_s"]     # the 9 intervals above the median
    one = llm.generate(text(1), SamplingParams(max_tokens=1, **GREEDY))[0].timings
    assert "itl_median_s" not in one and one["decode_s"] >= 0


def test_document_cache_reuse_gives_cold_prefill_tokens(llm):
    doc = llm.tokenizer.encode(text(2, 120))
    question = llm.tokenizer.encode(" What is the ship called?", add_special_tokens=False)
    key = llm.cache_document(doc)
    before = llm.stats()
    assert before["pinned_documents"] >= 1
    out = llm.generate([doc + question], SamplingParams(max_tokens=16, **GREEDY))[0]
    assert out.num_cached_tokens == len(doc)
    assert out.token_ids == hf_greedy(llm.hf, doc + question, 16, full_forward=True)
    after = llm.stats()
    assert after["prefill_tokens"] - before["prefill_tokens"] == len(question)
    assert llm.drop_document(key) is True and llm.drop_document(key) is False


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                       ignore_eos=True, logprobs=True)
    # the two run together (continuous batching): same seed, same tokens
    a, a2 = llm.generate([text(3), text(3)], p)
    assert a.token_ids == a2.token_ids
    # b reuses a's cached prompt (pass-Q instead of ring prefill): same tokens, logprobs equal
    # to float32 rounding
    b = llm.generate([text(3)], p)[0]
    assert a.token_ids == b.token_ids and b.num_cached_tokens == len(a.prompt_token_ids) - 1
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0,
                               atol=1e-5)
    c = llm.generate(text(3), SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95,
                                              top_k=50, seed=99, ignore_eos=True))[0]
    assert c.token_ids != a.token_ids
    greedy = llm.generate(text(3), SamplingParams(max_tokens=24, **GREEDY))[0]
    top1 = llm.generate(text(3), SamplingParams(max_tokens=24, top_k=1, seed=5,
                                                 ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_strings_and_stop_token_ids(llm):
    full = llm.generate(text(4), SamplingParams(max_tokens=30, **GREEDY))[0]
    stop = full.text[8:11]
    assert len(stop) == 3
    cut = llm.generate(text(4), SamplingParams(max_tokens=30, stop=[stop], **GREEDY))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    tid = full.token_ids[5]
    k = full.token_ids.index(tid)
    by_id = llm.generate(text(4), SamplingParams(max_tokens=30, stop_token_ids=[tid],
                                                  **GREEDY))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[:k + 1]


def test_concurrent_callers_each_get_their_own_answer(llm):
    prompts = [text(10 + i, 30 + 7 * i) for i in range(6)]
    p = SamplingParams(max_tokens=10, **GREEDY)
    expected = [o.token_ids for o in llm.generate(prompts, p)]
    got = [None] * len(prompts)

    def run(i):
        got[i] = llm.generate(prompts[i], p)[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected


def test_closing_a_stream_cancels_it(llm):
    before = llm.stats()["requests_cancelled"]
    it = llm.stream(text(5), SamplingParams(max_tokens=500, **GREEDY))
    first = next(it)
    assert isinstance(first, StreamDelta)
    it.close()
    out = llm.generate(text(5), SamplingParams(max_tokens=3, **GREEDY))[0]  # queued behind it
    assert len(out.token_ids) == 3
    s = llm.stats()
    assert s["requests_cancelled"] == before + 1
    assert s["generated_tokens"] < 500 * 2  # the cancelled request stopped early


def test_capacity_and_timeout_errors(llm):
    ids = llm.tokenizer.encode(text(6))
    before = llm.stats()["prefill_tokens"]
    with pytest.raises(CapacityError) as ei:
        llm.generate(ids, SamplingParams(max_tokens=llm.capacity_tokens))
    assert ei.value.requested == len(ids) + llm.capacity_tokens
    assert ei.value.capacity == llm.capacity_tokens == 2048
    assert llm.stats()["prefill_tokens"] == before
    with pytest.raises(RequestTimeoutError):
        llm.generate(ids, SamplingParams(max_tokens=400, **GREEDY), timeout_s=0.05)


def test_dead_worker_costs_no_request_the_group_is_rebuilt(llm):
    """A shard actor dies between requests: the next request's first step fails, the group
    is rebuilt (empty caches), and the request is recomputed there: same tokens, no error."""
    import ray

    p = SamplingParams(max_tokens=8, **GREEDY)
    expected = llm.generate(text(7), p)[0].token_ids
    s0 = llm.stats()
    ray.kill(llm._group.actors[1])
    out = llm.generate(text(7), p)[0]
    assert out.token_ids == expected and out.timings["recoveries"] == 1
    assert out.num_cached_tokens == 0           # the cache went with the old actors
    s = llm.stats()
    assert s["worker_failures"] == s0["worker_failures"] + 1
    assert s["requests_failed"] == s0["requests_failed"] and s["cached_documents"] == 1


def test_deprecated_names_still_work(llm):
    """`schedule` (now `layout`), `extend_chunk` and `decode_steps` are accepted with a
    DeprecationWarning, checked before any actor starts."""
    from ringserve import LLM
    from ringserve.engine import EngineConfig

    with pytest.warns(DeprecationWarning, match="layout"):
        cfg = EngineConfig(schedule="ring")
    assert cfg.layout == "ring"
    with pytest.warns(DeprecationWarning, match="passq_max_tokens"):
        assert EngineConfig(extend_chunk=7).passq_max_tokens == 7
    with pytest.warns(DeprecationWarning, match="layout"), \
            pytest.raises(ValueError, match="layout must be one of"):
        LLM("/nonexistent", schedule="zigzag")
    with pytest.warns(DeprecationWarning, match="decode_steps"), \
            pytest.raises(ValueError, match=r"world_size \(0\)"):
        LLM("/nonexistent", world_size=0, decode_steps=4)
    with pytest.warns(DeprecationWarning, match="LLM.layout"):
        assert llm.schedule == "striped"


def test_off_cuda_the_defaults_are_the_eager_torch_path(llm):
    """cuda_graphs and fused_kernels default to True on CUDA only: on CPU, eager steps and
    the torch kernels (what every other test of this module checks against transformers)."""
    assert llm.config.cuda_graphs is False
    assert llm._group.call("features") == [{"cuda_graphs": False, "fused_kernels": False}] * 2
    assert llm._group.call("graph_stats") == [{"graphs": 0, "replays": 0, "evictions": 0,
                                               "captured_ahead": 0, "pipelined": 0,
                                               "advances": 0}] * 2


def test_bad_options_fail_before_any_work():
    """Checked in the driver before Ray, a tokenizer or a checkpoint is touched."""
    from ringserve import LLM

    with pytest.raises(ValueError, match="cuda_graphs=True needs device='cuda'"):
        LLM("/nonexistent", device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        LLM("/nonexistent", backend="fast")
    with pytest.raises(ValueError, match="fused_kernels must be True, False or None"):
        LLM("/nonexistent", fused_kernels="yes")
    with pytest.raises(ValueError, match="cuda_graphs must be True, False, 'emulate' or None"):
        LLM("/nonexistent", cuda_graphs="always")
    with pytest.raises(ValueError, match="max_cuda_graphs must be an integer >= 1"):
        LLM("/nonexistent", max_cuda_graphs=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="worker_torch_threads must be an integer >= 1"):
            LLM("/nonexistent", worker_torch_threads=bad)
        with pytest.raises(ValueError, match="mla_expand_min_tokens must be an integer >= 1"):
            LLM("/nonexistent", mla_expand_min_tokens=bad)
    with pytest.raises(ValueError, match=r"world_size \(0\)"):
        LLM("/nonexistent", world_size=0)


def test_cache_document_never_reports_an_ended_request():
    """The race behind a flaky run of the test below: the request ends between the progress
    wait timing out and the progress read. on_progress only ever sees "queued" or "running"
    (the end is what cache_document returns); here the engine is a stub that ends the request
    exactly inside the second read, so the race happens every time."""
    import concurrent.futures

    class Handle:
        def __init__(self):
            self.future = concurrent.futures.Future()
            self.reads = 0

        def progress(self):
            self.reads += 1
            if self.reads == 1:
                return {"state": "running", "phase": "prefill", "unit": "layers", "done": 1,
                        "total": 2}
            self.future.set_result("doc-key")  # the engine marks it done, then answers
            return {"state": "done"}

        def result(self, timeout=None):
            return self.future.result(timeout)

    h = Handle()
    stub = object.__new__(LLM)
    stub._engine = type("Eng", (), {"submit": lambda self, *a, **k: h})()
    stub.tokenizer = None
    seen = []
    assert stub.cache_document([1, 2, 3], on_progress=seen.append,
                               progress_interval_s=0.001) == "doc-key"
    assert h.reads == 2 and [p["state"] for p in seen] == ["running"], seen


def test_cache_document_reports_prefill_progress(llm):
    """A prefill over Ray actors in chunks: on_progress sees the request queued or in its
    prefill (prompt tokens computed, growing), the document is cached all the same, and a
    finished request reads "done"."""
    seen = []
    doc = text(41, words=400)
    key = llm.cache_document(doc, on_progress=seen.append, progress_interval_s=0.002)
    assert key in [e.key for e in llm._engine.doc_cache.entries()]
    for p in seen:
        assert p["state"] in ("queued", "running")
        if p.get("phase") == "prefill":
            assert p["unit"] == "tokens" and 0 < p["done"] < p["total"] == len(
                llm.tokenizer.encode(doc))
    pre = [p["done"] for p in seen if p.get("phase") == "prefill"]
    assert pre and pre == sorted(pre), seen
    h = llm.submit(text(42, words=30), SamplingParams(max_tokens=3, **GREEDY))
    h.result(60)
    assert h.progress() == {"state": "done"}
    with pytest.raises(ValueError, match="progress_interval_s"):
        llm.cache_document(doc, on_progress=print, progress_interval_s=0)
    assert llm.drop_document(key)


def test_worker_torch_threads_reach_the_actors(ray_session, tmp_path_factory):
    """A Ray actor starts with one torch intra-op thread per CPU it reserved;
    worker_torch_threads sets them in every worker, and generation is unchanged."""
    from ringserve import SamplingParams
    path = tiny_model(tmp_path_factory, "llama")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 40))
    outs = []
    for threads in (None, 2):
        m = LLM(str(path), world_size=1, max_kv_tokens=512, num_cpus_per_worker=0.5,
                worker_torch_threads=threads)
        try:
            if threads:
                assert m._group.call("torch_threads") == [threads]
            outs.append(m.generate([prompt], params)[0].token_ids)
        finally:
            m.shutdown()
    assert outs[0] == outs[1] and len(outs[0]) == 6


def test_step_budgets_defaults():
    """CUDA: 2100 token-equivalents per rank a step (with one interleaved decode step: the
    prefill-under-load trade-off measured in session 13), a lone prompt at least 32768 per rank
    (the earlier default's 4096 x 8, so a single request's prefill keeps its step sizes); an
    explicit budget keeps the 8x factor when that is more; CPU: 512 and 4x."""
    from ringserve.llm import step_budgets
    assert step_budgets(True, 1) == (2100, 16)
    assert step_budgets(True, 2) == (4200, 16)
    for ws in (1, 2, 3):
        b, f = step_budgets(True, ws)
        assert b * f >= 32768 * ws
    assert step_budgets(True, 1, 4096) == (4096, 8)
    assert step_budgets(True, 1, 8192) == (8192, 8)
    assert step_budgets(True, 1, 1000) == (1000, 33)
    assert step_budgets(False, 1) == (512, 4)
    assert step_budgets(False, 2, 300) == (300, 4)


def test_interleave_default_follows_the_device(tmp_path):
    """interleave_decode_steps: one decode-only step after each mixed step on CUDA (its
    measured default, with the 2100 budget), none on CPU unless asked; a given value is kept,
    and a bad one refused by LLM before any actor starts (EngineConfig's check)."""
    from ringserve.llm import interleave_steps
    assert interleave_steps(True, None) == 1
    assert interleave_steps(False, None) == 0
    assert interleave_steps(True, 0) == 0 and interleave_steps(False, 2) == 2
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="interleave_decode_steps"):
            LLM(str(tmp_path), interleave_decode_steps=bad)
