"""The Gluon (Hopper, FA3-style) flash-attention forward against float64 and the Triton kernel.

GPU only: skipped without CUDA, on anything but sm_90, or without triton's Gluon Hopper modules.
Fidelity rule of the repo (tests/test_kernels_gpu.py): the kernel's max error against float64 is
at most 2x that of a plain torch computation in the same dtype (plus a tiny floor); lse within
2e-2. The Gluon kernel must also agree with the production Triton kernel on the same inputs
(its error against float64 within 2x the Triton kernel's, plus a floor).
"""
from __future__ import annotations

import zlib

import pytest
import torch

from ringserve.kernels.reference import attention_ref

pytestmark = pytest.mark.gpu


def _skip_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs an sm_90 GPU (got sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
    from ringserve.kernels import flash_fwd_gluon as fg
    if not fg.GLUON_AVAILABLE:
        return fg.GLUON_UNAVAILABLE_REASON
    return None


_REASON = _skip_reason()
if _REASON is not None:
    pytest.skip(_REASON, allow_module_level=True)

from test_kernels_gpu import check_lowp, make  # noqa: E402  (after the skip: needs CUDA)

from ringserve.kernels.flash_fwd import flash_attn_fwd  # noqa: E402
from ringserve.kernels.flash_fwd_gluon import (  # noqa: E402
    flash_attn_fwd_gluon, gluon_supported)

# one fixed launch of the Triton kernel (autotuning each case would cost minutes of compiles)
TRITON_CFG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}

# B, Sq, Sk, Hq, Hkv, q_offset, k_offset (causal and not for each)
CASES = {
    "mha-1000": (1, 1000, 1000, 4, 4, 0, 0),
    "gqa-32-8-1000": (1, 1000, 1000, 32, 8, 0, 0),
    "gqa-batch2-4097": (2, 4097, 4097, 8, 2, 0, 0),
    "long-16384": (1, 16384, 16384, 2, 1, 0, 0),
    "chunk-tail": (2, 1000, 2113, 8, 2, 1113, 0),          # q_offset > k_offset
    "chunk-offsets": (1, 777, 3000, 4, 1, 2500, 277),     # neither offset block aligned
    "rows-without-keys": (1, 300, 700, 4, 2, 0, 100),     # causal: rows 0..99 see no key
}


# the striped ring layout, sliding windows and soft-capping (STRIDED / HAS_WINDOW / SOFTCAP):
# B, Sq, Sk, Hq, Hkv, causal, window, q_offset, q_stride, k_offset, k_stride, softcap
MASK_CASES = {
    # one step of a striped causal ring over N ranks: rank r's queries sit at r + i N, rank s's
    # keys at s + j N (test_kernels_gpu.py's "striped-causal-window" is the windowed one)
    "striped2-q1-k0": (1, 1500, 1500, 4, 1, True, None, 1, 2, 0, 2, None),
    "striped2-q0-k1": (1, 1501, 1500, 4, 1, True, None, 0, 2, 1, 2, None),   # row 0: no key
    "striped3-q2-k1": (1, 1000, 1001, 8, 2, True, None, 2, 3, 1, 3, None),
    "striped3-q0-k2-batch2": (2, 777, 777, 8, 2, True, None, 0, 3, 2, 3, None),
    "striped3-q1-k1-gqa": (1, 4097, 4097, 16, 4, True, None, 1, 3, 1, 3, None),
    "striped2-not-causal": (1, 1000, 999, 4, 2, False, None, 1, 2, 0, 2, None),
    "striped-causal-window": (1, 777, 1500, 4, 1, True, 700, 1, 2, 0, 2, None),
    # windows: the CTA's first key block n_lo > 0, leading / trailing borders masked
    "window700-causal-4000": (1, 4000, 4000, 4, 2, True, 700, 0, 1, 0, 1, None),
    "window700-two-sided-4000": (1, 4000, 4000, 4, 2, False, 700, 0, 1, 0, 1, None),
    "window700-chunk-tail": (1, 1001, 4000, 8, 2, True, 700, 2999, 1, 0, 1, None),
    "window-two-sided-masked-rows": (2, 600, 1111, 4, 1, False, 300, 1200, 1, 0, 1, None),
    "window0-diagonal-only": (1, 513, 513, 4, 4, True, 0, 0, 1, 0, 1, None),
    "window-striped-two-sided": (1, 999, 1003, 4, 2, False, 333, 2, 3, 0, 3, None),
    # soft-capping (scores 50 tanh(s / 50); the inputs are scaled so that it bites)
    "softcap-causal-tail": (1, 1000, 2113, 8, 4, True, None, 1113, 1, 0, 1, 50.0),
    "softcap-window": (1, 1000, 2113, 8, 4, True, 700, 1113, 1, 0, 1, 50.0),
    "softcap-striped-two-sided": (1, 777, 779, 4, 2, False, None, 1, 2, 0, 2, 50.0),
}


def _check(case, causal, D=128, dtype=torch.bfloat16, config=None):
    B, Sq, Sk, Hq, Hkv, qo, ko = CASES[case]
    seed = zlib.crc32(f"gluon{case}{causal}{D}{dtype}".encode()) % 10_000
    return _check_mask(seed, (B, Sq, Sk, Hq, Hkv, causal, None, qo, 1, ko, 1, None), D, dtype,
                       config, f"{case} causal={causal} D={D} {dtype} {config}")


