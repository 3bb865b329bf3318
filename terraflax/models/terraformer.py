"""Terraformer: sparse feed-forward, sparse QKV and reversible layers (Jaszczur et al., 2021).

  TerraformerLM   [tokens] -> [logits]: (b, l) -> (b, l, v)
  Terraformer     [inputs, targets] -> [logits]: (b, li), (b, lt) -> (b, lt, v)

Both keep two residual streams (`Dup`), run their pre-norm blocks in a
`ReversibleSerial` scanned over `n_layers` (parameters stacked on a leading
axis), and merge the streams (`MergeStreams`) before the final LayerNorm and
output projection. A decoder block is

  ReversibleHalfResidual(LayerNorm, self-attention, Dropout), ReversibleSwap,
  [ReversibleHalfResidual(LayerNorm, EncDecAttention, Dropout), ReversibleSwap,]  (seq2seq)
  ReversibleHalfResidual(feed-forward), ReversibleSwap

- Feed-forward: `ff_sparsity` 0 or None gives the dense `FeedForward`; a
  positive value gives `SparseFF` with that many units per block (one active
  per block and token), so decoding touches d_ff / ff_sparsity units.
- Self-attention (`attention_type`): one entry of `SELF_ATTENTION`: 'full'
  (`CausalAttention`), 'sparse_qkv' (`MultiplicativeConvCausalAttention`) or
  'lsh' (`LSHSelfAttention`, causal; `max_len` is its predict memory);
  `attention_options` are extra keyword arguments of that layer (e.g.
  `{'n_modules': 4, 'length_kernel_size': 3}`, or `{'n_hashes': 2,
  'chunk_len': 64}`).
- `reversible=True` trains with the reversible backward pass (activation
  memory flat in depth); `reversible=False` runs the same layers, parameters
  and randomness under plain autodiff. Outputs are the same either way.

Parameters have the same names and shapes in 'train', 'eval' and 'predict'.
In 'predict' mode each call takes the previous token(s) and returns the next
logits, with the attention key/value caches, the sparse-QKV convolutions'
inputs and the positions in the `cache` collection (see `terraflax.decoding`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.layers.sparse_reversible import AdvanceSlot, ReplayedHalfResidual, StartRecord
from terraflax.models.transformer import (
    _check_hyperparameters, _dtype, _embed, _float32, _padding_mask)

MERGE_KINDS = ('concat', 'mean')


class _SelfAttentionKind(NamedTuple):
  """A causal self-attention layer class and its keyword arguments from the model's."""

  layer: type
  common: Callable[..., dict[str, Any]]  # (n_heads, dropout, chunk_len, max_len, mode, dtype)


def _causal_attention_kwargs(*, n_heads, dropout, chunk_len, max_len, mode, dtype):
  return dict(n_heads=n_heads, dropout=dropout, chunk_len=chunk_len, max_len=max_len, mode=mode,
              dtype=dtype)


def _lsh_attention_kwargs(*, n_heads, dropout, chunk_len, max_len, mode, dtype):
  if chunk_len is not None:
    raise ValueError("attention_chunk_len (query chunking) does not apply to attention_type='lsh'; "
                     "set LSH's own chunk length with attention_options={'chunk_len': ...}.")
  return dict(n_heads=n_heads, dropout=dropout, causal=True, predict_mem_len=max_len,
              mode=mode, dtype=dtype)


# Decoder self-attention kinds: adding one is one entry here.
SELF_ATTENTION: dict[str, _SelfAttentionKind] = {
    'full': _SelfAttentionKind(tl.CausalAttention, _causal_attention_kwargs),
    'sparse_qkv': _SelfAttentionKind(tl.MultiplicativeConvCausalAttention,
                                     _causal_attention_kwargs),
    'lsh': _SelfAttentionKind(tl.LSHSelfAttention, _lsh_attention_kwargs),
}


