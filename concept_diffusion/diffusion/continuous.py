"""Continuous diffusion in concept space: losses and samplers for the concept head.

Pure functions. `pred_fn(zt_BxNxD, t_BxN) -> out_BxNxD` is the head with its
context already bound. All objectives share one path between noise (t = 0) and
data (t = 1): z_t = (1 - t) noise + t z1. A self-conditioned head takes a third
argument, pred_fn(zt, t, sc): its own clean estimate of z1 (zeros: none).
  flow: predict the velocity z1 - noise (rectified flow / flow matching).
  x0:   predict the clean concept z1.
  mse:  ignore noise; pred_fn(0, 0) regresses z1 directly (the baseline).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

OBJECTIVES = ("flow", "x0", "mse")
# Share of training positions whose head reads a first pass's estimate (self_condition), as
# in self-conditioning's introduction (Chen et al., Analog Bits): the rest read zeros, as
# the sampler's first step does.
SELF_CONDITION_RATE = 0.5


def stratified_times(key, shape):
  """U(0, 1) times for every element of `shape`, one per stratum, in random order."""
  n = 1
  for s in shape:
    n *= s
  k_offset, k_perm = jax.random.split(key)
  u_N = (jnp.arange(n) + jax.random.uniform(k_offset, (n,))) / n
  return jax.random.permutation(k_perm, u_N).reshape(shape)


def shift_times(u, shift: float):
  """Warps U(0, 1) times: shift > 1 puts more of them near noise (t = 0), 1 leaves them.

  t = u / (u + shift (1 - u)); e.g. shift 3 takes the median time from 0.5 to 0.25.
  """
  if shift == 1.0:
    return u
  return u / (u + shift * (1.0 - u))


def interpolate(noise_BxNxD, z1_BxNxD, t_BxN):
  """z_t = (1 - t) noise + t z1."""
  t = t_BxN[..., None]
  return (1.0 - t) * noise_BxNxD + t * z1_BxNxD


def masked_mean(err_BxN, mask_BxN):
  """Mean of err over positions where mask is True (0 if none)."""
  mask = mask_BxN.astype(jnp.float32)
  return jnp.sum(err_BxN * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_concept_targets(z_BxNxD, concept_mask_BxN, segment_ids_BxN):
  """Targets z_{n+1} for context position n, and where they exist (same document, real)."""
  target_BxNxD = jnp.pad(z_BxNxD[:, 1:], ((0, 0), (0, 1), (0, 0)))
  next_real_BxN = jnp.pad(concept_mask_BxN[:, 1:], ((0, 0), (0, 1)))
  next_seg_BxN = jnp.pad(segment_ids_BxN[:, 1:], ((0, 0), (0, 1)))
  mask_BxN = concept_mask_BxN & next_real_BxN & (next_seg_BxN == segment_ids_BxN)
  return target_BxNxD, mask_BxN


def clean_estimate(objective: str, out_BxNxD, zt_BxNxD, t_BxN):
  """The head's estimate of the clean concept z1 from its output at (z_t, t)."""
  if objective == "flow":  # z1 = z_t + (1 - t) (z1 - noise).
    return zt_BxNxD + (1.0 - t_BxN[..., None]) * out_BxNxD
  return out_BxNxD  # x0 and mse predict z1 itself.


