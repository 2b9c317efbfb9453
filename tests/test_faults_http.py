"""Faults through the HTTP service: a Serve app (tiny Llama, two CPU shard actors, gloo) with a
4 s transport timeout, driven with httpx over loopback. A fault costs no request: the engine
rebuilds the actor group and every request in flight recomputes its KV (prompt + tokens already
streamed) and goes on; a request fails only after `max_recoveries` (2) faults of its own.

- a shard process SIGKILLed while two requests decode together (one of them streamed): both
  complete with the tokens of fault-free runs, nothing is answered 503, the actors are new
  processes, and a document whose pinned KV died with them is answered the same, then from
  its cached KV again;
- a shard process SIGSTOPped (a hung peer) during a streamed decode: the stream stalls for the
  transport timeout, then goes on on the rebuilt group and ends with [DONE] and the tokens of a
  fault-free run;
- a request whose group fails three times: 503 `worker_failed` with Retry-After (before its
  deadline); the next request is right again.

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
# a fault's cost to a request: the wait (transport timeout), a hung actor's shutdown (10 s), a
# fresh group's start-up, the recompute of its KV
FAIL_BOUND_S = 150.0



@pytest.fixture(scope="module")
def svc(ray_session, tmp_path_factory):
    from ray import serve

    from ringserve.serve import build_app, wait_ready

    model_dir = str(tiny_model(tmp_path_factory, "llama"))
    print(f"test_faults_http seed {SEED}")
    base = start_serve()
    before = shard_pids()  # shard actors of other modules' groups, if any are left
    serve.run(build_app({"model": model_dir, "world_size": 2, "layout": "striped",
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


def _ours(svc, not_of: set = frozenset()) -> set:
    """The app's 2 shard processes (none of them in `not_of`: a rebuilt group's)."""
    t_end = time.monotonic() + 60  # a killed actor's process may take a moment to exit
    while True:
        pids = shard_pids() - svc.before
        if (len(pids) == 2 and not pids & not_of) or time.monotonic() > t_end:
            break
        time.sleep(0.2)
    assert len(pids) == 2 and not pids & not_of, \
        f"expected the app's 2 shard processes (not {sorted(not_of)}), found {sorted(pids)}"
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


def _engine(svc) -> dict:
    return svc.http.get("/stats").json()["engine"]


def _assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code", "request_id"}, err
    assert err["code"] == code and err["message"] and err["type"], err
    assert isinstance(err["request_id"], str) and err["request_id"], err
    return err


def _stream(svc, prompt: str, n: int, on_data=None):
    """A greedy streamed completion of exactly n tokens; `on_data(i)` is called after the i-th
    data event (1-based). Returns (token ids, data events, arrival time of each event)."""
    ids, events, times = [], [], []
    with svc.http.stream("POST", "/v1/completions", json={
            "model": "llama", "prompt": prompt, "max_tokens": n, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            times.append(time.monotonic())
            if line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                ids += chunk["choices"][0].get("token_ids") or []
            assert len(events) <= n + 2, "the stream went on past its max_tokens"
            if on_data is not None:
                on_data(len(events))
    return ids, events, times


def test_kill_while_two_requests_decode_costs_neither(svc):
    rng = svc.rng
    long_p, short_p = _phrase(rng, rng.randint(4, 12)), _phrase(rng, rng.randint(4, 12))
    n_long, n_short = 80, 40
    fresh_long = _tokens(_complete(svc, long_p, n_long, ignore_eos=True))
    fresh_short = _tokens(_complete(svc, short_p, n_short, ignore_eos=True))
    card = svc.http.post("/v1/documents", json={"text": _phrase(rng, 150)}).json()
    doc, doc_tokens = card["id"], card["num_tokens"]
    ask = {"question": _phrase(rng, 5), "max_tokens": 6, "temperature": 0,
           "return_token_ids": True}
    answer = svc.http.post(f"/v1/documents/{doc}/ask", json=ask).json()
    assert answer["num_cached_tokens"] >= doc_tokens        # served from the pinned KV
    old = _ours(svc)
    e0 = _engine(svc)
    before = svc.http.get("/stats").json()["requests"]
    out, kill = {}, {}

    def short():
        out["short"] = _complete(svc, short_p, n_short, ignore_eos=True)

    b = threading.Thread(target=short)

    def on_data(i):
        if i == 3:  # the long stream decodes: the short request joins it in the batch
            b.start()
            _wait_stats(svc, lambda s: s["engine"]["running"] == 2, "both requests running")
            kill["t"], kill["at"] = time.monotonic(), i
            os.kill(sorted(old)[0], signal.SIGKILL)

    ids, events, _ = _stream(svc, long_p, n_long, on_data)
    took = time.monotonic() - kill["t"]
    b.join(FAIL_BOUND_S)
    assert not b.is_alive()
    # both finished on the rebuilt group with the tokens of fault-free runs: the stream did not
    # repeat or lose the tokens it had sent before the fault
    assert events[-1] == "[DONE]" and ids == fresh_long, (events[-3:], ids, fresh_long)
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert _tokens(out["short"]) == fresh_short
    assert took < FAIL_BOUND_S
    e1 = _engine(svc)
    assert e1["worker_failures"] - e0["worker_failures"] == 1, (e0, e1)
    assert e1["recovered_requests"] - e0["recovered_requests"] >= 1, (e0, e1)
    assert e1["requests_failed"] == e0["requests_failed"], (e0, e1)
    after = svc.http.get("/stats").json()["requests"]
    assert after.get("completions:worker_failed", 0) == before.get("completions:worker_failed", 0)
    new = _ours(svc, not_of=old)
    assert _tokens(_complete(svc, short_p, n_short, ignore_eos=True)) == fresh_short
    # the document's pinned KV died with the old actors: its KV is computed again on the new
    # group (by the engine re-pinning it, or by this first question), with the same answer; the
    # question after it reuses the document's KV once more
    again = svc.http.post(f"/v1/documents/{doc}/ask", json=ask).json()
    assert again["token_ids"] == answer["token_ids"], again
    first_cached = again["num_cached_tokens"]
    again = svc.http.post(f"/v1/documents/{doc}/ask", json=ask).json()
    assert again["token_ids"] == answer["token_ids"], again
    assert again["num_cached_tokens"] >= doc_tokens, again
    assert _ours(svc) == new
    print(f"HTTP kill during a batch: both requests completed, the stream {took:.1f} s after "
          f"the kill (killed after {kill['at']} events); recovered "
          f"{e1['recovered_requests'] - e0['recovered_requests']}; first question after it "
          f"reused {first_cached} of the document's {doc_tokens} tokens")


def test_hung_peer_stalls_a_stream_that_then_completes(svc):
    rng = svc.rng
    prompt, n = _phrase(rng, rng.randint(4, 12)), 40
    fresh = _tokens(_complete(svc, prompt, n, ignore_eos=True))
    old = _ours(svc)
    hung = sorted(old)[1]
    e0 = _engine(svc)
    stop = {}

    def on_data(i):
        if i == 3:
            stop["t"], stop["i"] = time.monotonic(), i
            os.kill(hung, signal.SIGSTOP)

    try:
        ids, events, times = _stream(svc, prompt, n, on_data)
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass
    took = times[-1] - stop["t"]
    assert events[-1] == "[DONE]" and ids == fresh, (events[-3:], ids, fresh)
    # the stall was real: some gap after the stop lasted about the transport timeout (a step
    # waits that long on the hung peer before it fails and the group is rebuilt)
    after = [stop["t"]] + times[stop["i"]:]
    gaps = [after[j + 1] - after[j] for j in range(len(after) - 1)]
    assert max(gaps) >= 0.75 * TRANSPORT_TIMEOUT_S, gaps
    assert took < FAIL_BOUND_S
    e1 = _engine(svc)
    assert e1["worker_failures"] - e0["worker_failures"] == 1, (e0, e1)
    assert e1["requests_failed"] == e0["requests_failed"], (e0, e1)
    _ours(svc, not_of=old)      # the hung process was replaced
    assert _tokens(_complete(svc, prompt, n, ignore_eos=True)) == fresh
    print(f"HTTP hung peer: stream stalled {max(gaps):.1f} s, done {took:.1f} s after the stop")


def test_a_request_past_max_recoveries_gets_503(svc):
    """max_recoveries is 2: the third fault during one request fails it, cleanly and in time."""
    rng = svc.rng
    prompt = _phrase(rng, rng.randint(4, 12))
    fresh = _tokens(_complete(svc, prompt, 8))
    out = {}

    def send():
        t0 = time.monotonic()
        out["r"] = _complete(svc, prompt, 3000, ignore_eos=True)
        out["took"] = time.monotonic() - t0

    a = threading.Thread(target=send)
    a.start()
    group = _ours(svc)
    for k in range(3):
        # it runs on this group: it decodes (again, after recomputing its KV on a new one)
        tokens0 = _engine(svc)["generated_tokens"]
        _wait_stats(svc, lambda s, t0=tokens0: s["engine"]["running"] == 1
                    and s["engine"]["generated_tokens"] > t0 + 2,
                    f"the request decoding on group {k}", FAIL_BOUND_S)
        assert a.is_alive(), out
        os.kill(sorted(group)[k % 2], signal.SIGKILL)
        if k < 2:
            group = _ours(svc, not_of=group)
    a.join(FAIL_BOUND_S)
    assert not a.is_alive()
    r = out["r"]
    err = _assert_error(r, 503, "worker_failed")
    assert r.headers.get("retry-after"), r.headers
    assert out["took"] < 120      # its 504 deadline had not passed
    assert _tokens(_complete(svc, prompt, 8)) == fresh
    stats = svc.http.get("/stats").json()
    assert stats["requests"].get("completions:worker_failed", 0) == 1, stats["requests"]
    print(f"HTTP third fault: 503 after {out['took']:.1f} s ({err['message']})")
