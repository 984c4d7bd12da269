"""Image preprocessing throughput on CPU: the DALI pipeline against the PIL path (the HF processor).

Both paths take the same encoded images and return the same thing (``pixel_values`` + ``image_grid_thw``
per prompt, through :class:`~nemo_viper.data.images.QwenImagePreprocessor` with ``backend="dali"``,
``device="cpu"`` and ``backend="pil"``). Two workloads of one-image prompts, each 32 images:

- ``photos``: 8 scikit-image photos at their own size (300-640 px a side), JPEG quality 90;
- ``1024 PNG``: the same photos upscaled to 1024x1024 and stored as PNG, as the synthesis writes images.

Pixel budget ``[56*56, 1280*28*28]`` (the synthesis default), so the 1024x1024 images are downscaled to
980x980. The paths run in alternation (a busy machine slows both alike); images/s is wall-clock, CPU
ms/image is the process's CPU time (all threads) per image. A second table times the resize step alone
(decoded uint8 in, resized uint8 out) in DALI (the pipeline's two one-axis passes) and in Pillow.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/images_cpu.py [--write-docs]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from datetime import UTC, datetime
from typing import Callable

import numpy as np
import PIL
import torch
from PIL import Image

from nemo_viper.data.images import ImageProcessingConfig, QwenImagePreprocessor, Resize

from bench_docs import DOCS, cpu_model, reproduce_command, write_section

SECTION = "## Image preprocessing: DALI vs PIL (CPU)"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field", "immunohistochemistry")
CONFIG = ImageProcessingConfig(min_pixels=56 * 56, max_pixels=1280 * 28 * 28)


def workloads(images_per_set: int) -> dict[str, list[bytes]]:
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]

    def encoded(image: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        return buffer.getvalue()

    def cycle(items: list[bytes]) -> list[bytes]:
        return [items[i % len(items)] for i in range(images_per_set)]

    return {
        "photos (300-640 px, JPEG)": cycle([encoded(p, "JPEG") for p in photos]),
        "1024x1024 PNG": cycle([encoded(p.resize((1024, 1024), Image.BICUBIC), "PNG") for p in photos]),
    }


def timed(runs: dict[str, Callable[[], object]], count: int, warmup: int, repeats: int) -> dict[str, dict]:
    """Per run: images/s (wall) and CPU ms per image of each repeat; runs alternate."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    stats = {name: {"rate": [], "cpu_ms": []} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            stats[name]["rate"].append(count / (time.perf_counter() - wall))
            stats[name]["cpu_ms"].append(1000 * (time.process_time() - cpu) / count)
    return stats


