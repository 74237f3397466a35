"""One process of the multi-host test (`test_multihost.py`): one SAPO update of the tiny draft
(with one SFT step before it) and one batch of `dreamr` requests, all on the global 4-device
mesh, and `dreamr` requests with draft and target on submeshes of their own, written to `--out`
by process 0. Run once as a single process with 4 CPU devices, and as two processes with 2 each
joined by `jax.distributed`; the test compares what they write.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/multihost_worker.py \\
        --pair DIR --out DIR --processes 2 --process-id 0 --port 12355
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))  # tiny_pair

from dreamr_jax.config.schema import DistributedConfig, PromptConfig, SpecConfig  # noqa: E402
from dreamr_jax.parallel.distributed import initialize, is_primary  # noqa: E402

ROWS = 4
PROBLEMS = 5


def _sft_examples(cfg, n: int = 12):
    """Text-only counting sequences, each starting elsewhere."""
    import grain
    import numpy as np

    seq, records = 12, []
    for i in range(n):
        ids = np.arange(seq, dtype=np.int32) + 10 + 17 * i
        mask = np.ones(seq, bool)
        records.append({"input_ids": ids, "attention_mask": mask, "loss_mask": mask})
    return grain.MapDataset.source(records)


def sft_step(out: str) -> dict:
    """One SFT step of a tiny model, the batch split over the mesh's `data` axis (one index a
    process) and the parameters over `fsdp`. With two processes: the `Trainer` as `train.py`
    runs it, each process reading every other example and its rows becoming its part of the
    global batch; its loss. With one: the loss that the same step takes on the global batch the
    two processes form (each one's first batch of its shard, in process order), and, to show
    that the comparison can fail, the loss on one process's own first batch of 4."""
    import jax
    import numpy as np
    from flax import nnx

    from dreamr_jax.config import load_config
    from dreamr_jax.models import init_model
    from dreamr_jax.parallel.mesh import make_mesh
    from dreamr_jax.train.loss import next_token_loss
    from dreamr_jax.train.optim import make_optimizer
    from dreamr_jax.train.trainer import (
        Trainer,
        batch_pipeline,
        collate,
        shard_batch,
        train_step,
    )

    rows = 2  # a process's rows: a global batch of 4
    cfg = load_config(
        "configs/models/tiny.yaml",
        ["train.steps=1", f"train.batch_size={rows}", "train.warmup_steps=0"]
        + ["train.log_every=1", f"output_dir={out}/sft"],
    )
    mesh = make_mesh(2, 2, 1)
    examples = _sft_examples(cfg)
    model = init_model(cfg.model, seed=0, mesh=mesh)
    if jax.process_count() == 2:
        return {"loss": Trainer(cfg, model, examples, cfg.output_dir, mesh).run().metrics["loss"]}
    own = batch_pipeline(examples, 2 * rows, 1, cfg.seed, by_process=False)[0]
    wrong, _ = next_token_loss(model, *shard_batch(collate(cfg.model, own), mesh))
    shards = [
        batch_pipeline(examples[p::2], rows, 1, cfg.seed, by_process=False)[0] for p in range(2)
    ]
    batch = {k: np.concatenate([shard[k] for shard in shards]) for k in shards[0]}
    graphdef, params = nnx.split(model)
    inputs, loss_mask = shard_batch(collate(cfg.model, batch), mesh)
    opt_state = make_optimizer(cfg.train).init(params)
    _, _, metrics = train_step(graphdef, cfg.train, params, opt_state, inputs, loss_mask)
    return {"loss": float(metrics["loss"]), "one_process_batch_loss": float(wrong)}


def sapo_update(pair: str, out: str) -> dict:
    """One SAPO update of the tiny draft over the whole mesh (fsdp), exported by process 0."""
    from tiny_pair import tiny_sapo_config

    from dreamr_jax.train.sapo import run_sapo

    cfg = tiny_sapo_config(
        f"{pair}/target",
        f"{pair}/draft",
        f"{out}/sapo",
        "train.steps=1",
        "train.warmup_steps=0",
        "eval.problems=1",
        "eval.batch_size=1",
        "eval.max_new_tokens=4",
    )
    metrics = run_sapo(cfg)
    return {k: metrics[k] for k in ("loss", "reward", "kl", "grad_norm", "eval/accuracy")}


def _judged_engine(pair: str, target_mesh, draft_mesh, **spec):
    """The tiny pair on its meshes as greedy `dreamr` at alpha 0.5, its judge answering with the
    MIXED words (some steps accepted, some refused)."""
    from tiny_pair import MIXED, with_judge

    from dreamr_jax.serve.checkpoints import load_checkpoint
    from dreamr_jax.speculative.engine import Engine

    target = load_checkpoint(f"{pair}/target", PromptConfig(), mesh=target_mesh)
    draft = load_checkpoint(f"{pair}/draft", PromptConfig(), mesh=draft_mesh)
    spec = SpecConfig(
        mode="dreamr", max_new_tokens=24, max_step_tokens=8, draft_confidence=0.0, **spec
    )
    return with_judge(Engine(target, draft, spec), MIXED)


def dreamr_batch(pair: str) -> list[list[int]]:
    """Greedy `dreamr` at alpha 0.5 (window schedule, resume fallback: the device loop) over a
    batch of ROWS rows, refilled as rows finish, both models' weights sharded over the whole
    mesh (tensor parallel over all 4 devices, both processes' in a two-process run)."""
    from tiny_pair import solve_in_batch

    from dreamr_jax.data import digitmath
    from dreamr_jax.parallel.mesh import make_mesh

    mesh = make_mesh(1, 1, -1)
    engine = _judged_engine(pair, mesh, mesh, alpha=0.5, schedule="window", fallback="resume")
    problems = digitmath.generate_problems("test", PROBLEMS, 0)
    return [list(map(int, s.tokens)) for s in solve_in_batch(engine, problems, ROWS)]


def fpsr_apart(pair: str) -> list[list[int]]:
    """`dreamr` at alpha 0.5 as the host loop with the FPSR schedule and the eager fallback,
    the draft and the target on submeshes of their own (2 devices each, tensor parallel), placed
    by `serve.py`'s own `submeshes`: in a two-process run each submesh spans both processes,
    which must take every branch of the loop together. One request at a time."""
    import dataclasses

    from dreamr_jax.config.schema import ServeConfig
    from dreamr_jax.data import digitmath
    from dreamr_jax.data.digitmath import problem_image
    from dreamr_jax.serve.main import submeshes

    cfg = ServeConfig()
    parallel = dataclasses.replace(cfg.parallel, draft_devices=2, target_devices=2)
    draft_mesh, target_mesh = submeshes(dataclasses.replace(cfg, parallel=parallel))
    engine = _judged_engine(
        pair, target_mesh, draft_mesh, alpha=0.5, schedule="fpsr", fallback="eager"
    )
    assert engine.apart and not engine.device_loop
    problems = digitmath.generate_problems("test", 2, 0)
    return [list(map(int, engine.solve(p.question, [problem_image(p)]).tokens)) for p in problems]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=12355)
    args = parser.parse_args()
    initialize(
        DistributedConfig(
            initialize=args.processes > 1,
            coordinator_address=f"localhost:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
            timeout_s=120,
        )
    )
    import jax

    assert jax.device_count() == 4, jax.devices()
    started = time.perf_counter()
    result = {"sft": sft_step(args.out)}
    result["sapo"] = sapo_update(args.pair, args.out)
    middle = time.perf_counter()
    result["dreamr"] = dreamr_batch(args.pair)
    batch = time.perf_counter()
    result["fpsr_apart"] = fpsr_apart(args.pair)
    print(
        f"sft and sapo {middle - started:.1f} s, dreamr batch {batch - middle:.1f} s, "
        f"fpsr apart {time.perf_counter() - batch:.1f} s",
        flush=True,
    )
    if is_primary():
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
