"""Group-relative advantages (GRPO / Dr.GRPO).

Every prompt is answered by a group of ``n ≥ 2`` responses. For response ``i`` in group ``g``::

    mean_g = (1 / n_g) Σ_{j∈g} R_j
    std_g  = sqrt( Σ_{j∈g} (R_j − mean_g)² / (n_g − 1) )          (unbiased, as torch.std)

    A_i = (R_i − mean_g) / (std_g + eps)     normalize_by_std=True   (GRPO; verl/EasyR1 convention)
    A_i =  R_i − mean_g                      normalize_by_std=False  (Dr.GRPO)

A group whose rewards are all exactly equal gets ``A = 0`` exactly (no float round-off residue).
The advantage of a response is broadcast to all its tokens by the policy loss.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch
from torch import Tensor

from nemo_viper.algorithms.config import AdvantageConfig


def group_advantages(
    rewards: Tensor,
    group_index: Tensor,
    config: AdvantageConfig = AdvantageConfig(),
    sample_ids: Sequence[str] | None = None,
) -> Tensor:
    """Per-response advantages ``A`` (float32, shape ``[N]``) from scalar rewards.

    Args:
        rewards: ``[N]`` scalar reward per response (any float dtype; computed in float64).
        group_index: ``[N]`` integer id of each response's group (its prompt index). Groups are
            identified only by this id, never by position; ids need not be contiguous or sorted.
        config: see :class:`AdvantageConfig`.
        sample_ids: optional ``[N]`` names used in error messages.

    Raises:
        ValueError: mismatched lengths, a non-finite reward, or a group with fewer than 2 responses.
    """
    if rewards.dim() != 1 or group_index.dim() != 1:
        raise ValueError(
            f"rewards and group_index must be 1-D, got shapes {tuple(rewards.shape)} and "
            f"{tuple(group_index.shape)}"
        )
    if rewards.numel() != group_index.numel():
        raise ValueError(
            f"rewards has {rewards.numel()} entries but group_index has {group_index.numel()}"
        )
    if sample_ids is not None and len(sample_ids) != rewards.numel():
        raise ValueError(f"sample_ids has {len(sample_ids)} entries but rewards has {rewards.numel()}")
    if group_index.is_floating_point() or group_index.is_complex() or group_index.dtype == torch.bool:
        raise ValueError(f"group_index must be an integer tensor, got {group_index.dtype}")

    r = rewards.to(torch.float64)
    bad = (~torch.isfinite(r)).nonzero().flatten()
    if bad.numel() > 0:
        i = int(bad[0])
        name = f"sample {sample_ids[i]!r}" if sample_ids is not None else f"index {i}"
        raise ValueError(f"non-finite reward {rewards[i].item()} for {name}")

    group_ids, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    small = (counts < 2).nonzero().flatten()
    if small.numel() > 0:
        g = int(small[0])
        raise ValueError(
            f"group {int(group_ids[g])} has {int(counts[g])} response(s); every group needs at least 2"
        )

    num_groups = group_ids.numel()
    n = counts.to(torch.float64)
    mean = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, r) / n
    centred = r - mean[inverse]
    # Exactly constant groups: sum/n can differ from the common value by one ulp; force A = 0.
    high = torch.full_like(mean, -torch.inf).scatter_reduce_(0, inverse, r, reduce="amax")
    low = torch.full_like(mean, torch.inf).scatter_reduce_(0, inverse, r, reduce="amin")
    centred = torch.where((high == low)[inverse], torch.zeros_like(centred), centred)

    if config.normalize_by_std:
        sq = torch.zeros_like(mean).index_add_(0, inverse, centred * centred)
        std = torch.sqrt(sq / (n - 1))
        centred = centred / (std[inverse] + config.eps)
    return centred.to(torch.float32)
