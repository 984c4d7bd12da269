"""Memory measurements on the CPU (no GPU here): training activations, the memory plan's error, export RSS.

- ``activations``: bytes autograd saves for the backward pass of one training micro-batch (4 responses to
  one prompt with a 448x448 image), with the images per row (before: the vision tower runs once per row)
  and shared (after: once per prompt); a 2-layer Qwen2.5-VL-3B of full width with the full vision tower,
  bf16. Saved tensors are counted and dropped at once (no backward), so the run needs no room for them.
- ``estimator``: the peak of CPU allocations (torch profiler memory timeline, plus Megatron's gradient
  buffer, which it does not see) of one training micro-batch (forward, GRPO loss + entropy, backward;
  no optimizer step) against :mod:`nemo_viper.planning.memory`'s terms for the same shapes, on the tiny
  model (fp32) and the 2-layer full-width 3B (bf16).
- ``export``: peak resident memory (all ranks) of ``nemo-viper convert export`` of a random 2-layer
  full-width Qwen2.5-VL-7B (bf16 checkpoint, 2.2B parameters) at TP1 and TP2; ``--tree DIR`` runs another
  checkout of the project (e.g. the code before streaming export) on the same checkpoint.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_cpu.py activations|estimator|export [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench_docs import machine_line, reproduce_command, write_section

REPO = Path(__file__).resolve().parents[1]
GIB, MIB = 2**30, 2**20


def full_width_hf_dir(out: Path, name: str, layers: int) -> Path:
    """An HF dir (config, tokenizer, processor; no weights) of Qwen2.5-VL ``name`` (``3B``/``7B``) with
    ``layers`` decoder layers at full width and the full vision tower; tokens from the tiny tokenizer."""
    from nemo_viper.models.tiny import write_tiny_checkpoint
    from nemo_viper.planning.recipe import PUBLISHED

    if (out / "config.json").is_file():
        return out
    tiny = write_tiny_checkpoint(out.with_name(out.name + "_tiny"))
    config = json.loads((tiny / "config.json").read_text())
    published = PUBLISHED[f"Qwen2.5-VL-{name}"]
    text = {k: v for k, v in published.items() if k != "vision_config"}
    config["text_config"].update(text, num_hidden_layers=layers, max_position_embeddings=128000,
                                 layer_types=["full_attention"] * layers,
                                 rope_parameters={"mrope_section": [16, 24, 24], "rope_theta": 1e6,
                                                  "rope_type": "default"})
    config["vision_config"].update(published["vision_config"], num_heads=16, out_hidden_size=text["hidden_size"],
                                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
    config.update(tie_word_embeddings=text["tie_word_embeddings"], dtype="bfloat16")
    out.mkdir(parents=True)
    for file in tiny.iterdir():
        if file.name not in ("model.safetensors", "config.json", "nemo_viper_tiny.json"):
            shutil.copy2(file, out / file.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(tiny)
    return out


def micro_batch(policy, rows: int, image_side: int, prompt_text: int, response: int):
    """``rows`` responses to one prompt with an ``image_side``² image: a shared-layout PolicyBatch."""
    from nemo_viper.models.batch import PolicyBatch

    provider = policy.provider
    grid = image_side // 14
    image_tokens = grid * grid // 4
    prompt = [1] * prompt_text + [provider.vision_start_token_id] + [provider.image_token_id] * image_tokens + [
        provider.vision_end_token_id]
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([prompt + torch.randint(10, 400, (response,), generator=generator).tolist()
                        for _ in range(rows)])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, len(prompt):] = True
    pixels = torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=generator)
    return PolicyBatch(ids, mask, pixels, torch.tensor([[1, grid, grid]]), torch.zeros(rows, dtype=torch.long),
                       torch.ones(rows, dtype=torch.long))


def per_row(batch):
    from nemo_viper.models.batch import PolicyBatch

    inputs = batch.model_inputs(torch.device("cpu"))
    return PolicyBatch(batch.input_ids, batch.response_mask, inputs["pixel_values"], inputs["image_grid_thw"],
                       images_per_row=batch.images_per_row)


def saved_bytes_dropped(run) -> int:
    """Bytes of the distinct tensors autograd would save while ``run()`` runs; each is dropped at once."""
    seen = {}

    def pack(tensor):
        seen[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))] = tensor.nbytes
        return None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        run()
    return sum(seen.values())


def cmd_activations(args) -> str:
    from nemo_viper.models.logprobs import ENTROPY_CHUNK_ROWS, forward_micro_batch
    from nemo_viper.models.policy import PolicyConfig, build_policy
    from nemo_viper.planning.memory import Architecture, vision_activation_bytes_per_patch_block

    hf = full_width_hf_dir(Path(args.work) / "hf_3b_2l", "3B", 2)
    policy = build_policy(PolicyConfig(hf_path=str(hf), precision="bf16"), load_weights=False)
    (model,) = policy.chunks
    model.train()
    batch = micro_batch(policy, args.rows, args.image_side, 64, 64)
    measured = {}
    for name, layout in (("per row (before)", per_row(batch)), ("shared (after)", batch)):
        measured[name] = saved_bytes_dropped(lambda layout=layout: forward_micro_batch(
            model, layout, torch.device("cpu")))
    before, after = measured.values()
    patches = (args.image_side // 14) ** 2
    vision_measured = (before - after) / ((args.rows - 1) * patches * 32)
    arch = Architecture.from_hf_config(json.loads((hf / "config.json").read_text()))
    vision_estimated = vision_activation_bytes_per_patch_block(arch, "bf16")
    lines = [
        "## Training activations per micro-batch: vision tower once per prompt (CPU)",
        "",
        f"{machine_line()}. Bytes autograd saves for the backward pass of one micro-batch: {args.rows} "
        f"responses to one prompt with a {args.image_side}x{args.image_side} image ({patches} patches), 64 "
        "prompt-text and 64 response tokens per row; 2-layer Qwen2.5-VL-3B of full width (hidden 2048, vocab "
        "151,936) with the full 32-block vision tower, bf16, random weights.",
        "",
        "| images | saved activations per micro-batch |",
        "| --- | ---: |",
        *[f"| {k} | {v / MIB:,.0f} MiB |" for k, v in measured.items()],
        "",
        f"Ratio {before / after:.2f}x. The difference is {args.rows - 1} copies of the image through the tower: "
        f"{vision_measured / 1024:.1f} KiB per patch and block measured, {vision_estimated / 1024:.1f} KiB in the "
        f"memory plan's rule (34·hv + 6·fv bytes); the whole tower: {vision_measured * 32 / MIB:.2f} MiB per "
        f"patch. At the 7B recipe's budget (1280·28² pixels = 5,120 patches per image) a micro-batch of 4 "
        f"saved {4 * 5120 * vision_measured * 32 / GIB:.0f} GiB for the tower before and "
        f"{2 * 5120 * vision_measured * 32 / GIB:.0f} GiB now (at most 2 distinct prompts per micro-batch of 4 "
        "with n = 5); with `model.recompute_vision` the blocks keep only their inputs.",
        "",
        f"    {reproduce_command()}",
    ]
    return "\n".join(lines)


def profiled_peak(run, work: Path) -> tuple[int, list[int]]:
    """Peak of the CPU bytes the torch profiler's memory timeline attributes to tensors while ``run()``
    runs (every tensor it sees: inputs, parameters, gradients, activations, temporaries), and the timeline's
    per-category bytes at that moment."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        run()
    path = work / "memory_timeline.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(str(path), device="cpu")
    _, sizes = json.loads(path.read_text())
    totals = [sum(row) for row in sizes]
    peak = max(range(len(totals)), key=totals.__getitem__)
    return totals[peak], sizes[peak]


