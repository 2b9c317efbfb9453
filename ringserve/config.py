"""Model configuration parsed from a HuggingFace `config.json`.

Families: Llama, Mistral, Qwen2, Qwen3 (q/k RMSNorm), Phi-3 (fused projections, longrope),
Mixtral and Qwen3-MoE (mixture-of-experts MLP), Gemma 2 and Gemma 3 text (sliding-window layers
between global ones, soft-capping, GeGLU, (1 + w) norms around both sublayers, scaled embeddings;
Gemma 3: q/k norm and a RoPE base per layer type), DeepSeek-V2 (multi-head latent attention,
a mixture of experts with shared experts and group-limited routing, YaRN with mscale). Anything a family needs that the model does not
implement is refused here, by name, rather than computed differently from `transformers`.

Two spellings of the RoPE settings exist in the wild: transformers 4.x writes `rope_theta` plus an
optional `rope_scaling` dict ({"rope_type" or "type", "factor", ...}); transformers 5 writes one
`rope_parameters` dict ({"rope_type", "rope_theta", ...}). Both are read into `RopeConfig`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

# architecture name (config.json "architectures") -> model_type
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma3ForConditionalGeneration": "gemma3_text",   # its text model; images not supported
    "DeepseekV2ForCausalLM": "deepseek_v2",
}
GEMMA = ("gemma2", "gemma3_text")
LAYER_TYPES = ("sliding_attention", "full_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# transformers' Gemma3TextConfig defaults, for the text_config of multimodal Gemma 3 checkpoints
# (whose config.json states only what differs)
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                            num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=256)   # SwiGLU, GeGLU (tanh approximation)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass
class RopeConfig:
    """Rotary embedding settings; `rope_type` picks how the inverse frequencies are scaled."""
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: Optional[int] = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None
    truncate: bool = True
    # DeepSeek's yarn: cos/sin scaled by mscale(factor, mscale) / mscale(factor, mscale_all_dim)
    # (1 when equal), and the softmax scale by mscale(factor, mscale_all_dim) ** 2 (the model)
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    # longrope (Phi-3): per-frequency divisors, the long set used when the sequence is longer
    # than original_max_position_embeddings
    short_factor: Optional[Tuple[float, ...]] = None
    long_factor: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        if self.theta <= 0:
            raise ValueError(f"rope theta ({self.theta}) must be positive")
        if self.rope_type == "dynamic":
            # dynamic NTK rescales by the current sequence length, which no single shard of a
            # sequence-parallel prefill knows; refusing beats silently differing from HF.
            raise ValueError("rope_type 'dynamic' is not supported (it depends on the running "
                             f"sequence length); supported rope types: {', '.join(ROPE_TYPES)}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported rope "
                             f"types: {', '.join(ROPE_TYPES)}")
        if self.rope_type != "default" and self.factor <= 0:
            raise ValueError(f"rope scaling factor ({self.factor}) must be positive")
        if self.rope_type == "longrope" and not (self.short_factor and self.long_factor):
            raise ValueError("longrope needs short_factor and long_factor lists")
        if (self.rope_type in ("llama3", "yarn", "longrope")
                and not self.original_max_position_embeddings):
            raise ValueError(f"rope_type {self.rope_type!r} needs original_max_position_embeddings "
                             f"(got {self.original_max_position_embeddings})")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"llama3 rope: high_freq_factor ({self.high_freq_factor}) must exceed "
                             f"low_freq_factor ({self.low_freq_factor})")

    @classmethod
    def from_hf(cls, d: Dict[str, Any]) -> "RopeConfig":
        """Read either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
        params = d.get("rope_parameters")
        if isinstance(params, dict) and params and not ("rope_type" in params or
                                                        "rope_theta" in params or "type" in params):
            raise ValueError("per-layer-type rope_parameters are not supported for "
                             f"{d.get('model_type')!r} (got keys {sorted(params)})")
        scaling = dict(params) if isinstance(params, dict) else dict(d.get("rope_scaling") or {})
        theta = scaling.pop("rope_theta", None)
        if theta is None:
            theta = d.get("rope_theta", 10000.0)
        rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        if rope_type == "su":  # Phi-3's early name for longrope, renamed by transformers too
            rope_type = "longrope"
        kw: Dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
        for name in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            if scaling.get(name) is not None:
                kw[name] = float(scaling[name])
        if scaling.get("attention_factor") is not None:
            kw["attention_factor"] = float(scaling["attention_factor"])
        if scaling.get("truncate") is not None:
            kw["truncate"] = bool(scaling["truncate"])
        ompe = scaling.get("original_max_position_embeddings")
        if rope_type == "longrope":
            # Phi-3 states the pretraining length at the top level, and no factor: transformers
            # then takes max / original positions as the factor (for the attention scaling)
            ompe = ompe or d.get("original_max_position_embeddings")
            kw["short_factor"] = tuple(float(x) for x in scaling.get("short_factor") or ())
            kw["long_factor"] = tuple(float(x) for x in scaling.get("long_factor") or ())
            if scaling.get("factor") is None and ompe:
                kw["factor"] = float(d.get("max_position_embeddings") or ompe) / float(ompe)
        if rope_type == "yarn" and ompe is None:
            ompe = d.get("max_position_embeddings")
        if ompe is not None:
            kw["original_max_position_embeddings"] = int(ompe)
        if scaling.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor "
                             f"({scaling['partial_rotary_factor']}) != 1 is not supported")
        if scaling.get("mscale") or scaling.get("mscale_all_dim"):
            if rope_type != "yarn":
                raise ValueError(f"mscale / mscale_all_dim with rope_type {rope_type!r} is not "
                                 "supported (only with yarn)")
            if d.get("model_type") != "deepseek_v2":
                # transformers scales the softmax by mscale_all_dim only in DeepSeek's model
                raise ValueError("yarn rope with mscale / mscale_all_dim is supported for "
                                 f"deepseek_v2 only, not {d.get('model_type')!r}")
            kw["mscale"] = float(scaling.get("mscale") or 0.0)
            kw["mscale_all_dim"] = float(scaling.get("mscale_all_dim") or 0.0)
        return cls(**kw)


