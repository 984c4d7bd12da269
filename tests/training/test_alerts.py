"""Training alerts (nemo_viper.training.alerts): each fires on a crafted metrics history, at the step it began
and on the metric that shows it, and stays silent on a healthy history; the monitor logs each alert once."""

from __future__ import annotations

import logging

import pytest

from nemo_viper.errors import ConfigError
from nemo_viper.training.alerts import AlertConfig, detect_alerts
from nemo_viper.training.monitor import StageMonitor
from nemo_viper.training.trackers import LoggerConfig

STEPS = 10


def healthy(step: int) -> dict:
    """A run that learns: reward and all its parts rise, entropy decays slowly, little clipping."""
    t = step / STEPS
    return {"step": step, "reward/mean": 0.3 + 0.3 * t, "reward/format": 0.8 + 0.15 * t,
            "reward/correctness": 0.3 + 0.3 * t, "reward/precision": 0.4 + 0.2 * t, "reward/recall": 0.3 + 0.3 * t,
            "reward/precision_recall_gap": 0.1 - 0.1 * t, "train/entropy": 2.0 - 0.8 * t,
            "train/clip_frac_low": 0.02, "train/clip_frac_high": 0.03, "rollout/logprob_diff_mean": 0.01,
            "response/truncated_fraction": 0.05}


def history(**changes) -> list[dict]:
    """The healthy history with ``changes[key](step)`` replacing a metric from the step it returns a value."""
    records = []
    for step in range(1, STEPS + 1):
        record = healthy(step)
        for key, change in changes.items():
            value = change(step)
            if value is not None:
                record[key.replace("__", "/")] = value
        records.append(record)
    return records


def detect(records, **config):
    return [(a.kind, a.metric, a.step) for a in detect_alerts(records, AlertConfig(**config), 0.5)]


def test_a_healthy_run_raises_no_alert():
    assert detect(history()) == []


def test_a_reward_part_falling_while_the_total_rises():
    # stage 2 of the embedded default: format collapses from step 5 while the mean reward keeps climbing
    records = history(reward__format=lambda s: 0.9 if s < 5 else 0.9 - 0.2 * (s - 4))
    assert detect(records) == [("part_falls", "reward/format", 5)]
    # the same fall while the total falls too is a failing run, not a trade
    falling_total = history(reward__format=lambda s: 0.9 if s < 5 else 0.9 - 0.2 * (s - 4),
                            reward__mean=lambda s: 0.6 - 0.03 * s)
    assert detect(falling_total) == []
    assert detect(records, part_drop=2.0) == []  # the threshold is the config's


def test_precision_far_above_recall():
    records = history(reward__precision_recall_gap=lambda s: 0.7 if s >= 6 else None)
    assert detect(records) == [("precision_over_recall", "reward/precision_recall_gap", 6)]
    assert detect_alerts(records, AlertConfig(), precision_recall_gap=0.8) == []


def test_entropy_collapse():
    records = history(train__entropy=lambda s: 2.0 if s < 7 else 0.3)
    assert detect(records) == [("entropy_collapse", "train/entropy", 7)]
    assert detect(records, entropy_fraction=0.1) == []


def test_clip_fractions_and_logprob_mismatch_over_their_thresholds():
    records = history(train__clip_frac_high=lambda s: 0.35 if s >= 3 else None,
                      rollout__logprob_diff_mean=lambda s: 0.9 if s >= 8 else None)
    assert detect(records) == [("clipping", "train/clip_frac_high", 3),
                               ("logprob_mismatch", "rollout/logprob_diff_mean", 8)]
    assert detect(records, clip_frac_max=0.4, logprob_diff_max=1.0) == []


def test_a_growing_truncated_fraction():
    records = history(response__truncated_fraction=lambda s: 0.05 if s < 6 else 0.15 * (s - 4))
    assert detect(records) == [("truncation_grows", "response/truncated_fraction", 6)]
    steady = history(response__truncated_fraction=lambda s: 0.4)  # high but not growing: not this alert
    assert detect(steady) == []


def test_thresholds_are_validated():
    with pytest.raises(ConfigError, match="window=1"):
        AlertConfig(window=1)
    with pytest.raises(ConfigError, match="entropy_fraction=1.5"):
        AlertConfig(entropy_fraction=1.5)


def test_the_monitor_logs_each_alert_once_as_it_shows(tmp_path, caplog):
    monitor = StageMonitor(LoggerConfig(), tmp_path)
    records = history(train__clip_frac_low=lambda s: 0.5 if s >= 4 else None)
    with caplog.at_level(logging.WARNING, logger="nemo_viper.training.monitor"):
        for record in records:
            step = record.pop("step")
            monitor.after_step(step, record, [])
            if step == 3:
                assert caplog.records == []
    assert [r.getMessage() for r in caplog.records] == [
        "alert at step 4: train/clip_frac_low 0.500 > 0.2 from step 4: updates leave the trust region (lower the "
        "lr, or more minibatches)"]
