"""Issue 16 over HTTP with the real `openai` client: structured output (JSON schema, json_object,
regex, choice) on a random-weight model (the constraint, not the model, must make it valid), n > 1
from one prefill, top_logprobs against a full-vocabulary softmax (transformers on the same
checkpoint) and the score path (echo), penalties against a computed reference and transformers'
processors, /tokenize and /detokenize, and the 400s of bad values.

One Serve app (world size 2: a prompt's first token may be sampled by another rank than its
decode steps, so the grammar matcher moves between ranks).
"""
from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pytest
import torch

from servehelpers import start_serve
from tinymodels import tiny_model

pytestmark = pytest.mark.timeout(600)

MODEL = "llama"
SEED = random.SystemRandom().randrange(1 << 30)
WORDS = ("ship cargo master owner port freight charter voyage clause tons harbour wind sail "
         "deck anchor tide merchant lien bill lading crew").split()

SCHEMAS = [
    # nested objects, string patterns, integer bounds, required fields
    {"type": "object", "properties": {
        "party": {"type": "object", "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
            "role": {"enum": ["owner", "master", "charterer"]}},
            "required": ["name", "role"], "additionalProperties": False},
        "tons": {"type": "integer", "minimum": 1, "maximum": 9999}},
     "required": ["party", "tons"], "additionalProperties": False},
    # arrays of enums, booleans, numbers
    {"type": "object", "properties": {
        "ports": {"type": "array", "items": {"enum": ["Leith", "Hull", "Cork"]},
                  "minItems": 1, "maxItems": 3},
        "insured": {"type": "boolean"},
        "rate": {"type": "number", "minimum": 0, "maximum": 100}},
     "required": ["ports", "insured", "rate"], "additionalProperties": False},
    # an array of objects with a date-like pattern
    {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "amount": {"type": "integer", "minimum": 0, "maximum": 100000}},
        "required": ["date", "amount"], "additionalProperties": False}},
]


@pytest.fixture(scope="module")
def svc(ray_session, tmp_path_factory):
    from ray import serve

    from ringserve.serve import run

    print(f"test_serve_structured seed {SEED}")
    model_dir = str(tiny_model(tmp_path_factory, MODEL))
    base = start_serve()
    try:
        run(model_dir, world_size=2, port=int(base.rsplit(":", 1)[1]), blocking=False,
            name="rs-structured", model_name=MODEL, num_cpus_per_worker=0.5,
            layout="striped", max_kv_tokens=8192, max_queue=32, request_timeout_s=300)
        yield base, model_dir
    finally:
        serve.delete("rs-structured")
        serve.shutdown()


@pytest.fixture(scope="module")
def client(svc):
    return openai.OpenAI(base_url=svc[0] + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf(svc):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(svc[1], torch_dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def tok(svc):
    from ringserve.tokenizer import Tokenizer
    return Tokenizer.from_dir(svc[1])


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].double()


def test_json_schema_outputs_validate(client):
    rng = random.Random(SEED)
    done = 0
    for i, schema in enumerate(SCHEMAS):
        for seed in range(2):
            r = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": _phrase(rng, 6)}],
                max_tokens=160, temperature=1.0, seed=SEED + 10 * i + seed,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": f"s{i}", "schema": schema}})
            c = r.choices[0]
            if c.finish_reason == "length":
                continue
            assert c.finish_reason == "stop", c
            jsonschema.validate(json.loads(c.message.content), schema)
            done += 1
        # completions take response_format too
        r = client.completions.create(
            model=MODEL, prompt=_phrase(rng, 5), max_tokens=160, temperature=0.8,
            seed=SEED + i, extra_body={"response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(r.choices[0].text), schema)
            done += 1
    assert done >= 6, f"only {done} of 9 outputs finished within max_tokens"


def test_json_object_regex_and_choice(client):
    rng = random.Random(SEED + 1)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": _phrase(rng, 5)}], max_tokens=200,
        temperature=0.7, seed=SEED, response_format={"type": "json_object"},
        logit_bias={})
    c = r.choices[0]
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:   # cut by max_tokens: still a prefix of an object
        assert c.message.content.startswith("{")
    for seed in range(3):
        r = client.completions.create(
            model=MODEL, prompt=_phrase(rng, 4), max_tokens=40, temperature=1.0,
            seed=SEED + seed, extra_body={"guided_regex": r"[0-9]{3}-[a-c]{2,4}"})
        assert r.choices[0].finish_reason == "stop"
        import re
        assert re.fullmatch(r"[0-9]{3}-[a-c]{2,4}", r.choices[0].text), r.choices[0].text
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "yes or no?"}], max_tokens=20,
            temperature=1.0, seed=SEED + seed,
            extra_body={"guided_choice": ["aye", "nay", "abstain"]})
        assert r.choices[0].message.content in ("aye", "nay", "abstain")


