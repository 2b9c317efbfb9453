"""The state of one replica: its LLM (loaded in the background), runner, documents and metrics.

Ray-free apart from the metrics; the Serve deployment (app.py) holds one Service and its routes
call the handlers (openai_routes.py, document_routes.py) with it.
"""
from __future__ import annotations

import asyncio
import hmac
import importlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Union

import numpy as np
from fastapi import Request

from ringserve.serve.bodies import BodyLimits
from ringserve.serve.config import ServeArgs
from ringserve.serve.doc_prompts import PLAIN_QUESTION
from ringserve.serve.errors import APIError, client_text
from ringserve.serve.limits import max_bytes_per_token, min_tokens
from ringserve.serve.metrics import ServeMetrics
from ringserve.serve.runner import Deadline, EngineRunner

log = logging.getLogger("ringserve.serve")


def import_class(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def is_final(item: Any) -> bool:
    """The LLM stream yields StreamDelta(token_id, ...) items, then one RequestOutput."""
    return hasattr(item, "finish_reason") and hasattr(item, "token_ids")


@dataclass
class Document:
    id: str
    key: Optional[str]          # the engine's document-cache key, from the upload on (while it
                                # prefills too: dropping it cancels the prefill); None once
                                # dropped, failed, or not pinned on this replica
    name: Optional[str]
    token_ids: np.ndarray       # int32: the prompt prefix every question is appended to
    created: int
    prefill_s: Optional[float]
    status: str = "ready"       # "prefilling" (an upload with wait=false) | "ready" | "failed"
    error: Optional[Dict[str, Any]] = None  # OpenAI error object when status is "failed"
    prompt_format: str = "plain"
    question_template: str = PLAIN_QUESTION  # text after the document; "{question}" in it
    progress: Optional[Dict[str, Any]] = None  # while prefilling: RequestHandle.progress()

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.size)

    def card(self) -> Dict[str, Any]:
        card = {"id": self.id, "object": "document", "name": self.name,
                "num_tokens": self.num_tokens, "created": self.created, "status": self.status,
                "prefill_s": None if self.prefill_s is None else round(self.prefill_s, 6),
                "prompt_format": self.prompt_format, "question_template": self.question_template}
        if self.error is not None:
            card["error"] = self.error
        if self.status == "prefilling" and self.progress is not None:
            card["progress"] = dict(self.progress)
        return card


