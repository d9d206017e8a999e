"""Runs N local CPU processes with simulated devices: the multi-host code path on one machine.

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      --config=configs/render.py:tiny --workdir=/tmp/cd_local

Child i runs `python -m concept_diffusion.train ARGS --config.distributed.initialize=True
--config.distributed.coordinator_address=127.0.0.1:PORT --config.distributed.num_processes=N
--config.distributed.process_id=i` with JAX_PLATFORMS=cpu, K simulated devices
(XLA_FLAGS=--xla_force_host_platform_device_count=K) and gloo CPU collectives: what every
host of a pod runs. `--script=PATH` runs a script instead of a module. Output lines carry
an `[i] ` prefix; if a child fails, the others are stopped and the launcher exits with the
failed child's status; SIGTERM and SIGINT are forwarded to the children. `--dry_run`
prints the commands, one per line, and runs nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits `LAUNCHER_FLAGS -- CHILD_ARGS` and parses the launcher flags."""
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(
      prog="launch/local.py", allow_abbrev=False,
      description="Start N local CPU processes that form one jax.distributed job.")
  parser.add_argument("--num_processes", type=int, default=2, help="Processes to start.")
  parser.add_argument("--devices_per_process", type=int, default=4,
                      help="Simulated CPU devices in each process.")
  target = parser.add_mutually_exclusive_group()
  target.add_argument("--module", default="concept_diffusion.train", help="Run `python -m MODULE`.")
  target.add_argument("--script", default="", help="Run `python PATH` instead of a module.")
  parser.add_argument("--port", type=int, default=0, help="Coordinator port (0 = a free one).")
  parser.add_argument("--python", default=sys.executable, help="Interpreter of the children.")
  parser.add_argument("--timeout_s", type=float, default=0, help="Stop all after this (0 = never).")
  parser.add_argument("--grace_s", type=float, default=10, help="SIGTERM-to-SIGKILL delay.")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands; run nothing.")
  args = parser.parse_args(argv[:split])
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  return args, argv[split + 1:]


def free_port() -> int:
  """A TCP port nobody listens on right now (the coordinator binds it moments later)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def child_commands(args: argparse.Namespace, child_args: list[str],
                   port: int) -> list[tuple[dict[str, str], list[str]]]:
  """(extra environment, argv) of each child process."""
  xla_flags = f"--xla_force_host_platform_device_count={args.devices_per_process}"
  env = {
      "JAX_PLATFORMS": "cpu",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), xla_flags])),
      "PYTHONUNBUFFERED": "1",  # Lines reach the prefixer as they are printed.
  }
  entry = [args.script] if args.script else ["-m", args.module]
  commands = []
  for i in range(args.num_processes):
    dist = [
        "--config.distributed.initialize=True",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        f"--config.distributed.num_processes={args.num_processes}",
        f"--config.distributed.process_id={i}",
    ]
    commands.append((env, [args.python, *entry, *child_args, *dist]))
  return commands


def format_command(env: dict[str, str], argv: list[str]) -> str:
  """One shell-quoted line that runs argv with env added."""
  assignments = [f"{k}={v}" for k, v in env.items()]
  return shlex.join(["env", *assignments, *argv] if env else argv)


def _pump(stream, prefix: str, lock: threading.Lock) -> None:
  """Copies a child's output to ours, line by line, with its prefix."""
  for line in iter(stream.readline, b""):
    text = line.decode(errors="replace")
    with lock:
      sys.stdout.write(prefix + text + ("" if text.endswith("\n") else "\n"))
      sys.stdout.flush()


def _exit_status(returncode: int) -> int:
  """Shell convention: 128 + N for a child killed by signal N."""
  return 128 - returncode if returncode < 0 else returncode


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> int:
  """Waits until all succeed (0), one fails (its status) or time runs out (124)."""
  deadline = time.monotonic() + timeout_s if timeout_s else None
  while True:
    codes = [p.poll() for p in procs]
    for i, code in enumerate(codes):
      if code:
        print(f"[local] process {i} exited with {code}; stopping the others", file=sys.stderr)
        return _exit_status(code)
    if all(code == 0 for code in codes):
      return 0
    if deadline and time.monotonic() > deadline:
      print(f"[local] timeout after {timeout_s}s; stopping all processes", file=sys.stderr)
      return 124
    time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to the children still running, SIGKILL after grace_s."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def run_children(commands, timeout_s: float = 0, grace_s: float = 10) -> int:
  """Starts all children, streams their output and returns the job's exit status."""
  lock = threading.Lock()
  procs, pumps = [], []
  for i, (env, argv) in enumerate(commands):
    # Own session: a terminal's Ctrl-C reaches the children once, through the launcher.
    proc = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    procs.append(proc)
    pumps.append(threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] ", lock), daemon=True))
    pumps[-1].start()

  def forward(signum, frame):
    del frame
    print(f"[local] forwarding signal {signum} to {len(procs)} processes", file=sys.stderr)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    return _wait(procs, timeout_s)
  finally:
    _stop(procs, grace_s)
    for s, handler in previous.items():
      signal.signal(s, handler)
    for pump in pumps:
      pump.join(timeout=2)


def main(argv: list[str]) -> int:
  args, child_args = parse_args(argv)
  port = args.port or free_port()
  commands = child_commands(args, child_args, port)
  if args.dry_run:
    print("\n".join(format_command(env, cmd) for env, cmd in commands))
    return 0
  return run_children(commands, args.timeout_s, args.grace_s)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
