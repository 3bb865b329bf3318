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
  attention      an attention spec (`terraflax.models.attention`; default
                 `Full()`), a dict {'kind': ...} or a sequence cycled over the
                 layers; `Full(n_prefix=16)` is prefix tuning (trainable
                 keys/values at every attention layer, `terraflax.layers.prefix`)
  mixing         (encoder only) 'attention' or 'fourier' (FNet) token mixing,
                 for all layers or one kind per layer
"""

from __future__ import annotations

from typing import Any

import terraflax.combinators as cb
import terraflax.layers as tl
from terraflax.layers.positional import POSITIONAL_KINDS
from terraflax.models import attention as attn
from terraflax.models.common import (
    DropSegments, Embed, FeedForwardResidual, Float32, PaddingMask, Stack, check_d_embedding,
    check_hyperparameters, compute_dtype, deprecated_arguments, masked_mean, mixing_kinds,
    no_new_and_old)

# Old keyword names of the factories here (one release): old name -> new spelling.
DEPRECATED = {
    'attention_chunk_len': 'attention=Full(query_chunk_len=...)',
    'n_prefix': 'attention=Full(n_prefix=...)',
}


def upgrade_full_attention(model):
  """translate(old, kwargs) for `deprecated_arguments`: old full-attention knobs -> a Full spec."""
  def translate(old, kwargs):
    no_new_and_old(model, kwargs, 'attention', old)
    return dict(kwargs, attention=attn.Full(query_chunk_len=old.get('attention_chunk_len'),
                                            n_prefix=old.get('n_prefix', 0)))
  return translate


def _attention_residual(spec, *, d_model, causal, n_heads, dropout, max_len, mode, dtype,
                        packed=False, d_qk=None, d_v=None):
  """Residual(LayerNorm, SelfAttention(spec), Dropout): 1 -> 1, or 2 -> 2 for encoder 'full'.

  Per-head widths are d_qk / d_v, by default d_model // n_heads ('full' layers
  derive them themselves).
  """
  (spec,) = attn.specs_from(spec, where='attention')
  d_head = d_model // n_heads if isinstance(spec, (attn.LSH, attn.Local)) else None
  return cb.Residual(
      tl.LayerNorm(),
      attn.SelfAttention(spec, n_heads=n_heads, d_qk=d_qk or d_head, d_v=d_v or d_head,
                         causal=causal,
                         mode=mode, dtype=dtype, dropout=dropout, max_len=max_len,
                         packed=packed),
      tl.Dropout(dropout, mode=mode))


def DecoderBlock(*, d_model, d_ff, n_heads, dropout, max_len, mode, dtype=None,  # pylint: disable=invalid-name
                 attention: Any = attn.Full(), ff_chunk_len=None, packed=False, d_qk=None,
                 d_v=None):
  """[x] -> [x]: (b, l, d) -> (b, l, d); a list of layers, 1 -> 1.

  packed=True: [x, segment_ids] -> [x, segment_ids]; 2 -> 2.

  Pre-norm causal self-attention (the layer of the `attention` spec; per-head
  widths d_qk / d_v, default d_model // n_heads) and feed-forward residual blocks.
  """
  return [
      _attention_residual(attention, d_model=d_model, causal=True, n_heads=n_heads,
                          dropout=dropout, max_len=max_len, mode=mode, dtype=dtype,
                          packed=packed, d_qk=d_qk, d_v=d_v),
      FeedForwardResidual(d_model, d_ff, dropout, mode, dtype, ff_chunk_len),
  ]


def EncoderBlock(*, d_model, d_ff, n_heads, dropout, mode, dtype=None,  # pylint: disable=invalid-name
                 attention: Any = attn.Full(), ff_chunk_len=None, packed=False):
  """[x, mask] -> [x, mask]: (b, l, d), (b, l) -> (b, l, d), (b, l); a list, 2 -> 2.

  packed=True: [x, segment_ids] -> [x, segment_ids] (every kind attends
  within each document).

  Pre-norm bidirectional self-attention (over real tokens for 'full'; 'local'
  and 'lsh' take no mask), then feed-forward.
  """
  return [
      _attention_residual(attention, d_model=d_model, causal=False, n_heads=n_heads,
                          dropout=dropout, max_len=2048, mode=mode, dtype=dtype,
                          packed=packed),  # stack: x, mask (or segment_ids)
      FeedForwardResidual(d_model, d_ff, dropout, mode, dtype, ff_chunk_len),
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
      FeedForwardResidual(d_model, d_ff, dropout, mode, dtype, ff_chunk_len),
  ]


def EncoderDecoderBlock(*, d_model, d_ff, n_heads, dropout, max_len, mode, dtype=None,  # pylint: disable=invalid-name
                        attention: Any = attn.Full(), ff_chunk_len=None, packed=False):
  """[y, encoder, mask] -> [y, encoder, mask]: (b, lt, d), (b, li, d), (b, li); 3 -> 3.

  Pre-norm causal self-attention (the `attention` spec), attention to the
  encoder (query chunks of a 'full' spec's query_chunk_len), feed-forward.
  packed=True: [y, segment_ids, encoder, encoder_segment_ids] -> the same; 4 -> 4.
  """
  (spec,) = attn.specs_from(attention, where='EncoderDecoderBlock attention')
  return [
      _attention_residual(spec, d_model=d_model, causal=True, n_heads=n_heads, dropout=dropout,
                          max_len=max_len, mode=mode, dtype=dtype, packed=packed),
      cb.Residual(
          tl.LayerNorm(),
          tl.EncDecAttention(n_heads=n_heads, dropout=dropout,
                             chunk_len=attn.query_chunk_len(spec), mode=mode, dtype=dtype,
                             packed=packed),
          tl.Dropout(dropout, mode=mode)),  # stack: y, encoder, mask
      FeedForwardResidual(d_model, d_ff, dropout, mode, dtype, ff_chunk_len),
  ]


def _unit(make, pattern):
  """One scanned unit: the blocks `make(spec)` of each spec of the repeating pattern in turn."""
  return [layer for spec in pattern for layer in make(spec)]


@deprecated_arguments(DEPRECATED, upgrade_full_attention('TransformerLM'))
def TransformerLM(*, vocab_size: int, d_model: int = 512, d_ff: int = 2048,  # pylint: disable=invalid-name
                  n_layers: int = 6, n_heads: int = 8, dropout: float = 0.1,
                  max_len: int = 2048, mode: str = 'train', dtype=None,
                  attention: Any = attn.Full(), ff_chunk_len: int | None = None,
                  share_layers: bool = False, d_embedding: int | None = None,
                  packed: bool = False, positions: str = 'sinusoidal', d_qk: int | None = None,
                  d_v: int | None = None):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, l, vocab_size); 1 -> 1.

  packed=True: [tokens, segment_ids, positions] -> [logits], 3 -> 1: rows of
  packed documents (int (b, l) each; ids 1, 2, ... per document, 0 =
  padding; positions restart at 0), each document computed as if alone.

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
    attention: an attention spec (`terraflax.models.attention`: `Full()`,
      `Full(query_chunk_len=64)` for memory linear in length, `Full(n_prefix=16)`
      for prefix tuning, `LSH(...)`, `Local(...)`, `SparseQKV(...)`), a dict
      {'kind': ...}, or a sequence of them cycled over the layers (n_layers
      a multiple of its length; one scanned unit holds one layer of each).
    ff_chunk_len: run the feed-forward blocks this many positions at a time.
    share_layers: ALBERT: one decoder block applied n_layers times, one set of
      its parameters (each depth keeps its own predict-mode cache).
    d_embedding: ALBERT's factorised embeddings: embed to d_embedding
      (<= d_model) and project to d_model; the output is factorised the same
      way (LayerNorm, Dense(d_embedding), Dense(vocab_size)).
    positions: 'sinusoidal' (a fixed table) or 'learned' (a trained (max_len,
      d_model) parameter, e.g. a converted Trax model's table).
    d_qk, d_v: per-head widths of queries/keys and values (default
      d_model // n_heads; both given: n_heads need not divide d_model, e.g. a
      model with heads pruned by `terraflax.prune`).
  """
  if positions not in POSITIONAL_KINDS:
    raise ValueError(f'TransformerLM positions must be one of {POSITIONAL_KINDS}, got '
                     f'{positions!r}.')
  check_hyperparameters('TransformerLM', mode, vocab_size=vocab_size, d_model=d_model, d_ff=d_ff,
                        n_layers=n_layers, n_heads=n_heads, dropout=dropout, max_len=max_len,
                        ff_chunk_len=ff_chunk_len, d_embedding=d_embedding, d_qk=d_qk, d_v=d_v)
  check_d_embedding('TransformerLM', d_embedding, d_model)
  pattern = attn.pattern(attention, n_layers, where='TransformerLM attention')
  dtype = compute_dtype(dtype)
  block = _unit(lambda spec: DecoderBlock(
      d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout, max_len=max_len, mode=mode,
      dtype=dtype, attention=spec, ff_chunk_len=ff_chunk_len, packed=packed, d_qk=d_qk,
      d_v=d_v), pattern)
  return cb.Serial(
      tl.ShiftRight(mode=mode, packed=packed),  # stack: ids(, segment_ids, positions)
      Embed(vocab_size, d_model, max_len, dropout, mode, dtype, d_embedding, packed=packed,
            positions=positions),
      cb.Repeat(block, n_layers // len(pattern), share_params=share_layers),
      tl.LayerNorm(),
      tl.Dense(d_embedding, dtype=dtype, axes=('embed', None)) if d_embedding is not None else None,
      tl.Dense(vocab_size, dtype=dtype, axes=('embed' if d_embedding is None else None, 'vocab')),
      Float32(),
      DropSegments(packed),
  )


def EncoderBody(*, vocab_size: int, d_model: int, d_ff: int, n_layers: int,  # pylint: disable=invalid-name
                n_heads: int, dropout: float, max_len: int, mode: str, dtype=None,
                attention: Any = attn.Full(), ff_chunk_len: int | None = None,
                pad_id: int | None = 0, share_layers: bool = False,
                d_embedding: int | None = None, mixing='attention',
                model: str = 'TransformerEncoder', packed: bool = False):
  """[tokens] -> [x, mask]: int (b, l) -> (b, l, d_model), bool (b, l); a list, 1 -> 2.

  packed=True: [tokens, segment_ids, positions] -> [x, segment_ids], 3 -> 2
  (attention mixing only: Fourier mixing is global over the row), with the
  same parameter paths.

  The encoder up to its final LayerNorm, shared by `TransformerEncoder` and
  `terraflax.models.BertMLM` so that their bodies have the same parameter
  paths (a pre-trained body loads into a classifier by path). `mask` is
  `tokens != pad_id`. Layer i mixes with `mixing`'s kind i and (for
  attention) the spec i % len of `attention`; runs of equal layers are
  scanned together. Arguments are `TransformerEncoder`'s.
  """
  kinds = mixing_kinds(model, mixing, n_layers)
  specs = attn.specs_from(attention, where=f'{model} attention')
  check_d_embedding(model, d_embedding, d_model)
  dtype = compute_dtype(dtype)
  if mode == 'predict':  # No incremental form: predict is eval.
    mode = 'eval'
  if packed and 'fourier' in kinds:
    raise ValueError(f"{model} packed=True needs mixing='attention': Fourier mixing mixes the "
                     'whole row, across documents.')

  return [
      # stack: ids, mask (packed: ids, segment_ids, positions, through an identity that keeps
      # the parameter paths)
      cb.Select([0, 1, 2], n_in=3) if packed else cb.Branch(None, PaddingMask(pad_id)),
      Embed(vocab_size, d_model, max_len, dropout, mode, dtype, d_embedding, packed=packed),
      EncoderStack(kinds, specs, d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout,
                   mode=mode, dtype=dtype, ff_chunk_len=ff_chunk_len,
                   share_layers=share_layers, model=model, packed=packed),  # stack: x, mask
      tl.LayerNorm(),
  ]


def EncoderStack(kinds, specs, *, d_model, d_ff, n_heads, dropout, mode, dtype,  # pylint: disable=invalid-name
                 ff_chunk_len, share_layers, model, packed=False):
  """[x, mask] -> [x, mask]: (b, l, d), (b, l) -> the same; 2 -> 2.

  Encoder block i mixes with `kinds[i]` ('attention' or 'fourier'); attention
  blocks take the spec i % len(specs). Runs of equal blocks are scanned
  together (`Stack`).
  """
  def make_block(kind):
    if kind == 'fourier':
      return FourierEncoderBlock(d_model=d_model, d_ff=d_ff, dropout=dropout, mode=mode,
                                 dtype=dtype, ff_chunk_len=ff_chunk_len)
    return EncoderBlock(d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout, mode=mode,
                        dtype=dtype, attention=kind, ff_chunk_len=ff_chunk_len, packed=packed)

  layer_kinds = ['fourier' if kind == 'fourier' else specs[i % len(specs)]
                 for i, kind in enumerate(kinds)]
  return Stack(make_block, layer_kinds, share_layers, model)


@deprecated_arguments(DEPRECATED, upgrade_full_attention('TransformerEncoder'))
def TransformerEncoder(*, vocab_size: int, n_classes: int = 10, d_model: int = 512,  # pylint: disable=invalid-name
                       d_ff: int = 2048, n_layers: int = 6, n_heads: int = 8,
                       dropout: float = 0.1, max_len: int = 2048, mode: str = 'train',
                       dtype=None, attention: Any = attn.Full(),
                       ff_chunk_len: int | None = None, pad_id: int | None = 0,
                       share_layers: bool = False, d_embedding: int | None = None,
                       mixing='attention'):
  """[tokens] -> [logits]: int (b, l) -> float32 (b, n_classes); 1 -> 1.

  A BERT-style bidirectional encoder with a classification head: tokens equal
  to `pad_id` (default 0; None = no padding) are masked out of attention and
  of the mean pooling over positions that feeds the final `Dense(n_classes)`.
  Right-padding a batch therefore does not change a sequence's logits.
  There is no incremental form: `'predict'` behaves as `'eval'`.
  `mixing` is 'attention', 'fourier' (FNet's parameter-free Fourier mixing)
  or a sequence of one of them per layer, e.g. ('fourier', 'fourier',
  'attention'); runs of equal layers are scanned together. `attention`,
  `share_layers` and `d_embedding` are as in `TransformerLM` (`share_layers`
  needs one kind of layer). Note that 'local' and 'lsh' attention take no
  padding mask. Other arguments are as in `TransformerLM`.
  """
  check_hyperparameters('TransformerEncoder', mode, vocab_size=vocab_size, n_classes=n_classes,
                        d_model=d_model, d_ff=d_ff, n_layers=n_layers, n_heads=n_heads,
                        dropout=dropout, max_len=max_len, ff_chunk_len=ff_chunk_len,
                        d_embedding=d_embedding)
  body = EncoderBody(vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, n_layers=n_layers,
                     n_heads=n_heads, dropout=dropout, max_len=max_len, mode=mode, dtype=dtype,
                     attention=attention, ff_chunk_len=ff_chunk_len, pad_id=pad_id,
                     share_layers=share_layers, d_embedding=d_embedding, mixing=mixing)
  return cb.Serial(
      body,  # stack: x, mask
      cb.Fn('MaskedMean', masked_mean),  # stack: pooled (b, d)
      tl.Dense(n_classes, dtype=compute_dtype(dtype), axes=('embed', None)),
      Float32(),
  )


@deprecated_arguments({'attention_chunk_len': DEPRECATED['attention_chunk_len']},
                      upgrade_full_attention('Transformer'))
def Transformer(*, vocab_size: int, output_vocab_size: int | None = None,  # pylint: disable=invalid-name
                d_model: int = 512, d_ff: int = 2048, n_layers: int = 6,
                n_encoder_layers: int | None = None, n_decoder_layers: int | None = None,
                n_heads: int = 8, dropout: float = 0.1,
                max_len: int = 2048, mode: str = 'train', dtype=None,
                attention: Any = attn.Full(), ff_chunk_len: int | None = None,
                pad_id: int = 0, packed: bool = False):
  """[inputs, targets] -> [logits]: int (b, li), (b, lt) -> float32 (b, lt, v); 2 -> 1.

  packed=True ('train'/'eval'): [inputs, inputs_segment_ids, inputs_positions,
  targets, targets_segment_ids, targets_positions] -> [logits], 6 -> 1:
  document s of the targets row reads document s of the inputs row, each
  pair computed as if alone (same parameters).

  An encoder-decoder Transformer for seq2seq (v = `output_vocab_size`,
  default `vocab_size`). The encoder reads `inputs` (pad id `pad_id` masked
  out); the decoder shifts `targets` right and attends causally to itself and
  to the encoder's real tokens, so logits[:, i] predict targets[:, i].
  In `'predict'` mode each call takes the full `inputs` and the previous
  target token (b, 1); the encoder runs on the first call after `init` and its
  outputs and projected keys/values are cached (`CacheOutputs`,
  `EncDecAttention`), so later steps cost one decoder step.
  `attention` (a spec or a sequence cycled over the layers) is the self-
  attention of both the encoder (non-causal) and the decoder (causal); a
  'full' spec's query_chunk_len also chunks the attention to the encoder.
  `n_encoder_layers` and `n_decoder_layers` default to `n_layers`. Other
  arguments are as in `TransformerLM`.
  """
  n_encoder_layers = n_layers if n_encoder_layers is None else n_encoder_layers
  n_decoder_layers = n_layers if n_decoder_layers is None else n_decoder_layers
  check_hyperparameters('Transformer', mode, vocab_size=vocab_size,
                        output_vocab_size=output_vocab_size or vocab_size, d_model=d_model,
                        d_ff=d_ff, n_encoder_layers=n_encoder_layers,
                        n_decoder_layers=n_decoder_layers, n_heads=n_heads, dropout=dropout,
                        max_len=max_len, ff_chunk_len=ff_chunk_len)
  encoder_pattern = attn.pattern(attention, n_encoder_layers, where='Transformer attention')
  decoder_pattern = attn.pattern(attention, n_decoder_layers, where='Transformer attention')
  dtype = compute_dtype(dtype)
  output_vocab_size = output_vocab_size or vocab_size
  encoder_mode = 'eval' if mode == 'predict' else mode  # It runs once per sequence.
  encoder_block = _unit(lambda spec: EncoderBlock(
      d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout, mode=encoder_mode,
      dtype=dtype, attention=spec, ff_chunk_len=ff_chunk_len, packed=packed), encoder_pattern)
  encoder = cb.Serial(
      # stack: ids, mask (packed: ids, segment_ids, positions; an identity keeps the paths)
      cb.Select([0, 1, 2], n_in=3) if packed else cb.Branch(None, PaddingMask(pad_id)),
      Embed(vocab_size, d_model, max_len, dropout, encoder_mode, dtype, packed=packed),
      cb.Repeat(encoder_block, n_encoder_layers // len(encoder_pattern)),
      tl.LayerNorm(),  # stack: encoder, mask (or encoder_segment_ids)
  )
  decoder_block = _unit(lambda spec: EncoderDecoderBlock(
      d_model=d_model, d_ff=d_ff, n_heads=n_heads, dropout=dropout, max_len=max_len, mode=mode,
      dtype=dtype, attention=spec, ff_chunk_len=ff_chunk_len, packed=packed), decoder_pattern)
  return cb.Serial(
      tl.CacheOutputs(encoder, mode=mode),  # stack: encoder, mask, targets
      # stack: targets, encoder, mask (packed: targets, segment_ids, positions, encoder, its ids)
      cb.Select([2, 3, 4, 0, 1]) if packed else cb.Select([2, 0, 1]),
      tl.ShiftRight(mode=mode, pad_id=pad_id, packed=packed),
      Embed(output_vocab_size, d_model, max_len, dropout, mode, dtype, packed=packed),
      cb.Repeat(decoder_block, n_decoder_layers // len(decoder_pattern)),  # stack: y, encoder, mask
      cb.Select([0], n_in=4 if packed else 3),
      tl.LayerNorm(),
      tl.Dense(output_vocab_size, dtype=dtype, axes=('embed', 'vocab')),
      Float32(),
  )
