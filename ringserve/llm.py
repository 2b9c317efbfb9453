"""The public Python API: `ringserve.LLM` (see docs/architecture.md).

One LLM = one actor group of context_parallel_size (world_size) sequence shards, each on
tensor_parallel_size model workers (one GPU each, or CPU actors), plus the engine thread that
runs every request in flight through it as one batch per step (continuous batching). Safe to
call from several threads; `generate(list)` runs the list concurrently.
"""
from __future__ import annotations

import os
import queue
import warnings
from concurrent.futures import wait as futures_wait
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from .engine import (Engine, EngineConfig, RequestHandle, RequestOutput, ScoreOutput,
                     StreamDelta, check_async_scheduling)
from .doc_cache import doc_key, exact_ints
from .errors import InvalidRequestError
from .parallel import layout as layouts
from .parallel.step_attention import MLA_EXPAND_MIN_TOKENS
from .parallel.transport import DEFAULT_TIMEOUT_S, check_comm_host
from .sampling import SamplingParams, best_samples, expand_samples

Prompt = Union[str, Sequence[int]]
_DONE = object()
# CUDA scheduling defaults, per rank: the step budget (token-equivalents of the flops cost
# model), the least budget of a prompt running alone, and the decode-only steps after each step
# that carried prompt work beside decoding requests (interleaved prefill). On one H200, a 256K
# prefill beside 8 decoding streams (session 13): 2100 with k = 1 kept the streams' ITL at 2.91x
# solo with the prefill at 1.49x its solo time (targets 3x / 1.5x); 1536 with k = 0, the
# default until then, 3.27x / 1.38x; 2150 / 1: 2.98x / 1.46x; 3000 / 2: 2.89x / 1.48x
GPU_STEP_BUDGET = 2100
GPU_SOLO_BUDGET = 32768
GPU_INTERLEAVE_DECODE_STEPS = 1


