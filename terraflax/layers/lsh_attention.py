"""Reformer's LSH self-attention: `LSHSelfAttention` and its pure core `lsh_attend`.

Each head hashes its queries with random rotations (see `lsh_hashing`) in
`n_hashes` independent rounds. In every round the positions are sorted by
(bucket, position), cut into chunks of `chunk_len`, and each chunk attends to
itself and to `n_chunks_before`/`n_chunks_after` neighbouring chunks (wrapping
around within the round). Keys are the queries normalised to unit length
(shared-QK), so a query's logit with key j is `q . k_j / |k_j|`; a token never
attends to itself unless nothing else is visible to it, and causal attention
masks by original position.

A pair (i, j) can meet in several rounds (and twice in one round when there
are fewer chunks than window slots). Each meeting's logit is lowered by the
log of the number of meetings, so that after the rounds are combined with
their log-sum-exp weights the result is exactly a softmax over the *set* of
keys that i met in any round: `sum_j exp(l_ij) v_j / sum_j exp(l_ij)`.

Every array is linear in the length: the largest holds n_hashes * l *
chunk_len * (1 + n_chunks_before + n_chunks_after) logits per head.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from terraflax.combinators.base import Layer, check_mode
from terraflax.layers.core import advance_position
from terraflax.layers import lsh_hashing

# Logit of a masked key (causal, padding) and of the query itself: the self
# logit is far below any real logit, yet far above the masked ones, so a
# token falls back to itself only when nothing else is visible.
MASKED_LOGIT = -1e9
SELF_LOGIT = -1e5


def _gather_rows(table, idx):
  """table (N, w), int idx (...) -> (..., w); indices are known to be in range."""
  return table.at[idx].get(mode='promise_in_bounds')


@jax.custom_vjp
def permute_rows(table, idx, inverse):
  """`table[idx]` whose gradient is a gather too, not a scatter-add.

  table (N, w); idx int (...); inverse int (N, copies): for each table row,
  the flat positions in `idx` that read it (every row is read `copies` times).
  """
  return _gather_rows(table, idx)


def _permute_rows_fwd(table, idx, inverse):
  return _gather_rows(table, idx), (inverse,)


def _permute_rows_bwd(residuals, grad):
  (inverse,) = residuals
  grad = grad.reshape(-1, grad.shape[-1])
  return _gather_rows(grad, inverse).sum(axis=1), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _windows(x, n_before: int, n_after: int):
  """(..., C, c, w) -> (..., C, c * (n_before + 1 + n_after), w): each chunk and its neighbours.

  Chunk g gets chunks g - n_before .. g + n_after (mod C) concatenated, in
  that order.
  """
  if n_before == 0 and n_after == 0:
    return x
  axis = x.ndim - 3
  parts = [x if o == 0 else jnp.roll(x, -o, axis=axis) for o in range(-n_before, n_after + 1)]
  return jnp.concatenate(parts, axis=axis + 1)


def _meetings(chunk_q, chunk_k, n_chunks: int, n_before: int, n_after: int):
  """How often each (query, key) pair shares a window over all rounds.

  chunk_q (..., c, 1, n), chunk_k (..., 1, W, n): the chunk that each query and
  key lands in, in each round. Returns int32 (..., c, W), at least 1 for the
  pairs that share a window (every pair in a window does, in its own round).
  """
  offsets = [o % n_chunks for o in range(-n_before, n_after + 1)]
  count = None
  for r in range(chunk_q.shape[-1]):
    gap = (chunk_k[..., r] - chunk_q[..., r]) % n_chunks
    for offset in offsets:
      hit = (gap == offset).astype(jnp.int32)
      count = hit if count is None else count + hit
  return count


def lsh_attend(q, v, buckets, *, length: int, chunk_len: int, n_chunks_before: int = 1,
               n_chunks_after: int = 0, causal: bool = False, dropout_rate: float = 0.0,
               dropout_rng: jax.Array | None = None):
  """LSH attention of queries that are already hashed.

  q (b, L, h, k), v (b, L, h, dv) float32, buckets int (b, h, n, L) with
  L a multiple of `chunk_len`; positions at and beyond `length` are padding:
  never attended to (give them a bucket above all real ones so they sort
  last). Returns (b, L, h, dv); rows of padding positions are meaningless.
  """
  b, big_l, h, d_k = q.shape
  d_v = v.shape[-1]
  n = buckets.shape[2]
  c = chunk_len
  n_chunks = big_l // c
  if big_l % c:
    raise ValueError(f'lsh_attend needs a length that is a multiple of chunk_len={c}, got {big_l}.')

  # Sort each round by (bucket, position): a stable sort on the bucket alone.
  iota = lax.broadcasted_iota(jnp.int32, buckets.shape, 3)
  _, perm = lax.sort((buckets.astype(jnp.int32), iota), dimension=3, num_keys=1, is_stable=True)
  rows = lax.broadcasted_iota(jnp.int32, buckets.shape, 0) * h + lax.broadcasted_iota(
      jnp.int32, buckets.shape, 1)  # b * h + head, (b, h, n, L)
  rounds = lax.broadcasted_iota(jnp.int32, buckets.shape, 2)
  flat_row = (rows * n + rounds) * big_l  # start of (b, head, round) in sorted order
  inv = jnp.zeros((b * h * n * big_l,), jnp.int32).at[(flat_row + perm).reshape(-1)].set(
      iota.reshape(-1), unique_indices=True).reshape(buckets.shape)
  perm, inv = lax.stop_gradient(perm), lax.stop_gradient(inv)

  # Sorted copy of [q, v] for every round: row (b, p, head) of the (b, L, h)
  # table goes to (b, head, round, inv).
  batch = lax.broadcasted_iota(jnp.int32, buckets.shape, 0)
  head = lax.broadcasted_iota(jnp.int32, buckets.shape, 1)
  table_idx = (batch * big_l + perm) * h + head  # (b, h, n, L) -> row of (b, L, h)
  sorted_idx = jnp.transpose(flat_row + inv, (0, 3, 1, 2))  # (b, L, h, n) -> sorted row
  qv = jnp.concatenate([q, v], axis=-1).reshape(b * big_l * h, d_k + d_v)
  sqv = permute_rows(qv, table_idx, sorted_idx.reshape(b * big_l * h, n))
  sqv = sqv.reshape(b, h, n, n_chunks, c, d_k + d_v)
  sq, sv = sqv[..., :d_k], sqv[..., d_k:]
  sk = sq * lax.rsqrt(jnp.sum(sq * sq, axis=-1, keepdims=True) + 1e-12)

  kw = _windows(sk, n_chunks_before, n_chunks_after)  # (b, h, n, C, W, k)
  vw = _windows(sv, n_chunks_before, n_chunks_after)
  dots = jnp.einsum('bhncik,bhncjk->bhncij', sq, kw)

  spos = perm.reshape(b, h, n, n_chunks, c)
  q_pos = spos[..., :, None]
  k_pos = _windows(spos[..., None], n_chunks_before, n_chunks_after)[..., 0][..., None, :]
  masked = k_pos >= length
  if causal:
    masked = masked | (k_pos > q_pos)

  width = 1 + n_chunks_before + n_chunks_after
  if n > 1 or n_chunks < width:  # Pairs can meet more than once.
    chunk_of = (inv // c).transpose(0, 1, 3, 2).reshape(b * h * big_l, n)
    chunks = lax.stop_gradient(_gather_rows(chunk_of, rows * big_l + perm))  # (b, h, n, L, n)
    chunks = chunks.reshape(b, h, n, n_chunks, c, n)
    chunks_k = _windows(chunks, n_chunks_before, n_chunks_after)
    meets = _meetings(chunks[..., :, None, :], chunks_k[..., None, :, :], n_chunks,
                      n_chunks_before, n_chunks_after)
    dots = dots - jnp.log(meets.astype(jnp.float32))

  logits = jnp.where(k_pos == q_pos, SELF_LOGIT, jnp.where(masked, MASKED_LOGIT, dots))
  top = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(logits - top)
  total = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / total
  lse = top + jnp.log(total)  # (b, h, n, C, c, 1)
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (1, 1) + probs.shape[2:])
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  so = jnp.einsum('bhncij,bhncjd->bhncid', probs, vw)

  # Back to input order: (b, h, n, L) sorted rows -> (b, L, h, n).
  packed = jnp.concatenate([so, lse], axis=-1).reshape(b * h * n * big_l, d_v + 1)
  back = permute_rows(packed, sorted_idx, (table_idx * n + rounds).reshape(-1, 1))
  o, lse = back[..., :d_v], back[..., d_v:]  # (b, L, h, n, dv), (b, L, h, n, 1)
  if n == 1:
    return o[..., 0, :]
  weights = jax.nn.softmax(lse, axis=-2)
  return jnp.sum(o * weights, axis=-2)


def _normalise(x):
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class LSHSelfAttention(Layer, kw_only=True):
  """[x] -> [y]: (b, l, d) -> (b, l, d); n_in = n_out = 1. Reformer's LSH self-attention.

  Shared-QK multi-head attention in which each query only sees the keys that
  fall near it after hashing (see the module docstring). Parameters: `qk`
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
    attention_dropout: dropout on the attention weights in 'train' mode; the
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
  attention_dropout: float = 0.0
  mode: str = 'train'
  predict_mem_len: int = 2048
  dtype: Any = None
  sow_weights: bool = False

  def __post_init__(self):
    check_mode(self.mode, 'LSHSelfAttention mode')
    for name in ('n_heads', 'd_qk', 'd_v', 'n_hashes', 'chunk_len', 'predict_mem_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'LSHSelfAttention {name} must be a positive int, got {value!r}.')
    for name in ('n_chunks_before', 'n_chunks_after'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f'LSHSelfAttention {name} must be an int >= 0, got {value!r}.')
    if self.n_buckets is not None:
      lsh_hashing.bucket_factors(self.n_buckets, 'LSHSelfAttention n_buckets')
    if not 0.0 <= self.attention_dropout < 1.0:
      raise ValueError(
          f'LSHSelfAttention attention_dropout must be in [0, 1), got {self.attention_dropout}.')
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
  def __call__(self, x):
    if x.ndim != 3:
      raise ValueError(f'LSHSelfAttention expects (batch, length, d_model) inputs, got shape {x.shape}.')
    d = x.shape[-1]
    dtype = self.dtype or x.dtype
    init = nn.initializers.xavier_uniform
    w_qk = self.param('qk', init(in_axis=0, out_axis=(1, 2)), (d, self.n_heads, self.d_qk))
    w_v = self.param('value', init(in_axis=0, out_axis=(1, 2)), (d, self.n_heads, self.d_v))
    w_o = self.param('output', init(in_axis=(0, 1), out_axis=2), (self.n_heads, self.d_v, d))
    xc = x.astype(dtype)
    q = jnp.einsum('bld,dhk->blhk', xc, w_qk.astype(dtype)).astype(jnp.float32)
    v = jnp.einsum('bld,dhk->blhk', xc, w_v.astype(dtype)).astype(jnp.float32)
    if self.mode == 'predict':
      o = self._decode(q, v)
    else:
      o = self._attend(q, v)
    return jnp.einsum('blhk,hkd->bld', o.astype(dtype), w_o.astype(dtype))

  def _hash_rng(self):
    if not (self.has_rng('hash') or self.has_rng('params')):
      raise ValueError(
          "LSHSelfAttention draws its random rotations from the 'hash' rng stream: pass "
          "rngs={'hash': key} to apply.")
    return self.make_rng('hash')

  def _attend(self, q, v):
    """Train/eval: fresh rotations, sort, chunked attention. (b, l, h, k) -> (b, l, h, dv)."""
    b, length = q.shape[:2]
    n_buckets = self.buckets_for(length)
    rotations = lsh_hashing.draw_rotations(
        self._hash_rng(), (b, self.n_heads), self.d_qk, self.n_hashes, n_buckets)
    pad = -length % self.chunk_len
    if pad:
      q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
      v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    buckets = lsh_hashing.hash_vectors(jnp.transpose(q, (0, 2, 1, 3)), rotations, n_buckets)
    if pad:  # Padding goes to an extra bucket, after every real one.
      real = lax.broadcasted_iota(jnp.int32, buckets.shape, 3) < length
      buckets = jnp.where(real, buckets, lsh_hashing.total_buckets(n_buckets))
    buckets = lax.stop_gradient(buckets)
    if self.sow_weights:
      self.sow('intermediates', 'buckets', buckets[..., :length])
    rate = self.attention_dropout if self.mode == 'train' else 0.0
    o = lsh_attend(q, v, buckets, length=length, chunk_len=self.chunk_len,
                   n_chunks_before=self.n_chunks_before, n_chunks_after=self.n_chunks_after,
                   causal=self.causal, dropout_rate=rate,
                   dropout_rng=self.make_rng('dropout') if rate > 0 else None)
    return o[:, :length]

  def _decode(self, q, v):
    """Predict: attend over the ring-buffer memory, one position at a time."""
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
    q_buckets = lsh_hashing.hash_vectors(jnp.transpose(q, (0, 2, 1, 3)), rotations.value, n_buckets)
    recent = self.chunk_len * (self.n_chunks_before + 1)

    def step(memory, inputs):
      keys_, values_, buckets_, slot_pos_ = memory
      q_t, v_t, bucket_t, t = inputs  # (b, h, k), (b, h, dv), (b, h, n), ()
      slot = t % m
      keys_ = lax.dynamic_update_slice_in_dim(keys_, _normalise(q_t)[:, :, None], slot, axis=2)
      values_ = lax.dynamic_update_slice_in_dim(values_, v_t[:, :, None], slot, axis=2)
      buckets_ = lax.dynamic_update_slice_in_dim(buckets_, bucket_t[..., None], slot, axis=3)
      slot_pos_ = lax.dynamic_update_slice_in_dim(slot_pos_, t[None], slot, axis=0)
      dots = jnp.einsum('bhk,bhmk->bhm', q_t, keys_)
      shares = jnp.any(buckets_ == bucket_t[..., None], axis=2)  # (b, h, m)
      near = (slot_pos_ >= 0) & (t - slot_pos_ < recent)
      visible = (slot_pos_ >= 0)[None, None] & (shares | near[None, None])
      logits = jnp.where((slot_pos_ == t)[None, None], SELF_LOGIT,
                         jnp.where(visible, dots, MASKED_LOGIT))
      probs = jax.nn.softmax(logits, axis=-1)
      o_t = jnp.einsum('bhm,bhmd->bhd', probs, values_)
      return (keys_, values_, buckets_, slot_pos_), o_t

    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(v, 1, 0), jnp.moveaxis(q_buckets, 3, 0),
          start + jnp.arange(length, dtype=jnp.int32))
    memory = (keys.value, values.value, buckets.value, slot_pos.value)
    memory, o = lax.scan(step, memory, xs)
    if not self.is_initializing():
      keys.value, values.value, buckets.value, slot_pos.value = memory
    return jnp.moveaxis(o, 0, 1)
