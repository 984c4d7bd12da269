"""The closed loop's phases (:func:`nemo_viper.orchestration.plan`) as NeMo-Run jobs.

Only the phases that are not done are submitted (:func:`nemo_viper.run_state.select_phases`; ``start``
forces a restart point), each with ``afterok`` dependencies on the submitted phases it needs:

- ``slurm``: a ``SlurmExecutor`` per phase with the project image through pyxis (``cluster.container_image``),
  container mounts derived from the config's paths (:func:`nemo_viper.cluster.container_mounts`), the code
  of the image or shipped with the job (``cluster.code``) -- or, with ``container_image: null``, on the
  nodes' own environment after ``cluster.setup`` -- ``cluster.env``, the phase kind's time limit
  (``cluster.time.<kind>``), GPUs and site options (``cluster.options.<kind>``), ``--requeue`` (a requeued
  job resumes: RL from its last checkpoint, synthesis from its committed chunks), ``--kill-on-invalid-dep=yes``
  (the dependents of a failed job are cancelled, not left pending for ever), ``--exclusive`` for RL, and for
  RL ``--signal=<cluster.exit_signal>@<cluster.exit_signal_lead_s>``: the stage saves a checkpoint and exits
  with :data:`~nemo_viper.runtime.exit_signal.EXIT_REQUEUE`, on which its script runs ``scontrol requeue`` (a
  job at its time limit is not requeued by ``--requeue``), job
  names ``<name>.<phase>`` and logs in ``run_dir/logs/<phase>/``. A synthesis phase is **one job array** (``--array=0-(N-1)[%max_parallel]``),
  each task running ``--shard-index $SLURM_ARRAY_TASK_ID``; the RL job after it depends on the whole array.
  RL phases are one multi-node ``torchrun`` job.
- ``local``: a ``LocalExecutor`` per task (``torchrun`` for RL), run one after the other.

Every job runs :func:`task_script`: the preflight (``nemo-viper doctor``), the phase, then ``nemo-viper
mark-done`` (verifies the outputs and records the phase in ``state.json``). Every argument is
``shlex``-quoted; the strings a tool pastes into a shell unquoted are validated by
:mod:`nemo_viper.cluster`. ``dry_run`` renders the sbatch scripts without a cluster; dependencies on
jobs not yet submitted are shown as ``<task name>`` placeholders.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nemo_viper
from nemo_viper.cluster import container_mounts
from nemo_viper.config import SSHSection, ViperConfig
from nemo_viper.errors import NemoViperError
from nemo_viper.orchestration import Phase, RunPaths, plan, run_files, write_run_files
from nemo_viper.run_state import (STATE_FILE, PhaseState, RunState, add_jobs, clear_for_rerun, parse_state,
                                  select_phases)
from nemo_viper.runtime.exit_signal import EXIT_REQUEUE, parse_signal

REPO = Path(nemo_viper.__file__).resolve().parents[1]  # the checkout (cluster.code=package ships its HEAD)
CONTAINER_PYTHON = "python"  # the image's interpreter; local jobs use this process's
ARRAY_INDEX = '"$SLURM_ARRAY_TASK_ID"'
ACTIVE_SLURM_STATES = ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "CONFIGURING", "COMPLETING", "RESIZING",
                       "REQUEUE_HOLD", "REQUEUE_FED")


def task_name(phase: Phase, index: int | None = None) -> str:
    name = phase.name.replace(".", "-")
    return f"{name}-{index}" if index is not None else name


def task_script(config: ViperConfig, phase: Phase, shard: int | None = None) -> str:
    """The job's shell script: preflight, the phase (shard ``shard``, or the array task's), record.

    For a multi-task phase, ``shard=None`` means "this Slurm array task"; ``mark-done`` then accepts that
    the dataset is not complete yet (the last task to finish writes the manifest and records the phase).
    """
    run_dir = str(Path(config.run_dir).absolute())
    cli = (CONTAINER_PYTHON if config.cluster.executor == "slurm" else sys.executable, "-m", "nemo_viper.cli")
    work = shlex.join([*cli, *phase.args])
    if phase.tasks > 1:
        index = ARRAY_INDEX if shard is None else str(shard)
        work += f" --shard-index {index} --num-shards {phase.tasks}"
    if _signalled(config, phase):  # stopped by cluster.exit_signal with a checkpoint: requeued, resumes
        work += f' || {{ code=$?; [ "$code" -ne {EXIT_REQUEUE} ] || scontrol requeue "$SLURM_JOB_ID"; exit "$code"; }}'
    mark = [*cli, "mark-done", "--run-dir", run_dir, "--phase", phase.name]
    return "\n".join([
        "set -euo pipefail",
        shlex.join([*cli, "doctor", "--run-dir", run_dir, "--phase", phase.name]),
        work,
        shlex.join(mark + (["--partial-ok"] if phase.tasks > 1 else [])),
    ]) + "\n"


def _signalled(config: ViperConfig, phase: Phase) -> bool:
    """Whether the phase's job is warned ``cluster.exit_signal_lead_s`` before its time limit (RL on Slurm)."""
    return config.cluster.executor == "slurm" and phase.kind == "rl"


