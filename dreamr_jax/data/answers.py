"""Grading a model's answer against a record's gold answer, by answer type (issue 22).

Benchmarks grade differently: MMBench and most of MMMU by a multiple-choice letter, MathVerse
and DigitMath by a number, RealWorldQA by a short text. A record names its type in
`answer_type`, a file in `data.answer_type`; `auto` reads the type off the gold answer (a lone
letter A-J: `choice`; a number: `number`; else `text`). Every type first looks for what follows
the output's last "answer is" / "Answer:", where reasoning models write their final answer, and
only then falls back to the end of the output.
"""

from __future__ import annotations

import math
import re
import string

from dreamr_jax.config.schema import ANSWER_TYPES
from dreamr_jax.data import digitmath

# What follows the last "answer is" / "answer:" (any case), up to the end of its line.
_FINAL = re.compile(r"answer\s*(?:is\s*:?|:)\s*(.*)", re.IGNORECASE)
# A lone option letter, bare or in brackets or bold: "B", "(B)", "**B**", "B." or "B)".
_LETTER = re.compile(r"(?<![A-Za-z])[\(\[*]*([A-J])[\)\]*]*(?:[.:)]|\s|$)")
# A last line that is an option: the letter alone, a bracketed letter, or "B. text" / "B) text"
# (not "A cat sat.", where the letter is a word).
_OPTION_LINE = re.compile(r"[\(\[*]*([A-J])[\)\]*.:]*$|[\(\[]([A-J])[\)\]]|([A-J])[.)]\s")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def resolve_type(answer_type: str, gold: str) -> str:
    """The grading type of a record: `answer_type`, or under `auto` the one its gold answer
    reads as."""
    if answer_type != "auto":
        return answer_type
    if re.fullmatch(r"\(?[A-J]\)?\.?", gold.strip()):
        return "choice"
    return "number" if _as_number(gold) is not None else "text"


def extract(text: str, answer_type: str) -> str | None:
    """The prediction of a model output for an answer type (not `auto`), or None where the
    output holds none."""
    final = _final_answer(text)
    if answer_type == "digitmath":
        return digitmath.extract_answer(text)
    if answer_type == "choice":
        match = final and _LETTER.search(final)
        if match:
            return match.group(1)
        match = _OPTION_LINE.match(_last_line(text))
        return next((g for g in match.groups() if g), None) if match else None
    if answer_type == "number":
        numbers = _NUMBER.findall(final or "") or _NUMBER.findall(text)
        if not numbers:
            return None
        value = _as_number(numbers[0] if final and _NUMBER.search(final) else numbers[-1])
        return None if value is None else _format_number(value)
    if answer_type == "text":
        answer = final if final else _last_line(text)
        return normalize_text(answer) or None
    raise ValueError(f"unknown answer type {answer_type!r}; expected one of {ANSWER_TYPES[1:]}")


def is_correct(prediction: str | None, gold: str, answer_type: str, tolerance: float) -> bool:
    """Whether a prediction (`extract`'s) matches the gold answer: the same letter, a number
    within `tolerance` relative to the gold (absolute below 1), or the same normalised text."""
    if prediction is None:
        return False
    if answer_type == "digitmath":
        return digitmath.is_correct(prediction, gold)
    if answer_type == "choice":
        letter = _LETTER.search(gold.strip())
        return letter is not None and prediction == letter.group(1)
    if answer_type == "number":
        pred, ref = _as_number(prediction), _as_number(gold)
        if pred is None or ref is None:
            return False
        return abs(pred - ref) <= tolerance * max(1.0, abs(ref))
    if answer_type == "text":
        return prediction == normalize_text(gold)
    raise ValueError(f"unknown answer type {answer_type!r}; expected one of {ANSWER_TYPES[1:]}")


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _final_answer(text: str) -> str | None:
    matches = _FINAL.findall(text)
    return matches[-1].strip() if matches else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _as_number(text: str) -> float | None:
    """The value of a text that is one number (bold, a trailing period or percent sign
    allowed), else None."""
    core = text.strip().strip("*").rstrip(".%").strip()
    if not _NUMBER.fullmatch(core):
        return None
    value = float(core.replace(",", ""))
    return value if math.isfinite(value) else None


def _format_number(value: float) -> str:
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)
