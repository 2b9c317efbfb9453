"""Sampling parameters, the token sampler, and stop-string handling on detokenized text.

The sampler is a pure function of (logits, params, step, context): its random draw comes from a
generator seeded with (seed, step), so a request is reproducible whatever rank or device samples
it and no generator state has to live between decode steps. The context (`SampleContext`) is what
penalties, min_tokens and structured output need besides the logits: the request's output so far
(and, for repetition_penalty, its prompt's distinct tokens); the engine attaches it only to the
requests that use them.

Order of the logits processing (vLLM's definitions): repetition_penalty (a seen token's positive
logit divided by it, a negative one multiplied), frequency and presence penalties (OpenAI's: the
logit minus count * frequency_penalty minus presence_penalty once the token was generated, output
tokens only), logit_bias (added), min_tokens (EOS and stop_token_ids banned before it), the
grammar mask (structured output), then temperature, top-k, top-p. Reported logprobs (and
top_logprobs) are the model's own distribution, before any of these.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

_MASK64 = (1 << 63) - 1


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    logprobs: bool = False
    ignore_eos: bool = False
    top_logprobs: int = 0                 # also report the k most likely tokens' logprobs
    n: int = 1                            # LLM.generate: samples per prompt (prompt KV shared)
    best_of: Optional[int] = None         # LLM.generate: draw this many, keep the n best
    presence_penalty: float = 0.0         # [-2, 2]
    frequency_penalty: float = 0.0        # [-2, 2]
    repetition_penalty: float = 1.0       # > 0; 1 is off
    logit_bias: Optional[Dict[int, float]] = None   # token id -> bias in [-100, 100]
    min_tokens: int = 0                   # EOS and stop_token_ids banned before this many
    guided_json: Any = None               # JSON schema (dict or its text)
    guided_regex: Optional[str] = None
    guided_choice: Optional[Sequence[str]] = None
    guided_grammar: Optional[str] = None  # Lark grammar (llguidance's dialect)
    grammar: Optional[str] = field(default=None, init=False, repr=False)  # llguidance's form

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))
        if int(self.max_tokens) != self.max_tokens or self.max_tokens < 1:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be an integer >= 1")
        self.max_tokens = int(self.max_tokens)
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature ({self.temperature}) must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")
        if int(self.top_k) != self.top_k or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k ({self.top_k}) must be -1 (off) or >= 1")
        self.top_k = int(self.top_k)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.seed is not None and int(self.seed) != self.seed:
            raise ValueError(f"seed ({self.seed}) must be an integer or None")
        self._check_extras()
        from .structured import grammar_for
        self.grammar = grammar_for(self.guided_json, self.guided_regex, self.guided_choice,
                                   self.guided_grammar)
        if self.grammar is not None and self.ignore_eos:
            raise ValueError("ignore_eos can not be combined with structured output (the "
                             "grammar ends the output with EOS)")

    def _check_extras(self) -> None:
        def integer(name, lo, hi=None):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                raise ValueError(f"{name} ({v}) must be an integer {rng}")
            setattr(self, name, int(v))
        integer("top_logprobs", 0, 20)
        integer("n", 1, 128)
        if self.best_of is not None:
            integer("best_of", self.n, 128)
        integer("min_tokens", 0, self.max_tokens)
        for name in ("presence_penalty", "frequency_penalty"):
            v = float(getattr(self, name))
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} ({v}) must be in [-2, 2]")
            setattr(self, name, v)
        if not (0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty ({self.repetition_penalty}) must be > 0 "
                             "(1 is off)")
        self.repetition_penalty = float(self.repetition_penalty)
        if self.logit_bias:
            bias = {}
            for k, v in dict(self.logit_bias).items():
                ok = (k.strip().isdigit() if isinstance(k, str)
                      else isinstance(k, int) and not isinstance(k, bool) and k >= 0)
                if not ok:
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
                t = int(k)
                if not -100.0 <= float(v) <= 100.0:
                    raise ValueError(f"logit_bias value for token {t} ({v}) must be in "
                                     "[-100, 100]")
                bias[t] = float(v)
            self.logit_bias = bias
        else:
            self.logit_bias = None

    @property
    def needs_context(self) -> bool:
        """Does sampling need the request's output so far (or its EOS ids)?"""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1 or self.min_tokens > 0
                or self.grammar is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def with_seed(self) -> "SamplingParams":
        """A copy with a concrete seed (drawn now when None), so every step of one request
        uses the same stream of seeds."""
        if self.seed is not None:
            return self
        from dataclasses import replace
        return replace(self, seed=random.SystemRandom().getrandbits(62))


