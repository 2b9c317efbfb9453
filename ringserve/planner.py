"""`ringserve plan`: which (tensor parallel t, context parallel c) splits of N GPUs serve a model,
with the weights per GPU, the KV tokens that fit and the predicted prefill time of each.

Weights per GPU are counted exactly: the model is built on the meta device and split by
`ringserve.parallel.tp.apply_tp`, as a worker does (replicated KV heads, padded vocabulary and
all). The KV capacity follows the worker's own rule (`ringserve.actors.model_worker`): free
memory after the weights and the CUDA context, minus a fixed reserve (3 GiB + the MLP's
intermediate of one activation chunk), divided by a token's KV bytes plus its activation
estimate, in whole pages; the group holds c times one shard's tokens (a shard's t GPUs hold the
same tokens, each its own heads).

The prefill time is a model fitted to measurements, shown with its formula:

    T(S) = F(S) / (N * peak * u * e) + T_tp(S)
    F(S) = 2 * P * S + 2 * d * sum over layers and heads of the causal (or windowed) pairs
    T_tp(S) = 2 * L * (S / c) * hidden * bytes * 2 (t - 1) / t / B_tp

P: parameters a token multiplies (no embedding or head), d: head_dim; u: prefill MFU measured on
one H200 for the Llama-3-8B shape (0.53 at 128K-512K: 12.3 s at 128K, 150.4 s at 512K);
e: context-parallel efficiency, measured 0.97 at c = 2 (2x H200, 128K) and assumed for larger c;
T_tp: the two all-reduces per layer (after attention, after the MLP) of a TP group over its
shard's tokens, ring all-reduce cost at bus bandwidth B_tp, assumed not overlapped with compute
(B_tp default 300 GB/s: NCCL point-to-point between two H200s measured ~300 GB/s at 256 MiB; an
all-reduce at that bus bandwidth is an assumption). Not measured: MFU of the narrower per-GPU
GEMMs under TP, ring efficiency past c = 2, all-reduce bandwidth in a TP group.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

GiB = 1 << 30

# the released configs' shapes (config.json of each model)
_LLAMA31 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
                head_dim=128, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=131072,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
PRESETS = {
    "llama-3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32),
    "llama-3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64),
    "llama-3.1-405b": dict(_LLAMA31, hidden_size=16384, intermediate_size=53248,
                           num_hidden_layers=126, num_attention_heads=128),
}
# memory as the driver reports it (nvidia-smi / torch.cuda.mem_get_info total)
GPUS = {"h100": 81559 << 20, "h200": 143771 << 20}

MEASURED_MFU = 0.53          # 8B shape, one H200, prefill 128K-512K (docs/benchmarks.md)
MEASURED_CP_EFFICIENCY = 0.97  # 2x H200, 128K: 51.4% MFU against 53% on one
PEAK_TFLOPS = 989.0          # H100/H200 SXM dense bf16
TP_BANDWIDTH = 300e9         # bytes/s; NCCL send/recv between two H200s measured ~300 GB/s
CONTEXT_BYTES = int(1.33 * GiB)  # CUDA context and workspaces; fitted: 588,864 tokens on one H200 (8B)


def parse_bytes(text: str) -> int:
    """'141GB' (10^9), '140GiB', '143771MiB', 'h200', or a plain number of bytes."""
    s = str(text).strip().lower()
    if s in GPUS:
        return GPUS[s]
    m = re.fullmatch(r"([0-9.]+)\s*([kmgt]i?b?|b)?", s)
    if not m:
        raise ValueError(f"memory size {text!r}: say e.g. 141GB, 140GiB, 143771MiB or "
                         f"{', '.join(GPUS)}")
    unit = (m.group(2) or "b").rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def load_config(model: str):
    """A preset name, a checkpoint directory, a config.json or a .gguf file -> ModelConfig."""
    from ringserve.config import ModelConfig

    if model in PRESETS:
        return ModelConfig.from_hf_dict(PRESETS[model])
    p = Path(model)
    if p.is_file() and p.suffix == ".json":
        return ModelConfig.from_hf_dict(json.loads(p.read_text()))
    if p.exists():
        return ModelConfig.from_dir(p)
    raise ValueError(f"--model {model!r}: not a preset ({', '.join(PRESETS)}), a checkpoint "
                     f"directory, a config.json or a .gguf file")


def weight_bytes_per_gpu(cfg, t: int, dtype) -> int:
    """Bytes of one TP rank's parameters (rank 0; every rank holds as much), built on meta."""
    import torch

    from ringserve.model import CausalLM
    from ringserve.parallel.tp import TPComm, apply_tp

    model = CausalLM(cfg, dtype=dtype, device="meta")
    apply_tp(model, 0, t, TPComm())
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * elem


