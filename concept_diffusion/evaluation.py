"""Held-out evaluation of render / concepts / ar / mdm runs, and side-by-side comparison.

  metrics = evaluation.evaluate("runs/concepts", judge_workdir="runs/ar")  # writes eval.json
  print(evaluation.format_table({"concepts": metrics}))

Metrics (every number is on held-out data: make_dataset(split="eval") batches and
the first `num_prompts` documents of iterate_documents(config, "eval")):

| metric | runs | definition |
|---|---|---|
| `roundtrip_token_accuracy` | render | share of real tokens of real held-out chunks that `R(E(chunk))` reproduces at their position; the renderer starts from all-MASK and runs `render.sample_steps` confidence-ordered unmasking steps, argmax (a `render.context_chunks` renderer reads the true chunks before each one) |
| `roundtrip_exact_match` | render | share of real chunks rendered exactly, all `concept_len` positions (so the chunk's length too) |
| `elbo_bits_per_token` | render | masked-diffusion ELBO (Monte-Carlo, `diffusion.masked.elbo_bits`) of a chunk's real tokens given its true concept, bits per real token (padding positions are given, so the chunk's length is known); an upper bound on -log2 p(chunk given z) per token |
| `roundtrip_consistent` | render, concepts; synthetic data | `coherence_consistent` of the true continuations (their first `max_tokens // concept_len` sentences) encoded and rendered back, `R(E(truth))`: what a perfect concept model would score through this render stage |
| `roundtrip_gen_ppl` | render, concepts; with a judge | `gen_ppl` of the same rendered-back truths `R(E(truth))` given their prompts: the render stage's bound on a concepts run's gen-PPL |
| `next_concept_l2` | concepts | RMS error per dimension of the sampled next concept, mean over positions: ‖ẑ − z‖₂ / √D (concepts have unit RMS, so 0 is exact and ≈1.41 an unrelated concept) |
| `next_concept_cosine` | concepts | mean cosine between the sampled and the true next concept |
| `contrastive_accuracy` | concepts | share of positions whose sampled next concept is closer (L2) to the true next concept than to every concept of the other documents in the batch (copies of the true concept excluded) |
| `spread_ratio` | concepts | is the head's sampler as spread as its errors? Of `SPREAD_SAMPLES` K samples per position: sqrt(Σ‖z − mean‖² / (Σ unbiased variance · (1 + 1/K))), sums over positions and dimensions. 1: the truth lies as far from the samples' mean as another sample would (calibrated); > 1: the samples huddle (under-dispersed); < 1: they scatter |
| `bits_per_token` | ar, mdm | ar: exact next-token cross-entropy in bits over held-out tokens (EOD included, BOS given); mdm: the masked-diffusion ELBO in bits over the same tokens (an upper bound) |
| `gen_ppl` | all but render | perplexity, under the judge AR run (`--judge_workdir`, its tokenizer), of the generated continuations given their prompts: exp(total NLL / total continuation tokens) |
| `gen_ppl_end` | all but render | `gen_ppl` with the judge's end-of-document token scored after every continuation that ended the document: ending where the text goes on costs, an empty continuation counts one token (under `gen_ppl` it counts none, so a run that ends early is scored on little text) |
| `gen_tokens` / `gen_empty` | all but render | mean continuation length in the generating run's tokens / share of empty continuations (read `gen_ppl` with them) |
| `unigram_entropy` | all but render | entropy in bits of each continuation's token frequencies, averaged over non-empty continuations (low = repetition) |
| `coherence_well_formed` | all but render, synthetic data | share of continuation sentences that are exactly a corpus template (`data.synthetic.check_continuation`), averaged over prompts; an empty continuation scores 0 |
| `coherence_consistent` | all but render, synthetic data | share of continuation sentences that are well formed and agree with the facts of the prompt and of the earlier continuation |
| `gen_ended` | all but render | share of continuations that ended the document (END concept / EOD) within budget |
| `gen_tokens_per_sec` | all but render | generated tokens (after the cut at end-of-document) per wall-clock second of one batched, already compiled generation call |
| `gen_latency_s` | all but render | wall-clock seconds of that call divided by the number of prompts (amortised seconds per sample) |

Prompts are the first half (rounded down, at least one) of each held-out document's
sentences; concepts runs generate `max_tokens // concept_len` concepts (a chunk holds
at most concept_len tokens), the baselines at most `max_tokens` tokens. The same seed
and prompts are used for every run, so `--compare` tables are like for like.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from concept_diffusion import generate as gen_lib
from concept_diffusion.data import segment, synthetic
from concept_diffusion.data.tokenizer import BOS_ID, EOD_ID, MASK_ID, PAD_ID
from concept_diffusion.diffusion import continuous, masked
from concept_diffusion.models import concept_model
from concept_diffusion.models.concept_model import ConceptModel
from concept_diffusion.models.renderer import concept_prefix, previous_chunks, previous_concepts

EVAL_FILE = "eval.json"  # Of the eval prompts; eval_file(split) names each split's.
# Samples per held-out position behind spread_ratio (concept_metrics): the first is the one
# the next-concept metrics score.
SPREAD_SAMPLES = 4
# Where prompts come from (eval_prompts): the reported split, or the one settings are
# chosen on (data.sources).
PROMPT_SPLITS = ("eval", "dev")
ORDER = ("roundtrip_token_accuracy", "roundtrip_exact_match", "elbo_bits_per_token",
         "roundtrip_consistent", "roundtrip_gen_ppl", "next_concept_l2", "next_concept_cosine",
         "contrastive_accuracy", "spread_ratio", "bits_per_token", "gen_ppl", "gen_ppl_end", "gen_tokens",
         "gen_empty", "unigram_entropy", "coherence_well_formed", "coherence_consistent",
         "gen_ended", "gen_tokens_per_sec", "gen_latency_s")


# ---------------------------------------------------------------- metrics (pure)


def unigram_entropy(ids: Sequence[int]) -> float:
  """Entropy in bits of the token frequencies of one sequence (0 for an empty one)."""
  if not len(ids):
    return 0.0
  _, counts = np.unique(np.asarray(ids), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def mean_unigram_entropy(sequences: Iterable[Sequence[int]]) -> float:
  """unigram_entropy averaged over the non-empty sequences (nan if all are empty)."""
  values = [unigram_entropy(s) for s in sequences if len(s)]
  return float(np.mean(values)) if values else float("nan")


def roundtrip_counts(rendered_BxNxL, tokens_BxNxL, token_mask_BxNxL, concept_mask_BxN) -> dict:
  """Sums for round-trip accuracy: correct / real tokens, exact / real chunks."""
  same_BxNxL = np.asarray(rendered_BxNxL) == np.asarray(tokens_BxNxL)
  token_mask_BxNxL, concept_mask_BxN = np.asarray(token_mask_BxNxL), np.asarray(concept_mask_BxN)
  return {"correct": int((same_BxNxL & token_mask_BxNxL).sum()),
          "tokens": int(token_mask_BxNxL.sum()),
          "exact": int((same_BxNxL.all(-1) & concept_mask_BxN).sum()),
          "chunks": int(concept_mask_BxN.sum())}


def next_concept_sums(pred_BxNxD, target_BxNxD, valid_BxN) -> dict:
  """Sums of per-dimension RMS error and cosine over valid positions, and their count."""
  pred, target, valid = (np.asarray(x, np.float64) for x in (pred_BxNxD, target_BxNxD, valid_BxN))
  rms_BxN = np.sqrt(np.mean((pred - target) ** 2, -1))
  cos_BxN = (pred * target).sum(-1) / (np.linalg.norm(pred, axis=-1) *
                                       np.linalg.norm(target, axis=-1) + 1e-9)
  return {"l2": float((rms_BxN * valid).sum()), "cosine": float((cos_BxN * valid).sum()),
          "count": int(valid.sum())}


def spread_sums(samples_KxBxNxD, target_BxNxD, valid_BxN) -> dict:
  """Sums over valid positions and dimensions of the squared error of the K samples' mean
  (err2) and of their unbiased variance (var), and the count of valid positions."""
  x, target = (np.asarray(a, np.float64) for a in (samples_KxBxNxD, target_BxNxD))
  valid = np.asarray(valid_BxN, bool)
  err2_BxN = np.sum((target - x.mean(0)) ** 2, -1)
  var_BxN = np.sum(x.var(0, ddof=1), -1)
  return {"err2": float(err2_BxN[valid].sum()), "var": float(var_BxN[valid].sum()),
          "count": int(valid.sum())}


def spread_ratio(err2: float, var: float, k: int) -> float:
  """sqrt(err2 / (var (1 + 1/k))): 1 when the truth lies as far from the mean of k samples
  as one more sample would (a calibrated sampler); > 1 samples too close together
  (under-dispersed), < 1 too spread."""
  return math.sqrt(err2 / (var * (1.0 + 1.0 / k))) if var > 0 else math.nan


def contrastive_counts(pred_BxNxD, target_BxNxD, valid_BxN, z_BxNxD, concept_mask_BxN,
                       segment_ids_BxN) -> dict:
  """Hits: the prediction is nearer its target than every other document's concept.

  Negatives are the real concepts z of other documents in the batch (another
  example, or another segment of the same example), minus exact copies of the
  target (END chunks, repeated sentences). Positions with no negative are skipped.
  """
  pred, target, z = (np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
                     for x in (pred_BxNxD, target_BxNxD, z_BxNxD))
  b, n = np.shape(valid_BxN)
  doc_M = (np.arange(b)[:, None] * (np.max(segment_ids_BxN, initial=0) + 1) +
           np.asarray(segment_ids_BxN)).reshape(-1)
  valid_M, real_M = np.asarray(valid_BxN).reshape(-1), np.asarray(concept_mask_BxN).reshape(-1)
  dist_MxM = ((pred[:, None] - z[None]) ** 2).sum(-1)
  copy_MxM = ((target[:, None] - z[None]) ** 2).sum(-1) < 1e-9
  negative_MxM = real_M[None] & (doc_M[:, None] != doc_M[None]) & ~copy_MxM
  nearest_neg_M = np.where(negative_MxM, dist_MxM, np.inf).min(-1)
  pos_M = ((pred - target) ** 2).sum(-1)
  counted_M = valid_M & negative_MxM.any(-1)
  return {"hits": int((counted_M & (pos_M < nearest_neg_M)).sum()), "count": int(counted_M.sum())}


def contrastive_accuracy(pred_BxNxD, target_BxNxD, valid_BxN, z_BxNxD, concept_mask_BxN,
                         segment_ids_BxN) -> float:
  """Share of contrastive hits (see contrastive_counts)."""
  c = contrastive_counts(pred_BxNxD, target_BxNxD, valid_BxN, z_BxNxD, concept_mask_BxN,
                         segment_ids_BxN)
  return c["hits"] / c["count"] if c["count"] else float("nan")


def coherence_scores(prompts: Sequence[str], continuations: Sequence[str]) -> dict:
  """Mean synthetic-corpus coherence (well_formed, consistent) of continuations."""
  scores = [synthetic.check_continuation(p, c) for p, c in zip(prompts, continuations)]
  return {"coherence_well_formed": float(np.mean([s["well_formed"] for s in scores])),
          "coherence_consistent": float(np.mean([s["consistent"] for s in scores]))}


def coherence_by_kind(prompts: Sequence[str], continuations: Sequence[str]) -> dict:
  """Where consistency is lost: {kind: {"sentences", "consistent"}} over all continuation
  sentences pooled, by the fact kind each parses as ("malformed" where none does)."""
  counts, hits = collections.Counter(), collections.Counter()
  for prompt, continuation in zip(prompts, continuations):
    for kind, ok in synthetic.sentence_verdicts(prompt, continuation):
      counts[kind or "malformed"] += 1
      hits[kind or "malformed"] += ok
  return {kind: {"sentences": n, "consistent": hits[kind] / n}
          for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def _ratio(num: float, den: float) -> float:
  return num / den if den else float("nan")


# ---------------------------------------------------------------- held-out data


def eval_config(gen: gen_lib.Generator, overrides: dict | None = None):
  """The run's config with `overrides` ({"data.source": ...}) applied; a concept cache
  source is replaced by its render run's text source (prompts need text)."""
  config = ml_collections.ConfigDict(gen.config.to_dict())
  if config.data.source.startswith("concepts:") and gen.render_config is not None:
    config.data.source = gen.render_config.data.source
  for field, value in (overrides or {}).items():
    parent = config
    *path, last = field.split(".")
    for part in path:
      parent = parent[part]
    parent[last] = value
  return config


