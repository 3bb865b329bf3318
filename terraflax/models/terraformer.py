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
- Self-attention (`attention`): a spec of `terraflax.models.attention`, the
  same as every model takes: `SparseQKV(n_modules=4, length_kernel_size=3)`
  (`MultiplicativeConvCausalAttention`, the default), `Full()`
  (`CausalAttention`) or `LSH(n_hashes=2, chunk_len=64)` (`LSHSelfAttention`,
  causal; predict_mem_len defaults to `max_len`), a dict {'kind': ...}, or a
  sequence of them cycled over the layers.
- `reversible=True` trains with the reversible backward pass (activation
  memory flat in depth); `reversible=False` runs the same layers, parameters
  and randomness under plain autodiff. Outputs are the same either way.

Parameters have the same names and shapes in 'train', 'eval' and 'predict'.
In 'predict' mode each call takes the previous token(s) and returns the next
logits, with the attention key/value caches, the sparse-QKV convolutions'
inputs and the positions in the `cache` collection (see `terraflax.decoding`).
"""

from __future__ import annotations

from typing import Any

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.combinators.base import label_of
from terraflax.layers.positional import POSITIONAL_KINDS
from terraflax.layers.sparse_reversible import AdvanceSlot, ReplayedHalfResidual, StartRecord
from terraflax.models import attention as attn
from terraflax.models.common import (
    DropSegments, Embed, Float32, PaddingMask, check_hyperparameters, compute_dtype,
    deprecated_arguments, no_new_and_old)

MERGE_KINDS = ('concat', 'mean')
LSH_LAYER_CHUNK_LEN = 128  # `LSHSelfAttention.chunk_len`'s default: what old configs got,
LSH_LAYER_D_HEAD = 64  # and its d_qk / d_v default.

# Old keyword names (one release): old name -> new spelling.
DEPRECATED = {
    'attention_type': "attention= a spec (SparseQKV(...), Full(...), LSH(...)) or {'kind': ...}",
    'attention_options': "the fields of the attention spec (e.g. attention=LSH(n_hashes=2))",
    'attention_chunk_len': 'attention=Full(query_chunk_len=...) / SparseQKV(query_chunk_len=...)',
}


def _translate(model):
  """translate(old, kwargs) for `deprecated_arguments`: attention_type + options -> a spec."""
  def translate(old, kwargs):
    no_new_and_old(model, kwargs, 'attention', old)
    kind = old.get('attention_type', 'sparse_qkv')
    options = dict(old.get('attention_options') or {})
    chunk_len = old.get('attention_chunk_len')
    if kind == 'lsh':
      if chunk_len is not None:
        raise ValueError(f"{model} attention_chunk_len (query chunking) does not apply to "
                         "attention_type='lsh'; set LSH's own chunk length with "
                         "attention=LSH(chunk_len=...).")
      options.setdefault('chunk_len', LSH_LAYER_CHUNK_LEN)
      for size in ('d_qk', 'd_v'):  # Old LSH layers had LSHSelfAttention's per-head default.
        kwargs[size] = options.pop(size, LSH_LAYER_D_HEAD)
    elif 'd_qk' in options or 'd_v' in options:
      kwargs.update({size: options.pop(size) for size in ('d_qk', 'd_v') if size in options})
    elif chunk_len is not None:
      options['query_chunk_len'] = chunk_len
    (spec,) = attn.specs_from({'kind': kind, **options},
                              where=f'{model} attention_type / attention_options')
    return dict(kwargs, attention=spec)
  return translate


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


def _check_terraformer(model: str, *, mode, ff_sparsity, d_ff, ff_d_lowrank,
                       ff_temperature, ff_quant_prob, reversible, merge_streams, **sizes):
  """Clear errors for every argument, before anything is built."""
  check_hyperparameters(model, mode, d_ff=d_ff, **sizes)
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


def _attention_half(*layers, n_context: int, recording: bool, dropout: float, mode: str,
                    keep_names: bool = False):
  """ReversibleHalfResidual(LayerNorm, *layers, Dropout): a pre-norm attention half-block.

  On [x1, x2, (slot, record,) ctx...]: the layers take [x, ctx...] (n_context
  items: a mask, or an encoder and its mask). With `recording`, the slot and
  record of `sparse_reversible` lie between x2 and the context, and are
  skipped. `keep_names`: the layers keep the names they have without the
  skipping Selects (a packed LM's segment ids are context that its
  unpacked twin, with the same parameters, does not have).
  """
  core = [tl.LayerNorm(), *layers, tl.Dropout(dropout, mode=mode)]
  if keep_names:
    core = [layer.clone(name=f'{label_of(layer)}_{i}') for i, layer in enumerate(core)]
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
                 ff_sparsity: int | None, n_repeats: int | None = None):
  """[x, ctx...] -> [merged, ctx...]: Dup, the scanned ReversibleSerial, MergeStreams.

  The block (n_layers // n_repeats layers) is scanned n_repeats times
  (default n_layers).

  With sparse FF the stack also carries the slot and record that replay the
  SparseFF choices in the reversible backward pass (`sparse_reversible`).
  """
  if not ff_sparsity:
    return [cb.Dup(),  # stack: x1, x2, ctx...
            cb.ReversibleSerial(block, n_repeats=n_repeats or n_layers, reversible=reversible),
            cb.MergeStreams(merge_streams)]
  return [
      StartRecord(n_records=n_layers, n_blocks=d_ff // ff_sparsity,
                  n_elements_in_block=ff_sparsity),  # stack: x, slot, record, ctx...
      cb.Dup(),  # stack: x1, x2, slot, record, ctx...
      cb.ReversibleSerial(block, n_repeats=n_repeats or n_layers, reversible=reversible),
      cb.Select([0, 1], n_in=4),  # stack: x1, x2, ctx...
      cb.MergeStreams(merge_streams),
  ]


def _self_attention(spec, *, d_model, n_heads, d_qk, d_v, dropout, max_len, mode, dtype,
                    packed=False):
  """The causal self-attention layer of `spec`: [x] -> [y], (b, l, d) -> (b, l, d); 1 -> 1.

  d_qk / d_v None: d_model // n_heads ('full' and 'sparse_qkv' derive it
  themselves, so their parameters are those they always had).
  """
  if isinstance(spec, (attn.LSH, attn.Local)):
    d_qk = d_qk or d_model // n_heads
    d_v = d_v or d_model // n_heads
  return attn.SelfAttention(spec, n_heads=n_heads, d_qk=d_qk, d_v=d_v, causal=True, mode=mode,
                            dtype=dtype, dropout=dropout, max_len=max_len, packed=packed)


@deprecated_arguments(DEPRECATED, _translate('TerraformerLM'))
def TerraformerLM(*, vocab_size: int, d_model: int = 512, d_ff: int = 2048,  # pylint: disable=invalid-name
                  n_layers: int = 6, n_heads: int = 8, d_qk: int | None = None,
                  d_v: int | None = None, dropout: float = 0.1,
                  max_len: int = 2048, mode: str = 'train', dtype=None,
                  attention: Any = attn.SparseQKV(),
                  ff_sparsity: int | None = 32, ff_d_lowrank: int = 64,
                  ff_temperature: float = 0.1, ff_quant_prob: float = 0.3,
                  reversible: bool = True, merge_streams: str = 'concat',
                  ff_chunk_len: int | None = None, packed: bool = False,
                  positions: str = 'sinusoidal'):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, l, vocab_size); 1 -> 1.

  packed=True: [tokens, segment_ids, positions] -> [logits], 3 -> 1 (rows of
  packed documents, each computed as if alone; the segment ids travel as
  the blocks' context).

  A decoder-only Terraformer language model: like `TransformerLM` (it shifts
  its input right, so the input is also the target), with reversible
  two-stream blocks, sparse feed-forward and sparse QKV.

  Args:
    vocab_size: number of token ids.
    d_model: width of each residual stream.
    d_ff: feed-forward hidden width.
    n_layers: number of decoder blocks (scanned).
    n_heads: attention heads (must divide d_model).
    d_qk, d_v: per-head widths of the self-attention's queries/keys and values
      (default d_model // n_heads).
    dropout: dropout rate (residuals, embeddings, attention, feed-forward).
    max_len: longest sequence (positional table, predict-mode cache, LSH's
      default predict_mem_len).
    mode: 'train', 'eval' or 'predict'.
    dtype: compute dtype (e.g. 'bfloat16'); parameters stay float32.
    attention: an attention spec (`terraflax.models.attention`):
      `SparseQKV(n_modules=4, length_kernel_size=3, output_layer='dense')`,
      `Full(query_chunk_len=...)`, `LSH(n_hashes=2, chunk_len=64)`, a dict
      {'kind': 'lsh', ...}, or a sequence of them cycled over the layers.
    ff_sparsity: units per SparseFF block (one active); 0 or None: dense.
    ff_d_lowrank: width of the SparseFF controller's low-rank bottleneck.
    ff_temperature: Gumbel-softmax temperature of the controller in training.
    ff_quant_prob: probability of the hard (one-hot) mask per training call.
    reversible: reversible backward pass (True) or plain autodiff (False).
    merge_streams: 'concat' (output sees 2 * d_model) or 'mean'.
    ff_chunk_len: run the feed-forward branches this many positions at a time.
    positions: 'sinusoidal' (a fixed table) or 'learned' (a trained (max_len,
      d_model) parameter, e.g. a converted Trax model's table).
  """
  if positions not in POSITIONAL_KINDS:
    raise ValueError(f'TerraformerLM positions must be one of {POSITIONAL_KINDS}, got '
                     f'{positions!r}.')
  _check_terraformer('TerraformerLM', mode=mode, ff_sparsity=ff_sparsity,
                     ff_d_lowrank=ff_d_lowrank, ff_temperature=ff_temperature,
                     ff_quant_prob=ff_quant_prob, reversible=reversible,
                     merge_streams=merge_streams, vocab_size=vocab_size, d_model=d_model,
                     d_ff=d_ff, n_layers=n_layers, n_heads=n_heads, d_qk=d_qk, d_v=d_v,
                     dropout=dropout, max_len=max_len, ff_chunk_len=ff_chunk_len)
  pattern = attn.pattern(attention, n_layers, where='TerraformerLM attention')
  dtype = compute_dtype(dtype)
  ff = dict(d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode, dtype=dtype,
            ff_chunk_len=ff_chunk_len, ff_d_lowrank=ff_d_lowrank, ff_temperature=ff_temperature,
            ff_quant_prob=ff_quant_prob)
  block = []
  for spec in pattern:
    block += [
        _attention_half(_self_attention(spec, d_model=d_model, n_heads=n_heads, d_qk=d_qk,
                                        d_v=d_v, dropout=dropout, max_len=max_len, mode=mode,
                                        dtype=dtype, packed=packed),
                        n_context=int(packed), recording=bool(ff_sparsity), dropout=dropout,
                        mode=mode, keep_names=packed),
        cb.ReversibleSwap(),
        _feed_forward_half(ff_sparsity, **ff),
    ]
  return cb.Serial(
      tl.ShiftRight(mode=mode, packed=packed),
      Embed(vocab_size, d_model, max_len, dropout, mode, dtype, packed=packed,
            positions=positions),
      _two_streams(block, n_layers=n_layers, n_repeats=n_layers // len(pattern),
                   reversible=reversible, merge_streams=merge_streams, d_ff=d_ff,
                   ff_sparsity=ff_sparsity),  # stack: x(, segment_ids)
      tl.LayerNorm(),
      tl.Dense(vocab_size, dtype=dtype, axes=('embed', 'vocab')),
      Float32(),
      DropSegments(packed),
  )