class Service:
    def __init__(self, cfg: ServeArgs, replica: str = "", registry=None):
        self.cfg = cfg
        self.replica = replica
        self.registry = registry  # DocumentRegistry handle when num_replicas > 1, else None
        self._last_sweep = time.monotonic()
        self.model_name = cfg.served_model_name
        self.created = int(time.time())
        self.metrics = ServeMetrics(self.model_name, replica)
        self.runner = EngineRunner(cfg.max_queue, cfg.request_timeout_s,
                                   on_queue_change=self.metrics.queue,
                                   concurrency=cfg.max_num_seqs)
        self.llm = None
        self.body_limits = BodyLimits(cfg.max_body_bytes, cfg.body_timeout_s,
                                      cfg.min_body_rate or None)
        # UTF-8 bytes one token stands for at most (limits.py): None until the model is loaded
        self.bytes_per_token: Optional[int] = None
        self.load_error: Optional[BaseException] = None
        self.load_s: Optional[float] = None
        self.documents: Dict[str, Document] = {}
        self._closed = False
        self._tasks: set = set()  # background work (uploads with wait=false), kept referenced
        self._load_started = time.monotonic()
        self._loader = threading.Thread(target=self._load, name="ringserve-load", daemon=True)
        self._loader.start()

    # ------------------------------------------------------------------ engine lifecycle
    def _device(self) -> str:
        if self.cfg.device is not None:
            return self.cfg.device
        import ray  # the replica runs inside Ray; a cluster with GPUs gets the GPU engine
        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            cls = import_class(self.cfg.llm_class)
            c, t = self.cfg.context_parallel_size, self.cfg.tensor_parallel_size
            par = ({"world_size": c} if t == 1
                   else {"context_parallel_size": c, "tensor_parallel_size": t})
            if self.cfg.comm_host is not None:  # engines without the option keep loading
                par["comm_host"] = self.cfg.comm_host
            for opt in ("cuda_graphs", "fused_kernels",   # likewise: only when set
                        "interleave_decode_steps", "async_scheduling", "pipeline_steps",
                        "pipeline_depth", "in_process"):
                if getattr(self.cfg, opt) is not None:
                    par[opt] = getattr(self.cfg, opt)
            llm = cls(self.cfg.model, **par, layout=self.cfg.layout,
                      device=self._device(), dtype=self.cfg.dtype,
                      max_num_seqs=self.cfg.max_num_seqs,
                      max_num_batched_tokens=self.cfg.max_num_batched_tokens,
                      max_kv_tokens=self.cfg.max_kv_tokens,
                      document_cache_tokens=self.cfg.document_cache_tokens,
                      placement_strategy=self.cfg.placement_strategy,
                      transport_timeout_s=self.cfg.transport_timeout_s,
                      num_cpus_per_worker=self.cfg.num_cpus_per_worker)
            if self._closed:
                llm.shutdown()
                return
            if getattr(llm, "tokenizer", None) is not None:
                try:
                    self.bytes_per_token = max_bytes_per_token(llm.tokenizer)
                except Exception:  # noqa: BLE001 - no early bound; the engine still checks
                    log.exception("measuring the tokenizer's longest token failed")
            self.llm = llm
            self.load_s = time.perf_counter() - t0
            self.refresh_kv()
            log.info("model %s loaded in %.1f s", self.cfg.model, self.load_s)
        except BaseException as exc:  # noqa: BLE001 - reported by /ready and check_health
            self.load_error = exc
            log.exception("loading model %s failed", self.cfg.model)

    @property
    def ready(self) -> bool:
        return self.llm is not None

    def require_ready(self):
        if self.llm is not None:
            return self.llm
        if self.load_error is not None:  # its details are in the server log, from _load
            raise APIError(503, "the model failed to load; the server log says why",
                           code="model_load_failed")
        waited = time.monotonic() - self._load_started
        raise APIError(503, f"the model is still loading ({waited:.0f} s so far: weights, and "
                            f"{self.cfg.world_size * self.cfg.tensor_parallel_size} shard "
                            f"actor(s) waiting for their resources); "
                            "retry shortly", code="model_loading", headers={"Retry-After": "5"})

    def refresh_kv(self) -> None:
        """Read KV usage into the gauges. Called in a worker thread that holds the slot."""
        llm = self.llm
        if llm is None:
            return
        try:
            s = llm.stats()
        except Exception:  # noqa: BLE001 - stats are best effort; the group may be rebuilding
            return
        self.metrics.kv_tokens(s.get("kv_tokens_used"), s.get("kv_tokens_free"))

    def shutdown(self) -> None:
        self._closed = True
        self.runner.shutdown()
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("LLM shutdown failed")

    # ------------------------------------------------------------------ request helpers
    def check_auth(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, model: Optional[str], required: bool = True) -> None:
        if model is None and not required:
            return
        if model not in (self.model_name, self.cfg.model):
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", code="model_not_found", param="model")

    def check_fits(self, texts: Sequence[str], extra_tokens: int = 0, document: bool = False,
                   param: str = "prompt") -> None:
        """Refuse, before tokenizing, texts that can not fit the KV cache: they have at least
        len(utf8) / bytes_per_token tokens (limits.py), plus `extra_tokens` known ones."""
        llm, bpt = self.llm, self.bytes_per_token
        if llm is None or bpt is None:
            return
        capacity = int(llm.capacity_tokens)
        need = min_tokens(texts, bpt) + int(extra_tokens)
        if need < capacity:  # a prompt must leave room for at least one new token
            return
        msg = (f"the text has at least {need} tokens (its UTF-8 bytes / {bpt}, the most bytes "
               f"one token stands for) but the model's KV cache holds at most {capacity} tokens")
        if document:
            raise APIError(413, "document too large: " + msg, code="document_too_large",
                           param=param)
        raise APIError(400, msg, code="context_length_exceeded", param=param)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def deadline(self) -> Deadline:
        return self.runner.deadline()

    async def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        llm = self.require_ready()
        return await self.runner.run_free(
            lambda: llm.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def piece(self, token_id: int) -> str:
        llm = self.llm
        return llm.tokenizer.decode([token_id], skip_special_tokens=False) if llm else ""

    async def stream(self, endpoint: str, prompt: Union[str, Sequence[int]], params,
                     deadline: Deadline, t0: float) -> AsyncIterator[Any]:
        """The LLM's stream for one prompt (StreamDelta items, then the RequestOutput), with
        time-to-first-token and throughput recorded."""
        llm = self.require_ready()
        first = True
        # the engine checks the same deadline between decode steps, so a request that timed out
        # stops there even if nobody is reading its stream any more
        async for item in self.runner.stream(
                lambda: llm.stream(prompt, params, timeout_s=max(deadline.left(), 1e-3)), deadline,
                                             f"the {endpoint} request", after=self.refresh_kv):
            if is_final(item):
                timings = getattr(item, "timings", None) or {}
                self.metrics.finished(endpoint, len(item.prompt_token_ids),
                                      int(getattr(item, "num_cached_tokens", 0) or 0),
                                      len(item.token_ids), timings.get("decode_s"))
            elif first:
                self.metrics.first_token(endpoint, time.perf_counter() - t0)
                first = False
            yield item

    async def generate(self, endpoint: str, prompt, params, deadline: Deadline, t0: float):
        """The final RequestOutput of one prompt (the stream, drained)."""
        final = None
        async for item in self.stream(endpoint, prompt, params, deadline, t0):
            if is_final(item):
                final = item
        if final is None:
            raise APIError(500, "the engine's stream ended without a result", code="internal_error")
        return final

    def sampling_params(self, **kwargs):
        from ringserve.sampling import SamplingParams
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            raise APIError(400, client_text(str(exc)), code="invalid_value") from None

    # ------------------------------------------------------------------ documents
    def _not_found(self, doc_id: str) -> APIError:
        return APIError(404, f"no document with id {doc_id!r} (never uploaded, or deleted)",
                        code="document_not_found", param="document_id")

    def key_shared(self, doc: Document) -> bool:
        """The engine keys its document cache by the token ids: two uploads of the same text
        share one pinned entry, which must stay until the last of them is deleted."""
        return doc.key is not None and any(
            d.key == doc.key and d.id != doc.id for d in self.documents.values())

    def new_document_id(self) -> str:
        return f"doc-{uuid.uuid4().hex[:24]}"

    async def publish(self, doc: Document) -> None:
        self.documents[doc.id] = doc
        if self.registry is not None:
            await self.registry.put.remote(doc.id, doc.card(),
                                           doc.token_ids.astype("<i4").tobytes())

    async def republish(self, doc: Document) -> None:
        """The card changed (a background prefill finished): tell the registry, if any."""
        if self.registry is not None and self.documents.get(doc.id) is doc:
            await self.registry.update.remote(doc.id, doc.card())

    async def find_document(self, doc_id: str) -> Document:
        """The document to answer a question on, with its token ids (fetched from the shared
        registry when another replica uploaded it)."""
        local = self.documents.get(doc_id)
        if self.registry is None:
            if local is None:
                raise self._not_found(doc_id)
            return self._usable(local)
        await self.sweep()
        if local is not None:
            if await self.registry.card.remote(doc_id) is None:  # deleted via another replica
                await self.forget(local)
                raise self._not_found(doc_id)
            return self._usable(local)
        entry = await self.registry.get.remote(doc_id)
        if entry is None:
            raise self._not_found(doc_id)
        card, raw = entry
        if card.get("status") == "failed":
            raise self._failed(doc_id, card.get("error"))
        doc = Document(id=doc_id, key=None, name=card.get("name"),
                       token_ids=np.frombuffer(raw, dtype="<i4").astype(np.int32),
                       created=int(card.get("created", 0)), prefill_s=0.0,
                       prompt_format=card.get("prompt_format", "plain"),
                       question_template=card.get("question_template", PLAIN_QUESTION))
        self.documents[doc_id] = doc  # not pinned here: the engine's LRU prefix cache keeps it
        return doc

    def _failed(self, doc_id: str, error: Optional[Dict[str, Any]]) -> APIError:
        why = (error or {}).get("message", "unknown error")
        return APIError(409, f"document {doc_id!r} failed to prefill, so it can not be asked: "
                             f"{why}; delete it and upload again", code="document_failed",
                        param="document_id")

    def _usable(self, doc: Document) -> Document:
        """A document that can take questions. One still prefilling can: its question waits in
        the engine queue behind that prefill and then reuses its KV."""
        if doc.status == "failed":
            raise self._failed(doc.id, doc.error)
        return doc

    async def document_card(self, doc_id: str) -> Dict[str, Any]:
        if self.registry is not None:
            card = await self.registry.card.remote(doc_id)
        else:
            doc = self.documents.get(doc_id)
            card = None if doc is None else doc.card()
        if card is None:
            raise self._not_found(doc_id)
        return card

    async def document_cards(self) -> List[Dict[str, Any]]:
        if self.registry is not None:
            return list(await self.registry.listing.remote())
        return [d.card() for d in self.documents.values()]

    async def remove_document(self, doc_id: str) -> Dict[str, Any]:
        local = self.documents.get(doc_id)
        card = None
        if self.registry is not None:
            card = await self.registry.delete.remote(doc_id)
        if card is None and (local is None or self.registry is not None):
            raise self._not_found(doc_id)
        if local is not None:
            await self.forget(local)
        return card or local.card()

    async def forget(self, doc: Document) -> None:
        """Drop `doc` from this replica; unpin its KV unless another upload shares it. A
        document still prefilling is cancelled in the engine (its pages freed at once)."""
        self.documents.pop(doc.id, None)
        llm, key = self.llm, doc.key
        if llm is None or key is None or self.key_shared(doc):
            return
        doc.key = None

        def drop():
            llm.drop_document(key)
            self.refresh_kv()

        # housekeeping is never refused for a full queue: it frees memory for the others
        await self.runner.call(drop, self.deadline(), "dropping the document", bounded=False)

    async def sweep(self, every_s: float = 10.0) -> None:
        """Unpin local copies of documents deleted through another replica."""
        if self.registry is None or time.monotonic() - self._last_sweep < every_s:
            return
        self._last_sweep = time.monotonic()
        pinned = [d.id for d in self.documents.values() if d.key is not None]
        if not pinned:
            return
        alive = set(await self.registry.alive.remote(pinned))
        for doc_id in pinned:
            doc = self.documents.get(doc_id)
            if doc_id not in alive and doc is not None:
                await self.forget(doc)

    def stats(self) -> Dict[str, Any]:
        llm = self.llm
        out = {"model": self.model_name, "ready": self.ready, "load_s": self.load_s,
               "documents": len(self.documents), "args": self.cfg.public_dict(),
               **self.metrics.snapshot()}
        if llm is not None:
            try:
                out["capacity_tokens"] = int(llm.capacity_tokens)
                out["engine"] = llm.stats()  # the engine's own counters (cheap: no remote call)
            except Exception:  # noqa: BLE001 - stats are best effort
                pass
        return out


__all__ = ["Service", "Document", "import_class", "is_final"]
