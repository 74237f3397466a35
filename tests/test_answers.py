"""Grading by answer type (`data/answers.py`): what each type reads off an output, and when a
prediction matches the gold answer."""

from __future__ import annotations

import pytest

from dreamr_jax.data import answers


@pytest.mark.parametrize(
    "text, kind, want",
    [
        ("I think (B) fits.\nAnswer: C", "choice", "C"),  # the final answer, not an earlier one
        ("Options compared.\n(D)", "choice", "D"),  # a last line that is an option
        ("Step.\nB. a red car", "choice", "B"),
        ("**E**", "choice", "E"),
        ("A cat sits on the mat.", "choice", None),  # "A" is a word here, not an option
        ("Answer: none of them", "choice", None),
        ("x = 3.50, so the answer is 1,234.5 meters", "number", "1234.5"),
        ("The answer is **324**.", "number", "324"),
        ("we get 3 and then 7", "number", "7"),  # no final answer: the last number
        ("no digits at all", "number", None),
        ("It is in Paris.\nThe answer is: The Eiffel Tower!", "text", "eiffel tower"),
        ("just a last line\nA Red Car.", "text", "red car"),
        ("62 + 15 = 77.\n\nThe answer is **77**.", "digitmath", "77"),
    ],
)
def test_extract_reads_the_final_answer(text, kind, want):
    assert answers.extract(text, kind) == want


@pytest.mark.parametrize(
    "prediction, gold, kind, want",
    [
        ("B", "B", "choice", True),
        ("B", "(B)", "choice", True),
        ("B", "B. a red car", "choice", True),
        ("A", "(C)", "choice", False),
        ("1234.5", "1234.50", "number", True),
        ("3.1416", "3.14159", "number", True),  # within 1e-4 of the gold, relative
        ("3.15", "3.14159", "number", False),
        ("0.00005", "0", "number", True),  # absolute below 1
        ("7", "seven", "number", False),  # a gold that is no number matches nothing
        ("eiffel tower", "The Eiffel Tower.", "text", True),
        ("eiffel tower", "Louvre", "text", False),
        ("77", "77", "digitmath", True),
        (None, "77", "number", False),
    ],
)
def test_is_correct_by_type(prediction, gold, kind, want):
    assert answers.is_correct(prediction, gold, kind, 1e-4) is want


@pytest.mark.parametrize(
    "gold, want",
    [("B", "choice"), ("(C)", "choice"), ("12.5", "number"), ("-3", "number"), ("Paris", "text")],
)
def test_auto_reads_the_type_off_the_gold_answer(gold, want):
    assert answers.resolve_type("auto", gold) == want
    assert answers.resolve_type("text", gold) == "text"  # a named type is kept
