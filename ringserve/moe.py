"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE, DeepSeek-V2): a linear router, top-k, SwiGLU experts.

Routing is transformers': softmax of the router logits in float32, the top-k experts, their
probabilities renormalised to sum to one when the family says so; each token's output is the
weighted sum of its experts' outputs (accumulated in float32). DeepSeek-V2 adds: router logits
computed in float32, group-limited top-k (only experts of the topk_group groups whose best expert
scores highest compete), the weights times routed_scaling_factor, and shared experts that every
token goes through.

The experts are stored stacked, `gate_up` (E, 2I, H) and `down` (E, H, I), so that one grouped
GEMM (`kernels.grouped_linear`: one Triton launch on GPU, a GEMM per expert on CPU) runs them all
over the token copies sorted by expert; a few tokens (decode) take two Triton launches instead,
no sort (`kernels.grouped_gemm.moe_gemv`). Checkpoints keep one tensor per expert and projection;
`checkpoint_slots` maps those names onto slices of the stacks for the loader.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoeConfig
from .joined import _Joined, gated_mlp

# checkpoint names of each expert's (gate, up, down) projections
EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2"),
                "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
                "deepseek_v2": ("gate_proj", "up_proj", "down_proj")}


class SharedExperts(nn.Module):
    """DeepSeek's shared experts: one SwiGLU MLP (their intermediate sizes summed). On the
    few-token Triton path the MoE layer runs it inside its routed experts' two launches
    (`MoE.shared_as_experts`, reading the joined gate|up of `join_weights` in place); where it
    cannot (`fused_act` here), gate and up run as one GEMM and SiLU(gate) * up as one launch,
    as the dense MLP's."""

    def __init__(self, hidden: int, inter: int, bias: bool, **factory):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden, inter, bias=bias, **factory)
        self.down_proj = nn.Linear(inter, hidden, bias=bias, **factory)
        self.joined = None

    def join_weights(self) -> None:
        self.joined = _Joined((self.gate_proj, self.up_proj))

    def forward(self, x: torch.Tensor, fused_act: bool = False,
                add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
        """add_to: return add_to + the output, added in place by the down projection's GEMM
        (the few-token path: one launch fewer than a GEMM and an add)."""
        return gated_mlp(self, x, fused_act, gelu=False, add_to=add_to)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int, **factory):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, **factory))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, inter, **factory))