def _step_seed(seed: int, step: int) -> int:
    # splitmix64-style mixing: neighbouring (seed, step) pairs give unrelated generator states
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 1) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK64


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on a (vocab,) float32 logits row.

    Removed tokens get -inf. Top-p keeps the smallest set of most likely tokens whose probability
    reaches top_p (the most likely token is always kept).
    """
    x = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


@dataclass
class SampleContext:
    """What a row's sampling needs besides its logits (attached by the engine, per step, to the
    requests with penalties, min_tokens or a grammar)."""
    rid: int                                   # the request, for the worker's grammar matcher
    out_tokens: List[int]                      # its output so far
    prompt_ids: Optional[List[int]] = None     # distinct prompt tokens (repetition_penalty)
    eos_token_ids: Tuple[int, ...] = ()        # banned with stop_token_ids before min_tokens


def penalized_logits(logits: torch.Tensor, params: SamplingParams,
                     ctx: Optional[SampleContext]) -> torch.Tensor:
    """Repetition, frequency and presence penalties and logit_bias on a (vocab,) float32 row
    (a new tensor when anything applies)."""
    x = logits
    dev = x.device
    if ctx is not None and params.repetition_penalty != 1.0:
        seen = set(ctx.out_tokens).union(ctx.prompt_ids or ())
        if seen:
            x = x.clone()
            idx = torch.tensor(sorted(seen), dtype=torch.int64, device=dev)
            v = x[idx]
            p = params.repetition_penalty
            x[idx] = torch.where(v > 0, v / p, v * p)
    if ctx is not None and ctx.out_tokens and (params.frequency_penalty
                                              or params.presence_penalty):
        ids, counts = torch.unique(torch.tensor(ctx.out_tokens, dtype=torch.int64),
                                   return_counts=True)
        x = x.clone() if x is logits else x
        x[ids.to(dev)] -= (counts.float() * params.frequency_penalty
                           + params.presence_penalty).to(dev)
    if params.logit_bias:
        x = x.clone() if x is logits else x
        ids = torch.tensor(list(params.logit_bias), dtype=torch.int64, device=dev)
        x[ids] += torch.tensor(list(params.logit_bias.values()), dtype=x.dtype, device=dev)
    return x


def _ban(x: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    ids = [t for t in ids if 0 <= t < x.numel()]
    if not ids:
        return x
    return x.index_fill(0, torch.tensor(ids, dtype=torch.int64, device=x.device), float("-inf"))


def _spec(item: tuple) -> Tuple[SamplingParams, int, Optional[SampleContext]]:
    return item[0], item[1], (item[2] if len(item) > 2 else None)


def processed_logits(logits: torch.Tensor, params: SamplingParams, step: int,
                     ctx: Optional[SampleContext] = None,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A (vocab,) float32 row after penalties, logit_bias, min_tokens and the grammar's bitmask
    ((ceil(vocab/32),) int32), in that order; device work only (no host round trip)."""
    x = penalized_logits(logits, params, ctx)
    banned = x
    if params.min_tokens and step < params.min_tokens:
        banned = _ban(x, tuple(params.stop_token_ids) + tuple(
            ctx.eos_token_ids if ctx is not None else ()))
    if mask is None:
        return banned
    from .structured import apply_bitmask
    y = apply_bitmask(banned[None], mask[None])[0]
    if banned is not x:
        # the grammar allows only what min_tokens bans (its output is complete): it wins
        y = torch.where(torch.isfinite(y).any(), y, apply_bitmask(x[None], mask[None])[0])
    return y


def _plain(params: SamplingParams, step: int, ctx: Optional[SampleContext], mask) -> bool:
    """Nothing to do to the row's logits before temperature / top-k / top-p."""
    penalties = ctx is not None and (params.repetition_penalty != 1.0
                                     or params.frequency_penalty or params.presence_penalty)
    return (mask is None and not penalties and not params.logit_bias
            and not (params.min_tokens and step < params.min_tokens))