@dataclass
class MoeConfig:
    """A mixture-of-experts MLP: a linear router, softmax, the top-k experts (SwiGLU each)."""
    num_experts: int
    top_k: int
    intermediate_size: int
    renormalize: bool              # top-k probabilities rescaled to sum to one (Mixtral: always)
    dense_layers: Tuple[int, ...] = ()   # layers that keep a dense MLP (Qwen3-MoE)
    # DeepSeek-V2: the router in float32; the top-k chosen within the topk_group best of
    # n_group expert groups (a group scores its best expert); weights times routed_scale;
    # shared experts (one SwiGLU of shared_intermediate) added to every token
    n_group: int = 1
    topk_group: int = 1
    routed_scale: float = 1.0
    shared_intermediate: int = 0
    router_fp32: bool = False

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) must be in 1..num_experts "
                             f"({self.num_experts})")
        if self.intermediate_size <= 0:
            raise ValueError(f"expert intermediate size ({self.intermediate_size}) must be "
                             "positive")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"n_group ({self.n_group}) must divide num_experts "
                             f"({self.num_experts}) and topk_group ({self.topk_group}) be in "
                             f"1..n_group")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"num_experts_per_tok ({self.top_k}) exceeds the experts of "
                             f"topk_group ({self.topk_group}) groups")

    @classmethod
    def from_hf(cls, d: Dict[str, Any], model_type: str) -> "MoeConfig":
        n_layers = int(d["num_hidden_layers"])
        # transformers 5 writes num_local_experts for Qwen3-MoE too; hub configs say num_experts
        n_exp = int(d.get("num_local_experts") or d.get("num_experts") or 0)
        if model_type == "mixtral":
            return cls(n_exp, int(d.get("num_experts_per_tok", 2)), int(d["intermediate_size"]),
                       renormalize=True)
        if model_type == "deepseek_v2":
            # the released configs say softmax and 1 (transformers reads neither; DeepSeek's
            # own code would route otherwise): refused rather than computed differently
            if (d.get("scoring_func") or "softmax") != "softmax":
                raise ValueError(f"scoring_func {d['scoring_func']!r} is not supported (only "
                                 "'softmax')")
            if int(d.get("moe_layer_freq") or 1) != 1:
                raise ValueError(f"moe_layer_freq ({d['moe_layer_freq']}) != 1 is not supported")
            method = d.get("topk_method") or "greedy"
            if method not in ("greedy", "group_limited_greedy"):
                raise ValueError(f"topk_method {method!r} is not supported (supported: greedy, "
                                 "group_limited_greedy)")
            groups = method == "group_limited_greedy"
            inter = int(d["moe_intermediate_size"])
            return cls(int(d["n_routed_experts"]), int(d["num_experts_per_tok"]), inter,
                       renormalize=False,   # transformers' V2 router never renormalizes
                       dense_layers=tuple(range(min(n_layers,
                                                    int(d.get("first_k_dense_replace") or 0)))),
                       n_group=int(d.get("n_group") or 1) if groups else 1,
                       topk_group=int(d.get("topk_group") or 1) if groups else 1,
                       routed_scale=float(d.get("routed_scaling_factor") or 1.0),
                       shared_intermediate=inter * int(d.get("n_shared_experts") or 0),
                       router_fp32=True)
        step = int(d.get("decoder_sparse_step", 1) or 1)
        only = set(int(i) for i in d.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(n_layers) if i in only or (i + 1) % step)
        return cls(n_exp, int(d.get("num_experts_per_tok", 8)),
                   int(d.get("moe_intermediate_size") or d["intermediate_size"]),
                   renormalize=bool(d.get("norm_topk_prob", False)), dense_layers=dense)


