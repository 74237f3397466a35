"""Drafts against one target: `dreamr` with each draft at each alpha given, the target alone as
the baseline (and `exact` with each draft, on request), interleaved problem by problem in passes
back to back in one process (`target_vs_dreamr.timed_passes`). Made for SAPO's draft against the
SFT one (DREAM-R-NS): the share of committed tokens the draft wrote, target passes, accuracy,
the share of judge-accepted steps that are wrong, and the speed, per (draft, alpha).

    python bench/sapo_vs_ns.py --drafts ns=checkpoints/digitmath/draft,sapo=runs/.../hf \
        [--alphas 0.7,calibrated] [--exact] [--problems 500] [--passes 3] [--out F]

`calibrated`: each draft's own calibrated alpha with this target (`<draft>/calibration.json`,
written by `python -m dreamr_jax.calibrate --draft D`); a draft without one is an error.
"""

from __future__ import annotations

import argparse

from target_vs_dreamr import time_engines, write_record

from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.provenance import provenance
from dreamr_jax.serve.checkpoints import DEFAULT_TARGET, calibrated_alpha, load_checkpoint
from dreamr_jax.speculative.engine import Engine


def alphas_of(spec: str, target: str, drafts: dict[str, str]) -> dict[str, list[float]]:
    """Per draft name, the alphas `spec` ("0.7,calibrated") names, in order, without repeats."""
    out = {}
    for name, path in drafts.items():
        alphas = []
        for item in spec.split(","):
            if item == "calibrated":
                alpha = calibrated_alpha(target, path)
                if alpha is None:
                    raise SystemExit(
                        f"draft {name} ({path}) has no calibration for target {target}: run "
                        f"python -m dreamr_jax.calibrate --target {target} --draft {path}"
                    )
            else:
                alpha = float(item)
            if alpha not in alphas:
                alphas.append(alpha)
        out[name] = alphas
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafts", required=True, help="name=path,name=path,...")
    parser.add_argument("--alphas", default="0.7,calibrated")
    parser.add_argument("--exact", action="store_true", help="also `exact` with each draft")
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON of every pass and the summary")
    args = parser.parse_args()
    origin = provenance()  # at the start: commits made while it runs are not what it ran
    drafts = dict(item.split("=", 1) for item in args.drafts.split(","))
    alphas = alphas_of(args.alphas, args.target, drafts)
    prompt = PromptConfig()
    target = load_checkpoint(args.target, prompt)
    loaded = {name: load_checkpoint(path, prompt) for name, path in drafts.items()}
    first = next(iter(loaded.values()))
    engines = {"target": Engine(target, first, SpecConfig(mode="target"))}
    for name, draft in loaded.items():
        if args.exact:
            engines[f"exact-{name}"] = Engine(target, draft, SpecConfig(mode="exact"))
        for alpha in alphas[name]:
            engines[f"dreamr-{name}@{alpha}"] = Engine(
                target, draft, SpecConfig(mode="dreamr", alpha=alpha)
            )
    problems = digitmath.generate_problems("test", args.problems, 0)
    passes, summary = time_engines(engines, problems, args.passes)
    record = {
        "target": args.target,
        "drafts": drafts,
        "alphas": alphas,
        "problems": len(problems),
        "passes": passes,
        "summary": summary,
    }
    write_record(args.out, {**record, **origin})


if __name__ == "__main__":
    main()
