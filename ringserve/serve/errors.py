"""Errors at the HTTP edge, in OpenAI's shape: {"error": {"message", "type", "param", "code",
"request_id"}}.

`APIError` carries the HTTP status; `api_error_from(exc)` maps the engine's errors
(ringserve.errors) onto statuses; `install_error_handlers(app)` makes FastAPI answer every
failure (validation, unknown route, unexpected exception) in the same shape.

What a client sees is a stable `code`, a short message written here and the request id; never
an exception's own text when the server is at fault (a shard fault's remote Ray traceback carries
paths, pids, node IPs and actor ids). Those details go to the server log under the request id
(the `x-request-id` header that Serve's proxy sets, also returned to the client).
"""
from __future__ import annotations

import contextvars
import logging
import re
import sys
import uuid
from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ringserve import errors as engine_errors

log = logging.getLogger("ringserve.serve")

# OpenAI's `type` strings by status; the openai client picks its exception class by status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          409: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          499: "cancelled", 500: "server_error", 503: "service_unavailable_error",
          504: "timeout_error"}

# ------------------------------------------------------------------------------ request ids

_REQUEST_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "ringserve_request_id", default=None)
# a client may send its own x-request-id (Serve's proxy keeps it): use it only when it is a
# plain token, so that it can not forge log lines or bloat them
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(headers) -> str:
    """The id of a request: Serve's x-request-id header, or a fresh one."""
    given = headers.get("x-request-id")
    if given and _SAFE_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def current_request_id() -> Optional[str]:
    return _REQUEST_ID.get()


