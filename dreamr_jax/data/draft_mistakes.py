"""The draft's own mistakes, as judge negatives for the target.

Synthetic corruptions (misread digit, slip of 1-3, skipped or repeated step) teach the judge what
wrong steps look like, but the steps it must reject at serve time are the draft's, and those are
wrong in their own ways (a product off by 20, a count of the wrong digits). So the target's data
can also judge, for some train problems, the first step where the draft's greedy chain leaves
the gold one: the draft's chain is the gold chain up to there (a deterministic template), so the
step is judged in exactly the context the engine verifies it in.

A step is wrong when it does not state the gold step's fact in one of the task's wordings
(`digitmath.is_correct_step`): a correct step written in other words than the gold one is not a
mistake.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

from dreamr_jax.data import digitmath


@dataclasses.dataclass(frozen=True)
class DraftMistake:
    """The draft's text for step `step` of a problem, its first step that is not correct."""

    step: int
    text: str


def first_mistake(problem: digitmath.Problem, output: str, finished: bool) -> DraftMistake | None:
    """Where a generated chain `output` (steps joined by the delimiter) first writes a step that
    is not a correct wording of the gold step there, or None if it never does. A last step cut
    off by the token budget (`finished` False) is not a mistake the draft made, so it does not
    count."""
    steps = [s.strip() for s in output.split("\n\n")]
    while steps and not steps[-1]:
        steps.pop()
    for index in range(len(problem.steps)):
        if index >= len(steps):
            return None  # stopped early: nothing wrong was written
        if not digitmath.is_correct_step(problem, index, steps[index]):
            if index == len(steps) - 1 and not finished:
                return None
            return DraftMistake(index, steps[index])
    return None


def save_mistakes(path: str, mistakes: Mapping[int, DraftMistake], meta: Mapping) -> None:
    """JSON: `meta` (what produced them) and the mistakes keyed by problem index."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    body = {str(i): dataclasses.asdict(m) for i, m in sorted(mistakes.items())}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": dict(meta), "mistakes": body}, f, indent=1)
    os.replace(tmp, path)  # a killed run never leaves half a file to resume from


def load_mistakes(path: str, meta: Mapping) -> dict[int, DraftMistake] | None:
    """The mistakes saved at `path` if they were produced as `meta` says, else None."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    if saved.get("meta") != dict(meta):
        return None
    return {int(i): DraftMistake(**m) for i, m in saved["mistakes"].items()}


def mistakes_of(
    problems: Sequence[digitmath.Problem], outputs: Sequence[str], finished: Sequence[bool]
) -> dict[int, DraftMistake]:
    """Problem index -> the first mistake of its generated chain, for chains that have one."""
    found = {}
    for index, (problem, output, done) in enumerate(zip(problems, outputs, finished, strict=True)):
        mistake = first_mistake(problem, output, done)
        if mistake is not None:
            found[index] = mistake
    return found
