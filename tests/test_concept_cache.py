"""Concept cache: round trip, crash/resume, parallel writers, grain reading, stage hook."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion import plan
from concept_diffusion.data import DataError, concept_cache, make_dataset, make_tokenizer
from concept_diffusion.data.tokenizer import PAD_ID
from concept_diffusion.models.encoder import ConceptEncoder
from concept_diffusion.models.layers import ModelConfig
from concept_diffusion.train import stages

N, L, D, B = 8, 6, 16, 4


def make_config(**data):
  config = config_lib.base_config()
  config.data.update(**{**dict(vocab_size=128, tokenizer_docs=150, eval_docs=24,
                              num_concepts=N, concept_len=L), **data})
  config.model.update(embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
                      concept_dim=D, encoder_layers=1, renderer_layers=1, concept_layers=1,
                      diff_head_layers=1, diff_head_dim=32)
  config.train.batch_size = B
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(config, tokenizer, encoder params, encode_fn) with a random-init encoder."""
  config = make_config()
  tok = make_tokenizer(config, str(tmp_path_factory.mktemp("work")))
  enc = ConceptEncoder(ModelConfig.from_config(config, tok.vocab_size))
  tokens = jnp.zeros((1, N, L), jnp.int32)
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                        enc.init(jax.random.key(1), tokens, tokens > 0)["params"],
                        is_leaf=lambda x: hasattr(x, "names"))
  apply = jax.jit(lambda t, m: enc.apply({"params": params}, t, m))
  return config, tok, params, lambda t, m: np.asarray(apply(t, m))


def expected_rows(config, tok, encode_fn, count, process_index=0, process_count=1):
  """What the cache must hold: packed examples encoded on the fly."""
  it = concept_cache.packed_examples(config, tok, "train", process_index, process_count)
  rows = [next(it) for _ in range(count)]
  tokens = np.stack([r["tokens"] for r in rows])
  seg = np.stack([r["segment_ids"] for r in rows])
  return encode_fn(tokens, tokens != PAD_ID), seg, tokens


def read_all(path, split="train"):
  reader = concept_cache.CacheReader(path, split)
  return reader, reader.read(reader.rows)


def test_round_trip_equals_on_the_fly(setup, tmp_path):
  config, tok, _, encode_fn = setup
  marker = concept_cache.write_cache(str(tmp_path), config, tok, encode_fn, num_examples=20,
                                     chunk_rows=4, rows_per_write=8, progress=False)
  assert marker == {**marker, "rows": 20, "done": True}
  reader, got = read_all(str(tmp_path))
  z, seg, _ = expected_rows(config, tok, encode_fn, 20)
  np.testing.assert_allclose(got["concepts"], z, atol=1e-5)
  np.testing.assert_array_equal(got["segment_ids"], seg)
  np.testing.assert_array_equal(got["concept_mask"], seg > 0)
  assert len(reader) == 20


def test_crash_then_resume_has_no_duplicates_or_gaps(setup, tmp_path):
  config, tok, _, encode_fn = setup
  kwargs = dict(num_examples=30, chunk_rows=4, rows_per_write=8, progress=False)
  path = str(tmp_path / "crashed")
  with pytest.raises(RuntimeError, match="simulated crash"):
    concept_cache.write_cache(path, config, tok, encode_fn, fail_after_writes=2, **kwargs)
  with pytest.raises(DataError, match="incomplete"):
    concept_cache.CacheReader(path, "train")
  concept_cache.write_cache(path, config, tok, encode_fn, **kwargs)
  concept_cache.write_cache(str(tmp_path / "clean"), config, tok, encode_fn, **kwargs)
  _, resumed = read_all(path)
  _, clean = read_all(str(tmp_path / "clean"))
  for name in concept_cache.ARRAYS:
    np.testing.assert_array_equal(resumed[name], clean[name])
  assert resumed["concept_mask"].any(axis=1).all()  # No empty (never written) row.


def test_two_writers_own_disjoint_rows(setup, tmp_path):
  config, tok, _, encode_fn = setup
  for p in (1, 0):  # Order does not matter.
    concept_cache.write_cache(str(tmp_path), config, tok, encode_fn, num_examples=18,
                              process_index=p, process_count=2, chunk_rows=4,
                              rows_per_write=4, progress=False)
  reader, got = read_all(str(tmp_path))
  assert list(reader.rows) == list(range(18))  # R = 12 rows (3 chunks) then 6.
  for p, (lo, hi) in enumerate([(0, 12), (12, 18)]):
    z, seg, _ = expected_rows(config, tok, encode_fn, hi - lo, p, 2)
    np.testing.assert_allclose(got["concepts"][lo:hi], z, atol=1e-5)
    np.testing.assert_array_equal(got["segment_ids"][lo:hi], seg)


