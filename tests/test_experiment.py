"""The experiment runner: a grid of variants and baselines at equal FLOPs, tables, resume."""

import dataclasses
import glob
import json
import math
import os

import ml_collections
import pytest

from concept_diffusion import evaluation, experiment, generate
from concept_diffusion.experiment import Settings, Variant

from conftest import ROOT, TINY

# Seconds-long runs: the conftest sizes, a few steps each.
COMMON = {k: v for k, v in TINY.items() if k != "train.num_steps"}


def _settings():
  return Settings(steps_scale=0.01, finetune_steps=300, num_prompts=4, max_batches=1,
                  batch_size=8, max_tokens=16, common=COMMON)


GRID = [Variant("default"),
        Variant("temp0.5", "sampling", sample={"temperature": 0.5}),
        Variant("mse+generated", "head", concepts={"concepts.objective": "mse"}, finetune={})]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("grid"))
  return workdir, experiment.run_grid(GRID, workdir, _settings())


def test_grid_writes_one_table_row_per_variant_and_baseline(grid_run):
  workdir, result = grid_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert list(saved["rows"]) == ["default", "ar", "mdm", "ar_temp0.5", "temp0.5",
                                  "mse+generated", "reference"]
  for name in ("default", "temp0.5", "mse+generated"):
    row = saved["rows"][name]
    for key, _ in experiment.COLUMNS:  # Synthetic source: coherence too.
      assert key in row, (name, key)
  for name in ("ar", "mdm", "ar_temp0.5"):
    assert {"gen_ppl", "unigram_entropy", "coherence_consistent", "gen_tokens_per_sec"} <= set(
        saved["rows"][name])
  table = open(os.path.join(workdir, "results.md")).read()
  assert all(heading in table for _, heading in experiment.COLUMNS)
  assert len(table.strip().splitlines()) == 2 + 7
  # Consistency per sentence kind: generated and rendered-back truth of each concepts row,
  # generated sentences of each baseline row (no round trip).
  for name, keys in [*((n, ("by_kind", "roundtrip_by_kind"))
                       for n in ("default", "temp0.5", "mse+generated")),
                     *((n, ("by_kind",)) for n in ("ar", "mdm", "ar_temp0.5"))]:
    assert {k for k, v in saved["rows"][name].items() if isinstance(v, dict)} == set(keys)
    for key in keys:
      by_kind = saved["rows"][name][key]
      assert all(0 <= c["consistent"] <= 1 and c["sentences"] > 0 for c in by_kind.values())
  kinds = open(os.path.join(workdir, "results_by_kind.md")).read().strip().splitlines()
  assert len(kinds) == 2 + 2 * 3 + 3 and kinds[2].startswith("| default (generated) |")
  assert "| ar (generated) |" in "\n".join(kinds)


def _ar_configs(workdir):
  """The saved configs of the ar runs in a grid's workdir."""
  configs = []
  for name in sorted(os.listdir(workdir)):
    if name.startswith("ar-"):
      with open(os.path.join(workdir, name, "config.json")) as f:
        configs.append(json.load(f))
  return configs


