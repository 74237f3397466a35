"""The target alone against `exact` (the judge-free lossless path) and `dreamr` (CPN at the pair's
calibrated alpha), nothing else loaded: the same DigitMath test problems, the modes in rotating
order problem by problem, in several passes back to back in one process. It shows the two methods
side by side (a speedup of `exact` is not DREAM-R's) and how much each ratio moves with the
machine between passes; the summary gives the median of the passes and their spread. `--modes`
picks others: any mode, `dreamr-host` (dreamr run by its host loop, the baseline of its
device loop), and spec settings after a colon (`dreamr:schedule=fpsr:fallback=eager`).
`--sampled 0.7` adds `target@0.7` and `dreamr@0.7`, both sampling at that temperature (seeded:
the same draws in every pass), the second timed against the first.

    python bench/target_vs_dreamr.py [--problems 500] [--passes 3] [--modes target,exact,dreamr]
        [--sampled T] [--alpha A] [--target T] [--draft D] [--out docs/pair.json]

Counters beside the times, per problem: target passes (`target_calls`), steps the draft wrote
(`drafted_steps`, kept or not), the share of committed tokens the draft wrote, and tokens per
chain; and of the steps the judge accepted, the share that
are wrong (`accepted_wrong`, by the step checker against the gold step at the same index).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.provenance import provenance
from dreamr_jax.serve.batch import warm_up
from dreamr_jax.serve.checkpoints import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    calibrated_alpha,
    load_checkpoint,
    pair_alpha,
)
from dreamr_jax.speculative.engine import Engine
from dreamr_jax.speculative.records import Solution


def draft_share(sol: Solution) -> float:
    """Share of the committed tokens written by the draft."""
    committed = [s for s in sol.steps if s.committed]
    total = sum(len(s.tokens) for s in committed)
    return sum(len(s.tokens) for s in committed if s.author == "draft") / max(1, total)


def kept_share(sol: Solution) -> float:
    """Share of the committed tokens in steps the draft wrote that were kept as it wrote them:
    those the judge accepted (`draft_share`) and those it refused that were the target's own
    step word for word (recorded as a refused draft step, then the same tokens as the
    target's). Only `dreamr`'s records show the second kind; `exact`'s show neither."""
    committed, kept, before = 0, 0, None
    for s in sol.steps:
        if s.committed:
            committed += len(s.tokens)
            own = before is not None and s.author == "target" and s.tokens == before.tokens
            kept += len(s.tokens) if s.author == "draft" or own else 0
        before = None if s.committed or s.author != "draft" else s
    return kept / max(1, committed)


def judged_steps(sol: Solution, text: str, delimiter: str = digitmath.STEP_DELIMITER):
    """The committed chain's steps the judge accepted as the draft wrote them: (index in the
    chain, text) for each step whose last unit is a draft step the judge accepted (a step the
    `resume` fallback left open ends with the draft's continuation, judged whole). `text`: the
    decoded chain; a unit ends a step with its delimiter, so the steps ended before a unit
    index the step it ends."""
    steps, out, ended = text.split(delimiter), [], 0
    for record in sol.steps:
        if not record.committed:
            continue
        if record.author == "draft" and record.accepted:
            out.append((ended, steps[ended]))
        ended += record.text.count(delimiter)
    return out


def baseline(name: str, names) -> str:
    """The engine a speedup is measured against: `target`, or for `dreamr@T` (`--sampled T`) the
    target sampling at T (`target@T`; other names with an @, an alpha in `sapo_vs_ns.py`, have
    no such engine)."""
    sampled = "target" + name[name.index("@") :] if "@" in name else None
    return sampled if sampled in names else "target"


def timed_passes(engines: dict[str, Engine], problems, n_passes: int) -> list[dict]:
    """`n_passes` passes over `problems`, each problem solved by every engine in rotating order
    (so no mode always runs first, on a cold cache, or right after another). Per pass and
    engine: mean latency, the speedup against its `baseline`, accuracy and counters."""
    names = list(engines)
    images = [problem_image(p) for p in problems]
    passes = []
    for n in range(n_passes):
        rows: dict[str, list[dict]] = {name: [] for name in names}
        for i, (problem, image) in enumerate(zip(problems, images, strict=True)):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                sol = engines[name].solve(problem.question, [image])
                text = engines[name].decode(sol.tokens)
                answer = digitmath.extract_answer(text)
                judged = judged_steps(sol, text)
                rows[name].append(
                    {
                        "latency_s": sol.latency_s,
                        "correct": digitmath.is_correct(answer, problem.answer),
                        "target_calls": sol.target_calls,
                        "drafted_steps": sol.proposed,
                        "draft_share": draft_share(sol),
                        "kept_share": kept_share(sol),
                        "judged": len(judged),
                        "judged_wrong": sum(
                            i >= len(problem.steps) or not digitmath.is_correct_step(problem, i, t)
                            for i, t in judged
                        ),
                        "tokens": len(sol.tokens),
                        "text": text,
                    }
                )
        result = {}
        for name in names:
            reference = rows[baseline(name, names)]
            base = np.array([r["latency_s"] for r in reference])
            mine = np.array([r["latency_s"] for r in rows[name]])
            pairs = zip(rows[name], reference, strict=True)
            same = np.mean([a["text"] == b["text"] for a, b in pairs])
            result[name] = {
                "ms": float(mine.mean() * 1e3),
                "speedup": float(base.mean() / mine.mean()),
                "accuracy": float(np.mean([r["correct"] for r in rows[name]])),
                "target_calls": float(np.mean([r["target_calls"] for r in rows[name]])),
                "drafted_steps": float(np.mean([r["drafted_steps"] for r in rows[name]])),
                "draft_share": float(np.mean([r["draft_share"] for r in rows[name]])),
                "kept_share": float(np.mean([r["kept_share"] for r in rows[name]])),
                # Of the steps the judge accepted (pooled over problems), the share that are wrong.
                "accepted_wrong": sum(r["judged_wrong"] for r in rows[name])
                / max(1, sum(r["judged"] for r in rows[name])),
                "tokens": float(np.mean([r["tokens"] for r in rows[name]])),
                "output_equals_target": float(same),
            }
        passes.append(result)
        print(
            f"pass {n}: "
            + "; ".join(
                f"{name} {r['ms']:.1f} ms {r['speedup']:.2f}x acc {r['accuracy']:.1%} "
                f"passes {r['target_calls']:.2f} draft {r['draft_share']:.0%} "
                f"(kept {r['kept_share']:.0%}) "
                f"accepted-wrong {r['accepted_wrong']:.1%} tokens {r['tokens']:.1f}"
                for name, r in result.items()
            ),
            flush=True,
        )
    return passes


def time_engines(engines: dict[str, Engine], problems, n_passes: int) -> tuple[list, dict]:
    """Every engine warmed up, then `timed_passes` and their `summarize`."""
    for engine in engines.values():
        warm_up(engine, 2)
    passes = timed_passes(engines, problems, n_passes)
    return passes, summarize(passes)


def write_record(path: str | None, record: dict) -> None:
    """A bench's JSON record at `path` (nothing without one)."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


def summarize(passes: list[dict]) -> dict:
    """Per engine: the median speedup of the passes and their spread, and the last pass's
    accuracy and counters (the same in every pass: greedy, or sampling from the same keys)."""
    summary = {}
    for name in passes[0]:
        speedups = [p[name]["speedup"] for p in passes]
        summary[name] = {
            "speedup_median": float(np.median(speedups)),
            "speedup_min": float(min(speedups)),
            "speedup_max": float(max(speedups)),
            **{k: passes[-1][name][k] for k in passes[-1][name] if k not in ("ms", "speedup")},
        }
        print(
            f"{name}: median {summary[name]['speedup_median']:.2f}x "
            f"({min(speedups):.2f}-{max(speedups):.2f}x over {len(passes)} passes)"
        )
    return summary


def engine_of(name: str, target, draft, alpha: float) -> Engine:
    """The engine a `--modes` name stands for: a mode, `-host` for its host loop, then any
    `:key=value` spec settings (`dreamr:schedule=fpsr:fallback=eager`)."""
    mode, *settings = name.split(":")
    spec = SpecConfig(mode=mode.removesuffix("-host"), alpha=alpha)
    for setting in settings:
        key, value = setting.split("=", 1)
        kind = type(getattr(spec, key))
        spec = dataclasses.replace(spec, **{key: kind(value)})
    spec.validate()
    return Engine(target, draft, spec, host_loop=mode.endswith("-host"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--modes", default="target,exact,dreamr")
    parser.add_argument("--sampled", type=float, default=None, help="also target, dreamr at T")
    parser.add_argument("--alpha", type=float, default=None, help="default: the calibrated one")
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    parser.add_argument("--out", default=None, help="JSON of every pass and the summary")
    args = parser.parse_args()
    origin = provenance()  # at the start: commits made while it runs are not what it ran
    names = args.modes.split(",")
    if "target" not in names:
        parser.error("--modes must include target: every ratio is against it")
    alpha = pair_alpha(args.target, args.draft, args.alpha)
    calibrated = calibrated_alpha(args.target, args.draft)
    source = "given" if args.alpha is not None else "calibrated" if calibrated else "default"
    print(f"alpha {alpha} ({source})")
    prompt = PromptConfig()
    target = load_checkpoint(args.target, prompt)
    draft = load_checkpoint(args.draft, prompt)
    engines = {name: engine_of(name, target, draft, alpha) for name in names}
    if args.sampled is not None:
        for mode in ("target", "dreamr"):
            spec = SpecConfig(mode=mode, alpha=alpha, temperature=args.sampled)
            engines[f"{mode}@{args.sampled:g}"] = Engine(target, draft, spec)
    problems = digitmath.generate_problems("test", args.problems, 0)
    passes, summary = time_engines(engines, problems, args.passes)
    record = {
        "alpha": alpha,
        "sampled_temperature": args.sampled,
        "problems": len(problems),
        "target": args.target,
        "draft": args.draft,
        "passes": passes,
        "summary": summary,
    }
    write_record(args.out, {**record, **origin})


if __name__ == "__main__":
    main()
