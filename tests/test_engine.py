"""The engine and the model shard workers in one process: each rank a real ModelShardWorker
on its own thread, joined by the in-process ThreadTransport (ringserve.parallel.transport), so the
whole matrix (3 families x world sizes 1, 2, 3 x both schedules) is compared with HF transformers
without paying Ray actor start-up per configuration. tests/test_llm*.py cover the same paths
through Ray actors and gloo."""
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tinymodels import hf_greedy, load_hf, tiny_model
from ringserve.actors.model_worker import ModelShardWorker
from ringserve.doc_cache import doc_key
from ringserve.engine import Engine, EngineConfig, balanced_counts
from ringserve.errors import CapacityError
from ringserve.parallel.transport import ThreadHub
from ringserve.sampling import SamplingParams
from ringserve.tokenizer import Tokenizer

FAMILIES = ("llama", "mistral", "qwen2")
CONFIGS = [(f, 1, "striped") for f in FAMILIES] + [
    (f, n, s) for f in FAMILIES for n in (2, 3) for s in ("ring", "striped")] + [
    ("llama-mha", 2, "ring"), ("llama-sharded", 3, "striped")]  # MHA + biases; sharded weights
PROMPT_LENS = (37, 50)
NEW_TOKENS = 32


class ThreadGroup:
    """The ActorGroup interface over in-process workers: call() runs a method on every rank
    at once (one thread per rank), results in rank order, the first error re-raised."""

    def __init__(self, world_size, **worker_kwargs):
        self.world_size = world_size
        self._kw = worker_kwargs
        self._pool = ThreadPoolExecutor(world_size)
        self._start()

    def _start(self):
        hub = ThreadHub(self.world_size)
        self.workers = [ModelShardWorker(r, self.world_size, "cpu", **self._kw)
                        for r in range(self.world_size)]
        for r, w in enumerate(self.workers):
            w.transport = hub.transport(r, timeout_s=60)

    def call(self, method, *args, **kwargs):
        futs = [self._pool.submit(getattr(w, method), *args) for w in self.workers]
        return [f.result() for f in futs]

    def rebuild(self):
        self._start()

    def shutdown(self):
        self._pool.shutdown()


_REF = {}



def reference(tmp_path_factory, family):
    if family not in _REF:
        path = tiny_model(tmp_path_factory, family)
        hf = load_hf(path)
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        g = torch.Generator().manual_seed(7 + sum(map(ord, family)))
        prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist()
                   for n in PROMPT_LENS]
        out = []
        with torch.no_grad():
            for ids in prompts:
                x = torch.tensor([ids])
                lp = torch.log_softmax(hf(x).logits[0].double(), -1)[:-1]
                lp = lp.gather(1, x[0, 1:, None])[:, 0]
                out.append((ids, lp, hf_greedy(hf, ids, NEW_TOKENS)))
        _REF[family] = (path, hf, out)
    return _REF[family]


def assert_no_leak(eng):
    """Every sequence on every rank is one the document cache knows (nothing leaked), and the
    free pages are exactly those no cached sequence holds."""
    known = {e.seq_id for e in eng.doc_cache.entries()}
    for w in eng.group.workers:
        assert set(w.cache.seq_ids()) == known
        held = set()
        for sid in known:
            held.update(w.cache._seqs[sid].pages)
        scratch = w.cache._scratch is not None   # set aside for CUDA-graph decode
        assert w.cache.num_free_pages == w.cache.num_pages - len(held) - scratch
    free = sum(w.cache.num_free_pages * w.cache.page_size for w in eng.group.workers)
    assert eng.stats()["kv_tokens_free"] == free    # stats are current after each request


def make_engine(path, ws, schedule, kv_tokens=1024, worker_kwargs=None, **cfg):
    group = ThreadGroup(ws, model=str(path), kv_tokens=kv_tokens, page_size=8,
                        **(worker_kwargs or {}))
    tok = Tokenizer.from_dir(path)
    return Engine(group, tok, tok.eos_token_ids, EngineConfig(schedule=schedule, **cfg))


@pytest.mark.parametrize("family,ws,schedule", CONFIGS,
                         ids=[f"{c[0]}-ws{c[1]}-{c[2]}" for c in CONFIGS])
def test_matrix_score_and_greedy_equal_transformers(tmp_path_factory, family, ws, schedule):
    path, _, ref = reference(tmp_path_factory, family)
    # several decode steps per call (tokens broadcast from rank 0) on the multi-rank configs
    eng = make_engine(path, ws, schedule, decode_steps=1 if ws == 1 else 5)
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


def test_multi_step_decode_stops_and_trims_like_single_steps(tmp_path_factory):
    """decode_steps=4: a stop string, a stop id or max_tokens inside a 4-token burst gives the
    same output as one step per call, and the K/V of tokens sampled past the stop are trimmed
    (the cached sequence is prompt + output[:-1], reused exactly by the next request)."""
    path, _, _ = reference(tmp_path_factory, "qwen2")
    from ringserve.sample_document import sample_document

    one = make_engine(path, 2, "ring", decode_steps=1)
    four = make_engine(path, 2, "ring", decode_steps=4)
    try:
        tok = one.tokenizer
        prompt = tok.encode(sample_document(n_words=40, seed=5))
        full = one.submit("generate", prompt, SamplingParams(
            max_tokens=23, temperature=0, ignore_eos=True)).result(60)
        stop = full.text[9:12]
        cases = [SamplingParams(max_tokens=23, temperature=0, ignore_eos=True),
                 SamplingParams(max_tokens=23, temperature=0, ignore_eos=True, stop=[stop]),
                 SamplingParams(max_tokens=23, temperature=0, ignore_eos=True,
                                stop_token_ids=[full.token_ids[6]]),
                 SamplingParams(max_tokens=23, temperature=0.8, seed=3, ignore_eos=True,
                                logprobs=True)]
        for p in cases:
            a = one.submit("generate", prompt, p).result(60)
            b = four.submit("generate", prompt, p).result(60)
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text,
                                                              a.finish_reason)
            if p.logprobs:
                torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs),
                                           rtol=0, atol=1e-5)
            kept = prompt + b.token_ids[:-1]
            e = four.doc_cache.get(doc_key(torch.tensor(kept, dtype=torch.int32)))
            assert e is not None
            assert sum(w.cache.seq_len(e.seq_id) for w in four.group.workers) == len(kept)
            assert_no_leak(four)
        assert cases[1].stop and four.stats()["requests_failed"] == 0
    finally:
        for eng in (one, four):
            eng.shutdown()
            eng.group.shutdown()