def test_ar_is_also_sampled_at_a_lower_temperature(grid_run, monkeypatch):
  workdir, first = grid_run
  from concept_diffusion import evaluation
  temps = []
  metrics = evaluation.generation_metrics
  monkeypatch.setattr(evaluation, "generation_metrics",
                      lambda *a, **k: temps.append(k.get("temperature")) or metrics(*a, **k))
  again = experiment.run_grid(GRID[:1], workdir,
                              dataclasses.replace(_settings(), ar_temperatures=(0.5, 0.25)))
  assert temps == [0.25]  # ar_temp0.5 is read back; the new temperature is sampled.
  assert again["rows"]["ar_temp0.5"] == first["rows"]["ar_temp0.5"]
  assert list(again["rows"])[:5] == ["default", "ar", "mdm", "ar_temp0.5", "ar_temp0.25"]
  # Without mdm: its row is left out, the others are read back as they were.
  ar_only = experiment.run_grid(GRID[:1], workdir,
                                dataclasses.replace(_settings(), baselines=("ar",)))
  assert list(ar_only["rows"]) == ["default", "ar", "ar_temp0.5", "reference"]
  assert ar_only["rows"]["ar"] == first["rows"]["ar"] and len(temps) == 1
  # Another ar seed: one more run (train and data seeds), one more row; the rest read back.
  seeded = experiment.run_grid(GRID[:1], workdir, dataclasses.replace(
      _settings(), baselines=("ar",), ar_seeds=(2,)))
  assert list(seeded["rows"]) == ["default", "ar", "ar_seed2", "ar_temp0.5", "reference"]
  assert seeded["rows"]["ar"] == first["rows"]["ar"] and len(temps) == 2
  assert seeded["rows"]["ar_seed2"]["axis"] == "baseline, seed"
  seeds = [(c["train"]["seed"], c["data"]["seed"]) for c in _ar_configs(workdir)]
  assert sorted(seeds) == [(0, 0), (2, 2)]
  # An ar run on filled rows (data.fill_examples): one more run and row, the same FLOPs.
  filled = experiment.run_grid(GRID[:1], workdir, dataclasses.replace(
      _settings(), baselines=("ar",), ar_fill=True))
  assert list(filled["rows"]) == ["default", "ar", "ar_fill", "ar_temp0.5", "reference"]
  assert filled["rows"]["ar"] == first["rows"]["ar"] and len(temps) == 3
  assert filled["rows"]["ar_fill"]["axis"] == "baseline, filled rows"
  assert filled["rows"]["ar_fill"]["train_pflops"] == first["rows"]["ar"]["train_pflops"]
  fills = [c["data"].get("fill_examples") for c in _ar_configs(workdir)]
  assert sorted(fills, key=str) == [False, False, True]
  # An ar run at another learning rate: one more run and row, the same FLOPs and seed.
  tuned = experiment.run_grid(GRID[:1], workdir, dataclasses.replace(
      _settings(), baselines=("ar",), ar_learning_rates=(5e-3,)))
  assert list(tuned["rows"]) == ["default", "ar", "ar_lr0.005", "ar_temp0.5", "reference"]
  assert tuned["rows"]["ar"] == first["rows"]["ar"] and len(temps) == 4
  assert tuned["rows"]["ar_lr0.005"]["axis"] == "baseline, learning rate"
  assert tuned["rows"]["ar_lr0.005"]["train_pflops"] == first["rows"]["ar"]["train_pflops"]
  rates = [(c["train"]["learning_rate"], c["train"]["seed"]) for c in _ar_configs(workdir)]
  assert sorted(rates)[-1] == (5e-3, 0) and len(rates) == 4
  with pytest.raises(experiment.ExperimentError, match="baselines \\['gpt'\\]"):
    experiment.run_grid(GRID[:1], workdir, dataclasses.replace(_settings(), baselines=("gpt",)))
  own = first["settings"]["common"]["train.learning_rate"]  # The ar preset's, as trained.
  with pytest.raises(experiment.ExperimentError, match=f"ar_learning_rates={own:g} is the ar"):
    experiment.run_grid(GRID[:1], workdir, dataclasses.replace(
        _settings(), baselines=("ar",), ar_learning_rates=(5e-3, own)))
  assert len(_ar_configs(workdir)) == 4  # Nothing trained.


def test_a_grid_without_the_judge_scores_all_but_gen_ppl(grid_run, monkeypatch):
  workdir, first = grid_run
  from concept_diffusion import generate
  loaded, trained = [], []
  load, train_once = generate.load, experiment.train_once
  monkeypatch.setattr(generate, "load", lambda w, **k: loaded.append(w) or load(w, **k))
  monkeypatch.setattr(experiment, "train_once", lambda c, w: trained.append(w) or train_once(c, w))
  result = experiment.run_grid(GRID[:1], workdir, dataclasses.replace(
      _settings(), judge=False, baselines=("ar",)))
  assert list(result["rows"]) == ["default", "ar", "ar_temp0.5", "reference"]
  assert not any(os.path.basename(w).startswith("judge-") for w in loaded + trained)
  judged = ("gen_ppl", "gen_ppl_end", "roundtrip_gen_ppl")
  for name, row in result["rows"].items():
    assert not set(judged) & set(row), name
  # Evaluated anew (a row's file names its judge), to the same figures but the judge's
  # two (and the wall clock's timings).
  drop = lambda row: {k: v for k, v in row.items()
                      if k not in (*judged, "gen_tokens_per_sec", "gen_latency_s")}
  for name in ("default", "ar"):  # As JSON: a NaN (no tokens generated) equals itself.
    assert json.dumps(drop(first["rows"][name]), sort_keys=True) == json.dumps(
        drop(result["rows"][name]), sort_keys=True), name
  assert result["rows"]["reference"]["coherence_consistent"] == 1.0
  # Neither a judge nor an ar run: no tokenizer to score the reference in, so no row.
  alone = experiment.run_grid(GRID[:1], workdir, dataclasses.replace(
      _settings(), judge=False, baselines=()))
  assert list(alone["rows"]) == ["default"]


def test_baselines_get_the_default_pipelines_flops(grid_run):
  workdir, result = grid_run
  budget = result["budget_pflops"]
  assert result["rows"]["default"]["train_pflops"] == pytest.approx(budget)
  for name in ("ar", "mdm", "ar_temp0.5"):  # Rounded to whole steps of a batch.
    assert result["rows"][name]["train_pflops"] == pytest.approx(budget, rel=0.15)
  # The fine-tune's FLOPs (its concept sampling included) are counted on top of its
  # pipeline's, as planned before its concepts run existed: the same as from the runs.
  assert result["rows"]["mse+generated"]["train_pflops"] > budget
  from concept_diffusion.train import stages
  plan = experiment.plan_variant(GRID[2], workdir, _settings())
  vocab = experiment._vocab_size(plan.render[0])
  resolve = lambda c: stages.resolve_config(c.copy_and_resolve_references())
  trained = (experiment.training_flops(plan.render[1], vocab)
             + experiment.training_flops(resolve(plan.concepts[1]), vocab, plan.render[1])
             + experiment.training_flops(resolve(plan.finetune[1]), vocab))
  assert stages.generated_flops_per_example(resolve(plan.finetune[1]), vocab) > 0
  assert result["rows"]["mse+generated"]["train_pflops"] * 1e15 == pytest.approx(trained)