def SelfAttention(attention_type: str, options: Mapping[str, Any] | None = None, *,  # pylint: disable=invalid-name
                  n_heads: int, dropout: float, chunk_len: int | None, max_len: int, mode: str,
                  dtype=None, model: str = 'Terraformer'):
  """[x] -> [y]: (b, l, d) -> (b, l, d); the causal self-attention layer `attention_type` names.

  `options` are extra keyword arguments of its layer class; unknown ones are
  a clear error listing the valid ones.
  """
  if attention_type not in SELF_ATTENTION:
    raise ValueError(f'{model} attention_type must be one of {tuple(SELF_ATTENTION)}, got '
                     f'{attention_type!r}.')
  kind = SELF_ATTENTION[attention_type]
  kwargs = kind.common(n_heads=n_heads, dropout=dropout, chunk_len=chunk_len, max_len=max_len,
                       mode=mode, dtype=dtype)
  options = dict(options or {})
  valid = sorted(f.name for f in dataclasses.fields(kind.layer)
                 if f.init and f.name not in kwargs and f.name not in ('parent', 'name'))
  for key in options:
    if key not in valid:
      raise ValueError(f'{model} attention_options: {key!r} is not an option of '
                       f'attention_type={attention_type!r} ({kind.layer.__name__}); valid: '
                       f'{", ".join(valid)}.')
  return kind.layer(**kwargs, **options)


def FeedForwardBranch(*, d_model: int, d_ff: int, ff_sparsity: int | None, dropout: float,  # pylint: disable=invalid-name
                      mode: str, dtype=None, ff_chunk_len: int | None = None,
                      ff_d_lowrank: int = 64, ff_temperature: float = 0.1,
                      ff_quant_prob: float = 0.3, replay: bool = False):
  """[x] -> [ffn(x)]: (b, l, d) -> (b, l, d); the pre-norm feed-forward branch, 1 -> 1.

  `ff_sparsity` 0/None: `FeedForward` (dense). Otherwise LayerNorm then
  `SparseFF(d_ff, n_elements_in_block=ff_sparsity, d_lowrank=ff_d_lowrank,
  temperature=ff_temperature, quant_prob=ff_quant_prob)` (dropout on its
  output), labelled `SparseFeedForward`; with `replay` it is
  [x, recorded] -> [ffn(x), choices] (`SparseFF(replay=True)`, 2 -> 2).
  `ff_chunk_len` runs either branch that many positions at a time.
  """
  if not ff_sparsity:
    return tl.FeedForward(d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode,
                          chunk_len=ff_chunk_len, dtype=dtype)
  return cb.Chunk(
      tl.LayerNorm(),
      tl.SparseFF(d_ff=d_ff, n_elements_in_block=ff_sparsity, d_lowrank=ff_d_lowrank,
                  temperature=ff_temperature, quant_prob=ff_quant_prob, dropout=dropout,
                  mode=mode, dtype=dtype, replay=replay),
      chunk_len=ff_chunk_len, label='SparseFeedForward')


def _check_terraformer(model: str, *, mode, attention_type, ff_sparsity, d_ff, ff_d_lowrank,
                       ff_temperature, ff_quant_prob, reversible, merge_streams, **sizes):
  """Clear errors for every argument, before anything is built."""
  _check_hyperparameters(model, mode, **sizes)
  if attention_type not in SELF_ATTENTION:
    raise ValueError(f'{model} attention_type must be one of {tuple(SELF_ATTENTION)}, got '
                     f'{attention_type!r}.')
  if ff_sparsity is not None and (not isinstance(ff_sparsity, int) or isinstance(ff_sparsity, bool)
                                  or ff_sparsity < 0):
    raise ValueError(f'{model} ff_sparsity must be 0/None (dense feed-forward) or a positive '
                     f'int (units per SparseFF block), got {ff_sparsity!r}.')
  if ff_sparsity and d_ff % ff_sparsity:
    raise ValueError(f'{model} d_ff={d_ff} must be a multiple of ff_sparsity={ff_sparsity} '
                     '(units per SparseFF block).')
  if not isinstance(ff_d_lowrank, int) or ff_d_lowrank < 1:
    raise ValueError(f'{model} ff_d_lowrank must be a positive int, got {ff_d_lowrank!r}.')
  if ff_temperature < 0:
    raise ValueError(f'{model} ff_temperature must be >= 0, got {ff_temperature!r}.')
  if not 0.0 <= ff_quant_prob <= 1.0:
    raise ValueError(f'{model} ff_quant_prob must be in [0, 1], got {ff_quant_prob!r}.')
  if not isinstance(reversible, bool):
    raise ValueError(f'{model} reversible must be True or False, got {reversible!r}.')
  if merge_streams not in MERGE_KINDS:
    raise ValueError(f'{model} merge_streams must be one of {MERGE_KINDS}, got '
                     f'{merge_streams!r}.')


