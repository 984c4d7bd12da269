"""The held-out split: deterministic, independent of order, count/fraction, never everything."""

import pytest

from nemo_viper.errors import ConfigError
from nemo_viper.evaluation.heldout import HeldoutConfig, heldout_indices, mean_breakdown
from nemo_viper.rewards import RewardBreakdown


def test_split_depends_on_ids_only():
    ids = [f"sample-{i}" for i in range(50)]
    chosen = {ids[i] for i in heldout_indices(ids, HeldoutConfig(count=5))}
    shuffled = ids[::-1]
    assert {shuffled[i] for i in heldout_indices(shuffled, HeldoutConfig(count=5))} == chosen
    assert len(chosen) == 5
    assert {ids[i] for i in heldout_indices(ids, HeldoutConfig(count=5, seed=1))} != chosen
    assert len(heldout_indices(ids, HeldoutConfig(fraction=0.1))) == 5


def test_split_leaves_data_to_train_on_and_can_be_off():
    assert heldout_indices(["a", "b", "c"], HeldoutConfig(count=10)) != [0, 1, 2]
    assert len(heldout_indices(["a", "b", "c"], HeldoutConfig(count=10))) == 2
    assert heldout_indices(["a", "b"], HeldoutConfig()) == [] and not HeldoutConfig().enabled
    with pytest.raises(ConfigError, match="fraction=1.0"):
        HeldoutConfig(fraction=1.0)


def test_mean_breakdown():
    rewards = [RewardBreakdown(total=1.0, format=1.0, correctness=1.0, precision=1.0, recall=0.5, num_answer_sentences=1),
               RewardBreakdown(total=0.0, format=0.0, correctness=0.0, precision=0.0, recall=0.0, num_answer_sentences=0)]
    assert mean_breakdown(rewards) == {"total": 0.5, "format": 0.5, "correctness": 0.5, "recall": 0.25}


def test_score_prompts_keeps_each_prompts_greedy_answer_for_the_report():
    from nemo_viper.data.task_prompt import TaskPrompt
    from nemo_viper.evaluation.heldout import answer_examples, score_prompts
    from nemo_viper.rollout import SamplingParams
    from nemo_viper.rollout.interface import GenerationResponse

    class Generator:  # greedy requests get "g<i>", sampled ones "s<i>.<k>"
        def generate(self, requests):
            return [[GenerationResponse([1], f"{'g' if r.sampling.greedy else 's'}{i}.{k}", [0.0], "stop")
                     for k in range(r.n)] for i, r in enumerate(requests)]

    class Reward:
        def score(self, texts, truths, ids, truncated):
            return [RewardBreakdown(total=len(t) / 10, format=float(t.startswith("g")), correctness=0.5,
                                    precision=0.5, recall=0.5, num_answer_sentences=1) for t in texts]

    class Processor:
        pass

    prompts = [TaskPrompt(sample_id=f"p{i}", messages=[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f"Q{i}"}]}], ground_truth=[f"t{i}"]) for i in range(3)]
    from unittest import mock

    with mock.patch("nemo_viper.rollout.interface.GenerationRequest.from_chat",
                    side_effect=lambda proc, messages, images, n, sampling: mock.Mock(n=n, sampling=sampling)):
        scores = score_prompts(Generator(), Reward(), Processor(), prompts, SamplingParams(seed=0), 2, seed=0)
    assert scores["greedy_answers"] == ["g0.0", "g1.0", "g2.0"] and len(scores["sampled"]) == 6
    assert answer_examples(prompts, scores, 2) == [
        {"sample_id": "p0", "prompt": "<image>\nQ0", "ground_truth": ["t0"], "answer": "g0.0", "reward": 0.4,
         "format": 1.0, "correctness": 0.5},
        {"sample_id": "p1", "prompt": "<image>\nQ1", "ground_truth": ["t1"], "answer": "g1.0", "reward": 0.4,
         "format": 1.0, "correctness": 0.5}]
