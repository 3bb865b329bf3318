"""ConcatTerraformer: an encoder-decoder whose decoder reads the encoder by self-attention.

  ConcatTerraformer   [inputs, targets] -> [logits]: (b, li), (b, lt) -> (b, lt, v)

The model Trax 1.4.1 calls `trax.models.research.terraformer.ConfigurableTerraformer`
(Jaszczur et al., 2021), with its eval-mode arithmetic:

  inputs  -> Embedding, positions -> Dup, ReversibleSerial(n_encoder_layers x [
               ReversibleHalfResidual(LayerNorm, Attention(mask), Dropout), ReversibleSwap,
               ReversibleHalfResidual(feed-forward), ReversibleSwap])
             -> MergeStreams('mean'), Dense(d_model), LayerNorm                 (b, li, d)
  targets -> ShiftRight, Embedding (shared when output_vocab_size is None), positions
  ConcatWithPadding: per example the encoder's real vectors, then the decoder's (b, li + lt, d)
  Dup, ReversibleSerial(n_decoder_layers x [
      n_decoder_attention_layers x [ReversibleHalfResidual(LayerNorm, causal self-attention,
                                                           Dropout), ReversibleSwap],
      ReversibleHalfResidual(feed-forward), ReversibleSwap])
  MergeStreams('mean'), LayerNorm, StripFromConcatenateWithPadding           (b, lt, d)
  Dense(v)                                                                    (b, lt, v)

There is no encoder-decoder attention: the decoder's causal self-attention over the
concatenation sees the encoder's real tokens before the targets. The encoder mask is
`inputs != pad_id` (real tokens first, as Trax assumes). Decoding (`terraflax.decoding`,
`model(inputs, token)`) runs the encoder and the concatenated prefill on the first call
and then one target token per call (`terraflax.layers.concat`).
"""

from __future__ import annotations

from typing import Any

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.layers.concat import ConcatCausalAttention, ConcatDecoder, ConcatSparseQKVAttention
from terraflax.layers.positional import POSITIONAL_KINDS
from terraflax.models import attention as attn
from terraflax.models.common import Float32, compute_dtype
from terraflax.models.reformer import FF_ACTIVATIONS
from terraflax.models.terraformer import (
    _attention_half, _check_terraformer, _feed_forward_half, _two_streams)

CONCAT_POSITIONS = POSITIONAL_KINDS + ('fixed_base',)
DECODER_KINDS = (attn.Full, attn.SparseQKV, attn.LSH)


def _embedder(vocab_size, d_model, *, max_len, dropout, positions, mode, dtype, embedding=None):
  """[ids] -> [x]: int (b, l) -> (b, l, d_model); a list, 1 -> 1 (`embedding` shared if given)."""
  if positions == 'fixed_base':
    position = tl.FixedBasePositionalEncoding(mode=mode)
  else:
    position = tl.PositionalEncoding(max_len=max_len, kind=positions, mode=mode)
  return [embedding or tl.Embedding(vocab_size, d_model, dtype=dtype),
          tl.Dropout(dropout, mode=mode), position]


def _decoder_attention(spec, *, n_heads, d_qk, d_v, dropout, max_len, mode, dtype, use_bias):
  """[x, mask_e] -> [y, mask_e]: the decoder's causal self-attention of `spec`; 2 -> 2."""
  rate = dropout if spec.dropout is None else spec.dropout
  sizes = dict(n_heads=n_heads, dropout=rate, mode=mode, dtype=dtype, use_bias=use_bias,
               max_len=max_len)
  sizes.update({k: v for k, v in (('d_qk', d_qk), ('d_v', d_v)) if v is not None})
  if isinstance(spec, attn.Full):
    if spec.n_prefix:
      raise ValueError('ConcatTerraformer attention: Full(n_prefix=...) is not supported.')
    return ConcatCausalAttention(chunk_len=spec.query_chunk_len, **sizes)
  if isinstance(spec, attn.SparseQKV):
    return ConcatSparseQKVAttention(
        n_modules=spec.n_modules, length_kernel_size=spec.length_kernel_size,
        module_kernel_size=spec.module_kernel_size, output_layer=spec.output_layer,
        chunk_len=spec.query_chunk_len, **sizes)
  # LSH ('train'/'eval'; checked by the factory): the mask passes by it.
  lsh = attn.SelfAttention(spec, n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=True, mode=mode,
                           dtype=dtype, dropout=dropout, max_len=max_len)
  return cb.Parallel(lsh, None)


