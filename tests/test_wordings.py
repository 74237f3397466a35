"""DigitMath wordings: several correct forms per step kind, mixes of them, the step checker."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from dreamr_jax.data import digitmath as dm
from dreamr_jax.data import wordings as w
from dreamr_jax.data.wordings import Answer, Count, Number, Operation, Reading

N = 60  # per split and mix: every family, both grid heights, every form of every kind
SHIPPED_TOKENIZER = Path(__file__).parent.parent / "checkpoints/digitmath/target/tokenizer.json"


@pytest.fixture(scope="module")
def problems():
    """(mix, split) -> problems, same seed for all."""
    return {
        (mix, split): dm.generate_problems(split, N, seed=3, wording=mix)
        for mix in w.MIXES
        for split in dm.SPLITS
    }


def _all(problems, mixes=None):
    return [
        p for (mix, _), items in problems.items() if mixes is None or mix in mixes for p in items
    ]


# The checks below take the checker as an argument, so that a test can run them on broken
# checkers and see them fail (`test_the_checks_catch_broken_checkers`).


def _every_form_of_every_gold_step_checks_correct(items, check):
    for p in items:
        for fact in p.facts:
            for form in w.FORMS[fact.kind]:
                text = w.write(fact, form.name)
                assert check(text, fact), (p.id, form.name, text, fact)


def _every_corruption_checks_wrong(items, check):
    """Every applicable corruption of every step checks wrong (under the forms of the problem's
    own mix: the canonical mix has no commuted form, so there `7 * 3 = 21.` in place of
    `3 * 7 = 21.` is a skipped step). Returns the (corruption kind, form) pairs it tried."""
    tried = set()
    rng = np.random.default_rng(0)
    for p in items:
        forms = w.MIXES[p.wording].forms
        for i, (fact, step) in enumerate(zip(p.facts, p.steps, strict=True)):
            written_in = {f.name for f in w.FORMS[fact.kind] if f.write(fact) == step}
            for kind in dm.applicable_kinds(p, i):
                for _ in range(3 if kind in dm.CONTENT_ERRORS else 1):
                    wrong, got = dm.corrupt_step(p, i, rng, kind=kind)
                    assert got == kind and not check(wrong, fact, forms), (p.id, i, kind, wrong)
                    tried |= {(kind, form) for form in written_in}
    return tried


def _targeted_wrong_steps_check_wrong(check):
    op = Operation.of(54, "*", 6)
    assert check("54 * 6 = 300 + 24 = 324.", op) and check("6 * 54 = 324.", op)
    wrong = [
        "54 * 6 = 300 + 24 = 325.",  # wrong result
        "54 * 6 = 310 + 14 = 324.",  # wrong intermediate, right result
        "54 * 6 = 324 = 300 + 24.",  # parts out of order
        "54 * 6 = 304.",
        "54 * 7 = 378.",  # wrong operand
        "54 + 6 = 324.",
        "54 times 6 is 325.",
        "54 * 6 = 324",  # no full stop: no form writes it
        "",
    ]
    for text in wrong:
        assert not check(text, op), text
    read = Reading("top row", (3, 7, 1))
    for text in (
        "The top row shows 3, 7 and 2.",
        "The bottom row shows 3, 7 and 1.",
        "The top row shows 3, 7 and 1 and 1.",
        "The top row shows 3, 7.",
    ):
        assert not check(text, read), text
    count = Count.of("top row", (4, 1, 2), 2)
    for text in (
        "In the top row, 4 > 2, 1 > 2 and 2 = 2, so the count is 1.",  # wrong sign
        "In the top row, 4 > 2, 1 < 2 and 2 = 2, so the count is 2.",
        "In the top row, 4 > 2, 1 < 2 and 2 = 2, so 1 digit is greater than 3.",
        "In the top row, 4 > 2, 1 < 2 and 2 = 2, so 1 digits are greater than 2.",
        "In the top row, 4 > 2 and 1 < 2, so the count is 1.",  # a digit left out
    ):
        assert not check(text, count), text
    number = Number.of("row", (4, 7, 3))
    for text in (
        "In the row, 4, 7 and 3 form the number 483.",
        "In the row, 4, 8 and 3 form the number 473.",
        "Read from left to right, the row forms 4730.",
    ):
        assert not check(text, number), text
    for text in ("The answer is 325.", "The answer is: 324.", "The answer is **324.", "So 324."):
        assert not check(text, Answer(324)), text


def test_every_form_of_every_gold_step_checks_correct(problems):
    items = _all(problems, ["canonical"])
    assert {p.family for p in items} == set(dm.FAMILIES)
    _every_form_of_every_gold_step_checks_correct(items, w.check_step)
    # The problem-level checker agrees, and each step of each mix checks as its own fact.
    for p in _all(problems):
        for i, step in enumerate(p.steps):
            assert dm.is_correct_step(p, i, step) and dm.is_correct_step(p.to_record(), i, step)
            assert w.check_step(step, p.facts[i], w.MIXES[p.wording].forms)


def test_every_corrupted_step_checks_wrong_in_every_wording(problems):
    tried = _every_corruption_checks_wrong(_all(problems), w.check_step)
    for kind, forms in w.FORMS.items():
        content = "misread" if kind == "read" else "arithmetic_slip"
        for form in forms:
            skipped = ("skipped_step",) if kind != "answer" else ()  # the answer comes last
            for corruption in (content, *skipped, "repeated_step"):
                assert (corruption, form.name) in tried, (corruption, form.name)
    for mix in ("target", "draft", "uniform"):  # mixes that write every form check in all
        assert w.MIXES[mix].forms == frozenset(w.FORM_NAMES)


def test_wrong_steps_check_wrong():
    _targeted_wrong_steps_check_wrong(w.check_step)


def test_the_checks_catch_broken_checkers(problems):
    """The checks above fail on checkers that are wrong in the ways a checker can be."""
    items = _all(problems, ["uniform"])[:40]

    def ignores_words(text, gold, forms=None):  # takes what a text states, not how it says it
        return any(p.fact == gold for p in w.parse_step(text))

    def canonical_only(text, gold, forms=None):
        return text == w.write(gold, w.FORMS[gold.kind][0].name)

    def same_result(text, gold, forms=None):  # compares only what a step works out
        parsed = w.exact_parse(text)
        return parsed is not None and w.stated_result(parsed.fact) == w.stated_result(gold)

    always = lambda text, gold, forms=None: True
    with pytest.raises(AssertionError):
        _every_corruption_checks_wrong(items, always)
    with pytest.raises(AssertionError):
        _every_corruption_checks_wrong(items, same_result)
    with pytest.raises(AssertionError):
        _every_form_of_every_gold_step_checks_correct(items, canonical_only)
    with pytest.raises(AssertionError):
        _targeted_wrong_steps_check_wrong(ignores_words)


def test_parse_step_shows_what_a_step_states():
    (parsed,) = w.parse_step("54 * 6 = 300 + 24 = 325.")
    assert parsed == w.ParsedStep("split", Operation(54, "*", 6, 325), exact=True)
    # A wrong middle: the text states the true operation, but not in the words of its form.
    (parsed,) = w.parse_step("54 * 6 = 310 + 14 = 324.")
    assert parsed.fact == Operation.of(54, "*", 6) and not parsed.exact
    # One text, two parses: 6 * 54 written directly, or 54 * 6 commuted.
    parses = {p.form: p.fact for p in w.parse_step("6 * 54 = 324.") if p.exact}
    assert parses["direct"] == Operation(6, "*", 54, 324)
    assert parses["commuted"] == Operation(54, "*", 6, 324)
    assert w.parse_step("The digits in the row are 4 and 0.")[0].fact == Reading("row", (4, 0))
    count = w.exact_parse("In the bottom row, 7 > 6, 5 < 6, so the count is 1.")
    assert (count.form, count.fact) == ("count_list", Count("bottom row", (7, 5), 6, 1))
    assert w.exact_parse("So the answer is 12.").fact == Answer(12)
    assert w.parse_step("Let me think.") == () and w.exact_parse("Let me think.") is None
    assert dm.is_reading_step("The digits in the top row are 3 and 1.")
    assert not dm.is_reading_step("In the top row, 3 and 1 form the number 31.")


def _shared_start(a, b):
    """How many first items two sequences have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_at_least_three_forms_per_kind_and_they_differ_in_tokens():
    tokenizer = Tokenizer.from_file(str(SHIPPED_TOKENIZER))
    samples = [
        Reading("top row", (3, 7, 1)),
        Operation.of(54, "*", 6),
        Operation.of(446, "-", 97),
        Count.of("bottom row", (4, 1, 2), 2),
        Number.of("row", (4, 7, 3)),
        Answer(324),
    ]
    assert set(w.FORMS) == set(w.KINDS) == {type(f).kind for f in samples}
    assert len(set(w.FORM_NAMES)) == len(w.FORM_NAMES)  # names are unique across kinds
    for fact in samples:
        forms = w.FORMS[fact.kind]
        assert len(forms) >= 3
        texts = [w.write(fact, form.name) for form in forms]
        ids = [tuple(tokenizer.encode(text).ids) for text in texts]
        # (A difference has no commuted form: that form writes it as the direct one does.)
        assert len(set(ids)) == len(set(texts)) >= 3, texts
        # Some form shares its first tokens with the canonical one and differs after them, as
        # two models' correct steps mostly do.
        shared = [_shared_start(ids[0], other) for other in ids[1:]]
        assert max(shared) >= 3, (fact, shared)


