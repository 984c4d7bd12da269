"""RL prompts from a :class:`~nemo_viper.data.shards.ShardDataset`, sharded over data-parallel ranks.

Order: epoch ``e`` visits the permutation ``P_e`` of all sample indices drawn from ``(seed, e)``; rank
``r`` of ``W`` takes ``P_e[r], P_e[r + W], ...`` — the ranks' shares are disjoint and together cover
every sample once per epoch (shares differ by at most one sample when ``W`` does not divide the size;
each rank then rolls over to its next epoch on its own). The position ``(epoch, position in the rank's
share)`` is the whole state, so a source restored from :meth:`ShardPromptSource.state_dict` continues
with exactly the next sample it had not yet returned.

A sample whose image does not decode is skipped (and remembered, so later epochs skip it without
decoding again), counted in ``skipped["corrupt_image"]`` once and logged with shard and key.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import numpy as np
from PIL import Image

from nemo_viper.data.records import Record
from nemo_viper.data.shards import CorruptImageError, DatasetError, ShardDataset
from nemo_viper.errors import ConfigError
from nemo_viper.training.loop import TaskPrompt

log = logging.getLogger(__name__)

TaskPromptBuilder = Callable[[Record, list[Image.Image]], TaskPrompt]


class ShardPromptSource:
    """The loop's ``PromptSource`` over one dataset for one data-parallel rank.

    ``task_prompt_builder(record, images)`` turns a record and its decoded RGB images into the
    :class:`TaskPrompt` (prompt text, images, ground truth, sample id).
    """

    def __init__(
        self,
        dataset: ShardDataset,
        task_prompt_builder: TaskPromptBuilder,
        seed: int,
        dp_rank: int = 0,
        dp_world: int = 1,
    ):
        if not 0 <= dp_rank < dp_world:
            raise ConfigError(f"dp_rank must lie in [0, dp_world={dp_world}), got {dp_rank}")
        if len(dataset) < dp_world:
            raise DatasetError(
                f"dataset {dataset.directory} has {len(dataset)} usable samples, fewer than the {dp_world} "
                "data-parallel ranks reading it"
            )
        self.dataset = dataset
        self.build = task_prompt_builder
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.skipped: Counter[str] = Counter()
        self._epoch = 0
        self._position = 0
        self._share = self.rank_share(0)
        self._unreadable: set[int] = set()

    def rank_share(self, epoch: int) -> list[int]:
        """This rank's sample indices of ``epoch``, in visiting order."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return permutation[self.dp_rank :: self.dp_world].tolist()

    def next_prompts(self, count: int) -> list[TaskPrompt]:
        """The next ``count`` prompts of this rank, rolling over epochs as needed."""
        prompts = []
        failures_in_a_row = 0
        while len(prompts) < count:
            if self._position == len(self._share):
                self._epoch += 1
                self._position = 0
                self._share = self.rank_share(self._epoch)
            index = self._share[self._position]
            self._position += 1
            images = self._images(index)
            if images is None:
                failures_in_a_row += 1
                if failures_in_a_row > len(self._share):
                    raise DatasetError(
                        f"no image of data-parallel rank {self.dp_rank}'s share of {self.dataset.directory} decodes"
                    )
                continue
            failures_in_a_row = 0
            prompts.append(self.build(self.dataset.record(index), images))
        return prompts

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the seed, rank layout and dataset size must be the saved ones."""
        for name in ("seed", "dp_rank", "dp_world", "num_samples"):
            current = len(self.dataset) if name == "num_samples" else getattr(self, name)
            if state[name] != current:
                raise ConfigError(
                    f"cannot resume the prompt position: saved {name}={state[name]!r}, now {current!r} "
                    "(the order of samples would differ)"
                )
        self._epoch = state["epoch"]
        self._position = state["position"]
        self._share = self.rank_share(self._epoch)

    def _images(self, index: int) -> list[Image.Image] | None:
        if index in self._unreadable:
            return None
        try:
            return self.dataset.images(index)
        except CorruptImageError as e:
            log.warning("skipping sample: %s", e)
            self._unreadable.add(index)
            self.skipped["corrupt_image"] += 1
            return None
