"""Prompts, versioned. The RL task prompts are here; synthesis prompts join this module.

The policy sees, for ``caption_refine``, one image and its own initial caption and must list the
caption's errors and omissions; for ``visual_op``, the original and the edited image (in that order) and
must list the edit operations. Answers use ``<think>…</think><answer>…</answer>`` with one item per line
inside ``<answer>``, phrased like the ground truth (short sentences / imperative operations), which is
what the sentence-level reward compares.
"""

from __future__ import annotations

PROMPT_VERSION = "viper-rl/1"

ANSWER_FORMAT = (
    "First think step by step inside <think></think>. Then give your list inside <answer></answer>, "
    "one item per line."
)

CAPTION_REFINE_TASK = (
    "Here is a description of this image:\n\"{caption}\"\n"
    "Examine the image closely and find what the description gets wrong or leaves out: attributes of "
    "objects (colour, material, size, pattern), text in the image, counts, spatial relations and missing "
    "objects. Write each correction as one short sentence that states what the image actually shows. "
    + ANSWER_FORMAT
)

VISUAL_OP_TASK = (
    "The second image was made by editing the first image. Compare the two images carefully and list "
    "every edit that was applied, each as one imperative sentence (for example: Change the color of the "
    "car from red to blue.). " + ANSWER_FORMAT
)


def caption_refine_messages(initial_caption: str) -> list[dict]:
    """Chat messages of the stage-1 task: one image, then the task with the caption to correct."""
    text = CAPTION_REFINE_TASK.format(caption=initial_caption.strip())
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def visual_op_messages() -> list[dict]:
    """Chat messages of the stage-2 task: the original image, the edited image, then the task."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": VISUAL_OP_TASK}]}]


# ---------------------------------------------------------------------------------------------------------
# Synthesis prompts: what the policy is asked while it makes its own training data. Their
# parsers are in :mod:`nemo_viper.synthesis.parsers`. The correction and operation lists are asked for in
# the same style as the RL answers' items (one short sentence / imperative per line), since they become
# the ground truth those answers are compared with.
# ---------------------------------------------------------------------------------------------------------

SYNTH_PROMPT_VERSION = "viper-synth/1"

CAPTION_PROMPT = (
    "Describe this image in detail. Mention every visible object with its colour, material, size and "
    "pattern, any text exactly as it is written, how many there are of each kind of thing, and where things "
    "are relative to each other. Describe only what is visible, as one paragraph of plain sentences."
)

CRITIQUE_PROMPT = (
    "The first image is a photo. The second image was drawn by a text-to-image model from this description "
    "of the photo:\n\"{caption}\"\n"
    "Where the drawing differs from the photo, the description may be wrong or incomplete. Compare the "
    "description with the FIRST image and find its mistakes and omissions: attributes of objects (colour, "
    "material, size, pattern), text in the image, counts, spatial relations and missing objects. Ignore "
    "flaws of the drawing that the description does not cause. Write each correction as one short sentence "
    "that states what the first image actually shows, one per line, and nothing else. If the description "
    "has no mistakes, write: None"
)

REWRITE_PROMPT = (
    "Here is a description of an image:\n\"{caption}\"\n"
    "These corrections are true for the image:\n{corrections}\n"
    "Rewrite the description so that it agrees with every correction and keeps everything else it says. "
    "Write only the new description, as one paragraph."
)

ENTITY_PROMPT = (
    "Here is a description of an image:\n\"{caption}\"\n"
    "List the objects this description mentions, one per line, each as a short noun phrase with the "
    "attributes the description gives it (for example: red umbrella on the left). Write nothing else."
)

EDIT_OPERATION_TYPES = (
    "change an attribute of an object (colour, material, pattern or size)",
    "replace an object with another object",
    "add an object",
    "remove an object",
    "change how many there are of something",
    "change the text written on something",
    "change the position of an object or its relation to another object",
)

OPERATION_PROMPT = (
    "Here is an image and a description of it:\n\"{caption}\"\n"
    "Write {count} edit instruction(s) for this image, one per line, each about one of these objects: "
    "{entities}. Each instruction is one imperative sentence of one of these kinds: {operation_types}. "
    "Keep every edit small and local, and name the object and what it looks like now (for example: Change "
    "the color of the umbrella on the left from red to blue.). Write nothing else."
)

VERIFY_PROMPT = (
    "The second image was made by editing the first image. Was this edit applied: \"{operation}\"? "
    "Answer yes or no."
)


def _image_chat(num_images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


def caption_messages() -> list[dict]:
    """Stage 1, step 1: one image -> a detailed caption ``C_g``."""
    return _image_chat(1, CAPTION_PROMPT)


def critique_messages(caption: str) -> list[dict]:
    """Stage 1, step 3: the original, then the redraw, and the caption -> one correction per line."""
    return _image_chat(2, CRITIQUE_PROMPT.format(caption=caption.strip()))


def rewrite_messages(caption: str, corrections: list[str]) -> list[dict]:
    """Stage 1, step 5 (text only): the caption and its corrections -> the refined caption ``C_ref``."""
    listed = "\n".join(f"- {c}" for c in corrections)
    return _image_chat(0, REWRITE_PROMPT.format(caption=caption.strip(), corrections=listed))


def entity_messages(refined_caption: str) -> list[dict]:
    """Stage 2, step 1 (text only): the refined caption -> the objects it mentions, one noun phrase per line."""
    return _image_chat(0, ENTITY_PROMPT.format(caption=refined_caption.strip()))


def operation_messages(refined_caption: str, entities: list[str]) -> list[dict]:
    """Stage 2, step 2: the image, its refined caption and the hard entities -> one edit instruction per entity."""
    text = OPERATION_PROMPT.format(
        caption=refined_caption.strip(),
        count=len(entities),
        entities="; ".join(entities),
        operation_types="; ".join(EDIT_OPERATION_TYPES),
    )
    return _image_chat(1, text)


def verify_messages(operation: str) -> list[dict]:
    """Stage 2, optional check: the original and the edited image -> was ``operation`` applied (yes/no)."""
    return _image_chat(2, VERIFY_PROMPT.format(operation=operation.strip()))
