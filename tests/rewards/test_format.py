"""Format rule and answer extraction (nemo_viper.rewards.format)."""

import pytest

from nemo_viper.rewards import ParsedResponse, parse_response


def test_exact_layout():
    parsed = parse_response("<think>The car looks red.</think><answer>The car is red.</answer>")
    assert parsed == ParsedResponse(format_ok=True, answer="The car is red.", truncated=False)


def test_whitespace_around_and_between_blocks():
    text = "\n  <think>\nlook closely\n</think>\n\n  <answer>\n1. The car is red.\n2. Two dogs.\n</answer>\n "
    parsed = parse_response(text)
    assert parsed.format_ok
    assert parsed.answer == "1. The car is red.\n2. Two dogs."


@pytest.mark.parametrize(
    "text",
    [
        "<answer>The car is red.</answer>",  # no think block
        "<think>look</think> stray <answer>The car is red.</answer>",  # text between blocks
        "Sure! <think>look</think><answer>The car is red.</answer>",  # text before
        "<think>look</think><answer>The car is red.</answer> Done.",  # text after
        "<answer>The car is red.</answer><think>look</think>",  # wrong order
        "<think>a</think><think>b</think><answer>The car is red.</answer>",  # duplicated think
        "<think>   </think><answer>The car is red.</answer>",  # blank think
        "<THINK>look</THINK><answer>The car is red.</answer>",  # tags are case-sensitive
        "</think><answer>The car is red.</answer>",  # closing think only
    ],
)
def test_broken_layout_keeps_the_single_closed_answer(text):
    parsed = parse_response(text)
    assert not parsed.format_ok
    assert not parsed.truncated
    assert parsed.answer == "The car is red."


@pytest.mark.parametrize(
    "text",
    [
        "The car is red.",  # no tags at all
        "<think>look</think>",  # no answer block
        "<think>look</think><answer>A red car.</answer><answer>A blue car.</answer>",  # two answers
    ],
)
def test_no_usable_answer(text):
    parsed = parse_response(text)
    assert parsed == ParsedResponse(format_ok=False, answer=None, truncated=False)


def test_empty_answer_block():
    parsed = parse_response("<think>look</think><answer> \n </answer>")
    assert parsed == ParsedResponse(format_ok=False, answer="", truncated=False)


@pytest.mark.parametrize(
    "text",
    [
        "<think>I see a red car and",  # cut inside think
        "<think>look</think><answer>1. The car is red.\n2. The",  # cut inside answer
        "<think>look</think><answer>A red car.</answer><answer>A blue",  # second answer left open
        "<think>look</think></answer>A red car.<answer>",  # reversed answer tags: ends in an open block
    ],
)
def test_unclosed_tag_is_truncated(text):
    assert parse_response(text) == ParsedResponse(format_ok=False, answer=None, truncated=True)


def test_caller_flagged_truncation_zeroes_a_complete_response():
    text = "<think>look</think><answer>The car is red.</answer>"
    assert parse_response(text, truncated=True) == ParsedResponse(
        format_ok=False, answer=None, truncated=True
    )


@pytest.mark.parametrize(
    "text,answer",
    [
        ("<think>I will list them inside <answer> tags.</think><answer>The car is red.</answer>", "The car is red."),
        ("<think>No </answer> here, nor <think>.</think><answer>The car is red.</answer>", "The car is red."),
        ("<think>look</think><answer>The <think> tag is never shown.</answer>", "The <think> tag is never shown."),
    ],
)
def test_tags_mentioned_inside_a_block_are_text(text, answer):
    """A complete response that mentions a tag in its reasoning or answer is neither truncated nor broken."""
    assert parse_response(text) == ParsedResponse(format_ok=True, answer=answer, truncated=False)
