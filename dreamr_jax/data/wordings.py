"""DigitMath step facts, the several correct ways to write each, and the step checker.

Every step of a DigitMath chain states one fact: the digits of a row (`Reading`), one operation
and its result (`Operation`), how many digits of a row are greater than a threshold (`Count`),
the number a row forms (`Number`) or the answer (`Answer`). A *form* writes a fact as step text
and reads it back. Each kind of step has several forms that say the same thing in other words and
tokens, mostly after a shared start, as the correct steps of a small and a large model differ
(`FORMS`). A *mix* says how often chains use each form (`MIXES`): "canonical" writes every step in
the one wording DigitMath had before forms existed, so its chains are the shipped pair's.

`check_step` reads a text in every form and calls it correct when one of them reads the true fact
from it and writes that fact in exactly its words; `parse_step` shows what a text states.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import ClassVar

import numpy as np

# ----------------------------------------------------------------------------- facts

_OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


@dataclasses.dataclass(frozen=True)
class Reading:
    """The digits of a row, left to right."""

    kind: ClassVar[str] = "read"
    row: str  # "row" (a one-row grid), "top row" or "bottom row"
    digits: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Operation:
    """`a symbol b` (symbol +, - or *) and the result a step gives it (true for gold steps)."""

    kind: ClassVar[str] = "operation"
    a: int
    symbol: str
    b: int
    result: int

    @classmethod
    def of(cls, a: int, symbol: str, b: int) -> Operation:
        """The operation with its true result."""
        return cls(a, symbol, b, _OPERATIONS[symbol](a, b))


@dataclasses.dataclass(frozen=True)
class Count:
    """The digits of a row compared with a threshold, and how many are greater."""

    kind: ClassVar[str] = "count"
    row: str
    digits: tuple[int, ...]
    threshold: int
    count: int

    @classmethod
    def of(cls, row: str, digits: Sequence[int], threshold: int) -> Count:
        """The count with its true value."""
        return cls(row, tuple(digits), threshold, sum(d > threshold for d in digits))


@dataclasses.dataclass(frozen=True)
class Number:
    """The number a row's digits form, read left to right."""

    kind: ClassVar[str] = "number"
    row: str
    digits: tuple[int, ...]
    number: int

    @classmethod
    def of(cls, row: str, digits: Sequence[int]) -> Number:
        """The number with its true value."""
        return cls(row, tuple(digits), int("".join(str(d) for d in digits)))


@dataclasses.dataclass(frozen=True)
class Answer:
    """The final answer."""

    kind: ClassVar[str] = "answer"
    value: int


Fact = Reading | Operation | Count | Number | Answer
KINDS = ("read", "operation", "count", "number", "answer")
_FACT_TYPES: dict[str, type] = {t.kind: t for t in (Reading, Operation, Count, Number, Answer)}
# The field holding what a step works out (an arithmetic slip moves it); readings have none.
_RESULT_FIELD = {"operation": "result", "count": "count", "number": "number", "answer": "value"}


def stated_result(fact: Fact) -> int | None:
    """What a step works out: an operation's result, a count, a number, the answer; None for a
    reading."""
    field = _RESULT_FIELD.get(fact.kind)
    return None if field is None else getattr(fact, field)


def with_result(fact: Fact, value: int) -> Fact:
    """`fact` with its result (see `stated_result`) replaced by `value`."""
    return dataclasses.replace(fact, **{_RESULT_FIELD[fact.kind]: value})


def fact_record(fact: Fact) -> dict:
    """A JSON-ready dict: the kind and the fields (lists instead of tuples)."""
    fields = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(fact).items()
    }
    return {"kind": fact.kind, **fields}


def fact_from_record(record: Mapping) -> Fact:
    """Inverse of `fact_record`."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k != "kind"}
    return _FACT_TYPES[record["kind"]](**fields)


# ----------------------------------------------------------------------------- forms


def operation_middle(a: int, symbol: str, b: int) -> str | None:
    """The intermediate form the split form writes before an operation's result, or None.

    Adding or subtracting a number with tens and units goes by its tens first, then its units
    (`446 - 97 = 356 - 7 = 349`); a number with tens and units times a digit splits into the
    two partial products (`54 * 6 = 300 + 24 = 324`). Run 9 got 89% of test problems right; 33
    of its 54 failures first went wrong in such an operation done in one go, mostly a wrong tens
    digit after a borrow or carry (`70 - 63 = 17`, `54 * 6 = 304`). Split, every part is an
    operation on one digit, which a small model can learn exactly (run 10: 96%)."""
    if symbol in "+-" and b >= 10 and b % 10:
        tens = b - b % 10
        return f"{_OPERATIONS[symbol](a, tens)} {symbol} {b % 10}"
    if symbol == "*" and a >= 10 and a % 10:
        tens = a - a % 10
        return f"{tens * b} + {a % 10 * b}"
    return None


def _and_list(values: Sequence[int | str]) -> str:
    """'3', '3 and 7', '3, 7 and 1'."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _comma_list(values: Sequence[int | str]) -> str:
    """'3', '3, 7', '3, 7, 1'."""
    return ", ".join(str(v) for v in values)


