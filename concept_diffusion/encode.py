"""Entry point: encodes a source's packed examples into a concept cache, once, offline.

  python -m concept_diffusion.encode --render_workdir=/tmp/render --output=/tmp/cache \
      --num_examples=100000 [--split=train] [--config.data.source=jsonl:/data/*.jsonl] \
      [--config.data.num_concepts=64]

Then train the concepts stage on it (no encoder runs in its steps):

  python -m concept_diffusion.train --config=configs/concepts.py:tiny --workdir=/tmp/concepts \
      --config.concepts.render_workdir=/tmp/render --config.data.source=concepts:/tmp/cache

The render run gives the encoder, tokenizer and chunking; `--config.*` overrides its data
fields (num_concepts must match the concepts stage's). Every process of a multi-host job
runs the same command and writes its own rows; re-running resumes. Layout and guarantees:
concept_diffusion/data/concept_cache.py.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from concept_diffusion import config as config_lib

_CONFIG = config_flags.DEFINE_config_dict("config", config_lib.base_config())
_RENDER = flags.DEFINE_string("render_workdir", None, "Workdir of a finished render run.")
_OUTPUT = flags.DEFINE_string("output", None, "Cache folder (local or gs://).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Split to encode.")
_NUM = flags.DEFINE_integer("num_examples", None, "Examples to write (finite sources may "
                            "run out first; the cache then holds fewer).")
_CHUNK = flags.DEFINE_integer("chunk_rows", 64, "Examples per zarr chunk.")
_ROWS = flags.DEFINE_integer("rows_per_write", 256, "Examples encoded and committed at once "
                             "(a multiple of --chunk_rows).")
flags.mark_flags_as_required(["render_workdir", "output", "num_examples"])


def encode_config(render_config, overrides: dict):
  """The render run's config with the command line's --config.* overrides applied."""
  config = config_lib.base_config()
  config.update(render_config)
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def make_encode_fn(config, params, mesh):
  """(tokens_BxNxL, token_mask_BxNxL) -> concepts_BxNxD with the frozen encoder, batch split."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from concept_diffusion.models.encoder import ConceptEncoder
  from concept_diffusion.models.layers import ModelConfig
  from concept_diffusion.train.state import unbox
  enc = ConceptEncoder(ModelConfig.from_config(config))
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


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax
  from concept_diffusion import train
  from concept_diffusion.config import ConfigError
  from concept_diffusion.data import concept_cache
  from concept_diffusion.data.errors import DataError
  from concept_diffusion.parallel import multihost
  from concept_diffusion.train import checkpoint
  try:
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    multihost.maybe_initialize(encode_config(config_lib.base_config(), overrides))
    # Each process encodes its own rows on its own devices: no collectives.
    mesh = jax.make_mesh((jax.local_device_count(), 1, 1), ("data", "fsdp", "tensor"),
                         devices=jax.local_devices(),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    render_config, tokenizer, params = train.restore_params(_RENDER.value, mesh)
    config = encode_config(render_config, overrides)
    marker = concept_cache.write_cache(
        _OUTPUT.value, config, tokenizer, make_encode_fn(config, params, mesh),
        num_examples=_NUM.value, split=_SPLIT.value, process_index=jax.process_index(),
        process_count=jax.process_count(), chunk_rows=_CHUNK.value,
        rows_per_write=_ROWS.value, extra_meta={"render_workdir": _RENDER.value},
        progress=True)
  except (ConfigError, DataError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"process {jax.process_index()}: {marker['rows']:,} examples in "
        f"{concept_cache.split_dir(_OUTPUT.value, _SPLIT.value)}", flush=True)


if __name__ == "__main__":
  app.run(main)
