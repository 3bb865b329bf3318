"""Reformer models: a decoder-only LM and an encoder-decoder, on reversible layers.

  ReformerLM   [tokens] -> [logits]: (b, l) -> (b, l, v)
  Reformer     [inputs, targets] -> [logits]: (b, li), (b, lt) -> (b, lt, v)

Both run their blocks on two residual streams (Kitaev et al. 2020, after
RevNet): the embedded input is duplicated and every block is

  ReversibleHalfResidual(LayerNorm, attention, Dropout), ReversibleSwap,
  ReversibleHalfResidual(FeedForward), ReversibleSwap

inside one `ReversibleSerial`, whose backward pass rebuilds each block's
inputs from its outputs instead of storing activations. Blocks are scanned
with their parameters stacked on a leading axis: with one attention spec
the axis has `n_layers` entries; with a pattern of specs (`attention=
(LSH(n_hashes=4), Full(query_chunk_len=64))`) one scanned block holds one
layer of each in turn and the axis has `n_layers // len(pattern)` entries. `reversible=False` runs the
same layers, parameters and randomness under plain autodiff.

ReformerLM ends like Trax's ReformerLM and Hugging Face's
`ReformerModelWithLMHead`: the streams are concatenated as [attention stream,
feed-forward stream] (b, l, 2d), then LayerNorm, Dropout and the output Dense.
The encoder-decoder `Reformer` follows Trax's Reformer: the streams of the
encoder and of the decoder are averaged.

Attention (`terraflax.models.attention` specs): `LSH` is `LSHSelfAttention`
(shared-QK, hashed chunks); `Full` is exact dot-product attention
(`CausalAttention` in decoders, `Attention` with the padding mask in the
encoder), `Full(query_chunk_len=64)` runs 64 queries at a time so its memory
is linear in the length; `Local` is `LocalSelfAttention` (Hugging Face's
local layers: separate q/k/v, each chunk attends to its window of
neighbouring chunks). None uses biases, as in Trax and HF.

Parameters have the same names and shapes in 'train', 'eval' and 'predict'
modes and with `reversible` on or off. In 'predict' mode the models decode
one token per call (see `terraflax.decoding`): full attention keeps `max_len`
keys and values per layer, LSH attention a ring buffer of `predict_mem_len`
positions with the bucket ids of its keys.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.combinators.base import check_int, check_mode, check_rate
from terraflax.models import attention as attn
from terraflax.models.common import (
    DropSegments, Float32, PaddingMask, compute_dtype, deprecated_arguments, no_new_and_old,
    suggest)

POSITION_KINDS = ('axial', 'sinusoidal', 'learned')
FF_ACTIVATIONS = {'relu': tl.Relu, 'gelu': tl.Gelu, 'fast_gelu': tl.FastGelu}

# Old keyword names (one release): old name -> new spelling.
_LSH_KNOBS = ('n_hashes', 'n_buckets', 'chunk_len', 'n_chunks_before', 'n_chunks_after',
              'predict_mem_len')
DEPRECATED = {
    **{name: f"attention=LSH({name}=...) (or {{'kind': 'lsh', '{name}': ...}})"
       for name in _LSH_KNOBS},
    'chunk_len': 'attention=LSH(chunk_len=...) / Full(query_chunk_len=...)',
    'lsh_convention': 'attention=LSH(convention=...)',
    'attention_type': "attention= a spec or a list of specs (LSH(...), Full(...), Local(...))",
    'local_chunk_len': 'attention=Local(chunk_len=...)',
    'local_n_chunks_before': 'attention=Local(n_chunks_before=...)',
    'local_n_chunks_after': 'attention=Local(n_chunks_after=...)',
    'pos_type': "positions='axial' | 'sinusoidal' | 'learned'",
    'axial_shape': "positions={'kind': 'axial', 'shape': ...}",
    'axial_d_embs': "positions={'kind': 'axial', 'd_embs': ...}",
    'attention_dropout': "the attention spec's dropout (LSH(dropout=...), {'kind': ..., "
                         "'dropout': ...})",
}
DEPRECATED_SEQ2SEQ = {
    **{k: v for k, v in DEPRECATED.items() if k not in ('attention_type',) and 'local' not in k},
    'encoder_attention_type': 'encoder_attention= a spec or a list of specs',
    'decoder_attention_type': 'decoder_attention= a spec or a list of specs',
}
_ATTENTION_KNOBS = _LSH_KNOBS + ('lsh_convention', 'local_chunk_len', 'local_n_chunks_before',
                                 'local_n_chunks_after')


def _old_specs(attention_type, old) -> tuple:
  """The specs an old `attention_type` with the old knobs `old` meant (same numerics)."""
  get = lambda name, default: default if old.get(name) is None else old[name]
  chunk_len = get('chunk_len', 64)
  kinds = (attention_type,) if isinstance(attention_type, str) else tuple(attention_type)
  specs = []
  for kind in kinds:
    if kind == 'lsh':
      specs.append(attn.LSH(
          n_hashes=get('n_hashes', 1), chunk_len=chunk_len, n_buckets=old.get('n_buckets'),
          n_chunks_before=get('n_chunks_before', 1), n_chunks_after=get('n_chunks_after', 0),
          predict_mem_len=old.get('predict_mem_len'), convention=get('lsh_convention',
                                                                    'terraflax')))
    elif kind == 'full':
      specs.append(attn.Full(query_chunk_len=chunk_len))
    elif kind == 'local':
      specs.append(attn.Local(
          chunk_len=get('local_chunk_len', chunk_len),
          n_chunks_before=get('local_n_chunks_before', get('n_chunks_before', 1)),
          n_chunks_after=get('local_n_chunks_after', get('n_chunks_after', 0))))
    else:
      raise ValueError(f"attention_type must be 'lsh', 'full', 'local' or a sequence of them, "
                       f'got {attention_type!r}{suggest(kind, ("lsh", "full", "local"))}.')
  return tuple(specs)


def _translate(model: str, type_names: Mapping[str, tuple[str, str, Any]]):
  """translate(old, kwargs) for `deprecated_arguments`.

  `type_names` maps an old type argument to (new argument, old default type,
  the new argument's default spec). An old `attention_dropout` sets `dropout`
  on every spec of each new argument (given, translated or default).
  """
  def translate(old, kwargs):
    kwargs = dict(kwargs)
    knobs = {k: v for k, v in old.items() if k in _ATTENTION_KNOBS}
    for type_name, (new, default, default_spec) in type_names.items():
      if type_name in old or knobs:
        no_new_and_old(model, kwargs, new, old)
        kwargs[new] = _old_specs(old.get(type_name, default), knobs)
      if 'attention_dropout' in old:
        kwargs[new] = attn.replace_all(kwargs.get(new, default_spec),
                                       dropout=old['attention_dropout'])
    if {'pos_type', 'axial_shape', 'axial_d_embs'} & set(old):
      no_new_and_old(model, kwargs, 'positions', old)
      pos_type = old.get('pos_type', 'axial')
      if old.get('axial_shape') is None and old.get('axial_d_embs') is None:
        kwargs['positions'] = pos_type
      else:
        kwargs['positions'] = {'kind': pos_type, 'shape': old.get('axial_shape'),
                               'd_embs': old.get('axial_d_embs')}
    return kwargs
  return translate


# ----------------------------------------------------------------------------- checks


def default_axial_shape(max_len: int) -> tuple[int, int]:
  """(rows, cols) covering max_len: cols the power of two at or above sqrt(max_len)."""
  cols = 2 ** math.ceil(math.log2(math.sqrt(max_len))) if max_len > 1 else 1
  return (-(-max_len // cols), cols)


def resolve_positions(model, positions, *, d_model, max_len):
  """`positions` -> (kind, axial shape, axial d_embs), the last two None unless axial.

  `positions` is 'axial', 'sinusoidal', 'learned' or a dict {'kind': 'axial',
  'shape': (rows, cols), 'd_embs': (d1, d2)} (shape and d_embs optional).
  """
  if hasattr(positions, 'to_dict') and not isinstance(positions, Mapping):
    positions = positions.to_dict()
  fields = dict(positions) if isinstance(positions, Mapping) else {'kind': positions}
  kind = fields.pop('kind', 'axial')
  if kind not in POSITION_KINDS:
    raise ValueError(f'{model} positions must be one of {POSITION_KINDS} or a dict with that '
                     f"'kind', got {positions!r}{suggest(kind, POSITION_KINDS)}.")
  for key in fields:
    if key not in ('shape', 'd_embs'):
      raise ValueError(f'{model} positions: {key!r} is not a field{suggest(key, ("shape", "d_embs"))}'
                       "; valid: kind, shape, d_embs ('axial' only).")
  axial_shape, axial_d_embs = fields.get('shape'), fields.get('d_embs')
  if kind != 'axial':
    if axial_shape is not None or axial_d_embs is not None:
      raise ValueError(f"{model} positions shape and d_embs apply to kind 'axial' only, got "
                       f'{positions!r}.')
    return kind, None, None
  shape = default_axial_shape(max_len) if axial_shape is None else tuple(axial_shape)
  if not shape or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in shape):
    raise ValueError(f'{model} positions shape must be a sequence of positive ints, got '
                     f'{axial_shape!r}.')
  if math.prod(shape) < max_len:
    raise ValueError(f'{model} positions shape={shape} covers {math.prod(shape)} positions, '
                     f'fewer than max_len={max_len}.')
  if axial_d_embs is None:
    base = d_model // len(shape)
    d_embs = (base,) * (len(shape) - 1) + (d_model - base * (len(shape) - 1),)
  else:
    d_embs = tuple(axial_d_embs)
  if len(d_embs) != len(shape) or any(
      not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in d_embs):
    raise ValueError(f'{model} positions d_embs must be one positive int per axis of '
                     f'shape={shape}, got {axial_d_embs!r}.')
  if sum(d_embs) != d_model:
    raise ValueError(f'{model} positions d_embs={d_embs} must sum to d_model={d_model}, got '
                     f'{sum(d_embs)}.')
  return kind, shape, d_embs


def _check_common(model, *, mode, d_model, d_ff, n_heads, d_qk, d_v, dropout, max_len,
                  ff_chunk_len, ff_activation, reversible, causal_specs):
  """Checks shared by both factories; returns (d_qk, d_v) resolved."""
  check_mode(mode, f'{model} mode')
  for name, value in (('d_model', d_model), ('d_ff', d_ff), ('n_heads', n_heads),
                      ('max_len', max_len)):
    check_int(model, name, value)
  for name, value in (('d_qk', d_qk), ('d_v', d_v)):
    check_int(model, name, value, allow_none=True)
  check_int(model, 'ff_chunk_len', ff_chunk_len, minimum=0, allow_none=True)
  check_rate(model, 'dropout', dropout)
  if (d_qk is None or d_v is None) and d_model % n_heads:
    raise ValueError(f'{model} d_model={d_model} must be divisible by n_heads={n_heads} '
                     '(or set both d_qk and d_v, the per-head widths).')
  if not (callable(ff_activation) or ff_activation in FF_ACTIVATIONS):
    raise ValueError(f'{model} ff_activation must be one of {tuple(FF_ACTIVATIONS)} or a layer '
                     f'factory such as tl.Relu, got {ff_activation!r}.')
  if not isinstance(reversible, bool):
    raise ValueError(f'{model} reversible must be True or False, got {reversible!r}.')
  for spec in causal_specs:
    if isinstance(spec, attn.LSH):
      memory = max_len if spec.predict_mem_len is None else spec.predict_mem_len
      neighbourhood = spec.chunk_len * (spec.n_chunks_before + 1)
      if memory < neighbourhood:
        raise ValueError(
            f'{model} LSH attention predict_mem_len={memory} (default: max_len) must hold the '
            f'chunk neighbourhood chunk_len * (n_chunks_before + 1) = {neighbourhood}.')
  default = d_model // n_heads
  return d_qk or default, d_v or default


# ----------------------------------------------------------------------------- pieces


def Embedder(*, vocab_size, d_model, max_len, dropout, positions, mode, dtype,  # pylint: disable=invalid-name
             packed=False):
  """[ids] -> [x]: int (b, l) -> (b, l, d_model); a list, 1 -> 1.

  packed=True: [ids, segment_ids, positions] -> [x, segment_ids]; 3 -> 2.

  Token embedding, dropout shared along the length (as in Trax), positions
  (`positions` as `resolve_positions` returns it: (kind, shape, d_embs)).
  """
  kind, axial_shape, axial_d_embs = positions
  if kind == 'axial':
    layer = tl.AxialPositionalEncoding(shape=axial_shape, d_embs=axial_d_embs, mode=mode,
                                       packed=packed)
  else:
    layer = tl.PositionalEncoding(max_len=max_len, kind=kind, mode=mode, packed=packed)
  return [
      tl.Embedding(vocab_size, d_model, dtype=dtype),
      tl.Dropout(dropout, mode=mode, shared_axes=(1,)),
      layer,
  ]


def _feed_forward_half(*, d_model, d_ff, dropout, ff_activation, ff_chunk_len, mode, dtype):
  """[x1, x2] -> [x1 + FeedForward(x2), x2]: (b, l, d) x 2 -> the same; n_in = n_out = 2."""
  activation = FF_ACTIVATIONS.get(ff_activation, ff_activation)
  return cb.ReversibleHalfResidual(tl.FeedForward(
      d_model=d_model, d_ff=d_ff, dropout=dropout, activation=activation, mode=mode,
      chunk_len=ff_chunk_len or None, dtype=dtype))


def ReversibleBlocks(pattern, *, n_layers, reversible, attention, feed_forward,  # pylint: disable=invalid-name
                     dropout, mode, extra=None):
  """`ReversibleSerial` of n_layers two-stream blocks, one per spec of `pattern` in turn.

  [x1, x2, ctx...] -> [y1, y2, ctx...]: (b, l, d) x 2 and the context arrays
  unchanged; n_in = n_out = 2 + len(ctx). `attention(spec)` makes the
  self-attention layer of a block, `feed_forward()` its feed-forward half
  residual, and `extra()` (optional) more half residuals after the
  self-attention (the decoder's attention to the encoder). The pattern's
  blocks form one scanned unit repeated n_layers // len(pattern) times.
  """
  layers = []
  for spec in pattern:
    layers += [
        cb.ReversibleHalfResidual(tl.LayerNorm(), attention(spec), tl.Dropout(dropout, mode=mode)),
        cb.ReversibleSwap(),
    ]
    if extra is not None:
      layers += extra()
    layers += [feed_forward(), cb.ReversibleSwap()]
  return cb.ReversibleSerial(*layers, n_repeats=n_layers // len(pattern), reversible=reversible)


# ----------------------------------------------------------------------------- models


# The rate on attention weights of specs whose dropout is None (Trax's and HF's default).
ATTENTION_DROPOUT = 0.0


@deprecated_arguments(DEPRECATED, _translate(
    'ReformerLM', {'attention_type': ('attention', 'lsh', attn.LSH())}))
def ReformerLM(*, vocab_size: int, d_model: int = 512, d_ff: int = 2048,  # pylint: disable=invalid-name
               n_layers: int = 6, n_heads: int = 8, d_qk: int | None = None,
               d_v: int | None = None, dropout: float = 0.1, max_len: int = 2048,
               mode: str = 'train', dtype=None,
               attention: Any = attn.LSH(), positions: Any = 'axial',
               ff_chunk_len: int | None = None, ff_activation: Any = 'relu',
               reversible: bool = True, packed: bool = False):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, l, vocab_size); 1 -> 1.

  packed=True: [tokens, segment_ids, positions] -> [logits], 3 -> 1 (rows of
  packed documents, each computed as if alone; the reversible blocks carry
  the segment ids as context: [x1, x2, segment_ids]).

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
    dropout: dropout on embeddings, residual branches, the feed-forward and the head
      (dropout on the attention weights is the attention spec's `dropout`, default 0).
    max_len: longest sequence (positions, the full attention's predict-mode cache,
      LSH's default predict_mem_len).
    mode: 'train', 'eval' or 'predict'.
    dtype: compute dtype (e.g. 'bfloat16'); parameters stay float32, logits are float32.
    attention: an attention spec (`terraflax.models.attention`): `LSH(n_hashes=4,
      chunk_len=64, ...)`, `Full(query_chunk_len=64)`, `Local(...)`, a dict
      {'kind': 'lsh', 'n_hashes': 4, ...}, or a sequence of them cycled over
      the layers (n_layers a multiple of its length), like Trax's list of
      types. LSH's n_buckets=None is Trax's rule from the length (in
      'predict' mode from predict_mem_len, so set it explicitly when training
      on sequences shorter than max_len); `LSH(convention='hf')` reproduces
      Hugging Face's LSH layers (`terraflax.models.convert`).
    positions: 'axial' (Reformer's factorised positions), 'sinusoidal',
      'learned', or {'kind': 'axial', 'shape': (rows, cols), 'd_embs': (d1, d2)}
      (shape: prod >= max_len, default `default_axial_shape(max_len)`, e.g.
      (16, 16) for 256; d_embs: the width of each part, summing to d_model,
      default halves).
    ff_chunk_len: run the feed-forward blocks this many positions at a time
      (None or 0: all at once).
    ff_activation: 'relu', 'gelu', 'fast_gelu' or a layer factory (tl.Relu).
    reversible: rebuild activations in the backward pass (True) or store
      them (False); the parameters and the function are the same.
  """
  name = 'ReformerLM'
  check_int(name, 'vocab_size', vocab_size)
  check_int(name, 'n_layers', n_layers)
  pattern = attn.pattern(attention, n_layers, where=f'{name} attention')
  d_qk, d_v = _check_common(
      name, mode=mode, d_model=d_model, d_ff=d_ff, n_heads=n_heads, d_qk=d_qk, d_v=d_v,
      dropout=dropout, max_len=max_len, ff_chunk_len=ff_chunk_len, ff_activation=ff_activation,
      reversible=reversible, causal_specs=pattern)
  positions = resolve_positions(name, positions, d_model=d_model, max_len=max_len)
  dtype = compute_dtype(dtype)

  def attention_layer(spec):
    return attn.SelfAttention(spec, n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=True, mode=mode,
                              dtype=dtype, dropout=ATTENTION_DROPOUT, max_len=max_len,
                              use_bias=False, packed=packed)

  def feed_forward():
    return _feed_forward_half(d_model=d_model, d_ff=d_ff, dropout=dropout,
                              ff_activation=ff_activation, ff_chunk_len=ff_chunk_len, mode=mode,
                              dtype=dtype)

  return cb.Serial(
      tl.ShiftRight(mode=mode, packed=packed),
      Embedder(vocab_size=vocab_size, d_model=d_model, max_len=max_len, dropout=dropout,
               positions=positions, mode=mode, dtype=dtype, packed=packed),
      cb.Dup(),  # stack: x1, x2(, segment_ids)
      ReversibleBlocks(pattern, n_layers=n_layers, reversible=reversible,
                       attention=attention_layer, feed_forward=feed_forward, dropout=dropout,
                       mode=mode),
      cb.MergeStreams('concat'),  # stack: [attention stream, feed-forward stream] (b, l, 2d)
      tl.LayerNorm(),
      tl.Dropout(dropout, mode=mode, shared_axes=(1,)),
      tl.Dense(vocab_size, dtype=dtype, axes=('embed', 'vocab')),
      Float32(),
      DropSegments(packed),
  )


@deprecated_arguments(DEPRECATED_SEQ2SEQ, _translate(
    'Reformer', {'encoder_attention_type': ('encoder_attention', 'full',
                                            attn.Full(query_chunk_len=64)),
                 'decoder_attention_type': ('decoder_attention', 'full',
                                            attn.Full(query_chunk_len=64))}))
def Reformer(*, vocab_size: int, output_vocab_size: int | None = None,  # pylint: disable=invalid-name
             d_model: int = 512, d_ff: int = 2048, n_layers: int = 6,
             n_encoder_layers: int | None = None, n_decoder_layers: int | None = None,
             n_heads: int = 8, d_qk: int | None = None, d_v: int | None = None,
             dropout: float = 0.1, max_len: int = 2048, mode: str = 'train', dtype=None,
             encoder_attention: Any = attn.Full(query_chunk_len=64),
             decoder_attention: Any = attn.Full(query_chunk_len=64),
             positions: Any = 'axial', ff_chunk_len: int | None = None,
             ff_activation: Any = 'relu', reversible: bool = True, pad_id: int = 0,
             packed: bool = False):
  """[inputs, targets] -> [logits]: int (b, li), (b, lt) -> float32 (b, lt, v); 2 -> 1.

  packed=True ('train'/'eval'): [inputs, inputs_segment_ids, inputs_positions,
  targets, targets_segment_ids, targets_positions] -> [logits], 6 -> 1, as
  `Transformer`'s: target document s reads input document s, as if alone.

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

  `encoder_attention`/`decoder_attention` are attention specs (or sequences
  cycled over the layers) as in `ReformerLM` (Trax's defaults are non-LSH:
  `Full(query_chunk_len=64)`). The attention to the encoder runs query
  chunks of the first decoder spec's query_chunk_len ('full') or chunk_len
  ('lsh', 'local'), and its attention-weight dropout is that spec's `dropout`
  (None: 0, as for every spec here). Note that `LSHSelfAttention` takes no padding mask: LSH
  encoder layers also attend to padding tokens, so with LSH in the encoder,
  right-padding changes the outputs. `n_encoder_layers`/`n_decoder_layers`
  default to `n_layers`; the other arguments are those of `ReformerLM`.
  """
  name = 'Reformer'
  n_encoder_layers = n_layers if n_encoder_layers is None else n_encoder_layers
  n_decoder_layers = n_layers if n_decoder_layers is None else n_decoder_layers
  output_vocab_size = vocab_size if output_vocab_size is None else output_vocab_size
  for field, value in (('vocab_size', vocab_size), ('output_vocab_size', output_vocab_size),
                       ('n_encoder_layers', n_encoder_layers),
                       ('n_decoder_layers', n_decoder_layers)):
    check_int(name, field, value)
  encoder_pattern = attn.pattern(encoder_attention, n_encoder_layers,
                                 where=f'{name} encoder_attention')
  decoder_pattern = attn.pattern(decoder_attention, n_decoder_layers,
                                 where=f'{name} decoder_attention')
  d_qk, d_v = _check_common(
      name, mode=mode, d_model=d_model, d_ff=d_ff, n_heads=n_heads, d_qk=d_qk, d_v=d_v,
      dropout=dropout, max_len=max_len, ff_chunk_len=ff_chunk_len, ff_activation=ff_activation,
      reversible=reversible, causal_specs=decoder_pattern)
  positions = resolve_positions(name, positions, d_model=d_model, max_len=max_len)
  dtype = compute_dtype(dtype)
  first = decoder_pattern[0]
  cross_chunk_len = (first.chunk_len if isinstance(first, (attn.LSH, attn.Local))
                     else attn.query_chunk_len(first))
  cross_dropout = ATTENTION_DROPOUT if first.dropout is None else first.dropout

  def embedder(vocab, mode):
    return Embedder(vocab_size=vocab, d_model=d_model, max_len=max_len, dropout=dropout,
                    positions=positions, mode=mode, dtype=dtype, packed=packed)

  def blocks(pattern, n, mode, causal, extra=None):
    return ReversibleBlocks(
        pattern, n_layers=n, reversible=reversible, dropout=dropout, mode=mode, extra=extra,
        attention=lambda spec: attn.SelfAttention(
            spec, n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=causal, mode=mode, dtype=dtype,
            dropout=ATTENTION_DROPOUT, max_len=max_len, use_bias=False, packed=packed),
        feed_forward=lambda: _feed_forward_half(
            d_model=d_model, d_ff=d_ff, dropout=dropout, ff_activation=ff_activation,
            ff_chunk_len=ff_chunk_len, mode=mode, dtype=dtype))

  def to_encoder():  # [y1, y2, encoder, mask] -> [y1 + attention(y2, encoder, mask), ...]
    return [
        cb.ReversibleHalfResidual(
            tl.LayerNorm(),
            tl.EncDecAttention(n_heads=n_heads, d_qk=d_qk, d_v=d_v, dropout=cross_dropout,
                               chunk_len=cross_chunk_len, mode=mode, dtype=dtype,
                               use_bias=False, packed=packed),
            tl.Dropout(dropout, mode=mode)),
        cb.ReversibleSwap(),
    ]

  encoder_mode = 'eval' if mode == 'predict' else mode  # It runs once per sequence.
  encoder = cb.Serial(
      # stack: ids, mask (packed: ids, segment_ids, positions; an identity keeps the paths)
      cb.Select([0, 1, 2], n_in=3) if packed else cb.Branch(None, PaddingMask(pad_id)),
      embedder(vocab_size, encoder_mode),  # stack: x, mask
      cb.Dup(),  # stack: x1, x2, mask
      blocks(encoder_pattern, n_encoder_layers, encoder_mode, causal=False),
      cb.MergeStreams('mean'),  # stack: x, mask
      tl.LayerNorm(),  # stack: encoder, mask
      label='Encoder',
  )
  return cb.Serial(
      tl.CacheOutputs(encoder, mode=mode),  # stack: encoder, mask, targets
      # stack: targets, encoder, mask (packed: targets, segment_ids, positions, encoder, its ids)
      cb.Select([2, 3, 4, 0, 1]) if packed else cb.Select([2, 0, 1]),
      tl.ShiftRight(mode=mode, pad_id=pad_id, packed=packed),
      embedder(output_vocab_size, mode),  # stack: y, encoder, mask
      cb.Dup(),  # stack: y1, y2, encoder, mask
      blocks(decoder_pattern, n_decoder_layers, mode, causal=True, extra=to_encoder),
      cb.MergeStreams('mean'),  # stack: y, encoder, mask
      cb.Select([0], n_in=4 if packed else 3),
      tl.LayerNorm(),
      tl.Dense(output_vocab_size, dtype=dtype, axes=('embed', 'vocab')),
      Float32(),
  )
