"""Renderer: a masked-diffusion token denoiser for one chunk, conditioned on its concept."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from concept_diffusion.models import layers

PAD_ID = 0  # data.tokenizer's PAD (models never import data); shifted_in_document fills it.


class Renderer(nn.Module):
  """Bidirectional transformer over the L tokens of a chunk, predicting clean tokens.

  The concept enters as per-position slots, z_D -> slots_LxE added to the token
  embeddings: every position starts as the same MASK embedding, so each needs its
  own projection of z to read (DESIGN lesson 1). No time input: the mask pattern
  tells the model how much is left to fill in.

  With cfg.context_chunks = C > 0 it also reads the clean tokens of the C chunks before
  this one (context_BxNxCL, oldest first, PAD where there are none) as a prefix at
  positions 0..CL-1, the chunk at CL..CL+L-1: the concept says what the chunk is about,
  the text before it how the words go on from there. No slots on the prefix.
  """
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, tokens_BxNxL, z_BxNxD, prev_z_BxNxD=None, token_mask_BxNxL=None,
               context_BxNxCL=None):
    cfg = self.cfg
    b, n, l = tokens_BxNxL.shape
    if l != cfg.concept_len:
      raise ValueError(f"Renderer built for data.concept_len={cfg.concept_len}, got chunks of {l}")
    emb = layers.embed(cfg)
    x_BxNxLxE = emb(tokens_BxNxL)
    x_BxNxLxE += self._slots(z_BxNxD, "slots")
    if cfg.prev_concept:
      if prev_z_BxNxD is None:  # First chunk of a document: no previous concept.
        prev_z_BxNxD = jnp.zeros_like(z_BxNxD)
      x_BxNxLxE += self._slots(prev_z_BxNxD, "prev_slots")
    if token_mask_BxNxL is None:
      token_mask_BxNxL = jnp.ones((b, n, l), bool)
    valid_BxNxT = token_mask_BxNxL
    if cfg.context_chunks:
      cl = cfg.context_chunks * l
      if context_BxNxCL is None:  # No text before: an all-PAD prefix, attended by nothing.
        context_BxNxCL = jnp.full((b, n, cl), PAD_ID, jnp.int32)
      if context_BxNxCL.shape != (b, n, cl):
        raise ValueError(f"Renderer reads render.context_chunks={cfg.context_chunks} chunks "
                         f"before each: context {context_BxNxCL.shape}, expected {(b, n, cl)}")
      ctx_BxNxCLxE = emb(context_BxNxCL)  # The same table as the chunk's.
      x_BxNxLxE = jnp.concatenate([ctx_BxNxCLxE.astype(x_BxNxLxE.dtype), x_BxNxLxE], axis=2)
      valid_BxNxT = jnp.concatenate([context_BxNxCL != PAD_ID, token_mask_BxNxL], axis=2)
    t = valid_BxNxT.shape[-1]
    mask_MxTxT = layers.segment_mask(valid_BxNxT.reshape(b * n, t).astype(jnp.int32),
                                     causal=False)
    positions_MxT = jnp.broadcast_to(jnp.arange(t), (b * n, t))
    x_MxTxE = layers.Transformer(cfg, cfg.renderer_layers, name="transformer")(
        x_BxNxLxE.reshape(b * n, t, cfg.embed_dim), mask_MxTxT, positions_MxT)
    x_MxLxE = x_MxTxE[:, t - l:]  # The chunk's own positions.
    logits_MxLxV = layers.dense(cfg.vocab_size, ("embed", "vocab"), cfg, name="logits")(x_MxLxE)
    logits_BxNxLxV = logits_MxLxV.astype(jnp.float32).reshape(b, n, l, cfg.vocab_size)
    return nn.with_logical_constraint(logits_BxNxLxV, ("batch", "concepts", "length", "vocab"))

  def _slots(self, z_BxNxD, name):
    """z_D -> one E-vector per position (unit-variance init for unit-RMS z)."""
    cfg = self.cfg
    proj = layers.dense((cfg.concept_len, cfg.embed_dim), ("concept_embed", None, "embed"), cfg,
                        name=name)
    return proj(z_BxNxD.astype(cfg.compute_dtype))


def shifted_in_document(x_BxNxX, segment_ids_BxN, k: int = 1):
  """x of chunk n-k at chunk n, inside each document; zeros (PAD for tokens) elsewhere."""
  n = x_BxNxX.shape[1]
  prev_BxNxX = jnp.pad(x_BxNxX[:, :n - k], ((0, 0), (k, 0), (0, 0)))
  prev_seg_BxN = jnp.pad(segment_ids_BxN[:, :n - k], ((0, 0), (k, 0)))
  same_BxN = (prev_seg_BxN == segment_ids_BxN) & (segment_ids_BxN > 0)
  return jnp.where(same_BxN[..., None], prev_BxNxX, 0)


def previous_concepts(z_BxNxD, segment_ids_BxN):
  """z shifted right by one inside each document; zeros at a document's first chunk."""
  return shifted_in_document(z_BxNxD, segment_ids_BxN)


def concept_prefix(z_BxNxD, dims):
  """z with every dimension from `dims` on zeroed: a nested concept's prefix (render.nested_dims).

  dims: an int (0 keeps all), or one int per chunk (BxN).
  """
  if isinstance(dims, int) and (dims == 0 or dims >= z_BxNxD.shape[-1]):
    return z_BxNxD
  keep_BxNxD = jnp.arange(z_BxNxD.shape[-1]) < jnp.asarray(dims)[..., None]
  return jnp.where(keep_BxNxD, z_BxNxD, 0).astype(z_BxNxD.dtype)


def previous_chunks(tokens_BxNxL, segment_ids_BxN, num: int):
  """context_BxNx(num*L): the `num` chunks before each one in its document, oldest first.

  PAD where the document has fewer (its first chunks, or an example that starts inside
  a cut document).
  """
  return jnp.concatenate([shifted_in_document(tokens_BxNxL, segment_ids_BxN, k)
                          for k in range(num, 0, -1)], axis=2)  # Chunk n-num .. n-1.
