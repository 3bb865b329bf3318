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

Options of `TransformerLM` and `TransformerEncoder` (defaults: the plain model):
  share_layers   ALBERT's cross-layer sharing: one block applied n_layers times
                 with one set of parameters (`Repeat(share_params=True)`)
  d_embedding    ALBERT's factorised embeddings: tokens embed to d_embedding
                 and a Dense projects them to d_model (the LM's output goes
                 d_model -> d_embedding -> vocab too)
  n_prefix       prefix tuning: n_prefix trainable keys/values at every
                 attention layer (`terraflax.layers.prefix`)
  mixing         (encoder only) 'attention' or 'fourier' (FNet) token mixing,
                 for all layers or one kind per layer
"""

from __future__ import annotations

import jax.numpy as jnp

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.combinators.base import check_mode
from terraflax.layers.prefix import PrefixAttention, PrefixCausalAttention

MIXING_KINDS = ('attention', 'fourier')


def _check_hyperparameters(model: str, mode: str, **values):
  """Clear errors for a bad `mode` and non-positive sizes, before anything is built."""
  check_mode(mode, f'{model} mode')
  for name, value in values.items():
    if name in ('attention_chunk_len', 'ff_chunk_len', 'd_embedding') and value is None:
      continue
    if name == 'n_prefix' and value == 0:
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


def _embed(vocab_size, d_model, max_len, dropout, mode, dtype, d_embedding=None):
  """[ids] -> [x]: token embedding plus sinusoidal positions, with dropout.

  With `d_embedding`, tokens embed to d_embedding and a Dense projects to d_model.
  """
  if d_embedding is None:
    return [
        tl.Embedding(vocab_size, d_model, dtype=dtype),
        tl.PositionalEncoding(max_len=max_len, dropout=dropout, mode=mode),
    ]
  return [
      tl.Embedding(vocab_size, d_embedding, dtype=dtype),
      tl.Dense(d_model, dtype=dtype),  # The factorised embedding's projection.
      tl.PositionalEncoding(max_len=max_len, dropout=dropout, mode=mode),
  ]


def _check_d_embedding(model, d_embedding, d_model):
  if d_embedding is not None and d_embedding > d_model:
    raise ValueError(f'{model} d_embedding={d_embedding} must be <= d_model={d_model} (a '
                     'factorised embedding is narrower than the model).')


def _mixing_kinds(model, mixing, n_layers) -> tuple[str, ...]:
  """`mixing` ('attention', 'fourier' or one of them per layer) as n_layers kinds."""
  kinds = (mixing,) * n_layers if isinstance(mixing, str) else tuple(mixing)
  if len(kinds) != n_layers or any(kind not in MIXING_KINDS for kind in kinds):
    raise ValueError(f'{model} mixing must be one of {MIXING_KINDS} or a sequence of n_layers='
                     f'{n_layers} of them, got {mixing!r}.')
  return kinds


def _stack(blocks, kinds, share_layers, model):
  """`Repeat`s of the blocks of each run of equal `kinds` (one Repeat when all are equal).

  `blocks[kind]()` makes a fresh block (a list of layers) of that kind.
  """
  runs = []
  for kind in kinds:
    if runs and runs[-1][0] == kind:
      runs[-1][1] += 1
    else:
      runs.append([kind, 1])
  if share_layers and len(runs) > 1:
    raise ValueError(f'{model} share_layers needs one mixing kind for all layers (one shared '
                     f'block), got {kinds}.')
  repeats = [cb.Repeat(blocks[kind](), n, share_params=share_layers) for kind, n in runs]
  return repeats[0] if len(repeats) == 1 else cb.Serial(*repeats, label='Encoder')


def _feed_forward(d_model, d_ff, dropout, mode, dtype, ff_chunk_len):
  return cb.Residual(tl.FeedForward(d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode,
                                    chunk_len=ff_chunk_len, dtype=dtype))


def DecoderBlock(*, d_model, d_ff, n_heads, dropout, max_len, mode, dtype=None,  # pylint: disable=invalid-name
                 attention_chunk_len=None, ff_chunk_len=None, n_prefix=0):
  """[x] -> [x]: (b, l, d) -> (b, l, d); a list of layers, 1 -> 1.

  Pre-norm causal self-attention and feed-forward residual blocks; with
  `n_prefix`, the attention has that many trainable prefix keys/values.
  """
  kwargs = dict(n_heads=n_heads, dropout=dropout, chunk_len=attention_chunk_len, max_len=max_len,
                mode=mode, dtype=dtype)
  attention = (PrefixCausalAttention(n_prefix=n_prefix, **kwargs) if n_prefix
               else tl.CausalAttention(**kwargs))
  return [
      cb.Residual(
          tl.LayerNorm(),
          attention,
          tl.Dropout(dropout, mode=mode)),
      _feed_forward(d_model, d_ff, dropout, mode, dtype, ff_chunk_len),
  ]


def EncoderBlock(*, d_model, d_ff, n_heads, dropout, mode, dtype=None,  # pylint: disable=invalid-name
                 attention_chunk_len=None, ff_chunk_len=None, n_prefix=0):
  """[x, mask] -> [x, mask]: (b, l, d), (b, l) -> (b, l, d), (b, l); a list, 2 -> 2.

  Pre-norm bidirectional self-attention over real tokens, then feed-forward;
  with `n_prefix`, the attention has that many trainable prefix keys/values.
  """
  kwargs = dict(n_heads=n_heads, dropout=dropout, chunk_len=attention_chunk_len, mode=mode,
                dtype=dtype)
  attention = (PrefixAttention(n_prefix=n_prefix, **kwargs) if n_prefix
               else tl.Attention(**kwargs))
  return [
      cb.Residual(
          tl.LayerNorm(),
          attention,
          tl.Dropout(dropout, mode=mode)),  # stack: x, mask
      _feed_forward(d_model, d_ff, dropout, mode, dtype, ff_chunk_len),
  ]


def FourierEncoderBlock(*, d_model, d_ff, dropout, mode, dtype=None,  # pylint: disable=invalid-name
                        ff_chunk_len=None):
  """[x, mask] -> [x, mask]: (b, l, d), (b, l) -> (b, l, d), (b, l); a list, 2 -> 2.

  FNet's block: pre-norm Fourier mixing (padding zeroed first), then
  feed-forward. Its only parameters are the norm's and the feed-forward's.
  """
  return [
      cb.Residual(
          tl.LayerNorm(),
          tl.MaskedFourierMixing(),
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
                  attention_chunk_len: int | None = None, ff_chunk_len: int | None = None,
                  share_layers: bool = False, d_embedding: int | None = None,
                  n_prefix: int = 0):
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
    share_layers: ALBERT: one decoder block applied n_layers times, one set of
      its parameters (each depth keeps its own predict-mode cache).
    d_embedding: ALBERT's factorised embeddings: embed to d_embedding
      (<= d_model) and project to d_model; the output is factorised the same
      way (LayerNorm, Dense(d_embedding), Dense(vocab_size)).
    n_prefix: prefix tuning: trainable keys/values at every attention layer
      (`prefix_key`/`prefix_value` parameters; 0: none).
  """
  _check_hyperparameters('TransformerLM', mode, vocab_size=vocab_size, d_model=d_model, d_ff=d_ff,
                         n_layers=n_layers, n_heads=n_heads, dropout=dropout, max_len=max_len,
                         attention_chunk_len=attention_chunk_len, ff_chunk_len=ff_chunk_len,
                         d_embedding=d_embedding, n_prefix=n_prefix)
  _check_d_embedding('TransformerLM', d_embedding, d_model)
  dtype = _dtype(dtype)
  block = DecoderBlock(d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout,
                       max_len=max_len, mode=mode, dtype=dtype,
                       attention_chunk_len=attention_chunk_len, ff_chunk_len=ff_chunk_len,
                       n_prefix=n_prefix)
  return cb.Serial(
      tl.ShiftRight(mode=mode),
      _embed(vocab_size, d_model, max_len, dropout, mode, dtype, d_embedding),
      cb.Repeat(block, n_layers, share_params=share_layers),
      tl.LayerNorm(),
      tl.Dense(d_embedding, dtype=dtype) if d_embedding is not None else None,
      tl.Dense(vocab_size, dtype=dtype),
      _float32(),
  )


