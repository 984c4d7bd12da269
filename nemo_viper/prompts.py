"""Prompts, versioned (SPEC §5). The RL task prompts are here; synthesis prompts join this module.

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


def task_prompt(record, images: list):
    """The RL prompt of a synthesised record (``caption_refine`` or ``visual_op``) with its decoded images."""
    from nemo_viper.data.records import CaptionRefineRecord, ground_truth
    from nemo_viper.training.loop import TaskPrompt

    if isinstance(record, CaptionRefineRecord):
        messages = caption_refine_messages(record.initial_caption)
    else:
        messages = visual_op_messages()
    return TaskPrompt(sample_id=record.id, messages=messages, images=list(images), ground_truth=ground_truth(record))
