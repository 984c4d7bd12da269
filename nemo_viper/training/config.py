"""Settings of an RL stage, torch-free (the launcher validates a run config with them): the run config's
``rl`` section (:class:`RLConfig`, read by :mod:`nemo_viper.training.loop`) and its update settings
``rl.grpo`` (:class:`GRPOConfig`, read by :mod:`nemo_viper.training.grpo`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nemo_viper.algorithms.config import AdvantageConfig, PolicyLossConfig
from nemo_viper.data.image_config import BACKENDS as IMAGE_BACKENDS
from nemo_viper.data.image_config import ImageProcessingConfig
from nemo_viper.errors import ConfigError
from nemo_viper.models.config import OptimizerSettings
from nemo_viper.rollout.config import SamplingParams


@dataclass(frozen=True)
class GRPOConfig:
    """Update settings (the run config's ``rl.grpo`` section).

    ``num_minibatches`` optimizer updates per rollout batch (SPEC: 512/128 = 4), each split into
    micro-batches of ``micro_batch_size`` rows. ``dynamic_sampling`` (DAPO) masks out groups whose rewards
    are all equal (the loop refills the batch first, see :mod:`nemo_viper.training.loop`);
    ``overlong_filtering`` (DAPO) masks out responses cut at the length limit. ``advantage.normalize_by_std
    = false`` is Dr.GRPO; ``loss.dual_clip_c`` the dual clip; ``loss.kl_beta > 0`` adds the KL penalty to a
    frozen reference policy, which is then loaded (the starting policy of the stage).
    ``importance_sampling_cap``: ``None`` (default) trains on the samples as if ``pi_old`` drew them; a
    value ``C`` weights each token's advantage by ``min(pi_old / pi_sampler, C)`` (truncated importance
    sampling against the generation backend's log-probs, e.g. vLLM's).
    """

    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    num_minibatches: int = 4
    micro_batch_size: int = 4
    dynamic_sampling: bool = False
    overlong_filtering: bool = False
    importance_sampling_cap: float | None = None

    def __post_init__(self):
        for key in ("num_minibatches", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.importance_sampling_cap is not None and not self.importance_sampling_cap > 0:
            raise ConfigError(f"importance_sampling_cap={self.importance_sampling_cap} must be > 0 (or None: off)")


MIN_IMAGE_PIXELS = 28 * 28
"""The smallest pixel budget of an image: one merged 2 x 2 block of Qwen's 14-pixel patches."""


@dataclass(frozen=True)
class RLConfig:
    """One RL stage's settings: the run config's ``rl`` section (the paper's defaults; both stages alike).

    - ``prompts_per_step``: prompts per rollout step over *all* data-parallel ranks (each draws its share);
      ``n`` responses each (GRPO group size, >= 2).
    - ``sampling``: how responses are drawn; ``sampling.seed`` is the stage's seed (request streams, prompt
      order, generator); the update's log-probs are taken at ``sampling.temperature``.
    - ``grpo``: the update (:class:`~nemo_viper.training.config.GRPOConfig`).
    - ``max_sampling_tries``: with ``grpo.dynamic_sampling``, rollout rounds per step at most: after a round,
      while some rank holds fewer than its share of groups with a reward spread, every rank draws its share
      of prompts again (refill); what is still missing after the last round is filled with equal-reward
      groups, which the update masks out.
    - ``save_every``/``keep_last``: checkpoint period and how many checkpoints are kept.
    - ``image_backend``, ``prefetch_prompts``: the stage's data path (image preprocessing backend, prompts
      prepared ahead per rank).
    - ``min_pixels``/``max_pixels``: the pixel budget of every RL image (prompts, rollouts and training),
      whatever the checkpoint's processor says: Qwen's resize keeps each image's pixel count in this range
      (defaults: :class:`~nemo_viper.data.image_config.ImageProcessingConfig`'s, synthesis's cap).
    """

    steps: int = 200
    prompts_per_step: int = 512
    n: int = 5
    save_every: int = 50
    keep_last: int = 2
    max_sampling_tries: int = 3
    image_backend: str = "auto"
    prefetch_prompts: int = 16
    min_pixels: int = ImageProcessingConfig.min_pixels
    max_pixels: int = ImageProcessingConfig.max_pixels
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=1024, seed=0))
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def __post_init__(self):
        for key in ("steps", "prompts_per_step", "save_every", "keep_last", "max_sampling_tries", "prefetch_prompts"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.n < 2:
            raise ConfigError(f"n={self.n} must be >= 2 (a GRPO group needs 2 responses for an advantage)")
        if self.sampling.seed is None:
            raise ConfigError("sampling.seed=None: an RL stage needs a seed (it seeds requests and prompt order)")
        if self.image_backend not in IMAGE_BACKENDS:
            raise ConfigError(f"image_backend={self.image_backend!r} is not one of {IMAGE_BACKENDS}")
        if not MIN_IMAGE_PIXELS <= self.min_pixels <= self.max_pixels:
            raise ConfigError(f"min_pixels={self.min_pixels} must be >= {MIN_IMAGE_PIXELS} and <= max_pixels="
                              f"{self.max_pixels}")

    def prompts_per_rank(self, data_parallel: int) -> int:
        """Each data-parallel rank's share of ``prompts_per_step``."""
        if self.prompts_per_step % data_parallel:
            raise ConfigError(f"prompts_per_step={self.prompts_per_step} is not divisible by the data-parallel "
                              f"size {data_parallel}")
        return self.prompts_per_step // data_parallel
