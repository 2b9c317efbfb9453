"""The driver-side engine: continuous batching over an actor group of `ModelShardWorker`s.

One core loop on the engine's own thread, `schedule -> execute -> update`:

- requests (generate, score, cache/drop a document) arrive on one thread-safe queue from any
  thread and wait in the scheduler's FIFO (`ringserve.scheduler`);
- each step the scheduler returns a plan: one decode token for every running sequence, plus
  prompt chunks within the per-step token budget; the plan is executed by every rank at once
  (`ModelShardWorker.execute`, one Ray call per rank per step);
- the update samples per request (done on the workers, each with its own SamplingParams and
  seed), streams the new tokens, finishes requests, keeps finished sequences in the document
  cache, and frees KV.

Cancellation and deadlines act per request at the next step. A dead actor costs no request: the
group is rebuilt and every in-flight request recomputes its KV from its prompt plus the tokens
it has already streamed (the same machinery as preemption), unless its deadline passes or the
rebuild itself fails.

The group object needs `world_size`, `call(method, *args)`, `call_per_rank(method, args_list)`,
`rebuild()` and `shutdown()` (`ringserve.actors.ActorGroup`); Ray itself is never imported here.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .doc_cache import CachedSeq, DocumentCache, doc_key, exact_ints
from .errors import (CapacityError, GraphCaptureError, InvalidRequestError,
                     RequestCancelledError, RequestTimeoutError, RingServeError,
                     WorkerFailedError)
from .kv_manager import KVManager
from .parallel import layout as layouts
from .sampling import SampleContext, SamplingParams, StopState
from .plan import step_signature
from .scheduler import PENDING_TOKEN, Request, Scheduler, SchedulerConfig, Step

log = logging.getLogger(__name__)

KINDS = ("generate", "score", "cache_document", "drop_document")
STEP_LOG = 8192   # steps kept for `recent_steps`


@dataclass
class RequestOutput:
    prompt_token_ids: List[int]
    token_ids: List[int]
    text: str
    finish_reason: Optional[str]          # "stop" | "length" | "cancelled"
    logprobs: Optional[List[float]] = None
    num_cached_tokens: int = 0
    timings: Dict[str, float] = field(default_factory=dict)
    # params.top_logprobs: per output token, the k most likely (token_id, logprob)
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None
    # LLM.generate with n > 1 or best_of: every returned sample, this one first
    outputs: Optional[List["RequestOutput"]] = None


@dataclass
class StreamDelta:
    token_id: int
    text: str
    logprob: Optional[float] = None
    top_logprobs: Optional[List[Tuple[int, float]]] = None


@dataclass
class ScoreOutput:
    token_ids: List[int]
    logprobs: List[Optional[float]]       # logprobs[i] = log p(token i | tokens < i); [0] None


@dataclass
class EngineConfig:
    """The engine's options, built once at the edge (`LLM`, `ringserve serve`, batch)."""
    layout: str = "striped"                 # shard layout of prompt chunks: "striped" | "ring"
    max_num_seqs: int = 64                  # requests running at once
    max_num_batched_tokens: int = 2048      # prompt tokens per step (decodes come on top)
    passq_max_tokens: int = 256             # prompt continuations this short run pass-Q
    cascade: bool = True                    # shared-document decode reads the document once
    cuda_graphs: bool = False               # decode-only steps replay captured graphs
    # "tokens": the budget counts prompt tokens; "flops": a chunk late in a long prompt costs
    # more (its attention), so step times stay even (see SchedulerConfig.attn_equiv_tokens)
    prefill_cost: str = "tokens"
    # with "flops": the prompt tokens one cached key's attention is worth, per chunk token;
    # None: the model's flops per token over its attention flops per key (~28.6K for the 8B
    # shape). Measured rates differ by phase (docs/benchmarks.md, session 8): a benchmark knob
    attn_equiv_tokens: Optional[float] = None
    solo_budget_factor: int = 1             # budget multiplier while one prompt runs alone
    interleave_decode_steps: int = 0        # decode-only steps after each mixed step (0: none)
    document_cache_tokens: Optional[int] = None  # None: the group's whole KV capacity
    step_timeout_s: Optional[float] = None  # bound on one step's Ray call (None: no bound)
    # how a step reaches the actors: "tasks", a Ray task per rank (the default); "compiled", a
    # Ray Compiled Graph's channels where the group has them (ActorGroup.execute_step). On one
    # H200 (session 12) the compiled channel cut the 128K decode token 14.02 -> 10.86 ms but
    # raised the time to first token of new questions (0.048 -> 0.114 s; 8 questions at once
    # 0.33 -> 2.41 s), so it is opt-in. The RINGSERVE_STEP_CHANNEL variable sets the default
    step_channel: str = field(default_factory=lambda: os.environ.get("RINGSERVE_STEP_CHANNEL",
                                                                     "tasks"))
    max_recoveries: int = 2                 # worker faults one request may survive
    # async scheduling (the tasks channel, no TP): while a step runs, the next one is
    # planned and sent when it can be planned without the tokens being sampled (every running
    # request decoding, nothing waiting; docs/architecture.md): the actor then starts it as soon
    # as the step before ends, and the engine's own work and the channel's round trip are off
    # the GPU's path. A request that stops has one wasted row in the step after. Off here;
    # LLM turns it on with CUDA at world size 1 (llm.default_async_scheduling)
    async_scheduling: bool = False
    # with async scheduling at world size 1 (no TP), steps go to the worker as `launch` (queue
    # the step's device work, return at once) and `finish` (its results), the next step
    # launched before the last one's results are asked for: its kernels are queued behind the
    # step in flight while the actor's round trips run (ModelShardWorker.launch). False: one
    # `execute` a step (the device idles for the round trip between steps)
    pipeline_steps: bool = True
    # pipelined steps (above) in flight at once: the engine plans and launches up to this many
    # before it reads the oldest one's results. 1: the next step is queued behind the one
    # running, and the device idles whenever the round trip (results back, update, plan, the
    # launch's way to the actor and its host work) outlasts a step; 2: a step more of slack.
    # A request that stops has up to this many wasted rows after its last token. Session 21
    # (one H200, DeepSeek-V2-Lite, bench_e2e, one machine): 8K 2.74 ms a token with 1 against
    # 2.80 with 2, 32K 2.78 against 2.82: the round trip did not hold the device up there, so
    # the default stays 1
    pipeline_depth: int = 1
    # pipelined steps through Ray actors: one task a step, `advance` (launch this step, return
    # the oldest launched step's results), instead of `launch` now and that step's own `finish`
    # later (two tasks a step). A step with no later step to carry its results (the last
    # before a prompt's step, a pause) still asks with `finish`. In-process groups call the
    # worker directly either way. The RINGSERVE_PIPELINE_ONE_CALL variable (0 / 1) sets the
    # default (on)
    pipeline_one_call: bool = field(default_factory=lambda: os.environ.get(
        "RINGSERVE_PIPELINE_ONE_CALL", "1") != "0")
    progress_min_tokens: int = 0            # kept for compatibility: progress is per chunk now
    schedule: Optional[str] = None          # deprecated name of `layout`
    extend_chunk: Optional[int] = None      # deprecated name of `passq_max_tokens`
    decode_steps: Optional[int] = None      # deprecated: every step decodes one token per seq

    def __post_init__(self):
        if self.schedule is not None:
            warnings.warn("EngineConfig(schedule=...) is deprecated: say layout=...",
                          DeprecationWarning, stacklevel=3)
            self.layout, self.schedule = self.schedule, None
        if self.extend_chunk is not None:
            warnings.warn("EngineConfig(extend_chunk=...) is deprecated: say "
                          "passq_max_tokens=...", DeprecationWarning, stacklevel=3)
            if self.extend_chunk < 1:
                raise ValueError(f"extend_chunk ({self.extend_chunk}) must be >= 1")
            self.passq_max_tokens, self.extend_chunk = self.extend_chunk, None
        if self.decode_steps is not None:
            if self.decode_steps < 1:
                raise ValueError(f"decode_steps ({self.decode_steps}) must be >= 1")
            if self.decode_steps != 1:
                warnings.warn("decode_steps is deprecated and ignored: the engine decodes one "
                              "token of every running request per step", DeprecationWarning,
                              stacklevel=3)
            self.decode_steps = None
        layouts.check_layout(self.layout)
        if self.prefill_cost not in ("tokens", "flops"):
            raise ValueError(f"prefill_cost must be 'tokens' or 'flops', got "
                             f"{self.prefill_cost!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "passq_max_tokens",
                     "solo_budget_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        if self.max_recoveries < 0:
            raise ValueError(f"max_recoveries ({self.max_recoveries}) must be >= 0")
        if isinstance(self.interleave_decode_steps, bool) or not isinstance(
                self.interleave_decode_steps, int) or self.interleave_decode_steps < 0:
            raise ValueError(f"interleave_decode_steps ({self.interleave_decode_steps!r}) must "
                             f"be an integer >= 0")
        if not isinstance(self.pipeline_steps, bool):
            raise ValueError(f"pipeline_steps ({self.pipeline_steps!r}) must be True or False")
        if isinstance(self.pipeline_depth, bool) or not isinstance(self.pipeline_depth, int) \
                or not 1 <= self.pipeline_depth <= 4:
            raise ValueError(f"pipeline_depth ({self.pipeline_depth!r}) must be an integer in "
                             f"1..4")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling ({self.async_scheduling!r}) must be True or "
                             f"False")
        if self.progress_min_tokens < 0:
            raise ValueError(f"progress_min_tokens ({self.progress_min_tokens}) must be >= 0")
        if self.document_cache_tokens is not None and self.document_cache_tokens < 0:
            raise ValueError(f"document_cache_tokens ({self.document_cache_tokens}) must be >= 0")
        if self.step_channel not in ("compiled", "tasks"):
            raise ValueError(f"step_channel must be 'compiled' or 'tasks', got "
                             f"{self.step_channel!r}")
        if self.async_scheduling and self.step_channel != "tasks":
            raise ValueError(f"async_scheduling needs the 'tasks' step channel (got "
                             f"{self.step_channel!r})")
        if self.step_timeout_s is not None and not self.step_timeout_s > 0:
            raise ValueError(f"step_timeout_s ({self.step_timeout_s}) must be > 0 or None")
        if self.attn_equiv_tokens is not None and not (
                isinstance(self.attn_equiv_tokens, (int, float))
                and math.isfinite(self.attn_equiv_tokens) and self.attn_equiv_tokens > 0):
            raise ValueError(f"attn_equiv_tokens ({self.attn_equiv_tokens!r}) must be a finite "
                             f"number > 0 or None")

    def scheduler_config(self, attn_equiv_tokens: Optional[float] = None,
                         long_after: Optional[int] = None) -> SchedulerConfig:
        return SchedulerConfig(self.layout, self.max_num_seqs, self.max_num_batched_tokens,
                               self.passq_max_tokens, self.cascade, bool(self.cuda_graphs),
                               attn_equiv_tokens if self.prefill_cost == "flops" else None,
                               self.solo_budget_factor, long_after,
                               interleave_decode_steps=self.interleave_decode_steps)


