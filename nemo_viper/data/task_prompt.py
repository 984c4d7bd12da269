"""The RL loop's prompt datum, :class:`TaskPrompt`, and how a synthesised record becomes one.

Prompt sources (:class:`~nemo_viper.data.prompt_source.ShardPromptSource`, a test's toy source) build them,
the RL loop (:mod:`nemo_viper.training.loop`) consumes them; the prompt texts are :mod:`nemo_viper.prompts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemo_viper.data.records import CaptionRefineRecord, Record, ground_truth
from nemo_viper.prompts import caption_refine_messages, visual_op_messages


@dataclass
class TaskPrompt:
    """One RL prompt: chat messages (images as ``{"type": "image"}`` parts), its images, its ground truth.

    ``images``: PIL images, or the prompt's preprocessed :class:`~nemo_viper.data.images.PromptImages`
    (what :class:`~nemo_viper.data.prompt_source.ShardPromptSource` provides), shared by all its rollouts.
    """

    sample_id: str
    messages: list[dict]
    images: Any = field(default_factory=list)
    ground_truth: list[str] = field(default_factory=list)


def task_prompt(record: Record, images) -> TaskPrompt:
    """The RL prompt of a synthesised record (``caption_refine`` or ``visual_op``) with its images: PIL
    images or their preprocessed :class:`~nemo_viper.data.images.PromptImages`."""
    if isinstance(record, CaptionRefineRecord):
        messages = caption_refine_messages(record.initial_caption)
    else:
        messages = visual_op_messages()
    return TaskPrompt(sample_id=record.id, messages=messages, images=images, ground_truth=ground_truth(record))


def prompt_text(messages: list[dict]) -> str:
    """The text parts of a chat prompt (images shown as ``<image>``)."""
    parts = []
    for message in messages:
        content = message["content"]
        for part in [content] if isinstance(content, str) else content:
            parts.append(part if isinstance(part, str) else part.get("text", "<image>"))
    return "\n".join(parts)
