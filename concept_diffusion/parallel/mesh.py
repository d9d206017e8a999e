"""Device mesh from config: (data, fsdp, tensor), -1 = all remaining devices."""

from __future__ import annotations

import math

import jax
import ml_collections
from absl import logging

from concept_diffusion.config import ConfigError
from concept_diffusion.parallel.rules import MESH_AXES


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int,
               allow_subset: bool = True) -> tuple[int, int, int]:
  """Resolves -1; the mesh must divide `num_devices` (a smaller one uses the first devices)."""
  ways = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
  fixed = math.prod(w for w in ways.values() if w != -1)
  if num_devices % fixed:
    bad = next((a for a in MESH_AXES if ways[a] != -1 and num_devices % ways[a]), "data")
    raise ConfigError(
        f"mesh.{bad}={ways[bad]} (mesh data x fsdp x tensor = {tuple(ways.values())}) does not "
        f"divide the {num_devices} available devices; choose divisors of {num_devices} or -1")
  for axis in MESH_AXES:
    if ways[axis] == -1:
      ways[axis] = num_devices // fixed
  used = math.prod(ways.values())
  if used != num_devices and not allow_subset:
    raise ConfigError(
        f"mesh.data x mesh.fsdp x mesh.tensor = {used} but {num_devices} devices are "
        "available; with several processes the mesh must use them all (set one axis to -1)")
  return tuple(ways[a] for a in MESH_AXES)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """Mesh over `devices` (default: all) with Auto axes (GSPMD propagates the rest)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config, len(devices), allow_subset=jax.process_count() == 1)
  used = math.prod(shape)
  if used < len(devices):
    logging.warning("mesh %s uses %d of the %d devices", shape, used, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices[:used])


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """Ways the batch is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]
