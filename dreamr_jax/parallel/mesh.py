"""Device meshes with axes (data, fsdp, tensor), and draft/target submeshes."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(sizes: Sequence[int], n_devices: int) -> tuple[int, int, int]:
    """Fills a single -1 in `sizes` with what is left of `n_devices`; checks the product."""
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {sizes}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh sizes {sizes} do not divide {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if int(np.prod(sizes)) != n_devices:
        raise ValueError(f"mesh sizes {sizes} need {int(np.prod(sizes))} devices, have {n_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axis types.

    Auto axes matter: `jax.make_mesh` defaults to Explicit axes, under which arrays placed by our
    logical rules would need explicit sharding in every op.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_axis_sizes((data, fsdp, tensor), len(devices))
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_from_config(cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh from a `MeshConfig`."""
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor, devices=devices)


def split_draft_target(
    n_draft: int,
    devices: Sequence[jax.Device] | None = None,
    draft_axes: Sequence[int] = (1, -1, 1),
    target_axes: Sequence[int] = (1, -1, 1),
) -> tuple[Mesh, Mesh]:
    """Splits the devices into two disjoint meshes: the first `n_draft` for the draft model, the
    rest for the target, so both can run at once under async dispatch.

    With a single device both meshes share it (there is nothing to split).
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) == 1:
        return make_mesh(*draft_axes, devices=devices), make_mesh(*target_axes, devices=devices)
    if not 0 < n_draft < len(devices):
        raise ValueError(
            f"n_draft={n_draft} must leave devices for both models (have {len(devices)})"
        )
    return (
        make_mesh(*draft_axes, devices=devices[:n_draft]),
        make_mesh(*target_axes, devices=devices[n_draft:]),
    )
