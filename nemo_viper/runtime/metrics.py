"""Metric values that declare how they combine, where they are produced (pure torch).

A training step's metrics come from many places (the rollout statistics of each data-parallel rank, the loss
function on each micro-batch, the optimizer) and each kind combines differently over micro-batches and
ranks. Every producer therefore returns :class:`Metric` values carrying their :class:`Reduce`; nothing
infers a reduction from a metric's name.

- ``MEAN``: a per-rank statistic (a reward mean, a std, a time): averaged over the data-parallel ranks;
- ``SUM``: an additive contribution (a loss-function term already divided by the mini-batch's *global*
  token count, a count): summed over micro-batches and ranks, which gives the global value exactly;
- ``MAX`` / ``MIN``: extremes, over micro-batches and ranks;
- ``REPLICATED``: already global and equal on every rank (the gradient norm of the all-reduced gradient):
  taken as it is.

Pipeline parallelism: the loss function runs on the last pipeline stage only, so its metrics exist there and
are broadcast from it (:func:`nemo_viper.models.training` does this) before the data-parallel reduction.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_viper.runtime.collectives import DataParallel, ReduceOp


class Reduce(enum.Enum):
    MEAN = "mean"
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    REPLICATED = "replicated"


@dataclass(frozen=True)
class Metric:
    """One metric value (a float, or a 0-dim tensor inside a step) and how it combines."""

    value: float | Tensor
    reduce: Reduce

    @classmethod
    def mean(cls, value) -> Metric:
        return cls(value, Reduce.MEAN)

    @classmethod
    def sum(cls, value) -> Metric:
        return cls(value, Reduce.SUM)

    @classmethod
    def max(cls, value) -> Metric:
        return cls(value, Reduce.MAX)

    @classmethod
    def min(cls, value) -> Metric:
        return cls(value, Reduce.MIN)

    @classmethod
    def replicated(cls, value) -> Metric:
        return cls(value, Reduce.REPLICATED)


_LOCAL = {Reduce.SUM: sum, Reduce.MAX: max, Reduce.MIN: min}


def combine(parts: Sequence[Metric]) -> Metric:
    """One rank's value of a metric produced once per micro-batch: the sum / max / min of the parts (as
    Python floats, in order). ``MEAN`` and ``REPLICATED`` metrics are not produced per micro-batch."""
    kind = parts[0].reduce
    if any(part.reduce != kind for part in parts) or kind not in _LOCAL:
        raise ValueError(f"cannot combine micro-batch metrics of reductions {sorted({p.reduce.value for p in parts})}")
    return Metric(float(_LOCAL[kind](float(part.value) for part in parts)), kind)


def summary(values: Tensor) -> dict[str, Metric]:
    """``mean`` / ``std`` / ``min`` / ``max`` of this rank's ``values`` (float64): the means and stds are
    averaged over the ranks, the extremes are the global extremes."""
    values = values.double()
    return {"mean": Metric.mean(values.mean().item()),
            "std": Metric.mean(values.std().item() if len(values) > 1 else 0.0),
            "min": Metric.min(values.min().item()), "max": Metric.max(values.max().item())}


def reduce_metrics(metrics: Mapping[str, Metric], data_parallel: DataParallel) -> dict[str, float]:
    """Every metric combined over the data-parallel ranks by its declared reduction, as plain floats.

    Collective over ``data_parallel`` (every rank passes the same keys): one float64 SUM all-reduce (SUM
    and MEAN metrics; MEAN divided by the rank count) and one MAX all-reduce (MAX metrics and negated MIN
    metrics: ``min(x) = -max(-x)`` exactly). Keys keep their order."""
    if data_parallel.size == 1:
        return {key: float(metric.value) for key, metric in metrics.items()}
    result = {key: float(metric.value) for key, metric in metrics.items()}
    keys = sorted(metrics)
    added = [k for k in keys if metrics[k].reduce in (Reduce.SUM, Reduce.MEAN)]
    extremes = [k for k in keys if metrics[k].reduce in (Reduce.MAX, Reduce.MIN)]
    sign = {Reduce.MAX: 1.0, Reduce.MIN: -1.0}
    sums = data_parallel.all_reduce(torch.tensor([result[k] for k in added], dtype=torch.float64), ReduceOp.SUM)
    tops = data_parallel.all_reduce(
        torch.tensor([sign[metrics[k].reduce] * result[k] for k in extremes], dtype=torch.float64), ReduceOp.MAX)
    for key, value in zip(added, sums.tolist()):
        result[key] = value / data_parallel.size if metrics[key].reduce == Reduce.MEAN else value
    for key, value in zip(extremes, tops.tolist()):
        result[key] = sign[metrics[key].reduce] * value
    return result
