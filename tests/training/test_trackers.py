"""W&B (offline) and MLflow (SQLite store) beside metrics.jsonl, for real: what the trackers hold, read back
with each library's own reader, equals metrics.jsonl, across a resume that continues the same tracker runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_viper.data.task_prompt import TaskPrompt
from nemo_viper.rewards import RewardBreakdown
from nemo_viper.rollout.interface import GenerationResponse
from nemo_viper.training.loop import _Group
from nemo_viper.training.metrics_log import MetricsLogger, read_metrics
from nemo_viper.training.monitor import StageMonitor, read_samples
from nemo_viper.training.trackers import LoggerConfig, MLflowConfig, WandbConfig

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def groups(step: int, attempt: int) -> list[_Group]:
    prompt = TaskPrompt(sample_id=f"img{step}", messages=[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe it."}]}])
    responses = [GenerationResponse([1, 2], f"attempt {attempt}: answer {step}.{i}", [0.0, 0.0], "stop") for i in range(2)]
    rewards = [RewardBreakdown(total=0.1 * step + i, format=1.0, correctness=0.5, precision=0.6, recall=0.4,
                               num_answer_sentences=1) for i in range(2)]
    return [_Group(prompt, None, responses, rewards)]


def run_steps(out: Path, config: LoggerConfig, steps: range, resume_step: int) -> None:
    """What run_rl does on rank 0 per step: metrics.jsonl, then the monitor (trackers, samples, alerts)."""
    metrics_log = MetricsLogger(out, resume_step=resume_step)
    monitor = StageMonitor(config, out, run_config={"rl": {"steps": 4, "grpo": {"loss": {"eps_low": 0.2}}},
                                                    "logger": {"wandb": {"tags": ["t"]}}})
    for step in steps:
        metrics = {"reward/mean": 0.1 * step + 0.05 * resume_step, "train/clip_frac_low": 0.01 * step}
        metrics_log.log(step, metrics)
        monitor.after_step(step, metrics, groups(step, resume_step))
    metrics_log.close()
    monitor.close()


def wandb_records(out: Path) -> list[tuple[str, dict]]:
    """``(run id, record)`` of every run / config / history record of the stage's offline W&B runs, in order."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    found = []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found.append(("run", {"id": record.run.run_id,
                                      "config": {u.key for u in record.run.config.update} - {"_wandb"}}))
            elif kind == "history":
                found.append(("history", {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                          for item in record.history.item}))
    return found


@pytest.mark.slow
def test_wandb_offline_and_mlflow_sqlite_hold_metrics_jsonl_across_a_resume(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts in ./mlruns: never in the checkout

    out = tmp_path / "viperrun" / "round1" / "rl2"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = LoggerConfig(wandb_enabled=True, wandb=WandbConfig(project="p", mode="offline", tags=("t",)),
                          mlflow_enabled=True, mlflow=MLflowConfig(experiment_name="exp", tracking_uri=uri,
                                                                   tags={"team": "x"}),
                          samples_every=2, num_samples=1)
    run_steps(out, config, range(1, 4), resume_step=0)  # steps 1-3 logged, then "killed" after step 3
    first_ids = json.loads((out / "trackers.json").read_text())
    run_steps(out, config, range(2, 5), resume_step=1)  # resumed from the step-1 checkpoint: 2 and 3 again, then 4

    assert json.loads((out / "trackers.json").read_text()) == first_ids
    expected = {record["step"]: record for _, record in read_metrics(out / "metrics.jsonl")}
    assert sorted(expected) == [1, 2, 3, 4]

    # MLflow: one run, the same one after the resume; the last value per step is metrics.jsonl's
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "exp"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == first_ids["mlflow"] and run.info.run_name == "viperrun-round1-rl2"
    assert run.data.tags["team"] == "x" and run.data.params["rl.grpo.loss.eps_low"] == "0.2"
    for key in ("reward/mean", "train/clip_frac_low"):
        logged = {m.step: m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                  key=lambda m: m.timestamp)}
        assert logged == pytest.approx({step: record[key] for step, record in expected.items()})
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/step_000002.json", "samples/step_000004.json"}

    # W&B: both offline parts are the same run; the config is logged by the first part only
    records = wandb_records(out)
    runs = [value for kind, value in records if kind == "run"]
    assert [r["id"] for r in runs] == [first_ids["wandb"]] * 2
    assert runs[0]["config"] == {"rl", "logger"} and runs[1]["config"] == set()
    keys = ("reward/mean", "train/clip_frac_low")
    logged = {}
    for kind, value in records:
        if kind == "history" and "reward/mean" in value:
            logged.update({(value["step"], k): value[k] for k in keys})  # the last value per step
    assert logged == pytest.approx({(step, k): r[k] for step, r in expected.items() for k in keys})
    tables = [value["step"] for kind, value in records if kind == "history" and "samples/_type" in value]
    assert tables == [2, 2, 4]  # the re-run step 2 logs its table again

    # samples.jsonl: one row per answer of the first prompt, every 2 steps; the re-run step's rows are kept once
    rows = read_samples(out / "samples.jsonl")
    assert [(r["step"], r["answer"]) for r in rows] == [
        (2, "attempt 1: answer 2.0"), (2, "attempt 1: answer 2.1"), (4, "attempt 1: answer 4.0"),
        (4, "attempt 1: answer 4.1")]
    assert rows[1]["reward"] == pytest.approx(1.2) and rows[0]["prompt"] == "<image>\nDescribe it."
