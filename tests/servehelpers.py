"""Helpers shared by the test modules that run a real Serve HTTP proxy or a Ray head."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve() -> str:
    """A fresh Serve HTTP proxy on a free loopback port; returns its base URL.

    Shuts down a Serve left by another module first: it would keep its own port.
    """
    from ray import serve

    serve.shutdown()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def shard_pids() -> set:
    """pids of ModelShardWorker processes descending from this process (the local Ray cluster
    of the test session; another cluster on the machine is not ours)."""
    children: dict = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    found, todo = set(), [os.getpid()]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            try:
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::ModelShardWorker"):
                        found.add(c)
            except OSError:
                pass
    return found


class RecordingLLM:
    """An `llm_class` for the serve options' path: records the keyword arguments the Serve
    service builds its engine with, then fails the load (nothing to serve)."""
    seen: list = []

    def __init__(self, model, **kw):
        RecordingLLM.seen.append(kw)
        raise RuntimeError("RecordingLLM records its arguments and serves nothing")