def cmd_estimator(args) -> str:
    from megatron.core.distributed import DistributedDataParallelConfig

    from nemo_viper.algorithms import LossNormalizer, PolicyLossConfig
    from nemo_viper.models.logprobs import forward_micro_batch
    from nemo_viper.models.interfaces import TrainingBatch
    from nemo_viper.models.training import micro_batch_loss
    from nemo_viper.models.policy import PolicyConfig, build_policy
    from nemo_viper.planning.memory import Architecture, Layout, TrainingShape, training_phase
    from nemo_viper.training.grpo import GRPOLoss

    if args.model == "tiny":
        from nemo_viper.models.tiny import write_tiny_checkpoint

        hf = Path(args.work) / "tiny_hf"
        if not hf.exists():
            write_tiny_checkpoint(hf)
        precision, rows, side, text, response = "fp32", 4, 224, 64, 128
    else:
        hf = full_width_hf_dir(Path(args.work) / "hf_3b_2l", "3B", 2)
        precision, rows, side, text, response = "bf16", 2, 224, 64, 128
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False)
    policy = build_policy(PolicyConfig(hf_path=str(hf), precision=precision), load_weights=False,
                          wrap_with_ddp=True, ddp_config=ddp)
    (model,) = policy.chunks
    model.train()
    batch = micro_batch(policy, rows, side, text, response)
    normalizer = LossNormalizer.from_masks([batch.response_mask])
    data = TrainingBatch(batch, {"old_logprobs": torch.zeros(batch.input_ids.shape), "advantages": torch.ones(rows)})
    loss_fn = GRPOLoss(PolicyLossConfig())

    def step():
        logits = forward_micro_batch(model, batch, torch.device("cpu"))
        loss, _, _ = micro_batch_loss(logits, data, loss_fn, normalizer, 1.0)
        loss.backward()

    peak, categories = profiled_peak(step, Path(args.work))
    # Megatron's DDP gradient buffer is allocated when the model is built and only written in place by the
    # backward hooks: the timeline never sees it (its GRADIENT category holds far less), so it is added.
    peak += sum(b.grad_data.numel() * b.grad_data.element_size() for b in model.buffers)
    arch = Architecture.from_hf_config(json.loads((hf / "config.json").read_text()))
    # what the step above runs: one micro-batch of one prompt's rows and image, no recomputation, no reward model
    shape = TrainingShape(micro_batch_size=rows, responses_per_prompt=rows, micro_batches_per_minibatch=1,
                          prompt_text_tokens=text, images_per_prompt=1, max_pixels=side * side, max_new_tokens=response,
                          precision=precision, recompute="none", recompute_vision=False, generation_batch_size=rows,
                          vllm_memory_fraction=0.0, vllm_sleep_mode=True, reward_params=0,
                          entropy_chunk=ENTROPY_CHUNK_ROWS)
    terms = training_phase(arch, Layout(distributed_optimizer=False), shape).terms
    terms.pop("optimizer")
    estimate = sum(terms.values())
    detail = ", ".join(f"{k} {v / MIB:,.0f}" for k, v in terms.items())
    return (f"| {args.model} ({precision}, micro-batch {rows}, sequence {batch.input_ids.shape[1]}, "
            f"{(side // 14) ** 2} patches) | {peak / MIB:,.0f} MiB | {estimate / MIB:,.0f} MiB ({detail}) | "
            f"{(estimate - peak) / peak:+.1%} |"), categories


