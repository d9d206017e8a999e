"""Mesh resolution, logical axis rules, per-process batch slices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.config import ConfigError
from concept_diffusion.parallel import mesh as mesh_lib
from concept_diffusion.parallel import multihost, rules
from concept_diffusion.train import stages


def _config(data=-1, fsdp=1, tensor=1):
  c = config_lib.base_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
  return c


@pytest.mark.parametrize("ways,devices,expected", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((1, 8, 1), 8, (1, 8, 1)),
    ((1, 1, 1), 8, (1, 1, 1)), ((-1, 2, 1), 4, (2, 2, 1))])
def test_mesh_shape_resolves_minus_one(ways, devices, expected):
  assert mesh_lib.mesh_shape(_config(*ways), devices) == expected


def test_mesh_that_does_not_divide_devices_names_the_field():
  with pytest.raises(ConfigError, match="mesh.fsdp=3"):
    mesh_lib.mesh_shape(_config(-1, 3, 1), 8)
  with pytest.raises(ConfigError, match="use them all"):
    mesh_lib.mesh_shape(_config(1, 2, 1), 8, allow_subset=False)


def test_rules_cover_every_logical_name_once():
  names = list(rules.LOGICAL_NAMES)
  assert len(names) == len(set(names))
  assert set(names) == {"batch", "concepts", "length", "embed", "mlp", "heads", "kv_heads", "kv",
                        "vocab", "concept_embed", "head_mlp", "layers"}


def test_logical_to_sharding_drops_axes_that_do_not_divide():
  mesh = jax.make_mesh((1, 1, 1), rules.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  spec = rules.logical_to_sharding(("embed", "mlp"), (16, 32), mesh).spec
  assert tuple(spec) == (None, None)  # 1-way axes are dropped.
  spec = rules._fit_spec(jax.sharding.PartitionSpec("fsdp", "tensor"), (6, 8),
                         type("M", (), {"shape": {"fsdp": 4, "tensor": 2}})())
  assert tuple(spec) == (None, "tensor")


def test_batch_uses_data_and_fsdp_before_embed():
  import flax.linen as nn
  assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules.LOGICAL_RULES) == \
      jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
  assert nn.logical_to_mesh_axes(("embed", "mlp"), rules.LOGICAL_RULES) == \
      jax.sharding.PartitionSpec("fsdp", "tensor")


def test_local_batch_slice_single_process():
  mesh = jax.make_mesh((1, 1, 1), rules.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert multihost.local_batch_slice(mesh, 8) == (0, 1)


class _Tok:
  vocab_size = 128


@pytest.mark.parametrize("stage", ["render", "ar", "mdm"])
def test_every_param_has_logical_axis_names(stage):
  c = config_lib.base_config()
  c.stage = stage
  c.model.embed_dim, c.model.mlp_dim, c.model.num_heads, c.model.num_kv_heads = 32, 64, 2, 2
  c.model.head_dim = 16
  c.data.num_concepts, c.data.seq_len = 4, 16
  s = stages.build_stage(c, _Tok())
  boxed = jax.eval_shape(s.init_params, jax.random.key(0))
  assert rules.unnamed_params(boxed) == []
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, __import__("flax").linen.Partitioned)):
    assert all(n in rules.LOGICAL_NAMES or n is None for n in leaf.names), leaf.names


def test_head_weights_shard_over_fsdp_and_tensor():
  # A (head_mlp, mlp) weight must not be replicated across FSDP devices.
  assert nn.logical_to_mesh_axes(("head_mlp", "mlp"), rules.LOGICAL_RULES) == \
      jax.sharding.PartitionSpec("fsdp", "tensor")
  assert nn.logical_to_mesh_axes(("embed", "head_mlp"), rules.LOGICAL_RULES) == \
      jax.sharding.PartitionSpec("fsdp", "tensor")
