"""Concepts stage: causal concept model + diffusion head over a frozen render encoder.

  python -m concept_diffusion.train --config=configs/concepts.py:tiny --workdir=/tmp/concepts \
      --config.concepts.render_workdir=/tmp/render

Chunking (data.concept_len, granularity, vocab, source) and concept_dim come from
the render run; model.* below sizes the concept model only. Pair each preset with the
render preset of the same name (plan.py does, to size the frozen encoder).

Presets (examples x N concepts per step; tokens = concepts x the render run's L):
  tiny   ~2.9M params   32 x 16  =    512 concepts,     8,192 tokens / step; 2 CPU cores
         (12,800 examples encoded once into a concept cache, then 2,209 steps).
  tiny_text  tiny as measured best on real text (whole concepts of at most 8 tokens,
         1,800 render steps and 1,360 concept steps, sampled cool and guided), the pair
         in the main job:
    python -m concept_diffusion.pipeline --workdir=runs/text \
        --render_config=configs/render.py:tiny_text \
        --concepts_config=configs/concepts.py:tiny_text \
        --render_config.data.source='text:/usr/share/doc/python3.11/html/_sources/**/*.rst.txt'
  small  ~133M params  256 x 64  = 16,384 concepts,   262,144 tokens / step; 8 chips.
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


def text(c):
  """The tiny preset as measured best on real text, over configs/render.py:tiny_text."""
  # 32 chunks of at most 8 tokens (configs/render.py:tiny_text) in context, the text of
  # tiny's 16 of 16. The render run's 1,800 steps leave this run 1,360 of the ar
  # baseline's FLOPs (tests/test_experiment.py checks that the pair is the measured row,
  # at equal FLOPs). The 2 layers stay: over 16-token chunks, 4 at equal FLOPs (1,009
  # steps) gave 178.5 against 168.9 gen-PPL (seed 0).
  c.data.num_concepts = 32
  c.train.num_steps = 1360
  c.train.learning_rate = 3e-3  # As measured (5e-3 was chosen on the built-in corpus).
  c.concepts.render_dims = 0  # Whole concepts (configs/render.py:tiny_text): render all.
  # Measured on text: the tiny preset's eight hot candidates kept by round trip write
  # long and loose there (gen-PPL 478.1 on 34.9 tokens, 15.6x AR); one sample at
  # temperature 0.5 and guidance 4 reads better (274.9 on 17.5 tokens, 9.0x AR; the
  # 1,200-step runs), with END decided by a sample of its own at temperature 1 (cooled
  # and guided alone, the sampler ends 2/3 of the continuations at once; the text ends
  # 42-48%). Eight such candidates kept by round trip: 253.7 against 275.4 over two
  # seeds (one better, one level) at ~1/3 the tokens/s, so one (README "Results").
  c.concepts.temperature = 0.5
  c.concepts.guidance = 4.0
  c.concepts.end_temperature = 1.0
  c.concepts.num_candidates = 1
  c.concepts.candidate_rule = "consensus"
  c.concepts.draft_steps = 0
  return c


def get_config(preset="tiny"):
  if preset == "tiny_text":
    return text(get_config("tiny"))
  c = base.base_config()
  c.stage = "concepts"
  c.concepts.objective = "flow"
  if preset == "tiny":
    c.data.num_concepts = 16
    c.model.embed_dim = 128
    c.model.mlp_dim = 512
    c.model.concept_layers = 2
    # Measured: the head's depth is what makes samples land on sentences. 6 residual
    # blocks instead of 2, at equal FLOPs (3,260 steps instead of 5,990): malformed
    # sentences 25 -> 7 of ~400, consistent-with-prompt 0.763 -> 0.789 and well-formed
    # 0.887 -> 0.906 over three seeds each (0.811 / 0.770 / 0.787 against 0.754 / 0.758 /
    # 0.776; AR 0.829 at the same FLOPs). 4 blocks gave 0.774 (three seeds), 8 (2,655
    # steps) 0.764 and a narrower head (128 wide, 11,328 steps) 0.714 (one seed each);
    # the head reading the context's concepts (model.head_reads_context) 0.716 at 6
    # blocks and 0.689 at 2 (README "Results").
    c.model.diff_head_layers = 6
    c.model.diff_head_dim = 256
    c.train.batch_size = 32
    # Measured: the concept model is what limits generation, and it keeps learning.
    # Its frozen encoder's forward was half the stage's FLOPs, so the stage encodes
    # 12,800 examples once (a concept cache) and trains 6,037 steps over them (15
    # epochs) in the FLOPs that 2,400 on-the-fly steps took: render (600 steps) +
    # concepts = 0.0415 PFLOPs, what the ar / mdm baselines get. Sampled as below, that
    # took consistent-with-prompt 0.646 -> 0.714, well-formed 0.81 -> 0.92 and gen-PPL
    # 11.0 -> 6.9 against the on-the-fly v2 default. A 25,600-example cache over 5,310
    # steps (the v3 default) gave 0.684 / 0.885 / 8.0: fewer examples seen more often
    # did better at this size, on all three (README "Results", rows default, v3 and
    # v2_t1s64; 128 prompts, standard error of a rate ~0.025), but within the spread
    # of seeds: this configuration from seeds 1 and 2 gave 0.648 / 0.895 / 7.6 and
    # 0.637 / 0.842 / 9.5 (rows seed1, seed2; three-seed mean 0.666 / 0.885 / 8.0, AR
    # 0.834 over two seeds). 6,400 examples over 6,401 steps gave 0.648 / 0.857 / 7.1.
    # With the render preset's slots pooling (its readout costs 47 steps' FLOPs), 5,990
    # steps keep the pipeline at 0.0415 PFLOPs: consistent 0.743 over three seeds (0.731 /
    # 0.745 / 0.753) against 0.656 with mean pooling and 6,037 steps, measured beside it;
    # 0.763 with the render stage's z noise at 1.5 (README "Results"). The 6-block head
    # (above) costs 1.84x a step: 3,260 steps. The render preset's 1,200 steps (twice
    # the 600 above; better on real text) leave 2,234.
    c.concepts.cache_examples = 12_800
    # Measured: the head works around a mean (model.head_mean): mu(h), a projection of
    # the context regressed onto the next concept, is added to the flow's velocity, so h
    # must carry what the context fixes (a restated colour) and the flow models the rest.
    # At equal FLOPs (2,209 steps instead of 2,234), consistent-with-prompt 0.757 / 0.766 /
    # 0.776 -> 0.799 / 0.781 / 0.783 and well-formed 0.884 / 0.866 / 0.898 -> 0.919 /
    # 0.905 / 0.921 from seeds 0 / 1 / 2 (256 prompts), and on real text gen-PPL 441.4 ->
    # 379.0 (seed 0; README "Results", rows v8 and default).
    c.model.head_mean = True
    c.concepts.mean_weight = 1.0
    c.train.num_steps = 2209
    # Measured: sampling the head's own distribution (temperature 1.0, the training
    # noise) and integrating it finely (64 Euler steps) is what makes it consistent:
    # 0.562 -> 0.646 on the previous default, where temperature 0.5 had the better
    # gen-PPL (6.7 against 11.0); 256 steps are no better than 64. Under today's presets
    # 0.5 still loses facts (consistent 0.757 -> 0.592) and reads better on real text
    # (gen-PPL 441.4 -> 386.5): tiny_text samples real text at 0.5 (with
    # END at 1, so it keeps the model's own odds: text() above).
    # Measured since: hotter than the training noise is better on the built-in corpus.
    # At 1.25, over five runs (render seeds 0 / 1 / 2, concept seeds 0 / 1 / 2; 256
    # prompts), consistent-with-prompt 0.813 -> 0.847 (AR 0.838 at the same FLOPs) and
    # well-formed 0.917 -> 0.920, better in every pair (+0.015 to +0.046). The samples
    # at 1.0 are too close to the mean: restated values come out wrong (a restated pet
    # 0.69, a move 0.50 from seed 0), and heat puts them on their value (0.75 / 0.67 at
    # 1.25, 0.94 / 0.91 at 2.0) while malformed sentences grow (9 -> 16 -> 88). Seed 0 at
    # 1.1 / 1.25 / 1.5 / 1.75 / 2.0: 0.813 / 0.834 / 0.836 / 0.834 / 0.830 against 0.793;
    # 1.5 over the five runs 0.845 (well formed 0.909). On 512 prompts (half of them not
    # used to choose it) 0.841 against AR's 0.838 over three seeds: level with AR.
    # README "Results", "the sampler's temperature".
    # Measured since: hotter still, with the render stage as a filter. Each concept is
    # sampled four times at temperature 2 and the candidate kept whose rendered chunk
    # re-encodes nearest to it (candidate_rule "roundtrip": a faithful, well-formed
    # render), END decided by a fifth sample at the same temperature (end_temperature; the
    # END chunk re-encodes exactly and would otherwise be kept). Chosen on the dev prompts
    # (seed 0: consistent-with-prompt 0.811 at 1.25 -> 0.895, well-formed 0.914 -> 0.942;
    # temperature 1.25 / 1.5 / 2.5 with four candidates 0.831 / 0.858 / 0.830) and
    # reported on the eval prompts over five runs (render seeds 0 / 1 / 2, concept seeds
    # 0 / 1 / 2): 0.846 -> 0.876 consistent, four pairs better and one level, AR 0.836 at
    # the same FLOPs (README "Results", "hot candidates kept by round trip"). Measured
    # since: eight candidates rather than four, 0.876 -> 0.895 over the same five runs, all
    # five pairs better (+0.005 to +0.037; two candidates 0.850), well formed 0.929 ->
    # 0.951, 1.07x AR; on the dev prompts 0.884 -> 0.893 over five runs. Generation samples
    # the head nine times and renders eight chunks per concept: on the dev prompts 91
    # tokens/s against 305 for two candidates (v13's single sample: ~470). Sixteen are no
    # better (0.891 over the five runs; 0.901 against 0.893 on the dev prompts) at half
    # the tokens/s. Measured since: the eight candidates rendered as 2-step drafts for
    # the choice and the kept one rendered again in 8 (draft_steps): level over the same
    # five runs (0.895 against 0.895 on the eval prompts, 0.893 against 0.893 on the dev
    # prompts; well formed 0.949 against 0.951 / 0.949 against 0.948) for fewer render
    # steps per concept (8 x 2 + 8 + END's 8 instead of 9 x 8): 1.37-1.51x the tokens/s
    # (README "Results", "the candidates rendered as drafts").
    c.concepts.temperature = 2.0
    c.concepts.num_candidates = 8
    c.concepts.candidate_rule = "roundtrip"
    c.concepts.end_temperature = 2.0
    c.concepts.draft_steps = 2
    c.concepts.sample_steps = 64
    # Measured: feeding the concept model the encoder's concept of each rendered chunk
    # instead of its raw sample took gen-PPL 17.1 -> 11.0 and well-formed 0.64 -> 0.68
    # at lr 1e-3; at lr 3e-3 the two are level (README "Results", row no_reencode).
    # Chunks then render one after another.
    c.concepts.reencode = True
    # The render preset's nested concepts are rendered from their first 64 dimensions
    # (configs/render.py): on the built-in corpus, under z noise 1.5, 0.795 consistent
    # against 0.792 from 32 and 0.790 from all 128 (three render seeds). The head still
    # models all 128: fitted on the 64 alone (concepts.loss_dims = 64) it gave 0.762
    # against 0.787 from the same seeds. Over a render run of whole concepts (tiny_text,
    # above), 0: training refuses a prefix of concepts the renderer never saw cut.
    c.concepts.render_dims = 64
    # Measured: 3e-3 rather than 1e-3 took consistent-with-prompt 0.47 -> 0.57, well-formed
    # 0.66 -> 0.82 and gen-PPL 12.9 -> 6.4 at the same FLOPs (256 prompts; README
    # "Results"). Measured, and left as they are: 8 candidates per concept with the
    # consensus kept, 128 head steps, 4 layers or width 192 at equal FLOPs, batch 16 x 2
    # the steps, the renderer in the loop, training times shifted toward noise, an
    # EMA of the weights (0.999: 0.714 -> 0.682 on the same run), a contrastive term
    # on the context (weight 0.1 / 1.0: 0.684 / 0.687 consistent) and no guidance
    # dropout (0.632): none outside the seeds' spread (README).
    # Measured since: the held-out loss was still falling at the end of the 2,209 steps
    # (no overfitting of the cache), and fell further at 5e-3 (1.394 -> 1.363; 2e-3 1.431,
    # 8e-3 1.370). On the built-in corpus, over five runs (render seeds 0 / 1 / 2, concept
    # seeds 0 / 1 / 2), consistent-with-prompt 0.804 -> 0.813 and well-formed 0.913 -> 0.917,
    # no pair worse (README "Results", "the concepts run's learning rate"). Not measured
    # on real text: tiny_text (text() above) keeps 3e-3, as measured.
    c.train.learning_rate = 5e-3
    c.train.warmup_steps = 100
    c.train.log_every = 50
    c.checkpoint.every_steps = 200
    # Measured, and left off: stopping the concept sampler at the renderer's training
    # noise (concepts.end_noise = 1.5: 0.764 -> 0.613 consistent; on text level at best)
    # and, under 512-dimensional concepts, a head that moves every dimension
    # (model.head_skip: gen-PPL 99.7 / 287.7 -> 680.8 / 601.1 sampled cool; README
    # "Results", "where the concept sampler stops"). Left off too: deciding END by a
    # sample of its own (concepts.end_temperature = 1), which at temperature 1 changes
    # no odds (0.762 against 0.764 consistent) and costs a second sample; and 4
    # candidates kept by consensus or by round trip (concepts.candidate_rule), 0.715 -
    # 0.723 with it or without (README "Results", "deciding END apart from the content").
    # Both measured at temperature 1 under v10: hot (above), the two together are today's
    # sampler.
  elif preset == "small":  # ~100M-param concept model.
    c.data.num_concepts = 64
    c.model.embed_dim = 768
    c.model.num_heads = 12
    c.model.num_kv_heads = 12
    c.model.head_dim = 64
    c.model.mlp_dim = 2048
    c.model.concept_layers = 12
    # A deeper head, as at tiny (2 -> 6 blocks there); here 4 -> 8, as 8 blocks of 1,024
    # already cost a third of the step (not measured at this size).
    c.model.diff_head_layers = 8
    c.model.diff_head_dim = 1024
    c.model.head_mean = True  # As tiny (measured there only).
    c.model.dtype = "bfloat16"
    # As tiny (measured there only; the concept cache is not, as 50k steps x 256 examples
    # do not repeat at this size).
    c.concepts.reencode = True
    c.concepts.temperature = 2.0
    c.concepts.num_candidates = 8
    c.concepts.candidate_rule = "roundtrip"
    c.concepts.end_temperature = 2.0
    c.concepts.draft_steps = 2
    c.concepts.sample_steps = 64
    c.concepts.render_dims = 128  # Half of the render preset's nested 256, as tiny.
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
    raise ValueError(f"unknown preset {preset!r}; use tiny, tiny_text, small, base or large")
  return c
