"""Generation: the sample CLI, stopping at end-of-document, restore onto another device count."""

import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import generate
from concept_diffusion.data import segment
from concept_diffusion.data.tokenizer import BOS_ID, EOD_ID, MASK_ID, PAD_ID
from concept_diffusion.models import concept_model
from concept_diffusion.train import checkpoint

from conftest import ROOT, jit_call, subprocess_env

PROMPTS = ["Mara lives in Oslo. Mara works as a baker.", "Tovin has a cat."]


@pytest.fixture(scope="module")
def concepts_gen(tiny_concepts_run):
  return generate.load(tiny_concepts_run)


def test_sample_cli_prints_continuations_in_a_one_device_process(tiny_concepts_run, tmp_path):
  prompt_file = tmp_path / "prompts.txt"
  prompt_file.write_text("\n".join(PROMPTS) + "\n")
  cmd = [sys.executable, "-m", "concept_diffusion.sample", f"--workdir={tiny_concepts_run}",
         f"--prompt_file={prompt_file}", "--num_concepts=3", "--seed=1", "--show_steps",
         "--temperature=1.0"]  # A 30-step model at the default 0.5 often renders nothing.
  proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert [l for l in lines if l.startswith("prompt: ")] == [f"prompt: {p}" for p in PROMPTS]
  steps = [l for l in lines if l.lstrip().startswith("step")]
  assert len(steps) == 2 * 8 and "_" in steps[0]  # render.sample_steps of the render run.
  outputs = [l[len("output: "):] for l in lines if l.startswith("output: ")]
  assert len(outputs) == 2 and all(o.strip() for o in outputs)


def test_checkpoint_written_on_four_devices_restores_on_one(tiny_render_run):
  _, meta = checkpoint.latest_meta(tiny_render_run)
  assert meta["mesh"]["fsdp"] == 4
  mesh = generate.local_mesh(jax.devices()[:1])
  gen = generate.load(tiny_render_run, mesh=mesh)
  assert {len(x.sharding.device_set) for x in jax.tree.leaves(gen.params)} == {1}
  samples = generate.roundtrip(gen, PROMPTS)
  assert [s.prompt for s in samples] == PROMPTS
  assert all(s.token_ids for s in samples)


