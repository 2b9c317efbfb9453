"""Continuous batching through the HTTP service: a real Serve app over 2 CPU shard actors, the
official `openai` client and httpx.

- 8 concurrent streams (chat and completions) all complete, and each equals the same request
  run alone on the same service;
- while a long document uploads with wait=false (prefilled in chunks), a short completion is
  answered before the upload finishes.
"""
from __future__ import annotations

import threading
import time

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
