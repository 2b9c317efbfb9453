"""Llama-style decoders (Llama, Mistral, Qwen2/3, Phi-3, Mixtral, Qwen3-MoE, Gemma 2/3), with the
attention step supplied from outside.

No distributed code lives here. The engine passes `attn_fn(layer_idx, q, k, v) -> out` with
q (1, T, Hq, D), k and v (1, T, Hkv, D) for this process's tokens (already rotated at their global
positions), out (1, T, Hq, D); an attn_fn with `flat_batch = True` takes and returns them
without the leading 1 (the engine's step: two view ops fewer a tensor a layer). It runs ring
attention, distributed decode, or plain local attention, and may keep k/v in its KV cache. K/V heads are never repeated for GQA/MQA. What the attention must apply
per layer is on the model: `window_size` (an int or None for all layers, or a tuple per layer:
Gemma's windowed and global layers), `softmax_scale` and `softcap` (Gemma 2's score capping).

Parameter names equal HuggingFace's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
checkpoint's tensors load by name; stacked expert weights map onto per-expert checkpoint
tensors through `checkpoint_slots`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .joined import _Joined, gated_down, gated_mlp
from .moe import MoE
from .rope import Rotary

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.eps = eps
        self.plus_one = plus_one   # Gemma: the checkpoint stores w, the scale is 1 + w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 whatever the activation dtype (bf16 sums of squares overflow
        # precision long before they overflow range); cast back before the weight, as HF does
        # for Llama, after it for Gemma (whose (1 + w) multiply is in float32)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def _project_out(proj: nn.Module, o: torch.Tensor, fused: bool,
                 residual: Optional[torch.Tensor]) -> torch.Tensor:
    """proj(o) for the attention's output (t, Hq * D); fused: by `few_rows_linear` (a Triton
    GEMV for one row) when proj is a plain nn.Linear (not a tensor-parallel slice); residual:
    residual += proj(o) in place inside the GEMV's launch (`gemv`'s residual=: rounded as
    torch's h += y), returned (the caller has checked `gemv.folds`)."""
    if residual is not None:
        from ringserve.kernels.gemv import gemv
        return gemv(o, proj.weight, proj.bias, residual=residual)
    if fused and type(proj) is nn.Linear:
        from ringserve.kernels.gemv import few_rows_linear
        return few_rows_linear(o, proj.weight, proj.bias)
    return proj(o)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.sizes = (hq * d, hkv * d, hkv * d)
        self.fused = cfg.fused_projections
        if self.fused:  # Phi-3: one projection, split q | k | v
            self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.sizes), bias=cfg.qkv_bias,
                                      **factory)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=cfg.qkv_bias, **factory)
            self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.qkv_bias, **factory)
            self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.qkv_bias, **factory)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=cfg.o_bias, **factory)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm over head_dim, before RoPE
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.gemma_norms, **factory)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.gemma_norms, **factory)
        self.qk_norm = cfg.qk_norm
        self.joined: Optional[_Joined] = None

    def join_weights(self) -> None:
        """q, k, v projections as one GEMM on the few-token path (`qkv_joint`)."""
        if not self.fused:
            self.joined = _Joined((self.q_proj, self.k_proj, self.v_proj))

    def qkv_joint(self, x: torch.Tensor):
        """As `qkv`, with one GEMM where the weights are joined (Phi-3's are), and q, k, v
        left as views of its output."""
        j = self.joined
        if self.fused:
            return self.qkv_proj(x).split(self.sizes, dim=-1)
        if j is None or not j.holds(self.q_proj, self.k_proj, self.v_proj):
            return self.qkv(x)
        return F.linear(x, j.weight, j.bias).split(j.sizes, dim=-1)

    def x_linear(self):
        """(weight, bias, sizes) of the one GEMM over x (Phi-3's qkv_proj, or q|k|v joined),
        or None (the projections run one by one, or one is a tensor-parallel slice)."""
        j = self.joined
        if self.fused:
            p = self.qkv_proj
            return (p.weight, p.bias, self.sizes) if type(p) is nn.Linear else None
        if j is not None and j.holds(self.q_proj, self.k_proj, self.v_proj):
            return j.weight, j.bias, j.sizes
        return None

    def qkv_heads(self, x: torch.Tensor, d: int, norm: Optional["RMSNorm"] = None):
        """As `qkv_joint`, as q (t, Hq, d), k, v (t, Hkv, d): one view and one split of the
        joined GEMM's output (a split and three views before: view ops add up in a
        launch-bound step). norm: x is that RMSNorm's input, applied inside the GEMM's launch
        (`kernels.gemv.gemv`'s norm=; the caller has checked `x_linear` and `gemv.folds`)."""
        from ringserve.kernels.gemv import few_rows_linear, gemv
        lin = self.x_linear()
        if lin is None:     # not joined, or a tensor-parallel slice: one by one below
            y, sizes = None, ()
        elif norm is not None:
            y, sizes = gemv(x, lin[0], lin[1], norm=(norm.weight, norm.eps)), lin[2]
        else:               # one GEMM: a Triton GEMV for one row
            y, sizes = few_rows_linear(x, lin[0], lin[1]), lin[2]
        if y is None or any(n % d for n in sizes):
            t = x.shape[0]
            return tuple(z.view(t, -1, d) for z in self.qkv_joint(x))
        return y.view(y.shape[0], -1, d).split([n // d for n in sizes], dim=1)

    def qkv(self, x: torch.Tensor):
        """x (t, hidden) -> q (t, Hq*D), k, v (t, Hkv*D), unrotated, before any q/k norm."""
        if self.fused:
            # v leaves as its own tensor: the attention step may send it over the ring or
            # store it, and a strided view of the fused output is not what transports expect
            q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
            return q, k, v.contiguous()
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def output(self, o: torch.Tensor, dtype: torch.dtype, fused: bool = False,
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention's output (t, Hq, D) -> (t, hidden). fused: the few-token path's
        projection (`few_rows_linear`: a Triton GEMV for one row). residual: h (t, hidden)
        += the projection, in place inside its launch (returned; `_project_out`)."""
        o = o.reshape(o.shape[0], -1)
        o = o if o.dtype == dtype else o.to(dtype)
        return _project_out(self.o_proj, o, fused, residual)


class MLAttention(nn.Module):
    """DeepSeek-V2's multi-head latent attention, computed in the absorbed form throughout.

    Per token: the latent c = norm(kv_a(x))[:kv_lora_rank] and one RoPE key k_pe shared by the
    heads. transformers expands k_h = [W_UK_h c ; k_pe], v_h = W_UV_h c per head; since
    q_h . k_h = (W_UK_h^T q_nope_h) . c + q_pe_h . k_pe, the query is projected into the latent
    space instead (q_h' = [W_UK_h^T q_nope_h ; q_pe_h], latent_dim wide) and every head attends
    the same key [c ; k_pe]: MQA with one KV head of latent_dim, whose values are the key's first
    kv_lora_rank columns (v is k, so the cache and the ring carry latent_dim values per token).
    The output per head, in the latent space, is projected back by W_UV_h. Exact: the same sums
    in another order."""

    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        m, H, h = cfg.mla, cfg.hidden_size, cfg.num_attention_heads
        self.mla, self.heads = m, h
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(H, h * m.qk_head_dim, bias=False, **factory)
        else:
            self.q_a_proj = nn.Linear(H, m.q_lora_rank, bias=cfg.qkv_bias, **factory)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, cfg.rms_norm_eps, **factory)
            self.q_b_proj = nn.Linear(m.q_lora_rank, h * m.qk_head_dim, bias=False, **factory)
        self.kv_a_proj_with_mqa = nn.Linear(H, m.latent_dim, bias=cfg.qkv_bias, **factory)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, cfg.rms_norm_eps, **factory)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim),
                                   bias=False, **factory)
        self.o_proj = nn.Linear(h * m.v_head_dim, H, bias=cfg.o_bias, **factory)
        self.joined: Optional[_Joined] = None

    def _x_projs(self):
        """The two linears over x: the query's (q_proj, or q_a_proj with a q LoRA) and the
        latent's."""
        return (self.q_proj if self.mla.q_lora_rank is None else self.q_a_proj,
                self.kv_a_proj_with_mqa)

    def join_weights(self) -> None:
        """The query's and the latent's projections of x as one GEMM on the few-token path
        (not when only one of them has a bias)."""
        a, b = self._x_projs()
        if (a.bias is None) == (b.bias is None):
            self.joined = _Joined((a, b))

    def _wkv(self):
        """W_UK (h, nope, c), W_UV (h, v, c): views of kv_b_proj's weight (no copy: decode reads
        it once per step, as the expanded form would)."""
        m = self.mla
        w = self.kv_b_proj.weight.view(self.heads, m.qk_nope_head_dim + m.v_head_dim,
                                       m.kv_lora_rank)
        return w[:, :m.qk_nope_head_dim], w[:, m.qk_nope_head_dim:]

    def x_linear(self):
        """(weight, bias, sizes) of the one GEMM over x (the query's and the latent's
        projections joined), or None."""
        j = self.joined
        return (j.weight, j.bias, j.sizes) if j is not None and j.holds(*self._x_projs()) \
            else None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm=None,
                fused: bool = False, expanded: bool = False, kv_dst=None,
                in_norm: Optional[RMSNorm] = None):
        """x (t, hidden) normed -> q (t, h, latent_dim), k (t, 1, latent_dim), v = k.
        norm(module, x): how to apply the RMSNorm modules; fused: the few-token path (norms
        by `norm`, the latent's norm, RoPE and the concatenations in one Triton launch).
        expanded: also return the queries of the expanded form, (t, h, qk_head_dim) = [q_nope ;
        rotated q_pe] (`expand_kv`), as a fourth value. kv_dst (fused only): (the layer's flat
        cache slots (N, 1, latent_dim), each row's slot (t,) int64, -1 for none): k is also
        stored there, by the same launch. in_norm (fused): x is that RMSNorm's input, applied
        inside the joined GEMM's launch (`Attention.qkv_heads`' norm)."""
        m, t = self.mla, x.shape[0]
        norm = norm or (lambda mod, y: mod(y))
        j = self.joined
        if in_norm is not None:
            from ringserve.kernels.gemv import gemv
            q, ckv = gemv(x, j.weight, j.bias, norm=(in_norm.weight, in_norm.eps)).split(
                j.sizes, dim=-1)
        elif fused and j is not None and j.holds(*self._x_projs()):   # one GEMM for both
            from ringserve.kernels.gemv import few_rows_linear    # (a Triton GEMV for one row)
            q, ckv = few_rows_linear(x, j.weight, j.bias).split(j.sizes, dim=-1)
        else:
            q, ckv = self._x_projs()[0](x), self.kv_a_proj_with_mqa(x)
        if m.q_lora_rank is not None:
            q = self.q_b_proj(norm(self.q_a_layernorm, q))
        q_nope, q_pe = q.view(t, self.heads, m.qk_head_dim).split(
            [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c, k_pe = ckv.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        w_uk, _ = self._wkv()
        # the absorption: a (t, h, c) batched GEMM in the weights' dtype (float32 accumulation),
        # as transformers' kv_b_proj; the expanded K never exists. A decode token on the fused
        # path: inside the RoPE launch below (no batched GEMM launch of its own)
        in_rope = False
        if fused:
            from ringserve.kernels.fused import ABSORB_MAX_ROWS, latent_rope_triton
            in_rope = t <= ABSORB_MAX_ROWS and q_nope.dtype == w_uk.dtype \
                and q_nope.stride(-1) == 1 and w_uk.stride(-1) == 1
        q_lat = None if in_rope else self._absorb(q_nope, w_uk.transpose(1, 2), fused)
        ln = self.kv_a_layernorm
        if fused and (in_rope or q_lat.stride(-1) == 1):
            q, k = latent_rope_triton(
                q_lat, q_pe, c if not ln.plus_one else norm(ln, c), k_pe, cos, sin,
                norm_weight=None if ln.plus_one else ln.weight, eps=ln.eps,
                kv_slots=kv_dst[0] if kv_dst is not None else None,
                slots=kv_dst[1] if kv_dst is not None else None,
                absorb=(q_nope, w_uk) if in_rope else None)
        else:
            c = norm(ln, c)
            q = torch.cat([q_lat, Rotary.apply_interleaved(q_pe, cos, sin)], dim=-1)
            k = torch.cat([c, Rotary.apply_interleaved(k_pe[:, None], cos, sin)[:, 0]],
                          dim=-1)[:, None]
            if kv_dst is not None:   # the caller counts on the store (off the usual path)
                ok = kv_dst[1] >= 0
                kv_dst[0].index_copy_(0, kv_dst[1][ok], k[ok].to(kv_dst[0].dtype))
        if expanded:
            return q, k, k, torch.cat([q_nope, q[..., m.kv_lora_rank:]], dim=-1)
        return q, k, k

    def expand_kv(self, latent: torch.Tensor):
        """The expanded form's keys and values of cached latents: latent (n, 1, latent_dim)
        (normed c, rotated k_pe: what the cache holds) -> k (n, h, qk_head_dim) = [W_UK_h c ;
        k_pe], v (n, h, v_head_dim) = W_UV_h c. One GEMM through kv_b_proj, as transformers
        computes them.

        A prefill chunk of many queries attends faster this way: per (query, key, head)
        qk_head_dim + v_head_dim products (320 for DeepSeek-V2) against latent_dim +
        kv_lora_rank (1088) absorbed, in the flash kernel's large tiles rather than a 576-wide
        head's small ones; the cost is the keys' expansion, once per chunk and layer."""
        m, n = self.mla, latent.shape[0]
        lat = latent.reshape(n, m.latent_dim)
        kv = self.kv_b_proj(lat[:, :m.kv_lora_rank]).view(n, self.heads,
                                                          m.qk_nope_head_dim + m.v_head_dim)
        k = torch.empty(n, self.heads, m.qk_head_dim, dtype=kv.dtype, device=kv.device)
        k[..., :m.qk_nope_head_dim] = kv[..., :m.qk_nope_head_dim]
        k[..., m.qk_nope_head_dim:] = lat[:, None, m.kv_lora_rank:]
        return k, kv[..., m.qk_nope_head_dim:]

    @staticmethod
    def _absorb(x: torch.Tensor, w: torch.Tensor, fused: bool) -> torch.Tensor:
        """x (t, h, k) cast to w's dtype, w (h, n, k) -> (t, h, n) in w's dtype, float32 sums:
        torch.einsum's batched GEMM, or with fused for a decode step's few rows and a weight
        whose summed dim is contiguous (W_UV) `head_gemv`. Session 18's bench_gemv (one H200,
        DeepSeek-V2-Lite, one row): W_UV 3.1 -> 2.4 us; W_UK, read across its rows, 2.8 us by
        einsum against 2.9 at head_gemv's best tile, so einsum keeps it."""
        x = x if x.dtype == w.dtype else x.to(w.dtype)
        if fused and w.stride(2) == 1:
            from ringserve.kernels.gemv import HEAD_GEMV_MAX_ROWS, head_gemv
            if x.shape[0] <= HEAD_GEMV_MAX_ROWS:
                return head_gemv(x, w)
        return torch.einsum("thk,hnk->thn", x, w)

    def to_values(self, o: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """(t, h, latent_dim) attention output in the latent space -> (t, h, v_head_dim): W_UV
        per head, the values' space the expanded form's output is in. fused: as `project`'s."""
        _, w_uv = self._wkv()
        return self._absorb(o[..., :self.mla.kv_lora_rank], w_uv, fused)

    def output(self, o: torch.Tensor, dtype: torch.dtype, values: bool = False,
               fused: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(t, h, latent_dim) attention output in the latent space -> (t, hidden); values=True:
        o is (t, h, v_head_dim) in the values' space already (`to_values`, the expanded
        form). fused, residual: as Attention.output's."""
        if not values:
            o = self.to_values(o, fused)
        o = o.reshape(o.shape[0], -1)
        o = o if o.dtype == dtype else o.to(dtype)
        return _project_out(self.o_proj, o, fused, residual)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.fused = cfg.fused_projections
        if self.fused:  # Phi-3: one projection, split gate | up
            self.gate_up_proj = nn.Linear(h, 2 * i, bias=b, **factory)
        else:
            self.gate_proj = nn.Linear(h, i, bias=b, **factory)
            self.up_proj = nn.Linear(h, i, bias=b, **factory)
        self.down_proj = nn.Linear(i, h, bias=b, **factory)
        self.act = cfg.hidden_act
        self.joined: Optional[_Joined] = None

    def join_weights(self) -> None:
        """gate and up as one GEMM on the few-token path."""
        if not self.fused:
            self.joined = _Joined((self.gate_proj, self.up_proj))

    def forward(self, x: torch.Tensor, fused_act: bool = False) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return gated_down(self.down_proj, gate, up, fused_act,
                              self.act == "gelu_pytorch_tanh")
        return gated_mlp(self, x, fused_act, self.act == "gelu_pytorch_tanh")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, **factory):
        super().__init__()
        norm = {"eps": cfg.rms_norm_eps, "plus_one": cfg.gemma_norms, **factory}
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = (MLAttention(cfg, **factory) if cfg.mla is not None
                          else Attention(cfg, **factory))
        # Llama: the norm before the MLP. Gemma: the norm of the attention's output, then two
        # more around the MLP (its input, its output)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.sandwich = cfg.gemma_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)
        # the MLP is registered under the checkpoint's name for it (Mixtral: block_sparse_moe)
        self.ffn_name = "mlp"
        if cfg.moe is not None and index not in cfg.moe.dense_layers:
            self.ffn_name = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"
            setattr(self, self.ffn_name, MoE(cfg.hidden_size, cfg.moe, cfg.model_type,
                                             cfg.mlp_bias, **factory))
        else:
            self.mlp = MLP(cfg, **factory)

    def ffn(self) -> nn.Module:
        return getattr(self, self.ffn_name)

    def residual_updates(self, h: torch.Tensor, o: torch.Tensor, values: bool = False) -> None:
        """h += the attention output o (t, Hq, D) (projected) and then the MLP's, in place
        (values: MLA's output in the values' space, `MLAttention.output`)."""
        a = (self.self_attn.output(o, h.dtype, values=True) if values
             else self.self_attn.output(o, h.dtype))
        if self.sandwich:
            h += self.post_attention_layernorm(a)
            h += self.post_feedforward_layernorm(self.ffn()(self.pre_feedforward_layernorm(h)))
        else:
            h += a
            h += self.ffn()(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, **factory):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, **factory)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms, **factory)


# steps of at most this many tokens (decode batches, short extensions) in one span run the
# few-token fused path when the backend is Triton (kernels/fused.py); longer ones take its
# span-by-span form (`_forward_spans_fused`; MLA: the torch path)
FUSED_MAX_TOKENS = 1024


def _spans(n: int, chunk: Optional[int]):
    step = n if not chunk else chunk
    for i in range(0, n, max(1, step)):
        yield i, min(n, i + step)


class CausalLM(nn.Module):
    """The decoder plus LM head. `forward` returns final-norm hidden states, `logits` projects."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu"):
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.config = config
        self.model = Decoder(config, **factory)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # MLA rotates only its qk_rope_head_dim part (interleaved pairs)
        self.rotary = Rotary(config.rope, config.mla.qk_rope_head_dim if config.mla is not None
                             else config.head_dim)
        # Gemma 3: the sliding layers rotate with their own base
        self.local_rotary = (Rotary(config.local_rope, config.head_dim)
                             if config.local_rope is not None else None)
        self.layer_rotary = [self.local_rotary is not None and t == "sliding_attention"
                             for t in (config.layer_types or ("",) * config.num_hidden_layers)]
        # the kernels' window (HF sliding_window W -> W - 1), read by the engine: an int or None
        # for every layer, or a tuple with one per layer
        self.window_size: Union[Optional[int], tuple] = config.window_size
        self.softmax_scale = config.softmax_scale
        self.softcap: Optional[float] = config.attn_logit_softcap
        # kernels for few-token steps: "torch" (default), "triton", or "auto" (Triton on CUDA);
        # the worker sets "torch" unless asked for its fused kernels (fused_kernels=True, the
        # LLM's default on CUDA)
        self.backend = "torch"

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device] = "cpu") -> "CausalLM":
        """Load config.json + safetensors from a local directory (never the hub)."""
        from .weights import load_weights, resolve_dtype

        config = ModelConfig.from_dir(path)
        device = torch.device(device)
        dtype = resolve_dtype(dtype, device, config)
        # built on the meta device so no memory is spent on an initialisation that is
        # overwritten; storage is allocated empty on the target device, then filled tensor by
        # tensor by the loader
        model = cls(config, dtype=dtype, device="meta")
        model.to_empty(device=device)
        if config.tie_word_embeddings:  # to_empty re-creates parameters: tie again
            model.lm_head.weight = model.model.embed_tokens.weight
        load_weights(model, path)
        model.eval()
        return model

    def join_weights(self) -> None:
        """Join each layer's q/k/v and gate/up weights (also DeepSeek's shared experts' gate/up,
        MLA's two projections of x, and a float32 copy of DeepSeek's router) for the few-token
        path's single GEMMs (the parameters become views of the joined tensors: no memory added
        once the old ones are freed). The worker calls it when that path is Triton."""
        for layer in self.model.layers:
            for mod in (layer.self_attn, layer.ffn()):
                if isinstance(mod, (Attention, MLAttention, MLP, MoE)):
                    mod.join_weights()

    def checkpoint_slots(self) -> dict:
        """checkpoint tensor name -> (parameter name, index) for parameters that hold several
        checkpoint tensors (stacked experts); the loader fills those slices."""
        out = {}
        for name, mod in self.named_modules():
            if isinstance(mod, MoE):
                out.update(mod.checkpoint_slots(f"{name}."))
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # no_grad, not inference_mode: the engine keeps k/v and hidden states and may write into them
    # later outside any inference-mode block, which inference tensors forbid
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_fn: AttnFn,
                chunk_tokens: Optional[int] = None,
                seq_len: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
        """input_ids (T,) int64, positions (T,) int64 global -> hidden (T, hidden) after the norm.

        seq_len: the length of each token's sequence, an int or (T,) (a flat batch of several
        sequences, or one shard of a sequence-parallel prefill); only longrope reads it, to pick
        its factors per sequence and alike on every shard. None: the highest position plus one.

        chunk_tokens bounds activation memory: norms, projections and the MLP run over chunks of
        that many tokens, so the peak is O(T * hidden) + O(chunk * intermediate), never
        O(T * intermediate). Attention sees all T tokens at once.
        """
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions "
                             f"{tuple(positions.shape)} must be equal 1-D shapes")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) must be >= 1 or None")
        cfg = self.config
        T = input_ids.shape[0]
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dev = self.device
        input_ids, positions = input_ids.to(dev), positions.to(dev)
        cos, sin = self.rotary.cos_sin(positions, seq_len)  # (T, 1, D/2) float32: O(T * D)
        local = (self.local_rotary.cos_sin(positions, seq_len)
                 if self.local_rotary is not None else None)
        h = self.model.embed_tokens(input_ids)     # (T, hidden), the residual stream
        if cfg.embed_scale is not None:   # in the weights' dtype, as transformers rounds it
            h *= torch.tensor(cfg.embed_scale, dtype=h.dtype)
        spans = list(_spans(T, chunk_tokens))
        from ringserve import kernels
        if T > 0 and kernels.use_triton(self.backend, h):
            if T <= FUSED_MAX_TOKENS and len(spans) == 1:
                return self._forward_fused(h, attn_fn, (cos, sin), local)
            if cfg.mla is None:
                return self._forward_spans_fused(h, attn_fn, (cos, sin), local, spans)

        # MLA: attn_fn may take a long chunk in the expanded form (`StepAttention.mla`): the
        # queries then come in both forms, and its output is in the values' space
        expands = cfg.mla is not None and getattr(attn_fn, "mla_expands", False)

        def project(at, norm, hs, cs, sn):
            x, t = norm(hs), hs.shape[0]
            if cfg.mla is not None:
                return at.project(x, cs, sn, expanded=expands)
            q, k, v = at.qkv(x)
            q, k = q.reshape(t, hq, d), k.reshape(t, hkv, d)
            if at.qk_norm:
                q, k = at.q_norm(q), at.k_norm(k)
            return Rotary.apply(q, cs, sn), Rotary.apply(k, cs, sn), v.reshape(t, hkv, d)

        glob = (cos, sin)
        for li, layer in enumerate(self.model.layers):
            at = layer.self_attn
            cos, sin = local if self.layer_rotary[li] else glob
            qe = None
            if len(spans) == 1:  # decode / short extensions: no chunk buffers, no copies
                q, k, v, *qe = project(at, layer.input_layernorm, h, cos, sin)
                qe = qe[0] if qe else None
            else:
                q = torch.empty(T, hq, d, dtype=h.dtype, device=dev)
                k = torch.empty(T, hkv, d, dtype=h.dtype, device=dev)
                # MLA: the values are the keys (the latent), one tensor
                v = k if cfg.values_are_keys else torch.empty(T, hkv, d, dtype=h.dtype,
                                                              device=dev)
                if expands:
                    qe = torch.empty(T, hq, cfg.mla.qk_head_dim, dtype=h.dtype, device=dev)
                for a, b in spans:
                    qa, ka, va, *qea = project(at, layer.input_layernorm, h[a:b], cos[a:b],
                                               sin[a:b])
                    q[a:b], k[a:b] = qa, ka
                    if v is not k:
                        v[a:b] = va
                    if qea:
                        qe[a:b] = qea[0]
            if expands:     # (T, Hq, v_head_dim) in the values' space
                o, want = attn_fn.mla(li, q, k, qe, at), (T, hq, cfg.mla.v_head_dim)
                flat = True
            else:
                flat = getattr(attn_fn, "flat_batch", False)    # (T, Hq, D) in and out
                o = attn_fn(li, q, k, v) if flat else attn_fn(li, q[None], k[None], v[None])
                want = (T, hq, d) if flat else (1, T, hq, d)
            if tuple(o.shape) != want:
                raise ValueError(f"attn_fn returned shape {tuple(o.shape)}, expected {want}")
            if not flat:
                o = o[0]
            del q, k, v, qe
            for a, b in spans:
                layer.residual_updates(h[a:b], o[a:b], values=expands)
            del o
        for a, b in spans:
            h[a:b] = self.model.norm(h[a:b])
        return h

    def _forward_fused(self, h: torch.Tensor, attn_fn: AttnFn, glob, local) -> torch.Tensor:
        """`forward`'s layers for a few tokens in one span, with the fused kernels: each
        residual add goes into the launch of the norm after it, RoPE (with the q/k norm) and
        the KV store are one launch (when attn_fn offers `rope_store(layer, q, k, v, cos, sin,
        **norm)`, which stores k, v for the layer, so that its call does not), act(gate) * up
        one. The same math as the torch path, rounded at the same points (with the opt-in
        folds, RINGSERVE_FOLD_ROWS, a folded norm's normalized row is not rounded)."""
        from ringserve.kernels import gemv as gemv_mod
        from ringserve.kernels.fused import rms_norm_triton, rope_store_triton

        def norm(mod, x, residual=None, out=None):
            return rms_norm_triton(x, mod.weight, mod.eps, mod.plus_one, residual, out,
                                   check=False)

        def add_norm(mod, h, pend, out=None):
            """h += the pending sublayer output (normed first by its norm, Gemma), then
            mod(h): one launch."""
            if pend is None:
                return norm(mod, h, out=out)
            d, dn = pend
            return rms_norm_triton(h, mod.weight, mod.eps, mod.plus_one, d, out,
                                   None if dn is None else dn.weight,
                                   None if dn is None else dn.eps, check=False)

        cfg = self.config
        T = h.shape[0]
        hq, d = cfg.num_attention_heads, cfg.head_dim
        store = getattr(attn_fn, "rope_store", None)
        # MLA: latent_slots(layer) -> (the layer's flat cache slots, each row's slot); the
        # layer's store is then done
        latent_slots = getattr(attn_fn, "latent_slots", None)
        flat = getattr(attn_fn, "flat_batch", False)
        want = torch.Size((T, hq, d) if flat else (1, T, hq, d))
        expands = cfg.mla is not None and getattr(attn_fn, "mla_expands", False)
        want_values = torch.Size((T, hq, cfg.mla.v_head_dim)) if expands else None
        # the norms and residual adds inside the GEMVs' launches (opt-in, RINGSERVE_FOLD_ROWS:
        # kernels/gemv.py says why it is off by default)
        may_fold = T <= gemv_mod.FOLD_MAX_ROWS
        # the last sublayer's output, not yet added to h, and the norm it takes first (Gemma)
        pending = None
        for li, layer in enumerate(self.model.layers):
            at = layer.self_attn
            cos, sin = local if self.layer_rotary[li] else glob
            # folds: the input norm inside the q|k|v (MLA: q|kv_a) GEMV's launch where h is up
            # to date (the last MoE layer added into it) and the GEMV fits
            in_norm = layer.input_layernorm \
                if may_fold and pending is None and _folds_in(layer, h) else None
            x = h if in_norm is not None else add_norm(layer.input_layernorm, h, pending)
            qe = None
            if cfg.mla is not None:   # latent q and k (interleaved RoPE) in one launch, the
                # latent normed and stored into the cache by it when attn_fn offers its slots
                q, k, v, *qe = at.project(x, cos, sin, norm, fused=True, expanded=expands,
                                          kv_dst=latent_slots(li) if latent_slots else None,
                                          in_norm=in_norm)
                qe = qe[0] if qe else None
            else:
                q, k, v = at.qkv_heads(x, d, in_norm)   # views; the kernel copies v contiguous
                qk = ({"q_norm": at.q_norm.weight, "k_norm": at.k_norm.weight,
                       "eps": at.q_norm.eps, "plus_one": at.q_norm.plus_one}
                      if at.qk_norm else {})
                if store is not None:
                    q, k, v = store(li, q, k, v, cos, sin, **qk)
                else:
                    q, k, v = rope_store_triton(q, k, v, cos, sin, **qk)
            ffn = layer.ffn()
            # folds, a MoE layer: h += o_proj(o) inside the o_proj GEMV, then h +=
            # moe(norm(h)) with the norm inside the router's and experts' launches and the add
            # inside the down launch (`MoE.add_normed`): no norm launch, no add
            fold = may_fold and _folds_post(layer, h)
            res = h if fold else None
            if expands:     # MLA's expanded form: (T, Hq, v_head_dim) in the values' space
                o = attn_fn.mla(li, q, k, qe, at)
                if o.shape != want_values:
                    raise ValueError(f"attn_fn.mla returned shape {tuple(o.shape)}, expected "
                                     f"{tuple(want_values)}")
                del q, k, v, qe
                a = at.output(o, h.dtype, values=True, fused=True, residual=res)
            else:
                if flat:    # (T, H, D) in and out: no batch dimension made and dropped
                    o = attn_fn(li, q, k, v)
                else:
                    o = attn_fn(li, q[None], k[None], v[None])
                if o.shape != want:
                    raise ValueError(f"attn_fn returned shape {tuple(o.shape)}, expected "
                                     f"{tuple(want)}")
                del q, k, v, qe
                a = at.output(o if flat else o[0], h.dtype, fused=True, residual=res)
            if fold:
                ffn.add_normed(h, layer.post_attention_layernorm)
                pending = None
                continue
            if layer.sandwich:    # Gemma: h += norm(a); the MLP's input and output normed
                x = add_norm(layer.pre_feedforward_layernorm, h,
                             (a, layer.post_attention_layernorm))
                m = ffn(x, fused_act=True) if isinstance(ffn, MLP) else ffn(x)
                pending = (m, layer.post_feedforward_layernorm)
            else:
                x = add_norm(layer.post_attention_layernorm, h, (a, None))
                pending = (ffn(x, fused_act=True) if isinstance(ffn, MLP) else ffn(x), None)
        return add_norm(self.model.norm, h, pending, out=h)

    def _forward_spans_fused(self, h: torch.Tensor, attn_fn: AttnFn, glob, local,
                             spans) -> torch.Tensor:
        """`forward`'s layers for a long step (a prefill chunk) with the fused kernels, the
        norms, projections and MLP over `spans` of the rows (activation memory as the torch
        path's), the attention over all of them. Per span: the residual add goes into the
        norm after it, RoPE (with the q/k norm), the copy into the layer's q/k/v buffers and
        the K/V store are one launch (`attn_fn.rope_store_rows` where it offers it), act(gate)
        * up one. A span's MLP output is added by the next layer's input norm, which runs on
        that span right after it (its q/k/v then wait in the next layer's buffers). Session
        25: the torch path's ~8 elementwise launches a norm, ~8 for RoPE and the copies took
        ~1 s of a 128K prefill's 11.1 s on an H200. Rounds where the torch path rounds (the
        kernels' docstring in kernels/fused.py); not for MLA (its projection differs)."""
        from ringserve.kernels.fused import rms_norm_triton, rope_store_triton

        def add_norm(mod, x, pend, out=None):
            """x += the pending sublayer output (normed first by its norm, Gemma), then
            mod(x): one launch."""
            if pend is None:
                return rms_norm_triton(x, mod.weight, mod.eps, mod.plus_one, None, out,
                                       check=False)
            d, dn = pend
            return rms_norm_triton(x, mod.weight, mod.eps, mod.plus_one, d, out,
                                   None if dn is None else dn.weight,
                                   None if dn is None else dn.eps, check=False)

        cfg = self.config
        T = h.shape[0]
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        layers = self.model.layers
        L = len(layers)
        store = getattr(attn_fn, "rope_store_rows", None)
        flat = getattr(attn_fn, "flat_batch", False)
        want = torch.Size((T, hq, d) if flat else (1, T, hq, d))

        def buffers():
            kw = {"dtype": h.dtype, "device": h.device}
            return (torch.empty(T, hq, d, **kw), torch.empty(T, hkv, d, **kw),
                    torch.empty(T, hkv, d, **kw))

        def qkv_into(li: int, x: torch.Tensor, a: int, b: int, bufs) -> None:
            at = layers[li].self_attn
            cos, sin = local if self.layer_rotary[li] else glob
            q, k, v = at.qkv_heads(x, d)
            qk = ({"q_norm": at.q_norm.weight, "k_norm": at.k_norm.weight,
                   "eps": at.q_norm.eps, "plus_one": at.q_norm.plus_one}
                  if at.qk_norm else {})
            out = tuple(t[a:b] for t in bufs)
            if store is not None:
                store(li, slice(a, b), q, k, v, cos[a:b], sin[a:b], out, **qk)
            else:
                rope_store_triton(q, k, v, cos[a:b], sin[a:b], **qk, check=False, out=out)

        bufs = buffers()
        for a, b in spans:
            qkv_into(0, add_norm(layers[0].input_layernorm, h[a:b], None), a, b, bufs)
        pending = [None] * len(spans)
        for li, layer in enumerate(layers):
            q, k, v = bufs
            o = attn_fn(li, q, k, v) if flat else attn_fn(li, q[None], k[None], v[None])
            if o.shape != want:
                raise ValueError(f"attn_fn returned shape {tuple(o.shape)}, expected "
                                 f"{tuple(want)}")
            if not flat:
                o = o[0]
            del q, k, v
            bufs = buffers() if li + 1 < L else None
            ffn = layer.ffn()
            for j, (a, b) in enumerate(spans):
                hs = h[a:b]
                out = layer.self_attn.output(o[a:b], h.dtype)
                if layer.sandwich:    # Gemma: h += norm(a); the MLP's input and output normed
                    x = add_norm(layer.pre_feedforward_layernorm, hs,
                                 (out, layer.post_attention_layernorm))
                    dn = layer.post_feedforward_layernorm
                else:
                    x = add_norm(layer.post_attention_layernorm, hs, (out, None))
                    dn = None
                del out
                pend = (ffn(x, fused_act=True) if isinstance(ffn, MLP) else ffn(x), dn)
                del x
                if li + 1 < L:
                    qkv_into(li + 1, add_norm(layers[li + 1].input_layernorm, hs, pend), a, b,
                             bufs)
                else:
                    pending[j] = pend
            del o
        for j, (a, b) in enumerate(spans):
            add_norm(self.model.norm, h[a:b], pending[j], out=h[a:b])
        return h

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (T, hidden) -> (T, vocab) float32 (Gemma: soft-capped, c * tanh(l / c))."""
        out = self.lm_head(hidden.to(self.dtype)).float()
        cap = self.config.final_logit_softcap
        return out if cap is None else torch.tanh(out / cap) * cap


def _folds_in(layer: DecoderLayer, h: torch.Tensor) -> bool:
    """Whether a fused step takes layer's input norm into its q|k|v GEMV (`gemv`'s norm=): a
    Llama-style norm (not Gemma's sandwich or (1 + w)), one GEMM over x, `gemv.folds`."""
    if layer.sandwich or layer.input_layernorm.plus_one:
        return False
    from ringserve.kernels.gemv import folds
    lin = layer.self_attn.x_linear()
    return lin is not None and folds(h, lin[0])


def _folds_post(layer: DecoderLayer, h: torch.Tensor) -> bool:
    """Whether a fused step takes layer's o_proj residual add and its MoE's norm and add
    into their launches (`_project_out`'s residual, `MoE.add_normed`): a MoE layer with a
    Llama-style norm whose router, experts and o_proj take them (`gemv.folds`)."""
    ffn = layer.ffn()
    if layer.sandwich or not isinstance(ffn, MoE):
        return False
    from ringserve.kernels.gemv import folds
    o = layer.self_attn.o_proj
    return type(o) is nn.Linear and folds(h, o.weight) \
        and ffn.can_add_normed(h, layer.post_attention_layernorm)


def layer_window(window_size, layer: int) -> Optional[int]:
    """The window of one layer from a model's `window_size` (an int, None, or one per layer)."""
    return window_size[layer] if isinstance(window_size, (tuple, list)) else window_size


def local_attention_fn(causal: bool = True, window_size=None, backend: str = "auto",
                       softmax_scale: Optional[float] = None,
                       softcap: Optional[float] = None) -> AttnFn:
    """Single-process attention over exactly the tokens passed in (no KV cache, no ring).

    Only position differences matter to the mask, so local offsets 0..T-1 serve any contiguous
    run of global positions. Pass the model's `window_size` (None or W - 1, or one per layer),
    `softmax_scale` and `softcap` (or use `model_attention_fn`).
    """
    from ringserve.kernels import attention

    def fn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, _ = attention(q, k, v, softmax_scale=softmax_scale, causal=causal,
                           window_size=layer_window(window_size, layer_idx), backend=backend,
                           softcap=softcap)
        return out

    return fn


def model_attention_fn(model: "CausalLM", backend: str = "auto") -> AttnFn:
    """`local_attention_fn` with everything the model's attention applies (window per layer,
    scale, soft-cap)."""
    return local_attention_fn(True, model.window_size, backend, model.softmax_scale,
                              model.softcap)
