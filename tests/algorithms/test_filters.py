"""DAPO filters: dynamic sampling keep-mask and overlong (truncated) masking."""

import pytest
import torch

from nemo_viper.algorithms import LossNormalizer, dynamic_sampling_keep, mask_truncated


def test_dynamic_sampling_keeps_groups_with_spread():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.3, 0.3, 0.7, 0.9])
    groups = torch.tensor([4, 4, 2, 2, 9, 9, 2, 9])  # interleaved, non-contiguous ids
    keep = dynamic_sampling_keep(rewards, groups)
    # group 4: {1, 0} spread; group 2: {0.5, 0.5, 0.7} spread; group 9: {0.3, 0.3, 0.9} spread.
    assert keep.tolist() == [True] * 8
    rewards[6], rewards[7] = 0.5, 0.3  # groups 2 and 9 become constant
    assert dynamic_sampling_keep(rewards, groups).tolist() == [True, True] + [False] * 6


def test_dynamic_sampling_shape_error():
    with pytest.raises(ValueError, match="equal length"):
        dynamic_sampling_keep(torch.zeros(3), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_mask_truncated_zeroes_rows(dtype):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]).to(dtype)
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.dtype == dtype
    assert out.tolist() == mask.tolist()[:1] + [[0, 0, 0]] + mask.tolist()[2:]
    norm = LossNormalizer.from_masks([out])
    assert (norm.num_tokens, norm.num_sequences) == (3, 2)


def test_mask_truncated_shape_error():
    with pytest.raises(ValueError, match="truncated"):
        mask_truncated(torch.ones(2, 3), torch.tensor([True]))
