"""The GRPO-variant update on the Megatron policy (SPEC §7).

One :meth:`GRPOTrainer.step` consumes a :class:`~nemo_viper.training.rollout_batch.RolloutBatch`:

1. advantages per group (:func:`~nemo_viper.algorithms.group_advantages`), optional DAPO dynamic
   sampling (drop groups whose rewards are all equal) and overlong filtering (mask truncated responses);
2. old log-probs: the policy before the update, via :func:`~nemo_viper.models.logprobs.compute_logprobs`;
   when the rollout carries the generation backend's own log-probs, their mismatch with these is logged
   (``rollout/logprob_diff_mean`` / ``_max``) and, with ``importance_sampling_cap``, corrected by truncated
   importance sampling (:mod:`nemo_viper.algorithms.off_policy`);
3. ``num_minibatches`` optimizer updates, each over one mini-batch of rows split into micro-batches and
   run through Megatron's pipeline schedule, then ``optimizer.step()`` (grad clipping, distributed
   optimizer, bf16 master weights as configured).

Global normalisation. The model is built with ``calculate_per_token_loss=True``: DDP *sums* gradients
over data-parallel ranks and ``finalize_model_grads`` divides them by the sum, over micro-batches and DP
ranks, of the token counts the loss function returns. Each micro-batch returns ``(c · N, n_mb)`` where
``c`` is its :class:`~nemo_viper.algorithms.ClippedPolicyLoss` contribution (already divided by the
mini-batch's global counts), ``N`` the global response-token count and ``n_mb`` its own token count;
since ``Σ n_mb = N``, the final gradient is exactly ``Σ ∇c``: the gradient of the aggregated loss,
whatever the micro-batch or DP split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from nemo_viper.algorithms import (
    AdvantageConfig,
    ClippedPolicyLoss,
    LossNormalizer,
    PolicyLossConfig,
    dynamic_sampling_keep,
    group_advantages,
    logprob_mismatch,
    mask_truncated,
    truncated_importance_weights,
)
from nemo_viper.errors import ConfigError
from nemo_viper.models.logprobs import (
    PolicyBatch,
    compute_logprobs,
    forward_micro_batch,
    vocab_parallel_token_entropy,
    vocab_parallel_token_logprobs,
)
from nemo_viper.models.policy import MegatronPolicy, apply_precision
from nemo_viper.runtime import collectives
from nemo_viper.runtime.collectives import ReduceOp
from nemo_viper.training.rollout_batch import RolloutBatch


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with decoupled weight decay and global-norm gradient clipping (SPEC §7 defaults).

    ``distributed_optimizer=None`` (auto) shards optimizer state over data-parallel ranks on GPU and
    keeps it whole on CPU: without apex/Transformer Engine, megatron-core 0.19 falls back to torch's
    Adam, whose per-parameter ``step`` tensor its distributed-optimizer checkpoint loader cannot
    restore (it trains, but cannot resume).
    """

    lr: float = 1e-6
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    distributed_optimizer: bool | None = None

    @property
    def use_distributed_optimizer(self) -> bool:
        return torch.cuda.is_available() if self.distributed_optimizer is None else self.distributed_optimizer


@dataclass(frozen=True)
class GRPOConfig:
    """Update settings. ``num_minibatches`` optimizer updates per rollout batch (SPEC: 512/128 = 4).

    ``importance_sampling_cap``: ``None`` (default) trains on the samples as if ``pi_old`` drew them; a
    value ``C`` weights each token's advantage by ``min(pi_old / pi_sampler, C)`` (truncated importance
    sampling against the generation backend's log-probs; needs a backend that reports them).
    """

    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    num_minibatches: int = 4
    micro_batch_size: int = 4
    temperature: float = 1.0
    dynamic_sampling: bool = False
    overlong_filtering: bool = False
    importance_sampling_cap: float | None = None

    def __post_init__(self):
        for key in ("num_minibatches", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")
        if self.importance_sampling_cap is not None and not self.importance_sampling_cap > 0:
            raise ConfigError(f"importance_sampling_cap={self.importance_sampling_cap} must be > 0 (or None: off)")


def build_trainer(policy_config, config: GRPOConfig, init_checkpoint=None) -> GRPOTrainer:
    """Build the policy for training (DDP-wrapped, per-token loss normalisation) and its trainer.

    Weights come from ``policy_config.hf_path``, or from the policy checkpoint ``init_checkpoint``.
    """
    from megatron.core.distributed import DistributedDataParallelConfig

    from nemo_viper.models.checkpoint import load_model_weights
    from nemo_viper.models.policy import build_policy

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=config.optimizer.use_distributed_optimizer,
        overlap_grad_reduce=False,
    )
    policy = build_policy(policy_config, load_weights=init_checkpoint is None, wrap_with_ddp=True, ddp_config=ddp_config)
    if init_checkpoint is not None:
        load_model_weights(policy, init_checkpoint)
    return GRPOTrainer(policy, config)


