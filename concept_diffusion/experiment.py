"""Experiment grids over the concept pipeline, against ar / mdm baselines at equal FLOPs.

  from concept_diffusion import experiment
  grid = [experiment.Variant("default"),
          experiment.Variant("z_noise=0.5", "render z noise", render={"render.z_noise": 0.5})]
  table = experiment.run_grid(grid, "runs/grid", source="synthetic")

Each Variant is the tiny pipeline (configs/render.py:tiny, then configs/concepts.py:tiny,
optionally a render fine-tune on generated concepts) with some fields changed, and
sampling options for generation. Runs are shared between variants that train the
same thing (a workdir per distinct set of overrides), and everything resumes: a
finished run or a finished evaluation is read back, not redone. A reused run whose
saved config differs from the plan (a preset edited since) is an error, and a row
whose definition changed is evaluated again.

The baselines: `ar` and `mdm` (configs/ar.py:tiny, configs/mdm.py:tiny) trained on the
same source for as many steps as give them the training FLOPs of the first
variant's pipeline (render + concepts, the frozen encoder's forward included). A
second ar run with another seed judges the gen-PPL of every row, the baselines'
too, so no row is scored by its own model. The `reference` row scores the held-out
continuations themselves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from concept_diffusion import config as config_lib
from concept_diffusion.models import sizes

COLUMNS = (  # (results key, table heading)
    ("roundtrip_token_accuracy", "round-trip acc"),
    ("roundtrip_consistent", "round-trip consistent"),
    ("roundtrip_gen_ppl", "round-trip gen-PPL"),
    ("next_concept_cosine", "next cos"),
    ("contrastive_accuracy", "contrastive acc"),
    ("spread_ratio", "spread ratio"),
    ("gen_ppl", "gen-PPL"),
    ("gen_ppl_end", "gen-PPL with the end"),
    ("gen_tokens", "tokens"),
    ("unigram_entropy", "unigram H (bits)"),
    ("coherence_well_formed", "well-formed"),
    ("coherence_consistent", "consistent"),
    ("gen_tokens_per_sec", "gen tok/s"),
    ("train_pflops", "train PFLOPs"),
)
DONE_FILE = "grid_done.json"
# Settings that only add rows: changing them re-evaluates no other row.
ROW_FREE = ("ar_temperatures", "ar_seeds", "ar_fill", "ar_learning_rates", "baselines",
            "checkpoint_every")
# Generation defaults a run's config carries that do not change training: a finished run
# is reused when only these change, and the grid samples with the planned values.
SAMPLING_FIELDS = {"concepts.temperature": "temperature", "concepts.reencode": "reencode",
                   "concepts.sample_steps": "concept_steps", "concepts.guidance": "guidance",
                   "concepts.num_candidates": "num_candidates", "concepts.end_noise": "end_noise",
                   "concepts.render_dims": "render_dims",
                   "concepts.end_temperature": "end_temperature",
                   "concepts.candidate_rule": "candidate_rule",
                   "concepts.draft_steps": "draft_steps"}
# Sampling fields newer than most rows, with the value that turns each off: left out of a
# row's options when off, so every earlier row's result file keeps its name.
NEWER_SAMPLING_OFF = {"end_noise": 0.0, "render_dims": 0, "end_temperature": 0.0,
                      "candidate_rule": "consensus", "draft_steps": 0}
# Fields that name another run's workdir (at any depth of a saved config).
RUN_PATH_FIELDS = ("render_workdir", "generated_from")


class ExperimentError(ValueError):
  """A grid that cannot run as planned (e.g. a reused workdir trained differently)."""


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row: field overrides per training run, and generation options.

  render / concepts / finetune: {"section.field": value} applied to the tiny presets;
  finetune=None trains no fine-tune, {} one with the defaults of render.generated_*.
  sample: generate() options (concept_steps, guidance, temperature, reencode,
  num_candidates, render_steps);
  the ones not given are the planned concepts config's (SAMPLING_FIELDS).
  """
  name: str
  axis: str = "reference point"
  render: dict = dataclasses.field(default_factory=dict)
  concepts: dict = dataclasses.field(default_factory=dict)
  finetune: dict | None = None
  sample: dict = dataclasses.field(default_factory=dict)
  # Give the concepts run as many steps as bring the row to the first row's training
  # FLOPs (equal_flops_steps), whatever the render / concepts overrides cost.
  equal_flops: bool = False


