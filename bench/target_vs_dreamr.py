"""The target alone against `dreamr` at alpha 1 (the target's exact outputs), nothing else loaded:
the same DigitMath test problems, alternating which mode goes first, in several passes back to
back in one process. It shows how much the ratio moves with the machine between passes.

    python bench/target_vs_dreamr.py [--problems 200] [--passes 3]
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
    args = parser.parse_args()
    prompt = PromptConfig()
    target = load_checkpoint(str(DEFAULT_TARGET), prompt)
    draft = load_checkpoint(str(DEFAULT_DRAFT), prompt)
    engines = {
        "target": Engine(target, draft, SpecConfig(mode="target")),
        "dreamr": Engine(target, draft, SpecConfig(mode="dreamr", alpha=1.0)),
    }
    for engine in engines.values():
        warm_up(engine, 2)
    problems = digitmath.generate_problems("test", args.problems, 0)
    images = [problem_image(p) for p in problems]
    for n in range(args.passes):
        latency: dict[str, list[float]] = {name: [] for name in engines}
        for i, (problem, image) in enumerate(zip(problems, images, strict=True)):
            for name in ("target", "dreamr") if i % 2 == 0 else ("dreamr", "target"):
                latency[name].append(engines[name].solve(problem.question, [image]).latency_s)
        t, d = np.mean(latency["target"]), np.mean(latency["dreamr"])
        per_problem = np.median(np.array(latency["target"]) / np.array(latency["dreamr"]))
        print(
            f"pass {n}: target {t * 1e3:.1f} ms, dreamr {d * 1e3:.1f} ms, {t / d:.2f}x "
            f"(median per-problem ratio {per_problem:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
