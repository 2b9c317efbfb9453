"""The model shard worker: full weights, this rank's KV pool, one `execute(plan)` per step.

The driver (ringserve.engine) sends every rank its `RankPlan` for the step at once: a flat token
batch of decode tokens, prompt extensions (pass-Q, the same tokens on every rank) and prefill
chunks (this rank's shard of each), with the slots to write and the pages to read. The worker
keeps no per-sequence state: the driver owns the pages (ringserve.kv_manager). Only token ids,
positions, sampling parameters and small results cross Ray; activations stay on the device and
ranks exchange K/V (ring chunks) or partial attention results (pass-Q rows) over the group's
transport (ringserve.parallel.step_attention).

With cuda_graphs=True (CUDA) or "emulate" (tests, any device), a step made only of one-token
decodes replays a captured graph for its bucket (batch size rounded up to a power of two,
block-table width to a power of two >= 16, both agreed by the driver for all ranks): rows past
the batch and rows a rank does not own write their K/V to a scratch page that no table holds.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import pickle
import threading
import time
from collections import OrderedDict, deque
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ringserve import kernels
from ringserve.errors import GraphCaptureError
from ringserve.model import layer_window
from ringserve.kv_cache import KVCacheConfig, KVPool, bytes_per_token, pages_for_budget
from ringserve.parallel.step_attention import (MLA_EXPAND_MIN_TOKENS, MLA_PIECE_TOKENS,
                                               StepAttention, _as_slice, _merge, ints,
                                               merge_rows, to_device)
from ringserve.plan import PENDING_TOKEN, RankPlan, step_signature
from ringserve.sampling import Sampler
from .worker import ShardWorker

_THREAD = threading.local()   # per thread: the CUDA device made current there

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GiB = 1 << 30


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).replace("torch.", "") not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[str(dtype).replace("torch.", "")]


def build_model(source: Union[str, dict], dtype, device: torch.device, tp_rank: int = 0,
                tp_size: int = 1, tp_comm=None):
    """A checkpoint directory, or {"config": hf_config_dict, "seed": int} for random weights
    made on the device (benchmarks: no 16 GB checkpoint on disk). With tp_size > 1 the model is
    this rank's tensor-parallel slice (ringserve.parallel.tp), loaded slice by slice; random
    weights are drawn full size and sliced, so every (t, c) serves the same model."""
    from ringserve.model import CausalLM
    from ringserve.config import ModelConfig
    from ringserve.parallel import tp
    from ringserve.weights import load_weights, resolve_dtype

    if not isinstance(source, dict) and tp_size == 1:
        return CausalLM.from_pretrained(source, dtype=dtype, device=device)
    cfg = (ModelConfig.from_hf_dict(source["config"]) if isinstance(source, dict)
           else ModelConfig.from_dir(source))
    dtype = resolve_dtype(dtype, device, cfg)
    model = CausalLM(cfg, dtype=dtype, device="meta")  # parameters only: no init compute
    tp.apply_tp(model, tp_rank, tp_size, tp_comm)
    model.to_empty(device=device)
    tp.retie(model)
    if not isinstance(source, dict):
        load_weights(model, source)
        return model.eval()
    info = getattr(model, "tp", None)
    g = torch.Generator(device=device).manual_seed(int(source.get("seed", 0)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape if info is None else info.full_shape(name, p.shape)
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif info is None:   # 1/sqrt(fan_in) keeps activations O(1) through the layers
                p.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=g)
            else:
                full = torch.empty(shape, dtype=p.dtype, device=device)
                full.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=g)
                spec = info.shard(name)
                p.copy_(full if spec is None else spec.take(full))
                del full
    return model.eval()


def fixed_reserve_bytes(cfg, chunk_tokens: Optional[int], elem: int) -> int:
    """GPU memory kept free besides weights and KV whatever the tokens: 3 GiB of workspaces
    plus the MLP intermediates of one activation chunk (ringserve plan uses it too)."""
    extra = 0
    mla = getattr(cfg, "mla", None)
    if mla is not None:   # one cached piece's expanded K and V and kv_b_proj's output
        extra = (MLA_PIECE_TOKENS * cfg.num_attention_heads * elem
                 * (2 * mla.qk_head_dim + mla.qk_nope_head_dim + mla.v_head_dim))
    return 3 * GiB + 3 * (chunk_tokens or 8192) * cfg.intermediate_size * elem + extra


def activation_bytes_per_token(cfg, elem: int) -> int:
    """Rough peak activation bytes per prefill token on one rank (hidden states, q/k/v/out,
    the float32 attention accumulator, the ring's two K/V buffers), with 25% slack."""
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per = elem * (2 * cfg.hidden_size + 3 * hq * d + 6 * hkv * d) + 4 * hq * d + 8 * hq
    return int(max(per, mla_expanded_bytes_per_token(cfg, elem)) * 1.25)


def mla_expanded_bytes_per_token(cfg, elem: int) -> int:
    """A chunk token's activations in MLA's expanded form (StepAttention.mla): the absorbed
    queries (still made), the expanded ones, K, kv_b's output (V is a view of it), the output
    and the flash output in the values' width, a float32 merge of the cached prefix's part;
    0 without MLA. For DeepSeek-V2's shapes this is below the absorbed form's count, which
    then stays the reserve (session 16 first added it on top: 23% fewer KV tokens for
    nothing); the prefix's expanded pieces are in `fixed_reserve_bytes`."""
    m = getattr(cfg, "mla", None)
    if m is None:
        return 0
    hq, d = cfg.num_attention_heads, cfg.head_dim
    return (elem * (2 * cfg.hidden_size + 6 * cfg.num_key_value_heads * d
                    + hq * (d + 2 * m.qk_head_dim + m.qk_nope_head_dim + 3 * m.v_head_dim))
            + 4 * hq * m.v_head_dim + 8 * hq)


def _chunk_from(plan: RankPlan, start: Optional[int]) -> bool:
    """The plan has a prompt chunk starting at token `start` or later (None: never)."""
    return start is not None and any(sq.kind == "ring" and sq.chunk_start >= start
                                     for sq in plan.seqs)


def _seq_lengths(plan: RankPlan) -> torch.Tensor:
    """(rows,) each row's sequence length: what longrope picks its factors by. The scheduler's
    `seq_len` (the length the request's known tokens reach, so every chunk of a prompt chooses
    alike), else a ring chunk's end over all ranks or the row's last position + 1."""
    ends = [s.seq_len or (s.chunk_start + s.chunk_len if s.kind == "ring"
                          else max(s.positions) + 1) for s in plan.seqs]
    counts = [len(s.token_ids) for s in plan.seqs]
    if all(c == 1 for c in counts):      # a decode batch: one row per sequence
        return torch.tensor(ends, dtype=torch.int64)
    return torch.repeat_interleave(torch.tensor(ends, dtype=torch.int64), torch.tensor(counts))


# decode graphs kept per worker (LRU): batch buckets 1..256 times a few width buckets in use
MAX_CUDA_GRAPHS = 64


class ModelShardWorker(ShardWorker):
    """One rank of the model group. Construct through `ActorGroup(worker_cls=ModelShardWorker,
    worker_kwargs=...)`; the keyword arguments are those of `__init__` after `device`."""

    def __init__(self, rank: int, world_size: int, device: str = "cpu", model=None,
                 dtype=None, page_size: int = 16, kv_tokens: Optional[int] = None,
                 cpu_kv_bytes: int = 256 << 20, memory_reserve_bytes: Optional[int] = None,
                 chunk_tokens: Optional[int] = None, backend: str = "auto",
                 cuda_graphs: Union[bool, str] = False, fused_kernels: bool = False,
                 max_cuda_graphs: int = MAX_CUDA_GRAPHS, torch_threads: Optional[int] = None,
                 mla_expand_min_tokens: Optional[int] = MLA_EXPAND_MIN_TOKENS,
                 **kwargs):
        super().__init__(rank, world_size, device, **kwargs)
        if torch_threads is not None:
            if not isinstance(torch_threads, int) or torch_threads < 1:
                raise ValueError(f"torch_threads must be a positive integer, got "
                                 f"{torch_threads!r}")
            # a Ray actor starts with one intra-op thread per CPU it reserved (OMP_NUM_THREADS)
            torch.set_num_threads(torch_threads)
        # "emulate" (tests, any device): the graph path's static buffers, scratch writes and
        # buckets, with the body run eagerly at each "replay" instead of captured
        if cuda_graphs not in (False, True, "emulate"):
            raise ValueError(f"cuda_graphs must be True, False or 'emulate', got {cuda_graphs!r}")
        if cuda_graphs is True and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs device='cuda'")
        if isinstance(max_cuda_graphs, bool) or not isinstance(max_cuda_graphs, int) \
                or max_cuda_graphs < 1:
            raise ValueError(f"max_cuda_graphs must be an integer >= 1, got {max_cuda_graphs!r}")
        if model is None:
            raise ValueError("model (a checkpoint directory or a random-weights spec) is needed")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) must be >= 1 or None")
        if mla_expand_min_tokens is not None and (
                isinstance(mla_expand_min_tokens, bool)
                or not isinstance(mla_expand_min_tokens, int) or mla_expand_min_tokens < 1):
            raise ValueError(f"mla_expand_min_tokens must be an integer >= 1 or None, got "
                             f"{mla_expand_min_tokens!r}")
        # MLA (DeepSeek-V2): prompt chunks of at least this many tokens attend in the expanded
        # form (StepAttention.mla), shorter ones and decodes absorbed; None: always absorbed
        self.mla_expand_min = mla_expand_min_tokens
        self.model = build_model(model, parse_dtype(dtype), self.device, self.tp_rank,
                                 self.tp_size, self.tp_comm)
        self.cfg = self.model.config
        self.sampler = Sampler(model, self.cfg.vocab_size)   # tokenizer read on first grammar
        self.chunk_tokens = chunk_tokens
        self.backend = backend
        # the fused kernels of few-token steps (kernels/fused.py) when asked for (LLM's default
        # on CUDA) and the backend is Triton
        self.fused = bool(fused_kernels) and kernels.use_triton(
            backend, self.model.model.embed_tokens.weight)
        self.model.backend = backend if self.fused else "torch"
        if self.fused:
            self.model.join_weights()  # q|k|v and gate|up: one GEMM each on that path
            if self.device.type == "cuda":
                torch.cuda.empty_cache()   # the unjoined weights' blocks: before KV sizing
        self.window_size = self.model.window_size
        self.softmax_scale = self.model.softmax_scale
        cfg = self.cfg
        per_tok = bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                  self.model.dtype, cfg.values_are_keys)
        if kv_tokens is not None:
            num_pages = -(-int(kv_tokens) // page_size)
        elif self.device.type == "cuda":
            # what is free after the weights, minus a reserve for prefill activations that grows
            # with the tokens this rank may hold (one token of cache ~ one token of activations)
            free, total = torch.cuda.mem_get_info(self.device)
            fixed = (memory_reserve_bytes if memory_reserve_bytes is not None
                     else fixed_reserve_bytes(cfg, chunk_tokens, self.model.dtype.itemsize))
            act = activation_bytes_per_token(cfg, self.model.dtype.itemsize)
            num_pages = pages_for_budget(max(0, free - fixed), page_size, per_tok + act)
        else:
            num_pages = pages_for_budget(cpu_kv_bytes, page_size, per_tok)
        self.cuda_graphs = bool(cuda_graphs)
        self._emulate_graphs = cuda_graphs == "emulate"
        # a captured step writes every row's K/V; rows this rank does not own go to page 0,
        # which the driver never hands out
        self.reserved_pages = 1 if cuda_graphs else 0
        self.pool = KVPool(KVCacheConfig(
            num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, num_pages=num_pages + self.reserved_pages,
            page_size=page_size, dtype=self.model.dtype, device=str(self.device),
            values_are_keys=cfg.values_are_keys))
        # captured decode graphs, least recently replayed first; at most max_cuda_graphs are
        # kept (each holds its own memory pool: a service that meets many batch sizes and
        # context lengths must not accumulate them without bound)
        self._graphs: "OrderedDict[Tuple[int, int, int], _DecodeGraph]" = OrderedDict()
        self.max_cuda_graphs = max_cuda_graphs
        self.graph_replays = 0
        self.graph_evictions = 0
        self.graphs_captured_ahead = 0
        self.step_times: List[float] = []
        self._timeline: Optional[List[Tuple[float, float, float, int, int]]] = None
        self._t_queued = 0.0
        self._pyprof_want: Optional[Tuple[int, int]] = None   # profile_python_steps
        self._pyprof = None
        self._pyprof_report: Optional[str] = None
        self._pyprof_steps = 0
        self._profile_want: Optional[int] = None    # profile_chunk_step
        self._profile: Optional[Dict] = None
        self.compiles = _watch_compiles() if self.device.type == "cuda" else []
        self._tables: Dict[int, torch.Tensor] = {}   # running sequences' page tables (CPU)
        # the token each sequence sampled last on this rank: a decode row whose input id is
        # PENDING_TOKEN (the engine's async scheduling planned it before that token came back)
        # takes it from here
        self._last_token: Dict[int, int] = {}
        self._stamps: Optional[List[tuple]] = None   # set_call_stamps
        # pipelined steps (`launch` / `finish`): the launched steps not yet finished, oldest
        # first; the ids the last launched decode step drew, still on the device ({sequence:
        # its row}, the ids), for the next step's pending input tokens
        self._launched: "deque[_Launched]" = deque()
        self._dev_tokens: Optional[Tuple[Dict[int, int], torch.Tensor]] = None
        self._last_done = 0.0
        self.pipelined_launches = 0
        self.advances = 0      # `advance` calls (a pipelined step's launch + an older finish)

    def setup_transport(self, spec, tp_spec=None) -> bool:
        super().setup_transport(spec, tp_spec)
        if self.tp_size > 1:
            self._agree_pages()
        return True

    def _agree_pages(self) -> None:
        """The t ranks of a shard share the driver's page table, so they keep the same number
        of pages: the fewest any of them could allocate."""
        mine = torch.tensor([self.pool.num_pages], dtype=torch.int64, device=self.device)
        least = int(min(int(x) for x in self.tp_comm.all_gather(mine)))
        if least < self.pool.num_pages:
            cfg = dataclasses.replace(self.pool.cfg, num_pages=least)
            self.pool = None            # its memory goes back before the smaller one is made
            self.pool = KVPool(cfg)

    # ---- information ----

    def kv_info(self) -> dict:
        p = self.pool
        return {"rank": self.rank, "num_pages": p.num_pages, "page_size": p.page_size,
                "reserved_pages": self.reserved_pages,
                "capacity_tokens": (p.num_pages - self.reserved_pages) * p.page_size,
                "bytes_per_token": p.cfg.bytes_per_token,
                "vocab_size": self.cfg.vocab_size, "dtype": str(self.model.dtype),
                "num_layers": self.cfg.num_hidden_layers,
                # a token's projections + MLP, and its attention per key it sees (scheduler)
                # (all of an MoE layer's experts, and MLA's absorbed width, counted as the
                # cost model was fitted on the H200; their FLOP-true values, top_k experts and
                # the expanded form's 192 + 128, would cut Qwen3-MoE's long prompts into ~5x
                # smaller chunks, not measured: GPU_OWED)
                "flops_per_token": 2 * sum(p.numel() for n, p in self.model.named_parameters()
                                           if "embed_tokens" not in n and "lm_head" not in n),
                "attn_flops_per_key": 4 * self.cfg.num_attention_heads * self.cfg.head_dim
                * self.cfg.num_hidden_layers,
                "mla_expand_min_tokens": self.mla_expand_min,
                "window_size": self.window_size,
                "long_after": self.model.rotary.long_after,   # longrope's switch (Phi-3)
                "max_position_embeddings": self.cfg.max_position_embeddings}

    # ---- the step ----

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @torch.inference_mode()
    def execute(self, plan: RankPlan) -> list:
        """Run one step's plan; returns one entry per sequence of the plan: (token, logprob)
        where this rank samples it, a list of next-token logprobs (float32, NaN where no
        target) for score rows this rank reports, else None."""
        t0 = time.perf_counter()
        if self._stamps is None:
            return self._run(plan, t0)
        w0, sig = time.time(), step_signature(plan)
        try:
            return self._run(plan, t0)
        finally:
            self._stamps.append((sig, w0, time.time()))
            del self._stamps[:-4096]

    def _run(self, plan: RankPlan, t0: float) -> list:
        # benchmarks' instruments: each is off (None) unless asked for
        if _chunk_from(plan, self._profile_want):
            return self._profiled(plan, t0)
        if self._pyprof_want and _chunk_from(plan, self._pyprof_want[0]):
            return self._python_profiled(plan, t0)
        if self._timeline is not None:
            return self._timed(plan, t0)
        try:
            return self._execute(plan)
        finally:
            self._record(time.perf_counter() - t0)

    # ---- pipelined steps (the engine's async scheduling at world size 1) ----
    #
    # `execute` returns a step's sampled tokens, so it waits for the step's device work: between
    # one step's end and the next one's first kernel the device idled for the actor's return
    # and the next call's dispatch (~0.5-0.8 ms a decode step on the H200 host, session 17: the
    # served inter-token latency against rank 0's execute). `launch` queues a step and returns
    # at once; `finish` returns the oldest launched step's results. The engine launches step
    # N + 1 before it asks for step N's results, so N + 1's kernels are queued behind N's while
    # the host round trips run. A decode step of graph-replayed one-token rows takes its
    # pending input ids from the device ids the step before drew; any other step first waits
    # for the steps before it (their results kept for their finish calls) and then runs as
    # `execute` runs it.

    @torch.inference_mode()
    def launch(self, plan: RankPlan) -> None:
        """Queue a step (see above); its results, or its error, come from a later `finish`."""
        t0 = time.perf_counter()
        try:
            if self._pipelined(plan):
                entry = self._launch_decode(plan, t0)
                self.pipelined_launches += 1
            else:
                self._settle()
                self._dev_tokens = None
                entry = _Launched(out=self.execute(plan))
        except Exception as e:  # noqa: BLE001 - raised by this step's finish()
            entry = _Launched(error=e)
        self._launched.append(entry)

    @torch.inference_mode()
    def finish(self) -> list:
        """The results of the oldest launched step not finished yet (as `execute` returns
        them), waiting for its device work; its error if it failed."""
        if not self._launched:
            raise RuntimeError(f"rank {self.rank}: finish() without a launched step")
        return self._launched.popleft().result()

    def advance(self, plan: RankPlan) -> list:
        """`launch(plan)`, then `finish()`: one call a pipelined step through Ray (the
        engine's `pipeline_one_call`): the results returned are those of the oldest step
        launched before this one."""
        if not self._launched:
            raise RuntimeError(f"rank {self.rank}: advance() without a launched step")
        self.advances += 1
        self.launch(plan)
        return self.finish()

    def _settle(self) -> None:
        """Wait for every launched step (their results kept for their finish calls)."""
        for entry in self._launched:
            entry.settle()

    def _pipelined(self, plan: RankPlan) -> bool:
        """Whether `launch` may queue this step behind the ones in flight: decode rows only
        (one token each, sampled, no grammar), replayed from a graph already captured, at
        world size 1 with no benchmark instruments on, and every pending input id drawn by
        the last launched step."""
        if not (self.cuda_graphs and plan.graph_batch and plan.track_tokens and plan.seqs) \
                or self.world_size > 1 or self.tp_size > 1 or plan.capture_ahead:
            return False
        if self._timeline is not None or self._profile_want \
                or self._pyprof_want:
            return False
        if (plan.graph_batch, plan.graph_width, plan.graph_prefix) not in self._graphs:
            return False
        rows = self._dev_tokens[0] if self._dev_tokens is not None else {}
        unread = any(e.read is not None for e in self._launched)
        for s in plan.seqs:
            if s.kind != "q" or len(s.token_ids) != 1 or s.sample is None \
                    or s.targets is not None or s.sample[0].grammar is not None:
                return False
            if s.token_ids[0] == PENDING_TOKEN and s.seq not in rows \
                    and (unread or s.seq not in self._last_token):
                return False
        return True

    def _launch_decode(self, plan: RankPlan, t0: float) -> "_Launched":
        # call stamps (benchmarks): the launch's begin and the read's end
        stamp = (step_signature(plan), time.time()) if self._stamps is not None else None
        for key in plan.drop:
            self._tables.pop(key, None)
            self._last_token.pop(key, None)
        self.pool.copy_pages(plan.copy_src, plan.copy_dst)
        self.sampler.drop_pending()
        rows, prev = self._dev_tokens if self._dev_tokens is not None else ({}, None)
        src = []
        for s in plan.seqs:
            if s.token_ids[0] == PENDING_TOKEN:
                if s.seq in rows:
                    src.append(rows[s.seq])
                    continue
                s.token_ids = [self._last_token[s.seq]]     # finished: on the host
            src.append(-1)
        tables = [self._table(s.seq, s.pages_from, s.pages_new) for s in plan.seqs]
        logits = self._graph_step(plan, tables, (src, prev))
        read, toks = self.sampler.sample_queued(logits[:len(plan.seqs)],
                                                [s.sample for s in plan.seqs])
        self._dev_tokens = ({s.seq: i for i, s in enumerate(plan.seqs)}, toks)

        def done() -> list:
            out = read()
            self._track_tokens(plan, out)     # for a later step that is not pipelined
            now = time.perf_counter()
            # the step's share of the device: since the step before it was read, or since
            # its launch when the device was idle then
            self._record(now - max(t0, self._last_done))
            self._last_done = now
            if stamp is not None and self._stamps is not None:
                self._stamps.append((*stamp, time.time()))
                del self._stamps[:-4096]
            return out
        return _Launched(read=done)

    def execute_pickled(self, blob: bytes) -> list:
        """`execute` of a pickled plan: the step channel of a Ray Compiled Graph
        (`ActorGroup.execute_step`). The driver pickles the plan itself (cheaper than Ray's
        serialization of the dataclasses), and unpickling copies its arrays out of the channel's
        buffer, which the next step overwrites. The graph runs this on its own thread: the
        CUDA device is made current there once."""
        if self.device.type == "cuda" and getattr(_THREAD, "device", None) != self.device:
            torch.cuda.set_device(self.device)
            _THREAD.device = self.device
        return self.execute(pickle.loads(blob))

    def set_call_stamps(self, on: bool = True) -> None:
        """Record time.time() when each `execute` begins and ends (benchmarks: against the
        engine's `recent_steps` "sent" / "read", the Ray round trip splits into the way to
        the worker, the worker's step and the way back; and the worker's idle time between
        steps)."""
        self._stamps = [] if on else None

    def call_stamps(self, n: int = 4096) -> List[Tuple[Optional[tuple], float, float]]:
        """(the plan's `step_signature`, begin, end time.time()) of the last n `execute` calls
        since set_call_stamps."""
        return list(self._stamps or [])[-n:]

    def _record(self, wall: float) -> None:
        self.step_times.append(wall)
        del self.step_times[:-4096]

    def _timed(self, plan: RankPlan, t0: float) -> list:
        cuda = self.device.type == "cuda"
        if cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            ev[0].record()
        self._t_queued = t0
        out = self._execute(plan)
        wall = time.perf_counter() - t0
        span = 0.0
        if cuda:
            ev[1].record()
            ev[1].synchronize()
            span = ev[0].elapsed_time(ev[1]) / 1e3
        self._record(wall)
        chunk = [sq.chunk_start for sq in plan.seqs if sq.kind == "ring"]
        self._timeline.append((wall, self._t_queued - t0, span,
                               sum(len(sq.token_ids) for sq in plan.seqs),
                               chunk[0] if chunk else -1))
        del self._timeline[:-4096]
        return out

    def profile_chunk_step(self, min_start: int) -> None:
        """Profile (torch.profiler, host and device) the next step that has a prompt chunk
        starting at token min_start or later; `take_profile` returns it (benchmarks: where a
        mixed step's time goes inside the actor, as served)."""
        self._profile_want, self._profile = min_start, None

    def take_profile(self) -> Optional[Dict]:
        return self._profile

    def profile_python_steps(self, min_start: int, steps: int = 32) -> None:
        """cProfile the next `steps` steps that have a prompt chunk starting at token
        min_start or later (where the host's Python time of a mixed step goes, function by
        function); `take_python_profile` returns the report once they ran."""
        import cProfile
        self._pyprof_want, self._pyprof = (min_start, steps), cProfile.Profile()
        self._pyprof_report, self._pyprof_steps = None, 0

    def take_python_profile(self) -> Optional[str]:
        if self._pyprof_report is None and self._pyprof is not None:
            self._finish_python_profile()
        return self._pyprof_report

    def _python_profiled(self, plan: RankPlan, t0: float) -> list:
        self._pyprof.enable()
        try:
            out = self._execute(plan)
            self._sync()
        finally:
            self._pyprof.disable()
            self._record(time.perf_counter() - t0)
            start, left = self._pyprof_want
            self._pyprof_want = (start, left - 1) if left > 1 else None
            self._pyprof_steps += 1
        if self._pyprof_want is None:
            self._finish_python_profile()
        return out

    def _finish_python_profile(self, lines: int = 45) -> None:
        import io
        import pstats
        if not self._pyprof_steps:
            start = self._pyprof_want[0] if self._pyprof_want else "?"
            self._pyprof_report = f"no step had a prompt chunk from token {start} on"
            self._pyprof = self._pyprof_want = None
            return
        buf = io.StringIO()
        st = pstats.Stats(self._pyprof, stream=buf)
        buf.write(f"{self._pyprof_steps} steps profiled (torch threads "
                  f"{torch.get_num_threads()})\n")
        st.sort_stats("tottime").print_stats(lines)
        st.sort_stats("cumulative").print_stats(lines)
        self._pyprof_report, self._pyprof, self._pyprof_want = buf.getvalue(), None, None

    def _profiled(self, plan: RankPlan, t0: float) -> list:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                         if self.device.type == "cuda" else [])
        self._profile_want = None
        with profile(activities=acts) as pr:
            out = self._execute(plan)
            self._sync()
        wall = time.perf_counter() - t0
        self._record(wall)
        ev = pr.key_averages()
        chunk = [sq for sq in plan.seqs if sq.kind == "ring"][0]
        self._profile = {
            "wall_ms": wall * 1e3, "chunk_start": chunk.chunk_start,
            "chunk_tokens": len(chunk.token_ids), "rows": sum(len(sq.token_ids)
                                                              for sq in plan.seqs),
            "host_ms": sum(e.self_cpu_time_total for e in ev) / 1e3,
            "device_ms": sum(e.self_device_time_total for e in ev
                             if e.device_type.name == "CUDA") / 1e3,
            "torch_threads": torch.get_num_threads(),
            "by_host": ev.table(sort_by="self_cpu_time_total", row_limit=20),
            "by_device": ev.table(sort_by="self_cuda_time_total", row_limit=14)
            if self.device.type == "cuda" else ""}
        return out

    def _table(self, key: int, first: int, new: List[int]) -> torch.Tensor:
        """A running sequence's page table on this rank (CPU int32), updated with what changed
        from index `first` on (the driver sends only that)."""
        t = self._tables.get(key)
        if t is None and first:
            raise RuntimeError(f"rank {self.rank}: no page table for sequence {key}, but the "
                               f"step updates it from page {first}")
        add = torch.tensor(new, dtype=torch.int32)
        if t is not None and first == t.numel() and not add.numel():
            return t
        t = add if t is None or first == 0 else torch.cat([t[:first], add])
        self._tables[key] = t
        return t

    def compile_events(self, since: float = 0.0) -> List[Tuple[float, str]]:
        """(time.time(), kernel and specialization) of each Triton compile in this process
        after `since`: a compile in the middle of serving stalls the step it falls in for
        seconds, so benchmarks report the ones after warm-up."""
        return [e for e in self.compiles if e[0] > since]

    def recent_step_times(self, n: int = 4096) -> List[float]:
        """Seconds spent in the last n `execute` calls on this rank (benchmarks)."""
        return self.step_times[-n:]

    def _execute(self, plan: RankPlan) -> list:
        for key in plan.drop:
            self._tables.pop(key, None)
            self._last_token.pop(key, None)
        self.pool.copy_pages(plan.copy_src, plan.copy_dst)
        if not plan.seqs:
            return []
        if not plan.track_tokens:
            out = self._step_outputs(plan)
            self._capture_ahead(plan)
            return out
        for s in plan.seqs:
            if s.kind == "q" and PENDING_TOKEN in s.token_ids:
                last = self._last_token.get(s.seq)
                if last is None:
                    raise RuntimeError(f"rank {self.rank}: sequence {s.seq}'s input token is "
                                       f"pending, but this rank sampled none for it")
                s.token_ids = [last if t == PENDING_TOKEN else t for t in s.token_ids]
        out = self._step_outputs(plan)
        self._track_tokens(plan, out)
        self._capture_ahead(plan)
        return out

    def _capture_ahead(self, plan: RankPlan) -> None:
        """Capture the decode graph the driver marked (a lone long prompt's first decode
        bucket) after this step's work, unless it is there: its capture then falls inside the
        prefill instead of stalling the first decode token. A failure is a GraphCaptureError
        like a capture on demand (every rank captures the same bucket in the same step)."""
        key = tuple(plan.capture_ahead)
        if not key or not self.cuda_graphs or key in self._graphs:
            return
        try:
            self._capture(*key)
        except Exception as e:
            raise GraphCaptureError(f"rank {self.rank}: capturing the decode graph of batch "
                                    f"{key[0]}, width {key[1]}, prefix {key[2]} ahead failed: "
                                    f"{type(e).__name__}: {e}"[:2000]) from e
        self.graphs_captured_ahead += 1

    def _track_tokens(self, plan: RankPlan, out: list) -> None:
        """Keep each sequence's sampled token; with more than one rank every rank learns the
        tokens sampled on the others (one all-reduce of a row-long vector: each row's token +
        1 from the rank that sampled it, 0 elsewhere)."""
        mine = [int(got[0]) + 1 if s.sample is not None and got is not None else 0
                for s, got in zip(plan.seqs, out)]
        if self.world_size > 1:
            t = torch.tensor(mine, dtype=torch.int64, device=self.device)
            mine = self.transport.all_reduce(t).tolist()
        for s, v in zip(plan.seqs, mine):
            if v > 0:
                self._last_token[s.seq] = v - 1

    def _step_outputs(self, plan: RankPlan) -> list:
        graph = bool(self.cuda_graphs and plan.graph_batch)
        if not graph:
            # grammar masks on a helper thread while the eager forward is launched and runs;
            # a graph step launches in one call, so `_outputs` computes them right after the
            # replay is queued, on this thread (the device is busy for the whole step then,
            # and no thread hand-offs are paid)
            self.sampler.start([s.sample for s in plan.seqs if s.sample is not None])
        else:
            self.sampler.drop_pending()
        tables = [self._table(s.seq, s.pages_from, s.pages_new) for s in plan.seqs]
        if graph:
            logits = self._graph_step(plan, tables)
            return self._outputs(plan, None, lambda rows: logits[rows])
        attn = StepAttention(plan, tables, self.pool, self.rank, self.world_size,
                             self.transport, self.softmax_scale, self.window_size, self.backend,
                             softcap=self.model.softcap, mla_expand_min=self.mla_expand_min)
        if any(isinstance(s.token_ids, np.ndarray) for s in plan.seqs):   # a ring chunk's
            ids = torch.from_numpy(np.concatenate([ints(s.token_ids) for s in plan.seqs]))
        else:
            ids = torch.tensor([t for s in plan.seqs for t in s.token_ids], dtype=torch.int64)
        # only longrope reads the rows' sequence lengths (a host op a step otherwise)
        long = any(r is not None and r.long_after is not None
                   for r in (self.model.rotary, self.model.local_rotary))
        hidden = self.model(ids, attn.positions, attn, chunk_tokens=self.chunk_tokens,
                            seq_len=_seq_lengths(plan) if long else None)
        return self._outputs(plan, attn.rows, lambda rows: self.model.logits(hidden[rows]),
                             hidden)

    def _outputs(self, plan: RankPlan, rows, logits_of, hidden=None) -> list:
        want = [i for i, s in enumerate(plan.seqs) if s.sample is not None]
        specs = [plan.seqs[i].sample for i in want]
        # host work of the sampler (grammar masks) while the device runs the queued step
        prepared = self.sampler.prepare(specs) if want else None
        # one deadline for the step's kernels and collectives (a hung peer raises here instead
        # of hanging the host in the sampling below)
        if self.world_size > 1 or self.tp_size > 1:
            self.transport.synchronize()
        out: list = [None] * len(plan.seqs)
        if want:
            last = [(rows[i].stop - 1) if rows is not None else i for i in want]
            lg = logits_of(self._row_index(last))
            if self._timeline is not None:     # every kernel of the step is queued by now
                self._t_queued = time.perf_counter()
            for i, got in zip(want, self.sampler.sample(lg, specs, prepared)):
                out[i] = got
        for i, s in enumerate(plan.seqs):
            if s.targets is not None and hidden is not None:
                out[i] = self._next_logprobs(hidden[rows[i]], s.targets).tolist()
        if not want:
            self._sync()
        return out

    def _row_index(self, rows: List[int]):
        """rows as an index of the step's rows on the device without a blocking copy: a slice
        when consecutive (a decode batch: every row), else copied from pinned memory. A copy
        from a Python list waits for the whole queued forward, and the sampling's launches
        then run after the device went idle instead of beside it."""
        return _as_slice(rows) or to_device(rows, self.device, torch.int64)

    def set_step_timeline(self, on: bool = True) -> None:
        """Record, per step, the host's wall time, when every kernel was queued, and the
        device's span between the step's first and last work (CUDA events): a step whose
        kernels are queued just before it ends is host-bound (benchmarks)."""
        self._timeline = [] if on else None

    def step_timeline(self, n: int = 4096) -> List[Tuple[float, float, float, int, int]]:
        """(wall, queued, device span, rows, chunk start): seconds, the step's token rows and
        where its (first) prompt chunk starts (-1: none), of the last n steps since
        set_step_timeline; queued is 0 for a step that sampled nothing."""
        return list(self._timeline or [])[-n:]

    def _next_logprobs(self, hidden, targets: List[int], rows: int = 1024) -> torch.Tensor:
        """log p(targets[i] | hidden[i]) in float32 on the CPU (NaN where targets[i] < 0),
        `rows` logits rows at a time."""
        t = torch.tensor(targets, dtype=torch.int64, device=hidden.device)
        out = torch.full((hidden.shape[0],), float("nan"), dtype=torch.float32)
        for a in range(0, hidden.shape[0], rows):
            lg = torch.log_softmax(self.model.logits(hidden[a:a + rows]), dim=-1)
            tt = t[a:a + rows]
            got = lg.gather(1, tt.clamp(min=0)[:, None])[:, 0]
            out[a:a + rows] = torch.where(tt >= 0, got, torch.nan).cpu()
        return out

    @torch.inference_mode()
    def warmup(self) -> float:
        """Compile and tune, before the first request, the attention kernels of the shapes
        serving meets (CUDA; nothing to do on CPU): the flash forward causal (prompt chunks)
        and unmasked (a chunk against its cached tokens, keys split over batch entries) at
        every sequence bucket of its autotuning key, and the paged decode at every query-row
        tile and split count. Otherwise the first request of each new shape pays seconds of
        compiling in the middle of serving. Returns the seconds spent."""
        if self.device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        cfg, dt, dev = self.cfg, self.model.dtype, self.device
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # every layer's window (Gemma: windowed and global layers compile apart)
        windows = sorted(set(cfg.layer_window_sizes), key=lambda w: -1 if w is None else w)

        # (kv heads, head dim, fewest query rows): MLA's prompt chunks of mla_expand_min
        # tokens or more attend in the expanded form, per-head keys at qk_head_dim (its
        # buckets were tuned inside the first 32K prefill on an H200, session 16: 11.7 s)
        forms = [(hkv, d, d, 0)]
        if cfg.mla is not None and self.mla_expand_min is not None:
            forms.append((hq, cfg.mla.qk_head_dim, cfg.mla.v_head_dim, self.mla_expand_min))

        def attend(sq, sk, b, causal):
            for heads, dim, dim_v, rows in forms:
                if sq < rows:
                    continue
                q = torch.randn(b, sq, hq, dim, device=dev, dtype=dt)
                k = torch.randn(b, sk, heads, dim, device=dev, dtype=dt)
                v = k if dim_v == dim else torch.randn(b, sk, heads, dim_v, device=dev,
                                                       dtype=dt)
                for w in windows:
                    kernels.attention(q, k, v, softmax_scale=self.softmax_scale,
                                      causal=causal, window_size=w if causal else None,
                                      backend=self.backend, softcap=self.model.softcap)

        n = 128
        while n <= 16384:   # tuning: one per sequence bucket of the autotuning key
            for causal in (True, False):
                attend(n, n, 1 if causal else max(1, min(8, 16384 // n)), causal)
            # compiling: each bucket's tuned config is compiled again for the lengths that
            # are other specializations of the kernel: not divisible by 16 (query, keys or
            # both; a 100-token request under load compiled (100, 100) for 1.7 s on the H200
            # when only the 1024 bucket's config had been), and exactly 1 key (the remainder
            # of a cached prefix split over batch entries). Configs shared between buckets
            # compile once.
            m = n - 3
            for sq, sk, causal in ((m, m, True), (m, m, False), (m, n, False), (n, m, False),
                                   (m, 1, False), (n, 1, False)):
                attend(sq, sk, 1, causal)
            n *= 2
        attend(1, 1, 1, True)    # a one-token prompt
        pool = self.pool
        page = pool.page_size
        width = max(2, -(-4224 // page))         # enough key tiles for the largest split count
        for sq in (1, 2, 4, 8, 16, 32, 64):
            for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                if b * sq > 4096:
                    continue
                q = torch.randn(b, sq, hq, d, device=dev, dtype=dt)
                table = torch.zeros(b, width, dtype=torch.int32, device=dev)
                lens = torch.full((b,), page, dtype=torch.int32, device=dev)
                pos = torch.full((b, sq), page, dtype=torch.int64, device=dev)
                for w in windows:
                    kernels.paged_decode(q, pool.k[0], pool.v[0], table, lens,
                                         softmax_scale=self.softmax_scale, causal=True,
                                         window_size=w, q_pos=pos, kv_pos=pool.kv_pos,
                                         backend=self.backend, softcap=self.model.softcap,
                                         positions_sorted=True)   # as StepAttention calls it
        # the LSE merge of partial results (a chunk with its cached prefix, cascade groups,
        # ranks): float32 accumulators, the other side float32 or the model's dtype; at every
        # output head dim (MLA's expanded chunks merge v_head_dim-wide outputs: compiled in the
        # first 32K prefill on an H200, session 16, call 3)
        from ringserve.kernels.merge import MERGE_PART_BLOCKS
        for dim in sorted({f[2] for f in forms}):
            for other in sorted({torch.float32, dt}, key=str):
                acc = torch.zeros(256, hq, dim, device=dev)   # enough rows for the widest tile
                acc_lse = torch.zeros(256, hq, device=dev)
                part = torch.zeros(256, hq, dim, device=dev, dtype=other)
                kernels.merge_(acc[None], acc_lse.t()[None], part[None],
                               torch.zeros(256, hq, device=dev).t()[None])
            # the one-launch merges: a cached prefix's splits (flash outputs: the model's
            # dtype) alone, with the chunk's own part into the step's output rows, and the
            # cascade decode's float32 split partials into the output rows; each with 1, 8 and
            # 32 parts, the part counts of its compiled variants (merge.MERGE_PART_BLOCKS)
            rows = torch.empty(256, hq, dim, device=dev, dtype=dt)
            for n in MERGE_PART_BLOCKS:
                splits = torch.zeros(n, 256, hq, dim, device=dev, dtype=dt)
                split_lse = torch.zeros(n, hq, 256, device=dev)
                kernels.merge_splits(splits, split_lse)
                kernels.merge_splits(splits, split_lse, extra=(splits[0], split_lse[0]),
                                     dest=rows)
                kernels.merge_splits(splits.float(), split_lse,
                                     extra=(splits.float(), split_lse), dest=rows)
        self.warm_fused()
        # the greedy sampler's two kernels (kernels/greedy.py: logits rows are float32, as
        # wide as the vocabulary)
        from ringserve.kernels.greedy import greedy_pick
        greedy_pick(torch.zeros(1, self.model.config.vocab_size, device=dev))
        torch.cuda.synchronize(dev)
        # everything alive now (the model, the kernels' caches, Ray's and torch's modules)
        # lives as long as the process: out of the collector's reach, a full collection in
        # the middle of a step no longer walks it (as vLLM does after its graph capture)
        gc.collect()
        gc.freeze()
        return time.perf_counter() - t0

    @torch.inference_mode()
    def warm_fused(self) -> None:
        """Compile the few-token path's fused kernels (kernels/fused.py: the norms, RoPE + K/V
        store, act * up) with one one-token forward that stores nothing (slot -1) and attends
        to nothing: a serving step would otherwise pay their compiles. No-op off that path."""
        dev = self.device
        if not self.fused:
            return
        from ringserve.kernels.fused import rope_store_triton
        pool = self.pool
        none = torch.full((1,), -1, dtype=torch.int64, device=dev)

        class _Attn:
            def rope_store(self, layer, q, k, v, cos, sin, **norm):
                return rope_store_triton(q, k, v, cos, sin, *pool.slot_views(layer), none,
                                         **norm)

            def latent_slots(self, layer):     # MLA: the key stored nowhere either
                return pool.slot_views(layer)[0], none

            def __call__(self, layer, q, k, v):
                return torch.zeros_like(q)

        one = torch.zeros(1, dtype=torch.int64, device=dev)
        self.model(one, one, _Attn())

    def shutdown(self) -> bool:
        self._graphs.clear()  # their memory pools go back with them
        return super().shutdown()

    # ---- decode as a CUDA graph ----

    def _graph_body(self, g: "_DecodeGraph") -> torch.Tensor:
        """The batch of one-token rows through the model on static buffers; (B, vocab) logits."""
        stored = [-1]

        def rope_store(layer: int, q, k, v, cos, sin, **norm):
            # the model's fused RoPE + K/V store (Triton), every row into its slot
            from ringserve.kernels.fused import rope_store_triton
            out = rope_store_triton(q, k, v, cos, sin, *self.pool.slot_views(layer), g.slot,
                                    **norm)
            stored[0] = layer
            return out

        def latent_slots(layer: int):
            # MLA: the latent key's store in the model's fused prologue, every row into its slot
            stored[0] = layer
            return self.pool.slot_views(layer)[0], g.slot

        def attn(layer: int, q, k, v):
            if stored[0] != layer:
                self.pool.write(layer, g.slot, k[0], v[0])
            kw = dict(softmax_scale=self.softmax_scale, causal=True,
                      window_size=layer_window(self.window_size, layer),
                      kv_pos=self.pool.kv_pos, softcap=self.model.softcap,
                      positions_sorted=True)   # the cache's order
            k_layer, v_layer = self.pool.k[layer], self.pool.v[layer]
            if g.prefix and self.world_size == 1:
                # one rank: the rows' own pages and the shared document's merged in one
                # launch into the output, as the eager step's cascade (session 23's batch-16
                # graph step: two reduces, a merge and three copies a layer before)
                return kernels.cascade_decode_into(
                    q[0][:, None], q[0][None], k_layer, v_layer, (g.table, g.lens,
                    g.pos[:, None]), (g.ptable, g.plens, g.pos[None]), torch.empty_like(q[0]),
                    backend=self.backend, **kw)[None]
            out, lse = kernels.paged_decode(q[0][:, None], k_layer, v_layer, g.table, g.lens,
                                            q_pos=g.pos[:, None], backend=self.backend, **kw)
            if g.prefix:    # the rows' shared document, read once for all of them, merged in
                po, pl = kernels.paged_decode(q[0][None], k_layer, v_layer, g.ptable, g.plens,
                                              q_pos=g.pos[None], backend=self.backend,
                                              **kernels.shared_prefix_kw(kw))
                o, l_ = out[:, 0].float(), lse[:, :, 0].contiguous()
                _merge(o, l_, po[0], pl[0].t())
                merged = merge_rows(self.transport, o, l_)[0]   # world size > 1 here
                return merged.to(out.dtype)[None]
            if self.world_size > 1:
                o, l_ = merge_rows(self.transport, out[:, 0].float(),
                                   lse[:, :, 0].contiguous())
                out = o[:, None].to(out.dtype)
            return out[:, 0][None]

        attn.rope_store = rope_store
        attn.latent_slots = latent_slots
        hidden = self.model(g.tok, g.pos, attn, chunk_tokens=self.chunk_tokens,
                            seq_len=g.pos + 1)   # one-token rows: each its sequence's end
        return self.model.logits(hidden)

    def _capture(self, batch: int, width: int, prefix: int = 0) -> "_DecodeGraph":
        while len(self._graphs) >= self.max_cuda_graphs:    # the least recently replayed
            self._graphs.popitem(last=False)                 # (its pool goes back with it)
            self.graph_evictions += 1
        g = _DecodeGraph(batch, width, self.device, prefix)
        if self._emulate_graphs:
            g.graph = _EagerReplay(lambda: setattr(g, "logits", self._graph_body(g)))
            self._graphs[(batch, width, prefix)] = g
            return g
        cur = torch.cuda.current_stream(self.device)
        # one eager run first (Triton compiles, cuBLAS workspaces); every rank captures the same
        # bucket at the same step (the driver chose it), so these collectives match across ranks
        side = torch.cuda.Stream(self.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            self._graph_body(g)
        cur.wait_stream(side)
        if self.world_size > 1 or self.tp_size > 1:
            self.transport.synchronize()
        graph = torch.cuda.CUDAGraph()
        # a private memory pool per graph: no graph's output can overlap another's buffers.
        # thread_local: the sampler's helper thread may allocate pinned host memory for grammar
        # masks meanwhile (cudaHostAlloc), which under the default "global" mode invalidated
        # the capture (structured output with graphs on the H200, session 6)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            g.logits = self._graph_body(g)
        g.graph = graph
        self._graphs[(batch, width, prefix)] = g
        return g

    def _graph_step(self, plan: RankPlan, tables: List[torch.Tensor],
                    device_ids: Optional[tuple] = None) -> torch.Tensor:
        """Replay the bucket's graph for a step of one-token rows; returns their logits.
        device_ids: (src, ids): row i's input id is ids[src[i]] (on the device: drawn by a
        step still in flight) where src[i] >= 0."""
        B, W, PW = plan.graph_batch, plan.graph_width, plan.graph_prefix
        g = self._graphs.get((B, W, PW))
        if g is None:
            try:
                g = self._capture(B, W, PW)
            except Exception as e:   # the engine goes eager on every rank (GraphCaptureError)
                raise GraphCaptureError(f"rank {self.rank}: capturing the decode graph of "
                                        f"batch {B}, width {W}, prefix {PW} failed: "
                                        f"{type(e).__name__}: {e}"[:2000]) from e
        self._graphs.move_to_end((B, W, PW))
        n = len(plan.seqs)
        lo = plan.groups[0][1] if PW else 0     # this rank's shared pages (every row has them)
        page = self.pool.page_size
        # the step's inputs in pinned host memory, copied into the graph's buffers without
        # blocking (a copy from pageable memory waits for the device each time: five or six
        # round trips before every replay, while the device sits idle)
        pin = self.device.type == "cuda"
        kw = {"pin_memory": True} if pin else {}
        tok = torch.zeros(B, dtype=torch.int64, **kw)
        pos = torch.zeros(B, dtype=torch.int64, **kw)
        slot = torch.zeros(B, dtype=torch.int64, **kw)  # page 0: the scratch page
        lens = torch.zeros(B, dtype=torch.int32, **kw)
        table = torch.zeros(B, W, dtype=torch.int32, **kw)
        for i, s in enumerate(plan.seqs):
            tok[i], pos[i], lens[i] = s.token_ids[0], s.positions[0], s.n_after - lo * page
            if s.slots:
                slot[i] = s.slots[0]
            if tables[i].numel() > lo:
                table[i, :tables[i].numel() - lo] = tables[i][lo:]
        if PW:
            ptable = torch.zeros(1, PW, dtype=torch.int32, **kw)
            ptable[0, :lo] = tables[0][:lo]
            g.ptable.copy_(ptable, non_blocking=pin)
            g.plens.fill_(lo * page)
        g.tok.copy_(tok, non_blocking=pin)
        if device_ids is not None and any(j >= 0 for j in device_ids[0]):
            src, ids = device_ids
            if src == list(range(n)):           # the same rows as the step before
                g.tok[:n].copy_(ids[:n])
            else:
                idx = to_device(src, self.device, torch.int64)
                g.tok[:n] = torch.where(idx >= 0, ids[idx.clamp(min=0)], g.tok[:n])
        g.pos.copy_(pos, non_blocking=pin)
        g.slot.copy_(slot, non_blocking=pin)
        g.lens.copy_(lens, non_blocking=pin)
        g.table.copy_(table, non_blocking=pin)
        owned = [i for i, s in enumerate(plan.seqs) if s.slots]
        if owned:   # the rows this rank stores: their positions, from the graph's buffers
            idx = self._row_index(owned)
            self.pool.set_positions(g.slot[idx], g.pos[idx])
        g.graph.replay()
        self.graph_replays += 1
        return g.logits[:n]

    def torch_threads(self) -> int:
        """torch's intra-op threads in this worker's process."""
        return torch.get_num_threads()

    def features(self) -> Dict[str, object]:
        """What this rank runs with: decode graphs (captured, or emulated off CUDA) and the fused
        few-token kernels (after the LLM's defaults and the backend's say)."""
        return {"cuda_graphs": self.cuda_graphs, "fused_kernels": self.fused}

    def graph_stats(self) -> Dict[str, int]:
        """Captured decode graphs, how many steps replayed one, how many `launch` queued
        behind a step in flight, and how many came by `advance` (tests, benchmarks)."""
        return {"graphs": len(self._graphs), "replays": self.graph_replays,
                "evictions": self.graph_evictions,
                "captured_ahead": self.graphs_captured_ahead,
                "pipelined": self.pipelined_launches, "advances": self.advances}

    def graph_keys(self) -> List[Tuple[int, int, int]]:
        """(batch, table width, shared-prefix width) of every captured decode graph."""
        return sorted(self._graphs)

    # ---- measurements (benchmarks) ----

    def copy_bandwidth(self, nbytes: int = 1 << 30, iters: int = 10) -> float:
        """Device-to-device copy bandwidth in bytes/s, counting bytes read and written (the HBM
        floor of decode reads weights and KV at this rate). CPU: 0.0."""
        if self.device.type != "cuda":
            return 0.0
        a = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            b.copy_(a)
        end.record()
        end.synchronize()
        secs = start.elapsed_time(end) / 1e3
        del a, b
        torch.cuda.empty_cache()
        return 2.0 * nbytes * iters / secs


_COMPILES: List[Tuple[float, str]] = []


def _watch_compiles() -> List[Tuple[float, str]]:
    """Record every Triton compile of this process (its JIT cache hook; the list is shared by
    the process's workers). Triton versions without the hook record nothing."""
    try:
        from triton import knobs
    except ImportError:
        return _COMPILES
    prev = knobs.runtime.jit_cache_hook
    if getattr(prev, "_ringserve", False):
        return _COMPILES

    def hook(*args, **kwargs):
        # the kernel and its launch options, then its whole cache key (its specializations and
        # constexprs: compared with an earlier compile's, it says why this one happened)
        name = str(kwargs.get("repr", "")).split("](")[0] + "]"
        _COMPILES.append((time.time(), f"{name} {kwargs.get('key', '')}"[:6000]))
        del _COMPILES[:-1000]
        return prev(*args, **kwargs) if prev is not None else False

    hook._ringserve = True
    knobs.runtime.jit_cache_hook = hook
    return _COMPILES


class _Launched:
    """A step `launch` queued: its results once read (`read`, which waits for its device
    work), or its error."""
    __slots__ = ("read", "out", "error")

    def __init__(self, read=None, out=None, error: Optional[Exception] = None):
        self.read, self.out, self.error = read, out, error

    def settle(self) -> None:
        if self.read is not None:
            read, self.read = self.read, None
            try:
                self.out = read()
            except Exception as e:  # noqa: BLE001 - raised by result()
                self.error = e

    def result(self):
        self.settle()
        if self.error is not None:
            raise self.error
        return self.out


class _DecodeGraph:
    """Static inputs and the captured graph of a decode step of `batch` one-token rows with
    block tables of `width` pages (entries past a row's pages are never read: lens bounds)."""

    def __init__(self, batch: int, width: int, device: torch.device, prefix: int = 0):
        def z(dtype, *shape):
            return torch.zeros(*shape, dtype=dtype, device=device)
        self.batch, self.width, self.prefix = batch, width, prefix
        # the shared document's table (prefix > 0: pages read once for every row) and length
        self.ptable = z(torch.int32, 1, max(prefix, 1))
        self.plens = z(torch.int32, 1)
        self.tok, self.pos, self.slot = (z(torch.int64, batch), z(torch.int64, batch),
                                         z(torch.int64, batch))
        self.table = z(torch.int32, batch, width)
        self.lens = z(torch.int32, batch)
        self.graph = None
        self.logits: Optional[torch.Tensor] = None


class _EagerReplay:
    """Stands in for a CUDA graph under cuda_graphs="emulate": replay() runs the body."""

    def __init__(self, body):
        self.replay = body
