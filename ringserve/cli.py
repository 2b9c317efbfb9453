"""`ringserve` command line: serve, batch, demo, convert, make-demo-model."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _serve(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="ringserve serve",
                                description="Start the HTTP service (Ray Serve) for one model.")
    p.add_argument("--model", required=True,
                   help="local HuggingFace-format checkpoint directory, or a .gguf file")
    p.add_argument("--world-size", type=int, default=None,
                   help="GPUs (or CPU actors) per actor group: the sequence is sharded over them "
                        "(another name for --context-parallel-size, without tensor parallelism)")
    p.add_argument("--context-parallel-size", "--cp", type=int, default=None,
                   help="sequence shards per actor group (the ring); default 1")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=None,
                   help="GPUs per shard splitting the model's heads, MLP and vocabulary (one "
                        "node each); the group uses cp x tp GPUs. Default 1")
    p.add_argument("--layout", choices=("striped", "ring"), default=None,
                   help="shard layout of prompt chunks over the group (default striped)")
    p.add_argument("--schedule", choices=("striped", "ring"), default=None,
                   help=argparse.SUPPRESS)  # deprecated name of --layout
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests decoded together in each step (default 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens per step; long prompts go in chunks of this size while "
                        "running requests keep decoding (default 512 on CPU, 2100 per GPU on "
                        "CUDA, where a token late in a long prompt counts more for its "
                        "attention; a prompt running alone takes more)")
    p.add_argument("--interleave-decode-steps", type=int, default=None,
                   help="decode-only steps after each step that carried prompt work beside "
                        "decoding requests: steadier streams under a long prefill (default 1 "
                        "on CUDA, 0 on CPU)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan and send the next decode step while one runs (the engine's own "
                        "work and the Ray round trip leave the GPU's path; not with --tp). "
                        "Default: on with CUDA at one GPU, off elsewhere")
    p.add_argument("--pipeline-steps", action=argparse.BooleanOptionalAction, default=None,
                   help="with async scheduling at one GPU: launch each decode step on the "
                        "worker before the one in flight is read, so the GPU does not idle "
                        "for the round trip (default on; --no-pipeline-steps: one blocking "
                        "call a step)")
    p.add_argument("--pipeline-depth", type=int, default=None, metavar="N",
                   help="pipelined decode steps in flight at once, 1..4 (default 1; 2 keeps "
                        "one more queued while the engine reads a step's results)")
    p.add_argument("--in-process", action="store_true", default=None,
                   help="one GPU (no --cp/--tp): the worker runs inside the serving replica "
                        "instead of a Ray actor of its own: each step a direct call, not Ray "
                        "tasks (faster decode; a failed worker is rebuilt in the replica). "
                        "Needs --device")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--cuda-graphs", choices=("on", "off"), default=None,
                   help="replay decode steps as captured CUDA graphs (default on with CUDA; "
                        "off: eager steps)")
    p.add_argument("--fused-kernels", choices=("on", "off"), default=None,
                   help="fused Triton kernels for steps of few tokens (default on with CUDA; "
                        "off: the torch path)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-replicas", type=int, default=1, help="actor groups (replicas)")
    p.add_argument("--max-kv-tokens", type=int, default=None,
                   help="KV tokens per group (default: from free memory)")
    p.add_argument("--max-queue", type=int, default=None, help="queued requests before 429")
    p.add_argument("--request-timeout-s", type=float, default=None,
                   help="a request's whole deadline (queue + prefill + decode) before 504")
    p.add_argument("--transport-timeout-s", type=float, default=None,
                   help="longest wait on a shard peer before the group is rebuilt (503)")
    p.add_argument("--comm-host", default=None,
                   help="CPU shard actors: the address rank 0's gloo store listens on (default "
                        "loopback on one node, else the node's Ray address)")
    p.add_argument("--max-body-mb", type=float, default=None, help="larger bodies get 413")
    p.add_argument("--body-timeout-s", type=float, default=None,
                   help="longest pause while a request body arrives before 408 (default 30)")
    p.add_argument("--min-body-rate", type=float, default=None,
                   help="bytes/s a body must average once --body-timeout-s has passed, else "
                        "408 (default 16384; 0: no rate)")
    p.add_argument("--max-prompts", type=int, default=None,
                   help="prompts in one /v1/completions request before 400 (default 32)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (recommended off loopback)")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    a = p.parse_args(argv)
    if a.schedule is not None:
        print("ringserve serve: --schedule is deprecated, say --layout", file=sys.stderr)
        a.layout = a.layout or a.schedule
    from ringserve.serve import run

    opts = {k: v for k, v in dict(dtype=a.dtype, max_kv_tokens=a.max_kv_tokens,
                                  max_queue=a.max_queue, request_timeout_s=a.request_timeout_s,
                                  transport_timeout_s=a.transport_timeout_s,
                                  comm_host=a.comm_host,
                                  max_body_mb=a.max_body_mb, api_key=a.api_key, num_replicas=a.num_replicas,
                                  ray_address=a.ray_address, device=a.device,
                                  max_num_seqs=a.max_num_seqs,
                                  max_num_batched_tokens=a.max_num_batched_tokens,
                                  interleave_decode_steps=a.interleave_decode_steps,
                                  async_scheduling=a.async_scheduling,
                                  pipeline_steps=a.pipeline_steps,
                                  pipeline_depth=a.pipeline_depth,
                                  in_process=a.in_process,
                                  body_timeout_s=a.body_timeout_s,
                                  min_body_rate=a.min_body_rate,
                                  max_prompts=a.max_prompts,
                                  context_parallel_size=a.context_parallel_size,
                                  tensor_parallel_size=a.tensor_parallel_size,
                                  cuda_graphs=_on_off(a.cuda_graphs),
                                  fused_kernels=_on_off(a.fused_kernels)).items()
            if v is not None}
    try:
        run(a.model, world_size=a.world_size, layout=a.layout or "striped", host=a.host,
            port=a.port,
            blocking=True, **opts)
    except (ValueError, FileNotFoundError) as exc:  # bad arguments: a message, not a traceback
        p.error(str(exc))
    return 0


def _on_off(v: Optional[str]) -> Optional[bool]:
    return None if v is None else v == "on"


def _make_demo_model(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="ringserve make-demo-model",
                                description="Write the small random-weight demo checkpoint.")
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from ringserve.demo_model import make_demo_model

    print(make_demo_model(a.path, seed=a.seed))
    return 0


def _convert(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="ringserve convert",
                                description="Write a GGUF checkpoint as a HuggingFace safetensors "
                                            "directory (dequantized).")
    p.add_argument("model", help="the .gguf file")
    p.add_argument("out_dir", help="the directory to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the written weights (default bfloat16)")
    a = p.parse_args(argv)
    from ringserve.gguf import convert_gguf

    try:
        out = convert_gguf(a.model, a.out_dir, dtype=a.dtype)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        p.error(str(exc))
    print(out)
    return 0


COMMANDS = {
    "serve": _serve,
    "batch": lambda argv: __import__("ringserve.batch", fromlist=["main"]).main(argv),
    "demo": lambda argv: __import__("ringserve.demo", fromlist=["main"]).main(argv),
    "make-demo-model": _make_demo_model,
    "convert": _convert,
    "plan": lambda argv: __import__("ringserve.planner", fromlist=["main"]).main(argv),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: ringserve {serve,batch,demo,convert,plan,make-demo-model} [options]\n"
              "  serve            start the HTTP service\n"
              "  batch            process a JSONL of documents (also: python -m ringserve.batch)\n"
              "  demo             the embedded default: demo model, local Ray, a long document\n"
              "  convert          write a .gguf checkpoint as a HuggingFace safetensors directory\n"
              "  plan             (TP, CP) splits of N GPUs: weights/GPU, KV tokens, prefill time\n"
              "  make-demo-model  write the small random-weight demo checkpoint")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(COMMANDS[argv[0]](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
