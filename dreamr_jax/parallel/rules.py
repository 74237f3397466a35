"""The one logical-axis -> mesh-axis rule table, and the helpers that apply it.

Every parameter carries `axes` metadata with logical names (e.g. `("embed", "mlp")`); this file is
the only place those names meet physical mesh axes `(data, fsdp, tensor)`. A logical axis whose
dimension does not divide by its mesh axes is left replicated, so tiny test models and real
checkpoints share one table.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None

LOGICAL_AXIS_RULES: dict[str, MeshAxes] = {
    # Activations.
    "batch": ("data", "fsdp"),
    "seq": None,
    # Decoder weights: FSDP over the model dimension, tensor parallel over heads/MLP/vocab.
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",  # num_heads * head_dim, flattened
    "kv_heads": "tensor",  # num_kv_heads * head_dim, flattened
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,  # the stacked decoder layers' leading axis (`text.scan_layers`)
    # Vision tower weights.
    "vit_embed": "fsdp",
    "vit_qkv": "tensor",  # 3 * hidden, flattened
    "vit_heads": "tensor",  # hidden as num_heads * head_dim, input of the output projection
    "vit_mlp": "tensor",
    "vit_merge": "fsdp",  # spatial_merge_size**2 * hidden, input of the mergers
    "patch": None,
    "pos_table": None,
    # KV cache [batch, seq, kv_heads, head_dim].
    "cache_batch": ("data", "fsdp"),
    "cache_kv_heads": "tensor",
}


def _mesh_axes_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[n] for n in names]))


def logical_to_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: dict[str, MeshAxes] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Maps logical axis names of an array of `shape` to a PartitionSpec on `mesh`.

    A dimension that its mesh axes do not divide, or whose mesh axes an earlier dimension already
    uses, stays replicated.
    """
    if logical is None:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, dim in zip(logical, shape, strict=True):
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        names = tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)
        if not names or used & set(names) or dim % _mesh_axes_size(mesh, names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def logical_sharding(
    logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def variable_sharding(variable: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The sharding of one NNX variable from its `axes` metadata (replicated if it has none)."""
    value = variable.get_value()
    return logical_sharding(variable.get_metadata().get("axes"), value.shape, mesh)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """A pytree like `state` holding the NamedSharding of every array leaf."""
    return jax.tree.map(
        lambda v: variable_sharding(v, mesh),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