def test_variants_share_runs_and_rerunning_trains_nothing(grid_run, monkeypatch):
  workdir, _ = grid_run
  plans = [experiment.plan_variant(v, workdir, _settings()) for v in GRID]
  assert plans[0].concepts[0] == plans[1].concepts[0]  # Sampling-only rows share runs.
  assert plans[0].render[0] == plans[2].render[0] and plans[2].finetune is not None
  assert plans[2].finetune[1].render.generated_from == plans[2].concepts[0]
  import concept_diffusion.train as train_lib
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("re-running must not train"))
  again = experiment.run_grid(GRID, workdir, _settings())
  same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # nan too.
  assert same(again["rows"], grid_run[1]["rows"])


def test_a_changed_preset_is_not_silently_reused(grid_run):
  workdir, _ = grid_run
  plan = experiment.plan_variant(GRID[0], workdir, _settings())
  concepts_dir, config = plan.concepts
  experiment.train_once(config, concepts_dir)  # As planned: reused.
  sampling_only = experiment.apply_overrides(
      config.copy_and_resolve_references(), {"concepts.temperature": 0.9,
                                             "concepts.reencode": True})
  experiment.train_once(sampling_only, concepts_dir)  # Generation defaults only: reused.
  assert experiment.sampling(GRID[0], experiment.Plan(plan.render, (concepts_dir, sampling_only),
                                                      None))["reencode"] is True
  # concepts.end_noise, render_dims, end_temperature, candidate_rule and draft_steps came
  # after most rows were measured: off, they stay out of a row's options (so out of its
  # result file's name); on, they are in, and the run is reused.
  newer = ("end_noise", "render_dims", "end_temperature", "candidate_rule", "draft_steps")
  assert not set(newer) & set(experiment.sampling(GRID[0], plan))
  ended = experiment.apply_overrides(config.copy_and_resolve_references(),
                                     {"concepts.end_noise": 1.5, "concepts.end_temperature": 1.0,
                                      "concepts.candidate_rule": "roundtrip",
                                      "concepts.draft_steps": 2})
  experiment.train_once(ended, concepts_dir)
  options = experiment.sampling(GRID[0], experiment.Plan(plan.render, (concepts_dir, ended), None))
  assert [options.get(k) for k in newer] == [1.5, None, 1.0, "roundtrip", 2]
  changed = experiment.apply_overrides(config.copy_and_resolve_references(),
                                       {"model.concept_layers": 3})
  with pytest.raises(experiment.ExperimentError, match="model.concept_layers: trained 1"):
    experiment.train_once(changed, concepts_dir)


def test_a_cached_variant_trains_on_the_cache_and_counts_encoding_once(grid_run, monkeypatch):
  workdir, first = grid_run
  cached = Variant("cached", "concept steps (cache)", concepts={"concepts.cache_examples": 64})
  result = experiment.run_grid([GRID[0], cached], workdir, _settings())
  plan = experiment.plan_variant(cached, workdir, _settings())
  from concept_diffusion.data import concept_cache
  from concept_diffusion.train import trainer
  cache_dir = os.path.join(plan.concepts[0], trainer.CACHE_DIR)
  assert len(concept_cache.CacheReader(cache_dir, "train")) == 64
  # Same steps as the default: the encoder's forward over its 24 x 8 examples is replaced
  # by one pass over the cache's 64.
  concepts = plan.concepts[1]
  seen = concepts.train.num_steps * concepts.train.batch_size
  vocab = experiment._vocab_size(plan.render[0])
  saved = experiment.encoding_flops(plan.render[1], vocab, seen - 64, concepts.data.num_concepts)
  assert seen > 64 and saved > 0
  assert (first["rows"]["default"]["train_pflops"] - result["rows"]["cached"]["train_pflops"]
          ) * 1e15 == pytest.approx(saved)
  assert 0 <= result["rows"]["cached"]["coherence_consistent"] <= 1
  import concept_diffusion.train as train_lib
  from concept_diffusion import encoding
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("re-running must not train"))
  monkeypatch.setattr(encoding, "encode_run", lambda *a, **k: pytest.fail("nor encode"))
  experiment.run_grid([GRID[0], cached], workdir, _settings())


@pytest.fixture(scope="module")
def equal_flops_row(grid_run, tmp_path_factory):
  """A copy of the grid's workdir with an equal-FLOPs row trained under an explicit render
  override (end_keep 0.5, 1,400 steps) -> (workdir, its Variant as trained, the result).
  Tests read it, or copy it (_grid_with_an_equal_flops_row) to change it."""
  import shutil
  workdir = str(tmp_path_factory.mktemp("equal_flops") / "grid")
  shutil.copytree(grid_run[0], workdir)
  before = Variant("x", "render steps", render={"render.end_keep": 0.5,
                                                "train.num_steps": 1400}, equal_flops=True)
  result = experiment.run_grid([GRID[0], before], workdir, _settings())
  return workdir, dataclasses.replace(before, concepts=result["variants"]["x"]["concepts"]), result


