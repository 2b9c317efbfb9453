"""Request bodies in JSON, msgpack or multipart, under a size limit; responses in the same kind.

msgpack exists for multi-megabyte documents: smaller on the wire than JSON and much faster to
parse, and token ids may travel as raw little-endian uint32 bytes. Multipart is parsed with the
standard library's MIME parser, so no extra package is needed for file uploads.

A body must keep coming: a pause longer than `BodyLimits.timeout_s` between two pieces, or a
body slower on average than `min_rate` bytes/s once `timeout_s` has passed, gets 408 (a slow
client would otherwise hold one of the replica's request slots for as long as it likes). A
client that goes away while sending is a cancellation, not a server error.
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Type, TypeVar

import msgpack
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from ringserve.serve.errors import APIError, bad_request, client_text, validation_message

MSGPACK = "application/msgpack"
_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

M = TypeVar("M", bound=BaseModel)


def _media_type(value: Optional[str]) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def is_msgpack(request: Request) -> bool:
    return _media_type(request.headers.get("content-type")) in _MSGPACK_TYPES


def wants_msgpack(request: Request) -> bool:
    """Answer in msgpack when the body was msgpack or the client asks for it in Accept."""
    accept = request.headers.get("accept", "").lower()
    return is_msgpack(request) or any(t in accept for t in _MSGPACK_TYPES)


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"request body is {size} bytes, more than the limit of {limit} bytes "
                         f"(max_body_mb)", code="body_too_large")


@dataclass(frozen=True)
class BodyLimits:
    """How much and how fast a request body must arrive (ServeArgs: max_body_mb,
    body_timeout_s, min_body_rate)."""
    max_bytes: int
    timeout_s: Optional[float] = None   # longest pause between two pieces; grace before the rate
    min_rate: Optional[float] = None    # bytes/s: a body of n bytes may take timeout_s + n/rate


def body_timeout(size: int, seconds: float, limits: BodyLimits) -> APIError:
    rate = f" and at least {limits.min_rate:g} bytes/s after that" if limits.min_rate else ""
    return APIError(408, f"the request body came too slowly: {size} bytes in {seconds:.1f} s "
                         f"(a body may pause at most {limits.timeout_s:g} s{rate}; "
                         "body_timeout_s, min_body_rate)", code="body_timeout",
                    headers={"Connection": "close"})


async def read_body(request: Request, limits) -> bytes:
    """The raw body; 413 as soon as it is known to be over the size limit (Content-Length, or
    the bytes received so far for a chunked upload), before buffering the rest; 408 when it
    comes too slowly. `limits` is a BodyLimits or a plain byte limit."""
    if not isinstance(limits, BodyLimits):
        limits = BodyLimits(int(limits))
    limit = limits.max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    t0 = time.monotonic()
    while True:
        wait = limits.timeout_s
        if wait is not None and limits.min_rate:
            wait = min(wait, t0 + limits.timeout_s + size / limits.min_rate - time.monotonic())
        try:
            if wait is None:
                chunk = await stream.__anext__()
            elif wait <= 0:
                raise asyncio.TimeoutError
            else:
                chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise body_timeout(size, time.monotonic() - t0, limits) from None
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _decode_text(data: bytes, charset: Optional[str], field: str) -> str:
    """A multipart text field in its declared charset; the charset name is the client's, so an
    unknown one (LookupError) or a codec that is no text encoding is a 400, not a 500."""
    name = charset or "utf-8"
    try:
        text = data.decode(name, errors="replace")
    except (LookupError, TypeError, ValueError):
        raise bad_request(f"multipart field {field!r}: unknown or unusable charset "
                          f"{name[:40]!r}", param=field, code="invalid_charset") from None
    if not isinstance(text, str):  # bytes-to-bytes codecs (e.g. "hex", "zlib") are no charsets
        raise bad_request(f"multipart field {field!r}: {name[:40]!r} is not a text charset",
                          param=field, code="invalid_charset")
    return text


def _multipart(body: bytes, content_type: str) -> Dict[str, Any]:
    """Form fields of a multipart/form-data body: files as {"filename", "content_type", "data"}."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1",
                                                                                "replace")
    try:
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
        if not msg.is_multipart():
            raise bad_request("malformed multipart/form-data body")
        fields: Dict[str, Any] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not name or not isinstance(name, str):
                continue
            data = part.get_payload(decode=True) or b""
            if not isinstance(data, bytes):
                continue
            filename = part.get_filename()
            if filename is not None:
                fields[name] = {"filename": str(filename), "content_type": part.get_content_type(),
                                "data": data}
            else:
                fields[name] = _decode_text(data, part.get_content_charset(), name[:64])
        return fields
    except APIError:
        raise
    except Exception:  # noqa: BLE001 - the MIME parser on hostile input; its text stays here
        raise bad_request("malformed multipart/form-data body") from None


async def read_payload(request: Request, limits, multipart: bool = False
                       ) -> Tuple[Dict[str, Any], str]:
    """(fields, kind) with kind in json | msgpack | multipart; `limits` as for read_body."""
    body = await read_body(request, limits)
    ctype = _media_type(request.headers.get("content-type"))
    if ctype in _MSGPACK_TYPES:
        try:
            data = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several types
            why = client_text(str(exc), "malformed")
            raise bad_request(f"body is not valid msgpack: {why}") from None
        kind = "msgpack"
    elif ctype == "multipart/form-data" and multipart:
        return _multipart(body, request.headers["content-type"]), "multipart"
    elif ctype in ("application/json", "") or ctype.endswith("+json"):
        try:
            data = json.loads(body) if body else None
        except (ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
            raise bad_request(f"body is not valid JSON: {exc}") from None
        # JSON may spell a lone UTF-16 surrogate (\ud800..\udfff) that is no Unicode text and
        # makes the tokenizer raise a TypeError (a 500); only escapes can carry one, so look
        # only when the raw body has such an escape
        if b"\\u" in body and re.search(rb"\\u[dD][89a-fA-F]", body):
            try:
                json.dumps(data, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request("body has a lone UTF-16 surrogate escape (\\ud800-\\udfff): "
                                  "not valid Unicode text") from None
        kind = "json"
    else:
        accepted = "application/json or application/msgpack" + (
            " or multipart/form-data" if multipart else "")
        raise APIError(415, f"unsupported Content-Type {ctype!r}: send {accepted}",
                       code="unsupported_media_type")
    if not isinstance(data, dict):
        raise bad_request(f"body must be an object, got {type(data).__name__}")
    return data, kind


def parse_model(model: Type[M], data: Dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        msg, param = validation_message(exc)
        raise bad_request(msg, param=param) from None


def respond(payload: Any, as_msgpack: bool, status: int = 200) -> Response:
    if as_msgpack:
        return Response(msgpack.packb(payload, use_bin_type=True), status_code=status,
                        media_type=MSGPACK)
    return JSONResponse(payload, status_code=status)


__all__ = ["MSGPACK", "is_msgpack", "wants_msgpack", "read_body", "read_payload", "parse_model",
           "respond", "validation_message", "too_large", "BodyLimits", "body_timeout"]
