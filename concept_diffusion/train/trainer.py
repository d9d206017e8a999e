"""The trainer: one jitted, explicitly sharded step for every stage, on any mesh.

  from concept_diffusion.train import trainer
  trainer.train(config, workdir)                        # pretrain, or resume
  config, tokenizer, params = trainer.restore_params(workdir)   # notebooks, sampling
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from concept_diffusion import config as config_lib
from concept_diffusion.config import ConfigError
from concept_diffusion.models import build
from concept_diffusion.parallel import mesh as mesh_lib
from concept_diffusion.parallel import multihost, rules
from concept_diffusion.train import checkpoint as ckpt_lib
from concept_diffusion.train import metrics as metrics_lib
from concept_diffusion.train import optimizer as opt_lib
from concept_diffusion.train import stages as stages_lib
from concept_diffusion.train import state as state_lib

# Purposes of the PRNG streams split from train.seed (data order uses data.seed).
INIT_STREAM, STEP_STREAM, EVAL_STREAM = 0, 1, 2


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss; the run stopped without saving."""


# ---------------------------------------------------------------- validation


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """All checks that need the device count; returns the resolved mesh shape."""
  config_lib.validate(config)
  build.check_model_config(config)  # Platform and shape checks of the model fields.
  shape = mesh_lib.mesh_shape(config, num_devices, allow_subset=jax.process_count() == 1)
  dp = shape[0] * shape[1]
  micro = config.train.batch_size // config.train.grad_accum_steps
  if micro % dp:
    raise ConfigError(
        f"train.batch_size={config.train.batch_size} (/ train.grad_accum_steps="
        f"{config.train.grad_accum_steps} = {micro} per micro-batch) is not divisible by the "
        f"data-parallel size mesh.data x mesh.fsdp = {shape[0]} x {shape[1]} = {dp}")
  return shape


# ---------------------------------------------------------------- the step


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The step's PRNG key: a function of (train.seed, step) only, so resume is exact."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), STEP_STREAM), step)


def _split_micro(batch: dict, num_micro: int, mesh) -> dict:
  """[B, ...] -> [A, B/A, ...] taking every A-th example, so each micro-batch stays spread."""
  def one(x_B):
    b = x_B.shape[0]
    x_AxM = x_B.reshape(b // num_micro, num_micro, *x_B.shape[1:]).swapaxes(0, 1)
    if mesh is None:
      return x_AxM
    spec = P(None, rules.BATCH_AXES, *([None] * (x_B.ndim - 1)))
    return jax.lax.with_sharding_constraint(x_AxM, jax.sharding.NamedSharding(mesh, spec))
  return jax.tree.map(one, batch)


def _loss_and_grads(loss_fn, params, batch, key, num_micro: int, mesh):
  """Mean loss, metrics and grads over `num_micro` micro-batches (lax.scan)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro == 1:
    (loss, metrics), grads = grad_fn(params, batch, key)
    return loss, metrics, grads

  def body(carry, xs):
    i, micro = xs
    (loss, metrics), grads = grad_fn(params, micro, jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

  micro_batches = _split_micro(batch, num_micro, mesh)
  zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches),
                                         key))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0][0], zeros[0][1],
                                                              zeros[1]))
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro_batches))
  return jax.tree.map(lambda x: x / num_micro, total)


def make_train_step(config: ml_collections.ConfigDict, stage, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None):
  """(state, batch) -> (state, metrics); pure, to be jitted with shardings and donation."""
  seed, num_micro = config.train.seed, config.train.grad_accum_steps
  ema_decay = config.train.ema_decay
  nan_step = config.train.get("debug_nan_step", 0)
  schedule = opt_lib.learning_rate_schedule(config)

  def loss_fn(params, batch, key, step):
    loss, metrics = stage.loss_fn(params, batch, key)
    if nan_step:  # Test hook: poison one step, as a real divergence would.
      loss = loss * jnp.where(step + 1 == nan_step, jnp.nan, 1.0)
    return loss, metrics

  def train_step(state, batch):
    key = step_key(seed, state.step)
    loss, metrics, grads = _loss_and_grads(
        lambda p, b, k: loss_fn(p, b, k, state.step), state.params, batch, key, num_micro,
        mesh)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  return train_step


def jit_train_step(config, stage, tx, mesh, state_shardings, batch_spec: dict):
  """The jitted step: explicit in/out shardings, the state donated."""
  batch_shardings = {k: rules.batch_sharding(mesh, len(shape)) for k, shape in
                     batch_spec.items()}
  replicated = jax.sharding.NamedSharding(mesh, P())
  return jax.jit(make_train_step(config, stage, tx, mesh),
                 in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def jit_eval_step(config, stage, mesh, state_shardings, batch_spec: dict):
  """(params, batch) -> metrics of the held-out loss, one fixed key: the same each time."""
  batch_shardings = {k: rules.batch_sharding(mesh, len(shape)) for k, shape in
                     batch_spec.items()}
  replicated = jax.sharding.NamedSharding(mesh, P())
  key = jax.random.fold_in(jax.random.key(config.train.seed), EVAL_STREAM)

  def eval_step(params, batch):
    loss, metrics = stage.held_out_loss_fn()(params, batch, key)
    return {**metrics, "loss": loss}

  return jax.jit(eval_step, in_shardings=(state_shardings.params, batch_shardings),
                 out_shardings=replicated)


def compile_step(jitted, state, batch, mesh):
  """Lowers and compiles the step under the mesh, with the models' activation constraints."""
  with rules.mesh_context(mesh):
    return jitted.lower(state, batch).compile()


# ---------------------------------------------------------------- preemption


class _Preemption:
  """SIGTERM sets a flag (one process); several processes agree through Orbax/JAX."""

  def __init__(self):
    self.signalled = threading.Event()
    self._previous = None

  def install(self) -> None:
    # With jax.distributed, JAX's own preemption notifier owns SIGTERM and
    # mngr.reached_preemption(step) makes every process stop at the same step.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.signalled.set())

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, mngr, step: int) -> bool:
    return self.signalled.is_set() or (jax.process_count() > 1 and
                                       mngr.reached_preemption(step))