def test_bad_values_get_400s(client):
    def bad(match, **kw):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **kw)
        assert match in str(e.value), str(e.value)

    bad("Invalid type", response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}})
    bad("regex", extra_body={"guided_regex": "[a-"})
    bad("response_format", response_format={"type": "xml"})
    bad("presence_penalty", presence_penalty=2.5)
    bad("frequency_penalty", frequency_penalty=-3)
    bad("logit_bias", logit_bias={"5": 101})
    bad("logit_bias", logit_bias={"ab": 1})
    bad("vocabulary", logit_bias={"99999999": 1})
    bad("top_logprobs", logprobs=True, top_logprobs=21)
    bad("top_logprobs", top_logprobs=3)          # without logprobs: true
    bad("repetition_penalty", extra_body={"repetition_penalty": 0})
    bad("min_tokens", extra_body={"min_tokens": 9})
    bad("n", n=0)
    bad("tools", tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, n=3, best_of=2)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, suffix="x")


def _prefill_tokens(base: str) -> int:
    return httpx.get(base + "/stats", timeout=30).json()["engine"]["prefill_tokens"]


def test_n_choices_share_one_prefill(svc, client):
    base = svc[0]
    rng = random.Random(SEED + 2)
    before = _prefill_tokens(base)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": _phrase(rng, 40)}], max_tokens=6,
        temperature=1.0, seed=SEED, n=4)
    after = _prefill_tokens(base)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert len({c.message.content for c in r.choices}) > 1      # four seeds, four samples
    p, cached = r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens
    assert 4 <= r.usage.completion_tokens <= 4 * 6       # summed over the choices
    # the prompt's uncached tokens computed once; each other sample recomputes its last token
    assert after - before == (p - cached) + 3, (after - before, p, cached)
    assert p > 40

    # streamed, n = 2: each index's text equals the same request's unstreamed choice
    msgs = [{"role": "user", "content": _phrase(rng, 12)}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                           temperature=1.0, seed=SEED + 5, n=2)
    texts = {0: "", 1: ""}
    for ev in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8,
                                             temperature=1.0, seed=SEED + 5, n=2, stream=True):
        for c in ev.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {c.index: c.message.content for c in whole.choices}


def test_best_of_keeps_the_most_likely(client):
    rng = random.Random(SEED + 3)
    prompt = _phrase(rng, 8)
    all3 = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0,
                                     seed=SEED, n=3, logprobs=0)
    best = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0,
                                     seed=SEED, n=1, best_of=3)
    sums = [sum(c.logprobs.token_logprobs) for c in all3.choices]
    assert best.choices[0].text == all3.choices[sums.index(max(sums))].text
    assert best.choices[0].logprobs is None


def test_top_logprobs_match_full_softmax_and_score(client, hf, tok):
    rng = random.Random(SEED + 4)
    prompt = tok.encode(_phrase(rng, 10))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0,
                                  seed=SEED, logprobs=5, extra_body={"return_token_ids": True})
    c = r.choices[0]
    out = c.token_ids
    for i, t in enumerate(out):
        lsm = torch.log_softmax(_hf_logits(hf, prompt + out[:i])[-1], -1)
        v, ids = torch.topk(lsm, 5)
        # the legacy shape keys alternatives by their text: ids with the same text share a key
        want = {}
        for t_, lp_ in zip(ids.tolist(), v.tolist()):
            want.setdefault(tok.decode([t_], skip_special_tokens=False), []).append(lp_)
        got = c.logprobs.top_logprobs[i]
        assert set(got) == set(want)
        for piece, lp_ in got.items():
            assert min(abs(lp_ - w) for w in want[piece]) < 2e-4, (piece, lp_, want[piece])
        assert c.logprobs.token_logprobs[i] == pytest.approx(float(lsm[t]), abs=2e-4)
    # the chosen tokens' logprobs equal the score path's (echo) on prompt + output
    e = client.completions.create(model=MODEL, prompt=prompt + out, max_tokens=1,
                                  temperature=0, echo=True, logprobs=1)
    lp = e.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[len(prompt):len(prompt) + len(out)] == pytest.approx(
        c.logprobs.token_logprobs, abs=2e-4)
    assert e.choices[0].text.startswith(tok.decode(prompt + out))
    # chat: top_logprobs entries in OpenAI's shape, most likely first
    ch = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tide"}], max_tokens=3,
        temperature=0, logprobs=True, top_logprobs=4)
    for e in ch.choices[0].logprobs.content:
        vals = [a.logprob for a in e.top_logprobs]
        assert len(vals) == 4 and vals == sorted(vals, reverse=True)
        assert e.logprob == pytest.approx(vals[0], abs=1e-6)     # greedy: the top one
        assert all(isinstance(a.bytes, list) for a in e.top_logprobs)


def _greedy_reference(hf, prompt, n, process):
    out = []
    for _ in range(n):
        x = _hf_logits(hf, prompt + out)[-1]
        out.append(int(torch.argmax(process(x.clone(), prompt, out))))
    return out


