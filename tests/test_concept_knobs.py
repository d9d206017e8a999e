"""The knobs of the concept-generation grid (issue 7): granularity, objective mixes,
z-noise augmentation (its per-chunk std; off at evaluation), rendering from generated
concepts, the contrastive term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.data import make_dataset, make_tokenizer, segment
from concept_diffusion.data.tokenizer import EOD_ID, PAD_ID
from concept_diffusion.diffusion import continuous, masked
from concept_diffusion.train import stages
from concept_diffusion.train.state import unbox

from conftest import jit_call, tiny_config


def _data_config(granularity: str, concept_len: int):
  config = config_lib.base_config()
  config.data.update(vocab_size=128, tokenizer_docs=150, eval_docs=24, num_concepts=8,
                     concept_len=concept_len, granularity=granularity)
  config.train.batch_size = 4
  return config


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return make_tokenizer(_data_config("span", 8), str(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("granularity,concept_len", [("sentence", 16), ("sentence_capped", 8),
                                                     ("sentence_capped", 16), ("span", 8),
                                                     ("span", 16)])
def test_each_granularity_makes_valid_batches(tok, granularity, concept_len):
  config = _data_config(granularity, concept_len)
  it = iter(make_dataset(config, tok, split="train", view="concepts"))
  for _ in range(3):
    b = next(it)
    tokens, token_mask, concept_mask = b["tokens"], b["token_mask"], b["concept_mask"]
    assert tokens.shape == (4, 8, concept_len)
    assert (tokens[~token_mask] == PAD_ID).all() and (token_mask[..., 1:] <= token_mask[..., :-1]).all()
    assert token_mask[concept_mask][:, 0].all() and not token_mask[~concept_mask].any()
    real = tokens[concept_mask]
    end = (real[:, 0] == EOD_ID) & (token_mask[concept_mask].sum(-1) == 1)
    lengths = token_mask[concept_mask].sum(-1)[~end]
    if granularity == "span":  # Fixed spans: only a document's last chunk may be short.
      assert (lengths == concept_len).mean() > 0.5
    else:  # Sentence chunks end at a sentence end unless capped mid-sentence.
      pieces = [tok.decode([int(t) for t in row if t != PAD_ID]) for row in real[~end]]
      closed = [p.rstrip().endswith(".") for p in pieces]
      full = lengths == concept_len
      assert all(c or f for c, f in zip(closed, full))
      if granularity == "sentence":
        assert all(closed[i] for i in range(len(pieces)) if not full[i])


def test_sentence_granularity_truncates_where_capped_splits(tok):
  doc = segment.tokenize_document(tok, "Mara moved the lamp from the attic to the garden.")
  cut, _ = segment.chunk_document(doc, "sentence", 4)
  split, _ = segment.chunk_document(doc, "sentence_capped", 4)
  assert len(cut) == 2 and len(split) > 2  # Sentence + END vs several pieces + END.


@pytest.mark.parametrize("full_mask_prob,dist,mean_rest", [(0.5, "high", 2 / 3),
                                                           (0.0, "uniform", 1 / 2),
                                                           (0.25, "uniform", 1 / 2)])
def test_objective_mix_gives_the_stated_mask_rates(full_mask_prob, dist, mean_rest):
  """Share of fully masked chunks = full_mask_prob (+ the rate's own mass at 1); the rest
  follow the mask-rate distribution (mean 1/2 uniform, 2/3 high)."""
  m, l = 4000, 256
  seen = []

  def logits_fn(x):
    seen.append(x)
    return jnp.zeros((*x.shape, 8))

  masked.masked_diffusion_loss(logits_fn, jnp.full((m, l), 7), jnp.ones((m, l), bool), 5,
                               jax.random.key(3), full_mask_prob=full_mask_prob,
                               mask_rate_dist=dist)
  frac_M = np.asarray(seen[0] == 5).mean(-1)
  full_M = frac_M == 1.0
  # A drawn rate near 1 can also mask all l tokens: P = E[t^l] under the rate distribution.
  t = np.asarray(masked.mask_rate(jax.random.key(9), 100_000, dist), np.float64)
  expected_full = full_mask_prob + (1 - full_mask_prob) * np.mean(t ** l)
  assert full_M.mean() == pytest.approx(expected_full, abs=0.02)
  assert frac_M[~full_M].mean() == pytest.approx(mean_rest, abs=0.03)


def _render_batch(config, seed=0, batch_size=2):
  rng = np.random.default_rng(seed)
  b, n, l = batch_size, config.data.num_concepts, config.data.concept_len
  tokens = rng.integers(6, 200, (b, n, l)).astype(np.int32)
  lengths = rng.integers(1, l + 1, (b, n))
  token_mask = np.arange(l) < lengths[..., None]
  tokens = np.where(token_mask, tokens, PAD_ID)
  return {"tokens": jnp.asarray(tokens), "token_mask": jnp.asarray(token_mask),
          "concept_mask": jnp.ones((b, n), bool), "segment_ids": jnp.ones((b, n), jnp.int32)}


class _Tok:
  vocab_size = 256


def test_z_noise_is_on_in_training_and_off_at_evaluation():
  config = tiny_config("render", **{"render.nested_dims": ()})  # Noise alone.
  batch, key = _render_batch(config), jax.random.key(0)
  losses = {}
  for noise in (0.0, 5.0):
    config.render.z_noise = noise
    stage = stages.build_stage(config, _Tok())
    params = unbox(stage.init_params(jax.random.key(1)))
    losses[noise] = (float(stage.loss_fn(params, batch, key)[0]),
                     float(stage.held_out_loss_fn()(params, batch, key)[0]))
  assert losses[0.0][0] != losses[5.0][0]  # Training sees the noise ...
  assert losses[0.0][1] == losses[5.0][1]  # ... the held-out loss never does.
  assert losses[0.0][0] == pytest.approx(losses[0.0][1])  # Noise 0: the same loss.


def test_z_noise_dist_draws_each_chunks_std_and_is_off_at_evaluation():
  r = config_lib.base_config().render
  r.z_noise = 2.0
  key = jax.random.key(3)
  np.testing.assert_array_equal(stages.z_noise_std(r, key, (4, 8)), np.full((4, 8), 2.0))
  r.z_noise_dist = "uniform"
  std = np.asarray(stages.z_noise_std(r, key, (256, 64)))
  assert std.min() >= 0.0 and std.max() <= 2.0
  assert std.mean() == pytest.approx(1.0, abs=0.02)  # U[0, 2]: mean 1, one draw per chunk.
  assert np.quantile(std, 0.1) == pytest.approx(0.2, abs=0.03)
  # In the stage: the training loss sees the drawn stds, the held-out loss no noise.
  config = tiny_config("render")
  batch = _render_batch(config)
  losses = {}
  for dist in ("constant", "uniform"):
    config.render.update(z_noise=5.0, z_noise_dist=dist)
    stage = stages.build_stage(config, _Tok())
    params = unbox(stage.init_params(jax.random.key(1)))
    losses[dist] = (float(stage.loss_fn(params, batch, key)[0]),
                    float(stage.held_out_loss_fn()(params, batch, key)[0]))
  assert losses["constant"][0] != losses["uniform"][0]
  assert losses["constant"][1] == losses["uniform"][1]
  config.render.z_noise_dist = "gaussian"
  with pytest.raises(config_lib.ConfigError, match="render.z_noise_dist"):
    config_lib.validate(config)


def test_generated_concepts_are_teacher_forced_samples_of_the_next_concept(tiny_concepts_run):
  from concept_diffusion import generate
  from concept_diffusion.models import concept_model
  gen = generate.load(tiny_concepts_run)
  cm = generate.build_modules(gen)["concept_model"]
  z = jax.random.normal(jax.random.key(0), (2, 6, gen.config.model.concept_dim))
  seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  variables = {"params": gen.params["concept_model"]}
  zgen, valid = jit_call(stages.generated_concepts, cm, variables, z, seg > 0, seg,
                         jax.random.key(1), objective="mse", steps=1, guidance=1.0)
  # First concept of each document and padding have no context.
  np.testing.assert_array_equal(valid, [[0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 1, 1]])
  pred = jit_call(concept_model.sample_next_concepts, cm, variables, z, seg, jax.random.key(1),
                  objective="mse", steps=1)
  np.testing.assert_allclose(zgen[:, 1:], pred[:, :-1], atol=1e-5)


def test_render_finetune_on_generated_concepts(tiny_concepts_run, tiny_render_run, tmp_path):
  """Starts from the render run, keeps encoder and concept model frozen, and is what
  generation renders with when named as the render run."""
  from concept_diffusion import generate, train
  config = tiny_config("render", **{"render.generated_from": tiny_concepts_run,
                                    "data.fill_examples": False,
                                    "render.generated_prob": 1.0, "train.num_steps": 4,
                                    "checkpoint.every_steps": 4, "data.vocab_size": 999})
  workdir = str(tmp_path / "ft")
  train.train(config, workdir)
  _, _, base = train.restore_params(tiny_render_run)
  saved, tok, ft = train.restore_params(workdir)
  assert saved.data.vocab_size == 256  # Chunking and tokenizer come from the render run.
  _, _, cm = train.restore_params(tiny_concepts_run)
  same = lambda a, b: all(bool(jnp.all(x == y)) for x, y in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))
  assert same(ft["encoder"], base["encoder"]) and same(ft["concept_model"], cm["concept_model"])
  assert not same(ft["renderer"], base["renderer"])  # Warm-started, then trained.
  gen = generate.load(tiny_concepts_run, render_workdir=workdir)
  assert same(gen.render_params["renderer"], ft["renderer"])
  assert len(generate.generate(gen, ["Mara lives in Oslo."], num_concepts=2)) == 1


def test_render_finetune_counts_and_samples_its_concepts_as_generation_does(tiny_concepts_run):
  from concept_diffusion import experiment
  from concept_diffusion.models import concept_model, sizes
  config = stages.resolve_config(tiny_config("render", **{
      "render.generated_from": tiny_concepts_run, "data.fill_examples": False}))
  cm = stages._resolved(config.render, "concepts_config", "render.generated_from")
  n, vocab = config.data.num_concepts, 256
  flops = lambda steps, guided: sizes.concept_sampling_flops(cm, steps, guided, vocab, n)
  # Linear in the sampler's steps; guidance doubles the head's calls, not the context's.
  head = flops(2, False) - flops(1, False)
  assert flops(1, True) - flops(1, False) == pytest.approx(head)
  assert flops(1, False) - head > 0  # The context's pass, once.
  # One unguided step of a plain head is the forward third of a concepts training step.
  plain = cm.copy_and_resolve_references()
  plain.model.update(head_mean=False, head_skip=False)
  plain.concepts.contrastive_weight = 0.0
  assert sizes.concept_sampling_flops(plain, 1, False, vocab, n) == pytest.approx(
      sizes.flops_per_token(plain, "concepts", vocab, num_concepts=n) / 3)
  c = cm.concepts
  per_example = n * flops(c.sample_steps, c.guidance != 1.0)
  assert stages.generated_flops_per_example(config, vocab) == pytest.approx(per_example)
  assert stages.generated_flops_per_example(tiny_config("render"), vocab) == 0.0
  examples = config.train.batch_size * config.train.num_steps
  render_only = sizes.flops_per_token(config, "render", vocab) * n * config.data.concept_len
  assert experiment.training_flops(config, vocab) == pytest.approx(
      (render_only + per_example) * examples)
  # It samples at the concepts run's temperature: what generation hands the renderer.
  from concept_diffusion import generate
  gen = generate.load(tiny_concepts_run)
  cmod = generate.build_modules(gen)["concept_model"]
  variables = {"params": gen.params["concept_model"]}
  z = jax.random.normal(jax.random.key(0), (1, 4, gen.config.model.concept_dim))
  seg = jnp.ones((1, 4), jnp.int32)
  got = {t: jit_call(stages.generated_concepts, cmod, variables, z, seg > 0, seg,
                     jax.random.key(1), objective="flow", steps=4, guidance=1.0,
                     noise_scale=t)[0] for t in (0.5, 1.0)}
  h = jit_call(cmod.apply, variables, z, seg, method=cmod.context)
  want = jit_call(concept_model.sample_from_context, cmod, variables, h, jax.random.key(1),
                  steps=4, noise_scale=0.5,
                  memory=jit_call(cmod.apply, variables, z, seg, method=cmod.memory))
  np.testing.assert_allclose(got[0.5][:, 1:], want[:, :-1], atol=1e-5)
  assert float(jnp.abs(got[0.5] - got[1.0]).max()) > 1e-3
  losses = []  # The stage's loss reads concepts.temperature of the concepts run.
  for t in (0.5, 1.0):
    ft = config.copy_and_resolve_references()
    ft.render.generated_prob = 1.0
    ft.render.concepts_config.concepts.temperature = t
    stage = stages.build_stage(ft, _Tok())
    params = unbox(stage.init_params(jax.random.key(1)))
    losses.append(float(stage.loss_fn(params, _render_batch(ft), jax.random.key(2))[0]))
  assert losses[0] != losses[1]


def test_render_finetune_renders_the_prefix_generation_renders(tiny_concepts_run, monkeypatch):
  """Under concepts.render_dims (and so under loss_dims) the fine-tune's generated concepts
  are cut as generation cuts them: the renderer never learns unmodelled dimensions."""
  config = stages.resolve_config(tiny_config("render", **{
      "render.generated_from": tiny_concepts_run, "data.fill_examples": False,
      "render.generated_prob": 1.0}))
  d, k = config.model.concept_dim, 4
  sample = jax.random.normal(jax.random.key(3), (1, config.data.num_concepts, d))
  cut = sample.at[..., k:].set(0.0)

  def loss(zgen, render_dims):
    monkeypatch.setattr(stages, "generated_concepts", lambda *a, **kw: (
        jnp.broadcast_to(zgen, (a[2].shape[0], *zgen.shape[1:])), a[3]))
    ft = config.copy_and_resolve_references()
    ft.render.concepts_config.concepts.render_dims = render_dims
    stage = stages.build_stage(ft, _Tok())
    params = unbox(stage.init_params(jax.random.key(1)))
    return float(stage.loss_fn(params, _render_batch(ft), jax.random.key(2))[0])

  assert loss(sample, k) == loss(cut, 0)
  assert loss(sample, k) != loss(sample, 0)
  assert loss(sample, d) == loss(sample, 0)


def test_render_finetune_needs_a_concepts_run(tiny_render_run, tmp_path):
  from concept_diffusion import train
  config = tiny_config("render", **{"render.generated_from": tiny_render_run,
                                    "data.fill_examples": False})
  with pytest.raises(config_lib.ConfigError, match="render.generated_from=.*not a concepts"):
    train.train(config, str(tmp_path / "ft"))
  config.render.generated_prob = 1.5
  with pytest.raises(config_lib.ConfigError, match="render.generated_prob"):
    config_lib.validate(config)


def test_renderer_in_the_loop_trains_the_concept_model_through_a_frozen_renderer(
    tiny_render_run, tmp_path):
  from concept_diffusion import evaluation, train
  config = tiny_config("concepts", **{"concepts.render_workdir": tiny_render_run,
                                      "concepts.render_weight": 1.0,
                                      "concepts.render_positions": 2, "train.num_steps": 3,
                                      "train.log_every": 1, "checkpoint.every_steps": 3})
  workdir = str(tmp_path / "loop")
  train.train(config, workdir)
  logged = evaluation.load_metrics(workdir)[-1]
  assert logged["loss"] == pytest.approx(logged["concept_loss"] + logged["render_loss"], rel=1e-4)
  _, _, base = train.restore_params(tiny_render_run)
  _, _, run = train.restore_params(workdir)
  for name in ("encoder", "renderer"):  # Both frozen, both the render run's.
    for a, b in zip(jax.tree.leaves(run[name]), jax.tree.leaves(base[name])):
      np.testing.assert_array_equal(a, b)
  # The render loss reaches the concept model: its gradient there is not zero.
  resolved = stages.resolve_config(config)
  stage = stages.build_stage(resolved, _Tok(), for_training=False)
  batch = _render_batch(resolved)
  # Jitted: eagerly, op by op, this gradient took 43 s of the suite's CPU time (15 s so).
  render_loss = lambda p: stage.loss_fn(p, batch, jax.random.key(0))[1]["render_loss"]  # noqa: E731
  grad_fn = jax.jit(jax.grad(render_loss))
  grads = grad_fn(run)
  assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads["concept_model"]))) > 0


def test_renderer_in_the_loop_needs_token_batches(tiny_render_run):
  config = tiny_config("concepts", **{"concepts.render_workdir": tiny_render_run,
                                      "concepts.render_weight": 1.0,
                                      "data.source": "concepts:/tmp/nowhere"})
  with pytest.raises(config_lib.ConfigError, match="render_weight"):
    stages.resolve_config(config)


def test_infonce_picks_the_positive_and_skips_duplicates_and_padding():
  t = jax.random.normal(jax.random.key(0), (2, 4, 8))
  mask = jnp.ones((2, 4), bool).at[1, 3].set(False)
  loss, acc = continuous.next_concept_infonce(t, t, mask, 0.05)
  assert float(acc) == 1.0 and float(loss) < 1e-3
  # A candidate equal to the positive (the END chunk of another document) is no negative:
  # counted as one, the two rows would lose log 2 each, 0.2 in the mean of 7.
  dup = t.at[1, 0].set(t[0, 0])
  assert float(continuous.next_concept_infonce(dup, dup, mask, 0.05)[0]) < 1e-3
  # Padding is neither a query nor a candidate.
  moved = t.at[1, 3].set(100.0)
  assert float(continuous.next_concept_infonce(moved, t, mask, 0.05)[0]) == float(loss)
  assert float(continuous.next_concept_infonce(t, moved, mask, 0.05)[0]) == float(loss)
  # At a huge temperature every candidate is as likely: log(7 real candidates).
  flat, _ = continuous.next_concept_infonce(t, jnp.roll(t, 1, axis=1), mask, 1e6)
  assert float(flat) == pytest.approx(np.log(7), rel=1e-4)


def _concept_batch(config):
  rng = np.random.default_rng(0)
  n, d = config.data.num_concepts, config.model.concept_dim
  seg = np.ones((4, n), np.int32)
  seg[1, n // 2:] = 2  # Two documents in one row.
  seg[3, -3:] = 0  # Padding.
  return {"concepts": jnp.asarray(rng.normal(size=(4, n, d)), jnp.float32),
          "concept_mask": jnp.asarray(seg > 0), "segment_ids": jnp.asarray(seg)}


def test_contrastive_term_trains_the_context_through_its_own_projection(tiny_render_run):
  from concept_diffusion import plan
  from concept_diffusion.models import sizes
  base = stages.resolve_config(tiny_config("concepts", **{
      "concepts.render_workdir": tiny_render_run}))
  on = stages.resolve_config(tiny_config("concepts", **{
      "concepts.render_workdir": tiny_render_run, "concepts.contrastive_weight": 0.5}))
  stage_off, stage_on = (stages.build_stage(c, _Tok(), for_training=False) for c in (base, on))
  key, batch = jax.random.key(0), _concept_batch(on)
  p_off, p_on = (unbox(s.init_params(jax.random.key(1))) for s in (stage_off, stage_on))
  assert set(p_on) == set(p_off) | {"contrastive"}
  for name in p_off:  # The term's key is its own: the other subtrees init as before.
    for a, b in zip(jax.tree.leaves(p_off[name]), jax.tree.leaves(p_on[name])):
      np.testing.assert_array_equal(a, b)
  _, m_off = stage_off.loss_fn(p_off, batch, key)
  loss_on, m = stage_on.loss_fn(p_on, batch, key)
  # Beside the preset's regression of the head's mean (model.head_mean), unchanged by it.
  assert float(m["diffusion_loss"]) == pytest.approx(float(m_off["diffusion_loss"]), rel=1e-6)
  assert float(m["mean_loss"]) == pytest.approx(float(m_off["mean_loss"]), rel=1e-6)
  assert float(loss_on) == pytest.approx(
      float(m["diffusion_loss"] + 0.5 * m["contrastive_loss"] + m["mean_loss"]), rel=1e-6)
  assert float(m["contrastive_loss"]) > 0 and 0 <= float(m["contrastive_acc"]) <= 1
  # Its gradient reaches the context transformer, never the diffusion head.
  term = lambda p: stage_on.loss_fn(p, batch, key)[1]["contrastive_loss"]  # noqa: E731
  grads = jax.jit(jax.grad(term))(p_on)
  norm = lambda tree: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(tree)))  # noqa: E731
  assert norm(grads["concept_model"]["transformer"]) > 0 and norm(grads["contrastive"]) > 0
  assert norm(grads["concept_model"]["diffusion_head"]) == 0
  # The analytic sizes count it: its params, and FLOPs that grow with the batch.
  real = plan.real_param_counts(stage_on)
  assert sizes.param_count(on, "concepts") == sum(v for k, v in real.items() if k != "encoder")
  assert sizes.flops_per_token(on, "concepts") > sizes.flops_per_token(base, "concepts")


@pytest.mark.parametrize("field,value", [("contrastive_weight", -0.1),
                                         ("contrastive_temperature", 0.0)])
def test_bad_contrastive_settings_are_config_errors(field, value):
  config = tiny_config("concepts", **{"concepts.render_workdir": "/tmp/r",
                                      f"concepts.{field}": value})
  with pytest.raises(config_lib.ConfigError, match=f"concepts.{field}={value}"):
    config_lib.validate(config)


def _assert_sized(config, *without):
  """sizes counts `config`'s concept model exactly, and more FLOPs than each of `without`."""
  from concept_diffusion import plan
  from concept_diffusion.models import sizes
  stage = stages.build_stage(stages.resolve_config(config), _Tok(), for_training=False)
  real = plan.real_param_counts(stage)
  assert sizes.param_count(config, "concepts") == sum(v for k, v in real.items() if k != "encoder")
  for base in without:
    assert sizes.flops_per_token(config, "concepts") > sizes.flops_per_token(base, "concepts")


def test_head_knobs_run_trains_restores_and_generates(tiny_render_run, tmp_path):
  """model.head_mean, head_skip, self_condition (reading the context) and the contrastive
  term, all on in one run (each run compiles a train step, an init and a sampler: ~20 s):
  each is sized, trains, restores and reaches generation."""
  from concept_diffusion import evaluation, generate, train
  from concept_diffusion.models import sizes
  over = {"concepts.render_workdir": tiny_render_run, "model.head_mean": True,
          "concepts.mean_weight": 0.5, "model.head_skip": True, "model.self_condition": True,
          "model.head_reads_context": True, "concepts.contrastive_weight": 0.5,
          "train.num_steps": 2, "train.log_every": 1, "checkpoint.every_steps": 2}
  config = tiny_config("concepts", **over)
  _assert_sized(config, *(tiny_config("concepts", **{**over, knob: off}) for knob, off in (
      ("model.head_mean", False), ("model.head_skip", False), ("model.self_condition", False),
      ("concepts.contrastive_weight", 0.0))))
  # The first pass costs one forward of the head per concept: a third of its training.
  base = tiny_config("concepts", **{**over, "model.self_condition": False})
  head = sizes.concept_sampling_flops(base, 1, False) - sizes.concept_sampling_flops(base, 0, False)
  proj = 2 * config.model.concept_dim * config.model.diff_head_dim
  assert sizes.flops_per_token(config, "concepts") == pytest.approx(
      sizes.flops_per_token(base, "concepts") + head + 4 * proj)
  workdir = str(tmp_path / "head_knobs")
  train.train(config, workdir)
  logged = evaluation.load_metrics(workdir)[-1]
  assert logged["mean_loss"] > 0 and logged["contrastive_loss"] > 0
  assert logged["loss"] == pytest.approx(logged["diffusion_loss"] + 0.5 * logged["mean_loss"]
                                         + 0.5 * logged["contrastive_loss"], rel=1e-4)
  _, _, params = train.restore_params(workdir)
  cm = params["concept_model"]
  assert "contrastive" in params and "mean_proj" in cm
  head_params = cm["diffusion_head"]
  for kernel in (head_params["skip"]["affine"]["kernel"], head_params["self_cond_proj"]["kernel"]):
    assert float(jnp.abs(kernel).max()) > 0  # Trained away from its zero init.
  gen = generate.load(workdir, render_workdir=tiny_render_run)
  m = gen.config.model
  assert m.head_mean and m.head_skip and m.self_condition
  # Generation samples through the concept model's subtree alone.
  assert set(generate.build_modules(gen)) == {"encoder", "renderer", "concept_model"}
  assert len(generate.generate(gen, ["Mara lives in Oslo."], num_concepts=2, guidance=2.0)) == 1


@pytest.mark.parametrize("field", ["concepts.mean_weight", "concepts.end_noise",
                                   "concepts.end_temperature"])
def test_a_negative_weight_or_noise_is_a_config_error(field):
  config = tiny_config("concepts", **{"concepts.render_workdir": "/tmp/r", field: -1.0})
  with pytest.raises(config_lib.ConfigError, match=f"{field}=-1.0"):
    config_lib.validate(config)


def test_a_candidate_rule_is_checked_by_name():
  base = {"concepts.render_workdir": "/tmp/r"}
  with pytest.raises(config_lib.ConfigError, match="concepts.candidate_rule"):
    config_lib.validate(tiny_config("concepts", **base, **{"concepts.candidate_rule": "vote"}))
  config = tiny_config("concepts", **base, **{"concepts.candidate_rule": "roundtrip",
                                              "concepts.reencode": False})
  with pytest.raises(config_lib.ConfigError, match="needs concepts.reencode=True"):
    config_lib.validate(config)
  config_lib.validate(tiny_config("concepts", **base, **{"concepts.candidate_rule": "roundtrip",
                                                         "concepts.reencode": True}))


def test_draft_steps_are_checked():
  base = {"concepts.render_workdir": "/tmp/r", "concepts.reencode": True}
  with pytest.raises(config_lib.ConfigError, match="concepts.draft_steps=-1 must be"):
    config_lib.validate(tiny_config("concepts", **base, **{"concepts.draft_steps": -1}))
  config = tiny_config("concepts", **{**base, "concepts.draft_steps": 2,
                                      "concepts.reencode": False, "concepts.num_candidates": 4})
  with pytest.raises(config_lib.ConfigError, match="only concepts.reencode=True renders"):
    config_lib.validate(config)
  config.concepts.num_candidates = 1  # One candidate drafts nothing: nothing to render.
  config_lib.validate(config)
  config_lib.validate(tiny_config("concepts", **base, **{"concepts.draft_steps": 2}))


def test_fill_and_end_keep_reach_the_train_split_only(monkeypatch, tmp_path):
  """data.fill_examples (every stage) and render.end_keep (the render stage) shape the
  train batches; held-out batches stay as the data are."""
  from concept_diffusion import data, train
  from concept_diffusion.train import trainer
  calls = []
  real = data.make_dataset
  monkeypatch.setattr(data, "make_dataset",
                      lambda *a, **k: calls.append(k) or real(*a, **k))
  # Both splits' datasets are made before the loop; compiling its steps would add ~10 s a run.
  monkeypatch.setattr(trainer, "_loop", lambda *a, **k: {})
  short = {"train.num_steps": 2, "train.eval_every": 2, "train.eval_batches": 1,
           "checkpoint.every_steps": 2, "data.fill_examples": True}
  train.train(tiny_config("render", **short, **{"render.end_keep": 0.25}),
              str(tmp_path / "render"))
  by_split = {k["split"]: k for k in calls}
  assert by_split["train"]["fill_examples"] and by_split["train"]["end_keep"] == 0.25
  assert "fill_examples" not in by_split["eval"] and "end_keep" not in by_split["eval"]
  calls.clear()
  train.train(tiny_config("ar", **short), str(tmp_path / "ar"))
  by_split = {k["split"]: k for k in calls}
  assert by_split["train"]["fill_examples"] and "end_keep" not in by_split["train"]
  assert stages.render_train_data(tiny_config("render").render) == {"end_keep": 0.25}


@pytest.mark.parametrize("over,match", [({"render.end_keep": 0.0}, "render.end_keep=0.0"),
                                        ({"render.end_keep": 2}, "render.end_keep=2"),
                                        ({"data.fill_examples": True,
                                          "render.generated_from": "/tmp/c"},
                                         "data.fill_examples")])
def test_bad_render_batch_options_are_config_errors(over, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(tiny_config("render", **over))
