"""Structured output: the grammar a request's output must follow, and its token masks.

A request asks for JSON matching a schema, any JSON object, text matching a regex, one of a
list of strings, or a Lark grammar (`SamplingParams.guided_*`). `grammar_for` turns that into
one llguidance grammar string, checked when the request is made (an invalid schema or regex is
the caller's error, reported with llguidance's message). The grammar string travels with the
request's sampling parameters to whichever rank samples it.

`GrammarMasks` lives on a worker, beside the sampler: per request it keeps an llguidance
matcher that has consumed the request's output so far, advances it by the tokens it has not
seen (the plan carries the output; a matcher that does not hold a prefix of it, after a
preemption, a fault or another rank sampling the previous token, is rebuilt by consuming the
whole output), and writes the next-token bitmask of every constrained row into one pinned host
buffer. The worker fills it after the step's forward has been queued on the device (the host is
idle until the logits are ready) and applies it on the device before sampling.

Why llguidance (not xgrammar): no per-grammar compile step (a schema arrives with its request,
and a compile on a worker would stall every request of that step; llguidance builds its lexer
lazily: 15-50 us per row's mask measured on a trained 128K-token BPE, bench_structured.py),
masks computed with the GIL released over a thread pool (`LLExecutor`), errors in a schema or
regex come back as messages without building anything, and the wheel depends on nothing
(xgrammar's requires torch, transformers and more, which it would resolve beside ours).
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)
MAX_MATCHERS = 1024     # per worker: requests that sampled here recently
# threads computing one step's masks (RINGSERVE_MASK_THREADS overrides): llguidance's default
# is 80% of the CPUs the machine shows, up to 32, which inside a container with a CPU quota
# below that (a GPU pod's 16 cores on a larger host) oversubscribes the quota beside the
# worker's own threads
MAX_MASK_THREADS = 8


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, bounded by a cgroup v2 or v1 CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = n or 1
    v2 = _read("/sys/fs/cgroup/cpu.max")                       # "max 100000" or "400000 100000"
    if v2:
        quota, _, period = v2.partition(" ")
    else:
        quota = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") or "-1"
        period = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us") or "0"
    try:
        if quota not in ("max", "-1") and int(period) > 0:
            n = min(n, max(1, int(quota) // int(period)))
    except ValueError:
        pass
    return n


def mask_threads() -> int:
    env = os.environ.get("RINGSERVE_MASK_THREADS")
    if env:
        n = int(env) if env.strip().isdigit() else 0
        if n < 1:
            raise ValueError(f"RINGSERVE_MASK_THREADS must be a positive integer, got {env!r}")
        return n
    # leave a CPU to the worker's main thread (it launches the step meanwhile)
    return max(1, min(MAX_MASK_THREADS, usable_cpus() - 1))


def _llg():
    import llguidance
    import llguidance.torch  # noqa: F401 - the bitmask helpers
    return llguidance


def grammar_for(guided_json: Any = None, guided_regex: Optional[str] = None,
                guided_choice: Optional[Sequence[str]] = None,
                guided_grammar: Optional[str] = None) -> Optional[str]:
    """The llguidance grammar for at most one constraint, or None; ValueError naming the
    problem for an invalid schema, regex, choice list or grammar."""
    given = [n for n, v in (("guided_json", guided_json), ("guided_regex", guided_regex),
                            ("guided_choice", guided_choice), ("guided_grammar", guided_grammar))
             if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"at most one of guided_json, guided_regex, guided_choice and "
                         f"guided_grammar may be given, got {', '.join(given)}")
    M = _llg().LLMatcher
    if guided_json is not None:
        schema = guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        try:
            g = M.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid JSON schema: {e}") from None
        what = "JSON schema"
    elif guided_regex is not None:
        if not isinstance(guided_regex, str) or not guided_regex:
            raise ValueError("guided_regex must be a non-empty string")
        g, what = M.grammar_from_regex(guided_regex), "regex"
    elif guided_choice is not None:
        choices = list(guided_choice) if not isinstance(guided_choice, str) else None
        if not choices or any(not isinstance(c, str) or not c for c in choices):
            raise ValueError("guided_choice must be a non-empty list of non-empty strings")
        alts = " | ".join(json.dumps(c) for c in choices)
        g, what = M.grammar_from_lark(f"start: {alts}"), "choice list"
    else:
        if not isinstance(guided_grammar, str) or not guided_grammar.strip():
            raise ValueError("guided_grammar must be a non-empty Lark grammar")
        g, what = M.grammar_from_lark(guided_grammar), "grammar"
    err = M.validate_grammar(g)
    if err:
        raise ValueError(f"invalid {what}: {err.strip()}")
    return g


def response_format_schema(fmt: Optional[Dict[str, Any]]) -> Any:
    """OpenAI's response_format -> the guided_json value (None for plain text); ValueError for a
    malformed one."""
    if not fmt:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise ValueError("response_format json_schema needs json_schema.schema (the schema)")
        return js["schema"]
    raise ValueError(f"response_format type must be text, json_object or json_schema, got "
                     f"{kind!r}")


def tokenizer_json(source: Any) -> Optional[Tuple[str, List[int]]]:
    """(tokenizer.json text, EOS ids) of a model source (a checkpoint directory or .gguf file,
    or a random-weights spec {"config", "seed", "tokenizer": dir}); None when it has none."""
    from .tokenizer import Tokenizer
    path = source.get("tokenizer") if isinstance(source, dict) else source
    if path is None:
        return None
    tok = Tokenizer.from_dir(path)
    return _metaspace_as_replace(tok._tok.to_str()), tok.eos_token_ids


def _metaspace_as_replace(text: str) -> str:
    """SentencePiece-style tokenizers write spaces as "▁" and (Mistral's, ours from GGUF) may
    decode them with a Metaspace decoder, which llguidance reads as the three bytes of "▁":
    every space would then be refused by a grammar. Its equivalent for single tokens, Llama 2's
    Replace("▁", " "), llguidance reads right."""
    spec = json.loads(text)
    dec = spec.get("decoder") or {}
    parts = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    meta = [d for d in parts if isinstance(d, dict) and d.get("type") == "Metaspace"]
    if not meta:
        return text
    rep = meta[0].get("replacement", "\u2581")
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": rep}, "content": " "}]
        + [d for d in parts if d not in meta]}
    return json.dumps(spec)


class GrammarMasks:
    """Per-worker grammar state: matchers by request, and the bitmask of a batch of rows."""

    def __init__(self, tokenizer_source: Any, vocab_size: int):
        self.source = tokenizer_source
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._tok = None
        self._executor = None
        self._matchers: "OrderedDict[int, Tuple[Any, List[int]]]" = OrderedDict()
        self._buf: Optional[torch.Tensor] = None

    def _tokenizer(self):
        if self._tok is None:
            llg = _llg()
            got = tokenizer_json(self.source)
            if got is None:
                raise ValueError("structured output needs the model's tokenizer")
            text, eos = got
            self._tok = llg.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=list(eos))
        return self._tok

    def matcher(self, rid: int, grammar: str, out_tokens: Sequence[int]):
        """A matcher for request rid that has consumed exactly out_tokens."""
        got = self._matchers.get(rid)
        if got is not None:
            m, seen = got
            n = len(seen)
            if n <= len(out_tokens) and list(out_tokens[:n]) == seen and not m.is_error():
                new = list(out_tokens[n:])
                if new:
                    m.consume_tokens(new)
                    seen.extend(new)
                self._matchers.move_to_end(rid)
                return m
        m = _llg().LLMatcher(self._tokenizer(), grammar, log_level=0)
        if out_tokens:
            m.consume_tokens(list(out_tokens))
        self._matchers[rid] = (m, list(out_tokens))
        while len(self._matchers) > MAX_MATCHERS:
            self._matchers.popitem(last=False)
        return m

    def fill(self, rows: List[Tuple[int, str, Sequence[int]]],
             slots: Optional[Sequence[int]] = None,
             n: Optional[int] = None) -> Optional[torch.Tensor]:
        """Bitmasks (n, words) int32 on the host (pinned on CUDA hosts) for rows given as
        (rid, grammar, output so far), row i written at slots[i] (default: i; n defaults to
        len(rows)); every other row, and a row whose matcher is in error, gets all ones (no
        constraint rather than no token)."""
        if not rows:
            return None
        llg = _llg()
        slots = list(range(len(rows))) if slots is None else list(slots)
        n = len(rows) if n is None else n
        if len(slots) != len(rows) or (slots and not 0 <= min(slots) <= max(slots) < n):
            raise ValueError(f"fill: {len(rows)} rows need as many slots within 0..{n - 1}")
        if self._buf is None or self._buf.shape[0] < n:
            size = max(n, 2 * (0 if self._buf is None else self._buf.shape[0]))
            # a normal tensor, wherever it is first made: the worker's thread fills it inside
            # inference mode (graph steps), the sampler's helper thread outside it (eager
            # steps), and an inference tensor may not be updated in place outside the mode
            # (a batch-1 masked request after graph steps failed its step on the H200)
            with torch.inference_mode(False):
                self._buf = torch.empty((size, self.words), dtype=torch.int32,
                                        pin_memory=torch.cuda.is_available())
        buf = self._buf[:n]
        buf.fill_(-1)
        ms = []
        for i, (rid, grammar, out) in zip(slots, rows):
            try:
                m = self.matcher(rid, grammar, out)
            except Exception:  # noqa: BLE001 - one request's grammar must not fail the step
                log.exception("grammar matcher for request %s failed; row unconstrained", rid)
                continue
            if m.is_error():
                log.warning("grammar matcher for request %s: %s; row unconstrained", rid,
                            m.get_error())
            else:
                ms.append((m, i))
        if len(ms) == 1:
            llg.torch.fill_next_token_bitmask(ms[0][0], buf, ms[0][1])
        elif ms:
            if self._executor is None:
                self._executor = llg.LLExecutor(num_threads=mask_threads())
            llg.torch.fill_next_token_bitmask_par(self._executor, ms, buf)
        return buf


_BITS: Dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits (R, V) with tokens whose bit is 0 in bitmask (R, ceil(V/32)) int32 set to -inf,
    on logits' device (a few small kernels for the whole batch)."""
    R, V = logits.shape
    bits = _BITS.get(logits.device)
    if bits is None:
        bits = _BITS[logits.device] = 1 << torch.arange(32, device=logits.device,
                                                        dtype=torch.int32)
    m = bitmask.to(logits.device, non_blocking=True)
    allowed = (m[:, :, None] & bits).reshape(R, -1)[:, :V] != 0
    return torch.where(allowed, logits, float("-inf"))


__all__ = ["grammar_for", "response_format_schema", "GrammarMasks", "apply_bitmask",
           "tokenizer_json"]
