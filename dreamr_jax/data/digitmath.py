"""DigitMath: multi-step arithmetic over images of real handwritten digits.

The digits are scikit-learn's bundled `load_digits` scans (1,797 8x8 images, values 0-16), so the
task needs no download. The scans are split once, independently of any seed, into disjoint
train / val / test pools; a problem of a split draws its digit images only from that split's pool,
so test images never appear in training problems.

A problem shows a grid of digits (1-2 rows, 2-4 columns); every 8x8 scan is upscaled to a 32x32
cell, which is exactly one visual token of Qwen3-VL (16-px patches merged 2x2). The reasoning is a
chain of short steps separated by "\\n\\n": first the digits are read, then one operation per step,
and the last step states the answer ("The answer is N."). Every step states a fact
(`wordings.Fact`); a wording mix picks the words each step is written in (`wordings.MIXES`), with
its own random stream, so problems are the same in every mix. The default, "canonical", writes
each step in the one wording the shipped pair learned.

Usage:
    python -m dreamr_jax.data.digitmath --split test --n 200 --seed 0 --out data/digitmath
writes data/digitmath/test.jsonl and data/digitmath/images/test-00000.png, ... (same arguments,
byte-identical files).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import io
import json
import re
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from dreamr_jax.data import wordings
from dreamr_jax.data.wordings import Answer, Count, Fact, Number, Operation, Reading

SPLITS = ("train", "val", "test")
FAMILIES = (
    "row_sum",
    "row_product",
    "sum_of_products",
    "row_difference",
    "count_greater",
    "number_plus",
)
CORRUPTION_KINDS = ("misread", "arithmetic_slip", "skipped_step", "repeated_step")
STEP_DELIMITER = "\n\n"
SCAN_SIZE = 8
CELL_SIZE = 32  # one Qwen3-VL visual token: a 2x2 group of 16-px patches
MIN_STEPS, MAX_STEPS = 3, 8

# Rank of a scan among the scans of its digit, modulo 10, decides its pool: a fixed 70/10/20
# split stratified by digit, with no seed, so every run and every user sees the same pools.
_POOL_OF_RANK = ("train",) * 7 + ("val",) + ("test",) * 2

# Pairs a human reader (or a small model) plausibly confuses; misread corruptions prefer them.
_CONFUSABLE = {
    0: (6, 8),
    1: (7, 4),
    2: (7, 3),
    3: (8, 5),
    4: (9, 1),
    5: (6, 3),
    6: (5, 0),
    7: (1, 2),
    8: (3, 0),
    9: (4, 7),
}

_ANSWER_RE = re.compile(r"answer is\s*\**\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One DigitMath problem; `to_record()` gives its JSONL form (DESIGN.md section 6 + extras)."""

    id: str
    image: str  # relative to the JSONL file's folder: images/<id>.png
    question: str
    answer: str
    steps: tuple[str, ...]
    family: str
    digits: tuple[tuple[int, ...], ...]  # true labels, row by row
    scans: tuple[tuple[int, ...], ...]  # indices into load_digits(), same shape as digits
    facts: tuple[Fact, ...]  # the true fact each step states
    wording: str  # the mix the steps are written in (a key of wordings.MIXES)

    @property
    def reasoning(self) -> str:
        """The whole gold chain as a model should write it."""
        return STEP_DELIMITER.join(self.steps)

    def to_record(self) -> dict:
        """A JSON-ready dict (lists instead of tuples)."""
        return {
            "id": self.id,
            "image": self.image,
            "question": self.question,
            "answer": self.answer,
            "steps": list(self.steps),
            "family": self.family,
            "digits": [list(row) for row in self.digits],
            "scans": [list(row) for row in self.scans],
            "facts": [wordings.fact_record(fact) for fact in self.facts],
            "wording": self.wording,
        }

    @classmethod
    def from_record(cls, record: Mapping) -> Problem:
        """Inverse of `to_record`. Records written before steps had facts are canonical: their
        facts are read back from the steps."""
        if "facts" in record:
            facts = tuple(wordings.fact_from_record(fact) for fact in record["facts"])
        else:
            facts = tuple(_canonical_fact(step) for step in record["steps"])
        return cls(
            id=record["id"],
            image=record["image"],
            question=record["question"],
            answer=record["answer"],
            steps=tuple(record["steps"]),
            family=record["family"],
            digits=tuple(tuple(int(d) for d in row) for row in record["digits"]),
            scans=tuple(tuple(int(s) for s in row) for row in record["scans"]),
            facts=facts,
            wording=record.get("wording", wordings.DEFAULT_MIX),
        )


