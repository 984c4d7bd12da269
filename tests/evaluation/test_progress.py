"""Scores across rounds (nemo_viper.evaluation.progress) as the RL jobs keep them: one fixed held-out set for the
whole run, chosen by round 1's stage 1, and a score per policy that a rerun does not recompute. The policy
scorer is a fake that records which samples it was asked to score; the set, the files and the keys are real."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from nemo_viper.evaluation.heldout import HeldoutConfig
from nemo_viper.evaluation.progress import SET_FILE, read_score, read_set
from nemo_viper.training.stage import StageConfig, _AcrossRounds


class FakeDataset:
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def record(self, i):
        return SimpleNamespace(id=self.ids[i])


class FakeSelfEvaluation:
    """:class:`~nemo_viper.training.stage._SelfEvaluation`'s surface: the stage's dataset and held-out split, the
    held-out scores this process computed (``scored``), and ``score``, which logs the sample ids it is given."""

    def __init__(self, dataset, heldout, scored=None):
        self.dataset, self.heldout, self.scored, self.calls = dataset, heldout, dict(scored or {}), []

    def starting_policy_gone(self):
        return False

    def score(self, dataset, indices):
        ids = [dataset.record(i).id for i in indices]
        self.calls.append(ids)
        return summary(len(ids))


def summary(prompts, total=0.5):
    means = {"total": total, "format": 1.0, "correctness": total, "recall": total}
    return {"samples_per_prompt": 2, "prompts": prompts, "greedy": means, "sampled": means, "examples": []}


@pytest.fixture
def single_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def run(tmp_path, monkeypatch):
    """A run dir with datasets (a manifest each; their sample ids served by a fake ``ShardDataset``)."""
    datasets = {}

    def dataset(name, ids, manifest=None):
        path = tmp_path / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "manifest.json").write_text(json.dumps(manifest or {"task": name, "ids": ids}))
        datasets[str(path.absolute())] = FakeDataset(ids)
        return path

    def checkpoint(out, step, content):
        step_dir = out / "checkpoints" / f"step_{step:07d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        (step_dir / "nemo_viper_checkpoint.json").write_text(json.dumps({"weights": content}))
        (out / "checkpoints" / "latest").write_text(step_dir.name)
        return out

    monkeypatch.setattr("nemo_viper.data.shards.ShardDataset", lambda path: datasets[str(path)])
    base = tmp_path / "base_model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    return SimpleNamespace(root=tmp_path, progress=tmp_path / "progress", dataset=dataset, datasets=datasets,
                           checkpoint=checkpoint, base=base)


def stage(run, r, n, data, policy, **progress):
    return StageConfig(stage=n, data=str(data), policy=str(policy), out=str(run.root / f"round{r}" / f"rl{n}"),
                       heldout=HeldoutConfig(count=2), progress_dir=str(run.progress), **progress)


def test_every_policy_is_scored_on_round_one_stage_one_split_across_rounds_and_resumes(run, single_rank):
    synth1 = run.dataset("round1/synth1", [f"s{i}" for i in range(8)])
    own = FakeSelfEvaluation(run.datasets[str(synth1.absolute())], [1, 4], scored={"before": summary(2, 0.2)})
    _AcrossRounds(stage(run, 1, 1, synth1, run.base, progress_start="base"), own).record("before")
    assert read_set(run.progress).sample_ids == ("s1", "s4")
    base = read_score(run.progress, "base")
    assert own.calls == [] and base["greedy"]["total"] == 0.2  # the held-out split's own scores double as these
    assert base["sample_ids"] == ["s1", "s4"] and base["policy_key"].startswith("hf-files:")

    scored = {}
    for r in (1, 2):  # each round's stage 2: new data with its own held-out split, scored on round 1's set
        synth2 = run.dataset(f"round{r}/synth2", [f"r{r}v{i}" for i in range(6)])
        rl1 = run.checkpoint(run.root / f"round{r}" / "rl1", 2, f"r{r}rl1")
        evaluation = FakeSelfEvaluation(run.datasets[str(synth2.absolute())], [0, 2])
        config = stage(run, r, 2, synth2, rl1, progress_final=f"round{r}")
        run.checkpoint(run.root / f"round{r}" / "rl2", 2, f"r{r}rl2")
        _AcrossRounds(config, evaluation).record("after")
        assert evaluation.calls == [["s1", "s4"]], r
        scored[r] = read_score(run.progress, f"round{r}")
        assert scored[r]["sample_ids"] == ["s1", "s4"] and scored[r]["set"] == base["set"]
        assert scored[r]["policy"] == str((run.root / f"round{r}" / "rl2" / "checkpoints" / "step_0000002").absolute())

    # a rerun of round 2's stage 2: its score is kept, not recomputed; a new final checkpoint is scored again
    evaluation = FakeSelfEvaluation(run.datasets[str((run.root / "round2/synth2").absolute())], [0, 2])
    config = stage(run, 2, 2, run.root / "round2/synth2", run.root / "round2/rl1", progress_final="round2")
    _AcrossRounds(config, evaluation).record("after")
    assert evaluation.calls == [] and read_score(run.progress, "round2") == scored[2]
    run.checkpoint(run.root / "round2" / "rl2", 4, "retrained")
    _AcrossRounds(config, evaluation).record("after")
    assert evaluation.calls == [["s1", "s4"]]
    assert read_score(run.progress, "round2")["policy_key"] != scored[2]["policy_key"]

    # a rerun of round 1's stage 1 whose held-out split differs (eval.heldout changed) keeps the run's set and score
    before = (run.progress / SET_FILE).read_text()
    again = FakeSelfEvaluation(run.datasets[str(synth1.absolute())], [2, 3], scored={"before": summary(2, 0.9)})
    _AcrossRounds(stage(run, 1, 1, synth1, run.base, progress_start="base"), again).record("before")
    assert (run.progress / SET_FILE).read_text() == before and read_score(run.progress, "base") == base

    # new round-1 data (a rerun of its synthesis): the set is drawn again, from that data
    run.dataset("round1/synth1", [f"n{i}" for i in range(8)], manifest={"task": "resynthesised"})
    fresh = FakeSelfEvaluation(run.datasets[str(synth1.absolute())], [0, 5])
    _AcrossRounds(stage(run, 1, 1, synth1, run.base, progress_start="base"), fresh).record("before")
    assert read_set(run.progress).sample_ids == ("n0", "n5") and fresh.calls == [["n0", "n5"]]


def test_a_stage_two_job_without_the_runs_set_and_labels_without_a_directory_are_refused(run, single_rank):
    from nemo_viper.errors import ConfigError

    synth2 = run.dataset("round1/synth2", ["a", "b", "c"])
    evaluation = FakeSelfEvaluation(run.datasets[str(synth2.absolute())], [0])
    with pytest.raises(ConfigError, match="heldout_set.json not found"):
        _AcrossRounds(stage(run, 1, 2, synth2, run.base, progress_final="round1"), evaluation)
    with pytest.raises(ConfigError, match="need --progress-dir"):
        StageConfig(stage=2, data="d", policy="p", out="o", progress_final="round1")
    with pytest.raises(ConfigError, match="eval.heldout.count and eval.heldout.fraction are 0"):
        StageConfig(stage=1, data="d", policy="p", out="o", progress_dir="x", progress_start="base")


def test_train_passes_the_progress_flags_to_the_stage():
    from nemo_viper.cli import build_parser, train_config

    args = ["train", "--stage", "2", "--data", "d", "--policy", "p", "--out", "o", "--progress-dir", "/r/progress",
            "--progress-final", "round3"]
    config = train_config(build_parser().parse_args(args))
    assert (config.progress_dir, config.progress_start, config.progress_final) == ("/r/progress", "", "round3")
