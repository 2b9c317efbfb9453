"""Attention kernels: Triton (GPU, or CPU under TRITON_INTERPRET=1) and a torch path.

Public entry points dispatch on `backend`: "triton", "torch", or "auto" (Triton for CUDA tensors,
torch otherwise); `attention` also takes "cudnn": cuDNN's fused attention for the blocks its own
masks express exactly (cudnn_attn.py), the Triton kernel for the rest. Contracts are documented
in reference.py.
"""
from __future__ import annotations

from .torch_ops import (attention_torch, grouped_linear_torch, merge_splits_torch, merge_torch_,
                        paged_decode_torch)

BACKENDS = ("auto", "triton", "torch", "cudnn")
# Heads wider than 256 (MLA's latent, kv_lora_rank + rope = 576 for DeepSeek-V2) run in Triton
# with small tiles (a 1024-wide row); if a kernel cannot compile them on this GPU, the call warns
# once and that kernel takes the torch path from then on (backend "auto" only).
MAX_TRITON_HEAD_DIM = 256
_WIDE_BROKEN = {}   # kernel name -> why its wide-head Triton launch failed here


def _pick(backend: str, t, kernel: str = "") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if (backend in ("auto", "cudnn") and t.shape[-1] > MAX_TRITON_HEAD_DIM
            and (not t.is_cuda or kernel in _WIDE_BROKEN)):
        return "torch"
    if backend == "auto" or (backend == "cudnn" and not t.is_cuda):
        return "triton" if t.is_cuda else "torch"
    return backend


def attention(q, k, v, softmax_scale=None, causal=False, window_size=None,
              q_offset=0, q_stride=1, k_offset=0, k_stride=1, backend="auto", softcap=None,
              check=True):
    """Exact attention returning (out, lse); see reference.py for the contract (softcap:
    Gemma 2's tanh soft-capping of the scaled scores, None or 0 for none). check=False skips
    the Triton path's input validation (callers that built the inputs)."""
    b = _pick(backend, q, "attention")
    if b in ("triton", "cudnn") and q.shape[-1] > MAX_TRITON_HEAD_DIM and backend != "triton":
        from .flash_fwd import flash_attn_fwd
        return _wide(lambda: flash_attn_fwd(q, k, v, softmax_scale, causal, window_size,
                                            q_offset, q_stride, k_offset, k_stride,
                                            softcap=softcap),
                     lambda: attention_torch(q, k, v, softmax_scale, causal, window_size,
                                             q_offset, q_stride, k_offset, k_stride,
                                             softcap=softcap), "attention", q.shape[-1])
    if b == "cudnn" and not softcap and v.shape[-1] == q.shape[-1]:
        # SDPA has no soft-capping (nor, here, a values' head dim of its own): Triton takes those
        from .cudnn_attn import attention_cudnn
        from .flash_fwd import flash_attn_fwd
        return attention_cudnn(q, k, v, softmax_scale, causal, window_size,
                               q_offset, q_stride, k_offset, k_stride, fallback=flash_attn_fwd)
    if b in ("triton", "cudnn"):
        from .flash_fwd import flash_attn_fwd
        return flash_attn_fwd(q, k, v, softmax_scale, causal, window_size,
                              q_offset, q_stride, k_offset, k_stride, softcap=softcap,
                              check=check)
    return attention_torch(q, k, v, softmax_scale, causal, window_size,
                           q_offset, q_stride, k_offset, k_stride, softcap=softcap)


def merge_(out_acc, lse_acc, out_b, lse_b, backend="auto"):
    """In-place online-softmax merge of a partial result into the accumulator."""
    if _pick(backend, out_acc) in ("triton", "cudnn"):
        from .merge import merge_triton_
        return merge_triton_(out_acc, lse_acc, out_b, lse_b)
    return merge_torch_(out_acc, lse_acc, out_b, lse_b)


