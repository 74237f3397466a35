"""The agreement sweep: drafts trained on different wording mixes against one target. For each
draft, how often its right steps are word for word the target's (teacher-forced at gold
prefixes), and what that does to `exact` (the judge-free lossless path) and `dreamr` (CPN), timed
against the target alone as in `target_vs_dreamr.py`: where each method wins.

    python bench/agreement_sweep.py --drafts draft=checkpoints/digitmath/draft,target=runs/... \
        [--problems 200] [--passes 3] [--alpha A] [--out docs/agreement_sweep.json]

`--drafts`: name=path pairs, the name being the draft's wording mix. `dreamr` runs at `--alpha`
for every draft (default: the shipped pair's calibrated alpha), so the drafts differ only in
their wording. Also the judge at that alpha on each draft's own steps, and on gold and corrupted
steps in every wording, by the wordings and error kinds its training held out. All figures are
on the test split.
"""

from __future__ import annotations

import argparse
import json

from target_vs_dreamr import time_engines, write_record

from dreamr_jax.calibrate import (
    agreement,
    draft_judging,
    gold_prefixes,
    greedy_steps,
    heldout_judging,
    pair_steps,
)
from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.provenance import provenance
from dreamr_jax.serve.checkpoints import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    load_checkpoint,
    pair_alpha,
)
from dreamr_jax.speculative.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafts", required=True, help="mix=path,mix=path,...")
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    origin = provenance()  # at the start: commits made while it runs are not what it ran
    drafts = dict(item.split("=", 1) for item in args.drafts.split(","))
    alpha = pair_alpha(args.target, DEFAULT_DRAFT, args.alpha)  # the shipped pair's, for all
    prompt = PromptConfig()
    spec = SpecConfig()
    target = load_checkpoint(args.target, prompt)
    problems = digitmath.generate_problems("test", args.problems, 0)
    kw = {"max_step_tokens": spec.max_step_tokens, "batch_size": args.batch_size}
    written = greedy_steps(target, problems, gold_prefixes(problems), **kw)
    rows = {}
    for mix, path in drafts.items():
        print(f"--- draft {mix}: {path}", flush=True)
        draft = load_checkpoint(path, prompt)
        pairs = pair_steps(target, draft, problems, written=written, **kw)
        steps = agreement(pairs)
        judge = draft_judging(target, problems, pairs, batch_size=args.batch_size, alpha=alpha)
        engines = {
            mode: Engine(target, draft, SpecConfig(mode=mode, alpha=alpha))
            for mode in ("target", "exact", "dreamr")
        }
        passes, summary = time_engines(engines, problems, args.passes)
        rows[mix] = {
            "draft": path,
            "steps": steps,
            "judge": judge,
            "passes": passes,
            "summary": summary,
        }
    print(f"\nalpha {alpha}, {len(problems)} test problems, {args.passes} passes")
    print(
        "| draft's mix | right steps | verbatim agreement | confirmed share | exact | "
        "dreamr | dreamr accuracy (target) | passes exact / dreamr | draft tokens (dreamr) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mix, row in rows.items():
        s, steps = row["summary"], row["steps"]
        print(
            f"| {mix} | {steps['right'] / steps['steps']:.1%} "
            f"| {steps['verbatim_agreement_on_right_steps']:.1%} "
            f"| {steps['confirmed_token_share_on_right_steps']:.1%} "
            f"| {s['exact']['speedup_median']:.2f}x ({s['exact']['speedup_min']:.2f}-"
            f"{s['exact']['speedup_max']:.2f}) "
            f"| {s['dreamr']['speedup_median']:.2f}x ({s['dreamr']['speedup_min']:.2f}-"
            f"{s['dreamr']['speedup_max']:.2f}) "
            f"| {s['dreamr']['accuracy']:.1%} ({s['target']['accuracy']:.1%}) "
            f"| {s['exact']['target_calls']:.2f} / {s['dreamr']['target_calls']:.2f} "
            f"| {s['dreamr']['draft_share']:.0%} |"
        )
    # The judge on gold and corrupted test steps in every wording, by what its training held out.
    held_out = heldout_judging(
        target, min(250, len(problems)), batch_size=args.batch_size, alpha=alpha, split="test"
    )
    print("\n| draft's mix | judge AUROC on its steps | right accepted | wrong accepted |")
    print("| --- | --- | --- | --- |")
    for mix, row in rows.items():
        j = row["judge"]
        print(
            f"| {mix} | {j['judge_auroc']:.3f} | {j['at_alpha']['right_accepted']:.1%} "
            f"| {j['at_alpha']['wrong_accepted']:.1%} |"
        )
    print(json.dumps(held_out, indent=2))
    record = {
        "alpha": alpha,
        "problems": len(problems),
        "target": args.target,
        "drafts": rows,
        "judge_on_test_steps_by_holdout": held_out,
    }
    write_record(args.out, {**record, **origin})


if __name__ == "__main__":
    main()
