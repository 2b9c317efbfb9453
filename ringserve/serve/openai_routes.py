"""Handlers of the OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

Each handler takes the replica's Service and the request and returns a Response; the deployment
(app.py) maps exceptions to OpenAI error bodies and counts outcomes.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import Request
from fastapi.responses import Response

from ringserve.serve import openai_format as fmt
from ringserve.serve.bodies import parse_model, read_payload, respond, wants_msgpack
from ringserve.serve.errors import bad_request, client_text
from ringserve.serve.protocol import ChatCompletionRequest, CompletionRequest
from ringserve.serve.service import Service, is_final
from ringserve.serve.streaming import sse_response

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


def models(svc: Service) -> Dict[str, Any]:
    return {"object": "list", "data": [fmt.model_card(svc.model_name, svc.created)]}


def model(svc: Service, model_id: str) -> Dict[str, Any]:
    svc.check_model(model_id)
    return fmt.model_card(svc.model_name, svc.created)


async def completions(svc: Service, request: Request, endpoint: str) -> Response:
    t0 = time.perf_counter()
    data, _ = await read_payload(request, svc.body_limits)
    req = parse_model(CompletionRequest, data)
    req.check_supported()
    svc.check_model(req.model)
    svc.require_ready()
    prompts = req.prompts()
    if len(prompts) > svc.cfg.max_prompts:
        raise bad_request(f"{len(prompts)} prompts in one request; at most {svc.cfg.max_prompts} "
                          "(max_prompts)", param="prompt", code="too_many_prompts")
    for p in prompts:  # before any tokenizing: texts that can not fit are refused at once
        if isinstance(p, str):
            svc.check_fits([p])
    # tokenized here, in a worker thread, rather than inside the engine's slot
    prompts = [await svc.encode(p) if isinstance(p, str) else p for p in prompts]
    want_lp = req.logprobs is not None
    params = svc.sampling_params(**req.sampling_kwargs(COMPLETIONS_DEFAULT_MAX_TOKENS, want_lp))
    deadline = svc.deadline()
    rid, created = fmt.new_id("cmpl"), fmt.now()

    if req.stream:
        async def chunks() -> AsyncIterator[bytes]:
            total: Dict[str, Any] = {}
            for index, prompt in enumerate(prompts):
                offset = 0
                async for item in svc.stream(endpoint, prompt, params, deadline, t0):
                    if is_final(item):
                        total = fmt.add_usage(total, _usage(item))
                        yield fmt.sse(fmt.completion_chunk(rid, svc.model_name, created, index,
                                                           "", item.finish_reason))
                        continue
                    lp = None
                    if want_lp:
                        lp = fmt.completion_logprobs([item.token_id], [item.logprob],
                                                     svc.piece, offset)
                    offset += len(item.text)
                    yield fmt.sse(fmt.completion_chunk(
                        rid, svc.model_name, created, index, item.text, None, lp,
                        [item.token_id] if req.return_token_ids else None))
            if req.include_usage:
                yield fmt.sse(fmt.usage_chunk(rid, "text_completion", svc.model_name, created,
                                              total))
            yield fmt.DONE

        return await sse_response(chunks(), lambda o: svc.metrics.request(endpoint, o),
                                  svc.cfg.sse_keepalive_s)

    choices: List[Dict[str, Any]] = []
    total: Dict[str, Any] = {}
    for index, prompt in enumerate(prompts):
        out = await svc.generate(endpoint, prompt, params, deadline, t0)
        lp = (fmt.completion_logprobs(out.token_ids, out.logprobs, svc.piece)
              if want_lp else None)
        choices.append(fmt.completion_choice(index, out.text, out.finish_reason, lp,
                                             _ids(out) if req.return_token_ids else None))
        total = fmt.add_usage(total, _usage(out))
    body = fmt.completion(rid, svc.model_name, created, choices, total)
    return respond(body, wants_msgpack(request))


async def chat_completions(svc: Service, request: Request, endpoint: str) -> Response:
    t0 = time.perf_counter()
    data, _ = await read_payload(request, svc.body_limits)
    req = parse_model(ChatCompletionRequest, data)
    req.check_supported()
    svc.check_model(req.model)
    llm = svc.require_ready()
    messages = req.template_messages()
    svc.check_fits([m["content"] for m in messages], param="messages")
    try:
        prompt = await svc.runner.run_free(
            lambda: llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except Exception as exc:  # noqa: BLE001 - a template that rejects the messages
        raise bad_request("the chat template could not render these messages: "
                          + client_text(str(exc)), param="messages") from None
    prompt = await svc.encode(prompt)  # in a worker thread, not inside the engine's slot
    params = svc.sampling_params(**req.sampling_kwargs(svc.cfg.default_max_tokens, req.logprobs))
    deadline = svc.deadline()
    rid, created = fmt.new_id("chatcmpl"), fmt.now()

    if req.stream:
        async def chunks() -> AsyncIterator[bytes]:
            started = False
            async for item in svc.stream(endpoint, prompt, params, deadline, t0):
                if not started:  # OpenAI's first chunk announces the role
                    started = True
                    yield fmt.sse(fmt.chat_chunk(rid, svc.model_name, created, 0,
                                                 {"role": "assistant", "content": ""}))
                if is_final(item):
                    yield fmt.sse(fmt.chat_chunk(rid, svc.model_name, created, 0, {},
                                                 item.finish_reason))
                    if req.include_usage:
                        yield fmt.sse(fmt.usage_chunk(rid, "chat.completion.chunk",
                                                      svc.model_name, created, _usage(item)))
                    continue
                lp = (fmt.chat_logprobs([item.token_id], [item.logprob], svc.piece)
                      if req.logprobs else None)
                yield fmt.sse(fmt.chat_chunk(rid, svc.model_name, created, 0,
                                             {"content": item.text}, None, lp,
                                             [item.token_id] if req.return_token_ids else None))
            yield fmt.DONE

        return await sse_response(chunks(), lambda o: svc.metrics.request(endpoint, o),
                                  svc.cfg.sse_keepalive_s)

    out = await svc.generate(endpoint, prompt, params, deadline, t0)
    lp = fmt.chat_logprobs(out.token_ids, out.logprobs, svc.piece) if req.logprobs else None
    choice = fmt.chat_choice(0, out.text, out.finish_reason, lp,
                             _ids(out) if req.return_token_ids else None)
    body = fmt.chat_completion(rid, svc.model_name, created, [choice], _usage(out))
    return respond(body, wants_msgpack(request))


def _ids(out) -> List[int]:
    return [int(t) for t in out.token_ids]


def _usage(out) -> Dict[str, Any]:
    cached: Optional[int] = getattr(out, "num_cached_tokens", 0)
    return fmt.usage(len(out.prompt_token_ids), len(out.token_ids), int(cached or 0))


__all__ = ["models", "model", "completions", "chat_completions"]
