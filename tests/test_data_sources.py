"""Document sources, the train/eval split, and what bad input gets."""

import json
import logging

import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.data import DataError, iterate_documents, parse_source, sources
from concept_diffusion.data.synthetic import generate_document


def make_config(source, **data):
  config = config_lib.base_config()
  config.data.source = source
  config.data.eval_docs = 8
  for key, value in data.items():
    config.data[key] = value
  return config


def docs(config, split):
  return list(iterate_documents(config, split))


def test_parse_source():
  assert parse_source("synthetic").kind == "synthetic"
  assert parse_source("text:/d/*.txt") == ("text", "/d/*.txt", "text")
  assert parse_source("jsonl:/d/*.jsonl") == ("jsonl", "/d/*.jsonl", "text")
  assert parse_source("jsonl:/d/*.jsonl:body") == ("jsonl", "/d/*.jsonl", "body")
  assert parse_source("jsonl:gs://b/x.jsonl") == ("jsonl", "gs://b/x.jsonl", "text")
  with pytest.raises(DataError, match="data.source"):
    parse_source("csv:/x")


def test_synthetic_split():
  config = make_config("synthetic")
  eval_docs = docs(config, "eval")
  assert eval_docs == [generate_document(0, i) for i in range(8)]
  source = sources.document_source(config, "train")
  assert len(source) > 2**30  # Unlimited in practice.
  assert source[0] == generate_document(0, 8)


def test_synthetic_dev_split_is_another_draw_no_run_trains_on():
  config = make_config("synthetic")
  dev = docs(config, "dev")
  assert dev == [generate_document(sources.DEV_SEED_SHIFT, i) for i in range(8)]
  assert not set(dev) & set(docs(config, "eval"))
  train = sources.document_source(config, "train")
  assert not set(dev) & {train[i] for i in range(200)}
  with pytest.raises(DataError, match="split='test'"):
    docs(config, "test")


def test_text_dev_split_is_the_eval_split_from_its_end(tmp_path):
  texts = [f"Document number {i}. It has two sentences." for i in range(200)]
  write_text(tmp_path / "a.txt", texts)
  config = make_config(f"text:{tmp_path}/*.txt", eval_fraction=0.2)
  assert docs(config, "dev") == docs(config, "eval")[::-1]


def write_text(path, documents, sep="\n\n"):
  path.write_text(sep.join(documents), encoding="utf-8")
  return path


def test_text_source_splits_by_stable_hash(tmp_path):
  texts = [f"Document number {i}. It has two sentences." for i in range(200)]
  write_text(tmp_path / "a.txt", texts[:100])
  write_text(tmp_path / "b.txt", texts[100:], sep="\n  \n\n")
  config = make_config(f"text:{tmp_path}/*.txt", eval_fraction=0.2)
  train, held_out = docs(config, "train"), docs(config, "eval")
  assert sorted(train + held_out) == sorted(texts)
  assert 20 <= len(held_out) <= 60
  assert all(sources.split_of(t, 0.2) == "eval" for t in held_out)


