"""The tiny recipe as real Slurm jobs (``tests/local_slurm.py``: ``scripts/local_slurm.sh up``), with the fault
drills a cluster user meets, all on one launched run (one tiny loop is the cost; each drill adds a restart):

1. two launches of the run dir at once: one submits, the other refuses with one line;
2. a phase that fails (its preflight: ``cluster.min_free_disk_gb`` too large): its dependents are cancelled,
   not left pending for ever (``--kill-on-invalid-dep=yes``); ``status`` names the failed job and its log;
   the next ``launch`` (fixed config) resubmits from the failed phase, no ``scancel`` by hand;
3. ``scontrol requeue`` of one running stage-1 synthesis array task: it runs again, its shard is completed
   once (no duplicate sample ids);
4. ``scancel`` of the running stage-1 RL job after its first checkpoint: the next ``launch`` resumes it from
   that checkpoint (the step-1 checkpoint is not rewritten);
5. the stage-2 RL job at its time limit: warned ahead (``--signal``), it saves a checkpoint, requeues itself
   and resumes from that checkpoint;
6. the node set DOWN while the stage-2 RL job runs: the job is requeued (``--requeue``) and, the node back,
   finishes;
and the loop's outputs: synthesis as a 2-task job array, RL under ``srun`` + ``torchrun``, ``afterok`` chains,
every phase done, the exported HF policy and the run report; both datasets equal those that ``nemo-viper run``'s
own phase commands write from the same inputs.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import skimage
from local_slurm import job_field, recorded_jobs, sacct, slurm_cluster, wait_until  # noqa: F401 (fixture)

from nemo_viper.config import ClusterSection
from nemo_viper.data.shards import ShardDataset
from nemo_viper.runtime.exit_signal import parse_signal

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png")  # two per synthesis shard
# Short phases: 2 RL steps of 2 prompts (a checkpoint after each: the scancel drill needs step 1's), synthesis
# of 4 photos in 2 array tasks. The tiny model keeps the recipe's warm start: with less, stage-2 synthesis
# keeps no sample and stage-2 RL has no data.
NAME = f"drill{os.getpid()}"  # the jobs' name prefix: this run's jobs, not those of another run beside it
SHORT = [f"name={NAME}", "rl.steps=2", "rl.save_every=1", "rl.n=4", "rl.prompts_per_step=2", "synthesis.num_shards=2",
         "cluster.container_image=null"]
PHASE_TIMEOUT_S = 600
EXIT_SIGNAL = parse_signal("cluster.exit_signal", ClusterSection.exit_signal)  # the RL jobs' --signal


def launch(run_dir: Path, account: str, *extra: str, wait: bool = True):
    """``nemo-viper launch`` of the tiny recipe on Slurm, in a process of its own (as a user runs it)."""
    photos = run_dir.parent / "photos.txt"
    photos.write_text("".join(f"{Path(skimage.data_dir) / name}\n" for name in PHOTOS))
    args = [sys.executable, "-m", "nemo_viper.cli", "launch", "--recipe", "tiny", "--executor", "slurm",
            f"run_dir={run_dir}", f"cluster.account={account}", f"synthesis.images={photos}",
            f"cluster.setup='source {Path(sys.prefix) / 'bin' / 'activate'}'", *SHORT, *extra]
    env = {**os.environ, "NEMORUN_HOME": str(run_dir.parent / "nemorun")}
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    return process.communicate(timeout=300) + (process.returncode,) if wait else process


def status(run_dir: Path) -> str:
    return subprocess.run([sys.executable, "-m", "nemo_viper.cli", "status", str(run_dir)], capture_output=True,
                          text=True, check=True).stdout


def done(run_dir: Path) -> set[str]:
    path = run_dir / "state.json"
    return set(json.loads(path.read_text())["phases"]) if path.is_file() else set()


def states(job_id: str) -> set[str]:
    """The states of the job's tasks, the latest run of each (a requeued task's earlier runs left out)."""
    return {row["State"].split()[0] for row in sacct(job_id, history=False)}


def finished(job_id: str) -> bool:
    return bool(states(job_id)) and not states(job_id) & {"PENDING", "RUNNING", "REQUEUED", "COMPLETING",
                                                          "CONFIGURING"}


@pytest.fixture(scope="module")
def drilled(slurm_cluster, tmp_path_factory):
    """Runs the drills in order on one run dir; returns what each observed (asserted by the tests below)."""
    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    seen = {}
    try:
        _drill(run_dir, slurm_cluster, seen)
    finally:  # nothing of this run may outlive the module
        ids = [job["job_id"] for job in recorded_jobs(run_dir).values()] if (run_dir / "state.json").is_file() else []
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
        subprocess.run(["scontrol", "update", f"nodename={os.uname().nodename.split('.')[0]}", "state=resume"],
                       capture_output=True)
    return run_dir, seen


def running_with(*args: str) -> list[int]:
    """Processes whose command line holds all of ``args`` (as whole arguments)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if proc.name.isdigit() and all(a in argv for a in args):
            pids.append(int(proc.name))
    return pids


