"""Every numeric setting of the algorithms and the reward is used by the code that reads it.

``tests/test_config_keys.py`` shows that each key reaches a job's inputs; these tests show that the function
the key configures uses its value: each case runs the component at a *non-default* value on a hand-built
input and compares with the formula of its module docstring, computed here. A setting hard-coded to its
default inside the code fails its case. A new numeric field of these configs needs a case here, or the name of
an existing test that runs it at a non-default value (``ELSEWHERE``): ``test_every_numeric_setting_has_a_case``.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from nemo_viper.algorithms import AdvantageConfig, ClippedPolicyLoss, LossNormalizer, PolicyLossConfig, group_advantages
from nemo_viper.rewards import RewardConfig, ViperReward
from nemo_viper.training.grpo import GRPOConfig

sys.path.insert(0, str(Path(__file__).resolve().parent / "rewards"))
from test_semantic import AUTO, DOGS, RED, SKY, TableEmbedder, respond  # noqa: E402


def token_loss(config: PolicyLossConfig, ratios: list[float], advantage: float, ref_minus_logp: float = 0.0) -> float:
    """The loss of one response whose tokens have these ratios (old log-prob 0)."""
    logprobs = torch.log(torch.tensor([ratios], dtype=torch.float64))
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    loss, _ = ClippedPolicyLoss(config)(logprobs, torch.zeros_like(logprobs), torch.tensor([advantage]), mask,
                                        LossNormalizer.from_masks([mask]), ref_logprobs=logprobs + ref_minus_logp)
    return loss.item()


def reward_of(config: RewardConfig, *answer: str):
    [out] = ViperReward(config, embedder=TableEmbedder()).score([respond(*answer)], [[RED, DOGS]], ["s"])
    return out


L = len


def case_eps_low():  # ratio 0.5, A = -1: ℓ = -min(r·A, clip(r)·A) = 1 - eps_low
    return token_loss(PolicyLossConfig(eps_low=0.1), [0.5], -1.0), 0.9


def case_eps_high():  # ratio 1.5, A = +1: ℓ = -(1 + eps_high)
    return token_loss(PolicyLossConfig(eps_high=0.4), [1.5], 1.0), -1.4


def case_dual_clip_c():  # ratio 5, A = -1: the clipped term 5 is bounded by -A·c = c
    return token_loss(PolicyLossConfig(dual_clip_c=2.0), [5.0], -1.0), 2.0


def case_kl_beta():  # A = 0, ratio 1: ℓ = β·k3 with d = ref - logp = 0.5
    return token_loss(PolicyLossConfig(kl_beta=0.3), [1.0], 0.0, ref_minus_logp=0.5), 0.3 * (math.exp(0.5) - 1.5)


def case_max_response_length():  # seq-mean-token-sum-norm: Σ ℓ / (N_seq · L), two tokens of ℓ = -1
    config = PolicyLossConfig(aggregation="seq-mean-token-sum-norm", max_response_length=7)
    return token_loss(config, [1.0, 1.0], 1.0), -2 / 7


def case_advantage_eps():  # rewards 0, 1: mean 0.5, unbiased std sqrt(0.5); A = ±0.5 / (std + eps)
    advantages = group_advantages(torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), AdvantageConfig(eps=0.5))
    return advantages.tolist(), pytest.approx([-0.5 / (math.sqrt(0.5) + 0.5), 0.5 / (math.sqrt(0.5) + 0.5)])


def case_threshold():  # at τ = 0.75 SKY (cos 0.8 with DOGS) is a hit: every answer sentence hits, every item covered
    out = reward_of(RewardConfig(threshold=0.75), RED, AUTO, SKY)
    return (out.precision, out.recall), (1.0, 1.0)


def case_format_weight():  # R = w_f·R_format + w_c·R_correct, precision = (L(RED) + L(AUTO)) / ΣL
    precision = (L(RED) + L(AUTO)) / (L(RED) + L(AUTO) + L(SKY))
    return reward_of(RewardConfig(format_weight=0.3), RED, AUTO, SKY).total, 0.3 + 0.95 * precision


def case_correctness_weight():
    precision = (L(RED) + L(AUTO)) / (L(RED) + L(AUTO) + L(SKY))
    return reward_of(RewardConfig(correctness_weight=0.5), RED, AUTO, SKY).total, 0.05 + 0.5 * precision


def case_min_sentence_chars():  # 16 drops RED (15 characters) from the answer and the ground truth
    out = reward_of(RewardConfig(min_sentence_chars=16), RED, AUTO, SKY)
    return (out.num_answer_sentences, out.best_similarity), (2, pytest.approx([0.0, 0.8], abs=1e-6))


CASES = {
    (PolicyLossConfig, "eps_low"): case_eps_low,
    (PolicyLossConfig, "eps_high"): case_eps_high,
    (PolicyLossConfig, "dual_clip_c"): case_dual_clip_c,
    (PolicyLossConfig, "kl_beta"): case_kl_beta,
    (PolicyLossConfig, "max_response_length"): case_max_response_length,
    (AdvantageConfig, "eps"): case_advantage_eps,
    (RewardConfig, "threshold"): case_threshold,
    (RewardConfig, "format_weight"): case_format_weight,
    (RewardConfig, "correctness_weight"): case_correctness_weight,
    (RewardConfig, "min_sentence_chars"): case_min_sentence_chars,
}

# Settings run at a non-default value by a behavioural test elsewhere (module:function).
ELSEWHERE = {
    (RewardConfig, "min_coverage"): "rewards/test_guards.py:test_min_coverage_scales_by_recall",
    (RewardConfig, "alert_gap"): "rewards/test_guards.py:test_precision_recall_gap_is_counted_and_logged_once",
    (RewardConfig, "gt_cache_size"): "rewards/test_semantic.py:test_cache_is_bounded",
    (GRPOConfig, "importance_sampling_cap"):
        "training/test_grpo_algorithm.py:test_the_step_asks_the_policy_for_log_probs_and_trains_with_masked_rows_and_tis_advantages",
    (GRPOConfig, "num_minibatches"):
        "training/test_grpo_algorithm.py:test_the_step_asks_the_policy_for_log_probs_and_trains_with_masked_rows_and_tis_advantages",
    (GRPOConfig, "micro_batch_size"):
        "training/test_grpo_algorithm.py:test_the_step_asks_the_policy_for_log_probs_and_trains_with_masked_rows_and_tis_advantages",
}
# Numeric settings that change no value the component computes.
NO_EFFECT_ON_VALUES = {
    (RewardConfig, "batch_size"): "sentence-transformers' encode batch size",
}


@pytest.mark.parametrize("key", list(CASES), ids=[f"{cls.__name__}.{name}" for cls, name in CASES])
def test_setting_at_a_non_default_value(key):
    actual, expected = CASES[key]()
    assert actual == (pytest.approx(expected, abs=1e-9) if isinstance(expected, float) else expected)


def _numeric_fields(cls) -> set[tuple[type, str]]:
    numeric = ("int", "float", "int | None", "float | None")
    return {(cls, f.name) for f in fields(cls) if str(f.type) in numeric}


def test_every_numeric_setting_has_a_case():
    numeric = set().union(*(_numeric_fields(c) for c in (PolicyLossConfig, AdvantageConfig, RewardConfig, GRPOConfig)))
    covered = set(CASES) | set(ELSEWHERE) | set(NO_EFFECT_ON_VALUES)
    assert numeric - covered == set(), "numeric settings without a behavioural test at a non-default value"
    assert covered - numeric == set(), "cases for settings that are not numeric fields (renamed?)"
    tests_dir = Path(__file__).resolve().parent
    for where in ELSEWHERE.values():
        path, function = where.split(":")
        sys.path.insert(0, str(tests_dir / Path(path).parent))
        assert callable(getattr(importlib.import_module(Path(path).stem), function, None)), where
