"""The four pretraining stages: model construction from config and a pure loss each.

A Stage bundles what the trainer needs and nothing about the mesh:
  init_params(key) -> params (boxed with logical axis names)
  loss_fn(params, batch, key) -> (loss, metrics)   pure; batch as in the data contract
  eval_loss_fn(params, batch, key)                  the held-out loss: augmentations off
Params are a dict of named sub-models, e.g. {"encoder": ..., "renderer": ...}; the
subtrees named in `frozen` are never updated (the concepts stage's encoder), and
`warm_start` fills subtrees of a fresh run from earlier runs (frozen or not).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from concept_diffusion.config import ConfigError
from concept_diffusion.data.tokenizer import MASK_ID, Tokenizer
from concept_diffusion.diffusion import continuous, masked
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
  warm_start: Callable[[Any], dict] | None = None  # abstract params -> subtrees from other runs.
  eval_loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]] | None = None
  # make_dataset options of the train split only (held-out batches stay as the data are).
  train_data: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # One program each: called outside jit (Colab, tests), Flax would dispatch and compile
    # each op alone (tiny concepts stage's init: 10.7 s against 4.3 s, the same values;
    # five test files calling the losses: 688 s -> 563 s). Under the trainer's jit and
    # eval_shape they inline.
    for name in ("init_params", "loss_fn", "eval_loss_fn"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, jax.jit(getattr(self, name)))

  def held_out_loss_fn(self):
    """The loss held-out evaluation uses: eval_loss_fn, else loss_fn."""
    return self.eval_loss_fn or self.loss_fn


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


def z_noise_std(r: ml_collections.ConfigDict, key, shape_BxN):
  """Per-chunk std of the noise on z in render training (render.z_noise, z_noise_dist)."""
  if r.get("z_noise_dist", "constant") == "uniform":  # .get: configs saved before the field.
    return r.z_noise * jax.random.uniform(key, shape_BxN)
  return jnp.full(shape_BxN, r.z_noise)


def render_mask(concept_mask_BxN, concept_len: int):
  """Positions the renderer denoises: all L of every real chunk (its PAD tail too)."""
  return jnp.broadcast_to(concept_mask_BxN[..., None], (*concept_mask_BxN.shape, concept_len))


def generated_concepts(cm: concept_model.ConceptModel, variables, z_BxNxD, concept_mask_BxN,
                       segment_ids_BxN, key, *, objective: str, steps: int, guidance: float,
                       noise_scale: float = 1.0, end_noise: float = 0.0):
  """(zgen_BxNxD, valid_BxN): concept n sampled by the concept model from the true z_<n.

  Teacher-forced, like training the concept model: position n gets a sample of the
  head given the context of concepts 0..n-1 of its own document. The first concept
  of a document has no context: valid is False there (and at padding).
  """
  h_BxNxE = cm.apply(variables, z_BxNxD, segment_ids_BxN, method=cm.context)
  pred_BxNxD = concept_model.sample_from_context(
      cm, variables, h_BxNxE, key, objective=objective, steps=steps, guidance=guidance,
      memory=cm.apply(variables, z_BxNxD, segment_ids_BxN, method=cm.memory),
      noise_scale=noise_scale, end_noise=end_noise)
  _, has_next_BxN = continuous.next_concept_targets(z_BxNxD, concept_mask_BxN, segment_ids_BxN)
  # The prediction made at n is concept n + 1's: shift both one step right.
  zgen_BxNxD = jnp.pad(pred_BxNxD[:, :-1], ((0, 0), (1, 0), (0, 0)))
  valid_BxN = jnp.pad(has_next_BxN[:, :-1], ((0, 0), (1, 0)))
  return jax.lax.stop_gradient(zgen_BxNxD), valid_BxN


def render_stage(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                 for_training: bool = True) -> Stage:
  """Encoder + renderer; masked-diffusion loss of each chunk's tokens given z = E(chunk).

  With render.generated_from (a concepts run) this is a fine-tune of that run's
  renderer: the encoder and concept model are frozen, and a render.generated_prob
  share of the chunks is rendered from the concept model's own sample of their
  concept instead of the encoder's, so the renderer learns the concepts that
  generation will hand it (DESIGN lesson 3).
  """
  cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  enc, ren = encoder.ConceptEncoder(cfg), renderer.Renderer(cfg)
  r, n, l = config.render, config.data.num_concepts, config.data.concept_len
  finetune = bool(r.get("generated_from", ""))  # .get: configs saved before the field.
  cm = cm_config = None
  if finetune:
    cm_config = _resolved(config.render, "concepts_config", "render.generated_from")
    cm = concept_model.ConceptModel(ModelConfig.from_config(cm_config, tokenizer.vocab_size))

  def init_params(key):
    k_enc, k_ren, k_cm = jax.random.split(key, 3)
    tokens = jnp.zeros((1, n, l), jnp.int32)
    z = jnp.zeros((1, n, cfg.concept_dim))
    params = {"encoder": enc.init(k_enc, tokens, tokens > 0)["params"],
              "renderer": ren.init(k_ren, tokens, z, z if cfg.prev_concept else None)["params"]}
    if finetune:
      params["concept_model"] = cm.init(k_cm, z, jnp.ones((1, n), jnp.int32), z,
                                        jnp.zeros((1, n)))["params"]
    return params

  def loss(params, batch, key, augment: bool):
    k_noise, k_diffusion, k_gen, k_pick = jax.random.split(key, 4)
    tokens_BxNxL, token_mask_BxNxL = batch["tokens"], batch["token_mask"]
    concept_mask_BxN, seg_BxN = batch["concept_mask"], batch["segment_ids"]
    z_BxNxD = enc.apply({"params": params["encoder"]}, tokens_BxNxL, token_mask_BxNxL)
    if finetune:
      z_BxNxD = jax.lax.stop_gradient(z_BxNxD)  # Frozen: the concept model's space.
    # The renderer fills every position of a real chunk, PAD after its end included: a
    # generated concept comes with no length, so the renderer must decide where it ends.
    chunk_mask_BxNxL = render_mask(concept_mask_BxN, tokens_BxNxL.shape[-1])
    z_in_BxNxD = z_BxNxD
    if augment:
      # z has unit RMS per dimension (encoder layer-norm), so z_noise is relative to it:
      # the renderer learns to tolerate imperfect (generated) concepts.
      std_BxN = z_noise_std(r, jax.random.fold_in(k_noise, 1), z_BxNxD.shape[:-1])
      z_in_BxNxD = z_BxNxD + std_BxN[..., None] * jax.random.normal(k_noise, z_BxNxD.shape)
      nested = tuple(r.get("nested_dims", ()))  # .get: configs saved before the field.
      if nested:
        # Each chunk rendered from a random prefix of its concept: the first dimensions
        # must carry the coarse content, and generation may render a sample's prefix.
        pick_BxN = jax.random.randint(jax.random.fold_in(k_noise, 2), z_BxNxD.shape[:-1], 0,
                                      len(nested))
        z_in_BxNxD = renderer.concept_prefix(z_in_BxNxD, jnp.asarray(nested)[pick_BxN])
      if finetune:
        c = cm_config.concepts  # Sampled as generation samples by default.
        zgen_BxNxD, valid_BxN = generated_concepts(
            cm, {"params": params["concept_model"]}, z_BxNxD, concept_mask_BxN, seg_BxN, k_gen,
            objective=c.objective, steps=c.sample_steps, guidance=c.guidance,
            noise_scale=c.get("temperature", 1.0), end_noise=c.get("end_noise", 0.0))
        # Generation renders a prefix of each sample (concepts.render_dims): so must this.
        zgen_BxNxD = renderer.concept_prefix(zgen_BxNxD, c.get("render_dims", 0))
        pick_BxN = valid_BxN & jax.random.bernoulli(k_pick, r.generated_prob, valid_BxN.shape)
        z_in_BxNxD = jnp.where(pick_BxN[..., None], zgen_BxNxD, z_in_BxNxD)
    prev_BxNxD = renderer.previous_concepts(z_in_BxNxD, seg_BxN) if cfg.prev_concept else None
    ctx_BxNxCL = (renderer.previous_chunks(tokens_BxNxL, seg_BxN, cfg.context_chunks)
                  if cfg.context_chunks else None)  # The true text before: teacher forced.
    logits_fn = lambda inputs_BxNxL: ren.apply(
        {"params": params["renderer"]}, inputs_BxNxL, z_in_BxNxD, prev_BxNxD, chunk_mask_BxNxL,
        ctx_BxNxCL)
    diffusion, metrics = masked.masked_diffusion_loss(
        logits_fn, tokens_BxNxL, chunk_mask_BxNxL, MASK_ID, k_diffusion,
        full_mask_prob=r.full_mask_prob, mask_rate_dist=r.mask_rate)
    reg = concept_decorrelation(z_BxNxD, concept_mask_BxN)
    metrics = {**metrics, "diffusion_loss": diffusion, "concept_reg": reg}
    del metrics["loss"]
    return diffusion + (0.0 if finetune else r.concept_reg) * reg, metrics

  warm_start = None
  if finetune and for_training:
    warm_start = lambda abstract: _finetune_start(config, tokenizer, abstract)
  return Stage("render", "concepts", init_params,
               lambda p, b, k: loss(p, b, k, augment=True), n * l,
               _flops_per_example(config, "render", n * l, tokenizer.vocab_size)
               + generated_flops_per_example(config, tokenizer.vocab_size),
               frozen=("encoder", "concept_model") if finetune else (),
               warm_start=warm_start,
               eval_loss_fn=lambda p, b, k: loss(p, b, k, augment=False),
               train_data=render_train_data(r))


def generated_flops_per_example(config: ml_collections.ConfigDict, vocab_size: int) -> float:
  """A generated-concept fine-tune's sampling FLOPs per example (0 for a plain render run):
  a concept sampled at each of its positions, as render_stage's loss does."""
  if not config.render.get("generated_from", ""):
    return 0.0
  cm = _resolved(config.render, "concepts_config", "render.generated_from")
  c = cm.concepts
  return config.data.num_concepts * sizes.concept_sampling_flops(
      cm, c.sample_steps, c.guidance != 1.0, vocab_size, config.data.num_concepts)


