"""DAPO sample filters: dynamic sampling and overlong filtering."""

from __future__ import annotations

import torch
from torch import Tensor


def dynamic_sampling_keep(rewards: Tensor, group_index: Tensor) -> Tensor:
    """DAPO dynamic sampling: which responses belong to a group with a reward spread.

    A group whose rewards are all exactly equal has zero advantage for every response and gives no
    policy gradient; the trainer drops such groups and refills the batch with new prompts.

    Args:
        rewards: ``[N]`` scalar rewards.
        group_index: ``[N]`` integer group (prompt) id of each response; any ids, any order.

    Returns:
        ``BoolTensor[N]``, per *response*: ``True`` where the response's group has
        ``max(R) > min(R)``. All responses of one group share the same value.
    """
    if rewards.shape != group_index.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_index must be 1-D of equal length, got {tuple(rewards.shape)} and "
            f"{tuple(group_index.shape)}"
        )
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    high = rewards.new_full((num_groups,), -torch.inf).scatter_reduce_(0, inverse, rewards, reduce="amax")
    low = rewards.new_full((num_groups,), torch.inf).scatter_reduce_(0, inverse, rewards, reduce="amin")
    return (high > low)[inverse]


def mask_truncated(mask: Tensor, truncated: Tensor) -> Tensor:
    """DAPO overlong filtering: zero the response mask of responses cut at the length limit.

    A truncated response then contributes neither loss nor gradient, and
    :meth:`~nemo_viper.algorithms.policy_loss.LossNormalizer.from_masks` counts neither its tokens
    nor the sequence. Its reward still takes part in its group's advantage baseline.

    Args:
        mask: ``[B, T]`` response mask (bool or 0/1).
        truncated: ``BoolTensor[B]``, ``True`` for responses that hit the length limit.

    Returns:
        A new mask of ``mask``'s shape and dtype.
    """
    if truncated.shape != mask.shape[:1]:
        raise ValueError(f"truncated must be [B]={mask.shape[0]}, got {tuple(truncated.shape)}")
    return torch.where(truncated.bool()[:, None], torch.zeros_like(mask), mask)
