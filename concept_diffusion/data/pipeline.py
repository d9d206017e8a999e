"""Grain pipeline: documents -> tokenized items -> packed examples -> batches.

  tok = make_tokenizer(config, workdir)
  ds = make_dataset(config, tok, split="train", view="concepts",
                    process_index=jax.process_index(), process_count=jax.process_count())
  it = iter(ds)  # Checkpoint with grain.checkpoint.CheckpointSave(it) / CheckpointRestore(it).

Stages, all deterministic given `config.data.seed`:
  1. random-access documents of this process (`docs[process_index::process_count]`),
     shuffled and repeated forever for train, in order and once for eval;
  2. tokenize and cut each document into one item (cached where the corpus is finite):
     `chunks_CxL` (concept view, END chunk last) or `BOS tokens EOD` (flat view);
  3. pack (an iterator stage whose state is the parent's state before the open document plus
     the offset into it, so a restored iterator continues exactly): items are placed whole,
     one after another, into examples of N concepts (or T tokens); an item that does not fit
     closes the example (padding), an item longer than a whole example is cut into windows.
     With fill_examples (train batches, data.fill_examples) an item is cut where the example
     ends and goes on in the next as its first segment, so no slot is padding;
  4. batch; masks are computed from the stacked arrays.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Sequence

import grain
import numpy as np

from concept_diffusion.data import segment
from concept_diffusion.data import sources
from concept_diffusion.data.errors import DataError
from concept_diffusion.data.tokenizer import MODEL_FILE, PAD_ID, Tokenizer, train_tokenizer

VIEWS = ("concepts", "flat")
TOKENIZER_DIR = "tokenizer"
# Tokenized documents kept per dataset for finite corpora (file sources, synthetic eval).
_CACHE_DOCS = 1 << 20
# Below this many documents a numpy permutation per epoch replaces grain's index shuffle,
# which costs milliseconds per element on tiny datasets.
_SMALL_CORPUS_DOCS = 1 << 20
# Reader threads: 0 = inline, as tokenizing is GIL-bound (data.num_workers adds processes).
_READ_THREADS = 0


def make_tokenizer(config, workdir: str) -> Tokenizer:
  """Loads WORKDIR/tokenizer/tokenizer.model, or trains (or copies) one and saves it there."""
  directory = os.path.join(workdir, TOKENIZER_DIR)
  if os.path.isfile(os.path.join(directory, MODEL_FILE)):
    return Tokenizer.load(directory)
  spec = sources.parse_source(config.data.source)
  if spec.kind == "arrayrecord":  # Shards are tokenized already: use their tokenizer.
    shard_model = os.path.join(sources.shard_directory(spec.pattern), MODEL_FILE)
    tokenizer = Tokenizer.load(shard_model)
  else:
    docs = sources.iterate_documents(config, "train")
    first_docs = (doc for _, doc in zip(range(config.data.tokenizer_docs), docs))
    tokenizer = train_tokenizer(first_docs, config.data.vocab_size,
                                config.data.tokenizer_model)
  if tokenizer.vocab_size > config.data.vocab_size:
    raise DataError(f"tokenizer has {tokenizer.vocab_size} ids but data.vocab_size="
                    f"{config.data.vocab_size}; raise data.vocab_size")
  tokenizer.save(directory)
  return tokenizer


class ItemSource:
  """Random-access items: `[i]` tokenizes document i and cuts it into its view's item."""

  def __init__(self, docs, tokenizer: Tokenizer, to_item: Callable, cache: bool,
               end_keep: float = 1.0, seed: int = 0):
    self._docs, self._tokenizer, self._to_item = docs, tokenizer, to_item
    # Finite corpora are read again every epoch: keep their items, not just their text.
    self._cache = {} if cache else None
    self._end_keep, self._seed = end_keep, seed

  def __len__(self) -> int:
    return len(self._docs)

  def _make(self, index: int) -> np.ndarray:
    item = self._docs[index]
    if isinstance(item, tuple):  # Preprocessed shards: tokens are stored.
      out = self._to_item(item[0])
    else:
      out = self._to_item(segment.tokenize_document(self._tokenizer, item))
    if self._end_keep < 1.0 and len(out) and not self._keeps_end(index):
      out = out[:-1]  # The END chunk is last (ToItem), the same one-token chunk everywhere.
    return out

  def _keeps_end(self, index: int) -> bool:
    """Whether document `index` keeps its END chunk: fixed by (seed, index), so the same
    for any process count and every epoch."""
    return np.random.default_rng([self._seed, index, 0xE0D]).random() < self._end_keep

  def __getitem__(self, index: int) -> np.ndarray:
    index = int(index)
    if self._cache is None:
      return self._make(index)
    item = self._cache.get(index)
    if item is None:
      item = self._make(index)
      if len(self._cache) < _CACHE_DOCS:
        self._cache[index] = item
    return item


