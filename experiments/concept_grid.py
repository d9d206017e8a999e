"""The concept-generation grid (issue 7): what makes the concept model write.

  python experiments/concept_grid.py --workdir=runs/grid/synthetic
  python experiments/concept_grid.py --workdir=runs/grid/pydocs --grid=text \
      --source='text:/usr/share/doc/python3.11/html/_sources/**/*.rst.txt'

Each row changes one thing from the `default` row (the shipped tiny presets, set to the
best measured combination) and is trained and evaluated at the tiny preset. The ar and mdm
rows get the same source and the training FLOPs of the `default` pipeline. Runs are
shared and resumed: re-running only does what is missing (a row whose definition
changed is evaluated again). Output: WORKDIR/results.json and WORKDIR/results.md (the
README's "Results" tables). On 2 CPU cores: about 45 minutes for the default row and
the baselines, ~8 minutes per row that trains, ~1 minute per sampling row; the full
grid ~3.5 hours. --only=mse,x0 picks rows; --baselines=ar leaves out mdm (~20 minutes).
"""

import dataclasses
import sys

from absl import app, flags, logging

from concept_diffusion import experiment
from concept_diffusion.experiment import Variant

_WORKDIR = flags.DEFINE_string("workdir", "runs/grid/synthetic", "Runs and results go here.")
_SOURCE = flags.DEFINE_string("source", "synthetic", "data.source of every run.")
_GRID = flags.DEFINE_enum("grid", "full", ["full", "text"], "Which rows (see GRIDS).")
_ONLY = flags.DEFINE_list("only", [], "Only these rows (names), after `default`.")
_PROMPTS = flags.DEFINE_integer("num_prompts", 256, "Held-out prompts per row.")
_BASELINES = flags.DEFINE_list("baselines", ["ar", "mdm"], "Flat baselines to train and show.")

# Rows that train a concept model were measured as one change from the previous default,
# whose concept learning rate was 1e-3 (row lr1e-3): 3e-3, the default now, was found
# last, and those rows were not retrained.
PREV = {"train.learning_rate": 1e-3}


def from_prev(v: Variant) -> Variant:
  """The row `v`, one change from the previous default (concept learning rate 1e-3)."""
  return dataclasses.replace(v, axis=f"{v.axis}, lr 1e-3", concepts={**PREV, **v.concepts})