@dataclasses.dataclass
class Settings:
  """What is shared by every row of one grid."""
  source: str = "synthetic"
  render_preset: str = "configs/render.py:tiny"
  concepts_preset: str = "configs/concepts.py:tiny"
  ar_preset: str = "configs/ar.py:tiny"
  mdm_preset: str = "configs/mdm.py:tiny"
  finetune_steps: int = 300  # Steps of the generated-concept render fine-tune.
  steps_scale: float = 1.0  # Multiplies every run's num_steps (tests use a tiny value).
  num_prompts: int = 256  # ~770 sentences: consistent-rate standard error ~0.018.
  # Held-out prompts from the eval split (what the tables report) or the dev split (for
  # choosing sampling settings on prompts the reported rows never see; data.sources).
  prompts: str = "eval"
  max_batches: int = 8
  batch_size: int = 32
  max_tokens: int = 64
  judge_seed: int = 1
  # The ar baseline also sampled at these token temperatures (rows ar_tempX), so a
  # mode-seeking concept sampler is compared with a mode-seeking AR one.
  ar_temperatures: tuple = (0.5,)
  # The ar baseline also trained from these seeds (train.seed and data.seed; rows
  # ar_seedS), so the baseline's spread between runs is measured as a row's is.
  ar_seeds: tuple = ()
  # Also an ar baseline trained on filled rows (data.fill_examples; row ar_fill): the
  # same change as a row that fills its own batches, so the baseline is not left with
  # the padding that row gave up.
  ar_fill: bool = False
  # The ar baseline also trained at these learning rates (rows ar_lrX, seed 0): a
  # concepts-run rate tuned on this grid is compared with a baseline given the same try.
  ar_learning_rates: tuple = ()
  baselines: tuple = ("ar", "mdm")  # Flat baselines trained and shown.
  # Train the judge and score gen-PPL. False: every other column, without the ~22 CPU
  # minutes of the judge's run (rows so made are evaluated again once it is on).
  judge: bool = True
  seed: int = 0
  # Every run checkpoints this often (and at its end), so a killed grid resumes mid-run.
  checkpoint_every: int = 500
  common: dict = dataclasses.field(default_factory=dict)  # Overrides of every run (tests).


# ---------------------------------------------------------------- configs


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets {"section.field": value}; an unknown field is a ConfigError naming it."""
  for field, value in overrides.items():
    parent = config
    *path, last = field.split(".")
    for part in path:
      if part not in parent:
        raise config_lib.ConfigError(f"override {field}: no section {part!r}")
      parent = parent[part]
    if last not in parent:
      raise config_lib.ConfigError(f"override {field}: no field {last!r}")
    parent[last] = type(parent[last])(value) if isinstance(parent[last], (int, float)) and \
        not isinstance(parent[last], bool) else value
  return config


def _preset(spec: str, settings: Settings, overrides: dict) -> ml_collections.ConfigDict:
  config = config_lib.load_config(spec)
  config.data.source = settings.source
  apply_overrides(config, {**settings.common, **overrides})
  config.train.num_steps = max(1, round(config.train.num_steps * settings.steps_scale))
  config.train.warmup_steps = min(config.train.warmup_steps, config.train.num_steps // 2)
  config.checkpoint.every_steps = min(settings.checkpoint_every, config.train.num_steps)
  return config


def _run_name(kind: str, *parts) -> str:
  """kind-<hash of what defines the run>: one workdir per distinct training."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return f"{kind}-{hashlib.sha1(blob).hexdigest()[:10]}"


@dataclasses.dataclass
class Plan:
  """The runs of one variant: (workdir, config) per stage, in training order."""
  render: tuple[str, Any]
  concepts: tuple[str, Any]
  finetune: tuple[str, Any] | None


def plan_variant(v: Variant, workdir: str, settings: Settings) -> Plan:
  """Workdirs and configs of a variant's runs (shared with other variants where equal)."""
  key = (settings.source, settings.steps_scale, settings.common)
  r_name = _run_name("render", key, v.render)
  render_dir = os.path.join(workdir, r_name)
  render = _preset(settings.render_preset, settings, v.render)
  c_name = _run_name("concepts", key, v.render, v.concepts)
  concepts_dir = os.path.join(workdir, c_name)
  concepts = _preset(settings.concepts_preset, settings, v.concepts)
  concepts.concepts.render_workdir = render_dir
  finetune = None
  if v.finetune is not None:
    # The fine-tune teacher-forces the concept model over whole documents: unfilled rows.
    ft = _preset(settings.render_preset, settings, {"render.generated_from": concepts_dir,
                                                     "data.fill_examples": False,
                                                     "train.num_steps": settings.finetune_steps,
                                                     **v.finetune})
    ft_dir = os.path.join(workdir, _run_name("finetune", key, v.render, v.concepts, v.finetune))
    finetune = (ft_dir, ft)
  return Plan((render_dir, render), (concepts_dir, concepts), finetune)


