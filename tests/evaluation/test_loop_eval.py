"""The benchmark phases in the closed loop: plan, and the guard stopping later rounds (phases stubbed)."""

import io
import sys

from nemo_viper import local_run, orchestration
from nemo_viper.run_state import RunState
from nemo_viper.recipes import recipe


def test_plan_evaluates_base_once_and_every_round_before_the_next():
    config = recipe("tiny", "eval.enabled=true", "rounds=2", "eval.guard_max_drop=1.0", "run_dir=/r")
    phases = {p.name: p for p in orchestration.plan(config)}
    assert list(phases) == ["prepare", "eval_data", "eval", "round1.synth1", "round1.rl1", "round1.synth2",
                            "round1.rl2", "round1.eval", "round2.synth1", "round2.rl1", "round2.synth2",
                            "round2.rl2", "round2.eval", "export", "report"]
    assert phases["round2.synth1"].depends_on == ("round1.eval",)  # the guard runs before the next round
    base, round1 = phases["eval"].args, phases["round1.eval"].args
    assert base[base.index("--model") + 1] == "/r/base_model" and "--guard-against" not in base
    assert round1[round1.index("--model") + 1] == "/r/round1/rl2"
    assert round1[round1.index("--guard-against") + 1] == "/r/eval/base"
    assert phases["round2.eval"].args[phases["round2.eval"].args.index("--guard-against") + 1] == "/r/eval/round1"
    # the RL job reads eval.heldout (and every other setting) from the run config (tests/test_config_keys.py)
    args = phases["round1.rl1"].args
    assert args[args.index("--config") + 1] == "/r/config/viper.yaml"


def test_plan_scores_every_policy_on_one_fixed_set_chosen_by_round_one_stage_one():
    """Only round 1's stage 1 scores the starting policy (and so chooses the set); every round's stage 2 scores
    its final policy into the same directory; no held-out split, no scores across rounds."""
    def flags(args):
        return {flag: args[args.index(flag) + 1] for flag in ("--progress-dir", "--progress-start", "--progress-final")
                if flag in args}

    phases = {p.name: p for p in orchestration.plan(recipe("tiny", "rounds=3", "run_dir=/r"))}
    assert {name: flags(p.args) for name, p in phases.items() if p.kind == "rl"} == {
        "round1.rl1": {"--progress-dir": "/r/progress", "--progress-start": "base"},
        "round1.rl2": {"--progress-dir": "/r/progress", "--progress-final": "round1"},
        "round2.rl1": {}, "round2.rl2": {"--progress-dir": "/r/progress", "--progress-final": "round2"},
        "round3.rl1": {}, "round3.rl2": {"--progress-dir": "/r/progress", "--progress-final": "round3"}}
    off = orchestration.plan(recipe("tiny", "rounds=2", "eval.heldout.count=0", "run_dir=/r"))
    assert not any("--progress-dir" in p.args for p in off)


def test_plan_shards_benchmarks_into_gpu_jobs_and_collects():
    config = recipe("qwen25vl_7b", "eval.enabled=true", "eval.dataset_root=/data", "eval.guard_max_drop=0.5",
                    "run_dir=/r")
    phases = {p.name: p for p in orchestration.plan(config)}
    assert phases["round1.eval"].tasks == 7 and phases["round1.eval"].gpus_per_node == 1
    collect = phases["round1.eval_collect"]
    assert collect.depends_on == ("round1.eval",) and collect.args[:3] == ("eval", "--collect", "/r/eval/round1")
    assert "--guard-against" in collect.args and "--guard-against" not in phases["round1.eval"].args
    assert "eval" not in recipe("qwen25vl_7b").eval.tasks  # sanity: task names, not phases
    assert [p.name for p in orchestration.plan(recipe("qwen25vl_7b", "run_dir=/r"))][-2:] == ["export", "report"]


def test_guard_stop_skips_later_rounds_and_still_exports(tmp_path, monkeypatch):
    """Phases stubbed (commands, output verification, preflight): only the runner's guard logic is under test."""
    config = recipe("tiny", "eval.enabled=true", "rounds=3", "eval.guard_max_drop=1.0", f"run_dir={tmp_path}")
    ran = []

    def fake_command(phase, index=0):
        ran.append(phase.name)
        code = orchestration.GUARD_STOP_EXIT if phase.name == "round2.eval" else 0
        return [sys.executable, "-c", f"raise SystemExit({code})"]

    monkeypatch.setattr(local_run, "phase_command", fake_command)
    monkeypatch.setattr("nemo_viper.local_run.verify_and_record",
                        lambda phase, phases, run_dir: RunState(run_dir).record_done(phase.name, "stub"))
    monkeypatch.setattr("nemo_viper.local_run.select_phases", lambda phases, run_dir, start: (
        [p for p in phases if p.name not in RunState(run_dir).read()["phases"]], {}))
    monkeypatch.setattr("nemo_viper.local_run.clear_for_rerun", lambda selected, states, run_dir: [])
    monkeypatch.setattr("nemo_viper.doctor.check", lambda config, phase: [])
    local_run.run_local(config)
    assert ran[-4:] == ["round2.rl2", "round2.eval", "export", "report"] and not any(n.startswith("round3") for n in ran)
    assert orchestration.stopped_after_round(tmp_path) == 2
    finished = RunState(tmp_path).read()["phases"]
    assert "round2.eval" in finished and "export" in finished
    ran.clear()
    local_run.run_local(config)  # a rerun keeps the stop
    assert ran == []


def test_slurm_dry_run_submits_one_gpu_job_per_benchmark_shard(tmp_path, monkeypatch):
    from nemo_viper.launcher.nemo_run_jobs import sbatch_scripts

    monkeypatch.setattr("sys.stdin", io.StringIO())  # NeMo-Run's local tunnel (invoke) reads stdin
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    config = recipe("qwen25vl_7b", "eval.enabled=true", "eval.dataset_root=/data", "cluster.account=acct",
                    f"run_dir={tmp_path}", "eval.num_shards=2")
    scripts = sbatch_scripts(config)
    shards = scripts["round1-eval"]  # one array job, one GPU per task (shard)
    assert "#SBATCH --array=0-1" in shards and "#SBATCH --gpus-per-node=1" in shards
    assert "#SBATCH --time=08:00:00" in shards
    assert f"nemo_viper.cli eval --model {tmp_path}/round1/rl2" in shards and "--num-shards 2" in shards
    collect = scripts["round1-eval_collect"]
    assert "afterok:<round1-eval>" in collect and f"--collect {tmp_path}/eval/round1" in collect
    assert "afterok:<round1-eval_collect>" in scripts["export"]
    # the benchmark copies are mounted into every job that reads them (without, each eval job fails after queueing)
    mounts = next(line for line in shards.splitlines() if "--container-mounts" in line)
    assert "/data:/data" in mounts, mounts
