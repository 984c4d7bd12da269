"""The policy's training interface over Megatron: :class:`PolicyWorker`, the Megatron
:class:`~nemo_viper.models.interfaces.TrainablePolicy` (the boundary NeMo-RL's ``PolicyInterface`` draws; the
interface, its batch, loss-function contract and optimizer settings live in :mod:`nemo_viper.models.interfaces`,
which imports no Megatron).

An RL algorithm sees the policy only through that interface:

- :meth:`~PolicyWorker.get_logprobs` / :meth:`~PolicyWorker.get_reference_logprobs`: per-token log-probs of
  a :class:`~nemo_viper.models.logprobs.PolicyBatch` under the policy / the frozen KL reference
  (:func:`~nemo_viper.models.logprobs.compute_logprobs`);
- :meth:`~PolicyWorker.train` ``(data, loss_fn, ...)``: optimizer updates over mini-batches of a
  :class:`~nemo_viper.models.interfaces.TrainingBatch`, with the algorithm's loss function
  (:class:`~nemo_viper.models.interfaces.LossFunction`, pure torch) applied to
  each micro-batch's token log-probs;
- ``data_parallel`` (:class:`~nemo_viper.runtime.collectives.DataParallel`), ``pad_token_id``,
  ``save_checkpoint`` / ``load_checkpoint``.

Everything Megatron stays on this side: the micro-batch loop through Megatron's pipeline schedule, the
global loss normaliser, the reductions over data-parallel and pipeline ranks, gradient clipping and the
optimizer step (distributed optimizer, bf16/FP8 presets). Generation backends plug in next to it, on the
same :class:`~nemo_viper.models.policy.MegatronPolicy` (``PolicyWorker.model``).

Global normalisation. The model is built with ``calculate_per_token_loss=True``: DDP *sums* gradients over
data-parallel ranks and ``finalize_model_grads`` divides them by the sum, over micro-batches and DP ranks,
of the token counts the loss function returns. Each micro-batch returns ``(c · N, n_mb)`` where ``c`` is the
loss function's value (its contribution, already divided by the mini-batch's global counts), ``N`` the
global response-token count and ``n_mb`` its own token count; since ``Σ n_mb = N``, the final gradient is
exactly ``Σ ∇c``: the gradient of the aggregated loss, whatever the micro-batch or DP split.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from nemo_viper.algorithms.policy_loss import LossNormalizer
from nemo_viper.models.hf_checkpoint import text_config
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.config import OptimizerSettings
from nemo_viper.models.interfaces import LossFunction, TrainingBatch
from nemo_viper.models.logprobs import (
    compute_logprobs,
    forward_micro_batch,
    vocab_parallel_token_entropy,
    vocab_parallel_token_logprobs,
)
from nemo_viper.models.policy import MegatronPolicy, PolicyConfig, apply_precision
from nemo_viper.runtime import collectives
from nemo_viper.runtime.collectives import DataParallel
from nemo_viper.runtime.metrics import Metric, combine, reduce_metrics


def build_policy_worker(policy_config: PolicyConfig, optimizer: OptimizerSettings, with_reference: bool = False,
                        init_checkpoint=None, hf_weights: bool = True) -> PolicyWorker:
    """Build the policy for training (DDP-wrapped, per-token loss normalisation) and its optimizer.

    Weights come from ``policy_config.hf_path``, or from the policy checkpoint ``init_checkpoint``;
    ``hf_weights=False``: Megatron's random initialisation on the policy's device instead (only the
    directory's ``config.json`` is read: an architecture check at full size without loading a checkpoint).
    ``with_reference``: also build a frozen copy of the same starting weights (the KL reference).
    """
    from megatron.core.distributed import DistributedDataParallelConfig

    from nemo_viper.models.checkpoint import load_model_weights
    from nemo_viper.models.policy import build_policy

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=optimizer.use_distributed_optimizer,
        overlap_grad_reduce=False,
    )
    load_weights = hf_weights and init_checkpoint is None
    policy = build_policy(policy_config, load_weights=load_weights, wrap_with_ddp=True, ddp_config=ddp_config)
    if init_checkpoint is not None:
        load_model_weights(policy, init_checkpoint)
    reference = None
    if with_reference:
        reference = build_policy(policy_config, load_weights=load_weights)
        if init_checkpoint is not None:
            load_model_weights(reference, init_checkpoint)
        for chunk in reference.chunks:
            chunk.requires_grad_(False)
            chunk.eval()
    return PolicyWorker(policy, optimizer, reference)


def micro_batch_loss(logits: Tensor, batch: TrainingBatch, loss_fn: LossFunction, normalizer: LossNormalizer,
                     temperature: float) -> tuple[Tensor, Tensor, dict[str, Metric]]:
    """Megatron's loss-function contract with ``calculate_per_token_loss=True`` for one micro-batch:
    ``(loss · N_tok, n_mb, metrics)`` from the vocab-sharded ``logits``; adds the policy's entropy (a ``SUM``
    contribution to the token mean) and the loss share to the loss function's metrics."""
    input_ids = batch.sequences.input_ids.to(logits.device)
    mask = batch.sequences.response_mask.to(logits.device)
    logprobs = vocab_parallel_token_logprobs(logits, input_ids, temperature)
    loss, metrics = loss_fn(logprobs, batch, normalizer)
    entropy = vocab_parallel_token_entropy(logits.detach(), temperature)
    metrics["entropy"] = Metric.sum((entropy * mask).sum() / normalizer.num_tokens)
    metrics["loss"] = Metric.sum(loss.detach())
    num_tokens = mask.sum().to(torch.int)
    return loss * normalizer.num_tokens, num_tokens, metrics