# ---------------------------------------------------------------- FLOPs


def training_flops(config: ml_collections.ConfigDict, vocab_size: int,
                   render_config: ml_collections.ConfigDict | None = None) -> float:
  """Training FLOPs of one run: per-position FLOPs x positions x batch x steps.

  concepts runs add the frozen encoder's forward over every chunk token
  (`render_config` sizes it) unless they read a concept cache (concepts.cache_examples:
  the encoder's pass over the cache, encoding_flops, is counted once instead); a
  generated-concept fine-tune counts as a render run plus the concepts it samples
  (stages.generated_flops_per_example; its config resolved).
  """
  t, d = config.train, config.data
  examples = t.batch_size * t.num_steps
  if config.stage == "render":  # A generated-concept fine-tune also samples its concepts.
    from concept_diffusion.train import stages
    return (sizes.flops_per_token(config, "render", vocab_size) * d.num_concepts *
            d.concept_len + stages.generated_flops_per_example(config, vocab_size)) * examples
  if config.stage == "concepts":
    enc = render_config or config
    tokens = d.num_concepts * enc.data.concept_len
    per_example = sizes.flops_per_token(config, "concepts", vocab_size) * d.num_concepts
    own_cache = config_lib.own_cache_examples(config)
    if not (own_cache or d.source.startswith("concepts:")):  # The encoder runs every step.
      per_example += sizes.encoder_forward_flops_per_token(enc, vocab_size) * tokens
    if config.concepts.render_weight > 0:  # Renderer in the loop (counted as a render step).
      per_example += sizes.flops_per_token(enc, "render", vocab_size) * \
          config.concepts.render_positions * enc.data.concept_len
    return per_example * examples + encoding_flops(enc, vocab_size, own_cache, d.num_concepts)
  return sizes.flops_per_token(config, config.stage, vocab_size) * d.seq_len * examples


def encoding_flops(render_config: ml_collections.ConfigDict, vocab_size: int,
                   num_examples: int, num_concepts: int) -> float:
  """FLOPs of encoding a concept cache: the encoder's forward over every chunk token."""
  tokens = num_examples * num_concepts * render_config.data.concept_len
  return sizes.encoder_forward_flops_per_token(render_config, vocab_size) * tokens


def matched_steps(config: ml_collections.ConfigDict, vocab_size: int, budget: float) -> int:
  """num_steps that gives a flat baseline `budget` training FLOPs."""
  per_step = training_flops(config, vocab_size) / config.train.num_steps
  return max(1, round(budget / per_step))


def _variant_flops(plan: Plan, vocab_size: int) -> float:
  """Training FLOPs of a variant's runs, configs resolved as the trainer does (from the
  planned render config: the runs need not exist)."""
  from concept_diffusion.train import stages
  render = plan.render[1]
  concepts = stages.inherit_render(ml_collections.ConfigDict(plan.concepts[1].to_dict()),
                                   ml_collections.ConfigDict(render.to_dict()))
  total = training_flops(render, vocab_size) + training_flops(concepts, vocab_size, render)
  if plan.finetune is not None:  # Resolved from the plan: its concepts run may not exist yet.
    finetune = ml_collections.ConfigDict(plan.finetune[1].to_dict())
    total += training_flops(stages.inherit_finetune(finetune, concepts, render, plan.render[0]),
                            vocab_size)
  return total


def equal_flops_steps(plan: Plan, vocab_size: int, budget: float) -> int:
  """Concepts steps that bring a variant's training FLOPs (_variant_flops) to `budget`.

  Its FLOPs are affine in the concepts run's steps (a concept cache is encoded once),
  so two evaluations give the line; an error if the other runs alone exceed the budget.
  """
  def at(steps):
    concepts = ml_collections.ConfigDict(plan.concepts[1].to_dict())
    concepts.train.num_steps = steps
    return _variant_flops(dataclasses.replace(plan, concepts=(plan.concepts[0], concepts)),
                          vocab_size)
  per_step = at(2) - at(1)
  fixed = at(1) - per_step
  steps = round((budget - fixed) / per_step)
  if steps < 1:
    raise ExperimentError(f"{plan.concepts[0]}: its other runs cost {fixed / 1e15:.4f} "
                          f"PFLOPs, over the {budget / 1e15:.4f} of equal FLOPs")
  return steps


def match_flops(v: Variant, workdir: str, settings: Settings, vocab_size: int,
                budget: float) -> Variant:
  """The variant with its concepts steps set for equal FLOPs (if v.equal_flops)."""
  if not v.equal_flops:
    return v
  steps = equal_flops_steps(plan_variant(v, workdir, settings), vocab_size, budget)
  # Overrides are scaled by settings.steps_scale (<= 1) when planned: this comes back exact.
  return dataclasses.replace(v, concepts={**v.concepts,
                                          "train.num_steps": round(steps / settings.steps_scale)})


