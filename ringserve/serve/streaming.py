"""Server-sent-event responses whose errors still get a proper HTTP status when they can.

The first chunk is awaited before the response starts: a full queue, a bad prompt or a capacity
error surface as 429/400/413 with OpenAI's error body. But a long prompt can take minutes to
its first token, and a silent connection gets cut by proxies and client read timeouts; so if the
first chunk has not come within `keepalive_s`, the response starts anyway (200) and an SSE
comment (": keep-alive", ignored by SSE clients) is sent every `keepalive_s` until it does.
Errors after the start can only travel in-band: an SSE event {"error": {...}} (OpenAI's clients
raise on it). When the client goes away, Serve cancels the request; the chunk generator is
closed, which closes the engine stream and so cancels the generation, and the request counts as
"cancelled": Serve may also report the disconnect as an exception from receive() or send()
(TaskCancelledError, ClientDisconnect), which is swallowed here rather than logged as a server
error.
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Optional

from fastapi.responses import StreamingResponse

from ringserve.serve.errors import api_error_from, client_gone
from ringserve.serve.openai_format import error_event

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"


async def _next(chunks: AsyncIterator[bytes]) -> bytes:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return b""


async def _stop(task: "asyncio.Future", chunks: AsyncIterator[bytes]) -> None:
    """Cancel a pending first-chunk task and close the generator (after the task let go of it:
    closing a generator that is still running raises)."""
    if not task.done():
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - its cancellation or its error, both moot now
            pass
    try:
        await chunks.aclose()
    except RuntimeError:
        pass


class _SSEResponse(StreamingResponse):
    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - re-raised unless the client is gone
            if not client_gone(exc):
                raise
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:  # records "cancelled" (body's finally) now, not at GC
                try:
                    await aclose()
                except RuntimeError:  # still running in a cancelled task: it closes itself
                    pass


async def sse_response(chunks: AsyncIterator[bytes], record: Callable[[str], None],
                       keepalive_s: Optional[float] = None) -> StreamingResponse:
    """`chunks` yields encoded SSE events; `record(outcome)` is called once when it is over."""
    first_task = asyncio.ensure_future(_next(chunks))
    try:
        await asyncio.wait({first_task}, timeout=keepalive_s)
        if first_task.done():
            first_task.result()  # raises: the error gets its HTTP status
    except BaseException:
        await _stop(first_task, chunks)
        raise

    async def body():
        outcome = "ok"
        try:
            while not first_task.done():  # slow first token: keep the connection alive
                await asyncio.wait({first_task}, timeout=keepalive_s)
                if not first_task.done():
                    yield KEEPALIVE
            first = first_task.result()
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
            if not client_gone(exc):
                yield error_event(err.body())
        finally:
            try:
                await _stop(first_task, chunks)
            finally:
                record(outcome)

    return _SSEResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


__all__ = ["sse_response", "SSE_HEADERS", "KEEPALIVE"]
