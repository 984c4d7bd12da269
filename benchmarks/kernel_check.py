"""Attention kernels of the GPU path at the published 3B's sizes (``scripts/gpu_check.sh``), or small on the CPU
(``--dry-run``, run by the test suite so that the check cannot rot).

- **vision tower**: HF's Qwen2.5-VL-3B tower (random weights from the published config, bf16 on a GPU) on one
  image of ``rl.max_pixels`` (1280·28²), forward + backward, under transformers' ``sdpa`` (one SDPA call per
  window) and under :mod:`nemo_viper.models.vision_attention` (one call per block): seconds per image of
  each, and the largest difference of their outputs;
- **decode attention**: :class:`~nemo_viper.rollout.kv_cache.SlotKVCache` decode steps at the 3B's heads
  (16 query heads, 2 KV groups, head dim 128) over a ViPER-shaped batch (64 slots of ~2.3k tokens: a
  stage-2 prompt of two images and a 1024-token budget), run with PyTorch's math kernel disabled (the
  call fails if only the math kernel could run it): layer-steps per second.

Prints JSON rows (``check``, ``result``, ``value``, ``seconds``) that ``benchmarks/gpu_check.py`` puts in
its table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, step, repeats: int) -> float:
    """Median seconds of ``step()`` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def vision_rows(device: torch.device, dtype: torch.dtype, depth: int | None, side: int, repeats: int) -> list[dict]:
    """The 3B tower (``depth`` blocks, None = published 32) on one ``side`` x ``side`` patch image."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from nemo_viper.models.published import published_config
    from nemo_viper.models.vision_attention import use_packed_window_attention

    vision = published_config("3b", vision_depth=depth)["vision_config"]
    config = Qwen2_5_VLVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    looped = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).to(device, dtype)
    packed = copy.deepcopy(looped)
    use_packed_window_attention(packed)
    grid = torch.tensor([[1, side, side]], device=device)
    pixels = torch.randn(side * side, 3 * 2 * 14 * 14, device=device, dtype=dtype)
    outputs, rows = {}, []
    for name, tower in (("transformers sdpa, one call per window", looped),
                        ("packed windows, one call per block", packed)):
        def step(tower=tower, name=name):
            out = tower(pixels, grid_thw=grid).pooler_output
            out.float().square().mean().backward()
            outputs[name] = out.detach().float()
            tower.zero_grad(set_to_none=True)
        seconds = timed(device, step, repeats)
        rows.append({"check": f"vision tower 3B fwd+bwd, {name}", "result": "INFO", "seconds": seconds,
                     "value": f"{seconds * 1000:.0f} ms per {side}x{side}-patch image ({config.depth} blocks)"})
    first, second = outputs.values()
    diff = (first - second).abs().max().item()
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    rows.append({"check": "vision tower 3B, packed vs transformers' output", "result":
                 "PASS" if diff <= tolerance else "FAIL", "value": f"max |Δ| {diff:.2e} (tolerance {tolerance:g})"})
    return rows


def decode_rows(device: torch.device, dtype: torch.dtype, slots: int, columns: int, repeats: int) -> list[dict]:
    """Decode steps of one layer through the slot cache, math kernel disabled, with the 3B's head layout."""
    from nemo_viper.rollout.kv_cache import SlotKVCache

    heads, groups, dim = 16, 2, 128
    cache = SlotKVCache(slots=slots, columns=columns)
    generator = torch.Generator(device="cpu").manual_seed(0)
    cache.layers[0] = tuple(torch.randn(slots, groups, columns, dim, generator=generator).to(device, dtype)
                            for _ in range(2))
    fill = torch.randint(columns // 2, columns - 1, (slots,), generator=generator).to(device)
    query = torch.randn(1, slots, heads, dim, generator=generator).to(device, dtype)
    key, value = (torch.randn(1, slots, groups, dim, generator=generator).to(device, dtype) for _ in range(2))
    scale = 1 / math.sqrt(dim)

    def step():
        with sdpa_kernel(FUSED), cache.decode(fill, int(fill.max()) + 1):
            cache.attend(0, query, key, value, scale)

    try:
        seconds = timed(device, step, repeats)
    except RuntimeError as error:
        return [{"check": "decode attention without the math kernel", "result": "FAIL", "value": str(error)[:160]}]
    return [{"check": "decode attention without the math kernel", "result": "PASS", "seconds": seconds,
             "value": f"{slots} slots x {columns} columns: {1 / seconds:.0f} layer-steps/s "
                      f"({slots / seconds:.0f} token-layers/s)"}]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="small shapes on the CPU (the same code path)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        sizes = {"depth": 2, "side": 20, "slots": 4, "columns": 64}  # 20 patches: unequal windows
    else:
        if not torch.cuda.is_available():
            raise SystemExit("kernel_check needs a CUDA GPU (or --dry-run)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        sizes = {"depth": None, "side": 72, "slots": 64, "columns": 2304}  # 72x72 patches: 1008², ~1280·28² pixels
    rows = vision_rows(device, dtype, sizes["depth"], sizes["side"], args.repeats)
    rows += decode_rows(device, dtype, sizes["slots"], sizes["columns"], args.repeats)
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
