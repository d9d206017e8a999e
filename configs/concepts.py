"""Concepts stage: causal concept model + diffusion head over a frozen render encoder.

  python -m concept_diffusion.train --config=configs/concepts.py:tiny --workdir=/tmp/concepts \
      --config.concepts.render_workdir=/tmp/render

Chunking (data.concept_len, granularity, vocab, source) and concept_dim come from
the render run; model.* below sizes the concept model only. Pair each preset with the
render preset of the same name (plan.py does, to size the frozen encoder).

Presets (examples x N concepts per step; tokens = concepts x the render run's L):
  tiny   ~1.6M params   32 x 16  =    512 concepts,     8,192 tokens / step; 2 CPU cores
         (2,400 steps, ~5 min).
  small  ~112M params  256 x 64  = 16,384 concepts,   262,144 tokens / step; 8 chips.
  base   ~1.08B params 128 x 256 = 32,768 concepts,   524,288 tokens / step; 64 chips, FSDP
         (plan: 3.7 GiB/chip on 64 x tpu-v5p):
    python launch/tpu_pod.py --tpu=my-v5p-128 --zone=ZONE --config=configs/concepts.py:base \
        --workdir=gs://BUCKET/runs/concepts-base -- \
        --config.concepts.render_workdir=gs://BUCKET/runs/render-base
  large  ~8.1B params  256 x 256 = 65,536 concepts, 1,048,576 tokens / step; 256 chips
         (plan: 9.5 GiB/GPU on 256 x h100),
         tensor parallel 8 inside a host, FSDP across hosts:
    python launch/slurm.py --nodes=32 --gpus_per_node=8 -- --config=configs/concepts.py:large \
        --workdir=gs://BUCKET/runs/concepts-large \
        --config.concepts.render_workdir=gs://BUCKET/runs/render-large
  With a concept cache (encoded once: python -m concept_diffusion.encode, see its docstring)
  add --config.data.source=concepts:gs://BUCKET/cache/render-base: no encoder runs in training.
"""

from concept_diffusion import config as base


def get_config(preset="tiny"):
  c = base.base_config()
  c.stage = "concepts"
  c.concepts.objective = "flow"
  if preset == "tiny":
    c.data.num_concepts = 16
    c.model.embed_dim = 128
    c.model.mlp_dim = 512
    c.model.concept_layers = 2
    c.model.diff_head_layers = 2
    c.model.diff_head_dim = 256
    c.train.batch_size = 32
    # Measured: the concept model is what limits generation, and it keeps learning;
    # 600 -> 2,400 steps took consistent-with-prompt 0.12 -> 0.43 (README "Results").
    # Render (600 steps) + concepts (2,400) = the ar tiny preset's training FLOPs.
    c.train.num_steps = 2400
    # Measured: feeding the concept model the encoder's concept of each rendered chunk
    # instead of its raw sample took gen-PPL 17.1 -> 11.0 and well-formed 0.64 -> 0.68
    # at lr 1e-3; at lr 3e-3 the two are level (README "Results", row no_reencode).
    # Chunks then render one after another.
    c.concepts.reencode = True
    # Measured: 3e-3 rather than 1e-3 took consistent-with-prompt 0.47 -> 0.57, well-formed
    # 0.66 -> 0.82 and gen-PPL 12.9 -> 6.4 at the same FLOPs (256 prompts; README
    # "Results", What was learned; grid row lr1e-3).
    # Measured, and left as they are: 8 candidates per concept with the consensus kept
    # (concepts.num_candidates) and 4 layers at equal FLOPs were no better (README).
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 100
    c.train.log_every = 50
    c.checkpoint.every_steps = 200
  elif preset == "small":  # ~100M-param concept model.
    c.data.num_concepts = 64
    c.model.embed_dim = 768
    c.model.num_heads = 12
    c.model.num_kv_heads = 12
    c.model.head_dim = 64
    c.model.mlp_dim = 2048
    c.model.concept_layers = 12
    c.model.diff_head_layers = 4
    c.model.diff_head_dim = 1024
    c.model.dtype = "bfloat16"
    c.concepts.reencode = True  # As tiny (measured there only).
    c.train.batch_size = 256
    c.train.num_steps = 50_000
    c.train.learning_rate = 5e-4
    c.train.warmup_steps = 2000
    c.train.log_every = 100
    c.checkpoint.every_steps = 2000
  elif preset in ("base", "large"):  # Shared by the two scale-out presets.
    big = preset == "large"
    c.data.num_concepts = 256  # Context of 256 concepts (4,096 tokens at L = 16).
    c.model.embed_dim = 4096 if big else 2048
    c.model.num_heads = 32 if big else 16
    c.model.num_kv_heads = 8 if big else 16  # Grouped-query attention at 8B.
    c.model.head_dim = 128
    c.model.mlp_dim = 14336 if big else 5632
    c.model.concept_layers = 32 if big else 18
    c.model.diff_head_layers = 12 if big else 6
    c.model.diff_head_dim = 4096 if big else 2048
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True  # One compiled block: compile time flat in depth.
    c.model.remat = "full" if big else "dots"
    c.train.batch_size = 256 if big else 128  # Examples of N concepts, see the docstring.
    c.train.num_steps = 100_000
    c.train.learning_rate = 2e-4 if big else 3e-4
    c.train.warmup_steps = 2000
    c.train.log_every = 100
    c.checkpoint.every_steps = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1  # Params, grads and optimizer state sharded over every chip.
    c.mesh.tensor = 8 if big else 1  # Heads / MLP split inside one host.
  else:
    raise ValueError(f"unknown preset {preset!r}; use tiny, small, base or large")
  return c
