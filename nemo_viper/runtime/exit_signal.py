"""Stop a training job at a step boundary when its scheduler warns it (Megatron's ``--exit-signal-handler``).

A scheduler signals a job ahead of its time limit (Slurm: ``sbatch --signal=SIG@LEAD``, which reaches every
process of the job's steps). :class:`ExitSignal` only records that the signal arrived; the loop asks
:meth:`ExitSignal.agreed` after each step, a collective (MAX over all ranks of "received"), so every rank
stops after the same step and saves the same checkpoint: no rank saves alone, none waits for ever in the next
step's collectives. The process then exits with :data:`EXIT_REQUEUE`, which the Slurm job script turns into
``scontrol requeue`` (the job keeps its id, so its ``afterok`` dependents keep waiting for it); the requeued run
resumes from that checkpoint.

Which signal: one whose default action is to be *ignored* (``URG``, the configured default), because every
process of the step gets it, not only the ranks: under ``srun torchrun``, ``USR1`` kills ``torchrun`` and the
job script between it and the ranks (their default action is to terminate), and ``TERM`` makes ``torchrun``
stop its workers (SIGKILL after 30 s), before a step can finish.
"""

from __future__ import annotations

import signal
import threading

from nemo_viper.errors import ConfigError

EXIT_REQUEUE = 75
"""Exit status of a job stopped by its exit signal after saving (``EX_TEMPFAIL`` of sysexits.h: run it again)."""


def parse_signal(key: str, name: str) -> signal.Signals:
    """``URG``, ``SIGURG`` or a number -> the signal; a ``ConfigError`` naming ``key`` otherwise."""
    text = name.strip().upper()
    try:
        return signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG")
                                                                                  else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ConfigError(f"{key}={name!r} is not a signal name (e.g. URG, USR1, TERM)") from None


class ExitRequested(Exception):
    """Raised by the loop after it saved the checkpoint of ``step`` because ``signum`` arrived."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped after step {step} on {signal.Signals(signum).name}: its checkpoint is saved")
        self.step, self.signum = step, signum


class ExitSignal:
    """Records ``signum`` while installed (a context manager; the main thread only, as Python requires).
    The handler does nothing else: the loop acts at its next step boundary."""

    def __init__(self, signum: int):
        self.signum = signal.Signals(signum)
        self._received = threading.Event()
        self._previous = None

    def __enter__(self) -> ExitSignal:
        self._previous = signal.signal(self.signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(self.signum, self._previous)

    def _record(self, signum, frame) -> None:
        self._received.set()

    @property
    def received(self) -> bool:
        """Whether this process got the signal."""
        return self._received.is_set()

    def agreed(self) -> bool:
        """Whether any rank got the signal (collective over the default group: every rank must call it)."""
        import torch  # here: the config checks import this module on a login node

        from nemo_viper.runtime import collectives

        flag = torch.tensor([1 if self.received else 0], dtype=torch.int64)
        return bool(collectives.all_reduce(flag, collectives.ReduceOp.MAX)[0])
