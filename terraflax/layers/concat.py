"""One sequence of encoder and decoder vectors: Trax's ConcatWithPadding, its inverse, and the
causal attention that decodes over it.

A decoder that reads its encoder by self-attention (Trax's ConfigurableTerraformer) runs
over one sequence per example: the encoder's real vectors, then the decoder's, then zeros.
With len_e[i] = sum(mask_e[i]) (the encoder's real tokens, assumed to come first):

  ConcatWithPadding()                [vec_e, vec_d, mask_e] -> [vec_ed]             3 -> 1
      (b, l1, d), (b, l2, d), bool (b, l1) -> (b, l1 + l2, d): row i holds vec_e[i],
      overwritten from position len_e[i] by vec_d[i]; zeros after l1 (encoder padding
      vectors stay where the decoder does not reach).
  StripFromConcatenateWithPadding()  [vec_ed, mask_e] -> [vec_d]                    2 -> 1
      (b, l1 + l2, d), (b, l1) -> (b, l2, d): the l2 positions from len_e[i].
  ConcatCausalAttention              [x, mask_e] -> [y, mask_e]                     2 -> 2
  ConcatSparseQKVAttention           [x, mask_e] -> [y, mask_e]                     2 -> 2
  ConcatDecoder(encoder, decoder)    [tok_e, vec_d] -> [y_d]                        2 -> 1
      encoder, concatenation, decoder, strip; in 'predict' mode the encoder and the
      concatenated prefill run on the first call only.

The two attention layers are `CausalAttention` and `MultiplicativeConvCausalAttention`
(same parameters) that also take the encoder mask. In 'train'/'eval' they ignore it: causal
attention over the concatenated sequence is the computation. In 'predict' mode the first call
after `init` is the prefill, the concatenated sequence of the encoder and the first decoder
token (length l1 + 1, position len_e[i] the token); each later call is one token, cached at
slot l1 + t. The slots (len_e[i], l1] of row i hold encoder padding, which the layers mask out
of the keys, and the sparse-QKV convolutions keep, per example, the inputs before position
len_e[i] + 1 of the prefill (not its last slots), so every decoding step sees what position
len_e[i] + t sees in the concatenated eval pass.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import terraflax.combinators as cb
from terraflax.combinators.base import (
    Layer, LayerError, apply_layer, check_mode, label_of, n_in_of, n_out_of, name_children)
from terraflax.layers.attention import CausalAttention
from terraflax.layers.core import constrain, lift_to, param_with_axes
from terraflax.layers.sparse_qkv import ModularCausalConv, MultiplicativeConvCausalAttention


def encoder_lengths(mask_e):
  """bool (b, l1) -> int32 (b,): the number of real encoder tokens of each row."""
  return jnp.sum(mask_e.astype(jnp.int32), axis=1)


def _check(owner: str, what: str, shape, want) -> None:
  if tuple(shape) != tuple(want):
    raise ValueError(f'{owner}: {what} must have shape {tuple(want)}, got {tuple(shape)}.')


def concat_with_padding(vec_e, vec_d, mask_e):
  """(b, l1, d), (b, l2, d), (b, l1) -> (b, l1 + l2, d): see `ConcatWithPadding`."""
  if vec_e.ndim != 3:
    raise ValueError(f'ConcatWithPadding: the encoder vectors must be (b, l1, d), got '
                     f'{tuple(vec_e.shape)}.')
  b, l1, d = vec_e.shape
  _check('ConcatWithPadding', 'the decoder vectors (b, l2, d)', vec_d.shape,
         (b, vec_d.shape[1] if vec_d.ndim == 3 else -1, d))
  _check('ConcatWithPadding', 'the encoder mask (b, l1)', mask_e.shape, (b, l1))
  vec_d = vec_d.astype(vec_e.dtype)

  def row(e, dec, n):
    full = jnp.concatenate([e, jnp.zeros_like(dec)], axis=0)
    return jax.lax.dynamic_update_slice(full, dec, (n, jnp.zeros_like(n)))

  return jax.vmap(row)(vec_e, vec_d, encoder_lengths(mask_e))


def strip_from_concatenation(vec_ed, mask_e):
  """(b, l1 + l2, d), (b, l1) -> (b, l2, d): see `StripFromConcatenateWithPadding`."""
  if vec_ed.ndim != 3 or mask_e.ndim != 2 or mask_e.shape[0] != vec_ed.shape[0] or (
      mask_e.shape[1] >= vec_ed.shape[1]):
    raise ValueError(f'StripFromConcatenateWithPadding needs vectors (b, l1 + l2, d) and an '
                     f'encoder mask (b, l1) with l2 >= 1, got {tuple(vec_ed.shape)} and '
                     f'{tuple(mask_e.shape)}.')
  l2, d = vec_ed.shape[1] - mask_e.shape[1], vec_ed.shape[2]

  def row(ed, n):
    return jax.lax.dynamic_slice(ed, (n, jnp.zeros_like(n)), (l2, d))

  return jax.vmap(row)(vec_ed, encoder_lengths(mask_e))


def ConcatWithPadding():  # pylint: disable=invalid-name
  """[vec_e, vec_d, mask_e] -> [vec_ed]: (b, l1, d), (b, l2, d), bool (b, l1) -> (b, l1 + l2, d); 3 -> 1.

  Row i: vec_e[i] followed by l2 zero vectors, then vec_d[i] written from position
  len_e[i] = sum(mask_e[i]) (Trax's `ConcatWithPadding`, eval arithmetic).
  """
  return cb.Fn('ConcatWithPadding', concat_with_padding)


def StripFromConcatenateWithPadding():  # pylint: disable=invalid-name
  """[vec_ed, mask_e] -> [vec_d]: (b, l1 + l2, d), bool (b, l1) -> (b, l2, d); 2 -> 1.

  Row i: the l2 positions starting at len_e[i] = sum(mask_e[i]), the decoder's part of a
  `ConcatWithPadding` sequence.
  """
  return cb.Fn('StripFromConcatenateWithPadding', strip_from_concatenation)


# ----------------------------------------------------------------------------- attention


def _prefill_mask(mask_e, max_len: int):
  """bool (b, 1, 1, max_len): the cache slots a decoding query may see (not encoder padding)."""
  slots = jnp.arange(max_len, dtype=jnp.int32)[None, :]
  valid = (slots <= encoder_lengths(mask_e)[:, None]) | (slots > mask_e.shape[1])
  return valid[:, None, None, :]


class _ConcatAttend:
  """The causal attention of the Concat layers: plain causal, or cached with the padding out."""

  n_in = 2
  n_out = 2

  def _check_mask_e(self, x, mask_e):
    if mask_e.ndim != 2 or mask_e.shape[0] != x.shape[0]:
      raise ValueError(f'{type(self).__name__} needs the encoder mask (b, l1) with b = '
                       f'{x.shape[0]}, got {tuple(mask_e.shape)}.')

  def attend_concat(self, q, k, v, mask_e):
    """(b, l, h, width) q, k, v -> (b, l, h, d_v): causal; in predict mode, through the cache."""
    if self.mode != 'predict':
      return self.attend(q, k, v, causal=True)
    length = k.shape[1]
    cached_key, cached_value, start = self.cache_buffers(k, v)
    if self.is_initializing():
      return self.attend(q, k, v, causal=True)
    for cached, new in ((cached_key, k), (cached_value, v)):
      cached.value = jax.lax.dynamic_update_slice_in_dim(
          cached.value, jnp.transpose(new, (0, 2, 3, 1)).astype(cached.value.dtype), start,
          axis=3)
    return self.attend(q, jnp.transpose(cached_key.value, (0, 3, 1, 2)),
                       jnp.transpose(cached_value.value, (0, 3, 1, 2)), causal=True,
                       mask=_prefill_mask(mask_e, self.max_len),
                       q_positions=start + jnp.arange(length, dtype=jnp.int32),
                       k_positions=jnp.arange(self.max_len, dtype=jnp.int32))


class ConcatCausalAttention(_ConcatAttend, CausalAttention):
  """[x, mask_e] -> [y, mask_e]: (b, l, d), bool (b, l1) -> the same; 2 -> 2.

  `CausalAttention` (same parameters: query, key, value, output) over a
  `ConcatWithPadding` sequence; the mask only matters in 'predict' mode (see the module
  docstring: the prefill call of length l1 + 1, then one token per call at slot l1 + t, the
  encoder padding masked out of the cached keys). Needs max_len >= l1 + the decoded length.
  """

  @nn.compact
  def __call__(self, x, mask_e):
    self.check_input(x)
    self._check_mask_e(x, mask_e)
    d_model = x.shape[-1]
    q, k, v = self.queries_keys_values(x, *self.widths(d_model))
    return self.combine(self.attend_concat(q, k, v, mask_e), d_model), mask_e


class ConcatModularCausalConv(ModularCausalConv):
  """[x, mask_e] -> [y]: (b, l, S * M_in), bool (b, l1) -> (b, l, S * M_out); 2 -> 1.

  `ModularCausalConv` (same parameters) over a `ConcatWithPadding` sequence. In 'predict'
  mode a call longer than one position is the prefill: the cached inputs are, per example,
  those of the positions before len_e[i] + 1 (the first decoder token), not the call's last
  ones; one-position calls roll the cache as `ModularCausalConv` does.
  """

  n_in = 2

  @nn.compact
  def __call__(self, x, mask_e):
    xs, kernel, d_module_out = self.conv_inputs(x)
    batch, length = x.shape[:2]
    dtype = xs.dtype
    n_past = self.length_kernel_size - 1
    if n_past and self.mode == 'predict':
      def prefill_window(rows):  # Row r is position r - n_past: keep len_e - n_past + 1 .. len_e.
        return jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n + 1, n_past))(
            rows, encoder_lengths(mask_e))
      xs = self.with_cached_past(xs, x.dtype, None if length == 1 else prefill_window)
    elif n_past:
      xs = jnp.pad(xs, ((0, 0), (n_past, 0), (0, 0), (0, 0)))
    half = (self.module_kernel_size - 1) // 2
    if half:  # Whole modules for the window over them, as in ModularCausalConv.
      xs = constrain(xs, ('batch', None, None, None))
    y = jax.lax.conv_general_dilated(
        xs, kernel.astype(dtype), window_strides=(1, 1), padding=((0, 0), (half, half)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = param_with_axes(self, 'bias', (None,), self.bias_init, (d_module_out,),
                             self.param_dtype)
      y = y + lift_to(bias.astype(dtype), y)
    return y.reshape(batch, length, self.n_modules * d_module_out)


class ConcatSparseQKVAttention(_ConcatAttend, MultiplicativeConvCausalAttention):
  """[x, mask_e] -> [y, mask_e]: (b, l, d), bool (b, l1) -> the same; 2 -> 2.

  `MultiplicativeConvCausalAttention` (same parameters) over a `ConcatWithPadding`
  sequence: its convolutions are `ConcatModularCausalConv`s and its cached attention masks
  the encoder padding, as `ConcatCausalAttention`'s.
  """

  @nn.compact
  def __call__(self, x, mask_e):
    self.check_input(x)
    self._check_mask_e(x, mask_e)
    d_model = x.shape[-1]
    d_qk, d_v = self.widths(d_model)
    q, k, v = self.project_heads(x, d_qk, d_v, ConcatModularCausalConv, (mask_e,))
    return self.combine(self.attend_concat(q, k, v, mask_e), d_model), mask_e


# ----------------------------------------------------------------------------- the prefill


class _ConcatDecoderFields(Layer):
  encoder: Any = None
  decoder: Any = None
  pad_id: int = 0
  mode: str = 'train'
  preserve_adopted_names = True


class ConcatDecoder(_ConcatDecoderFields):
  """[tok_e, vec_d] -> [y_d]: int (b, l1), (b, l2, d) -> (b, l2, d'); n_in 2, n_out 1.

  mask_e = tok_e != pad_id; then

    encoder   [tok_e, mask_e] -> [vec_e, mask_e]
    ConcatWithPadding(vec_e, vec_d, mask_e)                  (b, l1 + l2, d)
    decoder   [vec_ed, mask_e] -> [y_ed, mask_e]             (the Concat attention layers)
    StripFromConcatenateWithPadding(y_ed, mask_e)            (b, l2, d')

  In 'predict' mode (vec_d one embedded target token per call) the first call after `init`
  runs all of this, the decoder's prefill of length l1 + 1; later calls run only the decoder
  on vec_d, its caches holding the encoder part (`filled` in the `cache` collection says
  which call this is). The encoder runs as it was built (eval mode, for decoding).
  """

  n_in = 2

  def __init__(self, encoder=None, decoder=None, *, pad_id=0, mode='train', **kwargs):
    if encoder is None or decoder is None:
      raise LayerError('ConcatDecoder needs an encoder and a decoder layer.')
    for layer, what in ((encoder, 'encoder'), (decoder, 'decoder')):
      if (n_in_of(layer), n_out_of(layer)) != (2, 2):
        raise LayerError(f'ConcatDecoder {what} must be 2 -> 2 ([x, mask_e] -> [y, mask_e]), '
                         f'got {label_of(layer)} {n_in_of(layer)} -> {n_out_of(layer)}.')
    name_children([encoder, decoder], 'ConcatDecoder')
    super().__init__(encoder=encoder, decoder=decoder, pad_id=pad_id, mode=mode, **kwargs)

  def __post_init__(self):
    check_mode(self.mode, 'ConcatDecoder mode')
    super().__post_init__()

  def _full(self, tok_e, vec_d, mask_e):
    vec_e, _ = apply_layer(self.encoder, [tok_e, mask_e])
    y, _ = apply_layer(self.decoder, [concat_with_padding(vec_e, vec_d, mask_e), mask_e])
    return strip_from_concatenation(y, mask_e)

  def _step(self, tok_e, vec_d, mask_e):
    del tok_e
    return apply_layer(self.decoder, [vec_d, mask_e])[0]

  @nn.compact
  def __call__(self, tok_e, vec_d):
    if tok_e.ndim != 2 or vec_d.ndim != 3 or tok_e.shape[0] != vec_d.shape[0]:
      raise ValueError(f'ConcatDecoder needs encoder tokens (b, l1) and decoder vectors '
                       f'(b, l2, d), got {tuple(tok_e.shape)} and {tuple(vec_d.shape)}.')
    mask_e = tok_e != self.pad_id
    if self.mode != 'predict':
      return self._full(tok_e, vec_d, mask_e)
    filled = self.variable('cache', 'filled', lambda: jnp.zeros((), jnp.bool_))
    if self.is_initializing():
      return self._full(tok_e, vec_d, mask_e)
    if vec_d.shape[1] != 1:
      raise ValueError(f'ConcatDecoder in predict mode decodes one target token per call, got '
                       f'{vec_d.shape[1]}.')
    y = nn.cond(filled.value, lambda mdl, *a: mdl._step(*a), lambda mdl, *a: mdl._full(*a),
                self, tok_e, vec_d, mask_e)
    filled.value = jnp.ones((), jnp.bool_)
    return y
