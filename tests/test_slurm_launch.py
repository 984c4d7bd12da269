"""The Slurm jobs as rendered (site options, jobs without a container), the checks before submission, and
``cluster.code=package`` through NeMo-Run's real submission path against a stand-in ``sbatch``. Submission,
dependencies, ``status`` and relaunch against a real cluster: ``test_slurm_cluster.py``."""

import io
import json
import os
import re
import subprocess
import sys

import pytest
from slurm_fakes import FakeSlurm
from test_launch import _scripts

from nemo_viper.cli import main

pytestmark = pytest.mark.slow  # real NeMo-Run submissions and executed scripts


@pytest.fixture(autouse=True)
def nemo_run_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    monkeypatch.setattr("sys.stdin", io.StringIO())  # NeMo-Run's local tunnel (invoke) reads stdin


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    fake = FakeSlurm(tmp_path / "slurm", sys.executable)
    monkeypatch.setenv("PATH", fake.env()["PATH"])
    return fake


@pytest.fixture
def overrides(tmp_path):
    for name in ("Qwen-Image", "Qwen-Image-Edit"):
        (tmp_path / "models" / name).mkdir(parents=True)
    return [f"run_dir={tmp_path / 'run'}", "synthesis.num_shards=3", "model.hf_path=tiny",
            "reward.embedding_model=''", "synthesis.images=skimage", "cluster.synthesis_max_parallel=2",
            f"synthesis.redraw.model={tmp_path / 'models' / 'Qwen-Image'}",
            f"synthesis.edit.model={tmp_path / 'models' / 'Qwen-Image-Edit'}"]


def test_site_options_per_phase_kind_and_jobs_without_a_container_render(overrides, tmp_path, capsys):
    assert main(["launch", "--recipe", "qwen25vl_3b", "--dry-run", *overrides, "cluster.container_image=null",
                 "cluster.setup=module load cuda/12 && source /shared/venv/bin/activate",
                 "cluster.options.rl.qos=high", "cluster.options.rl.constraint=h100&ib", "cluster.options.rl.gres=gpu:8",
                 "cluster.options.rl.gpus_per_node=0", "cluster.options.rl.cpus_per_task=16",
                 "cluster.options.rl.sbatch.reservation=viper resv", "cluster.options.rl.sbatch.requeue_on_fail=true",
                 "cluster.options.rl.srun_args=[--mpi=pmix,--cpu-bind=none]",
                 "cluster.options.synth.mem=64G", "cluster.options.synth.qos=low"]) == 0
    scripts = _scripts(capsys.readouterr().out)
    rl, synth, export = scripts["round1-rl1"], scripts["round1-synth1"], scripts["export"]
    for line in ("#SBATCH --qos=high", "#SBATCH --constraint='h100&ib'", "#SBATCH --gres=gpu:8",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --reservation='viper resv'", "#SBATCH --requeue-on-fail",
                 "#SBATCH --mem=0", "#SBATCH --exclusive"):
        assert line + "\n" in rl, line
    assert "--gpus-per-node" not in rl  # 0: requested through gres instead
    assert re.search(r"^srun .* --wait=60 --kill-on-bad-exit=1 --chdir \S+ --mpi=pmix --cpu-bind=none torchrun ", rl, re.M)
    assert "#SBATCH --mem=64G\n" in synth and "#SBATCH --qos=low\n" in synth and "--mpi=pmix" not in synth
    assert "#SBATCH --gpus-per-node=1\n" in synth  # the plan's GPUs where the site sets none
    assert "--qos" not in export and "--mem" not in export  # options belong to their kind only
    for text in scripts.values():
        assert "#SBATCH --kill-on-invalid-dep=yes\n" in text  # dependents of a failed job are cancelled
        assert "--container-image" not in text and "--container-mounts" not in text
        assert "\nmodule load cuda/12 && source /shared/venv/bin/activate\n" in text.split("# Command 1")[0]
        # NeMo-Run's --chdir names a code dir its plain packager never creates: the run dir's, last, wins in srun
        srun = next(line for line in text.splitlines() if line.startswith("srun "))
        assert srun.rsplit("--chdir ", 1)[1].split()[0] == str(tmp_path / "run")


@pytest.mark.parametrize("override,message", [
    ("cluster.options.rl.qoss=high", "qoss"),
    ("cluster.options.train.qos=high", "train"),
    ("cluster.options.rl.sbatch.array=0-3", "cluster.options.rl.sbatch.array: set by the launcher"),
    ("cluster.options.synth.sbatch.mem=1G", "or cluster.options.synth.mem"),
    ("cluster.options.rl.cpus_per_task=0", "cpus_per_task=0 must be >= 1"),
    ("cluster.container_image=''", "or null for jobs without a container"),
    ("cluster.code=package cluster.container_image=null", "cluster.code='package' runs the shipped code inside"),
])
def test_bad_site_options_are_rejected_before_anything_is_submitted(override, message, overrides, tmp_path, capsys):
    assert main(["launch", "--recipe", "qwen25vl_3b", *overrides, *override.split()]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_launch_with_an_image_needs_pyxis_on_the_login_node(overrides, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"  # a Slurm without the pyxis plugin: its srun --help has no --container-image
    srun.write_text("#!/bin/sh\necho 'Usage: srun [OPTIONS(0)...] executable [args...]'\necho '  --container=path'\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert main(["launch", "--recipe", "qwen25vl_3b", *overrides]) == 2
    assert "srun has no --container-image (the pyxis plugin" in capsys.readouterr().err
    assert not (tmp_path / "run" / "nemo_run").exists() and not (tmp_path / "run" / "state.json").exists()


def test_package_mode_ships_the_committed_head_with_every_job(slurm, overrides, tmp_path, monkeypatch, capsys):
    repo = tmp_path / "checkout"
    (repo / "nemo_viper").mkdir(parents=True)
    (repo / "nemo_viper" / "marker.py").write_text("SHIPPED = True\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "code"]):
        subprocess.run([*git, *args], check=True)
    monkeypatch.setattr("nemo_viper.launcher.nemo_run_jobs.REPO", repo)
    (repo / "nemo_viper" / "marker.py").write_text("SHIPPED = False\n")
    assert main(["launch", "--recipe", "qwen25vl_3b", "cluster.code=package", *overrides]) == 2
    assert "which has uncommitted changes" in capsys.readouterr().err and not slurm.calls("sbatch")

    subprocess.run([*git, "checkout", "-q", "--", "."], check=True)
    assert main(["launch", "--recipe", "qwen25vl_3b", "cluster.code=package", *overrides]) == 0
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    shipped = list((tmp_path / "run" / "nemo_run").rglob("round1-rl1/code/nemo_viper/marker.py"))
    assert [p.read_text() for p in shipped] == ["SHIPPED = True\n"]  # mounted as /nemo_run/code, the job's cwd
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["jobs"]["round1.rl1"]["code"] == f"package {head}"
