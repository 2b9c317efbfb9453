"""Linear layers over one input joined into one weight for the few-token path's single GEMM
(q|k|v, gate|up), and the gated MLP (SwiGLU / GeGLU) on them: the dense MLP's and DeepSeek's
shared experts' (model.py, moe.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _Joined:
    """Linear layers over one input joined into one weight (and bias) for a single GEMM;
    each module's parameters become views of it, so names and loading are unchanged. Anything
    that replaces a parameter afterwards (`.to()`, a reload into new tensors) unjoins them:
    `holds` then says no and the callers run the modules one by one."""

    def __init__(self, mods):
        self.weight = torch.cat([m.weight.detach() for m in mods])
        has_bias = [m.bias is not None for m in mods]
        if any(has_bias) and not all(has_bias):
            raise ValueError("joined linears must all have biases or none")
        self.bias = torch.cat([m.bias.detach() for m in mods]) if all(has_bias) else None
        # the output's split, from the weights (under TP they are this rank's slices)
        self.sizes = [m.weight.shape[0] for m in mods]
        a = 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(self.weight[a:a + n], requires_grad=m.weight.requires_grad)
            if self.bias is not None:
                m.bias = nn.Parameter(self.bias[a:a + n], requires_grad=m.bias.requires_grad)
            a += n
        self.ptrs = self._ptrs(mods)

    @staticmethod
    def _ptrs(mods):
        return [(m.weight.data_ptr(), m.bias.data_ptr() if m.bias is not None else 0)
                for m in mods]

    def holds(self, *mods) -> bool:
        return self._ptrs(mods) == self.ptrs


def gated_mlp(mod: nn.Module, x: torch.Tensor, fused_act: bool, gelu: bool,
              add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) of a module with gate_proj, up_proj, down_proj and `joined`
    (MLP; DeepSeek's shared experts). fused_act (few-token steps): gate and up as one GEMM when
    joined, act * up in one Triton launch. add_to: add_to + the result instead, in place."""
    j = mod.joined
    if fused_act and j is not None and j.holds(mod.gate_proj, mod.up_proj):
        from ringserve.kernels.gemv import few_rows_linear    # a Triton GEMV for one row
        gate, up = few_rows_linear(x, j.weight, j.bias).split(j.sizes, dim=-1)
    else:
        gate, up = mod.gate_proj(x), mod.up_proj(x)
    return gated_down(mod.down_proj, gate, up, fused_act, gelu, add_to)


def gated_down(down: nn.Module, gate: torch.Tensor, up: torch.Tensor, fused_act: bool,
               gelu: bool, add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    if fused_act:   # one Triton launch for act(gate) * up (few-token steps)
        from ringserve.kernels.fused import act_mul_triton
        a = act_mul_triton(gate, up, gelu)
    elif gelu:   # GeGLU (Gemma)
        a = F.gelu(gate, approximate="tanh") * up
    else:
        a = F.silu(gate) * up
    if fused_act and type(down) is nn.Linear:   # a few rows: Triton where it beats cuBLAS
        from ringserve.kernels.gemv import few_rows_down    # (kernels/gemv.py)
        y = few_rows_down(a, down.weight, down.bias, add_to)
        if y is not None:
            return y
    if add_to is None:
        return down(a)
    if down.bias is None and add_to.dtype == a.dtype == down.weight.dtype:
        # add_to + a @ W^T in the GEMM (beta = 1): rounded once, one launch
        return add_to.addmm_(a, down.weight.t())
    return add_to.add_(down(a))