def main_processes(pids: list[int]) -> list[int]:
    """Those of ``pids`` whose parent is not one of them (a process's forked children share its command line)."""
    def parent(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    return [pid for pid in pids if parent(pid) not in pids]


def proc_status(pid: int, field: str) -> str:
    """The first word of a ``/proc/PID/status`` field (``State``: ``T`` when stopped); ``""`` when gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
    return next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))


def handles(pid: int, signum: int) -> bool:
    """Whether the process has a handler for ``signum`` (``SigCgt``, the mask of caught signals)."""
    return bool(int(proc_status(pid, "SigCgt") or "0", 16) >> (signum - 1) & 1)


def job_steps_alive(job_id: str) -> bool:
    """Whether a ``slurmstepd`` of ``job_id`` still runs here (its process title is ``slurmstepd: [ID.step]``):
    started again before it is gone, the job hits slurmd's "Duplicate jobid" and the node is drained."""
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith((f"slurmstepd: [{job_id}.", f"slurmstepd: [{job_id}]")):
            return True
    return False


def start_now(job_id: str, *args: str) -> None:
    """Slurm holds a requeued job for about two minutes (its BeginTime), time for the killed run's processes
    (those with ``args`` on their command line) and its step daemons to exit; the drills wait for that exit,
    not the two minutes."""
    wait_until(lambda: job_field(job_id, "JobState") == "PENDING", 60, f"job {job_id} pending again")
    wait_until(lambda: not running_with(*args), 120, f"the processes of job {job_id}'s killed run to exit")
    wait_until(lambda: not job_steps_alive(job_id), 120, f"the step daemons of job {job_id}'s killed run to exit")
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], check=True)


