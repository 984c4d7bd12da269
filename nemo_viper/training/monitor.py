"""What an RL stage shows while it runs, beside ``metrics.jsonl``: trackers, sample generations, alerts.

After every step (rank 0): the metrics go to the enabled trackers (:mod:`nemo_viper.training.trackers`);
every ``logger.samples_every`` steps the first ``logger.num_samples`` prompts of the step, each with all its
sampled answers and their reward breakdowns, are appended to ``out/samples.jsonl`` (one row per answer) and
sent to the trackers as a table (rows of one write share their ``time``); and every alert of :mod:`nemo_viper.training.alerts` that newly shows in the
stage's history is logged as a warning once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

from nemo_viper.data.task_prompt import prompt_text
from nemo_viper.training.alerts import detect_alerts
from nemo_viper.training.metrics_log import read_metrics
from nemo_viper.training.trackers import LoggerConfig, Trackers

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


def sample_rows(step: int, groups: Sequence, count: int) -> list[dict]:
    """One row per answer of the first ``count`` groups (a prompt with its answers and rewards): the step,
    the sample id (the image's key in the stage's shards), the prompt, the answer and its reward breakdown."""
    rows = []
    for group in groups[:count]:
        prompt = prompt_text(group.prompt.messages)
        for response, reward in zip(group.responses, group.rewards):
            rows.append({"step": step, "sample_id": group.prompt.sample_id, "prompt": prompt,
                         "answer": response.text, "reward": reward.total, "format": reward.format,
                         "correctness": reward.correctness, "precision": reward.precision,
                         "recall": reward.recall, "truncated": bool(response.truncated)})
    return rows


def read_samples(path: str | Path) -> list[dict]:
    """The rows of a ``samples.jsonl``, by step; a step logged again (re-run after a resume) keeps only the
    rows of its last write (rows written together share their ``time``)."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    last = {}
    for row in rows:
        last[row["step"]] = max(last.get(row["step"], row["time"]), row["time"])
    return sorted((row for row in rows if row["time"] == last[row["step"]]), key=lambda row: row["step"])


class StageMonitor:
    """Trackers, samples and alerts of one RL stage; inert on ranks other than 0 (``enabled=False``).

    ``history``: the stage's metrics so far (a resumed stage reads its ``metrics.jsonl``), so alerts that
    already showed are not logged again. ``precision_recall_gap``: the reward's ``alert_gap``.
    """

    def __init__(self, config: LoggerConfig, out: str | Path, run_config: dict | None = None,
                 precision_recall_gap: float = 0.5, enabled: bool = True):
        self.config, self.out, self.enabled = config, Path(out), enabled
        self.precision_recall_gap = precision_recall_gap
        self.trackers = Trackers(config, out, run_config, enabled=enabled)
        self.history = [record for _, record in read_metrics(self.out / "metrics.jsonl")] if enabled else []
        self.alerted = {(a.kind, a.metric) for a in self._alerts()}

    def _alerts(self):
        return detect_alerts(self.history, self.config.alerts, self.precision_recall_gap)

    def after_step(self, step: int, metrics: dict[str, float], groups: Sequence) -> None:
        if not self.enabled:
            return
        self.trackers.log(step, metrics)
        every = self.config.samples_every
        if every and step % every == 0:
            rows = sample_rows(step, groups, self.config.num_samples)
            written = time.time()
            with (self.out / SAMPLES_FILE).open("a") as file:
                file.writelines(json.dumps({**row, "time": written}) + "\n" for row in rows)
            self.trackers.log_samples(step, rows)
        self.history = [r for r in self.history if r["step"] < step] + [{"step": step, **metrics}]
        for alert in self._alerts():
            if (alert.kind, alert.metric) not in self.alerted:
                self.alerted.add((alert.kind, alert.metric))
                log.warning("alert at step %d: %s", step, alert.message)

    def close(self) -> None:
        self.trackers.close()