def _canonical_fact(step: str) -> Fact:
    """The fact a step written in the canonical mix states."""
    parsed = wordings.exact_parse(step, wordings.MIXES["canonical"].forms)
    if parsed is None:
        raise ValueError(f"not a canonical DigitMath step: {step!r}")
    return parsed.fact


# ----------------------------------------------------------------------------- scans and pools


def _bundled_digits_file() -> Path | None:
    """scikit-learn's digits.csv.gz, located without importing sklearn (a multi-second import)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def _load_scans() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scans as uint8 [n, 8, 8] (values 0-16) and their labels [n]."""
    path = _bundled_digits_file()
    if path is not None:
        # The same file, parsed the same way, as sklearn.datasets.load_digits (the tests check).
        table = np.loadtxt(path, delimiter=",")
        images, labels = table[:, :-1].reshape(-1, SCAN_SIZE, SCAN_SIZE), table[:, -1]
    else:  # an unusual sklearn layout: take the public loader
        from sklearn.datasets import load_digits

        data = load_digits()
        images, labels = data.images, data.target
    images = np.rint(images).astype(np.uint8)
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def scan_labels() -> np.ndarray:
    """The true digit of every scan (read-only array indexed like `load_digits()`)."""
    return _load_scans()[1]


@functools.lru_cache(maxsize=1)
def scan_pools() -> dict[str, tuple[int, ...]]:
    """The fixed, seed-independent split of scan indices into disjoint train/val/test pools."""
    labels = scan_labels()
    pools: dict[str, list[int]] = {split: [] for split in SPLITS}
    for digit in range(10):
        for rank, index in enumerate(np.flatnonzero(labels == digit)):
            pools[_POOL_OF_RANK[rank % len(_POOL_OF_RANK)]].append(int(index))
    return {split: tuple(sorted(indices)) for split, indices in pools.items()}


@functools.lru_cache(maxsize=len(SPLITS))
def _pool_by_digit(split: str) -> tuple[np.ndarray, ...]:
    """Scan indices of `split`'s pool, grouped by their digit (entry d = scans showing d)."""
    labels = scan_labels()
    pool = np.asarray(scan_pools()[split])
    return tuple(pool[labels[pool] == digit] for digit in range(10))


# ----------------------------------------------------------------------------- images


def render_scan(index: int) -> np.ndarray:
    """One scan as a 32x32 uint8 cell, white ink on black, nearest-neighbour upscaled."""
    scan = _load_scans()[0][index].astype(np.uint16)
    # Integer scaling (0-16 -> 0-255) keeps the pixels exact, so PNG bytes never vary.
    cell = (scan * 255 + 8) // 16
    factor = CELL_SIZE // SCAN_SIZE
    return np.repeat(np.repeat(cell, factor, axis=0), factor, axis=1).astype(np.uint8)


