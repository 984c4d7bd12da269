"""Submitting from a workstation: ``nemo-viper launch``/``status`` through NeMo-Run's ``SSHTunnel`` to an OpenSSH
server on this machine (``ssh_server.py``), submitting to the local Slurm cluster (``local_slurm.py``).

This machine is both ends, so the tests check that the work went through the tunnel from the server's log (its
command and SFTP sessions) and from what only the tunnel path does: a run dir read without checking outputs,
jobs submitted held and released once recorded, the experiment record kept apart from the job files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from local_slurm import job_field, slurm_cluster  # noqa: F401 (fixture)
from ssh_server import ssh_login  # noqa: F401 (fixture)

from nemo_viper.cli import main
from nemo_viper.orchestration import plan
from nemo_viper.recipes import recipe
from nemo_viper.run_state import fingerprints

TINY = ["model.hf_path=tiny", "reward.embedding_model=''", "cluster.container_image=null",
        "cluster.account=nemo_viper"]


def _cli(login, *args: str, home: Path) -> subprocess.CompletedProcess:
    """The command as a user runs it, in a process of its own (its SSH connection closes when it exits)."""
    return subprocess.run([sys.executable, "-m", "nemo_viper.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env={**login.env(), "NEMORUN_HOME": str(home)}, timeout=300)


@pytest.mark.parametrize("override, message", [
    ("cluster.ssh.host=login;rm", "cluster.ssh.host='login;rm' is not a host name"),
    ("cluster.ssh.user=''", "cluster.ssh.user='' must be the login name"),
    ("cluster.ssh.port=70000", "cluster.ssh.port=70000 is not a TCP port"),
    ("cluster.ssh.identity=/nonexistent/key", "cluster.ssh.identity='/nonexistent/key': no such file"),
    ("run_dir=runs/relative", "run_dir='runs/relative' must be an absolute path on login1"),
    ("cluster.job_dir=jobs", "cluster.job_dir='jobs' must be an absolute path on login1"),
])
def test_bad_ssh_settings_are_one_line_errors_before_anything_connects(override, message, tmp_path, capsys):
    args = ["launch", "--recipe", "tiny", "--executor", "slurm", *TINY, f"run_dir={tmp_path}/run",
            "cluster.ssh.host=login1", "cluster.ssh.user=me", override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_ssh_needs_the_slurm_executor_and_a_host(tmp_path, capsys):
    assert main(["launch", "--recipe", "tiny", "--dry-run", f"run_dir={tmp_path}", "cluster.ssh.host=login1",
                 "cluster.ssh.user=me"]) == 2
    assert "needs cluster.executor='slurm'" in capsys.readouterr().err
    assert main(["launch", "--recipe", "tiny", "--executor", "slurm", "--dry-run", *TINY, f"run_dir={tmp_path}",
                 "cluster.ssh.user=me"]) == 2
    assert "cluster.ssh.host is not" in capsys.readouterr().err


@pytest.mark.slow  # an sshd and a CLI process
def test_dry_run_through_the_tunnel_reads_the_remote_state(ssh_login, tmp_path):
    """The dry run asks the login node for the run's state: a phase recorded there under its current
    fingerprint is skipped (its outputs are not looked for here); the jobs would be held until recorded."""
    run_dir = tmp_path / "cluster" / "run"
    config = recipe("tiny", f"run_dir={run_dir}")
    run_dir.mkdir(parents=True)
    prepare = fingerprints(plan(config), run_dir)["prepare"]
    (run_dir / "state.json").write_text(json.dumps({"version": 2, "phases": {"prepare": {"fingerprint": prepare}},
                                                    "jobs": {}}))
    commands = ssh_login.sessions("command")
    result = _cli(ssh_login, "launch", "--recipe", "tiny", "--executor", "slurm", "--dry-run", *TINY, f"run_dir={run_dir}",
                  *ssh_login.overrides(), home=tmp_path / "nemorun")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:3] == ["skip", "prepare", "done"] for line in lines), result.stdout
    assert any(line.split()[:2] == ["submit", "round1.synth1"] for line in lines), result.stdout
    assert "#SBATCH --hold" in result.stdout
    assert f"--chdir {run_dir}/nemo_run/" in result.stdout  # the job files: under the run dir on the cluster
    assert ssh_login.sessions("command") > commands


@pytest.mark.slow
@pytest.mark.slurm
def test_launch_and_status_through_the_tunnel_submit_to_slurm(ssh_login, slurm_cluster, tmp_path):
    """A real launch through the login node: the run's files and NeMo-Run's job files are written there over
    SFTP, ``sbatch`` runs there, the jobs are recorded in the remote state file and released; ``status``
    reads them back through the tunnel. The workstation keeps only NeMo-Run's experiment record."""
    run_dir = tmp_path / "cluster" / "run"
    home = tmp_path / "workstation" / "nemorun"
    name = f"ssh{os.getpid()}"
    sftp = ssh_login.sessions("subsystem 'sftp'")
    result = _cli(ssh_login, "launch", "--recipe", "tiny", "--executor", "slurm", *TINY, f"name={name}", f"run_dir={run_dir}",
                  "cluster.setup='exit 1'", *ssh_login.overrides(), home=home)  # the jobs stop at once
    jobs = json.loads((run_dir / "state.json").read_text())["jobs"] if (run_dir / "state.json").is_file() else {}
    try:
        assert result.returncode == 0, result.stderr
        assert set(jobs) == {p.name for p in plan(recipe("tiny", f"run_dir={run_dir}"))}
        for phase, job in jobs.items():
            assert f"{phase}: Slurm job {job['job_id']}" in result.stdout
            assert job_field(job["job_id"], "JobName") == f"{name}.{phase.replace('.', '-')}"
            assert job_field(job["job_id"], "Reason") != "JobHeldUser", phase  # released after the record
        assert (run_dir / "config" / "viper.yaml").is_file()
        scripts = list((run_dir / "nemo_run" / "experiments" / name).glob("*/*_sbatch.sh"))
        assert len(scripts) == len(jobs)
        assert ssh_login.sessions("subsystem 'sftp'") > sftp  # written over SFTP
        assert list(home.glob(f"experiments/{name}/*/_TASKS")), "the experiment record is kept on the workstation"

        shown = _cli(ssh_login, "status", str(run_dir), *ssh_login.overrides()[:4], home=home)
        assert shown.returncode == 0, shown.stderr
        rows = {line.split()[0]: line for line in shown.stdout.splitlines()[1:] if line.strip()}
        assert jobs["prepare"]["job_id"] in rows["prepare"] and "pending" in rows["prepare"]
    finally:
        if jobs:
            subprocess.run(["scancel", *(job["job_id"] for job in jobs.values())], capture_output=True)


