"""Data: sources, SentencePiece tokenizer, segmentation into concepts, Grain pipeline.

  tokenizer = make_tokenizer(config, workdir)
  batches = iter(make_dataset(config, tokenizer, split="train", view="concepts"))
"""

from concept_diffusion.data.errors import DataError
from concept_diffusion.data.pipeline import make_dataset, make_tokenizer
from concept_diffusion.data.sources import iterate_documents, parse_source
from concept_diffusion.data.tokenizer import (BOS_ID, EOD_ID, EOS_ID, MASK_ID, PAD_ID, UNK_ID,
                                              Tokenizer, train_tokenizer)

__all__ = [
    "BOS_ID", "DataError", "EOD_ID", "EOS_ID", "MASK_ID", "PAD_ID", "Tokenizer", "UNK_ID",
    "iterate_documents", "make_dataset", "make_tokenizer", "parse_source", "train_tokenizer",
]
