"""Concept cache: the concepts of packed examples, encoded once by a frozen encoder, in zarr.

Layout of PATH/<split>/ (tensorstore zarr arrays, one folder each; PATH may be gs://):
  concepts      float32 [num_examples, N, D]    chunks of `chunk_rows` whole examples
  concept_mask  bool    [num_examples, N]       the document structure, as in the
  segment_ids   int32   [num_examples, N]       concept view of make_dataset
  meta.json     N, D, L, sizes, process count, source, render run
  progress/process_{p}-of-{P}.json    rows committed by process p, its packer state, done

Writing (`write_cache`, every process at once): process p packs documents[p::P] of the
split exactly as make_dataset does (in order, one pass) and owns rows
[p R, (p + 1) R), R a whole number of chunks, so no two processes touch one chunk.
Each write is whole chunks; once it has landed, the process records the rows done and
its packer state (atomic rename). A restart restores the packer from the marker: a
write that landed but was not recorded is redone with the same bytes, so nothing is
duplicated or skipped. A finite source may run out before R rows: the marker says how
many rows are real, and readers use only those.

Reading (`cache_dataset`, what make_dataset returns for data.source=concepts:PATH):
batches of {"concepts" [B, N, D], "concept_mask" [B, N], "segment_ids" [B, N]}. Process
p of P reads rows[p::P]; train is shuffled per epoch by (data.seed, epoch) and endless,
eval is one pass in order (short last batch padded with empty examples). Batch i is a
pure function of i, so the grain iterator state (checkpointed with the trainer's) is
just the next batch index.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Callable

import grain
import numpy as np
import tensorstore as ts
from etils import epath

from concept_diffusion.data import pipeline, sources
from concept_diffusion.data.errors import DataError
from concept_diffusion.data.tokenizer import PAD_ID, Tokenizer

ARRAYS = ("concepts", "concept_mask", "segment_ids")
_DTYPES = {"concepts": "<f4", "concept_mask": "|b1", "segment_ids": "<i4"}
# What must agree between a cache, its writers and its readers.
_META_KEYS = ("num_concepts", "concept_dim", "concept_len", "num_examples", "chunk_rows",
              "process_count", "split", "source")


# ---------------------------------------------------------------- layout


def split_dir(path: str, split: str) -> epath.Path:
  return epath.Path(path) / split


def _kvstore(directory: epath.Path):
  text = str(directory)
  return text if "://" in text else {"driver": "file", "path": text}


def _open(directory: epath.Path, name: str, shape=None, chunks=None):
  """One zarr array: created (or opened if there) when shape is given, else opened."""
  spec = {"driver": "zarr", "kvstore": _kvstore(directory / name)}
  if shape is None:
    return ts.open(spec, open=True, read=True).result()
  spec["metadata"] = {"shape": list(shape), "chunks": list(chunks), "dtype": _DTYPES[name],
                      "compressor": None}  # Concepts are dense floats: compression buys little.
  return ts.open(spec, create=True, open=True).result()


def _write_json(path: epath.Path, value) -> None:
  """Writes then renames, so a reader never sees half a file."""
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(json.dumps(value))
  tmp.replace(path)  # Atomic on local disks; a copy then delete on object stores.


def _read_json(path: epath.Path):
  return json.loads(path.read_text()) if path.exists() else None


def rows_per_process(num_examples: int, process_count: int, chunk_rows: int) -> int:
  """R: rows each process owns, a whole number of chunks."""
  return math.ceil(math.ceil(num_examples / process_count) / chunk_rows) * chunk_rows


def process_range(meta: dict, process_index: int) -> tuple[int, int]:
  """[lo, hi) rows of `process_index`."""
  r = rows_per_process(meta["num_examples"], meta["process_count"], meta["chunk_rows"])
  return min(process_index * r, meta["num_examples"]), min((process_index + 1) * r,
                                                           meta["num_examples"])


def _marker_path(directory: epath.Path, p: int, count: int) -> epath.Path:
  return directory / "progress" / f"process_{p}-of-{count}.json"


# ---------------------------------------------------------------- writing


def packed_examples(config, tokenizer: Tokenizer, split: str, process_index: int = 0,
                    process_count: int = 1):
  """Checkpointable iterator of this process's packed concept-view examples, in order."""
  docs = sources.document_source(config, split)
  stats = sources.DataStats()
  to_item = pipeline.ToItem("concepts", config.data.granularity, config.data.concept_len, stats)
  ds = grain.MapDataset.source(pipeline.ItemSource(docs, tokenizer, to_item, cache=False))
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=64))
  fill = bool(config.data.get("fill_examples", False)) and split == "train"
  return iter(pipeline.PackIterDataset(ds, config.data.num_concepts, fill))


