"""Prometheus metrics of one replica through `ray.util.metrics` (Ray exports them per node).

Each recording also updates plain in-process counters, which `GET /stats` returns: handy for a
quick look without Prometheus, and what the tests read to see outcomes such as cancellations.
"""
from __future__ import annotations

import threading
from collections import Counter as _Tally
from typing import Dict, Optional

from ray.util import metrics

_TTFT_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
_RATE_BOUNDS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class ServeMetrics:
    def __init__(self, model: str, replica: str = ""):
        self._tags = {"model": model, "replica": replica}
        keys = ("model", "replica")
        self._requests = metrics.Counter(
            "ringserve_requests", description="HTTP requests by endpoint and outcome",
            tag_keys=keys + ("endpoint", "outcome"))
        self._ttft = metrics.Histogram(
            "ringserve_time_to_first_token_seconds", description="arrival to first token",
            boundaries=_TTFT_BOUNDS, tag_keys=keys + ("endpoint",))
        self._rate = metrics.Histogram(
            "ringserve_decode_tokens_per_second", description="generated tokens / decode time",
            boundaries=_RATE_BOUNDS, tag_keys=keys + ("endpoint",))
        self._generated = metrics.Counter(
            "ringserve_generated_tokens", description="tokens generated", tag_keys=keys)
        self._prompt = metrics.Counter(
            "ringserve_prompt_tokens", description="prompt tokens, by whether the document "
            "cache served them", tag_keys=keys + ("cached",))
        self._queue = metrics.Gauge(
            "ringserve_queue_depth", description="requests waiting for the actor group",
            tag_keys=keys)
        self._running = metrics.Gauge(
            "ringserve_requests_running", description="requests holding the actor group",
            tag_keys=keys)
        self._in_progress = metrics.Gauge(
            "ringserve_requests_in_progress", description="requests the replica works on that "
            "have not started their response (reading the body, tokenizing, waiting for the "
            "first token)", tag_keys=keys + ("endpoint",))
        self._kv_used = metrics.Gauge(
            "ringserve_kv_tokens_used", description="KV cache tokens in use", tag_keys=keys)
        self._kv_free = metrics.Gauge(
            "ringserve_kv_tokens_free", description="KV cache tokens free", tag_keys=keys)
        for m in (self._requests, self._ttft, self._rate, self._generated, self._prompt,
                  self._queue, self._running, self._in_progress, self._kv_used,
                  self._kv_free):
            m.set_default_tags(self._tags)
        self._lock = threading.Lock()
        self.outcomes: _Tally = _Tally()
        self.in_progress: _Tally = _Tally()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.last_ttft_s: Optional[float] = None
        self.last_tokens_per_s: Optional[float] = None
        self.queue_depth = 0
        self.running = 0
        self.kv: Dict[str, int] = {}

    def handling(self, endpoint: str, delta: int) -> None:
        """A request entered its route handler (+1), or left it (-1): its response starts, or
        it ended without one."""
        with self._lock:
            self.in_progress[endpoint] += delta
            n = self.in_progress[endpoint]
        self._in_progress.set(n, {"endpoint": endpoint})

    def request(self, endpoint: str, outcome: str) -> None:
        self._requests.inc(1, {"endpoint": endpoint, "outcome": outcome})
        with self._lock:
            self.outcomes[f"{endpoint}:{outcome}"] += 1

    def first_token(self, endpoint: str, seconds: float) -> None:
        self._ttft.observe(seconds, {"endpoint": endpoint})
        self.last_ttft_s = seconds

    def finished(self, endpoint: str, prompt_tokens: int, cached_tokens: int,
                 generated: int, decode_s: Optional[float]) -> None:
        if generated:
            self._generated.inc(generated)
        new = max(prompt_tokens - cached_tokens, 0)
        if new:
            self._prompt.inc(new, {"cached": "no"})
        if cached_tokens:
            self._prompt.inc(cached_tokens, {"cached": "yes"})
        # the first token comes out of the prefill, the other generated-1 out of decode steps
        if decode_s and decode_s > 0 and generated > 1:
            rate = (generated - 1) / decode_s
            self._rate.observe(rate, {"endpoint": endpoint})
            self.last_tokens_per_s = rate
        with self._lock:
            self.generated_tokens += generated
            self.prompt_tokens += prompt_tokens
            self.cached_prompt_tokens += cached_tokens

    def queue(self, waiting: int, running: int) -> None:
        self._queue.set(waiting)
        self._running.set(running)
        self.queue_depth, self.running = waiting, running

    def kv_tokens(self, used: Optional[int], free: Optional[int]) -> None:
        if used is not None:
            self._kv_used.set(used)
            self.kv["used"] = int(used)
        if free is not None:
            self._kv_free.set(free)
            self.kv["free"] = int(free)

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": dict(self.outcomes), "generated_tokens": self.generated_tokens,
                    "prompt_tokens": self.prompt_tokens,
                    "cached_prompt_tokens": self.cached_prompt_tokens,
                    "last_ttft_s": self.last_ttft_s, "last_tokens_per_s": self.last_tokens_per_s,
                    "queue_depth": self.queue_depth, "running": self.running,
                    "in_progress": {k: v for k, v in self.in_progress.items() if v},
                    "kv_tokens": dict(self.kv)}


__all__ = ["ServeMetrics"]
