"""Errors at the HTTP edge, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

`APIError` carries the HTTP status; `api_error_from(exc)` maps the engine's errors
(ringserve.errors) onto statuses; `install_error_handlers(app)` makes FastAPI answer every
failure (validation, unknown route, unexpected exception) in the same shape.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ringserve import errors as engine_errors

log = logging.getLogger("ringserve.serve")

# OpenAI's `type` strings by status; the openai client picks its exception class by status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error",
          504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None,
                 param: Optional[str] = None, type: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(self.status, "server_error" if status >= 500
                                       else "invalid_request_error")
        self.headers = headers

    @property
    def outcome(self) -> str:
        """Label for the requests-by-outcome metric."""
        return self.code or self.type

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def api_error_from(exc: BaseException, *, document: bool = False) -> APIError:
    """The HTTP error for an exception raised by the engine (or by us)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, engine_errors.CapacityError):
        msg = (f"the request needs {exc.requested} KV tokens but the model's KV cache can hold at "
               f"most {exc.capacity} for it")
        detail = getattr(exc, "detail", "")
        if detail:
            msg += f" ({detail})"
        if document:
            return APIError(413, "document too large: " + msg, code="document_too_large",
                            param="text")
        return APIError(400, msg, code="context_length_exceeded", param="prompt")
    if isinstance(exc, engine_errors.InvalidRequestError):
        return bad_request(str(exc))
    if isinstance(exc, engine_errors.WorkerFailedError):
        return APIError(503, f"a model worker failed and the group is being rebuilt; retry: {exc}",
                        code="worker_failed", headers={"Retry-After": "5"})
    if isinstance(exc, (engine_errors.RequestTimeoutError, TimeoutError)):
        return APIError(504, f"the request timed out: {exc}", code="timeout")
    if isinstance(exc, engine_errors.RequestCancelledError):
        return APIError(503, f"the request was cancelled: {exc}", code="cancelled")
    if isinstance(exc, engine_errors.RingServeError):  # e.g. the engine is shutting down
        return APIError(503, f"the engine can not serve this request now: {exc}",
                        code="engine_unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, UnicodeError):  # e.g. a lone surrogate reaching the tokenizer
        return bad_request(f"text is not valid Unicode: {exc}", code="invalid_text")
    if isinstance(exc, ValueError):  # SamplingParams and friends check their values this way
        return bad_request(str(exc))
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def _param_of(loc) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
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
        return APIError(exc.status_code, str(exc.detail), code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return api_error_from(exc).response()


__all__ = ["APIError", "bad_request", "api_error_from", "install_error_handlers"]
