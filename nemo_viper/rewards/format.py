"""Format check and answer extraction for policy responses.

The policy is asked to reply as::

    <think> reasoning </think> <answer> one item per line </answer>

Rules implemented by :func:`parse_response`:

Responses are read as a sequence of blocks: ``<think>`` opens a think block that only ``</think>`` closes,
``<answer>`` an answer block that only ``</answer>`` closes; any tag *inside* an open block is text (a
response may mention ``<answer>`` in its reasoning). Tags are matched exactly (lower case, no attributes).

* ``format_ok`` is true iff the response is exactly one think block followed by exactly one answer block,
  both with non-blank content, with only whitespace before, between and after them (a stray tag outside
  the blocks is text there, so it breaks the layout).
* ``truncated`` is true when the caller says so (e.g. the sampler's ``finish_reason == "length"``) or
  when the text ends inside an open block. A truncated response has ``format_ok = False`` and
  ``answer = None``: both reward parts are 0.
* ``answer`` is the stripped text of the answer block when there is exactly one, **even when
  ``format_ok`` is false** (a missing or broken think block, stray text): such a response loses only the
  format part of the reward, its answer is still scored. With no answer block, or more than one,
  ``answer`` is ``None`` (several answers would let a policy hedge). An empty block gives ``answer = ""``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_TAG = re.compile(r"</?(?:think|answer)>")
_CLOSES = {THINK_OPEN: THINK_CLOSE, ANSWER_OPEN: ANSWER_CLOSE}


@dataclass(frozen=True)
class ParsedResponse:
    """What the reward needs to know about one response.

    Attributes:
        format_ok: the response has exactly the ``<think>…</think><answer>…</answer>`` layout.
        answer: the stripped text of the single answer block, ``None`` if there is no usable block (none,
            several, or a truncated response).
        truncated: the response was cut off (flagged by the caller, or it ends inside an open block).
    """

    format_ok: bool
    answer: str | None
    truncated: bool


def parse_response(text: str, truncated: bool = False) -> ParsedResponse:
    """Apply the format rules in the module docstring to one response.

    Args:
        text: the decoded response (no prompt).
        truncated: the caller knows the response was cut off (e.g. it hit the length limit).
    """
    blocks, outside, open_block = _blocks(text)
    if truncated or open_block:
        return ParsedResponse(format_ok=False, answer=None, truncated=True)
    answers = [content for tag, content in blocks if tag == ANSWER_OPEN]
    answer = answers[0].strip() if len(answers) == 1 else None
    layout = [tag for tag, _ in blocks] == [THINK_OPEN, ANSWER_OPEN]
    format_ok = layout and not outside.strip() and all(content.strip() for _, content in blocks)
    return ParsedResponse(format_ok=format_ok, answer=answer, truncated=False)


def _blocks(text: str) -> tuple[list[tuple[str, str]], str, bool]:
    """``([(opening tag, content), ...], text outside the blocks, ends inside an open block)``."""
    blocks, outside, position, opened = [], [], 0, None
    for match in _TAG.finditer(text):
        tag = match.group()
        if opened is None and tag in _CLOSES:
            outside.append(text[position : match.start()])
            opened, position = (tag, match.end()), match.end()
        elif opened is not None and tag == _CLOSES[opened[0]]:
            blocks.append((opened[0], text[position : match.start()]))
            opened, position = None, match.end()
        elif opened is None:  # a stray closing tag outside any block: text that breaks the layout
            outside.append(text[position : match.end()])
            position = match.end()
    if opened is None:
        outside.append(text[position:])
    return blocks, "".join(outside), opened is not None