def render_train_data(r: ml_collections.ConfigDict) -> dict:
  """The render stage's own make_dataset options of the train split (render.end_keep)."""
  return {"end_keep": float(r.get("end_keep", 1.0))}  # .get: configs saved before it.


def _finetune_start(config, tokenizer, abstract) -> dict:
  """Encoder and renderer of the render run, concept model of the concepts run."""
  render_config = _resolved(config.render, "render_config", "render.generated_from")
  concepts_config = _resolved(config.render, "concepts_config", "render.generated_from")
  out = restore_subtrees(render_config, config.render.render_workdir, tokenizer,
                         {"encoder": abstract["encoder"], "renderer": abstract["renderer"]})
  out.update(restore_subtrees(concepts_config, config.render.generated_from, tokenizer,
                              {"concept_model": abstract["concept_model"]}))
  return out


# ---------------------------------------------------------------- concepts


def _resolved(section, name: str, field: str) -> ml_collections.ConfigDict:
  """A run config that resolve_config stored in `section` (from the run named by `field`)."""
  if name not in section:
    raise ConfigError(f"{field} was not resolved; call stages.resolve_config(config) first")
  return ml_collections.ConfigDict(section[name])


def _render_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The render run's config, stored in config.concepts.render_config by resolve_config."""
  return _resolved(config.concepts, "render_config", "concepts.render_workdir")


