"""Sentence splitting shared by answers and ground-truth items (SPEC §6).

:func:`split_sentences` turns an answer (or a ground-truth item) into the units that are matched:

1. split on newlines;
2. split after sentence-final ``.``, ``!``, ``?`` or ``;`` (optionally followed by one closing quote
   or bracket) when whitespace follows, and after the CJK marks ``。！？；`` with or without
   whitespace. A period not followed by whitespace never splits, so ``3.5``, ``v1.2`` and ``e.g.x``
   stay whole (an abbreviation followed by a space, ``"Mr. Li"``, does split: a known limitation);
3. strip leading list markers (``1.``, ``1)``, ``-``, ``*``, ``•``; repeated markers such as
   ``- 1.`` too) and surrounding whitespace. A marker needs whitespace or the end of the item after
   it, except ``•``; so ``-5 degrees`` and ``1.5 m`` keep their numbers;
4. drop items shorter than ``min_chars`` characters (this also removes bare numbers left over by an
   inline ``… red. 2. The …``);
5. drop duplicates, keeping the first: two items are duplicates when they are equal after
   case-folding, collapsing runs of whitespace and removing trailing sentence punctuation.
"""

from __future__ import annotations

import re

_SENTENCE_END = r".!?;"
_CJK_SENTENCE_END = "。！？；"
_CLOSERS = "\"'”’)\\]"  # escaped for use inside a character class

_BOUNDARY = re.compile(
    rf"(?<=[{_SENTENCE_END}])\s+"  # "red. The"
    rf"|(?<=[{_SENTENCE_END}][{_CLOSERS}])\s+"  # 'reads "OPEN." The'
    rf"|(?<=[{_CJK_SENTENCE_END}])\s*"  # "红色。车"
)
_LIST_MARKER = re.compile(r"\A(?:\s*(?:(?:\d+[.)]|[-*])(?=\s|\Z)|•))+\s*")
_TRAILING_PUNCT = _SENTENCE_END + _CJK_SENTENCE_END


def split_sentences(text: str, min_chars: int = 3) -> list[str]:
    """Split ``text`` into stripped, deduplicated sentences of at least ``min_chars`` characters.

    See the module docstring for the exact rules. Returns ``[]`` for blank text.
    """
    sentences: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        for piece in _BOUNDARY.split(line):
            sentence = _LIST_MARKER.sub("", piece.strip()).strip()
            if not sentence or len(sentence) < min_chars:
                continue
            key = " ".join(sentence.casefold().split()).rstrip(_TRAILING_PUNCT)
            if key not in seen:
                seen.add(key)
                sentences.append(sentence)
    return sentences
