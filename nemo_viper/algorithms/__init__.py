"""Framework-free GRPO-variant maths: group advantages, the clipped policy loss, DAPO filters.

Only torch is used here; the Megatron training loop wires these into its forward/backward step.
"""

from nemo_viper.algorithms.advantages import AdvantageConfig, group_advantages
from nemo_viper.algorithms.filters import dynamic_sampling_keep, mask_truncated
from nemo_viper.algorithms.policy_loss import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    ClippedPolicyLoss,
    LossNormalizer,
    PolicyLossConfig,
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "AdvantageConfig",
    "ClippedPolicyLoss",
    "LossNormalizer",
    "PolicyLossConfig",
    "dynamic_sampling_keep",
    "group_advantages",
    "mask_truncated",
]