def test_an_equal_flops_variant_gets_the_concept_steps_that_match_the_budget(grid_run,
                                                                              equal_flops_row):
  # A render run a sixth longer: the concepts run gives up as many FLOPs as it costs.
  _, first = grid_run
  workdir, trained, result = equal_flops_row
  budget = first["budget_pflops"]
  vocab = experiment._vocab_size(experiment.plan_variant(GRID[0], workdir, _settings()).render[0])
  override = trained.concepts["train.num_steps"]
  plan = experiment.plan_variant(Variant("m", render=trained.render,
                                         concepts={"train.num_steps": override}), workdir,
                                 _settings())
  matched = plan.concepts[1].train.num_steps
  default = experiment.plan_variant(GRID[0], workdir, _settings()).concepts[1].train.num_steps
  assert 1 <= matched < default
  with open(os.path.join(plan.concepts[0], "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == matched  # The run trained that many.
  # Within half a concept step of the budget (a step costs less than budget / steps).
  assert abs(result["rows"]["x"]["train_pflops"] - budget) <= 0.5 * budget / matched
  with pytest.raises(experiment.ExperimentError, match="over the"):
    experiment.equal_flops_steps(plan, vocab, budget=1e3)


def _edited_preset(tmp_path, stage: str, edit: str) -> str:
  """A config file whose tiny preset is configs/<stage>.py's with `edit` (on `c`) applied."""
  import pathlib
  preset = tmp_path / f"new_{stage}.py"
  preset.write_text(
      "import importlib.util\n"
      "spec = importlib.util.spec_from_file_location('s', "
      f"{str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / f'{stage}.py')!r})\n"
      "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
      "def get_config(preset='tiny'):\n"
      f"  c = mod.get_config(preset); {edit}; return c\n")
  return f"{preset}:tiny"


def test_adopt_runs_moves_runs_to_the_names_a_new_default_plans(grid_run, tmp_path,
                                                                monkeypatch):
  import shutil
  workdir = str(tmp_path / "grid")
  shutil.copytree(grid_run[0], workdir)
  # A new default: the concepts preset now turns the head's mean on; the old default
  # becomes a row of overrides. Its run predates the field (as runs trained before it).
  preset = _edited_preset(tmp_path, "concepts", "c.model.head_mean = True")
  settings = dataclasses.replace(_settings(), concepts_preset=preset)
  grid = [Variant("default"), Variant("old", "old default", concepts={"model.head_mean": False})]
  old_dir = experiment.plan_variant(GRID[0], workdir, _settings()).concepts[0]
  saved = json.load(open(os.path.join(old_dir, "config.json")))
  del saved["model"]["head_mean"]
  saved["concepts"]["render_workdir"] = saved["concepts"]["render_workdir"].replace(
      grid_run[0], workdir)  # As trained in this copy of the grid.
  json.dump(saved, open(os.path.join(old_dir, "config.json"), "w"))
  new = [experiment.plan_variant(v, workdir, settings) for v in grid]
  assert new[0].concepts[0] == old_dir  # The new default plans the old one's name...
  experiment.check_reuse(new[0].concepts[1], old_dir)  # ...and the lax check passes it.
  moves = experiment.adopt_runs(grid, workdir, settings)
  assert moves == [(old_dir, new[1].concepts[0])]  # Strictly, it is the old default's.
  assert not os.path.exists(old_dir)  # The new default is left to train.
  experiment.check_reuse(new[1].concepts[1], new[1].concepts[0])
  assert experiment.adopt_runs(grid, workdir, settings) == []  # Settled: nothing moves.
  # Had the new default been trained as a row of the old grid, the two swap names.
  shutil.move(new[1].concepts[0], old_dir)
  mean = experiment.plan_variant(Variant("mean", concepts={"model.head_mean": True}), workdir,
                                 _settings())
  experiment.train_once(*reversed(mean.concepts))
  moves = experiment.adopt_runs(grid, workdir, settings)
  parked = old_dir + ".parked-0"
  assert moves == [(old_dir, parked), (mean.concepts[0], old_dir),
                   (parked, new[1].concepts[0])]
  import concept_diffusion.train as train_lib
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("adopted runs train"))
  for plan in new:  # Each row finds its run, finished and trained as it plans.
    assert not experiment._differences(plan.concepts[1], plan.concepts[0], strict=True)
    experiment.train_once(plan.concepts[1], plan.concepts[0])


def test_adopt_runs_moves_a_render_run_and_the_concepts_run_over_it(grid_run, tmp_path):
  """A render preset edit: the old default's render run moves to its new name, and its
  concepts run, whose saved render_workdir still names the old place, follows it."""
  import shutil
  workdir = str(tmp_path / "grid")
  shutil.copytree(grid_run[0], workdir)  # Saved render_workdirs name the original grid.
  settings = dataclasses.replace(_settings(), render_preset=_edited_preset(
      tmp_path, "render", "c.render.end_keep = 0.5"))
  grid = [Variant("default"), Variant("old", "old default", render={"render.end_keep": 0.25})]
  old = experiment.plan_variant(GRID[0], workdir, _settings())
  new = [experiment.plan_variant(v, workdir, settings) for v in grid]
  assert (new[0].render[0], new[0].concepts[0]) == (old.render[0], old.concepts[0])
  moves = experiment.adopt_runs(grid, workdir, settings)
  assert moves == [(old.render[0], new[1].render[0]), (old.concepts[0], new[1].concepts[0])]
  assert experiment.adopt_runs(grid, workdir, settings) == []  # Settled: nothing moves.
  assert not experiment._differences(new[1].concepts[1], new[1].concepts[0], strict=True)
  experiment.check_reuse(new[1].concepts[1], new[1].concepts[0])


def _grid_with_an_equal_flops_row(equal_flops_row, tmp_path):
  """A copy of equal_flops_row's workdir -> (workdir, the row's plan as trained there)."""
  import shutil
  workdir = str(tmp_path / "grid")
  shutil.copytree(equal_flops_row[0], workdir)
  return workdir, experiment.plan_variant(equal_flops_row[1], workdir, _settings())


def test_adopt_runs_moves_an_equal_flops_row_whose_render_run_moves(equal_flops_row, tmp_path):
  """A row measured with an explicit override that a preset edit makes the default's (as
  nested concepts were) is planned under a new name: its render run moves, then its
  concepts run, whose steps follow from the render run in its new place."""
  workdir, old = _grid_with_an_equal_flops_row(equal_flops_row, tmp_path)
  settings = dataclasses.replace(_settings(), render_preset=_edited_preset(
      tmp_path, "render", "c.render.end_keep = 0.5"))
  after = Variant("y", "render steps", render={"train.num_steps": 1400}, equal_flops=True)
  grid = [Variant("default"), Variant("old", "old default", render={"render.end_keep": 0.25}),
          after]
  first = experiment.plan_variant(grid[0], workdir, settings)  # Its budget, as adopt reads it.
  vocab = experiment._vocab_size(first.render[0])
  budget = experiment._variant_flops(first, vocab)
  moves = experiment.adopt_runs(grid, workdir, settings)
  new = experiment.plan_variant(after, workdir, settings)
  assert (old.render[0], new.render[0]) in moves
  matched = experiment.plan_variant(experiment.match_flops(after, workdir, settings, vocab,
                                                           budget), workdir, settings)
  assert [m for m in moves if m[1] == matched.concepts[0]] == [(old.concepts[0],
                                                                matched.concepts[0])]
  assert not experiment._differences(matched.concepts[1], matched.concepts[0], strict=True)
  assert experiment.adopt_runs(grid, workdir, settings) == []  # Settled: nothing moves.


def test_adopt_runs_moves_an_equal_flops_row_when_the_default_never_ran_here(equal_flops_row,
                                                                           tmp_path):
  """A source where today's default was never trained (its runs moved away as an earlier
  default's): the budget comes from the planned configs, so equal-FLOPs rows still move."""
  import shutil
  workdir, old = _grid_with_an_equal_flops_row(equal_flops_row, tmp_path)
  default = experiment.plan_variant(GRID[0], workdir, _settings())
  budget = experiment._variant_flops(default, experiment._vocab_size(default.render[0]))
  for run_dir in (default.render[0], default.concepts[0]):
    shutil.rmtree(run_dir)  # Never trained here under today's presets.
  settings = dataclasses.replace(_settings(), render_preset=_edited_preset(
      tmp_path, "render", "c.render.end_keep = 0.5"))
  after = Variant("y", "render steps", render={"train.num_steps": 1400}, equal_flops=True)
  grid = [Variant("default"), after]
  first = experiment.plan_variant(grid[0], workdir, settings)
  assert not experiment._finished(first.render[0])
  vocab = experiment._vocab_size(old.render[0])
  assert experiment._variant_flops(first, vocab) == pytest.approx(budget)  # end_keep: no FLOPs.
  moves = experiment.adopt_runs(grid, workdir, settings)
  matched = experiment.plan_variant(experiment.match_flops(after, workdir, settings, vocab,
                                                           budget), workdir, settings)
  assert (old.render[0], matched.render[0]) in moves  # (Other tests' runs may move too.)
  assert [m for m in moves if m[1] == matched.concepts[0]] == [(old.concepts[0],
                                                                matched.concepts[0])]
  assert not experiment._differences(matched.concepts[1], matched.concepts[0], strict=True)
  assert experiment.adopt_runs(grid, workdir, settings) == []  # Settled: nothing moves.


def test_strict_differences_compare_a_field_both_sides_may_lack(grid_run, tmp_path,
                                                              monkeypatch):
  """A concepts run keeps a copy of its render run's config: two concepts runs over render
  runs a newer field apart are told apart even where the planned render run predates it."""
  from concept_diffusion.train import stages
  concepts_dir, config = experiment.plan_variant(GRID[0], grid_run[0], _settings()).concepts
  saved = json.load(open(os.path.join(concepts_dir, "config.json")))
  saved["concepts"]["render_config"]["render"]["nested_dims"] = [8, 16, 32]
  other = tmp_path / "other"
  other.mkdir()
  json.dump(saved, open(other / "config.json", "w"))
  run_config = stages._run_config

  def predating(*args):  # The planned render run, as trained before render.nested_dims.
    run = run_config(*args).to_dict()
    del run["render"]["nested_dims"]
    return ml_collections.ConfigDict(run)

  monkeypatch.setattr(stages, "_run_config", predating)
  assert experiment._differences(config, str(other), strict=True) == [
      ("concepts.render_config.render.nested_dims", [8, 16, 32], [])]
  assert not experiment._differences(config, concepts_dir, strict=True)  # [] = its default.
  assert not experiment._differences(config, str(other))  # The lax check skips it.


def test_grid_runs_checkpoint_periodically_and_reuse_ignores_how_often(grid_run):
  plan = experiment.plan_variant(GRID[0], "/tmp/unused", Settings(checkpoint_every=500))
  assert plan.concepts[1].checkpoint.every_steps == 500  # Of 2,400 steps: a killed run resumes.
  assert plan.render[1].checkpoint.every_steps == 500
  short = experiment.plan_variant(GRID[0], "/tmp/unused", _settings())
  assert short.concepts[1].checkpoint.every_steps == short.concepts[1].train.num_steps
  workdir, _ = grid_run
  concepts_dir, config = experiment.plan_variant(GRID[0], workdir, _settings()).concepts
  other = experiment.apply_overrides(config.copy_and_resolve_references(),
                                     {"checkpoint.every_steps": 7})
  experiment.train_once(other, concepts_dir)  # Finished, and trained the same: reused.


def test_a_changed_row_is_evaluated_again_and_only_it(grid_run, monkeypatch):
  workdir, first = grid_run
  calls = []
  evaluate = experiment._evaluate_concepts
  monkeypatch.setattr(experiment, "_evaluate_concepts",
                      lambda v, *a: calls.append(v.name) or evaluate(v, *a))
  grid = [GRID[0], Variant("temp0.5", "sampling", sample={"temperature": 0.25}), GRID[2]]
  again = experiment.run_grid(grid, workdir, _settings())
  assert calls == ["temp0.5"]
  assert json.dumps(again["rows"]["default"], sort_keys=True) == json.dumps(
      first["rows"]["default"], sort_keys=True)


def test_dev_prompts_make_their_own_tables_and_leave_the_reported_ones(grid_run, monkeypatch):
  workdir, first = grid_run
  reported = {n: open(os.path.join(workdir, n)).read()
              for n in ("results.json", "results.md", "results_by_kind.md")}
  import concept_diffusion.train as train_lib
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("trained a run"))
  settings = dataclasses.replace(_settings(), prompts="dev", baselines=("ar",))
  dev = experiment.run_grid(GRID[:1], workdir, settings)
  assert list(dev["rows"]) == ["default", "ar", "ar_temp0.5", "reference"]
  config = evaluation.eval_config(generate.load(glob.glob(os.path.join(workdir, "ar-*"))[0]))
  prompt = evaluation.eval_prompts(config, 1, "dev")[0][0]
  assert prompt != evaluation.eval_prompts(config, 1)[0][0]
  for name in ("default", "ar"):  # Sampled from the dev prompts, not the eval ones.
    assert dev["rows"][name]["sample"].startswith(prompt[-80:]), name
    assert dev["rows"][name]["sample"] != first["rows"][name]["sample"]
  assert json.load(open(os.path.join(workdir, "results_dev.json")))["rows"].keys() == dev["rows"].keys()
  assert os.path.isfile(os.path.join(workdir, "results_dev.md"))
  assert reported == {n: open(os.path.join(workdir, n)).read() for n in reported}
  with pytest.raises(experiment.ExperimentError, match="prompts='test'"):
    experiment.run_grid(GRID[:1], workdir, dataclasses.replace(settings, prompts="test"))


