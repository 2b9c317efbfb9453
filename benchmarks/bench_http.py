"""HTTP benchmark of the Serve app: what a client sees through the proxy.

    .venv/bin/python benchmarks/bench_http.py                       # demo model, 2 CPU actors
    .venv/bin/python benchmarks/bench_http.py --model DIR --device cuda --world-size 2 \\
        --doc-tokens 100000 --max-tokens 128 --concurrency 1,4,16
    .venv/bin/python benchmarks/bench_http.py --url http://host:8000 --api-key KEY

Without --url it starts a fresh local Ray cluster and the app (ringserve.serve.run) itself.
Measured, all client-side wall clock:
  stream    streaming completions one at a time: time to first token (first SSE chunk) and decode
            tokens/s ((n-1) tokens over first-to-last chunk), median and p90
  load      C concurrent clients, non-streaming: requests/s, generated tokens/s, latency p50/p90
  upload    the same document re-sent as JSON text, msgpack text, JSON ids, msgpack uint32 ids:
            body size and request time. The engine keys cached documents by token ids, so after
            the first (cold) upload a re-upload is a cache hit: these times are the HTTP,
            parsing and tokenizing cost of each format, not the prefill
  ask       a question on a document whose KV is cached vs the same prompt (another document of
            the same length) sent cold to /v1/completions: time to first token
The table is printed last; every figure for docs/benchmarks.md needs the card, date and command.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import httpx
import msgpack
import numpy as np


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORDS = ("ship cargo master owner port freight charter voyage clause tons harbour wind sail "
         "deck anchor tide merchant lien bill lading crew").split()


def phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Bench:
    def __init__(self, url: str, api_key: Optional[str], model: str, timeout_s: float = 3600):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)
        self.model = model
        self.rows: List[Dict[str, str]] = []

    def row(self, what: str, setting: str, result: str):
        self.rows.append({"what": what, "setting": setting, "result": result})
        log(f"  {what:8s} {setting:38s} {result}")

    def stream_one(self, prompt: str, max_tokens: int):
        t0 = time.perf_counter()
        first = last = None
        n = 0
        with self.http.stream("POST", "/v1/completions", json={
                "model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "return_token_ids": True}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
                if ids:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += len(ids)
        return first - t0, (n - 1) / (last - first) if n > 1 and last > first else float("nan")

    def bench_stream(self, rng, requests: int, max_tokens: int):
        self.stream_one(phrase(rng, 8), 4)  # warm-up
        ttft, rate = [], []
        for _ in range(requests):
            a, b = self.stream_one(phrase(rng, rng.randint(6, 16)), max_tokens)
            ttft.append(a)
            rate.append(b)
        engine = ""
        st = self.http.get("/stats")
        if st.status_code == 200:  # the engine's own view of the last request, for comparison
            t = st.json().get("engine", {}).get("last_timings", {})
            if t:
                engine = (f" (engine: TTFT {t.get('ttft_s', float('nan')) * 1e3:.0f} ms, "
                          f"decode {t.get('decode_tokens_per_s', float('nan')):.1f} tok/s)")
        self.row("stream", f"{requests} requests x {max_tokens} tokens",
                 f"TTFT median {statistics.median(ttft) * 1e3:.0f} ms, p90 "
                 f"{pct(ttft, 0.9) * 1e3:.0f} ms; decode median {statistics.median(rate):.1f} "
                 f"tok/s, p90-slowest {pct(rate, 0.1):.1f}" + engine)

    def bench_load(self, rng, concurrency: int, requests: int, max_tokens: int):
        prompts = [phrase(rng, rng.randint(6, 16)) for _ in range(requests)]

        def one(p):
            t = time.perf_counter()
            r = self.http.post("/v1/completions", json={
                "model": self.model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True})
            r.raise_for_status()
            return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            res = list(pool.map(one, prompts))
        wall = time.perf_counter() - t0
        lat = [a for a, _ in res]
        toks = sum(b for _, b in res)
        self.row("load", f"C={concurrency}, {requests} requests x {max_tokens}",
                 f"{requests / wall:.2f} req/s, {toks / wall:.1f} tok/s; latency p50 "
                 f"{pct(lat, 0.5):.2f} s, p90 {pct(lat, 0.9):.2f} s")

    def post_doc(self, body: bytes, ctype: str) -> dict:
        r = self.http.post("/v1/documents", content=body, headers={"Content-Type": ctype})
        r.raise_for_status()
        return msgpack.unpackb(r.content) if "msgpack" in r.headers["content-type"] else r.json()

    def bench_upload(self, text: str, ids: List[int], repeats: int = 3) -> str:
        t = time.perf_counter()
        doc = self.post_doc(json.dumps({"text": text}).encode(), "application/json")
        self.row("upload", f"cold, JSON text, {doc['num_tokens']} tokens",
                 f"{time.perf_counter() - t:.2f} s (server prefill {doc['prefill_s']:.2f} s)")
        forms = {
            "JSON text": (lambda: json.dumps({"text": text}).encode(), "application/json"),
            "msgpack text": (lambda: msgpack.packb({"text": text}), "application/msgpack"),
            "JSON token ids": (lambda: json.dumps({"token_ids": ids}).encode(),
                               "application/json"),
            "msgpack uint32 ids": (lambda: msgpack.packb(
                {"token_ids": np.asarray(ids, dtype="<u4").tobytes()}), "application/msgpack"),
        }
        keep = []
        for name, (make, ctype) in forms.items():
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                body = make()
                d = self.post_doc(body, ctype)
                times.append(time.perf_counter() - t)
                keep.append(d["id"])
                assert d["num_tokens"] == doc["num_tokens"], (name, d["num_tokens"])
            self.row("upload", f"cached, {name}, {len(body) / 1e6:.2f} MB",
                     f"median {statistics.median(times) * 1e3:.0f} ms (encode + send + parse"
                     f"{' + tokenize' if 'text' in name else ''})")
        for d in keep:
            self.http.delete(f"/v1/documents/{d}")
        return doc["id"]

    def bench_ask(self, doc_id: str, n_doc: int, cold_ids: List[int], q_ids: List[int],
                  question: str, max_tokens: int):
        t = time.perf_counter()
        r = self.http.post("/v1/completions", json={
            "model": self.model, "prompt": cold_ids + q_ids, "max_tokens": max_tokens,
            "temperature": 0})
        r.raise_for_status()
        cold = time.perf_counter() - t
        cold_cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        asks = []
        for _ in range(3):
            t = time.perf_counter()
            a = self.http.post(f"/v1/documents/{doc_id}/ask", json={
                "question": question, "max_tokens": max_tokens, "temperature": 0})
            a.raise_for_status()
            asks.append((time.perf_counter() - t, a.json()))
        warm = statistics.median(x for x, _ in asks)
        cached = asks[-1][1]["num_cached_tokens"]
        self.row("ask", f"{n_doc}-token document, {max_tokens} tokens",
                 f"cold prompt {cold:.2f} s ({cold_cached} tokens cached) vs cached document "
                 f"{warm:.2f} s ({cached} tokens from the KV cache); {cold / warm:.1f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="benchmark a running server instead of starting one")
    p.add_argument("--api-key")
    p.add_argument("--model", help="checkpoint directory (default: the demo model)")
    p.add_argument("--model-name", help="served model name (default: from the server)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--schedule", default="striped")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-kv-tokens", type=int, default=None)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--doc-tokens", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rng = random.Random(a.seed)

    model_dir = a.model
    started = False
    url = a.url
    if url is None:
        import ray

        from ringserve.serve import run
        if model_dir is None:
            from ringserve.demo import DEFAULT_MODEL_DIR
            from ringserve.demo_model import make_demo_model
            model_dir = str(make_demo_model(DEFAULT_MODEL_DIR))
        ray.init(address="local", num_cpus=max(os.cpu_count() or 2, a.world_size + 3),
                 include_dashboard=False, log_to_driver=False)
        t = time.perf_counter()
        url = run(model_dir, world_size=a.world_size, layout=a.schedule, device=a.device,
                  port=free_port(), blocking=False, max_kv_tokens=a.max_kv_tokens,
                  request_timeout_s=3600, max_queue=max(64, 2 * a.requests))
        started = True
        log(f"service up in {time.perf_counter() - t:.1f} s at {url}")
    b = Bench(url, a.api_key, a.model_name or "")
    try:
        if not b.model:
            b.model = b.http.get("/v1/models").json()["data"][0]["id"]
        if model_dir is None:
            raise SystemExit("--url needs --model DIR too (the client tokenizes for the id forms)")
        from ringserve.sample_document import sample_document
        from ringserve.serve.document_routes import QUESTION_TEMPLATE
        from ringserve.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(model_dir)
        log(f"benchmarking {url} (model {b.model})")
        b.bench_stream(rng, a.requests, a.max_tokens)
        for c in [int(x) for x in a.concurrency.split(",") if x]:
            b.bench_load(rng, c, max(a.requests, c), a.max_tokens)
        text = sample_document(n_tokens=a.doc_tokens, seed=a.seed + 1)
        ids = tok.encode(text)
        doc_id = b.bench_upload(text, ids)
        cold_ids = tok.encode(sample_document(n_tokens=a.doc_tokens, seed=a.seed + 2))
        question = "Who is the master of the ship?"
        q_ids = tok.encode(QUESTION_TEMPLATE.format(question=question), add_special_tokens=False)
        b.bench_ask(doc_id, len(ids), cold_ids, q_ids, question, min(a.max_tokens, 16))
        b.http.delete(f"/v1/documents/{doc_id}")
    finally:
        if started:
            import ray
            from ray import serve
            serve.shutdown()
            ray.shutdown()
    print(f"\nringserve HTTP benchmark: {url}, model {b.model}, world_size {a.world_size}, "
          f"device {a.device}, {time.strftime('%Y-%m-%d')}\n")
    print("| what | setting | result |\n|---|---|---|")
    for r in b.rows:
        print(f"| {r['what']} | {r['setting']} | {r['result']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