FULL = [
    Variant("default"),  # The shipped tiny presets (configs/render.py, configs/concepts.py).
    # How the concept head is sampled (no training: the default runs).
    Variant("temp1.0", "sampling", sample={"temperature": 1.0}),
    Variant("temp0.0", "sampling", sample={"temperature": 0.0}),
    Variant("temp0.75", "sampling", sample={"temperature": 0.75}),
    Variant("temp1.0_steps64", "sampling", sample={"temperature": 1.0, "concept_steps": 64}),
    Variant("steps4", "sampling", sample={"concept_steps": 4}),
    Variant("steps64", "sampling", sample={"concept_steps": 64}),
    Variant("cfg2", "sampling", sample={"guidance": 2.0}),
    # Self-consistency: C candidates of every concept, the consensus one kept.
    Variant("cand8", "sampling", sample={"num_candidates": 8}),
    Variant("cand8_temp1.0", "sampling", sample={"num_candidates": 8, "temperature": 1.0}),
    # The concept model reads its raw samples, and all chunks render at once at the end
    # (the default re-encodes each rendered chunk as context).
    Variant("no_reencode", "sampling", sample={"reencode": False}),
    # The previous default, and one change from it per row below.
    Variant("lr1e-3", "concept learning rate", concepts=PREV),
    *map(from_prev, [
        # The concept head.
        Variant("mse", "concept head", concepts={"concepts.objective": "mse"}),
        Variant("x0", "concept head", concepts={"concepts.objective": "x0"}),
        Variant("render_in_loop", "concept head", concepts={"concepts.render_weight": 1.0}),
        # Noise on z while training the renderer, and rendering generated concepts.
        Variant("z_noise0.1", "render z noise", render={"render.z_noise": 0.1}),
        Variant("generated", "render z noise", finetune={}),
        # Granularity: what one concept holds (the old default: sentences cut at 8 tokens).
        Variant("sentence_capped8", "granularity", render={"data.concept_len": 8,
                                                           "data.num_concepts": 16}),
        Variant("span8", "granularity", render={"data.granularity": "span",
                                                "data.concept_len": 8, "data.num_concepts": 16}),
        Variant("span16", "granularity", render={"data.granularity": "span"}),
        # The render objective's mix of fully masked examples and mask rates.
        Variant("elbo", "render objective", render={"render.full_mask_prob": 0.0,
                                                    "render.mask_rate": "uniform"}),
        Variant("all_masked", "render objective", render={"render.full_mask_prob": 1.0}),
        # The concept model's size.
        Variant("layers4", "concept model", concepts={"model.concept_layers": 4}),
        Variant("width256", "concept model", concepts={"model.embed_dim": 256,
                                                       "model.mlp_dim": 1024}),
    ]),
    # From the default: a deeper concept model, its steps cut to keep the pipeline's
    # training FLOPs (the frozen encoder's forward is half of them).
    Variant("layers4_eqflops", "concept model", concepts={"model.concept_layers": 4,
                                                          "train.num_steps": 2141}),
    # From the default: a higher concept learning rate, and twice the concept steps
    # (1.8x the pipeline's FLOPs).
    Variant("lr1e-2", "concept learning rate", concepts={"train.learning_rate": 1e-2}),
    Variant("steps4800", "concept steps", concepts={"train.num_steps": 4800}),
    # From the default: half the batch, twice the steps (the same examples, equal FLOPs).
    Variant("batch16_eqflops", "concept batch", concepts={"train.batch_size": 16,
                                                          "train.num_steps": 4800}),
    # From the default: the concept model trains on a cache of 25,600 examples encoded
    # once, 6.6 epochs over it; the encoder's forward no longer runs in every step, so
    # 5,310 steps fit in the pipeline's FLOPs instead of 2,400.
    # From the default: the frozen renderer in the loop (the head's clean estimate of the
    # next concept must render its chunk), a token-level signal on 4 chunks per example;
    # at 2,400 steps (1.5x the FLOPs) and cut to 1,143 steps (equal FLOPs).
    Variant("render_loop", "concept loss", concepts={"concepts.render_weight": 1.0}),
    Variant("render_loop_eqflops", "concept loss", concepts={"concepts.render_weight": 1.0,
                                                             "train.num_steps": 1143}),
    Variant("cache25k_eqflops", "concept steps (cache)", concepts={"train.num_steps": 5310},
            cache_examples=25_600),
]
# Real text: sentences of 16 tokens under unit z noise are too much for a tiny encoder
# (round-trip 0.14), so the text grid also tries 8-token chunks with little noise, and
# the same with a render stage 4x as long (4x its FLOPs): is the renderer what limits?
SHORT_CLEAN = from_prev(Variant("sentence_capped8_z0.1", "granularity + z noise",
                                render={"data.concept_len": 8, "data.num_concepts": 16,
                                        "render.z_noise": 0.1}))
SHORT_CLEAN_LONG = dataclasses.replace(
    SHORT_CLEAN, name="capped8_z0.1_render4x", axis=f"{SHORT_CLEAN.axis}, render steps x4",
    render={**SHORT_CLEAN.render, "train.num_steps": 2400})
TEXT = [v for v in FULL if v.name in ("default", "no_reencode", "temp1.0", "cand8",
                                      "cand8_temp1.0", "lr1e-3", "z_noise0.1")] + [
                                          SHORT_CLEAN, SHORT_CLEAN_LONG]
GRIDS = {"full": FULL, "text": TEXT}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Library INFO logs drown the progress lines.
    logging.set_verbosity(logging.WARNING)
  grid = GRIDS[_GRID.value]
  if _ONLY.value:
    grid = [v for v in grid if v.name == "default" or v.name in _ONLY.value]
  result = experiment.run_grid(grid, _WORKDIR.value, source=_SOURCE.value,
                               num_prompts=_PROMPTS.value, baselines=tuple(_BASELINES.value))
  print(experiment.markdown_table(result))


if __name__ == "__main__":
  sys.exit(app.run(main))
