"""The image processor settings of a Qwen2.5-VL checkpoint and the preprocessing backends
(:mod:`nemo_viper.data.images`), torch-free: the launcher validates a run config with them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nemo_viper.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported where it is used: config checks stay light (no transformers)
    from transformers import Qwen2VLImageProcessorPil

BACKENDS = ("auto", "dali", "pil")


@dataclass(frozen=True)
class ImageProcessingConfig:
    """The image processor settings of a Qwen2.5-VL checkpoint (defaults: the HF processor's)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"image processor {name}={getattr(self, name)} must be >= 1")
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"image processor min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError(
                f"image_mean={self.image_mean} / image_std={self.image_std} must be 3 values each, std > 0"
            )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after Qwen's resize rule; ``ValueError`` for an aspect ratio above 200."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    @classmethod
    def from_hf(cls, processor: Qwen2VLImageProcessorPil) -> "ImageProcessingConfig":
        """The settings of an HF Qwen2-VL image processor; ``ConfigError`` if it deviates from Qwen's pipeline
        (resizing, rescaling, normalising and RGB conversion on, bicubic resampling), which is all this
        module implements."""
        from transformers.image_utils import PILImageResampling

        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not getattr(processor, flag):
                raise ConfigError(f"image processor {flag}=False is not supported (Qwen2.5-VL preprocessing sets it)")
        if processor.resample != PILImageResampling.BICUBIC:
            raise ConfigError(f"image processor resample={processor.resample!r} is not supported, only bicubic (3)")
        return cls(
            min_pixels=processor.size.shortest_edge,
            max_pixels=processor.size.longest_edge,
            patch_size=processor.patch_size,
            merge_size=processor.merge_size,
            temporal_patch_size=processor.temporal_patch_size,
            rescale_factor=processor.rescale_factor,
            image_mean=tuple(processor.image_mean),
            image_std=tuple(processor.image_std),
        )

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path) -> "ImageProcessingConfig":
        """Read ``preprocessor_config.json`` (or the ``image_processor`` part of ``processor_config.json``)."""
        from transformers import Qwen2VLImageProcessorPil

        return cls.from_hf(Qwen2VLImageProcessorPil.from_pretrained(str(hf_dir)))

    def hf_processor(self) -> Qwen2VLImageProcessorPil:
        """The HF PIL image processor with these settings (the reference, and the ``pil`` backend)."""
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=self.temporal_patch_size,
            rescale_factor=self.rescale_factor,
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )
