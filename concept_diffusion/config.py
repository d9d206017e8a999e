"""The one configuration schema shared by every stage, and its validation.

`configs/<stage>.py` files start from `base_config()` and change only what
differs. `validate(config)` runs before anything compiles and raises
`ConfigError` naming the offending field.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

STAGES = ("render", "concepts", "ar", "mdm")
GRANULARITIES = ("sentence", "sentence_capped", "span")
CONCEPT_OBJECTIVES = ("flow", "x0", "mse")
CANDIDATE_RULES = ("consensus", "roundtrip")  # generate.consensus_index / roundtrip_index.
MASK_RATES = ("uniform", "high")
Z_NOISE_DISTS = ("constant", "uniform")
ENCODER_POOLINGS = ("mean", "slots")
SCHEDULES = ("cosine", "constant")
TOKENIZER_MODELS = ("bpe", "unigram")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A config field holds a value the framework cannot use."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every field; presets override what differs."""
  c = ml_collections.ConfigDict()
  c.stage = "render"  # One of STAGES.

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # synthetic | text:GLOB | jsonl:GLOB[:field] | arrayrecord:GLOB | concepts:PATH
  c.data.seed = 0  # Shuffle order seed (independent of train.seed).
  c.data.corpus_seed = 0  # Seed of the built-in synthetic corpus.
  c.data.vocab_size = 1024  # SentencePiece vocabulary, special ids included.
  c.data.tokenizer_docs = 4000  # Documents read to train the tokenizer.
  c.data.tokenizer_model = "bpe"  # SentencePiece model: bpe | unigram (unigram under-fills small vocabularies).
  c.data.granularity = "sentence_capped"  # sentence | sentence_capped | span (see GRANULARITIES).
  c.data.concept_len = 8  # L: tokens per concept chunk (cap for sentence_capped, span size for span).
  c.data.num_concepts = 16  # N: concepts per training example.
  c.data.seq_len = 128  # T: tokens per example of the flat (ar / mdm) view.
  # Train split only: a document that does not fit is cut where the example ends and goes
  # on in the next (as segment 1, without its beginning), so no slot is padding; otherwise
  # it opens the next example. 19-28% of the tiny presets' slots are padding without it.
  c.data.fill_examples = False
  c.data.eval_fraction = 0.02  # Share of documents held out for evaluation (file sources).
  c.data.eval_docs = 512  # Held-out documents of the synthetic corpus.
  c.data.num_workers = 0  # Grain worker processes (0 = in the main process).
  c.data.max_doc_chars = 1_000_000  # Longer documents are truncated to this many characters.

  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 128  # E: transformer width.
  c.model.num_heads = 4  # H: attention heads.
  c.model.num_kv_heads = 4  # Key/value heads (< num_heads = grouped-query attention).
  c.model.head_dim = 32  # K: width of one attention head.
  c.model.mlp_dim = 512  # F: SwiGLU hidden width.
  c.model.concept_dim = 128  # D: concept vector width.
  c.model.encoder_layers = 2  # Concept encoder depth.
  c.model.renderer_layers = 2  # Renderer depth.
  # How the encoder pools a chunk's token states into z: mean | slots (the mean plus a
  # per-position readout, so z says which word stood where; see models/encoder.py).
  c.model.encoder_pooling = "mean"
  # Concepts stage: the diffusion head also cross-attends to the context's concepts, with
  # queries from the noisy concept (concept_model.ContextRead).
  c.model.head_reads_context = False
  # Concepts stage: the head works around a mean. mu(h), a projection of the context,
  # is regressed onto the next concept (concepts.mean_weight) and the flow models the
  # rest: the head predicts mu + f(z_t - t mu, t, h) (ConceptModel.head).
  c.model.head_mean = False
  # Concepts stage: a per-dimension affine path from z_t to the head's output, set by the
  # condition (concept_model.HeadSkip): the head then moves every concept dimension, also
  # when model.diff_head_dim < model.concept_dim.
  c.model.head_skip = False
  # Concepts stage: the head also reads its own clean estimate of the concept (self-
  # conditioning): the previous sampler step's, or in training, half of the time, a first
  # pass's without gradient (continuous.concept_loss). Under model.head_reads_context the
  # read's queries then carry that estimate: once it says whose sentence it is, the head
  # can look that person's concept up in the context.
  c.model.self_condition = False
  c.model.concept_layers = 2  # Concept model (causal contextualiser) depth.
  c.model.diff_head_layers = 2  # Residual blocks of the concept diffusion head.
  c.model.diff_head_dim = 256  # Width of the concept diffusion head.
  c.model.baseline_layers = 4  # Depth of the flat ar / mdm baselines.
  c.model.dtype = "float32"  # Compute dtype: float32 | bfloat16 (params stay float32).
  c.model.scan_layers = False  # nn.scan over layers (compile time at depth).
  c.model.remat = "none"  # Rematerialisation: none | full | dots.
  c.model.attention = "xla"  # xla (reference, runs everywhere) | cudnn (fused, GPU).
  c.model.rope_max_wavelength = 10_000.0

  c.render = ml_collections.ConfigDict()
  c.render.full_mask_prob = 0.5  # Share of examples with every token masked (feeds the z path).
  c.render.mask_rate = "high"  # t distribution of the other examples: uniform | high (skewed to 1).
  c.render.z_noise = 0.1  # Std of Gaussian noise added to z in training, relative to its RMS.
  # How each chunk's noise std is drawn: constant (z_noise for every chunk) | uniform (in
  # [0, z_noise] per chunk, so the renderer also learns to read clean concepts sharply).
  c.render.z_noise_dist = "constant"
  c.render.prev_concept = False  # Also condition on the previous chunk's concept.
  # Also read the tokens of the previous context_chunks chunks of the document, clean, as
  # a prefix (0: the chunk alone). Generation then renders one chunk after another, each
  # reading the ones before it (the prompt's, then its own).
  c.render.context_chunks = 0
  # Train batches only: the share of documents whose END chunk is trained on. Every END
  # chunk is the same one-token chunk, 11-18% of the real chunks at the tiny preset.
  c.render.end_keep = 1.0
  # Nested concepts: in training each chunk's concept is cut to one of these prefix
  # lengths (equally likely; the dimensions after it zeroed), so its first dimensions carry
  # the coarse content and generation can render a prefix of a sample (concepts.render_dims).
  # Increasing, the last = model.concept_dim; () = whole concepts.
  c.render.nested_dims = ()
  c.render.concept_reg = 1e-3  # Weight of the concept-space smoothness regulariser.
  c.render.sample_steps = 8  # Sampler steps used by round-trip evaluation.
  # Fine-tune from generated concepts: the workdir of a concepts run. Its render run's
  # renderer is trained further, a generated_prob share of chunks rendered from the
  # concept model's own (teacher-forced) samples; encoder and concept model frozen.
  c.render.generated_from = ""
  c.render.generated_prob = 0.5

  c.concepts = ml_collections.ConfigDict()
  c.concepts.render_workdir = ""  # Workdir of the render run whose encoder is used (frozen).
  # > 0: encode the first N packed train examples once into WORKDIR/concept_cache and train
  # over them again and again (no encoder in the steps); 0: encode every batch on the fly.
  c.concepts.cache_examples = 0
  c.concepts.objective = "flow"  # flow | x0 | mse (see CONCEPT_OBJECTIVES).
  c.concepts.cfg_dropout = 0.1  # Probability of dropping the context (classifier-free guidance).
  # Training noise levels: shift > 1 puts more of them near noise, where the head decides
  # which sentence comes next (continuous.shift_times; 1 = uniform).
  c.concepts.time_shift = 1.0
  c.concepts.sample_steps = 16  # Concept sampler steps.
  c.concepts.guidance = 1.0  # Classifier-free guidance scale (1 = off).
  c.concepts.temperature = 0.5  # Default scale of the sampler's starting noise in generation.
  # Generation default: stop the concept sampler at this noise and render z_t / t, the
  # concept under that much noise (continuous.sample); render.z_noise is what the
  # renderer saw in training. 0: integrate to the clean concept.
  c.concepts.end_noise = 0.0
  # Generation default: render only the first render_dims dimensions of each sampled
  # concept, the rest zeroed, for a render run trained on nested concepts
  # (render.nested_dims); the concept model still reads whole samples. 0: all of them.
  c.concepts.render_dims = 0
  # Fit the head (and its mean) on the first loss_dims dimensions of each next concept
  # only, the prefix a nested render run renders (concepts.render_dims <= loss_dims, with
  # reencode so the context never reads the dimensions left unmodelled). 0: all of them.
  c.concepts.loss_dims = 0
  # Generation default: decide END by one more sample per concept at this temperature,
  # unguided (the model's own odds of ending), and keep a candidate that does not end
  # (generate.concept_loop). Cool, guided samplers otherwise end far more often than the
  # model would (on text, 2/3 of continuations at once against 44% at temperature 1).
  # 0: off, END as the kept sample says.
  c.concepts.end_temperature = 0.0
  # Generation default: render each new concept at once and feed the concept model the
  # encoder's concept of that chunk (generate.concept_loop), not the raw sample.
  c.concepts.reencode = False
  # Generation default: candidates sampled per new concept, the consensus one kept
  # (generate.consensus_index: highest mean cosine to the others; 1 = plain sampling).
  c.concepts.num_candidates = 1
  # Generation default: which candidate is kept, one of CANDIDATE_RULES: the consensus, or
  # the one whose rendered chunk re-encodes nearest to it (generate.roundtrip_index; needs
  # reencode).
  c.concepts.candidate_rule = "consensus"
  # Generation default: render steps of each candidate's draft (0 = off: every candidate
  # rendered in full, render.sample_steps). > 0: the candidates are rendered in this many
  # steps for the choice and the kept one again in full (generate.concept_loop); needs
  # reencode (with num_candidates > 1; one candidate drafts nothing), and fewer steps
  # than the full render.
  c.concepts.draft_steps = 0
  # Renderer in the loop: weight of the (frozen) renderer's loss on chunk n+1 rendered
  # from the head's estimate of concept n+1 (0 = off), on render_positions per example.
  c.concepts.render_weight = 0.0
  c.concepts.render_positions = 4
  # Contrastive term (0 = off): weight of an InfoNCE loss that asks a projection of the
  # context h_n to pick concept n+1 out of every next concept of the batch (cosine /
  # temperature), so h carries what tells this document's next sentence from others'.
  # Memory and FLOPs grow with (batch x num_concepts)^2 per step.
  c.concepts.contrastive_weight = 0.0
  c.concepts.contrastive_temperature = 0.1
  # Weight of the regression of mu(h) onto concept n+1 (model.head_mean only): the
  # conditional mean, so facts the context fixes are carried by h itself.
  c.concepts.mean_weight = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.batch_size = 32  # Global batch, in examples.
  c.train.seed = 0  # Init / noise / dropout keys are split from this.
  c.train.learning_rate = 3e-3  # Peak learning rate.
  c.train.warmup_steps = 100
  c.train.schedule = "cosine"  # cosine | constant (after warmup).
  c.train.min_lr_ratio = 0.1  # Cosine floor, as a fraction of the peak.
  c.train.weight_decay = 0.01  # AdamW decay on matrices (not norms, biases, embeddings).
  c.train.grad_clip = 1.0  # Global-norm clip (0 = off).
  c.train.grad_accum_steps = 1  # Micro-batches per optimizer step.
  c.train.ema_decay = 0.0  # EMA of params (0 = off).
  c.train.log_every = 10  # Steps between metrics lines.
  c.train.eval_every = 0  # Steps between held-out loss evaluations, and at the end (0 = off).
  c.train.eval_batches = 4  # Held-out batches per evaluation (the split is cycled if shorter).
  c.train.debug_nan_step = 0  # Test hook: make the loss of this step NaN (0 = off).

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel ways (-1 = all remaining devices).
  c.mesh.fsdp = 1  # Fully-sharded data-parallel ways.
  c.mesh.tensor = 1  # Tensor-parallel ways.

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # Call jax.distributed.initialize (multi-host).
  c.distributed.coordinator_address = ""  # host:port; empty = discovered by JAX (TPU, SLURM).
  c.distributed.num_processes = 0  # 0 = discovered by JAX.
  c.distributed.process_id = -1  # -1 = discovered by JAX.
  c.distributed.local_device_ids = ""  # Comma-separated, optional.
  return c


