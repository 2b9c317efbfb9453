"""The model shard worker: full weights, this rank's paged KV cache, prefill / extend / score steps.

The driver (ringserve.engine) calls the same method on every rank at once. Only token ids,
positions, sampling parameters and small results cross Ray; activations stay on the device and
ranks exchange K/V (ring prefill) or partial attention results (pass-Q extension) over the
group's transport.

- prefill: a new sequence's tokens are split by `layout.shard`; each rank runs the model on its
  shard at global positions, attention is `ring_attention`, and each layer's K/V of the rank's
  tokens go into its paged cache.
- extend ("pass-Q"): T new tokens (T = 1 when decoding) run redundantly on every rank. In each
  layer the K/V of token i are written to the cache of owners[i] only; every rank then attends
  the T queries to its own cache with `paged_decode` (causal + window by global position), the
  partial (out, lse) are all-gathered and merged in rank order, so every rank continues with the
  same output bit for bit.
- decode with cuda_graphs=True (CUDA only; not yet run on a GPU): the one-token step (all layers,
  their paged decode, the per-layer all-gathers, the LM head) is captured once per block-table
  width bucket and replayed, so a step costs one launch instead of thousands of eager ones.
  Ranks that do not own the token write its K/V to a scratch page; the width is agreed by all
  ranks at the start of each decode call, so every rank captures and replays the same
  collectives.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch

from ringserve import kernels
from ringserve.kv_cache import (KVCacheConfig, PagedKVCache, bytes_per_token, pages_for_budget)
from ringserve.parallel import layout
from ringserve.parallel.ring import ring_attention
from ringserve.sampling import SamplingParams, sample
from .worker import ShardWorker

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GiB = 1 << 30


def parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).replace("torch.", "") not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[str(dtype).replace("torch.", "")]


def build_model(source: Union[str, dict], dtype, device: torch.device):
    """A checkpoint directory, or {"config": hf_config_dict, "seed": int} for random weights
    made on the device (benchmarks: no 16 GB checkpoint on disk)."""
    from ringserve.model import CausalLM
    from ringserve.config import ModelConfig
    from ringserve.weights import resolve_dtype

    if not isinstance(source, dict):
        return CausalLM.from_pretrained(source, dtype=dtype, device=device)
    cfg = ModelConfig.from_hf_dict(source["config"])
    dtype = resolve_dtype(dtype, device, cfg)
    model = CausalLM(cfg, dtype=dtype, device="meta")  # parameters only: no init compute
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator(device=device).manual_seed(int(source.get("seed", 0)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:  # 1/sqrt(fan_in) keeps activations O(1) through the layers
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
    return model.eval()


def activation_bytes_per_token(cfg, elem: int) -> int:
    """Rough peak activation bytes per prefill token on one rank (hidden states, q/k/v/out,
    the float32 attention accumulator, the ring's two K/V buffers), with 25% slack."""
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per = elem * (2 * cfg.hidden_size + 3 * hq * d + 6 * hkv * d) + 4 * hq * d + 8 * hq
    return int(per * 1.25)


class ModelShardWorker(ShardWorker):
    """One rank of the model group. Construct through `ActorGroup(worker_cls=ModelShardWorker,
    worker_kwargs=...)`; the keyword arguments are those of `__init__` after `device`."""

    def __init__(self, rank: int, world_size: int, device: str = "cpu", model=None,
                 dtype=None, page_size: int = 16, kv_tokens: Optional[int] = None,
                 cpu_kv_bytes: int = 256 << 20, memory_reserve_bytes: Optional[int] = None,
                 chunk_tokens: Optional[int] = None, backend: str = "auto",
                 cuda_graphs: Union[bool, str] = False, **kwargs):
        super().__init__(rank, world_size, device, **kwargs)
        # "emulate" (tests, any device): the graph path's static buffers, scratch writes and
        # width agreement, with the body run eagerly at each "replay" instead of captured
        if cuda_graphs not in (False, True, "emulate"):
            raise ValueError(f"cuda_graphs must be True, False or 'emulate', got {cuda_graphs!r}")
        if cuda_graphs is True and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs device='cuda'")
        if model is None:
            raise ValueError("model (a checkpoint directory or a random-weights spec) is needed")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) must be >= 1 or None")
        self.model = build_model(model, parse_dtype(dtype), self.device)
        self.cfg = self.model.config
        self.chunk_tokens = chunk_tokens
        self.backend = backend
        self.window_size = self.model.window_size
        self.softmax_scale = self.model.softmax_scale
        cfg = self.cfg
        per_tok = bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                                  self.model.dtype)
        if kv_tokens is not None:
            num_pages = -(-int(kv_tokens) // page_size)
        elif self.device.type == "cuda":
            # what is free after the weights, minus a reserve for prefill activations that grows
            # with the tokens this rank may hold (one token of cache ~ one token of activations)
            free, total = torch.cuda.mem_get_info(self.device)
            fixed = (memory_reserve_bytes if memory_reserve_bytes is not None
                     else 3 * GiB + 3 * (chunk_tokens or 8192) * cfg.intermediate_size
                     * self.model.dtype.itemsize)
            act = activation_bytes_per_token(cfg, self.model.dtype.itemsize)
            num_pages = pages_for_budget(max(0, free - fixed), page_size, per_tok + act)
        else:
            num_pages = pages_for_budget(cpu_kv_bytes, page_size, per_tok)
        self.cache = PagedKVCache(KVCacheConfig(
            num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim, num_pages=num_pages, page_size=page_size,
            dtype=self.model.dtype, device=str(self.device)))
        self.cuda_graphs = bool(cuda_graphs)
        self._emulate_graphs = cuda_graphs == "emulate"
        self._graphs: dict = {}          # block-table width -> _DecodeGraph
        self._scratch_slot = self.cache.reserve_scratch_page() if cuda_graphs else None

    # ---- information ----

    def kv_info(self) -> dict:
        c = self.cache
        return {"rank": self.rank, "num_pages": c.num_pages, "free_pages": c.num_free_pages,
                "page_size": c.page_size, "capacity_tokens": c.capacity_tokens,
                "bytes_per_token": c.cfg.bytes_per_token, "sequences": len(c.seq_ids()),
                "vocab_size": self.cfg.vocab_size, "dtype": str(self.model.dtype),
                "num_layers": self.cfg.num_hidden_layers,
                "window_size": self.window_size,
                "max_position_embeddings": self.cfg.max_position_embeddings}

    def seq_lengths(self, seq_ids: Sequence[str]) -> List[int]:
        return [self.cache.seq_len(s) for s in seq_ids]

    # ---- sequence lifetime ----

    def fork(self, src: str, dst: str, max_position: Optional[int] = None) -> int:
        return self.cache.fork(src, dst, max_position)

    def free(self, seq_ids: Sequence[str]) -> int:
        for s in seq_ids:
            self.cache.free(s)
        return self.cache.num_free_pages

    def clear(self) -> int:
        self.cache.clear()
        return self.cache.num_free_pages

    # ---- steps ----

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @torch.inference_mode()
    def prefill(self, seq_id: str, token_ids, schedule: str, mode: Optional[str] = "sample",
                params: Optional[SamplingParams] = None, step: int = 0, progress=None):
        """Ring prefill of a new sequence. mode "sample": the rank holding the last position
        returns (token, logprob), others None; "score": every rank returns (positions,
        logprobs of the next token) for its positions < S - 1; None: returns None.
        progress: optional `report(layers_done, num_layers)` (ringserve.progress.Reporter),
        called by rank 0 as each layer starts and once at the end."""
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        S = ids.numel()
        if self.cache.has(seq_id):
            raise ValueError(f"sequence {seq_id!r} already exists on rank {self.rank}")
        sh = layout.shard(S, self.world_size, self.rank, schedule)
        pos = sh.positions()
        try:
            slots = self.cache.append_slots(seq_id, pos)
            report = progress if self.rank == 0 else None
            hidden = self.model(ids[pos], pos, self._prefill_attn(slots, S, schedule, report),
                                chunk_tokens=self.chunk_tokens)
            if report is not None:
                report(self.cfg.num_hidden_layers, self.cfg.num_hidden_layers)
            if mode == "sample":
                if sh.length == 0 or int(pos[-1]) != S - 1:
                    return None
                logits = self.model.logits(hidden[-1:])[0]
                return sample(logits, params, step)
            if mode == "score":
                keep = pos < S - 1
                lp = self._next_logprobs(hidden[keep], ids[pos[keep] + 1])
                return pos[keep].to(torch.int32), lp
            self._sync()
            return None
        except BaseException:
            self.cache.free(seq_id)
            raise

    def _prefill_attn(self, slots, total_len: int, schedule: str, report=None):
        def attn(layer: int, q, k, v):
            if report is not None:
                report(layer, self.cfg.num_hidden_layers)
            self.cache.write(layer, slots, k[0], v[0])
            if self.world_size == 1:
                out, _ = kernels.attention(q, k, v, softmax_scale=self.softmax_scale,
                                           causal=True, window_size=self.window_size,
                                           backend=self.backend)
            else:
                out, _ = ring_attention(q, k, v, total_len, schedule, self.transport,
                                        causal=True, window_size=self.window_size,
                                        softmax_scale=self.softmax_scale, backend=self.backend)
            return out
        return attn

    def _next_logprobs(self, hidden, targets, rows: int = 1024) -> torch.Tensor:
        """log p(targets[i] | hidden[i]) in float32 on the CPU, `rows` logits rows at a time."""
        out = torch.empty(hidden.shape[0], dtype=torch.float32)
        targets = targets.to(hidden.device)
        for a in range(0, hidden.shape[0], rows):
            lg = torch.log_softmax(self.model.logits(hidden[a:a + rows]), dim=-1)
            out[a:a + rows] = lg.gather(1, targets[a:a + rows, None])[:, 0].cpu()
        return out

    @torch.inference_mode()
    def extend(self, seq_id: str, token_ids, start_pos: int, owners: Sequence[int],
               params: Optional[SamplingParams] = None, step: int = 0):
        """Append T tokens at global positions start_pos.. to an existing (or new, empty)
        sequence; token i's K/V go to rank owners[i]. With params, rank 0 samples the next
        token from the last position's logits and returns (token, logprob); otherwise None."""
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        T = ids.numel()
        if len(owners) != T:
            raise ValueError(f"owners has {len(owners)} entries for {T} tokens")
        if self.cuda_graphs and T == 1:  # one token: the captured step (same on every rank)
            return self._graph_step(seq_id, int(ids[0]), start_pos, owners[0], params, step,
                                    self._graph_width(seq_id, 1))
        pos = start_pos + torch.arange(T, dtype=torch.int64)
        mine = [i for i, o in enumerate(owners) if o == self.rank]
        n_before = self.cache.seq_len(seq_id)
        slots = self.cache.append_slots(seq_id, pos[mine])
        try:
            dev = self.device
            mine_idx = torch.tensor(mine, dtype=torch.int64, device=dev)
            table = self.cache.block_table(seq_id)
            lens = self.cache.seq_lens(seq_id)
            q_pos = pos[None].to(dev)

            def attn(layer: int, q, k, v):
                if mine:
                    self.cache.write(layer, slots, k[0, mine_idx], v[0, mine_idx])
                out, lse = kernels.paged_decode(
                    q, self.cache.k[layer], self.cache.v[layer], table, lens,
                    softmax_scale=self.softmax_scale, causal=True, window_size=self.window_size,
                    q_pos=q_pos, kv_pos=self.cache.kv_pos, backend=self.backend)
                if self.world_size > 1:
                    out = self._merge_across_ranks(out, lse)
                return out

            hidden = self.model(ids, pos, attn, chunk_tokens=self.chunk_tokens)
            return self._end_step(lambda: self.model.logits(hidden[-1:])[0], params, step)
        except BaseException:
            self._roll_back(seq_id, n_before, start_pos)
            raise

    def _end_step(self, last_logits, params: Optional[SamplingParams], step: int):
        """After a step's kernels are queued: one deadline for them and their all-gathers (a
        hung peer raises here instead of hanging the host in the sampling), then rank 0
        samples from last_logits() when params are given."""
        if self.world_size > 1:
            self.transport.synchronize()
        if params is not None and self.rank == 0:
            return sample(last_logits(), params, step)
        self._sync()
        return None

    def _roll_back(self, seq_id: str, n_before: int, start_pos: int) -> None:
        """Leave the sequence as it was before a failed step (its K/V may be half written)."""
        if n_before:
            self.cache.trim(seq_id, int(start_pos))
        else:
            self.cache.free(seq_id)

    def decode(self, seq_id: str, token: int, start_pos: int, owners: Sequence[int],
               params: SamplingParams, step: int, stop_ids: Sequence[int] = ()):
        """Up to len(owners) decode steps in one call (one Ray round trip): feed `token` at
        start_pos, sample, feed the sample at start_pos + 1, ... Rank 0 samples and every rank
        receives the token through a tiny all-gather, so all ranks feed the same one. Stops
        early after a token in stop_ids. Returns [(token, logprob), ...] on every rank; the
        driver trims the cache if it stops (stop string, cancel) before using them all."""
        out = []
        tok = int(token)
        width = self._graph_width(seq_id, len(owners)) if self.cuda_graphs else None
        for i, owner in enumerate(owners):
            if width is not None:
                res = self._graph_step(seq_id, tok, start_pos + i, owner, params, step + i,
                                       width)
            else:
                res = self.extend(seq_id, [tok], start_pos + i, [owner], params, step + i)
            if self.world_size > 1:
                # token ids are exact in float32 below 2**24; the logprob is a float32 already
                msg = torch.tensor(res if res is not None else (0.0, 0.0), dtype=torch.float32,
                                   device=self.device)
                res = tuple(self.transport.all_gather(msg)[0].tolist())
            tok, lp = int(res[0]), float(res[1])
            out.append((tok, lp))
            if tok in stop_ids:
                break
        return out

    def shutdown(self) -> bool:
        self._graphs.clear()  # their memory pools go back with them
        return super().shutdown()

    # ---- decode as a CUDA graph ----

    def _graph_width(self, seq_id: str, steps: int) -> int:
        """The block-table width (pages) for the next `steps` decode steps, the same on every
        rank: a power of two >= the most pages any rank can hold by the last of them."""
        need = self.cache.pages_for(self.cache.seq_len(seq_id) + steps)
        if self.world_size > 1:
            got = self.transport.all_gather(torch.tensor([need], dtype=torch.int64,
                                                         device=self.device))
            need = max(int(x.item()) for x in got)
        width = 16
        while width < need:
            width *= 2
        return width

    def _graph_body(self, g: "_DecodeGraph") -> torch.Tensor:
        """One token through the model on static buffers; returns the (1, vocab) logits."""
        def attn(layer: int, q, k, v):
            self.cache.write(layer, g.slot, k[0], v[0])
            out, lse = kernels.paged_decode(
                q, self.cache.k[layer], self.cache.v[layer], g.table, g.lens,
                softmax_scale=self.softmax_scale, causal=True, window_size=self.window_size,
                q_pos=g.pos[None], kv_pos=self.cache.kv_pos, backend=self.backend)
            if self.world_size > 1:
                out = self._merge_across_ranks(out, lse)
            return out

        hidden = self.model(g.tok, g.pos, attn, chunk_tokens=self.chunk_tokens)
        return self.model.logits(hidden[-1:])

    def _capture(self, width: int) -> "_DecodeGraph":
        g = _DecodeGraph(width, self.device)
        g.slot.fill_(self._scratch_slot)
        if self._emulate_graphs:
            g.graph = _EagerReplay(lambda: setattr(g, "logits", self._graph_body(g)))
            self._graphs[width] = g
            return g
        cur = torch.cuda.current_stream(self.device)
        # one eager run first (Triton compiles, cuBLAS workspaces); every rank captures the same
        # width at the same step, so these collectives match across ranks
        side = torch.cuda.Stream(self.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            self._graph_body(g)
        cur.wait_stream(side)
        if self.world_size > 1:
            self.transport.synchronize()
        graph = torch.cuda.CUDAGraph()
        # a private memory pool per graph: no graph's output can overlap another's buffers
        with torch.cuda.graph(graph):
            g.logits = self._graph_body(g)
        g.graph = graph
        self._graphs[width] = g
        return g

    @torch.inference_mode()
    def _graph_step(self, seq_id: str, tok: int, pos: int, owner: int,
                    params: Optional[SamplingParams], step: int, width: int):
        """`extend(seq_id, [tok], pos, [owner], params, step)` by replaying a captured graph."""
        n_before = self.cache.seq_len(seq_id)
        try:
            g = self._graphs.get(width) or self._capture(width)
            if owner == self.rank:
                g.slot.copy_(self.cache.append_slots(
                    seq_id, torch.tensor([pos], dtype=torch.int64)))
            else:
                g.slot.fill_(self._scratch_slot)
            table = self.cache.block_table(seq_id)  # device, rebuilt only when pages change
            if table.shape[1] > width:
                raise RuntimeError(f"rank {self.rank}: {table.shape[1]} pages exceed the agreed "
                                   f"block-table width {width}")
            if g.table_src is not table:  # copied into the graph's buffer only when it changed
                g.table[:, :table.shape[1]].copy_(table)
                g.table_src = table
            g.lens.fill_(self.cache.seq_len(seq_id))
            g.tok.fill_(int(tok))
            g.pos.fill_(int(pos))
            g.graph.replay()
            return self._end_step(lambda: g.logits[0], params, step)
        except BaseException:
            self._roll_back(seq_id, n_before, pos)
            raise

    def trim(self, seq_id: str, max_position: int) -> int:
        """Drop seq_id's tokens at positions >= max_position on this rank."""
        return self.cache.trim(seq_id, max_position)

    def _merge_across_ranks(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """All-gather every rank's partial (out, lse) of the same queries, merge in rank order."""
        n_out = out.numel()
        packed = torch.cat([out.float().reshape(-1), lse.reshape(-1)])
        # Stream-ordered (NCCL): the merge below waits for the all-gather on the GPU, not on
        # the host, so the host queues every layer of the step without stalling once per layer
        # (92 ms/token measured with a host wait per layer); `extend` bounds the whole step's
        # wait with one transport.synchronize. CPU transports complete before returning.
        parts = self.transport.all_gather(packed, blocking=False)
        acc_out = parts[0][:n_out].view(out.shape).clone()
        acc_lse = parts[0][n_out:].view(lse.shape).clone()
        for p in parts[1:]:
            kernels.merge_(acc_out, acc_lse, p[:n_out].view(out.shape), p[n_out:].view(lse.shape),
                           backend=self.backend)
        return acc_out.to(out.dtype)

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


class _DecodeGraph:
    """Static inputs and the captured graph of a one-token decode step (block tables of
    `width` pages; entries past the sequence's pages are never read: lens bounds the kernel)."""

    def __init__(self, width: int, device: torch.device):
        def z(dtype, *shape):
            return torch.zeros(*shape, dtype=dtype, device=device)
        self.width = width
        self.tok, self.pos, self.slot = z(torch.int64, 1), z(torch.int64, 1), z(torch.int64, 1)
        self.table = z(torch.int32, 1, width)
        self.table_src: Optional[torch.Tensor] = None  # the block table last copied in
        self.lens = z(torch.int32, 1)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None


class _EagerReplay:
    """Stands in for a CUDA graph under cuda_graphs="emulate": replay() runs the body."""

    def __init__(self, body):
        self.replay = body
