"""Data pipeline throughput: batches/s and tokens/s for the tiny and small presets.

  python benchmarks/data_pipeline.py [--seconds=2] [--presets=tiny,small]

Measures the train split of the synthetic source (documents generated and tokenized on the
fly) and of ArrayRecord shards preprocessed from it (tokens read back, the usual path for
real corpora), in the concept view of configs/render.py and the flat view of configs/ar.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from concept_diffusion import config as config_lib  # pylint: disable=g-import-not-at-top
from concept_diffusion.data import make_dataset  # pylint: disable=g-import-not-at-top
from concept_diffusion.data import make_tokenizer  # pylint: disable=g-import-not-at-top
from concept_diffusion.data.preprocess import preprocess  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preset_config(stage: str, preset: str):
  """configs/<stage>.py:<preset>, with a tokenizer quick to train."""
  config = config_lib.load_config(os.path.join(ROOT, "configs", f"{stage}.py:{preset}"))
  config.data.tokenizer_docs = min(config.data.tokenizer_docs, 2000)
  return config


def measure(config, tokenizer, view: str, seconds: float) -> tuple[float, float, float]:
  """(batches/s, token slots/s, real tokens/s) over about `seconds`."""
  it = iter(make_dataset(config, tokenizer, split="train", view=view))
  next(it)  # Opening files and the first read are not throughput.
  batches, real, slots, start = 0, 0, 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    batches += 1
    slots += batch["tokens"].size
    real += int(batch["token_mask"].sum())
  elapsed = time.perf_counter() - start
  return batches / elapsed, slots / elapsed, real / elapsed


def run(preset: str, seconds: float, workdir: str) -> None:
  """Prints one line per (stage view, source) for `preset`."""
  work = os.path.join(workdir, preset)
  tokenizer = make_tokenizer(preset_config("render", preset), work)
  shards = os.path.join(work, "shards")  # Document records: shared by every view.
  preprocess(preset_config("render", preset), tokenizer, shards, num_shards=4, num_docs=3000)
  for stage, view in (("render", "concepts"), ("ar", "flat")):
    config = preset_config(stage, preset)
    batch = config.train.batch_size
    shape = (f"B{batch} N{config.data.num_concepts} L{config.data.concept_len}"
             if view == "concepts" else f"B{batch} T{config.data.seq_len}")
    for source in ("synthetic", f"arrayrecord:{shards}/*.array_record"):
      config.data.source = source
      rate, slots, real = measure(config, tokenizer, view, seconds)
      print(f"{preset:5s} {view:8s} {shape:15s} {source.split(':')[0]:11s} "
            f"{rate:8.1f} batches/s {slots / 1e6:7.2f} M token slots/s "
            f"{real / 1e6:6.2f} M real tokens/s ({real / slots:.0%} filled)", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=2.0, help="Measuring time per line.")
  parser.add_argument("--presets", default="tiny,small")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    for preset in args.presets.split(","):
      run(preset, args.seconds, workdir)


if __name__ == "__main__":
  main()
