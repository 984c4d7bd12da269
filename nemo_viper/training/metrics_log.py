"""Per-step training metrics to ``metrics.jsonl`` and TensorBoard (rank 0 writes).

On resume from step ``s``, records of steps after ``s`` (written before the interruption, after the
last checkpoint) are dropped from the JSONL file and purged from TensorBoard, so every step appears once.
A restart at step 0 over earlier rows (no complete checkpoint was left) is said in one warning, and the
earlier file is kept as ``metrics.before-restart-<time>.jsonl``.
A torn last line (the job died, or its node crashed, in the middle of appending it) is dropped with a
warning; a damaged line before the last one is an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from nemo_viper.errors import NemoViperError

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[tuple[str, dict]]:
    """``(line, record)`` of every complete record of a ``metrics.jsonl``; a torn last line is left out
    (with a warning). A line before the last that is not a JSON record is a :class:`NemoViperError`."""
    path = Path(path)
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # tail: what follows the last newline ("" when none)
    records = []
    for number, line in enumerate(complete, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise NemoViperError(f"{path}:{number} is not a metrics record: {line[:80]!r}")
        records.append((line, record))
    if tail:
        log.warning("%s ends with a torn line (%d bytes: %r...), left out", path, len(tail), tail[:40])
    return records


class MetricsLogger:
    def __init__(self, run_dir: str | Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            records = read_metrics(self.path)
            if resume_step == 0 and records:  # no complete checkpoint was left: keep what the earlier run logged
                aside = self.path.with_name(f"metrics.before-restart-{time.strftime('%Y%m%dT%H%M%S')}.jsonl")
                os.replace(self.path, aside)
                log.warning("%s: no complete checkpoint to resume from, training restarts at step 0; the %d rows "
                            "logged before (steps %d-%d) are kept in %s", run_dir, len(records),
                            records[0][1]["step"], records[-1][1]["step"], aside)
                records = []
            kept = [line for line, record in records if record["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
