"""The changed-pixel band of stage 2, the edit input size and the hard-entity rules."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from nemo_viper.synthesis.entities import caption_candidates, head_word, select_hard_entities
from nemo_viper.synthesis.filters import EDIT_REPLACED, EDIT_UNCHANGED, changed_fraction, edit_rejection
from nemo_viper.synthesis.inputs import list_inputs
from nemo_viper.synthesis.stage2 import edit_input

BAND = (0.002, 0.40)


@pytest.fixture(scope="module")
def photo():
    item = next(i for i in list_inputs("skimage") if i.source == "skimage:chelsea")
    image = Image.open(io.BytesIO(item.read())).convert("RGB")
    return image.resize((96, 64))


def test_an_edit_that_changed_nothing_is_rejected(photo):
    fraction = changed_fraction(photo, photo.copy(), threshold=32)
    assert fraction == 0.0 and edit_rejection(fraction, *BAND) == EDIT_UNCHANGED
    # JPEG re-encoding noise alone is not a change either.
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    recoded = Image.open(buffer)
    assert edit_rejection(changed_fraction(photo, recoded, threshold=32), *BAND) == EDIT_UNCHANGED


def test_an_edit_that_replaced_the_whole_image_is_rejected(photo):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3)).astype(np.uint8))
    assert edit_rejection(changed_fraction(photo, noise, threshold=32), *BAND) == EDIT_REPLACED
    other = next(i for i in list_inputs("skimage") if i.source == "skimage:coffee")
    redrawn = Image.open(io.BytesIO(other.read())).convert("RGB")  # another scene, at another size
    assert edit_rejection(changed_fraction(photo, redrawn, threshold=32), *BAND) == EDIT_REPLACED


def test_a_local_edit_passes_also_when_the_editor_changed_the_size(photo):
    edited = photo.copy()
    ImageDraw.Draw(edited).rectangle((10, 10, 29, 29), fill=(0, 255, 0))  # 400 of 6144 pixels
    fraction = changed_fraction(photo, edited, threshold=32)
    assert 0.05 < fraction < 0.08 and edit_rejection(fraction, *BAND) is None
    upscaled = edited.resize((192, 128), Image.BICUBIC)  # an editor working at twice the size
    assert abs(changed_fraction(photo, upscaled, threshold=32) - fraction) < 0.02


@pytest.mark.parametrize("size,pixels,expected", [((600, 400), 64 * 64, (80, 48)), ((600, 400), None, (608, 400)),
                                                  ((1000, 10), 64 * 64, (640, 16))])
def test_edit_input_sizes_are_multiples_of_16(size, pixels, expected):
    assert edit_input(Image.new("RGB", size), pixels).size == expected


def test_head_words():
    assert head_word("red umbrella on the left") == "umbrella"
    assert head_word("sign that reads OPEN") == "sign"
    assert head_word("two cats") == "cats"
    assert head_word("left door") == "door"


def test_hard_entities_follow_the_rules():
    caption = ('A wooden table stands in a room. A cup sits on the table. A sign on the wall reads "OPEN". '
               "Two cats sleep next to the window. There is a lamp.")
    refinements = ["The cup is blue, not red."]
    candidates = ["lamp", "wooden table", "cats", "sign on the wall", "cup", "dragon", "cup on the table"]
    # Scores: cup 5 (in a refinement +4, colour +1), sign 2 (text), cats 2 (count +1, "next to" +1; ties go
    # to the earlier mention), wooden table 1 (material), lamp 0 (not hard); dragon is not in the caption
    # (ungrounded); "cup on the table" has the same head word as cup.
    assert select_hard_entities(candidates, caption, refinements, max_entities=3) == ["cup", "sign on the wall", "cats"]
    assert select_hard_entities(candidates, caption, refinements, max_entities=1) == ["cup"]
    assert select_hard_entities(["lamp", "dragon"], caption, refinements, max_entities=3) == []


def test_caption_candidates_by_the_determiner_rule():
    caption = ('A small red cup stands on the left of a wooden table. The sign reads "OPEN". Two black cats sleep '
               "in the background, and there is a lamp.")
    assert caption_candidates(caption) == ["small red cup", "wooden table", "sign", "black cats", "lamp"]
    assert caption_candidates("An astronaut holds a small American flag.") == ["astronaut", "small american"]  # a limit
    assert caption_candidates("#tre#tre <|x|>") == []
