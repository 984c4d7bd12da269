"""Periodic training checkpoints with resume-from-latest.

``ROOT/step_0000010/`` are policy checkpoints (:mod:`nemo_viper.models.checkpoint`) with the optimizer
state and ``trainer_state.json``; ``ROOT/latest`` names the newest complete one and is replaced
atomically after the checkpoint itself has been renamed into place, so a job killed at any moment
resumes from a complete checkpoint. If ``latest`` names no complete checkpoint (deleted, or a torn pointer),
the newest complete ``step_N`` is used, with a warning, never a silent restart from step 0.
Older checkpoints beyond ``keep_last`` are deleted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist

from nemo_viper.errors import CheckpointError
from nemo_viper.models.checkpoint_dir import LATEST_POINTER, latest_checkpoint, out_of_space
from nemo_viper.runtime import collectives


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:07d}"

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names or, if that is not complete, the newest complete one (with a
        warning); ``None`` when there is none yet."""
        return latest_checkpoint(self.root)

    def save(self, policy, step: int, trainer_state: dict) -> Path:
        """Save the training ``policy`` (:class:`~nemo_viper.models.training.PolicyWorker`: weights and
        optimizer) at ``step`` with ``trainer_state`` (collective)."""
        path = policy.save_checkpoint(self.root / self.step_dir_name(step), step, {"step": step, **trainer_state})
        if not dist.is_initialized() or dist.get_rank() == 0:
            tmp = self.root / f"{LATEST_POINTER}.tmp"
            try:
                tmp.write_text(path.name + "\n")
                os.replace(tmp, self.root / LATEST_POINTER)
            except OSError as error:
                tmp.unlink(missing_ok=True)
                if not out_of_space(error, self.root, needed_bytes=0):
                    raise
                (self.root / LATEST_POINTER).unlink(missing_ok=True)  # a resume then takes the newest complete one
                raise CheckpointError(f"no space left on {self.root} for its {LATEST_POINTER} pointer; {path} is "
                                      "complete and a resume starts from it: free space, then resume") from error
            self._prune(keep=path.name)
        collectives.barrier()
        return path

    def restore(self, policy) -> dict | None:
        """Load the latest checkpoint into the training ``policy``; returns its trainer state, or ``None``."""
        latest = self.latest()
        if latest is None:
            return None
        return policy.load_checkpoint(latest)

    def _prune(self, keep: str) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
