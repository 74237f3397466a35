"""Compile time against depth (issue 21): `python serve.py` in `dreamr` on 3 problems, from a fresh
process with no compilation cache, for random tiny-width targets of several depths, with the
decoder layers as a Python loop and as one stacked block run by `lax.scan`.

    python bench/compile_depth.py --layers 8,64 --out docs/compile_depth.json

The pairs are random (DigitMath's tiny width, the draft one layer deep), so chains run to the
token budget and the wall time is mostly start-up and compilation; the models are written to
`--dir` once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from target_vs_dreamr import write_record  # noqa: E402

from dreamr_jax.config import load_config  # noqa: E402
from dreamr_jax.data.tokenizer import build_default_tokenizer  # noqa: E402
from dreamr_jax.models import init_model  # noqa: E402
from dreamr_jax.models.processor import make_image_processor  # noqa: E402
from dreamr_jax.provenance import provenance  # noqa: E402
from dreamr_jax.train.sft import export_checkpoint  # noqa: E402


def write_model(folder: str, layers: int, seed: int) -> str:
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    cfg = load_config("configs/digitmath/base.yaml").model
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=layers))
    model = init_model(cfg, seed=seed)
    export_checkpoint(model, build_default_tokenizer(), make_image_processor(cfg.vision), folder)
    return folder


def serve_seconds(target: str, draft: str, scan: bool, out: str) -> float:
    """Wall seconds of one `python serve.py` run (start-up, loading, compilation, 3 problems)."""
    if os.path.exists(out):
        os.remove(out)
    cmd = [
        sys.executable,
        "serve.py",
        f"target.path={target}",
        f"draft.path={draft}",
        f"target.scan_layers={str(scan).lower()}",
        f"draft.scan_layers={str(scan).lower()}",
        "spec.mode=dreamr",
        "spec.alpha=0.8",
        "spec.max_new_tokens=48",
        "data.digitmath_problems=3",
        "warmup=0",
        "compilation_cache=",
        f"output={out}",
    ]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="8,64")
    parser.add_argument("--dir", default="/tmp/dreamr_compile_depth")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    draft = write_model(os.path.join(args.dir, "draft"), 1, 2)
    rows = []
    for layers in [int(n) for n in args.layers.split(",")]:
        target = write_model(os.path.join(args.dir, f"target-{layers}"), layers, 1)
        for scan in (False, True):
            seconds = serve_seconds(target, draft, scan, os.path.join(args.dir, "out.jsonl"))
            rows.append({"layers": layers, "scan_layers": scan, "serve_s": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    write_record(args.out, {"rows": rows, **provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
