"""Document sources chosen by `config.data.source`, with their train/eval split.

  synthetic               built-in corpus; eval = documents [0, eval_docs), train = the rest
  text:GLOB               UTF-8 text files, documents separated by blank lines
  jsonl:GLOB[:field]      one JSON object a line, the document in `field` (default "text")
  arrayrecord:GLOB        tokenized shards written by `concept_diffusion.data.preprocess`

A third split, "dev", holds prompts for choosing sampling settings apart from the eval
prompts that results are reported on; no run trains on it. Synthetic: documents
[0, eval_docs) of another draw of the corpus (seed corpus_seed + DEV_SEED_SHIFT); file
sources: the eval split read from its last document back (disjoint from the first
`len - n` eval documents read in order).

Every source is random access (`len`, `[i]`). File sources are read once into memory and
split by a stable hash of each document (share `data.eval_fraction` held out); for large
corpora, preprocess them into ArrayRecord shards. Unusable input raises `DataError` naming
the file; a bad document inside good input is skipped, counted in `stats` and logged once.
"""

from __future__ import annotations

import collections
import functools
import glob as globlib
import hashlib
import json
import logging
import os
import re
import struct
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from concept_diffusion.data import synthetic
from concept_diffusion.data.errors import DataError
from concept_diffusion.data.segment import TokenizedDoc

SPLITS = ("train", "eval", "dev")
# The dev split's synthetic corpus: a draw of the generator no training run reads.
DEV_SEED_SHIFT = 1 << 20
SYNTHETIC_TRAIN_DOCS = 2**31 - 1  # "Unlimited": more than any run reads.
EVAL_SHARD_PREFIX = "eval"  # ArrayRecord shards named eval-* hold the eval split.
_BINARY_PROBE_BYTES = 8192
_FIELD = re.compile(r"^[A-Za-z_][\w.\-]*$")
_RECORD_MAGIC = b"CDD1"
_HEADER = struct.Struct("<4sIIIB")  # magic, sentences, tokens, text bytes, token itemsize.


class SourceSpec(NamedTuple):
  """A parsed `data.source` string."""
  kind: str  # synthetic | text | jsonl | arrayrecord | concepts
  pattern: str = ""
  field: str = "text"


def parse_source(source: str) -> SourceSpec:
  """Parses `data.source`; raises DataError naming the field on a malformed value."""
  kind, _, rest = source.partition(":")
  if kind == "synthetic" and not rest:
    return SourceSpec("synthetic")
  if kind in ("text", "arrayrecord", "concepts") and rest:
    return SourceSpec(kind, rest)
  if kind == "jsonl" and rest:
    head, sep, tail = rest.rpartition(":")
    # gs://bucket/x.jsonl also holds a colon: only a bare identifier after it is a field.
    if sep and head and "/" not in tail and "*" not in tail and _FIELD.match(tail):
      return SourceSpec("jsonl", head, tail)
    return SourceSpec("jsonl", rest)
  raise DataError(f"data.source={source!r} is not one of synthetic | text:GLOB | "
                  "jsonl:GLOB[:field] | arrayrecord:GLOB | concepts:PATH")


class DataStats(collections.Counter):
  """Counts of documents read and skipped (by reason); logs each reason's first case."""

  def skip(self, reason: str, where: str) -> None:
    """Counts one skipped document; the first of each reason is logged with its place."""
    key = f"skipped_{reason}"
    if not self[key]:
      logging.warning("skipping a document (%s) at %s; further ones are only counted",
                      reason.replace("_", " "), where)
    self[key] += 1

  def note(self, reason: str, where: str) -> None:
    """Counts a repaired (not skipped) document, logging the first."""
    if not self[reason]:
      logging.warning("%s at %s; further ones are only counted", reason.replace("_", " "), where)
    self[reason] += 1

  @property
  def skipped(self) -> int:
    return sum(v for k, v in self.items() if k.startswith("skipped_"))


def expand_glob(pattern: str) -> list[str]:
  """Sorted files matching `pattern`; DataError if there are none."""
  if "://" in pattern:  # Cloud storage goes through etils (wildcards in the last part only).
    from etils import epath  # pylint: disable=g-import-not-at-top
    head, _, tail = pattern.rpartition("/")
    if globlib.has_magic(tail):
      paths = sorted(str(p) for p in epath.Path(head).glob(tail))
    else:
      paths = [pattern] if epath.Path(pattern).exists() else []
  else:
    paths = sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True)
                   if not os.path.isdir(p))
  if not paths:
    what = "no file matches" if globlib.has_magic(pattern) else "file not found:"
    raise DataError(f"{what} {pattern} (data.source)")
  return paths


def _open(path: str):
  if "://" in path:
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).open("rb")
  return open(path, "rb")


def _check_not_binary(path: str, head: bytes) -> None:
  """Raises DataError for a file that is clearly not text."""
  controls = sum(b < 32 and b not in (9, 10, 12, 13) for b in head)
  if b"\x00" in head or (head and controls > 0.1 * len(head)):
    raise DataError(f"{path} looks like a binary file, not UTF-8 text "
                    "(it holds NUL/control bytes); remove it from data.source")


