"""SFT data: prompts built one way for every use, reasoning and judge examples with the right loss
masks and verdicts, deterministic plans, and padded image batches that change nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from arithmetic import value

from dreamr_jax.config import load_config
from dreamr_jax.config.schema import PromptConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.data.sft import ExamplePlan, SFTExampleBuilder, plan_examples, sft_dataset
from dreamr_jax.data.tokenizer import build_default_tokenizer
from dreamr_jax.models import init_model
from dreamr_jax.models.inputs import prepare_inputs
from dreamr_jax.models.processor import make_image_processor
from dreamr_jax.train.trainer import collate


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("configs/digitmath/base.yaml")
    tokenizer = build_default_tokenizer()
    builder = PromptBuilder.create(tokenizer, cfg.model, cfg.prompt)
    processor = make_image_processor(cfg.model.vision)
    problems = digitmath.generate_problems("train", 40, 0)
    return cfg, tokenizer, builder, processor, problems


def test_steps_concatenate_to_the_tokenized_chain(setup):
    _, tokenizer, builder, _, problems = setup
    for p in problems[:10]:
        ids = builder.steps_ids(p.steps, complete=True)
        want = tokenizer.encode(p.reasoning, add_special_tokens=False) + [builder.eos_id]
        assert ids == want


def test_judge_words_must_be_single_tokens(setup):
    cfg, tokenizer, _, _, _ = setup
    bad = dataclasses.replace(cfg.prompt, positive_words=(" Absolutely correct",))
    with pytest.raises(ValueError, match="positive_words"):
        PromptBuilder.create(tokenizer, cfg.model, bad)
    assert PromptBuilder.create(tokenizer, cfg.model, PromptConfig()).positive_ids


def test_reasoning_and_judge_examples(setup):
    cfg, tokenizer, builder, processor, problems = setup
    data = dataclasses.replace(cfg.data, judge_fraction=0.5)
    dataset = sft_dataset(problems, builder, processor, data, seed=0)
    plans = plan_examples(problems, 0.5, 0, data.score_fraction)
    assert 0 < sum(p.score for p in plans) < sum(p.judge_step is not None for p in plans)
    assert len(dataset) == len(plans) == 80
    n_wrong = 0
    for plan, example in zip(plans, dataset, strict=True):
        n = int(example["attention_mask"].sum())
        assert example["input_ids"].shape == (cfg.data.seq_len,)
        assert example["pixel_values"].shape == (32, cfg.model.vision.patch_dim)
        ids, mask = example["input_ids"][:n], example["loss_mask"][:n] > 0
        assert not example["loss_mask"][n:].any()
        problem = problems[plan.problem]
        if plan.judge_step is None:
            want = problem.reasoning + "<|im_end|>"
            assert tokenizer.decode(ids[mask]) == want
            continue
        # The verdict is the last token and the only loss token after the gold prefix.
        correct = plan.corrupt_seed is None
        assert ids[-1] == builder.verdict_id(correct, score=plan.score) and mask[-1]
        assert example["loss_mask"][n - 1] == data.judge_loss_weight
        gold_prefix = "".join(s + "\n\n" for s in problem.steps[: plan.judge_step])
        assert tokenizer.decode(ids[mask][:-1]) == gold_prefix
        n_wrong += not correct
    assert 10 <= n_wrong <= 30  # about half of the 40 judge examples are corrupted
    again = sft_dataset(problems, builder, processor, data, seed=0)
    for i in (0, 41, 79):
        assert all(np.array_equal(again[i][k], dataset[i][k]) for k in dataset[i])


def test_corrupted_candidates_differ_from_gold(setup):
    cfg, tokenizer, builder, processor, problems = setup
    examples = SFTExampleBuilder(problems, builder, processor, cfg.data)
    for index, problem in enumerate(problems[:10]):
        for step in range(len(problem.steps)):
            if not digitmath.applicable_kinds(problem, step):
                continue
            gold, *_ = examples.token_ids(ExamplePlan(index, step, None), [1, 2, 4])
            wrong, *_ = examples.token_ids(ExamplePlan(index, step, 123), [1, 2, 4])
            assert gold[:-1] != wrong[:-1]
            assert gold[-1] == builder.positive_ids[0] and wrong[-1] == builder.negative_ids[0]


def test_too_long_example_names_the_problem(setup):
    cfg, _, builder, processor, problems = setup
    data = dataclasses.replace(cfg.data, seq_len=20)
    examples = SFTExampleBuilder(problems, builder, processor, data)
    with pytest.raises(ValueError, match=f"problem {problems[0].id}.*seq_len=20"):
        examples.build(ExamplePlan(0))


def test_padded_image_batch_gives_the_same_logits(setup):
    """collate packs each example's real patches and pads the batch to a fixed patch count; the
    logits must equal those of the unpadded batch."""
    cfg, _, builder, processor, problems = setup
    model = init_model(cfg.model, seed=0)
    examples = SFTExampleBuilder(problems, builder, processor, cfg.data)
    batch = [examples.build(ExamplePlan(i)) for i in range(4)]
    assert len({int(ex["num_patches"]) for ex in batch}) > 1  # mixed image sizes
    stacked = {k: np.stack([ex[k] for ex in batch]) for k in batch[0]}
    padded, _ = collate(cfg.model, stacked)
    assert padded.vision.pixel_values.shape[0] == 4 * 32
    real = np.concatenate([ex["pixel_values"][: ex["num_patches"]] for ex in batch])
    plain, _ = prepare_inputs(
        cfg.model,
        stacked["input_ids"],
        stacked["attention_mask"],
        real,
        stacked["image_grid_thw"].reshape(-1, 3),
    )
    mask = stacked["attention_mask"]
    got = np.asarray(model.forward(padded)[0])[mask]
    want = np.asarray(model.forward(plain)[0])[mask]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_arithmetic_drills_are_true_facts_without_images(setup):
    cfg, tokenizer, builder, processor, problems = setup
    data = dataclasses.replace(cfg.data, judge_fraction=0.2, drill_fraction=0.2)
    plans = plan_examples(problems, 0.2, 0, 0.0, 0.2)
    drills = [i for i, p in enumerate(plans) if p.drill_seed is not None]
    assert len(drills) == 13  # 40 chains are 60% of the examples
    dataset = sft_dataset(problems, builder, processor, data, seed=0)
    for i in drills[:3]:
        example = dataset[i]
        assert int(example["num_patches"]) == 0
        n = int(example["attention_mask"].sum())
        assert n > cfg.data.seq_len - 30  # full up to less than one fact (at most ~25 tokens)
        # Loss on what follows the operands only: the weighted tokens decode to
        # " [<intermediate> =] <result>.\n\n" per fact.
        results = tokenizer.decode(example["input_ids"][:n][example["loss_mask"][:n] > 0])
        facts = tokenizer.decode(example["input_ids"][:n]).strip().split("\n\n")
        assert results.split() == " ".join(f.split(" = ", 1)[1] for f in facts).split()
        for fact in facts:
            # Every side of every "=" has the same value ("54 * 6 = 300 + 24 = 324").
            values = {value(side) for side in fact.rstrip(".").split(" = ")}
            assert len(values) == 1, fact
    # A batch of drills only still gets fixed-shape (padding) vision inputs.
    batch = [dataset[i] for i in drills[:2]] + [dataset[0]]
    stacked = {k: np.stack([ex[k] for ex in batch]) for k in batch[0]}
    inputs, weights = collate(cfg.model, stacked)
    assert inputs.vision.pixel_values.shape[0] == 3 * 32 and weights.dtype == np.float32
    only_drills = {k: v[:2] for k, v in stacked.items()}
    inputs, _ = collate(cfg.model, only_drills)
    assert inputs.vision.pixel_values.shape[0] == 2 * 32
    model = init_model(cfg.model, seed=0)
    assert np.isfinite(np.asarray(model.forward(inputs)[0])).all()


def test_count_drills_state_the_true_count_of_their_reading_step(setup):
    cfg, tokenizer, builder, processor, problems = setup
    data = dataclasses.replace(cfg.data, count_drill_fraction=0.5)
    examples = SFTExampleBuilder(problems, builder, processor, data)
    ids, weights = examples.drill_ids(3, data.seq_len)
    steps = tokenizer.decode(ids).strip().split("\n\n")
    weighted = tokenizer.decode([i for i, w in zip(ids, weights, strict=True) if w > 0])
    counted = 0
    for reading, step in zip(steps, steps[1:], strict=False):
        if not step.startswith("In the "):
            continue
        counted += 1
        assert step in weighted and reading not in weighted  # loss on the count, not the digits
        name, digits = reading.removeprefix("The ").removesuffix(".").split(" shows ")
        row = [int(d) for d in digits.replace(" and ", ", ").split(", ")]
        comparisons = step.removeprefix(f"In the {name}, ").split(", so the count is ")[0]
        compared = [c.split() for c in comparisons.replace(" and ", ", ").split(", ")]
        assert [int(d) for d, _, _ in compared] == row  # every digit, in reading order
        threshold = int(compared[0][2])
        for d, mark, t in compared:
            assert int(t) == threshold
            assert mark == ("<" if int(d) < threshold else "=" if int(d) == threshold else ">")
        assert step.endswith(f"the count is {sum(d > threshold for d in row)}.")
    assert counted >= 2
    # Off by default: arithmetic-only drills keep their random stream (the shipped draft's data).
    plain = SFTExampleBuilder(problems, builder, processor, cfg.data).drill_ids(3, 160)
    assert "the count is" not in tokenizer.decode(plain[0])


def test_packed_judge_branches_equal_separate_examples(setup):
    """A chain example with judge branches under a tree mask computes, for every branch, the
    verdict logits of the stand-alone judge example, and the chain's logits are unchanged."""
    cfg, _, builder, processor, problems = setup
    data = dataclasses.replace(cfg.data, judge_branches=4, seq_len=320, judge_loss_weight=30.0)
    model = init_model(cfg.model, seed=0)
    examples = SFTExampleBuilder(problems, builder, processor, data)
    plans = plan_examples(problems[:6], 0.0, 0, 0.25, 0.0, judge_branches=4)
    assert all(p.branches for p in plans) and any(s for p in plans for _, s, _ in p.branches)
    checked = 0
    for plan in plans[:3]:
        packed = examples.build(plan)
        inputs, weights = collate(cfg.model, {k: v[None] for k, v in packed.items()})
        logits = np.asarray(model.forward(inputs)[0])[0]
        verdicts = np.nonzero(weights[0] == data.judge_loss_weight)[0]
        assert len(verdicts) == len(plan.branches)
        for (step, corrupt_seed, score), at in zip(plan.branches, verdicts, strict=True):
            alone = examples.build(ExamplePlan(plan.problem, step, corrupt_seed, score))
            assert alone["input_ids"][alone["attention_mask"]][-1] == packed["input_ids"][at]
            inputs, _ = collate(cfg.model, {k: v[None] for k, v in alone.items()})
            want = np.asarray(model.forward(inputs)[0])[0, alone["attention_mask"].sum() - 2]
            np.testing.assert_allclose(logits[at - 1], want, atol=1e-4)
            checked += 1
        chain = examples.build(ExamplePlan(plan.problem))
        n = int((packed["branch"] == 0)[packed["attention_mask"]].sum())
        inputs, _ = collate(cfg.model, {k: v[None] for k, v in chain.items()})
        want = np.asarray(model.forward(inputs)[0])[0, :n]
        np.testing.assert_allclose(logits[:n], want, atol=1e-4)
    assert checked >= 6


