"""Settings of the GRPO-variant maths (:mod:`~nemo_viper.algorithms.advantages`,
:mod:`~nemo_viper.algorithms.policy_loss`), torch-free: the run config's ``rl.grpo.advantage`` and
``rl.grpo.loss`` sections."""

from __future__ import annotations

from dataclasses import dataclass

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k3")


@dataclass(frozen=True)
class AdvantageConfig:
    """How rewards become advantages.

    Attributes:
        normalize_by_std: divide the centred reward by the group's unbiased std (GRPO); ``False`` is
            Dr.GRPO (``A = R − mean``).
        eps: added to the std before dividing; must be > 0.
    """

    normalize_by_std: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"eps={self.eps} must be > 0")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of :class:`ClippedPolicyLoss`.

    Attributes:
        eps_low, eps_high: ratio clip range ``[1 − eps_low, 1 + eps_high]`` (DAPO clip-higher).
        dual_clip_c: dual-clip bound ``c > 1`` for negative advantages; ``None`` disables it.
        aggregation: one of :data:`AGGREGATIONS` (see module docstring).
        max_response_length: the constant ``L`` of ``seq-mean-token-sum-norm`` (required there; the RL
            trainer uses the sampler's ``max_new_tokens`` when it is ``None``).
        kl_beta: weight of the per-token KL penalty to the reference policy; 0 disables it.
        kl_estimator: ``"k1"`` or ``"k3"``.
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip_c: float | None = None
    aggregation: str = "token-mean"
    max_response_length: int | None = None
    kl_beta: float = 0.0
    kl_estimator: str = "k3"

    def __post_init__(self) -> None:
        for name in ("eps_low", "eps_high"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.eps_low >= 1:
            raise ValueError(f"eps_low={self.eps_low} must be < 1 (clip floor 1 - eps_low > 0)")
        if self.dual_clip_c is not None and not self.dual_clip_c > 1:
            raise ValueError(f"dual_clip_c={self.dual_clip_c} must be > 1, or null (off)")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} is not one of {AGGREGATIONS}")
        if self.max_response_length is not None and self.max_response_length <= 0:
            raise ValueError(f"max_response_length={self.max_response_length} must be > 0, or null")
        if not self.kl_beta >= 0:
            raise ValueError(f"kl_beta={self.kl_beta} must be >= 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} is not one of {KL_ESTIMATORS}")
