"""Shared fixtures. One local Ray cluster for the whole test session (ray.init costs ~7 s)."""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and (not HAS_CUDA or torch.cuda.device_count() < 2):
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by every test that needs Ray.

    Logical CPUs are over-provisioned (the machine has 2 cores) so that several 1-CPU actors,
    a Serve proxy and controllers fit at once; actors here do little concurrent CPU work.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=int(os.environ.get("RINGSERVE_TEST_CPUS", "8")),
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TRITON_INTERPRET": "1"}})
    yield ray
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