def _check_mask(seed, spec, D=128, dtype=torch.bfloat16, config=None, what=""):
    B, Sq, Sk, Hq, Hkv, causal, window, qo, qs, ko, ks, cap = spec
    q, k, v = make(B, Sq, Sk, Hq, Hkv, D, dtype, seed=seed)
    if cap:
        q = (q.float() * 8).to(dtype)
    assert gluon_supported(q, k, v, causal, window, cap, qs, ks)
    if window is None and not cap and qs == ks == 1:   # the old call form, kept working
        out, lse = flash_attn_fwd_gluon(q, k, v, None, causal, qo, ko, config=config)
    else:
        out, lse = flash_attn_fwd_gluon(q, k, v, None, causal, qo, ko, q_stride=qs, k_stride=ks,
                                        window_size=window, softcap=cap, config=config)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, Hq, Sq)
    ref_out, ref_lse = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks, softcap=cap)
    lowp, _ = attention_ref(q, k, v, None, causal, window, qo, qs, ko, ks, dtype=dtype,
                            softcap=cap)
    check_lowp(out, lse, ref_out, ref_lse, lowp, what)
    # against the production Triton kernel on the same inputs
    t_out, t_lse = flash_attn_fwd(q, k, v, None, causal, window, qo, qs, ko, ks,
                                  config=TRITON_CFG, softcap=cap, impl="triton")
    err = (out.double() - ref_out).abs().max().item()
    t_err = (t_out.double() - ref_out).abs().max().item()
    assert err <= 2 * t_err + 1e-3, f"{what}: gluon {err:.3g} vs triton {t_err:.3g}"
    fin = torch.isfinite(t_lse)
    assert torch.equal(torch.isfinite(lse), fin), what
    assert (lse[fin] - t_lse[fin]).abs().max().item() < 1e-2, what
    return err, t_err


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_gluon_attention_bf16_d128(case, causal):
    _check(case, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_gluon_attention_fp16(causal):
    _check("chunk-tail", causal, dtype=torch.float16)


@pytest.mark.parametrize("causal", [False, True])
def test_gluon_attention_d64(causal):
    _check("gqa-batch2-4097", causal, D=64)


@pytest.mark.parametrize("config", [{"PINGPONG": True}, {"STAGES": 3}, {"BLOCK_N": 64},
                                    {"BLOCK_N": 64, "STAGES": 3, "PINGPONG": True}])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_variants(config, causal):
    """The alternative constexpr configurations the benchmark times are exact too."""
    _check("chunk-tail", causal, config=config)


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_gluon_masks_bf16_d128(case):
    """Striped positions, windows, soft-capping (not yet routed by flash_attn_fwd)."""
    seed = zlib.crc32(f"gluon-mask{case}".encode()) % 10_000
    _check_mask(seed, MASK_CASES[case], what=case)


@pytest.mark.parametrize("case", ["striped3-q0-k2-batch2", "window700-chunk-tail",
                                  "softcap-window"])
def test_gluon_masks_fp16_d64(case):
    seed = zlib.crc32(f"gluon-mask-d64{case}".encode()) % 10_000
    _check_mask(seed, MASK_CASES[case], D=64, dtype=torch.float16, what=f"{case} fp16 D64")


@pytest.mark.parametrize("config", [{"PINGPONG": True}, {"BLOCK_N": 64, "STAGES": 3}])
@pytest.mark.parametrize("case", ["striped-causal-window", "window700-two-sided-4000"])
def test_gluon_masks_variants(case, config):
    seed = zlib.crc32(f"gluon-mask-var{case}".encode()) % 10_000
    _check_mask(seed, MASK_CASES[case], config=config, what=f"{case} {config}")


def test_gluon_supported_says_no():
    q, k, v = make(1, 64, 64, 4, 2, 128, torch.bfloat16, seed=1)
    assert gluon_supported(q, k, v, True, None, None, 1, 1)
    assert gluon_supported(q, k, v, True, 16, None, 1, 1)              # window
    assert gluon_supported(q, k, v, False, None, 30.0, 1, 1)           # soft-cap
    assert gluon_supported(q, k, v, True, None, None, 2, 2)            # striped positions
    assert not gluon_supported(q, k, v, True, -1, None, 1, 1)          # bad window
    assert not gluon_supported(q, k, v, True, 2.5, None, 1, 1)
    assert not gluon_supported(q, k, v, False, None, -1.0, 1, 1)       # bad soft-cap
    assert not gluon_supported(q, k, v, False, None, float("inf"), 1, 1)
    assert not gluon_supported(q, k, v, True, None, None, 0, 1)        # bad stride
    assert not gluon_supported(q.float(), k.float(), v.float(), False, None, None, 1, 1)
    q2, k2, v2 = make(1, 64, 64, 4, 2, 256, torch.bfloat16, seed=1)
    assert not gluon_supported(q2, k2, v2, False, None, None, 1, 1)    # head dim 256
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)                # (B, H, S, D) storage
    assert not gluon_supported(qt, k, v, False, None, None, 1, 1)
    with pytest.raises(ValueError):
        flash_attn_fwd_gluon(q.float(), k.float(), v.float())
    with pytest.raises(ValueError):
        flash_attn_fwd_gluon(q, k, v, None, True, window_size=-3)
