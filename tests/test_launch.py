"""The closed loop's phase plan and its NeMo-Run Slurm rendering (dry run, no cluster); resume by run state."""

import io
import json
import re
import shlex

import pytest

from nemo_viper.launcher.nemo_run_jobs import launch, sbatch_scripts
from nemo_viper.cli import main
from nemo_viper.data.shards import ShardInfo, write_manifest
from nemo_viper.orchestration import plan
from nemo_viper.run_state import RunState, fingerprints, phase_states
from nemo_viper.recipes import recipe

MODELS = ["synthesis.redraw.model=/models/Qwen-Image", "synthesis.edit.model=/models/Qwen-Image-Edit"]


def test_plan_chains_the_loop():
    config = recipe("tiny", "rounds=2", "run_dir=/tmp/x")
    names = [p.name for p in plan(config)]
    assert names == ["prepare", "round1.synth1", "round1.rl1", "round1.synth2", "round1.rl2",
                     "round2.synth1", "round2.rl1", "round2.synth2", "round2.rl2", "export", "report"]
    phases = {p.name: p for p in plan(config)}
    assert phases["round2.synth1"].args[phases["round2.synth1"].args.index("--policy") + 1] == "/tmp/x/round1/rl2"
    assert phases["round1.synth2"].args[phases["round1.synth2"].args.index("--policy") + 1] == "/tmp/x/round1/rl1"
    assert phases["export"].depends_on == ("round2.rl2",) and phases["report"].depends_on == ("export",)
    assert phases["report"].args == ("report", "/tmp/x")


def test_policy_building_settings_reach_rl_and_synthesis(tmp_path):
    """model.precision / fp8_recipe / layer_spec reach the train job (as it reads its command line and the run
    config) and the synthesis VLM config."""
    from omegaconf import OmegaConf

    from nemo_viper.cli import build_parser, train_config
    from nemo_viper.orchestration import write_run_files
    from nemo_viper.synthesis.config import VLMConfig

    config = recipe("tiny", f"run_dir={tmp_path}", "model.layer_spec=local", "model.fp8_recipe=mxfp8")
    paths = write_run_files(config)
    args = {p.name: p for p in plan(config)}["round1.rl1"].args
    model = train_config(build_parser().parse_args(list(args))).model
    assert (model.layer_spec, model.fp8_recipe, model.precision) == ("local", "mxfp8", "fp32")
    vlm = OmegaConf.load(paths.synthesis_config).vlm
    assert (vlm.layer_spec, vlm.fp8_recipe, vlm.precision) == ("local", "mxfp8", "fp32")
    assert VLMConfig(**vlm).layer_spec == "local"


@pytest.fixture(autouse=True)
def no_stdin(monkeypatch, tmp_path):
    """NeMo-Run's local tunnel (invoke) reads stdin; pytest's capture forbids that."""
    monkeypatch.setattr("sys.stdin", io.StringIO())
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))


def _scripts(output: str) -> dict[str, str]:
    return dict(re.findall(r"######## (\S+)\n(.*?)(?=\n######## |\Z)", output, flags=re.S))


def _task_commands(script: str) -> list[list[str]]:
    """The task script's commands, split as the shell would (the array index variable left as is)."""
    body = script.split("# --- task script", 1)[1].split("\n", 1)[1]
    return [shlex.split(line) for line in body.strip().splitlines()[1:]]


