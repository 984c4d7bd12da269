"""Worker: RL steps with vLLM rollouts on a policy split into ``--pipeline`` stages (run at 1 and 2 to compare).

Every rank (all stages of the one data-parallel replica) holds a vLLM engine refitted from the policy. Saved to
``--out`` by global rank 0 (``--out-all`` adds every rank's own copy, to check that all stages saw the same):

- ``greedy``: greedy responses of the first refit; ``greedy_refit``: after ``weights_updated()`` with unchanged
  weights (a second refit streams the same weights);
- ``steps``: per RL step, the sampled rollouts and the trainer's metrics (GRPO on a fixed reward rule, two
  mini-batches of three micro-batches each: the 1F1B schedule has several micro-batches in flight);
- ``greedy_after``: greedy responses after the last update (refitted), and ``gap_after``: the mean / max gap
  between the engine's log-probs and ``compute_logprobs`` of the updated policy on fresh samples;
- ``weights``: the updated policy in HF names (the export, gathered from both stages).
"""

import argparse
from dataclasses import replace

import torch
import torch.distributed as dist

from nemo_viper.algorithms import PolicyLossConfig
from nemo_viper.models.logprobs import compute_logprobs
from nemo_viper.models.policy import PolicyConfig
from nemo_viper.rewards import RewardBreakdown
from nemo_viper.rollout import SamplingParams
from nemo_viper.models.config import OptimizerSettings
from nemo_viper.training.grpo import GRPOConfig
from nemo_viper.training.stage import build_trainer
from nemo_viper.training.loop import assemble_rollout

STEPS = 2


def tokens_of(responses):
    return [[sample.token_ids for sample in samples] for samples in responses]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--pipeline", type=int, required=True)
    args = parser.parse_args()

    config = GRPOConfig(
        loss=PolicyLossConfig(eps_low=0.99, eps_high=10.0),  # clip range wide: clearly visible updates
        optimizer=OptimizerSettings(lr=3e-3, clip_grad=1e9),
        num_minibatches=2,
        micro_batch_size=2,
    )
    trainer = build_trainer(PolicyConfig(hf_path=args.hf, precision="fp32", pipeline_parallel=args.pipeline), config)
    policy = trainer.policy.model
    from nemo_viper.rollout.vllm_backend import VLLMGenerationBackend, VLLMGenerationConfig

    requests = torch.load(args.inputs, weights_only=False)["requests"]
    vllm = VLLMGenerationBackend(policy, VLLMGenerationConfig(max_model_len=1024), seed=3)
    pad = trainer.policy.pad_token_id
    greedy = [replace(r, sampling=SamplingParams(greedy=True, max_new_tokens=24)) for r in requests]
    result = {"greedy": tokens_of(vllm.generate(greedy)), "steps": []}
    vllm.weights_updated()
    result["greedy_refit"] = tokens_of(vllm.generate(greedy))

    for step in range(STEPS):
        sampled = [replace(r, n=4, sampling=SamplingParams(max_new_tokens=12, seed=100 * step + i))
                   for i, r in enumerate(requests)]
        responses = vllm.generate(sampled)
        rewards = [RewardBreakdown(float(j % 2), 1.0, float(j % 2), 0.0, 0.0, 1)  # a spread in every group
                   for samples in responses for j, _ in enumerate(samples)]
        rollout = assemble_rollout(sampled, responses, rewards, [str(i) for i in range(len(sampled))], pad)
        metrics = trainer.step(rollout)
        vllm.weights_updated()
        result["steps"].append({"tokens": tokens_of(responses), "metrics": metrics})

    result["greedy_after"] = tokens_of(vllm.generate(greedy))
    fresh = [replace(r, n=2, sampling=SamplingParams(max_new_tokens=12, seed=7 + i)) for i, r in enumerate(requests)]
    responses = vllm.generate(fresh)
    rewards = [RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, 0) for samples in responses for _ in samples]
    rollout = assemble_rollout(fresh, responses, rewards, [str(i) for i in range(len(fresh))], pad)
    gap = (compute_logprobs(policy, rollout.sequences, pad_token_id=pad) - rollout.sampler_logprobs).abs()
    gap = gap[rollout.sequences.response_mask]
    result["gap_after"] = {"mean": gap.mean().item(), "max": gap.max().item()}
    weights = {name: tensor.clone() for name, tensor in
               policy.bridge.export_hf_weights(policy.chunks, cpu=True, show_progress=False)}
    rank = dist.get_rank()
    torch.save(result, f"{args.out}.rank{rank}")
    if rank == 0:
        torch.save({**result, "weights": weights}, args.out)


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
