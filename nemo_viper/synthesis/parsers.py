"""Parsers of the policy's synthesis outputs (prompts in :mod:`nemo_viper.prompts`).

Model output is messy: list numbering, bullets, a sentence of prose before or after the list, markdown,
``<think>``/``<answer>`` tags, "None", another language, or garbage from an untrained model. Every
parser here accepts any string and never raises: what cannot be used is left out and the reason is
returned, so the caller counts it (item-level in :attr:`ParsedList.dropped`, text-level as the reason of
:class:`ParsedText`).

Rules shared by the list parsers (:func:`parse_list`):

1. Reasoning: if there is an ``<answer>`` block only its content is read; otherwise ``<think>`` blocks
   (closed or not) are removed.
2. Lines: blank lines are ignored. If some lines start with a list marker (``1.``, ``2)``, ``(3)``,
   ``a.``, ``-``, ``*``, ``•``, ``#``), only those lines are items and all other lines are prose
   around the list (dropped as ``prose``). Otherwise every line is split into sentences and each sentence
   is an item, except lines that end with ``:`` (an introduction such as "Here are the corrections:").
3. Cleaning: markers, markdown emphasis (``**``, ``__``, backticks) and surrounding quotes are removed,
   whitespace is collapsed.
4. Dropped items, by reason, checked in this order: ``none`` (a "None" / "No errors" answer),
   ``overlong`` (more than ``max_words`` words or ``max_chars`` characters), ``too_short`` (no letter or
   digit), ``wrong_language`` (see :func:`is_language`), ``too_short`` (fewer than ``min_words`` words),
   ``duplicate`` (equal after case-folding and removing punctuation and whitespace; the first is kept).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.S | re.I)
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S | re.I)
_TAG = re.compile(r"</?(?:think|answer)>", re.I)
_MARKER = re.compile(r"^\s*(?:[-*•·‣▪+]|#+|\(?\d{1,2}[.):\]]|\(\d{1,2}\)|\(?[a-hA-H][.)])\s+")
_SENTENCE = re.compile(r"(?<=[.!?])[\"'”’)]?\s+(?=[\"'“‘(]?[A-Z0-9])")
_EMPHASIS = re.compile(r"\*\*|__|`")
_QUOTES = "\"'“”‘’«»"
_NONE_ANSWER = re.compile(
    r"^(?:none|n/?a|nothing|no (?:mistakes?|errors?|corrections?|changes?|differences?|omissions?|issues?)"
    r"(?: (?:found|needed|to report))?|the description (?:is|has no) (?:correct|accurate|mistakes?))\W*$",
    re.I,
)
_LABEL = re.compile(r"^\s*(?:caption|description|refined description|new description|answer)\s*:\s*", re.I)

# Frequent English function words: an English sentence of four or more words practically always has one.
ENGLISH_FUNCTION_WORDS = frozenset(
    "a an the is are was were be been has have had of in on at to from with by for and or but not no "
    "there it its this that these those into onto over under behind above below near next than as".split()
)

IMPERATIVE_VERBS = frozenset(
    "change make turn recolor recolour paint colour color replace swap substitute exchange add insert put "
    "place remove delete erase take move shift increase decrease reduce double rewrite write edit enlarge "
    "shrink resize".split()
)
"""First words accepted for an edit instruction (the operation taxonomy's verbs)."""


@dataclass(frozen=True)
class ItemRules:
    """Which list items are kept: ``min_words``..``max_words`` words, at most ``max_chars`` characters,
    in ``language`` (``"en"``; ``None`` switches the language check off)."""

    min_words: int = 2
    max_words: int = 40
    max_chars: int = 240
    language: str | None = "en"


@dataclass(frozen=True)
class ParsedList:
    """The kept items, in order, and the number of dropped items by reason."""

    items: list[str]
    dropped: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class ParsedText:
    """A cleaned text, or ``text == ""`` and ``rejected`` = why (``empty``, ``overlong``, ``wrong_language``,
    ``too_short``)."""

    text: str
    rejected: str | None = None


def strip_reasoning(raw: str) -> str:
    """The ``<answer>`` content if there is one, else ``raw`` without ``<think>`` blocks and stray tags."""
    answer = _ANSWER.search(raw)
    body = answer.group(1) if answer else _THINK.sub("", raw)
    return _TAG.sub("", body)


def is_language(text: str, language: str | None) -> bool:
    """A cheap script-and-function-word check (``language="en"``; ``None`` accepts everything).

    English: at least 90 % of the letters are ASCII (names with accents pass, CJK or Cyrillic do not), and a
    text of four or more words contains an English function word (so French or German prose fails).
    """
    if not language:
        return True
    if language != "en":
        raise ValueError(f"language {language!r} is not supported (use 'en', or None to switch the check off)")
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.9 * len(letters):
        return False
    words = re.findall(r"[a-z]+", text.casefold())
    return len(words) < 4 or any(w in ENGLISH_FUNCTION_WORDS for w in words)


def clean_item(item: str) -> str:
    """Remove a list marker, markdown emphasis and surrounding quotes; collapse whitespace."""
    item = _EMPHASIS.sub("", _MARKER.sub("", item))
    item = " ".join(item.split())
    core = item.rstrip(".")
    if len(core) >= 2 and core[0] in _QUOTES and core[-1] in _QUOTES:
        item = core[1:-1].strip() + item[len(core):]
    return item


def _candidates(body: str) -> tuple[list[str], int]:
    """(item candidates, number of prose lines dropped) of a reasoning-free body (rule 2)."""
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    marked = [line for line in lines if _MARKER.match(line)]
    if marked:
        return marked, len(lines) - len(marked)
    sentences, intros = [], 0
    for line in lines:
        if line.rstrip().endswith(":"):
            intros += 1
            continue
        sentences += [s for s in _SENTENCE.split(line) if s.strip()]
    return sentences, intros


def _dedupe_key(item: str) -> str:
    return re.sub(r"[\W_]+", "", item.casefold())


def parse_list(raw: str, rules: ItemRules = ItemRules()) -> ParsedList:
    """Items of a one-per-line answer (corrections, entities, operations); see the module docstring."""
    candidates, prose = _candidates(strip_reasoning(raw))
    dropped: Counter = Counter()
    if prose:
        dropped["prose"] += prose
    items, seen = [], set()
    for candidate in candidates:
        item = clean_item(candidate)
        words = item.split()
        if _NONE_ANSWER.match(item):
            reason = "none"
        elif len(words) > rules.max_words or len(item) > rules.max_chars:
            reason = "overlong"
        elif not _dedupe_key(item):
            reason = "too_short"  # no letter or digit at all
        elif not is_language(item, rules.language):
            reason = "wrong_language"
        elif len(words) < rules.min_words:
            reason = "too_short"
        elif _dedupe_key(item) in seen:
            reason = "duplicate"
        else:
            seen.add(_dedupe_key(item))
            items.append(item)
            continue
        dropped[reason] += 1
    return ParsedList(items, dropped)


def parse_text(raw: str, min_words: int = 3, max_chars: int = 4000, language: str | None = "en") -> ParsedText:
    """A free-text answer (caption, refined caption): reasoning and a ``Caption:``-style label removed,
    lines joined, whitespace collapsed, markdown emphasis and surrounding quotes removed."""
    text = clean_item(_LABEL.sub("", " ".join(strip_reasoning(raw).split())))
    if not text:
        return ParsedText("", "empty")
    if len(text) > max_chars:
        return ParsedText("", "overlong")
    if not is_language(text, language):
        return ParsedText("", "wrong_language")
    if len(text.split()) < min_words:
        return ParsedText("", "too_short")
    return ParsedText(text)


def parse_entities(raw: str, language: str | None = "en") -> ParsedList:
    """Noun phrases, one per line (1-8 words), without a leading article or trailing punctuation."""
    parsed = parse_list(raw, ItemRules(min_words=1, max_words=8, max_chars=80, language=language))
    entities, seen = [], set()
    for item in parsed.items:
        entity = re.sub(r"^(?:a|an|the|some)\s+", "", item.rstrip(".!?;,"), flags=re.I).strip()
        if entity and entity.casefold() not in seen:
            seen.add(entity.casefold())
            entities.append(entity)
        else:
            parsed.dropped["duplicate"] += 1
    return ParsedList(entities, parsed.dropped)


def parse_operations(
    raw: str, max_operations: int, rules: ItemRules = ItemRules(min_words=3, max_words=30)
) -> ParsedList:
    """Edit instructions: items whose first word is one of :data:`IMPERATIVE_VERBS` (others are dropped as
    ``not_an_instruction``), capitalised and ending in a period; at most ``max_operations`` are kept
    (the rest are dropped as ``extra``)."""
    parsed = parse_list(raw, rules)
    operations = []
    for item in parsed.items:
        first = re.sub(r"[^a-z]", "", item.split()[0].casefold())
        if first not in IMPERATIVE_VERBS:
            parsed.dropped["not_an_instruction"] += 1
        elif len(operations) == max_operations:
            parsed.dropped["extra"] += 1
        else:
            sentence = item[0].upper() + item[1:]
            operations.append(sentence if sentence[-1] in ".!" else sentence + ".")
    return ParsedList(operations, parsed.dropped)


def parse_yes_no(raw: str) -> bool | None:
    """``True`` / ``False`` for an answer starting with yes / no (after reasoning is removed), else ``None``."""
    words = re.findall(r"[a-z]+", strip_reasoning(raw).casefold())
    if words and words[0] in ("yes", "no"):
        return words[0] == "yes"
    return None