def sample(logits: torch.Tensor, params: SamplingParams, step: int,
           ctx: Optional[SampleContext] = None, mask: Optional[torch.Tensor] = None) -> tuple:
    """Pick the next token from a (vocab,) logits row. Returns (token_id, logprob), or with
    params.top_logprobs (token_id, logprob, [(id, logprob), ...] the k most likely), the
    logprobs under the model's own distribution (before penalties, the grammar mask,
    temperature, top-k and top-p). `mask`: the grammar's (ceil(vocab/32),) int32 bitmask."""
    logits = logits.float().reshape(-1)
    x = (logits if _plain(params, step, ctx, mask)
         else processed_logits(logits, params, step, ctx, mask))
    if params.greedy:
        tok = int(torch.argmax(x))
    else:
        if params.seed is None:
            raise ValueError("sample() needs a concrete seed: call params.with_seed() first")
        probs = torch.softmax(filtered_logits(x, params), dim=-1)
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(_step_seed(params.seed, step))
        tok = int(torch.multinomial(probs, 1, generator=gen))
    lsm = torch.log_softmax(logits, dim=-1)
    logprob = float(lsm[tok])
    if params.top_logprobs:
        v, i = torch.topk(lsm, min(params.top_logprobs, lsm.numel()))
        return tok, logprob, list(zip(i.tolist(), v.tolist()))
    return tok, logprob


def sample_rows(logits: torch.Tensor, items: Sequence[tuple],
                masks: Optional[Dict[int, torch.Tensor]] = None,
                bitmask: Optional[torch.Tensor] = None,
                greedy_kernel: Optional[bool] = None) -> List[tuple]:
    """`sample` for a batch of (vocab,) logits rows, (B, vocab), row j with items[j] =
    (params, step) or (params, step, SampleContext) and masks.get(j) its grammar bitmask: the
    same results as `sample` row by row, with one host round trip for the whole batch instead
    of two per row (the draws stay on the device until the end: greedy rows take one batched
    argmax, seeded rows their own generator). `bitmask`: optionally every row's mask at once,
    (B, ceil(vocab/32)) int32 with all bits set on unconstrained rows (masks[j] is then its row
    j): the masked rows are masked in one pass over the batch, with no index built on the host
    (building one from a host list is a blocking copy that waits for the step's forward, and the
    sampling's launches then run after the device is idle instead of beside it).
    greedy_kernel: a batch of plain greedy rows (no penalties, masks or top_logprobs) takes
    `kernels.greedy.greedy_pick` (two launches: the cast, the argmax, the log-softmax and the
    gather were ~50 us of device time a step); None: on CUDA."""
    return sample_rows_queued(logits, items, masks, bitmask, greedy_kernel)[0]()


def sample_rows_queued(logits: torch.Tensor, items: Sequence[tuple],
                       masks: Optional[Dict[int, torch.Tensor]] = None,
                       bitmask: Optional[torch.Tensor] = None,
                       greedy_kernel: Optional[bool] = None
                       ) -> Tuple[Callable[[], List[tuple]], Optional[torch.Tensor]]:
    """`sample_rows` with its device work queued and nothing waited for: (read, tokens).
    read() waits for the draws (their copy to the host was queued right after them, into
    pinned memory on CUDA, so it waits for this work only, not for anything queued later on
    the stream) and returns sample_rows' list; tokens: the drawn ids (B,) int64 on the device
    (None for no rows), for a next step queued before read() is called."""
    if not len(items):
        return (lambda: []), None
    if greedy_kernel is None:
        greedy_kernel = logits.is_cuda
    k = max(_spec(item)[0].top_logprobs for item in items)
    if greedy_kernel and not masks and not k and all(
            _plain(*_spec(item), None) and _spec(item)[0].greedy for item in items):
        from ringserve.kernels.greedy import greedy_pick
        toks, lps = greedy_pick(logits.reshape(len(items), -1))
        return _queued_read(torch.stack([toks.double(), lps.double()]), items, 0), toks
    masks = masks or {}
    raw = logits.float().reshape(len(items), -1)
    x = raw
    together = []    # rows whose grammar mask is applied in one batched op
    for j, item in enumerate(items):
        params, step, ctx = _spec(item)
        mask = masks.get(j)
        if _plain(params, step, ctx, mask):
            continue
        x = raw.clone() if x is raw else x
        if mask is not None and not (params.min_tokens and step < params.min_tokens):
            together.append(j)
            mask = None
        if not _plain(params, step, ctx, mask):
            x[j] = processed_logits(raw[j], params, step, ctx, mask)
    if together:
        from .structured import apply_bitmask
        if bitmask is not None:
            # rows that are not in `together` are unconstrained (all ones) or already masked
            # by processed_logits (min_tokens): masking them again changes nothing
            x = apply_bitmask(x, bitmask)
        else:
            idx = torch.tensor(together, dtype=torch.int64, device=x.device)
            x[idx] = apply_bitmask(x[idx], torch.stack([masks[j] for j in together]))
    toks = torch.argmax(x, dim=-1)
    for j, item in enumerate(items):
        params, step, _ = _spec(item)
        if params.greedy:
            continue
        if params.seed is None:
            raise ValueError("sample() needs a concrete seed: call params.with_seed() first")
        probs = torch.softmax(filtered_logits(x[j], params), dim=-1)
        gen = torch.Generator(device=x.device)
        gen.manual_seed(_step_seed(params.seed, step))
        toks[j] = torch.multinomial(probs, 1, generator=gen)[0]
    lsm = torch.log_softmax(raw, dim=-1)
    lps = lsm.gather(1, toks[:, None])[:, 0]
    rows = [toks.double(), lps.double()]
    if k:
        v, i = torch.topk(lsm, min(k, lsm.shape[1]), dim=-1)
        rows += [i.double().t(), v.double().t()]
    return _queued_read(torch.cat([r.reshape(-1, len(items)) for r in rows]), items, k), toks


