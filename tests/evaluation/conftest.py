"""Shared fixtures: the tiny local copies of the seven benchmarks (written once per session)."""

import pytest


@pytest.fixture(scope="session")
def tiny_eval_root(tmp_path_factory):
    from nemo_viper.evaluation.tiny_datasets import write_tiny_datasets

    return write_tiny_datasets(tmp_path_factory.mktemp("eval_data"))
