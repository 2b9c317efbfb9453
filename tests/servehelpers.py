"""Helpers shared by the test modules that run a real Serve HTTP proxy or a Ray head."""
from __future__ import annotations

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
