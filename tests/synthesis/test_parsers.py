"""Parsers of the policy's synthesis outputs: messy lists, prose, tags, other languages, garbage."""

import pytest

from nemo_viper.synthesis.parsers import (
    ItemRules,
    is_language,
    parse_entities,
    parse_list,
    parse_operations,
    parse_text,
    parse_yes_no,
)


@pytest.mark.parametrize(
    "raw",
    [
        "1. The cup is blue.\n2. The sign reads \"CLOSED\".",
        "1) The cup is blue.\n2) The sign reads \"CLOSED\".",
        "(1) The cup is blue.\n(2) The sign reads \"CLOSED\".",
        "- The cup is blue.\n- The sign reads \"CLOSED\".",
        "* The cup is blue.\n• The sign reads \"CLOSED\".",
        "a. The cup is blue.\nb. The sign reads \"CLOSED\".",
        "1. **The cup is blue.**\n2. `The sign reads \"CLOSED\".`",
        "Here are the corrections:\n\n1. The cup is blue.\n2. The sign reads \"CLOSED\".\n\nAsk for more!",
        "Sure! I compared the images.\n- The cup is blue.\n- The sign reads \"CLOSED\".\nThat is all.",
        "<think>The cup looks blue to me. I should list it.</think><answer>\n1. The cup is blue.\n"
        "2. The sign reads \"CLOSED\".\n</answer>",
        "<think>unfinished reasoning without a closing tag\n",
        "The cup is blue. The sign reads \"CLOSED\".",
        "The cup is blue.\nThe sign reads \"CLOSED\".",
        "Corrections:\nThe cup is blue.\nThe sign reads \"CLOSED\".",
        '"The cup is blue."\n"The sign reads "CLOSED"."',
    ],
)
def test_list_formats_give_the_same_items(raw):
    items = parse_list(raw).items
    if raw.startswith("<think>unfinished"):
        assert items == []
    else:
        assert items == ["The cup is blue.", 'The sign reads "CLOSED".'], raw


def test_prose_around_a_list_is_counted_not_kept():
    parsed = parse_list("I looked at both images.\n1. The cup is blue.\n2. There are two cats.\nHope it helps.")
    assert parsed.items == ["The cup is blue.", "There are two cats."]
    assert parsed.dropped == {"prose": 2}


@pytest.mark.parametrize("raw", ["", "   \n\n ", "None", "None.", "No errors found.", "N/A", "No corrections needed.",
                                 "The description is correct."])
def test_empty_and_none_answers_give_no_items(raw):
    assert parse_list(raw).items == []


@pytest.mark.parametrize(
    "raw",
    [
        "1. 杯子是蓝色的。\n2. 标志上写着“关闭”。",
        "- Чашка синего цвета.\n- На табличке написано «ЗАКРЫТО».",
        "1. La tasse est bleue et posée sur la table.\n2. Le panneau indique fermé.",
    ],
)
def test_wrong_language_items_are_dropped(raw):
    parsed = parse_list(raw)
    assert parsed.items == [] and parsed.dropped == {"wrong_language": 2}
    assert len(parse_list(raw, ItemRules(min_words=1, language=None)).items) == 2  # the check is a switch


def test_duplicates_short_and_overlong_items_are_dropped():
    long_item = "The cup " + "is very " * 30 + "blue."
    raw = f"1. The cup is blue.\n2. the cup is BLUE\n3. Blue.\n4. {long_item}\n5. ---\n6. The table is wooden."
    parsed = parse_list(raw, ItemRules(max_words=40))
    assert parsed.items == ["The cup is blue.", "The table is wooden."]
    assert parsed.dropped == {"duplicate": 1, "too_short": 2, "overlong": 1}


GARBAGE = ["\x00\x01", "#tre#tre#tre", "<answer></answer>", "1.\n2.\n-", "🙂🙂🙂", "<think>"]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_never_raises(garbage):
    parse_list(garbage)
    parse_text(garbage)
    parse_entities(garbage)
    parse_operations(garbage, max_operations=3)
    parse_yes_no(garbage)


def test_text_parser_cleans_labels_tags_and_rejects_with_a_reason():
    assert parse_text("Caption: A red cup\n on a   wooden table.").text == "A red cup on a wooden table."
    assert parse_text("<think>hmm</think><answer>A red cup on a table.</answer>").text == "A red cup on a table."
    assert parse_text('"A red cup on a table."').text == "A red cup on a table."
    assert parse_text("").rejected == "empty"
    assert parse_text("A cup").rejected == "too_short"
    assert parse_text("一只红色的杯子放在木桌上。").rejected == "wrong_language"
    assert parse_text("word " * 2000).rejected == "overlong"


def test_is_language():
    assert is_language("The café in the corner is open.", "en")  # an accent in an English sentence
    assert is_language("Red cup", "en")  # too short for the function-word test
    assert not is_language("Die Tasse steht auf dem Tisch.", "en")
    assert not is_language("一只杯子", "en")
    assert is_language("一只杯子", None)


def test_operations_keep_imperatives_up_to_the_limit():
    raw = ("Edits:\n1. change the color of the cup from blue to green\n2. The table is brown.\n"
           "3. Remove the sign in the background.\n4. Add a small plant next to the cup.")
    parsed = parse_operations(raw, max_operations=2)
    assert parsed.items == ["Change the color of the cup from blue to green.", "Remove the sign in the background."]
    assert parsed.dropped == {"prose": 1, "not_an_instruction": 1, "extra": 1}


def test_entities_are_noun_phrases_without_articles():
    parsed = parse_entities("Objects:\n- a red umbrella on the left\n- The wooden table.\n- the wooden table\n"
                            "- 杯子\n- " + "very " * 10 + "long")
    assert parsed.items == ["red umbrella on the left", "wooden table"]
    assert parsed.dropped == {"prose": 1, "duplicate": 1, "wrong_language": 1, "overlong": 1}


@pytest.mark.parametrize("raw,expected", [("Yes.", True), ("yes, it was applied", True), ("No", False),
                                          ("<think>looking</think><answer>No.</answer>", False), ("Maybe", None),
                                          ("", None)])
def test_yes_no(raw, expected):
    assert parse_yes_no(raw) is expected
