"""Flat token baselines from the same blocks: TokenAR (GPT-style), TokenMDM (LLaDA-style)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from concept_diffusion.models import layers


class TokenLM(nn.Module):
  """Embedding -> transformer over flat tokens -> logits; attention stays within segments."""
  cfg: layers.ModelConfig
  causal: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BxT, segment_ids_BxT=None):
    cfg = self.cfg
    x_BxTxE = layers.embed(cfg)(tokens_BxT)
    if self.decode:  # Attention reads positions and mask from its cache index.
      mask_BxTxT = positions_BxT = None
    else:
      if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
      mask_BxTxT = layers.segment_mask(segment_ids_BxT, causal=self.causal)
      positions_BxT = layers.segment_positions(segment_ids_BxT)
    x_BxTxE = layers.Transformer(cfg, cfg.baseline_layers, self.decode, name="transformer")(
        x_BxTxE, mask_BxTxT, positions_BxT)
    logits_BxTxV = layers.dense(cfg.vocab_size, ("embed", "vocab"), cfg, name="logits")(x_BxTxE)
    return nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32),
                                      ("batch", "length", "vocab"))


class TokenAR(TokenLM):
  """GPT-style causal LM; `init_cache` / `decode_step` give KV-cached generation."""
  causal: bool = True


class TokenMDM(TokenLM):
  """Masked-diffusion LM over flat tokens, bidirectional within each document."""
  causal: bool = False


def init_cache(model: TokenAR, batch_size: int, max_len: int):
  """Zeroed KV cache (the flax 'cache' collection) for `max_len` positions."""
  decoder = model.clone(decode=True)
  tokens_BxT = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(decoder.init, jax.random.key(0), tokens_BxT)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode_step(model: TokenAR, params, cache, tokens_BxT):
  """Feeds T new tokens (a prompt, or one token) at the cache index -> (logits_BxTxV, cache)."""
  decoder = model.clone(decode=True)
  logits_BxTxV, updates = decoder.apply({"params": params, "cache": cache}, tokens_BxT,
                                        mutable=["cache"])
  return logits_BxTxV, updates["cache"]
