"""Deterministic stand-ins for the synthesis models (tests only).

:class:`FakeVLMBackend` implements the rollout ``GenerationBackend`` protocol: it decodes each request's
prompt, recognises which synthesis prompt it is, and answers in the messy way real models do (numbered
lists with prose around them, bullets, labels). The answer depends only on the prompt text and the
image pixels, so it is the same whatever the batch. Per image (by a hash of its pixels) the caption is
one of :data:`CAPTIONS`; the one in Chinese is filtered as ``caption_wrong_language`` and the one about
an empty room gets the critique "None" (filtered as ``no_refinements``).

:class:`FakePainter` / :class:`FakeEditor` implement the diffusion protocols with PIL: a flat image per
prompt, and an edit that paints a rectangle over ~6 % of the image (``mode="local"``), returns the input
unchanged (``"identity"``) or returns unrelated noise (``"replace"``).
"""

import hashlib
import time

import numpy as np
from PIL import Image, ImageDraw

from nemo_viper.rollout import GenerationResponse

CAPTIONS = (
    'A red cup stands on the left of a wooden table. A sign in the background reads "OPEN".',
    "Two black cats sit on a grey sofa next to a window.",
    "一只红色的杯子放在木桌上。",
    "An empty room with white walls.",
)


CAPTION_SALT = b"856"
"""Salt of the per-image hash, chosen so that with ``conftest.PHOTOS`` the first two photos get the unusable
captions and the other four the usable ones (pick another if the photos change)."""


def _key(request) -> int:
    """A per-image number: the caption variant of this image, from the mean of its pixel values to one decimal
    (the photos' means lie >= 0.04 from a rounding edge; the PIL and torchvision processors differ by ~1e-4)."""
    if request.pixel_values is None:
        return 0
    mean = f"{request.pixel_values.float().mean().item():.1f}".encode()
    return hashlib.sha256(CAPTION_SALT + mean).digest()[0]


def answer(prompt: str, request) -> str:
    if "Describe this image in detail" in prompt:
        return CAPTIONS[_key(request) % len(CAPTIONS)]
    if "drawn by a text-to-image model" in prompt:
        if "empty room" in prompt:
            return "None"
        return ("Here are the corrections:\n1. The cup is blue, not red.\n2. **The sign reads \"CLOSED\".**\n"
                "3. The cup is blue, not red.\nI hope this helps!")
    if "Rewrite the description" in prompt:
        caption = prompt.split('"')[1] if '"' in prompt else "A scene."
        return "Description: " + caption.replace("red cup", "blue cup") + " The cup is blue."
    if "List the objects this description mentions" in prompt:
        return "- a blue cup on the left\n- the wooden table\n- sign in the background\n- a unicorn"
    if "edit instruction" in prompt:
        return ("1. Change the color of the cup from blue to green.\n2. Remove the sign in the background.\n"
                "3. The table is brown.\n4. Add a small plant next to the cup.")
    if "Was this edit applied" in prompt:
        return "No." if "Remove the sign" in prompt else "Yes, it was."
    return "I do not know."


class FakeVLMBackend:
    """``GenerationBackend`` with scripted answers; ``delay`` seconds per ``generate`` call; ``calls`` counts them."""

    def __init__(self, tokenizer, delay: float = 0.0):
        self.tokenizer = tokenizer
        self.delay = delay
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        time.sleep(self.delay)
        out = []
        for request in requests:
            prompt = self.tokenizer.decode(request.prompt_ids.tolist(), skip_special_tokens=True)
            text = answer(prompt, request)
            ids = self.tokenizer.encode(text)
            out.append([GenerationResponse(ids, text, [0.0] * len(ids), "eos") for _ in range(request.n)])
        return out


def _colour(*parts) -> tuple[int, int, int]:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return digest[0], digest[1], digest[2]


class FakePainter:
    name = "fake-painter"

    def __init__(self, size: int = 48):
        self.size = size
        self.prompts: list[str] = []

    def generate(self, prompts, seeds):
        self.prompts += list(prompts)
        return [Image.new("RGB", (self.size, self.size), _colour(p, s)) for p, s in zip(prompts, seeds)]


class FakeEditor:
    name = "fake-editor"

    def __init__(self, mode: str = "local"):
        self.mode = mode
        self.instructions: list[str] = []

    def edit(self, images, instructions, seeds):
        self.instructions += list(instructions)
        edited = []
        for image, seed in zip(images, seeds):
            if self.mode == "identity":
                edited.append(image.copy())
            elif self.mode == "replace":
                noise = np.random.default_rng(seed % 2**32).integers(0, 256, (image.height, image.width, 3))
                edited.append(Image.fromarray(noise.astype(np.uint8)))
            else:
                out = image.copy()
                w, h = image.size
                ImageDraw.Draw(out).rectangle((w // 4, h // 4, w // 4 + w // 4, h // 4 + h // 4), fill=_colour(seed))
                edited.append(out)
        return edited
