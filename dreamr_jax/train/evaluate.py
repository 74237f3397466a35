"""Evaluation of a DigitMath model: greedy final-answer accuracy, and how well its CPN score
separates correct from corrupted steps (AUROC), on problems it never trained on."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.data.sft import ExamplePlan, SFTExampleBuilder
from dreamr_jax.models.generate import generate
from dreamr_jax.models.processor import left_pad, process_images
from dreamr_jax.speculative.cpn import cpn_scores
from dreamr_jax.train.trainer import collate


def greedy_solve(
    model,
    builder: PromptBuilder,
    processor,
    problems: Sequence[digitmath.Problem],
    *,
    batch_size: int,
    max_new_tokens: int,
    progress: bool = True,
) -> list[dict]:
    """Greedy chains for `problems`, in batches; per problem: id, output, prediction, correct,
    new_tokens (generated tokens including EOS), finished (whether it reached EOS)."""
    results = []
    batches = range(0, len(problems), batch_size)
    for start in tqdm(batches, desc="generate", disable=not progress or None, leave=False):
        chunk = problems[start : start + batch_size]
        pixel_values, grids = process_images(processor, [problem_image(p) for p in chunk])
        ids, mask = left_pad(_prompts(builder, chunk, grids), builder.model.pad_token_id)
        out = generate(model, ids, mask, pixel_values, grids, max_new_tokens=max_new_tokens)
        for problem, row in zip(chunk, np.asarray(out), strict=True):
            text = builder.decode(row)
            prediction = digitmath.extract_answer(text)
            eos = np.isin(row, builder.model.eos_token_ids)
            results.append(
                {
                    "id": problem.id,
                    "output": text,
                    "prediction": prediction,
                    "correct": digitmath.is_correct(prediction, problem.answer),
                    "new_tokens": int(np.argmax(eos)) + 1 if eos.any() else len(row),
                    "finished": bool(eos.any()),
                }
            )
    return results


def _prompts(builder: PromptBuilder, problems, grids) -> list[list[int]]:
    return [
        builder.prompt_ids(p.question, [g.tolist()]) for p, g in zip(problems, grids, strict=True)
    ]


def judge_plans(problems: Sequence[digitmath.Problem], seed: int) -> list[tuple[ExamplePlan, int]]:
    """For every step of every problem: the gold step (label 1) and, where one applies, a
    corrupted version of it (label 0). Returns (plan, label) pairs; `problem` indexes `problems`."""
    rng = np.random.default_rng([seed, 29])
    out = []
    for index, problem in enumerate(problems):
        for step in range(len(problem.steps)):
            out.append((ExamplePlan(index, step, None), 1))
            if digitmath.applicable_kinds(problem, step):
                out.append((ExamplePlan(index, step, int(rng.integers(2**31))), 0))
    return out


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _verdict_scores(graphdef, state, inputs, query_end, positive_ids, negative_ids):
    """CPN p and mass at position `query_end[b]` (the last token of each judge query)."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(inputs)
    last = jnp.take_along_axis(hidden, query_end[:, None, None], axis=1)[:, 0]
    return cpn_scores(model.logits(last), positive_ids, negative_ids)


def judge_scores(
    model,
    examples: SFTExampleBuilder,
    plans: Sequence[ExamplePlan],
    *,
    batch_size: int,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """CPN p `[n]` and mass `[n]` of the judge queries described by `plans` (padded to fixed
    shapes, so one compilation serves every batch)."""
    graphdef, state = nnx.split(model)
    b = examples.builder
    ps, masses = [], []
    for start in tqdm(
        range(0, len(plans), batch_size), desc="judge", disable=not progress or None, leave=False
    ):
        chunk = list(plans[start : start + batch_size])
        n_real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n_real)  # keep the batch shape fixed
        batch = [examples.build(plan) for plan in chunk]
        stacked = {k: np.stack([ex[k] for ex in batch]) for k in batch[0]}
        inputs, _ = collate(b.model, stacked)
        # Each example ends with its verdict token; the query ends just before it.
        query_end = stacked["attention_mask"].sum(axis=1).astype(np.int32) - 2
        p, mass = _verdict_scores(
            graphdef, state, inputs, query_end, b.positive_ids, b.negative_ids
        )
        ps.append(np.asarray(p)[:n_real])
        masses.append(np.asarray(mass)[:n_real])
    return np.concatenate(ps), np.concatenate(masses)


def judge_auroc(
    model,
    examples: SFTExampleBuilder,
    *,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> dict:
    """AUROC of CPN p on gold vs corrupted steps of `examples.problems`, and accuracy at 0.7."""
    pairs = judge_plans(examples.problems, seed)
    labels = np.asarray([label for _, label in pairs])
    p, mass = judge_scores(
        model, examples, [plan for plan, _ in pairs], batch_size=batch_size, progress=progress
    )
    return {
        "judge_auroc": float(roc_auc_score(labels, p)),
        "judge_steps": len(labels),
        "judge_wrong_steps": int((labels == 0).sum()),
        "judge_accuracy_at_0.7": float(np.mean((p > 0.7) == (labels == 1))),
        "judge_format_mass": float(np.mean(mass)),
    }


def draft_step_judging(
    model,
    examples: SFTExampleBuilder,
    *,
    alpha: float,
    batch_size: int,
    progress: bool = True,
) -> dict:
    """How the judge treats the draft's own steps (what `dreamr` verifies), on the problems of
    `examples`, whose `draft_mistakes` hold the draft's first mistake per problem: the steps the
    draft wrote right (gold steps before its first mistake, all of a chain without one) against
    its first mistakes. AUROC, and the share of each accepted at `alpha`."""
    plans, labels = [], []
    for index, problem in enumerate(examples.problems):
        mistake = examples.draft_mistakes.get(index)
        right = mistake.step if mistake else len(problem.steps)
        plans += [ExamplePlan(index, step, None) for step in range(right)]
        labels += [1] * right
        if mistake:
            plans.append(ExamplePlan(index, mistake.step, 0))  # any seed: the mistake's text
            labels.append(0)
    labels = np.asarray(labels)
    p, _ = judge_scores(model, examples, plans, batch_size=batch_size, progress=progress)
    accepted = p > alpha
    return {
        "draft_steps_auroc": float(roc_auc_score(labels, p))
        if 0 < labels.sum() < len(labels)
        else float("nan"),
        "draft_right_steps": int(labels.sum()),
        "draft_mistakes": int((labels == 0).sum()),
        f"right_steps_accepted_at_{alpha}": float(accepted[labels == 1].mean()),
        f"mistakes_accepted_at_{alpha}": float(accepted[labels == 0].mean()),
    }