class MoE(nn.Module):
    def __init__(self, hidden: int, moe: MoeConfig, model_type: str, bias: bool = False,
                 **factory):
        super().__init__()
        self.cfg = moe
        self.names = EXPERT_NAMES[model_type]
        self.gate = nn.Linear(hidden, moe.num_experts, bias=False, **factory)   # the router
        self.experts = Experts(moe.num_experts, hidden, moe.intermediate_size, **factory)
        if moe.shared_intermediate:
            self.shared_experts = SharedExperts(hidden, moe.shared_intermediate, bias, **factory)
        self.backend = "auto"   # kernels.grouped_linear's; tests force "triton" on CPU
        self.gate_f32: Optional[torch.Tensor] = None    # the router's float32 copy (join_weights)

    def join_weights(self) -> None:
        """The few-token path's weights (the worker calls it when that path is Triton, after
        loading): a float32 router kept beside the model's (DeepSeek routes in float32: the
        cast of its weight was a kernel a layer and a step) and the shared experts' gate|up.
        The router's copy is a copy: whoever changes the router's weight in place afterwards
        calls this again (a replaced weight of another shape or device is noticed)."""
        if self.cfg.router_fp32 and self.gate.weight.dtype != torch.float32:
            self.gate_f32 = self.gate.weight.detach().float()
        if self.cfg.shared_intermediate:
            self.shared_experts.join_weights()

    def shared_as_experts(self) -> Optional[Tuple[torch.Tensor, torch.Tensor, int]]:
        """(gate|up (2S, H), down (H, S), n): the shared experts' SwiGLU MLP as n experts of
        the routed width I (S = n * I) for `moe_gemv`, read in place (the joined gate|up of
        `join_weights`, the down projection's weight); None where it does not split so
        (no joined weight, biases, another width or dtype)."""
        if not self.cfg.shared_intermediate:
            return None
        se, inter = self.shared_experts, self.experts.down.shape[-1]
        n, rest = divmod(self.cfg.shared_intermediate, inter)
        j = se.joined
        if rest or j is None or j.bias is not None or se.down_proj.bias is not None \
                or not j.holds(se.gate_proj, se.up_proj) \
                or j.weight.dtype != self.experts.gate_up.dtype \
                or se.down_proj.weight.dtype != self.experts.down.dtype \
                or not (j.weight.is_contiguous() and se.down_proj.weight.is_contiguous()):
            return None
        return j.weight, se.down_proj.weight, n

    def _router_f32(self) -> torch.Tensor:
        """The router's float32 weight: the copy, unless something replaced the weight."""
        w32 = self.gate_f32
        if w32 is None or w32.shape != self.gate.weight.shape \
                or w32.device != self.gate.weight.device:
            w32 = self.gate.weight.float()
        return w32

    def route(self, x: torch.Tensor, fused: bool = False,
              norm=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """x (T, H) -> weights (T, k) float32, expert ids (T, k). fused: the softmax and top-k
        in one Triton launch (`kernels.grouped_gemm.moe_route`; the few-token path), where no
        group limit applies. norm (an RMSNorm; `add_normed`): x is its input, applied inside
        the router's GEMV."""
        c = self.cfg
        if norm is not None:
            from ringserve.kernels.gemv import gemv
            w = self._router_f32() if c.router_fp32 else self.gate.weight
            logits = gemv(x, w, None if c.router_fp32 else self.gate.bias, out_dtype=w.dtype,
                          norm=(norm.weight, norm.eps))
        elif c.router_fp32:
            w32 = self._router_f32()
            if fused:   # the Triton GEMV reads x as it is: no cast launch
                from ringserve.kernels.gemv import few_rows_linear
                logits = few_rows_linear(x, w32)
            else:
                logits = F.linear(x.float(), w32)
        elif fused and type(self.gate) is nn.Linear:
            from ringserve.kernels.gemv import few_rows_linear
            logits = few_rows_linear(x, self.gate.weight, self.gate.bias)
        else:
            logits = self.gate(x)
        if fused and c.n_group <= 1:   # the kernel reads the logits in float32 itself
            from ringserve.kernels.grouped_gemm import moe_route
            return moe_route(logits, c.top_k, c.renormalize, c.routed_scale)
        probs = torch.softmax(logits.float(), dim=-1)
        if c.n_group > 1:   # only the topk_group groups with the best top experts compete
            grouped = probs.view(-1, c.n_group, c.num_experts // c.n_group)
            best = torch.topk(grouped.amax(-1), c.topk_group, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            probs = grouped.masked_fill(~keep[..., None], 0.0).view_as(probs)
        w, idx = torch.topk(probs, c.top_k, dim=-1)
        if c.renormalize:
            w = w / w.sum(-1, keepdim=True)
        if c.routed_scale != 1.0:
            w = w * c.routed_scale
        return w, idx

    def can_add_normed(self, h: torch.Tensor, norm) -> bool:
        """Whether `add_normed` applies: at most `kernels.gemv.FOLD_MAX_ROWS` tokens, a
        Llama-style norm (not Gemma's (1 + w)), the Triton backend, a plain linear router,
        shared experts (if any) that merge into the routed ones."""
        return self._normed_plan(h, norm) is not False

    def _normed_plan(self, h: torch.Tensor, norm):
        """False where `add_normed` does not apply, else the shared experts it merges (or
        None): one look at them for the check and the launch."""
        from ringserve import kernels
        from ringserve.kernels.gemv import FOLD_MAX_ROWS
        from ringserve.kernels.grouped_gemm import MOE_GEMV_MAX_COPIES
        c, T = self.cfg, h.shape[0]
        if h.dim() != 2 or T > FOLD_MAX_ROWS or norm.plus_one \
                or type(self.gate) is not nn.Linear or not kernels.use_triton(self.backend, h):
            return False
        shared = self.shared_as_experts()
        if (c.shared_intermediate and shared is None) \
                or T * (c.top_k + (shared[2] if shared else 0)) > MOE_GEMV_MAX_COPIES:
            return False
        return shared

    def add_normed(self, h: torch.Tensor, norm) -> torch.Tensor:
        """h += self(norm(h)) in place for a decode token (returned), with the RMSNorm `norm`
        inside the router's and the experts' launches and the add inside the down launch
        (`gemv`'s and `moe_gemv`'s norm= and residual=): no norm launch, no add of its own.
        Where `can_add_normed` says no it raises ValueError."""
        from ringserve.kernels.grouped_gemm import moe_gemv
        shared = self._normed_plan(h, norm)
        if shared is False:
            raise ValueError(f"add_normed: not for {tuple(h.shape)} on this layer (see "
                             f"can_add_normed)")
        w, idx = self.route(h, fused=True, norm=norm)
        return moe_gemv(h, self.experts.gate_up, self.experts.down, idx, w, shared=shared,
                        norm=(norm.weight, norm.eps), residual=h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ringserve import kernels
        from ringserve.kernels.grouped_gemm import MOE_GEMV_MAX_COPIES, moe_gemv

        T = x.shape[0]
        if T * self.cfg.top_k <= MOE_GEMV_MAX_COPIES and kernels.use_triton(self.backend, x):
            # a few tokens (decode): the router in one launch, the experts in two, no sort
            # (kernels/grouped_gemm.py); the shared experts in the same two where they split
            # into experts of the routed width
            shared = self.shared_as_experts()
            if shared is not None and T * (self.cfg.top_k + shared[2]) > MOE_GEMV_MAX_COPIES:
                shared = None
            w, idx = self.route(x, fused=True)
            out = moe_gemv(x, self.experts.gate_up, self.experts.down, idx, w, shared=shared)
            if self.cfg.shared_intermediate and shared is None:
                self.shared_experts(x, fused_act=True, add_to=out)   # added by its down GEMV
            return out
        out = self._grouped(x, *self.route(x))
        if self.cfg.shared_intermediate:
            out = out + self.shared_experts(x)
        return out

    def _grouped(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The routed experts as grouped GEMMs over the token copies sorted by expert."""
        from ringserve import kernels
        from ringserve.kernels import grouped_linear

        T, H = x.shape
        k, E = self.cfg.top_k, self.cfg.num_experts
        flat = idx.reshape(-1)                        # (T*k,) token-major
        order = torch.argsort(flat, stable=True)      # token copies grouped by expert
        # scatter_add, not bincount: bincount reads the maximum on the host (a sync that would
        # also break CUDA-graph capture of decode)
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        xs = x[order // k]                            # (T*k, H)
        gate, up = grouped_linear(xs, self.experts.gate_up, counts, self.backend).chunk(2, dim=-1)
        if kernels.use_triton(self.backend, gate):   # SiLU(gate) * up in one launch
            from ringserve.kernels.fused import act_mul_triton
            act = act_mul_triton(gate, up)
        else:
            act = F.silu(gate) * up
        ys = grouped_linear(act, self.experts.down, counts, self.backend)  # (T*k, H)
        y = torch.empty_like(ys)
        y[order] = ys                                 # back to token-major order
        return (y.view(T, k, H).float() * w[..., None]).sum(1).to(x.dtype)

    def checkpoint_slots(self, prefix: str) -> Dict[str, Tuple[str, tuple]]:
        """checkpoint tensor name -> (parameter name, index into it) for every expert."""
        inter = self.experts.down.shape[-1]
        g, u, d = self.names
        out = {}
        for e in range(self.cfg.num_experts):
            base = f"{prefix}experts.{e}."
            out[f"{base}{g}.weight"] = (f"{prefix}experts.gate_up", (e, slice(0, inter)))
            out[f"{base}{u}.weight"] = (f"{prefix}experts.gate_up", (e, slice(inter, 2 * inter)))
            out[f"{base}{d}.weight"] = (f"{prefix}experts.down", (e,))
        return out
