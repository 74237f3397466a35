"""The SFT loop: a few steps lower the loss; a killed run resumes to exactly the parameters of an
uninterrupted one (same data order, optimizer state and step)."""

from __future__ import annotations

import json
import os

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from dreamr_jax.config import load_config
from dreamr_jax.models import init_model
from dreamr_jax.train.trainer import Trainer

SEQ = 16


def _examples(cfg, n: int = 24) -> grain.MapDataset:
    """Image + a counting sequence whose start depends on the example: learnable, not trivial."""
    m = cfg.model
    rng = np.random.default_rng(0)
    patch_dim = m.vision.patch_dim
    records = []
    for i in range(n):
        start = 10 + (i % 7) * 20
        ids = [m.vision_start_token_id, m.image_token_id, m.vision_end_token_id]
        ids += [start + j for j in range(SEQ - 3)]
        loss_mask = np.zeros(SEQ, bool)
        loss_mask[4:] = True
        records.append(
            {
                "input_ids": np.asarray(ids, np.int32),
                "attention_mask": np.ones(SEQ, bool),
                "loss_mask": loss_mask,
                "pixel_values": rng.standard_normal((4, patch_dim)).astype(np.float32),
                "image_grid_thw": np.asarray([[1, 2, 2]], np.int64),
            }
        )
    return grain.MapDataset.source(records)


def _config(tmp_path, steps, **train):
    overrides = [
        f"train.steps={steps}",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.learning_rate=0.003",
        "train.log_every=1",
    ]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config("configs/models/tiny.yaml", overrides + [f"output_dir={tmp_path}"])


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def test_sft_steps_lower_the_loss(tmp_path):
    cfg = _config(tmp_path, steps=25)
    trainer = Trainer(cfg, init_model(cfg.model, seed=cfg.seed), _examples(cfg), str(tmp_path))
    trainer.run()
    with open(os.path.join(tmp_path, "metrics", "metrics.jsonl")) as f:
        losses = [json.loads(line)["train/loss"] for line in f]
    assert len(losses) == 25
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert os.path.exists(tmp_path / "config.yaml")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "metrics"))


@pytest.mark.parametrize("kill_after", [5])
def test_killed_run_resumes_to_identical_parameters(tmp_path, kill_after):
    cfg = _config(tmp_path, steps=8, save_every=2)
    straight = Trainer(cfg, init_model(cfg.model, seed=0), _examples(cfg), str(tmp_path / "a"))
    want = straight.run()

    first = Trainer(cfg, init_model(cfg.model, seed=0), _examples(cfg), str(tmp_path / "b"))
    first.run(stop_after=kill_after)  # steps after the last save (4) are lost, as in a kill
    # A new process would start from a fresh model; the checkpoint must bring everything back.
    second = Trainer(cfg, init_model(cfg.model, seed=1), _examples(cfg), str(tmp_path / "b"))
    assert second.restore_latest() and second.step == 4
    got = Trainer(cfg, init_model(cfg.model, seed=1), _examples(cfg), str(tmp_path / "b")).run()

    assert got.step == want.step == 8
    for a, b in zip(_params(got.model), _params(want.model), strict=True):
        np.testing.assert_array_equal(a, b)
