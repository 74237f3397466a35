"""Throughput with requests in flight together (continuous batching, `serve.py batch_size=N`):
`target`, `exact` and `dreamr` (at the pair's calibrated alpha) at each batch size on the same
DigitMath test problems, in passes back to back in one process; in each pass every (mode, batch
size) answers all problems, in rotating order. Throughput is problems per second of wall-clock
(prompt preparation included, as `serve.py` counts it); each mode's is set against the target's
at the same batch size, as the median of the passes and their spread. Beside it: accuracy, mean
latency, target passes per problem, and the share of problems whose output equals the same
mode's at batch size 1 (greedy: it should be all of them, near-ties aside).

    python bench/batched.py [--problems 200] [--passes 3] [--rows 1,8]
        [--modes target,exact,dreamr] [--alpha A] [--out docs/batched.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from target_vs_dreamr import write_record

from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.provenance import provenance
from dreamr_jax.serve.batch import warm_up
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT, DEFAULT_TARGET, load_checkpoint, pair_alpha
from dreamr_jax.speculative.batch import RowBatch
from dreamr_jax.speculative.engine import Engine


def answer_all(engine: Engine, problems, images, rows: int) -> tuple[float, list]:
    """Every problem through a batch of `rows` rows refilled as rows finish: the wall-clock
    seconds and the solutions in problem order."""
    batch, queue, solved = RowBatch(engine, rows), list(range(len(problems))), {}
    began = time.perf_counter()
    while queue or batch.busy:
        while queue and batch.free:
            i = queue.pop(0)
            started = time.perf_counter()
            ids, inputs = engine.prompt(problems[i].question, [images[i]])
            batch.admit(ids, inputs, i, started)
        solved.update(batch.run())
    return time.perf_counter() - began, [solved[i] for i in range(len(problems))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--modes", default="target,exact,dreamr")
    parser.add_argument("--alpha", type=float, default=None, help="default: the calibrated one")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    origin = provenance()  # at the start: commits made while it runs are not what it ran
    target = load_checkpoint(DEFAULT_TARGET, PromptConfig())
    draft = load_checkpoint(DEFAULT_DRAFT, PromptConfig())
    alpha = pair_alpha(DEFAULT_TARGET, DEFAULT_DRAFT, args.alpha)
    print(f"alpha {alpha}", flush=True)
    modes, sizes = args.modes.split(","), [int(r) for r in args.rows.split(",")]
    engines = {m: Engine(target, draft, SpecConfig(mode=m, alpha=alpha)) for m in modes}
    for engine in engines.values():
        for rows in sizes:
            warm_up(engine, 2, rows)
    problems = digitmath.generate_problems("test", args.problems, 0)
    images = [problem_image(p) for p in problems]
    runs = [(m, r) for r in sizes for m in modes]
    passes, first = [], {}
    for n in range(args.passes):
        result = {}
        for mode, rows in runs[n % len(runs) :] + runs[: n % len(runs)]:
            seconds, sols = answer_all(engines[mode], problems, images, rows)
            texts = [engines[mode].decode(s.tokens) for s in sols]
            first.setdefault((mode, rows), texts)
            result[f"{mode}@{rows}"] = {
                "throughput": len(problems) / seconds,
                "accuracy": float(
                    np.mean(
                        [
                            digitmath.is_correct(digitmath.extract_answer(t), p.answer)
                            for t, p in zip(texts, problems, strict=True)
                        ]
                    )
                ),
                "mean_latency_ms": float(np.mean([s.latency_s for s in sols]) * 1e3),
                "target_calls": float(np.mean([s.target_calls for s in sols])),
                "equals_batch_1": float(
                    np.mean([a == b for a, b in zip(texts, first[(mode, 1)], strict=True)])
                )
                if (mode, 1) in first
                else None,
            }
        for mode, rows in runs:
            mine = result[f"{mode}@{rows}"]
            mine["vs_target"] = mine["throughput"] / result[f"target@{rows}"]["throughput"]
        passes.append(result)
        print(
            f"pass {n}: "
            + "; ".join(
                f"{name} {r['throughput']:.2f}/s {r['vs_target']:.2f}x acc {r['accuracy']:.1%} "
                f"latency {r['mean_latency_ms']:.0f} ms"
                for name, r in result.items()
            ),
            flush=True,
        )
    summary = {}
    for name in passes[0]:
        ratios = [p[name]["vs_target"] for p in passes]
        rates = [p[name]["throughput"] for p in passes]
        summary[name] = {
            "vs_target_median": float(np.median(ratios)),
            "vs_target_min": float(min(ratios)),
            "vs_target_max": float(max(ratios)),
            "throughput_median": float(np.median(rates)),
            **{k: passes[-1][name][k] for k in ("accuracy", "target_calls", "equals_batch_1")},
        }
        print(
            f"{name}: {np.median(rates):.2f} problems/s, {np.median(ratios):.2f}x the target "
            f"at its batch size ({min(ratios):.2f}-{max(ratios):.2f}x over {len(passes)} passes)"
        )
    write_record(
        args.out,
        {
            "alpha": alpha,
            "problems": args.problems,
            "passes": passes,
            "summary": summary,
            **origin,
        },
    )


if __name__ == "__main__":
    main()