def test_roundtrip_reads_each_contexts_last_chunk_as_the_first_previous_concept(tiny_render_run):
  gen = generate.load(tiny_render_run, mesh=generate.local_mesh(jax.devices()[:1]))
  encoder = generate.build_modules(gen)["encoder"]
  enc = gen.params["encoder"]
  texts = ["Mara works as a baker.", "Tovin has a cat. Tovin lives in Rome."]
  contexts = ["Mara lives in Oslo. Mara has a dog.", "Ilse paints."]
  chunks_BxNxL, _ = generate.prompt_chunks(gen, texts)
  ctx_BxNxL, ctx_counts_B = generate.prompt_chunks(gen, contexts)
  z_BxNxD = jit_call(encoder.apply, {"params": enc}, chunks_BxNxL, chunks_BxNxL != PAD_ID)
  last_Bx1xL = ctx_BxNxL[np.arange(len(ctx_BxNxL)), ctx_counts_B - 1][:, None]
  last_Bx1xL[len(texts):] = PAD_ID  # Batch padding: no context.
  prev_BxNxD = generate.previous_with_context(encoder, enc, z_BxNxD, last_Bx1xL)
  # Mara's context ends with the sentence "Mara has a dog.", encoded on its own here.
  last_1x1xL = generate.prompt_chunks(gen, ["Mara has a dog."])[0][:1, :1]
  want_0 = jit_call(encoder.apply, {"params": enc}, last_1x1xL, last_1x1xL != PAD_ID)
  np.testing.assert_allclose(prev_BxNxD[0, 0], want_0[0, 0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(prev_BxNxD[0, 0], prev_BxNxD[1, 0])
  np.testing.assert_array_equal(prev_BxNxD[len(texts):, 0], 0.0)
  np.testing.assert_array_equal(prev_BxNxD[:, 1:], z_BxNxD[:, :-1])
  assert len(generate.roundtrip(gen, texts, contexts=contexts)) == len(texts)
  with pytest.raises(generate.GenerateError, match="1 contexts for 2 texts"):
    generate.roundtrip(gen, texts, contexts=contexts[:1])


def test_concepts_generation_is_batched_bounded_and_reproducible(concepts_gen):
  kwargs = dict(num_concepts=3, seed=1, show_steps=True, temperature=1.0)
  a = generate.generate(concepts_gen, PROMPTS, **kwargs)
  b = generate.generate(concepts_gen, PROMPTS, **kwargs)
  assert [s.token_ids for s in a] == [s.token_ids for s in b]
  l = concepts_gen.chunk_config.data.concept_len
  for s in a:
    assert 0 < len(s.token_ids) <= 3 * l and EOD_ID not in s.token_ids
    assert len(s.steps) == concepts_gen.render_config.render.sample_steps
    assert s.steps[0].count("_") > s.steps[-1].count("_") == 0


def test_oracle_end_concept_truncates_the_output(concepts_gen):
  l = concepts_gen.chunk_config.data.concept_len
  tok = concepts_gen.tokenizer
  chunk_a = np.full((l,), PAD_ID, np.int32)
  ids = tok.encode("Mara lives in Oslo.")[:l]
  chunk_a[:len(ids)] = ids
  chunk_b = np.roll(chunk_a, 1)
  z_1x2xD = generate.encode_chunks(concepts_gen, np.stack([chunk_a, chunk_b])[None])
  mods = generate.build_modules(concepts_gen)
  z_end_D = generate.end_concept(mods["encoder"], concepts_gen.params["encoder"], l)
  z_a, z_b = z_1x2xD[0, 0], z_1x2xD[0, 1]
  # Oracle concept sequences: END 2nd (one chunk survives) and END 3rd (two survive).
  z_2x3xD = jnp.stack([jnp.stack([z_a, z_end_D, z_b]), jnp.stack([z_a, z_b, z_end_D])])
  first, second = generate.decode_concepts(concepts_gen, z_2x3xD)
  assert first.ended and second.ended
  assert 0 < len(first.token_ids) <= l
  assert len(first.token_ids) <= len(second.token_ids) <= 2 * l
  # Rendering is per chunk: the kept chunk is the same in both.
  assert second.token_ids[:len(first.token_ids)] == first.token_ids


def test_reencode_feeds_the_encoders_concept_of_each_rendered_chunk(concepts_gen):
  gen, l = concepts_gen, concepts_gen.chunk_config.data.concept_len
  mods = generate.build_modules(gen)
  enc_params = gen.params["encoder"]
  encode = lambda c: jit_call(mods["encoder"].apply, {"params": enc_params}, c, c != PAD_ID)
  snap = generate.snap_fn(mods["encoder"], enc_params, mods["renderer"],
                          gen.render_params["renderer"], steps=8, temperature=0.0)
  # Noise scale 0 and argmax renders: deterministic, so two runs can be compared.
  loop = lambda z, counts, num_new, snap: jit_call(
      generate.concept_loop, mods["concept_model"], gen.params["concept_model"], z, counts,
      generate.end_concept(mods["encoder"], enc_params, l), jax.random.key(0), num_new=num_new,
      objective=gen.config.concepts.objective, steps=4, guidance=1.0, noise_scale=0.0,
      end_cosine=2.0, snap=snap)
  chunks_BxNxL, counts_B = generate.prompt_chunks(gen, PROMPTS)
  chunks_BxNxL = np.pad(chunks_BxNxL, ((0, 0), (0, 1), (0, 0)), constant_values=PAD_ID)
  z_BxNxD, _, (tokens_BxNxL,) = loop(encode(chunks_BxNxL), counts_B, 2, snap)
  assert tokens_BxNxL.shape == (2, 2, l)
  # The reference: the first rendered chunk appended to the prompt as real text.
  longer_BxNxL = chunks_BxNxL.copy()
  longer_BxNxL[np.arange(2), counts_B] = np.asarray(tokens_BxNxL[:, 0])
  z1_BxNxD, _, (tokens1_BxNxL,) = loop(encode(longer_BxNxL), counts_B + 1, 1, snap)
  np.testing.assert_allclose(z1_BxNxD[:, 0], z_BxNxD[:, 1], atol=1e-4)
  np.testing.assert_array_equal(tokens1_BxNxL[:, 0], tokens_BxNxL[:, 1])
  # Without re-encoding the context holds the raw sample: same first concept, new second.
  raw_BxNxD, _, extras = loop(encode(chunks_BxNxL), counts_B, 2, None)
  assert extras == ()
  np.testing.assert_allclose(raw_BxNxD[:, 0], z_BxNxD[:, 0], atol=1e-5)
  assert float(jnp.max(jnp.abs(raw_BxNxD[:, 1] - z_BxNxD[:, 1]))) > 1e-3


def test_loop_gives_a_reading_head_the_memory_training_gives_it(concepts_gen):
  gen, l = concepts_gen, concepts_gen.chunk_config.data.concept_len
  mods = generate.build_modules(gen)
  cm = concept_model.ConceptModel(dataclasses.replace(mods["concept_model"].cfg,
                                                 head_reads_context=True))
  enc = {"params": gen.params["encoder"]}
  encode = lambda c: jit_call(mods["encoder"].apply, enc, c, c != PAD_ID)
  chunks_BxNxL, counts_B = generate.prompt_chunks(gen, PROMPTS)
  chunks_BxNxL = np.pad(chunks_BxNxL, ((0, 0), (0, 2), (0, 0)), constant_values=PAD_ID)
  z_BxNxD = encode(chunks_BxNxL)
  seg_BxN = (np.arange(z_BxNxD.shape[1]) < counts_B[:, None]).astype(np.int32)
  params = nn.unbox(jax.jit(cm.init)(jax.random.key(0), z_BxNxD, seg_BxN, z_BxNxD,
                                     seg_BxN * 0.5))
  read = params["params"]["diffusion_head"]["context_read"]
  read["out"]["kernel"] = jax.random.normal(jax.random.key(1), read["out"]["kernel"].shape)
  kw = dict(objective="flow", steps=4, guidance=1.0)
  # Noise scale 0: deterministic, so the loop's samples can be recomputed teacher-forced.
  new_BxNxD, _, _ = jit_call(
      generate.concept_loop,
      cm, params["params"], z_BxNxD, counts_B, jnp.zeros(z_BxNxD.shape[-1]), jax.random.key(2),
      num_new=2, noise_scale=0.0, end_cosine=2.0, **kw)
  rows = np.arange(len(PROMPTS))
  for i in range(2):
    full_BxNxD = z_BxNxD.at[rows, counts_B].set(new_BxNxD[:, 0])
    seg = (np.arange(z_BxNxD.shape[1]) < (counts_B + i)[:, None]).astype(np.int32)
    h_BxNxE = jit_call(cm.apply, params, full_BxNxD, seg, method=cm.context)
    pred_BxNxD = jit_call(
        concept_model.sample_from_context, cm, params, h_BxNxE, jax.random.key(3), noise_scale=0.0,
        memory=jit_call(cm.apply, params, full_BxNxD, seg, method=cm.memory), **kw)
    np.testing.assert_allclose(pred_BxNxD[rows, counts_B + i - 1], new_BxNxD[:, i], atol=1e-4)
  # Without its memory (as a null context reads) the head samples otherwise: it reads.
  h_BxNxE = jit_call(cm.apply, params, z_BxNxD, seg_BxN, method=cm.context)
  memory = jit_call(cm.apply, params, z_BxNxD, seg_BxN, method=cm.memory)
  blind_BxNxD = jit_call(
      concept_model.sample_from_context, cm, params, h_BxNxE, jax.random.key(3), noise_scale=0.0,
      memory=concept_model.null_memory(memory), **kw)
  assert float(jnp.abs(blind_BxNxD[rows, counts_B - 1] - new_BxNxD[:, 0]).max()) > 1e-3


def test_reencode_generation_is_bounded_and_reproducible(concepts_gen):
  kwargs = dict(num_concepts=3, seed=1, temperature=1.0, reencode=True)
  a = generate.generate(concepts_gen, PROMPTS, **kwargs)
  assert [s.token_ids for s in a] == [s.token_ids for s in generate.generate(
      concepts_gen, PROMPTS, **kwargs)]
  l = concepts_gen.chunk_config.data.concept_len
  assert all(len(s.token_ids) <= 3 * l and EOD_ID not in s.token_ids for s in a)
  parallel = generate.generate(concepts_gen, PROMPTS, **{**kwargs, "reencode": False})
  assert all(0 < len(s.token_ids) <= 3 * l for s in parallel)  # All chunks at once.
  shown = generate.generate(concepts_gen, PROMPTS, show_steps=True, **kwargs)
  assert [s.token_ids for s in shown] == [s.token_ids for s in a]
  for s in shown:  # Each chunk's render steps, as in the parallel render.
    assert len(s.steps) == concepts_gen.render_config.render.sample_steps
    assert s.steps[0].count("_") > s.steps[-1].count("_") == 0


def _prompt_context(gen):
  """(mods, z_BxNxD of the prompts + one empty slot, counts_B, h_Bx1xE at each last prompt
  concept): what concept_loop's first step reads."""
  mods = generate.build_modules(gen)
  enc_params, cm_params = gen.params["encoder"], gen.params["concept_model"]
  chunks_BxNxL, counts_B = generate.prompt_chunks(gen, PROMPTS)
  chunks_BxNxL = np.pad(chunks_BxNxL, ((0, 0), (0, 1), (0, 0)), constant_values=PAD_ID)
  z_BxNxD = jit_call(mods["encoder"].apply, {"params": enc_params}, chunks_BxNxL,
                     chunks_BxNxL != PAD_ID)
  seg_BxN = (np.arange(z_BxNxD.shape[1]) < counts_B[:, None]).astype(np.int32)
  h_BxNxE = jit_call(mods["concept_model"].apply, {"params": cm_params}, z_BxNxD, seg_BxN,
                     method=mods["concept_model"].context)
  return mods, z_BxNxD, counts_B, h_BxNxE[np.arange(len(PROMPTS)), counts_B - 1][:, None]


def _loop_candidates(cm, cm_params, h_Bx1xE, prev_Bx1xD, key, c, objective, snaps=()):
  """concept_loop's first C candidates, drawn from `key` as the loop draws them, and each
  snap's (concept, chunk) of them -> cand_BCx1xD, [(back_BCx1xD, chunk_BCx1xL), ...]."""
  k_content, k_snap = jax.random.split(jax.random.fold_in(key, 0))
  cand_BCx1xD = jit_call(concept_model.sample_from_context, cm, {"params": cm_params},
                         jnp.repeat(h_Bx1xE, c, axis=0), k_content, objective=objective,
                         steps=4)
  prev_BCx1xD = jnp.repeat(prev_Bx1xD, c, axis=0)
  text_BCx0 = jnp.zeros((len(prev_BCx1xD), 0), jnp.int32)
  return cand_BCx1xD, [jit_call(snap, cand_BCx1xD, prev_BCx1xD, text_BCx0, k_snap)
                       for snap in snaps]


def test_end_noise_reaches_the_sampler_and_defaults_to_the_config(concepts_gen):
  gen, l = concepts_gen, concepts_gen.chunk_config.data.concept_len
  enc_params, cm_params = gen.params["encoder"], gen.params["concept_model"]
  mods, z_BxNxD, counts_B, h_Bx1xE = _prompt_context(gen)
  key, kw = jax.random.key(3), dict(objective=gen.config.concepts.objective, steps=4)
  first = lambda end_noise: jit_call(  # noqa: E731
      generate.concept_loop, mods["concept_model"], cm_params, z_BxNxD, counts_B,
      generate.end_concept(mods["encoder"], enc_params, l), key, num_new=1, guidance=1.0,
      noise_scale=1.0, end_cosine=2.0, end_noise=end_noise, **kw)[0][:, 0]
  # The loop's sample is the head's, stopped at end_noise: drawn here from the same context.
  k_sample, _ = jax.random.split(jax.random.fold_in(key, 0))
  direct = lambda end_noise: jit_call(  # noqa: E731
      concept_model.sample_from_context,
      mods["concept_model"], {"params": cm_params}, h_Bx1xE, k_sample, end_noise=end_noise,
      **kw)[:, 0]
  np.testing.assert_allclose(first(1.5), direct(1.5), atol=1e-5)
  assert float(jnp.max(jnp.abs(first(1.5) - first(0.0)))) > 1e-2
  # generate(): off by default (concepts.end_noise = 0), on when given or configured.
  kwargs = dict(num_concepts=3, seed=1, temperature=1.0, reencode=True)
  ids = lambda samples: [s.token_ids for s in samples]  # noqa: E731
  plain = ids(generate.generate(gen, PROMPTS, **kwargs))
  assert gen.config.concepts.end_noise == 0.0
  assert ids(generate.generate(gen, PROMPTS, end_noise=0.0, **kwargs)) == plain
  noisy = generate.generate(gen, PROMPTS, end_noise=1.5, **kwargs)
  assert ids(noisy) != plain and all(len(s.token_ids) <= 3 * l for s in noisy)
  configured = dataclasses.replace(gen, config=gen.config.copy_and_resolve_references())
  configured.config.concepts.end_noise = 1.5
  assert ids(generate.generate(configured, PROMPTS, **kwargs)) == ids(noisy)
  with pytest.raises(generate.GenerateError, match="end_noise=-1"):
    generate.generate(gen, PROMPTS, end_noise=-1.0)


def test_consensus_index_picks_the_candidate_nearest_the_others():
  feat_2x3x2 = jnp.array([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]],     # The middle one agrees most.
                          [[0.0, 2.0], [5.0, 0.0], [0.0, 0.5]]])    # Direction, not norm.
  np.testing.assert_array_equal(generate.consensus_index(feat_2x3x2), [1, 0])
  assert int(generate.consensus_index(jnp.ones((1, 1, 4)))[0]) == 0
  x_6x2 = jnp.arange(12.0).reshape(6, 2)  # Rows j*3 .. j*3+2 are example j's candidates.
  np.testing.assert_array_equal(generate.take_candidate(x_6x2, jnp.array([2, 0]), 3),
                                [[4.0, 5.0], [6.0, 7.0]])


