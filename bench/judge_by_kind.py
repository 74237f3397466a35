"""The target's judge on right steps, by step kind: the draft's own right steps and, at the same
gold prefixes, the target's own greedy steps, both teacher-forced (as `dreamr_jax.calibrate`
measures the judge). It separates what wording can change from what it cannot: where the judge
accepts the target's own steps no more often than the draft's, no rewording of the draft (SAPO's
lever) raises its acceptance there.

    python bench/judge_by_kind.py [--drafts ns=checkpoints/digitmath/draft,...] [--problems 150]
        [--alpha A] [--split val] [--out F]

Per draft and step kind (read, operation, count, number, answer): right steps, the share
accepted at alpha (the draft's and the target's own at the same prefixes), the share of the
draft's right steps that are the target's word for word; the draft's wrong steps, the share
accepted, and the judge's AUROC on the draft's steps of that kind.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np
from sklearn.metrics import roc_auc_score
from target_vs_dreamr import write_record

from dreamr_jax.calibrate import gold_prefixes, greedy_steps, judge_candidates, pair_steps
from dreamr_jax.config.schema import PromptConfig
from dreamr_jax.data import digitmath
from dreamr_jax.provenance import provenance
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT, DEFAULT_TARGET, load_checkpoint, pair_alpha


def by_kind(problems, pairs, draft_p, target_p, alpha: float) -> dict:
    """Per step kind (and "all"), over the draft's steps `pairs` with the judge's p of each
    (`draft_p`) and, for its right ones, of the target's own step at the same prefix
    (`target_p`, NaN for wrong steps)."""
    groups = collections.defaultdict(list)
    for s, a, b in zip(pairs, draft_p, target_p, strict=True):
        row = (s.right, a, b, s.draft == s.target)
        groups[problems[s.problem].facts[s.step].kind].append(row)
        groups["all"].append(row)
    out = {}
    for kind, rows in groups.items():
        right = np.asarray([r[0] for r in rows])
        p, own, same = (np.asarray([r[i] for r in rows]) for i in (1, 2, 3))
        out[kind] = {
            "right_steps": int(right.sum()),
            "draft_accepted": float(np.mean(p[right] > alpha)) if right.any() else None,
            "target_own_accepted": float(np.mean(own[right] > alpha)) if right.any() else None,
            "verbatim": float(np.mean(same[right])) if right.any() else None,
            "wrong_steps": int((~right).sum()),
            "wrong_accepted": float(np.mean(p[~right] > alpha)) if (~right).any() else None,
            "auroc": float(roc_auc_score(right, p)) if 0 < right.sum() < len(right) else None,
        }
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafts", default=f"ns={DEFAULT_DRAFT}", help="name=path,...")
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--problems", type=int, default=150)
    parser.add_argument("--split", default="val")
    parser.add_argument("--alpha", type=float, default=None, help="default: the shipped pair's")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    origin = provenance()
    alpha = pair_alpha(args.target, DEFAULT_DRAFT, args.alpha)
    prompt = PromptConfig()
    target = load_checkpoint(args.target, prompt)
    problems = digitmath.generate_problems(args.split, args.problems, 0)
    kw = {"max_step_tokens": 48, "batch_size": args.batch_size}
    written = greedy_steps(target, problems, gold_prefixes(problems), **kw)
    result = {}
    for name, path in (item.split("=", 1) for item in args.drafts.split(",")):
        pairs = pair_steps(target, load_checkpoint(path, prompt), problems, written=written, **kw)
        right_at = [i for i, s in enumerate(pairs) if s.right]
        right = [pairs[i] for i in right_at]
        batch = {"batch_size": args.batch_size}
        draft_p = judge_candidates(
            target, problems, [(s.problem, s.step, s.draft) for s in pairs], **batch
        )
        own_p = judge_candidates(
            target, problems, [(s.problem, s.step, s.target) for s in right], **batch
        )
        target_p = np.full(len(pairs), np.nan)
        target_p[right_at] = own_p
        result[name] = by_kind(problems, pairs, draft_p, target_p, alpha)
        print(f"--- {name} ({path}), alpha {alpha}")
        print(
            "| kind | right steps | draft's accepted | target's own accepted | verbatim "
            "| wrong steps | wrong accepted | AUROC |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for kind, r in result[name].items():
            auroc = "-" if r["auroc"] is None else f"{r['auroc']:.3f}"
            print(
                f"| {kind} | {r['right_steps']} | {_pct(r['draft_accepted'])} "
                f"| {_pct(r['target_own_accepted'])} | {_pct(r['verbatim'])} "
                f"| {r['wrong_steps']} | {_pct(r['wrong_accepted'])} | {auroc} |"
            )
    record = {
        "alpha": alpha,
        "split": args.split,
        "problems": len(problems),
        "target": args.target,
        "drafts": result,
    }
    write_record(args.out, {**record, **origin})


if __name__ == "__main__":
    main()