def _drill(run_dir: Path, account: str, seen: dict) -> None:
    # 1 + 2: two launches at once of a config whose first job fails its preflight.
    first, second = (launch(run_dir, account, "cluster.min_free_disk_gb=1e9", wait=False) for _ in range(2))
    seen["concurrent"] = [p.communicate(timeout=300) + (p.returncode,) for p in (first, second)]
    seen["jobs_after_concurrent"] = recorded_jobs(run_dir)
    seen["prepare_jobs"] = subprocess.run(  # every prepare job of this run the controller knows (MinJobAge=600)
        ["squeue", "-h", "-t", "all", "-o", "%i", f"--name={NAME}.prepare"], capture_output=True, text=True,
        check=True).stdout.split()
    jobs = seen["jobs_after_concurrent"]
    wait_until(lambda: all(finished(job["job_id"]) for job in jobs.values()), 180,
               "the failed prepare job and its cancelled dependents")
    seen["failed_states"] = {name: states(job["job_id"]) for name, job in jobs.items()}
    seen["failed_status"] = status(run_dir)
    seen["relaunch"] = launch(run_dir, account)

    # 3: requeue one running stage-1 synthesis array task.
    synth1 = recorded_jobs(run_dir)["round1.synth1"]["job_id"]
    task = f"{synth1}_1"
    wait_until(lambda: job_field(task, "JobState") == "RUNNING", PHASE_TIMEOUT_S, "synthesis task 1 running",
               poll_s=0.5)
    subprocess.run(["scontrol", "requeue", task], check=True)
    wait_until(lambda: int(job_field(task, "Restarts") or 0) >= 1, 60, "the requeued task's restart")
    start_now(task, str(run_dir / "round1" / "synth1"), "1")

    # 4: scancel stage-1 RL after its first checkpoint; relaunch; it resumes from that checkpoint.
    rl1 = recorded_jobs(run_dir)["round1.rl1"]["job_id"]
    step1 = run_dir / "round1" / "rl1" / "checkpoints" / "step_0000001"
    wait_until(lambda: (step1 / "nemo_viper_checkpoint.json").is_file() or finished(rl1), PHASE_TIMEOUT_S * 2,
               "stage-1 RL's first checkpoint", poll_s=0.5)
    seen["rl1_cancelled_running"] = "RUNNING" in states(rl1)
    subprocess.run(["scancel", rl1], check=True)
    seen["step1_before"] = (step1 / "nemo_viper_checkpoint.json").stat().st_mtime_ns
    wait_until(lambda: finished(rl1) and all(finished(j["job_id"]) for j in recorded_jobs(run_dir).values()),
               120, "the cancelled RL job's dependents to be cancelled")
    seen["rl1_states"] = states(rl1)
    seen["resume_launch"] = launch(run_dir, account)

    # 5: stage-2 RL reaches its time limit: signalled ahead, it saves, exits 75 and requeues itself.
    rl2 = recorded_jobs(run_dir)["round1.rl2"]["job_id"]
    rl2_dir = run_dir / "round1" / "rl2"
    train = wait_until(lambda: [pid for pid in main_processes(running_with("train", "--out", str(rl2_dir)))
                                if handles(pid, EXIT_SIGNAL)], PHASE_TIMEOUT_S * 2,
                       "stage-2 RL's train process with its exit-signal handler", poll_s=0.5)[0]
    # Paused between its handler's installation and its first step, the stage cannot finish before the signal
    # arrives (slurmctld checks time limits every 30 s). slurmstepd sends SIGCONT with the signal: the pause
    # ends when the signal comes.
    os.kill(train, signal.SIGSTOP)
    wait_until(lambda: proc_status(train, "State") == "T", 30, "stage-2 RL's train process paused", poll_s=0.1)
    limit = job_field(rl2, "TimeLimit")
    days, _, clock = job_field(rl2, "RunTime").rpartition("-")
    elapsed_min = int(days or 0) * 1440 + int(clock.split(":")[0]) * 60 + int(clock.split(":")[1])
    # 4-5 minutes left: less than the signal's lead (cluster.exit_signal_lead_s), more than a step and a save
    subprocess.run(["scontrol", "update", f"jobid={rl2}", f"timelimit={elapsed_min + 5}"], check=True)
    try:
        wait_until(lambda: proc_status(train, "State") != "T", 120, "Slurm's --signal ahead of the time limit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(train, signal.SIGCONT)
    wait_until(lambda: int(job_field(rl2, "Restarts") or 0) >= 1, 120, "stage-2 RL to requeue itself")
    seen["timelimit_checkpoints"] = {p.name: (p / "nemo_viper_checkpoint.json").stat().st_mtime_ns
                                     for p in (rl2_dir / "checkpoints").glob("step_*")}
    subprocess.run(["scontrol", "update", f"jobid={rl2}", f"timelimit={limit}"], check=True)  # the job's own again
    start_now(rl2, str(rl2_dir))

    # 6: the node DOWN while stage-2 RL runs: requeued; the node back, it finishes.
    node = wait_until(lambda: job_field(rl2, "JobState") == "RUNNING" and job_field(rl2, "NodeList"),
                      PHASE_TIMEOUT_S * 2, "stage-2 RL running", poll_s=0.5)
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=nemo_viper_drill"], check=True)
    wait_until(lambda: int(job_field(rl2, "Restarts") or 0) >= 2, 60, "stage-2 RL requeued after its node went down")
    seen["rl2_restarts"] = int(job_field(rl2, "Restarts"))
    start_now(rl2, str(rl2_dir))
    # Back in service: by hand, or by itself once its slurmd answers (ReturnToService=2 in local_slurm.sh).
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    wait_until(lambda: not subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True,
                                          text=True).stdout.strip().startswith(("down", "drain")), 60, "the node back")
    if "held" in job_field(rl2, "Reason"):  # a launch that raced the node's return is held, not lost
        subprocess.run(["scontrol", "release", rl2], check=True)

    report = recorded_jobs(run_dir)["report"]["job_id"]
    wait_until(lambda: finished(report), PHASE_TIMEOUT_S * 2, "the report job, after the export job")
    seen["synth1_tasks"] = sacct(synth1)
    seen["synth1_restarts"] = int(job_field(task, "Restarts") or 0)
    seen["rl2_runs"] = sacct(rl2)
    seen["final_status"] = status(run_dir)