def test_candidates_keep_the_consensus_of_samples_from_one_context(concepts_gen):
  gen, l = concepts_gen, concepts_gen.chunk_config.data.concept_len
  enc_params, cm_params = gen.params["encoder"], gen.params["concept_model"]
  mods, z_BxNxD, counts_B, h_Bx1xE = _prompt_context(gen)
  key, c = jax.random.key(3), 5
  loop = lambda num_candidates: jit_call(
      generate.concept_loop, mods["concept_model"], cm_params, z_BxNxD, counts_B,
      generate.end_concept(mods["encoder"], enc_params, l), key, num_new=1,
      objective=gen.config.concepts.objective, steps=4, guidance=1.0, noise_scale=1.0,
      end_cosine=2.0, num_candidates=num_candidates)[0][:, 0]
  # The C candidates, drawn as the loop draws them: one context, C noises.
  k_sample, _ = jax.random.split(jax.random.fold_in(key, 0))
  cand_BCx1xD = jit_call(
      concept_model.sample_from_context,
      mods["concept_model"], {"params": cm_params}, jnp.repeat(h_Bx1xE, c, axis=0), k_sample,
      objective=gen.config.concepts.objective, steps=4)
  cand_BxCxD = cand_BCx1xD.reshape(2, c, -1)
  best_B = generate.consensus_index(cand_BxCxD)
  np.testing.assert_allclose(loop(c), cand_BxCxD[np.arange(2), best_B], atol=1e-5)
  # The kept sample is the medoid by mean cosine, computed here independently in numpy.
  cand = np.asarray(cand_BxCxD, np.float64)
  unit = cand / np.linalg.norm(cand, axis=-1, keepdims=True)
  np.testing.assert_array_equal(best_B, np.argmax(np.einsum("bcd,bkd->bc", unit, unit), -1))
  # One candidate is the plain sampler: one noise per example, the same key.
  plain_Bx1xD = jit_call(
      concept_model.sample_from_context,
      mods["concept_model"], {"params": cm_params}, h_Bx1xE, k_sample,
      objective=gen.config.concepts.objective, steps=4)
  np.testing.assert_allclose(loop(1), plain_Bx1xD[:, 0], atol=1e-5)