def eval_batches(config, tokenizer, view: str, batch_size: int, max_batches: int):
  """Up to `max_batches` held-out batches of `view` (deterministic)."""
  from concept_diffusion import data  # Lazy: grain is only needed here.
  ds = data.make_dataset(config, tokenizer, split="eval", view=view, batch_size=batch_size)
  for i, batch in enumerate(ds):
    if i >= max_batches:
      break
    yield batch


def eval_file(prompts: str = "eval") -> str:
  """The file evaluate() writes for a prompt split: dev figures never overwrite eval.json."""
  return EVAL_FILE if prompts == "eval" else f"eval_{prompts}.json"


def check_prompt_split(split: str, error: type[Exception] = ValueError) -> None:
  """Raises `error` naming the choices unless `split` is one of PROMPT_SPLITS."""
  if split not in PROMPT_SPLITS:
    raise error(f"prompts={split!r}: choose from {', '.join(PROMPT_SPLITS)}")


def eval_prompts(config, num_prompts: int, split: str = "eval") -> list[tuple[str, str]]:
  """(prompt, true continuation): first half of a held-out document's sentences, and the
  rest; split "dev" for prompts that choose sampling settings (data.sources)."""
  from concept_diffusion import data
  check_prompt_split(split)
  pairs = []
  for doc in data.iterate_documents(config, split):
    sentences = segment.split_sentences(doc)
    if not sentences:
      continue
    half = max(1, len(sentences) // 2)
    pairs.append((" ".join(sentences[:half]), " ".join(sentences[half:])))
    if len(pairs) == num_prompts:
      break
  return pairs


# ---------------------------------------------------------------- per-kind likelihood metrics


def render_metrics(gen: gen_lib.Generator, batches, key, elbo_samples: int = 4,
                   render_dims: int = 0) -> dict:
  """Round-trip accuracy / exact match and the ELBO given the true concept (its first
  render_dims dimensions, for a nested render run; 0: all)."""
  mods = gen_lib.build_modules(gen)
  enc, ren = mods["encoder"], mods["renderer"]
  steps = gen.chunk_config.render.sample_steps
  render_dims = gen_lib.checked_render_dims(gen, render_dims)

  def program(params, batch, key):
    z_BxNxD = enc.apply({"params": params["encoder"]}, batch["tokens"], batch["token_mask"])
    z_BxNxD = concept_prefix(z_BxNxD, render_dims)
    prev_BxNxD = previous_concepts(z_BxNxD, batch["segment_ids"])
    # Teacher forced: a context_chunks renderer reads the true chunks before each one.
    ctx_BxNxCL = (previous_chunks(batch["tokens"], batch["segment_ids"], ren.cfg.context_chunks)
                  if ren.cfg.context_chunks else None)
    k_render, k_elbo = jax.random.split(key)
    rendered_BxNxL = gen_lib.render_chunks(ren, params["renderer"], z_BxNxD, prev_BxNxD,
                                           k_render, steps=steps, context_BxNxCL=ctx_BxNxCL)
    logits_fn = lambda x: ren.apply({"params": params["renderer"]}, x, z_BxNxD,
                                    prev_BxNxD if ren.cfg.prev_concept else None, None,
                                    ctx_BxNxCL)
    bits = masked.elbo_bits(logits_fn, batch["tokens"], batch["token_mask"], MASK_ID, k_elbo,
                            num_samples=elbo_samples)
    return rendered_BxNxL, bits

  fn = gen.jitted("eval_render", (elbo_samples, render_dims), lambda: program)
  sums = {"correct": 0, "tokens": 0, "exact": 0, "chunks": 0}
  bits_sum = 0.0
  for i, batch in enumerate(batches):
    rendered, bits = jax.device_get(fn(gen.params, _device_batch(gen, batch),
                                       jax.random.fold_in(key, i)))
    counts = roundtrip_counts(rendered, batch["tokens"], batch["token_mask"],
                              batch["concept_mask"])
    sums = {k: sums[k] + counts[k] for k in sums}
    bits_sum += float(bits) * counts["tokens"]
  return {"roundtrip_token_accuracy": _ratio(sums["correct"], sums["tokens"]),
          "roundtrip_exact_match": _ratio(sums["exact"], sums["chunks"]),
          "elbo_bits_per_token": _ratio(bits_sum, sums["tokens"])}


def concept_metrics(gen: gen_lib.Generator, batches, key, *, steps: int | None = None,
                    guidance: float | None = None, temperature: float = 1.0,
                    spread_samples: int = SPREAD_SAMPLES) -> dict:
  """Next-concept L2 / cosine and contrastive accuracy of sampled next concepts, and the
  sampler's spread ratio over `spread_samples` samples per position (spread_ratio; < 2:
  not measured).

  steps / guidance default to the run's concepts.sample_steps / guidance;
  temperature scales the sampler's starting noise, as in generation. A head fitted on a
  prefix of each concept (concepts.loss_dims) is measured on that prefix.
  """
  mods = gen_lib.build_modules(gen)
  enc, cm = mods["encoder"], mods["concept_model"]
  c = gen.config.concepts
  steps = steps or c.sample_steps
  guidance = c.guidance if guidance is None else guidance

  def program(params, batch, key):
    if "concepts" in batch:  # A concept-cache source: encoded offline.
      z_BxNxD = batch["concepts"]
    else:
      z_BxNxD = enc.apply({"params": params["encoder"]}, batch["tokens"], batch["token_mask"])
    seg_BxN = batch["segment_ids"]
    h_BxNxE = cm.apply({"params": params["concept_model"]}, z_BxNxD, seg_BxN,
                       method=ConceptModel.context)
    variables = {"params": params["concept_model"]}
    memory = cm.apply(variables, z_BxNxD, seg_BxN, method=cm.memory)
    sample = lambda h, key, memory: concept_model.sample_from_context(  # noqa: E731
        cm, variables, h, key, objective=c.objective, steps=steps, guidance=guidance,
        noise_scale=temperature, memory=memory)
    pred_BxNxD = sample(h_BxNxE, key, memory)
    samples_KxBxNxD = pred_BxNxD[None]
    more = spread_samples - 1
    if more > 0:  # Drawn together, from a key of their own, in repeat_memory's order.
      more_BKxNxD = sample(jnp.repeat(h_BxNxE, more, axis=0), jax.random.fold_in(key, 1),
                           concept_model.repeat_memory(memory, more))
      b = pred_BxNxD.shape[0]
      more_KxBxNxD = jnp.swapaxes(more_BKxNxD.reshape(b, more, *pred_BxNxD.shape[1:]), 0, 1)
      samples_KxBxNxD = jnp.concatenate([samples_KxBxNxD, more_KxBxNxD])
    target_BxNxD, valid_BxN = continuous.next_concept_targets(z_BxNxD, batch["concept_mask"],
                                                              seg_BxN)
    dims = c.get("loss_dims", 0)  # .get: configs saved before the field.
    return tuple(continuous.prefix(x, dims) for x in (pred_BxNxD, target_BxNxD)) + (
        valid_BxN, continuous.prefix(z_BxNxD, dims), continuous.prefix(samples_KxBxNxD, dims))

  fn = gen.jitted("eval_concepts", (steps, guidance, temperature, spread_samples),
                  lambda: program)
  sums = collections.Counter()
  for i, batch in enumerate(batches):
    pred, target, valid, z, samples = jax.device_get(
        fn(gen.params, _device_batch(gen, batch), jax.random.fold_in(key, i)))
    sums.update(next_concept_sums(pred, target, valid))
    con = contrastive_counts(pred, target, valid, z, batch["concept_mask"], batch["segment_ids"])
    sums.update({"hits": con["hits"], "contrastive": con["count"]})
    if spread_samples >= 2:
      spread = spread_sums(samples, target, valid)
      sums.update({"err2": spread["err2"], "var": spread["var"]})
  out = {"next_concept_l2": _ratio(sums["l2"], sums["count"]),
         "next_concept_cosine": _ratio(sums["cosine"], sums["count"]),
         "contrastive_accuracy": _ratio(sums["hits"], sums["contrastive"])}
  if spread_samples >= 2:
    out["spread_ratio"] = spread_ratio(sums["err2"], sums["var"], spread_samples)
  return out


def token_nll_sums(model, params, tokens_BxT, segment_ids_BxT, target_BxT):
  """(sum of next-token NLL in nats, count) over positions where target_BxT is True."""
  logits_BxTxV = model.apply({"params": params}, tokens_BxT, segment_ids_BxT)
  logp_BxSxV = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), -1)
  nll_BxS = -jnp.take_along_axis(logp_BxSxV, tokens_BxT[:, 1:, None], -1)[..., 0]
  target_BxS = target_BxT[:, 1:]
  return jnp.sum(jnp.where(target_BxS, nll_BxS, 0.0)), jnp.sum(target_BxS)


