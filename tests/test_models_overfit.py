"""Tiny models memorise one fixed batch on CPU: every training path can learn."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from concept_diffusion.diffusion import continuous, masked
from concept_diffusion.models import baselines, concept_model, layers
from concept_diffusion.models.encoder import ConceptEncoder
from concept_diffusion.models.renderer import Renderer

MASK, PAD = 4, 0
CFG = layers.ModelConfig(vocab_size=64, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                         mlp_dim=128, concept_dim=32, concept_len=8, encoder_layers=2,
                         renderer_layers=2, concept_layers=2, diff_head_layers=2,
                         diff_head_dim=64, baseline_layers=2)


def fit(loss_fn, params, steps, lr=3e-3):
  """Adam on loss_fn(params, key) for `steps` steps in one compiled scan -> (params, losses)."""
  opt = optax.adam(lr)

  def step(carry, key):
    p, s = carry
    loss, grads = jax.value_and_grad(loss_fn)(p, key)
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  keys = jax.random.split(jax.random.key(7), steps)
  (params, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), keys))(params)
  return params, losses


def test_renderer_reads_z_with_every_position_masked():
  """DESIGN lesson 1: 64 random 8-token chunks, all masked, rendered from z alone."""
  tokens = jax.random.randint(jax.random.key(0), (8, 8, 8), 6, 64)
  mask = jnp.ones(tokens.shape, bool)
  enc, ren = ConceptEncoder(CFG), Renderer(CFG)
  z0 = jnp.zeros((8, 8, 32))
  params = {"enc": jax.jit(enc.init)(jax.random.key(1), tokens, mask),
            "ren": jax.jit(ren.init)(jax.random.key(2), tokens, z0, None, mask)}

  def logits_fn(p, toks):
    return ren.apply(p["ren"], toks, enc.apply(p["enc"], tokens, mask), None, mask)

  def loss_fn(p, key):
    return masked.masked_diffusion_loss(lambda x: logits_fn(p, x), tokens, mask, MASK, key,
                                        full_mask_prob=1.0)[0]

  params, losses = fit(loss_fn, params, 100)
  logits = jax.jit(logits_fn)(params, jnp.full_like(tokens, MASK))
  acc = jnp.mean(jnp.argmax(logits, -1) == tokens)
  assert float(acc) >= 0.99, (float(acc), losses[::50])
  # Trained only fully masked, so render in one step (partial inputs are unseen).
  out = jnp.argmax(logits, -1)  # = masked.sample with steps=1 (temperature 0).
  np.testing.assert_array_equal(out, tokens)


def test_renderer_learns_under_masked_diffusion_mixture():
  """The render-stage objective (half fully masked, t skewed high) also fits one batch."""
  tokens = jax.random.randint(jax.random.key(0), (4, 4, 8), 6, 64)
  mask = jnp.arange(8) < jax.random.randint(jax.random.key(5), (4, 4, 1), 3, 9)
  tokens = jnp.where(mask, tokens, PAD)
  enc, ren = ConceptEncoder(CFG), Renderer(CFG)
  params = {"enc": jax.jit(enc.init)(jax.random.key(1), tokens, mask),
            "ren": jax.jit(ren.init)(jax.random.key(2), tokens, jnp.zeros((4, 4, 32)), None, mask)}

  def loss_fn(p, key):
    z = enc.apply(p["enc"], tokens, mask)
    fn = lambda x: ren.apply(p["ren"], x, z, None, mask)  # noqa: E731
    return masked.masked_diffusion_loss(fn, tokens, mask, MASK, key, full_mask_prob=0.5,
                                        mask_rate_dist="high")[0]

  params, losses = fit(loss_fn, params, 300)
  assert float(losses[-20:].mean()) < 0.05 * float(losses[:5].mean()), losses[::20]

  @jax.jit
  def render(p):
    z = enc.apply(p["enc"], tokens, mask)
    return masked.sample(lambda x: ren.apply(p["ren"], x, z, None, mask), jax.random.key(3),
                         mask, mask_id=MASK, pad_id=PAD, steps=4)

  out = render(params)
  assert float(jnp.mean((out == tokens)[mask])) >= 0.99
  assert bool(jnp.all(jnp.where(mask, True, out == PAD)))


@pytest.mark.parametrize("objective", ["mse", "flow"])
def test_concept_model_fits_next_concepts(objective):
  z = layers.layer_norm(jax.random.normal(jax.random.key(0), (4, 6, 32)))
  seg = jnp.array([[1, 1, 1, 2, 2, 2], [1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 2, 2, 3, 3]])
  cmask = seg > 0
  cm = concept_model.ConceptModel(CFG)
  params = jax.jit(cm.init)(jax.random.key(1), z, seg, z, jnp.zeros((4, 6)))

  def loss_fn(p, key):
    return concept_model.concept_objective(cm, p, z, cmask, seg, key, objective)[0]

  params, losses = fit(loss_fn, params, 300 if objective == "mse" else 400)
  target, tmask = continuous.next_concept_targets(z, cmask, seg)
  pred = jax.jit(lambda p: concept_model.sample_next_concepts(
      cm, p, z, seg, jax.random.key(2), objective=objective, steps=16))(params)
  cos = jnp.sum(pred * target, -1) / (jnp.linalg.norm(pred, axis=-1) * np.sqrt(32))
  assert float(cos[tmask].min()) > 0.9, (losses[::50], cos[tmask])
  if objective == "mse":
    assert float(losses[-10:].mean()) < 0.01, losses[::50]
  else:
    assert float(losses[-10:].mean()) < 0.2 * float(losses[:5].mean()), losses[::50]


def test_token_ar_memorises_batch():
  tokens = jax.random.randint(jax.random.key(0), (4, 16), 6, 64)
  seg = jnp.ones((4, 16), jnp.int32)
  model = baselines.TokenAR(CFG)
  params = jax.jit(model.init)(jax.random.key(1), tokens, seg)

  def loss_fn(p, key):
    logits = model.apply(p, tokens[:, :-1], seg[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  _, losses = fit(loss_fn, params, 100)
  assert float(losses[-1]) < 0.05, losses[::25]


def test_token_mdm_fits_batch():
  tokens = jax.random.randint(jax.random.key(0), (4, 16), 6, 64)
  seg = jnp.array([[1] * 16, [1] * 8 + [2] * 8, [1] * 16, [1] * 12 + [0] * 4])
  valid = seg > 0
  model = baselines.TokenMDM(CFG)
  params = jax.jit(model.init)(jax.random.key(1), tokens, seg)

  def loss_fn(p, key):
    fn = lambda x: model.apply(p, x, seg)  # noqa: E731
    return masked.masked_diffusion_loss(fn, tokens, valid, MASK, key)[0]

  bits_fn = jax.jit(lambda p: masked.elbo_bits(lambda x: model.apply(p, x, seg), tokens, valid,
                                                MASK, jax.random.key(3), num_samples=16))
  before = float(bits_fn(params))
  params, _ = fit(loss_fn, params, 300)
  # Uniform guessing is log2(58) ~ 5.9 bits; the floor for 4 memorised sequences is ~0.14.
  assert float(bits_fn(params)) < 0.3 * before
