"""Model structure: axis names, exact sizes, scan/remat/bf16 paths, KV cache, masking."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.models import baselines, build, concept_model, layers, sizes
from concept_diffusion.models.concept_model import ConceptModel
from concept_diffusion.models.encoder import ConceptEncoder
from concept_diffusion.models.renderer import Renderer

AXES = {"batch", "concepts", "length", "embed", "mlp", "heads", "kv_heads", "kv", "vocab",
        "concept_embed", "head_mlp", "layers", None}


def tiny_config(**model):
  c = config_lib.base_config()
  c.data.vocab_size, c.data.concept_len, c.data.num_concepts, c.data.seq_len = 96, 8, 4, 16
  c.model.update(embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                 concept_dim=16, diff_head_dim=32, encoder_layers=2, renderer_layers=2,
                 concept_layers=2, diff_head_layers=2, baseline_layers=3)
  c.model.update(model)
  return c


def _is_box(x):
  return isinstance(x, nn.Partitioned)


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_axis_names(scan):
  c = tiny_config(scan_layers=scan, head_skip=True)
  c.render.prev_concept = True
  for stage in build.STAGE_MODULES:
    params = build.param_shapes(c, stage=stage)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_box):
      where = f"{stage}: {jax.tree_util.keystr(path)}"
      assert _is_box(leaf), f"unannotated param {where}"
      assert len(leaf.names) == leaf.value.ndim, where
      assert set(leaf.names) <= AXES, where
      assert any(n is not None for n in leaf.names), where
      assert ("layers" in leaf.names) == (scan and "layer" in where), where
    specs = nn.get_partition_spec(params)
    assert len(jax.tree.leaves(specs)) == len(jax.tree.leaves(nn.unbox(params)))


@pytest.mark.parametrize("overrides", [{}, {"num_kv_heads": 1, "scan_layers": True},
                                       {"prev_concept": True}, {"encoder_pooling": "slots"},
                                       {"head_reads_context": True}, {"head_mean": True},
                                       {"head_skip": True, "diff_head_dim": 8},
                                       {"self_condition": True}])
def test_param_count_matches_real_tree(overrides):
  c = tiny_config(**{k: v for k, v in overrides.items() if k != "prev_concept"})
  c.render.prev_concept = overrides.get("prev_concept", False)
  for stage, trained in sizes.TRAINED.items():
    params = nn.unbox(build.param_shapes(c, stage=stage))
    real = sum(x.size for name in trained for x in jax.tree.leaves(params[name]))
    assert sizes.param_count(c, stage) == real, stage


def test_flops_per_token_formula():
  c = tiny_config()
  m = c.model
  v, e, hk = c.data.vocab_size, m.embed_dim, m.num_heads * m.head_dim
  # ar: every non-embedding, non-norm weight is one matmul per token.
  norms = m.baseline_layers * 2 * e + e
  matmuls = sizes.param_count(c, "ar") - v * e - norms
  expect = 6 * matmuls + 12 * m.baseline_layers * hk * c.data.seq_len
  assert sizes.flops_per_token(c, "ar") == expect
  assert sizes.flops_per_token(c, "mdm") == expect
  for stage in ("render", "concepts"):
    assert 6 * 0.5 * sizes.param_count(c, stage) < sizes.flops_per_token(c, stage)


def _ar(c, **changes):
  cfg = dataclasses.replace(layers.ModelConfig.from_config(c), **changes)
  return baselines.TokenAR(cfg)


def test_scanned_layers_match_unscanned_and_remat():
  c = tiny_config()
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 96)
  seg = jnp.array([[1] * 10 + [2] * 6, [1] * 16])
  model = _ar(c)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, seg)["params"])
  stacked = layers.unscanned_to_scanned(params, 3)

  def loss_and_grad(m, p):
    return jax.jit(jax.value_and_grad(lambda q: m.apply({"params": q}, tokens, seg).std()))(p)

  ref_loss, ref_grad = loss_and_grad(model, params)
  for scan, remat in ((True, "none"), (True, "dots"), (False, "full")):
    loss, grad = loss_and_grad(_ar(c, scan_layers=scan, remat=remat), stacked if scan else params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    expect = layers.unscanned_to_scanned(ref_grad, 3) if scan else ref_grad
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grad, expect)


def test_bf16_compute_keeps_fp32_params():
  c = tiny_config(dtype="bfloat16")
  for stage in build.STAGE_MODULES:
    params = nn.unbox(build.param_shapes(c, stage=stage))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  model = _ar(c)
  ref_model = _ar(c, dtype="float32")
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 96)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  out = jax.jit(model.apply)({"params": params}, tokens)
  ref = jax.jit(ref_model.apply)({"params": params}, tokens)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.mean(jnp.abs(out - ref))) < 0.05 * float(jnp.mean(jnp.abs(ref)))


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_equals_full_forward(scan):
  model = _ar(tiny_config(), scan_layers=scan)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 96)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  full = jax.jit(model.apply)({"params": params}, tokens)
  cache = baselines.init_cache(model, 2, 12)
  step = jax.jit(lambda c, t: baselines.decode_step(model, params, c, t))
  prefill, cache = step(cache, tokens[:, :5])
  outs = [prefill]
  for i in range(5, 12):
    logits, cache = step(cache, tokens[:, i:i + 1])
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4, rtol=1e-4)


def test_attention_stays_inside_segments():
  c = tiny_config()
  cfg = layers.ModelConfig.from_config(c)
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 96)
  other = tokens.at[:, 10:].set(7)
  seg = jnp.array([[1] * 10 + [2] * 6])
  for model, causal in ((baselines.TokenMDM(cfg), False), (baselines.TokenAR(cfg), True)):
    params = jax.jit(model.init)(jax.random.key(0), tokens, seg)
    fwd = jax.jit(model.apply)
    a, b = fwd(params, tokens, seg), fwd(params, other, seg)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-5)  # Segment 1 never sees 2.
    later = tokens.at[:, 5].set(8)
    changed = jnp.any(jnp.abs(fwd(params, later, seg) - a) > 1e-6, -1)[0]
    assert bool(changed[4]) != causal and bool(changed[6])
  # Positions restart per document, so a document gets the same logits wherever it sits.
  shifted = jnp.concatenate([tokens[:, 10:], tokens[:, :10]], 1)
  out = fwd(params, shifted, jnp.array([[1] * 6 + [2] * 10]))
  np.testing.assert_allclose(out[:, 6:], a[:, :10], atol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "slots"])
def test_encoder_scale_and_padding(pooling):
  cfg = layers.ModelConfig.from_config(tiny_config(encoder_pooling=pooling))
  enc = ConceptEncoder(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 3, 8), 6, 96)
  mask = jnp.arange(8) < jnp.array([8, 5, 1])[:, None]
  mask = jnp.broadcast_to(mask[None], (2, 3, 8))
  params = jax.jit(enc.init)(jax.random.key(0), tokens, mask)
  fwd = jax.jit(enc.apply)
  z = fwd(params, tokens, mask)
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), np.sqrt(16), rtol=1e-3)
  z2 = fwd(params, jnp.where(mask, tokens, 0), mask)
  np.testing.assert_allclose(z, z2, atol=1e-5)


def test_slot_pooling_tells_where_each_token_stood():
  # With no layers a mean of token embeddings is a bag: swapping two tokens keeps z.
  tokens = jnp.array([[[7, 8, 9, 10, 11, 0, 0, 0]]])
  swapped = jnp.array([[[7, 10, 9, 8, 11, 0, 0, 0]]])
  mask = tokens > 0
  z = {}
  for pooling in ("mean", "slots"):
    enc = ConceptEncoder(layers.ModelConfig.from_config(tiny_config(encoder_layers=0,
                                                                    encoder_pooling=pooling)))
    params = enc.init(jax.random.key(0), tokens, mask)
    z[pooling] = [enc.apply(params, t, mask) for t in (tokens, swapped)]
  np.testing.assert_allclose(*z["mean"], atol=1e-5)
  assert float(jnp.abs(z["slots"][0] - z["slots"][1]).max()) > 1e-2
  c = tiny_config(encoder_pooling="slots")
  extra = c.data.concept_len * c.model.embed_dim * c.model.concept_dim
  assert sizes.param_count(c, "render") == sizes.param_count(tiny_config(), "render") + extra
  assert sizes.flops_per_token(c, "render") == pytest.approx(
      sizes.flops_per_token(tiny_config(), "render") + 6 * extra / c.data.concept_len)
  c.model.encoder_pooling = "max"
  with pytest.raises(config_lib.ConfigError, match="model.encoder_pooling='max'"):
    config_lib.validate(c)


def test_renderer_reads_z_and_previous_concept():
  c = tiny_config()
  c.render.prev_concept = True
  cfg = layers.ModelConfig.from_config(c)
  r = Renderer(cfg)
  tokens = jnp.full((1, 2, 8), 4)
  z = jax.random.normal(jax.random.key(1), (1, 2, 16))
  params = jax.jit(r.init)(jax.random.key(0), tokens, z, z)
  fwd = jax.jit(r.apply)
  a = fwd(params, tokens, z, z)
  assert float(jnp.abs(a - fwd(params, tokens, -z, z)).max()) > 1e-3
  assert float(jnp.abs(a - fwd(params, tokens, z, -z)).max()) > 1e-3
  assert float(jnp.abs(a[0, 0, 0] - a[0, 0, 1]).max()) > 1e-3  # Slots differ per position.


def test_head_reads_its_own_documents_past_concepts_only():
  cfg = layers.ModelConfig.from_config(tiny_config(head_reads_context=True))
  cm = ConceptModel(cfg)
  z = jax.random.normal(jax.random.key(1), (1, 5, 16))
  seg = jnp.array([[1, 1, 1, 2, 2]])
  params = jax.jit(cm.init)(jax.random.key(0), z, seg, z, jnp.zeros((1, 5)))
  params = nn.unbox(params)
  read = params["params"]["diffusion_head"]["context_read"]
  assert float(jnp.abs(read["out"]["kernel"]).max()) == 0.0  # Zero-initialised: reads nothing.
  read["out"]["kernel"] = jax.random.normal(jax.random.key(3), read["out"]["kernel"].shape)
  h = cm.apply(params, z, seg, method=cm.context)
  zt, t = jax.random.normal(jax.random.key(2), z.shape), jnp.full((1, 5), 0.4)
  head = jax.jit(lambda mem_z, mask=None: cm.apply(
      params, zt, t, h, (mem_z, *cm.apply(params, z, seg, method=cm.memory)[1:])
      if mask is None else (mem_z, mask, *cm.apply(params, z, seg, method=cm.memory)[2:]),
      method=cm.head))
  out = head(z)
  changed = head(z.at[:, 2].set(5.0))  # Concept 2 of document 1.
  np.testing.assert_allclose(out[:, :2], changed[:, :2], atol=1e-5)  # Not read before it.
  np.testing.assert_allclose(out[:, 3:], changed[:, 3:], atol=1e-5)  # Nor by document 2.
  assert float(jnp.abs(out[:, 2] - changed[:, 2]).max()) > 1e-3  # Read from position 2 on.
  # With nothing to read (guidance's null branch) the head is finite and ignores memory.
  empty = jnp.zeros((1, 5, 5), bool)
  np.testing.assert_allclose(head(z, empty), head(-z, empty), atol=1e-6)
  assert bool(jnp.all(jnp.isfinite(head(z, empty))))
  with pytest.raises(ValueError, match="head_reads_context"):
    cm.apply(params, zt, t, h, method=cm.head)


def test_head_mean_regresses_h_and_shifts_the_flow():
  cfg = layers.ModelConfig.from_config(tiny_config(head_mean=True))
  cm, plain = ConceptModel(cfg), ConceptModel(dataclasses.replace(cfg, head_mean=False))
  z = jax.random.normal(jax.random.key(1), (2, 4, 16))
  seg = jnp.array([[1, 1, 1, 1], [1, 1, 2, 2]])
  params = nn.unbox(jax.jit(cm.init)(jax.random.key(0), z, seg, z, jnp.zeros((2, 4))))
  p = params["params"]
  zt, t = jax.random.normal(jax.random.key(2), z.shape), jnp.full((2, 4), 0.3)
  h = cm.apply(params, z, seg, method=cm.context)
  head = jax.jit(lambda v, m: m.apply(v, zt, t, h, method=m.head), static_argnums=1)
  # Zero-initialised mean: at init the head is the plain one.
  without = {"params": {k: v for k, v in p.items() if k != "mean_proj"}}
  np.testing.assert_allclose(head(params, cm), head(without, plain), atol=1e-6)
  p["mean_proj"]["kernel"] = jax.random.normal(jax.random.key(3), p["mean_proj"]["kernel"].shape)
  mu = cm.apply(params, h, method=cm.mean)
  assert float(jnp.abs(mu).min()) > 0
  # The denoiser sees the residual's path: z_t + t mu under the mean is z_t without it.
  shifted = cm.apply(params, zt + t[..., None] * mu, t, h, method=cm.head)
  np.testing.assert_allclose(shifted - mu, head(without, plain), atol=1e-5)
  # A silent denoiser (zero output layer) leaves mu: the velocity is mu - z_t's noise
  # part, so the flow from zero noise lands on it and mse predicts it.
  silent = jax.tree.map(lambda x: x, params)
  silent["params"]["diffusion_head"]["out_proj"] = jax.tree.map(
      jnp.zeros_like, p["diffusion_head"]["out_proj"])
  for objective in ("flow", "x0", "mse"):
    out = concept_model.sample_from_context(cm, silent, h, jax.random.key(4),
                                            objective=objective, steps=4, noise_scale=0.0)
    np.testing.assert_allclose(out, mu, atol=1e-5, err_msg=objective)
  # The regression term: loss = the head's loss + weight x mean_loss, and it trains mu.
  key = jax.random.key(5)
  loss_fn = lambda v, w: concept_model.concept_objective(  # noqa: E731
      cm, v, z, seg > 0, seg, key, "flow", mean_weight=w)[:2]
  base, _ = loss_fn(params, 0.0)
  loss, metrics = loss_fn(params, 0.5)
  target, mask = concept_model.continuous.next_concept_targets(z, seg > 0, seg)
  want = jnp.sum(jnp.mean((mu - target) ** 2, -1) * mask) / jnp.sum(mask)
  np.testing.assert_allclose(metrics["mean_loss"], want, rtol=1e-5)
  np.testing.assert_allclose(metrics["diffusion_loss"], base, rtol=1e-6)
  np.testing.assert_allclose(loss, base + 0.5 * want, rtol=1e-5)
  # Jitted: eagerly, op by op, each op of the gradient compiles alone.
  grad = jax.jit(jax.grad(lambda v: loss_fn(v, 1.0)[0] - loss_fn(v, 0.0)[0]))(params)
  assert float(jnp.abs(grad["params"]["mean_proj"]["kernel"]).max()) > 0
  # Without a mean the weight is ignored.
  plain_params = plain.init(jax.random.key(0), z, seg, z, jnp.zeros((2, 4)))
  plain_loss = lambda w: concept_model.concept_objective(  # noqa: E731
      plain, plain_params, z, seg > 0, seg, key, "flow", mean_weight=w)[0]
  assert float(plain_loss(1.0)) == float(plain_loss(0.0))


def test_head_skip_lets_a_narrow_head_move_every_concept_dimension():
  # W = 8 < D = 16: out_proj alone spans 8 of the 16 dimensions.
  cfg = layers.ModelConfig.from_config(tiny_config(diff_head_dim=8, head_skip=True))
  cm, plain = ConceptModel(cfg), ConceptModel(dataclasses.replace(cfg, head_skip=False))
  z = jax.random.normal(jax.random.key(1), (2, 4, 16))
  seg = jnp.ones((2, 4), jnp.int32)
  params = nn.unbox(jax.jit(cm.init)(jax.random.key(0), z, seg, z, jnp.zeros((2, 4))))
  p = params["params"]
  h = cm.apply(params, z, seg, method=cm.context)[:1, :1]
  zt_Mx1x16 = jax.random.normal(jax.random.key(2), (64, 1, 16))
  h_Mx1xE = jnp.broadcast_to(h[0], (64, 1, h.shape[-1]))
  t_Mx1 = jnp.full((64, 1), 0.5)
  head = lambda v, m: m.apply(v, zt_Mx1x16, t_Mx1, h_Mx1xE, method=m.head)[:, 0]  # noqa: E731
  # Zero-initialised: at init the head is the plain one.
  without = {"params": {**p, "diffusion_head": {k: v for k, v in p["diffusion_head"].items()
                                                if k != "skip"}}}
  np.testing.assert_allclose(head(params, cm), head(without, plain), atol=1e-6)
  # Trained (here: random) outputs over many z_t of one context: rank <= W without the
  # skip, all D dimensions with it.
  rank = lambda out_MxD: int(np.linalg.matrix_rank(np.asarray(out_MxD - out_MxD.mean(0)),  # noqa: E731
                                                   tol=1e-4))
  p["diffusion_head"]["final_modulation"]["kernel"] = jax.random.normal(
      jax.random.key(3), p["diffusion_head"]["final_modulation"]["kernel"].shape)
  assert rank(head(without, plain)) <= 8
  affine = p["diffusion_head"]["skip"]["affine"]
  affine["kernel"] = jax.random.normal(jax.random.key(4), affine["kernel"].shape)
  assert rank(head(params, cm)) == 16
  # A flow sample moves its starting noise by the head's outputs: in 8 dimensions
  # without the skip (the rest of the noise is left as it was), in all 16 with it.
  key = jax.random.key(5)
  noise_Mx1x16 = jax.random.normal(key, zt_Mx1x16.shape)
  moved = lambda v, m: (concept_model.sample_from_context(  # noqa: E731
      m, v, h_Mx1xE, key, objective="flow", steps=4) - noise_Mx1x16)[:, 0]
  assert rank(moved(without, plain)) <= 8
  assert rank(moved(params, cm)) == 16


def test_head_reads_context_is_validated():
  c = tiny_config(head_reads_context=True, diff_head_dim=30)
  with pytest.raises(config_lib.ConfigError, match="model.diff_head_dim=30"):
    config_lib.validate(c)


def test_concept_model_is_causal_and_drops_context():
  cfg = layers.ModelConfig.from_config(tiny_config())
  cm = ConceptModel(cfg)
  z = jax.random.normal(jax.random.key(1), (1, 5, 16))
  seg = jnp.array([[1, 1, 1, 2, 2]])
  params = jax.jit(cm.init)(jax.random.key(0), z, seg, z, jnp.zeros((1, 5)))
  context = jax.jit(lambda p, z, drop=None: cm.apply(p, z, seg, drop, method=cm.context))
  h = context(params, z)
  h2 = context(params, z.at[:, 2].set(0.0))
  np.testing.assert_allclose(h[:, :2], h2[:, :2], atol=1e-5)  # Causal.
  np.testing.assert_allclose(h[:, 3:], h2[:, 3:], atol=1e-5)  # Other document.
  drop = jnp.array([[False, True, False, False, True]])
  hd = context(params, z, drop)
  null = params["params"]["null_context"].value
  np.testing.assert_allclose(hd[0, 1], null)
  np.testing.assert_allclose(hd[0, 0], h[0, 0])
  out = cm.apply(params, z, jnp.full((1, 5), 0.3), hd, method=cm.head)
  assert out.shape == (1, 5, 16)


def test_cudnn_attention_is_refused_off_gpu():
  c = tiny_config(attention="cudnn", dtype="bfloat16")
  if jax.default_backend() == "gpu":
    pytest.skip("has a GPU")
  with pytest.raises(ValueError, match="model.attention='cudnn'"):
    build.build_models(c, stage="ar")


def test_build_models_per_stage():
  c = tiny_config()
  assert set(build.build_models(c, stage="render")) == {"encoder", "renderer"}
  assert set(build.build_models(c, stage="concepts")) == {"encoder", "concept_model"}
  assert isinstance(build.build_models(c, 100, stage="ar")["ar"], baselines.TokenAR)
  assert build.build_models(c, 100, stage="mdm")["mdm"].cfg.vocab_size == 100
  with pytest.raises(ValueError, match="stage"):
    build.build_models(c, stage="nope")


@pytest.mark.parametrize("reads", [False, True])
def test_concept_objectives_and_guided_sampling_run(reads):
  cfg = layers.ModelConfig.from_config(tiny_config(head_reads_context=reads))
  cm = ConceptModel(cfg)
  z = jax.random.normal(jax.random.key(1), (2, 4, 16))
  seg = jnp.array([[1, 1, 2, 2], [1, 1, 1, 0]])
  params = jax.jit(cm.init)(jax.random.key(0), z, seg, z, jnp.zeros((2, 4)))

  @jax.jit
  def run(p, key):
    losses = [concept_model.concept_objective(cm, p, z, seg > 0, seg, key, obj, 0.5)[0]
              for obj in ("flow", "x0", "mse")]
    samples = [concept_model.sample_next_concepts(cm, p, z, seg, key, objective=obj, steps=3,
                                                  guidance=2.0, method=method)
               for obj, method in (("flow", "heun"), ("x0", "euler"), ("mse", "euler"))]
    return losses, samples

  losses, samples = run(params, jax.random.key(2))
  assert all(bool(jnp.isfinite(x)) for x in losses)
  assert all(s.shape == z.shape and bool(jnp.all(jnp.isfinite(s))) for s in samples)
