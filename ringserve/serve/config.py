"""ServeArgs: the arguments of `build_app(args)` (serve config YAML, `ringserve serve`), checked.

Plain dataclass, no Ray: the HTTP edge uses pydantic for requests, but the application's own
configuration follows the house style (dataclass + __post_init__ messages that show the values).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional

LAYOUTS = ("ring", "striped")
SCHEDULES = LAYOUTS   # the old name
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool))


@dataclass
class ServeArgs:
    model: str
    # sequence shards (the ring); world_size is its other name while tensor_parallel_size is 1
    world_size: Optional[int] = None
    context_parallel_size: Optional[int] = None
    tensor_parallel_size: int = 1         # GPUs per shard splitting the model (one node each)
    layout: str = "striped"               # shard layout of prompt chunks ("schedule": deprecated)
    device: Optional[str] = None          # None: cuda when the Ray cluster has GPUs, else cpu
    dtype: Optional[str] = None           # None: the engine's default (bf16 on cuda, fp32 on cpu)
    max_kv_tokens: Optional[int] = None   # None: the engine sizes the KV cache from free memory
    document_cache_tokens: Optional[int] = None
    api_key: Optional[str] = None         # None: no authentication
    # continuous batching: requests the engine runs at once, and prompt tokens per step (None:
    # the engine's default, 512 on CPU, 2100 token-equivalents per GPU on CUDA): a long prefill
    # goes in chunks of this size while the running requests keep decoding
    max_num_seqs: int = 64
    max_num_batched_tokens: Optional[int] = None
    # decode-only steps after each step that carried prompt work beside decoding requests
    # (None: the engine's default, 1 on CUDA, 0 on CPU)
    interleave_decode_steps: Optional[int] = None
    # plan and send the next decode step while one runs (LLM's async_scheduling; no TP).
    # None: the engine's default (on with CUDA at world size 1, off elsewhere)
    async_scheduling: Optional[bool] = None
    # with async scheduling at world size 1: each decode step launched on the worker before the
    # one in flight is read (LLM's pipeline_steps). None: the engine's default (on)
    pipeline_steps: Optional[bool] = None
    # pipelined decode steps in flight at once, 1..4 (LLM's pipeline_depth). None: the
    # engine's default (1)
    pipeline_depth: Optional[int] = None
    # one shard on one GPU: its worker inside this replica instead of a Ray actor of its own
    # (LLM's in_process): each step a direct call instead of Ray tasks. The replica then
    # reserves the device (a GPU with device cuda), so device must be given. None/False: actors
    in_process: Optional[bool] = None
    # decode steps replayed as CUDA graphs, and the fused few-token Triton kernels. None: the
    # engine's default (both on with CUDA); False: the eager / torch path
    cuda_graphs: Optional[bool] = None
    fused_kernels: Optional[bool] = None
    max_queue: int = 64                   # requests waiting beyond max_num_seqs; more -> 429
    request_timeout_s: float = 600.0      # queueing + prefill + decode; beyond -> 504
    max_body_mb: float = 64.0             # request bodies beyond -> 413
    # a request body that pauses longer than this between two pieces, or that arrives slower
    # than min_body_rate bytes/s on average once body_timeout_s has passed -> 408 (slow clients
    # would otherwise hold a replica's request slots as long as they like)
    body_timeout_s: float = 30.0
    min_body_rate: float = 16384.0        # bytes/s; 0: only the pause limit
    max_prompts: int = 32                 # prompts in one /v1/completions request; more -> 400
    # a stream whose first token takes longer starts anyway, with SSE keep-alive comments
    # this often (a long prefill must not look like a dead connection to proxies and clients)
    sse_keepalive_s: float = 15.0
    # a collective wait between shard actors (a hung or dead peer) beyond -> the group is rebuilt
    # and the request fails with 503; also bounds how long one hung peer can stall the replica
    transport_timeout_s: float = 300.0
    num_replicas: int = 1                 # one replica = one LLM = one actor group
    model_name: Optional[str] = None      # name in /v1/models; None: the checkpoint folder's name
    default_max_tokens: int = 256         # chat / ask requests that give no max_tokens
    placement_strategy: Optional[str] = None   # None: STRICT_PACK, or SPREAD when TP > 1
    # CPU shard actors (gloo): the address rank 0's rendezvous store listens on. None:
    # loopback when all actors share rank 0's node, else that node's address as Ray reports it
    comm_host: Optional[str] = None
    # import path of the engine class; another engine with the same interface may be plugged in
    llm_class: str = "ringserve.llm:LLM"
    replica_num_cpus: float = 0.0         # the ingress replica itself: tokenizing and HTTP only
    num_cpus_per_worker: float = 1.0      # Ray CPUs reserved by each shard actor
    schedule: Optional[str] = None        # deprecated name of `layout`

    def __post_init__(self):
        if self.schedule is not None:
            import warnings
            warnings.warn("the serve argument 'schedule' is deprecated: say 'layout'",
                          DeprecationWarning, stacklevel=3)
            self.layout, self.schedule = self.schedule, None
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty checkpoint path, got {self.model!r}")
        from ringserve.parallel.tp import parallel_sizes
        self.world_size, self.tensor_parallel_size = parallel_sizes(
            self.world_size, self.context_parallel_size, self.tensor_parallel_size)
        self.context_parallel_size = self.world_size
        for name, low in (("num_replicas", 1), ("max_queue", 0),
                          ("default_max_tokens", 1), ("max_prompts", 1), ("max_num_seqs", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise ValueError(f"{name} ({v!r}) must be an integer >= {low}")
        for name in ("max_kv_tokens", "document_cache_tokens", "max_num_batched_tokens"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name} ({v!r}) must be null or an integer >= 1")
        v = self.interleave_decode_steps
        if v is not None and (not _is_int(v) or v < 0):
            raise ValueError(f"interleave_decode_steps ({v!r}) must be null or an integer >= 0")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling ({self.async_scheduling!r}) must be true, false "
                             f"or null (the engine's default)")
        if self.pipeline_steps is not None and not isinstance(self.pipeline_steps, bool):
            raise ValueError(f"pipeline_steps ({self.pipeline_steps!r}) must be true, false "
                             f"or null (the engine's default)")
        v = self.pipeline_depth
        if v is not None and (not _is_int(v) or not 1 <= v <= 4):
            raise ValueError(f"pipeline_depth ({v!r}) must be null or an integer in 1..4")
        if self.in_process is not None and not isinstance(self.in_process, bool):
            raise ValueError(f"in_process ({self.in_process!r}) must be true, false or null")
        if self.in_process and (self.world_size, self.tensor_parallel_size) != (1, 1):
            raise ValueError(f"in_process runs one worker inside the replica: it needs "
                             f"world_size 1 and tensor_parallel_size 1 (got {self.world_size} "
                             f"and {self.tensor_parallel_size})")
        if self.in_process and self.device is None:
            raise ValueError("in_process needs device (cuda or cpu): the replica reserves the "
                             "GPU itself when it holds the worker")
        if self.async_scheduling and self.tensor_parallel_size != 1:
            raise ValueError(f"async_scheduling needs tensor_parallel_size 1 (got "
                             f"{self.tensor_parallel_size})")
        for name in ("cuda_graphs", "fused_kernels"):
            v = getattr(self, name)
            if v not in (None, True, False) or isinstance(v, int) and not isinstance(v, bool):
                raise ValueError(f"{name} ({v!r}) must be null (the engine's default: on with "
                                 f"CUDA), true or false")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout ({self.layout!r}) must be one of {LAYOUTS}")
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"device ({self.device!r}) must be null or one of {DEVICES}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype ({self.dtype!r}) must be null or one of {DTYPES}")
        for name in ("request_timeout_s", "max_body_mb", "transport_timeout_s",
                     "sse_keepalive_s", "body_timeout_s"):
            v = getattr(self, name)
            if not _is_number(v) or not v > 0:
                raise ValueError(f"{name} ({v!r}) must be a number > 0")
        for name in ("replica_num_cpus", "num_cpus_per_worker", "min_body_rate"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise ValueError(f"{name} ({v!r}) must be a number >= 0")
        if self.api_key is not None and (not isinstance(self.api_key, str)
                                         or not self.api_key.strip()):
            raise ValueError("api_key must be null (no authentication) or a non-empty string")
        if self.model_name is not None and (not isinstance(self.model_name, str)
                                            or not self.model_name):
            raise ValueError(f"model_name ({self.model_name!r}) must be null or a non-empty string")
        from ringserve.parallel.transport import check_comm_host
        check_comm_host(self.comm_host)
        if ":" not in self.llm_class:
            raise ValueError(f"llm_class ({self.llm_class!r}) must look like "
                             "'package.module:Class'")

    @property
    def served_model_name(self) -> str:
        return self.model_name or os.path.basename(os.path.normpath(self.model))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @classmethod
    def from_dict(cls, args: Optional[Mapping[str, Any]]) -> "ServeArgs":
        """Build from a serve-config `args` mapping; unknown keys are an error, not ignored."""
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown}; known: {sorted(known)}")
        if "model" not in args:
            raise ValueError("the 'model' argument (checkpoint path) is required")
        # YAML/CLI may give a float-looking integer such as 2.0: accept it only when exact
        for f in fields(cls):
            v = args.get(f.name)
            if isinstance(v, float) and f.type in ("int", "Optional[int]") and v.is_integer():
                args[f.name] = int(v)
        return cls(**args)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> Dict[str, Any]:
        """For logs and /stats: everything but the key."""
        d = self.to_dict()
        d["api_key"] = None if self.api_key is None else "***"
        return d


__all__ = ["ServeArgs", "LAYOUTS", "SCHEDULES", "DEVICES", "DTYPES"]