def _attention_half(*layers, n_context: int, recording: bool, dropout: float, mode: str):
  """ReversibleHalfResidual(LayerNorm, *layers, Dropout): a pre-norm attention half-block.

  On [x1, x2, (slot, record,) ctx...]: the layers take [x, ctx...] (n_context
  items: a mask, or an encoder and its mask). With `recording`, the slot and
  record of `sparse_reversible` lie between x2 and the context, and are
  skipped.
  """
  core = [tl.LayerNorm(), *layers, tl.Dropout(dropout, mode=mode)]
  if recording and n_context:
    core = [cb.Select([0] + list(range(3, 3 + n_context)), n_in=3 + n_context),  # x2, ctx...
            *core, cb.Select([0], n_in=1 + n_context)]
  return cb.ReversibleHalfResidual(*core)


def _feed_forward_half(ff_sparsity, **ff):
  """The feed-forward half-block and its swap (with sparse FF, recording and AdvanceSlot)."""
  if not ff_sparsity:
    return [cb.ReversibleHalfResidual(FeedForwardBranch(ff_sparsity=None, **ff)),
            cb.ReversibleSwap()]
  return [ReplayedHalfResidual(FeedForwardBranch(ff_sparsity=ff_sparsity, replay=True, **ff)),
          cb.ReversibleSwap(), AdvanceSlot()]


def _two_streams(block, *, n_layers: int, reversible: bool, merge_streams: str, d_ff: int,
                 ff_sparsity: int | None):
  """[x, ctx...] -> [merged, ctx...]: Dup, the scanned ReversibleSerial, MergeStreams.

  With sparse FF the stack also carries the slot and record that replay the
  SparseFF choices in the reversible backward pass (`sparse_reversible`).
  """
  if not ff_sparsity:
    return [cb.Dup(),  # stack: x1, x2, ctx...
            cb.ReversibleSerial(block, n_repeats=n_layers, reversible=reversible),
            cb.MergeStreams(merge_streams)]
  return [
      StartRecord(n_records=n_layers, n_blocks=d_ff // ff_sparsity,
                  n_elements_in_block=ff_sparsity),  # stack: x, slot, record, ctx...
      cb.Dup(),  # stack: x1, x2, slot, record, ctx...
      cb.ReversibleSerial(block, n_repeats=n_layers, reversible=reversible),
      cb.Select([0, 1], n_in=4),  # stack: x1, x2, ctx...
      cb.MergeStreams(merge_streams),
  ]


