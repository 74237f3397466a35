"""The shipped DigitMath pair on held-out test problems: greedy final-answer accuracy of target and
draft, the AUROC of the target's CPN score on correct vs corrupted steps and on the draft's own
right steps vs its first mistakes, and the per-token greedy decode time of both models at batch 1,
measured side by side in one run.

    python bench/digitmath_eval.py [--problems 500] [--judge-problems 250] [--repeats 5]
                                   [--target checkpoints/digitmath/target]
                                   [--draft checkpoints/digitmath/draft]
                                   [--out docs/digitmath_eval.json]

Decode time: after a warm-up, `prefill + N greedy tokens` is timed for N = 1 and N = 65 with EOS
disabled (so both lengths are exact); per-token time = (t_65 - t_1) / 64, median over repeats,
the two models alternating so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from flax import nnx

from dreamr_jax.config import load_config
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.data.draft_mistakes import mistakes_of
from dreamr_jax.data.sft import SFTExampleBuilder
from dreamr_jax.models.generate import decode_loop, prefill
from dreamr_jax.models.inputs import prepare_inputs
from dreamr_jax.models.kv_cache import init_cache
from dreamr_jax.models.processor import process_images
from dreamr_jax.models.sampling import GREEDY
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT, DEFAULT_TARGET, load_checkpoint
from dreamr_jax.train.evaluate import draft_step_judging, greedy_solve, judge_auroc


def n_params(model) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def decode_timer(loaded, problem):
    """A function n -> seconds for prefill + n greedy tokens (EOS off) at batch 1."""
    model, builder = loaded.model, loaded.builder
    pixel_values, grid = process_images(loaded.processor, [problem_image(problem)])
    ids = np.asarray([builder.prompt_ids(problem.question, [grid[0].tolist()])])
    inputs, _ = prepare_inputs(model.config, ids, None, pixel_values, grid)
    graphdef, state = nnx.split(model)
    max_len = ids.shape[1] + 80

    def run(n: int) -> float:
        started = time.perf_counter()
        cache = init_cache(model.config.text, 1, max_len, model.dtype)
        logits, cache = prefill(graphdef, state, inputs, cache)
        out, _ = decode_loop(graphdef, state, logits, cache, jax.random.key(0), n, GREEDY, (), -1)
        jax.block_until_ready(out)
        return time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--judge-problems", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    parser.add_argument("--config", default="configs/digitmath/target.yaml")
    parser.add_argument("--out", default="docs/digitmath_eval.json")
    args = parser.parse_args()

    cfg = load_config(args.config)
    models = {
        "target": load_checkpoint(args.target, cfg.prompt),
        "draft": load_checkpoint(args.draft, cfg.prompt),
    }
    problems = digitmath.generate_problems("test", args.problems, args.seed)
    report: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "jax": jax.__version__,
        "test_problems": len(problems),
        "seed": args.seed,
    }
    chains = {}
    for name, loaded in models.items():
        started = time.perf_counter()
        results = greedy_solve(
            loaded.model,
            loaded.builder,
            loaded.processor,
            problems,
            batch_size=50,
            max_new_tokens=cfg.eval.max_new_tokens,
        )
        chains[name] = results
        by_family: dict[str, list[bool]] = {}
        for problem, r in zip(problems, results, strict=True):
            by_family.setdefault(problem.family, []).append(r["correct"])
        report[name] = {
            "path": os.path.relpath(loaded.path),
            "params": n_params(loaded.model),
            "accuracy": float(np.mean([r["correct"] for r in results])),
            "accuracy_by_family": {k: float(np.mean(v)) for k, v in sorted(by_family.items())},
            "mean_new_tokens": float(np.mean([r["new_tokens"] for r in results])),
            "eval_s": time.perf_counter() - started,
        }
        print(name, json.dumps(report[name]), flush=True)

    target = models["target"]
    judge_set = problems[: args.judge_problems]
    examples = SFTExampleBuilder.for_evaluation(
        judge_set, target.builder, target.processor, cfg.data
    )
    report["target"]["cpn"] = judge_auroc(target.model, examples, seed=args.seed, batch_size=50)
    print("cpn", json.dumps(report["target"]["cpn"]), flush=True)
    # The steps dreamr puts to the judge: the draft's own, right ones and first mistakes.
    draft_chains = chains["draft"][: args.judge_problems]
    mistakes = mistakes_of(
        judge_set, [r["output"] for r in draft_chains], [r["finished"] for r in draft_chains]
    )
    examples = SFTExampleBuilder.for_evaluation(
        judge_set, target.builder, target.processor, cfg.data, mistakes
    )
    report["target"]["cpn_on_draft_steps"] = draft_step_judging(
        target.model, examples, alpha=0.7, batch_size=50
    )
    print("cpn on draft steps", json.dumps(report["target"]["cpn_on_draft_steps"]), flush=True)

    timers = {name: decode_timer(loaded, problems[0]) for name, loaded in models.items()}
    for timer in timers.values():  # compile both lengths
        timer(1), timer(65)
    per_token: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(args.repeats):
        for name, timer in timers.items():
            short, long = timer(1), timer(65)
            per_token[name].append((long - short) / 64)
    medians = {name: statistics.median(v) for name, v in per_token.items()}
    report["decode_ms_per_token"] = {name: 1e3 * v for name, v in medians.items()}
    report["decode_time_ratio_target_over_draft"] = medians["target"] / medians["draft"]
    print("decode", json.dumps(report["decode_ms_per_token"]), flush=True)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    t, d = report["target"], report["draft"]
    ratio = report["decode_time_ratio_target_over_draft"]
    print(
        f"\n{len(problems)} test problems: target {t['accuracy']:.1%} ({t['params'] / 1e6:.2f}M), "
        f"draft {d['accuracy']:.1%} ({d['params'] / 1e6:.2f}M); CPN AUROC "
        f"{t['cpn']['judge_auroc']:.4f} on {t['cpn']['judge_steps']} steps "
        f"({t['cpn']['judge_wrong_steps']} wrong); decode {medians['target'] * 1e3:.2f} vs "
        f"{medians['draft'] * 1e3:.2f} ms/token = {ratio:.1f}x"
        f"\nwritten to {args.out}"
    )


if __name__ == "__main__":
    main()