@pytest.mark.slow  # an sshd and a CLI process
def test_a_rerun_that_would_set_outputs_aside_is_refused_through_the_tunnel(ssh_login, tmp_path):
    """Setting outputs aside takes the run dir's lock, which the tunnel does not: refused before anything is
    written or submitted, naming the phase and why it would re-run."""
    run_dir = tmp_path / "cluster" / "run"
    run_dir.mkdir(parents=True)
    state = {"version": 2, "phases": {"prepare": {"fingerprint": "0123456789abcdef"}}, "jobs": {}}
    (run_dir / "state.json").write_text(json.dumps(state))
    result = _cli(ssh_login, "launch", "--recipe", "tiny", "--executor", "slurm", *TINY, f"run_dir={run_dir}",
                  "cluster.setup='exit 1'", *ssh_login.overrides(), home=tmp_path / "nemorun")
    try:
        assert result.returncode == 2, result.stdout
        assert "error: prepare would re-run (configuration changed since it ran)" in result.stderr
        assert "launch this once where" in result.stderr
        assert json.loads((run_dir / "state.json").read_text()) == state
        assert not (run_dir / "config").exists() and not (run_dir / "nemo_run").exists()
    finally:
        recorded = json.loads((run_dir / "state.json").read_text())["jobs"]
        if recorded:
            subprocess.run(["scancel", *(job["job_id"] for job in recorded.values())], capture_output=True)


@pytest.mark.slow  # an sshd and a CLI process
def test_status_through_the_tunnel_takes_only_the_login_node_keys(ssh_login, tmp_path, capsys):
    assert main(["status", str(tmp_path), "rl.steps=3"]) == 2
    assert "status takes only cluster.ssh.KEY=VALUE" in capsys.readouterr().err
    missing = _cli(ssh_login, "status", str(tmp_path / "none"), *ssh_login.overrides(), home=tmp_path / "nemorun")
    assert missing.returncode == 2
    assert f"error: {ssh_login.user}@{ssh_login.host}:{tmp_path}/none/config/viper.yaml not found" in missing.stderr