def test_penalties_follow_their_definitions(client, hf, tok):
    from transformers import RepetitionPenaltyLogitsProcessor
    rng = random.Random(SEED + 5)
    n = 10

    def run(**kw):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True,
                                                  **kw.pop("extra", {})}, **kw)
        return r.choices[0].token_ids

    def openai_penalties(x, p, o):   # OpenAI's definition: output tokens only
        for t in set(o):
            x[t] -= o.count(t) * 1.5 + 0.7
        x[bias_tok] += 4.0
        return x

    # a prompt (drawn with the run's seed) whose greedy output the penalties change by the
    # reference itself: on some prompts nothing repeats, so they would change nothing and the
    # comparison below would not test them
    for _ in range(30):
        prompt = tok.encode(_phrase(rng, 12))
        plain = _greedy_reference(hf, prompt, n, lambda x, p, o: x)
        bias_tok = plain[0]
        want = _greedy_reference(hf, prompt, n, openai_penalties)
        if want != plain:
            break
    else:
        pytest.fail(f"no prompt in 30 (seed {SEED}) where the penalties change the output")
    assert run() == plain
    got = run(frequency_penalty=1.5, presence_penalty=0.7, logit_bias={str(bias_tok): 4.0})
    assert got == want

    proc = RepetitionPenaltyLogitsProcessor(1.8)      # transformers: prompt and output tokens

    def hf_rep(x, p, o):
        return proc(torch.tensor([p + o]), x[None].float())[0].double()
    want = _greedy_reference(hf, prompt, n, hf_rep)
    assert run(extra={"repetition_penalty": 1.8}) == want


def test_min_tokens_holds_eos_back(client, tok):
    eos = tok.eos_token_ids[0]
    bias = {str(eos): 100.0}   # EOS as soon as it is allowed
    r = client.completions.create(model=MODEL, prompt="ship", max_tokens=12, temperature=0,
                                  logit_bias=bias, extra_body={"min_tokens": 5,
                                                               "return_token_ids": True})
    ids = r.choices[0].token_ids
    assert r.choices[0].finish_reason == "stop"
    assert eos not in ids[:5] and len(ids) in (5, 6) and (len(ids) == 5 or ids[5] == eos)
    r = client.completions.create(model=MODEL, prompt="ship", max_tokens=12, temperature=0,
                                  logit_bias=bias, extra_body={"return_token_ids": True})
    assert r.choices[0].finish_reason == "stop" and len(r.choices[0].token_ids) <= 1


def test_tokenize_detokenize_round_trip(svc, client, tok):
    base = svc[0]
    rng = random.Random(SEED + 6)
    text = _phrase(rng, 30) + " café 東京 🚢"
    r = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": text,
                                             "add_special_tokens": False,
                                             "return_token_strs": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok.encode(text, add_special_tokens=False)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] >= 8192
    assert len(body["token_strs"]) == body["count"]
    d = httpx.post(base + "/detokenize", json={"tokens": body["tokens"]}, timeout=60)
    assert d.status_code == 200 and d.json()["prompt"] == text
    with_bos = httpx.post(base + "/tokenize", json={"prompt": text}, timeout=60).json()
    assert with_bos["tokens"] == tok.encode(text)
    # chat messages count the tokens a chat completion's prompt has
    msgs = [{"role": "user", "content": text}]
    t = httpx.post(base + "/tokenize", json={"messages": msgs}, timeout=60).json()
    c = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    assert t["count"] == c.usage.prompt_tokens
    assert httpx.post(base + "/tokenize", json={}, timeout=60).status_code == 400
    assert httpx.post(base + "/detokenize", json={"tokens": [10 ** 9]},
                      timeout=60).status_code == 400


def test_extraction_from_an_uploaded_document(svc):
    """The long-document case: a document uploaded once, questions with a schema on it."""
    base = svc[0]
    rng = random.Random(SEED + 7)
    doc = httpx.post(base + "/v1/documents", json={"text": _phrase(rng, 300)}, timeout=300)
    assert doc.status_code == 200, doc.text
    did = doc.json()["id"]
    schema = SCHEMAS[0]
    try:
        done = 0
        for seed in range(3):
            r = httpx.post(base + f"/v1/documents/{did}/ask", json={
                "question": "Who owns the ship?", "max_tokens": 120, "temperature": 1.0,
                "seed": SEED + seed, "response_format": {
                    "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
                timeout=300)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["num_cached_tokens"] > 0
            if body["finish_reason"] == "stop":
                jsonschema.validate(json.loads(body["answer"]), schema)
                done += 1
        assert done >= 2
        r = httpx.post(base + f"/v1/documents/{did}/ask", json={"question": "x", "n": 2},
                       timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    finally:
        httpx.delete(base + f"/v1/documents/{did}", timeout=60)
