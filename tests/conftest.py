"""Shared fixtures. Megatron runs in subprocesses (see launch.py): CPU mode patches process-wide state."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL HF checkpoint written by the project's own builder."""
    from nemo_viper.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf")
