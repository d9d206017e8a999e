"""Multi-host helpers: distributed init, per-process data shards, global batches."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from concept_diffusion.parallel import launch_env, rules


def maybe_initialize(config: ml_collections.ConfigDict) -> None:
  """jax.distributed.initialize when config.distributed.initialize (idempotent)."""
  if not config.distributed.initialize or jax.distributed.is_initialized():
    return
  kwargs = launch_env.distributed_kwargs(config.distributed.to_dict())
  # Only affects the CPU backend: lets several local CPU processes run collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def is_main() -> bool:
  """Only process 0 writes logs, configs and the tokenizer."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Barrier across processes (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def local_batch_slice(mesh: jax.sharding.Mesh, global_batch: int) -> tuple[int, int]:
  """(shard index, shard count) of the batch rows this process must load.

  Derived from the batch sharding, so it is right even when a mesh axis that
  replicates the batch (tensor) spans processes: those processes load the same rows.
  """
  sharding = rules.batch_sharding(mesh, 1)
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  starts = [s[0].start or 0 for s in index_map.values()]
  stops = [global_batch if s[0].stop is None else s[0].stop for s in index_map.values()]
  lo, hi = min(starts), max(stops)
  rows = hi - lo
  if global_batch % rows or lo % rows:
    raise ValueError(f"process {jax.process_index()} holds batch rows [{lo}, {hi}), "
                     "not one aligned block; use a mesh whose data x fsdp axes "
                     "are laid out process-major")
  return lo // rows, global_batch // rows


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Assembles process-local numpy slices into global jax.Arrays split over data x fsdp."""
  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(rules.batch_sharding(mesh, x.ndim), x)
  return {k: one(v) for k, v in local_batch.items()}
