"""DigitMath: determinism, disjoint scan pools, families, gold chains, CLI, corruptions."""

import json
import re

import numpy as np
import pytest
from arithmetic import value
from PIL import Image

from dreamr_jax.data import digitmath as dm

N = 300  # enough for every family and both grid heights, small enough to stay fast


@pytest.fixture(scope="module")
def problems():
    return {split: dm.generate_problems(split, N, seed=7) for split in dm.SPLITS}


def test_same_seed_same_records_and_png_bytes():
    a, b = dm.generate_problems("train", 40, seed=3), dm.generate_problems("train", 40, seed=3)
    assert [p.to_record() for p in a] == [p.to_record() for p in b]
    assert [dm.png_bytes(dm.render_image(p)) for p in a] == [
        dm.png_bytes(dm.render_image(p)) for p in b
    ]
    other = dm.generate_problems("train", 40, seed=4)
    assert [p.to_record() for p in a] != [p.to_record() for p in other]


def test_prefix_stable_and_ids():
    # Problem i depends only on (split, i, seed), not on how many are generated.
    big = dm.generate_problems("test", 30, seed=1)
    assert dm.generate_problems("test", 10, seed=1) == big[:10]
    assert big[7].id == "test-00007" and big[7].image == "images/test-00007.png"


def test_bundled_scans_match_load_digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = dm._load_scans()
    np.testing.assert_array_equal(images, data.images)
    np.testing.assert_array_equal(labels, data.target)