def test_rows_reading_a_retrained_run_are_evaluated_again(grid_run, monkeypatch):
  workdir, _ = grid_run
  concepts_dir = experiment.plan_variant(GRID[0], workdir, _settings()).concepts[0]
  path = os.path.join(concepts_dir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["train"]["seed"] += 1  # As if retrained (or another run moved in) under that name.
  with open(path, "w") as f:
    json.dump(saved, f)
  calls = []
  evaluate = experiment._evaluate_concepts
  monkeypatch.setattr(experiment, "_evaluate_concepts",
                      lambda v, *a: calls.append(v.name) or evaluate(v, *a))
  monkeypatch.setattr(experiment, "train_once", lambda *a: None)  # Seed differs: no reuse check.
  experiment.run_grid(GRID, workdir, _settings())
  assert calls == ["default", "temp0.5"]  # mse+generated reads other concepts runs.


def test_a_preempted_run_is_not_marked_finished(tmp_path, monkeypatch):
  import concept_diffusion.train as train_lib
  from concept_diffusion.train import checkpoint
  config = experiment.plan_variant(GRID[0], str(tmp_path), _settings()).render[1]
  monkeypatch.setattr(train_lib, "train", lambda *a, **k: {})  # SIGTERM: saved, returned.
  monkeypatch.setattr(checkpoint, "latest_meta", lambda workdir: (1, {}))
  with pytest.raises(experiment.ExperimentError, match="stopped at step 1 of"):
    experiment.train_once(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / experiment.DONE_FILE).exists()


def test_matched_steps_and_bad_overrides():
  from concept_diffusion.config import ConfigError, load_config
  ar = load_config("configs/ar.py:tiny")
  per_step = experiment.training_flops(ar, 1024) / ar.train.num_steps
  assert experiment.matched_steps(ar, 1024, 10.4 * per_step) == 10
  with pytest.raises(ConfigError, match="render.z_nois"):
    experiment.apply_overrides(load_config("configs/render.py:tiny"), {"render.z_nois": 1.0})


def _measured_under(name: str) -> float:
  """The earlier default a grid row is one change from (vN_... rows: N), inf for today's."""
  tag = name.split("_")[0]
  return int(tag[1:]) if tag[0] == "v" and tag[1:].isdigit() else math.inf


def _shipped_grid():
  """experiments/concept_grid.py, imported (it defines no flags on import)."""
  import importlib.util
  path = os.path.join(ROOT, "experiments", "concept_grid.py")
  spec = importlib.util.spec_from_file_location("concept_grid", path)
  grid = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(grid)
  return grid


def test_the_text_presets_are_the_measured_text_row_at_equal_flops(tmp_path):
  """configs/*.py:tiny_text train and sample exactly the grid's TEXT_PRESET row."""
  grid, workdir = _shipped_grid(), str(tmp_path)
  assert grid.TEXT_PRESET in grid.TEXT  # A row of the text grid, measured there.
  settings = Settings(source="text:docs/*.txt")
  vocab = experiment.config_lib.load_config(settings.render_preset).data.vocab_size
  budget = experiment._variant_flops(
      experiment.plan_variant(Variant("default"), workdir, settings), vocab)
  row = experiment.match_flops(grid.TEXT_PRESET, workdir, settings, vocab, budget)
  measured = experiment.plan_variant(row, workdir, settings)
  text = dataclasses.replace(settings, render_preset="configs/render.py:tiny_text",
                             concepts_preset="configs/concepts.py:tiny_text")
  preset = experiment.plan_variant(Variant("default"), workdir, text)
  assert preset.render[1].to_dict() == measured.render[1].to_dict()
  # The row samples by options, the preset by its config's defaults.
  sampled = ml_collections.ConfigDict(measured.concepts[1].to_dict())
  by_arg = {arg: field for field, arg in experiment.SAMPLING_FIELDS.items()}
  experiment.apply_overrides(sampled, {by_arg[k]: x for k, x in row.sample.items()})
  want, got = sampled.to_dict(), preset.concepts[1].to_dict()
  want["concepts"].pop("render_workdir"), got["concepts"].pop("render_workdir")
  assert got == want
  off = experiment.NEWER_SAMPLING_OFF  # Left out of a row's options, or set off: the same.
  assert ({**off, **experiment.sampling(Variant("default"), preset)}
          == {**off, **experiment.sampling(grid.TEXT_PRESET, measured)})
  assert experiment._variant_flops(preset, vocab) == pytest.approx(budget, rel=1e-3)


def test_the_shipped_grids_plan_and_keep_their_history(tmp_path):
  """experiments/concept_grid.py: unique rows, valid overrides, earlier defaults intact."""
  grid = _shipped_grid()
  for rows in grid.GRIDS.values():
    names = [v.name for v in rows]
    assert names[0] == "default" and len(set(names)) == len(names)
    for v in rows:
      experiment.plan_variant(v, str(tmp_path), Settings())  # Unknown fields raise here.
  plans = {v.name: (v, experiment.plan_variant(v, str(tmp_path), Settings())) for v in grid.FULL}
  render = {name: (plans[name][1].render[1].model.encoder_pooling,
                   plans[name][1].render[1].render.z_noise,
                   plans[name][1].render[1].train.num_steps)
            for name in ("default", "v10", "v9", "v8", "v7", "v6", "v5", "v4", "v1")}
  # Each earlier default's render stage and concept head, as measured.
  assert render == {"default": ("slots", 1.5, 1200), "v10": ("slots", 1.5, 1200),
                    "v9": ("slots", 1.5, 1200),
                    "v8": ("slots", 1.5, 1200),
                    "v7": ("slots", 1.5, 600),
                    "v6": ("slots", 1.5, 600), "v5": ("slots", 1.0, 600),
                    "v4": ("mean", 1.0, 600), "v1": ("mean", 1.0, 600)}
  # Today's rows train the render stage on filled batches with a quarter of the END
  # chunks; every earlier default's rows on padded ones with all of them (but v9's rows
  # that try each half).
  halves = {"v9_fill_only": (True, 1.0), "v9_end0.25": (False, 0.25)}
  for name, (_, plan) in plans.items():
    earlier = _measured_under(name) < 10
    want = halves.get(name, (False, 1.0) if earlier else (True, 0.25))
    assert (plan.render[1].data.fill_examples, plan.render[1].render.end_keep) == want, name
  # Today's rows train nested concepts and render 64 dimensions of each sample; every
  # earlier default's rows whole concepts, rendered whole (but the rows that set them).
  for name, (v, plan) in plans.items():
    earlier = _measured_under(name) < 11
    nested = v.render.get("render.nested_dims", () if earlier else (32, 64, 128))
    assert tuple(plan.render[1].render.nested_dims) == nested, name
    dims = v.sample.get("render_dims", v.concepts.get("concepts.render_dims",
                                                      0 if earlier else 64))
    assert experiment.sampling(v, plan).get("render_dims", 0) == dims, name
  # Today's (and v14's, v13's, v12's) concepts runs train at 5e-3; v11's and every earlier
  # default's from v2 at 3e-3, v1's at 1e-3 (but the rows that set it).
  for name, (v, plan) in plans.items():
    today = _measured_under(name) >= 12
    want = v.concepts.get("train.learning_rate", 5e-3 if today else 3e-3)
    assert plan.concepts[1].train.learning_rate == want, name
  # The loop reads each row's own rate, which carries its default's (V11 ...): pin those.
  assert [plans[n][1].concepts[1].train.learning_rate for n in ("v11", "v10", "v2", "v1")] == [
      3e-3, 3e-3, 3e-3, 1e-3]
  # Today's and v15's rows sample eight candidates of each concept at temperature 2, keep
  # one by round trip and decide END by a sample of its own; v14's four so; v13's one
  # sample at 1.25, v12's and every earlier default's from v3 at 1.0, v2's and v1's at 0.5
  # (but the rows that set them). Today's rows render the candidates as 2-step drafts and
  # the kept one in full; v15's and every earlier default's rendered each in full. v15,
  # v14, v13 and v12 are today's runs.
  for name, (v, plan) in plans.items():
    version = _measured_under(name)
    today, hot = version == math.inf, version >= 14
    temperature = 2.0 if hot else 1.25 if version == 13 else 0.5 if version <= 2 else 1.0
    picked = ((8 if version >= 15 else 4, "roundtrip", 2.0) if hot else (1, "consensus", 0.0))
    s = {"candidate_rule": "consensus", "end_temperature": 0.0, "draft_steps": 0,
         **experiment.sampling(v, plan)}
    assert s["temperature"] == v.sample.get("temperature", temperature), name
    assert (s["num_candidates"], s["candidate_rule"], s["end_temperature"]) == tuple(
        v.sample.get(k, x) for k, x in zip(("num_candidates", "candidate_rule",
                                            "end_temperature"), picked)), name
    assert s["draft_steps"] == v.sample.get("draft_steps", 2 if today else 0), name
  assert (plans["v15"][1].concepts == plans["v14"][1].concepts == plans["v13"][1].concepts
          == plans["v12"][1].concepts == plans["default"][1].concepts)
  assert not plans["v1_generated"][1].finetune[1].data.fill_examples  # It refuses filling.
  heads = {name: (plans[name][1].concepts[1].model.diff_head_layers,
                  plans[name][1].concepts[1].model.head_mean,
                  plans[name][1].concepts[1].train.num_steps)
           for name in ("default", "v11", "v10", "v9", "v8", "v7", "v6", "v5", "v4", "v3", "v2",
                        "v1")}
  assert heads == {"default": (6, True, 2209), "v11": (6, True, 2209), "v10": (6, True, 2209), "v9": (6, True, 2209),
                   "v8": (6, False, 2234),
                   "v7": (6, False, 3260),
                   "v6": (2, False, 5990), "v5": (2, False, 5990), "v4": (2, False, 6037),
                   "v3": (2, False, 5310), "v2": (2, False, 2400), "v1": (2, False, 2400)}
  # A render-steps row of an earlier default keeps its own steps over the 600.
  assert plans["v4_render1200_eqflops"][1].render[1].train.num_steps == 1200
  default, v2 = plans["default"][1].concepts[1], plans["v2"][1].concepts[1]
  assert default.concepts.cache_examples > 0 and v2.concepts.cache_examples == 0
  v3 = plans["v3"][1].concepts[1]  # The first cache default, as it was trained.
  assert (v3.concepts.cache_examples, v3.train.num_steps) == (25_600, 5310)
  assert plans["v3_layers4_eqflops"][1].concepts[1].concepts.cache_examples == 25_600
  assert v2.train.num_steps == 2400 and plans["v1"][1].concepts[1].train.learning_rate == 1e-3
  for name, (v, plan) in plans.items():
    s = experiment.sampling(v, plan)
    if name.split("_")[0] in ("v1", "v2") and "sampling" not in v.axis and "t1s64" not in name:
      assert (s["temperature"], s["concept_steps"]) == (0.5, 16), name  # As measured then.
  assert experiment.sampling(*plans["v1"])["reencode"] is False
