"""ringserve.LLM (Ray actors, gloo) against HuggingFace transformers on the same tiny checkpoints
(fp32): prompt log-probabilities (`score`) and 32 greedy tokens, odd prompt lengths, Mistral (MQA,
sliding window 16, prompts longer than the window) and Qwen2 (QKV bias, tied embeddings)."""
import pytest
import torch

from tinymodels import hf_reference, load_hf, tiny_model
from ringserve import LLM, SamplingParams

# The full matrix (3 families x world sizes 1-3 x both schedules) runs in-process in
# tests/test_engine.py; through Ray actors and gloo, two configurations that between them cover
# both schedules, a window, QKV bias, MQA/GQA and world sizes 2 and 3.
CONFIGS = [("mistral", 3, "ring"), ("qwen2", 2, "striped")]
PROMPT_LENS = (37, 53)
NEW_TOKENS = 32
_REF = {}



def reference(tmp_path_factory, family):
    """HF's prompt logprobs and greedy continuations, computed once per family."""
    if family not in _REF:
        path = tiny_model(tmp_path_factory, family)
        out = hf_reference(load_hf(path), sum(map(ord, family)), PROMPT_LENS, NEW_TOKENS)
        _REF[family] = (path, out)
    return _REF[family]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-ws{c[1]}-{c[2]}")
def setup(request, ray_session, tmp_path_factory):
    family, ws, schedule = request.param
    path, ref = reference(tmp_path_factory, family)
    llm = LLM(str(path), world_size=ws, layout=schedule, max_kv_tokens=2048,
              num_cpus_per_worker=0.5)
    yield llm, ref
    llm.shutdown()


def test_score_equals_transformers(setup):
    llm, ref = setup
    outs = llm.score([ids for ids, _, _ in ref])
    for (ids, lp_ref, _), out in zip(ref, outs):
        assert out.token_ids == ids and out.logprobs[0] is None
        got = torch.tensor(out.logprobs[1:], dtype=torch.float64)
        torch.testing.assert_close(got, lp_ref, rtol=0, atol=5e-5)


def test_greedy_tokens_equal_transformers(setup):
    llm, ref = setup
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                            logprobs=True)
    outs = llm.generate([ids for ids, _, _ in ref], params)
    for (ids, _, gen_ref), out in zip(ref, outs):
        assert out.token_ids == gen_ref
        assert out.finish_reason == "length" and out.prompt_token_ids == ids
        assert len(out.logprobs) == NEW_TOKENS and all(lp <= 0 for lp in out.logprobs)
    s = llm.stats()
    assert s["world_size"] == llm.world_size and s["kv_tokens_used"] > 0