def test_two_launches_at_once_one_refuses_with_one_line(drilled):
    run_dir, seen = drilled
    results = sorted(seen["concurrent"], key=lambda r: r[2])
    (_, _, ok), (_, err, refused) = results
    assert (ok, refused) == (0, 2)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert seen["prepare_jobs"] == [seen["jobs_after_concurrent"]["prepare"]["job_id"]]
    # one set of jobs: prepare, synth1, rl1, synth2, rl2, export, report
    assert len(seen["jobs_after_concurrent"]) == 7
    assert len(set(j["job_id"] for j in seen["jobs_after_concurrent"].values())) == 7


def test_a_failed_phase_cancels_its_dependents_status_names_its_log_and_launch_resubmits(drilled):
    run_dir, seen = drilled
    failed = seen["failed_states"]
    assert failed["prepare"] == {"FAILED"}
    assert all(s == {"CANCELLED"} for name, s in failed.items() if name != "prepare"), failed
    prepare_id = seen["jobs_after_concurrent"]["prepare"]["job_id"]
    line = next(l for l in seen["failed_status"].splitlines() if l.startswith(f"prepare: Slurm job {prepare_id} "))
    assert "FAILED (exit 2:0" in line
    log = Path(line.rsplit("log: ", 1)[1])
    assert "free" in log.read_text() and log.is_relative_to(run_dir / "logs" / "prepare")
    out, err, code = seen["relaunch"]
    assert code == 0, err
    assert "submit prepare" in out and "export: Slurm job" in out


def test_a_cancelled_rl_job_resumes_from_its_checkpoint(drilled):
    run_dir, seen = drilled
    assert seen["rl1_cancelled_running"] and seen["rl1_states"] == {"CANCELLED"}
    out, err, code = seen["resume_launch"]
    assert code == 0, err
    assert "skip   round1.synth1" in out and "submit round1.rl1" in out
    step1 = run_dir / "round1" / "rl1" / "checkpoints" / "step_0000001" / "nemo_viper_checkpoint.json"
    assert step1.stat().st_mtime_ns == seen["step1_before"], "stage-1 RL restarted from step 0"
    assert (run_dir / "round1" / "rl1" / "checkpoints" / "step_0000002").is_dir()


def test_a_requeued_synthesis_task_completes_its_shard_once(drilled):
    run_dir, seen = drilled
    assert seen["synth1_restarts"] >= 1
    runs = {}  # array task -> its states, oldest first (sacct -D: every run of a requeued task)
    for row in seen["synth1_tasks"]:
        runs.setdefault(row["JobID"], []).append(row["State"].split()[0])
    synth1 = recorded_jobs(run_dir)["round1.synth1"]["job_id"]
    assert runs == {f"{synth1}_0": ["COMPLETED"], f"{synth1}_1": ["REQUEUED", "COMPLETED"]}
    data = ShardDataset(run_dir / "round1" / "synth1")
    ids = [data.record(i).id for i in range(len(data))]
    assert ids and len(ids) == len(set(ids))


def test_an_rl_job_at_its_time_limit_saves_requeues_itself_and_resumes(drilled):
    run_dir, seen = drilled
    runs = [row["State"].split()[0] for row in seen["rl2_runs"]]
    assert runs[0] == "REQUEUED" and "TIMEOUT" not in runs, runs
    rl2 = recorded_jobs(run_dir)["round1.rl2"]["job_id"]
    first_log = next((run_dir / "logs" / "round1.rl2").glob(f"log-*_{rl2}_0.out")).read_text()
    assert "RL stage 2 stopped after step 1 on SIGURG" in first_log
    saved = seen["timelimit_checkpoints"]
    assert list(saved) == ["step_0000001"]
    checkpoint = run_dir / "round1" / "rl2" / "checkpoints" / "step_0000001" / "nemo_viper_checkpoint.json"
    assert checkpoint.stat().st_mtime_ns == saved["step_0000001"], "stage-2 RL restarted from step 0"
    metrics = (run_dir / "round1" / "rl2" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]


