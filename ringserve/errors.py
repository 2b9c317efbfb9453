"""Errors raised by the engine and the public API (see docs/architecture.md)."""
from __future__ import annotations


class RingServeError(Exception):
    """Base class of every ringserve error."""


class InvalidRequestError(RingServeError, ValueError):
    """The request itself is wrong (bad parameters, empty prompt): retrying will not help."""


class CapacityError(InvalidRequestError):
    """The request needs more KV-cache tokens than the actor group can free for it.

    Raised before any work is done for the request.
    """

    def __init__(self, requested: int, capacity: int, detail: str = ""):
        self.requested = int(requested)
        self.capacity = int(capacity)
        self.detail = detail
        msg = (f"request needs {self.requested} KV tokens but the group can hold at most "
               f"{self.capacity} for it")
        super().__init__(msg + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # keep requested/capacity when pickled through Ray
        return (type(self), (self.requested, self.capacity, self.detail))


class WorkerFailedError(RingServeError):
    """A shard actor died or stopped answering; the group is rebuilt for the next request."""


class GraphCaptureError(RingServeError):
    """A decode step's CUDA graph could not be captured on a rank. The engine then recovers
    the step (rebuild, recompute) and decodes eagerly from there on; no request fails for it."""


class RequestTimeoutError(RingServeError, TimeoutError):
    """The request did not finish within its deadline."""


class RequestCancelledError(RingServeError):
    """The request was cancelled (stream closed or cancel() called) before it finished."""


__all__ = ["RingServeError", "InvalidRequestError", "CapacityError", "WorkerFailedError",
           "GraphCaptureError", "RequestTimeoutError", "RequestCancelledError"]