def resize_step(encoded: list[bytes], threads: int) -> dict[str, Callable[[], object]]:
    """The resize step alone on decoded images: DALI's two one-axis resizes vs one Pillow ``resize``."""
    from nvidia.dali import fn, pipeline_def, types

    decoded = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in encoded]
    resizes = [Resize(*image.shape[:2], *CONFIG.resized_size(*image.shape[:2])) for image in decoded]

    @pipeline_def(batch_size=len(decoded), num_threads=threads, device_id=None, prefetch_queue_depth=1)
    def two_passes():
        images = fn.external_source(name="images", dtype=types.UINT8, ndim=3, layout="HWC")
        first = fn.external_source(name="first", dtype=types.FLOAT, ndim=1)
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
        images = fn.resize(images, size=first, interp_type=types.INTERP_CUBIC)
        return fn.resize(images, size=size, interp_type=types.INTERP_CUBIC)

    pipeline = two_passes()
    pipeline.build()
    inputs = {
        "images": decoded,
        "first": [np.array(r.first_pass(), dtype=np.float32) for r in resizes],
        "size": [np.array((r.new_height, r.new_width), dtype=np.float32) for r in resizes],
    }
    pil_images = [Image.fromarray(image) for image in decoded]
    return {
        "DALI resize (2 passes)": lambda: pipeline.run(**inputs),
        "Pillow resize": lambda: [
            image.resize((r.new_width, r.new_height), Image.BICUBIC) for image, r in zip(pil_images, resizes)
        ],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images per workload")
    parser.add_argument("--batch", type=int, default=16, help="DALI max_batch_size")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="DALI CPU threads")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write-docs", action="store_true", help=f"replace this benchmark's section in {DOCS.name}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]

    import nvidia.dali

    dali = QwenImagePreprocessor(CONFIG, "dali", device="cpu", max_batch_size=args.batch, num_threads=args.threads)
    pil = QwenImagePreprocessor(CONFIG, "pil", max_batch_size=args.batch)
    lines = [
        "| workload | path | median images/s | median CPU ms/image | images/s vs PIL |",
        "|---|---|---:|---:|---:|",
    ]
    ratios = {}
    for workload, encoded in workloads(args.images).items():
        prompts = [[data] for data in encoded]
        runs = {"DALI CPU": lambda: dali(prompts), "PIL": lambda: pil(prompts)}
        stats = timed(runs, len(encoded), args.warmup, args.repeats)
        reference = statistics.median(stats["PIL"]["rate"])
        for path in runs:
            rate, cpu_ms = statistics.median(stats[path]["rate"]), statistics.median(stats[path]["cpu_ms"])
            lines.append(f"| {workload} | {path} | {rate:.1f} | {cpu_ms:.1f} | {rate / reference:.2f} |")
        ratios[workload] = statistics.median(stats["DALI CPU"]["rate"]) / reference
    big = workloads(args.batch)["1024x1024 PNG"]
    step = timed(resize_step(big, args.threads), len(big), args.warmup, args.repeats)
    step_ms = {path: statistics.median(values["cpu_ms"]) for path, values in step.items()}
    lines += ["", "| resize step alone (1024x1024 -> 980x980) | median images/s | median CPU ms/image |"]
    lines += ["|---|---:|---:|"]
    for path, values in step.items():
        lines.append(f"| {path} | {statistics.median(values['rate']):.1f} | {step_ms[path]:.1f} |")
    table = "\n".join(lines)
    verdict = ", ".join(f"{ratio:.2f}x on {workload}" for workload, ratio in ratios.items())
    goal = "met" if min(ratios.values()) >= 2 else "not met"
    print(table)
    print(f"DALI CPU vs PIL images/s: {verdict}; goal >= 2x {goal}")

    if args.write_docs:
        command = reproduce_command()
        date = datetime.now(UTC).strftime("%Y-%m-%d")
        dali_step, pil_step = step_ms["DALI resize (2 passes)"], step_ms["Pillow resize"]
        write_section(
            SECTION,
            f"{SECTION}\n\n"
            f"{date}; {os.cpu_count()} CPU cores ({cpu_model()}), no GPU, load average {load:.1f} at the start "
            f"(the machine is shared); DALI {nvidia.dali.__version__} ({args.threads} threads, batches of "
            f"{args.batch}), Pillow {PIL.__version__}, torch {torch.__version__} (1 thread).\n\n"
            f"Both paths turn {args.images} encoded images per workload into `pixel_values` + `image_grid_thw` "
            "(one-image prompts, pixel budget [56*56, 1280*28*28]): `photos` are 8 scikit-image photos at their "
            "own size as JPEG; `1024x1024 PNG` the same photos upscaled and stored as PNG, as synthesis writes "
            "images (downscaled to 980x980). DALI: `QwenImagePreprocessor(backend=\"dali\", device=\"cpu\")`; "
            "PIL: `backend=\"pil\"` (PIL decode + `Qwen2VLImageProcessorPil`, one thread). Medians over "
            f"{args.repeats} alternating repeats after {args.warmup} warm-up; CPU ms/image counts all threads.\n\n"
            f"{table}\n\n"
            f"DALI CPU vs PIL: {verdict}; the >= 2x goal is {goal} on this machine. DALI's CPU decoders are "
            "as fast as Pillow's (both use libjpeg-turbo for JPEG) and its normalisation replaces the HF "
            "processor's float64 NumPy passes, which is what the large images gain; but DALI's CPU resize is "
            f"slower than Pillow's ({dali_step:.0f} vs {pil_step:.0f} CPU ms per 1024x1024 image), and matching "
            "Pillow's uint8 rounding between the two passes takes two one-axis resizes (a single 2-D DALI resize "
            "costs about a third less but is up to 16 grey levels off at sharp edges; see "
            "`nemo_viper/data/images.py`). Wall-clock gains beyond that come from DALI's thread pool and need "
            "free cores. No GPU was lent for this run, so the mixed (nvJPEG) decoder's throughput at "
            "1280*28*28 pixels is not measured.\n\n"
            f"```\n{command}\n```\n"
        )


if __name__ == "__main__":
    main()
