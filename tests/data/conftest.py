"""Small real-photo datasets for the data-format tests (scikit-image photos, downscaled to <= 64 px)."""

import pytest
import skimage.data
from PIL import Image, ImageOps

from nemo_viper.data import CaptionRefineRecord, ShardWriter, VisualOpRecord

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "colorwheel", "logo")


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Name -> image; sizes and aspect ratios differ, ``camera`` is greyscale and ``logo`` RGBA."""
    images = {}
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)())
        image.thumbnail((64, 64))
        images[name] = image
    return images


def caption_record(i: int, source: str) -> CaptionRefineRecord:
    return CaptionRefineRecord(
        id=f"cap-{i}",
        images=["placeholder"],
        initial_caption=f"A photo of {source}.",
        refinements=[f"The {source} photo has detail {j}." for j in range(1 + i % 3)],
        refined_caption=f"A detailed photo of {source}.",
        source=f"skimage:{source}",
        synth_ckpt="ckpt_0",
    )


def visual_op_record(i: int, source: str) -> VisualOpRecord:
    return VisualOpRecord(
        id=f"op-{i}",
        images=["original", "edited"],
        operations=["Mirror the whole scene horizontally."],
        hard_entities=[source],
        source_caption=f"A detailed photo of {source}.",
        edit_pipeline="PIL.ImageOps.mirror",
        synth_ckpt="ckpt_a",
    )


@pytest.fixture
def make_caption_record():
    """``(i, photo name) -> CaptionRefineRecord`` with id ``cap-<i>`` and 1-3 refinements."""
    return caption_record


@pytest.fixture
def caption_dataset(tmp_path, photos):
    """Writes one caption_refine sample per photo (4 per shard); returns ``(dir, stored records, images)``."""

    def write(samples_per_shard: int = 4, extra: dict | None = None):
        writer = ShardWriter(tmp_path / "stage1", "stage1", samples_per_shard, task="caption_refine")
        stored, images = [], []
        for i, (name, image) in enumerate(photos.items()):
            stored.append(writer.write(caption_record(i, name), [image], recon_image=ImageOps.flip(image)))
            images.append(image.convert("RGB"))
        writer.finalize(extra)
        return tmp_path / "stage1", stored, images

    return write


@pytest.fixture
def visual_op_dataset(tmp_path, photos):
    """One visual_op sample per photo: the original and its mirror image; returns ``(dir, records, pairs)``."""
    writer = ShardWriter(tmp_path / "stage2", "stage2", 3, task="visual_op")
    stored, pairs = [], []
    for i, (name, image) in enumerate(photos.items()):
        pair = [image.convert("RGB"), ImageOps.mirror(image.convert("RGB"))]
        stored.append(writer.write(visual_op_record(i, name), pair))
        pairs.append(pair)
    writer.finalize({"source_checkpoint": "ckpt_a"})
    return tmp_path / "stage2", stored, pairs
