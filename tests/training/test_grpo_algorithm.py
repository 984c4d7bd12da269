"""The GRPO step on the algorithm side of the policy interface, in process and without Megatron: what it asks
the policy for and what it hands to ``policy.train`` (the Megatron side is tests/training/test_grpo_step.py)."""

import pytest
import torch

from nemo_viper.algorithms import ClippedPolicyLoss, LossNormalizer, PolicyLossConfig, group_advantages
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.rollout import SamplingParams
from nemo_viper.runtime.collectives import DataParallel
from nemo_viper.training.grpo import GRPOConfig, GRPOTrainer
from nemo_viper.training.rollout_batch import RolloutBatch

ROWS, COLUMNS = 6, 5


class RecordingPolicy:
    """A :class:`~nemo_viper.training.grpo.TrainablePolicy` whose log-probs are fixed tensors; ``train`` records
    its arguments and evaluates the loss function once on the whole batch (the global normaliser of its mask)."""

    data_parallel = DataParallel()

    def __init__(self, has_reference: bool):
        self.has_reference = has_reference
        self.old = -torch.rand(ROWS, COLUMNS, generator=torch.Generator().manual_seed(1))
        self.ref = self.old - 0.1
        self.calls = []

    def get_logprobs(self, batch, micro_batch_size, temperature):
        self.calls.append(("logprobs", batch.response_mask.clone(), temperature))
        return self.old * batch.response_mask

    def get_reference_logprobs(self, batch, micro_batch_size, temperature):
        self.calls.append(("reference", batch.response_mask.clone(), temperature))
        return self.ref * batch.response_mask

    def train(self, data, loss_fn, num_minibatches, micro_batch_size, temperature):
        self.trained = (data, num_minibatches, micro_batch_size, temperature)
        mask = data.sequences.response_mask
        logprobs = (self.old + 0.05) * mask  # an update has moved the policy: ratios != 1
        self.loss, self.loss_metrics = loss_fn(logprobs, data, LossNormalizer.from_masks([mask]))
        return {"train/updates": 1.0}


def rollout() -> RolloutBatch:
    """3 groups of 2: group 1's rewards are equal (dynamic sampling drops it); row 4 is truncated."""
    mask = torch.zeros(ROWS, COLUMNS, dtype=torch.bool)
    mask[:, 2:] = True
    mask[0, 4] = False
    return RolloutBatch(sequences=PolicyBatch(torch.arange(ROWS * COLUMNS).reshape(ROWS, COLUMNS), mask),
                        group_index=torch.tensor([0, 0, 1, 1, 2, 2]),
                        rewards=torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.8]), sample_ids=list("aabbcc"),
                        truncated=torch.tensor([False, False, False, False, True, False]),
                        sampler_logprobs=torch.zeros(ROWS, COLUMNS) - 1.0)


def test_the_step_asks_the_policy_for_log_probs_and_trains_with_masked_rows_and_tis_advantages():
    policy = RecordingPolicy(has_reference=True)
    loss = PolicyLossConfig(kl_beta=0.1)
    config = GRPOConfig(loss=loss, dynamic_sampling=True, overlong_filtering=True, importance_sampling_cap=1.5,
                        num_minibatches=2, micro_batch_size=3)
    batch = rollout()
    metrics = GRPOTrainer(policy, config, SamplingParams(temperature=0.7)).step(batch)

    expected_mask = batch.sequences.response_mask.clone()
    expected_mask[2:4] = False  # equal-reward group
    expected_mask[4] = False  # truncated
    assert [(name, torch.equal(mask, expected_mask), t) for name, mask, t in policy.calls] == [
        ("logprobs", True, 0.7), ("reference", True, 0.7)]
    data, num_minibatches, micro_batch_size, temperature = policy.trained
    assert (num_minibatches, micro_batch_size, temperature) == (2, 3, 0.7)
    assert torch.equal(data.sequences.response_mask, expected_mask)
    assert torch.equal(data.tensors["old_logprobs"], policy.old * expected_mask)
    assert torch.equal(data.tensors["ref_logprobs"], policy.ref * expected_mask)
    # TIS: per-token advantages A_i * min(exp(old - sampler), 1.5) on the kept tokens, 0 elsewhere
    weights = torch.where(expected_mask, (policy.old * expected_mask + 1.0).exp().clamp(max=1.5), 0.0)
    per_token = data.tensors["advantages"]
    assert torch.allclose(per_token, group_advantages(batch.rewards, batch.group_index)[:, None] * weights)
    # the loss function handed to train() is ClippedPolicyLoss with L = the sampler's max_new_tokens
    mask = expected_mask
    reference, _ = ClippedPolicyLoss(PolicyLossConfig(kl_beta=0.1, max_response_length=1024))(
        (policy.old + 0.05) * mask, policy.old * mask, per_token, mask, LossNormalizer.from_masks([mask]),
        policy.ref * mask)
    assert policy.loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert metrics["train/updates"] == 1.0 and metrics["dynamic_sampling/kept_fraction"] == pytest.approx(4 / 6)
    assert metrics["rollout/importance_weight_mean"] == pytest.approx(weights.sum().item() / mask.sum().item())


def test_a_kl_term_needs_a_policy_with_a_reference():
    with pytest.raises(ValueError, match="reference policy is needed exactly when loss.kl_beta > 0"):
        GRPOTrainer(RecordingPolicy(has_reference=False), GRPOConfig(loss=PolicyLossConfig(kl_beta=0.1)))
    with pytest.raises(ValueError, match="reference policy is needed exactly when loss.kl_beta > 0"):
        GRPOTrainer(RecordingPolicy(has_reference=True), GRPOConfig())