def test_candidate_generation_is_bounded_reproducible_and_one_is_plain(concepts_gen):
  kwargs = dict(num_concepts=3, seed=1, temperature=1.0, reencode=True)
  plain = generate.generate(concepts_gen, PROMPTS, **kwargs)
  one = generate.generate(concepts_gen, PROMPTS, num_candidates=1, **kwargs)
  assert [s.token_ids for s in one] == [s.token_ids for s in plain]
  for reencode in (True, False):
    args = {**kwargs, "reencode": reencode, "num_candidates": 4}
    a = generate.generate(concepts_gen, PROMPTS, **args)
    assert [s.token_ids for s in a] == [s.token_ids for s in generate.generate(
        concepts_gen, PROMPTS, **args)]
    l = concepts_gen.chunk_config.data.concept_len
    assert all(len(s.token_ids) <= 3 * l and EOD_ID not in s.token_ids for s in a)
  with pytest.raises(generate.GenerateError, match="num_candidates=0"):
    generate.generate(concepts_gen, PROMPTS, num_candidates=0)


def test_consensus_over_valid_candidates_ignores_the_others():
  feat_1x4x2 = jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.1, 1.0]]])
  assert int(generate.consensus_index(feat_1x4x2)[0]) == 2
  # 2 and 3 out: neither kept nor voting (their votes would pick 1); 0 and 1 tie: the lowest.
  valid_1x4 = jnp.array([[True, True, False, False]])
  assert int(generate.consensus_index(feat_1x4x2, valid_1x4)[0]) == 0
  assert int(generate.consensus_index(feat_1x4x2, jnp.array([[False, True, False, False]]))[0]) == 1
  assert int(generate.consensus_index(feat_1x4x2, jnp.zeros((1, 4), bool))[0]) == 0


