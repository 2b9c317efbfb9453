"""The scheduler: which requests run, which tokens each computes this step, where their K/V go.

It only decides; `Engine` executes its `Step` on the actor group and feeds the results back
(`Engine._update`). Policy:

- FIFO admission from one waiting queue, up to `max_num_seqs` running requests. A request is
  admitted only when the pages of its (uncached) prompt are free, after evicting unpinned cached
  documents, least recently used first. Requests put back by preemption or a worker fault go to
  the front of the queue, in arrival order.
- Every running request that is decoding gets its one token in every step: decodes are never
  starved by a prefill. Prefill work comes on top, in chunks, up to `max_num_batched_tokens`
  prompt tokens per step (FIFO among running prompts).
- When running sequences outgrow the caches, the newest running request is preempted: its KV is
  freed and it recomputes later from its prompt plus the tokens it has already produced (so its
  output is the same). Pinned documents are never evicted for this.

A chunk is computed "ring" (sharded by the layout, ring attention, plus pass-Q against the
prompt's tokens cached by earlier chunks) or "q" (every rank runs all of it: decode tokens and
short extensions of a cached prefix; owners by the fewest-tokens rule).
"""
from __future__ import annotations

import collections
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .doc_cache import CachedSeq, DocumentCache, common_prefix
from .errors import CapacityError
from .kv_manager import (KVManager, SeqKV, balanced_counts, fewest_owner, owner_counts,
                         pages_for)
from .parallel import layout as layouts
from .plan import PENDING_TOKEN, RankPlan, SeqStep
from .sampling import SamplingParams


# a chunk that is not its prompt's last is a multiple of CHUNK_ALIGN tokens per rank: the query
# tile of the flash kernel on the GPU (BLOCK_M 128), so the chunk's attention to its cached
# prefix (which dominates late in a long prompt) runs whole tiles; and the kernels see few
# shapes (compiled once), not a new one every step
CHUNK_ALIGN = 128
SHARED_PREFILL_MIN = 1024   # a shared prompt prefix worth waiting for rather than recomputing
# a prompt of at most this many tokens computed whole in one step takes its pages from the
# high end, as decode rows do: never a later chunk's prefix worth a view, and off the low
# run a long prompt prefilling beside it grows
SHORT_PROMPT_TOKENS = 1024


