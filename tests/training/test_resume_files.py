"""Resume reads what a killed job left: a torn ``metrics.jsonl`` tail, a ``latest`` pointer to nothing."""

import json
import logging

import pytest

from nemo_viper.errors import NemoViperError
from nemo_viper.models.checkpoint_dir import METADATA_FILE, latest_checkpoint, resolve_checkpoint
from nemo_viper.training.metrics_log import MetricsLogger, read_metrics


def records(*steps):
    return "".join(json.dumps({"step": s, "reward/mean": s / 10}) + "\n" for s in steps)


def test_a_torn_last_line_is_dropped_with_a_warning_and_truncated_on_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(records(1, 2, 3) + '{"step": 4, "reward/m')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for _, r in read_metrics(path)] == [1, 2, 3]
    assert "ends with a torn line (21 bytes" in caplog.text
    MetricsLogger(tmp_path, resume_step=2).close()
    assert path.read_text() == records(1, 2)  # torn tail and steps after the checkpoint gone
    path.write_text(records(1) + "\0\0\0\0")  # a crash that extended the file without its data
    assert [r["step"] for _, r in read_metrics(path)] == [1]


def test_a_damaged_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(records(1) + "garbage\n" + records(3))
    with pytest.raises(NemoViperError, match=rf"^{path}:2 is not a metrics record: 'garbage'$"):
        read_metrics(path)


def checkpoint(root, step):
    path = root / f"step_{step:07d}"
    (path / "model").mkdir(parents=True)
    (path / METADATA_FILE).write_text("{}")
    return path


@pytest.mark.parametrize("pointer", ["step_0000009\n", "", "step_00", None, "../../etc\n"])
def test_latest_naming_no_complete_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, caplog, pointer):
    root = tmp_path / "run" / "checkpoints"
    checkpoint(root, 2)
    newest = checkpoint(root, 4)
    (root / "step_0000006" / "model").mkdir(parents=True)  # killed before its metadata: incomplete
    (root / ".step_0000008.partial").mkdir()
    if pointer is not None:
        (root / "latest").write_text(pointer)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(root) == newest
        assert resolve_checkpoint(tmp_path / "run") == newest
    assert "which is not a complete checkpoint; using the newest complete one instead" in caplog.text


def test_latest_is_followed_when_complete_and_nothing_is_none(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    root.mkdir()
    assert latest_checkpoint(root) is None
    older = checkpoint(root, 2)
    checkpoint(root, 4)
    (root / "latest").write_text("step_0000002\n")
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(root) == older
    assert not caplog.text


def test_a_restart_at_step_0_over_earlier_rows_says_so_and_keeps_them(tmp_path, caplog):
    rows = "".join(json.dumps({"step": s, "time": 0.0, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(rows)
    with caplog.at_level(logging.WARNING):
        MetricsLogger(tmp_path, resume_step=0).close()
    [aside] = tmp_path.glob("metrics.before-restart-*.jsonl")
    assert aside.read_text() == rows and read_metrics(tmp_path / "metrics.jsonl") == []
    [line] = [r.getMessage() for r in caplog.records if "restarts at step 0" in r.getMessage()]
    assert "3 rows logged before (steps 1-3) are kept in" in line and "\n" not in line
