"""render.context_chunks: a renderer that also reads the clean text before its chunk."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import generate
from concept_diffusion.data.tokenizer import PAD_ID
from concept_diffusion.models import build, layers, sizes
from concept_diffusion.models.renderer import Renderer, previous_chunks
from concept_diffusion.train import stages
from conftest import _train_in_process, _trained
from test_models import tiny_config

PROMPTS = ["Mara lives in Oslo. Mara has a dog.", "Tovin works as a baker."]


def _renderer(context_chunks):
  c = tiny_config()
  c.render.context_chunks = context_chunks
  return Renderer(layers.ModelConfig.from_config(c))


def test_previous_chunks_are_the_documents_own_oldest_first():
  tokens_BxNxL = jnp.arange(1, 11).reshape(1, 5, 2)  # Chunk n is [2n+1, 2n+2].
  seg_BxN = jnp.array([[1, 1, 1, 2, 0]])  # Chunk 3 starts a document; 4 is padding.
  ctx_BxNxCL = previous_chunks(tokens_BxNxL, seg_BxN, 2)
  np.testing.assert_array_equal(ctx_BxNxCL[0], [[0, 0, 0, 0],     # Nothing before.
                                                [0, 0, 1, 2],     # Chunk 0 only.
                                                [1, 2, 3, 4],     # 0 then 1.
                                                [0, 0, 0, 0],     # A new document.
                                                [0, 0, 0, 0]])    # Padding reads nothing.
  np.testing.assert_array_equal(previous_chunks(tokens_BxNxL, seg_BxN, 1),
                                ctx_BxNxCL[..., 2:])


def test_renderer_reads_the_text_before_and_adds_no_params():
  r0, r1 = _renderer(0), _renderer(1)
  tokens = jax.random.randint(jax.random.key(2), (2, 3, 8), 6, 96)
  z = jax.random.normal(jax.random.key(1), (2, 3, 16))
  params = jax.jit(r1.init)(jax.random.key(0), tokens, z)
  assert jax.tree.structure(params) == jax.tree.structure(jax.jit(r0.init)(jax.random.key(0),
                                                                          tokens, z))
  fwd = jax.jit(r1.apply)
  ctx = jax.random.randint(jax.random.key(3), (2, 3, 8), 6, 96)
  a = fwd(params, tokens, z, None, None, ctx)
  assert a.shape == (2, 3, 8, 96)
  assert float(jnp.abs(a - fwd(params, tokens, z, None, None, ctx.at[..., 0].set(7))).max()) > 1e-4
  # An all-PAD prefix is attended by nothing: the same as no context at all, and as the
  # chunk alone through the renderer without a prefix (RoPE is relative).
  empty = jnp.full_like(ctx, PAD_ID)
  np.testing.assert_allclose(fwd(params, tokens, z, None, None, empty),
                             fwd(params, tokens, z), atol=1e-5)
  np.testing.assert_allclose(fwd(params, tokens, z), jax.jit(r0.apply)(params, tokens, z),
                             atol=1e-4)
  with pytest.raises(ValueError, match="context_chunks=1"):
    fwd(params, tokens, z, None, None, ctx[..., :4])


def test_flops_count_the_prefix():
  base, c = tiny_config(), tiny_config()
  c.render.context_chunks = 2
  m, l = c.model, c.data.concept_len
  hk = m.num_heads * m.head_dim
  per_block = sizes.param_count(tiny_config(renderer_layers=1), "render") - \
      sizes.param_count(tiny_config(renderer_layers=0), "render") - 2 * m.embed_dim
  extra = (6 * m.renderer_layers * per_block * 2
           + 12 * m.renderer_layers * hk * l * (3 * 3 - 1))
  assert sizes.flops_per_token(c, "render") == pytest.approx(
      sizes.flops_per_token(base, "render") + extra)
  assert sizes.param_count(c, "render") == sizes.param_count(base, "render")


def test_the_render_loss_reads_the_documents_earlier_chunks():
  class Vocab:  # render_stage only asks the tokenizer for its size.
    vocab_size = 96

  batch = {"tokens": jax.random.randint(jax.random.key(4), (2, 4, 8), 6, 96),
           "token_mask": jnp.ones((2, 4, 8), bool), "concept_mask": jnp.ones((2, 4), bool),
           "segment_ids": jnp.ones((2, 4), jnp.int32)}
  alone = {**batch, "segment_ids": jnp.broadcast_to(jnp.arange(1, 5), (2, 4))}
  losses = {}
  for k in (0, 1):
    c = tiny_config()
    c.render.context_chunks = k
    stage = stages.render_stage(c, Vocab())
    params = stage.init_params(jax.random.key(0))
    fn = jax.jit(stage.eval_loss_fn)
    losses[k] = [float(fn(params, b, jax.random.key(5))[0]) for b in (batch, alone)]
  assert losses[0][0] == pytest.approx(losses[0][1])  # Documents' boundaries: no matter.
  assert abs(losses[1][0] - losses[1][1]) > 1e-4  # Chunks 1..3 read 0..2, or nothing.


def test_render_in_order_gives_each_chunk_the_ones_rendered_before_it():
  r = _renderer(1)
  z = jax.random.normal(jax.random.key(1), (2, 3, 16))
  params = jax.jit(r.init)(jax.random.key(0), jnp.zeros((2, 3, 8), jnp.int32), z)["params"]
  before_BxL = jax.random.randint(jax.random.key(3), (2, 8), 6, 96)
  key = jax.random.key(7)
  out_BxNxL = generate.render_in_order(r, params, z, z, before_BxL, key, steps=4)
  keys = jax.random.split(key, 3)
  ctx_BxL = before_BxL
  for n in range(3):
    want_Bx1xL = generate.render_chunks(r, params, z[:, n:n + 1], z[:, n:n + 1], keys[n],
                                        steps=4, context_BxNxCL=ctx_BxL[:, None])
    np.testing.assert_array_equal(out_BxNxL[:, n], want_Bx1xL[:, 0])
    ctx_BxL = want_Bx1xL[:, 0]
  # The text before matters, and the chunks differ from the all-parallel render.
  other = generate.render_in_order(r, params, z, z, jnp.full_like(before_BxL, 9), key, steps=4)
  assert not np.array_equal(other, out_BxNxL)


def test_last_chunks_pads_before_the_first():
  chunks_BxNxL = jnp.arange(1, 13).reshape(2, 3, 2)
  got = generate.last_chunks(chunks_BxNxL, jnp.array([1, 3]), 2)
  np.testing.assert_array_equal(got, [[0, 0, 1, 2], [9, 10, 11, 12]])


@pytest.fixture(scope="module")
def context_runs(tmp_path_factory):
  """A tiny render run whose renderer reads the chunk before, and a concepts run over it."""
  render = _trained(tmp_path_factory, "render_context",
                    _train_in_process("render", **{"render.context_chunks": 1}))
  concepts = _trained(tmp_path_factory, "concepts_context", _train_in_process(
      "concepts", **{"concepts.render_workdir": render}))
  return render, concepts


def test_generation_renders_each_chunk_after_the_text_before_it(context_runs):
  gen = generate.load(context_runs[1])
  mods = generate.build_modules(gen)
  assert mods["renderer"].cfg.context_chunks == 1
  l = gen.chunk_config.data.concept_len
  enc_params, ren_params = gen.params["encoder"], gen.render_params["renderer"]
  snap = generate.snap_fn(mods["encoder"], enc_params, mods["renderer"], ren_params, steps=8,
                          temperature=0.0)
  chunks_BxNxL, counts_B = generate.prompt_chunks(gen, PROMPTS)
  z_prompt = mods["encoder"].apply({"params": enc_params}, chunks_BxNxL, chunks_BxNxL != PAD_ID)
  before_BxL = generate.last_chunks(chunks_BxNxL, counts_B, 1)
  z_BxNxD, _, (tokens_BxNxL,) = generate.concept_loop(
      mods["concept_model"], gen.params["concept_model"], z_prompt, counts_B,
      generate.end_concept(mods["encoder"], enc_params, l), jax.random.key(0), num_new=2,
      objective=gen.config.concepts.objective, steps=4, guidance=1.0, noise_scale=1.0,
      end_cosine=2.0, snap=snap, context_BxCL=before_BxL)
  # Argmax renders: chunk 0 from the prompt's last chunk, chunk 1 from chunk 0.
  for n, ctx_BxL in enumerate((before_BxL, tokens_BxNxL[:, 0])):
    want = generate.render_chunks(mods["renderer"], ren_params, z_BxNxD[:, n:n + 1],
                                  z_BxNxD[:, n:n + 1], jax.random.key(1), steps=8,
                                  context_BxNxCL=ctx_BxL[:, None])
    np.testing.assert_array_equal(tokens_BxNxL[:, n], want[:, 0])
  # Through the public API, with and without re-encoding, and the round trip.
  for reencode in (True, False):
    samples = generate.generate(gen, PROMPTS, num_concepts=2, reencode=reencode, seed=1)
    assert len(samples) == 2 and all(s.prompt in PROMPTS for s in samples)
  render_gen = generate.load(context_runs[0])
  back = generate.roundtrip(render_gen, ["Mara has a dog."], contexts=["Mara lives in Oslo."])
  assert back[0].token_ids


def test_param_tree_of_a_context_renderer_matches_the_count():
  c = tiny_config()
  c.render.context_chunks = 1
  params = nn.unbox(build.param_shapes(c, stage="render"))
  real = sum(x.size for name in sizes.TRAINED["render"] for x in jax.tree.leaves(params[name]))
  assert sizes.param_count(c, "render") == real


@pytest.mark.parametrize("bad", [-1, 4])
def test_a_bad_context_chunks_is_refused_by_name(bad):
  from concept_diffusion import config as config_lib
  c = tiny_config()  # data.num_concepts = 4
  c.render.context_chunks = bad
  with pytest.raises(config_lib.ConfigError, match="render.context_chunks"):
    config_lib.validate(c)