def next_chunk_render_loss(ren: renderer.Renderer, ren_params, zhat_BxNxD, z_BxNxD, batch,
                           key, *, positions: int, full_mask_prob: float, mask_rate: str):
  """Masked-diffusion loss of chunk n+1's tokens rendered from the estimate zhat_n of it.

  `positions` random valid positions per example are rendered (the renderer costs
  L tokens per concept); the renderer sees the true concept n as its previous one.
  """
  k_pick, k_diffusion = jax.random.split(key)
  _, valid_BxN = continuous.next_concept_targets(z_BxNxD, batch["concept_mask"],
                                                 batch["segment_ids"])
  score_BxN = jnp.where(valid_BxN, jax.random.uniform(k_pick, valid_BxN.shape), -1.0)
  _, idx_BxK = jax.lax.top_k(score_BxN, min(positions, valid_BxN.shape[1]))
  take = lambda x: jnp.take_along_axis(x, idx_BxK.reshape(*idx_BxK.shape,
                                                          *([1] * (x.ndim - 2))), axis=1)
  picked_BxK = take(valid_BxN)
  next_tokens_BxNxL = jnp.pad(batch["tokens"][:, 1:], ((0, 0), (0, 1), (0, 0)))
  tokens_BxKxL = take(next_tokens_BxNxL)
  chunk_mask_BxKxL = render_mask(picked_BxK, tokens_BxKxL.shape[-1])
  prev_BxKxD = take(z_BxNxD) if ren.cfg.prev_concept else None
  ctx_BxKxCL = None
  if ren.cfg.context_chunks:  # The chunks before n+1 (n included), true text.
    ctx_BxNxCL = renderer.previous_chunks(batch["tokens"], batch["segment_ids"],
                                          ren.cfg.context_chunks)
    ctx_BxKxCL = take(jnp.pad(ctx_BxNxCL[:, 1:], ((0, 0), (0, 1), (0, 0))))
  zhat_BxKxD = take(zhat_BxNxD)
  logits_fn = lambda inputs_BxKxL: ren.apply({"params": ren_params}, inputs_BxKxL, zhat_BxKxD,
                                             prev_BxKxD, chunk_mask_BxKxL, ctx_BxKxCL)
  loss, _ = masked.masked_diffusion_loss(logits_fn, tokens_BxKxL, chunk_mask_BxKxL, MASK_ID,
                                         k_diffusion, full_mask_prob=full_mask_prob,
                                         mask_rate_dist=mask_rate)
  return loss


