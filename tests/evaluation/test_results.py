"""Summaries, the comparison table with deltas, and the drop guard (pure functions)."""

import pytest

from nemo_viper.errors import ConfigError, EvalGuardStop
from nemo_viper.evaluation.benchmarks import TASKS
from nemo_viper.evaluation.results import check_drop, comparison_markdown, summarise, write_comparison


def _files(scores: dict[str, float]) -> dict:
    """Per-task files as lmms-eval writes them (fractions; HallusionBench's three metrics)."""
    metric = {"mmstar": "average,none", "realworldqa": "exact_match,none", "mmerealworld": "mme_realworld_score,none",
              "blink": "blink_acc,none", "mantis": "mantis_score,none", "crpe_relation": "exact_match,flexible-extract"}
    files = {}
    for task, score in scores.items():
        if task == "hallusion_bench_image":
            values = {"aAcc,none": score / 100 - 0.1, "fAcc,none": score / 100, "qAcc,none": score / 100 + 0.1}
        else:
            values = {metric[task]: score / 100, "alias": task}
        files[task] = {"results": {task: values}}
    return files


def test_summary_average_and_hallusion_mean():
    scores = dict(zip(TASKS, (50.0, 60.0, 40.0, 55.0, 70.0, 45.0, 65.0)))
    summary = summarise(_files(scores), model="m")
    assert summary["scores"] == pytest.approx(scores)  # HallusionBench: mean of aAcc, fAcc, qAcc
    assert summary["average"] == pytest.approx(55.0) and summary["complete"]
    partial = summarise(_files({"mmstar": 50.0, "blink": 30.0}), model="m")
    assert partial["average"] == pytest.approx(40.0) and not partial["complete"]


def test_comparison_table_deltas_and_plot(tmp_path):
    base = summarise(_files({"mmstar": 55.6, "blink": 50.0}), model="base")
    tuned = summarise(_files({"mmstar": 61.6, "blink": 49.0}), model="viper")
    table = comparison_markdown([("base", base), ("round1", tuned)])
    assert "| MMStar | 55.6 | 61.6 (+6.0) |" in table
    assert "| BLINK | 50.0 | 49.0 (-1.0) |" in table
    assert "| average | 52.8 | 55.3 (+2.5) |" in table
    out = write_comparison([("base", base), ("round1", tuned)], tmp_path)
    assert out.read_text().count("|") > 10 and (tmp_path / "compare.png").stat().st_size > 1000


def test_guard_stops_on_a_drop_beyond_the_threshold():
    before = summarise(_files({"mmstar": 60.0, "blink": 50.0}), model="a")
    assert check_drop(before, summarise(_files({"mmstar": 59.5, "blink": 50.0}), model="b"), 1.0) == pytest.approx(-0.25)
    with pytest.raises(EvalGuardStop, match="dropped"):
        check_drop(before, summarise(_files({"mmstar": 56.0, "blink": 50.0}), model="c"), 1.0)
    with pytest.raises(ConfigError, match="tasks differ"):
        check_drop(before, summarise(_files({"mmstar": 60.0}), model="d"), 1.0)
