"""Load HuggingFace safetensors checkpoints (single file or sharded with an index) into a model.

Tensors are read one at a time with `safe_open` and copied straight into the already allocated
parameters on the target device, so peak host memory is one tensor, not the checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from safetensors import safe_open

from .config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# tensors some checkpoints carry that the model recomputes itself
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: Optional[torch.dtype], device: torch.device,
                  config: ModelConfig) -> torch.dtype:
    """None -> the checkpoint's bf16/fp16 on CUDA (bf16 if it says fp32), float32 elsewhere."""
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        stated = _DTYPES.get(str(config.torch_dtype or "").replace("torch.", ""))
        return stated if stated in (torch.bfloat16, torch.float16) else torch.bfloat16
    return torch.float32


def checkpoint_files(path: Union[str, Path]) -> Dict[str, Path]:
    """tensor name -> file holding it. Uses the index when present, else every *.safetensors."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {root} does not exist")
    index = root / INDEX_NAME
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        out = {}
        for name, fname in weight_map.items():
            fp = root / fname
            if not fp.is_file():
                raise FileNotFoundError(f"{index} maps tensor {name!r} to {fname}, which is "
                                        f"missing from {root}")
            out[name] = fp
        return out
    if (root / SINGLE_NAME).is_file():
        files = [root / SINGLE_NAME]
    else:  # Mistral repos also ship consolidated*.safetensors in their own naming: not ours
        files = sorted(p for p in root.glob("*.safetensors")
                       if not p.name.startswith("consolidated"))
    if not files:
        raise FileNotFoundError(f"no {SINGLE_NAME}, {INDEX_NAME} or other *.safetensors file in "
                                f"{root}")
    out = {}
    for fp in files:
        with safe_open(str(fp), framework="pt") as f:
            for name in f.keys():
                out[name] = fp
    return out


def load_weights(model: torch.nn.Module, path: Union[str, Path]) -> None:
    """Fill every parameter of `model` from the checkpoint in `path`, converting dtypes.

    Raises naming the tensors missing from the checkpoint, or the checkpoint tensors the model
    has no place for (a sign of a wrong architecture), or a shape mismatch.
    """
    from .gguf import is_gguf, load_gguf_weights
    if is_gguf(path):
        return load_gguf_weights(model, path)
    where = checkpoint_files(path)
    cfg = getattr(model, "config", None)
    # a model inside a bigger checkpoint (Gemma 3's text model in the multimodal one): its
    # tensors under a prefix, the others' (vision tower) skipped; model name -> stored name
    stored: Dict[str, str] = {}
    prefix, skip = getattr(cfg, "checkpoint_prefix", ""), getattr(cfg, "checkpoint_ignore", ())
    if prefix or skip:
        kept = {}
        for n, fp in where.items():
            if skip and n.startswith(tuple(skip)):
                continue
            m = n[len(prefix):] if prefix and n.startswith(prefix) else n
            kept[m], stored[m] = fp, n
        where = kept
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(cfg, "tie_word_embeddings", False)
    # checkpoint name -> (parameter, index): tensors that fill a slice of a stacked parameter
    slots = model.checkpoint_slots() if hasattr(model, "checkpoint_slots") else {}
    stacked = {pn for pn, _ in slots.values()}
    wanted = {n for n in params if not (tied and n == "lm_head.weight") and n not in stacked}
    wanted |= set(slots)
    missing = sorted(wanted - set(where))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(f"checkpoint in {Path(path)} lacks tensor(s) {', '.join(missing[:5])}{more}")
    unexpected = sorted(n for n in where if n not in wanted and n not in params
                        and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise KeyError(f"checkpoint in {Path(path)} has tensor(s) the model does not use: "
                       f"{', '.join(unexpected[:5])}{more}")
    by_file: Dict[Path, List[str]] = {}
    for n in sorted(wanted):
        by_file.setdefault(where[n], []).append(n)
    device = next(iter(params.values())).device
    # safe_open maps the file; with device="cuda:i" each tensor is materialised on the GPU
    # directly, without a host copy of the whole shard
    if device.type == "cuda":
        open_dev = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    else:
        open_dev = "cpu"
    # tensor parallelism (ringserve.parallel.tp): only this rank's slice is read
    tp = getattr(model, "tp", None)
    with torch.no_grad():
        for fp, names in by_file.items():
            with safe_open(str(fp), framework="pt", device=open_dev) as f:
                for n in names:
                    spec = tp.shard(n) if tp is not None else None
                    src = stored.get(n, n)
                    t = f.get_tensor(src) if spec is None else spec.take(f.get_slice(src))
                    p = params[slots[n][0]][slots[n][1]] if n in slots else params[n]
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(f"tensor {n!r} in {fp.name} has shape {tuple(t.shape)}, "
                                         f"the model expects {tuple(p.shape)}")
                    p.copy_(t)  # converts dtype (e.g. bf16 file -> fp32 on CPU)
                    del t