def test_resuming_with_other_settings_is_refused(setup, tmp_path):
  config, tok, _, encode_fn = setup
  concept_cache.write_cache(str(tmp_path), config, tok, encode_fn, num_examples=8,
                            chunk_rows=4, rows_per_write=4, progress=False)
  with pytest.raises(DataError, match="num_examples"):
    concept_cache.write_cache(str(tmp_path), config, tok, encode_fn, num_examples=12,
                              chunk_rows=4, rows_per_write=4, progress=False)



def test_filled_cache_holds_filled_examples_and_refuses_a_padded_one(setup, tmp_path):
  """data.fill_examples packs the cache's train rows as make_dataset fills them."""
  config, tok, _, encode_fn = setup
  filled = make_config(fill_examples=True)
  concept_cache.write_cache(str(tmp_path), filled, tok, encode_fn, num_examples=8,
                            chunk_rows=4, rows_per_write=4, progress=False)
  _, got = read_all(str(tmp_path))
  assert got["concept_mask"].all()  # Every slot a concept; padded examples leave some empty.
  _, _, tokens = expected_rows(config, tok, encode_fn, 8)
  assert not (tokens != PAD_ID).any(-1).all()
  z, seg, _ = expected_rows(filled, tok, encode_fn, 8)
  np.testing.assert_allclose(got["concepts"], z, atol=1e-5)
  np.testing.assert_array_equal(got["segment_ids"], seg)
  with pytest.raises(DataError, match="fill_examples=True, not None"):
    concept_cache.write_cache(str(tmp_path), config, tok, encode_fn, num_examples=8,
                              chunk_rows=4, rows_per_write=4, progress=False)
  with pytest.raises(DataError, match="fill_examples and end_keep do not apply"):
    make_dataset(make_config(source=f"concepts:{tmp_path}"), tok, split="train",
                 view="concepts", fill_examples=True)

@pytest.fixture(scope="module")
def cache(setup, tmp_path_factory):
  config, tok, _, encode_fn = setup
  path = str(tmp_path_factory.mktemp("cache"))
  for split in ("train", "eval"):
    concept_cache.write_cache(path, config, tok, encode_fn, num_examples=22, split=split,
                              chunk_rows=4, rows_per_write=8, progress=False)
  return path


def cache_config(path, **data):
  config = make_config(source=f"concepts:{path}", **data)
  return config


def take(it, count):
  return [next(it) for _ in range(count)]


def test_make_dataset_reads_the_cache_deterministically_and_resumes(setup, cache):
  _, tok, _, _ = setup
  config = cache_config(cache)
  ds = make_dataset(config, tok, split="train", view="concepts")
  first = take(iter(ds), 12)  # Past one epoch (22 examples / 4).
  assert set(first[0]) == {"concepts", "concept_mask", "segment_ids"}
  assert first[0]["concepts"].shape == (B, N, D) and first[0]["concepts"].dtype == np.float32
  again = take(iter(make_dataset(config, tok, split="train", view="concepts")), 12)
  it = iter(ds)
  take(it, 5)
  state = it.get_state()
  restored = iter(make_dataset(config, tok, split="train", view="concepts"))
  restored.set_state(state)
  for a, b, c in zip(first, again, [None] * 5 + take(restored, 7)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
      if c is not None:
        np.testing.assert_array_equal(a[k], c[k])
  # One epoch is a permutation of the cache: every example exactly once.
  _, stored = read_all(cache)
  epoch = np.concatenate([b["concepts"] for b in first])[:22]
  assert sorted(map(bytes, epoch.reshape(22, -1))) == sorted(
      map(bytes, stored["concepts"].reshape(22, -1)))


def test_processes_read_disjoint_shards_and_eval_is_one_pass(setup, cache):
  _, tok, _, _ = setup
  config = cache_config(cache)
  shards = [np.concatenate([b["concepts"] for b in take(iter(make_dataset(
      config, tok, split="train", view="concepts", process_index=p, process_count=2,
      batch_size=11)), 1)]) for p in range(2)]
  rows = {bytes(r) for s in shards for r in s.reshape(11, -1)}
  assert len(rows) == 22
  eval_batches = list(make_dataset(config, tok, split="eval", view="concepts"))
  assert len(eval_batches) == 6  # ceil(22 / 4); the last holds 2 real examples.
  assert not eval_batches[-1]["concept_mask"][2:].any()


def test_cache_mismatch_names_the_field(setup, cache):
  _, tok, _, _ = setup
  with pytest.raises(DataError, match="data.num_concepts"):
    make_dataset(cache_config(cache, num_concepts=N * 2), tok, split="train", view="concepts")
  with pytest.raises(DataError, match="view"):
    make_dataset(cache_config(cache), tok, split="train", view="flat")


def test_concepts_stage_loss_is_the_same_from_the_cache(setup, cache):
  config, tok, enc_params, encode_fn = setup
  concepts = plan.with_render_config(config, config)
  concepts.stage = "concepts"
  stage = stages.build_stage(concepts, tok, for_training=False)
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x,
                        stage.init_params(jax.random.key(0)), is_leaf=lambda x: hasattr(x, "names"))
  params = {**params, "encoder": enc_params}
  z, seg, tokens = expected_rows(config, tok, encode_fn, B)
  on_the_fly = {"tokens": tokens, "token_mask": tokens != PAD_ID, "concept_mask": seg > 0,
                "segment_ids": seg}
  cached = {"concepts": z, "concept_mask": seg > 0, "segment_ids": seg}
  key = jax.random.key(3)
  loss_a, _ = stage.loss_fn(params, on_the_fly, key)
  loss_b, _ = stage.loss_fn(params, cached, key)
  np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)