def check_shard_tokenizer(config, tokenizer: Tokenizer) -> None:
  """Preprocessed shards must have been written with this very tokenizer."""
  spec = sources.parse_source(config.data.source)
  if spec.kind != "arrayrecord":
    return
  shard_model = os.path.join(sources.shard_directory(spec.pattern), MODEL_FILE)
  if (os.path.isfile(shard_model)
      and Tokenizer.load(shard_model).fingerprint != tokenizer.fingerprint):
    raise DataError(f"the shards {spec.pattern} were tokenized with {shard_model}, not with the "
                    "tokenizer given; copy that model into WORKDIR/tokenizer/ or re-preprocess")


class ToItem:
  """Document -> one item: chunks_CxL (concept view) or the flat token row."""

  def __init__(self, view: str, granularity: str, chunk_len: int, stats: sources.DataStats):
    self.view, self.granularity, self.chunk_len, self.stats = view, granularity, chunk_len, stats

  def __call__(self, doc: segment.TokenizedDoc) -> np.ndarray:
    if not len(doc.tokens_T):  # Nothing the tokenizer keeps (e.g. only spaces): no item.
      self.stats.skip("no_tokens", "a document")
      return np.zeros((0,) if self.view == "flat" else (0, self.chunk_len), np.int32)
    if self.view == "flat":
      return segment.flat_document(doc)
    chunks_CxL, overflow = segment.chunk_document(doc, self.granularity, self.chunk_len)
    if overflow:
      if not self.stats["truncated_tokens"]:
        logging.warning("data.granularity=sentence: sentences longer than data.concept_len=%d "
                        "are truncated; the cut tokens are counted in stats", self.chunk_len)
      self.stats["truncated_tokens"] += overflow
    return chunks_CxL


