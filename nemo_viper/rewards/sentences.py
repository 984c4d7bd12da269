"""Sentence splitting shared by answers and ground-truth items.

:func:`split_sentences` turns an answer (or a ground-truth item) into the units that are matched:

1. split on newlines;
2. split after sentence-final ``.``, ``!``, ``?`` or ``;`` (optionally followed by one closing quote
   or bracket) when whitespace follows, after a lower-case word's ``.``/``!``/``?`` directly followed by
   an upper-case letter (``red.The dog``), and after the CJK marks ``。！？；`` with or without whitespace.
   Other periods not followed by whitespace never split, so ``3.5``, ``v1.2``, ``U.S.A`` and ``e.g.x``
   stay whole; a piece ending in a known abbreviation (``Mr.``, ``Dr.``, ``e.g.``, ``i.e.``, ``etc.``,
   ``vs.``, … see ``ABBREVIATIONS``) is joined with the next, so ``Mr. Li`` stays one sentence;
3. strip leading list markers (``1.``, ``1)``, ``(1)``, ``a)``, ``(a)``, ``-``, ``*``, ``•``; repeated
   markers such as ``- 1.`` too) and surrounding whitespace. A marker needs whitespace or the end of the
   item after it, except ``•``; so ``-5 degrees`` and ``1.5 m`` keep their numbers;
4. drop items shorter than ``min_chars`` display columns (East Asian wide characters count 2, so the
   two-character ``红色`` stays with the default 3; this also removes bare numbers left over by an inline
   ``… red. 2. The …``);
5. drop duplicates, keeping the first: two items are duplicates when they are equal after
   case-folding, collapsing runs of whitespace and removing trailing sentence punctuation.
"""

from __future__ import annotations

import re
import unicodedata

_SENTENCE_END = r".!?;"
_CJK_SENTENCE_END = "。！？；"
_CLOSERS = "\"'”’)\\]"  # escaped for use inside a character class

_BOUNDARY = re.compile(
    rf"(?<=[{_SENTENCE_END}])\s+"  # "red. The"
    rf"|(?<=[{_SENTENCE_END}][{_CLOSERS}])\s+"  # 'reads "OPEN." The'
    r"|(?<=[a-z][.!?])(?=[A-Z])"  # "red.The"
    rf"|(?<=[{_CJK_SENTENCE_END}])\s*"  # "红色。车"
)
_LIST_MARKER = re.compile(r"\A(?:\s*(?:(?:\d+[.)]|\(\w\)|[a-z]\)|[-*])(?=\s|\Z)|•))+\s*")
_TRAILING_PUNCT = _SENTENCE_END + _CJK_SENTENCE_END
# Abbreviations whose period does not end a sentence (compared case-insensitively).
ABBREVIATIONS = ("mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "mt.", "jr.", "sr.", "fig.", "approx.",
                 "e.g.", "i.e.", "etc.", "vs.", "cf.", "ca.")
_ENDS_WITH_ABBREVIATION = re.compile(r"(?:\A|[\s(])(?:" + "|".join(re.escape(a) for a in ABBREVIATIONS) + r")\Z",
                                     re.IGNORECASE)


def split_sentences(text: str, min_chars: int = 3) -> list[str]:
    """Split ``text`` into stripped, deduplicated sentences of at least ``min_chars`` display columns.

    See the module docstring for the exact rules. Returns ``[]`` for blank text.
    """
    sentences: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        for piece in _join_abbreviations(_BOUNDARY.split(line)):
            sentence = _LIST_MARKER.sub("", piece.strip()).strip()
            if not sentence or _columns(sentence) < min_chars:
                continue
            key = " ".join(sentence.casefold().split()).rstrip(_TRAILING_PUNCT)
            if key not in seen:
                seen.add(key)
                sentences.append(sentence)
    return sentences


def _join_abbreviations(pieces: list[str]) -> list[str]:
    """Re-join a piece that ends in an abbreviation with the piece after it."""
    joined: list[str] = []
    for piece in pieces:
        if joined and _ENDS_WITH_ABBREVIATION.search(joined[-1].rstrip()):
            joined[-1] = f"{joined[-1].rstrip()} {piece.lstrip()}"
        else:
            joined.append(piece)
    return joined


def _columns(text: str) -> int:
    """Display width: East Asian wide and full-width characters count 2."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)