def EncoderBody(*, vocab_size: int, d_model: int, d_ff: int, n_layers: int,  # pylint: disable=invalid-name
                n_heads: int, dropout: float, max_len: int, mode: str, dtype=None,
                attention_chunk_len: int | None = None, ff_chunk_len: int | None = None,
                pad_id: int | None = 0, share_layers: bool = False,
                d_embedding: int | None = None, mixing='attention', n_prefix: int = 0):
  """[tokens] -> [x, mask]: int (b, l) -> (b, l, d_model), bool (b, l); a list, 1 -> 2.

  The encoder up to its final LayerNorm, shared by `TransformerEncoder` and
  `terraflax.models.BertMLM` so that their bodies have the same parameter
  paths (a pre-trained body loads into a classifier by path). `mask` is
  `tokens != pad_id`. Arguments are `TransformerEncoder`'s.
  """
  kinds = _mixing_kinds('TransformerEncoder', mixing, n_layers)
  _check_d_embedding('TransformerEncoder', d_embedding, d_model)
  dtype = _dtype(dtype)
  if mode == 'predict':  # No incremental form: predict is eval.
    mode = 'eval'
  blocks = {
      'attention': lambda: EncoderBlock(
          d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout, mode=mode, dtype=dtype,
          attention_chunk_len=attention_chunk_len, ff_chunk_len=ff_chunk_len, n_prefix=n_prefix),
      'fourier': lambda: FourierEncoderBlock(
          d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode, dtype=dtype,
          ff_chunk_len=ff_chunk_len),
  }
  return [
      cb.Branch(None, _padding_mask(pad_id)),  # stack: ids, mask
      _embed(vocab_size, d_model, max_len, dropout, mode, dtype, d_embedding),
      _stack(blocks, kinds, share_layers, 'TransformerEncoder'),  # stack: x, mask
      tl.LayerNorm(),
  ]


