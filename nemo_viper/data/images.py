"""Qwen2.5-VL image preprocessing on NVIDIA DALI: encoded image bytes -> ``pixel_values`` + ``image_grid_thw``.

:class:`QwenImagePreprocessor` turns the encoded images of a batch of prompts (JPEG/PNG bytes, e.g. from
:meth:`~nemo_viper.data.shards.ShardDataset.image_bytes`) into what the HF Qwen2.5-VL image processor
(``Qwen2VLImageProcessorPil``) returns for each prompt's images:

1. decode to RGB under the project's one decoding rule (:mod:`nemo_viper.data.decoding`: EXIF orientation
   applied, 16-bit samples to 8 bits, CMYK/palette/alpha as PIL's ``convert("RGB")``): a plain image (8-bit
   RGB or greyscale PNG/JPEG, upright) goes to the decoder as it is, anything else is first re-encoded as the
   PNG of the rule's result, so both backends see the same pixels;
2. resize with Qwen's rule (transformers' ``smart_resize``: sides multiples of ``patch_size * merge_size``,
   pixel count inside ``[min_pixels, max_pixels]``, aspect ratio kept), bicubic with antialiasing;
3. rescale by ``rescale_factor`` (1/255) and normalise with ``image_mean`` / ``image_std``;
4. patchify: repeat the image ``temporal_patch_size`` times and cut it into ``patch_size`` patches in
   the merge-ordered layout of the HF processor: ``pixel_values`` ``[h*w, C*T*P*P]`` float32 and
   ``image_grid_thw`` ``(1, h, w)`` per image (``h``, ``w`` in patches).

Steps 1-3 run in a DALI pipeline: the GPU ("mixed") decoder with GPU resize/normalise when CUDA is
available, DALI's CPU pipeline otherwise. Step 4 runs in torch (:func:`patchify`). The
``pil`` backend runs the HF processor itself; it exists for environments without DALI and is chosen
explicitly (``backend="pil"``) or, with ``backend="auto"``, when DALI cannot be imported (logged as a warning).

**Parity with the HF processor** (measured with DALI 2.4 on CPU and Pillow 13 over scikit-image photos,
JPEG and PNG, from 20x30 to 3000x2000, pixel budgets from 28*28*64 to 28*28*16384; checked by
``tests/data/test_images.py``): ``image_grid_thw`` is identical. ``pixel_values`` differ by at most 2 grey
levels inside the image (one grey level is 1/255/std ~ 0.015 after normalisation) and by at most 7 levels
in the outermost 2 rows/columns, where the resize kernel overhangs the edge (PIL renormalises it, DALI
repeats the edge pixel; grows with the downscale factor); mean abs diff <= 3e-4. Pillow resizes one axis at
a time and rounds the intermediate image to uint8; the pipeline reproduces that with two DALI resizes that
each change one axis, in Pillow's order (:meth:`Resize.first_pass`). A single 2-D DALI resize keeps a float
intermediate and is off by up to 16 levels at sharp edges. 16-bit, CMYK, palette and EXIF-rotated inputs
are normalised first (step 1) and match like any plain image (``tests/data/test_decoding.py``). The GPU pipeline (nvJPEG, GPU resize) has not been compared yet. On CPU,
DALI's resize is slower than Pillow's (``docs/benchmarks.md``): the pipeline is built for the GPU.

**Once per prompt.** A call returns one :class:`PromptImages` per prompt; the ``n`` rollouts of a prompt
share it (``GenerationRequest(pixel_values=..., image_grid_thw=..., n=n)``): never decode or copy per rollout.
Typical use::

    preprocessor = QwenImagePreprocessor.from_pretrained(policy_hf_dir)  # settings of the policy's processor
    batch = preprocessor([dataset.image_bytes(i) for i in indices], return_errors=True)

**Corrupt images.** An image that does not decode (also a valid header with a truncated body) or that
Qwen's rule rejects (aspect ratio above 200) fails its prompt with :class:`ImageDecodeError` naming the
prompt and image positions; the batch's other prompts are unaffected. By default the call raises the
first such error; with ``return_errors=True`` the error takes the failed prompt's place in the result, so
a data loader can skip and count the sample (as ``corrupt_image``, like
:class:`~nemo_viper.data.shards.CorruptImageError`) without decoding the others again.

Memory: a call holds at most ``max_batch_size`` decoded images at a time (plus the results it returns);
DALI keeps its buffers, sized by the largest batch seen, between calls. Calls from several threads (e.g.
the prefetch threads of two prompt sources sharing a preprocessor) are serialised: a DALI pipeline runs one
batch at a time.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from nemo_viper.data.decoding import plain_bytes
from nemo_viper.data.image_config import BACKENDS, ImageProcessingConfig
from nemo_viper.errors import ConfigError, NemoViperError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def check_patches(pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None) -> None:
    """Images as the HF processor gives them: both tensors or neither, and ``image_grid_thw`` (``t, h, w``
    per image) describing exactly the rows of ``pixel_values``. One check for every datum that carries
    images (:class:`~nemo_viper.models.batch.PolicyBatch`,
    :class:`~nemo_viper.rollout.interface.GenerationRequest`)."""
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    if image_grid_thw is not None:
        patches = int(image_grid_thw.prod(dim=-1).sum())
        if patches != pixel_values.shape[0]:
            raise ValueError(f"image_grid_thw describes {patches} patches but pixel_values has {pixel_values.shape[0]} rows")


@dataclass(frozen=True)
class PromptImages:
    """One prompt's images as the HF processor returns them for that prompt, in order.

    ``pixel_values``: float32 ``[sum of t*h*w, 3*T*P*P]``; ``image_grid_thw``: int64 ``[images, 3]``.
    Both live on the preprocessor's device and are shared by all rollouts of the prompt; ``pixel_values``
    may be a view of a tensor shared with other prompts of the same call (never of DALI's buffers).
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


class Resize(NamedTuple):
    """An image's ``(height, width)`` and its size after Qwen's rule, ``(new_height, new_width)``."""

    height: int
    width: int
    new_height: int
    new_width: int

    def first_pass(self) -> tuple[int, int]:
        """``(height, width)`` after PIL's first one-axis pass.

        Pillow 13 resizes vertically first when the height shrinks by more than twice as many pixels as
        the width (python-pillow/Pillow#9549), horizontally first otherwise. The order differs between
        Pillow versions; ``tests/data/test_images.py`` checks it against the installed one (13.0.0 is pinned).
        """
        shrink = self.height - self.new_height
        if shrink > 0 and shrink > 2 * (self.width - self.new_width):
            return self.new_height, self.width
        return self.height, self.new_width


class ImageDecodeError(NemoViperError):
    """Image ``image`` of prompt ``prompt`` (positions in the call) does not decode or cannot be resized."""

    def __init__(self, prompt: int, image: int, detail: str):
        self.prompt = prompt
        self.image = image
        self.detail = detail
        super().__init__(f"image {image} of prompt {prompt} cannot be preprocessed: {detail}")


def patchify(images: torch.Tensor, config: ImageProcessingConfig) -> torch.Tensor:
    """Normalised images ``[B, H, W, 3]`` (sides multiples of ``patch_size * merge_size``) ->
    ``[B, (H/P)*(W/P), 3*T*P*P]`` in the HF processor's order.

    Rows run over merge windows (row-major), then the ``merge_size**2`` patches inside a window;
    a row holds channel, then temporal copy, then the ``P x P`` pixels. Always a new tensor (one copy, no
    loops), so ``images`` may be a view of a buffer that is reused afterwards.
    """
    b, height, width, channels = images.shape
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    gh, gw = height // p, width // p
    x = images.view(b, gh // m, m, p, gw // m, m, p, channels)
    x = x.permute(0, 1, 4, 2, 5, 7, 3, 6)  # b, h/m, w/m, m_h, m_w, c, p_h, p_w
    x = x.unsqueeze(-3).expand(*x.shape[:6], t, p, p)  # the image repeated temporal_patch_size times
    patches = images.new_empty(b, gh * gw, channels * t * p * p)
    patches.view(x.shape).copy_(x)
    return patches


class QwenImagePreprocessor:
    """Encoded images of prompts -> one :class:`PromptImages` per prompt (see the module docstring).

    ``backend``: ``"dali"``, ``"pil"`` (the HF processor) or ``"auto"`` (DALI if importable, else PIL with a
    warning). ``device`` (DALI only): ``"cuda"`` (mixed decoder, GPU ops, outputs on the current CUDA
    device), ``"cpu"`` (CPU pipeline) or ``"auto"`` (CUDA when available). The DALI pipeline processes up to
    ``max_batch_size`` images per run with ``num_threads`` CPU threads (default: the usable cores, at most 4).
    """

    def __init__(
        self,
        config: ImageProcessingConfig = ImageProcessingConfig(),
        backend: str = "auto",
        *,
        device: str = "auto",
        max_batch_size: int = 16,
        num_threads: int | None = None,
    ):
        if device not in DEVICES:
            raise ConfigError(f"image device={device!r}, expected one of {DEVICES}")
        if max_batch_size < 1:
            raise ConfigError(f"image max_batch_size={max_batch_size} must be >= 1")
        self.config = config
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()
        self.backend = resolve_backend(backend)
        if self.backend == "pil":
            self.device = torch.device("cpu")
            self._engine = _PilBackend(config)
        else:
            if device == "cuda" and not torch.cuda.is_available():
                raise ConfigError("image device='cuda' but CUDA is not available")
            use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
            self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
            threads = num_threads or min(4, len(os.sched_getaffinity(0)))
            self._engine = _DaliBackend(config, max_batch_size, threads, self.device)

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path, backend: str = "auto", **kwargs) -> "QwenImagePreprocessor":
        """A preprocessor with the image processor settings of the HF checkpoint in ``hf_dir``."""
        return cls(ImageProcessingConfig.from_pretrained(hf_dir), backend, **kwargs)

    def __call__(
        self, prompts: Sequence[Sequence[bytes]], *, return_errors: bool = False
    ) -> list[PromptImages | ImageDecodeError]:
        """One :class:`PromptImages` per prompt (each prompt: its encoded images, at least one).

        A prompt with an image that cannot be preprocessed gets an :class:`ImageDecodeError` (its first
        bad image); the call raises it unless ``return_errors``, which puts it in the prompt's place.
        """
        for i, images in enumerate(prompts):
            if isinstance(images, (bytes, bytearray, memoryview)):
                raise TypeError(f"prompt {i} must be a sequence of encoded images, not the bytes of one image")
            if not images:
                raise ValueError(f"prompt {i} has no images")
        with self._lock:
            processed = iter(self._process([data for images in prompts for data in images]))
        results: list[PromptImages | ImageDecodeError] = []
        for i, images in enumerate(prompts):
            mine = [next(processed) for _ in images]
            failed = [ImageDecodeError(i, j, out) for j, out in enumerate(mine) if isinstance(out, str)]
            if failed and not return_errors:
                raise failed[0]
            if failed:
                results.append(failed[0])
                continue
            patches = [out[0] for out in mine]
            results.append(
                PromptImages(
                    pixel_values=patches[0] if len(patches) == 1 else torch.cat(patches),
                    image_grid_thw=torch.tensor([out[1] for out in mine], dtype=torch.int64, device=self.device),
                )
            )
        return results

    def _process(self, encoded: list[bytes]) -> list[tuple[torch.Tensor, tuple[int, int, int]] | str]:
        """Per image its patches and ``(t, h, w)`` grid, or why it cannot be preprocessed."""
        processed: list[tuple[torch.Tensor, tuple[int, int, int]] | str] = [""] * len(encoded)
        todo: list[tuple[int, Resize]] = []
        encoded = list(encoded)
        for k, data in enumerate(encoded):
            try:
                encoded[k], height, width = _plain_with_size(data)
                todo.append((k, Resize(height, width, *self.config.resized_size(height, width))))
            except ValueError as e:  # an unreadable image or an aspect ratio Qwen's rule rejects
                processed[k] = str(e)
        p = self.config.patch_size
        for start in range(0, len(todo), self.max_batch_size):
            chunk = todo[start : start + self.max_batch_size]
            outputs = self._engine([encoded[k] for k, _ in chunk], [resize for _, resize in chunk])
            for (k, resize), out in zip(chunk, outputs):
                grid = (1, resize.new_height // p, resize.new_width // p)
                processed[k] = out if isinstance(out, str) else (out, grid)
        return processed


def resolve_backend(backend: str) -> str:
    """``"dali"`` or ``"pil"`` for a requested backend (see :class:`QwenImagePreprocessor`); ``"auto"``
    falls back to PIL with a warning, ``"dali"`` without DALI is a :class:`ConfigError`."""
    if backend not in BACKENDS:
        raise ConfigError(f"image backend={backend!r}, expected one of {BACKENDS}")
    if backend == "auto":
        backend = "dali" if dali_importable() else "pil"
        if backend == "pil":
            log.warning("NVIDIA DALI is not importable: images are preprocessed with the (slower) PIL processor")
    if backend == "dali" and not dali_importable():
        raise ConfigError("image backend='dali' but NVIDIA DALI is not importable (install nvidia-dali-cuda120)")
    return backend


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _plain_with_size(data: bytes) -> tuple[bytes, int, int]:
    """``(bytes, height, width)``: ``data``, or the PNG that :func:`~nemo_viper.data.decoding.plain_bytes` makes
    of a non-plain image, and the size of the image they decode to."""
    try:
        data = plain_bytes(data)
        with Image.open(io.BytesIO(data)) as image:
            return data, image.height, image.width
    except Image.UnidentifiedImageError:
        raise ValueError("unknown image format or damaged header") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable image: {e}") from e


class _DaliBackend:
    """Steps 1-3 in one DALI pipeline, step 4 (:func:`patchify`) in torch.

    Called with encoded images and their :class:`Resize`; returns per image its patches or,
    for an image the decoder rejects, the decoder's message.
    """

    def __init__(self, config: ImageProcessingConfig, max_batch_size: int, num_threads: int, device: torch.device):
        self.config = config
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.device = device
        self._pipeline = self._build()

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        scale = 1 / self.config.rescale_factor  # normalise uint8 directly: (x*r - mean)/std = (x - mean/r)/(std/r)

        @pipeline_def(
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self.device.index if gpu else None,
            prefetch_queue_depth=1,
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            first_size = fn.external_source(name="first_size", dtype=types.FLOAT, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            images = fn.decoders.image(
                encoded, device="mixed" if gpu else "cpu", output_type=types.RGB, adjust_orientation=False
            )
            # PIL resizes one axis at a time and rounds the intermediate image to uint8; two resizes, each
            # changing one axis in PIL's order, reproduce that (one 2-D DALI resize keeps a float intermediate).
            images = fn.resize(images, size=first_size, interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.resize(images, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(
                images,
                dtype=types.FLOAT,
                output_layout="HWC",
                mean=[m * scale for m in self.config.image_mean],
                std=[s * scale for s in self.config.image_std],
            )

        built = pipeline()
        built.build()
        return built

    def __call__(self, batch: list[bytes], resizes: list[Resize]) -> list[torch.Tensor | str]:
        try:
            return self._run(batch, resizes)
        except RuntimeError as e:
            if _decode_error_detail(e) is None:
                raise
            self._pipeline = self._build()  # DALI declares a pipeline invalid after an operator error
        outputs: list[torch.Tensor | str] = []
        for data, resize in zip(batch, resizes):  # find the culprits, one image per run
            try:
                outputs += self._run([data], [resize])
            except RuntimeError as e:
                detail = _decode_error_detail(e)
                if detail is None:
                    raise
                outputs.append(detail)
                self._pipeline = self._build()
        return outputs

    def _run(self, batch: list[bytes], resizes: list[Resize]) -> list[torch.Tensor]:
        """Patches per image. Patchifying copies out of DALI's buffers: one :func:`patchify` call for the
        whole batch when DALI's output is one dense tensor (all images of one size), else one per image
        (stacking them first would cost an extra copy)."""
        (images,) = self._pipeline.run(
            encoded=[np.frombuffer(data, dtype=np.uint8) for data in batch],
            first_size=[np.array(r.first_pass(), dtype=np.float32) for r in resizes],
            size=[np.array((r.new_height, r.new_width), dtype=np.float32) for r in resizes],
        )
        if images.is_dense_tensor():
            patches = list(patchify(torch.from_dlpack(images.as_tensor()), self.config))
        else:
            patches = [patchify(torch.from_dlpack(images[i])[None], self.config)[0] for i in range(len(batch))]
        if self.device.type == "cuda":  # the copies must finish before the next run reuses DALI's buffers
            torch.cuda.current_stream(self.device).synchronize()
        return patches


class _PilBackend:
    """The HF processor itself (``Qwen2VLImageProcessorPil``) on PIL-decoded images; same contract as DALI's."""

    def __init__(self, config: ImageProcessingConfig):
        self.processor = config.hf_processor()

    def __call__(self, batch: list[bytes], resizes: list[Resize]) -> list[torch.Tensor | str]:
        del resizes  # the HF processor applies the same resize rule itself
        decoded: dict[int, Image.Image] = {}
        errors: dict[int, str] = {}
        for i, data in enumerate(batch):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    decoded[i] = image.convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                errors[i] = f"PIL cannot decode it: {e}"
        patches: dict[int, torch.Tensor] = {}
        if decoded:
            features = self.processor(list(decoded.values()), return_tensors="pt")
            rows = features["image_grid_thw"].prod(dim=-1).tolist()
            patches = dict(zip(decoded, features["pixel_values"].split(rows)))
        return [patches[i] if i in patches else errors[i] for i in range(len(batch))]


def _decode_error_detail(error: RuntimeError) -> str | None:
    """The decoder's message if ``error`` is DALI's report of an image it failed to decode, else ``None``."""
    message = str(error)
    if "decoders.image" not in message:
        return None
    detail = message.split("encountered:", 1)[-1].split("Current pipeline object", 1)[0]
    detail = re.sub(r"Failed to decode sample #\d+ :?", "", " ".join(detail.split())).strip()
    return f"damaged or unsupported image data (DALI's decoder failed{': ' + detail if detail else ''})"
