"""Supervised examples from DigitMath problems: gold reasoning chains, and step judging.

A *reasoning* example is the prompt followed by the whole gold chain; the loss is on every step
token and the final EOS. A *judge* example is the prompt, the first k gold steps, a candidate
step k that is either the gold one or a realistic corruption of it (misread digit, arithmetic slip,
skipped or repeated step), the judge suffix, and the verdict word; the loss is on the gold steps
and the verdict. This is what the target's CPN score reads at inference. A share of the judge
examples asks SpecReason's question instead (rate the step 0-9; answered 9 or 0), so that peer can
run on the same target.

Examples are planned up front from the seed (which problem, which kind, which step, corrupted or
not) and built lazily by a grain `map`, so the dataset is random-access and its order is
reproducible and checkpointable. Every example is padded to fixed shapes (`seq_len` tokens,
`max_image_patches` patches) so one compiled train step serves the whole run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

import grain
import numpy as np

from dreamr_jax.config.schema import DataConfig
from dreamr_jax.data import digitmath, wordings
from dreamr_jax.data.draft_mistakes import DraftMistake
from dreamr_jax.data.prompts import PromptBuilder
from dreamr_jax.models.processor import process_images


@dataclasses.dataclass(frozen=True)
class ExamplePlan:
    """What one example is: `judge_step` is None for a reasoning example; `corrupt_seed` is
    None for a judge example whose candidate is the gold step; `score` asks for SpecReason's 0-9
    rating instead of CPN's yes/no."""

    problem: int
    judge_step: int | None = None
    corrupt_seed: int | None = None
    score: bool = False
    drill_seed: int | None = None  # an arithmetic drill (text only) instead of a problem
    # Judge branches packed after a reasoning example's chain: (step, corrupt_seed, score) each.
    branches: tuple[tuple[int, int | None, bool], ...] = ()
    fill_seed: int | None = None  # drill facts filling the rest of a reasoning example's row
    distort_seed: int | None = None  # the image's cells randomly distorted (digitmath.distort_cell)


