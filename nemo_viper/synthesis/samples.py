"""What a synthesis stage hands to the writer, and the per-sample seeds.

Every random choice of a sample (its redraw, its edit, a sampled VLM answer) draws from a seed that
depends only on the run's base seed, the sample id and the sub-step, never on batch composition, chunk
layout or worker, so a sample comes out the same however the job is split or resumed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image

from nemo_viper.data.records import Record


@dataclass(frozen=True)
class Sample:
    """One record with its images in record order (PIL, or PNG/JPEG bytes stored unchanged) and, for
    ``caption_refine``, the optional debug redraw."""

    record: Record
    images: tuple[Image.Image | bytes, ...]
    recon: Image.Image | None = None


def sample_seed(base_seed: int, sample_id: str, step: str) -> int:
    """A seed in ``[0, 2**62)`` from ``(base_seed, sample_id, step)``."""
    digest = hashlib.sha256(f"{base_seed}:{sample_id}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2