@pytest.mark.parametrize("name,nodes,tensor", [("qwen25vl_7b", 2, 2), ("qwen25vl_3b", 1, 1)])
def test_slurm_dry_run(name, nodes, tensor, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["launch", "--recipe", name, "--executor", "slurm", "--dry-run", f"run_dir={run_dir}",
                 "synthesis.num_shards=3", "cluster.synthesis_max_parallel=2", "cluster.max_retries=2",
                 "cluster.exit_signal=SIGUSR2", "cluster.exit_signal_lead_s=900", *MODELS]) == 0
    output = capsys.readouterr().out
    scripts = _scripts(output)
    assert sorted(scripts) == ["export", "report", "round1-rl1", "round1-rl2", "round1-synth1", "round1-synth2"]
    assert not run_dir.exists(), "a dry run writes nothing"
    mounts = {"/models/Qwen-Image", "/models/Qwen-Image-Edit", f"/models/Qwen2.5-VL-{name[-2:].upper()}-Instruct",
              "/models/bge-m3", "/data/viper/images", str(run_dir)}
    for task, text in scripts.items():
        phase = task.replace("round1-", "round1.")
        assert "--container-image /lustre/containers/nemo_viper.sqsh" in text and "#SBATCH --account=my_account" in text
        assert f"#SBATCH --job-name={name}.{task}\n" in text and "#SBATCH --requeue" in text
        assert "export TORCHX_MAX_RETRIES=2" in text  # requeued after a failure up to twice
        assert f"#SBATCH --output={run_dir}/logs/{phase}/sbatch_" in text
        job_mounts = re.search(r"--container-mounts (\S+)", text).group(1).split(",")
        assert {m.split(":")[0] for m in job_mounts} >= mounts
        commands = _task_commands(text)
        assert commands[0] == ["python", "-m", "nemo_viper.cli", "doctor", "--run-dir", str(run_dir), "--phase", phase]
        assert commands[-1][:7] == ["python", "-m", "nemo_viper.cli", "mark-done", "--run-dir", str(run_dir),
                                    "--phase"]
    for stage in ("synth1", "synth2"):
        synth = scripts[f"round1-{stage}"]
        assert "#SBATCH --array=0-2%2" in synth and "#SBATCH --gpus-per-node=1" in synth
        assert "#SBATCH --time=04:00:00" in synth and "--exclusive" not in synth
        assert '--shard-index "$SLURM_ARRAY_TASK_ID" --num-shards 3' in synth
        assert "--signal" not in synth and "scontrol requeue" not in synth.split("# --- task script")[1]
        assert _task_commands(synth)[-1][-1] == "--partial-ok"
    rl = scripts["round1-rl1"]
    assert f"#SBATCH --nodes={nodes}" in rl and "#SBATCH --gpus-per-node=8" in rl and "#SBATCH --exclusive" in rl
    assert "#SBATCH --time=24:00:00" in rl and "--array" not in rl
    assert "#SBATCH --signal=USR2@900" in rl  # warned 900 s ahead of the time limit: saves, exits 75, requeued
    train = next(line for line in rl.splitlines() if " train " in line)
    assert train.endswith(' || { code=$?; [ "$code" -ne 75 ] || scontrol requeue "$SLURM_JOB_ID"; exit "$code"; }')
    assert f"--nnodes {nodes} --nproc-per-node 8" in rl
    assert f"--config {run_dir}/config/viper.yaml" in rl  # the job reads the run's resolved config
    assert "#SBATCH --dependency='afterok:<round1-synth1>'" in rl  # the whole array
    assert "#SBATCH --dependency='afterok:<round1-rl1>'" in scripts["round1-synth2"]
    assert "#SBATCH --dependency='afterok:<round1-synth2>'" in scripts["round1-rl2"]
    assert "#SBATCH --dependency='afterok:<round1-rl2>'" in scripts["export"]
    assert "#SBATCH --time=01:00:00" in scripts["export"] and "#SBATCH --gpus-per-node=1" in scripts["export"]
    report = scripts["report"]  # the run report, on CPUs once the export is done
    assert "#SBATCH --dependency='afterok:<export>'" in report and "#SBATCH --time=00:15:00" in report
    assert "--gpus-per-node" not in report and ["python", "-m", "nemo_viper.cli", "report", str(run_dir)] in _task_commands(report)


def test_config_error_before_any_work(capsys, tmp_path):
    assert main(["run", "--recipe", "tiny", f"run_dir={tmp_path}", "synthesis.images=/no/such/dir"]) == 2
    assert capsys.readouterr().err.strip() == "error: synthesis.images='/no/such/dir' does not exist"
    assert not any(tmp_path.iterdir()), "nothing may be written before validation passes"