def plan_examples(
    problems: Sequence[digitmath.Problem],
    judge_fraction: float,
    seed: int,
    score_fraction: float = 0.0,
    drill_fraction: float = 0.0,
    judge_branches: int = 0,
    pack_drills: bool = False,
    mistake_steps: Mapping[int, int] | None = None,
    distort_fraction: float = 0.0,
    read_pairs: bool = False,
    holdout_forms: Collection[str] = (),
    holdout_kinds: Collection[str] = (),
) -> list[ExamplePlan]:
    """One reasoning example per problem, plus judge examples and arithmetic drills so that they
    make up `judge_fraction` and `drill_fraction` of the total; half of the judge candidates are
    corrupted where a corruption applies, and `score_fraction` of them use the 0-9 format. With
    `judge_branches`, every reasoning example also carries up to that many judge queries on
    distinct steps, packed as branches (see `SFTExampleBuilder.token_ids`); with `pack_drills`,
    drill facts fill the rest of its row. `mistake_steps` (problem index -> step where the draft
    first went wrong, see `data.draft_mistakes`) makes that step one of the problem's branches,
    always corrupted: `SFTExampleBuilder` puts the draft's mistake there. `distort_fraction` of
    the reasoning examples show randomly distorted digit cells. With `read_pairs` (and
    `judge_branches`), every reading step of a chain is judged both ways in its row, gold and
    corrupted (yes/no format): the branches that complete a pair come after the others, so they
    are the ones left out when a row is full. No branch judges a step written in one of
    `holdout_forms`, and no query is corrupted where only `holdout_kinds` apply (held out to
    test the judge on); with neither, the plans are what they always were."""
    rng = np.random.default_rng([seed, 17])
    branch_rng = np.random.default_rng([seed, 31])
    if pack_drills:
        fill_seeds = np.random.default_rng([seed, 37]).integers(2**31, size=len(problems))
    distort_rng = np.random.default_rng([seed, 43])
    distort_seeds = [
        int(distort_rng.integers(2**31)) if distort_rng.random() < distort_fraction else None
        for _ in problems
    ]

    def query(rng, problem, step) -> tuple[int | None, bool]:
        """(corrupt_seed, score) of one judge query on `step`."""
        kinds = set(digitmath.applicable_kinds(problem, step)) - set(holdout_kinds)
        corrupt = rng.random() < 0.5 and bool(kinds)
        corrupt_seed = int(rng.integers(2**31)) if corrupt else None
        return corrupt_seed, bool(rng.random() < score_fraction)

    def judged(problem, step: int) -> bool:
        return not (holdout_forms and digitmath.written_in(problem.steps[step], holdout_forms))

    def branches(index: int, problem) -> tuple:
        order = branch_rng.permutation(len(problem.steps))
        steps = [int(k) for k in order if judged(problem, int(k))][:judge_branches]
        out = [(k, *query(branch_rng, problem, k)) for k in sorted(steps)]
        mistake = (mistake_steps or {}).get(index)
        if mistake is None:
            return tuple(out)
        # The draft's mistake replaces the query on its step, or the last drawn one. (Its own
        # random stream: the other problems' plans stay what they are without mistakes.)
        mistake_rng = np.random.default_rng([seed, 41, index])
        score = bool(mistake_rng.random() < score_fraction)
        others = [q for q in out if q[0] != mistake][: judge_branches - 1]
        return tuple(sorted([*others, (mistake, int(mistake_rng.integers(2**31)), score)]))

    def with_read_pairs(index: int, problem, drawn: tuple) -> tuple:
        """`drawn` plus whatever judging each reading step both ways needs. A pair judges the
        same context twice, so its only difference is the digits, the weakest thing the judge
        checks (run 11: misreads against gold steps AUROC 0.87, every other kind 0.94-0.97).
        (Its own random stream, so the drawn branches stay what they are.)"""
        pair_rng = np.random.default_rng([seed, 47, index])
        extra = []
        for k, step in enumerate(problem.steps):
            if not digitmath.is_reading_step(step) or not judged(problem, k):
                continue
            # Whether each yes/no query already drawn on step k has a corrupted candidate.
            corrupted = [seed is not None for at, seed, score in drawn if at == k and not score]
            if not any(corrupted):
                extra.append((k, int(pair_rng.integers(2**31)), False))
            if all(corrupted):  # (also when none was drawn)
                extra.append((k, None, False))
        return drawn + tuple(extra)

    def all_branches(index: int, problem) -> tuple:
        drawn = branches(index, problem)
        return with_read_pairs(index, problem, drawn) if read_pairs else drawn

    plans = [
        ExamplePlan(
            i,
            branches=all_branches(i, p) if judge_branches else (),
            fill_seed=int(fill_seeds[i]) if pack_drills else None,
            distort_seed=distort_seeds[i],
        )
        for i, p in enumerate(problems)
    ]
    rest = max(1e-9, 1 - judge_fraction - drill_fraction)
    n_judge = round(len(problems) * judge_fraction / rest)
    for _ in range(n_judge):
        index = int(rng.integers(len(problems)))
        problem = problems[index]
        step = int(rng.integers(len(problem.steps)))
        plans.append(ExamplePlan(index, step, *query(rng, problem, step)))
    drills = np.random.default_rng([seed, 23]).integers(
        2**31, size=round(len(problems) * drill_fraction / rest)
    )
    plans += [ExamplePlan(0, drill_seed=int(d)) for d in drills]
    return plans