def _summary(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    return {"mean": values.mean().item(), "std": values.std().item() if len(values) > 1 else 0.0,
            "min": values.min().item(), "max": values.max().item()}


class GRPOTrainer:
    """Owns the optimizer of a DDP-wrapped :class:`MegatronPolicy` and runs the update steps."""

    def __init__(self, policy: MegatronPolicy, config: GRPOConfig):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.utils import get_model_config

        if len(policy.chunks) != 1 or not hasattr(policy.chunks[0], "zero_grad_buffer"):
            raise ValueError("GRPOTrainer needs a policy built with build_policy(..., wrap_with_ddp=True)")
        self.policy = policy
        self.config = config
        self.loss_fn = ClippedPolicyLoss(config.loss)
        model_config = get_model_config(policy.chunks[0])
        if not model_config.calculate_per_token_loss:
            raise ValueError("the policy must be built with calculate_per_token_loss=True (build_policy does this)")
        model_config.finalize_model_grads_func = finalize_model_grads
        opt = config.optimizer
        optimizer_config = OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            use_distributed_optimizer=opt.use_distributed_optimizer,
        )
        apply_precision(policy.config, optimizer_config=optimizer_config)  # bf16 / FP8 preset, as Bridge does
        self.optimizer = get_megatron_optimizer(optimizer_config, policy.chunks)
        self.vision_start_token_id = policy.provider.vision_start_token_id

    # ------------------------------------------------------------------ step
    def step(self, rollout: RolloutBatch) -> dict[str, float]:
        """One rollout batch -> ``num_minibatches`` optimizer updates. Returns the step's metrics."""
        cfg = self.config
        times = {}
        started = time.perf_counter()
        advantages = group_advantages(rollout.rewards, rollout.group_index, cfg.advantage, rollout.sample_ids)
        metrics = {f"advantage/{k}": v for k, v in _summary(advantages).items()}
        metrics.update({f"reward/{k}": v for k, v in _summary(rollout.rewards).items()})
        metrics.update({f"reward/{k}": v for k, v in rollout.reward_metrics.items()})
        metrics.update({f"response_length/{k}": v for k, v in _summary(rollout.response_lengths.float()).items()})
        metrics["response/truncated_fraction"] = rollout.truncated.float().mean().item()

        keep = torch.ones(len(advantages), dtype=torch.bool)
        if cfg.dynamic_sampling:
            keep = dynamic_sampling_keep(rollout.rewards, rollout.group_index)
        metrics["dynamic_sampling/kept_fraction"] = keep.float().mean().item()
        rows = keep.nonzero().flatten()
        if len(rows) == 0:
            raise ValueError("dynamic sampling dropped every group of this rollout batch (all rewards equal)")
        batch = rollout.select(rows, self.vision_start_token_id)
        advantages = advantages[rows]
        mask = batch.sequences.response_mask.bool()
        if cfg.overlong_filtering:
            mask = mask_truncated(mask, batch.truncated.bool())
        sequences = replace(batch.sequences, response_mask=mask)
        times["advantages"] = time.perf_counter() - started

        started = time.perf_counter()
        old_logprobs = compute_logprobs(self.policy, sequences, cfg.micro_batch_size, cfg.temperature)
        times["logprob"] = time.perf_counter() - started
        if batch.sampler_logprobs is not None:
            mismatch = logprob_mismatch(old_logprobs, batch.sampler_logprobs, mask)
            metrics.update({f"rollout/logprob_diff_{k}": v for k, v in mismatch.items()})
            if cfg.importance_sampling_cap is not None:
                weights = truncated_importance_weights(old_logprobs, batch.sampler_logprobs, mask,
                                                       cfg.importance_sampling_cap)
                metrics["rollout/importance_weight_mean"] = (weights.sum() / mask.sum().clamp(min=1)).item()
                advantages = advantages[:, None] * weights  # per-token advantages: TIS-weighted loss terms
        elif cfg.importance_sampling_cap is not None:
            raise ValueError("importance_sampling_cap needs a rollout with the sampler's log-probs")

        started = time.perf_counter()
        update_metrics = []
        for minibatch_rows in torch.tensor_split(torch.arange(len(rows)), cfg.num_minibatches):
            if len(minibatch_rows) == 0:
                continue
            update_metrics.append(
                self._update(
                    sequences.select(minibatch_rows, self.vision_start_token_id),
                    old_logprobs[minibatch_rows],
                    advantages[minibatch_rows],
                )
            )
        times["update"] = time.perf_counter() - started
        metrics.update({f"time/{k}": v for k, v in times.items()})
        metrics = _reduce_over_data_parallel(metrics)  # per-rank statistics -> means / min / max
        for key in update_metrics[0]:  # already global: averaged over the mini-batches
            metrics[key] = sum(m[key] for m in update_metrics) / len(update_metrics)
        metrics["train/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    # ---------------------------------------------------------------- update
    def _update(self, minibatch: PolicyBatch, old_logprobs: torch.Tensor, advantages: torch.Tensor) -> dict:
        """Forward/backward over one mini-batch in micro-batches, then one optimizer step."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.config
        (model,) = self.policy.chunks
        model.train()
        model.zero_grad_buffer()
        self.optimizer.zero_grad()
        normalizer = _global_normalizer(minibatch.response_mask)
        mbs = min(cfg.micro_batch_size, minibatch.input_ids.shape[0])
        starts = range(0, minibatch.input_ids.shape[0], mbs)
        alignment = self.policy.config.token_alignment  # FP8 GEMMs: padded columns are masked out of the loss
        micro_batches = [
            (minibatch.select(slice(s, s + mbs), self.vision_start_token_id).pad_columns(alignment),
             torch.nn.functional.pad(old_logprobs[s : s + mbs], (0, -minibatch.input_ids.shape[1] % alignment)),
             advantages[s : s + mbs])
            for s in starts
        ]
        device = next(model.parameters()).device

        def forward_step(data_iterator, model):
            batch, old, adv = next(data_iterator)
            output = forward_micro_batch(model, batch, device, self.vision_start_token_id)
            return output, lambda logits: self._loss(logits, batch, old.to(device), adv.to(device), normalizer)

        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0][0].input_ids.shape[1],
            micro_batch_size=mbs,
            forward_only=False,
        )
        _, grad_norm, _ = self.optimizer.step()
        metrics = {"train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            # Loss-function metrics are additive contributions to mini-batch token means (summed over
            # micro-batches and DP ranks), except the maxima.
            for key in losses[0]:
                reduce = max if key.endswith("_max") else sum
                metrics[f"train/{key}"] = float(reduce(float(m[key]) for m in losses))
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            metrics = _from_last_pipeline_stage(metrics)
        return _reduce_over_data_parallel(metrics, additive=True)

    def _loss(self, logits, batch: PolicyBatch, old_logprobs, advantages, normalizer: LossNormalizer):
        """Loss-function contract of Megatron's schedule with ``calculate_per_token_loss=True``."""
        input_ids = batch.input_ids.to(logits.device)
        mask = batch.response_mask.to(logits.device)
        logprobs = vocab_parallel_token_logprobs(logits, input_ids, self.config.temperature)
        loss, metrics = self.loss_fn(logprobs, old_logprobs, advantages, mask, normalizer)
        entropy = vocab_parallel_token_entropy(logits.detach(), self.config.temperature)
        metrics["entropy"] = (entropy * mask).sum() / normalizer.num_tokens
        metrics["loss"] = loss.detach()
        num_tokens = mask.sum().to(torch.int)
        return loss * normalizer.num_tokens, num_tokens, {k: v.detach() for k, v in metrics.items()}


def _global_normalizer(mask: torch.Tensor) -> LossNormalizer:
    """Response-token and sequence counts of the mini-batch summed over data-parallel ranks."""
    from megatron.core import parallel_state

    counts = torch.tensor([mask.sum(), (mask.sum(dim=1) > 0).sum()], dtype=torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        counts = collectives.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return LossNormalizer(num_tokens=int(counts[0]), num_sequences=int(counts[1]))


def _reduce_over_data_parallel(metrics: dict[str, float], additive: bool = False) -> dict[str, float]:
    """Combine per-rank metrics: ``*_max`` / ``*/max`` by MAX, ``*/min`` by MIN; the rest summed when
    ``additive`` (contributions to a global mean) and averaged otherwise (per-rank statistics, e.g. reward
    means). ``train/grad_norm`` is computed over the global gradient, the same on every rank: kept as is."""
    from megatron.core import parallel_state

    world = parallel_state.get_data_parallel_world_size()
    if world == 1:
        return metrics
    group = parallel_state.get_data_parallel_group()
    result = {k: v for k, v in metrics.items() if k == "train/grad_norm"}
    keys = sorted(k for k in metrics if k not in result)
    for op, selected in (
        (ReduceOp.MAX, [k for k in keys if k.endswith(("_max", "/max"))]),
        (ReduceOp.MIN, [k for k in keys if k.endswith("/min")]),
        (ReduceOp.SUM, [k for k in keys if not k.endswith(("_max", "/max", "/min"))]),
    ):
        values = collectives.all_reduce(torch.tensor([metrics[k] for k in selected], dtype=torch.float64), op, group)
        if op == ReduceOp.SUM and not additive:
            values /= world
        result.update(zip(selected, values.tolist()))
    return result


def _from_last_pipeline_stage(metrics: dict[str, float]) -> dict[str, float]:
    from megatron.core import parallel_state

    return collectives.broadcast_object(
        metrics if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