class EpochShuffleMapDataset(grain.MapDataset):
  """Endless epochs, each a fresh permutation of the parent seeded by (seed, epoch)."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._size, self._seed = len(parent), seed
    self._epoch_order = (-1, None)  # The current epoch and its permutation.

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochShuffleMapDataset(seed={self._seed})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(int(index), self._size)
    if self._epoch_order[0] != epoch:
      order = np.random.default_rng([self._seed, epoch]).permutation(self._size)
      self._epoch_order = (epoch, order)
    return self._parent[int(self._epoch_order[1][position])]


class _PackIterator(grain.DatasetIterator):
  """Packs items into examples of `capacity` rows; see the module docstring (stage 3)."""

  def __init__(self, parent: grain.DatasetIterator, capacity: int, fill: bool = False):
    super().__init__(parent)
    self._capacity, self._fill = capacity, fill
    self._item = None  # The open item, partly placed.
    self._offset = 0  # Rows of the open item already placed.
    self._item_state = None  # Parent state from before the open item was read.

  def _open_next(self) -> bool:
    self._item_state = self._parent.get_state()
    try:
      self._item = next(self._parent)
    except StopIteration:
      self._item = None
      return False
    self._offset = 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    pieces, used = [], 0
    while used < self._capacity:
      if self._item is None and not self._open_next():
        break
      if not len(self._item):
        self._item = None
        continue
      left, space = len(self._item) - self._offset, self._capacity - used
      if left > space and used and not self._fill:
        break  # Starts the next example rather than losing its beginning here.
      take = min(left, space)
      pieces.append(self._item[self._offset:self._offset + take])
      used += take
      self._offset += take
      if self._offset == len(self._item):
        self._item = None
    if not pieces:
      raise StopIteration
    return _assemble(pieces, self._capacity)

  def get_state(self) -> dict[str, Any]:
    if self._item is None:
      return {"parent": self._parent.get_state(), "offset": -1}
    return {"parent": self._item_state, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._item = None
    if state["offset"] >= 0:
      self._open_next()
      self._offset = state["offset"]


def _assemble(pieces: Sequence[np.ndarray], capacity: int) -> dict[str, np.ndarray]:
  """Places pieces one after another; segment ids 1..k, 0 (and PAD) after them."""
  used = sum(len(p) for p in pieces)
  rows = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
  tokens = np.full((capacity,) + rows.shape[1:], PAD_ID, np.int32)
  tokens[:used] = rows
  segment_ids = np.zeros((capacity,), np.int32)
  segment_ids[:used] = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32),
                                 [len(p) for p in pieces])
  return {"tokens": tokens, "segment_ids": segment_ids}


class PackIterDataset(grain.IterDataset):
  """Packs variable-length items into fixed examples, checkpointably."""

  def __init__(self, parent: grain.IterDataset, capacity: int, fill: bool = False):
    super().__init__(parent)
    self._capacity, self._fill = capacity, fill

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._capacity, self._fill)

  def __str__(self) -> str:
    return f"PackIterDataset(capacity={self._capacity}, fill={self._fill})"


def _batch_fn(batch_size: int, view: str) -> Callable[[Sequence[dict]], dict[str, np.ndarray]]:
  """Stacks examples into the contract's batch dict (a short last eval batch is padded)."""

  def batch(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    tokens = np.stack([e["tokens"] for e in examples])
    segment_ids = np.stack([e["segment_ids"] for e in examples])
    if len(examples) < batch_size:  # Empty examples: every mask False, shapes stay fixed.
      pad = batch_size - len(examples)
      tokens = np.concatenate([tokens, np.full((pad,) + tokens.shape[1:], PAD_ID, np.int32)])
      segment_ids = np.concatenate([segment_ids, np.zeros((pad, segment_ids.shape[1]), np.int32)])
    if view == "flat":
      return {"tokens": tokens, "token_mask": segment_ids > 0, "segment_ids": segment_ids}
    return {"tokens": tokens, "token_mask": tokens != PAD_ID,
            "concept_mask": segment_ids > 0, "segment_ids": segment_ids}

  return batch


def _local_batch_size(config, process_count: int, batch_size: int | None) -> int:
  if batch_size is not None:
    if batch_size <= 0:
      raise DataError(f"batch_size={batch_size} must be > 0")
    return batch_size
  if config.train.batch_size % process_count:
    raise DataError(f"train.batch_size={config.train.batch_size} is not divisible by the "
                    f"{process_count} processes")
  return config.train.batch_size // process_count


def item_dataset(config, tokenizer: Tokenizer, split: str, view: str, process_index: int,
                 process_count: int, stats: sources.DataStats,
                 end_keep: float = 1.0) -> grain.MapDataset:
  """This process's items of `split`: shuffled and endless for train, one pass for eval."""
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is outside [0, {process_count})")
  docs = sources.document_source(config, split)
  to_item = ToItem(view, config.data.granularity, config.data.concept_len, stats)
  if isinstance(docs, sources.TextDocs):
    stats.update(docs.stats)  # Documents skipped while reading the files.
  finite = not isinstance(docs, sources.SyntheticDocs) or split == "eval"
  cache = finite and not isinstance(docs, sources.ArrayRecordDocs)
  ds = grain.MapDataset.source(ItemSource(docs, tokenizer, to_item, cache, end_keep,
                                          config.data.seed))
  ds = ds[process_index::process_count]  # Disjoint: each process reads only its share.
  if not len(ds):
    raise DataError(f"data.source={config.data.source!r} has {len(docs)} {split} documents, "
                    f"too few for {process_count} processes")
  if split == "train":
    if len(ds) <= _SMALL_CORPUS_DOCS:
      ds = EpochShuffleMapDataset(ds, config.data.seed)
    else:
      ds = ds.shuffle(seed=config.data.seed).repeat()
  return ds


def make_dataset(config, tokenizer: Tokenizer, *, split: str, view: str, process_index: int = 0,
                 process_count: int = 1, batch_size: int | None = None,
                 fill_examples: bool = False, end_keep: float = 1.0) -> grain.IterDataset:
  """Batches of `split` in `view` ("concepts" or "flat") for one process; see module doc.

  fill_examples: cut items across examples so no slot is padding (stage 3). end_keep: the
  share of documents whose END chunk is kept (concept view), a fixed draw per document.
  """
  if view not in VIEWS:
    raise DataError(f"view={view!r} is not one of {VIEWS}")
  if not 0.0 < end_keep <= 1.0:
    raise DataError(f"end_keep={end_keep!r} must lie in (0, 1]")
  if end_keep < 1.0 and view != "concepts":
    raise DataError(f"end_keep={end_keep!r}: only the concept view has END chunks")
  if config.data.granularity not in segment.GRANULARITIES:
    raise DataError(f"data.granularity={config.data.granularity!r} is not one of "
                    f"{segment.GRANULARITIES}")
  check_shard_tokenizer(config, tokenizer)
  local_batch = _local_batch_size(config, process_count, batch_size)
  if sources.parse_source(config.data.source).kind == "concepts":  # Encoded offline.
    from concept_diffusion.data import concept_cache  # pylint: disable=g-import-not-at-top
    if view != "concepts":
      raise DataError(f"data.source={config.data.source!r} is a concept cache: only the "
                      "concepts stage (view='concepts') can read it")
    if fill_examples or end_keep < 1.0:
      raise DataError(f"data.source={config.data.source!r} is a concept cache, packed when it "
                      "was written: fill_examples and end_keep do not apply")
    return concept_cache.cache_dataset(config, split=split, process_index=process_index,
                                       process_count=process_count, batch_size=local_batch)
  stats = sources.DataStats()
  ds = item_dataset(config, tokenizer, split, view, process_index, process_count, stats,
                    end_keep)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS))
  capacity = config.data.num_concepts if view == "concepts" else config.data.seq_len
  ds = PackIterDataset(ds, capacity, fill_examples)
  ds = ds.batch(local_batch, drop_remainder=split == "train", batch_fn=_batch_fn(local_batch, view))
  if config.data.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  ds.data_stats = stats  # Truncated tokens and skipped documents, for the trainer's logs.
  return ds