def sample_rss(pid: int, stop: threading.Event, result: dict) -> None:
    """Largest total RSS of ``pid`` and its descendants, sampled every 0.2 s."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            processes = [root, *root.children(recursive=True)]
            total = sum(p.memory_info().rss for p in processes if p.is_running())
            result["peak"] = max(result.get("peak", 0), total)
        except psutil.Error:
            pass
        time.sleep(0.2)


def cmd_export(args) -> str:
    work = Path(args.work)
    hf = full_width_hf_dir(work / "hf_7b_2l", "7B", 2)
    ckpt = work / "ckpt_7b_2l"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if not ckpt.exists():  # random bf16 weights, saved once
        script = ("import sys; from nemo_viper.models.policy import PolicyConfig, build_policy; "
                  "from nemo_viper.models.checkpoint import save_policy; from nemo_viper.runtime import cpu_mode\n"
                  "with cpu_mode.unless_cuda():\n"
                  "    p = build_policy(PolicyConfig(hf_path=sys.argv[1], precision='bf16'), load_weights=False)\n"
                  "    save_policy(p, sys.argv[2])")
        subprocess.run([sys.executable, "-c", script, str(hf), str(ckpt)], check=True, env=dict(env, PYTHONPATH=str(REPO)))
    tree = Path(args.tree or REPO)
    out = work / f"exported_tp{args.tp}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.tp}", "-m", "nemo_viper.cli",
               "convert", "export", "--ckpt", str(ckpt), "--out", str(out), "--tp", str(args.tp)]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=dict(env, PYTHONPATH=str(tree)), cwd=tree, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stop, result = threading.Event(), {}
    sampler = threading.Thread(target=sample_rss, args=(process.pid, stop, result))
    sampler.start()
    _, stderr = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"export failed:\n{stderr[-3000:]}")
    shards = sorted(out.glob("*.safetensors"))
    largest = max(s.stat().st_size for s in shards)
    label = args.label or ("this tree" if args.tree is None else str(tree))
    shutil.rmtree(out)
    return (f"| {label} | TP{args.tp} | {result['peak'] / GIB:.1f} GiB | {len(shards)} x <= {largest / GIB:.2f} GiB "
            f"| {time.perf_counter() - started:.0f} s |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=("activations", "estimator", "export"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "nemo_viper_memory_bench"))
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--model", choices=("tiny", "3b"), default="tiny")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--tree", help="export: run this checkout of the project instead")
    parser.add_argument("--label", help="export: the row's label")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    result = {"activations": cmd_activations, "estimator": cmd_estimator, "export": cmd_export}[args.part](args)
    if isinstance(result, tuple):
        result, detail = result
        print("profiler categories at the peak (bytes):", detail)
    print(result)
    if args.write_docs and args.part == "activations":
        write_section(result.splitlines()[0], result)


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
