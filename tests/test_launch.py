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
    assert f"--config {dry_run_7b.run_dir}/config/viper.yaml" in rl  # the job reads the run's resolved config
    assert "#SBATCH --dependency='afterok:<round1-synth1-0>:<round1-synth1-1>:<round1-synth1-2>'" in rl
    assert "#SBATCH --dependency='afterok:<round1-rl1>'" in scripts["round1-synth2-1"]
    assert "--shard-index 1 --num-shards 3" in scripts["round1-synth2-1"]
    assert "#SBATCH --dependency='afterok:<round1-rl2>'" in scripts["export"]


def test_3b_runs_rl_at_tp1_on_one_node(tmp_path):
    from launcher.nemo_run_jobs import sbatch_scripts

    rl = sbatch_scripts(recipe("qwen25vl_3b", f"run_dir={tmp_path}", "synthesis.num_shards=1"))["round1-rl1"]
    assert "#SBATCH --nodes=1" in rl and "--nnodes 1 --nproc-per-node 8" in rl


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


def test_config_error_before_any_work(capsys, tmp_path):
    assert main(["run", "--recipe", "tiny", f"run_dir={tmp_path}", "synthesis.images=/no/such/dir"]) == 2
    assert capsys.readouterr().err.strip() == "error: synthesis.images='/no/such/dir' does not exist"
    assert not any(tmp_path.iterdir()), "nothing may be written before validation passes"