def test_end_temperature_decides_end_by_a_sample_of_its_own(concepts_gen):
  gen, l = concepts_gen, concepts_gen.chunk_config.data.concept_len
  enc_params, cm_params = gen.params["encoder"], gen.params["concept_model"]
  mods, z_BxNxD, counts_B, h_Bx1xE = _prompt_context(gen)
  cm, objective, key = mods["concept_model"], gen.config.concepts.objective, jax.random.key(3)
  draw = lambda h, k, t, g: jit_call(  # noqa: E731
      concept_model.sample_from_context,
      cm, {"params": cm_params}, h, k, objective=objective, steps=4, guidance=g, noise_scale=t)
  loop = lambda z_end_D, c: jit_call(  # noqa: E731
      generate.concept_loop,
      cm, cm_params, z_BxNxD, counts_B, z_end_D, key, num_new=1, objective=objective,
      steps=4, guidance=2.0, noise_scale=0.5, end_cosine=0.999, num_candidates=c,
      end_temperature=1.0)[0][:, 0]
  # Drawn here as the loop draws them: the content candidates (cool, guided) from step 0's
  # key, the deciding sample (temperature 1, unguided) from its own.
  key_0 = jax.random.fold_in(key, 0)
  k_content, _ = jax.random.split(key_0)
  k_decide, _ = jax.random.split(jax.random.fold_in(key_0, 1))
  c = 4  # With one of them END, three vote: two would tie, broken by rounding.
  cand_BxCxD = draw(jnp.repeat(h_Bx1xE, c, axis=0), k_content, 0.5, 2.0).reshape(2, c, -1)
  one_BxD = draw(h_Bx1xE, k_content, 0.5, 2.0)[:, 0]
  decide_BxD = draw(h_Bx1xE, k_decide, 1.0, 1.0)[:, 0]
  best_B = generate.consensus_index(cand_BxCxD)
  near = lambda a, b: float(generate.cosine(a, b)) >= 0.999  # noqa: E731
  # END is the deciding sample of example 0: it ends there; example 1 keeps its consensus.
  assert not near(decide_BxD[1], decide_BxD[0])
  assert not any(near(x, decide_BxD[0]) for x in cand_BxCxD[1])
  kept = loop(decide_BxD[0], c)
  np.testing.assert_allclose(kept[0], decide_BxD[0], atol=1e-5)
  np.testing.assert_allclose(kept[1], cand_BxCxD[1, best_B[1]], atol=1e-5)
  # END is example 1's consensus candidate: it keeps the consensus of the three others.
  z_end_D = cand_BxCxD[1, best_B[1]]
  assert not near(decide_BxD[1], z_end_D) and not near(decide_BxD[0], z_end_D)
  others = [j for j in range(c) if j != int(best_B[1])]
  unit = np.asarray(cand_BxCxD[1, others], np.float64)
  unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
  second = others[int(np.argmax((unit @ unit.T).sum(-1)))]
  kept = loop(z_end_D, c)
  np.testing.assert_allclose(kept[0], cand_BxCxD[0, best_B[0]], atol=1e-5)
  np.testing.assert_allclose(kept[1], cand_BxCxD[1, second], atol=1e-5)
  # One candidate, and it is END where the deciding sample is not: the deciding sample.
  assert not near(decide_BxD[1], one_BxD[1])
  kept = loop(one_BxD[1], 1)
  np.testing.assert_allclose(kept[0], one_BxD[0], atol=1e-5)
  np.testing.assert_allclose(kept[1], decide_BxD[1], atol=1e-5)


def test_roundtrip_rule_keeps_the_candidate_whose_chunk_encodes_back_nearest(concepts_gen):
  gen, l = concepts_gen, concepts_gen.chunk_config.data.concept_len
  enc_params, cm_params = gen.params["encoder"], gen.params["concept_model"]
  mods, z_BxNxD, counts_B, h_Bx1xE = _prompt_context(gen)
  cm, objective, key, c = mods["concept_model"], gen.config.concepts.objective, jax.random.key(3), 4
  snap = generate.snap_fn(mods["encoder"], enc_params, mods["renderer"],
                          gen.render_params["renderer"], steps=8, temperature=0.0)
  loop = lambda rule: jit_call(  # noqa: E731
      generate.concept_loop,
      cm, cm_params, z_BxNxD, counts_B, generate.end_concept(mods["encoder"], enc_params, l),
      key, num_new=1, objective=objective, steps=4, guidance=1.0, noise_scale=1.0,
      end_cosine=2.0, snap=snap, num_candidates=c, candidate_rule=rule)
  # The candidates and their re-encoded chunks, drawn as the loop draws them.
  prev_Bx1xD = z_BxNxD[np.arange(2), counts_B - 1][:, None]
  cand_BCx1xD, [(back_BCx1xD, chunk_BCx1xL)] = _loop_candidates(
      cm, cm_params, h_Bx1xE, prev_Bx1xD, key, c, objective, [snap])
  cand_BxCxD, back_BxCxD = (x.reshape(2, c, -1) for x in (cand_BCx1xD, back_BCx1xD))
  cand, back = (np.asarray(x, np.float64) for x in (cand_BxCxD, back_BxCxD))
  # (A chunk rendered all PAD encodes to zeros: cosine 0, as generate.cosine's epsilon gives.)
  norms = np.linalg.norm(cand, axis=-1) * np.linalg.norm(back, axis=-1)
  best_B = np.argmax(np.sum(cand * back, -1) / (norms + 1e-6), -1)
  new_BxNxD, _, (tokens_BxNxL,) = loop("roundtrip")
  np.testing.assert_allclose(new_BxNxD[:, 0], cand_BxCxD[np.arange(2), best_B], atol=1e-5)
  np.testing.assert_array_equal(tokens_BxNxL[:, 0],
                                chunk_BCx1xL.reshape(2, c, -1)[np.arange(2), best_B])
  consensus_B = generate.consensus_index(back_BxCxD)
  assert (np.asarray(consensus_B) != best_B).any()  # The two rules differ here.
  np.testing.assert_allclose(loop("consensus")[0][:, 0],
                             cand_BxCxD[np.arange(2), consensus_B], atol=1e-5)
  valid_BxC = jnp.ones((2, c), bool).at[np.arange(2), best_B].set(False)
  assert (np.asarray(generate.roundtrip_index(cand_BxCxD, back_BxCxD, valid_BxC)) != best_B).all()


