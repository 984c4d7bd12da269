"""One decoding rule for every image path: encoded bytes -> the RGB image, 8 bits per channel.

The same bytes must mean the same pixels at synthesis (captioned and stored), in the DALI preprocessor
and in the PIL backend at training. Decoders disagree on anything but plain images, so the rule is:

1. EXIF orientation is applied (the image as viewers show it; DALI's decoder default, ignored by PIL);
2. 16-bit samples keep their high byte (``v >> 8``; within one level of the exact ``v / 257``): PIL's
   reading of 16-bit RGB PNGs, applied to 16-bit greyscale too, which PIL's ``convert("RGB")`` clips to
   white (a 16-bit photo became mean 254.999);
3. CMYK, palette, greyscale+alpha and RGBA become RGB as PIL's ``convert("RGB")`` makes them (alpha is
   dropped, palette entries looked up).

*Plain* images, 8-bit RGB or greyscale PNG/JPEG without an EXIF rotation, decode to the same pixels in
every decoder (DALI's, PIL's): :func:`plain_bytes` passes them through and re-encodes anything else as a
PNG of :func:`decode_rgb`'s result. Synthesis stores only plain bytes, and the training preprocessor
normalises its input the same way, so a sample shows the same pixels on every path.

A pixel budget (:func:`fit_pixels`) bounds what synthesis captions and stores: an image above it is
downscaled, aspect ratio kept, to ``floor(w * s) x floor(h * s)`` with ``s = sqrt(max_pixels / (w * h))``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def is_plain(image: Image.Image) -> bool:
    """An opened (not necessarily loaded) image that every decoder decodes to the same 8-bit RGB pixels."""
    if image.format not in ("PNG", "JPEG") or image.mode not in ("RGB", "L"):
        return False
    if image.format == "PNG" and any(tile.args != image.mode for tile in image.tile):
        return False  # 16-bit RGB ("RGB;16B") or 1/2/4-bit greyscale
    return image.getexif().get(EXIF_ORIENTATION, 1) == 1


def budget_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """``(width, height)`` scaled by ``s = sqrt(max_pixels / (width * height))`` (aspect ratio kept, each
    side at least 1) when above ``max_pixels``; unchanged when within it or when ``max_pixels`` is None."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(1, int(width * scale)), max(1, int(height * scale))


def fit_pixels(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """``image`` downscaled (bicubic, aspect ratio kept) to :func:`budget_size`; the same image if it fits."""
    size = budget_size(image.width, image.height, max_pixels)
    return image if size == image.size else image.resize(size, Image.BICUBIC)


def to_rgb8(image: Image.Image) -> Image.Image:
    """An opened image under the rule of the module docstring (loads it)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        high_byte = np.right_shift(np.clip(np.asarray(image, dtype=np.int64), 0, 65535), 8).astype(np.uint8)
        return Image.fromarray(high_byte, "L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image bytes -> RGB, 8 bits per channel, under the rule. Raises what PIL raises for bytes
    that do not decode (``OSError``, ``SyntaxError``, ``ValueError``, ``Image.DecompressionBombError``)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb8(image)


def plain_bytes(data: bytes) -> bytes:
    """``data`` if it is a plain image, else the PNG of :func:`decode_rgb` (same errors)."""
    with Image.open(io.BytesIO(data)) as image:
        if is_plain(image):
            return data
        image.load()
        buffer = io.BytesIO()
        to_rgb8(image).save(buffer, format="PNG")
    return buffer.getvalue()