def TerraformerLM(*, vocab_size: int, d_model: int = 512, d_ff: int = 2048,  # pylint: disable=invalid-name
                  n_layers: int = 6, n_heads: int = 8, dropout: float = 0.1,
                  max_len: int = 2048, mode: str = 'train', dtype=None,
                  attention_type: str = 'sparse_qkv',
                  attention_options: Mapping[str, Any] | None = None,
                  ff_sparsity: int | None = 32, ff_d_lowrank: int = 64,
                  ff_temperature: float = 0.1, ff_quant_prob: float = 0.3,
                  reversible: bool = True, merge_streams: str = 'concat',
                  attention_chunk_len: int | None = None, ff_chunk_len: int | None = None):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, l, vocab_size); 1 -> 1.

  A decoder-only Terraformer language model: like `TransformerLM` (it shifts
  its input right, so the input is also the target), with reversible
  two-stream blocks, sparse feed-forward and sparse QKV.

  Args:
    vocab_size: number of token ids.
    d_model: width of each residual stream.
    d_ff: feed-forward hidden width.
    n_layers: number of decoder blocks (scanned).
    n_heads: attention heads (must divide d_model).
    dropout: dropout rate (residuals, embeddings, attention, feed-forward).
    max_len: longest sequence (positional table and predict-mode cache).
    mode: 'train', 'eval' or 'predict'.
    dtype: compute dtype (e.g. 'bfloat16'); parameters stay float32.
    attention_type: 'full', 'sparse_qkv' or 'lsh' (see `SELF_ATTENTION`).
    attention_options: extra keyword arguments of the attention layer, e.g.
      {'n_modules': 4, 'length_kernel_size': 3, 'output_layer': 'dense'}.
    ff_sparsity: units per SparseFF block (one active); 0 or None: dense.
    ff_d_lowrank: width of the SparseFF controller's low-rank bottleneck.
    ff_temperature: Gumbel-softmax temperature of the controller in training.
    ff_quant_prob: probability of the hard (one-hot) mask per training call.
    reversible: reversible backward pass (True) or plain autodiff (False).
    merge_streams: 'concat' (output sees 2 * d_model) or 'mean'.
    attention_chunk_len: query-chunked attention (memory linear in length).
    ff_chunk_len: run the feed-forward branches this many positions at a time.
  """
  _check_terraformer('TerraformerLM', mode=mode, attention_type=attention_type,
                     ff_sparsity=ff_sparsity, ff_d_lowrank=ff_d_lowrank,
                     ff_temperature=ff_temperature, ff_quant_prob=ff_quant_prob,
                     reversible=reversible, merge_streams=merge_streams, vocab_size=vocab_size,
                     d_model=d_model, d_ff=d_ff, n_layers=n_layers, n_heads=n_heads,
                     dropout=dropout, max_len=max_len, attention_chunk_len=attention_chunk_len,
                     ff_chunk_len=ff_chunk_len)
  dtype = _dtype(dtype)
  ff = dict(d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode, dtype=dtype,
            ff_chunk_len=ff_chunk_len, ff_d_lowrank=ff_d_lowrank, ff_temperature=ff_temperature,
            ff_quant_prob=ff_quant_prob)
  attention = SelfAttention(attention_type, attention_options, n_heads=n_heads, dropout=dropout,
                            chunk_len=attention_chunk_len, max_len=max_len, mode=mode,
                            dtype=dtype, model='TerraformerLM')
  block = [
      _attention_half(attention, n_context=0, recording=bool(ff_sparsity), dropout=dropout,
                      mode=mode),
      cb.ReversibleSwap(),
      _feed_forward_half(ff_sparsity, **ff),
  ]
  return cb.Serial(
      tl.ShiftRight(mode=mode),
      _embed(vocab_size, d_model, max_len, dropout, mode, dtype),
      _two_streams(block, n_layers=n_layers, reversible=reversible, merge_streams=merge_streams,
                   d_ff=d_ff, ff_sparsity=ff_sparsity),  # stack: x
      tl.LayerNorm(),
      tl.Dense(vocab_size, dtype=dtype),
      _float32(),
  )


def Terraformer(*, vocab_size: int, output_vocab_size: int | None = None,  # pylint: disable=invalid-name
                d_model: int = 512, d_ff: int = 2048, n_layers: int = 6,
                n_encoder_layers: int | None = None, n_decoder_layers: int | None = None,
                n_heads: int = 8, dropout: float = 0.1, max_len: int = 2048,
                mode: str = 'train', dtype=None, attention_type: str = 'sparse_qkv',
                attention_options: Mapping[str, Any] | None = None,
                ff_sparsity: int | None = 32, ff_d_lowrank: int = 64,
                ff_temperature: float = 0.1, ff_quant_prob: float = 0.3,
                reversible: bool = True, merge_streams: str = 'concat',
                attention_chunk_len: int | None = None, ff_chunk_len: int | None = None,
                pad_id: int = 0):
  """[inputs, targets] -> [logits]: int (b, li), (b, lt) -> float32 (b, lt, v); 2 -> 1.

  An encoder-decoder Terraformer for seq2seq (v = `output_vocab_size`,
  default `vocab_size`), wired like `Transformer`: the encoder reads `inputs`
  (`pad_id` masked out) with bidirectional full attention; the decoder shifts
  `targets` right, attends causally to itself (`attention_type`) and to the
  encoder's real tokens (`EncDecAttention`), so logits[:, i] predict
  targets[:, i]. Encoder and decoder both use reversible two-stream blocks
  and the feed-forward of `ff_sparsity`. In 'predict' mode each call takes
  the full `inputs` and the previous target token (b, 1); the encoder runs on
  the first call after `init` and is cached (`CacheOutputs`). Other
  arguments are as in `TerraformerLM`; `n_encoder_layers` and
  `n_decoder_layers` default to `n_layers`.
  """
  n_encoder_layers = n_layers if n_encoder_layers is None else n_encoder_layers
  n_decoder_layers = n_layers if n_decoder_layers is None else n_decoder_layers
  output_vocab_size = output_vocab_size or vocab_size
  _check_terraformer('Terraformer', mode=mode, attention_type=attention_type,
                     ff_sparsity=ff_sparsity, ff_d_lowrank=ff_d_lowrank,
                     ff_temperature=ff_temperature, ff_quant_prob=ff_quant_prob,
                     reversible=reversible, merge_streams=merge_streams, vocab_size=vocab_size,
                     output_vocab_size=output_vocab_size, d_model=d_model, d_ff=d_ff,
                     n_encoder_layers=n_encoder_layers, n_decoder_layers=n_decoder_layers,
                     n_heads=n_heads, dropout=dropout, max_len=max_len,
                     attention_chunk_len=attention_chunk_len, ff_chunk_len=ff_chunk_len)
  dtype = _dtype(dtype)
  encoder_mode = 'eval' if mode == 'predict' else mode  # It runs once per sequence.
  recording = bool(ff_sparsity)
  streams = dict(reversible=reversible, merge_streams=merge_streams, d_ff=d_ff,
                 ff_sparsity=ff_sparsity)

  def ff(mode):
    return _feed_forward_half(ff_sparsity, d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode,
                              dtype=dtype, ff_chunk_len=ff_chunk_len, ff_d_lowrank=ff_d_lowrank,
                              ff_temperature=ff_temperature, ff_quant_prob=ff_quant_prob)

  encoder_block = [
      _attention_half(tl.Attention(n_heads=n_heads, dropout=dropout, chunk_len=attention_chunk_len,
                                   mode=encoder_mode, dtype=dtype),
                      n_context=1, recording=recording, dropout=dropout, mode=encoder_mode),
      cb.ReversibleSwap(),
      ff(encoder_mode),
  ]
  encoder = cb.Serial(
      cb.Branch(None, _padding_mask(pad_id)),  # stack: ids, mask
      _embed(vocab_size, d_model, max_len, dropout, encoder_mode, dtype),
      _two_streams(encoder_block, n_layers=n_encoder_layers, **streams),  # stack: x, mask
      tl.LayerNorm(),  # stack: encoder, mask
  )
  self_attention = SelfAttention(attention_type, attention_options, n_heads=n_heads,
                                 dropout=dropout, chunk_len=attention_chunk_len, max_len=max_len,
                                 mode=mode, dtype=dtype, model='Terraformer')
  decoder_block = [
      _attention_half(self_attention, n_context=0, recording=recording, dropout=dropout,
                      mode=mode),
      cb.ReversibleSwap(),
      _attention_half(tl.EncDecAttention(n_heads=n_heads, dropout=dropout,
                                         chunk_len=attention_chunk_len, mode=mode, dtype=dtype),
                      n_context=2, recording=recording, dropout=dropout, mode=mode),
      cb.ReversibleSwap(),
      ff(mode),
  ]
  return cb.Serial(
      tl.CacheOutputs(encoder, mode=mode),  # stack: encoder, mask, targets
      cb.Select([2, 0, 1]),  # stack: targets, encoder, mask
      tl.ShiftRight(mode=mode, pad_id=pad_id),
      _embed(output_vocab_size, d_model, max_len, dropout, mode, dtype),
      _two_streams(decoder_block, n_layers=n_decoder_layers, **streams),  # stack: y, encoder, mask
      cb.Select([0], n_in=3),
      tl.LayerNorm(),
      tl.Dense(output_vocab_size, dtype=dtype),
      _float32(),
  )