@pytest.mark.parametrize("branches", [2, 0])
def test_packed_drills_fill_the_row_and_equal_stand_alone_drills(setup, branches):
    """Drill facts packed after a chain (and its judge branches, if any: the draft packs them
    with none) are a sequence of their own: their logits are those of the same facts as a
    stand-alone drill row, and the chain and the verdicts before them are untouched."""
    cfg, _, builder, processor, problems = setup
    data = dataclasses.replace(
        cfg.data, judge_branches=branches, seq_len=240, count_drill_fraction=0.3, pack_drills=True
    )
    model = init_model(cfg.model, seed=0)
    examples = SFTExampleBuilder(problems, builder, processor, data)
    plans = plan_examples(
        problems[:4], 0.0, 0, 0.25, 0.0, judge_branches=branches, pack_drills=True
    )
    unpacked = plan_examples(problems[:4], 0.0, 0, 0.25, 0.0, judge_branches=branches)
    # Packing adds the fill and leaves every other draw of the plan as it was.
    assert [dataclasses.replace(p, fill_seed=None) for p in plans] == unpacked
    assert len({p.fill_seed for p in plans}) == len(plans)
    for plan in plans[:2]:
        packed = examples.build(plan)
        n = int(packed["attention_mask"].sum())
        fill = np.nonzero(packed["visible"][:n] == 0)[0]
        # The row is full up to less than one drill item (a count fragment: ~55 tokens).
        assert len(fill) and n > data.seq_len - 60
        assert (packed["branch"][fill] == len(plan.branches) + 1).all()
        inputs, weights = collate(cfg.model, {k: v[None] for k, v in packed.items()})
        logits = np.asarray(model.forward(inputs)[0])[0]
        drill, drill_weights = examples.drill_ids(plan.fill_seed, len(fill))
        np.testing.assert_array_equal(packed["input_ids"][fill], drill)
        np.testing.assert_array_equal(weights[0, fill], drill_weights)
        alone = {
            "input_ids": np.asarray([drill], np.int32),
            "attention_mask": np.ones((1, len(drill)), bool),
            "loss_mask": np.asarray([drill_weights], np.float32),
        }
        inputs, _ = collate(cfg.model, alone)
        want = np.asarray(model.forward(inputs)[0])[0]
        np.testing.assert_allclose(logits[fill], want, atol=1e-4)
        plain = examples.build(dataclasses.replace(plan, fill_seed=None))
        m = int(plain["attention_mask"].sum())
        np.testing.assert_array_equal(packed["input_ids"][:m], plain["input_ids"][:m])
        inputs, _ = collate(cfg.model, {k: v[None] for k, v in plain.items()})
        np.testing.assert_allclose(
            logits[:m], np.asarray(model.forward(inputs)[0])[0, :m], atol=1e-4
        )


