"""MDM baseline: flat token masked-diffusion LM (ELBO), same data and trainer.

  python -m concept_diffusion.train --config=configs/mdm.py:tiny --workdir=/tmp/mdm

Presets (examples x T tokens per step):
  tiny   ~1.3M params   32 x 128  =     4,096 tokens / step; 2 CPU cores.
  small  ~126M params  256 x 1024 =   262,144 tokens / step; 8 chips.
  base   ~1.06B params 256 x 2048 =   524,288 tokens / step; 64 chips, FSDP
         (plan: 13.8 GiB/chip on 64 x tpu-v5p):
    python launch/tpu_pod.py --tpu=my-v5p-128 --zone=ZONE --config=configs/mdm.py:base \
        --workdir=gs://BUCKET/runs/mdm-base
  large  ~8.1B params  256 x 4096 = 1,048,576 tokens / step; 256 chips, tensor parallel 8
         inside a host, FSDP across hosts (plan: 19.9 GiB/GPU on 256 x h100):
    python launch/slurm.py --nodes=32 --gpus_per_node=8 -- --config=configs/mdm.py:large \
        --workdir=gs://BUCKET/runs/mdm-large
"""

import importlib.util
import pathlib


def get_config(preset="tiny"):
  """The AR baseline's preset with the masked-diffusion objective: one field apart."""
  spec = importlib.util.spec_from_file_location("configs_ar",
                                                pathlib.Path(__file__).with_name("ar.py"))
  ar = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ar)
  c = ar.get_config(preset)
  c.stage = "mdm"
  return c