def _comparisons(fact: Count) -> list[str]:
    """'4 > 2', '1 < 2', '2 = 2': every digit of the row against the threshold, in order.

    Every count form writes them before the count, so each comparison sits next to both of its
    operands. (Listing only the digits above the threshold, as the first targets were trained
    to, means knowing whether another one follows before writing ", " or " and ": both models
    failed half of these problems.)"""
    marks = [
        "<" if d < fact.threshold else "=" if d == fact.threshold else ">" for d in fact.digits
    ]
    return [f"{d} {mark} {fact.threshold}" for d, mark in zip(fact.digits, marks, strict=True)]


def _write_split(f: Operation) -> str:
    middle = operation_middle(f.a, f.symbol, f.b)
    rest = f"{middle} = {f.result}" if middle else str(f.result)
    return f"{f.a} {f.symbol} {f.b} = {rest}."


def _write_commuted(f: Operation) -> str:
    # A difference has no operand order to swap: this form writes it as the direct one does.
    a, b = (f.a, f.b) if f.symbol == "-" else (f.b, f.a)
    return f"{a} {f.symbol} {b} = {f.result}."


_SYMBOL_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_WORD_SYMBOLS = {word: symbol for symbol, word in _SYMBOL_WORDS.items()}


def _write_greater(f: Count) -> str:
    how_many = "1 digit is" if f.count == 1 else f"{f.count} digits are"
    return (
        f"In the {f.row}, {_and_list(_comparisons(f))}, so {how_many} greater than {f.threshold}."
    )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", text))


def _read_operation(groups: Mapping[str, str], commuted: bool) -> Operation:
    symbol = _WORD_SYMBOLS.get(groups["symbol"], groups["symbol"])
    a, b = int(groups["a"]), int(groups["b"])
    if commuted and symbol != "-":
        a, b = b, a
    return Operation(a, symbol, b, int(groups["result"]))


def _read_count(groups: Mapping[str, str]) -> Count:
    pairs = re.findall(r"(\d+) [<=>] (\d+)", groups["comparisons"])
    # Every comparison restates the threshold. The first one is taken; a step whose other
    # comparisons or closing words disagree with it is not `exact`.
    return Count(
        groups["row"], tuple(int(d) for d, _ in pairs), int(pairs[0][1]), int(groups["count"])
    )


def _read_number(groups: Mapping[str, str]) -> Number:
    number = int(groups["number"])
    # Forms that name only the number state its digits through it.
    digits = _ints(groups["digits"]) if groups.get("digits") else tuple(int(c) for c in str(number))
    return Number(groups["row"], digits, number)


@dataclasses.dataclass(frozen=True)
class Form:
    """One way to write the steps of a kind.

    `write` renders a fact of that kind. `pattern` (a regex, anchored when used) matches what
    `write` writes and also texts that differ from it only in what they state (other digits, a
    wrong middle or result, other comparison signs); its named groups hold what the text states.
    """

    name: str
    kind: str
    write: Callable[[Fact], str]
    pattern: str
    commuted: bool = False  # the operands of + and * written in the other order

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(f"^{self.pattern}$")

    def read(self, text: str) -> Fact | None:
        """The fact `text` states if it is written in this form's pattern, else None."""
        match = self.regex.match(text)
        if match is None:
            return None
        groups = match.groupdict()
        if self.kind == "read":
            return Reading(groups["row"], _ints(groups["digits"]))
        if self.kind == "operation":
            return _read_operation(groups, self.commuted)
        if self.kind == "count":
            return _read_count(groups)
        if self.kind == "number":
            return _read_number(groups)
        return Answer(int(groups["value"]))


_ROW = r"(?P<row>row|top row|bottom row)"
_LIST = r"(?P<digits>\d+(?:(?:, | and )\d+)*)"
_COMPARISONS = r"(?P<comparisons>\d+ [<=>] \d+(?:(?:, | and )\d+ [<=>] \d+)*)"
_OPERANDS = r"(?P<a>\d+) (?P<symbol>[-+*]) (?P<b>\d+)"
_RESULT = r"(?P<result>-?\d+)"
_COUNT = r"(?P<count>-?\d+)"
_VALUE = r"(?P<value>-?\d+)"

