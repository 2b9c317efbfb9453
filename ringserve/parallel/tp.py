"""Tensor parallelism inside one sequence shard, applied to the model from outside.

A shard's `t` GPUs (its TP group) each hold a slice of every layer, as gpt-fast's tp.py and
Megatron lay it out:
  - q/k/v (and Phi-3's fused qkv) are column-parallel by heads: TP rank r holds query heads
    [r*Hq/t, (r+1)*Hq/t) and the KV heads those queries read. When t exceeds the KV heads, each
    KV head is replicated on the t/Hkv ranks whose query heads use it (vLLM's rule), so every
    rank still holds one whole KV head and GQA needs no cross-rank traffic;
  - o_proj is row-parallel: each rank multiplies its heads' slice and the TP group all-reduces
    (the bias is added once, after the sum);
  - the MLP's gate/up are column-parallel, down_proj row-parallel + all-reduce; MoE experts are
    split the same way along their intermediate dimension (the router is replicated, so every
    rank routes alike) and the MoE output is all-reduced;
  - the embedding and the LM head are vocabulary-parallel: rank r holds rows
    [r*V', (r+1)*V') with V' = ceil(V/t) (padded with zero rows past V); the embedding sums the
    ranks' partial lookups, the head all-gathers its logits slices.
Norms, RoPE, the residual stream and the sampled rows are the same on every rank of the group.

`apply_tp(model, rank, size, comm)` rewrites a `CausalLM` in place (on the meta device before
loading, or a loaded model whose tensors it slices). `model.config` then describes this rank's
share of the attention (num_attention_heads and num_key_value_heads per rank), so everything
sized from it (the KV pool, the attention step, kernel warm-up) is per rank with no change;
`model.tp.full_config` keeps the checkpoint's. `model.tp.shard(name)` tells a loader which slice
of a checkpoint tensor (or a parameter's full-size tensor) this rank keeps.

The model file has no distributed code: the all-reduces live in the modules below, which call
`comm.transport` (a `ringserve.parallel.transport.Transport` over the TP group, set once the
group's communicators exist).

Rank layout of a TP x CP group (`TPGrid`): actor `shard * t + tp_rank`. The ring of TP index
i joins TP rank i of every shard (each ring message carries 1/t of the K/V heads); the TP group
of shard j joins its t actors (one node: NVLink).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# the rank layout


@dataclass(frozen=True)
class TPGrid:
    """c shards (context parallel) x t GPUs per shard (tensor parallel)."""
    context_parallel_size: int
    tensor_parallel_size: int = 1

    def __post_init__(self):
        for name in ("context_parallel_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")

    @property
    def num_gpus(self) -> int:
        return self.context_parallel_size * self.tensor_parallel_size

    def actor(self, shard: int, tp_rank: int) -> int:
        return shard * self.tensor_parallel_size + tp_rank

    def rings(self) -> List[List[int]]:
        """The ring communicators: TP rank i of every shard, for each i."""
        c, t = self.context_parallel_size, self.tensor_parallel_size
        return [[self.actor(j, i) for j in range(c)] for i in range(t)]

    def tp_groups(self) -> List[List[int]]:
        """The TP communicators: the t actors of each shard."""
        c, t = self.context_parallel_size, self.tensor_parallel_size
        return [[self.actor(j, i) for i in range(t)] for j in range(c)]


def parallel_sizes(world_size: Optional[int] = None, context_parallel_size: Optional[int] = None,
                   tensor_parallel_size: Optional[int] = None) -> Tuple[int, int]:
    """(c, t) from the user's options: `world_size` is the old name of c, accepted while t is 1
    (with t > 1 it would be ambiguous: shards, or GPUs?)."""
    t = 1 if tensor_parallel_size is None else tensor_parallel_size
    for name, v in (("world_size", world_size), ("context_parallel_size", context_parallel_size),
                    ("tensor_parallel_size", t)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} ({v!r}) must be an integer >= 1")
    if world_size is not None and context_parallel_size is not None \
            and world_size != context_parallel_size:
        raise ValueError(f"world_size ({world_size}) is another name for context_parallel_size "
                         f"({context_parallel_size}): give one of them")
    if world_size is not None and context_parallel_size is None and t > 1 and world_size > 1:
        raise ValueError(f"world_size ({world_size}) with tensor_parallel_size ({t}) is "
                         f"ambiguous: say context_parallel_size (sequence shards); the group "
                         f"then uses context_parallel_size x tensor_parallel_size GPUs")
    c = context_parallel_size or world_size or 1
    return c, t


# ---------------------------------------------------------------------------------------------
# what a rank holds


def check_tp(cfg, size: int) -> None:
    """Raise ValueError, with the arithmetic, when `size` ranks cannot split the model."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size ({size}) must be >= 1")
    if size == 1:
        return
    if getattr(cfg, "mla", None) is not None:
        raise ValueError(f"tensor_parallel_size ({size}): {cfg.architecture} attention (MLA, a "
                         f"latent shared by all heads) is not split by tensor parallelism yet; "
                         f"use tensor_parallel_size 1")
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if hq % size:
        raise ValueError(f"tensor_parallel_size ({size}) must divide num_attention_heads ({hq}): "
                         f"{hq} % {size} = {hq % size}")
    if hkv % size and size % hkv:
        raise ValueError(f"tensor_parallel_size ({size}) must divide num_key_value_heads ({hkv}) "
                         f"or be a multiple of it (each KV head then replicated on "
                         f"tensor_parallel_size / num_key_value_heads ranks): {hkv} % {size} = "
                         f"{hkv % size}, {size} % {hkv} = {size % hkv}")
    sizes = [("intermediate_size", cfg.intermediate_size)]
    if cfg.moe is not None:
        sizes.append(("the experts' intermediate size", cfg.moe.intermediate_size))
    for name, n in sizes:
        if n % size:
            raise ValueError(f"tensor_parallel_size ({size}) must divide {name} ({n}): "
                             f"{n} % {size} = {n % size}")


