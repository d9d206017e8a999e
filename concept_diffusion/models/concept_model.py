"""Concept model: a causal transformer over concepts plus a diffusion head for the next one."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion.diffusion import continuous
from concept_diffusion.models import layers

ZEROS = nn.initializers.zeros_init()


def timestep_features(t_BxN, dim: int, scale: float = 1000.0):
  """Sinusoidal features of t in [0, 1] (scaled so neighbouring steps differ)."""
  half = dim // 2
  freq_H = jnp.exp(-np.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxNxH = scale * t_BxN.astype(jnp.float32)[..., None] * freq_H
  return jnp.concatenate([jnp.cos(angle_BxNxH), jnp.sin(angle_BxNxH)], axis=-1)


def modulate(x_BxNxW, shift_BxNxW, scale_BxNxW):
  """AdaLN: parameter-free LayerNorm, then a conditioning-dependent affine."""
  return layers.layer_norm(x_BxNxW) * (1.0 + scale_BxNxW) + shift_BxNxW


class HeadBlock(nn.Module):
  """Residual MLP block of the diffusion head, AdaLN-modulated and gated by c."""
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, x_BxNxW, c_BxNxW):
    cfg, w = self.cfg, self.cfg.diff_head_dim
    mod_BxNx3xW = layers.dense((3, w), ("head_mlp", None, "mlp"), cfg, use_bias=True,
                               init=ZEROS, name="modulation")(c_BxNxW)
    shift, scale, gate = (mod_BxNx3xW[..., i, :].astype(jnp.float32) for i in range(3))
    h_BxNxW = modulate(x_BxNxW, shift, scale).astype(cfg.compute_dtype)
    h_BxNxW = layers.dense(w, ("head_mlp", "mlp"), cfg, use_bias=True, name="up")(h_BxNxW)
    h_BxNxW = layers.dense(w, ("mlp", "head_mlp"), cfg, use_bias=True, name="down")(
        nn.silu(h_BxNxW))
    return x_BxNxW + gate * h_BxNxW.astype(jnp.float32)


class ContextRead(nn.Module):
  """Cross-attention of the head's stream over the context's concepts (head_reads_context).

  Queries come from the noisy concept being denoised, so what is read depends on the
  sample: once z_t says whose sentence it is, the head can look up that person's
  concept (an MLP on h alone must carry every fact; README "Results"). Keys and values
  are the context's concepts themselves, with RoPE on both sides for recency. A fixed
  zero logit with a zero value lets a query read nothing (and a row with no memory,
  the null context of guidance, stays finite).
  """
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, x_BxNxW, memory):
    cfg, w = self.cfg, self.cfg.diff_head_dim
    mem_BxMxD, mask_BxNxM, qpos_BxN, kpos_BxM = memory
    h = cfg.num_heads
    k = w // h
    q_BxNxHxK = layers.dense((h, k), ("head_mlp", "heads", "kv"), cfg, name="query")(
        layers.layer_norm(x_BxNxW).astype(cfg.compute_dtype))
    mem_BxMxD = mem_BxMxD.astype(cfg.compute_dtype)
    k_BxMxHxK = layers.dense((h, k), ("concept_embed", "heads", "kv"), cfg, name="key")(mem_BxMxD)
    v_BxMxHxK = layers.dense((h, k), ("concept_embed", "heads", "kv"), cfg, name="value")(mem_BxMxD)
    q_BxNxHxK = layers.rope(q_BxNxHxK, qpos_BxN, cfg.rope_max_wavelength)
    k_BxMxHxK = layers.rope(k_BxMxHxK, kpos_BxM, cfg.rope_max_wavelength)
    logits_BxHxNxM = jnp.einsum("bnhk,bmhk->bhnm", q_BxNxHxK, k_BxMxHxK,
                                preferred_element_type=jnp.float32) / np.sqrt(k)
    logits_BxHxNxM = jnp.where(mask_BxNxM[:, None], logits_BxHxNxM, layers.NEG_INF)
    sink_BxHxNx1 = jnp.zeros((*logits_BxHxNxM.shape[:-1], 1), jnp.float32)
    probs_BxHxNxM = jax.nn.softmax(jnp.concatenate([logits_BxHxNxM, sink_BxHxNx1], -1),
                                   axis=-1)[..., :-1]
    out_BxNxHxK = jnp.einsum("bhnm,bmhk->bnhk", probs_BxHxNxM.astype(v_BxMxHxK.dtype), v_BxMxHxK)
    out_BxNxW = layers.dense(w, ("heads", "kv", "head_mlp"), cfg, axis=(-2, -1), init=ZEROS,
                             name="out")(out_BxNxHxK)
    return x_BxNxW + out_BxNxW.astype(jnp.float32)


def context_memory(z_BxNxD, segment_ids_BxN):
  """The head's memory for every context position n: concepts 0..n of its document."""
  positions_BxN = layers.segment_positions(segment_ids_BxN)
  mask_BxNxN = layers.segment_mask(segment_ids_BxN, causal=True) & (segment_ids_BxN > 0)[:, None]
  return z_BxNxD, mask_BxNxN, positions_BxN, positions_BxN