@dataclass
class MlaConfig:
    """Multi-head latent attention (DeepSeek-V2): K and V of every head are made from one
    per-token latent c (kv_lora_rank) plus one RoPE key shared by the heads (qk_rope_head_dim);
    the cache holds those, latent_dim values per token and layer."""
    q_lora_rank: Optional[int]
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be positive")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even")

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class ModelConfig:
    """The settings the model, the weight loader and the engine need; see `from_hf_dict`."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False           # Qwen2; Llama's attention_bias
    o_bias: bool = False             # Llama's attention_bias also biases o_proj
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: Optional[int] = None   # HF's W: a query sees itself and the W-1 keys before it
    hidden_act: str = "silu"
    torch_dtype: Optional[str] = None      # the checkpoint's dtype as config.json states it
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list]] = None
    qk_norm: bool = False                  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    fused_projections: bool = False        # Phi-3: one qkv_proj and one gate_up_proj
    moe: Optional[MoeConfig] = None        # Mixtral, Qwen3-MoE
    # Gemma 2/3: which layers are windowed ("sliding_attention") and which see everything
    # ("full_attention"); None: every layer alike (sliding_window or not)
    layer_types: Optional[Tuple[str, ...]] = None
    attn_logit_softcap: Optional[float] = None    # Gemma 2: scores c * tanh(s / c)
    final_logit_softcap: Optional[float] = None   # Gemma 2/3: logits c * tanh(l / c)
    query_pre_attn_scalar: Optional[float] = None  # softmax scale = this ** -0.5 (Gemma)
    embed_scale: Optional[float] = None           # embeddings times this (Gemma: sqrt(hidden))
    gemma_norms: bool = False   # RMSNorm weight (1 + w) in float32; norms after attention and MLP
    local_rope: Optional[RopeConfig] = None       # Gemma 3: the sliding layers' own RoPE
    # DeepSeek-V2: attention over the latent. The kernels then see MQA: num_key_value_heads 1,
    # head_dim mla.latent_dim, the values the first kv_lora_rank columns of the keys
    mla: Optional[MlaConfig] = None
    # the model's tensors sit under this prefix in the checkpoint, and tensors under these
    # prefixes belong to parts not served (Gemma 3's multimodal checkpoints: the vision tower)
    checkpoint_prefix: str = ""
    checkpoint_ignore: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window ({self.sliding_window}) must be >= 1 or None")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps ({self.rms_norm_eps}) must be positive")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (supported: "
                             f"{', '.join(ACTIVATIONS)})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries, "
                                 f"num_hidden_layers is {self.num_hidden_layers}")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer type(s) {', '.join(map(repr, bad))} not supported "
                                 f"(supported: {', '.join(LAYER_TYPES)})")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            val = getattr(self, name)
            if val is not None and not val > 0:
                raise ValueError(f"{name} ({val}) must be positive or None")

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def layer_window_sizes(self) -> Tuple[Optional[int], ...]:
        """The kernels' window_size of every layer (flash_attn's left window: HF sliding_window
        W -> W - 1; None: global)."""
        w = None if self.sliding_window is None else self.sliding_window - 1
        if self.layer_types is None:
            return (w,) * self.num_hidden_layers
        return tuple(w if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def window_size(self):
        """The kernels' window_size: one int or None when every layer has the same, else the
        tuple of `layer_window_sizes` (Gemma: windowed layers between global ones)."""
        ws = self.layer_window_sizes
        return ws[0] if len(set(ws)) == 1 else ws

    @property
    def softmax_scale(self) -> float:
        if self.mla is not None:   # the per-head q.k of the expanded form, yarn's mscale squared
            r = self.rope
            m = 1.0
            if r.rope_type != "default" and r.mscale_all_dim and r.factor > 1:
                m = 0.1 * r.mscale_all_dim * math.log(r.factor) + 1.0
            return self.mla.qk_head_dim ** -0.5 * m * m
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None
                else self.head_dim) ** -0.5

    @property
    def values_are_keys(self) -> bool:
        """The cache's values are the first columns of its keys (MLA's latent): one tensor."""
        return self.mla is not None

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and archs:
            raise ValueError(f"unsupported architecture {archs[0]!r}; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if arch is None:  # a config saved on its own has no "architectures": use model_type
            by_type: Dict[str, str] = {}
            for k, v in SUPPORTED_ARCHITECTURES.items():   # the first (the *ForCausalLM) wins
                by_type.setdefault(v, k)
            if d.get("model_type") not in by_type:
                raise ValueError(f"unsupported model_type {d.get('model_type')!r} (no "
                                 "'architectures' in config.json); supported architectures: "
                                 f"{', '.join(SUPPORTED_ARCHITECTURES)}")
            arch = by_type[d["model_type"]]
        model_type = SUPPORTED_ARCHITECTURES[arch]
        if arch == "Gemma3ForConditionalGeneration":   # serve its text model (text prompts)
            text = dict(GEMMA3_TEXT_DEFAULTS, **(d.get("text_config") or {}))
            for k in ("torch_dtype", "dtype", "tie_word_embeddings"):
                if k in d and k not in text:
                    text[k] = d[k]
            cfg = cls._from_gemma(text, arch, model_type)
            # transformers' multimodal head applies no final soft-cap (Gemma 3 says null anyway)
            cfg.final_logit_softcap = None
            cfg.checkpoint_prefix = "language_model."
            cfg.checkpoint_ignore = ("vision_tower.", "multi_modal_projector.")
            return cfg
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")
        if model_type in GEMMA:
            return cls._from_gemma(d, arch, model_type)
        if model_type == "deepseek_v2":
            return cls._from_deepseek(d, arch)
        heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        kv_heads = d.get("num_key_value_heads") or heads

        sliding = None
        if model_type == "mistral":
            sliding = d.get("sliding_window")
        elif model_type in ("mixtral", "phi3"):
            sliding = d.get("sliding_window")
        elif model_type in ("qwen2", "qwen3", "qwen3_moe") and d.get("use_sliding_window"):
            # Qwen2/3 window only layers >= max_window_layers; one window for all layers is what
            # the engine supports, so accept the two uniform cases and refuse a mix.
            n_layers, mwl = int(d["num_hidden_layers"]), int(d.get("max_window_layers", 0))
            if mwl <= 0:
                sliding = d.get("sliding_window")
            elif mwl < n_layers:
                raise ValueError(f"{model_type} with use_sliding_window and max_window_layers ({mwl}) < "
                                 f"num_hidden_layers ({n_layers}) mixes windowed and full layers; "
                                 "not supported")
        if model_type in ("llama", "qwen3", "qwen3_moe"):
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        elif model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = False
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(d.get("max_position_embeddings") or 4096),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(d),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding is not None else None,
            hidden_act=d.get("hidden_act", "silu"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            fused_projections=model_type == "phi3",
            moe=MoeConfig.from_hf(d, model_type) if model_type in ("mixtral", "qwen3_moe") else None,
        )

    @classmethod
    def _from_gemma(cls, d: Dict[str, Any], arch: str, model_type: str) -> "ModelConfig":
        """Gemma 2 / Gemma 3 (text). Defaults are transformers' Gemma2Config / Gemma3TextConfig
        ones, for configs that leave keys out."""
        gemma3 = model_type == "gemma3_text"
        n_layers = int(d["num_hidden_layers"])
        if d.get("use_bidirectional_attention"):
            raise ValueError(f"{model_type} with use_bidirectional_attention is not supported "
                             "(a causal language model only)")
        types = d.get("layer_types")
        if types is None:   # older configs: a pattern (Gemma 2 alternates, Gemma 3 every 6th)
            every = int(d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
                        if gemma3 else 2)
            types = ["sliding_attention" if (i + 1) % every else "full_attention"
                     for i in range(n_layers)]
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        params = d.get("rope_parameters")
        base = {"model_type": model_type, "max_position_embeddings": d.get("max_position_embeddings")}
        local_rope = None
        if gemma3 and isinstance(params, dict) and "full_attention" in params:
            rope = RopeConfig.from_hf(dict(base, rope_parameters=params["full_attention"]))
            local_rope = RopeConfig.from_hf(dict(base, rope_parameters=params.get(
                "sliding_attention") or {"rope_type": "default", "rope_theta": 10000.0}))
        elif gemma3:   # transformers 4: rope_theta (+ rope_scaling) global, rope_local_base_freq
            rope = RopeConfig.from_hf(dict(d, rope_theta=d.get("rope_theta", 1_000_000.0)))
            local_rope = RopeConfig(theta=float(d.get("rope_local_base_freq", 10000.0)))
        else:
            rope = RopeConfig.from_hf(d)
        soft = d.get("attn_logit_softcapping", None if gemma3 else 50.0)
        final = d.get("final_logit_softcapping", None if gemma3 else 30.0)
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or 256),
            max_position_embeddings=int(d.get("max_position_embeddings")
                                        or (131072 if gemma3 else 8192)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=rope,
            qkv_bias=bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            sliding_window=(int(d.get("sliding_window", 4096))
                            if d.get("sliding_window", 4096) is not None else None),
            hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            qk_norm=gemma3,
            layer_types=tuple(types),
            # transformers' Gemma 3 attention never passes its attn_logit_softcapping on (the
            # released configs say null): the scores are not capped there, so not here either
            attn_logit_softcap=None if gemma3 or soft is None else float(soft),
            final_logit_softcap=None if final is None else float(final),
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            embed_scale=hidden ** 0.5,
            gemma_norms=True,
            local_rope=local_rope,
        )

    @classmethod
    def _from_deepseek(cls, d: Dict[str, Any], arch: str) -> "ModelConfig":
        """DeepSeek-V2 / V2-Lite. Defaults are transformers' DeepseekV2Config ones."""
        mla = MlaConfig(
            q_lora_rank=int(d["q_lora_rank"]) if d.get("q_lora_rank") else None,
            kv_lora_rank=int(d.get("kv_lora_rank", 512)),
            qk_nope_head_dim=int(d.get("qk_nope_head_dim", 128)),
            qk_rope_head_dim=int(d.get("qk_rope_head_dim", 64)),
            v_head_dim=int(d.get("v_head_dim", 128)))
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"pretraining_tp ({d['pretraining_tp']}) != 1 is not supported")
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=1,
            head_dim=mla.latent_dim,
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(d),
            qkv_bias=bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            hidden_act=d.get("hidden_act", "silu"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            moe=MoeConfig.from_hf(d, "deepseek_v2"),
            mla=mla,
        )

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "ModelConfig":
        from .gguf import is_gguf, load_gguf_config
        if is_gguf(path):  # a .gguf file: the config comes from its metadata
            return load_gguf_config(path)
        p = Path(path) / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no config.json in model directory {Path(path)}")
        with open(p) as f:
            return cls.from_hf_dict(json.load(f))
