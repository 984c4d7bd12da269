"""Sampler-vs-trainer log-prob mismatch and truncated importance weights."""

import math

import pytest
import torch

from nemo_viper.algorithms import logprob_mismatch, truncated_importance_weights
from nemo_viper.runtime.metrics import Metric, Reduce


def test_mismatch_counts_only_response_tokens():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    sampler = torch.tensor([[-1.5, -2.0, -1.0], [-0.25, -0.5, -9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    mismatch = logprob_mismatch(trainer, sampler, mask)
    assert {k: m.value for k, m in mismatch.items()} == pytest.approx({"mean": (0.5 + 0 + 0.25 + 0) / 4, "max": 0.5})
    assert {k: m.reduce for k, m in mismatch.items()} == {"mean": Reduce.MEAN, "max": Reduce.MAX}
    assert logprob_mismatch(trainer, sampler, torch.zeros_like(mask)) == {"mean": Metric.mean(0.0), "max": Metric.max(0.0)}


def test_truncated_importance_weights_are_capped_ratios_and_zero_off_mask():
    trainer = torch.tensor([[-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-1.0, -2.0, -0.5]])
    mask = torch.tensor([[True, True, False]])
    weights = truncated_importance_weights(trainer, sampler, mask, cap=2.0)
    assert weights[0].tolist() == pytest.approx([1.0, 2.0, 0.0])  # e^1 = 2.72 capped at 2
    assert truncated_importance_weights(trainer, sampler, mask, cap=5.0)[0, 1].item() == pytest.approx(math.e)
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(trainer, sampler, mask, cap=0.0)
