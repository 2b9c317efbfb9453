"""In-place merge of a partial attention result into an accumulator (Triton).

(out_acc, lse_acc) <- merge((out_acc, lse_acc), (out_b, lse_b)) for two partials over disjoint
key sets: lse = m + log(exp(a - m) + exp(b - m)), out = exp(a - lse) * out_a + exp(b - lse) * out_b,
in float32 whatever the storage dtype. A side with lse = -inf weighs 0; both -inf gives lse -inf
and out 0, never a NaN. out (B, S, H, D) any strides, lse (B, H, S).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._host import FastLaunch, cdiv, next_pow2
from .pdl import pdl_enter, pdl_kw

LOG2E = 1.4426950408889634   # host side
# log2(e) = 1.4426950408889634 and ln(2) = 0.6931471805599453 are written as literals in the
# kernels: a module-level constexpr is a global the launcher re-checks on every launch


# Row counts and the strides of transposed lse views vary with every batch: one compiled variant
# (the head-dim strides, always 1, stay specialized for vectorized loads).
@triton.jit(do_not_specialize=["R", "S", "H", "s_oab", "s_oas", "s_oah", "s_lab", "s_lah",
                               "s_las", "s_obb", "s_obs", "s_obh", "s_lbb", "s_lbh", "s_lbs"])
def _merge_kernel(OutA, LseA, OutB, LseB, R, S, H, D,
                  s_oab, s_oas, s_oah, s_oad, s_lab, s_lah, s_las,
                  s_obb, s_obs, s_obh, s_obd, s_lbb, s_lbh, s_lbs,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)   # flat (b, s, h) index
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    # int64 offsets: a 1M-token shard's fp32 accumulator has more than 2**31 elements (a
    # 1,176,576-token prefill on 2 GPUs failed with int32 offsets here)
    h = (rows % H).to(tl.int64)
    s = ((rows // H) % S).to(tl.int64)
    b = (rows // H // S).to(tl.int64)
    la = tl.load(LseA + b * s_lab + h * s_lah + s * s_las, mask=row_ok, other=float("-inf"))
    lb = tl.load(LseB + b * s_lbb + h * s_lbh + s * s_lbs, mask=row_ok,
                 other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    # both sides -inf: shift by 0 so that exp(-inf - -inf) never makes a NaN
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.math.exp2((la - m) * 1.4426950408889634)
    wb = tl.math.exp2((lb - m) * 1.4426950408889634)
    tot = wa + wb
    seen = tot > 0.0
    inv = 1.0 / tl.where(seen, tot, 1.0)
    lse = tl.where(seen, m + tl.math.log2(tl.where(seen, tot, 1.0)) * 0.6931471805599453, float("-inf"))
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    pa = OutA + (b * s_oab + s * s_oas + h * s_oah)[:, None] + offs_d[None, :] * s_oad
    pb = OutB + (b * s_obb + s * s_obs + h * s_obh)[:, None] + offs_d[None, :] * s_obd
    oa = tl.load(pa, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(pb, mask=mask, other=0.0).to(tl.float32)
    # a weight of exactly 0 must not multiply a NaN/inf left in an unused accumulator
    oa = tl.where((wa > 0.0)[:, None], oa, 0.0)
    ob = tl.where((wb > 0.0)[:, None], ob, 0.0)
    out = oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None]
    tl.store(pa, out.to(OutA.dtype.element_ty), mask=mask)
    tl.store(LseA + b * s_lab + h * s_lah + s * s_las, lse, mask=row_ok)


_merge_fast = FastLaunch(_merge_kernel)


def _check(out_acc, lse_acc, out_b, lse_b):
    for name, t, nd in (("out_acc", out_acc, 4), ("lse_acc", lse_acc, 3),
                        ("out_b", out_b, 4), ("lse_b", lse_b, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{name} must be a {nd}-D tensor, got {getattr(t, 'shape', type(t))}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if out_acc.shape != out_b.shape:
        raise ValueError(f"out_acc {tuple(out_acc.shape)} and out_b {tuple(out_b.shape)} differ")
    B, S, H, _ = out_acc.shape
    for name, t in (("lse_acc", lse_acc), ("lse_b", lse_b)):
        if tuple(t.shape) != (B, H, S):
            raise ValueError(f"{name} shape {tuple(t.shape)} must be (B, H, S) = {(B, H, S)}")
    if lse_acc.dtype != torch.float32:
        raise ValueError(f"lse_acc must be float32 (it is updated in place), got {lse_acc.dtype}")
    devs = {t.device for t in (out_acc, lse_acc, out_b, lse_b)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")


def merge_triton_(out_acc, lse_acc, out_b, lse_b):
    """In place on (out_acc, lse_acc); returns them. See the module docstring."""
    _check(out_acc, lse_acc, out_b, lse_b)
    B, S, H, D = out_acc.shape
    R = B * S * H
    if R == 0 or D == 0:
        return out_acc, lse_acc
    block_d = max(16, next_pow2(D))
    # ~4K elements a program: enough bytes in flight per SM, few programs in the interpreter
    block_r = max(1, min(next_pow2(R), 4096 // block_d))
    grid = (cdiv(R, block_r),)
    _merge_fast(grid, out_acc, lse_acc, out_b, lse_b, R, S, H, D,
                        *out_acc.stride(), *lse_acc.stride(), *out_b.stride(), *lse_b.stride(),
                        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return out_acc, lse_acc


@triton.jit
def _parts_max(m, L, n, s_ln, row_off, row_ok, BLOCK_J: tl.constexpr):
    """The running max of n parts' lse over BLOCK_R rows, BLOCK_J parts a load."""
    offs_j = tl.arange(0, BLOCK_J)
    for j0 in range(0, n, BLOCK_J):
        jj = (j0 + offs_j).to(tl.int64)
        ok = (jj < n)[:, None] & row_ok[None, :]
        lj = tl.load(L + jj[:, None] * s_ln + row_off[None, :], mask=ok, other=float("-inf"))
        m = tl.maximum(m, tl.max(lj.to(tl.float32), axis=0))
    return m


