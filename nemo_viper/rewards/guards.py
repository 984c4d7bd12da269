"""Cheap contradiction guard for sentence pairs that an embedding calls similar (``RewardConfig.contradiction_guard``).

Sentence embeddings place a statement and its reversal close together: measured with the packaged MiniLM,
"Replace the dog with a cat." vs "Replace the cat with a dog." is 0.94, "Change the car from red to blue."
vs "… from blue to red." 0.999, "The car is not red." vs "The car is red." 0.93 — all above τ = 0.85, so
a policy is paid for stating the opposite. :func:`contradicts` catches these three shapes by rule:

- **ordered arguments** of an edit operation: ``replace A with B``, ``swap``-free colour/state changes
  ``change|turn|make|paint|recolor X [from A] to B`` and ``X changes|turns from A to B``, and moves
  ``move X to the Y``. When both sentences parse as the same operation, their arguments (lower-cased,
  articles dropped) must be equal in order; ``replace the cat with a dog`` contradicts ``replace the dog
  with a cat``.
- **negation**: one sentence negates (``not``, ``no``, ``n't``, ``never``, ``without``, ``none``, …) and
  the other does not, and without their negation words and articles they have the same words ("The car is
  not red." vs "The car is red."; but "The car is red, not blue." does not contradict "The car is red.").

A contradicting pair is not a match whatever its cosine. Sentences neither rule parses are left to the
embedding. The rules are English-only and deliberately narrow: they only ever remove a match.
"""

from __future__ import annotations

import re

_ARTICLE = re.compile(r"\b(?:the|a|an|its|their)\b", re.IGNORECASE)
_OPERATIONS = (
    ("replace", re.compile(r"\breplace\s+(?P<a>.+?)\s+with\s+(?P<b>.+)", re.IGNORECASE)),
    ("change", re.compile(r"\b(?:change|turn|make|paint|recolou?r)\s+(?:the\s+colou?r\s+of\s+)?(?P<x>.+?)\s+"
                          r"(?:from\s+(?P<a>.+?)\s+)?(?:to|into)\s+(?P<b>.+)", re.IGNORECASE)),
    ("change", re.compile(r"(?P<x>.+?)\s+(?:changes|changed|turns|turned|goes|went)\s+from\s+(?P<a>.+?)\s+"
                          r"(?:to|into)\s+(?P<b>.+)", re.IGNORECASE)),
    ("move", re.compile(r"\bmove\s+(?P<x>.+?)\s+to\s+(?P<b>.+)", re.IGNORECASE)),
)
_NEGATION = re.compile(r"\b(?:not|no|never|without|none|nothing|neither|nor)\b|n't\b", re.IGNORECASE)


def _normalise(text: str | None) -> str:
    if text is None:
        return ""
    return " ".join(_ARTICLE.sub(" ", text).lower().strip(" .!?;,'\"").split())


def operation(sentence: str) -> tuple[str, tuple[str, ...]] | None:
    """``(kind, ordered arguments)`` of an edit-operation sentence, or ``None``."""
    for kind, pattern in _OPERATIONS:
        match = pattern.search(sentence)
        if match:
            groups = match.groupdict()
            return kind, tuple(_normalise(groups.get(name)) for name in ("x", "a", "b") if name in groups)
    return None


def negated(sentence: str) -> bool:
    return _NEGATION.search(sentence) is not None


def _words_without_negation(sentence: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", _NEGATION.sub(" ", _ARTICLE.sub(" ", sentence)).lower()))


def contradicts(answer: str, truth: str) -> bool:
    """``True`` when the rules above say ``answer`` states the opposite of ``truth``."""
    if negated(answer) != negated(truth) and _words_without_negation(answer) == _words_without_negation(truth):
        return True
    ours, theirs = operation(answer), operation(truth)
    if ours is None or theirs is None or ours[0] != theirs[0]:
        return False
    # A missing "from" part on one side is not a contradiction: compare what both state.
    return any(a and b and a != b for a, b in zip(ours[1], theirs[1], strict=True))
