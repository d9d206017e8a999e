"""The main job end to end: render then concepts on the built-in corpus, tiny presets, CPU.

This is the README's first command (`python -m concept_diffusion.pipeline`) at the
presets it ships with, shortened to keep the suite inside CI's time (the full presets
take ~20 minutes of 2 CPU cores): the render stage trains 300 steps instead of 600
(held-out round-trip ~0.89 there, ~0.97 at 600), and the concepts stage encodes a
concept cache of 2,048 examples instead of 12,800 and trains 300 steps over it instead
of 6,037. It is the check that the tiny pipeline learns, through the cache the preset
trains from; the full presets' figures are the README's ("Results").
"""

import pathlib

from concept_diffusion import evaluation, pipeline
from concept_diffusion.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _preset(stage: str, preset: str = "tiny"):
  return load_config(str(ROOT / "configs" / f"{stage}.py:{preset}"))


def test_two_stages_end_to_end(tmp_path, capsys):
  render = _preset("render")
  render.train.num_steps = 300  # Of 600 (its cosine schedule then ends at 300).
  concepts = _preset("concepts")
  concepts.train.num_steps = 300  # Of 6,037.
  concepts.train.log_every = 25  # Of 50: enough points to see the loss fall.
  concepts.concepts.cache_examples = 2048  # Of 12,800 (4.7 epochs; the preset: 15).
  out = pipeline.run(render, concepts, str(tmp_path), num_prompts=2)
  # Render: held-out decode(encode(chunk)) with the renderer's sampler (0.89 measured).
  assert out["roundtrip_token_accuracy"] >= 0.8, out
  # Concepts: the flow-matching loss falls well below its first logged value.
  losses = [m["loss"] for m in evaluation.load_metrics(str(tmp_path / "concepts"))]
  assert len(losses) == 12
  assert losses[-1] < 0.6 * losses[0], losses
  assert (tmp_path / "concepts" / "concept_cache" / "train" / "meta.json").is_file()
  printed = capsys.readouterr().out
  assert "output:" in printed and "coherence of these samples" in printed
