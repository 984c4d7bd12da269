"""The seven benchmarks through lmms-eval on tiny local copies in each benchmark's own schema."""

import json
import subprocess
import sys

import pytest

from nemo_viper.evaluation.benchmarks import MMSTAR_DOMAINS, TASKS
from nemo_viper.evaluation.harness import EvalConfig, evaluate


def test_scripted_model_scores_are_exact(tiny_eval_root, tmp_path):
    """Right on even doc ids, wrong on odd: 3 of 5 -> 60.0; BLINK 1 of 2 per subtask -> 50.0; MMStar's six
    sub-domains alternate 100/0 -> average 50.0. Every task decodes greedily (Mantis' sampling overridden)."""
    from tests.evaluation.scripted_model import ScriptedModel

    model = ScriptedModel()
    summary = evaluate(EvalConfig(model="scripted", out=str(tmp_path / "out"), dataset_root=str(tiny_eval_root)),
                       model=model)
    expected = {task: 60.0 for task in TASKS} | {"blink": 50.0, "mmstar": 50.0}
    assert summary["scores"] == pytest.approx(expected)
    assert summary["average"] == pytest.approx(sum(expected.values()) / 7)
    assert summary["complete"]
    assert summary["mmstar_domains"] == pytest.approx(
        {d: 100.0 if i % 2 == 0 else 0.0 for i, d in enumerate(MMSTAR_DOMAINS)})
    for task, settings in model.generation_kwargs.items():
        for kwargs in settings:
            assert not kwargs.get("do_sample") and not kwargs.get("temperature"), (task, kwargs)
    assert set(model.generation_kwargs) >= {"mantis", "hallusion_bench_image", "blink_counting"}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| RealWorldQA | 60.0 |" in table and "rule-based yes/no scorer" in table
    # a rerun finds every task done and only rewrites the summary
    assert evaluate(EvalConfig(model="scripted", out=str(tmp_path / "out"), dataset_root=str(tiny_eval_root)),
                    model=None)["scores"] == summary["scores"]


@pytest.mark.slow
def test_eval_cli_on_tiny_model_scores_every_task(tiny_eval_root, tiny_hf_dir, tmp_path):
    """``nemo-viper eval`` with lmms-eval's qwen2_5_vl model on the tiny checkpoint: a score for all 7 tasks
    (first document of each task and BLINK subtask: the harness, not the tiny model's answers, is under test)."""
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "nemo_viper.cli", "eval", "--model", str(tiny_hf_dir), "--dataset-root",
         str(tiny_eval_root), "--out", str(out), "--device", "cpu", "--max-new-tokens", "4", "--limit", "1",
         "--model-args", "min_pixels=3136,max_pixels=3136"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["scores"]) == set(TASKS)
    assert all(0.0 <= score <= 100.0 for score in summary["scores"].values()), summary["scores"]
    assert summary["runs"]["mmstar"]["max_new_tokens_cap"] == 4 and summary["runs"]["mmstar"]["limit"] == 1
    assert "not comparable to full runs" in (out / "results.md").read_text()


def test_missing_dataset_is_one_line_naming_task_and_path(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nemo_viper.cli", "eval", "--model", str(tmp_path), "--tasks",
                             "realworldqa", "--dataset-root", str(tmp_path / "data"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "realworldqa" in lines[0] and str(tmp_path / "data" / "realworldqa") in lines[0]


def test_unknown_task_is_rejected():
    from nemo_viper.errors import ConfigError
    from nemo_viper.evaluation.benchmarks import parse_tasks

    assert parse_tasks("mmstar, blink") == ("mmstar", "blink")
    with pytest.raises(ConfigError, match="mmbench"):
        parse_tasks("mmstar,mmbench")
