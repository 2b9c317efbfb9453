"""Issue 16 below HTTP: the logits processing against transformers' processors and a computed
reference, the batched sampler with masks and contexts against the row sampler, the grammar
masks on a real tokenizer (random logits, every output valid), n / best_of helpers, batch
records with schemas, and through `LLM` on the session's Ray cluster: n samples from one
prefill, best_of, and the batch job's extract task."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from ringserve.sampling import (SampleContext, SamplingParams, best_samples, expand_samples,
                                processed_logits, sample, sample_rows)

SEED = random.SystemRandom().randrange(1 << 30)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tinymodels import build_tokenizer
    path = tmp_path_factory.mktemp("structured-tok")
    build_tokenizer(path, "bytelevel-llama3", seed=5)
    return path


def test_penalties_match_transformers_and_openai_definitions():
    from transformers import (MinNewTokensLengthLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor)
    g = torch.Generator().manual_seed(SEED)
    V = 97
    x = torch.randn(V, generator=g, dtype=torch.float64).float() * 3
    prompt = torch.randint(0, V, (20,), generator=g).tolist()
    out = torch.randint(0, V, (9,), generator=g).tolist()
    ctx = SampleContext(1, out, sorted(set(prompt)), (7,))

    got = processed_logits(x, SamplingParams(repetition_penalty=1.7), len(out), ctx)
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + out]), x[None])[0]
    assert torch.equal(got, want)

    got = processed_logits(x, SamplingParams(frequency_penalty=0.6, presence_penalty=-0.4,
                                             logit_bias={3: 5.0, 50: -100.0}), len(out), ctx)
    want = x.clone().double()
    for t in set(out):     # OpenAI: mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
        want[t] -= out.count(t) * 0.6 - 0.4
    want[3] += 5.0
    want[50] -= 100.0
    assert torch.allclose(got.double(), want, atol=1e-5)

    p = SamplingParams(min_tokens=12, max_tokens=20, stop_token_ids=[9])
    got = processed_logits(x, p, len(out), ctx)
    hf = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=len(prompt), min_new_tokens=12,
                                           eos_token_id=[7, 9])
    want = hf(torch.tensor([prompt + out]), x[None])[0]
    assert torch.equal(got, want) and math.isinf(got[7]) and math.isinf(got[9])
    assert torch.equal(processed_logits(x, p, 12, ctx), x)     # from the 12th token on: free


def test_batched_sampler_equals_row_sampler_with_masks_and_contexts():
    g = torch.Generator().manual_seed(SEED + 1)
    V, B = 70, 6
    x = torch.randn(B, V, generator=g)
    words = (V + 31) // 32
    items, masks = [], {}
    for j in range(B):
        out = torch.randint(0, V, (j,), generator=g).tolist()
        p = SamplingParams(temperature=[0, 0.8, 1.3][j % 3], seed=SEED + j, top_k=[-1, 9][j % 2],
                           frequency_penalty=0.3 * j, logit_bias={j: 2.0},
                           top_logprobs=j % 4, max_tokens=10, min_tokens=[0, 8, 3][j % 3])
        items.append((p, len(out), SampleContext(j, out, None, (1,))))
        if j % 2:
            m = torch.randint(-(1 << 31), (1 << 31) - 1, (words,), generator=g, dtype=torch.int64)
            masks[j] = m.to(torch.int32)
    # row 1: min_tokens (8) is on and the grammar allows only EOS (its output is complete): EOS
    only_eos = torch.zeros(words, dtype=torch.int32)
    only_eos[0] = 1 << 1
    masks[1] = only_eos
    got = sample_rows(x, items, masks)
    assert got[1][0] == 1
    # the worker's form: one (B, words) bitmask, all ones on unconstrained rows: the same draws
    full = torch.full((B, words), -1, dtype=torch.int32)
    for j, m in masks.items():
        full[j] = m
    assert sample_rows(x, items, {j: full[j] for j in masks}, bitmask=full) == got
    for j, (p, step, ctx) in enumerate(items):
        want = sample(x[j], p, step, ctx, masks.get(j))
        assert got[j][0] == want[0] and math.isclose(got[j][1], want[1], rel_tol=1e-6)
        if p.top_logprobs:
            assert [t for t, _ in got[j][2]] == [t for t, _ in want[2]]
            assert len(got[j][2]) == p.top_logprobs
        if j in masks:   # the token obeys the mask
            t = got[j][0]
            assert (int(masks[j][t // 32]) >> (t % 32)) & 1


def _walk(masks, rid, grammar, V, rng, max_steps=300):
    """Sample random-logit tokens under the grammar's masks until EOS (the random model)."""
    out = []
    for _ in range(max_steps):
        bm = masks.fill([(rid, grammar, out)])[0]
        allowed = [t for t in range(V) if (int(bm[t // 32]) >> (t % 32)) & 1]
        assert allowed, "the grammar allowed no token"
        t = rng.choice(allowed)
        if t in masks._tokenizer().eos_tokens:
            return out, True
        out.append(t)
    return out, False


@pytest.mark.parametrize("kind", ["bytelevel-llama3", "metaspace-inst"])
def test_grammar_masks_make_random_tokens_valid(kind, tmp_path):
    from tinymodels import build_tokenizer

    jsonschema = pytest.importorskip("jsonschema")
    from ringserve.structured import GrammarMasks
    from ringserve.tokenizer import Tokenizer
    tok_dir = tmp_path / "tok"
    build_tokenizer(tok_dir, kind, seed=5)
    tok = Tokenizer.from_dir(tok_dir)
    V = tok.vocab_size + 5       # a model's vocabulary may be larger than the tokenizer's
    masks = GrammarMasks(str(tok_dir), V)
    rng = random.Random(SEED)
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,5}$"},
        "n": {"type": "integer", "minimum": -5, "maximum": 500},
        "tags": {"type": "array", "items": {"enum": ["x", "y z"]}, "maxItems": 2}},
        "required": ["name", "n", "tags"], "additionalProperties": False}
    cases = [(SamplingParams(guided_json=schema), lambda s: jsonschema.validate(json.loads(s),
                                                                                 schema)),
             (SamplingParams(guided_regex=r"[0-9]{2}(ab|cd)"),
              lambda s: __import__("re").fullmatch(r"[0-9]{2}(ab|cd)", s) or pytest.fail(s)),
             (SamplingParams(guided_choice=["port", "starboard"]),
              lambda s: s in ("port", "starboard") or pytest.fail(s))]
    finished = 0
    for rid, (p, check) in enumerate(cases * 4):
        out, done = _walk(masks, rid, p.grammar, V, rng)
        if done:
            # the metaspace test tokenizer's own decoder (Fuse, then Metaspace) drops every
            # space ("a y z b" -> "ayzb"); llguidance's reading of its tokens is the text
            check(tok.decode(out) if kind.startswith("bytelevel")
                  else masks._tokenizer().decode_str(out))
            finished += 1
    assert finished >= 10
    if kind == "metaspace-inst":   # the grammar reads "▁" as the space it stands for
        sp = tok.token_to_id("▁")
        assert masks._tokenizer().decode_bytes([sp, tok.token_to_id("▁a") or sp]) in (
            b"  ", b"  a")
    # a matcher that does not hold a prefix of the output is rebuilt (another rank sampled)
    p = SamplingParams(guided_choice=["port", "starboard"])
    a = masks.fill([(999, p.grammar, [])]).clone()
    ids = masks._tokenizer().tokenize_str("star")
    b = masks.fill([(999, p.grammar, ids)]).clone()
    c = masks.fill([(999, p.grammar, [])]).clone()
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert not masks.matcher(999, p.grammar, ids).is_error()
    # rows of one batch get their own masks
    both = masks.fill([(1000, p.grammar, []), (1001, p.grammar, ids)])
    assert torch.equal(both[0], a[0]) and torch.equal(both[1], b[0])


def test_expand_and_best_samples():
    p = SamplingParams(n=2, best_of=4, temperature=1.0, seed=11)
    each = expand_samples(p)
    assert len(each) == 4 and len({e.seed for e in each}) == 4 and each[0].seed == 11
    assert all(e.n == 1 and e.best_of is None and e.logprobs for e in each)
    assert expand_samples(SamplingParams()) == [SamplingParams()]

    from dataclasses import dataclass

    @dataclass
    class Out:
        text: str
        logprobs: list

    outs = [Out("a", [-1.0, -2.0]), Out("b", [-0.1]), Out("c", [-5.0]), Out("d", [-0.5, -0.4])]
    best = best_samples(outs, p)
    assert [o.text for o in best] == ["b", "d"] and best[0].logprobs is None
    assert best_samples(outs, SamplingParams(n=4)) == outs


def test_batch_records_with_schemas():
    from ringserve import batch
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    ok = json.dumps({"id": "e", "text": "t", "task": "extract", "schema": schema}).encode()
    assert batch.parse_line(ok, 1)[2] is None
    for obj, err in [({"task": "extract"}, "needs 'schema'"),
                     ({"task": "extract", "schema": {"type": "nope"}}, "Invalid type"),
                     ({"task": "summary", "schema": schema}, "'schema' is for"),
                     ({"task": "qa", "questions": ["q"], "schema": schema, "instruction": "x"},
                      "'instruction'")]:
        raw = json.dumps({"id": "x", "text": "t", **obj}).encode()
        _, rec, e = batch.parse_line(raw, 1)
        assert rec is None and err in str(e), (obj, e)


@pytest.fixture(scope="module")
def llm(ray_session, tmp_path_factory):
    from tinymodels import tiny_model

    from ringserve import LLM
    m = LLM(str(tiny_model(tmp_path_factory, "llama")), world_size=1, device="cpu",
            max_kv_tokens=4096, num_cpus_per_worker=0.5)
    yield m
    m.shutdown()


def test_llm_n_samples_share_one_prefill_and_best_of(llm):
    rng = random.Random(SEED)
    prompt = [rng.randrange(3, 300) for _ in range(90)]
    before = llm.stats()["prefill_tokens"]
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=5, temperature=1.0,
                                                seed=SEED, logprobs=True))[0]
    spent = llm.stats()["prefill_tokens"] - before
    assert len(out.outputs) == 3 and out.outputs[0] is not None
    assert spent == len(prompt) + 2          # one prefill; the others rerun the last token
    assert sorted(o.num_cached_tokens for o in out.outputs) == [0, 89, 89]
    best = llm.generate([prompt], SamplingParams(n=1, best_of=3, max_tokens=5, temperature=1.0,
                                                 seed=SEED))[0]
    sums = [sum(o.logprobs) for o in out.outputs]
    assert best.token_ids == out.outputs[sums.index(max(sums))].token_ids
    assert best.logprobs is None and len(best.outputs) == 1
    from ringserve.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="one sample"):
        llm.stream(prompt, SamplingParams(n=2))