def test_problems_do_not_depend_on_the_mix(problems):
    same = ("id", "image", "question", "answer", "family", "digits", "scans", "facts")
    for split in dm.SPLITS:
        canonical = problems[("canonical", split)]
        for mix in ("target", "draft", "uniform"):
            items = problems[(mix, split)]
            for a, b in zip(canonical, items, strict=True):
                assert [getattr(a, k) for k in same] == [getattr(b, k) for k in same]
                assert b.wording == mix and dm.extract_answer(b.steps[-1]) == b.answer
            assert sum(a.steps != b.steps for a, b in zip(canonical, items, strict=True)) > N / 2
    # The PNG of a problem is the same in every mix.
    a, b = problems[("canonical", "test")][0], problems[("draft", "test")][0]
    assert dm.png_bytes(dm.render_image(a)) == dm.png_bytes(dm.render_image(b))


def test_default_is_the_canonical_wording_unchanged(problems):
    for split in dm.SPLITS:
        default = dm.generate_problems(split, N, seed=3)
        assert default == problems[("canonical", split)]
        for p in default:
            assert p.wording == "canonical"
            assert p.steps == tuple(w.write(f, w.FORMS[f.kind][0].name) for f in p.facts)
    items = dm.generate_problems("test", 12, seed=0)
    assert items[0].steps == (
        "The row shows 6 and 2.",
        "Read from left to right, the row forms the number 62.",
        "62 + 15 = 72 + 5 = 77.",
        "The answer is 77.",
    )
    assert items[4].steps[2:7] == (
        "9 * 0 = 0.",
        "6 * 8 = 48.",
        "4 * 8 = 32.",
        "0 + 48 = 40 + 8 = 48.",
        "48 + 32 = 78 + 2 = 80.",
    )
    assert items[11].steps[2:4] == (
        "In the top row, 7 > 6 and 5 < 6, so the count is 1.",
        "In the bottom row, 2 < 6 and 2 < 6, so the count is 0.",
    )
    assert dm.operation_step(54, "*", 6) == ("54 * 6 = 300 + 24 = 324.", 324)
    # Corruptions of canonical steps are what they were before wordings (same rng, same text).
    for index, step, kind, seed, expected in (
        (4, 0, "misread", 0, "The top row shows 9, 6 and 1."),
        (4, 1, "misread", 1, "The bottom row shows 0, 4 and 8."),
        (4, 5, "arithmetic_slip", 0, "0 + 48 = 40 + 8 = 49."),
        (4, 5, "arithmetic_slip", 3, "0 + 48 = 20 + 8 = 28."),
        (11, 2, "arithmetic_slip", 0, "In the top row, 7 > 6 and 5 < 6, so the count is 4."),
        (0, 1, "arithmetic_slip", 0, "Read from left to right, the row forms the number 65."),
        (0, 3, "arithmetic_slip", 0, "The answer is 80."),
    ):
        rng = np.random.default_rng(seed)
        assert dm.corrupt_step(items[index], step, rng, kind=kind) == (expected, kind)
    rng = np.random.default_rng(5)
    assert dm.corrupt_step(items[4], 5, rng, content_weight=3.0) == ("4 * 8 = 32.", "repeated_step")


