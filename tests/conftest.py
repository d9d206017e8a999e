"""Shared fixtures: tiny trained runs (render, concepts, ar, mdm), trained once per session.

The render run is trained in a subprocess with 4 simulated devices on an fsdp=4 mesh,
so every test that restores it (or the concepts run built on it) in this 1-device
process also checks restore-onto-another-device-count. Under pytest-xdist the runs
are trained once, by whichever worker gets there first (a file lock), and shared.
Set CD_TINY_RUNS=DIR to keep them between sessions while developing.
"""

import contextlib
import fcntl
import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Small enough to train in a few seconds on 2 CPU cores (compile time dominates).
TINY = {
    "data.vocab_size": 256, "data.tokenizer_docs": 200, "data.eval_docs": 16,
    "data.num_concepts": 8, "data.seq_len": 64,
    # 8-token chunks and light z noise: a 40-step render run that already round-trips.
    "data.concept_len": 8, "render.z_noise": 0.1,
    "model.embed_dim": 64, "model.mlp_dim": 128, "model.num_heads": 2, "model.num_kv_heads": 2,
    "model.head_dim": 32, "model.concept_dim": 32, "model.diff_head_dim": 64,
    # One layer a stack: most of a test's time is compiling, which grows with depth (tiny
    # render + concepts train runs: 10.0 + 10.1 -> 8.0 + 5.7 s against two layers, the
    # suite 755 -> 647 s, same session). Depth itself (scan, remat, layers of causal
    # attention) is tested in test_models*.py with their own 2-3 layer configs.
    "model.encoder_layers": 1, "model.renderer_layers": 1, "model.concept_layers": 1,
    "model.diff_head_layers": 1, "model.baseline_layers": 1,
    # Whole concepts: a 40-step render run trained on nested prefixes renders a 16-dimension
    # prefix as empty chunks (test_generate's continuations came back empty). The presets'
    # nested concepts are trained and generated in test_nested_concepts.py, and through the
    # CLI (scaled to 16 wide) in test_train*.py.
    "render.nested_dims": (), "concepts.render_dims": 0,
    # One rate for every stage's seconds-long run (the concepts preset's tiny 5e-3 was
    # measured over 2,209 steps, not 30).
    "train.learning_rate": 3e-3,
    "train.batch_size": 8, "train.num_steps": 30, "train.warmup_steps": 5, "train.log_every": 10,
    "checkpoint.every_steps": 30, "checkpoint.async_save": False,
    # The tiny concepts preset's 12,800-example cache would take minutes: encode on the
    # fly (tests that need a cache ask for a small one).
    "concepts.cache_examples": 0,
    # One sample per concept, END among them: the preset's eight candidates kept by round
    # trip and END's own sample would cost 9x the sampling in every test that generates.
    # They are tested where named (test_generate) and run as shipped in test_pipeline_e2e.
    "concepts.num_candidates": 1, "concepts.candidate_rule": "consensus",
    "concepts.end_temperature": 0.0, "concepts.draft_steps": 0,
}
STEPS = {"render": 40, "concepts": 30, "ar": 60, "mdm": 30}  # The judge AR needs a little more.


def tiny_overrides(stage: str, **extra) -> dict:
  """Flat {field: value} overrides of configs/<stage>.py:tiny for a seconds-long run."""
  return {**TINY, "train.num_steps": STEPS[stage], **extra}


def tiny_config(stage: str, **extra):
  """configs/<stage>.py:tiny with tiny_overrides applied."""
  from concept_diffusion.config import load_config
  config = load_config(str(ROOT / "configs" / f"{stage}.py:tiny"))
  for field, value in tiny_overrides(stage, **extra).items():
    section, name = field.split(".")
    config[section][name] = value
  return config


# Tests check behaviour, not speed, and most of their CPU time is XLA compiling small
# programs: LLVM's cheapest code generation cuts it by ~40% (tests/test_models*.py: 284 ->
# 160 CPU-seconds, measured), and XLA:CPU's older loop emitters compile a further ~27%
# faster than its MLIR fusion emitters (tiny render + concepts train steps: 8.7 + 8.8 ->
# 6.3 + 6.5 s of backend compile, means of three alternating runs). Every test process and
# child compiles so; a flag already in XLA_FLAGS is kept as set.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_MEASURED_ON = "0.10.2"  # The jaxlib these flags were measured on.


def _xla_knows(flag: str) -> bool:
  """Whether this jaxlib's XLA takes `flag`: an unknown one kills the process reading it."""
  if importlib.metadata.version("jaxlib") == _MEASURED_ON:
    return True
  env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  probe = "import jax; jax.numpy.zeros(1).block_until_ready()"
  return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                        timeout=120).returncode == 0


for _flag in FAST_COMPILE:
  # pytest-xdist's workers inherit the controller's flags and probe nothing (but a flag the
  # controller's probe refused, which each worker probes again: only on another jaxlib).
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", "") and _xla_knows(_flag):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()


def compile_flags() -> str:
  """The fast-compile flags of this process, as XLA_FLAGS for a child."""
  names = tuple(flag.split("=")[0] for flag in FAST_COMPILE)
  return " ".join(f for f in os.environ["XLA_FLAGS"].split() if f.startswith(names))


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS for a child process on `num_devices` CPU devices, compiling as this one does."""
  return f"{compile_flags()} --xla_force_host_platform_device_count={num_devices}"


def subprocess_env(num_devices: int = 1) -> dict:
  """Environment for a child python that imports this checkout on `num_devices` CPU devices."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = xla_flags(num_devices)
  return env