def test_batch_extract_task(llm, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from ringserve import batch
    schema = {"type": "object", "properties": {
        "owner": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "tons": {"type": "integer", "minimum": 1, "maximum": 999}},
        "required": ["owner", "tons"], "additionalProperties": False}
    doc = "The ship Morning Star of 699 tons burthen is owned by Eleanor Marchbank."
    recs = [{"id": "x", "text": doc, "task": "extract", "schema": schema, "max_tokens": 60},
            {"id": "q", "text": doc, "task": "qa", "questions": ["Owner?", "Tons?"],
             "schema": {"enum": ["Eleanor", "Clara"]}, "max_tokens": 10}]
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    results = batch.ResultsFile(outp)
    prompter = batch.Prompter(llm.tokenizer, "auto")
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=SEED)
    import io
    batch.process(llm, inp, results, prompter, params, out=io.StringIO())
    results.close()
    got = {r["id"]: r for r in map(json.loads, outp.read_text().splitlines())}
    assert got["x"]["ok"], got["x"]
    if got["x"]["finish_reason"] == "stop":
        jsonschema.validate(got["x"]["data"], schema)
    else:
        assert got["x"]["data"] is None and got["x"]["text"].startswith("{")
    assert got["q"]["ok"], got["q"]
    assert [a["data"] for a in got["q"]["answers"]] == [a["answer"].strip('"')
                                                        for a in got["q"]["answers"]]
    assert all(a["data"] in ("Eleanor", "Clara") for a in got["q"]["answers"])


