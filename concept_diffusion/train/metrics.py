"""Metrics: JSONL log, TensorBoard events, console progress with ETA; throughput and MFU."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s per device, by substring of jax.Device.device_kind.
_PEAK_FLOPS = (
    ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5", 459e12),
    ("v4", 275e12), ("v3", 123e12), ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
    ("l4", 121e12), ("a10", 125e12),
)
_probe_cache: dict[str, float] = {}


def _cpu_probe_flops() -> float:
  """FLOP/s of a jitted f32 matmul on this host's CPU (all its cores)."""
  n = 512
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = 0.0
  for _ in range(5):  # The best of several trials: the machine may be busy for a moment.
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 0.05:
      matmul(a).block_until_ready()
      reps += 1
    best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
  return best


def peak_flops_per_device(device=None) -> float:
  """Device peak from a table; on CPU measured once by a matmul probe (cached)."""
  device = device or jax.local_devices()[0]
  kind = device.device_kind.lower()
  for name, flops in _PEAK_FLOPS:
    if name in kind:
      return flops
  if kind not in _probe_cache:
    # Simulated CPU devices share the host's cores, so each gets its share.
    _probe_cache[kind] = _cpu_probe_flops() / jax.local_device_count()
  return _probe_cache[kind]


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsWriter:
  """Writes metrics.jsonl and TensorBoard events (process 0 only) and a console line."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # Lazy: only process 0 needs it.
      self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

  def truncate_after(self, step: int) -> None:
    """Drops lines past `step` (a resumed run rewrites them, identically)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    keep = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line)
      except (ValueError, KeyError):
        continue  # A line cut by a kill mid-write.
    with open(self.path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _jsonable(v) for k, v in scalars.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)

  def console(self, step: int, num_steps: int, scalars: dict, eta_s: float) -> None:
    if not self.enabled:
      return
    held_out = f"eval_loss {scalars['eval_loss']:.4f}  " if "eval_loss" in scalars else ""
    print(f"step {step}/{num_steps}  loss {scalars['loss']:.4f}  {held_out}"
          f"{scalars['tokens_per_sec']:.0f} tok/s  mfu {100 * scalars['mfu']:.2f}%  "
          f"eta {format_duration(eta_s)}", flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def _jsonable(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()
