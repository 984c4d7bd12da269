"""The GRPO-variant step, pure torch over the policy's training interface.

One :meth:`GRPOTrainer.step` consumes a :class:`~nemo_viper.training.rollout_batch.RolloutBatch`:

1. rollout statistics and advantages per group (:func:`~nemo_viper.algorithms.group_advantages`; Dr.GRPO
   without the std), optional DAPO dynamic sampling (mask groups whose rewards are all equal; the loop has
   refilled the batch, :func:`~nemo_viper.training.loop.collect_groups`) and overlong filtering (mask
   truncated responses);
2. old log-probs (the policy before the update) and, with ``loss.kl_beta > 0``, the frozen reference's, from
   the policy (``get_logprobs`` / ``get_reference_logprobs``); when the rollout carries the generation
   backend's own log-probs, their mismatch with the old ones is logged (``rollout/logprob_diff_mean`` /
   ``_max``) and, with ``importance_sampling_cap``, corrected by truncated importance sampling
   (:mod:`nemo_viper.algorithms.off_policy`);
3. ``policy.train(data, loss_fn, ...)``: ``num_minibatches`` optimizer updates with :class:`GRPOLoss`
   (:class:`~nemo_viper.algorithms.ClippedPolicyLoss` on each micro-batch's log-probs).

The policy (:class:`~nemo_viper.models.interfaces.TrainablePolicy`; the Megatron one is
:class:`~nemo_viper.models.training.PolicyWorker`, built by :func:`~nemo_viper.training.stage.build_trainer`) owns
everything Megatron: micro-batches, the pipeline schedule, the global loss normaliser, gradient
reductions, clipping and the optimizer. This module imports no Megatron, not even lazily; it combines its own
per-rank statistics over the data-parallel ranks through the policy's
:class:`~nemo_viper.runtime.collectives.DataParallel` context, each by the reduction it declares
(:mod:`nemo_viper.runtime.metrics`).
"""

from __future__ import annotations

import time
from dataclasses import replace

from torch import Tensor

from nemo_viper.algorithms import (
    ClippedPolicyLoss,
    LossNormalizer,
    PolicyLossConfig,
    dynamic_sampling_keep,
    group_advantages,
    logprob_mismatch,
    mask_truncated,
    truncated_importance_weights,
)
from nemo_viper.models.interfaces import TrainablePolicy, TrainingBatch
from nemo_viper.rollout.interface import SamplingParams
from nemo_viper.runtime.metrics import Metric, reduce_metrics, summary
from nemo_viper.training.config import GRPOConfig
from nemo_viper.training.rollout_batch import RolloutBatch


class GRPOLoss:
    """The loss function handed to ``policy.train``: :class:`~nemo_viper.algorithms.ClippedPolicyLoss` on one
    micro-batch, with the batch's ``old_logprobs``, ``advantages`` (``[B]`` or per token ``[B, S]``) and, with
    a KL term, ``ref_logprobs``. Returns the loss share and its metrics (declared reductions)."""

    def __init__(self, config: PolicyLossConfig):
        self.loss = ClippedPolicyLoss(config)

    def __call__(self, logprobs: Tensor, batch: TrainingBatch,
                 normalizer: LossNormalizer) -> tuple[Tensor, dict[str, Metric]]:
        device = logprobs.device
        tensors = batch.tensors
        ref = tensors.get("ref_logprobs")
        return self.loss(logprobs, tensors["old_logprobs"].to(device), tensors["advantages"].to(device),
                         batch.sequences.response_mask.to(device), normalizer,
                         None if ref is None else ref.to(device))


def rollout_statistics(rollout: RolloutBatch, advantages: Tensor) -> dict[str, Metric]:
    """This rank's advantage / reward / response-length summaries, reward breakdown means and truncated
    fraction (each declares its reduction over the ranks)."""
    metrics = {f"advantage/{k}": v for k, v in summary(advantages).items()}
    metrics.update({f"reward/{k}": v for k, v in summary(rollout.rewards).items()})
    metrics.update({f"reward/{k}": Metric.mean(v) for k, v in rollout.reward_metrics.items()})
    metrics.update({f"response_length/{k}": v for k, v in summary(rollout.response_lengths.float()).items()})
    metrics["response/truncated_fraction"] = Metric.mean(rollout.truncated.float().mean().item())
    return metrics


