"""Positional encodings: sinusoidal, learned, and Reformer's axial factorisation.

In `'predict'` mode each encoding keeps the next position in the `cache`
collection (`position`, an int32 scalar) and advances it by the input length
on every call after `init`.

Packed rows (`packed=True`, 'train'/'eval'): [x, segment_ids, positions] ->
[y, segment_ids], 3 -> 2, with positions int (b, l) the position of each
token within its document (restarting at 0), so every document gets the
encodings it would get alone; the segment ids pass through for the
attention layers above.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from terraflax.combinators.base import Layer, check_mode
from terraflax.layers.core import advance_position, check_packed, dropout, param_with_axes

POSITIONAL_KINDS = ('sinusoidal', 'learned')


def sinusoidal_table(max_len: int, d: int) -> np.ndarray:
  """(max_len, d) float32: sin on even features, cos on odd, as in Vaswani et al."""
  positions = np.arange(max_len, dtype=np.float64)[:, None]
  rates = np.exp(-math.log(10_000.0) * (np.arange(0, d, 2) / d))[None, :]
  table = np.zeros((max_len, d))
  table[:, 0::2] = np.sin(positions * rates)
  table[:, 1::2] = np.cos(positions * rates[:, : d // 2])
  return table.astype(np.float32)


def _checked_positions(owner, positions, x):
  """A packed row's positions as int32 (b, l), after checking their shape against x."""
  if positions.shape != x.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f'{owner} packed=True needs positions int (b, l) = {tuple(x.shape[:2])} '
                     f'(each token\'s position in its document), got '
                     f'{positions.dtype}{tuple(positions.shape)}.')
  return positions.astype(jnp.int32)


class PositionalEncoding(Layer):
  """[x] -> [x + position(x)]: (b, l, d) -> (b, l, d); n_in = n_out = 1.

  packed=True: [x, segment_ids, positions] -> [y, segment_ids]; 3 -> 2.

  `kind='sinusoidal'` adds a fixed table; `kind='learned'` adds a trained
  (max_len, d) parameter `pos_embedding`. Dropout (train mode) follows.
  """

  max_len: int = 2048
  kind: str = 'sinusoidal'
  dropout: float = 0.0
  mode: str = 'train'
  packed: bool = False

  def __post_init__(self):
    check_mode(self.mode, 'PositionalEncoding mode')
    check_packed('PositionalEncoding', self.packed, self.mode)
    if self.kind not in POSITIONAL_KINDS:
      raise ValueError(f'PositionalEncoding kind must be one of {POSITIONAL_KINDS}, got {self.kind!r}.')
    super().__post_init__()

  @property
  def n_in(self):
    return 3 if self.packed else 1

  @property
  def n_out(self):
    return 2 if self.packed else 1

  @nn.compact
  def __call__(self, x, *packing):
    length, d = x.shape[1], x.shape[2]
    if length > self.max_len:
      raise ValueError(f'PositionalEncoding max_len={self.max_len} is shorter than the input length {length}.')
    if self.kind == 'learned':
      table = param_with_axes(self, 'pos_embedding', (None, 'embed'), nn.initializers.normal(0.02),
                              (self.max_len, d))
    else:
      table = jnp.asarray(sinusoidal_table(self.max_len, d))
    if self.packed:
      encodings = jnp.take(table, _checked_positions('PositionalEncoding', packing[1], x),
                           axis=0)
    else:
      start = advance_position(self, length)
      encodings = jax.lax.dynamic_slice_in_dim(table, start, length, axis=0)[None]
    y = x + encodings.astype(x.dtype)
    if self.mode == 'train' and self.dropout > 0:
      y = dropout(y, self.dropout, self.make_rng('dropout'))
    return (y, packing[0]) if self.packed else y


