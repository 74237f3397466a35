"""The target alone against `exact` (the judge-free lossless path) and `dreamr` (CPN at the shipped
alpha), nothing else loaded: the same DigitMath test problems, the modes in rotating order
problem by problem, in several passes back to back in one process. It shows the two methods side
by side (a speedup of `exact` is not DREAM-R's) and how much each ratio moves with the machine
between passes. `--modes` picks others: any mode, and `dreamr-host` (dreamr run by its host loop,
the baseline of its device loop).

    python bench/target_vs_dreamr.py [--problems 200] [--passes 3] [--modes target,exact,dreamr]
"""

from __future__ import annotations

import argparse

import numpy as np

from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.sft import problem_image
from dreamr_jax.serve.batch import warm_up
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT, DEFAULT_TARGET, load_checkpoint
from dreamr_jax.spec.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--modes", default="target,exact,dreamr")
    args = parser.parse_args()
    names = args.modes.split(",")
    if "target" not in names:
        parser.error("--modes must include target: every ratio is against it")
    prompt = PromptConfig()
    target = load_checkpoint(str(DEFAULT_TARGET), prompt)
    draft = load_checkpoint(str(DEFAULT_DRAFT), prompt)
    engines = {
        name: Engine(
            target,
            draft,
            SpecConfig(mode=name.removesuffix("-host")),
            host_loop=name.endswith("-host"),
        )
        for name in names
    }
    for engine in engines.values():
        warm_up(engine, 2)
    problems = digitmath.generate_problems("test", args.problems, 0)
    images = [problem_image(p) for p in problems]
    for n in range(args.passes):
        latency: dict[str, list[float]] = {name: [] for name in names}
        texts: dict[str, list[str]] = {name: [] for name in names}
        correct: dict[str, list[bool]] = {name: [] for name in names}
        for i, (problem, image) in enumerate(zip(problems, images, strict=True)):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                sol = engines[name].solve(problem.question, [image])
                text = engines[name].decode(sol.tokens)
                latency[name].append(sol.latency_s)
                texts[name].append(text)
                answer = digitmath.extract_answer(text)
                correct[name].append(digitmath.is_correct(answer, problem.answer))
        base = np.array(latency["target"])
        parts = []
        for name in names:
            mine = np.array(latency[name])
            same = np.mean([a == b for a, b in zip(texts[name], texts["target"], strict=True)])
            parts.append(
                f"{name} {mine.mean() * 1e3:.1f} ms {base.mean() / mine.mean():.2f}x "
                f"(median per problem {np.median(base / mine):.2f}x), "
                f"accuracy {np.mean(correct[name]):.1%}, output = target {same:.0%}"
            )
        print(f"pass {n}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
