"""AR baseline: flat token causal LM (next-token cross-entropy), same data and trainer.

  python -m concept_diffusion.train --config=configs/ar.py:tiny --workdir=/tmp/ar

Presets (examples x T tokens per step):
  tiny   ~1.3M params   32 x 128  =     4,096 tokens / step; 2 CPU cores.
  small  ~126M params  256 x 1024 =   262,144 tokens / step; 8 chips.
  base   ~1.06B params 256 x 2048 =   524,288 tokens / step; 64 chips, FSDP
         (plan: 13.8 GiB/chip on 64 x tpu-v5p):
    python launch/tpu_pod.py --tpu=my-v5p-128 --zone=ZONE --config=configs/ar.py:base \
        --workdir=gs://BUCKET/runs/ar-base
  large  ~8.1B params  256 x 4096 = 1,048,576 tokens / step; 256 chips, tensor parallel 8
         inside a host, FSDP across hosts (plan: 19.9 GiB/GPU on 256 x h100):
    python launch/slurm.py --nodes=32 --gpus_per_node=8 -- --config=configs/ar.py:large \
        --workdir=gs://BUCKET/runs/ar-large
"""

from concept_diffusion import config as base


def get_config(preset="tiny"):
  c = base.base_config()
  c.stage = "ar"
  if preset == "tiny":
    c.data.seq_len = 128
    c.model.embed_dim = 128
    c.model.mlp_dim = 512
    c.model.baseline_layers = 4
    c.train.batch_size = 32
    c.train.num_steps = 1000  # The README comparison's budget for every model.
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 100
    c.train.log_every = 50
    c.checkpoint.every_steps = 250
  elif preset == "small":  # ~100M params.
    c.data.vocab_size = 8192
    c.data.tokenizer_docs = 20000
    c.data.seq_len = 1024
    c.model.embed_dim = 768
    c.model.num_heads = 12
    c.model.num_kv_heads = 12
    c.model.head_dim = 64
    c.model.mlp_dim = 3072
    c.model.baseline_layers = 12
    c.model.dtype = "bfloat16"
    c.train.batch_size = 256
    c.train.num_steps = 50_000
    c.train.learning_rate = 6e-4
    c.train.warmup_steps = 2000
    c.train.log_every = 100
    c.checkpoint.every_steps = 2000
  elif preset in ("base", "large"):  # Shared by the two scale-out presets.
    big = preset == "large"
    c.data.vocab_size = 32768
    c.data.tokenizer_docs = 200_000
    c.data.seq_len = 4096 if big else 2048
    c.model.embed_dim = 4096 if big else 2048
    c.model.num_heads = 32 if big else 16
    c.model.num_kv_heads = 8 if big else 16  # Grouped-query attention at 8B.
    c.model.head_dim = 128
    c.model.mlp_dim = 14336 if big else 5632
    c.model.baseline_layers = 36 if big else 18
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True  # One compiled block: compile time flat in depth.
    c.model.remat = "full" if big else "dots"
    c.train.batch_size = 256  # Examples of T tokens, see the docstring.
    c.train.num_steps = 100_000
    c.train.learning_rate = 2e-4 if big else 3e-4
    c.train.warmup_steps = 2000
    c.train.log_every = 100
    c.checkpoint.every_steps = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1  # Params, grads and optimizer state sharded over every chip.
    c.mesh.tensor = 8 if big else 1  # Heads / MLP / vocab split inside one host.
  else:
    raise ValueError(f"unknown preset {preset!r}; use tiny, small, base or large")
  return c