def _job_dir(config: ViperConfig) -> Path:
    return Path(config.cluster.job_dir or Path(config.run_dir).absolute() / "nemo_run")


def _slurm_executor(config: ViperConfig, phase: Phase):
    import nemo_run as run
    from nemo_run.core.execution.slurm import SlurmJobDetails

    cluster = config.cluster
    options = getattr(cluster.options, phase.kind)
    gpus = phase.gpus_per_node if options.gpus_per_node is None else options.gpus_per_node
    signal = ({"signal": f"{parse_signal('cluster.exit_signal', cluster.exit_signal).name[3:]}@"
                         f"{cluster.exit_signal_lead_s}"} if _signalled(config, phase) else {})
    packager = (run.GitArchivePackager(basepath=str(REPO), check_uncommitted_changes=True)
                if cluster.code == "package" else run.Packager())
    executor = run.SlurmExecutor(
        account=cluster.account,
        partition=cluster.partition or None,
        job_name_prefix=f"{config.name}.",
        time=getattr(cluster.time, phase.kind),
        nodes=phase.nodes,
        ntasks_per_node=phase.ranks_per_node if phase.distributed else 1,
        gpus_per_node=gpus or None,
        qos=options.qos,
        constraint=options.constraint,
        gres=options.gres,
        mem=options.mem,
        cpus_per_task=options.cpus_per_task,
        srun_args=_srun_args(config, options) or None,
        setup_lines=cluster.setup or None,
        exclusive=True if phase.kind == "rl" and cluster.exclusive_rl else None,
        array=(f"0-{phase.tasks - 1}" + (f"%{cluster.synthesis_max_parallel}" if cluster.synthesis_max_parallel else "")
               if phase.tasks > 1 else None),
        container_image=cluster.container_image,
        container_mounts=container_mounts(config) if cluster.container_image is not None else [],
        env_vars={name: shlex.quote(value) for name, value in cluster.env.items()},  # pasted into `export K=V`
        # requeue: NeMo-Run's sbatch command line has it too; shown here
        additional_parameters={"requeue": True, "kill_on_invalid_dep": "yes", **signal, **options.sbatch},
        tunnel=_tunnel(cluster.ssh, _job_dir(config)),
        packager=packager,
        launcher="torchrun" if phase.distributed else None,
        retries=cluster.max_retries,
        poll_estimated_start_time=False,
    )
    if cluster.ssh.host:  # held until the launcher has recorded them in the run's state file (_launch_selected)
        executor.additional_parameters["hold"] = True
    executor.job_details = SlurmJobDetails(folder=str(Path(config.run_dir).absolute() / "logs" / phase.name))
    return executor


