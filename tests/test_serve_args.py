"""ServeArgs / build_app / run argument checks: clear errors before anything starts (no Ray)."""
from __future__ import annotations

import pytest

from ringserve.serve import ServeArgs, build_app, run


def test_defaults_and_served_name(tmp_path):
    a = ServeArgs.from_dict({"model": str(tmp_path / "my-model") + "/"})
    assert a.served_model_name == "my-model"
    assert a.world_size == 1 and a.layout == "striped" and a.api_key is None
    assert a.max_num_seqs == 64 and a.max_num_batched_tokens is None
    assert a.max_body_bytes == 64 << 20
    assert ServeArgs.from_dict({"model": "m", "model_name": "x"}).served_model_name == "x"
    assert a.public_dict()["api_key"] is None
    assert ServeArgs(model="m", api_key="s3cret").public_dict()["api_key"] == "***"


@pytest.mark.parametrize("args, words", [
    ({}, ["'model'", "required"]),
    ({"model": "m", "world_sise": 2}, ["unknown", "world_sise"]),
    ({"model": "m", "world_size": 0}, ["world_size (0)", ">= 1"]),
    ({"model": "m", "world_size": 2.5}, ["world_size (2.5)"]),
    ({"model": "m", "max_queue": -1}, ["max_queue (-1)"]),
    ({"model": "m", "layout": "zigzag"}, ["layout ('zigzag')", "striped"]),
    ({"model": "m", "max_num_seqs": 0}, ["max_num_seqs (0)", ">= 1"]),
    ({"model": "m", "device": "tpu"}, ["device ('tpu')"]),
    ({"model": "m", "dtype": "int8"}, ["dtype ('int8')"]),
    ({"model": "m", "request_timeout_s": 0}, ["request_timeout_s (0)", "> 0"]),
    ({"model": "m", "max_body_mb": -3}, ["max_body_mb (-3)"]),
    ({"model": "m", "max_kv_tokens": 0}, ["max_kv_tokens (0)"]),
    ({"model": "m", "api_key": " "}, ["api_key"]),
    ({"model": ""}, ["model"]),
    ({"model": "m", "llm_class": "ringserve.llm.LLM"}, ["llm_class"]),
    ({"model": "m", "comm_host": "0.0.0.0"}, ["comm_host ('0.0.0.0')", "not every interface"]),
    ({"model": "m", "comm_host": ""}, ["comm_host ('')"]),
    ({"model": "m", "cuda_graphs": "on"}, ["cuda_graphs ('on')", "true or false"]),
    ({"model": "m", "fused_kernels": 1}, ["fused_kernels (1)", "true or false"]),
    ({"model": "m", "interleave_decode_steps": -1}, ["interleave_decode_steps (-1)", ">= 0"]),
    ({"model": "m", "interleave_decode_steps": 0.5}, ["interleave_decode_steps (0.5)"]),
    ({"model": "m", "async_scheduling": "yes"}, ["async_scheduling ('yes')"]),
    ({"model": "m", "pipeline_steps": 1}, ["pipeline_steps (1)"]),
    ({"model": "m", "pipeline_depth": 0}, ["pipeline_depth (0)", "1..4"]),
    ({"model": "m", "pipeline_depth": True}, ["pipeline_depth (True)"]),
    ({"model": "m", "async_scheduling": True, "tensor_parallel_size": 2},
     ["async_scheduling needs tensor_parallel_size 1"]),
])
def test_bad_arguments_name_the_value(args, words):
    with pytest.raises(ValueError) as e:
        build_app(args)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_integral_floats_from_yaml_are_accepted():
    a = ServeArgs.from_dict({"model": "m", "world_size": 2.0, "max_kv_tokens": 4096.0})
    assert a.world_size == 2 and isinstance(a.world_size, int) and a.max_kv_tokens == 4096


def test_run_checks_the_model_directory_before_starting_ray(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(str(tmp_path / "missing"), blocking=False)
    with pytest.raises(ValueError, match="world_size"):
        run(str(tmp_path), world_size=0, blocking=False)


def test_document_card_shows_progress_only_while_prefilling():
    import numpy as np

    from ringserve.serve.service import Document

    d = Document(id="doc-1", key=None, name=None, token_ids=np.arange(5, dtype=np.int32),
                 created=0, prefill_s=None, status="prefilling")
    assert "progress" not in d.card()
    d.progress = {"state": "running", "phase": "prefill", "done": 3, "total": 32,
                  "unit": "layers", "elapsed_s": 41.5}
    assert d.card()["progress"] == d.progress and d.card()["progress"] is not d.progress
    d.status = "ready"
    assert "progress" not in d.card()


def test_registry_never_takes_a_late_progress_card_over_the_final_one():
    """With several replicas a background prefill republishes its card on every progress
    report, fire and forget; the last report can reach the registry after the "ready" card
    (two calls, no ordering between them). A finished document never goes back to
    "prefilling", so its card can not be stuck there."""
    import asyncio

    from ringserve.serve.registry import DocumentRegistry

    reg = DocumentRegistry.func_or_class()

    async def story():
        await reg.put("d", {"id": "d", "status": "prefilling"}, b"\x01\x00\x00\x00")
        await reg.update("d", {"id": "d", "status": "prefilling", "progress": {"done": 1}})
        assert (await reg.card("d"))["progress"] == {"done": 1}
        await reg.update("d", {"id": "d", "status": "ready"})
        await reg.update("d", {"id": "d", "status": "prefilling", "progress": {"done": 2}})
        assert (await reg.card("d"))["status"] == "ready"
        await reg.delete("d")
        await reg.update("d", {"id": "d", "status": "ready"})
        assert await reg.card("d") is None

    asyncio.run(story())


def test_the_service_passes_the_scheduling_options_only_when_given(tmp_path):
    """The scheduling options reach the engine's constructor as given; left out, the engine
    keeps its own defaults (interleaving: 1 on CUDA, 0 on CPU; async scheduling on with CUDA at
    world size 1, off elsewhere)."""
    from servehelpers import RecordingLLM
    from ringserve.serve.service import Service

    for extra in ({"interleave_decode_steps": 2, "async_scheduling": True},
                  {"async_scheduling": False, "pipeline_steps": False, "pipeline_depth": 1},
                  {}):
        n = len(RecordingLLM.seen)
        svc = Service(ServeArgs.from_dict({"model": str(tmp_path), "device": "cpu",
                                           "llm_class": "servehelpers:RecordingLLM", **extra}))
        svc._loader.join(30)
        assert len(RecordingLLM.seen) == n + 1 and "records its arguments" in str(svc.load_error)
        kw = RecordingLLM.seen[-1]
        assert kw.get("interleave_decode_steps") == extra.get("interleave_decode_steps")
        assert kw.get("async_scheduling") == extra.get("async_scheduling")
        assert kw.get("pipeline_steps") == extra.get("pipeline_steps")
        assert kw.get("pipeline_depth") == extra.get("pipeline_depth")
        assert kw["max_num_seqs"] == 64
        svc.shutdown()