class _NullDecoder:
    """Text decoder for models without a tokenizer (benchmarks): no text."""

    def push(self, token_id):
        return ""

    def flush(self):
        return ""


class RequestHandle:
    """A queued request: `result()` waits for its output, `cancel()` stops it at the next step."""

    def __init__(self, kind: str, args: tuple, on_delta: Optional[Callable] = None,
                 timeout_s: Optional[float] = None):
        self.kind, self.args, self.on_delta = kind, args, on_delta
        self.future: Future = Future()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.deadline = None if timeout_s is None else self.submitted + timeout_s
        self.started: Optional[float] = None
        self._progress: Dict[str, Any] = {"state": "queued"}  # replaced whole by the engine

    def progress(self) -> Dict[str, Any]:
        """Where the request is, from any thread: {"state": "queued" | "running" | "done" |
        "failed", and while running "phase": "prefill" (prompt tokens computed) or "decode"
        (tokens generated), "done", "total", "unit" ("tokens"), "elapsed_s"}. Best effort,
        never raises."""
        p = dict(self._progress)
        if self.started is not None and p["state"] == "running":
            p["elapsed_s"] = round(time.perf_counter() - self.started, 3)
        return p

    def cancel(self) -> None:
        self.cancelled.set()

    def result(self, timeout: Optional[float] = None):
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()


