"""The main job end to end: render then concepts on the built-in corpus, tiny presets, CPU.

This is the README's first command (`python -m concept_diffusion.pipeline`) at the
presets it ships with, not shrunk: it is the check that the tiny pipeline learns.
"""

import importlib.util
import pathlib

from concept_diffusion import evaluation, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _preset(stage: str, preset: str = "tiny"):
  spec = importlib.util.spec_from_file_location(f"configs_{stage}_e2e",
                                                ROOT / "configs" / f"{stage}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def test_two_stages_end_to_end(tmp_path, capsys):
  out = pipeline.run(_preset("render"), _preset("concepts"), str(tmp_path), num_prompts=2)
  # Render: held-out decode(encode(chunk)) with the renderer's sampler.
  assert out["roundtrip_token_accuracy"] >= 0.95, out
  # Concepts: the flow-matching loss falls well below its first logged value.
  losses = [m["loss"] for m in evaluation.load_metrics(str(tmp_path / "concepts"))]
  assert len(losses) >= 10
  assert losses[-1] < 0.6 * losses[0], losses
  printed = capsys.readouterr().out
  assert "output:" in printed and "coherence of these samples" in printed
