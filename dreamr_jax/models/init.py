"""Creating a freshly initialised model directly in its sharded layout."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from dreamr_jax.config.schema import ModelConfig
from dreamr_jax.models.qwen3vl import Qwen3VL
from dreamr_jax.parallel.rules import state_shardings


def init_model(
    cfg: ModelConfig, *, seed: int = 0, dtype="float32", mesh: Mesh | None = None
) -> Qwen3VL:
    """A randomly initialised `Qwen3VL`.

    With a mesh, initialisation runs under `jax.jit` with the rule table's shardings as
    `out_shardings`, so each device only ever materialises its own shards.
    """
    make = lambda: Qwen3VL(cfg, dtype=dtype, rngs=nnx.Rngs(seed))  # noqa: E731
    if mesh is None:
        return make()
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
