"""Sharding over (fsdp, tensor) on 8 fake CPU devices: same logits as one device, and the rule
table shards nearly every parameter byte of a realistic preset."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import dreamr_jax
from dreamr_jax.config import load_config
from dreamr_jax.models import init_model, prepare_inputs
from dreamr_jax.models.hf_io import abstract_model
from dreamr_jax.parallel import logical_to_spec, make_mesh, split_draft_target, state_shardings

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")

TINY = "configs/models/tiny.yaml"


def _inputs(cfg, rng):
    ids = rng.integers(0, 400, size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :3] = False  # left padding
    return ids, mask


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = load_config(TINY).model
    model = init_model(cfg, seed=3)
    path = tmp_path_factory.mktemp("tiny")
    dreamr_jax.save_pretrained(model, path)
    return cfg, path


def test_sharded_load_matches_single_device(tiny_checkpoint):
    cfg, path = tiny_checkpoint
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    single = dreamr_jax.load_pretrained(path)
    sharded = dreamr_jax.load_pretrained(path, mesh=mesh)

    q = sharded.language_model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor")
    assert len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 4, q.shape[1] // 2)

    ids, mask = _inputs(cfg, np.random.default_rng(0))
    want = np.asarray(single(ids, mask))
    got = np.asarray(sharded(ids, mask))
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-5, rtol=0)


def test_sharded_init_places_shards_directly():
    cfg = load_config(TINY).model
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = init_model(cfg, seed=0, mesh=mesh)
    reference = init_model(cfg, seed=0)
    up = model.language_model.layers[1].mlp.up_proj.kernel[...]
    assert up.sharding.spec == P("fsdp", "tensor")
    # Same random draws; jit may fuse the init scaling differently, hence the tiny tolerance.
    np.testing.assert_allclose(
        np.asarray(up),
        np.asarray(reference.language_model.layers[1].mlp.up_proj.kernel[...]),
        atol=1e-7,
    )
    inputs, _ = prepare_inputs(cfg, *_inputs(cfg, np.random.default_rng(1)))
    got = np.asarray(jax.jit(lambda m, x: m.forward(x)[0])(model, inputs))
    want = np.asarray(reference.forward(inputs)[0])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["qwen3_vl_32b", "qwen3_vl_8b", "qwen3_vl_2b"])
def test_realistic_preset_is_almost_fully_sharded(preset):
    cfg = load_config(f"configs/models/{preset}.yaml").model
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    _, state = nnx.split(abstract_model(cfg, "bfloat16"))  # shapes only, nothing allocated
    total = replicated = per_device = 0
    for _, sharding, var in zip(
        *zip(*nnx.to_flat_state(state_shardings(state, mesh)), strict=True),
        (v for _, v in nnx.to_flat_state(state)),
        strict=True,
    ):
        value = var.get_value()
        nbytes = value.size * value.dtype.itemsize
        total += nbytes
        shards = int(np.prod(sharding.shard_shape(value.shape)))
        per_device += shards * value.dtype.itemsize
        if sharding.spec == P() or all(s is None for s in sharding.spec):
            replicated += nbytes
    assert replicated / total <= 0.02, f"{preset}: {replicated / total:.2%} replicated"
    # Every device holds little more than its 1/8 share.
    assert per_device <= total / 8 * 1.05


def test_indivisible_dimension_stays_replicated():
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    assert logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), (6, 128), mesh) == P(None, "tensor")
    assert logical_to_spec(("vocab", "embed"), (151936, 5120), mesh) == P("tensor", "fsdp")


def test_draft_and_target_submeshes_are_disjoint():
    draft, target = split_draft_target(2, draft_axes=(1, -1, 1), target_axes=(1, 3, 2))
    draft_ids = {d.id for d in draft.devices.flat}
    target_ids = {d.id for d in target.devices.flat}
    assert len(draft_ids) == 2 and len(target_ids) == 6
    assert not draft_ids & target_ids
    assert dict(target.shape) == {"data": 1, "fsdp": 3, "tensor": 2}
