"""Training alerts from a stage's metrics history (``metrics.jsonl`` records): what a practitioner watches for.

Each detector scans the history step by step and reports the first step where its condition holds, the
metric that shows it and the value. Trends are measured over ``window`` steps as the mean of the window's
second half minus the mean of its first half (robust to one noisy step); a trend alert's ``step`` is where
the move began in the first window that shows it (the step after the window's last peak or trough), a
threshold alert's the first step over it.

- ``part_falls``: a reward part (format, correctness, precision, recall) falls by more than ``part_drop``
  while ``reward/mean`` rises: the policy trades that part for the others (a low-weight format reward
  dropped for correctness, say);
- ``precision_over_recall``: mean precision exceeds mean recall by more than the reward's ``alert_gap``
  (answers that state few, safe facts);
- ``entropy_collapse``: ``train/entropy`` below ``entropy_fraction`` of its first value;
- ``clipping``: ``train/clip_frac_low`` or ``train/clip_frac_high`` above ``clip_frac_max``;
- ``logprob_mismatch``: ``rollout/logprob_diff_mean`` (sampler against trainer log-probs) above
  ``logprob_diff_max``;
- ``truncation_grows``: ``response/truncated_fraction`` rises by more than ``truncated_rise``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from nemo_viper.errors import ConfigError

REWARD_PARTS = ("reward/format", "reward/correctness", "reward/precision", "reward/recall")


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds of the alerts (the run config's ``logger.alerts``); the precision/recall gap is the
    reward's ``reward.alert_gap``."""

    window: int = 4
    part_drop: float = 0.2
    entropy_fraction: float = 0.2
    clip_frac_max: float = 0.2
    logprob_diff_max: float = 0.5
    truncated_rise: float = 0.2

    def __post_init__(self):
        if self.window < 2:
            raise ConfigError(f"window={self.window} must be >= 2 (a trend needs two halves)")
        for key in ("part_drop", "clip_frac_max", "logprob_diff_max", "truncated_rise"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be > 0")
        if not 0 < self.entropy_fraction < 1:
            raise ConfigError(f"entropy_fraction={self.entropy_fraction} must lie in (0, 1)")


@dataclass(frozen=True)
class Alert:
    kind: str
    metric: str
    step: int  # the step where it began
    message: str


def _series(history: Sequence[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in history if key in r]


def _trend(values: Sequence[float]) -> float:
    """Mean of the second half minus mean of the first half."""
    half = len(values) // 2
    return sum(values[-half:]) / half - sum(values[:half]) / half


def _first_trend(history: Sequence[dict], key: str, window: int, holds, rising: bool) -> tuple[int, float] | None:
    """``(onset, trend)`` of the first ``window``-step window where ``holds(trend, last step)``; the onset is the
    step after the window's last minimum (``rising``) or maximum (falling): where the move began."""
    series = _series(history, key)
    for end in range(window, len(series) + 1):
        chunk = series[end - window:end]
        values = [v for _, v in chunk]
        change = _trend(values)
        if holds(change, chunk[-1][0]):
            extreme = min(values) if rising else max(values)
            last = max(i for i, v in enumerate(values) if v == extreme)
            return chunk[min(last + 1, window - 1)][0], change
    return None


def _first_above(history: Sequence[dict], key: str, limit: float) -> tuple[int, float] | None:
    return next(((step, value) for step, value in _series(history, key) if value > limit), None)


def detect_alerts(history: Sequence[dict], config: AlertConfig, precision_recall_gap: float) -> list[Alert]:
    """Every alert the history shows (at most one per kind and metric), in the order of the module docstring."""
    alerts = []
    window = config.window
    totals = dict(_series(history, "reward/mean"))
    for part in REWARD_PARTS:
        def falls_while_total_rises(change: float, end: int, part=part) -> bool:
            steps = [s for s, _ in _series(history, part) if s <= end][-window:]
            total = [totals[s] for s in steps if s in totals]
            return change < -config.part_drop and len(total) == window and _trend(total) > 0
        found = _first_trend(history, part, window, falls_while_total_rises, rising=False)
        if found:
            alerts.append(Alert("part_falls", part, found[0],
                                f"{part} fell by {-found[1]:.2f} over {window} steps from step {found[0]} while "
                                "reward/mean rose: the policy trades this part of the reward for the others"))
    found = _first_above(history, "reward/precision_recall_gap", precision_recall_gap)
    if found:
        alerts.append(Alert("precision_over_recall", "reward/precision_recall_gap", found[0],
                            f"mean precision exceeds mean recall by {found[1]:.2f} (> {precision_recall_gap}) from "
                            f"step {found[0]}: answers may state few, safe facts (reward.mode=f1, "
                            "reward.min_coverage)"))
    entropy = _series(history, "train/entropy")
    if entropy and entropy[0][1] > 0:
        floor = config.entropy_fraction * entropy[0][1]
        found = next(((s, v) for s, v in entropy if v < floor), None)
        if found:
            alerts.append(Alert("entropy_collapse", "train/entropy", found[0],
                                f"train/entropy {found[1]:.3g} at step {found[0]} is below {config.entropy_fraction} "
                                f"of its first value {entropy[0][1]:.3g}: the policy is collapsing onto few answers"))
    for key in ("train/clip_frac_low", "train/clip_frac_high"):
        found = _first_above(history, key, config.clip_frac_max)
        if found:
            alerts.append(Alert("clipping", key, found[0],
                                f"{key} {found[1]:.3f} > {config.clip_frac_max} from step {found[0]}: updates leave "
                                "the trust region (lower the lr, or more minibatches)"))
    found = _first_above(history, "rollout/logprob_diff_mean", config.logprob_diff_max)
    if found:
        alerts.append(Alert("logprob_mismatch", "rollout/logprob_diff_mean", found[0],
                            f"rollout/logprob_diff_mean {found[1]:.3f} > {config.logprob_diff_max} from step "
                            f"{found[0]}: the sampler's log-probs disagree with the trainer's "
                            "(rl.grpo.importance_sampling_cap)"))
    found = _first_trend(history, "response/truncated_fraction", window,
                         lambda change, end: change > config.truncated_rise, rising=True)
    if found:
        alerts.append(Alert("truncation_grows", "response/truncated_fraction", found[0],
                            f"response/truncated_fraction rose by {found[1]:.2f} over {window} steps from step "
                            f"{found[0]}: answers run into max_new_tokens (truncated ones score 0)"))
    return alerts