class AxialPositionalEncoding(Layer):
  """[x] -> [x + axial(x)]: (b, l, d) -> (b, l, d); n_in = n_out = 1.

  packed=True: [x, segment_ids, positions] -> [y, segment_ids]; 3 -> 2.

  Reformer's factorised positions: position p is written in the mixed radix
  `shape` (row-major, p = i_0 * shape[1] * ... + i_last), and its embedding is
  the concatenation of `axial_k[i_k]`, parameters of shape
  (shape[k], d_embs[k]). Needs sum(d_embs) == d and l <= prod(shape).
  """

  shape: Sequence[int] = (64, 64)
  d_embs: Sequence[int] = (128, 128)
  dropout: float = 0.0
  mode: str = 'train'
  packed: bool = False

  def __post_init__(self):
    check_mode(self.mode, 'AxialPositionalEncoding mode')
    check_packed('AxialPositionalEncoding', self.packed, self.mode)
    if len(self.shape) != len(self.d_embs) or not self.shape:
      raise ValueError(
          f'AxialPositionalEncoding needs one d_embs entry per axis of shape, got '
          f'shape={tuple(self.shape)} and d_embs={tuple(self.d_embs)}.')
    super().__post_init__()

  @property
  def n_in(self):
    return 3 if self.packed else 1

  @property
  def n_out(self):
    return 2 if self.packed else 1

  @nn.compact
  def __call__(self, x, *packing):
    length, d = x.shape[1], x.shape[2]
    if sum(self.d_embs) != d:
      raise ValueError(
          f'AxialPositionalEncoding d_embs={tuple(self.d_embs)} sums to {sum(self.d_embs)}, '
          f'but the input width is {d}.')
    capacity = math.prod(self.shape)
    if length > capacity:
      raise ValueError(
          f'AxialPositionalEncoding shape={tuple(self.shape)} covers {capacity} positions, '
          f'fewer than the input length {length}.')
    if self.packed:  # (b, l): each token's position within its document.
      positions = _checked_positions('AxialPositionalEncoding', packing[1], x)
    else:
      positions = (advance_position(self, length) + jnp.arange(length))[None]
    parts, stride = [], capacity
    for k, (size, d_emb) in enumerate(zip(self.shape, self.d_embs)):
      stride //= size
      table = param_with_axes(  # d_emb is a slice of d_model: never sharded.
          self, f'axial_{k}', (None, None), nn.initializers.normal(1.0), (size, d_emb))
      if self.mode == 'train' and self.dropout > 0:
        table = dropout(table, self.dropout, self.make_rng('dropout'))
      parts.append(jnp.take(table, (positions // stride) % size, axis=0))
    y = x + jnp.concatenate(parts, axis=-1).astype(x.dtype)
    return (y, packing[0]) if self.packed else y


class FixedBasePositionalEncoding(Layer):
  """[x] -> [x + fixed_base(x)]: (b, l, d) -> (b, l, d); n_in = n_out = 1.

  Trax's `FixedBasePositionalEncoding` (the ConfigurableTerraformer's default
  positions): position p is written in each base B of `bases` with
  `n_digits` digits, and digit j of base B scales a trained vector
  `base_weights[B, j]` of width d / n_digits; the n_digits scaled vectors
  concatenate to width d, and the bases' results add up. The first position
  also adds the trained `start_vec` (d,). Parameters: `base_weights`
  (len(bases), n_digits, d / n_digits), `start_vec` (d,).

  In 'train' mode, as in Trax: each example starts at a random position (0
  with probability 1 / `start_from_zero_one_in`, else uniform in [0,
  min(bases)**n_digits - l)) and drops the whole encoding with probability
  1 / `base_dropout_one_in` (both from the 'dropout' stream). In 'predict'
  mode the position advances by the input length per call (the `cache`
  counter `position`) and `start_vec` is added at position 0 only.
  """

  bases: Sequence[int] = (11, 13, 14, 15)
  n_digits: int = 8
  start_from_zero_one_in: int = 2
  base_dropout_one_in: int = 100
  mode: str = 'train'

  def __post_init__(self):
    check_mode(self.mode, 'FixedBasePositionalEncoding mode')
    if not self.bases or any(not isinstance(b, int) or b < 2 for b in self.bases):
      raise ValueError(f'FixedBasePositionalEncoding bases must be ints >= 2, got '
                       f'{tuple(self.bases)!r}.')
    for field in ('n_digits', 'start_from_zero_one_in', 'base_dropout_one_in'):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'FixedBasePositionalEncoding {field} must be a positive int, got '
                         f'{value!r}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    batch, length, d = x.shape
    if d % self.n_digits:
      raise ValueError(f'FixedBasePositionalEncoding: the input width {d} must be a multiple of '
                       f'n_digits={self.n_digits}.')
    max_pos = min(self.bases) ** self.n_digits
    if length >= max_pos:
      raise ValueError(f'FixedBasePositionalEncoding covers {max_pos} positions, fewer than the '
                       f'input length {length}.')
    init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1e-4, 1e-4)
    base_weights = param_with_axes(self, 'base_weights', (None, None, None), init,
                                   (len(self.bases), self.n_digits, d // self.n_digits))
    start_vec = param_with_axes(self, 'start_vec', (None,), init, (d,))
    start = advance_position(self, length)
    positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    keep = jnp.ones((batch,), jnp.float32)
    if self.mode == 'train':
      nonzero, offset, dropped = jax.random.split(self.make_rng('dropout'), 3)
      nonzero = jnp.minimum(1, jax.random.randint(nonzero, (batch,), 0,
                                                  self.start_from_zero_one_in))
      offset = jax.random.randint(offset, (batch,), 0, max_pos - length) * nonzero
      positions = positions + offset[:, None]
      keep = jnp.minimum(1, jax.random.randint(dropped, (batch,), 0, self.base_dropout_one_in))
      keep = keep.astype(jnp.float32)
    total = 0.0
    for i, base in enumerate(self.bases):
      digits, rest = [], positions
      for j in range(self.n_digits):
        digits.append((rest % base).astype(jnp.float32)[:, :, None] * base_weights[i, j][None, None])
        rest = rest // base
      total = total + jnp.concatenate(digits, axis=-1) * keep[:, None, None]
    first = (start + jnp.arange(length)) == 0  # The sequence's first position (Trax: index 0
    total = total + jnp.where(first[None, :, None], start_vec[None, None], 0.0)  # of a train/eval call).
    return x + total.astype(x.dtype)
