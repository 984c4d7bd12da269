"""``launch`` through NeMo-Run's real submission path against stand-in Slurm commands; ``status``; relaunch."""

import io
import json
import re
import subprocess
import sys

import pytest
from slurm_fakes import FakeSlurm
from test_launch import fake_dataset, record

from nemo_viper.cli import main
from nemo_viper.recipes import recipe

pytestmark = pytest.mark.slow  # real NeMo-Run submissions and executed scripts


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    fake = FakeSlurm(tmp_path / "slurm", sys.executable)
    monkeypatch.setenv("PATH", fake.env()["PATH"])
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    monkeypatch.setattr("sys.stdin", io.StringIO())  # NeMo-Run's local tunnel (invoke) reads stdin
    return fake


@pytest.fixture
def overrides(tmp_path):
    for name in ("Qwen-Image", "Qwen-Image-Edit"):
        (tmp_path / "models" / name).mkdir(parents=True)
    return [f"run_dir={tmp_path / 'run'}", "synthesis.num_shards=3", "model.hf_path=tiny",
            "reward.embedding_model=''", "synthesis.images=skimage", "cluster.synthesis_max_parallel=2",
            f"synthesis.redraw.model={tmp_path / 'models' / 'Qwen-Image'}",
            f"synthesis.edit.model={tmp_path / 'models' / 'Qwen-Image-Edit'}"]


def submissions(slurm):
    """(job id, dependency flag or None, script) per sbatch call, in order."""
    result = []
    for n, argv in enumerate(slurm.calls("sbatch")):
        dependency = next((a.split("=", 1)[1] for a in argv if a.startswith("--dependency=")), None)
        job_id = str(1001 + n)
        result.append((job_id, dependency, slurm.job_script(job_id)))
    return result


def test_launch_submits_arrays_with_dependencies_and_status_shows_the_jobs(slurm, overrides, tmp_path, capsys):
    assert main(["launch", "--recipe", "qwen25vl_3b", *overrides]) == 0
    jobs = submissions(slurm)
    names = [re.search(r"#SBATCH --job-name=qwen25vl_3b\.(\S+)", script).group(1) for _, _, script in jobs]
    assert names == ["prepare", "round1-synth1", "round1-rl1", "round1-synth2", "round1-rl2", "export"]
    deps = [dep for _, dep, _ in jobs]
    assert deps == [None, "afterok:1001", "afterok:1002", "afterok:1003", "afterok:1004", "afterok:1005"]
    assert "#SBATCH --array=0-2%2" in jobs[1][2] and "#SBATCH --array=0-2%2" in jobs[3][2]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["jobs"]["round1.synth1"]["job_id"] == "1002" and state["jobs"]["round1.synth1"]["array"] == "0-2"
    for phase in ("prepare", "round1.synth1"):
        assert (tmp_path / "run" / "logs" / phase).is_dir(), "Slurm does not create its --output directory"

    # The job's task script (as NeMo-Run wrote it) runs the preflight, this array task's shard, then the record.
    task = next((tmp_path / "run" / "nemo_run").rglob("round1-synth1/scripts/round1-synth1.sh"))
    subprocess.run(["bash", str(task)], env=slurm.env(SLURM_ARRAY_TASK_ID="2"), check=True)
    doctor, synth, mark = slurm.calls("python")
    assert doctor[:4] == ["-m", "nemo_viper.cli", "doctor", "--run-dir"]
    assert synth[synth.index("--shard-index") + 1] == "2" and synth[-2:] == ["--num-shards", "3"]
    assert mark[-3:] == ["--phase", "round1.synth1", "--partial-ok"]

    slurm.set_sacct("1001|COMPLETED\n1002_0|COMPLETED\n1002_1|RUNNING\n1002_2|PENDING\n1003|PENDING\n")
    capsys.readouterr()
    assert main(["status", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out
    assert re.search(r"round1\.synth1\s+pending\s+1002 COMPLETED:1,PENDING:1,RUNNING:1\s+not started", table)
    assert re.search(r"round1\.rl1\s+pending\s+1003 PENDING", table)

    # A relaunch while the jobs are queued would run two writers in one phase directory: refused.
    assert main(["launch", "--recipe", "qwen25vl_3b", *overrides]) == 2
    assert "phases still queued or running on Slurm: round1.synth1 (job 1002" in capsys.readouterr().err


def test_relaunch_after_a_failure_submits_only_unfinished_phases(slurm, overrides, tmp_path, capsys):
    config = recipe("qwen25vl_3b", *overrides)
    (tmp_path / "run" / "base_model").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (tmp_path / "run" / "base_model" / name).write_text("{}")
    fake_dataset(tmp_path / "run" / "round1" / "synth1")
    record(config, "prepare", "round1.synth1")
    slurm.set_sacct("1001|COMPLETED\n1002_0|COMPLETED\n")  # an earlier launch's jobs: finished

    assert main(["launch", "--recipe", "qwen25vl_3b", *overrides]) == 0
    jobs = submissions(slurm)
    names = [re.search(r"#SBATCH --job-name=qwen25vl_3b\.(\S+)", script).group(1) for _, _, script in jobs]
    assert names == ["round1-rl1", "round1-synth2", "round1-rl2", "export"]
    assert [dep for _, dep, _ in jobs] == [None, "afterok:1001", "afterok:1002", "afterok:1003"]
    output = capsys.readouterr().out
    assert re.search(r"skip\s+prepare\s+done", output) and re.search(r"skip\s+round1\.synth1\s+done", output)


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