def _clean(text: str, max_chars: int, stats: DataStats, where: str) -> str | None:
  """Normalised document, or None (counted) when it has no text."""
  text = text.replace("\r\n", "\n").lstrip("\ufeff").strip()
  if not text:
    stats.skip("empty", where)
    return None
  if len(text) > max_chars:
    stats.note("truncated_long_document", where)
    text = text[:max_chars]
  return text


def _text_document(raw: bytes, max_chars: int, stats: DataStats, where: str) -> str | None:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    stats.skip("invalid_utf8", where)
    return None
  return _clean(text, max_chars, stats, where)


def read_text_file(path: str, max_chars: int, stats: DataStats) -> Iterator[str]:
  """Documents of a UTF-8 text file (blank lines separate documents), streamed."""
  with _open(path) as f:
    _check_not_binary(path, f.read(_BINARY_PROBE_BYTES))
    f.seek(0)
    lines, first = [], 1
    for number, raw in enumerate(f, start=1):
      if raw.strip():
        first = first if lines else number
        lines.append(raw)
        continue
      if lines:
        text = _text_document(b"".join(lines), max_chars, stats, f"{path}:{first}")
        lines = []
        if text is not None:
          yield text
    if lines:
      text = _text_document(b"".join(lines), max_chars, stats, f"{path}:{first}")
      if text is not None:
        yield text


def _get_field(obj, field: str):
  for part in field.split("."):
    if not isinstance(obj, dict) or part not in obj:
      return None
    obj = obj[part]
  return obj


def read_jsonl_file(path: str, field: str, max_chars: int, stats: DataStats) -> Iterator[str]:
  """Documents in `field` of each JSON line of `path`."""
  with _open(path) as f:
    _check_not_binary(path, f.read(_BINARY_PROBE_BYTES))
    f.seek(0)
    for number, raw in enumerate(f, start=1):
      where = f"{path}:{number}"
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError:
        stats.skip("invalid_utf8", where)
        continue
      except json.JSONDecodeError:
        stats.skip("bad_json", where)
        continue
      value = _get_field(obj, field)
      if not isinstance(value, str):
        stats.skip("missing_field" if value is None else "field_not_string", where)
        continue
      text = _clean(value, max_chars, stats, where)
      if text is not None:
        yield text


def split_of(text: str, eval_fraction: float) -> str:
  """Stable split of a document: a hash of its text, so duplicates share a split."""
  digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
  return "eval" if int.from_bytes(digest, "little") / 2.0**64 < eval_fraction else "train"


def read_files(spec: SourceSpec, max_chars: int, stats: DataStats) -> Iterator[str]:
  """Every document of a text or jsonl source, file by file."""
  for path in expand_glob(spec.pattern):
    before = stats["documents"], stats.skipped
    docs = (read_text_file(path, max_chars, stats) if spec.kind == "text" else
            read_jsonl_file(path, spec.field, max_chars, stats))
    for text in docs:
      stats["documents"] += 1
      yield text
    stats["files"] += 1
    bad = stats.skipped - before[1]
    if stats["documents"] == before[0] and bad:
      reasons = {k: v for k, v in stats.items() if k.startswith("skipped_")}
      raise DataError(f"{path}: none of its {bad} documents is usable ({reasons}); "
                      f"check the file (field={spec.field!r} for jsonl)")


@functools.lru_cache(maxsize=8)
def _load_files(spec: SourceSpec, max_chars: int, eval_fraction: float, fingerprint: tuple):
  """All documents of a file source, split; cached (several datasets share one read)."""
  del fingerprint  # Only part of the cache key: files changed on disk are read again.
  stats = DataStats()
  docs = {"train": [], "eval": []}
  for text in read_files(spec, max_chars, stats):
    docs[split_of(text, eval_fraction)].append(text)
  if not stats["documents"]:
    raise DataError(f"{spec.pattern}: no usable documents (data.source; {dict(stats)})")
  stats["train_documents"], stats["eval_documents"] = len(docs["train"]), len(docs["eval"])
  return docs, stats


def _files_fingerprint(pattern: str) -> tuple:
  return tuple((p, os.path.getsize(p), os.path.getmtime(p)) if "://" not in p else (p,)
               for p in expand_glob(pattern))


class SyntheticDocs:
  """Documents [start, start + length) of the synthetic corpus, random access."""

  def __init__(self, corpus_seed: int, start: int, length: int):
    self.corpus_seed, self.start, self.length = corpus_seed, start, length

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> str:
    return synthetic.generate_document(self.corpus_seed, self.start + int(index))


class TextDocs:
  """An in-memory list of documents (file sources after the one-time read)."""

  def __init__(self, texts: Sequence[str], stats: DataStats):
    self.texts, self.stats = texts, stats

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, index: int) -> str:
    return self.texts[int(index)]


