"""Worker: one GRPO update on a fixed rollout batch; saves the gradients and the step metrics.

The batch: 2 prompts (scikit-image photos) x 4 responses. With ``--dp 2`` each data-parallel rank takes
one prompt's group; gradients after the step are the global ones on every rank.
"""

import argparse
import json

import torch
from PIL import Image
from skimage import data

from nemo_viper.algorithms import PolicyLossConfig
from nemo_viper.models.logprobs import PolicyBatch
from nemo_viper.models.policy import PolicyConfig
from nemo_viper.models.processor import load_processor
from nemo_viper.training.grpo import GRPOConfig, OptimizerSettings, build_trainer
from nemo_viper.training.rollout_batch import RolloutBatch

RESPONSES = [
    "<think>look</think><answer>The red car is on the left.</answer>",
    "<answer>A cat.</answer>",
    "<think>I compare both images carefully.</think><answer>Remove the cup.\nAdd a blue sign.</answer>",
    "The dog is brown",
]
REWARDS = [[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.6, 0.4]]


def rollout_batch(hf_dir: str, prompts: list[int]) -> RolloutBatch:
    processor = load_processor(hf_dir)
    processor.tokenizer.padding_side = "right"
    photos = [data.astronaut(), data.coffee()]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt_text = processor.apply_chat_template(chat, add_generation_prompt=True)
    texts, images, prompt_lengths, groups, rewards = [], [], [], [], []
    for p in prompts:
        image = Image.fromarray(photos[p])
        length = processor(text=[prompt_text], images=[image], return_tensors="pt")["input_ids"].shape[1]
        for i, response in enumerate(RESPONSES):
            texts.append(prompt_text + response + "<|im_end|>")
            images.append(image)
            prompt_lengths.append(length)
            groups.append(p)
            rewards.append(REWARDS[p][i])
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    positions = torch.arange(inputs["input_ids"].shape[1])
    mask = (positions[None] >= torch.tensor(prompt_lengths)[:, None]) & inputs["attention_mask"].bool()
    return RolloutBatch(
        sequences=PolicyBatch(inputs["input_ids"], mask, inputs["pixel_values"], inputs["image_grid_thw"]),
        group_index=torch.tensor(groups),
        rewards=torch.tensor(rewards),
        sample_ids=[f"prompt{g}" for g in groups],
        truncated=torch.zeros(len(groups), dtype=torch.bool),
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True, help="prefix; writes PREFIX_mbs{N}.pt")
    parser.add_argument("--micro-batch-sizes", default="1,2,4")
    parser.add_argument("--aggregation", default="token-mean")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--fp8-recipe", default="blockwise")
    parser.add_argument("--metrics-only", action="store_true", help="save no gradients (large models)")
    args = parser.parse_args()

    import torch.distributed as dist

    for mbs in [int(x) for x in args.micro_batch_sizes.split(",")]:
        config = GRPOConfig(
            loss=PolicyLossConfig(aggregation=args.aggregation, max_response_length=32),
            optimizer=OptimizerSettings(lr=1e-3, clip_grad=0.0, distributed_optimizer=False),
            num_minibatches=1,
            micro_batch_size=mbs,
        )
        policy_config = PolicyConfig(hf_path=args.hf, precision=args.precision, fp8_recipe=args.fp8_recipe)
        trainer = build_trainer(policy_config, config)
        world, rank = dist.get_world_size(), dist.get_rank()
        prompts = [0, 1] if world == 1 else [rank]
        batch = rollout_batch(args.hf, prompts)
        # Make the update off-policy so the clipped branch and the ratio matter.
        metrics = trainer.step(batch)
        (model,) = trainer.policy.chunks
        grads = {} if args.metrics_only else {
            name: p.main_grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            torch.save({"grads": grads, "metrics": metrics}, f"{args.out}_mbs{mbs}.pt")
            print(json.dumps(metrics))


if __name__ == "__main__":
    main()
