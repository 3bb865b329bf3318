"""Transformer models: decoder-only LM, BERT-style encoder classifier, seq2seq.

  TransformerLM        [tokens] -> [logits]: (b, l) -> (b, l, v)
  TransformerEncoder   [tokens] -> [logits]: (b, l) -> (b, n_classes)
  Transformer          [inputs, targets] -> [logits]: (b, li), (b, lt) -> (b, lt, v)

All use pre-norm residual blocks (LayerNorm inside the residual branch, a
final LayerNorm before the output projection) and scan their identical
blocks with `Repeat`, so compile time does not grow with `n_layers`;
parameters, caches and sown intermediates of the blocks are stacked on a
leading axis of size `n_layers`. Parameters have the same names and shapes in
`'train'`, `'eval'` and `'predict'` modes. `dtype=jnp.bfloat16` (or
'bfloat16') computes in bfloat16 with float32 parameters; logits are float32.
Token id `pad_id` (0) is padding: the LMs' `ShiftRight` inserts it, and the
encoders mask it out.
"""

from __future__ import annotations

import jax.numpy as jnp

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.combinators.base import check_mode


def _check_hyperparameters(model: str, mode: str, **values):
  """Clear errors for a bad `mode` and non-positive sizes, before anything is built."""
  check_mode(mode, f'{model} mode')
  for name, value in values.items():
    if name in ('attention_chunk_len', 'ff_chunk_len') and value is None:
      continue
    if name == 'dropout':
      if not 0.0 <= value < 1.0:
        raise ValueError(f'{model} dropout must be in [0, 1), got {value!r}.')
      continue
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{model} {name} must be a positive int, got {value!r}.')
  if values['d_model'] % values['n_heads']:
    raise ValueError(f'{model} d_model={values["d_model"]} must be divisible by '
                     f'n_heads={values["n_heads"]}.')


def _dtype(dtype):
  """None, a dtype or its name ('bfloat16') -> a jnp dtype or None."""
  return None if dtype is None else jnp.dtype(dtype)


def _float32():
  return cb.Fn('Float32', lambda x: x.astype(jnp.float32))


def _padding_mask(pad_id):
  """[ids] -> [ids != pad_id] (all True when pad_id is None)."""
  if pad_id is None:
    return cb.Fn('PaddingMask', lambda ids: jnp.ones(ids.shape, jnp.bool_))
  return cb.Fn('PaddingMask', lambda ids: ids != pad_id)


def _masked_mean(x, mask):
  """(b, l, d), (b, l) -> (b, d): the mean over real tokens."""
  weights = mask.astype(x.dtype)[:, :, None]
  total = jnp.sum(x * weights, axis=1)
  count = jnp.maximum(jnp.sum(weights, axis=1), 1)
  return total / count


def _embed(vocab_size, d_model, max_len, dropout, mode, dtype):
  """[ids] -> [x]: token embedding plus sinusoidal positions, with dropout."""
  return [
      tl.Embedding(vocab_size, d_model, dtype=dtype),
      tl.PositionalEncoding(max_len=max_len, dropout=dropout, mode=mode),
  ]


def _feed_forward(d_model, d_ff, dropout, mode, dtype, ff_chunk_len):
  return cb.Residual(tl.FeedForward(d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode,
                                    chunk_len=ff_chunk_len, dtype=dtype))


def DecoderBlock(*, d_model, d_ff, n_heads, dropout, max_len, mode, dtype=None,  # pylint: disable=invalid-name
                 attention_chunk_len=None, ff_chunk_len=None):
  """[x] -> [x]: (b, l, d) -> (b, l, d); a list of layers, 1 -> 1.

  Pre-norm causal self-attention and feed-forward residual blocks.
  """
  return [
      cb.Residual(
          tl.LayerNorm(),
          tl.CausalAttention(n_heads=n_heads, dropout=dropout, chunk_len=attention_chunk_len,
                             max_len=max_len, mode=mode, dtype=dtype),
          tl.Dropout(dropout, mode=mode)),
      _feed_forward(d_model, d_ff, dropout, mode, dtype, ff_chunk_len),
  ]


def EncoderBlock(*, d_model, d_ff, n_heads, dropout, mode, dtype=None,  # pylint: disable=invalid-name
                 attention_chunk_len=None, ff_chunk_len=None):
  """[x, mask] -> [x, mask]: (b, l, d), (b, l) -> (b, l, d), (b, l); a list, 2 -> 2.

  Pre-norm bidirectional self-attention over real tokens, then feed-forward.
  """
  return [
      cb.Residual(
          tl.LayerNorm(),
          tl.Attention(n_heads=n_heads, dropout=dropout, chunk_len=attention_chunk_len,
                       mode=mode, dtype=dtype),
          tl.Dropout(dropout, mode=mode)),  # stack: x, mask
      _feed_forward(d_model, d_ff, dropout, mode, dtype, ff_chunk_len),
  ]