def distort_cell(cell: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random small affine distortion of a `[32, 32]` uint8 cell: rotation up to 10 degrees,
    scale 0.9-1.1 per axis, shift up to 2 px, bilinear. Training on such variants of its ~1,260
    scans keeps a model from learning the scans instead of the digits (run 7 misread 0.1% of
    train digits and 2.3% of test digits)."""
    angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    scale = rng.uniform(0.9, 1.1, size=2)
    shift = rng.uniform(-2.0, 2.0, size=2)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rotation @ np.diag(1.0 / scale)  # maps output pixels to input pixels
    center = np.full(2, (CELL_SIZE - 1) / 2)
    offset = center - matrix @ (center + shift)
    out = ndimage.affine_transform(cell.astype(np.float32), matrix, offset=offset, order=1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_grid(
    scans: Sequence[Sequence[int]], distort: np.random.Generator | None = None
) -> Image.Image:
    """A grayscale ("L") image with one 32x32 cell per scan index, rows top to bottom; with
    `distort`, every cell gets its own random distortion (`distort_cell`)."""

    def cell(index: int) -> np.ndarray:
        plain = render_scan(index)
        return plain if distort is None else distort_cell(plain, distort)

    rows = [np.concatenate([cell(i) for i in row], axis=1) for row in scans]
    return Image.fromarray(np.concatenate(rows, axis=0), mode="L")


def render_image(problem: Problem, distort_seed: int | None = None) -> Image.Image:
    """The picture of a problem; with `distort_seed`, a randomly distorted variant (training)."""
    rng = None if distort_seed is None else np.random.default_rng(distort_seed)
    return render_grid(problem.scans, rng)


def problem_image(problem: Problem, distort_seed: int | None = None) -> Image.Image:
    """The RGB picture of a problem, as serving reads it from its PNG (or, with `distort_seed`,
    a distorted training variant)."""
    return render_image(problem, distort_seed).convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding with fixed settings (no metadata), so equal images give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- step facts


def _row_name(n_rows: int, row: int) -> str:
    """How questions and steps call a row."""
    return "row" if n_rows == 1 else ("top row", "bottom row")[row]


def operation_step(a: int, symbol: str, b: int) -> tuple[str, int]:
    """One operation as a canonical step ("54 * 6 = 300 + 24 = 324.") and its result."""
    fact = Operation.of(a, symbol, b)
    return wordings.write(fact, "split"), fact.result


def _fold(values: Sequence[int], symbol: str) -> tuple[list[Operation], int]:
    """Combines values left to right, one step per operation; returns the steps and the result."""
    acc, steps = values[0], []
    for value in values[1:]:
        step = Operation.of(acc, symbol, value)
        steps.append(step)
        acc = step.result
    return steps, acc


# ----------------------------------------------------------------------------- families
# Each builder draws a digit grid and returns (grid, question, step facts); the last fact is the
# answer. Step counts are noted per family and checked by the tests (3-8 for every family).


def _grid(rng: np.random.Generator, rows: int, cols: int) -> list[list[int]]:
    return rng.integers(0, 10, size=(rows, cols)).tolist()


def _row_fold(rng: np.random.Generator, symbol: str, noun: str, max_cols: int):
    """Sum or product of one row: read it, then cols-1 operations (3 to max_cols + 1 steps)."""
    rows, cols = int(rng.integers(1, 3)), int(rng.integers(2, max_cols + 1))
    grid = _grid(rng, rows, cols)
    row = int(rng.integers(rows))
    name = _row_name(rows, row)
    question = f"What is the {noun} of the digits in the {name}?"
    ops, result = _fold(grid[row], symbol)
    return grid, question, [Reading(name, tuple(grid[row])), *ops, Answer(result)]


def _row_sum(rng: np.random.Generator):
    return _row_fold(rng, "+", "sum", max_cols=4)


def _row_product(rng: np.random.Generator):
    # At most three factors: results stay below 1,000 (81 * 9), so every multiplication is a
    # one- or two-digit number times a digit, which small models can learn exactly.
    return _row_fold(rng, "*", "product", max_cols=3)


def _sum_of_products(rng: np.random.Generator):
    """Column-wise products, then their sum: 2 reads + cols products + cols-1 sums (6 or 8)."""
    cols = int(rng.integers(2, 4))
    grid = _grid(rng, 2, cols)
    question = (
        "Multiply the top and bottom digits in each column, then add the products. "
        "What is the total?"
    )
    products = [Operation.of(a, "*", b) for a, b in zip(grid[0], grid[1], strict=True)]
    sums, total = _fold([p.result for p in products], "+")
    reads = [Reading("top row", tuple(grid[0])), Reading("bottom row", tuple(grid[1]))]
    return grid, question, [*reads, *products, *sums, Answer(total)]


def _row_difference(rng: np.random.Generator):
    """Both row sums, then larger minus smaller: 2 reads + 2(cols-1) sums + 1 (6 or 8 steps)."""
    cols = int(rng.integers(2, 4))
    grid = _grid(rng, 2, cols)
    question = "Add up each row. What is the larger row sum minus the smaller one?"
    top_ops, top = _fold(grid[0], "+")
    bottom_ops, bottom = _fold(grid[1], "+")
    difference = Operation.of(max(top, bottom), "-", min(top, bottom))
    reads = [Reading("top row", tuple(grid[0])), Reading("bottom row", tuple(grid[1]))]
    return grid, question, [*reads, *top_ops, *bottom_ops, difference, Answer(difference.result)]


def count_drill(rng: np.random.Generator) -> tuple[str, str]:
    """A text-only count_greater fragment: (a reading step, the count step that follows it),
    in the canonical wording of the chains, for drills that teach comparing digits."""
    rows = int(rng.integers(1, 3))
    name = _row_name(rows, int(rng.integers(rows)))
    row = _grid(rng, 1, int(rng.integers(2, 5)))[0]
    count = Count.of(name, row, int(rng.integers(1, 9)))
    return wordings.write(Reading(name, tuple(row)), "shows"), wordings.write(count, "count_is")


def _count_greater(rng: np.random.Generator):
    """Digits above a threshold: reads, one count per row, a sum if 2 rows (3 or 6 steps)."""
    rows, cols = int(rng.integers(1, 3)), int(rng.integers(2, 5))
    grid = _grid(rng, rows, cols)
    threshold = int(rng.integers(1, 9))
    question = f"How many digits in the image are greater than {threshold}?"
    names = [_row_name(rows, r) for r in range(rows)]
    reads = [Reading(name, tuple(row)) for name, row in zip(names, grid, strict=True)]
    counts = [Count.of(name, row, threshold) for name, row in zip(names, grid, strict=True)]
    sums, total = _fold([c.count for c in counts], "+")
    return grid, question, [*reads, *counts, *sums, Answer(total)]


def _number_plus(rng: np.random.Generator):
    """A row read as one number, plus or minus a constant: read, form, operate, answer (4)."""
    rows, cols = int(rng.integers(1, 3)), int(rng.integers(2, 4))
    grid = _grid(rng, rows, cols)
    row = int(rng.integers(rows))
    # A leading zero would make "the number formed" ambiguous, so the asked row never has one.
    grid[row][0] = int(rng.integers(1, 10))
    name = _row_name(rows, row)
    number = Number.of(name, grid[row])
    add = bool(rng.integers(2))
    constant = int(rng.integers(1, 100 if add else min(99, number.number) + 1))
    word, symbol = ("plus", "+") if add else ("minus", "-")
    operation = Operation.of(number.number, symbol, constant)
    question = (
        f"Read the digits in the {name} from left to right as one number. "
        f"What is that number {word} {constant}?"
    )
    facts = [Reading(name, tuple(grid[row])), number, operation, Answer(operation.result)]
    return grid, question, facts


_BUILDERS: dict[str, Callable] = {
    "row_sum": _row_sum,
    "row_product": _row_product,
    "sum_of_products": _sum_of_products,
    "row_difference": _row_difference,
    "count_greater": _count_greater,
    "number_plus": _number_plus,
}


# ----------------------------------------------------------------------------- generation


def _draw_scans(
    grid: Sequence[Sequence[int]], split: str, rng: np.random.Generator
) -> tuple[tuple[int, ...], ...]:
    """For every digit of the grid, a scan of that digit from the split's pool."""
    by_digit = _pool_by_digit(split)
    return tuple(
        tuple(int(by_digit[d][rng.integers(len(by_digit[d]))]) for d in row) for row in grid
    )


def generate_problem(
    split: str, index: int, seed: int, wording: str = wordings.DEFAULT_MIX
) -> Problem:
    """Problem number `index` of a split, its steps written in the wording mix `wording`.

    The problem (digits, scans, question, facts, answer) depends only on (split, index, seed);
    the words of its steps also on the mix, drawn from a generator of their own, so every mix
    writes the same problems. The canonical mix has one form per kind: its steps are the same
    whatever its generator draws."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed} index={index}")
    if wording not in wordings.MIXES:
        raise ValueError(f"unknown wording {wording!r}; expected one of {tuple(wordings.MIXES)}")
    # One generator per problem keeps a problem independent of n: the first k problems of a
    # larger set are the k problems of a smaller one.
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    grid, question, facts = _BUILDERS[family](rng)
    # crc32, not hash(): string hashes change from one Python process to the next.
    wording_rng = np.random.default_rng(
        [seed, SPLITS.index(split), index, zlib.crc32(wording.encode())]
    )
    problem_id = f"{split}-{index:05d}"
    return Problem(
        id=problem_id,
        image=f"images/{problem_id}.png",
        question=question,
        answer=str(facts[-1].value),
        steps=wordings.MIXES[wording].write_chain(facts, wording_rng),
        family=family,
        digits=tuple(tuple(int(d) for d in row) for row in grid),
        scans=_draw_scans(grid, split, rng),
        facts=tuple(facts),
        wording=wording,
    )


def generate_problems(
    split: str, n: int, seed: int, wording: str = wordings.DEFAULT_MIX
) -> list[Problem]:
    """n problems of a split, deterministic in (split, n, seed, wording)."""
    return [generate_problem(split, i, seed, wording) for i in range(n)]


def write_split(problems: Sequence[Problem], out_dir: str | Path, split: str) -> Path:
    """Writes out_dir/<split>.jsonl and out_dir/images/<id>.png; returns the JSONL path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for problem in problems:
        (out / problem.image).write_bytes(png_bytes(render_image(problem)))
        lines.append(json.dumps(problem.to_record()))
    path = out / f"{split}.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- answers


def _normalize_answer(text: str) -> str | None:
    """Canonical form of a numeric answer ("015" -> "15", "1,024" -> "1024"), else None."""
    cleaned = text.strip().rstrip(".").replace(",", "").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(text: str) -> str | None:
    """The final answer of a model output: the number after the last "The answer is", or None."""
    matches = _ANSWER_RE.findall(text)
    return _normalize_answer(matches[-1]) if matches else None


def is_correct(prediction: str | None, gold: str) -> bool:
    """Whether an extracted answer equals the gold answer (numerically when both are numbers)."""
    if prediction is None:
        return False
    pred, ref = _normalize_answer(prediction), _normalize_answer(gold)
    if pred is not None and ref is not None:
        return pred == ref
    return prediction.strip().lower() == gold.strip().lower()


# ----------------------------------------------------------------------------- corruption


def _as_problem(problem: Problem | Mapping) -> Problem:
    return problem if isinstance(problem, Problem) else Problem.from_record(problem)


def written_in(text: str, forms: Collection[str]) -> bool:
    """Whether one of `forms` (names of `wordings.FORMS`) writes `text` word for word."""
    return any(p.exact and p.form in forms for p in wordings.parse_step(text.strip()))


def is_correct_step(problem: Problem | Mapping, step_index: int, text: str) -> bool:
    """Whether `text` is a correct step `step_index` of the problem, in any wording: it states
    that step's true fact in exactly the words of some form (`wordings.check_step`)."""
    return wordings.check_step(text, _as_problem(problem).facts[step_index])


# Mistakes in what a step says (against the image or the arithmetic), as opposed to structural
# ones (a step skipped or repeated), which a judge can spot without checking anything.
CONTENT_ERRORS = ("misread", "arithmetic_slip")


def is_reading_step(text: str) -> bool:
    """Whether a step names the digits of a row (the only steps that need the image)."""
    return any(p.fact.kind == "read" for p in wordings.parse_step(text.strip()))


def applicable_kinds(problem: Problem | Mapping, step_index: int) -> tuple[str, ...]:
    """The corruption kinds that yield a wrong step at this position.

    A neighbouring step put here is wrong unless the problem's own mix could write it for this
    step's fact: in the canonical mix unless it is the same text (as the shipped pair's data
    had it), in a mix that commutes operands also unless it is, say, `4 * 3 = 12.` next to
    `3 * 4 = 12.`."""
    problem = _as_problem(problem)
    steps, fact = problem.steps, problem.facts[step_index]
    forms = wordings.MIXES[problem.wording].forms

    def wrong_here(text: str) -> bool:
        return not wordings.check_step(text, fact, forms)

    kinds = ["misread" if fact.kind == "read" else "arithmetic_slip"]
    if step_index + 1 < len(steps) and wrong_here(steps[step_index + 1]):
        kinds.append("skipped_step")
    if step_index > 0 and wrong_here(steps[step_index - 1]):
        kinds.append("repeated_step")
    return tuple(kinds)


def _exact_parse(text: str) -> wordings.ParsedStep:
    parsed = wordings.exact_parse(text)
    if parsed is None:
        raise ValueError(f"no wording writes this step: {text!r}")
    return parsed


def _misread(text: str, rng: np.random.Generator) -> str:
    """Replaces one digit named by a reading step (in any wording), preferring a visually
    confusable one."""
    parsed = _exact_parse(text)
    if not isinstance(parsed.fact, Reading):
        raise ValueError(f"not a reading step: {text!r}")
    digits = list(parsed.fact.digits)
    pos = int(rng.integers(len(digits)))
    true = digits[pos]
    if rng.random() < 0.7:
        digits[pos] = _CONFUSABLE[true][int(rng.integers(2))]
    else:
        digits[pos] = int(rng.choice([d for d in range(10) if d != true]))
    return wordings.write(dataclasses.replace(parsed.fact, digits=tuple(digits)), parsed.form)


_SPLIT_STEP_RE = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+) ([-+]) (\d+) = (\d+)\.$")