# ---------------------------------------------------------------- training


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _differences(config: ml_collections.ConfigDict, workdir: str, strict: bool = False):
  """[(field, trained, planned)] where `workdir`'s saved config differs from `config`.

  Fields that only steer generation (SAMPLING_FIELDS) and how often it checkpoints are
  not compared, nor the paths of the runs it builds on (RUN_PATH_FIELDS): those runs
  are compared by their saved configs, which resolve_config copies in, so a run still
  matches after adopt_runs moved its render run to a new name. A field the saved
  config lacks (added since) is skipped, or, if strict, compared as its base_config
  value: what a run trained before the field ran as. Strict compares so a field the
  plan lacks too, as a concepts run's copy of a render run trained before the field
  (concepts.render_config) does: two concepts runs over render runs that differ only
  in a newer field are told apart.
  """
  from concept_diffusion.train import stages
  resolved = stages.resolve_config(ml_collections.ConfigDict(config.to_dict()))
  planned = _flat(json.loads(json.dumps(resolved.to_dict(), default=str)))
  with open(os.path.join(workdir, "config.json")) as f:
    saved = _flat(json.load(f))
  if strict:
    base = _flat(json.loads(json.dumps(config_lib.base_config().to_dict(), default=str)))
    copied = "concepts.render_config."  # A render run's config, copied into a concepts run's.
    default = lambda k: base.get(k[len(copied):] if k.startswith(copied) else k, "(missing)")
    saved, planned = ({**{k: default(k) for k in planned}, **saved},
                      {**{k: default(k) for k in saved}, **planned})
  return [(k, saved[k], planned[k]) for k in sorted(planned.keys() & saved.keys())
          if k not in SAMPLING_FIELDS and not k.startswith("checkpoint.")
          and k.rsplit(".", 1)[-1] not in RUN_PATH_FIELDS and planned[k] != saved[k]]


