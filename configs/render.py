"""Render stage: concept encoder + masked-diffusion renderer, trained together.

  python -m concept_diffusion.train --config=configs/render.py:tiny --workdir=/tmp/render
  python -m concept_diffusion.train --config=configs/render.py:small --workdir=runs/render

Presets (examples x N concepts x L tokens per step; plan them on a target with
`python -m concept_diffusion.plan --config=configs/render.py:PRESET --devices=D --device_kind=K`):
  tiny   ~2.0M params   16 x 8 x 16  =    128 concepts,     2,048 tokens / step; 2 CPU cores
         (1,200 steps, ~5.5 min: held-out round-trip token accuracy ~0.999).
  tiny_text  tiny as measured best on real text (whole concepts of at most 8 tokens,
         1,800 render steps and 1,360 concept steps, sampled cool and guided), the pair
         in the main job:
    python -m concept_diffusion.pipeline --workdir=runs/text \
        --render_config=configs/render.py:tiny_text \
        --concepts_config=configs/concepts.py:tiny_text \
        --render_config.data.source='text:/usr/share/doc/python3.11/html/_sources/**/*.rst.txt'
  small  ~110M params  256 x 8 x 16  =  2,048 concepts,    32,768 tokens / step; 8 chips.
  base   ~1.06B params 2048 x 16 x 16 = 32,768 concepts,   524,288 tokens / step; 64 chips
         (plan: 10.0 GiB/chip on 64 x tpu-v5p),
         FSDP over all of them (data centre network between hosts carries only FSDP gathers):
    python launch/tpu_pod.py --tpu=my-v5p-128 --zone=ZONE --config=configs/render.py:base \
        --workdir=gs://BUCKET/runs/render-base
  large  ~7.96B params 4096 x 16 x 16 = 65,536 concepts, 1,048,576 tokens / step; 256 chips
         (plan: 13.4 GiB/GPU on 256 x h100),
         tensor parallel 8 inside a host (NVLink / ICI), FSDP across hosts:
    python launch/slurm.py --nodes=32 --gpus_per_node=8 -- --config=configs/render.py:large \
        --workdir=gs://BUCKET/runs/render-large
"""

from concept_diffusion import config as base


def text(c):
  """The tiny preset as measured best on real text (configs/concepts.py:tiny_text pairs it)."""
  # Measured on the Python documentation (README "Results", "the tiny_text presets"),
  # at the ar baseline's FLOPs. On 16-token chunks, the two changes below gave gen-PPL
  # 168.9 / 161.0 over two concept seeds, 5.4x AR, against 9.0x for the tiny presets
  # sampled the same way (as the concepts preset samples). The render stage limits text
  # first (the truth rendered back: 88.8, 2.9x AR), and two of the built-in corpus's
  # choices cost there. Nested concepts put fewer of its bits into what is rendered:
  # whole ones give 168.9 against 227.6 (bound 88.8 against 105.3, seed 0). 1,800
  # render steps, the concepts run paying for them (1,194 steps instead of 2,209), give
  # 227.6 against 274.9 on nested concepts (bound 105.3 against 178.5).
  c.render.nested_dims = ()
  c.train.num_steps = 1800
  # Measured since: chunks of at most 8 tokens instead of 16 (the concepts run reading
  # 32 of them, the same text in context; 1,360 steps at equal FLOPs) take the bound
  # 88.8 -> 33.9 (AR 30.6; the round trip keeps 0.852 of the tokens, not 0.444) and
  # generation 168.9 / 161.0 -> 94.7 / 168.9 from concept seeds 0 / 1 (mean 5.4x ->
  # 4.3x AR; with the end 139.7 -> 118.2), on continuations as long as AR's (21.3
  # tokens against 13.6; AR 21.9). Concept seed 2: 133.5 (three seeds 132.4, 4.3x AR).
  c.data.concept_len = 8
  return c