def _srun_args(config: ViperConfig, options) -> list[str]:
    """The job step's ``srun`` arguments: without a container, the run dir as its working directory (NeMo-Run's own
    ``--chdir`` names a code directory that its plain packager does not create, and slurmstepd logs an error before
    falling back to /tmp; srun takes the last ``--chdir``), then the site's ``cluster.options.<kind>.srun_args``."""
    chdir = ["--chdir", str(Path(config.run_dir).absolute())] if config.cluster.container_image is None else []
    return [*chdir, *options.srun_args]


def _tunnel(ssh: SSHSection, job_dir: Path):
    """Where NeMo-Run puts the job files (``job_dir/experiments/<name>/<experiment id>``) and runs ``sbatch``:
    this machine (``LocalTunnel``: the experiment's own directory) or the login node ``cluster.ssh`` names
    (``SSHTunnel``)."""
    import nemo_run as run

    if not ssh.host:
        return run.LocalTunnel(job_dir=str(job_dir / "experiments"))
    return run.SSHTunnel(host=ssh.host, user=ssh.user, job_dir=str(job_dir / "experiments"), port=ssh.port,
                         identity=os.path.expanduser(ssh.identity) if ssh.identity else None)


class Cluster:
    """The Slurm commands and the run directory: on this machine, or on the login node through the SSH tunnel
    (``cluster.ssh``; every command ``shlex``-quoted, files written to a temporary name and renamed)."""

    def __init__(self, ssh: SSHSection | None = None, job_dir: Path = Path("/")):  # job_dir: for job files only
        self.tunnel = _tunnel(ssh, job_dir) if ssh is not None and ssh.host else None
        self.where = f"{ssh.user}@{ssh.host}" if self.tunnel else "this machine"

    def close(self) -> None:
        if self.tunnel is not None:
            self.tunnel.cleanup()

    @classmethod
    def of(cls, config: ViperConfig) -> Cluster:
        return cls(config.cluster.ssh, _job_dir(config))

    def command(self, argv: list[str]) -> tuple[int, str]:
        """``argv``'s exit status and standard output; 127 when the command is not there."""
        if self.tunnel is None:
            if shutil.which(argv[0]) is None:
                return 127, ""
            result = subprocess.run(argv, capture_output=True, text=True)
            return result.returncode, result.stdout
        result = self.tunnel.run(shlex.join(argv), hide=True, warn=True)
        return result.exited, result.stdout

    def remote(self, command: str) -> str:
        """``command``'s standard output on the login node; its failure is an error."""
        result = self.tunnel.run(command, hide=True, warn=True)
        if result.exited != 0:
            raise NemoViperError(f"on {self.where}: `{command}` failed (exit {result.exited}): "
                                 f"{' '.join(result.stderr.split())[:300]}")
        return result.stdout

    def read_text(self, path: Path) -> str | None:
        """A file's text on the cluster; ``None`` when there is none."""
        quoted = shlex.quote(str(path))
        text = self.remote(f"if test -e {quoted}; then echo FILE; cat -- {quoted}; fi")
        return text.removeprefix("FILE\n") if text.startswith("FILE\n") else None

    def read_state(self, run_dir: Path) -> dict:
        """The run's ``state.json`` (checked as :class:`RunState` reads it)."""
        if self.tunnel is None:
            return RunState(run_dir).read()
        path = run_dir / STATE_FILE
        return parse_state(self.read_text(path), f"{self.where}:{path}")

    def newest(self, directory: Path, pattern: str) -> Path | None:
        """The newest file in ``directory`` whose name matches the glob ``pattern``."""
        if self.tunnel is None:
            found = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime)
            return found[-1] if found else None
        listed = self.remote(f"cd -- {shlex.quote(str(directory))} 2>/dev/null && ls -1t -- {pattern} 2>/dev/null"
                              " || true").split()
        return directory / listed[0] if listed else None

    def write_files(self, files: dict[Path, str]) -> None:
        """Write each file on the cluster: created under a temporary name, then renamed over the old one."""
        self.remote(shlex.join(["mkdir", "-p", "--", *sorted({str(path.parent) for path in files})]))
        with tempfile.TemporaryDirectory() as scratch:
            for path, text in files.items():
                local = Path(scratch) / path.name
                local.write_text(text)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                self.tunnel.put(str(local), str(tmp))
                self.remote(shlex.join(["mv", "-f", "--", str(tmp), str(path)]))

    def make_dirs(self, paths: list[Path]) -> None:
        if self.tunnel is None:
            for path in paths:
                path.mkdir(parents=True, exist_ok=True)
        else:
            self.remote(shlex.join(["mkdir", "-p", "--", *map(str, paths)]))


