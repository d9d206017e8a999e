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


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax
  from concept_diffusion import encoding
  from concept_diffusion.config import ConfigError
  from concept_diffusion.data import concept_cache
  from concept_diffusion.data.errors import DataError
  from concept_diffusion.parallel import multihost
  from concept_diffusion.train import checkpoint
  try:
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    multihost.maybe_initialize(encoding.encode_config(config_lib.base_config(), overrides))
    marker = encoding.encode_run(_RENDER.value, _OUTPUT.value, _NUM.value, overrides=overrides,
                                 split=_SPLIT.value, chunk_rows=_CHUNK.value,
                                 rows_per_write=_ROWS.value)
  except (ConfigError, DataError, checkpoint.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"process {jax.process_index()}: {marker['rows']:,} examples in "
        f"{concept_cache.split_dir(_OUTPUT.value, _SPLIT.value)}", flush=True)


if __name__ == "__main__":
  app.run(main)
