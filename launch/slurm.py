"""Submits launch/slurm.sbatch: N nodes, one JAX process per GPU (or per node).

  python launch/slurm.py --nodes=4 --gpus_per_node=8 --partition=gpu -- \
      --config=configs/render.py:base --workdir=gs://my-bucket/runs/render-1

The job runs from the repository root; its log is LOG_DIR/JOB_NAME-JOBID.out, one line
per task output line, prefixed `TASK: `. `--dry_run` prints the commands and submits
nothing. Install the environment first (same venv on every node):
`pip install -e . "jax[cuda12]"`.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = REPO_ROOT / "launch" / "slurm.sbatch"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Splits `LAUNCHER_FLAGS -- TRAINER_ARGS` and parses the launcher flags."""
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(prog="launch/slurm.py", allow_abbrev=False,
                                   description="Submit a multi-node training job to SLURM.")
  parser.add_argument("--nodes", type=int, default=1)
  parser.add_argument("--gpus_per_node", type=int, default=8)
  parser.add_argument("--per", choices=("gpu", "node"), default="gpu",
                      help="One JAX process per GPU or per node.")
  parser.add_argument("--job_name", default="concept_diffusion")
  parser.add_argument("--partition", default="")
  parser.add_argument("--account", default="")
  parser.add_argument("--time", default="", help="Wall-clock limit, e.g. 24:00:00.")
  parser.add_argument("--log_dir", default="slurm_logs", help="Relative to the repository root.")
  parser.add_argument("--sbatch_arg", action="append", default=[], metavar="FLAG",
                      help="Extra sbatch flag, e.g. --sbatch_arg=--exclusive (repeatable).")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands; run nothing.")
  args = parser.parse_args(argv[:split])
  if args.nodes < 1 or args.gpus_per_node < 1:
    parser.error("--nodes and --gpus_per_node must be >= 1")
  return args, argv[split + 1:]


def commands(args: argparse.Namespace, trainer_args: list[str]) -> list[list[str]]:
  """mkdir of the log folder (sbatch does not create it), then the sbatch line."""
  tasks = args.gpus_per_node if args.per == "gpu" else 1
  optional = [f"--{name}={getattr(args, name)}" for name in ("partition", "account", "time")
              if getattr(args, name)]
  sbatch = [
      "sbatch", f"--job-name={args.job_name}", f"--nodes={args.nodes}",
      f"--ntasks-per-node={tasks}", f"--gpus-per-node={args.gpus_per_node}",
      f"--chdir={REPO_ROOT}", f"--output={args.log_dir}/%x-%j.out", *optional,
      *args.sbatch_arg, str(SBATCH_SCRIPT), *trainer_args,
  ]
  return [["mkdir", "-p", str(REPO_ROOT / args.log_dir)], sbatch]


def main(argv: list[str]) -> int:
  args, trainer_args = parse_args(argv)
  cmds = commands(args, trainer_args)
  if args.dry_run:
    print("\n".join(shlex.join(cmd) for cmd in cmds))
    return 0
  for cmd in cmds:
    returncode = subprocess.run(cmd, check=False).returncode
    if returncode:
      print(f"[slurm] {shlex.join(cmd)} failed with exit status {returncode}", file=sys.stderr)
      return returncode
  print(f"[slurm] log: {REPO_ROOT / args.log_dir}/{args.job_name}-JOBID.out; "
        "follow the job with squeue --me", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
