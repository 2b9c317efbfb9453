"""A small run of benchmarks/bench_load.py against the real service: 8 clients for 15 s against
a replica that runs 2 requests at once (max_num_seqs) and queues 2 more. Nothing may be lost
(every request answered, 200 or a clean 429 with OpenAI's error body), the in-flight bound
(max_num_seqs + max_queue) must hold, the server's own counts must match what the clients saw,
and every answer to one greedy prompt must be the tokens of that prompt run alone (requests that
ran in one batch did not mix their KV)."""
from __future__ import annotations

import importlib.util
import random
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tinymodels import tiny_model
from servehelpers import start_serve

pytestmark = pytest.mark.timeout(600)

SEED = random.SystemRandom().randrange(1 << 30)
MAX_NUM_SEQS = 2
MAX_QUEUE = 2
CLIENTS = 8


def _bench():
    if "bench_load" in sys.modules:
        return sys.modules["bench_load"]
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_load.py"
    spec = importlib.util.spec_from_file_location("bench_load", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = mod  # its dataclasses look their module up while being built
    spec.loader.exec_module(mod)
    return mod



@pytest.fixture(scope="module")
def base(ray_session, tmp_path_factory):
    from ray import serve

    from ringserve.serve import build_app, wait_ready

    model_dir = str(tiny_model(tmp_path_factory, "llama"))
    url = start_serve()
    serve.run(build_app({"model": model_dir, "world_size": 1, "max_kv_tokens": 2048,
                         "max_num_seqs": MAX_NUM_SEQS, "max_queue": MAX_QUEUE,
                         "request_timeout_s": 120,
                         "model_name": "llama"}), name="rs-load", route_prefix="/")
    try:
        wait_ready(url, 300)
        yield url
    finally:
        serve.delete("rs-load")
        serve.shutdown()


def test_load_nothing_lost_and_queue_limit_held(base):
    bench = _bench()
    print(f"test_load seed {SEED}")
    before = httpx.get(base + "/stats").json()["requests"]
    cfg = bench.LoadConfig(base, clients=CLIENTS, duration_s=15.0, max_tokens=6,
                           prompt_words=10, num_prompts=4, seed=SEED, backoff_s=0.05)
    # the engine's own count beside bench_load's sampler (which reads the runner's): the
    # scheduler runs requests together, never more than max_num_seqs
    engine_seen, stop = [], threading.Event()

    def sample_engine():
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                try:
                    e = http.get("/stats").json()["engine"]
                    engine_seen.append((e["running"], e["queue_depth"]))  # (running, waiting)
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                stop.wait(0.05)

    sampler = threading.Thread(target=sample_engine, daemon=True)
    sampler.start()
    try:
        r = bench.run_load(cfg)
    finally:
        stop.set()
        sampler.join(30)
    print(bench.format_report(r))
    print(f"engine (running, waiting) most seen: {max(engine_seen, default=None)}")

    assert r["lost"] == 0, r["lost_reasons"]
    assert not r["bad_bodies"], r["bad_bodies"]
    assert r["sent"] == r["answered"] == sum(r["by_status"].values())
    assert set(r["by_status"]) <= {"200", "429"}, r["by_status"]
    n429 = r["by_status"].get("429", 0)
    assert r["ok"] > 0 and n429 > 0, r["by_status"]   # both paths exercised
    assert r["by_code"] == {"queue_full": n429}
    assert r["stats_samples"] > 10 and r["max_queue_seen"] <= MAX_QUEUE, r["max_queue_seen"]
    assert r["max_running_seen"] <= MAX_NUM_SEQS, r["max_running_seen"]
    assert len(engine_seen) > 10
    assert max(n for n, _ in engine_seen) == MAX_NUM_SEQS, engine_seen  # batched, never more

    # the server counted exactly what the clients saw
    after = httpx.get(base + "/stats").json()["requests"]
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta.get("completions:ok", 0) == r["ok"]
    assert delta.get("completions:queue_full", 0) == n429

    # concurrency mixed no request's KV with another's: answers equal each prompt run alone
    assert not r["inconsistent_prompts"]
    with httpx.Client(base_url=base, timeout=120) as http:
        for i, answers in r["answers"].items():
            alone = http.post("/v1/completions", json={
                "model": "llama", "prompt": r["prompts"][i], "max_tokens": 6, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}).json()
            assert answers == [alone["choices"][0]["token_ids"]]


def test_bench_refuses_non_loopback_urls():
    bench = _bench()
    for url in ("http://192.0.2.1:8000", "http://8.8.8.8"):
        with pytest.raises(ValueError, match="loopback"):
            bench.LoadConfig(url)
    bench.LoadConfig("http://127.0.0.1:1")   # accepted (nothing is sent by the constructor)
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0


def test_queue_limit_holds_for_a_burst_on_an_idle_runner():
    """The race test_load first caught (7 waiting with max_queue 2): requests arriving in the same
    event-loop iteration on an idle runner must still be counted against the in-flight bound
    (concurrency + max_queue). Those admitted are handed to the engine at once: each work call
    here returns only once all of them have started (a runner that ran them one at a time would
    break the barrier)."""
    import asyncio
    import threading
    import time as _time

    from ringserve.serve.errors import APIError
    from ringserve.serve.runner import Deadline, EngineRunner

    rng = random.Random(SEED)
    concurrency, max_queue = rng.randint(1, 3), rng.randint(0, 3)
    bound = concurrency + max_queue
    burst = bound + rng.randint(3, 6)
    seen = []
    runner = EngineRunner(max_queue, 30.0, on_queue_change=lambda w, r: seen.append((w, r)),
                          concurrency=concurrency)
    all_started = threading.Barrier(bound, timeout=20)
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def work():
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        all_started.wait()
        _time.sleep(0.02)
        with lock:
            running[0] -= 1
        return "done"

    async def one():
        try:
            return await runner.call(work, Deadline.after(30.0), "burst")
        except APIError as e:
            return e.status

    async def main():
        return await asyncio.gather(*(one() for _ in range(burst)))

    try:
        results = asyncio.run(main())
    finally:
        runner.shutdown()
    assert results.count("done") == bound, (concurrency, max_queue, results)
    assert results.count(429) == burst - bound
    # the gauges: running is what the engine runs at once, the rest of the in-flight wait
    assert max(w for w, _ in seen) == max_queue and max(r for _, r in seen) == concurrency, seen
    assert all(w <= max_queue and r <= concurrency and (w == 0 or r == concurrency)
               for w, r in seen), seen
    assert seen[-1] == (0, 0), seen
    assert running[1] == bound