@dataclass(eq=False)   # identity: `req in running` must not compare prompts
class Request:
    """One request's state, owned by the engine thread."""
    order: int                         # arrival number: FIFO and "newest" for preemption
    kind: str                          # "generate" | "score" | "cache_document"
    prompt: List[int]
    params: Optional[SamplingParams]
    handle: Any                        # engine.RequestHandle
    out_tokens: List[int] = field(default_factory=list)
    out_logprobs: List[float] = field(default_factory=list)
    seq: Optional[SeqKV] = None        # its KV while running
    num_cached_tokens: int = 0         # prompt tokens reused from the document cache
    score_lps: Optional[List[Optional[float]]] = None
    recoveries: int = 0                # worker faults survived
    preemptions: int = 0
    first_admitted: Optional[float] = None
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None
    # the intervals between its output tokens' arrivals (timings' itl_* figures)
    itl: List[float] = field(default_factory=list)
    stop: Any = None                   # sampling.StopState (generate)
    entry_key: Optional[str] = None    # the cached document it forked, if any
    doc_key: Optional[str] = None      # cache_document: the key its document will have
    out_top: List[Any] = field(default_factory=list)   # top_logprobs of each output token
    # generate requests with the same prompt submitted while this one prefills it: admitted
    # once its prompt is computed, forking its KV (n > 1: one prefill for the n samples)
    followers: List["Request"] = field(default_factory=list)
    long_rope: bool = False            # longrope: its KV was computed with the long factors
    # async scheduling: the last `pending` out_tokens are PENDING_TOKEN, sampled by steps in
    # flight (at most two: the step being read and the one planned after it)
    pending: int = 0

    def resolve(self, tok: int) -> int:
        """The oldest pending output token is tok (or, none pending, tok is appended); the
        sequence's copy of it, when a later step already computed its K/V, too. Returns the
        number of output tokens known now."""
        if not self.pending:
            self.out_tokens.append(tok)
            return len(self.out_tokens)
        i = len(self.out_tokens) - self.pending
        self.out_tokens[i] = tok
        self.pending -= 1
        p = len(self.prompt) + i
        if self.seq is not None and p < len(self.seq.tokens):
            self.seq.tokens[p] = tok
        return i + 1

    def drop_pending(self) -> None:
        """Forget the output tokens of steps in flight (the request ends, or recomputes what
        it has after a fault)."""
        if self.pending:
            del self.out_tokens[-self.pending:]
            self.pending = 0

    @property
    def tokens(self) -> List[int]:
        return self.prompt + self.out_tokens

    def prompt_array(self) -> np.ndarray:
        """The prompt as an int64 array, made once (the engine may set it at admission)."""
        a = getattr(self, "_prompt_np", None)
        if a is None:
            a = self._prompt_np = np.array(self.prompt, dtype=np.int64)
        return a

    def prompt_tensor(self) -> torch.Tensor:
        t = getattr(self, "_prompt_t", None)
        if t is None:
            t = self._prompt_t = torch.from_numpy(self.prompt_array().astype(np.int32))
        return t

    def tokens_tensor(self) -> torch.Tensor:
        """prompt + out_tokens as int32 (the prompt's part made once)."""
        if not self.out_tokens:
            return self.prompt_tensor()
        return torch.cat([self.prompt_tensor(),
                          torch.tensor(self.out_tokens, dtype=torch.int32)])

    def token_array(self, a: int, b: int) -> np.ndarray:
        """tokens[a:b] as an int64 array (a prompt chunk's ids, without Python per token)."""
        P = len(self.prompt)
        if b <= P:
            return self.prompt_array()[a:b]
        tail = np.array(self.out_tokens[max(0, a - P):b - P], dtype=np.int64)
        return np.concatenate([self.prompt_array()[a:P], tail]) if a < P else tail

    def token_slice(self, a: int, b: int) -> List[int]:
        """tokens[a:b] without building the whole list (prompts can be millions of tokens)."""
        P = len(self.prompt)
        if b <= P:
            return self.prompt[a:b]
        return self.prompt[a:P] + self.out_tokens[max(0, a - P):b - P]

    @property
    def computed(self) -> int:
        return len(self.seq) if self.seq is not None else 0

    @property
    def remaining(self) -> int:
        return len(self.prompt) + len(self.out_tokens) - self.computed

    @property
    def decoding(self) -> bool:
        return self.kind == "generate" and bool(self.out_tokens) and self.remaining == 1


@dataclass
class Work:
    req: Request
    start: int                         # first position computed
    n: int                             # tokens computed
    kind: str                          # "q" | "ring"
    owners: List[int]
    sample: bool
    sample_rank: int = 0
    # filled when the pages are taken (at scheduling, so later work in the step sees them gone)
    before: List[int] = field(default_factory=list)     # the request's tokens per rank before
    slots: List[List[int]] = field(default_factory=list)
    copies: List[List[Tuple[int, int]]] = field(default_factory=list)
    after: List[int] = field(default_factory=list)


@dataclass
class Step:
    works: List[Work]
    plans: List[RankPlan]


