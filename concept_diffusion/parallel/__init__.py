"""Mesh, logical axis rules and multi-host helpers."""

from concept_diffusion.parallel.mesh import data_parallel_size, make_mesh, mesh_shape
from concept_diffusion.parallel.rules import (LOGICAL_RULES, MESH_AXES, batch_sharding,
                                              logical_to_sharding, mesh_context, tree_shardings)
