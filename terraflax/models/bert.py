"""BERT-style masked-language-model pre-training: `BertMLM`.

  BertMLM   [tokens] -> [logits]: int (b, l) -> float32 (b, l, vocab_size)

Its body is `EncoderBody`, the same layers (and parameter paths) as
`TransformerEncoder`'s, so a pre-trained `BertMLM` checkpoint initialises a
`TransformerEncoder` classifier by path (`config.init_from`): the body loads,
the classification head starts fresh. The data comes from the `mlm` data set
(`terraflax.train.data`): 15% of positions selected, 80% of those replaced by
[MASK], 10% by a random token, 10% left unchanged, and only they are scored.
"""

from __future__ import annotations

from typing import Any

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.models import attention as attn
from terraflax.models.common import (
    Float32, check_hyperparameters, compute_dtype, deprecated_arguments)
from terraflax.models.transformer import DEPRECATED, EncoderBody, upgrade_full_attention


@deprecated_arguments(DEPRECATED, upgrade_full_attention('BertMLM'))
def BertMLM(*, vocab_size: int, d_model: int = 512, d_ff: int = 2048,  # pylint: disable=invalid-name
            n_layers: int = 6, n_heads: int = 8, dropout: float = 0.1, max_len: int = 2048,
            mode: str = 'train', dtype=None, attention: Any = attn.Full(),
            ff_chunk_len: int | None = None, pad_id: int | None = 0,
            share_layers: bool = False, d_embedding: int | None = None, mixing='attention',
            packed: bool = False):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, l, vocab_size); 1 -> 1.

  packed=True: [tokens, segment_ids, positions] -> [logits], 3 -> 1: rows of
  packed documents, each computed as if alone (same parameters).

  A bidirectional encoder (`EncoderBody`) with a per-token masked-LM head
  labelled `MLMHead`: Dense(d), Gelu, LayerNorm, Dense(vocab_size), where d is
  `d_embedding` if given (ALBERT) else `d_model`. Every position gets logits;
  the data's weights pick the masked ones. The arguments are
  `TransformerEncoder`'s (without `n_classes`); `'predict'` behaves as `'eval'`.
  """
  check_hyperparameters('BertMLM', mode, vocab_size=vocab_size, d_model=d_model, d_ff=d_ff,
                        n_layers=n_layers, n_heads=n_heads, dropout=dropout, max_len=max_len,
                        ff_chunk_len=ff_chunk_len, d_embedding=d_embedding)
  dtype = compute_dtype(dtype)
  body = EncoderBody(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, n_layers=n_layers,
                     n_heads=n_heads, dropout=dropout, max_len=max_len, mode=mode, dtype=dtype,
                     attention=attention, ff_chunk_len=ff_chunk_len, pad_id=pad_id,
                     share_layers=share_layers, d_embedding=d_embedding, mixing=mixing,
                     model='BertMLM', packed=packed)
  head_axis = 'embed' if d_embedding is None else None  # The head's width (d_embedding: None).
  return cb.Serial(
      body,  # stack: x, mask (or segment_ids)
      cb.Select([0], n_in=2),  # stack: x
      cb.Serial(tl.Dense(d_embedding or d_model, dtype=dtype, axes=('embed', None)), tl.Gelu(),
                tl.LayerNorm(axes=(head_axis,)),
                tl.Dense(vocab_size, dtype=dtype, axes=(head_axis, 'vocab')), label='MLMHead'),
      Float32(),
  )