def check_reuse(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises if `workdir` holds a run trained with other settings than `config`.

  Run names hash the overrides, not the presets: after a preset edit, the same name
  would silently reuse a run trained the old way (`adopt_runs` moves runs to the names
  a changed grid plans). Fields that only steer generation (SAMPLING_FIELDS), how often
  it checkpoints, and fields the saved config lacks (added since) may differ.
  """
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    return
  differ = _differences(config, workdir)
  if differ:
    shown = ", ".join(f"{k}: trained {a!r}, planned {b!r}" for k, a, b in differ[:5])
    raise ExperimentError(f"{workdir} was trained with other settings than this grid plans "
                          f"({shown}); a preset changed since. Delete that run, use "
                          "another --workdir, or move runs to their new names (--adopt)")


def train_once(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains (or resumes) a run unless it already finished; marks it finished."""
  from concept_diffusion import train as train_lib
  check_reuse(config, workdir)
  if _finished(workdir):
    return
  start = time.time()
  print(f"-- training {os.path.basename(workdir)} ({config.stage}, "
        f"{config.train.num_steps} steps)", flush=True)
  summary = train_lib.train(config, workdir)
  from concept_diffusion.train import checkpoint as ckpt_lib
  step, _ = ckpt_lib.latest_meta(workdir)
  if step < config.train.num_steps:  # Preempted (SIGTERM saves and returns): not done.
    raise ExperimentError(f"{workdir} stopped at step {step} of {config.train.num_steps}; "
                          "re-run the grid to resume it")
  with open(os.path.join(workdir, DONE_FILE), "w") as f:
    json.dump({"seconds": time.time() - start, "last": summary}, f, default=float)


def adopt_runs(grid: Sequence[Variant], workdir: str, settings: Settings | None = None,
               **kwargs) -> list[tuple[str, str]]:
  """Moves finished runs to the names a changed grid plans for them -> [(from, to)].

  Run names hash overrides, so a new default (a preset edit) plans the old default's
  name for itself, and the old default, now a row of overrides, a name nothing holds.
  Each planned run whose name holds no matching run takes the finished run of the same
  kind whose saved config matches its plan (strictly: a field the run predates counts
  as its base_config value); a run under a planned name that does not match is moved
  aside first (NAME.parked-I), so another row can take it. Nothing is trained or
  deleted. An equal-FLOPs row's render run is planned as any other; its concepts run once
  the render run is in place (a second pass plans those whose render run the first moved).
  A planned run that cannot be resolved (a fine-tune whose concepts run's checkpoint names
  a render run moved away) is left to train.
  """
  settings = settings or Settings(**kwargs)
  moves = []
  # The budget is the first row's, read before anything moves (its render run may), from
  # its planned configs: on a source where today's default never ran it has no runs.
  first = plan_variant(grid[0], workdir, settings)
  vocab = budget = None
  if any(v.equal_flops for v in grid):
    vocab = _grid_vocab(first, workdir)
    budget = None if vocab is None else _variant_flops(first, vocab)
  # An equal-FLOPs row's concepts run is planned once its render run is in place (the
  # steps follow from it): a second pass adopts those whose render run the first moved.
  for _ in range(2):
    done = _adopt_pass(grid, workdir, settings, vocab, budget)
    moves += done
    if not done:
      break
  return moves


def _adopt_pass(grid: Sequence[Variant], workdir: str, settings: Settings, vocab, budget
                ) -> list:
  """One pass of adopt_runs over the runs it can plan now -> [(from, to)]."""
  plans = [plan_variant(v, workdir, settings) for v in grid]
  by_stage = ({}, {}, {})  # name -> config per stage: render runs first (the others name them).
  for v, plan in zip(grid, plans):
    if v.equal_flops:
      if budget is None or not _finished(plan.render[0]):
        by_stage[0].setdefault(*plan.render)  # Its render run needs no FLOPs to plan.
        continue
      plan = plan_variant(match_flops(v, workdir, settings, vocab, budget), workdir, settings)
    for stage, run in zip(by_stage, (plan.render, plan.concepts, plan.finetune)):
      if run is not None:
        stage.setdefault(run[0], run[1])
  planned = {k: v for stage in by_stage for k, v in stage.items()}
  moves = []
  for run_dir, config in planned.items():
    if not _source_finished(config):  # Its config cannot be resolved: nothing to match.
      continue
    if _finished(run_dir) and _matches(config, run_dir):
      continue
    kind = os.path.basename(run_dir).split("-")[0] + "-"
    # (A planned run whose render run has just moved away cannot be compared yet.)
    taken = {d for d, c in planned.items() if d != run_dir and _finished(d)
             and _source_finished(c) and _matches(c, d)}
    found = next((d for d in sorted(os.listdir(workdir)) if d.startswith(kind)
                  and os.path.join(workdir, d) not in taken | {run_dir}
                  and _finished(os.path.join(workdir, d))
                  and _matches(config, os.path.join(workdir, d))), None)
    if found is None:
      continue
    if os.path.exists(run_dir):
      parked = next(f"{run_dir}.parked-{i}" for i in range(1000)
                    if not os.path.exists(f"{run_dir}.parked-{i}"))
      os.rename(run_dir, parked)
      moves.append((run_dir, parked))
    os.rename(os.path.join(workdir, found), run_dir)
    moves.append((os.path.join(workdir, found), run_dir))
  return moves


def _matches(config: ml_collections.ConfigDict, run_dir: str) -> bool:
  """Whether `run_dir` holds the run `config` plans (strictly); False where the plan cannot
  be resolved: a fine-tune whose concepts run names a render run moved away (the path
  saved in its checkpoint is where the render run was trained)."""
  try:
    return not _differences(config, run_dir, strict=True)
  except config_lib.ConfigError:
    return False


def _finished(run_dir: str) -> bool:
  return os.path.isfile(os.path.join(run_dir, DONE_FILE))


def _source_finished(config: ml_collections.ConfigDict) -> bool:
  """Whether the run that `config` builds on (its render or concepts run) is finished."""
  source = (config.concepts.render_workdir if config.stage == "concepts"
            else config.render.get("generated_from", ""))
  return not source or _finished(source)


# ---------------------------------------------------------------- evaluation


def sampling(v: Variant, plan: Plan) -> dict:
  """generate() options of a row: the planned config's defaults, then the row's own."""
  planned = _flat(plan.concepts[1].to_dict())
  out = {arg: planned[field] for field, arg in SAMPLING_FIELDS.items()}
  out = {k: x for k, x in out.items() if k not in NEWER_SAMPLING_OFF or x != NEWER_SAMPLING_OFF[k]}
  return {**out, **v.sample}


def _evaluate_concepts(v: Variant, plan: Plan, judge, settings: Settings) -> dict:
  from concept_diffusion import evaluation, generate
  render_dir = plan.finetune[0] if plan.finetune else plan.render[0]
  gen = generate.load(plan.concepts[0], render_workdir=render_dir)
  render_gen = generate.load(render_dir, mesh=gen.mesh)
  config = evaluation.eval_config(gen)
  key = jax.random.key(settings.seed)
  b = generate.padded_batch_size(gen, settings.batch_size)
  batches = lambda: evaluation.eval_batches(config, gen.tokenizer, "concepts", b,
                                            settings.max_batches)
  s = sampling(v, plan)  # Concept metrics sample as generation does, the bound renders so.
  render_dims = s.get("render_dims", 0)
  out = evaluation.render_metrics(render_gen, batches(), key, render_dims=render_dims)
  out.update(evaluation.concept_metrics(gen, batches(), key, steps=s["concept_steps"],
                                        guidance=s["guidance"], temperature=s["temperature"]))
  pairs = evaluation.eval_prompts(config, settings.num_prompts, settings.prompts)
  synthetic_data = settings.source == "synthetic"
  if synthetic_data or judge:
    out.update(evaluation.roundtrip_metrics(render_gen, pairs, max_tokens=settings.max_tokens,
                                            synthetic_data=synthetic_data, judge=judge,
                                            by_kind=synthetic_data, render_dims=render_dims))
  gen_out, samples = evaluation.generation_metrics(
      gen, pairs, judge=judge, synthetic_data=synthetic_data,
      max_tokens=settings.max_tokens, seed=settings.seed, **s)
  out.update(gen_out)
  if synthetic_data:  # Where the row loses consistency (README "Results").
    out["by_kind"] = evaluation.coherence_by_kind([p for p, _ in pairs],
                                                  [x.text for x in samples])
  out["sample"] = f"{samples[0].prompt[-80:]} => {samples[0].text[:160]}"
  return out


def _evaluate_flat(workdir: str, judge, settings: Settings, **gen_kwargs) -> dict:
  from concept_diffusion import evaluation, generate
  gen = generate.load(workdir, mesh=judge.mesh if judge else None)
  pairs = evaluation.eval_prompts(evaluation.eval_config(gen), settings.num_prompts,
                                   settings.prompts)
  out, samples = evaluation.generation_metrics(
      gen, pairs, judge=judge, synthetic_data=settings.source == "synthetic",
      max_tokens=settings.max_tokens, seed=settings.seed, **gen_kwargs)
  if settings.source == "synthetic":  # The kinds a concepts row is compared on.
    out["by_kind"] = evaluation.coherence_by_kind([p for p, _ in pairs],
                                                  [x.text for x in samples])
  out["sample"] = f"{samples[0].prompt[-80:]} => {samples[0].text[:160]}"
  return out


def _evaluate_reference(judge, settings: Settings, ar_workdir: str) -> dict:
  """The held-out continuations themselves, scored like generated ones (gen-PPL only
  with a judge; else tokenized as the ar run at `ar_workdir` reads them)."""
  from concept_diffusion import evaluation, generate
  gen = judge or generate.load(ar_workdir)
  pairs = evaluation.eval_prompts(evaluation.eval_config(gen), settings.num_prompts,
                                   settings.prompts)
  prompts, truth = [p for p, _ in pairs], [c for _, c in pairs]
  out = {}
  if judge:  # Each truth is the rest of its document: all of them end it.
    out["gen_ppl"] = evaluation.judge_perplexity(judge, prompts, truth)
    out["gen_ppl_end"] = evaluation.judge_perplexity(judge, prompts, truth, [True] * len(truth))
  ids = [gen.tokenizer.encode(c) for c in truth]
  out["gen_tokens"] = float(np.mean([len(x) for x in ids]))
  out["unigram_entropy"] = evaluation.mean_unigram_entropy(ids)
  if settings.source == "synthetic":
    out.update(evaluation.coherence_scores(prompts, truth))
  return out


def _saved(run_dir: str) -> str:
  """A short hash of the config a run was trained with (its config.json)."""
  with open(os.path.join(run_dir, "config.json"), "rb") as f:
    return hashlib.sha1(f.read()).hexdigest()[:10]


def _cached(path: str, compute) -> dict:
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  out = compute()
  out = {k: (float(x) if isinstance(x, (int, float)) else x) for k, x in out.items()}
  with open(path, "w") as f:
    json.dump(out, f, indent=2, sort_keys=True)
  return out


# ---------------------------------------------------------------- the grid


def run_grid(grid: Sequence[Variant], workdir: str, settings: Settings | None = None,
             **kwargs) -> dict:
  """Trains what is missing and evaluates every row; writes results.json and results.md.

  Order: the first variant, the baselines (they need its FLOPs), then the other
  variants one by one; the tables are rewritten after every row, so a long grid
  shows its results as they come.
  """
  settings = settings or Settings(**kwargs)
  unknown = set(settings.baselines) - {"ar", "mdm"}
  if unknown:  # Before anything trains.
    raise ExperimentError(f"baselines {sorted(unknown)}: choose from ar, mdm")
  own_lr = (_preset(settings.ar_preset, settings, {}).train.learning_rate
            if settings.ar_learning_rates else None)
  if own_lr in settings.ar_learning_rates:  # It would train row ar again under a new name.
    raise ExperimentError(f"ar_learning_rates={own_lr:g} is the ar preset's own rate: "
                          "row ar is that run")
  from concept_diffusion import evaluation, generate
  evaluation.check_prompt_split(settings.prompts, ExperimentError)
  os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
  plans = [plan_variant(v, workdir, settings) for v in grid]
  result = {"source": settings.source, "settings": dataclasses.asdict(settings), "rows": {},
            "variants": {v.name: dataclasses.asdict(v) for v in grid}}

  def train_variant(plan):
    train_once(plan.render[1], plan.render[0])
    train_once(plan.concepts[1], plan.concepts[0])
    if plan.finetune is not None:
      train_once(plan.finetune[1], plan.finetune[0])

  def add_row(name, axis, spec, runs, compute):
    # The file name hashes all that defines the row, the saved configs of the runs it
    # reads included: a changed row, or one whose run was retrained, is evaluated anew.
    runs = [*runs, baselines["judge"][0]] if settings.judge else list(runs)
    shared = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ROW_FREE}
    if settings.prompts == "eval":  # Rows measured before the dev split keep their files.
      del shared["prompts"]
    spec = (name, axis, spec, shared, runs, [_saved(r) for r in runs])
    path = os.path.join(workdir, "results", f"{name}-{_run_name('row', *spec)}.json")
    result["rows"][name] = {**_cached(path, compute), "axis": axis}
    _write_tables(result, workdir)

  train_variant(plans[0])
  vocab = _vocab_size(plans[0].render[0])
  budget = _variant_flops(plans[0], vocab)
  result["budget_pflops"] = budget / 1e15
  baselines = {}
  # name -> (run kind, preset, seed overrides), in training (and row) order.
  specs = {"judge": ("judge", settings.ar_preset, {"train.seed": settings.judge_seed})
           } if settings.judge else {}
  presets = {"ar": settings.ar_preset, "mdm": settings.mdm_preset}
  specs.update({name: (name, presets[name], {"train.seed": settings.seed})
                for name in settings.baselines})
  if "ar" in settings.baselines:
    specs.update({f"ar_seed{s}": ("ar", settings.ar_preset, {"train.seed": s, "data.seed": s})
                  for s in settings.ar_seeds})
    if settings.ar_fill:
      specs["ar_fill"] = ("ar", settings.ar_preset, {"train.seed": settings.seed,
                                                     "data.fill_examples": True})
    specs.update({f"ar_lr{lr:g}": ("ar", settings.ar_preset,
                                   {"train.seed": settings.seed, "train.learning_rate": lr})
                  for lr in settings.ar_learning_rates})
  for name, (kind, spec, seeds) in specs.items():
    config = _preset(spec, settings, seeds)
    config.train.num_steps = matched_steps(config, vocab, budget)
    config.checkpoint.every_steps = min(settings.checkpoint_every, config.train.num_steps)
    fill = ("fill",) if seeds.get("data.fill_examples") else ()  # Older names stay.
    lr = (("lr", seeds["train.learning_rate"]),) if "train.learning_rate" in seeds else ()
    run_dir = os.path.join(workdir, _run_name(kind, settings.source, settings.steps_scale,
                                              settings.common, config.train.num_steps,
                                              seeds["train.seed"], *fill, *lr))
    train_once(config, run_dir)
    baselines[name] = (run_dir, config)

  judge = generate.load(baselines["judge"][0]) if settings.judge else None
  for i, (v, plan) in enumerate(zip(grid, plans)):
    if i:
      if v.equal_flops:  # Its steps depend on its render run's config: train that first.
        train_once(plan.render[1], plan.render[0])
        v = match_flops(v, workdir, settings, vocab, budget)
        plan = plan_variant(v, workdir, settings)
        result["variants"][v.name] = dataclasses.asdict(v)
      train_variant(plan)
    runs = [plan.render[0], plan.concepts[0]] + ([plan.finetune[0]] if plan.finetune else [])
    add_row(v.name, v.axis, (dataclasses.asdict(v), sampling(v, plan)), runs,
            lambda: {**_evaluate_concepts(v, plan, judge, settings),
                     "train_pflops": _variant_flops(plan, vocab) / 1e15})
    if i == 0:  # The baselines right after the reference row.
      for name in baselines:
        if name == "judge":
          continue
        run_dir, config = baselines[name]
        axis = ("baseline, filled rows" if name == "ar_fill"
                else "baseline, seed" if name.startswith("ar_seed")
                else "baseline, learning rate" if name.startswith("ar_lr")
                else "baseline (equal FLOPs)")
        add_row(name, axis, None, [run_dir],
                lambda: {**_evaluate_flat(run_dir, judge, settings),
                         "train_pflops": training_flops(config, vocab) / 1e15})
      for temp in settings.ar_temperatures if "ar" in baselines else ():
        run_dir, config = baselines["ar"]
        add_row(f"ar_temp{temp}", "baseline, sampling", {"temperature": temp}, [run_dir],
                lambda: {**_evaluate_flat(run_dir, judge, settings, temperature=temp),
                         "train_pflops": training_flops(config, vocab) / 1e15})
  ref = baselines.get("judge") or baselines.get("ar")  # Its tokenizer counts the text.
  if ref:
    add_row("reference", "held-out text itself", None, [],
            lambda: _evaluate_reference(judge, settings, ref[0]))
  return result


