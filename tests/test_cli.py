"""The `ringserve` command line: dispatch, help, and argument errors before anything starts."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ringserve import cli


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ringserve.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_unknown_command_lists_the_commands():
    r = _run("nonsense")
    assert r.returncode == 2
    for name in cli.COMMANDS:
        assert name in r.stdout


def test_serve_help_documents_the_options():
    r = _run("serve", "--help")
    assert r.returncode == 0
    for opt in ("--model", "--world-size", "--layout", "--max-num-seqs", "--max-num-batched-tokens",
                "--api-key", "--transport-timeout-s", "--cuda-graphs", "--fused-kernels",
                "--interleave-decode-steps", "--async-scheduling", "--pipeline-steps"):
        assert opt in r.stdout


def test_serve_passes_the_graph_and_kernel_switches_only_when_given(monkeypatch, tmp_path):
    import ringserve.serve

    got = []
    monkeypatch.setattr(ringserve.serve, "run", lambda model, **kw: got.append(kw))
    cli.main(["serve", "--model", str(tmp_path), "--cuda-graphs", "off",
              "--fused-kernels", "on", "--interleave-decode-steps", "2",
              "--async-scheduling"])
    cli.main(["serve", "--model", str(tmp_path)])
    cli.main(["serve", "--model", str(tmp_path), "--no-async-scheduling",
              "--no-pipeline-steps", "--pipeline-depth", "3"])
    assert (got[0]["cuda_graphs"], got[0]["fused_kernels"]) == (False, True)
    assert got[0]["interleave_decode_steps"] == 2 and got[0]["async_scheduling"] is True
    assert got[2]["async_scheduling"] is False and got[2]["pipeline_steps"] is False
    assert got[2]["pipeline_depth"] == 3
    for opt in ("cuda_graphs", "fused_kernels", "interleave_decode_steps", "async_scheduling",
                "pipeline_steps", "pipeline_depth"):
        assert opt not in got[1]   # the engine's defaults


def test_serve_with_a_missing_model_fails_clearly(tmp_path):
    missing = tmp_path / "no-such-model"
    r = _run("serve", "--model", str(missing), "--world-size", "2")
    assert r.returncode == 2
    assert "no-such-model" in r.stderr and "Traceback" not in r.stderr


def test_serve_rejects_a_bad_world_size(tmp_path):
    r = _run("serve", "--model", str(tmp_path), "--world-size", "0")
    assert r.returncode == 2
    assert "world_size" in r.stderr and "Traceback" not in r.stderr


def test_make_demo_model_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["make-demo-model", str(out)]) == 0
    from ringserve.config import ModelConfig
    from ringserve.tokenizer import Tokenizer

    cfg = ModelConfig.from_dir(out)
    tok = Tokenizer.from_dir(out)
    ids = tok.encode("The master of the ship")
    assert ids and max(ids) < cfg.vocab_size
    assert tok.decode(ids, skip_special_tokens=True).strip() == "The master of the ship"


@pytest.mark.parametrize("argv", [["demo", "--doc-tokens", "3"], ["demo", "--world-size", "x"]])
def test_demo_rejects_bad_arguments(argv):
    r = _run(*argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr
