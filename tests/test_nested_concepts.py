"""Nested concepts: a render stage trained on prefixes of each concept (render.nested_dims),
and generation that renders a prefix of each sample (concepts.render_dims)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion import evaluation, generate
from concept_diffusion.models import renderer
from concept_diffusion.models.layers import ModelConfig
from concept_diffusion.train import stages
from concept_diffusion.train.state import unbox

from conftest import _train_in_process, _trained, jit_call, tiny_config
from test_concept_knobs import _render_batch, _Tok

NESTED = (8, 16, 32)  # The tiny presets' concepts are 32 wide (conftest.TINY).
PROMPTS = ["Mara lives in Oslo. Mara has a dog.", "Tovin works as a baker.",
           "Ilse paints the fence red. Ilse owns a cat.", "Bram moved to Lima."]


def test_concept_prefix_zeroes_every_dimension_from_dims_on():
  z = jax.random.normal(jax.random.key(0), (2, 3, 6)) + 3.0  # No zero by chance.
  np.testing.assert_array_equal(renderer.concept_prefix(z, 0), z)
  np.testing.assert_array_equal(renderer.concept_prefix(z, 6), z)
  cut = np.asarray(renderer.concept_prefix(z, 2))
  np.testing.assert_array_equal(cut[..., :2], z[..., :2])
  assert (cut[..., 2:] == 0).all()
  dims_BxN = jnp.array([[1, 6, 3], [2, 2, 5]])  # One prefix per chunk.
  per_chunk = np.asarray(renderer.concept_prefix(z, dims_BxN))
  for b in range(2):
    for n in range(3):
      k = int(dims_BxN[b, n])
      np.testing.assert_array_equal(per_chunk[b, n, :k], z[b, n, :k])
      assert (per_chunk[b, n, k:] == 0).all()


def test_nested_training_cuts_each_chunk_to_a_prefix_and_evaluation_to_none(monkeypatch):
  seen, prefix = [], renderer.concept_prefix

  def recording_prefix(z, dims):  # Under the loss's jit: records the prefixes as they run.
    jax.debug.callback(lambda d: seen.append(np.asarray(d)), dims)
    return prefix(z, dims)

  config = tiny_config("render")
  batch, key = _render_batch(config, batch_size=32), jax.random.key(0)
  losses = {}
  for nested in ((), NESTED):
    config.render.nested_dims = nested
    stage = stages.build_stage(config, _Tok())
    params = unbox(stage.init_params(jax.random.key(1)))
    monkeypatch.setattr(stages.renderer, "concept_prefix", recording_prefix)
    held_out = float(stage.held_out_loss_fn()(params, batch, key)[0])
    assert not seen  # The held-out loss renders whole concepts.
    losses[nested] = (float(stage.loss_fn(params, batch, key)[0]), held_out)
    monkeypatch.undo()
  # One prefix per chunk, each of the three about a third of the 32 x 8 chunks.
  (dims_BxN,) = seen
  assert dims_BxN.shape == (32, 8) and set(np.unique(dims_BxN)) == set(NESTED)
  for k in NESTED:
    assert (dims_BxN == k).mean() == pytest.approx(1 / 3, abs=0.1)
  assert losses[()][0] != losses[NESTED][0]  # Training renders the prefixes ...
  assert losses[()][1] == losses[NESTED][1]  # ... the held-out loss never does.


@pytest.mark.parametrize("nested", [(8, 16), (16, 8, 32), (0, 32), (8.0, 32), (8, 8, 32)])
def test_bad_nested_dims_are_refused_by_name(nested):
  config = tiny_config("render")
  config.render.nested_dims = nested
  with pytest.raises(config_lib.ConfigError, match="render.nested_dims"):
    config_lib.validate(config)


@pytest.mark.parametrize("dims", [-1, 33])
def test_bad_render_dims_are_refused_by_name(dims):
  config = tiny_config("render")
  config.concepts.render_dims = dims
  with pytest.raises(config_lib.ConfigError, match="concepts.render_dims"):
    config_lib.validate(config)


def test_the_render_program_reads_the_prefix_and_tests_the_end_on_the_whole_concept():
  r = renderer.Renderer(ModelConfig.from_config(tiny_config("render"), 256))
  z = jax.random.normal(jax.random.key(1), (2, 3, 32))
  params = jax.jit(r.init)(jax.random.key(0), jnp.zeros((2, 3, 8), jnp.int32), z)["params"]
  key = jax.random.key(3)
  opts = generate.ConceptOptions(render_steps=4, end_cosine=0.999, render_dims=8)
  z_end = z[0, 1]  # Chunk (0, 1) is the END concept as a whole, not as its prefix.
  tokens, end, _ = generate._render_program(r, params, z, z, z_end, key, opts)
  cut = renderer.concept_prefix(z, 8)
  np.testing.assert_array_equal(tokens, generate.render_chunks(r, params, cut, cut, key, steps=4))
  assert bool(end[0, 1]) and not bool(end[1, 1])


@pytest.fixture(scope="module")
def nested_runs(tmp_path_factory):
  """A tiny render run on nested concepts, and a concepts run over it."""
  render = _trained(tmp_path_factory, "render_nested",
                    _train_in_process("render", **{"render.nested_dims": NESTED}))
  concepts = _trained(tmp_path_factory, "concepts_nested", _train_in_process(
      "concepts", **{"concepts.render_workdir": render}))
  return render, concepts


def _texts(samples):
  return [s.token_ids for s in samples]


@pytest.mark.parametrize("reencode", [False, True])
def test_generation_renders_the_prefix_of_the_same_samples(nested_runs, reencode):
  gen = generate.load(nested_runs[1])
  run = lambda **kw: _texts(generate.generate(gen, PROMPTS, num_concepts=4, seed=2,
                                              reencode=reencode, **kw))
  whole = run(render_dims=0)
  assert run(render_dims=32) == whole  # The whole concept: bit for bit the same.
  assert run(render_dims=8) != whole  # A quarter of it renders other text.
  gen.config.concepts.render_dims = 8  # The config's default is the one used.
  assert run() == run(render_dims=8)


def test_the_round_trip_and_its_metrics_render_the_prefix(nested_runs):
  render_gen = generate.load(nested_runs[0])
  texts = ["Mara has a dog. Mara lives in Oslo.", "Tovin works as a baker."]
  whole = _texts(generate.roundtrip(render_gen, texts))
  assert _texts(generate.roundtrip(render_gen, texts, render_dims=32)) == whole
  assert _texts(generate.roundtrip(render_gen, texts, render_dims=8)) != whole
  config = evaluation.eval_config(render_gen)
  batches = lambda: evaluation.eval_batches(config, render_gen.tokenizer, "concepts", 8, 1)
  key = jax.random.key(0)
  m = {k: evaluation.render_metrics(render_gen, batches(), key, render_dims=k) for k in (0, 8, 32)}
  assert m[32] == m[0]
  assert m[8]["elbo_bits_per_token"] > m[0]["elbo_bits_per_token"]  # Less of z, more bits.


def test_render_dims_need_a_nested_render_run_and_a_prefix_of_it(nested_runs, tiny_render_run,
                                                                 tiny_concepts_run, tmp_path):
  whole = generate.load(tiny_concepts_run)  # Its render run trained on whole concepts.
  with pytest.raises(generate.GenerateError, match="render.nested_dims is empty"):
    generate.generate(whole, PROMPTS[:1], render_dims=8)
  with pytest.raises(generate.GenerateError, match="render.nested_dims is empty"):
    generate.roundtrip(whole, PROMPTS[:1], render_dims=8)
  # Training over it with the presets' render_dims is refused before anything is written.
  from concept_diffusion import train
  workdir = tmp_path / "refused"
  with pytest.raises(config_lib.ConfigError, match="render_dims=16 renders a prefix"):
    train.train(tiny_config("concepts", **{"concepts.render_workdir": tiny_render_run,
                                           "concepts.render_dims": 16}), str(workdir))
  assert not workdir.exists()
  nested = generate.load(nested_runs[1])
  for bad in (-1, 33):
    with pytest.raises(generate.GenerateError, match=f"render_dims={bad} must"):
      generate.generate(nested, PROMPTS[:1], render_dims=bad)
  assert generate.checked_render_dims(whole, None) == 0  # Nothing asked: whole concepts.


# concepts.loss_dims: the head fitted on the prefix a nested render run renders.


def _head_grads(loss_dims: int):
  """Gradients of the concepts objective (with the head's mean) at loss_dims."""
  from concept_diffusion.models import concept_model
  cfg = ModelConfig.from_config(tiny_config("concepts", **{"model.head_mean": True}), 256)
  cm = concept_model.ConceptModel(cfg)
  z = jax.random.normal(jax.random.key(0), (2, 4, 32))
  seg = jnp.ones((2, 4), jnp.int32)
  params = unbox(jax.jit(cm.init)(jax.random.key(1), z, seg, z, jnp.zeros((2, 4))))["params"]
  # The mean starts at zero (its init): move it, so its tail reaches the head's input.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if "mean_proj" in jax.tree_util.keystr(p) else x, params)

  def loss(params, which):
    out = concept_model.concept_objective(cm, {"params": params}, z, seg > 0, seg,
                                          jax.random.key(2), mean_weight=1.0,
                                          loss_dims=loss_dims)
    return out[1][which]

  # Jitted: eagerly each of the gradient's ops compiles alone (230 compiles).
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  return {w: grad(params, w) for w in ("diffusion_loss", "mean_loss")}


def test_loss_dims_fit_the_head_and_its_mean_on_the_prefix_only():
  for dims in (0, 8):
    grads = _head_grads(dims)
    out_kernel = np.asarray(grads["diffusion_loss"]["diffusion_head"]["out_proj"]["kernel"])
    mean_kernel = np.asarray(grads["mean_loss"]["mean_proj"]["kernel"])
    for kernel in (out_kernel, mean_kernel):  # [width, concept_dim]: one column a dimension.
      assert np.abs(kernel[:, :8]).max() > 0
      tail = np.abs(kernel[:, 8:]).max()
      assert tail == 0 if dims else tail > 0


def test_loss_dims_average_the_error_over_the_prefix():
  from concept_diffusion.diffusion import continuous
  z1 = jax.random.normal(jax.random.key(0), (2, 3, 16))
  mask = jnp.ones((2, 3), bool)
  pred = jax.random.normal(jax.random.key(1), (2, 3, 16))
  tail_moved = pred.at[..., 4:].add(5.0)
  loss = lambda p, dims: float(continuous.concept_loss("mse", lambda zt, t: p, z1, mask, None,
                                                       dims=dims)[0])
  assert loss(pred, 4) == pytest.approx(float(jnp.mean(jnp.square(pred - z1)[..., :4])))
  assert loss(tail_moved, 4) == loss(pred, 4)
  assert loss(tail_moved, 0) > loss(pred, 0)


@pytest.mark.parametrize("over,match", [
    ({"concepts.loss_dims": 33}, "concepts.loss_dims=33 must"),
    ({"concepts.loss_dims": -1}, "concepts.loss_dims=-1 must"),
    ({"concepts.loss_dims": 16, "concepts.render_dims": 0},
     r"0 < concepts.render_dims <= loss_dims \(got 0\)"),
    ({"concepts.loss_dims": 16, "concepts.render_dims": 24}, r"\(got 24\)"),
    ({"concepts.loss_dims": 16, "concepts.render_dims": 8, "concepts.reencode": False},
     r"concepts.reencode=True \(got False\)"),
    ({"concepts.loss_dims": 16, "concepts.render_dims": 8, "concepts.render_weight": 1.0},
     r"concepts.render_weight=0 \(got 1.0\)"),
])
def test_bad_loss_dims_are_refused_by_name(over, match):
  base = {"concepts.reencode": True, "concepts.render_workdir": "runs/render"}
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(tiny_config("concepts", **{**base, **over}))
  good = tiny_config("concepts", **{**base, "concepts.loss_dims": 16, "concepts.render_dims": 8})
  config_lib.validate(good)


def test_the_sampler_cuts_each_sample_to_the_modelled_prefix():
  from concept_diffusion.models import concept_model
  cfg = ModelConfig.from_config(tiny_config("concepts"), 256)
  cm = concept_model.ConceptModel(cfg)
  prompt = jax.random.normal(jax.random.key(0), (2, 3, 32))
  seg = jnp.ones((2, 3), jnp.int32)
  params = unbox(jax.jit(cm.init)(jax.random.key(1), prompt, seg, prompt,
                                  jnp.zeros((2, 3))))["params"]
  z_end = jnp.zeros((32,)).at[0].set(1.0)  # Far from every sample: nothing ends.
  loop = lambda dims: np.asarray(jit_call(
      generate.concept_loop, cm, params, prompt, jnp.array([3, 2]), z_end, jax.random.key(2),
      num_new=1, objective="flow", steps=4, guidance=1.0, noise_scale=1.0, end_cosine=0.999,
      model_dims=dims)[0])
  whole, cut = loop(0), loop(8)
  np.testing.assert_array_equal(cut[..., :8], whole[..., :8])  # The same sample, ...
  assert (cut[..., 8:] == 0).all() and np.abs(whole[..., 8:]).min() > 0  # ... cut.


def test_generation_from_a_prefix_head_renders_inside_the_prefix(nested_runs):
  gen = generate.load(nested_runs[1])
  gen.config.concepts.update(loss_dims=16, render_dims=8, reencode=True)
  assert _texts(generate.generate(gen, PROMPTS[:2], num_concepts=2, seed=1))
  with pytest.raises(generate.GenerateError, match="never modelled"):
    generate.generate(gen, PROMPTS[:1], render_dims=24)
  with pytest.raises(generate.GenerateError, match="never modelled"):
    generate.generate(gen, PROMPTS[:1], render_dims=0)
  with pytest.raises(generate.GenerateError, match="reencode=True"):
    generate.generate(gen, PROMPTS[:1], reencode=False)


def test_next_concept_metrics_of_a_prefix_head_compare_the_prefix(nested_runs, monkeypatch):
  seen = []
  sums = evaluation.next_concept_sums
  monkeypatch.setattr(evaluation, "next_concept_sums",
                      lambda pred, target, valid: seen.append(pred.shape[-1]) or sums(
                          pred, target, valid))
  for dims in (0, 16):
    gen = generate.load(nested_runs[1])  # A fresh load: its programs are cached per run.
    gen.config.concepts.update(loss_dims=dims, render_dims=min(dims, 8), reencode=True)
    config = evaluation.eval_config(gen)
    batches = evaluation.eval_batches(config, gen.tokenizer, "concepts", 4, 1)
    evaluation.concept_metrics(gen, batches, jax.random.key(0))
  assert seen == [32, 16]
