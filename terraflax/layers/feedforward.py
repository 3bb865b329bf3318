"""The position-wise feed-forward block, optionally chunked along the length."""

from __future__ import annotations

from typing import Callable

from terraflax.combinators.base import check_mode
from terraflax.combinators.scan import Chunk
from terraflax.layers.core import Dense, Dropout, LayerNorm, Relu


def FeedForward(*, d_model: int, d_ff: int, dropout: float = 0.0,  # pylint: disable=invalid-name
                activation: Callable[[], object] = Relu, mode: str = 'train',
                chunk_len: int | None = None, dtype=None):
  """[x] -> [ffn(x)]: (b, l, d_model) -> (b, l, d_model); one layer, 1 -> 1.

  LayerNorm, Dense(d_ff), activation, Dropout, Dense(d_model), Dropout: the
  pre-norm branch of a residual feed-forward block, labelled `FeedForward` in
  parameter paths. With `chunk_len`, the block runs `chunk_len` positions at a
  time (`Chunk`), so the (b, l, d_ff) hidden state never exists whole; the
  parameter paths are the same with or without chunking.
  """
  check_mode(mode, 'FeedForward mode')
  return Chunk(
      LayerNorm(),
      Dense(d_ff, dtype=dtype),
      activation(),
      Dropout(dropout, mode=mode),
      Dense(d_model, dtype=dtype),
      Dropout(dropout, mode=mode),
      chunk_len=chunk_len, label='FeedForward')
