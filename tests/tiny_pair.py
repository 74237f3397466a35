"""A tiny random target/draft pair in the shipped checkpoints' layout, for engine and serve tests.

The lm_head weights are scaled up so that next-token distributions are peaked: argmax decisions
are then far from float-rounding ties, and "identical output" invariants test the engine, not the
luck of near-uniform logits.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from flax import nnx

from dreamr_jax.config import load_config
from dreamr_jax.config.schema import PromptConfig
from dreamr_jax.data.digitmath import problem_image
from dreamr_jax.data.tokenizer import build_default_tokenizer
from dreamr_jax.models import init_model
from dreamr_jax.models.processor import make_image_processor
from dreamr_jax.serve.checkpoints import load_checkpoint
from dreamr_jax.speculative.batch import RowBatch
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


def load_near_target(target_path: str, mesh=None):
    """The tiny target with noise on its lm_head: it agrees with the target on most tokens and
    parts from it on some, so its windows run on long after a parting. `mesh`: where its
    weights go (`load_checkpoint`)."""
    near = load_checkpoint(target_path, PromptConfig(), mesh=mesh)
    head = near.model.lm_head.kernel
    noise = np.random.default_rng(0).normal(size=head.get_value().shape).astype(np.float32)
    head.set_value(head.get_value() + 0.5 * float(np.std(head.get_value())) * noise)
    return near


# Judges made of the tiny target's next-token distribution after the judge suffix, by choosing
# its "yes" and "no" words (the builder's positive and negative ids). MIXED: yes = the ids that
# leave 1 divided by 4, no = those that leave 3; the random target's likeliest answers fall in
# both and outside both, so p spreads over (0, 1) and about a fifth of the verdicts miss the
# format floor.
VOCAB = 512  # the tiny pair's vocabulary (configs/models/tiny.yaml)
MIXED = (tuple(range(1, VOCAB, 4)), tuple(range(3, VOCAB, 4)))


def with_judge(engine, judge: tuple[tuple[int, ...], tuple[int, ...]]):
    """`engine` whose judge answers with the words `judge` (positive ids, negative ids)."""
    positive, negative = judge
    engine.builder = dataclasses.replace(
        engine.builder, positive_ids=positive, negative_ids=negative
    )
    return engine


def solve_in_batch(engine, problems, rows: int) -> list:
    """Every problem through a batch of `rows` rows of `engine`, refilled as rows finish;
    solutions in problem order."""
    batch, queue, solved = RowBatch(engine, rows), list(enumerate(problems)), {}
    while queue or batch.busy:
        while queue and batch.free:
            i, p = queue.pop(0)
            ids, inputs = engine.prompt(p.question, [problem_image(p)])
            batch.admit(ids, inputs, i, time.perf_counter())
        solved.update(batch.run())
    return [solved[i] for i in range(len(problems))]


def tiny_sapo_config(target: str, draft: str, output_dir: str, *overrides: str):
    """Stage `sapo` on the tiny pair: 4 updates of 2 prompts x 2 rollouts at a large learning
    rate (every step moves the parameters), steps cut at the letter `e` (random tokens rarely
    write a blank line), a 2-problem eval; `overrides` after these."""
    return load_config(
        "configs/digitmath/base.yaml",
        [
            "stage=sapo",
            f"train.init_from={draft}",
            "model.text.num_hidden_layers=1",  # the tiny draft
            "train.steps=4",
            "train.warmup_steps=1",
            "train.learning_rate=1e-2",
            "train.save_every=2",
            "train.log_every=1",
            f"sapo.target={target}",
            "sapo.prompts=2",
            "sapo.group_size=2",
            "sapo.max_new_tokens=12",
            "sapo.max_step_tokens=6",
            "sapo.alpha=0.5",
            "sapo.micro_batches=2",
            "prompt.step_delimiter=e",
            "eval.problems=2",
            "eval.batch_size=2",
            "eval.max_new_tokens=8",
            f"output_dir={output_dir}",
            *overrides,
        ],
    )