def merge_splits(out, lse, backend="auto", extra=None, dest=None, check=True):
    """Merge the NB partial results of one set of queries over disjoint key ranges (the splits
    of a long key range run as NB batch entries): out (NB, S, H, D), lse (NB, H, S) ->
    (out (S, H, D) float32, lse (S, H) float32), one launch on the GPU.

    extra: more parts over other keys, merged in the same launch: one, (out (S, H, D), lse
    (H, S)) (a prompt chunk's attention to its own keys, merged with its cached prefix's
    splits), or NE of them, (out (NE, S, H, D), lse (NE, H, S)) (the other half of a cascade);
    dest: an (S, H, D) tensor (any float dtype, e.g. the step's output rows) that receives the
    merged output, cast; then (dest, None) is returned and no lse is computed. check=False
    skips the shape validation (callers that built the parts)."""
    if not check:
        if _pick(backend, out) in ("triton", "cudnn"):
            from .merge import merge_splits_triton
            return merge_splits_triton(out, lse, extra, dest)
        return merge_splits_torch(out, lse, extra, dest)
    NB, S, H = (out.shape[0], out.shape[1], out.shape[2]) if out.dim() == 4 else (0, 0, 0)
    if out.dim() != 4 or lse.dim() != 3 or tuple(lse.shape) != (NB, H, S):
        raise ValueError(f"out (NB, S, H, D) and lse (NB, H, S) expected, got "
                         f"{tuple(out.shape)} and {tuple(lse.shape)}")
    if extra is not None:
        eo, el = extra
        ne = eo.shape[0] if eo.dim() == 4 else None
        if not ((eo.dim() == 3 and tuple(eo.shape) == tuple(out.shape[1:])
                 and tuple(el.shape) == (H, S))
                or (eo.dim() == 4 and tuple(eo.shape[1:]) == tuple(out.shape[1:])
                    and tuple(el.shape) == (ne, H, S))):
            raise ValueError(f"extra must be (out {tuple(out.shape[1:])}, lse {(H, S)}) or "
                             f"(out (NE, *{tuple(out.shape[1:])}), lse (NE, {H}, {S})), got "
                             f"{tuple(eo.shape)} and {tuple(el.shape)}")
    if dest is not None and (tuple(dest.shape) != tuple(out.shape[1:])
                             or not dest.is_floating_point()):
        raise ValueError(f"dest must be a float tensor of shape {tuple(out.shape[1:])}, got "
                         f"{dest.dtype} {tuple(dest.shape)}")
    if _pick(backend, out) in ("triton", "cudnn"):
        from .merge import merge_splits_triton
        return merge_splits_triton(out, lse, extra, dest)
    return merge_splits_torch(out, lse, extra, dest)


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=None, causal=False,
                 window_size=None, q_pos=None, kv_pos=None, backend="auto", softcap=None,
                 splits=False, check=True, positions_sorted=False):
    """Flash-decoding over a paged KV cache, returning (out, lse) for merging across shards.

    splits=True returns the partials unreduced, (out (B, Hq, Sq, NB, D) float32, lse
    (B, Hq, Sq, NB) float32) (NB = 1 on the torch path), to be merged with other parts in one
    launch: split_parts gives merge_splits' layout. check=False skips the Triton path's input
    validation (callers that built the inputs). positions_sorted: kv_pos increases along each
    sequence's block table (the engine's cache), so a window lets the Triton kernel skip the
    key tiles before it (flash_decode.paged_decode_triton)."""
    def on_torch():
        out, lse = paged_decode_torch(q, k_cache, v_cache, block_table, seq_lens, softmax_scale,
                                      causal, window_size, q_pos, kv_pos, softcap=softcap)
        if splits:
            return out.float().permute(0, 2, 1, 3)[:, :, :, None], lse.float()[..., None]
        return out, lse
    if _pick(backend, q, "paged_decode") in ("triton", "cudnn"):
        from .flash_decode import paged_decode_triton

        def run(latent=None):
            return paged_decode_triton(q, k_cache, v_cache, block_table, seq_lens, softmax_scale,
                                       causal, window_size, q_pos, kv_pos, softcap=softcap,
                                       splits=splits, check=check, latent=latent,
                                       positions_sorted=positions_sorted)
        if q.shape[-1] <= MAX_TRITON_HEAD_DIM or backend == "triton":
            return run()
        if "paged_decode_latent" not in _WIDE_BROKEN:
            # MLA's latent kernel first; if it cannot compile here, the general wide kernel
            return _wide(run, lambda: _wide(lambda: run(False), on_torch, "paged_decode",
                                            q.shape[-1]),
                         "paged_decode_latent", q.shape[-1])
        return _wide(lambda: run(False), on_torch, "paged_decode", q.shape[-1])
    return on_torch()


