"""Scale-out planner: params, FLOPs, per-device memory and step time of a config on a target.

  python -m concept_diffusion.plan --config=configs/render.py:base --devices=64 \
      --device_kind=tpu-v5p [--mfu=0.4] [--compile] [--format=table|json]

Params come from models/sizes.py and are checked against the real param tree
(jax.eval_shape, no memory). FLOPs per step = sizes.flops_per_token x positions per
step (+ the frozen encoder's forward pass in the concepts stage without a cache).

Memory per device, bytes. Exact for the state: the real TrainState tree is sharded by
parallel/rules.py on an abstract mesh of `devices` and each leaf's shard is summed:
  params       fp32 master weights, all sub-models (frozen ones included); the bf16
               compute copies are transient and are counted with the activations
  optimizer    AdamW mu + nu (fp32) of the trained sub-models (+ EMA params if on)
  gradients    fp32, trained sub-models, sharded like the params (x2 with grad_accum > 1:
               the accumulator)
Estimated for activations saved for the backward pass. With a = bytes of model.dtype,
t = mesh.tensor, P = positions per device (micro-batch / (data x fsdp) x positions per
example) and ctx = attention context, per position and per layer:
  none   a (4E + (2HK + 2GK + 3F) / t) + (4 + a) H ctx / t    every block intermediate
  dots   a (3E + (HK + 2GK + 2F) / t)                          matmul outputs; attention
                                                               and norms recomputed
  full   a E                                                   the block input only
plus, once per stack: the working set of one layer in the backward pass (2 x the 'none'
figure of one layer) and the attention mask (ctx bytes per position); plus the output:
3 x 4 V / t bytes per position (fp32 logits, log-softmax and their gradient) for token
models, 4 x 12 W per concept and head layer for the concept diffusion head.

`--compile` also lowers and compiles the real train step on the local devices with
abstract inputs (`aot_compile`, the same code the AOT tests run) and prints XLA's
memory analysis next to the estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from concept_diffusion import config as config_lib
from concept_diffusion.config import ConfigError
from concept_diffusion.models import sizes
from concept_diffusion.models.layers import ModelConfig
from concept_diffusion.parallel import mesh as mesh_lib
from concept_diffusion.parallel import rules

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class DeviceKind:
  """One accelerator: memory and dense bf16 peak."""
  hbm_bytes: int
  peak_flops: float  # bf16 FLOP/s, dense.


DEVICE_KINDS = {
    "tpu-v5p": DeviceKind(95 * GiB, 459e12),
    "tpu-v6e": DeviceKind(32 * GiB, 918e12),
    "h100": DeviceKind(80 * GiB, 989e12),
    "h200": DeviceKind(141 * GiB, 989e12),
}
REMAT_FACTORS = ("none", "dots", "full")


# ---------------------------------------------------------------- configs


load_config = config_lib.load_config  # Kept here: the CLI and its tests use plan.load_config.


def with_render_config(config, render_config) -> ml_collections.ConfigDict:
  """A concepts config completed from a render config, as stages.resolve_config does from a run."""
  from concept_diffusion.train import stages  # Lazy: the trainer is heavy to import.
  config = ml_collections.ConfigDict(config.to_dict())
  keep_cache = config.data.source.startswith("concepts:")
  for field in stages.INHERITED_DATA_FIELDS:
    if not (field == "source" and keep_cache):
      config.data[field] = render_config.data[field]
  config.model.concept_dim = render_config.model.concept_dim
  render = render_config.to_dict()
  render.get("concepts", {}).pop("render_config", None)
  config.concepts.render_config = render
  if not config.concepts.render_workdir:
    config.concepts.render_workdir = "(planned)"  # validate() wants one; nothing reads it.
  return config


def resolved(config, render_config=None) -> ml_collections.ConfigDict:
  """The config a stage can be built from (concepts: completed from its render run)."""
  if config.stage != "concepts" or "render_config" in config.concepts:
    return config
  if render_config is not None:
    return with_render_config(config, render_config)
  from concept_diffusion.train import stages
  if config.concepts.render_workdir and os.path.isdir(config.concepts.render_workdir):
    return stages.resolve_config(ml_collections.ConfigDict(config.to_dict()))
  raise ConfigError("planning the concepts stage needs its render run: pass render_config "
                    "(CLI: --render_config=configs/render.py:PRESET) or set "
                    "concepts.render_workdir to a finished render run")


def build(config):
  """(stage, optimizer) of a resolved config, without a tokenizer or data."""
  from concept_diffusion.train import optimizer as opt_lib
  from concept_diffusion.train import stages
  tokenizer = types.SimpleNamespace(vocab_size=config.data.vocab_size)  # Stages read only this.
  stage = stages.build_stage(config, tokenizer, for_training=False)
  return stage, opt_lib.make_optimizer(config, stage.frozen)


def uses_cache(config) -> bool:
  return config.stage == "concepts" and config.data.source.startswith("concepts:")


# ---------------------------------------------------------------- sizes


def positions_per_example(config) -> int:
  """Positions of the stage's sequence in one example (sizes.flops_per_token's unit)."""
  n, l = config.data.num_concepts, config.data.concept_len
  return {"render": n * l, "concepts": n}.get(config.stage, config.data.seq_len)


def tokens_per_example(config) -> int:
  """Text tokens one example covers (the concept view: N x L chunk slots)."""
  if config.stage in ("render", "concepts"):
    return config.data.num_concepts * config.data.concept_len
  return config.data.seq_len


def real_param_counts(stage) -> dict[str, int]:
  """{sub-model: params} of the real param tree (jax.eval_shape: no memory)."""
  shapes = jax.eval_shape(stage.init_params, jax.random.key(0))
  return {name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
          for name, tree in shapes.items()}


def frozen_encoder_flops(config) -> float:
  """Forward FLOPs of the frozen encoder per text token (concepts stage, no cache)."""
  if config.stage != "concepts" or uses_cache(config):
    return 0.0
  enc = ModelConfig.from_config(ml_collections.ConfigDict(config.concepts.render_config))
  matmuls = sizes.component_params(enc)["encoder"] - enc.vocab_size * enc.embed_dim
  return 2.0 * matmuls + 4.0 * enc.encoder_layers * enc.num_heads * enc.head_dim * enc.concept_len


def flops_per_step(config) -> float:
  """Training FLOPs of one optimizer step (forward + backward)."""
  b = config.train.batch_size
  model = sizes.flops_per_token(config, config.stage) * b * positions_per_example(config)
  return model + frozen_encoder_flops(config) * b * tokens_per_example(config)


# ---------------------------------------------------------------- memory


def abstract_mesh(config, devices: int) -> jax.sharding.AbstractMesh:
  """The config's mesh over `devices` devices, without devices."""
  shape = mesh_lib.mesh_shape(config, devices, allow_subset=False)
  return jax.sharding.AbstractMesh(shape, rules.MESH_AXES)


