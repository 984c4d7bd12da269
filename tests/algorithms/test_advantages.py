"""Group advantages: golden values (research/peers.md §4.7), grouping by id, bad input."""

import math

import pytest
import torch

from nemo_viper.algorithms import AdvantageConfig, group_advantages

# peers.md §4.7: R = 0.05·format + 0.95·similarity for one group of G = 4.
REWARDS = [0.829, 0.791, 0.760, 0.430]
VERL = [0.688076, 0.481381, 0.312762, -1.482218]  # unbiased std, eps = 1e-6
TRL = [0.687705, 0.481122, 0.312593, -1.481421]  # unbiased std, eps = 1e-4
DR_GRPO = [0.1265, 0.0885, 0.0575, -0.2725]  # R - mean


def _adv(rewards, groups, **cfg):
    r = torch.tensor(rewards, dtype=torch.float64)
    g = torch.tensor(groups, dtype=torch.long)
    return group_advantages(r, g, AdvantageConfig(**cfg))


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [({}, VERL), ({"eps": 1e-4}, TRL), ({"normalize_by_std": False}, DR_GRPO)],
    ids=["verl", "trl-eps1e-4", "dr-grpo"],
)
def test_golden_group(cfg, expected):
    adv = _adv(REWARDS, [0, 0, 0, 0], **cfg)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)


def test_near_constant_group():
    rewards = [0.9000, 0.9001, 0.9002, 0.9000]
    torch.testing.assert_close(
        _adv(rewards, [3] * 4), torch.tensor([-0.775, 0.258, 1.292, -0.775]), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        _adv(rewards, [3] * 4, eps=1e-4), torch.tensor([-0.383, 0.128, 0.639, -0.383]), atol=1e-3, rtol=0
    )


def test_groups_by_id_not_position():
    # Two groups interleaved, non-contiguous ids; each must match the single-group result.
    other = [0.1, 0.4, 0.7, 0.2]
    rewards = [REWARDS[0], other[0], other[1], REWARDS[1], REWARDS[2], other[2], other[3], REWARDS[3]]
    groups = [17, 5, 5, 17, 17, 5, 5, 17]
    adv = _adv(rewards, groups)
    mine = adv[torch.tensor(groups) == 17]
    torch.testing.assert_close(mine, torch.tensor(VERL), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv[torch.tensor(groups) == 5], _adv(other, [0] * 4))


def test_constant_group_gives_exact_zero():
    adv = _adv([0.1, 0.1, 0.1, 0.3, 0.5], [0, 0, 0, 1, 1])
    assert torch.equal(adv[:3], torch.zeros(3))
    # Group of two: (R - mean) / std = ±1/sqrt(2) before eps.
    torch.testing.assert_close(adv[3:], torch.tensor([-1.0, 1.0]) / math.sqrt(2), atol=1e-5, rtol=0)


def test_float32_input_is_accepted():
    r = torch.tensor(REWARDS, dtype=torch.float32)
    adv = group_advantages(r, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv, torch.tensor(VERL), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_names_sample(bad):
    r = torch.tensor([0.5, bad, 0.2, 0.1])
    g = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="prompt7/resp1"):
        group_advantages(r, g, sample_ids=["prompt7/resp0", "prompt7/resp1", "p8/r0", "p8/r1"])
    with pytest.raises(ValueError, match="index 1"):
        group_advantages(r, g)


def test_singleton_group_is_an_error():
    with pytest.raises(ValueError, match="group 9 has 1 response"):
        group_advantages(torch.tensor([0.5, 0.2, 0.1]), torch.tensor([0, 0, 9]))


def test_mismatched_lengths_is_an_error():
    with pytest.raises(ValueError, match="rewards has 3 entries but group_index has 4"):
        group_advantages(torch.tensor([0.5, 0.2, 0.1]), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="sample_ids"):
        group_advantages(torch.tensor([0.5, 0.2]), torch.tensor([0, 0]), sample_ids=["a"])


def test_float_group_index_is_an_error():
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.tensor([0.5, 0.2]), torch.tensor([0.0, 0.0]))


@pytest.mark.parametrize("eps", [0.0, -1e-6])
def test_bad_eps_is_an_error(eps):
    with pytest.raises(ValueError, match="eps"):
        AdvantageConfig(eps=eps)