@triton.jit
def _parts_sum(acc, tot, m, O, L, n, s_on, s_ln, o_off, l_off, offs_d, s_od, row_ok, d_ok,
               BLOCK_J: tl.constexpr):
    """acc += sum_j exp(lse_j - m) * out_j and tot += sum_j exp(lse_j - m) over n parts,
    BLOCK_J parts a load: a [BLOCK_J, BLOCK_R, BLOCK_D] tile of independent loads in flight."""
    offs_j = tl.arange(0, BLOCK_J)
    for j0 in range(0, n, BLOCK_J):
        jj = (j0 + offs_j).to(tl.int64)
        ok = (jj < n)[:, None] & row_ok[None, :]
        lj = tl.load(L + jj[:, None] * s_ln + l_off[None, :], mask=ok,
                     other=float("-inf")).to(tl.float32)
        w = tl.math.exp2((lj - m[None, :]) * 1.4426950408889634)       # [J, R]
        o = tl.load(O + jj[:, None, None] * s_on + o_off[None, :, None]
                    + offs_d[None, None, :] * s_od,
                    mask=ok[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        # a weight of exactly 0 must not multiply a NaN/inf in an unused part
        o = tl.where((w > 0.0)[:, :, None], o, 0.0)
        acc += tl.sum(o * w[:, :, None], axis=0)
        tot += tl.sum(w, axis=0)
    return acc, tot


@triton.jit(do_not_specialize=["NB", "NE", "R", "S", "H", "s_on", "s_os", "s_oh", "s_ln",
                               "s_lh", "s_ls", "s_en", "s_es", "s_eh", "s_fn", "s_fh", "s_fs",
                               "s_ys", "s_yh", "s_zs", "s_zh"])
def _merge_splits_kernel(O, L, E, LE, Out, LseOut, NB, NE, R, S, H, D,
                         s_on, s_os, s_oh, s_od, s_ln, s_lh, s_ls,
                         s_en, s_es, s_eh, s_ed, s_fn, s_fh, s_fs,
                         s_ys, s_yh, s_yd, s_zs, s_zh,
                         STORE_LSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr,
                         BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    # two sets of parts over disjoint keys, NB in (O, L) and NE in (E, LE) (the extra parts: a
    # chunk's own keys, or the other half of a cascade), any strides. Each program merges
    # BLOCK_R rows, reading BLOCK_J parts at once: a cascade's ~70 decode splits of a few rows
    # read one part at a time by 8 programs took ~0.1 ms a layer on the H200 (session 11)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)   # flat (s, h) index
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    d_ok = offs_d < D
    h = (rows % H).to(tl.int64)
    s = (rows // H).to(tl.int64)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    m = _parts_max(m, L, NB, s_ln, h * s_lh + s * s_ls, row_ok, BLOCK_J)
    m = _parts_max(m, LE, NE, s_fn, h * s_fh + s * s_fs, row_ok, BLOCK_J)
    m = tl.where(m == float("-inf"), 0.0, m)   # every part -inf: weights 0, never a NaN
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    tot = tl.zeros([BLOCK_R], tl.float32)
    acc, tot = _parts_sum(acc, tot, m, O, L, NB, s_on, s_ln, s * s_os + h * s_oh,
                          h * s_lh + s * s_ls, offs_d, s_od, row_ok, d_ok, BLOCK_J)
    acc, tot = _parts_sum(acc, tot, m, E, LE, NE, s_en, s_fn, s * s_es + h * s_eh,
                          h * s_fh + s * s_fs, offs_d, s_ed, row_ok, d_ok, BLOCK_J)
    seen = tot > 0.0
    inv = 1.0 / tl.where(seen, tot, 1.0)
    mask = row_ok[:, None] & d_ok[None, :]
    tl.store(Out + (s * s_ys + h * s_yh)[:, None] + offs_d[None, :] * s_yd,
             (acc * inv[:, None]).to(Out.dtype.element_ty), mask=mask)
    if STORE_LSE:
        lse = tl.where(seen, m + tl.math.log2(tl.where(seen, tot, 1.0)) * 0.6931471805599453, float("-inf"))
        tl.store(LseOut + s * s_zs + h * s_zh, lse, mask=row_ok)


_merge_splits_fast = FastLaunch(_merge_splits_kernel)


def merge_splits_triton(out, lse, extra=None, dest=None, blocks=None):
    """Merge NB partial results over disjoint key sets in one launch: out (NB, S, H, D) any
    float dtype and strides, lse (NB, H, S) -> (out (S, H, D) float32, lse (S, H) float32).
    extra: more parts over other keys, in the same launch: one (out (S, H, D), lse (H, S)),
    e.g. a chunk's attention to its own keys, or NE of them (out (NE, S, H, D), lse
    (NE, H, S)), e.g. the other half of a cascade; dest: an (S, H, D) tensor of any float dtype
    the merged output is written into (cast), returned as (dest, None): no float32 buffer, no
    lse. blocks: (BLOCK_R, BLOCK_J) instead of merge_blocks' choice (benchmarks)."""
    NB, S, H, D = out.shape
    dev = out.device
    y = dest if dest is not None else torch.empty(S, H, D, dtype=torch.float32, device=dev)
    z = torch.empty(S, H, dtype=torch.float32, device=dev) if dest is None else None
    R = S * H
    if R == 0 or D == 0:
        return y, (z.fill_(float("-inf")) if z is not None else None)
    # strides given as numbers, not as views (a view op each in a launch-bound step)
    if extra is None:
        e, le, ne = out, lse, 0                              # unread: no extra parts
        es, les = out.stride(), lse.stride()
    elif extra[0].dim() == 3:                                # one part: a leading 1
        e, le, ne = extra[0], extra[1], 1
        es, les = (0, *e.stride()), (0, *le.stride())
    else:
        e, le, ne = extra[0], extra[1], extra[0].shape[0]
        es, les = e.stride(), le.stride()
        if ne == 1:     # the part index is always 0: its stride is never used, and as 0 it
            es, les = (0, *es[1:]), (0, *les[1:])   # is no specialization of its own
    # without STORE_LSE the lse output is never written: any pointer, strides 0
    zz, zs = (z, z.stride()) if z is not None else (lse, (0, 0))
    block_d = max(16, next_pow2(D))
    block_r, block_j = blocks or merge_blocks(max(NB, ne), block_d, out.device.type == "cpu")
    _merge_splits_fast((cdiv(R, block_r),),
        out, lse, e, le, y, zz, NB, ne, R, S, H, D, *out.stride(), *lse.stride(), *es,
        *les, *y.stride(), *zs,
        STORE_LSE=z is not None, BLOCK_R=block_r, BLOCK_J=block_j, BLOCK_D=block_d,
        num_warps=4, **pdl_kw(out.device))
    return y, z


# elements of a [BLOCK_J, BLOCK_R, BLOCK_D] tile a program loads at once: 32 fp32 registers a
# thread at 4 warps on the GPU; the interpreter runs each program in numpy, so fewer, larger ones
MERGE_TILE = 4096
MERGE_TILE_CPU = 32768
# the parts read at once: one, a few (a chunk's prefix splits) or many (a cascade's decode
# splits). Three compiled variants a dtype combination, all made by the worker's warm-up: a
# variant compiled in the middle of serving stalls the step (session 11: 4 compiles when
# BLOCK_R and BLOCK_J followed every row and part count)
MERGE_PART_BLOCKS = (1, 8, 32)


def merge_blocks(parts: int, block_d: int, on_cpu: bool = False):
    """(BLOCK_R, BLOCK_J) of merge_splits: up to 32 parts a load, 1 / 8 / 32 as the part count
    asks, then as many rows as the rest of the tile holds (rows past the end are masked)."""
    tile = MERGE_TILE_CPU if on_cpu else MERGE_TILE
    want = next(b for b in MERGE_PART_BLOCKS if b >= min(parts, MERGE_PART_BLOCKS[-1]))
    block_j = max(1, min(want, tile // block_d))
    return max(1, tile // (block_d * block_j)), block_j