def _shard_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
  return total


def state_bytes(config, stage, tx, mesh) -> dict[str, int]:
  """Per-device bytes of params, optimizer (+EMA) and gradients, from the sharded state tree."""
  from concept_diffusion.train import state as state_lib
  abstract, _ = state_lib.abstract_state(stage.init_params, tx, config.train.ema_decay > 0,
                                         mesh, jax.random.key(0))
  trained = {k: v for k, v in abstract.params.items() if k not in stage.frozen}
  grads = _shard_bytes(trained) * (2 if config.train.grad_accum_steps > 1 else 1)
  return {"params": _shard_bytes(abstract.params),
          "optimizer": _shard_bytes(abstract.opt_state) + _shard_bytes(abstract.ema_params),
          "gradients": grads}


def _layer_bytes(c: ModelConfig, policy: str, ctx: int, t: int) -> float:
  """Saved activation bytes per position of one layer (see the module docstring)."""
  a = jnp.dtype(c.compute_dtype).itemsize
  e, hk, gk, f = c.embed_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.mlp_dim
  if policy == "full":
    return a * e
  if policy == "dots":
    return a * (3 * e + (hk + 2 * gk + 2 * f) / t)
  return a * (4 * e + (2 * hk + 2 * gk + 3 * f) / t) + (4 + a) * c.num_heads * ctx / t


def _stack_bytes(c: ModelConfig, layers: int, positions: float, ctx: int, t: int) -> float:
  """Saved activations of a stack + one layer's backward working set + the mask."""
  saved = layers * _layer_bytes(c, c.remat, ctx, t)
  working = 2 * _layer_bytes(c, "none", ctx, t)
  return positions * (saved + working + ctx)


def activation_bytes(config, mesh_shape: tuple[int, int, int]) -> float:
  """Estimated per-device activation bytes of one micro-batch (see the module docstring)."""
  data, fsdp, t = mesh_shape
  micro = config.train.batch_size / config.train.grad_accum_steps / (data * fsdp)
  c = ModelConfig.from_config(config)
  n, l = config.data.num_concepts, config.data.concept_len
  if config.stage == "render":
    tokens = micro * n * l
    total = _stack_bytes(c, c.encoder_layers + c.renderer_layers, tokens, l, t)
    return total + tokens * 12 * c.vocab_size / t
  if config.stage == "concepts":
    concepts = micro * n
    total = _stack_bytes(c, c.concept_layers, concepts, n, t)
    total += concepts * 4 * 12 * c.diff_head_dim * (c.diff_head_layers + 1)
    if not uses_cache(config):  # Frozen encoder forward: one layer live at a time.
      enc = ModelConfig.from_config(ml_collections.ConfigDict(config.concepts.render_config))
      total += micro * n * l * _layer_bytes(enc, "none", l, t)
    return total
  tokens = micro * config.data.seq_len
  total = _stack_bytes(c, c.baseline_layers, tokens, config.data.seq_len, t)
  return total + tokens * 12 * c.vocab_size / t