def jit_call(fn, *args, **kwargs):
  """fn(*args, **kwargs) compiled as one program; arguments of arrays only are traced.

  Called eagerly, each op compiles on its own, once per worker: worth it where a test's ops
  are its own (the loss-dims gradients of test_nested_concepts.py: 230 compiles, 15.2 ->
  8.9 s), not where earlier tests compiled them (test_head_mean jitted: 16.3 -> 21.1 s).
  Modules, callables, numbers and strings are closed over as constants.
  """
  import jax
  import numpy as np

  def traced(x):
    leaves = jax.tree.leaves(x)
    return bool(leaves) and all(isinstance(l, (jax.Array, np.ndarray)) for l in leaves)

  arrays = {i: a for i, a in enumerate(args) if traced(a)}
  arrays_kw = {k: v for k, v in kwargs.items() if traced(v)}

  def call(arrays, arrays_kw):
    return fn(*(arrays.get(i, a) for i, a in enumerate(args)), **{**kwargs, **arrays_kw})

  return jax.jit(call)(arrays, arrays_kw)


def _shared_root(tmp_path_factory) -> pathlib.Path:
  """A directory every xdist worker of this session sees ($CD_TINY_RUNS: kept across sessions)."""
  if os.environ.get("CD_TINY_RUNS"):
    return pathlib.Path(os.environ["CD_TINY_RUNS"])
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(f"{path}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _trained(tmp_path_factory, name: str, train_fn) -> str:
  """WORKDIR of run `name`, trained by train_fn(workdir) unless already done this session."""
  workdir = _shared_root(tmp_path_factory) / "tiny_runs" / name
  with _locked(workdir):
    done = workdir / "DONE"
    if not done.exists():
      train_fn(str(workdir))
      done.write_text("ok")
  return str(workdir)


def _train_in_process(stage: str, **extra):
  def train_fn(workdir):
    from concept_diffusion import train
    train.train(tiny_config(stage, **extra), workdir)
  return train_fn


def _train_on_four_devices(stage: str):
  """Trains in a child process with 4 CPU devices on a (data 1, fsdp 4) mesh, via the CLI."""
  def train_fn(workdir):
    overrides = tiny_overrides(stage, **{"mesh.data": 1, "mesh.fsdp": 4})
    cmd = [sys.executable, "-m", "concept_diffusion.train",
           f"--config={ROOT / 'configs' / stage}.py:tiny", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(4), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return train_fn


_MIN_COMPILE_SECS = 0.2  # Programs that compile faster than this are not worth a file.


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
  """JAX's persistent compilation cache, shared by every test, xdist worker and child process.

  Many tests compile the same tiny-config programs (train steps, samplers), as do the
  sample CLI and the notebook kernel; each is compiled once per session and read back
  after (test_train.py + test_concept_knobs.py: 315 s -> 271 s on 2 cores, measured).
  CD_NO_COMPILE_CACHE=1 turns it off (to time the suite without it).
  """
  if os.environ.get("CD_NO_COMPILE_CACHE"):
    yield None
    return
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  path = str(_shared_root(tmp_path_factory) / "jax_cache")
  # This process reads jax.config; child processes read the same settings from env.
  settings = {"jax_compilation_cache_dir": path,
              "jax_persistent_cache_min_compile_time_secs": _MIN_COMPILE_SECS}
  previous = {k.upper(): os.environ.get(k.upper()) for k in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)
  compilation_cache.reset_cache()
  yield path
  compilation_cache.reset_cache()
  for k, v in previous.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_render_run(tmp_path_factory):
  """A render run written by 4 devices (fsdp=4); restored here on 1."""
  return _trained(tmp_path_factory, "render", _train_on_four_devices("render"))


@pytest.fixture(scope="session")
def tiny_concepts_run(tmp_path_factory, tiny_render_run):
  """A concepts run (flow head) over tiny_render_run's frozen encoder."""
  return _trained(tmp_path_factory, "concepts", _train_in_process(
      "concepts", **{"concepts.render_workdir": tiny_render_run}))


@pytest.fixture(scope="session")
def tiny_ar_run(tmp_path_factory):
  """A flat AR baseline (also the generation judge)."""
  return _trained(tmp_path_factory, "ar", _train_in_process("ar"))


@pytest.fixture(scope="session")
def tiny_mdm_run(tmp_path_factory):
  """A flat masked-diffusion baseline."""
  return _trained(tmp_path_factory, "mdm", _train_in_process("mdm"))


# The files that take longest, longest first (worker-seconds of a full run, 2 cores): the
# main job's test ~180 s, test_experiment.py ~140, test_concept_knobs.py ~120 ...
SLOW_FILES = ("test_pipeline_e2e.py", "test_experiment.py", "test_concept_knobs.py",
              "test_generate.py", "test_train.py", "test_models.py", "test_nested_concepts.py",
              "test_train_sharding.py", "test_models_overfit.py", "test_evaluate.py",
              "test_render_context.py", "test_plan.py", "test_launch.py",
              "test_concept_cache.py", "test_aot.py", "test_train_multihost.py",
              "test_diffusion.py")


def pytest_configure(config):
  """Keeps the files in SLOW_FILES' order under `--dist loadfile`: xdist otherwise reorders
  them by their number of tests, which put the one-test main job last (a full run 770 s
  against 723 s in this order, same session)."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """Slow files first: `--dist loadfile` hands files out in this order, so the last ones a
  worker takes are short and neither worker idles long while the other ends a big file."""
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files stay whole.
