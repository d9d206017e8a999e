"""The trainer end to end through its command line, on small CPU runs.

Exact resume after SIGKILL, clean exit on SIGTERM, fallback from a corrupt
checkpoint, NaN stop, config errors. Multi-host: test_train_multihost.py; meshes:
test_train_sharding.py (they reuse the helpers here).
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.data.vocab_size=256", "--config.data.tokenizer_docs=200",
    "--config.data.num_concepts=4", "--config.data.seq_len=32",
    "--config.data.concept_len=8", "--config.render.z_noise=0.1",
    "--config.model.embed_dim=32", "--config.model.mlp_dim=64", "--config.model.num_heads=2",
    "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
    "--config.model.concept_dim=16", "--config.model.encoder_layers=1",
    # The presets' nested concepts (32 / 64 / 128, rendered from 64), scaled to 16 wide.
    "--config.render.nested_dims=(4, 8, 16)", "--config.concepts.render_dims=8",
    "--config.model.renderer_layers=1", "--config.model.concept_layers=1",
    "--config.model.diff_head_layers=1", "--config.model.diff_head_dim=32",
    "--config.train.batch_size=8", "--config.train.log_every=1",
    "--config.train.warmup_steps=2",
]


def _env(devices=1):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = xla_flags(devices)
  return env


def _args(workdir, stage="render", *overrides):
  return [sys.executable, "-m", "concept_diffusion.train", f"--config=configs/{stage}.py:tiny",
          f"--workdir={workdir}", *TINY, *overrides]


def _run(workdir, *overrides, stage="render", devices=1, timeout=240):
  return subprocess.run(_args(workdir, stage, *overrides), cwd=REPO, env=_env(devices),
                        capture_output=True, text=True, timeout=timeout)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _steps(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """One tokenizer for every run here (training it is the slow part of a tiny run)."""
  from concept_diffusion import data
  from concept_diffusion.config import base_config
  c = base_config()
  c.data.vocab_size, c.data.tokenizer_docs = 256, 200
  workdir = str(tmp_path_factory.mktemp("tok"))
  data.make_tokenizer(c, workdir)
  return os.path.join(workdir, "tokenizer")


@pytest.fixture
def workdir(tmp_path, tokenizer_dir):
  path = str(tmp_path / "run")
  shutil.copytree(tokenizer_dir, os.path.join(path, "tokenizer"))
  return path


def _wait_for_step(workdir, step, proc, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    try:
      if any(m["step"] >= step for m in _metrics(workdir)):
        return
    except (FileNotFoundError, json.JSONDecodeError):
      pass
    time.sleep(0.05)
  raise TimeoutError(f"no step {step} in {workdir}")


def test_sigkill_then_resume_reproduces_the_loss_sequence(workdir, tmp_path):
  # Held-out evaluation every 6 steps must not disturb the train data order or keys.
  flags = ["--config.train.num_steps=24", "--config.checkpoint.every_steps=4",
           "--config.train.eval_every=6", "--config.train.eval_batches=2"]
  reference = str(tmp_path / "reference")
  shutil.copytree(os.path.join(workdir, "tokenizer"), os.path.join(reference, "tokenizer"))
  done = _run(reference, *flags)
  assert done.returncode == 0, done.stderr[-3000:]
  proc = subprocess.Popen(_args(workdir, "render", *flags), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, 10, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = _run(workdir, *flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint at step" in resumed.stdout
  want = [(m["step"], m["loss"]) for m in _metrics(reference)]
  got = [(m["step"], m["loss"]) for m in _metrics(workdir)]
  assert [s for s, _ in want] == list(range(1, 25))
  assert got == want  # Bitwise: same floats, same data order.
  evals = [(m["step"], m["eval_loss"]) for m in _metrics(reference) if "eval_loss" in m]
  assert [s for s, _ in evals] == [6, 12, 18, 24]
  assert evals == [(m["step"], m["eval_loss"]) for m in _metrics(workdir) if "eval_loss" in m]


def test_sigterm_saves_current_step_and_exits_cleanly(workdir):
  flags = ["--config.train.num_steps=100000", "--config.checkpoint.every_steps=1000"]
  proc = subprocess.Popen(_args(workdir, "render", *flags), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "preempted" in out
  last = _metrics(workdir)[-1]["step"]
  assert _steps(workdir) == [last]


def test_corrupt_latest_checkpoint_falls_back_and_keeps_good_ones(workdir):
  flags = ["--config.checkpoint.every_steps=2", "--config.checkpoint.max_to_keep=10"]
  first = _run(workdir, "--config.train.num_steps=6", *flags)
  assert first.returncode == 0, first.stderr[-3000:]
  assert _steps(workdir) == [2, 4, 6]
  for path in glob.glob(os.path.join(workdir, "checkpoints", "6", "state", "**", "*"),
                        recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  second = _run(workdir, "--config.train.num_steps=8", *flags)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "checkpoint at step 6" in second.stdout and "corrupt" in second.stdout
  assert "resumed from checkpoint at step 4" in second.stdout
  assert _steps(workdir) == [2, 4, 6, 8]
  assert glob.glob(os.path.join(workdir, "checkpoints", "corrupt-6-*"))  # Kept, aside.


def test_nan_stops_with_the_step_and_keeps_checkpoints(workdir):
  flags = ["--config.train.num_steps=10", "--config.checkpoint.every_steps=2",
           "--config.train.debug_nan_step=5"]
  done = _run(workdir, *flags)
  assert done.returncode == 1
  assert "at step 5" in done.stderr, done.stderr[-3000:]
  assert _steps(workdir) == [2, 4]
  assert "Traceback" not in done.stderr


def test_bad_config_fails_before_compiling(workdir):
  done = _run(workdir, "--config.mesh.fsdp=3", devices=4)
  assert done.returncode == 1 and "mesh.fsdp=3" in done.stderr
  done = _run(workdir, "--config.train.batch_size=6", "--config.mesh.data=4", devices=4)
  assert done.returncode == 1 and "train.batch_size=6" in done.stderr
  # The models' own checks run before compiling too: cudnn attention on a CPU.
  done = _run(workdir, "--config.model.attention=cudnn", "--config.model.dtype=bfloat16")
  assert done.returncode == 1 and "model.attention='cudnn'" in done.stderr
  assert "Traceback" not in done.stderr