def flat_bits(gen: gen_lib.Generator, batches, key, elbo_samples: int = 4) -> dict:
  """bits_per_token: exact for ar, the ELBO for mdm; BOS is given, EOD is predicted."""
  model = gen_lib.build_modules(gen)["model"]

  def program(params, batch, key):
    tokens_BxT, seg_BxT = batch["tokens"], batch["segment_ids"]
    real_BxT = batch["token_mask"] & (tokens_BxT != BOS_ID)
    if gen.kind == "ar":
      nll, count = token_nll_sums(model, params["model"], tokens_BxT, seg_BxT, real_BxT)
      return nll / math.log(2.0), count
    logits_fn = lambda x: model.apply({"params": params["model"]}, x, seg_BxT)
    bits = masked.elbo_bits(logits_fn, tokens_BxT, real_BxT, MASK_ID, key,
                            num_samples=elbo_samples)
    count = jnp.sum(real_BxT)
    return bits * count, count

  fn = gen.jitted("eval_bits", (elbo_samples,), lambda: program)
  bits_sum, count = 0.0, 0
  for i, batch in enumerate(batches):
    bits, n = jax.device_get(fn(gen.params, _device_batch(gen, batch),
                                jax.random.fold_in(key, i)))
    bits_sum, count = bits_sum + float(bits), count + int(n)
  return {"bits_per_token": _ratio(bits_sum, count)}


