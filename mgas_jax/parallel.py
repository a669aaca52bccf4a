"""Device mesh and shardings: data parallelism with `jax.jit` over a 1-D mesh.

One mesh axis, 'data', over every device of every process. Batches are split along it
(`NamedSharding(mesh, P('data'))`); the training state is replicated (`P()`). `jax.jit` then inserts
the gradient all-reduce itself, so the train step is written as if for one device.

Multi-host: each process reads only its slice of every global batch (data/splits.py) and
`shard_batch` assembles the global array from the process-local pieces.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def initialize_multihost() -> None:
    """jax.distributed.initialize() from the cluster environment (SLURM, TPU pods, ...).

    Must run before any other JAX call; afterwards jax.devices() lists the devices of all hosts.
    """
    jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host numpy batch (this process's slice) -> global jax.Arrays split over 'data'.

    Args:
      batch: pytree of np.ndarray, each (B_local, ...), with B_local = B_global / process_count.
      mesh: the data mesh; B_global must be divisible by its size.
    Returns:
      The same pytree of jax.Array (B_global, ...) with sharding P('data').
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A pytree (identical on every process) -> jax.Arrays replicated over the mesh.

    Single process: a device_put. Multi-host: built piecewise from host data, because a device_put
    cannot reach another host's devices. Typed PRNG keys are carried as their raw key data.
    """
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=impl)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree)


def pad_batch(batch: dict, size: int) -> dict:
    """Pads a host batch to `size` examples and adds 'mask' (size,) float32: 1 real, 0 padding.

    The last evaluation batch is usually short; padding keeps one compiled shape and an even split
    over devices, and the mask keeps padded examples out of the metrics.
    """
    n = len(next(iter(batch.values())))
    if n > size:
        raise ValueError(f"batch of {n} examples does not fit the padded size {size}")
    out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) if n < size else v
           for k, v in batch.items()}
    out["mask"] = (np.arange(size) < n).astype(np.float32)
    return out
