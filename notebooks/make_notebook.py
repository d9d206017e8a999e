"""Writes notebooks/concept_diffusion_colab.ipynb from the cells below (outputs empty).

  python notebooks/make_notebook.py        # after editing a cell here
"""

import pathlib

import nbformat

OUT = pathlib.Path(__file__).with_name("concept_diffusion_colab.ipynb")

CELLS = [
    ("markdown", """\
# concept_diffusion: restore, generate, watch, plot, evaluate

This notebook restores a **render** run (concept encoder + renderer) and a **concepts**
run (causal concept model with a diffusion head) onto a single device, whatever mesh
wrote them, then:

1. continues a prompt: prompt → sentences → concepts → the concept model samples new
   concepts → the renderer fills all their tokens in parallel;
2. shows the renderer's denoising steps (`_` = a still-masked token);
3. round-trips text through the encoder and renderer;
4. plots the training curves from each run's `metrics.jsonl`;
5. prints the held-out evaluation table.

Point `RENDER_WORKDIR` / `CONCEPTS_WORKDIR` at your runs (a local path or a mounted
Drive folder), in the next cell or through environment variables of the same name.
If they hold no checkpoint, the notebook trains tiny demo runs on the built-in
synthetic corpus first (a few minutes on a Colab CPU)."""),
    ("code", """\
import os

RENDER_WORKDIR = os.environ.get("RENDER_WORKDIR", "/content/runs/render")
CONCEPTS_WORKDIR = os.environ.get("CONCEPTS_WORKDIR", "/content/runs/concepts")
JUDGE_WORKDIR = os.environ.get("JUDGE_WORKDIR", "")  # Optional ar run: adds gen_ppl to the table.
PROMPT = os.environ.get("PROMPT", "Mara lives in Oslo. Mara works as a baker.")
NUM_CONCEPTS = int(os.environ.get("NUM_CONCEPTS", "6"))
EVAL_PROMPTS = int(os.environ.get("EVAL_PROMPTS", "16"))  # Held-out prompts for generation metrics.
EVAL_BATCHES = int(os.environ.get("EVAL_BATCHES", "4"))  # Held-out batches for likelihood metrics.
EVAL_BATCH_SIZE = int(os.environ.get("EVAL_BATCH_SIZE", "32"))
EVAL_MAX_TOKENS = int(os.environ.get("EVAL_MAX_TOKENS", "64"))  # Token budget per continuation.
DEMO_TRAIN_STEPS = int(os.environ.get("DEMO_TRAIN_STEPS", "600"))  # Only if no checkpoint exists.
REPO_URL = os.environ.get("CONCEPT_DIFFUSION_REPO",
                          "https://github.com/concept-diffusion/concept_diffusion")"""),
    ("markdown", """\
Install the package (skipped when it is importable already, e.g. in CI or a local
checkout). On Colab, if pip upgrades `jax`, restart the runtime once and run again."""),
    ("code", """\
try:
  import concept_diffusion
except ImportError:
  !pip install -q "git+{REPO_URL}"
  import concept_diffusion
print("concept_diffusion", concept_diffusion.__version__)"""),
    ("code", """\
from absl import logging
import jax

from concept_diffusion import config as config_lib
from concept_diffusion import evaluation, generate, train
from concept_diffusion.train import checkpoint

logging.set_verbosity(logging.ERROR)  # Orbax's read-only notices.
print(jax.devices())"""),
    ("markdown", "Train tiny demo runs only if the workdirs hold no checkpoint."),
    ("code", """\
def has_checkpoint(workdir):
  try:
    checkpoint.latest_meta(workdir)
    return True
  except Exception:
    return False


def demo_config(stage, **fields):
  c = config_lib.base_config()
  c.stage = stage
  c.train.num_steps, c.train.warmup_steps, c.train.log_every = DEMO_TRAIN_STEPS, 50, 100
  c.train.batch_size, c.checkpoint.every_steps = 16, DEMO_TRAIN_STEPS
  c.model.embed_dim, c.model.mlp_dim, c.model.concept_dim = 128, 256, 64
  for field, value in fields.items():
    section, name = field.split("__")
    c[section][name] = value
  return c


if not has_checkpoint(RENDER_WORKDIR):
  train.train(demo_config("render"), RENDER_WORKDIR)
if not has_checkpoint(CONCEPTS_WORKDIR):
  concepts_config = demo_config("concepts", concepts__render_workdir=RENDER_WORKDIR)
  train.train(concepts_config, CONCEPTS_WORKDIR)"""),
    ("markdown", """\
## Restore onto one device

`generate.load` restores with `train.restore_params` onto the mesh given here: a
single device, whatever mesh and process count wrote the checkpoint."""),
    ("code", """\
mesh = generate.local_mesh(jax.devices()[:1])
gen = generate.load(CONCEPTS_WORKDIR, mesh=mesh, render_workdir=RENDER_WORKDIR)
for name, workdir in (("render", RENDER_WORKDIR), ("concepts", CONCEPTS_WORKDIR)):
  step, meta = checkpoint.latest_meta(workdir)
  print(f"{name}: step {step}, written on mesh {meta['mesh']} by {meta['process_count']} "
        f"process(es); restored on {mesh.devices.size} device")"""),
    ("markdown", "## Generate\n\n"
                 "The whole continuation (concept loop + parallel rendering) is one jitted call."),
    ("code", """\
samples = generate.generate(gen, [PROMPT], num_concepts=NUM_CONCEPTS, show_steps=True, seed=0)
print(generate.format_samples(samples))"""),
    ("markdown", "## Watch concepts become words\n\n"
                 "Every renderer step, on all generated chunks at once; `_` is a masked token."),
    ("code", """\
for i, text in enumerate(samples[0].steps):
  print(f"step {i + 1:>2}: {text}")"""),
    ("markdown", "## Round trip: text → concepts → text (render run alone)"),
    ("code", """\
render_gen = generate.load(RENDER_WORKDIR, mesh=mesh)
for s in generate.roundtrip(render_gen, [PROMPT]):
  print("in: ", s.prompt)
  print("out:", s.text)"""),
    ("markdown", "## Training curves"),
    ("code", """\
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, (name, workdir) in zip(axes, (("render", RENDER_WORKDIR), ("concepts", CONCEPTS_WORKDIR))):
  records = [r for r in evaluation.load_metrics(workdir) if "loss" in r]
  ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
  ax.set(title=f"{name} loss", xlabel="step", ylabel="loss")
fig.tight_layout()
plt.show()"""),
    ("markdown", "## Held-out evaluation\n\n"
                 "Metric definitions: `concept_diffusion/evaluation.py` (and the README)."),
    ("code", """\
budget = dict(max_batches=EVAL_BATCHES, batch_size=EVAL_BATCH_SIZE, max_tokens=EVAL_MAX_TOKENS,
              write=False)
results = {
    "render": evaluation.evaluate(RENDER_WORKDIR, gen=render_gen, num_prompts=0, **budget),
    "concepts": evaluation.evaluate(CONCEPTS_WORKDIR, gen=gen, judge_workdir=JUDGE_WORKDIR or None,
                                    num_prompts=EVAL_PROMPTS, **budget),
}
print(evaluation.format_table(results))"""),
]


def build() -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3",
                                     "language": "python"},
                      "language_info": {"name": "python"},
                      "colab": {"provenance": []}})
  make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
  nb.cells = [make[kind](source) for kind, source in CELLS]
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i:02d}"  # Stable ids: regenerating changes nothing unless a cell did.
  return nb


if __name__ == "__main__":
  nbformat.write(build(), OUT)
  print(f"wrote {OUT}")
