"""Worker (2 ranks, data-parallel 2): one vLLM engine per rank, and a dynamic-sampling step in which one rank
draws a second round and the other skips it.

Rank 0's first-round rewards are all equal (no group with a spread), rank 1's are not: the loop's
``collect_groups`` lets rank 0 refill and rank 1 skip ``generate``. With independent engines this returns;
with engines in lockstep it would hang, so the step runs under a watchdog that kills the process (exit
status 1, every thread's stack on stderr) after ``--step-timeout`` seconds. Each rank saves how often it
generated and how many groups it kept to ``--out``/rank<r>.pt.
"""

import argparse
import faulthandler
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_viper.models.policy import PolicyConfig, build_policy
from nemo_viper.models.processor import load_processor
from nemo_viper.rewards import RewardBreakdown
from nemo_viper.data.task_prompt import TaskPrompt
from nemo_viper.rollout import SamplingParams
from nemo_viper.training.grpo import GRPOConfig
from nemo_viper.training.loop import RLConfig, collect_groups


class Prompts:
    """Text prompts, numbered on."""

    def __init__(self):
        self.drawn = 0

    def next_prompts(self, count):
        self.drawn += count
        return [TaskPrompt(f"p{i}", [{"role": "user", "content": f"Describe scene number {i}."}], [], ["a scene"])
                for i in range(self.drawn - count, self.drawn)]


class ScriptedReward:
    """Rewards 0, 1, 0, 1, ... (a spread in every group), except a first round of zeros on ``flat_rank``."""

    def __init__(self, flat_first_round: bool):
        self.flat = flat_first_round

    def score(self, responses, ground_truths, sample_ids, truncated=None):
        totals = [0.0] * len(responses) if self.flat else [float(i % 2) for i in range(len(responses))]
        self.flat = False
        return [RewardBreakdown(t, 1.0, t, 0.0, 0.0, 1) for t in totals]


class CountingBackend:
    def __init__(self, backend):
        self.backend, self.calls = backend, 0

    def generate(self, requests):
        self.calls += 1
        return self.backend.generate(requests)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--step-timeout", type=float, required=True)
    args = parser.parse_args()

    from megatron.core import parallel_state

    from nemo_viper.rollout.vllm_backend import VLLMGenerationBackend, VLLMGenerationConfig

    policy = build_policy(PolicyConfig(hf_path=args.hf, precision="fp32"))
    rank, world = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    assert world == 2, world
    generator = CountingBackend(VLLMGenerationBackend(policy, VLLMGenerationConfig(max_model_len=512), seed=1))
    config = RLConfig(prompts_per_step=2 * world, n=2, max_sampling_tries=3,
                      sampling=SamplingParams(max_new_tokens=4, seed=0), grpo=GRPOConfig(dynamic_sampling=True))

    def min_over_ranks(count: int) -> int:
        value = torch.tensor([count])
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=parallel_state.get_data_parallel_group())
        return int(value)

    faulthandler.dump_traceback_later(args.step_timeout, exit=True)
    groups, _ = collect_groups(Prompts(), generator, ScriptedReward(flat_first_round=rank == 0),
                               load_processor(args.hf), config, 1, rank, world, min_over_ranks)
    faulthandler.cancel_dump_traceback_later()
    torch.save({"generate_calls": generator.calls, "groups": len(groups)}, Path(args.out) / f"rank{rank}.pt")


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
