"""The memory plan (`dreamr_jax/plan.py`) against what a real run allocates, on a tiny model
over the 8 fake CPU devices: parameters sharded by the rule table, AdamW's state, a serving
KV cache; and a plan that does not fit its device memory fails naming the key."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from dreamr_jax import plan
from dreamr_jax.config import load_config
from dreamr_jax.config.schema import TrainConfig
from dreamr_jax.models.init import init_model
from dreamr_jax.parallel.mesh import make_mesh
from dreamr_jax.rl.update import init_optimizer_state
from dreamr_jax.speculative.runner import _cache_maker

TINY = "configs/models/tiny.yaml"
pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")


def _on_one_device(tree) -> int:
    """Bytes the arrays of `tree` hold on the first device."""
    first = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == first
    )


@pytest.mark.parametrize("sizes", [(1, 8, 1), (2, 2, 2), (1, 1, 8)])
def test_parameters_and_optimizer_state_are_what_a_sharded_run_holds(sizes):
    cfg = load_config(TINY).model
    model = init_model(cfg, mesh=make_mesh(*sizes))
    params = nnx.state(model, nnx.Param)
    want = _on_one_device(params)
    assert plan.param_bytes(cfg, "float32", plan.abstract_mesh(sizes)) == want
    state = init_optimizer_state(TrainConfig(), params)
    moments = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim > 0]  # not the step count
    assert _on_one_device(moments) == 2 * want
    groups = plan.train_plan(
        load_config(
            TINY, [f"mesh.{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), sizes, strict=True)]
        ),
        8,
    )
    parts = {p.name: p.bytes for p in groups[0].parts}
    assert parts["parameters"] == want and parts["optimizer state (AdamW mu, nu)"] == 2 * want


def test_a_serving_cache_is_what_the_engine_allocates():
    cfg = load_config(TINY).model
    cache = _cache_maker(None)(cfg.text, 3, 256, np.float32)
    assert plan.cache_bytes(cfg, 3, 256, "float32") == sum(x.nbytes for x in jax.tree.leaves(cache))


def test_the_shipped_pair_plans_and_a_budget_too_small_fails(capsys):
    assert plan.main(["--serve", "batch_size=8", "--devices", "1"]) == 0
    text = capsys.readouterr().out
    assert "target parameters" in text and "draft KV cache" in text
    tight = ["--serve", "parallel.device_memory_gib=0.01", "--devices", "1"]
    assert plan.main(tight) == 1
    assert "does NOT fit in 0.01 GiB" in capsys.readouterr().out


def test_a_32b_target_plans_on_submeshes_without_its_checkpoint(capsys):
    """2B -> 32B serving on one 8-GPU host, from the model YAMLs: the target's 64 GB of bf16
    weights split over 4 devices, the draft alone on the first."""
    args = [
        "--serve",
        "target.path=configs/models/qwen3_vl_32b.yaml",
        "draft.path=configs/models/qwen3_vl_2b.yaml",
        "target.dtype=bfloat16",
        "draft.dtype=bfloat16",
        "parallel.draft_devices=1",
        "parallel.target_devices=4",
        "--devices",
        "8",
    ]
    assert plan.main(args) == 0
    text = capsys.readouterr().out
    assert "each of the target's 4 devices" in text and "each of the draft's 1 devices" in text
