"""SentencePiece tokenizer with the project's fixed special ids.

  tok = train_tokenizer(documents, vocab_size=1024)
  tok.save(workdir + "/tokenizer"); tok = Tokenizer.load(workdir + "/tokenizer")
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from concept_diffusion.data.errors import DataError

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
MASK_ID = 4
EOD_ID = 5
NUM_SPECIAL = 6
MODEL_FILE = "tokenizer.model"

# Pieces the trainer must put at fixed ids; checked again when a model is loaded.
_SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>",
                   MASK_ID: "<mask>", EOD_ID: "<eod>"}
_DROPPED_ON_DECODE = frozenset((PAD_ID, BOS_ID, EOS_ID, MASK_ID, EOD_ID))
# The trainer silently skips longer inputs, so long sentences are cut to this many chars.
_MAX_TRAIN_PIECE_CHARS = 2000
# Byte fallback spends 256 ids on raw bytes: only worth it in larger vocabularies.
_BYTE_FALLBACK_MIN_VOCAB = 4096


class Tokenizer:
  """Encodes text to ids and back; ids 0..5 are PAD, UNK, BOS, EOS, MASK, EOD."""

  def __init__(self, model_proto: bytes, origin: str = "<memory>"):
    self.model_proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    for piece_id, piece in _SPECIAL_PIECES.items():
      if self._sp.id_to_piece(piece_id) != piece:
        raise DataError(f"{origin}: tokenizer id {piece_id} is "
                        f"{self._sp.id_to_piece(piece_id)!r}, expected {piece!r}; "
                        "train it with concept_diffusion.data.train_tokenizer")
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.unk_id, self.bos_id = PAD_ID, UNK_ID, BOS_ID
    self.eos_id, self.mask_id, self.eod_id = EOS_ID, MASK_ID, EOD_ID

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without BOS/EOS."""
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text."""
    # A loop: SentencePiece's list call starts threads, ~7x slower on short sentences.
    encode = self._sp.encode
    return [encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special ids other than UNK are dropped."""
    return self._sp.decode([int(i) for i in ids if int(i) not in _DROPPED_ON_DECODE])

  def id_to_piece(self, piece_id: int) -> str:
    return self._sp.id_to_piece(int(piece_id))

  @property
  def fingerprint(self) -> str:
    """Short hash of the model, stored next to preprocessed shards."""
    return hashlib.sha256(self.model_proto).hexdigest()[:16]

  def save(self, directory: str) -> str:
    """Writes DIR/tokenizer.model atomically; returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MODEL_FILE)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "wb") as f:
      f.write(self.model_proto)
    os.replace(tmp_path, path)  # Concurrent writers (several processes) never leave half a file.
    return path

  @classmethod
  def load(cls, directory: str) -> "Tokenizer":
    """Reads DIR/tokenizer.model (DIR may also be the model file itself)."""
    path = directory if directory.endswith(".model") else os.path.join(directory, MODEL_FILE)
    if not os.path.isfile(path):
      raise DataError(f"no tokenizer model at {path}")
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return cls(proto, origin=path)
    except RuntimeError as e:  # SentencePiece's parse error says nothing of the file.
      raise DataError(f"{path} is not a SentencePiece model: {e}") from e


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
  """Sentences of every document, long ones cut so the trainer does not drop them."""
  from concept_diffusion.data import segment  # pylint: disable=g-import-not-at-top  (cycle)
  for text in texts:
    for sentence in segment.split_sentences(text):
      for start in range(0, len(sentence), _MAX_TRAIN_PIECE_CHARS):
        yield sentence[start:start + _MAX_TRAIN_PIECE_CHARS]


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    model_type: str = "bpe") -> Tokenizer:
  """Trains a deterministic SentencePiece model (same texts -> byte-identical model)."""
  if vocab_size <= NUM_SPECIAL + 2:
    raise DataError(f"data.vocab_size={vocab_size} is too small for a tokenizer")
  pieces = list(_training_pieces(texts))
  if not pieces:
    raise DataError("no text to train the tokenizer on (every document was empty)")
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(pieces), model_writer=writer,
      vocab_size=vocab_size, model_type=model_type,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      control_symbols=[_SPECIAL_PIECES[MASK_ID], _SPECIAL_PIECES[EOD_ID]],
      byte_fallback=vocab_size >= _BYTE_FALLBACK_MIN_VOCAB,
      # Determinism: one thread, input order kept, no sampling of the input.
      num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
      # A small corpus may not support the full vocabulary: take fewer pieces, do not fail.
      hard_vocab_limit=False,
      max_sentence_length=4 * _MAX_TRAIN_PIECE_CHARS + 16,
      minloglevel=2)
  return Tokenizer(writer.getvalue())
