"""Framework-free GRPO-variant maths: group advantages, the clipped policy loss, DAPO filters,
the sampler-vs-trainer log-prob mismatch and its truncated importance-sampling correction.

Only torch is used here; the Megatron training loop wires these into its forward/backward step.
"""

from nemo_viper.algorithms.advantages import AdvantageConfig, group_advantages
from nemo_viper.algorithms.filters import dynamic_sampling_keep, mask_truncated
from nemo_viper.algorithms.off_policy import logprob_mismatch, truncated_importance_weights
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
    "logprob_mismatch",
    "mask_truncated",
    "truncated_importance_weights",
]
