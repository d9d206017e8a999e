"""Preprocessing to ArrayRecord shards, and training data read back from them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.data import DataError, make_dataset, make_tokenizer, train_tokenizer
from concept_diffusion.data import iterate_documents
from concept_diffusion.data.preprocess import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(source="synthetic"):
  config = config_lib.base_config()
  config.data.update(source=source, vocab_size=128, tokenizer_docs=100, eval_docs=10,
                     num_concepts=8, concept_len=6, seq_len=48)
  config.train.batch_size = 4
  return config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  work = tmp_path_factory.mktemp("work")
  config = make_config()
  tok = make_tokenizer(config, str(work))
  stats = preprocess(config, tok, str(work / "shards"), num_shards=3, num_docs=60)
  return work, tok, stats


def test_preprocess_writes_shards_and_stats(shards):
  work, _, stats = shards
  names = sorted(os.listdir(work / "shards"))
  assert names == ["eval-00000-of-00001.array_record", "stats.json", "tokenizer.model"] + [
      f"train-0000{i}-of-00003.array_record" for i in range(3)]
  on_disk = json.loads((work / "shards" / "stats.json").read_text())
  assert on_disk["train_documents"] == 60 and on_disk["eval_documents"] == 10
  for key in ("documents", "sentences", "chunks", "tokens", "skipped"):
    assert key in on_disk
  assert on_disk["chunks"] >= on_disk["sentences"] + on_disk["documents"]  # END chunks.


def test_arrayrecord_source_reads_the_shards(shards, tmp_path):
  work, tok, _ = shards
  config = make_config(f"arrayrecord:{work}/shards/*")
  assert make_tokenizer(config, str(tmp_path)).model_proto == tok.model_proto  # Copied over.
  assert list(iterate_documents(config, "eval")) == list(iterate_documents(make_config(), "eval"))
  from_shards = list(make_dataset(config, tok, split="eval", view="concepts"))
  from_source = list(make_dataset(make_config(), tok, split="eval", view="concepts"))
  for a, b in zip(from_shards, from_source, strict=True):  # Same documents, same batches.
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  batch = next(iter(make_dataset(config, tok, split="train", view="flat")))
  assert batch["tokens"].shape == (4, 48)


def test_shards_need_their_tokenizer(shards):
  work, _, _ = shards
  other = train_tokenizer(["Some other corpus entirely. With words."] * 20, vocab_size=64)
  with pytest.raises(DataError, match="were tokenized with"):
    make_dataset(make_config(f"arrayrecord:{work}/shards/*"), other, split="train", view="flat")


def test_bad_shards(tmp_path, shards):
  _, tok, _ = shards
  (tmp_path / "train-0.array_record").write_bytes(b"")
  with pytest.raises(DataError, match="train-0.array_record is empty"):
    make_dataset(make_config(f"arrayrecord:{tmp_path}/*"), tok, split="train", view="flat")
  with pytest.raises(DataError, match="no eval shards"):
    make_dataset(make_config(f"arrayrecord:{tmp_path}/*"), tok, split="eval", view="flat")


def test_preprocess_text_source_counts_skips(tmp_path, shards):
  _, tok, _ = shards
  (tmp_path / "a.txt").write_bytes(b"Good one. Fine.\n\nBad \xff byte.\n\n" + b"Another fine doc.")
  config = make_config(f"text:{tmp_path}/a.txt")
  config.data.eval_fraction = 0.0
  stats = preprocess(config, tok, str(tmp_path / "out"), num_shards=1)
  assert stats["train_documents"] == 2 and stats["skipped_invalid_utf8"] == 1
  assert stats["skipped"] == 1


def test_cli(tmp_path):
  config_file = tmp_path / "cfg.py"
  config_file.write_text(
      "from concept_diffusion import config\n"
      "def get_config():\n"
      "  c = config.base_config()\n"
      "  c.data.vocab_size, c.data.tokenizer_docs, c.data.eval_docs = 128, 50, 5\n"
      "  return c\n")
  result = subprocess.run(
      [sys.executable, "-m", "concept_diffusion.data.preprocess", f"--config={config_file}",
       f"--workdir={tmp_path}/w", f"--output={tmp_path}/s", "--num_shards=2", "--num_docs=20",
       "--config.data.concept_len=4"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert "preprocess: " in result.stderr  # Progress line.
  stats = json.loads((tmp_path / "s" / "stats.json").read_text())
  assert stats["train_documents"] == 20 and stats["concept_len"] == 4
  assert (tmp_path / "w" / "tokenizer" / "tokenizer.model").is_file()
