"""Shared fixtures: the tiny local copies of the seven benchmarks (written once per session)."""

import pytest


@pytest.fixture(scope="session")
def tiny_eval_root(tmp_path_factory):
    from nemo_viper.evaluation.tiny_datasets import write_tiny_datasets

    return write_tiny_datasets(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture
def model_dir(tmp_path):
    """``model_dir(name, weights)``: a model dir whose content digest changes with ``weights`` (the scripted
    model answers; the run key hashes these files)."""

    def make(name: str, weights: bytes):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text("{}")
        (path / "model.safetensors").write_bytes(weights)
        return path

    return make
