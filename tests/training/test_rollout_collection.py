"""The loop's rollout side on CPU without Megatron: rows and masks of a rollout batch, and dynamic-sampling
refill (bounded, logged, the same decision on every data-parallel rank)."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from nemo_viper.rewards import RewardBreakdown
from nemo_viper.rollout import GenerationRequest, SamplingParams
from nemo_viper.rollout.interface import GenerationResponse
from nemo_viper.training.grpo import GRPOConfig
from nemo_viper.data.task_prompt import TaskPrompt
from nemo_viper.training.loop import RLConfig, assemble_rollout, collect_groups

PAD = 0


def breakdown(total: float) -> RewardBreakdown:
    return RewardBreakdown(total=total, format=1.0, correctness=total, precision=total, recall=total,
                           num_answer_sentences=1)


def test_rollout_rows_and_response_mask_cover_exactly_the_response_tokens():
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    answers = [[[21], [22, 23, 24]], [[25, 26], [27]], [[28, 29, 30, 31, 32], [33, 34]]]
    requests = [GenerationRequest(p, n=2) for p in prompts]
    responses = [[GenerationResponse(a, "t", [-t / 100 for t in a], "eos") for a in group] for group in answers]
    rewards = [breakdown(float(i)) for i in range(6)]
    batch = assemble_rollout(requests, responses, rewards, ["a", "b", "c"], PAD)

    ids, mask = batch.sequences.input_ids, batch.sequences.response_mask
    # the sampler's log-prob of each response token sits at that token (here: -token / 100), 0 elsewhere
    assert torch.equal(batch.sampler_logprobs, torch.where(mask, -ids.float() / 100, 0.0))
    assert ids.shape == (6, 9)  # longest row: 4 prompt + 5 response tokens
    row = 0
    for prompt, group in zip(prompts, answers):
        for answer in group:
            expected_ids = prompt + answer + [PAD] * (9 - len(prompt) - len(answer))
            expected_mask = [False] * len(prompt) + [True] * len(answer) + [False] * (9 - len(prompt) - len(answer))
            assert ids[row].tolist() == expected_ids
            assert mask[row].tolist() == expected_mask, f"row {row}"
            row += 1
    assert batch.group_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.rewards.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert batch.response_lengths.tolist() == [1, 3, 2, 1, 5, 2]


class Prompts:
    """Prompt ``k`` is ``p{k}``; ``equal(k)`` says whether its group's rewards are all equal."""

    def __init__(self, start: int = 0):
        self.position = start
        self.drawn = []

    def next_prompts(self, count):
        prompts = [TaskPrompt(f"p{self.position + i}", [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
                   for i in range(count)]
        self.position += count
        self.drawn.append(count)
        return prompts


class Generator:
    def __init__(self):
        self.seeds = []

    def generate(self, requests):
        self.seeds += [r.sampling.seed for r in requests]
        return [[GenerationResponse([40 + j], "t", [0.0], "eos") for j in range(r.n)] for r in requests]


class Reward:
    def __init__(self, equal):
        self.equal = equal

    def score(self, responses, ground_truths, sample_ids, truncated=None):
        index = {}
        totals = []
        for sid in sample_ids:
            j = index[sid] = index.get(sid, -1) + 1
            totals.append(0.5 if self.equal(int(sid[1:])) else float(j))
        return [breakdown(t) for t in totals]


class Processor:
    """Just enough of the Qwen2.5-VL processor for text-only prompts."""

    image_token = "<|image_pad|>"

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "prompt"

    def tokenizer(self, text):
        return {"input_ids": [1, 2, 3]}


def config(dynamic: bool, prompts_per_step=4, tries=3) -> RLConfig:
    return RLConfig(steps=1, prompts_per_step=prompts_per_step, n=2, max_sampling_tries=tries,
                    sampling=SamplingParams(max_new_tokens=4, seed=7), grpo=GRPOConfig(dynamic_sampling=dynamic))


def collect(cfg, equal, prompts=None, generator=None, dp_rank=0, dp_world=1, min_over_ranks=None):
    return collect_groups(prompts or Prompts(), generator or Generator(), Reward(equal), Processor(), cfg, step=1,
                          dp_rank=dp_rank, dp_world=dp_world, min_over_ranks=min_over_ranks)


def test_without_dynamic_sampling_one_round_of_the_ranks_share():
    prompts = Prompts()
    groups, metrics = collect(config(False, prompts_per_step=8), lambda k: True, prompts, dp_rank=1, dp_world=2)
    assert prompts.drawn == [4] and len(groups) == 4 and "dynamic_sampling/tries" not in metrics


def test_dynamic_sampling_refills_with_new_prompts_and_new_seeds():
    prompts, generator = Prompts(), Generator()
    groups, metrics = collect(config(True), lambda k: k % 2 == 0, prompts, generator)  # odd prompts have a spread
    assert prompts.drawn == [4, 4]  # 2 spread groups per round: a second round fills the batch
    assert [g.prompt.sample_id for g in groups] == ["p1", "p3", "p5", "p7"]
    assert all(g.has_spread for g in groups)
    assert len(set(generator.seeds)) == 8, "every refill request has its own seed"
    assert metrics["dynamic_sampling/tries"].value == 2 and metrics["dynamic_sampling/filler_groups"].value == 0


def test_dynamic_sampling_stops_after_its_tries_and_fills_with_masked_groups(caplog):
    prompts = Prompts()
    with caplog.at_level(logging.WARNING):
        groups, metrics = collect(config(True, tries=3), lambda k: k != 2, prompts)  # only p2 has a spread
    assert prompts.drawn == [4, 4, 4]
    assert [g.prompt.sample_id for g in groups] == ["p2", "p0", "p1", "p3"]  # spread first, then filler
    assert metrics["dynamic_sampling/spread_groups"].value == 1 and metrics["dynamic_sampling/filler_groups"].value == 3
    # over the data-parallel ranks: the rounds are decided together, the group counts add up, the times average
    assert {k: m.reduce.value for k, m in metrics.items()} == {
        "dynamic_sampling/tries": "replicated", "dynamic_sampling/spread_groups": "sum",
        "dynamic_sampling/filler_groups": "sum", "time/rollout": "mean", "time/reward": "mean"}
    assert "found 1 of 4 groups with a reward spread after 3 rounds" in caplog.text


def test_dynamic_sampling_ranks_decide_together():
    """Rank 0's prompts all have a spread, rank 1's none: both run the same rounds (no rank waits alone in a
    collective), rank 0 draws nothing after its first round, and both return a full batch."""
    barrier, counts, results = threading.Barrier(2), {}, {}

    def min_over_ranks(rank):
        def reduce(count):
            counts[rank] = count
            barrier.wait()
            value = min(counts.values())
            barrier.wait()
            return value
        return reduce

    def rank_main(rank, equal):
        prompts = Prompts(start=1000 * rank)
        groups, metrics = collect(config(True, prompts_per_step=4, tries=3), equal, prompts, dp_rank=rank, dp_world=2,
                                  min_over_ranks=min_over_ranks(rank))
        results[rank] = (prompts.drawn, len(groups), metrics["dynamic_sampling/tries"].value)

    threads = [threading.Thread(target=rank_main, args=(0, lambda k: False)),
               threading.Thread(target=rank_main, args=(1, lambda k: True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results[0] == ([2], 2, 3) and results[1] == ([2, 2, 2], 2, 3)


@pytest.mark.parametrize("rewards,expected", [([0.5, 0.5], False), ([0.5, 0.50001], True)])
def test_spread_is_exact(rewards, expected):
    from nemo_viper.training.loop import _Group

    group = _Group(TaskPrompt("p", []), GenerationRequest([1], n=2), [], [breakdown(r) for r in rewards])
    assert group.has_spread is expected
    assert torch.tensor(rewards).unique().numel() == (2 if expected else 1)
