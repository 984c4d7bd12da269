"""Framework-free GRPO-variant maths: group advantages, the clipped policy loss, DAPO filters,
the sampler-vs-trainer log-prob mismatch and its truncated importance-sampling correction.

The settings (:mod:`~nemo_viper.algorithms.config`) are torch-free; the maths uses only torch. The
Megatron training loop wires these into its forward/backward step.
"""

from nemo_viper.lazy_exports import lazy_getattr

# Each public name -> the submodule defining it; loaded on first access (PEP 562), so that importing
# ``nemo_viper.algorithms.config`` (the launcher) loads no torch.
_SOURCES = {
    "AGGREGATIONS": "config",
    "KL_ESTIMATORS": "config",
    "AdvantageConfig": "config",
    "PolicyLossConfig": "config",
    "group_advantages": "advantages",
    "ClippedPolicyLoss": "policy_loss",
    "LossNormalizer": "policy_loss",
    "dynamic_sampling_keep": "filters",
    "mask_truncated": "filters",
    "logprob_mismatch": "off_policy",
    "truncated_importance_weights": "off_policy",
}

__all__ = sorted(_SOURCES)

__getattr__ = lazy_getattr(__name__, _SOURCES)
