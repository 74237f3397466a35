"""A tiny random target/draft pair in the shipped checkpoints' layout, for engine and serve tests.

The lm_head weights are scaled up so that next-token distributions are peaked: argmax decisions
are then far from float-rounding ties, and "identical output" invariants test the engine, not the
luck of near-uniform logits.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from dreamr_jax.config import load_config
from dreamr_jax.data.tokenizer import build_default_tokenizer
from dreamr_jax.models import init_model
from dreamr_jax.models.processor import make_image_processor
from dreamr_jax.train.sft import export_checkpoint

LOGIT_SCALE = 40.0


def _peaked(model):
    head = model.lm_head.kernel
    head.set_value(head.get_value() * LOGIT_SCALE)
    return model


def make_tiny_pair(root: str) -> tuple[str, str]:
    """Writes <root>/target (2 layers) and <root>/draft (1 layer); returns their paths."""
    cfg = load_config("configs/digitmath/base.yaml").model
    draft_cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=1))
    tokenizer = build_default_tokenizer()
    paths = []
    for name, model_cfg, seed in (("target", cfg, 1), ("draft", draft_cfg, 2)):
        model = _peaked(init_model(model_cfg, seed=seed))
        assert isinstance(model, nnx.Module)
        path = os.path.join(root, name)
        export_checkpoint(model, tokenizer, make_image_processor(model_cfg.vision), path)
        paths.append(path)
    return paths[0], paths[1]
