"""Renderer: a masked-diffusion token denoiser for one chunk, conditioned on its concept."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from concept_diffusion.models import layers


class Renderer(nn.Module):
  """Bidirectional transformer over the L tokens of a chunk, predicting clean tokens.

  The concept enters as per-position slots, z_D -> slots_LxE added to the token
  embeddings: every position starts as the same MASK embedding, so each needs its
  own projection of z to read (DESIGN lesson 1). No time input: the mask pattern
  tells the model how much is left to fill in.
  """
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxNxL, z_BxNxD, prev_z_BxNxD=None, token_mask_BxNxL=None):
    cfg = self.cfg
    b, n, l = tokens_BxNxL.shape
    if l != cfg.concept_len:
      raise ValueError(f"Renderer built for data.concept_len={cfg.concept_len}, got chunks of {l}")
    x_BxNxLxE = layers.embed(cfg)(tokens_BxNxL)
    x_BxNxLxE += self._slots(z_BxNxD, "slots")
    if cfg.prev_concept:
      if prev_z_BxNxD is None:  # First chunk of a document: no previous concept.
        prev_z_BxNxD = jnp.zeros_like(z_BxNxD)
      x_BxNxLxE += self._slots(prev_z_BxNxD, "prev_slots")
    if token_mask_BxNxL is None:
      token_mask_BxNxL = jnp.ones((b, n, l), bool)
    mask_MxLxL = layers.segment_mask(token_mask_BxNxL.reshape(b * n, l).astype(jnp.int32),
                                     causal=False)
    positions_MxL = jnp.broadcast_to(jnp.arange(l), (b * n, l))
    x_MxLxE = layers.Transformer(cfg, cfg.renderer_layers, name="transformer")(
        x_BxNxLxE.reshape(b * n, l, cfg.embed_dim), mask_MxLxL, positions_MxL)
    logits_MxLxV = layers.dense(cfg.vocab_size, ("embed", "vocab"), cfg, name="logits")(x_MxLxE)
    logits_BxNxLxV = logits_MxLxV.astype(jnp.float32).reshape(b, n, l, cfg.vocab_size)
    return nn.with_logical_constraint(logits_BxNxLxV, ("batch", "concepts", "length", "vocab"))

  def _slots(self, z_BxNxD, name):
    """z_D -> one E-vector per position (unit-variance init for unit-RMS z)."""
    cfg = self.cfg
    proj = layers.dense((cfg.concept_len, cfg.embed_dim), ("concept_embed", None, "embed"), cfg,
                        name=name)
    return proj(z_BxNxD.astype(cfg.compute_dtype))


def previous_concepts(z_BxNxD, segment_ids_BxN):
  """z shifted right by one inside each document; zeros at a document's first chunk."""
  prev_BxNxD = jnp.pad(z_BxNxD[:, :-1], ((0, 0), (1, 0), (0, 0)))
  prev_seg_BxN = jnp.pad(segment_ids_BxN[:, :-1], ((0, 0), (1, 0)))
  same_BxN = (prev_seg_BxN == segment_ids_BxN) & (segment_ids_BxN > 0)
  return jnp.where(same_BxN[..., None], prev_BxNxD, 0.0)
