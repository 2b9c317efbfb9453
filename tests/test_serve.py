"""The Ray Serve app for real: Serve on the shared local cluster, the tiny llama checkpoint on CPU
actors, the official `openai` client and httpx against it, answers compared with `LLM.generate`.

Three applications share one Serve instance (one module-wide start, ~1.5 min on 2 cores):
  main   world_size 2, API key, roomy queue: the API, documents, streaming, concurrency
  tight  world_size 1, one request running at once (max_num_seqs 1) and max_queue 1, a 2 s
         request timeout, a 1 MB body limit, SSE keep-alive after 0.25 s, a 1024-token
         document cache: 429, 504, 413, streams that wait in the engine's queue
  multi  2 replicas of world_size 1: documents reachable from every replica
"""
from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import msgpack
import numpy as np
import openai
import pytest

from tinymodels import tiny_model
from servehelpers import start_serve

pytestmark = pytest.mark.timeout(600)

MODEL = "llama"
SEED = random.SystemRandom().randrange(1 << 30)  # fresh inputs every run; printed on failure
WORDS = ("ship cargo master owner port freight charter voyage clause tons harbour wind sail "
         "deck anchor tide merchant lien bill lading crew").split()



def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def rng():
    print(f"test_serve seed {SEED}")
    return random.Random(SEED)


@pytest.fixture(scope="module")
def stack(ray_session, tmp_path_factory):
    from ray import serve

    from ringserve import LLM
    from ringserve.serve import build_app, run, wait_ready

    model_dir = str(tiny_model(tmp_path_factory, MODEL))
    key = f"sk-test-{SEED:x}"
    base = start_serve()
    ref = None
    try:
        serve.run(build_app({"model": model_dir, "model_name": MODEL, "world_size": 1,
                             "num_cpus_per_worker": 0.5, "max_kv_tokens": 2048,
                             "max_num_seqs": 1, "max_queue": 1,
                             "request_timeout_s": 2.0, "max_body_mb": 1,
                             "sse_keepalive_s": 0.25, "document_cache_tokens": 1024}),
                  name="rs-tight", route_prefix="/tight")
        # serve.run returns once the replica is up; its LLM is still loading: readiness says so
        early = httpx.get(base + "/tight/ready", timeout=30)
        serve.run(build_app({"model": model_dir, "model_name": MODEL, "world_size": 1,
                             "num_cpus_per_worker": 0.5, "num_replicas": 2,
                             "max_kv_tokens": 2048}),
                  name="rs-multi", route_prefix="/multi")
        ref = LLM(model_dir, world_size=2, layout="striped", device="cpu", max_kv_tokens=4096,
                  num_cpus_per_worker=0.5)
        # the main app through run() (what `ringserve serve` calls): Serve is already up on
        # this port, so run() adds the app and returns once its model is loaded
        url = run(model_dir, world_size=2, port=int(base.rsplit(":", 1)[1]), blocking=False,
                  name="rs-main", model_name=MODEL, num_cpus_per_worker=0.5, layout="striped",
                  max_kv_tokens=4096, api_key=key, max_queue=32, request_timeout_s=120)
        assert url == base
        wait_ready(base + "/tight", 300)
        multi = httpx.Client(base_url=base + "/multi", timeout=120)
        _wait_all_replicas_ready(multi, 2)
        yield SimpleNamespace(
            base=base, key=key, ref=ref, tok=ref.tokenizer, early=early,
            http=httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"},
                              timeout=120),
            tight=httpx.Client(base_url=base + "/tight", timeout=120), multi=multi,
            client=openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120))
    finally:
        if ref is not None:
            ref.shutdown()
        for name in ("rs-main", "rs-tight", "rs-multi"):
            serve.delete(name)
        serve.shutdown()

def _wait_all_replicas_ready(client: httpx.Client, n: int, timeout_s: float = 300):
    """/ready until n distinct replicas (x-ringserve-replica) have answered 200."""
    ready, t_end = set(), time.monotonic() + timeout_s
    while len(ready) < n and time.monotonic() < t_end:
        r = client.get("/ready")
        if r.status_code == 200:
            ready.add(r.headers["x-ringserve-replica"])
        else:
            time.sleep(0.3)
    assert len(ready) == n, f"only {len(ready)} of {n} replicas ready"


def _greedy(n, **kw):
    from ringserve import SamplingParams
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