def _write_tables(result: dict, workdir: str) -> None:
  # Dev-prompt tables (settings chosen on them) never overwrite the reported ones.
  dev = "_dev" if result["settings"]["prompts"] == "dev" else ""
  with open(os.path.join(workdir, f"results{dev}.json"), "w") as f:
    json.dump(result, f, indent=2, default=str)
  with open(os.path.join(workdir, f"results{dev}.md"), "w") as f:
    f.write(markdown_table(result) + "\n")
  kinds = kind_table(result)
  if kinds:
    with open(os.path.join(workdir, f"results{dev}_by_kind.md"), "w") as f:
      f.write(kinds + "\n")


# The data fields a tokenizer is trained from (pipeline.make_tokenizer).
TOKENIZER_FIELDS = ("source", "vocab_size", "tokenizer_model", "tokenizer_docs", "corpus_seed",
                    "max_doc_chars", "eval_fraction", "eval_docs")


def _grid_vocab(first: Plan, workdir: str) -> int | None:
  """The vocabulary of the first row's tokenizer: its render run's, or where that is not
  trained, a finished render run's trained from the same data fields (None: no such run)."""
  if _finished(first.render[0]):
    return _vocab_size(first.render[0])
  want = {k: first.render[1].data.get(k) for k in TOKENIZER_FIELDS}
  for name in sorted(os.listdir(workdir)):
    run_dir = os.path.join(workdir, name)
    if not (name.startswith("render-") and _finished(run_dir)):
      continue
    with open(os.path.join(run_dir, "config.json")) as f:
      data = json.load(f)["data"]
    if {k: data.get(k) for k in TOKENIZER_FIELDS} == want:
      return _vocab_size(run_dir)
  return None


