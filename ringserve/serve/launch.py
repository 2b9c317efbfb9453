"""`build_app(args)` (the import path of `serve run` / `serve deploy` / KubeRay) and `run(...)`
(what `ringserve serve` and the demo call: Ray, Serve's HTTP proxy and the app, then wait until
the model is loaded)."""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Optional

from ringserve.serve.config import ServeArgs

APP_NAME = "ringserve"
# Requests a replica accepts at once beyond its own queue: probes, GETs, document housekeeping.
# Serve must not hold requests back below our max_queue, or 429s would never be answered.
_EXTRA_ONGOING = 32


def build_app(args: Optional[Dict[str, Any]] = None):
    """The Serve application for `args` (see ServeArgs); raises ValueError on bad arguments."""
    cfg = ServeArgs.from_dict(args)
    from ringserve.serve.app import RingServe

    registry = None
    if cfg.num_replicas > 1:  # documents must be reachable from every replica
        from ringserve.serve.registry import DocumentRegistry
        registry = DocumentRegistry.bind()
    return RingServe.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_queue + 1 + _EXTRA_ONGOING,
        ray_actor_options=replica_resources(cfg),
    ).bind(cfg.to_dict(), registry)


def replica_resources(cfg) -> Dict[str, Any]:
    """The serving replica's Ray resources: its own CPUs, plus the worker's when it holds the
    worker in process (in_process: the GPU with device cuda, and num_cpus_per_worker)."""
    if not cfg.in_process:
        return {"num_cpus": cfg.replica_num_cpus}
    out = {"num_cpus": cfg.replica_num_cpus + cfg.num_cpus_per_worker}
    if cfg.device == "cuda":
        out["num_gpus"] = 1
    return out


def wait_ready(url: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> Dict[str, Any]:
    """Poll GET {url}/ready until the model is loaded; raise with the server's message if loading
    failed or `timeout_s` passed."""
    t_end = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < t_end:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/ready", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            last = f"HTTP {e.code}: {body}"
            if "model_load_failed" in body:
                raise RuntimeError(f"the model failed to load: {body}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = str(e)
        time.sleep(poll_s)
    raise TimeoutError(f"{url} not ready after {timeout_s:g} s (last: {last})")


# Ray takes the loopback address as the node's address (so GCS, raylet, workers and the metrics
# exporter listen on 127.0.0.1 only) when it believes clusters are off: the switch that Ray
# reads for Windows and macOS, read on Linux too.
_RAY_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_on_loopback() -> bool:
    """Make the next local Ray cluster of this process listen on loopback only. Must run before
    `import ray` (Ray reads the switch when it is imported); returns False when too late."""
    if "ray" in sys.modules:
        return False
    os.environ.setdefault(_RAY_LOCAL_ONLY, "0")
    return True


def _check_ray_address() -> None:
    import ray

    ip = ray.util.get_node_ip_address()
    if ip not in ("127.0.0.1", "::1", "localhost"):
        print(f"ringserve: warning: this local Ray cluster listens on {ip} (Ray was imported "
              "before ringserve could keep it on loopback): firewall its ports (docs/deploy.md)",
              file=sys.stderr, flush=True)


def run(model: str, world_size: Optional[int] = None, host: str = "127.0.0.1", port: int = 8000,
        blocking: bool = True, ray_address: Optional[str] = None, name: str = APP_NAME,
        ready_timeout_s: float = 900.0, **options) -> str:
    """Start a local Ray cluster (or join `ray_address`; an already initialized Ray is used as
    it is), Serve's HTTP proxy on host:port and the app; wait until
    the model is loaded and return the base URL. `blocking=True` then serves until Ctrl-C.

    options: the other build_app arguments (layout, max_num_seqs, device, dtype, max_kv_tokens, api_key,
    max_queue, request_timeout_s, max_body_mb, num_replicas, ...).
    """
    args = {"model": model, **options}
    if world_size is not None:
        args["world_size"] = world_size
    checked = ServeArgs.from_dict(args)  # fail on bad arguments before starting anything
    if ray_address is None and not os.path.isdir(model):
        from ringserve.gguf import check_gguf, is_gguf
        if not is_gguf(model):
            raise FileNotFoundError(f"model directory {model!r} does not exist")
        check_gguf(model)  # a bad GGUF file fails here, before any actor starts
    if ray_address is None and checked.tensor_parallel_size > 1:
        # the split must fit the model's heads: say so here, not in a replica's load error
        from ringserve.config import ModelConfig
        from ringserve.parallel.tp import check_tp
        check_tp(ModelConfig.from_dir(model), checked.tensor_parallel_size)
    if ray_address is None:  # a local model (directory or .gguf): hand Ray its absolute path
        args["model"] = os.path.abspath(model)
        # a cluster of this machine alone: nothing outside it needs Ray's ports, whatever `host`
        # the HTTP service binds
        ray_on_loopback()
    import ray
    from ray import serve

    if not ray.is_initialized():
        # "local": a fresh cluster of this machine, never a stray one that happens to run here;
        # pass ray_address="auto" (or host:port) to join a cluster on purpose
        ray.init(address=ray_address or "local")
        if ray_address is None:
            _check_ray_address()
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=name, route_prefix="/")
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{probe_host}:{port}"
    wait_ready(url, ready_timeout_s)
    print(f"ringserve: {args['model']} ready at {url}/v1 (OpenAI-compatible; documents at "
          f"{url}/v1/documents)", flush=True)
    if not blocking:
        return url
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(name)
    return url


__all__ = ["build_app", "run", "wait_ready", "ray_on_loopback", "APP_NAME"]
