"""Grain pipeline: batch contract, determinism, sharding, epochs, checkpoint/restore."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.data import DataError, make_dataset, make_tokenizer
from concept_diffusion.data.tokenizer import BOS_ID, EOD_ID, PAD_ID

B, N, L, T = 4, 8, 6, 48


def make_config(source="synthetic", **data):
  config = config_lib.base_config()
  config.data.update(source=source, vocab_size=128, tokenizer_docs=150, eval_docs=24,
                     num_concepts=N, concept_len=L, seq_len=T, **data)
  config.train.batch_size = B
  return config


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return make_tokenizer(make_config(), str(tmp_path_factory.mktemp("work")))


def take(ds, count, state=None):
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(count)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def check_concept_batch(batch, has_end=True):
  tokens, token_mask = batch["tokens"], batch["token_mask"]
  concept_mask, segment_ids = batch["concept_mask"], batch["segment_ids"]
  assert tokens.shape == token_mask.shape == (B, N, L) and tokens.dtype == np.int32
  assert concept_mask.shape == segment_ids.shape == (B, N) and segment_ids.dtype == np.int32
  assert token_mask.dtype == concept_mask.dtype == np.bool_
  assert (tokens[~token_mask] == PAD_ID).all() and (tokens[token_mask] != PAD_ID).all()
  assert (concept_mask == (segment_ids > 0)).all()
  assert not token_mask[~concept_mask].any()  # Padding concepts hold no tokens.
  assert token_mask[concept_mask][:, 0].all()  # Real concepts start with a real token.
  assert (token_mask[..., 1:] <= token_mask[..., :-1]).all()  # PAD only after the tokens.
  for row_ids in segment_ids:  # 1..k ascending, then zeros.
    real = row_ids[row_ids > 0]
    assert real[0] == 1 and (np.diff(real) >= 0).all() and (np.diff(real) <= 1).all()
    assert (row_ids[len(real):] == 0).all()
  ends = (tokens[..., 0] == EOD_ID) & (token_mask.sum(-1) == 1)
  assert ends.any() or not has_end  # END chunks exist ...
  assert (tokens[..., 1:][ends] == PAD_ID).all()  # ... and are exactly [EOD_ID].


@pytest.mark.parametrize("granularity", ["sentence", "sentence_capped", "span"])
def test_concept_batches_follow_the_contract(tok, granularity):
  ds = make_dataset(make_config(granularity=granularity), tok, split="train", view="concepts")
  for batch in take(ds, 3):
    check_concept_batch(batch)
  if granularity == "sentence":
    assert ds.data_stats["truncated_tokens"] >= 0


def test_documents_end_with_their_end_chunk(tok):
  batch = take(make_dataset(make_config(), tok, split="eval", view="concepts"), 1)[0]
  for row in range(B):
    ids, ends = batch["segment_ids"][row], batch["tokens"][row, :, 0] == EOD_ID
    for doc in range(1, ids.max()):  # Every document wholly inside the example (not the last).
      last = np.flatnonzero(ids == doc)[-1]
      assert ends[last] and ends[ids == doc].sum() == 1


def test_flat_batches_follow_the_contract(tok):
  for batch in take(make_dataset(make_config(), tok, split="train", view="flat"), 3):
    tokens, token_mask, segment_ids = batch["tokens"], batch["token_mask"], batch["segment_ids"]
    assert tokens.shape == token_mask.shape == segment_ids.shape == (B, T)
    assert tokens.dtype == segment_ids.dtype == np.int32 and token_mask.dtype == np.bool_
    assert (token_mask == (segment_ids > 0)).all() and (tokens[~token_mask] == PAD_ID).all()
    starts = np.diff(segment_ids, prepend=0, axis=1) > 0
    starts[:, 0] = False  # Position 0 may continue a long document (a later window).
    assert (tokens[starts] == BOS_ID).all()  # Every other document opens with BOS.
    assert (tokens == EOD_ID).any()


def test_same_seed_same_batches_other_seed_differs(tok):
  config = make_config()
  a = take(make_dataset(config, tok, split="train", view="concepts"), 3)
  assert_same(a, take(make_dataset(config, tok, split="train", view="concepts"), 3))
  config.data.seed = 1
  b = take(make_dataset(config, tok, split="train", view="concepts"), 3)
  assert not np.array_equal(a[0]["tokens"], b[0]["tokens"])


def _doc_texts(tok, batches):
  """The set of whole documents (as text) in a list of flat batches."""
  texts = set()
  for batch in batches:
    for tokens, ids in zip(batch["tokens"], batch["segment_ids"]):
      for doc in range(1, ids.max() + 1):
        texts.add(tok.decode(tokens[ids == doc]))
  return texts


def test_processes_read_disjoint_shards(tok):
  config = make_config()
  shards = [take(make_dataset(config, tok, split="eval", view="flat", process_index=i,
                              process_count=2), 2) for i in range(2)]
  assert shards[0][0]["tokens"].shape == (B // 2, T)  # Default: global batch / processes.
  assert not _doc_texts(tok, shards[0]) & _doc_texts(tok, shards[1])


def test_eval_is_one_deterministic_pass(tok):
  ds = make_dataset(make_config(), tok, split="eval", view="concepts")
  first, second = list(ds), list(ds)
  assert_same(first, second)
  ends = sum(((b["tokens"][..., 0] == EOD_ID) & b["concept_mask"]).sum() for b in first)
  assert ends == 24  # Each of the 24 eval documents exactly once.
  assert not first[-1]["concept_mask"].all()  # The last batch is padded with empty examples.


def test_small_corpus_epochs_are_permutations(tmp_path, tok):
  names = ("Mara", "Tovin", "Elda", "Brix", "Joss")  # Words the tokenizer knows.
  texts = [f"{name} lives in Oslo. The cat sat." for name in names] + ["word"]
  (tmp_path / "a.txt").write_text("\n\n".join(texts))
  config = make_config(f"text:{tmp_path}/a.txt", eval_fraction=0.0)
  stream = []
  for batch in take(make_dataset(config, tok, split="train", view="flat"), 12):
    for tokens, ids in zip(batch["tokens"], batch["segment_ids"]):
      stream += [tok.decode(tokens[ids == doc]) for doc in range(1, ids.max() + 1)]
  epochs = [stream[i:i + 6] for i in range(0, 24, 6)]
  assert all(sorted(epoch) == sorted(texts) for epoch in epochs)  # Each document once.
  assert len({tuple(epoch) for epoch in epochs}) > 1  # Reshuffled between epochs.


def test_iterator_state_restores_mid_stream(tok):
  ds = make_dataset(make_config(), tok, split="train", view="concepts")
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON, as grain writes it.
  expected = [next(it) for _ in range(4)]
  assert_same(take(ds, 4, state), expected)


def test_orbax_checkpoint_restores_the_stream(tmp_path, tok):
  ds = make_dataset(make_config(granularity="span"), tok, split="train", view="concepts")
  it = iter(ds)
  for _ in range(5):
    next(it)
  handlers = {"data": grain.checkpoint.CheckpointHandler()}
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                             item_handlers=handlers) as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = [next(it) for _ in range(4)]
  restored = iter(ds)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                             item_handlers=handlers) as manager:
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same([next(restored) for _ in range(4)], expected)


def test_long_documents_are_cut_into_windows(tmp_path, tok):
  text = " ".join(f"Sentence {i} is fine." for i in range(60))
  (tmp_path / "long.txt").write_text(text + "\n\nShort doc.")
  config = make_config(f"text:{tmp_path}/long.txt", eval_fraction=0.0)
  batch = take(make_dataset(config, tok, split="train", view="concepts"), 1)[0]
  check_concept_batch(batch, has_end=False)
  assert batch["concept_mask"].all(axis=1).any()  # A full window of one document.


def _real_chunks(batches):
  """The real chunks of a list of concept batches, in order (examples row-major)."""
  return np.concatenate([b["tokens"][b["concept_mask"]] for b in batches])


def test_fill_examples_packs_every_slot_and_keeps_every_chunk_in_order(tok):
  config = make_config()
  packed = list(make_dataset(config, tok, split="eval", view="concepts"))
  filled = list(make_dataset(config, tok, split="eval", view="concepts", fill_examples=True))
  assert np.mean([b["concept_mask"].mean() for b in packed]) < 0.9  # Padding to recover.
  for batch in filled[:-1]:
    check_concept_batch(batch, has_end=False)
    assert batch["concept_mask"].all()
  np.testing.assert_array_equal(_real_chunks(filled), _real_chunks(packed))
  cut = [b["segment_ids"][:, 0] for b in filled]  # A cut document goes on as segment 1.
  assert len(filled) < len(packed) and all((ids >= 1).all() for ids in cut[:-1])


def test_fill_examples_state_restores_mid_document(tok):
  ds = make_dataset(make_config(), tok, split="train", view="concepts", fill_examples=True)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["offset"] > 0  # Resumes inside a document that the last example cut.
  expected = [next(it) for _ in range(4)]
  assert_same(take(ds, 4, state), expected)


def test_end_keep_drops_end_chunks_only_by_a_fixed_draw_per_document(tok):
  config = make_config()
  is_end = lambda c: (c[:, 0] == EOD_ID) & (c[:, 1:] == PAD_ID).all(-1)
  every = _real_chunks(take(make_dataset(config, tok, split="train", view="concepts"), 40))
  thin_ds = make_dataset(config, tok, split="train", view="concepts", end_keep=0.25)
  thin = _real_chunks(take(thin_ds, 40))
  np.testing.assert_array_equal(thin[~is_end(thin)][:200], every[~is_end(every)][:200])
  share = lambda c: is_end(c).sum() / (~is_end(c)).sum()
  assert 0.1 < share(thin) / share(every) < 0.4  # 0.25 of the documents keep theirs.
  assert_same(take(thin_ds, 3), take(thin_ds, 3))  # A draw per document, not per read.
  # Each document decides alone: two processes' shards keep the one process's END chunks.
  ends = lambda ds: sum(int(is_end(_real_chunks([b])).sum()) for b in ds)
  one = ends(make_dataset(config, tok, split="eval", view="concepts", end_keep=0.5))
  two = sum(ends(make_dataset(config, tok, split="eval", view="concepts", end_keep=0.5,
                              process_index=i, process_count=2)) for i in range(2))
  assert one == two and 0 < one < 24


def test_bad_fill_and_end_arguments(tok):
  config = make_config()
  for value in (0.0, 1.5):
    with pytest.raises(DataError, match=f"end_keep={value}"):
      make_dataset(config, tok, split="train", view="concepts", end_keep=value)
  with pytest.raises(DataError, match="only the concept view has END chunks"):
    make_dataset(config, tok, split="train", view="flat", end_keep=0.5)


def test_bad_arguments(tok):
  config = make_config()
  with pytest.raises(DataError, match="view="):
    make_dataset(config, tok, split="train", view="pixels")
  with pytest.raises(DataError, match="split="):
    make_dataset(config, tok, split="test", view="flat")
  with pytest.raises(DataError, match="process_index=2"):
    make_dataset(config, tok, split="train", view="flat", process_index=2, process_count=2)
  with pytest.raises(DataError, match="train.batch_size=4 is not divisible"):
    make_dataset(config, tok, split="train", view="flat", process_count=3)


@pytest.mark.slow
def test_worker_processes_keep_the_state_contract(tok):
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags.
  ds = make_dataset(make_config(num_workers=2), tok, split="train", view="concepts")
  it = iter(ds)
  check_concept_batch(next(it))
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  assert_same(take(ds, 3, state), expected)
