"""Reformer models: a decoder-only LM and an encoder-decoder, on reversible layers.

  ReformerLM   [tokens] -> [logits]: (b, l) -> (b, l, v)
  Reformer     [inputs, targets] -> [logits]: (b, li), (b, lt) -> (b, lt, v)

Both run their blocks on two residual streams (Kitaev et al. 2020, after
RevNet): the embedded input is duplicated and every block is

  ReversibleHalfResidual(LayerNorm, attention, Dropout), ReversibleSwap,
  ReversibleHalfResidual(FeedForward), ReversibleSwap

inside one `ReversibleSerial`, whose backward pass rebuilds each block's
inputs from its outputs instead of storing activations. Blocks are scanned
with their parameters stacked on a leading axis: with one attention type
the axis has `n_layers` entries; with a pattern of types (`attention_type=
('lsh', 'full')`) one scanned block holds one layer of each type in turn and
the axis has `n_layers // len(pattern)` entries. `reversible=False` runs the
same layers, parameters and randomness under plain autodiff.

ReformerLM ends like Trax's ReformerLM and Hugging Face's
`ReformerModelWithLMHead`: the streams are concatenated as [attention stream,
feed-forward stream] (b, l, 2d), then LayerNorm, Dropout and the output Dense.
The encoder-decoder `Reformer` follows Trax's Reformer: the streams of the
encoder and of the decoder are averaged.

Attention types: 'lsh' is `LSHSelfAttention` (shared-QK, hashed chunks); 'full'
is exact dot-product attention (`CausalAttention` in decoders, `Attention`
with the padding mask in the encoder), run `chunk_len` queries at a time so
its memory is linear in the length; 'local' is `LocalSelfAttention`
(Hugging Face's local layers: separate q/k/v, each chunk attends to its
window of neighbouring chunks). None uses biases, as in Trax and HF.

Parameters have the same names and shapes in 'train', 'eval' and 'predict'
modes and with `reversible` on or off. In 'predict' mode the models decode
one token per call (see `terraflax.decoding`): full attention keeps `max_len`
keys and values per layer, LSH attention a ring buffer of `predict_mem_len`
positions with the bucket ids of its keys.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.combinators.base import check_int, check_mode, check_rate
from terraflax.models.transformer import _dtype, _float32, _padding_mask

ATTENTION_TYPES = ('lsh', 'full', 'local')
POS_TYPES = ('axial', 'sinusoidal', 'learned')
FF_ACTIVATIONS = {'relu': tl.Relu, 'gelu': tl.Gelu, 'fast_gelu': tl.FastGelu}


# ----------------------------------------------------------------------------- checks


def attention_pattern(model: str, attention_type: Any, n_layers: int, where='attention_type'):
  """The per-layer attention types that repeat: ('lsh',), ('lsh', 'full'), ...

  `attention_type` is one of `ATTENTION_TYPES` or a sequence of them that
  cycles over the layers (layer i has type i % len); n_layers must be a
  multiple of its length. A sequence of one repeated type collapses to it.
  """
  pattern = (attention_type,) if isinstance(attention_type, str) else tuple(attention_type)
  if not pattern or any(kind not in ATTENTION_TYPES for kind in pattern):
    raise ValueError(f'{model} {where} must be one of {ATTENTION_TYPES} or a non-empty '
                     f'sequence of them (cycled over the layers), got {attention_type!r}.')
  if n_layers % len(pattern):
    raise ValueError(f'{model} {where}={attention_type!r} repeats every {len(pattern)} layers, '
                     f'so the number of layers must be a multiple of {len(pattern)}; got '
                     f'{n_layers}.')
  if len(set(pattern)) == 1:
    pattern = pattern[:1]
  return pattern


def default_axial_shape(max_len: int) -> tuple[int, int]:
  """(rows, cols) covering max_len: cols the power of two at or above sqrt(max_len)."""
  cols = 2 ** math.ceil(math.log2(math.sqrt(max_len))) if max_len > 1 else 1
  return (-(-max_len // cols), cols)


def _positions(model, *, pos_type, axial_shape, axial_d_embs, d_model, max_len):
  """Resolved (axial_shape, axial_d_embs) after checking them (None unless axial)."""
  if pos_type not in POS_TYPES:
    raise ValueError(f'{model} pos_type must be one of {POS_TYPES}, got {pos_type!r}.')
  if pos_type != 'axial':
    if axial_shape is not None or axial_d_embs is not None:
      raise ValueError(f'{model} axial_shape and axial_d_embs apply to pos_type=\'axial\' only, '
                       f'got pos_type={pos_type!r}.')
    return None, None
  shape = default_axial_shape(max_len) if axial_shape is None else tuple(axial_shape)
  if not shape or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in shape):
    raise ValueError(f'{model} axial_shape must be a sequence of positive ints, got '
                     f'{axial_shape!r}.')
  if math.prod(shape) < max_len:
    raise ValueError(f'{model} axial_shape={shape} covers {math.prod(shape)} positions, fewer '
                     f'than max_len={max_len}.')
  if axial_d_embs is None:
    base = d_model // len(shape)
    d_embs = (base,) * (len(shape) - 1) + (d_model - base * (len(shape) - 1),)
  else:
    d_embs = tuple(axial_d_embs)
  if len(d_embs) != len(shape) or any(
      not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in d_embs):
    raise ValueError(f'{model} axial_d_embs must be one positive int per axis of '
                     f'axial_shape={shape}, got {axial_d_embs!r}.')
  if sum(d_embs) != d_model:
    raise ValueError(f'{model} axial_d_embs={d_embs} must sum to d_model={d_model}, got '
                     f'{sum(d_embs)}.')
  return shape, d_embs


def _check_common(model, *, mode, d_model, d_ff, n_heads, d_qk, d_v, dropout,
                  attention_dropout, max_len, n_hashes, chunk_len, n_chunks_before,
                  n_chunks_after, predict_mem_len, ff_chunk_len, ff_activation, reversible,
                  patterns):
  """Checks shared by both factories; returns (d_qk, d_v, predict_mem_len) resolved."""
  check_mode(mode, f'{model} mode')
  for name, value in (('d_model', d_model), ('d_ff', d_ff), ('n_heads', n_heads),
                      ('max_len', max_len), ('n_hashes', n_hashes), ('chunk_len', chunk_len)):
    check_int(model, name, value)
  for name, value in (('n_chunks_before', n_chunks_before), ('n_chunks_after', n_chunks_after)):
    check_int(model, name, value, minimum=0)
  for name, value in (('d_qk', d_qk), ('d_v', d_v), ('predict_mem_len', predict_mem_len)):
    check_int(model, name, value, allow_none=True)
  check_int(model, 'ff_chunk_len', ff_chunk_len, minimum=0, allow_none=True)
  check_rate(model, 'dropout', dropout)
  check_rate(model, 'attention_dropout', attention_dropout)
  if (d_qk is None or d_v is None) and d_model % n_heads:
    raise ValueError(f'{model} d_model={d_model} must be divisible by n_heads={n_heads} '
                     '(or set both d_qk and d_v, the per-head widths).')
  if not (callable(ff_activation) or ff_activation in FF_ACTIVATIONS):
    raise ValueError(f'{model} ff_activation must be one of {tuple(FF_ACTIVATIONS)} or a layer '
                     f'factory such as tl.Relu, got {ff_activation!r}.')
  if not isinstance(reversible, bool):
    raise ValueError(f'{model} reversible must be True or False, got {reversible!r}.')
  predict_mem_len = max_len if predict_mem_len is None else predict_mem_len
  if any('lsh' in pattern for pattern in patterns):
    neighbourhood = chunk_len * (n_chunks_before + 1)
    if predict_mem_len < neighbourhood:
      raise ValueError(
          f'{model} predict_mem_len={predict_mem_len} (default: max_len) must hold the LSH '
          f'chunk neighbourhood chunk_len * (n_chunks_before + 1) = {neighbourhood}.')
  default = d_model // n_heads
  return d_qk or default, d_v or default, predict_mem_len


# ----------------------------------------------------------------------------- pieces


def Embedder(*, vocab_size, d_model, max_len, dropout, pos_type, axial_shape,  # pylint: disable=invalid-name
             axial_d_embs, mode, dtype):
  """[ids] -> [x]: int (b, l) -> (b, l, d_model); a list, 1 -> 1.

  Token embedding, dropout shared along the length (as in Trax), positions.
  """
  if pos_type == 'axial':
    positions = tl.AxialPositionalEncoding(shape=axial_shape, d_embs=axial_d_embs, mode=mode)
  else:
    positions = tl.PositionalEncoding(max_len=max_len, kind=pos_type, mode=mode)
  return [
      tl.Embedding(vocab_size, d_model, dtype=dtype),
      tl.Dropout(dropout, mode=mode, shared_axes=(1,)),
      positions,
  ]


def SelfAttention(kind, *, causal, n_heads, d_qk, d_v, attention_dropout, n_hashes,  # pylint: disable=invalid-name
                  n_buckets, chunk_len, n_chunks_before, n_chunks_after, predict_mem_len,
                  max_len, mode, dtype, local_chunk_len=None, local_n_chunks_before=None,
                  local_n_chunks_after=None, lsh_convention='terraflax'):
  """[x] -> [y]: (b, l, d) -> (b, l, d); one self-attention layer of type `kind`.

  `kind` is 'lsh', 'full' or 'local'. 'lsh', 'local' and causal 'full' have
  n_in = n_out = 1; non-causal 'full' is `Attention`, [x, mask] -> [y, mask]:
  (b, l, d), bool (b, l) -> the same, n_in = n_out = 2 (LSHSelfAttention and
  LocalSelfAttention take no padding mask). 'local' windows default to the
  LSH ones (`chunk_len`, `n_chunks_before`, `n_chunks_after`).
  """
  if kind == 'local':
    pick = lambda value, default: default if value is None else value
    return tl.LocalSelfAttention(
        n_heads=n_heads, d_qk=d_qk, d_v=d_v, chunk_len=pick(local_chunk_len, chunk_len),
        n_chunks_before=pick(local_n_chunks_before, n_chunks_before),
        n_chunks_after=pick(local_n_chunks_after, n_chunks_after), causal=causal,
        dropout=attention_dropout, mode=mode, dtype=dtype)
  if kind == 'lsh':
    return tl.LSHSelfAttention(
        n_heads=n_heads, d_qk=d_qk, d_v=d_v, n_hashes=n_hashes, n_buckets=n_buckets,
        chunk_len=chunk_len, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
        causal=causal, dropout=attention_dropout, mode=mode,
        predict_mem_len=predict_mem_len, dtype=dtype, convention=lsh_convention)
  full = dict(n_heads=n_heads, d_qk=d_qk, d_v=d_v, dropout=attention_dropout,
              chunk_len=chunk_len, mode=mode, dtype=dtype, use_bias=False)
  if causal:
    return tl.CausalAttention(max_len=max_len, **full)
  return tl.Attention(**full)


def _feed_forward_half(*, d_model, d_ff, dropout, ff_activation, ff_chunk_len, mode, dtype):
  """[x1, x2] -> [x1 + FeedForward(x2), x2]: (b, l, d) x 2 -> the same; n_in = n_out = 2."""
  activation = FF_ACTIVATIONS.get(ff_activation, ff_activation)
  return cb.ReversibleHalfResidual(tl.FeedForward(
      d_model=d_model, d_ff=d_ff, dropout=dropout, activation=activation, mode=mode,
      chunk_len=ff_chunk_len or None, dtype=dtype))


def ReversibleBlocks(pattern, *, n_layers, reversible, attention, feed_forward,  # pylint: disable=invalid-name
                     dropout, mode, extra=None):
  """`ReversibleSerial` of n_layers two-stream blocks, one per entry of `pattern` in turn.

  [x1, x2, ctx...] -> [y1, y2, ctx...]: (b, l, d) x 2 and the context arrays
  unchanged; n_in = n_out = 2 + len(ctx). `attention(kind)` makes the
  self-attention layer of a block, `feed_forward()` its feed-forward half
  residual, and `extra()` (optional) more half residuals after the
  self-attention (the decoder's attention to the encoder). The pattern's
  blocks form one scanned unit repeated n_layers // len(pattern) times.
  """
  layers = []
  for kind in pattern:
    layers += [
        cb.ReversibleHalfResidual(tl.LayerNorm(), attention(kind), tl.Dropout(dropout, mode=mode)),
        cb.ReversibleSwap(),
    ]
    if extra is not None:
      layers += extra()
    layers += [feed_forward(), cb.ReversibleSwap()]
  return cb.ReversibleSerial(*layers, n_repeats=n_layers // len(pattern), reversible=reversible)


# ----------------------------------------------------------------------------- models


def ReformerLM(*, vocab_size: int, d_model: int = 512, d_ff: int = 2048,  # pylint: disable=invalid-name
               n_layers: int = 6, n_heads: int = 8, d_qk: int | None = None,
               d_v: int | None = None, dropout: float = 0.1, attention_dropout: float = 0.0,
               max_len: int = 2048, mode: str = 'train', dtype=None,
               attention_type: str | Sequence[str] = 'lsh', n_hashes: int = 1,
               n_buckets=None, chunk_len: int = 64, n_chunks_before: int = 1,
               n_chunks_after: int = 0, predict_mem_len: int | None = None,
               pos_type: str = 'axial', axial_shape: Sequence[int] | None = None,
               axial_d_embs: Sequence[int] | None = None, ff_chunk_len: int | None = None,
               ff_activation: Any = 'relu', reversible: bool = True,
               local_chunk_len: int | None = None, local_n_chunks_before: int | None = None,
               local_n_chunks_after: int | None = None, lsh_convention: str = 'terraflax'):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, l, vocab_size); 1 -> 1.

  A decoder-only Reformer language model. It shifts its input right
  (inserting pad id 0), so logits[:, i] predict tokens[:, i] from the tokens
  before i and the input is also the target. Layout (parameter paths follow
  it): ShiftRight, Embedding, Dropout, positions, Dup, ReversibleSerial of the
  blocks, MergeStreams('concat'), LayerNorm (2 d_model), Dropout, Dense.

  Args:
    vocab_size: number of token ids.
    d_model: width of each residual stream.
    d_ff: feed-forward hidden width.
    n_layers: attention + feed-forward blocks.
    n_heads: attention heads.
    d_qk, d_v: per-head widths of queries/keys and values (default d_model // n_heads).
    dropout: dropout on embeddings, residual branches, the feed-forward and the head.
    attention_dropout: dropout on attention weights.
    max_len: longest sequence (positions, the full attention's predict-mode cache).
    mode: 'train', 'eval' or 'predict'.
    dtype: compute dtype (e.g. 'bfloat16'); parameters stay float32, logits are float32.
    attention_type: 'lsh', 'full', 'local', or a sequence of them cycled over the layers
      (n_layers must be a multiple of its length), like Trax's list of types.
    n_hashes: LSH hash rounds.
    n_buckets: LSH buckets per round: an even int, a pair (n1, n2), 1, or None
      for Trax's rule from the length (in 'predict' mode from predict_mem_len,
      so set it explicitly when training on sequences shorter than max_len).
    chunk_len: LSH chunk length; also the query chunk of full attention.
    n_chunks_before, n_chunks_after: chunks each LSH chunk attends to besides its own.
    predict_mem_len: positions the LSH layers remember in 'predict' mode (default max_len).
    pos_type: 'axial' (Reformer's factorised positions), 'sinusoidal' or 'learned'.
    axial_shape: axial factorisation of the positions, prod >= max_len
      (default `default_axial_shape(max_len)`, e.g. (16, 16) for 256).
    axial_d_embs: width of each axial part, summing to d_model (default: halves).
    ff_chunk_len: run the feed-forward blocks this many positions at a time
      (None or 0: all at once).
    ff_activation: 'relu', 'gelu', 'fast_gelu' or a layer factory (tl.Relu).
    reversible: rebuild activations in the backward pass (True) or store
      them (False); the parameters and the function are the same.
    local_chunk_len, local_n_chunks_before, local_n_chunks_after: the windows
      of 'local' layers (default: chunk_len, n_chunks_before, n_chunks_after).
    lsh_convention: 'terraflax' or 'hf' (`LSHSelfAttention.convention`; 'hf'
      reproduces Hugging Face's LSH layers, see `terraflax.models.convert`).
  """
  name = 'ReformerLM'
  check_int(name, 'local_chunk_len', local_chunk_len, allow_none=True)
  for field, value in (('local_n_chunks_before', local_n_chunks_before),
                       ('local_n_chunks_after', local_n_chunks_after)):
    check_int(name, field, value, minimum=0, allow_none=True)
  if lsh_convention not in tl.lsh_attention.CONVENTIONS:
    raise ValueError(f'{name} lsh_convention must be one of {tl.lsh_attention.CONVENTIONS}, '
                     f'got {lsh_convention!r}.')
  check_int(name, 'vocab_size', vocab_size)
  check_int(name, 'n_layers', n_layers)
  pattern = attention_pattern(name, attention_type, n_layers)
  d_qk, d_v, predict_mem_len = _check_common(
      name, mode=mode, d_model=d_model, d_ff=d_ff, n_heads=n_heads, d_qk=d_qk, d_v=d_v,
      dropout=dropout, attention_dropout=attention_dropout, max_len=max_len, n_hashes=n_hashes,
      chunk_len=chunk_len, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
      predict_mem_len=predict_mem_len, ff_chunk_len=ff_chunk_len, ff_activation=ff_activation,
      reversible=reversible, patterns=[pattern])
  axial_shape, axial_d_embs = _positions(name, pos_type=pos_type, axial_shape=axial_shape,
                                         axial_d_embs=axial_d_embs, d_model=d_model,
                                         max_len=max_len)
  dtype = _dtype(dtype)

  def attention(kind):
    return SelfAttention(
        kind, causal=True, n_heads=n_heads, d_qk=d_qk, d_v=d_v,
        attention_dropout=attention_dropout, n_hashes=n_hashes, n_buckets=n_buckets,
        chunk_len=chunk_len, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
        predict_mem_len=predict_mem_len, max_len=max_len, mode=mode, dtype=dtype,
        local_chunk_len=local_chunk_len, local_n_chunks_before=local_n_chunks_before,
        local_n_chunks_after=local_n_chunks_after, lsh_convention=lsh_convention)

  def feed_forward():
    return _feed_forward_half(d_model=d_model, d_ff=d_ff, dropout=dropout,
                              ff_activation=ff_activation, ff_chunk_len=ff_chunk_len, mode=mode,
                              dtype=dtype)

  return cb.Serial(
      tl.ShiftRight(mode=mode),
      Embedder(vocab_size=vocab_size, d_model=d_model, max_len=max_len, dropout=dropout,
               pos_type=pos_type, axial_shape=axial_shape, axial_d_embs=axial_d_embs, mode=mode,
               dtype=dtype),
      cb.Dup(),  # stack: x1, x2
      ReversibleBlocks(pattern, n_layers=n_layers, reversible=reversible, attention=attention,
                       feed_forward=feed_forward, dropout=dropout, mode=mode),
      cb.MergeStreams('concat'),  # stack: [attention stream, feed-forward stream] (b, l, 2d)
      tl.LayerNorm(),
      tl.Dropout(dropout, mode=mode, shared_axes=(1,)),
      tl.Dense(vocab_size, dtype=dtype),
      _float32(),
  )


def Reformer(*, vocab_size: int, output_vocab_size: int | None = None,  # pylint: disable=invalid-name
             d_model: int = 512, d_ff: int = 2048, n_layers: int = 6,
             n_encoder_layers: int | None = None, n_decoder_layers: int | None = None,
             n_heads: int = 8, d_qk: int | None = None, d_v: int | None = None,
             dropout: float = 0.1, attention_dropout: float = 0.0, max_len: int = 2048,
             mode: str = 'train', dtype=None,
             encoder_attention_type: str | Sequence[str] = 'full',
             decoder_attention_type: str | Sequence[str] = 'full', n_hashes: int = 1,
             n_buckets=None, chunk_len: int = 64, n_chunks_before: int = 1,
             n_chunks_after: int = 0, predict_mem_len: int | None = None,
             pos_type: str = 'axial', axial_shape: Sequence[int] | None = None,
             axial_d_embs: Sequence[int] | None = None, ff_chunk_len: int | None = None,
             ff_activation: Any = 'relu', reversible: bool = True, pad_id: int = 0):
  """[inputs, targets] -> [logits]: int (b, li), (b, lt) -> float32 (b, lt, v); 2 -> 1.

  An encoder-decoder Reformer (Trax's `Reformer`), v = `output_vocab_size`
  (default `vocab_size`). The encoder embeds `inputs` and runs reversible
  blocks of non-causal self-attention (full attention masks out `pad_id`
  tokens) and feed-forward; its two streams are averaged and normalised. The
  decoder shifts `targets` right and runs reversible blocks of causal
  self-attention, attention to the encoder's real tokens and feed-forward;
  its streams are averaged, normalised and projected, so logits[:, i]
  predict targets[:, i].

  In 'predict' mode each call takes the full `inputs` and the previous target
  token (b, 1): the encoder runs once (in 'eval' mode, `CacheOutputs`) and the
  decoder's self-attention and encoder keys/values are cached.

  `encoder_attention_type`/`decoder_attention_type` are 'full', 'lsh' or a
  sequence cycled over the layers (Trax's defaults are non-LSH). Note that
  `LSHSelfAttention` takes no padding mask: LSH encoder layers also attend to
  padding tokens, so with 'lsh' in the encoder, right-padding changes the
  outputs. `n_encoder_layers`/`n_decoder_layers` default to `n_layers`; the
  other arguments are those of `ReformerLM`.
  """
  name = 'Reformer'
  n_encoder_layers = n_layers if n_encoder_layers is None else n_encoder_layers
  n_decoder_layers = n_layers if n_decoder_layers is None else n_decoder_layers
  output_vocab_size = vocab_size if output_vocab_size is None else output_vocab_size
  for field, value in (('vocab_size', vocab_size), ('output_vocab_size', output_vocab_size),
                       ('n_encoder_layers', n_encoder_layers),
                       ('n_decoder_layers', n_decoder_layers)):
    check_int(name, field, value)
  encoder_pattern = attention_pattern(name, encoder_attention_type, n_encoder_layers,
                                      'encoder_attention_type')
  decoder_pattern = attention_pattern(name, decoder_attention_type, n_decoder_layers,
                                      'decoder_attention_type')
  d_qk, d_v, predict_mem_len = _check_common(
      name, mode=mode, d_model=d_model, d_ff=d_ff, n_heads=n_heads, d_qk=d_qk, d_v=d_v,
      dropout=dropout, attention_dropout=attention_dropout, max_len=max_len, n_hashes=n_hashes,
      chunk_len=chunk_len, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
      predict_mem_len=predict_mem_len, ff_chunk_len=ff_chunk_len, ff_activation=ff_activation,
      reversible=reversible, patterns=[decoder_pattern])
  axial_shape, axial_d_embs = _positions(name, pos_type=pos_type, axial_shape=axial_shape,
                                         axial_d_embs=axial_d_embs, d_model=d_model,
                                         max_len=max_len)
  dtype = _dtype(dtype)
  lsh = dict(n_heads=n_heads, d_qk=d_qk, d_v=d_v, attention_dropout=attention_dropout,
             n_hashes=n_hashes, n_buckets=n_buckets, chunk_len=chunk_len,
             n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
             predict_mem_len=predict_mem_len, max_len=max_len, dtype=dtype)

  def embedder(vocab, mode):
    return Embedder(vocab_size=vocab, d_model=d_model, max_len=max_len, dropout=dropout,
                    pos_type=pos_type, axial_shape=axial_shape, axial_d_embs=axial_d_embs,
                    mode=mode, dtype=dtype)

  def blocks(pattern, n, mode, causal, extra=None):
    return ReversibleBlocks(
        pattern, n_layers=n, reversible=reversible, dropout=dropout, mode=mode, extra=extra,
        attention=lambda kind: SelfAttention(kind, causal=causal, mode=mode, **lsh),
        feed_forward=lambda: _feed_forward_half(
            d_model=d_model, d_ff=d_ff, dropout=dropout, ff_activation=ff_activation,
            ff_chunk_len=ff_chunk_len, mode=mode, dtype=dtype))

  def to_encoder():  # [y1, y2, encoder, mask] -> [y1 + attention(y2, encoder, mask), ...]
    return [
        cb.ReversibleHalfResidual(
            tl.LayerNorm(),
            tl.EncDecAttention(n_heads=n_heads, d_qk=d_qk, d_v=d_v, dropout=attention_dropout,
                               chunk_len=chunk_len, mode=mode, dtype=dtype, use_bias=False),
            tl.Dropout(dropout, mode=mode)),
        cb.ReversibleSwap(),
    ]

  encoder_mode = 'eval' if mode == 'predict' else mode  # It runs once per sequence.
  encoder = cb.Serial(
      cb.Branch(None, _padding_mask(pad_id)),  # stack: ids, mask
      embedder(vocab_size, encoder_mode),  # stack: x, mask
      cb.Dup(),  # stack: x1, x2, mask
      blocks(encoder_pattern, n_encoder_layers, encoder_mode, causal=False),
      cb.MergeStreams('mean'),  # stack: x, mask
      tl.LayerNorm(),  # stack: encoder, mask
      label='Encoder',
  )
  return cb.Serial(
      tl.CacheOutputs(encoder, mode=mode),  # stack: encoder, mask, targets
      cb.Select([2, 0, 1]),  # stack: targets, encoder, mask
      tl.ShiftRight(mode=mode, pad_id=pad_id),
      embedder(output_vocab_size, mode),  # stack: y, encoder, mask
      cb.Dup(),  # stack: y1, y2, encoder, mask
      blocks(decoder_pattern, n_decoder_layers, mode, causal=True, extra=to_encoder),
      cb.MergeStreams('mean'),  # stack: y, encoder, mask
      cb.Select([0], n_in=3),
      tl.LayerNorm(),
      tl.Dense(output_vocab_size, dtype=dtype),
      _float32(),
  )
