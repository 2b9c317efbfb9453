"""Ring attention over a `Transport`: this rank's queries against every rank's keys, exactly.

At step s a rank holds the K/V of rank (rank - s) % N. It posts the transfer for step s + 1 (send
what it holds to the next rank, receive the previous rank's into the other buffer) before
computing step s, so the transfer runs behind the kernel (double buffering). Partial results are
merged into a float32 accumulator with the log-sum-exp rule.

The plan is computed from the layout alone, identically on every rank, so senders and receivers
agree without talking: a block the mask removes entirely is not computed, and K/V travel only as
far around the ring as the farthest rank that still sees them (with a sliding window the ring
stops after a few steps; with the contiguous causal layout the wrap-around transfers vanish).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from ringserve import kernels
from .layout import Shard, check_layout, shard
from .transport import Transport


def block_visible(q: Shard, k: Shard, causal: bool, window_size: Optional[int]) -> bool:
    """True if some query of shard q may attend to some key of shard k."""
    if q.length == 0 or k.length == 0:
        return False
    if not causal and window_size is None:
        return True
    lo = 0 if causal else -window_size          # allowed q_pos - k_pos range [lo, hi]
    hi = window_size if window_size is not None else math.inf
    if q.stride != k.stride:  # not produced by layout.shard; let the kernel sort it out
        return True
    # q_pos - k_pos = c + t * m for every integer m in [-(Lk - 1), Lq - 1] (equal strides)
    c, t = q.offset - k.offset, q.stride
    m_lo = max(-(k.length - 1), -((c - lo) // t))               # ceil((lo - c) / t)
    m_hi = q.length - 1 if hi == math.inf else min(q.length - 1, (hi - c) // t)
    return m_lo <= m_hi


@dataclass(frozen=True)
class Step:
    step: int
    source: int      # rank whose K/V this rank holds (and attends to) at this step
    compute: bool    # False: the mask removes the whole block
    send: bool       # forward the K/V held now to the next rank (used there at step + 1)
    recv: bool       # receive the K/V for step + 1 from the previous rank
    send_len: int    # tokens sent / received (K and V travel packed in one message)
    recv_len: int


@dataclass(frozen=True)
class RingPlan:
    rank: int
    world_size: int
    shards: tuple
    steps: tuple

    @property
    def computed(self) -> int:
        return sum(s.compute for s in self.steps)


def plan_ring(total_len: int, world_size: int, rank: int, layout: str, causal: bool = True,
              window_size: Optional[int] = None) -> RingPlan:
    """The same plan on every rank: which blocks to compute, which transfers to make."""
    check_layout(layout)
    if window_size is not None and window_size < 0:
        raise ValueError(f"window_size ({window_size}) must be >= 0 or None")
    n = world_size
    sh = tuple(shard(total_len, n, r, layout) for r in range(n))
    need = [[block_visible(sh[r], sh[j], causal, window_size) for j in range(n)]
            for r in range(n)]
    # K/V of rank j travel j -> j+1 -> ...: as far as the farthest rank that sees them
    reach = [max([d for d in range(1, n) if need[(j + d) % n][j]], default=0) for j in range(n)]
    num_steps = 1 + max(reach)
    steps = []
    for s in range(num_steps):
        src, nxt = (rank - s) % n, (rank - s - 1) % n
        send = s + 1 <= reach[src] and sh[src].length > 0
        recv = s + 1 <= reach[nxt] and sh[nxt].length > 0
        steps.append(Step(s, src, need[rank][src], send, recv,
                          sh[src].length if send else 0, sh[nxt].length if recv else 0))
    return RingPlan(rank, n, sh, tuple(steps))


@dataclass
class RingStats:
    """What one ring_attention call did on this rank (tests assert skipping with it)."""

    world_size: int = 1
    steps_run: int = 0          # steps of the ring taken (fewer than N when it stops early)
    steps_computed: int = 0     # blocks computed, out of world_size
    steps_skipped: int = 0      # world_size - steps_computed: blocks the mask removed
    messages_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_s: float = 0.0         # host time spent waiting for transfers
    computed_sources: List[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _kv_view(buf: torch.Tensor, length: int, shape_tail, kv: int = 2) -> torch.Tensor:
    """(kv, B, length, Hkv, D) view on the front of a flat packed buffer (kv = 1: keys only,
    which are also the values)."""
    b, hkv, d = shape_tail
    return buf[: kv * b * length * hkv * d].view(kv, b, length, hkv, d)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are views of the same elements (v passed as k)."""
    return (a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                       and a.stride() == b.stride() and a.dtype == b.dtype))


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, total_len: int,
                   layout: str, transport: Transport, causal: bool = True,
                   window_size: Optional[int] = None, softmax_scale: Optional[float] = None,
                   backend: str = "auto", stats: Optional[RingStats] = None,
                   softcap: Optional[float] = None, expand=None):
    """This rank's shard of exact attention over the whole sequence.

    q (B, S_r, Hq, D), k/v (B, S_r, Hkv, D): this rank's tokens in the layout
    `layout.shard(total_len, N, rank, layout)`. Returns out (B, S_r, Hq, D) in q.dtype and
    lse (B, Hq, S_r) float32. `stats`, if given, is filled in. softcap: the kernels' score
    soft-capping (Gemma 2), None for none.

    expand: MLA's expanded form. k (v is k) holds latents (B, S_r, 1, latent_dim), which are
    what travel; expand(latents (n, 1, latent_dim)) -> K (n, Hq, D) and V (n, Hq, Dv) gives
    the per-head keys and values of a block before its kernel (q's D is the keys'; out is
    (B, S_r, Hq, Dv)).
    """
    n, rank = transport.world_size, transport.rank
    plan = plan_ring(total_len, n, rank, layout, causal, window_size)
    me = plan.shards[rank]
    B, S, Hq, D = q.shape
    Hkv, Dk = k.shape[2], k.shape[3]     # Dk: D, or MLA's latent_dim with expand
    if expand is not None and not same_tensor(k, v):
        raise ValueError("expand (MLA's expanded form) needs v to be k, the latents")
    if (S != me.length or k.shape[:2] != (B, S) or v.shape != k.shape
            or (expand is None and k.shape[3] != D)):
        raise ValueError(
            f"rank {rank}/{n} ({layout}, total {total_len}) owns {me.length} tokens: expected "
            f"q (B, {me.length}, Hq, D) and k, v (B, {me.length}, Hkv, D); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv:
        raise ValueError(f"num q heads ({Hq}) must be a multiple of num kv heads ({Hkv})")
    st = stats if stats is not None else RingStats()
    st.world_size = n
    # Only the Hkv heads travel, K and V packed in one buffer: one message per step, not two.
    # When v is k (MLA's latent: the values are the keys' first columns) only K travels.
    kv = 1 if same_tensor(k, v) else 2
    max_len = max(s.length for s in plan.shards)
    numel = kv * B * max_len * Hkv * Dk
    bufs = [torch.empty(numel, dtype=k.dtype, device=k.device),
            torch.empty(numel if len(plan.steps) > 1 else 0, dtype=k.dtype, device=k.device)]
    own = _kv_view(bufs[0], S, (B, Hkv, Dk), kv)
    own[0].copy_(k)
    if kv == 2:
        own[1].copy_(v)

    out_acc = lse_acc = None
    cur = 0
    for step in plan.steps:
        src = plan.shards[step.source]
        held = _kv_view(bufs[cur], src.length, (B, Hkv, Dk), kv)
        handle = None
        if step.send or step.recv:  # post step + 1's transfer before computing step
            send_t = held.reshape(-1) if step.send else None
            recv_t = (_kv_view(bufs[1 - cur], step.recv_len, (B, Hkv, Dk), kv).reshape(-1)
                      if step.recv else None)
            handle = transport.send_recv(send_t, recv_t)
            if step.send:
                st.messages_sent += 1
                st.bytes_sent += send_t.numel() * send_t.element_size()
            if step.recv:
                st.bytes_received += recv_t.numel() * recv_t.element_size()
        if step.compute:
            kk, vv = held[0], held[kv - 1]
            if expand is not None:    # this block's latents -> per-head K, V
                kk, vv = expand(kk.reshape(B * src.length, Hkv, kk.shape[-1]))
                kk, vv = (kk.view(B, src.length, *kk.shape[1:]),
                          vv.view(B, src.length, *vv.shape[1:]))
            out_b, lse_b = kernels.attention(
                q, kk, vv, softmax_scale=softmax_scale, causal=causal,
                window_size=window_size, q_offset=me.offset, q_stride=me.stride,
                k_offset=src.offset, k_stride=src.stride, backend=backend, softcap=softcap)
            if out_acc is None:
                out_acc, lse_acc = out_b.float(), lse_b.float()
            else:
                kernels.merge_(out_acc, lse_acc, out_b, lse_b, backend=backend)
            st.steps_computed += 1
            st.computed_sources.append(step.source)
        if handle is not None:
            t0 = time.perf_counter()
            handle.wait()
            st.wait_s += time.perf_counter() - t0
        cur = 1 - cur
    st.steps_run = len(plan.steps)
    st.steps_skipped = n - st.steps_computed
    if out_acc is None:  # no visible key at all (or no queries): out 0, lse -inf
        dv = v.shape[3] if expand is None else expand(k.new_empty(0, Hkv, Dk))[1].shape[-1]
        return (q.new_zeros(B, S, Hq, dv),
                torch.full((B, Hq, S), float("-inf"), dtype=torch.float32, device=q.device))
    return out_acc.to(q.dtype), lse_acc
