"""Logical axis rules: the one table that maps model axis names onto the mesh.

Layers name their axes ("embed", "mlp", ...); only this table knows the mesh
axes ("data", "fsdp", "tensor"). Rules are tried in order and a mesh axis is
used at most once per array, so activations constrained to
("batch", "length", "embed") shard batch over data x fsdp and leave embed
whole, while weights shaped ("embed", "mlp") shard embed over fsdp.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # Mesh axes that split the global batch.

LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("concepts", None),
    ("length", None),
    ("layers", None),
    ("embed", "fsdp"),
    ("concept_embed", "fsdp"),
    ("mlp", "tensor"),
    # The diffusion head's width pairs with "mlp" (tensor) on most of its weights: shard it
    # over fsdp first so those weights are not copied on every FSDP device.
    ("head_mlp", "fsdp"),
    ("head_mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
)
LOGICAL_NAMES = tuple(dict.fromkeys(name for name, _ in LOGICAL_RULES))


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh):
  """Activates `mesh` and LOGICAL_RULES so nn.with_logical_constraint takes effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def _fit_spec(spec: P, shape, mesh: jax.sharding.Mesh) -> P:
  """Drops mesh axes that do not divide a dimension (that dimension is replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axes if ways > 1 and dim % ways == 0 else None)
  return P(*fitted)


def logical_to_sharding(logical_spec, shape, mesh: jax.sharding.Mesh) -> NamedSharding:
  """NamedSharding for one array with logical axis names (None = replicated)."""
  if logical_spec is None or not len(shape):
    return NamedSharding(mesh, P())
  mesh_spec = nn.logical_to_mesh_axes(tuple(logical_spec), LOGICAL_RULES)
  return NamedSharding(mesh, _fit_spec(mesh_spec, shape, mesh))


def tree_shardings(abstract_tree, mesh: jax.sharding.Mesh):
  """Shardings for a tree whose leaves may be boxed in nn.Partitioned (logical names)."""
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return logical_to_sharding(leaf.names, leaf.value.shape, mesh)
    return logical_to_sharding(None, getattr(leaf, "shape", ()), mesh)
  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Examples split over data x fsdp; the other dimensions whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def unnamed_params(boxed_tree) -> list[str]:
  """Paths of array leaves that carry no logical axis names (should be none)."""
  missing = []
  def visit(path, leaf):
    if not isinstance(leaf, nn.Partitioned) and getattr(leaf, "ndim", 0) > 0:
      missing.append(jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(
      visit, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return missing
