"""The GRPO-variant update on the Megatron policy (SPEC §7).

One :meth:`GRPOTrainer.step` consumes a :class:`~nemo_viper.training.rollout_batch.RolloutBatch`:

1. advantages per group (:func:`~nemo_viper.algorithms.group_advantages`; Dr.GRPO without the std), optional
   DAPO dynamic sampling (mask groups whose rewards are all equal; the loop has refilled the batch) and
   overlong filtering (mask truncated responses);
2. old log-probs: the policy before the update, via :func:`~nemo_viper.models.logprobs.compute_logprobs`, and
   with ``loss.kl_beta > 0`` the frozen reference policy's log-probs through the same function; when the
   rollout carries the generation backend's own log-probs, their mismatch with the old ones is logged
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
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import (
    compute_logprobs,
    forward_micro_batch,
    vocab_parallel_token_entropy,
    vocab_parallel_token_logprobs,
)
from nemo_viper.models.policy import MegatronPolicy, apply_precision
from nemo_viper.rollout.interface import SamplingParams
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

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0")
        for name in ("weight_decay", "clip_grad"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0 (0 = off)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not self.adam_eps > 0:
            raise ConfigError(f"adam_eps={self.adam_eps} must be > 0")

    @property
    def use_distributed_optimizer(self) -> bool:
        return torch.cuda.is_available() if self.distributed_optimizer is None else self.distributed_optimizer


@dataclass(frozen=True)
class GRPOConfig:
    """Update settings (the run config's ``rl.grpo`` section).

    ``num_minibatches`` optimizer updates per rollout batch (SPEC: 512/128 = 4), each split into
    micro-batches of ``micro_batch_size`` rows. ``dynamic_sampling`` (DAPO) masks out groups whose rewards
    are all equal (the loop refills the batch first, see :mod:`nemo_viper.training.loop`);
    ``overlong_filtering`` (DAPO) masks out responses cut at the length limit. ``advantage.normalize_by_std
    = false`` is Dr.GRPO; ``loss.dual_clip_c`` the dual clip; ``loss.kl_beta > 0`` adds the KL penalty to a
    frozen reference policy, which is then loaded (the starting policy of the stage).
    ``importance_sampling_cap``: ``None`` (default) trains on the samples as if ``pi_old`` drew them; a
    value ``C`` weights each token's advantage by ``min(pi_old / pi_sampler, C)`` (truncated importance
    sampling against the generation backend's log-probs, e.g. vLLM's).
    """

    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    num_minibatches: int = 4
    micro_batch_size: int = 4
    dynamic_sampling: bool = False
    overlong_filtering: bool = False
    importance_sampling_cap: float | None = None

    def __post_init__(self):
        for key in ("num_minibatches", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if self.importance_sampling_cap is not None and not self.importance_sampling_cap > 0:
            raise ConfigError(f"importance_sampling_cap={self.importance_sampling_cap} must be > 0 (or None: off)")


def build_trainer(policy_config, config: GRPOConfig, sampling: SamplingParams = SamplingParams(),
                  init_checkpoint=None) -> GRPOTrainer:
    """Build the policy for training (DDP-wrapped, per-token loss normalisation) and its trainer.

    Weights come from ``policy_config.hf_path``, or from the policy checkpoint ``init_checkpoint``. With
    ``config.loss.kl_beta > 0`` a second, frozen copy of the same starting weights is built as the KL
    reference (never otherwise). ``sampling``: how the rollouts are drawn (log-probs are taken at its
    temperature; its ``max_new_tokens`` is the ``L`` of ``seq-mean-token-sum-norm`` unless the loss sets one).
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
    reference = None
    if config.loss.kl_beta > 0:
        reference = build_policy(policy_config, load_weights=init_checkpoint is None)
        if init_checkpoint is not None:
            load_model_weights(reference, init_checkpoint)
        for chunk in reference.chunks:
            chunk.requires_grad_(False)
            chunk.eval()
    return GRPOTrainer(policy, config, sampling, reference)