def concept_loss(objective: str, pred_fn, z1_BxNxD, mask_BxN, key, with_estimate: bool = False,
                 time_shift: float = 1.0, dims: int = 0, self_condition: bool = False):
  """Per-dimension squared error of the objective's target -> (loss, metrics).

  time_shift: training times are shift_times of stratified U(0, 1) ones.
  dims: the error over the first `dims` dimensions only (0: all of them).
  with_estimate: also return the head's clean-concept estimate z1_hat_BxNxD
  (differentiable), for losses that look at what the head would generate.
  self_condition: pred_fn(zt, t, sc); at SELF_CONDITION_RATE of the positions sc is
  the clean estimate of a first pass at the same (z_t, t) without gradient, elsewhere
  zeros (self_conditioned).
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"concepts.objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
  z1_BxNxD = z1_BxNxD.astype(jnp.float32)
  if self_condition:
    key, k_sc = jax.random.split(key)
    pred_fn = self_conditioned(objective, pred_fn, k_sc)
  if objective == "mse":
    t_BxN = jnp.zeros(z1_BxNxD.shape[:-1])
    zt_BxNxD = jnp.zeros_like(z1_BxNxD)
    out_BxNxD = pred_fn(zt_BxNxD, t_BxN)
    target_BxNxD = z1_BxNxD
  else:
    k_t, k_noise = jax.random.split(key)
    t_BxN = shift_times(stratified_times(k_t, z1_BxNxD.shape[:-1]), time_shift)
    noise_BxNxD = jax.random.normal(k_noise, z1_BxNxD.shape)
    zt_BxNxD = interpolate(noise_BxNxD, z1_BxNxD, t_BxN)
    out_BxNxD = pred_fn(zt_BxNxD, t_BxN)
    target_BxNxD = z1_BxNxD - noise_BxNxD if objective == "flow" else z1_BxNxD
  out_BxNxD = out_BxNxD.astype(jnp.float32)
  err_BxN = jnp.mean(jnp.square(prefix(out_BxNxD - target_BxNxD, dims)), axis=-1)
  loss = masked_mean(err_BxN, mask_BxN)
  if with_estimate:
    return loss, {"loss": loss}, clean_estimate(objective, out_BxNxD, zt_BxNxD, t_BxN)
  return loss, {"loss": loss}


def self_conditioned(objective: str, pred_fn, key):
  """pred_fn(zt, t) of training: a first pass with no estimate, then, at SELF_CONDITION_RATE
  of the positions (drawn from key), the head again with that pass's clean estimate."""
  def fn(zt_BxNxD, t_BxN):
    zeros_BxNxD = jnp.zeros_like(zt_BxNxD)
    first_BxNxD = clean_estimate(objective, pred_fn(zt_BxNxD, t_BxN, zeros_BxNxD), zt_BxNxD,
                                 t_BxN)
    use_BxN = jax.random.bernoulli(key, SELF_CONDITION_RATE, t_BxN.shape)
    sc_BxNxD = jnp.where(use_BxN[..., None], jax.lax.stop_gradient(first_BxNxD), zeros_BxNxD)
    return pred_fn(zt_BxNxD, t_BxN, sc_BxNxD)
  return fn


def prefix(x_BxNxD, dims: int):
  """The first `dims` dimensions of x (0: all of them)."""
  return x_BxNxD[..., :dims] if dims else x_BxNxD


def next_concept_infonce(q_BxNxD, target_BxNxD, mask_BxN, temperature: float):
  """InfoNCE of each position's query against every next concept of the batch -> (loss, acc).

  Position i's positive is its own target; the candidates are the targets of every
  real position of the batch (other documents and other sentences of its own). A
  candidate equal to the positive (the END chunk, a repeated sentence) is not counted
  as a negative. acc: how often the positive has the highest similarity.
  """
  d = q_BxNxD.shape[-1]
  unit = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)  # noqa: E731
  q_XxD = unit(q_BxNxD.reshape(-1, d).astype(jnp.float32))
  k_XxD = unit(target_BxNxD.reshape(-1, d).astype(jnp.float32))
  valid_X = mask_BxN.reshape(-1)
  same_XxX = (k_XxD @ k_XxD.T) > 1.0 - 1e-5  # Duplicates of a target, itself included.
  eye_XxX = jnp.eye(valid_X.shape[0], dtype=bool)
  candidate_XxX = valid_X[None, :] & (eye_XxX | ~same_XxX)
  # A finite floor, not -inf: a row with no candidate keeps finite values and gradients.
  logits_XxX = jnp.where(candidate_XxX, (q_XxD @ k_XxD.T) / temperature, -1e9)
  positive_X = jnp.diagonal(logits_XxX)
  loss_X = jnp.where(valid_X, jax.nn.logsumexp(logits_XxX, axis=-1) - positive_X, 0.0)
  best_X = jnp.max(logits_XxX, axis=-1) <= positive_X
  return masked_mean(loss_X, valid_X), masked_mean(best_X.astype(jnp.float32), valid_X)