def split_parts(out, lse):
    """paged_decode(splits=True)'s partials of B queries of one token each (Sq = 1), or of one
    batch entry's Sq queries (B = 1), as merge_splits takes them: (out (NB, R, Hq, D), lse
    (NB, Hq, R)), R = B * Sq, views (no copy)."""
    B, Hq, Sq, NB, D = out.shape
    (ob, oh, os_, on, od), (lb, lh, ls, ln) = out.stride(), lse.stride()
    # one as_strided op a tensor (a select and a permute each before: launch-bound steps)
    if Sq == 1:
        return (out.as_strided((NB, B, Hq, D), (on, ob, oh, od), out.storage_offset()),
                lse.as_strided((NB, Hq, B), (ln, lh, lb), lse.storage_offset()))
    if B == 1:
        return (out.as_strided((NB, Sq, Hq, D), (on, os_, oh, od), out.storage_offset()),
                lse.as_strided((NB, Hq, Sq), (ln, lh, ls), lse.storage_offset()))
    raise ValueError(f"split_parts needs Sq == 1 or B == 1, got partials {tuple(out.shape)}")


def cascade_decode_into(q_own, q_doc, k_cache, v_cache, own, doc, dest, backend="auto", **kw):
    """Cascade attention of B one-token rows sharing one cached document, into dest (B, Hq,
    Dv): each row's own pages (q_own: the rows as (B, 1, Hq, D); own = (block_table (B, W),
    seq_lens (B,), q_pos (B, 1))) and the document's pages read once for all rows (q_doc: the
    same rows as (1, B, Hq, D); doc = (block_table (1, W'), seq_lens (1,), q_pos (1, B))), both
    left as paged_decode's split partials and merged by log-sum-exp in one launch written into
    dest: no reduce launches, no float32 buffer, no casts. kw: paged_decode's other arguments
    (softmax_scale, causal, window_size, kv_pos, softcap, positions_sorted)."""
    o_own = paged_decode(q_own, k_cache, v_cache, own[0], own[1], q_pos=own[2],
                         backend=backend, splits=True, check=False, **kw)
    o_doc = paged_decode(q_doc, k_cache, v_cache, doc[0], doc[1], q_pos=doc[2],
                         backend=backend, splits=True, check=False, **shared_prefix_kw(kw))
    merge_splits(*split_parts(*o_doc), backend=backend, extra=split_parts(*o_own), dest=dest,
                 check=False)
    return dest


def shared_prefix_kw(kw: dict) -> dict:
    """paged_decode's arguments for a shared document's pages under rows that decode after it:
    every key there precedes every row, so without a window the causal mask is all true and
    is dropped (the kernel then reads no key positions: the batch-16 step's document part
    went from 203 to 152 us a layer at 128K on the H200, session 24); a window keeps it."""
    if kw.get("window_size") is not None or not kw.get("causal"):
        return kw
    return {**kw, "causal": False, "kv_pos": None}


def _wide(triton_call, torch_call, kernel: str, head_dim: int):
    """A wide-head Triton launch; if it cannot compile here, warn once and take torch_call (the
    torch path; for MLA's latent decode kernel, the general wide kernel first)."""
    try:
        return triton_call()
    except ValueError:   # the inputs' fault, not the compiler's
        raise
    except Exception as e:  # noqa: BLE001 - compile / resources: torch from now on
        import warnings
        _WIDE_BROKEN[kernel] = f"{type(e).__name__}: {e}"[:300]
        warnings.warn(f"{kernel} with head dim {head_dim} failed in Triton, using "
                      f"{'the general kernel' if kernel.endswith('_latent') else 'the torch path'}"
                      f" from now on: {_WIDE_BROKEN[kernel]}", stacklevel=3)
        return torch_call()


def use_triton(backend: str, t) -> bool:
    """Whether `backend` runs Triton for tensor t (the fused decode kernels of fused.py have no
    torch twin here: the model keeps its own torch path)."""
    return _pick(backend, t) in ("triton", "cudnn")


def grouped_linear(x, w, counts, backend="auto"):
    """Mixture-of-experts GEMM: x (M, K) rows sorted by expert, w (E, N, K), counts (E,) rows per
    expert -> (M, N), each row times its expert's weight transposed (grouped_gemm.py)."""
    if _pick(backend, x) in ("triton", "cudnn"):
        from .grouped_gemm import grouped_linear_triton
        return grouped_linear_triton(x, w, counts)
    return grouped_linear_torch(x, w, counts)


__all__ = ["attention", "merge_", "paged_decode", "cascade_decode_into", "shared_prefix_kw", "grouped_linear", "use_triton", "attention_torch",
           "merge_torch_", "paged_decode_torch", "grouped_linear_torch", "BACKENDS"]
