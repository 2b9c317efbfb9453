"""The driver-side engine: one request at a time over an actor group of `ModelShardWorker`s.

Requests (generate, score, cache/drop a document) enter a thread-safe FIFO queue and run one
after another on the engine's own thread, so one request's KV never mixes with another's and
callers on any thread (the Serve replica's worker threads) just wait on a future.

Per request: match the prompt against the document cache (longest common prefix), check that
the KV tokens it needs can be found (else CapacityError before any work), then either fork the
cached sequence and extend it with the rest of the prompt ("pass-Q") or run a ring prefill, and
decode token by token. Each decode step is one Ray call per rank carrying a token id, its
position and owner; rank 0 answers with the sampled token and its logprob.

The group object needs `world_size`, `call(method, *args)`, `rebuild()` and `shutdown()`
(`ringserve.actors.ActorGroup`); Ray itself is never imported here.
"""
from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .doc_cache import CachedSeq, DocumentCache, doc_key
from .errors import (CapacityError, InvalidRequestError, RequestCancelledError,
                     RequestTimeoutError, RingServeError, WorkerFailedError)
from .parallel import layout
from .sampling import SamplingParams, StopState


@dataclass
class RequestOutput:
    prompt_token_ids: List[int]
    token_ids: List[int]
    text: str
    finish_reason: Optional[str]          # "stop" | "length" | "cancelled"
    logprobs: Optional[List[float]] = None
    num_cached_tokens: int = 0
    timings: Dict[str, float] = field(default_factory=dict)


@dataclass
class StreamDelta:
    token_id: int
    text: str
    logprob: Optional[float] = None


@dataclass
class ScoreOutput:
    token_ids: List[int]
    logprobs: List[Optional[float]]       # logprobs[i] = log p(token i | tokens < i); [0] None


@dataclass
class EngineConfig:
    schedule: str = "striped"
    extend_chunk: int = 256             # tokens per pass-Q extension call
    document_cache_tokens: Optional[int] = None  # None: the group's whole KV capacity
    step_timeout_s: Optional[float] = None       # bound on one Ray call (None: no bound)
    decode_steps: int = 1               # decode steps per Ray call (tokens then come in bursts)
    progress_min_tokens: int = 16384    # prefills at least this long report layer progress

    def __post_init__(self):
        layout.check_schedule(self.schedule)
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps ({self.decode_steps}) must be >= 1")
        if self.progress_min_tokens < 0:
            raise ValueError(f"progress_min_tokens ({self.progress_min_tokens}) must be >= 0")
        if self.extend_chunk < 1:
            raise ValueError(f"extend_chunk ({self.extend_chunk}) must be >= 1")
        if self.document_cache_tokens is not None and self.document_cache_tokens < 0:
            raise ValueError(f"document_cache_tokens ({self.document_cache_tokens}) must be >= 0")


class _NullDecoder:
    """Text decoder for models without a tokenizer (benchmarks): no text."""

    def push(self, token_id):
        return ""

    def flush(self):
        return ""


def balanced_counts(counts: Sequence[int], n: int) -> List[int]:
    """Per-rank token counts after n more tokens, each given to the rank with the fewest
    (lowest rank on ties): the rule `Engine._owner` applies token by token."""
    c = list(counts)
    while n > 0:
        lo = min(c)
        idx = [i for i, x in enumerate(c) if x == lo]
        higher = [x for x in c if x > lo]
        room = (min(higher) - lo) * len(idx) if higher else None
        if room is not None and room <= n:
            for i in idx:
                c[i] += room // len(idx)
            n -= room
            continue
        q, r = divmod(n, len(idx))
        for j, i in enumerate(idx):
            c[i] += q + (1 if j < r else 0)
        break
    return c