def TransformerEncoder(*, vocab_size: int, n_classes: int = 10, d_model: int = 512,  # pylint: disable=invalid-name
                       d_ff: int = 2048, n_layers: int = 6, n_heads: int = 8,
                       dropout: float = 0.1, max_len: int = 2048, mode: str = 'train',
                       dtype=None, attention_chunk_len: int | None = None,
                       ff_chunk_len: int | None = None, pad_id: int | None = 0,
                       share_layers: bool = False, d_embedding: int | None = None,
                       mixing='attention', n_prefix: int = 0):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, n_classes); 1 -> 1.

  A BERT-style bidirectional encoder with a classification head: tokens equal
  to `pad_id` (default 0; None = no padding) are masked out of attention and
  of the mean pooling over positions that feeds the final `Dense(n_classes)`.
  Right-padding a batch therefore does not change a sequence's logits.
  There is no incremental form: `'predict'` behaves as `'eval'`.
  `mixing` is 'attention', 'fourier' (FNet's parameter-free Fourier mixing)
  or a sequence of one of them per layer, e.g. ('fourier', 'fourier',
  'attention'); runs of equal kinds are scanned together. `share_layers`,
  `d_embedding` and `n_prefix` are as in `TransformerLM` (`share_layers`
  needs one mixing kind). Other arguments are as in `TransformerLM`.
  """
  _check_hyperparameters('TransformerEncoder', mode, vocab_size=vocab_size, n_classes=n_classes,
                         d_model=d_model, d_ff=d_ff, n_layers=n_layers, n_heads=n_heads,
                         dropout=dropout, max_len=max_len, attention_chunk_len=attention_chunk_len,
                         ff_chunk_len=ff_chunk_len, d_embedding=d_embedding, n_prefix=n_prefix)
  body = EncoderBody(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, n_layers=n_layers,
                     n_heads=n_heads, dropout=dropout, max_len=max_len, mode=mode, dtype=dtype,
                     attention_chunk_len=attention_chunk_len, ff_chunk_len=ff_chunk_len,
                     pad_id=pad_id, share_layers=share_layers, d_embedding=d_embedding,
                     mixing=mixing, n_prefix=n_prefix)
  return cb.Serial(
      body,  # stack: x, mask
      cb.Fn('MaskedMean', _masked_mean),  # stack: pooled (b, d)
      tl.Dense(n_classes, dtype=_dtype(dtype)),
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