def test_a_job_on_a_node_set_down_is_requeued_and_finishes(drilled):
    run_dir, seen = drilled
    assert seen["rl2_restarts"] >= 2  # the time-limit requeue, then the node's
    assert (run_dir / "round1" / "rl2" / "checkpoints" / "step_0000002").is_dir()


def test_the_loop_ran_as_slurm_jobs_to_the_end(drilled):
    run_dir, seen = drilled
    assert done(run_dir) == {"prepare", "round1.synth1", "round1.rl1", "round1.synth2", "round1.rl2", "export",
                             "report"}
    assert (run_dir / "final_hf" / "config.json").is_file()
    report = (run_dir / "report" / "report.md").read_text()  # written by the last job, from the run's own files
    assert "## Round 1" in report and "| rl2 | 2 |" in report and "What the policy says" in report
    assert (run_dir / "report" / "round1_reward.png").is_file()
    logs = [log for log in (run_dir / "logs").rglob("*.out") if "couldn't chdir" in log.read_text(errors="replace")]
    assert not logs, f"slurmstepd could not enter the job's working directory: {logs[0]}"
    jobs = recorded_jobs(run_dir)
    synth1 = sacct(jobs["round1.synth1"]["job_id"], history=False)
    assert sorted(row["JobID"] for row in synth1) == [f"{jobs['round1.synth1']['job_id']}_{i}" for i in (0, 1)]
    rl_script = next((run_dir / "nemo_run").rglob("round1-rl1_sbatch.sh")).read_text()
    assert "srun " in rl_script and " torchrun " in rl_script and "--kill-on-invalid-dep=yes" in rl_script
    rows = {line.split()[0]: line.split()[1:4] for line in seen["final_status"].splitlines()[1:]}
    assert rows["round1.rl1"] == ["done", jobs["round1.rl1"]["job_id"], "COMPLETED"]
    assert rows["round1.synth1"] == ["done", jobs["round1.synth1"]["job_id"], "COMPLETED:2"]


@pytest.mark.parametrize("stage", ["synth1", "synth2"])
def test_each_synthesis_array_wrote_the_dataset_that_a_local_run_writes(drilled, stage, tmp_path):
    """Each synthesis phase as a Slurm array (stage 1's task 1 requeued mid-run; stage 2 from the stage-1 RL job
    that was cancelled and resumed) wrote, byte for byte, the dataset that its two tasks write when run here one
    after the other, as ``nemo-viper run`` runs them (``local_run.phase_command``: the same config, seed and
    inputs, i.e. the starting policy or the Slurm run's stage-1 checkpoint and stage-1 data): the same shards
    (SHA-256) and the same manifest, its timings and the output directory aside. Phase by phase, with the Slurm
    run's own inputs: a whole second run costs minutes. The thread count matters: stage 2 stores the edited
    images, whose floats another thread count sums in another order (the shards differed with one thread here)."""
    from nemo_viper.local_run import phase_command
    from nemo_viper.orchestration import load_run_config, plan

    run_dir, _ = drilled
    phase = next(p for p in plan(load_run_config(run_dir)) if p.name == f"round1.{stage}")
    slurm_out, local_out = str(run_dir / "round1" / stage), str(tmp_path / stage)
    for index in range(phase.tasks):
        command = [local_out if arg == slurm_out else arg for arg in phase_command(phase, index)]
        assert local_out in command
        # in this process's environment, as `nemo-viper run` starts its phases and as the jobs inherited it from
        # `launch`: the torch thread count that sums the diffusion edits' floats is the same
        result = subprocess.run(command, env=os.environ, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    def manifest(out: str) -> dict:
        data = json.loads(Path(out, "manifest.json").read_text().replace(out, "<out>"))
        data.pop("timings_s")
        return data

    assert manifest(local_out) == manifest(slurm_out)
    assert manifest(slurm_out)["total_samples"] > 0
