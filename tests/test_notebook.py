"""The Colab notebook runs top to bottom on tiny checkpoints (as CI would run it)."""

import nbformat
from nbclient import NotebookClient

from conftest import ROOT, subprocess_env

NOTEBOOK = ROOT / "notebooks" / "concept_diffusion_colab.ipynb"


def test_notebook_is_generated_from_make_notebook():
  import importlib.util
  path = ROOT / "notebooks" / "make_notebook.py"
  spec = importlib.util.spec_from_file_location("make_notebook", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  on_disk = nbformat.read(NOTEBOOK, as_version=4)
  assert [c.source for c in on_disk.cells] == [c.source for c in module.build().cells], (
      "notebook out of date: run python notebooks/make_notebook.py")


def test_notebook_executes_on_tiny_checkpoints(tiny_render_run, tiny_concepts_run, tiny_ar_run,
                                               monkeypatch, tmp_path):
  env = subprocess_env(1)  # The kernel inherits this process's environment.
  env.update(RENDER_WORKDIR=tiny_render_run, CONCEPTS_WORKDIR=tiny_concepts_run,
             JUDGE_WORKDIR=tiny_ar_run, NUM_CONCEPTS="3", DEMO_TRAIN_STEPS="0",
             # The evaluation budget of test_evaluate: its compiled programs are reused.
             EVAL_PROMPTS="4", EVAL_BATCHES="1", EVAL_BATCH_SIZE="8", EVAL_MAX_TOKENS="16")
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = {c.id: "".join(o.get("text", "") for o in c.get("outputs", []))
             for c in nb.cells if c.cell_type == "code"}
  text = "\n".join(outputs.values())
  assert "written on mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in text
  assert "restored on 1 device" in text
  assert "output: " in text and "step  1:" in text
  assert "| next_concept_l2" in text and "| roundtrip_token_accuracy" in text