def step_budgets(gpu: bool, world_size: int, max_num_batched_tokens: Optional[int] = None):
    """(the step budget, the solo budget factor) LLM uses: on CUDA GPU_STEP_BUDGET per rank
    unless given, and a factor that gives a lone prompt at least GPU_SOLO_BUDGET per rank (8x
    the budget when that is more); on CPU 512 and 4x."""
    if not gpu:
        return max_num_batched_tokens or 512, 4
    budget = max_num_batched_tokens or GPU_STEP_BUDGET * world_size
    return budget, max(8, -(-GPU_SOLO_BUDGET * world_size // budget))


def interleave_steps(gpu: bool, k: Optional[int]) -> int:
    """The decode-only steps after each mixed step LLM uses: k when given (EngineConfig
    checks it), else GPU_INTERLEAVE_DECODE_STEPS on CUDA and 0 on CPU."""
    if k is None:
        return GPU_INTERLEAVE_DECODE_STEPS if gpu else 0
    return k


def default_async_scheduling(gpu: bool, world_size: int, tp_size: int,
                             step_channel: Optional[str]) -> bool:
    """LLM's async scheduling when not given: on with CUDA at world size 1, no tensor
    parallelism and the tasks channel, the configuration its GPU test passed in (session 15,
    one H200); off elsewhere (several ranks: not run on GPUs yet; CPU: the steps are host-bound
    and the tests pin the synchronous engine's step order)."""
    channel = step_channel or os.environ.get("RINGSERVE_STEP_CHANNEL", "tasks")
    return gpu and world_size == 1 and tp_size == 1 and channel == "tasks"


def _is_ids(x) -> bool:
    if not isinstance(x, (list, tuple)) or len(x) == 0:
        return False
    return exact_ints(x) or all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _one_sample(params: SamplingParams) -> None:
    if params.n != 1 or params.best_of not in (None, 1):
        raise InvalidRequestError("stream and submit run one sample: call them once per sample "
                                  "(with its own seed), or use generate for n > 1 / best_of "
                                  "(expand_samples gives each sample's parameters)")


class _Stream:
    """Iterator of StreamDelta items, then the final RequestOutput. `close()` (or leaving a
    for-loop early and dropping it) cancels the request between decode steps."""

    def __init__(self, engine: Engine, ids: List[int], params: SamplingParams,
                 timeout_s: Optional[float]):
        self._q: "queue.Queue[Any]" = queue.Queue()
        self.handle: RequestHandle = engine.submit("generate", ids, params, on_delta=self._q.put,
                                                   timeout_s=timeout_s)
        self.handle.future.add_done_callback(lambda _f: self._q.put(_DONE))
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        item = self._q.get()
        if item is _DONE:
            self._finished = True
            return self.handle.result()   # the RequestOutput, or the request's error
        return item

    def close(self) -> None:
        if not self.handle.done():
            self.handle.cancel()
        self._finished = True

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class LLM:
    def __init__(self, model: Union[str, Path, dict], world_size: Optional[int] = None,
                 layout: str = "striped", device: str = "cpu", dtype: Optional[str] = None,
                 max_kv_tokens: Optional[int] = None,
                 document_cache_tokens: Optional[int] = None,
                 ray_address: Optional[str] = None, placement_strategy: Optional[str] = None,
                 page_size: Optional[int] = None, chunk_tokens: Optional[int] = None,
                 max_num_seqs: Optional[int] = None,
                 max_num_batched_tokens: Optional[int] = None,
                 passq_max_tokens: Optional[int] = None,
                 num_cpus_per_worker: float = 1.0,
                 cpu_kv_bytes: int = 256 << 20, memory_reserve_bytes: Optional[int] = None,
                 backend: str = "auto", transport_timeout_s: float = DEFAULT_TIMEOUT_S,
                 tokenizer: Any = "auto", cuda_graphs: Union[bool, str, None] = None,
                 step_timeout_s: Optional[float] = None, max_recoveries: int = 2,
                 cascade: bool = True, warmup: bool = True, fused_kernels: Optional[bool] = None,
                 max_cuda_graphs: int = 64,
                 schedule: Optional[str] = None,
                 extend_chunk: Optional[int] = None, decode_steps: Optional[int] = None,
                 progress_min_tokens: int = 0, context_parallel_size: Optional[int] = None,
                 tensor_parallel_size: int = 1, comm_host: Optional[str] = None,
                 worker_torch_threads: Optional[int] = None, step_channel: Optional[str] = None,
                 interleave_decode_steps: Optional[int] = None,
                 async_scheduling: Optional[bool] = None,
                 mla_expand_min_tokens: Optional[int] = MLA_EXPAND_MIN_TOKENS,
                 pipeline_steps: bool = True, pipeline_depth: int = 1,
                 in_process: bool = False):
        """`model`: a local HF checkpoint directory, or {"config": hf_config_dict, "seed": int}
        for random weights built on each worker (benchmarks; no tokenizer then).

        Continuous batching: up to `max_num_seqs` requests run at once (default 64 on CPU, 256
        on CUDA); every step decodes one token of each and adds prompt chunks of at most
        `max_num_batched_tokens` tokens (default 512 on CPU; on CUDA 2100 token-equivalents per
        rank, where a token late in a long prompt counts more for its attention), so a long
        prefill never stops the streams; while one prompt runs alone it takes 4x that (CPU), or
        on CUDA 32768 per rank or 8x the budget, whichever is more; prompt continuations of at
        most `passq_max_tokens` (default 256 / 2048) run pass-Q. `interleave_decode_steps` k
        (default 1 on CUDA, 0 on CPU): after a step that carried prompt work beside decoding
        requests, the next k steps decode alone (replayed graphs on CUDA), so a mixed step's
        fixed cost comes once per k + 1 tokens and a bigger budget gives the same mean
        inter-token latency with fewer steps (prompt work and admissions wait those k steps).
        `async_scheduling` (not with tensor parallelism): while a step runs, the engine plans
        and sends the next when every running request is decoding, so the actors start it as
        soon as the step before ends (the engine's own work and the Ray round trip leave the
        GPU's path; a request that stops has one wasted row in the step after; with several
        ranks they share each step's sampled tokens, one small all-reduce). Default (None): on
        with CUDA at world size 1 and the tasks channel (where its GPU test ran: 12-17% less
        time a token on one H200), off elsewhere; True / False force it. `pipeline_steps`
        (with async scheduling at world size 1): a step is launched on the actor before the
        results of the one in flight are asked for, so its kernels are queued behind that
        step's while the round trips run (EngineConfig.pipeline_steps; False: one blocking
        call a step); `pipeline_depth` (default 1) steps are launched behind the one whose
        results the engine reads: 2 keeps one more queued while it reads, updates, plans and
        launches (for hosts whose round trip outlasts a step; no gain measured on one H200:
        EngineConfig.pipeline_depth).
        `layout` ("striped" or "ring") shards prompt chunks over the ranks. max_kv_tokens is
        for the whole group; default: from free memory (CUDA) or `cpu_kv_bytes` per rank (CPU). `page_size` default 16 on CPU, 64 on CUDA;
        `chunk_tokens` (activation chunk of the model) default 8192. `cuda_graphs` replays
        decode-only steps as captured graphs, one per (batch bucket, table width, shared
        prefix), each captured the first time a step needs it; default True on CUDA (2.6x
        faster decode at 128K on an H200), False elsewhere; False is the eager path; "emulate"
        runs the graph path eagerly on any device (tests). Each rank keeps at most
        `max_cuda_graphs` of them (each holds a memory pool), dropping the least recently
        replayed. `fused_kernels` (Triton backend:
        CUDA, or CPU under TRITON_INTERPRET=1): steps of up to 1024 tokens run fused Triton
        kernels (residual + norm, RoPE + K/V store, act * up; q|k|v and gate|up as one GEMM
        each), about 10 kernels a decode layer instead of ~49; default True on CUDA, False
        elsewhere (the torch path). `warmup` (CUDA) compiles and
        tunes the attention kernels for every shape bucket before the first request (seconds
        at start-up instead of mid-request). A worker fault rebuilds the
        group and in-flight requests recompute (at most `max_recoveries` times each).
        `step_channel`: how each step reaches the actors, "tasks" (a Ray task per actor a step;
        the default, or the RINGSERVE_STEP_CHANNEL variable's value) or "compiled" (a Ray
        Compiled Graph's shared-memory channels: faster decode tokens, slower first tokens of
        new requests on the GPU; docs/architecture.md, "The step channel").
        Deprecated: `schedule` (say `layout`), `extend_chunk` (`passq_max_tokens`),
        `decode_steps` (ignored), `progress_min_tokens` (ignored: progress is per chunk).

        Parallelism: `context_parallel_size` c sequence shards (the ring; `world_size` is its
        other name while t is 1), each on `tensor_parallel_size` t GPUs that split the model's
        heads, MLP and vocabulary (one node each): c x t GPUs in all. The default
        `placement_strategy` is STRICT_PACK (every GPU on one node) when t is 1, SPREAD (the
        TP groups over nodes, each group packed on one) when t > 1. `comm_host` (CPU, gloo):
        the address rank 0's rendezvous store listens on; default loopback when every shard
        actor runs on rank 0's node, else that node's address as Ray reports it.
        `worker_torch_threads`: torch's intra-op threads in each worker (default: what Ray
        gives an actor, one per CPU it reserves with `num_cpus_per_worker`).
        `mla_expand_min_tokens` (DeepSeek-V2's latent attention only): prompt chunks of at
        least this many tokens attend in the expanded form (per-head keys and values made from
        the latents on each rank: a long prefill ~20x faster on an H200), shorter ones and
        decodes in the absorbed form; None keeps every step absorbed. The cache and the ring
        hold the latent either way (docs/architecture.md, "Multi-head latent attention").

        `in_process` (world size 1, tensor parallel size 1): the one shard's worker runs in
        this process, called by the engine's thread, instead of in a Ray actor; Ray is not
        started at all. Each step is then a Python call instead of Ray tasks (two a pipelined
        decode step): DeepSeek-V2-Lite's 8K decode on one H200 2.72 -> 2.35 ms a token. Given up: the actor's isolation (a failed worker is rebuilt in this process;
        a fault that breaks the process's CUDA context cannot be recovered there) and
        `step_timeout_s` (refused: a call in the engine's thread cannot be abandoned);
        `ray_address`, `placement_strategy`, `num_cpus_per_worker` and `comm_host` do not
        apply. Default False (Ray actors)."""
        if schedule is not None:
            warnings.warn("LLM(schedule=...) is deprecated: the shard layout is now called "
                          "layout=...", DeprecationWarning, stacklevel=2)
            layout = schedule
        if extend_chunk is not None:
            warnings.warn("LLM(extend_chunk=...) is deprecated: say passq_max_tokens=...",
                          DeprecationWarning, stacklevel=2)
            passq_max_tokens = passq_max_tokens or extend_chunk
        if decode_steps not in (None, 1):
            warnings.warn("LLM(decode_steps=...) is deprecated and ignored: each engine step "
                          "decodes one token of every running request", DeprecationWarning,
                          stacklevel=2)
        from .parallel.tp import check_tp, parallel_sizes
        world_size, tp_size = parallel_sizes(world_size, context_parallel_size,
                                             tensor_parallel_size)
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        from ringserve.kernels import BACKENDS
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if cuda_graphs not in (None, False, True, "emulate"):
            raise ValueError(f"cuda_graphs must be True, False, 'emulate' or None (default: "
                             f"True on CUDA), got {cuda_graphs!r}")
        if fused_kernels not in (None, False, True):
            raise ValueError(f"fused_kernels must be True, False or None (default: True on "
                             f"CUDA), got {fused_kernels!r}")
        if isinstance(max_cuda_graphs, bool) or not isinstance(max_cuda_graphs, int) \
                or max_cuda_graphs < 1:
            raise ValueError(f"max_cuda_graphs must be an integer >= 1, got {max_cuda_graphs!r}")
        if worker_torch_threads is not None and (
                isinstance(worker_torch_threads, bool) or not isinstance(worker_torch_threads, int)
                or worker_torch_threads < 1):
            raise ValueError(f"worker_torch_threads must be an integer >= 1 or None, got "
                             f"{worker_torch_threads!r}")
        if mla_expand_min_tokens is not None and (
                isinstance(mla_expand_min_tokens, bool)
                or not isinstance(mla_expand_min_tokens, int) or mla_expand_min_tokens < 1):
            raise ValueError(f"mla_expand_min_tokens must be an integer >= 1 or None, got "
                             f"{mla_expand_min_tokens!r}")
        if not isinstance(in_process, bool):
            raise ValueError(f"in_process must be True or False, got {in_process!r}")
        if in_process and (world_size, tp_size) != (1, 1):
            raise ValueError(f"in_process=True runs one worker in this process: it needs "
                             f"context_parallel_size 1 and tensor_parallel_size 1 (got "
                             f"{world_size} and {tp_size}); larger groups run as Ray actors")
        if in_process and step_timeout_s is not None:
            raise ValueError("step_timeout_s cannot be enforced with in_process=True (the "
                             "step runs in the engine's own thread); leave it None or use "
                             "Ray actors")
        if in_process and step_channel == "compiled":
            raise ValueError("step_channel='compiled' is a Ray Compiled Graph between actors; "
                             "with in_process=True each step is a direct call")
        if cuda_graphs is None:
            cuda_graphs = device == "cuda"
        if fused_kernels is None:
            fused_kernels = device == "cuda"
        if cuda_graphs is True and device != "cuda":
            raise ValueError("cuda_graphs=True needs device='cuda'")
        layouts.check_layout(layout)
        check_comm_host(comm_host)
        if max_kv_tokens is not None and max_kv_tokens < world_size:
            raise ValueError(f"max_kv_tokens ({max_kv_tokens}) must be >= world_size "
                             f"({world_size})")
        gpu = device == "cuda"
        page_size = page_size or (64 if gpu else 16)
        # the step budget and interleaving: on CUDA 2100 token-equivalents per rank with one
        # decode-only step after each mixed one (GPU_STEP_BUDGET above: the trade-off measured
        # on one H200). A prompt alone takes at least 32768 per rank a step (8x the budget
        # when that is more), so a lone prefill is not slowed by the smaller budget
        budget, solo = step_budgets(gpu, world_size, max_num_batched_tokens)
        if async_scheduling is None:
            async_scheduling = default_async_scheduling(gpu, world_size, tp_size, step_channel)
        elif not isinstance(async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True, False or None (default: on with "
                             f"CUDA at world size 1), got {async_scheduling!r}")
        interleave_decode_steps = interleave_steps(gpu, interleave_decode_steps)
        # built once here, checked before any actor starts
        cfg = EngineConfig(layout=layout,
                           max_num_seqs=max_num_seqs or (256 if gpu else 64),
                           # per rank on CUDA: a step's chunk is split over the ranks, so the
                           # same step time (the streams' latency) takes world_size times more
                           max_num_batched_tokens=budget,
                           passq_max_tokens=passq_max_tokens or (2048 if gpu else 256),
                           cascade=cascade, cuda_graphs=bool(cuda_graphs),
                           prefill_cost="flops" if gpu else "tokens",
                           solo_budget_factor=solo,
                           document_cache_tokens=document_cache_tokens,
                           step_timeout_s=step_timeout_s, max_recoveries=max_recoveries,
                           progress_min_tokens=progress_min_tokens,
                           interleave_decode_steps=interleave_decode_steps,
                           async_scheduling=async_scheduling,
                           pipeline_steps=pipeline_steps, pipeline_depth=pipeline_depth,
                           **({} if step_channel is None else {"step_channel": step_channel}))
        if isinstance(model, Path):
            model = str(model)
        check_async_scheduling(cfg, tp_size)
        if tp_size > 1:   # before any actor starts: the split must fit the model's shape
            from .config import ModelConfig
            check_tp(ModelConfig.from_hf_dict(model["config"]) if isinstance(model, dict)
                     else ModelConfig.from_dir(model), tp_size)
        if placement_strategy is None:
            placement_strategy = "STRICT_PACK" if tp_size == 1 else "SPREAD"
        self.model = model
        self.world_size, self.layout, self.device = world_size, layout, device
        self.context_parallel_size, self.tensor_parallel_size = world_size, tp_size
        self.config = cfg

        self.tokenizer = None
        eos: List[int] = []
        if tokenizer == "auto" and not isinstance(model, dict):
            from .tokenizer import Tokenizer
            self.tokenizer = Tokenizer.from_dir(model)
        elif tokenizer not in ("auto", None):
            self.tokenizer = tokenizer
        if self.tokenizer is not None:
            eos = list(getattr(self.tokenizer, "eos_token_ids", []) or [])

        if not in_process:   # (in process: no Ray at all)
            self._start_ray(ray_address, world_size, tp_size, gpu)
        from ringserve.actors.model_worker import ModelShardWorker

        kv_tokens = None if max_kv_tokens is None else -(-max_kv_tokens // world_size)
        worker_kwargs = dict(model=model, dtype=dtype, page_size=page_size, kv_tokens=kv_tokens,
                             cpu_kv_bytes=cpu_kv_bytes,
                             memory_reserve_bytes=memory_reserve_bytes,
                             # norms, projections and the MLP run over chunks of this many
                             # tokens (the MLP's intermediate would otherwise be ~3.5x the
                             # hidden states of the whole shard, unbudgeted)
                             chunk_tokens=chunk_tokens or 8192, backend=backend,
                             cuda_graphs=cuda_graphs, fused_kernels=fused_kernels,
                             max_cuda_graphs=max_cuda_graphs,
                             torch_threads=worker_torch_threads,
                             mla_expand_min_tokens=mla_expand_min_tokens)
        self.in_process = in_process
        if in_process:
            from ringserve.actors.local_group import LocalGroup
            self._group = LocalGroup(device, ModelShardWorker, worker_kwargs)
        else:
            from ringserve.actors import ActorGroup
            self._group = ActorGroup(world_size, device=device, worker_cls=ModelShardWorker,
                                     placement_strategy=placement_strategy,
                                     num_cpus_per_worker=num_cpus_per_worker,
                                     worker_kwargs=worker_kwargs,
                                     transport_timeout_s=transport_timeout_s, tp_size=tp_size,
                                     comm_host=comm_host)
        try:
            if warmup and gpu:
                self._group.call("warmup")
            self._engine = Engine(self._group, self.tokenizer, eos, cfg)
        except BaseException:
            self._group.shutdown()
            raise

    @staticmethod
    def _start_ray(ray_address: Optional[str], world_size: int, tp_size: int,
                   gpu: bool) -> None:
        import ray  # only now: `import ringserve` stays light

        if ray.is_initialized():
            return
        ray.init(address=ray_address)
        gpus = ray.cluster_resources().get("GPU", 0)
        if (gpus < world_size * tp_size and gpu and ray_address is None
                and not os.environ.get("RAY_ADDRESS")):
            # a cluster started here does not grow: say so now, not after a timeout
            raise ValueError(
                f"context_parallel_size ({world_size}) x tensor_parallel_size ({tp_size}) "
                f"= {world_size * tp_size} GPUs, this machine's Ray cluster has {gpus:g}")

    @property
    def schedule(self) -> str:
        """Deprecated name of `layout`."""
        warnings.warn("LLM.schedule is deprecated: say LLM.layout", DeprecationWarning,
                      stacklevel=2)
        return self.layout

    # ---- helpers ----

    def _encode(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this LLM has no tokenizer: pass token ids")
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) and prompt and exact_ints(prompt):
            return list(prompt)     # the common case, without Python per token
        if _is_ids(prompt):
            return [int(t) for t in prompt]
        raise InvalidRequestError("a prompt is a string or a non-empty list of token ids, got "
                                  f"{type(prompt).__name__} {str(prompt)[:60]!r}")

    def _prompts(self, prompts) -> List[List[int]]:
        if isinstance(prompts, str) or _is_ids(prompts):
            return [self._encode(prompts)]
        if isinstance(prompts, (list, tuple)) and prompts:
            return [self._encode(p) for p in prompts]
        raise InvalidRequestError("prompts must be a string, a list of token ids, or a "
                                  "non-empty list of those")

    # ---- the API ----

    def generate(self, prompts, params: Optional[SamplingParams] = None,
                 timeout_s: Optional[float] = None) -> List[RequestOutput]:
        """One RequestOutput per prompt. With params.n > 1 (or best_of) the samples of a
        prompt share its prefill (the engine forks the prompt's KV) and decode together; the
        output is the first (best) sample, with all n in `.outputs`."""
        params = params or SamplingParams()
        each = expand_samples(params)
        handles = [[self._engine.submit("generate", ids, p, timeout_s=timeout_s) for p in each]
                   for ids in self._prompts(prompts)]
        out = []
        for hs in handles:
            got = [h.result() for h in hs]
            if len(each) == 1:
                out.append(got[0])
                continue
            best = best_samples(got, params)
            out.append(replace(best[0], outputs=best))
        return out

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None,
               timeout_s: Optional[float] = None) -> Iterator[Union[StreamDelta, RequestOutput]]:
        params = params or SamplingParams()
        _one_sample(params)
        return _Stream(self._engine, self._encode(prompt), params, timeout_s)

    def submit(self, prompt: Prompt, params: Optional[SamplingParams] = None, on_delta=None,
               timeout_s: Optional[float] = None) -> RequestHandle:
        """Queue one generation and return at once: `.result()` waits, `.cancel()` stops it;
        `on_delta(StreamDelta)` is called from the engine thread for every token."""
        params = params or SamplingParams()
        _one_sample(params)
        return self._engine.submit("generate", self._encode(prompt), params,
                                   on_delta=on_delta, timeout_s=timeout_s)

    def score(self, texts, timeout_s: Optional[float] = None) -> List[ScoreOutput]:
        handles = [self._engine.submit("score", ids, timeout_s=timeout_s)
                   for ids in self._prompts(texts)]
        return [h.result() for h in handles]

    def cache_document(self, document: Prompt, timeout_s: Optional[float] = None,
                       on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
                       progress_interval_s: float = 1.0) -> str:
        """Prefill a document (text or token ids) and pin its KV; returns its key. A request
        whose prompt starts with it reuses the KV (RequestOutput.num_cached_tokens).
        on_progress(RequestHandle.progress()) is called every progress_interval_s while it
        waits (queued, then the prefill's layers): a million tokens take minutes. It only ever
        sees "queued" or "running": the end is what this returns or raises."""
        if on_progress is not None and progress_interval_s <= 0:
            raise ValueError(f"progress_interval_s ({progress_interval_s}) must be > 0")
        h = self._engine.submit("cache_document", self._encode(document), timeout_s=timeout_s)
        if on_progress is None:
            return h.result()
        # wait() rather than result(timeout): the request's own RequestTimeoutError is a
        # TimeoutError too, and must reach the caller
        while not futures_wait([h.future], timeout=progress_interval_s).done:
            p = h.progress()
            if p["state"] in ("queued", "running"):  # it may have ended since the wait
                on_progress(p)
        return h.result()

    def document_key(self, document: Prompt) -> str:
        """The key `cache_document(document)` returns, known before its prefill ends: a
        `drop_document(key)` meanwhile cancels that prefill and frees its pages."""
        import torch

        return doc_key(torch.tensor(self._encode(document), dtype=torch.int32))

    def drop_document(self, key: str) -> bool:
        """Unpin and free a cached document; one still being prefilled is cancelled (its
        `cache_document` raises RequestCancelledError). False if nothing had that key."""
        return self._engine.submit("drop_document", key).result()

    @property
    def capacity_tokens(self) -> int:
        return self._engine.capacity_tokens

    def stats(self) -> Dict[str, Any]:
        out = self._engine.stats()   # the engine counts shards: world_size is c
        out.update(context_parallel_size=self.context_parallel_size,
                   tensor_parallel_size=self.tensor_parallel_size, in_process=self.in_process)
        return out

    def shutdown(self) -> None:
        eng = getattr(self, "_engine", None)
        if eng is not None:
            eng.shutdown()
        group = getattr(self, "_group", None)
        if group is not None:
            group.shutdown()
            self._group = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


__all__ = ["LLM", "SamplingParams", "RequestOutput", "StreamDelta", "ScoreOutput"]