@deprecated_arguments(DEPRECATED, _translate('Terraformer'))
def Terraformer(*, vocab_size: int, output_vocab_size: int | None = None,  # pylint: disable=invalid-name
                d_model: int = 512, d_ff: int = 2048, n_layers: int = 6,
                n_encoder_layers: int | None = None, n_decoder_layers: int | None = None,
                n_heads: int = 8, d_qk: int | None = None, d_v: int | None = None,
                dropout: float = 0.1, max_len: int = 2048,
                mode: str = 'train', dtype=None, attention: Any = attn.SparseQKV(),
                ff_sparsity: int | None = 32, ff_d_lowrank: int = 64,
                ff_temperature: float = 0.1, ff_quant_prob: float = 0.3,
                reversible: bool = True, merge_streams: str = 'concat',
                ff_chunk_len: int | None = None, pad_id: int = 0):
  """[inputs, targets] -> [logits]: int (b, li), (b, lt) -> float32 (b, lt, v); 2 -> 1.

  An encoder-decoder Terraformer for seq2seq (v = `output_vocab_size`,
  default `vocab_size`), wired like `Transformer`: the encoder reads `inputs`
  (`pad_id` masked out) with bidirectional full attention; the decoder shifts
  `targets` right, attends causally to itself (the `attention` spec) and to
  the encoder's real tokens (`EncDecAttention`), so logits[:, i] predict
  targets[:, i]. The encoder's attention and the attention to the encoder
  take the query_chunk_len of a 'full' / 'sparse_qkv' spec. Encoder and
  decoder both use reversible two-stream blocks and the feed-forward of
  `ff_sparsity`. In 'predict' mode each call takes the full `inputs` and the
  previous target token (b, 1); the encoder runs on the first call after
  `init` and is cached (`CacheOutputs`). Other arguments are as in
  `TerraformerLM`; `n_encoder_layers` and `n_decoder_layers` default to
  `n_layers`.
  """
  n_encoder_layers = n_layers if n_encoder_layers is None else n_encoder_layers
  n_decoder_layers = n_layers if n_decoder_layers is None else n_decoder_layers
  output_vocab_size = output_vocab_size or vocab_size
  _check_terraformer('Terraformer', mode=mode, ff_sparsity=ff_sparsity,
                     ff_d_lowrank=ff_d_lowrank, ff_temperature=ff_temperature,
                     ff_quant_prob=ff_quant_prob, reversible=reversible,
                     merge_streams=merge_streams, vocab_size=vocab_size,
                     output_vocab_size=output_vocab_size, d_model=d_model, d_ff=d_ff,
                     n_encoder_layers=n_encoder_layers, n_decoder_layers=n_decoder_layers,
                     n_heads=n_heads, d_qk=d_qk, d_v=d_v, dropout=dropout, max_len=max_len,
                     ff_chunk_len=ff_chunk_len)
  pattern = attn.pattern(attention, n_decoder_layers, where='Terraformer attention')
  chunk_len = attn.query_chunk_len(pattern[0])
  dtype = compute_dtype(dtype)
  encoder_mode = 'eval' if mode == 'predict' else mode  # It runs once per sequence.
  recording = bool(ff_sparsity)
  streams = dict(reversible=reversible, merge_streams=merge_streams, d_ff=d_ff,
                 ff_sparsity=ff_sparsity)

  def ff(mode):
    return _feed_forward_half(ff_sparsity, d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode,
                              dtype=dtype, ff_chunk_len=ff_chunk_len, ff_d_lowrank=ff_d_lowrank,
                              ff_temperature=ff_temperature, ff_quant_prob=ff_quant_prob)

  encoder_attention = attn.SelfAttention(
      attn.Full(query_chunk_len=chunk_len), n_heads=n_heads, d_qk=None, d_v=None, causal=False,
      mode=encoder_mode, dtype=dtype, dropout=dropout)
  encoder_block = [
      _attention_half(encoder_attention, n_context=1, recording=recording, dropout=dropout,
                      mode=encoder_mode),
      cb.ReversibleSwap(),
      ff(encoder_mode),
  ]
  encoder = cb.Serial(
      cb.Branch(None, PaddingMask(pad_id)),  # stack: ids, mask
      Embed(vocab_size, d_model, max_len, dropout, encoder_mode, dtype),
      _two_streams(encoder_block, n_layers=n_encoder_layers, **streams),  # stack: x, mask
      tl.LayerNorm(),  # stack: encoder, mask
  )
  decoder_block = []
  for spec in pattern:
    decoder_block += [
        _attention_half(_self_attention(spec, d_model=d_model, n_heads=n_heads, d_qk=d_qk,
                                        d_v=d_v, dropout=dropout, max_len=max_len, mode=mode,
                                        dtype=dtype),
                        n_context=0, recording=recording, dropout=dropout, mode=mode),
        cb.ReversibleSwap(),
        _attention_half(tl.EncDecAttention(n_heads=n_heads, dropout=dropout, chunk_len=chunk_len,
                                           mode=mode, dtype=dtype),
                        n_context=2, recording=recording, dropout=dropout, mode=mode),
        cb.ReversibleSwap(),
        ff(mode),
    ]
  return cb.Serial(
      tl.CacheOutputs(encoder, mode=mode),  # stack: encoder, mask, targets
      cb.Select([2, 0, 1]),  # stack: targets, encoder, mask
      tl.ShiftRight(mode=mode, pad_id=pad_id),
      Embed(output_vocab_size, d_model, max_len, dropout, mode, dtype),
      _two_streams(decoder_block, n_layers=n_decoder_layers,
                   n_repeats=n_decoder_layers // len(pattern), **streams),  # stack: y, encoder, mask
      cb.Select([0], n_in=3),
      tl.LayerNorm(),
      tl.Dense(output_vocab_size, dtype=dtype, axes=('embed', 'vocab')),
      Float32(),
  )
