"""Summaries, the comparison table with deltas, and the drop guard (pure functions)."""

import pytest

from nemo_viper.errors import ConfigError, EvalGuardStop
from nemo_viper.evaluation.benchmarks import TASKS
from nemo_viper.evaluation.results import (check_drop, comparison_markdown, comparison_rows, summarise,
                                           summary_markdown, write_comparison)


KEY = {"model_sha256": "m" * 64, "backend": "qwen2_5_vl", "limit": None, "dataset_sha256": "d" * 64,
       "lmms_eval_version": "0.7.3", "generation": {"model_args": {"device": "cuda"}, "batch_size": 1,
                                                    "max_new_tokens_cap": None}}


def _files(scores: dict[str, float | None], **key) -> dict:
    """Per-task files as the harness writes them (lmms-eval's fractions; HallusionBench's three metrics; the
    run key with ``key``'s fields replaced; a None score: the metric absent)."""
    metric = {"mmstar": "average,none", "realworldqa": "exact_match,none", "mmerealworld": "mme_realworld_score,none",
              "blink": "blink_acc,none", "mantis": "mantis_score,none", "crpe_relation": "exact_match,flexible-extract"}
    files = {}
    for task, score in scores.items():
        if score is None:
            values = {"alias": task}
        elif task == "hallusion_bench_image":
            values = {"aAcc,none": score / 100 - 0.1, "fAcc,none": score / 100, "qAcc,none": score / 100 + 0.1}
        else:
            values = {metric[task]: score / 100, "alias": task}
        files[task] = {"results": {task: values}, "model": "m", "key": {**KEY, **key}}
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
    assert "| average of the 2 tasks all have | 52.8 | 55.3 (+2.5) |" in table
    assert "Not like for like" not in table  # same settings, same data, same tasks
    out = write_comparison([("base", base), ("round1", tuned)], tmp_path)
    assert out.read_text().count("|") > 10 and (tmp_path / "compare.png").stat().st_size > 1000


def test_guard_stops_on_a_drop_beyond_the_threshold():
    before = summarise(_files({"mmstar": 60.0, "blink": 50.0}), model="a")
    assert check_drop(before, summarise(_files({"mmstar": 59.5, "blink": 50.0}), model="b"), 1.0) == pytest.approx(-0.25)
    with pytest.raises(EvalGuardStop, match="dropped"):
        check_drop(before, summarise(_files({"mmstar": 56.0, "blink": 50.0}), model="c"), 1.0)
    with pytest.raises(ConfigError, match="tasks differ"):
        check_drop(before, summarise(_files({"mmstar": 60.0}), model="d"), 1.0)


def test_compare_flags_each_difference_and_averages_the_common_tasks():
    base = summarise(_files({"mmstar": 40.0, "blink": 50.0, "mantis": 60.0}), model="base")
    other = summarise(_files({"mmstar": 44.0, "blink": 50.0}, limit=2, backend="vllm", dataset_sha256="e" * 64),
                      model="other")
    table = comparison_markdown([("base", base), ("other", other)])
    assert "| Mantis-Eval | 60.0 | missing |" in table  # not drawn as 0.0, and no delta
    assert "| average of the 2 tasks all have | 45.0 | 47.0 (+2.0) |" in table  # not 50.0 vs 47.0
    notes = table.split("Not like for like:")[1]
    assert "task sets differ: other has no Mantis-Eval" in notes
    assert "document limits differ for MMStar, BLINK (base: none; other: 2)" in notes
    assert "backends differ for MMStar, BLINK (base: qwen2_5_vl; other: vllm)" in notes
    assert f"datasets (dataset_sha256) differ for MMStar, BLINK (base: {'d' * 12}; other: {'e' * 12})" in notes
    assert "the average is over the 2 tasks every result scored" in notes
    assert "decoding settings" not in notes  # equal
    capped = summarise(_files({"mmstar": 40.0, "blink": 50.0}, generation={**KEY["generation"],
                                                                          "max_new_tokens_cap": 8}), model="c")
    assert "decoding settings differ for MMStar, BLINK" in comparison_markdown([("base", base), ("c", capped)])
    assert [v for name, v in comparison_rows([("base", base), ("other", other)]) if name == "MMStar math"] == [
        [None, None]]  # the domain is in both (no question of it in these files): n/a, not missing


def test_results_table_counts_scored_tasks_and_states_only_set_caps():
    files = _files(dict(zip(TASKS, (50.0, 60.0, 40.0, 55.0, 70.0, None, None))))
    files["mmstar"]["key"] = {**KEY, "generation": {**KEY["generation"], "max_new_tokens_cap": 8}}
    files["blink"]["key"] = {**KEY, "limit": 3}
    table = summary_markdown(summarise(files, model="m"))
    assert "| **average of 5 of 7** | **55.0** |" in table
    assert "- MMStar: run with max_new_tokens cap 8 (not comparable to full runs)" in table
    assert "- BLINK: run with limit 3 (not comparable to full runs)" in table and "None" not in table
