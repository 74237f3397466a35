"""`kill -9` a training run and start the same command again: its exported weights must equal
those of an uninterrupted run of the same config, tensor for tensor.

    python bench/kill_resume.py --config configs/digitmath/sapo.yaml --kill-at 12 \
        --out docs/sapo_kill_resume.json train.steps=20 train.save_every=10 train.warmup_steps=2

Runs `python train.py --config C [overrides]` three times under `--workdir`: once to the end
(`whole/`), once killed with SIGKILL as soon as its metrics log reaches step `--kill-at`
(`killed/`), and that command again, which resumes from the last checkpoint before the kill. The
overrides should log every step (`train.log_every=1`, added unless given) and checkpoint before
`--kill-at`. Exits 1 when a tensor differs, and names it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dreamr_jax.provenance import provenance  # noqa: E402


def _command(config: str, overrides: list[str], run_dir: str) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "--config",
        config,
        *overrides,
        f"output_dir={run_dir}",
        f"export_dir={run_dir}/hf",
    ]


def _last_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics", "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    return max(steps, default=0)


def _run(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _kill_at(command: list[str], run_dir: str, step: int) -> int:
    """Starts `command`, SIGKILLs it once its log reaches `step`; returns the step it reached."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
    while process.poll() is None and _last_step(run_dir) < step:
        time.sleep(0.2)
    if process.poll() is not None:
        raise SystemExit(f"the run ended (code {process.returncode}) before step {step}")
    process.send_signal(signal.SIGKILL)
    process.wait()
    return _last_step(run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--kill-at", type=int, required=True, help="step to kill the run at")
    parser.add_argument("--workdir", default="runs/kill_resume")
    parser.add_argument("--out", default="", help="JSON report")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    origin = provenance()
    overrides = list(args.overrides)
    if not any(o.startswith("train.log_every=") for o in overrides):
        overrides.append("train.log_every=1")
    workdir = os.path.join(REPO, args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    whole, killed = os.path.join(workdir, "whole"), os.path.join(workdir, "killed")

    whole_s = _run(_command(args.config, overrides, whole))
    command = _command(args.config, overrides, killed)
    reached = _kill_at(command, killed, args.kill_at)
    print(f"killed at step {reached}", flush=True)
    resume_s = _run(command)

    want = load_file(os.path.join(whole, "hf", "model.safetensors"))
    got = load_file(os.path.join(killed, "hf", "model.safetensors"))
    differ = sorted(n for n in want if n not in got or not np.array_equal(want[n], got[n]))
    report = {
        "config": args.config,
        "overrides": overrides,
        "killed_at_step": reached,
        "tensors": len(want),
        "tensors_equal": len(want) - len(differ),
        "differ": differ,
        "whole_s": whole_s,
        "resume_s": resume_s,
        **origin,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