# Operand ranges of every operation the families write, so drills cover exactly the chains'
# arithmetic: digit sums, running sums, a row number plus a constant, a row number minus one,
# row-sum differences, running products.
_DRILLS = (
    ("+", (0, 10), lambda a: (0, 10)),
    ("+", (0, 244), lambda a: (0, 82)),
    ("+", (10, 1000), lambda a: (1, 100)),
    ("-", (10, 1000), lambda a: (1, min(99, a) + 1)),
    ("-", (0, 37), lambda a: (0, a + 1)),
    ("*", (0, 82), lambda a: (0, 10)),
)


def arithmetic_fact(rng: np.random.Generator) -> tuple[str, str]:
    """One operation in the exact step form of the chains, split after its operands:
    ("54 + 48 =", " 94 + 8 = 102.")."""
    symbol, (lo, hi), second = _DRILLS[int(rng.integers(len(_DRILLS)))]
    a = int(rng.integers(lo, hi))
    b = int(rng.integers(*second(a)))
    step, _ = digitmath.operation_step(a, symbol, b)
    head, tail = step.split(" =", 1)
    return head + " =", tail


def judge_candidate(
    problem: digitmath.Problem,
    step: int,
    corrupt_seed: int | None,
    content_weight: float = 1.0,
    exclude_kinds: Collection[str] = (),
) -> tuple[str, bool]:
    """The candidate for judging `step` (gold, or corrupted from `corrupt_seed`, content errors
    drawn with `content_weight` times the odds, never a kind of `exclude_kinds`) and whether it
    is correct."""
    if corrupt_seed is None:
        return problem.steps[step], True
    rng = np.random.default_rng(corrupt_seed)
    text, _ = digitmath.corrupt_step(
        problem, step, rng, content_weight=content_weight, exclude=exclude_kinds
    )
    return text, False


def is_final_step(text: str) -> bool:
    """Whether a step states the answer (and so ends the chain with EOS)."""
    return digitmath.extract_answer(text) is not None


