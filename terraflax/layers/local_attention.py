"""Local (chunked-window) self-attention, the 'local' layers of Hugging Face's Reformer.

The sequence is cut into chunks of `chunk_len`; the queries of a chunk attend
to the keys of their own chunk and of `n_chunks_before` / `n_chunks_after`
neighbouring chunks. Queries, keys and values have their own projections
(no shared QK), keys are scaled by 1/sqrt(d_qk), and no token is kept from
attending to itself. The neighbour chunks wrap around at the ends of the
sequence (chunk 0's "previous" chunk is the last one), as in Hugging Face's
`LocalSelfAttention`; with `causal=True` the wrapped chunks lie in the future
and are masked, so a causal query at position t sees exactly the positions
from `(t // chunk_len - n_chunks_before) * chunk_len` (at least 0) to t.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from terraflax.combinators.base import Layer, check_int, check_mode, check_rate
from terraflax.layers.core import (
    HEAD_AXES, IN_PROJECTION_AXES, OUT_PROJECTION_AXES, SegmentsPassThrough, advance_position,
    check_packed, checked_segments, chunk_padded, constrain, param_with_axes)

# Logit of a masked key (causal, padding), as in Hugging Face's float32 path.
MASKED_LOGIT = -1e9


def local_attend(q, k, v, *, length: int, chunk_len: int, n_chunks_before: int = 1,
                 n_chunks_after: int = 0, causal: bool = True, dropout_rate: float = 0.0,
                 dropout_rng: jax.Array | None = None, segment_ids: jax.Array | None = None):
  """Chunked-window attention: q, k (b, L, h, k), v (b, L, h, dv) -> (b, L, h, dv).

  L must be a multiple of `chunk_len`; positions at and after `length` are
  padding and never attended to. `k` is used as given (scale it first).
  Windows wrap around the ends (see the module docstring). `segment_ids`
  int (b, L): a query attends only to keys of its own document.
  """
  b, big_l, h, d_k = q.shape
  c = chunk_len
  if big_l % c:
    raise ValueError(f'local_attend needs a length that is a multiple of chunk_len={c}, '
                     f'got {big_l}.')
  n_chunks = big_l // c

  def chunked(x):  # (b, L, h, ...) -> (b, h, C, c, ...)
    x = jnp.moveaxis(x, 2, 1)
    return x.reshape(x.shape[:2] + (n_chunks, c) + x.shape[3:])

  def windowed(x):  # (b, h, C, c, ...) -> (b, h, C, w * c, ...): chunk i + o for each offset o
    parts = [jnp.roll(x, -o, axis=2) for o in range(-n_chunks_before, n_chunks_after + 1)]
    return jnp.concatenate(parts, axis=3) if len(parts) > 1 else parts[0]

  qc, kw, vw = chunked(q), windowed(chunked(k)), windowed(chunked(v))
  pos = jnp.arange(big_l, dtype=jnp.int32).reshape(n_chunks, c)
  q_pos = pos[:, :, None]
  k_pos = windowed(pos[None, None])[0, 0][:, None, :]  # (C, 1, w * c)
  dots = jnp.einsum('bhcik,bhcjk->bhcij', qc, kw, precision=lax.Precision.HIGHEST)
  masked = k_pos >= length
  if causal:
    masked = masked | (k_pos > q_pos)
  masked = masked[None, None]
  if segment_ids is not None:
    seg = segment_ids.reshape(b, 1, n_chunks, c)
    masked = masked | (seg[..., :, None] != windowed(seg)[..., None, :])
  dots = jnp.where(masked, MASKED_LOGIT, dots)
  probs = jax.nn.softmax(dots, axis=-1)
  if dropout_rate > 0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = probs * keep.astype(probs.dtype) * (1.0 / (1.0 - dropout_rate))
  o = jnp.einsum('bhcij,bhcjd->bhcid', probs, vw, precision=lax.Precision.HIGHEST)
  return jnp.moveaxis(o.reshape(b, h, big_l, -1), 1, 2)


class LocalSelfAttention(SegmentsPassThrough, Layer, kw_only=True):
  """[x] -> [y]: (b, l, d) -> (b, l, d); n_in = n_out = 1. Hugging Face Reformer's local attention.

  Multi-head attention within chunk windows (see the module docstring).
  Parameters: `query`, `key` (d, h, d_qk), `value` (d, h, d_v), `output`
  (h, d_v, d), no biases; the same in every mode. Lengths that are not a
  multiple of `chunk_len` are padded inside; the padding is never attended to.

  Fields (keyword-only):
    n_heads, d_qk, d_v: heads and per-head widths.
    chunk_len, n_chunks_before, n_chunks_after: the window of each chunk.
    causal: mask keys after the query.
    dropout: dropout on the attention weights in 'train' mode.
    mode: 'train' | 'eval' | 'predict'. Predict decodes causally with a
      key/value ring buffer holding the window, `chunk_len * (n_chunks_before
      + 1)` positions: the same keys that the chunked forward pass shows a
      causal query (as long as the sequence has more chunks than a window).
    dtype: compute dtype of the projections (None: the input's); the
      attention itself runs in float32.
    packed: [x, segment_ids] -> [y, segment_ids], 2 -> 2 (module docstring).
  """

  n_heads: int = 8
  d_qk: int = 64
  d_v: int = 64
  chunk_len: int = 64
  n_chunks_before: int = 1
  n_chunks_after: int = 0
  causal: bool = True
  dropout: float = 0.0
  mode: str = 'train'
  dtype: Any = None
  packed: bool = False

  def __post_init__(self):
    check_mode(self.mode, 'LocalSelfAttention mode')
    check_packed('LocalSelfAttention', self.packed, self.mode)
    for name in ('n_heads', 'd_qk', 'd_v', 'chunk_len'):
      check_int('LocalSelfAttention', name, getattr(self, name))
    for name in ('n_chunks_before', 'n_chunks_after'):
      check_int('LocalSelfAttention', name, getattr(self, name), minimum=0)
    check_rate('LocalSelfAttention', 'dropout', self.dropout)
    if self.mode == 'predict' and not self.causal:
      raise ValueError("LocalSelfAttention mode='predict' decodes causally; set causal=True.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *segment_ids):
    xc = chunk_padded('LocalSelfAttention', x, self.chunk_len, self.mode)
    d = x.shape[-1]
    dtype = self.dtype or x.dtype
    init = nn.initializers.xavier_uniform
    h = self.n_heads
    qkv_init, out_init = init(in_axis=0, out_axis=(1, 2)), init(in_axis=(0, 1), out_axis=2)
    w_q = param_with_axes(self, 'query', IN_PROJECTION_AXES, qkv_init, (d, h, self.d_qk))
    w_k = param_with_axes(self, 'key', IN_PROJECTION_AXES, qkv_init, (d, h, self.d_qk))
    w_v = param_with_axes(self, 'value', IN_PROJECTION_AXES, qkv_init, (d, h, self.d_v))
    w_o = param_with_axes(self, 'output', OUT_PROJECTION_AXES, out_init, (h, self.d_v, d))
    length = x.shape[1]
    xc = xc.astype(dtype)

    def project(w):
      return constrain(jnp.einsum('bld,dhk->blhk', xc, w.astype(dtype)).astype(jnp.float32),
                       HEAD_AXES)

    q, k, v = project(w_q), project(w_k) * (1.0 / math.sqrt(self.d_qk)), project(w_v)
    if self.mode == 'predict':
      o = self._decode(q, k, v)
    else:
      segments = None
      if self.packed:
        segments = checked_segments('LocalSelfAttention', segment_ids[0], x)
        segments = jnp.pad(segments, ((0, 0), (0, xc.shape[1] - length)))
      rate = self.dropout if self.mode == 'train' else 0.0
      o = local_attend(q, k, v, length=length, chunk_len=self.chunk_len,
                       n_chunks_before=self.n_chunks_before, n_chunks_after=self.n_chunks_after,
                       causal=self.causal, dropout_rate=rate,
                       dropout_rng=self.make_rng('dropout') if rate > 0 else None,
                       segment_ids=segments)[:, :length]
    y = jnp.einsum('blhk,hkd->bld', o.astype(dtype), w_o.astype(dtype))
    return (y, segment_ids[0]) if self.packed else y

  def _decode(self, q, k, v):
    """Predict: each new position attends to the remembered window, one at a time."""
    b, length, h = q.shape[:3]
    c, m = self.chunk_len, self.chunk_len * (self.n_chunks_before + 1)
    keys = self.variable('cache', 'keys', jnp.zeros, (b, h, m, self.d_qk), jnp.float32)
    values = self.variable('cache', 'values', jnp.zeros, (b, h, m, self.d_v), jnp.float32)
    slot_pos = self.variable('cache', 'slot_positions', lambda: jnp.full((m,), -1, jnp.int32))
    start = advance_position(self, length)

    def step(memory, inputs):
      keys_, values_, slot_pos_ = memory
      q_t, k_t, v_t, t = inputs  # (b, h, k), (b, h, k), (b, h, dv), ()
      slot = t % m
      keys_ = lax.dynamic_update_slice_in_dim(keys_, k_t[:, :, None], slot, axis=2)
      values_ = lax.dynamic_update_slice_in_dim(values_, v_t[:, :, None], slot, axis=2)
      slot_pos_ = lax.dynamic_update_slice_in_dim(slot_pos_, t[None], slot, axis=0)
      first = (t // c - self.n_chunks_before) * c
      visible = (slot_pos_ >= 0) & (slot_pos_ >= first) & (slot_pos_ <= t)
      dots = jnp.einsum('bhk,bhmk->bhm', q_t, keys_, precision=lax.Precision.HIGHEST)
      logits = jnp.where(visible[None, None], dots, MASKED_LOGIT)
      probs = jax.nn.softmax(logits, axis=-1)
      o_t = jnp.einsum('bhm,bhmd->bhd', probs, values_, precision=lax.Precision.HIGHEST)
      return (keys_, values_, slot_pos_), o_t

    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0),
          start + jnp.arange(length, dtype=jnp.int32))
    memory, o = lax.scan(step, (keys.value, values.value, slot_pos.value), xs)
    if not self.is_initializing():
      keys.value, values.value, slot_pos.value = memory
    return jnp.moveaxis(o, 0, 1)