def test_draft_steps_choose_by_the_drafts_and_keep_the_full_render(concepts_gen):
  gen, l = concepts_gen, concepts_gen.chunk_config.data.concept_len
  enc_params, cm_params = gen.params["encoder"], gen.params["concept_model"]
  mods, z_BxNxD, counts_B, h_Bx1xE = _prompt_context(gen)
  cm, objective, c = mods["concept_model"], gen.config.concepts.objective, 4
  snaps = {s: generate.snap_fn(mods["encoder"], enc_params, mods["renderer"],
                               gen.render_params["renderer"], steps=s, temperature=0.0)
           for s in (1, 8)}
  z_end_D = generate.end_concept(mods["encoder"], enc_params, l)
  prev_Bx1xD = z_BxNxD[np.arange(2), counts_B - 1][:, None]
  for seed in range(3, 20):  # A key where drafts and full renders choose apart.
    key = jax.random.key(seed)
    # The candidates, drawn as the loop draws them, rendered in one step and in eight.
    cand_BCx1xD, both = _loop_candidates(cm, cm_params, h_Bx1xE, prev_Bx1xD, key, c,
                                         objective, [snaps[1], snaps[8]])
    rendered = dict(zip((1, 8), both))
    cand_BxCxD = cand_BCx1xD.reshape(2, c, -1)
    best = {s: np.asarray(generate.roundtrip_index(cand_BxCxD, rendered[s][0].reshape(2, c, -1)))
            for s in (1, 8)}
    if (best[1] != best[8]).any():
      break
  assert (best[1] != best[8]).any()
  loop = lambda draft: jit_call(  # noqa: E731
      generate.concept_loop,
      cm, cm_params, z_BxNxD, counts_B, z_end_D, key, num_new=1, objective=objective,
      steps=4, guidance=1.0, noise_scale=1.0, end_cosine=2.0, snap=snaps[8], num_candidates=c,
      candidate_rule="roundtrip", draft_snap=draft)
  new_BxNxD, _, (tokens_BxNxL,) = loop(snaps[1])
  kept_Bx1xD = cand_BxCxD[np.arange(2), best[1]][:, None]
  np.testing.assert_allclose(new_BxNxD[:, 0], kept_Bx1xD[:, 0], atol=1e-5)
  # The kept one is rendered again in full (its own key): that chunk is the output.
  _, full_Bx1xL = jit_call(snaps[8], kept_Bx1xD, prev_Bx1xD, jnp.zeros((2, 0), jnp.int32),
                           jax.random.fold_in(jax.random.fold_in(key, 0), 2))
  draft_Bx1xL = rendered[1][1].reshape(2, c, 1, -1)[np.arange(2), best[1]]
  assert (np.asarray(draft_Bx1xL) != np.asarray(full_Bx1xL)).any()
  np.testing.assert_array_equal(tokens_BxNxL[:, :1], full_Bx1xL)
  # (Without drafts the loop is the plain round-trip rule: the test above.)
  with pytest.raises(ValueError, match="give snap too"):
    generate.concept_loop(cm, cm_params, z_BxNxD, counts_B, z_end_D, key, num_new=1,
                          objective=objective, steps=4, guidance=1.0, noise_scale=1.0,
                          end_cosine=2.0, num_candidates=c, draft_snap=snaps[1])


def test_draft_steps_default_to_the_config_and_are_checked(concepts_gen, monkeypatch):
  gen = concepts_gen
  kwargs = dict(num_concepts=3, seed=1, reencode=True, candidate_rule="roundtrip")
  ids = lambda samples: [s.token_ids for s in samples]  # noqa: E731
  assert gen.config.concepts.draft_steps == 0
  full = ids(generate.generate(gen, PROMPTS, num_candidates=4, **kwargs))
  drafted = ids(generate.generate(gen, PROMPTS, num_candidates=4, draft_steps=1, **kwargs))
  configured = dataclasses.replace(gen, config=gen.config.copy_and_resolve_references())
  configured.config.concepts.draft_steps = 1
  assert ids(generate.generate(configured, PROMPTS, num_candidates=4, **kwargs)) == drafted
  assert ids(generate.generate(configured, PROMPTS, num_candidates=4, draft_steps=0,
                               **kwargs)) == full
  # The steps shown are the kept chunk's full render (8 steps), not its draft's.
  shown = generate.generate(gen, PROMPTS, num_candidates=4, draft_steps=1, show_steps=True,
                            render_steps=8, **kwargs)
  assert ids(shown) == drafted and all(len(s.steps) == 8 for s in shown)
  # One candidate: nothing to draft (and nothing checked), the plain sampler's program.
  seen = []
  monkeypatch.setattr(generate, "_generate_concepts", lambda g, p, opts, key: seen.append(opts))
  for steps in (8, 1):
    generate.generate(gen, PROMPTS, num_candidates=1, render_steps=steps, **kwargs)
    generate.generate(configured, PROMPTS, num_candidates=1, render_steps=steps, **kwargs)
  assert seen[0] == seen[1] and seen[2] == seen[3] and {o.draft_steps for o in seen} == {0}
  for bad in (-1, 8, 1.5):
    with pytest.raises(generate.GenerateError, match=f"draft_steps={bad} must be"):
      generate.generate(gen, PROMPTS, num_candidates=4, draft_steps=bad, render_steps=8,
                        **kwargs)
  with pytest.raises(generate.GenerateError, match="only reencode=True renders"):
    generate.generate(gen, PROMPTS, num_candidates=4, draft_steps=1, reencode=False)


