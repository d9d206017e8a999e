"""SentencePiece tokenizer: special ids, round trip, determinism, save/load, make_tokenizer."""

import os

import pytest

from concept_diffusion import config as config_lib
from concept_diffusion.data import DataError, Tokenizer, make_tokenizer, train_tokenizer
from concept_diffusion.data import tokenizer as tokenizer_lib
from concept_diffusion.data.synthetic import generate_document

DOCS = [generate_document(0, i) for i in range(200)]


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(DOCS, vocab_size=160)


def test_special_ids(tok):
  ids = (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.eod_id)
  assert ids == (0, 1, 2, 3, 4, 5)
  assert tok.id_to_piece(tokenizer_lib.MASK_ID) == "<mask>"
  assert tok.id_to_piece(tokenizer_lib.EOD_ID) == "<eod>"
  assert 6 < tok.vocab_size <= 160


def test_round_trip(tok):
  for doc in DOCS[:20]:
    ids = tok.encode(doc)
    assert min(ids) > tokenizer_lib.EOD_ID or tokenizer_lib.UNK_ID in ids
    assert tok.decode(ids) == doc


def test_decode_drops_special_ids(tok):
  ids = tok.encode("Mara has a cat.")
  assert tok.decode([2] + ids[:2] + [4, 0] + ids[2:] + [5, 3, 0]) == "Mara has a cat."
  assert tokenizer_lib.MASK_ID not in tok.encode("<mask> <eod>")  # Control symbols stay text.


def test_training_is_deterministic(tmp_path, tok):
  again = train_tokenizer(DOCS, vocab_size=160)
  a, b = tok.save(str(tmp_path / "a")), again.save(str(tmp_path / "b"))
  assert open(a, "rb").read() == open(b, "rb").read()


def test_save_load(tmp_path, tok):
  tok.save(str(tmp_path))
  loaded = Tokenizer.load(str(tmp_path))
  assert loaded.model_proto == tok.model_proto
  assert loaded.encode(DOCS[0]) == tok.encode(DOCS[0])


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match="no tokenizer model"):
    Tokenizer.load(str(tmp_path))
  (tmp_path / "tokenizer.model").write_bytes(b"not a model")
  with pytest.raises(DataError, match="tokenizer.model"):
    Tokenizer.load(str(tmp_path))


def test_train_rejects_empty_text():
  with pytest.raises(DataError, match="no text"):
    train_tokenizer(["", "   "], vocab_size=128)


def test_long_sentences_are_kept():
  text = "abcdefghij " * 1000  # One 11 kB "sentence": SentencePiece alone would drop it.
  tok = train_tokenizer([text], vocab_size=64)
  assert tok.decode(tok.encode("abcdefghij")) == "abcdefghij"


def test_make_tokenizer_trains_once_then_loads(tmp_path):
  config = config_lib.base_config()
  config.data.vocab_size, config.data.tokenizer_docs = 128, 100
  first = make_tokenizer(config, str(tmp_path))
  path = tmp_path / "tokenizer" / "tokenizer.model"
  assert path.is_file()
  mtime = os.path.getmtime(path)
  second = make_tokenizer(config, str(tmp_path))
  assert second.model_proto == first.model_proto and os.path.getmtime(path) == mtime
