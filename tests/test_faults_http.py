"""Faults through the HTTP service: a Serve app (tiny Llama, two CPU shard actors, gloo) with a
4 s transport timeout, driven with httpx over loopback.

- a shard process SIGKILLed during a decode: the request gets 503 `worker_failed` with
  Retry-After within a bound, the request queued behind it is answered on the rebuilt group with
  the tokens of a fresh run, and the actors are new processes;
- a shard process SIGSTOPped (a hung peer) during a streamed decode: the stream, already at
  200, ends with an in-band OpenAI error event `worker_failed` instead of hanging; the next request
  is right again.

The shard actors live inside the Serve replica, so the test has no handle to `ray.kill`; it finds
their processes by title (`ray::ModelShardWorker...`) among its own descendants (the local Ray
cluster started by the session fixture), which excludes any other Ray cluster on the machine.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from tinymodels import tiny_model
from servehelpers import shard_pids, start_serve

pytestmark = pytest.mark.timeout(600)

SEED = random.SystemRandom().randrange(1 << 30)
WORDS = ("ship cargo master owner port freight charter voyage clause tons harbour wind sail "
         "deck anchor tide merchant lien bill lading crew").split()
TRANSPORT_TIMEOUT_S = 4.0
FAIL_BOUND_S = 150.0       # the wait, a hung actor's shutdown (10 s), a fresh group's start-up



@pytest.fixture(scope="module")
def svc(ray_session, tmp_path_factory):
    from ray import serve

    from ringserve.serve import build_app, wait_ready

    model_dir = str(tiny_model(tmp_path_factory, "llama"))
    print(f"test_faults_http seed {SEED}")
    base = start_serve()
    before = shard_pids()  # shard actors of other modules' groups, if any are left
    serve.run(build_app({"model": model_dir, "world_size": 2, "schedule": "striped",
                         "max_kv_tokens": 4096, "max_queue": 8, "request_timeout_s": 120,
                         "model_name": "llama",
                         "transport_timeout_s": TRANSPORT_TIMEOUT_S}),
              name="rs-faults", route_prefix="/")
    try:
        wait_ready(base, 300)
        yield SimpleNamespace(base=base, before=before, rng=random.Random(SEED),
                              http=httpx.Client(base_url=base, timeout=FAIL_BOUND_S + 60))
    finally:
        serve.delete("rs-faults")
        serve.shutdown()


def _ours(svc) -> set:
    t_end = time.monotonic() + 15  # a killed actor's process may take a moment to exit
    while True:
        pids = shard_pids() - svc.before
        if len(pids) == 2 or time.monotonic() > t_end:
            break
        time.sleep(0.2)
    assert len(pids) == 2, f"expected the app's 2 shard processes, found {sorted(pids)}"
    return pids


def _complete(svc, prompt: str, n: int, **kw) -> httpx.Response:
    return svc.http.post("/v1/completions", json={
        "model": "llama", "prompt": prompt, "max_tokens": n, "temperature": 0,
        "return_token_ids": True, **kw})


def _tokens(r: httpx.Response) -> list:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _phrase(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _wait_stats(svc, pred, what: str, timeout_s: float = 60.0) -> dict:
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        s = svc.http.get("/stats").json()
        if pred(s):
            return s
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"], err


def test_kill_during_decode_gives_503_and_queued_request_is_answered(svc):
    rng = svc.rng
    prompt, other = _phrase(rng, rng.randint(4, 12)), _phrase(rng, rng.randint(4, 12))
    fresh = _tokens(_complete(svc, prompt, 10))
    card = svc.http.post("/v1/documents", json={"text": _phrase(rng, 150)}).json()
    doc, doc_tokens = card["id"], card["num_tokens"]
    ask = {"question": _phrase(rng, 5), "max_tokens": 6, "temperature": 0,
           "return_token_ids": True}
    answer = svc.http.post(f"/v1/documents/{doc}/ask", json=ask).json()
    assert answer["num_cached_tokens"] >= doc_tokens        # served from the pinned KV
    old = _ours(svc)
    out = {}

    def send(name, p, n, **kw):
        t0 = time.monotonic()
        out[name] = (_complete(svc, p, n, **kw), time.monotonic() - t0)

    # a long greedy decode (minutes unless stopped), then a second request queued behind it
    a = threading.Thread(target=send, args=("long", other, 1500), kwargs={"ignore_eos": True})
    a.start()
    _wait_stats(svc, lambda s: s["running"] == 1, "the long request to hold the engine")
    time.sleep(1.0)  # its short prefill is over: decoding now
    b = threading.Thread(target=send, args=("queued", prompt, 10))
    b.start()
    _wait_stats(svc, lambda s: s["queue_depth"] == 1, "the second request to queue")
    t_kill = time.monotonic()
    os.kill(sorted(old)[0], signal.SIGKILL)
    a.join(FAIL_BOUND_S)
    b.join(FAIL_BOUND_S)
    r, _ = out["long"]
    took = time.monotonic() - t_kill
    _assert_error(r, 503, "worker_failed")
    assert r.headers.get("retry-after"), r.headers
    assert out["queued"][0].status_code == 200 and _tokens(out["queued"][0]) == fresh
    assert took < FAIL_BOUND_S
    new = _ours(svc)
    assert not new & old, f"old shard processes survived: {old} -> {new}"
    assert _tokens(_complete(svc, prompt, 10)) == fresh
    # the document's pinned KV died with the old actors: the first question prefills it again
    # (at most a short prefix such as BOS is shared with other cached prompts), with the same
    # answer; the one after reuses the KV once more
    again = svc.http.post(f"/v1/documents/{doc}/ask", json=ask).json()
    assert again["token_ids"] == answer["token_ids"], again
    assert again["num_cached_tokens"] < doc_tokens, again
    again = svc.http.post(f"/v1/documents/{doc}/ask", json=ask).json()
    assert again["token_ids"] == answer["token_ids"], again
    assert again["num_cached_tokens"] >= doc_tokens, again
    stats = svc.http.get("/stats").json()
    assert stats["requests"].get("completions:worker_failed", 0) == 1, stats["requests"]
    print(f"HTTP kill during decode: 503 within {took:.1f} s")


def test_hung_peer_ends_a_stream_with_an_error_event(svc):
    rng = svc.rng
    prompt = _phrase(rng, rng.randint(4, 12))
    fresh = _tokens(_complete(svc, prompt, 8))
    old = _ours(svc)
    hung = sorted(old)[1]
    events, t_stop = [], None
    try:
        with svc.http.stream("POST", "/v1/completions", json={
                "model": "llama", "prompt": prompt, "max_tokens": 1500, "temperature": 0,
                "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    t_stop = time.monotonic()
                    os.kill(hung, signal.SIGSTOP)
                assert len(events) < 1500, "the stream went on past its hung peer"
        took = time.monotonic() - t_stop
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert events[-1] == "[DONE]" or "error" in events[-1]
    errs = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    assert len(errs) == 1 and errs[0]["code"] == "worker_failed", events[-3:]
    assert "timed out" in errs[0]["message"].lower() or "Timeout" in errs[0]["message"]
    assert TRANSPORT_TIMEOUT_S <= took < FAIL_BOUND_S
    assert not _ours(svc) & old
    assert _tokens(_complete(svc, prompt, 8)) == fresh
    print(f"HTTP hung peer: in-band worker_failed after {took:.1f} s")