def encode_record(doc: TokenizedDoc, text: str, vocab_size: int) -> bytes:
  """One preprocessed document: header, sentence lengths, token ids, UTF-8 text."""
  token_dtype = np.uint16 if vocab_size <= 2**16 else np.int32
  text_bytes = text.encode("utf-8")
  header = _HEADER.pack(_RECORD_MAGIC, len(doc.sentence_lens_S), len(doc.tokens_T),
                        len(text_bytes), np.dtype(token_dtype).itemsize)
  return b"".join((header, doc.sentence_lens_S.astype("<u4").tobytes(),
                   doc.tokens_T.astype(np.dtype(token_dtype).newbyteorder("<")).tobytes(),
                   text_bytes))


def decode_record(record: bytes, where: str = "record") -> tuple[TokenizedDoc, str]:
  """Inverse of encode_record."""
  if len(record) < _HEADER.size or record[:4] != _RECORD_MAGIC:
    raise DataError(f"{where} is not a concept_diffusion record; "
                    "write shards with python -m concept_diffusion.data.preprocess")
  _, num_sentences, num_tokens, num_text, itemsize = _HEADER.unpack_from(record)
  offset = _HEADER.size
  lens_S = np.frombuffer(record, "<u4", num_sentences, offset).astype(np.int32)
  offset += 4 * num_sentences
  token_dtype = "<u2" if itemsize == 2 else "<i4"
  tokens_T = np.frombuffer(record, token_dtype, num_tokens, offset).astype(np.int32)
  offset += itemsize * num_tokens
  text = record[offset:offset + num_text].decode("utf-8")
  return TokenizedDoc(tokens_T, lens_S), text


def shard_paths(pattern: str, split: str) -> list[str]:
  """ArrayRecord shards of `split`: eval-* files are the eval split, the rest train."""
  # The tokenizer and stats written next to the shards are not shards.
  paths = [p for p in expand_glob(pattern)
           if os.path.basename(p) != "stats.json" and not p.endswith(".model")]
  is_eval = lambda p: os.path.basename(p).startswith(EVAL_SHARD_PREFIX)
  chosen = [p for p in paths if is_eval(p) == (split == "eval")]
  if not chosen:
    raise DataError(f"no {split} shards among the {len(paths)} files matching {pattern} "
                    f"(eval shards are named {EVAL_SHARD_PREFIX}-*)")
  for path in chosen:
    with _open(path) as f:
      head = f.read(_BINARY_PROBE_BYTES)
    if len(head) < 16:
      raise DataError(f"{path} is empty or truncated; rerun the preprocessing step")
  return chosen


class ArrayRecordDocs:
  """Preprocessed documents in ArrayRecord shards: `[i]` is `(TokenizedDoc, text)`."""

  def __init__(self, paths: Sequence[str]):
    import grain  # pylint: disable=g-import-not-at-top  (grain is heavy; only here)
    self.paths = list(paths)
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except Exception as e:  # The reader's error names neither file nor cause clearly.
      raise DataError(f"cannot open ArrayRecord shards {self.paths}: {e}") from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[TokenizedDoc, str]:
    return decode_record(self._source[int(index)], f"record {index} of {self.paths}")


def shard_directory(pattern: str) -> str:
  """Folder of the first shard (holds tokenizer.model and stats.json)."""
  return os.path.dirname(expand_glob(pattern)[0])


class Reversed:
  """`docs` from the last one back (a file source's dev split)."""

  def __init__(self, docs):
    self.docs = docs

  def __len__(self) -> int:
    return len(self.docs)

  def __getitem__(self, index: int):
    return self.docs[len(self.docs) - 1 - int(index)]


def document_source(config, split: str):
  """The random-access documents of `split` for `config.data.source`."""
  if split not in SPLITS:
    raise DataError(f"split={split!r} is not one of {SPLITS}")
  data = config.data
  spec = parse_source(data.source)
  if spec.kind == "synthetic":
    if split == "eval":
      return SyntheticDocs(data.corpus_seed, 0, data.eval_docs)
    if split == "dev":
      return SyntheticDocs(data.corpus_seed + DEV_SEED_SHIFT, 0, data.eval_docs)
    return SyntheticDocs(data.corpus_seed, data.eval_docs, SYNTHETIC_TRAIN_DOCS - data.eval_docs)
  if split == "dev":
    return Reversed(document_source(config, "eval"))
  if spec.kind in ("text", "jsonl"):
    docs, stats = _load_files(spec, data.max_doc_chars, data.eval_fraction,
                              _files_fingerprint(spec.pattern))
    if not docs[split]:
      raise DataError(f"the {split} split of {spec.pattern} is empty ({stats['documents']} "
                      f"documents, data.eval_fraction={data.eval_fraction})")
    return TextDocs(docs[split], stats)
  if spec.kind == "arrayrecord":
    return ArrayRecordDocs(shard_paths(spec.pattern, split))
  raise DataError(f"data.source={data.source!r}: concept caches are read by the concepts "
                  "stage, not by the token data pipeline")


def iterate_documents(config, split: str) -> Iterator[str]:
  """The documents of `split` as text, in source order (train of synthetic is unlimited)."""
  source = document_source(config, split)
  for index in range(len(source)):
    item = source[index]
    yield item[1] if isinstance(item, tuple) else item