def prefill_flops(cfg, n: int) -> float:
    """F(S): 2 * P * S for the layers (P without embedding and head: the head runs on the last
    token only) + attention's QK^T and PV over the causal pairs (windowed layers: n*w - w^2/2)."""
    d, hq, L = cfg.head_dim, cfg.num_attention_heads, cfg.num_hidden_layers
    p = layer_params(cfg)
    windows = getattr(cfg, "layer_window_sizes", None) or (cfg.window_size,) * L
    attn = 0.0
    for w in windows:
        w = n if w is None else min(n, w + 1)
        attn += n * w - w * w / 2.0
    return 2.0 * p * n + 4.0 * d * hq * attn


def layer_params(cfg) -> int:
    """Parameters a token multiplies in the layers (MoE: the router and top-k experts)."""
    h, d, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    attn = h * d * (2 * hq + 2 * hkv)
    if cfg.moe is None:
        mlp = 3 * h * cfg.intermediate_size
        return cfg.num_hidden_layers * (attn + mlp)
    dense = 3 * h * cfg.intermediate_size
    sparse = h * cfg.moe.num_experts + 3 * h * cfg.moe.intermediate_size * cfg.moe.top_k
    n_dense = len(cfg.moe.dense_layers)
    return cfg.num_hidden_layers * attn + n_dense * dense + (cfg.num_hidden_layers - n_dense) * sparse


@dataclass
class Row:
    t: int
    c: int
    weights_gib: float
    kv_bytes_per_token: int       # on one GPU (its heads)
    kv_tokens: int                # the group's capacity; 0: the weights do not fit
    prefill_s: List[Optional[float]]


def plan(cfg, gpus: int, gpu_memory: int, lengths: Sequence[int] = (131072, 1048576),
         gpus_per_node: int = 8, dtype=None, page_size: int = 64, chunk_tokens: int = 8192,
         mfu: float = MEASURED_MFU, cp_efficiency: float = MEASURED_CP_EFFICIENCY,
         peak_tflops: float = PEAK_TFLOPS, tp_bandwidth: float = TP_BANDWIDTH,
         context_bytes: int = CONTEXT_BYTES) -> List[Row]:
    """Every (t, c) with t * c = gpus, t within a node and accepted by the model's shape."""
    import torch

    from ringserve.actors.model_worker import activation_bytes_per_token, fixed_reserve_bytes
    from ringserve.kv_cache import bytes_per_token, pages_for_budget
    from ringserve.parallel.tp import check_tp, local_config

    dtype = dtype or torch.bfloat16
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for t in range(1, min(gpus, gpus_per_node) + 1):
        if gpus % t:
            continue
        try:
            check_tp(cfg, t)
        except ValueError:
            continue
        c = gpus // t
        local = local_config(cfg, t) if t > 1 else cfg
        w = weight_bytes_per_gpu(cfg, t, dtype)
        per_tok = bytes_per_token(cfg.num_hidden_layers, local.num_key_value_heads,
                                  cfg.head_dim, dtype, cfg.values_are_keys)
        act = activation_bytes_per_token(local, elem)
        fixed = fixed_reserve_bytes(local, chunk_tokens, elem)
        free = gpu_memory - context_bytes - w - fixed
        pages = pages_for_budget(max(0, free), page_size, per_tok + act)
        tokens = c * pages * page_size
        times: List[Optional[float]] = []
        for n in lengths:
            if n > tokens:
                times.append(None)
                continue
            e = cp_efficiency if c > 1 else 1.0
            compute = prefill_flops(cfg, n) / (gpus * peak_tflops * 1e12 * mfu * e)
            tp = (2 * cfg.num_hidden_layers * (n / c) * cfg.hidden_size * elem
                  * 2 * (t - 1) / t / tp_bandwidth)
            times.append(compute + tp)
        rows.append(Row(t, c, w / GiB, per_tok, tokens, times))
    return rows


def _fmt_tokens(n: int) -> str:
    return f"{n:,}" if n else "weights do not fit"