@pytest.mark.gpu
def test_masked_sampler_on_the_gpu_matches_the_cpu(tok_dir):
    """The worker's path on CUDA: masks filled into pinned host memory, copied without
    blocking and applied on the device; the greedy rows pick the same tokens as on the CPU
    (a seeded draw is not: torch's CUDA and CPU generators differ), every token is allowed,
    and every log-prob is the model's own for the token drawn."""
    from ringserve.sampling import Sampler
    from ringserve.tokenizer import Tokenizer
    V = Tokenizer.from_dir(tok_dir).vocab_size
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(8, V, generator=g)
    specs = []
    for j in range(8):
        p = SamplingParams(temperature=[0, 1.0][j % 2], seed=SEED + j, max_tokens=8,
                           guided_choice=["port", "starboard", "aft"] if j % 3 else None,
                           frequency_penalty=0.5, top_logprobs=2)
        specs.append((p, 0, SampleContext(j, [], None, ())))
    s = Sampler(str(tok_dir), V)
    s.start(specs)
    on_gpu = s.sample(x.cuda(), specs, s.prepare(specs))
    s.start(specs)
    prepared = s.prepare(specs)
    assert prepared[1].is_pinned()
    on_cpu = s.sample(x, specs, prepared)
    where, bm = prepared
    assert sorted(where) == [j for j in range(8) if j % 3]
    lsm = torch.log_softmax(x, dim=-1)
    for j, ((tok, lp, top), (tok2, lp2, _)) in enumerate(zip(on_gpu, on_cpu)):
        if j % 2 == 0:                                     # greedy
            assert tok == tok2 and math.isclose(lp, lp2, abs_tol=1e-4)
        assert math.isclose(lp, float(lsm[j, tok]), abs_tol=1e-4) and len(top) == 2
        for t in (tok, tok2):
            if j in where:
                assert (int(bm[j][t // 32]) >> (t % 32)) & 1


@pytest.mark.gpu
def test_llm_structured_decode_through_cuda_graphs(tmp_path_factory):
    """CUDA's defaults (graphs, fused kernels) with grammar masks computed on the sampler's
    helper thread while decode graphs are captured and replayed: no capture fails (the mask
    thread's pinned allocation had invalidated the first capture on the H200), the decode
    steps replay graphs, and every finished output parses and has the schema's keys."""
    import ray
    from tinymodels import tiny_model
    from ringserve import LLM
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    m = LLM(str(tiny_model(tmp_path_factory, "llama")), world_size=1, device="cuda",
            dtype="bfloat16")
    try:
        schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                   "n": {"type": "integer"}},
                  "required": ["name", "n"], "additionalProperties": False}
        rng = random.Random(SEED)
        prompts = [[rng.randrange(3, 300) for _ in range(40)] for _ in range(4)]
        outs = m.generate(prompts, SamplingParams(max_tokens=48, temperature=1.0, seed=SEED,
                                                  guided_json=schema))
        st = m.stats()
        assert st["graph_capture_failures"] == 0 and st["worker_failures"] == 0, st
        assert m._group.call("graph_stats")[0]["replays"] > 0
        for o in outs:
            if o.finish_reason == "stop":
                assert set(json.loads(o.text)) == {"name", "n"}
    finally:
        m.shutdown()


def test_llm_cancelled_sample_leaves_the_others(llm):
    from ringserve.errors import RequestCancelledError
    rng = random.Random(SEED + 1)
    prompt = [rng.randrange(3, 300) for _ in range(120)]
    lead = llm.submit(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    other = llm.submit(prompt, SamplingParams(max_tokens=64, temperature=1.0, seed=1,
                                              ignore_eos=True))
    other.cancel()
    try:
        out = other.result(timeout=120)
        assert out.finish_reason == "cancelled" and len(out.token_ids) < 64
    except RequestCancelledError:
        pass
    assert len(lead.result(timeout=120).token_ids) == 6


def test_mask_threads_follow_the_cpu_quota_and_the_environment(monkeypatch):
    """llguidance's own default (80% of the CPUs the machine shows, up to 32) oversubscribes a
    container's CPU quota; the mask executor is sized from the quota and affinity instead."""
    from ringserve import structured
    monkeypatch.setattr(structured.os, "sched_getaffinity", lambda _pid: set(range(64)))
    files = {"/sys/fs/cgroup/cpu.max": "400000 100000"}
    monkeypatch.setattr(structured, "_read", files.get)
    assert structured.usable_cpus() == 4
    monkeypatch.delenv("RINGSERVE_MASK_THREADS", raising=False)
    assert structured.mask_threads() == 3              # one CPU left to the worker's thread
    files["/sys/fs/cgroup/cpu.max"] = "max 100000"     # no quota: the affinity, capped
    assert structured.usable_cpus() == 64 and structured.mask_threads() == 8
    del files["/sys/fs/cgroup/cpu.max"]                 # cgroup v1
    files.update({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "150000",
                  "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000"})
    assert structured.usable_cpus() == 1 and structured.mask_threads() == 1
    monkeypatch.setenv("RINGSERVE_MASK_THREADS", "5")
    assert structured.mask_threads() == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("RINGSERVE_MASK_THREADS", bad)
        with pytest.raises(ValueError, match="RINGSERVE_MASK_THREADS"):
            structured.mask_threads()


def test_grammar_masks_buffer_made_in_inference_mode_fills_on_another_thread(tmp_path):
    """The worker fills the masks' host buffer on its own thread inside inference mode (graph
    steps) and on the sampler's helper thread outside it (eager steps). Made first inside the
    mode, the buffer was an inference tensor the helper could not update in place: a batch-1
    masked request after graph steps failed its step on the H200. Either order works."""
    from concurrent.futures import ThreadPoolExecutor

    from tinymodels import build_tokenizer
    from ringserve.structured import GrammarMasks
    from ringserve.tokenizer import Tokenizer
    tok_dir = tmp_path / "tok"
    build_tokenizer(tok_dir, "bytelevel-llama3", seed=5)
    V = Tokenizer.from_dir(tok_dir).vocab_size
    g = SamplingParams(guided_choice=["port", "starboard"]).grammar
    masks = GrammarMasks(str(tok_dir), V)
    with torch.inference_mode():                       # a graph step's fill, first
        first = masks.fill([(1, g, []), (2, g, [])]).clone()
    with ThreadPoolExecutor(1) as pool:                # then the helper's, outside the mode
        again = pool.submit(lambda: masks.fill([(3, g, [])]).clone()).result()
    assert torch.equal(again[0], first[0])
    with torch.inference_mode():                       # and back
        assert torch.equal(masks.fill([(4, g, [])])[0], first[0])
