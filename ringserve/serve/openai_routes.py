"""Handlers of the OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models,
and vLLM's /tokenize and /detokenize.

Each handler takes the replica's Service and the request and returns a Response; the deployment
(app.py) maps exceptions to OpenAI error bodies and counts outcomes.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from fastapi import Request
from fastapi.responses import Response

from ringserve.serve import openai_format as fmt
from ringserve.serve.bodies import parse_model, read_payload, respond, wants_msgpack
from ringserve.serve.errors import bad_request, client_text
from ringserve.sampling import best_samples, expand_samples
from ringserve.serve.protocol import (ChatCompletionRequest, CompletionRequest,
                                      DetokenizeRequest, TokenizeRequest)
from ringserve.serve.service import Service, is_final
from ringserve.serve.streaming import sse_response

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


def models(svc: Service) -> Dict[str, Any]:
    return {"object": "list", "data": [fmt.model_card(svc.model_name, svc.created)]}


def model(svc: Service, model_id: str) -> Dict[str, Any]:
    svc.check_model(model_id)
    return fmt.model_card(svc.model_name, svc.created)


async def _merged(streams: List[AsyncIterator[Any]]) -> AsyncIterator[Tuple[int, Any]]:
    """(index, item) from several streams as they come (n > 1 choices decode together)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(j: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                await q.put((j, item))
            await q.put((j, end))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await q.put((j, exc))

    tasks = [asyncio.create_task(pump(j, it)) for j, it in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            j, item = await q.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield j, item
    finally:
        for t in tasks:
            t.cancel()


def _expand(svc: Service, params) -> List[Any]:
    """Each sample's parameters; more samples than the replica takes in flight is a 400."""
    each = expand_samples(params)
    room = svc.cfg.max_num_seqs + svc.cfg.max_queue
    if len(each) > room:
        raise bad_request(f"{len(each)} samples (n / best_of) in one request; this server takes "
                          f"at most {room} requests in flight (max_num_seqs + max_queue)",
                          param="best_of" if params.best_of else "n")
    return each


async def _samples(svc: Service, endpoint: str, prompt, params, each, deadline, t0
                   ) -> List[Any]:
    """The n (best of best_of) final outputs of one prompt; the samples share its prefill.
    One failing sample cancels the others."""
    tasks = [asyncio.ensure_future(svc.generate(endpoint, prompt, p, deadline, t0))
             for p in each]
    try:
        outs = await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
    return best_samples(list(outs), params)


async def _echo(svc: Service, ids: List[int], text: Optional[str], want_lp: bool,
                deadline) -> Tuple[str, Optional[List[Optional[float]]]]:
    """The prompt's text, and with logprobs its tokens' log-probs (the score path; the first
    token has none)."""
    llm = svc.require_ready()
    if text is None:
        text = await svc.runner.run_free(lambda: llm.tokenizer.decode(ids))
    if not want_lp:
        return text, None
    scored = await svc.runner.call(lambda: llm.score([ids])[0], deadline,
                                   "the echoed prompt's logprobs")
    return text, list(scored.logprobs)


def _completion_lp(svc, ids, lps, top, k, echo, offset=0):
    if echo is not None and echo[1] is not None:
        p_ids, p_lps = echo
        ids, lps = list(p_ids) + list(ids), list(p_lps) + list(lps)
        top = [None] * len(p_ids) + list(top or [[]] * (len(ids) - len(p_ids)))
    return fmt.completion_logprobs(ids, lps, svc.piece, offset, top if k else None)


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
    texts = [p if isinstance(p, str) else None for p in prompts]
    # tokenized here, in a worker thread, rather than inside the engine's slot
    prompts = [await svc.encode(p) if isinstance(p, str) else p for p in prompts]
    want_lp = req.logprobs is not None
    k = req.logprobs or 0
    params = svc.sampling_params(best_of=req.best_of, **req.sampling_kwargs(
        COMPLETIONS_DEFAULT_MAX_TOKENS, want_lp, k))
    n, each = params.n, _expand(svc, params)
    deadline = svc.deadline()
    rid, created = fmt.new_id("cmpl"), fmt.now()

    if req.stream:
        async def chunks() -> AsyncIterator[bytes]:
            total: Dict[str, Any] = {}
            for pi, prompt in enumerate(prompts):
                offsets = [0] * n
                if req.echo:
                    text, p_lps = await _echo(svc, prompt, texts[pi], want_lp, deadline)
                    for j in range(n):
                        lp = (_completion_lp(svc, [], [], [], k, (prompt, p_lps))
                              if want_lp else None)
                        offsets[j] = len(text)
                        yield fmt.sse(fmt.completion_chunk(rid, svc.model_name, created,
                                                           pi * n + j, text, None, lp))
                finals = []
                streams = [svc.stream(endpoint, prompt, p, deadline, t0)
                           for p in each]
                async for j, item in _merged(streams):
                    index = pi * n + j
                    if is_final(item):
                        finals.append(item)
                        yield fmt.sse(fmt.completion_chunk(rid, svc.model_name, created, index,
                                                           "", item.finish_reason))
                        continue
                    lp = None
                    if want_lp:
                        lp = fmt.completion_logprobs(
                            [item.token_id], [item.logprob], svc.piece, offsets[j],
                            [item.top_logprobs] if k else None)
                    offsets[j] += len(item.text)
                    yield fmt.sse(fmt.completion_chunk(
                        rid, svc.model_name, created, index, item.text, None, lp,
                        [item.token_id] if req.return_token_ids else None))
                total = fmt.add_usage(total, _usage_n(finals))
            if req.include_usage:
                yield fmt.sse(fmt.usage_chunk(rid, "text_completion", svc.model_name, created,
                                              total))
            yield fmt.DONE

        return await sse_response(chunks(), lambda o: svc.metrics.request(endpoint, o),
                                  svc.cfg.sse_keepalive_s)

    choices: List[Dict[str, Any]] = []
    total: Dict[str, Any] = {}
    for pi, prompt in enumerate(prompts):
        echo = await _echo(svc, prompt, texts[pi], want_lp, deadline) if req.echo else None
        outs = await _samples(svc, endpoint, prompt, params, each, deadline, t0)
        for j, out in enumerate(outs):
            lp = None
            if want_lp:
                lp = _completion_lp(svc, out.token_ids, out.logprobs, out.top_logprobs, k,
                                    None if echo is None else (prompt, echo[1]))
            text = out.text if echo is None else echo[0] + out.text
            choices.append(fmt.completion_choice(pi * n + j, text, out.finish_reason, lp,
                                                 _ids(out) if req.return_token_ids else None))
        total = fmt.add_usage(total, _usage_n(outs))
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
    k = (req.top_logprobs or 0) if req.logprobs else 0
    params = svc.sampling_params(**req.sampling_kwargs(svc.cfg.default_max_tokens,
                                                       req.logprobs, k))
    each = _expand(svc, params)
    deadline = svc.deadline()
    rid, created = fmt.new_id("chatcmpl"), fmt.now()

    if req.stream:
        async def chunks() -> AsyncIterator[bytes]:
            started = set()
            finals = []
            streams = [svc.stream(endpoint, prompt, p, deadline, t0)
                       for p in each]
            async for j, item in _merged(streams):
                if j not in started:  # OpenAI's first chunk of a choice announces the role
                    started.add(j)
                    yield fmt.sse(fmt.chat_chunk(rid, svc.model_name, created, j,
                                                 {"role": "assistant", "content": ""}))
                if is_final(item):
                    finals.append(item)
                    yield fmt.sse(fmt.chat_chunk(rid, svc.model_name, created, j, {},
                                                 item.finish_reason))
                    continue
                lp = (fmt.chat_logprobs([item.token_id], [item.logprob], svc.piece,
                                        [item.top_logprobs] if k else None)
                      if req.logprobs else None)
                yield fmt.sse(fmt.chat_chunk(rid, svc.model_name, created, j,
                                             {"content": item.text}, None, lp,
                                             [item.token_id] if req.return_token_ids else None))
            if req.include_usage:
                yield fmt.sse(fmt.usage_chunk(rid, "chat.completion.chunk", svc.model_name,
                                              created, _usage_n(finals)))
            yield fmt.DONE

        return await sse_response(chunks(), lambda o: svc.metrics.request(endpoint, o),
                                  svc.cfg.sse_keepalive_s)

    outs = await _samples(svc, endpoint, prompt, params, each, deadline, t0)
    choices = []
    for j, out in enumerate(outs):
        lp = (fmt.chat_logprobs(out.token_ids, out.logprobs, svc.piece,
                                out.top_logprobs if k else None) if req.logprobs else None)
        choices.append(fmt.chat_choice(j, out.text, out.finish_reason, lp,
                                       _ids(out) if req.return_token_ids else None))
    body = fmt.chat_completion(rid, svc.model_name, created, choices, _usage_n(outs))
    return respond(body, wants_msgpack(request))


async def tokenize(svc: Service, request: Request) -> Response:
    """vLLM's POST /tokenize: {prompt | messages, add_special_tokens, add_generation_prompt,
    return_token_strs} -> {count, max_model_len, tokens[, token_strs]}; max_model_len is the
    most tokens a request can hold here (the KV capacity)."""
    data, _ = await read_payload(request, svc.body_limits)
    req = parse_model(TokenizeRequest, data)
    svc.check_model(req.model, required=False)
    llm = svc.require_ready()
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give either prompt or messages", param="prompt")
    if req.messages is not None:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            text = await svc.runner.run_free(lambda: llm.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt))
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages
            raise bad_request("the chat template could not render these messages: "
                              + client_text(str(exc)), param="messages") from None
    else:
        text = req.prompt
    # the chat endpoint encodes its rendered template the same way: the counts agree
    special = req.add_special_tokens is not False
    ids = await svc.encode(text, add_special_tokens=special)
    body: Dict[str, Any] = {"count": len(ids), "max_model_len": int(llm.capacity_tokens),
                            "tokens": ids}
    if req.return_token_strs:
        body["token_strs"] = [svc.piece(t) for t in ids]
    return respond(body, wants_msgpack(request))


async def detokenize(svc: Service, request: Request) -> Response:
    """vLLM's POST /detokenize: {tokens} -> {prompt} (the text, special tokens kept)."""
    data, _ = await read_payload(request, svc.body_limits)
    req = parse_model(DetokenizeRequest, data)
    svc.check_model(req.model, required=False)
    llm = svc.require_ready()
    vocab = llm.tokenizer.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})",
                          param="tokens")
    text = await svc.runner.run_free(
        lambda: llm.tokenizer.decode(req.tokens, skip_special_tokens=False))
    return respond({"prompt": text}, wants_msgpack(request))


def _ids(out) -> List[int]:
    return [int(t) for t in out.token_ids]


def _usage(out) -> Dict[str, Any]:
    cached: Optional[int] = getattr(out, "num_cached_tokens", 0)
    return fmt.usage(len(out.prompt_token_ids), len(out.token_ids), int(cached or 0))


def _usage_n(outs: List[Any]) -> Dict[str, Any]:
    """One prompt's usage over its n choices: the prompt counted once (cached: what its first
    prefill reused), the completions summed."""
    if not outs:
        return {}
    u = _usage(outs[0])
    u["completion_tokens"] = sum(len(o.token_ids) for o in outs)
    u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
    u["prompt_tokens_details"]["cached_tokens"] = min(
        int(getattr(o, "num_cached_tokens", 0) or 0) for o in outs)
    return u


__all__ = ["models", "model", "completions", "chat_completions", "tokenize", "detokenize"]
