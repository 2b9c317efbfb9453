"""The Ray Serve deployment: a FastAPI ingress whose every replica owns one LLM (one actor group).

Routes are thin: authenticate, call a handler (openai_routes / document_routes) with the
replica's Service, count the outcome. Errors of any kind leave in OpenAI's error shape.
"""
# no `from __future__ import annotations` here: FastAPI reads the route signatures of the
# class-based view, and string annotations would make `request: Request` a query parameter
import asyncio
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from ringserve.serve import document_routes, openai_routes
from ringserve.serve.config import ServeArgs
from ringserve.serve.errors import api_error_from, install_error_handlers
from ringserve.serve.service import Service

# FastAPI's own /docs, /redoc and /openapi.json would answer without the API key: they are off,
# and GET /openapi.json below serves the schema behind the key (the HTML pages load scripts from
# a CDN, which a cluster without internet can not reach anyway)
api = FastAPI(title="ringserve", version="0.1.0",
              description="Long-context LLM inference: OpenAI-compatible API plus documents",
              docs_url=None, redoc_url=None, openapi_url=None)
install_error_handlers(api)


@serve.deployment(name="RingServe")
@serve.ingress(api)
class RingServe:
    def __init__(self, args: dict, registry=None):
        cfg = ServeArgs.from_dict(args)
        try:
            replica = serve.get_replica_context().replica_tag
        except Exception:  # noqa: BLE001 - only outside Serve (never in production)
            replica = ""
        self.svc = Service(cfg, replica, registry)

    def check_health(self):
        # a failed load makes the replica unhealthy, so Serve replaces it (a retry of the load)
        if self.svc.load_error is not None:
            raise RuntimeError(f"model failed to load: {self.svc.load_error!r}")

    def __del__(self):
        svc = getattr(self, "svc", None)
        if svc is not None:
            svc.shutdown()

    async def _handle(self, endpoint: str, request: Request,
                      fn: Callable[[], Awaitable[Response]]) -> Response:
        metrics = self.svc.metrics
        metrics.handling(endpoint, 1)  # until its response starts (/stats "in_progress")
        try:
            self.svc.check_auth(request)
            resp = await fn()
        except asyncio.CancelledError:
            metrics.request(endpoint, "cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves in OpenAI's shape
            err = api_error_from(exc, document=endpoint == "documents")
            metrics.request(endpoint, err.outcome)
            resp = err.response()
            resp.headers["x-ringserve-replica"] = self.svc.replica
            return resp
        finally:
            metrics.handling(endpoint, -1)
        if not isinstance(resp, StreamingResponse):  # streams count their own outcome at the end
            metrics.request(endpoint, "ok")
        resp.headers["x-ringserve-replica"] = self.svc.replica
        return resp

    # ------------------------------------------------------------------ probes
    @api.get("/health")
    async def health(self):
        """Liveness: the replica answers (the model may still be loading)."""
        return {"status": "ok"}

    @api.get("/ready")
    async def ready(self):
        """Readiness: 200 once the model is loaded, 503 before (or if loading failed)."""
        try:
            self.svc.require_ready()
        except Exception as exc:  # noqa: BLE001
            resp = api_error_from(exc).response()
        else:
            resp = JSONResponse({"status": "ready", "model": self.svc.model_name,
                                 "load_s": self.svc.load_s})
        resp.headers["x-ringserve-replica"] = self.svc.replica
        return resp

    @api.get("/stats")
    async def stats(self, request: Request):
        self.svc.check_auth(request)
        return JSONResponse(self.svc.stats())

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        self.svc.check_auth(request)
        return JSONResponse(api.openapi())

    # ------------------------------------------------------------------ OpenAI-compatible
    @api.get("/v1/models")
    async def list_models(self, request: Request):
        return await self._handle("models", request,
                                  self._json(lambda: openai_routes.models(self.svc)))

    @api.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request):
        return await self._handle("models", request,
                                  self._json(lambda: openai_routes.model(self.svc, model_id)))

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle("completions", request, lambda: openai_routes.completions(
            self.svc, request, "completions"))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle("chat", request, lambda: openai_routes.chat_completions(
            self.svc, request, "chat"))

    @api.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self._handle("tokenize", request, lambda: openai_routes.tokenize(
            self.svc, request))

    @api.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self._handle("tokenize", request, lambda: openai_routes.detokenize(
            self.svc, request))

    # ------------------------------------------------------------------ documents
    @api.post("/v1/documents")
    async def create_document(self, request: Request):
        return await self._handle("documents", request, lambda: document_routes.create(
            self.svc, request, "documents"))

    @api.get("/v1/documents")
    async def list_documents(self, request: Request):
        async def run():
            return JSONResponse(await document_routes.listing(self.svc))
        return await self._handle("documents_get", request, run)

    @api.get("/v1/documents/{doc_id}")
    async def get_document(self, doc_id: str, request: Request):
        async def run():
            return JSONResponse(await document_routes.get(self.svc, doc_id))
        return await self._handle("documents_get", request, run)

    @api.delete("/v1/documents/{doc_id}")
    async def delete_document(self, doc_id: str, request: Request):
        async def run():
            return JSONResponse(await document_routes.delete(self.svc, doc_id))
        return await self._handle("documents_delete", request, run)

    @api.post("/v1/documents/{doc_id}/ask")
    async def ask(self, doc_id: str, request: Request):
        return await self._handle("ask", request, lambda: document_routes.ask(
            self.svc, request, doc_id, "ask"))

    @staticmethod
    def _json(fn) -> Callable[[], Awaitable[Response]]:
        async def run():
            return JSONResponse(fn())
        return run


__all__ = ["RingServe", "api"]