@pytest.mark.parametrize("name,tensor,per_rank", [("qwen25vl_3b", 1, 64), ("qwen25vl_7b", 2, 64)])
def test_rl_job_reads_the_layout_and_batch_from_the_run_config(name, tensor, per_rank, tmp_path):
    """The RL phase's command line, parsed as the job parses it, yields the recipe's layout and batch."""
    from nemo_viper.cli import build_parser, train_config
    from nemo_viper.orchestration import write_run_files

    config = recipe(name, f"run_dir={tmp_path}")
    write_run_files(config)
    rl1 = next(p for p in plan(config) if p.name == "round1.rl1")
    job = train_config(build_parser().parse_args(list(rl1.args)))
    assert (job.tensor_parallel, job.rl.prompts_per_step) == (tensor, 512)
    assert job.rl.prompts_per_rank(rl1.nodes * rl1.ranks_per_node // tensor) == per_rank



@pytest.mark.parametrize("command", [["launch", "--executor", "slurm", "--dry-run"], ["plan"], ["doctor"], ["run"]])
def test_pipeline_parallel_rl_needs_the_vllm_backend_before_any_job(command, capsys, tmp_path):
    """The Megatron generation backend runs on one pipeline stage: PP > 1 with it is refused in one line by every
    command that takes a recipe, before anything is written or submitted; with vLLM the dry run goes through."""
    layout = ["parallel.pipeline=2", f"run_dir={tmp_path / 'run'}", *MODELS]
    assert main([*command, "--recipe", "qwen25vl_7b", *layout]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: parallel.pipeline=2 needs rollout.backend=vllm (rollout.backend=megatron generates on the policy's "
        "own layers, which pipeline parallelism splits)")
    assert not (tmp_path / "run").exists()
    if command[0] == "launch":
        assert main([*command, "--recipe", "qwen25vl_7b", *layout, "rollout.backend=vllm"]) == 0
        assert "--config" in capsys.readouterr().out


def test_hub_id_with_offline_jobs_is_a_config_error(capsys, tmp_path):
    assert main(["launch", "--recipe", "qwen25vl_7b", "--dry-run", f"run_dir={tmp_path}",
                 "synthesis.edit.model=Qwen/Qwen-Image-Edit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: synthesis.edit.model='Qwen/Qwen-Image-Edit' is a hub id, but jobs run with "
                          "HF_HUB_OFFLINE=1") and "\n" not in err


# ---- resume: a simulated partial run -------------------------------------------------------------------


def fake_dataset(out, samples=4):
    out.mkdir(parents=True)
    (out / "caption_refine-c000000-000000.tar").write_bytes(b"x")
    write_manifest(out, "caption_refine", [ShardInfo("caption_refine-c000000-000000.tar", samples, "0" * 64)])


def fake_rl_run(out, step):
    ckpt = out / "checkpoints" / f"step_{step:07d}"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "nemo_viper_checkpoint.json").write_text("{}")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
    (out / "checkpoints" / "latest").write_text(ckpt.name + "\n")


def record(config, *names):
    phases = plan(config)
    prints = fingerprints(phases, config.run_dir)
    for name in names:
        RunState(config.run_dir).record_done(name, prints[name])


@pytest.fixture
def partial_7b(tmp_path):
    """A 7B run whose stage-1 synthesis and stage-1 RL finished (outputs and records)."""
    overrides = [f"run_dir={tmp_path / 'run'}", "synthesis.num_shards=3", "rl.steps=5", *MODELS]
    config = recipe("qwen25vl_7b", *overrides)
    fake_dataset(tmp_path / "run" / "round1" / "synth1")
    fake_rl_run(tmp_path / "run" / "round1" / "rl1", step=5)
    record(config, "round1.synth1", "round1.rl1")
    return overrides


def test_launch_submits_only_unfinished_phases(partial_7b):
    output = launch(recipe("qwen25vl_7b", *partial_7b), dry_run=True)
    assert re.search(r"skip\s+round1\.synth1\s+done", output) and re.search(r"skip\s+round1\.rl1\s+done", output)
    scripts = _scripts(output)
    assert sorted(scripts) == ["export", "report", "round1-rl2", "round1-synth2"]
    assert "--dependency" not in scripts["round1-synth2"]  # round1.rl1 is done: nothing to wait for
    assert "#SBATCH --dependency='afterok:<round1-synth2>'" in scripts["round1-rl2"]


def test_changed_value_reruns_what_it_affects(partial_7b):
    config = recipe("qwen25vl_7b", *partial_7b, "rl.grpo.optimizer.lr=2e-6")
    states = phase_states(plan(config), config.run_dir)
    assert states["round1.synth1"].done  # synthesis does not read rl.grpo.optimizer.lr
    assert not states["round1.rl1"].done and states["round1.rl1"].stale
    assert sorted(_scripts(launch(config, dry_run=True))) == ["export", "report", "round1-rl1", "round1-rl2", "round1-synth2"]
    config = recipe("qwen25vl_7b", *partial_7b, "cluster.time.rl=48:00:00", "synthesis.num_shards=8")
    assert all(phase_states(plan(config), config.run_dir)[n].done for n in ("round1.synth1", "round1.rl1"))


def test_recorded_phase_whose_outputs_do_not_verify_is_pending(partial_7b, tmp_path):
    config = recipe("qwen25vl_7b", *partial_7b)
    fake_rl_run(tmp_path / "run" / "round1" / "rl1", step=3)  # `latest` now names step 3 of 5
    state = phase_states(plan(config), config.run_dir)["round1.rl1"]
    assert not state.done and state.detail == "outputs invalid: partial: at step 3 of 5"
    (tmp_path / "run" / "round1" / "synth1" / "manifest.json").write_text(
        json.dumps({"schema_version": 1, "task": "caption_refine", "shards": [], "total_samples": 0}))
    state = phase_states(plan(config), config.run_dir)["round1.synth1"]
    assert not state.done and "holds no samples" in state.detail


def test_from_forces_a_restart_point(partial_7b, tmp_path, capsys):
    config = recipe("qwen25vl_7b", *partial_7b)
    output = launch(config, dry_run=True, start="round1.rl1")
    assert sorted(_scripts(output)) == ["export", "report", "round1-rl1", "round1-rl2", "round1-synth2"]
    assert re.search(r"submit\s+round1\.rl1\s+forced \(--from round1\.rl1\)", output)
    assert (tmp_path / "run" / "round1" / "rl1" / "checkpoints").is_dir(), "a dry run moves nothing"
    assert main(["launch", "--recipe", "qwen25vl_7b", "--dry-run", "--from", "round9.rl1", *partial_7b]) == 2
    assert "--from 'round9.rl1' is not a phase of this run" in capsys.readouterr().err