def _device_batch(gen: gen_lib.Generator, batch: dict) -> dict:
  return {k: gen_lib.shard_batch(gen, np.asarray(v)) for k, v in batch.items()}


# ---------------------------------------------------------------- generation metrics


def judge_nll(judge: gen_lib.Generator, prompt_ids: Sequence[Sequence[int]],
              continuation_ids: Sequence[Sequence[int]], batch_size: int = 16):
  """(total NLL in nats, token count) of each continuation given its prompt, under the judge.

  prompt_ids start with BOS; ids are in the judge's tokenizer.
  """
  if judge.kind != "ar":
    raise gen_lib.GenerateError(f"the judge must be an ar run; {judge.workdir} is "
                                f"{judge.kind!r}")
  model = gen_lib.build_modules(judge)["model"]
  fn = judge.jitted("judge", (), lambda: lambda p, t, s, m: token_nll_sums(model, p["model"],
                                                                           t, s, m))
  rows = [(list(p), list(c)) for p, c in zip(prompt_ids, continuation_ids)]
  t = max(32, -(-max(len(p) + len(c) for p, c in rows) // 32) * 32)
  total, count = 0.0, 0
  for start in range(0, len(rows), batch_size):
    tokens_BxT = np.full((batch_size, t), PAD_ID, np.int32)
    target_BxT = np.zeros((batch_size, t), bool)
    for i, (p, c) in enumerate(rows[start:start + batch_size]):
      tokens_BxT[i, :len(p) + len(c)] = p + c
      target_BxT[i, len(p):len(p) + len(c)] = True
    seg_BxT = (tokens_BxT != PAD_ID).astype(np.int32)
    nll, n = jax.device_get(fn(judge.params, tokens_BxT, seg_BxT, target_BxT))
    total, count = total + float(nll), count + int(n)
  return total, count


def judge_perplexity(judge: gen_lib.Generator, prompts: Sequence[str],
                     continuations: Sequence[str], ended: Sequence[bool] | None = None) -> float:
  """exp(total NLL / tokens) of text continuations given text prompts, in the judge's tokenizer.

  ended: which continuations end their document; each of those is scored with the judge's
  end-of-document token after it, so ending where the text goes on costs, and an empty
  continuation counts as one token (without: it counts as none).
  """
  tok = judge.tokenizer
  prompt_ids = [segment.flat_document(segment.tokenize_document(tok, p))[:-1].tolist()
                for p in prompts]
  cont_ids = [segment.tokenize_document(tok, c).tokens_T.tolist() for c in continuations]
  if ended is not None:
    cont_ids = [ids + [EOD_ID] if end else ids for ids, end in zip(cont_ids, ended, strict=True)]
  nll, count = judge_nll(judge, prompt_ids, cont_ids)
  return math.exp(nll / count) if count else float("nan")


def generation_metrics(gen: gen_lib.Generator, pairs: Sequence[tuple[str, str]], *,
                       judge: gen_lib.Generator | None = None, synthetic_data: bool = False,
                       max_tokens: int = 64, seed: int = 0, **gen_kwargs) -> tuple[dict, list]:
  """Generation quality and speed on (prompt, true continuation) pairs -> (metrics, samples)."""
  prompts = [p for p, _ in pairs]
  if gen.kind == "concepts":
    gen_kwargs.setdefault("num_concepts", concept_budget(gen, max_tokens))
  run = lambda: gen_lib.generate(gen, prompts, max_tokens=max_tokens, seed=seed, **gen_kwargs)
  run()  # Compiles.
  start = time.perf_counter()
  samples = run()  # Same seed: the same samples, timed after compilation.
  wall = time.perf_counter() - start
  lengths = [len(s.token_ids) for s in samples]
  out = {"unigram_entropy": mean_unigram_entropy(s.token_ids for s in samples),
         "gen_ended": float(np.mean([s.ended for s in samples])),
         "gen_tokens": float(np.mean(lengths)), "gen_empty": float(np.mean(np.equal(lengths, 0))),
         "gen_tokens_per_sec": sum(lengths) / wall, "gen_latency_s": wall / len(samples)}
  if synthetic_data:
    out.update(coherence_scores(prompts, [s.text for s in samples]))
  if judge is not None:
    texts = [s.text for s in samples]
    out["gen_ppl"] = judge_perplexity(judge, prompts, texts)
    out["gen_ppl_end"] = judge_perplexity(judge, prompts, texts, [s.ended for s in samples])
  return out, samples


def concept_budget(gen: gen_lib.Generator, max_tokens: int) -> int:
  """Concepts a concepts run generates for max_tokens (a chunk holds concept_len tokens)."""
  return max(1, max_tokens // gen.chunk_config.data.concept_len)


def roundtrip_metrics(gen: gen_lib.Generator, pairs: Sequence[tuple[str, str]], *,
                      max_tokens: int, synthetic_data: bool = True,
                      judge: gen_lib.Generator | None = None, by_kind: bool = False,
                      render_dims: int = 0) -> dict:
  """The true continuations' first concept_budget sentences, rendered from their own
  concepts (a render or concepts run; the first render_dims dimensions of each, 0: all),
  scored as generations are: the render stage's bound on generation.
  roundtrip_consistent on synthetic data, roundtrip_gen_ppl with a judge; by_kind: also
  roundtrip_by_kind, its coherence_by_kind (not a flat metric)."""
  prompts = [p for p, _ in pairs]
  budget = concept_budget(gen, max_tokens)
  truth = [" ".join(segment.split_sentences(c)[:budget]) for _, c in pairs]
  # A one-sentence document leaves its continuation empty: nothing to render.
  kept = [i for i, t in enumerate(truth) if t.strip()]
  rendered = [""] * len(truth)
  samples = gen_lib.roundtrip(gen, [truth[i] for i in kept], contexts=[prompts[i] for i in kept],
                              render_dims=render_dims) if kept else []
  for i, s in zip(kept, samples):
    rendered[i] = s.text
  out = {}
  if synthetic_data:
    out["roundtrip_consistent"] = coherence_scores(prompts, rendered)["coherence_consistent"]
    if by_kind:
      out["roundtrip_by_kind"] = coherence_by_kind(prompts, rendered)
  if judge is not None:
    out["roundtrip_gen_ppl"] = judge_perplexity(judge, prompts, rendered)
  return out


# ---------------------------------------------------------------- the entry


def evaluate(workdir: str, *, overrides: dict | None = None, judge_workdir: str | None = None,
             num_prompts: int = 64, max_batches: int = 8, batch_size: int = 32,
             max_tokens: int = 64, seed: int = 0, write: bool = True, gen=None,
             judge=None, by_kind: bool = False, prompts: str = "eval", **gen_kwargs) -> dict:
  """All metrics of one run (see the module docstring); writes WORKDIR/eval.json.

  prompts: the split generation is prompted from ("dev" to choose sampling settings;
  then WORKDIR/eval_dev.json). The likelihood metrics read the eval split either way.

  by_kind (built-in corpus): the result also holds, for render and concepts runs,
  roundtrip_by_kind and, for every run that generates (concepts, ar, mdm), by_kind
  (coherence_by_kind of the same rendered truths and samples the metrics score); they
  are not flat numbers and are not written to eval.json.
  """
  check_prompt_split(prompts, gen_lib.GenerateError)  # Before a checkpoint is read.
  gen = gen or gen_lib.load(workdir)
  if judge is None and judge_workdir:
    judge = gen_lib.load(judge_workdir, mesh=gen.mesh)
  config = eval_config(gen, overrides)
  if by_kind and config.data.source != "synthetic":
    raise gen_lib.GenerateError(f"{workdir} was trained on {config.data.source}: sentence "
                                "kinds exist on the built-in corpus (data.source=synthetic)")
  key = jax.random.key(seed)
  b = gen_lib.padded_batch_size(gen, batch_size)
  view = "concepts" if gen.kind in ("render", "concepts") else "flat"
  batches = eval_batches(config, gen.tokenizer, view, b, max_batches)
  # The round trip renders what generation does: the concepts run's concepts.render_dims.
  render_dims = (gen_lib.checked_render_dims(gen, gen_kwargs.get("render_dims"))
                 if gen.kind in ("render", "concepts") else 0)
  if gen.kind == "render":
    metrics = render_metrics(gen, batches, key, render_dims=render_dims)
  elif gen.kind == "concepts":
    metrics = concept_metrics(gen, batches, key)
  else:
    metrics = flat_bits(gen, batches, key)
  synthetic_data = config.data.source == "synthetic"
  pairs = eval_prompts(config, num_prompts, prompts) if num_prompts > 0 else []
  kinds = {}
  if pairs and (synthetic_data or judge) and gen.kind in ("render", "concepts"):
    metrics.update(roundtrip_metrics(gen, pairs, max_tokens=max_tokens,
                                     synthetic_data=synthetic_data, judge=judge,
                                     by_kind=by_kind, render_dims=render_dims))
    if by_kind:
      kinds["roundtrip_by_kind"] = metrics.pop("roundtrip_by_kind")
  if pairs and gen.kind != "render":
    gen_out, samples = generation_metrics(gen, pairs, judge=judge,
                                          synthetic_data=synthetic_data,
                                          max_tokens=max_tokens, seed=seed, **gen_kwargs)
    metrics.update(gen_out)
    if by_kind:
      kinds["by_kind"] = coherence_by_kind([p for p, _ in pairs], [x.text for x in samples])
  metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
  if write:
    with open(os.path.join(workdir, eval_file(prompts)), "w") as f:
      json.dump(metrics, f, indent=2, sort_keys=True)
  return {**metrics, **kinds}


def load_metrics(workdir: str) -> list[dict]:
  """The training log WORKDIR/metrics.jsonl as a list of {"step": ..., name: value} records."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} a training workdir?")
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue  # A line cut by a kill mid-write.
  return records


def read_or_evaluate(workdir: str, *, recompute: bool = False, prompts: str = "eval",
                     **kwargs) -> dict:
  """WORKDIR/eval.json (eval_dev.json for prompts="dev") if present (and not `recompute`),
  else evaluate(workdir)."""
  path = os.path.join(workdir, eval_file(prompts))
  if os.path.isfile(path) and not recompute:
    with open(path) as f:
      return json.load(f)
  return evaluate(workdir, prompts=prompts, **kwargs)


def format_table(results: dict[str, dict]) -> str:
  """Markdown table: one row per metric, one column per run; '-' where a run has no value."""
  names = [m for m in ORDER if any(m in r for r in results.values())]
  names += sorted({m for r in results.values() for m in r} - set(names))
  header = ["metric", *results]
  rows = [[m, *(_fmt(r.get(m)) for r in results.values())] for m in names]
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(header), sep, *map(line, rows)])


def _fmt(value) -> str:
  if value is None:
    return "-"
  return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
