"""Concept cache throughput: concepts/s encoding (write) vs reading, vs encoding on the fly.

  python benchmarks/concept_cache.py [--preset=tiny] [--examples=1024] [--seconds=3]

The encoder is configs/render.py:<preset>'s, randomly initialised (speed does not depend
on the weights); data is the synthetic source packed into examples of configs/concepts.py's
N concepts. Three paths, in concept slots (examples x N) per second:
  on the fly  make_dataset's token batches + the encoder forward: what every concepts
              step pays without a cache
  encode      write_cache: pack, encode, write zarr chunks and progress markers (once)
  read        make_dataset(data.source=concepts:PATH): shuffled batches from the cache
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from concept_diffusion import plan  # pylint: disable=g-import-not-at-top
from concept_diffusion.data import (  # pylint: disable=g-import-not-at-top
    concept_cache, make_dataset, make_tokenizer)
from concept_diffusion.models.encoder import ConceptEncoder  # pylint: disable=g-import-not-at-top
from concept_diffusion.models.layers import ModelConfig  # pylint: disable=g-import-not-at-top
from concept_diffusion.train.state import unbox  # pylint: disable=g-import-not-at-top


def setup(preset: str, workdir: str):
  """(config, tokenizer, encode_fn): render preset's encoder over concepts preset's examples."""
  config = plan.load_config(os.path.join(ROOT, "configs", f"render.py:{preset}"))
  concepts = plan.load_config(os.path.join(ROOT, "configs", f"concepts.py:{preset}"))
  config.data.num_concepts = concepts.data.num_concepts
  config.train.batch_size = concepts.train.batch_size
  config.data.tokenizer_docs = min(config.data.tokenizer_docs, 2000)  # Quick to train.
  tok = make_tokenizer(config, workdir)
  enc = ConceptEncoder(ModelConfig.from_config(config, tok.vocab_size))
  tokens = jnp.zeros((1, config.data.num_concepts, config.data.concept_len), jnp.int32)
  params = unbox(jax.jit(enc.init)(jax.random.key(0), tokens, tokens > 0)["params"])
  apply = jax.jit(lambda t, m: enc.apply({"params": params}, t, m))
  return config, tok, lambda t, m: np.asarray(apply(t, m))


def rate(step, seconds: float) -> float:
  """Calls of `step` per second over about `seconds`, after one warm-up call."""
  step()
  count, start = 0, time.perf_counter()
  while count < 2 or time.perf_counter() - start < seconds:
    step()
    count += 1
  return count / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--examples", type=int, default=1024)
  parser.add_argument("--seconds", type=float, default=3.0)
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix="cd_cache_bench_")
  config, tok, encode_fn = setup(args.preset, work)
  n, b = config.data.num_concepts, config.train.batch_size
  print(f"preset {args.preset}: N={n} L={config.data.concept_len} D={config.model.concept_dim} "
        f"batch {b}; {jax.device_count()} {jax.devices()[0].platform} device(s)")

  it = iter(make_dataset(config, tok, split="train", view="concepts"))
  def on_the_fly():
    batch = next(it)
    encode_fn(batch["tokens"], batch["token_mask"])
  fly = rate(on_the_fly, args.seconds) * b * n

  path = os.path.join(work, "cache")
  start = time.perf_counter()
  concept_cache.write_cache(path, config, tok, encode_fn, num_examples=args.examples,
                            rows_per_write=max(64, (b // 64) * 64), progress=False)
  encode = args.examples * n / (time.perf_counter() - start)

  config.data.source = f"concepts:{path}"
  cached = iter(make_dataset(config, tok, split="train", view="concepts"))
  read = rate(lambda: next(cached), args.seconds) * b * n
  size = sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(os.path.join(path, "train")) for f in files)
  print(f"on the fly (tokenize + pack + encode): {fly:12,.0f} concepts/s")
  print(f"encode into the cache (once):          {encode:12,.0f} concepts/s "
        f"({args.examples:,} examples, {size / 2**20:.1f} MiB)")
  print(f"read from the cache:                   {read:12,.0f} concepts/s "
        f"({read / fly:.1f}x on the fly)")


if __name__ == "__main__":
  main()
