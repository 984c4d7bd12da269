"""The closed loop's phases (:func:`nemo_viper.orchestration.plan`) as NeMo-Run jobs.

Every phase task becomes one NeMo-Run task with its own executor:

- ``slurm``: a ``SlurmExecutor`` with the account/partition/time of ``cluster``, the NGC NeMo container
  through pyxis (``container_image``, ``container_mounts``), the environment of ``cluster.env``. RL phases
  run as one multi-node ``torchrun`` job (``nodes`` x ``gpus_per_node`` ranks); each synthesis shard task
  is its own single-node job; every job depends (``afterok``) on the tasks of the phases before it.
- ``local``: a ``LocalExecutor`` (``torchrun`` for RL phases), the same graph run in order.

``--dry-run`` renders every sbatch script without a cluster; dependencies on jobs not yet submitted are
shown as ``<task name>`` placeholders where Slurm job ids will be.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from nemo_viper.config import ViperConfig
from nemo_viper.orchestration import Phase, plan, write_run_files


def _task_name(phase: Phase, index: int) -> str:
    name = phase.name.replace(".", "-")
    return f"{name}-{index}" if phase.tasks > 1 else name


def _script(config: ViperConfig, phase: Phase, index: int):
    import nemo_run as run

    if config.cluster.executor == "slurm":  # torchrun (RL phases) starts this script once per rank
        command = " ".join(["cd", config.cluster.repo_dir, "&&", "python", "-m", "nemo_viper.cli", *phase.task_args(index)])
        return run.Script(inline=command)
    return run.Script(path="nemo_viper.cli", args=list(phase.task_args(index)), entrypoint="python", m=True)


def _executor(config: ViperConfig, phase: Phase, job_dir: Path):
    import nemo_run as run

    cluster = config.cluster
    launcher = "torchrun" if phase.distributed else None
    if cluster.executor == "local":
        return run.LocalExecutor(ntasks_per_node=phase.ranks_per_node if phase.distributed else 1, launcher=launcher)
    return run.SlurmExecutor(
        account=cluster.account,
        partition=cluster.partition or None,
        time=cluster.time,
        nodes=phase.nodes,
        ntasks_per_node=phase.ranks_per_node if phase.distributed else 1,
        gpus_per_node=phase.gpus_per_node or None,
        container_image=cluster.container_image,
        container_mounts=list(cluster.container_mounts),
        env_vars=dict(cluster.env),
        tunnel=run.LocalTunnel(job_dir=str(job_dir)),
        packager=run.Packager(),
        launcher=launcher,
    )


def sbatch_scripts(config: ViperConfig) -> dict[str, str]:
    """Task name -> the sbatch script Slurm would get, followed by the task script it runs (no cluster needed)."""
    from nemo_run.run.torchx_backend.packaging import package
    from nemo_run.run.torchx_backend.schedulers.slurm import SlurmTunnelScheduler

    job_dir = Path(config.cluster.job_dir or Path(config.run_dir) / "nemo_run")
    scheduler = SlurmTunnelScheduler(session_name="nemo_viper_dryrun")
    tasks_of = {}
    scripts = {}
    for phase in plan(config):
        names = [_task_name(phase, i) for i in range(phase.tasks)]
        tasks_of[phase.name] = names
        for index, name in enumerate(names):
            executor = _executor(config, phase, job_dir)
            executor.dependencies = [f"dryrun:///<{dep}>" for d in phase.depends_on for dep in tasks_of[d]]
            executor.assign(exp_id=config.name, exp_dir=str(job_dir), task_id=name, task_dir=name)
            script = _script(config, phase, index)
            app = package(name=name, fn_or_script=script, executor=executor)
            sbatch = scheduler._submit_dryrun(app, executor).request.materialize()
            scripts[name] = f"{sbatch}\n# --- task script ({name}.sh) ---\n{script.inline}\n"
    return scripts


def launch(config: ViperConfig, dry_run: bool = False) -> dict[str, str] | None:
    """Submit (or, with ``dry_run``, render) the whole loop as one NeMo-Run experiment."""
    if dry_run and config.cluster.executor == "slurm":
        return sbatch_scripts(config)
    import nemo_run as run

    write_run_files(config)
    job_dir = Path(config.cluster.job_dir or Path(config.run_dir) / "nemo_run")
    os.environ.setdefault("NEMORUN_HOME", str(job_dir / "home"))
    with run.Experiment(config.name, executor=_executor(config, replace(plan(config)[0]), job_dir)) as experiment:
        handles: dict[str, list[str]] = {}
        for phase in plan(config):
            dependencies = [h for d in phase.depends_on for h in handles[d]]
            handles[phase.name] = [
                experiment.add(_script(config, phase, i), executor=_executor(config, phase, job_dir),
                               name=_task_name(phase, i), dependencies=dependencies or None)
                for i in range(phase.tasks)
            ]
        if dry_run:
            experiment.dryrun()
        else:
            experiment.run(sequential=config.cluster.executor == "local", detach=config.cluster.executor == "slurm")
    return None