def _slip_middle(split: re.Match, rng: np.random.Generator) -> str:
    """A split operation wrong in its middle, and its result wrong with it, as the draft goes
    wrong (`62 + 15 = 92 + 5 = 97.`): the tens part moves by 10-30 (a wrong tens digit), or, in
    a product, the units' product by 1-3. Nothing goes below zero."""
    a, op, b, tens, op2, units, _ = split.groups()
    tens, units = int(tens), int(units)
    delta = int(rng.choice([-3, -2, -1, 1, 2, 3]))
    move_units = op == "*" and rng.random() < 0.5
    for sign in (1, -1):
        t = tens if move_units else tens + 10 * sign * delta
        u = units + sign * delta if move_units else units
        result = Operation.of(t, op2, u).result
        if min(t, u, result) >= 0:
            break
    return f"{a} {op} {b} = {t} {op2} {u} = {result}."


def _slip(text: str, rng: np.random.Generator) -> str:
    """Moves what a step works out (an operation's result, a count, a number, the answer) by
    1-3, keeping it non-negative, and writes the step again in its own wording; half of the
    split operations slip in their middle instead (`_slip_middle`)."""
    split = _SPLIT_STEP_RE.match(text)
    # (The extra draw only for split steps: other slips keep the random stream they had.)
    if split and rng.random() < 0.5:
        return _slip_middle(split, rng)
    parsed = _exact_parse(text)
    value = wordings.stated_result(parsed.fact)
    if value is None:
        raise ValueError(f"a reading step has no result to slip: {text!r}")
    delta = int(rng.choice([-3, -2, -1, 1, 2, 3]))
    if value >= 0 and value + delta < 0:
        delta = -delta
    return wordings.write(wordings.with_result(parsed.fact, value + delta), parsed.form)


