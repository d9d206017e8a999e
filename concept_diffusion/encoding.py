"""Encoding a source into a concept cache with a finished render run's frozen encoder.

  from concept_diffusion import encoding
  marker = encoding.encode_run("/tmp/render", "/tmp/cache", num_examples=100_000,
                               overrides={"data.num_concepts": 16})

The command line is `python -m concept_diffusion.encode`; the cache layout and its
resume guarantees are concept_diffusion/data/concept_cache.py's.
"""

from __future__ import annotations

from concept_diffusion import config as config_lib


def encode_config(render_config, overrides: dict):
  """The render run's config with {"section.field": value} overrides applied."""
  config = config_lib.base_config()
  config.update(render_config)
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def make_encode_fn(config, params, mesh, vocab_size: int | None = None):
  """(tokens_BxNxL, token_mask_BxNxL) -> concepts_BxNxD with the frozen encoder, batch split.

  vocab_size: the tokenizer's (the model was built with it; data.vocab_size is only
  what the tokenizer was asked for).
  """
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from concept_diffusion.models.encoder import ConceptEncoder
  from concept_diffusion.models.layers import ModelConfig
  from concept_diffusion.train.state import unbox
  enc = ConceptEncoder(ModelConfig.from_config(config, vocab_size))
  apply = jax.jit(lambda p, t, m: enc.apply({"params": p}, t, m))
  params = unbox(params["encoder"])
  ways = mesh.size

  def encode(tokens_BxNxL, mask_BxNxL):
    b = len(tokens_BxNxL)
    pad = -b % ways  # Every device gets an equal share; padded rows are dropped.
    if pad:
      tokens_BxNxL = np.concatenate([tokens_BxNxL, np.zeros((pad,) + tokens_BxNxL.shape[1:],
                                                            tokens_BxNxL.dtype)])
      mask_BxNxL = np.concatenate([mask_BxNxL, np.zeros((pad,) + mask_BxNxL.shape[1:], bool)])
    split = NamedSharding(mesh, P(mesh.axis_names[0]))
    z_BxNxD = apply(params, jax.device_put(tokens_BxNxL, split), jax.device_put(mask_BxNxL, split))
    return np.asarray(jax.device_get(z_BxNxD))[:b]

  return encode


def encode_run(render_workdir: str, output: str, num_examples: int, *,
               overrides: dict | None = None, split: str = "train", chunk_rows: int = 64,
               rows_per_write: int = 256, progress: bool = True) -> dict:
  """Writes (or resumes) this process's rows of the cache; returns its marker.

  Each process encodes its own rows on its own devices (no collectives), so a
  multi-host job runs this on every process after jax.distributed.initialize.
  """
  import jax
  from concept_diffusion import train
  from concept_diffusion.data import concept_cache
  mesh = jax.make_mesh((jax.local_device_count(), 1, 1), ("data", "fsdp", "tensor"),
                       devices=jax.local_devices(),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  render_config, tokenizer, params = train.restore_params(render_workdir, mesh)
  config = encode_config(render_config, overrides or {})
  return concept_cache.write_cache(
      output, config, tokenizer, make_encode_fn(config, params, mesh, tokenizer.vocab_size),
      num_examples=num_examples, split=split, process_index=jax.process_index(),
      process_count=jax.process_count(), chunk_rows=chunk_rows,
      rows_per_write=rows_per_write, extra_meta={"render_workdir": render_workdir},
      progress=progress)
