"""Runs the trainer on every worker of a Cloud TPU VM slice (or every slice of a queued resource).

  python launch/tpu_pod.py --tpu=my-v5e-32 --zone=us-west4-a \
      --config=configs/render.py:base --workdir=gs://my-bucket/runs/render-1 \
      -- --config.train.num_steps=20000

Steps (--steps, comma-separated, default setup,run,tail):
  setup  copy this tree to every worker (tar + `gcloud ... scp --worker=all`), or
         `git clone` --source=URL there, and install it from pyproject.toml into
         ~/cd_venv (uv, Python 3.11: TPU VM images ship an older Python) with jax[tpu].
  run    start `python -m concept_diffusion.train ... --config.distributed.initialize=True`
         on all workers at once, detached (nohup), logging to ~/cd_logs/RUN.log.
         On TPU, jax.distributed.initialize() needs no arguments: the TPU runtime
         tells every worker the coordinator, its process id and the process count.
  tail   follow worker 0's log (Ctrl-C stops tailing; training goes on).
  stop   SIGTERM the run on every worker: the trainer checkpoints at the preemption
         sync point and exits.

The workdir must be shared by all workers: a gs:// path (Orbax and etils.epath write
checkpoints, metrics.jsonl and TensorBoard events there directly).

Multislice (several slices over the data-center network, DCN): create the slices as one
queued resource (`gcloud compute tpus queued-resources create QR --node-count=S ...`) and
pass --queued_resource=QR instead of --tpu: every command then goes to `--node=all
--worker=all`, and the TPU runtime gives each process its slice. Slices you created
one by one need the MEGASCALE_COORDINATOR_ADDRESS (slice 0, worker 0, host:port),
MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT variables: run this launcher
once per slice with --env=NAME=VALUE for each. Keep only the data axis across slices, so
one gradient all-reduce per step is all that crosses DCN: --config.mesh.data=S
--config.mesh.fsdp=-1 (FSDP and tensor parallelism stay inside a slice, on ICI).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = ("stop", "setup", "run", "tail")  # In the order they run.
TARBALL = "/tmp/concept_diffusion_src.tgz"  # Local staging file of the copied tree.
REMOTE_TREE = "~/concept_diffusion"  # Where the source tree lives on every worker.
REMOTE_PYTHON = "~/cd_venv/bin/python"
UV = "~/.local/bin/uv"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits `LAUNCHER_FLAGS -- TRAINER_ARGS` and parses the launcher flags."""
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(prog="launch/tpu_pod.py", allow_abbrev=False,
                                   description="Train on every worker of a TPU VM slice.")
  target = parser.add_mutually_exclusive_group(required=True)
  target.add_argument("--tpu", help="TPU VM name (one slice).")
  target.add_argument("--queued_resource", help="Queued resource id (all its slices).")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default="", help="GCP project (default: gcloud's).")
  parser.add_argument("--config", default="", help="e.g. configs/render.py:base")
  parser.add_argument("--workdir", default="", help="gs://BUCKET/PATH shared by all workers.")
  parser.add_argument("--run_name", default="", help="Log/pid file name (default: workdir name).")
  parser.add_argument("--source", default=str(REPO_ROOT), help="Local tree or git URL to install.")
  parser.add_argument("--ref", default="", help="Branch or tag of a git --source.")
  parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                      help="Environment variable of the trainer (repeatable).")
  parser.add_argument("--steps", default="setup,run,tail", help=f"Subset of {','.join(STEPS)}.")
  parser.add_argument("--allow_local_workdir", action="store_true",
                      help="Accept a non-gs:// workdir (a shared mount on every worker).")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands; run nothing.")
  args = parser.parse_args(argv[:split])
  _check(parser, args)
  return args, argv[split + 1:]


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Rejects flag combinations that would fail on the workers, before anything runs."""
  args.steps = [s for s in args.steps.split(",") if s]
  unknown = [s for s in args.steps if s not in STEPS]
  if unknown or not args.steps:
    parser.error(f"--steps={','.join(args.steps)}: each step must be one of {', '.join(STEPS)}")
  for item in args.env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
      parser.error(f"--env={item!r} is not NAME=VALUE")
  if "run" in args.steps:
    if not args.config or not args.workdir:
      parser.error("the run step needs --config and --workdir")
    if not args.workdir.startswith("gs://") and not args.allow_local_workdir:
      parser.error(f"--workdir={args.workdir} is not gs://...: each worker would write its own "
                   "copy; use a bucket, or --allow_local_workdir for a shared mount")
  args.run_name = args.run_name or args.workdir.rstrip("/").rsplit("/", 1)[-1] or "run"
  if not re.fullmatch(r"[A-Za-z0-9._-]+", args.run_name):
    parser.error(f"--run_name={args.run_name!r} may only hold letters, digits, '.', '_', '-'")


def _is_git(source: str) -> bool:
  return "://" in source or source.startswith("git@")


def gcloud(args: argparse.Namespace, verb: str, *positional: str, everywhere: bool = True):
  """A `gcloud compute tpus ... ssh|scp` command for all workers (or worker 0)."""
  if args.queued_resource:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", verb, *positional]
    where = ["--node=all", "--worker=all"] if everywhere else ["--node=0", "--worker=0"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional]
    where = ["--worker=all" if everywhere else "--worker=0"]
  project = [f"--project={args.project}"] if args.project else []
  return [*cmd, f"--zone={args.zone}", *project, *where]


def _name(args: argparse.Namespace) -> str:
  return args.queued_resource or args.tpu


def setup_commands(args: argparse.Namespace) -> list[list[str]]:
  """Puts the source tree on every worker and installs it into ~/cd_venv."""
  install = [
      f"test -x {UV} || curl -LsSf https://astral.sh/uv/install.sh | sh",
      f"test -x {REMOTE_PYTHON} || {UV} venv --python=3.11 ~/cd_venv",
      f'{UV} pip install --python {REMOTE_PYTHON} {REMOTE_TREE} "jax[tpu]"',
  ]
  if _is_git(args.source):
    branch = f" --branch={shlex.quote(args.ref)}" if args.ref else ""
    fetch = [f"rm -rf {REMOTE_TREE}",
             f"git clone -q --depth=1{branch} {shlex.quote(args.source)} {REMOTE_TREE}"]
    return [gcloud(args, "ssh", _name(args), "--command", _script(fetch + install))]
  tarball = pathlib.PurePath(TARBALL).name
  fetch = [f"rm -rf {REMOTE_TREE}", f"mkdir {REMOTE_TREE}",
           f"tar -xzf ~/{tarball} -C {REMOTE_TREE}"]
  return [
      ["tar", "-czf", TARBALL, "--exclude=.git", "--exclude=__pycache__", "--exclude=*.egg-info",
       "--exclude=.venv", "-C", args.source, "."],
      gcloud(args, "scp", TARBALL, f"{_name(args)}:"),
      gcloud(args, "ssh", _name(args), "--command", _script(fetch + install)),
  ]


def _script(lines: list[str]) -> str:
  """One remote shell line that stops at the first failing step."""
  return "; ".join(["set -e", *lines])


def run_command(args: argparse.Namespace, trainer_args: list[str]) -> list[str]:
  """Starts the trainer, detached, on every worker; refuses if this run is still alive."""
  log, pid = f"~/cd_logs/{args.run_name}.log", f"~/cd_logs/{args.run_name}.pid"
  env = shlex.join(["env", *args.env]) + " " if args.env else ""
  train = shlex.join(["-m", "concept_diffusion.train", f"--config={args.config}",
                      f"--workdir={args.workdir}", "--config.distributed.initialize=True",
                      *trainer_args])
  lines = [
      "mkdir -p ~/cd_logs",
      f"if test -f {pid} && kill -0 $(cat {pid}) 2>/dev/null; then "
      f'echo "run {args.run_name} is still running: --steps=stop first" >&2; exit 1; fi',
      f"cd {REMOTE_TREE}",
      # Detached from the ssh session; $! is the trainer itself (setsid and nohup exec it).
      f"setsid nohup {env}{REMOTE_PYTHON} {train} > {log} 2>&1 < /dev/null & echo $! > {pid}",
  ]
  return gcloud(args, "ssh", _name(args), "--command", _script(lines))


def tail_command(args: argparse.Namespace) -> list[str]:
  """Follows worker 0's log from its first line."""
  follow = f"tail -n +1 -F ~/cd_logs/{args.run_name}.log"
  return gcloud(args, "ssh", _name(args), "--command", follow, everywhere=False)