def _choice(config, field: str, choices) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in choices:
    raise ConfigError(f"{field}={value!r} is not one of {', '.join(map(str, choices))}")


def _positive(config, field: str, allow_zero: bool = False) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ConfigError(f"{field}={value!r} must be a number {bound}")


def _nested(config: ml_collections.ConfigDict) -> None:
  """render.nested_dims and concepts.render_dims against model.concept_dim."""
  d = config.model.concept_dim
  nested = config.render.get("nested_dims", ())  # .get: configs saved before the fields.
  ints = lambda xs: all(type(x) is int for x in xs)
  if nested and not (ints(nested) and 0 < nested[0] and list(nested) == sorted(set(nested))
                     and nested[-1] == d):
    raise ConfigError(f"render.nested_dims={tuple(nested)!r} must be increasing whole numbers "
                      f"of dimensions in (0, model.concept_dim={d}], the last {d}")
  render_dims = config.concepts.get("render_dims", 0)
  if not (type(render_dims) is int and 0 <= render_dims <= d):
    raise ConfigError(f"concepts.render_dims={render_dims!r} must be a whole number of "
                      f"dimensions in [0, model.concept_dim={d}] (0: all)")
  loss_dims = config.concepts.get("loss_dims", 0)  # .get: configs saved before the field.
  if not (type(loss_dims) is int and 0 <= loss_dims <= d):
    raise ConfigError(f"concepts.loss_dims={loss_dims!r} must be a whole number of "
                      f"dimensions in [0, model.concept_dim={d}] (0: all)")
  if loss_dims and not (0 < render_dims <= loss_dims and config.concepts.reencode
                        and not config.concepts.render_weight):
    raise ConfigError(f"concepts.loss_dims={loss_dims} leaves the dimensions after it "
                      "unmodelled: it needs 0 < concepts.render_dims <= loss_dims (got "
                      f"{render_dims}), concepts.reencode=True (got {config.concepts.reencode}) "
                      "and concepts.render_weight=0 (got "
                      f"{config.concepts.render_weight}), so nothing reads them")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks what can be checked without devices; raises ConfigError naming the field."""
  _choice(config, "stage", STAGES)
  _choice(config, "data.granularity", GRANULARITIES)
  _choice(config, "data.tokenizer_model", TOKENIZER_MODELS)
  _choice(config, "concepts.objective", CONCEPT_OBJECTIVES)
  _choice(config, "concepts.candidate_rule", CANDIDATE_RULES)
  if config.concepts.candidate_rule == "roundtrip" and not config.concepts.reencode:
    raise ConfigError("concepts.candidate_rule='roundtrip' compares each candidate with its "
                      "rendered chunk's concept: it needs concepts.reencode=True")
  draft_steps = config.concepts.get("draft_steps", 0)  # .get: configs saved before the field.
  if not (type(draft_steps) is int and draft_steps >= 0):
    raise ConfigError(f"concepts.draft_steps={draft_steps!r} must be a whole number of render "
                      "steps >= 0 (0: off)")
  if draft_steps and config.concepts.num_candidates > 1 and not config.concepts.reencode:
    raise ConfigError(f"concepts.draft_steps={draft_steps} drafts the candidates' rendered "
                      "chunks, which only concepts.reencode=True renders")
  _choice(config, "render.mask_rate", MASK_RATES)
  _choice(config, "render.z_noise_dist", Z_NOISE_DISTS)
  if "encoder_pooling" in config.model:  # Configs saved before the field pooled by the mean.
    _choice(config, "model.encoder_pooling", ENCODER_POOLINGS)
  _choice(config, "train.schedule", SCHEDULES)
  _choice(config, "model.remat", REMAT_POLICIES)
  _choice(config, "model.attention", ATTENTION_IMPLS)
  _choice(config, "model.dtype", DTYPES)
  for field in ("data.vocab_size", "data.concept_len", "data.num_concepts", "data.seq_len",
                "model.embed_dim", "model.num_heads", "model.num_kv_heads", "model.head_dim",
                "model.mlp_dim", "model.concept_dim", "train.num_steps", "train.batch_size",
                "train.grad_accum_steps", "checkpoint.every_steps", "checkpoint.max_to_keep",
                "train.log_every", "train.eval_batches", "concepts.render_positions",
                "concepts.num_candidates", "concepts.time_shift",
                "concepts.contrastive_temperature"):
    _positive(config, field)
  for field in ("train.learning_rate", "train.warmup_steps", "train.weight_decay",
                "train.grad_clip", "render.z_noise", "render.concept_reg", "train.eval_every",
                "concepts.render_weight", "concepts.temperature", "concepts.end_noise",
                "concepts.end_temperature",
                "concepts.cache_examples",
                "concepts.contrastive_weight", "concepts.mean_weight"):
    _positive(config, field, allow_zero=True)
  for field in ("render.full_mask_prob", "concepts.cfg_dropout", "train.ema_decay",
                "data.eval_fraction", "render.generated_prob"):
    value = config[field.split(".")[0]][field.split(".")[1]]
    one_allowed = field in ("render.full_mask_prob", "render.generated_prob")
    if not (0.0 <= value <= 1.0 if one_allowed else 0.0 <= value < 1.0):
      raise ConfigError(f"{field}={value!r} must lie in [0, 1]")
  _nested(config)
  context_chunks = config.render.get("context_chunks", 0)  # .get: configs saved before it.
  if not (type(context_chunks) is int and 0 <= context_chunks < config.data.num_concepts):
    raise ConfigError(f"render.context_chunks={context_chunks!r} must be a whole number of "
                      f"chunks in [0, data.num_concepts={config.data.num_concepts})")
  end_keep = config.render.get("end_keep", 1.0)  # .get: configs saved before the field.
  if not (isinstance(end_keep, (int, float)) and 0.0 < end_keep <= 1.0):
    raise ConfigError(f"render.end_keep={end_keep!r} must lie in (0, 1]")
  if (config.stage == "render" and config.data.get("fill_examples", False)
      and config.render.generated_from):
    raise ConfigError("data.fill_examples cuts documents across examples, and "
                      "render.generated_from teacher-forces its concept model over whole "
                      "documents; set data.fill_examples=False")
  # .get: configs saved before the field.
  if (config.model.get("head_reads_context", False)
      and config.model.diff_head_dim % config.model.num_heads):
    raise ConfigError(f"model.num_heads={config.model.num_heads} must divide "
                      f"model.diff_head_dim={config.model.diff_head_dim} "
                      "(model.head_reads_context splits the head's width into heads)")
  if config.model.num_heads % config.model.num_kv_heads:
    raise ConfigError(f"model.num_kv_heads={config.model.num_kv_heads} must divide "
                      f"model.num_heads={config.model.num_heads}")
  if config.data.vocab_size < 64:
    raise ConfigError(f"data.vocab_size={config.data.vocab_size} is too small; use >= 64")
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ConfigError(f"train.grad_accum_steps={config.train.grad_accum_steps} must divide "
                      f"train.batch_size={config.train.batch_size}")
  for axis in ("data", "fsdp", "tensor"):
    ways = config.mesh[axis]
    if not isinstance(ways, int) or (ways < 1 and ways != -1):
      raise ConfigError(f"mesh.{axis}={ways!r} must be a positive integer or -1")
  if sum(config.mesh[a] == -1 for a in ("data", "fsdp", "tensor")) > 1:
    raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  if config.concepts.cache_examples and config.concepts.render_weight:
    raise ConfigError("concepts.cache_examples > 0 trains from a concept cache, which holds no "
                      "chunk tokens for concepts.render_weight > 0 to render; set one to 0")
  if config.stage == "concepts" and not config.concepts.render_workdir:
    raise ConfigError("concepts.render_workdir is empty: the concepts stage needs the workdir "
                      "of a finished render run (--config.concepts.render_workdir=DIR)")
  return config


def own_cache_examples(config: ml_collections.ConfigDict) -> int:
  """Examples a concepts run encodes into its own concept cache (0: none; a `concepts:`
  source is a cache already, and concepts.cache_examples is then not used)."""
  if config.stage != "concepts" or config.data.source.startswith("concepts:"):
    return 0
  return config.concepts.get("cache_examples", 0)  # .get: configs saved before the field.


def load_config(spec: str) -> ml_collections.ConfigDict:
  """"configs/<stage>.py[:preset]" -> its config, as --config=... would load it (notebooks, tests)."""
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  module_spec = importlib.util.spec_from_file_location(
      f"_cd_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()
