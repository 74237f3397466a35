"""The draft's own mistakes as judge negatives: where a chain leaves the gold one, how the mistake
enters the target's examples (the draft's words, judged "No", in the gold context), and mining
them once per run (a resumed run trains on the same examples)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dreamr_jax.config import load_config
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.data.draft_mistakes import DraftMistake, first_mistake
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.data.sft import SFTExampleBuilder, plan_examples
from dreamr_jax.data.tokenizer import build_default_tokenizer
from dreamr_jax.models import init_model
from dreamr_jax.models.processor import make_image_processor, process_images
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT
from dreamr_jax.train import sft as sft_stage
from dreamr_jax.train.evaluate import draft_step_judging


@pytest.fixture(scope="module")
def problems():
    return digitmath.generate_problems("train", 12, 0)


def test_first_mistake_is_the_first_step_off_the_gold_chain(problems):
    p = next(q for q in problems if len(q.steps) >= 3)
    gold = "\n\n".join(p.steps)
    assert first_mistake(p, gold, finished=True) is None
    wrong = [*p.steps[:1], p.steps[1] + " And more.", *p.steps[2:]]
    assert first_mistake(p, "\n\n".join(wrong), True) == DraftMistake(1, wrong[1])
    # A step cut off by the token budget is not a mistake; an early stop writes nothing wrong.
    assert first_mistake(p, "\n\n".join([p.steps[0], p.steps[1][:5]]), finished=False) is None
    assert first_mistake(p, p.steps[0], finished=True) is None


def test_mistakes_are_judged_no_where_the_draft_went_wrong(problems):
    cfg = load_config("configs/digitmath/target.yaml")
    tokenizer = build_default_tokenizer()
    builder = PromptBuilder.create(tokenizer, cfg.model, cfg.prompt)
    processor = make_image_processor(cfg.model.vision)
    data = dataclasses.replace(cfg.data, seq_len=320, read_loss_weight=1.0)  # verdicts: weight 3
    mistakes = {0: DraftMistake(1, "The top row shows 9, 9 and 9."), 5: DraftMistake(0, "So 3.")}
    steps = {i: m.step for i, m in mistakes.items()}
    plans = plan_examples(problems, 0.0, 0, 0.25, 0.0, judge_branches=2, mistake_steps=steps)
    plain = plan_examples(problems, 0.0, 0, 0.25, 0.0, judge_branches=2)
    # Only the problems with a mistake change, and there the mistake's step is judged, corrupted.
    for i, (plan, other) in enumerate(zip(plans, plain, strict=True)):
        if i not in mistakes:
            assert plan == other
            continue
        assert len(plan.branches) == 2
        (step, corrupt_seed, _), *_ = [q for q in plan.branches if q[0] == mistakes[i].step]
        assert corrupt_seed is not None
    examples = SFTExampleBuilder(problems, builder, processor, data, mistakes)
    for i, mistake in mistakes.items():
        example = examples.build(plans[i])
        ids = example["input_ids"][example["attention_mask"]]
        verdicts = np.nonzero(example["loss_mask"] == data.judge_loss_weight)[0]
        branch = [q[0] for q in plans[i].branches].index(mistake.step)
        at = verdicts[branch]
        start = np.nonzero(example["branch"] == example["branch"][at])[0][0]
        query = builder.decode(ids[start:at])
        assert query.startswith(mistake.text)
        assert ids[at] in (builder.verdict_id(False), builder.verdict_id(False, score=True))
        # The branch sees the prompt and the gold steps before the mistake, nothing more.
        _, grid = process_images(processor, [problem_image(problems[i])])
        context = builder.prompt_ids(problems[i].question, [grid[0].tolist()])
        context += builder.steps_ids(problems[i].steps[: mistake.step], complete=False)
        assert example["visible"][at] == len(context)


def test_mining_runs_once_per_draft_and_resumes_from_its_file(tmp_path, problems, monkeypatch):
    cfg = load_config(
        "configs/digitmath/target.yaml",
        [
            f"output_dir={tmp_path}",
            f"data.draft_mistakes_from={DEFAULT_DRAFT}",
            "data.draft_mistake_problems=12",
        ],
    )
    mined = sft_stage.draft_mistakes(cfg, problems)
    assert mined, "the shipped draft gets some of 12 train problems wrong"
    for index, mistake in mined.items():
        gold = problems[index].steps
        assert mistake.text and mistake.text != gold[mistake.step]
    # A rerun reads the file: no greedy decoding at all.
    monkeypatch.setattr(sft_stage, "greedy_solve", lambda *a, **k: pytest.fail("mined again"))
    assert sft_stage.draft_mistakes(cfg, problems) == mined
    # Another problem count is another set of mistakes: mined again, not read.
    fewer = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, draft_mistake_problems=6))
    with pytest.raises(pytest.fail.Exception):
        sft_stage.draft_mistakes(fewer, problems)


def test_draft_mistakes_need_branches_to_land_in():
    with pytest.raises(ValueError, match="data.draft_mistakes_from"):
        load_config("configs/digitmath/draft.yaml", ["data.draft_mistakes_from=x"])


def test_judging_the_draft_steps_counts_right_steps_and_mistakes(problems):
    cfg = load_config("configs/digitmath/base.yaml")
    builder = PromptBuilder.create(build_default_tokenizer(), cfg.model, cfg.prompt)
    processor = make_image_processor(cfg.model.vision)
    chosen = problems[:3]
    mistakes = {1: DraftMistake(1, "The top row shows 9 and 9.")}
    examples = SFTExampleBuilder.for_evaluation(chosen, builder, processor, cfg.data, mistakes)
    # seq_len 160 holds every chain of these problems
    got = draft_step_judging(init_model(cfg.model, seed=0), examples, alpha=0.7, batch_size=8)
    assert got["draft_mistakes"] == 1
    assert got["draft_right_steps"] == len(chosen[0].steps) + 1 + len(chosen[2].steps)
    assert 0 <= got["draft_steps_auroc"] <= 1 and 0 <= got["mistakes_accepted_at_0.7"] <= 1