def stop_command(args: argparse.Namespace) -> list[str]:
  """SIGTERM to the run on every worker (the trainer saves a checkpoint first)."""
  return gcloud(args, "ssh", _name(args), "--command",
                f"kill -TERM $(cat ~/cd_logs/{args.run_name}.pid)")


def commands(args: argparse.Namespace, trainer_args: list[str]) -> list[list[str]]:
  """Every command of the chosen steps, in order."""
  out = []
  if "stop" in args.steps:
    out.append(stop_command(args))
  if "setup" in args.steps:
    out += setup_commands(args)
  if "run" in args.steps:
    out.append(run_command(args, trainer_args))
  if "tail" in args.steps:
    out.append(tail_command(args))
  return out


def main(argv: list[str]) -> int:
  args, trainer_args = parse_args(argv)
  cmds = commands(args, trainer_args)
  if args.dry_run:
    print("\n".join(shlex.join(cmd) for cmd in cmds))
    return 0
  for cmd in cmds:
    print(f"[tpu_pod] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
      returncode = subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
      if cmd == cmds[-1] and "tail" in args.steps:
        print("[tpu_pod] stopped following; the run goes on (end it with --steps=stop)",
              file=sys.stderr)
        return 0
      return 130
    if returncode:
      print(f"[tpu_pod] failed with exit status {returncode}", file=sys.stderr)
      return returncode
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
