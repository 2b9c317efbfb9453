"""Handlers of the long-document API.

POST /v1/documents               text (JSON, msgpack, multipart file) or token ids (JSON, msgpack)
                                 -> tokenized, prefilled once and pinned with LLM.cache_document;
                                 wait=false (body or query): 202 at once, prefill in background
POST /v1/documents/{id}/ask      question -> answer; the prompt is the document's token ids plus
                                 the question's, so the engine serves the document part from its
                                 cached KV (reported as num_cached_tokens), streaming or not
GET / DELETE /v1/documents/{id}, GET /v1/documents  (while prefilling, a card carries "progress":
                                 RequestHandle.progress(), refreshed twice a second; a DELETE
                                 then cancels the prefill and frees its pages)

A document's KV lives in the replica that prefilled it; with several replicas the shared
registry (registry.py) lets any replica answer (see there).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Dict, List

import numpy as np
from fastapi import Request
from fastapi.responses import Response

from ringserve import errors as engine_errors
from ringserve.serve import openai_format as fmt
from ringserve.serve.bodies import parse_model, read_payload, respond, wants_msgpack
from ringserve.serve.doc_prompts import (PLAIN_QUESTION, chat_document, encode_continuation,
                                         question_text)
from ringserve.serve.errors import APIError, api_error_from, bad_request, client_text
from ringserve.serve.protocol import AskRequest, DocumentCreate
from ringserve.serve.service import Document, Service, is_final
from ringserve.serve.streaming import sse_response

# kept for callers that build the plain-format prompt themselves (tests, benchmarks)
QUESTION_TEMPLATE = PLAIN_QUESTION


def _token_ids(raw) -> np.ndarray:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        if len(raw) % 4:
            raise bad_request(f"token_ids bytes must be little-endian uint32 (length a multiple "
                              f"of 4), got {len(raw)} bytes", param="token_ids")
        return np.frombuffer(raw, dtype="<u4").astype(np.int64)
    try:
        return np.asarray(raw, dtype=np.int64)
    except OverflowError:  # JSON integers have no bound; past int64 it is no token id (not a 500)
        raise bad_request("a token id does not fit in 64 bits", param="token_ids") from None


async def create(svc: Service, request: Request, endpoint: str) -> Response:
    data, kind = await read_payload(request, svc.body_limits, multipart=True)
    if kind == "multipart":
        f = data.get("file")
        if not isinstance(f, dict):
            raise bad_request("a multipart upload needs a 'file' field", param="file")
        try:
            text = f["data"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad_request(f"the uploaded file is not UTF-8 text: {exc}", param="file") from None
        name = data.get("name") if isinstance(data.get("name"), str) else f["filename"]
        req = parse_model(DocumentCreate, {"text": text, "name": name or None})
    else:
        req = parse_model(DocumentCreate, data)
    if req.model is not None:
        svc.check_model(req.model)
    llm = svc.require_ready()
    if (req.text is None) == (req.token_ids is None):
        raise bad_request("give exactly one of 'text' and 'token_ids'", param="text")

    template = PLAIN_QUESTION
    if req.prompt_format == "chat" and req.text is None:
        raise bad_request("prompt_format 'chat' needs the document as text", param="prompt_format")
    if req.system is not None and req.prompt_format != "chat":
        raise bad_request("'system' goes with prompt_format 'chat'", param="system")
    if req.text is not None:
        if not req.text.strip():
            raise bad_request("the document text is empty", param="text")
        # refused before tokenizing when it can not fit whatever the tokens (limits.py)
        svc.check_fits([req.text, req.system or ""], document=True, param="text")
        if req.prompt_format == "chat":
            try:
                head, template = await svc.runner.run_free(
                    chat_document, llm.tokenizer, req.text, req.system)
            except Exception as exc:  # noqa: BLE001 - no template, or one that rejects this
                raise bad_request("the chat template can not frame this document: "
                                  + client_text(str(exc)),
                                  param="prompt_format") from None
            # the rendered template carries its own special tokens (BOS and headers)
            ids = np.asarray(await svc.encode(head, add_special_tokens=False), dtype=np.int64)
        else:
            ids = np.asarray(await svc.encode(req.text), dtype=np.int64)
    else:
        ids = _token_ids(req.token_ids)
        if ids.size == 0:
            raise bad_request("token_ids is empty", param="token_ids")
        vocab = llm.tokenizer.vocab_size
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            raise bad_request(f"token id {int(ids[bad][0])} is outside the vocabulary "
                              f"[0, {vocab})", param="token_ids")
    ids = ids.astype(np.int32)
    n, capacity = int(ids.size), int(llm.capacity_tokens)
    if n >= capacity:  # a question needs at least one more token of room
        raise APIError(413, f"document too large: it has {n} tokens but the model's KV cache "
                            f"holds at most {capacity} tokens", code="document_too_large",
                       param="text" if req.text is not None else "token_ids")

    id_list = ids.tolist()
    deadline = svc.deadline()
    loop = asyncio.get_running_loop()
    doc_box: list = []  # the Document, once made (a background upload shows the progress)

    def show_progress(p):  # on the runner's thread, twice a second while it waits
        if doc_box:
            doc_box[0].progress = p
            if svc.registry is not None:  # other replicas read the card from the registry
                asyncio.run_coroutine_threadsafe(svc.republish(doc_box[0]), loop)

    def prefill():
        t = time.perf_counter()
        key = llm.cache_document(id_list, timeout_s=max(deadline.left(), 1e-3),
                                 on_progress=show_progress, progress_interval_s=0.5)
        seconds = time.perf_counter() - t
        svc.refresh_kv()
        return key, seconds

    def abandon(result):  # the client never learnt the id: free the KV it pinned
        if not any(d.key == result[0] for d in list(svc.documents.values())):
            llm.drop_document(result[0])

    # the engine's key for this document, known now: a delete while it prefills cancels it
    key = await svc.runner.run_free(llm.document_key, id_list)
    doc = Document(id=svc.new_document_id(), key=key, name=req.name, token_ids=ids,
                   created=fmt.now(), prefill_s=None, status="prefilling",
                   prompt_format=req.prompt_format, question_template=template)
    doc_box.append(doc)
    wait = req.wait and request.query_params.get("wait", "").lower() not in ("false", "0", "no")
    if not wait:
        svc.runner.check_room()  # a full queue is refused now, not after the 202
        await svc.publish(doc)
        svc.spawn(_prefill_in_background(svc, doc, prefill, abandon, deadline))
        return respond(doc.card(), wants_msgpack(request), status=202)
    try:
        key, prefill_s = await svc.runner.call(prefill, deadline, "the document's prefill",
                                               on_late_result=abandon)
    except engine_errors.CapacityError as exc:
        raise api_error_from(exc, document=True) from None
    doc.key, doc.prefill_s, doc.status = key, prefill_s, "ready"
    await svc.publish(doc)
    await svc.sweep()
    return respond(doc.card(), wants_msgpack(request))


async def _prefill_in_background(svc: Service, doc: Document, prefill, abandon,
                                 deadline) -> None:
    """An upload with wait=false: prefill under the upload's deadline, then mark the document
    ready (or failed, with the error a waiting upload would have got)."""
    try:
        # already admitted when the 202 went out: never refused for a full queue now
        key, prefill_s = await svc.runner.call(prefill, deadline, "the document's prefill",
                                               on_late_result=abandon, bounded=False)
    except Exception as exc:  # noqa: BLE001 - recorded on the document for GET / ask
        if svc.documents.get(doc.id) is not doc:  # deleted: the delete cancelled the prefill
            svc.metrics.request("documents_prefill", "cancelled")
            return
        err = api_error_from(exc, document=True)
        # nothing of it stays pinned: an upload of the same text must not count it as a sharer
        doc.status, doc.error, doc.key = "failed", err.body()["error"], None
        svc.metrics.request("documents_prefill", err.outcome)
    else:
        if svc.documents.get(doc.id) is not doc:  # deleted while it was prefilling
            doc.key = key
            await svc.forget(doc)
            return
        doc.key, doc.prefill_s, doc.status, doc.progress = key, prefill_s, "ready", None
        svc.metrics.request("documents_prefill", "ok")
    await svc.republish(doc)


async def get(svc: Service, doc_id: str) -> Dict[str, Any]:
    return await svc.document_card(doc_id)


async def listing(svc: Service) -> Dict[str, Any]:
    return {"object": "list", "data": await svc.document_cards()}


async def delete(svc: Service, doc_id: str) -> Dict[str, Any]:
    await svc.remove_document(doc_id)  # from now on asks get 404
    return {"id": doc_id, "object": "document", "deleted": True}


async def ask(svc: Service, request: Request, doc_id: str, endpoint: str) -> Response:
    t0 = time.perf_counter()
    data, _ = await read_payload(request, svc.body_limits)
    req = parse_model(AskRequest, data)
    req.check_supported()
    svc.check_model(req.model, required=False)
    llm = svc.require_ready()
    doc = await svc.find_document(doc_id)
    svc.check_fits([req.question], extra_tokens=doc.num_tokens, param="question")
    question = await svc.runner.run_free(
        encode_continuation, llm.tokenizer, question_text(doc.question_template, req.question))
    prompt: List[int] = doc.token_ids.tolist() + list(question)
    params = svc.sampling_params(**req.sampling_kwargs(svc.cfg.default_max_tokens, req.logprobs))
    deadline = svc.deadline()
    rid, created = fmt.new_id("ans"), fmt.now()
    head = {"id": rid, "created": created, "model": svc.model_name, "document_id": doc_id}

    def summary(out) -> Dict[str, Any]:
        cached = int(getattr(out, "num_cached_tokens", 0) or 0)
        return {"finish_reason": out.finish_reason, "num_cached_tokens": cached,
                "usage": fmt.usage(len(out.prompt_token_ids), len(out.token_ids), cached),
                "timings": dict(getattr(out, "timings", None) or {})}

    if req.stream:
        async def chunks() -> AsyncIterator[bytes]:
            async for item in svc.stream(endpoint, prompt, params, deadline, t0):
                if is_final(item):
                    yield fmt.sse({**head, "object": "document.answer.chunk", "delta": "",
                                   **summary(item)})
                    continue
                chunk = {**head, "object": "document.answer.chunk", "delta": item.text,
                         "finish_reason": None}
                if req.return_token_ids:
                    chunk["token_ids"] = [item.token_id]
                if req.logprobs:
                    chunk["logprobs"] = [item.logprob]
                yield fmt.sse(chunk)
            yield fmt.DONE

        return await sse_response(chunks(), lambda o: svc.metrics.request(endpoint, o),
                                  svc.cfg.sse_keepalive_s)

    out = await svc.generate(endpoint, prompt, params, deadline, t0)
    body = {**head, "object": "document.answer", "answer": out.text, **summary(out)}
    if req.return_token_ids:
        body["token_ids"] = [int(t) for t in out.token_ids]
    if req.logprobs:
        body["logprobs"] = list(out.logprobs or [])
    return respond(body, wants_msgpack(request))


__all__ = ["create", "get", "listing", "delete", "ask", "QUESTION_TEMPLATE"]