class Engine:
    def __init__(self, group, tokenizer=None, eos_token_ids: Sequence[int] = (),
                 config: Optional[EngineConfig] = None):
        self.group = group
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.config = config or EngineConfig()
        self.world_size = group.world_size
        self._inbox: "queue.Queue[Optional[RequestHandle]]" = queue.Queue()
        self._lock = threading.Lock()
        self._counters = {"requests_total": 0, "requests_failed": 0, "requests_cancelled": 0,
                          "generated_tokens": 0, "prefill_tokens": 0, "cached_prompt_tokens": 0,
                          "worker_failures": 0, "preemptions": 0, "recovered_requests": 0,
                          "graph_capture_failures": 0, "steps": 0, "steps_planned_ahead": 0}
        self._last_timings: Dict[str, float] = {}
        self._last_failure: Optional[str] = None   # the last failed step's cause (stats)
        self._times = {"schedule_s": 0.0, "execute_s": 0.0, "update_s": 0.0}
        # the last steps' (execute seconds, one-token rows, prompt tokens in chunks, the
        # longest cached prefix a chunk saw, schedule and update seconds, and the wall-clock
        # times the step was sent and its results read): what a step's time goes with
        # (benchmarks)
        self._step_log: "collections.deque[Tuple[float, ...]]" = \
            collections.deque(maxlen=STEP_LOG)
        self._wall_offset = time.time() - time.perf_counter()   # perf_counter -> time.time
        self._running = True
        # the step channel: a compiled graph where the group offers one (Ray actor groups of
        # model workers)
        self._compiled_steps = (self.config.step_channel == "compiled"
                                and getattr(group, "has_step_channel", False))
        check_async_scheduling(self.config, getattr(group, "tp_size", 1))
        self._async = self.config.async_scheduling
        self._pipeline = (self._async and self.config.pipeline_steps
                          and group.world_size == 1 and getattr(group, "tp_size", 1) == 1)
        self._read_info()
        budget = self.config.document_cache_tokens
        self.doc_cache = DocumentCache(self.capacity_tokens if budget is None else budget)
        info = self._infos[0]
        equiv = self.config.attn_equiv_tokens or (
            info["flops_per_token"] / info["attn_flops_per_key"]
            if info.get("attn_flops_per_key") else None)
        self.sched = Scheduler(self.config.scheduler_config(equiv, info.get("long_after")),
                               self.kv, self.doc_cache, self.world_size)
        self.sched.on_preempt = self._on_preempt
        # pipelined steps sent to Ray actors whose results no call has asked for yet, oldest
        # first (`_send_pipelined`)
        self._unasked: "collections.deque" = collections.deque()
        self._thread = threading.Thread(target=self._loop, name="ringserve-engine", daemon=True)
        self._thread.start()

    # ---- information ----

    def _read_info(self) -> None:
        infos = self.group.call("kv_info")
        self._infos = infos
        self.page_size = infos[0]["page_size"]
        self.rank_pages = [i["num_pages"] for i in infos]
        reserved = infos[0].get("reserved_pages", 0)
        self.kv = KVManager(self.rank_pages, self.page_size, reserved)

    @property
    def capacity_tokens(self) -> int:
        return self.kv.capacity_tokens

    def recent_steps(self, n: int = STEP_LOG) -> List[Dict[str, Any]]:
        """The last n executed steps, oldest first: {"execute_s" (the group's call, driver
        side), "decode_rows", "prompt_tokens" (in chunks), "max_prefix" (the longest cached
        prefix a chunk attended to), "schedule_s" and "update_s" (the engine thread's own
        work before and after the call), "sent" and "read" (time.time() when the step went
        to the group and when its results were back) and "signature" (`plan.step_signature`
        of rank 0's plan: against the workers' `call_stamps`, where a step's round trip
        goes)}. From any thread."""
        with self._lock:
            rows = list(self._step_log)[-n:] if n > 0 else []
        return [{"execute_s": a, "decode_rows": b, "prompt_tokens": c, "max_prefix": d,
                 "schedule_s": e, "update_s": f, "sent": g, "read": h, "signature": sig}
                for a, b, c, d, e, f, g, h, sig in rows]

    def stats(self) -> Dict[str, Any]:
        """Counters and KV usage, from any thread (a snapshot; the engine thread moves on)."""
        entries = self.doc_cache.entries()
        free = sum(self.kv.free_pages()) * self.page_size
        with self._lock:
            out = dict(self._counters)
            out.update({
                "queue_depth": self._inbox.qsize() + len(self.sched.waiting),
                "running": len(self.sched.running), "world_size": self.world_size,
                "layout": self.config.layout, "schedule": self.config.layout,
                "page_size": self.page_size, "max_num_seqs": self.config.max_num_seqs,
                "max_num_batched_tokens": self.config.max_num_batched_tokens,
                "capacity_tokens": self.capacity_tokens, "kv_tokens_free": free,
                "kv_tokens_used": self.capacity_tokens - free,
                "cached_documents": len(entries),
                "pinned_documents": sum(e.pinned for e in entries),
                "cached_tokens": sum(e.num_tokens for e in entries),
                "document_cache_budget_tokens": self.doc_cache.budget_tokens,
                "last_timings": dict(self._last_timings),
                "last_worker_failure": self._last_failure,
                "step_channel": ("compiled" if self._compiled_steps
                                 else getattr(self.group, "step_channel", "tasks")),
                "engine_time_s": {k: round(v, 3) for k, v in self._times.items()}})
        return out

    # ---- submission (any thread) ----

    def submit(self, kind: str, *args, on_delta: Optional[Callable] = None,
               timeout_s: Optional[float] = None) -> RequestHandle:
        if not self._running:
            raise RingServeError("the engine is shut down")
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}")
        h = RequestHandle(kind, args, on_delta, timeout_s)
        self._inbox.put(h)
        return h

    def shutdown(self, timeout_s: float = 30.0) -> None:
        if not self._running:
            return
        self._running = False
        self._inbox.put(None)
        self._thread.join(timeout_s)
        err = RingServeError("the engine was shut down")
        for req in list(self.sched.running) + list(self.sched.waiting):
            self._fail(req, err, count=False)
        while True:  # whatever was still queued fails instead of hanging its caller
            try:
                h = self._inbox.get_nowait()
            except queue.Empty:
                break
            if h is not None and not h.future.done():
                h.future.set_exception(err)

    # ---- the engine thread ----

    def _loop(self) -> None:
        try:
            (self._async_loop if self._async else self._sync_loop)()
        except BaseException as e:  # noqa: BLE001 - a bug here must not hang every caller
            err = RingServeError(f"engine loop failed: {type(e).__name__}: {e}")
            for req in list(self.sched.running) + list(self.sched.waiting):
                self._fail(req, err)
            self._running = False
            raise

    def _sync_loop(self) -> None:
        while True:
            if not self._take_inbox(block=not self.sched.has_work()):
                return
            self._expire()
            if not self.sched.has_work():
                continue
            t0 = time.perf_counter()
            step = self._plan(t0)
            if step is None:
                continue
            t1 = time.perf_counter()
            try:
                results = self._execute(step)
            except _StepFailed as e:
                self._recover(e.cause)
                continue
            self._finish_step(step, results, t0, t1)

    def _plan(self, t0: float) -> Optional[Step]:
        """The next step, or None when nothing could be scheduled (then handled)."""
        step = self.sched.schedule(t0)
        self._attach_contexts(step)
        self._finish_without_compute(step)
        if not step.works:
            self._stalled()
            return None
        return step

    def _finish_step(self, step: Step, results: list, t0: float, t1: float) -> bool:
        """Update the requests with a step's results and log its times; False when the
        update failed (the group was rebuilt)."""
        t2 = time.perf_counter()
        try:
            self._update(step, results)
        except Exception as e:  # noqa: BLE001 - a result the update can not use
            # (a worker answered garbage): the step's effects are unknown, so treat it as a
            # failed step, as for a dead worker
            self._recover(e)
            return False
        t3 = time.perf_counter()
        chunks = [w for w in step.works if w.n > 1 or w.kind == "ring"]
        with self._lock:   # where the engine thread's time goes (stats)
            self._times["schedule_s"] += t1 - t0
            self._times["execute_s"] += t2 - t1
            self._times["update_s"] += t3 - t2
            self._step_log.append((
                t2 - t1, len(step.works) - len(chunks), sum(w.n for w in chunks),
                max((w.start for w in chunks), default=0), t1 - t0, t3 - t2,
                t1 + self._wall_offset, t2 + self._wall_offset,
                step_signature(step.plans[0]) if step.plans else None))
        return True

    # ---- async scheduling ----

    def _async_loop(self) -> None:
        """As `_sync_loop`, with steps in flight while the next is planned and sent (when
        `_can_plan_ahead`): up to `_depth` of them (pipelined steps; else one). The sampled
        tokens of the steps in flight are placeholders in the requests' outputs, which their
        results then replace, oldest first."""
        flights: "collections.deque" = collections.deque()   # (step, collect, t0, t1), oldest
        # first: the steps sent and not yet read
        while True:
            if not self._take_inbox(block=not flights and not self.sched.has_work()):
                return
            self._expire()
            if flights and (not self._can_plan_ahead() or not self.sched.has_work()):
                if not self._land(flights.popleft()):
                    flights.clear()       # recovered: the later steps went with the old actors
                continue
            if not self.sched.has_work():
                continue
            t0 = time.perf_counter()
            step = self._plan_ahead(t0) if flights else self._plan(t0)
            if step is None:
                if flights and not self._land(flights.popleft()):
                    flights.clear()
                continue
            for p in step.plans:          # the workers keep (and share) the sampled tokens
                p.track_tokens = True
            t1 = time.perf_counter()
            try:
                collect = self._send(step)
            except _StepFailed as e:
                self._recover(e.cause)    # the steps in flight went with the old actors too
                flights.clear()
                continue
            for w in step.works:          # its tokens: placeholders until its results come
                if w.sample:
                    w.req.out_tokens.append(PENDING_TOKEN)
                    w.req.pending += 1
            flights.append((step, collect, t0, t1))
            if len(flights) > self._depth and not self._land(flights.popleft()):
                flights.clear()           # recovered: the steps sent after it are void too

    @property
    def _depth(self) -> int:
        """Steps sent and not yet read, at most, in the async loop: pipeline_depth with
        pipelined steps, else one (the next planned while one runs). Read each step (a
        benchmark may switch `_pipeline` between requests)."""
        return self.config.pipeline_depth if self._pipeline else 1

    def _plan_ahead(self, t0: float) -> Optional[Step]:
        step = self.sched.schedule(t0)
        if not step.works:
            return None
        with self._lock:
            self._counters["steps_planned_ahead"] += 1
        return step

    def _can_plan_ahead(self) -> bool:
        """Whether the next step can be planned while one is in flight: every running
        request decodes (no prompt work, nothing waiting or arriving: those steps run after
        the one in flight is read), none needs its output tokens in the plan (penalties,
        min_tokens, grammars) or may switch longrope's factors, and pages are free for every
        row without preempting anyone."""
        if self._inbox.qsize() or self.sched.waiting or not self.sched.running:
            return False
        if self.sched.cfg.long_after is not None:
            return False
        for r in self.sched.running:
            if (r.kind != "generate" or not r.decoding or not 1 <= r.pending <= self._depth
                    or r.params.needs_context or r.followers):
                return False
        # a row may need a fresh page and a copy-on-write one (on its owner: any rank)
        need = 2 * len(self.sched.running)
        return all(f >= need for f in self.kv.free_pages())

    def _send(self, step: Step) -> Callable[[], list]:
        """Send a step to the group; returns what waits for its results. Groups without
        `submit_per_rank` (in-process test groups) run it here, at once."""
        kw = {} if self.config.step_timeout_s is None else {
            "timeout_s": self.config.step_timeout_s}
        submit = getattr(self.group, "submit_per_rank", None)
        try:
            if self._pipeline:     # launch now, ask for the results when they are read
                if submit is None:
                    self.group.call_per_rank("launch", [(p,) for p in step.plans], **kw)
                    return lambda: self.group.call_per_rank(
                        "finish", [()] * len(step.plans), **kw)
                return self._send_pipelined(step, submit, kw)
            if submit is None:
                results = self.group.call_per_rank("execute", [(p,) for p in step.plans], **kw)
                return lambda: results
            refs = submit("execute", [(p,) for p in step.plans])
        except Exception as e:  # noqa: BLE001 - any failure there leaves the ranks unknown
            raise _StepFailed(e) from e
        return lambda: self.group.collect(refs, **kw)

    def _send_pipelined(self, step: Step, submit, kw) -> Callable[[], list]:
        """A pipelined step to Ray actors (`_send`): with `pipeline_one_call`, the oldest step
        sent whose results were not asked for yet gets them from this step's `advance` call
        (the workers launch this step, then return that one's results: tasks to one actor run
        in the order sent, and both sides keep their steps oldest first), else this step is
        launched alone. Its own results come from a later step's `advance`, or, when it is read
        before one is sent, from its own `finish`."""
        args = [(p,) for p in step.plans]
        if self.config.pipeline_one_call and self._unasked:
            self._unasked.popleft()["refs"] = submit("advance", args)
        else:
            submit("launch", args)
        slot = {"refs": None}
        if self.config.pipeline_one_call:
            self._unasked.append(slot)
        nranks = len(step.plans)

        def collect() -> list:
            if slot["refs"] is None:     # read before a later step asked: its own finish
                if self._unasked and self._unasked[0] is slot:
                    self._unasked.popleft()
                elif any(x is slot for x in self._unasked):   # a `finish` would pop another
                    raise RuntimeError("pipelined steps read out of order (engine bug)")
                slot["refs"] = submit("finish", [()] * nranks)
            return self.group.collect(slot["refs"], **kw)
        return collect

    def _land(self, flight) -> bool:
        """Read a step in flight and update its requests; False when it failed (the group
        was rebuilt, every running request requeued)."""
        step, collect, t0, t1 = flight
        try:
            results = collect()
        except Exception as e:  # noqa: BLE001 - any failure there leaves the ranks unknown
            self._recover(e)
            return False
        return self._finish_step(step, results, t0, t1)

    def _take_inbox(self, block: bool) -> bool:
        """Move submitted requests into the scheduler; False once shut down."""
        while True:
            try:
                h = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return self._running
            if h is None:
                return False
            block = False
            if not h.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._counters["requests_total"] += 1
            try:
                if h.kind == "drop_document":
                    h.future.set_result(self._drop_document(*h.args))
                    continue
                req = self._admit_new(h)
            except BaseException as e:  # noqa: BLE001 - the caller gets every error
                with self._lock:
                    self._counters["requests_cancelled" if isinstance(
                        e, RequestCancelledError) else "requests_failed"] += 1
                h._progress = {"state": "failed"}
                h.future.set_exception(e)
                continue
            if req is not None:
                self.sched.add(req)

    def _admit_new(self, h: RequestHandle) -> Optional[Request]:
        """Validate a request before any work: ids, emptiness, capacity."""
        if h.cancelled.is_set():
            raise RequestCancelledError("cancelled before it started")
        self._check_deadline(h)
        raw = h.args[0]
        # a list of exact ints is taken as it is (a million-token prompt: no Python per token)
        ids = list(raw) if type(raw) is list and exact_ints(raw) else [int(t) for t in raw]
        params = None
        what = {"generate": "the prompt", "score": "the text to score",
                "cache_document": "the document"}[h.kind]
        if not ids:
            raise InvalidRequestError(f"{what} is empty (0 tokens)")
        arr = self._check_ids(ids)
        if h.kind == "generate":
            params = h.args[1].with_seed()
            self._check_sampling(params)
        if h.kind == "cache_document":
            if len(ids) > self.doc_cache.budget_tokens:
                raise CapacityError(len(ids), self.doc_cache.budget_tokens,
                                    f"document of {len(ids)} tokens vs. the document cache "
                                    "budget (document_cache_tokens)")
            key = doc_key(torch.from_numpy(arr.astype(np.int32)))
            e = self.doc_cache.get(key)
            if e is not None:       # already cached: pin it, no work
                e.pinned = True
                self.doc_cache.touch(e)
                h._progress = {"state": "done"}
                h.future.set_result(e.key)
                return None
        req = Request(self.sched.next_order(), h.kind, ids, params, h)
        req._prompt_np = arr
        if h.kind == "cache_document":
            req.doc_key = key
        entry, m = self.sched.match(req)
        self.sched.check_static(req, entry, m)
        if h.kind == "generate":
            if self.tokenizer is not None:
                from .tokenizer import IncrementalDecoder
                decoder = IncrementalDecoder(self.tokenizer, prompt_ids=ids[-8:])
            else:
                decoder = _NullDecoder()
            req.stop = StopState(params, decoder, self.eos_token_ids)
        if h.kind == "score":
            req.score_lps = [None] * len(ids)
        if h.kind == "generate":
            lead = self._same_prompt(ids)
            if lead is not None and not lead.out_tokens:
                lead.followers.append(req)   # wait for its prompt's KV, then fork it (n > 1)
                return None
            if lead is not None:             # computed already: fork it from the cache
                self._cache_prompt(lead)
        return req

    def _check_sampling(self, params: SamplingParams) -> None:
        vocab = self._infos[0]["vocab_size"]
        bad = [t for t in (params.logit_bias or {}) if t >= vocab]
        if bad:
            raise InvalidRequestError(f"logit_bias token id {bad[0]} is outside the vocabulary "
                                      f"[0, {vocab})")
        if params.grammar is not None and self.tokenizer is None:
            raise InvalidRequestError("structured output needs the model's tokenizer")

    def _same_prompt(self, ids: List[int]) -> Optional[Request]:
        """A queued or running generate request with this prompt (one still prefilling it
        first), e.g. another of n samples."""
        found = None
        for r in list(self.sched.running) + list(self.sched.waiting):
            if r.kind == "generate" and len(r.prompt) == len(ids) and r.prompt == ids:
                if not r.out_tokens:
                    return r
                found = found or r
        return found

    def _cache_prompt(self, req: Request) -> None:
        """Keep req's computed prompt in the document cache (unpinned), for requests with the
        same prompt to fork."""
        if req.seq is None or len(req.seq) < len(req.prompt) or len(req.prompt) < 2:
            return
        key = doc_key(req.prompt_tensor())
        if self.doc_cache.get(key) is not None:
            return
        e = _cached_entry(key, self.kv.fork(req.seq, len(req.prompt)))
        for g in self.doc_cache.add(e):
            self.kv.free(g.kv)
        self._fit_budget(e)

    def _release_followers(self, req: Request) -> None:
        """req's prompt is computed (or req is over): the requests waiting to share its prompt
        go to the head of the queue, where they fork the prompt's KV from the document cache."""
        fs, req.followers = req.followers, []
        if not fs:
            return
        if not self._running:
            for f in fs:
                self._fail(f, RingServeError("the engine was shut down"), count=False)
            return
        self._cache_prompt(req)
        self.sched.requeue(fs)

    def _attach_contexts(self, step: Step) -> None:
        """Rows whose sampling needs the request's output so far (penalties, min_tokens,
        grammar) get it with the step (the worker keeps no per-request state it relies on)."""
        for i, w in enumerate(step.works):
            params = w.req.params
            if not w.sample or params is None or not params.needs_context:
                continue
            s = step.plans[w.sample_rank].seqs[i]
            distinct = None
            if params.repetition_penalty != 1.0:
                distinct = getattr(w.req, "_distinct_prompt", None)
                if distinct is None:
                    distinct = w.req._distinct_prompt = torch.unique(
                        w.req.prompt_tensor()).tolist()
            s.sample = (s.sample[0], s.sample[1], SampleContext(
                w.req.order, list(w.req.out_tokens), distinct, self.eos_token_ids))

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        """The ids as an int64 array, each checked to be in the vocabulary: a token id past
        the embedding table would fail inside the workers, and a worker failure rebuilds the
        whole group: refuse it here, as the caller's mistake."""
        vocab = self._infos[0]["vocab_size"]
        try:
            a = np.array(ids, dtype=np.int64)
        except OverflowError:
            bad = next(t for t in ids if not -2 ** 63 <= t < 2 ** 63)
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary [0, {vocab})") from None
        out = (a < 0) | (a >= vocab)
        if out.any():
            bad = int(a[out][0])
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return a

    @staticmethod
    def _check_deadline(h: RequestHandle) -> None:
        if h.deadline is not None and time.perf_counter() > h.deadline:
            raise RequestTimeoutError(f"request timed out after "
                                      f"{time.perf_counter() - h.submitted:.1f} s")

    def _expire(self) -> None:
        """Cancelled and timed-out requests leave before the step; their KV is freed."""
        for req in list(self.sched.running) + list(self.sched.waiting):
            for f in list(req.followers):   # waiting to share req's prompt: no KV yet
                try:
                    if f.handle.cancelled.is_set():
                        raise RequestCancelledError("cancelled before it started")
                    self._check_deadline(f.handle)
                except (RequestCancelledError, RequestTimeoutError) as e:
                    req.followers.remove(f)
                    self._fail(f, e, cancelled=isinstance(e, RequestCancelledError))
            h = req.handle
            if h.cancelled.is_set():
                if req.kind == "generate" and len(req.out_tokens) > req.pending:
                    self._finish(req, "cancelled")
                else:
                    self._fail(req, RequestCancelledError("cancelled before it finished"),
                               cancelled=True)
                continue
            try:
                self._check_deadline(h)
            except RequestTimeoutError as e:
                self._fail(req, e)

    def _stalled(self) -> None:
        """Nothing could be scheduled: the queue head waits for pages that only pinned
        documents hold (nothing runs to free them). It can not fit now: tell it."""
        if self.sched.running or not self.sched.waiting:
            time.sleep(0.001)
            return
        req = self.sched.waiting[0]
        try:
            entry, m = self.sched.match(req)
            self.sched.check_static(req, entry, m)
            raise CapacityError(len(req.tokens), sum(self.kv.free_pages()) * self.page_size,
                                "no free KV pages for it, and nothing else is running")
        except CapacityError as e:
            self._fail(req, e)

    def _finish_without_compute(self, step: Step) -> None:
        """A document already cached as a prefix of a longer sequence: forked, no compute.
        (A document whose last chunk is in this step has remaining == 0 too, since the
        scheduler counts a chunk as computed when it plans it: that one completes in
        `_update`, once its K/V exist, not before the step runs.)"""
        busy = {id(w.req) for w in step.works}
        for req in list(self.sched.running):
            if (req.kind == "cache_document" and req.remaining == 0
                    and id(req) not in busy):
                self._complete(req)

    # ---- executing a step ----

    def _execute(self, step: Step) -> list:
        kw = {} if self.config.step_timeout_s is None else {
            "timeout_s": self.config.step_timeout_s}
        try:
            if self._compiled_steps:
                return self.group.execute_step(step.plans, **kw)
            return self.group.call_per_rank("execute", [(p,) for p in step.plans], **kw)
        except Exception as e:  # noqa: BLE001 - any failure there leaves the ranks unknown
            raise _StepFailed(e) from e

    def _update(self, step: Step, results: list) -> None:
        with self._lock:
            self._counters["steps"] += 1
        now = time.perf_counter()
        for i, w in enumerate(step.works):
            req = w.req
            if req not in self.sched.running:
                continue
            self._count("prefill_tokens", max(0, min(w.start + w.n, len(req.prompt)) - w.start))
            if req.kind == "score":
                for r in range(self.world_size):
                    lps = results[r][i]
                    if lps is None:
                        continue
                    rows = (range(w.n) if w.kind == "q"
                            else np.flatnonzero(np.asarray(w.owners) == r).tolist())
                    for j, lp in zip(rows, lps):
                        p = w.start + j
                        if p + 1 < len(req.prompt):
                            req.score_lps[p + 1] = float(lp)
            if req.handle.started is None:
                req.handle.started = now
            if not w.sample:
                if req.remaining == 0:      # straight to done: never "running" with all done
                    self._complete(req)
                else:
                    req.handle._progress = {"state": "running", "phase": "prefill",
                                            "done": req.computed, "total": len(req.prompt),
                                            "unit": "tokens"}
                continue
            got = results[w.sample_rank][i]
            self._on_token(req, int(got[0]), float(got[1]), now,
                           got[2] if len(got) > 2 else None)

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self._counters[name] += n

    def _on_token(self, req: Request, tok: int, lp: float, now: float, top=None) -> None:
        if req.first_token_at is None:
            req.first_token_at = now
        else:
            req.itl.append(now - req.last_token_at)
        req.last_token_at = now
        n = req.resolve(tok)
        req.out_logprobs.append(lp)
        if req.params.top_logprobs:
            req.out_top.append([(int(t), float(v)) for t, v in top or ()])
        if req.followers:
            self._release_followers(req)
        self._count("generated_tokens", 1)
        req.handle._progress = {"state": "running", "phase": "decode", "done": n,
                                "total": req.params.max_tokens, "unit": "tokens"}
        delta = req.stop.update(tok, n)
        if req.handle.on_delta is not None:
            try:
                req.handle.on_delta(StreamDelta(
                    tok, delta, lp if req.params.logprobs else None,
                    req.out_top[-1] if req.params.top_logprobs else None))
            except Exception:  # noqa: BLE001 - a broken consumer cancels only its request
                req.handle.cancel()
        if req.stop.finish_reason:
            self._finish(req, req.stop.finish_reason)

    # ---- ending requests ----

    def _finish(self, req: Request, reason: str) -> None:
        """A generate request is over: its output, its KV kept in the document cache."""
        req.drop_pending()       # async scheduling: a token of the step in flight is dropped
        end = time.perf_counter()
        h = req.handle
        t_first = req.first_token_at or end
        admitted = req.first_admitted or end
        n_dec = max(0, len(req.out_tokens) - 1)
        timings = {"queue_s": admitted - h.submitted, "prefill_s": t_first - admitted,
                   "ttft_s": t_first - h.submitted, "decode_s": end - t_first,
                   "decode_tokens_per_s": n_dec / (end - t_first) if n_dec else 0.0,
                   "prefill_tokens_per_s": (len(req.prompt) - req.num_cached_tokens)
                   / max(t_first - admitted, 1e-9),
                   "preemptions": req.preemptions, "recoveries": req.recoveries}
        if req.itl:     # inter-token latency: the steady rate apart from one slow step
            itl = sorted(req.itl)
            timings.update(itl_median_s=itl[len(itl) // 2],
                           itl_p90_s=itl[min(len(itl) - 1, (9 * len(itl)) // 10)],
                           itl_max_s=itl[-1])
        out = RequestOutput(list(req.prompt), list(req.out_tokens), req.stop.text, reason,
                            list(req.out_logprobs) if req.params.logprobs else None,
                            req.num_cached_tokens, timings,
                            list(req.out_top) if req.params.top_logprobs else None)
        with self._lock:
            self._last_timings = {k: v for k, v in timings.items() if isinstance(v, float)}
            if reason == "cancelled":
                self._counters["requests_cancelled"] += 1
            self._counters["cached_prompt_tokens"] += req.num_cached_tokens
        self._leave(req, keep=True)
        h._progress = {"state": "done"}
        h.future.set_result(out)

    def _complete(self, req: Request) -> None:
        """A score or cache_document request has computed its whole prompt."""
        h = req.handle
        if req.kind == "score":
            self._leave(req, keep=False)
            result = ScoreOutput(list(req.prompt), req.score_lps)
        else:
            with self._lock:
                self._counters["cached_prompt_tokens"] += req.num_cached_tokens
            e = self._leave(req, keep=True, pinned=True)
            result = e.key if e is not None else doc_key(req.prompt_tensor())
        h._progress = {"state": "done"}
        h.future.set_result(result)

    def _fail(self, req: Request, err: BaseException, cancelled: bool = False,
              count: bool = True) -> None:
        self._leave(req, keep=False)
        if count:
            with self._lock:
                self._counters["requests_cancelled" if cancelled else "requests_failed"] += 1
        req.handle._progress = {"state": "failed"}
        if not req.handle.future.done():
            req.handle.future.set_exception(err)

    def _leave(self, req: Request, keep: bool, pinned: bool = False) -> Optional[CachedSeq]:
        """Take the request out of the scheduler; keep its KV as a cached sequence (within the
        document-cache budget) or free it."""
        seq = self.sched.detach(req)
        if req.followers:
            self._release_followers(req)
        if seq is None:
            return None
        n = len(seq)
        if not keep or n == 0 or n > self.doc_cache.budget_tokens:
            self.kv.free(seq)
            return None
        e = _cached_entry(None, seq, pinned)
        for g in self.doc_cache.add(e):
            self.kv.free(g.kv)
        return e if self._fit_budget(e) else None

    def _cached_tokens(self) -> int:
        """What the document cache holds, in tokens of pages: pages shared between entries (a
        document and the questions forked from it) are counted once."""
        entries = [x.kv for x in self.doc_cache.entries()]
        return sum(self.kv.pages_of(entries)) * self.page_size

    def _fit_budget(self, e: CachedSeq) -> bool:
        """Keep the cache within document_cache_tokens after adding e: evict unpinned entries
        (LRU first); a pinned document is evicted only to make room for another pinned one
        (cache_document); an unpinned e that still does not fit is dropped itself. False when
        e was dropped."""
        budget = self.doc_cache.budget_tokens
        for g in self.doc_cache.eviction_order(keep=(e.key,)):
            if self._cached_tokens() <= budget:
                break
            if g.pinned and not e.pinned:
                break
            self.doc_cache.remove(g.key)
            self.kv.free(g.kv)
        if self._cached_tokens() > budget and not e.pinned:
            self.doc_cache.remove(e.key)
            self.kv.free(e.kv)
            return False
        return True

    def _drop_document(self, key: str) -> bool:
        """Unpin and free a cached document; one still being prefilled (cache_document in
        flight) is cancelled at once, its pages freed."""
        found = False
        for req in list(self.sched.running) + list(self.sched.waiting):
            if req.kind == "cache_document" and req.doc_key == key:
                self._fail(req, RequestCancelledError("the document was dropped while it was "
                                                      "being prefilled"), cancelled=True)
                found = True
        e = self.doc_cache.remove(key)
        if e is not None:
            self.kv.free(e.kv)
        return found or e is not None

    def _on_preempt(self, req: Request) -> None:
        with self._lock:
            self._counters["preemptions"] += 1
        req.handle._progress = {"state": "queued", "preempted": req.preemptions}

    # ---- faults ----

    def _recover(self, err: BaseException) -> None:
        """A step failed on the group: rebuild it (fresh actors, empty caches) and put every
        in-flight request back in the queue to recompute its KV; the tokens it has streamed
        stay its prefix. A request fails only past its recovery limit or if the rebuild does."""
        self._unasked.clear()     # the steps in flight went with the old actors
        msg = f"{type(err).__name__}: {err}"
        # a remote traceback: its head names the actor, its last lines the cause
        detail = msg if len(msg) <= 2000 else msg[:300] + " ... " + msg[-1700:]
        with self._lock:
            self._counters["worker_failures"] += 1
            self._last_failure = detail
        if self.sched.cfg.graphs and _is_capture_failure(err):
            # a graph that can not be captured would fail the same way at every retry: decode
            # eagerly from now on (every rank: the driver marks no step for graphs)
            self.sched.cfg.graphs = False
            with self._lock:
                self._counters["graph_capture_failures"] += 1
            log.warning("CUDA graph capture failed; decoding eagerly from now on: %s", detail)
        else:
            # recovered, not lost: but an operator must see why
            log.warning("a step failed on the actor group (%d in flight); rebuilding it and "
                        "resuming them: %s", len(self.sched.running), detail)
        inflight = list(self.sched.running)
        self.sched.running.clear()
        for req in inflight:
            req.seq = None
            req.drop_pending()   # async scheduling: tokens of the lost steps are recomputed
        # pinned means pinned: their KV went with the old actors, so they are prefilled again
        # (in the background, ahead of the queue; a question on one waits for it and reuses it)
        repin = [e.token_ids.tolist() for e in self.doc_cache.entries() if e.pinned
                 and not any(r.kind == "cache_document" and r.doc_key == e.key
                             for r in inflight + list(self.sched.waiting))]
        for e in self.doc_cache.entries():
            self.doc_cache.remove(e.key)
        try:
            self.group.rebuild()
            self._read_info()
            self.sched.kv = self.kv
        except Exception as e:  # noqa: BLE001
            self.kv.reset()
            fail = WorkerFailedError(f"a shard actor failed ({detail}) and the group could not "
                                     f"be rebuilt: {type(e).__name__}: {e}"[:2000])
            for req in inflight + list(self.sched.waiting):
                self._fail(req, fail)
            return
        back = []
        for req in inflight:
            req.recoveries += 1
            if req.recoveries > self.config.max_recoveries:
                self._fail(req, WorkerFailedError(
                    f"the actor group failed {req.recoveries} times during this request "
                    f"(max_recoveries={self.config.max_recoveries}); last: {detail}"))
            else:
                req.handle._progress = {"state": "queued", "recovering": req.recoveries}
                back.append(req)
        with self._lock:
            self._counters["recovered_requests"] += len(back)
        self.sched.requeue(back)
        for ids in reversed(repin):
            h = RequestHandle("cache_document", (ids,))
            h.future.set_running_or_notify_cancel()
            req = Request(self.sched.next_order(), "cache_document", ids, None, h)
            req.doc_key = doc_key(req.prompt_tensor())
            self.sched.waiting.appendleft(req)


def _cached_entry(key: Optional[str], seq, pinned: bool = False) -> CachedSeq:
    """A document-cache entry of seq's tokens (keyed by their hash when key is None)."""
    ids = torch.from_numpy(np.array(seq.tokens, dtype=np.int32))
    return CachedSeq(key or doc_key(ids), seq, ids,
                     torch.from_numpy(np.array(seq.owners, dtype=np.int8)), pinned=pinned)


def check_async_scheduling(cfg: EngineConfig, tp_size: int) -> None:
    """Async scheduling shares sampled tokens over the context-parallel ranks only: refused
    with tensor parallelism (LLM checks it before any actor starts, Engine from its group)."""
    if cfg.async_scheduling and tp_size != 1:
        raise ValueError(f"async_scheduling needs tensor_parallel_size 1 (got {tp_size})")


def _is_capture_failure(err: BaseException) -> bool:
    """The step failed capturing a decode graph (the error, or its cause through Ray or the
    actor group's wrapping, is a GraphCaptureError)."""
    seen = 0
    e: Optional[BaseException] = err
    while e is not None and seen < 8:
        if isinstance(e, GraphCaptureError) or "GraphCaptureError" in type(e).__name__:
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return "GraphCaptureError" in str(err)


class _StepFailed(Exception):
    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


__all__ = ["Engine", "EngineConfig", "RequestHandle", "RequestOutput", "StreamDelta",
           "SamplingParams", "ScoreOutput"]
