"""Meshes, the logical-axis rule table and submeshes."""

from dreamr_jax.parallel.mesh import AXES, make_mesh, mesh_from_config, split_draft_target
from dreamr_jax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    logical_sharding,
    logical_to_spec,
    state_shardings,
    variable_sharding,
)

__all__ = [
    "AXES",
    "LOGICAL_AXIS_RULES",
    "logical_sharding",
    "logical_to_spec",
    "make_mesh",
    "mesh_from_config",
    "split_draft_target",
    "state_shardings",
    "variable_sharding",
]
