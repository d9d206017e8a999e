"""Train state, initialised directly sharded (never materialised on one device)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from concept_diffusion.parallel import rules


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes: step count, fp32 params, optimizer state, EMA."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None


def unbox(tree):
  """Strips nn.Partitioned boxes (the logical names live on in the shardings)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _boxed_init_fn(init_params: Callable, tx: optax.GradientTransformation, use_ema: bool):
  """(key, given) -> TrainState whose params (and their optimizer moments) keep logical
  boxes; the param subtrees in `given` (name -> arrays) replace the initialised ones."""
  def init(key, given=None):
    params = {**init_params(key), **(given or {})}
    ema = jax.tree.map(jnp.copy, params) if use_ema else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), ema_params=ema)
  return init


def abstract_state(init_params: Callable, tx: optax.GradientTransformation, use_ema: bool,
                   mesh: jax.sharding.Mesh, key: jax.Array):
  """(ShapeDtypeStruct tree with the mesh's NamedShardings, sharding tree), no compute."""
  boxed = jax.eval_shape(_boxed_init_fn(init_params, tx, use_ema), key)
  shardings = rules.tree_shardings(boxed, mesh)
  shapes = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        unbox(boxed), shardings)
  return shapes, shardings


def init_state(init_params: Callable, tx: optax.GradientTransformation, use_ema: bool,
               mesh: jax.sharding.Mesh, key: jax.Array, given: dict | None = None):
  """Initialises the state inside one jit whose out_shardings place every leaf.

  given: param subtrees already loaded (a warm start), placed as the state's. They are
  the state's params, the EMA gets copies, and their own initialisation is never
  computed: the program drops it (the tiny concepts stage's random encoder was a quarter
  of its init's compile time, and a second copy of the encoder in device memory).
  """
  return init_program(init_params, tx, use_ema, mesh, key)(key, given or {})


def init_program(init_params: Callable, tx: optax.GradientTransformation, use_ema: bool,
                 mesh: jax.sharding.Mesh, key: jax.Array):
  """The jitted (key, given) -> TrainState that init_state runs."""
  _, shardings = abstract_state(init_params, tx, use_ema, mesh, key)
  init = _boxed_init_fn(init_params, tx, use_ema)
  # No mesh context here: out_shardings place the leaves, and Flax's DenseGeneral
  # cannot apply a multi-axis kernel's constraint to its flat init.
  return jax.jit(lambda k, g: unbox(init(k, g)), out_shardings=shardings)
