"""Generation from trained runs: concepts (+ their render run), and the ar / mdm baselines.

  gen = generate.load("runs/concepts")            # any mesh wrote it; local devices read it
  samples = generate.generate(gen, ["Mara lives in Oslo."], num_concepts=8)
  print(samples[0].text)

Concepts runs: prompt -> chunks (exactly as in training) -> encoder -> concept model
samples the next concept N times (one jitted while-loop over a fixed-size buffer) ->
the renderer fills all N chunks in parallel (masked diffusion) -> text, cut at the
first END concept. With re-encoding (concepts.reencode, the tiny / small default) each
chunk is rendered inside the loop and its encoding, not the raw sample, becomes the
concept model's context. AR runs decode with a KV cache; MDM runs unmask a block of MASK
tokens after the prompt. Every path is one jitted call over the whole batch.

Infilling between sentences is not supported: the concept model is causal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from concept_diffusion.config import CANDIDATE_RULES
from concept_diffusion.data import segment
from concept_diffusion.data.tokenizer import BOS_ID, EOD_ID, EOS_ID, MASK_ID, PAD_ID, Tokenizer
from concept_diffusion.diffusion import masked
from concept_diffusion.models import baselines
from concept_diffusion.models import concept_model
from concept_diffusion.models.concept_model import ConceptModel
from concept_diffusion.models.encoder import ConceptEncoder
from concept_diffusion.models.layers import ModelConfig
from concept_diffusion.models.renderer import Renderer, concept_prefix

KINDS = ("concepts", "render", "ar", "mdm")
# Token ids a baseline may never emit (EOD stays allowed: it ends the document).
_FORBIDDEN_IDS = (PAD_ID, BOS_ID, EOS_ID, MASK_ID)
_PROMPT_BUCKET = 8  # Prompt lengths are rounded up to this, so few shapes compile.
# A flat (ar / mdm) call's batch x length^2, the size of one head's attention scores: a
# call over more is split into calls over consecutive prompts. Every row is padded to
# the batch's longest prompt, so one long prompt among 128 short ones (a real-text
# paragraph: 1,607 tokens among a median of 26) would otherwise cost 128 x 1,672^2.
FLAT_MAX_ATTENTION = 1 << 24


class GenerateError(ValueError):
  """A run or a prompt that generation cannot use."""


@dataclasses.dataclass
class Sample:
  """One generated continuation."""
  prompt: str
  text: str  # The continuation alone.
  token_ids: list[int]  # Continuation tokens (generating run's tokenizer), EOD excluded.
  ended: bool  # The model ended the document (END concept / EOD token) within budget.
  steps: list[str] | None = None  # Intermediate renders, masks shown as "_" (show_steps).
  num_chunks: int = 0  # Concepts / roundtrip: chunks kept before the END chunk.


@dataclasses.dataclass
class Generator:
  """A restored run, ready to generate; `load` builds it."""
  kind: str  # One of KINDS.
  config: Any  # The run's config (for concepts runs, the concepts config).
  tokenizer: Tokenizer
  params: dict  # {"encoder", "concept_model"} | {"encoder", "renderer"} | {"model"}.
  mesh: jax.sharding.Mesh
  render_config: Any = None  # Concepts runs: the render run's config.
  render_params: dict | None = None  # Concepts runs: the render run's params.
  workdir: str = ""
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def chunk_config(self):
    """The config that says how text is cut into chunks and rendered."""
    return self.render_config if self.kind == "concepts" else self.config

  def jitted(self, name: str, options: tuple, build: Callable[[], Callable]):
    """One jitted function per (name, static options), built on first use (jit caches shapes)."""
    key = (name, options)
    if key not in self._jitted:
      self._jitted[key] = jax.jit(build())
    return self._jitted[key]


# ---------------------------------------------------------------- loading


def local_mesh(devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) = (n, 1, 1) mesh over this process's devices (default: all)."""
  from concept_diffusion.parallel import rules  # Lazy: keeps the import light.
  devices = list(jax.local_devices() if devices is None else devices)
  return jax.make_mesh((len(devices), 1, 1), rules.MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _find_render_workdir(workdir: str, recorded: str) -> str:
  """The render run a concepts run names; relative paths also tried next to the run."""
  for candidate in (recorded, os.path.join(os.path.dirname(os.path.abspath(workdir)),
                                           os.path.basename(recorded.rstrip("/")))):
    if candidate and os.path.isdir(candidate):
      return candidate
  raise GenerateError(f"{workdir}: its concepts.render_workdir={recorded!r} is not a directory; "
                      "pass render_workdir= (--render_workdir) to say where the render run is")


def load(workdir: str, *, mesh=None, render_workdir: str | None = None,
         use_ema: bool = True) -> Generator:
  """Restores a render / concepts / ar / mdm run onto `mesh` (default: all local devices)."""
  from concept_diffusion import train as train_lib  # Lazy: the trainer pulls in Orbax.
  mesh = mesh or local_mesh()
  config, tokenizer, params = train_lib.restore_params(workdir, mesh=mesh, use_ema=use_ema)
  if config.stage not in KINDS:
    raise GenerateError(f"{workdir} is a {config.stage!r} run; generation needs one of {KINDS}")
  gen = Generator(config.stage, config, tokenizer, params, mesh, workdir=workdir)
  if config.stage == "concepts":
    where = render_workdir or _find_render_workdir(workdir, config.concepts.render_workdir)
    render_config, render_tok, render_params = train_lib.restore_params(where, mesh=mesh,
                                                                        use_ema=use_ema)
    if render_tok.fingerprint != tokenizer.fingerprint:
      raise GenerateError(f"{where} was trained with another tokenizer than {workdir}")
    gen.render_config, gen.render_params = render_config, render_params
  return gen


def build_modules(gen: Generator) -> dict:
  """The Linen modules of the run (the renderer from the render run for concepts runs)."""
  v = gen.tokenizer.vocab_size
  if gen.kind in ("ar", "mdm"):
    cls = baselines.TokenAR if gen.kind == "ar" else baselines.TokenMDM
    return {"model": cls(ModelConfig.from_config(gen.config, v))}
  # Concepts runs: encoder (frozen) and renderer are the render run's.
  render_cfg = ModelConfig.from_config(gen.chunk_config, v)
  out = {"encoder": ConceptEncoder(render_cfg), "renderer": Renderer(render_cfg)}
  if gen.kind == "concepts":
    out["concept_model"] = ConceptModel(ModelConfig.from_config(gen.config, v))
  return out


# ---------------------------------------------------------------- batching helpers


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def padded_batch_size(gen: Generator, n: int) -> int:
  """Prompts padded to a multiple of the data-parallel devices."""
  return _round_up(n, gen.mesh.shape["data"] * gen.mesh.shape["fsdp"])


def shard_batch(gen: Generator, x: np.ndarray) -> jax.Array:
  """Places a batch-major array with its examples split over the devices."""
  from concept_diffusion.parallel import rules
  return jax.device_put(x, rules.batch_sharding(gen.mesh, x.ndim))


def prompt_chunks(gen: Generator, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """chunks_BxNxL of each prompt (cut exactly as in training, END chunk dropped), counts_B."""
  c = gen.chunk_config.data
  per_prompt = []
  for prompt in prompts:
    doc = segment.tokenize_document(gen.tokenizer, prompt)
    if not len(doc.tokens_T):
      raise GenerateError(f"prompt {prompt[:60]!r} has no text the tokenizer keeps; the concept "
                          "model needs at least one sentence to continue")
    chunks_CxL, _ = segment.chunk_document(doc, c.granularity, c.concept_len)
    per_prompt.append(chunks_CxL[:-1])
  b = padded_batch_size(gen, len(prompts))
  p = _round_up(max(len(x) for x in per_prompt), _PROMPT_BUCKET)
  chunks_BxNxL = np.full((b, p, c.concept_len), PAD_ID, np.int32)
  counts_B = np.ones((b,), np.int32)  # Padding examples: one empty chunk, never shown.
  for i, x in enumerate(per_prompt):
    chunks_BxNxL[i, :len(x)] = x
    counts_B[i] = len(x)
  return chunks_BxNxL, counts_B


def prompt_rows(gen: Generator, prompts: Sequence[str]) -> list[list[int]]:
  """BOS + each prompt's tokens as a flat document that goes on (no EOD)."""
  return [segment.flat_document(segment.tokenize_document(gen.tokenizer, p))[:-1]
          for p in prompts]


def prompt_tokens(gen: Generator, prompts: Sequence[str],
                  extra: int) -> tuple[np.ndarray, np.ndarray]:
  """Flat rows BOS + prompt tokens (left-aligned, room for `extra` more), lengths_B."""
  rows = prompt_rows(gen, prompts)
  b = padded_batch_size(gen, len(prompts))
  t = _round_up(max(len(r) for r in rows), _PROMPT_BUCKET) + extra
  tokens_BxT = np.full((b, t), PAD_ID, np.int32)
  lengths_B = np.ones((b,), np.int32)
  tokens_BxT[:, 0] = BOS_ID
  for i, r in enumerate(rows):
    tokens_BxT[i, :len(r)] = r
    lengths_B[i] = len(r)
  return tokens_BxT, lengths_B


# ---------------------------------------------------------------- showing tokens


def show_tokens(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
  """Text of ids with every MASK shown as "_" (PAD hidden), to watch a render fill in."""
  pieces = []
  for i in ids:
    i = int(i)
    if i == MASK_ID:
      pieces.append(" _")
    elif i == EOD_ID:
      pieces.append(" <eod>")
    elif i not in (PAD_ID, BOS_ID):
      pieces.append(tokenizer.id_to_piece(i).replace("\u2581", " "))
  return "".join(pieces).strip()


# ---------------------------------------------------------------- concepts: the pieces


def render_chunks(renderer: Renderer, params, z_BxNxD, prev_BxNxD, key, *, steps: int,
                  temperature: float = 0.0, return_steps: bool = False, context_BxNxCL=None):
  """Renders every chunk in parallel from all-MASK -> tokens_BxNxL (+ states_SxBxNxL).

  context_BxNxCL: the text before each chunk, for a render.context_chunks renderer (PAD
  if None); render_in_order supplies a chunk's own rendered predecessors instead.
  """
  prev = prev_BxNxD if renderer.cfg.prev_concept else None

  def logits_fn(tokens_BxNxL):
    return renderer.apply({"params": params}, tokens_BxNxL, z_BxNxD, prev, None, context_BxNxCL)

  b, n = z_BxNxD.shape[:2]
  # Every position is denoised and PAD may be committed: the renderer decides the length.
  mask_BxNxL = jnp.ones((b, n, renderer.cfg.concept_len), bool)
  return masked.sample(logits_fn, key, mask_BxNxL, mask_id=MASK_ID, pad_id=PAD_ID, steps=steps,
                       temperature=temperature, return_steps=return_steps, sample_pad=True)


def render_in_order(renderer: Renderer, params, z_BxNxD, prev_BxNxD, context_BxCL, key, *,
                    steps: int, temperature: float = 0.0, return_steps: bool = False):
  """Renders chunk 0, then 1, ...: each reads the context_chunks chunks before it.

  context_BxCL is the text before chunk 0 (the prompt's last chunks, PAD if none); then
  each rendered chunk joins it, as in generation. -> tokens_BxNxL (+ states_SxBxNxL).
  """
  l = renderer.cfg.concept_len

  def step(ctx_BxCL, xs):
    z_BxD, prev_BxD, k = xs
    out = render_chunks(renderer, params, z_BxD[:, None], prev_BxD[:, None], k, steps=steps,
                        temperature=temperature, return_steps=return_steps,
                        context_BxNxCL=ctx_BxCL[:, None])
    chunk_Bx1xL = out[0] if return_steps else out
    return jnp.concatenate([ctx_BxCL[:, l:], chunk_Bx1xL[:, 0]], axis=1), out

  n = z_BxNxD.shape[1]
  xs = (jnp.moveaxis(z_BxNxD, 1, 0), jnp.moveaxis(prev_BxNxD, 1, 0), jax.random.split(key, n))
  _, out = jax.lax.scan(step, context_BxCL, xs)
  if return_steps:  # tokens_NxBx1xL, states_NxSxBx1xL
    return jnp.moveaxis(out[0][:, :, 0], 0, 1), jnp.moveaxis(out[1][:, :, :, 0], 0, 2)
  return jnp.moveaxis(out[:, :, 0], 0, 1)


def last_chunks(chunks_BxNxL, counts_B, num: int):
  """context_Bx(num*L): each row's last `num` chunks before counts_B, oldest first (PAD before)."""
  b, _, l = chunks_BxNxL.shape
  idx_BxC = counts_B[:, None] - num + jnp.arange(num)
  picked_BxCxL = jnp.take_along_axis(chunks_BxNxL, jnp.maximum(idx_BxC, 0)[..., None], axis=1)
  picked_BxCxL = jnp.where((idx_BxC >= 0)[..., None], picked_BxCxL, PAD_ID)
  return picked_BxCxL.reshape(b, num * l)


def cosine(a_XxD, b_XxD):
  """Cosine similarity along the last axis."""
  dot = jnp.sum(a_XxD * b_XxD, -1)
  return dot / (jnp.linalg.norm(a_XxD, axis=-1) * jnp.linalg.norm(b_XxD, axis=-1) + 1e-6)


def end_concept(encoder: ConceptEncoder, params, concept_len: int):
  """z_D of the END chunk [EOD_ID] (the concept that closes every training document)."""
  tokens_1x1xL = jnp.full((1, 1, concept_len), PAD_ID, jnp.int32).at[..., 0].set(EOD_ID)
  return encoder.apply({"params": params}, tokens_1x1xL, tokens_1x1xL != PAD_ID)[0, 0]


def is_end(tokens_BxNxL, z_BxNxD, z_end_D, end_cosine: float):
  """end_BxN: a chunk rendered as the END chunk (EOD first), or a concept near END's.

  An EOD later in a chunk is a rendering slip, not an END chunk: it is dropped.
  """
  return (tokens_BxNxL[..., 0] == EOD_ID) | (cosine(z_BxNxD, z_end_D) >= end_cosine)


def consensus_index(feat_BxCxD, valid_BxC=None):
  """best_B: the candidate that agrees most with the others (highest mean cosine), a medoid.

  Self-consistency in concept space: of C samples of one next concept, keep the one
  nearest to what most samples say (ties: the lowest index). C = 1 picks 0. valid_BxC:
  only those candidates vote and may be kept (none valid: 0).
  """
  sim_BxCxC = cosine(feat_BxCxD[:, :, None], feat_BxCxD[:, None, :])
  if valid_BxC is None:
    return jnp.argmax(jnp.sum(sim_BxCxC, -1), -1)
  score_BxC = jnp.sum(jnp.where(valid_BxC[:, None, :], sim_BxCxC, 0.0), -1)
  return jnp.argmax(jnp.where(valid_BxC, score_BxC, -jnp.inf), -1)


def roundtrip_index(z_BxCxD, z_ctx_BxCxD, valid_BxC=None):
  """best_B: the candidate whose rendered chunk re-encodes nearest to it (highest cosine).

  A sample that renders to a chunk the encoder maps back near it lies where the render
  stage is faithful, near concepts of real chunks; a blend of them renders to a blend.
  valid_BxC: only those may be kept (none valid: 0).
  """
  score_BxC = cosine(z_BxCxD, z_ctx_BxCxD)
  if valid_BxC is not None:
    score_BxC = jnp.where(valid_BxC, score_BxC, -jnp.inf)
  return jnp.argmax(score_BxC, -1)


def take_candidate(x_BCx, best_B, num_candidates: int):
  """x of the chosen candidate per example: [B * C, ...] candidate-major rows -> [B, ...]."""
  x_BxCx = x_BCx.reshape(-1, num_candidates, *x_BCx.shape[1:])
  idx = best_B.reshape(-1, 1, *([1] * (x_BxCx.ndim - 2)))
  return jnp.take_along_axis(x_BxCx, idx, axis=1)[:, 0]


def num_kept(end_BxN):
  """Chunks before the first END chunk (all of them if none)."""
  n = end_BxN.shape[-1]
  return jnp.where(jnp.any(end_BxN, -1), jnp.argmax(end_BxN, -1), n)


def concept_loop(model: ConceptModel, params, prompt_BxNxD, counts_B, z_end_D, key, *,
                 num_new: int, objective: str, steps: int, guidance: float,
                 noise_scale: float, end_cosine: float, snap=None,
                 num_candidates: int = 1, context_BxCL=None, end_noise: float = 0.0,
                 end_temperature: float = 0.0, candidate_rule: str = "consensus",
                 model_dims: int = 0, render_dims: int = 0, draft_snap=None):
  """Samples `num_new` concepts after each prompt -> (z_BxNxD new, prev_BxNxD, extras).

  A while-loop over a fixed buffer of M = N + num_new concepts; position counts_B + i
  is written at iteration i; stops early once every example has produced an END
  concept. Context positions past the written ones are padding (segment 0), which
  the causal, segment-masked attention never reads.

  With `snap(z_Bx1xD, prev_Bx1xD, text_BxCL, key) -> (z_ctx_Bx1xD, tokens_Bx1xL,
  *more_Bx1x...)` (re-encoding, see snap_fn), each new concept is rendered at once and
  the context gets the encoder's concept of the rendered chunk instead of the sampled
  one: the concept model then always reads concepts of real text, as in training, and
  its errors do not compound off the encoder's manifold. `extras` stacks what snap
  returned after z_ctx along axis 1 (tokens_BxNxL, ...); () without snap. text_BxCL is
  the last chunks' tokens for a render.context_chunks renderer: context_BxCL (the
  prompt's) at first, then each rendered chunk shifts in.

  With `num_candidates` C > 1, each step samples C concepts from the same context
  (and snaps each), and keeps the consensus one (consensus_index): of the re-encoded
  concepts with snap, else of the raw samples. C = 1 is the plain sampler, bit for bit.
  candidate_rule "roundtrip" (needs snap) keeps the one whose chunk re-encodes nearest
  to it instead (roundtrip_index), compared on the prefix the renderer reads
  (`render_dims`; 0: all): the rest of a sample is never rendered, so it says nothing of
  how faithfully the chunk came out.

  draft_snap (a cheaper snap, e.g. fewer render steps; needs snap and C > 1) renders the
  C candidates for the choice only: the kept one is rendered again by snap, and its chunk,
  context concept and END test are that render's. C drafts and one render cost less than
  C renders.

  end_noise > 0 stops each sample at that noise (continuous.sample); the END test by
  cosine then rarely fires, and a chunk rendered as END stops the example instead.

  end_temperature > 0 decides END apart from the content: one more sample per step, at
  that temperature and unguided (the model's own odds of END), ends the example if it is
  END; else the kept candidate is the consensus of those that are not END (none: that
  sample). A cool, guided sampler otherwise ends far more often than the model would.

  model_dims > 0: the head models only that prefix of a concept (concepts.loss_dims), so
  each sample is cut to it (the rest zeroed) before anything reads it; pass z_end_D cut
  alike, so the END test compares what was modelled.
  """
  b, p, d = prompt_BxNxD.shape
  m = p + num_new
  buf_BxMxD = jnp.pad(prompt_BxNxD, ((0, 0), (0, num_new), (0, 0)))
  out_BxNxD = jnp.zeros((b, num_new, d), prompt_BxNxD.dtype)
  extras = ()
  if context_BxCL is None:  # A renderer that reads no text before: nothing to carry.
    context_BxCL = jnp.zeros((b, 0), jnp.int32)
  if snap is not None:
    spec_Bx1xD = jax.ShapeDtypeStruct((b, 1, d), prompt_BxNxD.dtype)
    _, *shapes = jax.eval_shape(snap, spec_Bx1xD, spec_Bx1xD, context_BxCL, key)
    extras = tuple(jnp.full((b, num_new, *s.shape[2:]), PAD_ID, s.dtype) for s in shapes)
  pos_M = jnp.arange(m)
  drafts = draft_snap is not None and num_candidates > 1
  if draft_snap is not None and snap is None:
    raise ValueError("draft_snap drafts what snap renders: give snap too")

  def rendered(z_Bx1xD, prev_Bx1xD, text_BxCL, key, render):
    """(z_ctx_Bx1xD, end_B, *render's outputs) of samples z, rendered by `render` (a snap)."""
    z_ctx_Bx1xD, outs = z_Bx1xD, []
    end_B = cosine(z_Bx1xD[:, 0], z_end_D) >= end_cosine
    if render is not None:
      z_ctx_Bx1xD, *outs = render(z_Bx1xD, prev_Bx1xD, text_BxCL, key)
      end_B |= outs[0][:, 0, 0] == EOD_ID  # Rendered as the END chunk.
    return z_ctx_Bx1xD, end_B, *outs

  def draw(h_Bx1xE, memory, prev_Bx1xD, text_BxCL, key, c, noise_scale, guidance, render):
    """c samples of the next concept per example, candidate-major (rows j*c..j*c+c-1 are
    example j's) -> (z_BCx1xD, z_ctx_BCx1xD, end_BC, *render's outputs)."""
    k_sample, k_snap = jax.random.split(key)
    z_BCx1xD = concept_model.sample_from_context(
        model, {"params": params}, jnp.repeat(h_Bx1xE, c, axis=0), k_sample,
        objective=objective, steps=steps, guidance=guidance, noise_scale=noise_scale,
        memory=concept_model.repeat_memory(memory, c), end_noise=end_noise)
    z_BCx1xD = concept_prefix(z_BCx1xD, model_dims)
    return z_BCx1xD, *rendered(z_BCx1xD, jnp.repeat(prev_Bx1xD, c, axis=0),
                               jnp.repeat(text_BxCL, c, axis=0), k_snap, render)

  def body(carry):
    i, buf_BxMxD, out_BxNxD, extras, done_B, text_BxCL = carry
    seg_BxM = (pos_M < (counts_B + i)[:, None]).astype(jnp.int32)
    h_BxMxE = model.apply({"params": params}, buf_BxMxD, seg_BxM, method=ConceptModel.context)
    last_Bx1 = (counts_B + i - 1)[:, None]
    h_Bx1xE = jnp.take_along_axis(h_BxMxE, last_Bx1[..., None], axis=1)
    prev_Bx1xD = jnp.take_along_axis(buf_BxMxD, last_Bx1[..., None], axis=1)
    memory = None
    if model.cfg.head_reads_context:  # The head reads the written concepts 0..last.
      memory = (buf_BxMxD, (seg_BxM > 0)[:, None, :], last_Bx1,
                jnp.broadcast_to(pos_M, seg_BxM.shape))
    key_i, c = jax.random.fold_in(key, i), num_candidates
    picked = draw(h_Bx1xE, memory, prev_Bx1xD, text_BxCL, key_i, c, noise_scale, guidance,
                  draft_snap if drafts else snap)
    valid_BxC = ~picked[2].reshape(b, c) if end_temperature else None
    if c > 1 or end_temperature:
      z_BxCxD, z_ctx_BxCxD = (x.reshape(b, c, d) for x in picked[:2])
      best_B = (roundtrip_index(concept_prefix(z_BxCxD, render_dims),
                                concept_prefix(z_ctx_BxCxD, render_dims), valid_BxC)
                if candidate_rule == "roundtrip" else consensus_index(z_ctx_BxCxD, valid_BxC))
      picked = tuple(take_candidate(x, best_B, c) for x in picked)
    if drafts:  # The kept draft rendered in full: its chunk, context and END are that one's.
      picked = (picked[0], *rendered(picked[0], prev_Bx1xD, text_BxCL,
                                     jax.random.fold_in(key_i, 2), snap))
    if end_temperature:
      # END is decided by one sample at the model's own temperature, unguided; the content
      # is a candidate that does not end (none: the deciding sample, which does not).
      decided = draw(h_Bx1xE, memory, prev_Bx1xD, text_BxCL, jax.random.fold_in(key_i, 1), 1,
                     end_temperature, 1.0, snap)
      use_B = decided[2] | ~jnp.any(valid_BxC, -1)
      picked = tuple(jnp.where(use_B.reshape(b, *([1] * (x.ndim - 1))), a, x)
                     for a, x in zip(decided, picked))
    z_Bx1xD, z_ctx_Bx1xD, end_B, *outs = picked
    out_BxNxD = jax.lax.dynamic_update_slice_in_dim(out_BxNxD, z_Bx1xD, i, axis=1)
    done_B |= end_B
    if snap is not None:
      extras = tuple(jax.lax.dynamic_update_slice_in_dim(e, o.astype(e.dtype), i, axis=1)
                     for e, o in zip(extras, outs))
      if text_BxCL.shape[1]:  # The rendered chunk is the newest text before the next.
        l = outs[0].shape[-1]
        text_BxCL = jnp.concatenate([text_BxCL[:, l:], outs[0][:, 0].astype(text_BxCL.dtype)], 1)
    write_BxM = pos_M == (counts_B + i)[:, None]
    buf_BxMxD = jnp.where(write_BxM[..., None], z_ctx_Bx1xD, buf_BxMxD)
    return i + 1, buf_BxMxD, out_BxNxD, extras, done_B, text_BxCL

  cond = lambda c: (c[0] < num_new) & ~jnp.all(c[4])
  init = (0, buf_BxMxD, out_BxNxD, extras, jnp.zeros((b,), bool), context_BxCL)
  _, buf_BxMxD, z_BxNxD, extras, _, _ = jax.lax.while_loop(cond, body, init)
  new_BxN = counts_B[:, None] + jnp.arange(num_new)
  prev_BxNxD = jnp.take_along_axis(buf_BxMxD, (new_BxN - 1)[..., None], axis=1)
  return z_BxNxD, prev_BxNxD, extras


def snap_fn(encoder: ConceptEncoder, enc_params, renderer: Renderer, ren_params, *,
            steps: int, temperature: float, return_steps: bool = False, dims: int = 0):
  """Re-encoding for concept_loop: (z, prev, text, key) -> (encoder(chunk), chunk[, states]).

  chunk_Bx1xL is z's first `dims` dimensions (0: all) rendered from all-MASK;
  states_Bx1xSxL its intermediate renders.
  """

  def snap(z_Bx1xD, prev_Bx1xD, text_BxCL, key):
    context = text_BxCL[:, None] if renderer.cfg.context_chunks else None
    out = render_chunks(renderer, ren_params, concept_prefix(z_Bx1xD, dims),
                        concept_prefix(prev_Bx1xD, dims), key, steps=steps,
                        temperature=temperature, return_steps=return_steps,
                        context_BxNxCL=context)
    chunk_Bx1xL = out[0] if return_steps else out
    z_ctx_Bx1xD = encoder.apply({"params": enc_params}, chunk_Bx1xL, chunk_Bx1xL != PAD_ID)
    z_ctx_Bx1xD = z_ctx_Bx1xD.astype(z_Bx1xD.dtype)
    if return_steps:
      return z_ctx_Bx1xD, chunk_Bx1xL, jnp.moveaxis(out[1], 0, 2)
    return z_ctx_Bx1xD, chunk_Bx1xL

  return snap


# ---------------------------------------------------------------- concepts: generation


@dataclasses.dataclass(frozen=True)
class ConceptOptions:
  """Static options of a concepts generation (one compiled program per value)."""
  num_new: int = 8
  concept_steps: int = 16
  render_steps: int = 8
  guidance: float = 1.0
  noise_scale: float = 1.0
  render_temperature: float = 0.0
  end_cosine: float = 0.9
  show_steps: bool = False
  reencode: bool = False
  num_candidates: int = 1
  end_noise: float = 0.0
  render_dims: int = 0  # Render a prefix of each concept (concept_prefix; 0: all of it).
  end_temperature: float = 0.0  # > 0: END decided by its own sample (concept_loop).
  candidate_rule: str = "consensus"  # Which of num_candidates is kept (CANDIDATE_RULES).
  model_dims: int = 0  # The prefix the head models (concepts.loss_dims; 0: all of it).
  draft_steps: int = 0  # > 0: candidates drafted in this many render steps (concept_loop).


def _concepts_program(gen: Generator, opts: ConceptOptions):
  """params, render_params, chunks_BxNxL, counts_B, key -> (z, tokens, end, states)."""
  mods = build_modules(gen)
  objective = gen.config.concepts.objective
  concept_len = gen.chunk_config.data.concept_len

  def program(params, render_params, chunks_BxNxL, counts_B, key):
    k_concepts, k_render = jax.random.split(key)
    enc_params = params["encoder"]
    prompt_BxNxD = mods["encoder"].apply({"params": enc_params}, chunks_BxNxL, chunks_BxNxL != PAD_ID)
    z_end_D = end_concept(mods["encoder"], enc_params, concept_len)
    z_end_D = concept_prefix(z_end_D, opts.model_dims)
    text_BxCL = last_chunks(chunks_BxNxL, counts_B, mods["renderer"].cfg.context_chunks)
    snap_in = lambda steps, show: snap_fn(  # noqa: E731
        mods["encoder"], enc_params, mods["renderer"], render_params["renderer"], steps=steps,
        temperature=opts.render_temperature, return_steps=show, dims=opts.render_dims)
    snap = snap_in(opts.render_steps, opts.show_steps) if opts.reencode else None
    # Drafts are only for the choice: no intermediate states to show.
    draft = snap_in(opts.draft_steps, False) if opts.draft_steps else None
    z_BxNxD, prev_BxNxD, extras = concept_loop(
        mods["concept_model"], params["concept_model"], prompt_BxNxD, counts_B, z_end_D, k_concepts,
        num_new=opts.num_new, objective=objective, steps=opts.concept_steps,
        guidance=opts.guidance, noise_scale=opts.noise_scale, end_cosine=opts.end_cosine,
        snap=snap, num_candidates=opts.num_candidates, context_BxCL=text_BxCL,
        end_noise=opts.end_noise, end_temperature=opts.end_temperature,
        candidate_rule=opts.candidate_rule, model_dims=opts.model_dims,
        render_dims=opts.render_dims, draft_snap=draft)
    if opts.reencode:  # Rendered one chunk at a time inside the loop.
      tokens_BxNxL = extras[0]
      states_SxBxNxL = jnp.moveaxis(extras[1], 2, 0) if opts.show_steps else None
      return tokens_BxNxL, is_end(tokens_BxNxL, z_BxNxD, z_end_D, opts.end_cosine), states_SxBxNxL
    return _render_program(mods["renderer"], render_params["renderer"], z_BxNxD, prev_BxNxD,
                           z_end_D, k_render, opts, text_BxCL)

  return program


def _render_program(renderer, params, z_BxNxD, prev_BxNxD, z_end_D, key, opts: ConceptOptions,
                    context_BxCL=None):
  """Renders all chunks (at once, or in order from context_BxCL) and marks the END chunks.

  The renderer reads the first opts.render_dims dimensions of each concept; the END test
  the whole concept.
  """
  z_end_BxNxD = z_BxNxD
  z_BxNxD, prev_BxNxD = (concept_prefix(x, opts.render_dims) for x in (z_BxNxD, prev_BxNxD))
  if renderer.cfg.context_chunks:
    if context_BxCL is None:
      context_BxCL = jnp.full((z_BxNxD.shape[0], renderer.cfg.context_chunks *
                               renderer.cfg.concept_len), PAD_ID, jnp.int32)
    out = render_in_order(renderer, params, z_BxNxD, prev_BxNxD, context_BxCL, key,
                          steps=opts.render_steps, temperature=opts.render_temperature,
                          return_steps=opts.show_steps)
  else:
    out = render_chunks(renderer, params, z_BxNxD, prev_BxNxD, key, steps=opts.render_steps,
                        temperature=opts.render_temperature, return_steps=opts.show_steps)
  tokens_BxNxL, states_SxBxNxL = out if opts.show_steps else (out, None)
  end_BxN = is_end(tokens_BxNxL, z_end_BxNxD, z_end_D, opts.end_cosine)
  return tokens_BxNxL, end_BxN, states_SxBxNxL


def _chunk_samples(gen: Generator, prompts, tokens_BxNxL, end_BxN, states_SxBxNxL) -> list[Sample]:
  """Host-side: cut each example at its first END chunk and detokenize."""
  tokens_BxNxL, end_BxN = np.asarray(tokens_BxNxL), np.asarray(end_BxN)
  kept_B = np.asarray(num_kept(end_BxN))
  samples = []
  for i, prompt in enumerate(prompts):
    chunks = tokens_BxNxL[i, :kept_B[i]]
    ids = [int(t) for t in chunks.reshape(-1) if t not in (PAD_ID, EOD_ID)]
    steps = None
    if states_SxBxNxL is not None:
      steps = [show_tokens(gen.tokenizer, np.asarray(s[i, :kept_B[i]]).reshape(-1))
               for s in states_SxBxNxL]
    samples.append(Sample(prompt, gen.tokenizer.decode(ids), ids,
                          bool(end_BxN[i].any()), steps, int(kept_B[i])))
  return samples


def _generate_concepts(gen: Generator, prompts, opts: ConceptOptions, key) -> list[Sample]:
  chunks_BxNxL, counts_B = prompt_chunks(gen, prompts)
  program = gen.jitted("concepts", (opts,), lambda: _concepts_program(gen, opts))
  out = program(gen.params, gen.render_params, shard_batch(gen, chunks_BxNxL),
                shard_batch(gen, counts_B), key)
  return _chunk_samples(gen, prompts, *jax.device_get(out))


def decode_concepts(gen: Generator, z_BxNxD, prev_z_BxD=None, *,
                    render_steps: int | None = None, end_cosine: float = 0.9, seed: int = 0,
                    show_steps: bool = False) -> list[Sample]:
  """Renders given concept sequences (e.g. from an oracle) with the generation's cut at END."""
  renderer_params = gen.render_params if gen.kind == "concepts" else gen.params
  mods = build_modules(gen)
  z_BxNxD = jnp.asarray(z_BxNxD, jnp.float32)
  if prev_z_BxD is None:
    prev_z_BxD = jnp.zeros_like(z_BxNxD[:, 0])
  prev_BxNxD = jnp.concatenate([prev_z_BxD[:, None], z_BxNxD[:, :-1]], axis=1)
  opts = ConceptOptions(render_steps=render_steps or gen.chunk_config.render.sample_steps,
                        end_cosine=end_cosine, show_steps=show_steps)
  concept_len = gen.chunk_config.data.concept_len

  def program(enc_params, ren_params, z_BxNxD, prev_BxNxD, key):
    z_end_D = end_concept(mods["encoder"], enc_params, concept_len)
    return _render_program(mods["renderer"], ren_params, z_BxNxD, prev_BxNxD, z_end_D, key, opts)

  fn = gen.jitted("decode", (opts,), lambda: program)
  out = fn(gen.params["encoder"], renderer_params["renderer"], z_BxNxD, prev_BxNxD,
           jax.random.key(seed))
  return _chunk_samples(gen, [""] * z_BxNxD.shape[0], *jax.device_get(out))


def encode_chunks(gen: Generator, chunks_BxNxL) -> jax.Array:
  """Concepts z_BxNxD of token chunks with the run's (frozen) encoder."""
  encoder = build_modules(gen)["encoder"]
  fn = gen.jitted("encode", (), lambda: lambda p, c: encoder.apply({"params": p}, c, c != PAD_ID))
  return fn(gen.params["encoder"], jnp.asarray(chunks_BxNxL, jnp.int32))


def previous_with_context(encoder: ConceptEncoder, params, z_BxNxD, last_Bx1xL):
  """Each chunk's previous concept: the one before it, or E(last_Bx1xL) (zeros if all PAD)."""
  before_Bx1xD = encoder.apply({"params": params}, last_Bx1xL, last_Bx1xL != PAD_ID)
  before_Bx1xD = jnp.where(jnp.any(last_Bx1xL != PAD_ID, -1, keepdims=True), before_Bx1xD, 0.0)
  return jnp.concatenate([before_Bx1xD.astype(z_BxNxD.dtype), z_BxNxD[:, :-1]], axis=1)


def roundtrip(gen: Generator, texts: Sequence[str], *, contexts: Sequence[str] | None = None,
              render_steps: int | None = None, seed: int = 0,
              show_steps: bool = False, render_dims: int | None = None) -> list[Sample]:
  """Encodes each text's chunks and renders them back (render or concepts runs), one jit.

  render_dims: the renderer reads that prefix of each concept (a nested render run; 0:
  all; None: checked_render_dims's default).

  contexts: the text each one continues; a render.prev_concept renderer then reads its last
  chunk's concept as the first chunk's previous one, as in generation (else zeros), and a
  render.context_chunks one its last chunks' tokens. Such a renderer renders the chunks in
  order, each reading the ones it rendered before it (render_in_order), as generation does.
  """
  if gen.kind not in ("render", "concepts"):
    raise GenerateError(f"roundtrip needs a render or concepts run, not {gen.kind!r}")
  if contexts is not None and len(contexts) != len(texts):
    raise GenerateError(f"roundtrip got {len(contexts)} contexts for {len(texts)} texts")
  render_dims = checked_render_dims(gen, render_dims)
  chunks_BxNxL, counts_B = prompt_chunks(gen, texts)
  mods = build_modules(gen)
  # The text before each one's first chunk: its context's last chunks (PAD: none). A
  # prev_concept renderer reads the last one's concept, a context_chunks one the tokens.
  num_last = max(1, mods["renderer"].cfg.context_chunks)
  b, _, l = chunks_BxNxL.shape
  last_BxCL = np.full((b, num_last * l), PAD_ID, np.int32)
  if contexts is not None:
    ctx_BxNxL, ctx_counts_B = prompt_chunks(gen, contexts)
    last_BxCL = np.array(last_chunks(ctx_BxNxL, ctx_counts_B, num_last))  # A writable copy.
    last_BxCL[len(texts):] = PAD_ID
  concept_len = gen.chunk_config.data.concept_len
  opts = ConceptOptions(render_steps=render_steps or gen.chunk_config.render.sample_steps,
                        end_cosine=0.999, show_steps=show_steps, render_dims=render_dims)

  def program(enc_params, ren_params, chunks_BxNxL, counts_B, last_BxCL, key):
    encoder = mods["encoder"]
    prompt_BxNxD = encoder.apply({"params": enc_params}, chunks_BxNxL, chunks_BxNxL != PAD_ID)
    z_end_D = end_concept(encoder, enc_params, concept_len)
    # Padding chunks become END concepts, so the cut drops them.
    real_BxN = jnp.arange(prompt_BxNxD.shape[1]) < counts_B[:, None]
    prompt_BxNxD = jnp.where(real_BxN[..., None], prompt_BxNxD, z_end_D)
    prev_BxNxD = previous_with_context(encoder, enc_params, prompt_BxNxD,
                                       last_BxCL[:, None, last_BxCL.shape[1] - l:])
    text_BxCL = last_BxCL if mods["renderer"].cfg.context_chunks else None
    return _render_program(mods["renderer"], ren_params, prompt_BxNxD, prev_BxNxD, z_end_D, key,
                           opts, text_BxCL)

  renderer_params = gen.render_params if gen.kind == "concepts" else gen.params
  fn = gen.jitted("roundtrip", (opts,), lambda: program)
  out = fn(gen.params["encoder"], renderer_params["renderer"], shard_batch(gen, chunks_BxNxL),
           shard_batch(gen, counts_B), shard_batch(gen, last_BxCL), jax.random.key(seed))
  samples = _chunk_samples(gen, texts, *jax.device_get(out))
  for s, count in zip(samples, counts_B):
    s.ended = s.num_chunks < count  # A real chunk came back as END (padding always does).
  return samples


# ---------------------------------------------------------------- ar


def pick_tokens(logits_BxV, key, temperature: float):
  """Next token per row: argmax (temperature 0) or a sample; never a forbidden id."""
  logits_BxV = logits_BxV.astype(jnp.float32).at[:, jnp.array(_FORBIDDEN_IDS)].set(-jnp.inf)
  if temperature > 0:
    return jax.random.categorical(key, logits_BxV / temperature).astype(jnp.int32)
  return jnp.argmax(logits_BxV, -1).astype(jnp.int32)


def ar_loop(step_fn, cache, tokens_BxT, lengths_B, key, *, max_new: int, temperature: float):
  """KV-cached decoding -> tokens_BxT with up to `max_new` tokens after each prompt.

  step_fn(cache, tokens_Bx1) -> (logits_Bx1xV, cache). Prompts of different lengths
  decode in lockstep: step i feeds token i of every row; rows still inside their
  prompt keep their next prompt token, the others take the sampled one. The loop
  ends when every row has emitted EOD or `max_new` tokens; after that a row holds PAD.
  """
  b, t = tokens_BxT.shape

  def body(carry):
    i, cache, tokens_BxT, done_B = carry
    fed_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxT, i, 1, axis=1)
    logits_Bx1xV, cache = step_fn(cache, fed_Bx1)
    new_B = pick_tokens(logits_Bx1xV[:, 0], jax.random.fold_in(key, i), temperature)
    in_prompt_B = i + 1 < lengths_B
    prompt_B = jax.lax.dynamic_slice_in_dim(tokens_BxT, i + 1, 1, axis=1)[:, 0]
    new_B = jnp.where(in_prompt_B, prompt_B, jnp.where(done_B, PAD_ID, new_B))
    tokens_BxT = jax.lax.dynamic_update_slice_in_dim(tokens_BxT, new_B[:, None], i + 1, axis=1)
    made_B = i + 2 - lengths_B  # Tokens generated so far (after this step).
    done_B |= ~in_prompt_B & ((new_B == EOD_ID) | (made_B >= max_new))
    return i + 1, cache, tokens_BxT, done_B

  cond = lambda c: (c[0] < t - 1) & ~jnp.all(c[3])
  _, _, tokens_BxT, _ = jax.lax.while_loop(cond, body, (0, cache, tokens_BxT,
                                                          jnp.zeros((b,), bool)))
  return tokens_BxT


def _ar_program(gen: Generator, max_new: int, temperature: float):
  model = build_modules(gen)["model"]

  def program(params, tokens_BxT, lengths_B, key):
    cache = baselines.init_cache(model, tokens_BxT.shape[0], tokens_BxT.shape[1])
    step_fn = lambda c, x: baselines.decode_step(model, params["model"], c, x)
    return ar_loop(step_fn, cache, tokens_BxT, lengths_B, key, max_new=max_new,
                   temperature=temperature)

  return program


def _flat_samples(gen: Generator, prompts, tokens_BxT, lengths_B, max_new: int,
                  states_SxBxT=None) -> list[Sample]:
  """Host-side: the tokens after each prompt, cut at the first EOD."""
  tokens_BxT = np.asarray(tokens_BxT)
  samples = []
  for i, prompt in enumerate(prompts):
    row = tokens_BxT[i, lengths_B[i]:lengths_B[i] + max_new]
    eod = np.flatnonzero(row == EOD_ID)
    cut = int(eod[0]) if len(eod) else len(row)
    ids = [int(x) for x in row[:cut] if x != PAD_ID]
    steps = None
    if states_SxBxT is not None:
      steps = [show_tokens(gen.tokenizer, np.asarray(s[i, lengths_B[i]:lengths_B[i] + cut]))
               for s in states_SxBxT]
    samples.append(Sample(prompt, gen.tokenizer.decode(ids), ids, bool(len(eod)), steps))
  return samples


def _generate_ar(gen: Generator, prompts, max_new: int, temperature: float, key) -> list[Sample]:
  tokens_BxT, lengths_B = prompt_tokens(gen, prompts, max_new)
  program = gen.jitted("ar", (max_new, temperature),
                       lambda: _ar_program(gen, max_new, temperature))
  out = program(gen.params, shard_batch(gen, tokens_BxT), shard_batch(gen, lengths_B), key)
  return _flat_samples(gen, prompts, jax.device_get(out), lengths_B, max_new)


# ---------------------------------------------------------------- mdm


def _mdm_program(gen: Generator, steps: int, temperature: float, block_size, show_steps: bool):
  model = build_modules(gen)["model"]

  def program(params, tokens_BxT, fill_BxT, seg_BxT, key):
    # The sampler only fills `fill`; the prompt is put back before every model call.
    def logits_fn(x_BxT):
      x_BxT = jnp.where(fill_BxT, x_BxT, tokens_BxT)
      return model.apply({"params": params["model"]}, x_BxT, seg_BxT)

    return masked.sample(logits_fn, key, fill_BxT, mask_id=MASK_ID, pad_id=PAD_ID, steps=steps,
                         temperature=temperature, block_size=block_size,
                         return_steps=show_steps)

  return program


def _generate_mdm(gen: Generator, prompts, max_new: int, steps: int, temperature: float,
                  block_size, show_steps: bool, key) -> list[Sample]:
  tokens_BxT, lengths_B = prompt_tokens(gen, prompts, max_new)
  pos_T = np.arange(tokens_BxT.shape[1])
  fill_BxT = (pos_T >= lengths_B[:, None]) & (pos_T < (lengths_B + max_new)[:, None])
  seg_BxT = (pos_T < (lengths_B + max_new)[:, None]).astype(np.int32)
  options = (max_new, steps, temperature, block_size, show_steps)
  program = gen.jitted("mdm", options,
                       lambda: _mdm_program(gen, steps, temperature, block_size, show_steps))
  inputs = (shard_batch(gen, x) for x in (tokens_BxT, fill_BxT, seg_BxT))
  out = program(gen.params, *inputs, key)
  out = jax.device_get(out)
  tokens_BxT, states = out if show_steps else (out, None)
  return _flat_samples(gen, prompts, tokens_BxT, lengths_B, max_new, states)


# ---------------------------------------------------------------- the entry


def checked_render_dims(gen: Generator, render_dims: int | None) -> int:
  """render_dims (None: a concepts run's concepts.render_dims, else 0), checked against the
  render run: a prefix of [0, concept_dim], from a renderer trained on nested concepts."""
  if render_dims is None:  # .get: runs saved before the field rendered whole concepts.
    render_dims = gen.config.concepts.get("render_dims", 0) if gen.kind == "concepts" else 0
  render = gen.chunk_config
  d = render.model.concept_dim
  if not (int(render_dims) == render_dims and 0 <= render_dims <= d):
    raise GenerateError(f"render_dims={render_dims} must be a whole number of dimensions in "
                        f"[0, {d}] (the render run's model.concept_dim; 0: all)")
  if render_dims and not render.render.get("nested_dims", ()):
    raise GenerateError(f"render_dims={render_dims} renders a prefix of each concept, but the "
                        "render run was trained on whole concepts (render.nested_dims is "
                        "empty): its renderer never saw a cut concept")
  loss_dims = gen.config.concepts.get("loss_dims", 0) if gen.kind == "concepts" else 0
  if loss_dims and not 0 < render_dims <= loss_dims:
    raise GenerateError(f"render_dims={render_dims} renders dimensions this concepts run's "
                        f"head never modelled: it was fitted on the first {loss_dims} "
                        f"(concepts.loss_dims); use render_dims in [1, {loss_dims}]")
  return int(render_dims)


def generate(gen: Generator, prompts: Sequence[str], *, num_concepts: int = 8,
             max_tokens: int = 64, concept_steps: int | None = None,
             render_steps: int | None = None, guidance: float | None = None,
             temperature: float | None = None, render_temperature: float = 0.0, seed: int = 0,
             show_steps: bool = False, end_cosine: float = 0.9,
             block_size: int | None = None, reencode: bool | None = None,
             num_candidates: int | None = None, end_noise: float | None = None,
             render_dims: int | None = None,
             end_temperature: float | None = None,
             candidate_rule: str | None = None,
             draft_steps: int | None = None) -> list[Sample]:
  """Continuations of `prompts` (one jitted call for the whole batch).

  concepts runs: `num_concepts` new concepts, `concept_steps` sampler steps each
  (default concepts.sample_steps), classifier-free `guidance` (default
  concepts.guidance), `temperature` scales the concept sampler's starting noise
  (default concepts.temperature). Chunks are rendered in `render_steps` (default
  render.sample_steps) at `render_temperature`: all at once after the concept loop,
  or with `reencode` (default concepts.reencode) each as soon as its concept is
  sampled, the concept model reading the encoder's concept of the rendered chunk
  (see concept_loop). `num_candidates` (default concepts.num_candidates) samples that
  many candidates of every concept and keeps the consensus one. `end_noise` (default
  concepts.end_noise) stops the concept sampler at that noise (continuous.sample): the
  renderer gets the concept as it saw concepts in training, under noise; meant with
  `reencode`, so the concept model still reads clean concepts. `render_dims` (default
  concepts.render_dims) renders that prefix of each concept, for a render run trained on
  nested concepts (render.nested_dims). `end_temperature` (default
  concepts.end_temperature; 0: off) decides END by one more sample per concept at that
  temperature, unguided, and keeps a candidate that does not end (see concept_loop): a
  cool, guided sampler then ends about as often as the model does. `candidate_rule`
  (default concepts.candidate_rule): which candidate is kept, the consensus or (with
  `reencode`) the one that round-trips best. `draft_steps` (default concepts.draft_steps;
  0: off; needs `reencode`, fewer than `render_steps`) renders the candidates in that many
  steps for the choice and the kept one again in `render_steps` (one candidate: nothing
  to draft). ar / mdm runs: up to
  `max_tokens` tokens at `temperature` (default 1; mdm: `render_steps` unmasking steps, default
  max_tokens, optional semi-autoregressive `block_size`). A continuation stops at
  end-of-document: an END concept (renders to EOD, or cosine >= end_cosine to
  encoder([EOD])) or an EOD token.
  """
  if not prompts:
    return []
  key = jax.random.key(seed)
  if gen.kind == "concepts":
    c = gen.config.concepts
    if temperature is None:  # .get: runs saved before the field sampled at 1.
      temperature = c.get("temperature", 1.0)
    if reencode is None:
      reencode = c.get("reencode", False)
    num_candidates = int(c.get("num_candidates", 1) if num_candidates is None else num_candidates)
    if num_candidates < 1:
      raise GenerateError(f"num_candidates={num_candidates} must be >= 1")
    end_noise = float(c.get("end_noise", 0.0) if end_noise is None else end_noise)
    if end_noise < 0:
      raise GenerateError(f"end_noise={end_noise} must be >= 0")
    render_dims = checked_render_dims(gen, render_dims)
    end_temperature = float(c.get("end_temperature", 0.0) if end_temperature is None
                            else end_temperature)
    if end_temperature < 0:
      raise GenerateError(f"end_temperature={end_temperature} must be >= 0 (0: off)")
    if candidate_rule is None:  # .get: runs saved before the field kept the consensus.
      candidate_rule = c.get("candidate_rule", "consensus")
    if candidate_rule not in CANDIDATE_RULES:
      raise GenerateError(f"candidate_rule={candidate_rule!r} must be one of {CANDIDATE_RULES}")
    if candidate_rule == "roundtrip" and not reencode:
      raise GenerateError("candidate_rule='roundtrip' compares each candidate with its "
                          "rendered chunk's concept: it needs reencode=True")
    render_steps = int(render_steps or gen.render_config.render.sample_steps)
    draft_steps = c.get("draft_steps", 0) if draft_steps is None else draft_steps
    if num_candidates == 1:  # Nothing to draft (and a default's drafts ask nothing of it).
      draft_steps = 0
    if not (int(draft_steps) == draft_steps and 0 <= draft_steps < render_steps):
      raise GenerateError(f"draft_steps={draft_steps} must be a whole number of render steps "
                          f"in [0, render_steps={render_steps}) (0: off)")
    if draft_steps and not reencode:
      raise GenerateError(f"draft_steps={draft_steps} drafts the candidates' rendered chunks, "
                          "which only reencode=True renders: pass reencode=True, or "
                          "draft_steps=0 (sample: --draft_steps=0)")
    if c.get("loss_dims", 0) and not reencode:
      raise GenerateError(f"this concepts run's head models only the first {c.loss_dims} "
                          "dimensions of a concept (concepts.loss_dims): the concept model "
                          "must read re-encoded chunks, not its raw samples; reencode=True")
    opts = ConceptOptions(
        num_new=int(num_concepts), concept_steps=int(concept_steps or c.sample_steps),
        render_steps=render_steps, guidance=float(c.guidance if guidance is None else guidance),
        noise_scale=float(temperature), render_temperature=float(render_temperature),
        end_cosine=float(end_cosine), show_steps=bool(show_steps), reencode=bool(reencode),
        num_candidates=num_candidates, end_noise=end_noise, render_dims=render_dims,
        end_temperature=end_temperature, candidate_rule=candidate_rule,
        model_dims=int(c.get("loss_dims", 0)),
        draft_steps=int(draft_steps))
    return _generate_concepts(gen, list(prompts), opts, key)
  temperature = 1.0 if temperature is None else temperature
  if gen.kind == "ar":
    if show_steps:
      logging.info("ar runs have no denoising steps to show")
    run = lambda part, k: _generate_ar(gen, part, int(max_tokens), float(temperature), k)  # noqa: E731
  elif gen.kind == "mdm":
    run = lambda part, k: _generate_mdm(  # noqa: E731
        gen, part, int(max_tokens), int(render_steps or max_tokens), float(temperature),
        block_size, bool(show_steps), k)
  else:
    raise GenerateError(f"{gen.workdir} is a render run: it can only round-trip text "
                        "(roundtrip / --roundtrip); generate from a concepts run")
  parts = flat_parts(gen, list(prompts), int(max_tokens))
  # One part (the usual case) samples with `key` itself: the same samples as before parts.
  return [x for i, part in enumerate(parts)
          for x in run(part, key if i == 0 else jax.random.fold_in(key, i))]


def flat_parts(gen: Generator, prompts: list[str], extra: int,
               max_attention: int | None = None) -> list[list[str]]:
  """Consecutive groups of prompts, each padded batch x length^2 <= max_attention
  (default FLAT_MAX_ATTENTION; a prompt alone may exceed it: a group of its own)."""
  max_attention = max_attention or FLAT_MAX_ATTENTION
  lengths = [len(r) for r in prompt_rows(gen, prompts)]
  parts, start, longest = [], 0, 0
  for i, n in enumerate(lengths):
    longest_i = max(longest, n)
    t = _round_up(longest_i, _PROMPT_BUCKET) + extra
    if i > start and padded_batch_size(gen, i + 1 - start) * t * t > max_attention:
      parts.append(prompts[start:i])
      start, longest_i = i, n
    longest = longest_i
  return parts + [prompts[start:]]


def format_samples(samples: Sequence[Sample], show_steps: bool = False) -> str:
  """Human-readable report of samples (prompt, steps if any, continuation)."""
  lines = []
  for i, s in enumerate(samples):
    if len(samples) > 1:
      lines.append(f"[{i}]")
    lines.append(f"prompt: {s.prompt}")
    if show_steps and s.steps:
      lines.extend(f"  step {j + 1:>3}: {text}" for j, text in enumerate(s.steps))
    end = "  [end of document]" if s.ended else ""
    lines.append(f"output: {s.text}{end}")
  return "\n".join(lines)