def get_config(preset="tiny"):
  if preset == "tiny_text":
    return text(get_config("tiny"))
  c = base.base_config()
  c.stage = "render"
  if preset == "tiny":  # ~2.0M params; a few minutes on 2 CPU cores.
    c.data.vocab_size = 1024
    # Best measured for generation (README "Results"): a concept is a whole sentence
    # (capped at 16 tokens), and z noise stronger than z itself (unit RMS), so the
    # renderer reads a whole neighbourhood of a concept as that sentence and generated
    # concepts, which land near but not on the encoder's, still render. Under mean
    # pooling, each chunk's std drawn in U[0, 1] (render.z_noise_dist) raised the bound
    # 0.876 -> 0.911, but generation through it fell 0.714 -> 0.617 consistent.
    c.data.granularity = "sentence_capped"
    c.data.concept_len = 16
    c.data.num_concepts = 8  # Render needs no long context; 2,048 tokens per step.
    # Measured with slots pooling (below), which leaves precision to spare: noise 1.5
    # instead of 1.0 lowers the bound 0.997 -> 0.953 but raises generation 0.743 -> 0.763
    # consistent and 0.864 -> 0.887 well formed (three seeds each, every seed better);
    # 2.0 gave 0.771 from one seed, through a bound of 0.786 (README "Results"). On real
    # text (1,800 render steps, sampled cool) 1.25 / 2.0 generate at 122.2 / 150.3
    # gen-PPL against ~100 at 1.5: the renderer reading more bits costs more in the
    # concept model's samples than it gains in the bound.
    c.render.z_noise = 1.5
    # Measured: a mean of token states is a bag. Through unit noise, "Pia went from Delhi
    # to Turku." came back as "from Turku to Turku" (moves 0.10 consistent, city refs 0.33;
    # twice or four times the render steps, or D = 256, did not fix it). A readout of each
    # position besides the mean took the true continuations rendered back from 0.851 to
    # 0.999 consistent, and generation from 0.656 to 0.743 (three seeds each, equal FLOPs;
    # README "Results").
    c.model.encoder_pooling = "slots"
    c.model.embed_dim = 128
    c.model.mlp_dim = 512
    # Measured on real text: through z noise 1.5 a dimension carries <= 0.27 bits, so 128
    # carry ~34 bits, fewer than a 16-token chunk of documentation holds. 512 dimensions
    # take the bound (the truth rendered back) from 82.5 to 18.5 gen-PPL, the text's own
    # 17.0, but the concept model's samples render worse (193.7 against 100.5 over two
    # seeds, sampled cool; 1,974 at temperature 1) and the built-in corpus falls 0.764 ->
    # 0.672 consistent: precise concepts are harder to generate (README "Results").
    c.model.concept_dim = 128
    # Measured: nested concepts. Each chunk's concept is cut in training to its first 32,
    # 64 or all 128 dimensions (the rest zeroed), so the encoder puts the coarse content
    # first and the renderer learns to fill in from a prefix; generation renders the first
    # 64 of each sample (configs/concepts.py, concepts.render_dims). On the built-in corpus
    # better in each of five runs at equal FLOPs (three render seeds, three concept
    # seeds): 0.804 against 0.769 consistent (AR 0.838), though less well formed (0.911
    # against 0.928). Rendered from 32 / all 128: 0.792 / 0.790 (three render seeds).
    # Measured on top, not better (one run each, against 0.787 from the same seeds):
    # 800 / 1,600 render steps (the concepts run taking the FLOPs), 0.778 / 0.791; the
    # head fitted on the 64 rendered dimensions only (concepts.loss_dims), 0.762. Four
    # prefixes (16 / 32 / 64 / 128) gave 0.809 from one run; z noise 1.25 0.828 from the
    # same seeds, but over five runs 0.799 against 0.804, better in 2 of 5 pairs
    # (bound 0.993 against 0.973). On real text worse:
    # 232.3 against 177.4 gen-PPL (1,800 render steps, sampled cool with END at
    # temperature 1; bound 103.7 against 82.5): there the render stage's bits are short,
    # and a nested prefix carries more of them (README "Results"). On text, tiny_text
    # trains whole concepts (text() above) and samples all of each.
    c.render.nested_dims = (32, 64, 128)
    c.model.encoder_layers = 2
    c.model.renderer_layers = 2
    # Measured: twice the steps of the earlier default (600), with the concepts run
    # giving up their FLOPs (2,234 steps instead of 3,260), generate better on real text
    # from both seeds measured (gen-PPL 602.9 -> 403.7 and 535.7 -> 447.7) and level on
    # the built-in corpus (0.784 against 0.789 consistent, three seeds each), where the
    # bound of rendering the true continuation rises 0.953 -> 0.994 (README "Results").
    # Measured: train batches of real chunks (data.fill_examples: a document that does not
    # fit is cut and goes on in the next example, so no chunk slot is padding) with a
    # quarter of the END chunks (render.end_keep; every END chunk is the same one-token
    # chunk): 1.45x the real chunks per step at the same FLOPs. On real text the bound
    # (the true continuation rendered back) 166.5 -> 115.6 gen-PPL and generation 381.9 ->
    # 300.7 (two seeds); on the built-in corpus level over three render runs of three
    # concept seeds each, 0.767 against 0.766 consistent, and better formed, 0.917 against
    # 0.901 (README "Results"). From one render run it had seemed to cost 0.023: a render
    # run's own seed moves the rate that much (0.788 / 0.760 / 0.751 padded).
    c.data.fill_examples = True
    c.render.end_keep = 0.25
    c.train.batch_size = 16
    # Measured: 1,800 steps (the concepts run giving up their FLOPs) are the best on real
    # text (gen-PPL 100.5 sampled cool over two seeds) and lose on the built-in corpus
    # from every render seed: 0.744 against 0.771 consistent (render seeds 0 / 1 / 2,
    # concept seed 0, whole concepts; README "Results", Next). On text use the tiny_text
    # presets (text() above and in configs/concepts.py): 1,800 steps here, whole
    # concepts of at most 8 tokens, 1,360 in the concepts run at 3e-3, sampled as
    # --temperature=0.5 --guidance=4 --end_temperature=1: cooled and guided alone, the
    # sampler ends 2/3 of the continuations at once (gen-PPL ~100 on 7 tokens); with END
    # decided at temperature 1 it ends as the text does (42-48%) and scores 146-177 on
    # 14-16 tokens. The concepts preset's eight round-trip candidates (drafted) may stay
    # on: on 1,200-step runs of a later machine 253.7 against one candidate's 275.4 over
    # two concept seeds (one 16% better, one level; 15 against 18 tokens), at ~1/3 the
    # tokens/s (--num_candidates=1 for speed; README "Results"). On that machine, with
    # today's nested concepts, 1,800 steps gave 227.6 against 274.9 (seed 0), and
    # rendering all 128 dimensions (--render_dims=0) 258.4 / 270.8 against 274.9 / 275.8.
    c.train.num_steps = 1200
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 100
    c.train.log_every = 50
    c.checkpoint.every_steps = 200
  elif preset == "small":  # ~100M params; a TPU/GPU slice.
    c.data.vocab_size = 8192
    # As tiny: the best measured on the built-in corpus. On real text at tiny size no
    # setting rendered well (round-trip <= 0.27, README "Results"); at this size the
    # encoder has 60x the capacity, but that is not measured yet.
    c.data.granularity = "sentence_capped"
    c.data.concept_len = 16
    c.data.num_concepts = 8
    c.render.z_noise = 1.5
    c.model.encoder_pooling = "slots"  # As tiny (measured there only).
    c.render.nested_dims = (64, 128, 256)  # As tiny, in quarters (measured there only).
    c.data.fill_examples = True  # As tiny (measured there only).
    c.render.end_keep = 0.25
    c.data.tokenizer_docs = 20000
    c.model.embed_dim = 768
    c.model.num_heads = 12
    c.model.num_kv_heads = 12
    c.model.head_dim = 64
    c.model.mlp_dim = 2048
    c.model.concept_dim = 256
    c.model.encoder_layers = 6
    c.model.renderer_layers = 6
    c.model.dtype = "bfloat16"
    c.train.batch_size = 256
    c.train.num_steps = 50_000
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 2000
    c.train.log_every = 100
    c.checkpoint.every_steps = 2000
  elif preset in ("base", "large"):  # Shared by the two scale-out presets.
    big = preset == "large"
    c.data.vocab_size = 32768
    c.data.tokenizer_docs = 200_000
    c.data.concept_len = 16  # Longer chunks: a bigger encoder compresses more per concept.
    c.data.num_concepts = 16
    c.model.embed_dim = 4096 if big else 2048
    c.model.num_heads = 32 if big else 16
    c.model.num_kv_heads = 8 if big else 16  # Grouped-query attention at 8B.
    c.model.head_dim = 128
    c.model.mlp_dim = 14336 if big else 5632
    c.model.concept_dim = 2048 if big else 1024
    c.model.encoder_layers = 16 if big else 8
    c.model.renderer_layers = 18 if big else 8
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True  # One compiled block per stack: compile time flat in depth.
    c.model.remat = "full" if big else "dots"  # Saved activations per layer: E vs matmul outputs.
    c.train.batch_size = 4096 if big else 2048  # Examples; x N x L tokens, see the docstring.
    c.train.num_steps = 100_000
    c.train.learning_rate = 2e-4 if big else 3e-4
    c.train.warmup_steps = 2000
    c.train.log_every = 100
    c.checkpoint.every_steps = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1  # Params, grads and optimizer state sharded over every chip.
    c.mesh.tensor = 8 if big else 1  # Heads / MLP / vocab split inside one host.
  else:
    raise ValueError(f"unknown preset {preset!r}; use tiny, tiny_text, small, base or large")
  return c