def test_jsonl_source_with_field(tmp_path):
  lines = [json.dumps({"body": f"Line {i} text.", "id": i}) for i in range(50)]
  (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n\n")
  config = make_config(f"jsonl:{tmp_path}/*.jsonl:body", eval_fraction=0.1)
  assert len(docs(config, "train")) + len(docs(config, "eval")) == 50


def test_missing_file_and_empty_glob(tmp_path):
  with pytest.raises(DataError, match="file not found: .*nope.txt"):
    docs(make_config(f"text:{tmp_path}/nope.txt"), "train")
  with pytest.raises(DataError, match=r"no file matches .*\*\.txt"):
    docs(make_config(f"text:{tmp_path}/*.txt"), "train")


def test_binary_file_is_an_error_naming_it(tmp_path):
  write_text(tmp_path / "good.txt", ["Fine text."] * 3)
  (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 40)
  with pytest.raises(DataError, match="image.txt looks like a binary file"):
    docs(make_config(f"text:{tmp_path}/*.txt"), "train")


def test_bad_documents_are_skipped_and_counted(tmp_path, caplog):
  good = [f"Good document {i}. Fine." for i in range(20)]
  bad = b"\n\nBad \xff\xfe bytes here.\n\nBad \xc3 again.\n\nword\n"
  payload = "\n\n".join(good).encode() + bad
  (tmp_path / "mixed.txt").write_bytes(payload)
  config = make_config(f"text:{tmp_path}/*.txt", eval_fraction=0.0)
  with caplog.at_level(logging.WARNING):
    train = docs(config, "train")
  assert len(train) == 21 and train[-1] == "word"  # A one-word document is a document.
  stats = sources.document_source(config, "train").stats
  assert stats["skipped_invalid_utf8"] == 2
  assert sum("invalid utf8" in r.getMessage() for r in caplog.records) == 1  # Logged once.
  assert "mixed.txt:" in caplog.text


def test_long_lines_are_truncated(tmp_path):
  write_text(tmp_path / "long.txt", ["x" * 1_200_000, "Short one."])
  config = make_config(f"text:{tmp_path}/*.txt", eval_fraction=0.0, max_doc_chars=1_000_000)
  train = docs(config, "train")
  assert sorted(len(t) for t in train) == [10, 1_000_000]
  assert sources.document_source(config, "train").stats["truncated_long_document"] == 1


def test_bad_jsonl_lines_are_skipped_and_counted(tmp_path):
  lines = [json.dumps({"text": f"Doc {i}."}) for i in range(10)]
  lines += ["{not json", json.dumps({"title": "no text field"}), json.dumps({"text": ""}),
            json.dumps({"text": 7}), json.dumps(["a list"])]
  (tmp_path / "d.jsonl").write_bytes("\n".join(lines).encode() + b'\n{"text": "bad \xff"}\n')
  config = make_config(f"jsonl:{tmp_path}/d.jsonl", eval_fraction=0.0)
  assert len(docs(config, "train")) == 10
  stats = sources.document_source(config, "train").stats
  assert stats["skipped_invalid_utf8"] == 1
  assert (stats["skipped_bad_json"], stats["skipped_missing_field"], stats["skipped_empty"],
          stats["skipped_field_not_string"]) == (1, 2, 1, 1)


def test_jsonl_without_the_field_is_an_error(tmp_path):
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": "x"}) for _ in range(5)))
  with pytest.raises(DataError, match=r"d.jsonl: none of its 5 documents.*field='text'"):
    docs(make_config(f"jsonl:{tmp_path}/d.jsonl"), "train")


def test_only_empty_files_is_an_error(tmp_path):
  (tmp_path / "a.txt").write_text("\n\n  \n")
  with pytest.raises(DataError, match="no usable documents"):
    docs(make_config(f"text:{tmp_path}/*.txt"), "train")


def test_empty_eval_split_is_an_error(tmp_path):
  write_text(tmp_path / "a.txt", ["One doc."])
  with pytest.raises(DataError, match="eval split .* is empty"):
    sources.document_source(make_config(f"text:{tmp_path}/a.txt", eval_fraction=0.0), "eval")


def test_record_round_trip():
  import numpy as np  # pylint: disable=g-import-not-at-top
  doc = sources.TokenizedDoc(np.array([7, 8, 9, 60000], np.int32), np.array([1, 3], np.int32))
  back, text = sources.decode_record(sources.encode_record(doc, "héllo", 65536))
  np.testing.assert_array_equal(back.tokens_T, doc.tokens_T)
  np.testing.assert_array_equal(back.sentence_lens_S, doc.sentence_lens_S)
  assert text == "héllo"
  with pytest.raises(DataError, match="not a concept_diffusion record"):
    sources.decode_record(b"garbage bytes here")
