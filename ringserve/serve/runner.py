"""EngineRunner: the bridge between the async HTTP replica and the synchronous LLM.

The engine batches every request in flight (continuous batching: up to `concurrency` run at
once, the rest wait in the engine's own FIFO queue), so the runner holds no slot: it hands each
request to the engine at once and only bounds how many are in flight, `concurrency +
max_queue` (beyond -> 429). Every LLM call runs in a worker thread so the event loop keeps
answering /health, other clients and disconnects. A request has one deadline covering its wait,
prefill and decode (past it -> 504).

A worker thread can not be interrupted: a stream whose client goes away or whose deadline
passes closes its LLM iterator (which cancels the request in the engine at its next step); a
blocking call (a document's prefill) runs to its end and `on_late_result` disposes of what it
produced.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from ringserve.serve.errors import APIError

_END = object()


@dataclass
class Deadline:
    at: float  # time.monotonic()

    @classmethod
    def after(cls, seconds: float) -> "Deadline":
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        return self.at - time.monotonic()


def timeout_error(what: str, seconds: float) -> APIError:
    return APIError(504, f"{what} did not finish within the request timeout ({seconds:g} s)",
                    code="timeout")


class EngineRunner:
    def __init__(self, max_queue: int, timeout_s: float, on_queue_change: Callable[[int, int], None]
                 = lambda waiting, running: None, concurrency: int = 1):
        if max_queue < 0:
            raise ValueError(f"max_queue ({max_queue}) must be >= 0")
        if concurrency < 1:
            raise ValueError(f"concurrency ({concurrency}) must be >= 1")
        self.max_queue = max_queue
        self.concurrency = concurrency     # requests the engine runs at once (max_num_seqs)
        self.timeout_s = timeout_s
        self._on_queue_change = on_queue_change
        # one thread per request in flight (+ housekeeping): they mostly wait on the engine
        self._pool = concurrent.futures.ThreadPoolExecutor(
            concurrency + max_queue + 4, thread_name_prefix="ringserve")
        self.in_flight = 0

    @property
    def running(self) -> int:
        return min(self.in_flight, self.concurrency)

    @property
    def waiting(self) -> int:
        return self.in_flight - self.running

    def deadline(self) -> Deadline:
        return Deadline.after(self.timeout_s)

    def _changed(self) -> None:
        self._on_queue_change(self.waiting, self.running)

    def check_room(self) -> None:
        """429 if a request arriving now would find the queue full."""
        # no await between this check and `in_flight += 1`: requests arriving in the same loop
        # iteration see each other
        if self.in_flight >= self.concurrency + self.max_queue:
            raise APIError(429, f"the request queue is full ({self.waiting} waiting, "
                                f"max_queue={self.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})

    async def _acquire(self, deadline: Deadline, what: str, bounded: bool = True) -> None:
        if bounded:
            self.check_room()
        if deadline.left() <= 0:
            raise timeout_error(what + " (waiting in the queue)", self.timeout_s)
        self.in_flight += 1
        self._changed()

    def _release_from_thread(self, loop: asyncio.AbstractEventLoop) -> Callable[[Any], None]:
        def release(_=None):
            def on_loop():
                self.in_flight -= 1
                self._changed()
            try:
                loop.call_soon_threadsafe(on_loop)
            except RuntimeError:  # loop closed: the replica is shutting down
                pass
        return release

    async def run_free(self, fn: Callable[..., Any], *args) -> Any:
        """Run a call that does not need the engine slot (tokenizing) in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def call(self, fn: Callable[[], Any], deadline: Deadline, what: str,
                   on_late_result: Optional[Callable[[Any], None]] = None,
                   bounded: bool = True) -> Any:
        """Run `fn()` in a worker thread as one request in flight; 504 past the deadline.
        `bounded=False` (housekeeping that frees memory) waits even when the queue is full."""
        await self._acquire(deadline, what, bounded)
        loop = asyncio.get_running_loop()
        lock = threading.Lock()
        state = {"abandoned": False, "done": False, "result": None}

        def work():
            result = fn()
            with lock:  # decide atomically whether the waiter still takes the result
                late = state["abandoned"]
                state["done"], state["result"] = True, result
            if late and on_late_result is not None:
                on_late_result(result)
            return result

        fut = self._pool.submit(work)
        fut.add_done_callback(self._release_from_thread(loop))
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)),
                                          max(deadline.left(), 0.0))
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            with lock:
                if state["done"] and not isinstance(exc, asyncio.CancelledError):
                    return state["result"]  # finished in the instant of the timeout: keep it
                state["abandoned"] = True
                done, result = state["done"], state["result"]
            if done and on_late_result is not None:  # cancelled after it finished
                on_late_result(result)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise timeout_error(what, self.timeout_s) from None

    async def stream(self, open_iter: Callable[[], Iterator[Any]], deadline: Deadline, what: str,
                     after: Optional[Callable[[], None]] = None) -> AsyncIterator[Any]:
        """Iterate an LLM stream in a worker thread; yields its items on the event loop.

        Leaving the async iteration early (client gone, deadline, error) sets the cancel flag:
        the thread stops after the current token and closes the LLM iterator. `after()` runs in
        the thread once the stream is over (e.g. reading KV stats).
        """
        await self._acquire(deadline, what)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        opened: list = []  # the iterator, once the worker thread has it

        def put(kind, value):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:
                cancel.set()

        def work():
            it = None
            try:
                it = open_iter()
                opened.append(it)
                for item in it:
                    if cancel.is_set():
                        break
                    put("item", item)
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                put("error", exc)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    try:
                        close()  # cancels the request inside the engine if it is still running
                    except Exception:  # noqa: BLE001
                        pass
                if after is not None:
                    try:
                        after()
                    except Exception:  # noqa: BLE001
                        pass
                put("end", None)

        fut = self._pool.submit(work)
        fut.add_done_callback(self._release_from_thread(loop))
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), max(deadline.left(), 0.0))
                except asyncio.TimeoutError:
                    raise timeout_error(what, self.timeout_s) from None
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            cancel.set()
            # Also close from here: the worker may be blocked waiting for the next token (a
            # long prefill); LLM streams accept close() from another thread and cancel at once.
            # A plain generator refuses while it runs (ValueError): the worker closes it then.
            for it in opened:
                try:
                    it.close()
                except (ValueError, AttributeError):
                    pass

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["EngineRunner", "Deadline", "timeout_error"]
