"""Score a response to an image prompt with the Megatron policy: per-token log-probs of the response.

    torchrun --nproc-per-node 2 -m nemo_viper.models.score --ckpt CKPT --tp 2 \\
        --prompt "Describe this image." --response "A cat on a sofa." [--image PATH]

Without ``--image`` the prompt uses scikit-image's astronaut photo. Prints each response token with its
log-probability and the sequence total (rank 0).
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from nemo_viper.models.checkpoint import load_policy
from nemo_viper.models.batch import PolicyBatch
from nemo_viper.models.logprobs import compute_logprobs
from nemo_viper.models.processor import load_processor


def build_batch(processor, image: Image.Image, prompt: str, response: str) -> PolicyBatch:
    """One chat (user: image + prompt; assistant: response) with the response tokens masked in."""
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    prompt_text = processor.apply_chat_template(chat, add_generation_prompt=True)
    prompt_length = processor(text=[prompt_text], images=[image], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[prompt_text + response + "<|im_end|>"], images=[image], return_tensors="pt")
    response_mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    response_mask[:, prompt_length:] = True
    return PolicyBatch(inputs["input_ids"], response_mask, inputs["pixel_values"], inputs["image_grid_thw"],
                       images_per_row=torch.tensor([len(inputs["image_grid_thw"])]))  # one row, all its images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="policy checkpoint directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--response", required=True)
    parser.add_argument("--image", help="image file (default: scikit-image's astronaut)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args(argv)

    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        from skimage import data

        image = Image.fromarray(data.astronaut())
    policy = load_policy(args.ckpt, tensor_parallel=args.tp, pipeline_parallel=args.pp, precision="fp32")
    processor = load_processor(f"{args.ckpt}/hf")
    batch = build_batch(processor, image, args.prompt, args.response)
    logprobs = compute_logprobs(policy, batch)[0]
    if torch.distributed.get_rank() == 0:
        positions = batch.response_mask[0].nonzero().flatten()
        for position in positions:
            token = processor.tokenizer.decode(batch.input_ids[0, position])
            print(f"{token!r:>16} {logprobs[position]:9.4f}")
        print(f"total log-prob of the response: {logprobs[positions].sum():.4f} over {len(positions)} tokens")


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