def _local_executor(phase: Phase):
    import nemo_run as run

    launcher = "torchrun" if phase.distributed else None
    return run.LocalExecutor(ntasks_per_node=phase.ranks_per_node if phase.distributed else 1, launcher=launcher)


def _script(text: str):
    import nemo_run as run

    return run.Script(inline=text)


@dataclass(frozen=True)
class SlurmTask:
    """One job or array task as the scheduler reports it: ``sacct``'s state, exit code and elapsed time, and
    ``squeue``'s reason while it waits (``Dependency``, ``Resources``, ...; empty when it is not queued)."""

    task: str  # 1234 or 1234_5 (array task; 1234_[0-3] for array tasks not started yet)
    raw_id: str  # the id Slurm gives this task's process (%j in its log's name)
    state: str
    exit_code: str = ""
    elapsed: str = ""
    reason: str = ""


def slurm_tasks(job_ids: list[str], cluster: Cluster | None = None) -> dict[str, list[SlurmTask]]:
    """Slurm job id -> its tasks (``sacct``, with ``squeue``'s pending reasons); empty without Slurm there."""
    command = (cluster or Cluster()).command
    if not job_ids:
        return {}
    _, accounting = command(["sacct", "-X", "-n", "-P", "-o", "JobID,JobIDRaw,State,ExitCode,Elapsed", "-j",
                             ",".join(job_ids)])
    _, queued = command(["squeue", "-h", "-o", "%i|%r", "-j", ",".join(job_ids)])
    reasons = dict(line.split("|", 1) for line in queued.splitlines() if "|" in line)
    tasks: dict[str, list[SlurmTask]] = {}
    for line in accounting.splitlines():
        task, raw, state, exit_code, elapsed = (line.split("|") + [""] * 5)[:5]
        reason = reasons.get(task, "")
        tasks.setdefault(task.split("_")[0].split(".")[0], []).append(SlurmTask(
            task, raw, state.split()[0] if state else "UNKNOWN", exit_code, elapsed,
            "" if reason in ("None", "(null)") else reason))
    return tasks


def slurm_job_states(job_ids: list[str], cluster: Cluster | None = None) -> dict[str, list[str]]:
    """Slurm job id -> the states of its tasks (``sacct``); empty when Slurm is not reachable."""
    return {job: [t.state for t in tasks] for job, tasks in slurm_tasks(job_ids, cluster).items()}


FAILED_SLURM_STATES = ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "CANCELLED", "BOOT_FAIL", "DEADLINE",
                       "PREEMPTED")


def task_log(run_dir: Path, phase_name: str, task: SlurmTask, cluster: Cluster | None = None) -> Path | None:
    """The newest log of one Slurm task (NeMo-Run's ``srun --output`` ``log-<job>_<raw id>_<restart>.out``)."""
    if not task.raw_id.isdigit():  # sacct's numeric id; it becomes part of a glob
        return None
    return (cluster or Cluster()).newest(run_dir / "logs" / phase_name, f"log-*_{task.raw_id}_*.out")


