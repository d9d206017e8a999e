"""Documents -> sentences -> token chunks (concepts), and the flat token view.

A tokenized document is `(tokens_T, sentence_lens_S)`: the ids of every sentence, end to
end, and each sentence's length. Both views are cut from it:
  concept view: `chunk_document(...) -> chunks_CxL` (END chunk [EOD_ID] last),
  flat view:    `flat_document(...) -> tokens_T` (BOS_ID first, EOD_ID last).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np

from concept_diffusion.data.tokenizer import BOS_ID, EOD_ID, PAD_ID

GRANULARITIES = ("sentence", "sentence_capped", "span")

# Words that end in a period without ending the sentence (compared lower-cased, no period).
ABBREVIATIONS = frozenset("""
    mr mrs ms dr prof st sr jr gen col capt lt sgt rev hon mt mssrs messrs
    no nos fig figs vol vols pp ch sec eq eqs vs cf al ca approx dept est
    e.g i.e a.k.a jan feb mar apr jun jul aug sep sept oct nov dec
    """.split())
_OPENERS = "\"'“‘«([{"
# Terminal punctuation, optional closing quotes/brackets, then whitespace: a candidate end.
_CANDIDATE = re.compile(r"([.!?…]+)([\"'”’»)\]}]*)\s+")
# East Asian full stops end a sentence without any following space.
_CJK_END = re.compile(r"[。！？]+[」』”’）]*")
_DOTTED_ACRONYM = re.compile(r"^(?:[A-Za-z]\.)+[A-Za-z]$")  # U.S, e.g, a.m (final period cut).
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_ENDS_SENTENCE = re.compile(r"[.!?…。！？][\"'”’»)\]}」』]*$")


class TokenizedDoc(NamedTuple):
  """One document's token ids, sentences end to end, with each sentence's length."""
  tokens_T: np.ndarray  # int32
  sentence_lens_S: np.ndarray  # int32, all > 0, sums to len(tokens_T)


def _word_before(text: str, end: int) -> str:
  """The whitespace-delimited word that ends at `end`, opening quotes stripped."""
  start = end
  while start > 0 and not text[start - 1].isspace():
    start -= 1
  return text[start:end].lstrip(_OPENERS)


def _is_boundary(text: str, match: re.Match) -> bool:
  """Whether a candidate end (punctuation + space) really ends the sentence."""
  rest = match.end()
  while rest < len(text) and text[rest] in _OPENERS:
    rest += 1
  if rest < len(text) and text[rest].islower():
    return False  # "e.g. the", "He said "Stop!" and left": the sentence goes on.
  if match.group(1) != ".":
    return True  # "!", "?", "..." followed by a capital.
  word = _word_before(text, match.start(1))
  if word.lower() in ABBREVIATIONS:
    return False  # "Dr. Smith", "e.g. Paris".
  if len(word) == 1 and word.isalpha():
    return False  # An initial: "J. Smith".
  return not _DOTTED_ACRONYM.match(word)  # "the U.S. Navy" (ambiguous at a real end; kept).


def _split_line(text: str) -> list[str]:
  """Sentences of one line of running text."""
  pieces, start = [], 0
  for match in _CANDIDATE.finditer(text):
    if _is_boundary(text, match):
      pieces.append(text[start:match.end(2)])
      start = match.end()
  pieces.append(text[start:])
  return [sentence for piece in pieces for sentence in _split_cjk(piece)]


def _split_cjk(text: str) -> list[str]:
  """Splits after East Asian full stops, which take no space after them."""
  if not _CJK_END.search(text):
    return [text]
  pieces, start = [], 0
  for match in _CJK_END.finditer(text):
    pieces.append(text[start:match.end()])
    start = match.end()
  pieces.append(text[start:])
  return pieces


def _join_wrapped_lines(paragraph: str) -> list[str]:
  """Lines of a paragraph; a hard-wrapped line continues when the next starts lower-case."""
  units: list[str] = []
  for line in paragraph.split("\n"):
    line = line.strip()
    if not line:
      continue
    if units and line[0].islower() and not _ENDS_SENTENCE.search(units[-1]):
      units[-1] = f"{units[-1]} {line}"
    else:
      units.append(line)  # Headings, list items and new paragraphs start a sentence.
  return units


def split_sentences(text: str) -> list[str]:
  """Sentences of `text`; blank lines and unwrapped line breaks always end one."""
  sentences = []
  for paragraph in _PARAGRAPH.split(text):
    for unit in _join_wrapped_lines(paragraph):
      sentences.extend(s.strip() for s in _split_line(unit))
  return [s for s in sentences if s]


def tokenize_document(tokenizer, text: str) -> TokenizedDoc:
  """Sentence-splits and tokenizes one document (empty sentences dropped)."""
  ids = [s for s in tokenizer.encode_batch(split_sentences(text)) if s]
  if not ids:
    return TokenizedDoc(np.zeros((0,), np.int32), np.zeros((0,), np.int32))
  lens_S = np.fromiter((len(s) for s in ids), np.int32, len(ids))
  tokens_T = np.fromiter((t for s in ids for t in s), np.int32, int(lens_S.sum()))
  return TokenizedDoc(tokens_T, lens_S)


def _chunk_spans(sentence_lens_S: np.ndarray, granularity: str, chunk_len: int):
  """(start, length) of every chunk in the document's token stream, and tokens cut off."""
  starts_S = np.concatenate([[0], np.cumsum(sentence_lens_S)[:-1]]).astype(np.int64)
  if granularity == "sentence":
    lens_C = np.minimum(sentence_lens_S, chunk_len)
    return starts_S, lens_C, int((sentence_lens_S - lens_C).sum())
  if granularity == "sentence_capped":
    pieces_S = -(-sentence_lens_S // chunk_len)
    first_C = np.repeat(starts_S, pieces_S)
    sentence_end_C = np.repeat(starts_S + sentence_lens_S, pieces_S)
    piece_C = np.arange(len(first_C)) - np.repeat(np.cumsum(pieces_S) - pieces_S, pieces_S)
  elif granularity == "span":
    total = int(sentence_lens_S.sum())
    piece_C = np.arange(-(-total // chunk_len))
    first_C = np.zeros_like(piece_C)
    sentence_end_C = np.full_like(piece_C, total)
  else:
    raise ValueError(f"data.granularity={granularity!r} is not one of {GRANULARITIES}")
  starts_C = first_C + piece_C * chunk_len
  return starts_C, np.minimum(chunk_len, sentence_end_C - starts_C), 0


def chunk_document(doc: TokenizedDoc, granularity: str, chunk_len: int) -> tuple[np.ndarray, int]:
  """Concept chunks_CxL (PAD-padded) ending with the END chunk, and the tokens truncated."""
  starts_C, lens_C, overflow = _chunk_spans(doc.sentence_lens_S, granularity, chunk_len)
  offsets_L = np.arange(chunk_len)
  valid_CxL = offsets_L[None, :] < lens_C[:, None]
  index_CxL = np.minimum(starts_C[:, None] + offsets_L[None, :], max(len(doc.tokens_T) - 1, 0))
  chunks_CxL = np.full((len(starts_C) + 1, chunk_len), PAD_ID, np.int32)
  if len(doc.tokens_T):
    chunks_CxL[:-1] = np.where(valid_CxL, doc.tokens_T[index_CxL], PAD_ID)
  chunks_CxL[-1, 0] = EOD_ID
  return chunks_CxL, overflow


def flat_document(doc: TokenizedDoc) -> np.ndarray:
  """BOS, the document's tokens, EOD."""
  return np.concatenate([[BOS_ID], doc.tokens_T, [EOD_ID]]).astype(np.int32)


def join_chunks(tokenizer, chunks: Sequence[Sequence[int]]) -> str:
  """Text of a sequence of chunks (used to read back examples)."""
  return " ".join(t for t in (tokenizer.decode(c) for c in chunks) if t)
