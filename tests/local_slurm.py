"""The Slurm cluster the ``slurm`` tests submit to: the one ``scripts/local_slurm.sh up`` starts (or any whose
``sinfo`` answers, with the account ``nemo_viper``). Without one they are skipped with a line saying how to
start it; where ``CI`` is set they fail instead, so CI cannot pass by skipping them."""

import json
import os
import shutil
import subprocess
import time

import pytest

START = "start one with `sudo bash scripts/local_slurm.sh up` (stop it with `... down`)"
ACCOUNT = "nemo_viper"  # created by scripts/local_slurm.sh


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "no Slurm commands on PATH"
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip()}"
    if not any(state.startswith(("idle", "mixed", "allocated")) for state in result.stdout.split()):
        return f"no node is up (sinfo: {result.stdout.split()})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    problem = cluster_problem()
    if problem:
        message = f"no Slurm cluster ({problem}): {START}"
        if os.environ.get("CI"):
            pytest.fail(message + " -- CI must run the Slurm tests", pytrace=False)
        pytest.skip(message)
    return ACCOUNT


def sacct(job_id: str, history: bool = True) -> list[dict]:
    """``sacct`` rows (allocations only) of a job or its array tasks; with ``history``, every run of a
    requeued one (``-D``), else only the latest."""
    fields = ["JobID", "JobIDRaw", "State", "ExitCode", "Elapsed", "NodeList"]
    out = subprocess.run(["sacct", "-X", "-n", "-P", *(["-D"] if history else []), "-o", ",".join(fields),
                          "-j", job_id],
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines()]


def job_field(job_id: str, key: str) -> str:
    """One field of ``scontrol show job`` (e.g. JobState, Restarts, Reason)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    for item in out.split():
        if item.startswith(f"{key}="):
            return item.split("=", 1)[1]
    return ""


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def squeue_ids(name_prefix: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j"], capture_output=True, text=True).stdout
    return [line.split("|")[0] for line in out.splitlines() if line.split("|")[1].startswith(name_prefix)]


def recorded_jobs(run_dir) -> dict:
    return json.loads((run_dir / "state.json").read_text())["jobs"]
