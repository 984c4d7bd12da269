"""A task result is reused only for the same model content, backend, decoding settings, limit and data."""

import json
import shutil

import datasets
import pytest

from nemo_viper.errors import ConfigError
from nemo_viper.evaluation.harness import EvalConfig, collect, evaluate
from nemo_viper.evaluation.provenance import DigestCache
from tests.evaluation.scripted_model import ScriptedModel, UnusableModel


def _run(model, out, root, model_object, **kwargs):
    return evaluate(EvalConfig(model=str(model), out=str(out), dataset_root=str(root), tasks=("realworldqa",),
                               **kwargs), model=model_object)


def test_a_rerun_into_the_same_out_recomputes_for_another_model_limit_or_dataset(tiny_eval_root, tmp_path,
                                                                                    model_dir):
    out = tmp_path / "out"
    base = model_dir("base", b"random weights")
    assert _run(base, out, tiny_eval_root, ScriptedModel(lambda doc_id: False))["scores"] == {"realworldqa": 0.0}
    # another model into the same --out (the stale-label case: it was reported with the first model's 0.0)
    trained = model_dir("trained", b"trained weights")
    summary = _run(trained, out, tiny_eval_root, ScriptedModel())
    assert summary["scores"] == {"realworldqa": pytest.approx(60.0)} and summary["model"] == str(trained)
    key = summary["runs"]["realworldqa"]
    assert key["model_sha256"] == DigestCache(tmp_path / "c.json").tree_digest(trained)
    assert key["backend"] == "qwen2_5_vl" and key["limit"] is None and len(key["dataset_sha256"]) == 64
    assert json.loads((out / "results.json").read_text())["runs"]["realworldqa"] == key
    # the same content at another path is the same model: reused
    moved = shutil.copytree(trained, tmp_path / "moved")
    assert _run(moved, out, tiny_eval_root, UnusableModel())["scores"] == summary["scores"]
    # another limit, another backend's decoding settings, or other data: recomputed
    assert _run(moved, out, tiny_eval_root, ScriptedModel(), limit=2)["scores"] == {"realworldqa": 50.0}
    with pytest.raises(AssertionError, match="recomputed"):
        _run(moved, out, tiny_eval_root, UnusableModel(), limit=2, max_new_tokens=8)
    edited = shutil.copytree(tiny_eval_root, tmp_path / "edited")
    rows = datasets.load_from_disk(str(tiny_eval_root / "realworldqa"))["test"].to_list()
    rows[0]["question"] += " (edited)"
    shutil.rmtree(edited / "realworldqa")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, features=datasets.load_from_disk(
        str(tiny_eval_root / "realworldqa"))["test"].features)}).save_to_disk(str(edited / "realworldqa"))
    changed = _run(moved, out, edited, ScriptedModel(lambda doc_id: True), limit=2)
    assert changed["scores"] == {"realworldqa": 100.0}
    assert changed["runs"]["realworldqa"]["dataset_sha256"] != key["dataset_sha256"]


def test_collect_refuses_task_files_of_different_runs(tiny_eval_root, tmp_path, model_dir):
    out = tmp_path / "out"
    _run(model_dir("a", b"a"), out, tiny_eval_root, ScriptedModel())
    evaluate(EvalConfig(model=str(model_dir("b", b"b")), out=str(out), dataset_root=str(tiny_eval_root),
                        tasks=("crpe_relation",)), model=ScriptedModel())
    assert set(json.loads((out / "results.json").read_text())["scores"]) == {"crpe_relation"}  # a's task left out
    with pytest.raises(ConfigError, match="realworldqa not produced with the model and settings of crpe_relation"):
        collect(out)


def test_a_vllm_result_of_another_vllm_adapter_is_recomputed(tiny_eval_root, tmp_path, model_dir):
    """A vllm result written before the harness gave vLLM qwen2_5_vl's images, stop token and repetition penalty
    (a key without ``vllm_model``) is recomputed; one of the current adapter is reused."""
    from nemo_viper.evaluation.harness import VLLM_MODEL
    from nemo_viper.evaluation.vllm_model import Qwen25VLVLLM

    assert VLLM_MODEL == f"{Qwen25VLVLLM.__module__}.{Qwen25VLVLLM.__qualname__}"  # the class the harness runs
    out, model = tmp_path / "out", model_dir("m", b"weights")
    summary = _run(model, out, tiny_eval_root, ScriptedModel(), backend="vllm", device="cpu")
    assert summary["runs"]["realworldqa"]["generation"]["vllm_model"] == VLLM_MODEL
    assert _run(model, out, tiny_eval_root, UnusableModel(), backend="vllm", device="cpu")["scores"] == \
        summary["scores"]
    task_file = out / "tasks" / "realworldqa.json"
    task = json.loads(task_file.read_text())
    del task["key"]["generation"]["vllm_model"]
    task_file.write_text(json.dumps(task))
    with pytest.raises(AssertionError, match="recomputed"):
        _run(model, out, tiny_eval_root, UnusableModel(), backend="vllm", device="cpu")
