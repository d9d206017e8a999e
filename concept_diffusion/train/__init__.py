"""Trainer: train state, optimizer, checkpointing, metrics, stages, the loop.

  from concept_diffusion import train as train_lib
  train_lib.train(config, workdir)
  config, tokenizer, params = train_lib.restore_params(workdir)

Command line (`__main__.py`): python -m concept_diffusion.train --config=configs/<stage>.py:tiny
--workdir=DIR [--config.field=value ...]
"""


def train(config, workdir):
  """Pretrains config.stage in workdir (resumes); see trainer.train."""
  from concept_diffusion.train import trainer  # Lazy: keeps `python -m` start-up light.
  return trainer.train(config, workdir)


def restore_params(workdir, mesh=None, use_ema=True):
  """(config, tokenizer, params) of the newest good checkpoint; see trainer.restore_params."""
  from concept_diffusion.train import trainer
  return trainer.restore_params(workdir, mesh, use_ema)
