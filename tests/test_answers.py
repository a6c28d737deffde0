"""Answer extraction and normalisation on tricky strings."""

from __future__ import annotations

import pytest
from icm.data.answers import (
    EXTRACTORS,
    answers_match,
    extract_answer,
    normalize_answer,
    normalize_number,
    normalize_text,
)


@pytest.mark.parametrize("raw, expected", [
    ("18", "18"),
    ("18.0", "18"),
    ("18.50", "18.5"),
    ("1,000", "1000"),
    ("$1,234.50", "1234.5"),
    ("-$5", "-5"),
    ("−7", "-7"),
    ("50%", "50"),
    ("0.50", "0.5"),
    ("3/4", "0.75"),
    ("2/4", "0.5"),
    ("1/3", "1/3"),
    (".5", "0.5"),
    ("007", "7"),
    ("-0", "0"),
    ("12.", "12"),
    ("twelve", ""),
    ("1/0", ""),
    ("", ""),
    ("1.2.3", ""),
])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  Paris,   France. ", "paris france"),
    ("An apple a day", "apple day"),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("$18.00", "18"),
    ("(B)", "B"),
    ("C.", "C"),
    ("b", "b"),  # a lower-case letter is text, not a choice
    ("\\frac{1}{2}", "0.5"),
    ("\\text{Paris}", "paris"),
    ("72.", "72"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("method, text, expected", [
    ("gsm8k", "48/2 = <<48/2=24>>24\n48+24 = <<48+24=72>>72\n#### 72", "72"),
    ("gsm8k", "#### 1,000", "1000"),
    ("gsm8k", "#### $18.00", "18"),
    ("gsm8k", "#### -3", "-3"),
    ("gsm8k", "no marker here 42", ""),
    ("gsm8k", "#### nothing", ""),
    ("boxed", "so \\boxed{42}.", "42"),
    ("boxed", "\\boxed{\\frac{3}{4}}", "0.75"),
    ("boxed", "first \\boxed{1} then \\boxed{2}", "2"),
    ("boxed", "\\boxed{x = 5}", "5"),
    ("boxed", "\\boxed{\\text{Paris}}", "paris"),
    ("boxed", "\\boxed{unclosed", ""),
    ("answer_is", "3 + 4 = 7. The answer is 7.", "7"),
    ("answer_is", "The answer is $1,250.", "1250"),
    ("answer_is", "The answer is 18.5.", "18.5"),
    ("answer_is", "The final answer is: 3 + 4 = 7", "7"),
    ("answer_is", "The answer is **12** apples", "12"),
    ("answer_is", "The answer is 12. The answer is 13. The answer is the final answer.", "12"),
    ("answer_is", "Answer: 9", "9"),
    ("answer_is", "The answer is N, where N is the final number.\nThe answer is 3", "3"),
    ("answer_is", "The answer is N = 14. The final number is N = 1", "14"),
    ("answer_is", "12 + 2 = 14 clips\n\nThe answer is N.", ""),
    ("answer_is", "The answer is N, where N is the final number.", ""),
    ("answer_is", "The answer is Nairobi.", "nairobi"),
    ("answer_is", "The answer is Paris.", "paris"),
    ("answer_is", "To find the answer, we add 3 and 4 to get 7.", ""),
    ("last_number", "3 + 4 = 7 apples", "7"),
    ("last_number", "He had 5 and then 10 - 3", "3"),
    ("last_number", "It costs $2,500.00 in total.", "2500"),
    ("last_number", "5th place, 3rd try", ""),
    ("last_number", "no digits at all", ""),
    ("last_number", "values 1,2,3", "3"),
    ("choice", "The answer is (B).", "B"),
    ("choice", "I think the answer is C because...", "C"),
    ("choice", "Option (A) is wrong, (D) is right", "D"),
    ("choice", "A. Paris\nB. Rome", "B"),
    ("choice", "I believe it is a good one", ""),
    ("choice", "the answer is a number", ""),
    ("text", "Let me think. The answer is The Eiffel Tower.", "eiffel tower"),
    ("text", "Some reasoning\nParis!\n", "paris"),
    ("text", "", ""),
])
def test_extractors(method, text, expected):
    assert EXTRACTORS[method](text) == expected


@pytest.mark.parametrize("text, expected", [
    ("so 5 + 3 = 8\n#### 8", "8"),  # gsm8k wins
    ("blah \\boxed{9} and 10", "9"),  # boxed before last number
    ("The answer is 11. Then 12 more.", "11"),  # answer_is before last number
    ("7 plus 8 makes 15", "15"),  # last number
    ("So 12 + 2 = 14.\nThe answer is 'N'.", "14"),  # an echoed placeholder is no answer
    ("nothing", ""),
])
def test_extract_auto(text, expected):
    assert extract_answer(text) == expected


def test_unknown_extractor():
    with pytest.raises(ValueError, match="unknown extractor"):
        extract_answer("1", "nope")


@pytest.mark.parametrize("a, b, expected", [
    ("18", "18.0", True),
    ("$1,000", "1000", True),
    ("0.5", "1/2", True),
    ("18", "19", False),
    ("", "", False),
    ("", "0", False),
    ("Paris", "paris.", True),
    ("(B)", "B", True),
    ("B", "C", False),
])
def test_answers_match(a, b, expected):
    assert answers_match(a, b) is expected
