"""OpenAI's response and stream-chunk shapes (completions, chat) and server-sent events.

Pure functions from the engine's outputs to dicts; no I/O. The shapes follow the OpenAI API
reference (`text_completion`, `chat.completion`, `chat.completion.chunk`), and usage reports
document-cache hits the way OpenAI reports prompt caching:
usage.prompt_tokens_details.cached_tokens.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(payload: Dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def add_usage(total: Dict[str, Any], u: Dict[str, Any]) -> Dict[str, Any]:
    if not total:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in u.items()}
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        total[k] += u[k]
    total["prompt_tokens_details"]["cached_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
    return total


Top = Optional[Sequence[Optional[Sequence[Tuple[int, float]]]]]


def completion_logprobs(token_ids: Sequence[int], logprobs: Optional[Sequence[Optional[float]]],
                        piece: Callable[[int], str], offset: int = 0,
                        top: Top = None) -> Optional[Dict[str, Any]]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs (per token a dict
    token text -> logprob of the k most likely, or null: no alternatives, e.g. echoed prompt
    tokens), text_offset."""
    if logprobs is None:
        return None
    tokens, offsets, pos = [], [], offset
    for t in token_ids:
        s = piece(t)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    tops = None
    if top is not None:
        tops = [None if alts is None else {piece(a): lp for a, lp in alts} for alts in top]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops,
            "text_offset": offsets}


def _entry(piece: Callable[[int], str], t: int, lp: float) -> Dict[str, Any]:
    s = piece(t)
    return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}


def chat_logprobs(token_ids: Sequence[int], logprobs: Optional[Sequence[float]],
                  piece: Callable[[int], str], top: Top = None) -> Optional[Dict[str, Any]]:
    """Chat's shape: content, one entry per token with its top_logprobs (the k most likely,
    most likely first; [] when top_logprobs was not asked for)."""
    if logprobs is None:
        return None
    content = []
    for i, (t, lp) in enumerate(zip(token_ids, logprobs)):
        e = _entry(piece, t, lp)
        alts = top[i] if top is not None else None
        e["top_logprobs"] = [_entry(piece, a, v) for a, v in alts or ()]
        content.append(e)
    return {"content": content}


def completion_choice(index: int, text: str, finish_reason: Optional[str],
                      logprobs: Optional[Dict[str, Any]] = None,
                      token_ids: Optional[List[int]] = None) -> Dict[str, Any]:
    c = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        c["token_ids"] = token_ids
    return c


def completion(rid: str, model: str, created: int, choices: List[Dict[str, Any]],
               use: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use, "system_fingerprint": None}


def chat_choice(index: int, text: str, finish_reason: Optional[str],
                logprobs: Optional[Dict[str, Any]] = None,
                token_ids: Optional[List[int]] = None) -> Dict[str, Any]:
    c = {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
         "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        c["token_ids"] = token_ids
    return c


def chat_completion(rid: str, model: str, created: int, choices: List[Dict[str, Any]],
                    use: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": use, "system_fingerprint": None}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish_reason: Optional[str] = None,
                     logprobs: Optional[Dict[str, Any]] = None,
                     token_ids: Optional[List[int]] = None) -> Dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [completion_choice(index, text, finish_reason, logprobs, token_ids)]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: Dict[str, Any],
               finish_reason: Optional[str] = None, logprobs: Optional[Dict[str, Any]] = None,
               token_ids: Optional[List[int]] = None) -> Dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs,
              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice], "system_fingerprint": None}


def usage_chunk(rid: str, obj: str, model: str, created: int, use: Dict[str, Any]
                ) -> Dict[str, Any]:
    """The last chunk when stream_options.include_usage: no choices, only usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": use}


def error_event(body: Dict[str, Any]) -> bytes:
    """An error after the stream started (status 200 already sent): OpenAI's clients raise on a
    `data:` event whose object has an "error" key."""
    return sse(body)


def model_card(name: str, created: int) -> Dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "ringserve"}


__all__ = ["DONE", "new_id", "now", "sse", "usage", "add_usage", "completion_logprobs",
           "chat_logprobs", "completion_choice", "completion", "chat_choice", "chat_completion",
           "completion_chunk", "chat_chunk", "usage_chunk", "error_event", "model_card"]
