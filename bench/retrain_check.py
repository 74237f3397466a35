"""Retrain a shipped checkpoint with the command it records and compare the weights, tensor by
tensor: does the repository still reproduce what it ships?

    python bench/retrain_check.py [checkpoints/digitmath/draft] [--workdir runs/retrain_check]

The checkpoint's `dreamr_train.json` names the commit and the `train.py` command that trained it.
The command runs again from the current tree (its `output_dir` and `export_dir` moved under
`--workdir`, so the shipped files stay as they are); then every tensor of the new
`model.safetensors` is compared with the shipped one, bit for bit, and so are the final metrics.
Exit status 0 when all are equal, 1 when any differs (the report names them). Training is
deterministic on one machine (seeds in config): a difference means the code or data changed
the training stream since the recorded commit. Minutes for the DigitMath draft on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train.py, the entry point, is imported from the repository root

# Metrics that depend on the weights and the data only (not on how fast the machine ran).
_COMPARED_METRICS = ("loss", "token_accuracy", "eval/accuracy", "eval/judge_auroc")


def recorded_command(checkpoint: Path) -> tuple[str, list[str]]:
    """The config path and overrides of the `train.py` command recorded in `checkpoint`."""
    record = json.loads((checkpoint / "dreamr_train.json").read_text(encoding="utf-8"))
    words = shlex.split(record.get("command") or "")
    if "train.py" not in " ".join(words[:2]) or "--config" not in words:
        raise SystemExit(f"{checkpoint}: dreamr_train.json records no train.py command: {words}")
    rest = words[words.index("--config") :]
    config, overrides = rest[1], [w for w in rest[2:] if "=" in w]
    moved = ("output_dir=", "export_dir=")
    return config, [w for w in overrides if not w.startswith(moved)]


def compare_weights(shipped: Path, retrained: Path) -> list[str]:
    """Names of the tensors that differ (in value, dtype or shape) or exist on one side only."""
    a, b = load_file(str(shipped)), load_file(str(retrained))
    differ = sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            differ.append(name)
    return differ


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/digitmath/draft")
    parser.add_argument("--workdir", default="runs/retrain_check")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    config, overrides = recorded_command(checkpoint)
    work = Path(args.workdir) / checkpoint.name
    if (work / "run").exists():
        raise SystemExit(f"{work / 'run'} exists: a retrain must start fresh (remove it)")
    command = [
        "--config",
        config,
        *overrides,
        f"output_dir={work / 'run'}",
        f"export_dir={work / 'export'}",
    ]
    print("train.py " + shlex.join(command), flush=True)
    start = time.perf_counter()
    import train  # the entry point itself: the same code path as the recorded command

    if train.main(command) != 0:
        return 2
    wall = time.perf_counter() - start
    differ = compare_weights(
        checkpoint / "model.safetensors", work / "export" / "model.safetensors"
    )
    shipped = json.loads((checkpoint / "dreamr_train.json").read_text(encoding="utf-8"))
    again = json.loads((work / "export" / "dreamr_train.json").read_text(encoding="utf-8"))
    metrics = {k: (shipped.get(k), again.get(k)) for k in _COMPARED_METRICS if k in shipped}
    report = {
        "checkpoint": str(checkpoint),
        "trained_at": shipped.get("commit"),
        "retrained_at": again.get("commit"),  # taken by train.py as it started
        "retrained_dirty": again.get("dirty"),
        "config": config,
        "overrides": overrides,
        "tensors": len(load_file(str(checkpoint / "model.safetensors"))),
        "tensors_differing": differ,
        "metrics": {
            k: {"shipped": s, "retrained": r, "equal": s == r} for k, (s, r) in metrics.items()
        },
        "wall_s": wall,
    }
    (work / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps(report, indent=2))
    same = not differ and all(s == r for s, r in metrics.values())
    print("EQUAL: the retrained checkpoint is the shipped one" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
