"""The main job end to end: render then concepts on the built-in corpus, tiny presets, CPU.

This is the README's first command (`python -m concept_diffusion.pipeline`), run as users
run it (its CLI, XLA's optimised code) at the presets it ships with, shortened to keep
the suite inside CI's time (the full presets take ~20 minutes of 2 CPU cores): the
render stage trains 60 steps (30 of warmup) instead of 1,200 (held-out round-trip 0.61
there, ~0.997 at 1,200), and the concepts stage encodes a concept cache of 512 examples
instead of 12,800 and trains 120 steps over it instead of 2,209, and the round trip is
measured on 2 held-out batches instead of 8 (~190 s alone on 2 cores).
It is the check that the tiny pipeline learns, through the cache the preset trains
from; the full presets' figures are the README's ("Results").
"""

import os
import re
import subprocess
import sys

import pytest

from concept_diffusion import evaluation
from concept_diffusion.config import ConfigError

from conftest import ROOT, subprocess_env

SHORTENED = ["--render_config.train.num_steps=60",  # Of 1,200 (its cosine then ends at 60),
             "--render_config.train.warmup_steps=30",  # of 100, so the cosine has room.
             "--concepts_config.train.num_steps=120",  # Of 2,209.
             "--concepts_config.train.log_every=12",  # Of 50: enough points to see the loss fall.
             "--concepts_config.concepts.cache_examples=512",  # Of 12,800 (7.5 epochs).
             "--max_batches=2"]  # Of 8 held-out batches for the round trip (0.611 vs 0.613).


def test_two_stages_end_to_end(tmp_path):
  env = subprocess_env(1)
  env["XLA_FLAGS"] = ""  # Not the tests' fast compile: 300 steps run, and run faster so.
  proc = subprocess.run([sys.executable, "-m", "concept_diffusion.pipeline",
                         f"--workdir={tmp_path}", "--num_prompts=2", *SHORTENED],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  printed = proc.stdout
  # Render: held-out decode(encode(chunk)) with the renderer's sampler (0.61 measured;
  # chance is about one in the vocabulary).
  roundtrip = re.search(r"round-trip token accuracy ([0-9.]+)", printed)
  assert roundtrip and float(roundtrip.group(1)) >= 0.5, printed[-3000:]
  # Concepts: the flow-matching loss falls well below its first logged value (0.36x
  # measured), and so does the regression of the head's mean (model.head_mean, on in the
  # preset).
  metrics = evaluation.load_metrics(str(tmp_path / "concepts"))
  losses = [m["diffusion_loss"] for m in metrics]
  assert len(losses) == 10
  assert losses[-1] < 0.6 * losses[0], losses
  assert metrics[-1]["mean_loss"] < metrics[0]["mean_loss"], metrics
  assert (tmp_path / "concepts" / "concept_cache" / "train" / "meta.json").is_file()
  assert "output:" in printed and "coherence of these samples" in printed


# Importing the main job loads its default config files through ml_collections, which uses
# importlib's deprecated load_module: its warning, not ours.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_no_round_trip_batches_is_refused_before_training(tmp_path):
  from concept_diffusion import pipeline  # Defines the main job's flags: import it here only.
  with pytest.raises(ConfigError, match="--max_batches=0"):
    pipeline.run(None, None, str(tmp_path), max_batches=0)
  assert not os.listdir(tmp_path)  # Nothing trained, nothing written.


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_a_text_source_is_continued_and_not_scored_as_the_built_in_corpus(
    tiny_concepts_run, tmp_path, capsys):
  """The main job on real text (configs/*.py:tiny_text): its prompts, no coherence."""
  from concept_diffusion import generate, pipeline
  corpus = tmp_path / "docs.txt"
  corpus.write_text("\n\n".join(f"Note {i} opens the page. It says more. It closes."
                                 for i in range(40)))
  gen = generate.load(tiny_concepts_run)
  gen.config.data.source = f"text:{corpus}"
  gen.config.data.eval_fraction = 0.5  # A few held-out documents of forty.
  assert pipeline.continue_prompts(gen, 2) == {}
  printed = capsys.readouterr().out
  assert f"held-out prompts of text:{corpus}" in printed
  assert printed.count("opens the page.") >= 2 and "coherence" not in printed
