"""Load benchmark of the HTTP service: N concurrent clients for a bounded time, over loopback.

    .venv/bin/python benchmarks/bench_load.py --clients 8 --duration 30 --max-queue 4
    .venv/bin/python benchmarks/bench_load.py --url http://127.0.0.1:8000 --clients 16

Without --url it starts a local Ray cluster and the service on 127.0.0.1 with the demo model
(random weights, CPU shard actors) or --model. Each client sends greedy /v1/completions requests
back to back (prompts drawn from a fixed seeded set, so every answer to one prompt must be the
same), sleeps briefly after a 429 (the Retry-After it gets, capped at --backoff), and stops
sending at the deadline. A sampler reads /stats every 50 ms for the queue depth the service
reports. The report: requests/s, latency p50/p90/p99 of answered requests, answers by status and
error code, the deepest queue seen, and whether anything was lost (a request without an HTTP
answer: connection error, client timeout) or answered inconsistently.

Only loopback URLs are accepted: this is a tool to size a local deployment, not to load a
service someone else runs.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import socket
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

import httpx

WORDS = ("ship cargo master owner port freight charter voyage clause tons harbour wind sail "
         "deck anchor tide merchant lien bill lading crew").split()


@dataclass
class LoadConfig:
    url: str
    clients: int = 8
    duration_s: float = 20.0
    max_tokens: int = 8
    prompt_words: int = 12
    num_prompts: int = 6
    model: Optional[str] = None          # None: the first one /v1/models lists
    api_key: Optional[str] = None
    backoff_s: float = 0.2               # at most this long after a 429
    request_timeout_s: float = 300.0     # client side: past it the request counts as lost
    seed: int = 0

    def __post_init__(self):
        check_loopback(self.url)
        for name in ("clients", "max_tokens", "prompt_words", "num_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        for name in ("duration_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s ({self.backoff_s}) must be >= 0")


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host is None:
        raise ValueError(f"url ({url!r}) has no host")
    addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise ValueError(f"url host {host!r} resolves to {sorted(addrs)}: only loopback "
                         "services may be load-tested with this script")


def percentile(xs: List[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


@dataclass
class _Tally:
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)     # "200", "429", ...
    codes: Counter = field(default_factory=Counter)        # OpenAI error codes
    lost: List[str] = field(default_factory=list)          # no HTTP answer: why
    latency_ok: List[float] = field(default_factory=list)
    latency_all: List[float] = field(default_factory=list)
    tokens: int = 0
    answers: Dict[int, set] = field(default_factory=lambda: defaultdict(set))
    bad_bodies: List[str] = field(default_factory=list)
    max_queue_seen: int = 0
    max_running_seen: int = 0
    stats_samples: int = 0


async def _client(http: httpx.AsyncClient, cfg: LoadConfig, model: str, prompts: List[str],
                  rng: random.Random, t_end: float, tally: _Tally) -> None:
    while time.monotonic() < t_end:
        i = rng.randrange(len(prompts))
        body = {"model": model, "prompt": prompts[i], "max_tokens": cfg.max_tokens,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        tally.sent += 1
        t0 = time.monotonic()
        try:
            r = await http.post("/v1/completions", json=body)
        except (httpx.HTTPError, OSError) as exc:
            tally.lost.append(f"{type(exc).__name__}: {exc}"[:200])
            continue
        dt = time.monotonic() - t0
        tally.latency_all.append(dt)
        tally.statuses[str(r.status_code)] += 1
        if r.status_code == 200:
            try:
                choice = r.json()["choices"][0]
                ids = tuple(choice["token_ids"])
            except (ValueError, KeyError, IndexError, TypeError):
                tally.bad_bodies.append(r.text[:200])
                continue
            tally.latency_ok.append(dt)
            tally.tokens += len(ids)
            tally.answers[i].add(ids)
            continue
        try:
            err = r.json()["error"]
            tally.codes[str(err["code"])] += 1
        except (ValueError, KeyError, TypeError):
            tally.bad_bodies.append(f"{r.status_code}: {r.text[:200]}")
        if r.status_code == 429:
            wait = float(r.headers.get("retry-after", cfg.backoff_s) or cfg.backoff_s)
            await asyncio.sleep(min(wait, cfg.backoff_s) * (0.5 + rng.random()))


async def _sampler(http: httpx.AsyncClient, t_end: float, tally: _Tally) -> None:
    while time.monotonic() < t_end:
        try:
            s = (await http.get("/stats")).json()
            tally.max_queue_seen = max(tally.max_queue_seen, int(s.get("queue_depth", 0) or 0))
            tally.max_running_seen = max(tally.max_running_seen, int(s.get("running", 0) or 0))
            tally.stats_samples += 1
        except (httpx.HTTPError, OSError, ValueError):
            pass
        await asyncio.sleep(0.05)


async def run_load_async(cfg: LoadConfig) -> Dict[str, Any]:
    rng = random.Random(cfg.seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(cfg.prompt_words))
               for _ in range(cfg.num_prompts)]
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.clients + 4, max_keepalive_connections=cfg.clients + 4)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=cfg.request_timeout_s) as http:
        model = cfg.model
        if model is None:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]
        tally = _Tally()
        t0 = time.monotonic()
        t_end = t0 + cfg.duration_s
        await asyncio.gather(
            _sampler(http, t_end, tally),
            *(_client(http, cfg, model, prompts, random.Random(cfg.seed * 1000 + c), t_end,
                      tally) for c in range(cfg.clients)))
        wall = time.monotonic() - t0
    answered = sum(tally.statuses.values())
    ok = tally.statuses.get("200", 0)
    inconsistent = {i: len(a) for i, a in tally.answers.items() if len(a) > 1}
    return {
        "clients": cfg.clients, "duration_s": cfg.duration_s, "wall_s": round(wall, 3),
        "max_tokens": cfg.max_tokens, "sent": tally.sent, "answered": answered, "ok": ok,
        "requests_per_s": ok / wall, "answers_per_s": answered / wall,
        "tokens_per_s": tally.tokens / wall,
        "latency_ok_s": {f"p{q}": percentile(tally.latency_ok, q) for q in (50, 90, 99)},
        "latency_all_s": {f"p{q}": percentile(tally.latency_all, q) for q in (50, 90, 99)},
        "by_status": dict(tally.statuses), "by_code": dict(tally.codes),
        "lost": len(tally.lost), "lost_reasons": tally.lost[:5],
        "bad_bodies": tally.bad_bodies[:5], "inconsistent_prompts": inconsistent,
        "max_queue_seen": tally.max_queue_seen, "max_running_seen": tally.max_running_seen,
        "stats_samples": tally.stats_samples,
        "prompts": prompts, "answers": {i: [list(x) for x in a] for i, a in tally.answers.items()},
    }


def run_load(cfg: LoadConfig) -> Dict[str, Any]:
    return asyncio.run(run_load_async(cfg))


def format_report(r: Dict[str, Any]) -> str:
    lat, lat_all = r["latency_ok_s"], r["latency_all_s"]
    rows = [
        ("clients / duration", f"{r['clients']} / {r['duration_s']:g} s (wall {r['wall_s']:.1f} s)"),
        ("sent / answered / lost", f"{r['sent']} / {r['answered']} / {r['lost']}"),
        ("ok requests/s", f"{r['requests_per_s']:.2f}"),
        ("answers/s (incl. 429)", f"{r['answers_per_s']:.2f}"),
        ("generated tokens/s", f"{r['tokens_per_s']:.1f}"),
        ("latency ok p50/p90/p99", " / ".join(f"{lat[k] * 1000:.0f} ms" for k in ("p50", "p90", "p99"))),
        ("latency all p50/p90/p99", " / ".join(f"{lat_all[k] * 1000:.0f} ms"
                                              for k in ("p50", "p90", "p99"))),
        ("answers by status", json.dumps(r["by_status"], sort_keys=True)),
        ("errors by code", json.dumps(r["by_code"], sort_keys=True)),
        ("deepest queue seen", f"{r['max_queue_seen']} ({r['stats_samples']} samples)"),
        ("inconsistent answers", json.dumps(r["inconsistent_prompts"])),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _start_local(a) -> str:
    import os

    import ray

    from ringserve.serve import run

    model = a.model
    if model is None:
        from ringserve.demo import DEFAULT_MODEL_DIR
        from ringserve.demo_model import make_demo_model
        model = str(make_demo_model(DEFAULT_MODEL_DIR))
    ray.init(address="local", num_cpus=max(os.cpu_count() or 2, a.world_size + 3),
             include_dashboard=False, log_to_driver=False)
    return run(model, world_size=a.world_size, host="127.0.0.1", port=a.port, blocking=False,
               max_queue=a.max_queue, request_timeout_s=a.request_timeout,
               model_name="bench", max_kv_tokens=a.max_kv_tokens)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running service (loopback); default: start one")
    p.add_argument("--model", default=None, help="checkpoint for the local service (default: "
                                                 "the demo model)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--max-kv-tokens", type=int, default=8192)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prompt-words", type=int, default=12)
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    a = p.parse_args(argv)
    url = a.url
    if url is not None:
        check_loopback(url)
    else:
        url = _start_local(a)
    cfg = LoadConfig(url, clients=a.clients, duration_s=a.duration, max_tokens=a.max_tokens,
                     prompt_words=a.prompt_words, api_key=a.api_key, seed=a.seed)
    try:
        report = run_load(cfg)
    finally:
        if a.url is None:
            import ray
            from ray import serve
            serve.shutdown()
            ray.shutdown()
    print(format_report(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    lost = report["lost"] or report["bad_bodies"] or report["inconsistent_prompts"]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