def concepts_stage(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                   for_training: bool = True) -> Stage:
  """Frozen encoder (from the render run) + causal concept model with a diffusion head.

  concepts.render_weight > 0 puts the render run's (frozen) renderer in the loop: the
  head's clean estimate of concept n+1 must also render chunk n+1's tokens, a token-level
  signal on top of the distance in concept space.
  """
  render_config = _render_config(config)
  enc_cfg = ModelConfig.from_config(render_config, tokenizer.vocab_size)
  cm_cfg = ModelConfig.from_config(config, tokenizer.vocab_size)
  enc, cm = encoder.ConceptEncoder(enc_cfg), concept_model.ConceptModel(cm_cfg)
  c, n, l = config.concepts, config.data.num_concepts, config.data.concept_len
  render_weight = c.get("render_weight", 0.0)  # .get: configs saved before the field.
  ren = renderer.Renderer(enc_cfg) if render_weight > 0 else None
  contrastive_weight = c.get("contrastive_weight", 0.0)
  proj = concept_model.ContrastiveProjection(cm_cfg) if contrastive_weight > 0 else None

  def init_params(key):
    k_enc, k_cm, k_ren = jax.random.split(key, 3)
    tokens = jnp.zeros((1, n, l), jnp.int32)
    z = jnp.zeros((1, n, cm_cfg.concept_dim))
    seg = jnp.ones((1, n), jnp.int32)
    params = {"encoder": enc.init(k_enc, tokens, tokens > 0)["params"],
              "concept_model": cm.init(k_cm, z, seg, z, jnp.zeros((1, n)))["params"]}
    if ren is not None:
      params["renderer"] = ren.init(k_ren, tokens, z, z if enc_cfg.prev_concept else None)["params"]
    if proj is not None:  # Its own key: the other subtrees init as without the term.
      params["contrastive"] = proj.init(jax.random.fold_in(key, 1),
                                        jnp.zeros((1, n, cm_cfg.embed_dim)))["params"]
    return params

  def contrastive_loss(params, h_BxNxE, target_BxNxD, mask_BxN):
    q_BxNxD = proj.apply({"params": params["contrastive"]}, h_BxNxE)
    loss, acc = continuous.next_concept_infonce(q_BxNxD, target_BxNxD, mask_BxN,
                                                c.contrastive_temperature)
    return contrastive_weight * loss, {"contrastive_loss": loss, "contrastive_acc": acc}

  def loss_fn(params, batch, key):
    if "concepts" in batch:  # Concept cache: encoded once, offline.
      z_BxNxD = batch["concepts"]
    else:
      z_BxNxD = enc.apply({"params": params["encoder"]}, batch["tokens"], batch["token_mask"])
    z_BxNxD = jax.lax.stop_gradient(z_BxNxD)  # The encoder is frozen.
    # Split only when the renderer needs a key: runs without it keep their noise draws.
    k_concept, k_render = jax.random.split(key) if ren is not None else (key, None)
    out = concept_model.concept_objective(
        cm, {"params": params["concept_model"]}, z_BxNxD, batch["concept_mask"],
        batch["segment_ids"], k_concept, c.objective, c.cfg_dropout,
        with_estimate=ren is not None, time_shift=c.get("time_shift", 1.0),
        context_loss=functools.partial(contrastive_loss, params) if proj is not None else None,
        mean_weight=c.get("mean_weight", 0.0), loss_dims=c.get("loss_dims", 0))
    loss, metrics = out[:2]
    metrics = {k: v for k, v in metrics.items() if k != "loss"}
    if ren is not None:
      r = render_config.render
      render_loss = next_chunk_render_loss(
          ren, params["renderer"], out[2], z_BxNxD, batch, k_render, positions=c.render_positions,
          full_mask_prob=r.full_mask_prob, mask_rate=r.mask_rate)
      metrics = {**metrics, "concept_loss": loss, "render_loss": render_loss}
      loss = loss + render_weight * render_loss
    return loss, metrics

  warm_start = None
  if for_training:
    names = ("encoder", "renderer") if ren is not None else ("encoder",)
    warm_start = lambda abstract: restore_subtrees(
        render_config, config.concepts.render_workdir, tokenizer,
        {name: abstract[name] for name in names})
  flops = _flops_per_example(config, "concepts", n, tokenizer.vocab_size)
  if ren is not None:  # The renderer's forward and backward on the rendered positions.
    flops += _flops_per_example(render_config, "render", c.render_positions * l,
                                tokenizer.vocab_size)
  return Stage("concepts", "concepts", init_params, loss_fn, n * l, flops,
               frozen=("encoder", "renderer") if ren is not None else ("encoder",),
               warm_start=warm_start)