class RequestIdMiddleware:
    """Pure ASGI middleware: makes the request's id current for everything that runs for it
    (handlers, exception handlers, the body of a streaming response, background tasks spawned
    from it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", ())}
        token = _REQUEST_ID.set(request_id_from(headers))
        try:
            return await self.app(scope, receive, send)
        finally:
            _REQUEST_ID.reset(token)


# ------------------------------------------------------------------------------ errors

class APIError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 param: Optional[str] = None, type: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None, outcome: Optional[str] = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(self.status, "server_error" if status >= 500
                                       else "invalid_request_error")
        self.headers = headers
        self._outcome = outcome
        self.request_id = current_request_id()

    @property
    def outcome(self) -> str:
        """Label for the requests-by-outcome metric."""
        return self._outcome or self.code or self.type

    def body(self) -> Dict[str, Any]:
        rid = self.request_id or current_request_id()
        err = {"message": self.message, "type": self.type, "param": self.param,
               "code": self.code}
        if rid:
            err["request_id"] = rid
        return {"error": err}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_INTERNAL = re.compile(r"Traceback|File \"|ray::|actor_id|\bpid[:=]")


def client_text(text: str, fallback: str = "invalid request") -> str:
    """An exception's message as far as it can go to a client: its first line, without colour
    codes, at most 300 characters; the fallback when it looks like a traceback."""
    first = _ANSI.sub("", str(text)).strip().split("\n", 1)[0].strip()
    if not first or _INTERNAL.search(first):
        return fallback
    return first if len(first) <= 300 else first[:297] + "..."


def validation_message(exc: ValidationError):
    """(message, param) of a pydantic ValidationError: where and what, without pydantic's own
    text (the input values, links to its documentation)."""
    parts, param = [], None
    for e in exc.errors()[:5]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        param = param or where
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def client_gone(exc: BaseException) -> bool:
    """The client went away: starlette's ClientDisconnect (also what a failed write to its
    socket becomes) or, inside a Serve replica, Serve's receive() of a request the proxy
    cancelled (Ray's TaskCancelledError: looked up without importing Ray here)."""
    if isinstance(exc, ClientDisconnect):
        return True
    ray_exceptions = sys.modules.get("ray.exceptions")
    cancelled = getattr(ray_exceptions, "TaskCancelledError", None)
    return cancelled is not None and isinstance(exc, cancelled)


def _server_fault(status: int, code: str, message: str, exc: BaseException, what: str,
                  headers: Optional[Dict[str, str]] = None, trace: bool = False) -> APIError:
    err = APIError(status, message, code=code, headers=headers)
    rid = err.request_id or "-"
    if trace:
        log.error("request %s: %s", rid, what, exc_info=exc)
    else:
        log.warning("request %s: %s: %s: %s", rid, what, type(exc).__name__, exc)
    return err


def _worker_reason(exc: BaseException) -> str:
    text = str(exc)
    if "Timeout" in text or "timed out" in text:
        return "a shard worker stopped answering (timed out)"
    if "Died" in text or "died" in text:
        return "a shard worker died"
    return "a shard worker failed"


def _capacity_message(exc: engine_errors.CapacityError) -> str:
    msg = (f"the request needs {exc.requested} KV tokens but the model's KV cache can hold at "
           f"most {exc.capacity} for it")
    detail = str(getattr(exc, "detail", "") or "")
    pinned = re.search(r"(\d+) held by pinned documents", detail)
    if pinned:
        msg += (f" ({pinned.group(1)} tokens are held by pinned documents: deleting documents "
                "(DELETE /v1/documents/{id}) frees them)")
    elif "document cache budget" in detail:
        msg += " (the document cache budget, document_cache_tokens)"
    return msg


def api_error_from(exc: BaseException, *, document: bool = False) -> APIError:
    """The HTTP error for an exception raised by the engine (or by us)."""
    if isinstance(exc, APIError):
        return exc
    if client_gone(exc):  # nobody reads this answer; counted as a cancellation, not logged
        return APIError(499, "the client closed the connection", code="client_disconnected",
                        outcome="cancelled")
    if isinstance(exc, engine_errors.CapacityError):
        msg = _capacity_message(exc)
        if document:
            return APIError(413, "document too large: " + msg, code="document_too_large",
                            param="text")
        return APIError(400, msg, code="context_length_exceeded", param="prompt")
    if isinstance(exc, ValidationError):  # pydantic, a model built outside parse_model
        msg, param = validation_message(exc)
        return bad_request(msg, param=param)
    if isinstance(exc, engine_errors.InvalidRequestError):
        return bad_request(client_text(str(exc)))
    if isinstance(exc, engine_errors.WorkerFailedError):
        return _server_fault(503, "worker_failed", f"{_worker_reason(exc)}; the worker group is "
                             "being rebuilt: retry shortly", exc, "shard worker failure",
                             headers={"Retry-After": "5"})
    if isinstance(exc, (engine_errors.RequestTimeoutError, TimeoutError)):
        return _server_fault(504, "timeout", "the request did not finish within the request "
                             "timeout", exc, "timeout")
    if isinstance(exc, engine_errors.RequestCancelledError):
        return _server_fault(503, "cancelled", "the request was cancelled", exc, "cancelled")
    if isinstance(exc, engine_errors.RingServeError):  # e.g. the engine is shutting down
        return _server_fault(503, "engine_unavailable", "the engine can not serve this request "
                             "now: retry shortly", exc, "engine unavailable",
                             headers={"Retry-After": "5"})
    if isinstance(exc, UnicodeError):  # e.g. a lone surrogate reaching the tokenizer
        return bad_request("text is not valid Unicode (lone surrogates or undecodable bytes)",
                           code="invalid_text")
    if isinstance(exc, ValueError):  # SamplingParams and friends check their values this way
        return bad_request(client_text(str(exc)))
    return _server_fault(500, "internal_error", "internal error; the server log has the "
                         "details under this request id", exc, "unexpected error", trace=True)


def _param_of(loc) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = _param_of(first.get("loc", ()))
        parts = []
        for e in errs[:5]:
            where = _param_of(e.get("loc", ())) or "body"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return bad_request("invalid request: " + "; ".join(parts), param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, client_text(str(exc.detail), "error"), code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return api_error_from(exc).response()


__all__ = ["APIError", "bad_request", "api_error_from", "install_error_handlers", "client_text",
           "validation_message", "current_request_id", "request_id_from", "RequestIdMiddleware",
           "client_gone"]