def _vocab_size(render_dir: str) -> int:
  from concept_diffusion.train import checkpoint as ckpt_lib
  from concept_diffusion.data import tokenizer as tok_lib
  _, meta = ckpt_lib.latest_meta(render_dir)
  return tok_lib.Tokenizer(ckpt_lib.tokenizer_proto(meta)).vocab_size


def _fmt(value) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "–"
  if abs(value) >= 1000:
    return f"{value:,.0f}"
  return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def markdown_table(result: dict) -> str:
  """One row per variant / baseline; the columns of COLUMNS."""
  header = ["row", "varies", *(h for _, h in COLUMNS)]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, row in result["rows"].items():
    cells = [name, row.get("axis", "")] + [_fmt(row.get(k)) for k, _ in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def kind_table(result: dict) -> str:
  """Consistency per sentence kind (built-in corpus): each concepts and baseline row's
  generated sentences, and a concepts row's true continuations rendered back (the render
  stage's bound). The malformed column is their share of the sentences (never
  consistent)."""
  sources = [(f"{name} ({what})", row[key]) for name, row in result["rows"].items()
             for key, what in (("by_kind", "generated"), ("roundtrip_by_kind", "round trip"))
             if isinstance(row.get(key), dict)]
  if not sources:
    return ""
  total = {}
  for _, by_kind in sources:
    for kind, cell in by_kind.items():
      total[kind] = total.get(kind, 0) + cell["sentences"]
  kinds = sorted(total, key=lambda k: (-total[k], k))
  lines = ["| row | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)]
  for label, by_kind in sources:
    n = sum(cell["sentences"] for cell in by_kind.values())
    share = lambda k: by_kind.get(k, {"sentences": 0})["sentences"] / n if n else None  # noqa: E731
    cells = [_fmt(share(k)) if k == "malformed" else
             _fmt(by_kind[k]["consistent"]) if k in by_kind else "–" for k in kinds]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
