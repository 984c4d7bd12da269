"""The failed-edit filter of stage 2: the fraction of changed pixels must lie in a band.

An edit that changed (almost) nothing teaches nothing, and one that changed most of the image is not a
local operation any more (the editor redrew the scene). The fraction is measured after aligning the
edit to the original's size, per pixel: changed when some channel moved by more than a threshold.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

EDIT_UNCHANGED = "edit_unchanged"
EDIT_REPLACED = "edit_replaced_image"


def align(edited: Image.Image, original: Image.Image) -> Image.Image:
    """``edited`` as RGB at the original's size (editors may snap sizes to their own grid)."""
    edited = edited.convert("RGB")
    return edited if edited.size == original.size else edited.resize(original.size, Image.BICUBIC)


def changed_fraction(original: Image.Image, edited: Image.Image, threshold: int) -> float:
    """Share of pixels where ``max_channel |original - edited| > threshold`` (0-255), after :func:`align`."""
    a = np.asarray(original.convert("RGB"), dtype=np.int16)
    b = np.asarray(align(edited, original), dtype=np.int16)
    return float((np.abs(a - b).max(axis=2) > threshold).mean())


def edit_rejection(fraction: float, low: float, high: float) -> str | None:
    """``None`` if ``low <= fraction <= high``, else why the edit is rejected."""
    if fraction < low:
        return EDIT_UNCHANGED
    if fraction > high:
        return EDIT_REPLACED
    return None
