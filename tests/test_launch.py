"""Launchers: exact --dry_run commands, TPU run script in a sandbox, local multi-process runs."""

import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from concept_diffusion.parallel.launch_env import distributed_kwargs

from conftest import compile_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBE = "tests/assets/dist_probe.py"


def _env(**extra):
  """A clean child environment: no inherited XLA/JAX/cluster variables, the repo importable."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("XLA_", "JAX_", "SLURM_", "CD_", "MASTER_"))
         and k not in ("WORLD_SIZE", "RANK")}
  env["PYTHONPATH"] = str(ROOT)
  env.update(extra)
  return env


def _run(argv, env=None, timeout=60):
  """Runs a launcher from the repo root; returns the completed process."""
  return subprocess.run(argv, cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                        timeout=timeout, check=False)


def _dry_run(argv, **env):
  proc = _run(argv, env=_env(**env))
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


# --- local.py ---------------------------------------------------------------------------------

def test_local_dry_run_prints_one_command_per_process():
  lines = _dry_run([sys.executable, "launch/local.py", "--num_processes=2",
                    "--devices_per_process=4", "--port=12345", "--python=python3", "--dry_run",
                    "--", "--config=configs/render.py:tiny", "--workdir=/tmp/x"])
  env = ("env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo "
         "XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONUNBUFFERED=1")
  assert lines == [
      f"{env} python3 -m concept_diffusion.train --config=configs/render.py:tiny "
      "--workdir=/tmp/x --config.distributed.initialize=True "
      "--config.distributed.coordinator_address=127.0.0.1:12345 "
      f"--config.distributed.num_processes=2 --config.distributed.process_id={i}"
      for i in range(2)]


def test_local_dry_run_script_quotes_and_keeps_xla_flags():
  lines = _dry_run([sys.executable, "launch/local.py", "--num_processes=1",
                    "--devices_per_process=2", "--port=7", "--python=py", f"--script={PROBE}",
                    "--dry_run", "--", "--note=a b"], XLA_FLAGS="--xla_dump_to=/tmp/d")
  assert lines == [
      "env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo "
      "'XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=2' "
      f"PYTHONUNBUFFERED=1 py {PROBE} '--note=a b' --config.distributed.initialize=True "
      "--config.distributed.coordinator_address=127.0.0.1:7 "
      "--config.distributed.num_processes=1 --config.distributed.process_id=0"]


def test_local_two_processes_psum_over_eight_devices():
  proc = _run([sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=4",
               f"--script={PROBE}", "--timeout_s=50"])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  for i in range(2):  # 1 + 2 + ... + 8, seen by both processes.
    assert f"[{i}] probe process={i}/2 devices=8 psum=36" in proc.stdout.splitlines()


def test_local_failed_process_stops_the_others():
  start = time.monotonic()
  proc = _run([sys.executable, "launch/local.py", f"--script={PROBE}", "--timeout_s=50",
               "--", "--probe.fail_process=1"])
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert "process 1 exited with 3" in proc.stderr
  assert time.monotonic() - start < 30  # Process 0 was killed, not left waiting for process 1.


def test_local_forwards_sigterm_to_children():
  launcher = subprocess.Popen(
      [sys.executable, "launch/local.py", f"--script={PROBE}", "--timeout_s=50", "--",
       "--probe.sleep_s=60"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  ready = [launcher.stdout.readline() for _ in range(2)]
  assert sorted(ready) == ["[0] probe ready\n", "[1] probe ready\n"]
  launcher.send_signal(signal.SIGTERM)
  _, err = launcher.communicate(timeout=20)
  assert launcher.returncode == 128 + signal.SIGTERM, err
  assert "forwarding signal" in err


@pytest.mark.skipif(not (ROOT / "concept_diffusion/train.py").exists()
                    and not (ROOT / "concept_diffusion/train/__main__.py").exists(),
                    reason="the trainer (python -m concept_diffusion.train) is not written yet")
def test_local_trainer_two_processes_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  proc = _run([sys.executable, "launch/local.py", "--num_processes=2", "--devices_per_process=2",
               "--timeout_s=240", "--", "--config=configs/render.py:tiny", f"--workdir={workdir}",
               "--config.train.num_steps=3", "--config.train.batch_size=8",
               "--config.train.warmup_steps=1", "--config.train.log_every=1",
               "--config.checkpoint.every_steps=3", "--config.data.tokenizer_docs=200",
               "--config.data.eval_docs=16"], env=_env(XLA_FLAGS=compile_flags()), timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert (workdir / "metrics.jsonl").exists()
  assert (workdir / "checkpoints").is_dir()


# --- tpu_pod.py -------------------------------------------------------------------------------

TPU = [sys.executable, "launch/tpu_pod.py", "--zone=us-west4-a", "--dry_run"]
INSTALL = ("test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh; "
           "test -x ~/cd_venv/bin/python || ~/.local/bin/uv venv --python=3.11 ~/cd_venv; "
           "~/.local/bin/uv pip install --python ~/cd_venv/bin/python ~/concept_diffusion "
           '"jax[tpu]"')


def _run_script(name, workdir, env=""):
  return (
      "set -e; mkdir -p ~/cd_logs; if test -f ~/cd_logs/{n}.pid && kill -0 $(cat ~/cd_logs/{n}.pid)"
      ' 2>/dev/null; then echo "run {n} is still running: --steps=stop first" >&2; exit 1; fi; '
      "cd ~/concept_diffusion; setsid nohup {e}~/cd_venv/bin/python -m concept_diffusion.train "
      "--config=configs/render.py:base --workdir={w} --config.distributed.initialize=True "
      "--config.train.num_steps=10 > ~/cd_logs/{n}.log 2>&1 < /dev/null & "
      "echo $! > ~/cd_logs/{n}.pid").format(n=name, w=workdir, e=env)


def test_tpu_pod_dry_run_copies_tree_installs_runs_and_tails():
  lines = _dry_run([*TPU, "--tpu=my-tpu", "--config=configs/render.py:base",
                    "--workdir=gs://bkt/runs/r1", "--", "--config.train.num_steps=10"])
  where = "--zone=us-west4-a --worker=all"
  assert lines == [
      "tar -czf /tmp/concept_diffusion_src.tgz --exclude=.git --exclude=__pycache__ "
      f"'--exclude=*.egg-info' --exclude=.venv -C {ROOT} .",
      f"gcloud compute tpus tpu-vm scp /tmp/concept_diffusion_src.tgz my-tpu: {where}",
      "gcloud compute tpus tpu-vm ssh my-tpu --command " + shlex.quote(
          "set -e; rm -rf ~/concept_diffusion; mkdir ~/concept_diffusion; "
          f"tar -xzf ~/concept_diffusion_src.tgz -C ~/concept_diffusion; {INSTALL}") + f" {where}",
      "gcloud compute tpus tpu-vm ssh my-tpu --command "
      + shlex.quote(_run_script("r1", "gs://bkt/runs/r1"))
      + f" {where}",
      "gcloud compute tpus tpu-vm ssh my-tpu --command 'tail -n +1 -F ~/cd_logs/r1.log' "
      "--zone=us-west4-a --worker=0",
  ]


def test_tpu_pod_dry_run_queued_resource_from_git():
  lines = _dry_run([*TPU, "--queued_resource=qr", "--project=proj", "--steps=stop,setup,run",
                    "--source=https://github.com/me/cd.git", "--ref=v1",
                    "--env=MEGASCALE_PORT=8080",
                    "--config=configs/render.py:base", "--workdir=gs://bkt/runs/r2/", "--",
                    "--config.train.num_steps=10"])
  where = "--zone=us-west4-a --project=proj --node=all --worker=all"
  base = "gcloud compute tpus queued-resources ssh qr --command "
  assert lines == [
      base + "'kill -TERM $(cat ~/cd_logs/r2.pid)' " + where,
      base + shlex.quote(
          "set -e; rm -rf ~/concept_diffusion; git clone -q --depth=1 --branch=v1 "
          f"https://github.com/me/cd.git ~/concept_diffusion; {INSTALL}") + f" {where}",
      base + shlex.quote(_run_script("r2", "gs://bkt/runs/r2/", env="env MEGASCALE_PORT=8080 "))
      + f" {where}",
  ]


@pytest.mark.parametrize("flags, message", [
    (["--tpu=t", "--config=c", "--workdir=/tmp/w"], "is not gs://"),
    (["--tpu=t", "--workdir=gs://b/w"], "needs --config and --workdir"),
    (["--tpu=t", "--steps=tail,launch"], "each step must be one of"),
    (["--tpu=t", "--steps=tail", "--env=1X=2"], "is not NAME=VALUE"),
    (["--config=c", "--workdir=gs://b/w"], "one of the arguments --tpu --queued_resource"),
])
def test_tpu_pod_rejects_bad_flags_early(flags, message):
  proc = _run([*TPU, *flags])
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_tpu_pod_remote_scripts_run_stop_and_refuse_a_second_start(tmp_path):
  """Runs the --command strings of the run and stop steps with bash in a fake $HOME."""
  home = tmp_path / "home"
  (home / "concept_diffusion").mkdir(parents=True)
  stub = home / "cd_venv/bin/python"
  stub.parent.mkdir(parents=True)
  stub.write_text("#!/bin/bash\necho \"args: $*\"\n"
                  "trap 'kill $!; echo terminated; exit 0' TERM\nsleep 30 & wait\n")
  stub.chmod(0o755)

  def remote(step):
    line = _dry_run([*TPU, "--tpu=t", f"--steps={step}", "--config=c.py:tiny",
                     "--workdir=gs://b/r"])[0]
    argv = shlex.split(line)
    script = argv[argv.index("--command") + 1]
    assert _run(["bash", "-n", "-c", script]).returncode == 0
    return _run(["bash", "-c", script], env=_env(HOME=str(home)), timeout=20)

  assert remote("run").returncode == 0
  log, pid = home / "cd_logs/r.log", home / "cd_logs/r.pid"
  for _ in range(100):
    if "args:" in log.read_text():
      break
    time.sleep(0.05)
  assert ("args: -m concept_diffusion.train --config=c.py:tiny --workdir=gs://b/r "
          "--config.distributed.initialize=True") in log.read_text()
  trainer_pid = int(pid.read_text())
  assert "cd_venv/bin/python" in pathlib.Path(f"/proc/{trainer_pid}/cmdline").read_text()
  again = remote("run")
  assert again.returncode == 1 and "still running" in again.stderr
  assert remote("stop").returncode == 0
  for _ in range(100):
    if "terminated" in log.read_text():
      break
    time.sleep(0.05)
  assert "terminated" in log.read_text()
  for _ in range(100):
    if not _alive(trainer_pid):
      break
    time.sleep(0.05)
  assert not _alive(trainer_pid)


def _alive(pid):
  """True while pid runs (a zombie waiting for its reaper counts as gone)."""
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return False
  return state not in ("Z", "X")


def test_tpu_pod_setup_script_is_valid_bash():
  line = _dry_run([*TPU, "--tpu=t", "--steps=setup"])[-1]
  argv = shlex.split(line)
  assert _run(["bash", "-n", "-c", argv[argv.index("--command") + 1]]).returncode == 0


# --- SLURM and plain multi-node ---------------------------------------------------------------

def test_slurm_py_dry_run():
  lines = _dry_run([sys.executable, "launch/slurm.py", "--nodes=2", "--gpus_per_node=8",
                    "--partition=gpu", "--time=24:00:00", "--sbatch_arg=--exclusive", "--dry_run",
                    "--", "--config=configs/render.py:base", "--workdir=gs://bkt/r1"])
  assert lines == [
      f"mkdir -p {ROOT}/slurm_logs",
      "sbatch --job-name=concept_diffusion --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 "
      f"--chdir={ROOT} --output=slurm_logs/%x-%j.out --partition=gpu --time=24:00:00 "
      f"--exclusive {ROOT}/launch/slurm.sbatch --config=configs/render.py:base "
      "--workdir=gs://bkt/r1"]
  per_node = _dry_run([sys.executable, "launch/slurm.py", "--nodes=4", "--per=node", "--dry_run"])
  assert "--nodes=4 --ntasks-per-node=1 --gpus-per-node=8" in per_node[1]


@pytest.mark.parametrize("slurm_env, prefix", [
    ({"SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8"}, ""),
    ({"SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"},
     "env JAX_LOCAL_DEVICE_IDS=0,1,2,3 "),
])
def test_slurm_sbatch_dry_run(slurm_env, prefix):
  lines = _dry_run(["bash", "launch/slurm.sbatch", "--dry_run", "--config=configs/render.py:base",
                    "--workdir=gs://bkt/r1"], CD_PYTHON="python3", **slurm_env)
  assert lines == [
      f"{prefix}srun --kill-on-bad-exit=1 --label python3 -m concept_diffusion.train "
      "--config.distributed.initialize=True --config=configs/render.py:base --workdir=gs://bkt/r1"]


@pytest.mark.parametrize("cluster_env, dist", [
    ({"CD_COORDINATOR": "10.0.0.1:8476", "CD_NUM_PROCESSES": "4", "CD_PROCESS_ID": "1"},
     "coordinator_address=10.0.0.1:8476 --config.distributed.num_processes=4 "
     "--config.distributed.process_id=1"),
    ({"MASTER_ADDR": "head", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "0",
      "CD_LOCAL_DEVICE_IDS": "0,1"},
     "coordinator_address=head:29500 --config.distributed.num_processes=2 "
     "--config.distributed.process_id=0 --config.distributed.local_device_ids=0,1"),
])
def test_multinode_dry_run(cluster_env, dist):
  lines = _dry_run(["bash", "launch/multinode.sh", "--dry_run", "--config=configs/render.py:base",
                    "--workdir=gs://bkt/r1"], CD_PYTHON="python3", **cluster_env)
  assert lines == [
      "python3 -m concept_diffusion.train --config=configs/render.py:base --workdir=gs://bkt/r1 "
      f"--config.distributed.initialize=True --config.distributed.{dist}"]


def test_multinode_without_cluster_variables_says_what_to_set():
  proc = _run(["bash", "launch/multinode.sh", "--dry_run", "--config=c"])
  assert proc.returncode == 2 and "set CD_COORDINATOR=host:port" in proc.stderr


# --- library helper ---------------------------------------------------------------------------

def test_distributed_kwargs_flags_then_env_then_jax():
  unset = {"coordinator_address": "", "num_processes": 0, "process_id": -1,
           "local_device_ids": ""}
  assert distributed_kwargs(unset, environ={}) == {}  # TPU / SLURM: JAX discovers everything.
  env = {"CD_COORDINATOR": "h:1", "CD_NUM_PROCESSES": "4", "CD_PROCESS_ID": "3",
         "CD_LOCAL_DEVICE_IDS": "0,1"}
  assert distributed_kwargs(unset, environ=env) == {
      "coordinator_address": "h:1", "num_processes": 4, "process_id": 3,
      "local_device_ids": [0, 1]}
  flags = {**unset, "coordinator_address": "a:2", "process_id": 0}
  assert distributed_kwargs(flags, environ=env) == {
      "coordinator_address": "a:2", "num_processes": 4, "process_id": 0,
      "local_device_ids": [0, 1]}


@pytest.mark.parametrize("dist, env, message", [
    ({"coordinator_address": "nohost"}, {}, "config.distributed.coordinator_address='nohost'"),
    ({}, {"CD_NUM_PROCESSES": "two"}, "CD_NUM_PROCESSES='two' is not an int"),
    ({"num_processes": 2, "process_id": 2}, {}, "process_id=2 must lie in [0, num_processes=2)"),
])
def test_distributed_kwargs_errors_name_the_field(dist, env, message):
  with pytest.raises(ValueError) as error:
    distributed_kwargs(dist, environ=env)
  assert message in str(error.value)
