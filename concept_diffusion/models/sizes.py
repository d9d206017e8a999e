"""Analytic parameter counts and training FLOPs per token, from the config alone.

param_count(config, stage) counts the params a stage trains:
  render = encoder + renderer; concepts = concept model (+ diffusion head; the
  encoder is frozen and not counted); ar / mdm = the flat baseline.
flops_per_token(config, stage) = 6 * M + 12 * sum_layers(H * K * ctx), per
  position of the stage's sequence (chunk token for render, concept for
  concepts, flat token for ar / mdm), where
  - M counts matmul weights applied once per position: embedding lookups cost
    nothing, per-chunk projections (renderer slots, encoder pooling) are spread
    over the positions that share them, norms are ignored; a renderer that reads
    render.context_chunks = C chunks before its own runs its blocks over (1 + C)
    positions per chunk token, each attending to (1 + C) x L;
  - 6 = 2 (multiply-add) x 3 (forward + backward);
  - 12 * H * K * ctx is attention's q.k and p.v products (2 * 2 * H * K * ctx
    forward, x 3 with backward), with the full context ctx (no causal halving,
    as in the PaLM MFU convention).
The frozen encoder of the concepts stage (run on the fly) is not included; a
self-conditioned head (model.self_condition) adds the forward of its first pass. Given a
whole config (not a ModelConfig), the concepts stage counts its contrastive term
(concepts.contrastive_weight > 0): the projection of h, and each concept's
similarities to the batch's B x N candidates.
"""

from __future__ import annotations

from concept_diffusion.models.layers import ModelConfig


def _cfg(config, vocab_size):
  return config if isinstance(config, ModelConfig) else ModelConfig.from_config(config, vocab_size)


def _layer_matmuls(c: ModelConfig) -> int:
  """Matmul weights of one transformer block."""
  e, h, g, k, f = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim
  return e * h * k + 2 * e * g * k + h * k * e + 3 * e * f


def _stack_params(c: ModelConfig, num_layers: int) -> int:
  """Blocks (two norm scales each) plus the final norm."""
  return num_layers * (_layer_matmuls(c) + 2 * c.embed_dim) + c.embed_dim


def _head_matmuls(c: ModelConfig) -> int:
  d, e, w = c.concept_dim, c.embed_dim, c.diff_head_dim
  return (d * w + 2 * w * w + e * w + c.diff_head_layers * 5 * w * w + 2 * w * w + w * d
          + _context_read(c) + d * w * c.self_condition)


def _context_read(c: ModelConfig) -> int:
  """The head's cross-attention (head_reads_context): query and output W x W, key and
  value D x W (once per memory concept, and each concept is one position's memory)."""
  d, w = c.concept_dim, c.diff_head_dim
  return 2 * w * w + 2 * d * w if c.head_reads_context else 0


def _head_biases(c: ModelConfig) -> int:
  w = c.diff_head_dim
  return 4 * w + c.diff_head_layers * 5 * w + 2 * w + c.concept_dim


def _slot_readout(c: ModelConfig) -> int:
  """The encoder's per-position readout (encoder_pooling="slots"): L x E x D weights."""
  return c.concept_len * c.embed_dim * c.concept_dim if c.encoder_pooling == "slots" else 0


def component_params(c: ModelConfig) -> dict[str, int]:
  """Exact parameter count of each model."""
  v, e, d, l = c.vocab_size, c.embed_dim, c.concept_dim, c.concept_len
  return {
      "encoder": v * e + _stack_params(c, c.encoder_layers) + e * d + _slot_readout(c),
      "renderer": (v * e + d * l * e * (1 + c.prev_concept) + _stack_params(c, c.renderer_layers)
                   + e * v),
      "concept_model": (d * e + _stack_params(c, c.concept_layers) + e + _head_matmuls(c)
                        + _head_biases(c) + (e * d + d) * c.head_mean
                        + (2 * c.diff_head_dim * d + 2 * d) * c.head_skip),
      "ar": v * e + _stack_params(c, c.baseline_layers) + e * v,
      "mdm": v * e + _stack_params(c, c.baseline_layers) + e * v,
  }


TRAINED = {"render": ("encoder", "renderer"), "concepts": ("concept_model",), "ar": ("ar",),
           "mdm": ("mdm",)}


def _contrastive(config) -> bool:
  """Whether a whole config's concepts stage trains the contrastive projection."""
  return (not isinstance(config, ModelConfig)
          and config.concepts.get("contrastive_weight", 0.0) > 0)  # .get: older configs.


