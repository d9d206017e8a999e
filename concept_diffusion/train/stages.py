"""The four pretraining stages: model construction from config and a pure loss each.

A Stage bundles what the trainer needs and nothing about the mesh:
  init_params(key) -> params (boxed with logical axis names)
  loss_fn(params, batch, key) -> (loss, metrics)   pure; batch as in the data contract
Params are a dict of named sub-models, e.g. {"encoder": ..., "renderer": ...}; the
subtrees named in `frozen` are never updated (the concepts stage's encoder).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from concept_diffusion.config import ConfigError
from concept_diffusion.data.tokenizer import MASK_ID, Tokenizer
from concept_diffusion.diffusion import masked
from concept_diffusion.models import baselines, concept_model, encoder, renderer, sizes
from concept_diffusion.models.layers import ModelConfig

# Fields the concepts stage inherits from its render run (chunking and tokenizer must match).
INHERITED_DATA_FIELDS = ("vocab_size", "concept_len", "granularity", "source", "corpus_seed")


@dataclasses.dataclass(frozen=True)
class Stage:
  """What the trainer needs to train one stage."""
  name: str
  view: str  # Batches from make_dataset: "concepts" ([B, N, L]) or "flat" ([B, T]).
  init_params: Callable[[jax.Array], Any]
  loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
  tokens_per_example: int  # Tokens one example feeds the model (throughput).
  flops_per_example: float  # Training FLOPs (forward + backward) of one example (MFU).
  frozen: tuple[str, ...] = ()  # Top-level param subtrees that never change.
  load_frozen: Callable[[Any], dict] | None = None  # abstract params -> frozen subtrees.


# ---------------------------------------------------------------- shared pieces


def _cross_entropy(logits_XxV, targets_X):
  """Per-position cross-entropy (float32) and argmax correctness."""
  logp_XxV = jax.nn.log_softmax(logits_XxV.astype(jnp.float32), axis=-1)
  ce_X = -jnp.take_along_axis(logp_XxV, targets_X[..., None], axis=-1)[..., 0]
  return ce_X, (jnp.argmax(logits_XxV, axis=-1) == targets_X)


def _masked_mean(x, weight):
  weight = weight.astype(jnp.float32)
  return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def _flops_per_example(config, stage: str, positions: int, vocab_size: int) -> float:
  """Training FLOPs of one example: models/sizes per-position FLOPs x positions."""
  return float(sizes.flops_per_token(config, stage, vocab_size)) * positions


def concept_decorrelation(z_BxNxD, concept_mask_BxN):
  """Mean squared off-identity covariance of real concepts: keeps the space whitened."""
  w_M = concept_mask_BxN.reshape(-1).astype(jnp.float32)
  z_MxD = z_BxNxD.reshape(-1, z_BxNxD.shape[-1]).astype(jnp.float32)
  count = jnp.maximum(w_M.sum(), 1.0)
  mean_D = (w_M[:, None] * z_MxD).sum(0) / count
  zc_MxD = (z_MxD - mean_D) * w_M[:, None]
  cov_DxD = zc_MxD.T @ zc_MxD / count
  return jnp.mean((cov_DxD - jnp.eye(cov_DxD.shape[0])) ** 2)


# ---------------------------------------------------------------- render


def render_mask(concept_mask_BxN, concept_len: int):
  """Positions the renderer denoises: all L of every real chunk (its PAD tail too)."""
  return jnp.broadcast_to(concept_mask_BxN[..., None], (*concept_mask_BxN.shape, concept_len))


def render_stage(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Stage:
  """Encoder + renderer; masked-diffusion loss of each chunk's tokens given z = E(chunk)."""
  cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  enc, ren = encoder.ConceptEncoder(cfg), renderer.Renderer(cfg)
  r, n, l = config.render, config.data.num_concepts, config.data.concept_len

  def init_params(key):
    k_enc, k_ren = jax.random.split(key)
    tokens = jnp.zeros((1, n, l), jnp.int32)
    z = jnp.zeros((1, n, cfg.concept_dim))
    return {"encoder": enc.init(k_enc, tokens, tokens > 0)["params"],
            "renderer": ren.init(k_ren, tokens, z, z if cfg.prev_concept else None)["params"]}

  def loss_fn(params, batch, key):
    k_noise, k_diffusion = jax.random.split(key)
    tokens_BxNxL, token_mask_BxNxL = batch["tokens"], batch["token_mask"]
    z_BxNxD = enc.apply({"params": params["encoder"]}, tokens_BxNxL, token_mask_BxNxL)
    # The renderer fills every position of a real chunk, PAD after its end included: a
    # generated concept comes with no length, so the renderer must decide where it ends.
    chunk_mask_BxNxL = render_mask(batch["concept_mask"], tokens_BxNxL.shape[-1])
    # z has unit RMS per dimension (encoder layer-norm), so z_noise is relative to it:
    # the renderer learns to tolerate imperfect (generated) concepts.
    z_in_BxNxD = z_BxNxD + r.z_noise * jax.random.normal(k_noise, z_BxNxD.shape)
    prev_BxNxD = (renderer.previous_concepts(z_in_BxNxD, batch["segment_ids"])
                  if cfg.prev_concept else None)
    logits_fn = lambda inputs_BxNxL: ren.apply(
        {"params": params["renderer"]}, inputs_BxNxL, z_in_BxNxD, prev_BxNxD, chunk_mask_BxNxL)
    diffusion, metrics = masked.masked_diffusion_loss(
        logits_fn, tokens_BxNxL, chunk_mask_BxNxL, MASK_ID, k_diffusion,
        full_mask_prob=r.full_mask_prob, mask_rate_dist=r.mask_rate)
    reg = concept_decorrelation(z_BxNxD, batch["concept_mask"])
    metrics = {**metrics, "diffusion_loss": diffusion, "concept_reg": reg}
    del metrics["loss"]
    return diffusion + r.concept_reg * reg, metrics

  return Stage("render", "concepts", init_params, loss_fn, n * l,
               _flops_per_example(config, "render", n * l, tokenizer.vocab_size))


