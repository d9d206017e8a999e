"""The error raised for input the data pipeline cannot use."""


class DataError(ValueError):
  """Unusable input data (missing or binary file, empty glob, foreign tokenizer); names the file."""
