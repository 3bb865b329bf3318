"""Reformer's LSH self-attention: the layer `LSHSelfAttention` and `lsh_attend`.

Each head hashes its queries with random rotations (see `lsh_hashing`) in
`n_hashes` independent rounds; the hashed attention itself (sort by bucket,
chunk windows, rounds combined by their log-sum-exp) is `lsh_core`, and
predict-mode decoding over a ring buffer is `lsh_decoding`. This module holds
the layer (projections, rotations, the 'hf' convention) and the choice of
implementation: on the CPU the computation after the sort runs by default as
a native kernel (`terraflax.kernels.lsh_cpu`: `kernel='auto'`), about twice
as fast; `kernel='xla'` keeps the XLA path of `lsh_core` (which also serves
the 'hf' convention, attention dropout and sizes that are not multiples of
16).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from terraflax import kernels
from terraflax.combinators.base import Layer, check_int, check_mode, check_rate
from terraflax.kernels import lsh_cpu
from terraflax.layers import lsh_hashing
from terraflax.layers.core import (
    HEAD_AXES, IN_PROJECTION_AXES, OUT_PROJECTION_AXES, SegmentsPassThrough, advance_position,
    check_packed, checked_segments, chunk_padded, constrain, param_with_axes, project_heads)
from terraflax.layers.lsh_core import attend_sorted, sort_rounds
from terraflax.layers.lsh_decoding import RingMemory, ring_attend

# Optional variable collection with given rotations (see `LSHSelfAttention`).
ROTATIONS_COLLECTION = 'lsh_rotations'
CONVENTIONS = ('terraflax', 'hf')


def lsh_attend(q, v, buckets, *, length: int, chunk_len: int, n_chunks_before: int = 1,
               n_chunks_after: int = 0, causal: bool = False, dropout_rate: float = 0.0,
               dropout_rng: jax.Array | None = None, n_bucket_ids: int | None = None,
               kernel: str = 'auto', segment_ids: jax.Array | None = None):
  """LSH attention of queries that are already hashed.

  q (b, L, h, k), v (b, L, h, dv) float32, buckets int (b, h, n, L) with
  L a multiple of `chunk_len`; positions at and beyond `length` are padding:
  never attended to (give them a bucket above all real ones so they sort
  last). `n_bucket_ids`, if given, bounds the bucket ids (0 <= id <
  n_bucket_ids) and allows a faster sort. `kernel` is one of `kernels.KERNELS`
  (see `LSHSelfAttention`). `segment_ids` int (b, L): a packed row's
  documents (keys of other documents are masked). Returns (b, L, h, dv); rows
  of padding positions are meaningless.
  """
  return lsh_attend_packed(
      jnp.concatenate([q, v], axis=-1), buckets, d_qk=q.shape[-1], length=length,
      chunk_len=chunk_len, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
      causal=causal, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
      n_bucket_ids=n_bucket_ids, kernel=kernel, segment_ids=segment_ids)


def _cpu_kernel_applies(kernel: str, *, dtype, d_qk: int, d_v: int, padded_length: int,
                        chunk_len: int, n_chunks_before: int, n_chunks_after: int,
                        dropout_rate: float, rounds_joined: bool) -> bool:
  """Whether this call runs the native CPU kernel (see `kernels.use_native`)."""
  if rounds_joined:
    why_not = "the 'hf' convention (rounds joined) runs on XLA only"
  elif dropout_rate > 0:
    why_not = 'attention dropout runs on XLA only'
  elif dtype != jnp.float32:
    why_not = f'the kernel computes in float32, got {dtype} inputs'
  else:
    why_not = lsh_cpu.unsupported(d_qk=d_qk, d_v=d_v, padded_length=padded_length,
                                  chunk_len=chunk_len, n_chunks_before=n_chunks_before,
                                  n_chunks_after=n_chunks_after)
  return kernels.use_native('lsh_attend', kernel, why_not, lsh_cpu.available)


def lsh_attend_packed(qv, buckets, *, d_qk: int, length: int, chunk_len: int,
                      n_chunks_before: int = 1, n_chunks_after: int = 0, causal: bool = False,
                      dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None,
                      n_bucket_ids: int | None = None, rounds_joined: bool = False,
                      kernel: str = 'auto', segment_ids: jax.Array | None = None):
  """`lsh_attend` of queries and values packed as qv (b, L, h, d_qk + dv).

  Sorts each round (`lsh_core.sort_rounds`), then runs the native kernel or
  `lsh_core.attend_sorted`. `rounds_joined=True` is Hugging Face's layout of
  the rounds (see `attend_sorted`; XLA only). `segment_ids` int (b, L): the
  documents of a packed row; a query attends only to keys of its own.
  """
  big_l = qv.shape[1]
  d_k, d_v = d_qk, qv.shape[-1] - d_qk
  c = chunk_len
  if big_l % c:
    raise ValueError(f'lsh_attend needs a length that is a multiple of chunk_len={c}, got {big_l}.')
  if dropout_rate > 0 and dropout_rng is None:
    raise ValueError('lsh_attend needs a dropout_rng when dropout_rate > 0.')
  before, after = n_chunks_before, n_chunks_after

  # Sort each round by (bucket, position), then attend in that order.
  perm = lax.stop_gradient(sort_rounds(buckets, n_bucket_ids))
  options = dict(d_qk=d_k, length=length, chunk_len=c, n_chunks_before=before,
                 n_chunks_after=after, causal=causal)
  if _cpu_kernel_applies(kernel, dtype=qv.dtype, d_qk=d_k, d_v=d_v, padded_length=big_l,
                         chunk_len=c, n_chunks_before=before, n_chunks_after=after,
                         dropout_rate=dropout_rate, rounds_joined=rounds_joined):
    return lsh_cpu.attend(qv, perm, segment_ids=segment_ids, **options)
  return attend_sorted(qv, perm, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                       rounds_joined=rounds_joined, segment_ids=segment_ids, **options)


# Positions hashed at a time: the rotated vectors of one piece, (b, h, n, r, piece) float32,
# are the largest buffer of the hashing (r grows with the length under Trax's bucket rule:
# 12 KB per position at 1M tokens, 4 heads and 4 rounds, if made whole).
HASH_PIECE_LEN = 8192


def piece_len(length: int, max_len: int) -> int:
  """The largest divisor of `length` that is <= `max_len` (`length` itself if it fits)."""
  if length <= max_len:
    return length
  for n_pieces in range(-(-length // max_len), length + 1):
    if length % n_pieces == 0:
      return length // n_pieces
  return 1


def _hash_heads(q, rotations, n_buckets, max_piece_len: int = HASH_PIECE_LEN):
  """Bucket ids of q (b, L, h, k) under per-head rotations (b, h, k, n, r): int32 (b, h, n, L).

  The rotated vectors come out as (b, h, n, r, L), positions minor, so the
  argmax over the r columns is elementwise work on rows of L (fast on CPU).
  Long inputs are hashed `piece_len(L, max_piece_len)` positions at a time
  (a `lax.map`), so only one piece's rotated vectors exist; the ids are
  those of hashing the whole input at once.
  """
  def hash_piece(piece):  # (b, p, h, k) -> (b, h, n, p)
    rotated = jnp.einsum('bhknr,blhk->bhnrl', rotations, piece, precision=lax.Precision.HIGHEST)
    return lsh_hashing.buckets_of_rotated(rotated, n_buckets, axis=3)

  b, big_l, h, k = q.shape
  p = piece_len(big_l, max_piece_len)
  if p == big_l:
    return hash_piece(q)
  pieces = jnp.moveaxis(q.reshape(b, big_l // p, p, h, k), 1, 0)  # (L/p, b, p, h, k)
  ids = lax.map(hash_piece, pieces)  # (L/p, b, h, n, p)
  return jnp.moveaxis(ids, 0, 3).reshape(ids.shape[1:4] + (big_l,))


class LSHSelfAttention(SegmentsPassThrough, Layer, kw_only=True):
  """[x] -> [y]: (b, l, d) -> (b, l, d); n_in = n_out = 1. Reformer's LSH self-attention.

  Shared-QK multi-head attention in which each query only sees the keys that
  fall near it after hashing (see `lsh_core`). Parameters: `qk`
  (d, h, d_qk), `value` (d, h, d_v), `output` (h, d_v, d); the same in every
  mode. Lengths that are not a multiple of `chunk_len` are padded inside and
  the padding is never attended to.

  Fields (keyword-only):
    n_heads, d_qk, d_v: heads and per-head widths of keys/queries and values.
    n_hashes: independent hash rounds; their outputs are combined by their
      log-sum-exp weights, with repeated (query, key) meetings counted once.
    n_buckets: buckets per round: an even int, a pair (n1, n2) hashed with
      two rotations into n1 * n2 buckets, 1 (no hashing), or None for Trax's
      rule from the length (`lsh_hashing.default_n_buckets`; in 'predict'
      mode the length is `predict_mem_len`).
    chunk_len, n_chunks_before, n_chunks_after: the sorted sequence is cut
      into chunks of `chunk_len`; each attends to itself and its neighbours.
    causal: mask keys after the query (by original position).
    dropout: dropout on the attention weights in 'train' mode; the
      mask is shared across batch and heads.
    mode: 'train' | 'eval' | 'predict'. Train and eval draw fresh rotations
      from the `hash` rng stream on every call. Predict decodes incrementally
      (causal only): rotations are drawn once, at `init`, and kept in the
      `cache` with the last `predict_mem_len` keys, values and bucket ids; a
      new token attends to the remembered keys that share its bucket in any
      round, plus the `chunk_len * (n_chunks_before + 1)` most recent
      positions (itself masked unless alone), in one softmax: the union of
      its rounds, as the rounds combine in training. The memory is a ring
      buffer, so the cost per token does not depend on the prompt's length.
    predict_mem_len: positions kept in predict mode.
    dtype: compute dtype of the projections (None: the input's); the
      attention itself always runs in float32.
    sow_weights: sow the bucket ids (b, h, n_hashes, l) to `intermediates`.
    kernel: 'auto' runs train/eval attention as the native CPU kernel
      (`terraflax.kernels.lsh_cpu`) when the default backend is the CPU and
      it applies (terraflax convention, no attention dropout, chunk_len,
      d_qk and d_v multiples of 16), else on XLA; 'xla' always uses XLA;
      'cpu' requires the kernel (an error names what prevents it). Both
      compute the same function.
    convention: 'terraflax' (above) or 'hf', Hugging Face's `LSHSelfAttention`
      in train/eval mode: the rounds are sorted into one sequence whose
      windows cross round boundaries, repeated meetings are not discounted,
      and inputs no longer than `chunk_len` get plain attention (one round, no
      hashing). Use it to reproduce converted Hugging Face models.

  Given rotations: when the `lsh_rotations` variable collection holds
  `rotations` for this layer, float32 (n_heads, d_qk, n_hashes, r) shared by
  the batch (Hugging Face's layout) or (b, n_heads, d_qk, n_hashes, r), they
  are used in train/eval mode instead of drawing from the `hash` stream;
  hashing, sorting and chunking run as usual (r: `lsh_hashing.rotation_width`).

  `packed=True` ('train'/'eval'): [x, segment_ids] -> [y, segment_ids],
  2 -> 2, segment_ids int (b, l) of a packed row: a query attends only to the
  keys of its own document that share its window, and to itself only when
  none does. (Buckets and chunks are those of the whole row, so a document
  meets the keys it meets alone when the windows cover it: one bucket and
  chunk_len >= l, or given rotations that bucket alike with chunks holding
  every bucket.)
  """

  n_heads: int = 8
  d_qk: int = 64
  d_v: int = 64
  n_hashes: int = 1
  n_buckets: Any = None
  chunk_len: int = 128
  n_chunks_before: int = 1
  n_chunks_after: int = 0
  causal: bool = False
  dropout: float = 0.0
  mode: str = 'train'
  predict_mem_len: int = 2048
  dtype: Any = None
  sow_weights: bool = False
  convention: str = 'terraflax'
  kernel: str = 'auto'
  packed: bool = False

  def __post_init__(self):
    check_mode(self.mode, 'LSHSelfAttention mode')
    check_packed('LSHSelfAttention', self.packed, self.mode)
    if self.convention not in CONVENTIONS:
      raise ValueError(f'LSHSelfAttention convention must be one of {CONVENTIONS}, got '
                       f'{self.convention!r}.')
    kernels.check_kernel('LSHSelfAttention', self.kernel)
    for name in ('n_heads', 'd_qk', 'd_v', 'n_hashes', 'chunk_len', 'predict_mem_len'):
      check_int('LSHSelfAttention', name, getattr(self, name))
    for name in ('n_chunks_before', 'n_chunks_after'):
      check_int('LSHSelfAttention', name, getattr(self, name), minimum=0)
    if self.n_buckets is not None:
      lsh_hashing.bucket_factors(self.n_buckets, 'LSHSelfAttention n_buckets')
    check_rate('LSHSelfAttention', 'dropout', self.dropout)
    if self.mode == 'predict':
      if not self.causal:
        raise ValueError("LSHSelfAttention mode='predict' decodes causally; set causal=True.")
      neighbourhood = self.chunk_len * (self.n_chunks_before + 1)
      if self.predict_mem_len < neighbourhood:
        raise ValueError(
            f'LSHSelfAttention predict_mem_len={self.predict_mem_len} must hold the chunk '
            f'neighbourhood chunk_len * (n_chunks_before + 1) = {neighbourhood}.')
    super().__post_init__()

  def buckets_for(self, length: int):
    """The n_buckets used for inputs of `length` (resolving None)."""
    if self.n_buckets is not None:
      return self.n_buckets
    return lsh_hashing.default_n_buckets(length, self.chunk_len)

  @nn.compact
  def __call__(self, x, *segment_ids):
    xc = chunk_padded('LSHSelfAttention', x, self.chunk_len, self.mode)
    d = x.shape[-1]
    dtype = self.dtype or x.dtype
    init = nn.initializers.xavier_uniform
    h = self.n_heads
    qkv_init, out_init = init(in_axis=0, out_axis=(1, 2)), init(in_axis=(0, 1), out_axis=2)
    w_qk = param_with_axes(self, 'qk', IN_PROJECTION_AXES, qkv_init, (d, h, self.d_qk))
    w_v = param_with_axes(self, 'value', IN_PROJECTION_AXES, qkv_init, (d, h, self.d_v))
    w_o = param_with_axes(self, 'output', OUT_PROJECTION_AXES, out_init, (h, self.d_v, d))
    length = x.shape[1]
    w_qkv = jnp.concatenate([w_qk, w_v], axis=-1).astype(dtype)  # One product for q and v.
    qv = constrain(project_heads(xc.astype(dtype), w_qkv).astype(jnp.float32), HEAD_AXES)
    if self.mode == 'predict':
      o = self._decode(qv[..., :self.d_qk], qv[..., self.d_qk:])
    else:
      segments = None
      if self.packed:
        segments = checked_segments('LSHSelfAttention', segment_ids[0], x)
        segments = jnp.pad(segments, ((0, 0), (0, xc.shape[1] - length)))
      o = self._attend(qv, length, segments)
    y = jnp.einsum('blhk,hkd->bld', o.astype(dtype), w_o.astype(dtype))
    return (y, segment_ids[0]) if self.packed else y

  def _hash_rng(self):
    if not (self.has_rng('hash') or self.has_rng('params')):
      raise ValueError(
          "LSHSelfAttention draws its random rotations from the 'hash' rng stream: pass "
          "rngs={'hash': key} to apply.")
    return self.make_rng('hash')

  def _attend(self, qv, length: int, segment_ids=None):
    """Train/eval: fresh rotations, sort, chunked attention. (b, L, h, k + dv) -> (b, l, h, dv)."""
    b, big_l = qv.shape[:2]
    n_buckets = self.buckets_for(length)
    hf = self.convention == 'hf'
    if hf and length <= self.chunk_len:  # Plain attention: one round, one bucket.
      buckets = jnp.zeros((b, self.n_heads, 1, big_l), jnp.int32)
    else:
      buckets = _hash_heads(qv[..., :self.d_qk], self._rotations(b, n_buckets), n_buckets)
    if big_l > length:  # Padding goes to an extra bucket, after every real one.
      real = lax.broadcasted_iota(jnp.int32, buckets.shape, 3) < length
      buckets = jnp.where(real, buckets, lsh_hashing.total_buckets(n_buckets))
    buckets = lax.stop_gradient(buckets)
    if self.sow_weights:
      self.sow('intermediates', 'buckets', buckets[..., :length])
    rate = self.dropout if self.mode == 'train' else 0.0
    o = lsh_attend_packed(
        qv, buckets, d_qk=self.d_qk, length=length, chunk_len=self.chunk_len,
        n_chunks_before=self.n_chunks_before, n_chunks_after=self.n_chunks_after,
        causal=self.causal, dropout_rate=rate,
        dropout_rng=self.make_rng('dropout') if rate > 0 else None,
        n_bucket_ids=lsh_hashing.total_buckets(n_buckets) + 1, rounds_joined=hf,
        kernel=self.kernel, segment_ids=segment_ids)
    return o[:, :length]

  def _rotations(self, b: int, n_buckets):
    """(b, h, d_qk, n_hashes, r): given in `lsh_rotations`, else drawn from `hash`."""
    shape = (self.n_heads, self.d_qk, self.n_hashes, lsh_hashing.rotation_width(n_buckets))
    if self.has_variable(ROTATIONS_COLLECTION, 'rotations'):
      given = jnp.asarray(self.get_variable(ROTATIONS_COLLECTION, 'rotations'), jnp.float32)
      if given.shape == shape:
        given = jnp.broadcast_to(given[None], (b,) + shape)
      if given.shape != (b,) + shape:
        raise ValueError(
            f'LSHSelfAttention given rotations ({ROTATIONS_COLLECTION}/rotations) have shape '
            f'{given.shape}; expected {shape} or {(b,) + shape} (n_heads, d_qk, n_hashes, '
            f'n_buckets columns).')
      return given
    return lsh_hashing.draw_rotations(
        self._hash_rng(), (b, self.n_heads), self.d_qk, self.n_hashes, n_buckets)

  def _decode(self, q, v):
    """Predict: attend over the ring-buffer memory (`lsh_decoding`), one position at a time."""
    b, length = q.shape[:2]
    h, m = self.n_heads, self.predict_mem_len
    n_buckets = self.buckets_for(m)
    rotations = self.variable(
        'cache', 'rotations', lambda: lsh_hashing.draw_rotations(
            self._hash_rng(), (b, h), self.d_qk, self.n_hashes, n_buckets))
    keys = self.variable('cache', 'keys', jnp.zeros, (b, h, m, self.d_qk), jnp.float32)
    values = self.variable('cache', 'values', jnp.zeros, (b, h, m, self.d_v), jnp.float32)
    buckets = self.variable('cache', 'buckets', jnp.zeros, (b, h, self.n_hashes, m), jnp.int32)
    slot_pos = self.variable('cache', 'slot_positions', lambda: jnp.full((m,), -1, jnp.int32))
    start = advance_position(self, length)
    q_buckets = _hash_heads(q, rotations.value, n_buckets)  # (b, h, n, l), as in training
    memory = RingMemory(keys.value, values.value, buckets.value, slot_pos.value)
    memory, o = ring_attend(memory, q, v, q_buckets, start,
                            recent=self.chunk_len * (self.n_chunks_before + 1))
    if not self.is_initializing():
      keys.value, values.value, buckets.value, slot_pos.value = memory
    return o