def _pages(n: int, page: int) -> int:
    return -(-n // page)


@dataclass
class _Seq:
    """The driver's view of one worker-side sequence."""
    seq_id: str
    tokens: List[int]              # token ids whose K/V are (or will be) in the caches
    owners: List[int]              # rank holding each token's K/V
    counts: List[int]              # tokens per rank

    def add(self, token: int, owner: int) -> None:
        self.tokens.append(token)
        self.owners.append(owner)
        self.counts[owner] += 1

    def truncate(self, n: int) -> None:
        for o in self.owners[n:]:
            self.counts[o] -= 1
        del self.tokens[n:], self.owners[n:]


class RequestHandle:
    """A queued request: `result()` waits for its output, `cancel()` stops it between steps."""

    def __init__(self, kind: str, args: tuple, on_delta: Optional[Callable] = None,
                 timeout_s: Optional[float] = None):
        self.kind, self.args, self.on_delta = kind, args, on_delta
        self.future: Future = Future()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.deadline = None if timeout_s is None else self.submitted + timeout_s
        self.started: Optional[float] = None
        self._progress: Dict[str, Any] = {"state": "queued"}  # replaced whole by the engine
        self._reporter = None  # a prefill's layer reports (ringserve.progress.Reporter)

    def progress(self) -> Dict[str, Any]:
        """Where the request is, from any thread: {"state": "queued" | "running" | "done" |
        "failed", and while running "phase": "prefill" (unit "layers": the ring prefill's layers
        started on rank 0), "extend" (prompt tokens appended to a cached prefix), "decode"
        (tokens generated), "done" and "total", "elapsed_s"}. Best effort, never raises."""
        p = dict(self._progress)
        rep = self._reporter
        if p.get("phase") == "prefill" and rep is not None:
            got = rep.read()
            if got is not None:
                p["done"], p["total"] = got
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
        self._ids = itertools.count()
        self._queue: "queue.Queue[Optional[RequestHandle]]" = queue.Queue()
        self._lock = threading.Lock()
        self._counters = {"requests_total": 0, "requests_failed": 0, "requests_cancelled": 0,
                          "generated_tokens": 0, "prefill_tokens": 0, "cached_prompt_tokens": 0,
                          "worker_failures": 0}
        self._last_timings: Dict[str, float] = {}
        self._running = True
        self._board = None  # ringserve.progress board, made on the first long prefill
        self._read_info()
        budget = self.config.document_cache_tokens
        self.doc_cache = DocumentCache(self.capacity_tokens if budget is None else budget)
        self._thread = threading.Thread(target=self._loop, name="ringserve-engine", daemon=True)
        self._thread.start()

    # ---- information ----

    def _read_info(self) -> None:
        infos = self.group.call("kv_info")
        self._infos = infos
        self.page_size = infos[0]["page_size"]
        self.rank_pages = [i["num_pages"] for i in infos]
        self._free_pages = [i["free_pages"] for i in infos]

    @property
    def capacity_tokens(self) -> int:
        return sum(self.rank_pages) * self.page_size

    def stats(self) -> Dict[str, Any]:
        """Counters and KV usage (as of the end of the last request), from any thread."""
        entries = self.doc_cache.entries()  # a snapshot: the engine thread may be changing it
        with self._lock:
            free = sum(self._free_pages) * self.page_size
            out = dict(self._counters)
            out.update({
                "queue_depth": self._queue.qsize(), "world_size": self.world_size,
                "schedule": self.config.schedule, "page_size": self.page_size,
                "capacity_tokens": self.capacity_tokens, "kv_tokens_free": free,
                "kv_tokens_used": self.capacity_tokens - free,
                "cached_documents": len(entries),
                "pinned_documents": sum(e.pinned for e in entries),
                "cached_tokens": sum(e.num_tokens for e in entries),
                "document_cache_budget_tokens": self.doc_cache.budget_tokens,
                "last_timings": dict(self._last_timings)})
        return out

    # ---- submission (any thread) ----

    def submit(self, kind: str, *args, on_delta: Optional[Callable] = None,
               timeout_s: Optional[float] = None) -> RequestHandle:
        if not self._running:
            raise RingServeError("the engine is shut down")
        if kind not in ("generate", "score", "cache_document", "drop_document"):
            raise ValueError(f"unknown request kind {kind!r}")
        h = RequestHandle(kind, args, on_delta, timeout_s)
        self._queue.put(h)
        return h

    def shutdown(self, timeout_s: float = 30.0) -> None:
        if not self._running:
            return
        self._running = False
        self._queue.put(None)
        self._thread.join(timeout_s)
        board, self._board = self._board, None
        if board is not None and hasattr(board.update, "remote"):
            try:
                import ray
                ray.kill(board)
            except Exception:  # noqa: BLE001 - Ray may be down already
                pass
        while True:  # whatever was still queued fails instead of hanging its caller
            try:
                h = self._queue.get_nowait()
            except queue.Empty:
                break
            if h is not None and not h.future.done():
                h.future.set_exception(RingServeError("the engine was shut down"))

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            h = self._queue.get()
            if h is None:
                return
            if not h.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._counters["requests_total"] += 1
            h.started = time.perf_counter()
            h._progress = {"state": "running", "phase": None}
            try:
                if h.cancelled.is_set():
                    raise RequestCancelledError("cancelled before it started")
                self._check_deadline(h)
                result = getattr(self, "_run_" + h.kind)(h, *h.args)
                error = None
            except BaseException as e:  # noqa: BLE001 - the caller gets every error
                result, error = None, e
                with self._lock:
                    self._counters["requests_failed"] += 1
            if h.kind in ("generate", "cache_document"):  # keep kv_tokens_used current
                try:
                    self._refresh_free()
                except WorkerFailedError:
                    pass
            h._progress = {"state": "done" if error is None else "failed"}
            if h._reporter is not None:
                h._reporter.drop()
                h._reporter = None
            if error is None:
                h.future.set_result(result)
            else:
                h.future.set_exception(error)

    @staticmethod
    def _phase(h: RequestHandle, phase: str, done: int, total: int, unit: str) -> None:
        h._progress = {"state": "running", "phase": phase, "done": int(done),
                       "total": int(total), "unit": unit}

    def _prefill_reporter(self, h: RequestHandle, n_tokens: int):
        """Set the request's phase to prefill; a reporter for the workers if it is long."""
        layers = int(self._infos[0].get("num_layers", 0))
        self._phase(h, "prefill", 0, layers, "layers")
        if n_tokens < self.config.progress_min_tokens or not layers:
            return None
        from .progress import Reporter, make_board
        if self._board is None:
            self._board = make_board(self.group)
        h._reporter = Reporter(self._board, f"req{id(h)}")
        return h._reporter

    def _check_deadline(self, h: RequestHandle) -> None:
        if h.deadline is not None and time.perf_counter() > h.deadline:
            raise RequestTimeoutError(f"request timed out after "
                                      f"{time.perf_counter() - h.submitted:.1f} s")

    def _call(self, method: str, *args) -> list:
        """A call on every rank; any failure there leaves the ranks in unknown states, so the
        group is rebuilt (fresh actors, empty caches) and WorkerFailedError raised."""
        try:
            kw = {} if self.config.step_timeout_s is None else {
                "timeout_s": self.config.step_timeout_s}
            return self.group.call(method, *args, **kw)
        except Exception as e:  # noqa: BLE001
            self._recover(e)
            raise WorkerFailedError(f"{method} failed on the actor group: "
                                    f"{type(e).__name__}: {e}"[:2000]) from e

    def _recover(self, err: BaseException) -> None:
        with self._lock:
            self._counters["worker_failures"] += 1
        for e in self.doc_cache.entries():
            self.doc_cache.remove(e.key)
        try:
            self.group.rebuild()
            self._read_info()
        except Exception:  # noqa: BLE001 - the next request tries again
            pass

    def _new_seq_id(self) -> str:
        return f"s{next(self._ids)}"

    def _refresh_free(self) -> List[int]:
        infos = self._call("kv_info")
        with self._lock:
            self._free_pages = [i["free_pages"] for i in infos]
        return list(self._free_pages)

    def _free_seqs(self, seq_ids: Sequence[str]) -> None:
        if seq_ids:
            free = self._call("free", list(seq_ids))
            with self._lock:
                self._free_pages = list(free)

    # ---- capacity ----

    def _entry_pages(self, e: CachedSeq) -> List[int]:
        return [_pages(c, self.page_size) for c in e.rank_counts(self.world_size)]

    def _make_room(self, need: List[int], requested: int, what: str,
                   keep: Tuple[str, ...] = ()) -> None:
        """Evict unpinned cached sequences (LRU first) until every rank has need[r] free pages;
        CapacityError (before any work on the request) if that cannot be reached."""
        free = self._refresh_free()
        if all(n <= f for n, f in zip(need, free)):
            return
        victims = [e for e in self.doc_cache.eviction_order(keep) if not e.pinned]
        avail = list(free)
        for e in victims:
            avail = [a + p for a, p in zip(avail, self._entry_pages(e))]
        if any(n > a for n, a in zip(need, avail)):
            pinned = self.doc_cache.pinned_tokens
            raise CapacityError(requested, sum(avail) * self.page_size,
                                f"{what}; group capacity {self.capacity_tokens} tokens"
                                + (f", {pinned} held by pinned documents (drop_document frees "
                                   "them)" if pinned else ""))
        for e in victims:
            self.doc_cache.remove(e.key)
            self._free_seqs([e.seq_id])
            if all(n <= f for n, f in zip(need, self._free_pages)):
                return
        free = self._refresh_free()
        if any(n > f for n, f in zip(need, free)):  # pages shared between entries
            raise CapacityError(requested, sum(free) * self.page_size,
                                f"{what}; after evicting every unpinned cached sequence")

    def _room_for(self, prompt, extra: int, entry: Optional[CachedSeq], m: int,
                  requested: int, what: str):
        """Make room for the request, reusing `entry`'s first m tokens if possible. The reused
        entry is never evicted for its own request: if the room can only come from it, the
        reuse is dropped and the prompt prefilled cold. Returns the (entry, m) to use."""
        if entry is not None:
            try:
                self._make_room(self._plan(prompt, extra, entry, m), requested, what,
                                keep=(entry.key,))
                return entry, m
            except CapacityError:
                pass
        self._make_room(self._plan(prompt, extra, None, 0), requested, what)
        return None, 0

    def _check_static(self, n_tokens: int, what: str) -> None:
        if n_tokens > self.capacity_tokens:
            raise CapacityError(n_tokens, self.capacity_tokens, what)

    def _check_ids(self, ids: Sequence[int]) -> None:
        # a token id past the embedding table would fail inside the workers, and a worker
        # failure rebuilds the whole group: refuse it here, as the caller's mistake
        vocab = self._infos[0]["vocab_size"]
        t = torch.as_tensor(ids, dtype=torch.int64)
        out = (t < 0) | (t >= vocab)
        if bool(out.any()):
            bad = int(t[out][0])
            raise InvalidRequestError(f"token id {bad} is outside the vocabulary [0, {vocab})")

    # ---- building a sequence's KV: reuse a cached prefix or prefill ----

    def _match(self, prompt: List[int], need_compute: bool) -> Tuple[Optional[CachedSeq], int]:
        if not len(self.doc_cache):
            return None, 0
        entry, m = self.doc_cache.match(torch.tensor(prompt, dtype=torch.int32))
        if entry is None:
            return None, 0
        if need_compute and m >= len(prompt):
            m = len(prompt) - 1          # the last prompt token must run to give logits
        rest = len(prompt) - m
        # pass-Q extension recomputes the layers on every rank; past a point a ring prefill of
        # the whole prompt is cheaper than extending a short cached prefix by a long remainder
        if m <= 0 or (rest > m and rest > 4 * self.config.extend_chunk):
            return None, 0
        return entry, m

    def _plan(self, prompt: List[int], extra: int, entry: Optional[CachedSeq], m: int):
        """Pages each rank must find for this request: prompt, plus `extra` appended tokens."""
        N, page = self.world_size, self.page_size
        if entry is not None:
            counts = entry.rank_counts(N, m)
            shared = [c // page for c in counts]  # full pages are shared, a partial one copied
            final = balanced_counts(counts, len(prompt) - m + extra)
        else:
            counts = [s.length for s in layout.shards(len(prompt), N, self.config.schedule)]
            shared = [0] * N
            final = balanced_counts(counts, extra)
        return [_pages(f, page) - s for f, s in zip(final, shared)]

    def _owner(self, seq: _Seq) -> int:
        c = seq.counts
        return c.index(min(c))

    def _owners(self, seq: _Seq, k: int) -> List[int]:
        """Owners of the next k tokens under the fewest-tokens rule."""
        c, out = list(seq.counts), []
        for _ in range(k):
            o = c.index(min(c))
            c[o] += 1
            out.append(o)
        return out

    def _build(self, h: RequestHandle, prompt: List[int], params: Optional[SamplingParams],
               entry: Optional[CachedSeq], m: int):
        """Create a sequence holding the prompt's K/V. With params, also sample the first
        token. Returns (seq, first (token, logprob) or None)."""
        N = self.world_size
        sid = self._new_seq_id()
        if entry is None:
            rep = self._prefill_reporter(h, len(prompt))
            res = self._call("prefill", sid, torch.tensor(prompt, dtype=torch.int32),
                             self.config.schedule, "sample" if params else None, params, 0,
                             rep)
            owners = [0] * len(prompt)
            for s in layout.shards(len(prompt), N, self.config.schedule):
                for p in s.positions().tolist():
                    owners[p] = s.rank
            seq = _Seq(sid, list(prompt), owners, torch.bincount(
                torch.tensor(owners, dtype=torch.int64), minlength=N).tolist())
            first = next((r for r in res if r is not None), None)
            with self._lock:
                self._counters["prefill_tokens"] += len(prompt)
            return seq, first
        self.doc_cache.touch(entry)
        self._call("fork", entry.seq_id, sid, m)
        owners = entry.owners[:m].tolist()
        seq = _Seq(sid, list(prompt[:m]), owners, entry.rank_counts(N, m))
        first = None
        try:
            rest = prompt[m:]
            for a in range(0, len(rest), self.config.extend_chunk):
                self._phase(h, "extend", a, len(rest), "tokens")
                chunk = rest[a:a + self.config.extend_chunk]
                last = a + len(chunk) >= len(rest)
                start = len(seq.tokens)
                chunk_owners = []
                for t in chunk:
                    o = self._owner(seq)
                    seq.add(t, o)
                    chunk_owners.append(o)
                res = self._call("extend", sid, chunk, start, chunk_owners,
                                 params if last else None, 0)
                if last and params is not None:
                    first = res[0]
                if not last:
                    self._check_deadline(h)
        except BaseException:
            self._free_after_error(sid)
            raise
        with self._lock:
            self._counters["cached_prompt_tokens"] += m
            self._counters["prefill_tokens"] += len(prompt) - m
        return seq, first

    def _free_after_error(self, sid: str) -> None:
        try:
            self._free_seqs([sid])
        except WorkerFailedError:
            pass  # the group was rebuilt: nothing left to free

    def _keep_or_free(self, seq: _Seq, pinned: bool = False) -> Optional[CachedSeq]:
        """After a request: keep the sequence in the document cache (within its budget) or
        free it."""
        n = len(seq.tokens)
        if n == 0 or n > self.doc_cache.budget_tokens:
            self._free_seqs([seq.seq_id])
            return None
        ids = torch.tensor(seq.tokens, dtype=torch.int32)
        e = CachedSeq(doc_key(ids), seq.seq_id, ids, torch.tensor(seq.owners, dtype=torch.int8),
                      pinned=pinned)
        gone = self.doc_cache.add(e)          # already out of the index (same key: same tokens)
        for g in self.doc_cache.over_budget(keep=(e.key,)):
            self.doc_cache.remove(g.key)
            gone.append(g)
        self._free_seqs([g.seq_id for g in gone])
        return e

    # ---- request kinds ----

    def _run_generate(self, h: RequestHandle, prompt: List[int], params: SamplingParams):
        t0 = time.perf_counter()
        P, M = len(prompt), params.max_tokens
        if P == 0:
            raise InvalidRequestError("the prompt is empty (0 tokens)")
        self._check_ids(prompt)
        what = f"prompt {P} + max_tokens {M}"
        self._check_static(P + M, what)
        params = params.with_seed()
        entry, m = self._match(prompt, need_compute=True)
        entry, m = self._room_for(prompt, M, entry, m, P + M, what)
        seq, first = self._build(h, prompt, params, entry, m)
        t_first = time.perf_counter()
        try:
            out = self._decode(h, seq, prompt, params, first, m)
        except BaseException:
            self._free_after_error(seq.seq_id)
            raise
        t_end = time.perf_counter()
        n_dec = max(0, len(out.token_ids) - 1)
        out.timings = {"queue_s": t0 - h.submitted, "prefill_s": t_first - t0,
                       "ttft_s": t_first - h.submitted, "decode_s": t_end - t_first,
                       "decode_tokens_per_s": n_dec / (t_end - t_first) if n_dec else 0.0,
                       "prefill_tokens_per_s": (P - m) / max(t_first - t0, 1e-9)}
        with self._lock:
            self._last_timings = dict(out.timings)
            self._counters["generated_tokens"] += len(out.token_ids)
            if out.finish_reason == "cancelled":
                self._counters["requests_cancelled"] += 1
        self._keep_or_free(seq)
        return out

    def _decode(self, h: RequestHandle, seq: _Seq, prompt: List[int], params: SamplingParams,
                first: Tuple[int, float], m: int) -> RequestOutput:
        if self.tokenizer is not None:
            from .tokenizer import IncrementalDecoder
            decoder = IncrementalDecoder(self.tokenizer, prompt_ids=prompt[-8:])
        else:
            decoder = _NullDecoder()
        st = StopState(params, decoder, self.eos_token_ids)
        tokens: List[int] = []
        logprobs: List[float] = []
        stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos
                                                  else list(self.eos_token_ids))
        pending = collections.deque([first])   # sampled, not yet shown to the caller
        reason = None
        while True:
            tok, lp = pending.popleft()
            tokens.append(tok)
            logprobs.append(lp)
            self._phase(h, "decode", len(tokens), params.max_tokens, "tokens")
            delta = st.update(tok, len(tokens))
            if h.on_delta is not None:
                h.on_delta(StreamDelta(tok, delta, lp if params.logprobs else None))
            if st.finish_reason:
                reason = st.finish_reason
                break
            if h.cancelled.is_set():
                reason = "cancelled"
                break
            if pending:
                continue
            self._check_deadline(h)
            k = min(self.config.decode_steps, params.max_tokens - len(tokens))
            start, owners = len(seq.tokens), self._owners(seq, k)
            if k == 1:
                seq.add(tok, owners[0])
                pending.append(self._call("extend", seq.seq_id, [tok], start, owners, params,
                                          len(tokens))[0])
            else:
                res = self._call("decode", seq.seq_id, tok, start, owners, params, len(tokens),
                                 stop_ids)[0]
                for t, o in zip([tok] + [t for t, _ in res[:-1]], owners):
                    seq.add(t, o)
                pending.extend(res)
        # a multi-step call may have fed tokens past a stop string or a cancel: drop their K/V
        want = len(prompt) + len(tokens) - 1
        if len(seq.tokens) > want:
            self._call("trim", seq.seq_id, want)
            seq.truncate(want)
        return RequestOutput(list(prompt), tokens, st.text, reason,
                             logprobs if params.logprobs else None, m)

    def _run_score(self, h: RequestHandle, ids: List[int]) -> ScoreOutput:
        P = len(ids)
        if P == 0:
            raise InvalidRequestError("the text to score is empty (0 tokens)")
        self._check_ids(ids)
        self._check_static(P, f"scored text of {P} tokens")
        self._make_room(self._plan(ids, 0, None, 0), P, f"scored text of {P} tokens")
        sid = self._new_seq_id()
        try:
            rep = self._prefill_reporter(h, P)
            res = self._call("prefill", sid, torch.tensor(ids, dtype=torch.int32),
                             self.config.schedule, "score", None, 0, rep)
        finally:
            self._free_after_error(sid)
        lps: List[Optional[float]] = [None] * P
        for pos, lp in res:
            for p, v in zip(pos.tolist(), lp.tolist()):
                lps[p + 1] = v
        with self._lock:
            self._counters["prefill_tokens"] += P
        return ScoreOutput(list(ids), lps)

    def _run_cache_document(self, h: RequestHandle, ids: List[int]) -> str:
        P = len(ids)
        if P == 0:
            raise InvalidRequestError("the document is empty (0 tokens)")
        self._check_ids(ids)
        what = f"document of {P} tokens"
        self._check_static(P, what)
        if P > self.doc_cache.budget_tokens:
            raise CapacityError(P, self.doc_cache.budget_tokens, what + " vs. the document "
                                "cache budget (document_cache_tokens)")
        key = doc_key(torch.tensor(ids, dtype=torch.int32))
        e = self.doc_cache.get(key)
        if e is not None:
            e.pinned = True
            self.doc_cache.touch(e)
            return key
        entry, m = self._match(ids, need_compute=False)
        entry, m = self._room_for(ids, 0, entry, m, P, what)
        if entry is not None and m == P:   # a prefix of a cached sequence: fork, no compute
            sid = self._new_seq_id()
            self._call("fork", entry.seq_id, sid, m)
            seq = _Seq(sid, list(ids), entry.owners[:m].tolist(), entry.rank_counts(
                self.world_size, m))
        else:
            seq, _ = self._build(h, ids, None, entry, m)
        e = self._keep_or_free(seq, pinned=True)
        return e.key

    def _run_drop_document(self, h: RequestHandle, key: str) -> bool:
        e = self.doc_cache.remove(key)
        if e is None:
            return False
        self._free_seqs([e.seq_id])
        return True
