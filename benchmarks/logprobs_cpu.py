"""Per-token log-probs: our Megatron path (``compute_logprobs``) against a direct transformers forward.

Both run in this process on the tiny Qwen2.5-VL checkpoint, fp32, TP=1, on the same RL-like batch
(prompts with one real photo each, several sampled answers per prompt, right-padded). The HF
reference is timed first, before the benchmark enters CPU mode for the policy (a TorchFunctionMode
that every torch call then passes through). Afterwards ours and the HF reference (now under that mode) are timed
in alternation, which separates the mode's cost from that of megatron-core's schedule.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/logprobs_cpu.py [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from bench_docs import DOCS, machine_line, reproduce_command, write_section

SECTION = "## Log-prob API vs transformers (CPU, tiny model)"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
RESPONSES_PER_PROMPT = 2
PROMPT = "Describe this image in detail."


def build_batch(hf_dir: Path, batch_size: int, answer_tokens: int):
    """Sequence i answers prompt i // 2 (photo ``PHOTOS[prompt % 4]``) with 3/4 to all of ``answer_tokens``
    tokens of the tokenizer's training corpus (plus ``<|im_end|>``), so rows have different lengths."""
    from PIL import Image
    from skimage import data

    from nemo_viper.models.processor import load_processor
    from nemo_viper.models.tiny import training_corpus

    processor = load_processor(hf_dir)
    processor.tokenizer.padding_side = "right"
    tokenizer = processor.tokenizer
    corpus_ids = tokenizer(" ".join(training_corpus()))["input_ids"]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt_text = processor.apply_chat_template(chat, add_generation_prompt=True)

    images, prompt_texts, full_texts = [], [], []
    for i in range(batch_size):
        photo = PHOTOS[(i // RESPONSES_PER_PROMPT) % len(PHOTOS)]
        images.append(Image.fromarray(getattr(data, photo)()))
        start = 97 * i  # a different stretch of the corpus for every answer
        length = answer_tokens - (13 * i) % (answer_tokens // 4 + 1)
        answer = tokenizer.decode(corpus_ids[start : start + length])
        prompt_texts.append(prompt_text)
        full_texts.append(prompt_text + answer + "<|im_end|>")

    prompts = processor(text=prompt_texts, images=images, padding=True, return_tensors="pt")
    prompt_lengths = prompts["attention_mask"].sum(1)
    inputs = processor(text=full_texts, images=images, padding=True, return_tensors="pt")
    positions = torch.arange(inputs["input_ids"].shape[1])
    response_mask = (positions[None] >= prompt_lengths[:, None]) & inputs["attention_mask"].bool()
    return dict(inputs), response_mask


def hf_logprobs(model, inputs: dict, response_mask: torch.Tensor) -> torch.Tensor:
    """The reference: one HF forward, then ``log_softmax(logits[:, :-1])`` gathered at the next tokens."""
    with torch.no_grad():
        logits = model(**inputs).logits
        logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
    return torch.cat([logprobs.new_zeros(logprobs.shape[0], 1), logprobs], 1) * response_mask


def timed(fns: list, warmup: int, repeats: int):
    """Run each of ``fns`` ``warmup`` times untimed, then ``repeats`` times, alternating between them so
    that a noisy machine slows all alike. Returns (last results, seconds per run) for each."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    results, seconds = [None] * len(fns), [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            seconds[i].append(time.perf_counter() - start)
    return list(zip(results, seconds))


def markdown_table(rows: list[tuple[str, list[float]]], reference: list[float]) -> str:
    lines = ["| path | median (ms) | min (ms) | median / HF median |", "|---|---:|---:|---:|"]
    for name, seconds in rows:
        ratio = statistics.median(seconds) / statistics.median(reference)
        lines.append(f"| {name} | {1e3 * statistics.median(seconds):.1f} | {1e3 * min(seconds):.1f} | {ratio:.2f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="sequences (2 answers per prompt)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=64, help="longest answer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--write-docs", action="store_true", help=f"replace the section in {DOCS.name}")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from transformers import Qwen2_5_VLForConditionalGeneration

    from nemo_viper.models.batch import PolicyBatch
    from nemo_viper.models.logprobs import compute_logprobs
    from nemo_viper.models.policy import PolicyConfig, build_policy
    from nemo_viper.models.tiny import write_tiny_checkpoint
    from nemo_viper.runtime import cpu_mode

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as cpu_mode_scope:
        hf_dir = write_tiny_checkpoint(Path(tmp) / "hf")
        inputs, response_mask = build_batch(hf_dir, args.batch_size, args.answer_tokens)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
        run_hf = partial(hf_logprobs, model, inputs, response_mask)
        [(reference, hf_seconds)] = timed([run_hf], args.warmup, args.repeats)

        cpu_mode_scope.enter_context(cpu_mode.unless_cuda())  # transformers was timed above without it
        policy = build_policy(PolicyConfig(hf_path=str(hf_dir), precision="fp32"))
        batch = PolicyBatch(inputs["input_ids"], response_mask, inputs["pixel_values"], inputs["image_grid_thw"],
                            images_per_row=torch.ones(len(response_mask), dtype=torch.long))  # one image a row
        run_ours = partial(compute_logprobs, policy, batch, micro_batch_size=args.micro_batch_size)
        (ours, our_seconds), (_, hf_mode_seconds) = timed([run_ours, run_hf], args.warmup, args.repeats)

    max_diff = (ours - reference).abs().max().item()
    table = markdown_table(
        [
            ("transformers forward + log_softmax + gather", hf_seconds),
            ("same, under CPU mode's TorchFunctionMode", hf_mode_seconds),
            ("`compute_logprobs` (megatron-core, TP=1)", our_seconds),
        ],
        hf_seconds,
    )
    batch_size, seq_length = inputs["input_ids"].shape
    answer_lengths = response_mask.sum(1)
    shape = (
        f"{batch_size} sequences x {seq_length} tokens (right-padded), {len(inputs['image_grid_thw'])} images "
        f"({inputs['pixel_values'].shape[0]} patches), answers of {int(answer_lengths.min())}-"
        f"{int(answer_lengths.max())} tokens; micro-batch size {args.micro_batch_size}"
    )
    print(table)
    print(f"\n{shape}; max |ours - HF| = {max_diff:.2e}")
    if max_diff > 1e-4:
        sys.exit(f"log-probs differ from the HF reference by {max_diff:.2e} > 1e-4")

    if args.write_docs:
        command = reproduce_command()
        write_section(
            SECTION,
            f"{SECTION}\n\n"
            f"{machine_line()}; tiny Qwen2.5-VL checkpoint (`write_tiny_checkpoint`), fp32.\n\n"
            f"Batch: {shape}. Medians and minima over {args.repeats} repeats after {args.warmup} warm-up runs.\n\n"
            f"{table}\n\n"
            f"Max |ours - HF| over the batch: {max_diff:.2e}.\n\n"
            "Both paths compute log pi(x_t | x_<t, image) of the answer tokens on the same inputs. The HF path is "
            "a direct `Qwen2_5_VLForConditionalGeneration` forward followed by `log_softmax` and `gather`. Ours, "
            "`compute_logprobs`, goes through megatron-core's pipeline schedule (`forward_backward_no_pipelining` "
            "at PP=1, in micro-batches) and its vocab-parallel cross entropy, which at TP=1 is a plain "
            "log-softmax. On a CPU machine the policy runs in CPU mode, a "
            "`TorchFunctionMode` that every torch call then passes through. The HF reference is therefore timed "
            "twice: before the policy is built (first row) and, in alternation with ours, under the mode (second "
            "row); the second row shows the mode's share of the gap, the third row against the second the cost "
            "of the Megatron path itself.\n\n"
            f"```\n{command}\n```\n"
        )
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
