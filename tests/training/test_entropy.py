"""The entropy metric (nemo_viper.models.logprobs.vocab_parallel_token_entropy): chunked float32 work gives
the values of the previous full-vocabulary computation, at TP1 and TP2, without full-size temporaries."""

import pytest
import torch
from launch import run_worker


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """TP size -> the worker's values: TP2 and TP1 from one two-rank launch."""
    out = tmp_path_factory.mktemp("entropy") / "entropy.pt"
    run_worker("entropy_parity.py", "--out", str(out), nproc=2)
    return torch.load(out)


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_entropy_equals_the_unchunked_one_without_full_vocabulary_temporaries(results, tp):
    result = results[tp]
    for temperature in (1.0, 0.7):
        values = result[temperature]
        torch.testing.assert_close(values["chunked"], values["unchunked"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(values["chunked"].double(), values["reference"], rtol=0, atol=2e-5)
        # 8 positions x V/TP float32 per chunk, never the whole [B, S-1, V/TP] shard
        assert values["largest_bytes"] <= result["shard_float32_bytes"] / 10