def test_content_error_weight_shifts_training_corruptions_but_not_evaluation(setup):
    cfg, tokenizer, builder, processor, problems = setup
    cases = [
        (p, k, seed)
        for p in problems
        for k in range(len(p.steps))
        if len(digitmath.applicable_kinds(p, k)) > 1
        for seed in range(5)
    ]

    def content_share(weight):
        kinds = [
            digitmath.corrupt_step(p, k, np.random.default_rng(s), content_weight=weight)[1]
            for p, k, s in cases
        ]
        return np.mean([kind in digitmath.CONTENT_ERRORS for kind in kinds]), kinds

    uniform, kinds = content_share(1.0)
    weighted, _ = content_share(3.0)
    assert weighted > uniform + 0.15
    # Weight 1 is the draw every earlier run made.
    assert kinds == [digitmath.corrupt_step(p, k, np.random.default_rng(s))[1] for p, k, s in cases]
    data = dataclasses.replace(cfg.data, content_error_weight=3.0)
    train = SFTExampleBuilder(problems, builder, processor, data)
    evaluation = SFTExampleBuilder.for_evaluation(problems, builder, processor, data)
    assert train.data.content_error_weight == 3.0
    assert evaluation.data.content_error_weight == 1.0


def test_distorted_examples_change_only_their_pixels(setup):
    cfg, _, builder, processor, problems = setup
    plain = plan_examples(problems[:8], 0.0, 0, 0.25, 0.0, judge_branches=2)
    plans = plan_examples(problems[:8], 0.0, 0, 0.25, 0.0, judge_branches=2, distort_fraction=0.5)
    assert [dataclasses.replace(p, distort_seed=None) for p in plans] == plain
    assert 0 < sum(p.distort_seed is not None for p in plans) < len(plans)
    data = dataclasses.replace(cfg.data, judge_branches=2, seq_len=240)
    examples = SFTExampleBuilder(problems, builder, processor, data)
    plan = next(p for p in plans if p.distort_seed is not None)
    distorted = examples.build(plan)
    original = examples.build(dataclasses.replace(plan, distort_seed=None))
    assert not np.array_equal(distorted["pixel_values"], original["pixel_values"])
    for key in ("input_ids", "loss_mask", "image_grid_thw", "num_patches"):
        np.testing.assert_array_equal(distorted[key], original[key])


