"""Request bodies (pydantic, at the HTTP edge only) and their translation to SamplingParams.

OpenAI's parameters that the engine can not honour (n > 1, penalties, logit_bias, echo, tools)
are refused with a 400 naming the parameter rather than silently ignored; unknown extra fields
are ignored, as OpenAI-compatible servers commonly do. Extensions: top_k, ignore_eos,
stop_token_ids, return_token_ids (each choice then carries the generated token ids).

Integers and booleans are strict: `true` is no token id and no max_tokens, "yes" is no boolean,
and a JSON string is never read as raw token bytes (pydantic's lax mode would take all three).
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictBytes, StrictInt,
                      field_validator)

from ringserve.serve.errors import bad_request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[StrictInt]] = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = 1
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    return_token_ids: StrictBool = False
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(v)}")
        return v

    def check_supported(self) -> None:
        if self.n != 1:
            raise bad_request(f"n ({self.n}) must be 1: one choice per request", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v not in (None, 0, 0.0):
                raise bad_request(f"{name} ({v}) is not supported; leave it out or 0", param=name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")
        if self.top_k is not None and not (self.top_k == -1 or self.top_k >= 1):
            raise bad_request(f"top_k ({self.top_k}) must be -1 (off) or >= 1", param="top_k")

    def sampling_kwargs(self, default_max_tokens: int, logprobs: bool) -> Dict[str, Any]:
        stop = self.stop
        stop = () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
        return dict(max_tokens=self.max_tokens or default_max_tokens,
                    temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p,
                    top_k=-1 if self.top_k is None else self.top_k,
                    seed=self.seed, stop=tuple(s for s in stop if s),
                    stop_token_ids=tuple(self.stop_token_ids or ()), logprobs=logprobs,
                    ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = Union[str, List[str], List[StrictInt], List[List[StrictInt]]]
MAX_TOKEN_ID = 1 << 31


class CompletionRequest(_Sampling):
    model: str
    prompt: Prompt
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=5)
    echo: StrictBool = False
    best_of: Optional[StrictInt] = None
    suffix: Optional[str] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of ({self.best_of}) must be 1", param="best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if self.logprobs is not None and self.logprobs > 1:
            raise bad_request(f"logprobs ({self.logprobs}): only the sampled token's logprob is "
                              "available (0 or 1)", param="logprobs")

    def prompts(self) -> List[Union[str, List[int]]]:
        """The prompt as a list of prompts (text or token ids); OpenAI's four accepted forms."""
        p = self.prompt
        if isinstance(p, str):
            out = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = list(p)
        if not out or any(len(x) == 0 for x in out):
            raise bad_request("prompt must not be empty", param="prompt")
        for x in out:
            # the engine checks ids against the model's vocabulary; this keeps absurd integers
            # (negative, beyond int32) from reaching it at all
            bad = [] if isinstance(x, str) else [t for t in x if t < 0 or t >= MAX_TOKEN_ID]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside [0, {MAX_TOKEN_ID})",
                                  param="prompt")
        return out


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[ContentPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise bad_request(f"content part type {part.type!r} is not supported (text only)",
                                  param="messages")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    model: str
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)
    tools: Optional[List[Any]] = None
    response_format: Optional[Dict[str, Any]] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs:
            raise bad_request("top_logprobs is not supported (only the sampled token's logprob)",
                              param="top_logprobs")
        if self.tools:
            raise bad_request("tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("response_format must be text", param="response_format")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens

    def template_messages(self) -> List[Dict[str, str]]:
        # "developer" is OpenAI's newer name for "system"; chat templates know "system"
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class DocumentCreate(BaseModel):
    """JSON or msgpack: a text, or token ids (a list of ints, or in msgpack also the bytes of a
    little-endian uint32 array, the compact form for millions of tokens)."""
    model_config = ConfigDict(extra="ignore")
    text: Optional[str] = None
    token_ids: Optional[Union[List[StrictInt], StrictBytes]] = None
    name: Optional[str] = Field(default=None, max_length=512)
    model: Optional[str] = None
    # false: answer 202 at once (status "prefilling") and prefill in the background; for
    # documents whose prefill outlasts HTTP timeouts. GET the document to see its status.
    wait: StrictBool = True
    # how questions are put to it (doc_prompts.py): "plain" text, or the model's chat template
    prompt_format: Literal["plain", "chat"] = "plain"
    system: Optional[str] = None  # chat format only: a system turn before the document


class AskRequest(_Sampling):
    question: str = Field(min_length=1)
    model: Optional[str] = None
    logprobs: StrictBool = False


__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "DocumentCreate",
           "AskRequest", "StreamOptions"]
