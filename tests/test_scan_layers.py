"""Stacked decoder layers run by `lax.scan` (`model.text.scan_layers`): the same weights from the
same seed, the same checkpoint tensors, the same logits, gradients and engine outputs as the
Python loop over layers (DeepStack features, the KV cache and remat included)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from tiny_pair import MIXED, make_tiny_pair, solve_in_batch, with_judge

from dreamr_jax.config import load_config
from dreamr_jax.config.schema import PromptConfig, SpecConfig
from dreamr_jax.data import digitmath
from dreamr_jax.models import init_model, save_pretrained
from dreamr_jax.models.inputs import prepare_inputs
from dreamr_jax.serve.checkpoints import load_checkpoint
from dreamr_jax.speculative.engine import Engine


def _scanned(cfg):
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, scan_layers=True))


def test_stacked_layers_are_the_loops_weights_logits_and_gradients(tmp_path):
    cfg = load_config("configs/models/tiny.yaml").model
    loop, scan = init_model(cfg, seed=3), init_model(_scanned(cfg), seed=3)
    stacked = scan.language_model.layers.mlp.up_proj.kernel
    assert stacked.get_value().shape[0] == cfg.text.num_hidden_layers
    assert stacked.get_metadata()["axes"][0] == "layers"
    # One checkpoint tensor a layer, equal to the loop's.
    save_pretrained(loop, tmp_path / "loop")
    save_pretrained(scan, tmp_path / "scan")
    want = load_file(str(tmp_path / "loop" / "model.safetensors"))
    got = load_file(str(tmp_path / "scan" / "model.safetensors"))
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)

    ids = np.random.default_rng(0).integers(0, 400, (2, 12))
    np.testing.assert_array_equal(scan(ids), loop(ids))
    inputs, _ = prepare_inputs(cfg, ids, None, None, None)

    def loss(model, params, remat):
        m = nnx.merge(nnx.graphdef(model), params)
        hidden, _ = m.hidden_states(inputs, remat=remat)
        return jnp.sum(jnp.sin(hidden))

    want = jax.grad(loss, argnums=1)(loop, nnx.state(loop), False)
    for remat in (False, True):
        got = jax.grad(loss, argnums=1)(scan, nnx.state(scan), remat)
        w = want["language_model"]["layers"][1]["self_attn"]["q_proj"]["kernel"].get_value()
        g = got["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value()[1]
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    target, draft = make_tiny_pair(str(tmp_path_factory.mktemp("pair")))
    return {
        scan: [load_checkpoint(p, PromptConfig(), scan_layers=scan) for p in (target, draft)]
        for scan in (False, True)
    }


def test_dreamr_with_stacked_layers_commits_what_the_loop_commits(pairs):
    """Images (DeepStack), the KV cache, verification trees and the batched device loop: four
    rows refilled over six problems."""
    problems = digitmath.generate_problems("test", 6, 0)
    batched = SpecConfig(
        mode="dreamr",
        alpha=0.5,
        schedule="window",
        fallback="resume",
        max_new_tokens=32,
        max_step_tokens=8,
        draft_confidence=0.0,
    )
    out = {}
    for scan, (target, draft) in pairs.items():
        engine = with_judge(Engine(target, draft, batched), MIXED)
        out[scan] = [s.tokens for s in solve_in_batch(engine, problems, rows=4)]
    assert out[True] == out[False]
    assert len({tuple(t) for t in out[True]}) > 1