def flow_matching_loss(pred_fn, z1_BxNxD, mask_BxN, key):
  """Rectified-flow loss: ||v(z_t, t) - (z1 - noise)||^2."""
  return concept_loss("flow", pred_fn, z1_BxNxD, mask_BxN, key)


def x0_loss(pred_fn, z1_BxNxD, mask_BxN, key):
  """Clean-concept prediction loss: ||x0(z_t, t) - z1||^2."""
  return concept_loss("x0", pred_fn, z1_BxNxD, mask_BxN, key)


def mse_loss(pred_fn, z1_BxNxD, mask_BxN, key=None):
  """Plain regression baseline: ||f(0, 0) - z1||^2."""
  return concept_loss("mse", pred_fn, z1_BxNxD, mask_BxN, key)


def guided(cond_fn, uncond_fn, scale: float):
  """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 = cond only."""
  if scale == 1.0:
    return cond_fn
  return lambda zt, t: uncond_fn(zt, t) + scale * (cond_fn(zt, t) - uncond_fn(zt, t))


def _times(x, value):
  return jnp.full(x.shape[:-1], value, jnp.float32)


def integrate(objective: str, pred_fn, noise_BxNxD, steps: int, method: str = "euler",
              t_end: float = 1.0):
  """Euler / Heun integration of dz/dt = v(z, t) (flow) or deterministic DDIM (x0: the
  estimate re-noised with its implied noise) from t = 0 (noise) to t_end (1: data). Each
  call of pred_fn(z, t, sc) is given the clean estimate of the call before it (zeros at
  the first; a head without self-conditioning ignores it)."""
  dt = t_end / steps

  def step(i, carry):
    z, sc = carry
    t = _times(z, i * dt)
    out = pred_fn(z, t, sc)
    est = clean_estimate(objective, out, z, t)
    if objective == "x0":  # t < 1 at every evaluated step.
      noise_hat = (z - t[..., None] * est) / (1.0 - t[..., None])
      t_next = (i + 1) * dt
      return (1.0 - t_next) * noise_hat + t_next * est, est
    if method == "heun":
      z_end, t_next = z + dt * out, _times(z, (i + 1) * dt)
      out_end = pred_fn(z_end, t_next, est)
      return z + 0.5 * dt * (out + out_end), clean_estimate(objective, out_end, z_end, t_next)
    return z + dt * out, est

  noise_BxNxD = noise_BxNxD.astype(jnp.float32)
  z, _ = jax.lax.fori_loop(0, steps, step, (noise_BxNxD, jnp.zeros_like(noise_BxNxD)))
  return z


def end_time(end_noise: float) -> float:
  """The path time t whose z_t / t is z1 + end_noise * noise (end_noise 0: t = 1, clean)."""
  return 1.0 / (1.0 + end_noise)


def sample(objective: str, pred_fn, noise_BxNxD, steps: int, method: str = "euler",
           end_noise: float = 0.0, self_condition: bool = False):
  """Concepts from noise: Euler/Heun for flow, DDIM for x0, one call for mse.

  end_noise > 0 stops the path early, at end_time(end_noise), and returns z_t / t: a
  concept under end_noise x its own path's noise, distributed (for an exact head) as
  the renderer's training input z + render.z_noise * N(0, 1) when end_noise equals
  render.z_noise. The head then leaves to the renderer the detail that noise hides,
  which the renderer was trained to fill in. mse has no path: its estimate plus
  end_noise x the given noise. self_condition: pred_fn(z, t, sc) reads the previous
  call's clean estimate (integrate; mse's one call reads none).
  """
  if end_noise < 0:
    raise ValueError(f"end_noise={end_noise!r} must be >= 0")
  t_end = end_time(end_noise)
  if objective == "flow" and method not in ("euler", "heun"):
    raise ValueError(f"flow sampling method={method!r} is not one of euler, heun")
  if objective in ("flow", "x0"):
    fn = pred_fn if self_condition else (lambda z, t, sc: pred_fn(z, t))
    return integrate(objective, fn, noise_BxNxD, steps, method, t_end) / t_end
  if objective == "mse":
    return pred_fn(jnp.zeros_like(noise_BxNxD), _times(noise_BxNxD, 0.0)) + end_noise * noise_BxNxD
  raise ValueError(f"concepts.objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