def ConcatTerraformer(*, vocab_size: int, output_vocab_size: int | None = None,  # pylint: disable=invalid-name
                      d_model: int = 512, d_ff: int = 2048, n_encoder_layers: int = 6,
                      n_decoder_layers: int = 6, n_heads: int = 8, d_qk: int | None = None,
                      d_v: int | None = None, dropout: float = 0.1, max_len: int = 2048,
                      attention: Any = attn.Full(), encoder_attention: Any = attn.Full(),
                      n_decoder_attention_layers: int = 2, ff_sparsity: int | None = None,
                      ff_d_lowrank: int = 64, ff_temperature: float = 0.1,
                      ff_quant_prob: float = 0.3, ff_activation: Any = 'relu',
                      ff_chunk_len: int | None = None, positions: str = 'sinusoidal',
                      use_bias: bool = True, reversible: bool = True, pad_id: int = 0,
                      mode: str = 'train', dtype=None):
  """[inputs, targets] -> [logits]: int (b, li), (b, lt) -> float32 (b, lt, v); 2 -> 1.

  Trax's ConfigurableTerraformer (see the module docstring): v = `output_vocab_size`,
  default `vocab_size`, and then the decoder's token embedding is the encoder's (Trax
  shares it); logits[:, i] predict targets[:, i].

  Args:
    vocab_size, output_vocab_size: token ids of inputs / targets.
    d_model, d_ff: stream and feed-forward widths.
    n_encoder_layers, n_decoder_layers: reversible blocks of each.
    n_heads: attention heads; d_qk, d_v: the decoder attention's per-head widths (default
      d_model // n_heads; the encoder's are d_model // n_heads, as in Trax).
    dropout: residuals, embeddings, attention and feed-forward ('train' only).
    max_len: longest inputs and longest targets (positions; the decoder's predict-mode
      cache holds 2 * max_len positions, the concatenation).
    attention: the decoder's causal self-attention, a spec or a list cycled over the
      decoder layers (Trax's list of attention types): Full() (SelfAttention /
      CausalAttention), SparseQKV(...) (MultiplicativeConvCausalAttention; Trax's is
      output_layer='none') or LSH(...) ('train'/'eval' only: LSH does not decode here).
    encoder_attention: Full() (bidirectional, padding masked; the only kind).
    n_decoder_attention_layers: attention halves per decoder block (Trax's default 2).
    ff_sparsity: 0/None dense feed-forward (`ff_activation`: 'relu', 'gelu', 'fast_gelu'),
      or units per SparseFF block (ff_d_lowrank, ff_temperature, ff_quant_prob: its
      controller; Trax's ff_sparsity=N means d_lowrank = d_ff // N).
    ff_chunk_len: run the feed-forward this many positions at a time.
    positions: 'sinusoidal', 'learned' or 'fixed_base' (Trax's default pos_type
      'fixed-base', `tl.FixedBasePositionalEncoding`).
    use_bias: biases of the attention projections (Trax's SelfAttention has none: a
      converted model has them zero).
    reversible: reversible backward pass (True) or plain autodiff; same outputs.
    pad_id: the padding id of inputs (masked) and ShiftRight's fill.
    mode: 'train', 'eval' or 'predict'; dtype: compute dtype.
  """
  output_vocab_size_or_none = output_vocab_size
  output_vocab_size = output_vocab_size or vocab_size
  _check_terraformer('ConcatTerraformer', mode=mode, ff_sparsity=ff_sparsity,
                     ff_d_lowrank=ff_d_lowrank, ff_temperature=ff_temperature,
                     ff_quant_prob=ff_quant_prob, reversible=reversible, merge_streams='mean',
                     vocab_size=vocab_size, output_vocab_size=output_vocab_size,
                     d_model=d_model, d_ff=d_ff, n_encoder_layers=n_encoder_layers,
                     n_decoder_layers=n_decoder_layers, n_heads=n_heads, d_qk=d_qk, d_v=d_v,
                     dropout=dropout, max_len=max_len, ff_chunk_len=ff_chunk_len,
                     n_decoder_attention_layers=n_decoder_attention_layers)
  if positions not in CONCAT_POSITIONS:
    raise ValueError(f'ConcatTerraformer positions must be one of {CONCAT_POSITIONS}, got '
                     f'{positions!r}.')
  if positions == 'fixed_base' and d_model % 8:
    raise ValueError(f"ConcatTerraformer positions='fixed_base' needs d_model a multiple of 8 "
                     f'(its 8 digits), got d_model={d_model}.')
  if not (callable(ff_activation) or ff_activation in FF_ACTIVATIONS):
    raise ValueError(f'ConcatTerraformer ff_activation must be one of {tuple(FF_ACTIVATIONS)} '
                     f'or a layer factory such as tl.Relu, got {ff_activation!r}.')
  if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
    raise ValueError(f'ConcatTerraformer pad_id must be a non-negative int, got {pad_id!r}.')
  (encoder_spec,) = attn.specs_from(encoder_attention, where='ConcatTerraformer encoder_attention')
  if not isinstance(encoder_spec, attn.Full) or encoder_spec.n_prefix:
    raise ValueError(f'ConcatTerraformer encoder_attention must be Full() (bidirectional '
                     f'attention with the padding masked), got {encoder_spec!r}.')
  pattern = attn.pattern(attention, n_decoder_layers, where='ConcatTerraformer attention')
  for spec in pattern:
    if not isinstance(spec, DECODER_KINDS):
      raise ValueError(f"ConcatTerraformer attention must be Full, SparseQKV or LSH specs, got "
                       f'{spec!r}.')
    if isinstance(spec, attn.LSH) and mode == 'predict':
      raise ValueError("ConcatTerraformer attention LSH(...) does not decode ('predict' mode): "
                       'use Full() or SparseQKV(...) in the decoder to decode.')
  dtype = compute_dtype(dtype)
  encoder_mode = 'eval' if mode == 'predict' else mode  # It runs once per sequence.
  recording = bool(ff_sparsity)
  streams = dict(reversible=reversible, merge_streams='mean', d_ff=d_ff, ff_sparsity=ff_sparsity)
  activation = FF_ACTIVATIONS.get(ff_activation, ff_activation)

  def ff(mode):
    if ff_sparsity:
      return _feed_forward_half(ff_sparsity, d_model=d_model, d_ff=d_ff, dropout=dropout,
                                mode=mode, dtype=dtype, ff_chunk_len=ff_chunk_len,
                                ff_d_lowrank=ff_d_lowrank, ff_temperature=ff_temperature,
                                ff_quant_prob=ff_quant_prob)
    return [cb.ReversibleHalfResidual(tl.FeedForward(
        d_model=d_model, d_ff=d_ff, dropout=dropout, activation=activation, mode=mode,
        chunk_len=ff_chunk_len, dtype=dtype)), cb.ReversibleSwap()]

  embedding = tl.Embedding(vocab_size, d_model, dtype=dtype)
  embed = dict(max_len=max_len, dropout=dropout, positions=positions, dtype=dtype)
  encoder_block = [
      _attention_half(attn.SelfAttention(
          encoder_spec, n_heads=n_heads, d_qk=None, d_v=None, causal=False, mode=encoder_mode,
          dtype=dtype, dropout=dropout, use_bias=use_bias),
          n_context=1, recording=recording, dropout=dropout, mode=encoder_mode),
      cb.ReversibleSwap(),
      ff(encoder_mode),
  ]
  encoder = cb.Serial(  # stack: ids, mask
      _embedder(vocab_size, d_model, mode=encoder_mode, embedding=embedding, **embed),
      _two_streams(encoder_block, n_layers=n_encoder_layers, **streams),  # stack: x, mask
      tl.Dense(d_model, dtype=dtype, axes=('embed', None)),
      tl.LayerNorm(),
      label='Encoder',
  )
  decoder_block = []
  for spec in pattern:
    for _ in range(n_decoder_attention_layers):
      decoder_block += [
          _attention_half(_decoder_attention(spec, n_heads=n_heads, d_qk=d_qk, d_v=d_v,
                                             dropout=dropout, max_len=2 * max_len, mode=mode,
                                             dtype=dtype, use_bias=use_bias),
                          n_context=1, recording=recording, dropout=dropout, mode=mode),
          cb.ReversibleSwap(),
      ]
    decoder_block += ff(mode)
  decoder = cb.Serial(  # stack: x_ed, mask
      _two_streams(decoder_block, n_layers=n_decoder_layers,
                   n_repeats=n_decoder_layers // len(pattern), **streams),
      tl.LayerNorm(),
      label='Decoder',
  )
  shared = embedding if output_vocab_size_or_none is None else None
  return cb.Serial(
      cb.Parallel(None, [tl.ShiftRight(mode=mode, pad_id=pad_id),
                         _embedder(output_vocab_size, d_model, mode=mode, embedding=shared,
                                   **embed)]),  # stack: inputs, embedded targets
      ConcatDecoder(encoder, decoder, pad_id=pad_id, mode=mode),  # stack: y (b, lt, d)
      tl.Dense(output_vocab_size, dtype=dtype, axes=('embed', 'vocab')),
      Float32(),
  )
