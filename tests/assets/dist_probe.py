"""Multi-process probe: initialize jax.distributed from trainer-style flags, psum over all devices.

  python launch/local.py --num_processes=2 --devices_per_process=4 \
      --script=tests/assets/dist_probe.py

Prints `probe process=i/n devices=D psum=S` where S = 1 + 2 + ... + D. Test hooks:
--probe.fail_process=i makes process i exit 3 before initializing; --probe.sleep_s
sleeps (after printing `probe ready`) before initializing.
"""

import argparse
import sys
import time

# Flag name -> (type, unset value), as in config.distributed.
_DIST_FLAGS = {"coordinator_address": (str, ""), "num_processes": (int, 0),
               "process_id": (int, -1), "local_device_ids": (str, "")}


def parse_flags(argv):
  """Reads --config.distributed.* and --probe.* flags; ignores the rest (--config=, --workdir=)."""
  parser = argparse.ArgumentParser(allow_abbrev=False)  # --config= is not --config.distributed.*
  parser.add_argument("--config.distributed.initialize", dest="initialize", default="False")
  for name, (kind, unset) in _DIST_FLAGS.items():
    parser.add_argument(f"--config.distributed.{name}", dest=name, type=kind, default=unset)
  parser.add_argument("--probe.fail_process", dest="fail_process", type=int, default=-1)
  parser.add_argument("--probe.sleep_s", dest="sleep_s", type=float, default=0.0)
  args, _ = parser.parse_known_args(argv)
  return args


def main(argv):
  args = parse_flags(argv)
  dist = {name: getattr(args, name) for name in _DIST_FLAGS}
  if args.sleep_s:
    print("probe ready", flush=True)
    time.sleep(args.sleep_s)
  if dist["process_id"] == args.fail_process:
    print(f"probe process={args.fail_process} failing on purpose", flush=True)
    return 3

  import jax  # Imported late so the failure hooks above stay fast.
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from concept_diffusion.parallel.launch_env import distributed_kwargs

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.initialize.lower() in ("true", "1"):
    jax.distributed.initialize(**distributed_kwargs(dist))
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  local_D = 1 + jax.process_index() * jax.local_device_count() + np.arange(
      jax.local_device_count(), dtype=np.int32)
  x_D = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_D)
  psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x.sum(), "data"), mesh=mesh,
                               in_specs=P("data"), out_specs=P()))(x_D)
  print(f"probe process={jax.process_index()}/{jax.process_count()} "
        f"devices={jax.device_count()} psum={int(psum.addressable_data(0))}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
