"""Concept model: a causal transformer over concepts plus a diffusion head for the next one."""

from __future__ import annotations

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


class DiffusionHead(nn.Module):
  """MLP denoiser of one concept: (z_t, t, h) -> velocity / x0 / direct prediction."""
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, zt_BxNxD, t_BxN, h_BxNxE):
    cfg, w = self.cfg, self.cfg.diff_head_dim
    x_BxNxW = layers.dense(w, ("concept_embed", "head_mlp"), cfg, use_bias=True, name="in_proj")(
        zt_BxNxD.astype(cfg.compute_dtype)).astype(jnp.float32)
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
    for i in range(cfg.diff_head_layers):
      x_BxNxW = HeadBlock(cfg, name=f"block_{i}")(x_BxNxW, c_BxNxW)
    mod_BxNx2xW = layers.dense((2, w), ("head_mlp", None, "mlp"), cfg, use_bias=True, init=ZEROS,
                               name="final_modulation")(c_BxNxW).astype(jnp.float32)
    x_BxNxW = modulate(x_BxNxW, mod_BxNx2xW[..., 0, :], mod_BxNx2xW[..., 1, :])
    out_BxNxD = layers.dense(cfg.concept_dim, ("head_mlp", "concept_embed"), cfg, use_bias=True,
                             name="out_proj")(x_BxNxW.astype(cfg.compute_dtype))
    return nn.with_logical_constraint(out_BxNxD.astype(jnp.float32),
                                      ("batch", "concepts", "concept_embed"))


class ConceptModel(nn.Module):
  """Causal, document-aware transformer over concepts (`context`) + diffusion `head`.

  h at position n conditions the prediction of concept n+1. `__call__` runs both
  (used by `init`); training and sampling call the two methods separately.
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

  def __call__(self, z_BxNxD, segment_ids_BxN, zt_BxNxD, t_BxN, drop_context_BxN=None):
    h_BxNxE = self.context(z_BxNxD, segment_ids_BxN, drop_context_BxN)
    return self.head(zt_BxNxD, t_BxN, h_BxNxE)

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

  def head(self, zt_BxNxD, t_BxN, h_BxNxE):
    """Denoiser output for noisy concepts zt at times t given contexts h."""
    return self.diffusion_head(zt_BxNxD, t_BxN, h_BxNxE)


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
                      context_loss=None):
  """Next-concept loss of the concept model on a batch of concepts -> (loss, metrics).

  The context at position n predicts concept n+1 of the same document; with
  probability cfg_dropout a position's context is replaced by the null context
  (classifier-free guidance training). with_estimate: also returns the head's
  clean estimate of concept n+1 at every n; time_shift: see continuous.concept_loss.
  context_loss(h_BxNxE, target_BxNxD, mask_BxN) -> (loss, metrics), if given, is
  added to the loss (the contrastive term); metrics then hold the head's own loss
  as diffusion_loss.
  """
  k_drop, k_loss = jax.random.split(key)
  h_BxNxE = model.apply(variables, z_BxNxD, segment_ids_BxN, method=model.context)
  head_h_BxNxE = h_BxNxE
  if cfg_dropout > 0:
    drop_BxN = jax.random.bernoulli(k_drop, cfg_dropout, segment_ids_BxN.shape)
    head_h_BxNxE = model.apply(variables, h_BxNxE, drop_BxN, method=model.drop)
  target_BxNxD, mask_BxN = continuous.next_concept_targets(z_BxNxD, concept_mask_BxN,
                                                           segment_ids_BxN)
  pred_fn = lambda zt, t: model.apply(variables, zt, t, head_h_BxNxE, method=model.head)  # noqa: E731
  out = continuous.concept_loss(objective, pred_fn, target_BxNxD, mask_BxN, k_loss,
                                with_estimate=with_estimate, time_shift=time_shift)
  if context_loss is None:
    return out
  # On the context before guidance dropout: the term trains what h carries, not the null.
  extra, extra_metrics = context_loss(h_BxNxE, target_BxNxD, mask_BxN)
  loss = out[0] + extra
  return (loss, {**out[1], **extra_metrics, "diffusion_loss": out[0], "loss": loss}, *out[2:])


def guided_head(model: ConceptModel, variables, h_BxNxE, guidance: float):
  """pred_fn(zt, t) of the diffusion head given contexts h, with classifier-free guidance."""
  head = lambda zt, t, h: model.apply(variables, zt, t, h, method=model.head)  # noqa: E731
  if guidance == 1.0:
    return lambda zt_BxNxD, t_BxN: head(zt_BxNxD, t_BxN, h_BxNxE)
  null_BxNxE = model.apply(variables, h_BxNxE.shape[:-1], method=model.null)

  def pred_fn(zt_BxNxD, t_BxN):
    # Conditional and unconditional branches in one call (batch doubled).
    both = head(jnp.concatenate([zt_BxNxD, zt_BxNxD]), jnp.concatenate([t_BxN, t_BxN]),
                jnp.concatenate([h_BxNxE, null_BxNxE]))
    cond, uncond = jnp.split(both, 2)
    return uncond + guidance * (cond - uncond)

  return pred_fn


def sample_from_context(model: ConceptModel, variables, h_BxNxE, key, *, objective: str = "flow",
                        steps: int = 16, guidance: float = 1.0, method: str = "euler",
                        noise_scale: float = 1.0):
  """A sample of concept n+1 for every context h_n (noise_scale: the sampler's temperature)."""
  noise_BxNxD = noise_scale * jax.random.normal(key, (*h_BxNxE.shape[:-1],
                                                      model.cfg.concept_dim))
  return continuous.sample(objective, guided_head(model, variables, h_BxNxE, guidance),
                           noise_BxNxD, steps, method)


def sample_next_concepts(model: ConceptModel, variables, z_BxNxD, segment_ids_BxN, key, *,
                         objective: str = "flow", steps: int = 16, guidance: float = 1.0,
                         method: str = "euler"):
  """A sample of concept n+1 for every context position n (use the last real one to extend)."""
  h_BxNxE = model.apply(variables, z_BxNxD, segment_ids_BxN, method=model.context)
  return sample_from_context(model, variables, h_BxNxE, key, objective=objective, steps=steps,
                             guidance=guidance, method=method)
