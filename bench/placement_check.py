"""Greedy outputs with draft and target on disjoint submeshes (the target's weights sharded over
its own) against both on one device, for the shipped pair on DigitMath test problems: `target`
and `exact` must be identical, `dreamr` identical except where a CPN p lies within 1e-3 of alpha
(a near-tie that the sharded arithmetic may flip). Runs on 4 fake CPU devices unless devices are
there already: draft on the first 2, target on the next 2.

    python bench/placement_check.py [--problems 50] [--out docs/placement.json]
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()

import argparse  # noqa: E402

import jax  # noqa: E402
from target_vs_dreamr import write_record  # noqa: E402

from dreamr_jax.config.schema import PromptConfig, SpecConfig  # noqa: E402
from dreamr_jax.data import digitmath  # noqa: E402
from dreamr_jax.data.digitmath import problem_image  # noqa: E402
from dreamr_jax.parallel.mesh import make_mesh  # noqa: E402
from dreamr_jax.provenance import provenance  # noqa: E402
from dreamr_jax.serve.checkpoints import (  # noqa: E402
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    load_checkpoint,
    pair_alpha,
)
from dreamr_jax.speculative.engine import Engine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    origin = provenance()
    devices = jax.devices()
    alpha = pair_alpha(DEFAULT_TARGET, DEFAULT_DRAFT)
    prompt = PromptConfig()
    one = (load_checkpoint(DEFAULT_TARGET, prompt), load_checkpoint(DEFAULT_DRAFT, prompt))
    apart = (
        load_checkpoint(DEFAULT_TARGET, prompt, mesh=make_mesh(1, 1, -1, devices=devices[2:4])),
        load_checkpoint(DEFAULT_DRAFT, prompt, mesh=make_mesh(1, 1, -1, devices=devices[:2])),
    )
    problems = digitmath.generate_problems("test", args.problems, 0)
    result = {}
    for mode in ("target", "exact", "dreamr"):
        spec = SpecConfig(mode=mode, alpha=alpha)
        engines = Engine(*one, spec), Engine(*apart, spec)
        assert engines[1].apart or mode == "target"
        same, ties, differ = 0, 0, []
        for i, p in enumerate(problems):
            a, b = (e.solve(p.question, [problem_image(p)]) for e in engines)
            if a.tokens == b.tokens:
                same += 1
                continue
            near = any(s.p is not None and abs(s.p - alpha) < 1e-3 for s in a.steps + b.steps)
            ties += near
            differ.append({"problem": i, "near_tie": near})
        result[mode] = {"identical": same, "differ": differ, "explained_by_near_ties": ties}
        print(f"{mode}: {same}/{len(problems)} identical; {len(differ)} differ ({ties} near-ties)")
    write_record(
        args.out,
        {
            "alpha": alpha,
            "problems": args.problems,
            "devices": [str(d) for d in devices[:4]],
            "result": result,
            **origin,
        },
    )


if __name__ == "__main__":
    main()
