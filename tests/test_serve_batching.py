"""Continuous batching through the HTTP service: a real Serve app over 2 CPU shard actors, the
official `openai` client and httpx.

- 8 concurrent streams (chat and completions) all complete, and each equals the same request
  run alone on the same service;
- while a long document uploads with wait=false (prefilled in chunks), a short completion is
  answered before the upload finishes;
- a DELETE of a document still prefilling cancels its prefill and frees its pages.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import openai
import pytest

from servehelpers import start_serve
from tinymodels import tiny_model

pytestmark = pytest.mark.timeout(600)
WORDS = ("ship cargo master owner port freight charter voyage clause tons harbour wind sail "
         "deck anchor tide merchant lien bill lading crew").split()


@pytest.fixture(scope="module")
def svc(ray_session, tmp_path_factory):
    from ray import serve

    from ringserve.serve import run

    model_dir = str(tiny_model(tmp_path_factory, "llama"))
    base = start_serve()
    try:
        # small prompt chunks: a long upload takes many steps, others run between them
        run(model_dir, world_size=2, port=int(base.rsplit(":", 1)[1]), blocking=False,
            name="rs-batching", model_name="llama", num_cpus_per_worker=0.5,
            layout="striped", max_kv_tokens=16384, max_num_batched_tokens=32,
            request_timeout_s=300)
        yield base
    finally:
        serve.delete("rs-batching")
        serve.shutdown()


def _prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12 + 3 * i))


def _stream_completion(client, i, out):
    text, finish = [], None
    for ev in client.completions.create(model="llama", prompt=_prompt(i), max_tokens=24,
                                        temperature=0, stream=True):
        text.append(ev.choices[0].text)
        finish = ev.choices[0].finish_reason or finish
    out[i] = ("".join(text), finish)


def _stream_chat(client, i, out):
    text, finish = [], None
    for ev in client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": _prompt(i)}], max_tokens=24,
            temperature=0, stream=True):
        if ev.choices:
            text.append(ev.choices[0].delta.content or "")
            finish = ev.choices[0].finish_reason or finish
    out[i] = ("".join(text), finish)


def test_eight_concurrent_streams_equal_their_solo_runs(svc):
    client = openai.OpenAI(base_url=svc + "/v1", api_key="none", max_retries=0, timeout=300)
    kinds = [_stream_completion, _stream_chat] * 4
    solo = {}
    for i, fn in enumerate(kinds):                      # one at a time
        fn(client, i, solo)
    before = httpx.get(svc + "/stats", timeout=30).json()["engine"]
    together: dict = {}
    threads = [threading.Thread(target=fn, args=(openai.OpenAI(
        base_url=svc + "/v1", api_key="none", max_retries=0, timeout=300), i, together))
        for i, fn in enumerate(kinds)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(together) == list(range(8)), together
    for i in range(8):
        assert together[i] == solo[i], (i, together[i], solo[i])
        assert together[i][1] in ("length", "stop")
    assert sum(bool(together[i][0]) for i in range(8)) >= 4, together   # real text, mostly
    after = httpx.get(svc + "/stats", timeout=30).json()["engine"]
    assert after["requests_failed"] == before["requests_failed"]
    print(f"8 concurrent streams in {time.monotonic() - t0:.1f} s; engine steps "
          f"{after['steps'] - before['steps']}")


def test_a_short_completion_is_answered_during_a_long_upload(svc):
    http = httpx.Client(base_url=svc, timeout=300)
    doc = " ".join(WORDS[(j * 5) % len(WORDS)] + str(j % 97) for j in range(2500))
    r = http.post("/v1/documents", json={"text": doc, "wait": False})
    assert r.status_code == 202, r.text
    card = r.json()
    t0 = time.monotonic()
    a = http.post("/v1/completions", json={"model": "llama", "prompt": "the ship sails",
                                           "max_tokens": 3, "temperature": 0})
    took = time.monotonic() - t0
    assert a.status_code == 200, a.text
    assert a.json()["choices"][0]["text"] is not None
    got = http.get(f"/v1/documents/{card['id']}").json()
    assert got["status"] == "prefilling", (took, got)      # the upload is still going on
    deadline = time.monotonic() + 300
    while got["status"] == "prefilling" and time.monotonic() < deadline:
        time.sleep(0.2)
        got = http.get(f"/v1/documents/{card['id']}").json()
    assert got["status"] == "ready", got
    upload_s = time.monotonic() - t0
    assert took < upload_s / 2, (took, upload_s)
    assert http.delete(f"/v1/documents/{card['id']}").status_code == 200
    print(f"short completion {took:.2f} s during a {card['num_tokens']}-token upload of "
          f"{upload_s:.1f} s")


def test_deleting_a_document_while_it_prefills_cancels_the_prefill(svc):
    """DELETE during a long upload's prefill (wait=false) cancels it in the engine through the
    document's key: the prefill stops short of the document, its pages are free at once, the
    card is gone and the replica counts the prefill as cancelled, not as an error."""
    http = httpx.Client(base_url=svc, timeout=300)

    def engine():
        return http.get("/stats", timeout=30).json()["engine"]

    before = http.get("/stats", timeout=30).json()
    eng0 = before["engine"]
    assert eng0["running"] == 0 and eng0["queue_depth"] == 0, eng0
    # not the other test's text: nothing of it is cached
    doc = " ".join(WORDS[(j * 11) % len(WORDS)] + str(j % 89) for j in range(2200))
    r = http.post("/v1/documents", json={"text": doc, "wait": False})
    assert r.status_code == 202, r.text
    card = r.json()
    n = card["num_tokens"]
    deadline = time.monotonic() + 120
    while True:  # in the engine and computing (a delete before that has nothing to cancel yet)
        got = http.get(f"/v1/documents/{card['id']}").json()
        assert got["status"] == "prefilling", got  # the prefill must still be going on
        p = got.get("progress") or {}
        if p.get("state") == "running" and p.get("done", 0) > 0:
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    gone = http.delete(f"/v1/documents/{card['id']}")
    assert gone.status_code == 200 and gone.json()["deleted"] is True, gone.text
    assert http.get(f"/v1/documents/{card['id']}").status_code == 404
    assert card["id"] not in [d["id"] for d in http.get("/v1/documents").json()["data"]]
    deadline = time.monotonic() + 60
    while True:
        eng = engine()
        if eng["requests_cancelled"] > eng0["requests_cancelled"] and eng["running"] == 0:
            break
        assert time.monotonic() < deadline, (eng0, eng)  # before the fix: never cancelled
        time.sleep(0.1)
    computed = eng["prefill_tokens"] - eng0["prefill_tokens"]
    assert 0 < computed < n, (computed, n)                       # stopped part way
    assert eng["requests_cancelled"] == eng0["requests_cancelled"] + 1, (eng0, eng)
    assert eng["requests_failed"] == eng0["requests_failed"], (eng0, eng)
    assert eng["pinned_documents"] == eng0["pinned_documents"], (eng0, eng)
    assert eng["kv_tokens_used"] <= eng0["kv_tokens_used"], (eng0, eng)  # its pages are free
    time.sleep(1.0)
    later = engine()
    assert later["prefill_tokens"] == eng["prefill_tokens"], (eng, later)  # no work goes on
    outcomes = Counter(http.get("/stats", timeout=30).json()["requests"]) - \
        Counter(before["requests"])
    assert outcomes.get("documents_prefill:cancelled") == 1, outcomes
    assert not any(k.startswith("documents_prefill:") and not k.endswith(":cancelled")
                   for k in outcomes), outcomes
    print(f"deleted after {got['progress']['done']} of {n} tokens; {computed} computed")