class PolicyWorker:
    """A DDP-wrapped :class:`MegatronPolicy` with its Megatron optimizer (and optional frozen KL reference),
    behind the training interface of the module docstring."""

    def __init__(self, model: MegatronPolicy, optimizer: OptimizerSettings, reference: MegatronPolicy | None = None):
        from megatron.core import parallel_state
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.utils import get_model_config

        if len(model.chunks) != 1 or not hasattr(model.chunks[0], "zero_grad_buffer"):
            raise ValueError("PolicyWorker needs a policy built with build_policy(..., wrap_with_ddp=True)")
        model_config = get_model_config(model.chunks[0])
        if not model_config.calculate_per_token_loss:
            raise ValueError("the policy must be built with calculate_per_token_loss=True (build_policy does this)")
        model_config.finalize_model_grads_func = finalize_model_grads
        self.model = model
        self.reference = reference
        optimizer_config = OptimizerConfig(
            optimizer="adam",
            lr=optimizer.lr,
            min_lr=optimizer.lr,
            weight_decay=optimizer.weight_decay,
            adam_beta1=optimizer.adam_beta1,
            adam_beta2=optimizer.adam_beta2,
            adam_eps=optimizer.adam_eps,
            clip_grad=optimizer.clip_grad,
            use_distributed_optimizer=optimizer.use_distributed_optimizer,
        )
        apply_precision(model.config, optimizer_config=optimizer_config)  # bf16 / FP8 preset, as Bridge does
        self.optimizer = get_megatron_optimizer(optimizer_config, model.chunks)
        self.pad_token_id = text_config(model.hf_config).get("pad_token_id") or 0
        self.data_parallel = DataParallel(
            rank=parallel_state.get_data_parallel_rank(),
            size=parallel_state.get_data_parallel_world_size(),
            group=parallel_state.get_data_parallel_group(),
        )

    @property
    def has_reference(self) -> bool:
        return self.reference is not None

    # ------------------------------------------------------------------ log-probs
    def get_logprobs(self, batch: PolicyBatch, micro_batch_size: int, temperature: float) -> Tensor:
        """Log-probs [B, S] (float32, CPU) of ``batch``'s response tokens under the current policy."""
        return compute_logprobs(self.model, batch, micro_batch_size, temperature)

    def get_reference_logprobs(self, batch: PolicyBatch, micro_batch_size: int, temperature: float) -> Tensor:
        """The same under the frozen reference policy (built with ``with_reference=True``)."""
        if self.reference is None:
            raise ValueError("this policy worker was built without a reference policy")
        return compute_logprobs(self.reference, batch, micro_batch_size, temperature)

    # ------------------------------------------------------------------ update
    def train(self, data: TrainingBatch, loss_fn: LossFunction, num_minibatches: int, micro_batch_size: int,
              temperature: float) -> dict[str, float]:
        """``num_minibatches`` optimizer updates, one per consecutive mini-batch of ``data``'s rows (the same
        split on every rank). Returns ``train/updates``, the ``train/*`` metrics of the loss function, the
        entropy, the loss and the gradient norm (each reduced over the ranks by its declared reduction,
        then averaged over the updates) and ``train/learning_rate``.

        A mini-batch with no response token on any data-parallel rank is skipped by all ranks."""
        updates = []
        for rows in torch.tensor_split(torch.arange(data.rows), num_minibatches):
            if len(rows) == 0:  # fewer rows than mini-batches: the same on every rank
                continue
            result = self._update(data.select(rows), loss_fn, micro_batch_size,
                                  temperature)
            if result is not None:
                updates.append(result)
        metrics = {"train/updates": float(len(updates))}
        for key in updates[0] if updates else ():  # already global: averaged over the mini-batches
            metrics[key] = sum(m[key] for m in updates) / len(updates)
        metrics["train/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def _update(self, minibatch: TrainingBatch, loss_fn: LossFunction, micro_batch_size: int,
                temperature: float) -> dict[str, float] | None:
        """Forward/backward over one mini-batch in micro-batches, then one optimizer step.

        Returns ``None`` (no step, on every rank) when the mini-batch has no response token globally."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        (model,) = self.model.chunks
        model.train()
        model.zero_grad_buffer()
        self.optimizer.zero_grad()
        normalizer = self._global_normalizer(minibatch.sequences.response_mask)
        if normalizer is None:
            return None
        mbs = min(micro_batch_size, minibatch.rows)
        alignment = self.model.config.token_alignment  # FP8 GEMMs: padded columns are masked out of the loss
        micro_batches = [minibatch.select(slice(s, s + mbs)).pad_columns(alignment)
                         for s in range(0, minibatch.rows, mbs)]
        device = next(model.parameters()).device

        def forward_step(data_iterator, model):
            micro_batch = next(data_iterator)
            output = forward_micro_batch(model, micro_batch.sequences, device)
            return output, lambda logits: micro_batch_loss(logits, micro_batch, loss_fn, normalizer, temperature)

        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=micro_batches[0].sequences.input_ids.shape[1],
            micro_batch_size=mbs,
            forward_only=False,
        )
        _, grad_norm, _ = self.optimizer.step()  # clips to clip_grad; the norm of the all-reduced gradient
        metrics = {"train/grad_norm": Metric.replicated(float(grad_norm) if grad_norm is not None else float("nan"))}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):  # where the loss function ran
            metrics.update({f"train/{key}": combine([m[key] for m in losses]) for key in losses[0]})
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            metrics = collectives.broadcast_object(
                metrics if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return reduce_metrics(metrics, self.data_parallel)

    def _global_normalizer(self, mask: Tensor) -> LossNormalizer | None:
        """Response-token and sequence counts of the mini-batch summed over data-parallel ranks (``None`` if 0)."""
        counts = torch.tensor([mask.sum(), (mask.sum(dim=1) > 0).sum()], dtype=torch.float64)
        counts = self.data_parallel.all_reduce(counts)
        if counts[0] == 0:
            return None
        return LossNormalizer(num_tokens=int(counts[0]), num_sequences=int(counts[1]))

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path, step: int, trainer_state: dict) -> Path:
        """Weights, optimizer and ``trainer_state`` at ``step`` (collective; atomic)."""
        from nemo_viper.models.checkpoint import save_policy

        return save_policy(self.model, path, metadata={"step": step}, optimizer=self.optimizer,
                           trainer_state=trainer_state)

    def load_checkpoint(self, path: str | Path) -> dict:
        """Weights and optimizer state of a training checkpoint; returns its trainer state (collective)."""
        from nemo_viper.models.checkpoint import load_training_state

        return load_training_state(self.model, self.optimizer, path)