def param_count(config, stage: str, vocab_size: int | None = None) -> int:
  """Parameters trained in `stage` (see module docstring)."""
  if stage not in TRAINED:
    raise ValueError(f"stage={stage!r} is not one of {', '.join(TRAINED)}")
  c = _cfg(config, vocab_size)
  counts = component_params(c)
  extra = c.embed_dim * c.concept_dim if stage == "concepts" and _contrastive(config) else 0
  return sum(counts[name] for name in TRAINED[stage]) + extra


def flops_per_token(config, stage: str, vocab_size: int | None = None,
                    seq_len: int | None = None, num_concepts: int | None = None) -> float:
  """Training FLOPs per position of `stage` (see module docstring for the formula)."""
  c = _cfg(config, vocab_size)
  if not isinstance(config, ModelConfig):
    seq_len = seq_len or config.data.seq_len
    num_concepts = num_concepts or config.data.num_concepts
  hk, e, d, l = c.num_heads * c.head_dim, c.embed_dim, c.concept_dim, c.concept_len
  if stage == "render":
    # The renderer runs over (1 + context_chunks) x L positions per chunk of L targets.
    span = 1 + c.context_chunks
    matmuls = (_layer_matmuls(c) * (c.encoder_layers + c.renderer_layers * span) + e * d / l
               + _slot_readout(c) / l + d * e * (1 + c.prev_concept) + e * c.vocab_size)
    attention = (c.encoder_layers + c.renderer_layers * span * span) * hk * l
  elif stage == "concepts":
    matmuls = d * e + _layer_matmuls(c) * c.concept_layers + _head_matmuls(c)
    attention = c.concept_layers * hk * num_concepts
    if c.head_mean:  # mu(h), in the head's call and in its regression term.
      matmuls += 2 * e * d
    if c.head_skip:  # The skip's a(c), b(c).
      matmuls += 2 * c.diff_head_dim * d
    if c.head_reads_context:  # The head's read: W-wide q.k and p.v over the context.
      attention += c.diff_head_dim * num_concepts
    if _contrastive(config):  # Projection of h, then B x N similarities per concept.
      matmuls += e * d + config.train.batch_size * num_concepts * d
    if c.self_condition:  # The first pass: a forward of the head, without gradient.
      return 6.0 * matmuls + 12.0 * attention + _head_forward_flops(c, num_concepts)
  elif stage in ("ar", "mdm"):
    matmuls = _layer_matmuls(c) * c.baseline_layers + e * c.vocab_size
    attention = c.baseline_layers * hk * seq_len
  else:
    raise ValueError(f"stage={stage!r} is not one of {', '.join(TRAINED)}")
  return 6.0 * matmuls + 12.0 * attention


def concept_sampling_flops(config, steps: int, guided: bool, vocab_size: int | None = None,
                           num_concepts: int | None = None) -> float:
  """Forward FLOPs of sampling one concept at one position (the generated-concept fine-tune
  does so at every position of a batch): the concept model's pass over the context, then
  `steps` head calls, two each (with and without the context) under guidance."""
  c = _cfg(config, vocab_size)
  if not isinstance(config, ModelConfig):
    num_concepts = num_concepts or config.data.num_concepts
  hk, e, d = c.num_heads * c.head_dim, c.embed_dim, c.concept_dim
  context = 2.0 * (d * e + _layer_matmuls(c) * c.concept_layers) + \
      4.0 * c.concept_layers * hk * num_concepts
  return context + steps * (2 if guided else 1) * _head_forward_flops(c, num_concepts)


def _head_forward_flops(c: ModelConfig, num_concepts: int) -> float:
  """Forward FLOPs of one call of the head (with mu(h), the skip and the read it has)."""
  e, d, w = c.embed_dim, c.concept_dim, c.diff_head_dim
  head = 2.0 * (_head_matmuls(c) + (e * d if c.head_mean else 0)
                + (2 * w * d if c.head_skip else 0))
  if c.head_reads_context:
    head += 4.0 * w * num_concepts
  return head


def encoder_forward_flops_per_token(config, vocab_size: int | None = None) -> float:
  """Forward-only FLOPs per chunk token of the concept encoder (the concepts stage's frozen E)."""
  c = _cfg(config, vocab_size)
  matmuls = (_layer_matmuls(c) * c.encoder_layers + c.embed_dim * c.concept_dim / c.concept_len
             + _slot_readout(c) / c.concept_len)
  attention = c.encoder_layers * c.num_heads * c.head_dim * c.concept_len
  return 2.0 * matmuls + 4.0 * attention
