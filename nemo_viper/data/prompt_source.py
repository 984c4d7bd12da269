"""RL prompts from a :class:`~nemo_viper.data.shards.ShardDataset`: sharded over data-parallel ranks, images
preprocessed ahead of the loop on a background thread.

**Order.** Epoch ``e`` visits the permutation ``P_e`` of all sample indices but the held-out ones
(``exclude``, :mod:`nemo_viper.evaluation.heldout`) drawn from ``(seed, e)``; rank
``r`` of ``W`` takes ``P_e[r], P_e[r + W], ...`` — the ranks' shares are disjoint and together cover
every sample once per epoch (shares differ by at most one sample when ``W`` does not divide the size;
each rank then rolls over to its next epoch on its own).

**Prefetch.** A background thread walks this order ahead of the loop: it reads the encoded images of
``decode_batch`` samples, turns them into ``pixel_values`` + ``image_grid_thw`` in one
:class:`~nemo_viper.data.images.QwenImagePreprocessor` call (DALI: the GPU decoder when CUDA is there),
builds the :class:`TaskPrompt` of each and puts it into a queue of at most ``prefetch`` prompts. Each
prompt's images are decoded once; its ``n`` rollouts share the tensors. The loop therefore holds at most
``prefetch + decode_batch`` prepared prompts besides the ones it was handed, whatever the dataset size,
and nothing accumulates over an epoch (only the indices of corrupt samples are remembered).

**Position.** ``(epoch, position in the rank's share)`` of the last prompt *handed out* is the whole state:
prefetched prompts the loop has not taken yet are not part of it, so a source restored from
:meth:`ShardPromptSource.state_dict` continues with exactly the next sample it had not yet returned (and
prepares the prefetched ones again).

**Corrupt images.** A sample with an image the preprocessor cannot decode is skipped, logged with shard,
key and image entry, and counted in ``skipped["corrupt_image"]`` when the loop's position passes it (once
per sample, also across a resume: the counted samples are part of the state); later epochs skip it without
decoding it again. Records missing a field are dropped (and counted) earlier, when :class:`ShardDataset`
indexes the shards; :meth:`ShardPromptSource.skipped_counts` reports both.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from nemo_viper.data.images import ImageDecodeError, PromptImages, QwenImagePreprocessor
from nemo_viper.data.records import Record
from nemo_viper.data.shards import DatasetError, ShardDataset
from nemo_viper.errors import ConfigError
from nemo_viper.data.task_prompt import TaskPrompt, task_prompt

log = logging.getLogger(__name__)

TaskPromptBuilder = Callable[[Record, PromptImages], TaskPrompt]


@dataclass(frozen=True)
class _Item:
    """One step along the order: the position after it and a prompt, or a skipped sample, or a failure."""

    epoch: int
    position: int
    index: int
    prompt: TaskPrompt | None = None
    corrupt: str | None = None  # why the sample is skipped
    failure: BaseException | None = None


class ShardPromptSource:
    """The loop's ``PromptSource`` over one dataset for one data-parallel rank (see the module docstring).

    ``task_prompt_builder(record, images)`` turns a record and its preprocessed images into the
    :class:`TaskPrompt` (default: :func:`~nemo_viper.data.task_prompt.task_prompt`). Call :meth:`close` (or use the
    source as a context manager) to stop the prefetch thread.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        preprocessor: QwenImagePreprocessor,
        seed: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        *,
        task_prompt_builder: TaskPromptBuilder | None = None,
        prefetch: int = 16,
        decode_batch: int = 8,
        exclude: frozenset[int] | set[int] = frozenset(),
    ):
        if not 0 <= dp_rank < dp_world:
            raise ConfigError(f"dp_rank must lie in [0, dp_world={dp_world}), got {dp_rank}")
        if prefetch < 1 or decode_batch < 1:
            raise ConfigError(f"prefetch={prefetch} and decode_batch={decode_batch} must be >= 1")
        self.indices = np.array([i for i in range(len(dataset)) if i not in exclude], dtype=np.int64)
        if len(self.indices) < dp_world:
            raise DatasetError(
                f"dataset {dataset.directory} has {len(self.indices)} usable samples (after {len(exclude)} held out), "
                f"fewer than the {dp_world} data-parallel ranks reading it"
            )
        self.dataset = dataset
        self.preprocessor = preprocessor
        self.build = task_prompt_builder or task_prompt
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.prefetch = prefetch
        self.decode_batch = decode_batch
        self.skipped: Counter[str] = Counter()
        self._epoch = 0
        self._position = 0
        self._reported: set[int] = set()  # corrupt samples counted and logged (consumer side)
        self._unreadable: dict[int, str] = {}  # corrupt samples found (producer side)
        self._queue: queue.Queue[_Item] | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def rank_share(self, epoch: int) -> list[int]:
        """This rank's sample indices of ``epoch``, in visiting order."""
        permutation = self.indices[np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))]
        return permutation[self.dp_rank :: self.dp_world].tolist()

    def next_prompts(self, count: int) -> list[TaskPrompt]:
        """The next ``count`` prompts of this rank, rolling over epochs as needed."""
        if self._thread is None:
            self._start()
        prompts = []
        while len(prompts) < count:
            item = self._take()
            self._epoch, self._position = item.epoch, item.position
            if item.corrupt is None:
                prompts.append(item.prompt)
            elif item.index not in self._reported:
                self._reported.add(item.index)
                self.skipped["corrupt_image"] += 1
                log.warning("skipping sample: %s", item.corrupt)
        return prompts

    def skipped_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Samples skipped so far by reason: ``(when the dataset was indexed, the same on every rank; when this
        rank's share was read)``."""
        return dict(self.dataset.skipped), dict(self.skipped)

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "skipped_samples": sorted(self._reported),
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_world": self.dp_world,
            "num_samples": len(self.indices),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the seed, rank layout and dataset size must be the saved ones."""
        for name in ("seed", "dp_rank", "dp_world", "num_samples"):
            current = len(self.indices) if name == "num_samples" else getattr(self, name)
            if state[name] != current:
                raise ConfigError(
                    f"cannot resume the prompt position: saved {name}={state[name]!r}, now {current!r} "
                    "(the order of samples would differ)"
                )
        self.close()  # prefetched prompts belong to the old position
        self._epoch = state["epoch"]
        self._position = state["position"]
        self._reported = set(state.get("skipped_samples", ()))  # (absent in checkpoints of older versions)
        self.skipped = Counter({"corrupt_image": len(self._reported)} if self._reported else {})

    def close(self) -> None:
        """Stop the prefetch thread and drop what it prepared; :meth:`next_prompts` restarts it."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._queue = self._stop = self._thread = None

    def __enter__(self) -> ShardPromptSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce,
            args=(self._epoch, self._position, self._queue, self._stop),
            name=f"prompt-prefetch-dp{self.dp_rank}",
            daemon=True,
        )
        self._thread.start()

    def _take(self) -> _Item:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prompt prefetch thread ended without a result") from None
        if item.failure is not None:
            self.close()
            raise item.failure
        return item

    def _produce(self, epoch: int, position: int, out: queue.Queue, stop: threading.Event) -> None:
        """The prefetch thread: walk the order from ``(epoch, position)``, preparing ``decode_batch`` samples
        at a time, until stopped. A failure (a shard that disappeared, no decodable image in a whole share)
        is queued for the loop to raise."""

        def put(item: _Item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            if self.preprocessor.device.type == "cuda":
                torch.cuda.set_device(self.preprocessor.device)
            share = self.rank_share(epoch)
            skipped_in_a_row = 0
            while not stop.is_set():
                steps = []  # (epoch, position after, sample index)
                while len(steps) < self.decode_batch:
                    if position == len(share):
                        epoch, position = epoch + 1, 0
                        share = self.rank_share(epoch)
                    position += 1
                    steps.append((epoch, position, share[position - 1]))
                for item in self._prepare(steps):
                    skipped_in_a_row = skipped_in_a_row + 1 if item.corrupt else 0
                    if skipped_in_a_row > len(share):
                        raise DatasetError(
                            f"no image of data-parallel rank {self.dp_rank}'s share of {self.dataset.directory} "
                            "decodes"
                        )
                    if not put(item):
                        return
        except BaseException as e:  # handed to the loop's thread, which raises it
            put(_Item(epoch, position, -1, failure=e))

    def _prepare(self, steps: list[tuple[int, int, int]]) -> list[_Item]:
        """Preprocess the images of the readable samples among ``steps`` in one call; build their prompts."""
        todo = list(dict.fromkeys(index for _, _, index in steps if index not in self._unreadable))
        prepared = dict(zip(todo, self.preprocessor([self.dataset.image_bytes(i) for i in todo], return_errors=True)))
        items = []
        for epoch, position, index in steps:
            images = prepared.get(index)
            if isinstance(images, ImageDecodeError):
                error = self.dataset.corrupt_image_error(index, images.image, images.detail)
                self._unreadable[index] = str(error)
            if index in self._unreadable:
                items.append(_Item(epoch, position, index, corrupt=self._unreadable[index]))
            else:
                items.append(_Item(epoch, position, index, prompt=self.build(self.dataset.record(index), images)))
        return items
