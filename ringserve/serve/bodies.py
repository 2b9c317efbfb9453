"""Request bodies in JSON, msgpack or multipart, under a size limit; responses in the same kind.

msgpack exists for multi-megabyte documents: smaller on the wire than JSON and much faster to
parse, and token ids may travel as raw little-endian uint32 bytes. Multipart is parsed with the
standard library's MIME parser, so no extra package is needed for file uploads.
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import re
from typing import Any, Dict, Optional, Tuple, Type, TypeVar

import msgpack
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from ringserve.serve.errors import APIError, bad_request

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


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body; 413 as soon as it is known to be over `limit` (Content-Length, or the bytes
    received so far for a chunked upload), before buffering the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _multipart(body: bytes, content_type: str) -> Dict[str, Any]:
    """Form fields of a multipart/form-data body: files as {"filename", "content_type", "data"}."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise bad_request("malformed multipart/form-data body")
    fields: Dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            fields[name] = {"filename": filename, "content_type": part.get_content_type(),
                            "data": data}
        else:
            fields[name] = data.decode(part.get_content_charset() or "utf-8", errors="replace")
    return fields


async def read_payload(request: Request, limit: int, multipart: bool = False
                       ) -> Tuple[Dict[str, Any], str]:
    """(fields, kind) with kind in json | msgpack | multipart."""
    body = await read_body(request, limit)
    ctype = _media_type(request.headers.get("content-type"))
    if ctype in _MSGPACK_TYPES:
        try:
            data = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several types
            raise bad_request(f"body is not valid msgpack: {exc}") from None
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


def validation_message(exc: ValidationError) -> Tuple[str, Optional[str]]:
    errs = exc.errors()
    parts, param = [], None
    for e in errs[:5]:
        where = ".".join(str(p) for p in e.get("loc", ())) or "body"
        param = param or where
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


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
           "respond", "validation_message", "too_large"]