def check_pyxis(cluster: Cluster | None = None) -> None:
    """With a container image, ``srun`` must take ``--container-image`` (the pyxis plugin): checked on the
    login node before anything is submitted, instead of every job failing at its first ``srun``."""
    cluster = cluster or Cluster()
    status, help_text = cluster.command(["srun", "--help"])
    if status == 127:
        raise NemoViperError(f"srun not found on {cluster.where}: launch from a Slurm login node, or through one "
                             "(cluster.ssh.host), or with cluster.executor=local")
    if "--container-image" not in help_text:
        raise NemoViperError("this cluster's srun has no --container-image (the pyxis plugin is not installed): "
                             "set cluster.container_image=null to run jobs without a container (cluster.setup "
                             "names their Python environment)")


def _refuse_in_flight(selected: list[Phase], jobs: dict, cluster: Cluster) -> None:
    pending = {p.name: jobs[p.name]["job_id"] for p in selected if p.name in jobs}
    states = slurm_job_states(list(pending.values()), cluster)
    busy = [f"{name} (job {job_id}: {', '.join(sorted(set(states[job_id])))})" for name, job_id in pending.items()
            if any(s in ACTIVE_SLURM_STATES for s in states.get(job_id, []))]
    if busy:
        raise NemoViperError(f"phases still queued or running on Slurm: {'; '.join(busy)}: wait for them, or "
                             "scancel them, before launching again")


def _describe(phases: list[Phase], states: dict[str, PhaseState], selected: list[Phase]) -> str:
    lines = []
    for phase in phases:
        action = "submit" if phase in selected else "skip"
        lines.append(f"{action:<7}{phase.name:<16}{states[phase.name].detail}")
    return "\n".join(lines)


def sbatch_scripts(config: ViperConfig, phases: list[Phase] | None = None) -> dict[str, str]:
    """Task name -> :func:`sbatch_script` of each of ``phases`` (default: the whole plan), submitted together."""
    phases = plan(config) if phases is None else phases
    return {task_name(phase): sbatch_script(config, phase, phases) for phase in phases}


def sbatch_script(config: ViperConfig, phase: Phase, submitted: list[Phase]) -> str:
    """The sbatch script Slurm would get for ``phase``, submitted with ``submitted`` (its ``afterok``
    dependencies are on those it depends on, shown as ``<task name>``), followed by the task script it runs
    (no cluster needed)."""
    import nemo_run as run
    from nemo_run.run.torchx_backend.packaging import package
    from nemo_run.run.torchx_backend.schedulers.slurm import SlurmTunnelScheduler

    name = task_name(phase)
    executor = _slurm_executor(config, phase)
    executor.dependencies = [f"dryrun:///<{task_name(p)}>" for p in submitted if p.name in phase.depends_on]
    text = task_script(config, phase)
    with tempfile.TemporaryDirectory() as scratch:  # NeMo-Run writes the rendered files there, not in the run
        executor.tunnel = run.LocalTunnel(job_dir=scratch)  # rendered here, whatever the tunnel
        executor.assign(exp_id=config.name, exp_dir=scratch, task_id=name, task_dir=name)
        app = package(name=name, fn_or_script=_script(text), executor=executor)
        request = SlurmTunnelScheduler(session_name="nemo_viper_dryrun")._submit_dryrun(app, executor).request
        sbatch = request.materialize().replace(scratch, str(_job_dir(config)))
    return f"{sbatch}\n# --- task script ({name}.sh) ---\n{text}"


def launch(config: ViperConfig, dry_run: bool = False, start: str | None = None) -> str:
    """Submit (or, with ``dry_run``, render) the phases that are not done. Returns what was (or would be)
    done: one line per phase (submit/skip and why), then, for a Slurm dry run, every sbatch script."""
    cluster = Cluster.of(config)
    try:
        return _launch(config, dry_run, start, cluster)
    finally:
        cluster.close()