def corrupt_step(
    problem: Problem | Mapping,
    step_index: int,
    rng: np.random.Generator,
    kind: str | None = None,
    content_weight: float = 1.0,
    exclude: Collection[str] = (),
) -> tuple[str, str]:
    """A realistic wrong version of step `step_index` and its kind.

    Kinds: "misread" (a reading step names a wrong digit), "arithmetic_slip" (a result off by
    1-3, or a split operation wrong in its middle), "skipped_step" (the step after this one
    placed here: the chain jumps ahead), "repeated_step" (the previous step again).
    `kind=None` picks one of the applicable kinds not in `exclude`, uniformly, or with
    `content_weight` times the odds for the content errors (misread, arithmetic_slip) against
    the structural ones; naming a kind that does not apply raises ValueError.
    """
    problem = _as_problem(problem)
    steps = problem.steps
    kinds = tuple(k for k in applicable_kinds(problem, step_index) if k not in exclude)
    if kind is None:
        if not kinds:
            raise ValueError(f"no corruption applies to step {step_index}")
        if content_weight == 1.0:  # the uniform draw, on the random stream it always used
            kind = kinds[int(rng.integers(len(kinds)))]
        else:
            odds = np.array([content_weight if k in CONTENT_ERRORS else 1.0 for k in kinds])
            kind = kinds[int(rng.choice(len(kinds), p=odds / odds.sum()))]
    elif kind not in kinds:
        raise ValueError(f"corruption {kind!r} does not apply to step {step_index}: {kinds}")
    text = steps[step_index]
    if kind == "misread":
        wrong = _misread(text, rng)
    elif kind == "arithmetic_slip":
        wrong = _slip(text, rng)
    elif kind == "skipped_step":
        wrong = steps[step_index + 1]
    else:
        wrong = steps[step_index - 1]
    return wrong, kind


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI: generate one split and write it as JSONL plus PNG images."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--n", type=int, required=True, help="number of problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--wording",
        choices=tuple(wordings.MIXES),
        default=wordings.DEFAULT_MIX,
        help="the mix of step wordings",
    )
    args = parser.parse_args(argv)
    problems = generate_problems(args.split, args.n, args.seed, args.wording)
    path = write_split(problems, args.out, args.split)
    print(f"wrote {args.n} problems to {path}")
    return path


if __name__ == "__main__":
    main()
