"""The supervised training loop: grain batches, a jitted AdamW step over split NNX state, orbax
checkpoints that include the data-iterator position, metrics and a progress bar.

A killed run restarted with the same config resumes from its last checkpoint with the same data
order, and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable

import grain
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from dreamr_jax.config.loader import save_config
from dreamr_jax.config.schema import Config
from dreamr_jax.models.inputs import (
    ModelInputs,
    branch_layout,
    empty_vision,
    pad_vision,
    prepare_inputs,
)
from dreamr_jax.parallel.distributed import is_primary, local_batch_to_global
from dreamr_jax.train.loss import next_token_loss
from dreamr_jax.train.metrics import MetricsWriter
from dreamr_jax.train.optim import learning_rate_schedule, make_optimizer

Example = dict[str, np.ndarray]


def batch_pipeline(
    examples: grain.MapDataset, batch_size: int, steps: int, seed: int, by_process: bool = True
) -> grain.MapDataset:
    """Shards by process (each process reads its own `batch_size` examples a step; with
    `by_process` False every process reads the same ones), repeats enough epochs for `steps`
    batches, shuffles by `seed` (across epochs) and batches. Random access, so an iterator over
    it can be checkpointed."""
    if by_process:
        examples = examples[jax.process_index() :: jax.process_count()]
    epochs = max(1, math.ceil(steps * batch_size / max(len(examples), 1)))
    return examples.repeat(epochs).shuffle(seed=seed).batch(batch_size, drop_remainder=True)


def collate(model_cfg, batch: Example) -> tuple[ModelInputs, np.ndarray]:
    """Stacked examples -> ModelInputs and the loss weights `[batch, seq]` float32.

    Examples carry `input_ids`, `attention_mask`, `loss_mask` `[seq]`, and optionally
    `pixel_values` `[patches, patch_dim]` with `image_grid_thw` `[images, 3]`. With
    `num_patches` `[]`, only the first `num_patches` rows of each example's `pixel_values` are
    real; the packed patches are then padded back to `batch * patches`, a fixed shape. With
    `branch` and `visible` `[seq]`, rows hold judge branches (`inputs.branch_layout`).
    """
    pixel_values = grid = None
    if "pixel_values" in batch:
        pixel_values = batch["pixel_values"]
        grid = batch["image_grid_thw"].reshape(-1, 3)
        if "num_patches" in batch:
            # One image per example; text-only examples (num_patches 0) have none.
            counts = np.asarray(batch["num_patches"]).reshape(-1)
            pixel_values = np.concatenate(
                [rows[:n] for rows, n in zip(pixel_values, counts, strict=True)]
            )
            grid = grid[counts > 0]
        pixel_values = pixel_values.reshape(-1, pixel_values.shape[-1])
        if not len(pixel_values):
            pixel_values = grid = None
    inputs, _ = prepare_inputs(
        model_cfg, batch["input_ids"], batch["attention_mask"], pixel_values, grid
    )
    if "branch" in batch:  # packed judge branches: tree mask and branch positions
        mask, positions = branch_layout(
            np.asarray(inputs.positions), np.asarray(batch["branch"]), np.asarray(batch["visible"])
        )
        inputs = dataclasses.replace(inputs, positions=positions, chunk_mask=mask)
    if "num_patches" in batch:
        total = int(np.prod(batch["pixel_values"].shape[:-1]))
        vision = inputs.vision or empty_vision(batch["pixel_values"].shape[-1])
        vision = pad_vision(vision, total, model_cfg.vision.spatial_merge_size)
        inputs = dataclasses.replace(inputs, vision=vision)
    return inputs, np.asarray(batch["loss_mask"], np.float32)


def shard_batch(batch: tuple[ModelInputs, np.ndarray], mesh: Mesh | None):
    """Places this process's inputs and loss mask (its shard of the data, `batch_pipeline`) as
    one global batch split over the batch mesh axes."""
    if mesh is None:
        return batch
    inputs, loss_mask = batch
    if inputs.vision is not None and jax.process_count() > 1:
        # Each process packs its own images' patches (padded at the end of its pack), and the
        # model finds an image token's features by counting image tokens over the whole batch.
        raise NotImplementedError(
            "stage sft with images on several processes: each process packs its own images' "
            "patches, which one global batch would index as one pack (train on one host)"
        )
    # M-RoPE positions `[3, batch, seq]` go batch first, as every other array.
    positions = np.swapaxes(inputs.positions, 0, 1)
    inputs = dataclasses.replace(inputs, positions=None)
    inputs, loss_mask, positions = local_batch_to_global((inputs, loss_mask, positions), mesh)
    return dataclasses.replace(inputs, positions=positions.swapaxes(0, 1)), loss_mask


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def train_step(graphdef, train_cfg, params, opt_state, inputs, loss_mask):
    """One AdamW step on the next-token loss. The optimizer is rebuilt from the (hashable)
    train config at trace time, so every Trainer with equal config shares one compilation."""
    tx = make_optimizer(train_cfg)

    def loss_fn(p):
        return next_token_loss(nnx.merge(graphdef, p), inputs, loss_mask)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Orbax checkpoints in `<workdir>/checkpoints`, the newest `keep` of them kept."""
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, data: dict) -> None:
    """Step `step`: the array tree `state` (parameters, optimizer state, counters) and `data`,
    what is not arrays (the data iterator's position, caches), as JSON."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
    )


def restore_checkpoint(manager: ocp.CheckpointManager, like) -> tuple[object, dict] | None:
    """The newest checkpoint's (state, data), state restored into the structure, shapes, dtypes
    and shardings of `like`; None when there is none."""
    latest = manager.latest_step()
    if latest is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(
        latest,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
        ),
    )
    return restored.state, restored.data


@dataclasses.dataclass
class TrainResult:
    model: object
    step: int
    metrics: dict


class Trainer:
    """Trains `model` on `examples` (a grain MapDataset of per-example dicts) under `cfg.train`.

    workdir/: `checkpoints/` (orbax), `metrics/` (TensorBoard + metrics.jsonl), `config.yaml`.
    """

    def __init__(
        self, cfg: Config, model, examples: grain.MapDataset, workdir: str, mesh: Mesh | None = None
    ):
        self.cfg, self.workdir, self.mesh = cfg, workdir, mesh
        os.makedirs(workdir, exist_ok=True)
        if is_primary():
            save_config(cfg, os.path.join(workdir, "config.yaml"))
        self.graphdef, self.params = nnx.split(model)
        self.opt_state = make_optimizer(cfg.train).init(self.params)
        self.step = 0
        self.batches = batch_pipeline(examples, cfg.train.batch_size, cfg.train.steps, cfg.seed)
        self.iterator = self.batches.to_iter_dataset().__iter__()
        self.manager = checkpoint_manager(workdir, cfg.train.keep_checkpoints)
        self.schedule = learning_rate_schedule(cfg.train)

    # -------------------------------------------------------------------------- checkpoints

    def _train_state(self) -> dict:
        return {
            "params": self.params,
            "opt_state": self.opt_state,
            "step": np.asarray(self.step, np.int64),
        }

    def save(self) -> None:
        save_checkpoint(self.manager, self.step, self._train_state(), self.iterator.get_state())

    def restore_latest(self) -> bool:
        """Restores the newest checkpoint, if any; returns whether it did."""
        restored = restore_checkpoint(self.manager, self._train_state())
        if restored is None:
            return False
        state, data = restored
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.step = int(state["step"])
        self.iterator.set_state(data)
        return True

    # --------------------------------------------------------------------------------- loop

    def run(
        self, *, stop_after: int | None = None, evaluate: Callable[[object], dict] | None = None
    ) -> TrainResult:
        """Trains up to `cfg.train.steps` (or until `stop_after` steps, to simulate a kill),
        saving every `save_every` steps and at the end; evaluates the final model if given."""
        tcfg = self.cfg.train
        resumed = self.restore_latest()
        writer = MetricsWriter(os.path.join(self.workdir, "metrics"))
        last = min(tcfg.steps, stop_after) if stop_after is not None else tcfg.steps
        bar = tqdm(
            total=tcfg.steps, initial=self.step, desc="train", dynamic_ncols=True, disable=None
        )
        if resumed:
            bar.write(f"resumed from step {self.step}")
        metrics: dict = {}
        tokens, started = 0.0, time.perf_counter()
        while self.step < last:
            inputs, loss_mask = collate(self.cfg.model, next(self.iterator))
            inputs, loss_mask = shard_batch((inputs, loss_mask), self.mesh)
            self.params, self.opt_state, step_metrics = train_step(
                self.graphdef, tcfg, self.params, self.opt_state, inputs, loss_mask
            )
            self.step += 1
            bar.update(1)
            if self.step % tcfg.log_every == 0 or self.step == last:
                metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                tokens += metrics["tokens"] * tcfg.log_every
                elapsed = time.perf_counter() - started
                metrics["learning_rate"] = float(self.schedule(self.step))
                metrics["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                writer.write(self.step, metrics)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
                )
            if self.step % tcfg.save_every == 0 or self.step == tcfg.steps:
                self.save()
        bar.close()
        return finish_run(self, writer, metrics, evaluate)


def finish_run(trainer, writer: MetricsWriter, metrics: dict, evaluate) -> TrainResult:
    """The end of a stage's loop: waits for the last checkpoint, merges the model from the
    trainer's `graphdef` and `params`, evaluates it (when given and the run reached
    `train.steps`) into `writer` and `metrics`, and closes the writer."""
    trainer.manager.wait_until_finished()
    model = nnx.merge(trainer.graphdef, trainer.params)
    if evaluate is not None and trainer.step == trainer.cfg.train.steps:
        eval_metrics = evaluate(model)
        writer.write(trainer.step, eval_metrics, prefix="eval")
        metrics = {**metrics, **{f"eval/{k}": v for k, v in eval_metrics.items()}}
    writer.close()
    return TrainResult(model=model, step=trainer.step, metrics=metrics)
