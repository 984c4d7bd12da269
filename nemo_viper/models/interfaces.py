"""The policy / algorithm boundary: what an RL algorithm needs from a trainable policy, with no Megatron.

NeMo-RL draws this line in ``models/policy/interfaces.py``; here the algorithm side (the GRPO step
:mod:`nemo_viper.training.grpo`, the RL loop) imports only this module, and the Megatron side
(:class:`~nemo_viper.models.training.PolicyWorker`) implements it:

- :class:`TrainablePolicy`: log-probs under the policy and its frozen KL reference, ``train`` with the
  algorithm's loss function, and its data-parallel context (:class:`~nemo_viper.runtime.collectives.DataParallel`:
  rank, size and the collectives over the replicas);
- :class:`TrainingBatch`: what ``train`` consumes; :class:`LossFunction`: the contract of the loss it applies to
  every micro-batch; :class:`OptimizerSettings`: the optimizer the policy owns.

``tests/test_import_graph.py`` checks that no Megatron module is reachable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from nemo_viper.algorithms.policy_loss import LossNormalizer
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.runtime.collectives import DataParallel
from nemo_viper.runtime.metrics import Metric


@dataclass
class TrainingBatch:
    """What :meth:`TrainablePolicy.train` consumes: the sequences, plus the loss function's per-row tensors
    (``[B]``, or ``[B, S]`` per token like the sequences), selected and padded along with them."""

    sequences: PolicyBatch
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        rows, columns = self.sequences.input_ids.shape
        for name, tensor in self.tensors.items():
            if tensor.shape[0] != rows or (tensor.dim() == 2 and tensor.shape[1] != columns) or tensor.dim() > 2:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected ({rows},) or ({rows}, {columns})")

    @property
    def rows(self) -> int:
        return self.sequences.input_ids.shape[0]

    def select(self, rows) -> TrainingBatch:
        """The rows ``rows`` (indices or a slice), with their images and tensors."""
        return TrainingBatch(self.sequences.select(rows),
                             {name: tensor[rows] for name, tensor in self.tensors.items()})

    def pad_columns(self, multiple: int) -> TrainingBatch:
        """Token columns right-padded to a multiple of ``multiple`` (response mask 0, per-token tensors 0)."""
        padding = (0, -self.sequences.input_ids.shape[1] % multiple)
        return TrainingBatch(self.sequences.pad_columns(multiple),
                             {name: torch.nn.functional.pad(t, padding) if t.dim() == 2 else t
                              for name, t in self.tensors.items()})


class LossFunction(Protocol):
    """The algorithm's loss on one micro-batch: ``loss, metrics = loss_fn(logprobs, batch, normalizer)``.

    ``logprobs`` [b, S'] (with grad) are the log-probs of ``batch``'s tokens at the step's temperature;
    ``normalizer`` holds the mini-batch's global response-token and sequence counts. ``loss`` is this
    micro-batch's additive share of the mini-batch loss (global normalisation: :mod:`nemo_viper.models.training`);
    ``metrics`` declare their reductions (:class:`~nemo_viper.runtime.metrics.Metric`: ``SUM`` contributions, ...).
    """

    def __call__(self, logprobs: Tensor, batch: TrainingBatch,
                 normalizer: LossNormalizer) -> tuple[Tensor, dict[str, Metric]]: ...


class TrainablePolicy(Protocol):
    """What the GRPO step needs from a policy (the Megatron one: :class:`~nemo_viper.models.training.PolicyWorker`).

    ``get_logprobs`` / ``get_reference_logprobs``: ``[B, S]`` log-probs of ``batch``'s tokens at ``temperature``
    under the policy / the frozen reference (``has_reference``); ``train``: ``num_minibatches`` optimizer updates
    over ``data`` with ``loss_fn`` on micro-batches of ``micro_batch_size`` rows, returning reduced metrics."""

    data_parallel: DataParallel
    has_reference: bool

    def get_logprobs(self, batch: PolicyBatch, micro_batch_size: int, temperature: float) -> Tensor: ...

    def get_reference_logprobs(self, batch: PolicyBatch, micro_batch_size: int, temperature: float) -> Tensor: ...

    def train(self, data: TrainingBatch, loss_fn: LossFunction, num_minibatches: int, micro_batch_size: int,
              temperature: float) -> dict[str, float]: ...