# --------------------------------------------------------------------------- probes, models

def test_probes_and_models(stack):
    assert stack.early.status_code == 503, stack.early.text  # before the model was loaded
    assert stack.early.json()["error"]["code"] == "model_loading"
    assert httpx.get(stack.base + "/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(stack.base + "/ready").json()["model"] == MODEL
    models = stack.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert stack.client.models.retrieve(MODEL).owned_by == "ringserve"
    with pytest.raises(openai.NotFoundError) as e:
        stack.client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


# --------------------------------------------------------------------------- OpenAI endpoints

def test_completions_equal_llm_generate(stack, rng):
    prompts = [_phrase(rng, rng.randint(3, 12)) for _ in range(2)]
    n = rng.randint(6, 14)
    r = stack.client.completions.create(model=MODEL, prompt=prompts, max_tokens=n,
                                        temperature=0, logprobs=1,
                                        extra_body={"return_token_ids": True})
    refs = stack.ref.generate(prompts, _greedy(n, logprobs=True))
    assert [c.index for c in r.choices] == [0, 1]
    for choice, ref in zip(r.choices, refs):
        assert choice.model_extra["token_ids"] == ref.token_ids
        assert choice.text == ref.text
        assert choice.finish_reason == ref.finish_reason
        assert choice.logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert r.usage.prompt_tokens == sum(len(x.prompt_token_ids) for x in refs)
    assert r.usage.completion_tokens == sum(len(x.token_ids) for x in refs)


def test_seeded_sampling_equals_llm_generate(stack, rng):
    from ringserve import SamplingParams

    prompt, seed = _phrase(rng, 8), rng.randrange(1 << 31)
    r = stack.client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                        temperature=0.9, top_p=0.95, seed=seed,
                                        extra_body={"top_k": 50, "return_token_ids": True})
    (ref,) = stack.ref.generate(prompt, SamplingParams(max_tokens=10, temperature=0.9,
                                                       top_p=0.95, top_k=50, seed=seed))
    assert r.choices[0].model_extra["token_ids"] == ref.token_ids


def test_stop_strings_and_msgpack_answers(stack, rng):
    prompt = _phrase(rng, 6)
    (full,) = stack.ref.generate(prompt, _greedy(20, ignore_eos=True))
    mid = len(full.text) // 2
    stop = full.text[mid:mid + 2]
    assert stop, full.text
    (ref,) = stack.ref.generate(prompt, _greedy(20, ignore_eos=True, stop=(stop,)))
    r = stack.http.post("/v1/completions", headers={"Accept": "application/msgpack"}, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 20, "temperature": 0,
        "ignore_eos": True, "stop": [stop]})
    assert r.headers["content-type"] == "application/msgpack"
    choice = msgpack.unpackb(r.content)["choices"][0]
    assert choice["finish_reason"] == ref.finish_reason == "stop"
    assert choice["text"] == ref.text and stop not in choice["text"]
    assert full.text.startswith(choice["text"])


def test_chat_equals_llm_generate(stack, rng):
    messages = [{"role": "system", "content": "You answer about ships."},
                {"role": "user", "content": _phrase(rng, 6) + "?"}]
    r = stack.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                             temperature=0, logprobs=True,
                                             extra_body={"return_token_ids": True})
    prompt = stack.tok.apply_chat_template(messages, add_generation_prompt=True)
    (ref,) = stack.ref.generate(prompt, _greedy(9, logprobs=True))
    c = r.choices[0]
    assert c.model_extra["token_ids"] == ref.token_ids
    assert c.message.role == "assistant" and c.message.content == ref.text
    assert [x.logprob for x in c.logprobs.content] == pytest.approx(ref.logprobs, abs=1e-4)
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_streaming_equals_llm_generate(stack, rng):
    prompt = _phrase(rng, 7)
    (ref,) = stack.ref.generate(prompt, _greedy(12, ignore_eos=True))
    chunks = list(stack.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True,
                                                            "ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra.get("token_ids")
                                                     or [])]
    assert "".join(texts) == ref.text and ids == ref.token_ids
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices

    # two prompts in one streamed request: chunks carry each prompt's index
    two = [_phrase(rng, 3), _phrase(rng, 9)]
    refs = stack.ref.generate(two, _greedy(5))
    chunks = list(stack.client.completions.create(model=MODEL, prompt=two, max_tokens=5,
                                                  temperature=0, stream=True))
    for i, r in enumerate(refs):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == r.text

    messages = [{"role": "user", "content": _phrase(rng, 5)}]
    (cref,) = stack.ref.generate(stack.tok.apply_chat_template(messages), _greedy(10))
    stream = stack.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                  temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cref.text
    assert chunks[-1].choices[0].finish_reason == cref.finish_reason
    # the raw wire format ends with OpenAI's sentinel
    with stack.http.stream("POST", "/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_concurrent_clients_not_mixed_up(stack, rng):
    prompts = [_phrase(rng, rng.randint(2, 10)) for _ in range(6)]
    refs = stack.ref.generate(prompts, _greedy(8))

    def one(i):
        c = openai.OpenAI(base_url=stack.base + "/v1", api_key=stack.key, max_retries=0)
        if i % 2:  # half of them stream
            chunks = list(c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8,
                                               temperature=0, stream=True))
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8,
                                    temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, range(len(prompts))))
    assert got == [r.text for r in refs]