# The first form of every kind is its canonical one: the wording of the shipped pair's data.
_ALL_FORMS = (
    Form(
        "shows",
        "read",
        lambda f: f"The {f.row} shows {_and_list(f.digits)}.",
        rf"The {_ROW} shows {_LIST}\.",
    ),
    Form(
        "shows_list",
        "read",
        lambda f: f"The {f.row} shows {_comma_list(f.digits)}.",
        rf"The {_ROW} shows {_LIST}\.",
    ),
    Form(
        "digits_are",
        "read",
        lambda f: f"The digits in the {f.row} are {_and_list(f.digits)}.",
        rf"The digits in the {_ROW} are {_LIST}\.",
    ),
    Form("split", "operation", _write_split, rf"{_OPERANDS}(?: = \d+ [-+] \d+)? = {_RESULT}\."),
    Form(
        "direct",
        "operation",
        lambda f: f"{f.a} {f.symbol} {f.b} = {f.result}.",
        rf"{_OPERANDS} = {_RESULT}\.",
    ),
    Form("commuted", "operation", _write_commuted, rf"{_OPERANDS} = {_RESULT}\.", commuted=True),
    Form(
        "words",
        "operation",
        lambda f: f"{f.a} {_SYMBOL_WORDS[f.symbol]} {f.b} is {f.result}.",
        rf"(?P<a>\d+) (?P<symbol>plus|minus|times) (?P<b>\d+) is {_RESULT}\.",
    ),
    Form(
        "count_is",
        "count",
        lambda f: f"In the {f.row}, {_and_list(_comparisons(f))}, so the count is {f.count}.",
        rf"In the {_ROW}, {_COMPARISONS}, so the count is {_COUNT}\.",
    ),
    Form(
        "count_list",
        "count",
        lambda f: f"In the {f.row}, {_comma_list(_comparisons(f))}, so the count is {f.count}.",
        rf"In the {_ROW}, {_COMPARISONS}, so the count is {_COUNT}\.",
    ),
    Form(
        "greater_than",
        "count",
        _write_greater,
        rf"In the {_ROW}, {_COMPARISONS}, so {_COUNT} digits? (?:is|are) greater than \d+\.",
    ),
    Form(
        "forms_number",
        "number",
        lambda f: f"Read from left to right, the {f.row} forms the number {f.number}.",
        rf"Read from left to right, the {_ROW} forms the number (?P<number>\d+)\.",
    ),
    Form(
        "forms",
        "number",
        lambda f: f"Read from left to right, the {f.row} forms {f.number}.",
        rf"Read from left to right, the {_ROW} forms (?P<number>\d+)\.",
    ),
    Form(
        "digits_form",
        "number",
        lambda f: f"In the {f.row}, {_and_list(f.digits)} form the number {f.number}.",
        rf"In the {_ROW}, {_LIST} form the number (?P<number>\d+)\.",
    ),
    # Every answer form has "answer is" just before the number (bold marks allowed): what
    # `digitmath.extract_answer` looks for.
    Form(
        "answer_is", "answer", lambda f: f"The answer is {f.value}.", rf"The answer is {_VALUE}\."
    ),
    # Markdown bold, as chat models often write their answers.
    Form(
        "bold_answer",
        "answer",
        lambda f: f"The answer is **{f.value}**.",
        rf"The answer is \*\*{_VALUE}\*\*\.",
    ),
    Form(
        "so_answer",
        "answer",
        lambda f: f"So the answer is {f.value}.",
        rf"So the answer is {_VALUE}\.",
    ),
)
FORMS: dict[str, tuple[Form, ...]] = {
    kind: tuple(form for form in _ALL_FORMS if form.kind == kind) for kind in KINDS
}
FORM_NAMES = tuple(form.name for form in _ALL_FORMS)
_FORM_BY_NAME = {form.name: form for form in _ALL_FORMS}


def write(fact: Fact, form: str) -> str:
    """`fact` as a step in the words of `form` (a form of the fact's kind)."""
    spec = _FORM_BY_NAME[form]
    if spec.kind != fact.kind:
        raise ValueError(f"form {form!r} writes {spec.kind} steps, not {fact.kind} steps")
    return spec.write(fact)


# ----------------------------------------------------------------------------- parsing steps


@dataclasses.dataclass(frozen=True)
class ParsedStep:
    """What a step text states, read in one form. `exact`: the form writes that fact as
    exactly this text. A text can state a fact and still not be exact where a part the form
    derives from the fact says otherwise: a split operation's middle, a comparison's sign."""

    form: str
    fact: Fact
    exact: bool


