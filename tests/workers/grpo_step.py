"""Worker: one GRPO update on a fixed rollout batch; saves the gradients and the step metrics.

The batch: 2 prompts (scikit-image photos), 4 responses to the first and 3 others to the second, so that
micro-batches and data-parallel ranks hold different numbers of tokens and sequences (a per-micro-batch or
per-rank normalisation would change the gradient). With ``--dp 2`` each rank takes one prompt's group. With
``--minibatches 2`` the second update is off-policy (the first one moved the weights): its ratio is not 1
and the clip terms act; the single-rank batch is ordered so that its mini-batches are the union of the
ranks' mini-batches. ``--reference`` also saves the gradient of the documented loss computed by plain
autograd on a policy without DDP or Megatron's schedule (an independent check of the absolute gradient).
"""

import argparse
import json

import torch
from PIL import Image
from skimage import data

from nemo_viper.algorithms import (
    AdvantageConfig,
    ClippedPolicyLoss,
    LossNormalizer,
    PolicyLossConfig,
    group_advantages,
)
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import vocab_parallel_token_logprobs
from nemo_viper.models.policy import PolicyConfig, build_policy
from nemo_viper.models.processor import load_processor
from nemo_viper.training.grpo import GRPOConfig, OptimizerSettings, build_trainer
from nemo_viper.training.rollout_batch import RolloutBatch

RESPONSES = [
    [
        "<think>look</think><answer>The red car is on the left.</answer>",
        "<answer>A cat.</answer>",
        "<think>I compare both images carefully.</think><answer>Remove the cup.\nAdd a blue sign.</answer>",
        "The dog is brown",
    ],
    [
        "<think>The mug is white and the table is wooden, with a spoon beside it.</think><answer>A white mug of "
        "coffee stands on a wooden table.\nA spoon lies to its right.</answer>",
        "<answer>Coffee.</answer>",
        "<think>hm</think><answer>The cup is blue.</answer>",
    ],
]
REWARDS = [[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6]]


def rollout_batch(hf_dir: str, prompts: list[int], minibatches: int = 1, truncated: tuple = ()) -> RolloutBatch:
    """Rows of ``prompts``' groups; with several prompts, ordered mini-batch by mini-batch (each prompt's rows
    split as ``torch.tensor_split`` splits one rank's rows). ``truncated``: (prompt, response) pairs flagged."""
    processor = load_processor(hf_dir)
    processor.tokenizer.padding_side = "right"
    photos = [data.astronaut(), data.coffee()]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt_text = processor.apply_chat_template(chat, add_generation_prompt=True)
    chunks = [torch.tensor_split(torch.arange(len(RESPONSES[p])), minibatches) for p in prompts]
    order = [(p, int(i)) for m in range(minibatches) for p, chunk in zip(prompts, chunks) for i in chunk[m]]
    texts, images, prompt_lengths, groups, rewards, cut = [], [], [], [], [], []
    for p, i in order:
        image = Image.fromarray(photos[p])
        length = processor(text=[prompt_text], images=[image], return_tensors="pt")["input_ids"].shape[1]
        texts.append(prompt_text + RESPONSES[p][i] + "<|im_end|>")
        images.append(image)
        prompt_lengths.append(length)
        groups.append(p)
        rewards.append(REWARDS[p][i])
        cut.append((p, i) in truncated)
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    positions = torch.arange(inputs["input_ids"].shape[1])
    mask = (positions[None] >= torch.tensor(prompt_lengths)[:, None]) & inputs["attention_mask"].bool()
    return RolloutBatch(
        sequences=PolicyBatch(inputs["input_ids"], mask, inputs["pixel_values"], inputs["image_grid_thw"]),
        group_index=torch.tensor(groups),
        rewards=torch.tensor(rewards),
        sample_ids=[f"prompt{g}" for g in groups],
        truncated=torch.tensor(cut),
    )


def reference_gradients(hf_dir: str, config: GRPOConfig, batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """The gradient of the aggregated loss of ONE mini-batch (the whole ``batch``) by plain autograd: one forward
    of a policy built without DDP, :class:`ClippedPolicyLoss` with the batch's own counts, ``backward``."""
    policy = build_policy(PolicyConfig(hf_path=hf_dir, precision="fp32"))
    (model,) = policy.chunks
    inputs = batch.sequences.model_inputs(torch.device("cpu"), policy.provider.vision_start_token_id)
    logprobs = vocab_parallel_token_logprobs(model(**inputs), batch.sequences.input_ids, 1.0)
    mask = batch.sequences.response_mask
    advantages = group_advantages(batch.rewards, batch.group_index, config.advantage)
    loss, _ = ClippedPolicyLoss(config.loss)(logprobs, logprobs.detach(), advantages, mask,
                                            LossNormalizer.from_masks([mask]))
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True, help="prefix; writes PREFIX_mbs{N}.pt")
    parser.add_argument("--micro-batch-sizes", default="1,2,4")
    parser.add_argument("--aggregation", default="token-mean")
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--options", action="store_true",
                        help="every GRPO option on: Dr.GRPO (no std), dual clip 1.5, k3 KL (beta 0.5, frozen "
                        "reference), overlong filtering (one response flagged truncated)")
    parser.add_argument("--reference", action="store_true", help="also save the plain-autograd gradient")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--fp8-recipe", default="blockwise")
    parser.add_argument("--metrics-only", action="store_true", help="save no gradients (large models)")
    args = parser.parse_args()

    import torch.distributed as dist

    options = {}
    truncated = ()
    if args.options:
        options = {"advantage": AdvantageConfig(normalize_by_std=False), "overlong_filtering": True}
        truncated = ((1, 0),)
    for mbs in [int(x) for x in args.micro_batch_sizes.split(",")]:
        loss = PolicyLossConfig(aggregation=args.aggregation, max_response_length=32,
                                **({"dual_clip_c": 1.5, "kl_beta": 0.5} if args.options else {}))
        config = GRPOConfig(
            loss=loss,
            optimizer=OptimizerSettings(lr=1e-3, clip_grad=0.0, distributed_optimizer=False),
            num_minibatches=args.minibatches,
            micro_batch_size=mbs,
            **options,
        )
        policy_config = PolicyConfig(hf_path=args.hf, precision=args.precision, fp8_recipe=args.fp8_recipe)
        trainer = build_trainer(policy_config, config)
        world, rank = dist.get_world_size(), dist.get_rank()
        prompts = [0, 1] if world == 1 else [rank]
        batch = rollout_batch(args.hf, prompts, args.minibatches, truncated)
        metrics = trainer.step(batch)
        (model,) = trainer.policy.chunks
        grads = {} if args.metrics_only else {name.removeprefix("module."): p.main_grad.detach().clone()
                                              for name, p in model.named_parameters() if p.requires_grad}
        result = {"grads": grads, "metrics": metrics, "reference_loaded": trainer.reference is not None}
        if args.reference:
            result["reference_grads"] = reference_gradients(args.hf, config, batch)
        if rank == 0:
            torch.save(result, f"{args.out}_mbs{mbs}.pt")
            print(json.dumps(metrics))


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
