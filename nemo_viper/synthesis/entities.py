"""Hard entities: which objects of a refined caption stage 2 edits, by fixed heuristic rules.

Candidates come from the policy, which lists the objects its refined caption mentions (``ENTITY_PROMPT``),
and/or from the caption itself (:func:`caption_candidates`: a determiner, modifiers from the word lists
below, then the head noun: ``the small red cup`` -> ``small red cup``), as ``filters.entity_candidates``
says. These rules then decide which are "hard" -- where a fine-grained difference is easy to make and
hard to see:

1. **Grounded only.** A candidate's head word (the last word before a preposition or relative word,
   e.g. ``umbrella`` in ``red umbrella on the left``) must occur in the refined caption or in a stage-1
   refinement; others are dropped (the listing invented them).
2. **Score** (a candidate with score 0 is not hard):

   - +4 if a stage-1 refinement mentions it (the policy got it wrong before: SPEC "touched by a
     refinement first");
   - +2 if it carries text: quotes, or a text word (``sign``, ``label``, ``reads``, ...) in the phrase
     or in a caption sentence that mentions it;
   - +1 for each of: a colour, material or pattern word; a count (digit or number word); a spatial
     relation (``left``, ``behind``, ``next to``, ...) -- in the phrase or in a sentence mentioning it.
3. **Pick** up to ``max_entities`` by score, ties by first mention in the caption, one per head word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COLOUR_WORDS = frozenset(
    "red blue green yellow white black brown grey gray orange purple pink violet beige gold golden silver "
    "tan cyan magenta maroon navy teal turquoise dark light bright pale colored coloured".split()
)
MATERIAL_WORDS = frozenset(
    "wooden wood metal metallic steel iron glass plastic paper cardboard leather fabric cotton wool stone "
    "brick concrete ceramic rubber marble".split()
)
PATTERN_WORDS = frozenset("striped stripes checkered plaid dotted spotted floral patterned".split())
COUNT_WORDS = frozenset("two three four five six seven eight nine ten eleven twelve several pair couple".split())
TEXT_WORDS = frozenset("text sign label word words letter letters writing written reads says logo title number".split())
SPATIAL_WORDS = frozenset(
    "left right above below behind beneath under underneath beside between near front top bottom center "
    "centre middle corner background foreground next inside outside".split()
)
SIZE_WORDS = frozenset("small large big little tiny huge tall short long wide narrow round square".split())
_DETERMINERS = frozenset("a an the this that these those some several many one".split()) | COUNT_WORDS
_NOT_NOUNS = frozenset(
    "is are was were be been has have had of in on at to from with by for and or but not it its there "
    "which who that this these those".split()
)
_HEAD_STOP = frozenset(
    "on in at of with near behind under above below beside between next to from by that which who "
    "left right".split()
)


@dataclass(frozen=True)
class HardEntity:
    phrase: str
    head: str
    score: int
    first_mention: int


def head_word(phrase: str) -> str:
    """The phrase's head noun by a simple rule: the last word before the first preposition/relative word."""
    words = re.findall(r"[a-z0-9']+", phrase.casefold())
    kept = []
    for word in words:
        if word in _HEAD_STOP and kept:
            break
        kept.append(word)
    return kept[-1] if kept else ""


def _forms(head: str) -> tuple[str, ...]:
    """The head and its naive singular/plural, as whole-word patterns."""
    singular = head[:-1] if head.endswith("s") and not head.endswith("ss") and len(head) > 3 else head
    return tuple(sorted({singular, singular + "s", singular + "es", head}, key=len, reverse=True))


def _mentions(text: str, head: str) -> list[int]:
    forms = "|".join(re.escape(f) for f in _forms(head))
    return [m.start() for m in re.finditer(rf"\b(?:{forms})\b", text.casefold())]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.casefold()))


def caption_candidates(caption: str) -> list[str]:
    """Noun phrases of ``caption`` by a determiner rule: after a determiner or count word, the modifiers of
    the word lists (colour, material, pattern, size), then the head noun (a word that is none of these, not a
    function word and not a spatial word such as ``left`` or ``background``). In order of appearance."""
    modifiers = COLOUR_WORDS | MATERIAL_WORDS | PATTERN_WORDS | SIZE_WORDS
    candidates = []
    for sentence in _sentences(caption):
        words = re.findall(r"[A-Za-z0-9'-]+", sentence)
        for i, word in enumerate(words):
            if word.casefold() not in _DETERMINERS:
                continue
            j = i + 1
            while j < len(words) and words[j].casefold() in modifiers:
                j += 1
            head = words[j].casefold() if j < len(words) else ""
            if head.isalpha() and head not in _NOT_NOUNS | _DETERMINERS | SPATIAL_WORDS | modifiers:
                candidates.append(" ".join(w.casefold() for w in words[i + 1 : j + 1]))
    return candidates


def score_entity(phrase: str, refined_caption: str, refinements: list[str]) -> HardEntity | None:
    """The entity's score by rules 1-2 of the module docstring, or ``None`` if it is not grounded."""
    head = head_word(phrase)
    if not head:
        return None
    in_caption = _mentions(refined_caption, head)
    in_refinements = [r for r in refinements if _mentions(r, head)]
    if not in_caption and not in_refinements:
        return None
    context = [phrase] + [s for s in _sentences(refined_caption) if _mentions(s, head)] + in_refinements
    words = set().union(*(_words(t) for t in context))
    joined = " ".join(context)
    score = 4 if in_refinements else 0
    if words & TEXT_WORDS or re.search(r"[\"“”]", joined):
        score += 2
    score += bool(words & (COLOUR_WORDS | MATERIAL_WORDS | PATTERN_WORDS))
    score += bool(words & COUNT_WORDS or re.search(r"\b\d+\b", joined))
    score += bool(words & SPATIAL_WORDS)
    first = in_caption[0] if in_caption else len(refined_caption)
    return HardEntity(phrase, head, score, first)


def select_hard_entities(
    candidates: list[str], refined_caption: str, refinements: list[str], max_entities: int
) -> list[str]:
    """Up to ``max_entities`` hard entities among ``candidates`` (rule 3 of the module docstring)."""
    scored = [e for e in (score_entity(c, refined_caption, refinements) for c in candidates) if e and e.score > 0]
    scored.sort(key=lambda e: (-e.score, e.first_mention))
    chosen, heads = [], set()
    for entity in scored:
        if entity.head not in heads:
            heads.add(entity.head)
            chosen.append(entity.phrase)
        if len(chosen) == max_entities:
            break
    return chosen