def restore_subtrees(run_config, workdir: str, tokenizer, abstract_subtrees: dict) -> dict:
  """Param subtrees of run `workdir`'s newest good checkpoint, placed like `abstract_subtrees`."""
  from concept_diffusion.train import checkpoint as ckpt_lib
  from concept_diffusion.train import optimizer as opt_lib
  from concept_diffusion.train import state as state_lib
  stage = build_stage(run_config, tokenizer, for_training=False)
  tx = opt_lib.make_optimizer(run_config, stage.frozen)
  mesh = jax.tree.leaves(abstract_subtrees)[0].sharding.mesh
  abstract, _ = state_lib.abstract_state(stage.init_params, tx, run_config.train.ema_decay > 0,
                                         mesh, jax.random.key(0))
  # Place the wanted subtrees exactly as the caller wants them.
  abstract = abstract.replace(params={**abstract.params, **abstract_subtrees})
  restored = ckpt_lib.restore_latest(ckpt_lib.make_manager(workdir, read_only=True),
                                     abstract, quarantine=False)
  if restored is None:
    raise ConfigError(f"{workdir!r} holds no readable checkpoint")
  state = restored[1]
  params = state.ema_params if state.ema_params is not None else state.params
  return {name: params[name] for name in abstract_subtrees}


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


def _run_config(workdir: str, field: str, stage: str) -> ml_collections.ConfigDict:
  """The saved config of the `stage` run in `workdir` (named by config `field`)."""
  from concept_diffusion.train import checkpoint as ckpt_lib
  if not os.path.isdir(workdir):
    raise ConfigError(f"{field}={workdir!r} is not a directory")
  try:
    _, meta = ckpt_lib.latest_meta(workdir)
  except ckpt_lib.CheckpointError as e:
    raise ConfigError(f"{field}={workdir!r} holds no checkpoint of a {stage} run ({e})") from None
  run = ml_collections.ConfigDict(meta["config"])
  if run.stage != stage:
    raise ConfigError(f"{field}={workdir!r} is a {run.stage!r} run, not a {stage} run")
  return run


