"""All seven decoding modes, plus transformers' `generate`, on the same DigitMath test problems in
one process: accuracy, mean latency, speedup over `target`, acceptance, accepted steps per target
call; then `dreamr` against alpha (with `exact`, the judge-free lossless path, beside it), and the
CPN p of accepted vs rejected draft steps.

    python bench/modes.py [--problems 200] [--out docs/modes] [--alphas 0.5,0.6,0.7,0.8,0.9,1.0]
                          [--target checkpoints/digitmath/target] [--draft ...] [--no-hf]

Problems are interleaved across configurations (problem i runs in every configuration before
problem i+1, in rotating order) so that machine noise spreads evenly; speedups are ratios of mean
latencies measured in this one run. Writes <out>.md, <out>.json, <out>_alpha.png, <out>_cpn.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time

import numpy as np

from dreamr_jax.config.schema import DEFAULT_ALPHA, FALLBACKS, PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.serve.batch import warm_up
from dreamr_jax.serve.checkpoints import DEFAULT_DRAFT, DEFAULT_TARGET, load_checkpoint
from dreamr_jax.speculative.engine import Engine


def hf_runner(path: str, engine: Engine):
    """transformers' greedy `generate` on the same weights and prompts; returns problem -> dict."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    cfg = engine.builder.model

    def run(problem) -> dict:
        started = time.perf_counter()
        processed = engine.processor(images=[problem_image(problem)], return_tensors="pt")
        pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
        ids = engine.builder.prompt_ids(problem.question, [grid[0].tolist()])
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == cfg.image_token_id).long(),
                pixel_values=pixel_values,
                image_grid_thw=grid,
                max_new_tokens=engine.spec.max_new_tokens,
                do_sample=False,
                eos_token_id=list(cfg.eos_token_ids),
                pad_token_id=cfg.pad_token_id,
            )
        tokens = out[0, len(ids) :].tolist()
        latency = time.perf_counter() - started
        text = engine.decode(tokens)
        return {"latency_s": latency, "text": text, "tokens": len(tokens)}

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=200)
    # alpha 1 accepts nothing: dreamr then writes exactly the target's greedy tokens, still
    # asking its judge (the judge-free path is `exact`, a row of its own)
    parser.add_argument("--alphas", default="0.5,0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    parser.add_argument("--out", default="docs/modes")
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()

    prompt = PromptConfig()
    target, draft = load_checkpoint(args.target, prompt), load_checkpoint(args.draft, prompt)
    base = SpecConfig(alpha=DEFAULT_ALPHA)
    configs: dict[str, SpecConfig] = {
        "target": dataclasses.replace(base, mode="target"),
        "draft": dataclasses.replace(base, mode="draft"),
        "sd": dataclasses.replace(base, mode="sd"),
        "specreason": dataclasses.replace(base, mode="specreason"),
        "lookahead": dataclasses.replace(base, mode="lookahead"),
        "exact": dataclasses.replace(base, mode="exact"),
        "dreamr": dataclasses.replace(base, mode="dreamr"),
    }
    for fallback in FALLBACKS:
        if fallback != base.fallback:
            configs[f"dreamr {fallback}"] = dataclasses.replace(
                base, mode="dreamr", fallback=fallback
            )
    alphas = [float(a) for a in args.alphas.split(",")]
    for alpha in alphas:
        if alpha != base.alpha:
            configs[f"dreamr a={alpha}"] = dataclasses.replace(base, mode="dreamr", alpha=alpha)
    # Ablations of exact's window (outputs = the target's): W whole steps every window (no early
    # end on a doubtful step), and a longer adaptive window.
    configs["exact fixed window"] = dataclasses.replace(base, mode="exact", draft_confidence=0.0)
    configs["exact W=8"] = dataclasses.replace(base, mode="exact", window=8)
    engines = {name: Engine(target, draft, spec) for name, spec in configs.items()}
    for engine in engines.values():
        warm_up(engine, 2)
    hf = None if args.no_hf else hf_runner(args.target, engines["target"])
    if hf is not None:
        for problem in digitmath.generate_problems("train", 2, 12345):
            hf(problem)

    problems = digitmath.generate_problems("test", args.problems, 0)
    names = list(engines) + ([] if hf is None else ["transformers generate"])
    results: dict[str, list[dict]] = {name: [] for name in names}
    cpn: dict[str, list[float]] = {"accepted": [], "rejected": []}
    started = time.perf_counter()
    for i, problem in enumerate(problems):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            if name == "transformers generate":
                r = hf(problem)
                text = r["text"]
                row = {"latency_s": r["latency_s"], "tokens": r["tokens"]}
            else:
                sol = engines[name].solve(problem.question, [problem_image(problem)])
                text = engines[name].decode(sol.tokens)
                row = {
                    "latency_s": sol.latency_s,
                    "tokens": len(sol.tokens),
                    "proposed": sol.proposed,
                    "accepted": sol.accepted,
                    "target_calls": sol.target_calls,
                }
                if name == "dreamr":
                    for step in sol.steps:
                        if step.p is not None and step.author == "draft":
                            cpn["accepted" if step.accepted else "rejected"].append(step.p)
            row["correct"] = digitmath.is_correct(digitmath.extract_answer(text), problem.answer)
            row["text"] = text
            results[name].append(row)
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(problems)} problems, {time.perf_counter() - started:.0f}s")

    target_latency = np.mean([r["latency_s"] for r in results["target"]])
    target_texts = [r["text"] for r in results["target"]]
    table = {}
    for name, rows in results.items():
        latency = float(np.mean([r["latency_s"] for r in rows]))
        proposed = sum(r.get("proposed", 0) for r in rows)
        calls = sum(r.get("target_calls", 0) for r in rows)
        table[name] = {
            "accuracy": float(np.mean([r["correct"] for r in rows])),
            "mean_latency_s": latency,
            "speedup_vs_target": float(target_latency / latency),
            "acceptance": sum(r.get("accepted", 0) for r in rows) / proposed if proposed else None,
            "accepted_per_target_call": (
                sum(r.get("accepted", 0) for r in rows) / calls if calls else None
            ),
            "tokens_per_s": sum(r["tokens"] for r in rows) / sum(r["latency_s"] for r in rows),
            "same_output_as_target": float(
                np.mean([r["text"] == t for r, t in zip(rows, target_texts, strict=True)])
            ),
        }
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "problems": len(problems),
        "spec": dataclasses.asdict(base),
        "modes": table,
        "cpn_p": cpn,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    md = [
        f"{len(problems)} DigitMath test problems, target `{os.path.relpath(args.target)}`, draft "
        f"`{os.path.relpath(args.draft)}`, one process, {report['date']}.",
        "",
        "| mode | accuracy | mean latency (s) | speedup vs target | step acceptance "
        "| accepted per target call | tokens/s | output = target |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    for name, r in table.items():
        md.append(
            f"| {name} | {r['accuracy']:.1%} | {r['mean_latency_s']:.3f} | "
            f"{r['speedup_vs_target']:.2f}x | {fmt(r['acceptance'], '.1%')} | "
            f"{fmt(r['accepted_per_target_call'], '.2f')} | {r['tokens_per_s']:.0f} | "
            f"{r['same_output_as_target']:.0%} |"
        )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    plot(table, alphas, base.alpha, cpn, args.out)


def plot(table, alphas, default_alpha, cpn, out) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("dreamr" if a == default_alpha else f"dreamr a={a}") for a in alphas]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(alphas, [table[n]["speedup_vs_target"] for n in names], "o-", label="speedup")
    ax.axhline(table["exact"]["speedup_vs_target"], color="C0", ls=":", label="exact")
    ax.set_xlabel("alpha")
    ax.set_ylabel("speedup vs target")
    ax.legend(loc="lower left")
    ax2 = ax.twinx()
    ax2.plot(alphas, [100 * table[n]["accuracy"] for n in names], "s--", color="C1")
    ax2.axhline(100 * table["exact"]["accuracy"], color="C1", ls=":")
    ax2.set_ylabel("accuracy (%)", color="C1")
    ax.set_title("dreamr on DigitMath: alpha sweep (dotted: exact)")
    fig.tight_layout()
    fig.savefig(out + "_alpha.png", dpi=100)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = np.linspace(0, 1, 21)
    ax.hist(cpn["accepted"], bins=bins, alpha=0.6, label=f"accepted ({len(cpn['accepted'])})")
    ax.hist(cpn["rejected"], bins=bins, alpha=0.6, label=f"rejected ({len(cpn['rejected'])})")
    ax.set_xlabel("CPN p")
    ax.set_ylabel("draft steps")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("CPN p of verified draft steps (alpha 0.7)")
    fig.tight_layout()
    fig.savefig(out + "_cpn.png", dpi=100)


if __name__ == "__main__":
    main()
