"""The main job end to end: render then concepts on the built-in corpus, tiny presets, CPU.

This is the README's first command (`python -m concept_diffusion.pipeline`) at the
presets it ships with, but for one change: the concepts stage encodes a concept cache
of 4,096 examples instead of 25,600 and trains 600 steps over it instead of 5,310,
which keeps the suite inside CI's time (the full preset adds ~15 minutes of CPU). It is
the check that the tiny pipeline learns, through the cache the preset trains from.
"""

import pathlib

from concept_diffusion import evaluation, pipeline
from concept_diffusion.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _preset(stage: str, preset: str = "tiny"):
  return load_config(str(ROOT / "configs" / f"{stage}.py:{preset}"))


def test_two_stages_end_to_end(tmp_path, capsys):
  concepts = _preset("concepts")
  concepts.train.num_steps = 600  # Of 5,310 (its cosine schedule then ends at 600).
  concepts.concepts.cache_examples = 4096  # Of 25,600: 4.7 epochs, as the preset's 6.6.
  out = pipeline.run(_preset("render"), concepts, str(tmp_path), num_prompts=2)
  # Render: held-out decode(encode(chunk)) with the renderer's sampler.
  assert out["roundtrip_token_accuracy"] >= 0.95, out
  # Concepts: the flow-matching loss falls well below its first logged value.
  losses = [m["loss"] for m in evaluation.load_metrics(str(tmp_path / "concepts"))]
  assert len(losses) >= 10
  assert losses[-1] < 0.6 * losses[0], losses
  assert (tmp_path / "concepts" / "concept_cache" / "train" / "meta.json").is_file()
  printed = capsys.readouterr().out
  assert "output:" in printed and "coherence of these samples" in printed