# Training data and the corruption code read the same gold steps again and again.
@functools.lru_cache(maxsize=1 << 16)
def parse_step(text: str) -> tuple[ParsedStep, ...]:
    """Every parse of a step text, one per form whose pattern it matches, exact ones first;
    empty if no form reads it. Several forms can read one text: `4 * 3 = 12.` is 4 * 3 written
    directly and 3 * 4 written commuted."""
    parses = []
    for form in _ALL_FORMS:
        fact = form.read(text)
        if fact is not None:
            parses.append(ParsedStep(form.name, fact, form.write(fact) == text))
    return tuple(sorted(parses, key=lambda p: not p.exact))


def exact_parse(text: str, forms: Collection[str] | None = None) -> ParsedStep | None:
    """The first parse of `text` that one of `forms` (by default any) writes exactly, or
    None."""
    return next(
        (p for p in parse_step(text) if p.exact and (forms is None or p.form in forms)), None
    )


def check_step(text: str, gold: Fact, forms: Collection[str] | None = None) -> bool:
    """Whether `text` is a correct step whose true fact is `gold`: some form (one of `forms`;
    by default any) reads it as `gold` and writes `gold` as exactly this text. Text that no
    form reads is wrong."""
    return any(
        p.exact and p.fact == gold and (forms is None or p.form in forms) for p in parse_step(text)
    )


# ----------------------------------------------------------------------------- mixes


@dataclasses.dataclass(frozen=True)
class WordingMix:
    """How often a chain writes each form: per kind, one relative weight per form of
    `FORMS[kind]`, in order (0: never)."""

    name: str
    read: tuple[float, ...]
    operation: tuple[float, ...]
    count: tuple[float, ...]
    number: tuple[float, ...]
    answer: tuple[float, ...]

    def __post_init__(self):
        for kind in KINDS:
            weights = self.weights(kind)
            if len(weights) != len(FORMS[kind]) or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"mix {self.name!r}: {kind} needs {len(FORMS[kind])} non-negative weights "
                    f"with a positive sum, got {weights}"
                )

    def weights(self, kind: str) -> tuple[float, ...]:
        """The weights of `kind`'s forms, in the order of `FORMS[kind]`."""
        return getattr(self, kind)

    @functools.cached_property
    def forms(self) -> frozenset[str]:
        """The names of the forms this mix writes (weight above 0), all kinds together."""
        return frozenset(
            form.name
            for kind in KINDS
            for form, weight in zip(FORMS[kind], self.weights(kind), strict=True)
            if weight > 0
        )

    @functools.cached_property
    def _thresholds(self) -> dict[str, tuple[float, ...]]:
        """Per kind, the points where a uniform draw in [0, 1) moves on to the next form. Forms
        after the last one of positive weight get none, so no draw can land on them; one of
        weight 0 before it gets the point of the form before, which `bisect_right` passes."""
        thresholds = {}
        for kind in KINDS:
            weights = self.weights(kind)
            used = max(i for i, w in enumerate(weights) if w > 0) + 1
            total = sum(weights)
            thresholds[kind] = tuple(c / total for c in itertools.accumulate(weights[: used - 1]))
        return thresholds

    def write_chain(self, facts: Sequence[Fact], rng: np.random.Generator) -> tuple[str, ...]:
        """Each fact written in a form drawn by its kind's weights: one draw per step."""
        steps = []
        for fact in facts:
            pick = bisect.bisect_right(self._thresholds[fact.kind], rng.random())
            steps.append(FORMS[fact.kind][pick].write(fact))
        return tuple(steps)


def _preferring(name: str, position: int) -> WordingMix:
    """A mix that writes the form at `position` of every kind 55% of the time and shares the
    rest evenly among the kind's other forms."""
    weights = {}
    for kind in KINDS:
        n = len(FORMS[kind])
        weights[kind] = tuple(0.55 if i == position else 0.45 / (n - 1) for i in range(n))
    return WordingMix(name, **weights)


# "canonical": every step as the shipped pair was trained on it. "target" and "draft" write
# every form but prefer different ones (the canonical and the second form of each kind), as two
# models of a family share most of a correct step's words but not all. "uniform": no preference.
MIXES: dict[str, WordingMix] = {
    mix.name: mix
    for mix in (
        WordingMix("canonical", **{k: (1.0,) + (0.0,) * (len(FORMS[k]) - 1) for k in KINDS}),
        _preferring("target", 0),
        _preferring("draft", 1),
        WordingMix("uniform", **{k: (1.0,) * len(FORMS[k]) for k in KINDS}),
    )
}
DEFAULT_MIX = "canonical"
