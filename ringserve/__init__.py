"""ringserve: long-context LLM inference with sequence-parallel ring attention over Ray actors.

`from ringserve import LLM, SamplingParams, RequestOutput`. Names load on first use so that
`import ringserve` stays light (no torch, no Ray until needed).
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "LLM": "ringserve.llm",
    "SamplingParams": "ringserve.sampling",
    "RequestOutput": "ringserve.engine",
    "StreamDelta": "ringserve.engine",
    "ScoreOutput": "ringserve.engine",
}

__all__ = ["LLM", "SamplingParams", "RequestOutput", "StreamDelta", "ScoreOutput",
           "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ringserve' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