def null_memory(memory):
  """The memory with nothing to read (the unconditional branch of guidance)."""
  mem, mask, qpos, kpos = memory
  return mem, jnp.zeros_like(mask), qpos, kpos


def repeat_memory(memory, c: int):
  """Each example's memory repeated c times along the batch (candidate-major rows)."""
  return None if memory is None else tuple(jnp.repeat(x, c, axis=0) for x in memory)


class HeadSkip(nn.Module):
  """a(c) * z_t + b(c), per concept dimension, zero at init (model.head_skip).

  out_proj maps the head's W-wide stream to D dimensions, so under W < D its output
  spans at most W of them and a sampler never moves z in the rest: the starting noise
  there reaches the renderer. The denoiser of a Gaussian is affine in z_t in each
  dimension, which this path can learn in every one.
  """
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, zt_BxNxD, c_BxNxW):
    ab_BxNx2xD = layers.dense((2, self.cfg.concept_dim), ("head_mlp", None, "concept_embed"),
                              self.cfg, use_bias=True, init=ZEROS, name="affine")(c_BxNxW)
    ab_BxNx2xD = ab_BxNx2xD.astype(jnp.float32)
    return ab_BxNx2xD[..., 0, :] * zt_BxNxD.astype(jnp.float32) + ab_BxNx2xD[..., 1, :]


class DiffusionHead(nn.Module):
  """MLP denoiser of one concept: (z_t, t, h) -> velocity / x0 / direct prediction.

  With cfg.head_reads_context, a ContextRead after the first block reads `memory`
  (context_memory: the context's concepts, a mask per position and RoPE positions).
  With cfg.head_skip, HeadSkip's affine map of z_t is added to the output. With
  cfg.self_condition, sc_BxNxD (a clean estimate of the concept; None: zeros, no
  estimate) enters the stream beside z_t.
  """
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, zt_BxNxD, t_BxN, h_BxNxE, memory=None, sc_BxNxD=None):
    cfg, w = self.cfg, self.cfg.diff_head_dim
    x_BxNxW = layers.dense(w, ("concept_embed", "head_mlp"), cfg, use_bias=True, name="in_proj")(
        zt_BxNxD.astype(cfg.compute_dtype)).astype(jnp.float32)
    if cfg.self_condition:  # Zero-initialised: at init the head is the plain one.
      sc_BxNxD = jnp.zeros_like(zt_BxNxD) if sc_BxNxD is None else sc_BxNxD
      x_BxNxW = x_BxNxW + layers.dense(w, ("concept_embed", "head_mlp"), cfg, init=ZEROS,
                                       name="self_cond_proj")(
          sc_BxNxD.astype(cfg.compute_dtype)).astype(jnp.float32)
    temb_BxNxW = timestep_features(t_BxN, w).astype(cfg.compute_dtype)
    temb_BxNxW = layers.dense(w, ("head_mlp", "mlp"), cfg, use_bias=True, name="time_1")(temb_BxNxW)
    temb_BxNxW = layers.dense(w, ("mlp", "head_mlp"), cfg, use_bias=True, name="time_2")(
        nn.silu(temb_BxNxW))
    c_BxNxW = layers.dense(w, ("embed", "head_mlp"), cfg, use_bias=True, name="cond_proj")(
        h_BxNxE.astype(cfg.compute_dtype)) + temb_BxNxW
    # The condition also enters the residual stream, so the mse head (zt = 0) is not a
    # product of zero-initialised modulations at init.
    x_BxNxW = x_BxNxW + c_BxNxW.astype(jnp.float32)
    c_BxNxW = nn.silu(c_BxNxW)
    if cfg.head_reads_context and memory is None:
      raise ValueError("model.head_reads_context: the head needs its memory of the context "
                       "(concept_model.context_memory)")
    for i in range(cfg.diff_head_layers):
      x_BxNxW = HeadBlock(cfg, name=f"block_{i}")(x_BxNxW, c_BxNxW)
      if i == 0 and cfg.head_reads_context:
        x_BxNxW = ContextRead(cfg, name="context_read")(x_BxNxW, memory)
    mod_BxNx2xW = layers.dense((2, w), ("head_mlp", None, "mlp"), cfg, use_bias=True, init=ZEROS,
                               name="final_modulation")(c_BxNxW).astype(jnp.float32)
    x_BxNxW = modulate(x_BxNxW, mod_BxNx2xW[..., 0, :], mod_BxNx2xW[..., 1, :])
    out_BxNxD = layers.dense(cfg.concept_dim, ("head_mlp", "concept_embed"), cfg, use_bias=True,
                             name="out_proj")(x_BxNxW.astype(cfg.compute_dtype))
    if cfg.head_skip:
      out_BxNxD = out_BxNxD + HeadSkip(cfg, name="skip")(zt_BxNxD, c_BxNxW)
    return nn.with_logical_constraint(out_BxNxD.astype(jnp.float32),
                                      ("batch", "concepts", "concept_embed"))


