"""The main job on its embedded default (`bash dev demo`, `ringserve demo`).

A local Ray cluster on CPU, the service with 2 shard actors, a small random-weight model the
project makes itself, a long generated document uploaded over HTTP, questions asked about it, the
answers and the timings printed. Every step goes through the real components: the tokenizer, Ray
actors with a gloo ring, Ray Serve, HTTP.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / ".cache" / "demo-model"
QUESTIONS = ("Who is the master of the ship?", "What cargo was loaded, and in which port?")


def _json(url: str, timeout: float, body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """GET url, or POST body as JSON; the JSON answer (an HTTP error ends the demo)."""
    req = url if body is None else urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"demo: {url} answered HTTP {e.code}: "
                         f"{e.read().decode(errors='replace')}") from None


def _describe(progress: Dict[str, Any]) -> str:
    if progress.get("state") == "queued":
        return "queued"
    if progress.get("phase") == "prefill":
        return f"prefill: {progress['done']} of {progress['total']} tokens done"
    return progress.get("phase") or "starting"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ringserve demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help=f"checkpoint directory (default: the demo model, made in {DEFAULT_MODEL_DIR})")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--layout", choices=("striped", "ring"), default="striped")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--doc-tokens", type=int, default=24000,
                   help="approximate length of the generated sample document, in tokens")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--question", action="append", default=None)
    a = p.parse_args(argv)
    if a.doc_tokens < 16:
        p.error(f"--doc-tokens ({a.doc_tokens}) must be >= 16")
    t_start = time.perf_counter()

    model = a.model
    if model is None:
        from ringserve.demo_model import make_demo_model

        t = time.perf_counter()
        model = str(make_demo_model(DEFAULT_MODEL_DIR))
        print(f"[demo] demo model (random weights, trained BPE tokenizer): {model} "
              f"({time.perf_counter() - t:.1f} s)", flush=True)

    from ringserve.serve.launch import ray_on_loopback

    ray_on_loopback()  # the demo's cluster is this machine's alone: Ray's ports on loopback
    import ray

    from ringserve.sample_document import sample_document
    from ringserve.serve import run

    t = time.perf_counter()
    # Logical CPUs: one per shard actor plus room for Serve's controller, proxy and replica.
    # address="local": always a fresh local cluster, never one that happens to run here already
    ray.init(address="local", num_cpus=max(os.cpu_count() or 2, a.world_size + 3),
             include_dashboard=False,
             log_to_driver=False)
    print(f"[demo] local Ray cluster up ({time.perf_counter() - t:.1f} s)", flush=True)
    t = time.perf_counter()
    url = run(model, world_size=a.world_size, layout=a.layout, device=a.device,
              port=a.port, blocking=False)
    print(f"[demo] service ready at {url} with {a.world_size} {a.device} shard actors, layout "
          f"{a.layout} ({time.perf_counter() - t:.1f} s)", flush=True)

    text = sample_document(n_tokens=a.doc_tokens, seed=7)
    print(f"[demo] uploading a generated {len(text):,}-character document "
          f"(a charter party and ship's log)...", flush=True)
    t = time.perf_counter()
    # wait=false: 202 at once, the prefill runs in the background and the document's card shows
    # its progress until it is ready
    doc = _json(f"{url}/v1/documents", 600,
                {"text": text, "name": "charter-party", "wait": False})
    last = None
    while doc["status"] == "prefilling":
        time.sleep(2.0)
        doc = _json(f"{url}/v1/documents/{doc['id']}", 60)
        line = _describe(doc["progress"]) if "progress" in doc else None
        if line is not None and line != last:
            print(f"[demo]   {doc['num_tokens']:,} tokens, {line} "
                  f"({doc['progress'].get('elapsed_s', 0):.0f} s)", flush=True)
            last = line
    if doc["status"] != "ready":
        raise SystemExit(f"demo: the document's prefill failed: {doc.get('error')}")
    print(f"[demo] document {doc['id']}: {doc['num_tokens']:,} tokens, prefilled over "
          f"{a.world_size} shards in {doc['prefill_s']:.1f} s "
          f"(upload + tokenize + prefill {time.perf_counter() - t:.1f} s)", flush=True)

    for q in a.question or QUESTIONS:
        t = time.perf_counter()
        ans = _json(f"{url}/v1/documents/{doc['id']}/ask", 3600,
                    {"question": q, "max_tokens": a.max_tokens, "temperature": 0})
        tim = ans.get("timings", {})
        print(f"\nQ: {q}\nA: {ans['answer'].strip()!r}\n   [{ans['usage']['completion_tokens']} "
              f"tokens; {ans['num_cached_tokens']:,} document tokens reused from the KV cache, "
              f"not prefilled again; time to first token {tim.get('ttft_s', float('nan')):.2f} s, "
              f"total {time.perf_counter() - t:.2f} s]", flush=True)

    print(f"\n[demo] done in {time.perf_counter() - t_start:.1f} s.\n"
          "The answers are meaningless words: the demo model has random weights. Everything else "
          "is real:\nthe document was sharded over Ray actors, attention ran as a ring over them, "
          "and the answers came\nfrom the cached document KV over HTTP.\n"
          "To use a real checkpoint and GPUs:\n"
          "  .venv/bin/pip install -e '.[gpu]'\n"
          "  .venv/bin/ringserve serve --model /path/to/Llama-3.1-8B-Instruct --world-size 2 "
          "--device cuda\n"
          "or here: bash dev demo --model /path/to/checkpoint --device cuda --world-size 2",
          flush=True)
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