def test_encode_cli_then_concepts_stage_trains_on_the_cache(tmp_path):
  """render run -> python -m concept_diffusion.encode -> concepts run reading the cache."""
  import os
  import subprocess
  import sys
  from concept_diffusion.train import trainer
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  render = make_config()
  render.train.update(num_steps=2, warmup_steps=1, log_every=1)
  render.checkpoint.update(every_steps=2, async_save=False)
  trainer.train(render, str(tmp_path / "render"))
  out = subprocess.run(
      [sys.executable, "-m", "concept_diffusion.encode", f"--render_workdir={tmp_path}/render",
       f"--output={tmp_path}/cache", "--num_examples=24", "--chunk_rows=4",
       "--rows_per_write=8", f"--config.data.num_concepts={N}"],
      cwd=root, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "24 examples" in out.stdout
  concepts = make_config(source=f"concepts:{tmp_path}/cache")
  concepts.stage = "concepts"
  concepts.concepts.render_workdir = str(tmp_path / "render")
  concepts.train.update(num_steps=2, warmup_steps=1, log_every=1)
  concepts.checkpoint.update(every_steps=2, async_save=False)
  metrics = trainer.train(concepts, str(tmp_path / "concepts"))
  assert np.isfinite(metrics["loss"])
  with open(tmp_path / "concepts" / "config.json") as f:  # The cache, not the render source.
    assert json.load(f)["data"]["source"] == f"concepts:{tmp_path}/cache"
  # concepts.cache_examples: the run writes the same cache itself, and trains the same.
  own = make_config()
  own.stage = "concepts"
  own.concepts.update(render_workdir=str(tmp_path / "render"), cache_examples=24)
  own.train.update(num_steps=2, warmup_steps=1, log_every=1)
  own.checkpoint.update(every_steps=2, async_save=False)
  trainer.train(own, str(tmp_path / "own"))
  ours = concept_cache.CacheReader(str(tmp_path / "own" / trainer.CACHE_DIR), "train")
  cli = concept_cache.CacheReader(str(tmp_path / "cache"), "train")
  rows = np.arange(24)
  np.testing.assert_array_equal(ours.read(rows)["concepts"], cli.read(rows)["concepts"])
  from concept_diffusion import evaluation
  losses = lambda run: [m["loss"] for m in evaluation.load_metrics(str(tmp_path / run))]
  assert losses("own") == losses("concepts")
  with open(tmp_path / "own" / "config.json") as f:  # Its source stays the text one.
    assert json.load(f)["data"]["source"] == "synthetic"
  with pytest.raises(config_lib.ConfigError, match="concepts.render_weight"):
    own.concepts.render_weight = 1.0
    trainer.train(own, str(tmp_path / "own2"))


def test_encode_fn_builds_the_encoder_at_the_tokenizers_vocab(setup):
  """A tokenizer can stop short of data.vocab_size; the encoder was built at its size."""
  from concept_diffusion import encoding
  config, tok, params, encode_fn = setup
  asked = config.copy_and_resolve_references()
  asked.data.vocab_size = tok.vocab_size + 64
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  fn = encoding.make_encode_fn(asked, {"encoder": params}, mesh, tok.vocab_size)
  tokens = np.ones((3, N, L), np.int32)
  np.testing.assert_allclose(fn(tokens, tokens > 0), encode_fn(tokens, tokens > 0), rtol=1e-6)