def test_scan_pools_fixed_disjoint_and_stratified():
    pools = dm.scan_pools()
    sets = {split: set(pool) for split, pool in pools.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert sum(len(s) for s in sets.values()) == len(dm.scan_labels()) == 1797
    labels = dm.scan_labels()
    for split, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(len(pools[split]) / 1797 - share) < 0.02
        assert set(labels[list(pools[split])]) == set(range(10))  # every digit in every pool


def test_problems_use_only_their_split_scans_with_true_labels(problems):
    pools = {split: set(pool) for split, pool in dm.scan_pools().items()}
    labels = dm.scan_labels()
    for split, items in problems.items():
        for p in items:
            used = [s for row in p.scans for s in row]
            assert set(used) <= pools[split], p.id
            assert [[int(labels[s]) for s in row] for row in p.scans] == [
                list(row) for row in p.digits
            ]


def test_families_steps_and_answers(problems):
    items = problems["train"]
    assert {p.family for p in items} == set(dm.FAMILIES)
    for p in items:
        assert dm.MIN_STEPS <= len(p.steps) <= dm.MAX_STEPS, (p.family, p.steps)
        assert all(step and dm.STEP_DELIMITER not in step for step in p.steps)
        assert p.steps[-1] == f"The answer is {p.answer}."
        assert dm.extract_answer(p.steps[-1]) == p.answer
        assert dm.extract_answer(p.reasoning) == p.answer
        assert p.steps[0].startswith("The ") and " shows " in p.steps[0]  # reading comes first


def _row_of(p):
    """The digits the question is about: the row named in the first step."""
    return p.digits[1] if p.steps[0].startswith("The bottom") else p.digits[0]


def test_gold_answers_follow_from_the_true_digits(problems):
    for p in problems["val"]:
        d, q = p.digits, p.question
        if p.family == "row_sum":
            expected = sum(_row_of(p))
        elif p.family == "row_product":
            expected = int(np.prod(_row_of(p)))
        elif p.family == "sum_of_products":
            expected = sum(a * b for a, b in zip(d[0], d[1], strict=True))
        elif p.family == "row_difference":
            expected = abs(sum(d[0]) - sum(d[1]))
        elif p.family == "count_greater":
            threshold = int(q.rstrip("?").split()[-1])
            expected = sum(x > threshold for row in d for x in row)
        else:
            number = int("".join(map(str, _row_of(p))))
            constant = int(q.rstrip("?").split()[-1])
            expected = number + constant if " plus " in q else number - constant
        assert p.answer == str(expected), (p.family, q, d, p.steps)


_OPERATION_RE = re.compile(r"^\d+ [-+*] \d+( = \d+ [-+] \d+)? = -?\d+\.$")


def test_operation_steps_are_true_and_split_into_one_digit_operations(problems):
    seen = set()
    for p in problems["train"] + problems["val"]:
        for step in p.steps:
            if not re.match(r"^\d", step):
                continue
            assert _OPERATION_RE.match(step), step
            sides = step.rstrip(".").split(" = ")
            result = int(sides[-1])
            assert value(sides[0]) == result, step
            if len(sides) == 3:  # split: every part operates on a single digit
                a, op, b = sides[0].split(" ")
                assert value(sides[1]) == result, step
                c, op2, d = sides[1].split(" ")
                if op == "*":
                    assert (op2, int(c), int(d)) == (
                        "+",
                        int(a[:-1]) * 10 * int(b),
                        int(a[-1]) * int(b),
                    )
                else:
                    assert (op2, int(d)) == (op, int(b) % 10) and int(b) >= 10, step
                seen.add(op)
            else:  # one go only where that is already a one-digit operation
                a, op, b = sides[0].split(" ")
                assert (
                    (int(b) < 10 or int(b) % 10 == 0)
                    if op != "*"
                    else (int(a) < 10 or int(a) % 10 == 0)
                ), step
    assert seen == {"+", "-", "*"}


def test_images_have_one_32px_cell_per_digit(problems):
    for p in problems["test"][:20]:
        image = dm.render_image(p)
        assert image.mode == "L"
        assert image.size == (32 * len(p.digits[0]), 32 * len(p.digits))


def test_extract_answer_and_is_correct():
    assert dm.extract_answer("a\n\nb\n\nThe answer is 42.") == "42"
    assert dm.extract_answer("The answer is 3. No wait, the answer is -07.") == "-7"
    assert dm.extract_answer("no final answer here") is None
    assert dm.is_correct("42", "42") and dm.is_correct("042", "42") and dm.is_correct("42.", "42")
    assert not dm.is_correct("41", "42") and not dm.is_correct(None, "42")


def test_cli_writes_jsonl_and_images(tmp_path):
    dm.main(["--split", "val", "--n", "12", "--seed", "5", "--out", str(tmp_path)])
    lines = (tmp_path / "val.jsonl").read_text().splitlines()
    assert len(lines) == 12
    for line in lines:
        record = json.loads(line)
        assert {"id", "image", "question", "answer", "steps", "family", "digits"} <= set(record)
        with Image.open(tmp_path / record["image"]) as image:
            assert image.size == (32 * len(record["digits"][0]), 32 * len(record["digits"]))
        assert dm.Problem.from_record(record).to_record() == record


def test_corrupt_step_every_kind_gives_a_different_step(problems):
    rng = np.random.default_rng(0)
    seen = set()
    for p in problems["train"][:60]:
        for i, gold in enumerate(p.steps):
            kinds = dm.applicable_kinds(p, i)
            assert kinds, (p.steps, i)  # every position can be corrupted somehow
            for kind in kinds:
                wrong, got = dm.corrupt_step(p.to_record(), i, rng, kind=kind)
                assert got == kind and wrong != gold and wrong.endswith(".")
                assert dm.STEP_DELIMITER not in wrong
                seen.add(kind)
            wrong, kind = dm.corrupt_step(p, i, rng)
            assert kind in kinds and wrong != gold
    assert seen == set(dm.CORRUPTION_KINDS)


def test_corruption_kinds_do_what_they_say():
    p = next(q for q in dm.generate_problems("train", 50, 0) if q.family == "sum_of_products")
    rng = np.random.default_rng(1)
    misread, _ = dm.corrupt_step(p, 0, rng, kind="misread")
    assert misread.startswith("The top row shows ") and len(misread) == len(p.steps[0])
    slip, _ = dm.corrupt_step(p, 2, rng, kind="arithmetic_slip")
    assert slip.split("=")[0] == p.steps[2].split("=")[0]  # same operands, wrong result
    assert 1 <= abs(int(slip.split("=")[1].strip(" .")) - int(p.steps[2].split("=")[1].strip(" .")))
    assert dm.corrupt_step(p, 2, rng, kind="skipped_step")[0] == p.steps[3]
    assert dm.corrupt_step(p, 2, rng, kind="repeated_step")[0] == p.steps[1]
    with pytest.raises(ValueError):
        dm.corrupt_step(p, 0, rng, kind="repeated_step")  # nothing before the first step


def test_split_operations_also_slip_in_their_middle(problems):
    """Half the slips of a split operation change its middle, and the result follows from the
    wrong middle (as the draft's own mistakes do); the other half change only the result."""
    rng = np.random.default_rng(0)
    middle = end = 0
    for p in problems["train"]:
        for i, step in enumerate(p.steps):
            if not step[0].isdigit() or step.count(" = ") != 2:
                continue
            slip, _ = dm.corrupt_step(p, i, rng, kind="arithmetic_slip")
            head, mid, result = slip.rstrip(".").split(" = ")
            gold_head, gold_mid, gold_result = step.rstrip(".").split(" = ")
            assert head == gold_head and result != gold_result
            assert min(int(x) for x in mid.split(" ")[::2] + [result]) >= 0
            if mid == gold_mid:
                end += 1
                assert 1 <= abs(int(result) - int(gold_result)) <= 3
            else:
                middle += 1
                assert value(mid) == int(result), slip  # wrong middle, result follows it
                moved = [
                    abs(int(x) - int(y))
                    for x, y in zip(mid.split()[::2], gold_mid.split()[::2], strict=True)
                ]
                assert sorted(moved)[0] == 0 and sorted(moved)[1] in (1, 2, 3, 10, 20, 30)
    assert middle > 20 and end > 20


def test_distorted_cells_are_seeded_variants_of_the_same_digits(problems):
    p = problems["train"][0]
    plain = np.asarray(dm.render_image(p))
    first = np.asarray(dm.render_image(p, distort_seed=5))
    np.testing.assert_array_equal(first, np.asarray(dm.render_image(p, distort_seed=5)))
    assert first.shape == plain.shape and not np.array_equal(first, plain)
    assert not np.array_equal(first, np.asarray(dm.render_image(p, distort_seed=6)))
    # Each cell is still its digit: about the same ink, mostly in the same place.
    cells = dm.CELL_SIZE
    for r in range(plain.shape[0] // cells):
        for c in range(plain.shape[1] // cells):
            a = plain[r * cells : (r + 1) * cells, c * cells : (c + 1) * cells].astype(float)
            b = first[r * cells : (r + 1) * cells, c * cells : (c + 1) * cells].astype(float)
            assert 0.6 < b.sum() / a.sum() < 1.5
            assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.3