# ---------------------------------------------------------------- setup


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if multihost.is_main():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def _tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """Process 0 trains or loads WORKDIR/tokenizer first; the others then load it."""
  from concept_diffusion import data  # Lazy: keeps `restore_params` light.
  tok = None
  if multihost.is_main():
    path = os.path.join(workdir, "tokenizer")
    if (stages_lib.inherits_tokenizer(config)
        and not os.path.exists(os.path.join(path, "tokenizer.model"))):
      stages_lib.render_tokenizer(config).save(path)  # Same ids as the frozen encoder.
    tok = data.make_tokenizer(config, workdir)
  multihost.sync("tokenizer")
  return tok if tok is not None else data.make_tokenizer(config, workdir)


CACHE_DIR = "concept_cache"
CACHE_CHUNK_ROWS = 64


def train_data_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The config the train split is read with: a concept cache's when concepts.cache_examples.

  A concepts run with concepts.cache_examples = N > 0 first encodes its first N packed
  train examples with the frozen encoder into WORKDIR/concept_cache (every process its
  own rows; resumed after a kill, skipped once done), then reads them over and over, so
  the encoder no longer runs in every step. Held-out loss still encodes on the fly.
  """
  n = config_lib.own_cache_examples(config)
  if not n:
    return config
  from concept_diffusion import encoding
  from concept_diffusion.data import concept_cache
  path = os.path.join(workdir, CACHE_DIR)
  overrides = {f"data.{k}": v for k, v in config.data.items()}  # Packed as this run packs.
  marker = encoding.encode_run(config.concepts.render_workdir, path, n, overrides=overrides,
                               chunk_rows=CACHE_CHUNK_ROWS, progress=multihost.is_main())
  multihost.sync("concept_cache")
  lo, hi = concept_cache.process_range({"num_examples": n, "process_count": jax.process_count(),
                                        "chunk_rows": CACHE_CHUNK_ROWS}, jax.process_index())
  if marker["rows"] < hi - lo:
    raise ConfigError(f"concepts.cache_examples={n}: data.source={config.data.source} ran out "
                      f"after {marker['rows']:,} examples of this process's share; lower it")
  data_config = ml_collections.ConfigDict(config.to_dict())
  data_config.data.source = f"concepts:{path}"
  return data_config


def _train_iterator(config, tokenizer, stage, mesh):
  """This process's shard of the shuffled, repeated train split, as a checkpointable iterator."""
  from concept_diffusion import data
  shard, count = multihost.local_batch_slice(mesh, config.train.batch_size)
  # A concept cache was packed (and filled) when it was written.
  cached = data.parse_source(config.data.source).kind == "concepts"
  ds = data.make_dataset(config, tokenizer, split="train", view=stage.view,
                         process_index=shard, process_count=count,
                         batch_size=config.train.batch_size // count,
                         fill_examples=bool(config.data.get("fill_examples")) and not cached,
                         **stage.train_data)
  return iter(ds)


