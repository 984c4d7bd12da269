"""The held-out split: deterministic, independent of order, count/fraction, never everything."""

import pytest

from nemo_viper.errors import ConfigError
from nemo_viper.evaluation.heldout import HeldoutConfig, heldout_indices, mean_breakdown
from nemo_viper.rewards import RewardBreakdown


def test_split_depends_on_ids_only():
    ids = [f"sample-{i}" for i in range(50)]
    chosen = {ids[i] for i in heldout_indices(ids, HeldoutConfig(count=5))}
    shuffled = ids[::-1]
    assert {shuffled[i] for i in heldout_indices(shuffled, HeldoutConfig(count=5))} == chosen
    assert len(chosen) == 5
    assert {ids[i] for i in heldout_indices(ids, HeldoutConfig(count=5, seed=1))} != chosen
    assert len(heldout_indices(ids, HeldoutConfig(fraction=0.1))) == 5


def test_split_leaves_data_to_train_on_and_can_be_off():
    assert heldout_indices(["a", "b", "c"], HeldoutConfig(count=10)) != [0, 1, 2]
    assert len(heldout_indices(["a", "b", "c"], HeldoutConfig(count=10))) == 2
    assert heldout_indices(["a", "b"], HeldoutConfig()) == [] and not HeldoutConfig().enabled
    with pytest.raises(ConfigError, match="fraction=1.0"):
        HeldoutConfig(fraction=1.0)


def test_mean_breakdown():
    rewards = [RewardBreakdown(total=1.0, format=1.0, correctness=1.0, precision=1.0, recall=0.5, num_answer_sentences=1),
               RewardBreakdown(total=0.0, format=0.0, correctness=0.0, precision=0.0, recall=0.0, num_answer_sentences=0)]
    assert mean_breakdown(rewards) == {"total": 0.5, "format": 0.5, "correctness": 0.5, "recall": 0.25}