# ---------------------------------------------------------------- concepts


def _render_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The render run's config, stored in config.concepts.render_config by resolve_config."""
  if "render_config" not in config.concepts:
    raise ConfigError("concepts.render_workdir was not resolved; call "
                      "stages.resolve_config(config) first")
  return ml_collections.ConfigDict(config.concepts.render_config)


def concepts_stage(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                   for_training: bool = True) -> Stage:
  """Frozen encoder (from the render run) + causal concept model with a diffusion head."""
  render_config = _render_config(config)
  enc_cfg = ModelConfig.from_config(render_config, tokenizer.vocab_size)
  cm_cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  enc, cm = encoder.ConceptEncoder(enc_cfg), concept_model.ConceptModel(cm_cfg)
  c, n, l = config.concepts, config.data.num_concepts, config.data.concept_len

  def init_params(key):
    k_enc, k_cm = jax.random.split(key)
    tokens = jnp.zeros((1, n, l), jnp.int32)
    z = jnp.zeros((1, n, cm_cfg.concept_dim))
    seg = jnp.ones((1, n), jnp.int32)
    return {"encoder": enc.init(k_enc, tokens, tokens > 0)["params"],
            "concept_model": cm.init(k_cm, z, seg, z, jnp.zeros((1, n)))["params"]}

  def loss_fn(params, batch, key):
    if "concepts" in batch:  # Concept cache: encoded once, offline.
      z_BxNxD = batch["concepts"]
    else:
      z_BxNxD = enc.apply({"params": params["encoder"]}, batch["tokens"], batch["token_mask"])
    z_BxNxD = jax.lax.stop_gradient(z_BxNxD)  # The encoder is frozen.
    loss, metrics = concept_model.concept_objective(
        cm, {"params": params["concept_model"]}, z_BxNxD, batch["concept_mask"],
        batch["segment_ids"], key, c.objective, c.cfg_dropout)
    return loss, {k: v for k, v in metrics.items() if k != "loss"}

  load_frozen = None
  if for_training:
    load_frozen = lambda abstract: {
        "encoder": restore_render_encoder(render_config, config.concepts.render_workdir,
                                          tokenizer, abstract["encoder"])}
  return Stage("concepts", "concepts", init_params, loss_fn, n * l,
               _flops_per_example(config, "concepts", n, tokenizer.vocab_size),
               frozen=("encoder",),
               load_frozen=load_frozen)


def restore_render_encoder(render_config, render_workdir: str, tokenizer, abstract_encoder):
  """The encoder params of the render run's newest good checkpoint, placed like `abstract_encoder`."""
  from concept_diffusion.train import checkpoint as ckpt_lib
  from concept_diffusion.train import optimizer as opt_lib
  from concept_diffusion.train import state as state_lib
  stage = render_stage(render_config, tokenizer)
  tx = opt_lib.make_optimizer(render_config, stage.frozen)
  mesh = jax.tree.leaves(abstract_encoder)[0].sharding.mesh
  abstract, _ = state_lib.abstract_state(stage.init_params, tx, render_config.train.ema_decay > 0,
                                         mesh, jax.random.key(0))
  # Place the encoder exactly as the concepts run wants it.
  params = dict(abstract.params, encoder=abstract_encoder)
  abstract = abstract.replace(params=params)
  restored = ckpt_lib.restore_latest(ckpt_lib.make_manager(render_workdir, read_only=True),
                                     abstract, quarantine=False)
  if restored is None:
    raise ConfigError(f"concepts.render_workdir={render_workdir!r} holds no readable checkpoint")
  state = restored[1]
  use_ema = state.ema_params is not None
  return (state.ema_params if use_ema else state.params)["encoder"]