def _launch(config: ViperConfig, dry_run: bool, start: str | None, cluster: Cluster) -> str:
    phases = plan(config)
    run_dir = Path(config.run_dir).absolute()
    state = cluster.read_state(run_dir)
    selected, states = select_phases(phases, run_dir, start, state["phases"] if cluster.tunnel else None)
    report = _describe(phases, states, selected)
    if dry_run:
        if config.cluster.executor == "slurm":
            report += "".join(f"\n######## {name}\n{text}" for name, text in sbatch_scripts(config, selected).items())
        return report
    if not selected:
        return report + "\nnothing to submit: every phase is done"
    return _launch_selected(config, run_dir, report, selected, states, cluster, state)  # the caller owns the run dir


def _launch_selected(config: ViperConfig, run_dir: Path, report: str, selected: list[Phase],
                     states: dict[str, PhaseState], cluster: Cluster, state: dict) -> str:
    _refuse_in_flight(selected, state["jobs"], cluster)
    if config.cluster.executor == "slurm" and config.cluster.container_image is not None:
        check_pyxis(cluster)
    revision = _packaged_revision() if config.cluster.executor == "slurm" and config.cluster.code == "package" else None
    if cluster.tunnel is None:
        write_run_files(config)
        moved = clear_for_rerun(selected, states, run_dir)
    else:
        _refuse_set_aside_through_tunnel(selected, states, cluster, run_dir)
        cluster.write_files(run_files(config))
        moved = []
    cluster.make_dirs([run_dir / "logs" / phase.name for phase in selected])
    jobs = _submit(config, selected)
    for job in jobs.values():
        job["code"] = f"package {revision}" if revision else "image"
    if jobs and cluster.tunnel is None:
        RunState(run_dir).record_jobs(jobs)
    elif jobs:  # held (see _slurm_executor): no job of this run can write the state file until they are released
        recorded = cluster.read_state(run_dir)
        add_jobs(recorded, jobs)
        cluster.write_files({run_dir / STATE_FILE: json.dumps(recorded, indent=2) + "\n"})
        cluster.remote(shlex.join(["scontrol", "release", ",".join(job["job_id"] for job in jobs.values())]))
    lines = [report, *moved] + [f"{name}: Slurm job {job['job_id']}" for name, job in jobs.items()]
    return "\n".join(lines)


def _refuse_set_aside_through_tunnel(selected: list[Phase], states: dict[str, PhaseState], cluster: Cluster,
                                     run_dir: Path) -> None:
    """Setting aside the outputs of a phase that re-runs with another configuration (or ``--from``) moves
    directories and edits the state file under the run dir's lock, which is taken on the machine that mounts it."""
    stale = [phase.name for phase in selected if states[phase.name].stale]
    if stale:
        raise NemoViperError(f"{', '.join(stale)} would re-run ({states[stale[0]].detail}), which first sets their "
                             f"outputs aside under the run dir's lock: launch this once where {run_dir} is mounted "
                             f"(not through {cluster.where})")