def format_plan(name: str, cfg, gpus: int, gpu_memory: int, rows: List[Row],
                lengths: Sequence[int], mfu: float, cp_efficiency: float, peak_tflops: float,
                tp_bandwidth: float) -> str:
    out = [f"ringserve plan: {name} ({cfg.architecture}, {cfg.num_hidden_layers} layers, "
           f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads), {gpus} GPUs "
           f"of {gpu_memory / GiB:.1f} GiB, bf16", ""]
    heads = (["t (TP)", "c (CP)", "weights/GPU", "KV B/token/GPU", "KV tokens (group)"]
             + [f"prefill {n // 1024}K s" if n < 1 << 20 else f"prefill {n / (1 << 20):g}M s"
                for n in lengths])
    table = [heads]
    for r in rows:
        table.append([str(r.t), str(r.c), f"{r.weights_gib:.1f} GiB", f"{r.kv_bytes_per_token:,}",
                      _fmt_tokens(r.kv_tokens)]
                     + ["-" if s is None else f"{s:.1f}" for s in r.prefill_s])
    widths = [max(len(row[i]) for row in table) for i in range(len(heads))]
    for i, row in enumerate(table):
        out.append(" | ".join(x.rjust(w) for x, w in zip(row, widths)))
        if i == 0:
            out.append("-|-".join("-" * w for w in widths))
    if not rows:
        out.append("(no tensor-parallel size up to the GPUs per node fits the model's heads)")
    out += ["", "prefill T(S) = F(S) / (N * peak * u * e) + T_tp(S)",
            "  F(S) = 2 * P * S + 4 * d * Hq * sum over layers of the causal pairs (S^2 / 2, "
            "or S*w - w^2/2 windowed)",
            "  T_tp(S) = 2 * L * (S / c) * hidden * 2 bytes * 2 (t - 1) / t / B_tp "
            "(two all-reduces per layer, not overlapped)",
            f"  P = {layer_params(cfg) / 1e9:.2f}e9, peak = {peak_tflops:g} TFLOP/s, u = {mfu:g} "
            f"(measured prefill MFU, 8B shape, one H200), e = {cp_efficiency:g} for c > 1 "
            f"(measured at c = 2), B_tp = {tp_bandwidth / 1e9:g} GB/s (assumed)",
            "  '-': the length does not fit the group's KV capacity."]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="ringserve plan",
        description="For N GPUs, every (tensor parallel t, context parallel c) split that "
                    "serves the model: weights per GPU, KV tokens that fit, predicted prefill "
                    "time (the formula is printed).")
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(PRESETS)}), a checkpoint directory, a "
                        f"config.json or a .gguf file")
    p.add_argument("--gpus", type=int, required=True, help="GPUs for one model replica")
    p.add_argument("--gpu-memory", default="h200",
                   help="per GPU: 141GB (10^9 bytes), 140GiB, 143771MiB, or h100 / h200 "
                        "(what the driver reports: 81559 / 143771 MiB). Default h200")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="a TP group stays inside one node (NVLink): t <= this (default 8)")
    p.add_argument("--lengths", default="131072,1048576",
                   help="prompt lengths for the prefill prediction (default 128K, 1M)")
    p.add_argument("--chunk-tokens", type=int, default=8192,
                   help="the workers' activation chunk (LLM chunk_tokens; default 8192)")
    p.add_argument("--mfu", type=float, default=MEASURED_MFU)
    p.add_argument("--cp-efficiency", type=float, default=MEASURED_CP_EFFICIENCY)
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    p.add_argument("--tp-bandwidth", default="300GB",
                   help="all-reduce bus bandwidth of a TP group per second (default 300GB)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.model)
        mem = parse_bytes(a.gpu_memory)
        bw = float(parse_bytes(a.tp_bandwidth))
        lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
        if a.gpus < 1 or a.gpus_per_node < 1:
            raise ValueError(f"--gpus ({a.gpus}) and --gpus-per-node ({a.gpus_per_node}) must "
                             f"be >= 1")
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    rows = plan(cfg, a.gpus, mem, lengths, a.gpus_per_node, chunk_tokens=a.chunk_tokens,
                mfu=a.mfu, cp_efficiency=a.cp_efficiency, peak_tflops=a.peak_tflops,
                tp_bandwidth=bw)
    if a.json:
        print(json.dumps([r.__dict__ for r in rows]))
    else:
        print(format_plan(a.model, cfg, a.gpus, mem, rows, lengths, a.mfu, a.cp_efficiency,
                          a.peak_tflops, bw))
    return 0