def EncoderDecoderBlock(*, d_model, d_ff, n_heads, dropout, max_len, mode, dtype=None,  # pylint: disable=invalid-name
                        attention_chunk_len=None, ff_chunk_len=None):
  """[y, encoder, mask] -> [y, encoder, mask]: (b, lt, d), (b, li, d), (b, li); 3 -> 3.

  Pre-norm causal self-attention, attention to the encoder, feed-forward.
  """
  return [
      cb.Residual(
          tl.LayerNorm(),
          tl.CausalAttention(n_heads=n_heads, dropout=dropout, chunk_len=attention_chunk_len,
                             max_len=max_len, mode=mode, dtype=dtype),
          tl.Dropout(dropout, mode=mode)),
      cb.Residual(
          tl.LayerNorm(),
          tl.EncDecAttention(n_heads=n_heads, dropout=dropout, chunk_len=attention_chunk_len,
                             mode=mode, dtype=dtype),
          tl.Dropout(dropout, mode=mode)),  # stack: y, encoder, mask
      _feed_forward(d_model, d_ff, dropout, mode, dtype, ff_chunk_len),
  ]


def TransformerLM(*, vocab_size: int, d_model: int = 512, d_ff: int = 2048,  # pylint: disable=invalid-name
                  n_layers: int = 6, n_heads: int = 8, dropout: float = 0.1,
                  max_len: int = 2048, mode: str = 'train', dtype=None,
                  attention_chunk_len: int | None = None, ff_chunk_len: int | None = None):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, l, vocab_size); 1 -> 1.

  A decoder-only Transformer language model. It shifts its input right
  (inserting pad id 0), so logits[:, i] predict tokens[:, i] from the tokens
  before i, and the input is also the target. In `'predict'` mode each call
  takes the previous token(s) (b, 1) — pad id 0 first — and returns the next
  logits, with keys/values cached for `max_len` positions (see
  `terraflax.decoding`).

  Args:
    vocab_size: number of token ids.
    d_model: model width.
    d_ff: feed-forward hidden width.
    n_layers: number of decoder blocks (scanned).
    n_heads: attention heads (must divide d_model).
    dropout: dropout rate (residuals, embeddings, attention probabilities).
    max_len: longest sequence (positional table and predict-mode cache).
    mode: 'train', 'eval' or 'predict'.
    dtype: compute dtype (e.g. 'bfloat16'); parameters stay float32.
    attention_chunk_len: query-chunked attention (memory linear in length).
    ff_chunk_len: run the feed-forward blocks this many positions at a time.
  """
  _check_hyperparameters('TransformerLM', mode, vocab_size=vocab_size, d_model=d_model, d_ff=d_ff,
                         n_layers=n_layers, n_heads=n_heads, dropout=dropout, max_len=max_len,
                         attention_chunk_len=attention_chunk_len, ff_chunk_len=ff_chunk_len)
  dtype = _dtype(dtype)
  block = DecoderBlock(d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout,
                       max_len=max_len, mode=mode, dtype=dtype,
                       attention_chunk_len=attention_chunk_len, ff_chunk_len=ff_chunk_len)
  return cb.Serial(
      tl.ShiftRight(mode=mode),
      _embed(vocab_size, d_model, max_len, dropout, mode, dtype),
      cb.Repeat(block, n_layers),
      tl.LayerNorm(),
      tl.Dense(vocab_size, dtype=dtype),
      _float32(),
  )


def TransformerEncoder(*, vocab_size: int, n_classes: int = 10, d_model: int = 512,  # pylint: disable=invalid-name
                       d_ff: int = 2048, n_layers: int = 6, n_heads: int = 8,
                       dropout: float = 0.1, max_len: int = 2048, mode: str = 'train',
                       dtype=None, attention_chunk_len: int | None = None,
                       ff_chunk_len: int | None = None, pad_id: int | None = 0):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, n_classes); 1 -> 1.

  A BERT-style bidirectional encoder with a classification head: tokens equal
  to `pad_id` (default 0; None = no padding) are masked out of attention and
  of the mean pooling over positions that feeds the final `Dense(n_classes)`.
  Right-padding a batch therefore does not change a sequence's logits.
  There is no incremental form: `'predict'` behaves as `'eval'`.
  Other arguments are as in `TransformerLM`.
  """
  _check_hyperparameters('TransformerEncoder', mode, vocab_size=vocab_size, n_classes=n_classes,
                         d_model=d_model, d_ff=d_ff, n_layers=n_layers, n_heads=n_heads,
                         dropout=dropout, max_len=max_len, attention_chunk_len=attention_chunk_len,
                         ff_chunk_len=ff_chunk_len)
  dtype = _dtype(dtype)
  block = EncoderBlock(d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout, mode=mode,
                       dtype=dtype, attention_chunk_len=attention_chunk_len,
                       ff_chunk_len=ff_chunk_len)
  return cb.Serial(
      cb.Branch(None, _padding_mask(pad_id)),  # stack: ids, mask
      _embed(vocab_size, d_model, max_len, dropout, 'eval' if mode == 'predict' else mode, dtype),
      cb.Repeat(block, n_layers),  # stack: x, mask
      tl.LayerNorm(),
      cb.Fn('MaskedMean', _masked_mean),  # stack: pooled (b, d)
      tl.Dense(n_classes, dtype=dtype),
      _float32(),
  )


