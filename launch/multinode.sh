#!/bin/bash
# Multi-node training without SLURM or torchrun: run this on every node, one process each.
#
#   CD_COORDINATOR=10.0.0.1:8476 CD_NUM_PROCESSES=4 CD_PROCESS_ID=0 \
#     bash launch/multinode.sh --config=configs/render.py:base --workdir=gs://bucket/run
#
# CD_COORDINATOR is host:port of process 0, reachable from every node; CD_NUM_PROCESSES the
# process count; CD_PROCESS_ID this node's index. Unset ones fall back to MASTER_ADDR:MASTER_PORT,
# WORLD_SIZE and RANK (what Kubernetes PyTorchJob-style operators set, one process per pod).
# CD_LOCAL_DEVICE_IDS=0,1,.. restricts the GPUs; CD_PYTHON picks the interpreter.
# --dry_run as the first argument prints the command instead of running it.

set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then
  dry_run=1
  shift
fi
python="${CD_PYTHON:-python3}"

coordinator="${CD_COORDINATOR:-}"
if [[ -z "$coordinator" && -n "${MASTER_ADDR:-}" ]]; then
  coordinator="${MASTER_ADDR}:${MASTER_PORT:-8476}"
fi
num_processes="${CD_NUM_PROCESSES:-${WORLD_SIZE:-}}"
process_id="${CD_PROCESS_ID:-${RANK:-}}"
if [[ -z "$coordinator" || -z "$num_processes" || -z "$process_id" ]]; then
  echo "multinode.sh: set CD_COORDINATOR=host:port, CD_NUM_PROCESSES and CD_PROCESS_ID" \
       "(or MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK) on every node" >&2
  exit 2
fi

cmd=("$python" -m concept_diffusion.train "$@"
     --config.distributed.initialize=True
     "--config.distributed.coordinator_address=${coordinator}"
     "--config.distributed.num_processes=${num_processes}"
     "--config.distributed.process_id=${process_id}")
if [[ -n "${CD_LOCAL_DEVICE_IDS:-}" ]]; then
  cmd+=("--config.distributed.local_device_ids=${CD_LOCAL_DEVICE_IDS}")
fi

if (( dry_run )); then
  "$python" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "${cmd[@]}"
else
  exec "${cmd[@]}"
fi
