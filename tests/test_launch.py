"""The closed loop's phase plan and its NeMo-Run Slurm rendering (dry run, no cluster)."""

import io
import re

import pytest

from nemo_viper.cli import main
from nemo_viper.orchestration import plan
from recipes import recipe


def test_plan_chains_the_loop():
    config = recipe("tiny", "rounds=2", "run_dir=/tmp/x")
    names = [p.name for p in plan(config)]
    assert names == ["prepare", "round1.synth1", "round1.rl1", "round1.synth2", "round1.rl2",
                     "round2.synth1", "round2.rl1", "round2.synth2", "round2.rl2", "export"]
    phases = {p.name: p for p in plan(config)}
    assert phases["round2.synth1"].args[phases["round2.synth1"].args.index("--policy") + 1] == "/tmp/x/round1/rl2"
    assert phases["round1.synth2"].args[phases["round1.synth2"].args.index("--policy") + 1] == "/tmp/x/round1/rl1"
    assert phases["export"].depends_on == ("round2.rl2",)


def test_policy_building_settings_reach_rl_and_synthesis(tmp_path):
    """model.precision / fp8_recipe / layer_spec reach the train CLI and the synthesis VLM config."""
    from omegaconf import OmegaConf

    from nemo_viper.orchestration import write_run_files
    from nemo_viper.synthesis.config import VLMConfig

    config = recipe("tiny", f"run_dir={tmp_path}", "model.layer_spec=local", "model.fp8_recipe=mxfp8")
    args = {p.name: p for p in plan(config)}["round1.rl1"].args
    assert args[args.index("--layer-spec") + 1] == "local" and args[args.index("--fp8-recipe") + 1] == "mxfp8"
    vlm = OmegaConf.load(write_run_files(config).synthesis_config).vlm
    assert (vlm.layer_spec, vlm.fp8_recipe, vlm.precision) == ("local", "mxfp8", "fp32")
    assert VLMConfig(**vlm).layer_spec == "local"


@pytest.fixture(autouse=True)
def no_stdin(monkeypatch, tmp_path):
    """NeMo-Run's local tunnel (invoke) reads stdin; pytest's capture forbids that."""
    monkeypatch.setattr("sys.stdin", io.StringIO())
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))


@pytest.fixture(scope="module")
def dry_run_7b(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("r7b")
    return recipe("qwen25vl_7b", f"run_dir={run_dir}", "synthesis.num_shards=3")


def test_slurm_dry_run_7b(dry_run_7b, capsys):
    assert main(["launch", "--recipe", "qwen25vl_7b", "--executor", "slurm", "--dry-run",
                 f"run_dir={dry_run_7b.run_dir}", "synthesis.num_shards=3"]) == 0
    output = capsys.readouterr().out
    scripts = dict(re.findall(r"######## (\S+)\n(.*?)(?=\n######## |\Z)", output, flags=re.S))
    assert sorted(scripts) == sorted(["round1-synth1-0", "round1-synth1-1", "round1-synth1-2", "round1-rl1",
                                      "round1-synth2-0", "round1-synth2-1", "round1-synth2-2", "round1-rl2", "export"])
    for text in scripts.values():
        assert "--container-image nvcr.io/nvidia/nemo:26.08" in text and "#SBATCH --account=my_account" in text
    rl = scripts["round1-rl1"]
    assert "#SBATCH --nodes=2" in rl and "#SBATCH --gpus-per-node=8" in rl
    assert "torchrun" in rl and "--nnodes 2 --nproc-per-node 8" in rl  # world size 16
    assert "--tp 2" in rl and "--prompts-per-step 64" in rl  # 512 prompts over DP = 16 / 2
    assert "#SBATCH --dependency='afterok:<round1-synth1-0>:<round1-synth1-1>:<round1-synth1-2>'" in rl
    assert "#SBATCH --dependency='afterok:<round1-rl1>'" in scripts["round1-synth2-1"]
    assert "--shard-index 1 --num-shards 3" in scripts["round1-synth2-1"]
    assert "#SBATCH --dependency='afterok:<round1-rl2>'" in scripts["export"]


def test_3b_runs_rl_at_tp1_on_one_node(tmp_path):
    from launcher.nemo_run_jobs import sbatch_scripts

    rl = sbatch_scripts(recipe("qwen25vl_3b", f"run_dir={tmp_path}", "synthesis.num_shards=1"))["round1-rl1"]
    assert "#SBATCH --nodes=1" in rl and "--nnodes 1 --nproc-per-node 8" in rl and "--tp 1" in rl


def test_config_error_before_any_work(capsys, tmp_path):
    assert main(["run", "--recipe", "tiny", f"run_dir={tmp_path}", "synthesis.images=/no/such/dir"]) == 2
    assert capsys.readouterr().err.strip() == "error: synthesis.images='/no/such/dir' does not exist"
    assert not any(tmp_path.iterdir()), "nothing may be written before validation passes"