# ---------------------------------------------------------------- the plan


def device_kind_of(name: str | None) -> tuple[str, DeviceKind]:
  """(name, DeviceKind): from DEVICE_KINDS, or this host's CPU when None and no accelerator."""
  if name is not None:
    if name not in DEVICE_KINDS:
      raise ConfigError(f"--device_kind={name!r} is not one of {', '.join(DEVICE_KINDS)}")
    return name, DEVICE_KINDS[name]
  local = jax.local_devices()[0].device_kind.lower()
  for key, kind in DEVICE_KINDS.items():
    if key.removeprefix("tpu-") in local:
      return key, kind
  from concept_diffusion.train import metrics  # The trainer's CPU peak probe.
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return "cpu", DeviceKind(ram // jax.local_device_count(), metrics.peak_flops_per_device())


def plan(config, devices: int, device_kind: str | None = None, mfu: float = 0.4,
         render_config=None, check_params: bool = True) -> dict:
  """Sizes, FLOPs, per-device memory, fit and step time of `config` on `devices` devices."""
  config = resolved(config, render_config)
  config_lib.validate(config)
  from concept_diffusion.train import trainer
  shape = trainer.check_config(config, devices)
  if math.prod(shape) != devices:
    raise ConfigError(f"the mesh {shape} uses {math.prod(shape)} of the {devices} devices; "
                      "set one of mesh.data / mesh.fsdp / mesh.tensor to -1")
  kind_name, kind = device_kind_of(device_kind)
  stage, tx = build(config)
  analytic = sizes.param_count(config, config.stage)
  real = real_param_counts(stage) if check_params else {}
  trained_real = sum(v for k, v in real.items() if k not in stage.frozen)
  if check_params and trained_real != analytic:
    raise AssertionError(f"models/sizes.py counts {analytic:,} params for {config.stage}, "
                         f"the real tree has {trained_real:,}")
  memory = state_bytes(config, stage, tx, abstract_mesh(config, devices))
  memory["activations"] = int(activation_bytes(config, shape))
  memory["total"] = sum(memory.values())
  flops = flops_per_step(config)
  b = config.train.batch_size
  return {
      "stage": config.stage, "params": analytic, "params_by_model": real,
      "frozen": list(stage.frozen), "mesh": dict(zip(rules.MESH_AXES, shape)),
      "devices": devices, "device_kind": kind_name, "remat": config.model.remat,
      "dtype": config.model.dtype, "examples_per_step": b,
      "concepts_per_step": b * config.data.num_concepts if config.stage in (
          "render", "concepts") else None,
      "tokens_per_step": b * tokens_per_example(config),
      "flops_per_step": flops, "memory_per_device": memory,
      "hbm_per_device": kind.hbm_bytes, "fits": memory["total"] <= kind.hbm_bytes,
      "mfu": mfu, "step_seconds": flops / (devices * kind.peak_flops * mfu),
  }


# ---------------------------------------------------------------- ahead-of-time compile


def abstract_batch(config, mesh) -> dict:
  """ShapeDtypeStructs of one global batch (data contract), split like the trainer's."""
  b, n, l, t = (config.train.batch_size, config.data.num_concepts, config.data.concept_len,
                config.data.seq_len)
  if config.stage in ("ar", "mdm"):
    shapes = {"tokens": ((b, t), jnp.int32), "token_mask": ((b, t), bool),
              "segment_ids": ((b, t), jnp.int32)}
  elif uses_cache(config):
    shapes = {"concepts": ((b, n, config.model.concept_dim), jnp.float32),
              "concept_mask": ((b, n), bool), "segment_ids": ((b, n), jnp.int32)}
  else:
    shapes = {"tokens": ((b, n, l), jnp.int32), "token_mask": ((b, n, l), bool),
              "concept_mask": ((b, n), bool), "segment_ids": ((b, n), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=rules.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


def aot_compile(config, mesh: jax.sharding.Mesh, render_config=None):
  """(compiled train step, seconds) for `mesh`, from abstract inputs: nothing is allocated."""
  from concept_diffusion.train import state as state_lib
  from concept_diffusion.train import trainer
  config = resolved(config, render_config)
  config_lib.validate(config)
  trainer.check_config(config, mesh.size)
  start = time.perf_counter()
  stage, tx = build(config)
  abstract, shardings = state_lib.abstract_state(stage.init_params, tx,
                                                 config.train.ema_decay > 0, mesh,
                                                 jax.random.key(0))
  batch = abstract_batch(config, mesh)
  jitted = trainer.jit_train_step(config, stage, tx, mesh, shardings,
                                  {k: v.shape for k, v in batch.items()})
  compiled = trainer.compile_step(jitted, abstract, batch, mesh)
  return compiled, time.perf_counter() - start


def compiled_memory(compiled) -> dict[str, int]:
  """XLA's per-device memory analysis of a compiled step."""
  m = compiled.memory_analysis()
  return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
          "aliased": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
          "peak": m.peak_memory_in_bytes,
          "total": (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                    + m.temp_size_in_bytes)}


# ---------------------------------------------------------------- report


def _gib(x: float) -> str:
  return f"{x / GiB:9.2f} GiB"


def format_plan(p: dict) -> str:
  """The plan as a short human-readable table."""
  mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items())
  lines = [
      f"stage {p['stage']}: {p['params'] / 1e6:,.1f}M trained params "
      f"({', '.join(f'{k} {v / 1e6:,.1f}M' for k, v in p['params_by_model'].items())}"
      f"{'; frozen: ' + ', '.join(p['frozen']) if p['frozen'] else ''})",
      f"mesh {mesh} on {p['devices']} x {p['device_kind']}; {p['dtype']}, remat={p['remat']}",
      f"per step: {p['examples_per_step']:,} examples"
      + (f", {p['concepts_per_step']:,} concepts" if p["concepts_per_step"] else "")
      + f", {p['tokens_per_step']:,} tokens, {p['flops_per_step']:.3e} FLOPs",
      "memory per device:",
  ]
  for name, value in p["memory_per_device"].items():
    lines.append(f"  {name:<12}{_gib(value)}")
  verdict = "fits" if p["fits"] else "DOES NOT FIT"
  lines.append(f"  {'HBM':<12}{_gib(p['hbm_per_device'])}  -> {verdict}")
  lines.append(f"step time at {p['mfu']:.0%} MFU: {p['step_seconds'] * 1e3:,.1f} ms "
               f"({p['tokens_per_step'] / p['step_seconds']:,.0f} tokens/s)")
  if "compiled" in p:
    c = p["compiled"]
    lines.append(f"compiled on {p['compiled_devices']} local devices in "
                 f"{p['compile_seconds']:.1f} s (XLA memory analysis, per device):")
    for name in ("arguments", "outputs", "aliased", "temp", "total"):
      lines.append(f"  {name:<12}{_gib(c[name])}")
    lines.append(f"  estimate / compiled = {p['local_estimate'] / max(c['total'], 1):.2f}")
  return "\n".join(lines)


def _render_config_for(config_spec: str, flag: str | None):
  """--render_config, else configs/render.py with the concepts preset's name."""
  if flag:
    return load_config(flag)
  path, _, preset = config_spec.partition(":")
  render_path = os.path.join(os.path.dirname(path), "render.py")
  return load_config(f"{render_path}:{preset}" if preset else render_path)


def main(argv):
  del argv
  from absl import flags, logging
  from ml_collections import config_flags
  f = flags.FLAGS
  if not f["verbosity"].present:  # Backend-probe INFO lines drown the table.
    logging.set_verbosity(logging.WARNING)
  config = f.config
  render_config = None
  if config.stage == "concepts" and "render_config" not in config.concepts and not (
      config.concepts.render_workdir and os.path.isdir(config.concepts.render_workdir)):
    render_config = _render_config_for(config_flags.get_config_filename(f["config"]),
                                       f.render_config)
  devices = f.devices or jax.device_count()
  try:
    result = plan(config, devices, f.device_kind, f.mfu, render_config)
    if f.compile:
      local = mesh_lib.make_mesh(config)
      compiled, seconds = aot_compile(config, local, render_config)
      result["compiled"] = compiled_memory(compiled)
      result["compile_seconds"] = seconds
      result["compiled_devices"] = local.size
      result["local_estimate"] = plan(config, local.size, None, f.mfu, render_config,
                                      check_params=False)["memory_per_device"]["total"]
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(json.dumps(result, indent=1) if f.format == "json" else format_plan(result), flush=True)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "configs/<stage>.py[:preset]")
  flags.DEFINE_integer("devices", 0, "Devices to plan for (0 = the local device count).")
  flags.DEFINE_enum("device_kind", None, list(DEVICE_KINDS), "Accelerator (default: local).")
  flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time.")
  flags.DEFINE_bool("compile", False, "Also AOT-compile the step on the local devices.")
  flags.DEFINE_string("render_config", None, "Render config of a concepts plan "
                      "(default: configs/render.py with the same preset).")
  flags.DEFINE_enum("format", "table", ["table", "json"], "Output format.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