def Transformer(*, vocab_size: int, output_vocab_size: int | None = None,  # pylint: disable=invalid-name
                d_model: int = 512, d_ff: int = 2048, n_layers: int = 6,
                n_encoder_layers: int | None = None, n_decoder_layers: int | None = None,
                n_heads: int = 8, dropout: float = 0.1,
                max_len: int = 2048, mode: str = 'train', dtype=None,
                attention_chunk_len: int | None = None, ff_chunk_len: int | None = None,
                pad_id: int = 0):
  """[inputs, targets] -> [logits]: int (b, li), (b, lt) -> float32 (b, lt, v); 2 -> 1.

  An encoder-decoder Transformer for seq2seq (v = `output_vocab_size`,
  default `vocab_size`). The encoder reads `inputs` (pad id `pad_id` masked
  out); the decoder shifts `targets` right and attends causally to itself and
  to the encoder's real tokens, so logits[:, i] predict targets[:, i].
  In `'predict'` mode each call takes the full `inputs` and the previous
  target token (b, 1); the encoder runs on the first call after `init` and its
  outputs and projected keys/values are cached (`CacheOutputs`,
  `EncDecAttention`), so later steps cost one decoder step.
  `n_encoder_layers` and `n_decoder_layers` default to `n_layers`. Other
  arguments are as in `TransformerLM`.
  """
  n_encoder_layers = n_layers if n_encoder_layers is None else n_encoder_layers
  n_decoder_layers = n_layers if n_decoder_layers is None else n_decoder_layers
  _check_hyperparameters('Transformer', mode, vocab_size=vocab_size,
                         output_vocab_size=output_vocab_size or vocab_size, d_model=d_model,
                         d_ff=d_ff, n_encoder_layers=n_encoder_layers,
                         n_decoder_layers=n_decoder_layers, n_heads=n_heads, dropout=dropout,
                         max_len=max_len, attention_chunk_len=attention_chunk_len,
                         ff_chunk_len=ff_chunk_len)
  dtype = _dtype(dtype)
  output_vocab_size = output_vocab_size or vocab_size
  encoder_mode = 'eval' if mode == 'predict' else mode  # It runs once per sequence.
  encoder = cb.Serial(
      cb.Branch(None, _padding_mask(pad_id)),  # stack: ids, mask
      _embed(vocab_size, d_model, max_len, dropout, encoder_mode, dtype),
      cb.Repeat(EncoderBlock(d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout,
                             mode=encoder_mode, dtype=dtype,
                             attention_chunk_len=attention_chunk_len, ff_chunk_len=ff_chunk_len),
                n_encoder_layers),
      tl.LayerNorm(),  # stack: encoder, mask
  )
  decoder_block = EncoderDecoderBlock(
      d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout, max_len=max_len, mode=mode,
      dtype=dtype, attention_chunk_len=attention_chunk_len, ff_chunk_len=ff_chunk_len)
  return cb.Serial(
      tl.CacheOutputs(encoder, mode=mode),  # stack: encoder, mask, targets
      cb.Select([2, 0, 1]),  # stack: targets, encoder, mask
      tl.ShiftRight(mode=mode, pad_id=pad_id),
      _embed(output_vocab_size, d_model, max_len, dropout, mode, dtype),
      cb.Repeat(decoder_block, n_decoder_layers),  # stack: y, encoder, mask
      cb.Select([0], n_in=3),
      tl.LayerNorm(),
      tl.Dense(output_vocab_size, dtype=dtype),
      _float32(),
  )