class ConceptModel(nn.Module):
  """Causal, document-aware transformer over concepts (`context`) + diffusion `head`.

  h at position n conditions the prediction of concept n+1. `__call__` runs both
  (used by `init`); training and sampling call the two methods separately. With
  cfg.head_mean the head works around mu(h) (`mean`, see `head`).
  """
  cfg: layers.ModelConfig

  def setup(self):
    cfg = self.cfg
    self.in_proj = layers.dense(cfg.embed_dim, ("concept_embed", "embed"), cfg)
    self.transformer = layers.Transformer(cfg, cfg.concept_layers)
    self.null_context = self.param("null_context",
                                   layers.partitioned(nn.initializers.normal(1.0), ("embed",)),
                                   (cfg.embed_dim,), jnp.float32)
    self.diffusion_head = DiffusionHead(cfg)
    if cfg.head_mean:  # Zero-initialised: at init the head is the plain one.
      self.mean_proj = layers.dense(cfg.concept_dim, ("embed", "concept_embed"), cfg,
                                    use_bias=True, init=ZEROS)

  def __call__(self, z_BxNxD, segment_ids_BxN, zt_BxNxD, t_BxN, drop_context_BxN=None):
    h_BxNxE = self.context(z_BxNxD, segment_ids_BxN, drop_context_BxN)
    return self.head(zt_BxNxD, t_BxN, h_BxNxE, self.memory(z_BxNxD, segment_ids_BxN))

  def context(self, z_BxNxD, segment_ids_BxN, drop_context_BxN=None):
    """h_BxNxE; where drop_context is True, h is the learned null context (for CFG)."""
    x_BxNxE = self.in_proj(z_BxNxD.astype(self.cfg.compute_dtype))
    mask_BxNxN = layers.segment_mask(segment_ids_BxN, causal=True)
    positions_BxN = layers.segment_positions(segment_ids_BxN)
    h_BxNxE = self.transformer(x_BxNxE, mask_BxNxN, positions_BxN).astype(jnp.float32)
    if drop_context_BxN is not None:
      h_BxNxE = self.drop(h_BxNxE, drop_context_BxN)
    return nn.with_logical_constraint(h_BxNxE, ("batch", "concepts", "embed"))

  def drop(self, h_BxNxE, drop_context_BxN):
    """h, with the learned null context where drop_context is True (CFG training)."""
    return jnp.where(drop_context_BxN[..., None], self.null_context, h_BxNxE)

  def null(self, shape):
    """The null context broadcast to shape [..., E] (unconditional branch of CFG)."""
    return jnp.broadcast_to(self.null_context, (*shape, self.cfg.embed_dim))

  def head(self, zt_BxNxD, t_BxN, h_BxNxE, memory=None, sc_BxNxD=None):
    """Denoiser output for noisy concepts zt at times t given contexts h (and memory, and
    under cfg.self_condition a clean estimate sc of the concept).

    With cfg.head_mean, mu + f(zt - t mu): the denoiser f sees the path of the residual
    z1 - mu (z_t = (1 - t) noise + t z1 is (1 - t) noise + t (z1 - mu) + t mu), and mu is
    added back to its velocity / clean estimate, so every objective and sampler runs
    unchanged, and with a silent f every sampler takes zero noise to mu.
    """
    if not self.cfg.head_mean:
      return self.diffusion_head(zt_BxNxD, t_BxN, h_BxNxE, memory, sc_BxNxD)
    mu_BxNxD = self.mean(h_BxNxE)
    out_BxNxD = self.diffusion_head(zt_BxNxD - t_BxN[..., None] * mu_BxNxD, t_BxN, h_BxNxE,
                                    memory, sc_BxNxD)
    return out_BxNxD + mu_BxNxD

  def mean(self, h_BxNxE):
    """mu(h): the regressed next concept of cfg.head_mean (concepts.mean_weight)."""
    mu_BxNxD = self.mean_proj(h_BxNxE.astype(self.cfg.compute_dtype)).astype(jnp.float32)
    return nn.with_logical_constraint(mu_BxNxD, ("batch", "concepts", "concept_embed"))

  def memory(self, z_BxNxD, segment_ids_BxN):
    """What the head reads beside h: context_memory if cfg.head_reads_context, else None."""
    return context_memory(z_BxNxD, segment_ids_BxN) if self.cfg.head_reads_context else None