class _Evaluator:
  """Mean held-out loss and metrics over train.eval_batches batches of the eval split."""

  def __init__(self, config, tokenizer, stage, mesh, shardings):
    from concept_diffusion import data
    shard, count = multihost.local_batch_slice(mesh, config.train.batch_size)
    self._ds = data.make_dataset(config, tokenizer, split="eval", view=stage.view,
                                 process_index=shard, process_count=count,
                                 batch_size=config.train.batch_size // count)
    self._config, self._stage, self._mesh, self._shardings = config, stage, mesh, shardings
    self._step_fn = None

  def _batches(self):
    """The first eval_batches batches, cycling a short split so every process takes as many."""
    it, n = iter(self._ds), self._config.train.eval_batches
    for _ in range(n):
      try:
        yield next(it)
      except StopIteration:
        it = iter(self._ds)
        yield next(it)

  def __call__(self, params) -> dict:
    totals = {}
    for local in self._batches():
      batch = multihost.global_batch(local, self._mesh)
      if self._step_fn is None:
        self._step_fn = jit_eval_step(self._config, self._stage, self._mesh, self._shardings,
                                      {k: v.shape for k, v in batch.items()})
      with rules.mesh_context(self._mesh):
        metrics = jax.device_get(self._step_fn(params, batch))
      for k, v in metrics.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return {f"eval_{k}": v / self._config.train.eval_batches for k, v in totals.items()}


def _init_or_restore(config, stage, tx, mesh, mngr, data_iter, make_iter):
  """(state, start step, data iterator): newest good checkpoint, else a fresh sharded init."""
  use_ema = config.train.ema_decay > 0
  init_key = jax.random.fold_in(jax.random.key(config.train.seed), INIT_STREAM)
  abstract, shardings = state_lib.abstract_state(stage.init_params, tx, use_ema, mesh,
                                                 init_key)
  restored = ckpt_lib.restore_latest(mngr, abstract, data_iter)
  if restored is not None:
    step, state, _, data_restored = restored
    logging.info("resumed from checkpoint at step %d", step)
    if multihost.is_main():
      print(f"resumed from checkpoint at step {step}", flush=True)
    return state, step, (data_iter if data_restored else make_iter()), shardings
  loaded = stage.warm_start(abstract.params) if stage.warm_start is not None else None
  state = state_lib.init_state(stage.init_params, tx, use_ema, mesh, init_key, given=loaded)
  return state, 0, data_iter, shardings


# ---------------------------------------------------------------- the loop


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains `config.stage` in `workdir`, resuming from its newest good checkpoint.

  Returns the last logged metrics. Raises ConfigError before compiling on a bad
  config, NonFiniteLossError on a NaN/Inf loss (last good checkpoint kept).
  """
  config = ml_collections.ConfigDict(config.to_dict())  # Never mutate the caller's.
  config_lib.validate(config)
  multihost.maybe_initialize(config)
  check_config(config, jax.device_count())
  config = stages_lib.resolve_config(config)
  if config.stage == "concepts":
    stages_lib.check_render_dims(config)
  mesh = mesh_lib.make_mesh(config)
  os.makedirs(workdir, exist_ok=True)
  _write_config(config, workdir)
  tokenizer = _tokenizer(config, workdir)
  stage = stages_lib.build_stage(config, tokenizer)
  tx = opt_lib.make_optimizer(config, stage.frozen)
  mngr = ckpt_lib.make_manager(workdir, config)
  data_config = train_data_config(config, workdir)
  make_iter = lambda: _train_iterator(data_config, tokenizer, stage, mesh)
  state, start, data_iter, shardings = _init_or_restore(
      config, stage, tx, mesh, mngr, make_iter(), make_iter)
  writer = metrics_lib.MetricsWriter(workdir, enabled=multihost.is_main())
  writer.truncate_after(start)
  preemption = _Preemption()
  preemption.install()
  try:
    evaluator = (_Evaluator(config, tokenizer, stage, mesh, shardings)
                 if config.train.eval_every else None)
    return _loop(config, stage, tx, mesh, mngr, state, start, data_iter, shardings,
                 tokenizer, writer, preemption, evaluator)
  finally:
    preemption.uninstall()
    mngr.wait_until_finished()
    mngr.close()
    writer.close()


def _loop(config, stage, tx, mesh, mngr, state, start, data_iter, shardings, tokenizer,
          writer, preemption, evaluator=None) -> dict:
  """Steps until train.num_steps or preemption; saves, logs, checks the loss."""
  t = config.train
  num_steps, every = t.num_steps, config.checkpoint.every_steps
  tokens_per_step = t.batch_size * stage.tokens_per_example
  peak = metrics_lib.peak_flops_per_device() * jax.device_count()
  step_fn, last = None, {}
  clock = {"time": time.perf_counter(), "step": start}
  pending = None  # (step, device metrics): fetched one step late to keep dispatch async.

  def finish(entry, params=None):
    step, device_metrics = entry
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not math.isfinite(host["loss"]):
      raise NonFiniteLossError(
          f"non-finite loss ({host['loss']}) at step {step}; training stopped. The last good "
          f"checkpoint (step {mngr.latest_step()}) was kept; lower train.learning_rate or "
          f"raise train.warmup_steps and resume")
    evaluate = params is not None
    if evaluate:  # Held-out metrics join this step's line; their time is not training time.
      eval_start = time.perf_counter()
      host.update(evaluator(params))
      clock["time"] += time.perf_counter() - eval_start
    now = time.perf_counter()
    if step % t.log_every == 0 or step == num_steps or evaluate:
      # The first interval after a (re)start includes compilation.
      dt, ds = now - clock["time"], step - clock["step"]
      tps = tokens_per_step * ds / dt if dt > 0 and ds > 0 else 0.0
      flops = tps / stage.tokens_per_example * stage.flops_per_example
      host.update(tokens_per_sec=tps, mfu=flops / peak,
                  steps_per_sec=ds / dt if dt > 0 else 0.0)
      writer.write(step, host)
      writer.console(step, num_steps, host, (num_steps - step) * dt / max(ds, 1))
      last.clear()
      last.update(host, step=step)
      clock.update(time=now, step=step)
    elif step == start + 1:  # Later intervals exclude compilation.
      clock.update(time=now, step=step)

  step = start
  while step < num_steps:
    batch = multihost.global_batch(next(data_iter), mesh)
    if step_fn is None:
      step_fn = compile_step(jit_train_step(config, stage, tx, mesh, shardings,
                                            {k: v.shape for k, v in batch.items()}),
                             state, batch, mesh)
    state, device_metrics = step_fn(state, batch)
    step += 1
    if pending is not None:
      finish(pending)
    pending = (step, device_metrics)
    stop = preemption.reached(mngr, step)
    save = stop or step % every == 0 or step == num_steps
    evaluate = evaluator is not None and (step % t.eval_every == 0 or step == num_steps)
    if save or evaluate or step % t.log_every == 0 or step == start + 1:
      # Never save a state whose loss was not checked.
      finish(pending, state.params if evaluate else None)
      pending = None
    if save:
      meta = ckpt_lib.make_meta(config, tokenizer, step, mesh)
      ckpt_lib.save(mngr, step, state, data_iter, meta)
    if stop:
      mngr.wait_until_finished()
      if multihost.is_main():
        print(f"preempted: saved checkpoint at step {step}; re-run the same command to "
              "resume", flush=True)
      break
  if pending is not None:
    finish(pending)
  return dict(last)


# ---------------------------------------------------------------- notebooks


def restore_params(workdir: str, mesh: jax.sharding.Mesh | None = None, use_ema: bool = True):
  """(config, tokenizer, params) from the newest good checkpoint, on any device count.

  `mesh` defaults to all local devices on the data axis (params replicated);
  EMA params are returned when the run kept them and `use_ema`.
  """
  from concept_diffusion.data import tokenizer as tok_lib
  _, meta = ckpt_lib.latest_meta(workdir)
  config = ml_collections.ConfigDict(meta["config"])
  tokenizer = tok_lib.Tokenizer(ckpt_lib.tokenizer_proto(meta), origin=workdir)
  if mesh is None:
    mesh = jax.make_mesh((jax.device_count(), 1, 1), rules.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
  stage = stages_lib.build_stage(config, tokenizer, for_training=False)
  tx = opt_lib.make_optimizer(config, stage.frozen)
  init_key = jax.random.fold_in(jax.random.key(config.train.seed), INIT_STREAM)
  abstract, _ = state_lib.abstract_state(stage.init_params, tx, config.train.ema_decay > 0,
                                         mesh, init_key)
  mngr = ckpt_lib.make_manager(workdir, read_only=True)
  restored = ckpt_lib.restore_latest(mngr, abstract, quarantine=False)
  if restored is None:
    raise ckpt_lib.CheckpointError(f"no readable checkpoint in {ckpt_lib.checkpoint_dir(workdir)}")
  state = restored[1]
  params = state.ema_params if use_ema and state.ema_params is not None else state.params
  return config, tokenizer, params
