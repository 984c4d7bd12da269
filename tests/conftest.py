"""Shared fixtures. Megatron runs in subprocesses (see launch.py), each entering CPU mode at its entry point.

On a GPU machine the suite runs as in CI: worker subprocesses see no GPU unless a test asks for one
(``launch.run_ranks(..., gpu=True)``), tests marked ``cpu`` (assertions about CPU mode in this process)
are skipped, and tests marked ``gpu`` run (they are skipped where CUDA is not available).
"""

import os
import shutil
import signal
import time
import uuid

import pytest
import torch
from processes import SESSION_MARKER, orphans

os.environ["HF_HUB_OFFLINE"] = "1"
# CUDA is decided for this process now; subprocesses (workers, CLI runs) see no GPU unless a gpu test asks.
CUDA = torch.cuda.is_available()
if CUDA:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["NEMO_VIPER_TEST_GPUS"] = visible if visible is not None else ",".join(map(str, range(torch.cuda.device_count())))
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Every process this test session starts inherits the marker (children copy os.environ), so leaks are
# recognised by it, never confused with other processes on the machine.
os.environ[SESSION_MARKER] = uuid.uuid4().hex


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite():
    """Fail the session if a process it started is left behind, orphaned (e.g. a killed job's helper)."""
    yield
    deadline = time.monotonic() + 10  # a killed process's children get their parent-death signal promptly
    while (left := orphans()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:  # ours by the session marker: clean up, then report
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "processes outlived the tests that started them: " + "; ".join(
        f"pid {pid} (parent {parent}): {command[:200]}" for pid, (parent, command) in left.items())


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL HF checkpoint written by the project's own builder."""
    from nemo_viper.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="session")
def tiny_bf16_checkpoint(tiny_hf_dir, tmp_path_factory):
    """``(hf_dir, checkpoint)``: the tiny model's weights cast to bf16 (an HF dir saying so) and its policy
    checkpoint from ``convert import`` (one import serves the export and the checkpoint-trust tests; none
    of them writes into it)."""
    import json

    from launch import run_cli
    from safetensors.torch import load_file, save_file

    bf16_hf = tmp_path_factory.mktemp("tiny_bf16") / "hf"
    shutil.copytree(tiny_hf_dir, bf16_hf)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(tiny_hf_dir / "model.safetensors").items()}
    save_file(weights, bf16_hf / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((bf16_hf / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (bf16_hf / "config.json").write_text(json.dumps(config))
    run_cli("convert", "import", "--hf", str(bf16_hf), "--out", str(bf16_hf.parent / "ckpt"))
    return bf16_hf, bf16_hf.parent / "ckpt"


def pytest_collection_modifyitems(config, items):
    cuda = CUDA
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_cpu = pytest.mark.skip(reason="asserts CPU-only behaviour; CUDA is visible here")
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)
        if "cpu" in item.keywords and cuda:
            item.add_marker(skip_cpu)
