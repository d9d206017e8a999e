"""Diffusion math against known answers: masked ELBO, unmasking sampler, concept samplers."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion.diffusion import continuous, masked

MASK, PAD = 4, 0


def _joint(seed=0, v=4, l=3):
  """A random joint distribution over l tokens from {0..v-1} (table + all configs)."""
  configs_CxL = np.array(list(itertools.product(range(v), repeat=l)), np.int32)
  p_C = np.random.default_rng(seed).dirichlet(np.ones(len(configs_CxL)) * 0.5)
  return jnp.asarray(configs_CxL), jnp.asarray(p_C)


def _exact_conditional(configs_CxL, p_C, vocab):
  """logits_fn giving p(x_i | unmasked tokens) of the joint at every position."""

  def logits_fn(tokens_MxL):
    obs_MxL = tokens_MxL != MASK
    agree_MxC = jnp.all(~obs_MxL[:, None] | (configs_CxL[None] == tokens_MxL[:, None]), -1)
    w_MxC = agree_MxC * p_C
    onehot_CxLxV = jax.nn.one_hot(configs_CxL, vocab)
    probs_MxLxV = jnp.einsum("mc,clv->mlv", w_MxC, onehot_CxLxV) / w_MxC.sum(-1)[:, None, None]
    return jnp.log(probs_MxLxV + 1e-30)

  return logits_fn


def test_masked_loss_estimates_exact_nll():
  """With exact conditionals the MDM ELBO equals -log p(x) (MC error only)."""
  configs_CxL, p_C = _joint()
  logits_fn = _exact_conditional(configs_CxL, p_C, vocab=MASK + 1)
  loss_fn = lambda k, x: masked.masked_diffusion_loss(logits_fn, x, None, MASK, k)[0]  # noqa: E731
  losses_fn = jax.jit(jax.vmap(loss_fn, in_axes=(0, None)))
  bits_fn = jax.jit(lambda k, x: masked.elbo_bits(logits_fn, x, None, MASK, k, num_samples=16))
  for c in (3, 17, 40):  # A likely, a middling and an unlikely sequence.
    x_MxL = jnp.tile(configs_CxL[c], (2048, 1))
    losses = losses_fn(jax.random.split(jax.random.key(c), 16), x_MxL)
    exact = -math.log(float(p_C[c])) / 3
    # The 1/t weight makes single draws heavy-tailed; compare within 4 standard errors.
    stderr = float(losses.std()) / math.sqrt(len(losses))
    assert abs(float(losses.mean()) - exact) < 4 * stderr + 1e-3, (c, losses.mean(), exact)
    bits = bits_fn(jax.random.key(100 + c), x_MxL)
    assert abs(float(bits) - exact / math.log(2)) < (4 * stderr + 1e-3) / math.log(2)


def test_padding_never_counts():
  tokens_MxL = jnp.array([[7, 8, 9, PAD, PAD], [7, 8, 9, 10, 11]])
  valid_MxL = tokens_MxL != PAD
  seen = []

  def logits_fn(x_MxL):
    seen.append(x_MxL)
    return jax.nn.one_hot(x_MxL, 16) * 3.0  # Depends only on the visible token.

  other_MxL = tokens_MxL.at[0, 3:].set(12)  # Garbage under the padding.
  a, _ = masked.masked_diffusion_loss(logits_fn, tokens_MxL, valid_MxL, MASK, jax.random.key(0))
  b, _ = masked.masked_diffusion_loss(logits_fn, other_MxL, valid_MxL, MASK, jax.random.key(0))
  assert float(a) == pytest.approx(float(b))
  assert not bool(jnp.any((seen[0] == MASK) & ~valid_MxL))


def test_full_mask_prob_masks_every_real_token():
  tokens = jnp.full((3, 5, 8), 9)
  valid = jnp.arange(8) < jnp.array([8, 5, 1])[:, None, None]
  seen = []

  def logits_fn(x):
    seen.append(x)
    return jnp.zeros((*x.shape, 16))

  loss, m = masked.masked_diffusion_loss(logits_fn, tokens, valid, MASK, jax.random.key(0),
                                         full_mask_prob=1.0)
  assert bool(jnp.all((seen[0] == MASK) == valid))
  assert float(loss) == pytest.approx(math.log(16), rel=1e-5)  # Weight 1 at t = 1.
  assert float(m["mask_fraction"]) == pytest.approx(1.0)


def test_mask_rate_distributions():
  t_uni = masked.mask_rate(jax.random.key(0), 1000, "uniform")
  t_high = masked.mask_rate(jax.random.key(0), 1000, "high")
  assert float(t_uni.min()) >= 1e-3 and float(t_uni.max()) <= 1.0
  # Stratified: exactly one draw per 1/n-wide bin.
  bins = np.sort(np.floor((np.asarray(t_uni) - 1e-3) / (1 - 1e-3) * 1000))
  np.testing.assert_array_equal(bins, np.arange(1000))
  assert abs(float(t_uni.mean()) - 0.5) < 0.01
  assert abs(float(t_high.mean()) - 2 / 3) < 0.01  # E[1 - u^2] = 2/3.
  assert float(jnp.mean(t_high > 0.75)) == pytest.approx(0.5, abs=0.02)  # P(t > s) = sqrt(1-s).
  with pytest.raises(ValueError, match="mask_rate"):
    masked.mask_rate(jax.random.key(0), 4, "low")


def _oracle(target_MxL, vocab=32):
  """A denoiser that knows the answer, more confident at later positions."""
  conf_L = 1.0 + jnp.arange(target_MxL.shape[-1])

  def logits_fn(tokens):
    onehot = jax.nn.one_hot(target_MxL.reshape(tokens.shape), vocab)
    return onehot * conf_L[:, None]

  return logits_fn


@pytest.mark.parametrize("remasking", ["confidence", "random"])
def test_sampler_reproduces_oracle_for_every_step_count(remasking):
  l = 6
  key = jax.random.key(0)
  target_MxL = jax.random.randint(key, (5, l), 6, 32)
  valid_MxL = jnp.arange(l) < jnp.array([6, 6, 3, 1, 0])[:, None]
  target_MxL = jnp.where(valid_MxL, target_MxL, PAD)
  for steps in range(1, l + 1):
    out, states = masked.sample(_oracle(target_MxL), key, valid_MxL, mask_id=MASK, pad_id=PAD,
                                steps=steps, remasking=remasking, return_steps=True)
    np.testing.assert_array_equal(out, target_MxL)
    assert states.shape == (steps, 5, l)
    # Linear schedule: after step s, floor(n (s+1) / S) positions are committed.
    committed_SxM = jnp.sum((states != MASK) & valid_MxL, -1)
    expect_SxM = (valid_MxL.sum(-1) * jnp.arange(1, steps + 1)[:, None]) // steps
    np.testing.assert_array_equal(committed_SxM, expect_SxM)
    assert bool(jnp.all(jnp.where(valid_MxL, True, states == PAD)))


def test_sample_pad_lets_a_renderer_end_its_chunk():
  # Every position is denoised; the oracle says the chunks end early (PAD tails).
  key = jax.random.key(1)
  tokens_MxL = jax.random.randint(key, (4, 6), 6, 32)
  target_MxL = jnp.where(jnp.arange(6) < jnp.array([6, 4, 2, 1])[:, None], tokens_MxL, PAD)
  everywhere_MxL = jnp.ones((4, 6), bool)
  for steps in (1, 3, 6):
    out = masked.sample(_oracle(target_MxL), key, everywhere_MxL, mask_id=MASK, pad_id=PAD,
                        steps=steps, sample_pad=True)
    np.testing.assert_array_equal(out, target_MxL)
  # Without sample_pad, PAD is never committed inside token_mask.
  out = masked.sample(_oracle(target_MxL), key, everywhere_MxL, mask_id=MASK, pad_id=PAD, steps=6)
  assert not bool(jnp.any(out == PAD))


def test_confidence_remasking_commits_most_confident_first():
  target_MxL = jnp.arange(10, 16)[None]
  _, states = masked.sample(_oracle(target_MxL), jax.random.key(0), jnp.ones((1, 6), bool),
                            mask_id=MASK, pad_id=PAD, steps=3, return_steps=True)
  np.testing.assert_array_equal(states[0, 0], [MASK] * 4 + [14, 15])


def test_semi_autoregressive_blocks_fill_left_to_right():
  target_BxNxL = jax.random.randint(jax.random.key(1), (2, 3, 8), 6, 32)
  valid = jnp.ones((2, 3, 8), bool)
  out, states = masked.sample(_oracle(target_BxNxL), jax.random.key(0), valid, mask_id=MASK,
                              pad_id=PAD, steps=4, block_size=4, return_steps=True)
  np.testing.assert_array_equal(out, target_BxNxL)
  assert bool(jnp.all(states[1, ..., :4] != MASK)) and bool(jnp.all(states[1, ..., 4:] == MASK))
  with pytest.raises(ValueError, match="multiple"):
    masked.sample(_oracle(target_BxNxL), jax.random.key(0), valid, mask_id=MASK, pad_id=PAD,
                  steps=3, block_size=4)


def test_temperature_sampling_follows_the_distribution():
  def logits_fn(tokens):  # p(7) = 0.75, p(9) = 0.25 at every position; mask/pad never.
    logits = jnp.full((*tokens.shape, 12), -1e9)
    return logits.at[..., 7].set(math.log(3.0)).at[..., 9].set(0.0).at[..., MASK].set(50.0)

  out = masked.sample(logits_fn, jax.random.key(0), jnp.ones((4000, 2), bool), mask_id=MASK,
                      pad_id=PAD, steps=2, remasking="random", temperature=1.0)
  assert set(np.unique(out).tolist()) == {7, 9}
  assert float(jnp.mean(out == 7)) == pytest.approx(0.75, abs=0.03)


def _gaussian_velocity(mu, sigma):
  """Exact rectified-flow velocity from N(0, 1) noise to N(mu, sigma^2) data."""

  def v(z, t):
    t = t[..., None]
    var = (1 - t) ** 2 + t ** 2 * sigma ** 2
    centred = z - t * mu
    return mu + (t * sigma ** 2 - (1 - t)) / var * centred

  return v


def _gaussian_x0(mu, sigma):
  def x0(z, t):
    t = t[..., None]
    var = (1 - t) ** 2 + t ** 2 * sigma ** 2
    return mu + t * sigma ** 2 / var * (z - t * mu)

  return x0


@pytest.mark.parametrize("method,steps,tol", [("euler", 200, 0.03), ("heun", 20, 0.01)])
def test_flow_sampler_hits_gaussian_target(method, steps, tol):
  mu, sigma = 2.0, 0.5
  noise = jax.random.normal(jax.random.key(0), (20000, 1, 2))
  z = continuous.sample("flow", _gaussian_velocity(mu, sigma), noise, steps, method)
  assert float(z.mean()) == pytest.approx(mu, abs=tol + 0.02)
  assert float(z.std()) == pytest.approx(sigma, abs=tol + 0.02)


def test_ddim_sampler_hits_gaussian_and_point_mass():
  noise = jax.random.normal(jax.random.key(0), (20000, 1, 2))
  z = continuous.sample("x0", _gaussian_x0(2.0, 0.5), noise, 50)
  assert float(z.mean()) == pytest.approx(2.0, abs=0.03)
  assert float(z.std()) == pytest.approx(0.5, abs=0.03)
  target = jnp.array([1.5, -3.0])
  for steps in (1, 2, 7):
    z = continuous.sample("x0", lambda zt, t: jnp.broadcast_to(target, zt.shape), noise[:8], steps)
    np.testing.assert_allclose(z, jnp.broadcast_to(target, z.shape), atol=1e-5)


def test_guidance_extrapolates_point_masses_exactly():
  a, b = jnp.array([1.0, 2.0]), jnp.array([-1.0, 0.0])
  vel = lambda c: (lambda zt, t: (c - zt) / (1.0 - t[..., None]))  # noqa: E731
  noise = jax.random.normal(jax.random.key(0), (8, 3, 2))
  for scale in (1.0, 3.0):
    z = continuous.sample("flow", continuous.guided(vel(a), vel(b), scale), noise, 10)
    np.testing.assert_allclose(z, jnp.broadcast_to(b + scale * (a - b), z.shape), atol=1e-4)


def test_end_noise_returns_the_concept_under_that_noise():
  c = jnp.array([1.5, -3.0])
  noise = jax.random.normal(jax.random.key(0), (8, 3, 2))
  point_flow = lambda zt, t: (c - zt) / (1.0 - t[..., None])  # noqa: E731
  point_x0 = lambda zt, t: jnp.broadcast_to(c, zt.shape)  # noqa: E731
  for objective, fn in (("flow", point_flow), ("x0", point_x0), ("mse", point_x0)):
    # 0 is the clean sampler, bit for bit; otherwise exactly c + end_noise x the path's noise.
    np.testing.assert_array_equal(continuous.sample(objective, fn, noise, 5, end_noise=0.0),
                                  continuous.sample(objective, fn, noise, 5))
    for end_noise, steps in ((1.5, 1), (1.5, 7), (0.25, 3)):
      z = continuous.sample(objective, fn, noise, steps, end_noise=end_noise)
      np.testing.assert_allclose(z, c + end_noise * noise, atol=1e-5)
  # A spread-out target: z1 + end_noise x noise, so the variances add.
  big = jax.random.normal(jax.random.key(1), (20000, 1, 2))
  z = continuous.sample("flow", _gaussian_velocity(2.0, 0.5), big, 20, "heun", end_noise=1.5)
  assert float(z.mean()) == pytest.approx(2.0, abs=0.04)
  assert float(z.std()) == pytest.approx(math.sqrt(0.5 ** 2 + 1.5 ** 2), abs=0.03)
  # The renderer's training input at render.z_noise = 1.5 is z + 1.5 N(0, 1): t = 0.4.
  assert continuous.end_time(1.5) == pytest.approx(0.4)
  with pytest.raises(ValueError, match="end_noise=-1"):
    continuous.sample("flow", point_flow, noise, 4, end_noise=-1.0)


def test_concept_losses_vanish_for_exact_predictors():
  z1 = jax.random.normal(jax.random.key(0), (4, 5, 3))
  mask = jnp.ones((4, 5), bool)
  key = jax.random.key(1)
  k_t, k_noise = jax.random.split(key)
  noise = jax.random.normal(k_noise, z1.shape)
  # Exact velocity for this batch: recover the noise from z_t via the known z1.
  t = continuous.stratified_times(k_t, (4, 5))
  assert float(continuous.flow_matching_loss(
      lambda zt, tt: z1 - noise, z1, mask, key)[0]) < 1e-10
  assert float(continuous.x0_loss(lambda zt, tt: z1, z1, mask, key)[0]) < 1e-10
  assert float(continuous.mse_loss(lambda zt, tt: z1, z1, mask)[0]) < 1e-10
  assert float(continuous.mse_loss(lambda zt, tt: z1 + 1.0, z1, mask)[0]) == pytest.approx(1.0)
  assert t.shape == (4, 5) and float(t.min()) >= 0.0


def test_next_concept_targets_stay_inside_documents():
  z = jnp.arange(6.0).reshape(1, 6, 1)
  seg = jnp.array([[1, 1, 1, 2, 2, 0]])
  target, mask = continuous.next_concept_targets(z, seg > 0, seg)
  np.testing.assert_array_equal(mask[0], [True, True, False, True, False, False])
  np.testing.assert_array_equal(target[0, :5, 0], [1, 2, 3, 4, 5])


def test_time_shift_moves_training_times_toward_noise():
  u = continuous.stratified_times(jax.random.key(0), (64, 64))
  assert continuous.shift_times(u, 1.0) is u  # The default draws exactly as before.
  t = np.asarray(continuous.shift_times(u, 3.0))
  assert t.min() >= 0.0 and t.max() <= 1.0
  assert np.median(t) == pytest.approx(0.25, abs=0.01)  # u / (u + 3 (1 - u)) at u = 1/2.
  assert np.all(np.diff(t.ravel()[np.argsort(np.asarray(u).ravel())]) >= 0)  # Monotone.
  # The loss sees the shifted times: record them through pred_fn.
  seen = []
  z1 = jnp.ones((64, 64, 4))

  def pred_fn(zt, t_BxN):
    seen.append(t_BxN)
    return jnp.zeros_like(zt)

  continuous.concept_loss("flow", pred_fn, z1, jnp.ones((64, 64), bool), jax.random.key(1),
                          time_shift=3.0)
  assert np.mean(np.asarray(seen[0]) < 0.25) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("objective,method", [("flow", "euler"), ("flow", "heun"), ("x0", "euler")])
def test_self_conditioned_sampler_feeds_each_call_the_estimate_before_it(objective, method):
  noise = jax.random.normal(jax.random.key(0), (4, 3, 2))
  c = jnp.array([1.5, -3.0])
  if objective == "flow":
    plain = lambda zt, t: (c - zt) / (1.0 - t[..., None] + 0.1)  # noqa: E731
  else:
    plain = lambda zt, t: c + 0.3 * zt  # noqa: E731
  # A head that ignores the estimate samples exactly as the plain sampler.
  ignores = lambda zt, t, sc: plain(zt, t)  # noqa: E731
  for end_noise in (0.0, 1.5):
    np.testing.assert_allclose(
        continuous.sample(objective, ignores, noise, 6, method, end_noise, self_condition=True),
        continuous.sample(objective, plain, noise, 6, method, end_noise), rtol=1e-6, atol=1e-6)
  # One that reads it: the same loop in numpy, each call given the last call's estimate.
  reads = lambda zt, t, sc: plain(zt, t) + 0.5 * sc  # noqa: E731
  z, sc, dt = np.asarray(noise, np.float64), np.zeros(noise.shape), 1.0 / 6
  est = lambda out, zt, t: zt + (1 - t) * out if objective == "flow" else out  # noqa: E731
  f = lambda zt, t, sc: np.asarray(reads(jnp.asarray(zt), jnp.full(zt.shape[:-1], t), sc))  # noqa: E731
  for i in range(6):
    t = i * dt
    out = f(z, t, sc)
    if objective == "x0":
      z, sc = (1 - t - dt) * (z - t * out) / (1 - t) + (t + dt) * out, out
    elif method == "heun":
      out_end = f(z + dt * out, t + dt, est(out, z, t))
      z, sc = z + 0.5 * dt * (out + out_end), est(out_end, z + dt * out, t + dt)
    else:
      z, sc = z + dt * out, est(out, z, t)
  np.testing.assert_allclose(continuous.sample(objective, reads, noise, 6, method,
                                               self_condition=True), z, rtol=1e-4, atol=1e-4)


def test_self_conditioned_loss_reads_a_first_pass_estimate_without_its_gradient():
  z1 = jax.random.normal(jax.random.key(0), (64, 32, 3))
  mask = jnp.ones((64, 32), bool)
  key = jax.random.key(1)

  def loss(w):
    pred = lambda zt, t, sc: w * zt + sc  # noqa: E731
    return continuous.concept_loss("flow", pred, z1, mask, key, self_condition=True)[0]

  # d/dw through the second pass only: the first pass's estimate is a constant.
  grad = jax.grad(loss)(0.7)
  eps = 1e-3
  seen = []

  def recorder(zt, t, sc):
    seen.append(sc)
    return 0.7 * zt + sc

  continuous.concept_loss("flow", recorder, z1, mask, key, self_condition=True)
  first, second = seen
  np.testing.assert_array_equal(first, 0.0)  # The first pass reads no estimate.
  used = np.any(np.asarray(second) != 0, -1)
  assert used.mean() == pytest.approx(continuous.SELF_CONDITION_RATE, abs=0.05)
  # Holding the estimate fixed, the finite difference of w in the second pass alone.
  sc_fixed = second

  def second_only(w):
    pred = lambda zt, t: w * zt + sc_fixed  # noqa: E731
    k_loss, _ = jax.random.split(key)
    return continuous.concept_loss("flow", pred, z1, mask, k_loss)[0]

  fd = (second_only(0.7 + eps) - second_only(0.7 - eps)) / (2 * eps)
  assert float(grad) == pytest.approx(float(fd), rel=1e-3)