def test_balanced_counts_follows_the_fewest_tokens_rule():
    for counts, n in (([5, 0, 3], 7), ([0, 0], 5), ([4, 4, 4], 2), ([9, 1], 3), ([2, 7, 7], 40)):
        c = list(counts)
        for _ in range(n):
            c[c.index(min(c))] += 1
        assert balanced_counts(counts, n) == c


def test_cuda_graph_width_is_agreed_by_every_rank():
    """The decode-graph width comes from one all-gather, so ranks holding different numbers of
    pages still pick the same bucket (a power of two >= the most pages any rank will need):
    otherwise one rank would capture (running collectives) while another replays."""
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=100,
               hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=4096, hidden_act="silu", tie_word_embeddings=False)
    g = ThreadGroup(2, model={"config": cfg, "seed": 0}, dtype="float32", page_size=4,
                    kv_tokens=512)
    try:
        # rank 0 holds 80 tokens (20 pages), rank 1 only 4 (1 page)
        for w, n in zip(g.workers, (80, 4)):
            w.cache.append_slots("s", torch.arange(n))
        widths = g.call("_graph_width", "s", 8)
        assert widths == [32, 32]          # pages_for(80 + 8) = 22 -> 32 on both ranks
        assert g.call("_graph_width", "s", 1) == [32, 32]  # 21 pages
        for w in g.workers:
            w.cache.free("s")
        assert g.call("_graph_width", "s", 1) == [16, 16]  # the smallest bucket
    finally:
        g.shutdown()


@pytest.mark.parametrize("family,ws,steps", [("llama", 1, 1), ("mistral", 3, 5),
                                             ("qwen2", 2, 1)])
def test_graph_decode_path_equals_transformers(tmp_path_factory, family, ws, steps):
    """The CUDA-graph decode path run on CPU (cuda_graphs="emulate": same static buffers,
    scratch-page writes on non-owner ranks, agreed widths, the body run at each replay): greedy
    tokens equal HF's, also when a prompt reuses a cached document's prefix (fork, trim,
    copy-on-write) and past a width bucket (16 pages of 8 tokens)."""
    path, hf, ref = reference(tmp_path_factory, family)
    eng = make_engine(path, ws, "striped", worker_kwargs={"cuda_graphs": "emulate"},
                      decode_steps=steps)
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
        widths = {w for wk in eng.group.workers for w in wk._graphs}
        assert 16 in widths and (ws > 1 or 32 in widths)   # 137 tokens: 18 pages on one rank
        assert_no_leak(eng)
    finally:
        eng.shutdown()
        eng.group.shutdown()


def test_progress_reports_prefill_layers_extension_and_decode(tmp_path_factory, monkeypatch):
    """RequestHandle.progress(): queued -> prefill (rank 0 reports every layer it starts, then
    the end) -> decode (tokens so far) -> done; a cached prefix gives an "extend" phase."""
    from ringserve import progress as progress_mod

    path, _, ref = reference(tmp_path_factory, "llama")
    reports = []
    real_update = progress_mod.ProgressBoard.update

    def spy(self, key, done, total):
        reports.append((done, total))
        real_update(self, key, done, total)

    monkeypatch.setattr(progress_mod.ProgressBoard, "update", spy)
    eng = make_engine(path, 2, "striped", progress_min_tokens=0)
    try:
        layers = eng._infos[0]["num_layers"]
        ids = ref[0][0]
        seen = []
        box = []

        def on_delta(d):
            if box:
                seen.append(box[0].progress())

        h = eng.submit("generate", ids, SamplingParams(max_tokens=5, temperature=0,
                                                        ignore_eos=True), on_delta=on_delta)
        box.append(h)
        h.result(60)
        # one report per layer from rank 0 only (not one per rank), then the end
        assert reports == [(i, layers) for i in range(layers)] + [(layers, layers)]
        decode = [p for p in seen if p.get("phase") == "decode"]
        assert decode and all(p["state"] == "running" and p["total"] == 5 for p in decode)
        assert [p["done"] for p in decode] == sorted(p["done"] for p in decode)
        assert h.progress() == {"state": "done"}
        # the same prompt plus more tokens: its prefix is cached, the rest is an extension
        reports.clear()
        phases = []
        real_phase = Engine._phase
        monkeypatch.setattr(Engine, "_phase", staticmethod(
            lambda hh, *a: (phases.append(a), real_phase(hh, *a))))
        h2 = eng.submit("generate", ids + ids[:20], SamplingParams(max_tokens=1))
        h2.result(60)
        assert reports == [] and h2.progress() == {"state": "done"}
        assert phases[0] == ("extend", 0, 20, "tokens")   # the 37-token prompt is cached
        q = eng.submit("score", ids)
        q.result(60)
        assert q.progress()["state"] == "done"
    finally:
        eng.shutdown()
        eng.group.shutdown()
    assert {"state": "queued"} == type(h)("generate", (), None, None).progress()
