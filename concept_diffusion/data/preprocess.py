"""Raw source -> tokenized ArrayRecord shards + stats.json, read back by `arrayrecord:GLOB`.

  python -m concept_diffusion.data.preprocess --config=configs/render.py:tiny \\
      --workdir=/tmp/run --output=/tmp/run/shards --num_shards=8 \\
      [--config.data.source=text:/data/*.txt]
  then train with --config.data.source='arrayrecord:/tmp/run/shards/*.array_record'

One record is one tokenized document (its sentences' ids and its text), not a packed
example: the shards then serve every stage, view, granularity and concept length, and the
pipeline packs them with random access to documents (no index pass). Train documents go
round-robin to train-XXXXX-of-YYYYY shards, held-out ones to eval-00000-of-00001; the
tokenizer model is copied next to them (the pipeline checks it matches).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import sys
import time
from typing import Iterator

import numpy as np

from concept_diffusion.data import segment
from concept_diffusion.data import sources
from concept_diffusion.data.errors import DataError
from concept_diffusion.data.tokenizer import MODEL_FILE, Tokenizer

SHARD_SUFFIX = ".array_record"
_WRITER_OPTIONS = "group_size:1"  # One record per chunk: fast random access.


def _raw_documents(config, stats: sources.DataStats, num_docs: int) -> Iterator[tuple[str, str]]:
  """(split, text) of every source document; the synthetic train split is cut at num_docs."""
  spec = sources.parse_source(config.data.source)
  if spec.kind == "synthetic":
    for text in sources.iterate_documents(config, "eval"):
      stats["documents"] += 1
      yield "eval", text
    for text in itertools.islice(sources.iterate_documents(config, "train"), num_docs):
      stats["documents"] += 1
      yield "train", text
  elif spec.kind in ("text", "jsonl"):
    for text in sources.read_files(spec, config.data.max_doc_chars, stats):
      yield sources.split_of(text, config.data.eval_fraction), text
  else:
    raise DataError(f"data.source={config.data.source!r}: preprocess reads synthetic, text: or "
                    "jsonl: sources")


class _Progress:
  """One stderr line, rewritten at most twice a second."""

  def __init__(self):
    self._start = self._last = time.time()

  def update(self, stats: collections.Counter, final: bool = False) -> None:
    now = time.time()
    if not final and now - self._last < 0.5:
      return
    self._last = now
    rate = stats["documents"] / max(now - self._start, 1e-9)
    sys.stderr.write(f"\rpreprocess: {stats['documents']:,} documents, {stats['tokens']:,} "
                     f"tokens, {stats.skipped:,} skipped, {rate:,.0f} docs/s")
    if final:
      sys.stderr.write("\n")
    sys.stderr.flush()


def _count(stats: sources.DataStats, doc: segment.TokenizedDoc, config) -> None:
  """Adds one document's sentences, chunks and tokens to the stats."""
  chunks_CxL, overflow = segment.chunk_document(doc, config.data.granularity,
                                                config.data.concept_len)
  stats["sentences"] += len(doc.sentence_lens_S)
  stats["tokens"] += len(doc.tokens_T)
  stats["chunks"] += len(chunks_CxL)  # END chunks included.
  stats["truncated_tokens"] += overflow


def _shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def preprocess(config, tokenizer: Tokenizer, output_dir: str, num_shards: int = 8,
               num_docs: int = 100_000) -> dict:
  """Writes shards, tokenizer.model and stats.json to output_dir; returns the stats."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if num_shards < 1:
    raise DataError(f"--num_shards={num_shards} must be >= 1")
  os.makedirs(output_dir, exist_ok=True)
  stats, progress = sources.DataStats(), _Progress()
  writers, records = {}, collections.Counter()
  try:
    for split, text in _raw_documents(config, stats, num_docs):
      doc = segment.tokenize_document(tokenizer, text)
      if not len(doc.tokens_T):
        stats.skip("no_tokens", f"document {stats['documents']}")
        continue
      _count(stats, doc, config)
      count = num_shards if split == "train" else 1
      name = _shard_name(split, records[split] % count, count)
      if name not in writers:
        writers[name] = array_record_module.ArrayRecordWriter(
            os.path.join(output_dir, name), _WRITER_OPTIONS)
      writers[name].write(sources.encode_record(doc, text, tokenizer.vocab_size))
      records[split] += 1
      progress.update(stats)
  finally:
    for writer in writers.values():
      writer.close()
  progress.update(stats, final=True)
  if not records["train"]:
    raise DataError(f"data.source={config.data.source!r} gave no usable train documents")
  tokenizer.save(output_dir)
  summary = dict(sorted(stats.items()), skipped=stats.skipped,
                 train_documents=records["train"], eval_documents=records["eval"],
                 shards=sorted(writers), tokenizer=MODEL_FILE,
                 tokenizer_fingerprint=tokenizer.fingerprint, source=config.data.source,
                 granularity=config.data.granularity, concept_len=config.data.concept_len)
  with open(os.path.join(output_dir, "stats.json"), "w") as f:
    json.dump(summary, f, indent=2, default=lambda x: int(x) if isinstance(x, np.integer) else x)
  return summary


def main(argv) -> None:
  """CLI entry point (absl flags)."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from concept_diffusion import config as config_lib  # pylint: disable=g-import-not-at-top
  from concept_diffusion.data.pipeline import make_tokenizer  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config if f.config is not None else config_lib.base_config()
  config_lib.validate(config)
  tokenizer = make_tokenizer(config, f.workdir)
  output = f.output or os.path.join(f.workdir, "shards")
  summary = preprocess(config, tokenizer, output, f.num_shards, f.num_docs)
  print(json.dumps({k: v for k, v in summary.items() if k != "shards"}, indent=2))
  print(f"train with --config.data.source='arrayrecord:{output}/*{SHARD_SUFFIX}'")


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/render.py:tiny.")
  flags.DEFINE_string("workdir", None, "Run folder; its tokenizer/ is used or trained.",
                      required=True)
  flags.DEFINE_string("output", None, "Shard folder (default WORKDIR/shards).")
  flags.DEFINE_integer("num_shards", 8, "Train shards to write.")
  flags.DEFINE_integer("num_docs", 100_000, "Train documents taken from the synthetic corpus.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