def test_reading_steps_weigh_read_loss_weight(setup):
    cfg, _, builder, processor, problems = setup
    data = dataclasses.replace(cfg.data, read_loss_weight=3.0)
    problem = problems[0]
    heavy = SFTExampleBuilder(problems, builder, processor, data).build(ExamplePlan(0))
    plain = SFTExampleBuilder(problems, builder, processor, cfg.data).build(ExamplePlan(0))
    np.testing.assert_array_equal(heavy["input_ids"], plain["input_ids"])
    reading = [s for s in problem.steps if digitmath.is_reading_step(s)]
    n_read = sum(len(builder.step_ids(s, final=False)) for s in reading)
    assert reading and n_read > 0
    assert (heavy["loss_mask"] == 3.0).sum() == n_read
    assert heavy["loss_mask"].sum() == plain["loss_mask"].sum() + 2 * n_read


def test_read_pairs_judge_every_reading_step_both_ways(setup):
    """With `read_pairs`, each reading step gets a gold and a corrupted yes/no branch in its row,
    after the drawn branches, which are unchanged."""
    cfg, _, builder, processor, problems = setup
    plain = plan_examples(problems[:12], 0.0, 0, 0.25, 0.0, judge_branches=2)
    plans = plan_examples(problems[:12], 0.0, 0, 0.25, 0.0, judge_branches=2, read_pairs=True)
    data = dataclasses.replace(cfg.data, judge_branches=2, seq_len=400)
    examples = SFTExampleBuilder(problems, builder, processor, data)
    for before, plan in zip(plain, plans, strict=True):
        assert plan.branches[: len(before.branches)] == before.branches
        problem = problems[plan.problem]
        reading = [k for k, s in enumerate(problem.steps) if digitmath.is_reading_step(s)]
        assert reading
        for k in reading:
            yes_no = [seed for step, seed, score in plan.branches if step == k and not score]
            assert None in yes_no and any(seed is not None for seed in yes_no)
        # Every branch fits in a long row, so each query carries its own verdict.
        built = examples.build(plan)
        judged = {int(b) for b in built["branch"][built["visible"] > 0] if b > 0}
        assert len(judged) == len(plan.branches)
    with pytest.raises(ValueError, match="data.read_pairs"):
        dataclasses.replace(cfg.data, read_pairs=True, judge_branches=0).validate()


