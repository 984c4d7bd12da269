"""Diffusion backends through diffusers: text-to-image (stage-1 redraw) and instruction editing (stage 2).

Both are built from a :class:`~nemo_viper.synthesis.config.DiffusionConfig`: a pipeline class (a
diffusers name or any dotted class path), weights (a directory, a hub id, or ``tiny``), call arguments,
dtype (bf16 on GPU) and device. Calls are batched (``batch_size`` prompts per pipeline call) and every
sample has its own ``torch.Generator`` seeded from the sample, so a sample's image does not depend on
its batch. The stage code sees only the :class:`TextToImage` / :class:`ImageEditor` protocols, so tests
can inject other implementations.
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, Sequence

import torch
from PIL import Image

from nemo_viper.errors import ConfigError
from nemo_viper.synthesis.config import DiffusionConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TextToImage(Protocol):
    """``generate(prompts, seeds)[i]`` is the image drawn for ``prompts[i]`` with seed ``seeds[i]``."""

    name: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]: ...


class ImageEditor(Protocol):
    """``edit(images, instructions, seeds)[i]`` is ``images[i]`` edited by ``instructions[i]`` (any size)."""

    name: str

    def edit(
        self, images: Sequence[Image.Image], instructions: Sequence[str], seeds: Sequence[int]
    ) -> list[Image.Image]: ...


def pipeline_class(name: str):
    """A diffusers pipeline class by name (``QwenImagePipeline``) or any class by dotted path."""
    if "." in name:
        module, _, attribute = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"pipeline {name!r} cannot be imported: {e}") from e
    import diffusers

    try:
        return getattr(diffusers, name)
    except AttributeError as e:
        raise ConfigError(f"pipeline {name!r} is not a diffusers class (give a dotted path for others)") from e


def resolve_device_dtype(config: DiffusionConfig) -> tuple[str, torch.dtype]:
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if config.dtype != "auto":
        return device, _DTYPES[config.dtype]
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


@contextmanager
def _quiet_loading():
    """No diffusers/transformers loading bars (the stage's own progress bar is the output)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    shown = [m.is_progress_bar_enabled() for m in (diffusers_logging, transformers_logging)]
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in zip((diffusers_logging, transformers_logging), shown):
            if enabled:
                module.enable_progress_bar()


class DiffusersPipeline:
    """A loaded diffusers pipeline and the batched, per-sample-seeded call shared by both kinds.

    ``model == "tiny"`` builds (once) the tiny random pipeline of the class under ``tiny_root``.
    """

    def __init__(self, config: DiffusionConfig, tiny_root: str | Path | None = None):
        self.config = config
        self.name = f"{config.pipeline}:{config.model}"
        cls = pipeline_class(config.pipeline)
        model = config.model
        if model == "tiny":
            from nemo_viper.synthesis.tiny_diffusion import ensure_tiny_pipeline

            if tiny_root is None:
                raise ConfigError("model 'tiny' needs a directory to build the tiny pipeline in")
            model = str(ensure_tiny_pipeline(config.pipeline, tiny_root))
        self.device, dtype = resolve_device_dtype(config)
        with _quiet_loading():
            self.pipe = cls.from_pretrained(model, dtype=dtype)
        if config.cpu_offload:
            self.pipe.enable_model_cpu_offload()
        else:
            self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._accepts = set(inspect.signature(self.pipe.__call__).parameters)

    def _run(self, prompts: Sequence[str], seeds: Sequence[int], images: Sequence[Image.Image] | None = None,
             **fixed) -> list[Image.Image]:
        """Run ``prompts`` (and their input ``images``) in batches of ``batch_size``, one seed per sample."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        generator_device = "cpu" if self.config.cpu_offload else self.device
        results = []
        for start in range(0, len(prompts), self.config.batch_size):
            batch = slice(start, start + self.config.batch_size)
            kwargs = dict(fixed, **self.config.call_kwargs)
            kwargs["prompt"] = [self.config.prompt_template.format(prompt=p) for p in prompts[batch]]
            kwargs["generator"] = [torch.Generator(generator_device).manual_seed(s) for s in seeds[batch]]
            if images is not None:
                batch_images = list(images[batch])
                nested = [[image] for image in batch_images]
                kwargs[self.config.image_argument] = nested if self.config.nest_images else batch_images
            with torch.inference_mode():
                output = self.pipe(**kwargs)
            results += [image.convert("RGB") for image in output.images]
        return results


class DiffusersTextToImage(DiffusersPipeline):
    """Text-to-image (Qwen-Image, Flux, SD3, Stable Diffusion, ...): ``prompt`` in, one image per prompt."""

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        return self._run(list(prompts), list(seeds))


class DiffusersEditor(DiffusersPipeline):
    """Instruction editing (Qwen-Image-Edit, FluxKontext, InstructPix2Pix, OmniGen, ...).

    Images of one pipeline call must share a size, so the inputs are grouped by size first. ``height`` /
    ``width`` are set to the input's size when the pipeline accepts them and ``call_kwargs`` does not set
    them (FluxKontext additionally needs ``max_area`` and ``_auto_resize=False`` in ``call_kwargs`` to keep
    small images small).
    """

    def edit(
        self, images: Sequence[Image.Image], instructions: Sequence[str], seeds: Sequence[int]
    ) -> list[Image.Image]:
        out: list[Image.Image | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for (width, height), indices in by_size.items():
            sized = {k: v for k, v in (("height", height), ("width", width))
                     if k in self._accepts and k not in self.config.call_kwargs}
            edited = self._run([instructions[i] for i in indices], [seeds[i] for i in indices],
                               [images[i] for i in indices], **sized)
            for i, image in zip(indices, edited):
                out[i] = image
        return out
