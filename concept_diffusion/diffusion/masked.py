"""Masked (absorbing-state) discrete diffusion: loss, Monte-Carlo ELBO and sampler.

Pure functions of arrays and PRNG keys. Token arrays have any leading shape and
the sequence on the last axis ([B, T] flat, or [B, N, L] chunks); every leading
index is one sequence with its own mask rate t. `logits_fn(tokens) -> logits` maps
a token array of that shape to logits of shape [..., V].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASK_RATES = ("uniform", "high")


def stratified_uniform(key, n: int):
  """n low-discrepancy U(0, 1) draws: one per stratum [i/n, (i+1)/n), in random order."""
  k_offset, k_perm = jax.random.split(key)
  u_N = (jnp.arange(n) + jax.random.uniform(k_offset, (n,))) / n
  return jax.random.permutation(k_perm, u_N)


def mask_rate(key, n: int, dist: str = "uniform", eps: float = 1e-3):
  """Per-sequence mask rate t in [eps, 1].

  uniform: t ~ U(eps, 1), the ELBO's own distribution.
  high: t = 1 - u^2 (density 1 / (2 sqrt(1 - t)), mean 2/3), skewed toward fully
    masked so the renderer must read z (DESIGN lesson 2).
  """
  u_N = stratified_uniform(key, n)
  if dist == "uniform":
    t_N = u_N
  elif dist == "high":
    t_N = 1.0 - u_N ** 2
  else:
    raise ValueError(f"render.mask_rate={dist!r} is not one of {', '.join(MASK_RATES)}")
  return eps + (1.0 - eps) * t_N


def _flat(tokens, token_mask):
  """[..., L] -> [M, L] views of tokens and the validity mask."""
  l = tokens.shape[-1]
  valid = jnp.ones(tokens.shape, bool) if token_mask is None else jnp.broadcast_to(
      token_mask, tokens.shape)
  return tokens.reshape(-1, l), valid.reshape(-1, l)


def weighted_nll(logits_fn, tokens, token_mask, mask_id: int, t_M, masked_MxL):
  """Sum of (1/t)-weighted cross-entropy on masked real tokens, and masked accuracy terms."""
  tokens_MxL, valid_MxL = _flat(tokens, token_mask)
  masked_MxL = masked_MxL & valid_MxL
  inputs = jnp.where(masked_MxL, mask_id, tokens_MxL).reshape(tokens.shape)
  logits_MxLxV = logits_fn(inputs).reshape(*tokens_MxL.shape, -1).astype(jnp.float32)
  logp_MxLxV = jax.nn.log_softmax(logits_MxLxV, axis=-1)
  nll_MxL = -jnp.take_along_axis(logp_MxLxV, tokens_MxL[..., None], axis=-1)[..., 0]
  nll_sum = jnp.sum(jnp.where(masked_MxL, nll_MxL / t_M[:, None], 0.0))
  hits = jnp.sum(masked_MxL & (jnp.argmax(logits_MxLxV, -1) == tokens_MxL))
  return nll_sum, hits, jnp.sum(masked_MxL)


def masked_diffusion_loss(logits_fn, tokens, token_mask, mask_id: int, key, *,
                          eps: float = 1e-3, full_mask_prob: float = 0.0,
                          mask_rate_dist: str = "uniform"):
  """Masked-diffusion loss in nats per real token -> (loss, metrics).

  With the defaults this is the ELBO: t ~ U(eps, 1) (stratified over the batch),
  each real token masked with probability t, cross-entropy on masked tokens
  weighted 1/t, summed and divided by the number of real tokens. Padding never
  counts.

  full_mask_prob: that share of sequences gets every real token masked and is
  treated as t = 1 (weight 1), i.e. it contributes its plain all-masked
  cross-entropy per token. That is the ELBO integrand's own value at t = 1, so the
  loss stays on the same nats-per-token scale while the z path gets a dense
  signal (DESIGN lesson 2). mask_rate_dist="high" draws t from `mask_rate`'s
  skewed distribution and keeps the 1/t weight without a density correction: a
  deliberately re-weighted ELBO that spends its signal on high mask rates.
  """
  tokens_MxL, valid_MxL = _flat(tokens, token_mask)
  m, l = tokens_MxL.shape
  k_t, k_full, k_mask = jax.random.split(key, 3)
  full_M = jax.random.uniform(k_full, (m,)) < full_mask_prob
  t_M = jnp.where(full_M, 1.0, mask_rate(k_t, m, mask_rate_dist, eps))
  masked_MxL = (jax.random.uniform(k_mask, (m, l)) < t_M[:, None]) | full_M[:, None]
  nll_sum, hits, num_masked = weighted_nll(logits_fn, tokens, token_mask, mask_id, t_M,
                                           masked_MxL)
  num_real = jnp.maximum(jnp.sum(valid_MxL), 1)
  loss = nll_sum / num_real
  metrics = {"loss": loss, "masked_accuracy": hits / jnp.maximum(num_masked, 1),
             "mask_fraction": num_masked / num_real}
  return loss, metrics


def elbo_bits(logits_fn, tokens, token_mask, mask_id: int, key, num_samples: int = 16,
              eps: float = 1e-3):
  """Monte-Carlo ELBO in bits per real token: `num_samples` stratified draws of t per sequence.

  An upper bound on the model's negative log-likelihood (exact as eps -> 0 and
  num_samples -> inf; `num_samples` trades evaluation cost for variance).
  """
  tokens_MxL, valid_MxL = _flat(tokens, token_mask)
  m, l = tokens_MxL.shape

  def one_sample(i, total):
    k_t, k_mask = jax.random.split(jax.random.fold_in(key, i))
    t_M = mask_rate(k_t, m, "uniform", eps)
    masked_MxL = jax.random.uniform(k_mask, (m, l)) < t_M[:, None]
    nll_sum, _, _ = weighted_nll(logits_fn, tokens, token_mask, mask_id, t_M, masked_MxL)
    return total + nll_sum

  total = jax.lax.fori_loop(0, num_samples, one_sample, jnp.zeros((), jnp.float32))
  return total / num_samples / jnp.maximum(jnp.sum(valid_MxL), 1) / math.log(2.0)


def commit_schedule(num_masked_M, step, steps: int):
  """Positions committed after `step` (0-based) of `steps`: linear, all by the last step."""
  return (num_masked_M * (step + 1)) // steps


def sample(logits_fn, key, token_mask, *, mask_id: int, pad_id: int, steps: int,
           remasking: str = "confidence", temperature: float = 0.0, block_size: int | None = None,
           return_steps: bool = False, sample_pad: bool = False):
  """Iterative unmasking from all-MASK -> tokens shaped like token_mask (+ states [S, ...]).

  Each step predicts every masked position and commits the most confident ones
  (remasking="confidence", low-confidence remasking) or random ones ("random"), so
  that a linear share is committed per step and every real position is committed
  by the last step. block_size splits the sequence into semi-autoregressive blocks
  filled left to right, `steps / num_blocks` steps each. temperature 0 = argmax.
  Positions outside token_mask stay pad_id; mask_id is never sampled, nor is pad_id
  unless `sample_pad` (a renderer denoising whole chunks predicts where a chunk ends).
  """
  if remasking not in ("confidence", "random"):
    raise ValueError(f"remasking={remasking!r} is not one of confidence, random")
  shape = token_mask.shape
  valid_MxL = token_mask.reshape(-1, shape[-1])
  l = shape[-1]
  block_size = block_size or l
  num_blocks = -(-l // block_size)
  if steps < 1 or steps % num_blocks:
    raise ValueError(f"steps={steps} must be a positive multiple of the {num_blocks} blocks "
                     f"of block_size={block_size} over length {l}")
  steps_per_block = steps // num_blocks
  block_L = jnp.arange(l) // block_size
  size_MxNb = jnp.stack([jnp.sum(valid_MxL & (block_L == b), -1) for b in range(num_blocks)], -1)

  def step(tokens_MxL, s):
    b, j = s // steps_per_block, s % steps_per_block
    k_pick, k_rank = jax.random.split(jax.random.fold_in(key, s))
    logits_MxLxV = logits_fn(tokens_MxL.reshape(shape)).reshape(*valid_MxL.shape, -1)
    never = jnp.array([mask_id] if sample_pad else [mask_id, pad_id])
    logits_MxLxV = logits_MxLxV.astype(jnp.float32).at[..., never].set(-jnp.inf)
    pred_MxL, conf_MxL = _pick(logits_MxLxV, k_pick, temperature)
    eligible_MxL = (tokens_MxL == mask_id) & valid_MxL & (block_L == b)
    if remasking == "confidence":
      score_MxL = conf_MxL
    else:
      score_MxL = jax.random.uniform(k_rank, pred_MxL.shape)
    score_MxL = jnp.where(eligible_MxL, score_MxL, -jnp.inf)
    size_M = size_MxNb[:, b]
    todo_M = commit_schedule(size_M, j, steps_per_block) - (size_M - eligible_MxL.sum(-1))
    rank_MxL = jnp.argsort(jnp.argsort(-score_MxL, axis=-1, stable=True), axis=-1)
    commit_MxL = eligible_MxL & (rank_MxL < todo_M[:, None])
    tokens_MxL = jnp.where(commit_MxL, pred_MxL, tokens_MxL)
    return tokens_MxL, (tokens_MxL.reshape(shape) if return_steps else None)

  start_MxL = jnp.where(valid_MxL, mask_id, pad_id).astype(jnp.int32)
  tokens_MxL, states_SxMxL = jax.lax.scan(step, start_MxL, jnp.arange(steps))
  if return_steps:
    return tokens_MxL.reshape(shape), states_SxMxL
  return tokens_MxL.reshape(shape)


def _pick(logits_MxLxV, key, temperature: float):
  """Predicted token (argmax, or Gumbel-max at `temperature`) and its probability."""
  if temperature > 0:
    gumbel = jax.random.gumbel(key, logits_MxLxV.shape)
    pred_MxL = jnp.argmax(logits_MxLxV / temperature + gumbel, axis=-1)
  else:
    pred_MxL = jnp.argmax(logits_MxLxV, axis=-1)
  probs_MxLxV = jax.nn.softmax(logits_MxLxV, axis=-1)
  conf_MxL = jnp.take_along_axis(probs_MxLxV, pred_MxL[..., None], axis=-1)[..., 0]
  return pred_MxL.astype(jnp.int32), conf_MxL