def _packaged_revision() -> str:
    """The commit ``cluster.code=package`` ships (NeMo-Run archives ``HEAD``): refused with uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    if git("rev-parse", "--git-dir").returncode != 0:
        raise NemoViperError(f"cluster.code=package ships the git HEAD of {REPO}, which is not a git checkout")
    if git("diff", "--quiet", "HEAD", "--").returncode != 0:
        raise NemoViperError(f"cluster.code=package ships the committed HEAD of {REPO}, which has uncommitted "
                             "changes: commit them (or use cluster.code=image)")
    return git("rev-parse", "HEAD").stdout.strip()


def _submit(config: ViperConfig, selected: list[Phase]) -> dict[str, dict]:
    import nemo_run as run

    slurm = config.cluster.executor == "slurm"
    submitted = {p.name for p in selected}
    # The experiment's record: beside the job files, or on this machine ($NEMORUN_HOME) with an SSH tunnel
    base_dir = None if config.cluster.ssh.host else str(_job_dir(config))
    with run.Experiment(config.name, base_dir=base_dir, log_level="WARN") as experiment:
        ids: dict[str, list[str]] = {}
        for phase in selected:
            if slurm:
                deps = [i for d in phase.depends_on if d in submitted for i in ids[d]]
                ids[phase.name] = [experiment.add(_script(task_script(config, phase)), executor=_slurm_executor(
                    config, phase), name=task_name(phase), dependencies=deps or None)]
            else:
                shards = range(phase.tasks) if phase.tasks > 1 else [None]
                ids[phase.name] = [experiment.add(_script(task_script(config, phase, shard)),
                                                  executor=_local_executor(phase), name=task_name(phase, shard))
                                   for shard in shards]
        experiment.run(sequential=not slurm, detach=slurm)
        if not slurm:
            return {}
        handles = {job.id: job.handle for job in experiment.jobs}
    jobs = {}
    for phase in selected:
        handle = handles.get(ids[phase.name][0], "")
        jobs[phase.name] = {"job_id": handle.partition("://")[2].split("/")[1] if "://" in handle else handle,
                            **({"array": f"0-{phase.tasks - 1}"} if phase.tasks > 1 else {})}
    return jobs


def status(run_dir: str | Path, ssh: SSHSection | None = None) -> str:
    """``nemo-viper status RUN_DIR``: each phase's state and why; its Slurm job with the scheduler's states,
    the reason it waits (``squeue``), exit code and elapsed time (``sacct``); then the log of each failed task.
    With ``ssh`` (a login node), the run dir and Slurm are read through the tunnel."""
    cluster = Cluster(ssh)
    try:
        return _status(run_dir, cluster)
    finally:
        cluster.close()


def _status(run_dir: str | Path, cluster: Cluster) -> str:
    from nemo_viper.orchestration import load_run_config
    from nemo_viper.run_state import phase_states

    remote = cluster.tunnel is not None
    text = cluster.read_text(RunPaths(run_dir).config) if remote else None
    if remote and text is None:
        raise NemoViperError(f"{cluster.where}:{RunPaths(run_dir).config} not found: not a run directory (or "
                             "nothing was launched in it yet)")
    config = load_run_config(run_dir, text)
    phases = plan(config)
    root = RunPaths(config.run_dir).root
    state = cluster.read_state(root)
    states = phase_states(phases, root, state["phases"] if remote else None)
    jobs = state["jobs"]
    slurm = slurm_tasks([j["job_id"] for j in jobs.values()], cluster)
    rows = [("phase", "state", "slurm job", "detail")]
    failures = []
    for phase in phases:
        state = states[phase.name]
        job = jobs.get(phase.name)
        job_text = ""
        if job:
            tasks = slurm.get(job["job_id"], [])
            job_text = " ".join([job["job_id"], _summary(tasks)]).strip()
            failures += [(phase.name, t) for t in tasks if t.state in FAILED_SLURM_STATES]
        rows.append((phase.name, "done" if state.done else "pending", job_text, state.detail))
    widths = [max(len(row[i]) for row in rows) + 2 for i in range(3)]
    lines = ["".join(cell.ljust(w) for cell, w in zip(row, widths)) + row[3] for row in rows]
    for name, task in failures:
        log = task_log(root, name, task, cluster)
        lines.append(f"{name}: Slurm job {task.task} {task.state} (exit {task.exit_code}, after {task.elapsed}), "
                     f"log: {log or 'none written'}")
    return "\n".join(lines)


def _summary(tasks: list[SlurmTask]) -> str:
    """One job: ``STATE exit X elapsed T`` or ``STATE (reason)``; an array: ``STATE:count`` per state."""
    if len(tasks) == 1:
        task = tasks[0]
        if task.reason:
            return f"{task.state} ({task.reason})"
        if task.state in ACTIVE_SLURM_STATES:
            return f"{task.state} elapsed {task.elapsed}"
        return f"{task.state} exit {task.exit_code} elapsed {task.elapsed}"
    states = [t.state for t in tasks]
    reasons = sorted({t.reason for t in tasks if t.reason})
    return ",".join(f"{s}:{states.count(s)}" for s in sorted(set(states))) + (
        f" ({', '.join(reasons)})" if reasons else "")
