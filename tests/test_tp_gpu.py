"""GPU (two): tensor parallelism over NCCL (issue 18). The TP group's all-reduces and
all-gathers, the rings of each TP index and the decode merge run on cupy NCCL communicators,
which the CPU suite (gloo) never touches. Run on a host with two GPUs:
    python -m pytest -q tests/test_tp_gpu.py
"""
import pytest

from test_llm_gpu import check, ray_gpu, ref  # noqa: F401 - fixtures: the bf16 rule vs HF

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def test_tp2_bf16_matches_transformers(ref, ray_gpu):  # noqa: F811
    """(t, c) = (2, 1): prefill, decode and a cached follow-up within 2x HF's own bf16 error."""
    from ringserve import LLM

    llm = LLM(str(ref[0]), context_parallel_size=1, tensor_parallel_size=2, device="cuda")
    try:
        assert [h["tp_rank"] for h in llm._group.health()] == [0, 1]
        check(llm, ref)
    finally:
        llm.shutdown()


def test_tp2_float32_equals_one_gpu_with_graphs(ref, ray_gpu):  # noqa: F811
    """fp32, (2, 1) with decode replayed from CUDA graphs (the TP all-reduces captured) against
    (1, 1) eager: the same greedy tokens for prompts decoded together, log-probs to 1e-3."""
    from ringserve import LLM, SamplingParams

    path, ids = ref[0], ref[1]
    prompts = [ids[:3000], ids[100:400], ids[7:50]]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=True)
    outs = {}
    for t, graphs in ((1, False), (2, True)):
        llm = LLM(str(path), context_parallel_size=1, tensor_parallel_size=t, device="cuda",
                  dtype="float32", cuda_graphs=graphs)
        try:
            outs[t] = llm.generate(prompts, params)
        finally:
            llm.shutdown()
    for a, b in zip(outs[1], outs[2]):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3
