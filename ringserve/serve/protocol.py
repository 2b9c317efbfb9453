"""Request bodies (pydantic, at the HTTP edge only) and their translation to SamplingParams.

OpenAI's parameters that the engine can not honour (tools, suffix, audio, ...) are refused with a
400 naming the parameter rather than silently ignored; unknown extra fields are ignored, as
OpenAI-compatible servers commonly do. Supported: n (and best_of on completions), penalties
(presence, frequency in [-2, 2]), logit_bias (token id -> [-100, 100]), logprobs/top_logprobs,
echo (completions), response_format (text, json_object, json_schema; on completions too).
Extensions (vLLM's names): top_k, ignore_eos, min_tokens, repetition_penalty (> 0),
stop_token_ids, guided_json, guided_regex, guided_choice, guided_grammar (Lark), and
return_token_ids (each choice then carries the generated token ids).

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
    n: StrictInt = Field(default=1, ge=1, le=128)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    logit_bias: Optional[Dict[str, float]] = None
    min_tokens: StrictInt = Field(default=0, ge=0)
    response_format: Optional[Dict[str, Any]] = None
    guided_json: Optional[Union[Dict[str, Any], str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[List[str]] = None
    guided_grammar: Optional[str] = None
    return_token_ids: StrictBool = False
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(v)}")
        return v

    def check_supported(self) -> None:
        for t, v in (self.logit_bias or {}).items():
            if not t.strip().isdigit():
                raise bad_request(f"logit_bias keys are token ids, got {t!r}", param="logit_bias")
            if not -100 <= v <= 100:
                raise bad_request(f"logit_bias value for token {t} ({v}) must be in [-100, 100]",
                                  param="logit_bias")
        if self.top_k is not None and not (self.top_k == -1 or self.top_k >= 1):
            raise bad_request(f"top_k ({self.top_k}) must be -1 (off) or >= 1", param="top_k")

    def sampling_kwargs(self, default_max_tokens: int, logprobs: bool,
                        top_logprobs: int = 0) -> Dict[str, Any]:
        from ringserve.structured import response_format_schema
        stop = self.stop
        stop = () if stop is None else ((stop,) if isinstance(stop, str) else tuple(stop))
        try:
            schema = response_format_schema(self.response_format)
        except ValueError as e:
            raise bad_request(str(e), param="response_format") from None
        if schema is not None and self.guided_json is not None:
            raise bad_request("give response_format or guided_json, not both",
                              param="response_format")
        return dict(max_tokens=self.max_tokens or default_max_tokens,
                    temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p,
                    top_k=-1 if self.top_k is None else self.top_k,
                    seed=self.seed, stop=tuple(s for s in stop if s),
                    stop_token_ids=tuple(self.stop_token_ids or ()), logprobs=logprobs,
                    ignore_eos=self.ignore_eos, top_logprobs=top_logprobs, n=self.n,
                    presence_penalty=self.presence_penalty or 0.0,
                    frequency_penalty=self.frequency_penalty or 0.0,
                    repetition_penalty=(1.0 if self.repetition_penalty is None
                                        else self.repetition_penalty),
                    logit_bias=self.logit_bias, min_tokens=self.min_tokens,
                    guided_json=schema if schema is not None else self.guided_json,
                    guided_regex=self.guided_regex, guided_choice=self.guided_choice,
                    guided_grammar=self.guided_grammar)

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
        if self.best_of is not None and not self.n <= self.best_of <= 128:
            raise bad_request(f"best_of ({self.best_of}) must be in [n ({self.n}), 128]",
                              param="best_of")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise bad_request("best_of > n can not be streamed (the best are known at the end)",
                              param="best_of")
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix")

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

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tools:
            raise bad_request("tools are not supported", param="tools")
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

    def check_supported(self) -> None:
        super().check_supported()
        if self.n != 1:   # one answer per question; ask the question n times for more
            raise bad_request(f"n ({self.n}) must be 1 on a document question", param="n")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the model's template."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: Optional[StrictBool] = None
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    tokens: List[StrictInt]


__all__ = ["CompletionRequest", "TokenizeRequest", "DetokenizeRequest", "ChatCompletionRequest", "ChatMessage", "DocumentCreate",
           "AskRequest", "StreamOptions"]
