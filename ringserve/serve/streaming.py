"""Server-sent-event responses whose errors still get a proper HTTP status.

The first chunk is awaited before the response starts: a full queue, a timeout while waiting,
a bad prompt or a capacity error surface as 429/504/400/413 with OpenAI's error body. Errors
after that can only travel in-band: an SSE event {"error": {...}} (OpenAI's clients raise on it).
When the client goes away, Serve cancels the request; the chunk generator is closed, which closes
the engine stream and so cancels the generation.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from ringserve.serve.errors import api_error_from
from ringserve.serve.openai_format import error_event

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def sse_response(chunks: AsyncIterator[bytes],
                       record: Callable[[str], None]) -> StreamingResponse:
    """`chunks` yields encoded SSE events; `record(outcome)` is called once when it is over."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = b""
    except BaseException:
        await chunks.aclose()
        raise

    async def body():
        outcome = "ok"
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except Exception as exc:  # noqa: BLE001 - after the 200, errors go in-band
            err = api_error_from(exc)
            outcome = err.outcome
            yield error_event(err.body())
        finally:
            try:
                await chunks.aclose()
            finally:
                record(outcome)

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


__all__ = ["sse_response", "SSE_HEADERS"]