def test_client_disconnect_cancels_generation(stack, rng):
    before = stack.http.get("/stats").json()
    cancelled0 = before["engine"]["requests_cancelled"]
    t0 = time.monotonic()
    with stack.http.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": _phrase(rng, 5), "max_tokens": 3000, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = stack.http.get("/stats").json()
        if s["engine"]["requests_cancelled"] > cancelled0 and s["running"] == 0:
            break
        time.sleep(0.2)
    assert s["engine"]["requests_cancelled"] == cancelled0 + 1, s
    assert s["requests"].get("completions:cancelled", 0) >= 1
    # the engine stopped long before 3000 tokens
    assert s["engine"]["generated_tokens"] - before["engine"]["generated_tokens"] < 3000
    assert time.monotonic() - t0 < 30


def test_a_request_does_not_wait_behind_a_running_stream(stack, rng):
    """Continuous batching: a request sent while a long stream decodes is answered while that
    stream still runs (each engine step decodes a token of both), with its solo tokens."""
    prompt = _phrase(rng, rng.randint(3, 9))
    (ref,) = stack.ref.generate(prompt, _greedy(8, ignore_eos=True))
    with stack.http.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": _phrase(rng, 5), "max_tokens": 3000, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        # one iterator, kept: a for-loop left with break would close it (and the connection)
        lines = (ln for ln in r.iter_lines() if ln.startswith("data: "))
        for _ in range(3):
            next(lines)  # it decodes now
        short = stack.http.post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        engine = stack.http.get("/stats").json()["engine"]
        more = [json.loads(next(lines)[6:]) for _ in range(3)]
    assert short.status_code == 200, short.text
    assert short.json()["choices"][0]["token_ids"] == ref.token_ids
    # the 3000-token stream had not finished: it ran beside the short request and goes on
    assert engine["running"] == 1, engine
    assert all(m["choices"][0]["finish_reason"] is None for m in more), more
    deadline = time.monotonic() + 30   # leaving the block cancelled the stream
    while stack.http.get("/stats").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert stack.http.get("/stats").json()["running"] == 0


# --------------------------------------------------------------------------- documents

