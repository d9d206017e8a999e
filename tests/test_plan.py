"""Planner: analytic sizes match the real param trees; memory estimate vs XLA's analysis."""

import json
import os
import subprocess
import sys

import jax
import pytest

from concept_diffusion import plan
from concept_diffusion.config import ConfigError
from concept_diffusion.models import sizes
from concept_diffusion.parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("render", "concepts", "ar", "mdm")
PRESETS = ("tiny", "small", "base", "large")


def _config(stage, preset):
  """(config, render config for the concepts stage) of configs/<stage>.py:<preset>."""
  config = plan.load_config(os.path.join(ROOT, "configs", f"{stage}.py:{preset}"))
  render = (plan.load_config(os.path.join(ROOT, "configs", f"render.py:{preset}"))
            if stage == "concepts" else None)
  return config, render


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("stage", STAGES)
def test_sizes_match_real_param_tree(stage, preset):
  config, render = _config(stage, preset)
  config = plan.resolved(config, render)
  stage_obj, _ = plan.build(config)
  real = plan.real_param_counts(stage_obj)
  trained = sum(v for k, v in real.items() if k not in stage_obj.frozen)
  assert sizes.param_count(config, stage) == trained


def test_scale_presets_have_the_advertised_size():
  for stage in STAGES:
    for preset, (lo, hi) in {"base": (0.9e9, 1.2e9), "large": (7e9, 9e9)}.items():
      config, render = _config(stage, preset)
      assert lo < sizes.param_count(plan.resolved(config, render), stage) < hi, (stage, preset)


def test_plan_of_base_on_a_v5p_slice():
  config, _ = _config("render", "base")
  p = plan.plan(config, 64, "tpu-v5p", mfu=0.5)
  assert p["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1}
  assert p["tokens_per_step"] == 2048 * 16 * 16 and p["concepts_per_step"] == 2048 * 16
  mem = p["memory_per_device"]
  # FSDP shards the fp32 params 64 ways; AdamW keeps two fp32 moments of each.
  assert abs(mem["params"] - 4 * p["params"] / 64) < 0.01 * mem["params"]
  assert abs(mem["optimizer"] - 2 * mem["params"]) < 0.01 * mem["optimizer"]
  assert p["fits"] and mem["total"] < plan.DEVICE_KINDS["tpu-v5p"].hbm_bytes
  expected = p["flops_per_step"] / (64 * 459e12 * 0.5)
  assert abs(p["step_seconds"] - expected) < 1e-9


def test_plan_reports_what_does_not_fit():
  config, _ = _config("ar", "large")
  config.mesh.tensor = 1
  p = plan.plan(config, 8, "tpu-v6e", check_params=False)
  assert not p["fits"]  # 8B params x 16 bytes on 8 chips of 32 GiB.


def test_plan_errors_name_the_problem():
  config, _ = _config("render", "base")
  with pytest.raises(ConfigError, match="device_kind"):
    plan.plan(config, 64, "tpu-v9")
  config.mesh.tensor = 3
  with pytest.raises(ConfigError, match="mesh.tensor=3"):
    plan.plan(config, 64, "h100")
  concepts, _ = _config("concepts", "base")
  with pytest.raises(ConfigError, match="render_config"):
    plan.plan(concepts, 64, "h100")


@pytest.mark.parametrize("stage", STAGES)
def test_estimate_close_to_compiled_memory_for_tiny(stage):
  config, render = _config(stage, "tiny")
  mesh = mesh_lib.make_mesh(config, jax.devices()[:1])
  compiled, seconds = plan.aot_compile(config, mesh, render)
  actual = plan.compiled_memory(compiled)["total"]
  estimate = plan.plan(config, 1, "h100", render_config=render,
                       check_params=False)["memory_per_device"]["total"]
  print(f"{stage} tiny: estimate {estimate / 2**20:.0f} MiB, compiled {actual / 2**20:.0f} MiB "
        f"({seconds:.1f} s)")
  assert actual / 3 < estimate < 3 * actual


def test_cli_prints_json_plan():
  out = subprocess.run(
      [sys.executable, "-m", "concept_diffusion.plan", "--config=configs/concepts.py:base",
       "--devices=64", "--device_kind=h100", "--format=json"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
  assert out.returncode == 0, out.stderr
  p = json.loads(out.stdout)
  assert p["stage"] == "concepts" and p["frozen"] == ["encoder"] and p["fits"]