def _summary(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    return {"mean": values.mean().item(), "std": values.std().item() if len(values) > 1 else 0.0,
            "min": values.min().item(), "max": values.max().item()}


class GRPOTrainer:
    """Owns the optimizer of a DDP-wrapped :class:`MegatronPolicy` and runs the update steps.

    ``reference``: the frozen KL reference policy (required iff ``config.loss.kl_beta > 0``); its
    log-probs come from the same :func:`~nemo_viper.models.logprobs.compute_logprobs` as the old ones.
    """

    def __init__(self, policy: MegatronPolicy, config: GRPOConfig, sampling: SamplingParams = SamplingParams(),
                 reference: MegatronPolicy | None = None):
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.utils import get_model_config

        if len(policy.chunks) != 1 or not hasattr(policy.chunks[0], "zero_grad_buffer"):
            raise ValueError("GRPOTrainer needs a policy built with build_policy(..., wrap_with_ddp=True)")
        if (config.loss.kl_beta > 0) != (reference is not None):
            raise ValueError("a reference policy is needed exactly when loss.kl_beta > 0")
        self.policy = policy
        self.reference = reference
        self.config = config
        self.temperature = sampling.temperature
        loss = config.loss
        if loss.max_response_length is None:
            loss = replace(loss, max_response_length=sampling.max_new_tokens)
        self.loss_fn = ClippedPolicyLoss(loss)
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
        metrics = {f"advantage/{k}": v for k, v in _summary(advantages).items()}
        metrics.update({f"reward/{k}": v for k, v in _summary(rollout.rewards).items()})
        metrics.update({f"reward/{k}": v for k, v in rollout.reward_metrics.items()})
        metrics.update({f"response_length/{k}": v for k, v in _summary(rollout.response_lengths.float()).items()})
        metrics["response/truncated_fraction"] = rollout.truncated.float().mean().item()

        mask = rollout.sequences.response_mask.bool()
        if cfg.dynamic_sampling:
            keep = dynamic_sampling_keep(rollout.rewards, rollout.group_index)
            metrics["dynamic_sampling/kept_fraction"] = keep.float().mean().item()
            mask = mask & keep[:, None]
        if cfg.overlong_filtering:
            mask = mask_truncated(mask, rollout.truncated.bool())
            metrics["overlong_filtering/masked_fraction"] = rollout.truncated.float().mean().item()
        sequences = replace(rollout.sequences, response_mask=mask)
        times["advantages"] = time.perf_counter() - started

        started = time.perf_counter()
        old_logprobs = compute_logprobs(self.policy, sequences, cfg.micro_batch_size, self.temperature)
        times["logprob"] = time.perf_counter() - started
        ref_logprobs = None
        if self.reference is not None:
            started = time.perf_counter()
            ref_logprobs = compute_logprobs(self.reference, sequences, cfg.micro_batch_size, self.temperature)
            times["ref_logprob"] = time.perf_counter() - started
        if rollout.sampler_logprobs is not None:
            mismatch = logprob_mismatch(old_logprobs, rollout.sampler_logprobs, mask)
            metrics.update({f"rollout/logprob_diff_{k}": v for k, v in mismatch.items()})
            if cfg.importance_sampling_cap is not None:
                weights = truncated_importance_weights(old_logprobs, rollout.sampler_logprobs, mask,
                                                       cfg.importance_sampling_cap)
                metrics["rollout/importance_weight_mean"] = (weights.sum() / mask.sum().clamp(min=1)).item()
                advantages = advantages[:, None] * weights  # per-token advantages: TIS-weighted loss terms
        elif cfg.importance_sampling_cap is not None:
            raise ValueError("importance_sampling_cap needs a rollout with the sampler's log-probs")

        started = time.perf_counter()
        update_metrics = []
        for minibatch_rows in torch.tensor_split(torch.arange(len(advantages)), cfg.num_minibatches):
            if len(minibatch_rows) == 0:  # fewer rows than mini-batches: the same on every rank
                continue
            result = self._update(
                sequences.select(minibatch_rows, self.vision_start_token_id),
                old_logprobs[minibatch_rows],
                advantages[minibatch_rows],
                None if ref_logprobs is None else ref_logprobs[minibatch_rows],
            )
            if result is not None:
                update_metrics.append(result)
        times["update"] = time.perf_counter() - started
        metrics.update({f"time/{k}": v for k, v in times.items()})
        metrics = _reduce_over_data_parallel(metrics)  # per-rank statistics -> means / min / max
        metrics["train/updates"] = float(len(update_metrics))
        for key in update_metrics[0] if update_metrics else ():  # already global: averaged over the mini-batches
            metrics[key] = sum(m[key] for m in update_metrics) / len(update_metrics)
        metrics["train/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    # ---------------------------------------------------------------- update
    def _update(self, minibatch: PolicyBatch, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                ref_logprobs: torch.Tensor | None) -> dict | None:
        """Forward/backward over one mini-batch in micro-batches, then one optimizer step.

        Returns ``None`` (no step, on every rank) when the mini-batch has no response token globally."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg = self.config
        (model,) = self.policy.chunks
        model.train()
        model.zero_grad_buffer()
        self.optimizer.zero_grad()
        normalizer = _global_normalizer(minibatch.response_mask)
        if normalizer is None:
            return None
        mbs = min(cfg.micro_batch_size, minibatch.input_ids.shape[0])
        starts = range(0, minibatch.input_ids.shape[0], mbs)
        alignment = self.policy.config.token_alignment  # FP8 GEMMs: padded columns are masked out of the loss
        padding = (0, -minibatch.input_ids.shape[1] % alignment)

        def per_token(values: torch.Tensor) -> torch.Tensor:  # [rows, tokens] -> padded like the micro-batch
            return torch.nn.functional.pad(values, padding)

        micro_batches = [
            (minibatch.select(slice(s, s + mbs), self.vision_start_token_id).pad_columns(alignment),
             per_token(old_logprobs[s : s + mbs]),
             per_token(advantages[s : s + mbs]) if advantages.dim() == 2 else advantages[s : s + mbs],
             None if ref_logprobs is None else per_token(ref_logprobs[s : s + mbs]))
            for s in starts
        ]
        device = next(model.parameters()).device

        def forward_step(data_iterator, model):
            batch, old, adv, ref = next(data_iterator)
            output = forward_micro_batch(model, batch, device, self.vision_start_token_id)
            ref = None if ref is None else ref.to(device)
            return output, lambda logits: self._loss(logits, batch, old.to(device), adv.to(device), normalizer, ref)

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

    def _loss(self, logits, batch: PolicyBatch, old_logprobs, advantages, normalizer: LossNormalizer, ref_logprobs):
        """Loss-function contract of Megatron's schedule with ``calculate_per_token_loss=True``."""
        input_ids = batch.input_ids.to(logits.device)
        mask = batch.response_mask.to(logits.device)
        logprobs = vocab_parallel_token_logprobs(logits, input_ids, self.temperature)
        loss, metrics = self.loss_fn(logprobs, old_logprobs, advantages, mask, normalizer, ref_logprobs)
        entropy = vocab_parallel_token_entropy(logits.detach(), self.temperature)
        metrics["entropy"] = (entropy * mask).sum() / normalizer.num_tokens
        metrics["loss"] = loss.detach()
        num_tokens = mask.sum().to(torch.int)
        return loss * normalizer.num_tokens, num_tokens, {k: v.detach() for k, v in metrics.items()}


def _global_normalizer(mask: torch.Tensor) -> LossNormalizer | None:
    """Response-token and sequence counts of the mini-batch summed over data-parallel ranks (``None`` if 0)."""
    from megatron.core import parallel_state

    counts = torch.tensor([mask.sum(), (mask.sum(dim=1) > 0).sum()], dtype=torch.float64)
    if parallel_state.get_data_parallel_world_size() > 1:
        counts = collectives.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    if counts[0] == 0:
        return None
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