class ContrastiveProjection(nn.Module):
  """Context h -> a query in concept space, for the contrastive term (concepts.contrastive_*)."""
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, h_BxNxE):
    q_BxNxD = layers.dense(self.cfg.concept_dim, ("embed", "concept_embed"), self.cfg,
                           name="proj")(h_BxNxE.astype(self.cfg.compute_dtype))
    return nn.with_logical_constraint(q_BxNxD.astype(jnp.float32),
                                      ("batch", "concepts", "concept_embed"))


def concept_objective(model: ConceptModel, variables, z_BxNxD, concept_mask_BxN, segment_ids_BxN,
                      key, objective: str = "flow", cfg_dropout: float = 0.0,
                      with_estimate: bool = False, time_shift: float = 1.0,
                      context_loss=None, mean_weight: float = 0.0, loss_dims: int = 0):
  """Next-concept loss of the concept model on a batch of concepts -> (loss, metrics).

  The context at position n predicts concept n+1 of the same document; with
  probability cfg_dropout a position's context is replaced by the null context
  (classifier-free guidance training). with_estimate: also returns the head's
  clean estimate of concept n+1 at every n; time_shift: see continuous.concept_loss.
  context_loss(h_BxNxE, target_BxNxD, mask_BxN) -> (loss, metrics), if given, is
  added to the loss (the contrastive term); so is mean_weight times the squared error
  of mu(h) where the model has a mean (cfg.head_mean); metrics then hold the head's
  own loss as diffusion_loss. loss_dims: the head and the mean are fitted on the first
  loss_dims dimensions of concept n+1 only (0: all of them).
  """
  if mean_weight > 0 and model.cfg.head_mean:
    mean_loss = functools.partial(_mean_loss, model, variables, mean_weight, loss_dims)
    context_loss = mean_loss if context_loss is None else _both(context_loss, mean_loss)
  k_drop, k_loss = jax.random.split(key)
  h_BxNxE = model.apply(variables, z_BxNxD, segment_ids_BxN, method=model.context)
  memory = model.memory(z_BxNxD, segment_ids_BxN)
  head_h_BxNxE = h_BxNxE
  if cfg_dropout > 0:
    drop_BxN = jax.random.bernoulli(k_drop, cfg_dropout, segment_ids_BxN.shape)
    head_h_BxNxE = model.apply(variables, h_BxNxE, drop_BxN, method=model.drop)
    if memory is not None:  # The null context reads nothing either.
      memory = (memory[0], memory[1] & ~drop_BxN[..., None], *memory[2:])
  target_BxNxD, mask_BxN = continuous.next_concept_targets(z_BxNxD, concept_mask_BxN,
                                                           segment_ids_BxN)
  pred_fn = lambda zt, t, sc=None: model.apply(  # noqa: E731
      variables, zt, t, head_h_BxNxE, memory, sc, method=model.head)
  out = continuous.concept_loss(objective, pred_fn, target_BxNxD, mask_BxN, k_loss,
                                with_estimate=with_estimate, time_shift=time_shift,
                                dims=loss_dims, self_condition=model.cfg.self_condition)
  if context_loss is None:
    return out
  # On the context before guidance dropout: the term trains what h carries, not the null.
  extra, extra_metrics = context_loss(h_BxNxE, target_BxNxD, mask_BxN)
  loss = out[0] + extra
  return (loss, {**out[1], **extra_metrics, "diffusion_loss": out[0], "loss": loss}, *out[2:])