def _queued_read(payload: torch.Tensor, items: Sequence[tuple],
                 k: int) -> Callable[[], List[tuple]]:
    """The host copy of a (2 + 2k, B) float64 payload queued now; what reads it into rows."""
    if payload.is_cuda:
        host = torch.empty(payload.shape, dtype=payload.dtype, pin_memory=True)
        host.copy_(payload, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    else:
        host, done = payload, None

    def read() -> List[tuple]:
        if done is not None:
            done.synchronize()
        got = host.tolist()
        out = []
        for j, item in enumerate(items):
            tok, lp = int(got[0][j]), float(got[1][j])
            kj = _spec(item)[0].top_logprobs
            if kj:
                out.append((tok, lp, [(int(got[2 + a][j]), float(got[2 + k + a][j]))
                                      for a in range(kj)]))
            else:
                out.append((tok, lp))
        return out
    return read


class Sampler:
    """A worker's sampler for a step's sampled rows. `start(specs)` at the beginning of the step
    computes the host work (the grammar masks) on a helper thread while the forward runs;
    `prepare(specs)` takes it, `sample(logits, specs, prepared)` applies it on the device.
    specs: each row's `SeqStep.sample`, (params, step) or (params, step, SampleContext)."""

    def __init__(self, tokenizer_source: Any, vocab_size: int):
        self.tokenizer_source = tokenizer_source
        self.vocab_size = vocab_size
        self._grammar = None
        self._pool = None
        self._pending = None

    def start(self, specs: Sequence[tuple]) -> None:
        """Begin `prepare(specs)` on a helper thread (called when the step begins, so the
        masks are computed while the forward is launched and run; llguidance computes them
        without the GIL); the next `prepare` takes its result."""
        self._wait()
        if not any(spec[0].grammar is not None for spec in specs):
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ringserve-masks")
        self._pending = self._pool.submit(self._prepare, list(specs))

    def drop_pending(self) -> None:
        """Forget what `start` began and no `prepare` took (a step that failed in between):
        the next `prepare` computes its own rows."""
        self._wait()

    def _wait(self):
        fut, self._pending = self._pending, None
        return None if fut is None else fut.result()

    def prepare(self, specs: Sequence[tuple]) -> Optional[Tuple[List[int], torch.Tensor]]:
        """The host work for these rows: what `start` began, else done now. (the constrained
        rows' indices, the host bitmask (len(specs), words) with all bits set on every other
        row), or None when no row is constrained."""
        if self._pending is not None:
            return self._wait()
        return self._prepare(specs)

    def _prepare(self, specs: Sequence[tuple]) -> Optional[Tuple[List[int], torch.Tensor]]:
        where, rows = [], []
        for j, spec in enumerate(specs):
            params, ctx = spec[0], (spec[2] if len(spec) > 2 else None)
            if params.grammar is not None:
                if ctx is None:
                    raise ValueError("a constrained row needs its SampleContext")
                where.append(j)
                rows.append((ctx.rid, params.grammar, ctx.out_tokens))
        if not rows:
            return None
        if self._grammar is None:
            from .structured import GrammarMasks
            self._grammar = GrammarMasks(self.tokenizer_source, self.vocab_size)
        # one mask row per sampled row: applied to the whole batch on the device at once
        return where, self._grammar.fill(rows, slots=where, n=len(specs))

    def sample(self, logits: torch.Tensor, specs: Sequence[tuple], prepared=None) -> List[tuple]:
        return self.sample_queued(logits, specs, prepared)[0]()

    def sample_queued(self, logits: torch.Tensor, specs: Sequence[tuple], prepared=None):
        """`sample` as `sample_rows_queued`: (read, the drawn ids on the device)."""
        if prepared is None:
            return sample_rows_queued(logits, specs)
        where, host = prepared
        dev = host.to(logits.device, non_blocking=True)
        return sample_rows_queued(logits, specs, {j: dev[j] for j in where}, bitmask=dev)


def expand_samples(params: SamplingParams) -> List[SamplingParams]:
    """The best_of (else n) one-sample parameters of a request with n > 1 or best_of: sample i
    draws from its own seed (derived from the request's); with best_of > n each sample keeps
    its logprobs, which `best_samples` ranks by."""
    k = params.best_of or params.n
    if k == 1:
        return [params]
    from dataclasses import replace
    base = params.with_seed()
    rank = params.best_of is not None and params.best_of > params.n
    return [replace(base, n=1, best_of=None, logprobs=base.logprobs or rank,
                    seed=base.seed if i == 0 else _step_seed(base.seed, -1 - i))
            for i in range(k)]


def best_samples(outputs: list, params: SamplingParams) -> list:
    """The n outputs to return: all of them in order, or with best_of > n the n with the
    highest sum of token logprobs (OpenAI's best_of), logprobs dropped when not asked for."""
    if not params.best_of or params.best_of == params.n:
        return list(outputs)
    ranked = sorted(outputs, key=lambda o: -sum(o.logprobs or ()))[:params.n]
    if not params.logprobs:
        from dataclasses import replace
        ranked = [replace(o, logprobs=None) for o in ranked]
    return ranked


class StopState:
    """Tracks the detokenized text of one request and decides when it stops.

    `decoder` turns tokens into text incrementally (`push(id) -> str`, `flush() -> str`, e.g.
    `tokenizer.IncrementalDecoder`). Stop strings are searched only where a new piece could
    complete one; the text is cut before the stop string. A tail that could still grow into a
    stop string is held back, so a stream never shows text that is later cut. Stop token ids and
    EOS end the request without adding their text.
    """

    def __init__(self, params: SamplingParams, decoder, eos_token_ids: Sequence[int] = ()):
        self.params = params
        self.decoder = decoder
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.text = ""
        self.emitted = 0
        self.finish_reason: Optional[str] = None
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    def update(self, token_id: int, num_generated: int) -> str:
        """Account for one new token (the num_generated-th); returns the text that may be shown
        now. Sets `finish_reason` ("stop" or "length") when the request is over."""
        if token_id in self.params.stop_token_ids or (
                not self.params.ignore_eos and token_id in self.eos_token_ids):
            self.finish_reason = "stop"
            return self._flush()
        start = max(0, len(self.text) - self._hold)
        self.text += self.decoder.push(token_id)
        if num_generated >= self.params.max_tokens:
            self.text += self.decoder.flush()
            self.finish_reason = "length"
        for s in self.params.stop:
            i = self.text.find(s, start)
            if i >= 0:
                self.text = self.text[:i]
                self.finish_reason = "stop"
        if self.finish_reason:
            return self._flush()
        safe = len(self.text) - self._hold
        if safe > self.emitted:
            delta, self.emitted = self.text[self.emitted:safe], safe
            return delta
        return ""

    def _flush(self) -> str:
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta


__all__ = ["SamplingParams", "SampleContext", "Sampler", "sample", "sample_rows",
           "sample_rows_queued", "expand_samples", "best_samples",
           "penalized_logits", "processed_logits", "filtered_logits", "StopState"]
