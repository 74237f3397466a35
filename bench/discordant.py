"""Where `dreamr` and the target alone disagree on the answer, and why: for each test problem one
of them gets right and the other wrong, the committed steps the draft wrote (in whole or in part)
that the step checker calls wrong, i.e. the judge's false accepts.

    python bench/discordant.py [--problems 500] [--alpha A] > discordant.txt

Greedy, so the same command gives the same lines. The last line counts the problems by which side
was right and whether a wrong draft step was accepted.
"""

from __future__ import annotations

import argparse
import collections

from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.serve.checkpoints import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    load_checkpoint,
    pair_alpha,
)
from dreamr_jax.speculative.engine import Engine


def wrong_draft_steps(engine: Engine, problem, solution) -> list[tuple[int, str]]:
    """(index, text) of the chain's steps that hold tokens of an accepted draft unit and that
    the step checker calls wrong as step `index` of the problem."""
    by_draft, at = set(), 0
    for record in solution.steps:
        if record.committed:
            if record.author == "draft":
                by_draft.update(range(at, at + len(record.tokens)))
            at += len(record.tokens)
    wrong, at = [], 0
    for k, step in enumerate(engine.split_steps(solution.tokens)):
        span = range(at, at + len(step.tokens))
        at += len(step.tokens)
        drafted = any(t in by_draft for t in span)
        if drafted and k < len(problem.facts):
            if not digitmath.is_correct_step(problem, k, step.text.strip()):
                wrong.append((k, step.text.strip()))
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=None, help="default: the calibrated one")
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    args = parser.parse_args()
    alpha = pair_alpha(args.target, args.draft, args.alpha)
    prompt = PromptConfig()
    target = load_checkpoint(args.target, prompt)
    draft = load_checkpoint(args.draft, prompt)
    alone = Engine(target, draft, SpecConfig(mode="target"))
    dreamr = Engine(target, draft, SpecConfig(mode="dreamr", alpha=alpha))
    counts: collections.Counter = collections.Counter()
    for i, problem in enumerate(digitmath.generate_problems("test", args.problems, 0)):
        image = problem_image(problem)
        answers = {}
        for name, engine in (("target", alone), ("dreamr", dreamr)):
            sol = engine.solve(problem.question, [image])
            text = engine.decode(sol.tokens)
            answers[name] = (
                digitmath.is_correct(digitmath.extract_answer(text), problem.answer),
                sol,
            )
        if answers["target"][0] == answers["dreamr"][0]:
            continue
        right = "target" if answers["target"][0] else "dreamr"
        wrong = wrong_draft_steps(dreamr, problem, answers["dreamr"][1])
        counts[(f"{right} right", "wrong draft step accepted" if wrong else "none accepted")] += 1
        print(f"test {i}: {right} right; wrong draft steps committed: {wrong}", flush=True)
    print(f"alpha {alpha}: {dict(counts)}")


if __name__ == "__main__":
    main()