def test_end_temperature_generation_defaults_to_the_config(concepts_gen):
  gen = concepts_gen
  kwargs = dict(num_concepts=3, seed=1, temperature=0.5, guidance=2.0, reencode=True)
  ids = lambda samples: [s.token_ids for s in samples]  # noqa: E731
  plain = ids(generate.generate(gen, PROMPTS, **kwargs))
  assert gen.config.concepts.end_temperature == 0.0
  assert ids(generate.generate(gen, PROMPTS, end_temperature=0.0, **kwargs)) == plain
  guarded = generate.generate(gen, PROMPTS, end_temperature=1.0, **kwargs)
  assert ids(guarded) == ids(generate.generate(gen, PROMPTS, end_temperature=1.0, **kwargs))
  l = gen.chunk_config.data.concept_len
  assert all(len(s.token_ids) <= 3 * l and EOD_ID not in s.token_ids for s in guarded)
  configured = dataclasses.replace(gen, config=gen.config.copy_and_resolve_references())
  configured.config.concepts.end_temperature = 1.0
  assert ids(generate.generate(configured, PROMPTS, **kwargs)) == ids(guarded)
  with pytest.raises(generate.GenerateError, match="end_temperature=-1"):
    generate.generate(gen, PROMPTS, end_temperature=-1.0)
  with pytest.raises(generate.GenerateError, match="candidate_rule='medoid'"):
    generate.generate(gen, PROMPTS, candidate_rule="medoid")
  with pytest.raises(generate.GenerateError, match="needs reencode=True"):
    generate.generate(gen, PROMPTS, candidate_rule="roundtrip", reencode=False)


def test_end_detection_and_cut():
  end_2x3 = jnp.array([[False, True, False], [False, False, False]])
  assert generate.num_kept(end_2x3).tolist() == [1, 3]
  tokens_1x3x3 = jnp.array([[[7, 8, 0], [EOD_ID, 0, 0], [7, EOD_ID, 0]]])
  z_1x3xD = jnp.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
  near_first = generate.is_end(tokens_1x3x3, z_1x3xD, jnp.array([1.0, 0.0]), 0.9)
  far = generate.is_end(tokens_1x3x3, z_1x3xD, jnp.array([-1.0, 0.0]), 0.9)
  assert near_first.tolist() == [[True, True, False]]
  assert far.tolist() == [[False, True, False]]  # A stray EOD mid-chunk is no END.


def _fake_step(eod_at: int | None, vocab: int = 32):
  """A 'model' whose cache counts steps: emits token 7 + i, or EOD from step eod_at on."""
  def step_fn(i, tokens_Bx1):
    tok = 7 + i if eod_at is None else jnp.where(i >= eod_at, EOD_ID, 7 + i)
    logits_V = jax.nn.one_hot(tok, vocab) * 10.0
    logits_Bx1xV = jnp.broadcast_to(logits_V, (tokens_Bx1.shape[0], 1, vocab))
    return logits_Bx1xV, i + 1
  return step_fn


def test_ar_loop_stops_each_row_at_eod():
  tokens_2x10 = np.zeros((2, 10), np.int32)
  tokens_2x10[0, :2] = [BOS_ID, 10]
  tokens_2x10[1, :4] = [BOS_ID, 10, 11, 12]
  out = generate.ar_loop(_fake_step(eod_at=3), 0, jnp.asarray(tokens_2x10), jnp.array([2, 4]),
                         jax.random.key(0), max_new=8, temperature=0.0)
  # Row 0 generates at steps 1, 2, then EOD at step 3; row 1's first token is already EOD.
  assert out[0].tolist() == [BOS_ID, 10, 8, 9, EOD_ID, 0, 0, 0, 0, 0]
  assert out[1].tolist() == [BOS_ID, 10, 11, 12, EOD_ID, 0, 0, 0, 0, 0]


def test_ar_loop_stops_at_max_new():
  tokens_1x10 = np.zeros((1, 10), np.int32)
  tokens_1x10[0, :2] = [BOS_ID, 10]
  out = generate.ar_loop(_fake_step(eod_at=None), 0, jnp.asarray(tokens_1x10), jnp.array([2]),
                         jax.random.key(0), max_new=3, temperature=0.0)
  assert out[0].tolist() == [BOS_ID, 10, 8, 9, 10, 0, 0, 0, 0, 0]


def test_ar_run_generates_and_stops(tiny_ar_run):
  gen = generate.load(tiny_ar_run)
  samples = generate.generate(gen, PROMPTS, max_tokens=12, temperature=0.0)
  for s in samples:
    assert len(s.token_ids) <= 12 and EOD_ID not in s.token_ids and PAD_ID not in s.token_ids
    assert s.ended or len(s.token_ids) == 12


