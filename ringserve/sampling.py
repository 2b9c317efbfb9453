"""Sampling parameters, the token sampler, and stop-string handling on detokenized text.

The sampler is a pure function of (logits, params, step): its random draw comes from a generator
seeded with (seed, step), so a request is reproducible whatever rank or device samples it and no
generator state has to live between decode steps.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

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


def sample(logits: torch.Tensor, params: SamplingParams, step: int) -> Tuple[int, float]:
    """Pick the next token from a (vocab,) logits row. Returns (token_id, logprob) where logprob
    is log p(token) under the model's own distribution (before temperature/top-k/top-p)."""
    logits = logits.float().reshape(-1)
    if params.greedy:
        tok = int(torch.argmax(logits))
    else:
        if params.seed is None:
            raise ValueError("sample() needs a concrete seed: call params.with_seed() first")
        probs = torch.softmax(filtered_logits(logits, params), dim=-1)
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(_step_seed(params.seed, step))
        tok = int(torch.multinomial(probs, 1, generator=gen))
    logprob = float(torch.log_softmax(logits, dim=-1)[tok])
    return tok, logprob


def sample_rows(logits: torch.Tensor, items: Sequence[Tuple[SamplingParams, int]]
                ) -> List[Tuple[int, float]]:
    """`sample` for a batch of (vocab,) logits rows, (B, vocab), row j with items[j] =
    (params, step): the same tokens and logprobs as `sample` row by row, with one host round
    trip for the whole batch instead of two per row (the draws stay on the device until the
    end: greedy rows take one batched argmax, seeded rows their own generator)."""
    if not len(items):
        return []
    x = logits.float().reshape(len(items), -1)
    toks = torch.argmax(x, dim=-1)
    for j, (params, step) in enumerate(items):
        if params.greedy:
            continue
        if params.seed is None:
            raise ValueError("sample() needs a concrete seed: call params.with_seed() first")
        probs = torch.softmax(filtered_logits(x[j], params), dim=-1)
        gen = torch.Generator(device=x.device)
        gen.manual_seed(_step_seed(params.seed, step))
        toks[j] = torch.multinomial(probs, 1, generator=gen)[0]
    lps = torch.log_softmax(x, dim=-1).gather(1, toks[:, None])[:, 0]
    both = torch.stack([toks.double(), lps.double()]).cpu().tolist()
    return [(int(t), float(lp)) for t, lp in zip(both[0], both[1])]


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


__all__ = ["SamplingParams", "sample", "filtered_logits", "StopState"]
