"""``nemo-viper run``: the closed loop's plan (:mod:`nemo_viper.orchestration`) executed here, phase by phase.

Each phase runs as a subprocess (``torchrun`` for the RL phases; each in its own process group, killed with
``run``: :mod:`nemo_viper.runtime.lifetime`), after the preflight (:mod:`nemo_viper.doctor`), and is
recorded done once its outputs verify (:mod:`nemo_viper.run_state`); a rerun continues with the first
pending phase. The NeMo-Run launcher (``launcher/``) is the other executor of the same plan.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from subprocess import STDOUT

from nemo_viper import doctor
from nemo_viper.config import ViperConfig
from nemo_viper.errors import NemoViperError
from nemo_viper.orchestration import (GUARD_STOP_EXIT, Phase, plan, record_guard_stop, round_of, stopped_after_round,
                                      write_run_files)
from nemo_viper.run_state import clear_for_rerun, select_phases, verify_and_record
from nemo_viper.runtime.lifetime import run_job
from nemo_viper.runtime.locks import run_dir_owner

logger = logging.getLogger(__name__)


def phase_command(phase: Phase, index: int = 0) -> list[str]:
    """The local command of one task of ``phase`` (torchrun for distributed phases)."""
    if phase.distributed:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={phase.ranks_per_node}", "-m", "nemo_viper.cli", *phase.task_args(index)]
    return [sys.executable, "-m", "nemo_viper.cli", *phase.task_args(index)]


def run_local(config: ViperConfig, on_phase=None, log_dir: Path | None = None, start: str | None = None) -> list[str]:
    """Run the pending phases here (:func:`nemo_viper.run_state.select_phases`). Returns the phases run now.

    Each task's output goes to ``run_dir/logs/<phase>[.<i>].log``. Before a phase runs, the preflight
    (:mod:`nemo_viper.doctor`) checks what it needs; after it, its outputs are verified and it is recorded
    done in ``state.json``. ``on_phase(phase, status)`` reports ``"start"`` / ``"done"`` / ``"skip"``.
    An eval phase that exits with :data:`~nemo_viper.orchestration.GUARD_STOP_EXIT` (the benchmark guard)
    is done and stops the loop: the phases of later rounds are skipped (``run_dir/eval/stopped.json``); the
    export still runs.

    The run owns ``run_dir`` throughout (:func:`~nemo_viper.runtime.locks.run_dir_owner`): a second ``run`` or
    ``launch`` of it is refused with one line before it writes anything. A stale phase's outputs are set aside
    only as that phase starts (:func:`~nemo_viper.run_state.clear_for_rerun`), so when a changed value fails,
    the finished phases after it keep their outputs and records.
    """
    with run_dir_owner(config.run_dir):
        return _run_phases(config, on_phase, log_dir, start)


def _run_phases(config: ViperConfig, on_phase, log_dir: Path | None, start: str | None) -> list[str]:
    phases = plan(config)
    root = Path(config.run_dir)
    selected, states = select_phases(phases, root, start)
    paths = write_run_files(config)
    log_dir = Path(log_dir or paths.root / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    ran = []
    for phase in phases:
        stopped = stopped_after_round(paths.root)
        later_round = stopped is not None and (round_of(phase) or 0) > stopped
        if phase not in selected or later_round:
            if on_phase:
                on_phase(phase, "skip")
            continue
        if on_phase:
            on_phase(phase, "start")
        doctor.raise_problems(doctor.check(config, phase.name))
        for line in clear_for_rerun([phase], states, paths.root):
            logger.warning(line)
        for index in range(phase.tasks):
            log = log_dir / (f"{phase.name}.{index}.log" if phase.tasks > 1 else f"{phase.name}.log")
            with log.open("w") as out:
                result = run_job(phase_command(phase, index), stdout=out, stderr=STDOUT)
            guard_stop = result.returncode == GUARD_STOP_EXIT and phase.args[0] == "eval"
            if result.returncode != 0 and not guard_stop:
                raise NemoViperError(f"phase {phase.name} failed (exit {result.returncode}); see {log}")
        verify_and_record(phase, phases, paths.root)
        if guard_stop:
            record_guard_stop(paths.root, phase)
        ran.append(phase.name)
        if on_phase:
            on_phase(phase, "done")
    return ran
