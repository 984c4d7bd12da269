"""Steps of the full-size architecture checks (``scripts/gpu_check.sh``), one per process so the
transformers reference and the Megatron policy are never resident together.

- ``write --size S --out DIR [--vision-depth N] [--reference FILE]``: the random-weight published-architecture
  checkpoint (2 LM layers; the published 32 vision blocks unless ``--vision-depth``); with ``--reference``
  the ``reference`` step on it follows in the same process (one import of torch and transformers, not two).
- ``reference --hf DIR --out FILE``: transformers (fp32) on a right-padded two-prompt batch (one with an
  image): logits, response log-probs, and greedy ``generate`` continuations; also the batch and the
  generation requests for the Megatron step.
- ``megatron --hf DIR --inputs FILE --out FILE --tp N [--export DIR]``: the Megatron policy (fp32 unless
  ``--precision``; ``--layer-spec``, ``--fp8-recipe``) on the same batch: logits (vocab gathered),
  ``compute_logprobs``, greedy generation; ``--export`` writes the policy back as an HF checkpoint (the
  import/export round trip). ``scripts/gpu_check.sh`` runs these steps on a GPU too.
"""

import argparse

import torch

GREEDY_TOKENS = 8


def chats():
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((84, 56))  # 6 x 4 patches: 6 image tokens
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}]
    second = [{"role": "user", "content": "Remove the red car on the left."}]
    return [(first, [image]), (second, [])]


def reference(hf: str, out: str) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from nemo_viper.models.batch import count_images
    from nemo_viper.models.processor import load_processor
    from nemo_viper.models.tokens import VISION_SPECIAL_TOKENS
    from nemo_viper.rollout import GenerationRequest

    processor = load_processor(hf)
    prompts = chats()
    texts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat, _ in prompts]
    images = [image for _, chat_images in prompts for image in chat_images]
    answers = ["<think>I look.</think><answer>The red car is on the left.</answer>", "Remove the cup."]
    processor.tokenizer.padding_side = "right"
    prompt_lengths = processor(text=texts, images=images, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    inputs = processor(text=[t + a + "<|im_end|>" for t, a in zip(texts, answers)], images=images, padding=True,
                       return_tensors="pt")
    positions = torch.arange(inputs["input_ids"].shape[1])
    response_mask = (positions[None] >= prompt_lengths[:, None]) & inputs["attention_mask"].bool()

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    logprobs = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    logprobs = torch.cat([torch.zeros(len(texts), 1, dtype=logprobs.dtype), logprobs], 1) * response_mask

    processor.tokenizer.padding_side = "left"
    prompt_batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    suppress = processor.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
    with torch.no_grad():
        output = model.generate(**prompt_batch, do_sample=False, max_new_tokens=GREEDY_TOKENS, suppress_tokens=suppress)
    eos = set(model.generation_config.eos_token_id)
    greedy = []
    for row in output[:, prompt_batch["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        greedy.append(row[:end])
    requests = [GenerationRequest.from_chat(processor, chat, chat_images) for chat, chat_images in prompts]
    batch = {k: inputs[k] for k in ("input_ids", "pixel_values", "image_grid_thw")}
    batch["images_per_row"] = count_images(inputs["input_ids"], processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    torch.save({"batch": {**batch, "response_mask": response_mask}, "requests": requests, "logits": logits,
                "logprobs": logprobs.float(), "valid": inputs["attention_mask"].bool(), "greedy": greedy}, out)


def megatron(hf: str, inputs: str, out: str, tp: int, export: str | None, **options) -> None:
    from dataclasses import replace

    from nemo_viper.models.batch import PolicyBatch
    from nemo_viper.models.logprobs import compute_logprobs, run_forward
    from nemo_viper.models.policy import PolicyConfig, build_policy
    from nemo_viper.rollout import SamplingParams

    policy = build_policy(PolicyConfig(hf_path=hf, tensor_parallel=tp, **options))
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend

    saved = torch.load(inputs, weights_only=False)
    batch = PolicyBatch(**saved["batch"])
    logits = run_forward(policy, batch, lambda output, mb: gather_from_tensor_model_parallel_region(output),
                         micro_batch_size=2)
    logprobs = compute_logprobs(policy, batch, micro_batch_size=2)
    greedy = [replace(r, sampling=SamplingParams(greedy=True, max_new_tokens=GREEDY_TOKENS)) for r in saved["requests"]]
    tokens = [samples[0].token_ids for samples in MegatronGenerationBackend(policy).generate(greedy)]
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save({"logits": logits.cpu(), "logprobs": logprobs, "greedy": tokens, "layer_spec": policy.layer_spec},
                   out)
    del logits
    if export:
        from nemo_viper.models.checkpoint import export_hf

        export_hf(policy, export, max_shard_bytes=2**30)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("step", choices=("write", "reference", "megatron"))
    parser.add_argument("--size")
    parser.add_argument("--hf")
    parser.add_argument("--inputs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--export")
    parser.add_argument("--layers", type=int, default=2, help="language-model layers of the written checkpoint")
    parser.add_argument("--vision-depth", type=int, help="vision blocks of the written checkpoint (default: 32)")
    parser.add_argument("--reference", help="write: the reference step's --out, run next in this process")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--fp8-recipe", default="blockwise")
    parser.add_argument("--layer-spec", default="auto")
    args = parser.parse_args()
    if args.step == "write":
        from nemo_viper.models.published import write_random_checkpoint

        write_random_checkpoint(args.out, args.size, num_layers=args.layers, vision_depth=args.vision_depth)
        if args.reference:
            reference(args.out, args.reference)
    elif args.step == "reference":
        reference(args.hf, args.out)
    else:
        megatron(args.hf, args.inputs, args.out, args.tp, args.export, precision=args.precision,
                 fp8_recipe=args.fp8_recipe, layer_spec=args.layer_spec)


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