def _check_meta(directory: epath.Path, meta: dict) -> None:
  """Writes meta.json, or checks that the cache there was started with the same settings."""
  found = _read_json(directory / "meta.json")
  if found is None:
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "meta.json", meta)
    return
  for key in (*_META_KEYS, "fill_examples"):
    if found.get(key) != meta.get(key):
      raise DataError(f"the concept cache at {directory} was started with {key}="
                      f"{found.get(key)!r}, not {meta.get(key)!r}; resume with the same settings "
                      "or write to another --output")


class _Progress:
  """One console line: rows done, rate, ETA (stderr, at most twice a second)."""

  def __init__(self, total: int, done: int, label: str, enabled: bool):
    self.total, self.start_done, self.label, self.enabled = total, done, label, enabled
    self.start, self.last = time.perf_counter(), 0.0

  def update(self, done: int, final: bool = False) -> None:
    now = time.perf_counter()
    if not self.enabled or (now - self.last < 0.5 and not final):
      return
    self.last = now
    rate = (done - self.start_done) / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    eta_text = f"{int(eta) // 60}m{int(eta) % 60:02d}s" if math.isfinite(eta) else "?"
    sys.stderr.write(f"\r{self.label}: {done:,}/{self.total:,} examples "
                     f"({100 * done / max(self.total, 1):.1f}%) {rate:,.0f} ex/s ETA {eta_text}"
                     + ("\n" if final else ""))
    sys.stderr.flush()


def _next_rows(examples, count: int):
  """Up to `count` packed examples stacked: (tokens_BxNxL, segment_ids_BxN), B may be less."""
  rows = []
  for _ in range(count):
    try:
      rows.append(next(examples))
    except StopIteration:
      break
  if not rows:
    return None
  return (np.stack([r["tokens"] for r in rows]), np.stack([r["segment_ids"] for r in rows]))


def write_cache(path: str, config, tokenizer: Tokenizer,
                encode_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], *,
                num_examples: int, split: str = "train", process_index: int = 0,
                process_count: int = 1, chunk_rows: int = 64, rows_per_write: int = 256,
                extra_meta: dict | None = None, progress: bool = True,
                fail_after_writes: int = 0) -> dict:
  """Encodes and writes this process's rows of PATH/<split>; resumes. Returns its marker.

  encode_fn(tokens_BxNxL, token_mask_BxNxL) -> concepts_BxNxD (numpy, float32).
  fail_after_writes: test hook, raise after that many writes land and before they are
  recorded (the worst moment for a crash).
  """
  if num_examples <= 0:
    raise DataError(f"num_examples={num_examples} must be > 0")
  if rows_per_write % chunk_rows:
    raise DataError(f"rows_per_write={rows_per_write} must be a multiple of "
                    f"chunk_rows={chunk_rows} (writes are whole chunks)")
  n, l, d = config.data.num_concepts, config.data.concept_len, config.model.concept_dim
  directory = split_dir(path, split)
  meta = {"num_concepts": n, "concept_dim": d, "concept_len": l, "num_examples": num_examples,
          "chunk_rows": chunk_rows, "process_count": process_count, "split": split,
          "source": config.data.source, **(extra_meta or {})}
  if config.data.get("fill_examples", False) and split == "train":
    meta["fill_examples"] = True  # Absent from padded caches, those written before it too.
  _check_meta(directory, meta)
  arrays = {"concepts": _open(directory, "concepts", (num_examples, n, d), (chunk_rows, n, d)),
            "concept_mask": _open(directory, "concept_mask", (num_examples, n), (chunk_rows, n)),
            "segment_ids": _open(directory, "segment_ids", (num_examples, n), (chunk_rows, n))}
  marker_path = _marker_path(directory, process_index, process_count)
  marker_path.parent.mkdir(parents=True, exist_ok=True)
  marker = _read_json(marker_path) or {"rows": 0, "state": None, "done": False}
  lo, hi = process_range(meta, process_index)
  bar = _Progress(hi - lo, marker["rows"], f"encode {split} [{process_index}]", progress)
  if marker["done"]:
    return marker
  examples = packed_examples(config, tokenizer, split, process_index, process_count)
  if marker["state"] is not None:
    examples.set_state(marker["state"])
  writes = 0
  while lo + marker["rows"] < hi:
    batch = _next_rows(examples, min(rows_per_write, hi - lo - marker["rows"]))
    if batch is None:
      break  # A finite source ran out: the marker says how many rows are real.
    tokens_BxNxL, seg_BxN = batch
    z_BxNxD = np.asarray(encode_fn(tokens_BxNxL, tokens_BxNxL != PAD_ID), np.float32)
    start = lo + marker["rows"]
    stop = start + len(tokens_BxNxL)
    futures = [arrays["concepts"][start:stop].write(z_BxNxD),
               arrays["concept_mask"][start:stop].write(seg_BxN > 0),
               arrays["segment_ids"][start:stop].write(seg_BxN.astype(np.int32))]
    for f in futures:
      f.result()
    writes += 1
    if fail_after_writes and writes >= fail_after_writes:
      raise RuntimeError(f"fail_after_writes={fail_after_writes}: simulated crash")
    marker = {"rows": stop - lo, "state": examples.get_state(), "done": False}
    _write_json(marker_path, marker)
    bar.update(marker["rows"])
  marker = {**marker, "done": True}
  _write_json(marker_path, marker)
  bar.update(marker["rows"], final=True)
  return marker


