"""Orbax checkpoints: state + Grain iterator + metadata (config, tokenizer), keep-N.

Layout: WORKDIR/checkpoints/<step>/{state,data,meta}. A checkpoint that cannot be
read is reported and moved aside to `corrupt-<step>-<time>` (never deleted), and
the previous one is used.
"""

from __future__ import annotations

import base64
import logging as std_logging
import os
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from absl.logging import get_absl_logger

from concept_diffusion.parallel import multihost

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was required."""


class _ReadOnlyNotices(std_logging.Filter):
  """Drops Orbax's notices that a manager opened read-only is read-only (we asked for it)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("read_only=True" in message or "directory is read only" in message)


get_absl_logger().addFilter(_ReadOnlyNotices())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, config: ml_collections.ConfigDict | None = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Manager for WORKDIR/checkpoints; the trainer decides when to save (force=True)."""
  handlers = {"state": ocp.StandardCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler()}
  ckpt = config.checkpoint if config is not None else None
  options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt.max_to_keep if ckpt else None,
      enable_async_checkpointing=bool(ckpt.async_save) if ckpt else False,
      create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=tuple(handlers),
                               item_handlers=handlers, options=options)


def make_meta(config: ml_collections.ConfigDict, tokenizer, step: int, mesh) -> dict:
  """JSON metadata saved next to every checkpoint: enough to rebuild and resume."""
  return {"step": int(step), "config": config.to_dict(),
          "process_count": jax.process_count(), "mesh": dict(mesh.shape),
          "tokenizer_model": base64.b64encode(tokenizer.model_proto).decode("ascii"),
          "saved_at": time.time()}


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, meta: dict) -> None:
  """Starts an (async) save of everything needed to resume at `step`."""
  items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iter is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iter)
  mngr.save(int(step), args=ocp.args.Composite(**items), force=True)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _quarantine(mngr: ocp.CheckpointManager, step: int) -> None:
  """Moves an unreadable checkpoint out of the manager's sight, keeping its files."""
  if multihost.is_main():
    src = os.path.join(str(mngr.directory), str(step))
    dst = os.path.join(str(mngr.directory), f"corrupt-{step}-{int(time.time())}")
    if os.path.exists(src):
      os.rename(src, dst)
      logging.warning("moved unreadable checkpoint %s to %s", src, dst)
  multihost.sync(f"quarantine_{step}")
  mngr.reload()


def _restore_one(mngr, step: int, abstract_state, data_iter):
  """(state, meta, data_restored) of one step; raises if any part is unreadable."""
  meta = read_meta(mngr, step)
  items = {"state": ocp.args.StandardRestore(abstract_state)}
  same_processes = meta.get("process_count") == jax.process_count()
  if data_iter is not None and same_processes:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  if data_iter is not None and not same_processes:
    logging.warning("checkpoint %d was written by %s processes, this run has %d: the data "
                    "iterator starts from the beginning of the shuffled order",
                    step, meta.get("process_count"), jax.process_count())
  return restored["state"], meta, "data" in items


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter=None,
                   quarantine: bool = True):
  """(step, state, meta, data_restored) from the newest readable checkpoint, or None.

  An unreadable checkpoint (partial write, truncated files) is reported and, when
  `quarantine`, moved aside; the previous one is tried next. Nothing is deleted.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state, meta, data_restored = _restore_one(mngr, step, abstract_state, data_iter)
      return step, state, meta, data_restored
    except Exception as e:  # Orbax/tensorstore raise many types for bad files.
      logging.error("checkpoint at step %d in %s is corrupt or partial (%s: %s); "
                    "falling back to the previous checkpoint", step, mngr.directory,
                    type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
      print(f"WARNING: checkpoint at step {step} in {mngr.directory} is corrupt or "
            f"partial ({type(e).__name__}); falling back to the previous checkpoint",
            flush=True)
      if quarantine:
        _quarantine(mngr, step)
  return None


def tokenizer_proto(meta: dict) -> bytes:
  return base64.b64decode(meta["tokenizer_model"])


def latest_meta(workdir: str) -> tuple[int, dict]:
  """(step, meta) of the newest checkpoint whose metadata reads; CheckpointError if none."""
  mngr = make_manager(workdir, read_only=True)
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return step, read_meta(mngr, step)
    except Exception as e:
      logging.error("checkpoint %d in %s has unreadable metadata: %s", step, workdir, e)
  raise CheckpointError(f"{checkpoint_dir(workdir)} holds no readable checkpoint")
