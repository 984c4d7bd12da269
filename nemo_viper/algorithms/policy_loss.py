"""Clipped policy-gradient loss (GRPO/DAPO) with global, micro-batch-exact normalisation.

Per response token ``t`` of sequence ``i`` (mask ``m_it``, ``|o_i| = Σ_t m_it``)::

    r  = exp(logp − old_logp)                        (log-ratio clamped to ±20 first)
    ℓ  = −min(r·A, clip(r, 1 − eps_low, 1 + eps_high)·A)
    ℓ  = min(ℓ, −A·c)            for A < 0, when dual-clip c is set
    ℓ += β·k                     when β > 0, with k1 = logp − ref_logp
                                          or k3 = min(exp(d) − d − 1, 10),  d = ref_logp − logp

k3 is capped at 10 as verl caps its ``low_var_kl`` (clamped to ±10; k3 ≥ 0): at ``|d|`` = 20 the bare
estimator is ~4.9e8, and one such token would swamp the mini-batch's loss. A capped token adds no KL
gradient (the bound is constant), as in verl.

Aggregation over the optimizer mini-batch (``N_tok`` response tokens, ``N_seq`` sequences, both
counted over the *whole* mini-batch on all data-parallel ranks):

    token-mean               Σ_it ℓ·m / N_tok
    seq-mean-token-mean      Σ_i (Σ_t ℓ·m / |o_i|) / N_seq
    seq-mean-token-sum       Σ_it ℓ·m / N_seq
    seq-mean-token-sum-norm  Σ_it ℓ·m / (N_seq · L)       (Dr.GRPO, L = max_response_length)

Because every term is divided by global counts, each micro-batch's value is an additive
*contribution*: the sum over all micro-batches and ranks is exactly the aggregated loss, whatever
the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_viper.algorithms.config import PolicyLossConfig
from nemo_viper.runtime.metrics import Metric

# Log-ratios are clamped to this range before exp(), so one wild token cannot produce inf/NaN.
_LOG_RATIO_LIMIT = 20.0
# Upper bound of the per-token k3 estimate (verl's low_var_kl bound).
K3_LIMIT = 10.0


@dataclass(frozen=True)
class LossNormalizer:
    """Global counts of one optimizer mini-batch (all micro-batches, all data-parallel ranks).

    Attributes:
        num_tokens: response tokens (``Σ mask``).
        num_sequences: sequences with at least one response token. Rows whose mask is all zero
            (padding rows, responses removed by overlong filtering) are not counted.

    In a data-parallel job each rank computes its local counts (e.g. with :meth:`from_masks` on its
    own micro-batches), all-reduces them with SUM, and builds the normalizer from the totals.
    """

    num_tokens: int
    num_sequences: int

    def __post_init__(self) -> None:
        if self.num_tokens <= 0 or self.num_sequences <= 0:
            raise ValueError(
                f"LossNormalizer needs positive counts, got num_tokens={self.num_tokens}, "
                f"num_sequences={self.num_sequences}"
            )

    @classmethod
    def from_masks(cls, masks: list[Tensor]) -> LossNormalizer:
        """Counts over the ``[B, T]`` response masks of all micro-batches of one process."""
        num_tokens = sum(int(m.sum()) for m in masks)
        num_sequences = sum(int((m.sum(dim=-1) > 0).sum()) for m in masks)
        return cls(num_tokens=num_tokens, num_sequences=num_sequences)


class ClippedPolicyLoss:
    """Micro-batch contribution of the clipped policy loss; see the module docstring for the math.

    Call contract: ``loss, metrics = loss_fn(logprobs, old_logprobs, advantages, mask, normalizer,
    ref_logprobs=None)`` with

    * ``logprobs``: ``[B, T]`` log-probs of the taken tokens under the current policy (with grad);
    * ``old_logprobs``: ``[B, T]`` log-probs under the rollout-time policy (no grad needed);
    * ``advantages``: ``[B]`` (one per sequence, broadcast to tokens) or ``[B, T]``;
    * ``mask``: ``[B, T]`` bool/0-1 response mask. Each row must hold a *whole* response (the
      per-sequence length ``|o_i|`` is read from it), so do not split one sequence over micro-batches;
    * ``normalizer``: global :class:`LossNormalizer` of the optimizer mini-batch;
    * ``ref_logprobs``: ``[B, T]`` reference-policy log-probs; required iff ``kl_beta > 0``.

    Masked-out positions may hold any value (even NaN/inf); they never reach the loss or gradient.
    Computation runs in at least float32.

    ``loss`` is a 0-dim tensor: this micro-batch's additive share of the mini-batch loss. Summing
    ``loss`` over all micro-batches on all ranks gives the aggregated loss exactly, so the gradients of
    the shares, *summed* over micro-batches and data-parallel ranks, are exactly the mini-batch
    gradient. A training loop must therefore sum, not average: the project's Megatron update
    (:mod:`nemo_viper.models.training`) runs with ``calculate_per_token_loss``, returns ``loss · N_tok``
    with the micro-batch's token count ``n_mb`` to Megatron's schedule, and DDP sums the gradients over
    ranks and divides by ``Σ n_mb = N_tok``: no ``dp_size`` or micro-batch-count factor remains.

    ``metrics`` are :class:`~nemo_viper.runtime.metrics.Metric` values (detached 0-dim tensors) that
    declare their reduction: every key except ``ratio_max`` is a ``SUM`` contribution to a mini-batch
    *token mean* (summed over micro-batches and ranks it is the mean exactly); ``ratio_max`` is a ``MAX``.

    * ``clip_frac_low``: fraction of tokens with ``A < 0`` and ``r < 1 − eps_low`` (clip active);
    * ``clip_frac_high``: fraction with ``A > 0`` and ``r > 1 + eps_high``;
    * ``dual_clip_frac``: fraction with ``A < 0`` and ``r > c`` (0 when dual-clip is off);
    * ``ratio_mean`` and ``ratio_max`` over response tokens;
    * ``kl_mean``: mean per-token KL estimate (only when ``kl_beta > 0``).
    """

    def __init__(self, config: PolicyLossConfig) -> None:
        if config.aggregation == "seq-mean-token-sum-norm" and config.max_response_length is None:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_response_length (L)")
        self.config = config

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        normalizer: LossNormalizer,
        ref_logprobs: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Metric]]:
        cfg = self.config
        if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
            raise ValueError(
                f"logprobs, old_logprobs and mask must share one [B, T] shape, got "
                f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
            )
        if cfg.kl_beta > 0 and ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs")

        dtype = torch.promote_types(logprobs.dtype, torch.float32)
        valid = mask.bool()
        m = valid.to(dtype)
        adv = self._token_advantages(advantages, logprobs.shape).to(dtype)
        adv = torch.where(valid, adv, torch.zeros_like(adv))

        log_ratio = self._masked_log_diff(logprobs, old_logprobs, valid, dtype)
        ratio = torch.exp(log_ratio)
        clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
        token_loss = torch.maximum(-adv * ratio, -adv * clipped)
        if cfg.dual_clip_c is not None:
            dual_bound = torch.minimum(token_loss, -adv * cfg.dual_clip_c)
            token_loss = torch.where(adv < 0, dual_bound, token_loss)

        metrics: dict[str, Tensor] = {}
        if cfg.kl_beta > 0:
            kl = self._kl(logprobs, ref_logprobs, valid, dtype)
            token_loss = token_loss + cfg.kl_beta * kl
            metrics["kl_mean"] = (kl * m).sum()

        loss = self._aggregate(token_loss * m, m, normalizer)

        with torch.no_grad():
            r = ratio.detach()
            metrics["clip_frac_low"] = ((adv < 0) & (r < 1.0 - cfg.eps_low) & valid).sum().to(dtype)
            metrics["clip_frac_high"] = ((adv > 0) & (r > 1.0 + cfg.eps_high) & valid).sum().to(dtype)
            c = cfg.dual_clip_c
            dual = (adv < 0) & (r > c) & valid if c is not None else torch.zeros_like(valid)
            metrics["dual_clip_frac"] = dual.sum().to(dtype)
            metrics["ratio_mean"] = (r * m).sum()
            metrics = {k: Metric.sum(v.detach() / normalizer.num_tokens) for k, v in metrics.items()}
            metrics["ratio_max"] = Metric.max(torch.where(valid, r, torch.zeros_like(r)).max())
        return loss, metrics

    @staticmethod
    def _token_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
        if advantages.shape == shape:
            return advantages
        if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
            return advantages[:, None].expand(shape)
        raise ValueError(
            f"advantages must be [B] or [B, T] with [B, T]={tuple(shape)}, got {tuple(advantages.shape)}"
        )

    @staticmethod
    def _masked_log_diff(a: Tensor, b: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
        """``clamp(a − b, ±20)`` on valid tokens, 0 elsewhere (so padding never makes NaN grads)."""
        diff = a.to(dtype) - b.to(dtype)
        diff = torch.where(valid, diff, torch.zeros_like(diff))
        return diff.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)

    def _kl(self, logprobs: Tensor, ref_logprobs: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
        if ref_logprobs.shape != logprobs.shape:
            raise ValueError(f"ref_logprobs shape {tuple(ref_logprobs.shape)} != {tuple(logprobs.shape)}")
        if self.config.kl_estimator == "k1":
            return self._masked_log_diff(logprobs, ref_logprobs, valid, dtype)
        d = self._masked_log_diff(ref_logprobs, logprobs, valid, dtype)
        return (torch.exp(d) - d - 1.0).clamp(max=K3_LIMIT)

    def _aggregate(self, masked_loss: Tensor, m: Tensor, normalizer: LossNormalizer) -> Tensor:
        cfg = self.config
        if cfg.aggregation == "token-mean":
            return masked_loss.sum() / normalizer.num_tokens
        if cfg.aggregation == "seq-mean-token-mean":
            lengths = m.sum(dim=-1).clamp(min=1.0)
            return (masked_loss.sum(dim=-1) / lengths).sum() / normalizer.num_sequences
        if cfg.aggregation == "seq-mean-token-sum":
            return masked_loss.sum() / normalizer.num_sequences
        return masked_loss.sum() / (normalizer.num_sequences * cfg.max_response_length)
