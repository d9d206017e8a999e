"""Model factory: the trainer builds and initialises every stage's modules from config alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from concept_diffusion.config import ConfigError

from concept_diffusion.models.baselines import TokenAR, TokenMDM
from concept_diffusion.models.concept_model import ConceptModel
from concept_diffusion.models.encoder import ConceptEncoder
from concept_diffusion.models.layers import ModelConfig
from concept_diffusion.models.renderer import Renderer

STAGE_MODULES = {
    "render": ("encoder", "renderer"),
    "concepts": ("encoder", "concept_model"),  # The encoder is frozen (from a render run).
    "ar": ("ar",),
    "mdm": ("mdm",),
}
MODULES = {"encoder": ConceptEncoder, "renderer": Renderer, "concept_model": ConceptModel,
           "ar": TokenAR, "mdm": TokenMDM}


def check_model_config(config) -> None:
  """Raises early for model choices this platform or shape cannot run."""
  m = config.model
  if m.attention == "cudnn" and jax.default_backend() != "gpu":
    raise ConfigError(f"model.attention='cudnn' needs a GPU, but the JAX backend is "
                     f"{jax.default_backend()!r}; use model.attention='xla'")
  if m.attention == "cudnn" and m.dtype != "bfloat16":
    raise ConfigError("model.attention='cudnn' runs in half precision only; "
                     "set model.dtype='bfloat16'")
  if m.head_dim % 2:
    raise ConfigError(f"model.head_dim={m.head_dim} must be even (rotary embedding)")
  if m.diff_head_dim % 2:
    raise ConfigError(f"model.diff_head_dim={m.diff_head_dim} must be even (time features)")


def build_models(config, vocab_size: int | None = None, stage: str | None = None):
  """{name: module} for `stage` (default config.stage); see STAGE_MODULES."""
  stage = stage or config.stage
  if stage not in STAGE_MODULES:
    raise ValueError(f"stage={stage!r} is not one of {', '.join(STAGE_MODULES)}")
  check_model_config(config)
  cfg = ModelConfig.from_config(config, vocab_size)
  return {name: MODULES[name](cfg) for name in STAGE_MODULES[stage]}


def example_inputs(config, name: str, batch_size: int = 1):
  """Dummy positional inputs with which `name`'s module is initialised."""
  n, l, t = config.data.num_concepts, config.data.concept_len, config.data.seq_len
  d = config.model.concept_dim
  tokens_BxNxL = jnp.zeros((batch_size, n, l), jnp.int32)
  mask_BxNxL = jnp.ones((batch_size, n, l), bool)
  z_BxNxD = jnp.zeros((batch_size, n, d), jnp.float32)
  if name == "encoder":
    return (tokens_BxNxL, mask_BxNxL)
  if name == "renderer":
    return (tokens_BxNxL, z_BxNxD, z_BxNxD, mask_BxNxL)
  if name == "concept_model":
    return (z_BxNxD, jnp.ones((batch_size, n), jnp.int32), z_BxNxD, jnp.zeros((batch_size, n)))
  return (jnp.zeros((batch_size, t), jnp.int32), jnp.ones((batch_size, t), jnp.int32))


def init_params(config, key, vocab_size: int | None = None, stage: str | None = None):
  """{name: params} (with nn.Partitioned boxes) for `stage`, initialised under jit."""
  models = build_models(config, vocab_size, stage)
  keys = jax.random.split(key, len(models))
  return {name: jax.jit(model.init)(k, *example_inputs(config, name))["params"]
          for (name, model), k in zip(models.items(), keys)}


def param_shapes(config, vocab_size: int | None = None, stage: str | None = None):
  """Like init_params but abstract (jax.ShapeDtypeStruct leaves in nn.Partitioned boxes)."""
  return jax.eval_shape(lambda k: init_params(config, k, vocab_size, stage), jax.random.key(0))
