"""Sentence splitter (nemo_viper.rewards.sentences)."""

import pytest

from nemo_viper.rewards import split_sentences


def test_newlines_and_numbered_lists():
    text = "1. The car is red.\n2) There are two dogs.\n\n10. The sign reads OPEN"
    assert split_sentences(text) == ["The car is red.", "There are two dogs.", "The sign reads OPEN"]


def test_bullets():
    text = "- The car is red\n* The dog is brown\n• The sky is cloudy\n•No space after the dot\n  - 1. Nested"
    assert split_sentences(text) == [
        "The car is red",
        "The dog is brown",
        "The sky is cloudy",
        "No space after the dot",
        "Nested",
    ]


def test_sentence_final_punctuation_needs_whitespace():
    text = "The car is red. The dog is brown! Is it raining? One cup; two plates"
    assert split_sentences(text) == [
        "The car is red.",
        "The dog is brown!",
        "Is it raining?",
        "One cup;",
        "two plates",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "The pole is 3.5 m tall.",
        "The label says v1.2.3 on the box.",
        "The sign says www.example.com in blue.",
        "It is 1.5 times larger.",
        "-5 degrees is shown on the thermometer.",
    ],
)
def test_no_split_inside_tokens(text):
    assert split_sentences(text) == [text]


def test_closing_quote_after_period():
    assert split_sentences('The sign reads "OPEN." The door is shut.') == [
        'The sign reads "OPEN."',
        "The door is shut.",
    ]


def test_inline_numbering_leaves_no_fragment():
    assert split_sentences("The car is red. 2. The dog is brown.") == ["The car is red.", "The dog is brown."]


def test_cjk_punctuation_without_whitespace():
    assert split_sentences("汽车是红色的。狗是棕色的！有几个人？桌上有杯子；还有书") == [
        "汽车是红色的。",
        "狗是棕色的！",
        "有几个人？",
        "桌上有杯子；",
        "还有书",
    ]


def test_short_items_dropped():
    assert split_sentences("ok\n1.\n-\nabc\nThe car is red.") == ["abc", "The car is red."]
    assert split_sentences("ok\nabc", min_chars=4) == []
    assert split_sentences("ok", min_chars=1) == ["ok"]


def test_duplicates_dropped_case_insensitively_keeping_first():
    text = "The Car is red.\nthe car is  red\n- THE CAR IS RED!\nThe dog is brown."
    assert split_sentences(text) == ["The Car is red.", "The dog is brown."]


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "1.\n2."])
def test_blank(text):
    assert split_sentences(text) == []


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Mr. Li wears a red hat. Dr. Wu stands.", ["Mr. Li wears a red hat.", "Dr. Wu stands."]),
        ("The bowl holds fruit, e.g. apples, and i.e. nothing else.", ["The bowl holds fruit, e.g. apples, and i.e. nothing else."]),
        ("Cups, plates, etc. are on the table. A knife lies there.", ["Cups, plates, etc. are on the table.", "A knife lies there."]),
        ("He said no. Then he left.", ["He said no.", "Then he left."]),
    ],
)
def test_abbreviations_do_not_end_a_sentence(text, expected):
    assert split_sentences(text) == expected


def test_missing_space_after_a_sentence_still_splits():
    assert split_sentences("The car is red.The dog is brown!It rains.") == [
        "The car is red.", "The dog is brown!", "It rains."]


def test_letter_markers_are_stripped():
    assert split_sentences("a) The car is red\nb) The dog sits\n(c) Two cats\n(2) A cup") == [
        "The car is red", "The dog sits", "Two cats", "A cup"]


def test_short_cjk_items_count_display_columns():
    assert split_sentences("红色\n猫\nab") == ["红色"]  # 2 wide characters = 4 columns; 猫 and ab are 2
