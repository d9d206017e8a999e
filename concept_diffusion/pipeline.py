"""The main job: the two-stage pipeline (render, then concepts), evaluated and sampled.

  python -m concept_diffusion.pipeline --workdir=runs/tiny

Trains `render` (encoder + renderer) in WORKDIR/render, reports its held-out
round-trip accuracy, trains `concepts` over the frozen encoder in
WORKDIR/concepts, then continues a held-out prompt of the built-in corpus and
scores it with the corpus's coherence checker. Re-running resumes every stage.
Any field of either stage is overridable: `--render_config.train.num_steps=500`.

On real text, the presets measured best there (~25 min on 2 CPU cores; held-out
prompts of the source are continued, with no checker to score them: gen-PPL is the
grid's, experiments/concept_grid.py):

  python -m concept_diffusion.pipeline --workdir=runs/text \
      --render_config=configs/render.py:tiny_text \
      --concepts_config=configs/concepts.py:tiny_text \
      --render_config.data.source='text:/usr/share/doc/python3.11/html/_sources/**/*.rst.txt'
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from concept_diffusion.config import ConfigError

_RENDER = config_flags.DEFINE_config_file("render_config", "configs/render.py:tiny",
                                          "Config of the render stage.")
_CONCEPTS = config_flags.DEFINE_config_file("concepts_config", "configs/concepts.py:tiny",
                                            "Config of the concepts stage.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Holds render/ and concepts/.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 3, "Held-out prompts to continue.")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 8, "Held-out batches (of 32 examples) the "
                                    "render stage's round trip is measured on.")


def run(render_config, concepts_config, workdir: str, num_prompts: int = 3,
        max_batches: int = 8) -> dict:
  """Trains both stages (resuming), evaluates, samples; returns the headline figures."""
  from concept_diffusion import evaluation, generate  # After flags: keep --help fast.
  from concept_diffusion import train as train_lib
  if max_batches < 1:  # Before any training: the round trip needs a batch to measure.
    raise ConfigError(f"--max_batches={max_batches}: the round trip needs at least one "
                      "held-out batch")
  render_dir = os.path.join(workdir, "render")
  concepts_dir = os.path.join(workdir, "concepts")
  concepts_config.concepts.render_workdir = render_dir

  start = time.time()
  print(f"== stage 1/2: render (encoder + renderer) -> {render_dir}", flush=True)
  train_lib.train(render_config, render_dir)
  render_eval = evaluation.evaluate(render_dir, num_prompts=0, max_batches=max_batches)
  print(f"render: held-out round-trip token accuracy "
        f"{render_eval['roundtrip_token_accuracy']:.4f}, exact match "
        f"{render_eval['roundtrip_exact_match']:.4f}", flush=True)

  print(f"== stage 2/2: concepts (concept model over the frozen encoder) -> {concepts_dir}",
        flush=True)
  summary = train_lib.train(concepts_config, concepts_dir)

  scores = continue_prompts(generate.load(concepts_dir), num_prompts)
  print(f"done in {time.time() - start:.0f}s")
  return {**render_eval, **scores, "concepts_summary": summary}


def continue_prompts(gen, num_prompts: int) -> dict:
  """Continues held-out prompts and prints them; their coherence on the built-in corpus."""
  from concept_diffusion import evaluation, generate
  source = gen.config.data.source
  synthetic = source == "synthetic"
  pairs = evaluation.eval_prompts(gen.config, num_prompts)
  samples = generate.generate(gen, [p for p, _ in pairs], num_concepts=8, seed=0)
  print(f"== samples (held-out prompts of {'the built-in corpus' if synthetic else source})")
  print(generate.format_samples(samples))
  if not synthetic:  # Only the built-in corpus has the facts a continuation is checked on.
    return {}
  scores = evaluation.coherence_scores([p for p, _ in pairs], [s.text for s in samples])
  print(f"coherence of these samples: well-formed {scores['coherence_well_formed']:.2f}, "
        f"consistent with the prompt {scores['coherence_consistent']:.2f}")
  return scores


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Library INFO logs drown the progress lines.
    logging.set_verbosity(logging.WARNING)
  from concept_diffusion.data.errors import DataError
  try:
    run(_RENDER.value, _CONCEPTS.value, _WORKDIR.value, _NUM_PROMPTS.value, _MAX_BATCHES.value)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