def _without(run: ml_collections.ConfigDict, section: str, name: str) -> dict:
  """run as a dict, minus a resolved run config it carries (kept one level deep)."""
  d = run.to_dict()
  d.get(section, {}).pop(name, None)
  return d


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills what a stage derives from earlier runs; checks they exist.

  concepts: chunking, tokenizer and concept_dim come from concepts.render_workdir.
  render with render.generated_from (a concepts run): the whole model and chunking
  come from that concepts run's render run, which the fine-tune starts from.
  """
  if config.stage == "render" and config.render.get("generated_from", ""):
    concepts = _run_config(config.render.generated_from, "render.generated_from", "concepts")
    render_dir = concepts.concepts.render_workdir
    render = _run_config(render_dir, "render.generated_from's concepts.render_workdir",
                         "render")
    return inherit_finetune(config, concepts, render, render_dir)
  if config.stage != "concepts":
    return config
  render = _run_config(config.concepts.render_workdir, "concepts.render_workdir", "render")
  return inherit_render(config, render)


def inherit_render(config: ml_collections.ConfigDict,
                   render: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A concepts config given its render run's config (resolve_config, from a config in
  hand: a grid plans FLOPs of runs not trained yet)."""
  cache = config.data.source.startswith("concepts:")  # A concept cache is this run's own.
  if cache and config.concepts.get("render_weight", 0.0) > 0:
    raise ConfigError("concepts.render_weight > 0 renders chunk tokens, which a concept cache "
                      f"source ({config.data.source}) does not have; use the text source")
  for field in INHERITED_DATA_FIELDS:
    if not (cache and field == "source"):
      config.data[field] = render.data[field]
  config.model.concept_dim = render.model.concept_dim
  config.concepts.render_config = _without(render, "concepts", "render_config")
  return config


def check_render_dims(config: ml_collections.ConfigDict) -> None:
  """A resolved concepts config's render_dims against its render run: refused before
  training, not at the first generation after it."""
  render_dims = config.concepts.get("render_dims", 0)  # .get: configs saved before the field.
  if render_dims and not config.concepts.render_config.render.get("nested_dims", ()):
    raise ConfigError(f"concepts.render_dims={render_dims} renders a prefix of each concept, "
                      f"but the render run {config.concepts.render_workdir} was trained on "
                      "whole concepts (render.nested_dims is empty): set "
                      "--config.concepts.render_dims=0")


def inherit_finetune(config: ml_collections.ConfigDict, concepts: ml_collections.ConfigDict,
                     render: ml_collections.ConfigDict, render_dir: str) -> ml_collections.ConfigDict:
  """A generated-concept fine-tune's config given its concepts run's and render run's."""
  for field in INHERITED_DATA_FIELDS:
    config.data[field] = render.data[field]
  config.model = ml_collections.ConfigDict(render.model.to_dict())
  config.render.render_workdir = render_dir
  config.render.render_config = _without(render, "render", "render_config")
  config.render.concepts_config = concepts.to_dict()
  return config


def render_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer of the render run this run builds on (its ids must be the same)."""
  from concept_diffusion.train import checkpoint as ckpt_lib
  workdir = (config.concepts.render_workdir if config.stage == "concepts"
             else config.render.render_workdir)
  _, meta = ckpt_lib.latest_meta(workdir)
  return Tokenizer(ckpt_lib.tokenizer_proto(meta), origin=workdir)


def inherits_tokenizer(config: ml_collections.ConfigDict) -> bool:
  """Whether this run takes its tokenizer from an earlier render run."""
  return config.stage == "concepts" or (config.stage == "render"
                                        and bool(config.render.get("generated_from", "")))


BUILDERS = {"ar": ar_stage, "mdm": mdm_stage}


def build_stage(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
                for_training: bool = True) -> Stage:
  """The Stage for config.stage."""
  if config.stage == "concepts":
    return concepts_stage(config, tokenizer, for_training)
  if config.stage == "render":
    return render_stage(config, tokenizer, for_training)
  return BUILDERS[config.stage](config, tokenizer)