def local_kv_heads(cfg, size: int) -> int:
    """KV heads per rank: Hkv / t, or one (replicated) when t exceeds Hkv."""
    return max(1, cfg.num_key_value_heads // size)


def _kv_start(cfg, rank: int, size: int) -> int:
    hkv = cfg.num_key_value_heads
    if hkv >= size:
        return rank * (hkv // size)
    return rank // (size // hkv)        # replicated: size/hkv ranks share one KV head


def local_config(cfg, size: int):
    """One rank's share: attention heads, KV heads and the MLP's intermediate size per rank
    (everything else, the vocabulary size included, unchanged)."""
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // size,
                               num_key_value_heads=local_kv_heads(cfg, size),
                               intermediate_size=cfg.intermediate_size // size)


@dataclass(frozen=True)
class Shard:
    """The slice of a full tensor one rank keeps: along `dim`, the pieces (start, length) of
    the full tensor, concatenated; a piece past the full tensor's end (vocabulary padding) is
    filled with zeros."""
    dim: int
    pieces: Tuple[Tuple[int, int], ...]

    @property
    def length(self) -> int:
        return sum(n for _, n in self.pieces)

    def take(self, full) -> torch.Tensor:
        """`full`: a tensor, or a safetensors slice (`safe_open(...).get_slice(name)`: only the
        kept rows are read from the file)."""
        shape = list(full.shape) if isinstance(full, torch.Tensor) else list(full.get_shape())
        dim = self.dim % len(shape)
        parts = []
        for start, n in self.pieces:
            have = max(0, min(n, shape[dim] - start))
            if have:
                index = (slice(None),) * dim + (slice(start, start + have),)
                parts.append(full[index])
            if have < n:
                pad = list(shape)
                pad[dim] = n - have
                like = parts[0] if parts else (full if isinstance(full, torch.Tensor) else None)
                parts.append(torch.zeros(pad, dtype=like.dtype if like is not None
                                         else torch.float32,
                                         device=like.device if like is not None else "cpu"))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def full_shape(self, local_shape: Sequence[int], full_len: int) -> Tuple[int, ...]:
        s = list(local_shape)
        s[self.dim % len(s)] = full_len
        return tuple(s)


_EXPERT = re.compile(r"\.experts\.\d+\.(\w+)\.weight$")


class _Plan:
    """name (a parameter's or a checkpoint tensor's) -> this rank's Shard, or None (replicated).
    Also the full length along the shard's dimension (random weights are drawn full size)."""

    def __init__(self, cfg, rank: int, size: int):
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        qn = hq // size
        ks, kn = _kv_start(cfg, rank, size), local_kv_heads(cfg, size)
        q = (rank * qn * d, qn * d)
        kv = (ks * d, kn * d)
        inter = cfg.intermediate_size // size
        mi = cfg.moe.intermediate_size // size if cfg.moe is not None else 0
        vl = -(-cfg.vocab_size // size)
        self.vocab_local = vl
        self.vocab_start = rank * vl
        rows = lambda *p: Shard(0, tuple(p))  # noqa: E731
        full_i, full_mi = cfg.intermediate_size, cfg.moe.intermediate_size if cfg.moe else 0
        # suffix -> (shard, full length along its dim)
        self._suffix = {
            "self_attn.q_proj.weight": (rows(q), hq * d),
            "self_attn.q_proj.bias": (rows(q), hq * d),
            "self_attn.k_proj.weight": (rows(kv), hkv * d),
            "self_attn.k_proj.bias": (rows(kv), hkv * d),
            "self_attn.v_proj.weight": (rows(kv), hkv * d),
            "self_attn.v_proj.bias": (rows(kv), hkv * d),
            "self_attn.o_proj.weight": (Shard(1, (q,)), hq * d),
            "mlp.gate_proj.weight": (rows((rank * inter, inter)), full_i),
            "mlp.gate_proj.bias": (rows((rank * inter, inter)), full_i),
            "mlp.up_proj.weight": (rows((rank * inter, inter)), full_i),
            "mlp.up_proj.bias": (rows((rank * inter, inter)), full_i),
            "mlp.down_proj.weight": (Shard(1, ((rank * inter, inter),)), full_i),
            "model.embed_tokens.weight": (rows((self.vocab_start, vl)), cfg.vocab_size),
            "lm_head.weight": (rows((self.vocab_start, vl)), cfg.vocab_size),
        }
        for b in ("weight", "bias"):
            self._suffix[f"self_attn.qkv_proj.{b}"] = (rows(
                q, (hq * d + kv[0], kv[1]), (hq * d + hkv * d + kv[0], kv[1])),
                (hq + 2 * hkv) * d)
            self._suffix[f"mlp.gate_up_proj.{b}"] = (rows(
                (rank * inter, inter), (full_i + rank * inter, inter)), 2 * full_i)
        if cfg.moe is not None:
            self._suffix["experts.gate_up"] = (Shard(1, ((rank * mi, mi),
                                                         (full_mi + rank * mi, mi))), 2 * full_mi)
            self._suffix["experts.down"] = (Shard(2, ((rank * mi, mi),)), full_mi)
            self._expert = {"w1": (rows((rank * mi, mi)), full_mi),
                            "w3": (rows((rank * mi, mi)), full_mi),
                            "gate_proj": (rows((rank * mi, mi)), full_mi),
                            "up_proj": (rows((rank * mi, mi)), full_mi),
                            "w2": (Shard(1, ((rank * mi, mi),)), full_mi),
                            "down_proj": (Shard(1, ((rank * mi, mi),)), full_mi)}
        else:
            self._expert = {}

    def lookup(self, name: str) -> Optional[Tuple[Shard, int]]:
        m = _EXPERT.search(name)
        if m is not None and self._expert:     # one expert's tensor in a checkpoint
            return self._expert.get(m.group(1))
        for suffix, spec in self._suffix.items():
            if name == suffix or name.endswith("." + suffix):
                return spec
        return None

    def shard(self, name: str) -> Optional[Shard]:
        got = self.lookup(name)
        return None if got is None else got[0]


# ---------------------------------------------------------------------------------------------
# the parallel modules


class TPComm:
    """The TP group's transport, filled in once the communicators exist (after the model is
    built: weights load before the group's transports are set up)."""

    def __init__(self, transport=None):
        self.transport = transport

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.transport is None:
            raise RuntimeError("the tensor-parallel group has no transport yet "
                               "(setup_transport was not called)")
        return self.transport.all_reduce(x.contiguous(), blocking=False)

    def all_gather(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.transport is None:
            raise RuntimeError("the tensor-parallel group has no transport yet "
                               "(setup_transport was not called)")
        return self.transport.all_gather(x.contiguous(), blocking=False)


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_r @ W_r^T) + b: this rank's input slice times its columns of W."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: TPComm,
                 **factory):
        super().__init__(in_features, out_features, bias=bias, **factory)
        self.comm = comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.comm.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + num_embeddings) of the table; ids elsewhere look up zeros, and the
    TP group's sum is every id's row."""

    def __init__(self, num_embeddings: int, dim: int, start: int, comm: TPComm, **factory):
        super().__init__(num_embeddings, dim, **factory)
        self.start, self.comm = start, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        out = out * mine[:, None].to(out.dtype)
        return self.comm.all_reduce(out)


class VocabParallelHead(nn.Linear):
    """Logits of rows [start, start + out_features) of the vocabulary, all-gathered over the
    TP group and cut to the true vocabulary (the last rank's padding rows dropped)."""

    def __init__(self, in_features: int, out_features: int, vocab_size: int, comm: TPComm,
                 **factory):
        super().__init__(in_features, out_features, bias=False, **factory)
        self.vocab_size, self.comm = vocab_size, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.comm.all_gather(F.linear(x, self.weight))
        return torch.cat(parts, dim=-1)[..., :self.vocab_size]


def _sum_over_group(comm: TPComm) -> Callable:
    def hook(_module, _inputs, output):
        return comm.all_reduce(output)
    return hook


# ---------------------------------------------------------------------------------------------
# the apply function


@dataclass
class TPInfo:
    rank: int
    size: int
    full_config: object
    plan: _Plan

    def shard(self, name: str) -> Optional[Shard]:
        """This rank's slice of the checkpoint tensor or parameter `name` (None: all of it)."""
        return self.plan.shard(name)

    def full_shape(self, name: str, local_shape: Sequence[int]) -> Tuple[int, ...]:
        got = self.plan.lookup(name)
        return tuple(local_shape) if got is None else got[0].full_shape(local_shape, got[1])


def _param(old: nn.Parameter, spec: Optional[Shard], new_shape) -> nn.Parameter:
    """The rank's parameter: a slice of `old` when it holds values, else empty on meta."""
    if old.device.type == "meta":
        return nn.Parameter(torch.empty(new_shape, dtype=old.dtype, device="meta"),
                            requires_grad=False)
    data = old.data if spec is None else spec.take(old.data)
    return nn.Parameter(data.clone(), requires_grad=False)


def _swap_linear(parent: nn.Module, attr: str, prefix: str, info: TPInfo, kind: str,
                 comm: TPComm) -> None:
    old: nn.Linear = getattr(parent, attr)
    spec_w = info.shard(f"{prefix}.weight")
    factory = {"dtype": old.weight.dtype, "device": "meta"}
    out_f, in_f = old.out_features, old.in_features
    if kind == "column":
        out_f = spec_w.length
        new = nn.Linear(in_f, out_f, bias=old.bias is not None, **factory)
    elif kind == "row":
        in_f = spec_w.length
        new = RowParallelLinear(in_f, out_f, old.bias is not None, comm, **factory)
    else:  # "head"
        out_f = spec_w.length
        new = VocabParallelHead(in_f, out_f, info.full_config.vocab_size, comm, **factory)
    new.weight = _param(old.weight, spec_w, (out_f, in_f))
    if old.bias is not None:
        spec_b = info.shard(f"{prefix}.bias") if kind == "column" else None
        new.bias = _param(old.bias, spec_b, (out_f,))
    setattr(parent, attr, new)


def apply_tp(model: nn.Module, rank: int, size: int, comm: TPComm) -> nn.Module:
    """Make `model` (a ringserve `CausalLM`) rank `rank` of a TP group of `size`, in place."""
    from ringserve.moe import MoE

    if not 0 <= rank < size:
        raise ValueError(f"tp rank ({rank}) must be in [0, tensor_parallel_size ({size}))")
    cfg = model.config
    check_tp(cfg, size)
    if size == 1:
        return model
    info = TPInfo(rank, size, cfg, _Plan(cfg, rank, size))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for i, layer in enumerate(model.model.layers):
        at = layer.self_attn
        p = f"model.layers.{i}.self_attn"
        ffn = layer.ffn()
        extra = (sorted(n for n, _ in ffn.named_children() if n not in ("gate", "experts"))
                 if isinstance(ffn, MoE) else [])
        if not (hasattr(at, "qkv_proj") or hasattr(at, "q_proj")) or extra:
            # a module this function does not know would stay whole and compute wrong sums
            raise ValueError(f"tensor parallelism does not know how to split layer {i} of "
                             f"{cfg.architecture} ({type(at).__name__}"
                             f"{', MoE ' + ', '.join(extra) if extra else ''})")
        for name in (("qkv_proj",) if at.fused else ("q_proj", "k_proj", "v_proj")):
            _swap_linear(at, name, f"{p}.{name}", info, "column", comm)
        _swap_linear(at, "o_proj", f"{p}.o_proj", info, "row", comm)
        if at.fused:
            d = cfg.head_dim
            kn = local_kv_heads(cfg, size)
            at.sizes = (cfg.num_attention_heads // size * d, kn * d, kn * d)
        p = f"model.layers.{i}.{layer.ffn_name}"
        if isinstance(ffn, MoE):
            ex = ffn.experts
            for pname in ("gate_up", "down"):
                old = getattr(ex, pname)
                spec = info.shard(f"{p}.experts.{pname}")
                shape = list(old.shape)
                shape[spec.dim] = spec.length
                setattr(ex, pname, _param(old, spec, tuple(shape)))
            ffn.register_forward_hook(_sum_over_group(comm))
        else:
            for name in (("gate_up_proj",) if ffn.fused else ("gate_proj", "up_proj")):
                _swap_linear(ffn, name, f"{p}.{name}", info, "column", comm)
            _swap_linear(ffn, "down_proj", f"{p}.down_proj", info, "row", comm)
    old = model.model.embed_tokens
    spec = info.shard("model.embed_tokens.weight")
    emb = VocabParallelEmbedding(spec.length, old.embedding_dim, info.plan.vocab_start, comm,
                                 dtype=old.weight.dtype, device="meta")
    emb.weight = _param(old.weight, spec, (spec.length, old.embedding_dim))
    model.model.embed_tokens = emb
    if tied:
        head = VocabParallelHead(old.embedding_dim, spec.length, cfg.vocab_size, comm,
                                 dtype=old.weight.dtype, device="meta")
        head.weight = emb.weight
        model.lm_head = head
    else:
        _swap_linear(model, "lm_head", "lm_head", info, "head", comm)
    model.config = local_config(cfg, size)
    model.tp = info
    return model


def retie(model: nn.Module) -> None:
    """After `to_empty` (which makes new parameters): tie the head to the embedding again."""
    info = getattr(model, "tp", None)
    cfg = info.full_config if info is not None else model.config
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