@dataclass
class SchedulerConfig:
    layout: str = "striped"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048     # prompt tokens per step (decodes come on top)
    passq_max_tokens: int = 256            # a continuation chunk this short runs pass-Q
    cascade: bool = True                   # shared-prefix decode (read a document once)
    graphs: bool = False                   # mark decode-only steps with their graph bucket
    # prefill cost model: None counts a chunk's tokens against the budget; a number E counts
    # a chunk of n tokens after p cached ones as n * (1 + (p + n/2) / E), E being the context
    # length at which a token's attention costs as much as its projections and MLP (from the
    # model's shape), so steps take about the same time early and late in a long prompt
    attn_equiv_tokens: Optional[float] = None
    solo_budget_factor: int = 1            # budget multiplier while a prompt runs alone
    # longrope (Phi-3): a sequence longer than this uses other RoPE factors for every token,
    # so a sequence that grows past it is recomputed, and a cached prefix no longer than it is
    # not reused for a longer one (transformers recomputes the whole sequence at that point)
    long_after: Optional[int] = None
    # decode-only steps after each step that carried prompt work beside decoding requests: 0,
    # every step may carry both; k, the next k steps decode alone (no prompt chunk, no
    # admission), so the decodes run as their own (graph-replayed) steps and a mixed step's
    # fixed cost is paid once per k + 1 tokens; the budget then sets a bigger chunk for the
    # same mean inter-token latency (docs/architecture.md, "Interleaved prefill")
    interleave_decode_steps: int = 0


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv: KVManager, doc_cache: DocumentCache,
                 world_size: int):
        self.cfg, self.kv, self.doc_cache = cfg, kv, doc_cache
        self.world_size = world_size
        self.waiting: "collections.deque[Request]" = collections.deque()
        self.running: List[Request] = []
        self._orders = itertools.count()
        self.on_preempt: Callable[[Request], None] = lambda r: None
        self._preempted = False
        self._done_before_step: Dict[int, int] = {}
        self._hold = 0      # decode-only steps still owed (interleave_decode_steps)

    # ---- queue ----

    def next_order(self) -> int:
        return next(self._orders)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def requeue(self, reqs: Sequence[Request]) -> None:
        """Put requests back at the head of the queue in arrival order (preemption, faults)."""
        for r in sorted(reqs, key=lambda r: r.order, reverse=True):
            self.waiting.appendleft(r)

    def detach(self, req: Request) -> Optional[SeqKV]:
        """Take req out of the queues; returns its sequence (the caller keeps or frees it)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        seq, req.seq = req.seq, None
        return seq

    def release(self, req: Request) -> None:
        if req.seq is not None:
            self.kv.free(req.seq)
            req.seq = None

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- capacity ----

    def _evictable(self) -> List[CachedSeq]:
        return [e for e in self.doc_cache.eviction_order() if not e.pinned]

    def _make_room(self, need: List[int], keep: Tuple[str, ...] = ()) -> bool:
        """Evict unpinned cached sequences (LRU first) until `need` pages are free per rank."""
        if self.kv.fits(need):
            return True
        for e in self._evictable():
            if e.key in keep:
                continue
            self.doc_cache.remove(e.key)
            self.kv.free(e.kv)
            if self.kv.fits(need):
                return True
        return False

    def pinned_pages(self, keep: Optional[CachedSeq] = None) -> List[int]:
        pinned = [e.kv for e in self.doc_cache.entries() if e.pinned and e is not keep]
        return self.kv.pages_of(pinned)

    def check_static(self, req: Request, entry: Optional[CachedSeq], m: int) -> None:
        """CapacityError if the request can never fit, whatever else is evicted or preempted."""
        extra = req.params.max_tokens if req.kind == "generate" else 0
        total = len(req.prompt) + extra
        what = (f"prompt {len(req.prompt)} + max_tokens {extra}" if req.kind == "generate"
                else f"{'document' if req.kind == 'cache_document' else 'scored text'} of "
                     f"{len(req.prompt)} tokens")
        cap = self.kv.capacity_tokens
        if total > cap:
            raise CapacityError(total, cap, what)
        pinned = self.pinned_pages(keep=entry)
        room = [u - p for u, p in zip(self.kv.usable_pages(), pinned)]
        need = self._need_pages(req, extra, entry, m)
        if any(n > r for n, r in zip(need, room)):
            avail = sum(max(0, r) for r in room) * self.kv.page_size
            tok = sum(e.num_tokens for e in self.doc_cache.entries() if e.pinned)
            raise CapacityError(total, avail, f"{what}; group capacity {cap} tokens, {tok} held "
                                "by pinned documents (drop_document frees them)")

    def _need_pages(self, req: Request, extra: int, entry: Optional[CachedSeq], m: int):
        """Pages per rank the request's KV will take beyond a reused prefix."""
        P, N = self.kv.page_size, self.world_size
        if entry is not None:
            counts = _rank_counts(entry, N, m)
            shared = [c // P for c in counts]
            final = balanced_counts(counts, len(req.prompt) - m + extra)
        else:
            counts = [s.length for s in layouts.shards(len(req.prompt), N, self.cfg.layout)]
            shared = [0] * N
            final = balanced_counts(counts, extra)
        return [pages_for(f, P) - s for f, s in zip(final, shared)]

    def match(self, req: Request, running: bool = True) -> Tuple[Optional[Any], int]:
        """The cached sequence sharing the longest prefix with req's tokens: a document-cache
        entry, or (running=True) a running request's sequence whose K/V for that prefix were
        computed in earlier steps. Returns (entry or SeqKV, tokens reusable) or (None, 0)."""
        if req.kind == "score":
            return None, 0
        toks = req.tokens
        entry, m = None, 0
        if len(self.doc_cache):
            entry, m = self.doc_cache.match(req.tokens_tensor())
        if running:
            r, n, complete = self._shared_running(req)
            if r is not None and complete and n > m:
                entry, m = r.seq, n
        if entry is None:
            return None, 0
        if req.kind == "generate" and m >= len(toks):
            m = len(toks) - 1              # the last token must run to give logits
        L = self.cfg.long_after
        if L is not None and m <= L < len(toks):
            return None, 0                 # the prefix was rotated with the short factors
        return (entry, m) if m > 0 else (None, 0)

    # ---- one step ----

    def schedule(self, now: float) -> Step:
        works: List[Work] = []
        self._done_before_step = {id(r): r.computed for r in self.running}
        # 1. every decoding request gets its token; preempt the newest if pages run out
        for req in sorted(self.running, key=lambda r: r.order):
            if req not in self.running or not req.decoding:
                continue
            if req.computed == self.cfg.long_after and not req.long_rope:
                # longrope: this token makes the sequence longer than the original context;
                # transformers then recomputes every key with the long factors: so do we
                self.running.remove(req)
                self.release(req)
                self.requeue([req])
                continue
            owner = fewest_owner(req.seq.counts)
            if not self._room_for(req, [owner]):
                continue
            works.append(self._work(req, 1, "q", [owner]))
        decodes = {id(w) for w in works}
        if decodes and self._hold > 0:
            # interleaved: a decode-only step (prompt work waits, in order, for the next one)
            self._hold -= 1
            return self._step(works)
        # 2. prompt chunks of running requests, FIFO, within the token budget; while requests
        # wait for admission one prompt takes at most half of it, so a long prefill leaves room
        # for a new short request in the very next step
        budget = self.cfg.max_num_batched_tokens
        alone = not self.waiting and len(self.running) == 1 and not works
        if alone:   # nobody to keep waiting: bigger steps, less per-step overhead
            budget *= self.cfg.solo_budget_factor
        cap = budget if not self.waiting else max(1, budget // 2)
        for req in sorted(self.running, key=lambda r: r.order):
            if budget <= 0:
                break
            if req not in self.running or req.decoding or any(w.req is req for w in works):
                continue
            w = self._chunk(req, min(budget, cap))
            if w is not None:
                works.append(w)
                budget -= self.cost(w.start, w.n)
        # 3. admit waiting requests, FIFO, while there is room; one whose prompt starts with
        # what a running request is still prefilling waits for it (then reuses its KV instead
        # of computing the same document twice), without holding up the requests behind it
        self._preempted = False
        for req in list(self.waiting):
            if (budget <= 0 or len(self.running) >= self.cfg.max_num_seqs
                    or self._preempted):
                break
            if self._shares_a_prefill(req):
                continue
            if not self._admit(req, now):
                break
            self.waiting.remove(req)
            self.running.append(req)
            if not works and len(self.running) == 1 and not self.waiting:
                budget *= self.cfg.solo_budget_factor     # admitted alone
            w = self._chunk(req, budget)
            if w is not None:
                works.append(w)
                budget -= self.cost(w.start, w.n)
        step = self._step(works)
        if self.cfg.graphs and len(step.works) == 1 and not decodes:
            self._capture_ahead(step)
        if (any(id(w) in decodes for w in step.works)
                and any(id(w) not in decodes for w in step.works)):
            self._hold = self.cfg.interleave_decode_steps     # a mixed step
        return step

    def _capture_ahead(self, step: Step) -> None:
        """A lone prompt's first chunk, when more chunks follow and the request will decode
        (a generation, or a document that questions will extend): mark the decode graph
        bucket of its first token on every rank's plan, for the workers to capture inside the
        prefill. The width assumes the prompt's tokens spread evenly over the ranks (a
        document: plus a question of up to passq_max_tokens); a wrong guess costs one unused
        capture, and the first decode step captures its own as before."""
        w = step.works[0]
        req = w.req
        if (w.start != 0 or w.kind != "ring" or req.remaining <= 0   # (its chunk is counted)
                or req.kind not in ("generate", "cache_document") or len(self.running) != 1):
            return
        total = len(req.prompt) + len(req.out_tokens) + 1
        if req.kind == "cache_document":
            total += self.cfg.passq_max_tokens
        per_rank = -(-total // self.world_size) + 1
        key = (1, graph_width_bucket(pages_for(per_rank, self.kv.page_size)), 0)
        for plan in step.plans:     # a worker that has this graph already skips it
            plan.capture_ahead = key

    def _step(self, works: List[Work]) -> Step:
        """The step of the works whose requests still run (preemption may have taken some)."""
        works = [w for w in works if w.req in self.running]
        self._done_before_step = {}
        return Step(works, self._plans(works))

    def _shared_running(self, req: Request) -> Tuple[Optional[Request], int, bool]:
        """The running request whose prompt shares the longest prefix (at least
        SHARED_PREFILL_MIN tokens) with req's: (it, the prefix's length, whether its K/V for
        that prefix is complete as of the last step)."""
        if req.kind == "score" or len(req.prompt) < SHARED_PREFILL_MIN:
            return None, 0, False
        best, best_n, mine = None, 0, None
        for r in self.running:
            if r.kind == "score" or r.seq is None or len(r.prompt) < SHARED_PREFILL_MIN:
                continue
            if mine is None:
                mine = req.prompt_tensor()
            n = common_prefix(mine, r.prompt_tensor())
            if n > best_n:
                best, best_n = r, n
        if best is None or best_n < SHARED_PREFILL_MIN:
            return None, 0, False
        return best, best_n, self._done_before_step.get(id(best), best.computed) >= best_n

    def _shares_a_prefill(self, req: Request) -> bool:
        """Does a running request still prefill a long prefix of this request's prompt (beyond
        what the document cache holds)? Then this one waits and forks it when it is done."""
        r, n, complete = self._shared_running(req)
        if r is None or complete:
            return False
        entry, m = self.match(req, running=False)
        return m < n

    def _admit(self, req: Request, now: float) -> bool:
        entry, m = self.match(req)
        if self._try_admit(req, now, entry, m):
            return True
        # the reused prefix is never evicted for its own request: if, with nothing else running
        # to free pages later, the room can only come from it (a short shared prefix of a long
        # unpinned sequence), prefill without it
        return entry is not None and not self.running and self._try_admit(req, now, None, 0)

    def _try_admit(self, req: Request, now: float, entry, m: int) -> bool:
        if entry is not None:
            counts = _rank_counts(entry, self.world_size, m)
            final = balanced_counts(counts, len(req.tokens) - m)
            need = [pages_for(f, self.kv.page_size) - c // self.kv.page_size
                    for f, c in zip(final, counts)]
        else:
            n = len(req.tokens)
            counts = [s.length for s in layouts.shards(n, self.world_size, self.cfg.layout)]
            need = [pages_for(c, self.kv.page_size) for c in counts]
        # the outstanding prompt chunks of running requests have a claim on the pages too
        claims = [0] * self.world_size
        for r in self.running:
            if not r.decoding and r.remaining > 1:
                for i, c in enumerate(balanced_counts([0] * self.world_size, r.remaining)):
                    claims[i] += pages_for(c, self.kv.page_size) + 1
        total = [a + b for a, b in zip(need, claims)]
        cached = isinstance(entry, CachedSeq)
        keep = (entry.key,) if cached else ()
        if not self._make_room(total, keep):
            if entry is not None or self.running:
                return False
            # nothing else runs: it must fit alone (check_static said it can)
            if not self._make_room(need):
                return False
        if cached:
            self.doc_cache.touch(entry)
            req.seq = self.kv.fork(entry.kv, m)
            req.entry_key = entry.key
        elif entry is not None:                  # a running request's sequence
            req.seq = self.kv.fork(entry, m)
        else:
            req.seq = self.kv.new()
        if req.first_admitted is None:
            req.first_admitted = now
        # prompt tokens whose K/V came from the cache in the run that produced the output
        # (after a preemption or a fault, the last admission's)
        req.num_cached_tokens = min(m, len(req.prompt))
        return True

    def _room_for(self, req: Request, owners: List[int]) -> bool:
        """Pages for the request's next tokens, preempting the newest running requests (maybe
        this one: then False) when evicting unpinned documents is not enough."""
        new = owner_counts(owners, self.world_size)
        while True:
            need = self.kv.need(req.seq, new)
            if self._make_room(need):
                return True
            victim = max(self.running, key=lambda r: r.order)
            self.preempt(victim)
            if victim is req:
                return False

    def preempt(self, req: Request) -> None:
        self._preempted = True
        self.running.remove(req)
        self.release(req)
        req.preemptions += 1
        self.requeue([req])
        self.on_preempt(req)

    def cost(self, start: int, n: int) -> float:
        """Budget units of computing n prompt tokens after `start` cached ones."""
        E = self.cfg.attn_equiv_tokens
        return n if E is None else n * (1.0 + (start + n / 2.0) / E)

    def chunk_tokens(self, start: int, budget: float) -> int:
        """The most tokens after `start` whose cost fits the budget (at least one)."""
        E = self.cfg.attn_equiv_tokens
        if E is None:
            return max(1, int(budget))
        a = 1.0 + start / E        # cost(n) = a*n + n*n/(2E) = budget
        n = E * (math.sqrt(a * a + 2.0 * budget / E) - a)
        return max(1, int(n))

    def chunk_size(self, start: int, left: int, budget: float) -> int:
        """How many of a prompt's `left` remaining tokens (after `start` computed) the next
        chunk takes within `budget`: the cost model's fit, the whole rest when it fits with a
        quarter-budget slack, else whole tiles of CHUNK_ALIGN per rank."""
        n = min(left, self.chunk_tokens(start, budget))
        room = budget + self.cfg.max_num_batched_tokens / 4   # the slack, in cost
        if n < left and self.cost(start, left) <= room:
            # the whole rest fits with a little slack (a quarter of the step budget, in cost):
            # a short prompt rides in one step instead of two (its TTFT halves under load),
            # a long one's last bit does not take a step of its own
            n = left
        align = CHUNK_ALIGN * self.world_size
        if n < left and n % align:
            # whole tiles: up to the next multiple when its cost still fits the slack (a tile
            # that is paid for anyway: on the GPU 145 rows cost what 256 do), else down
            up = n + align - n % align
            if up < left and self.cost(start, up) <= room:
                n = up
            elif n > align:
                n -= n % align
        return n

    def _chunk(self, req: Request, budget: float) -> Optional[Work]:
        start, left = req.computed, req.remaining
        n = self.chunk_size(start, left, budget)
        if n <= 0:
            return None
        N = self.world_size
        # pass-Q for a prompt's short last chunk after cached tokens (a question on a
        # document); a long prompt's middle chunks go as ring chunks even when small (a busy
        # step's budget makes them a few hundred tokens late in a long prompt): the flash
        # kernel with the cached keys split over programs runs them several times faster than
        # the paged decode kernel, whose tiles are made for a few query rows
        kind = "ring"
        if n < N or (start > 0 and n == left and n <= self.cfg.passq_max_tokens):
            kind = "q"
        if kind == "q":
            c, owners = list(req.seq.counts), []
            for _ in range(n):
                o = fewest_owner(c)
                c[o] += 1
                owners.append(o)
        else:
            owners = ring_owners(n, N, self.cfg.layout)
        if not self._room_for(req, owners):
            return None
        return self._work(req, n, kind, owners)

    def _work(self, req: Request, n: int, kind: str, owners: List[int]) -> Work:
        """The work item, with its pages taken now (room was made by `_room_for`)."""
        start = req.computed
        sample = req.kind == "generate" and start + n == len(req.prompt) + len(req.out_tokens)
        if self.cfg.long_after is not None:   # the factors the plan's seq_len will pick
            req.long_rope = len(req.prompt) + len(req.out_tokens) > self.cfg.long_after
        rank = int(owners[-1]) if kind == "ring" else 0
        w = Work(req, start, n, kind, owners, sample, rank)
        seq = req.seq
        w.before = list(seq.counts)
        # pass-Q rows (decode tokens, short questions) and short prompts whole in this chunk
        # take pages from the high end, longer prompts' chunks from the low end: a long
        # prompt's pages stay one run (its chunks read their prefix as one view) beside
        # decoding streams and the short requests that arrive while it prefills
        whole_short = (start == 0 and n <= SHORT_PROMPT_TOKENS
                       and n == len(req.prompt) + len(req.out_tokens))
        toks = req.token_array(start, start + n) if kind == "ring" else \
            req.token_slice(start, start + n)
        w.slots, w.copies = self.kv.append(seq, toks, owners, high=kind == "q" or whole_short)
        w.after = list(seq.counts)
        return w

    # ---- the per-rank plans ----

    def _plans(self, works: List[Work]) -> List[RankPlan]:
        N = self.world_size
        drop = self.kv.take_dropped()
        plans = [RankPlan(self.cfg.layout, drop=list(drop)) for _ in range(N)]
        for w in works:
            ring = w.kind == "ring"
            # a ring chunk's per-token fields go as int64 arrays (vectorized here and on the
            # workers: a 32K-token chunk's lists cost tens of ms of host time a step, with the
            # GPU waiting); pass-Q rows (decodes, short extensions) stay lists
            toks = w.req.token_array(w.start, w.start + w.n) if ring else \
                w.req.token_slice(w.start, w.start + w.n)
            owners = np.asarray(w.owners) if ring else w.owners
            slots, copies = w.slots, w.copies
            targets = None
            if w.req.kind == "score":
                full = w.req.prompt
                targets = [full[p + 1] if p + 1 < len(full) else -1
                           for p in range(w.start, w.start + w.n)]
            for r in range(N):
                plan = plans[r]
                for a, b in copies[r]:
                    plan.copy_src.append(a)
                    plan.copy_dst.append(b)
                if not ring:
                    rows = list(range(w.n))
                    write = [i for i in rows if owners[i] == r]
                    ids, pos = [toks[i] for i in rows], [w.start + i for i in rows]
                else:
                    rows = np.flatnonzero(owners == r)
                    write = np.arange(len(rows), dtype=np.int64)
                    ids, pos = toks[rows], w.start + rows
                first, new = w.req.seq.table_delta(r)
                step = SeqStep(
                    w.kind, ids, pos, write,
                    slots[r], w.req.seq.key, first, new, w.before[r], w.after[r],
                    chunk_len=w.n, chunk_start=w.start,
                    sample=((w.req.params, len(w.req.out_tokens))
                            if w.sample and r == w.sample_rank else None),
                    seq_len=len(w.req.prompt) + len(w.req.out_tokens),
                    targets=([targets[int(i)] for i in rows] if targets is not None
                             and (w.kind == "ring" or r == 0) else None))
                plan.seqs.append(step)
        if self.cfg.graphs and works and all(w.kind == "q" and w.n == 1 for w in works):
            self._graph_plans(plans, works)
        elif self.cfg.cascade:
            for r, plan in enumerate(plans):
                self._cascade(r, plan, works)
        return plans

    def _graph_plans(self, plans: List[RankPlan], works: List[Work]) -> None:
        """Mark a step of one-token rows with its graph buckets, the same on every rank. When
        every row shares one cached document (on every rank one cascade group holding every
        row: many questions on one document), the graph reads that prefix once for all rows,
        as the eager cascade does; otherwise each row reads its whole table."""
        batch = 1
        while batch < len(works):
            batch *= 2
        shared = [0] * len(plans)
        if self.cfg.cascade and len(works) > 1:
            for r, plan in enumerate(plans):
                self._cascade(r, plan, works)
            if all(len(p.groups) == 1 and all(s.group == 0 for s in p.seqs) for p in plans):
                shared = [p.groups[0][1] for p in plans]
            else:
                for p in plans:
                    p.groups = []
                    for s in p.seqs:
                        s.group = -1
        need = max(len(w.req.seq.pages[r]) - shared[r] for w in works for r in range(len(plans)))
        prefix = graph_width_bucket(max(shared)) if max(shared) else 0
        for plan in plans:
            plan.graph_batch, plan.graph_width, plan.graph_prefix = (
                batch, graph_width_bucket(need), prefix)

    def _cascade(self, r: int, plan: RankPlan, works: List[Work]) -> None:
        """Group one-token pass-Q steps whose first pages on rank r are the same pages (a
        shared cached document): those pages are read once for the whole group.

        Pages are shared only by forking a prefix, and copy-on-write replaces only a partial
        last page, so two tables holding the same page at index j share all of [0, j]: the
        common prefix is found by comparing single entries (binary search), not whole tables."""
        P = self.kv.page_size
        by_first: Dict[int, List[int]] = {}
        for i, (w, s) in enumerate(zip(works, plan.seqs)):
            if s.kind == "q" and len(s.token_ids) == 1 and w.before[r] >= P:
                by_first.setdefault(w.req.seq.pages[r][0], []).append(i)
        for members in by_first.values():
            if len(members) < 2:
                continue
            tables = [works[i].req.seq.pages[r] for i in members]
            hi = min(works[i].before[r] // P for i in members)   # full pages before the step

            def shared(k: int, tables=tables) -> bool:
                return all(t[k - 1] == tables[0][k - 1] for t in tables)

            lo = 1                                                # shared(1) holds by grouping
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if shared(mid):
                    lo = mid
                else:
                    hi = mid - 1
            g = len(plan.groups)
            plan.groups.append((plan.seqs[members[0]].seq, lo))
            for i in members:
                plan.seqs[i].group = g


def graph_width_bucket(pages: int) -> int:
    """A decode graph's table width for rows of up to `pages` pages: powers of two from 16, so
    a sequence growing through a long decode meets few new graphs."""
    b = 16
    while b < pages:
        b *= 2
    return b


def _rank_counts(src, world_size: int, m: int) -> List[int]:
    """Tokens per rank among the first m of a cached entry or a sequence."""
    if isinstance(src, CachedSeq):
        return src.rank_counts(world_size, m)
    return owner_counts(src.owners[:m], world_size)


def ring_owners(n: int, world_size: int, layout: str) -> np.ndarray:
    """(n,) int64: the rank of each token of an n-token ring chunk under the layout."""
    owners = np.empty(n, dtype=np.int64)
    for s in layouts.shards(n, world_size, layout):
        owners[s.offset:s.offset + s.stride * s.length:s.stride] = s.rank
    return owners


__all__ = ["Request", "Work", "Step", "Scheduler", "SchedulerConfig", "PENDING_TOKEN"]