# ---------------------------------------------------------------- baselines


def _flat_init(model, seq_len: int):
  """init_params of a flat baseline: one row of seq_len tokens, one document."""
  def init_params(key):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return {"model": model.init(key, tokens, jnp.ones_like(tokens))["params"]}
  return init_params


def ar_stage(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Stage:
  """Flat causal LM: next-token cross-entropy within each packed document."""
  cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  model, t = baselines.TokenAR(cfg), config.data.seq_len

  init_params = _flat_init(model, t)

  def loss_fn(params, batch, key):
    del key  # Deterministic.
    tokens_BxT, seg_BxT = batch["tokens"], batch["segment_ids"]
    logits_BxTxV = model.apply({"params": params["model"]}, tokens_BxT, seg_BxT)
    ce_BxS, correct_BxS = _cross_entropy(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])
    valid_BxS = (seg_BxT[:, 1:] == seg_BxT[:, :-1]) & (seg_BxT[:, 1:] > 0)
    return _masked_mean(ce_BxS, valid_BxS), {"accuracy": _masked_mean(correct_BxS, valid_BxS)}

  return Stage("ar", "flat", init_params, loss_fn, t,
               _flops_per_example(config, "ar", t, tokenizer.vocab_size))


def mdm_stage(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> Stage:
  """Flat masked-diffusion LM: the 1/t-weighted ELBO over masked real tokens."""
  cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  model, t = baselines.TokenMDM(cfg), config.data.seq_len

  init_params = _flat_init(model, t)

  def loss_fn(params, batch, key):
    tokens_BxT, seg_BxT = batch["tokens"], batch["segment_ids"]
    logits_fn = lambda inputs_BxT: model.apply({"params": params["model"]}, inputs_BxT, seg_BxT)
    loss, metrics = masked.masked_diffusion_loss(logits_fn, tokens_BxT, batch["token_mask"],
                                                 MASK_ID, key)
    return loss, {k: v for k, v in metrics.items() if k != "loss"}

  return Stage("mdm", "flat", init_params, loss_fn, t,
               _flops_per_example(config, "mdm", t, tokenizer.vocab_size))


# ---------------------------------------------------------------- construction


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills what a stage derives from elsewhere (concepts: the render run); checks it exists."""
  if config.stage != "concepts":
    return config
  from concept_diffusion.train import checkpoint as ckpt_lib
  workdir = config.concepts.render_workdir
  if not os.path.isdir(workdir):
    raise ConfigError(f"concepts.render_workdir={workdir!r} is not a directory")
  try:
    _, meta = ckpt_lib.latest_meta(workdir)
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f"concepts.render_workdir={workdir!r} holds no checkpoint of a render "
                      f"run ({e})") from None
  render = ml_collections.ConfigDict(meta["config"])
  if render.stage != "render":
    raise ConfigError(f"concepts.render_workdir={workdir!r} is a {render.stage!r} run, "
                      "not a render run")
  cache = config.data.source.startswith("concepts:")  # A concept cache is this run's own.
  for field in INHERITED_DATA_FIELDS:
    if not (cache and field == "source"):
      config.data[field] = render.data[field]
  config.model.concept_dim = render.model.concept_dim
  render_dict = render.to_dict()
  render_dict.get("concepts", {}).pop("render_config", None)
  config.concepts.render_config = render_dict
  return config


def render_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer of the concepts stage's render run (concepts must use the same ids)."""
  from concept_diffusion.train import checkpoint as ckpt_lib
  _, meta = ckpt_lib.latest_meta(config.concepts.render_workdir)
  return Tokenizer(ckpt_lib.tokenizer_proto(meta), origin=config.concepts.render_workdir)


BUILDERS = {"render": render_stage, "ar": ar_stage, "mdm": mdm_stage}


def build_stage(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                for_training: bool = True) -> Stage:
  """The Stage for config.stage."""
  if config.stage == "concepts":
    return concepts_stage(config, tokenizer, for_training)
  return BUILDERS[config.stage](config, tokenizer)
