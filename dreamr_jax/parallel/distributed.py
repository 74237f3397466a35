"""Runs over several hosts on JAX's own runtime (`jax.distributed`): one process a host, every
process running the same program over global arrays (multi-controller).

What each process must agree on is the host-side control flow: every process takes the same
branch, so every value the host reads from a global array is read whole on all of them
(`to_host`, which gathers what a process cannot address) and host work (decoding, checking
answers) is done on every process alike. What only one process may do, writing logs, records
and exports, asks `is_primary`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from dreamr_jax.parallel.rules import logical_to_spec


def initialize(cfg) -> None:
    """Joins the run's processes when `cfg.initialize` (a `DistributedConfig`); a no-op
    otherwise, and when they are already joined. Fields left unset (address "", processes 0,
    id -1) are found by JAX itself: on TPU pods, under SLURM or Open MPI, or from
    `JAX_COORDINATOR_ADDRESS`. Must run before anything touches a device."""
    if not cfg.initialize or jax.distributed.is_initialized():
        return
    # CPU devices of several processes reach each other through gloo (multi-host CPU tests and
    # runs); GPU and TPU have collectives of their own, which this setting does not touch.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address or None,
        num_processes=cfg.num_processes or None,
        process_id=None if cfg.process_id < 0 else cfg.process_id,
        initialization_timeout=cfg.timeout_s,
    )


def is_primary() -> bool:
    """Whether this process writes what is written once (logs, records, exports)."""
    return jax.process_index() == 0


def to_host(tree):
    """`tree` with every array a NumPy array holding the whole global value, on every process:
    arrays this process can address whole are copied, the others gathered from all processes
    (a collective: every process must call it at the same point)."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def local_batch_to_global(tree, mesh: Mesh):
    """Each process's rows `[local_batch, ...]` as one global array `[local_batch * processes,
    ...]` split over the batch mesh axes (process p's rows first-to-last at p * local_batch). In
    one process this is `device_put` with the batch sharding. The batch mesh axes must split the
    global batch where there are several processes: a replicated batch would need every
    process to hold all rows."""

    def put(x):
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count()
        spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), (rows,) + x.shape[1:], mesh)
        if jax.process_count() > 1 and spec[0] is None:
            raise ValueError(
                f"a global batch of {rows} rows does not split over the mesh's batch axes "
                f"{dict(mesh.shape)}: with {jax.process_count()} processes each must hold its own"
            )
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

    return jax.tree.map(put, tree)


def spread_devices(n_first: int, n_second: int) -> tuple[list, list]:
    """Two disjoint device lists of `n_first` and `n_second` devices, each taking the same share
    of every process's devices where the counts divide by the processes (so both submeshes
    span every host and every process takes part in every program); otherwise, and in one
    process, the first `n_first` devices and the `n_second` after them."""
    processes = jax.process_count()
    if processes == 1 or n_first % processes or n_second % processes:
        devices = jax.devices()
        return devices[:n_first], devices[n_first : n_first + n_second]
    first, second = [], []
    for p in range(processes):
        own = [d for d in jax.devices() if d.process_index == p]
        a, b = n_first // processes, n_second // processes
        if a + b > len(own):
            raise ValueError(f"process {p} has {len(own)} devices; {a} + {b} asked of each")
        first += own[:a]
        second += own[a : a + b]
    return first, second
