"""Evaluates a run on held-out data (table + WORKDIR/eval.json), or compares several runs.

  python -m concept_diffusion.evaluate --workdir=runs/concepts --judge_workdir=runs/ar
  python -m concept_diffusion.evaluate --workdir=runs/render --config.data.source=text:/data/*.txt
  python -m concept_diffusion.evaluate --workdir=runs/render --by_kind  # Built-in corpus.
  python -m concept_diffusion.evaluate --workdir=runs/concepts --prompts=dev  # eval_dev.json.
  python -m concept_diffusion.evaluate --judge_workdir=runs/ar --compare runs/concepts runs/ar \
      runs/mdm

Metric definitions: concept_diffusion/evaluation.py.
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from concept_diffusion import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to evaluate.")
_CONFIG = config_flags.DEFINE_config_dict(
    "config", config_lib.base_config(), "Overrides of the run's saved config, e.g. "
    "--config.data.source=text:GLOB (only fields given on the command line are applied).")
_JUDGE = flags.DEFINE_string("judge_workdir", None, "An ar run that scores generations (gen_ppl).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 64, "Held-out prompts for generation metrics.")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 8, "Held-out batches for likelihood metrics.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Examples per held-out batch.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Token budget of every continuation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every sampler (same for every compared run).")
_COMPARE = flags.DEFINE_list("compare", None, "Runs to compare side by side (space or comma "
                             "separated); each DIR/eval.json is read, or computed.")
_BY_KIND = flags.DEFINE_bool("by_kind", False, "Built-in corpus, with --workdir: also print "
                             "consistency per sentence kind, of the true continuations "
                             "rendered back (render and concepts runs) and of generated ones "
                             "(concepts, ar and mdm runs).")
_PROMPTS = flags.DEFINE_string("prompts", "eval", "Held-out split the prompts come from "
                               "(evaluation.PROMPT_SPLITS): dev to choose sampling settings "
                               "on prompts the reported figures never see (eval_dev.json).")
_RECOMPUTE = flags.DEFINE_bool("recompute", False, "With --compare: evaluate even where "
                               "eval.json exists.")


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  from concept_diffusion import evaluation, generate  # After flags: keeps --help fast.
  from concept_diffusion.data.errors import DataError
  from concept_diffusion.train import checkpoint
  kwargs = dict(overrides=config_flags.get_override_values(flags.FLAGS["config"]),
                judge_workdir=_JUDGE.value, num_prompts=_NUM_PROMPTS.value,
                max_batches=_MAX_BATCHES.value, batch_size=_BATCH_SIZE.value,
                max_tokens=_MAX_TOKENS.value, seed=_SEED.value, prompts=_PROMPTS.value)
  compare = (_COMPARE.value or []) + argv[1:]  # "--compare A B C": B and C arrive as argv.
  try:
    if compare:
      results = {d: evaluation.read_or_evaluate(d, recompute=_RECOMPUTE.value, **kwargs)
                 for d in compare}
    elif _WORKDIR.value:
      metrics = evaluation.evaluate(_WORKDIR.value, by_kind=_BY_KIND.value, **kwargs)
      kinds = {k: metrics.pop(k) for k in ("roundtrip_by_kind", "by_kind") if k in metrics}
      results = {_WORKDIR.value: metrics}
    else:
      raise app.UsageError("give --workdir=DIR or --compare DIR1 DIR2 ...")
  except (generate.GenerateError, checkpoint.CheckpointError, DataError,
          config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(evaluation.format_table(results), flush=True)
  if len(results) == 1:
    print(json.dumps(next(iter(results.values())), sort_keys=True), flush=True)
  if _BY_KIND.value and not compare:
    from concept_diffusion import experiment
    print(experiment.kind_table({"rows": {_WORKDIR.value: kinds}}), flush=True)


if __name__ == "__main__":
  app.run(main)