class SFTExampleBuilder:
    """Turns an `ExamplePlan` into padded arrays (see `build`)."""

    def __init__(
        self,
        problems: Sequence[digitmath.Problem],
        builder: PromptBuilder,
        processor,
        data: DataConfig,
        draft_mistakes: Mapping[int, DraftMistake] | None = None,
    ):
        """draft_mistakes: problem index -> the draft's first mistake on it, the candidate of
        every corrupted query on that step."""
        self.problems, self.builder, self.processor, self.data = problems, builder, processor, data
        self.draft_mistakes = dict(draft_mistakes or {})

    @classmethod
    def for_evaluation(
        cls,
        problems,
        builder: PromptBuilder,
        processor,
        data: DataConfig,
        draft_mistakes: Mapping[int, DraftMistake] | None = None,
    ):
        """A builder whose judge candidates are drawn the same way in every run (uniform
        corruption kinds), so that judge metrics compare across training recipes."""
        data = dataclasses.replace(data, content_error_weight=1.0)
        return cls(problems, builder, processor, data, draft_mistakes)

    def drill_ids(self, seed: int, room: int) -> tuple[list[int], list[float]]:
        """Arithmetic facts, one step each, filling up to `room` tokens, and with
        `data.count_drill_fraction` count_greater fragments (a reading step, then its count).
        Only results (and counts) carry loss: the operands are random, so their tokens would
        add irreducible noise to the gradient."""
        rng = np.random.default_rng(seed)
        ids: list[int] = []
        weights: list[float] = []
        while True:
            # (The draw only happens when counts are on, so arithmetic-only drills keep the
            # random stream they always had.)
            if self.data.count_drill_fraction and rng.random() < self.data.count_drill_fraction:
                reading, count = digitmath.count_drill(rng)
                head = self.builder.step_ids(reading, final=False)
                tail = self.builder.step_ids(count, final=False)
            else:
                question, answer = arithmetic_fact(rng)
                head = self.builder.encode(question)
                tail = self.builder.step_ids(answer, final=False)
            if len(ids) + len(head) + len(tail) > room:
                return ids, weights
            ids += head + tail
            weights += [0.0] * len(head) + [1.0] * len(tail)

    def _chain(
        self, steps: Sequence[str], complete: bool
    ) -> tuple[list[int], list[float], list[int]]:
        """Gold steps' ids (as `PromptBuilder.steps_ids`), their loss weights, and the number of
        tokens before each step. Reading steps weigh `data.read_loss_weight`: they are the only
        steps that need the image, so all of the vision tower's gradient comes through them,
        and a model that does not start reading early may never start (run 8: 6.5% val)."""
        ids: list[int] = []
        weights: list[float] = []
        starts: list[int] = []
        for i, step in enumerate(steps):
            step_ids = self.builder.step_ids(step, final=complete and i == len(steps) - 1)
            weight = self.data.read_loss_weight if digitmath.is_reading_step(step) else 1.0
            starts.append(len(ids))
            ids += step_ids
            weights += [weight] * len(step_ids)
        return ids, weights, starts

    def _judge_query(self, index: int, step: int, corrupt_seed, score: bool):
        """(query ids: candidate + suffix, verdict id) of judging `step` of problem `index`."""
        b = self.builder
        mistake = self.draft_mistakes.get(index)
        if corrupt_seed is not None and mistake is not None and mistake.step == step:
            text, correct = mistake.text, False
        else:
            text, correct = judge_candidate(
                self.problems[index],
                step,
                corrupt_seed,
                self.data.content_error_weight,
                self.data.judge_holdout_kinds,
            )
        query = b.judge_ids(b.step_ids(text, final=is_final_step(text)), score=score)
        return query, b.verdict_id(correct, score=score)

    def token_ids(self, plan: ExamplePlan, grid) -> tuple[list[int], list[float], list, list]:
        """Token ids, the loss weight of each (0 for context; the judge's verdict weighs
        `data.judge_loss_weight`, since it is one token against a chain of dozens), and the
        branch id and visible-prefix length of each (see `models.inputs.branch_layout`).

        A reasoning example with `plan.branches` is the prompt and gold chain, then one branch
        per judged step k: candidate + judge suffix + verdict, seeing the prompt and gold steps
        < k. Branches that would overflow `data.seq_len` are left out."""
        b, problem = self.builder, self.problems[plan.problem]
        prompt = b.prompt_ids(problem.question, [grid])
        if plan.judge_step is None:
            chain, chain_weights, starts = self._chain(problem.steps, complete=True)
            ids = prompt + chain
            weights = [0.0] * len(prompt) + chain_weights
            branch, visible = [0] * len(ids), list(range(1, len(ids) + 1))

            def add_branch(tokens: list[int], token_weights: list[float], seen: int) -> None:
                """Appends a branch that sees the first `seen` main tokens."""
                branch.extend([branch[-1] + 1] * len(tokens))
                visible.extend([seen] * len(tokens))
                ids.extend(tokens)
                weights.extend(token_weights)

            for step, corrupt_seed, score in plan.branches:
                query, verdict = self._judge_query(plan.problem, step, corrupt_seed, score)
                if len(ids) + len(query) + 1 > self.data.seq_len:
                    continue
                # (Only the last step ends with EOS, and it is never before a judged one.)
                add_branch(
                    query + [verdict],
                    [0.0] * len(query) + [self.data.judge_loss_weight],
                    seen=len(prompt) + starts[step],
                )
            if plan.fill_seed is not None:
                # A branch that sees no main token is a sequence of its own, positions from 0.
                add_branch(*self.drill_ids(plan.fill_seed, self.data.seq_len - len(ids)), seen=0)
            return ids, weights, branch, visible
        context, context_weights, _ = self._chain(problem.steps[: plan.judge_step], complete=False)
        query, verdict = self._judge_query(
            plan.problem, plan.judge_step, plan.corrupt_seed, plan.score
        )
        ids = prompt + context + query + [verdict]
        mask = [0.0] * len(prompt) + context_weights + [0.0] * len(query)
        return (
            ids,
            mask + [self.data.judge_loss_weight],
            [0] * len(ids),
            list(range(1, len(ids) + 1)),
        )

    def build(self, plan: ExamplePlan) -> dict[str, np.ndarray]:
        """input_ids/attention_mask `[seq_len]`, loss_mask `[seq_len]` float32 weights,
        pixel_values `[max_image_patches, patch_dim]`, num_patches `[]` (0 for a drill, which
        has no image), image_grid_thw `[1, 3]`."""
        problem = self.problems[plan.problem]
        patch_dim = self.builder.model.vision.patch_dim
        if plan.drill_seed is not None:
            pixel_values, grid = np.zeros((0, patch_dim), np.float32), np.zeros((1, 3), np.int64)
            ids, mask = self.drill_ids(plan.drill_seed, self.data.seq_len)
            branch, visible = [0] * len(ids), list(range(1, len(ids) + 1))
        else:
            image = digitmath.problem_image(problem, plan.distort_seed)
            pixel_values, grid = process_images(self.processor, [image])
            ids, mask, branch, visible = self.token_ids(plan, grid[0].tolist())
        seq_len, max_patches = self.data.seq_len, self.data.max_image_patches
        if len(ids) > seq_len:
            raise ValueError(
                f"problem {problem.id}: example of {len(ids)} tokens exceeds data.seq_len={seq_len}"
            )
        if len(pixel_values) > max_patches:
            raise ValueError(
                f"problem {problem.id}: image of {len(pixel_values)} patches exceeds "
                f"data.max_image_patches={max_patches}"
            )
        n = len(ids)
        out_ids = np.full(seq_len, self.builder.model.pad_token_id, np.int32)
        out_ids[:n] = ids
        attention = np.zeros(seq_len, bool)
        attention[:n] = True
        loss_mask = np.zeros(seq_len, np.float32)
        loss_mask[:n] = mask
        patches = np.zeros((max_patches, patch_dim), np.float32)
        patches[: len(pixel_values)] = pixel_values
        out = {
            "input_ids": out_ids,
            "attention_mask": attention,
            "loss_mask": loss_mask,
            "pixel_values": patches,
            "num_patches": np.asarray(len(pixel_values), np.int32),
            "image_grid_thw": grid.astype(np.int64),
        }
        if self.data.judge_branches or self.data.pack_drills:  # every row has the tree layout
            out["branch"] = np.zeros(seq_len, np.int32)
            out["branch"][:n] = branch
            out["visible"] = np.arange(1, seq_len + 1, dtype=np.int32)
            out["visible"][:n] = visible
        return out


def sft_dataset(
    problems: Sequence[digitmath.Problem],
    builder: PromptBuilder,
    processor,
    data: DataConfig,
    seed: int,
    draft_mistakes: Mapping[int, DraftMistake] | None = None,
) -> grain.MapDataset:
    """A random-access grain dataset of padded SFT examples (reasoning, then judge ones)."""
    unknown = set(data.judge_holdout_forms) - set(wordings.FORM_NAMES)
    if unknown:
        raise ValueError(f"data.judge_holdout_forms: unknown forms {sorted(unknown)}")
    mistakes = {
        i: m
        for i, m in (draft_mistakes or {}).items()
        if not digitmath.written_in(m.text, data.judge_holdout_forms)
    }
    plans = plan_examples(
        problems,
        data.judge_fraction,
        seed,
        data.score_fraction,
        data.drill_fraction,
        data.judge_branches,
        data.pack_drills,
        {i: m.step for i, m in mistakes.items()},
        data.distort_fraction,
        data.read_pairs,
        data.judge_holdout_forms,
        data.judge_holdout_kinds,
    )
    examples = SFTExampleBuilder(problems, builder, processor, data, mistakes)
    return grain.MapDataset.source(plans).map(examples.build)