class GRPOTrainer:
    """Runs GRPO steps on a :class:`TrainablePolicy` (which owns the optimizer).

    With ``config.loss.kl_beta > 0`` the policy must hold a frozen reference (``has_reference``)."""

    def __init__(self, policy: TrainablePolicy, config: GRPOConfig, sampling: SamplingParams = SamplingParams()):
        if (config.loss.kl_beta > 0) != policy.has_reference:
            raise ValueError("a reference policy is needed exactly when loss.kl_beta > 0")
        self.policy = policy
        self.config = config
        self.temperature = sampling.temperature
        loss = config.loss
        if loss.max_response_length is None:
            loss = replace(loss, max_response_length=sampling.max_new_tokens)
        self.loss_fn = GRPOLoss(loss)

    def step(self, rollout: RolloutBatch) -> dict[str, float]:
        """One rollout batch -> ``num_minibatches`` optimizer updates. Returns the step's metrics.

        Rows removed by dynamic sampling (groups with equal rewards) or overlong filtering keep their place
        with an all-zero response mask: they add neither loss, gradient nor token counts, and every
        data-parallel rank runs the same number of mini-batches and collectives whatever it removed. A
        mini-batch with no response token on any rank is skipped by all ranks.
        """
        cfg = self.config
        times = {}
        started = time.perf_counter()
        advantages = group_advantages(rollout.rewards, rollout.group_index, cfg.advantage, rollout.sample_ids)
        metrics = rollout_statistics(rollout, advantages)

        mask = rollout.sequences.response_mask.bool()
        if cfg.dynamic_sampling:
            keep = dynamic_sampling_keep(rollout.rewards, rollout.group_index)
            metrics["dynamic_sampling/kept_fraction"] = Metric.mean(keep.float().mean().item())
            mask = mask & keep[:, None]
        if cfg.overlong_filtering:
            mask = mask_truncated(mask, rollout.truncated.bool())
            metrics["overlong_filtering/masked_fraction"] = Metric.mean(rollout.truncated.float().mean().item())
        sequences = replace(rollout.sequences, response_mask=mask)
        times["advantages"] = time.perf_counter() - started

        started = time.perf_counter()
        old_logprobs = self.policy.get_logprobs(sequences, cfg.micro_batch_size, self.temperature)
        times["logprob"] = time.perf_counter() - started
        tensors = {"old_logprobs": old_logprobs}
        if cfg.loss.kl_beta > 0:
            started = time.perf_counter()
            tensors["ref_logprobs"] = self.policy.get_reference_logprobs(sequences, cfg.micro_batch_size,
                                                                         self.temperature)
            times["ref_logprob"] = time.perf_counter() - started
        if rollout.sampler_logprobs is not None:
            mismatch = logprob_mismatch(old_logprobs, rollout.sampler_logprobs, mask)
            metrics.update({f"rollout/logprob_diff_{k}": v for k, v in mismatch.items()})
            if cfg.importance_sampling_cap is not None:
                weights = truncated_importance_weights(old_logprobs, rollout.sampler_logprobs, mask,
                                                       cfg.importance_sampling_cap)
                metrics["rollout/importance_weight_mean"] = Metric.mean(
                    (weights.sum() / mask.sum().clamp(min=1)).item())
                advantages = advantages[:, None] * weights  # per-token advantages: TIS-weighted loss terms
        elif cfg.importance_sampling_cap is not None:
            raise ValueError("importance_sampling_cap needs a rollout with the sampler's log-probs")
        tensors["advantages"] = advantages

        started = time.perf_counter()
        train_metrics = self.policy.train(TrainingBatch(sequences, tensors), self.loss_fn, cfg.num_minibatches,
                                          cfg.micro_batch_size, self.temperature)
        times["update"] = time.perf_counter() - started
        metrics.update({f"time/{k}": Metric.mean(v) for k, v in times.items()})
        result = reduce_metrics(metrics, self.policy.data_parallel)  # per-rank statistics -> means / min / max
        result.update(train_metrics)  # already reduced by the policy
        return result
