"""Token streams into fixed-length LM rows: packed documents, or plain windows.

A document becomes its token ids followed by the end-of-document id
(`document_tokens`), with the UTF-8 bytes it stands for spread evenly over
them: a document of n bytes and t tokens (eos included) gives each token
(n + 1) / t bytes, the end-of-document counting as one byte (a separator).
Summed over whole documents that is exactly the text's byte count, whatever
the tokenizer; with 'bytes' every token is exactly one byte.

`pack(ds, seq_len, packed=True)` concatenates the documents of an IterDataset
and splits the stream into rows of `seq_len` (grain's
`ConcatThenSplitIterDataset`, whose state is part of the iterator's state, so
a restored iterator continues bit-identically). A long document continues in
the next row. Each row is an LM example:

  inputs, targets  int32 (l,)    token ids (the model shifts right itself)
  weights          float32 (l,)  1 at tokens, 0 at padding
  bytes            float32 (l,)  UTF-8 bytes each target stands for (0 at padding)
  segment_ids      int32 (l,)    1, 2, 3... per document in the row, 0 at padding
  positions        int32 (l,)    position within the document's part in this row,
                                 from 0 (a document continued from the previous
                                 row restarts at 0: it cannot see that row)

`packed=False` gives the same rows without segment_ids/positions: fixed
windows of the token stream, attending across document boundaries (as the
'bytes' data set does). Only a finite stream's last row has padding.
"""

from __future__ import annotations

import grain
from grain import experimental as grain_experimental
import numpy as np


def document_tokens(ids, n_bytes: int, eos_id: int) -> dict[str, np.ndarray]:
  """{'tokens': int32 (t,), 'bytes': float32 (t,)}: `ids` + [eos_id], bytes spread evenly."""
  tokens = np.empty((len(ids) + 1,), np.int32)
  tokens[:-1] = ids
  tokens[-1] = eos_id
  return {'tokens': tokens,
          'bytes': np.full(tokens.shape, (n_bytes + 1) / tokens.size, np.float32)}


def row_example(row: dict[str, np.ndarray], packed: bool) -> dict[str, np.ndarray]:
  """The LM example of one row of `ConcatThenSplitIterDataset` output."""
  tokens, segments = row['tokens'], row['tokens_segment_ids']
  real = segments > 0
  example = {'inputs': tokens.astype(np.int32), 'targets': tokens.astype(np.int32),
             'weights': real.astype(np.float32),
             'bytes': np.where(real, row['bytes'], 0).astype(np.float32)}
  if packed:
    example['segment_ids'] = segments.astype(np.int32)
    example['positions'] = np.where(real, row['tokens_positions'], 0).astype(np.int32)
  return example


def pack(ds: grain.IterDataset, seq_len: int, *, packed: bool = True) -> grain.IterDataset:
  """Rows of `seq_len` tokens from an IterDataset of `document_tokens` dicts (see above)."""
  rows = grain_experimental.ConcatThenSplitIterDataset(
      ds, length_struct={'tokens': seq_len, 'bytes': seq_len})
  return rows.map(lambda row: row_example(row, packed))


def pack_documents(documents, seq_len: int, *, packed: bool = True) -> list[dict[str, np.ndarray]]:
  """`pack` of a finite sequence of `document_tokens` dicts, as a list of rows (evaluation)."""
  ds = grain.MapDataset.source(list(documents)).to_iter_dataset()
  return list(pack(ds, seq_len, packed=packed))