def test_document_upload_ask_twice_delete(stack, rng):
    from ringserve.sample_document import sample_document
    from ringserve.serve.document_routes import QUESTION_TEMPLATE

    text = sample_document(n_words=rng.randint(500, 800), seed=rng.randrange(1000))
    doc_ids = stack.tok.encode(text)
    up = stack.http.post("/v1/documents", json={"text": text, "name": "charter"})
    assert up.status_code == 200, up.text
    doc = up.json()
    assert doc["num_tokens"] == len(doc_ids) and doc["id"].startswith("doc-")
    assert stack.http.get(f"/v1/documents/{doc['id']}").json()["num_tokens"] == len(doc_ids)
    assert doc["id"] in [d["id"] for d in stack.http.get("/v1/documents").json()["data"]]

    question = "Who is the master of the ship?"
    q_ids = stack.tok.encode(QUESTION_TEMPLATE.format(question=question), add_special_tokens=False)
    (ref,) = stack.ref.generate(doc_ids + q_ids, _greedy(8))

    a1 = stack.http.post(f"/v1/documents/{doc['id']}/ask", json={
        "question": question, "max_tokens": 8, "temperature": 0, "return_token_ids": True})
    assert a1.status_code == 200, a1.text
    a1 = a1.json()
    # the document's KV came from the cache filled at upload: no prefill of those tokens
    assert a1["num_cached_tokens"] >= len(doc_ids)
    assert a1["usage"]["prompt_tokens"] == len(doc_ids) + len(q_ids)
    assert a1["usage"]["prompt_tokens_details"]["cached_tokens"] == a1["num_cached_tokens"]
    assert a1["token_ids"] == ref.token_ids and a1["answer"] == ref.text

    # second question, streamed: again no prefill of the document
    events = []
    with stack.http.stream("POST", f"/v1/documents/{doc['id']}/ask", json={
            "question": question + " Answer briefly.", "max_tokens": 6, "temperature": 0,
            "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    final = events[-1]
    assert final["finish_reason"] in ("stop", "length")
    assert final["num_cached_tokens"] >= len(doc_ids)
    assert "".join(e["delta"] for e in events) != "" or final["usage"]["completion_tokens"] == 0

    gone = stack.http.delete(f"/v1/documents/{doc['id']}")
    assert gone.json() == {"id": doc["id"], "object": "document", "deleted": True}
    r = stack.http.post(f"/v1/documents/{doc['id']}/ask", json={"question": question})
    assert r.status_code == 404 and r.json()["error"]["code"] == "document_not_found"
    assert stack.http.get(f"/v1/documents/{doc['id']}").status_code == 404
    assert stack.http.delete(f"/v1/documents/{doc['id']}").status_code == 404


def test_document_in_the_chat_format(stack, rng):
    """prompt_format chat: the question goes into the checkpoint's chat template after the
    document; the served prompt is exactly the template rendered over the whole exchange."""
    from ringserve.sample_document import sample_document

    text = sample_document(n_words=rng.randint(200, 300), seed=rng.randrange(1000))
    system, q = "Answer from the document only.", "Who is the master of the ship?"
    up = stack.http.post("/v1/documents", json={"text": text, "prompt_format": "chat",
                                                "system": system})
    assert up.status_code == 200, up.text
    doc = up.json()
    assert doc["prompt_format"] == "chat"
    whole = stack.tok.apply_chat_template([
        {"role": "system", "content": system},
        {"role": "user", "content": text + "\n\nQuestion: " + q}], add_generation_prompt=True)
    ids = stack.tok.encode(whole, add_special_tokens=False)
    (ref,) = stack.ref.generate(ids, _greedy(6))
    a = stack.http.post(f"/v1/documents/{doc['id']}/ask", json={
        "question": q, "max_tokens": 6, "temperature": 0, "return_token_ids": True}).json()
    assert a["usage"]["prompt_tokens"] == len(ids)
    assert a["num_cached_tokens"] >= doc["num_tokens"]
    assert a["token_ids"] == ref.token_ids
    _err(stack.http.post("/v1/documents", json={"token_ids": ids[:10], "prompt_format": "chat"}),
         400)
    _err(stack.http.post("/v1/documents", json={"text": "x y", "system": "s"}), 400)
    assert stack.http.delete(f"/v1/documents/{doc['id']}").status_code == 200


def test_upload_without_waiting(stack, rng):
    from ringserve.sample_document import sample_document

    made = []  # every upload, deleted at the end even when an assertion failed (a
    # pinned document left behind would take KV from the tests after this one)
    try:
        text = sample_document(n_words=600, seed=rng.randrange(1000))
        n = len(stack.tok.encode(text))
        r = stack.http.post("/v1/documents?wait=false", json={"text": text})  # the query form
        assert r.status_code == 202, r.text
        card = r.json()
        made.append(card["id"])
        assert card["num_tokens"] == n and card["status"] in ("prefilling", "ready")
        # a question right away waits behind the prefill, then reuses its KV
        a = stack.http.post(f"/v1/documents/{card['id']}/ask",
                            json={"question": "Who signed?", "max_tokens": 3})
        # (a 409 document_failed "document too large" here, for some seeds: the scheduler bug
        # of test_a_cached_sequence_sharing_a_short_prefix_is_evicted_for_a_request)
        assert a.status_code == 200, a.text
        assert a.json()["num_cached_tokens"] >= n
        got = stack.http.get(f"/v1/documents/{card['id']}").json()
        assert got["status"] == "ready" and got["prefill_s"] > 0

        # the body form; deleted while it prefills: gone, and its pinned KV freed when it finishes
        pinned0 = stack.http.get("/stats").json()["engine"]["pinned_documents"]
        text2 = sample_document(n_words=1300, seed=rng.randrange(1000, 2000))
        while len(stack.tok.encode(text2)) > 3500:  # long, but within the 4096-token KV budget
            text2 = " ".join(text2.split(" ")[: int(len(text2.split(" ")) * 0.9)])
        r2 = stack.http.post("/v1/documents", json={"text": text2, "wait": False})
        assert r2.status_code == 202, r2.text
        made.append(r2.json()["id"])
        assert stack.http.delete(f"/v1/documents/{r2.json()['id']}").status_code == 200
        assert stack.http.get(f"/v1/documents/{r2.json()['id']}").status_code == 404
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            s = stack.http.get("/stats").json()
            if s["running"] == 0 and s["queue_depth"] == 0:
                break
            time.sleep(0.2)
        assert s["engine"]["pinned_documents"] == pinned0, s["engine"]
        assert stack.http.delete(f"/v1/documents/{card['id']}").status_code == 200

        # polled while it prefills: a card shows the prefill's progress (once one was read) until
        # it is ready, then no more
        r3 = stack.http.post("/v1/documents", json={"text": text2, "wait": False})
        assert r3.status_code == 202, r3.text
        made.append(r3.json()["id"])
        deadline, done = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            got = stack.http.get(f"/v1/documents/{r3.json()['id']}").json()
            if "progress" in got:
                assert got["status"] == "prefilling"
                p = got["progress"]
                assert p["state"] in ("queued", "running"), got
                if p["state"] == "running":  # counted in prompt tokens, chunk by chunk
                    assert p["phase"] == "prefill" and p["unit"] == "tokens", p
                    assert p["total"] == got["num_tokens"] and 0 <= p["done"] <= p["total"], p
                    done.append(p["done"])
            if got["status"] != "prefilling":
                assert got["status"] == "ready" and "progress" not in got
                break
            time.sleep(0.05)
        assert done == sorted(done), done
        assert stack.http.delete(f"/v1/documents/{r3.json()['id']}").status_code == 200
    finally:
        for doc_id in made:
            stack.http.delete(f"/v1/documents/{doc_id}")


def test_a_cached_sequence_sharing_a_short_prefix_is_evicted_for_a_request(stack, rng):
    """An idle engine takes a request that fits its KV once unpinned cached sequences are evicted,
    also when the one in the way shares a few tokens with it (a BOS, a chat template's header):
    those few tokens are not worth refusing the request for."""
    cap = stack.ref.capacity_tokens                   # 4096 over 2 ranks, as the main app
    shared = [rng.randrange(3, 200) for _ in range(32)]
    n = cap // 2 + 20                                 # two of them do not fit together
    first = shared + [rng.randrange(3, 200) for _ in range(n - 32)]
    second = shared + [rng.randrange(3, 200) for _ in range(n - 32)]
    r = stack.http.post("/v1/completions", json={"model": MODEL, "prompt": first,
                                                 "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text               # its KV stays cached, unpinned
    r = stack.http.post("/v1/completions", json={"model": MODEL, "prompt": second,
                                                 "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text


def test_msgpack_and_multipart_uploads(stack, rng):
    from ringserve.sample_document import sample_document

    text = sample_document(n_words=300, seed=rng.randrange(1000))
    ids = stack.tok.encode(text)
    mp = {"Content-Type": "application/msgpack"}
    # token ids as raw little-endian uint32 bytes (the compact form) ...
    r = stack.http.post("/v1/documents", headers=mp, content=msgpack.packb(
        {"token_ids": np.asarray(ids, dtype="<u4").tobytes(), "name": "raw"}))
    assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
    doc = msgpack.unpackb(r.content)
    assert doc["num_tokens"] == len(ids)
    # ... as a list, and as text: the same tokens
    r2 = msgpack.unpackb(stack.http.post("/v1/documents", headers=mp, content=msgpack.packb(
        {"token_ids": ids})).content)
    r3 = msgpack.unpackb(stack.http.post("/v1/documents", headers=mp, content=msgpack.packb(
        {"text": text})).content)
    assert r2["num_tokens"] == r3["num_tokens"] == len(ids)
    # a question in msgpack is answered in msgpack, from the cached document
    a = stack.http.post(f"/v1/documents/{doc['id']}/ask", headers=mp,
                        content=msgpack.packb({"question": "What cargo?", "max_tokens": 3}))
    assert a.headers["content-type"] == "application/msgpack"
    assert msgpack.unpackb(a.content)["num_cached_tokens"] >= len(ids)
    # a multipart file upload
    r4 = stack.http.post("/v1/documents", files={"file": ("charter.txt", text.encode(),
                                                          "text/plain")})
    assert r4.status_code == 200 and r4.json()["num_tokens"] == len(ids)
    assert r4.json()["name"] == "charter.txt"
    # deleting one of the uploads of the same tokens keeps the others answerable
    for d in (doc, r2, r3):
        assert stack.http.delete(f"/v1/documents/{d['id']}").status_code == 200
    a = stack.http.post(f"/v1/documents/{r4.json()['id']}/ask",
                        json={"question": "What cargo?", "max_tokens": 2})
    assert a.status_code == 200
    stack.http.delete(f"/v1/documents/{r4.json()['id']}")


def test_documents_across_replicas(stack, rng):
    """2 replicas, 2 actor groups: a document uploaded through one is answered by both (the
    other prefills it from the shared registry and then reuses its KV), and deleted for both."""
    from ringserve.sample_document import sample_document

    text = sample_document(n_words=150, seed=rng.randrange(1000))
    n_doc = len(stack.tok.encode(text))
    up = stack.multi.post("/v1/documents", json={"text": text})
    assert up.status_code == 200, up.text
    doc_id = up.json()["id"]
    body = {"question": "What is the cargo?", "max_tokens": 5, "temperature": 0,
            "return_token_ids": True}

    def ask(_):
        return stack.multi.post(f"/v1/documents/{doc_id}/ask", json=body)

    seen, answers = {}, set()   # replica -> [(round, cached tokens)]
    for k in range(12):  # rounds of concurrent questions spread over both replicas
        with ThreadPoolExecutor(4) as pool:
            for r in pool.map(ask, range(4)):
                assert r.status_code == 200, r.text
                answers.add(tuple(r.json()["token_ids"]))
                seen.setdefault(r.headers["x-ringserve-replica"], []).append(
                    (k, r.json()["num_cached_tokens"]))
        later = {rep: [c for j, c in v if j > min(j for j, _ in v)] for rep, v in seen.items()}
        if len(seen) == 2 and all(later.values()):
            break
    assert len(seen) == 2 and all(later.values()), seen
    assert len(answers) == 1  # same greedy answer from both groups, cached or not
    # questions running together in a replica's first round may each compute the document
    # (continuous batching: neither waits for the other's KV), but once a question has finished
    # there, the replica keeps its KV: every question of a later round reuses the whole document
    for rep, cached in later.items():
        assert min(cached) >= n_doc, (rep, seen)
    for _ in range(4):  # whichever replica answers, the document is listed
        assert doc_id in [d["id"] for d in stack.multi.get("/v1/documents").json()["data"]]
    assert stack.multi.delete(f"/v1/documents/{doc_id}").status_code == 200
    with ThreadPoolExecutor(4) as pool:
        gone = list(pool.map(ask, range(8)))
    assert [r.status_code for r in gone] == [404] * 8
    assert stack.multi.get(f"/v1/documents/{doc_id}").status_code == 404


# --------------------------------------------------------------------------- errors

ERROR_KEYS = {"message", "type", "param", "code", "request_id"}


def _err_object(err: dict, code: str = None) -> dict:
    """OpenAI's error object plus the request id (the server log has the details under it)."""
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    assert isinstance(err["type"], str) and err["type"], err
    assert isinstance(err["request_id"], str) and err["request_id"].strip(), err
    if code is not None:
        assert err["code"] == code, err
    return err


def _err(r: httpx.Response, status: int, code: str = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = _err_object(body["error"], code)
    header = r.headers.get("x-request-id")   # Serve's proxy returns the id it logged under
    if header is not None:
        assert err["request_id"] == header, (err, header)
    return err


def test_400_invalid_parameters(stack):
    with pytest.raises(openai.BadRequestError) as e:
        stack.client.completions.create(model=MODEL, prompt="x", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        stack.client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    _err(stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 0}), 400)
    _err(stack.http.post("/v1/completions", json={"model": MODEL, "prompt": "x",
                                                  "max_tokens": 0}), 400)
    e = _err(stack.http.post("/v1/completions", json={"prompt": "x"}), 400)
    assert e["param"] == "model"
    _err(stack.http.post("/v1/completions", content=b"{not json",
                         headers={"Content-Type": "application/json"}), 400)
    _err(stack.http.post("/v1/documents", json={"text": "   "}), 400)
    # a prompt beyond the KV capacity: OpenAI's context-length error, both numbers in it
    cap = stack.ref.capacity_tokens
    e = _err(stack.http.post("/v1/completions", json={
        "model": MODEL, "prompt": [5] * (cap - 3), "max_tokens": 10}), 400,
        "context_length_exceeded")
    assert str(cap) in e["message"] and str(cap - 3 + 10) in e["message"]
    _err(stack.http.post("/v1/documents", json={"token_ids": [1, -3]}), 400)


def test_401_without_the_key(stack):
    bad = openai.OpenAI(base_url=stack.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    _err(httpx.post(stack.base + "/v1/completions", json={"model": MODEL, "prompt": "x"}), 401,
         "invalid_api_key")
    _err(httpx.post(stack.base + "/v1/documents", json={"text": "x"}), 401, "invalid_api_key")


def test_404_unknown_model_document_route(stack):
    _err(stack.http.post("/v1/chat/completions", json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}), 404,
        "model_not_found")
    _err(stack.http.post("/v1/documents/doc-nope/ask", json={"question": "q"}), 404,
         "document_not_found")
    _err(stack.http.get("/v1/no-such-route"), 404)


def test_413_document_beyond_capacity_and_body_too_large(stack, rng):
    cap = stack.ref.capacity_tokens  # same max_kv_tokens as the main app
    n = cap + rng.randint(1, 500)
    ids = [rng.randrange(1, 200) for _ in range(n)]
    e = _err(stack.http.post("/v1/documents", json={"token_ids": ids}), 413, "document_too_large")
    assert str(n) in e["message"] and str(cap) in e["message"]
    # the tight app takes at most 1 MB bodies
    e = _err(stack.tight.post("/v1/documents", content=msgpack.packb({"text": "a" * (1 << 21)}),
                              headers={"Content-Type": "application/msgpack"}), 413,
             "body_too_large")
    assert str(1 << 20) in e["message"]


def test_429_when_the_queue_is_full(stack, rng):
    # 1800 tokens outlast the 2 s timeout: the first request holds the tight app's only
    # running slot (max_num_seqs 1) for the whole 2 s, a wide window for the other four to find
    # the in-flight bound (max_num_seqs + max_queue = 2) full
    body = {"model": MODEL, "prompt": _phrase(rng, 4), "max_tokens": 1800, "ignore_eos": True,
            "temperature": 0}
    n = 5
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return stack.tight.post("/v1/completions", json=body)

    with ThreadPoolExecutor(n) as pool:
        rs = list(pool.map(one, range(n)))
    codes = sorted(r.status_code for r in rs)
    # one request runs, one waits, the others are refused at once
    assert codes.count(429) >= n - 2, [(r.status_code, r.text[:200]) for r in rs]
    assert set(codes) <= {200, 429, 504}, [(r.status_code, r.text[:200]) for r in rs]
    for r in rs:
        if r.status_code == 429:
            _err(r, 429, "queue_full")
    ok = stack.tight.post("/v1/completions", json={**body, "max_tokens": 2})
    assert ok.status_code == 200, ok.text  # the queue drains


def _sse_lines_behind_a_busy_engine(stack, rng, stream_tokens: int):
    """Start a request that holds the tight app's one running slot (max_num_seqs 1) until its
    2 s deadline, then (0.5 s later) a stream that must wait ~1.5 s in the engine's queue behind
    it; returns the stream's status and lines."""
    blocker = threading.Thread(target=stack.tight.post, args=("/v1/completions",), kwargs={
        "json": {"model": MODEL, "prompt": _phrase(rng, 4), "max_tokens": 1800,
                 "ignore_eos": True}})
    blocker.start()
    time.sleep(0.5)
    try:
        with stack.tight.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": _phrase(rng, 4), "max_tokens": stream_tokens,
                "ignore_eos": True, "stream": True}) as r:
            return r.status_code, [ln for ln in r.iter_lines() if ln]
    finally:
        blocker.join()


def test_stream_waiting_for_its_first_token_gets_keepalives(stack, rng):
    # its own deadline (2 s from its arrival) leaves it ~0.5 s for 3 tokens after the wait
    status, lines = _sse_lines_behind_a_busy_engine(stack, rng, 3)
    assert status == 200
    data = [i for i, ln in enumerate(lines) if ln.startswith("data: ")]
    assert lines[0] == ": keep-alive" and data and all(
        ln == ": keep-alive" for ln in lines[:data[0]]), lines
    assert lines[-1] == "data: [DONE]", lines
    chunks = [json.loads(lines[i][6:]) for i in data[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_that_times_out_after_it_started_gets_an_error_event(stack, rng):
    # the stream, started with keep-alives while it waited, runs out of time generating 1800
    # tokens: the 504 can only come in-band
    status, lines = _sse_lines_behind_a_busy_engine(stack, rng, 1800)
    assert status == 200 and lines[0] == ": keep-alive", lines[:3]
    assert "data: [DONE]" not in lines
    last = json.loads(lines[-1][6:])
    assert set(last) == {"error"}, last
    _err_object(last["error"], "timeout")


def test_background_prefill_that_fails_is_reported(stack, rng):
    # within the tight app's KV capacity (2048) but beyond its document-cache budget (1024):
    # the engine refuses it after the 202, and the document says why
    ids = [rng.randrange(1, 200) for _ in range(rng.randint(1100, 1500))]
    r = stack.tight.post("/v1/documents", json={"token_ids": ids, "wait": False})
    assert r.status_code == 202, r.text
    doc_id = r.json()["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        card = stack.tight.get(f"/v1/documents/{doc_id}").json()
        if card["status"] != "prefilling":
            break
        time.sleep(0.2)
    assert card["status"] == "failed", card
    assert "1024" in _err_object(card["error"], "document_too_large")["message"]
    _err(stack.tight.post(f"/v1/documents/{doc_id}/ask", json={"question": "q"}), 409,
         "document_failed")
    assert stack.tight.delete(f"/v1/documents/{doc_id}").status_code == 200
    # the same upload waiting for its answer gets the error as its status
    _err(stack.tight.post("/v1/documents", json={"token_ids": ids}), 413, "document_too_large")


def test_504_on_timeout_and_the_engine_stops(stack, rng):
    t0 = time.monotonic()
    r = stack.tight.post("/v1/completions", json={
        "model": MODEL, "prompt": _phrase(rng, 4), "max_tokens": 1800, "ignore_eos": True})
    elapsed = time.monotonic() - t0
    _err(r, 504, "timeout")
    assert elapsed < 15, elapsed  # the 2 s timeout, not 1800 tokens
    # the timed-out generation was stopped: the next request is served at once
    t1 = time.monotonic()
    ok = stack.tight.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert time.monotonic() - t1 < 10


# --------------------------------------------------------------------------- metrics

def test_prometheus_metrics_exported(stack):
    """The replica's metrics reach Ray's Prometheus endpoint on the node (last test: by now the
    earlier ones have produced every kind of sample)."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    want = ["ray_ringserve_requests_total", "ray_ringserve_time_to_first_token_seconds_bucket",
            "ray_ringserve_decode_tokens_per_second_bucket", "ray_ringserve_queue_depth",
            "ray_ringserve_kv_tokens_used", "ray_ringserve_kv_tokens_free"]

    def check(text):
        # every problem at once: a gauge is exported only for a while after it was last set
        # (Ray drops stale gauges), so the last attempt's first failure may not be the cause
        problems = [f"missing {w}" for w in want if w not in text]
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_ringserve_requests_total")]
        if not any('endpoint="completions"' in ln and 'outcome="ok"' in ln for ln in lines):
            problems.append("no completions ok")
        for outcome, why in (("queue_full", "the 429s of the tight app"), ("timeout", "its 504"),
                             ("cancelled", "the disconnected stream")):
            if not any(f'outcome="{outcome}"' in ln for ln in lines):
                problems.append(f"no outcome {outcome} ({why})")
        free = [float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                if ln.startswith("ray_ringserve_kv_tokens_free{")]
        if not (free and all(0 <= f <= 4096 for f in free)):
            problems.append(f"kv_tokens_free {free}")
        assert not problems, problems

    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while True:
        try:
            check(httpx.get(url, timeout=10).text)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
