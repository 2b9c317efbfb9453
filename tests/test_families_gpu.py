"""GPU: the model families beyond Llama (Gemma 2/3's windows and soft-caps in the Triton flash
and paged kernels, the MoE grouped GEMM, ...) through ringserve.LLM in bf16 at 8K tokens against
transformers (flash-attention's rule: our mean log-prob error against a float64 computation at
most 2x that of transformers in bf16 against the same reference), on one GPU and, with two, both
layouts over NCCL. Starts its own Ray (no TRITON_INTERPRET) unless Ray is already up:
    python -m pytest -q tests/test_families_gpu.py
"""
import importlib

import pytest
import torch

from tinymodels import tiny_model

pytestmark = pytest.mark.gpu
N_TOKENS = 8191
N_NEW = 16
FAMILIES = ["qwen3", "phi3", "qwen3-moe", "mixtral", "gemma2", "gemma3", "deepseek-v2-lite",
            "deepseek-v2"]


def teacher_forced_logprobs(hf, ids):
    with torch.no_grad():
        x = torch.tensor([ids], device="cuda")
        lp = torch.log_softmax(hf(x).logits[0].double(), -1)[:-1]
        return lp.gather(1, x[0, 1:, None])[:, 0].cpu()


_REF = {}


def reference(tmp_path_factory, family):
    from transformers import AutoModelForCausalLM

    if family not in _REF:
        path = tiny_model(tmp_path_factory, family)
        # eager: transformers' only attention with Gemma 2's soft-capping on every device
        kw = dict(attn_implementation="eager")
        # the experts as a loop: transformers' grouped_mm experts (its default on CUDA) refuse
        # float64 (session 11: every MoE family failed there)
        if hasattr(importlib.import_module("transformers.integrations.moe"),
                   "use_experts_implementation"):
            kw["experts_implementation"] = "eager"
        hf64 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64,
                                                    **kw).cuda().eval()
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, hf64.config.vocab_size, (N_TOKENS,), generator=g).tolist()
        hf16 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16,
                                                    **kw).cuda().eval()
        lp64 = teacher_forced_logprobs(hf64, ids)
        err_hf = (teacher_forced_logprobs(hf16, ids) - lp64).abs().mean().item()
        del hf16
        _REF[family] = (path, ids, hf64, lp64, err_hf)
    return _REF[family]


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    yield ray
    _REF.clear()


@pytest.mark.parametrize("world_size,layout", [(1, "striped"), (2, "striped"), (2, "ring")])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_bf16_matches_transformers(tmp_path_factory, ray_gpu, family, world_size, layout):
    from ringserve import LLM, SamplingParams

    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    path, ids, hf64, lp64, err_hf = reference(tmp_path_factory, family)
    # no warm-up: it tunes every shape bucket up to 16K in each new group (minutes per family)
    llm = LLM(str(path), world_size=world_size, layout=layout, device="cuda", warmup=False)
    try:
        got = torch.tensor(llm.score([ids])[0].logprobs[1:], dtype=torch.float64)
        err = (got - lp64).abs().mean().item()
        assert err <= 2 * err_hf + 1e-4, (family, err, err_hf)
        out = llm.generate([ids], SamplingParams(max_tokens=N_NEW, temperature=0,
                                                 ignore_eos=True, logprobs=True))[0]
        lp_full = teacher_forced_logprobs(hf64, ids + out.token_ids)[len(ids) - 1:]
        err_dec = (torch.tensor(out.logprobs, dtype=torch.float64) - lp_full).abs().mean().item()
        assert err_dec <= 2 * err_hf + 1e-3, (family, err_dec, err_hf)
        again = llm.generate([ids], SamplingParams(max_tokens=2, temperature=0,
                                                   ignore_eos=True))[0]
        assert again.num_cached_tokens == len(ids) - 1
    finally:
        llm.shutdown()
