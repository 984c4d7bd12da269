"""Sampler-vs-trainer log-prob mismatch and its truncated importance-sampling correction (pure torch).

A generation engine other than the trainer (vLLM: other kernels, precision, renormalisation after token
suppression) reports log-probs ``s_t`` that differ from the trainer's ``p_t = log pi_old(o_t)`` of the same
tokens. GRPO's ratio ``exp(logp - p_t)`` assumes the samples came from ``pi_old``; they came from the
sampler. The mismatch is measured every step (mean and max of ``|p_t - s_t|`` over response tokens) and,
optionally, corrected per token with truncated importance sampling (TIS, as verl and NeMo-RL offer):
``w_t = min(exp(p_t - s_t), C)`` multiplies token ``t``'s policy-gradient term (its advantage).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nemo_viper.runtime.metrics import Metric


def logprob_mismatch(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, Metric]:
    """``{"mean", "max"}`` of ``|trainer - sampler|`` over the tokens where ``mask`` is set ([B, T] each): this
    rank's mean (averaged over ranks) and max (the global max)."""
    mask = mask.bool()
    if not bool(mask.any()):
        return {"mean": Metric.mean(0.0), "max": Metric.max(0.0)}
    gap = (trainer_logprobs.double() - sampler_logprobs.double()).abs()[mask]
    return {"mean": Metric.mean(gap.mean().item()), "max": Metric.max(gap.max().item())}


def truncated_importance_weights(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """``min(exp(trainer - sampler), cap)`` per token, 0 where ``mask`` is not set (log-ratio clamped to ±20)."""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    log_ratio = (trainer_logprobs.float() - sampler_logprobs.float()).clamp(-20.0, 20.0)
    return torch.where(mask.bool(), log_ratio.exp().clamp(max=cap), torch.zeros_like(log_ratio))
