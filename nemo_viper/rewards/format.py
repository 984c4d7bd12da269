"""Format check and answer extraction for policy responses (SPEC §5–6).

The policy is asked to reply as::

    <think> reasoning </think> <answer> one item per line </answer>

Rules implemented by :func:`parse_response`:

* ``format_ok`` is true iff the whole response is exactly one ``<think>…</think>`` block followed by
  exactly one ``<answer>…</answer>`` block, both with non-blank content. Whitespace is allowed before,
  between and after the two blocks; any other text outside them, a missing tag, a repeated tag or the
  blocks in the wrong order gives ``format_ok = False``. Tags are matched exactly (lower case, no
  attributes).
* ``truncated`` is true when the caller says so (e.g. the sampler's ``finish_reason == "length"``) or
  when ``<think>`` or ``<answer>`` is opened more often than it is closed. A truncated response has
  ``format_ok = False`` and ``answer = None``: both reward parts are 0.
* ``answer`` is the stripped text inside the single closed ``<answer>`` block. It is extracted whenever
  the response is not truncated and holds exactly one ``<answer>`` and one ``</answer>`` (in that
  order), **even when ``format_ok`` is false** (a missing or broken ``<think>`` block, stray text):
  such a response loses only the format part of the reward, its answer is still scored. With no
  answer block, or more than one, ``answer`` is ``None`` (several answers would let a policy hedge).
  An empty block gives ``answer = ""``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_LAYOUT = re.compile(r"\A\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*\Z", re.DOTALL)


@dataclass(frozen=True)
class ParsedResponse:
    """What the reward needs to know about one response.

    Attributes:
        format_ok: the response has exactly the ``<think>…</think><answer>…</answer>`` layout.
        answer: the stripped text of the single closed ``<answer>`` block, ``None`` if there is no
            usable block (none, several, or a truncated response).
        truncated: the response was cut off (flagged by the caller, or an unclosed tag).
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
    unclosed = text.count(THINK_OPEN) > text.count(THINK_CLOSE) or text.count(ANSWER_OPEN) > text.count(
        ANSWER_CLOSE
    )
    if truncated or unclosed:
        return ParsedResponse(format_ok=False, answer=None, truncated=True)
    return ParsedResponse(format_ok=_has_layout(text), answer=_single_answer(text), truncated=False)


def _has_layout(text: str) -> bool:
    if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return False
    match = _LAYOUT.match(text)
    return match is not None and bool(match.group(1).strip()) and bool(match.group(2).strip())


def _single_answer(text: str) -> str | None:
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    start = text.index(ANSWER_OPEN) + len(ANSWER_OPEN)
    end = text.index(ANSWER_CLOSE)
    if end < start:
        return None
    return text[start:end].strip()
