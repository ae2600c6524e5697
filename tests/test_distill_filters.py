"""R1's rejection filters on crafted completions."""
import pytest

from r1pipe.rewards.think import foreign_word_share, split_think
from r1pipe.stages.distill import FilterSection, normalise_for_dedup, rejection_reason

GOOD = "<think>\nFirst add 2 and 3, which gives 5.\n</think>\nThe answer is \\boxed{5}."
FILTERS = FilterSection()


def reason(text, n_tokens=20, finish="stop", filters=FILTERS, max_tokens=100):
    return rejection_reason(text, n_tokens, finish, filters, max_tokens)


def test_well_formed_completion_passes():
    assert reason(GOOD) is None
    assert split_think("  " + GOOD) == ("\nFirst add 2 and 3, which gives 5.\n", "\nThe answer is \\boxed{5}.")


@pytest.mark.parametrize(
    "text",
    [
        "The answer is \\boxed{5}.",  # no think block
        "<think>\nadd\n</think>",  # nothing after the block
        "<think>   </think>\n\\boxed{5}",  # empty reasoning
        "<think>\nadd\n<think>\nagain\n</think>\n\\boxed{5}",  # nested open tag
        "<think>\nadd\n</think>\n\\boxed{5}</think>",  # two closing tags
        "<think>\nadd 2 and 3\n\\boxed{5}",  # never closed
        "Sure! <think>\nadd\n</think>\n\\boxed{5}",  # text before the block
        "</think>\nadd\n<think>\n\\boxed{5}",  # tags out of order
    ],
)
def test_malformed_think_blocks_are_rejected(text):
    assert reason(text) == "malformed_think"
    assert reason(text, filters=FilterSection(require_think=False)) is None


def test_overlong_completions_are_rejected():
    assert reason(GOOD, finish="length") == "overlong"
    assert reason(GOOD, n_tokens=101) == "overlong"
    assert reason(GOOD, n_tokens=60, filters=FilterSection(max_completion_tokens=50)) == "overlong"
    assert reason(GOOD, finish="length", filters=FilterSection(reject_truncated=False)) is None


def test_language_mixing_is_rejected():
    mixed = "<think>\nFirst add 2 and 3, 所以 the sum is 5.\n</think>\nThe answer is \\boxed{5}."
    assert reason(mixed) == "language_mixing"
    chinese = "<think>\n先把二和三相加 得到五\n</think>\n答案是 \\boxed{5}"
    assert reason(chinese, filters=FilterSection(language="zh")) is None
    assert reason(mixed, filters=FilterSection(language="zh")) == "language_mixing"
    # Digits, LaTeX and accented Latin words are not mixing.
    assert foreign_word_share("café: $\\frac{1}{2} + x^2 = 3$", "en") == 0.0
    assert foreign_word_share("one two three 四", "en") == pytest.approx(0.25)
    tolerant = FilterSection(max_foreign_word_share=0.2)
    assert reason(mixed, filters=tolerant) is None


def test_long_paragraphs_and_code_blocks_are_rejected():
    long = "<think>\n" + "add " * 1000 + "\n</think>\n\\boxed{5}"
    assert reason(long) == "long_paragraph"
    assert reason(long, filters=FilterSection(max_paragraph_chars=None)) is None
    split = "<think>\n" + ("add " * 500 + "\n\n") * 2 + "</think>\n\\boxed{5}"
    assert reason(split) is None
    code = "<think>\n```python\nprint(2 + 3)\n```\n</think>\n\\boxed{5}"
    assert reason(code) == "code_block"
    assert reason(code, filters=FilterSection(reject_code_blocks=False)) is None
    # A code block in the final answer (after the reasoning) is allowed.
    assert reason("<think>\nwrite it\n</think>\n```python\nx = 5\n```") is None


def test_dedup_key_ignores_whitespace_only():
    assert normalise_for_dedup("a  b\n c") == normalise_for_dedup("a b c")
    assert normalise_for_dedup("a b c") != normalise_for_dedup("a b d")


def test_unknown_language_is_a_one_line_error():
    with pytest.raises(ValueError, match="language"):
        foreign_word_share("x", "fr")
