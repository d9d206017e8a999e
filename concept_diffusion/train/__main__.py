"""Entry point: pretrains one stage; re-running the same command resumes.

  python -m concept_diffusion.train --config=configs/render.py:tiny --workdir=/tmp/render \
      [--config.train.num_steps=500 ...]
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from concept_diffusion.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<stage>.py[:preset]")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, config and tokenizer go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Library INFO logs (Orbax) drown the progress lines.
    logging.set_verbosity(logging.WARNING)
  from concept_diffusion.data.errors import DataError  # After flags: keep --help fast.
  from concept_diffusion.train import checkpoint, trainer
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DataError, checkpoint.CheckpointError, trainer.NonFiniteLossError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