def test_mixes_are_deterministic_in_split_index_seed_and_mix(problems):
    again = dm.generate_problems("val", N, seed=3, wording="draft")
    assert again == problems[("draft", "val")]
    # Problem i is the same alone as in a set, and other seeds or mixes draw other words.
    assert dm.generate_problem("val", 7, 3, "draft") == again[7]
    other_seed = dm.generate_problems("val", N, seed=4, wording="draft")
    assert [p.steps for p in other_seed] != [p.steps for p in again]
    target = problems[("target", "val")]
    assert sum(a.steps != b.steps for a, b in zip(target, again, strict=True)) > N / 2
    with pytest.raises(ValueError, match="unknown wording"):
        dm.generate_problem("val", 0, 3, "casual")


def test_mixes_prefer_their_forms_and_write_all(problems):
    """target prefers the canonical form of each kind, draft the second; both write all."""
    for mix, position in (("target", 0), ("draft", 1)):
        counts = {form: 0 for form in w.FORM_NAMES}
        for p in _all(problems, [mix]):
            for fact, step in zip(p.facts, p.steps, strict=True):
                for form in w.FORMS[fact.kind]:
                    counts[form.name] += form.write(fact) == step
        for forms in w.FORMS.values():
            assert all(counts[f.name] > 0 for f in forms), counts
            preferred = forms[position].name
            assert counts[preferred] == max(counts[f.name] for f in forms), (mix, counts)
    with pytest.raises(ValueError, match="non-negative weights"):
        dataclasses.replace(w.MIXES["uniform"], answer=(1.0, 1.0))


def test_records_round_trip_and_old_records_load(problems, tmp_path):
    for p in _all(problems, ["canonical", "uniform"])[::7]:
        assert dm.Problem.from_record(json.loads(json.dumps(p.to_record()))) == p
    old = problems[("canonical", "train")][5].to_record()
    del old["facts"], old["wording"]
    assert dm.Problem.from_record(old) == problems[("canonical", "train")][5]
    dm.main(
        ["--split", "val", "--n", "4", "--seed", "3", "--out", str(tmp_path), "--wording", "draft"]
    )
    records = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert [dm.Problem.from_record(r) for r in records] == problems[("draft", "val")][:4]


def test_the_config_schema_knows_every_mix():
    from dreamr_jax.config.schema import CORRUPTION_KINDS, WORDING_MIXES

    assert tuple(w.MIXES) == WORDING_MIXES  # the config layer cannot import the data layer
    assert dm.CORRUPTION_KINDS == CORRUPTION_KINDS