def test_held_out_wordings_and_kinds_never_reach_the_judge(setup):
    cfg, tokenizer, builder, processor, _ = setup
    problems = digitmath.generate_problems("train", 60, 0, wording="uniform")
    forms, kinds = ("words", "greater_than", "digits_are"), ("repeated_step",)
    data = dataclasses.replace(
        cfg.data,
        judge_branches=4,
        read_pairs=True,
        judge_holdout_forms=forms,
        judge_holdout_kinds=kinds,
    )
    examples = SFTExampleBuilder(problems, builder, processor, data)
    plans = plan_examples(
        problems,
        0.0,
        0,
        0.0,
        judge_branches=4,
        read_pairs=True,
        holdout_forms=forms,
        holdout_kinds=kinds,
    )
    held_out_steps = sum(digitmath.written_in(s, forms) for p in problems for s in p.steps)
    assert held_out_steps > 20  # the uniform mix writes them often
    candidates = 0
    for plan in plans:
        problem = problems[plan.problem]
        for step, corrupt_seed, score in plan.branches:
            assert not digitmath.written_in(problem.steps[step], forms)
            query, _ = examples._judge_query(plan.problem, step, corrupt_seed, score)
            if corrupt_seed is not None:
                text = builder.decode(query[: -len(builder.judge_suffix_ids)]).strip()
                assert step == 0 or text != problem.steps[step - 1]  # never a repeated step
            candidates += 1
    assert candidates > 150
    # Without holdouts the same problems do judge those steps.
    free = plan_examples(problems, 0.0, 0, 0.0, judge_branches=4, read_pairs=True)
    assert any(
        digitmath.written_in(problems[p.problem].steps[k], forms)
        for p in free
        for k, *_ in p.branches
    )