# ---------------------------------------------------------------- reading


class CacheReader:
  """Random access to the committed rows of a finished cache (opened lazily, picklable)."""

  def __init__(self, path: str, split: str):
    self.directory = split_dir(path, split)
    self.meta = _read_json(self.directory / "meta.json")
    if self.meta is None:
      raise DataError(f"{self.directory} holds no concept cache (meta.json missing); write one "
                      f"with python -m concept_diffusion.encode ... --split={split}")
    self.rows = self._committed_rows()
    self._arrays = None

  def _committed_rows(self) -> np.ndarray:
    count, ranges = self.meta["process_count"], []
    for p in range(count):
      marker = _read_json(_marker_path(self.directory, p, count))
      lo, hi = process_range(self.meta, p)
      if lo < hi and not (marker and marker["done"]):
        done = marker["rows"] if marker else 0
        raise DataError(f"the concept cache at {self.directory} is incomplete: process {p} of "
                        f"{count} committed {done} of {hi - lo} rows; rerun the same encode "
                        "command to finish it")
      if lo < hi:
        ranges.append(np.arange(lo, lo + marker["rows"]))
    return np.concatenate(ranges) if ranges else np.zeros((0,), np.int64)

  def __len__(self) -> int:
    return len(self.rows)

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}  # TensorStore handles reopen in the worker.

  def read(self, rows) -> dict[str, np.ndarray]:
    """The arrays at absolute row indices `rows` (one concurrent read per array)."""
    if self._arrays is None:
      self._arrays = {name: _open(self.directory, name) for name in ARRAYS}
    rows = np.asarray(rows, np.int64)
    futures = {name: a[rows].read() for name, a in self._arrays.items()}
    return {name: f.result() for name, f in futures.items()}


class _ReadBatch:
  """Batch index -> batch dict; positions past an eval pass become empty examples."""

  def __init__(self, reader: CacheReader, rows: np.ndarray, batch_size: int, seed: int,
               shuffle: bool):
    self.reader, self.rows, self.batch_size = reader, rows, batch_size
    self.seed, self.shuffle = seed, shuffle
    self._orders = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) > 2:
        self._orders.clear()
      self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
    return self._orders[epoch]

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self.rows)
    positions = np.arange(index * self.batch_size, (index + 1) * self.batch_size)
    if self.shuffle:
      picks = np.array([self.rows[self._order(p // n)[p % n]] for p in positions])
    else:
      picks = self.rows[positions[positions < n]]
    order = np.argsort(picks)  # Sorted reads touch each chunk once.
    data = self.reader.read(picks[order])
    batch = {k: np.empty_like(v) for k, v in data.items()}
    for k, v in data.items():
      batch[k][order] = v
    pad = self.batch_size - len(picks)
    if pad:  # Short last eval batch: empty examples keep the shapes fixed.
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    return batch


def cache_dataset(config, *, split: str, process_index: int = 0, process_count: int = 1,
                  batch_size: int) -> grain.IterDataset:
  """Batches of a concept cache for one process (see the module docstring)."""
  spec = sources.parse_source(config.data.source)
  reader = CacheReader(spec.pattern, split)
  n, d = reader.meta["num_concepts"], reader.meta["concept_dim"]
  if n != config.data.num_concepts:
    raise DataError(f"data.num_concepts={config.data.num_concepts} but the concept cache "
                    f"{spec.pattern} holds examples of {n} concepts; set data.num_concepts={n} "
                    "or re-encode with --config.data.num_concepts")
  if d != config.model.concept_dim:
    raise DataError(f"model.concept_dim={config.model.concept_dim} but the concept cache "
                    f"{spec.pattern} holds {d}-dim concepts (another render run?)")
  rows = reader.rows[process_index::process_count]
  if not len(rows):
    raise DataError(f"the concept cache {spec.pattern} has {len(reader)} {split} examples, "
                    f"too few for {process_count} processes")
  train = split == "train"
  num_batches = sys.maxsize if train else math.ceil(len(rows) / batch_size)
  read = _ReadBatch(reader, rows, batch_size, config.data.seed, shuffle=train)
  ds = grain.MapDataset.range(num_batches).map(read)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  ds.data_stats = sources.DataStats()  # Nothing is skipped: the trainer's logs expect it.
  return ds
