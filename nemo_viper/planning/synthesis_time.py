"""Time of a synthesis array task from the recipe, and the shard count a time limit needs (no torch, no GPU).

One image costs the diffusion transformer's passes: ``steps`` per image, two per step with true
classifier-free guidance (a conditional and an unconditional pass). One pass over ``T`` tokens (latent
image tokens + text) of a transformer with ``P`` parameters, ``L`` layers and hidden size ``h`` is

    flops = 2·P·T + 4·L·T²·h                     (the linear layers; attention scores and their product)

and takes ``flops / (peak · efficiency)`` seconds on a GPU with dense bf16 tensor-core ``peak``
(:data:`GPU_BF16_TFLOPS`, vendor datasheets) at :data:`DIFFUSION_EFFICIENCY`, the share of the peak that
Qwen-Image reaches: ~40 s per 1024² image at 50 steps with true CFG on an H100 (180 TFLOP per pass, 100
passes: 45 % of 989 TFLOPS). The policy's captions, critiques and rewrites, the residency swaps and model
loading are counted as :data:`NON_DIFFUSION_SHARE` on top (not measured). A task's worker draws
``ceil(images / (shards · gpus per task))`` images (chunks are dealt round-robin over every worker).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

GPU_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "B200": 2250.0}
DIFFUSION_EFFICIENCY = 0.45
NON_DIFFUSION_SHARE = 0.25
_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


@dataclass(frozen=True)
class DiffusionWork:
    """What drawing one image costs: the transformer's size, its tokens per image and passes per image."""

    params: float
    layers: int
    hidden: int
    tokens: int
    steps: int
    true_cfg: bool

    @property
    def flops_per_image(self) -> float:
        per_pass = 2 * self.params * self.tokens + 4 * self.layers * self.tokens**2 * self.hidden
        return per_pass * self.steps * (2 if self.true_cfg else 1)

    def seconds_per_image(self, gpu: str) -> float:
        """Drawing plus the share of the other steps, on one ``gpu`` (a key of :data:`GPU_BF16_TFLOPS`)."""
        drawing = self.flops_per_image / (GPU_BF16_TFLOPS[gpu] * 1e12 * DIFFUSION_EFFICIENCY)
        return drawing * (1 + NON_DIFFUSION_SHARE)


def slurm_seconds(limit: str) -> int:
    """Seconds of a Slurm ``--time`` value: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    match = _SLURM_TIME.fullmatch(limit.strip())
    if not match:
        raise ValueError(f"{limit!r} is not a Slurm time limit")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = int(first), int(second or 0), int(third or 0)
    elif third is not None:  # HH:MM:SS
        hours, minutes, seconds = int(first), int(second), int(third)
    else:  # MM[:SS]
        hours, minutes, seconds = 0, int(first), int(second or 0)
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(frozen=True)
class TaskTime:
    """One synthesis stage's array task: its images per worker, estimated seconds, and the shards its limit needs."""

    stage: str
    seconds_per_image: float
    images_per_worker: int | None  # None: the input count is not known here
    limit_seconds: int
    workers_per_shard: int

    @property
    def seconds(self) -> float | None:
        return None if self.images_per_worker is None else self.images_per_worker * self.seconds_per_image

    @property
    def images_within_limit(self) -> int:
        """Images one worker draws within the limit."""
        return int(self.limit_seconds // self.seconds_per_image)

    @property
    def fits(self) -> bool:
        return self.seconds is None or self.seconds <= self.limit_seconds

    def shards_needed(self, images: int) -> int:
        """The fewest shards whose tasks finish ``images`` inputs within the limit."""
        return math.ceil(images / (max(1, self.images_within_limit) * self.workers_per_shard))


def task_time(stage: str, work: DiffusionWork, gpu: str, images: int | None, shards: int, workers_per_shard: int,
              limit: str) -> TaskTime:
    per_worker = None if images is None else math.ceil(images / (shards * workers_per_shard))
    return TaskTime(stage, work.seconds_per_image(gpu), per_worker, slurm_seconds(limit), workers_per_shard)