def _mean_loss(model: ConceptModel, variables, weight: float, dims: int, h_BxNxE, target_BxNxD,
               mask_BxN):
  """weight x the per-dimension squared error of mu(h) against concept n+1 (its first
  `dims` dimensions; 0: all)."""
  mu_BxNxD = model.apply(variables, h_BxNxE, method=model.mean)
  err_BxNxD = continuous.prefix(jnp.square(mu_BxNxD - target_BxNxD), dims)
  loss = continuous.masked_mean(jnp.mean(err_BxNxD, -1), mask_BxN)
  return weight * loss, {"mean_loss": loss}


def _both(loss_a, loss_b):
  """The sum of two context losses (their metrics merged)."""
  def loss_fn(*args):
    (a, metrics_a), (b, metrics_b) = loss_a(*args), loss_b(*args)
    return a + b, {**metrics_a, **metrics_b}
  return loss_fn


def guided_head(model: ConceptModel, variables, h_BxNxE, guidance: float, memory=None):
  """pred_fn(zt, t, sc=None) of the diffusion head given contexts h (and the head's memory,
  see ConceptModel.memory; sc: its clean estimate, cfg.self_condition), with
  classifier-free guidance (both branches read the same estimate)."""
  head = lambda zt, t, h, m, sc: model.apply(  # noqa: E731
      variables, zt, t, h, m, sc, method=model.head)
  if guidance == 1.0:
    return lambda zt_BxNxD, t_BxN, sc_BxNxD=None: head(zt_BxNxD, t_BxN, h_BxNxE, memory,
                                                        sc_BxNxD)
  null_BxNxE = model.apply(variables, h_BxNxE.shape[:-1], method=model.null)
  both_memory = None if memory is None else tuple(
      jnp.concatenate([a, b]) for a, b in zip(memory, null_memory(memory)))

  def pred_fn(zt_BxNxD, t_BxN, sc_BxNxD=None):
    # Conditional and unconditional branches in one call (batch doubled).
    both_sc = None if sc_BxNxD is None else jnp.concatenate([sc_BxNxD, sc_BxNxD])
    both = head(jnp.concatenate([zt_BxNxD, zt_BxNxD]), jnp.concatenate([t_BxN, t_BxN]),
                jnp.concatenate([h_BxNxE, null_BxNxE]), both_memory, both_sc)
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance * (cond - uncond)

  return pred_fn


def sample_from_context(model: ConceptModel, variables, h_BxNxE, key, *, objective: str = "flow",
                        steps: int = 16, guidance: float = 1.0, method: str = "euler",
                        noise_scale: float = 1.0, memory=None, end_noise: float = 0.0):
  """A sample of concept n+1 for every context h_n (noise_scale: the sampler's temperature;
  memory: the head's, ConceptModel.memory, where the model reads its context; end_noise:
  stop at that noise, continuous.sample)."""
  noise_BxNxD = noise_scale * jax.random.normal(key, (*h_BxNxE.shape[:-1],
                                                      model.cfg.concept_dim))
  return continuous.sample(objective, guided_head(model, variables, h_BxNxE, guidance, memory),
                           noise_BxNxD, steps, method, end_noise,
                           self_condition=model.cfg.self_condition)


def sample_next_concepts(model: ConceptModel, variables, z_BxNxD, segment_ids_BxN, key, *,
                         objective: str = "flow", steps: int = 16, guidance: float = 1.0,
                         method: str = "euler"):
  """A sample of concept n+1 for every context position n (use the last real one to extend)."""
  h_BxNxE = model.apply(variables, z_BxNxD, segment_ids_BxN, method=model.context)
  return sample_from_context(model, variables, h_BxNxE, key, objective=objective, steps=steps,
                             guidance=guidance, method=method,
                             memory=model.apply(variables, z_BxNxD, segment_ids_BxN,
                                                method=model.memory))
