"""Arguments for `jax.distributed.initialize` from the config, then the environment.

Precedence, per field: `config.distributed.*` flags > CD_* environment variables
> JAX's own cluster detection (TPU VMs, SLURM, Open MPI, ...). A field left at
its "unset" value ("", 0, -1) is omitted, so JAX discovers it:

  CD_COORDINATOR=host:port  CD_NUM_PROCESSES=n  CD_PROCESS_ID=i
  CD_LOCAL_DEVICE_IDS=0,1,...

  if config.distributed.initialize:
    jax.distributed.initialize(**distributed_kwargs(config.distributed))
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# (initialize kwarg, config field, environment variable, unset config value).
_FIELDS = (
    ("coordinator_address", "coordinator_address", "CD_COORDINATOR", ""),
    ("num_processes", "num_processes", "CD_NUM_PROCESSES", 0),
    ("process_id", "process_id", "CD_PROCESS_ID", -1),
    ("local_device_ids", "local_device_ids", "CD_LOCAL_DEVICE_IDS", ""),
)


_EXPECTED = {"coordinator_address": "host:port", "num_processes": "an int",
             "process_id": "an int", "local_device_ids": "comma-separated ints"}


def _parse(kwarg: str, text: str, origin: str) -> Any:
  """Converts one string value to the type `jax.distributed.initialize` takes."""
  try:
    if kwarg == "local_device_ids":
      return [int(x) for x in text.split(",")]
    if kwarg != "coordinator_address":
      return int(text)
    host, _, port = text.rpartition(":")
    if host and port.isdigit():
      return text
  except ValueError:
    pass
  raise ValueError(f"{origin}={text!r} is not {_EXPECTED[kwarg]}")


def distributed_kwargs(dist: Mapping[str, Any] | None = None,
                       environ: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Keyword arguments for jax.distributed.initialize; unset fields are left to JAX."""
  dist = {} if dist is None else dist
  environ = os.environ if environ is None else environ
  kwargs = {}
  for kwarg, field, env_name, unset in _FIELDS:
    value = dist.get(field, unset)
    if value != unset:
      origin = f"config.distributed.{field}"
      kwargs[kwarg] = _parse(kwarg, str(value), origin) if isinstance(value, str) else value
    elif environ.get(env_name, "").strip():
      kwargs[kwarg] = _parse(kwarg, environ[env_name].strip(), env_name)
  if "process_id" in kwargs and "num_processes" in kwargs:
    if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
      raise ValueError(f"process_id={kwargs['process_id']} must lie in "
                       f"[0, num_processes={kwargs['num_processes']})")
  return kwargs
