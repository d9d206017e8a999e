"""Concept encoder: the tokens of one chunk -> one concept vector z."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from concept_diffusion.models import layers


class ConceptEncoder(nn.Module):
  """Bidirectional transformer over a chunk, pooled over real tokens.

  pooling (model.encoder_pooling) "mean": the mean of the token states, projected to D.
  "slots": plus a readout of each position with its own E x D projection, the mirror
  of the renderer's per-position slots. A mean is a bag: "from Delhi to Turku" and
  "from Turku to Delhi" differ only in what attention wrote into the city tokens'
  states, and measured through unit z noise the renderer got the set of cities
  right but not which one went where (README "Results").

  z is layer-normalised without affine parameters, so every concept has zero mean
  and unit RMS per dimension (norm sqrt(D)): a fixed scale the concept model and
  the renderer's noise can rely on.
  """
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxNxL, token_mask_BxNxL):
    cfg = self.cfg
    b, n, l = tokens_BxNxL.shape
    tokens_MxL = tokens_BxNxL.reshape(b * n, l)
    valid_MxL = token_mask_BxNxL.reshape(b * n, l)
    x_MxLxE = layers.embed(cfg)(tokens_MxL)
    mask_MxLxL = layers.segment_mask(valid_MxL.astype(jnp.int32), causal=False)
    positions_MxL = jnp.broadcast_to(jnp.arange(l), (b * n, l))
    x_MxLxE = layers.Transformer(cfg, cfg.encoder_layers, name="transformer")(
        x_MxLxE, mask_MxLxL, positions_MxL)
    w_MxL = valid_MxL.astype(jnp.float32)
    pooled_MxE = jnp.einsum("ml,mle->me", w_MxL, x_MxLxE.astype(jnp.float32))
    pooled_MxE /= jnp.maximum(w_MxL.sum(-1, keepdims=True), 1.0)  # Empty chunks pool to 0.
    z_MxD = layers.dense(cfg.concept_dim, ("embed", "concept_embed"), cfg, name="to_concept")(
        pooled_MxE)
    if cfg.encoder_pooling not in ("mean", "slots"):
      raise ValueError(f"model.encoder_pooling={cfg.encoder_pooling!r} is not one of mean, slots")
    if cfg.encoder_pooling == "slots":  # Padding positions read as zeros.
      real_MxLxE = x_MxLxE * w_MxL[..., None].astype(x_MxLxE.dtype)
      z_MxD += layers.dense(cfg.concept_dim, (None, "embed", "concept_embed"), cfg, axis=(-2, -1),
                            name="slot_readout")(real_MxLxE).astype(jnp.float32)
    z_BxNxD = layers.layer_norm(z_MxD).reshape(b, n, cfg.concept_dim)
    return nn.with_logical_constraint(z_BxNxD, ("batch", "concepts", "concept_embed"))
