"""A full-size RL stage-2 step and Megatron generation on one GPU (``scripts/gpu_check.sh``), or small on the
CPU (``--dry-run``, run by the test suite so that the check cannot rot). One process, one policy:

- **the policy**: the architecture of ``--model`` (its ``config.json``; ``gpu_check`` writes the published
  Qwen2.5-VL-3B one, :func:`~nemo_viper.models.published.write_random_checkpoint` without weights), random
  weights initialised by Megatron on the device, local spec, TP 1, the recipe's precision and recompute
  settings (``--recipe``, default ``qwen25vl_3b``);
- **the batch**: the recipe's stage-2 shapes (:func:`~nemo_viper.planning.recipe.training_shapes`): ``--prompts``
  prompts of ``rl.n`` responses of ``rl.sampling.max_new_tokens`` tokens, each prompt the stage's text budget and
  two images of ``rl.max_pixels`` (random pixels, the patch grid Qwen's resize gives a square photo), stored once
  per prompt as the RL loop stores them;
- **the step**: :meth:`~nemo_viper.training.grpo.GRPOTrainer.step`, the function the RL loop calls (old
  log-probs, then one optimizer update over the batch in micro-batches of ``rl.grpo.micro_batch_size``),
  ``--warmup`` untimed steps then ``--steps`` timed ones: the median step time; ``max_memory_reserved`` against
  the memory plan's figure for this step (:func:`~nemo_viper.planning.memory.training_phase` at TP 1, PP 1,
  DP 1, no reward model in this process, less the CUDA context, which the allocator does not see); MFU:
  the step's model FLOPs (:mod:`nemo_viper.planning.flops`: the old-log-prob forward plus 3x forward for the
  update; ``6·N`` per token plus the causal attention term) over its time and the GPU's dense bf16 peak.
  One GPU holds the whole optimizer state, which the recipe shards over 8 data-parallel ranks: where the
  plan says the recipe's step does not fit the GPU, the check applies the plan's own cheapest changes
  (:func:`~nemo_viper.planning.memory.training_changes`: micro-batch size, then recomputation) until it does,
  and names them;
- **generation**: :class:`~nemo_viper.rollout.megatron_backend.MegatronGenerationBackend` on the trained policy,
  ``--generation-prompts`` stage-2 prompts of ``rl.n`` samples, the plan's decode batch, run with PyTorch's
  math attention kernel disabled (on CUDA the call fails if any attention needs it; PyTorch's CPU kernels
  accept inputs CUDA's fused ones refuse, so the dry run only exercises the code): generated tokens per
  second, the slots the backend sized from free memory, and ``max_memory_reserved`` against the plan's
  rollout figure;
- **the CUDA context**: device memory in use outside the caching allocator after the step and generation,
  against the plan's context reserve (``--context-only``: the bare context of a fresh process, before any
  tensor).

Writes JSON rows (``check``, ``result``, ``value``, ``seconds``) to ``--out``, which ``benchmarks/gpu_check.py``
puts in its table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nemo_viper.planning.flops import Flops, lm_forward_flops, vision_forward_flops
from nemo_viper.planning.memory import (
    GIB,
    Architecture,
    Layout,
    TrainingShape,
    context_reserve,
    rollout_phase,
    training_changes,
    training_phase,
)

RECIPE_STAGE = "RL stage 2"
DRY_RUN_OVERRIDES = ("model.precision=fp32", "rl.n=3", "rl.sampling.max_new_tokens=8", "rl.grpo.micro_batch_size=2",
                     "rl.min_pixels=3136", f"rl.max_pixels={28 * 28 * 36}", "rollout.megatron.max_batch_size=4")
FUSED_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
# Dense bf16 peak (TFLOP/s, no sparsity) of the GPUs the check runs on, from NVIDIA's data sheets; the first
# name contained in torch.cuda.get_device_name() wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "GH200": 989, "B200": 2250,
                    "A100": 312}
# Terms of the plan that this process does not hold in the caching allocator: the reward model (not loaded
# here) and the CUDA context (measured on its own row).
NOT_IN_ALLOCATOR = ("reward model", "CUDA/NCCL context")


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPU named ``device_name``, or ``None`` when not in :data:`PEAK_BF16_TFLOPS`."""
    return next((tflops * 1e12 for name, tflops in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def allocator_figure(phase) -> float:
    """The plan's bytes of a phase that the caching allocator holds in this process."""
    return sum(v for k, v in phase.terms.items() if k not in NOT_IN_ALLOCATOR)


def recipe_step_shape(config) -> TrainingShape:
    """The plan's shape of the recipe's stage-2 training step, without the reward model (not loaded here)."""
    from nemo_viper.planning.recipe import training_shapes

    return replace(training_shapes(config)[RECIPE_STAGE], reward_params=0)


def fit_device(arch: Architecture, layout: Layout, shape: TrainingShape,
               device_bytes: float) -> tuple[TrainingShape, list[str]]:
    """The recipe's shape, or, when the plan's training step exceeds ``device_bytes``, the shape after the plan's
    cheapest changes in order (those that lower the step's memory) until it fits or none is left."""
    changes, base = [], shape
    for description, candidate, candidate_layout in training_changes(base, layout, arch, gpus=1):
        if training_phase(arch, layout, shape).total <= device_bytes:
            break
        changed = {k: v for k, v in vars(candidate).items() if getattr(base, k) != v}  # each is relative to base
        trial = replace(shape, **changed)
        if candidate_layout == layout and training_phase(arch, layout, trial).total < training_phase(
                arch, layout, shape).total:
            shape, changes = trial, [*changes, description]
    return shape, changes


def image_grid(arch: Architecture, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    """The patch grid of a 2048 x 2048 photo after Qwen2.5-VL's resize into ``[min_pixels, max_pixels]``."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    height, width = smart_resize(2048, 2048, factor=arch.patch * arch.merge, min_pixels=min_pixels,
                                 max_pixels=max_pixels)
    return (1, height // arch.patch, width // arch.patch)


class ViperPrompts:
    """Random stage-2 prompts at the recipe's budgets: ``text`` text tokens around ``images`` images of ``grid``
    patches (each between its vision start and end tokens), ids drawn from the vocabulary without the
    vision special tokens."""

    def __init__(self, hf_config: dict, arch: Architecture, shape: TrainingShape, grid: tuple[int, int, int],
                 seed: int = 0):
        self.arch, self.shape, self.grid = arch, shape, grid
        self.ids = {key: hf_config[f"{key}_token_id"] for key in ("image", "video", "vision_start", "vision_end")}
        self.generator = torch.Generator().manual_seed(seed)
        special = torch.tensor(list(self.ids.values()))
        vocab = torch.arange(arch.vocab)
        self.text_ids = vocab[~torch.isin(vocab, special)]

    def tokens(self, count: int) -> torch.Tensor:
        return self.text_ids[torch.randint(len(self.text_ids), (count,), generator=self.generator)]

    def prompt(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(prompt_ids, pixel_values, image_grid_thw)`` of one prompt (float32 pixels, as the processor)."""
        t, h, w = self.grid
        image = torch.tensor([self.ids["vision_start"], *[self.ids["image"]] * (t * h * w // self.arch.merge**2),
                              self.ids["vision_end"]])
        text = self.tokens(self.shape.prompt_text_tokens)
        head = text[: len(text) // 4]  # the chat template's opening, the images, then the task text
        ids = torch.cat([head, *[image] * self.shape.images_per_prompt, text[len(head):]])
        patches = self.shape.images_per_prompt * t * h * w
        pixels = torch.randn(patches, 3 * self.arch.temporal_patch * self.arch.patch**2, generator=self.generator)
        return ids, pixels, torch.tensor([self.grid] * self.shape.images_per_prompt)

    def rollout(self, prompts: int):
        """A :class:`~nemo_viper.training.rollout_batch.RolloutBatch` of ``prompts`` groups of ``rl.n`` full-length
        responses (truncated at the length limit), random rewards, each prompt's images stored once."""
        from nemo_viper.models.batch import PolicyBatch
        from nemo_viper.training.rollout_batch import RolloutBatch

        n, length = self.shape.responses_per_prompt, self.shape.max_new_tokens
        rows, masks, pixels, grids = [], [], [], []
        for _ in range(prompts):
            ids, pixel_values, grid = self.prompt()
            pixels.append(pixel_values)
            grids.append(grid)
            for _ in range(n):
                rows.append(torch.cat([ids, self.tokens(length)]))
                masks.append(torch.arange(len(rows[-1])) >= len(ids))
        groups = torch.arange(prompts).repeat_interleave(n)
        sequences = PolicyBatch(torch.stack(rows), torch.stack(masks), torch.cat(pixels), torch.cat(grids), groups,
                                torch.full((len(rows),), self.shape.images_per_prompt))
        return RolloutBatch(sequences=sequences, group_index=groups,
                            rewards=torch.rand(len(rows), generator=self.generator),
                            sample_ids=[f"prompt{g}" for g in groups.tolist()],
                            truncated=torch.ones(len(rows), dtype=torch.bool))


def step_flops(arch: Architecture, batch, micro_batch_size: int, window_size: int, full_attention_blocks: int) -> float:
    """Model FLOPs of one GRPO step over ``batch`` (a :class:`~nemo_viper.models.batch.PolicyBatch`, shared
    images): the old-log-prob forward pass and the update's forward and backward (3 forward passes); each
    micro-batch runs the vision tower once per stored image it shows, the language model causally."""
    forward = Flops(0, 0)
    rows = batch.input_ids.shape[0]
    for start in range(0, rows, micro_batch_size):
        micro_batch = batch.select(slice(start, start + micro_batch_size))
        lengths = (micro_batch.input_ids.shape[1] for _ in range(micro_batch.input_ids.shape[0]))  # no padding
        grids = [tuple(g) for g in micro_batch.image_grid_thw.tolist()]
        vision = vision_forward_flops(arch, grids, window_size, full_attention_blocks)
        forward = forward + lm_forward_flops(arch, lengths) + Flops(vision.full, 0)
    return 4 * forward.causal


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def row(check: str, result: str, value: str, seconds: float = 0.0) -> dict:
    return {"check": check, "result": result, "value": value, "seconds": seconds}


def context_rows(plan_reserve: float, after: str) -> list[dict]:
    """Device memory outside the caching allocator (``after`` names when), against the plan's reserve."""
    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()
    return [row(f"CUDA context {after}", "PASS" if outside <= plan_reserve else "FAIL",
                f"{outside / GIB:.2f} GiB outside the allocator (plan's reserve {plan_reserve / GIB:.2f} GiB)")]


def bare_context() -> list[dict]:
    """The CUDA context of a fresh process, before any tensor: device memory in use after CUDA's
    initialisation, less what was in use before (NVML, when installed; else none is assumed)."""
    before = 0
    try:
        import pynvml  # nvidia-ml-py: reads the device without a CUDA context
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            before = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
        except pynvml.NVMLError:
            pass
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    reserve = context_reserve(Layout())
    used = total - free - before
    return [row("CUDA context of a fresh process, before any tensor", "PASS" if used <= reserve else "FAIL",
                f"{used / GIB:.2f} GiB (plan's reserve {reserve / GIB:.2f} GiB)")]


def run(args) -> list[dict]:
    from nemo_viper.models.hf_checkpoint import read_qwen25_vl_config
    from nemo_viper.models.policy import PolicyConfig
    from nemo_viper.recipes import recipe
    from nemo_viper.rollout.interface import GenerationRequest
    from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend
    from nemo_viper.training.stage import build_trainer

    config = recipe(args.recipe, *args.override, *(DRY_RUN_OVERRIDES if args.dry_run else ()))
    hf_config = read_qwen25_vl_config(args.model)
    arch = Architecture.from_hf_config(hf_config)
    layout = Layout(1, 1, 1)
    recipe_shape = recipe_step_shape(config)
    cuda = torch.cuda.is_available()
    device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else float("inf")
    shape, changes = fit_device(arch, layout, recipe_shape, device_bytes)
    settings = (f"{args.prompts} prompts x n={shape.responses_per_prompt}, {shape.images_per_prompt} images of "
                f"{shape.max_pixels} px, {shape.max_new_tokens}-token responses, micro-batch {shape.micro_batch_size}, "
                f"recompute {shape.recompute}" + (f" (plan's changes to fit: {', '.join(changes)})" if changes else ""))
    rows = []

    started = time.perf_counter()
    options = {**config.model.options(), "layer_spec": "local", "recompute": shape.recompute,
               "recompute_vision": shape.recompute_vision}  # the recipe's model section, as fitted
    policy_config = PolicyConfig(hf_path=args.model, **options)
    grpo = replace(config.rl.grpo, num_minibatches=1, micro_batch_size=shape.micro_batch_size)
    trainer = build_trainer(policy_config, grpo, config.rl.sampling, hf_weights=False)
    synchronize()
    rows.append(row(f"build the policy ({arch.total_params / 1e9:.3g}B parameters, random init on the device)", "PASS",
                    f"{config.model.precision}, local spec", time.perf_counter() - started))

    vision = hf_config["vision_config"]
    grid = image_grid(arch, config.rl.min_pixels, shape.max_pixels)
    prompts = ViperPrompts(hf_config, arch, shape, grid, seed=config.rl.sampling.seed)
    batch = prompts.rollout(args.prompts)
    times, metrics = [], {}
    for index in range(args.warmup + args.steps):
        synchronize()
        started = time.perf_counter()
        metrics = trainer.step(batch)
        synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    finite = all(torch.isfinite(torch.tensor(metrics[k])) for k in ("train/loss", "train/grad_norm"))
    tokens = batch.sequences.input_ids.numel()
    rows.append(row(f"{RECIPE_STAGE} GRPO step ({settings})", "PASS" if finite else "FAIL",
                    f"median {seconds:.2f} s of {len(times)} after {args.warmup} warm-up, {tokens / seconds:.0f} "
                    f"tokens/s; loss {metrics['train/loss']:.4f}, grad norm {metrics['train/grad_norm']:.3g}",
                    seconds))
    flops = step_flops(arch, batch.sequences, shape.micro_batch_size, vision["window_size"],
                       len(vision["fullatt_block_indexes"]))
    peak = peak_flops(torch.cuda.get_device_name()) if cuda else None
    rows.append(row("GRPO step MFU (model FLOPs / step time / dense bf16 peak)", "INFO",
                    f"{flops:.3g} FLOP per step, {flops / seconds:.3g} FLOP/s"
                    + (f", MFU {flops / seconds / peak:.1%} of {peak:.3g}" if peak else ", no peak known")))
    plan = training_phase(arch, layout, shape)
    if cuda:
        reserved = torch.cuda.max_memory_reserved()
        figure = allocator_figure(plan)
        rows.append(row("GRPO step max_memory_reserved vs the memory plan", "PASS" if reserved <= figure else "INFO",
                        f"{reserved / GIB:.2f} GiB vs plan {figure / GIB:.2f} GiB ({reserved / figure:.0%}; plan "
                        f"total with context {plan.total / GIB:.2f} GiB, device {device_bytes / GIB:.0f} GiB)"))
        torch.cuda.reset_peak_memory_stats()

    generation = replace(config.rollout.megatron, max_batch_size=shape.generation_batch_size)
    backend = MegatronGenerationBackend(trainer.policy.model, generation, seed=config.rl.sampling.seed)
    requests = []
    for index in range(args.generation_prompts):
        ids, pixels, grids = prompts.prompt()
        requests.append(GenerationRequest(ids, pixels, grids, n=shape.responses_per_prompt,
                                          sampling=replace(config.rl.sampling, seed=index)))
    samples = sum(request.n for request in requests)
    slots = backend.slot_count(samples, len(requests[0].prompt_ids) + shape.max_new_tokens)  # as generate sizes it
    synchronize()
    started = time.perf_counter()
    try:
        with sdpa_kernel(FUSED_ATTENTION):
            responses = backend.generate(requests)
    except RuntimeError as error:
        rows.append(row("Megatron generation without the math attention kernel", "FAIL", str(error)[:160],
                        time.perf_counter() - started))
        return rows
    synchronize()
    seconds = time.perf_counter() - started
    generated = sum(len(sample.token_ids) for group in responses for sample in group)
    rows.append(row("Megatron generation without the math attention kernel", "PASS",
                    f"{generated / seconds:.0f} tokens/s: {samples} samples of up to {shape.max_new_tokens} tokens "
                    f"({generated} generated), {slots} decoding together (plan: {generation.max_batch_size}), "
                    "prefill included", seconds))
    if cuda:
        rollout = rollout_phase(arch, layout, shape, device_bytes)
        reserved = torch.cuda.max_memory_reserved()
        figure = allocator_figure(rollout)
        rows.append(row("generation max_memory_reserved vs the memory plan", "PASS" if reserved <= figure else "INFO",
                        f"{reserved / GIB:.2f} GiB vs plan {figure / GIB:.2f} GiB ({reserved / figure:.0%})"))
        rows += context_rows(context_reserve(layout), "after the step and generation")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Qwen2.5-VL directory (config.json, processor); its weights are not read")
    parser.add_argument("--out", required=True, help="JSON file of the rows")
    parser.add_argument("--recipe", default="qwen25vl_3b")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--prompts", type=int, default=2, help="prompts (GRPO groups) of the step's batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--generation-prompts", type=int, default=13, help="13 x n=5 fills the plan's 64 slots")
    parser.add_argument("--dry-run", action="store_true", help="small shapes on the CPU (the same code path)")
    parser.add_argument("--context-only", action="store_true", help="only the bare CUDA context of this process")
    args = parser.parse_args(argv)
    if args.context_only:
        rows = bare_context()
    else:
        if not args.dry_run and not torch.cuda.is_available():
            raise SystemExit("grpo_step_check needs a CUDA GPU (or --dry-run)")
        rows = run(args)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    for line in rows:
        print(json.dumps(line), flush=True)
    return rows


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
