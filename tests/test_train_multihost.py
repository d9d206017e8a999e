"""Two local processes x 4 CPU devices train and checkpoint; one device restores and continues."""

import json
import os
import shutil
import socket
import subprocess
import sys

from test_train import REPO, TINY, _args, _env, _metrics, _run, _steps, tokenizer_dir, workdir  # noqa: F401

def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_save_one_device_restores(workdir):
  port = _free_port()
  flags = ["--config.train.num_steps=4", "--config.checkpoint.every_steps=2",
           "--config.mesh.fsdp=2", "--config.distributed.initialize=true",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           "--config.distributed.num_processes=2"]
  procs = [subprocess.Popen(_args(workdir, "render", *flags, f"--config.distributed.process_id={i}"),
                            cwd=REPO, env=_env(4), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert _steps(workdir) == [2, 4]
  assert [m["step"] for m in _metrics(workdir)] == [1, 2, 3, 4]  # Process 0 only.
  single = _run(workdir, "--config.train.num_steps=6", "--config.checkpoint.every_steps=2",
                "--config.mesh.data=1")
  assert single.returncode == 0, single.stderr[-3000:]
  assert "resumed from checkpoint at step 4" in single.stdout
  assert _steps(workdir)[-1] == 6
