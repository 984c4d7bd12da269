"""Shared fixtures. Megatron runs in subprocesses (see launch.py): CPU mode patches process-wide state.

On a GPU machine the suite runs as in CI: worker subprocesses see no GPU unless a test asks for one
(``launch.run_ranks(..., gpu=True)``), tests marked ``cpu`` (assertions about CPU mode in this process)
are skipped, and tests marked ``gpu`` run (they are skipped where CUDA is not available).
"""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
# CUDA is decided for this process now; subprocesses (workers, CLI runs) see no GPU unless a gpu test asks.
CUDA = torch.cuda.is_available()
if CUDA:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["NEMO_VIPER_TEST_GPUS"] = visible if visible is not None else ",".join(map(str, range(torch.cuda.device_count())))
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL HF checkpoint written by the project's own builder."""
    from nemo_viper.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")


def pytest_collection_modifyitems(config, items):
    cuda = CUDA
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_cpu = pytest.mark.skip(reason="asserts CPU-only behaviour; CUDA is visible here")
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
        if "cpu" in item.keywords and cuda:
            item.add_marker(skip_cpu)