def test_a_long_prompt_among_short_ones_gets_a_call_of_its_own(tiny_ar_run, monkeypatch):
  gen = generate.load(tiny_ar_run)
  long = " ".join(["Mara lives in Oslo. Mara has a cat."] * 12)
  prompts = [*PROMPTS, long, *PROMPTS]
  padded = lambda ps: generate._round_up(max(map(len, generate.prompt_rows(gen, ps))),
                                         generate._PROMPT_BUCKET) + 12
  # Room for the short prompts' calls at their own length, not for a long one beside them.
  cap = len(PROMPTS) * padded(PROMPTS) ** 2
  assert 2 * padded([long]) ** 2 > cap
  parts = generate.flat_parts(gen, prompts, 12, max_attention=cap)
  assert parts == [PROMPTS, [long], PROMPTS]
  assert generate.flat_parts(gen, prompts, 12) == [prompts]  # Under the default cap.
  whole = generate.generate(gen, prompts, max_tokens=12, temperature=0.0)
  monkeypatch.setattr(generate, "FLAT_MAX_ATTENTION", cap)
  split = generate.generate(gen, prompts, max_tokens=12, temperature=0.0)
  assert [s.prompt for s in split] == prompts
  assert [s.text for s in split] == [s.text for s in whole]  # Greedy: the call's shape aside.
  # One call samples with the seed's key itself, as before calls were split.
  key_samples = generate._generate_ar(gen, PROMPTS, 12, 1.0, jax.random.key(3))
  assert [s.text for s in generate.generate(gen, PROMPTS, max_tokens=12, seed=3)] == [
      s.text for s in key_samples]


def test_mdm_run_generates_with_steps(tiny_mdm_run):
  gen = generate.load(tiny_mdm_run)
  samples = generate.generate(gen, PROMPTS[:1], max_tokens=8, render_steps=4, show_steps=True)
  s = samples[0]
  assert len(s.token_ids) <= 8 and MASK_ID not in s.token_ids
  assert len(s.steps) == 4 and "_" in s.steps[0]


def test_show_tokens_marks_masks(concepts_gen):
  tok = concepts_gen.tokenizer
  ids = tok.encode("Mara lives in Oslo.")
  shown = generate.show_tokens(tok, [ids[0], MASK_ID, *ids[2:], PAD_ID])
  assert "_" in shown and shown.startswith(tok.decode(ids[:1]))


def test_bad_inputs_say_what_is_wrong(concepts_gen, tiny_render_run, tmp_path):
  with pytest.raises(generate.GenerateError, match="at least one sentence"):
    generate.generate(concepts_gen, ["   "])
  with pytest.raises(generate.GenerateError, match="render run"):
    generate.generate(generate.load(tiny_render_run), PROMPTS)
  with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
    generate.load(str(tmp_path))


def test_prompt_chunks_match_training_segmentation(concepts_gen):
  chunks_BxPxL, counts_B = generate.prompt_chunks(concepts_gen, PROMPTS)
  c = concepts_gen.chunk_config.data
  doc = segment.tokenize_document(concepts_gen.tokenizer, PROMPTS[0])
  expected_CxL, _ = segment.chunk_document(doc, c.granularity, c.concept_len)
  assert counts_B[0] == len(expected_CxL) - 1  # The END chunk is not part of a prompt.
  np.testing.assert_array_equal(chunks_BxPxL[0, :counts_B[0]], expected_CxL[:-1])


def test_roundtrip_rule_compares_the_prefix_the_renderer_reads(concepts_gen):
  gen, l = concepts_gen, concepts_gen.chunk_config.data.concept_len
  enc_params, cm_params = gen.params["encoder"], gen.params["concept_model"]
  mods, z_BxNxD, counts_B, h_Bx1xE = _prompt_context(gen)
  cm, objective, c = mods["concept_model"], gen.config.concepts.objective, 4
  dims = z_BxNxD.shape[-1] // 4
  snap = generate.snap_fn(mods["encoder"], enc_params, mods["renderer"],
                          gen.render_params["renderer"], steps=8, temperature=0.0, dims=dims)
  prev_Bx1xD = z_BxNxD[np.arange(2), counts_B - 1][:, None]
  unit = lambda x: x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)  # noqa: E731
  for seed in range(3, 20):  # A key where the prefix and the whole concept disagree.
    key = jax.random.key(seed)
    cand_BCx1xD, [(back_BCx1xD, _)] = _loop_candidates(cm, cm_params, h_Bx1xE, prev_Bx1xD,
                                                       key, c, objective, [snap])
    cand, back = (np.asarray(x, np.float64).reshape(2, c, -1)
                  for x in (cand_BCx1xD, back_BCx1xD))
    whole_B = np.argmax(np.sum(unit(cand) * unit(back), -1), -1)
    best_B = np.argmax(np.sum(unit(cand[..., :dims]) * unit(back[..., :dims]), -1), -1)
    if (whole_B != best_B).any():
      break
  assert (whole_B != best_B).any()
  new_BxNxD, _, _ = jit_call(
      generate.concept_loop,
      cm, cm_params, z_BxNxD, counts_B, generate.end_concept(mods["encoder"], enc_params, l),
      key, num_new=1, objective=objective, steps=4, guidance=1.0, noise_scale=1.0,
      end_cosine=2.0, snap=snap, num_candidates=c, candidate_rule="roundtrip",
      render_dims=dims)
  np.testing.assert_allclose(new_BxNxD[:, 0], cand[np.arange(2), best_B], atol=1e-5)
