"""Sentence splitting and cutting documents into concept chunks / flat rows."""

import numpy as np
import pytest

from concept_diffusion.data import segment
from concept_diffusion.data.tokenizer import BOS_ID, EOD_ID, PAD_ID

split = segment.split_sentences


@pytest.mark.parametrize("text, expected", [
    ("Dr. Smith came. Mr. Jones left.", ["Dr. Smith came.", "Mr. Jones left."]),
    ("Use tools, e.g. hammers. They help.", ["Use tools, e.g. hammers.", "They help."]),
    ("The U.S. economy grew. Prices rose.", ["The U.S. economy grew.", "Prices rose."]),
    ("It cost 3.14 dollars. Then 2.5 more.", ["It cost 3.14 dollars.", "Then 2.5 more."]),
    ('"He left." She stayed.', ['"He left."', "She stayed."]),
    ('He said "Stop!" and ran. Why?', ['He said "Stop!" and ran.', "Why?"]),
    ("Wait... Go now! Really?", ["Wait...", "Go now!", "Really?"]),
    ("J. R. Tolkien wrote. Fine.", ["J. R. Tolkien wrote.", "Fine."]),
    ("no punctuation at all here", ["no punctuation at all here"]),
    ("word", ["word"]),
    ("", []),
    ("  \n\n  ", []),
])
def test_split_sentences(text, expected):
  assert split(text) == expected


def test_split_newlines():
  text = "A Heading\nThe first line of\nwrapped prose ends here. Next.\n\nnew paragraph here"
  assert split(text) == ["A Heading", "The first line of wrapped prose ends here.", "Next.",
                         "new paragraph here"]


def test_split_list_lines_and_cjk():
  assert split("- apples\n- pears") == ["- apples", "- pears"]
  assert split("这是一句。这是另一句！") == ["这是一句。", "这是另一句！"]


def _doc(*sentence_lens):
  lens_S = np.array(sentence_lens, np.int32)
  return segment.TokenizedDoc(np.arange(10, 10 + lens_S.sum(), dtype=np.int32), lens_S)


def test_chunk_sentence_truncates_and_counts():
  chunks_CxL, overflow = segment.chunk_document(_doc(3, 6), "sentence", 4)
  assert overflow == 2
  np.testing.assert_array_equal(chunks_CxL, [[10, 11, 12, PAD_ID], [13, 14, 15, 16],
                                             [EOD_ID, PAD_ID, PAD_ID, PAD_ID]])


def test_chunk_sentence_capped_splits_long_sentences():
  chunks_CxL, overflow = segment.chunk_document(_doc(3, 6), "sentence_capped", 4)
  assert overflow == 0
  np.testing.assert_array_equal(chunks_CxL, [[10, 11, 12, 0], [13, 14, 15, 16], [17, 18, 0, 0],
                                             [EOD_ID, 0, 0, 0]])


def test_chunk_span_ignores_sentence_ends():
  chunks_CxL, _ = segment.chunk_document(_doc(3, 6), "span", 4)
  np.testing.assert_array_equal(chunks_CxL, [[10, 11, 12, 13], [14, 15, 16, 17], [18, 0, 0, 0],
                                             [EOD_ID, 0, 0, 0]])


@pytest.mark.parametrize("granularity", segment.GRANULARITIES)
def test_chunk_keeps_every_token_in_order(granularity):
  doc = _doc(1, 9, 4, 17, 2)
  chunks_CxL, overflow = segment.chunk_document(doc, granularity, 5)
  real = chunks_CxL[:-1][chunks_CxL[:-1] != PAD_ID]
  if granularity == "sentence":
    assert overflow == 4 + 12
  else:
    np.testing.assert_array_equal(real, doc.tokens_T)
  assert (chunks_CxL[:-1, 0] != PAD_ID).all()  # No empty chunk.


def test_chunk_one_word_document():
  chunks_CxL, _ = segment.chunk_document(_doc(1), "sentence_capped", 8)
  assert chunks_CxL.shape == (2, 8) and chunks_CxL[0, 0] == 10 and chunks_CxL[1, 0] == EOD_ID


def test_flat_document():
  np.testing.assert_array_equal(segment.flat_document(_doc(2, 1)), [BOS_ID, 10, 11, 12, EOD_ID])
